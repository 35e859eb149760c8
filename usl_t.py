"""USL-T: Unsupervised Selective Labeling, training-based (Wang, Lian, Yu, ECCV 2022, arXiv 2110.03006, Sec. 3.3).

USL-T learns the clusters instead of running k-means: clustering heads (M outputs, M = the label budget) on a
self-supervised backbone are trained with two losses. The local loss makes an image agree with a neighbour mined in
feature space, the neighbour's prediction being logit-adjusted by the running cluster marginal (-tau log pi, which
pushes towards balanced clusters) and sharpened (PAWS); the global loss self-labels confident images, FixMatch
style, re-weighted per cluster so that big clusters do not dominate. After training, each cluster of the head gives
its most confident image (CIFAR), or the densest image of each of the M largest clusters (ImageNet, which also
hands that image's label to the cluster's 20 densest images as pseudo-labels).

Launch:
    # CIFAR-10, 40 labels, from the SCAN pretext model (pretrained_kNN_cifar10/model.pth.tar) and its neighbours
    python usl_t.py --root ./data/cifar10 --dataset cifar10 --pretrained pretrained/model.pth.tar \
        --neighbors pretrained/topk-train-neighbors.npy --budget 40
    torchrun --nproc_per_node 4 usl_t.py --root ./data/cifar10 --dataset cifar10 --pretrained model.pth.tar --budget 40
    # ImageNet 0.2%: 3000 clusters, heads only, on a MoCo checkpoint (SCAN format or MoCo format)
    torchrun --nproc_per_node 8 usl_t.py --root ./imagenet --dataset imagenet --pretrained moco.pth.tar --budget 2911
    # CPU smoke run: 2 iterations (--max_iter: the whole run, selection included), or the first 2 of the full
    # schedule (--stop_after: a checkpoint, no selection; --resume auto goes on)
    python usl_t.py --device cpu --root ./data/cifar10 --dataset cifar10 --budget 10 --batch_size 32 --max_iter 2 \
        --workers 0
Per-dataset defaults come from RECIPES (--recipe cifar10 | cifar100 | imagenet, the reference's three configs,
inferred from --dataset; --help prints the table).

Outputs in runs/<run_name>/: checkpoint.pt (every epoch), metrics.jsonl (head-0 cluster purity as top1, NMI, ARI on
the test split), selected.npy (cluster order), selected.csv / unselected.csv (Index, ImageID), selected.png,
summary.json (class coverage, per-class counts); ImageNet recipe: pseudo_labels.csv (Index, ImageID, PseudoLabel).
"""
import argparse
import math
import random
import time

import common  # noqa: F401  first: it sets how OpenMP threads wait, which must precede torch
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from common import UserError
from common import backbones, datasets, distributed, loaders, neighbors, plots, splits
from common import run as runlib

# ----------------------------------------------------------------------------------------------------------- recipes
# The per-dataset defaults (docs/usl.md, "Recipes"; --help prints them): usl-t_pretraining/configs cifar10, cifar100
# and ImageNet. num_clusters None ("-" in the table) = the budget.
RECIPES = {
    'cifar10': dict(backbone='cifar_resnet18', epochs=200, batch_size=1024, head='linear', num_clusters=None,
                    update_head_only=False, adjustment_weight=5.0, sharpen_temperature=0.25, local_loss_scale=5.0,
                    confidence_threshold=0.95, reweight=True, reweight_renorm=False, mean_outside_mask=False,
                    reassign_after_steps=-1, use_mean_prob=True, selection_mode='cifar'),
    'cifar100': dict(backbone='cifar_resnet18', epochs=200, batch_size=1024, head='linear', num_clusters=None,
                     update_head_only=False, adjustment_weight=5.0, sharpen_temperature=0.25, local_loss_scale=5.0,
                     confidence_threshold=0.95, reweight=True, reweight_renorm=False, mean_outside_mask=True,
                     reassign_after_steps=-1, use_mean_prob=False, selection_mode='cifar'),
    'imagenet': dict(backbone='resnet50', epochs=10, batch_size=2048, head='normed', num_clusters=3000,
                     update_head_only=True, adjustment_weight=2.5, sharpen_temperature=0.5, local_loss_scale=0.5,
                     confidence_threshold=0.0, reweight=False, reweight_renorm=False, mean_outside_mask=True,
                     reassign_after_steps=1250, use_mean_prob=True, selection_mode='imagenet'),
}


def recipe_of(name):
    """The recipe --dataset implies: CIFAR-100's for it, CIFAR-10's for the other 32-px sets, else ImageNet's."""
    if name not in SMALL:
        return 'imagenet'
    return 'cifar100' if name == 'cifar100' else 'cifar10'


SCAN_MEAN_STD = {'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
                 'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SMALL = ('cifar10', 'cifar100', 'svhn', 'digits')
# Adam's first step is lr / (1 - beta1) = 10 lr, applied as a float32 scalar: a larger rate overflows inside torch.
MAX_LR = torch.finfo(torch.float32).max * (1 - 0.9)
# Flags a resumed run keeps: they fix the networks' and the optimizer's shapes, the neighbours and the data order.
FIXED = ('dataset', 'backbone', 'budget', 'num_clusters', 'num_heads', 'head', 'update_head_only', 'num_neighbors',
         'neighbors', 'seed')


def parse_args(argv=None):
    p = runlib.Parser(description=__doc__.split('\n\n')[0], recipes=RECIPES)
    g = p.add_argument_group('data')
    g.add_argument('--root', shared=True, required=True)
    g.add_argument('--dataset', shared=True, default=None, choices=datasets.NAMES)
    g.add_argument('--recipe', shared=True, default=None, choices=list(RECIPES))
    g.add_argument('--download', shared=True)
    g.add_argument('--image_size', type=int, default=None, help='crop size (default: 32 px sets as they are, 224)')
    g.add_argument('--workers', shared=True, default=4)

    g = p.add_argument_group('model')
    g.add_argument('--backbone', '--arch', shared=True, recipe=True, choices=backbones.NAMES)
    g.add_argument('--pretrained', shared=True, default=None,
                   help='the backbone under the clustering heads (SCAN model.pth.tar, MoCo, CLD, torchvision); '
                        'without it the backbone starts from random weights (for smoke tests only)')
    g.add_argument('--head', choices=['linear', 'normed'], recipe=True,
                   help='clustering heads: linear on the backbone feature (CIFAR) or 40 * cosine on the normalised '
                        'projection, initialised from image features (ImageNet)')
    g.add_argument('--num_heads', type=int, default=3, help='clustering heads trained side by side')
    g.add_argument('--num_clusters', type=int, recipe=True,
                   help='head outputs ("-" in the recipe table: --budget, so it follows the budget)')

    g = p.add_argument_group('method')
    g.add_argument('--budget', shared=True, default=40, help='NUM_SELECTED_SAMPLES')
    g.add_argument('--neighbors', default=None, metavar='NPY',
                   help='N x (>= num_neighbors+1) neighbour ids, column 0 the image itself (SCAN '
                        'topk-train-neighbors.npy); default: mined with faiss on the normalised features')
    g.add_argument('--num_neighbors', type=int, default=20, help='neighbours sampled from (NUM_NEIGHBORS)')
    g.add_argument('--adjustment_weight', type=float, recipe=True, help='tau of the logit adjustment')
    g.add_argument('--sharpen_temperature', type=float, recipe=True, help='sharpening T of the target')
    g.add_argument('--local_loss_scale', type=float, recipe=True, help='weight of the local loss')
    g.add_argument('--local_loss_off_epoch', type=int, default=None,
                   help='drop the local loss from this epoch of the schedule on (TURN_OFF_LOCAL_LOSS_AFTER_EPOCH; '
                        'default never)')
    g.add_argument('--global_start_epoch', type=int, default=0, help='global loss from this epoch of the schedule on')
    g.add_argument('--confidence_threshold', type=float, recipe=True, help='global-loss mask')
    g.add_argument('--reweight', action=argparse.BooleanOptionalAction, recipe=True,
                   help='global loss: weight cluster k by n / count_k (REWEIGHT)')
    g.add_argument('--reweight_renorm', action=argparse.BooleanOptionalAction, recipe=True,
                   help='global loss: weight n / (U count_k), U = clusters present (overrides --reweight)')
    g.add_argument('--mean_outside_mask', action=argparse.BooleanOptionalAction, recipe=True,
                   help='global loss: divide by the batch size, not by the masked weight sum')
    g.add_argument('--reassign_after_steps', type=int, recipe=True,
                   help='from this step on, move an almost empty cluster onto the largest one (negative = never)')
    g.add_argument('--count_ema_min', type=float, default=100, help='re-seed when the smallest count is below this')
    g.add_argument('--count_ema_max', type=float, default=1000, help='... and the largest above this')

    g = p.add_argument_group('method: selection')
    g.add_argument('--head_in_use', type=int, default=0, help='head whose clusters select (HEAD_IN_USE)')
    g.add_argument('--use_mean_prob', action=argparse.BooleanOptionalAction, recipe=True,
                   help='cifar selection: confidence = mean over heads of their max probability (else the head in '
                        'use)')
    g.add_argument('--selection_mode', choices=['cifar', 'imagenet'], recipe=True,
                   help='cifar: most confident image per cluster; imagenet: densest image of the budget largest '
                        'clusters plus pseudo-labels')
    g.add_argument('--knn_k', type=int, default=20, help='imagenet selection: neighbours in the density')
    g.add_argument('--pseudo_per_cluster', type=int, default=20,
                   help='imagenet selection: densest images per cluster that get the queried label')

    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', shared=True, recipe=True,
                   help='with --max_iter, the schedule\'s length in epochs (--local_loss_off_epoch, '
                        '--global_start_epoch)')
    g.add_argument('--max_iter', shared=True, default=None,
                   help='overrides --epochs x steps per epoch; an epoch of the schedule is then max_iter / epochs '
                        'iterations (default: --epochs x steps per epoch)')
    g.add_argument('--stop_after', shared=True, default=None, help='a checkpoint there, no selection')
    g.add_argument('--batch_size', shared=True, recipe=True)
    g.add_argument('--lr', shared=True, default=1e-4, help='Adam (constant)')
    g.add_argument('--weight_decay', shared=True, default=1e-4, help='Adam')
    g.add_argument('--update_head_only', action=argparse.BooleanOptionalAction, recipe=True,
                   help='train the heads only, backbone frozen in eval mode')
    g.add_argument('--seed', shared=True, default=42)
    g.add_argument('--log_interval', shared=True, default=10)
    g.add_argument('--eval_interval', shared=True, default=None,
                   help='cluster evaluations on the test split (default: once per pass over the data)')
    runlib.add_standard_flags(p)
    g = p.add_argument_group('run: outputs')
    g.add_argument('--grid_per_class', type=int, default=16, help='at most this many images per row of selected.png')
    args = p.parse_args(argv)
    if not 0 <= args.lr < MAX_LR:
        raise UserError(f"--lr {args.lr} must lie in [0, {MAX_LR:.3g}): Adam's first step, 10 x lr, is a float32")
    if args.weight_decay < 0:
        raise UserError(f'--weight_decay {args.weight_decay} must be at least 0')
    for k in ('max_iter', 'stop_after', 'epochs', 'eval_interval'):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UserError(f'--{k} must be at least 1, not {getattr(args, k)}')
    return args


def resolve_args(args, name):
    """The recipe's defaults (an explicit flag wins); --num_clusters left open by the recipe is the budget."""
    runlib.apply_recipe(args, RECIPES, args.recipe or recipe_of(name))
    if args.num_clusters is None:
        args.num_clusters = args.budget
    return args


# --------------------------------------------------------------------------------------------------- augmentations
def _rand_sign(v):
    return v if random.random() < 0.5 else -v


# SCAN's Augment list (data/augment.py): (op, min, max); magnitude uniform in [min, max].
def _rotate(img, v):
    return img.rotate(_rand_sign(v))


def _shear_x(img, v):
    return img.transform(img.size, Image.Transform.AFFINE, (1, _rand_sign(v), 0, 0, 1, 0))


def _shear_y(img, v):
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, _rand_sign(v), 1, 0))


def _translate_x(img, v):
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, _rand_sign(v) * img.size[0], 0, 1, 0))


def _translate_y(img, v):
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, _rand_sign(v) * img.size[1]))


AUGMENT_OPS = [
    (lambda img, v: img, 0, 1),
    (lambda img, v: ImageOps.autocontrast(img), 0, 1),
    (lambda img, v: ImageOps.equalize(img), 0, 1),
    (_rotate, 0, 30),
    (lambda img, v: ImageOps.solarize(img, int(v)), 0, 256),
    (lambda img, v: ImageEnhance.Color(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageEnhance.Contrast(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageEnhance.Brightness(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageEnhance.Sharpness(img).enhance(v), 0.05, 0.95),
    (_shear_x, 0.0, 0.1),
    (_shear_y, 0.0, 0.1),
    (_translate_x, 0.0, 0.1),
    (_translate_y, 0.0, 0.1),
    (lambda img, v: ImageOps.posterize(img, int(v)), 4, 8),
]


class Augment:
    """n ops drawn with replacement from AUGMENT_OPS, each with a uniform magnitude."""

    def __init__(self, n):
        self.n = n

    def __call__(self, img):
        for op, lo, hi in random.choices(AUGMENT_OPS, k=self.n):
            img = op(img, random.uniform(lo, hi))
        return img


class Cutout:
    """One square hole of side uniform in 1..length (SCAN's Cutout(random=True)), on a CHW tensor."""

    def __init__(self, length=16):
        self.length = length

    def __call__(self, x):
        h, w = x.shape[1:]
        side = random.randint(1, self.length)
        cy, cx = random.randrange(h), random.randrange(w)
        y0, y1 = max(0, cy - side // 2), min(h, cy + side // 2)
        x0, x1 = max(0, cx - side // 2), min(w, cx + side // 2)
        x = x.clone()
        x[:, y0:y1, x0:x1] = 0
        return x


class GaussianBlur:
    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def transforms_for(name, scan_views, image_size):
    """(standard view, strong view): SCAN's CIFAR views (the cifar recipes), or MoCo-v2 views (the imagenet one)."""
    import torchvision.transforms as T
    mean, std = SCAN_MEAN_STD.get(name, IMAGENET_MEAN_STD if name not in SMALL else
                                  datasets.MEAN_STD.get(name, IMAGENET_MEAN_STD))
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if name in SMALL and image_size is None:
        size = 32
        standard = T.Compose(norm)
    else:
        size = image_size or 224
        standard = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size)] + norm)
    if scan_views:
        strong = T.Compose(([] if name in SMALL and image_size is None else [T.Resize(size), T.CenterCrop(size)])
                           + [T.RandomHorizontalFlip(), T.RandomCrop(size), Augment(4)] + norm
                           + [Cutout(max(1, size // 2))])
    else:
        strong = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)),
                            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                            T.RandomApply([GaussianBlur()], p=0.5), T.RandomHorizontalFlip()] + norm)
    return standard, strong


class LocalGlobalSet(torch.utils.data.Dataset):
    """Item i -> ((standard view of i, strong view of i, strong view of a random neighbour of i), y, i)."""

    def __init__(self, base, neighbors, standard, strong):
        self.base, self.neighbors, self.standard, self.strong = base, neighbors, standard, strong

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img = self.base.image(i)
        j = int(np.random.choice(self.neighbors[i]))
        return (self.standard(img), self.strong(img), self.strong(self.base.image(j))), int(self.base.targets[i]), i


# ------------------------------------------------------------------------------------------------------------ model
class NormedLinear(nn.Module):
    """scale * cos(x, w_k): the ImageNet heads (fixed scale 40, no bias; rows set from image features at start)."""

    def __init__(self, in_features, out_features, scale=40.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.scale = scale

    def forward(self, x):
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1)) * self.scale


class ClusteringModel(nn.Module):
    """Backbone (+ optional projection) -> num_heads heads of num_clusters logits."""

    def __init__(self, backbone, num_clusters, num_heads, head='linear', projection=None):
        super().__init__()
        self.backbone = backbone
        self.projection = projection
        dim = backbone.feature_dim if projection is None else _out_dim(projection)
        make = (lambda: nn.Linear(dim, num_clusters)) if head == 'linear' else (lambda: NormedLinear(dim, num_clusters))
        self.heads = nn.ModuleList([make() for _ in range(num_heads)])

    def features(self, x):
        f = self.backbone(x)
        if self.projection is not None:
            f = F.normalize(self.projection(f), dim=1)
        return f

    def forward(self, x):
        f = self.features(x)
        return [h(f) for h in self.heads]


def _out_dim(module):
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1].out_features


def projection_head(extra):
    """The checkpoint's contrastive head: SCAN 'contrastive_head.{0,2}' / MoCo 'fc.{0,2}' MLP, or None."""
    for prefix in ('contrastive_head.', 'fc.'):
        if f'{prefix}0.weight' in extra and f'{prefix}2.weight' in extra:
            w0, w2 = extra[f'{prefix}0.weight'], extra[f'{prefix}2.weight']
            head = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0]), nn.ReLU(), nn.Linear(w2.shape[1], w2.shape[0]))
            sd = {k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)}
            head.load_state_dict(sd, strict=False)
            return head
    return None


# ------------------------------------------------------------------------------------------------------------ losses
def sharpen(p, temperature):
    """PAWS sharpening: p^(1/T) renormalised."""
    sp = p ** (1.0 / temperature)
    return sp / sp.sum(dim=1, keepdim=True)


class LocalLoss(nn.Module):
    """OursLossLocal: KL(sharpen(softmax(z_n - tau log pi_h), T) || softmax(z_s)), batch mean, with pi_h the running
    marginal of the neighbours' predictions (init uniform, pi <- normalise(m pi + (1 - m) mean softmax(z_n)), m = 0.5,
    updated after the target is computed). Under torchrun the batch mean is averaged over ranks so pi stays the same
    on every rank (the reference keeps one estimate per GPU)."""

    def __init__(self, num_clusters, num_heads, adjustment_weight, sharpen_temperature, momentum=0.5):
        super().__init__()
        self.adjustment_weight, self.temperature, self.momentum = adjustment_weight, sharpen_temperature, momentum
        self.register_buffer('prob_ema', torch.ones(num_heads, num_clusters) / num_clusters)

    def forward(self, head, anchors, neighbors):
        ema = self.prob_ema[head]
        adjusted = neighbors - self.adjustment_weight * torch.log(ema).view(1, -1)
        target = sharpen(F.softmax(adjusted, dim=1), self.temperature).detach()
        batch_mean = distributed.all_reduce_mean(F.softmax(neighbors, dim=1).detach().mean(dim=0))
        new = ema * self.momentum + batch_mean * (1 - self.momentum)
        self.prob_ema[head] = new / new.sum()
        return F.kl_div(F.log_softmax(anchors, dim=1), target, reduction='batchmean')


class GlobalLoss(nn.Module):
    """OursLossGlobal: cross-entropy of the strong view against the weak view's argmax where max p > threshold,
    weighted per cluster by n / count_k (reweight) or n / (U count_k) (reweight_renorm), normalised by the masked
    weight sum or by the batch size (mean_outside_mask). With count_ema, also tracks per-head cluster sizes
    (bincount / n * N, momentum 0.9) for the ImageNet re-seeding."""

    def __init__(self, threshold, reweight, reweight_renorm, mean_outside_mask, num_clusters, num_heads,
                 count_ema=False, data_len=None, momentum=0.9):
        super().__init__()
        self.threshold, self.reweight, self.renorm = threshold, reweight, reweight_renorm
        self.mean_outside_mask, self.use_count_ema, self.data_len, self.momentum = \
            mean_outside_mask, count_ema, data_len, momentum
        self.register_buffer('count_ema', torch.ones(num_heads, num_clusters) / num_clusters)

    def forward(self, head, weak, strong):
        # every row stays in, weighted by its mask: no shape depends on the data, so no step waits for the device
        prob = F.softmax(weak.detach(), dim=1)
        max_prob, target = prob.max(dim=1)
        mask = (max_prob > self.threshold).float()
        b, c = prob.shape
        counts = torch.bincount(target, weights=mask, minlength=c)  # confident rows per cluster
        n = mask.sum()
        if self.use_count_ema:  # pooled over the ranks, so that every rank re-seeds the same clusters
            with torch.no_grad():
                pooled = distributed.all_reduce_mean(torch.cat([counts, n.view(1)]))
                share = pooled[:c] / pooled[c] * self.data_len
                ema = self.count_ema[head] * self.momentum + share * (1 - self.momentum)
                # no confident row anywhere: the reference divides by 0 (NaN); kept as it was here
                self.count_ema[head] = torch.where(pooled[c] > 0, ema, self.count_ema[head])
        weight = None
        if self.renorm or self.reweight:  # n / (U count_k) or n / count_k on the clusters present, 1 elsewhere
            present, seen = counts > 0, counts.clamp_min(1)
            freq = n / present.sum() / seen if self.renorm else 1 / (seen / n)
            weight = torch.where(present, freq, torch.ones_like(counts))
        logp = -F.log_softmax(strong, dim=1)
        if weight is not None:
            logp = logp * weight.view(1, -1)
        loss = logp.gather(1, target.view(-1, 1)).view(-1) * mask
        if self.mean_outside_mask:
            return loss.sum() / b
        if weight is not None:  # the masked weight sum is >= 1 whenever a row is confident; else loss.sum() = 0
            return (loss / (weight[target] * mask).sum().clamp_min(1)).sum()
        return loss.sum() / n.clamp_min(1)


@torch.no_grad()
def reassign_clusters(head, count_ema, min_th, max_th, generator=None):
    """ImageNet re-seeding (DeeperCluster-style): if the smallest cluster count < min_th and the largest > max_th,
    the smallest cluster's weight row becomes the largest's, both nudged by +-1e-7 noise in opposite directions,
    and each gets half the count. Decided on the device, as torch.where of both outcomes, so that no step waits for
    a host read; the noise is drawn at every call, from `generator`. Returns the 1-element bool tensor "moved"."""
    small, big = count_ema.argmin().view(1), count_ema.argmax().view(1)
    low, high = count_ema.index_select(0, small), count_ema.index_select(0, big)
    moved = (low < min_th) & (high > max_th)
    w = head.weight
    noise = torch.randn(1, w.shape[1], generator=generator, device=w.device).to(w.dtype) * 1e-7
    w_small, w_big = w.index_select(0, small), w.index_select(0, big)
    w.index_copy_(0, small, torch.where(moved[:, None], w_big - noise, w_small))
    w.index_copy_(0, big, torch.where(moved[:, None], w_big + noise, w_big))
    count_ema.index_copy_(0, small, torch.where(moved, high / 2, low))
    count_ema.index_copy_(0, big, torch.where(moved, high / 2, high))
    return moved


# --------------------------------------------------------------------------------------------------- neighbours
def ivf_or_flat(x, metric, gpu):
    """SCAN's index: exact (flat) on a GPU or up to 200,000 rows, else inverted lists (4 sqrt(N) lists from 5 k-means
    rounds on 20 rows per list, 8 probed per query)."""
    n = len(x)
    if gpu or n <= 200_000:
        return neighbors.flat_index(x, metric, gpu)
    nlist = int(4 * math.sqrt(n))
    return neighbors.ivf_index(x, metric, nlist=nlist, nprobe=8, train_size=20 * nlist, kmeans_iters=5,
                               min_points_per_centroid=1)


def knn_ids(feats, k, gpu=False):
    """ids (N, k) of the k most similar rows by inner product on normalised features (SCAN: faiss IndexFlatIP),
    column 0 forced to be the row itself."""
    x = np.ascontiguousarray(F.normalize(torch.as_tensor(feats).float(), dim=1).numpy())
    n = len(x)
    ids = neighbors.search(ivf_or_flat(x, 'ip', gpu), x, k)[1]
    own = np.arange(n)[:, None]
    keep = (ids != own) & (ids >= 0)
    keep[keep.sum(1) == k, -1] = False          # the row itself was not found: drop the farthest instead
    short = np.flatnonzero(keep.sum(1) < k - 1)  # inverted lists returned too few: pad with the row itself
    out = np.repeat(own, k, axis=1)
    full = np.flatnonzero(keep.sum(1) == k - 1)
    out[full, 1:] = ids[full][keep[full]].reshape(len(full), k - 1)
    for i in short:
        found = ids[i][keep[i]]
        out[i, 1:1 + len(found)] = found
    return out


def knn_mean_dist(x, k, gpu=False):
    """Mean squared L2 distance to the k nearest rows (self included), the USL density of 1.3."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    d = neighbors.search(ivf_or_flat(x, 'l2', gpu), x, k)[0]
    d = np.where(d > 1e30, np.nan, np.maximum(d, 0))  # lists too short for k: average what was found
    return np.nanmean(d, axis=1)


@torch.no_grad()
def embed(net, dataset, batch_size, workers, device, amp, what='features'):
    """In-order outputs over a dataset on this process: features, or the list of per-head logits."""
    out = []
    for x, _, _ in loaders.eval_loader(dataset, batch_size, workers):
        with runlib.autocast(device, amp):
            x = x.to(device, non_blocking=True)
            if what == 'features':
                out.append(net.features(x).float().cpu())
            else:
                out.append(torch.stack([z.float() for z in net(x)]).cpu())
    return torch.cat(out, dim=0 if what == 'features' else 1)


# -------------------------------------------------------------------------------------------------------- selection
def select_cifar(probs, head_in_use, budget, use_mean_prob):
    """probs (H, N, M). Cluster k = argmax of the head in use; confidence = mean over heads of their own max
    probability (use_mean_prob) or the head in use's; cluster k = 0..M-1 gives its most confident image.
    The reference crashes on an empty cluster; here the missing picks are the next most confident images of the
    clusters, taken cluster by cluster in index order (second best of each, then third, ...)."""
    pred = probs[head_in_use].argmax(1)
    conf = probs.max(2).values.mean(0) if use_mean_prob else probs[head_in_use].max(1).values
    m = probs.shape[2]
    # rank of each image within its cluster by confidence (ties: dataset order)
    order = np.lexsort((np.arange(len(pred)), -conf.numpy(), pred.numpy()))
    sorted_pred = pred.numpy()[order]
    starts = np.searchsorted(sorted_pred, np.arange(m))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - starts[sorted_pred]
    # picks by (rank, cluster): rank 0 of clusters 0..M-1 first, as the reference
    pick_order = np.lexsort((pred.numpy(), rank))
    return pick_order[:budget].astype(np.int64), pred.numpy(), conf.numpy()


def select_imagenet(pred, mean_dist, targets, budget, per_cluster):
    """usl-t-imagenet.py: the `budget` largest predicted clusters (ties: lower cluster id); in each the densest image
    (smallest mean kNN distance) is queried, and its label goes to the `per_cluster` densest images of the cluster.
    Returns (queried indices, pseudo-labelled indices, their pseudo-labels)."""
    pred = np.asarray(pred)
    sizes = np.bincount(pred)
    clusters = np.lexsort((np.arange(len(sizes)), -sizes))[:budget]
    clusters = clusters[sizes[clusters] > 0]
    order = np.lexsort((np.arange(len(pred)), np.asarray(mean_dist), pred))  # by cluster, then density
    starts = np.searchsorted(pred[order], np.arange(len(sizes)))
    queried, pseudo_idx, pseudo_lab = [], [], []
    for c in clusters:
        members = order[starts[c]:starts[c] + sizes[c]]
        queried.append(members[0])
        pseudo_idx.extend(members[:per_cluster].tolist())
        pseudo_lab.extend([int(targets[members[0]])] * min(per_cluster, len(members)))
    return np.array(queried, dtype=np.int64), np.array(pseudo_idx, dtype=np.int64), np.array(pseudo_lab)


# ------------------------------------------------------------------------------------------------------- outputs


def write_outputs(run, train, picks, args, figures):
    picks = np.asarray(picks, dtype=np.int64)
    np.save(run.path('selected.npy'), picks)
    splits.write_index_csv(run.path('selected.csv'), np.sort(picks), train.ids)
    splits.write_index_csv(run.path('unselected.csv'), np.setdiff1d(np.arange(len(train)), picks), train.ids)
    labelled = train.num_classes > 1
    plots.save_image_grid(run.path('selected.png'), train, picks, args.grid_per_class, labelled)
    if labelled:
        counts = np.bincount(train.targets[picks], minlength=train.num_classes)
        figures.update(class_coverage=int((counts > 0).sum()), num_classes=train.num_classes,
                       class_counts=counts.tolist(), min_class_count=int(counts.min()),
                       max_class_count=int(counts.max()))
        print(f'selected {len(picks)}: {int((counts > 0).sum())} of {train.num_classes} classes covered, '
              f'per-class counts {counts.tolist()}', flush=True)
    figures['num_selected'] = len(picks)


def cluster_metrics(pred, targets):
    """Majority-label purity (the reference's MACC, %), NMI, ARI, non-empty clusters."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    pred, targets = np.asarray(pred), np.asarray(targets)
    table = np.zeros((pred.max() + 1, targets.max() + 1), dtype=np.int64)
    np.add.at(table, (pred, targets), 1)
    return dict(purity=100.0 * table.max(1).sum() / len(pred), nmi=float(normalized_mutual_info_score(targets, pred)),
                ari=float(adjusted_rand_score(targets, pred)), clusters=int((table.sum(1) > 0).sum()))


def schedule_epoch(step, total, epochs):
    """The epoch of the schedule (--local_loss_off_epoch, --global_start_epoch) that iteration `step` (from 0) of
    `total` lies in: `epochs` of total / epochs iterations each, i.e. passes over the data unless --max_iter
    stretches or shrinks them."""
    return step * epochs // total


# ------------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    dist = distributed.init(args.device)
    runlib.seed_everything(args.seed, dist.rank, args.deterministic)
    name = datasets.infer_name(args.root) if args.dataset is None else args.dataset
    args.dataset = name
    resolve_args(args, name)
    train = datasets.load(name, args.root, 'train', download=args.download)  # rank 0 downloads
    test = datasets.load(name, args.root, 'test')
    n = len(train)
    if args.budget < 1 or args.budget > n:
        raise UserError(f'--budget {args.budget} is impossible for a training set of {n} images: choose 1..{n}')
    if args.num_clusters < 1 or (args.selection_mode == 'cifar' and args.num_clusters < args.budget):
        raise UserError(f'--num_clusters {args.num_clusters} must be at least --budget {args.budget}')
    if not 0 <= args.head_in_use < args.num_heads:
        raise UserError(f'--head_in_use {args.head_in_use} must lie in 0..{args.num_heads - 1}')
    if args.num_neighbors < 1 or args.num_neighbors + 1 > n:
        raise UserError(f'--num_neighbors {args.num_neighbors} needs more than {args.num_neighbors} training images')
    # Adam's state holds the learning rate and the weight decay: on resume the checkpoint's win.
    run = runlib.Run(args, 'usl_t', name, args.budget, dist, fixed=FIXED, kept=('lr', 'weight_decay'))
    device = dist.device
    nn_gpu = neighbors.use_gpu(device)  # faiss on the GPU for the neighbours and the density

    # network
    backbone = backbones.build(args.backbone, pretrained=args.pretrained, trust_checkpoint=args.trust_checkpoint)
    if args.pretrained is None and dist.is_main:
        print('note: no --pretrained checkpoint: the backbone is random, the clusters will mean little', flush=True)
    projection = projection_head(backbone.pretrained_extra) if args.head == 'normed' else None
    if args.head == 'normed' and projection is None and dist.is_main:
        print('note: the checkpoint has no projection head: the normed heads sit on the pooled feature', flush=True)
    net = ClusteringModel(backbone, args.num_clusters, args.num_heads, args.head, projection).to(device)
    standard, strong = transforms_for(name, args.recipe != 'imagenet', args.image_size)
    plain_train = train.subset(np.arange(n), transform=standard)
    test.transform = standard

    # neighbours (SCAN's mined file, or mined here on the pretrained features)
    if args.neighbors is not None:
        try:
            neighbor_ids = np.load(args.neighbors, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f'cannot read --neighbors {args.neighbors}: {e}') from None
        if neighbor_ids.ndim != 2 or len(neighbor_ids) != n or neighbor_ids.shape[1] < args.num_neighbors + 1 \
                or neighbor_ids.min() < 0 or neighbor_ids.max() >= n:
            raise UserError(f'--neighbors {args.neighbors} has shape {neighbor_ids.shape}: it needs {n} rows of at '
                            f'least {args.num_neighbors + 1} ids in 0..{n - 1} (column 0 = the image itself)')
        neighbor_ids = neighbor_ids[:, :args.num_neighbors + 1].astype(np.int64)
    elif run.resume_state is not None:
        neighbor_ids = run.resume_state['neighbors'].numpy()
    else:
        t0 = time.time()
        net.eval()
        feats = embed(net, plain_train, 256, args.workers, device, args.amp)
        contrastive = projection_head(backbone.pretrained_extra) if projection is None else None
        if contrastive is not None:  # SCAN mines on the contrastive features
            with torch.no_grad():
                feats = F.normalize(contrastive(feats), dim=1)
        neighbor_ids = knn_ids(feats, args.num_neighbors + 1, gpu=nn_gpu)
        neighbor_ids = torch.from_numpy(neighbor_ids)
        neighbor_ids = distributed.broadcast_object(neighbor_ids).numpy()
        if dist.is_main:
            print(f'neighbours: {args.num_neighbors} mined with faiss ({time.time() - t0:.1f} s)', flush=True)

    # heads initialised from features of training images (ImageNet recipe)
    if args.head == 'normed' and run.resume_state is None:
        g = np.random.RandomState(args.seed)
        rows = g.choice(n, args.num_heads * args.num_clusters, replace=args.num_heads * args.num_clusters > n)
        net.eval()
        f = embed(net, train.subset(rows, transform=standard), 256, args.workers, device, args.amp)
        for h, head in enumerate(net.heads):
            head.weight.data.copy_(F.normalize(f[h * args.num_clusters:(h + 1) * args.num_clusters], dim=1))

    params = [p for hd in net.heads for p in hd.parameters()] if args.update_head_only else list(net.parameters())
    if args.update_head_only:
        for p in net.backbone.parameters():
            p.requires_grad_(False)
        if net.projection is not None:
            for p in net.projection.parameters():
                p.requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    local_loss = LocalLoss(args.num_clusters, args.num_heads, args.adjustment_weight,
                           args.sharpen_temperature).to(device)
    global_loss = GlobalLoss(args.confidence_threshold, args.reweight, args.reweight_renorm, args.mean_outside_mask,
                             args.num_clusters, args.num_heads, count_ema=args.reassign_after_steps >= 0,
                             data_len=n).to(device)
    scaler = runlib.grad_scaler(device, args.amp)
    model = distributed.wrap(net, dist)
    forward = torch.compile(model) if args.compile else model
    stream = loaders.BatchStream(LocalGlobalSet(train, neighbor_ids, standard, strong), args.batch_size, args.seed,
                                  args.workers, dist.rank, dist.world_size)
    steps_per_epoch = stream.batches_per_pass
    total = args.max_iter if args.max_iter is not None else args.epochs * steps_per_epoch
    stop = min(total, args.stop_after) if args.stop_after else total
    eval_every = args.eval_interval or steps_per_epoch
    # the re-seeding noise: its own stream, the same on every rank (their heads stay equal), saved with the run
    reseed_rng = torch.Generator(device).manual_seed(args.seed)
    step = 0
    if run.resume_state is not None:
        st = run.resume_state
        runlib.restore(st, {'model': net, 'optimizer': optimizer, 'scaler': scaler, 'local_loss': local_loss,
                     'global_loss': global_loss, 'stream': stream})
        if 'reseed_rng' in st:  # absent from checkpoints written before the stream was saved
            state = reseed_rng.get_state()
            runlib.restore(st, {'reseed_rng': state})
            reseed_rng.set_state(state)
        step = int(st['step'])
        runlib.restore_rng_states(st['rng'], dist.rank, lambda: runlib.seed_everything(
            args.seed + 1000 * step, dist.rank, args.deterministic))
        if dist.is_main:
            print(f'resumed at step {step}', flush=True)
    run.start()

    def save():
        run.save_checkpoint({'model': net.state_dict(), 'optimizer': optimizer.state_dict(),
                             'scaler': scaler.state_dict(), 'local_loss': local_loss.state_dict(),
                             'global_loss': global_loss.state_dict(), 'stream': stream.state_dict(),
                             'rng': runlib.rng_states(), 'reseed_rng': reseed_rng.get_state(), 'step': step,
                             'neighbors': torch.from_numpy(neighbor_ids)})

    def evaluate():
        net.eval()
        logits = embed(net, test, 256, args.workers, device, args.amp, what='logits')
        stats = [cluster_metrics(z.argmax(1).numpy(), test.targets) for z in logits]
        h = stats[args.head_in_use]
        run.log_eval(step, h['purity'], None, nmi=h['nmi'], ari=h['ari'], clusters=h['clusters'],
                     purity_heads=[s['purity'] for s in stats])
        run.log(step, {'test/nmi': h['nmi'], 'test/ari': h['ari'], 'test/clusters': h['clusters']})

    # training (one optimiser step per batch; losses summed over heads)
    means, shown = runlib.Means(), {}
    while step < stop:
        epoch = schedule_epoch(step, total, args.epochs)
        t_data = time.time()
        (x_std, x_aug, x_nb), _, _ = next(stream)
        x_std, x_aug, x_nb = (v.to(device, non_blocking=True) for v in (x_std, x_aug, x_nb))
        data_s = time.time() - t_data
        if args.update_head_only:
            net.eval()  # frozen backbone: BN statistics stay
        else:
            net.train()  # BN in train mode for all three passes, as the reference
        with runlib.autocast(device, args.amp):
            with torch.no_grad():
                z_w = net(x_std)
            z_s = forward(x_aug)
            with torch.no_grad():
                z_n = net(x_nb)
        use_local = args.local_loss_off_epoch is None or epoch < args.local_loss_off_epoch
        use_global = epoch >= args.global_start_epoch
        losses_g, losses_l = [], []
        for h in range(args.num_heads):
            if use_global:
                losses_g.append(global_loss(h, z_w[h].float(), z_s[h].float()))
            if use_local:
                losses_l.append(local_loss(h, z_s[h].float(), z_n[h].float()))
        loss_g = torch.stack(losses_g).sum() if losses_g else torch.zeros((), device=device)
        loss_l = torch.stack(losses_l).sum() if losses_l else torch.zeros((), device=device)
        loss = loss_g + args.local_loss_scale * loss_l
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        if args.reassign_after_steps >= 0 and step > args.reassign_after_steps:
            for h, head in enumerate(net.heads):
                reassign_clusters(head, global_loss.count_ema[h], args.count_ema_min, args.count_ema_max, reseed_rng)
        with torch.no_grad():
            mask_rate = (F.softmax(z_w[args.head_in_use].float(), 1).max(1).values
                         > args.confidence_threshold).float().mean()
        means.add(loss=loss, loss_global=loss_g, loss_local=loss_l, mask_rate=mask_rate, data_s=data_s)
        evaluating, saving = step % eval_every == 0 or step == total, step % steps_per_epoch == 0 or step == stop
        if step % args.log_interval == 0 or evaluating or saving:  # the one host read, before anything is written
            shown = means.read()
            runlib.check_finite(shown['loss'], step, run)
            run.log(step, {'train/loss': shown['loss'], 'train/loss_global': shown['loss_global'],
                           'train/loss_local': shown['loss_local'], 'train/mask_rate': shown['mask_rate'],
                           'time/data_s': shown['data_s']})
        run.progress(step, total, loss=shown.get('loss'), local=shown.get('loss_local'),
                     glob=shown.get('loss_global'), mask=shown.get('mask_rate'))
        if evaluating:
            evaluate()
        if saving:
            save()
    if stop < total:
        run.stop(step, total)  # the checkpoint is written; no selection, no summary.json
        return

    # selection from the trained heads (2.6), on the main process
    if not dist.is_main:
        return
    net.eval()
    figures = {'selection_mode': args.selection_mode, 'budget': args.budget, 'iters': step}
    if args.selection_mode == 'cifar':
        probs = F.softmax(embed(net, plain_train, 256, args.workers, device, args.amp, what='logits'), dim=2)
        picks, pred, _ = select_cifar(probs, args.head_in_use, args.budget, args.use_mean_prob)
        sizes = np.bincount(pred, minlength=args.num_clusters)
        figures['empty_clusters'] = int((sizes[:args.budget] == 0).sum())
    else:
        feats = embed(net, plain_train, 256, args.workers, device, args.amp)
        logits = net.heads[args.head_in_use](feats.to(device)).cpu()
        pred = logits.argmax(1).numpy()
        mean_dist = knn_mean_dist(feats.numpy(), min(args.knn_k, n), nn_gpu)
        picks, pseudo_idx, pseudo_lab = select_imagenet(pred, mean_dist, train.targets, args.budget,
                                                        args.pseudo_per_cluster)
        if len(picks) < args.budget and dist.is_main:
            print(f'note: only {len(picks)} clusters are non-empty: {len(picks)} images selected', flush=True)
        ids = train.ids
        with open(run.path('pseudo_labels.csv'), 'w') as f:
            f.write('Index,ImageID,PseudoLabel\n')
            for i, y in sorted(zip(pseudo_idx.tolist(), pseudo_lab.tolist())):
                f.write(f'{i},{ids[i]},{y}\n')
        figures.update(pseudo_labelled=len(pseudo_idx),
                       pseudo_label_accuracy=float((train.targets[pseudo_idx] == pseudo_lab).mean() * 100))
    write_outputs(run, train, picks, args, figures)
    run.finish(**figures)


if __name__ == '__main__':
    runlib.entry(main)
