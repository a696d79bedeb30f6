"""The two-branch fact embedding network and its losses (triplets.facts.model)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from triplets.errors import ConfigError
from triplets.facts.model import (
    FactEmbeddingNet,
    ModelConfig,
    build_model,
    contrastive_loss,
    slot_loss,
    slot_targets,
)


def _small(slot_dim: int = 8, image_size: int = 16, **options) -> FactEmbeddingNet:
    torch.manual_seed(0)
    config = ModelConfig(trunk_channels=[8, 16], branch_channels=16, hidden_dim=32, **options)
    return build_model(config, slot_dim, image_size)


def test_shapes_and_normalised_embedding():
    model = _small(slot_dim=8, image_size=16)
    images = torch.rand(5, 3, 16, 16)
    out = model(images)
    assert out.shape == (5, 24) and model.slot_dim == 8 and model.embedding_dim == 24
    embedded = model.embed(images)
    torch.testing.assert_close(embedded.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(embedded, F.normalize(out, dim=1))
    # uint8 images are read as pixel values / 255
    as_bytes = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(model(as_bytes), model(as_bytes.float() / 255))
    # the subject slot comes from the subject branch only, P‖O from the other branch
    model.eval()
    with torch.no_grad():
        shared = model.trunk((images - model.input_mean) / model.input_std)
        torch.testing.assert_close(model(images)[:, :8], model.subject_branch(shared))
        torch.testing.assert_close(model(images)[:, 8:], model.predicate_object_branch(shared))


def test_group_norm_and_other_image_sizes():
    model = _small(slot_dim=4, image_size=40, norm="group")
    assert model(torch.rand(2, 3, 40, 40)).shape == (2, 12)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_torchvision_backbone_and_local_weights(tmp_path):
    import torchvision.models as tvm

    torch.manual_seed(1)
    reference = tvm.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig(backbone="resnet18", weights=str(path), hidden_dim=16), 6, 32)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 18)
    torch.testing.assert_close(model.trunk[0].weight, reference.conv1.weight)  # trunk loaded
    torch.testing.assert_close(model.subject_branch[0][0].conv1.weight, reference.layer3[0].conv1.weight)
    # the two branches are independent copies
    assert model.subject_branch[0][0].conv1.weight.data_ptr() != model.predicate_object_branch[0][0].conv1.weight.data_ptr()
    with pytest.raises(ConfigError, match="no file"):
        build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path / "missing.pth")), 6, 32)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="not a resnet18 state_dict"):
        build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path / "bad.pth")), 6, 32)


def test_bad_model_configs():
    with pytest.raises(ConfigError, match="cannot take 32×32"):
        build_model(ModelConfig(backbone="alexnet"), 4, 32)
    with pytest.raises(ConfigError, match="slot_dim is 10"):
        build_model(ModelConfig(slot_dim=10), 8, 16)
    with pytest.raises(ValueError, match="small_cnn trains from scratch"):
        ModelConfig(weights="x.pth").validate()


def test_slot_loss_equals_hand_computation_and_masked_slots_count_zero():
    pred = torch.tensor([[1.0, 0.0, 2.0, 2.0, 5.0, 5.0],
                         [0.0, 3.0, 1.0, 1.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 2.0, 0.0, 0.0, 0.0],
                           [0.0, -1.0, 1.0, 1.0, 3.0, 4.0]])
    masks = torch.tensor([[1.0, 1.0, 0.0],   # <S,P>: the O slot (pred 5,5 vs 0,0) must not count
                          [1.0, 1.0, 1.0]])
    # sample 0: ‖(1,0)‖ + ‖(0,2)‖ = 1 + 2 = 3; sample 1: ‖(0,4)‖ + ‖(0,0)‖ + ‖(−3,−4)‖ = 4 + 0 + 5 = 9
    per_sample = slot_loss(pred, target, masks, reduction="none")
    torch.testing.assert_close(per_sample, torch.tensor([3.0, 9.0]))
    loss = slot_loss(pred, target, masks)
    assert loss.item() == pytest.approx(6.0)
    loss.backward()
    assert torch.isfinite(pred.grad).all()  # the zero-distance slot (sample 1, P) has a finite gradient
    assert torch.equal(pred.grad[0, 4:], torch.zeros(2))  # masked slot: no gradient
    torch.testing.assert_close(pred.grad[1, 2:4], torch.zeros(2))
    # d/dV ‖V − L‖ = (V − L)/‖V − L‖, halved by the batch mean
    torch.testing.assert_close(pred.grad[1, 4:], torch.tensor([-0.3, -0.4]))
    # Caffe's variant: Σ w · ½‖V − L‖²: sample 0: ½(1 + 4) = 2.5; sample 1: ½(16 + 0 + 25) = 20.5
    squared = slot_loss(pred.detach(), target, masks, squared=True, reduction="none")
    torch.testing.assert_close(squared, torch.tensor([2.5, 20.5]))


def test_slot_targets_scale_each_present_slot_to_unit_norm():
    embeddings = torch.tensor([[3.0, 4.0, 0.0, 0.0, 0.0, 0.0],
                               [1.0, 0.0, 0.0, 2.0, 0.0, -5.0]])
    targets = slot_targets(embeddings, unit_norm=True)
    torch.testing.assert_close(targets, torch.tensor([[0.6, 0.8, 0.0, 0.0, 0.0, 0.0],
                                                      [1.0, 0.0, 0.0, 1.0, 0.0, -1.0]]))
    torch.testing.assert_close(slot_targets(embeddings, unit_norm=False), embeddings)


def test_contrastive_loss_is_infonce_over_distinct_batch_facts():
    torch.manual_seed(0)
    fact_targets = torch.randn(5, 6)
    pred = torch.randn(4, 6)
    fact_ids = torch.tensor([3, 1, 3, 4])  # fact 3 twice: one candidate, not pushed apart
    value = contrastive_loss(pred, fact_ids, fact_targets, temperature=0.5)
    candidates = F.normalize(fact_targets[[1, 3, 4]], dim=1)
    logits = F.normalize(pred, dim=1) @ candidates.t() / 0.5
    labels = torch.tensor([1, 0, 1, 2])
    expected = -torch.log_softmax(logits, dim=1)[torch.arange(4), labels].mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def _mas_importance_total(model: torch.nn.Module, output) -> float:
    """Σ over parameters of (1/N) Σ_k |∂‖F(x_k)‖²/∂θ|, by per-sample backward passes."""
    model.eval()
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    totals = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for k in range(len(images)):
        model.zero_grad()
        output(images[k:k + 1]).pow(2).sum().backward()
        for name, p in model.named_parameters():
            totals[name] += p.grad.abs() / len(images)
    return sum(t.sum().item() for t in totals.values())


def test_importance_on_forward_is_nonzero_but_on_embed_vanishes():
    model = _small()
    on_forward = _mas_importance_total(model, model.forward)
    on_embed = _mas_importance_total(model, model.embed)
    assert on_forward > 1.0
    assert on_embed < 1e-4 * on_forward
    try:
        from mas_core.importance import mas_importance
    except ImportError:  # pragma: no cover - the estimator ships with mas_core
        return
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    omega = mas_importance(model, [images])
    total = sum(v.sum().item() for v in omega.values())
    assert total == pytest.approx(on_forward, rel=1e-4)
    assert math.isfinite(total)
