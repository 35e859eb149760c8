"""Deep Metric Transfer for label propagation (Liu, Wu, Hu, Lin; ICCV-W 2019, arXiv 1812.08781).

A few labels go a long way once the images sit in a good metric space. Stage A (pretrain) learns a 128-d,
L2-normalised embedding without labels by instance discrimination: every training image is its own class, scored
against a memory bank of all images' embeddings with a non-parametric softmax (exact over the whole bank with
--nce_k 0, or estimated with NCE against K noise samples). Stage B (propagate) embeds every training image with the
frozen network and spreads the seed labels, either by weighted kNN to the seeds or by a seeded normalised cut on a
kNN affinity graph (a spectral solution on the smallest eigenvectors of the normalised Laplacian), and ranks the
propagated labels by confidence. Stage C (finetune) trains a classifier from the stage-A weights with plain
cross-entropy on the seeds plus the --pseudo_ratio most confident pseudo-labels.

One script runs all three stages (--stage all) or one of them; each stage reads the previous stage's product from the
run folder (pretrain.pt, features.pt, pseudo_labels_<propagation>.pt) or from a path flag (--metric_net, --features,
--pseudo_file), so any stage's input can be swapped for the user's own. --pretrained initialises the network of the
first stage that runs (stage A's; with --stage finetune, the fine-tuned one). Per-dataset defaults come from RECIPES
(--recipe cifar | imagenet, inferred from --dataset; --help prints the table).

Launch (CIFAR-10, 250 labels, the reference's scripts; --max_iter sets the length of each training stage,
--stop_after N stops one there with the schedule unchanged):
  1 GPU:    python metric_transfer.py --root ./cifar10 --download --num_labeled 250 --propagation spectral \
              --pseudo_ratio 0.2 --amp bf16
  4 GPUs:   torchrun --nproc_per_node 4 metric_transfer.py <the same flags>     (--batch_size is global: 128)
  CPU:      python metric_transfer.py --root digits --dataset digits --num_labeled 50 --batch_size 32 \
              --max_iter 200 --device cpu --workers 0
  One stage at a time, the later ones with --resume auto on the same run folder:
            python metric_transfer.py --stage pretrain  --root ./cifar10 --run_name mt
            python metric_transfer.py --stage propagate --root ./cifar10 --run_name mt --resume auto --propagation knn
            python metric_transfer.py --stage finetune  --root ./cifar10 --run_name mt --resume auto --propagation knn
  ImageNet 1% (13,000 labels), from the lemniscate ResNet-50 weights:
            torchrun --nproc_per_node 4 metric_transfer.py --stage propagate --root ./imagenet --arch resnet50 \
              --metric_net lemniscate_resnet50.pth.tar --trust_checkpoint --num_labeled 13000 --propagation spectral
            torchrun --nproc_per_node 4 metric_transfer.py --stage finetune --root ./imagenet --arch resnet50 \
              --metric_net lemniscate_resnet50.pth.tar --trust_checkpoint --num_labeled 13000 \
              --propagation spectral --pseudo_ratio 0.1 --resume auto --dali
"""
import json
import math
import time
import warnings
from pathlib import Path

import common  # noqa: F401  first: it sets how OpenMP threads wait, which must precede torch
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

from common import UserError
from common import backbones, datasets, distributed, loaders, neighbors, splits
from common import run as runlib

METHOD = "metric_transfer"
SMALL = ("cifar10", "cifar100", "svhn", "digits")  # 32-px arrays: the CIFAR recipe; everything else: the ImageNet one
RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 11))
STAGES = ("pretrain", "propagate", "finetune")
# Flags a resumed run keeps: they fix the networks' shapes and the labeled split (the seed draws the split, the memory
# bank and the data order).
FIXED = ("dataset", "backbone", "low_dim", "num_labeled", "labeled_file", "seed")


# ----------------------------------------------------------------------------------------------------------- recipes
# The per-dataset defaults (docs/metric_transfer.md, "Recipes"; --help prints them). cifar: unsupervised/cifar.py with
# scripts/instance_cifar10.sh (stage A) and cifar-semi.py (stage C); imagenet: lemniscate (stage A) and
# imagenet-semi.py (stage C).
RECIPES = {
    "cifar": dict(backbone="wrn28_2", image_size=32, batch_size=128, epochs=1270, pretrain_wd=5e-4,
                  pretrain_scheduler="cosine-with-restart", nce_k=0, nce_t=0.1, pseudo_ratio=0.2, weight_decay=5e-4,
                  lr_scheduler="cosine", finetune_iters=500_000),
    "imagenet": dict(backbone="resnet50", image_size=224, batch_size=256, epochs=200, pretrain_wd=1e-4,
                     pretrain_scheduler="multi-step", nce_k=4096, nce_t=0.07, pseudo_ratio=0.1, weight_decay=0.0,
                     lr_scheduler="multi-step", finetune_iters=50_000),
}


def recipe_of(dataset):
    """The recipe --dataset implies: the 32-px array sets take CIFAR's, everything else ImageNet's."""
    return "cifar" if dataset in SMALL else "imagenet"


# ------------------------------------------------------------------------------------------------------------- flags
def parse_args(argv=None):
    p = runlib.Parser(description=__doc__.split("\n\n")[0], recipes=RECIPES)
    g = p.add_argument_group("data")
    g.add_argument("--root", "--data_dir", "--dataDir", shared=True, default=None,
                   help="the reference's --data_dir is an alias")
    g.add_argument("--dataset", shared=True, default=None, choices=datasets.NAMES)
    g.add_argument("--recipe", shared=True, default=None, choices=list(RECIPES))
    g.add_argument("--download", shared=True, help="CIFAR, SVHN")
    g.add_argument("--num_labeled", shared=True, default=None,
                   help="the seeds, num_labeled / classes per class, drawn as the reference does (default: 500 with "
                        "the cifar recipe, 13000 on ImageNet, else 1%% of the train set rounded up per class: it "
                        "depends on the train set, not only on the recipe)")
    g.add_argument("--labeled_file", default=None,
                   help="the labeled seeds as an index file (.npy or CSV with an Index column, e.g. from usl.py) "
                        "instead of --num_labeled")
    g.add_argument("--image_size", type=int, recipe=True, help="crop size")
    g.add_argument("--workers", "--num_workers", "-j", shared=True, default=2)
    g.add_argument("--batch_size", "-b", shared=True, recipe=True, help="both training stages")
    g.add_argument("--seed", "--rng_seed", shared=True, default=0,
                   help="it seeds the split, the model and the data order")
    g.add_argument("--dali", shared=True, help="image folders")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", "--arch", "--architecture", shared=True, recipe=True,
                   help=f"one of {', '.join(backbones.NAMES)} (reference spellings such as wrn-28-2 accepted)")
    g.add_argument("--pretrained", shared=True, default=None,
                   help="here the network of the first stage that runs: stage A's with --stage pretrain / all, the "
                        "fine-tuned one with --stage finetune (instead of starting from --metric_net); --stage "
                        "propagate trains none")
    g.add_argument("--metric_net", nargs="?", const=True, default=None, metavar="PATH",
                   help="the instance-discrimination network (stage A's product): what propagation embeds with and "
                        "what fine-tuning starts from; this script's pretrain.pt or a reference / lemniscate "
                        "checkpoint, no value = the torchvision weights of --backbone (default: the run folder's "
                        "pretrain.pt)")
    g.add_argument("--low_dim", type=int, default=128, help="embedding size of the instance-discrimination head")
    g = p.add_argument_group("method")
    g.add_argument("--stage", default="all", choices=["pretrain", "propagate", "finetune", "all"],
                   help="which stage(s) to run; later stages read earlier products from the run folder")
    g = p.add_argument_group("method: stage A, instance discrimination")
    g.add_argument("--nce_k", type=int, recipe=True,
                   help="noise samples of NCE; 0 = the exact softmax over the whole memory bank")
    g.add_argument("--nce_t", type=float, recipe=True, help="softmax temperature")
    g.add_argument("--nce_m", type=float, default=0.5, help="memory-bank momentum")
    g.add_argument("--transform_scale", type=float, default=0.2, help="smallest crop scale of the pretraining crops")
    g.add_argument("--transform_crop", default="RandomResizedCrop", choices=["RandomResizedCrop", "PadCrop"],
                   help="pretraining crop on CIFAR-style sets (PadCrop: pad 4 by reflection, random 32-px crop)")
    g = p.add_argument_group("method: stage B, propagation")
    g.add_argument("--propagation", default="spectral", choices=["knn", "spectral"],
                   help="kNN to the seeds, or seeded normalised cut on a kNN graph")
    g.add_argument("--features", default=None,
                   help="propagate on these features instead of the metric network's: .pt/.pth.tar (a [N, d] "
                        "tensor, or a dict with 'features' or 'train_features') or .npy, rows in train-set order")
    g.add_argument("--knn_t", type=float, default=0.1, help="kNN propagation: weights exp(similarity / knn_t)")
    g.add_argument("--graph_k", type=int, default=20,
                   help="spectral: neighbours per point in the graph (self included)")
    g.add_argument("--num_eigs", type=int, default=200,
                   help="spectral: eigenpairs computed (the trivial one is dropped)")
    g.add_argument("--eig_solver", default="filtered", choices=["filtered", "eigsh", "lobpcg"],
                   help="spectral: Chebyshev-filtered block subspace iteration, or scipy's eigsh (ARPACK, the "
                        "reference's) or lobpcg; graphs of <= 2000 points use a dense solver")
    g.add_argument("--nc_t", type=float, default=1.0, help="spectral: confidence 1 - exp(-margin / nc_t)")
    g.add_argument("--graph_index", default="auto", choices=["auto", "flat", "ivf"],
                   help="spectral: faiss index of the graph search; auto = exact (flat) up to 200,000 points, "
                        "inverted lists (approximate) above")
    g = p.add_argument_group("method: stage C, fine-tuning")
    g.add_argument("--pseudo_file", default=None,
                   help="pseudo-labels to fine-tune on (this script's or the reference's .pth.tar, or a folder of "
                        "the reference's ImageNet chunk files; default: the run folder's "
                        "pseudo_labels_<propagation>.pt)")
    g.add_argument("--pseudo_ratio", type=float, recipe=True,
                   help="fraction of the unlabeled images kept, most confident first, in (0, 1]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max_iter", "--max_iters", shared=True, default=None,
                   help="of every training stage that runs (the reference's --max_iters); pretraining's schedule "
                        "keeps its shape in --epochs, stretched to it (default: each stage's own length, --epochs "
                        "passes and --finetune_iters)")
    g.add_argument("--epochs", shared=True, recipe=True,
                   help="pretraining (1270 = seven SGDR cycles 10+20+...+640)")
    g.add_argument("--finetune_iters", type=int, recipe=True,
                   help="fine-tuning length in iterations when --max_iter is not given")
    g.add_argument("--stop_after", shared=True, default=None,
                   help="the running training stage stops there with a checkpoint")
    g.add_argument("--log_interval", shared=True, default=10)
    g.add_argument("--eval_interval", "--eval_freq", shared=True, default=None,
                   help="the reference's --eval_freq (iterations, fine-tuning) is an alias (default: pretraining "
                        "once per pass, fine-tuning 500)")
    g = p.add_argument_group("optimisation: stage A")
    g.add_argument("--pretrain_lr", type=float, default=0.03, help="pretraining learning rate")
    g.add_argument("--pretrain_wd", type=float, recipe=True, help="pretraining weight decay")
    g.add_argument("--pretrain_scheduler", choices=["cosine-with-restart", "cosine", "multi-step"], recipe=True,
                   help="pretraining schedule: SGDR (T0=10 epochs, Tmult=2), one cosine, or x0.1 at 60%% and 80%%")
    g = p.add_argument_group("optimisation: stage C")
    g.add_argument("--lr", shared=True, default=0.01, help="fine-tuning")
    g.add_argument("--weight_decay", "--wd", shared=True, recipe=True, help="fine-tuning")
    g.add_argument("--lr_scheduler", choices=["cosine", "multi-step"], recipe=True,
                   help="fine-tuning schedule: cosine per iteration to 1e-5, or x0.1 at 3/7 and 6/7")
    runlib.add_standard_flags(p)
    args = p.parse_args(argv)
    if args.pseudo_ratio is not None and not 0.0 < args.pseudo_ratio <= 1.0:
        raise UserError(f"--pseudo_ratio {args.pseudo_ratio} is outside (0, 1]: it is the fraction of the unlabeled "
                        "images kept, e.g. 0.2")
    for name in ("max_iter", "epochs", "finetune_iters", "stop_after", "batch_size", "eval_interval", "low_dim",
                 "graph_k", "num_eigs"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be at least 1, not {v}")
    if args.nce_k is not None and args.nce_k < 0:
        raise UserError(f"--nce_k must be 0 (exact softmax) or a positive number of noise samples, not {args.nce_k}")
    if not 0.0 <= args.nce_m < 1.0:
        raise UserError(f"--nce_m {args.nce_m} must lie in [0, 1)")
    for name in ("lr", "pretrain_lr"):  # SGD steps with the rate as a float32 scalar
        v = getattr(args, name)
        if not 0.0 <= v < torch.finfo(torch.float32).max:
            raise UserError(f"--{name} {v} must lie in [0, {torch.finfo(torch.float32).max:.3g}) (SGD steps with a "
                            "float32 learning rate)")
    if args.pretrained is not None and args.stage == "propagate":
        raise UserError("--pretrained sets the initial weights of a network this command trains, and --stage "
                        "propagate trains none: pass the instance-discrimination network as --metric_net PATH")
    if args.metric_net is not None and args.stage in ("pretrain", "all"):
        raise UserError(f"--metric_net replaces what stage A makes, and --stage {args.stage} makes it: pass "
                        "--metric_net to --stage propagate or finetune (--pretrained initialises stage A)")
    if args.backbone is not None:
        args.backbone = {"wrn-28-2": "wrn28_2", "wrn-28-8": "wrn28_8", "wrn-28-10": "wrn28_10"}.get(
            args.backbone, args.backbone)
    return args


def inherit_from_run_folder(args):
    """A later stage on an existing run folder (--run_name given) keeps that run's seeds, network and image size unless
    the flags say otherwise: those flags default to None, and args.json of the folder has the values used."""
    keys = ("num_labeled", "labeled_file", "backbone", "image_size", "dataset", "recipe")
    if not args.run_name or any(getattr(args, k) is not None for k in keys[:2]):
        keys = keys[2:]
    path = Path(args.logdir) / args.run_name / "args.json" if args.run_name else None
    if path is None or not path.is_file():
        return
    try:
        flags = json.loads(path.read_text()).get("flags", {})
    except ValueError:
        return
    for k in keys:
        if getattr(args, k) is None and flags.get(k) is not None:
            setattr(args, k, flags[k])


def set_defaults(args, train):
    """The recipe's defaults (RECIPES; an explicit flag wins), then those that depend on the train set itself."""
    runlib.apply_recipe(args, RECIPES, args.recipe or recipe_of(args.dataset))
    n, c = len(train), train.num_classes
    if args.num_labeled is None and args.labeled_file is None:
        args.num_labeled = 500 if args.recipe == "cifar" else 13000 if args.dataset == "imagenet" else \
            c * math.ceil(0.01 * n / c)
    if args.nce_k >= n:
        raise UserError(f"--nce_k {args.nce_k} noise samples need a train set larger than its {n} images: "
                        "lower --nce_k or use 0 (exact softmax)")


# ------------------------------------------------------------------------------------------------- augmentations
def make_transforms(args, mean_std):
    """(pretrain, finetune, test) transforms. CIFAR: unsupervised/cifar.py and cifar-semi.py; ImageNet: lemniscate
    and imagenet-semi.py."""
    size, norm = args.image_size, T.Normalize(*mean_std)
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.4)
    if args.dataset in SMALL:
        crop = T.RandomCrop(size, padding=4, padding_mode="reflect") if args.transform_crop == "PadCrop" \
            else T.RandomResizedCrop(size, scale=(args.transform_scale, 1.0))
        pre = T.Compose([crop, jitter, T.RandomGrayscale(0.2), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        fine = T.Compose([T.RandomCrop(size, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(),
                          T.ToTensor(), norm])
        test = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), norm])
    else:
        pre = T.Compose([T.RandomResizedCrop(size, scale=(args.transform_scale, 1.0)), T.RandomGrayscale(0.2), jitter,
                         T.RandomHorizontalFlip(), T.ToTensor(), norm])
        fine = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test = T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor(), norm])
    return pre, fine, test


def color_augment_batch(x, mean, std):
    """The pretraining colour augmentations of image folders (grayscale 0.2, then jitter 0.4, the torchvision path's
    order) on a normalised batch, per image, on its device: DALI's training view has crop + flip only (the flip
    commutes with both)."""
    from torchvision.transforms.v2 import functional as TF
    mean, std = torch.tensor(mean, device=x.device).view(3, 1, 1), torch.tensor(std, device=x.device).view(3, 1, 1)
    out = []
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.4)
    for img in x:
        img = (img.float() * std + mean).clamp(0, 1)
        if torch.rand(()) < 0.2:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        out.append((jitter(img) - mean) / std)
    return torch.stack(out).to(x.dtype)


# ------------------------------------------------------------------------------------------------- networks
class EmbeddingNet(nn.Module):
    """Backbone + fc to low_dim + L2 normalisation (the reference's `norm=True` WRN / lemniscate ResNet)."""

    def __init__(self, backbone, low_dim):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_dim, low_dim)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return F.normalize(self.fc(self.backbone(x)), dim=1)


class Classifier(nn.Module):
    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.backbone(x))


def load_stage_a(args, path_or_flag, trust, flag="--pretrained"):
    """A backbone plus the embedding head's state (None when the checkpoint has none) from this script's pretrain.pt,
    a reference checkpoint (`net` with `module.`), a lemniscate one (`state_dict`), or the torchvision weights
    (True)."""
    if path_or_flag is True:
        return backbones.build(args.backbone, True, trust), None
    path = Path(path_or_flag)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    ckpt = load_trusted_legacy(path) if trust else runlib.load_file(path)
    bb = backbones.build(args.backbone)
    if "backbone_name" in ckpt:  # this script's pretrain.pt
        if ckpt["backbone_name"] != args.backbone:
            raise UserError(f"{path} holds a {ckpt['backbone_name']} pretrained by this script, not --backbone "
                            f"{args.backbone}: pass --backbone {ckpt['backbone_name']}")
        bb.load_state_dict(ckpt["backbone"])
        return bb, ckpt["head"]
    backbones.load_weights(bb, ckpt, args.backbone, source=str(path))
    extra = bb.pretrained_extra
    ok = "fc.weight" in extra and "fc.bias" in extra and extra["fc.weight"].shape[1] == bb.feature_dim
    return bb, ({"weight": extra["fc.weight"], "bias": extra["fc.bias"]} if ok else None)


class _Stub:
    """Stands in for classes a trusted legacy checkpoint pickled but no longer exist (the reference's
    lib.LinearAverage / lib.NCEAverage objects under 'lemniscate')."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_trusted_legacy(path):
    """torch.load(weights_only=False) that unpickles missing classes as _Stub: the reference's pretraining
    checkpoints pickle their memory-bank module object, so plain loading fails on a missing `lib` package."""
    import pickle
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                return _Stub

    lenient = types.SimpleNamespace(__name__="pickle", Unpickler=Unpickler, load=pickle.load)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=lenient)
    except Exception as e:  # noqa: BLE001 - one line for any unreadable file
        raise UserError(f"cannot load checkpoint {path}: {str(e).strip().splitlines()[0] if str(e).strip() else e}")
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


# ------------------------------------------------------------------------------- stage A: instance discrimination
def init_memory(n, dim, generator=None):
    """Memory bank of the reference (LinearAverage / NCEAverage): uniform in [-a, a], a = 1 / sqrt(dim / 3), rows
    not normalised at first."""
    a = 1.0 / math.sqrt(dim / 3)
    return torch.rand(n, dim, generator=generator) * (2 * a) - a


def softmax_instance_loss(v, idx, memory, t):
    """Exact non-parametric softmax (--nce_k 0): cross-entropy of v . M^T / t against the image's own index. The bank is
    a constant: the gradient reaches v only (as LinearAverage's hand-written backward)."""
    logits = v.float() @ memory.t() / t
    return F.cross_entropy(logits, idx)


def nce_instance_loss(v, idx, memory, k, t, z, noise=None):
    """NCE with k uniform noise samples (lemniscate NCEAverage + NCECriterion). P_j = exp(M_j . v / t) / Z, Z the
    normaliser estimated once (z None: returned from this batch as mean(exp) * N). noise: [B, k] indices (drawn
    here when None). Slot 0 is the positive. Returns (loss, z)."""
    n = memory.shape[0]
    b = v.shape[0]
    if noise is None:
        noise = torch.randint(n, (b, k), device=v.device)
    cand = torch.cat([idx.view(-1, 1), noise], 1)  # [B, k+1]
    out = torch.exp(torch.einsum("bkd,bd->bk", memory[cand], v.float()) / t)
    if z is None:
        z = out.detach().mean() * n
    p = out / z
    pn = k / n
    eps = 1e-7
    loss_pos = torch.log(p[:, 0] / (p[:, 0] + pn + eps))
    loss_neg = torch.log(pn / (p[:, 1:] + pn + eps)).sum(1)
    return -(loss_pos + loss_neg).mean(), z


@torch.no_grad()
def update_memory(memory, v, idx, m):
    """M_i <- normalise(m M_i + (1 - m) v_i) for the batch rows, after the loss has used the old bank."""
    rows = memory[idx] * m + v.float() * (1 - m)
    memory[idx] = F.normalize(rows, dim=1)


def sgdr_lr(epoch, base, eta_min=1e-5, t0=10, t_mult=2):
    """Cosine with warm restarts at a (fractional) epoch: cycles of t0, t0*t_mult, ... epochs, each from base to
    eta_min. Differs from the reference, whose subclass turns eta_min into 0 and steps before the epoch so that its
    last epoch (1269) trains at the full 0.03: here 1270 epochs end at eta_min."""
    start, length = 0.0, float(t0)
    while epoch >= start + length:
        start, length = start + length, length * t_mult
    return eta_min + 0.5 * (base - eta_min) * (1 + math.cos(math.pi * (epoch - start) / length))


def pretrain_lr(step, total, epochs, args):
    """Learning rate of pretraining iteration `step` of `total`; the schedule is laid out over `epochs` epochs
    (fractional per iteration), stretched to `total` iterations."""
    e = step * epochs / total
    if args.pretrain_scheduler == "cosine-with-restart":
        return sgdr_lr(e, args.pretrain_lr)
    if args.pretrain_scheduler == "cosine":
        return 1e-5 + 0.5 * (args.pretrain_lr - 1e-5) * (1 + math.cos(math.pi * e / epochs))
    return args.pretrain_lr * (0.1 ** sum(e >= f * epochs for f in (0.6, 0.8)))  # lemniscate: 120 and 160 of 200


def finetune_lr(step, total, args):
    if args.lr_scheduler == "cosine":  # cifar-semi: CosineAnnealingLR(max_iters, eta_min 1e-5) per iteration
        return 1e-5 + 0.5 * (args.lr - 1e-5) * (1 + math.cos(math.pi * step / total))
    return args.lr * (0.1 ** sum(step >= f * total for f in (3 / 7, 6 / 7)))  # imagenet-semi: 21,428 and 42,857 of 50k


# -------------------------------------------------------------------------------------- stage B: propagation
def search(db, queries, k, index="flat", gpu=False):
    """Inner-product top-k of each query among the db rows (common.neighbors), as (start, D, I) per chunk of queries
    so that callers never hold all N x k results at once. index "ivf": ~4 sqrt(N) lists (at most N / 39), trained on
    64 rows per list, 16 lists probed per query."""
    if index == "ivf":
        nlist = int(min(4 * math.sqrt(len(db)), len(db) // 39))
        idx = neighbors.ivf_index(db, "ip", nlist=nlist, nprobe=16, train_size=64 * nlist, gpu=gpu)
    else:
        idx = neighbors.flat_index(db, "ip", gpu)
    return neighbors.search_chunks(idx, queries, k)


def knn_propagate(features, labeled_idx, labeled_y, query_idx, num_classes, k=200, t=0.1, keep_probs=True,
                  device="cpu", block=1 << 21):
    """kNN propagation (knn.ipynb): the k = min(N_l, k) most similar seeds, class score sum exp(sim / t), p = score /
    sum(score). Returns (prediction, confidence = max p, p or None), all for query_idx.

    The seeds are few, so the similarities are exact, one matrix product per block of queries (`block` entries of
    the query x seed matrix, cache-sized). The weights are exp((sim - row max) / t): the row's scale cancels in p.
    With few classes they go through one product with the one-hot seed labels, masked below the k-th similarity
    (numpy's partition on the CPU); with many (ImageNet's 1000), the k nearest seeds come from neighbors.topk and
    their weights are added into their classes."""
    device = torch.device(device)
    seeds = torch.from_numpy(np.ascontiguousarray(features[labeled_idx], dtype=np.float32)).to(device)
    n_l = len(seeds)
    k = min(n_l, k)
    labels = torch.as_tensor(np.asarray(labeled_y, dtype=np.int64), device=device)
    dense = num_classes <= 32
    onehot = F.one_hot(labels, num_classes).float() if dense else None
    n = len(query_idx)
    pred, conf = np.empty(n, np.int64), np.empty(n, np.float32)
    probs = np.empty((n, num_classes), np.float32) if keep_probs else None
    rows = max(1, block // n_l)
    for s in range(0, n, rows):
        q = torch.from_numpy(np.ascontiguousarray(features[query_idx[s:s + rows]], dtype=np.float32)).to(device)
        sim = q @ seeds.T
        if dense:
            w = torch.exp((sim - sim.max(1, keepdim=True).values) / t)
            if k < n_l:
                if device.type == "cpu":
                    kth = torch.from_numpy(np.partition(sim.numpy(), n_l - k, axis=1)[:, n_l - k:n_l - k + 1])
                else:
                    kth = sim.kthvalue(n_l - k + 1, dim=1, keepdim=True).values
                w.masked_fill_(sim < kth, 0.0)
            scores = w @ onehot
        else:
            near = neighbors.topk(sim, k)
            top = sim.gather(1, near)
            w = torch.exp((top - top.max(1, keepdim=True).values) / t)
            scores = torch.zeros(len(q), num_classes, device=device).scatter_add_(1, labels[near], w)
        p = scores / scores.sum(1, keepdim=True)
        c, y = p.max(1)
        pred[s:s + len(q)], conf[s:s + len(q)] = y.cpu().numpy(), c.cpu().numpy()
        if keep_probs:
            probs[s:s + len(q)] = p.cpu().numpy()
    return pred, conf, probs


def knn_graph(features, k, index="flat", gpu=False):
    """Symmetric affinity W = (W~ + W~^T) / 2 on the k nearest points of each point (itself included, as the
    reference: cosine sim -> distance d = (1 - cos) / 2, W~ = exp(-2 d / 0.2) = exp(-5 (1 - cos)))."""
    import scipy.sparse as sp
    n = len(features)
    rows, cols, vals = [], [], []
    for s, D, I in search(features, features, k, index, gpu):
        keep = I >= 0
        rows.append(np.nonzero(keep)[0] + s)
        cols.append(I[keep])
        vals.append(np.exp(-5.0 * (1.0 - D[keep])).astype(np.float32))
    W = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return ((W + W.T) * 0.5).tocsr()


def top_eigs_filtered(S, m, seed=0, tol=1e-2, degree=10, max_iter=100):
    """The m largest eigenpairs of a symmetric matrix with spectrum in [-1, 1] (a normalised adjacency) by Chebyshev-
    filtered subspace iteration (Zhou & Saad 2007): a block of m + m/2 vectors is multiplied by a degree-`degree`
    Chebyshev polynomial that damps [-1, smallest Ritz value] and re-orthonormalised, with a Rayleigh-Ritz step per
    round, until the m leading residuals fall under `tol`. All work is sparse x block and block x block products
    (multi-threaded level-3 BLAS), where ARPACK's Lanczos runs one vector at a time. tol 1e-2 as the reference's
    eigsh. The graph is renumbered by reverse Cuthill-McKee first: neighbours close in memory make the sparse
    products about a third cheaper."""
    from scipy.sparse.csgraph import reverse_cuthill_mckee
    n = S.shape[0]
    b = min(n, m + max(m // 2, 20))
    perm = reverse_cuthill_mckee(S, symmetric_mode=True)
    S = S[perm][:, perm].tocsr()
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        St = torch.sparse_csr_tensor(torch.from_numpy(S.indptr.astype(np.int64)),
                                     torch.from_numpy(S.indices.astype(np.int64)),
                                     torch.from_numpy(S.data.astype(np.float32)), size=S.shape)
    g = torch.Generator().manual_seed(seed)
    X = torch.linalg.qr(torch.randn(n, b, generator=g)).Q
    for _ in range(max_iter):
        Y = St @ X
        H = X.T @ Y
        theta, Q = torch.linalg.eigh(((H + H.T) / 2).double())
        theta, Q = theta.flip(0), Q.flip(1).float()  # descending
        X, Y = X @ Q, Y @ Q
        res = (Y[:, :m] - X[:, :m] * theta[:m].float()).norm(dim=0)
        if float(res.max()) < tol:
            break
        lo, cut = -1.0, float(theta[-1])
        e, c = (cut - lo) / 2, (cut + lo) / 2
        prev, cur = X, Y.sub_(X, alpha=c).div_(e)  # T_0 and T_1 of the mapped S; Y = S X is reused
        del Y
        for _ in range(degree - 1):  # T_{j+1} = 2 (S - c) / e T_j - T_{j-1}, in place: four blocks at most
            nxt = St @ cur
            nxt.sub_(cur, alpha=c).mul_(2 / e).sub_(prev)
            prev, cur = cur, nxt
        del prev
        X = torch.linalg.qr(cur).Q
    U = np.empty((n, m), np.float32)
    U[perm] = X[:, :m].numpy()
    return theta[:m].numpy(), U


def smallest_laplacian_eigs(W, m, solver="filtered", seed=0, dense_below=2000):
    """The m smallest eigenpairs of L = I - D'^-1/2 (W - diag W) D'^-1/2 (scipy's laplacian(normed=True): the degree D'
    leaves the self-loops out), as the m largest of S = I - L (the same vectors, faster to converge), ascending."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as sla
    n = W.shape[0]
    off = (W - sp.diags(W.diagonal())).tocsr()
    off.eliminate_zeros()
    dp = np.asarray(off.sum(1)).ravel()
    inv = 1.0 / np.sqrt(np.maximum(dp, 1e-12))
    S = (sp.diags(inv) @ off @ sp.diags(inv)).tocsr()
    m = min(m, n - 1)
    if n <= dense_below:  # ARPACK needs m < n, and small graphs gain nothing from sparse solvers
        import scipy.linalg
        mu, U = scipy.linalg.eigh(S.toarray().astype(np.float64), subset_by_index=(n - m, n - 1))
    elif solver == "filtered":
        mu, U = top_eigs_filtered(S, m, seed)
    elif solver == "lobpcg":
        X = np.random.RandomState(seed).standard_normal((n, m))
        mu, U = sla.lobpcg(S.astype(np.float64), X, largest=True, tol=1e-3, maxiter=500)
    else:  # the reference's eigsh(L, which='SM', tol=1e-2), as the equivalent 'LA' problem on S
        v0 = np.random.RandomState(seed).rand(n)  # a fixed start vector: reproducible eigenvectors
        mu, U = sla.eigsh(S.astype(np.float64), k=m, which="LA", tol=1e-2, v0=v0)
    lam = 1.0 - np.asarray(mu, dtype=np.float64)
    order = np.argsort(lam)
    return lam[order], np.ascontiguousarray(U[:, order], dtype=np.float32)


def spectral_propagate(features, labeled_idx, labeled_y, query_idx, num_classes, graph_k=20, num_eigs=200, t=1.0,
                       solver="filtered", index="flat", keep_probs=True, seed=0, gpu=False, graph=None):
    """Seeded normalised cut (nc.ipynb): z^c = U diag(1 / lambda) U^T s^c over the smallest eigenpairs of the
    normalised Laplacian (the trivial first one dropped), s^c the biased-normalised-cut seed of class c (one vs rest),
    columns scaled to norm sqrt(n), margin confidence 1 - exp(-(z_1 - z_2) / t). Returns (prediction, confidence,
    softmax(z) or None) for query_idx, and the kept eigenvalues."""
    from scipy.sparse import diags as sp_diags
    W = knn_graph(features, graph_k, index, gpu) if graph is None else graph
    n = W.shape[0]
    deg = np.asarray(W.sum(0)).ravel()  # with the self-loops, as the reference's prior
    lam, U = smallest_laplacian_eigs(W, num_eigs, solver, seed)
    # Drop the trivial eigenvector D'^1/2 1. On a connected graph that is the first pair, which the reference drops.
    # A disconnected graph has one ~0 eigenvalue per component and a solver returns any basis of that space, so
    # dropping "the first" could drop a component's indicator: remove the trivial direction from that space instead.
    zero = max(1, int((lam < 1e-5).sum()))
    if zero > 1:
        off = W - sp_diags(W.diagonal())
        trivial = np.sqrt(np.asarray(off.sum(1)).ravel())
        trivial /= np.linalg.norm(trivial)
        Z = U[:, :zero].astype(np.float64)
        Z -= np.outer(trivial, trivial @ Z)
        Z = np.linalg.svd(Z, full_matrices=False)[0][:, :zero - 1].astype(np.float32)
        U = np.concatenate([Z, U[:, zero:]], 1)
        lam = lam[1:]
    else:
        lam, U = lam[1:], U[:, 1:]
    # ~0 eigenvalues may come out slightly negative: a floor keeps 1/lambda finite and positive (the reference divides
    # by them as they come).
    lam = np.maximum(lam, 1e-4)
    labeled_idx, labeled_y = np.asarray(labeled_idx), np.asarray(labeled_y, dtype=np.int64)
    seeds = np.zeros((len(labeled_idx), num_classes))
    dl = deg[labeled_idx].astype(np.float64)
    for c in range(num_classes):
        pos = labeled_y == c
        r = dl[pos].sum() / dl[~pos].sum()
        s = np.where(pos, np.sqrt(dl / r), -np.sqrt(dl * r))
        seeds[:, c] = s / np.linalg.norm(s)
    A = ((U[labeled_idx].astype(np.float64).T @ seeds) / lam[:, None]).astype(np.float32)  # [m, C]
    chunk = 65536
    sq = np.zeros(num_classes)
    for s in range(0, n, chunk):
        sq += (np.square(U[s:s + chunk] @ A, dtype=np.float64)).sum(0)
    scale = (math.sqrt(n) / np.sqrt(np.maximum(sq, 1e-30))).astype(np.float32)
    q = np.asarray(query_idx)
    pred, conf = np.empty(len(q), np.int64), np.empty(len(q), np.float32)
    probs = np.empty((len(q), num_classes), np.float32) if keep_probs else None
    for s in range(0, len(q), chunk):
        z = (U[q[s:s + chunk]] @ A) * scale
        z -= z.max(1, keepdims=True)
        top2 = -np.partition(-z, 1, axis=1)[:, :2] if num_classes > 1 else np.concatenate([z, z - np.inf], 1)
        pred[s:s + len(z)] = z.argmax(1)
        conf[s:s + len(z)] = 1.0 - np.exp(-(top2[:, 0] - top2[:, 1]) / t)
        if keep_probs:
            e = np.exp(z / t)  # softmax(z / t): the reference saves softmax(T z) with T = 1
            probs[s:s + len(z)] = e / e.sum(1, keepdims=True)
    return pred, conf, probs, lam


def rank_by_confidence(query_idx, pred, conf):
    """Unlabeled indices, labels and confidences, most confident first, ranked globally (ties: index order)."""
    order = np.argsort(-conf, kind="stable")
    return np.asarray(query_idx)[order], pred[order], conf[order], order


def accuracy_by_ratio(labels_sorted, truth_sorted, ratios=RATIOS):
    """Pseudo-label accuracy (%) of the top r most confident for each ratio, and the notebooks' AUC (the mean of the
    cumulative accuracy over all ranks)."""
    correct = (np.asarray(labels_sorted) == np.asarray(truth_sorted)).astype(np.float64)
    cum = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    at = {r: 100.0 * float(cum[max(1, math.ceil(r * len(correct) - 1e-9)) - 1]) for r in ratios}
    return at, 100.0 * float(cum.mean()), cum


def select_pseudo(pseudo_idx, pseudo_labels, ratio):
    """The first floor(N_u * ratio) of the ranked pseudo-labels (cifar-semi: global top-P, no class balancing)."""
    p = int(math.floor(len(pseudo_idx) * ratio + 1e-9))
    return np.asarray(pseudo_idx)[:p], np.asarray(pseudo_labels)[:p]


def reference_split(targets, num_labeled, num_classes, seed=0):
    """The notebooks' split: torch.manual_seed(seed); perm = randperm(N); per class the first num_labeled / C entries
    of perm with that label (num_labeled a multiple of C); labeled in class order, unlabeled the rest (nested across
    num_labeled)."""
    targets = np.asarray(targets, dtype=np.int64)
    per = num_labeled // num_classes
    if per < 1:
        raise UserError(f"--num_labeled {num_labeled} gives no labeled seed to some of the {num_classes} classes: "
                        f"use at least {num_classes}")
    if num_labeled % num_classes:  # the same line as splits.class_balanced_split(..., exact=True)
        raise UserError(f"{num_labeled} labels cannot be split evenly over {num_classes} classes: choose a multiple "
                        f"of {num_classes}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(targets), generator=g).numpy()
    labeled = []
    for c in range(num_classes):
        mine = perm[targets[perm] == c][:per]
        if len(mine) < per:
            raise UserError(f"class {c} has {len(mine)} training images, fewer than the {per} seeds per class that "
                            f"--num_labeled {num_labeled} asks for: lower --num_labeled")
        labeled.append(mine)
    labeled = np.concatenate(labeled).astype(np.int64)
    mask = np.ones(len(targets), bool)
    mask[labeled] = False
    return labeled, np.flatnonzero(mask).astype(np.int64)


def check_seeds(labeled_y, num_classes, source):
    missing = sorted(set(range(num_classes)) - set(np.asarray(labeled_y).tolist()))
    if missing:
        raise UserError(f"{source} has no labeled seed for class {missing[0]}"
                        + (f" (and {len(missing) - 1} more classes)" if len(missing) > 1 else "")
                        + ": propagation needs at least one seed per class")


def save_accuracy_plot(path, curves, title):
    """Pseudo-label accuracy against the kept ratio, one line per propagation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for name, cum in curves.items():
        x = np.arange(1, len(cum) + 1) / len(cum)
        ax.plot(100 * x, 100 * cum, label=name)
        ax.plot([100 * r for r in RATIOS], [100 * cum[max(1, math.ceil(r * len(cum) - 1e-9)) - 1] for r in RATIOS],
                "o", ms=3, color=ax.lines[-1].get_color())
    ax.set_xlabel("kept pseudo-labels, most confident first (%)")
    ax.set_ylabel("pseudo-label accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------- pseudo-label files
def read_pseudo_file(path, n_train, num_classes, trust=False):
    """(labeled_idx, ranked pseudo indices, their labels) from this script's file, a reference {N}.pth.tar, or a folder
    of the reference's ImageNet chunk files (10_0 ... 10_9.pth.tar, each ranked within its chunk)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.pth.tar")) + sorted(path.glob("*.pt"))
        if not files:
            raise UserError(f"--pseudo_file {path}: the folder holds no .pth.tar / .pt pseudo-label files")
        parts = [_read_one_pseudo(f, n_train, num_classes, trust, whole=False) for f in files]
        return parts[0][0], [(p[1], p[2]) for p in parts]
    lab, idx, y = _read_one_pseudo(path, n_train, num_classes, trust, whole=True)
    return lab, [(idx, y)]


def _read_one_pseudo(path, n_train, num_classes, trust, whole):
    if not path.is_file():
        raise UserError(f"pseudo-label file {path} not found: run --stage propagate first or pass --pseudo_file PATH")
    d = runlib.load_file(path, trust=trust)
    need = ("pseudo_indexes", "pseudo_labels", "labeled_indexes")
    if not isinstance(d, dict) or any(k not in d for k in need):
        raise UserError(f"{path}: expected a dict with {', '.join(need)} (the metric-transfer pseudo-label format)")
    lab = np.asarray(d["labeled_indexes"], dtype=np.int64).reshape(-1)
    idx = np.asarray(d["pseudo_indexes"], dtype=np.int64).reshape(-1)
    y = np.asarray(d["pseudo_labels"], dtype=np.int64).reshape(-1)
    size = int(d["num_train"]) if "num_train" in d else len(lab) + len(idx) if whole else None
    top = max(int(lab.max(initial=-1)), int(idx.max(initial=-1)))
    if (size is not None and size != n_train) or top >= n_train:
        made = f"a train set of {size} images" if size is not None else f"indices up to {top}"
        raise UserError(f"{path} was made for {made}, but this train set has {n_train}: pass the pseudo-label file "
                        "of this dataset (or run --stage propagate)")
    if len(idx) != len(y):
        raise UserError(f"{path}: {len(idx)} pseudo_indexes but {len(y)} pseudo_labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{path}: pseudo-label {int(y.max()) if y.max() >= num_classes else int(y.min())} is outside "
                        f"0..{num_classes - 1}: the file was made for another dataset")
    if np.intersect1d(lab, idx).size or len(np.unique(idx)) != len(idx):
        raise UserError(f"{path}: pseudo_indexes repeat or overlap labeled_indexes")
    return lab, idx, y


# ------------------------------------------------------------------------------------------------------- helpers
def gather_rows(t, dist):
    """Concatenate rank-local rows of different counts over ranks (pads to the largest count)."""
    if dist.world_size == 1:
        return t
    n = torch.tensor([len(t)], device=t.device)
    counts = distributed.all_gather_cat(n).tolist()
    pad = torch.zeros((max(counts) - len(t), *t.shape[1:]), dtype=t.dtype, device=t.device)
    full = distributed.all_gather_cat(torch.cat([t, pad]))
    step = max(counts)
    return torch.cat([full[r * step:r * step + c] for r, c in enumerate(counts)])


@torch.no_grad()
def embed(net, loader, n, dist, device, amp):
    """Rows of net(x) for a whole set, in set order, on every rank (each rank embeds its share)."""
    was = net.training
    net.eval()
    feats, idxs = [], []
    for x, _, i in loader:
        with runlib.autocast(device, amp):
            feats.append(net(x.to(device, non_blocking=True)).float())
        idxs.append(i.to(device).long().view(-1))
    f = gather_rows(torch.cat(feats), dist)
    i = gather_rows(torch.cat(idxs), dist)
    out = torch.zeros(n, f.shape[1], device=device)
    out[i] = f
    net.train(was)
    return out


@torch.no_grad()
def knn_monitor(test_feats, test_y, bank, bank_y, num_classes, k=200, t=0.1):
    """Top-1 (%) of the reference's pretraining monitor: weighted kNN of test images against the memory bank, with
    every train label (a monitor, not a semi-supervised figure)."""
    k = min(k, len(bank))
    chunk = max(1, min(1024, 2 ** 27 // len(bank)))  # at most 512 MB of similarities at a time (ImageNet's bank)
    correct = 0
    for s in range(0, len(test_feats), chunk):
        sim, nn_idx = (test_feats[s:s + chunk] @ bank.t()).topk(k, dim=1)
        scores = torch.zeros(len(sim), num_classes, device=bank.device)
        scores.scatter_add_(1, bank_y[nn_idx], torch.exp(sim / t))
        correct += (scores.argmax(1) == test_y[s:s + chunk]).sum().item()
    return 100.0 * correct / len(test_feats)


class DaliSet:
    """A DALI stream over (a subset of) an image-folder set, yielding (x, y, idx) with idx the row in `base`."""

    def __init__(self, base, rows, labels, view, batch_size, args, dist, seed, one_pass=False, area=None):
        """area: the training view's crop scale range (default: DALI's, torchvision's (0.08, 1))."""
        from common import dali
        if not dali.available():
            raise UserError("--dali needs NVIDIA DALI (pip install the nvidia-dali wheel for your CUDA), "
                            "or drop --dali")
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        files = base.files
        self.stream = dali.DaliStream(files=[files[i] for i in rows], labels=[int(v) for v in labels], views=(view,),
                                      batch_size=batch_size, size=args.image_size, seed=seed, rank=dist.rank,
                                      world_size=dist.world_size, threads=max(1, args.workers),
                                      device="cuda" if dist.device.type == "cuda" else "cpu",
                                      shuffle=not one_pass, one_pass=one_pass,
                                      **({} if area is None else {"area": area}))

    def __iter__(self):
        for x, y, i in self.stream:
            yield x, y, self.rows[i.cpu().long()]

    def __next__(self):
        x, y, i = next(self.stream)
        return x, y, self.rows[i.cpu().long()]

    def __len__(self):
        return self.stream.batches_per_pass

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, d):
        self.stream.load_state_dict(d)


def eval_batches(dataset, args, dist, transform):
    if args.dali:
        return DaliSet(dataset, np.arange(len(dataset)), dataset.targets, "val", args.batch_size, args, dist, 0,
                       one_pass=True)
    per_rank = max(1, args.batch_size // dist.world_size)
    return loaders.eval_loader(dataset.subset(np.arange(len(dataset)), transform=transform), per_rank,
                                args.workers, dist.rank, dist.world_size)


def merged_figures(run, figures):
    """The figures of every stage run on this folder, updated with this call's (fine-tuning) `figures`: from the run
    folder, not from this call, since a call that resumes past a stage does not redo it. summary.json of an earlier
    call (fine-tuning figures stay when a later call only propagates), the last pretraining kNN monitor (the
    checkpoint carries the evaluations) and each propagation_<method>.json."""
    old = {}
    path = run.path("summary.json")
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    old.pop("wall_s", None)
    knn = [e["top1"] for e in run.evals if e.get("stage") == "pretrain"]
    if knn:
        old["pretrain_knn_top1"] = knn[-1]
    for m in ("knn", "spectral"):
        p = run.path(f"propagation_{m}.json")
        if p.exists():
            old["propagation"] = {**(old.get("propagation") or {}), m: json.loads(p.read_text())}
    return {**old, **figures}


# ------------------------------------------------------------------------------------------------ stage A: pretrain
def run_pretrain(args, run, dist, train, test, tfs, state, ready):
    """Instance discrimination; writes pretrain.pt when it completes. Returns whether it did (not cut by
    --stop_after)."""
    device, world = dist.device, dist.world_size
    n, num_classes = len(train), train.num_classes
    backbone, head = load_stage_a(args, args.pretrained, args.trust_checkpoint) if args.pretrained \
        else (backbones.build(args.backbone), None)
    net = EmbeddingNet(backbone, args.low_dim)
    if head is not None and head["weight"].shape == net.fc.weight.shape:
        net.fc.load_state_dict(head)
    net.to(device)
    memory = init_memory(n, args.low_dim, torch.Generator().manual_seed(args.seed)).to(device)
    z_nce = torch.tensor(-1.0, device=device)  # NCE normaliser, < 0 until the first batch sets it
    opt = torch.optim.SGD(net.parameters(), args.pretrain_lr, momentum=0.9, nesterov=True,
                          weight_decay=args.pretrain_wd)
    scaler = runlib.grad_scaler(device, args.amp)
    if args.dali:
        # the torchvision path's RandomResizedCrop(scale=(--transform_scale, 1)); colour on the device below
        stream = DaliSet(train, np.arange(n), train.targets, "train", args.batch_size, args, dist, args.seed,
                         area=(args.transform_scale, 1.0))
    else:
        stream = loaders.BatchStream(train.subset(np.arange(n), transform=tfs[0]), args.batch_size, args.seed,
                                      args.workers, dist.rank, world, pin_memory=device.type == "cuda")
    passes = len(stream)  # full batches per pass, both loaders
    total = args.max_iter or args.epochs * passes
    eval_every = args.eval_interval or passes
    start = 0
    if state is not None and state.get("stage") == "pretrain":
        runlib.restore(state, {"model": net, "memory": memory, "optimizer": opt, "scaler": scaler, "stream": stream})
        z_nce.fill_(float(state["z_nce"]))
        start = int(state["step"])
        runlib.restore_rng_states(state["rng"], dist.rank, lambda: runlib.seed_everything(
            args.seed + 1000 * start, dist.rank, args.deterministic))
        if start >= total:
            print(f"[{run.name}] pretraining already at iteration {start} of {total}", flush=True)
    z_known = bool(z_nce > 0)  # kept on the host: the loop never reads z_nce back
    ready()
    model = distributed.wrap(net, dist)
    forward = torch.compile(model) if args.compile else model
    bank_y = torch.as_tensor(train.targets, device=device)
    test_loader = eval_batches(test, args, dist, tfs[2])
    mean_std = datasets.MEAN_STD.get(args.dataset, datasets.MEAN_STD["imagenet"])
    stop = min(total, args.stop_after) if args.stop_after else total
    net.train()
    means, shown = runlib.Means(), {}
    for step in range(start, stop):
        lr = pretrain_lr(step, total, args.epochs, args)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.time()
        x, _, idx = next(stream)
        x, idx = x.to(device, non_blocking=True), idx.to(device, non_blocking=True).long()
        if args.dali:
            x = color_augment_batch(x, *mean_std)
        data_s = time.time() - t0
        with runlib.autocast(device, args.amp):
            v = forward(x)
        v = v.float()
        if args.nce_k == 0:
            loss = softmax_instance_loss(v, idx, memory, args.nce_t)
        else:
            loss, z = nce_instance_loss(v, idx, memory, args.nce_k, args.nce_t, z_nce if z_known else None)
            if not z_known:  # every rank uses the same Z (the reference estimates it on one process)
                z_nce.copy_(distributed.all_reduce_mean(z.detach().reshape(1).clone())[0])
                z_known = True
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        # The bank sees every rank's batch, so it stays identical on all ranks.
        update_memory(memory, distributed.all_gather_cat(v.detach()), distributed.all_gather_cat(idx), args.nce_m)
        done = step + 1
        means.add(loss=loss, data_s=data_s)
        evaluating = done % eval_every == 0 or done == total or done == stop
        if done % args.log_interval == 0 or evaluating:  # the one host read; evaluations write checkpoints
            shown = means.read()
            runlib.check_finite(shown["loss"], done, run)
            run.log(done, {"train/pretrain_loss": shown["loss"], "train/pretrain_lr": lr,
                           "time/data_s": shown["data_s"]})
        run.progress(done, total, loss=shown.get("loss"), lr=lr)
        if evaluating:
            tf = embed(net, test_loader, len(test), dist, device, args.amp)
            top1 = knn_monitor(tf, torch.as_tensor(test.targets, device=device), memory, bank_y, num_classes,
                               200, args.nce_t)
            record = {"iter": done, "top1": top1, "top5": None, "wall_s": round(run.wall_s(), 2),
                      "stage": "pretrain"}
            run.evals.append(record)
            if run.is_main:
                run.log(done, {"pretrain/knn_top1": top1})
                with open(run.path("metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"[{run.name}] pretrain iter {done}: kNN monitor top1 {top1:.2f}", flush=True)
            run.save_checkpoint({"stage": "pretrain", "step": done, "total": total, "model": net.state_dict(),
                                 "memory": memory.cpu(), "z_nce": float(z_nce), "optimizer": opt.state_dict(),
                                 "scaler": scaler.state_dict(), "stream": stream.state_dict(),
                                 "rng": runlib.rng_states()})
    if stop < total:
        run.stop(stop, total)
        return False
    if run.is_main:
        runlib.atomic_write(run.path("pretrain.pt"), lambda f: torch.save(
            {"backbone_name": args.backbone, "backbone": net.backbone.state_dict(), "head": net.fc.state_dict(),
             "low_dim": args.low_dim, "iters": total, "memory": memory.cpu()}, f))
    distributed.barrier()
    return True


# ---------------------------------------------------------------------------------------------- stage B: propagate
def metric_net_source(args, run):
    """The instance-discrimination network: --metric_net, else the run folder's pretrain.pt."""
    if args.metric_net is not None:
        return args.metric_net
    if run.path("pretrain.pt").exists():
        return run.path("pretrain.pt")
    raise UserError(f"no instance-discrimination network: {run.path('pretrain.pt')} does not exist; run --stage "
                    "pretrain on this run folder first, or pass --metric_net PATH (or --features PATH to propagate "
                    "on your own features)")


def read_features(path, n, trust):
    """The [n, d] float32 rows of a --features file: .npy, or a torch file holding a tensor or a dict with
    'features' / 'train_features'."""
    expected = ("a .npy array or a .pt / .pth.tar file holding a [N, d] tensor (or a dict with 'features' or "
                "'train_features'), one row per train image in train-set order")
    if not path.is_file():
        raise UserError(f"--features {path}: no such file")
    if path.suffix == ".npy":
        try:
            f = np.load(path, allow_pickle=False)
        except ValueError:  # not an array file, or an array of Python objects
            raise UserError(f"--features {path} is not a NumPy array of numbers: expected {expected}") from None
    elif path.suffix in (".pt", ".pth", ".tar"):
        try:  # a bare [N, d] tensor, which runlib.load_file (checkpoints: dicts) refuses
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - not a weights-only file: the checkpoint loader says why, in one line
            d = runlib.load_file(path, trust=trust)
        if isinstance(d, dict):
            key = next((k for k in ("features", "train_features") if k in d), None)
            if key is None:
                raise UserError(f"--features {path} is a dict without 'features' or 'train_features': expected "
                                f"{expected}")
            d = d[key]
        f = torch.as_tensor(d).float().numpy()
    else:
        raise UserError(f"--features {path}: expected {expected}, not a {path.suffix or 'suffix-less'} file")
    if f.ndim != 2 or len(f) != n:
        raise UserError(f"--features {path} has shape {tuple(f.shape)}, but the train set has {n} images: pass "
                        "one feature row per train image, in train-set order")
    return np.asarray(f, dtype=np.float32)


def load_features(args, run, dist, train, tfs, ready):
    """[N, d] float32 features of the train set: --features, else the run folder's features.pt (if made from the same
    weights), else embedded now with the stage-A network (test transform) and cached as features.pt. `ready()` once
    the inputs are checked, before anything is written."""
    n = len(train)
    if args.features is not None:
        f = read_features(Path(args.features), n, args.trust_checkpoint)
        ready()
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12), args.features
    source = metric_net_source(args, run)  # loaded (checked) even when features.pt is reused
    backbone, head = load_stage_a(args, source, args.trust_checkpoint, "--metric_net")
    key = str(source) if source is True else f"{source} ({Path(source).stat().st_mtime_ns})"
    cache = run.path("features.pt")
    if cache.exists():
        d = torch.load(cache, map_location="cpu", weights_only=True)
        if d.get("source") == key and d["features"].shape[0] == n:
            ready()
            return d["features"].numpy(), str(source)
    net = EmbeddingNet(backbone, args.low_dim if head is None else head["weight"].shape[0])
    if head is not None:
        net.fc.load_state_dict(head)
    else:  # no 128-d head in the checkpoint (e.g. torchvision weights): propagate on the pooled features
        net.fc = nn.Identity()
    ready()
    net.to(dist.device)
    loader = eval_batches(train, args, dist, tfs[2])
    f = F.normalize(embed(net, loader, n, dist, dist.device, args.amp), dim=1).cpu()
    if run.is_main:
        runlib.atomic_write(cache, lambda fh: torch.save({"features": f, "targets": torch.as_tensor(train.targets),
                                                          "source": key}, fh))
    return f.numpy(), str(source)


def run_propagate(args, run, dist, train, tfs, labeled, unlabeled, ready):
    """Writes pseudo_labels_<propagation>.pt and the figures, propagation_<propagation>.json (rank 0 computes, the
    others wait)."""
    c = train.num_classes
    y_l = train.targets[labeled]
    check_seeds(y_l, c, f"the labeled split ({len(labeled)} seeds)")  # on every rank: none is left waiting
    features, source = load_features(args, run, dist, train, tfs, ready)
    out = run.path(f"pseudo_labels_{args.propagation}.pt")
    if run.is_main:
        keep_probs = len(unlabeled) * c <= 5e7  # ImageNet-size probability tables (5 GB) are not written
        gpu = neighbors.use_gpu(dist.device)
        t0 = time.time()
        if args.propagation == "knn":
            pred, conf, probs = knn_propagate(features, labeled, y_l, unlabeled, c, 200, args.knn_t, keep_probs,
                                              dist.device)
            extra = {}
        else:
            index = args.graph_index if args.graph_index != "auto" else ("flat" if len(features) <= 200_000 else "ivf")
            pred, conf, probs, lam = spectral_propagate(features, labeled, y_l, unlabeled, c, args.graph_k,
                                                        args.num_eigs, args.nc_t, args.eig_solver, index, keep_probs,
                                                        args.seed, gpu)
            extra = {"eigenvalues": torch.from_numpy(lam.astype(np.float32))}
        wall = time.time() - t0
        idx, lab, w, order = rank_by_confidence(unlabeled, pred, conf)
        product = {"pseudo_indexes": torch.from_numpy(idx), "pseudo_labels": torch.from_numpy(lab),
                   "pseudo_weights": torch.from_numpy(w), "labeled_indexes": torch.from_numpy(labeled),
                   "unlabeled_indexes": torch.from_numpy(np.asarray(unlabeled)), "num_train": len(train),
                   "num_classes": c, "propagation": args.propagation, "features_source": source, **extra}
        if probs is not None:
            product["pseudo_probs"] = torch.from_numpy(probs[order])
        runlib.atomic_write(out, lambda f: torch.save(product, f))
        at, auc, cum = accuracy_by_ratio(lab, train.targets[idx])
        figures = {f"top{int(round(100 * r))}": round(a, 2) for r, a in at.items()}
        figures.update(auc=round(auc, 2), wall_s=round(wall, 2), num_labeled=len(labeled), num_unlabeled=len(idx))
        run.save_json(f"propagation_{args.propagation}.json", figures)
        np.save(run.path(f"propagation_{args.propagation}_curve.npy"), cum.astype(np.float32))
        curves = {}
        for m in ("knn", "spectral"):
            p = run.path(f"propagation_{m}_curve.npy")
            if p.exists():
                curves[m] = np.load(p)
        save_accuracy_plot(run.path("propagation_accuracy.png"), curves,
                           f"{args.dataset}, {len(labeled)} labels: pseudo-label accuracy vs kept ratio")
        for r in (0.1, 0.2, 0.5, 1.0):
            run.log(0, {f"propagate/{args.propagation}_top{int(100 * r)}": at[r]})
        print(f"[{run.name}] {args.propagation} propagation of {len(labeled)} seeds to {len(idx)} images in "
              f"{wall:.1f} s: pseudo-label accuracy top10% {at[0.1]:.2f}, top20% {at[0.2]:.2f}, all {at[1.0]:.2f} "
              f"(AUC {auc:.2f}) -> {out}", flush=True)
    distributed.barrier()


# ---------------------------------------------------------------------------------------------- stage C: finetune
def run_finetune(args, run, dist, train, test, tfs, state, ready):
    """Cross-entropy on the seeds and the kept pseudo-labels. Returns (completed, the fine-tuning figures)."""
    device, world = dist.device, dist.world_size
    c = train.num_classes
    pseudo_path = Path(args.pseudo_file) if args.pseudo_file else run.path(f"pseudo_labels_{args.propagation}.pt")
    if not args.pseudo_file and not pseudo_path.exists():
        raise UserError(f"no pseudo-labels: {pseudo_path} does not exist; run --stage propagate --propagation "
                        f"{args.propagation} on this run folder first, or pass --pseudo_file PATH")
    labeled, parts = read_pseudo_file(pseudo_path, len(train), c, args.trust_checkpoint)
    picked = [select_pseudo(i, y, args.pseudo_ratio) for i, y in parts]  # per chunk for the reference's folders
    p_idx = np.concatenate([p[0] for p in picked]).astype(np.int64)
    p_y = np.concatenate([p[1] for p in picked]).astype(np.int64)
    rows = np.concatenate([labeled, p_idx])
    labels = np.concatenate([train.targets[labeled], p_y])
    pseudo_acc = 100.0 * float((p_y == train.targets[p_idx]).mean()) if len(p_idx) else None

    # the fine-tuned network starts from --pretrained when this command begins with fine-tuning, else the metric net
    flag = "--pretrained" if args.stage == "finetune" and args.pretrained is not None else "--metric_net"
    source = args.pretrained if flag == "--pretrained" else metric_net_source(args, run)
    backbone, _ = load_stage_a(args, source, args.trust_checkpoint, flag)
    net = Classifier(backbone, c).to(device)
    opt = torch.optim.SGD(net.parameters(), args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    scaler = runlib.grad_scaler(device, args.amp)
    if args.dali:
        stream = DaliSet(train, rows, labels, "train", args.batch_size, args, dist, args.seed)
    else:
        stream = loaders.BatchStream(train.subset(rows, transform=tfs[1], targets=labels), args.batch_size, args.seed,
                                      args.workers, dist.rank, world, pin_memory=device.type == "cuda")
    total = args.max_iter or args.finetune_iters
    eval_every = args.eval_interval or 500
    start = 0
    if state is not None and state.get("stage") == "finetune":
        same = np.array_equal(np.asarray(state["rows"]), rows) and np.array_equal(np.asarray(state["labels"]), labels)
        if not same:
            raise UserError(f"{run.path('checkpoint.pt')} was fine-tuned on other seeds / pseudo-labels: use the same "
                            "--pseudo_file, --pseudo_ratio and --propagation, or another --run_name")
        runlib.restore(state, {"model": net, "optimizer": opt, "scaler": scaler, "stream": stream})
        start = int(state["step"])
        runlib.restore_rng_states(state["rng"], dist.rank, lambda: runlib.seed_everything(
            args.seed + 1000 * start, dist.rank, args.deterministic))
    ready()
    model = distributed.wrap(net, dist)
    forward = torch.compile(model) if args.compile else model
    test_loader = eval_batches(test, args, dist, tfs[2])
    stop = min(total, args.stop_after) if args.stop_after else total
    if run.is_main and start == 0:
        correct = "" if pseudo_acc is None else f", {pseudo_acc:.2f}% correct"
        print(f"[{run.name}] fine-tuning on {len(labeled)} seeds + {len(p_idx)} pseudo-labels "
              f"(ratio {args.pseudo_ratio}{correct}) from {source}", flush=True)
    net.train()
    means, shown = runlib.Means(), {}
    for step in range(start, stop):
        lr = finetune_lr(step, total, args)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.time()
        x, y, _ = next(stream)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
        data_s = time.time() - t0
        with runlib.autocast(device, args.amp):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        done = step + 1
        means.add(loss=loss, data_s=data_s)
        evaluating = done % eval_every == 0 or done == total or done == stop
        if done % args.log_interval == 0 or evaluating:  # the one host read; evaluations write checkpoints
            shown = means.read()
            runlib.check_finite(shown["loss"], done, run)
            run.log(done, {"train/loss": shown["loss"], "train/lr": lr, "time/data_s": shown["data_s"],
                           **({"train/pseudo_label_acc": pseudo_acc} if pseudo_acc is not None else {})})
        run.progress(done, total, loss=shown.get("loss"), lr=lr)
        if evaluating:
            net.eval()
            top1, top5 = runlib.evaluate(net, test_loader, device)
            net.train()
            run.log_eval(done, top1, top5, stage="finetune")
            run.save_checkpoint({"stage": "finetune", "step": done, "total": total, "model": net.state_dict(),
                                 "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                 "stream": stream.state_dict(), "rng": runlib.rng_states(), "rows": rows,
                                 "labels": labels, "labeled": labeled})
    if stop < total:
        run.stop(stop, total)
        return False, {}
    evals = [e["top1"] for e in run.evals if e.get("stage") == "finetune"]
    top5 = [e["top5"] for e in run.evals if e.get("stage") == "finetune"]
    # best_top1 is the maximum over test-set evaluations: what the reference reports (model selection on test).
    return True, {"final_top1": evals[-1] if evals else None, "best_top1": max(evals) if evals else None,
                  "median_last_top1": float(np.median(evals[-5:])) if evals else None,
                  "final_top5": top5[-1] if top5 else None, "evals": len(evals), "iters": total,
                  "num_seeds": len(labeled), "num_pseudo": int(len(p_idx)),
                  "selected_pseudo_acc": None if pseudo_acc is None else round(pseudo_acc, 2),
                  "pseudo_file": str(pseudo_path)}


# ------------------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    inherit_from_run_folder(args)
    dist = distributed.init(args.device)
    runlib.seed_everything(args.seed, dist.rank, args.deterministic)
    if args.dataset is None:
        if args.root is None:
            raise UserError("pass --root DATASET_FOLDER (and --dataset if its name does not say which)")
        args.dataset = datasets.infer_name(args.root)
    train = datasets.load(args.dataset, args.root, "train", download=args.download)  # rank 0 downloads
    test = datasets.load(args.dataset, args.root, "test")
    set_defaults(args, train)
    if args.batch_size % dist.world_size:
        raise UserError(f"--batch_size {args.batch_size} (global) must be divisible by the {dist.world_size} processes")
    if args.dali and train.files is None:
        raise UserError(f"--dali reads image folders; {args.dataset} is loaded from arrays: drop --dali")
    c = train.num_classes
    if args.labeled_file is not None:
        labeled = splits.read_index_file(args.labeled_file, len(train))
        if args.stage in ("propagate", "all"):
            check_seeds(train.targets[labeled], c, f"--labeled_file {args.labeled_file}")
        mask = np.ones(len(train), bool)
        mask[labeled] = False
        unlabeled = np.flatnonzero(mask)
        labels_name = Path(args.labeled_file).stem
    else:
        labeled, unlabeled = reference_split(train.targets, args.num_labeled, c, args.seed)
        labels_name = str(args.num_labeled)
    if args.pseudo_file and args.stage == "all":
        raise UserError("--pseudo_file replaces the propagate stage: run --stage finetune with it, not --stage all")
    mean_std = datasets.MEAN_STD.get(args.dataset, datasets.MEAN_STD["imagenet"])
    tfs = make_transforms(args, mean_std)
    run = runlib.Run(args, METHOD, args.dataset, labels_name, dist, fixed=FIXED)
    state = run.resume_state
    split = run.path("labeled.csv")
    if split.exists():  # a later stage on this folder (with or without a checkpoint) keeps its seeds
        saved = splits.read_index_file(split, len(train))
        if not np.array_equal(np.sort(saved), np.sort(labeled)):
            raise UserError(f"{split} holds another labeled split ({len(saved)} seeds) than this command's "
                            f"({len(labeled)}): pass that run's --num_labeled / --labeled_file / --seed, or "
                            "--run_name NAME to start a new run")

    stages = STAGES if args.stage == "all" else (args.stage,)
    resumed = state.get("stage") if state is not None else None
    unfinished = resumed == "pretrain" and state["step"] < state["total"]
    if unfinished and "pretrain" not in stages:
        raise UserError(f"{run.path('checkpoint.pt')} holds an unfinished pretraining (iteration {state['step']} of "
                        f"{state['total']}): finish it with --stage pretrain --resume auto, or use another --run_name")
    # The stage this command resumes keeps its optimizer's weight decay; learning rates follow the flags (they are set
    # at every iteration).
    if unfinished:
        run.kept = ("pretrain_wd",)
    elif resumed == "finetune" and "finetune" in stages:
        run.kept = ("weight_decay",)

    def ready():
        """The first stage that runs has checked its inputs (and the checkpoint): from here on the folder is written."""
        if not run.started:
            run.start()
            run.save_split(labeled, [train.ids[i] for i in labeled])

    figures = {}
    for stage in stages:
        if stage == "pretrain":
            if run.path("pretrain.pt").exists() and not unfinished:
                print(f"[{run.name}] pretraining already finished: {run.path('pretrain.pt')}", flush=True)
                continue
            finished = run_pretrain(args, run, dist, train, test, tfs, state, ready)
        elif stage == "propagate":
            if args.stage == "all" and run.path(f"pseudo_labels_{args.propagation}.pt").exists() and state is not None:
                print(f"[{run.name}] propagation already done: {run.path(f'pseudo_labels_{args.propagation}.pt')}",
                      flush=True)
                continue
            run_propagate(args, run, dist, train, tfs, labeled, unlabeled, ready)
            finished = True
        else:
            finished, figures = run_finetune(args, run, dist, train, test, tfs, state, ready)
        if not finished:
            break
    ready()  # every stage asked for was done already
    if run.is_main:
        figures = merged_figures(run, figures)
    # Run.finish would count the pretraining monitor as test evaluations: the fine-tuning figures are set here.
    run.finish(**{"final_top1": None, "best_top1": None, "median_last_top1": None, "final_top5": None, "evals": 0,
                  **figures})


if __name__ == "__main__":
    runlib.entry(main)
