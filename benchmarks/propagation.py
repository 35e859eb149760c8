"""Wall time and peak memory of Deep Metric Transfer's label propagation (metric_transfer.py, stage B).

    python benchmarks/propagation.py                    # CIFAR scale: synthetic and real CIFAR-10 features
    python benchmarks/propagation.py --imagenet         # also kNN at ImageNet scale (1,281,167 x 128)
    python benchmarks/propagation.py --imagenet --imagenet_spectral   # and spectral there (hours, ~10 GB)
    python benchmarks/propagation.py --only "50k" --threads 0 --busy 1  # idle, then one core kept busy
    python benchmarks/propagation.py --topk             # kNN's top-200 of 13,000 seeds alone, three ways

Every measurement runs in a fresh subprocess, so its peak resident memory (VmHWM from /proc/self/status, which counts
faiss's and NumPy's C allocations that tracemalloc misses) is its own; "base" is the resident memory after the
features were made and before propagation started. CPU seconds are printed next to wall seconds: on a shared machine
the wall time moves with the others' load, the CPU time much less.

Inputs (all 128-d, L2-normalised):
- synthetic: Gaussian blobs on the unit sphere (10 at CIFAR scale, 1000 at ImageNet scale), noise 3/sqrt(d) per
  coordinate; seeds drawn as the reference does (reference_split, seed 0).
- cifar10: the 50,000 real CIFAR-10 training images of ../shared/data/cifar10-jpeg.tar.gz through a FIXED feature
  map with no training: each image is turned to float, mean-centred per channel, average-pooled to 8x8x3 = 192 values
  and projected to 128 dimensions by a Gaussian random matrix (seed 0). Weak features (pseudo-label accuracy far below
  a trained metric's), but real image statistics and real near-duplicates for the graph.
Baselines ("dense"): a straightforward PyTorch version of the same propagation: kNN with the full N_u x N_l similarity
matrix and topk; spectral with the full N x N similarity matrix, topk rows, a dense symmetric W and a full
torch.linalg.eigh of the dense normalised adjacency (O(N^3)): it fits only at a few thousand points, so ours is
measured at that size too.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from busy import busy_cores

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def vm(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024 ** 2  # kB -> GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


# ------------------------------------------------------------------------------------------------------ inputs
def synthetic(n, blobs, d=128, seed=0):
    import numpy as np
    rng = np.random.RandomState(seed)
    centers = rng.standard_normal((blobs, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    y = rng.randint(blobs, size=n).astype(np.int64)
    f = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        part = centers[y[s:s + 100_000]] + (3 / math.sqrt(d)) * rng.standard_normal((len(y[s:s + 100_000]), d))
        f[s:s + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return f, y


def cifar_features(cache):
    """Fixed random-projection features of the real CIFAR-10 training images (see the module docstring)."""
    import numpy as np
    out = Path(cache) / "cifar10_randproj128.npz"
    if out.exists():
        d = np.load(out)
        return d["f"], d["y"]
    from common import datasets, download as downloads
    archive = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    root = Path(cache) / "cifar10-jpeg"
    if not (root / "train").exists():
        root.mkdir(parents=True, exist_ok=True)
        downloads.safe_extract(archive, root)
        inner = [p for p in root.iterdir() if p.is_dir() and (p / "train").exists()]
        if inner:
            root = inner[0]
    if not (root / "train").exists():
        root = next(p.parent for p in Path(cache).glob("**/train") if p.is_dir())
    train = datasets.load("imagefolder", root, "train")
    proj = np.random.RandomState(0).standard_normal((192, 128)).astype(np.float32) / math.sqrt(192)
    rows = []
    for i in range(len(train)):
        a = np.asarray(train.image(i).resize((32, 32)), dtype=np.float32) / 255.0
        a -= a.mean(axis=(0, 1), keepdims=True)
        rows.append(a.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).reshape(-1))
    f = np.stack(rows) @ proj
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    np.savez(out, f=f.astype(np.float32), y=train.targets)
    return f.astype(np.float32), train.targets


# ---------------------------------------------------------------------------------------------- dense baselines
def dense_knn(f, lab, y_l, unl, c, k=200, t=0.1):
    import torch
    fl, fu = torch.from_numpy(f[lab]), torch.from_numpy(f[unl])
    top, idx = (fu @ fl.T).topk(min(k, len(lab)), dim=1)
    scores = torch.zeros(len(fu), c, dtype=torch.float64).scatter_add_(1, torch.from_numpy(y_l)[idx],
                                                                       torch.exp(top.double() / t))
    p = scores / scores.sum(1, keepdim=True)
    conf, pred = p.max(1)
    return pred.numpy(), conf.numpy()


def dense_spectral(f, lab, y_l, unl, c, k=20, m=200, t=1.0):
    import torch
    x = torch.from_numpy(f)
    n = len(x)
    top, idx = (x @ x.T).topk(k, dim=1)
    wt = torch.zeros(n, n).scatter_(1, idx, torch.exp(-5 * (1 - top)))
    w = (wt + wt.T) / 2
    del wt
    deg = w.sum(0).double()
    w.fill_diagonal_(0)
    dp = w.sum(1)
    s = w / dp.sqrt()[:, None] / dp.sqrt()[None, :]
    mu, u = torch.linalg.eigh(s.double())
    lam, u = (1 - mu).flip(0)[1:m], u.flip(1)[:, 1:m]  # the m smallest of L, the trivial one dropped
    lab, y_l = torch.from_numpy(lab), torch.from_numpy(y_l)
    seeds = torch.zeros(len(lab), c, dtype=torch.float64)
    dl = deg[lab]
    for cls in range(c):
        pos = y_l == cls
        r = dl[pos].sum() / dl[~pos].sum()
        sv = torch.where(pos, (dl / r).sqrt(), -(dl * r).sqrt())
        seeds[:, cls] = sv / sv.norm()
    z = u @ ((u[lab].T @ seeds) / lam.clamp_min(1e-4)[:, None])
    z = z * (math.sqrt(n) / z.norm(dim=0))
    z = z[torch.from_numpy(unl)]
    z -= z.max(1, keepdim=True).values
    top2 = z.topk(2, dim=1).values
    return z.argmax(1).numpy(), (1 - torch.exp(-(top2[:, 0] - top2[:, 1]) / t)).numpy()


# -------------------------------------------------------------------------------------------- one measurement
def child(cfg):
    import common  # noqa: F401  before torch, as in the scripts: the OpenMP wait policy
    import numpy as np
    import torch
    import faiss
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
        faiss.omp_set_num_threads(cfg["threads"])
    import metric_transfer as mt
    if cfg["data"] == "synthetic":
        f, y = synthetic(cfg["n"], cfg["blobs"])
    else:
        f, y = cifar_features(cfg["cache"])
        if cfg["n"] < len(f):
            keep = np.random.RandomState(0).choice(len(f), cfg["n"], replace=False)
            f, y = f[np.sort(keep)], y[np.sort(keep)]
    c = int(y.max()) + 1
    lab, unl = mt.reference_split(y, cfg["seeds"], c, 0)
    base = vm("VmRSS")
    t0, c0 = time.time(), time.process_time()
    if cfg["impl"] == "ours" and cfg["prop"] == "knn":
        pred, conf, _ = mt.knn_propagate(f, lab, y[lab], unl, c, keep_probs=False)
    elif cfg["impl"] == "ours":
        index = "flat" if len(f) <= 200_000 else "ivf"
        pred, conf, _, _ = mt.spectral_propagate(f, lab, y[lab], unl, c, index=index,
                                                 solver=cfg.get("solver", "filtered"), keep_probs=False)
    elif cfg["prop"] == "knn":
        pred, conf = dense_knn(f, lab, y[lab], unl, c)
    else:
        pred, conf = dense_spectral(f, lab, y[lab], unl, c)
    wall, cpu = time.time() - t0, time.process_time() - c0
    idx, labels, _, _ = mt.rank_by_confidence(unl, pred, conf)
    at, _, _ = mt.accuracy_by_ratio(labels, y[idx])
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_gb": vm("VmHWM"), "base_gb": base,
                      "acc_top20": at[0.2], "acc_all": at[1.0]}))


def topk_costs(threads, rows=4096, repeats=5):
    """kNN's per-row selection at ImageNet scale alone: the 200 largest of 13,000 seed similarities of `rows` queries
    of the synthetic features, by neighbors.topk, torch.topk and a direct np.argpartition, interleaved. The rows go in
    knn_propagate's cache-sized blocks (161 rows of 13,000)."""
    import common  # noqa: F401
    import numpy as np
    import torch
    from common import neighbors
    import metric_transfer as mt
    if threads > 0:
        torch.set_num_threads(threads)
    f, y = synthetic(200_000, 1000)
    lab, unl = mt.reference_split(y, 13000, 1000, 0)
    n, k = len(lab), 200
    step = (1 << 21) // n
    sims = [torch.from_numpy(f[unl[s:s + step]]) @ torch.from_numpy(f[lab]).T for s in range(0, rows, step)]
    ways = {"neighbors.topk": lambda sim: neighbors.topk(sim, k),
            "torch.topk": lambda sim: sim.topk(k, dim=1, sorted=False).indices,
            "np.argpartition": lambda sim: torch.from_numpy(np.argpartition(sim.numpy(), n - k, axis=1)[:, n - k:])}
    for name, way in ways.items():  # warm up, and check that the three agree
        got = way(sims[0])
        assert torch.equal(sims[0].gather(1, got).sort(1).values, sims[0].topk(k, dim=1).values.sort(1).values), name
    spent = dict.fromkeys(ways, 0.0)
    for _ in range(repeats):
        for name, way in ways.items():
            t = time.perf_counter()
            for sim in sims:
                way(sim)
            spent[name] += time.perf_counter() - t
    print(f"top {k} of {n} columns, {rows} rows in blocks of {step}, {threads or 'all'} thread(s), mean of {repeats}:")
    for name, total in spent.items():
        print(f"  {name:18s} {1000 * total / repeats:7.1f} ms  x{total / spent['neighbors.topk']:.2f}")


def measure(cfg, timeout, busy=0):
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    if cfg["threads"] > 0:
        env["OMP_NUM_THREADS"] = str(cfg["threads"])
    try:
        with busy_cores(busy):
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per measurement; 0: as the scripts, every core allowed (default: 1)")
    ap.add_argument("--busy", type=int, default=0,
                    help="also measure ours with this many cores kept busy by other processes, and print the ratio "
                         "of loaded to idle wall time")
    ap.add_argument("--cache", default="/tmp/mt_bench", help="where the CIFAR-10 features are cached")
    ap.add_argument("--dense_n", type=int, default=5000, help="points of the dense spectral comparison")
    ap.add_argument("--imagenet", action="store_true",
                    help="also kNN at ImageNet scale (1,281,167 x 128, 13,000 seeds)")
    ap.add_argument("--imagenet_spectral", action="store_true", help="also spectral at ImageNet scale")
    ap.add_argument("--eigsh", action="store_true", help="also spectral with scipy eigsh (the reference's solver)")
    ap.add_argument("--only", default=None, help="run only the rows whose label contains this text")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    ap.add_argument("--topk", action="store_true", help="only time kNN's top-200 selection at ImageNet scale")
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.topk:
        return topk_costs(args.threads)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    base = {"threads": args.threads, "cache": args.cache}
    rows = []
    for data in ("synthetic", "cifar10"):
        s = {"data": data, "n": 50_000, "blobs": 10, "seeds": 250}
        rows += [(f"{data} 50k knn ours", {**s, "impl": "ours", "prop": "knn"}),
                 (f"{data} 50k knn dense", {**s, "impl": "dense", "prop": "knn"}),
                 (f"{data} 50k spectral ours", {**s, "impl": "ours", "prop": "spectral"})]
        if args.eigsh:
            rows.append((f"{data} 50k spectral ours-eigsh",
                         {**s, "impl": "ours", "prop": "spectral", "solver": "eigsh"}))
        small = {**s, "n": args.dense_n}
        rows += [(f"{data} {args.dense_n // 1000}k spectral ours", {**small, "impl": "ours", "prop": "spectral"}),
                 (f"{data} {args.dense_n // 1000}k spectral dense", {**small, "impl": "dense", "prop": "spectral"})]
    if args.imagenet or args.imagenet_spectral:
        s = {"data": "synthetic", "n": 1_281_167, "blobs": 1000, "seeds": 13000}
        if args.imagenet:
            rows.append(("synthetic 1.28M knn ours", {**s, "impl": "ours", "prop": "knn"}))
        if args.imagenet_spectral:
            rows.append(("synthetic 1.28M spectral ours", {**s, "impl": "ours", "prop": "spectral"}))
    if args.only:
        rows = [r for r in rows if args.only in r[0]]
    print(f"{'measurement':34s} {'wall s':>8s} {'cpu s':>8s} {'peak GB':>8s} {'base GB':>8s} "
          f"{'acc@20%':>8s} {'acc all':>8s}", flush=True)
    results = {}
    if args.busy:  # each of ours again under load, right after its idle measurement
        loaded = []
        for label, cfg in rows:
            loaded.append((label, cfg))
            if label.endswith("ours"):
                loaded.append((f"{label} busy", {**cfg, "busy": args.busy}))
        rows = loaded
    for label, cfg in rows:
        r = measure({**base, **cfg}, args.timeout, cfg.get("busy", 0))
        results[label] = r
        if "error" in r:
            print(f"{label:34s} {r['error']}", flush=True)
        else:
            print(f"{label:34s} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_gb']:8.2f} {r['base_gb']:8.2f} "
                  f"{r['acc_top20']:8.2f} {r['acc_all']:8.2f}", flush=True)
    print("\nratios (dense / ours, wall time; peak memory):")
    for label in results:
        if label.endswith("dense"):
            ours = label[:-len("dense")] + "ours"
            a, b = results[label], results.get(ours, {})
            if "wall_s" in a and "wall_s" in b:
                print(f"  {label[:-6]:30s} time x{a['wall_s'] / b['wall_s']:.2f} (cpu x{a['cpu_s'] / b['cpu_s']:.2f})  "
                      f"memory x{a['peak_gb'] / b['peak_gb']:.2f}")
    if args.busy:
        print(f"\nloaded ({args.busy} core(s) busy) / idle wall time:")
        for label in results:
            a, b = results[label], results.get(f"{label} busy", {})
            if "wall_s" in a and "wall_s" in b:
                print(f"  {label:30s} x{b['wall_s'] / a['wall_s']:.2f}")
    print("\ntargets: kNN 50k <= 1 s and <= 0.5x dense; kNN 1.28M <= 60 s; spectral 50k <= 15 s, <= 2 GB and "
          ">= 96.5 % on the top 20 % (synthetic); spectral 1.28M <= 15 min")
    for label, limit, mem, acc in (("synthetic 50k knn ours", 1, None, None), ("cifar10 50k knn ours", 1, None, None),
                                   ("synthetic 1.28M knn ours", 60, None, None),
                                   ("synthetic 50k spectral ours", 15, 2, 96.5),
                                   ("cifar10 50k spectral ours", 15, 2, None),
                                   ("synthetic 1.28M spectral ours", 900, None, None)):
        r, dense = results.get(label), results.get(label[:-len("ours")] + "dense", {})
        if r and "wall_s" in r:
            ok = (r["wall_s"] <= limit and (mem is None or r["peak_gb"] <= mem)
                  and (acc is None or r["acc_top20"] >= acc)
                  and ("wall_s" not in dense or "knn" not in label or r["wall_s"] <= 0.5 * dense["wall_s"]))
            print(f"  {label:30s} {r['wall_s']:.1f} s, {r['peak_gb']:.2f} GB: {'met' if ok else 'NOT met'}")

if __name__ == "__main__":
    main()
