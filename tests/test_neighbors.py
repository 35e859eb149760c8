"""common.neighbors: exact search against brute force, chunks, IVF on clustered data, the GPU policy."""
import types

import numpy as np
import pytest
import torch

from common import neighbors


def brute_force(db, queries, k, metric):
    """The k nearest rows by an explicit torch computation: squared L2 ascending, or inner product descending."""
    db, q = torch.from_numpy(db).double(), torch.from_numpy(queries).double()
    if metric == "l2":
        score = ((q[:, None] - db[None]) ** 2).sum(-1)
        d, i = score.topk(k, dim=1, largest=False)
    else:
        d, i = (q @ db.T).topk(k, dim=1)
    return d.numpy(), i.numpy()


@pytest.fixture(scope="module")
def points():
    rng = np.random.RandomState(0)
    return rng.randn(300, 6).astype(np.float32), rng.randn(70, 6).astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_exact_search_equals_brute_force(points, metric):
    db, queries = points
    D, I = neighbors.search(neighbors.flat_index(db, metric), queries, 7)
    d, i = brute_force(db, queries, 7, metric)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (70, 7)
    assert (I == i).all()  # random Gaussian data: no ties
    np.testing.assert_allclose(D, d, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_chunked_search_equals_one_search(points, metric):
    db, queries = points
    index = neighbors.flat_index(db, metric)
    D, I = neighbors.search(index, queries, 5)
    D3, I3 = neighbors.search(index, queries, 5, chunk=3)  # 70 queries: 23 chunks of 3 and one of 1
    assert np.array_equal(D, D3) and np.array_equal(I, I3)
    chunks = list(neighbors.search_chunks(index, queries, 5, chunk=32))
    assert [s for s, _, _ in chunks] == [0, 32, 64] and [len(d) for _, d, _ in chunks] == [32, 32, 6]
    assert np.array_equal(np.concatenate([d for _, d, _ in chunks]), D)
    assert np.array_equal(np.concatenate([i for _, _, i in chunks]), I)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ivf_finds_the_exact_neighbours_of_clustered_data(metric):
    # 8 tight clusters of 100 points on the unit sphere: each point's 5 nearest lie in its own cluster, which one
    # probed list holds whole
    rng = np.random.RandomState(1)
    centres = rng.randn(8, 16).astype(np.float32)
    x = np.repeat(centres, 100, axis=0) + 0.01 * rng.randn(800, 16).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = neighbors.ivf_index(x, metric, nlist=8, nprobe=2, train_size=400, kmeans_iters=10, kmeans_seed=3,
                                min_points_per_centroid=1)
    assert index.nlist == 8 and index.nprobe == 2 and index.ntotal == 800
    D, I = neighbors.search(index, x[::10], 5)
    assert D.shape == I.shape == (80, 5) and (I >= 0).all()
    exact_D, exact_I = neighbors.search(neighbors.flat_index(x, metric), x[::10], 5)
    assert (np.sort(I, 1) == np.sort(exact_I, 1)).all()
    np.testing.assert_allclose(D, exact_D, rtol=1e-5, atol=1e-5)
    # nprobe is capped at the number of lists
    assert neighbors.ivf_index(x, metric, nlist=4, nprobe=100, train_size=800).nprobe == 4


def test_a_metric_outside_the_two_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        neighbors.flat_index(np.zeros((2, 2), np.float32), "cosine")


def test_use_gpu_needs_a_cuda_device_and_a_faiss_that_sees_a_gpu(monkeypatch):
    assert neighbors.use_gpu(torch.device("cpu")) is False and neighbors.use_gpu("cpu") is False
    fake = types.SimpleNamespace(StandardGpuResources=object, get_num_gpus=lambda: 1)
    monkeypatch.setattr(neighbors, "_faiss", lambda: fake)
    assert neighbors.use_gpu(torch.device("cpu")) is False
    assert neighbors.use_gpu(torch.device("cuda")) is True and neighbors.use_gpu("cuda:0") is True
    fake.get_num_gpus = lambda: 0  # a GPU build on a machine without GPUs
    assert neighbors.use_gpu(torch.device("cuda")) is False
    monkeypatch.setattr(neighbors, "_faiss", lambda: types.SimpleNamespace(get_num_gpus=lambda: 1))  # faiss-cpu
    assert neighbors.use_gpu(torch.device("cuda")) is False


@pytest.mark.parametrize("n,k", [(1000, 7), (13001, 200), (999, 300), (50, 1), (50, 49), (20, 20), (20, 35)])
def test_topk_holds_the_k_largest_entries_of_each_row(n, k):
    # the grouped selection (1000/7: 11 interleaved columns per group; 13001/200: 8 per group and one left over)
    # and its edges (a single group per column, k = N - 1, k >= N) against torch.topk, with ties
    scores = torch.from_numpy(np.random.RandomState(n + k).randn(23, n).astype(np.float32))
    scores[:, ::3] = scores[:, ::3].round()
    ids = neighbors.topk(scores, k)
    assert ids.shape == (23, min(n, k))
    assert all(len(set(row)) == min(n, k) for row in ids.tolist())
    expected = scores.topk(min(n, k), dim=1).values
    assert torch.equal(scores.gather(1, ids).sort(1).values, expected.sort(1).values)


def test_a_gpu_index_asked_for_more_neighbours_than_faiss_gpu_selects_is_searched_on_the_cpu(points, monkeypatch):
    faiss = neighbors._faiss()
    db, queries = points
    cpu = neighbors.flat_index(db, "l2")

    class FakeGpuIndex:  # stands for a faiss.GpuIndex: its search would refuse k > GPU_MAX_K
        def search(self, x, k):
            assert k <= neighbors.GPU_MAX_K
            return cpu.search(x, k)
    monkeypatch.setattr(faiss, "GpuIndex", FakeGpuIndex, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: cpu, raising=False)
    monkeypatch.setattr(neighbors, "GPU_MAX_K", 5)
    D, I = neighbors.search(FakeGpuIndex(), queries, 7)
    assert (I == neighbors.search(cpu, queries, 7)[1]).all()
    assert neighbors.search(FakeGpuIndex(), queries, 5)[1].shape == (70, 5)
