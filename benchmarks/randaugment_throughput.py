"""Strong-view throughput: DALI (common.dali.DaliStream, view 'strong') vs DebiasPL's hand-written RandAugment.

    python benchmarks/randaugment_throughput.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--threads 2]

The strong view of debiaspl.py on ImageNet is RandomResizedCrop(224) + flip + the reference's RandAugment (2 ops
from a 16-op pool, random magnitude, always applied) in PIL, run in DataLoader worker processes. Under --dali the
same view is decoded and augmented by DALI (DALI's own RandAugment, n=2 m=10). Both get the same CPU budget:
--threads DALI threads vs --threads DataLoader workers. The images are --images CIFAR-10 JPEGs upscaled to ImageNet
size and re-encoded (benchmarks/loader_throughput.py prepares them); the two loaders are measured in alternation,
each built afresh, warmed up, timed for --seconds and torn down. Prints images/s and CPU ms per image of each, and
the ratio DALI / hand-written. On a GPU machine DALI would run on the GPU; this benchmark measures the CPU pipelines.
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import debiaspl  # noqa: E402
from common import UserError, dali  # noqa: E402
from common.run import entry  # noqa: E402
from loader_throughput import Files, image_benchmark_parser, measure, prepare_images  # noqa: E402


def parse_args():
    p = image_benchmark_parser(__doc__, warmup=3, seconds=8.0)
    p.add_argument("--rounds", type=int, default=2, help="measurements per loader (default: 2)")
    return p.parse_args()


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
    if not dali.available():
        raise UserError(dali.INSTALL_HINT)
    torch.set_num_threads(1)
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
