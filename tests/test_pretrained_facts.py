"""The fact embedding on the pretrained EfficientNet-Lite0 (model.backbone: efficientnet_lite0):
the frozen prefix, the cached features, and MAS anchored at the pretrained weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mas_core.importance import mas_importance
from mas_core.regularizers import make_regularizer
from test_train import make_tiny_fact_file
from triplets.backbones import efficientnet_lite0
from triplets.errors import ConfigError
from triplets.facts.model import ModelConfig, build_model
from triplets.facts.train import train_run
from mas_core.loop import OptimSettings
from triplets.facts.train_config import DataConfig, EvalConfig, MethodConfig, TrainConfig

SLOT_DIM = 8


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> Path:
    return make_tiny_fact_file(tmp_path_factory.mktemp("pretrained") / "facts.h5", num_tasks=2, facts_per_task=4,
                               train_per_fact=4, test_per_fact=2, image_size=32, slot_dim=SLOT_DIM)


def _model_config(**overrides) -> ModelConfig:
    settings = dict(backbone="efficientnet_lite0", trunk_blocks=13, input_size=48, hidden_dim=16,
                    cache_features=True)
    settings.update(overrides)
    return ModelConfig(**settings)


def test_trunk_is_the_pretrained_prefix_and_branches_copy_the_rest():
    model = build_model(_model_config(), SLOT_DIM, 32).eval()
    reference = efficientnet_lite0()
    images = torch.rand(3, 3, 32, 32)
    resized = torch.nn.functional.interpolate(images, size=(48, 48), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = reference.pooled_features((resized - 0.5) / 0.5)
        pooled = model.pretrained_output(images)
    assert pooled.shape == (3, 2 * 1280)
    torch.testing.assert_close(pooled[:, :1280], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled[:, 1280:], expected, rtol=0, atol=1e-5)
    assert all(not p.requires_grad for p in model.trunk.parameters())
    assert model(images).shape == (3, 3 * SLOT_DIM)


def test_bad_backbone_settings_are_refused():
    with pytest.raises(ValueError, match="trunk_blocks"):
        _model_config(trunk_blocks=17).validate()
    with pytest.raises(ValueError, match="input_size"):
        _model_config(input_size=4).validate()
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_model(ModelConfig(hidden_dim=16), SLOT_DIM, 32).pretrained_output(torch.rand(1, 3, 32, 32))


def _run(facts: Path, out: Path, methods, **model) -> dict:
    config = TrainConfig(data=DataConfig(fact_file=str(facts)), model=_model_config(**model),
                         optim=OptimSettings(epochs=1, batch_size=8, lr=0.01), methods=methods,
                         eval=EvalConfig(index="none", batch_size=16), num_threads=1)
    return train_run(config, out, progress=False)


def test_anchored_mas_measures_omega0_at_the_pretrained_weights(facts, tmp_path):
    """After task 1 of MAS anchored at the pretrained weights, Ω = Ω₀ + Ω₁, where Ω₀ is the exact MAS
    importance of the pretrained output at θ₀ on task 1's training inputs; the new projection layers
    get Ω₀ = 0. Checked by recomputing Ω₀ by hand on the cached features."""
    anchored = MethodConfig("mas", {"lam": 1.0, "anchor": "start"}, label="mas_anchored")
    plain = MethodConfig("mas", {"lam": 1.0})
    _run(facts, tmp_path / "run", [plain, anchored])
    state = {name: torch.load(tmp_path / "run" / name / "checkpoint.pt", weights_only=True)
             for name in ("mas", "mas_anchored")}
    omega_plain = state["mas"]["regularizer"]["accumulated"]
    omega_anchored = state["mas_anchored"]["regularizer"]["accumulated"]
    # by hand: Ω₀ of the pretrained output at θ₀ on task 1's training features
    model = build_model(_model_config(), SLOT_DIM, 32).eval()
    from triplets.facts.data import open_fact_file
    from triplets.facts.feature_cache import FeatureSamples

    cache = next((tmp_path / "run" / "features").glob("*.h5"))
    samples = FeatureSamples(cache, open_fact_file(facts), [(0, 0)]).inputs_only()
    head = model.branch_head()
    batches = list(samples.batches(list(torch.arange(len(samples)).split(16))))
    omega0 = mas_importance(head, batches, output_fn=lambda module, batch: module.pretrained_output(batch))
    assert set(omega_anchored) == set(omega_plain)
    projection = "subject_branch.3.weight"
    assert float(omega0[projection].abs().sum()) == 0.0
    suffix = "subject_branch.0.0._project_conv.weight"
    assert float(omega0[suffix].sum()) > 0
    # the anchored run's Ω after 2 tasks = Ω₀ + its own Ω₁ + Ω₂: at least Ω₀ everywhere, and more than
    # the plain run's where Ω₀ is large
    assert bool((omega_anchored[suffix] >= omega0[suffix] - 1e-6).all())
    assert float(omega_anchored[suffix].sum()) > float(omega_plain[suffix].sum())
    assert state["mas_anchored"]["regularizer"]["tasks_seen"] == 3


def test_anchor_needs_a_pretrained_output():
    reg = make_regularizer("mas", lam=1.0, anchor="start")
    assert reg.anchors_at_start
    with pytest.raises(Exception, match="anchor must be one of"):
        make_regularizer("mas", lam=1.0, anchor="pretrained-ish")
    assert not make_regularizer("ewc", lam=1.0).anchors_at_start


def test_anchored_mas_in_the_recognition_loop_penalises_task_one():
    """In the classification experiment F₀ is the trunk's features: with anchor='start' Ω₀ > 0 on the
    trunk before task 1, so task 1's trunk moves less from θ₀ than under plain MAS at the same λ."""
    from torch.utils.data import TensorDataset

    from mas_core.sequence import MultiHeadNet, Task, run_sequence

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 6, generator=generator)
    labels = (inputs[:, 0] > 0).long()
    tasks = [Task("a", TensorDataset(inputs, labels), TensorDataset(inputs, labels), num_classes=2)]

    def make_model():
        torch.manual_seed(1)
        return MultiHeadNet(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh()), 8)

    start = make_model().trunk[0].weight.detach().clone()
    moved = {}
    for anchor in ("none", "start"):
        result = run_sequence(make_model, tasks, "mas", OptimSettings(epochs=5, lr=0.1, batch_size=16), seed=0,
                              method_options={"lam": 50.0, "anchor": anchor, "penalty_step": "proximal"},
                              progress=False)
        moved[anchor] = float((result.model.trunk[0].weight.detach() - start).norm())
    assert moved["start"] < 0.5 * moved["none"]


def test_the_cache_written_in_channels_last_equals_the_trunk_in_the_default_layout(facts, tmp_path):
    from triplets.facts.data import open_fact_file
    from triplets.facts.feature_cache import write_feature_cache

    model = build_model(_model_config(), SLOT_DIM, 32).eval()
    fact_file = open_fact_file(facts)
    path = write_feature_cache(tmp_path / "features.h5", model, fact_file, fingerprint="x", batch_size=8)
    import h5py
    import numpy as np

    with h5py.File(path) as handle:
        cached = torch.from_numpy(handle["features"][:6])
    pixels = torch.from_numpy(np.asarray(fact_file.pixels(np.arange(6)))).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        direct = model.trunk_features(pixels)
    torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-4)  # float32 rounding of another kernel order
    assert all(p.is_contiguous() for p in model.trunk.parameters())  # the trunk is back in the default layout
