"""Self-Tuning for data-efficient deep learning (Wang, Gao, Long, Wang, ICML 2021, arXiv:2102.12903).

Idea: fine-tune a pretrained network on a few labeled images and many unlabeled ones at once. A classifier learns
from the labels with cross-entropy; a MoCo-style contrastive head learns from everything. Its queue keeps K keys
per class, filled with true labels for labeled images and with the classifier's pseudo-labels for unlabeled ones;
the Pseudo Group Contrast (PGC) loss pulls each query towards its own key and the K queued keys of its (pseudo-)class
and pushes it away from the other classes' keys. The labels thus shape the contrastive features, and the contrastive
features make the pseudo-labels better: loss = CE(labeled) + PGC(labeled) + PGC(unlabeled).

Reference code: https://github.com/thuml/Self-Tuning (src/main.py, models/method.py). The behaviour here is the
reference's; every place where it differs says so in a comment ("REF:"). The main differences: PGC loss and queue
update are vectorised (same values), the unlabeled pseudo-labels come from the query forward that feeds the PGC
loss instead of a third forward, keys are gathered over ranks, label ratio 100 runs, crashes are fixed.

Launch (the paper's settings: bash run.sh selftuning):
    # one GPU
    python selftuning.py --root ./StanfordCars --label_ratio 15 --pretrained --batch_size 24
    python selftuning.py --root ./cifar100 --backbone efficientnet_b2 --num_labeled 400 --expand_label \\
        --pretrained --batch_size 20
    # N GPUs (--batch_size is global: each rank takes batch_size / N)
    torchrun --nproc_per_node 4 selftuning.py --root ./CUB200 --label_ratio 15 --pretrained --batch_size 24
    # CPU, a tiny smoke run
    python selftuning.py --root ./StanfordCars --label_ratio 15 --pretrained --backbone resnet18 --image_size 64 \\
        --batch_size 4 --max_iter 3 --eval_interval 3 --workers 0 --device cpu
    # the fine-tuning baseline of the paper's tables (CE on the labeled batch only)
    python selftuning.py --root ./StanfordCars --label_ratio 15 --pretrained --batch_size 24 --no-pgc
"""
import argparse
import copy
import math
import random
import time

import common  # noqa: F401  first: it sets how OpenMP threads wait, which must precede torch
import numpy as np
import PIL.ImageDraw
import PIL.ImageEnhance
import PIL.ImageOps
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from common import UserError, backbones, datasets, distributed, loaders, splits
from common import run as runlib

FINEGRAINED = ('cub200', 'stanfordcars', 'aircraft')
SMALL_IMAGES = ('cifar10', 'cifar100', 'svhn', 'digits')     # 32-px sets: the reference's CIFAR-100 pipeline
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR100_MEAN_STD = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))  # REF data/tranforms.py

# ----------------------------------------------------------------------------------------------------------- recipes
# The per-dataset defaults (--recipe; a flag given on the command line wins): the reference's test protocol. The
# data pipeline itself follows the dataset (32-px sets are upsampled, the others resized to 256 and cropped).
RECIPES = {
    "finegrained": dict(ten_crop=True),   # CUB200, StanfordCars, Aircraft and image folders: 10-crop test
    "cifar": dict(ten_crop=False),        # the 32-px sets (CIFAR-10/100, SVHN, digits): one view
}


def choose_recipe(args):
    """Infer --dataset from --root and fill the recipe's defaults: --recipe, else the dataset's (a flag given on the
    command line wins)."""
    args.dataset = args.dataset or datasets.infer_name(args.root)
    return runlib.apply_recipe(args, RECIPES, args.recipe or ("cifar" if args.dataset in SMALL_IMAGES
                                                              else "finegrained"))


class Spellings(tuple):
    """Backbone names that also accept the reference's dashed spellings (efficientnet-b2) as choices."""

    def __contains__(self, name):
        return tuple.__contains__(self, str(name).replace("-", "_"))


# ------------------------------------------------------------------------------------------------------------ flags
def parse_args(argv=None):
    p = runlib.Parser(description=__doc__, recipes=RECIPES)
    g = p.add_argument_group("data")
    g.add_argument("--root", shared=True, default=None,
                   help="its name picks the dataset (CUB200, StanfordCars, Aircraft, *cifar100*, ...), else a "
                        "train/ + val/ image folder")
    g.add_argument("--dataset", shared=True, default=None, choices=datasets.NAMES)
    g.add_argument("--download", shared=True)
    g.add_argument("--recipe", shared=True, default=None, choices=list(RECIPES),
                   help="cifar for the 32-px sets, finegrained for the others")
    g.add_argument("--label_ratio", type=int, default=None,
                   help="percent of labeled training images: image_list/train_<r>.txt of the fine-grained sets "
                        "(15/30/50/100), or a per-class share of an image folder (default: 15 where it applies, "
                        "i.e. the fine-grained sets, and image folders without --num_labeled)")
    g.add_argument("--num_labeled", shared=True, default=None,
                   help="num_labeled / classes per class, the unlabeled set is the whole training set (the 32-px "
                        "sets, where it is required: CIFAR-100 400/2500/10000; image folders); not for the "
                        "fine-grained sets")
    g.add_argument("--expand_label", action=argparse.BooleanOptionalAction, default=False,
                   help="repeat the labeled list ceil(batch_size * eval_interval / n) times, as the reference does "
                        "for CIFAR-100")
    g.add_argument("--image_size", type=int, default=224, help="network input size (fine-grained sets are resized "
                   "to image_size * 256/224 first; 32-px sets are upsampled to it)")
    g.add_argument("--resize_interp", default="bicubic", choices=["bicubic", "nearest"],
                   help="filter of the reference's PIL resizes (32->224 upsampling, 256x256 resize): bicubic is "
                        "Pillow>=7's default, nearest Pillow<7's, which the reference's pinned stack implies")
    g.add_argument("--ten_crop", action=argparse.BooleanOptionalAction, default=None, recipe=True,
                   help="10-crop test (summed logits), as the reference for the fine-grained sets")
    g.add_argument("--workers", shared=True, default=4)
    g.add_argument("--test_batch_size", type=int, default=None,
                   help="test images per batch per rank (default: 10 with --ten_crop, else 100)")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", "--arch", shared=True, default="resnet50", choices=Spellings(backbones.NAMES),
                   metavar="NAME", help=f"one of {', '.join(backbones.NAMES)} (alias --arch; the reference's "
                                        "efficientnet-b2 spelling is accepted)")
    g.add_argument("--pretrained", shared=True, default=None)
    g.add_argument("--projector_dim", type=int, default=1024, help="output size of the linear projector")

    g = p.add_argument_group("method")
    g.add_argument("--queue_size", type=int, default=32, help="keys kept per class (K)")
    g.add_argument("--momentum", type=float, default=0.999, help="key-encoder momentum m: k <- m k + (1-m) q")
    g.add_argument("--ema_per_forward", action=argparse.BooleanOptionalAction, default=True,
                   help="momentum update before each key forward, i.e. twice per iteration (the reference); "
                        "--no-ema_per_forward updates once per iteration")
    g.add_argument("--temperature", type=float, default=0.07, help="PGC softmax temperature")
    g.add_argument("--pgc", action=argparse.BooleanOptionalAction, default=True,
                   help="the PGC terms; --no-pgc is the fine-tuning baseline: CE on the labeled batch only")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", shared=True, default=64,
                   help="of labeled and of unlabeled images (the paper: 24 fine-grained, 20 CIFAR)")
    g.add_argument("--lr", shared=True, default=1e-3, help="of the backbone and projector")
    g.add_argument("--lr_ratio", type=float, default=10.0, help="the classifier's lr is lr * lr_ratio")
    g.add_argument("--weight_decay", shared=True, default=1e-4, help="SGD, all parameters")
    g.add_argument("--max_iter", shared=True, default=27005)
    g.add_argument("--stop_after", shared=True, default=None)
    g.add_argument("--milestones", type=int, nargs="+", default=[6000, 12000, 18000, 24000],
                   help="iterations where the lr is multiplied by 0.1 (the reference's, for its 27005 iterations; "
                        "they do not move with --max_iter)")
    g.add_argument("--eval_interval", "--test_interval", shared=True, default=3000,
                   help="alias --test_interval, the reference's: after iterations 1, 1+N, 1+2N, ... (and 500 and "
                        "the last one)")
    g.add_argument("--save_interval", type=int, default=1000, help="also write the checkpoint every N iterations")
    g.add_argument("--log_interval", shared=True, default=10)
    g.add_argument("--seed", shared=True, default=666666, help="of the split, the initialisation and the data")
    runlib.add_standard_flags(p)
    args = p.parse_args(argv)
    args.backbone = args.backbone.replace("-", "_")
    for name in ("batch_size", "max_iter", "eval_interval", "save_interval", "log_interval", "queue_size",
                 "projector_dim", "image_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, not {getattr(args, name)}")
    for name in ("num_labeled", "stop_after", "test_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, not {getattr(args, name)}")
    if not 0.0 <= args.momentum <= 1.0:
        raise UserError(f"--momentum {args.momentum} must lie in [0, 1]")
    return args


# ----------------------------------------------------------------------------------------------------- augmentation
# RandAugmentMC of the reference (data/randaugment.py, from kekmodel/FixMatch-pytorch): 2 of 14 ops drawn with
# replacement, each applied with probability 1/2 at a level drawn from 1..m-1, then a 16-px gray cutout. Written by
# hand because torchvision's RandAugment has other ops, magnitudes and no per-op coin flip. Python's `random` and
# NumPy's global RNG drive it, as in the reference (the run's checkpoint saves both; BatchStream seeds workers).
def _level(v, max_v):
    return float(v) * max_v / 10


def _int_level(v, max_v):
    return int(v * max_v / 10)


def _signed(x):
    return -x if random.random() < 0.5 else x


def _affine(img, coeffs):
    return img.transform(img.size, Image.Transform.AFFINE, coeffs)


RANDAUGMENT_POOL = [  # (op(img, v, max_v, bias), max_v, bias)
    (lambda img, v, m, b: PIL.ImageOps.autocontrast(img), None, None),
    (lambda img, v, m, b: PIL.ImageEnhance.Brightness(img).enhance(_level(v, m) + b), 0.9, 0.05),
    (lambda img, v, m, b: PIL.ImageEnhance.Color(img).enhance(_level(v, m) + b), 0.9, 0.05),
    (lambda img, v, m, b: PIL.ImageEnhance.Contrast(img).enhance(_level(v, m) + b), 0.9, 0.05),
    (lambda img, v, m, b: PIL.ImageOps.equalize(img), None, None),
    (lambda img, v, m, b: img, None, None),                                              # identity
    (lambda img, v, m, b: PIL.ImageOps.posterize(img, _int_level(v, m) + b), 4, 4),
    (lambda img, v, m, b: img.rotate(_signed(_int_level(v, m) + b)), 30, 0),
    (lambda img, v, m, b: PIL.ImageEnhance.Sharpness(img).enhance(_level(v, m) + b), 0.9, 0.05),
    (lambda img, v, m, b: _affine(img, (1, _signed(_level(v, m) + b), 0, 0, 1, 0)), 0.3, 0),        # shear x
    (lambda img, v, m, b: _affine(img, (1, 0, 0, _signed(_level(v, m) + b), 1, 0)), 0.3, 0),        # shear y
    (lambda img, v, m, b: PIL.ImageOps.solarize(img, 256 - (_int_level(v, m) + b)), 256, 0),
    (lambda img, v, m, b: _affine(img, (1, 0, int(_signed(_level(v, m) + b) * img.size[0]), 0, 1, 0)), 0.3, 0),
    (lambda img, v, m, b: _affine(img, (1, 0, 0, 0, 1, int(_signed(_level(v, m) + b) * img.size[1]))), 0.3, 0),
]


def cutout_abs(img, size):
    """A gray (127) square of side `size` px (PIL's rectangle includes its far edge) centred at a uniform pixel."""
    w, h = img.size
    x0, y0 = np.random.uniform(0, w), np.random.uniform(0, h)
    x0, y0 = int(max(0, x0 - size / 2.0)), int(max(0, y0 - size / 2.0))
    x1, y1 = int(min(w, x0 + size)), int(min(h, y0 + size))
    img = img.copy()
    PIL.ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), (127, 127, 127))
    return img


class RandAugmentMC:
    def __init__(self, n=2, m=10, cutout=16):
        self.n, self.m, self.cutout = n, m, cutout

    def __call__(self, img):
        for op, max_v, bias in random.choices(RANDAUGMENT_POOL, k=self.n):
            v = np.random.randint(1, self.m)
            if random.random() < 0.5:
                img = op(img, v, max_v, bias)
        return cutout_abs(img, self.cutout)  # absolute 16 px at any image size, as in the reference


INTERP = {"bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


class ResizeImage:
    """PIL resize to (size, size), aspect not kept (the reference's ResizeImage)."""

    def __init__(self, size, interp):
        self.size, self.interp = size, INTERP[interp]

    def __call__(self, img):
        return img.resize((self.size, self.size), self.interp)


def resize_size(image_size):
    return int(round(image_size * 256 / 224))  # 256 for 224-px crops


def finegrained_train_transform(image_size, mean_std, interp):
    """Resize 256x256 -> RandomResizedCrop 224 -> flip -> RandAugmentMC(2, 10) + cutout 16 -> tensor."""
    return T.Compose([ResizeImage(resize_size(image_size), interp), T.RandomResizedCrop(image_size),
                      T.RandomHorizontalFlip(), RandAugmentMC(2, 10), T.ToTensor(), T.Normalize(*mean_std)])


def small_train_transform(native, image_size, mean_std, interp):
    """32-px sets: flip -> RandomCrop(32, pad 4, reflect) -> RandAugmentMC(2, 10) + cutout 16 -> resize -> tensor."""
    return T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(native, padding=int(native * 0.125),
                                                               padding_mode="reflect"),
                      RandAugmentMC(2, 10), ResizeImage(image_size, interp), T.ToTensor(), T.Normalize(*mean_std)])


def small_test_transform(image_size, mean_std, interp):
    return T.Compose([ResizeImage(image_size, interp), T.ToTensor(), T.Normalize(*mean_std)])


def ten_crop_offsets(image_size):
    """(x, y) of the reference's 10-crop test (Co-Tuning): corners at 0 and R - S - 1 (31 for 256/224, so the right
    and bottom pixel rows are never used) and the centre (R - S - 1) / 2, which PIL's crop rounds (15.5 -> 16)."""
    last = resize_size(image_size) - image_size - 1
    centre = round(last / 2)
    return [(0, 0), (last, last), (last, 0), (0, last), (centre, centre)]


class TenCrop:
    """Resize to R x R; crops 0-4 of the mirrored image, 5-9 of the image, at ten_crop_offsets. -> (10, 3, S, S)."""

    def __init__(self, image_size, mean_std, interp):
        self.size, self.resize = image_size, ResizeImage(resize_size(image_size), interp)
        self.offsets = ten_crop_offsets(image_size)
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(*mean_std)])

    def __call__(self, img):
        img = self.resize(img)
        s = self.size
        views = [im.crop((x, y, x + s, y + s)) for im in (img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img)
                 for x, y in self.offsets]
        return torch.stack([self.to_tensor(v) for v in views])


# ------------------------------------------------------------------------------------------------------------ model
class Encoder(nn.Module):
    """Backbone -> pooled feature -> linear projector. forward(x) -> (projection, feature)."""

    def __init__(self, backbone, projector_dim, feature_dropout=0.0):
        super().__init__()
        self.backbone = backbone
        # REF's EfficientNet wrapper applies the package's dropout (0.3) to the pooled feature, so classifier and
        # projector both see the dropped-out feature in training; common.backbones leaves it out.
        self.dropout = nn.Dropout(feature_dropout) if feature_dropout else nn.Identity()
        self.projector = nn.Linear(backbone.feature_dim, projector_dim)  # one layer, default init, as REF

    def forward(self, x):
        feat = self.dropout(self.backbone(x))
        return self.projector(feat), feat


class QueryNet(nn.Module):
    """Query encoder f_q + projector h_q and classifier g on the pooled feature (not on the projection).

    forward(x_l, x_u=None) -> (proj_l, logits_l, proj_u, logits_u). One module call per iteration keeps DDP to one
    forward per backward. logits_u are computed without gradient from the same features as proj_u: they give the
    unlabeled pseudo-labels."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.backbone.feature_dim, num_classes)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)  # REF models/classifier.py
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x_l, x_u=None):
        proj_l, feat_l = self.encoder(x_l)
        logits_l = self.classifier(feat_l)
        if x_u is None:
            return proj_l, logits_l, None, None
        proj_u, feat_u = self.encoder(x_u)
        with torch.no_grad():
            logits_u = self.classifier(feat_u)
        return proj_l, logits_l, proj_u, logits_u

    def classify(self, x):
        """Logits at test time; (B, V, 3, H, W) multi-crop input gives the sum over the V crops' logits."""
        if x.dim() == 5:
            b, v = x.shape[:2]
            return self.classifier(self.encoder(x.flatten(0, 1))[1]).view(b, v, -1).sum(1)
        return self.classifier(self.encoder(x)[1])


class KeyEncoder(nn.Module):
    """Momentum copy f_k + h_k of the query encoder: parameters copied at start, never trained; always run in train
    mode (batch statistics), as REF. Its BN running buffers are its own (REF never syncs them; they are unused)."""

    def __init__(self, encoder, momentum):
        super().__init__()
        self.net = copy.deepcopy(encoder)
        self.net.requires_grad_(False)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, encoder):
        """k <- m k + (1 - m) q over the parameters, in place, as k + (1 - m)(q - k): one pass over memory (REF
        builds new tensors, k * m + q * (1 - m); the two forms differ only in rounding)."""
        torch._foreach_lerp_(list(self.net.parameters()), list(encoder.parameters()), 1.0 - self.momentum)

    @torch.no_grad()
    def forward(self, x):
        return F.normalize(self.net(x)[0].float(), dim=1)


class ClassQueue(nn.Module):
    """K keys per class: `keys` rows [c*K, (c+1)*K) belong to class c, a ring buffer with write pointer ptr[c].

    Starts as random unit vectors, which act as real positives and negatives until each class has been refilled
    (REF behaviour). Shared by labeled keys (true labels) and unlabeled keys (pseudo-labels)."""

    def __init__(self, dim, num_classes, size, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # the same queue on every rank
        keys = F.normalize(torch.randn(dim, num_classes * size, generator=g), dim=0)  # REF's (P, C*K) layout
        self.register_buffer("keys", keys.t().contiguous())                            # stored as (C*K, P)
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.size, self.num_classes = size, num_classes

    @torch.no_grad()
    def enqueue(self, keys, labels):
        """Write keys[i] at slot ptr[c_i] of class c_i, advancing ptr[c_i] by one each time, in batch order: what
        REF's per-sample loop does, in one scatter. The i-th sample of class c in the batch goes to
        (ptr[c] + i) mod K; when a class has more than K samples only its last K survive, as in the sequential loop.
        Out of place: the logits of this batch were computed from the old keys and autograd still needs them."""
        K = self.size
        onehot = F.one_hot(labels, self.num_classes)                    # (N, C)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1                   # order of each sample within its class
        count = onehot.sum(0)                                           # (C,)
        rows = labels * K + (self.ptr[labels] + rank) % K
        # A slot keeps the last sample sent to it; every sample sent there writes that one's key, so the copy needs
        # no mask (whose size the host would have to wait for) and its duplicate rows agree.
        order = torch.arange(len(labels), device=labels.device)
        last = torch.full((len(self.keys),), -1, dtype=torch.long, device=labels.device)
        last = last.scatter_reduce(0, rows, order, "amax")
        self.keys = self.keys.index_copy(0, rows, keys[last[rows]].to(self.keys.dtype))
        self.ptr = (self.ptr + count) % K


def pgc_loss(q, k, queue_keys, labels, queue_size, temperature):
    """Pseudo Group Contrast loss, in REF's KL form.

    Logits z_i = [q_i.k_i, q_i.Q_1, ..., q_i.Q_{C*K}] / tau over the own key and every queued key; positives: the
    own key and the K keys of class c_i. REF computes KLDivLoss(batchmean)(log_softmax(z), t) with t = 1/(K+1) on
    the positives: KL = -(1/(K+1)) sum_{j in P_i} log softmax(z_i)_j - log(K+1), i.e. the paper's group cross-entropy
    shifted by -log(K+1) (log 33 = 3.4965 for K = 32). Same gradient; logged values are REF's. REF orders the
    columns [own, class c_i, other classes] per sample in a Python loop; the order does not change the softmax, so
    one matrix product and a gather give the same value."""
    with torch.autocast(q.device.type, enabled=False):  # fp32 logits even under --amp (1/tau = 14.3 scales them)
        q, k, queue_keys = q.float(), k.float(), queue_keys.float()
        z = torch.cat([(q * k).sum(1, keepdim=True), q @ queue_keys.t()], dim=1) / temperature
        logp = torch.log_softmax(z, dim=1)
        b = q.shape[0]
        group = logp[:, 1:].view(b, -1, queue_size)[torch.arange(b, device=q.device), labels].sum(1)
        return (-(logp[:, 0] + group) / (queue_size + 1)).mean() - math.log(queue_size + 1)


def selftuning_losses(forward, encoder, key, queue, x_l, y_l, x_u=None, temperature=0.07, ema_per_forward=True,
                      pgc=True):
    """One iteration's forward: CE + PGC(labeled) + PGC(unlabeled); enqueues this iteration's keys.

    forward: the QueryNet (or its DDP / compiled wrapper); encoder: the unwrapped query Encoder (for the momentum
    update); key: the KeyEncoder; x_l = (view a, view b) of the labeled batch (one tensor when pgc is off); x_u
    likewise or None (no unlabeled data). Returns a dict of losses, the labeled logits and the pseudo-labels."""
    if not pgc:  # the fine-tuning baseline: CE on the labeled batch alone
        logits_l = forward(x_l)[1]
        ce = F.cross_entropy(logits_l.float(), y_l)
        zero = ce.detach() * 0
        return {"loss": ce, "ce": ce, "pgc_l": zero, "pgc_u": zero, "logits_l": logits_l}
    (la, lb), (ua, ub) = x_l, (x_u if x_u is not None else (None, None))
    proj_l, logits_l, proj_u, logits_u = forward(la, ua)
    ce = F.cross_entropy(logits_l.float(), y_l)

    # REF order: momentum update, labeled keys, [momentum update], unlabeled keys. No optimizer step in between, so
    # the second update moves the key encoder again towards the same query weights.
    key.update(encoder)
    k_l = key(lb)
    pgc_l = pgc_loss(F.normalize(proj_l.float(), dim=1), k_l, queue.keys, y_l, queue.size, temperature)
    # Keys of all ranks, in rank order, so every rank writes the same queue.
    queue.enqueue(distributed.all_gather_cat(k_l), distributed.all_gather_cat(y_l))
    out = {"ce": ce, "pgc_l": pgc_l, "logits_l": logits_l}

    if proj_u is not None:
        # REF takes the pseudo-labels from an extra forward of f_q on view a (train mode, graph kept, BN statistics
        # updated a third time) and then runs f_q on view a again for the PGC loss. Here the PGC forward's own
        # features give them: the same labels for BN networks in train mode (same weights, same batch), one
        # forward less, and BN running statistics updated twice per iteration instead of three times. With dropout
        # (EfficientNet) the mask of the PGC forward is used instead of an independent one.
        conf, pseudo = torch.softmax(logits_u.detach().float(), dim=1).max(1)  # no threshold, as REF (its issue #8)
        if ema_per_forward:
            key.update(encoder)
        k_u = key(ub)
        pgc_u = pgc_loss(F.normalize(proj_u.float(), dim=1), k_u, queue.keys, pseudo, queue.size, temperature)
        queue.enqueue(distributed.all_gather_cat(k_u), distributed.all_gather_cat(pseudo))
        out.update(pseudo=pseudo, confidence=conf)
    else:  # --label_ratio 100: the contrastive term on labeled data only (REF crashes on the empty unlabeled set)
        pgc_u = pgc_l.detach() * 0
    out.update(pgc_u=pgc_u, loss=ce + pgc_l + pgc_u)
    return out


# ------------------------------------------------------------------------------------------------------------- data
def ratio_split(targets, ratio, seed):
    """Image folders: per class max(1, round(ratio% of the class)) labeled images drawn with RandomState(seed); the
    rest unlabeled (the rule of the fine-grained lists, which are pre-made files)."""
    rng = np.random.RandomState(seed)
    labeled = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        labeled.extend(rng.choice(idx, max(1, int(round(len(idx) * ratio / 100))), replace=False).tolist())
    labeled = np.sort(np.asarray(labeled, dtype=np.int64))
    return labeled, np.setdiff1d(np.arange(len(targets)), labeled)


def load_data(args, name):
    """(labeled, unlabeled or None, test, labels tag). Sets no transform; the caller does."""
    if name in FINEGRAINED:
        if args.num_labeled is not None:
            raise UserError(f"{name} uses the pre-made label lists: pass --label_ratio 15/30/50/100, not --num_labeled")
        ratio = args.label_ratio = 15 if args.label_ratio is None else args.label_ratio
        if args.download:
            datasets.load(name, args.root, "test", download=True)  # fetches the archives when the layout is absent
        labeled, unlabeled = splits.finegrained_split(args.root, name, ratio)
        test = datasets.load(name, args.root, "test")
        return labeled, (unlabeled if len(unlabeled) else None), test, f"{ratio}pct"
    train = datasets.load(name, args.root, "train", download=args.download)
    test = datasets.load(name, args.root, "test", download=False)
    if args.num_labeled is not None:
        if args.label_ratio is not None:
            raise UserError("pass either --num_labeled or --label_ratio, not both")
        # FixMatch / REF CIFAR rule: num_labeled / C per class (a multiple of C, as in every script); the unlabeled
        # set is ALL training images. REF draws with the global NumPy RNG after seeding, so its indices differ from
        # these (RandomState(seed)).
        lab, unl = splits.class_balanced_split(train.targets, args.num_labeled, train.num_classes, args.seed,
                                               exact=True)
        tag = str(args.num_labeled)
    elif name in SMALL_IMAGES:
        raise UserError(f"{name} needs --num_labeled (the paper's CIFAR-100 runs: 400, 2500, 10000)")
    else:
        ratio = args.label_ratio = 15 if args.label_ratio is None else args.label_ratio
        if not 0 < ratio <= 100:
            raise UserError(f"--label_ratio {ratio} must lie in 1..100")
        lab, unl = ratio_split(train.targets, ratio, args.seed)
        tag = f"{ratio}pct"
    return train.subset(lab), (train.subset(unl) if len(unl) else None), test, tag


def build_transforms(args, name, sample):
    """(train view, test transform) for dataset `name` (10-crop with --ten_crop); `sample` is one training image
    (for the native size)."""
    if name in SMALL_IMAGES:
        mean_std = CIFAR100_MEAN_STD if name == "cifar100" else datasets.MEAN_STD[name]
        train = small_train_transform(sample.size[0], args.image_size, mean_std, args.resize_interp)
        single = small_test_transform(args.image_size, mean_std, args.resize_interp)
    else:
        mean_std = IMAGENET_MEAN_STD
        train = finegrained_train_transform(args.image_size, mean_std, args.resize_interp)
        # Without 10-crop: the reference's resize to 256x256, then the centre crop of its 10-crop protocol.
        single = T.Compose([ResizeImage(resize_size(args.image_size), args.resize_interp),
                            T.CenterCrop(args.image_size), T.ToTensor(), T.Normalize(*mean_std)])
    test = TenCrop(args.image_size, mean_std, args.resize_interp) if args.ten_crop else single
    return train, test


def to_device(x, device):
    if isinstance(x, (list, tuple)):
        return [v.to(device, non_blocking=True) for v in x]
    return x.to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    dist = distributed.init(args.device)
    device = dist.device
    runlib.seed_everything(args.seed, dist.rank, args.deterministic)

    # Data first: a bad root or label ratio fails before any run folder is made.
    name = choose_recipe(args).dataset
    labeled, unlabeled, test, tag = load_data(args, name)
    split = labeled.source_index, labeled.ids  # saved in the run folder as labeled.csv
    if args.expand_label:  # REF: the labeled index list repeated ceil(B * test_interval / n) times (--eval_interval)
        labeled = labeled.subset(np.tile(np.arange(len(labeled)),
                                         math.ceil(args.batch_size * args.eval_interval / len(labeled))))
    num_classes = max(labeled.num_classes, test.num_classes)
    train_tf, test_tf = build_transforms(args, name, labeled.image(0))
    labeled.transform = [train_tf, train_tf] if args.pgc else train_tf  # two independent strong views (REF)
    if not args.pgc:
        unlabeled = None  # the fine-tuning baseline does not read unlabeled data
    if unlabeled is not None:
        unlabeled.transform = [train_tf, train_tf]
    test.transform = test_tf

    # Networks: built from args.seed alone, so every rank starts from the same weights and the same queue.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        backbone = backbones.build(args.backbone, pretrained=args.pretrained, trust_checkpoint=args.trust_checkpoint)
        encoder = Encoder(backbone, args.projector_dim, 0.3 if args.backbone == "efficientnet_b2" else 0.0)
        net = QueryNet(encoder, num_classes).to(device)
    key_net = KeyEncoder(encoder, args.momentum).to(device) if args.pgc else None
    queue = ClassQueue(args.projector_dim, num_classes, args.queue_size, seed=args.seed).to(device)
    if not args.pgc:
        encoder.projector.requires_grad_(False)  # unused by the baseline (DDP must not wait for its gradients)

    # REF: one SGD (Nesterov, momentum 0.9, weight decay on everything) with the classifier at lr * lr_ratio;
    # MultiStepLR stepped every iteration.
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([{"params": params},
                                 {"params": net.classifier.parameters(), "lr": args.lr * args.lr_ratio}],
                                lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, gamma=0.1)
    scaler = runlib.grad_scaler(device, args.amp)

    streams = {"labeled": loaders.BatchStream(labeled, args.batch_size, args.seed, args.workers, dist.rank,
                                               dist.world_size, pin_memory=device.type == "cuda")}
    if unlabeled is not None:
        streams["unlabeled"] = loaders.BatchStream(unlabeled, args.batch_size, args.seed + 1, args.workers,
                                                    dist.rank, dist.world_size, pin_memory=device.type == "cuda")
    test_loader = loaders.eval_loader(test, args.test_batch_size or (10 if args.ten_crop else 100), args.workers,
                                       dist.rank, dist.world_size)

    # The fine-tuning baseline gets its own default run name, so both can run on the same data side by side.
    # A resumed run must keep the checkpoint's data split and network shapes; the optimizer and scheduler state
    # restore the learning rates, weight decay and milestones.
    run = runlib.Run(args, "selftuning" if args.pgc else "selftuning-ft", name, tag, dist,
                     fixed=("dataset", "label_ratio", "num_labeled", "expand_label", "seed", "backbone", "pgc",
                            "projector_dim", "queue_size"),
                     kept=("lr", "lr_ratio", "weight_decay", "milestones"))
    start = 0
    if run.resume_state is not None:
        s = run.resume_state
        if not np.array_equal(np.asarray(s["labeled"]), labeled.source_index):
            raise UserError(f"the checkpoint in {run.dir} was made with another labeled split: resume with the same "
                            "--root, --label_ratio/--num_labeled, --expand_label and --seed")
        if int(s["step"]) > args.max_iter:
            raise UserError(f"the checkpoint in {run.dir} is at iteration {int(s['step'])}, beyond --max_iter "
                            f"{args.max_iter}: resume with the run's --max_iter, or pass --run_name NAME")
        # the checkpoint's keys for the two networks stay "qnet" and "key" (also in best.pt)
        runlib.restore(s, {"qnet": net, "queue": queue, **({"key": key_net} if key_net is not None else {}),
                           "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler},
                       fits=f"--backbone {args.backbone} / --pgc / --projector_dim / --queue_size")
        runlib.restore(s["streams"], streams)
        runlib.restore_rng_states(s["rng"], dist.rank, lambda: runlib.seed_everything(
            args.seed + 1000 * s["step"], dist.rank, args.deterministic))
        start = int(s["step"])
        if dist.is_main:
            print(f"[{run.name}] resumed at iteration {start}", flush=True)
    # --stop_after: train up to there with the schedule of the whole run (never below where the checkpoint is)
    stop = max(min(args.max_iter, args.stop_after), start) if args.stop_after else args.max_iter
    run.start()
    run.save_split(*split)

    model = distributed.wrap(net, dist)
    if args.compile:
        forward = torch.compile(model)
        key_forward = torch.compile(key_net) if key_net is not None else None
    else:
        forward, key_forward = model, key_net

    def checkpoint(step):
        state = {"step": step, "qnet": net.state_dict(), "key": key_net.state_dict() if key_net is not None else {},
                 "queue": queue.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "rng": runlib.rng_states(), "labeled": labeled.source_index,
                 "streams": {k: v.state_dict() for k, v in streams.items()}, "backbone": args.backbone}
        run.save_checkpoint(state)

    def evaluate(step):
        # The query encoder (never the key encoder) -> classifier, in eval mode; REF's protocol. The RNG state is
        # put back afterwards so that evaluating does not change the training that follows.
        rng = runlib.rng_state()
        net.eval()
        with runlib.autocast(device, args.amp):
            top1, top5 = runlib.evaluate(net.classify, test_loader, device)
        net.train()
        runlib.set_rng_state(rng)
        run.log_eval(step, top1, top5)
        return top1

    best = max([e["top1"] for e in run.evals], default=-1.0)
    means, shown = runlib.Means(), {}
    net.train()
    if key_net is not None:
        key_net.train()
    for step in range(start + 1, stop + 1):
        t0 = time.perf_counter()
        x_l, y_l, _ = next(streams["labeled"])
        x_u, y_u = (None, None)
        if "unlabeled" in streams:
            x_u, y_u, _ = next(streams["unlabeled"])
            x_u, y_u = to_device(x_u, device), y_u.to(device)
        x_l, y_l = to_device(x_l, device), y_l.to(device)
        data_s = time.perf_counter() - t0

        with runlib.autocast(device, args.amp):
            out = selftuning_losses(forward, encoder, key_forward, queue, x_l, y_l, x_u, args.temperature,
                                    args.ema_per_forward, args.pgc)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        # Logging: sums stay on the device between logging steps, which every evaluation and checkpoint is: the
        # one host read, and the non-finite loss check before anything is written.
        with torch.no_grad():
            values = {"total_loss": out["loss"], "classifier_loss": out["ce"], "pgc_loss_labeled": out["pgc_l"],
                      "pgc_loss_unlabeled": out["pgc_u"], "labeled_acc": (out["logits_l"].argmax(1) == y_l).float().mean()}
            if "pseudo" in out:
                values["pseudo_label_acc"] = (out["pseudo"] == y_u).float().mean()  # truth known for these sets
                values["pseudo_label_confidence"] = out["confidence"].mean()
            means.add(**values, data_s=data_s)
        # REF evaluates after iterations 1, 1 + N, 1 + 2N, ... and 500; the last iteration is added for final_top1,
        # and the one where --stop_after cuts the run (evaluating leaves the RNG as it was).
        evaluating = (step - 1) % args.eval_interval == 0 or step == 500 or step == args.max_iter or step == stop
        saving = evaluating or step % args.save_interval == 0
        if step % args.log_interval == 0 or step == stop or saving:
            shown = means.read()
            runlib.check_finite(shown["total_loss"], step, run)
            data_s = shown.pop("data_s")
            run.log(step, {f"train/{k}": v for k, v in shown.items()})
            run.log(step, {"train/lr": optimizer.param_groups[0]["lr"], "time/data_s": data_s})
        run.progress(step, args.max_iter, loss=shown.get("total_loss"), ce=shown.get("classifier_loss"),
                     pgc_l=shown.get("pgc_loss_labeled"), pgc_u=shown.get("pgc_loss_unlabeled"))

        if evaluating:
            top1 = evaluate(step)
            if top1 > best and dist.is_main:
                best = top1  # test-set selection, as REF's "best acc": optimistic, reported as best_top1
                runlib.atomic_write(run.path("best.pt"), lambda f: torch.save(
                    {"qnet": net.state_dict(), "step": step, "top1": top1, "backbone": args.backbone}, f))
            checkpoint(step)
        elif saving:
            checkpoint(step)

    if stop < args.max_iter:
        run.stop(stop, args.max_iter)
        return
    figures = {"iters": args.max_iter, "best_iter": max(run.evals, key=lambda e: e["top1"])["iter"] if run.evals
               else None, "best_is_test_selection": True, "labeled": len(np.unique(labeled.source_index)),
               "unlabeled": 0 if unlabeled is None else len(unlabeled), "num_classes": num_classes,
               "ten_crop": args.ten_crop, "pgc": args.pgc}
    run.finish(**figures)


if __name__ == "__main__":
    runlib.entry(main)
