"""USL: Unsupervised Selective Labeling, training-free (Wang, Lian, Yu, ECCV 2022, arXiv 2110.03006).

Which few images should a human label before semi-supervised learning starts? USL answers without any label and
without training: embed every training image with a self-supervised network, score each image by its kNN density
(representativeness: s_i = 1 / mean squared distance to its K nearest neighbours), split the set into as many
k-means clusters as there are labels to spend (diversity), and in every cluster pick the densest image, minus a
regulariser that pushes a pick away from the picks of the other clusters (lambda * sum_j d(i, s_j)^-alpha, smoothed
over passes). The selected indices feed any semi-supervised script (`--trainindex_x RUN/selected.csv`).

Launch (the selection itself runs on the main process; feature extraction is split over the processes):
    # CIFAR-10, 40 labels, from the CLD checkpoint (cifar10_ckpt_epoch_200.pth of the USL README)
    python usl.py --root ./data/cifar10 --dataset cifar10 --pretrained cifar10_ckpt_epoch_200.pth \
        --trust_checkpoint --budget 40 --seed 1
    # features computed anywhere (e.g. CLIP), one row per training image in dataset order
    python usl.py --root ./data/cifar10 --dataset cifar10 --features feats.npy --budget 40
    # ImageNet 0.2% (2,911 labels) from MoCo-v2-EMAN, 1 GPU / N GPUs for the feature pass / CPU
    python usl.py --root ./imagenet --dataset imagenet --pretrained res50_moco_eman_800ep.pth.tar --budget 2911 --seed 0
    torchrun --nproc_per_node 8 usl.py --root ./imagenet --dataset imagenet --pretrained res50_moco_eman_800ep.pth.tar \
        --budget 2911 --seed 0 --dali
    python usl.py --device cpu --root ./imagenet --features moco_feats.npy --budget 2911 --seed 0
    # the class-agnostic random baseline (seeds 1, 2, 5 give the lists published in the USL README)
    python usl.py --root ./data/cifar10 --dataset cifar10 --selection random --budget 40 --seed 1
Per-dataset defaults come from RECIPES (--recipe cifar10 | cifar100 | imagenet, the reference's three configs,
inferred from --dataset; --help prints the table).

Outputs in runs/<run_name>/: selected.npy (indices into the training set, in cluster order; draw order for random),
selected.csv and unselected.csv (columns Index, ImageID, sorted by Index), selected.png (the picks, one row per
class), summary.json (class coverage and per-class counts, stage timings). Intermediates (features, kNN, k-means)
go to --cache_dir (default: the run folder) under the reference's file names and are reused when present. A folder
that holds a selection is not overwritten: USL keeps no checkpoint, so `--resume auto` there selects again, from the
cached intermediates, and replaces the outputs.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import common  # noqa: F401  first: it sets how OpenMP threads wait, which must precede torch
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError
from common import backbones, datasets, distributed, loaders, neighbors, plots, splits
from common import run as runlib

# ----------------------------------------------------------------------------------------------------------- recipes
# The per-dataset defaults (docs/usl.md, "Recipes"; --help prints them): the reference configs
# selective_labeling/configs/cifar10_usl.yaml, cifar100_usl.yaml and ImageNet_usl_moco_0.2.yaml (the CLIP config
# differs in reg_lambda 0.05, reg_alpha 1.0, reg_horizon_num 32 and --reg_exclude_same_cluster; see docs/usl.md).
# None ("-" in the table): a setting of the other --reg_mode variant, unused by this one.
RECIPES = {
    'cifar10': dict(backbone='cifar_resnet18', knn_k=400, kmeans_iters=200, reg_mode='cifar', reg_iters=10,
                    reg_lambda=0.5, reg_momentum=0.9, reg_alpha=0.5, reg_horizon=4.0, reg_horizon_num=None,
                    reg_exclude_same_cluster=None),
    'cifar100': dict(backbone='cifar_resnet18', knn_k=400, kmeans_iters=200, reg_mode='cifar', reg_iters=10,
                     reg_lambda=1.0, reg_momentum=0.9, reg_alpha=1.0, reg_horizon=1.0, reg_horizon_num=None,
                     reg_exclude_same_cluster=None),
    'imagenet': dict(backbone='resnet50', knn_k=20, kmeans_iters=100, reg_mode='imagenet', reg_iters=2,
                     reg_lambda=1.5, reg_momentum=0.0, reg_alpha=0.5, reg_horizon=None, reg_horizon_num=128,
                     reg_exclude_same_cluster=False),
}
# A --reg_mode other than the recipe's takes the regulariser settings of the recipe of that variant
REG_FLAGS = ('reg_iters', 'reg_lambda', 'reg_momentum', 'reg_alpha', 'reg_horizon', 'reg_horizon_num',
             'reg_exclude_same_cluster')
VARIANT_RECIPE = {'cifar': 'cifar10', 'imagenet': 'imagenet'}


def recipe_of(name):
    """The recipe --dataset implies: ImageNet's for image folders, CIFAR-100's for it, CIFAR-10's for the other
    32-px sets."""
    if name in ('imagenet', 'imagefolder') or name in datasets.FINEGRAINED:
        return 'imagenet'
    return 'cifar100' if name == 'cifar100' else 'cifar10'


# CLD normalisation, used by the reference for CIFAR-10 and CIFAR-100 alike (TRANSFORM_NAME CLD-cifar10/100).
CLD_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FLAT_KNN_MAX = 200_000   # above this many points on CPU, --knn_index auto uses the IVF index (exact is O(N^2))
MASKED = 1e10            # the reference's "ignore this distance" value: contributes MASKED^-alpha to the regulariser


def parse_args(argv=None):
    p = runlib.Parser(description=__doc__.split('\n\n')[0], recipes=RECIPES)
    g = p.add_argument_group('data')
    g.add_argument('--root', shared=True, required=True, help='CIFAR pickles, or train/<class>/* folders')
    g.add_argument('--dataset', shared=True, default=None, choices=datasets.NAMES)
    g.add_argument('--recipe', shared=True, default=None, choices=list(RECIPES))
    g.add_argument('--download', shared=True)
    g.add_argument('--features', default=None, metavar='X.npy',
                   help='precomputed features (N x D, one row per training image in dataset order) instead of '
                        '--pretrained')
    g.add_argument('--normalize', action=argparse.BooleanOptionalAction, default=True,
                   help='L2-normalise --features rows (the reference normalises CLIP features; its CLD/MoCo features '
                        'are unit-norm already)')
    g.add_argument('--image_size', type=int, default=None,
                   help='resize (shorter side to size*256/224) and centre-crop to this size (default: 32 px sets '
                        'as they are, 224 for image folders)')
    g.add_argument('--batch_size', shared=True, default=128, help='of the feature pass')
    g.add_argument('--workers', shared=True, default=2)
    g.add_argument('--dali', shared=True, help='the feature pass over image folders (resize and centre crop)')

    g = p.add_argument_group('model')
    g.add_argument('--backbone', '--arch', shared=True, recipe=True, choices=backbones.NAMES,
                   help='the network of --pretrained')
    g.add_argument('--pretrained', shared=True, default=None,
                   help='usl.py trains nothing: the self-supervised network that embeds the images, as it is (CLD, '
                        'MoCo/MoCo-EMAN, SCAN, torchvision)')
    g.add_argument('--use_head', action=argparse.BooleanOptionalAction, default=True,
                   help="embed with the checkpoint's projection head when it has one (CLD 'linear', MoCo 'fc.0/fc.2' "
                        "or a MoCo v1 query encoder's 'fc', SCAN 'contrastive_head'), as the reference does; else the "
                        "L2-normalised pooled feature. A single linear 'fc' of any other checkpoint (torchvision "
                        "weights, a supervised model) is a classifier: never used")

    g = p.add_argument_group('method: selection')
    g.add_argument('--selection', default='usl', choices=['usl', 'random'],
                   help='usl, or the class-agnostic random baseline (np.random.seed(seed); np.random.choice(N, budget, '
                        'replace=False), the reference random-cifar.py)')
    g.add_argument('--budget', shared=True, default=40, help='USL.NUM_SELECTED_SAMPLES')
    g.add_argument('--num_centroids', type=int, default=None,
                   help='k-means clusters (default: the budget; 2501 for CIFAR budget 2500 and 12900 for ImageNet '
                        '12820, as the reference, to absorb empty clusters: it follows --budget)')
    g.add_argument('--seed', shared=True, default=1,
                   help='the k-means initialisation (reference: 1..5 on CIFAR, 0 on ImageNet) and the random baseline')
    g.add_argument('--knn_k', type=int, recipe=True, help='neighbours in the density')
    g.add_argument('--knn_index', default='auto', choices=['auto', 'flat', 'ivf'],
                   help='faiss index for the kNN: flat = exact; ivf = inverted lists (approximate, for millions of '
                        f'points on CPU); auto = flat on GPU or up to {FLAT_KNN_MAX:,} points, else ivf')
    g.add_argument('--knn_nprobe', type=int, default=8,
                   help='lists (of ~4 sqrt(N)) visited per query by the ivf index: more = closer to exact, slower')
    g.add_argument('--kmeans_iters', type=int, recipe=True, help='Lloyd iterations')

    g = p.add_argument_group('method: regulariser')
    g.add_argument('--reg_mode', choices=['cifar', 'imagenet'], recipe=True,
                   help='regulariser variant: cifar = all picks within a squared-distance horizon; imagenet = the '
                        '--reg_horizon_num nearest picks. The other variant than the recipe\'s takes the reg_* '
                        'settings of that variant\'s recipe (cifar10 or imagenet), not those of this one')
    g.add_argument('--reg_iters', type=int, recipe=True, help='selection passes (REG.NITERS; 1 = density peaks only)')
    g.add_argument('--reg_lambda', type=float, recipe=True, help='regulariser weight (REG.W)')
    g.add_argument('--reg_momentum', type=float, recipe=True, help='EMA of the regulariser over passes (REG.MOMENTUM)')
    g.add_argument('--reg_alpha', type=float, recipe=True, help='exponent on the squared distance (REG.ALPHA)')
    g.add_argument('--reg_horizon', type=float, recipe=True,
                   help='cifar variant: picks at squared distance >= this are ignored (REG.HORIZON_DIST; 4 = no '
                        'horizon on the unit sphere)')
    g.add_argument('--reg_horizon_num', type=int, recipe=True,
                   help='imagenet variant: number of nearest picks that repel (REG.HORIZON_NUM)')
    g.add_argument('--reg_exclude_same_cluster', action=argparse.BooleanOptionalAction, recipe=True,
                   help="imagenet variant: ignore the pick of a point's own cluster (REG.EXCLUDE_SAME_CLUSTER; the "
                        "CLIP config turns it on)")
    runlib.add_standard_flags(p)
    g = p.add_argument_group('run: intermediates and outputs')
    g.add_argument('--cache_dir', default=None,
                   help='folder of reusable intermediates (default: the run folder); share it between budgets/seeds')
    g.add_argument('--recompute_all', action=argparse.BooleanOptionalAction, default=False,
                   help='recompute features and kNN even when cached (RECOMPUTE_ALL)')
    g.add_argument('--recompute_num_dep', action=argparse.BooleanOptionalAction, default=False,
                   help='recompute the budget-dependent k-means even when cached (RECOMPUTE_NUM_DEP)')
    g.add_argument('--grid_per_class', type=int, default=16, help='at most this many images per row of selected.png')
    return p.parse_args(argv)


def resolve_args(args, name):
    """The recipe's defaults (an explicit flag wins), after refusing settings of the variant --reg_mode does not use.
    A --reg_mode other than the recipe's first takes the regulariser settings of that variant's recipe."""
    recipe = args.recipe or recipe_of(name)
    mode = args.reg_mode or RECIPES[recipe]['reg_mode']
    other = ('reg_horizon_num', 'reg_exclude_same_cluster') if mode == 'cifar' else ('reg_horizon',)
    for k in other:
        if getattr(args, k) is not None:
            raise UserError(f"--{k} applies to --reg_mode {'imagenet' if mode == 'cifar' else 'cifar'}, "
                            f"not {mode}: drop it or change --reg_mode")
    if mode != RECIPES[recipe]['reg_mode']:
        variant = RECIPES[VARIANT_RECIPE[mode]]
        for k in REG_FLAGS:
            if getattr(args, k) is None:
                setattr(args, k, variant[k])
    runlib.apply_recipe(args, RECIPES, recipe)
    for k in other:  # the other variant's settings: unused, recorded as such
        setattr(args, k, None)
    return args


# ------------------------------------------------------------------------------------------------------- features
class FeatureNet(nn.Module):
    """Backbone + the checkpoint's projection head, L2-normalised: the reference's 128-d 'low-dim' feature."""

    def __init__(self, backbone, use_head=True):
        super().__init__()
        self.backbone = backbone
        extra = backbone.pretrained_extra if use_head else {}
        self.head_name = 'none'
        self.cld_w = None
        self.mlp = None
        self.classifier = None  # (classes, dim) of a classification fc left out
        if 'linear.weight' in extra and extra['linear.weight'].shape[0] == backbone.feature_dim:
            # CLD NormedLinear: W is stored (in, out), transposed w.r.t. nn.Linear; cosine layer.
            self.cld_w = nn.Parameter(extra['linear.weight'].float(), requires_grad=False)
            self.head_name = 'cld'
        else:
            moco = 'encoder_q.' in getattr(backbone, 'pretrained_report', {}).get('prefix', '')
            for prefix, name in (('fc.', 'moco'), ('contrastive_head.', 'scan')):
                mlp = _mlp_head(extra, prefix)
                if isinstance(mlp, nn.Linear) and prefix == 'fc.' and not moco:
                    # One linear fc outside a MoCo query encoder (torchvision weights, a supervised model) scores
                    # classes; it projects no embedding: the pooled feature is used instead.
                    self.classifier = tuple(mlp.weight.shape)
                elif mlp is not None:
                    self.mlp, self.head_name = mlp, name
                    break

    def forward(self, x):
        f = self.backbone(x).float()
        if self.cld_w is not None:
            f = F.normalize(f, dim=1) @ F.normalize(self.cld_w, dim=0)
        elif self.mlp is not None:
            f = self.mlp(f)
        return F.normalize(f, dim=1)


def _mlp_head(extra, prefix):
    """nn.Sequential rebuilt from '<prefix>0.weight', '<prefix>2.weight' (Linear-ReLU-Linear) or '<prefix>weight'."""
    if f'{prefix}0.weight' in extra and f'{prefix}2.weight' in extra:
        w0, w2 = extra[f'{prefix}0.weight'], extra[f'{prefix}2.weight']
        head = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0]), nn.ReLU(), nn.Linear(w2.shape[1], w2.shape[0]))
        head[0].weight.data.copy_(w0)
        head[2].weight.data.copy_(w2)
        for i in (0, 2):
            b = extra.get(f'{prefix}{i}.bias')
            if b is None:
                head[i].bias = None
            else:
                head[i].bias.data.copy_(b)
        return head
    if f'{prefix}weight' in extra and extra[f'{prefix}weight'].dim() == 2:
        w = extra[f'{prefix}weight']
        head = nn.Linear(w.shape[1], w.shape[0], bias=f'{prefix}bias' in extra)
        head.weight.data.copy_(w)
        if head.bias is not None:
            head.bias.data.copy_(extra[f'{prefix}bias'])
        return head
    return None


def eval_transform(name, image_size):
    import torchvision.transforms as T
    small = name in ('cifar10', 'cifar100', 'svhn', 'digits')
    mean, std = CLD_MEAN_STD if name in ('cifar10', 'cifar100') else \
        (datasets.MEAN_STD.get(name, IMAGENET_MEAN_STD) if small else IMAGENET_MEAN_STD)
    steps = []
    if image_size is not None or not small:
        size = image_size or 224
        steps += [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


@torch.no_grad()
def extract_features(net, train, args, dist):
    """(N, D) float32 features in dataset order; each rank embeds a slice, then they are gathered."""
    net.eval().to(dist.device)
    feats, seen = None, None
    if args.dali:
        from common.dali import DaliStream
        if train.files is None:
            raise UserError('--dali reads image files; this dataset is held in memory: drop --dali')
        batches = DaliStream(files=train.files, labels=train.targets, views=('val',), batch_size=args.batch_size,
                             size=args.image_size or 224, rank=dist.rank, world_size=dist.world_size,
                             threads=max(1, args.workers), device=dist.device.type, one_pass=True, shuffle=False)
    else:
        batches = loaders.eval_loader(train, args.batch_size, args.workers, dist.rank, dist.world_size, pad=True)
    out_f, out_i = [], []
    t0 = time.time()
    for b, (x, _, idx) in enumerate(batches):
        with runlib.autocast(dist.device, args.amp):
            f = net(x.to(dist.device, non_blocking=True)).float()
        out_f.append(f)
        out_i.append(idx.to(dist.device).long())
        if dist.is_main and time.time() - t0 > 30:
            print(f'features: {(b + 1) * len(x) * dist.world_size} / {len(train)}', flush=True)
            t0 = time.time()
    f, i = torch.cat(out_f), torch.cat(out_i)
    if dist.world_size > 1:  # DALI shards may differ by one sample: pad to the longest before gathering
        n = torch.tensor([len(i)], device=dist.device)
        most = int(distributed.all_gather_cat(n).max())
        f = torch.cat([f, f[:1].expand(most - len(f), -1)])
        i = torch.cat([i, torch.full((most - len(i),), -1, device=i.device, dtype=i.dtype)])
        f, i = distributed.all_gather_cat(f), distributed.all_gather_cat(i)
    feats = torch.zeros(len(train), f.shape[1])
    seen = torch.zeros(len(train), dtype=torch.bool)
    keep = i >= 0
    feats[i[keep].cpu()] = f[keep].cpu()
    seen[i[keep].cpu()] = True
    if not bool(seen.all()):
        raise RuntimeError(f'{int((~seen).sum())} images got no feature')
    return feats.numpy()


# ----------------------------------------------------------------------------------------------- kNN density (1.3)
def knn_distances(x, k, index='flat', nprobe=8, gpu=False, seed=0, log=print):
    """Squared L2 distances (N, k) and ids to the k nearest points of every point, itself included (first, ~0).

    flat: exact (the reference's KeOps Kmin_argKmin). ivf: faiss IndexIVFFlat with ~4 sqrt(N) lists (at most N / 64)
    from 5 k-means rounds on 20 points per list (a coarse quantizer is enough), `nprobe` lists per query:
    approximate, O(N^1.5) instead of O(N^2). Rows whose probed lists hold fewer than k points are searched exactly."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if index == 'flat':
        d, ids = neighbors.search(neighbors.flat_index(x, 'l2', gpu), x, k)
    else:
        nlist = int(min(max(1, n // 64), 4 * math.sqrt(n)))
        ivf = neighbors.ivf_index(x, 'l2', nlist=nlist, nprobe=nprobe, train_size=20 * nlist, sample_seed=seed,
                                  kmeans_iters=5, kmeans_seed=seed, min_points_per_centroid=1, gpu=gpu)
        log(f'knn: ivf index, {nlist} lists, nprobe {min(nprobe, nlist)}')
        d, ids = neighbors.search(ivf, x, k)
        short = np.flatnonzero((ids < 0).any(1))
        if len(short):
            d[short], ids[short] = neighbors.search(neighbors.flat_index(x, 'l2'), x[short], k)
    np.maximum(d, 0, out=d)  # the ||a||^2 + ||b||^2 - 2ab form can dip below 0 for the point itself
    return d, ids


def density_mean_dist(d_knns):
    """Mean squared distance to the K neighbours (self included): the reference's neighbors_dist; s_i = 1 / it."""
    return torch.from_numpy(d_knns).mean(dim=1)


# ------------------------------------------------------------------------------------------------------ k-means (1.4)
def kmeans_init(n, k, seed):
    """The reference's init: torch.manual_seed(seed); x[torch.randperm(N)[:K]] (CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].numpy()


def kmeans(x, k, iters, seed=0, init=None, gpu=False, log=None):
    """Lloyd's k-means, squared L2, with the reference's semantics (nn_utils.KMeans): init x[randperm(N)[:K]],
    `iters` rounds of (assign every point to its nearest centroid; centroid = mean of its points); returns the last
    assignment and the means of that assignment.

    faiss finds the nearest centroids. Hamerly's bounds skip the points whose nearest centroid provably cannot have
    changed (a margin covers floating-point error), and the loop stops early once an assignment repeats (every
    later round would repeat it): both give the same result as running every round in full. Near ties between the
    two nearest centroids are settled in the reference's sum((x - c)^2) form, lowest index first.
    An empty cluster keeps a NaN centroid and receives no point again, as with the reference's KeOps path (its dense
    path for K <= 40 would instead move every point into the NaN cluster: not reproduced).
    Returns (labels int64 (N,), centroids float32 (K, D) with NaN rows for empty clusters, rounds run)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, dim = x.shape
    xt = torch.from_numpy(x)
    init = kmeans_init(n, k, seed) if init is None else np.asarray(init)
    c = x[init].copy()
    alive = np.ones(k, dtype=bool)
    scale = float(np.sqrt((x * x).sum(1).max())) + 1e-12
    margin = 1e-4 * scale                 # on plain (not squared) distances
    sq_err = 1e-5 * (2 * scale) ** 2      # bound on the error of faiss' ||a||^2 + ||b||^2 - 2ab
    labels = np.zeros(n, dtype=np.int64)
    upper = np.zeros(n, dtype=np.float32)  # >= distance to the assigned centroid
    lower = np.zeros(n, dtype=np.float32)  # <= distance to every other centroid
    rounds = 0
    for it in range(iters):
        rounds = it + 1
        live = np.flatnonzero(alive)
        if it == 0:
            todo = np.arange(n)
        else:
            # half the distance from each centroid to its nearest other centroid: points closer than that are safe
            if len(live) > 1:
                cd, _ = neighbors.search(neighbors.flat_index(c[live], 'l2'), c[live], 2)
                half = np.full(k, np.inf, dtype=np.float32)
                half[live] = 0.5 * np.sqrt(np.maximum(cd[:, 1] - sq_err, 0))
            else:
                half = np.full(k, np.inf, dtype=np.float32)
            bound = np.maximum(lower, half[labels]) - margin
            todo = np.flatnonzero(upper > bound)
            if len(todo):  # tighten the upper bound with the exact distance, then test again
                upper[todo] = torch.linalg.vector_norm(xt[todo] - torch.from_numpy(c[labels[todo]]), dim=1).numpy()
                todo = todo[upper[todo] > bound[todo]]
        changed = 0
        if len(todo):
            kk = min(2, len(live))
            if it == 0 or gpu or len(live) <= 64 or not pruning_pays(labels[todo], upper[todo], c, live):
                d, j = neighbors.search(neighbors.flat_index(c[live], 'l2', gpu), x[todo], kk)
            else:
                d, j = nearest_two_pruned(xt, todo, labels[todo], upper[todo], c, live)
            new = live[j[:, 0]]
            if kk == 2:
                # near ties: the reference's explicit form decides, lower index first
                tie = np.flatnonzero(d[:, 1] - d[:, 0] <= sq_err)
                if len(tie):
                    p = todo[tie]
                    a, b = live[j[tie, 0]], live[j[tie, 1]]
                    da = ((xt[p] - torch.from_numpy(c[a])) ** 2).sum(1).numpy()
                    db = ((xt[p] - torch.from_numpy(c[b])) ** 2).sum(1).numpy()
                    new[tie] = np.where((db < da) | ((db == da) & (b < a)), b, a)
                    d[tie, 0] = d[tie, 1] + sq_err  # bounds that hold whichever of the two won
                    d[tie, 1] = d[tie, 0] - 3 * sq_err
                second = np.sqrt(np.maximum(d[:, 1] - sq_err, 0))
            else:
                second = np.full(len(todo), np.inf, dtype=np.float32)
            changed = int((new != labels[todo]).sum()) if it > 0 else n
            labels[todo] = new
            upper[todo] = np.sqrt(d[:, 0] + sq_err)
            lower[todo] = second
        if it > 0 and changed == 0:
            break  # same assignment as the previous round: the centroids below would repeat too
        # M-step: mean of each cluster (float32 sums, as the reference's scatter_add_)
        sums = torch.zeros(k, dim).index_add_(0, torch.from_numpy(labels), xt)
        counts = torch.bincount(torch.from_numpy(labels), minlength=k).float().view(k, 1)
        new_c = (sums / counts).numpy()   # 0/0 = NaN for an empty cluster, as in the reference
        alive = counts.view(-1).numpy() > 0
        moved = np.zeros(k, dtype=np.float32)
        moved[alive] = np.sqrt(((new_c[alive] - c[alive]) ** 2).sum(1))
        c = new_c
        if rounds < iters:
            # centroids moved: the assigned one may have come closer to nothing, the others up to max(moved) closer
            upper += moved[labels]
            top2 = np.sort(moved)[-2:] if k > 1 else np.array([0, moved[0]])
            lower -= np.where(moved[labels] == top2[-1], top2[0], top2[-1])
            np.maximum(lower, 0, out=lower)
        if log is not None:
            log(it, changed, len(todo))
    return labels, c.astype(np.float32), rounds


# nearest_two_pruned's fixed cost per group of points (a dozen small torch ops), counted in point-centroid
# distances of faiss' search on the same thread; calibrated on a 2-core x86 CPU
GROUP_COST = 150_000


def pruning_pays(assigned, upper, c, live):
    """Whether nearest_two_pruned beats the full search: its distances to the candidate centroids plus GROUP_COST per
    group on one thread, against len(assigned) x len(live) shared by every thread of faiss' search. The pruned
    search wins when most clusters are far from each point (ImageNet scale: 2,911 clusters); at CIFAR scale (50,000
    points, 40 to 400 clusters) its per-group cost dominates. Both give the same labels."""
    pos = np.full(len(c), -1, dtype=np.int64)
    pos[live] = np.arange(len(live))
    group = pos[assigned]
    members = np.bincount(group, minlength=len(live))
    reach = np.zeros(len(live), dtype=np.float32)
    np.maximum.at(reach, group, upper)
    cl = torch.from_numpy(c[live])
    # an estimate: cdist's matrix-product form, with slack for its rounding
    candidates = (torch.cdist(cl, cl) < torch.from_numpy(2 * reach * (1 + 1e-4) + 1e-4)[:, None]).sum(1).numpy()
    pruned = int((members > 0).sum()) * GROUP_COST + int((members * candidates).sum())
    return pruned < len(assigned) * len(live) / torch.get_num_threads()


def nearest_two_pruned(xt, rows, assigned, upper, c, live):
    """Squared distances and positions (in `live`) of the two nearest live centroids of xt[rows], searching only
    the centroids that can beat the assigned one: for a point within u of its centroid a, a centroid j with
    ||c_a - c_j|| >= 2u is at least u away (triangle inequality). Points are grouped by assigned centroid; the
    second distance returned is a lower bound when the pruned centroids could be nearer than the second candidate.
    Same answers as the full search (faiss' form of the distance), at a fraction of the cost for many clusters.
    torch runs on one thread here: the loop is a few small ops per centroid, each cheaper than waking, or on a busy
    machine waiting for, a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _nearest_two_pruned(xt, rows, assigned, upper, c, live)
    finally:
        torch.set_num_threads(threads)


def _nearest_two_pruned(xt, rows, assigned, upper, c, live):
    pos = np.full(len(c), -1, dtype=np.int64)
    pos[live] = np.arange(len(live))
    cl = torch.from_numpy(c[live])
    cn = (cl * cl).sum(1)
    d_out = np.empty((len(rows), 2), dtype=np.float32)
    j_out = np.empty((len(rows), 2), dtype=np.int64)
    order = np.argsort(assigned, kind='stable')
    groups = np.flatnonzero(np.diff(assigned[order], prepend=-1)) if len(order) else np.array([], dtype=np.int64)
    bounds = np.append(groups, len(order))
    for g in range(len(groups)):
        sel = order[bounds[g]:bounds[g + 1]]
        a = pos[assigned[sel[0]]]
        cc = torch.linalg.vector_norm(cl - cl[a], dim=1)
        reach = 2 * float(upper[sel].max()) * (1 + 1e-5) + 1e-6
        cand = torch.nonzero(cc < reach).view(-1)
        outside = cc[cc >= reach]
        q = xt[rows[sel]]
        d = (q * q).sum(1, keepdim=True) + cn[cand][None] - 2 * q @ cl[cand].T
        k = min(2, len(cand))
        v, i = d.topk(k, dim=1, largest=False)
        d_out[sel, 0], j_out[sel, 0] = v[:, 0].numpy(), cand[i[:, 0]].numpy()
        if k == 2:
            d_out[sel, 1], j_out[sel, 1] = v[:, 1].numpy(), cand[i[:, 1]].numpy()
        else:
            d_out[sel, 1], j_out[sel, 1] = np.inf, j_out[sel, 0]
        if len(outside):  # a pruned centroid is at least min(outside) - u away
            floor = np.maximum(float(outside.min()) - upper[sel], 0) ** 2
            d_out[sel, 1] = np.minimum(d_out[sel, 1], floor)
    return d_out, j_out


def reference_num_centroids(name, budget):
    """The reference's cluster count for a budget (get_sample_info_cifar / _imagenet)."""
    if name in ('cifar10', 'cifar100') and budget == 2500:
        return 2501
    if name == 'imagenet' and budget == 12820:
        return 12900
    return budget


# ------------------------------------------------------------------------------------------ selection (1.5, 1.6)
def cluster_argmax(utility, labels, num_clusters, budget):
    """Per cluster, in cluster-index order, the index of the highest utility (the first one on ties, in dataset
    order); empty clusters skipped; the first `budget` of them. A NaN utility counts as the maximum (torch argmax)."""
    u = torch.as_tensor(utility).float()
    u = torch.where(torch.isnan(u), torch.full_like(u, float('inf')), u)
    lab = torch.as_tensor(labels).long()
    n = len(u)
    best = torch.full((num_clusters,), float('-inf')).scatter_reduce(0, lab, u, 'amax', include_self=True)
    cand = torch.where(u == best[lab], torch.arange(n), torch.full((n,), n))
    first = torch.full((num_clusters,), n, dtype=torch.long).scatter_reduce(0, lab, cand, 'amin', include_self=True)
    return first[first < n][:budget].numpy()


def sq_dists(x, y):
    """Squared L2 distances (len(x), len(y)) in float64 then rounded: as exact as the reference's explicit
    sum((x - y)^2) in float32 (within its rounding) but a matrix product, ~20x faster on CPU. Pairs that come out
    nearly equal (duplicates, a point and itself) are recomputed in the explicit form so exact zeros stay zeros."""
    x64, y64 = x.double(), y.double()
    # (|x|^2 + |y|^2) - 2 x.y with the subtraction inside the product: bit-identical here to subtracting after, and
    # half the passes over the chunk
    d = torch.addmm((x64 * x64).sum(1, keepdim=True) + (y64 * y64).sum(1)[None], x64, y64.T, alpha=-2).float()
    tiny = torch.nonzero(d < 1e-6)
    if len(tiny):
        a, b = tiny[:, 0], tiny[:, 1]
        d[a, b] = ((x[a] - y[b]) ** 2).sum(1)
    return d


def repulsion_cifar(x, picks, labels, horizon, alpha, chunk=2048):
    """r_i = sum_j D_ij^-alpha over all picks j, where D_ij = d(i, pick_j), set to 1e10 when pick_j lies in i's
    cluster or D_ij >= horizon (nn_utils.get_selection_with_reg).

    The reference masks "same cluster" by comparing i's cluster id with the POSITION j of the pick, which is only
    right when no cluster is empty; here the pick's own cluster id is compared (identical otherwise). It asserts
    that no unmasked distance is exactly 0 (duplicate images); here such a distance is masked as the ImageNet
    variant does."""
    xs = x[picks]
    pick_cluster = labels[picks]
    r = torch.empty(len(x))
    for a in range(0, len(x), chunk):
        d = sq_dists(x[a:a + chunk], xs)
        d.masked_fill_(labels[a:a + chunk, None] == pick_cluster[None], MASKED)
        d.masked_fill_(d == 0, MASKED)
        if horizon is not None:
            d.masked_fill_(d >= horizon, MASKED)
        r[a:a + chunk] = (1 / (d ** alpha if alpha != 1 else d)).sum(dim=1)
    return r


def repulsion_imagenet(x, picks, labels, horizon_num, alpha, exclude_same_cluster, gpu=False, chunk=65536):
    """r_i = sum over the horizon_num nearest picks of D^-alpha (nn_utils_imagenet.get_selection_with_reg_imagenet).
    Exact zeros (the point itself when picked, duplicates) -> 1e10. exclude_same_cluster also masks the pick of i's
    own cluster: the reference compares i's cluster id with the pick's position in the list (its comment: right
    only without empty clusters); here the pick's cluster id."""
    xn = x.numpy()
    h = min(horizon_num, len(picks))
    d_np, j_np = neighbors.search(neighbors.flat_index(xn[picks], 'l2', gpu), xn, h, chunk)
    d, j = torch.from_numpy(d_np), torch.from_numpy(j_np)
    # recompute the small ones in the explicit form: faiss' matrix-product form does not give exact zeros
    small = torch.nonzero(d < 1e-4)
    if len(small):
        a, b = small[:, 0], small[:, 1]
        d[a, b] = ((x[a] - x[torch.as_tensor(picks)[j[a, b]]]) ** 2).sum(1)
    d = d.clamp_min(0)
    if exclude_same_cluster:
        d[labels[torch.as_tensor(picks)][j] == labels[:, None]] = MASKED
    d[d == 0] = MASKED
    return (1 / d ** alpha).sum(dim=1) if alpha != 1 else (1 / d).sum(dim=1)


def usl_select(x, mean_dist, labels, num_clusters, budget, mode, iters, lam, momentum, alpha,
               horizon=None, horizon_num=128, exclude_same_cluster=False, gpu=False):
    """The regularised selection. Pass t picks argmax over each cluster of s_i - lambda * R_i (s = 1 / mean_dist,
    clusters visited in index order, empty ones skipped, stop at `budget`); between passes
    R <- momentum * R + (1 - momentum) * r(picks). Returns (picks in cluster order, R used by the last pass).
    iters <= 1 in imagenet mode is the reference's get_selection_without_reg (min mean distance per cluster)."""
    x = torch.as_tensor(x).float()
    labels = torch.as_tensor(labels).long()
    mean_dist = torch.as_tensor(mean_dist).float()
    if mode == 'imagenet' and iters <= 1:
        picks = cluster_argmax(-mean_dist, labels, num_clusters, budget)
        return picks, torch.zeros(len(x))
    s = 1 / mean_dist
    reg = torch.zeros(len(x))
    picks = None
    for t in range(max(1, iters)):
        picks = cluster_argmax(s - lam * reg, labels, num_clusters, budget)
        if t == iters - 1:
            break  # the reference computes one more regulariser after the last pass and never uses it
        if mode == 'cifar':
            r = repulsion_cifar(x, picks, labels, horizon, alpha)
        else:
            r = repulsion_imagenet(x, picks, labels, horizon_num, alpha, exclude_same_cluster, gpu)
        reg = reg * momentum + r * (1 - momentum)
    return picks, reg


def random_select(n, budget, seed):
    """The reference's random-cifar.py: np.random.seed(seed); np.random.choice(np.arange(n), budget, replace=False).
    The legacy RandomState stream is frozen across NumPy versions."""
    return np.random.RandomState(seed).choice(np.arange(n), budget, replace=False).astype(np.int64)


# ------------------------------------------------------------------------------------------------------------ cache
class Cache:
    """Intermediates under the reference's names, with cache.json recording what each was computed from. A file
    whose record differs is recomputed; a file without a record (e.g. the authors' released intermediates) is
    reused after a shape check."""

    def __init__(self, folder, enabled=True):
        self.dir = Path(folder)
        self.enabled = enabled
        self.meta_path = self.dir / 'cache.json'
        self.meta = json.loads(self.meta_path.read_text()) if self.meta_path.exists() else {}

    def load(self, name, key, rows=None):
        path = self.dir / name
        if not (self.enabled and path.exists()):
            return None
        if name in self.meta and self.meta[name] != key:
            print(f'cache: {path} was made with other settings: recomputing it', flush=True)
            return None
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f'cannot read cached {path}: {e}; delete it or pass --recompute_all') from None
        if rows is not None and len(a) != rows:
            raise UserError(f'cached {path} has {len(a)} rows but the dataset has {rows} images: it belongs to '
                            f'another dataset; delete it, pass another --cache_dir, or --recompute_all')
        print(f'cache: reusing {path}', flush=True)
        return a

    def save(self, name, array, key):
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / name
        tmp = path.with_name(f'.{name}.tmp{os.getpid()}.npy')
        np.save(tmp, array)
        os.replace(tmp, path)
        self.meta[name] = key
        tmp = self.meta_path.with_name(f'.cache.json.tmp{os.getpid()}')
        tmp.write_text(json.dumps(self.meta, indent=1, default=str))
        os.replace(tmp, self.meta_path)


def file_key(path):
    st = os.stat(path)
    return {'path': str(Path(path).resolve()), 'bytes': st.st_size, 'mtime': int(st.st_mtime)}


# ---------------------------------------------------------------------------------------------------------- outputs
def class_counts(targets, picks, num_classes):
    return np.bincount(np.asarray(targets)[picks], minlength=num_classes)


def read_features(path, n, name, normalize):
    """--features: float32 (n, D), one row per training image in dataset order, L2-normalised with `normalize`."""
    expected = 'expected an N x D array of numbers saved with np.save (.npy), one row per training image'
    try:
        feats = np.load(path, mmap_mode='r', allow_pickle=False)
    except OSError as e:
        raise UserError(f'cannot read --features {path}: {e}') from None
    except ValueError:  # NumPy's "pickled data" refusal: a CSV, a torch file, an array of Python objects
        raise UserError(f'--features {path} is not a NumPy array file: {expected}') from None
    if not isinstance(feats, np.ndarray) or not np.issubdtype(feats.dtype, np.number):  # an .npz, an array of text
        raise UserError(f'--features {path} holds no array of numbers: {expected}')
    if feats.ndim != 2 or len(feats) != n:
        raise UserError(f'--features {path} has shape {feats.shape} but the {name} training set has {n} '
                        f'images: it needs one row per image, in dataset order')
    feats = np.array(feats, dtype=np.float32)  # a writable copy of the memory map
    if not np.isfinite(feats).all():
        raise UserError(f'--features {path} holds NaN or infinite values')
    if normalize:
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return feats


def write_outputs(run, train, picks, args, figures):
    picks = np.asarray(picks, dtype=np.int64)
    np.save(run.path('selected.npy'), picks)
    ids = train.ids
    splits.write_index_csv(run.path('selected.csv'), np.sort(picks), ids)
    rest = np.setdiff1d(np.arange(len(train)), picks)
    splits.write_index_csv(run.path('unselected.csv'), rest, ids)
    labelled = train.num_classes > 1
    plots.save_image_grid(run.path('selected.png'), train, picks, args.grid_per_class, labelled)
    if labelled:
        counts = class_counts(train.targets, picks, train.num_classes)
        figures.update(class_coverage=int((counts > 0).sum()), num_classes=train.num_classes,
                       class_counts=counts.tolist(), min_class_count=int(counts.min()),
                       max_class_count=int(counts.max()))
        print(f'selected {len(picks)}: {int((counts > 0).sum())} of {train.num_classes} classes covered, '
              f'per-class counts {counts.tolist()}', flush=True)
    figures.update(num_selected=len(picks), selected=picks.tolist() if len(picks) <= 5000 else None)


# ------------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    dist = distributed.init(args.device)
    runlib.seed_everything(args.seed, dist.rank, args.deterministic)
    name = datasets.infer_name(args.root) if args.dataset is None else args.dataset
    args.dataset = name
    resolve_args(args, name)
    train = datasets.load(name, args.root, 'train', download=args.download)  # rank 0 downloads
    n = len(train)
    if args.budget < 1 or args.budget > n:
        raise UserError(f'--budget {args.budget} is impossible for a training set of {n} images: choose 1..{n}')
    if args.num_centroids is None:
        args.num_centroids = reference_num_centroids(name, args.budget)
    if args.num_centroids < args.budget or args.num_centroids > n:
        raise UserError(f'--num_centroids {args.num_centroids} must lie between --budget {args.budget} and the '
                        f'number of images {n}')
    if args.selection == 'usl':
        if (args.features is None) == (args.pretrained is None):
            raise UserError('USL embeds the images with a self-supervised network: pass --pretrained PATH '
                            '(CLD, MoCo, ...) or --features X.npy (one row per training image), exactly one of them')
        if args.knn_k < 1 or args.knn_k > n:
            raise UserError(f'--knn_k {args.knn_k} must lie in 1..{n} (the number of training images)')
        if args.kmeans_iters < 1 or args.reg_iters < 1:
            raise UserError('--kmeans_iters and --reg_iters must be at least 1')
    labels_tag = f'{args.budget}' if args.selection == 'usl' else f'{args.budget}-random'
    run = runlib.Run(args, 'usl', name, labels_tag, dist)  # no checkpoint: --resume auto selects again (docstring)
    figures = {'selection': args.selection, 'budget': args.budget, 'seed': args.seed, 'dataset_size': n}

    if args.selection == 'random':
        run.start()
        if dist.is_main:
            picks = random_select(n, args.budget, args.seed)
            write_outputs(run, train, picks, args, figures)
            run.finish(**figures)
        return

    # features (1.2): the inputs are read, or the network loaded, before anything is written
    t = time.time()
    net = None
    if args.features is not None:
        if not dist.is_main:
            return  # nothing to embed: the main process does the rest
        feats = read_features(args.features, n, name, args.normalize)
        feat_key = {'features': file_key(args.features), 'normalize': args.normalize}
    else:
        net = FeatureNet(backbones.build(args.backbone, pretrained=args.pretrained,
                                         trust_checkpoint=args.trust_checkpoint), args.use_head)
        if net.classifier is not None and dist.is_main:
            what = 'the torchvision weights' if args.pretrained is True else args.pretrained
            print(f"note: the 'fc' of {what} ({net.classifier[0]} x {net.classifier[1]}) is a classifier, not a "
                  'projection head: embedding with the L2-normalised pooled feature', flush=True)
        figures['feature_head'] = net.head_name
        src = 'torchvision' if args.pretrained is True else file_key(args.pretrained)
        feat_key = {'pretrained': src, 'backbone': args.backbone, 'use_head': args.use_head, 'dataset': name,
                    'root': str(Path(args.root).resolve()), 'image_size': args.image_size, 'n': n}
    run.start()
    cache = Cache(args.cache_dir or run.dir, enabled=True)
    gpu = neighbors.use_gpu(dist.device)
    timings = {}
    if net is not None:
        feats = None
        if dist.is_main and not args.recompute_all:
            feats = cache.load('memory_feats_list.npy', feat_key, rows=n)
        if not distributed.broadcast_object(feats is not None):  # every rank embeds a share of the images
            if dist.is_main:
                print(f'features: {args.backbone} with head {net.head_name}', flush=True)
            train.transform = eval_transform(name, args.image_size)
            feats = extract_features(torch.compile(net) if args.compile else net, train, args, dist)
            train.transform = None
            if dist.is_main:
                cache.save('memory_feats_list.npy', feats, feat_key)
    if not dist.is_main:
        return  # the rest runs on one process
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    timings['features_s'] = round(time.time() - t, 2)
    print(f'features: {feats.shape[0]} x {feats.shape[1]} ({timings["features_s"]} s)', flush=True)

    # kNN density (1.3)
    t = time.time()
    index = args.knn_index if args.knn_index != 'auto' else ('flat' if gpu or n <= FLAT_KNN_MAX else 'ivf')
    knn_key = {**feat_key, 'k': args.knn_k, 'index': index, **({'nprobe': args.knn_nprobe} if index == 'ivf' else {})}
    suffix = '' if args.knn_k in (20, 200) else f'_{args.knn_k}'  # the reference's file names
    d_knns = None if args.recompute_all else cache.load(f'd_knns{suffix}.npy', knn_key, rows=n)
    if d_knns is not None and d_knns.shape[1] != args.knn_k:
        raise UserError(f'cached d_knns{suffix}.npy has {d_knns.shape[1]} neighbours, not --knn_k {args.knn_k}')
    if d_knns is None:
        d_knns, ind_knns = knn_distances(feats, args.knn_k, index, args.knn_nprobe, gpu, args.seed)
        cache.save(f'd_knns{suffix}.npy', d_knns, knn_key)
        cache.save(f'ind_knns{suffix}.npy', ind_knns, knn_key)
        del ind_knns
    mean_dist = density_mean_dist(np.asarray(d_knns, dtype=np.float32))
    del d_knns
    timings['knn_s'] = round(time.time() - t, 2)
    print(f'kNN density: k {args.knn_k}, {index} ({timings["knn_s"]} s)', flush=True)

    # k-means (1.4)
    t = time.time()
    km_key = {**feat_key, 'num_centroids': args.num_centroids, 'iters': args.kmeans_iters, 'seed': args.seed}
    recompute = args.recompute_all or args.recompute_num_dep
    tag = f'{args.budget}_{args.seed}'
    labels = None if recompute else cache.load(f'cluster_labels_{tag}.npy', km_key, rows=n)
    rounds = None
    if labels is not None and (labels.min() < 0 or labels.max() >= args.num_centroids):
        raise UserError(f'cached cluster_labels_{tag}.npy holds cluster ids outside 0..{args.num_centroids - 1}: '
                        f'pass --recompute_num_dep')
    if labels is None:
        labels, centroids, rounds = kmeans(feats, args.num_centroids, args.kmeans_iters, args.seed, gpu=gpu)
        cache.save(f'cluster_labels_{tag}.npy', labels, km_key)
        cache.save(f'centroids_{tag}.npy', centroids, km_key)
    labels = np.asarray(labels, dtype=np.int64)
    sizes = np.bincount(labels, minlength=args.num_centroids)
    timings['kmeans_s'] = round(time.time() - t, 2)
    figures.update(kmeans_rounds=rounds, empty_clusters=int((sizes == 0).sum()),
                   cluster_size_min=int(sizes[sizes > 0].min()), cluster_size_max=int(sizes.max()))
    print(f'k-means: {args.num_centroids} clusters, {int((sizes > 0).sum())} non-empty, sizes '
          f'{int(sizes[sizes > 0].min())}..{int(sizes.max())} ({timings["kmeans_s"]} s)', flush=True)
    if (sizes > 0).sum() < args.budget:
        raise UserError(f'k-means left {int((sizes > 0).sum())} non-empty clusters for a budget of {args.budget}: '
                        f'pass a larger --num_centroids (the reference uses 2501 for 2500)')

    # regularised selection (1.5 / 1.6)
    t = time.time()
    picks, _ = usl_select(torch.from_numpy(feats), mean_dist, labels, args.num_centroids, args.budget,
                          args.reg_mode, args.reg_iters, args.reg_lambda, args.reg_momentum, args.reg_alpha,
                          horizon=args.reg_horizon, horizon_num=args.reg_horizon_num,
                          exclude_same_cluster=bool(args.reg_exclude_same_cluster), gpu=gpu)
    timings['select_s'] = round(time.time() - t, 2)
    print(f'selection: {args.reg_mode} variant, {args.reg_iters} passes ({timings["select_s"]} s)', flush=True)
    figures.update(timings)
    write_outputs(run, train, picks, args, figures)
    run.finish(**figures)


if __name__ == '__main__':
    runlib.entry(main)
