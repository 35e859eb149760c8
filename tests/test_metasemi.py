"""metasemi.py: the meta step and its pieces on hand-made tensors, then end to end through the command line."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

import fakedata
import metasemi as M
from common import UserError, backbones, splits
from conftest import assert_ok, assert_user_error, run_script


def tiny_net(smooth=True, dtype=torch.float32):
    """Conv-BN-act-pool-dropout x2 -> linear, 4 classes; BN running stats made non-trivial by one train forward."""
    act = (lambda: nn.Tanh()) if smooth else (lambda: nn.LeakyReLU(0.1))
    pool = (lambda: nn.AvgPool2d(2)) if smooth else (lambda: nn.MaxPool2d(2))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act(), pool(), nn.Dropout2d(0.5),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Softplus() if smooth else act(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).to(dtype)
    net.train()
    net(torch.randn(16, 3, 8, 8, dtype=dtype))
    g = torch.Generator().manual_seed(1)
    x_l = torch.randn(6, 3, 8, 8, generator=g, dtype=dtype)
    y_l = torch.randint(0, 4, (6,), generator=g)
    x_u = torch.randn(5, 3, 8, 8, generator=g, dtype=dtype)
    return net, x_l, y_l, x_u


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------------- meta-gradient
def test_fd_meta_gradient_converges_to_exact_jvp_in_float64():
    # Central difference: error O(eps^2). On a smooth net in float64 (no rounding in the way) the relative error
    # is ~2e-5 at the default ||eps d|| = 0.01 and drops 100x per 10x smaller eps.
    net, x_l, y_l, x_u = tiny_net(dtype=torch.float64)
    p_j, g_j, _ = M.meta_direction(net, x_l, y_l, x_u, meta_grad="jvp")
    errs = []
    for eps in (1e-2, 1e-3):
        p_f, g_f, _ = M.meta_direction(net, x_l, y_l, x_u, epsilon=eps, meta_grad="fd")
        assert torch.allclose(p_f, p_j, atol=1e-12)
        errs.append(rel_err(g_f, g_j))
    assert errs[0] < 1e-4, errs
    assert 50 < errs[0] / errs[1] < 200, errs
    assert g_j.abs().max() > 0.1  # a real signal, not zeros compared with zeros


def test_fd_meta_gradient_agrees_with_jvp_in_float32():
    # Default eps, fp32: smooth net within 1e-3 relative (measured 1.5e-5); a LeakyReLU/max-pool net within 5e-2
    # (measured 1.2e-2: a 0.01 step crosses some kinks, where the difference quotient is not the derivative).
    for smooth, tol in ((True, 1e-3), (False, 5e-2)):
        net, x_l, y_l, x_u = tiny_net(smooth)
        _, g_f, _ = M.meta_direction(net, x_l, y_l, x_u, meta_grad="fd")
        _, g_j, _ = M.meta_direction(net, x_l, y_l, x_u, meta_grad="jvp")
        assert rel_err(g_f, g_j) < tol, (smooth, rel_err(g_f, g_j))
        # rows of g sum to 0: it is the derivative of probabilities that sum to 1
        assert g_j.sum(1).abs().max() < 1e-5


@pytest.mark.parametrize("meta_grad", ["fd", "jvp"])
def test_meta_step_leaves_weights_bit_identical(meta_grad):
    net = M.Classifier(backbones.build("convlarge"), 10)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}  # parameters and BN buffers
    torch.manual_seed(0)
    x_l, y_l, x_u = torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), torch.randn(3, 3, 32, 32)
    p, y_hat, _ = M.meta_pseudo_labels(net, x_l, y_l, x_u, lr=0.1, meta_grad=meta_grad)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training  # mode restored
    assert all(q.grad is None for q in net.parameters())  # d never lands in .grad
    assert not torch.equal(p, y_hat) and torch.allclose(y_hat.sum(1), torch.ones(3))


def test_meta_step_runs_in_fp32_without_autocast_or_tf32():
    net, x_l, y_l, x_u = tiny_net()
    plain = M.meta_direction(net, x_l, y_l, x_u)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer --amp region must not reach the meta step
        under_amp = M.meta_direction(net, x_l, y_l, x_u)
    for a, b in zip(plain, under_amp):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    try:
        with M.exact_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert not torch.is_autocast_enabled("cpu")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True


def test_pseudo_label_update_is_p_minus_lr_g_projected():
    net, x_l, y_l, x_u = tiny_net()
    p, g, _ = M.meta_direction(net, x_l, y_l, x_u)
    _, y_hat, _ = M.meta_pseudo_labels(net, x_l, y_l, x_u, lr=0.7)
    assert torch.allclose(y_hat, M.project_rows(p - 0.7 * g), atol=1e-6)
    _, y0, _ = M.meta_pseudo_labels(net, x_l, y_l, x_u, lr=0.0)  # lr 0 (the first warmup step): y_hat = p
    assert torch.allclose(y0, p, atol=1e-7)


def test_project_rows_by_hand():
    y = torch.tensor([[0.5, -0.1, 0.3],    # clamp -> [0.5, 0, 0.3], sum 0.8 -> [0.625, 0, 0.375]
                      [-0.2, -0.1, 0.0],   # all clamped to 0: sum 0, the row stays all-zero (no NaN)
                      [0.2, 0.2, 0.6],     # already on the simplex: unchanged
                      [1.0, 2.0, 1.0]])    # sum 4 -> [0.25, 0.5, 0.25]
    out = M.project_rows(y)
    want = torch.tensor([[0.625, 0, 0.375], [0, 0, 0], [0.2, 0.2, 0.6], [0.25, 0.5, 0.25]])
    assert torch.allclose(out, want)
    # the update with hand numbers: p = [0.5, 0.3, 0.2], g = [1, -2, 1]
    p, g = torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[1.0, -2.0, 1.0]])
    # lr 0.1: [0.4, 0.5, 0.1] (sum 1, unchanged); lr 0.3: [0.2, 0.9, -0.1] -> [0.2, 0.9, 0] / 1.1
    assert torch.allclose(M.project_rows(p - 0.1 * g), torch.tensor([[0.4, 0.5, 0.1]]))
    assert torch.allclose(M.project_rows(p - 0.3 * g), torch.tensor([[0.2 / 1.1, 0.9 / 1.1, 0.0]]))


# ---------------------------------------------------------------------------------------------------------- losses
def test_mixup_targets_by_hand():
    x_l, x_u = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    y_l = torch.tensor([0, 2])
    y_u = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    lam = torch.tensor([[0.25], [1.0]])
    x, y = M.mixup(x_l, y_l, x_u, y_u, lam, 3)
    # row 0: 0.25 * [1, 0, 0] + 0.75 * [0.2, 0.8, 0] = [0.4, 0.6, 0]; row 1: lam 1 -> the labeled one-hot [0, 0, 1]
    assert torch.allclose(y, torch.tensor([[0.4, 0.6, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.allclose(x[0], torch.full((1, 2, 2), 0.25)) and torch.allclose(x[1], torch.ones(1, 2, 2))
    torch.manual_seed(0)
    lam = M.sample_lambda(10000, 0.1)
    assert lam.shape == (10000, 1) and 0 <= lam.min() and lam.max() <= 1
    assert abs(lam.mean().item() - 0.5) < 0.02 and (lam < 0.1).float().mean() > 0.3  # Beta(0.1, 0.1): U-shaped


def test_losses_by_hand():
    # KL([0.5, 0.5, 0] || softmax(0, 0, 0)) = 2 * 0.5 * ln(0.5 / (1/3)) = ln 1.5; batchmean over 2 equal rows
    logits = torch.zeros(2, 3, requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 0.0]] * 2)
    loss = M.soft_kl(logits, target)
    assert math.isclose(loss.item(), math.log(1.5), rel_tol=1e-6)
    loss.backward()  # gradient of the soft-target CE: (softmax - target) / B
    assert torch.allclose(logits.grad, (torch.full((2, 3), 1 / 3) - target) / 2)
    # consistency: softmax(0, 0) = [0.5, 0.5] vs [1, 0]: 0.25 + 0.25 = 0.5 (summed over classes, not / C);
    # vs [0.5, 0.5]: 0. Mean over the batch: 0.25
    assert math.isclose(M.consistency(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.5, 0.5]])).item(), 0.25)


def test_training_loss_is_cls_plus_weighted_consistency():
    net, x_l, y_l, x_u = tiny_net()
    net.eval()  # no dropout / batch statistics, so separate forwards agree
    y_hat = M.project_rows(torch.rand(5, 4))
    x_l, y_l = x_l[:5], y_l[:5]
    total, l_cls, l_cons = M.training_loss(net, x_l, y_l, x_u, y_hat, 4, False, None, 0.3)
    assert math.isclose(l_cls.item(), F.cross_entropy(net(x_l), y_l).item(), rel_tol=1e-6)
    assert math.isclose(l_cons.item(), (F.softmax(net(x_u), 1) - y_hat).pow(2).sum(1).mean().item(), rel_tol=1e-6)
    assert math.isclose(total.item(), l_cls.item() + 0.3 * l_cons.item(), rel_tol=1e-6)
    lam = torch.ones(5, 1)  # lam 1: the mixed batch is the labeled batch with one-hot targets: KL = CE
    _, mixed_cls, _ = M.training_loss(net, x_l, y_l, x_u, y_hat, 4, True, lam, 0.3)
    assert math.isclose(mixed_cls.item(), l_cls.item(), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------------- schedules
def test_rampup_values():
    w = [M.consistency_weight(t, 1.0, 4000) for t in (0, 1000, 2000, 4000, 4001, 300000)]
    assert w == [0.0, 0.25, 0.5, 1.0, 1.0, 1.0]
    assert M.consistency_weight(0, 2.0, 0) == 2.0  # ImageNet: no ramp


def test_lr_schedules():
    lr = [M.step_lr(t, 0.1, 4000, [300000, 350000], 0.1) for t in (0, 2000, 4000, 300000, 300001, 350001)]
    assert np.allclose(lr, [0.0, 0.05, 0.1, 0.1, 0.01, 0.001])  # decay only for t > milestone
    # cosine: it = t + 1; warmup 10 of 100 iterations
    cos = [M.cosine_lr(t, 0.1, 10, 100) for t in (0, 9, 54, 99)]
    assert np.allclose(cos, [0.01, 0.1, 0.05, 0.0])


def test_convlarge_size_matches_the_reference():
    count = lambda c: sum(q.numel() for q in M.Classifier(backbones.build("convlarge"), c).parameters())  # noqa
    assert count(10) == 3121802 and count(100) == 3133412


def test_reference_flag_spellings():
    a = M.parse_args(["--data-path", "d", "--num-label", "1000", "-a", "convlarge", "--mix-up", "--alpha", "0.1",
                      "--total-steps", "10", "--milestones", "5", "8", "--test-freq", "4", "--wd", "5e-5",
                      "--batch-size", "16", "--stop-after", "3", "--meta-grad", "jvp", "--warmup", "4000"])
    assert (a.root, a.num_labeled, a.backbone, a.mix_up, a.alpha, a.max_iter, a.milestones, a.eval_interval,
            a.weight_decay, a.batch_size, a.stop_after, a.meta_grad) == \
        ("d", 1000, "convlarge", True, 0.1, 10, [5, 8], 4, 5e-5, 16, 3, "jvp")
    a.dataset = "cifar10"
    M.choose_recipe(a)
    assert (a.warmup, a.gamma, a.weight, a.epsilon, a.lr, a.seed) == (4000, 0.1, 1.0, 0.01, 0.1, 1234)
    b = M.choose_recipe(M.parse_args(["--dataset", "imagenet"]))
    assert (b.backbone, b.mix_up, b.batch_size, b.epochs, b.warmup) == ("resnet18", True, 512, 600, 5)


# ---------------------------------------------------------------------------------------------- recipes, schedule
def test_recipe_is_inferred_from_the_dataset_and_a_given_flag_wins():
    inferred = M.choose_recipe(M.parse_args(["--dataset", "svhn"]))
    explicit = M.choose_recipe(M.parse_args(["--dataset", "svhn", "--recipe", "cifar"]))
    assert inferred.recipe == explicit.recipe == "cifar" and vars(inferred) == vars(explicit)
    assert (inferred.backbone, inferred.mix_up, inferred.batch_size, inferred.num_labeled, inferred.max_iter,
            inferred.warmup, inferred.milestones, inferred.gamma, inferred.eval_interval,
            inferred.eval_batch_size) == ("convlarge", False, 128, 4000, 400000, 4000, [300000, 350000], 0.1, 400, 100)
    big = M.choose_recipe(M.parse_args(["--dataset", "imagefolder"]))
    assert (big.recipe, big.imcrop, big.epochs, big.max_iter, big.milestones) == ("imagenet", 224, 600, None, None)
    # a flag given on the command line beats its recipe value, the others still come from the recipe
    mine = M.choose_recipe(M.parse_args(["--dataset", "imagenet", "--no-mix_up", "--batch_size", "64",
                                         "--backbone", "resnet50", "--warmup", "0"]))
    assert (mine.mix_up, mine.batch_size, mine.backbone, mine.warmup, mine.epochs) == (False, 64, "resnet50", 0, 600)
    with pytest.raises(UserError, match="--recipe imagenet does not fit cifar10: its recipe is cifar"):
        M.choose_recipe(M.parse_args(["--dataset", "cifar10", "--recipe", "imagenet"]))


def test_max_iter_rescales_the_cifar_schedule_and_given_values_stay():
    a = M.choose_recipe(M.parse_args(["--dataset", "cifar10", "--max_iter", "1000"]))
    # the recipe's 300k / 350k and 4000 of 400k iterations, shrunk to 1000
    assert (a.milestones, a.warmup) == ([750, 875], 10)
    total, lr_at, rampup = M.schedule(a, iters_per_epoch=7)
    assert (total, rampup) == (1000, 10)
    assert np.allclose([lr_at(t) for t in (0, 5, 10, 750, 751, 876)], [0.0, 0.05, 0.1, 0.1, 0.01, 0.001])
    full = M.choose_recipe(M.parse_args(["--dataset", "cifar10"]))
    steps = (0, 5, 10, 750, 751, 876)  # the same points of the 400k schedule: 400 x as far
    assert np.allclose([M.schedule(full, 7)[1](400 * t) for t in steps], [lr_at(t) for t in steps])
    given = M.choose_recipe(M.parse_args(["--dataset", "cifar10", "--total_steps", "1000", "--milestones", "750",
                                          "900", "--warmup", "100"]))
    assert (given.max_iter, given.milestones, given.warmup) == (1000, [750, 900], 100)


def test_max_iter_with_epochs_rescales_the_imagenet_schedule():
    # 10 epochs of 7 iterations: 70 iterations, 5 warmup epochs = 35 iterations, cosine to 70
    a = M.choose_recipe(M.parse_args(["--dataset", "imagenet", "--epochs", "10"]))
    total, lr_at, rampup = M.schedule(a, iters_per_epoch=7)
    assert (total, rampup) == (70, 0)
    assert [lr_at(t) for t in (0, 34, 69)] == [M.cosine_lr(t, 0.1, 35, 70) for t in (0, 34, 69)]
    # --max_iter 100 wins over 10 x 7: an epoch of the schedule is now 10 iterations, the warmup 50
    b = M.choose_recipe(M.parse_args(["--dataset", "imagenet", "--epochs", "10", "--max_iter", "100"]))
    total, lr_at, _ = M.schedule(b, iters_per_epoch=7)
    assert total == 100 and [lr_at(t) for t in (0, 49, 50, 99)] == [M.cosine_lr(t, 0.1, 50, 100)
                                                                     for t in (0, 49, 50, 99)]
    assert lr_at(49) == pytest.approx(0.1) and lr_at(99) == pytest.approx(0.0)


def test_dali_streams_crop_as_the_torchvision_path(tmp_path):
    # The DALI pipeline that --dali builds holds the torchvision path's crop area and aspect (float32 arguments in
    # its serialised graph), not common.dali's torchvision defaults, which stay in place for the other scripts.
    pytest.importorskip("nvidia.dali")
    import struct
    from common import dali, datasets
    root = fakedata.write_imagefolder(tmp_path, num_classes=2, per_class_train=2, per_class_val=1, size=36,
                                      indexes=False)
    train = datasets.load("imagefolder", root, "train")
    crop = M.imagenet_transforms(32)[0].transforms[0]
    assert (tuple(crop.scale), tuple(crop.ratio)) == (M.CROP_AREA, M.CROP_RATIO) == ((0.1, 1.0), (0.8, 1.25))
    held = {}
    for name, kw in (("metasemi", dict(area=M.CROP_AREA, ratio=M.CROP_RATIO)), ("default", {})):
        stream = dali.DaliStream(files=train.files, labels=train.targets, batch_size=2, size=32, **kw)
        next(stream)
        graph = stream._it._pipes[0].serialize()
        held[name] = {v for v in (0.1, 0.8, 1.25, 0.08, 0.75, 4 / 3) if struct.pack("<f", v) in graph}
    assert held["metasemi"] == {*crop.scale[:1], *crop.ratio} == {0.1, 0.8, 1.25}
    assert held["default"] == {0.08, 0.75, 4 / 3}
    assert (dali.RRC_AREA, dali.RRC_RATIO) == ((0.08, 1.0), (3 / 4, 4 / 3))


# --------------------------------------------------------------------------------------------- command line runs
@pytest.fixture(autouse=True)
def restore_torch_flags():
    """Runs made in this process (main(argv)) set global torch flags; give the next test a clean slate."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), \
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_rng_state(), \
        torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): two threads on a busy 2-core box crawl
    yield
    torch.set_num_threads(saved[5])
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
    torch.set_rng_state(saved[4])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("metasemi_data")
    return {"cifar": fakedata.write_cifar(d / "cifar", "cifar10"), "svhn": fakedata.write_svhn(d / "svhn"),
            "base": d}


def summary(logdir, name):
    return json.loads((logdir / name / "summary.json").read_text())


@pytest.mark.parametrize("meta_grad", ["fd", "jvp"])
def test_cifar10_command_line(data, tmp_path, env, meta_grad):
    # The README's command on tiny data (4 labels per class of 6, 2 iterations); the jvp run with a batch of 4.
    batch = 8 if meta_grad == "fd" else 4
    proc = run_script("metasemi.py", "--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", 40,
                      "--backbone", "convlarge", "--mix_up", "--alpha", 1.0, "--batch_size", batch, "--max_iter", 2,
                      "--meta_grad", meta_grad, "--workers", 0, "--logdir", tmp_path, "--device", "cpu",
                      "--print_freq", 1, env=env)
    assert_ok(proc)
    s = summary(tmp_path, "metasemi-cifar10-40-s1234")
    assert s["iters"] == 2 and s["meta_grad"] == meta_grad and 0 <= s["final_top1"] <= 100
    run = tmp_path / "metasemi-cifar10-40-s1234"
    assert (run / "checkpoint.pt").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert len(ck["labeled_idx"]) == 40 and ck["step"] == 2
    split = splits.read_index_file(run / "labeled.csv", 60)  # the saved split reads back as an index file
    assert sorted(split.tolist()) == sorted(ck["labeled_idx"].tolist())
    assert not (run / "features.png").exists()  # the feature map is off by default


def test_svhn_mat_command_line(data, tmp_path, env):
    # The SVHN-1000 recipe's flags (alpha 0.1, weight decay 5e-5), shrunk; resnet18 at 32 px keeps it quick.
    proc = run_script("metasemi.py", "--root", data["svhn"], "--num_labeled", 20, "--alpha", 0.1, "--mix_up",
                      "--backbone", "resnet18", "--batch_size", 4, "--max_iter", 2, "--warmup", 1,
                      "--weight_decay", 5e-5, "--seed", 7788, "--workers", 0, "--logdir", tmp_path, "--device", "cpu",
                      env=env)
    assert_ok(proc)
    assert summary(tmp_path, "metasemi-svhn-20-s7788")["iters"] == 2


def test_resume_equals_uninterrupted(data, tmp_path):
    # In process (main(argv) is what the command line runs) to spare three interpreter start-ups.
    common = ["--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", 40, "--mix_up", "--backbone",
              "resnet18", "--batch_size", 8, "--workers", 0, "--device", "cpu", "--deterministic", "--warmup", 1,
              "--eval_interval", 1, "--logdir", tmp_path]
    common = [str(a) for a in common]
    M.main(common + ["--max_iter", "3", "--run_name", "whole"])
    M.main(common + ["--max_iter", "3", "--stop_after", "2", "--run_name", "cut"])
    assert not (tmp_path / "cut" / "summary.json").exists()  # stopped: no claim to a finished run
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    M.main(common + ["--max_iter", "3", "--run_name", "cut", "--resume", "auto"])
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    ma = [json.loads(l) for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["iter"], m["top1"], m["top5"]) for m in ma] == [(m["iter"], m["top1"], m["top5"]) for m in mb]
    assert len(ma) == 3


def test_stop_after_keeps_the_schedule_and_its_extra_evaluation_changes_nothing(data, tmp_path, capsys):
    # 2 iterations of a 200-iteration schedule (warmup 2, the recipe's 4000 of 400k scaled), stopped between two
    # scheduled evaluations: the lr is the long run's (0.05 at t = 1; a 2-iteration run would have 0.1), and the
    # resumed run equals one that ran on without stopping, although the stopped one evaluated at 2.
    common = [str(a) for a in ("--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", 40, "--mix_up",
                               "--backbone", "resnet18", "--batch_size", 8, "--workers", 0, "--device", "cpu",
                               "--deterministic", "--max_iter", 200, "--logdir", tmp_path)]
    M.main(common + ["--stop_after", "2", "--run_name", "cut"])
    assert "stopped after iteration 2 of 200 (--stop_after); continue with --resume auto" in capsys.readouterr().out
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    full = M.choose_recipe(M.parse_args(common))
    assert cut["step"] == 2 and cut["optimizer"]["param_groups"][0]["lr"] == M.schedule(full, 7)[1](1) == 0.05
    assert not (tmp_path / "cut" / "summary.json").exists()
    M.main(common + ["--stop_after", "3", "--run_name", "cut", "--resume", "auto"])
    M.main(common + ["--stop_after", "3", "--run_name", "whole"])
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("whole", "cut"))
    assert a["step"] == b["step"] == 3 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [m["iter"] for m in map(json.loads, (tmp_path / "cut" / "metrics.jsonl").open())] == [2, 3]


def test_feature_map_at_the_end_and_redrawn_from_the_finished_run(data, tmp_path):
    # In process, to spare two interpreter start-ups. 40 labeled, 20 unlabeled and 20 test images (2 per class).
    args = [str(a) for a in ("--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", 40,
                             "--backbone", "resnet18", "--batch_size", 8, "--max_iter", 2, "--warmup", 1,
                             "--workers", 0, "--device", "cpu", "--logdir", tmp_path, "--run_name", "fm",
                             "--plot_features", 25)]
    M.main(args)
    run = tmp_path / "fm"
    from PIL import Image
    assert (run / "features.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(run / "features.png") as im:
        im.verify()
        assert im.size[0] > 3 * im.size[1]  # four panels side by side
    first = dict(np.load(run / "features.npz"))
    assert first["num_classes"] == 10
    for name, count in (("labeled", 25), ("unlabeled", 20), ("test", 20)):  # 25 per panel, or all of a smaller set
        xy, y = first[f"{name}_xy"], first[f"{name}_y"]
        assert xy.shape == (count, 2) and y.shape == (count,) and np.isfinite(xy).all()
        assert 0 <= y.min() and y.max() < 10
    assert np.bincount(first["unlabeled_y"], minlength=10).tolist() == [2] * 10  # all of them: 2 per class
    assert np.bincount(first["test_y"], minlength=10).tolist() == [2] * 10
    assert np.bincount(first["labeled_y"], minlength=10).max() <= 4  # drawn from the 4 labels per class
    # The same command resumed on the finished run trains and evaluates nothing and redraws the same map.
    (run / "features.png").unlink()
    (run / "features.npz").unlink()
    metrics = (run / "metrics.jsonl").read_text()
    M.main(args + ["--resume", "auto"])
    assert (run / "metrics.jsonl").read_text() == metrics
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    again = dict(np.load(run / "features.npz"))
    assert again.keys() == first.keys() and all(np.array_equal(again[k], first[k]) for k in first)
    assert (run / "features.png").is_file()


def test_plot_features_bad_values(data, tmp_path, env):
    proc = run_script("metasemi.py", "--root", data["cifar"], "--plot_features", -3, "--workers", 0,
                      "--device", "cpu", "--logdir", tmp_path, env=env)
    assert_user_error(proc, "--plot_features", "-3")
    assert not any(tmp_path.iterdir())  # refused before any run folder
    with pytest.raises(UserError, match="--plot_features .* --dali"):
        M.parse_args(["--plot_features", "5", "--dali"])


def test_two_process_torchrun(data, tmp_path, env):
    proc = run_script("metasemi.py", "--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", 40,
                      "--mix_up", "--backbone", "resnet18", "--batch_size", 8, "--max_iter", 2, "--warmup", 1,
                      "--workers", 0, "--device", "cpu", "--logdir", tmp_path, "--print_freq", 1,
                      "--plot_features", 4, env=env, torchrun=2)
    assert_ok(proc)
    s = summary(tmp_path, "metasemi-cifar10-40-s1234")
    assert s["iters"] == 2 and math.isfinite(s["final_top1"])
    assert s["rank_weight_spread"] == 0.0  # DDP kept both ranks' weights identical around the local meta steps
    assert "lr 0.1" in proc.stdout  # the main rank alone prints; warmup over 1 step
    assert proc.stdout.count("feature map of 12 images") == 1  # drawn by rank 0 alone, 4 per set
    assert (tmp_path / "metasemi-cifar10-40-s1234" / "features.npz").is_file()


def test_recordio_imagenet_with_dali_on_cpu(data, tmp_path, env):
    from common import dali
    base = data["base"] / "inet"
    root = fakedata.write_imagefolder(base / "folder", num_classes=3, per_class_train=6, per_class_val=2, size=36,
                                      indexes=False)
    classes = fakedata.wnids(3)
    for w in classes:  # 2 labeled + 4 unlabeled images per class
        for i, f in enumerate(sorted((root / "train" / w).iterdir())):
            dst = base / ("labeled" if i < 2 else "unlabeled") / w
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst / f.name)
    rec = base / "rec"
    dali.pack_recordio(base / "labeled", rec / "train_label", classes=classes)
    dali.pack_recordio(base / "unlabeled", rec / "train_unlabel", classes=classes)
    dali.pack_recordio(root / "val", rec / "val", classes=classes)
    args = ["--root", rec, "--backbone", "resnet18", "--imcrop", 32, "--batch_size", 4, "--max_iter", 2, "--epochs", 2,
            "--warmup", 1, "--device", "cpu", "--logdir", tmp_path]
    proc = run_script("metasemi.py", *args, "--dali", "--workers", 1, env=env)
    assert_ok(proc)
    s = summary(tmp_path, "metasemi-imagenet-6-s1234")  # dataset inferred from the RecordIO files
    assert s["iters"] == 2 and s["final_top5"] == 100.0  # 3 classes: top-5 covers all
    assert "3 it/epoch" in proc.stdout  # 12 unlabeled records / batch 4: the unlabeled stream defines the epoch
    # the same files without DALI (common.dali.RecordIOSet + torchvision), in process to save a start-up
    M.main([*map(str, args), "--no-dali", "--workers", "0", "--run_name", "nodali", "--max_iter", "1"])
    assert summary(tmp_path, "nodali")["iters"] == 1


def test_bad_inputs(data, tmp_path, env):
    proc = run_script("metasemi.py", "--root", data["cifar"], "--dataset", "cifar10", "--num_labeled", 45,
                      "--batch_size", 8, "--max_iter", 2, "--workers", 0, "--device", "cpu", "--logdir", tmp_path,
                      env=env)
    assert_user_error(proc, "45 labels cannot be split evenly over 10 classes", "multiple of 10")
    assert not (tmp_path / "metasemi-cifar10-45-s1234").exists()  # nothing written for a refused run
    base = ["--root", str(data["cifar"]), "--dataset", "cifar10", "--workers", "0", "--device", "cpu",
            "--logdir", str(tmp_path)]
    with pytest.raises(UserError, match="larger than the 60 training images"):
        M.main(base + ["--num_labeled", "100"])
    with pytest.raises(UserError, match="no unlabeled images remain"):
        M.main(base + ["--num_labeled", "60"])
    with pytest.raises(UserError, match="--epochs does not apply .* use --max_iter"):
        M.main(base + ["--epochs", "3"])
    with pytest.raises(UserError, match="--recipe imagenet does not fit cifar10"):
        M.main(base + ["--recipe", "imagenet"])
    assert not any(tmp_path.iterdir())


def test_digits_are_never_mirrored():
    # a mirrored digit is another glyph: SVHN (the reference) and digits train without the flip, CIFAR with it
    flips = {name: any(isinstance(t, T.RandomHorizontalFlip) for t in M.small_transforms(name)[0].transforms)
             for name in ("cifar10", "svhn", "digits")}
    assert flips == {"cifar10": True, "svhn": False, "digits": False}


def test_meta_p_mean_is_the_mean_of_the_perturbed_predictions():
    # (p(theta + eps d) + p(theta - eps d)) / 2 = p(theta) + O(eps^2): in float64 on the smooth net the gap falls
    # 100x per 10x smaller step; g is the same computation either way
    net, x_l, y_l, x_u = tiny_net(dtype=torch.float64)
    gaps = []
    for eps in (1e-2, 1e-3):
        p_eval, g_eval, _ = M.meta_direction(net, x_l, y_l, x_u, epsilon=eps)
        p_mean, g_mean, _ = M.meta_direction(net, x_l, y_l, x_u, epsilon=eps, meta_p="mean")
        assert torch.equal(g_eval, g_mean)
        gaps.append((p_mean - p_eval).abs().max().item())
    assert 0 < gaps[0] < 1e-4 and 50 < gaps[0] / gaps[1] < 200, gaps
    with pytest.raises(UserError, match="--meta_p mean averages fd's two perturbed predictions"):
        M.parse_args(["--dataset", "cifar10", "--meta_grad", "jvp", "--meta_p", "mean"])
