"""DALI input pipelines for ImageNet-style data, and a pure-Python MXNet RecordIO writer and reader.

`DaliStream` decodes and augments images with NVIDIA DALI, from a list of files (so index-CSV subsets work) or from
an MXNet RecordIO pair (.rec + .idx). It has the interface of `common.loaders.BatchStream`: endless batches (or one
pass for evaluation) of `(x, y, idx)`, a GLOBAL batch size split over ranks, and `state_dict()` for checkpoints.
On a GPU it decodes with nvJPEG (device='mixed') and augments on the GPU; on CPU it runs a CPU-only pipeline
(device_id=None), which is what the tests exercise.

`pack_recordio` writes the MXNet `im2rec --pass-through` format without MXNet (retired): the original image bytes,
a 24-byte `IfQQ` header per record, `.idx` and `.lst` files. `RecordIOSet` reads such files as an `ImageSet`-like
dataset yielding PIL images, so scripts also read RecordIO when DALI is off or not installed.

    python -m common.dali pack ./imagenet/train ./imagenet/rec/train [--classes_from ./imagenet/train]
"""
import argparse
import io
import os
import random
import re
import struct
import time
import warnings
from collections import namedtuple
from pathlib import Path

import numpy as np

from common import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIEWS = ("train", "strong", "val")
INSTALL_HINT = "--dali needs nvidia-dali: pip install nvidia-dali-cuda130"
# torchvision RandomResizedCrop defaults, the default crop of the 'train' and 'strong' views; a script whose
# torchvision path crops otherwise passes its own `area` and `ratio`, so that --dali changes the loader only.
RRC_AREA = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
# nvJPEG buffer sizes of the reference pipeline: preallocated so ImageNet's large JPEGs do not cause reallocations.
NVJPEG_DEVICE_PADDING = 211_025_920
NVJPEG_HOST_PADDING = 140_544_512

_dali_modules = None


def _dali():
    """(nvidia.dali, fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy) or None when DALI won't import."""
    global _dali_modules
    if _dali_modules is None:
        try:
            import nvidia.dali as dali
            from nvidia.dali import fn, pipeline_def, types
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
            _dali_modules = (dali, fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy)
        except Exception:  # ImportError, or a CUDA/driver library failing to load: DALI is unusable either way
            _dali_modules = False
    return _dali_modules or None


def available():
    """True when nvidia.dali imports (CPU pipelines need no GPU)."""
    return _dali() is not None


def _mix(*values):
    """A 31-bit seed from several integers (seed, rank, pass): distinct inputs give unrelated streams."""
    return int(np.random.SeedSequence([int(v) % 2**32 for v in values]).generate_state(1)[0] & 0x7FFFFFFF)


def _rec_paths(rec):
    """(rec, idx) from a prefix, a .rec path, or a (rec, idx) pair; UserError when a file is missing."""
    if isinstance(rec, (tuple, list)):
        rec_path, idx_path = (Path(p) for p in rec)
    else:
        p = Path(rec)
        base = p.with_suffix("") if p.suffix in (".rec", ".idx") else p
        rec_path, idx_path = Path(f"{base}.rec"), Path(f"{base}.idx")
    for p in (rec_path, idx_path):
        if not p.is_file():
            raise UserError(f"RecordIO file {p} not found; write the .rec/.idx pair with "
                            f"`python -m common.dali pack IMAGE_FOLDER PREFIX` (or MXNet im2rec)")
    return rec_path, idx_path


def _read_idx(path):
    """Keys and byte offsets of an .idx file ("key<TAB>offset" lines), sorted by offset (the stored record order)."""
    keys, offsets = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                keys.append(int(parts[0]))
                offsets.append(int(parts[1]))
            except (ValueError, IndexError):
                raise UserError(f"{path} line {n}: expected 'key<TAB>byte_offset', got {line.strip()[:80]!r}") from None
    if not keys:
        raise UserError(f"{path} lists no records")
    keys, offsets = np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    order = np.argsort(offsets, kind="stable")
    return keys[order], offsets[order]


# ------------------------------------------------------------------------------------------------------- DALI stream
class DaliStream:
    """Endless (or one-pass, for evaluation) batches decoded and augmented by DALI. Same interface as BatchStream.

    Source: `files` (paths) with `labels` (ints, or None -> y = -1) and optionally `indices` (a subset of
    positions in `files`), or `rec` (an MXNet RecordIO prefix, a .rec path, or a (rec, idx) pair; labels come from
    the record headers, the first one when a record holds several).

    views: any of 'train' (random-resized crop with area fraction in `area` and aspect ratio in `ratio`, by default
    torchvision's (0.08, 1) and (3/4, 4/3), horizontal flip), 'strong' (the same, then DALI's own RandAugment n=2 m=10 of 31 bins), 'val' (resize the shorter side to
    round(size*256/224), centre crop `size`). Each image is decoded once; every view then draws its own
    augmentation. Output: NCHW float32 normalised with the ImageNet mean/std; a tensor when there is one view, else a
    list in the order of `views`.

    Yields (x, y, idx): y int64 class labels; idx int64 = the position of each sample in `files`, or for RecordIO
    the record's key in the .idx file (im2rec and `pack_recordio` use the position of the image in the sorted
    class/file order, i.e. the ImageFolder order that index CSVs refer to). y and idx stay on the CPU; x is on the
    GPU when device='cuda'.

    batch_size is the GLOBAL batch (per rank: batch_size // world_size). Rank r reads shard r of world_size
    (shard_id = global rank). Endless mode drops each pass's incomplete last batch and restarts by itself;
    one_pass=True yields every sample of the rank's shard exactly once, in order, with a partial last batch
    (LastBatchPolicy.PARTIAL), and can be iterated again for the next evaluation.

    Shuffling (shuffle defaults to `not one_pass`): a file list is reshuffled completely every pass, with a
    permutation that depends on `seed` and is the same on every rank (so shards stay disjoint). DALI reads a
    RecordIO file in its stored order and shuffles only within a buffer of 1,024 records, so the records must be
    stored shuffled: `pack_recordio` and im2rec do that by default.

    The pipeline is built at the first batch. The first 'strong' pipeline of a process takes a few seconds longer:
    DALI converts its RandAugment code for per-sample conditionals (once per process).
    """

    def __init__(self, files=None, labels=None, rec=None, views=("train",), batch_size=256, size=224, seed=0,
                 rank=0, world_size=1, threads=2, device="cpu", shuffle=None, one_pass=False, indices=None,
                 local_rank=None, area=RRC_AREA, ratio=RRC_RATIO):
        if not available():
            raise UserError(INSTALL_HINT)
        views = (views,) if isinstance(views, str) else tuple(views)
        bad = [v for v in views if v not in VIEWS]
        if not views or bad:
            raise UserError(f"unknown DALI view(s) {bad or '(none)'}: choose from {', '.join(VIEWS)}")
        device = str(device).split(":")[0]
        if device not in ("cpu", "cuda"):
            raise UserError(f"DALI device must be 'cpu' or 'cuda', got {device!r}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside a world of {world_size}")
        self.per_rank = int(batch_size) // int(world_size)
        if self.per_rank < 1:
            raise UserError(f"batch size {batch_size} is smaller than the world size {world_size}: "
                            f"pass a global --batch_size of at least {world_size}")
        if (files is None) == (rec is None):
            raise UserError("DaliStream reads either a file list (files=...) or a RecordIO prefix (rec=...), "
                            "exactly one of them")
        self.views, self.size, self.seed = views, int(size), int(seed)
        self.area, self.ratio = [float(a) for a in area], [float(r) for r in ratio]
        self.rank, self.world_size, self.threads, self.device = int(rank), int(world_size), int(threads), device
        self.one_pass = bool(one_pass)
        self.shuffle = (not one_pass) if shuffle is None else bool(shuffle)
        self.batch_size = int(batch_size)
        if device == "cuda":   # the GPU this process drives: torch's current device, which distributed.init sets
            if local_rank is None:  # (LOCAL_RANK modulo the GPUs visible, when a process sees fewer GPUs than ranks)
                import torch
                local_rank = torch.cuda.current_device()
            self.local_rank = int(local_rank)
        else:
            self.local_rank = None

        if files is not None:
            self.files = [str(f) for f in files]
            if labels is None:
                self.labels = np.full(len(self.files), -1, dtype=np.int64)
            else:
                self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
                if len(self.labels) != len(self.files):
                    raise UserError(f"{len(self.labels)} labels for {len(self.files)} files: give one label per file")
            if indices is None:
                self.positions = np.arange(len(self.files), dtype=np.int64)
            else:
                self.positions = np.asarray(indices, dtype=np.int64).reshape(-1)
                if len(self.positions) and (self.positions.min() < 0 or self.positions.max() >= len(self.files)):
                    raise UserError(f"indices must lie in [0, {len(self.files)}) for a list of {len(self.files)} files")
            self.rec = None
            num = len(self.positions)
        else:
            if labels is not None or indices is not None:
                raise UserError("with rec=..., labels come from the record headers and subsets are not supported: "
                                "pack the subset into its own RecordIO file (python -m common.dali pack ...)")
            self.rec = _rec_paths(rec)
            self.rec_keys, self.rec_offsets = _read_idx(self.rec[1])
            num = len(self.rec_keys)
        if num == 0:
            raise UserError("DaliStream got no samples to read")
        self.num_samples = num
        # DALI shard r of w holds samples [r*N//w, (r+1)*N//w); without stick_to_shard a rank moves to the next shard
        # each pass, so an endless stream needs every shard to fill a batch.
        shard_sizes = [(r + 1) * num // world_size - r * num // world_size for r in range(world_size)]
        self.shard_size = shard_sizes[self.rank]
        if not self.one_pass and min(shard_sizes) < self.per_rank:
            raise UserError(f"{num} samples over {world_size} rank(s) cannot fill a per-rank batch of "
                            f"{self.per_rank}: lower --batch_size")
        if self.one_pass:
            self.batches_per_pass = -(-self.shard_size // self.per_rank)
        else:
            self.batches_per_pass = self.shard_size // self.per_rank
        self._pass = 0          # passes completed (endless mode)
        self._built_pass = 0    # pass the current pipeline was seeded for
        self._it = None

    # ---------------------------------------------------------------------------------------------- pipeline
    def _build(self):
        _, fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy = _dali()
        cuda = self.device == "cuda"
        size, views = self.size, self.views
        # The reference seeded its labeled and unlabeled pipelines identically (12 + device_id), which correlates
        # the two streams' augmentations; here every stream mixes its own `seed` with the rank and the pass it was
        # (re)built at, so callers must give the streams different seeds.
        pipe_seed = _mix(self.seed, self.rank, self._built_pass, 1)
        order_seed = _mix(self.seed, self._built_pass, 2)   # same on every rank: shards of one permutation

        # pad_last_batch: the reader pads its shard to whole batches (the iterator drops the padding), so every pass
        # starts at the start of the shard instead of spilling the previous pass's last batch into the next one
        reader = dict(name="Reader", shard_id=self.rank, num_shards=self.world_size, pad_last_batch=True,
                      stick_to_shard=self.one_pass)
        if self.rec is None:
            if self.shuffle:
                # a full reshuffle of the list every pass (random_shuffle would only shuffle within a buffer)
                reader.update(shuffle_after_epoch=True, shuffle_after_epoch_seed=order_seed, stick_to_shard=False)
        else:
            reader.update(random_shuffle=self.shuffle, seed=order_seed)

        decode = dict(device="mixed" if cuda else "cpu", output_type=types.RGB)
        if cuda:
            decode.update(device_memory_padding=NVJPEG_DEVICE_PADDING, host_memory_padding=NVJPEG_HOST_PADDING)
        mean = [255 * m for m in IMAGENET_MEAN]
        std = [255 * s for s in IMAGENET_STD]
        val_short = round(size * 256 / 224)

        def graph():
            if self.rec is None:
                jpegs, labels = fn.readers.file(files=[self.files[p] for p in self.positions],
                                                labels=[int(p) for p in self.positions], **reader)
                extra = []
            else:
                jpegs, labels = fn.readers.mxnet(path=[str(self.rec[0])], index_path=[str(self.rec[1])], **reader)
                # "<file> at index <byte offset>" -> the record's key (mapped in Python)
                extra = [fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)]
            # One crop view alone: decode only the crop window (ROI decoding). Several views: decode once, crop each.
            fused = len(views) == 1 and views[0] != "val"
            if fused:
                image = fn.decoders.image_random_crop(jpegs, random_area=self.area,
                                                      random_aspect_ratio=self.ratio, num_attempts=10, **decode)
            else:
                image = fn.decoders.image(jpegs, **decode)
            outs = []
            for v in views:
                if v == "val":
                    x = fn.resize(image, resize_shorter=val_short, interp_type=types.INTERP_LINEAR, antialias=True)
                    mirror = 0
                else:
                    if fused:
                        x = fn.resize(image, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
                    else:
                        x = fn.random_resized_crop(image, size=[size, size], random_area=self.area,
                                                   random_aspect_ratio=self.ratio, num_attempts=10,
                                                   interp_type=types.INTERP_LINEAR, antialias=True)
                    mirror = fn.random.coin_flip(probability=0.5)
                    if v == "strong":
                        # DALI's RandAugment: 2 ops, fixed magnitude bin 10 of 31, translations relative to the
                        # image size. DebiasPL's own variant (random magnitude 1..9 of 10, 16-op pool) differs;
                        # scripts that need it exactly use their torchvision path. Nearest-neighbour warps and black
                        # fill as in torchvision's RandAugment and PIL's affine defaults (the references' choice);
                        # DALI's linear warps would also cost ~3x more CPU time.
                        from nvidia.dali.auto_aug import rand_augment
                        x = rand_augment.rand_augment(x, n=2, m=10, shape=[size, size], fill_value=0,
                                                      interp_type=types.INTERP_NN)
                outs.append(fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", crop=[size, size],
                                                     mean=mean, std=std, mirror=mirror))
            return (*outs, labels, *extra)

        self._names = [f"x{i}" for i in range(len(views))] + ["label"] + (["info"] if self.rec is not None else [])
        policy = LastBatchPolicy.PARTIAL if self.one_pass else LastBatchPolicy.DROP
        # DALI's auto_aug code calls deprecated `fn.experimental.*` aliases and forces those warnings on; they say
        # nothing to our users (and would crash a run that turns warnings into errors), so drop them here.
        with warnings.catch_warnings(record=True) as caught:
            try:
                # enable_conditionals: RandAugment's per-sample op choice is written as `if` on DALI data
                pipe = pipeline_def(graph, batch_size=self.per_rank, num_threads=self.threads,
                                    device_id=self.local_rank if cuda else None, seed=pipe_seed,
                                    enable_conditionals="strong" in views)()
                self._it = DALIGenericIterator(pipe, self._names, reader_name="Reader", last_batch_policy=policy,
                                               auto_reset=True)
            except RuntimeError as e:
                raise UserError(_dali_error(e, self._shard_files())) from None
        for w in caught:
            if not (issubclass(w.category, DeprecationWarning) and "nvidia.dali.fn.experimental" in str(w.message)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    # ---------------------------------------------------------------------------------------------- iteration
    def __iter__(self):
        return self

    def __len__(self):
        return self.batches_per_pass

    def __next__(self):
        import torch   # imported here so that the RecordIO tools work without loading torch
        if self._it is None:
            self._build()
        while True:
            try:
                out = next(self._it)[0]
                break
            except StopIteration:
                self._pass += 1      # auto_reset already restarted the iterator for the next pass
                if self.one_pass:
                    raise
            except RuntimeError as e:
                raise UserError(_dali_error(e, self._shard_files())) from None
        xs = [out[n] for n in self._names[:len(self.views)]]
        raw = out["label"]
        if self.rec is None:
            idx = raw.reshape(len(raw), -1)[:, 0].to(torch.int64).cpu()
            y = torch.from_numpy(self.labels[idx.numpy()])
        else:
            y = raw.reshape(len(raw), -1)[:, 0].round().to(torch.int64).cpu()
            idx = torch.from_numpy(self._record_keys(out["info"].cpu().numpy()))
        return (xs[0] if len(xs) == 1 else xs), y, idx

    def _shard_files(self):
        return [] if self.rec is not None else [self.files[p] for p in self.positions]

    def _record_keys(self, info):
        """Keys of the records whose source_info strings ("<file> at index <offset>") are the rows of `info`."""
        offsets = np.array([int(bytes(row[row != 0]).decode().rsplit(" ", 1)[-1]) for row in info], dtype=np.int64)
        pos = np.searchsorted(self.rec_offsets, offsets)
        return self.rec_keys[np.minimum(pos, len(self.rec_keys) - 1)]

    # ---------------------------------------------------------------------------------------------- resume
    def state_dict(self):
        """The pass number only: DALI readers cannot restart in the middle of a pass."""
        return {"pass": self._pass}

    def load_state_dict(self, d):
        """Continue at the START of pass d['pass'] with seeds mixed with that pass number, so a resumed run neither
        replays pass 0's order and augmentations nor reproduces the uninterrupted run's batches exactly (DALI cannot
        restore a reader or its random generators mid-pass: the batches of the interrupted pass are drawn anew)."""
        self._pass = self._built_pass = int(d["pass"])
        self._it = None   # rebuilt lazily with the new seeds


def _dali_error(e, files=()):
    """One line from a DALI pipeline error: the failing operator and DALI's cause. DALI does not say which sample
    failed to decode, so for a file list the files are checked with PIL (headers only, for up to 60 s)."""
    text = str(e)
    op = re.search(r"operator `(?:nvidia\.dali\.)?([^`]+)`", text)
    tail = text.split("encountered:", 1)[-1].splitlines()
    cause = [l.strip() for l in tail if l.strip() and not l.strip().startswith(("Current pipeline", "C++ context"))]
    msg = f"DALI {op.group(1) if op else 'pipeline'} failed: {' '.join(cause)[:300] or 'unknown error'}"
    if op and "decoders" in op.group(1) and files:
        bad = _first_unreadable(files)
        msg += f"; unreadable image: {bad}" if bad else "; remove or re-encode the broken image"
    return msg


def _first_unreadable(paths, budget_s=60.0):
    from PIL import Image
    start = time.monotonic()
    for p in paths:
        if time.monotonic() - start > budget_s:
            return None
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception:
            return p
    return None


# ------------------------------------------------------------------------------------------------------ RecordIO
MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")     # flag, label, id, id2: MXNet's IRHeader, 24 bytes
_LEN_MASK = (1 << 29) - 1
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")   # torchvision's
Record = namedtuple("Record", "key label data")


def _write_record(f, payload):
    """dmlc-core RecordIOWriter::WriteRecord: a 4-byte-aligned occurrence of the magic word inside the payload
    splits the record into parts (cflag 1 start, 2 middle, 3 end) with that word left out; the reader puts it back."""
    n = len(payload)
    if n >= 1 << 29:
        raise UserError(f"a record of {n} bytes exceeds RecordIO's 512 MiB limit")
    start = 0
    view = memoryview(payload)
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1 and pos + 4 <= n:
        if pos % 4 == 0:
            f.write(struct.pack("<II", MAGIC, ((1 if start == 0 else 2) << 29) | (pos - start)))
            f.write(view[start:pos])
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
    f.write(struct.pack("<II", MAGIC, ((3 if start else 0) << 29) | (n - start)))
    f.write(view[start:])
    f.write(b"\0" * (-n % 4))


def _read_record(f, where=""):
    """The payload of the record at the file position of `f`, or None at the end of the file."""
    parts = []
    while True:
        head = f.read(8)
        if not head and not parts:
            return None
        if len(head) < 8:
            raise UserError(f"{where}: truncated RecordIO record")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise UserError(f"{where}: not a RecordIO record (bad magic number {magic:#x})")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        data = f.read(length)
        if len(data) < length:
            raise UserError(f"{where}: truncated RecordIO record")
        f.read(-length % 4)
        parts.append(data)
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)


def _parse_payload(payload):
    """(key, label, image bytes): label a float when the header flag is 0, else the tuple of `flag` floats."""
    flag, label, key, _ = _HEADER.unpack_from(payload)
    data = payload[_HEADER.size:]
    if flag > 0:
        label = struct.unpack_from(f"<{flag}f", data)
        data = data[4 * flag:]
    return key, label, data


def _image_files(folder, classes=None):
    """[(path, class index)] in torchvision ImageFolder order (sorted classes; sorted os.walk inside each class)."""
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        extra = [c for c in found if c not in classes]
        if extra:
            raise UserError(f"{folder} has class folder(s) {extra[:5]} that are not in the given class list")
    items = []
    for ci, c in enumerate(classes):
        target = os.path.join(folder, c)
        if not os.path.isdir(target):
            continue
        for root, _, names in sorted(os.walk(target, followlinks=True)):
            for name in sorted(names):
                if name.lower().endswith(IMG_EXTENSIONS):
                    items.append((os.path.join(root, name), ci))
    return items, classes


def pack_recordio(image_folder, prefix, classes=None, shuffle=True, seed=100):
    """Write prefix.rec / .idx / .lst from an image folder (<folder>/<class>/<image>), like MXNet
    `im2rec --list --recursive` then `im2rec --pass-through`: the original image bytes (not re-encoded), labels =
    index of the class in sorted class-folder order (or in `classes`, e.g. the train folder's classes, so that a
    subset missing a class keeps the same labels; im2rec would renumber), record key = position of the image in
    ImageFolder order. Records are stored shuffled with random.seed(100) as im2rec does, because DALI shuffles
    RecordIO only within a small buffer. Returns (number of records, class names)."""
    folder = Path(image_folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found: expected {folder}/<class>/<image files>")
    items, classes = _image_files(folder, classes)
    if not items:
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) in class folders under {folder}: "
                        f"expected {folder}/<class>/<image files>")
    order = list(range(len(items)))
    if shuffle:
        random.Random(seed).shuffle(order)   # the same permutation as im2rec's random.seed(100); random.shuffle
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {ext: Path(f"{prefix}.{ext}") for ext in ("rec", "idx", "lst")}
    tmp = {ext: p.with_name(p.name + ".tmp") for ext, p in paths.items()}
    try:
        with open(tmp["rec"], "wb") as frec, open(tmp["idx"], "w") as fidx, open(tmp["lst"], "w") as flst:
            for key in order:
                path, label = items[key]
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError as e:
                    raise UserError(f"cannot read image {path}: {e.strerror or e}") from None
                fidx.write(f"{key}\t{frec.tell()}\n")
                _write_record(frec, _HEADER.pack(0, float(label), key, 0) + data)
                flst.write(f"{key}\t{float(label):f}\t{os.path.relpath(path, folder)}\n")
        for ext in paths:
            os.replace(tmp[ext], paths[ext])
    finally:
        for p in tmp.values():
            if p.exists():
                p.unlink()
    return len(items), classes


def read_recordio(prefix):
    """Yield Record(key, label, data) for every record of prefix.rec in stored order (key = the header id)."""
    rec_path = Path(prefix)
    rec_path = rec_path if rec_path.suffix == ".rec" else Path(f"{prefix}.rec")
    if not rec_path.is_file():
        raise UserError(f"RecordIO file {rec_path} not found")
    with open(rec_path, "rb") as f:
        while True:
            offset = f.tell()
            payload = _read_record(f, f"{rec_path} at byte {offset}")
            if payload is None:
                return
            yield Record(*_parse_payload(payload))


_KEEP = object()


class RecordIOSet:
    """An ImageSet-like dataset over an MXNet RecordIO pair, yielding PIL images (for runs without DALI).

    Items are ordered by record key, i.e. the ImageFolder order for files written by `pack_recordio` or
    `im2rec --recursive`, so the same index CSVs apply, and position i matches DaliStream's idx when the keys
    are 0..N-1. Labels, ids and class names come from prefix.lst when it exists, else from the record headers
    (ids "rec/<key>", classes "0".."K-1"). A map-style dataset for torch.utils.data.DataLoader."""

    def __init__(self, prefix, transform=None):
        self.rec_path, idx_path = _rec_paths(prefix)
        keys, offsets = _read_idx(idx_path)
        order = np.argsort(keys, kind="stable")
        self.keys, self.offsets = keys[order], offsets[order]
        lst = self.rec_path.with_suffix(".lst")
        labels = self._labels_from_lst(lst) if lst.is_file() else None
        if labels is None:
            labels = {}
            with open(self.rec_path, "rb") as f:
                for key, off in zip(self.keys, self.offsets):
                    f.seek(int(off))
                    _, label, _ = _parse_payload(_read_record(f, f"{self.rec_path} at byte {off}"))
                    labels[int(key)] = (label if np.isscalar(label) else label[0], f"rec/{key}")
            self.classes = None
        self.targets = np.array([int(round(labels[int(k)][0])) for k in self.keys], dtype=np.int64)
        self.ids = [labels[int(k)][1] for k in self.keys]
        num_classes = int(self.targets.max()) + 1 if len(self.targets) else 0
        if self.classes is None or len(self.classes) < num_classes:
            known = dict(enumerate(self.classes or []))
            self.classes = [known.get(i, str(i)) for i in range(num_classes)]
        self.num_classes = len(self.classes)
        self.transform = transform
        self.source_index = np.arange(len(self.keys), dtype=np.int64)
        self._file, self._pid = None, None

    def _labels_from_lst(self, lst):
        """{key: (label, relative path)} from an im2rec .lst ("key<TAB>label...<TAB>path"); class names from the
        first path component of each label's images."""
        labels, names = {}, {}
        with open(lst) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                try:
                    key, label, path = int(parts[0]), float(parts[1]), parts[-1]
                except (ValueError, IndexError):
                    raise UserError(f"{lst} line {n}: expected 'key<TAB>label<TAB>path'") from None
                labels[key] = (label, path)
                names.setdefault(int(round(label)), Path(path).parts[0] if len(Path(path).parts) > 1 else None)
        missing = [int(k) for k in self.keys if int(k) not in labels]
        if missing:
            raise UserError(f"{lst} lacks record key {missing[0]} of {self.rec_path}: re-pack or delete the .lst")
        k = max(names) + 1 if names else 0
        self.classes = [names.get(i) or str(i) for i in range(k)]
        return labels

    def __len__(self):
        return len(self.keys)

    def image(self, i):
        from PIL import Image
        if self._file is None or self._pid != os.getpid():   # one handle per (worker) process
            self._file, self._pid = open(self.rec_path, "rb"), os.getpid()
        off = int(self.offsets[i])
        where = f"{self.rec_path} record {self.keys[i]} at byte {off}"
        self._file.seek(off)
        payload = _read_record(self._file, where)
        if payload is None:
            raise UserError(f"{where}: offset past the end of the file; the .idx does not match the .rec")
        try:
            return Image.open(io.BytesIO(_parse_payload(payload)[2])).convert("RGB")
        except Exception as e:
            raise UserError(f"cannot decode image {where} ({self.ids[i]}): {e}") from None

    def __getitem__(self, i):
        img = self.image(i)
        t = self.transform
        x = img if t is None else [f(img) for f in t] if isinstance(t, (list, tuple)) else t(img)
        return x, int(self.targets[i]), i

    def subset(self, indices, transform=_KEEP, targets=None):
        indices = np.asarray(indices, dtype=np.int64)
        sub = object.__new__(RecordIOSet)
        sub.__dict__.update(self.__dict__)
        sub.keys, sub.offsets = self.keys[indices], self.offsets[indices]
        sub.targets = self.targets[indices] if targets is None else np.asarray(targets, dtype=np.int64)
        sub.ids = [self.ids[i] for i in indices]
        sub.source_index = self.source_index[indices]
        sub.transform = self.transform if transform is _KEEP else transform
        sub._file, sub._pid = None, None
        return sub

    def __getstate__(self):   # file handles do not cross process boundaries
        d = dict(self.__dict__)
        d["_file"], d["_pid"] = None, None
        return d


# ------------------------------------------------------------------------------------------------- command line
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m common.dali", description="RecordIO tools without MXNet.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack an image folder (<folder>/<class>/<image>) into PREFIX.rec/.idx/.lst")
    p.add_argument("folder", help="image folder with one subfolder per class")
    p.add_argument("prefix", help="output prefix: writes PREFIX.rec, PREFIX.idx and PREFIX.lst")
    p.add_argument("--classes_from", "--classes-from", default=None,
                   help="take the class list (labels) from this folder's subfolders, e.g. the train folder when "
                        "packing val or a labeled subset (default: the packed folder's own subfolders)")
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="store records in random order (random.seed(100), as im2rec); DALI shuffles RecordIO only "
                        "within a small buffer (default: True)")
    args = parser.parse_args(argv)
    classes = None
    if args.classes_from is not None:
        if not Path(args.classes_from).is_dir():
            raise UserError(f"--classes_from folder {args.classes_from} not found")
        classes = sorted(e.name for e in os.scandir(args.classes_from) if e.is_dir())
    n, classes = pack_recordio(args.folder, args.prefix, classes=classes, shuffle=args.shuffle)
    print(f"wrote {n} records of {len(classes)} classes to {args.prefix}.rec (.idx, .lst)")


if __name__ == "__main__":
    from common.run import entry
    entry(main)
