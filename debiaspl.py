"""DebiasPL: Debiased Learning from Naturally Imbalanced Pseudo-Labels (Wang et al., CVPR 2022, arXiv 2201.01490).

Pseudo-labels are imbalanced even when the data are balanced: a teacher prefers some classes, FixMatch trains on its
confident guesses and the preference grows. DebiasPL keeps a running estimate q of the teacher's class marginal
(the mean softmax over unlabeled batches, momentum --qhat_m) and removes it twice: the pseudo-label is the argmax of
softmax(z_weak - tau log q) (counterfactual logit adjustment, thresholded on the debiased probability), and the
student's strong-view logits are trained with z_strong + tau log q (an adaptive margin: classes the teacher predicts
rarely get larger margins). The base learner is FixMatch with an EMAN teacher (--eman: the teacher, in eval mode, is
an exponential moving average of the student's weights AND BatchNorm statistics), optionally with two weak + two
strong views per image (--multiviews), a CLD instance-group loss (--CLDLoss), CLIP predictions for the images the
model is not confident about (--use_clip), or, in the zero-shot setting (--zero_shot), CLIP pseudo-labels instead of
human labels.

Launch (ImageNet 1% with MoCo-EMAN initialisation, the reference's scripts/1perc-ssl/train_DebiasPL.sh):
  1 GPU:    python debiaspl.py --root imagenet --trainindex_x train_1p_index.csv --trainindex_u train_99p_index.csv \
              --backbone resnet50 --pretrained pretrained/res50_moco_eman_800ep.pth.tar --eman --lr 0.003 --cos \
              --warmup_epoch 5 --epochs 50 --threshold 0.8 --qhat_m 0.999 --tau 0.4 --CLDLoss --lambda_cld 0.3 \
              --multiviews --amp bf16 --dali
  8 GPUs:   torchrun --nproc_per_node 8 debiaspl.py <the same flags>      (--batch_size is global: 64 labeled)
  CPU:      python debiaspl.py --root ./cifar10 --dataset cifar10 --num_labeled 40 --batch_size 8 --mu 2 \
              --stop_after 100 --device cpu --workers 0       (100 iterations of the full schedule; --resume auto goes on)
Demo on scikit-learn's digits (no files; 300 iterations, ~1 min 40 s on 2 idle CPU cores, 86-91% top-1; resnet18
  is the cheapest backbone at 32 px, lr 0.01 keeps its from-scratch start stable; on a busy machine set
  OMP_NUM_THREADS=1, two threads competing for two shared cores run several times slower):
            python debiaspl.py --dataset digits --backbone resnet18 --num_labeled 50 --batch_size 16 --mu 2 \
              --lr 0.01 --epochs 6 --epoch_iters 50 --workers 0
CIFAR-10 (the FixMatch protocol): python debiaspl.py --root ./cifar10 --download --num_labeled 40 --batch_size 64 \
  --mu 7 --lr 0.03 --nesterov --weight_decay 5e-4 --threshold 0.95 --lambda_u 1 --epochs 1024 --epoch_iters 1024 \
  --tau 0.4 --qhat_m 0.999                         (add --eman to pseudo-label with, and evaluate, an EMAN teacher)
Per-dataset defaults come from RECIPES (--recipe imagenet | cifar, inferred from --dataset; --help prints the table).
Index files name ImageFolder positions of ROOT/train (column `Index`, or a .npy of indices, as usl.py writes them);
a bare name resolves under ROOT/indexes/ as in the reference, anything else as a path.
"""
import argparse
import copy
import math
import random
import time
from pathlib import Path

import common  # noqa: F401  first: it sets how OpenMP threads wait, which must precede torch
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageOps
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

from common import UserError
from common import backbones, datasets, distributed, loaders, splits
from common import run as runlib

IMAGENET_LIKE = ("imagenet", "imagefolder")

# ----------------------------------------------------------------------------------------------------------- recipes
# The per-dataset defaults (docs/debiaspl.md, "Recipes"; --help prints them): the reference's argparse values for
# ImageNet-style folders, FixMatch's CIFAR protocol for every dataset loaded as small arrays (CIFAR, SVHN, digits, and
# the fine-grained sets, which this script also trains at 32 px). The reference's lambda_u 10 / threshold 0.7 / tau 1
# assume a student initialised from MoCo-EMAN weights: a student trained from scratch at 32 px pseudo-labels its own
# noise past 0.7 within a few iterations, and weight 10 on those labels blows the logits up (labeled CE 2.3 -> 30+).
RECIPES = {
    "imagenet": dict(backbone="resnet50", image_size=224, dropout=0.45, exclude_labeled=True, lr_schedule="step",
                     weight_decay=1e-4, nesterov=False, lambda_u=10.0, threshold=0.7, tau=1.0),
    "cifar": dict(backbone="wrn28_2", image_size=32, dropout=0.0, exclude_labeled=False, lr_schedule="fixmatch_cos",
                  weight_decay=5e-4, nesterov=True, lambda_u=1.0, threshold=0.95, tau=0.4),
}


def recipe_of(dataset):
    """The recipe --dataset implies: ImageNet-style folders take the reference's, every other dataset FixMatch's."""
    return "imagenet" if dataset in IMAGENET_LIKE else "cifar"


# ------------------------------------------------------------------------------------------------------------- flags
def parse_args(argv=None):
    p = runlib.Parser(description=__doc__.split("\n\n")[0], recipes=RECIPES)
    g = p.add_argument_group("data")
    g.add_argument("--root", shared=True, default=None, help="ImageNet layout: train/, val/, indexes/")
    g.add_argument("--dataset", shared=True, default=None, choices=datasets.NAMES)
    g.add_argument("--recipe", shared=True, default=None, choices=list(RECIPES))
    g.add_argument("--download", shared=True)
    g.add_argument("--trainindex_x", default=None,
                   help="labeled images: CSV with an Index column (or .npy of indices, e.g. usl.py's selected.csv); "
                        "a bare name resolves under ROOT/indexes/")
    g.add_argument("--trainindex_u", default=None,
                   help="unlabeled images, same format (default: every training image not in --trainindex_x)")
    g.add_argument("--num_labeled", shared=True, default=None,
                   help="without index files: that many labels, class-balanced, drawn with --seed (the CIFAR protocol)")
    g.add_argument("--anno_percent", type=float, default=0.1,
                   help="without index files or --num_labeled: label this fraction of each class at random (seeded)")
    g.add_argument("--exclude_labeled", action=argparse.BooleanOptionalAction, recipe=True,
                   help="unlabeled set = the complement of the labeled set (as the reference's index files), "
                        "rather than every image (the FixMatch convention)")
    g.add_argument("--zero_shot", action=argparse.BooleanOptionalAction, default=False,
                   help="zero-shot setting: --trainindex_x is a CLIP pseudo-label CSV (Index, PseudoLabel) whose "
                        "labels replace the folder's; --trainindex_u carries CLIP's PseudoLabel and Probs")
    g.add_argument("--use_clip", action=argparse.BooleanOptionalAction, default=False,
                   help="SSL with CLIP: train on CLIP's top-1 where all the model's pseudo-labels are below threshold")
    g.add_argument("--clip_predictions", default=None,
                   help="CLIP predictions for --use_clip: a dict with probs_list/preds_list [N_u, k] (default: "
                        "ROOT/indexes/<trainindex_u stem>_clip_predictions_ranked.pth.tar)")
    g.add_argument("--clip_threshold", type=float, default=None,
                   help="CLIP confidence needed to use its label (default: 0.3 with --zero_shot, else 0.4: it follows "
                        "--zero_shot, not the recipe)")
    g.add_argument("--image_size", type=int, recipe=True, help="crop size")
    g.add_argument("--workers", "-j", shared=True, default=8, help="DALI threads with --dali")
    g.add_argument("--dali", shared=True,
                   help="ImageNet-style folders only; one difference: the strong view's RandAugment is DALI's, which "
                        "cannot express the reference's (docs/debiaspl.md)")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", "--arch", shared=True, recipe=True,
                   help=f"{', '.join(backbones.NAMES)}; the reference's resnet50_encoder etc. are accepted")
    g.add_argument("--pretrained", "--self_pretrained", shared=True, default=None,
                   help="student and teacher both start from it; a classifier with this class count loads too")
    g.add_argument("--cls", type=int, default=None, help="number of classes; checked against the dataset")
    g.add_argument("--dropout", type=float, recipe=True, help="dropout on the pooled feature of the student")
    g.add_argument("--eman", action=argparse.BooleanOptionalAction, default=False,
                   help="pseudo-label with an EMAN teacher (EMA of weights and BN statistics, eval mode)")
    g.add_argument("--ema_m", type=float, default=0.999, help="EMAN momentum")

    g = p.add_argument_group("method: DebiasPL / FixMatch")
    g.add_argument("--mu", type=int, default=5, help="unlabeled images per labeled image")
    g.add_argument("--lambda_u", type=float, recipe=True, help="weight of the unlabeled loss")
    g.add_argument("--threshold", type=float, recipe=True, help="confidence threshold on the debiased probability")
    g.add_argument("--tau", type=float, recipe=True, help="debiasing strength, 0 = plain FixMatch")
    g.add_argument("--qhat_m", type=float, default=0.999, help="momentum of the class-marginal estimate q")
    g.add_argument("--multiviews", action=argparse.BooleanOptionalAction, default=False,
                   help="two weak and two strong views of every unlabeled image")
    g.add_argument("--CLDLoss", action=argparse.BooleanOptionalAction, default=False,
                   help="add the CLD instance-group loss in probability space")
    g.add_argument("--lambda_cld", type=float, default=0.3, help="weight of the CLD loss")
    g.add_argument("--cld_groups", default="argmin", choices=["argmin", "argmax"],
                   help="group of a sample: the reference's argmin of the teacher's probabilities, or the argmax "
                        "(its pseudo-class)")
    g.add_argument("--cld_temperature", type=float, default=0.07, help="CLD temperature")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", shared=True, default=200,
                   help="one epoch = one pass over the unlabeled set, or --epoch_iters iterations; with --max_iter, "
                        "the schedule's length in epochs")
    g.add_argument("--epoch_iters", type=int, default=None,
                   help="iterations per epoch (default: one pass over the unlabeled set; FixMatch CIFAR uses 1024)")
    g.add_argument("--max_iter", shared=True, default=None,
                   help="overrides --epochs x iterations per epoch; the epoch-based schedule (--schedule, "
                        "--warmup_epoch, cos) is stretched to it: an epoch of the schedule = max_iter / epochs "
                        "iterations (default: --epochs x iterations per epoch)")
    g.add_argument("--stop_after", shared=True, default=None)
    g.add_argument("--batch_size", "-b", shared=True, default=64,
                   help="the labeled images (the unlabeled batch is --mu times this)")
    g.add_argument("--lr", "--learning_rate", shared=True, default=0.1, help="the base of --lr_schedule")
    g.add_argument("--lr_schedule", choices=["step", "cos", "fixmatch_cos"], recipe=True,
                   help="step: x0.1 at --schedule epochs; cos: cosine per epoch after warmup (the reference's --cos, "
                        "which sets it when it is not given); fixmatch_cos: lr cos(7 pi k / 16 K) per iteration")
    g.add_argument("--cos", action=argparse.BooleanOptionalAction, default=False,
                   help="the reference's switch for --lr_schedule cos")
    g.add_argument("--schedule", type=int, nargs="*", default=[120, 160], help="epochs of the x0.1 steps")
    g.add_argument("--warmup_epoch", type=int, default=0, help="epochs of linear per-iteration warmup")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", "--wd", shared=True, recipe=True, help="on every parameter, as the reference")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, recipe=True, help="Nesterov momentum")
    g.add_argument("--seed", shared=True, default=0, help="it seeds the split, the initialisation and the augmentations")

    g = p.add_argument_group("run: evaluation and logging")
    g.add_argument("--eval_interval", shared=True, default=None,
                   help="default: one epoch (--epoch_iters, or one pass over the unlabeled set)")
    g.add_argument("--eval_freq", type=int, default=None, metavar="E",
                   help="the reference's spelling, in epochs: --eval_interval E x iterations per epoch")
    g.add_argument("--eval_batch_size", type=int, default=128, help="evaluation batch per rank")
    g.add_argument("--log_interval", "--print_freq", shared=True, default=100)
    runlib.add_standard_flags(p)
    args = p.parse_args(argv)
    if args.backbone is not None and args.backbone.endswith("_encoder"):
        args.backbone = args.backbone[: -len("_encoder")]  # the reference's resnet50_encoder = torchvision resnet50
    return args


# ------------------------------------------------------------------------------------------------- augmentations
# The FixMatch RandAugment of the reference (data/randaugment.py), written out because torchvision's RandAugment has
# other operations and magnitudes. Magnitude v in {1..m-1}; float ops use v*max/10 + bias, int ops int(v*max/10) + bias.
# The draws use Python's `random` alone (the reference mixes in numpy for v; the distribution is the same).
def _fparam(v, max_v, bias):
    return float(v) * max_v / 10 + bias


def _iparam(v, max_v, bias):
    return int(v * max_v / 10) + bias


def _signed(x):
    return -x if random.random() < 0.5 else x


def auto_contrast(img, v, max_v, bias):
    return PIL.ImageOps.autocontrast(img)


def brightness(img, v, max_v, bias):
    return PIL.ImageEnhance.Brightness(img).enhance(_fparam(v, max_v, bias))


def color(img, v, max_v, bias):
    return PIL.ImageEnhance.Color(img).enhance(_fparam(v, max_v, bias))


def contrast(img, v, max_v, bias):
    return PIL.ImageEnhance.Contrast(img).enhance(_fparam(v, max_v, bias))


def equalize(img, v, max_v, bias):
    return PIL.ImageOps.equalize(img)


def identity(img, v, max_v, bias):
    return img


def invert(img, v, max_v, bias):
    return PIL.ImageOps.invert(img)


def posterize(img, v, max_v, bias):
    return PIL.ImageOps.posterize(img, _iparam(v, max_v, bias))


def rotate(img, v, max_v, bias):
    return img.rotate(_signed(_iparam(v, max_v, bias)))


def sharpness(img, v, max_v, bias):
    return PIL.ImageEnhance.Sharpness(img).enhance(_fparam(v, max_v, bias))


def _affine(img, coeffs):
    # Image.Transform.AFFINE: the PIL.Image.AFFINE alias of the reference was deprecated in Pillow 9.1-9.3.
    return img.transform(img.size, PIL.Image.Transform.AFFINE, coeffs)


def shear_x(img, v, max_v, bias):
    return _affine(img, (1, _signed(_fparam(v, max_v, bias)), 0, 0, 1, 0))


def shear_y(img, v, max_v, bias):
    return _affine(img, (1, 0, 0, _signed(_fparam(v, max_v, bias)), 1, 0))


def solarize(img, v, max_v, bias):
    return PIL.ImageOps.solarize(img, 256 - _iparam(v, max_v, bias))


def solarize_add(img, v, max_v, bias, threshold=128):
    # The reference's np.int was removed in NumPy 1.24 and crashed whenever this op was drawn; int32 does the same.
    shift = _signed(_iparam(v, max_v, bias))
    arr = np.clip(np.asarray(img).astype(np.int32) + shift, 0, 255).astype(np.uint8)
    return PIL.ImageOps.solarize(PIL.Image.fromarray(arr), threshold)


def translate_x(img, v, max_v, bias):
    return _affine(img, (1, 0, int(_signed(_fparam(v, max_v, bias)) * img.size[0]), 0, 1, 0))


def translate_y(img, v, max_v, bias):
    return _affine(img, (1, 0, 0, 0, 1, int(_signed(_fparam(v, max_v, bias)) * img.size[1])))


# (op, max_v, bias): the 16-op "imagenet pool" of the reference.
IMAGENET_POOL = [(auto_contrast, None, None), (brightness, 1.8, 0.1), (color, 1.8, 0.1), (contrast, 1.8, 0.1),
                 (equalize, None, None), (identity, None, None), (invert, None, None), (posterize, 4, 4),
                 (rotate, 30, 0), (sharpness, 1.8, 0.1), (shear_x, 0.3, 0), (shear_y, 0.3, 0), (solarize, 256, 0),
                 (solarize_add, 110, 0), (translate_x, 0.45, 0), (translate_y, 0.45, 0)]
# The 14-op FixMatch pool (RandAugmentMC) for CIFAR.
FIXMATCH_POOL = [(auto_contrast, None, None), (brightness, 0.9, 0.05), (color, 0.9, 0.05), (contrast, 0.9, 0.05),
                 (equalize, None, None), (identity, None, None), (posterize, 4, 4), (rotate, 30, 0),
                 (sharpness, 0.9, 0.05), (shear_x, 0.3, 0), (shear_y, 0.3, 0), (solarize, 256, 0),
                 (translate_x, 0.3, 0), (translate_y, 0.3, 0)]


class RandAugment:
    """ImageNet strong view: n ops drawn with replacement from the 16-op pool, each ALWAYS applied (prob=None)."""

    def __init__(self, n=2, m=10, pool=IMAGENET_POOL):
        self.n, self.m, self.pool = n, m, pool

    def __call__(self, img):
        for op, max_v, bias in random.choices(self.pool, k=self.n):
            img = op(img, random.randint(1, self.m - 1), max_v, bias)
        return img


class RandAugmentMC:
    """CIFAR strong view (FixMatch): n ops from the 14-op pool, each applied with probability 1/2, then Cutout 16 px."""

    def __init__(self, n=2, m=10, cutout=16):
        self.n, self.m, self.cutout = n, m, cutout

    def __call__(self, img):
        for op, max_v, bias in random.choices(FIXMATCH_POOL, k=self.n):
            v = random.randint(1, self.m - 1)
            if random.random() < 0.5:
                img = op(img, v, max_v, bias)
        return cutout_abs(img, self.cutout)


def cutout_abs(img, size):
    w, h = img.size
    x0, y0 = random.uniform(0, w), random.uniform(0, h)
    x0, y0 = int(max(0, x0 - size / 2.0)), int(max(0, y0 - size / 2.0))
    x1, y1 = int(min(w, x0 + size)), int(min(h, y0 + size))
    img = img.copy()
    PIL.ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), (127, 127, 127))
    return img


def _reflect(k, n):
    """numpy's "reflect" padding as an index map: position k of a length-n axis, k in [-(n-1), 2(n-1)]."""
    k = np.abs(k)
    return np.where(k > n - 1, 2 * (n - 1) - k, k)


class PadCrop:
    """T.RandomCrop(size, padding, padding_mode="reflect") on a PIL image, with the same torch draws and the same
    pixels, as one numpy gather (torchvision pads the whole image with np.pad between two PIL conversions). What a
    loader worker pays per unlabeled 32-px CIFAR image (array -> PIL, weak view, strong view): 306 CPU us with this
    crop, 415 with T.RandomCrop (26% less; 2223 vs 1648 images/s, +35%), medians of 6 interleaved rounds of 1000
    images on one thread: `python benchmarks/randaugment_throughput.py --pad_crop 1000 --rounds 6`."""

    def __init__(self, size, padding):
        self.size, self.padding = int(size), int(padding)

    def __call__(self, img):
        w, h = img.size
        p, size = self.padding, self.size
        if img.mode == "P" or p > min(h, w) - 1:  # palette, or a pad wider than one reflection: torchvision's path
            return T.RandomCrop(size, padding=p, padding_mode="reflect")(img)
        arr = np.asarray(img)
        if h + 2 * p < size or w + 2 * p < size:
            raise UserError(f"a {w}x{h} image padded by {p} is smaller than the {size}-px crop: use a smaller "
                            "--image_size")
        i = j = 0
        if (h + 2 * p, w + 2 * p) != (size, size):  # the draws of T.RandomCrop.get_params
            i = torch.randint(0, h + 2 * p - size + 1, size=(1,)).item()
            j = torch.randint(0, w + 2 * p - size + 1, size=(1,)).item()
        rows = _reflect(np.arange(i - p, i - p + size), h)
        cols = _reflect(np.arange(j - p, j - p + size), w)
        return PIL.Image.fromarray(np.ascontiguousarray(arr[rows[:, None], cols]))


# Datasets whose images are not mirror-symmetric: FixMatch flips on every dataset except SVHN; a mirrored digit is
# another glyph (2 vs S, 7 vs a reversed 7) that the test set never shows.
NO_FLIP = ("svhn", "digits")


def make_transforms(dataset, size):
    """(labeled, weak, strong, val) transforms of §3.2: RandomResizedCrop + flip for ImageNet-style folders; pad-crop
    (+ flip, except on NO_FLIP) and RandAugmentMC + Cutout for the 32-px datasets."""
    mean, std = datasets.MEAN_STD.get(dataset, datasets.MEAN_STD["imagenet"])
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if dataset in IMAGENET_LIKE:
        weak = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        val = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size)] + tail)
        strong = T.Compose(weak + [RandAugment(2, 10)] + tail)
    else:
        weak = [PadCrop(size, padding=int(size * 0.125))]
        if dataset not in NO_FLIP:
            weak = [T.RandomHorizontalFlip()] + weak
        val = T.Compose(([T.Resize(size)] if size != 32 else []) + tail)
        if size != 32:
            weak = [T.Resize(size)] + weak
        strong = T.Compose(weak + [RandAugmentMC(2, 10, cutout=int(size / 2))] + tail)
    weak = T.Compose(weak + tail)
    return weak, weak, strong, val


# ---------------------------------------------------------------------------------------------- model and teacher
class Classifier(nn.Module):
    """Backbone -> dropout on the pooled feature -> linear. The reference applies nn.Dropout2d(0.45) to the 2-D
    feature, which is element-wise dropout; nn.Dropout is the same without the deprecation warning."""

    def __init__(self, backbone, num_classes, dropout=0.0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(self.backbone(x)))


class FixMatch(nn.Module):
    """Student `main` and (EMAN) teacher `ema` in one module: under DDP both sets of BN buffers are broadcast from
    rank 0 at every forward, as in the reference, so every rank pseudo-labels with the same teacher."""

    def __init__(self, main, eman=False):
        super().__init__()
        self.main = main
        self.ema = copy.deepcopy(main) if eman else None
        if self.ema is not None:
            for p in self.ema.parameters():
                p.requires_grad_(False)
            self.ema.eval()

    def train(self, mode=True):
        super().train(mode)
        if self.ema is not None:
            self.ema.eval()  # EMAN: the teacher never computes batch statistics
        return self

    def forward(self, x, u_w=None, u_s=None):
        if u_w is None:
            return self.main(x)
        n = len(x)
        if self.ema is None:  # plain FixMatch: the weak views go through the student in the same batch
            z = self.main(torch.cat([x, u_w, u_s]))
            return z[:n], z[n:n + len(u_w)], z[n + len(u_w):]
        z = self.main(torch.cat([x, u_s]))
        with torch.no_grad():
            z_w = self.ema(u_w)
        return z[:n], z_w, z[n:]

    @torch.no_grad()
    def update_ema(self, m):
        """EMAN: teacher <- m teacher + (1-m) student over parameters AND buffers (BN running mean/var), in place;
        num_batches_tracked is copied."""
        student, teacher = self.main.state_dict(), self.ema.state_dict()
        t_float, s_float = [], []
        for k, t in teacher.items():
            s = student[k]
            if t.is_floating_point():
                t_float.append(t)
                s_float.append(s)
            else:
                t.copy_(s)
        torch._foreach_mul_(t_float, m)
        torch._foreach_add_(t_float, s_float, alpha=1.0 - m)


def build_model(args, num_classes):
    """Student (+ EMAN teacher, a copy: both start from --pretrained, as the reference loads the MoCo-EMAN encoder
    into main and ema). MoCo heads are dropped by common.backbones; a classifier with this class count is kept (the
    reference's --pretrained for fine-tuned checkpoints)."""
    bb_kw = {"bn_momentum": 0.001, "relu_slope": 0.1} if args.backbone.startswith("wrn") else {}  # FixMatch's WRN
    backbone = backbones.build(args.backbone, args.pretrained, args.trust_checkpoint, **bb_kw)
    student = Classifier(backbone, num_classes, args.dropout)
    extra = getattr(backbone, "pretrained_extra", {})
    if "fc.bias" in extra and tuple(extra.get("fc.weight", torch.empty(0)).shape) == tuple(student.fc.weight.shape):
        student.fc.load_state_dict({"weight": extra["fc.weight"], "bias": extra["fc.bias"]})
    return FixMatch(student, eman=args.eman)


# ------------------------------------------------------------------------------------------------------ losses
def log_qhat(qhat):
    # q is a mean of softmaxes and stays positive; the clamp only guards a float32 underflow after very long runs.
    return torch.log(qhat.clamp_min(torch.finfo(torch.float32).tiny))


def debiased_pseudo_labels(z_w, qhat, tau, threshold):
    """Counterfactual logit adjustment: softmax(z_w - tau log q). Returns (pseudo-label, mask on the DEBIASED max
    probability)."""
    probs = torch.softmax(z_w - tau * log_qhat(qhat), dim=1)
    conf, target = probs.max(dim=1)
    return target, conf.ge(threshold).float()


def update_qhat(qhat, mean_probs, m):
    """q_t = m q_{t-1} + (1-m) mean_b softmax(z_w)_b (raw, not debiased, softmax: the code, not the paper's typo).
    The reference's --masked-qhat is not offered: it multiplied by the mask without averaging ([B, C] estimate)."""
    return m * qhat + (1.0 - m) * mean_probs


def marginal_loss(z_s_views, targets, masks, qhat, tau):
    """Adaptive marginal loss: masked CE of z_s + tau log q_t, averaged over ALL samples (FixMatch), then over the
    pseudo-label x strong-view pairs."""
    shift = tau * log_qhat(qhat)
    total = 0.0
    for target, mask in zip(targets, masks):
        for z_s in z_s_views:
            total = total + (F.cross_entropy(z_s + shift, target, reduction="none") * mask).mean()
    return total / (len(targets) * len(z_s_views))


def cld_loss(p_s, p_w, groups="argmin", temperature=0.07):
    """CLD instance-group loss in probability space. Group g(b) of each sample from the teacher's p_w (argmin as the
    reference, whose helper came from k-means over distances; argmax = the pseudo-class); centroids = mean p_w of a
    group (an empty group has a zero centroid); logits <p_s, centroid> / T; CE against g(b)."""
    g = p_w.argmin(dim=1) if groups == "argmin" else p_w.argmax(dim=1)
    num = p_w.shape[1]
    counts = torch.bincount(g, minlength=num).clamp_min(1).to(p_w.dtype)
    centroids = p_w.new_zeros(num, num).index_add_(0, g, p_w) / counts[:, None]
    return F.cross_entropy(p_s @ centroids.t() / temperature, g)


def clip_loss(z_s_views, clip_target, clip_mask, masks):
    """CLIP's label where CLIP is confident and every debiased pseudo-label of the model failed the threshold."""
    use = (clip_mask - sum(masks)).ge(0.01).float()
    return torch.stack([F.cross_entropy(z, clip_target, reduction="none") * use for z in z_s_views]).mean()


def compute_losses(z_x, y_x, z_w_views, z_s_views, qhat, args, clip_target=None, clip_mask=None,
                   reduce_mean=distributed.all_reduce_mean):
    """The DebiasPL objective on one batch, in the reference's order: pseudo-labels with q_{t-1}, then the q update,
    then the margin with q_t. Returns (loss, parts, q_t, pseudo-label of the averaged weak view, its mask)."""
    z_x = z_x.float()
    z_w_views = [z.detach().float() for z in z_w_views]
    z_s_views = [z.float() for z in z_s_views]
    z_w = sum(z_w_views) / len(z_w_views) if len(z_w_views) > 1 else z_w_views[0]
    # 1. debiased pseudo-labels from q_{t-1}: averaged weak view (+ each weak view with --multiviews)
    candidates = [z_w] + (z_w_views if len(z_w_views) > 1 else [])
    targets, masks = zip(*[debiased_pseudo_labels(z, qhat, args.tau, args.threshold) for z in candidates])
    # 2. q_t from the raw softmax of the averaged weak logits. The reference keeps q per GPU; here the batch mean is
    # averaged over ranks, so every rank holds the same q (the marginal of the global batch).
    mean_probs = reduce_mean(torch.softmax(z_w, dim=1).mean(dim=0))
    qhat = update_qhat(qhat, mean_probs, args.qhat_m)
    # 3. adaptive marginal loss with q_t
    loss_x = F.cross_entropy(z_x, y_x)
    loss_u = marginal_loss(z_s_views, targets, masks, qhat, args.tau)
    parts = {"loss_x": loss_x, "loss_u": loss_u}
    if clip_target is not None:
        # CLIP's top-1 on the margin-shifted strong logits. With one weak view the reference crashed (NameError on
        # mask1/mask2); here the rule uses the masks there are.
        shift = args.tau * log_qhat(qhat)
        parts["loss_clip"] = clip_loss([z + shift for z in z_s_views], clip_target, clip_mask, masks)
        loss_u = (loss_u + parts["loss_clip"]) / 2.0
    loss = loss_x + args.lambda_u * loss_u
    if args.CLDLoss:
        # Multiview: the averaged strong logits WITHOUT the margin. One strong view: the reference overwrote the
        # logits in place, so its CLD saw the margin-shifted ones; kept.
        z_s = sum(z_s_views) / len(z_s_views) if len(z_s_views) > 1 else z_s_views[0] + args.tau * log_qhat(qhat)
        parts["loss_cld"] = cld_loss(torch.softmax(z_s, dim=1), torch.softmax(z_w, dim=1), args.cld_groups,
                                     args.cld_temperature)
        loss = loss + args.lambda_cld * parts["loss_cld"]
    return loss, parts, qhat, targets[0], masks[0]


def train_step(net, optimizer, scaler, x, y, u_views, qhat, args, device, clip_target=None, clip_mask=None,
               forward=None):
    """One iteration: forward student (+ teacher), DebiasPL loss, SGD step, EMAN update of `net` (the FixMatch
    module; `forward` = its DDP / compiled wrapper, default `net` itself). Returns (loss, parts, q_t, pseudo-labels,
    mask)."""
    forward = net if forward is None else forward
    nw = 2 if args.multiviews else 1
    u_w, u_s = torch.cat(u_views[:nw]), torch.cat(u_views[nw:])
    with runlib.autocast(device, args.amp):
        z_x, z_w, z_s = forward(x, u_w, u_s)
    loss, parts, qhat, target, mask = compute_losses(z_x, y, list(z_w.chunk(nw)), list(z_s.chunk(nw)), qhat, args,
                                                     clip_target, clip_mask)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if args.eman:
        distributed.unwrap(net).update_ema(args.ema_m)
    return loss.detach(), parts, qhat, target, mask


def learning_rate(step, total, args):
    """Learning rate of iteration `step` of a `total`-iteration run whose schedule is laid out over --epochs epochs of
    total / epochs iterations each (with --max_iter not an epoch of data: the schedule is stretched to the run). Warmup
    linear per iteration (step counted from 1), then the chosen schedule: the reference's cosine or step decay are
    constant within an epoch; FixMatch's cos(7 pi k / 16 K) changes every iteration."""
    epoch = step * args.epochs // total  # = step // iterations-per-epoch, in integers
    warmup = args.warmup_epoch * total / args.epochs
    if step < warmup:
        return args.lr * min(1.0, (step + 1) / warmup)
    if args.lr_schedule == "cos":
        progress = (epoch - args.warmup_epoch) / (args.epochs - args.warmup_epoch)
        return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if args.lr_schedule == "fixmatch_cos":
        return args.lr * max(0.0, math.cos(7.0 * math.pi * (step - warmup) / (16.0 * max(1, total - warmup))))
    return args.lr * 0.1 ** sum(epoch >= m for m in args.schedule)


# ------------------------------------------------------------------------------------------------------- data
def resolve_index_file(root, name, flag):
    """A bare name resolves under ROOT/indexes/ (the reference's convention), anything else as a path."""
    candidates = [Path(root) / "indexes" / name] if root is not None else []
    candidates.append(Path(name).expanduser())
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"{flag} {name}: no such file (looked at {' and '.join(str(c) for c in candidates)})")


def percent_split(targets, num_classes, percent, seed):
    """max(1, round(percent * n_c)) random images of each class (the reference's x_u_split, seeded). The reference's
    fallback then built (weak, strong, strong, strong) views where its loop expects (weak, weak, strong, strong);
    here the unlabeled views are the same as with index files."""
    rng = np.random.RandomState(seed)
    labeled = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        if len(idx) == 0:
            continue
        labeled.extend(rng.permutation(idx)[:max(1, round(percent * len(idx)))].tolist())
    return np.sort(np.asarray(labeled, dtype=np.int64))


def read_clip_csv(path, size, num_classes, need_probs):
    indices, labels, probs = splits.read_pseudo_label_csv(path, size, num_classes)
    if need_probs and probs is None:
        raise UserError(f"{path}: the zero-shot unlabeled file needs a Probs column (CLIP's confidence)")
    return np.asarray(indices, dtype=np.int64), np.asarray(labels, dtype=np.int64), probs


def build_splits(args, train, num_classes):
    """Labeled and unlabeled positions in the training set, labeled targets (None = the folder's), and CLIP
    (labels, confidences) per unlabeled row, or None."""
    size = len(train)
    x_labels, clip = None, None
    if args.zero_shot:
        if args.trainindex_x is None or args.trainindex_u is None:
            raise UserError("--zero_shot needs --trainindex_x (CLIP-selected Index, PseudoLabel) and --trainindex_u "
                            "(Index, PseudoLabel, Probs) CSV files")
        # The reference stored these labels but read the folder's ground truth in __getitem__ (a label leak); here
        # the labeled loss sees the CLIP pseudo-labels only.
        x_idx, x_labels, _ = read_clip_csv(resolve_index_file(args.root, args.trainindex_x, "--trainindex_x"),
                                           size, num_classes, need_probs=False)
        u_idx, u_labels, u_probs = read_clip_csv(resolve_index_file(args.root, args.trainindex_u, "--trainindex_u"),
                                                 size, num_classes, need_probs=True)
        clip = (torch.as_tensor(u_labels), torch.as_tensor(np.asarray(u_probs, dtype=np.float32)))
        return x_idx, x_labels, u_idx, clip
    if args.trainindex_x is not None:
        x_idx = splits.read_index_file(resolve_index_file(args.root, args.trainindex_x, "--trainindex_x"), size)
    elif args.trainindex_u is not None:
        raise UserError("--trainindex_u needs --trainindex_x (the labeled images)")
    elif args.num_labeled is not None:
        x_idx, _ = splits.class_balanced_split(train.targets, args.num_labeled, num_classes, args.seed, exact=True)
    else:
        if not 0 < args.anno_percent < 1:
            raise UserError(f"--anno_percent {args.anno_percent} must be in (0, 1)")
        x_idx = percent_split(np.asarray(train.targets), num_classes, args.anno_percent, args.seed)
    x_idx = np.asarray(x_idx, dtype=np.int64)
    if args.trainindex_u is not None:
        u_idx = splits.read_index_file(resolve_index_file(args.root, args.trainindex_u, "--trainindex_u"), size)
    elif args.exclude_labeled:
        u_idx = np.setdiff1d(np.arange(size), x_idx)
    else:
        u_idx = np.arange(size)
    return x_idx, x_labels, np.asarray(u_idx, dtype=np.int64), clip


class DaliViews:
    """common.dali.DaliStream over a subset of the training folder; idx = position in the subset (the row of the
    index / CLIP files). DaliStream needs every shard to fill a batch, so a set smaller than that (a few labels) is
    repeated, as BatchStream fills its batches from the next passes."""

    def __init__(self, dali, dataset, views, batch_size, size, seed, dist, threads, device):
        files = dataset.files
        if files is None:
            raise UserError("--dali reads image files; this dataset is held in memory: drop --dali")
        self.n = len(files)
        reps = max(1, math.ceil((batch_size // dist.world_size) * dist.world_size / self.n))
        self.stream = dali.DaliStream(files=list(files) * reps, labels=np.tile(dataset.targets, reps), views=views,
                                      batch_size=batch_size, size=size, seed=seed, rank=dist.rank,
                                      world_size=dist.world_size, threads=max(1, threads), device=device)

    def __iter__(self):
        return self

    def __next__(self):
        x, y, idx = next(self.stream)
        return x, y, idx % self.n

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, d):
        self.stream.load_state_dict(d)


def load_clip_predictions(args, path_arg, num_u, num_classes):
    """--use_clip: top-k CLIP predictions per unlabeled row -> (top-1 label, top-1 probability)."""
    if path_arg is None:
        if args.trainindex_u is None:
            raise UserError("--use_clip needs --clip_predictions PATH or --trainindex_u (to find "
                            "ROOT/indexes/<stem>_clip_predictions_ranked.pth.tar)")
        stem = Path(args.trainindex_u).name.split(".csv")[0]
        path_arg = Path(args.root) / "indexes" / f"{stem}_clip_predictions_ranked.pth.tar"
    data = runlib.load_file(path_arg, trust=args.trust_checkpoint) if Path(path_arg).is_file() else None
    if data is None:
        raise UserError(f"CLIP predictions {path_arg} not found: pass --clip_predictions PATH")
    if not isinstance(data, dict) or "probs_list" not in data or "preds_list" not in data:
        raise UserError(f"{path_arg}: expected a dict with probs_list and preds_list tensors [N_u, k]")
    probs, preds = torch.as_tensor(data["probs_list"]).float(), torch.as_tensor(data["preds_list"]).long()
    probs, preds = probs.view(len(probs), -1), preds.view(len(preds), -1)
    if len(probs) != num_u or len(preds) != num_u:
        raise UserError(f"{path_arg} has {len(preds)} rows but the unlabeled set has {num_u}: the predictions must "
                        "follow the rows of --trainindex_u")
    if preds.numel() and (preds.min() < 0 or preds.max() >= num_classes):
        raise UserError(f"{path_arg}: class {int(preds.max())} outside 0..{num_classes - 1}")
    return preds[:, 0].clone(), probs.max(dim=1).values


# ------------------------------------------------------------------------------------------------------- main
def resolve_defaults(args):
    """Apply the recipe (--recipe, else the one --dataset implies; args.dataset must be set) to the flags not given,
    and the defaults that follow other flags: --cos sets --lr_schedule cos, --zero_shot lowers --clip_threshold."""
    if args.cos and args.lr_schedule is None:
        args.lr_schedule = "cos"
    runlib.apply_recipe(args, RECIPES, args.recipe or recipe_of(args.dataset))
    if args.clip_threshold is None:
        args.clip_threshold = 0.3 if args.zero_shot else 0.4
    return args


def run_length(args, num_unlabeled):
    """(iterations per epoch, iterations of the run, iteration to stop at). An epoch is one pass over the unlabeled
    set or --epoch_iters; the run is --epochs of them unless --max_iter says otherwise; --stop_after cuts it short.
    Fills --eval_interval (its epoch spelling --eval_freq converts here; default: one epoch)."""
    for flag in ("max_iter", "stop_after", "epochs", "epoch_iters", "eval_interval", "eval_freq"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: must be at least 1")
    iters_per_epoch = args.epoch_iters or max(1, num_unlabeled // (args.mu * args.batch_size))
    total = args.max_iter if args.max_iter is not None else args.epochs * iters_per_epoch
    stop = min(total, args.stop_after) if args.stop_after is not None else total
    if args.eval_freq is not None:
        if args.eval_interval is not None:
            raise UserError(f"--eval_freq {args.eval_freq} (epochs) and --eval_interval {args.eval_interval} "
                            "(iterations) say the same thing: pass one")
        args.eval_interval = args.eval_freq * iters_per_epoch
    elif args.eval_interval is None:
        args.eval_interval = iters_per_epoch
    return iters_per_epoch, total, stop


def main(argv=None):
    args = parse_args(argv)
    dist = distributed.init(args.device)
    device = dist.device
    runlib.seed_everything(args.seed, dist.rank, args.deterministic)

    # data ---------------------------------------------------------------------------------------------------
    if args.dataset is None:
        if args.root is None:
            raise UserError("pass --root DATASET_FOLDER (and --dataset if its name does not say which)")
        args.dataset = datasets.infer_name(args.root)
    resolve_defaults(args)
    if args.use_clip and args.zero_shot:
        raise UserError("--zero_shot already trains on CLIP's labels from --trainindex_u; drop --use_clip")
    if args.dali and args.dataset not in IMAGENET_LIKE:
        raise UserError(f"--dali reads ImageNet-style image folders; {args.dataset} is loaded from arrays: drop --dali")
    world = dist.world_size
    if args.batch_size % world:
        raise UserError(f"--batch_size {args.batch_size} (global) must be divisible by the {world} processes")

    train = datasets.load(args.dataset, args.root, "train", download=args.download)
    test = datasets.load(args.dataset, args.root, "test", download=args.download)
    num_classes = train.num_classes
    if args.cls is not None and args.cls != num_classes:
        raise UserError(f"--cls {args.cls} but {args.root} has {num_classes} classes: fix --cls or --root")
    x_idx, x_labels, u_idx, clip = build_splits(args, train, num_classes)
    if args.use_clip:
        clip = load_clip_predictions(args, args.clip_predictions, len(u_idx), num_classes)
    iters_per_epoch, total, stop = run_length(args, len(u_idx))
    lab_weak, weak, strong, val_tf = make_transforms(args.dataset, args.image_size)
    u_tfs = [weak, weak, strong, strong] if args.multiviews else [weak, strong]
    x_set = train.subset(x_idx, transform=lab_weak, targets=None if x_labels is None else x_labels)
    u_set = train.subset(u_idx, transform=u_tfs)
    test.transform = val_tf
    if args.trainindex_x is not None:
        labels_name = Path(args.trainindex_x).stem
    elif args.num_labeled is not None:
        labels_name = str(args.num_labeled)
    else:
        labels_name = f"{args.anno_percent * 100:g}p"
    # A resumed run keeps the checkpoint's split and network; the learning rate is set from the flags every step,
    # while the restored optimizer state keeps its momentum and weight decay.
    run = runlib.Run(args, "debiaspl", args.dataset, labels_name, dist,
                     fixed=("dataset", "backbone", "eman", "num_labeled", "anno_percent", "seed"),
                     kept=("momentum", "weight_decay", "nesterov"))

    if args.dali:
        # The same views as make_transforms' ImageNet-style path: DALI's "train" view is RandomResizedCrop to
        # --image_size with torchvision's scale (0.08, 1) and ratio (3/4, 4/3), linear antialiased resize, and a
        # horizontal flip. Its "strong" view adds DALI's RandAugment (n=2, magnitude bin 10 of 31, 14 ops), which
        # cannot express the reference's (16-op pool, random magnitude 1..9 of 10, always applied): the one
        # difference, documented in docs/debiaspl.md. Evaluation reads the test set through torchvision either way.
        from common import dali
        dev = "cuda" if device.type == "cuda" else "cpu"
        u_views = ("train", "train", "strong", "strong") if args.multiviews else ("train", "strong")
        x_stream = DaliViews(dali, x_set, ("train",), args.batch_size, args.image_size, args.seed, dist, args.workers,
                             dev)
        u_stream = DaliViews(dali, u_set, u_views, args.mu * args.batch_size, args.image_size, args.seed + 1, dist,
                             args.workers, dev)
    else:
        pin = device.type == "cuda"
        x_stream = loaders.BatchStream(x_set, args.batch_size, args.seed, args.workers, dist.rank, world,
                                        pin_memory=pin)
        u_stream = loaders.BatchStream(u_set, args.mu * args.batch_size, args.seed + 1, args.workers, dist.rank,
                                        world, pin_memory=pin)
    test_loader = loaders.eval_loader(test, args.eval_batch_size, args.workers, dist.rank, world)

    # model --------------------------------------------------------------------------------------------------
    net = build_model(args, num_classes).to(device)  # student and teacher: what is checkpointed and evaluated
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    model = distributed.wrap(net, dist)  # DDP broadcasts rank 0's student AND teacher, weights and buffers
    # On CPU PyTorch's default SGD loops over the tensors in Python (60-90 ms per step for a ResNet-18, 10-15% of a
    # 32-px iteration); the fused kernel gives the same numbers in 12-15 ms. CUDA keeps its default (foreach).
    optimizer = torch.optim.SGD(net.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                nesterov=args.nesterov, fused=True if device.type == "cpu" else None)
    scaler = runlib.grad_scaler(device, args.amp)
    forward = torch.compile(model) if args.compile else model
    qhat = torch.full((num_classes,), 1.0 / num_classes, device=device)  # uniform: no adjustment at first
    if clip is not None:
        clip = (clip[0].to(device), clip[1].to(device))

    start, best = 0, -1.0
    state = run.resume_state
    if state is not None:
        if not (np.array_equal(np.asarray(state["x_index"]), x_idx)
                and np.array_equal(np.asarray(state["u_index"]), u_idx)):
            raise UserError(f"{run.dir}/checkpoint.pt was trained on another labeled/unlabeled split: use the same "
                            "index files, --num_labeled and --seed, or another --run_name")
        if int(state.get("num_classes", num_classes)) != num_classes:
            raise UserError(f"{run.dir}/checkpoint.pt has {state['num_classes']} classes, {args.root} has "
                            f"{num_classes}: resume with the same dataset, or pass another --run_name")
        runlib.restore(state, {"model": net, "optimizer": optimizer, "scaler": scaler, "x_stream": x_stream,
                               "u_stream": u_stream}, fits=f"--backbone {args.backbone} --eman {args.eman}")
        qhat = state["qhat"].to(device)
        start, best = int(state["step"]), float(state["best_top1"])
        runlib.restore_rng_states(state["rng"], dist.rank, lambda: runlib.seed_everything(
            args.seed + 7919 * start, dist.rank, args.deterministic))
    run.start()
    run.save_split(x_idx, x_set.ids)

    def save(step):
        run.save_checkpoint({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "qhat": qhat.cpu(), "step": step, "best_top1": best,
                             "rng": runlib.rng_states(), "x_index": torch.from_numpy(x_idx),
                             "u_index": torch.from_numpy(u_idx), "x_stream": x_stream.state_dict(),
                             "u_stream": u_stream.state_dict(), "num_classes": num_classes})

    def evaluate():
        # The reference evaluates the student; the EMAN teacher is reported next to it. The RNG state is put back so
        # that evaluating does not change the training randomness (resume equality).
        rng = runlib.rng_state()
        net.eval()
        with runlib.autocast(device, args.amp):
            top1, top5 = runlib.evaluate(net.main, test_loader, device)
            teacher = runlib.evaluate(net.ema, test_loader, device) if net.ema is not None else None
        net.train()
        runlib.set_rng_state(rng)
        return top1, top5, teacher

    # training -----------------------------------------------------------------------------------------------
    net.train()
    x_iter, u_iter = iter(x_stream), iter(u_stream)
    teacher_top1 = run.evals[-1].get("teacher_top1") if run.evals else None
    means, shown = runlib.Means(), {}
    for step in range(start, stop):
        t0 = time.time()
        x, y, _ = next(x_iter)
        u_views, u_y, u_i = next(u_iter)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        u_views = [v.to(device, non_blocking=True) for v in u_views]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            u_views = [v.contiguous(memory_format=torch.channels_last) for v in u_views]
        clip_target = clip_mask = None
        if clip is not None:
            rows = u_i.to(device)
            clip_target, clip_mask = clip[0][rows], clip[1][rows].ge(args.clip_threshold).float()
        data_s = time.time() - t0
        lr = learning_rate(step, total, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, parts, qhat, target, mask = train_step(net, optimizer, scaler, x, y, u_views, qhat, args, device,
                                                     clip_target, clip_mask, forward)
        # Summed on the device; read back (and checked for a non-finite loss) only at logging steps, which every
        # evaluation is, so no checkpoint holds weights that a bad loss has touched.
        u_y = u_y.to(device)
        means.add(loss=loss, **parts, mask=mask.mean(),
                  pseudo_acc=((target == u_y).float() * mask).sum() / mask.sum().clamp_min(1),
                  qhat_max=qhat.max(), qhat_min=qhat.min(), data_s=data_s)
        evaluating = (step + 1) % args.eval_interval == 0 or step + 1 == stop
        if (step + 1) % args.log_interval == 0 or evaluating:
            shown = means.read()
            runlib.check_finite(shown["loss"], step + 1, run)
            run.log(step + 1, {**{f"train/{k}": v for k, v in shown.items() if k != "data_s"}, "train/lr": lr,
                               "time/data_s": shown["data_s"]})
        run.progress(step + 1, total, loss=shown.get("loss"), mask=shown.get("mask"), lr=lr)
        if evaluating:
            top1, top5, teacher = evaluate()
            best = max(best, top1)
            extra_eval = {}
            if teacher is not None:
                teacher_top1 = teacher[0]
                extra_eval = {"teacher_top1": teacher[0], "teacher_top5": teacher[1]}
                run.log(step + 1, {"test/teacher_top1": teacher[0], "test/teacher_top5": teacher[1]})
            run.log_eval(step + 1, top1, top5, epoch=(step + 1) / iters_per_epoch, **extra_eval)
            save(step + 1)
    if start >= stop and dist.is_main:
        print(f"[{run.name}] the checkpoint is already at iteration {start} of {total}: nothing to train", flush=True)
    if stop < total:  # --stop_after: the checkpoint of iteration `stop` is written; no summary.json yet
        run.stop(max(start, stop), total)
        return
    q = qhat.clamp_min(1e-30)
    run.finish(iters=max(start, total), labeled=len(x_idx), unlabeled=len(u_idx), teacher_final_top1=teacher_top1,
               qhat_entropy=float(-(q * q.log()).sum()), qhat_max_over_min=float(q.max() / q.min()))


if __name__ == "__main__":
    runlib.entry(main)
