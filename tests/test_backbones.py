"""EfficientNet-Lite0 (triplets.backbones): the ImageNet weights shipped in the installed package,
checked against an independent implementation (timm's ``tf_efficientnet_lite0``) and on
scikit-learn's two sample photographs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from triplets.backbones import (EFFICIENTNET_BLOCKS, FrozenModule, default_weights_path, efficientnet_lite0,
                                pretrained_split)
from triplets.errors import ConfigError


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0()


def _timm_twin(net):
    """timm's independent implementation holding the same weights. Both state_dicts list the same
    tensors in the same order (stem, 16 blocks, head, classifier); shapes are checked one by one."""
    timm = pytest.importorskip("timm")
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ours, theirs = net.state_dict(), reference.state_dict()
    assert len(ours) == len(theirs) == 296
    mapped = {}
    for (name, value), (their_name, their_value) in zip(ours.items(), theirs.items()):
        assert value.shape == their_value.shape, (name, their_name)
        mapped[their_name] = value
    reference.load_state_dict(mapped, strict=True)
    return reference


def test_weights_come_from_the_installed_package():
    path = default_weights_path()
    assert path.is_file() and path.stat().st_size > 18_000_000
    net = efficientnet_lite0()
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    assert not net.training


@pytest.mark.parametrize("shape", [(2, 3, 224, 224), (3, 3, 67, 53), (2, 3, 32, 32)])
def test_same_logits_as_an_independent_implementation(lite0, shape):
    reference = _timm_twin(lite0)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours, theirs = lite0(x), reference(x)
    assert ours.shape == (shape[0], 1000)
    assert (ours - theirs).abs().max().item() <= 1e-4


def _sample_photo(index: int) -> torch.Tensor:
    """scikit-learn's sample photo, shorter side resized to 256 and centre-cropped to 224, in [0, 1]."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    image = Image.fromarray(load_sample_images().images[index])
    scale = 256 / min(image.size)
    image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.BICUBIC)
    left, top = (image.size[0] - 224) // 2, (image.size[1] - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    return torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None] / 255


def _top5(net, photo: torch.Tensor) -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    with torch.no_grad():
        logits = net((photo - 0.5) / 0.5)[0]
    return [_IMAGENET_CATEGORIES[i] for i in logits.topk(5).indices.tolist()]


def test_the_sample_photos_are_recognised(lite0):
    china, flower = _top5(lite0, _sample_photo(0)), _top5(lite0, _sample_photo(1))
    assert flower[0] == "daisy"
    assert {"palace", "bell cote"} <= set(china)
    assert len(set(china) & {"palace", "bell cote", "dome", "church", "monastery", "castle"}) >= 3


@pytest.mark.parametrize("trunk_blocks", [0, 6, 11, EFFICIENTNET_BLOCKS])
def test_prefix_then_suffix_is_the_whole_network(lite0, trunk_blocks):
    split = pretrained_split("efficientnet_lite0", None, trunk_blocks)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        middle = split.prefix(x)
        assert middle.shape[1] == split.prefix_channels
        torch.testing.assert_close(split.suffix(middle), lite0.features(x), rtol=0, atol=1e-5)


def test_split_and_weights_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="trunk_blocks"):
        pretrained_split("efficientnet_lite0", None, 17)
    with pytest.raises(ConfigError, match="no file"):
        efficientnet_lite0(tmp_path / "missing.pth")
    foreign = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(ConfigError, match="not a efficientnet_lite0 state_dict"):
        efficientnet_lite0(foreign)


def test_frozen_module_keeps_its_statistics():
    split = pretrained_split("efficientnet_lite0", "scratch", 3)
    frozen = FrozenModule(split.prefix)
    frozen.train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen(torch.rand(4, 3, 32, 32))
    assert not frozen.module.training
    assert all(not p.requires_grad for p in frozen.parameters())
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())


def test_both_model_sections_name_one_backbone_spec() -> None:
    """The fact embedding's model section (backbone, weights) and the recognition sequence's (arch,
    pretrained_weights) are read as one BackboneSpec, checked by one rule (issue 25)."""
    from triplets.backbones import BackboneSpec
    from triplets.facts.model import ModelConfig
    from triplets.recognition.config import ModelSpec

    facts = ModelConfig(backbone="efficientnet_lite0", weights="w.pth", trunk_blocks=12).backbone_spec
    recognition = ModelSpec(arch="efficientnet_lite0", channels=3, pretrained_weights="w.pth",
                            trunk_blocks=12).backbone_spec
    assert (facts.name, facts.weights, facts.trunk_blocks) == (recognition.name, recognition.weights, 12)
    assert ModelSpec(arch="efficientnet_lite0", channels=3).backbone_spec == BackboneSpec(
        "efficientnet_lite0", None, 16, weights_key="model.pretrained_weights")
    with pytest.raises(ValueError, match="model.pretrained_weights: scratch is for efficientnet_lite0"):
        ModelSpec(arch="alexnet", channels=3, pretrained_weights="scratch").validate()
    with pytest.raises(ValueError, match="model.weights: scratch is for efficientnet_lite0"):
        ModelConfig(backbone="resnet18", weights="scratch").validate()
    for bad in (17, True):
        with pytest.raises(ValueError, match="trunk_blocks must be an integer from 0 to 16"):
            ModelSpec(arch="efficientnet_lite0", channels=3, trunk_blocks=bad).validate()
