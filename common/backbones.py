"""Backbone networks as feature extractors, and pretrained-weight loading.

``build(name)`` returns a module whose ``forward(x)`` gives the pooled feature (N, ``model.feature_dim``); no
classifier head. Module names follow the networks the released checkpoints were saved from, so those checkpoints
load without renaming:

- resnet18/34/50/101/152, efficientnet_b2: torchvision (``fc`` / ``classifier`` replaced by Identity).
- wrn28_2 / wrn28_8 / wrn28_10: the pre-activation CIFAR WRN of Deep Metric Transfer (``lib/models/wideresnet.py``).
- convlarge: the 13-layer ConvLarge of MetaSemi (``model.py``) without its fc.
- cifar_resnet18: the CIFAR ResNet-18 of CLD / lemniscate / SCAN (3x3 stem, no max-pool).

``pretrained=True`` fetches the torchvision weights through the torch hub cache; a path loads a local checkpoint in
any of the recognised layouts (see ``load_weights``). Keys the backbone does not use (a classifier, a MoCo
projection head, CLD's ``linear``/``groupDis``) are returned in ``model.pretrained_extra``.
"""
import math
import os
import re
from collections.abc import Mapping
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common import UserError
from common.run import load_file

NAMES = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'efficientnet_b2',
         'wrn28_2', 'wrn28_8', 'convlarge', 'cifar_resnet18', 'wrn28_10')


# ---------------------------------------------------------------------------------------------------------------------
# torchvision ResNets and EfficientNet-B2
# ---------------------------------------------------------------------------------------------------------------------
# IMAGENET1K_V1 everywhere: for ResNet-50 this is resnet50-0676ba61.pth, the re-hosted legacy V1 weights (76.1% top-1)
# that Self-Tuning used as resnet50-19c8e357.pth; IMAGENET1K_V2 (80.9%, another recipe) would not match the papers.
TORCHVISION_WEIGHTS = {
    'resnet18': torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    'resnet34': torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    'resnet50': torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    'resnet101': torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
    'resnet152': torchvision.models.ResNet152_Weights.IMAGENET1K_V1,
    # Self-Tuning used lukemelas' efficientnet_pytorch 'efficientnet-b2' (TF-ported weights, TF "same" padding,
    # BN eps 1e-3, dropout 0.3 on the feature). torchvision's B2 has the same topology but rwightman's weights and
    # PyTorch padding, so features and accuracies differ from the reference.
    'efficientnet_b2': torchvision.models.EfficientNet_B2_Weights.IMAGENET1K_V1,
}


def _torchvision_resnet(name, **kw):
    # torchvision's default init (kaiming fan_out convs, BN 1/0, zero_init_residual=False) is what the references use.
    model = getattr(torchvision.models, name)(weights=None, **kw)
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()  # forward: ... avgpool -> flatten -> Identity = the pooled feature
    return model


def _torchvision_efficientnet_b2(**kw):
    model = torchvision.models.efficientnet_b2(weights=None, **kw)
    model.feature_dim = model.classifier[1].in_features  # 1408
    # The classifier held Dropout(0.3) + Linear; scripts that want the reference's feature dropout add their own.
    model.classifier = nn.Identity()
    return model


# ---------------------------------------------------------------------------------------------------------------------
# WRN-28-k (pre-activation, CIFAR)
# ---------------------------------------------------------------------------------------------------------------------
# Deep Metric Transfer's lib/models/wideresnet.py: ReLU and PyTorch's default BN momentum 0.1, so bn_momentum=0.1 and
# relu_slope=0 are the defaults. FixMatch-style WRNs (DebiasPL's CIFAR plan) use bn_momentum=0.001 and relu_slope=0.1:
# pass them as keywords; module names and shapes are the same either way.
class _WRNBlock(nn.Module):
    def __init__(self, cin, cout, stride, bn_momentum, relu_slope):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.slope = relu_slope

    def forward(self, x):
        act = self.act(self.bn1(x))
        if not self.equal:  # width changes: the pre-activation feeds both the residual and the 1x1 shortcut
            x = act
        out = self.conv2(self.act(self.bn2(self.conv1(act))))
        return out + (x if self.equal else self.convShortcut(x))

    def act(self, x):
        return F.leaky_relu(x, self.slope) if self.slope else F.relu(x)


class _WRNStage(nn.Module):
    def __init__(self, n, cin, cout, stride, bn_momentum, relu_slope):
        super().__init__()
        self.layer = nn.Sequential(*[_WRNBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                               bn_momentum, relu_slope) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth=28, widen=2, bn_momentum=0.1, relu_slope=0.0):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = _WRNStage(n, widths[0], widths[1], 1, bn_momentum, relu_slope)
        self.block2 = _WRNStage(n, widths[1], widths[2], 2, bn_momentum, relu_slope)
        self.block3 = _WRNStage(n, widths[2], widths[3], 2, bn_momentum, relu_slope)
        self.bn1 = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.slope = relu_slope
        self.feature_dim = widths[3]
        for m in self.modules():  # the original init: conv ~ N(0, 2 / (k*k*C_out)), BN weight 1 bias 0
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.bn1(out)
        out = F.leaky_relu(out, self.slope) if self.slope else F.relu(out)
        # The original uses avg_pool2d(8), which is the global average at 32 px; adaptive pooling also takes other sizes.
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


# ---------------------------------------------------------------------------------------------------------------------
# ConvLarge (MetaSemi model.py)
# ---------------------------------------------------------------------------------------------------------------------
def _conv_bn_lrelu(cin, cout, k, pad):
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, pad, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1))


class ConvLarge(nn.Module):
    """3x32x32 -> 3 conv128 -> pool+drop -> 3 conv256 -> pool+drop -> conv512 (pad 0) -> 1x1 256 -> 1x1 128 -> GAP.

    PyTorch default init. 3,120,512 parameters (3,121,802 with the reference's 10-way fc)."""

    def __init__(self, dropout=0.5):
        super().__init__()
        self.block1 = nn.Sequential(_conv_bn_lrelu(3, 128, 3, 1), _conv_bn_lrelu(128, 128, 3, 1),
                                    _conv_bn_lrelu(128, 128, 3, 1))
        self.block2 = nn.Sequential(_conv_bn_lrelu(128, 256, 3, 1), _conv_bn_lrelu(256, 256, 3, 1),
                                    _conv_bn_lrelu(256, 256, 3, 1))
        self.block3 = nn.Sequential(_conv_bn_lrelu(256, 512, 3, 0), _conv_bn_lrelu(512, 256, 1, 0),
                                    _conv_bn_lrelu(256, 128, 1, 0))
        # One pool/dropout object used at both positions, as in the reference (it has no parameters).
        self.pool_drop = nn.Sequential(nn.MaxPool2d(2, 2), nn.Dropout2d(dropout))
        self.feature_dim = 128

    def forward(self, x):
        x = self.pool_drop(self.block1(x))
        x = self.pool_drop(self.block2(x))
        return F.adaptive_avg_pool2d(self.block3(x), 1).flatten(1)


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR ResNet-18 (CLD / lemniscate / SCAN naming)
# ---------------------------------------------------------------------------------------------------------------------
class _CifarBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet18(nn.Module):
    """3x3 stem, no max-pool, stages of 64/128/256/512 with 2 blocks, global average pool -> 512-d. PyTorch init."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (cout, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            setattr(self, f'layer{i}', nn.Sequential(_CifarBasicBlock(cin, cout, stride),
                                                     _CifarBasicBlock(cout, cout, 1)))
            cin = cout
        self.feature_dim = 512

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # CLD uses avg_pool2d(4) (global at 32 px), SCAN AdaptiveAvgPool2d(1): the same at 32 px.
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


# ---------------------------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------------------------
def _construct(name, **kw):
    if name in ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'):
        return _torchvision_resnet(name, **kw)
    if name == 'efficientnet_b2':
        return _torchvision_efficientnet_b2(**kw)
    if name in ('wrn28_2', 'wrn28_8', 'wrn28_10'):
        return WideResNet(28, int(name.split('_')[1]), **kw)
    if name == 'convlarge':
        return ConvLarge(**kw)
    if name == 'cifar_resnet18':
        return CifarResNet18(**kw)
    raise UserError(f"unknown backbone {name!r}: choose one of {', '.join(NAMES)}")


def build(name, pretrained=None, trust_checkpoint=False, **kw):
    """A feature extractor: forward(x) -> (N, model.feature_dim).

    pretrained: None/False random init; True the torchvision ImageNet weights for `name` (through the torch hub
    cache); a path a local checkpoint (see load_weights). kw go to the constructor (e.g. bn_momentum, relu_slope for
    the WRNs; torchvision keywords for the torchvision nets).
    """
    if pretrained is True and name in NAMES and name not in TORCHVISION_WEIGHTS:
        raise UserError(f"{name} has no official pretrained weights: pass a checkpoint path (--pretrained PATH)")
    model = _construct(name, **kw)
    model.pretrained_extra = {}
    if pretrained is None or pretrained is False:
        return model
    if pretrained is True:
        state = _hub_state_dict(TORCHVISION_WEIGHTS[name].url, trust_checkpoint)
        load_weights(model, state, name, source=TORCHVISION_WEIGHTS[name].url)
        return model
    path = os.path.expanduser(os.fspath(pretrained))
    load_weights(model, load_file(path, trust_checkpoint), name, source=path)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained loading
# ---------------------------------------------------------------------------------------------------------------------
def hub_file(url):
    """(folder, file name) where torch.hub caches `url`: $TORCH_HOME/hub/checkpoints/<basename>."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints'), os.path.basename(urlparse(url).path)


def _hub_state_dict(url, trust_checkpoint=False):
    folder, file = hub_file(url)
    path = os.path.join(folder, file)
    existed = os.path.isfile(path)
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=folder, map_location='cpu', progress=False,
                                                  check_hash=True, weights_only=not trust_checkpoint)
    except Exception as e:  # noqa: BLE001 - any failure becomes one actionable line
        if not existed and not os.path.isfile(path):
            raise UserError(f"no network to fetch {url}: put {file} in {folder} "
                            f"({type(e).__name__}: {_first_line(e)})") from e
        raise UserError(f"cannot load {path} ({type(e).__name__}: {_first_line(e)}); delete it to download it "
                        f"again, or pass --trust_checkpoint if it is a trusted legacy pickle") from e


def _first_line(e):
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(e))  # torch colours parts of its messages
    unsupported = re.search(r'Unsupported global: GLOBAL (\S+)', text)
    if unsupported:  # the useful part of a weights_only refusal
        return f'it holds a pickled {unsupported.group(1)}'
    if text.startswith('Weights only load failed'):
        return 'not a plain tensor checkpoint: ' + ' '.join(text.split('WeightsUnpickler error:')[-1]
                                                        .split('Check the documentation')[0].split())[:120]
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else ''


# Prefixes: DataParallel/DDP 'module.' (lemniscate, CLD, MoCo), MoCo v1/v2/EMAN query encoder 'encoder_q.',
# TLlib/SCAN 'backbone.'. The prefix that matches the most backbone keys wins.
_OUTER = ('', 'module.')
_INNER = ('', 'encoder_q.', 'backbone.')
_FORMATS = {'': 'plain state dict', 'encoder_q.': 'MoCo query encoder', 'backbone.': 'backbone.* (TLlib/SCAN)'}


def _unwrap(ckpt):
    """The state dict inside a checkpoint: follows 'state_dict' (MoCo, lemniscate ImageNet), 'model' (CLD, USL),
    'net' (Deep Metric Transfer's reference) and 'backbone' (metric_transfer.py's pretrain.pt) wrappers."""
    obj = ckpt
    for _ in range(4):
        inner = next((obj[k] for k in ('state_dict', 'model', 'net', 'backbone') if isinstance(obj.get(k), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors


def load_weights(model, checkpoint, name, source='checkpoint'):
    """Load a checkpoint dict into a backbone built by `build`, with prefix detection and shape checks.

    Sets model.pretrained_extra (unused tensors, prefix-stripped: MoCo 'fc.0.weight', CLD 'linear.weight', ...) and
    model.pretrained_report (format, prefix, counts). Raises UserError for a checkpoint of another network: a shape
    mismatch on a backbone key, a backbone-like key the model lacks, or fewer than 90% of the backbone's tensors found.
    """
    tensors = _unwrap(checkpoint)
    own = model.state_dict()
    if not tensors:
        raise UserError(f"{source} holds no tensors: expected a state dict (plain, or under 'state_dict', 'model', "
                        f"'net' or 'backbone') for {name}")

    def matches(prefix):
        return sum(1 for k in tensors if k.startswith(prefix) and k[len(prefix):] in own)

    outer, inner = max(((o, i) for o in _OUTER for i in _INNER), key=lambda oi: matches(oi[0] + oi[1]))
    prefix = outer + inner
    used, extra, mismatched = {}, {}, []
    for k, v in tensors.items():
        if not k.startswith(prefix):
            # Siblings of 'backbone.' (TLlib 'head.', 'bottleneck.'; SCAN 'contrastive_head.') are heads worth
            # keeping; siblings of 'encoder_q.' (encoder_k, queue) are MoCo's training state and are dropped.
            if inner == 'backbone.' and k.startswith(outer):
                extra[k[len(outer):]] = v
            continue
        key = k[len(prefix):]
        if key not in own:
            extra[key] = v
        elif own[key].shape != v.shape:
            mismatched.append(key)
        else:
            used[key] = v

    def refuse(detail):
        raise UserError(f"{source} looks like a checkpoint for another network, not {name}: {detail}; pass a "
                        f"checkpoint of {name} or choose the --backbone it was trained with")

    if mismatched:
        k = mismatched[0]
        refuse(f"{len(mismatched)} keys differ in shape, e.g. {k!r} is {tuple(tensors[prefix + k].shape)} in the "
               f"file but {tuple(own[k].shape)} in {name}")
    top = {k.split('.')[0] for k in own}
    stray = [k for k in extra if k.split('.')[0] in top]
    if stray:
        refuse(f"{len(stray)} keys inside the {name} modules are not in {name}, e.g. {stray[0]!r}")
    needed = [k for k in own if not k.endswith('num_batches_tracked')]  # legacy files predate this buffer
    found = sum(1 for k in needed if k in used)
    if found < 0.9 * len(needed):
        missing = next(k for k in needed if k not in used)
        example = next(iter(tensors))
        refuse(f"only {found} of {len(needed)} {name} tensors found (e.g. {missing!r} is missing; the file has "
               f"keys like {example!r})")
    model.load_state_dict(used, strict=False)
    model.pretrained_extra = extra
    model.pretrained_report = {'format': _FORMATS[inner] + (' (module.)' if outer else ''), 'prefix': prefix,
                               'loaded': len(used), 'missing': [k for k in needed if k not in used],
                               'extra': sorted(extra), 'source': source}
    return model
