"""usl.py: kNN density, Lloyd k-means, the regularised selection, the random baseline, the command line."""
import json

import numpy as np
import pytest
import torch

import usl
from common import UserError, backbones, datasets, splits
from conftest import assert_ok, assert_user_error, run_script
from fakedata import write_cifar, write_imagefolder
from runhelpers import cli, snapshot


# ------------------------------------------------------------------------------------------------- kNN density
def test_knn_density_on_a_line():
    # points 0, 1, 3 on a line, K = 2 (self included): squared distances
    #   0: {0 (0), 1 (1)}   -> mean 0.5;  1: {1 (0), 0 (1)} -> 0.5;  3: {3 (0), 1 (4)} -> 2.0
    x = np.array([[0, 0], [1, 0], [3, 0]], dtype=np.float32)
    d, ids = usl.knn_distances(x, 2)
    np.testing.assert_allclose(d, [[0, 1], [0, 1], [0, 4]], atol=1e-5)
    assert ids[:, 0].tolist() == [0, 1, 2] and ids[2, 1] == 1
    np.testing.assert_allclose(usl.density_mean_dist(d).numpy(), [0.5, 0.5, 2.0], atol=1e-5)


def test_ivf_knn_is_close_to_exact():
    rng = np.random.RandomState(0)
    x = rng.randn(3000, 8).astype(np.float32)
    exact, _ = usl.knn_distances(x, 10, 'flat')
    approx, ids = usl.knn_distances(x, 10, 'ivf', nprobe=1000)  # every list probed: exact answers
    np.testing.assert_allclose(approx, exact, rtol=1e-4, atol=1e-4)
    assert (ids >= 0).all()


# ------------------------------------------------------------------------------------------------------ k-means
def test_kmeans_init_is_the_reference_randperm():
    torch.manual_seed(3)
    ref = torch.randperm(100)[:7].numpy()
    assert usl.kmeans_init(100, 7, 3).tolist() == ref.tolist()


def test_kmeans_lloyd_rounds_by_hand():
    # 1-D points 0, 1, 10, 11; centroids start at points 0 and 1.
    # round 1: assign [0, 1, 1, 1] -> means 0 and (1 + 10 + 11) / 3 = 22/3
    # round 2: point 1 is 1 from 0 and 6.33 from 22/3 -> [0, 0, 1, 1] -> means 0.5, 10.5
    # round 3: same assignment -> the loop stops (rounds 4.. would repeat it)
    x = np.array([[0], [1], [10], [11]], dtype=np.float32)
    labels, c, rounds = usl.kmeans(x, 2, 1, init=np.array([0, 1]))
    assert labels.tolist() == [0, 1, 1, 1]
    np.testing.assert_allclose(c[:, 0], [0, 22 / 3], rtol=1e-6)
    labels, c, rounds = usl.kmeans(x, 2, 50, init=np.array([0, 1]))
    assert labels.tolist() == [0, 0, 1, 1] and rounds == 3
    np.testing.assert_allclose(c[:, 0], [0.5, 10.5])


def test_kmeans_empty_cluster_stays_empty_with_nan_centroid():
    # two centroids start on the same point: every tie goes to the lower index, cluster 1 empties, its centroid is
    # 0/0 = NaN (the reference) and no point joins it again
    x = np.array([[5, 0], [5, 0], [0, 0], [1, 0]], dtype=np.float32)
    labels, c, _ = usl.kmeans(x, 2, 10, init=np.array([0, 1]))
    assert labels.tolist() == [0, 0, 0, 0]
    assert np.isnan(c[1]).all() and np.allclose(c[0], x.mean(0))


def test_kmeans_equals_brute_force_lloyd():
    rng = np.random.RandomState(1)
    x = (rng.randn(600, 6) + rng.randint(0, 4, (600, 1)) * 2).astype(np.float32)
    init = usl.kmeans_init(600, 12, 5)
    c = torch.from_numpy(x[init]).clone()
    xt = torch.from_numpy(x)
    for _ in range(40):  # the reference's loop, explicit distances
        cl = ((xt[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        c = torch.zeros_like(c).index_add_(0, cl, xt) / torch.bincount(cl, minlength=12).float()[:, None]
    labels, cents, _ = usl.kmeans(x, 12, 40, init=init)
    assert labels.tolist() == cl.tolist()
    np.testing.assert_allclose(cents, c.numpy(), rtol=1e-5, atol=1e-6)


def test_kmeans_many_clusters_pruned_search_equals_brute_force(monkeypatch):
    # more than 64 clusters and no cost per group: after round 1 only the centroids within 2u of a point's centroid
    # are searched
    monkeypatch.setattr(usl, 'GROUP_COST', 0)
    pruned = []
    inner = usl._nearest_two_pruned
    monkeypatch.setattr(usl, '_nearest_two_pruned', lambda *a: pruned.append(len(a[1])) or inner(*a))
    rng = np.random.RandomState(2)
    x = (rng.randn(1500, 4) + rng.randint(0, 6, (1500, 1))).astype(np.float32)
    init = usl.kmeans_init(1500, 80, 0)
    c = torch.from_numpy(x[init]).clone()
    xt = torch.from_numpy(x)
    for _ in range(15):  # KeOps semantics: an empty cluster's NaN centroid is never the argmin
        cl = torch.nan_to_num(((xt[:, None] - c[None]) ** 2).sum(-1), nan=float('inf')).argmin(1)
        c = torch.zeros_like(c).index_add_(0, cl, xt) / torch.bincount(cl, minlength=80).float()[:, None]
    labels, cents, _ = usl.kmeans(x, 80, 15, init=init)
    assert pruned and labels.tolist() == cl.tolist()
    np.testing.assert_allclose(cents, c.numpy(), rtol=1e-5, atol=1e-6)


def test_pruned_search_is_chosen_when_its_distances_and_group_cost_are_fewer(monkeypatch):
    # two clusters of 3 points, 10 apart, each point within 1 of its centroid: each group's only candidate is its own
    # centroid, 6 distances instead of 6 x 2 = 12
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 1)
    c = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    assigned, upper, live = np.array([0, 0, 0, 1, 1, 1]), np.ones(6, dtype=np.float32), np.arange(2)
    monkeypatch.setattr(usl, 'GROUP_COST', 2)
    assert usl.pruning_pays(assigned, upper, c, live)         # 2 x 2 + 6 = 10 < 12
    monkeypatch.setattr(usl, 'GROUP_COST', 3)
    assert not usl.pruning_pays(assigned, upper, c, live)     # 2 x 3 + 6 = 12
    monkeypatch.setattr(usl, 'GROUP_COST', 0)
    assert not usl.pruning_pays(assigned, np.full(6, 6, dtype=np.float32), c, live)  # within 12 of both: 12 = 12
    monkeypatch.setattr(usl, 'GROUP_COST', 2)
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 2)
    assert not usl.pruning_pays(assigned, upper, c, live)     # 10 on one thread against 12 on two


# ------------------------------------------------------------------------------------------------- selection
# cluster 0 = {a1 (1,0), a2 (-1,0)}, cluster 1 = {b (2,0)}; densities s = 1/mean_dist: a1 2.0, a2 1.9, b 1.0
X = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0]])
MEAN_DIST = torch.tensor([1 / 2.0, 1 / 1.9, 1.0])
LABELS = np.array([0, 0, 1])


def test_cifar_regulariser_moves_the_pick_away_from_the_other_cluster():
    # pass 1 picks the density peaks [a1, b]. r_i = sum_j D_ij^-alpha (alpha 1), own-cluster pick masked to 1e10:
    #   r_a1 = 1/d(a1,b) + 1e-10 = 1/1 + 1e-10;  r_a2 = 1/d(a2,b) + 1e-10 = 1/9 + 1e-10;  r_b = 1/1 + 1e-10
    # R = (1 - momentum) r = 0.5 r; pass 2: a1: 2 - 1 * 0.5 = 1.5 < a2: 1.9 - 0.5/9 = 1.844 -> a2
    picks, reg = usl.usl_select(X, MEAN_DIST, LABELS, 2, 2, 'cifar', iters=2, lam=1.0, momentum=0.5, alpha=1.0,
                                horizon=4.0 ** 2)
    assert picks.tolist() == [1, 2]
    np.testing.assert_allclose(reg.numpy(), 0.5 * np.array([1 + 1e-10, 1 / 9 + 1e-10, 1 + 1e-10]), rtol=1e-6)
    # lambda 0, or one pass: the density peaks
    assert usl.usl_select(X, MEAN_DIST, LABELS, 2, 2, 'cifar', 2, 0.0, 0.5, 1.0, 16.0)[0].tolist() == [0, 2]
    assert usl.usl_select(X, MEAN_DIST, LABELS, 2, 2, 'cifar', 1, 1.0, 0.5, 1.0, 16.0)[0].tolist() == [0, 2]
    # a horizon of 0.5 (squared) ignores b for both: a1 stays
    picks, reg = usl.usl_select(X, MEAN_DIST, LABELS, 2, 2, 'cifar', 2, 1.0, 0.5, 1.0, horizon=0.5)
    assert picks.tolist() == [0, 2]


def test_imagenet_regulariser_nearest_picks():
    # horizon_num 2, alpha 0.5, momentum 0, exclude_same_cluster off: the own-cluster pick counts, zeros -> 1e10
    #   r_a1 = (1e10)^-0.5 [itself] + 1^-0.5 [b] = 1 + 1e-5;  r_a2 = 4^-0.5 [a1] + 9^-0.5 [b] = 0.8333
    # pass 2: a1: 2 - 1.00001 = 0.99999 < a2: 1.9 - 0.8333 = 1.0667 -> a2
    picks, reg = usl.usl_select(X, MEAN_DIST, LABELS, 2, 2, 'imagenet', 2, 1.0, 0.0, 0.5, horizon_num=2)
    assert picks.tolist() == [1, 2]
    np.testing.assert_allclose(reg.numpy()[:2], [1 + 1e-5, 0.5 + 1 / 3], rtol=1e-6)
    # excluding the own cluster: r_a2 = 1e-5 [a1 masked] + 1/3 -> a2 still; r_a1 = 1e-5 + 1
    picks, reg = usl.usl_select(X, MEAN_DIST, LABELS, 2, 2, 'imagenet', 2, 1.0, 0.0, 0.5, horizon_num=2,
                                exclude_same_cluster=True)
    np.testing.assert_allclose(reg.numpy()[:2], [1 + 1e-5, 1e-5 + 1 / 3], rtol=1e-6)
    # one pass = the reference's get_selection_without_reg: min mean distance per cluster
    assert usl.usl_select(X, MEAN_DIST, LABELS, 2, 2, 'imagenet', 1, 1.0, 0.0, 0.5)[0].tolist() == [0, 2]


def test_cluster_argmax_order_ties_and_empty_clusters():
    u = torch.tensor([1.0, 3.0, 3.0, 0.5, 2.0])
    labels = np.array([2, 0, 0, 2, 2])  # cluster 1 empty
    assert usl.cluster_argmax(u, labels, 3, 5).tolist() == [1, 4]   # tie in cluster 0 -> first index
    assert usl.cluster_argmax(u, labels, 3, 1).tolist() == [1]


# ------------------------------------------------------------------------------------------------------ recipes
def resolved(*argv, dataset='cifar10'):
    return usl.resolve_args(usl.parse_args(['--root', 'data', *[str(a) for a in argv]]), dataset)


def test_recipe_inferred_or_explicit_and_an_explicit_flag_wins():
    a = resolved()
    assert a.recipe == 'cifar10' and (a.backbone, a.knn_k, a.kmeans_iters, a.reg_mode, a.reg_lambda, a.reg_horizon) \
        == ('cifar_resnet18', 400, 200, 'cifar', 0.5, 4.0)
    a = resolved(dataset='cifar100')
    assert a.recipe == 'cifar100' and (a.reg_lambda, a.reg_alpha, a.reg_horizon) == (1.0, 1.0, 1.0)
    for name in ('imagenet', 'imagefolder', 'stanfordcars'):
        a = resolved(dataset=name)
        assert a.recipe == 'imagenet' and (a.backbone, a.knn_k, a.reg_mode, a.reg_horizon_num, a.reg_horizon) == \
            ('resnet50', 20, 'imagenet', 128, None)
    assert resolved(dataset='svhn').recipe == 'cifar10'
    a = resolved('--recipe', 'cifar100')  # explicit: CIFAR-100's column on CIFAR-10
    assert a.recipe == 'cifar100' and a.reg_lambda == 1.0
    # the USL-CLIP config: the imagenet recipe with four flags given
    a = resolved('--reg_lambda', 0.05, '--reg_alpha', 1, '--reg_horizon_num', 32, '--reg_exclude_same_cluster',
                 dataset='imagenet')
    assert (a.reg_lambda, a.reg_alpha, a.reg_horizon_num, a.reg_exclude_same_cluster, a.reg_iters, a.knn_k) == \
        (0.05, 1.0, 32, True, 2, 20)


def test_the_other_reg_mode_takes_its_variants_settings():
    # CIFAR-10 with the imagenet variant: the regulariser settings of the imagenet recipe, the kNN and k-means ones
    # of CIFAR-10's (the reference configs' split), an explicit flag still winning
    a = resolved('--reg_mode', 'imagenet', '--reg_lambda', 0.7)
    assert (a.recipe, a.reg_mode, a.reg_iters, a.reg_lambda, a.reg_momentum, a.reg_horizon_num) == \
        ('cifar10', 'imagenet', 2, 0.7, 0.0, 128)
    assert (a.knn_k, a.kmeans_iters, a.reg_horizon) == (400, 200, None)
    a = resolved('--reg_mode', 'cifar', dataset='imagenet')
    assert (a.reg_iters, a.reg_lambda, a.reg_momentum, a.reg_horizon, a.knn_k) == (10, 0.5, 0.9, 4.0, 20)
    with pytest.raises(UserError, match='--reg_horizon applies to --reg_mode cifar, not imagenet'):
        resolved('--reg_horizon', 1, dataset='imagenet')
    with pytest.raises(UserError, match='--reg_horizon_num applies to --reg_mode imagenet, not cifar'):
        resolved('--recipe', 'imagenet', '--reg_mode', 'cifar', '--reg_horizon_num', 8)


# -------------------------------------------------------------------------------------------- random baseline
# The lists published in the USL README ("Random indices on CIFAR-10"), torchvision CIFAR-10 train order.
PUBLISHED_RANDOM = {
    1: [26247, 35067, 34590, 16668, 12196, 2600, 9047, 2206, 25607, 11606, 3624, 43027, 15190, 25816, 26370, 1281,
        29433, 36256, 34217, 39950, 6756, 26652, 3991, 40312, 24580, 4949, 18783, 39205, 23784, 39508, 19062, 48140,
        11314, 766, 39319, 15299, 10298, 25573, 18750, 19298],
    2: [23656, 27442, 40162, 8459, 8051, 42404, 89, 1461, 13519, 42536, 20817, 45479, 3121, 36502, 40119, 35971, 8784,
        14084, 4063, 18730, 17763, 29366, 43841, 10741, 3986, 40475, 8470, 35621, 30892, 27652, 35359, 24435, 47853,
        8835, 6572, 36456, 8750, 21067, 4337, 24908],
    5: [24166, 42699, 15927, 7473, 5070, 33926, 21409, 9495, 16235, 35747, 46288, 13560, 29644, 28992, 35350, 43077,
        35757, 24106, 26555, 22478, 1951, 29145, 33373, 10043, 21988, 37116, 15760, 48939, 29761, 3702, 3273, 4175,
        30998, 31012, 8754, 33953, 22206, 28896, 31669, 19275],
}


@pytest.mark.parametrize('seed', [1, 2, 5])
def test_random_baseline_reproduces_published_cifar10_lists(seed):
    assert usl.random_select(50000, 40, seed).tolist() == PUBLISHED_RANDOM[seed]


def test_random_cifar100_list_extends_the_seed5_draw():
    # README: the CIFAR-100 random list is the seed-5 draw with 400; its first 40 are the CIFAR-10 seed-5 list
    assert usl.random_select(50000, 400, 5)[:40].tolist() == PUBLISHED_RANDOM[5]


# -------------------------------------------------------------------------------------------------- command line
def cld_checkpoint(path):
    """A CLD-format checkpoint (DDP 'module.' keys under 'model', NormedLinear 'linear.weight' 512 x 128)."""
    torch.manual_seed(0)
    net = backbones.build('cifar_resnet18')
    sd = {f'module.{k}': v for k, v in net.state_dict().items()}
    sd['module.linear.weight'] = torch.randn(512, 128)
    sd['module.groupDis.0.weight'] = torch.randn(512, 128)
    torch.save({'model': sd, 'epoch': 200}, path)
    return path


def moco_checkpoint(path):
    """A MoCo-v2/EMAN-format checkpoint for resnet18: 'module.encoder_q.*' with the fc.0/fc.2 projection head."""
    torch.manual_seed(0)
    net = backbones.build('resnet18')
    sd = {f'module.encoder_q.{k}': v for k, v in net.state_dict().items()}
    sd.update({'module.encoder_q.fc.0.weight': torch.randn(512, 512) * 0.05, 'module.encoder_q.fc.0.bias':
               torch.zeros(512), 'module.encoder_q.fc.2.weight': torch.randn(128, 512) * 0.05,
               'module.encoder_q.fc.2.bias': torch.zeros(128), 'module.encoder_k.conv1.weight': torch.zeros(1)})
    torch.save({'state_dict': sd}, path)
    return path


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('usl_cifar')
    root = write_cifar(tmp / 'cifar10', per_class_train=6)
    return root, cld_checkpoint(tmp / 'cld.pth'), tmp


def test_cli_cifar_end_to_end_cache_and_features(cifar, env, capsys):
    root, ckpt, tmp = cifar
    logdir = tmp / 'runs'
    # 12 clusters for 10 picks: on 60 images a cluster can empty out (the reference's 2501-for-2500 remedy)
    common = ['--root', root, '--dataset', 'cifar10', '--budget', 10, '--num_centroids', 12, '--knn_k', 5,
              '--kmeans_iters', 20,
              '--workers', 0, '--batch_size', 32, '--logdir', logdir, '--device', 'cpu']
    proc = run_script('usl.py', '--pretrained', ckpt, *common, env=env)
    assert_ok(proc)
    run = logdir / 'usl-cifar10-10-s1'
    picks = np.load(run / 'selected.npy')
    assert len(picks) == 10 == len(set(picks.tolist())) and picks.max() < 60
    train = datasets.load('cifar10', root, 'train')
    sel = splits.read_index_file(run / 'selected.csv', 60)
    rest = splits.read_index_file(run / 'unselected.csv', 60)
    assert sel.tolist() == sorted(picks.tolist()) and sorted(sel.tolist() + rest.tolist()) == list(range(60))
    assert (run / 'selected.csv').read_text().splitlines()[1] == f'{sel[0]},{train.ids[sel[0]]}'
    summary = json.loads((run / 'summary.json').read_text())
    counts = np.bincount(train.targets[picks], minlength=10)
    assert summary['class_counts'] == counts.tolist() and summary['class_coverage'] == int((counts > 0).sum())
    assert summary['feature_head'] == 'cld' and (run / 'selected.png').stat().st_size > 0
    feats = np.load(run / 'memory_feats_list.npy')
    assert feats.shape == (60, 128) and np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    assert (run / 'd_knns_5.npy').exists() and (run / 'cluster_labels_10_1.npy').exists()

    # a second run (in this process: no start-up cost) reuses every intermediate and selects the same images
    usl.main([str(a) for a in ['--pretrained', ckpt, *common, '--resume', 'auto']])
    assert capsys.readouterr().out.count('cache: reusing') == 3
    assert np.load(run / 'selected.npy').tolist() == picks.tolist()

    # the hand-off: debiaspl.py trains on the selection as written, no conversion
    proc = run_script('debiaspl.py', '--root', root, '--dataset', 'cifar10', '--trainindex_x', run / 'selected.csv',
                      '--max_iter', 1, '--batch_size', 4, '--mu', 1, '--backbone', 'wrn28_2', '--workers', 0,
                      '--device', 'cpu', '--logdir', logdir, '--run_name', 'debiaspl', env=env)
    assert_ok(proc)
    ck = torch.load(logdir / 'debiaspl' / 'checkpoint.pt', weights_only=True)
    assert sorted(ck['x_index'].tolist()) == sorted(picks.tolist())

    # the same features through --features give the same selection
    np.save(tmp / 'feats.npy', feats)
    usl.main([str(a) for a in ['--features', tmp / 'feats.npy', '--no-normalize', *common, '--run_name', 'f']])
    assert np.load(logdir / 'f' / 'selected.npy').tolist() == picks.tolist()
    # rows are L2-normalised by default: features scaled by 3 select the same images
    np.save(tmp / 'feats3.npy', 3 * feats)
    usl.main([str(a) for a in ['--features', tmp / 'feats3.npy', *common, '--run_name', 'f3']])
    assert np.load(logdir / 'f3' / 'selected.npy').tolist() == picks.tolist()


def test_cli_random_baseline(cifar, env):
    root, _, tmp = cifar
    proc = run_script('usl.py', '--root', root, '--selection', 'random', '--budget', 7, '--seed', 2, '--logdir',
                      tmp / 'runs', env=env)
    assert_ok(proc)
    picks = np.load(tmp / 'runs' / 'usl-cifar10-7-random-s2' / 'selected.npy')
    assert picks.tolist() == np.random.RandomState(2).choice(60, 7, replace=False).tolist()


def test_cli_imagenet_layout_folder(tmp_path, env):
    root = write_imagefolder(tmp_path / 'imagenet', num_classes=3, per_class_train=6, size=32, indexes=False)
    ckpt = moco_checkpoint(tmp_path / 'moco.pth.tar')
    proc = run_script('usl.py', '--root', root, '--dataset', 'imagenet', '--pretrained', ckpt, '--backbone',
                      'resnet18', '--image_size', 32, '--budget', 4, '--knn_k', 3, '--kmeans_iters', 10,
                      '--workers', 0, '--batch_size', 8, '--logdir', tmp_path / 'runs', env=env)
    assert_ok(proc)
    run = tmp_path / 'runs' / 'usl-imagenet-4-s1'
    args = json.loads((run / 'args.json').read_text())['flags']
    assert args['reg_mode'] == 'imagenet' and args['reg_horizon_num'] == 128 and args['reg_lambda'] == 1.5
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['feature_head'] == 'moco' and sum(summary['class_counts']) == 4
    lines = (run / 'selected.csv').read_text().splitlines()
    assert lines[0] == 'Index,ImageID' and len(lines) == 5
    train = datasets.load('imagenet', root, 'train')
    for line in lines[1:]:
        i, image_id = line.split(',')
        assert train.ids[int(i)] == image_id and image_id.startswith('n') and image_id.endswith('.JPEG')


def test_bad_budget_cli(cifar, env):
    root, _, tmp = cifar
    proc = run_script('usl.py', '--root', root, '--features', tmp / 'none.npy', '--budget', 0, '--logdir',
                      tmp / 'bad', env=env)
    assert_user_error(proc, '--budget 0', '1..60')
    assert not (tmp / 'bad').exists()


def main_error(*argv):
    """The UserError (one line) that usl.main raises for argv; entry() turns it into 'error: ...' and exit 2."""
    with pytest.raises(UserError) as e:
        usl.main([str(a) for a in argv])
    assert '\n' not in str(e.value)
    return str(e.value)


def test_bad_inputs(cifar, tmp_path):
    root, _, _ = cifar
    base = ['--root', root, '--logdir', tmp_path / 'runs', '--device', 'cpu']
    assert '--budget 61' in main_error(*base, '--selection', 'random', '--budget', 61)
    assert '--budget -1' in main_error(*base, '--selection', 'random', '--budget', -1)
    np.save(tmp_path / 'short.npy', np.random.rand(59, 16).astype(np.float32))
    msg = main_error(*base, '--features', tmp_path / 'short.npy', '--budget', 5, '--knn_k', 3)
    assert 'short.npy' in msg and '(59, 16)' in msg and '60 images' in msg
    msg = main_error(*base, '--budget', 5)
    assert '--pretrained' in msg and '--features' in msg
    assert '--reg_horizon_num' in main_error(*base, '--features', tmp_path / 'short.npy', '--reg_horizon_num', 3)
    assert '--knn_k 400' in main_error(*base, '--features', tmp_path / 'short.npy', '--budget', 5)
    assert '--num_centroids 4' in main_error(*base, '--features', tmp_path / 'short.npy', '--budget', 5,
                                             '--num_centroids', 4)


def test_torchrun_two_processes_embed_in_dataset_order(cifar, env):
    root, ckpt, tmp = cifar
    proc = run_script('usl.py', '--root', root, '--dataset', 'cifar10', '--pretrained', ckpt, '--budget', 6,
                      '--num_centroids', 8, '--knn_k', 4, '--kmeans_iters', 5, '--workers', 0, '--batch_size', 16,
                      '--logdir', tmp / 'runs', '--run_name', 'ddp', torchrun=2, env=env)
    assert_ok(proc)
    feats = np.load(tmp / 'runs' / 'ddp' / 'memory_feats_list.npy')
    # the same network on one process, in dataset order
    from common.distributed import Dist
    net = usl.FeatureNet(backbones.build('cifar_resnet18', pretrained=str(ckpt)))
    train = datasets.load('cifar10', root, 'train')
    train.transform = usl.eval_transform('cifar10', None)
    args = usl.parse_args(['--root', str(root), '--batch_size', '16', '--workers', '0'])
    ref = usl.extract_features(net, train, args, Dist(0, 1, 0, torch.device('cpu'), True))
    np.testing.assert_allclose(feats, ref, atol=1e-4)
    assert len(np.load(tmp / 'runs' / 'ddp' / 'selected.npy')) == 6


def test_a_selection_is_not_overwritten_and_resume_auto_selects_again(cifar, tmp_path):
    root, _, _ = cifar
    np.save(tmp_path / 'feats.npy', np.random.RandomState(0).randn(60, 8).astype(np.float32))
    flags = ['--root', root, '--features', tmp_path / 'feats.npy', '--knn_k', 5, '--kmeans_iters', 10,
             '--num_centroids', 8, '--logdir', tmp_path, '--run_name', 'sel', '--device', 'cpu']
    assert_ok(cli(usl.main, *flags, '--budget', 5))
    folder = tmp_path / 'sel'
    before = snapshot(folder)
    assert_user_error(cli(usl.main, *flags, '--budget', 6), 'sel already holds a run', '--resume auto')
    assert snapshot(folder) == before
    # no checkpoint to continue: --resume auto selects again from the cached intermediates, replacing the outputs
    proc = cli(usl.main, *flags, '--budget', 6, '--resume', 'auto')
    assert_ok(proc)
    assert f"cache: reusing {folder / 'd_knns_5.npy'}" in proc.stdout.splitlines()
    picks = np.load(folder / 'selected.npy')
    assert len(picks) == 6 and splits.read_index_file(folder / 'selected.csv', 60).tolist() == sorted(picks)
    assert json.loads((folder / 'summary.json').read_text())['num_selected'] == 6
    assert json.loads((folder / 'args.json').read_text())['flags']['budget'] == 6


def test_bad_feature_and_checkpoint_files_are_one_line_and_leave_no_run_folder(cifar, tmp_path):
    root, _, _ = cifar
    base = ['--root', root, '--dataset', 'cifar10', '--budget', 5, '--knn_k', 3, '--logdir', tmp_path,
            '--run_name', 'r', '--device', 'cpu', '--workers', 0]
    (tmp_path / 'f.csv').write_text('0.1,0.2\n' * 60)
    assert_user_error(cli(usl.main, *base, '--features', tmp_path / 'f.csv'),
                      '--features', 'f.csv is not a NumPy array file', 'N x D array of numbers', '.npy')
    np.save(tmp_path / 'text.npy', np.array(['a'] * 60))
    assert_user_error(cli(usl.main, *base, '--features', tmp_path / 'text.npy'), 'text.npy holds no array of numbers')
    assert_user_error(cli(usl.main, *base, '--pretrained', tmp_path / 'missing.pth'),
                      'checkpoint not found', 'missing.pth')
    torch.save(backbones.build('resnet18').state_dict(), tmp_path / 'resnet18.pth')
    assert_user_error(cli(usl.main, *base, '--pretrained', tmp_path / 'resnet18.pth'),
                      'resnet18.pth looks like a checkpoint for another network, not cifar_resnet18')
    assert not (tmp_path / 'r').exists()


def test_a_classifier_fc_is_not_taken_for_a_projection_head(cifar, tmp_path):
    root, _, _ = cifar
    torch.manual_seed(0)
    sd = backbones.build('cifar_resnet18').state_dict()
    sd.update({'fc.weight': torch.randn(10, 512), 'fc.bias': torch.zeros(10)})  # a supervised CIFAR-10 model
    torch.save(sd, tmp_path / 'supervised.pth')
    proc = cli(usl.main, '--root', root, '--dataset', 'cifar10', '--pretrained', tmp_path / 'supervised.pth',
               '--budget', 5, '--knn_k', 3, '--kmeans_iters', 5, '--workers', 0, '--logdir', tmp_path,
               '--run_name', 'r', '--device', 'cpu')
    assert_ok(proc)
    assert f"note: the 'fc' of {tmp_path / 'supervised.pth'} (10 x 512) is a classifier, not a projection head: " \
        'embedding with the L2-normalised pooled feature' in proc.stdout.splitlines()
    assert json.loads((tmp_path / 'r' / 'summary.json').read_text())['feature_head'] == 'none'
    assert np.load(tmp_path / 'r' / 'memory_feats_list.npy').shape == (60, 512)
    # the one linear fc of a MoCo v1 query encoder is its projection
    moco = {f'module.encoder_q.{k}': v for k, v in sd.items()}
    torch.save({'state_dict': moco}, tmp_path / 'moco_v1.pth')
    net = usl.FeatureNet(backbones.build('cifar_resnet18', pretrained=str(tmp_path / 'moco_v1.pth')))
    assert net.head_name == 'moco' and net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
