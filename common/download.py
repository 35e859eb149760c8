"""Fetching the official archives (checksums verified) and extracting them without path traversal."""
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common import UserError


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
        raise UserError(f'--download is not available for {name}: put the images in {root}/train/<class>/<images> '
                        f'and {root}/val/<class>/<images>')
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
