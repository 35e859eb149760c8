"""Nearest neighbours with faiss, for every script: one GPU policy, exact (flat) or inverted-file (IVF) indexes for
inner product or squared L2, and searches in chunks of queries so that memory stays bounded.

    index = neighbors.flat_index(x, "l2", gpu=neighbors.use_gpu(device))     # exact
    index = neighbors.ivf_index(x, "ip", nlist=..., nprobe=..., train_size=...)  # approximate, for millions of rows
    D, I = neighbors.search(index, queries, k)                  # all rows at once
    for start, D, I in neighbors.search_chunks(index, queries, k):   # or chunk by chunk, for callers that stream
    ids = neighbors.topk(scores, k)       # exact top-k columns of each row of a score matrix already computed

D holds squared L2 distances (ascending) or inner products (descending); where an IVF index finds fewer than k rows,
I is -1 and D is +-3.4e38 (faiss' convention). The method math on top (weights, densities, self-exclusion) stays in
the scripts; so do the IVF settings, which each script passes at its call site.
"""
import math

import numpy as np

CHUNK = 65536  # queries per faiss search call: 65,536 x k results at a time
GPU_MAX_K = 2048  # faiss' GPU selection returns at most this many neighbours per query (GPU_MAX_SELECTION_K)
METRICS = ("l2", "ip")

_gpu_resources = None


def _faiss():
    import faiss  # imported on first use: it costs a second or two, and many runs never search
    return faiss


def use_gpu(device):
    """The one policy: search on the GPU iff `device` is a CUDA device, the installed faiss has GPU support and it
    sees a GPU."""
    import torch
    if torch.device(device).type != "cuda":
        return False
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def gpu_resources():
    """The process's one faiss `StandardGpuResources` (scratch memory, streams), made on first use."""
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = _faiss().StandardGpuResources()
    return _gpu_resources


def _rows(x):
    return np.ascontiguousarray(x, dtype=np.float32)


def _metric(faiss, metric):
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: choose one of {METRICS}")
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _to_gpu(index):
    import torch
    return _faiss().index_cpu_to_gpu(gpu_resources(), torch.cuda.current_device(), index)


def flat_index(x, metric, gpu=False):
    """Exact index over the rows of x: squared L2 ("l2") or inner product ("ip"); on the current GPU when asked."""
    faiss = _faiss()
    x = _rows(x)
    index = faiss.IndexFlat(x.shape[1], _metric(faiss, metric))
    if gpu:
        index = _to_gpu(index)
    index.add(x)
    return index


def ivf_index(x, metric, nlist, nprobe, train_size, sample_seed=0, kmeans_iters=None, kmeans_seed=None,
              min_points_per_centroid=None, gpu=False):
    """Inverted-file index (IndexIVFFlat) over the rows of x: `nlist` lists (at least 1) from a k-means of
    `train_size` rows drawn without replacement (`RandomState(sample_seed).permutation(N)[:train_size]`), `nprobe`
    lists visited per query. The k-means settings left None keep faiss' defaults (25 rounds, seed 1234, 39 points
    per centroid). Trained on the CPU, then moved to the current GPU when asked."""
    faiss = _faiss()
    x = _rows(x)
    n, dim = x.shape
    nlist = max(1, int(nlist))
    m = _metric(faiss, metric)
    index = faiss.IndexIVFFlat(faiss.IndexFlat(dim, m), dim, nlist, m)
    if kmeans_iters is not None:
        index.cp.niter = kmeans_iters
    if kmeans_seed is not None:
        index.cp.seed = kmeans_seed
    if min_points_per_centroid is not None:
        index.cp.min_points_per_centroid = min_points_per_centroid
    index.train(x[np.random.RandomState(sample_seed).permutation(n)[:min(n, int(train_size))]])
    index.nprobe = min(int(nprobe), nlist)
    if gpu:
        index = _to_gpu(index)
    index.add(x)
    return index


def search_chunks(index, queries, k, chunk=CHUNK):
    """Yield (start, D, I) for each chunk of `chunk` queries: the k nearest rows of the index for queries[start:].
    A GPU index asked for more than GPU_MAX_K neighbours is searched on the CPU instead."""
    faiss = _faiss()
    if k > GPU_MAX_K and hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex):
        index = faiss.index_gpu_to_cpu(index)
    for start in range(0, len(queries), chunk):
        D, I = index.search(_rows(queries[start:start + chunk]), k)
        yield start, D, I


def search(index, queries, k, chunk=CHUNK):
    """(D float32 [len(queries), k], I int64 [len(queries), k]) of the k nearest rows, searched chunk by chunk."""
    D = np.empty((len(queries), k), dtype=np.float32)
    I = np.empty((len(queries), k), dtype=np.int64)
    for start, d, i in search_chunks(index, queries, k, chunk):
        D[start:start + len(d)], I[start:start + len(d)] = d, i
    return D, I


def topk(scores, k):
    """Column ids (rows, k) of the k largest entries of each row of a 2-D float tensor, in no order: a top-k as
    `scores.topk(k, dim=1, sorted=False).indices`, equal to it up to the choice among tied values.

    On the CPU, numpy's argpartition is 3x faster than torch.topk on a cache-sized block, but runs on one core; here
    it only sorts two narrow slices, and the rest runs on every core (`benchmarks/propagation.py --topk`: 1.1x a
    direct argpartition on one thread, 1.3x on two). The columns are dealt into g = N // c interleaved
    groups (column j into group j % g). The k groups with the largest maxima hold a top-k of the row: they hold k
    group maxima, and every entry outside them is at most its own group's maximum, itself at most each of those k.
    So the answer is the top k of their k * c entries and the N - g * c columns left over; c ~ sqrt(N / k) makes the
    two sorts the same width."""
    import torch
    rows, n = scores.shape
    if k >= n:
        return torch.arange(n, device=scores.device).expand(rows, n)
    if scores.device.type != "cpu":
        return scores.topk(k, dim=1, sorted=False).indices
    c = int(math.sqrt(n / k))
    if c < 2:
        return _top_columns(scores, k)
    g = n // c
    maxima = scores[:, :g * c].view(rows, c, g).amax(1)
    best = _top_columns(maxima, k)
    cand = (best[:, None, :] + g * torch.arange(c)[None, :, None]).reshape(rows, k * c)
    if g * c < n:
        cand = torch.cat([cand, torch.arange(g * c, n).expand(rows, n - g * c)], 1)
    return cand.gather(1, _top_columns(scores.gather(1, cand), k))


def _top_columns(x, k):
    import torch
    n = x.shape[1]
    return torch.from_numpy(np.argpartition(x.numpy(), n - k, axis=1)[:, n - k:])
