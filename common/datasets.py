"""Dataset readers: every supported on-disk format becomes one `ImageSet`.

`set[i]` is `(image or transform(image), label, i)`, where `i` is the index into that set, so scripts can map a
batch back to its samples (pseudo-label tables, queues, CLIP predictions).

Readers, by on-disk format (one function each, in this order below):
    cifar10 / cifar100   `_read_cifar`       python pickle batches, torchvision layout (cifar-10-batches-py/...)
    svhn                 `_read_svhn`        train_32x32.mat / test_32x32.mat (scipy.io), label 10 means digit 0
    cub200 / stanfordcars / aircraft
                         `_read_finegrained` Self-Tuning layout: image_list/{train_100,train_50,train_30,train_15,
                                             test}.txt with lines "<relative path, spaces allowed> <label>"
    imagenet / imagefolder
                         `_read_imagefolder` train/<class>/*, val/<class>/* (or test/); torchvision ImageFolder order
    digits               `_read_digits`      scikit-learn's embedded handwritten digits (see below)

Why `digits` exists: it is the one real image dataset that needs no download and no files. scikit-learn ships the
1,797 8x8 UCI handwritten digits inside its pip package (`sklearn.datasets.load_digits` reads them from the
installed wheel), so the first command of the README runs offline, in seconds, on any machine with the
requirements installed, and still learns real digits rather than noise. The images are scaled 0..16 -> 0..255,
upsampled to 32x32 (bilinear) and copied to three channels so the CIFAR-sized networks and augmentations apply
unchanged. The split is fixed: the first 1,497 images are train, the last 300 test (the file is ordered by writer,
so the test digits come from writers not seen in training; both parts are class-balanced within +-3 images).

The other rooms: `splits` (labeled / unlabeled splits, index and pseudo-label files), `loaders` (batch streams),
`download` (fetching and safe extraction), `figures` (image grids).
"""
import functools
import importlib.util
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common import UserError
from common import distributed
from common import download as downloads

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
    if download:
        _download_once(name, root)
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


def _download_once(name, root):
    """Fetch the dataset when its files are absent. Under torchrun rank 0 downloads and the others wait for it, then
    all raise rank 0's error, if any (every rank calls this, in the same order)."""
    error = None
    if distributed.rank() == 0 and not _present(name, root):
        try:
            downloads.download(name, root)
        except UserError as e:
            error = str(e)
    error = distributed.broadcast_object(error)
    if error:
        raise UserError(error)


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
    train_rel, train_y = parse_list(lists / 'train_100.txt', FINEGRAINED[name][1])
    test_rel, test_y = parse_list(lists / 'test.txt', FINEGRAINED[name][1])
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


def parse_list(path, num_classes=None, with_lines=False):
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
