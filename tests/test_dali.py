"""common.dali: DALI CPU pipelines from a file list and from RecordIO, and the pure-Python RecordIO writer/reader."""
import io
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common import UserError
from common import dali
from conftest import REPO, assert_user_error, script_env

needs_dali = pytest.mark.skipif(not dali.available(), reason="nvidia.dali is not importable")
CLASSES = ("ant", "bee", "cat")
SIZE = 32
MEAN = torch.tensor(dali.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(dali.IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 4 JPEGs of 48 px (some 48x40), each a distinct smooth random pattern; ImageFolder order."""
    root = tmp_path_factory.mktemp("imgs") / "train"
    rng = np.random.RandomState(0)
    files, labels = [], []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for k in range(4):
            small = Image.fromarray(rng.randint(0, 256, (6, 6, 3), dtype=np.uint8))
            img = small.resize((48, 48 if k % 2 else 40), Image.BICUBIC)
            path = root / name / f"{k:02d}.jpg"
            img.save(path, quality=95)
            files.append(str(path))
            labels.append(c)
    return root, files, np.array(labels)


def val_reference(path):
    """The 'val' view computed with PIL: shorter side to round(32*256/224) = 37, centre 32x32 crop, normalised."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = 37 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = img.size
    left, top = (w - SIZE) // 2, (h - SIZE) // 2
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32) / 255)
    return (x.permute(2, 0, 1) - MEAN) / STD


def collect(stream):
    xs, ys, idx, sizes = [], [], [], []
    for x, y, i in stream:
        xs.append(x), ys.append(y), idx.append(i), sizes.append(len(y))
    return torch.cat(xs), torch.cat(ys), torch.cat(idx), sizes


# ------------------------------------------------------------------------------------------------ file list
@needs_dali
def test_one_pass_val_maps_labels_and_idx_back(folder):
    root, files, labels = folder
    stream = dali.DaliStream(files=files, labels=labels, views=("val",), batch_size=5, size=SIZE, one_pass=True,
                             threads=1)
    assert len(stream) == 3
    x, y, idx, sizes = collect(stream)
    assert sizes == [5, 5, 2]                                  # 12 samples: a partial last batch, nothing dropped
    assert sorted(idx.tolist()) == list(range(12))            # every sample exactly once
    assert x.shape == (12, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(labels)[idx])
    # idx really is the file each image came from: its nearest PIL reference among the 12 files is that file
    refs = torch.stack([val_reference(f) for f in files])
    dist = ((x[:, None] - refs[None]) ** 2).mean(dim=(2, 3, 4))
    assert torch.equal(dist.argmin(1), idx)
    nearest = dist.topk(2, largest=False).values
    assert (nearest[:, 0] * 4 < nearest[:, 1]).all()          # a clear match, not a near tie
    # a second pass (the next evaluation) yields the same batches again
    x2, _, idx2, _ = collect(stream)
    assert torch.equal(idx2, idx) and torch.equal(x2, x)


@needs_dali
def test_views_shapes_differ_and_val_is_deterministic(folder):
    root, files, labels = folder
    stream = dali.DaliStream(files=files, labels=labels, views=("train", "train", "strong", "val"), batch_size=6,
                             size=SIZE, seed=1, threads=1)
    views, y, idx = next(stream)
    assert isinstance(views, list) and len(views) == 4
    assert all(v.shape == (6, 3, SIZE, SIZE) for v in views)
    assert torch.equal(y, torch.from_numpy(labels)[idx])
    train1, train2, strong, val = views
    assert not torch.allclose(train1, train2)                  # each view draws its own crop and flip
    assert not torch.allclose(train1, strong)
    # the val view of this shuffled endless stream equals the one-pass val stream of another seed
    ref = dali.DaliStream(files=files, labels=labels, views="val", batch_size=12, size=SIZE, seed=7,
                          one_pass=True, threads=1)
    xr, _, ir = next(ref)
    assert torch.allclose(val, xr[torch.argsort(ir)][idx], atol=1e-6)
    # normalised with the ImageNet mean/std: [0, 255] pixels land in [-mean/std, (1-mean)/std]
    lo, hi = (-MEAN / STD).min().item(), ((1 - MEAN) / STD).max().item()
    assert lo - 1e-4 <= strong.min().item() and strong.max().item() <= hi + 1e-4


@needs_dali
def test_strong_view_applies_rand_augment(tmp_path):
    # Flat-colour images stay flat under crop, flip and resize, so only RandAugment (colour ops, posterize,
    # solarize, warps with black fill) can change a pixel value; with a fixed seed some of 12 images must change.
    files = []
    for k in range(12):
        path = tmp_path / f"{k}.png"
        Image.new("RGB", (40, 48), (40 + 15 * k, 200 - 10 * k, 90)).save(path)
        files.append(str(path))
    s = dali.DaliStream(files=files, views=("train", "strong"), batch_size=12, size=SIZE, seed=4, threads=1)
    (train, strong), _, _ = next(s)
    assert train.std(dim=(2, 3)).max() < 1e-3                                   # train views: still flat
    changed = (strong - train).abs().amax(dim=(1, 2, 3)) > 0.05
    assert changed.sum() >= 6


@needs_dali
def test_single_train_view_endless_passes_and_state(folder):
    root, files, labels = folder
    stream = dali.DaliStream(files=files, labels=labels, views=("train",), batch_size=4, size=SIZE, seed=3,
                             threads=1)
    assert stream.batches_per_pass == 3
    passes = [torch.cat([next(stream)[2] for _ in range(3)]) for _ in range(2)]
    assert all(sorted(p.tolist()) == list(range(12)) for p in passes)   # each pass: a permutation of the data
    assert not torch.equal(passes[0], passes[1])                         # reshuffled between passes
    x, y, idx = next(stream)                                             # the first batch of pass 2
    assert x.shape == (4, 3, SIZE, SIZE) and torch.equal(y, torch.from_numpy(labels)[idx])
    assert stream.state_dict() == {"pass": 2}
    resumed = dali.DaliStream(files=files, labels=labels, views=("train",), batch_size=4, size=SIZE, seed=3,
                              threads=1)
    resumed.load_state_dict(stream.state_dict())
    assert sorted(torch.cat([next(resumed)[2] for _ in range(3)]).tolist()) == list(range(12))
    assert resumed.state_dict() == {"pass": 2}
    next(resumed)
    assert resumed.state_dict() == {"pass": 3}


@needs_dali
def test_sharding_over_two_ranks_is_disjoint(folder):
    root, files, labels = folder
    seen = []
    for rank in range(2):   # global batch 4 = 2 per rank
        s = dali.DaliStream(files=files, labels=labels, views="val", batch_size=4, size=SIZE, rank=rank,
                            world_size=2, one_pass=True, threads=1)
        _, _, idx, sizes = collect(s)
        assert sizes == [2, 2, 2]
        seen.append(set(idx.tolist()))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))
    firsts = []
    for rank in range(2):   # shuffled endless streams: the ranks' first passes are disjoint too
        s = dali.DaliStream(files=files, labels=labels, views="train", batch_size=4, size=SIZE, rank=rank,
                            world_size=2, seed=5, threads=1)
        firsts.append(set(torch.cat([next(s)[2] for _ in range(s.batches_per_pass)]).tolist()))
    assert len(firsts[0]) == len(firsts[1]) == 6 and not firsts[0] & firsts[1]


@needs_dali
def test_indices_subset_and_bad_arguments(folder):
    root, files, labels = folder
    sub = [1, 4, 7, 10, 11]
    s = dali.DaliStream(files=files, labels=labels, indices=sub, views="val", batch_size=8, size=SIZE,
                        one_pass=True, threads=1)
    _, y, idx, sizes = collect(s)
    assert sizes == [5] and sorted(idx.tolist()) == sub and torch.equal(y, torch.from_numpy(labels)[idx])
    with pytest.raises(UserError, match="unknown DALI view"):
        dali.DaliStream(files=files, labels=labels, views=("weak",))
    with pytest.raises(UserError, match="lower --batch_size"):
        dali.DaliStream(files=files, labels=labels, batch_size=16)
    with pytest.raises(UserError, match="one label per file"):
        dali.DaliStream(files=files, labels=labels[:3])
    with pytest.raises(UserError, match="exactly one"):
        dali.DaliStream(batch_size=4)


@needs_dali
def test_unreadable_image_is_named(folder, tmp_path):
    root, files, labels = folder
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    s = dali.DaliStream(files=files[:3] + [str(bad)], views="train", batch_size=4, size=SIZE, one_pass=True,
                        threads=1)
    with pytest.raises(UserError, match="broken.jpg"):
        next(s)


def test_without_dali_the_stream_says_how_to_install(monkeypatch, folder):
    monkeypatch.setattr(dali, "_dali_modules", False)
    assert not dali.available()
    with pytest.raises(UserError, match="pip install nvidia-dali-cuda130"):
        dali.DaliStream(files=folder[1], labels=folder[2])


# ------------------------------------------------------------------------------------------------ RecordIO
def test_pack_recordio_round_trip(folder, tmp_path):
    root, files, labels = folder
    n, classes = dali.pack_recordio(root, tmp_path / "rec" / "train")
    assert n == 12 and classes == list(CLASSES)
    records = list(dali.read_recordio(tmp_path / "rec" / "train"))
    assert sorted(r.key for r in records) == list(range(12))
    assert [r.key for r in records] != list(range(12))         # stored shuffled, like im2rec
    for r in records:                                          # key = ImageFolder position; original bytes kept
        assert r.data == open(files[r.key], "rb").read()
        assert r.label == float(labels[r.key])
    # .idx: "key<TAB>offset" of each record; .lst: "key<TAB>label<TAB>relative path" (im2rec)
    raw = (tmp_path / "rec" / "train.rec").read_bytes()
    idx_lines = (tmp_path / "rec" / "train.idx").read_text().splitlines()
    lst_lines = (tmp_path / "rec" / "train.lst").read_text().splitlines()
    assert len(idx_lines) == len(lst_lines) == 12
    for line, lst, r in zip(idx_lines, lst_lines, records):
        key, offset = map(int, line.split("\t"))
        assert key == r.key and offset % 4 == 0
        magic, lrec = struct.unpack_from("<II", raw, offset)
        assert magic == 0xCED7230A and lrec == 24 + len(r.data)   # cflag 0, length = header + image
        flag, label, hid, hid2 = struct.unpack_from("<IfQQ", raw, offset + 8)
        assert (flag, label, hid, hid2) == (0, r.label, r.key, 0)
        k, lab, rel = lst.split("\t")
        assert (int(k), lab, rel) == (r.key, f"{r.label:f}", f"{CLASSES[int(r.label)]}/{r.key % 4:02d}.jpg")
    assert len(raw) % 4 == 0


def test_record_holding_the_magic_word_is_split_and_read_back(tmp_path):
    # A JPEG comment that puts the magic word 4-byte aligned in the payload: 24-byte header + SOI (2) +
    # COM marker and length (4) = 30, so two filler bytes bring the word to offset 32 of the payload.
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    comment = b"\0\0" + struct.pack("<I", dali.MAGIC) + b"xy"
    data = jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]
    (tmp_path / "f" / "only").mkdir(parents=True)
    (tmp_path / "f" / "only" / "a.jpg").write_bytes(data)
    dali.pack_recordio(tmp_path / "f", tmp_path / "m")
    raw = (tmp_path / "m.rec").read_bytes()
    assert struct.unpack_from("<II", raw, 0) == (dali.MAGIC, (1 << 29) | 32)   # part 1: the 32 bytes before it
    assert struct.unpack_from("<II", raw, 40)[1] >> 29 == 3                   # part 2 (last)
    (rec,) = dali.read_recordio(tmp_path / "m")
    assert rec.data == data and rec.label == 0.0
    if dali.available():   # DALI's reader joins the parts too
        s = dali.DaliStream(rec=tmp_path / "m", views="val", batch_size=1, size=SIZE, one_pass=True, threads=1)
        x, y, idx = next(s)
        assert x.shape == (1, 3, SIZE, SIZE) and y.tolist() == [0] and idx.tolist() == [0]


@needs_dali
def test_dali_stream_reads_recordio(folder, tmp_path):
    root, files, labels = folder
    dali.pack_recordio(root, tmp_path / "train")
    s = dali.DaliStream(rec=tmp_path / "train", views="val", batch_size=5, size=SIZE, one_pass=True, threads=1)
    x, y, idx, sizes = collect(s)
    assert sizes == [5, 5, 2] and sorted(idx.tolist()) == list(range(12))    # idx = record key
    assert torch.equal(y, torch.from_numpy(labels)[idx])                     # y = header label
    ref = dali.DaliStream(files=files, labels=labels, views="val", batch_size=12, size=SIZE, one_pass=True,
                          threads=1)
    xf, _, idxf = next(ref)
    assert torch.allclose(x, xf[torch.argsort(idxf)][idx], atol=1e-6)       # same images as the file list
    train = dali.DaliStream(rec=str(tmp_path / "train.rec"), views=("train", "strong"), batch_size=4, size=SIZE,
                            seed=2, threads=1)
    (a, b), y, idx = next(train)
    assert a.shape == b.shape == (4, 3, SIZE, SIZE) and torch.equal(y, torch.from_numpy(labels)[idx])
    with pytest.raises(UserError, match="not found"):
        dali.DaliStream(rec=tmp_path / "nope", views="val", batch_size=4)


def test_recordio_set_fallback(folder, tmp_path):
    root, files, labels = folder
    dali.pack_recordio(root, tmp_path / "train")
    ds = dali.RecordIOSet(tmp_path / "train", transform=lambda im: torch.tensor(np.asarray(im)))
    assert len(ds) == 12 and ds.classes == list(CLASSES) and ds.num_classes == 3
    assert np.array_equal(ds.targets, labels)                         # ordered by key = ImageFolder order
    assert ds.ids[5] == "bee/01.jpg"
    x, y, i = ds[5]
    assert (y, i) == (1, 5) and torch.equal(x, torch.tensor(np.asarray(Image.open(files[5]).convert("RGB"))))
    sub = ds.subset([2, 9], transform=None)
    img, y, i = sub[1]
    assert isinstance(img, Image.Image) and (y, i) == (labels[9], 1) and sub.source_index.tolist() == [2, 9]
    # without the .lst, labels come from the record headers
    (tmp_path / "train.lst").unlink()
    bare = dali.RecordIOSet(tmp_path / "train.rec")
    assert np.array_equal(bare.targets, labels) and bare.classes == ["0", "1", "2"]


def test_pack_keeps_train_labels_for_a_subset_missing_a_class(folder, tmp_path):
    root, files, labels = folder
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat" / "x.jpg").write_bytes(open(files[-1], "rb").read())
    n, classes = dali.pack_recordio(tmp_path / "val", tmp_path / "val_rec", classes=CLASSES)
    assert n == 1 and [r.label for r in dali.read_recordio(tmp_path / "val_rec")] == [2.0]


def test_pack_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        dali.pack_recordio(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        dali.pack_recordio(tmp_path / "empty", tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "common.dali", "pack", str(tmp_path / "missing"),
                           str(tmp_path / "out")], cwd=REPO, env=script_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert_user_error(proc, "missing", "not found")
    assert not list(tmp_path.glob("out*"))


def test_pack_command_line(folder, tmp_path, capsys):
    root, files, labels = folder
    dali.main(["pack", str(root), str(tmp_path / "p"), "--no-shuffle"])
    assert "wrote 12 records of 3 classes" in capsys.readouterr().out
    assert [r.key for r in dali.read_recordio(tmp_path / "p")] == list(range(12))
    with pytest.raises(UserError, match="classes_from"):
        dali.main(["pack", str(root), str(tmp_path / "q"), "--classes_from", str(tmp_path / "nope")])
