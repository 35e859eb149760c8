"""Dataset readers, labeled/unlabeled splits, loaders, and safe download + extraction.

Every reader returns an `ImageSet`: `set[i]` is `(image or transform(image), label, i)`, where `i` is the index into
that set, so scripts can map a batch back to its samples (pseudo-label tables, queues, CLIP predictions).

Readers, by on-disk format (one function each, in this order below):
    cifar10 / cifar100   `_read_cifar`       python pickle batches, torchvision layout (cifar-10-batches-py/...)
    svhn                 `_read_svhn`        train_32x32.mat / test_32x32.mat (scipy.io), label 10 means digit 0
    cub200 / stanfordcars / aircraft
                         `_read_finegrained` Self-Tuning layout: image_list/{train_100,train_50,train_30,train_15,
                                             test}.txt with lines "<relative path, spaces allowed> <label>"
    imagenet / imagefolder
                         `_read_imagefolder` train/<class>/*, val/<class>/* (or test/); torchvision ImageFolder order
    digits               `_read_digits`      scikit-learn's embedded handwritten digits (see below)
    any image list       `image_list_set`    the list format above, for your own data

Why `digits` exists: it is the one real image dataset that needs no download and no files. scikit-learn ships the
1,797 8x8 UCI handwritten digits inside its pip package (`sklearn.datasets.load_digits` reads them from the
installed wheel), so the first command of the README runs offline, in seconds, on any machine with the
requirements installed, and still learns real digits rather than noise. The images are scaled 0..16 -> 0..255,
upsampled to 32x32 (bilinear) and copied to three channels so the CIFAR-sized networks and augmentations apply
unchanged. The split is fixed: the first 1,497 images are train, the last 300 test (the file is ordered by writer,
so the test digits come from writers not seen in training; both parts are class-balanced within +-3 images).

Splits: `class_balanced_split` (CIFAR/SVHN-style per-class sampling from a seed, identical on every rank),
`finegrained_split` (the pre-made image_list/train_<r>.txt files), `read_index_file` (ImageNet index CSVs / .npy).

Loading: `BatchStream` is an endless, resumable stream of batches whose content depends only on (seed, pass,
position), split over ranks; `eval_loader` is a plain in-order DataLoader.
"""
import csv
import functools
import hashlib
import importlib.util
import math
import os
import pickle
import random
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from common import UserError

NAMES = ('cifar10', 'cifar100', 'svhn', 'cub200', 'stanfordcars', 'aircraft', 'imagenet', 'imagefolder', 'digits')
FINEGRAINED = {'cub200': ('CUB200', 200), 'stanfordcars': ('StanfordCars', 196), 'aircraft': ('Aircraft', 100)}
FINEGRAINED_RATIOS = (15, 30, 50, 100)

# Per-channel mean and std of the training images, in [0, 1] units.
MEAN_STD = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'svhn': ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'digits': ((0.3054, 0.3054, 0.3054), (0.3221, 0.3221, 0.3221)),  # computed on the 1,497 training images
}
# The fine-grained sets and image folders use ImageNet statistics (ImageNet-pretrained backbones).
for _n in ('cub200', 'stanfordcars', 'aircraft', 'imagefolder'):
    MEAN_STD[_n] = MEAN_STD['imagenet']

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')  # torchvision's list


def infer_name(root) -> str:
    """Dataset name from the basename of `root` (what `--dataset` defaults to)."""
    if root is None:
        raise UserError('no dataset root given: pass --root DIR (or --dataset digits, which needs no files)')
    base = Path(root).expanduser().resolve().name.lower()
    key = ''.join(c for c in base if c.isalnum())
    for name in ('cub200', 'stanfordcars', 'aircraft'):
        if key == name or name in key:
            return name
    for name in ('cifar100', 'cifar10', 'svhn', 'imagenet', 'digits'):  # cifar100 before cifar10
        if name in key:
            return name
    if 'ilsvrc' in key:
        return 'imagenet'
    if (Path(root) / 'train').is_dir():
        return 'imagefolder'
    raise UserError(f'cannot tell the dataset from --root {root}: pass --dataset, one of {", ".join(NAMES)}')


# ----------------------------------------------------------------------------------------------------------------
# ImageSet: one dataset class for all formats
# ----------------------------------------------------------------------------------------------------------------
_KEEP = object()


class _ArrayStore:
    """Decoded images held in memory: uint8 (N, H, W, 3)."""

    def __init__(self, images, split):
        self.images, self.split = images, split

    def image(self, row):
        return Image.fromarray(self.images[row])

    def id(self, row):
        return f'{self.split}/{row}'


class _FileStore:
    """Images on disk: `base / rel[row]`; `rel` is the id of each image."""

    def __init__(self, base, rel):
        self.base, self.rel = Path(base), rel

    def path(self, row):
        return os.path.join(self.base, self.rel[row])

    def image(self, row):
        path = self.path(row)
        try:
            with open(path, 'rb') as f:
                img = Image.open(f)
                return img.convert('RGB')
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise UserError(f'cannot read image {path}: {e.__class__.__name__}: {e}. Replace or remove the file '
                            f'(and its line in the list file, if any)') from None

    def id(self, row):
        return self.rel[row]


class ImageSet(Dataset):
    """Images with integer labels. `set[i] -> (x, y, i)`; `x` is the PIL image, `transform(image)`, or, when
    `transform` is a list, the list of views `[t(image) for t in transform]` (each drawn independently)."""

    def __init__(self, store, classes, targets, rows=None, source_index=None, transform=None, name=None):
        self._store = store
        self.classes = list(classes)
        self.targets = np.asarray(targets, dtype=np.int64)
        n = len(self.targets)
        self._rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.source_index = self._rows.copy() if source_index is None else np.asarray(source_index, dtype=np.int64)
        self.transform = transform
        self.name = name
        assert len(self._rows) == n == len(self.source_index)

    @classmethod
    def from_arrays(cls, images, targets, classes=None, split='train', transform=None, name=None):
        """An in-memory set from uint8 images (N, H, W, 3) (or (N, H, W), made RGB)."""
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim == 3:
            images = np.repeat(images[..., None], 3, axis=3)
        targets = np.asarray(targets, dtype=np.int64)
        classes = classes if classes is not None else [str(k) for k in range(int(targets.max(initial=-1)) + 1)]
        return cls(_ArrayStore(np.ascontiguousarray(images), split), classes, targets, transform=transform, name=name)

    @classmethod
    def from_files(cls, root, rel_paths, targets, classes, transform=None, name=None):
        """A set of image files `root / rel_paths[k]` with labels `targets`."""
        return cls(_FileStore(root, list(rel_paths)), classes, targets, transform=transform, name=name)

    num_classes = property(lambda self: len(self.classes))

    @functools.cached_property
    def ids(self):
        """Path relative to the split/list root for file sets, "<split>/<position>" for in-memory sets."""
        return [self._store.id(r) for r in self._rows]

    @functools.cached_property
    def files(self):
        """Absolute image paths (for DALI and for users), or None for in-memory sets."""
        if not isinstance(self._store, _FileStore):
            return None
        return [self._store.path(r) for r in self._rows]

    @property
    def arrays(self):
        """The uint8 (N, H, W, 3) images of an in-memory set (a copy in this set's order), or None."""
        return self._store.images[self._rows] if isinstance(self._store, _ArrayStore) else None

    def __len__(self):
        return len(self.targets)

    def image(self, i):
        img = self._store.image(self._rows[i])
        return img if img.mode == 'RGB' else img.convert('RGB')

    def __getitem__(self, i):
        img = self.image(i)
        t = self.transform
        if isinstance(t, (list, tuple)):
            x = [v(img) for v in t]
        elif t is not None:
            x = t(img)
        else:
            x = img
        return x, int(self.targets[i]), int(i)

    def subset(self, indices, transform=_KEEP, targets=None):
        """Items `indices` of this set, sharing its storage. `targets` replaces the labels (e.g. pseudo-labels);
        `source_index` keeps pointing into the full split."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f'subset index out of range for a set of {len(self)} items')
        if targets is None:
            new_targets = self.targets[idx]
        else:
            new_targets = np.asarray(targets, dtype=np.int64).reshape(-1)
            if len(new_targets) != len(idx):
                raise ValueError(f'{len(new_targets)} targets for {len(idx)} indices')
        return ImageSet(self._store, self.classes, new_targets, rows=self._rows[idx],
                        source_index=self.source_index[idx],
                        transform=self.transform if transform is _KEEP else transform, name=self.name)

    def __repr__(self):
        return f'ImageSet({self.name}, {len(self)} images, {self.num_classes} classes)'


# ----------------------------------------------------------------------------------------------------------------
# load(): one reader per on-disk format
# ----------------------------------------------------------------------------------------------------------------
def load(name, root, split, download=False) -> ImageSet:
    """The `split` ('train' or 'test'; 'test' is val/ for image folders) of dataset `name` under `root`."""
    name = infer_name(root) if name is None else name.lower()
    if name not in NAMES:
        raise UserError(f'unknown dataset {name!r}: choose one of {", ".join(NAMES)}')
    split = 'test' if split == 'val' else split
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if name == 'digits':
        return _read_digits(split)
    root = Path(root).expanduser()
    if download and not _present(name, root):
        fetch_dataset(name, root)
    if name in ('cifar10', 'cifar100'):
        return _read_cifar(name, root, split)
    if name == 'svhn':
        return _read_svhn(root, split)
    if name in FINEGRAINED:
        return _read_finegrained(name, root, split)
    return _read_imagefolder(name, root, split)


_LAYOUT = {
    'cifar10': 'ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (torchvision layout)',
    'cifar100': 'ROOT/cifar-100-python/{train,test,meta} (torchvision layout)',
    'svhn': 'ROOT/train_32x32.mat and ROOT/test_32x32.mat',
    'finegrained': 'ROOT/image_list/{train_100,train_50,train_30,train_15,test}.txt, ROOT/train/, ROOT/test/ '
                   '(Self-Tuning layout; ROOT named CUB200, StanfordCars or Aircraft)',
    'imagefolder': 'ROOT/train/<class>/<images> and ROOT/val/<class>/<images> (or ROOT/test/<class>/)',
}


def _missing(name, root, what):
    layout = _LAYOUT['finegrained' if name in FINEGRAINED else
                     'imagefolder' if name in ('imagenet', 'imagefolder') else name].replace('ROOT', str(root))
    if name in ('imagenet', 'imagefolder'):
        how = ('--download is not available for this dataset: get ImageNet from https://image-net.org and sort '
               'val/ into class folders' if name == 'imagenet' else '--download is not available for image folders')
    else:
        how = 'pass --download to fetch it, or put the files there'
    return UserError(f'{name}: {what} not found; expected {layout}; {how}')


def _present(name, root):
    if name in ('cifar10', 'cifar100'):
        return _cifar_dir(name, root) is not None
    if name == 'svhn':
        return (root / 'train_32x32.mat').is_file() and (root / 'test_32x32.mat').is_file()
    if name in FINEGRAINED:
        return (root / 'image_list' / 'train_100.txt').is_file() and (root / 'image_list' / 'test.txt').is_file() \
            and (root / 'train').is_dir() and (root / 'test').is_dir()
    return True


def _cifar_dir(name, root):
    sub = 'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'
    probe = 'batches.meta' if name == 'cifar10' else 'meta'
    for d in (root / sub, root):  # ROOT or the extracted folder itself
        if (d / probe).is_file():
            return d
    return None


def _latin1_bytes(text, encoding):
    """`_codecs.encode` as protocol-2 pickles written by Python 3 use it: bytes stored as latin-1 text. No other
    codec is needed, so none is reachable."""
    if not isinstance(text, str) or encoding != 'latin1':
        raise pickle.UnpicklingError(f'unexpected _codecs.encode({type(text).__name__}, {encoding!r})')
    return text.encode('latin1')


# The only globals a CIFAR batch needs (dicts, lists, str, bytes and ints need none): NumPy arrays, named as NumPy 1
# wrote them (the official archives, from Python 2) and as NumPy 2 writes them (_frombuffer at protocol 5), plus the
# bytes of Python 3's protocol-2 pickles. Each name maps to the object itself: nothing is imported by name.
_CIFAR_GLOBALS = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', '_reconstruct'): np._core.multiarray._reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): np._core.multiarray._reconstruct,
    ('numpy.core.numeric', '_frombuffer'): np._core.numeric._frombuffer,
    ('numpy._core.numeric', '_frombuffer'): np._core.numeric._frombuffer,
    ('_codecs', 'encode'): _latin1_bytes,
    ('__builtin__', 'bytes'): bytes,  # b'' at protocol 2
    ('builtins', 'bytes'): bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """pickle.load for CIFAR batches: a pickle can call any global it names, so a crafted batch would run code;
    here every global outside _CIFAR_GLOBALS is refused before it is looked up."""

    def __init__(self, f, path):
        super().__init__(f, encoding='latin1')  # Python 2 str -> str, which NumPy turns back into array bytes
        self.path = path

    def find_class(self, module, name):
        obj = _CIFAR_GLOBALS.get((module, name))
        if obj is None:
            raise UserError(f'refusing to load CIFAR file {self.path}: it asks for the Python global {module}.{name}, '
                            f'which CIFAR batches never hold (loading it could run code); re-extract the archive or '
                            f'pass --download')
        return obj


def _bad_cifar(path, what):
    return UserError(f'{path} is not a CIFAR batch: {what}; re-extract the archive or pass --download')


def _unpickle(path):
    try:
        with open(path, 'rb') as f:
            d = _CifarUnpickler(f, path).load()
    except FileNotFoundError:
        raise UserError(f'missing CIFAR file {path}: the folder is incomplete; re-extract the archive or pass '
                        f'--download') from None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f'cannot read CIFAR file {path} ({e.__class__.__name__}: {e}); re-extract the archive or '
                        f'pass --download') from None
    if not isinstance(d, dict):
        raise _bad_cifar(path, f'it holds a {type(d).__name__}, not a dict')
    return {(k.decode('latin1') if isinstance(k, bytes) else k): v for k, v in d.items()}


def _entry(b, key, path):
    if key not in b:
        raise _bad_cifar(path, f'no {key!r} entry (it has {", ".join(map(repr, b)) or "none"})')
    return b[key]


def _read_cifar(name, root, split):
    d = _cifar_dir(name, root)
    if d is None:
        raise _missing(name, root, 'the CIFAR batches')
    if name == 'cifar10':
        files = [f'data_batch_{k}' for k in range(1, 6)] if split == 'train' else ['test_batch']
        meta, label_key, names_key = 'batches.meta', 'labels', 'label_names'
    else:
        files, meta, label_key, names_key = [split], 'meta', 'fine_labels', 'fine_label_names'
    images, labels = [], []
    for f in files:
        b = _unpickle(d / f)
        x, y = _entry(b, 'data', d / f), _entry(b, label_key, d / f)
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072):
            got = f'a {x.dtype} array of {" x ".join(map(str, x.shape))}' if isinstance(x, np.ndarray) else \
                f'a {type(x).__name__}'
            raise _bad_cifar(d / f, f"'data' is {got}, not uint8 N x 3072 (N images of 3 x 32 x 32)")
        try:
            y = np.asarray(y)
        except ValueError:  # ragged nested lists
            y = None
        if y is None or y.ndim != 1 or (len(y) and y.dtype.kind not in 'iu'):
            raise _bad_cifar(d / f, f'{label_key!r} is not a list of integer labels')
        if len(y) != len(x):
            raise _bad_cifar(d / f, f'{len(y)} labels for {len(x)} images')
        images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(y.tolist())
    names = _entry(_unpickle(d / meta), names_key, d / meta)
    if not (isinstance(names, list) and all(isinstance(c, (str, bytes)) for c in names)):
        raise _bad_cifar(d / meta, f'{names_key!r} is not a list of class names')
    classes = [c.decode() if isinstance(c, bytes) else c for c in names]
    labels = np.asarray(labels, dtype=np.int64)
    _check_range(labels, len(classes), d / files[0])
    return ImageSet(_ArrayStore(np.ascontiguousarray(np.concatenate(images)), split), classes, labels, name=name)


def _read_svhn(root, split):
    path = root / f'{split}_32x32.mat'
    if not path.is_file():
        raise _missing('svhn', root, path.name)
    import scipy.io
    try:
        m = scipy.io.loadmat(str(path))
        x = np.ascontiguousarray(np.asarray(m['X'], dtype=np.uint8).transpose(3, 0, 1, 2))  # (32,32,3,N) -> NHWC
        y = np.asarray(m['y'], dtype=np.int64).reshape(-1)
    except Exception as e:
        raise UserError(f'cannot read {path} ({e.__class__.__name__}: {e}); re-download it with --download') from None
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    _check_range(y, 10, path)
    return ImageSet(_ArrayStore(x, split), [str(k) for k in range(10)], y, name='svhn')


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    """(uint8 images (1797, 32, 32, 3), labels) of scikit-learn's digits. Reads the data file inside the installed
    scikit-learn package (what `sklearn.datasets.load_digits` reads) without importing sklearn.datasets, which
    takes seconds; falls back to load_digits if the file moved."""
    spec = importlib.util.find_spec('sklearn')
    if spec is None:
        raise UserError('the digits dataset comes with scikit-learn: pip install scikit-learn')
    path = Path(spec.origin).parent / 'datasets' / 'data' / 'digits.csv.gz'
    try:
        table = np.loadtxt(path, delimiter=',')
        images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    except OSError:
        from sklearn.datasets import load_digits
        d = load_digits()
        images, labels = d.images, d.target
    small = np.round(images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in small])
    return np.ascontiguousarray(np.repeat(big[..., None], 3, axis=3)), labels.astype(np.int64)


def _read_digits(split):
    images, labels = _digits_arrays()
    sl = slice(0, 1497) if split == 'train' else slice(1497, None)
    return ImageSet(_ArrayStore(images[sl], split), [str(k) for k in range(10)], labels[sl], name='digits')


def _read_finegrained(name, root, split):
    if not _present(name, root):
        raise _missing(name, root, 'the Self-Tuning folder layout')
    lists = root / 'image_list'
    train_rel, train_y = _parse_list(lists / 'train_100.txt', FINEGRAINED[name][1])
    test_rel, test_y = _parse_list(lists / 'test.txt', FINEGRAINED[name][1])
    classes = _classes_from_lists([(train_rel, train_y), (test_rel, test_y)])
    rel, y = (train_rel, train_y) if split == 'train' else (test_rel, test_y)
    return ImageSet(_FileStore(root, rel), classes, y, name=name)


def _classes_from_lists(lists):
    """Class names from the image lists: label k is named after the folder of its first image."""
    n = max((int(y.max()) + 1 for _, y in lists if len(y)), default=0)
    names = [None] * n
    for rel, y in lists:
        for r, k in zip(rel, y):
            if names[k] is None:
                parent = os.path.basename(os.path.dirname(r))
                names[k] = parent or str(k)
    names = [str(k) if v is None else v for k, v in enumerate(names)]
    if len(set(names)) != len(names):  # folders do not map one-to-one to labels: use the numbers
        names = [str(k) for k in range(n)]
    return names


def _read_imagefolder(name, root, split):
    train = root / 'train'
    if not train.is_dir():
        raise _missing(name, root, f'{train}')
    classes = sorted(e.name for e in os.scandir(train) if e.is_dir())
    if not classes:
        raise _missing(name, root, f'class folders in {train}')
    if split == 'train':
        d = train
    else:
        d = next((root / s for s in ('val', 'test') if (root / s).is_dir()), None)
        if d is None:
            raise _missing(name, root, f'{root / "val"} (or {root / "test"})')
        extra = sorted(e.name for e in os.scandir(d) if e.is_dir() and e.name not in set(classes))
        if extra:
            raise UserError(f'{d} has class folders that train/ lacks ({", ".join(extra[:5])}); val/ must hold the '
                            f'same class folders as train/')
    rel, labels = [], []
    for k, c in enumerate(classes):  # torchvision ImageFolder order: sorted classes, sorted walk, sorted files
        cdir = d / c
        if not cdir.is_dir():
            continue
        for dirpath, _, fnames in sorted(os.walk(cdir, followlinks=True)):
            for fn in sorted(fnames):
                if fn.lower().endswith(IMG_EXTENSIONS):
                    rel.append(os.path.relpath(os.path.join(dirpath, fn), d))
                    labels.append(k)
    if not rel:
        raise _missing(name, root, f'images in {d}')
    if name == 'imagenet' and split == 'train' and len(classes) == 1000 and len(rel) != 1281167:
        warnings.warn(f'{d} holds {len(rel)} images, not the standard 1,281,167: index CSVs made for the standard '
                      f'tree will point at the wrong images')
    return ImageSet(_FileStore(d, rel), classes, labels, name=name)


# ----------------------------------------------------------------------------------------------------------------
# Image lists ("<relative path with possible spaces> <int label>")
# ----------------------------------------------------------------------------------------------------------------
def _check_range(labels, num_classes, path):
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise UserError(f'{path}: label {labels[bad[0]]} of item {bad[0]} is outside 0..{num_classes - 1}')


def _parse_list(path, num_classes=None, with_lines=False):
    """(relative paths, int64 labels[, line numbers]) of an image list."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except FileNotFoundError:
        raise UserError(f'image list {path} not found') from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'cannot read image list {path}: {e}') from None
    rel, labels, linenos = [], [], []
    for lineno, line in enumerate(text.split('\n'), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise UserError(f'{path}:{lineno}: expected "<relative image path> <integer label>", got {line.strip()!r}')
        try:
            y = int(parts[-1])
        except ValueError:
            raise UserError(f'{path}:{lineno}: label {parts[-1]!r} is not an integer') from None
        if y < 0 or (num_classes is not None and y >= num_classes):
            top = '' if num_classes is None else f'..{num_classes - 1}'
            raise UserError(f'{path}:{lineno}: label {y} is outside the class range 0{top}')
        rel.append(' '.join(parts[:-1]))  # paths may contain spaces: everything but the last token, re-joined
        labels.append(y)
        linenos.append(lineno)
    labels = np.asarray(labels, dtype=np.int64)
    return (rel, labels, linenos) if with_lines else (rel, labels)


def read_image_list(path, root, num_classes=None):
    """(absolute paths, int64 labels) of an image list; paths are relative to `root`. With `num_classes`, a label
    outside 0..num_classes-1 is an error naming the file and line."""
    rel, labels = _parse_list(path, num_classes)
    return [os.path.join(root, r) for r in rel], labels


def image_list_set(list_path, root, num_classes=None, transform=None) -> ImageSet:
    """An ImageSet from any image-list file (your own data): classes are named after the image folders."""
    rel, labels = _parse_list(list_path, num_classes)
    classes = _classes_from_lists([(rel, labels)])
    if num_classes is not None and len(classes) < num_classes:
        classes += [str(k) for k in range(len(classes), num_classes)]
    return ImageSet(_FileStore(root, rel), classes, labels, transform=transform, name='imagelist')


# ----------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------
def finegrained_split(root, name, label_ratio):
    """(labeled, unlabeled) subsets of the fine-grained train set: labeled = image_list/train_<r>.txt, unlabeled =
    train_100 minus train_r, in train_100's order (the reference used Python-set order, which changes per run)."""
    root = Path(root).expanduser()
    name = name.lower()
    full = load(name, root, 'train')
    lists = root / 'image_list'
    path = lists / f'train_{label_ratio}.txt'
    if not path.is_file():
        have = sorted(int(p.stem[6:]) for p in lists.glob('train_*.txt') if p.stem[6:].isdigit())
        raise UserError(f'--label_ratio {label_ratio} is not available for {name}: {path} does not exist; '
                        f'ratios shipped: {", ".join(map(str, have)) or "none"}')
    rel, y, lines = _parse_list(path, FINEGRAINED[name][1], with_lines=True)
    position = {(r, int(t)): k for k, (r, t) in enumerate(zip(full.ids, full.targets))}
    labeled = []
    for (r, t), lineno in zip(zip(rel, y), lines):
        k = position.get((r, int(t)))
        if k is None:
            raise UserError(f'{path}:{lineno}: {r} (label {t}) is not in image_list/train_100.txt; the lists do not '
                            f'belong together')
        labeled.append(k)
    taken = np.zeros(len(full), dtype=bool)
    taken[labeled] = True
    return full.subset(labeled), full.subset(np.flatnonzero(~taken))


def class_balanced_split(targets, num_labeled, num_classes, seed, exclude_labeled=False, exact=False):
    """(labeled_idx, unlabeled_idx): num_labeled // num_classes indices per class, drawn without replacement with
    np.random.RandomState(seed) class by class: the same images as FixMatch's `x_u_split` after np.random.seed(seed),
    returned sorted. Depends only on the seed, never on the rank or the global RNGs. unlabeled = every index (FixMatch
    convention) or, with exclude_labeled, the others."""
    targets = np.asarray(targets, dtype=np.int64)
    if exact and num_labeled % num_classes:
        raise UserError(f'{num_labeled} labels cannot be split evenly over {num_classes} classes: choose a multiple '
                        f'of {num_classes}')
    per_class = num_labeled // num_classes
    if per_class < 1:
        raise UserError(f'{num_labeled} labels give less than one per class for {num_classes} classes: use at '
                        f'least {num_classes}')
    if num_labeled > len(targets):
        raise UserError(f'{num_labeled} labels requested but the training set has only {len(targets)} images')
    rng = np.random.RandomState(seed)
    labeled = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        if len(idx) < per_class:
            raise UserError(f'class {c} has {len(idx)} training images, fewer than the {per_class} per class that '
                            f'{num_labeled} labels need: lower the number of labels')
        labeled.append(rng.choice(idx, per_class, replace=False))
    labeled = np.sort(np.concatenate(labeled)).astype(np.int64)
    if exclude_labeled:
        mask = np.ones(len(targets), dtype=bool)
        mask[labeled] = False
        unlabeled = np.flatnonzero(mask).astype(np.int64)
    else:
        unlabeled = np.arange(len(targets), dtype=np.int64)
    return labeled, unlabeled


def _read_csv(path, required):
    """(rows as dicts, line number of each row) of a CSV file; `required` columns must be in the header."""
    path = Path(path)
    try:
        f = open(path, newline='', encoding='utf-8-sig')
    except OSError as e:
        raise UserError(f'cannot open {path}: {e.strerror or e}') from None
    with f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        for col in required:
            if col not in header:
                raise UserError(f'{path}:1: no {col!r} column (header: {",".join(header) or "empty"}); '
                                f'expected columns {", ".join(required)}')
        reader.fieldnames = header
        rows, lines = [], []
        for row in reader:
            if not any((v or '').strip() for v in row.values() if isinstance(v, str)):
                continue
            rows.append(row)
            lines.append(reader.line_num)
    return rows, lines


def _int_column(path, rows, lines, col, size=None, unique=False):
    out = np.empty(len(rows), dtype=np.int64)
    first = {}
    for k, (row, line) in enumerate(zip(rows, lines)):
        s = (row.get(col) or '').strip()
        try:
            v = int(s)
        except ValueError:
            try:
                fv = float(s)
                v = int(fv) if fv.is_integer() else None
            except ValueError:
                v = None
            if v is None:
                raise UserError(f'{path}:{line}: {col} {s!r} is not an integer') from None
        if v < 0 or (size is not None and v >= size):
            top = '' if size is None else f'..{size - 1}'
            raise UserError(f'{path}:{line}: {col} {v} is out of range 0{top}'
                            + (' (made for another dataset or another file order?)' if col == 'Index' else ''))
        if unique:
            if v in first:
                raise UserError(f'{path}:{line}: duplicate {col} {v} (first at line {first[v]})')
            first[v] = line
        out[k] = v
    return out


def read_index_file(path, size) -> np.ndarray:
    """int64 indices from a .npy file or from the 'Index' column of a CSV (other columns ignored). Each index must
    lie in 0..size-1 and appear once; errors name the file and line (entry, for .npy)."""
    path = Path(path)
    if path.suffix == '.npy':
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f'cannot read index file {path}: {e}') from None
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or (
                np.issubdtype(a.dtype, np.floating) and np.all(np.mod(a, 1) == 0))):
            raise UserError(f'{path}: expected a 1-D array of integer indices, got {a.dtype} of shape {a.shape}')
        a = a.astype(np.int64)
        bad = np.flatnonzero((a < 0) | (a >= size)) if size is not None else np.flatnonzero(a < 0)
        if len(bad):
            raise UserError(f'{path}: entry {bad[0]}: index {a[bad[0]]} is out of range 0..{size - 1}')
        _, first, counts = np.unique(a, return_index=True, return_counts=True)
        if (counts > 1).any():
            v = a[first[np.argmax(counts > 1)]]
            dup = np.flatnonzero(a == v)
            raise UserError(f'{path}: entry {dup[1]}: duplicate index {v} (first at entry {dup[0]})')
        return a
    rows, lines = _read_csv(path, ['Index'])
    return _int_column(path, rows, lines, 'Index', size, unique=True)


def write_index_csv(path, indices, ids):
    """CSV with columns Index, ImageID, one row per index; `ids` is the id list of the WHOLE set the indices
    point into (e.g. `train.ids`), so ImageID = ids[index]. Written atomically."""
    path = Path(path)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(ids)):
        raise ValueError(f'indices out of range for {len(ids)} ids')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f)
        w.writerow(['Index', 'ImageID'])
        for i in indices:
            w.writerow([int(i), ids[i]])
    os.replace(tmp, path)


def read_pseudo_label_csv(path, size, num_classes=None):
    """(indices, labels, probs or None) from a CSV with columns Index, PseudoLabel and optionally Probs (the
    DebiasPL CLIP files). Index in 0..size-1 and unique; PseudoLabel in 0..num_classes-1 when given."""
    rows, lines = _read_csv(path, ['Index', 'PseudoLabel'])
    idx = _int_column(path, rows, lines, 'Index', size, unique=True)
    labels = _int_column(path, rows, lines, 'PseudoLabel', num_classes)
    probs = None
    if rows and 'Probs' in rows[0]:
        probs = np.empty(len(rows), dtype=np.float32)
        for k, (row, line) in enumerate(zip(rows, lines)):
            try:
                probs[k] = float(row['Probs'])
            except (TypeError, ValueError):
                raise UserError(f'{path}:{line}: Probs {row["Probs"]!r} is not a number') from None
    return idx, labels, probs


def save_image_grid(path, dataset, picks, per_row, labelled, thumb=48):
    """A PNG of `dataset`'s images at the indices `picks`: one row per class (at most `per_row`) when the labels
    are known, else rows of `per_row`."""
    from PIL import ImageDraw
    picks = np.asarray(picks)
    if labelled:
        rows = [(dataset.classes[c], picks[dataset.targets[picks] == c][:per_row]) for c in range(dataset.num_classes)]
    else:
        rows = [("", picks[a:a + per_row]) for a in range(0, len(picks), per_row)]
    text_w = min(120, 7 * max([len(r[0]) for r in rows] + [0]) + 6) if labelled else 0
    cols = max([len(r[1]) for r in rows] + [1])
    img = Image.new("RGB", (text_w + cols * (thumb + 2), max(1, len(rows)) * (thumb + 2)), "white")
    draw = ImageDraw.Draw(img)
    for r, (name, items) in enumerate(rows):
        y = r * (thumb + 2)
        if labelled:
            draw.text((2, y + thumb // 2 - 5), f"{name[:16]} ({len(items)})", fill="black")
        for c, i in enumerate(items):
            im = dataset.image(int(i)).convert("RGB").resize((thumb, thumb))
            img.paste(im, (text_w + c * (thumb + 2), y))
    img.save(path)


# ----------------------------------------------------------------------------------------------------------------
# Archives and downloads
# ----------------------------------------------------------------------------------------------------------------
def _inside(dest, rel):
    """Is `rel` (a path relative to dest, already normalised) inside dest?"""
    full = os.path.normpath(os.path.join(dest, rel))
    return full == dest or full.startswith(dest + os.sep)


def _check_member_name(archive, name):
    norm = name.replace('\\', '/')
    if norm.startswith('/') or (len(norm) > 1 and norm[1] == ':'):
        raise UserError(f'refusing to extract {archive}: member {name!r} has an absolute path')
    if '..' in norm.split('/'):
        raise UserError(f"refusing to extract {archive}: member {name!r} contains '..'")


def safe_extract(archive, dest):
    """Extract a tar (any compression) or zip archive into `dest`. Every member is checked first: absolute paths,
    '..' components, links pointing outside `dest` and device files are refused, and then nothing is written.
    Extraction goes to a temporary folder inside `dest` and is merged into place only when it completed: existing
    folders are merged, files and links replaced only by their own kind, and nothing is ever deleted (a member that
    would replace a folder or an entry of another kind refuses the whole archive)."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    d = os.path.realpath(dest)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                infos = z.infolist()
                for m in infos:
                    _check_member_name(archive, m.filename)
                    if stat.S_ISLNK(m.external_attr >> 16):
                        raise UserError(f'refusing to extract {archive}: member {m.filename!r} is a symbolic link')
                    if not _inside(d, m.filename):
                        raise UserError(f'refusing to extract {archive}: member {m.filename!r} leaves {dest}')
                tmp = tempfile.mkdtemp(prefix='.extract-', dir=d)
                try:
                    z.extractall(tmp)
                    _merge(archive, tmp, d, move=False)
                    _merge(archive, tmp, d, move=True)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            return
        if not tarfile.is_tarfile(archive):
            raise UserError(f'{archive} is neither a tar nor a zip archive; delete it and download it again')
        with tarfile.open(archive) as t:
            members = t.getmembers()
            earlier = set()
            for m in members:
                _check_member_name(archive, m.name)
                if m.islnk() and os.path.normpath(m.linkname) not in earlier:  # never a link to a file already there
                    raise UserError(f'refusing to extract {archive}: hard link {m.name!r} -> {m.linkname!r} is not to '
                                    f'an earlier member of the archive')
                earlier.add(os.path.normpath(m.name))
                if not _inside(d, m.name):
                    raise UserError(f'refusing to extract {archive}: member {m.name!r} leaves {dest}')
                if m.isdev() or m.isfifo():
                    raise UserError(f'refusing to extract {archive}: member {m.name!r} is a device or fifo')
                if m.issym() or m.islnk():
                    target = m.linkname.replace('\\', '/')
                    if target.startswith('/'):
                        raise UserError(f'refusing to extract {archive}: link {m.name!r} points to absolute path '
                                        f'{m.linkname!r}')
                    base = os.path.dirname(m.name) if m.issym() else ''
                    if not _inside(d, os.path.join(base, target)):
                        raise UserError(f'refusing to extract {archive}: link {m.name!r} -> {m.linkname!r} points '
                                        f'outside {dest}')
            tmp = tempfile.mkdtemp(prefix='.extract-', dir=d)
            try:
                if hasattr(tarfile, 'data_filter'):
                    t.extractall(tmp, members=members, filter='data')
                else:  # pragma: no cover - Python < 3.11.4; members were checked above
                    t.extractall(tmp, members=members)
                _merge(archive, tmp, d, move=False)
                _merge(archive, tmp, d, move=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except UserError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f'cannot extract {archive} ({e.__class__.__name__}: {e}); delete it and download it '
                        f'again') from None


def _kind(path):
    """'folder', 'symlink', 'file' or 'special file' (fifo, socket, device) at `path`, links not followed; None if
    nothing is there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    return 'folder' if stat.S_ISDIR(mode) else 'symlink' if stat.S_ISLNK(mode) else \
        'file' if stat.S_ISREG(mode) else 'special file'


def _merge(archive, src, dst, move, rel=''):
    """Merge the extracted tree `src` into `dst`: a folder merges into an existing folder, a file or symlink replaces
    one of its own kind (extracting an archive again over itself). An entry of another kind is refused: replacing it
    would delete a user's folder or file, or write through a user's link. move=False only checks, so that a refused
    archive writes nothing."""
    for entry in sorted(os.listdir(src)):
        s, t, member = os.path.join(src, entry), os.path.join(dst, entry), rel + entry
        ks, kt = _kind(s), _kind(t)
        if kt is not None and ks != kt:
            raise UserError(f'refusing to extract {archive}: member {member!r} is a {ks} but {t} is an existing {kt}, '
                            f'which extraction never replaces; move it away or extract elsewhere')
        if ks == kt == 'folder':
            _merge(archive, s, t, move, member + '/')
        elif move:
            os.replace(s, t)  # `t` is absent or of the same kind, never a folder (os.replace cannot delete one)


@dataclass
class _Remote:
    filename: str                 # name of the file in ROOT
    urls: tuple                   # first is tried first; the rest are mirrors
    sha256: str = None
    md5: str = None
    extract: bool = True


def _tsinghua(*ids):
    return tuple(f'https://cloud.tsinghua.edu.cn/f/{i}/?dl=1' for i in ids)


# Fine-grained archives of Self-Tuning / Transfer-Learning-Library: newer links first, the original ones as mirrors.
# Their checksums were never published.
_FG_IDS = {
    'cub200': (('c2a5952eb18b466b9fb0', 'fa398a321b094a24a347'), ('63db4c49b57b43198b95', '521ba92bafc04ee69c20'),
               ('72e95cccdcaf4b42b4eb', 'cc7ef72081e64bc7a218')),
    'stanfordcars': (('aeeb690e9886442aa267', 'd95c188cc49c404aba70'), ('fd80c30c120a42a08fd3', 'd5ab63c391a949509db0'),
                     ('01e6b279f20440cb8bf9', '04e6fd5222a84d0a8ff5')),
    'aircraft': (('449157d27987463cbdb1', '04356d49d0054092b07e'), ('06804f17fdb947aa9401', '9fed22eba03046d69012'),
                 ('164996d09cc749abbdeb', '8d5e4c1b031a4a608c68')),
}

REMOTE = {
    'cifar10': [_Remote('cifar-10-python.tar.gz', ('https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',),
                        sha256='6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce',
                        md5='c58f30108f718f92721af3b95e74349a')],
    'cifar100': [_Remote('cifar-100-python.tar.gz', ('https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',),
                         sha256='85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7',
                         md5='eb9058c3a382ffc7106e4002c42a8d85')],
    'svhn': [_Remote('train_32x32.mat', ('http://ufldl.stanford.edu/housenumbers/train_32x32.mat',),
                     md5='e26dedcc434d2e4c54c9b2d4a06d8373', extract=False),
             _Remote('test_32x32.mat', ('http://ufldl.stanford.edu/housenumbers/test_32x32.mat',),
                     md5='eb5a983be6a315427106f1b69d705feb', extract=False)],
}
for _n, _ids in _FG_IDS.items():
    REMOTE[_n] = [_Remote(f, _tsinghua(*i)) for f, i in zip(('image_list.zip', 'train.tgz', 'test.tgz'), _ids)]


def _digest(path, algo):
    h = hashlib.new(algo)
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _verify(path, r):
    for algo, want in (('sha256', r.sha256), ('md5', r.md5)):
        if want:
            got = _digest(path, algo)
            if got != want:
                return f'{algo} {got} differs from the published {want}'
            return None  # the strongest published checksum is enough
    return None


def _fetch(url, out, timeout=60):
    req = urllib.request.Request(url, headers={'User-Agent': 'Mozilla/5.0 (data-efficient-dl downloader)'})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(out, 'wb') as f:
        shutil.copyfileobj(resp, f, 1 << 20)


def download(name, root):
    """Fetch the official archives of `name` into `root` (checksums verified where published) and extract them.
    An archive already in `root` (e.g. downloaded by hand) is used when its checksum matches or none is published."""
    name = name.lower()
    root = Path(root).expanduser()
    if name == 'digits':
        return  # ships with scikit-learn
    if name not in REMOTE:
        raise UserError(f'--download is not available for {name}: put the images in {_LAYOUT["imagefolder"]}'
                        .replace('ROOT', str(root)))
    root.mkdir(parents=True, exist_ok=True)
    for r in REMOTE[name]:
        dest = root / r.filename
        if not (dest.is_file() and _verify(dest, r) is None):  # a file put there by hand is used as is
            errors = []
            for url in r.urls:
                part = root / (r.filename + '.part')
                try:
                    print(f'downloading {url} -> {dest}', flush=True)
                    _fetch(url, part)
                    bad = _verify(part, r)
                    if bad:
                        raise OSError(bad)
                    os.replace(part, dest)
                    break
                except (OSError, urllib.error.URLError, ValueError) as e:
                    errors.append(f'{url}: {getattr(e, "reason", None) or e}')
                    part.unlink(missing_ok=True)
            else:
                raise UserError(f'could not download {r.filename} ({"; ".join(errors)}); download it by hand from '
                                f'{r.urls[0]} and put it at {dest}, then run again')
        if r.extract:
            safe_extract(dest, root)


fetch_dataset = download  # load() takes a `download` flag, which hides the function's name there


# ----------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------
class _ItemError:
    """A UserError caught in a worker process, passed back as data so the main process raises it as one line (a
    worker's exception would come back with a traceback in its message)."""

    def __init__(self, msg):
        self.msg = msg


class _Catching(Dataset):
    """`dataset` as seen by worker processes: a UserError becomes an _ItemError."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # loader.dataset.classes etc. still work
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except UserError as e:
            return _ItemError(str(e))


def _collate(items):
    err = next((it for it in items if isinstance(it, _ItemError)), None)
    return err if err is not None else default_collate(items)


class _Loader(DataLoader):
    """A DataLoader that raises a worker's UserError in the main process."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, _ItemError):
                raise UserError(batch.msg)
            yield batch


def eval_loader(dataset, batch_size, workers=0, rank=0, world_size=1, pad=False) -> DataLoader:
    """In-order batches of `batch_size` items (per process), last batch kept, (x, y, idx) with idx the position in
    `dataset`. With world_size > 1, rank r gets items r, r+w, r+2w, ... (every item on
    exactly one rank, so summed counts are exact); pad=True repeats items so that all ranks get the same count (for
    all_gather), the batch's idx tells the repeats apart."""
    idx = list(range(rank, len(dataset), world_size))
    if pad and world_size > 1:
        per = math.ceil(len(dataset) / world_size)
        idx += list(range(rank, len(dataset), world_size))[:per - len(idx)] or [0] * (per - len(idx))
    return _Loader(_Catching(dataset) if workers > 0 else dataset, batch_size=batch_size, sampler=idx,
                   num_workers=workers, drop_last=False, collate_fn=_collate, persistent_workers=workers > 0,
                   pin_memory=torch.cuda.is_available() and workers > 0)


@dataclass
class _Batch:
    """What a worker fetches: the items, the seed for their augmentation (None: use this process's RNGs), and the
    stream position after the batch."""
    indices: list
    seed: int
    next_pass: int
    next_pos: int


class _BatchFetcher(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):  # never used for sampling; the sampler is endless
        return len(self.dataset)

    def __getitem__(self, b):
        if b.seed is not None:
            random.seed(b.seed)
            np.random.seed(b.seed % 2 ** 32)
            torch.manual_seed(b.seed)
        try:
            batch = default_collate([self.dataset[i] for i in b.indices])
        except UserError as e:
            batch = _ItemError(str(e))
        return batch, (b.next_pass, b.next_pos)


def _first(x):
    return x


class BatchStream:
    """Endless batches of `(x, y, idx)` from `dataset`, resumable.

    Pass p visits the items in the order np.random.RandomState(seed + p).permutation(n) (or 0..n-1 without shuffle);
    rank r of w takes perm[r::w], so ranks see disjoint items, and batches of batch_size // world_size items each.
    With drop_last a pass's short tail is skipped; a set smaller than one batch fills its batches from the next
    passes. state_dict() is the (pass, position) after the last batch returned, so a resumed stream returns the same
    batches. Augmentation randomness: with workers=0 the main process's RNGs (saved by the run's checkpoint); with
    workers > 0 each batch's worker RNGs are seeded from (seed, rank, pass, position), so batches are reproducible
    for any number of workers and across resumes."""

    def __init__(self, dataset, batch_size, seed, workers=0, rank=0, world_size=1, shuffle=True, drop_last=True,
                 pin_memory=False):
        if len(dataset) == 0:
            raise UserError('cannot draw batches from an empty dataset (check the split: e.g. --label_ratio 100 '
                            'leaves no unlabeled images)')
        if batch_size < world_size:
            raise UserError(f'--batch_size {batch_size} is the global batch and must be at least the number of '
                            f'processes ({world_size})')
        self.dataset, self.seed, self.workers = dataset, int(seed), int(workers)
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_size = int(batch_size)
        self.per_rank = self.batch_size // self.world_size
        self.shuffle, self.drop_last, self.pin_memory = shuffle, drop_last, pin_memory
        self.n = len(dataset)
        self.per_pass = math.ceil(self.n / self.world_size) if not drop_last else self.n // self.world_size
        if self.per_pass == 0:
            raise UserError(f'{self.n} items cannot be split over {self.world_size} processes')
        self.batches_per_pass = max(1, (self.per_pass // self.per_rank) if drop_last
                                    else math.ceil(self.per_pass / self.per_rank))
        self.pass_, self.pos = 0, 0
        self._order_cache = (None, None)
        self._it = None

    # --- which items -------------------------------------------------------------------------------------------
    def _order(self, p):
        if self._order_cache[0] != p:
            perm = np.random.RandomState((self.seed + p) % 2 ** 32).permutation(self.n) if self.shuffle \
                else np.arange(self.n)
            if not self.drop_last and self.n % self.world_size:  # pad by wrapping, as DistributedSampler does
                perm = np.concatenate([perm, perm[:self.world_size - self.n % self.world_size]])
            self._order_cache = (p, perm[self.rank::self.world_size][:self.per_pass])
        return self._order_cache[1]

    def _plan(self, p, pos):
        """The next batch after position (p, pos): (indices, start pass, start pos, next pass, next pos)."""
        b = self.per_rank
        if self.drop_last and self.per_pass >= b and pos + b > self.per_pass:
            p, pos = p + 1, 0  # skip the short tail of the pass
        start = (p, pos)
        out = []
        while len(out) < b:
            order = self._order(p)
            take = order[pos:pos + b - len(out)]
            out.extend(int(i) for i in take)
            pos += len(take)
            if pos >= len(order):
                p, pos = p + 1, 0
                if not self.drop_last:
                    break  # keep the last, short batch of the pass
        return out, start, p, pos

    def _plans(self, p, pos):
        while True:
            idx, (sp, spos), p, pos = self._plan(p, pos)
            seed = None
            if self.workers > 0:
                seed = int(np.random.SeedSequence([self.seed, self.rank, sp, spos]).generate_state(2, np.uint64)[0]
                           % 2 ** 63)
            yield _Batch(idx, seed, p, pos)

    # --- iteration ---------------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self.workers == 0:
            idx, _, self.pass_, self.pos = self._plan(self.pass_, self.pos)
            batch = default_collate([self.dataset[i] for i in idx])
            if self.pin_memory and torch.cuda.is_available():
                batch = _pin(batch)
            return batch
        if self._it is None:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + self.pass_)
            loader = DataLoader(_BatchFetcher(self.dataset), batch_size=None, sampler=self._plans(self.pass_, self.pos),
                                num_workers=self.workers, collate_fn=_first, pin_memory=self.pin_memory,
                                generator=g, persistent_workers=False)
            self._it = iter(loader)
        batch, state = next(self._it)
        if isinstance(batch, _ItemError):
            self.close()
            raise UserError(batch.msg)
        self.pass_, self.pos = state
        return batch

    @property
    def epoch(self):
        """Number of completed passes (the pass the next batch comes from)."""
        return self.pass_

    def state_dict(self) -> dict:
        return {'pass': self.pass_, 'pos': self.pos, 'seed': self.seed, 'n': self.n,
                'world_size': self.world_size, 'batch_size': self.batch_size}

    def load_state_dict(self, d):
        if d.get('n', self.n) != self.n:
            raise UserError(f'the checkpoint\'s data stream had {d["n"]} items, this dataset has {self.n}: resume '
                            f'with the same dataset and split')
        p, pos = int(d['pass']), int(d['pos'])
        self.seed = int(d.get('seed', self.seed))  # the checkpoint's order, so the resumed batches are the same
        old_world = int(d.get('world_size', self.world_size))
        if old_world != self.world_size:  # keep the same share of the pass (exact batches are lost anyway)
            pos = min(pos * old_world // self.world_size, self.per_pass)
        self.pass_, self.pos = p, pos
        self.close()

    def close(self):
        """Stop the worker processes (they restart at the next batch)."""
        self._it = None

    def __len__(self):
        return self.batches_per_pass


def _pin(batch):
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pin(b) for b in batch)
    return batch
