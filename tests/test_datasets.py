"""Tests of common/datasets.py on tiny datasets written in the real on-disk formats by tests/fakedata.py."""
import os
import pickle
import random
import shutil
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fakedata as F  # noqa: E402
from common import UserError  # noqa: E402
from common import datasets as D  # noqa: E402
from common import download as DL  # noqa: E402
from common import plots as P  # noqa: E402
from common import loaders as L  # noqa: E402
from common import splits as S  # noqa: E402


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp('data')
    return {
        'cifar10': F.write_cifar(base / 'cifar10'),
        'cifar100': F.write_cifar(base / 'cifar100', name='cifar100', per_class_train=2, per_class_test=1),
        'svhn': F.write_svhn(base / 'svhn'),
        'cars': F.write_finegrained(base, 'StanfordCars'),
        'imagenet': F.write_imagefolder(base / 'imagenet'),
    }


def mean_colour(img):
    return np.asarray(img, dtype=np.float32).reshape(-1, 3).mean(0)


def close_to_class(img, k, tol=40):
    """The image is mostly its class colour (the stripe and noise move the mean a little)."""
    size = img.size[0]
    stripe = max(2, size // 8) / size
    want = F.class_colour(k) * (1 - stripe) + (255 - F.class_colour(k)) * stripe
    return np.abs(mean_colour(img) - want).max() < tol


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------
def test_cifar10(data):
    root = data['cifar10']
    assert D.infer_name(root) == 'cifar10'
    tr, te = D.load('cifar10', root, 'train'), D.load('cifar10', root, 'test')
    assert (len(tr), len(te), tr.num_classes) == (60, 20, 10)
    assert tr.classes[0] == 'airplane' and tr.targets.dtype == np.int64
    assert np.bincount(tr.targets).tolist() == [6] * 10
    assert tr.ids[:2] == ['train/0', 'train/1'] and te.ids[0] == 'test/0'
    x, y, i = tr[7]
    assert x.size == (32, 32) and x.mode == 'RGB' and y == tr.targets[7] and i == 7
    assert all(close_to_class(tr.image(j), tr.targets[j]) for j in range(len(tr)))  # pixel layout and labels agree
    assert (tr.source_index == np.arange(60)).all()
    # the folder itself is accepted as root too
    assert len(D.load('cifar10', root / 'cifar-10-batches-py', 'test')) == 20


def test_cifar_matches_torchvision(data, monkeypatch):
    ours = D.load('cifar10', data['cifar10'], 'train')
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda *a: True)  # md5s of the real files
    tv = torchvision.datasets.CIFAR10(str(data['cifar10']), train=True, download=False)
    assert (np.asarray(tv.targets) == ours.targets).all()
    assert np.array_equal(tv.data, ours.arrays)


def test_cifar100(data):
    root = data['cifar100']
    assert D.infer_name(root) == 'cifar100'
    tr, te = D.load(None, root, 'train'), D.load('cifar100', root, 'test')
    assert (len(tr), len(te), tr.num_classes) == (200, 100, 100)
    assert np.bincount(tr.targets, minlength=100).tolist() == [2] * 100
    assert all(close_to_class(tr.image(j), tr.targets[j]) for j in range(0, 200, 17))


def test_svhn(data):
    root = data['svhn']
    assert D.infer_name(root) == 'svhn'
    tr, te = D.load('svhn', root, 'train'), D.load('svhn', root, 'test')
    assert (len(tr), len(te)) == (60, 20) and tr.classes == [str(k) for k in range(10)]
    assert tr.targets.min() == 0 and tr.targets.max() == 9  # label 10 in the file became 0
    assert all(close_to_class(tr.image(j), tr.targets[j]) for j in range(len(tr)))


@pytest.mark.parametrize('folder,name,C', [('CUB200', 'cub200', 3), ('StanfordCars', 'stanfordcars', 4),
                                           ('Aircraft', 'aircraft', 2)])
def test_finegrained_readers(tmp_path, folder, name, C):
    root = F.write_finegrained(tmp_path, folder, num_classes=C, per_class_train=4, per_class_test=1, size=24)
    assert root.name == folder and D.infer_name(root) == name
    tr, te = D.load(name, root, 'train'), D.load(name, root, 'test')
    assert (len(tr), len(te), tr.num_classes, te.num_classes) == (4 * C, C, C, C)
    assert 'Cessna 172' in tr.classes and tr.classes == F.finegrained_class_names(C)
    k = tr.classes.index('Cessna 172')
    j = int(np.flatnonzero(tr.targets == k)[0])
    assert tr.ids[j] == 'train/Cessna 172/img 000.jpg' and os.path.isfile(tr.files[j])
    assert all(close_to_class(tr[j][0], tr[j][1]) for j in range(len(tr)))
    assert all(close_to_class(te[j][0], te[j][1]) for j in range(len(te)))


def test_imagefolder_order_matches_torchvision(data):
    root = data['imagenet']
    assert D.infer_name(root) == 'imagenet'
    tr, te = D.load('imagenet', root, 'train'), D.load('imagenet', root, 'test')
    tv = torchvision.datasets.ImageFolder(str(root / 'train'))
    assert tr.classes == tv.classes
    assert tr.files == [p for p, _ in tv.samples] and tr.targets.tolist() == tv.targets
    assert tr.ids[0] == f'{tr.classes[0]}/{tr.classes[0]}_00000.JPEG'
    assert (len(tr), len(te)) == (24, 6) and np.bincount(te.targets).tolist() == [2, 2, 2]
    assert all(close_to_class(te[j][0], te[j][1]) for j in range(len(te)))


def test_imagefolder_generic_and_test_folder(tmp_path):
    root = F.write_imagefolder(tmp_path / 'mydata', num_classes=2, per_class_train=2, per_class_val=1, size=16,
                               indexes=False)
    assert D.infer_name(root) == 'imagefolder'
    (root / 'val').rename(root / 'test')
    te = D.load('imagefolder', root, 'test')
    assert len(te) == 2 and te.targets.tolist() == [0, 1]


def test_digits():
    tr, te = D.load('digits', None, 'train'), D.load('digits', 'anything', 'test')
    assert (len(tr), len(te), tr.num_classes) == (1497, 300, 10)
    x, y, i = tr[5]
    assert x.size == (32, 32) and x.mode == 'RGB' and 0 <= y <= 9
    a = tr.arrays
    assert a.dtype == np.uint8 and a.shape == (1497, 32, 32, 3) and (a[..., 0] == a[..., 2]).all()
    assert np.bincount(te.targets).min() >= 25
    m, s = D.MEAN_STD['digits']
    assert abs(a.mean() / 255 - m[0]) < 1e-3 and abs(a.std() / 255 - s[0]) < 1e-3



def test_image_grid_rows_per_class_or_per_row(tmp_path):
    from PIL import Image
    tr = D.load('digits', None, 'train')
    picks = np.concatenate([np.flatnonzero(tr.targets == c)[:c % 3 + 1] for c in range(10)])  # 1 to 3 per class
    P.save_image_grid(tmp_path / 'by_class.png', tr, picks, per_row=2, labelled=True, thumb=10)
    P.save_image_grid(tmp_path / 'rows.png', tr, picks, per_row=4, labelled=False, thumb=10)
    by_class, rows = Image.open(tmp_path / 'by_class.png'), Image.open(tmp_path / 'rows.png')
    assert by_class.height == 10 * 12 and by_class.width > 2 * 12  # a row per class, at most 2 thumbnails, names
    assert rows.size == (4 * 12, 5 * 12)  # 19 picks in rows of 4, no names
    # the first thumbnail of the unlabelled grid is the first pick
    first = np.asarray(tr.image(int(picks[0])).convert('RGB').resize((10, 10)))
    assert (np.asarray(rows.convert('RGB'))[:10, :10] == first).all()

def test_image_list_with_spaces(tmp_path):
    lst = tmp_path / 'mine.txt'
    lst.write_text('train/Cessna 172/img 000.jpg 1\n\ntrain/001.Class_0/001.Class_0_0000.jpg 0\n')
    rel, labels, lines = D.parse_list(lst, with_lines=True)
    assert rel[0] == 'train/Cessna 172/img 000.jpg' and labels.tolist() == [1, 0] and lines == [1, 3]
    with pytest.raises(UserError, match=r'mine\.txt:1: label 1 is outside the class range 0\.\.0'):
        D.parse_list(lst, num_classes=1)
    lst.write_text('a.jpg 0\nb.jpg x\n')
    with pytest.raises(UserError, match=r'mine\.txt:2: label .x. is not an integer'):
        D.parse_list(lst)
    lst.write_text('a.jpg 0\nb c.jpg 7\n')
    with pytest.raises(UserError, match=r'mine\.txt:2: label 7 is outside the class range 0\.\.3'):
        D.parse_list(lst, num_classes=4)


def test_finegrained_label_out_of_range(tmp_path):
    root = F.write_finegrained(tmp_path, 'Aircraft', num_classes=2, per_class_train=2, per_class_test=1, size=16)
    with open(root / 'image_list' / 'test.txt', 'a') as f:
        f.write('test/001.Class_0/001.Class_0_0000.jpg 100\n')  # Aircraft has 100 classes: 0..99
    with pytest.raises(UserError, match=r'test\.txt:3: label 100 is outside the class range 0\.\.99'):
        D.load('aircraft', root, 'test')


def test_subset_shares_storage_and_overrides_targets(data):
    tr = D.load('cifar10', data['cifar10'], 'train')
    tf = T.ToTensor()
    sub = tr.subset([5, 2, 9], transform=tf)
    assert sub._store is tr._store and sub.transform is tf and tr.transform is None
    assert sub.source_index.tolist() == [5, 2, 9] and sub.targets.tolist() == tr.targets[[5, 2, 9]].tolist()
    assert torch.equal(sub[1][0], tf(tr.image(2))) and sub[1][2] == 1
    sub2 = sub.subset([2, 0], targets=[7, 8])
    assert sub2.source_index.tolist() == [9, 5] and sub2.targets.tolist() == [7, 8] and sub2.transform is tf
    assert sub2.ids == ['train/9', 'train/5']


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'svhn', 'cub200', 'imagenet'])
def test_missing_root_mentions_layout_and_download(tmp_path, name):
    with pytest.raises(UserError) as e:
        D.load(name, tmp_path / 'nothing', 'train')
    msg = str(e.value)
    assert '--download' in msg and str(tmp_path / 'nothing') in msg and '\n' not in msg


def test_corrupt_image_names_the_file(tmp_path):
    root = F.write_imagefolder(tmp_path / 'imagenet', num_classes=2, per_class_train=3, per_class_val=1, size=16,
                               indexes=False)
    bad = F.write_corrupt_image(root / 'train' / F.wnids(2)[1] / 'zz_broken.JPEG')
    tr = D.load('imagenet', root, 'train')
    j = tr.files.index(str(bad))
    with pytest.raises(UserError, match='zz_broken.JPEG'):
        tr[j]
    tr.transform = T.ToTensor()
    stream = L.BatchStream(tr, 7, seed=0, workers=1, drop_last=False, shuffle=False)
    with pytest.raises(UserError) as e:  # raised in a worker: still one line naming the file
        next(stream)
    assert 'zz_broken.JPEG' in str(e.value) and '\n' not in str(e.value)
    stream.close()


def test_bad_archive_writes_nothing(tmp_path):
    arc = F.write_bad_archive(tmp_path / 'bad.tar.gz')
    dest = tmp_path / 'out'
    with pytest.raises(UserError, match=r"\.\."):
        DL.safe_extract(arc, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / 'escaped.txt').exists()


def test_safe_extract_refuses_absolute_and_escaping_links(tmp_path):
    dest = tmp_path / 'out'
    arc = F.write_archive(tmp_path / 'abs.tar', {'ok.txt': b'1', '/etc/evil': b'2'})
    with pytest.raises(UserError, match='absolute'):
        DL.safe_extract(arc, dest)
    arc = tmp_path / 'link.tar'
    with tarfile.open(arc, 'w') as t:
        info = tarfile.TarInfo('data/link')
        info.type, info.linkname = tarfile.SYMTYPE, '../../outside'
        t.addfile(info)
    with pytest.raises(UserError, match='outside'):
        DL.safe_extract(arc, dest)
    arc = F.write_archive(tmp_path / 'bad.zip', {'a/ok.txt': b'1', 'a/../../evil.txt': b'2'})
    with pytest.raises(UserError):
        DL.safe_extract(arc, dest)
    assert list(dest.iterdir()) == []
    (tmp_path / 'junk.tgz').write_bytes(b'not an archive')
    with pytest.raises(UserError, match='neither'):
        DL.safe_extract(tmp_path / 'junk.tgz', dest)


def test_safe_extract_good_archives_merge(tmp_path):
    dest = tmp_path / 'out'
    DL.safe_extract(F.write_archive(tmp_path / 'a.tgz', {'train/c/x.txt': b'x', 'top.txt': b't'}), dest)
    DL.safe_extract(F.write_archive(tmp_path / 'b.zip', {'train/d/y.txt': b'y', 'image_list/l.txt': b'l'}), dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob('*') if p.is_file()) == \
        ['image_list/l.txt', 'top.txt', 'train/c/x.txt', 'train/d/y.txt']
    assert not [p for p in dest.iterdir() if p.name.startswith('.extract')]


def tree(root):
    """{relative path: ('dir',) | ('link', target) | ('file', bytes)} of everything under root, links not followed."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            out[rel] = ('link', os.readlink(p)) if os.path.islink(p) else ('dir',) if os.path.isdir(p) else \
                ('file', Path(p).read_bytes())
    return out


def link_tar(path, files, links):
    """A tar with regular files {name: bytes} and symbolic links {name: target}."""
    path = F.write_archive(path, files)
    with tarfile.open(path, 'a') as t:
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            t.addfile(info)
    return path


@pytest.mark.parametrize('member,kind', [
    ('train', 'file'),        # would rmtree the user's train/ folder
    ('train', 'zip file'),
    ('train', 'symlink'),     # same, with a link
    ('notes.txt', 'folder'),  # a folder where the user has a file
    ('link', 'file'),         # a file over the user's symlink
    ('link', 'folder'),       # a folder merged through the user's symlink
])
def test_safe_extract_never_replaces_user_entries_of_another_type(tmp_path, member, kind):
    dest = tmp_path / 'out'
    (dest / 'train' / 'c').mkdir(parents=True)
    (dest / 'train' / 'c' / 'mine.jpg').write_bytes(b'user image')
    (dest / 'notes.txt').write_text('user notes')
    (dest / 'link').symlink_to('train')
    before = tree(dest)
    files = {'new.txt': b'new'}  # written only if the whole archive can be merged
    if kind == 'symlink':
        arc = link_tar(tmp_path / 'a.tar', files, {member: 'new.txt'})
    elif kind == 'folder':
        arc = F.write_archive(tmp_path / 'a.tar', {**files, f'{member}/x.txt': b'x'})
    else:
        arc = F.write_archive(tmp_path / ('a.zip' if kind == 'zip file' else 'a.tgz'), {**files, member: b'x'})
    with pytest.raises(UserError) as e:
        DL.safe_extract(arc, dest)
    msg = str(e.value)
    assert msg.startswith(f'refusing to extract {arc}') and f"member '{member}'" in msg and str(dest / member) in msg
    assert '\n' not in msg
    assert tree(dest) == before


def test_safe_extract_again_replaces_its_own_files(tmp_path):
    dest = tmp_path / 'out'
    arc = link_tar(tmp_path / 'a.tar', {'train/c/x.txt': b'x', 'top.txt': b't'}, {'train/latest': 'c/x.txt'})
    DL.safe_extract(arc, dest)
    (dest / 'train' / 'c' / 'x.txt').write_bytes(b'changed')
    (dest / 'train' / 'c' / 'y.txt').write_bytes(b'user file')
    DL.safe_extract(arc, dest)  # an interrupted download is extracted again over the same files
    assert tree(dest) == {'top.txt': ('file', b't'), 'train': ('dir',), 'train/c': ('dir',),
                          'train/c/x.txt': ('file', b'x'), 'train/c/y.txt': ('file', b'user file'),
                          'train/latest': ('link', 'c/x.txt')}


def test_safe_extract_hard_links_only_to_archive_members(tmp_path):
    dest = tmp_path / 'out'
    (dest / 'train').mkdir(parents=True)
    (dest / 'train' / 'mine.jpg').write_bytes(b'user image')
    before = tree(dest)
    arc = F.write_archive(tmp_path / 'h.tar', {'a.txt': b'a'})
    with tarfile.open(arc, 'a') as t:
        for name, target in (('b.txt', './a.txt'), ('x.jpg', 'train/mine.jpg')):  # the first is fine
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.LNKTYPE, target
            t.addfile(info)
    with pytest.raises(UserError, match=r"hard link 'x\.jpg' -> 'train/mine\.jpg'") as e:
        DL.safe_extract(arc, dest)
    assert '\n' not in str(e.value) and tree(dest) == before


class _Payload:
    """Pickles as a call of `func(arg)`: what a crafted batch would run on a plain pickle.load."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize('func,protocol', [(os.system, 2), (eval, 2), (eval, 4)])
def test_cifar_pickle_cannot_run_code(tmp_path, func, protocol):
    root = F.write_cifar(tmp_path / 'cifar10')
    marker = tmp_path / 'ran'
    arg = f'touch {marker}' if func is os.system else f'open({str(marker)!r}, "w")'
    batch = root / 'cifar-10-batches-py' / 'data_batch_1'
    with open(batch, 'wb') as f:
        pickle.dump({'data': _Payload(func, arg), 'labels': []}, f, protocol=protocol)
    with pytest.raises(UserError) as e:
        D.load('cifar10', root, 'train')
    msg = str(e.value)
    assert not marker.exists()
    assert str(batch) in msg and 'refus' in msg and func.__name__ in msg and '\n' not in msg


@pytest.mark.parametrize('kw', [dict(py2=True), dict(protocol=4), dict(protocol=5)])
def test_cifar_pickles_of_any_writer_load(tmp_path, data, kw):
    """The official batches (Python 2 strings, NumPy 1's numpy.core) and pickles NumPy 2 writes today."""
    for name in ('cifar10', 'cifar100'):
        root = F.write_cifar(tmp_path / name, name=name, **({} if name == 'cifar10' else
                                                             dict(per_class_train=2, per_class_test=1)), **kw)
        for split in ('train', 'test'):
            got, want = D.load(name, root, split), D.load(name, data[name], split)
            assert np.array_equal(got.arrays, want.arrays) and got.targets.tolist() == want.targets.tolist()
            assert got.classes == want.classes


def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize('name,fname,change,pattern', [
    ('cifar10', 'data_batch_2', _drop('data'), "no 'data'"),
    ('cifar10', 'data_batch_2', _drop('labels'), "no 'labels'"),
    ('cifar100', 'train', _drop('fine_labels'), "no 'fine_labels'"),
    ('cifar10', 'data_batch_2', lambda d: {**d, 'data': d['data'][:, :3071]}, r'12 x 3071'),
    ('cifar10', 'data_batch_2', lambda d: {**d, 'data': d['data'].astype(np.float32)}, 'float32'),
    ('cifar10', 'data_batch_2', lambda d: {**d, 'data': 'pixels'}, 'str'),
    ('cifar10', 'data_batch_2', lambda d: {**d, 'labels': d['labels'][:-1]}, '11 labels for 12 images'),
    ('cifar10', 'data_batch_2', lambda d: {**d, 'labels': ['cat'] * 12}, 'labels'),
    ('cifar10', 'test_batch', lambda d: list(d.items()), 'list'),
    ('cifar10', 'batches.meta', _drop('label_names'), "no 'label_names'"),
])
def test_malformed_cifar_batch_is_one_line(tmp_path, name, fname, change, pattern):
    root = F.write_cifar(tmp_path / name, name=name, per_class_train=6 if name == 'cifar10' else 2, per_class_test=1)
    path = root / ('cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python') / fname
    with open(path, 'rb') as f:
        d = pickle.load(f)  # the test's own file
    with open(path, 'wb') as f:
        pickle.dump(change(d), f, protocol=2)
    with pytest.raises(UserError, match=pattern) as e:
        D.load(name, root, 'test' if fname == 'test_batch' else 'train')
    assert str(path) in str(e.value) and '\n' not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Download (no network: the fetch is replaced)
# ---------------------------------------------------------------------------------------------------------------
def test_download_failure_names_url_and_destination(tmp_path, monkeypatch):
    def fail(url, out, timeout=60):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(DL, '_fetch', fail)
    with pytest.raises(UserError) as e:
        D.load('cifar10', tmp_path / 'c10', 'train', download=True)
    msg = str(e.value)
    assert 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz' in msg
    assert str(tmp_path / 'c10' / 'cifar-10-python.tar.gz') in msg and '\n' not in msg
    assert not list((tmp_path / 'c10').iterdir())  # no partial file left


def test_download_checksum_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(DL, '_fetch', lambda url, out, timeout=60: Path(out).write_bytes(b'tampered'))
    with pytest.raises(UserError, match='sha256'):
        DL.download('cifar100', tmp_path)


def test_download_finegrained_uses_mirror_and_extracts(tmp_path, monkeypatch):
    src = F.write_finegrained(tmp_path / 'src', 'CUB200', num_classes=2, per_class_train=4, per_class_test=1, size=16)
    archives = {}
    for fname, top in (('image_list.zip', 'image_list'), ('train.tgz', 'train'), ('test.tgz', 'test')):
        files = {str(p.relative_to(src)): p.read_bytes() for p in (src / top).rglob('*') if p.is_file()}
        archives[fname] = F.write_archive(tmp_path / 'arch' / fname, files)
    urls = {r.filename: r.urls for r in DL.REMOTE['cub200']}
    assert urls['image_list.zip'][0] == 'https://cloud.tsinghua.edu.cn/f/c2a5952eb18b466b9fb0/?dl=1'
    assert urls['image_list.zip'][1] == 'https://cloud.tsinghua.edu.cn/f/fa398a321b094a24a347/?dl=1'
    tried = []

    def fetch(url, out, timeout=60):
        tried.append(url)
        for fname, u in urls.items():
            if url == u[0]:
                raise urllib.error.URLError('gone')  # the newer link is down: the mirror must be used
            if url == u[1]:
                shutil.copy(archives[fname], out)
    monkeypatch.setattr(DL, '_fetch', fetch)
    root = tmp_path / 'CUB200'
    tr = D.load('cub200', root, 'train', download=True)
    assert len(tr) == 8 and len(tried) == 6 and tr.classes == F.finegrained_class_names(2)
    lab, unl = S.finegrained_split(root, 'cub200', 50)
    assert len(lab) == 4 and len(unl) == 4
    # archives put in ROOT by hand (no published checksum) are used without any network access
    by_hand = tmp_path / 'by_hand' / 'CUB200'
    by_hand.mkdir(parents=True)
    for fname, path in archives.items():
        shutil.copy(path, by_hand / fname)
    tried.clear()
    assert len(D.load('cub200', by_hand, 'test', download=True)) == 2 and tried == []


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------
def test_class_balanced_split():
    targets = np.repeat(np.arange(4), 10)
    np.random.RandomState(3).shuffle(targets)
    lab, unl = S.class_balanced_split(targets, 8, 4, seed=1)
    assert np.bincount(targets[lab], minlength=4).tolist() == [2, 2, 2, 2]
    assert unl.tolist() == list(range(40)) and lab.dtype == np.int64
    # depends only on the seed, not on the process's RNG state (ranks seed their RNGs differently)
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    rank0 = S.class_balanced_split(targets, 8, 4, seed=1)[0]
    np.random.seed(1), random.seed(1), torch.manual_seed(1)
    rank1 = S.class_balanced_split(targets, 8, 4, seed=1)[0]
    assert rank0.tolist() == rank1.tolist() == lab.tolist()
    assert S.class_balanced_split(targets, 8, 4, seed=2)[0].tolist() != lab.tolist()
    np.random.seed(1)  # FixMatch's x_u_split: np.random.choice per class after seeding the global RNG
    fixmatch = np.concatenate([np.random.choice(np.flatnonzero(targets == c), 2, False) for c in range(4)])
    assert sorted(fixmatch.tolist()) == lab.tolist()
    lab2, unl2 = S.class_balanced_split(targets, 8, 4, seed=1, exclude_labeled=True)
    assert lab2.tolist() == lab.tolist() and sorted(set(unl2) | set(lab2)) == list(range(40))
    assert not set(unl2) & set(lab2)
    assert len(S.class_balanced_split(targets, 10, 4, seed=1)[0]) == 8  # 10 // 4 = 2 per class
    with pytest.raises(UserError, match='multiple of 4'):
        S.class_balanced_split(targets, 10, 4, seed=1, exact=True)
    with pytest.raises(UserError, match='only 40 images'):
        S.class_balanced_split(targets, 44, 4, seed=1)
    with pytest.raises(UserError, match='class 3 has 1 training images'):
        S.class_balanced_split(np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3]), 8, 4, seed=1)
    with pytest.raises(UserError):
        S.class_balanced_split(targets, 3, 4, seed=1)


def test_finegrained_split(data):
    root = data['cars']
    full = D.load('stanfordcars', root, 'train')
    lines100 = (root / 'image_list' / 'train_100.txt').read_text().splitlines()
    for r in (15, 30, 50):
        lines_r = set((root / 'image_list' / f'train_{r}.txt').read_text().splitlines())
        lab, unl = S.finegrained_split(root, 'StanfordCars', r)
        want_unl = [k for k, line in enumerate(lines100) if line not in lines_r]
        assert unl.source_index.tolist() == want_unl  # train_100 minus train_r, in train_100's order
        assert sorted(lab.source_index.tolist()) == [k for k, line in enumerate(lines100) if line in lines_r]
        assert set(np.unique(lab.targets)) == {0, 1, 2, 3}
        assert [full.ids[k] for k in unl.source_index] == unl.ids
    lab, unl = S.finegrained_split(root, 'stanfordcars', 100)
    assert len(lab) == 40 and len(unl) == 0
    with pytest.raises(UserError, match=r'15, 30, 50, 100'):
        S.finegrained_split(root, 'stanfordcars', 17)


def test_index_files(tmp_path, data):
    tr = D.load('imagenet', data['imagenet'], 'train')
    d = data['imagenet'] / 'indexes'
    x = S.read_index_file(d / 'train_1p_index.csv', len(tr))
    u = S.read_index_file(d / 'train_99p_index.csv', len(tr))
    assert sorted(set(x) | set(u)) == list(range(len(tr))) and not set(x) & set(u)
    assert set(tr.targets[x]) == {0, 1, 2} and x.dtype == np.int64
    np.save(tmp_path / 'sel.npy', np.array([4, 1, 7]))
    assert S.read_index_file(tmp_path / 'sel.npy', 10).tolist() == [4, 1, 7]
    S.write_index_csv(tmp_path / 'out' / 'sel.csv', [3, 0], tr.ids)
    text = (tmp_path / 'out' / 'sel.csv').read_text().splitlines()
    assert text == ['Index,ImageID', f'3,{tr.ids[3]}', f'0,{tr.ids[0]}']
    assert S.read_index_file(tmp_path / 'out' / 'sel.csv', len(tr)).tolist() == [3, 0]


@pytest.mark.parametrize('content,pattern', [
    ('Index,ImageID\n0,a\n5,b\n', r'bad\.csv:3: Index 5 is out of range 0\.\.4'),
    ('Idx,ImageID\n0,a\n', r"bad\.csv:1: no 'Index' column"),
    ('Index\n1\n2\n1\n', r'bad\.csv:4: duplicate Index 1 \(first at line 2\)'),
    ('Index\n1\nx\n', r"bad\.csv:3: Index 'x' is not an integer"),
    ('Index\n-1\n', r'bad\.csv:2: Index -1 is out of range'),
])
def test_index_csv_errors(tmp_path, content, pattern):
    (tmp_path / 'bad.csv').write_text(content)
    with pytest.raises(UserError, match=pattern):
        S.read_index_file(tmp_path / 'bad.csv', 5)


def test_index_npy_errors(tmp_path):
    np.save(tmp_path / 'a.npy', np.array([0, 9]))
    with pytest.raises(UserError, match=r'a\.npy: entry 1: index 9 is out of range'):
        S.read_index_file(tmp_path / 'a.npy', 5)
    np.save(tmp_path / 'b.npy', np.array([3, 1, 3]))
    with pytest.raises(UserError, match=r'b\.npy: entry 2: duplicate index 3 \(first at entry 0\)'):
        S.read_index_file(tmp_path / 'b.npy', 5)
    np.save(tmp_path / 'c.npy', np.array([0.5, 1.0]))
    with pytest.raises(UserError, match='c.npy'):
        S.read_index_file(tmp_path / 'c.npy', 5)


def test_pseudo_label_csv(tmp_path, data):
    tr = D.load('imagenet', data['imagenet'], 'train')
    d = data['imagenet'] / 'indexes'
    xi, xl, xp = S.read_pseudo_label_csv(d / 'CLIPPseudoLabel0.95.csv', len(tr))
    ui, ul, up = S.read_pseudo_label_csv(d / 'CLIPPseudoLabel0.95-Unselected.csv', len(tr), num_classes=3)
    assert xp is None and up.dtype == np.float32 and len(up) == len(ui) and ((up > 0) & (up < 1)).all()
    assert sorted(set(xi) | set(ui)) == list(range(len(tr)))
    assert (xl != tr.targets[xi]).sum() == 2 and (ul != tr.targets[ui]).sum() == 2  # deliberate mistakes
    (tmp_path / 'p.csv').write_text('Index,PseudoLabel\n0,1\n1,3\n')
    with pytest.raises(UserError, match=r'p\.csv:3: PseudoLabel 3 is out of range 0\.\.2'):
        S.read_pseudo_label_csv(tmp_path / 'p.csv', 5, num_classes=3)
    (tmp_path / 'p.csv').write_text('Index,Label\n0,1\n')
    with pytest.raises(UserError, match=r"p\.csv:1: no 'PseudoLabel' column"):
        S.read_pseudo_label_csv(tmp_path / 'p.csv', 5)


# ---------------------------------------------------------------------------------------------------------------
# BatchStream and eval_loader
# ---------------------------------------------------------------------------------------------------------------
def tensor_set(n=20, C=4):
    """An in-memory ImageSet whose image k is filled with k, so batches can be checked by value."""
    imgs = np.stack([np.full((4, 4, 3), k, dtype=np.uint8) for k in range(n)])
    return D.ImageSet.from_arrays(imgs, np.arange(n) % C, classes=[str(c) for c in range(C)],
                                  transform=T.PILToTensor(), name='toy')


def test_stream_splits_global_batch_over_ranks():
    ds = tensor_set(20)
    s0 = L.BatchStream(ds, 8, seed=3, rank=0, world_size=2)
    s1 = L.BatchStream(ds, 8, seed=3, rank=1, world_size=2)
    assert s0.batches_per_pass == 2
    seen = []
    for _ in range(2):
        (x0, y0, i0), (x1, y1, i1) = next(s0), next(s1)
        assert len(i0) == len(i1) == 4 and not set(i0.tolist()) & set(i1.tolist())
        assert (x0[:, 0, 0, 0] == i0).all() and (y0 == i0 % 4).all() and (x1[:, 0, 0, 0] == i1).all() and (y1 == i1 % 4).all()
        seen += i0.tolist() + i1.tolist()
    perm = np.random.RandomState(3).permutation(20)
    assert sorted(seen) == sorted(perm[:16].tolist())  # 20 // 2 = 10 per rank: 2 batches of 4, tail of 2 dropped
    assert s0.state_dict()['pass'] == 0 and next(s0)[2].tolist() == \
        [int(v) for v in np.random.RandomState(4).permutation(20)[0::2][:4]]  # pass 1 uses seed + 1


def test_stream_resume_same_batches():
    ds = tensor_set(10)
    ds.transform = T.Compose([T.PILToTensor(), T.Lambda(lambda x: x + torch.randint(0, 100, (1,)).to(x.dtype))])
    a = L.BatchStream(ds, 4, seed=5)
    torch.manual_seed(0)
    ref = [next(a) for _ in range(7)]  # crosses passes (2 batches per pass)
    b = L.BatchStream(ds, 4, seed=5)
    torch.manual_seed(0)
    first = [next(b) for _ in range(3)]
    state, rng = b.state_dict(), torch.get_rng_state()
    c = L.BatchStream(ds, 4, seed=5)
    c.load_state_dict(state)
    torch.set_rng_state(rng)
    got = first + [next(c) for _ in range(4)]
    for (x, y, i), (x2, y2, i2) in zip(ref, got):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)


def test_stream_resume_with_workers_is_exact():
    ds = tensor_set(12)
    ds.transform = T.Compose([T.PILToTensor(), T.Lambda(lambda x: x + torch.randint(0, 100, (1,)).to(x.dtype))])
    a = L.BatchStream(ds, 4, seed=1, workers=2)
    ref = [next(a) for _ in range(5)]
    a.close()
    b = L.BatchStream(ds, 4, seed=1, workers=1)
    first = [next(b) for _ in range(2)]
    state = b.state_dict()
    b.close()
    c = L.BatchStream(ds, 4, seed=1, workers=2)
    c.load_state_dict(state)
    got = first + [next(c) for _ in range(3)]
    c.close()
    for (x, _, i), (x2, _, i2) in zip(ref, got):
        assert torch.equal(i, i2) and torch.equal(x, x2)
    assert not torch.equal(ref[0][0] - ref[0][2].view(-1, 1, 1, 1).to(torch.uint8), torch.zeros_like(ref[0][0]))


def test_stream_small_set_and_no_drop_last():
    ds = tensor_set(3)
    s = L.BatchStream(ds, 4, seed=0)  # fewer items than a batch: batches continue into the next pass
    i1, i2 = next(s)[2], next(s)[2]
    perms = np.concatenate([np.random.RandomState(p).permutation(3) for p in range(3)])
    assert i1.tolist() + i2.tolist() == perms[:8].tolist()
    s = L.BatchStream(tensor_set(10), 4, seed=0, drop_last=False, shuffle=False)
    assert [len(next(s)[2]) for _ in range(4)] == [4, 4, 2, 4] and s.batches_per_pass == 3
    with pytest.raises(UserError, match='empty'):
        L.BatchStream(ds.subset([]), 4, seed=0)


def test_multiview_transforms_are_independent():
    ds = tensor_set(8)
    view = T.Compose([T.PILToTensor(), T.Lambda(lambda x: x + torch.randint(0, 1000, (1,)).to(torch.int64))])
    ds.transform = [view, view, T.PILToTensor()]
    (v1, v2, v3), y, i = next(L.BatchStream(ds, 8, seed=0))
    assert v1.shape == v2.shape == (8, 3, 4, 4) and not torch.equal(v1, v2)
    assert (v3[:, 0, 0, 0] == i).all()


def test_eval_loader_in_order_over_ranks():
    ds = tensor_set(10)
    assert torch.cat([b[2] for b in L.eval_loader(ds, 4)]).tolist() == list(range(10))
    parts = [torch.cat([b[2] for b in L.eval_loader(ds, 3, rank=r, world_size=3)]).tolist() for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10)) and parts[0] == [0, 3, 6, 9]
    padded = [torch.cat([b[2] for b in L.eval_loader(ds, 3, rank=r, world_size=3, pad=True)]) for r in range(3)]
    assert {len(p) for p in padded} == {4}


_DOWNLOAD_UNDER_TORCHRUN = '''
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import common
from common import UserError, datasets, distributed, download
import fakedata

root, log, fail = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "fail"
d = distributed.init("cpu")

def fetch(name, where):
    with open(log, "a") as f:
        f.write(f"rank {{d.rank}}\\n")
    if fail:
        raise UserError("could not download cifar-10-python.tar.gz")
    fakedata.write_cifar(where)

download.download = fetch
try:
    train = datasets.load("cifar10", root, "train", download=True)
    test = datasets.load("cifar10", root, "test", download=True)  # present by now: nobody downloads
    said = f"read {{len(train)}} + {{len(test)}}"
except UserError as e:
    said = f"error: {{e}}"
# a file per rank: the two processes' prints share one pipe and may run into one line
Path(f"{{log}}.rank{{d.rank}}").write_text(said)
distributed.shutdown()
'''


def test_download_under_torchrun_rank0_fetches_and_the_others_wait(tmp_path):
    """Two gloo processes ask for the same absent dataset: rank 0 alone downloads, both then read it; an error on
    rank 0 reaches every rank instead of leaving the others waiting or reading a half-written folder."""
    from conftest import REPO, script_env
    script = tmp_path / 'load.py'
    script.write_text(_DOWNLOAD_UNDER_TORCHRUN.format(tests=str(REPO / 'tests')))
    for mode in ('ok', 'fail'):
        root, log = tmp_path / f'c10-{mode}', tmp_path / f'{mode}.log'
        proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                               str(script), str(root), str(log), mode], env=script_env(tmp_path),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert log.read_text() == 'rank 0\n'
        said = [Path(f'{log}.rank{r}').read_text() for r in (0, 1)]
        if mode == 'ok':
            assert said == ['read 60 + 20'] * 2
        else:
            assert said == ['error: could not download cifar-10-python.tar.gz'] * 2
