"""The model of the fact embedding's ridge baseline (:mod:`triplets.facts.ridge`): a
:class:`~triplets.facts.model.FactEmbeddingNet` whose trunk is the frozen EfficientNet-Lite0 (pooled
1280-d features of the standardised image) and
whose branches are ``Linear(1280, d)`` and ``Linear(1280, 2d)`` (the network resizes the images to
``input_size`` before standardising them, as every fact model does); apart from the run so that the
run folder can rebuild it from ``model.pt`` without importing the training code."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mas_core.errors import MASCoreError
from mas_core.ridge import ridge_settings

from ..backbones import EFFICIENTNET_FEATURE_DIM, EFFICIENTNET_MEAN, EFFICIENTNET_STD, FrozenModule, efficientnet_lite0
from ..errors import ConfigError
from .model import FactEmbeddingNet

BACKBONE_OPTIONS = ("weights", "input_size")
SAVED_KEY = "ridge_backbone"  # in RUN/ridge/model.pt: the options that rebuild the model


class PooledBackbone(nn.Module):
    """Standardised images → EfficientNet-Lite0's pooled features ``[B, 1280]``."""

    def __init__(self, weights: str | None) -> None:
        super().__init__()
        self.network = efficientnet_lite0(weights, key="methods.ridge.options.weights")

    def forward(self, x: Tensor) -> Tensor:
        return self.network.pooled_features(x)


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(ridge settings options, backbone options)`` of a ridge method's options (unknown keys refused)."""
    backbone = {key: options[key] for key in BACKBONE_OPTIONS if key in options}
    rest = {key: value for key, value in options.items() if key not in BACKBONE_OPTIONS}
    try:
        ridge_settings(rest)
    except MASCoreError as exc:
        raise ConfigError(f"method ridge: {exc} (or {list(BACKBONE_OPTIONS)})") from None
    size = backbone.get("input_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
        raise ConfigError(f"method ridge: input_size must be an integer ≥ 8 or null, got {size!r}")
    return rest, backbone


def build_ridge_model(slot_dim: int, backbone: dict[str, Any]) -> FactEmbeddingNet:
    """The fact model of the ridge baseline (module docs), branches zero until a solution is set."""
    trunk = FrozenModule(PooledBackbone(backbone.get("weights")))
    subject, predicate_object = nn.Linear(EFFICIENTNET_FEATURE_DIM, slot_dim), nn.Linear(EFFICIENTNET_FEATURE_DIM, 2 * slot_dim)
    for layer in (subject, predicate_object):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return FactEmbeddingNet(trunk, subject, predicate_object, slot_dim, mean=EFFICIENTNET_MEAN,
                            std=EFFICIENTNET_STD, input_size=backbone.get("input_size")).freeze_trunk().eval()


def rebuild_saved_model(state: dict[str, Any]) -> FactEmbeddingNet | None:
    """The ridge model described by a ``model.pt`` state (weights loaded), or ``None`` for another method's."""
    if SAVED_KEY not in state:
        return None
    model = build_ridge_model(int(state["slot_dim"]), dict(state[SAVED_KEY]))
    model.load_state_dict(state["model"])
    return model.eval()


__all__ = ["BACKBONE_OPTIONS", "PooledBackbone", "SAVED_KEY", "build_ridge_model", "rebuild_saved_model",
           "split_options"]
