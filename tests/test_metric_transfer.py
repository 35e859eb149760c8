"""Deep Metric Transfer: the method math on hand-made tensors, then every stage through the command line."""
import json
import math
import shutil
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import metric_transfer as mt
from common import UserError
from conftest import assert_ok, assert_user_error, run_script, script_env
from fakedata import write_cifar, write_imagefolder
from runhelpers import cli, snapshot


# ------------------------------------------------------------------------------------------------ stage A math
def test_memory_update_moves_only_batch_rows_and_renormalises():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    mt.update_memory(memory, torch.tensor([[0.0, 1.0]]), torch.tensor([0]), 0.5)
    # 0.5 [1, 0] + 0.5 [0, 1] = [0.5, 0.5] -> / 0.70711 = [0.70711, 0.70711]; the other rows are untouched (row 2 stays
    # unnormalised, as the bank is at init)
    assert torch.allclose(memory, torch.tensor([[0.70710678, 0.70710678], [0.0, 1.0], [3.0, 4.0]]))
    mt.update_memory(memory, torch.tensor([[1.0, 0.0]]), torch.tensor([2]), 0.5)
    # 0.5 [3, 4] + 0.5 [1, 0] = [2, 2] -> [0.70711, 0.70711]
    assert torch.allclose(memory[2], torch.tensor([0.70710678, 0.70710678]))


def test_memory_init_is_uniform_in_the_reference_range():
    m = mt.init_memory(1000, 12, torch.Generator().manual_seed(0))
    a = 1 / math.sqrt(12 / 3)  # 0.5
    assert m.shape == (1000, 12) and m.abs().max() <= a and m.abs().max() > 0.49


def test_exact_softmax_loss_and_its_gradient():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = mt.softmax_instance_loss(v, torch.tensor([0]), memory, 0.5)
    # logits [1, 0, -1] / 0.5 = [2, 0, -2]; loss = log(e^2 + 1 + e^-2) - 2 = log(1 + e^-2 + e^-4) = 0.1429316
    assert loss.item() == pytest.approx(0.1429316, abs=1e-6)
    loss.backward()
    # p = [e^2, 1, e^-2] / 8.5244 = [0.866813, 0.117310, 0.015876]; dL/dv = (p - onehot) M / t
    # = 2 * [(0.866813 - 1) * 1 + 0.015876 * (-1), 0.117310] = [-0.298126, 0.234621]
    assert torch.allclose(v.grad, torch.tensor([[-0.298126, 0.234621]]), atol=1e-5)
    assert not memory.requires_grad


def test_nce_loss_hand_values_and_normaliser():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # N = 4
    v = torch.tensor([[1.0, 0.0]])
    noise = torch.tensor([[2, 1]])  # K = 2
    loss, z = mt.nce_instance_loss(v, torch.tensor([0]), memory, 2, 1.0, torch.tensor(4.0), noise=noise)
    # exp(M v / 1) over [pos 0, noise 2, noise 1] = [e, e^-1, 1]; P = / Z(4) = [0.679570, 0.091970, 0.25]; K/N = 0.5
    # loss = -[log(0.679570 / 1.179570) + log(0.5 / 0.591970) + log(0.5 / 0.75)]
    #      = -[-0.551445 - 0.168849 - 0.405465] = 1.125758
    assert loss.item() == pytest.approx(1.125758, abs=1e-5)
    _, z0 = mt.nce_instance_loss(v, torch.tensor([0]), memory, 2, 1.0, None, noise=noise)
    # Z from the first batch: mean(e, e^-1, 1) * N = 1.362054 * 4 = 5.448215
    assert z0.item() == pytest.approx(5.448215, abs=1e-5)


def test_sgdr_restarts_and_ends_at_its_minimum():
    base = 0.03
    assert mt.sgdr_lr(0, base) == pytest.approx(base)
    assert mt.sgdr_lr(5, base) == pytest.approx(1e-5 + 0.5 * (base - 1e-5))  # half way through the 10-epoch cycle
    assert mt.sgdr_lr(10, base) == pytest.approx(base) and mt.sgdr_lr(30, base) == pytest.approx(base)  # restarts
    args = types.SimpleNamespace(pretrain_scheduler="cosine-with-restart", pretrain_lr=base)
    total = 1270 * 10
    # 1270 epochs = 10 + 20 + ... + 640: the last iteration is at the minimum, not at 0.03 as in the reference
    assert mt.pretrain_lr(total - 1, total, 1270, args) < 2e-5
    assert mt.pretrain_lr(1269 * 10, total, 1270, args) < 1e-4  # the reference's epoch 1269 trained at 0.03
    ft = types.SimpleNamespace(lr_scheduler="multi-step", lr=0.01)
    assert [mt.finetune_lr(s, 50000, ft) for s in (21428, 21429, 42857, 42858)] == pytest.approx(
        [0.01, 0.001, 0.001, 0.0001])


def test_max_iter_stretches_the_epoch_schedule():
    # lemniscate's multi-step: x0.1 at 60% and 80% of --epochs (120 and 160 of 200). A run of --max_iter 1000 with
    # --epochs 200 keeps the shape: an epoch of the schedule is 1000 / 200 = 5 iterations, the steps fall at 600, 800
    args = types.SimpleNamespace(pretrain_scheduler="multi-step", pretrain_lr=0.03)
    assert [mt.pretrain_lr(s, 1000, 200, args) for s in (599, 600, 799, 800)] == pytest.approx(
        [0.03, 0.003, 0.003, 0.0003])
    # twice the iterations: the same learning rate at twice the step, for every schedule
    for name in ("multi-step", "cosine", "cosine-with-restart"):
        args.pretrain_scheduler = name
        assert [mt.pretrain_lr(2 * s, 2000, 200, args) for s in range(0, 1000, 37)] == pytest.approx(
            [mt.pretrain_lr(s, 1000, 200, args) for s in range(0, 1000, 37)]), name


class _TrainSet:
    def __init__(self, n, classes):
        self.n, self.num_classes = n, classes

    def __len__(self):
        return self.n


def test_recipe_inferred_or_explicit_and_an_explicit_flag_wins():
    def resolved(*argv, dataset="cifar10", n=50000, classes=10):
        args = mt.parse_args(["--root", "data", "--dataset", dataset, *argv])
        mt.set_defaults(args, _TrainSet(n, classes))
        return args

    a = resolved()
    assert a.recipe == "cifar" and (a.backbone, a.batch_size, a.nce_k, a.finetune_iters) == ("wrn28_2", 128, 0, 500_000)
    assert a.num_labeled == 500
    a = resolved(dataset="imagenet", n=1_281_167, classes=1000)
    assert a.recipe == "imagenet" and (a.backbone, a.nce_k, a.weight_decay, a.lr_scheduler) == (
        "resnet50", 4096, 0.0, "multi-step") and a.num_labeled == 13000
    a = resolved("--recipe", "imagenet")  # explicit: the ImageNet column on CIFAR-10
    assert a.recipe == "imagenet" and a.batch_size == 256 and a.pseudo_ratio == 0.1
    a = resolved("--recipe", "imagenet", "--batch_size", "64", "--nce_k", "0", "--weight_decay", "1e-3")
    assert (a.batch_size, a.nce_k, a.weight_decay, a.nce_t) == (64, 0, 1e-3, 0.07)
    a = resolved(dataset="cub200", n=5994, classes=200)  # another image folder: 1% rounded up per class
    assert a.recipe == "imagenet" and a.num_labeled == 200
    # the reference's --eval_freq counts iterations (cifar-semi.py): a plain alias
    assert mt.parse_args(["--eval_freq", "7"]).eval_interval == 7
    assert mt.parse_args(["--max_iters", "9"]).max_iter == 9


# ------------------------------------------------------------------------------------------------ stage B math
def unit(*rows):
    a = np.array(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_knn_propagation_two_clusters_with_expected_confidences():
    # seeds: class 0 at [1, 0], class 1 at [0, 1]; k = min(2, 200) = 2, t = 0.1: p = sigmoid((s_c - s_other) / 0.1)
    f = unit([1, 0], [0, 1], [1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1])
    pred, conf, probs = mt.knn_propagate(f, np.array([0, 1]), np.array([0, 1]), np.array([2, 3, 4, 5]), 2)
    assert pred.tolist() == [0, 0, 1, 1]
    # [1, 0]: sigmoid(10) = 0.9999546; [0.8, 0.6]: sigmoid(2) = 0.8807971
    assert conf == pytest.approx([0.9999546, 0.8807971, 0.8807971, 0.9999546], abs=1e-6)
    assert probs.sum(1) == pytest.approx([1, 1, 1, 1])


def test_knn_propagation_keeps_only_the_k_nearest_seeds():
    f = unit([1, 0], [0.8, 0.6], [0, 1], [1, 0])  # seeds 0, 1 (class 0) and 2 (class 1); query 3
    _, conf2, _ = mt.knn_propagate(f, np.array([0, 1, 2]), np.array([0, 0, 1]), np.array([3]), 2, k=2)
    assert conf2[0] == pytest.approx(1.0)  # the class-1 seed is not among the 2 nearest
    _, conf3, _ = mt.knn_propagate(f, np.array([0, 1, 2]), np.array([0, 0, 1]), np.array([3]), 2, k=3)
    # (e^10 + e^8) / (e^10 + e^8 + e^0) = 0.99996001
    assert conf3[0] == pytest.approx(0.99996001, abs=1e-7)


def test_knn_propagation_equals_the_plain_float64_computation():
    # the k most similar seeds by a full sort, weights exp(sim / t) in float64, per class sums: the notebook's
    # computation, against the blocked matrix products and partial sort (several blocks, k < N_l and k = N_l)
    rng = np.random.RandomState(0)
    f = rng.standard_normal((300, 16)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    seeds, queries = np.arange(40), np.arange(40, 300)
    for c in (4, 40):  # few classes (a product with one-hot labels) and many (the k weights added per class)
        y_l = rng.randint(0, c, size=40)
        for k in (7, 40, 200):
            sim = f[queries].astype(np.float64) @ f[seeds].T.astype(np.float64)
            near = np.argsort(-sim, axis=1)[:, :min(k, 40)]
            scores = np.zeros((len(queries), c))
            for j in range(c):
                scores[:, j] = (np.exp(np.take_along_axis(sim, near, 1) / 0.1) * (y_l[near] == j)).sum(1)
            p = scores / scores.sum(1, keepdims=True)
            pred, conf, probs = mt.knn_propagate(f, seeds, y_l, queries, c, k=k, block=40 * 64)
            assert pred.tolist() == p.argmax(1).tolist(), (c, k)
            assert np.abs(conf - p.max(1)).max() < 1e-5 and np.abs(probs - p).max() < 1e-5, (c, k)


def two_block_graph(size=20, bridge=True):
    """Two dense blocks (weight 1), one weak edge between them (0.01) and a bridge node (last) tied to both."""
    n = 2 * size + int(bridge)
    W = np.zeros((n, n), np.float32)
    W[:size, :size] = 1
    W[size:2 * size, size:2 * size] = 1
    W[0, size] = W[size, 0] = 0.01
    if bridge:
        W[-1, :2 * size] = W[:2 * size, -1] = 0.5
        W[-1, -1] = 1
    return sp.csr_matrix(W)


def test_spectral_propagation_recovers_the_blocks_of_a_toy_graph():
    size = 20
    W = two_block_graph(size)
    n = W.shape[0]
    truth = np.array([0] * size + [1] * size)
    seeds = np.array([3, size + 5])
    query = np.setdiff1d(np.arange(n), seeds)
    pred, conf, probs, lam = mt.spectral_propagate(None, seeds, truth[seeds], query, 2, num_eigs=10, graph=W)
    q = query < 2 * size
    assert (pred[q] == truth[query[q]]).all()
    assert np.isfinite(conf).all() and ((conf >= 0) & (conf <= 1)).all()
    assert conf[~q][0] < conf[q].min() / 10  # the bridge node is the least confident by far
    assert lam[0] > 0 and (np.diff(lam) >= -1e-9).all()
    # a disconnected graph (several zero eigenvalues) stays finite
    W2 = two_block_graph(size, bridge=False).tolil()
    W2[0, size] = W2[size, 0] = 0
    pred2, conf2, _, _ = mt.spectral_propagate(None, seeds, truth[seeds], np.setdiff1d(np.arange(2 * size), seeds), 2,
                                               num_eigs=10, graph=W2.tocsr())
    assert np.isfinite(conf2).all() and (pred2 == truth[np.setdiff1d(np.arange(2 * size), seeds)]).all()


def test_spectral_propagation_on_clustered_features_through_faiss():
    rng = np.random.RandomState(0)
    centers = unit([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0])
    y = np.repeat(np.arange(3), 30)
    f = centers[y] + 0.15 * rng.standard_normal((90, 4)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    labeled = np.array([0, 30, 60])
    query = np.setdiff1d(np.arange(90), labeled)
    pred, conf, _, _ = mt.spectral_propagate(f, labeled, y[labeled], query, 3, graph_k=10, num_eigs=20)
    assert (pred == y[query]).all()


def test_laplacian_eigenpairs_match_scipy_normalised_laplacian():
    from scipy.sparse.csgraph import laplacian
    rng = np.random.RandomState(0)
    f = rng.standard_normal((600, 8)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    W = mt.knn_graph(f, 10)
    # symmetric, with self-loops exp(0) = 1
    assert abs(W - W.T).max() == 0 and W.diagonal().min() == pytest.approx(1.0, abs=1e-5)
    expected = np.linalg.eigvalsh(laplacian(W, normed=True).toarray())[:12]  # scipy leaves the self-loops out
    for solver in ("filtered", "lobpcg"):
        lam, U = mt.smallest_laplacian_eigs(W, 12, solver, dense_below=100)
        assert lam == pytest.approx(expected, abs=2e-3), solver
        assert np.abs(U.T @ U - np.eye(12)).max() < 1e-3


def test_confidence_ranking_pseudo_ratio_cut_and_accuracy_curve():
    idx, lab, w, order = mt.rank_by_confidence(np.array([10, 11, 12, 13]), np.array([0, 1, 1, 0]),
                                               np.array([0.5, 0.9, 0.9, 0.1], np.float32))
    assert idx.tolist() == [11, 12, 10, 13] and lab.tolist() == [1, 1, 0, 0]  # ties keep index order
    assert mt.select_pseudo(idx, lab, 0.5)[0].tolist() == [11, 12]  # floor(4 * 0.5) = 2
    assert mt.select_pseudo(idx, lab, 0.74)[0].tolist() == [11, 12]  # floor(2.96) = 2
    assert len(mt.select_pseudo(idx, lab, 1.0)[0]) == 4
    at, auc, _ = mt.accuracy_by_ratio(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    # correct [1, 0, 1, 1]; cumulative accuracy [1, 1/2, 2/3, 3/4]; top 10% = first 1, top 50% = first 2
    assert at[0.1] == pytest.approx(100) and at[0.5] == pytest.approx(50) and at[1.0] == pytest.approx(75)
    assert auc == pytest.approx(100 * (1 + 0.5 + 2 / 3 + 0.75) / 4)


def test_reference_split_is_per_class_first_in_a_seeded_permutation_and_nested():
    y = np.arange(100) % 4
    lab, unl = mt.reference_split(y, 8, 4, seed=0)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0)).numpy()
    assert lab.tolist() == [i for c in range(4) for i in [p for p in perm if y[p] == c][:2]]
    assert sorted(np.concatenate([lab, unl]).tolist()) == list(range(100))
    big, _ = mt.reference_split(y, 16, 4, seed=0)
    assert set(lab) <= set(big)  # nested across label counts
    with pytest.raises(UserError, match="no labeled seed"):
        mt.reference_split(y, 3, 4)
    with pytest.raises(UserError, match="no labeled seed for class 3"):
        mt.check_seeds([0, 1, 2, 2], 4, "the split")


def test_pseudo_file_for_another_dataset_size_is_refused(tmp_path):
    path = tmp_path / "p.pt"
    torch.save({"pseudo_indexes": torch.arange(5, 100), "pseudo_labels": torch.zeros(95, dtype=torch.long),
                "labeled_indexes": torch.arange(5)}, path)
    with pytest.raises(UserError, match="made for a train set of 100 images, but this train set has 60"):
        mt.read_pseudo_file(path, 60, 10)
    lab, parts = mt.read_pseudo_file(path, 100, 10)
    assert lab.tolist() == [0, 1, 2, 3, 4] and len(parts[0][0]) == 95


def test_reference_checkpoint_with_pickled_memory_module_loads_when_trusted(tmp_path):
    # The reference pickles lib.LinearAverage.LinearAverage objects next to `net`: fake that module, save, remove it.
    lib = types.ModuleType("lib")
    la = types.ModuleType("lib.LinearAverage")

    class LinearAverage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("memory", torch.zeros(3, 2))

    LinearAverage.__module__, LinearAverage.__qualname__ = "lib.LinearAverage", "LinearAverage"
    la.LinearAverage = LinearAverage
    sys.modules["lib"], sys.modules["lib.LinearAverage"] = lib, la
    try:
        net = mt.backbones.build("wrn28_2")
        state = {"module." + k: v for k, v in net.state_dict().items()}
        state["module.fc.weight"], state["module.fc.bias"] = torch.randn(128, 128), torch.zeros(128)
        torch.save({"net": state, "lemniscate": LinearAverage(), "acc": 82.12, "epoch": 3}, tmp_path / "ckpt.pth.tar")
    finally:
        del sys.modules["lib"], sys.modules["lib.LinearAverage"]
    args = types.SimpleNamespace(backbone="wrn28_2")
    with pytest.raises(UserError, match="--trust_checkpoint"):
        mt.load_stage_a(args, tmp_path / "ckpt.pth.tar", trust=False)
    bb, head = mt.load_stage_a(args, tmp_path / "ckpt.pth.tar", trust=True)
    assert torch.equal(bb.conv1.weight, net.conv1.weight) and head["weight"].shape == (128, 128)


def test_colour_augmentation_of_a_normalised_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    y = mt.color_augment_batch(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.equal(x, y)


# ------------------------------------------------------------------------------------------- command line
COMMON = ["--batch_size", "8", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("mt_data") / "cifar10", per_class_train=6, per_class_test=2)


def base_flags(cifar, logdir):
    """--stage all on a tiny CIFAR-10 (60 train images) with kNN propagation, in the run folder logdir/mt."""
    return ["--stage", "all", "--root", cifar, "--dataset", "cifar10", "--num_labeled", "20", "--propagation", "knn",
            "--pseudo_ratio", "0.2", "--max_iter", "2", "--run_name", "mt", "--logdir", logdir, *COMMON]


@pytest.fixture(scope="module")
def base_run(cifar, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("mt_runs")
    env = script_env(tmp_path_factory.mktemp("mt_env"))
    proc = run_script("metric_transfer.py", *base_flags(cifar, logdir), env=env)
    return logdir / "mt", proc, env


def copy_of(base_run, tmp_path):
    """A copy of the finished --stage all folder, to resume without touching the shared one."""
    folder, proc, _ = base_run
    assert_ok(proc)
    return shutil.copytree(folder, tmp_path / "mt")


def test_stage_all_then_spectral_propagation_on_the_same_folder(base_run, cifar):
    folder, proc, env = base_run
    assert_ok(proc)
    for name in ("pretrain.pt", "features.pt", "pseudo_labels_knn.pt", "propagation_accuracy.png", "checkpoint.pt",
                 "metrics.jsonl", "args.json", "labeled.csv"):
        assert (folder / name).exists(), name
    summary = json.loads((folder / "summary.json").read_text())
    knn = summary["propagation"]["knn"]
    assert set(f"top{p}" for p in range(10, 101, 10)) <= set(knn) and 0 <= knn["top100"] <= 100
    assert summary["num_pseudo"] == 8 and summary["num_seeds"] == 20  # floor(40 * 0.2) pseudo-labels + 2 per class
    assert summary["final_top1"] is not None and summary["best_top1"] >= summary["final_top1"]
    p = torch.load(folder / "pseudo_labels_knn.pt", weights_only=True)
    assert len(p["pseudo_indexes"]) == 40 and p["pseudo_probs"].shape == (40, 10)
    assert (p["pseudo_weights"][:-1] >= p["pseudo_weights"][1:]).all()  # most confident first
    stages = [json.loads(line).get("stage") for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["pretrain", "finetune"]
    flags = json.loads((folder / "args.json").read_text())["flags"]
    assert flags["recipe"] == "cifar" and flags["batch_size"] == 8 and flags["nce_k"] == 0  # inferred, the flag wins

    # a later stage on the same folder without --num_labeled keeps the folder's split
    again = run_script("metric_transfer.py", "--stage", "propagate", "--propagation", "spectral", "--root", cifar,
                       "--run_name", "mt", "--logdir", folder.parent, "--resume", "auto", *COMMON, env=env)
    assert_ok(again)
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["propagation"]) == {"knn", "spectral"} and summary["final_top1"] is not None
    s = torch.load(folder / "pseudo_labels_spectral.pt", weights_only=True)
    assert sorted(s["pseudo_indexes"].tolist()) == sorted(p["pseudo_indexes"].tolist())
    assert torch.equal(s["labeled_indexes"], p["labeled_indexes"])


def test_image_folder_all_stages_with_nce_and_spectral(tmp_path):
    root = write_imagefolder(tmp_path / "folder", num_classes=3, per_class_train=8, per_class_val=2, size=32)
    proc = run_script("metric_transfer.py", "--root", root, "--backbone", "resnet18", "--image_size", "32",
                      "--num_labeled", "6", "--nce_k", "8", "--max_iter", "2", "--propagation", "spectral",
                      "--pseudo_ratio", "0.5", "--run_name", "f", "--logdir", tmp_path / "runs", *COMMON,
                      env=script_env(tmp_path))
    assert_ok(proc)
    summary = json.loads((tmp_path / "runs/f/summary.json").read_text())
    assert summary["num_pseudo"] == 9 and "spectral" in summary["propagation"]  # floor(18 * 0.5)
    assert summary["final_top1"] is not None and "pretrain_knn_top1" in summary
    assert (tmp_path / "runs/f/pseudo_labels_spectral.pt").exists()


def metrics(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_pretrain_resume_equals_an_uninterrupted_run(cifar, tmp_path, one_thread, capsys):
    flags = ["--stage", "pretrain", "--root", str(cifar), "--num_labeled", "20", "--nce_k", "16", "--max_iter", "4",
             "--eval_interval", "2", "--deterministic", "--logdir", str(tmp_path), *COMMON]
    mt.main([*flags, "--run_name", "whole"])
    capsys.readouterr()
    mt.main([*flags, "--run_name", "cut", "--stop_after", "2"])
    assert "[cut] stopped after iteration 2 of 4 (--stop_after); continue with --resume auto" in capsys.readouterr().out
    assert not (tmp_path / "cut/pretrain.pt").exists()
    # stopped with the schedule of the 4-iteration run (SGDR over the recipe's 1270 epochs stretched to 4
    # iterations), not that of a 2-iteration run: the learning rate of its last step is the full run's
    cut = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)
    schedule = types.SimpleNamespace(pretrain_scheduler="cosine-with-restart", pretrain_lr=0.03)
    assert (cut["step"], cut["total"]) == (2, 4)
    assert cut["optimizer"]["param_groups"][0]["lr"] == pytest.approx(mt.pretrain_lr(1, 4, 1270, schedule))
    assert mt.pretrain_lr(1, 4, 1270, schedule) != pytest.approx(mt.pretrain_lr(1, 2, 1270, schedule))
    mt.main([*flags, "--run_name", "cut", "--resume", "auto"])
    a = torch.load(tmp_path / "whole/pretrain.pt", weights_only=True)
    b = torch.load(tmp_path / "cut/pretrain.pt", weights_only=True)
    for part in ("backbone", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    ca = torch.load(tmp_path / "whole/checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)
    assert torch.equal(ca["memory"], cb["memory"]) and ca["z_nce"] == cb["z_nce"]
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "cut")
    # an unfinished pretraining is not overwritten by another stage
    mt.main([*flags, "--run_name", "part", "--stop_after", "2"])
    with pytest.raises(UserError, match="unfinished pretraining"):
        mt.main([*flags[2:], "--stage", "finetune", "--run_name", "part", "--resume", "auto"])


def test_finetune_resume_equals_an_uninterrupted_run(base_run, cifar, tmp_path, one_thread):
    folder, proc, env = base_run
    assert_ok(proc)
    flags = ["--stage", "finetune", "--root", str(cifar), "--num_labeled", "20", "--pretrained",
             str(folder / "pretrain.pt"), "--pseudo_file", str(folder / "pseudo_labels_knn.pt"), "--pseudo_ratio",
             "0.5", "--max_iter", "4", "--eval_interval", "2", "--deterministic", "--logdir", str(tmp_path), *COMMON]
    mt.main([*flags, "--run_name", "whole"])
    mt.main([*flags, "--run_name", "cut", "--stop_after", "2"])
    # the second half through the command line: the stage alone, resumed, in a fresh process
    assert_ok(run_script("metric_transfer.py", *flags, "--run_name", "cut", "--resume", "auto", env=env))
    a = torch.load(tmp_path / "whole/checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "cut")
    sa = json.loads((tmp_path / "whole/summary.json").read_text())
    sb = json.loads((tmp_path / "cut/summary.json").read_text())
    assert sa["final_top1"] == sb["final_top1"] and sa["best_top1"] == sb["best_top1"] and sa["num_pseudo"] == 20


def test_two_processes_keep_one_memory_bank_and_run_every_stage(cifar, tmp_path):
    proc = run_script("metric_transfer.py", "--root", cifar, "--num_labeled", "20", "--propagation", "knn",
                      "--max_iter", "2", "--run_name", "tr", "--logdir", tmp_path, *COMMON, env=script_env(tmp_path),
                      torchrun=2)
    assert_ok(proc)
    memory = torch.load(tmp_path / "tr/pretrain.pt", weights_only=True)["memory"]
    # 2 iterations x global batch 8 (4 per rank, disjoint): all 16 rows were updated (unit norm) in the bank that
    # rank 0 saved, the other rank's included; the 44 untouched rows keep their unnormalised init
    assert int(((memory.norm(dim=1) - 1).abs() < 1e-5).sum()) == 16
    summary = json.loads((tmp_path / "tr/summary.json").read_text())
    assert summary["final_top1"] is not None and summary["propagation"]["knn"]["num_unlabeled"] == 40


def test_two_process_resume_equals_an_uninterrupted_run(cifar, tmp_path):
    # every rank draws its own crops and NCE noise: each must get its own RNG state back
    flags = ["--stage", "pretrain", "--root", str(cifar), "--num_labeled", "20", "--nce_k", "16", "--max_iter", "4",
             "--eval_interval", "2", "--deterministic", "--logdir", str(tmp_path), *COMMON]
    # the uninterrupted run and the stopped one share a launch (start-up is most of the cost); the resume is its own
    driver = tmp_path / "whole_and_cut.py"
    driver.write_text(f"import metric_transfer as mt\nflags = {flags!r}\nmt.main(flags + ['--run_name', 'whole'])\n"
                      "mt.main(flags + ['--run_name', 'cut', '--stop_after', '2'])\n")
    env = script_env(tmp_path)
    assert_ok(run_script(driver, env=env, torchrun=2))
    assert not (tmp_path / "cut/pretrain.pt").exists()
    assert_ok(run_script("metric_transfer.py", *flags, "--run_name", "cut", "--resume", "auto", env=env, torchrun=2))
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "cut")
    assert [m["iter"] for m in metrics(tmp_path / "cut")] == [2, 4]
    a = torch.load(tmp_path / "whole/pretrain.pt", weights_only=True)
    b = torch.load(tmp_path / "cut/pretrain.pt", weights_only=True)
    assert torch.equal(a["memory"], b["memory"])
    for part in ("backbone", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k


# ---------------------------------------------------------------------------------------------- the run folder
def test_refused_resume_leaves_the_folder_byte_identical(base_run, cifar, tmp_path):
    folder = copy_of(base_run, tmp_path)
    flags = [*base_flags(cifar, tmp_path), "--resume", "auto"]

    def refused(*extra, fragments):
        before = snapshot(folder)
        assert_user_error(cli(mt.main, *flags, *extra), *fragments)
        assert snapshot(folder) == before

    refused("--num_labeled", "30", fragments=["was made with --num_labeled 20", "asks for --num_labeled 30"])
    refused("--backbone", "resnet18", fragments=["--backbone wrn28_2", "--backbone resnet18"])
    np.save(tmp_path / "seeds.npy", np.arange(20))
    refused("--labeled_file", tmp_path / "seeds.npy", fragments=["--labeled_file None", "seeds.npy"])
    # a checkpoint of this script whose network does not fit: one line, not a state-dict traceback
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    state["model"]["fc.weight"] = torch.zeros(3, 128)
    torch.save(state, folder / "checkpoint.pt")
    refused(fragments=["the checkpoint's model does not fit", "size mismatch for fc.weight"])
    # without a checkpoint (a folder that only propagated), the seeds in labeled.csv still fix the split
    (folder / "checkpoint.pt").unlink()
    refused("--num_labeled", "30", fragments=["labeled.csv holds another labeled split (20 seeds)", "(30)"])


def test_another_scripts_checkpoint_is_refused(cifar, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    # what metasemi.py leaves: evaluations that must not become this run's
    torch.save({"script": "metasemi", "flags": {"dataset": "cifar10", "seed": 0}, "step": 7,
                "run": {"evals": [{"iter": 7, "top1": 55.0, "top5": 90.0}], "wall_s": 3.0}}, folder / "checkpoint.pt")
    (folder / "metrics.jsonl").write_text('{"iter": 7, "top1": 55.0, "top5": 90.0}\n')
    before = snapshot(folder)
    flags = ["--root", cifar, "--num_labeled", "20", "--max_iter", "2", "--logdir", tmp_path, *COMMON]
    assert_user_error(cli(mt.main, *flags, "--run_name", "other", "--resume", "auto"),
                      "checkpoint.pt was written by metasemi.py", "this is metric_transfer.py")
    assert_user_error(cli(mt.main, *flags, "--run_name", "new", "--resume", folder / "checkpoint.pt"),
                      "was written by metasemi.py")
    torch.save({"model": {}, "step": 3}, folder / "checkpoint.pt")  # older checkpoints name no script
    before = snapshot(folder)
    assert_user_error(cli(mt.main, *flags, "--run_name", "other", "--resume", "auto"), "names no script")
    assert snapshot(folder) == before and not (tmp_path / "new").exists()


def test_metrics_without_a_checkpoint_are_kept_until_resume_and_then_not_duplicated(cifar, tmp_path, one_thread):
    # a run cut off before its first checkpoint leaves its evaluations in metrics.jsonl
    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"iter": 2, "top1": 10.0, "top5": null, "stage": "pretrain"}\n')
    before = snapshot(folder)
    flags = ["--stage", "pretrain", "--root", cifar, "--num_labeled", "20", "--max_iter", "2", "--run_name", "cut",
             "--logdir", tmp_path, *COMMON]
    assert_user_error(cli(mt.main, *flags), "already holds a run (metrics.jsonl)", "--resume auto")
    assert snapshot(folder) == before
    assert_ok(cli(mt.main, *flags, "--resume", "auto"))  # nothing to continue: a fresh start
    assert [m["iter"] for m in metrics(folder)] == [2]


def test_stage_all_resumed_in_finetuning_keeps_the_figures_of_the_earlier_stages(base_run, cifar, tmp_path,
                                                                                 one_thread):
    folder = copy_of(base_run, tmp_path)
    done = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").unlink()  # as a run killed after its last fine-tuning checkpoint leaves it
    assert_ok(cli(mt.main, *base_flags(cifar, tmp_path), "--resume", "auto"))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["pretrain_knn_top1"] == done["pretrain_knn_top1"]
    assert summary["propagation"] == done["propagation"] and "knn" in summary["propagation"]
    assert summary["final_top1"] == done["final_top1"] and summary["num_pseudo"] == done["num_pseudo"]


def test_resumed_finetuning_reports_the_weight_decay_it_keeps(base_run, cifar, tmp_path, one_thread):
    copy_of(base_run, tmp_path)
    proc = cli(mt.main, *base_flags(cifar, tmp_path), "--resume", "auto", "--weight_decay", "0.001", "--lr", "0.1")
    assert_ok(proc)
    kept = [line for line in proc.stdout.splitlines() if "resuming keeps" in line]
    # the learning rate is set from the flags at every iteration: only the weight decay is the checkpoint's
    assert kept == ["[mt] resuming keeps the checkpoint's --weight_decay 0.0005 (asked: --weight_decay 0.001); "
                    "start a new --run_name to change them"]


# --------------------------------------------------------------------------------------------------- bad inputs
def test_pseudo_ratio_outside_the_unit_interval_is_one_clear_line(tmp_path):
    proc = run_script("metric_transfer.py", "--root", tmp_path, "--pseudo_ratio", "1.5", env=script_env(tmp_path))
    assert_user_error(proc, "--pseudo_ratio 1.5", "(0, 1]")
    assert not (tmp_path / "runs").exists()


def test_bad_inputs_in_process(base_run, cifar, tmp_path):
    folder, proc, _ = base_run
    assert_ok(proc)
    base = ["--root", str(cifar), "--logdir", str(tmp_path), *COMMON]
    # a pseudo-label file made for a bigger train set
    other = tmp_path / "other.pt"
    torch.save({"pseudo_indexes": torch.arange(20, 120), "pseudo_labels": torch.zeros(100, dtype=torch.long),
                "labeled_indexes": torch.arange(20), "num_train": 120}, other)
    with pytest.raises(UserError, match="made for a train set of 120 images, but this train set has 60"):
        mt.main(["--stage", "finetune", "--pretrained", str(folder / "pretrain.pt"), "--pseudo_file", str(other),
                 "--num_labeled", "20", "--run_name", "a", *base])
    # labeled seeds that miss a class
    train_y = mt.datasets.load("cifar10", cifar, "train").targets
    seeds = tmp_path / "seeds.npy"
    np.save(seeds, np.flatnonzero(train_y != 7)[:30])
    with pytest.raises(UserError, match="no labeled seed for class 7"):
        mt.main(["--stage", "propagate", "--labeled_file", str(seeds), "--metric_net", str(folder / "pretrain.pt"),
                 "--run_name", "b", *base])
    with pytest.raises(UserError, match="no labeled seed to some of the 10 classes"):
        mt.main(["--stage", "propagate", "--num_labeled", "5", "--run_name", "c", *base])
    # features with the wrong number of rows
    torch.save(torch.randn(59, 8), tmp_path / "f.pt")
    with pytest.raises(UserError, match="has shape"):
        mt.main(["--stage", "propagate", "--num_labeled", "20", "--features", str(tmp_path / "f.pt"),
                 "--run_name", "d", *base])
    # fine-tuning on a folder without pseudo-labels
    with pytest.raises(UserError, match="run --stage propagate"):
        mt.main(["--stage", "finetune", "--num_labeled", "20", "--pretrained", str(folder / "pretrain.pt"),
                 "--run_name", "e", *base])


def test_dali_subset_stream_maps_rows_back_to_the_full_set(tmp_path):
    from common import dali
    if not dali.available():
        pytest.skip("NVIDIA DALI is not installed")
    root = write_imagefolder(tmp_path / "folder", num_classes=3, per_class_train=4, per_class_val=1, size=32)
    train = mt.datasets.load("imagefolder", root, "train")
    args = types.SimpleNamespace(image_size=32, workers=1)
    dist = mt.distributed.Dist(0, 1, 0, torch.device("cpu"), True)
    rows = np.array([9, 2, 5])
    stream = mt.DaliSet(train, rows, [1, 0, 2], "val", 3, args, dist, seed=0, one_pass=True)
    x, y, idx = next(iter(stream))
    assert x.shape == (3, 3, 32, 32) and sorted(idx.tolist()) == [2, 5, 9]
    assert {int(i): int(v) for i, v in zip(idx, y)} == {9: 1, 2: 0, 5: 2}  # the labels passed (pseudo-labels)
    # stage A's training view crops with --transform_scale, as the torchvision path; stage C's with DALI's default
    crops = mt.DaliSet(train, rows, [1, 0, 2], "train", 3, args, dist, seed=0, area=(0.2, 1.0))
    assert crops.stream.area == [0.2, 1.0] and len(crops) == 1
    x, _, _ = next(crops)
    assert x.shape == (3, 3, 32, 32)
    assert mt.DaliSet(train, rows, [1, 0, 2], "train", 3, args, dist, seed=0).stream.area == [0.08, 1.0]


def test_failed_inputs_leave_no_run_folder(base_run, cifar, tmp_path):
    folder, proc, _ = base_run
    assert_ok(proc)
    base = ["--root", cifar, "--num_labeled", "20", "--logdir", tmp_path, "--run_name", "r", *COMMON]
    wrong = tmp_path / "resnet18.pt"
    torch.save(mt.backbones.build("resnet18").state_dict(), wrong)
    assert_user_error(cli(mt.main, *base, "--stage", "propagate", "--metric_net", tmp_path / "missing.pt"),
                      "--metric_net", "missing.pt: no such file")
    assert_user_error(cli(mt.main, *base, "--stage", "finetune", "--pretrained", tmp_path / "missing.pt",
                          "--pseudo_file", folder / "pseudo_labels_knn.pt"), "--pretrained", "missing.pt: no such file")
    # --pretrained initialises a network this command trains; --metric_net is what stage A makes
    assert_user_error(cli(mt.main, *base, "--stage", "propagate", "--pretrained", folder / "pretrain.pt"),
                      "--stage propagate trains none", "--metric_net PATH")
    assert_user_error(cli(mt.main, *base, "--stage", "all", "--metric_net", folder / "pretrain.pt"),
                      "--metric_net replaces what stage A makes")
    assert_user_error(cli(mt.main, *base, "--stage", "all", "--pretrained", wrong),
                      "resnet18.pt looks like a checkpoint for another network, not wrn28_2")
    assert_user_error(cli(mt.main, *base, "--stage", "finetune", "--pretrained", wrong, "--pseudo_file",
                          folder / "pseudo_labels_knn.pt"), "another network")
    (tmp_path / "f.csv").write_text("0.1,0.2\n" * 60)
    assert_user_error(cli(mt.main, *base, "--stage", "propagate", "--features", tmp_path / "f.csv"),
                      "--features", "f.csv", "expected a .npy array or a .pt / .pth.tar file")
    np.save(tmp_path / "f.npy", np.array([{"a": 1}] * 60, dtype=object))
    assert_user_error(cli(mt.main, *base, "--stage", "propagate", "--features", tmp_path / "f.npy"),
                      "f.npy is not a NumPy array of numbers")
    assert_user_error(cli(mt.main, *base, "--lr", "1e39"), "--lr 1e+39 must lie in [0, 3.4e+38)")
    assert not (tmp_path / "r").exists()
