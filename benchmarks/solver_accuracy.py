"""Accuracy (not speed) of two numerical shortcuts, against an exact computation on the same inputs.

    python benchmarks/solver_accuracy.py                  # both, about 15 minutes on 2 CPU cores (float64 convs)
    python benchmarks/solver_accuracy.py --only eigs      # or --only meta

eigs: metric_transfer.py's Laplacian eigensolvers. The 200 smallest eigenvalues of the normalised Laplacian of a
  20-NN graph (the spectral propagation's problem) on N points, by the default Chebyshev-filtered block iteration
  (`--eig_solver filtered`, residual tolerance 1e-2) and by ARPACK (`--eig_solver eigsh`, tol 1e-2 as the
  reference), against a dense float64 eigh of the same matrix. Inputs: Gaussian blobs on the unit sphere (as
  benchmarks/propagation.py's synthetic features) and scikit-learn's embedded digits (64 pixels per image).
meta: metasemi.py's finite-difference meta-gradient (`--meta_grad fd`, global step 0.01) against the exact
  Jacobian-vector product (`--meta_grad jvp`) on ConvLarge (LeakyReLU, max-pool, BN), digits at 32 px, 100 labeled
  and 100 unlabeled images per batch, random initialisation; relative error
  ||g_fd - g_jvp|| / ||g_jvp|| over 5 batches, in float32 at the default and at a 10x smaller step, and in float64
  at the default (the error of the difference quotient itself: the step crosses LeakyReLU/max-pool kinks).
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402,F401  before torch, as in the scripts: the OpenMP wait policy
import numpy as np  # noqa: E402
import torch  # noqa: E402


def blobs(n, k=10, d=128, seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.standard_normal((k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    f = centers[rng.randint(k, size=n)] + (3 / np.sqrt(d)) * rng.standard_normal((n, d))
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def digits_pixels():
    from common import datasets
    train = datasets.load("digits", None, "train")
    x = np.stack([np.asarray(train.image(i).convert("L").resize((8, 8)), np.float32).ravel() for i in range(len(train))])
    x -= x.mean(0)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def eigs(n):
    import metric_transfer as mt
    print("eigs: 200 smallest eigenvalues of the normalised Laplacian of a 20-NN graph, vs a dense float64 eigh")
    print(f"{'input':<22} {'solver':<9} {'max |dlambda|':>13} {'median':>9} {'seconds':>8}")
    for name, f in ((f"blobs, {n} points", blobs(n)), ("digits, 1,497 points", digits_pixels())):
        W = mt.knn_graph(f, 20)
        exact, _ = mt.smallest_laplacian_eigs(W, 200, dense_below=len(f) + 1)
        for solver in ("filtered", "eigsh"):
            t = time.perf_counter()
            lam, _ = mt.smallest_laplacian_eigs(W, 200, solver, dense_below=0)
            t = time.perf_counter() - t
            err = np.abs(lam - exact)
            print(f"{name:<22} {solver:<9} {err.max():13.2e} {np.median(err):9.2e} {t:8.1f}")


def meta(batches=5):
    import metasemi as M
    from common import backbones, datasets
    train = datasets.load("digits", None, "train")
    mean, std = datasets.MEAN_STD["digits"]
    x = torch.stack([torch.from_numpy(np.asarray(train.image(i), np.float32) / 255).permute(2, 0, 1)
                     for i in range(len(train))])
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    y = torch.as_tensor(train.targets)
    torch.manual_seed(0)
    net = M.Classifier(backbones.build("convlarge"), 10)
    print(f"meta: relative error of the finite-difference meta-gradient against the exact JVP ({batches} batches)")
    print(f"{'network':<26} {'dtype':<8} {'step':>6} {'median':>9} {'max':>9}")
    for dtype in (torch.float32, torch.float64):
        model = net.to(dtype)
        for step in ((0.01, 0.001) if dtype == torch.float32 else (0.01,)):
            g = torch.Generator().manual_seed(1)
            errs = []
            for _ in range(batches):
                il, iu = torch.randint(len(x), (100,), generator=g), torch.randint(len(x), (100,), generator=g)
                xl, xu = x[il].to(dtype), x[iu].to(dtype)
                _, g_f, _ = M.meta_direction(model, xl, y[il], xu, epsilon=step, meta_grad="fd")
                _, g_j, _ = M.meta_direction(model, xl, y[il], xu, meta_grad="jvp")
                errs.append(((g_f - g_j).norm() / g_j.norm()).item())
            print(f"{'ConvLarge, random init':<26} {str(dtype)[6:]:<8} {step:6.3f} {np.median(errs):9.2e} "
                  f"{max(errs):9.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["eigs", "meta"], default=None)
    p.add_argument("--points", type=int, default=5000, help="blob points of the eigensolver check")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.only in (None, "eigs"):
        eigs(args.points)
    if args.only in (None, "meta"):
        meta()


if __name__ == "__main__":
    main()
