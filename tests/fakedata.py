"""Writers of tiny datasets in the REAL on-disk formats, for tests.

Images are class-dependent (a per-class colour plus a per-class stripe, plus noise), so a few training steps can
learn something, and a reader that mixes up labels or orders is caught.
"""
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def class_colour(k):
    """The base RGB colour of class k (distinct for the first classes, then pseudo-random)."""
    palette = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 210, 40), (200, 40, 200), (40, 210, 210),
               (240, 140, 30), (130, 130, 130), (120, 60, 20), (250, 250, 250)]
    if k < len(palette):
        return np.array(palette[k], dtype=np.float32)
    return np.random.RandomState(1000 + k).randint(0, 256, 3).astype(np.float32)


def class_image(k, size, rng, noise=25.0):
    """A uint8 (size, size, 3) image of class k: its colour, a horizontal stripe at a class-dependent height, noise."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = class_colour(k)
    row = (k * 7) % max(1, size - 4)
    img[row:row + max(2, size // 8)] = 255.0 - class_colour(k)
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _labels(num_classes, per_class, rng):
    y = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(y)
    return y


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 str (BINSTRING), as the Python 2 cPickle that wrote the official CIFAR
    archives did; used with protocol 2."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        b = obj.encode('latin1') if isinstance(obj, str) else obj
        op = pickle.SHORT_BINSTRING + bytes([len(b)]) if len(b) < 256 else pickle.BINSTRING + struct.pack('<i', len(b))
        self.write(op + b)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_py2_str


def write_cifar(root, name='cifar10', per_class_train=6, per_class_test=2, seed=0, protocol=2, py2=False) -> Path:
    """torchvision layout: root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} or
    root/cifar-100-python/{train,test,meta}; pickled dicts as in the official archives. `py2` writes the pickles
    as the official archives are: Python 2 strings and NumPy 1's numpy.core module path. Returns root."""
    root = Path(root)
    rng = np.random.RandomState(seed)
    C = 10 if name == 'cifar10' else 100

    def images(y):
        x = np.stack([class_image(int(k), 32, rng) for k in y]) if len(y) else np.zeros((0, 32, 32, 3), np.uint8)
        return x.transpose(0, 3, 1, 2).reshape(len(y), 3072)  # the archives store planar RGB rows

    def dump(path, obj):
        if not py2:
            with open(path, 'wb') as f:
                pickle.dump(obj, f, protocol=protocol)
            return
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        # NumPy 2 names the module numpy._core; a protocol-2 GLOBAL is plain text, so renaming keeps the pickle valid
        path.write_bytes(buf.getvalue().replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n'))

    ytr, yte = _labels(C, per_class_train, rng), _labels(C, per_class_test, rng)
    if name == 'cifar10':
        d = root / 'cifar-10-batches-py'
        d.mkdir(parents=True, exist_ok=True)
        for b, part in enumerate(np.array_split(np.arange(len(ytr)), 5), 1):
            dump(d / f'data_batch_{b}', {'batch_label': f'training batch {b} of 5', 'labels': ytr[part].tolist(),
                                         'data': images(ytr[part]),
                                         'filenames': [f'img_{i}.png' for i in part]})
        dump(d / 'test_batch', {'batch_label': 'testing batch 1 of 1', 'labels': yte.tolist(), 'data': images(yte),
                                'filenames': [f'test_{i}.png' for i in range(len(yte))]})
        dump(d / 'batches.meta', {'label_names': CIFAR10_CLASSES, 'num_cases_per_batch': 10000, 'num_vis': 3072})
    elif name == 'cifar100':
        d = root / 'cifar-100-python'
        d.mkdir(parents=True, exist_ok=True)
        for split, y in (('train', ytr), ('test', yte)):
            dump(d / split, {'filenames': [f'{split}_{i}.png' for i in range(len(y))], 'batch_label': split,
                             'fine_labels': y.tolist(), 'coarse_labels': (y // 5).tolist(), 'data': images(y)})
        dump(d / 'meta', {'fine_label_names': [f'fine_{k:02d}' for k in range(100)],
                          'coarse_label_names': [f'coarse_{k:02d}' for k in range(20)]})
    else:
        raise ValueError(name)
    return root


def write_svhn(root, per_class_train=6, per_class_test=2, seed=0) -> Path:
    """root/train_32x32.mat and test_32x32.mat: X uint8 (32, 32, 3, N), y uint8 (N, 1) with 10 for digit 0."""
    import scipy.io
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for split, per in (('train', per_class_train), ('test', per_class_test)):
        y = _labels(10, per, rng)
        x = np.stack([class_image(int(k), 32, rng) for k in y]).transpose(1, 2, 3, 0)
        scipy.io.savemat(str(root / f'{split}_32x32.mat'),
                         {'X': np.ascontiguousarray(x), 'y': np.where(y == 0, 10, y).astype(np.uint8)[:, None]})
    return root


def finegrained_class_names(num_classes):
    """Class folder names; class 1 contains a space (as Aircraft's 'Cessna 172')."""
    return [('Cessna 172' if k == 1 else f'{k + 1:03d}.Class_{k}') for k in range(num_classes)]


def _save_jpeg(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format='JPEG', quality=90)


def write_finegrained(root, name='StanfordCars', num_classes=4, per_class_train=10, per_class_test=2, size=40,
                      seed=0, ratios=(15, 30, 50)) -> Path:
    """Self-Tuning layout under root/<name>: train/<class>/*.jpg, test/<class>/*.jpg, image_list/train_100.txt,
    train_<r>.txt for r in `ratios` (per class max(1, round(r% of the class)), a fixed random choice, in train_100
    order) and test.txt; lines "train/<class>/<file> <label>". Returns root/<name>."""
    base = Path(root) / name
    rng = np.random.RandomState(seed)
    classes = finegrained_class_names(num_classes)
    lines = {'train': [], 'test': []}
    for split, per in (('train', per_class_train), ('test', per_class_test)):
        for k, c in enumerate(classes):
            for j in range(per):
                fname = f'img {j:03d}.jpg' if k == 1 else f'{c}_{j:04d}.jpg'  # spaces in the file name too
                rel = f'{split}/{c}/{fname}'
                _save_jpeg(base / rel, class_image(k, size, rng))
                lines[split].append((rel, k))
    lists = base / 'image_list'
    lists.mkdir(parents=True, exist_ok=True)

    def write(fname, entries):
        (lists / fname).write_text(''.join(f'{r} {k}\n' for r, k in entries))

    write('train_100.txt', lines['train'])
    write('test.txt', lines['test'])
    for r in ratios:
        keep = []
        for k in range(num_classes):
            pos = [i for i, (_, y) in enumerate(lines['train']) if y == k]
            n = max(1, int(round(per_class_train * r / 100)))
            keep.extend(np.random.RandomState(seed + r).choice(pos, min(n, len(pos)), replace=False).tolist())
        write(f'train_{r}.txt', [lines['train'][i] for i in sorted(keep)])
    return base


def wnids(num_classes):
    return [f'n{1440764 + 1000 * k:08d}' for k in range(num_classes)]


def write_imagefolder(root, num_classes=3, per_class_train=8, per_class_val=2, size=40, indexes=True,
                      seed=0, wrong_pseudo=2) -> Path:
    """ImageNet layout: root/train/<wnid>/<wnid>_<j>.JPEG, root/val/<wnid>/ILSVRC2012_val_<j>.JPEG and, with
    `indexes`, root/indexes/{train_1p_index.csv, train_99p_index.csv} (complementary; Index, ImageID; one labeled
    image per class, more for bigger classes) and the DebiasPL CLIP files CLIPPseudoLabel0.95.csv (Index,
    PseudoLabel) and CLIPPseudoLabel0.95-Unselected.csv (Index, PseudoLabel, Probs), each with `wrong_pseudo`
    pseudo-labels that differ from the folder truth. Index = position in ImageFolder order. Returns root."""
    root = Path(root)
    rng = np.random.RandomState(seed)
    classes = wnids(num_classes)
    train = []  # (id, label) in ImageFolder order: sorted classes, sorted files
    n_val = 0
    for k, w in enumerate(classes):
        for j in range(per_class_train):
            rel = f'{w}/{w}_{j:05d}.JPEG'
            _save_jpeg(root / 'train' / rel, class_image(k, size, rng))
            train.append((rel, k))
        for j in range(per_class_val):
            n_val += 1
            _save_jpeg(root / 'val' / w / f'ILSVRC2012_val_{n_val:08d}.JPEG', class_image(k, size, rng))
    if indexes:
        d = root / 'indexes'
        d.mkdir(parents=True, exist_ok=True)
        labeled = []
        for k in range(num_classes):
            pos = [i for i, (_, y) in enumerate(train) if y == k]
            n = max(1, len(pos) // 100)
            labeled.extend(rng.choice(pos, n, replace=False).tolist())
        labeled = sorted(labeled)
        rest = [i for i in range(len(train)) if i not in set(labeled)]

        def index_csv(fname, idx):
            (d / fname).write_text('Index,ImageID\n' + ''.join(f'{i},{train[i][0]}\n' for i in idx))

        index_csv('train_1p_index.csv', labeled)
        index_csv('train_99p_index.csv', rest)
        # CLIP zero-shot files: a "confident" half and the rest, with a few wrong pseudo-labels in each.
        order = rng.permutation(len(train))
        x, u = sorted(order[:len(train) // 2].tolist()), sorted(order[len(train) // 2:].tolist())
        for fname, idx, probs in (('CLIPPseudoLabel0.95.csv', x, False), ('CLIPPseudoLabel0.95-Unselected.csv', u, True)):
            rows = ['Index,PseudoLabel' + (',Probs' if probs else '')]
            for n, i in enumerate(idx):
                y = train[i][1]
                pl = (y + 1) % num_classes if n < wrong_pseudo else y
                rows.append(f'{i},{pl}' + (f',{rng.uniform(0.2, 0.95):.4f}' if probs else ''))
            (d / fname).write_text('\n'.join(rows) + '\n')
    return root


def write_corrupt_image(path) -> Path:
    """A file with an image name and a JPEG signature that no decoder can read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'\xff\xd8\xff\xe0' + b'this is not an image' * 10)
    return path


def write_bad_archive(path) -> Path:
    """A tar.gz with a harmless member followed by a '../' path-traversal member."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, 'w:gz') as t:
        for name, data in (('good/readme.txt', b'fine\n'), ('../escaped.txt', b'outside\n')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def write_archive(path, files, fmt=None) -> Path:
    """A tar (.tar, .tgz, .tar.gz) or .zip archive holding `files` {member name: bytes}."""
    import zipfile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith('.zip') or fmt == 'zip':
        with zipfile.ZipFile(path, 'w') as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        mode = 'w:gz' if str(path).endswith(('.tgz', '.gz')) else 'w'
        with tarfile.open(path, mode) as t:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return path
