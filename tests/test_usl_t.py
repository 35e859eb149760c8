"""usl_t.py: the local and global losses on hand-made logits, re-seeding, selection rules, the command line."""
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import usl_t
from common import UserError, backbones, datasets, splits
from conftest import assert_ok, assert_user_error, run_script, script_env
from fakedata import write_cifar, write_imagefolder
from runhelpers import cli, snapshot


def test_sharpen():
    # [0.5, 0.25, 0.25] ^ (1 / 0.5) = [0.25, 0.0625, 0.0625] / 0.375 = [2/3, 1/6, 1/6]
    out = usl_t.sharpen(torch.tensor([[0.5, 0.25, 0.25]]), 0.5)
    torch.testing.assert_close(out, torch.tensor([[2 / 3, 1 / 6, 1 / 6]]))


def test_local_loss_logit_adjustment_sharpening_and_marginal():
    loss = usl_t.LocalLoss(num_clusters=2, num_heads=1, adjustment_weight=1.0, sharpen_temperature=0.5)
    loss.prob_ema[0] = torch.tensor([0.8, 0.2])
    anchors = torch.tensor([[math.log(3), 0.0]])    # softmax [0.75, 0.25]
    neighbors = torch.tensor([[0.0, 0.0]])           # softmax [0.5, 0.5]
    # target: softmax(z_n - log pi) = softmax(-log 0.8, -log 0.2) ∝ [1.25, 5] = [0.2, 0.8];
    # sharpened (T 0.5): [0.04, 0.64] / 0.68 = [1/17, 16/17]
    # KL = 1/17 log((1/17) / 0.75) + 16/17 log((16/17) / 0.25) = -0.149737 + 1.247689 = 1.097952
    value = loss(0, anchors, neighbors)
    assert value.item() == pytest.approx(1 / 17 * math.log(1 / 17 / 0.75) + 16 / 17 * math.log(16 / 17 / 0.25),
                                         abs=1e-6)
    assert value.item() == pytest.approx(1.097952, abs=1e-5)
    # marginal, updated after the target: 0.5 [0.8, 0.2] + 0.5 [0.5, 0.5] = [0.65, 0.35]
    torch.testing.assert_close(loss.prob_ema[0], torch.tensor([0.65, 0.35]))
    # uniform marginal, T = 1: target = softmax(z_n) = [0.5, 0.5]; KL = 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25)
    plain = usl_t.LocalLoss(2, 1, adjustment_weight=5.0, sharpen_temperature=1.0)
    assert plain(0, anchors, neighbors).item() == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2), abs=1e-6)


# weak probabilities: [.95, .05], [.95, .05], [.05, .95] pass a 0.9 threshold, [.6, .4] does not;
# strong views: rows 0 and 2 logits [log 3, 0] (softmax [.75, .25]), row 1 [0, 0]
WEAK = torch.tensor([[math.log(19), 0.0], [math.log(19), 0.0], [0.0, math.log(19)], [math.log(1.5), 0.0]])
STRONG = torch.tensor([[math.log(3), 0.0], [0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]])
CE = [-math.log(0.75), math.log(2), -math.log(0.25)]   # per masked row: 0.287682, 0.693147, 1.386294


def global_loss(**kw):
    cfg = dict(threshold=0.9, reweight=True, reweight_renorm=False, mean_outside_mask=False, num_clusters=2,
               num_heads=1)
    cfg.update(kw)
    return usl_t.GlobalLoss(**cfg)(0, WEAK, STRONG).item()


def test_global_loss_reweighting_by_hand():
    # n = 3 masked; counts: cluster 0 twice, cluster 1 once -> reweight w = n / count = [1.5, 3]
    # sum w*CE / sum w = (1.5 * 0.287682 + 1.5 * 0.693147 + 3 * 1.386294) / 6 = 0.938354
    # = the mean over clusters of their mean CE: ((0.287682 + 0.693147) / 2 + 1.386294) / 2
    assert global_loss() == pytest.approx((1.5 * CE[0] + 1.5 * CE[1] + 3 * CE[2]) / 6, abs=1e-6)
    assert global_loss() == pytest.approx(0.938354, abs=1e-5)
    # no re-weighting: the mean CE of the masked rows (plain confidence-based self-labelling)
    assert global_loss(reweight=False) == pytest.approx(sum(CE) / 3, abs=1e-6)
    # divided by the batch size (4) instead of the weight sum
    assert global_loss(mean_outside_mask=True) == pytest.approx((1.5 * CE[0] + 1.5 * CE[1] + 3 * CE[2]) / 4, abs=1e-6)
    # renorm: w = n / (U count) = [0.75, 1.5]; scale-free with the weight-sum normalisation
    assert global_loss(reweight_renorm=True) == pytest.approx(global_loss(), abs=1e-6)
    assert global_loss(reweight_renorm=True, mean_outside_mask=True) == \
        pytest.approx((0.75 * CE[0] + 0.75 * CE[1] + 1.5 * CE[2]) / 4, abs=1e-6)
    # nothing confident: 0
    assert global_loss(threshold=0.99) == 0.0


def test_global_loss_count_ema():
    g = usl_t.GlobalLoss(0.9, False, False, True, 2, 1, count_ema=True, data_len=300)
    g(0, WEAK, STRONG)
    # bincount [2, 1] / 3 * 300 = [200, 100]; 0.9 * [0.5, 0.5] + 0.1 * [200, 100] = [20.45, 10.45]
    torch.testing.assert_close(g.count_ema[0], torch.tensor([20.45, 10.45]))


_COUNTS_UNDER_TORCHRUN = """
import math
import torch
import usl_t
from common import distributed

d = distributed.init("cpu")
g = usl_t.GlobalLoss(0.9, False, False, True, 2, 1, count_ema=True, data_len=300)
confident = [[math.log(19), 0.0], [math.log(19), 0.0]] if d.rank == 0 else [[0.0, math.log(19)], [math.log(1.5), 0.0]]
g(0, torch.tensor(confident), torch.zeros(2, 2))
print(f"rank {d.rank} {[round(v, 4) for v in g.count_ema[0].tolist()]}")
distributed.shutdown()
"""


def test_cluster_counts_are_pooled_over_the_ranks(tmp_path):
    # WEAK's four rows split over two gloo processes: both ranks end with test_global_loss_count_ema's EMA of the
    # pooled counts, so both re-seed the same clusters (alone, rank 0 would count [300, 0] and rank 1 [0, 300])
    script = tmp_path / 'counts.py'
    script.write_text(_COUNTS_UNDER_TORCHRUN)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(script)], env=script_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the two ranks' lines may share one line of the launcher's output
    lines = sorted(re.findall(r'rank \d \[[^]]*\]', proc.stdout))
    assert lines == ['rank 0 [20.45, 10.45]', 'rank 1 [20.45, 10.45]'], proc.stdout


def test_reassign_clusters():
    head = torch.nn.Linear(3, 3)
    counts = torch.tensor([50.0, 2000.0, 500.0])
    assert usl_t.reassign_clusters(head, counts, 100, 1000)
    torch.testing.assert_close(head.weight[0], head.weight[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(counts, torch.tensor([1000.0, 1000.0, 500.0]))
    assert not usl_t.reassign_clusters(head, counts, 100, 1000)


def test_reassign_clusters_moves_only_when_both_bounds_are_crossed_with_the_generators_noise():
    head = torch.nn.Linear(3, 3)
    w0 = head.weight.detach().clone()
    counts = torch.tensor([500.0, 2000.0, 700.0])  # the smallest is not below 100: no move, nothing written
    assert not usl_t.reassign_clusters(head, counts, 100, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(head.weight, w0) and counts.tolist() == [500.0, 2000.0, 700.0]
    counts = torch.tensor([50.0, 2000.0, 500.0])
    assert usl_t.reassign_clusters(head, counts, 100, 1000, torch.Generator().manual_seed(1))
    noise = torch.randn(1, 3, generator=torch.Generator().manual_seed(1))[0] * 1e-7
    assert torch.equal(head.weight[0], w0[1] - noise) and torch.equal(head.weight[1], w0[1] + noise)
    assert torch.equal(head.weight[2], w0[2]) and counts.tolist() == [1000.0, 1000.0, 500.0]


def test_select_cifar_confidence_and_empty_cluster():
    # head 0 predicts clusters [0, 0, 1, 1, 0]; cluster 2 is empty
    p0 = torch.tensor([[.6, .3, .1], [.8, .1, .1], [.2, .7, .1], [.1, .5, .4], [.5, .4, .1]])
    p1 = torch.tensor([[.9, .05, .05], [.4, .3, .3], [.3, .6, .1], [.2, .6, .2], [.5, .3, .2]])
    probs = torch.stack([p0, p1])
    # mean over heads of their max: [.75, .6, .65, .55, .5]; cluster 0 -> image 0 (.75), cluster 1 -> image 2
    picks, pred, conf = usl_t.select_cifar(probs, 0, 3, use_mean_prob=True)
    assert picks.tolist()[:2] == [0, 2] and pred.tolist() == [0, 0, 1, 1, 0]
    assert picks.tolist()[2] == 1      # empty cluster 2: the second best of cluster 0 fills the budget
    # head 0 alone: [.6, .8, .7, .5, .5] -> cluster 0 -> image 1
    assert usl_t.select_cifar(probs, 0, 2, use_mean_prob=False)[0].tolist() == [1, 2]


def test_select_imagenet_largest_clusters_densest_and_pseudo_labels():
    pred = np.array([2, 2, 2, 0, 0, 1])
    mean_dist = np.array([0.3, 0.1, 0.2, 0.5, 0.4, 0.1])
    targets = np.array([7, 8, 9, 3, 4, 5])
    q, idx, lab = usl_t.select_imagenet(pred, mean_dist, targets, budget=2, per_cluster=2)
    # largest clusters: 2 (3 images), then 0 (2); densest: image 1 (label 8) and image 4 (label 4)
    assert q.tolist() == [1, 4]
    assert idx.tolist() == [1, 2, 4, 3] and lab.tolist() == [8, 8, 4, 4]


def test_knn_ids_first_column_is_self():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    ids = usl_t.knn_ids(x, 2)
    assert ids.tolist() == [[0, 1], [1, 0], [2, 3], [3, 2]]


def test_the_schedule_epochs_stretch_to_max_iter():
    # no --max_iter: total = epochs x steps per epoch, the schedule's epochs are passes over the data (3 steps each)
    assert [usl_t.schedule_epoch(s, 2 * 3, 2) for s in range(6)] == [s // 3 for s in range(6)] == [0, 0, 0, 1, 1, 1]
    # --max_iter 10 with --epochs 2: two epochs of 5 iterations, whatever the data's pass length
    assert [usl_t.schedule_epoch(s, 10, 2) for s in range(10)] == [0] * 5 + [1] * 5


def test_recipe_inferred_or_explicit_and_an_explicit_flag_wins():
    def resolved(*argv, dataset='cifar10'):
        return usl_t.resolve_args(usl_t.parse_args(['--root', 'data', *[str(a) for a in argv]]), dataset)

    a = resolved('--budget', 40)
    assert a.recipe == 'cifar10' and (a.backbone, a.epochs, a.batch_size, a.head, a.num_clusters, a.use_mean_prob,
                                      a.mean_outside_mask, a.selection_mode) == \
        ('cifar_resnet18', 200, 1024, 'linear', 40, True, False, 'cifar')
    a = resolved(dataset='cifar100')
    assert a.recipe == 'cifar100' and (a.use_mean_prob, a.mean_outside_mask) == (False, True)
    a = resolved('--budget', 2911, dataset='imagenet')
    assert a.recipe == 'imagenet' and (a.backbone, a.head, a.num_clusters, a.update_head_only, a.reassign_after_steps,
                                       a.selection_mode) == ('resnet50', 'normed', 3000, True, 1250, 'imagenet')
    a = resolved('--recipe', 'imagenet', '--backbone', 'wrn28_2', '--num_clusters', 50, '--no-update_head_only')
    assert (a.recipe, a.backbone, a.num_clusters, a.update_head_only, a.head) == ('imagenet', 'wrn28_2', 50, False,
                                                                                 'normed')


# -------------------------------------------------------------------------------------------------- command line
@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('uslt_cifar')
    return write_cifar(tmp / 'cifar10', per_class_train=3, per_class_test=1), tmp


SMALL = ['--dataset', 'cifar10', '--budget', 4, '--backbone', 'wrn28_2', '--batch_size', 8, '--num_neighbors', 3,
         '--workers', 0, '--device', 'cpu', '--deterministic', '--eval_interval', 1]


# with re-seeding at every step (bounds every count crosses): its noise stream must resume too
@pytest.mark.parametrize('reseeding', [[], ['--reassign_after_steps', 0, '--count_ema_min', 1e9,
                                              '--count_ema_max', -1]], ids=['plain', 'reseeding'])
def test_cli_cifar_resume_equals_uninterrupted(cifar, env, reseeding):
    root, tmp = cifar
    logdir = tmp / ('runs-reseeding' if reseeding else 'runs')
    # a schedule that matters: the global loss from epoch 1 of 2, i.e. from iteration 3 of 4 (--max_iter stretches
    # the epochs to 2 iterations each); --stop_after keeps it, where a 2-iteration run would start it at iteration 2
    flags = [*SMALL, '--max_iter', 4, '--epochs', 2, '--global_start_epoch', 1, '--logdir', logdir, *reseeding]
    full = run_script('usl_t.py', '--root', root, *flags, '--run_name', 'full', env=env)
    assert_ok(full)
    half = run_script('usl_t.py', '--root', root, *flags, '--stop_after', 2, '--run_name', 'cut', env=env)
    assert_ok(half)
    assert '[cut] stopped after iteration 2 of 4 (--stop_after); continue with --resume auto' in half.stdout
    assert torch.load(logdir / 'cut' / 'checkpoint.pt', weights_only=True)['step'] == 2
    assert not (logdir / 'cut' / 'selected.npy').exists() and not (logdir / 'cut' / 'summary.json').exists()
    rest = run_script('usl_t.py', '--root', root, *flags, '--run_name', 'cut', '--resume', 'auto', env=env)
    assert_ok(rest)
    a = torch.load(logdir / 'full' / 'checkpoint.pt', weights_only=True)
    b = torch.load(logdir / 'cut' / 'checkpoint.pt', weights_only=True)
    assert a['step'] == b['step'] == 4
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert torch.equal(a['local_loss']['prob_ema'], b['local_loss']['prob_ema'])
    assert np.load(logdir / 'full' / 'selected.npy').tolist() == np.load(logdir / 'cut' / 'selected.npy').tolist()
    sel = splits.read_index_file(logdir / 'full' / 'selected.csv', 30)
    assert len(sel) == 4
    summary = json.loads((logdir / 'full' / 'summary.json').read_text())
    assert sum(summary['class_counts']) == 4 and summary['iters'] == 4
    metrics = [json.loads(l) for l in (logdir / 'full' / 'metrics.jsonl').read_text().splitlines()]
    assert [m['iter'] for m in metrics] == [1, 2, 3, 4] and all(0 <= m['top1'] <= 100 for m in metrics)


def test_cli_imagenet_recipe_pseudo_labels(tmp_path, env):
    root = write_imagefolder(tmp_path / 'imagenet', num_classes=3, per_class_train=4, per_class_val=1, size=32,
                             indexes=False)
    torch.manual_seed(0)
    net = backbones.build('resnet18')
    sd = {f'module.encoder_q.{k}': v for k, v in net.state_dict().items()}
    sd.update({'module.encoder_q.fc.0.weight': torch.randn(64, 512) * 0.05, 'module.encoder_q.fc.0.bias':
               torch.zeros(64), 'module.encoder_q.fc.2.weight': torch.randn(16, 64) * 0.1,
               'module.encoder_q.fc.2.bias': torch.zeros(16)})
    torch.save({'state_dict': sd}, tmp_path / 'moco.pth.tar')
    proc = run_script('usl_t.py', '--root', root, '--dataset', 'imagenet', '--pretrained', tmp_path / 'moco.pth.tar',
                      '--backbone', 'resnet18', '--image_size', 32, '--budget', 3, '--num_clusters', 5,
                      '--batch_size', 6, '--max_iter', 2, '--num_neighbors', 2, '--knn_k', 3, '--pseudo_per_cluster',
                      2, '--workers', 0, '--reassign_after_steps', 0, '--logdir', tmp_path / 'runs', env=env)
    assert_ok(proc)
    run = tmp_path / 'runs' / 'usl_t-imagenet-3-s42'
    args = json.loads((run / 'args.json').read_text())['flags']
    assert args['head'] == 'normed' and args['update_head_only'] and args['adjustment_weight'] == 2.5
    ck = torch.load(run / 'checkpoint.pt', weights_only=True)
    train = datasets.load('imagenet', root, 'train')
    # heads only: the backbone is the checkpoint's
    torch.testing.assert_close(ck['model']['backbone.conv1.weight'], net.conv1.weight)
    lines = (run / 'pseudo_labels.csv').read_text().splitlines()
    assert lines[0] == 'Index,ImageID,PseudoLabel'
    idx, labels, _ = splits.read_pseudo_label_csv(run / 'pseudo_labels.csv', len(train), 3)
    queried = np.load(run / 'selected.npy')
    assert set(queried.tolist()) <= set(idx.tolist()) and 1 <= len(queried) <= 3


def test_bad_inputs(cifar, tmp_path):
    root, _ = cifar

    def error(*argv):
        with pytest.raises(UserError) as e:
            usl_t.main([str(a) for a in argv])
        return str(e.value)

    base = ['--root', root, '--logdir', tmp_path / 'runs', '--device', 'cpu', '--workers', 0]
    assert '--budget 0' in error(*base, '--budget', 0)
    assert '--budget 31' in error(*base, '--budget', 31)
    np.save(tmp_path / 'nb.npy', np.zeros((29, 21), dtype=np.int64))
    msg = error(*base, '--budget', 4, '--backbone', 'wrn28_2', '--neighbors', tmp_path / 'nb.npy')
    assert 'nb.npy' in msg and '(29, 21)' in msg and '30 rows' in msg


# ---------------------------------------------------------------------------------------------- the run folder
def tiny(root, logdir, *extra):
    return ['--root', root, *SMALL, '--max_iter', 2, '--logdir', logdir, '--run_name', 'r', *extra]


@pytest.fixture(scope='module')
def finished(cifar):
    """A finished two-iteration run (its checkpoint at iteration 2), made in this process."""
    root, tmp = cifar
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_ok(cli(usl_t.main, *tiny(root, tmp / 'finished')))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return tmp / 'finished' / 'r'


@pytest.mark.filterwarnings('error:Converting a tensor with requires_grad')
def test_training_raises_no_requires_grad_warning(cifar, tmp_path, one_thread):
    root, _ = cifar
    assert_ok(cli(usl_t.main, *tiny(root, tmp_path)))


def test_refused_resume_leaves_the_folder_byte_identical(cifar, finished, tmp_path, one_thread):
    root, _ = cifar
    folder = shutil.copytree(finished, tmp_path / 'r')
    flags = [*tiny(root, tmp_path), '--resume', 'auto']

    def refused(*extra, fragments):
        before = snapshot(folder)
        assert_user_error(cli(usl_t.main, *flags, *extra), *fragments)
        assert snapshot(folder) == before

    refused('--budget', 5, fragments=['was made with --budget 4', 'asks for --budget 5'])
    refused('--backbone', 'cifar_resnet18', fragments=['--backbone wrn28_2', '--backbone cifar_resnet18'])
    refused('--num_neighbors', 2, fragments=['--num_neighbors 3', '--num_neighbors 2'])
    # a checkpoint of this script whose heads do not fit: one line, not a state-dict traceback
    state = torch.load(folder / 'checkpoint.pt', weights_only=True)
    state['model']['heads.0.weight'] = torch.zeros(2, 128)
    torch.save(state, folder / 'checkpoint.pt')
    refused(fragments=["the checkpoint's model does not fit", 'size mismatch for heads.0.weight'])
    # a re-seeding stream of the wrong size: the same one line
    state = torch.load(finished / 'checkpoint.pt', weights_only=True)
    state['reseed_rng'] = torch.zeros(3, dtype=torch.uint8)
    torch.save(state, folder / 'checkpoint.pt')
    refused(fragments=["the checkpoint's reseed_rng does not fit", 'shape (3,)'])
    # another script's checkpoint (it holds no neighbours) is refused before anything reads it
    torch.save({'script': 'usl', 'flags': {}, 'run': {'evals': [{'iter': 9, 'top1': 1.0}]}}, folder / 'checkpoint.pt')
    refused(fragments=['checkpoint.pt was written by usl.py', 'this is usl_t.py'])


def test_resume_reports_the_learning_rate_it_keeps(cifar, finished, tmp_path, one_thread):
    root, _ = cifar
    shutil.copytree(finished, tmp_path / 'r')
    proc = cli(usl_t.main, *tiny(root, tmp_path), '--resume', 'auto', '--lr', 1e-3)
    assert_ok(proc)
    assert "[r] resuming keeps the checkpoint's --lr 0.0001 (asked: --lr 0.001); start a new --run_name to change " \
        'them' in proc.stdout.splitlines()


def test_nan_loss_names_the_iteration_of_the_logs(cifar, tmp_path, one_thread):
    root, _ = cifar
    # the first step moves the weights by ~10 x lr = 1e38: the second loss is not finite
    proc = cli(usl_t.main, *tiny(root, tmp_path, '--lr', 1e37))
    assert_user_error(proc, 'the loss is nan at iteration 2', 'lower --lr')
    assert '[r] iter 1/2' in proc.stdout and 'iter 2/2' not in proc.stdout


def test_bad_inputs_leave_no_run_folder(cifar, tmp_path, one_thread):
    root, _ = cifar
    assert_user_error(cli(usl_t.main, *tiny(root, tmp_path, '--lr', 1e38)),
                      '--lr 1e+38 must lie in [0, 3.4e+37)', 'float32')
    assert_user_error(cli(usl_t.main, *tiny(root, tmp_path, '--pretrained', tmp_path / 'missing.pth')),
                      'checkpoint not found', 'missing.pth')
    torch.save(backbones.build('resnet18').state_dict(), tmp_path / 'resnet18.pth')
    assert_user_error(cli(usl_t.main, *tiny(root, tmp_path, '--pretrained', tmp_path / 'resnet18.pth')),
                      'resnet18.pth looks like a checkpoint for another network, not wrn28_2')
    assert not (tmp_path / 'r').exists()
