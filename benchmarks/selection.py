"""Wall time and peak memory of USL selection (kNN density, k-means, regularised selection), usl.py against a plain
PyTorch implementation of the same algorithm as the reference writes it (chunked exact kNN, dense Lloyd k-means with
explicit sum((x - c)^2) distances, the explicit selection), both from the same k-means initialisation.

Every measurement runs in a fresh subprocess (peak memory = resource.getrusage maxrss of that process, which
includes the features it holds). The machine's other load makes absolute seconds noisy; compare the ratios.

    python benchmarks/selection.py                          # CIFAR scale: synthetic + real, budgets 40 and 400
    python benchmarks/selection.py --scale imagenet         # 1,281,167 x 128, budget 2,911 (usl.py only)
    python benchmarks/selection.py --data synthetic --budgets 40 --threads 2
    python benchmarks/selection.py --data synthetic --no_plain --threads 0 --busy 1   # idle vs one core kept busy

Data: synthetic = 10 (CIFAR) or 1,000 (ImageNet) Gaussian blobs on the 128-d unit sphere, uneven sizes; real =
features of the 50,000 CIFAR-10 training JPEGs of ../shared/data/cifar10-jpeg.tar.gz from a fixed network
(torchvision ResNet-18, random init with seed 0, 32 px, pooled 512-d -> fixed Gaussian projection to 128-d -> L2
norm), cached in --cache.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from busy import busy_cores

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_TAR = REPO.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'


# ----------------------------------------------------------------------------------------------------------- data
def synthetic(n, blobs, dim=128, seed=0, spread=0.35):
    """float32 (n, dim) unit vectors around `blobs` random centres, blob sizes uneven (Dirichlet)."""
    rng = np.random.RandomState(seed)
    centres = rng.randn(blobs, dim).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = rng.multinomial(n, rng.dirichlet(np.full(blobs, 5.0)))
    x = np.empty((n, dim), dtype=np.float32)
    a = 0
    for b, m in enumerate(sizes):
        x[a:a + m] = centres[b] + rng.randn(m, dim).astype(np.float32) * (spread / np.sqrt(dim))
        a += m
    x = x[rng.permutation(n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def real_cifar_features(cache_dir):
    """Features of the CIFAR-10 JPEG training images from a fixed random network (see the module doc)."""
    out = Path(cache_dir) / 'cifar10_jpeg_resnet18_seed0_128.npy'
    if out.exists():
        return np.load(out)
    import torch
    import torchvision
    from common import datasets, download as downloads, loaders
    folder = Path(cache_dir) / 'cifar10-jpeg'
    if not (folder / 'train').is_dir():
        if not SHARED_TAR.exists():
            raise SystemExit(f'{SHARED_TAR} not found: run with --data synthetic')
        folder.mkdir(parents=True, exist_ok=True)
        downloads.safe_extract(SHARED_TAR, folder)
    if not (folder / 'train').is_dir():  # the archive may hold one top folder
        folder = next(p.parent for p in folder.rglob('train') if p.is_dir())
    train = datasets.load('imagefolder', folder, 'train')
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.eval()
    proj = torch.randn(512, 128, generator=torch.Generator().manual_seed(0)) / np.sqrt(512)
    import torchvision.transforms as T
    train.transform = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = loaders.eval_loader(train, 500, workers=0)
    feats = []
    with torch.no_grad():
        for x, _, _ in loader:
            feats.append(torch.nn.functional.normalize(net(x) @ proj, dim=1))
    x = torch.cat(feats).numpy().astype(np.float32)
    np.save(out, x)
    np.save(Path(cache_dir) / 'cifar10_jpeg_targets.npy', train.targets)
    return x


# ---------------------------------------------------------------------------------------- plain PyTorch (reference)
def plain_knn(x, k, chunk=1024):
    """Exact kNN as the reference computes it (KeOps Kmin_argKmin), written plainly: squared distances chunked over
    queries and database blocks with a running top-k merge."""
    import torch
    x = torch.from_numpy(x)
    n = len(x)
    d_out = torch.empty(n, k)
    for a in range(0, n, chunk):
        q = x[a:a + chunk]
        best = None
        for b in range(0, n, 8192):
            d = torch.cdist(q, x[b:b + 8192]).pow_(2)
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k, cand.shape[1]), dim=1, largest=False).values
        d_out[a:a + chunk] = best
    return d_out.numpy()


def plain_kmeans(x, k, iters, init, distance='explicit'):
    """nn_utils.KMeans: Lloyd in torch, all `iters` rounds, scatter_add_ means. `explicit` evaluates sum((x - c)^2)
    as the reference does (its dense path for k <= 40 and its KeOps reduction above both compute this form), chunked
    to ~64 MB; `cdist` is the faster matrix-product form, whose rounding decides near-ties differently. An empty
    cluster's NaN centroid is never chosen (KeOps semantics; the reference's dense argmin would move every point into
    it)."""
    import torch
    x = torch.from_numpy(x)
    n, dim = x.shape
    c = x[torch.from_numpy(init)].clone()
    cl = torch.empty(n, dtype=torch.long)
    rows = max(1, 2 ** 24 // (k * dim))
    for _ in range(iters):
        for a in range(0, n, rows):
            q = x[a:a + rows]
            d = ((q[:, None, :] - c[None]) ** 2).sum(-1) if distance == 'explicit' else torch.cdist(q, c)
            cl[a:a + rows] = torch.nan_to_num(d, nan=float('inf')).argmin(1)
        c.zero_()
        c.scatter_add_(0, cl[:, None].repeat(1, dim), x)
        c /= torch.bincount(cl, minlength=k).type_as(c).view(k, 1)
    return cl.numpy()


def plain_select(x, mean_dist, labels, budget, iters, w, momentum, horizon, alpha, chunk=512):
    """nn_utils.get_selection_with_reg, with the N x M x D difference tensor chunked over N (the reference holds it
    whole: 10 GB at 50k x 400)."""
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(x)
    labels = torch.from_numpy(labels)
    neighbors_dist = torch.from_numpy(mean_dist)
    reg = torch.zeros_like(neighbors_dist)
    mask = F.one_hot(labels, num_classes=budget)
    selected = []
    for _ in range(iters):
        selected = []
        for m in range(budget):
            match = torch.where(labels == m)[0]
            if len(match) == 0:
                continue
            scores = 1 / neighbors_dist[match] - w * reg[match]
            selected.append(int(match[scores.argmax()]))
        sel = x[selected]
        r = torch.empty(len(x))
        for a in range(0, len(x), chunk):
            d = ((x[a:a + chunk, None, :] - sel[None]) ** 2).sum(-1)
            mk = mask[a:a + chunk]
            d = (1 - mk) * d + mk * 1e10
            d[d >= horizon] = 1e10
            r[a:a + chunk] = (1 / d ** alpha).sum(1)
        reg = reg * momentum + r * (1 - momentum)
    return np.array(selected)


# ------------------------------------------------------------------------------------------------------ one child
def child(spec):
    import common  # noqa: F401  before torch, as in the scripts: the OpenMP wait policy
    import torch
    import faiss
    if spec['threads'] > 0:
        torch.set_num_threads(spec['threads'])
        faiss.omp_set_num_threads(spec['threads'])
    import usl
    from common import neighbors
    if spec['data'] == 'synthetic':
        x = synthetic(spec['n'], spec['blobs'])
    else:
        x = real_cifar_features(spec['cache'])
    budget, impl = spec['budget'], spec['impl']
    init = usl.kmeans_init(len(x), budget, spec['seed'])
    t = {}
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru.ru_utime + ru.ru_stime
    t0 = time.time()
    if impl == 'usl':
        index = 'flat' if len(x) <= usl.FLAT_KNN_MAX else 'ivf'
        d, _ = usl.knn_distances(x, spec['knn_k'], index, spec['nprobe'], log=lambda s: None)
        mean_dist = usl.density_mean_dist(d).numpy()
        t['knn_s'] = time.time() - t0
        t0 = time.time()
        labels, _, rounds = usl.kmeans(x, budget, spec['kmeans_iters'], init=init)
        t['kmeans_s'] = time.time() - t0
        t['kmeans_rounds'] = rounds
        t0 = time.time()
        picks, _ = usl.usl_select(torch.from_numpy(x), mean_dist, labels, budget, budget, spec['mode'],
                                  spec['reg_iters'], spec['lam'], spec['momentum'], spec['alpha'],
                                  horizon=spec.get('horizon'), horizon_num=spec.get('horizon_num', 128))
        t['select_s'] = time.time() - t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        t['cpu_s'] = ru.ru_utime + ru.ru_stime - cpu0
        t['peak_gb'] = ru.ru_maxrss / 2 ** 20
        if spec.get('recall') and index == 'ivf':  # after the peak is read: the exact check holds a second copy
            q = np.random.RandomState(0).permutation(len(x))[:2000]
            de, _ = neighbors.search(neighbors.flat_index(x, 'l2'), x[q], spec['knn_k'])
            t['knn_mean_dist_rel_err'] = float(np.median(np.abs(d[q].mean(1) - np.maximum(de, 0).mean(1))
                                                         / np.maximum(de, 0).mean(1)))
    else:
        d = plain_knn(x, spec['knn_k'])
        mean_dist = d.mean(1).astype(np.float32)
        t['knn_s'] = time.time() - t0
        t0 = time.time()
        labels = plain_kmeans(x, budget, spec['kmeans_iters'], init, spec['plain_distance'])
        t['kmeans_s'] = time.time() - t0
        t0 = time.time()
        picks = plain_select(x, mean_dist, labels, budget, spec['reg_iters'], spec['lam'], spec['momentum'],
                             spec['horizon'], spec['alpha'])
        t['select_s'] = time.time() - t0
    t['total_s'] = t['knn_s'] + t['kmeans_s'] + t['select_s']
    t.setdefault('peak_gb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    if 'cpu_s' not in t:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        t['cpu_s'] = ru.ru_utime + ru.ru_stime - cpu0
    t['picks'] = [int(i) for i in picks]
    print('RESULT ' + json.dumps(t))


def measure(spec, busy=0):
    env = dict(os.environ)
    if spec['threads'] > 0:
        env.update(OMP_NUM_THREADS=str(spec['threads']), MKL_NUM_THREADS=str(spec['threads']))
    with busy_cores(busy):
        return _measure(spec, env)


def _measure(spec, env):
    proc = subprocess.run([sys.executable, __file__, '--child', json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode != 0 or not line:
        raise SystemExit(f'measurement failed: {spec}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}')
    return json.loads(line[0][7:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--scale', default='cifar', choices=['cifar', 'imagenet', 'all'])
    p.add_argument('--data', default='both', choices=['synthetic', 'real', 'both'])
    p.add_argument('--budgets', type=int, nargs='+', default=[40, 400], help='CIFAR-scale budgets')
    p.add_argument('--threads', type=int, default=1,
                   help='threads for torch and faiss in each measurement; 0: as the scripts, every core allowed')
    p.add_argument('--busy', type=int, default=0,
                   help='also measure usl.py with this many cores kept busy by other processes, and print the '
                        'ratio of loaded to idle wall time')
    p.add_argument('--kmeans_iters', type=int, default=200, help='Lloyd iterations at CIFAR scale (reference 200)')
    p.add_argument('--reg_iters', type=int, default=10, help='selection passes at CIFAR scale (reference 10)')
    p.add_argument('--no_plain', action='store_true', help='skip the plain implementation')
    p.add_argument('--plain_distance', default='explicit', choices=['explicit', 'cdist'],
                   help="k-means distances of the plain version: the reference's explicit form, or torch.cdist")
    p.add_argument('--nprobe', type=int, default=8, help='ivf lists visited per query at ImageNet scale')
    p.add_argument('--cache', default=str(REPO / 'runs' / 'bench_cache'), help='where real features are kept')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(json.loads(a.child))
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    if a.scale != 'imagenet' and a.data != 'synthetic':
        t = time.time()
        real_cifar_features(a.cache)  # once, outside the measurements
        print(f'real CIFAR-10 features ready ({time.time() - t:.0f} s)', flush=True)
    rows = []
    if a.scale in ('cifar', 'all'):
        for data in (['synthetic', 'real'] if a.data == 'both' else [a.data]):
            for budget in a.budgets:
                # the CIFAR-10 config for 40, the CIFAR-100 one for 400 (lambda 1, alpha 1, horizon 1)
                hp = dict(lam=0.5, momentum=0.9, alpha=0.5, horizon=4.0) if budget <= 100 else \
                    dict(lam=1.0, momentum=0.9, alpha=1.0, horizon=1.0)
                spec = dict(data=data, n=50000, blobs=10, budget=budget, knn_k=400, kmeans_iters=a.kmeans_iters,
                            reg_iters=a.reg_iters, mode='cifar', seed=1, nprobe=8, threads=a.threads,
                            plain_distance=a.plain_distance, cache=a.cache, **hp)
                ours = measure({**spec, 'impl': 'usl'})
                line = {'scale': 'cifar', 'data': data, 'budget': budget, 'usl': ours}
                if a.busy:
                    line.update(busy=a.busy, usl_busy=measure({**spec, 'impl': 'usl'}, a.busy))
                if not a.no_plain:
                    plain = measure({**spec, 'impl': 'plain'})
                    same = len(set(ours['picks']) & set(plain['picks'])) / budget
                    line.update(plain=plain, speedup=plain['total_s'] / ours['total_s'], identical_picks=same)
                rows.append(line)
                report(line)
    if a.scale in ('imagenet', 'all'):
        spec = dict(data='synthetic', n=1281167, blobs=1000, budget=2911, knn_k=20, kmeans_iters=100, reg_iters=2,
                    mode='imagenet', lam=1.5, momentum=0.0, alpha=0.5, horizon_num=128, seed=0, nprobe=a.nprobe,
                    threads=a.threads, cache=a.cache, recall=True)
        line = {'scale': 'imagenet', 'data': 'synthetic', 'budget': 2911, 'usl': measure({**spec, 'impl': 'usl'})}
        if a.busy:
            line.update(busy=a.busy, usl_busy=measure({**spec, 'impl': 'usl'}, a.busy))
        rows.append(line)
        report(line)
    out = Path(a.cache) / 'selection_results.json'
    out.write_text(json.dumps(rows, indent=1))
    print(f'results: {out}')
    targets(rows)


def targets(rows):
    """Each row against its target: CIFAR scale >= 30x the plain version at budget 40 and >= 100x at budget 400 with
    identical picks; ImageNet scale <= 10 minutes and <= 8 GB."""
    print('\ntargets: CIFAR scale >= 30x plain at budget 40, >= 100x at budget 400, identical picks; '
          'ImageNet scale <= 600 s and <= 8 GB')
    for line in rows:
        name = f"{line['scale']} {line['data']} budget {line['budget']}"
        if line['scale'] == 'imagenet':
            u = line['usl']
            ok = u['total_s'] <= 600 and u['peak_gb'] <= 8
            print(f"  {name:32s} {u['total_s']:.0f} s, {u['peak_gb']:.2f} GB: {'met' if ok else 'NOT met'}")
        elif 'speedup' in line:
            need = 30 if line['budget'] <= 100 else 100
            ok = line['speedup'] >= need and line['identical_picks'] == 1
            print(f"  {name:32s} {line['speedup']:.1f}x (>= {need}x), identical picks "
                  f"{100 * line['identical_picks']:.1f}%: {'met' if ok else 'NOT met'}")


def report(line):
    def stages(r):
        cpu = f", CPU {r['cpu_s']:.0f}s" if 'cpu_s' in r else ''
        return (f"kNN {r['knn_s']:.1f}s k-means {r['kmeans_s']:.1f}s select {r['select_s']:.1f}s = "
                f"{r['total_s']:.1f}s wall{cpu}, peak {r['peak_gb']:.2f} GB")
    print(f"[{line['scale']} {line['data']} budget {line['budget']}] usl.py: {stages(line['usl'])}"
          + (f" (k-means rounds {line['usl'].get('kmeans_rounds')})" if 'kmeans_rounds' in line['usl'] else '')
          + (f", ivf mean-distance median rel. error {line['usl']['knn_mean_dist_rel_err']:.2e}"
             if 'knn_mean_dist_rel_err' in line['usl'] else ''), flush=True)
    if 'usl_busy' in line:
        b, u = line['usl_busy'], line['usl']
        print(f"    usl.py, {line['busy']} core(s) busy: {stages(b)}\n"
              f"    loaded / idle wall time {b['total_s'] / u['total_s']:.2f}x (kNN {b['knn_s'] / u['knn_s']:.2f}x, k-means {b['kmeans_s'] / u['kmeans_s']:.2f}x, "
              f"select {b['select_s'] / u['select_s']:.2f}x)", flush=True)
    if 'plain' in line:
        print(f"    plain torch: {stages(line['plain'])}\n    speed-up {line['speedup']:.1f}x, identical picks "
              f"{100 * line['identical_picks']:.1f}%", flush=True)


if __name__ == '__main__':
    main()
