"""common/backbones.py: shapes, module names, parameter counts, and every pretrained checkpoint layout."""
import argparse

import pytest
import torch
import torch.nn as nn
import torchvision

from common import UserError
from common import backbones
from common.backbones import build
from common.run import load_file

torch.set_num_threads(1)
CIFAR_NETS = ('wrn28_2', 'wrn28_8', 'wrn28_10', 'convlarge', 'cifar_resnet18')


# ---------------------------------------------------------------------------------------------------- shapes, names
@pytest.mark.parametrize('name,size,dim', [
    ('resnet18', 32, 512), ('resnet50', 32, 2048), ('efficientnet_b2', 32, 1408), ('wrn28_2', 32, 128),
    ('wrn28_8', 32, 512), ('convlarge', 32, 128), ('cifar_resnet18', 32, 512)])
def test_forward_shape(name, size, dim):
    torch.manual_seed(0)
    model = build(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert model.feature_dim == dim
    assert out.shape == (2, dim)
    assert model.pretrained_extra == {}


def test_resnet18_64px_train_mode_backward():
    model = build('resnet18')
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 512) and model.conv1.weight.grad is not None


@pytest.mark.parametrize('name,dim', [('resnet34', 512), ('resnet101', 2048), ('resnet152', 2048), ('wrn28_10', 640)])
def test_construction_feature_dim(name, dim):
    model = build(name)
    assert model.feature_dim == dim
    assert not any(k.startswith(('fc.', 'classifier.')) for k in model.state_dict())


def test_every_name_builds_and_unknown_name_refused():
    assert set(backbones.NAMES) >= {'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'efficientnet_b2',
                                    'wrn28_2', 'wrn28_8', 'convlarge', 'cifar_resnet18'}
    with pytest.raises(UserError, match='unknown backbone'):
        build('resnet19')


def test_convlarge_parameter_count_and_layers():
    model = build('convlarge')
    n = sum(p.numel() for p in model.parameters())
    # convs 3*128*9 + 2*128*128*9 + 128*256*9 + 2*256*256*9 + 256*512*9 + 512*256 + 256*128 = 3,116,416;
    # BN (weight+bias) 2*(3*128 + 3*256 + 512 + 256 + 128) = 4,096 -> 3,120,512; + Linear(128, 10) 1,290 = 3,121,802.
    assert n == 3_120_512
    assert n + sum(p.numel() for p in nn.Linear(128, 10).parameters()) == 3_121_802
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)} == {0.1}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.padding[0] for m in convs][-3:] == [0, 0, 0] and len(convs) == 9
    # 32 -> pool 16 -> pool 8 -> 3x3 valid conv 6: check through a hook on the last block.
    shapes = []
    model.block3.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    model.eval()(torch.randn(1, 3, 32, 32))
    assert shapes == [(1, 128, 6, 6)]
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout2d)]
    assert len(drops) == 1 and drops[0].p == 0.5  # one shared pool/dropout module


def test_wrn_names_params_and_options():
    model = build('wrn28_2')
    keys = model.state_dict().keys()
    for k in ('conv1.weight', 'block1.layer.0.bn1.weight', 'block1.layer.0.conv1.weight',
              'block1.layer.0.convShortcut.weight', 'block2.layer.0.convShortcut.weight', 'block3.layer.3.bn2.running_var',
              'block3.layer.3.conv2.weight', 'bn1.weight', 'bn1.running_mean'):
        assert k in keys, k
    assert 'block1.layer.1.convShortcut.weight' not in keys
    # WRN-28-2 with a 10-way fc has 1,467,610 parameters; without it 1,467,610 - (128*10 + 10) = 1,466,320.
    assert sum(p.numel() for p in model.parameters()) == 1_466_320
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    fixmatch = build('wrn28_2', bn_momentum=0.001, relu_slope=0.1)
    assert {m.momentum for m in fixmatch.modules() if isinstance(m, nn.BatchNorm2d)} == {0.001}
    assert fixmatch(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    # original init: conv ~ N(0, 2/(k*k*C_out)) -> std of block3's 3x3 128->128 conv = sqrt(2/1152) = 0.0417
    std = model.block3.layer[1].conv1.weight.std().item()
    assert abs(std - (2 / 1152) ** 0.5) < 0.003


def test_cifar_resnet18_names():
    keys = build('cifar_resnet18').state_dict().keys()
    for k in ('conv1.weight', 'bn1.weight', 'layer1.0.conv1.weight', 'layer1.1.bn2.bias', 'layer2.0.shortcut.0.weight',
              'layer2.0.shortcut.1.running_mean', 'layer4.1.conv2.weight'):
        assert k in keys, k
    assert 'layer1.0.shortcut.0.weight' not in keys
    assert build('cifar_resnet18').conv1.kernel_size == (3, 3)


# ---------------------------------------------------------------------------------------------- pretrained formats
def randomized(state, seed):
    """Every tensor of a state dict replaced by random values (so BN buffers differ from a fresh model's too)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.randint(0, 9, v.shape, generator=g))
            for k, v in state.items()}


def assert_loaded(model, expected):
    own = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(own[k], v), k


def test_torchvision_plain_state_dict(tmp_path):
    for name, full in (('resnet18', torchvision.models.resnet18()), ('efficientnet_b2', torchvision.models.efficientnet_b2())):
        sd = randomized(full.state_dict(), 1)
        path = tmp_path / f'{name}.pth'
        torch.save(sd, path)
        model = build(name, pretrained=str(path))
        head = {'resnet18': ('fc.weight', 'fc.bias'), 'efficientnet_b2': ('classifier.1.weight', 'classifier.1.bias')}[name]
        assert_loaded(model, {k: v for k, v in sd.items() if k not in head})
        assert sorted(model.pretrained_extra) == sorted(head)
        assert torch.equal(model.pretrained_extra[head[0]], sd[head[0]])


def test_legacy_file_without_num_batches_tracked(tmp_path):
    sd = randomized(torchvision.models.resnet18().state_dict(), 2)
    sd = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
    torch.save(sd, tmp_path / 'old.pth')
    model = build('resnet18', pretrained=tmp_path / 'old.pth')
    assert_loaded(model, {k: v for k, v in sd.items() if not k.startswith('fc.')})


def moco_checkpoint(backbone_sd, dim, outer='module.'):
    """MoCo v2 / MoCo-EMAN layout: encoder_q with the 2-layer MLP head fc.0/fc.2, encoder_k, queue, epoch, optimizer."""
    head = {'fc.0.weight': torch.randn(dim, dim), 'fc.0.bias': torch.randn(dim),
            'fc.2.weight': torch.randn(128, dim), 'fc.2.bias': torch.randn(128)}
    sd = {}
    for k, v in {**backbone_sd, **head}.items():
        sd[f'{outer}encoder_q.{k}'] = v
        sd[f'{outer}encoder_k.{k}'] = v + 1  # differs, so loading the key encoder by mistake would show
    sd[f'{outer}queue'] = torch.randn(128, 16)
    sd[f'{outer}queue_ptr'] = torch.zeros(1, dtype=torch.long)
    return {'epoch': 800, 'arch': 'resnet50', 'state_dict': sd, 'optimizer': {'state': {}, 'param_groups': []}}, head


@pytest.mark.parametrize('outer', ['module.', ''])
def test_moco_v2_and_eman_layout(tmp_path, outer):
    body = randomized(build('resnet18').state_dict(), 3)
    ckpt, head = moco_checkpoint(body, 512, outer)
    torch.save(ckpt, tmp_path / 'moco.pth.tar')
    model = build('resnet18', pretrained=tmp_path / 'moco.pth.tar')
    assert_loaded(model, body)
    assert sorted(model.pretrained_extra) == sorted(head)  # no encoder_k, no queue
    for k, v in head.items():
        assert torch.equal(model.pretrained_extra[k], v)
    assert model.pretrained_report['prefix'] == f'{outer}encoder_q.'


def test_moco_v1_head(tmp_path):
    body = randomized(build('resnet18').state_dict(), 4)
    sd = {f'module.encoder_q.{k}': v for k, v in body.items()}
    sd['module.encoder_q.fc.weight'] = torch.randn(128, 512)
    sd['module.encoder_q.fc.bias'] = torch.randn(128)
    torch.save({'state_dict': sd, 'epoch': 200}, tmp_path / 'v1.pth.tar')
    model = build('resnet18', pretrained=tmp_path / 'v1.pth.tar')
    assert_loaded(model, body)
    assert sorted(model.pretrained_extra) == ['fc.bias', 'fc.weight']


def cld_checkpoint(seed):
    body = randomized(build('cifar_resnet18').state_dict(), seed)
    model = {f'module.{k}': v for k, v in body.items()}
    model['module.linear.weight'] = torch.randn(512, 128)
    model['module.groupDis.0.weight'] = torch.randn(512, 128)
    ema = {k: v + 1 for k, v in model.items()}
    opt = argparse.Namespace(low_dim=128, pool_len=4, normlinear=True, epochs=200)
    return {'opt': opt, 'model': model, 'model_ema': ema, 'epoch': 200}, body, model


def test_cld_needs_trust_then_loads(tmp_path):
    ckpt, body, raw = cld_checkpoint(5)
    path = tmp_path / 'cifar10_ckpt_epoch_200.pth'
    torch.save(ckpt, path)
    with pytest.raises(UserError, match='--trust_checkpoint') as err:
        build('cifar_resnet18', pretrained=path)
    assert str(path) in str(err.value) and '\n' not in str(err.value)
    model = build('cifar_resnet18', pretrained=path, trust_checkpoint=True)
    assert_loaded(model, body)  # 'model', not 'model_ema'
    assert sorted(model.pretrained_extra) == ['groupDis.0.weight', 'linear.weight']
    assert torch.equal(model.pretrained_extra['linear.weight'], raw['module.linear.weight'])


def test_metric_transfer_wrn_net_wrapper(tmp_path):
    body = randomized(build('wrn28_2').state_dict(), 6)
    net = {f'module.{k}': v for k, v in body.items()}
    net['module.fc.weight'] = torch.randn(128, 128)
    net['module.fc.bias'] = torch.randn(128)
    torch.save({'net': net, 'acc': 82.12, 'epoch': 1270}, tmp_path / 'ckpt_instance_cifar10_wrn-28-2_82.12.pth.tar')
    model = build('wrn28_2', pretrained=tmp_path / 'ckpt_instance_cifar10_wrn-28-2_82.12.pth.tar')
    assert_loaded(model, body)
    assert sorted(model.pretrained_extra) == ['fc.bias', 'fc.weight']


def test_metric_transfer_pretrain_file_feeds_other_scripts(tmp_path):
    # metric_transfer.py's pretrain.pt: the backbone's state under 'backbone', the embedding head apart
    body = randomized(build('resnet18').state_dict(), 7)
    torch.save({'backbone_name': 'resnet18', 'backbone': body, 'head': {'weight': torch.randn(16, 512)}},
               tmp_path / 'pretrain.pt')
    assert_loaded(build('resnet18', pretrained=tmp_path / 'pretrain.pt'), body)


def test_lemniscate_resnet50_dataparallel(tmp_path):
    body = randomized(build('resnet50').state_dict(), 7)
    sd = {f'module.{k}': v for k, v in body.items()}
    sd['module.fc.weight'] = torch.randn(128, 2048)
    sd['module.fc.bias'] = torch.randn(128)
    torch.save({'state_dict': sd, 'epoch': 200, 'arch': 'resnet50', 'best_prec1': 46.8}, tmp_path / 'lemniscate.pth')
    model = build('resnet50', pretrained=tmp_path / 'lemniscate.pth')
    assert_loaded(model, body)
    assert model.pretrained_extra['fc.weight'].shape == (128, 2048)


def test_backbone_prefix_keeps_heads(tmp_path):
    body = randomized(build('resnet18').state_dict(), 8)
    sd = {f'backbone.{k}': v for k, v in body.items()}
    sd.update({'bottleneck.0.weight': torch.randn(256, 512), 'head.weight': torch.randn(10, 256),
               'contrastive_head.0.weight': torch.randn(512, 512)})
    torch.save(sd, tmp_path / 'tllib.pth')
    model = build('resnet18', pretrained=tmp_path / 'tllib.pth')
    assert_loaded(model, body)
    assert sorted(model.pretrained_extra) == ['bottleneck.0.weight', 'contrastive_head.0.weight', 'head.weight']


# --------------------------------------------------------------------------------------- checkpoints of other nets
def test_other_network_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / 'r18.pth')
    with pytest.raises(UserError, match='another network') as err:
        build('wrn28_2', pretrained=tmp_path / 'r18.pth')
    msg = str(err.value)
    assert 'wrn28_2' in msg and str(tmp_path / 'r18.pth') in msg and '\n' not in msg
    # same key names, other shapes: WRN-28-8 weights for a WRN-28-2; the message names a mismatching key
    torch.save(build('wrn28_8').state_dict(), tmp_path / 'w8.pth')
    with pytest.raises(UserError, match=r"another network.*'block1\.layer\.0\.bn1\.weight'|another network.*is \("):
        build('wrn28_2', pretrained=tmp_path / 'w8.pth')
    # deeper net into a shallower one: every resnet18 key exists in resnet34 with its shape, the extra blocks betray it
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / 'r34.pth')
    with pytest.raises(UserError, match=r"another network.*layer1\.2\."):
        build('resnet18', pretrained=tmp_path / 'r34.pth')
    # shallower into deeper: too few tensors found
    with pytest.raises(UserError, match=r'another network.*only \d+ of \d+ resnet34 tensors'):
        build('resnet34', pretrained=tmp_path / 'r18.pth')


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match='checkpoint not found'):
        load_file(tmp_path / 'missing.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='--trust_checkpoint'):
        load_file(tmp_path / 'junk.pth')
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    with pytest.raises(UserError, match='not a dict'):
        load_file(tmp_path / 'tensor.pth')
    torch.save({'epoch': 3}, tmp_path / 'empty.pth')
    with pytest.raises(UserError, match='no tensors'):
        build('resnet18', pretrained=tmp_path / 'empty.pth')


# ------------------------------------------------------------------------------------------ pretrained=True (hub)
@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    calls = []

    def no_network(url, *a, **k):
        calls.append(url)
        raise OSError('network is unreachable')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    return tmp_path / 'torch' / 'hub' / 'checkpoints', calls


def test_pretrained_true_from_hub_cache(offline_hub):
    folder, calls = offline_hub
    folder.mkdir(parents=True)
    sd = randomized(torchvision.models.resnet18().state_dict(), 9)
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.endswith('/resnet18-f37072fd.pth')
    torch.save(sd, folder / 'resnet18-f37072fd.pth')
    model = build('resnet18', pretrained=True)
    assert calls == []
    assert_loaded(model, {k: v for k, v in sd.items() if not k.startswith('fc.')})
    assert sorted(model.pretrained_extra) == ['fc.bias', 'fc.weight']


def test_pretrained_true_offline_error(offline_hub):
    folder, calls = offline_hub
    with pytest.raises(UserError) as err:
        build('resnet50', pretrained=True)
    msg = str(err.value)
    assert calls == ['https://download.pytorch.org/models/resnet50-0676ba61.pth']  # V1 weights, as in the paper
    assert msg.startswith('no network to fetch https://download.pytorch.org/models/resnet50-0676ba61.pth')
    assert f'put resnet50-0676ba61.pth in {folder}' in msg and '\n' not in msg


@pytest.mark.parametrize('name', CIFAR_NETS)
def test_cifar_nets_have_no_official_weights(name):
    with pytest.raises(UserError, match='pass a checkpoint path'):
        build(name, pretrained=True)


def test_pretrained_true_corrupt_cache_file(offline_hub):
    folder, calls = offline_hub
    folder.mkdir(parents=True)
    (folder / 'resnet18-f37072fd.pth').write_bytes(b'truncated')
    with pytest.raises(UserError, match=r'cannot load .*resnet18-f37072fd\.pth.*delete it') as err:
        build('resnet18', pretrained=True)
    assert calls == [] and '\n' not in str(err.value)
