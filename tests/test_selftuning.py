"""Self-Tuning: the PGC loss, the per-class queue, the momentum update, pseudo-labels, the transforms, and the
script end to end (fine-grained with pretrained weights from the hub cache, CIFAR-100, resume, torchrun, bad input)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fakedata
import selftuning as st
from common import backbones
from conftest import assert_ok, assert_user_error, run_script, script_env


# ------------------------------------------------------------------------------------------------------- PGC loss
def test_pgc_loss_by_hand():
    # C = 2 classes, K = 1 key per class, P = 2, tau = 1. Queue: class 0 -> [0, 1], class 1 -> [-1, 0].
    # Sample 1: q = k = [1, 0], label 0. z = [q.k, q.Q0, q.Q1] = [1, 0, -1]; lse = log(e + 1 + 1/e) = 1.4076060;
    #   positives: own (1 - lse = -0.4076060) and class 0 (0 - lse = -1.4076060):
    #   group CE = (0.4076060 + 1.4076060) / 2 = 0.9076060; KL = CE - log 2 = 0.9076060 - 0.6931472 = 0.2144588.
    # Sample 2: q = k = [0, 1], label 1. z = [1, 1, 0]; lse = log(2e + 1) = 1.8619948; positives: own (-0.8619948)
    #   and class 1 (column 2: -1.8619948): CE = 1.3619948; KL = 0.6688476.  Batch mean: 0.4416532.
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert st.pgc_loss(q[:1], q[:1], queue, torch.tensor([0]), 1, 1.0).item() == pytest.approx(0.2144588, abs=1e-6)
    assert st.pgc_loss(q[1:], q[1:], queue, torch.tensor([1]), 1, 1.0).item() == pytest.approx(0.6688476, abs=1e-6)
    assert st.pgc_loss(q, q, queue, torch.tensor([0, 1]), 1, 1.0).item() == pytest.approx(0.4416532, abs=1e-6)


def reference_pgc(q, k, queue_pc, labels, K, temp):
    """The reference's loop (models/method.py): per sample, columns [own, class block, other classes], then
    KLDivLoss(batchmean) against 1/(K+1) on the first K+1 columns. queue_pc is REF's (P, C*K) layout."""
    rows = []
    for i in range(len(q)):
        c = int(labels[i])
        neg = torch.cat([queue_pc[:, :c * K], queue_pc[:, (c + 1) * K:]], dim=1)
        pos = queue_pc[:, c * K:(c + 1) * K]
        rows.append(torch.cat([(q[i] * k[i]).sum().view(1), q[i] @ pos, q[i] @ neg]))
    logp = torch.log_softmax(torch.stack(rows) / temp, dim=1)
    target = torch.zeros_like(logp)
    target[:, :K + 1] = 1.0 / (K + 1)
    return nn.KLDivLoss(reduction="batchmean")(logp, target)


def test_pgc_loss_equals_the_reference_loop_in_value_and_gradient():
    torch.manual_seed(0)
    C, K, P, B = 5, 4, 8, 7
    q0 = F.normalize(torch.randn(B, P), dim=1)
    k = F.normalize(torch.randn(B, P), dim=1)
    queue = F.normalize(torch.randn(C * K, P), dim=1)
    labels = torch.tensor([0, 4, 4, 2, 1, 0, 3])
    q1, q2 = q0.clone().requires_grad_(), q0.clone().requires_grad_()
    ours = st.pgc_loss(q1, k, queue, labels, K, 0.07)
    ref = reference_pgc(q2, k, queue.t(), labels, K, 0.07)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(q1.grad, q2.grad, atol=1e-5)
    # The KL value is the group cross-entropy shifted by -log(K + 1).
    logp = torch.log_softmax(torch.cat([(q0 * k).sum(1, keepdim=True), q0 @ queue.t()], 1) / 0.07, 1)
    ce = torch.stack([-(logp[i, 0] + logp[i, 1 + labels[i] * K:1 + (labels[i] + 1) * K].sum()) / (K + 1)
                      for i in range(B)]).mean()
    assert ours.item() == pytest.approx(ce.item() - math.log(K + 1), abs=1e-5)


# ---------------------------------------------------------------------------------------------------------- queue
def sequential_enqueue(keys_pc, ptr, k, labels, K):
    """REF's _dequeue_and_enqueue called one sample at a time, in batch order."""
    for i in range(len(k)):
        c = int(labels[i])
        keys_pc[:, c * K + int(ptr[c])] = k[i]
        ptr[c] = (ptr[c] + 1) % K


def test_queue_is_a_ring_per_class_across_batches():
    q = st.ClassQueue(dim=2, num_classes=3, size=4, seed=0)
    init = q.keys.clone()
    e = lambda *v: torch.tensor([[float(x), -float(x)] for x in v])  # noqa: E731 - key i is [i, -i]
    q.enqueue(e(1, 2, 3), torch.tensor([0, 0, 1]))
    assert q.ptr.tolist() == [2, 1, 0]
    assert q.keys[0, 0] == 1 and q.keys[1, 0] == 2 and q.keys[4, 0] == 3       # class 0 slots 0-1, class 1 slot 0
    assert torch.equal(q.keys[2:4], init[2:4]) and torch.equal(q.keys[8:], init[8:])
    q.enqueue(e(4, 5, 6), torch.tensor([0, 0, 0]))                               # slots 2, 3 and 0 again (oldest)
    assert q.ptr.tolist() == [1, 1, 0]
    assert q.keys[:4, 0].tolist() == [6, 2, 4, 5]
    q.enqueue(e(*range(10, 16)), torch.tensor([2] * 6))                          # 6 keys, K = 4: slots 0 1 2 3 0 1
    assert q.ptr.tolist() == [1, 1, 2]
    assert q.keys[8:12, 0].tolist() == [14, 15, 12, 13]                          # last writer wins, as in the loop


def test_queue_scatter_equals_the_reference_loop_on_random_batches():
    torch.manual_seed(1)
    C, K, P = 4, 3, 5
    q = st.ClassQueue(P, C, K, seed=3)
    ref_keys, ref_ptr = q.keys.t().clone(), q.ptr.clone()
    for n in (2, 7, 1, 12, 5):
        k, y = torch.randn(n, P), torch.randint(0, C, (n,))
        q.enqueue(k, y)
        sequential_enqueue(ref_keys, ref_ptr, k, y, K)
        assert torch.equal(q.keys, ref_keys.t()) and torch.equal(q.ptr, ref_ptr)


def test_queue_starts_as_unit_columns_identical_for_a_seed():
    a, b = st.ClassQueue(16, 3, 4, seed=7), st.ClassQueue(16, 3, 4, seed=7)
    assert torch.equal(a.keys, b.keys) and a.keys.shape == (12, 16)
    assert torch.allclose(a.keys.norm(dim=1), torch.ones(12))


# ----------------------------------------------------------------------------------------- momentum, pseudo-labels
class Flat(nn.Module):
    """A backbone without BN or dropout: the feature is the input itself, so every forward is reproducible."""
    feature_dim = 4

    def forward(self, x):
        return x.flatten(1)


def tiny_nets(momentum=0.9, P=3, C=4):
    torch.manual_seed(0)
    enc = st.Encoder(Flat(), P)
    qnet = st.QueryNet(enc, C)
    with torch.no_grad():
        qnet.classifier.weight.copy_(torch.eye(C))  # logits = feature: the pseudo-label is the argmax of the input
        qnet.classifier.bias.zero_()
    key = st.KeyEncoder(enc, momentum)
    return enc, qnet, key


def test_momentum_update_in_place_by_hand():
    enc, _, key = tiny_nets(momentum=0.9)
    with torch.no_grad():
        for p in key.net.parameters():
            p.fill_(1.0)
        for p in enc.parameters():
            p.fill_(3.0)
    ptrs = [p.data_ptr() for p in key.net.parameters()]
    key.update(enc)  # 0.9 * 1 + 0.1 * 3 = 1.2
    assert all(torch.allclose(p, torch.full_like(p, 1.2)) for p in key.net.parameters())
    key.update(enc)  # 0.9 * 1.2 + 0.1 * 3 = 1.38
    assert all(torch.allclose(p, torch.full_like(p, 1.38)) for p in key.net.parameters())
    assert [p.data_ptr() for p in key.net.parameters()] == ptrs
    assert not any(p.requires_grad for p in key.net.parameters())


@pytest.mark.parametrize("per_forward,updates", [(True, 2), (False, 1)])
def test_key_encoder_moves_twice_per_iteration_by_default(per_forward, updates):
    enc, qnet, key = tiny_nets(momentum=0.5)
    with torch.no_grad():
        for p in key.net.parameters():
            p.zero_()
    queue = st.ClassQueue(3, 4, 2)
    x = torch.randn(2, 4)
    st.selftuning_losses(qnet, enc, key, queue, (x, x), torch.tensor([0, 1]), (x, x), ema_per_forward=per_forward)
    # From k = 0: one update gives 0.5 q, two give 0.75 q.
    for pk, pq in zip(key.net.parameters(), enc.parameters()):
        assert torch.allclose(pk, (1 - 0.5 ** updates) * pq)


def test_pseudo_labels_pick_the_unlabeled_positives_and_queue_slots():
    enc, qnet, key = tiny_nets(momentum=0.9, P=3, C=4)
    queue = st.ClassQueue(3, 4, 4, seed=5)
    q0, k0 = st.ClassQueue(3, 4, 4, seed=5), st.KeyEncoder(enc, 0.9)
    torch.manual_seed(2)
    la, lb = torch.randn(2, 4), torch.randn(2, 4)
    y_l = torch.tensor([0, 1])
    ua = torch.tensor([[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 4.0, 1.0]])  # argmax: 2, 3, 2
    ub = torch.randn(3, 4)
    y_u_truth = torch.tensor([1, 1, 0])  # differs from the pseudo-labels
    out = st.selftuning_losses(qnet, enc, key, queue, (la, lb), y_l, (ua, ub))
    assert out["pseudo"].tolist() == [2, 3, 2]
    assert queue.ptr.tolist() == [1, 1, 2, 1]  # labeled keys under 0 and 1, unlabeled under 2, 3, 2
    # The same step by hand: labeled keys enqueued first, then the unlabeled loss with the pseudo-labels.
    k0.update(enc)
    q0.enqueue(k0(lb), y_l)
    k0.update(enc)
    k_u = k0(ub)
    q_u = F.normalize(enc(ua)[0], dim=1)
    expected = st.pgc_loss(q_u, k_u, q0.keys, torch.tensor([2, 3, 2]), 4, 0.07)
    wrong = st.pgc_loss(q_u, k_u, q0.keys, y_u_truth, 4, 0.07)
    assert out["pgc_u"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(out["pgc_u"].item() - wrong.item()) > 1e-3
    assert torch.allclose(queue.keys[8], k_u[0]) and torch.allclose(queue.keys[9], k_u[2])   # class 2 slots 0, 1
    assert torch.allclose(queue.keys[12], k_u[1])                                            # class 3 slot 0


def test_without_pgc_the_step_is_plain_cross_entropy_and_the_queue_is_untouched():
    enc, qnet, key = tiny_nets()
    queue = st.ClassQueue(3, 4, 2)
    before = queue.keys.clone()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    out = st.selftuning_losses(qnet, enc, key, queue, x, y, None, pgc=False)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(qnet.classify(x), y).item(), abs=1e-7)
    assert torch.equal(queue.keys, before) and queue.ptr.sum() == 0


def test_without_unlabeled_data_only_the_labeled_pgc_term_remains():
    enc, qnet, key = tiny_nets()
    queue = st.ClassQueue(3, 4, 2)
    x, y = torch.randn(2, 4), torch.tensor([0, 3])
    out = st.selftuning_losses(qnet, enc, key, queue, (x, x), y, None)
    assert out["pgc_u"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["pgc_l"].item(), abs=1e-6)
    assert queue.ptr.tolist() == [1, 0, 0, 1]


# ----------------------------------------------------------------------------------------------------- transforms
def test_ten_crop_offsets_and_flips():
    assert st.ten_crop_offsets(224) == [(0, 0), (31, 31), (31, 0), (0, 31), (16, 16)]
    # A 256 x 256 image whose red channel is x and green channel is y: the crops' corners tell their offsets.
    xs, ys = np.meshgrid(np.arange(256), np.arange(256))
    img = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))
    crops = st.TenCrop(224, ((0, 0, 0), (1, 1, 1)), "nearest")(img)
    assert crops.shape == (10, 3, 224, 224)
    corner = [(round(c[0, 0, 0].item() * 255), round(c[1, 0, 0].item() * 255)) for c in crops]
    assert corner[5:] == [(0, 0), (31, 31), (31, 0), (0, 31), (16, 16)]              # unflipped
    assert corner[:5] == [(255, 0), (224, 31), (224, 0), (255, 31), (239, 16)]       # mirrored: x -> 255 - x


def test_randaugment_keeps_the_size_and_always_pastes_a_gray_square():
    import random
    random.seed(0)
    np.random.seed(0)
    aug = st.RandAugmentMC(2, 10)
    assert len(st.RANDAUGMENT_POOL) == 14
    img = Image.fromarray(np.full((48, 48, 3), (10, 200, 30), np.uint8))
    for _ in range(20):
        out = np.asarray(aug(img))
        assert out.shape == (48, 48, 3)
        gray = np.all(out == 127, axis=-1)
        rows, cols = np.flatnonzero(gray.any(1)), np.flatnonzero(gray.any(0))
        assert 8 <= len(rows) <= 17 and 8 <= len(cols) <= 17    # a 16-px square, clipped at the borders
        assert gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()


# ---------------------------------------------------------------------------------------------- through the CLI
TINY = ["--backbone", "resnet18", "--image_size", "32", "--batch_size", "4", "--workers", "0", "--device", "cpu",
        "--queue_size", "32", "--projector_dim", "16"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(run_dir):
    return {m["iter"]: m["top1"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def cars(tmp_path_factory):
    return fakedata.write_finegrained(tmp_path_factory.mktemp("fg"), "StanfordCars", num_classes=4,
                                      per_class_train=6, per_class_test=2, size=36)


@pytest.fixture(scope="module")
def pretrained_env(tmp_path_factory):
    """A torch hub cache holding a resnet18 state dict under torchvision's file name, and the weights saved."""
    home = tmp_path_factory.mktemp("home")
    torch.manual_seed(123)
    import torchvision
    state = torchvision.models.resnet18().state_dict()  # the torchvision layout, fc included
    _, fname = backbones.hub_file(backbones.TORCHVISION_WEIGHTS["resnet18"].url)  # resnet18-f37072fd.pth
    hub = home / "torch_home" / "hub" / "checkpoints"  # conftest's script_env sets TORCH_HOME=<tmp>/torch_home
    hub.mkdir(parents=True)
    torch.save(state, hub / fname)
    return script_env(home), state


def cars_command(cars, logdir, *extra):
    return ["--root", cars, "--label_ratio", "15", "--pretrained", *TINY, "--eval_interval", "3", "--deterministic",
            "--logdir", logdir, *extra]


@pytest.fixture(scope="module")
def cars_run(cars, pretrained_env, tmp_path_factory):
    """The headline command on a tiny StanfordCars folder: 3 iterations, evaluations after 1 and 3."""
    logdir = tmp_path_factory.mktemp("runs")
    proc = run_script("selftuning.py", *cars_command(cars, logdir, "--max_iter", "3"), env=pretrained_env[0])
    assert_ok(proc)
    return logdir / "selftuning-stanfordcars-15pct-s666666"


def test_stanfordcars_end_to_end_with_pretrained_weights_from_the_hub_cache(cars_run, pretrained_env):
    d, state = cars_run, pretrained_env[1]
    for f in ("args.json", "checkpoint.pt", "metrics.jsonl", "summary.json", "best.pt"):
        assert (d / f).exists(), f
    assert list(d.glob("events.out.tfevents.*"))
    summary = json.loads((d / "summary.json").read_text())
    assert 0 <= summary["final_top1"] <= summary["best_top1"] <= 100 and summary["iters"] == 3
    assert summary["labeled"] == 4 and summary["unlabeled"] == 20 and summary["ten_crop"]
    assert list(metrics(d)) == [1, 3]
    assert len((d / "labeled.csv").read_text().splitlines()) == 1 + 4  # header + the 4 labeled images
    ck = load(d / "checkpoint.pt")
    assert ck["step"] == 3 and ck["queue"]["ptr"].sum() == 3 * 8   # 4 labeled + 4 unlabeled keys per iteration
    # The backbone started from the saved weights: 3 small SGD steps later it is still next to them, while a
    # fresh initialisation is far away. The key encoder started there too.
    name = "layer3.0.conv1.weight"
    fresh = (backbones.build("resnet18").state_dict()[name] - state[name]).abs().mean()
    assert (ck["qnet"]["encoder.backbone." + name] - state[name]).abs().mean() < 0.1 * fresh
    assert (ck["key"]["net.backbone." + name] - state[name]).abs().mean() < 0.1 * fresh


def test_resume_equals_an_uninterrupted_run(cars, cars_run, pretrained_env, tmp_path):
    env = pretrained_env[0]
    proc = run_script("selftuning.py", *cars_command(cars, tmp_path, "--max_iter", "3", "--stop_after", "2"), env=env)
    assert_ok(proc)
    assert "stopped after iteration 2 of 3 (--stop_after); continue with --resume auto" in proc.stdout
    cut = tmp_path / "selftuning-stanfordcars-15pct-s666666"
    assert not (cut / "summary.json").exists()  # no claim to a finished run
    stopped = load(cut / "checkpoint.pt")
    assert stopped["step"] == 2 and stopped["scheduler"]["last_epoch"] == 2
    assert stopped["scheduler"]["milestones"] == load(cars_run / "checkpoint.pt")["scheduler"]["milestones"]
    proc = run_script("selftuning.py", *cars_command(cars, tmp_path, "--max_iter", "3", "--resume"), env=env)
    assert_ok(proc)
    assert "resumed at iteration 2" in proc.stdout
    a, b = load(cars_run / "checkpoint.pt"), load(cut / "checkpoint.pt")
    for part in ("qnet", "key", "queue", "streams"):
        for k in a[part]:
            assert a[part][k] == b[part][k] if part == "streams" else torch.equal(a[part][k], b[part][k]), (part, k)
    assert metrics(cars_run)[3] == metrics(cut)[3] and list(metrics(cut)) == [1, 2, 3]
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (cars_run, cut))
    assert sa["final_top1"] == sb["final_top1"]
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_tiny_cifar100_with_efficientnet_b2(tmp_path, env):
    root = fakedata.write_cifar(tmp_path / "cifar100", "cifar100", per_class_train=1, per_class_test=1)
    proc = run_script("selftuning.py", "--root", root, "--backbone", "efficientnet_b2", "--num_labeled", "100",
                      "--expand_label", "--image_size", "32", "--batch_size", "4", "--workers", "0",
                      "--device", "cpu", "--queue_size", "2", "--projector_dim", "16", "--max_iter", "2",
                      "--eval_interval", "2", "--resize_interp", "nearest", "--logdir", tmp_path / "runs", env=env)
    assert_ok(proc)
    d = tmp_path / "runs" / "selftuning-cifar100-100-s666666"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["num_classes"] == 100 and summary["unlabeled"] == 100 and not summary["ten_crop"]
    assert summary["labeled"] == 100 and summary["final_top1"] is not None
    assert json.loads((d / "args.json").read_text())["flags"]["expand_label"]


def test_two_process_torchrun_gathers_keys_from_both_ranks(cars, tmp_path, env):
    proc = run_script("selftuning.py", "--root", cars, "--label_ratio", "30", *TINY, "--max_iter", "2",
                      "--eval_interval", "2", "--logdir", tmp_path, "--run_name", "ddp", env=env, torchrun=2)
    assert_ok(proc)
    ck = load(tmp_path / "ddp" / "checkpoint.pt")
    # Each rank holds 2 of the 4 images per batch; the queue got all 4 labeled + 4 unlabeled keys per iteration.
    assert ck["queue"]["ptr"].sum() == 2 * 8
    assert len(ck["rng"]) == 2
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["final_top1"] is not None


def test_missing_root_gives_one_line(tmp_path, env):
    proc = run_script("selftuning.py", "--root", tmp_path / "StanfordCars", *TINY, "--logdir", tmp_path, env=env)
    assert_user_error(proc, "not found", "--download")
    assert not list(tmp_path.glob("selftuning-*"))  # nothing written for a run that could not start


# In-process runs (no interpreter start-up): main() is what the command line calls, on one thread as the
# subprocesses (conftest's one_thread fixture).
def run_main(argv, capsys):
    from common import run as runlib
    with pytest.raises(SystemExit) as e:
        runlib.entry(lambda: st.main([str(a) for a in argv]))
    return e.value.code, capsys.readouterr()


def test_flags_recipes_and_reference_spellings(cars):
    a = st.parse_args(["--root", str(cars), "--test_interval", "7", "--arch", "efficientnet-b2"])
    assert (a.eval_interval, a.backbone, a.num_labeled, a.stop_after, a.ten_crop) == (7, "efficientnet_b2", None,
                                                                                      None, None)
    # the recipe follows the dataset unless --recipe is given; a given --ten_crop beats both
    assert (st.choose_recipe(a).recipe, a.dataset, a.ten_crop) == ("finegrained", "stanfordcars", True)
    b = st.choose_recipe(st.parse_args(["--dataset", "cifar100"]))
    assert (b.recipe, b.ten_crop) == ("cifar", False)
    c = st.choose_recipe(st.parse_args(["--root", str(cars), "--recipe", "cifar"]))
    assert (c.recipe, c.ten_crop) == ("cifar", False)
    d = st.choose_recipe(st.parse_args(["--root", str(cars), "--recipe", "cifar", "--ten_crop"]))
    assert (d.recipe, d.ten_crop) == ("cifar", True)
    e = st.choose_recipe(st.parse_args(["--dataset", "cifar100", "--ten_crop"]))
    assert (e.recipe, e.ten_crop) == ("cifar", True)
    for bad in (["--num_labeled", "0"], ["--stop_after", "0"]):
        with pytest.raises(st.UserError, match=f"{bad[0]} must be at least 1, not 0"):
            st.parse_args(bad)


def test_unavailable_label_ratio_gives_one_line(cars, tmp_path, capsys):
    code, out = run_main(["--root", cars, "--label_ratio", "17", *TINY, "--logdir", tmp_path], capsys)
    assert code == 2 and "Traceback" not in out.err
    lines = [l for l in out.err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "--label_ratio 17" in lines[0] and "15, 30, 50, 100" in lines[0]
    assert not list(tmp_path.glob("selftuning-*"))


def test_label_ratio_100_keeps_the_labeled_pgc_term_and_no_pgc_is_fine_tuning(cars, tmp_path, one_thread):
    st.main([str(a) for a in ["--root", cars, "--label_ratio", "100", *TINY, "--max_iter", "1", "--no-ten_crop",
                              "--logdir", tmp_path, "--run_name", "full100"]])
    s = json.loads((tmp_path / "full100" / "summary.json").read_text())
    assert s["labeled"] == 24 and s["unlabeled"] == 0 and not s["ten_crop"] and s["pgc"]
    assert load(tmp_path / "full100" / "checkpoint.pt")["queue"]["ptr"].sum() == 4   # labeled keys only
    st.main([str(a) for a in ["--root", cars, "--label_ratio", "30", *TINY, "--max_iter", "2", "--no-pgc",
                              "--logdir", tmp_path, "--run_name", "ft"]])
    s = json.loads((tmp_path / "ft" / "summary.json").read_text())
    ck = load(tmp_path / "ft" / "checkpoint.pt")
    assert not s["pgc"] and s["unlabeled"] == 0 and ck["key"] == {} and ck["queue"]["ptr"].sum() == 0
    assert "unlabeled" not in ck["streams"]


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(cars, tmp_path, capsys, one_thread):
    code, out = run_main(["--root", cars, "--label_ratio", "30", *TINY, "--max_iter", "4", "--eval_interval", "10",
                          "--lr", "1e30", "--logdir", tmp_path, "--run_name", "nan"], capsys)
    lines = [l for l in out.err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "last good checkpoint is kept" in lines[0], out.err
    assert load(tmp_path / "nan" / "checkpoint.pt")["step"] == 1   # written after the evaluation of iteration 1
