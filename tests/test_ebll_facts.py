"""EBLL on the single-output fact embedding (docs/method.md §9): the features its autoencoders
encode (each branch's input to its projection MLP), its penalty on a model without heads
(λ_o·MSE of the output + the code term), and a run of the fact experiment with it."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mas_core.loop import OptimSettings
from mas_core.regularizers import EBLL, LwF, TaskInfo
from test_train import SMALL_MODEL, _config, make_tiny_fact_file
from triplets.facts.model import ModelConfig, build_model
from triplets.facts.train import train_run
from triplets.facts.train_config import DataConfig, EvalConfig, MethodConfig, TrainConfig

SLOT_DIM = 8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> Path:
    return make_tiny_fact_file(tmp_path_factory.mktemp("ebll") / "facts.h5", num_tasks=2, facts_per_task=4,
                               train_per_fact=4, test_per_fact=2, image_size=16, slot_dim=SLOT_DIM)


def _small_net():
    torch.manual_seed(0)
    return build_model(SMALL_MODEL, SLOT_DIM, 16)


def test_features_are_each_branchs_input_to_its_projection_on_the_net_and_its_branch_head():
    net = _small_net().eval()
    images = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        trunk = net.trunk_features(images)
        features = net.features(images)
        by_hand = torch.cat([net.subject_branch[:3](trunk), net.predicate_object_branch[:3](trunk)], dim=1)
        head = net.branch_head()
        assert features.shape == (5, 2 * 16 * SMALL_MODEL.branch_channels)        # conv block, 4×4 pool, flatten
        assert torch.equal(features, by_hand)
        assert torch.equal(head.features(trunk), features)                         # same on cached trunk features
        assert torch.equal(net.output_from_features(features), net(images))        # the rest of the branches
        assert torch.equal(head.output_from_features(features), head(trunk))


def test_features_of_the_pretrained_backbone_are_its_pretrained_features():
    config = ModelConfig(backbone="efficientnet_lite0", trunk_blocks=13, input_size=48, hidden_dim=16,
                         cache_features=True)
    net = build_model(config, SLOT_DIM, 16).eval()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        features = net.features(images)
        assert features.shape == (2, 2 * 1280)
        assert torch.equal(features, net.pretrained_output(images))
        trunk = net.trunk_features(images)
        assert torch.equal(net.branch_head().features(trunk), features)
        assert torch.equal(net.branch_head().output_from_features(features), net(images))


def _trained_ebll_on_head(ebll: EBLL):
    """A branch head on trunk features after task 1 with ``ebll``'s autoencoder, the snapshot of task 2
    taken, its weights then moved; returns (head, the snapshot's copy, trunk features of a batch)."""
    head = _small_net().branch_head()
    generator = torch.Generator().manual_seed(1)
    trunk = torch.rand(12, 16, 4, 4, generator=generator)
    ebll.before_task(head, TaskInfo(0))
    ebll.after_task(head, [(trunk[:6], torch.arange(6)), (trunk[6:], torch.arange(6))])
    ebll.before_task(head, TaskInfo(1))
    old = copy.deepcopy(head).eval()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return head.eval(), old, trunk


def test_ebll_penalty_of_the_fact_model_is_output_mse_plus_the_code_term():
    """penalty = λ_o · mean((out − out_old)²) + ae_lam · (1/B) Σ_k ‖σ(E f_k + b) − σ(E f_old,k + b)‖²."""
    ebll = EBLL(lam=0.7, code_dim=6, ae_lam=0.3, ae_epochs=3, ae_batch_size=4)
    head, old, trunk = _trained_ebll_on_head(ebll)
    assert len(ebll.encoders) == 1 and ebll.encoders[0]["weight"].shape == (6, 2 * 16 * 16)
    penalty = ebll.penalty(head, trunk)
    with torch.no_grad():
        weight, bias = ebll.encoders[0]["weight"], ebll.encoders[0]["bias"]
        f, f_old = head.features(trunk), old.features(trunk)
        codes = torch.sigmoid(f @ weight.T + bias) - torch.sigmoid(f_old @ weight.T + bias)
        by_hand = 0.7 * ((head(trunk) - old(trunk)) ** 2).mean() + 0.3 * (codes ** 2).sum(dim=1).mean()
    code_term = 0.3 * float((codes ** 2).sum(dim=1).mean())
    assert code_term > 1e-6                                                        # the term is there
    torch.testing.assert_close(penalty.detach(), by_hand, rtol=1e-6, atol=0)
    penalty.backward()                                                             # reaches the conv block
    assert float(head.subject_branch[0][0].weight.grad.abs().sum()) > 0
    # LwF at the same λ_o gives the output term alone
    lwf = LwF(lam=0.7)
    lwf.old_state = ebll.old_state
    torch.testing.assert_close(lwf.penalty(head, trunk).detach() + code_term, by_hand, rtol=1e-6, atol=0)


def test_ebll_penalty_is_zero_at_the_snapshot():
    ebll = EBLL(lam=1.0, code_dim=4, ae_epochs=1)
    head = _small_net().branch_head().eval()
    trunk = torch.rand(6, 16, 4, 4)
    ebll.before_task(head, TaskInfo(0))
    ebll.after_task(head, [(trunk, torch.arange(6))])
    ebll.before_task(head, TaskInfo(1))
    assert float(ebll.penalty(head, trunk).detach()) == 0.0


def test_lwf_penalty_of_a_single_output_model_is_unchanged_by_features():
    """LwF on a model that has ``features``: still exactly λ · MSE(model(x), old(x)) (its feature term is 0)."""
    lwf = LwF(lam=0.7)
    net = _small_net().train()
    images = torch.rand(6, 3, 16, 16)
    lwf.before_task(net, TaskInfo(0))
    lwf.before_task(net, TaskInfo(1))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.05)
    old = lwf.old_model(net)
    expected = 0.7 * F.mse_loss(net(images), old(images).detach())
    assert torch.equal(lwf.penalty(net, images), expected)


def _ebll_config(facts: Path, **options) -> TrainConfig:
    config = _config(facts, methods=[MethodConfig("ebll", {"code_dim": 8, "ae_lam": 1.0, "ae_epochs": 2, **options})],
                     epochs=1)
    return config


def test_ebll_trains_the_fact_model_and_resumes_as_an_uninterrupted_run(facts, tmp_path):
    straight = train_run(_ebll_config(facts), tmp_path / "straight", progress=False)
    matrix = straight["methods"]["ebll"]["accuracy_matrix"]
    assert len(matrix) == 2 and all(0.0 <= value <= 1.0 for value in matrix[1])
    state = torch.load(tmp_path / "straight" / "ebll" / "checkpoint.pt", weights_only=True)["regularizer"]
    assert len(state["encoders"]) == 2                                             # one autoencoder per task
    assert state["encoders"][0]["weight"].shape == (8, 2 * 16 * SMALL_MODEL.branch_channels)
    errors = state["reconstruction_errors"][0]
    assert errors[-1] < errors[0]                                                  # the reconstruction trained
    train_run(_ebll_config(facts), tmp_path / "resumed", progress=False, stop_after_task=1)
    resumed = train_run(_ebll_config(facts), tmp_path / "resumed", progress=False, resume=True)
    assert resumed["methods"]["ebll"]["accuracy_matrix"] == matrix
    first = torch.load(tmp_path / "straight" / "ebll" / "model.pt", weights_only=True)["model"]
    second = torch.load(tmp_path / "resumed" / "ebll" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_ebll_on_cached_pretrained_features(facts, tmp_path):
    """model.cache_features: the loop trains the branch head on cached trunk features; EBLL's
    autoencoders encode the 2·1280 pooled features of the pretrained branches."""
    config = TrainConfig(data=DataConfig(fact_file=str(facts)),
                         model=ModelConfig(backbone="efficientnet_lite0", trunk_blocks=13, input_size=48,
                                           hidden_dim=16, cache_features=True),
                         optim=OptimSettings(epochs=1, batch_size=8, lr=0.01),
                         methods=[MethodConfig("ebll", {"code_dim": 16, "ae_epochs": 2})],
                         eval=EvalConfig(index="none", batch_size=16), num_threads=1)
    results = train_run(config, tmp_path / "run", progress=False)
    assert len(results["methods"]["ebll"]["accuracy_matrix"]) == 2
    state = torch.load(tmp_path / "run" / "ebll" / "checkpoint.pt", weights_only=True)["regularizer"]
    assert [encoder["weight"].shape for encoder in state["encoders"]] == [(16, 2 * 1280)] * 2
    assert any((tmp_path / "run" / "features").glob("*.h5"))


def test_a_method_that_needs_the_loss_but_takes_no_loss_fn_is_still_refused(facts, tmp_path, monkeypatch):
    monkeypatch.setattr(EBLL, "importance_from_loss", True)
    with pytest.raises(Exception, match="takes no loss_fn"):
        train_run(_ebll_config(facts), tmp_path / "run", progress=False)
