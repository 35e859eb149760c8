"""MetaSemi: Semi-Supervised Learning with Meta-Gradient (Xiao, Zhang, Zhang, Xu, Sun, Zheng; AISTATS 2021).

Paper: https://proceedings.mlr.press/v130/xiao21a.html (arXiv 2007.03966). Reference code: Sakura03/SemiMeta.

Idea. The pseudo-labels of the unlabeled batch are treated as free variables chosen so that one SGD step on them
would lower the loss on the labeled batch. Online, per mini-batch: start from the model's own eval-mode
predictions p = softmax(f(x_u)); take d = grad of the labeled cross-entropy over all parameters; the meta-gradient
of the labeled loss with respect to the pseudo-labels is proportional to J d (J = dp/dtheta), approximated by a
central finite difference g = (p(theta + eps d) - p(theta - eps d)) / eps with ||eps d|| = --epsilon; the
pseudo-labels move to y = p - lr * g (the current learning rate as step), clamped at zero and renormalised per row.
The network is then trained on mixup of labeled with unlabeled images (soft targets lam onehot(y_l) + (1-lam) y)
plus a consistency term ||softmax(f(x_u)) - y||^2 whose weight ramps up linearly. `--meta_grad jvp` computes
J d exactly with torch.func.jvp instead of the finite difference.

Launch (paper recipes; every setting: bash run.sh metasemi):
  1 GPU:   python metasemi.py --root ./data/cifar10 --dataset cifar10 --num_labeled 4000 --backbone convlarge \\
               --mix_up --alpha 1.0 --seed 8469 --weight_decay 1e-4
  N GPUs:  torchrun --nproc_per_node 8 metasemi.py --root ./imagenet_rec --dataset imagenet --backbone resnet18 \\
               --dali --batch_size 512 --alpha 1.0          # 8 x 64 labeled + 8 x 64 unlabeled, 600 epochs
  CPU:     python metasemi.py --root ./data/svhn --dataset svhn --num_labeled 1000 --mix_up --alpha 0.1 \\
               --device cpu --stop_after 100 --workers 2
ImageNet-style roots: RecordIO as the reference (train_label / train_unlabel / val .rec + .idx; the folders that
split_imagenet.py makes are packed with `python -m common.dali pack D/labeled D/train_label --classes_from D/train`
and likewise for unlabeled and val), or image folders train/ + val/ with a class-balanced labeled split of
--num_labeled images drawn from --seed, the rest unlabeled. Without --dali both are read with torchvision.

Feature map (the paper's Fig. 3, the reference's plot_features.py): `--plot_features N` ends the run with a 2-D
t-SNE of the penultimate-layer features (the classifier's input; eval mode, test-time transform) of N labeled, N
unlabeled and N test images drawn from --seed (all of a smaller set): features.png, four panels (each set coloured
by true class, then the three sets together coloured by set), and features.npz with the coordinates and labels.
For a finished run, repeat its command with `--resume auto --plot_features N`: resumed at its last iteration, the
run trains and evaluates nothing and draws the map from the final checkpoint (the same images and, on the same
device, the same coordinates as at the end of training). Not with --dali (the images are read with torchvision).
"""
import argparse
import contextlib
import math
import os
import time
import warnings
from pathlib import Path

import common  # noqa: F401  first: it sets how OpenMP threads wait, which must precede torch
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from common import UserError, backbones, dali, datasets, distributed, loaders, splits
from common import run as runlib

SMALL = ('cifar10', 'cifar100', 'svhn', 'digits')  # digits: scikit-learn's, for CPU runs
LARGE = ('imagenet', 'imagefolder')

# ----------------------------------------------------------------------------------------------------------- recipes
# The per-dataset defaults (--recipe; a flag given on the command line wins). "-" (None) in --help's table: the value
# is computed, as each flag's help says. The CIFAR/SVHN milestones and warmup are iterations of its 400k-iteration
# schedule: with another --max_iter they scale with it (choose_recipe); ImageNet's warmup is in epochs of --epochs.
RECIPES = {
    # CIFAR-10/100 and SVHN at 32 px: the reference's train_meta.py defaults
    "cifar": dict(backbone="convlarge", mix_up=False, batch_size=128, eval_batch_size=100, num_labeled=4000,
                  max_iter=400000, epochs=None, warmup=4000, milestones=[300000, 350000], gamma=0.1,
                  eval_interval=400, imcrop=None),
    # ImageNet-style data (RecordIO or image folders): the reference's ImageNet run, 8 GPUs x 64, cosine
    "imagenet": dict(backbone="resnet18", mix_up=True, batch_size=512, eval_batch_size=None, num_labeled=None,
                     max_iter=None, epochs=600, warmup=5, milestones=None, gamma=None, eval_interval=None,
                     imcrop=224),
}
RECIPE_OF = {**{name: "cifar" for name in SMALL}, **{name: "imagenet" for name in LARGE}}  # dataset -> its recipe


# ------------------------------------------------------------------------------------------------------------- flags
def parse_args(argv=None):
    p = runlib.Parser(description=__doc__.split("\n\n")[0], recipes=RECIPES)
    g = p.add_argument_group("data")
    g.add_argument("--root", "--data_path", "--data", shared=True, default="./data",
                   help="CIFAR/SVHN files, or an ImageNet-style RecordIO / image-folder root (alias --data_path)")
    g.add_argument("--dataset", shared=True, default=None, choices=SMALL + LARGE,
                   help="a root holding train_label/train_unlabel/val .rec + .idx is imagenet")
    g.add_argument("--download", shared=True, help="CIFAR/SVHN only")
    g.add_argument("--recipe", shared=True, default=None, choices=list(RECIPES),
                   help="cifar for CIFAR-10/100 and SVHN, imagenet for ImageNet-style data")
    g.add_argument("--num_labeled", "--num_label", shared=True, default=None, recipe=True,
                   help="class-balanced, drawn from --seed (alias --num_label, the reference's); imagenet recipe: "
                        "an image folder's train/ gives 10%% of it rounded down to a multiple of the class count, a "
                        "RecordIO root its own split")
    g.add_argument("--batch_size", shared=True, default=None, recipe=True,
                   help="the same for the labeled and the unlabeled stream (imagenet: 512 = 8 GPUs x 64)")
    g.add_argument("--eval_batch_size", type=int, default=None, recipe=True,
                   help="test images per batch over all ranks (global); imagenet recipe: 50 per process, computed "
                        "from the number of processes")
    g.add_argument("--workers", "--num_workers", "-j", shared=True, default=4, help="DALI threads with --dali")
    g.add_argument("--dali", shared=True, help="ImageNet-style data; on the GPU when --device is cuda")
    g.add_argument("--imcrop", type=int, default=None, recipe=True,
                   help="ImageNet: training and validation crop; validation resizes the shorter side to "
                        "crop * 256 / 224 first")
    g.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # torch.distributed.launch

    g = p.add_argument_group("model")
    g.add_argument("--backbone", "--arch", "-a", "--architecture", shared=True, default=None, recipe=True,
                   help="one of common.backbones (aliases --arch, -a, the reference's)")
    g.add_argument("--pretrained", shared=True, default=None,
                   help="the backbone's; the classifier head starts at random (default: random init, as in "
                        "the paper)")

    g = p.add_argument_group("method")
    g.add_argument("--meta", action=argparse.BooleanOptionalAction, default=True,
                   help="the meta step; --no-meta trains on the plain eval-mode predictions (ablation)")
    g.add_argument("--meta_grad", default="fd", choices=["fd", "jvp"],
                   help="meta-gradient: fd = central finite difference of the reference, jvp = exact (torch.func)")
    g.add_argument("--meta_p", default="eval", choices=["eval", "mean"],
                   help="fd's p: eval = softmax(f(x_u)), the reference's; mean = the mean of the two perturbed "
                        "predictions, one forward fewer (11 passes for the baseline's 7, not 12)")
    g.add_argument("--epsilon", type=float, default=0.01, help="global L2 norm of the finite-difference step")
    g.add_argument("--mix_up", action=argparse.BooleanOptionalAction, default=None, recipe=True,
                   help="mixup of labeled with unlabeled images and soft targets (the reference's defaults: off on "
                        "CIFAR/SVHN, on for ImageNet; every reported result uses it)")
    g.add_argument("--alpha", type=float, default=1.0, help="Beta(alpha, alpha) of the mixup coefficient")
    g.add_argument("--weight", type=float, default=1.0,
                   help="consistency weight (ramped up over --warmup on CIFAR/SVHN, constant on ImageNet)")

    g = p.add_argument_group("optimisation and schedule")
    g.add_argument("--lr", "--learning_rate", shared=True, default=0.1, help="peak value, also the meta step")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", "--wd", shared=True, default=1e-4, help="on every parameter")
    g.add_argument("--max_iter", "--total_steps", shared=True, default=None, recipe=True,
                   help="alias --total_steps, the reference's; imagenet recipe: --epochs x iterations per "
                        "unlabeled pass; with --epochs too, it wins and an epoch of the schedule is max_iter / "
                        "epochs iterations")
    g.add_argument("--epochs", shared=True, default=None, recipe=True, help="ImageNet: passes over the unlabeled data")
    g.add_argument("--stop_after", shared=True, default=None)
    g.add_argument("--warmup", type=int, default=None, recipe=True,
                   help="linear lr warmup: iterations on CIFAR/SVHN (also the consistency ramp-up; the recipe's "
                        "4000 of 400k scale with --max_iter), epochs on ImageNet")
    g.add_argument("--milestones", nargs="+", type=int, default=None, recipe=True,
                   help="CIFAR/SVHN: iterations after which the lr is multiplied by --gamma (the recipe's 300k and "
                        "350k of 400k scale with --max_iter; given ones are taken as they are)")
    g.add_argument("--gamma", type=float, default=None, recipe=True, help="CIFAR/SVHN: lr decay at --milestones")
    g.add_argument("--seed", shared=True, default=1234, help="of the labeled split, the data order and the init")
    g.add_argument("--eval_interval", "--test_freq", shared=True, default=None, recipe=True,
                   help="each also writes the checkpoint (alias --test_freq, the reference's); imagenet recipe: "
                        "one pass over the unlabeled data")
    runlib.add_standard_flags(p)
    g = p.add_argument_group("run: logging and the feature map")
    g.add_argument("--log_interval", "--print_freq", shared=True, default=100)
    g.add_argument("--plot_features", type=int, default=0, metavar="N",
                   help="at the end, a t-SNE map of the features of N labeled, N unlabeled and N test images "
                        "(features.png, features.npz); 0 = off. For a finished run, repeat its command with "
                        "--resume auto --plot_features N: nothing is trained, the map comes from the final checkpoint")
    args = p.parse_args(argv)
    if args.local_rank is not None:  # the deprecated launcher passes --local-rank; torchrun sets the environment
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    for name in ("batch_size", "eval_batch_size", "max_iter", "epochs", "stop_after", "eval_interval", "num_labeled",
                 "imcrop", "log_interval"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UserError(f"--{name} must be positive, got {v}")
    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.meta_p == "mean" and args.meta_grad != "fd":
        raise UserError("--meta_p mean averages fd's two perturbed predictions: it needs --meta_grad fd")
    if args.alpha <= 0 or args.epsilon <= 0:
        raise UserError("--alpha and --epsilon must be positive")
    if args.plot_features < 0:
        raise UserError(f"--plot_features is a number of images per panel (0 = off), got {args.plot_features}")
    if args.plot_features and args.dali:
        raise UserError("--plot_features reads the images with torchvision: it does not run with --dali")
    return args


def choose_recipe(args):
    """Infer --dataset (a RecordIO root is imagenet) and --recipe, refuse flags the dataset has no use for, fill the
    recipe's defaults (runlib.apply_recipe: a given flag wins) and fit the CIFAR/SVHN schedule to --max_iter."""
    root = Path(args.root).expanduser()
    if args.dataset is None:
        args.dataset = "imagenet" if has_recordio(root) else datasets.infer_name(root)
    if args.dataset not in RECIPE_OF:
        raise UserError(f"metasemi.py runs on {', '.join(SMALL + LARGE)}, not {args.dataset}: pass --dataset")
    fits = RECIPE_OF[args.dataset]
    if args.recipe not in (None, fits):  # the data pipeline follows the dataset: the recipe must match it
        raise UserError(f"--recipe {args.recipe} does not fit {args.dataset}: its recipe is {fits}")
    small = fits == "cifar"
    kind = "CIFAR/SVHN" if small else "ImageNet-style data"
    for flag, only_small in (("epochs", False), ("imcrop", False), ("milestones", True), ("gamma", True)):
        if getattr(args, flag) is not None and only_small != small:
            raise UserError(f"--{flag} does not apply to {kind} ({args.dataset}): "
                            + {"epochs": "use --max_iter", "imcrop": "CIFAR/SVHN images stay 32 x 32"}.get(
                                flag, "ImageNet uses a cosine schedule"))
    if small and args.dali:
        raise UserError("--dali reads ImageNet-style data (RecordIO or image folders); CIFAR/SVHN load without it")
    if not small and args.download:
        raise UserError("--download fetches CIFAR/SVHN only: get ImageNet from https://image-net.org")
    given = {f for f in ("milestones", "warmup") if getattr(args, f) is not None}
    runlib.apply_recipe(args, RECIPES, fits)
    if small:
        # The recipe's milestones and warmup are iterations of its 400k-iteration run: another --max_iter stretches
        # or shrinks them with it (integer arithmetic, so the recipe's own length keeps them exactly).
        length, recipe = RECIPES["cifar"]["max_iter"], RECIPES["cifar"]
        if "milestones" not in given:
            args.milestones = [m * args.max_iter // length for m in recipe["milestones"]]
        if "warmup" not in given:
            args.warmup = recipe["warmup"] * args.max_iter // length
    return args


# ------------------------------------------------------------------------------------------------------ augmentations
def small_transforms(name):
    """Reference dataloader.py: crop 32 with 4 px zero padding, flip (not for SVHN: digits), normalise."""
    import torchvision.transforms as T
    mean, std = datasets.MEAN_STD[name]  # the reference's constants (dataloader.py)
    # a mirrored digit is another glyph: no flip on SVHN (the reference) and digits
    train = [T.RandomCrop(32, padding=4)] + ([] if name in ("svhn", "digits") else [T.RandomHorizontalFlip()])
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(train + norm), T.Compose(norm)


# The reference DALI pipeline's random-resized crop: area [0.1, 1] of the image, aspect [0.8, 1.25]. Both loaders use
# it: imagenet_transforms (torchvision) and the DALI streams (--dali).
CROP_AREA, CROP_RATIO = (0.1, 1.0), (0.8, 1.25)


def imagenet_transforms(crop=224):
    """torchvision twin of the reference DALI pipelines (used without --dali): random-resized crop with CROP_AREA and
    CROP_RATIO stretched to crop x crop, flip; validation resize shorter side to crop * 256 / 224 + centre crop."""
    import torchvision.transforms as T
    norm = [T.ToTensor(), T.Normalize(*datasets.MEAN_STD["imagenet"])]
    train = T.Compose([T.RandomResizedCrop(crop, scale=CROP_AREA, ratio=CROP_RATIO), T.RandomHorizontalFlip()]
                      + norm)
    val = T.Compose([T.Resize(round(crop * 256 / 224)), T.CenterCrop(crop)] + norm)
    return train, val


# ------------------------------------------------------------------------------------------------------------- model
class Classifier(nn.Module):
    """Backbone feature extractor + linear head (ConvLarge's fc is Linear(128, C); ResNet-18's Linear(512, C))."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, x):
        return self.fc(self.backbone(x))


# --------------------------------------------------------------------------------------------------------- meta step
@contextlib.contextmanager
def exact_fp32():
    """Full fp32 for the meta step: no autocast and no TF32. The finite difference moves every weight by ~1e-5
    relative, the size of TF32's rounding, so TF32 convolutions would swamp the signal."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def project_rows(y):
    """Clamp at zero, then divide each row by its sum; a row that sums to zero stays all-zero (the reference's
    projection, not the Euclidean projection onto the simplex)."""
    y = y.clamp_min(0)
    s = y.sum(1, keepdim=True)
    return torch.where(s > 0, y / torch.where(s > 0, s, torch.ones_like(s)), y)


def meta_direction(net, x_l, y_l, x_u, epsilon=0.01, meta_grad="fd", meta_p="eval"):
    """The meta-gradient part of train_meta.py, in eval mode and full fp32, on the unwrapped net.

    Returns (p, g, logits_l): p = softmax(f(x_u)) in eval mode, g ~ 2 J d with J = dp/dtheta and d = the gradient
    of CE(f(x_l), y_l) over every trainable parameter (convs, BN affine, fc), and the eval-mode labeled logits.
    fd: g = (p(theta + eps d) - p(theta - eps d)) / eps with eps = epsilon / ||d||; jvp: g = 2 J d exactly.
    meta_p "mean" (fd only) takes p = (p(theta + eps d) + p(theta - eps d)) / 2, which is p(theta) + O(eps^2),
    instead of a third forward.
    The weights are never touched: the perturbed weights are separate tensors fed through functional_call (the
    reference perturbs in place, +eps, -2eps, +eps, which leaves theta off by rounding).
    """
    was_training = net.training
    net.eval()
    try:
        with exact_fp32():
            names, params = zip(*[(n, q) for n, q in net.named_parameters() if q.requires_grad])
            logits_l = net(x_l)
            d = torch.autograd.grad(F.cross_entropy(logits_l, y_l), params)
            with torch.no_grad():
                if meta_grad == "fd":
                    p = F.softmax(net(x_u), 1) if meta_p == "eval" else None
                    # eps stays a tensor: no host sync (the reference passed a CUDA scalar as add_'s alpha, 7.6).
                    # A zero gradient gives g = 0 rather than 0/0.
                    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(d)))
                    eps = epsilon / norm.clamp_min(1e-12)
                    step = torch._foreach_mul(d, eps)
                    plus = dict(zip(names, torch._foreach_add(params, step)))
                    minus = dict(zip(names, torch._foreach_sub(params, step)))
                    p_plus = F.softmax(functional_call(net, plus, (x_u,)), 1)
                    p_minus = F.softmax(functional_call(net, minus, (x_u,)), 1)
                    g = (p_plus - p_minus) / eps  # ~ 2 J d (slides' Algorithm 2 drops the alpha/B factor)
                    if p is None:
                        p = (p_plus + p_minus) / 2
                elif meta_grad == "jvp":
                    # Forward-mode AD gives J d exactly; its primal output is p, so no separate forward is needed.
                    def probs(ps):
                        return F.softmax(functional_call(net, ps, (x_u,)), 1)
                    primal = {n: q.detach() for n, q in zip(names, params)}
                    with warnings.catch_warnings():  # torch.func scripts its decompositions once (FutureWarning)
                        warnings.filterwarnings("ignore", category=FutureWarning)
                        p, jd = torch.func.jvp(probs, (primal,), (dict(zip(names, d)),))
                    g = 2 * jd
                else:
                    raise ValueError(f"meta_grad must be 'fd' or 'jvp', got {meta_grad!r}")
    finally:
        net.train(was_training)
    return p, g, logits_l.detach()


def meta_pseudo_labels(net, x_l, y_l, x_u, lr, epsilon=0.01, meta_grad="fd", meta_p="eval"):
    """Returns (p, y_hat, logits_l) with y_hat = project_rows(p - lr * g): a first-order look-ahead of the
    predictions after a labeled descent step; the meta step size is the current learning rate."""
    p, g, logits_l = meta_direction(net, x_l, y_l, x_u, epsilon, meta_grad, meta_p)
    return p, project_rows(p - lr * g), logits_l


@torch.no_grad()
def plain_pseudo_labels(net, x_u):
    """The step without meta-gradient: pseudo-labels = the eval-mode predictions (used by --no-meta)."""
    was_training = net.training
    net.eval()
    try:
        with exact_fp32():
            p = F.softmax(net(x_u), 1)
    finally:
        net.train(was_training)
    return p


# ------------------------------------------------------------------------------------------------------------ losses
def sample_lambda(n, alpha):
    """One mixup coefficient per sample, Beta(alpha, alpha), drawn on the CPU generator (device-independent);
    no max(lam, 1 - lam) trick, as in the reference."""
    return torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample((n, 1))


def mixup(x_l, y_l, x_u, y_u, lam, num_classes):
    """Labeled sample i mixed with unlabeled sample i as delivered: images and soft targets, both detached."""
    lam = lam.to(x_l.device)
    x = lam.view(-1, 1, 1, 1) * x_l + (1 - lam.view(-1, 1, 1, 1)) * x_u
    y = lam * F.one_hot(y_l, num_classes).float() + (1 - lam) * y_u
    return x.detach(), y.detach()


def soft_kl(logits, target):
    """KL(target || softmax(logits)) summed over classes, mean over the batch (the reference's batchmean KLDiv)."""
    return F.kl_div(F.log_softmax(logits.float(), 1), target, reduction="batchmean")


def consistency(logits_u, y_hat):
    """Squared error summed over classes (not divided by C), mean over the batch."""
    return (F.softmax(logits_u.float(), 1) - y_hat).pow(2).sum(1).mean()


def consistency_weight(step, weight, rampup):
    """Linear ramp: weight * t / rampup for t <= rampup, then weight; rampup 0 = constant (ImageNet)."""
    return weight * min(step / rampup, 1.0) if rampup > 0 else weight


def training_loss(forward, x_l, y_l, x_u, y_hat, num_classes, mix_up, lam, w):
    """Two train-mode forwards, each with its own BN statistics: the mixed (or labeled) batch, then the unlabeled."""
    if mix_up:
        x_in, y_in = mixup(x_l, y_l, x_u, y_hat, lam, num_classes)
        l_cls = soft_kl(forward(x_in), y_in)
    else:
        l_cls = F.cross_entropy(forward(x_l).float(), y_l)
    l_cons = consistency(forward(x_u), y_hat)
    return l_cls + w * l_cons, l_cls.detach(), l_cons.detach()


# --------------------------------------------------------------------------------------------------------- schedules
def step_lr(t, base, warmup, milestones, gamma):
    """CIFAR/SVHN: base * t / warmup for t < warmup (0 at t = 0), then base * gamma^(#milestones m with t > m)."""
    if t < warmup:
        return base * t / warmup
    return base * gamma ** sum(t > m for m in milestones)


def cosine_lr(t, base, warmup_iters, total_iters):
    """ImageNet: the counter is incremented before use (it = t + 1); linear warmup to base at it = warmup_iters,
    then half a cosine to 0 at it = total_iters."""
    it = t + 1
    if it <= warmup_iters:
        return base * it / warmup_iters
    return base * 0.5 * (1 + math.cos(math.pi * (it - warmup_iters) / max(total_iters - warmup_iters, 1)))


# -------------------------------------------------------------------------------------------------------------- data
def has_recordio(root):
    return all((Path(root) / f"{p}.{e}").is_file()
               for p in ("train_label", "train_unlabel", "val") for e in ("rec", "idx"))


def build_data(args, dist):
    """Labeled and unlabeled streams (the same global batch each), the test loader, and the split."""
    root = Path(args.root).expanduser()
    choose_recipe(args)
    if args.batch_size % dist.world_size:
        raise UserError(f"--batch_size {args.batch_size} (global) is not divisible by the {dist.world_size} processes")
    if args.dataset in SMALL:
        return small_data(args, dist, root)
    return large_data(args, dist, root)


def check_num_labeled(n, size, name):
    """A count the split cannot draw; one that the classes do not divide is refused by the split itself
    (splits.class_balanced_split(..., exact=True)), in the words every script uses."""
    if n > size:
        raise UserError(f"--num_labeled {n} is larger than the {size} training images of {name}: choose fewer labels")


def small_data(args, dist, root):
    train = datasets.load(args.dataset, root, "train", download=args.download)
    test = datasets.load(args.dataset, root, "test", download=args.download)
    num_classes = train.num_classes
    check_num_labeled(args.num_labeled, len(train), args.dataset)
    # Class-balanced from the seed; labeled images are excluded from the unlabeled pool, as in the reference.
    # The draw is numpy's RandomState(seed), not the reference's python random walk: same rule, other indices.
    lab_idx, unl_idx = splits.class_balanced_split(train.targets, args.num_labeled, num_classes, args.seed,
                                                     exclude_labeled=True, exact=True)
    if len(unl_idx) == 0:
        raise UserError(f"--num_labeled {args.num_labeled} labels the whole training set: no unlabeled images remain")
    t_train, t_test = small_transforms(args.dataset)
    test.transform = t_test
    kw = dict(workers=args.workers, rank=dist.rank, world_size=dist.world_size,
              pin_memory=dist.device.type == "cuda")
    labeled = loaders.BatchStream(train.subset(lab_idx, transform=t_train), args.batch_size, args.seed, **kw)
    unlabeled = loaders.BatchStream(train.subset(unl_idx, transform=t_train), args.batch_size, args.seed + 1, **kw)
    return dict(num_classes=num_classes, labeled_idx=lab_idx, labeled_ids=[train.ids[i] for i in lab_idx],
                labels=str(args.num_labeled), labeled=labeled, unlabeled=unlabeled,
                test=loaders.eval_loader(test, max(args.eval_batch_size // dist.world_size, 1), args.workers,
                                          dist.rank, dist.world_size))


def large_data(args, dist, root):
    """ImageNet-style data: RecordIO (train_label / train_unlabel / val), or train/ + val/ image folders with a
    class-balanced labeled split of --num_labeled images from --seed (the reference's split files are not public)."""
    if args.dali and not dali.available():
        raise UserError(dali.INSTALL_HINT)
    args.eval_batch_size = args.eval_batch_size or 50 * dist.world_size
    t_train, t_val = imagenet_transforms(args.imcrop)
    dali_kw = dict(size=args.imcrop, rank=dist.rank, world_size=dist.world_size, threads=max(args.workers, 1),
                   device=dist.device.type, area=CROP_AREA, ratio=CROP_RATIO)
    kw = dict(workers=args.workers, rank=dist.rank, world_size=dist.world_size, pin_memory=dist.device.type == "cuda")
    if has_recordio(root):
        if args.num_labeled is not None:
            raise UserError("--num_labeled does not apply to a RecordIO root: the split is given by train_label.rec "
                            "and train_unlabel.rec")
        sets = {p: dali.RecordIOSet(root / p) for p in ("train_label", "train_unlabel", "val")}
        num_classes = max(s.num_classes for s in sets.values())
        lab_idx = sets["train_label"].keys  # the record keys identify the split
        if args.dali:
            # Different seeds for the two streams: the reference seeded both pipelines with 12 + device id (3.4).
            labeled = dali.DaliStream(rec=root / "train_label", batch_size=args.batch_size, seed=args.seed,
                                          **dali_kw)
            unlabeled = dali.DaliStream(rec=root / "train_unlabel", batch_size=args.batch_size,
                                            seed=args.seed + 1, **dali_kw)
            test = dali.DaliStream(rec=root / "val", views=("val",), batch_size=args.eval_batch_size,
                                       one_pass=True, **dali_kw)
        else:
            labeled = loaders.BatchStream(sets["train_label"].subset(np.arange(len(sets["train_label"])), t_train),
                                           args.batch_size, args.seed, **kw)
            unlabeled = loaders.BatchStream(sets["train_unlabel"].subset(np.arange(len(sets["train_unlabel"])),
                                                                          t_train),
                                             args.batch_size, args.seed + 1, **kw)
            sets["val"].transform = t_val
            test = loaders.eval_loader(sets["val"], max(args.eval_batch_size // dist.world_size, 1), args.workers,
                                        dist.rank, dist.world_size)
        n_lab = len(sets["train_label"])
        lab_ids = [f"train_label.rec/{k}" for k in lab_idx]
    else:
        train = datasets.load(args.dataset, root, "train")
        val = datasets.load(args.dataset, root, "test")
        num_classes = train.num_classes
        if args.num_labeled is None:  # 10 % of the training set, a multiple of the class count (ImageNet: 128,000)
            args.num_labeled = max(len(train) // 10 // num_classes, 1) * num_classes
        check_num_labeled(args.num_labeled, len(train), args.dataset)
        lab_idx, unl_idx = splits.class_balanced_split(train.targets, args.num_labeled, num_classes, args.seed,
                                                         exclude_labeled=True, exact=True)
        if len(unl_idx) == 0:
            raise UserError(f"--num_labeled {args.num_labeled} labels the whole training set: no unlabeled images "
                            "remain")
        if args.dali:
            files, targets = train.files, train.targets
            labeled = dali.DaliStream(files=files, labels=targets, indices=lab_idx,
                                          batch_size=args.batch_size, seed=args.seed, **dali_kw)
            unlabeled = dali.DaliStream(files=files, labels=targets, indices=unl_idx,
                                            batch_size=args.batch_size, seed=args.seed + 1, **dali_kw)
            test = dali.DaliStream(files=val.files, labels=val.targets, views=("val",),
                                       batch_size=args.eval_batch_size, one_pass=True, **dali_kw)
        else:
            labeled = loaders.BatchStream(train.subset(lab_idx, transform=t_train), args.batch_size, args.seed, **kw)
            unlabeled = loaders.BatchStream(train.subset(unl_idx, transform=t_train), args.batch_size,
                                             args.seed + 1, **kw)
            val.transform = t_val
            test = loaders.eval_loader(val, max(args.eval_batch_size // dist.world_size, 1), args.workers,
                                        dist.rank, dist.world_size)
        n_lab = len(lab_idx)
        lab_ids = [train.ids[i] for i in lab_idx]
    return dict(num_classes=num_classes, labeled_idx=np.asarray(lab_idx, dtype=np.int64), labeled_ids=lab_ids,
                labels=str(n_lab), labeled=labeled, unlabeled=unlabeled, test=test)


# ------------------------------------------------------------------------------------------------------ feature map
# The reference's class colours; more classes get evenly spaced hues.
CLASS_COLORS = ("lightcoral", "darkgreen", "cadetblue", "darkorange", "peru", "cornflowerblue", "khaki", "magenta",
                "gray", "slategrey")


@torch.no_grad()
def feature_map(net, data, args, run, device):
    """The reference's plot_features.py: one t-SNE of the penultimate-layer features of up to --plot_features
    labeled, unlabeled and test images each (eval mode, test-time transform), drawn from --seed. The reference
    embeds every image and then keeps the drawn ones; embedding only the drawn ones keeps t-SNE affordable.
    Writes features.npz ({set}_xy, {set}_y) and features.png: the labeled, unlabeled and test images coloured by
    true class, then the three sets together coloured by set (labeled red, unlabeled blue, test grey)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba_array
    from sklearn.manifold import TSNE

    seed = args.seed % 2**32
    eval_tf = (small_transforms(args.dataset) if args.dataset in SMALL else imagenet_transforms(args.imcrop))[1]
    rng = np.random.RandomState(seed)  # its own generator: the picks do not depend on the training's RNG use
    net.eval()
    names, feats, labels = ("labeled", "unlabeled", "test"), [], []
    for ds in (data["labeled"].dataset, data["unlabeled"].dataset, data["test"].dataset):
        sub = ds.subset(np.sort(rng.choice(len(ds), min(args.plot_features, len(ds)), replace=False)), eval_tf)
        loader = loaders.eval_loader(sub, data["test"].batch_size, args.workers)
        feats.append(torch.cat([net.backbone(x.to(device)).float().cpu() for x, _, _ in loader]).numpy())
        labels.append(np.asarray(sub.targets, dtype=np.int64))
    n = sum(map(len, feats))
    xy = TSNE(2, perplexity=min(30.0, n - 1), init="pca", random_state=seed).fit_transform(np.concatenate(feats))
    arrays = {}
    for name, part, y in zip(names, np.split(xy.astype(np.float32), np.cumsum(list(map(len, feats)))[:-1]), labels):
        arrays[f"{name}_xy"], arrays[f"{name}_y"] = part, y
    runlib.atomic_write(run.path("features.npz"), lambda f: np.savez(f, num_classes=data["num_classes"], **arrays))

    C = data["num_classes"]
    palette = to_rgba_array(CLASS_COLORS) if C <= len(CLASS_COLORS) else plt.cm.hsv(np.arange(C) / C)
    fig, axes = plt.subplots(1, 4, figsize=(24, 6), sharex=True, sharey=True)  # a point sits at one place in all
    for ax, name in zip(axes, names):
        ax.scatter(*arrays[f"{name}_xy"].T, c=palette[arrays[f"{name}_y"]], s=10)
        ax.set_title(f"{name}: {len(arrays[f'{name}_y'])} images, true class")
    for name, color in (("unlabeled", "blue"), ("test", "grey"), ("labeled", "red")):  # labeled drawn on top
        axes[3].scatter(*arrays[f"{name}_xy"].T, c=color, s=10, label=name)
    axes[3].set_title("labeled / unlabeled / test")
    axes[3].legend(loc="best")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    runlib.atomic_write(run.path("features.png"), lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    print(f"[{run.name}] feature map of {n} images: {run.path('features.png')}", flush=True)


# ------------------------------------------------------------------------------------------------------------- main
def train_step(net, forward, opt, scaler, x_l, y_l, x_u, lr, w, args, num_classes, device):
    """One iteration: pseudo-labels (meta step, or the plain eval-mode predictions with --no-meta), mixup and
    consistency losses through `forward` (the DDP / compiled wrapper of `net`), one SGD step.

    The meta step runs on the unwrapped `net` with the local labeled gradient d: no DDP hook and no collective,
    which is also what the reference did (its autograd.grad through DDP never ran the reducer)."""
    if args.meta:
        p, y_hat, logits_l = meta_pseudo_labels(net, x_l, y_l, x_u, lr, args.epsilon, args.meta_grad, args.meta_p)
    else:
        p = y_hat = plain_pseudo_labels(net, x_u)
        logits_l = None
    lam = sample_lambda(len(x_l), args.alpha) if args.mix_up else None
    with runlib.autocast(device, args.amp):
        loss, l_cls, l_cons = training_loss(forward, x_l, y_l, x_u, y_hat, num_classes, args.mix_up, lam, w)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach(), l_cls, l_cons, p, y_hat, logits_l


def schedule(args, iters_per_epoch):
    """(total iterations, lr_at(t), consistency ramp-up in iterations). CIFAR/SVHN: --max_iter iterations, step decay
    at --milestones after --warmup iterations (choose_recipe fitted both to --max_iter). ImageNet: --max_iter, or
    --epochs passes over the unlabeled data; an epoch of the schedule is total / epochs iterations, so the --warmup
    epochs and the cosine stretch or shrink with --max_iter; no consistency ramp-up."""
    if args.dataset in SMALL:
        total = args.max_iter
        return total, lambda t: step_lr(t, args.lr, args.warmup, args.milestones, args.gamma), args.warmup
    total = args.max_iter or args.epochs * iters_per_epoch
    warmup_iters = args.warmup * total // args.epochs
    return total, lambda t: cosine_lr(t, args.lr, warmup_iters, total), 0


def main(argv=None):
    args = parse_args(argv)
    dist = distributed.init(args.device)
    device = dist.device
    runlib.seed_everything(args.seed, dist.rank, args.deterministic)
    data = build_data(args, dist)
    num_classes, lab_stream, unl_stream = data["num_classes"], data["labeled"], data["unlabeled"]
    iters_per_epoch = unl_stream.batches_per_pass  # the unlabeled stream defines the epoch
    total, lr_at, rampup = schedule(args, iters_per_epoch)
    args.max_iter = total                                          # ImageNet: recorded as run (args.json)
    args.eval_interval = args.eval_interval or iters_per_epoch     # ImageNet: one pass over the unlabeled data

    # A resumed run keeps the checkpoint's split and network; the learning rate is set from the flags every step,
    # while the restored optimizer state keeps its momentum and weight decay.
    run = runlib.Run(args, "metasemi", args.dataset, data["labels"], dist,
                     fixed=("dataset", "backbone", "num_labeled", "seed"), kept=("momentum", "weight_decay"))
    backbone = backbones.build(args.backbone, pretrained=args.pretrained, trust_checkpoint=args.trust_checkpoint)
    net = Classifier(backbone, num_classes).to(device)
    model = distributed.wrap(net, dist)                  # DDP averages the gradients of the training forwards
    forward = torch.compile(model) if args.compile else model
    # Weight decay on every parameter, BN and biases included, as in the reference.
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = runlib.grad_scaler(device, args.amp)
    start = 0
    if run.resume_state is not None:
        ck = run.resume_state
        saved = ck["labeled_idx"].numpy() if torch.is_tensor(ck["labeled_idx"]) else np.asarray(ck["labeled_idx"])
        if not np.array_equal(saved, data["labeled_idx"]):
            raise UserError("the checkpoint was trained on another labeled split: resume with the same --root, "
                            "--num_labeled and --seed")
        if int(ck["step"]) > total:
            raise UserError(f"{run.dir}/checkpoint.pt is at iteration {int(ck['step'])}, beyond --max_iter {total}: "
                            "resume with the run's --max_iter, or pass --run_name NAME to start a new run")
        runlib.restore(ck, {"model": net, "optimizer": opt, "scaler": scaler}, fits=f"--backbone {args.backbone}")
        runlib.restore(ck["streams"], {"labeled": lab_stream, "unlabeled": unl_stream})
        start = int(ck["step"])
        # another world size: fresh streams, still a function of the seed and the step
        runlib.restore_rng_states(ck["rng"], dist.rank, lambda: runlib.seed_everything(args.seed + start, dist.rank,
                                                                                       args.deterministic))
    # --stop_after: train up to there with the schedule of the whole run (never below where the checkpoint is)
    end = max(min(total, args.stop_after), start) if args.stop_after else total
    run.start()
    run.save_split(data["labeled_idx"], data["labeled_ids"])

    def checkpoint(step):
        run.save_checkpoint({"model": net.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                             "step": step, "rng": runlib.rng_states(),
                             "labeled_idx": torch.from_numpy(data["labeled_idx"]),
                             "streams": {"labeled": lab_stream.state_dict(), "unlabeled": unl_stream.state_dict()}})

    def evaluate(step):
        # The test loader draws from the global RNG (its base seed). A scheduled evaluation does so as it always
        # has; the extra one where --stop_after cuts the run puts the RNG back, so the resumed run equals the
        # uninterrupted one.
        extra = step < total and step % args.eval_interval != 0
        state = runlib.rng_state() if extra else None
        net.eval()
        top1, top5 = runlib.evaluate(net, data["test"], device)
        net.train()
        if extra:
            runlib.set_rng_state(state)
        run.log_eval(step, top1, top5)

    if run.is_main:
        print(f"[{run.name}] {args.dataset}: {data['labels']} labeled, {num_classes} classes, {args.backbone}, "
              f"{'meta ' + args.meta_grad if args.meta else 'no meta step'}, mixup {args.mix_up}, "
              f"{iters_per_epoch} it/epoch, iterations {start}..{end} of {total}", flush=True)
    net.train()
    sums, n_sum, data_time, shown = None, 0, 0.0, {}
    for step in range(start, end):
        lr = lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        x_l, y_l, _ = next(lab_stream)
        x_u, y_u, _ = next(unl_stream)
        x_l, y_l = x_l.to(device, non_blocking=True), y_l.to(device, non_blocking=True)
        x_u, y_u = x_u.to(device, non_blocking=True), y_u.to(device, non_blocking=True)
        data_time += time.perf_counter() - t0

        w = consistency_weight(step, args.weight, rampup)
        loss, l_cls, l_cons, p, y_hat, logits_l = train_step(net, forward, opt, scaler, x_l, y_l, x_u, lr, w,
                                                             args, num_classes, device)

        # Running means of the train figures, reduced over ranks every --log_interval iterations.
        stats = torch.stack([loss.float(), l_cls, l_cons,
                             (p.argmax(1) == y_u).float().mean(), (y_hat.argmax(1) == y_u).float().mean(),
                             (y_hat - p).abs().sum(1).mean(),
                             (logits_l.argmax(1) == y_l).float().mean() if logits_l is not None
                             else torch.zeros((), device=device)])
        sums = stats if sums is None else sums + stats
        n_sum += 1
        done = step + 1
        evaluating = done % args.eval_interval == 0 or done == end
        if done % args.log_interval == 0 or evaluating:
            avg = distributed.all_reduce_mean(sums / n_sum).tolist()
            # Checked on the rank mean, so every rank stops together, and before any checkpoint is written.
            runlib.check_finite(avg[0], done, run)
            shown = dict(zip(("loss", "cls", "cons", "pred_acc", "pl_acc", "pl_shift", "lab_acc"), avg))
            run.log(done, {f"train/{k}": v for k, v in shown.items()} | {"train/lr": lr, "train/cons_weight": w,
                                                                          "time/data_s": data_time / n_sum})
            sums, n_sum, data_time = None, 0, 0.0
        run.progress(done, total, **({"loss": shown["loss"], "pl_acc": shown["pl_acc"]} if shown else {}), lr=lr)
        if evaluating:
            evaluate(done)
            checkpoint(done)
    if not run.evals or run.evals[-1]["iter"] != end:  # resumed at the end: evaluate the final weights once
        evaluate(end)
        checkpoint(end)
    if end < total:
        run.stop(end, total)
        return
    figures = {}
    if distributed.is_distributed():
        # The meta step is local and never touches the weights, so DDP must keep every rank's weights identical:
        # report the largest difference of a parameter checksum over ranks (0.0 expected; the reference drifted).
        with torch.no_grad():
            total_sum = torch.stack([q.double().sum() for q in net.parameters()]).sum().view(1)
        sums_all = distributed.all_gather_cat(total_sum)
        figures["rank_weight_spread"] = (sums_all.max() - sums_all.min()).item()
    run.finish(**figures, iters=end, num_labeled=int(data["labels"]), meta=args.meta,
               meta_grad=args.meta_grad if args.meta else None,
               train_pl_acc=shown.get("pl_acc"), train_pred_acc=shown.get("pred_acc"))
    if args.plot_features and run.is_main:  # rank 0 alone: the others have nothing left to do
        feature_map(net, data, args, run, device)


if __name__ == "__main__":
    runlib.entry(main)
