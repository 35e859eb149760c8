"""debiaspl.py: the DebiasPL math on hand-made tensors, its reductions, and the script end to end on tiny data."""
import argparse
import copy
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import debiaspl
import fakedata
from common import UserError, datasets, splits
from common import run as runlib
from conftest import assert_ok, run_script

LOG = math.log


def make_args(**kw):
    base = dict(tau=0.4, threshold=0.95, qhat_m=0.999, lambda_u=10.0, CLDLoss=False, lambda_cld=0.3,
                cld_groups="argmin", cld_temperature=0.07, multiviews=True, eman=True, ema_m=0.999, amp="off")
    base.update(kw)
    return argparse.Namespace(**base)


def no_reduce(t):
    return t


# ------------------------------------------------------------------------------------------------ pseudo-labels
def test_debiased_pseudo_labels_hand_worked():
    # q = (1/2, 1/4, 1/4), tau = 1: softmax(z - log q) is proportional to e^z / q = e^z * (2, 4, 4).
    qhat = torch.tensor([0.5, 0.25, 0.25])
    z = torch.tensor([[LOG(6), LOG(2), 0.0],    # (12, 8, 4)/24  -> class 0, p = 0.5    (raw softmax: 6/9 = 0.667)
                      [0.0, LOG(3), 0.0],       # (2, 12, 4)/18  -> class 1, p = 0.667
                      [LOG(2), 0.0, LOG(3)]])   # (4, 4, 12)/20  -> class 2, p = 0.6
    target, mask = debiaspl.debiased_pseudo_labels(z, qhat, tau=1.0, threshold=0.55)
    assert target.tolist() == [0, 1, 2]
    assert mask.tolist() == [0.0, 1.0, 1.0]  # the threshold applies to the DEBIASED probability: row 0 drops out
    # tau = 0: plain FixMatch. Raw softmax (6, 2, 1)/9, (1, 3, 1)/5, (2, 1, 3)/6: max 0.667, 0.6, 0.5
    target0, mask0 = debiaspl.debiased_pseudo_labels(z, qhat, tau=0.0, threshold=0.55)
    assert target0.tolist() == [0, 1, 2] and mask0.tolist() == [1.0, 1.0, 0.0]
    # tau = 0.5: weights e^z / sqrt(q) = (6 sqrt 2, 2 * 2, 1 * 2) -> row 0: 8.485 / 14.485 = 0.586
    target5, mask5 = debiaspl.debiased_pseudo_labels(z[:1], qhat, tau=0.5, threshold=0.58)
    assert target5.tolist() == [0] and mask5.tolist() == [1.0]
    p5 = 6 * math.sqrt(2) / (6 * math.sqrt(2) + 6)
    assert debiaspl.debiased_pseudo_labels(z[:1], qhat, 0.5, p5 + 1e-4)[1].tolist() == [0.0]


def test_marginal_loss_hand_worked():
    # One strong view, q_t = (1/2, 1/4, 1/4), tau = 1, z_s = 0: softmax(z_s + log q) = q, so
    # CE(target 0) = log 2, CE(target 1 or 2) = log 4. Mask (0, 1, 1), averaged over ALL 3 samples:
    # (0 + log 4 + log 4) / 3 = 4/3 log 2 = 0.924196.
    qhat = torch.tensor([0.5, 0.25, 0.25])
    z_s = torch.zeros(3, 3)
    loss = debiaspl.marginal_loss([z_s], [torch.tensor([0, 1, 2])], [torch.tensor([0.0, 1.0, 1.0])], qhat, 1.0)
    assert loss.item() == pytest.approx(4 / 3 * LOG(2), abs=1e-6)
    # Two strong views x three pseudo-label sets, q uniform (the shift is a constant and changes nothing):
    # view 1 z = 0 -> CE = log 3 for any target; view 2 z = (log 2, 0, 0) -> p = (1/2, 1/4, 1/4).
    # Targets avg -> 0 (mask 1), w1 -> 1 (mask 0), w2 -> 0 (mask 1):
    # (log 3 + log 2) + 0 + (log 3 + log 2) = 2 log 6, over 6 terms = log 6 / 3 = 0.597253.
    q = torch.full((3,), 1 / 3)
    views = [torch.zeros(1, 3), torch.tensor([[LOG(2), 0.0, 0.0]])]
    targets = [torch.tensor([0]), torch.tensor([1]), torch.tensor([0])]
    masks = [torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0])]
    assert debiaspl.marginal_loss(views, targets, masks, q, 1.0).item() == pytest.approx(LOG(6) / 3, abs=1e-6)


def test_qhat_update_and_order():
    # q_{t-1} = (0.5, 0.3, 0.2), tau = 1, one sample with z_w = 0 (raw softmax uniform), m = 0.5.
    # 1. pseudo-label from q_{t-1}: p ~ 1/q = (2, 3.33, 5) -> class 2, p = 5/10.33 = 0.484 >= 0.45: mask 1.
    # 2. q_t = 0.5 q_{t-1} + 0.5 (1/3, 1/3, 1/3) = (0.41667, 0.31667, 0.26667).
    # 3. margin with q_t: z_s = 0 -> softmax(log q_t) = q_t, CE(class 2) = -log 0.26667 = 1.32176.
    # (Had q_t labeled: p = 3.75/9.31 = 0.403 < 0.45, loss 0. Had q_{t-1} shifted: -log 0.2 = 1.609.)
    args = make_args(tau=1.0, threshold=0.45, qhat_m=0.5, lambda_u=1.0, multiviews=False)
    q0 = torch.tensor([0.5, 0.3, 0.2])
    loss, parts, q1, target, mask = debiaspl.compute_losses(
        torch.zeros(1, 3), torch.tensor([0]), [torch.zeros(1, 3)], [torch.zeros(1, 3)], q0, args,
        reduce_mean=no_reduce)
    assert torch.allclose(q1, torch.tensor([0.5 * 0.5 + 0.5 / 3, 0.5 * 0.3 + 0.5 / 3, 0.5 * 0.2 + 0.5 / 3]))
    assert target.tolist() == [2] and mask.tolist() == [1.0]
    assert parts["loss_u"].item() == pytest.approx(-LOG(0.5 * 0.2 + 0.5 / 3), abs=1e-6)
    assert q0.tolist() == pytest.approx([0.5, 0.3, 0.2])  # the caller's estimate is not modified in place


def test_qhat_uses_raw_softmax_of_averaged_weak_views_and_the_rank_mean():
    # Weak views (log 3, 0) and (log 1, 0) average to (log 3 / 2, 0): raw softmax (sqrt 3, 1)/(sqrt 3 + 1), the mean
    # over the batch goes through reduce_mean (the all-reduce over ranks) before the momentum update.
    seen = []

    def reduce_mean(t):
        seen.append(t.clone())
        return torch.tensor([0.25, 0.75])  # what the other ranks' average would give

    args = make_args(tau=0.7, qhat_m=0.9, multiviews=True)
    w1, w2 = torch.tensor([[LOG(3), 0.0]]), torch.tensor([[0.0, 0.0]])
    _, _, q1, _, _ = debiaspl.compute_losses(torch.zeros(1, 2), torch.tensor([0]), [w1, w2],
                                             [torch.zeros(1, 2), torch.zeros(1, 2)], torch.tensor([0.5, 0.5]), args,
                                             reduce_mean=reduce_mean)
    s3 = math.sqrt(3)
    assert seen[0].tolist() == pytest.approx([s3 / (s3 + 1), 1 / (s3 + 1)], abs=1e-6)
    assert q1.tolist() == pytest.approx([0.9 * 0.5 + 0.1 * 0.25, 0.9 * 0.5 + 0.1 * 0.75], abs=1e-7)


# --------------------------------------------------------------------------------------- tau = 0 is FixMatch-EMAN
def fixmatch_eman_loss(z_x, y, z_w1, z_w2, z_s1, z_s2, threshold, lambda_u):
    """Textbook multi-view FixMatch with teacher logits z_w: hard pseudo-labels from the averaged and from each weak
    view, masked CE on both strong views, averaged over all samples and the 6 pairs."""
    loss_u = 0.0
    for z_w in ((z_w1 + z_w2) / 2, z_w1, z_w2):
        conf, pl = torch.softmax(z_w, 1).max(1)
        m = conf.ge(threshold).float()
        for z_s in (z_s1, z_s2):
            loss_u = loss_u + (F.cross_entropy(z_s, pl, reduction="none") * m).mean()
    return F.cross_entropy(z_x, y) + lambda_u * loss_u / 6


def test_tau_zero_equals_fixmatch_eman_loss_exactly():
    g = torch.Generator().manual_seed(0)
    z_x, y = torch.randn(4, 5, generator=g), torch.randint(0, 5, (4,), generator=g)
    z_w1, z_w2 = 3 * torch.randn(8, 5, generator=g), 3 * torch.randn(8, 5, generator=g)
    z_s1, z_s2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    qhat = torch.softmax(torch.randn(5, generator=g), 0)  # far from uniform: tau = 0 must ignore it
    args = make_args(tau=0.0, threshold=0.6)
    loss, parts, _, _, mask = debiaspl.compute_losses(z_x, y, [z_w1, z_w2], [z_s1, z_s2], qhat, args,
                                                      reduce_mean=no_reduce)
    assert 0 < mask.sum() < len(mask)
    assert torch.equal(loss, fixmatch_eman_loss(z_x, y, z_w1, z_w2, z_s1, z_s2, 0.6, 10.0))
    # one view each: L_x + lambda_u mean(mask CE(z_s, argmax softmax z_w))
    args1 = make_args(tau=0.0, threshold=0.6, multiviews=False)
    loss1, *_ = debiaspl.compute_losses(z_x, y, [z_w1], [z_s1], qhat, args1, reduce_mean=no_reduce)
    conf, pl = torch.softmax(z_w1, 1).max(1)
    expected = F.cross_entropy(z_x, y) + 10.0 * (F.cross_entropy(z_s1, pl, reduction="none") * conf.ge(0.6)).mean()
    assert torch.equal(loss1, expected)
    # and tau > 0 differs on the same batch
    loss_t, *_ = debiaspl.compute_losses(z_x, y, [z_w1, z_w2], [z_s1, z_s2], qhat, make_args(tau=0.4, threshold=0.6),
                                         reduce_mean=no_reduce)
    assert not torch.equal(loss_t, loss)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.feature_dim = 4

    def forward(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)


def test_tau_zero_train_step_equals_fixmatch_eman_step():
    torch.manual_seed(0)
    student = debiaspl.Classifier(TinyNet(), 3, dropout=0.0)
    model = debiaspl.FixMatch(student, eman=True).train()
    ref_s, ref_t = copy.deepcopy(model.main), copy.deepcopy(model.ema)
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    ref_opt = torch.optim.SGD(ref_s.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    views = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    args = make_args(tau=0.0, threshold=0.3, ema_m=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, *_ = debiaspl.train_step(model, opt, scaler, x, y, views, torch.full((3,), 1 / 3), args,
                                   torch.device("cpu"))
    # the same step by hand: student on (x, s1, s2), eval-mode teacher on (w1, w2), SGD, EMA of the state dict
    z = ref_s(torch.cat([x, views[2], views[3]]))
    with torch.no_grad():
        z_w1, z_w2 = ref_t(torch.cat(views[:2])).chunk(2)
    ref_loss = fixmatch_eman_loss(z[:2], y, z_w1, z_w2, z[2:6], z[6:], 0.3, 10.0)
    ref_opt.zero_grad()
    ref_loss.backward()
    ref_opt.step()
    with torch.no_grad():
        for (k, t), s in zip(ref_t.state_dict().items(), ref_s.state_dict().values()):
            t.copy_(s) if k.endswith("num_batches_tracked") else t.copy_(t * 0.9 + 0.1 * s)
    assert torch.equal(loss, ref_loss.detach())
    # the loss is bit-identical; gradients may differ in the last bit (autograd sums the slices' gradients in
    # another order)
    for a, b in zip(model.main.state_dict().values(), ref_s.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    for a, b in zip(model.ema.state_dict().values(), ref_t.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7)  # in-place foreach vs temporaries


# ----------------------------------------------------------------------------------------------------- EMAN
def test_eman_moves_bn_buffers_and_keeps_teacher_in_eval():
    torch.manual_seed(0)
    model = debiaspl.FixMatch(debiaspl.Classifier(TinyNet(), 3, dropout=0.45), eman=True)
    model.train()
    assert model.main.training and not model.ema.training and not model.ema.dropout.training
    assert all(not p.requires_grad for p in model.ema.parameters())
    teacher_before = {k: v.clone() for k, v in model.ema.state_dict().items()}
    with torch.no_grad():
        model.main(torch.randn(6, 3, 8, 8) * 3 + 1)  # moves the student's running stats (momentum 0.1)
        model.main.fc.weight.add_(1.0)
    student = model.main.state_dict()
    assert not torch.equal(student["backbone.bn.running_mean"], teacher_before["backbone.bn.running_mean"])
    model.update_ema(0.5)
    teacher = model.ema.state_dict()
    for k in ("backbone.bn.running_mean", "backbone.bn.running_var", "backbone.bn.weight", "fc.weight"):
        assert torch.allclose(teacher[k], 0.5 * teacher_before[k] + 0.5 * student[k], atol=1e-7), k
    assert teacher["backbone.bn.num_batches_tracked"].item() == student["backbone.bn.num_batches_tracked"].item() == 1
    # the teacher normalises with its running buffers: its output does not depend on the rest of the batch
    model.train()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        _, z_w, _ = model(x[:1], x, x)
        assert torch.allclose(z_w[:2], model.ema(x[:2]), atol=1e-6)


def test_moco_eman_checkpoint_initialises_student_and_teacher(tmp_path):
    # res50_moco_eman_800ep.pth.tar layout: state_dict with module.encoder_q.* (+ MoCo MLP head fc.0/fc.2),
    # module.encoder_k.*, queue; here for resnet18
    src = debiaspl.backbones.build("resnet18").state_dict()
    sd = {f"module.encoder_q.{k}": v + 0.5 for k, v in src.items() if not k.endswith("num_batches_tracked")}
    sd.update({f"module.encoder_k.{k}": v for k, v in src.items()})
    sd.update({"module.encoder_q.fc.0.weight": torch.randn(512, 512), "module.encoder_q.fc.0.bias": torch.zeros(512),
               "module.queue": torch.randn(128, 16)})
    torch.save({"state_dict": sd, "epoch": 800}, tmp_path / "moco_eman.pth.tar")
    args = argparse.Namespace(backbone="resnet18", pretrained=str(tmp_path / "moco_eman.pth.tar"),
                              trust_checkpoint=False, dropout=0.45, eman=True)
    model = debiaspl.build_model(args, 3)
    student, teacher = model.main.state_dict(), model.ema.state_dict()
    for k in ("backbone.conv1.weight", "backbone.layer4.1.bn2.running_var"):
        assert torch.equal(student[k], src[k[len("backbone."):]] + 0.5) and torch.equal(teacher[k], student[k])
    assert torch.equal(teacher["fc.weight"], student["fc.weight"]) and student["fc.weight"].shape == (3, 512)
    # a fine-tuned checkpoint whose classifier has this class count also gives its fc
    sup = {k: v for k, v in src.items()}
    sup.update({"fc.weight": torch.ones(3, 512), "fc.bias": torch.arange(3.0)})
    torch.save({"state_dict": {f"module.{k}": v for k, v in sup.items()}}, tmp_path / "sup.pth")
    args.pretrained = str(tmp_path / "sup.pth")
    model = debiaspl.build_model(args, 3)
    assert torch.equal(model.main.fc.bias, torch.arange(3.0)) and torch.equal(model.ema.fc.bias, torch.arange(3.0))


# ------------------------------------------------------------------------------------------------------- CLD
def test_cld_loss_hand_worked():
    # Teacher p_w rows (0.7,0.2,0.1), (0.6,0.1,0.3), (0.1,0.3,0.6); student p_s one-hot e0, e0, e2; T = 1.
    p_w = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.1, 0.3], [0.1, 0.3, 0.6]])
    p_s = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    # argmin groups (2, 1, 0), singletons: centroid 0 = row 2, centroid 1 = row 1, centroid 2 = row 0.
    # row 0: logits <e0, c_k> = (0.1, 0.6, 0.7), target 2: -log(e^.7/(e^.1+e^.6+e^.7)) = 0.897576
    # row 1: same logits, target 1: -log(e^.6/...) = 0.997576
    # row 2: logits <e2, c_k> = (0.6, 0.3, 0.1), target 0: -log(e^.6/(e^.6+e^.3+e^.1)) = 0.853287
    # mean = 0.916146
    assert debiaspl.cld_loss(p_s, p_w, "argmin", 1.0).item() == pytest.approx(0.916146, abs=1e-5)
    # argmax groups (0, 0, 2): centroid 0 = mean(row 0, row 1) = (0.65, 0.15, 0.2), group 1 empty = 0,
    # centroid 2 = row 2. rows 0, 1: logits (0.65, 0, 0.1), target 0: 0.741459; row 2: logits (0.2, 0, 0.6),
    # target 2: 0.797116. mean = 0.760011
    assert debiaspl.cld_loss(p_s, p_w, "argmax", 1.0).item() == pytest.approx(0.760011, abs=1e-5)
    # the temperature divides the logits: T = 0.5 doubles them
    doubled = F.cross_entropy(torch.tensor([[0.2, 1.2, 1.4], [0.2, 1.2, 1.4], [1.2, 0.6, 0.2]]),
                              torch.tensor([2, 1, 0]))
    assert debiaspl.cld_loss(p_s, p_w, "argmin", 0.5).item() == pytest.approx(doubled.item(), abs=1e-6)


def test_cld_enters_the_total_with_its_weight():
    g = torch.Generator().manual_seed(1)
    z = [torch.randn(6, 4, generator=g) for _ in range(5)]
    q = torch.full((4,), 0.25)
    base, _, _, _, _ = debiaspl.compute_losses(z[0], torch.zeros(6, dtype=torch.long), z[1:3], z[3:5], q,
                                               make_args(), reduce_mean=no_reduce)
    full, parts, _, _, _ = debiaspl.compute_losses(z[0], torch.zeros(6, dtype=torch.long), z[1:3], z[3:5], q,
                                                   make_args(CLDLoss=True, lambda_cld=0.3), reduce_mean=no_reduce)
    # multiview: CLD compares softmax of the averaged strong logits (no margin) with the averaged weak ones
    cld = debiaspl.cld_loss(torch.softmax((z[3] + z[4]) / 2, 1), torch.softmax((z[1] + z[2]) / 2, 1), "argmin", 0.07)
    assert parts["loss_cld"].item() == pytest.approx(cld.item(), rel=1e-6)
    assert full.item() == pytest.approx(base.item() + 0.3 * cld.item(), rel=1e-6)


def test_clip_loss_only_where_every_pseudo_label_failed():
    # CLIP mask (1, 1, 0); model masks (avg, w1, w2) = (0,0,0), (1,0,0), (0,0,0) -> use = (1, 0, 0).
    z = torch.zeros(3, 2)
    loss = debiaspl.clip_loss([z, z], torch.tensor([0, 1, 1]), torch.tensor([1.0, 1.0, 0.0]),
                              [torch.tensor([0.0, 1.0, 0.0]), torch.zeros(3), torch.zeros(3)])
    assert loss.item() == pytest.approx(LOG(2) / 3, abs=1e-6)  # one sample of three with CE = log 2, both views


# ---------------------------------------------------------------------------------------------- augmentation
def test_randaugment_always_applies_two_ops_with_magnitude_1_to_9():
    calls = []
    pool = [(lambda img, v, max_v, bias: calls.append(v) or img, None, None)]
    random.seed(0)
    ra = debiaspl.RandAugment(2, 10, pool=pool)
    img = Image.new("RGB", (20, 20), (100, 150, 200))
    for _ in range(300):
        ra(img)
    assert len(calls) == 600 and set(calls) == set(range(1, 10))
    # every op of the 16-op pool runs (SolarizeAdd crashed on NumPy >= 1.24 in the reference) and keeps the size
    arr = np.random.RandomState(0).randint(0, 256, (24, 24, 3)).astype(np.uint8)
    for op, max_v, bias in debiaspl.IMAGENET_POOL:
        out = op(Image.fromarray(arr), 9, max_v, bias)
        assert out.size == (24, 24) and out.mode == "RGB", op.__name__
    # magnitudes at v = 9: enhance 1.8*9/10 + 0.1 = 1.72, posterize int(3.6) + 4 = 7 bits, rotate int(27) degrees
    assert debiaspl._fparam(9, 1.8, 0.1) == pytest.approx(1.72) and debiaspl._iparam(9, 4, 4) == 7
    assert debiaspl._iparam(9, 30, 0) == 27 and debiaspl._iparam(9, 256, 0) == 230


def test_randaugment_mc_applies_ops_half_the_time_then_cutout():
    calls = []
    random.seed(1)
    saved = debiaspl.FIXMATCH_POOL[:]
    debiaspl.FIXMATCH_POOL[:] = [(lambda img, v, max_v, bias: calls.append(v) or img, None, None)]
    try:
        img = Image.new("RGB", (32, 32), (0, 0, 0))
        outs = [np.asarray(debiaspl.RandAugmentMC(2, 10, cutout=16)(img)) for _ in range(200)]
    finally:
        debiaspl.FIXMATCH_POOL[:] = saved
    assert 150 < len(calls) < 250  # 400 draws, each applied with p = 1/2
    assert all((o == 127).all(axis=2).any() for o in outs)  # a grey Cutout square in every image


def test_pad_crop_is_torchvision_reflect_crop():
    # same draws and same pixels as T.RandomCrop(size, padding, padding_mode="reflect"), RGB and grey, any shape
    from torchvision import transforms as T
    rs = np.random.RandomState(0)
    cases = [(Image.fromarray(rs.randint(0, 256, (32, 32, 3)).astype(np.uint8)), 32, 4),
             (Image.fromarray(rs.randint(0, 256, (20, 26)).astype(np.uint8)), 16, 3),
             (Image.fromarray(rs.randint(0, 256, (24, 24, 3)).astype(np.uint8)), 32, 4)]  # padded = crop: no draw
    for img, size, pad in cases:
        ours, ref = debiaspl.PadCrop(size, pad), T.RandomCrop(size, padding=pad, padding_mode="reflect")
        for seed in range(20):
            torch.manual_seed(seed)
            a = np.asarray(ours(img))
            after_a = torch.rand(1)
            torch.manual_seed(seed)
            b = np.asarray(ref(img))
            assert a.shape == b.shape and (a == b).all() and torch.equal(after_a, torch.rand(1)), (img.size, seed)
    # reflect excludes the edge pixel: row -1 is row 1. A 3x3 ramp padded by 2 and cropped at the top-left corner.
    ramp = Image.fromarray(np.arange(9, dtype=np.uint8).reshape(3, 3))
    torch.manual_seed(0)
    while True:  # draw until the crop is at (0, 0) of the padded image
        state = torch.get_rng_state()
        i, j = (torch.randint(0, 5, (1,)).item() for _ in range(2))
        if (i, j) == (0, 0):
            break
    torch.set_rng_state(state)
    assert np.asarray(debiaspl.PadCrop(3, 2)(ramp)).tolist() == [[8, 7, 6], [5, 4, 3], [2, 1, 0]]


def test_no_horizontal_flip_on_digits_and_svhn():
    # FixMatch flips on every dataset but SVHN; a mirrored digit is another glyph. Left half white: a pad-crop moves
    # it by at most 4 px, a flip puts the white on the right.
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :16] = 255
    img = Image.fromarray(arr)
    torch.manual_seed(0)
    for name, flips in (("digits", False), ("svhn", False), ("cifar10", True)):
        lab, weak, strong, _ = debiaspl.make_transforms(name, 32)
        mirrored = [(v[:, :, :16].mean() < v[:, :, 16:].mean()).item() for v in (weak(img) for _ in range(40))]
        assert any(mirrored) == flips and (not flips or not all(mirrored)), name
        assert lab is weak


def test_learning_rate_schedules():
    a = argparse.Namespace(lr=1.0, epochs=10, warmup_epoch=2, lr_schedule="cos", schedule=[5, 8])
    # 50 iterations over 10 epochs, 5 per epoch: warmup linear per iteration over 10 iterations, counted from 1
    assert debiaspl.learning_rate(0, 50, a) == pytest.approx(0.1)
    assert debiaspl.learning_rate(9, 50, a) == pytest.approx(1.0)
    # cosine per epoch after warmup: constant within an epoch, never 0
    assert debiaspl.learning_rate(10, 50, a) == debiaspl.learning_rate(14, 50, a) == pytest.approx(1.0)
    assert debiaspl.learning_rate(15, 50, a) == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)))
    assert debiaspl.learning_rate(49, 50, a) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    a.lr_schedule = "step"
    assert [debiaspl.learning_rate(s, 50, a) for s in (24, 25, 40)] == pytest.approx([1.0, 0.1, 0.01])
    a.lr_schedule, a.warmup_epoch = "fixmatch_cos", 0
    assert debiaspl.learning_rate(25, 50, a) == pytest.approx(math.cos(7 * math.pi * 25 / (16 * 50)))


def test_max_iter_stretches_the_epoch_schedule():
    # --epochs 10 --max_iter 100: an epoch of the schedule is 10 iterations, whatever one pass over the data is.
    # Every schedule at iteration 2k of 100 is the one at iteration k of 50 (5 per epoch), warmup included.
    # (The warmup ramp reaches k + 1 of 10 at iteration k, i.e. 2k + 2 of 20 at iteration 2k + 1.)
    a = argparse.Namespace(lr=1.0, epochs=10, warmup_epoch=2, lr_schedule="step", schedule=[5, 8])
    for name in ("step", "cos", "fixmatch_cos"):
        a.lr_schedule = name
        for k in range(50):
            stretched = debiaspl.learning_rate(2 * k + (1 if k < 10 else 0), 100, a)
            assert stretched == pytest.approx(debiaspl.learning_rate(k, 50, a)), (name, k)
    a.lr_schedule = "step"
    assert [debiaspl.learning_rate(s, 100, a) for s in (49, 50, 79, 80)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    assert [debiaspl.learning_rate(s, 100, a) for s in (18, 19, 20)] == pytest.approx([0.95, 1.0, 1.0])  # warmup 20
    # an epoch of the schedule need not be a whole number of iterations: 7 iterations over 2 epochs
    a.schedule, a.epochs, a.warmup_epoch = [1], 2, 0
    assert [debiaspl.learning_rate(s, 7, a) for s in range(7)] == pytest.approx([1.0] * 4 + [0.1] * 3)
    # run_length: --max_iter overrides --epochs x iterations per epoch, the epoch stays the data's for evaluations
    args = debiaspl.parse_args(["--dataset", "cifar10", "--epochs", "10", "--max_iter", "100", "--batch_size", "4",
                                "--mu", "2"])
    assert debiaspl.run_length(args, 40) == (5, 100, 100) and args.eval_interval == 5
    args = debiaspl.parse_args(["--dataset", "cifar10", "--epochs", "10", "--batch_size", "4", "--mu", "2"])
    assert debiaspl.run_length(args, 40) == (5, 50, 50)


def test_stop_after_and_the_epoch_spelling_of_eval_interval():
    args = debiaspl.parse_args(["--dataset", "cifar10", "--epochs", "10", "--epoch_iters", "3", "--stop_after", "7",
                                "--eval_freq", "2"])
    assert debiaspl.run_length(args, 1000) == (3, 30, 7)  # the schedule's length stays 30: stop at 7
    assert args.eval_interval == 6  # --eval_freq 2 (epochs) = 2 x 3 iterations
    assert debiaspl.run_length(debiaspl.parse_args(["--stop_after", "99", "--max_iter", "20"]), 10)[1:] == (20, 20)
    with pytest.raises(UserError, match="--eval_freq 2 .* and --eval_interval 5 .* pass one"):
        debiaspl.run_length(debiaspl.parse_args(["--eval_freq", "2", "--eval_interval", "5"]), 100)
    with pytest.raises(UserError, match="--stop_after 0: must be at least 1"):
        debiaspl.run_length(debiaspl.parse_args(["--stop_after", "0"]), 100)


def test_defaults_per_dataset_family():
    # ImageNet-style folders: the reference's argparse defaults
    for name in ("imagefolder", "imagenet"):
        a = debiaspl.resolve_defaults(debiaspl.parse_args(["--dataset", name]))
        assert a.recipe == "imagenet"
        assert (a.lambda_u, a.threshold, a.tau, a.weight_decay, a.nesterov, a.backbone, a.dropout, a.lr_schedule,
                a.image_size, a.exclude_labeled, a.clip_threshold) == \
            (10.0, 0.7, 1.0, 1e-4, False, "resnet50", 0.45, "step", 224, True, 0.4)
    # CIFAR/SVHN/digits (and every other dataset), trained from scratch: FixMatch's CIFAR values
    for name in ("cifar10", "svhn", "digits", "cub200"):
        a = debiaspl.resolve_defaults(debiaspl.parse_args(["--dataset", name]))
        assert a.recipe == "cifar"
        assert (a.lambda_u, a.threshold, a.tau, a.weight_decay, a.nesterov, a.backbone, a.dropout, a.lr_schedule,
                a.image_size, a.exclude_labeled) == \
            (1.0, 0.95, 0.4, 5e-4, True, "wrn28_2", 0.0, "fixmatch_cos", 32, False), name
    # a flag on the command line always wins
    a = debiaspl.parse_args(["--dataset", "digits", "--lambda_u", "10", "--threshold", "0.7", "--tau", "0",
                             "--wd", "0", "--no-nesterov"])
    debiaspl.resolve_defaults(a)
    assert (a.lambda_u, a.threshold, a.tau, a.weight_decay, a.nesterov) == (10.0, 0.7, 0.0, 0.0, False)
    # the recipe named explicitly beats the one the dataset implies; an explicit flag still beats the recipe
    a = debiaspl.resolve_defaults(debiaspl.parse_args(["--dataset", "cifar10", "--recipe", "imagenet", "--tau", "0.2",
                                                       "--no-exclude_labeled"]))
    assert (a.recipe, a.backbone, a.image_size, a.lambda_u, a.tau, a.exclude_labeled) == \
        ("imagenet", "resnet50", 224, 10.0, 0.2, False)
    # defaults that follow other flags, not the dataset: --cos sets the schedule unless it is given, --zero_shot
    # lowers the CLIP threshold
    a = debiaspl.resolve_defaults(debiaspl.parse_args(["--dataset", "cifar10", "--cos", "--zero_shot"]))
    assert (a.lr_schedule, a.clip_threshold) == ("cos", 0.3)
    a = debiaspl.resolve_defaults(debiaspl.parse_args(["--dataset", "imagenet", "--cos", "--lr_schedule", "step"]))
    assert a.lr_schedule == "step"
    with pytest.raises(SystemExit):
        debiaspl.parse_args(["--recipe", "svhn"])  # the choices are the recipes


def quadrant_images(labels, size, noise, g):
    """Class c (0..3) = quadrant c brighter by 2, plus Gaussian noise: a separable set."""
    x = noise * torch.randn(len(labels), 3, size, size, generator=g)
    h = size // 2
    for k, c in enumerate(labels.tolist()):
        r, col = divmod(c, 2)
        x[k, :, r * h:(r + 1) * h, col * h:(col + 1) * h] += 2.0
    return x


def labeled_ce_trajectory(flags, steps=15, seed=0):
    """Labeled CE of `steps` train_steps of debiaspl with the digits defaults + `flags`, on a separable 4-class set
    of 8-px images: 8 labeled + 16 unlabeled (weak = +N(0, 0.1), strong = +N(0, 0.5)) per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trajectory of the diverging setting is chaotic: pin the kernels
    try:
        args = debiaspl.parse_args(["--dataset", "digits", "--backbone", "resnet18", *flags])
        debiaspl.resolve_defaults(args)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = debiaspl.build_model(args, 4).train()
        opt = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                              nesterov=args.nesterov)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        qhat, losses = torch.full((4,), 0.25), []
        for _ in range(steps):
            y, y_u = torch.arange(8) % 4, torch.randint(0, 4, (16,), generator=g)
            x, base = quadrant_images(y, 8, 0.3, g), quadrant_images(y_u, 8, 0.3, g)
            views = [base + 0.1 * torch.randn(base.shape, generator=g),
                     base + 0.5 * torch.randn(base.shape, generator=g)]
            _, parts, qhat, _, _ = debiaspl.train_step(model, opt, scaler, x, y, views, qhat, args,
                                                       torch.device("cpu"))
            losses.append(parts["loss_x"].item())
    finally:
        torch.set_num_threads(threads)
    return losses


def test_digits_defaults_drive_the_labeled_loss_down():
    # The failing digits command (resnet18, lr 0.03, no method flags), on a separable set. The digits defaults
    # (FixMatch's lambda_u 1, threshold 0.95) fit the labeled images within 8 iterations. With the reference's
    # ImageNet values as defaults, the student's confident noise was trained with weight 10 and the labeled CE blew up
    # far above chance (log 4 = 1.4). The exact trajectories depend on the CPU's kernels (the diverging one is
    # chaotic), so only margins are pinned: on one machine, seeds 0 and 1 gave mean CE 0.59 / 0.63 with the defaults
    # and 9.2 / 7.5 with the reference values, peaks 58 and 16.
    reference_flags = ["--lambda_u", "10", "--threshold", "0.7", "--tau", "1", "--wd", "1e-4", "--no-nesterov"]
    ours, theirs = [], []
    for seed in (0, 1):
        losses = labeled_ce_trajectory(["--lr", "0.03"], seed=seed)
        reference = labeled_ce_trajectory(["--lr", "0.03", *reference_flags], seed=seed)
        assert losses[0] == pytest.approx(LOG(4), abs=0.6) and reference[0] == losses[0]  # chance, same start
        assert float(np.median(losses[8:])) < 0.05, losses
        assert max(reference) > 10, reference
        ours, theirs = ours + losses, theirs + reference
    assert np.mean(theirs) > 4 * np.mean(ours), (np.mean(theirs), np.mean(ours))


def test_reference_flag_spellings_are_accepted():
    a = debiaspl.parse_args(["-b", "8", "-j", "2", "--learning-rate", "0.3", "--lambda-u", "2", "--ema-m", "0.9",
                             "--anno-percent", "0.2", "--self-pretrained", "x.pth", "--wd", "0.1", "--arch",
                             "resnet50_encoder", "--warmup-epoch", "5", "--lambda-cld", "0.1", "--CLDLoss",
                             "--multiviews", "--eman", "--cos", "--eval-freq", "2"])
    assert (a.batch_size, a.workers, a.lr, a.lambda_u, a.ema_m, a.anno_percent, a.pretrained, a.weight_decay,
            a.backbone, a.warmup_epoch, a.lambda_cld, a.CLDLoss, a.multiviews, a.eman, a.cos, a.eval_freq) == \
        (8, 2, 0.3, 2.0, 0.9, 0.2, "x.pth", 0.1, "resnet50", 5, 0.1, True, True, True, True, 2)


# ------------------------------------------------------------------------------------------------------- data
def test_zero_shot_reader_uses_the_pseudo_label_column(tmp_path):
    root = fakedata.write_imagefolder(tmp_path / "imnet", num_classes=3, per_class_train=4, size=16, wrong_pseudo=2)
    train = debiaspl.datasets.load("imagefolder", root, "train")
    args = argparse.Namespace(zero_shot=True, root=str(root), trainindex_x="CLIPPseudoLabel0.95.csv",
                              trainindex_u="CLIPPseudoLabel0.95-Unselected.csv", num_labeled=None,
                              anno_percent=0.1, exclude_labeled=True, seed=0)
    x_idx, x_labels, u_idx, (clip_y, clip_p) = debiaspl.build_splits(args, train, 3)
    lines = (root / "indexes" / "CLIPPseudoLabel0.95.csv").read_text().split()[1:]
    assert x_idx.tolist() == [int(l.split(",")[0]) for l in lines]
    assert x_labels.tolist() == [int(l.split(",")[1]) for l in lines]
    x_set = train.subset(x_idx, transform=None, targets=x_labels)
    wrong = [k for k in range(len(x_idx)) if x_labels[k] != train.targets[x_idx[k]]]
    assert len(wrong) == 2
    for k in wrong:  # the labeled loss sees CLIP's label, not the folder's truth (the reference's leak)
        assert x_set[k][1] == x_labels[k] != train.targets[x_idx[k]]
    u_lines = (root / "indexes" / "CLIPPseudoLabel0.95-Unselected.csv").read_text().split()[1:]
    assert clip_y.tolist() == [int(l.split(",")[1]) for l in u_lines]
    assert clip_p.tolist() == pytest.approx([float(l.split(",")[2]) for l in u_lines])


def test_index_files_resolve_under_root_indexes_and_as_paths(tmp_path):
    root = fakedata.write_imagefolder(tmp_path / "imnet", num_classes=3, per_class_train=4, size=16)
    train = debiaspl.datasets.load("imagefolder", root, "train")
    np.save(tmp_path / "selected.npy", np.array([2, 7, 9]))
    args = argparse.Namespace(zero_shot=False, root=str(root), trainindex_x=str(tmp_path / "selected.npy"),
                              trainindex_u=None, num_labeled=None, anno_percent=0.1, exclude_labeled=True, seed=0)
    x_idx, x_labels, u_idx, clip = debiaspl.build_splits(args, train, 3)
    assert x_idx.tolist() == [2, 7, 9] and x_labels is None and clip is None
    assert u_idx.tolist() == [i for i in range(12) if i not in (2, 7, 9)]  # the complement
    args.trainindex_x = "train_1p_index.csv"  # a bare name: ROOT/indexes/
    x_idx, *_ = debiaspl.build_splits(args, train, 3)
    assert len(x_idx) == 3
    args.trainindex_x, args.anno_percent = None, 0.5  # random per-class split, seeded
    x_idx, *_ = debiaspl.build_splits(args, train, 3)
    assert sorted(np.bincount(train.targets[x_idx]).tolist()) == [2, 2, 2]


# ------------------------------------------------------------------------------------------ end to end (CLI)
@pytest.fixture(scope="module")
def imnet(tmp_path_factory):
    return fakedata.write_imagefolder(tmp_path_factory.mktemp("data") / "imnet", num_classes=3, per_class_train=8,
                                      size=36)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return fakedata.write_cifar(tmp_path_factory.mktemp("data") / "cifar10", per_class_train=6)


IMAGENET_FLAGS = ["--trainindex_x", "train_1p_index.csv", "--trainindex_u", "train_99p_index.csv", "--backbone",
               "resnet18", "--batch_size", "4", "--mu", "2", "--tau", "0.4", "--CLDLoss", "--multiviews", "--eman",
               "--max_iter", "2", "--workers", "0", "--image_size", "32"]


def test_cli_imagenet_layout_1p_command_then_resume_equals_uninterrupted(imnet, tmp_path, env):
    # the ImageNet 1% command (2 iterations); then a 4-iteration run stopped after 2 (--stop_after) and continued
    # with --resume auto, against the uninterrupted 4-iteration run
    proc = run_script("debiaspl.py", "--root", imnet, *IMAGENET_FLAGS, "--logdir", tmp_path, cwd=tmp_path, env=env)
    assert_ok(proc)
    run = tmp_path / "debiaspl-imagefolder-train_1p_index-s0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iters"] == 2 and summary["labeled"] == 3 and summary["unlabeled"] == 21
    assert summary["teacher_final_top1"] is not None and summary["final_top1"] is not None
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["qhat"].shape == (3,) and ckpt["qhat"].sum().item() == pytest.approx(1.0)
    assert not torch.equal(ckpt["qhat"], torch.full((3,), 1 / 3))  # the estimate moved and was saved
    assert any(k.startswith("ema.") for k in ckpt["model"])
    assert (run / "metrics.jsonl").read_text().count("\n") == 1  # 21 // 8 = 2 iterations per epoch: one eval

    four = [f if f != "2" or IMAGENET_FLAGS[i - 1] != "--max_iter" else "4" for i, f in enumerate(IMAGENET_FLAGS)]
    proc = run_script("debiaspl.py", "--root", imnet, *four, "--stop_after", "2", "--logdir", tmp_path, "--run_name",
                      "cut", cwd=tmp_path, env=env)
    assert_ok(proc)
    assert "stopped after iteration 2 of 4 (--stop_after); continue with --resume auto" in proc.stdout
    run = tmp_path / "cut"
    assert not (run / "summary.json").exists()  # not finished: run.sh's rows and the reports see no result yet
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    assert_ok(run_script("debiaspl.py", "--root", imnet, *four, "--logdir", tmp_path, "--run_name", "cut",
                         "--resume", "auto", cwd=tmp_path, env=env))
    assert json.loads((run / "summary.json").read_text())["iters"] == 4
    assert_ok(run_script("debiaspl.py", "--root", imnet, *four, "--logdir", tmp_path, "--run_name", "full",
                         cwd=tmp_path, env=env))
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert torch.equal(a["qhat"], b["qhat"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["iter"], m["top1"], m["teacher_top1"]) for m in ma] == \
        [(m["iter"], m["top1"], m["teacher_top1"]) for m in mb]
    assert [m["iter"] for m in ma] == [2, 4]


def test_cli_imagenet_layout_dali(imnet, tmp_path, env):
    proc = run_script("debiaspl.py", "--root", imnet, *IMAGENET_FLAGS, "--dali", "--logdir", tmp_path, cwd=tmp_path,
                      env=env)
    assert_ok(proc)
    summary = json.loads((tmp_path / "debiaspl-imagefolder-train_1p_index-s0" / "summary.json").read_text())
    assert summary["iters"] == 2


def test_cli_cifar10(cifar, tmp_path, env):
    proc = run_script("debiaspl.py", "--root", cifar, "--dataset", "cifar10", "--num_labeled", "40", "--batch_size",
                      "8", "--mu", "2", "--max_iter", "2", "--workers", "0", "--logdir", tmp_path, cwd=tmp_path,
                      env=env)
    assert_ok(proc)
    summary = json.loads((tmp_path / "debiaspl-cifar10-40-s0" / "summary.json").read_text())
    assert summary["iters"] == 2 and summary["labeled"] == 40 and summary["unlabeled"] == 60
    # the split is saved in the run folder in the index-file format, so it can be fed back as --trainindex_x
    split = splits.read_index_file(tmp_path / "debiaspl-cifar10-40-s0" / "labeled.csv", 60)
    assert len(split) == 40 and len(np.unique(np.asarray(datasets.load("cifar10", cifar, "train").targets)[split])) == 10


def test_stop_after_keeps_the_schedule_of_the_whole_run(cifar, tmp_path, capsys, one_thread):
    # 2 epochs of 2 iterations = 4, stopped after 3: the learning rate of iteration 3 is the 4-iteration run's (the
    # CIFAR recipe's per-iteration cos(7 pi k / 16 K), K = 4), not a 3-iteration run's; --eval_freq 1 (epochs)
    # evaluates every 2 iterations, and at the stop.
    argv = ["--root", str(cifar), "--dataset", "cifar10", "--num_labeled", "20", "--backbone", "resnet18",
            "--batch_size", "4", "--mu", "1", "--epochs", "2", "--epoch_iters", "2", "--eval_freq", "1", "--workers",
            "0", "--device", "cpu", "--logdir", str(tmp_path), "--run_name", "cut"]
    debiaspl.main(argv + ["--stop_after", "3"])
    assert "stopped after iteration 3 of 4 (--stop_after); continue with --resume auto" in capsys.readouterr().out
    run = tmp_path / "cut"
    assert not (run / "summary.json").exists()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    args = debiaspl.resolve_defaults(debiaspl.parse_args(argv))
    assert ckpt["step"] == 3 and ckpt["optimizer"]["param_groups"][0]["lr"] == debiaspl.learning_rate(2, 4, args) \
        == pytest.approx(0.1 * math.cos(7 * math.pi * 2 / (16 * 4)))
    assert debiaspl.learning_rate(2, 4, args) != pytest.approx(debiaspl.learning_rate(2, 3, args))
    flags = json.loads((run / "args.json").read_text())["flags"]
    assert (flags["recipe"], flags["eval_interval"], flags["eval_freq"], flags["stop_after"]) == ("cifar", 2, 1, 3)
    debiaspl.main(argv + ["--resume", "auto"])
    assert json.loads((run / "summary.json").read_text())["iters"] == 4
    assert [json.loads(l)["iter"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [2, 3, 4]


def test_torchrun_two_processes_with_clip(imnet, tmp_path, env):
    # --use_clip finds ROOT/indexes/<u stem>_clip_predictions_ranked.pth.tar: top-k predictions per unlabeled row
    g = torch.Generator().manual_seed(0)
    torch.save({"probs_list": torch.rand(21, 2, generator=g).sort(1, descending=True).values,
                "preds_list": torch.randint(0, 3, (21, 2), generator=g)},
               imnet / "indexes" / "train_99p_index_clip_predictions_ranked.pth.tar")
    proc = run_script("debiaspl.py", "--root", imnet, *IMAGENET_FLAGS, "--use_clip", "--logdir", tmp_path, "--device",
                      "cpu", cwd=tmp_path, env=env, torchrun=2)
    assert_ok(proc)
    run = tmp_path / "debiaspl-imagefolder-train_1p_index-s0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iters"] == 2
    assert torch.load(run / "checkpoint.pt", weights_only=True)["qhat"].sum().item() == pytest.approx(1.0)


def test_zero_shot_end_to_end(imnet, tmp_path):
    debiaspl.main(["--root", str(imnet), "--zero_shot", "--trainindex_x", "CLIPPseudoLabel0.95.csv", "--trainindex_u",
                   "CLIPPseudoLabel0.95-Unselected.csv", "--backbone", "resnet18", "--image_size", "16",
                   "--batch_size", "4", "--mu", "1", "--multiviews", "--eman", "--max_iter", "1", "--workers", "0",
                   "--logdir", str(tmp_path), "--device", "cpu", "--run_name", "zsl"])
    summary = json.loads((tmp_path / "zsl" / "summary.json").read_text())
    assert summary["labeled"] == 12 and summary["unlabeled"] == 12 and summary["iters"] == 1


# ------------------------------------------------------------------------------------------------ bad inputs
def test_index_out_of_range_is_one_clear_line(imnet, tmp_path, capsys):
    # through the entry point the command line uses: one "error:" line on stderr, exit 2, nothing written
    bad = tmp_path / "bad.csv"
    bad.write_text("Index,ImageID\n0,a\n99,b\n")
    argv = ["--root", str(imnet), "--trainindex_x", str(bad), "--backbone", "resnet18", "--batch_size", "4", "--mu",
            "2", "--max_iter", "1", "--workers", "0", "--logdir", str(tmp_path), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        runlib.entry(lambda: debiaspl.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad.csv:3" in lines[0] and "out of range" in lines[0]
    assert "Traceback" not in err
    assert not any(tmp_path.glob("debiaspl-*"))


def test_bad_inputs_in_process(imnet, tmp_path):
    base = ["--root", str(imnet), "--backbone", "resnet18", "--batch_size", "4", "--mu", "2", "--max_iter", "1",
            "--workers", "0", "--logdir", str(tmp_path), "--device", "cpu"]
    no_index = tmp_path / "noindex.csv"
    no_index.write_text("ImageID,Label\na,1\n")
    with pytest.raises(UserError, match="no 'Index' column"):
        debiaspl.main(base + ["--trainindex_x", str(no_index)])
    with pytest.raises(UserError, match="--cls 1000 but .* has 3 classes"):
        debiaspl.main(base + ["--cls", "1000"])
    bad_pl = tmp_path / "pl.csv"
    bad_pl.write_text("Index,PseudoLabel\n0,5\n")
    with pytest.raises(UserError, match="PseudoLabel 5 is out of range"):
        debiaspl.main(base + ["--zero_shot", "--trainindex_x", str(bad_pl), "--trainindex_u",
                              "CLIPPseudoLabel0.95-Unselected.csv"])
    with pytest.raises(UserError, match="needs a Probs column"):
        debiaspl.main(base + ["--zero_shot", "--trainindex_x", "CLIPPseudoLabel0.95.csv", "--trainindex_u",
                              "CLIPPseudoLabel0.95.csv"])
    with pytest.raises(UserError, match="--trainindex_x nope.csv: no such file"):
        debiaspl.main(base + ["--trainindex_x", "nope.csv"])
    preds = tmp_path / "clip.pth.tar"
    torch.save({"probs_list": torch.rand(5, 2), "preds_list": torch.zeros(5, 2, dtype=torch.long)}, preds)
    with pytest.raises(UserError, match="5 rows but the unlabeled set has 21"):
        debiaspl.main(base + ["--trainindex_x", "train_1p_index.csv", "--use_clip", "--multiviews",
                              "--clip_predictions", str(preds)])
    assert not any(tmp_path.glob("debiaspl-*"))  # nothing written for a bad input
