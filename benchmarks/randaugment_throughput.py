"""Strong-view throughput: DALI (common.dali.DaliStream, view 'strong') vs DebiasPL's hand-written RandAugment.

    python benchmarks/randaugment_throughput.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--threads 2]

The strong view of debiaspl.py on ImageNet is RandomResizedCrop(224) + flip + the reference's RandAugment (2 ops
from a 16-op pool, random magnitude, always applied) in PIL, run in DataLoader worker processes. Under --dali the
same view is decoded and augmented by DALI (DALI's own RandAugment, n=2 m=10). Both get the same CPU budget:
--threads DALI threads vs --threads DataLoader workers. The images are --images CIFAR-10 JPEGs upscaled to ImageNet
size and re-encoded (benchmarks/loader_throughput.py prepares them); the two loaders are measured in alternation,
each built afresh, warmed up, timed for --seconds and torn down. Prints images/s and CPU ms per image of each, and
the ratio DALI / hand-written. On a GPU machine DALI would run on the GPU; this benchmark measures the CPU pipelines.

    python benchmarks/randaugment_throughput.py --pad_crop 1000 --rounds 6

--pad_crop N measures instead what a DataLoader worker pays per unlabeled CIFAR image in debiaspl.py (no DALI): the
32-px array -> PIL image, the weak view and the strong view (RandAugmentMC + Cutout), with debiaspl's PadCrop and
with T.RandomCrop(32, padding=4, padding_mode="reflect") in its place; same process, one thread, N images per
measurement, the two alternating for --rounds rounds.
"""
import io
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

import debiaspl  # noqa: E402
from common import UserError, dali  # noqa: E402
from common.run import entry  # noqa: E402
from loader_throughput import Files, image_benchmark_parser, measure, prepare_images  # noqa: E402


def parse_args():
    p = image_benchmark_parser(__doc__, warmup=3, seconds=8.0)
    p.add_argument("--rounds", type=int, default=2, help="measurements per loader (default: 2)")
    p.add_argument("--pad_crop", type=int, default=None, metavar="N",
                   help="instead: debiaspl's 32-px weak + strong transform with PadCrop vs T.RandomCrop, N images per "
                        "measurement (the first --images train images of --data, cycled)")
    return p.parse_args()


def cifar_arrays(archive, count):
    """The first `count` train JPEGs of the CIFAR-10 archive as 32x32x3 uint8 arrays (what debiaspl's CIFAR set holds)."""
    if not Path(archive).is_file():
        raise UserError(f"{archive} not found: pass --data PATH/cifar10-jpeg.tar.gz")
    out = []
    with tarfile.open(archive) as tar:
        for m in tar:
            if m.isfile() and "train/" in m.name and m.name.lower().endswith(".jpg"):
                out.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")))
                if len(out) == count:
                    break
    return out


def pad_crop_comparison(args):
    """Images/s and CPU us per image of the unlabeled item's transforms, PadCrop vs T.RandomCrop, interleaved."""
    arrays = cifar_arrays(args.data, args.images)
    _, weak, strong, _ = debiaspl.make_transforms("cifar10", 32)

    def swapped(compose):  # the same pipeline with torchvision's reflect crop in PadCrop's place
        return T.Compose([T.RandomCrop(op.size, padding=op.padding, padding_mode="reflect")
                          if isinstance(op, debiaspl.PadCrop) else op for op in compose.transforms])
    variants = {"PadCrop": (weak, strong), "T.RandomCrop": (swapped(weak), swapped(strong))}
    print(f"{len(arrays)} CIFAR-10 images; weak + strong view per image, {args.pad_crop} images per measurement, "
          f"{args.rounds} rounds, 1 thread")
    rates, cpus = {k: [] for k in variants}, {k: [] for k in variants}
    for r in range(args.rounds):
        for name, (w, s) in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(args.pad_crop):
                img = Image.fromarray(arrays[i % len(arrays)])
                w(img), s(img)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rates[name].append(args.pad_crop / wall)
            cpus[name].append(1e6 * cpu / args.pad_crop)
            print(f"  round {r + 1} {name:12s} {rates[name][-1]:7.0f} img/s  {cpus[name][-1]:6.0f} CPU us/img",
                  flush=True)
    p, t = (statistics.median(rates[k]) for k in variants)
    cp, ct = (statistics.median(cpus[k]) for k in variants)
    print(f"weak + strong 32-px transform: PadCrop {p:.0f} img/s, T.RandomCrop {t:.0f} img/s: PadCrop "
          f"{100 * (p / t - 1):+.1f}% | CPU us/img PadCrop {cp:.0f}, T.RandomCrop {ct:.0f}: {100 * (1 - cp / ct):.1f}% "
          "less with PadCrop")


def handwritten_batches(files, view, args):
    """debiaspl.py's strong view (its make_transforms for ImageNet) in a DataLoader with --threads workers."""
    _, _, strong, _ = debiaspl.make_transforms("imagenet", args.size)
    ds = Files(files, strong)
    sampler = torch.utils.data.RandomSampler(ds, num_samples=len(ds) * 1000)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.threads,
                                         drop_last=True)
    return iter(loader)


def dali_batches(files, view, args):
    return dali.DaliStream(files=files, labels=[0] * len(files), views=("strong",), batch_size=args.batch_size,
                           size=args.size, seed=0, threads=args.threads, device="cpu")


def main():
    args = parse_args()
    torch.set_num_threads(1)
    if args.pad_crop is not None:
        return pad_crop_comparison(args)
    if not dali.available():
        raise UserError(dali.INSTALL_HINT)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = prepare_images(args.data, args.images, args.width, args.height, Path(tmp))
        print(f"{len(files)} JPEGs {args.width}x{args.height} prepared in {time.perf_counter() - t0:.1f} s; strong "
              f"view, crop {args.size}, batch {args.batch_size}, {args.threads} DALI threads / DataLoader workers")
        rates, cpus = {"dali": [], "hand-written": []}, {"dali": [], "hand-written": []}
        for r in range(args.rounds):
            for name, make in (("dali", dali_batches), ("hand-written", handwritten_batches)):
                rate, cpu = measure(make, files, "strong", args)
                rates[name].append(rate)
                cpus[name].append(cpu)
                print(f"  round {r + 1} {name:12s} {rate:7.1f} img/s" + (f"  {cpu:6.2f} CPU ms/img" if cpu else ""),
                      flush=True)
    d, h = statistics.median(rates["dali"]), statistics.median(rates["hand-written"])
    cd = statistics.median(cpus["dali"]) if None not in cpus["dali"] else float("nan")
    ch = statistics.median(cpus["hand-written"]) if None not in cpus["hand-written"] else float("nan")
    print(f"strong view: DALI {d:.1f} img/s, hand-written RandAugment {h:.1f} img/s, ratio DALI/hand-written "
          f"{d / h:.2f}x | CPU ms/img DALI {cd:.2f}, hand-written {ch:.2f}, ratio {ch / cd:.2f}x")


if __name__ == "__main__":
    entry(main)
