"""Images/s of the DALI CPU pipeline (common.dali.DaliStream) against a torchvision DataLoader, on the same JPEGs.

    python benchmarks/loader_throughput.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--threads 2]

Takes --images CIFAR-10 JPEGs from the archive (read in memory, nothing extracted), upscales them to ImageNet size
(500x375) and re-encodes them at JPEG quality 90 in a temporary folder. Two views, each in DALI and in torchvision:
  train:  random-resized crop 224 (scale 0.08-1, ratio 3/4-4/3), horizontal flip, normalise (ImageNet mean/std)
  strong: the same + RandAugment n=2 m=10 (DALI's nvidia.dali.auto_aug.rand_augment vs torchvision RandAugment)
DALI gets --threads pipeline threads and the DataLoader --threads worker processes. The loaders are measured in
alternation (dali, torchvision, dali, ...); every measurement builds its loader afresh, discards --warmup batches,
then times batches for --seconds, and tears the loader down so nothing runs in the background of the other one.
Prints images/s per measurement, the medians, and the ratio DALI / torchvision per view, and the CPU time spent
per image in the timed window (this process's threads plus the DataLoader workers, from /proc): images/s depend
on the machine's load and are noisy on a shared machine; CPU time per image much less so.
"""
import argparse
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402

from common import UserError, dali  # noqa: E402
from common.run import entry  # noqa: E402


def image_benchmark_parser(doc, warmup, seconds):
    """The flags shared by the image-loading benchmarks: which JPEGs, how large, how long to measure."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"),
                   help="the CIFAR-10 JPEG archive (default: ../shared/data/cifar10-jpeg.tar.gz from the repo)")
    p.add_argument("--images", type=int, default=384, help="images to prepare (default: 384)")
    p.add_argument("--width", type=int, default=500, help="width of the upscaled images (default: 500)")
    p.add_argument("--height", type=int, default=375, help="height of the upscaled images (default: 375)")
    p.add_argument("--size", type=int, default=224, help="crop size (default: 224)")
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers (default: 2)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed batches per measurement (default: {warmup})")
    p.add_argument("--seconds", type=float, default=seconds,
                   help=f"timed seconds per measurement (default: {seconds:g})")
    return p


def parse_args():
    p = image_benchmark_parser(__doc__, warmup=4, seconds=6.0)
    p.add_argument("--rounds", type=int, default=2, help="measurements per loader and view (default: 2)")
    p.add_argument("--views", nargs="+", default=["train", "strong"], choices=["train", "strong"],
                   help="views to measure (default: train strong)")
    return p.parse_args()


def prepare_images(archive, count, width, height, out):
    """`count` train JPEGs spread evenly over the archive, upscaled and re-encoded at quality 90 under out/."""
    if not Path(archive).is_file():
        raise UserError(f"{archive} not found: pass --data PATH/cifar10-jpeg.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".jpg")
                   and "train/" in m.name]
        if not members:
            raise UserError(f"{archive} holds no train/*.jpg files")
        step = max(1, len(members) // count)
        files = []
        for k, m in enumerate(members[::step][:count]):
            img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
            path = out / f"{k:05d}.jpg"
            img.resize((width, height), Image.BICUBIC).save(path, quality=90)
            files.append(str(path))
    return files


class Files(torch.utils.data.Dataset):
    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(Image.open(self.files[i]).convert("RGB")), 0, i


def torchvision_batches(files, view, args):
    ops = [T.RandomResizedCrop(args.size), T.RandomHorizontalFlip()]
    if view == "strong":
        ops.append(T.RandAugment(num_ops=2, magnitude=10))
    ops += [T.ToTensor(), T.Normalize(dali.IMAGENET_MEAN, dali.IMAGENET_STD)]
    ds = Files(files, T.Compose(ops))
    # one long random order (successive permutations) so that no epoch boundary restarts the workers
    sampler = torch.utils.data.RandomSampler(ds, num_samples=len(ds) * 1000)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.threads,
                                         drop_last=True)
    return iter(loader)


def dali_batches(files, view, args):
    return dali.DaliStream(files=files, labels=[0] * len(files), views=(view,), batch_size=args.batch_size,
                           size=args.size, seed=0, threads=args.threads, device="cpu")


def cpu_seconds(pids):
    """CPU time of this process (all its threads: DALI's) plus that of the given child processes (DataLoader
    workers), read from /proc; None where /proc is not available."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / tick   # utime, stime
    return total


def measure(make, files, view, args):
    """(images/s, CPU ms per image) of one freshly built loader after a warm-up."""
    batches = make(files, view, args)
    for _ in range(args.warmup):
        next(batches)
    pids = [w.pid for w in getattr(batches, "_workers", [])]
    n, cpu0, start = 0, cpu_seconds(pids), time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        x, _, _ = next(batches)
        n += len(x)
    rate, cpu1 = n / (time.perf_counter() - start), cpu_seconds(pids)
    del batches   # stops the DataLoader workers / the DALI threads before the other loader runs
    return rate, (None if cpu0 is None or cpu1 is None else 1000 * (cpu1 - cpu0) / n)


def main():
    args = parse_args()
    if not dali.available():
        raise UserError(dali.INSTALL_HINT)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = prepare_images(args.data, args.images, args.width, args.height, Path(tmp))
        print(f"{len(files)} JPEGs {args.width}x{args.height} q90 prepared in {time.perf_counter() - t0:.1f} s; "
              f"crop {args.size}, batch {args.batch_size}, {args.threads} DALI threads / DataLoader workers, "
              f"{args.seconds:g} s per measurement")
        summary = []
        for view in args.views:
            rates, cpus = {"dali": [], "torchvision": []}, {"dali": [], "torchvision": []}
            for r in range(args.rounds):
                for name, make in (("dali", dali_batches), ("torchvision", torchvision_batches)):
                    rate, cpu = measure(make, files, view, args)
                    rates[name].append(rate)
                    cpus[name].append(cpu)
                    cpu_text = f"{cpu:6.2f} CPU ms/img" if cpu is not None else ""
                    print(f"  {view:6s} round {r + 1} {name:11s} {rate:7.1f} img/s  {cpu_text}", flush=True)
            med = {k: statistics.median(v) for k, v in rates.items()}
            cpu = {k: statistics.median(v) if None not in v else float("nan") for k, v in cpus.items()}
            summary.append((view, med["dali"], med["torchvision"], cpu["dali"], cpu["torchvision"]))
        print("medians:  view    dali img/s  torchvision img/s  dali/torchvision | CPU ms/img dali  torchvision  "
              "torchvision/dali")
        for view, d, t, cd, ct in summary:
            print(f"          {view:6s}  {d:10.1f}  {t:17.1f}  {d / t:16.2f} | {cd:15.2f}  {ct:11.2f}  {ct / cd:16.2f}")

if __name__ == "__main__":
    entry(main)
