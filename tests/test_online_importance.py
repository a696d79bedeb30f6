"""Online importance (docs/method.md §12): the streaming accumulator against the one-pass estimators,
saving/resuming, merging, several processes, and MAS taking its Ω."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mas_core import MAS, LocalMAS, OnlineImportance, batch_input, hebbian_importance, mas_importance, mix_importance
from mas_core.errors import CheckpointMismatchError, EmptyDataError, InvalidArgumentError, MASStateError, NonFiniteError
from mas_core.distributed import leave_process_group

from test_importance import SequenceModel  # Embedding + sequence Linear + LayerNorm: the vmap fallback

DTYPE = torch.float64
README = Path(__file__).resolve().parents[1] / "README.md"


# ---------------------------------------------------------------------------------------------
# models: an MLP, a conv net (BatchNorm, dropout), a multi-head net, a sequence model (vmap fallback)


class MultiHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 6), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(6, 2), nn.Linear(6, 3)])

    def forward(self, x, head: int = 0):
        return self.heads[head](self.trunk(x))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.Dropout(0.5), nn.ReLU())
        self.classifier = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def head_one(model, batch):
    return model(batch_input(batch), head=1)


def model_and_inputs(kind: str, n: int = 37):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DTYPE)
        return model, torch.randn(n, 6, dtype=DTYPE), None
    if kind == "multihead":
        return MultiHead().to(DTYPE), torch.randn(n, 5, dtype=DTYPE), head_one
    if kind == "conv":
        model = ConvNet().to(DTYPE)
        with torch.no_grad():
            model.features[1].running_mean.uniform_(-0.5, 0.5)
            model.features[1].running_var.uniform_(0.5, 2.0)
        return model, torch.randn(n, 2, 6, 6, dtype=DTYPE), None
    if kind == "sequence":
        return SequenceModel().to(DTYPE), torch.randint(0, 7, (n, 5)), None
    raise ValueError(kind)


def random_batches(x, seed: int):
    """``x`` cut into consecutive batches of random sizes 1..9 (size 1 included)."""
    generator = torch.Generator().manual_seed(seed)
    cuts, start = [], 0
    while start < len(x):
        size = 1 if not cuts else int(torch.randint(1, 10, (), generator=generator))
        cuts.append(x[start:start + size])
        start += size
    return cuts


def relative_error(actual, expected) -> float:
    assert actual.keys() == expected.keys()
    return max(float((actual[n] - expected[n]).abs().max() / expected[n].abs().max().clamp_min(1e-300))
               for n in expected)


def equal_states(a: OnlineImportance, b: OnlineImportance) -> bool:
    return a.count == b.count and all(torch.equal(a.sums[n], b.sums[n]) for n in a.sums)


# ---------------------------------------------------------------------------------------------
# the accumulator equals the one-pass estimators over the concatenated stream


@pytest.mark.parametrize("kind", ["mlp", "multihead", "conv", "sequence"])
def test_stream_equals_mas_importance_over_the_concatenated_stream(kind):
    model, x, output_fn = model_and_inputs(kind)
    online = OnlineImportance(model, output_fn=output_fn)
    pieces = random_batches(x, seed=3)
    assert len(pieces[0]) == 1 and len({len(p) for p in pieces}) > 3
    for piece in pieces:
        assert online.update(piece) == len(piece)
    expected = mas_importance(model, [x], output_fn=output_fn)
    assert online.count == len(x)
    assert relative_error(online.importance(), expected) <= 1e-6
    assert all(float(value.abs().sum()) > 0 for name, value in expected.items() if not name.startswith("heads.0"))
    if kind == "multihead":  # the inactive head gets exactly 0
        assert all(float(online.importance()[name].abs().sum()) == 0 for name in ("heads.0.weight", "heads.0.bias"))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_hebbian_stream_equals_hebbian_importance(kind):
    model, x, output_fn = model_and_inputs(kind)
    online = OnlineImportance(model, estimator="hebbian", output_fn=output_fn)
    assert online.update_from(random_batches(x, seed=5)) == len(x)
    assert relative_error(online.importance(), hebbian_importance(model, [x])) <= 1e-6


def test_max_samples_truncates_as_the_one_pass_estimator_and_batch_layouts_are_read():
    model, x, output_fn = model_and_inputs("multihead")
    online = OnlineImportance(model, output_fn=output_fn, max_samples=10)
    labels = torch.zeros(len(x), dtype=torch.long)
    assert online.update((x[:4], labels[:4])) == 4
    assert online.update({"input": x[4:12], "target": labels[4:12]}) == 6  # truncated at the limit
    assert online.is_full and online.update(x[12:20]) == 0 and online.count == 10
    expected = mas_importance(model, [x], output_fn=output_fn, max_samples=10)
    assert relative_error(online.importance(), expected) <= 1e-12


def test_float32_model_sums_in_float64_and_returns_the_parameter_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(50, 6)
    online = OnlineImportance(model)
    online.update_from(random_batches(x, seed=1))
    assert all(value.dtype == torch.float64 for value in online.sums.values())
    omega = online.importance()
    assert all(value.dtype == torch.float32 for value in omega.values())
    assert relative_error(omega, mas_importance(model, [x])) <= 1e-5


# ---------------------------------------------------------------------------------------------
# the model is left as it was


def test_model_mode_parameters_buffers_and_grads_untouched_and_works_under_no_grad():
    model, x, _ = model_and_inputs("conv")
    model.train()
    model.features[1].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    model.classifier.weight.grad = torch.full_like(model.classifier.weight, 0.25)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    online = OnlineImportance(model)
    with torch.no_grad():
        online.update(x[:20])
    online.update(x[20:])
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model.classifier.weight.grad, torch.full_like(model.classifier.weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    # eval mode was used: the result equals the estimate of an eval-mode model (dropout off)
    assert relative_error(online.importance(), mas_importance(model, [x])) <= 1e-6
    with torch.inference_mode(), pytest.raises(InvalidArgumentError, match="inference_mode"):
        online.update(x[:2])


# ---------------------------------------------------------------------------------------------
# save, resume, merge


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("estimator", ["mas", "hebbian"])
def test_resumed_accumulator_equals_an_uninterrupted_one_bit_for_bit(estimator):
    model, x, output_fn = model_and_inputs("multihead")
    pieces = random_batches(x, seed=7)
    whole = OnlineImportance(model, estimator=estimator, output_fn=output_fn, output_label="head 1")
    first = OnlineImportance(model, estimator=estimator, output_fn=output_fn, output_label="head 1")
    for piece in pieces[:3]:
        whole.update(piece)
        first.update(piece)
    state = round_trip(first.state_dict())
    del first
    resumed = OnlineImportance(model, estimator=estimator, output_fn=output_fn, output_label="head 1")
    resumed.load_state_dict(state)
    for piece in pieces[3:]:
        whole.update(piece)
        resumed.update(piece)
    assert equal_states(resumed, whole)
    assert all(torch.equal(resumed.importance()[n], whole.importance()[n]) for n in whole.sums)


def test_merge_of_two_halves_equals_the_whole():
    model, x, output_fn = model_and_inputs("multihead")
    whole, left, right = (OnlineImportance(model, output_fn=output_fn) for _ in range(3))
    whole.update_from(random_batches(x, seed=2))
    left.update_from(random_batches(x[:15], seed=3))
    right.update_from(random_batches(x[15:], seed=4))
    assert left.merge(right) is left
    assert left.count == whole.count == len(x) and right.count == len(x) - 15
    assert relative_error(left.importance(), whole.importance()) <= 1e-12


def test_merge_and_load_refuse_other_models_options_and_parameters():
    model, x, _ = model_and_inputs("mlp")
    online = OnlineImportance(model)
    online.update(x)
    with pytest.raises(InvalidArgumentError, match="different options"):
        online.merge(OnlineImportance(model, estimator="hebbian"))
    with pytest.raises(InvalidArgumentError, match="different options"):
        online.merge(OnlineImportance(model, output_label="head 2"))
    other_model, _, _ = model_and_inputs("multihead")
    with pytest.raises(InvalidArgumentError, match="different models: parameter"):
        online.merge(OnlineImportance(other_model))
    moved = model_and_inputs("mlp")[0]
    with torch.no_grad():
        moved[0].weight[0, 0] += 1e-3
    with pytest.raises(InvalidArgumentError, match="'0.weight' has other values"):
        online.merge(OnlineImportance(moved))
    with pytest.raises(InvalidArgumentError, match="itself"):
        online.merge(online)
    with pytest.raises(InvalidArgumentError, match="another OnlineImportance"):
        online.merge(online.importance())
    state = online.state_dict()
    for target, pattern in ((OnlineImportance(moved), "another model"),
                            (OnlineImportance(model, estimator="hebbian"), "options"),
                            (OnlineImportance(other_model), "another model")):
        with pytest.raises(CheckpointMismatchError, match=pattern):
            target.load_state_dict(state)
    with pytest.raises(CheckpointMismatchError, match="missing"):
        OnlineImportance(model).load_state_dict({"sums": state["sums"]})
    with pytest.raises(CheckpointMismatchError, match="version"):
        OnlineImportance(model).load_state_dict({**state, "version": 99})
    assert online.count == len(x)  # nothing above changed it


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_are_clear_and_a_bad_batch_leaves_the_accumulator_unchanged():
    model, x, _ = model_and_inputs("mlp")
    online = OnlineImportance(model)
    with pytest.raises(EmptyDataError, match="no samples yet"):
        online.importance()
    with pytest.raises(EmptyDataError, match="no samples"):
        online.update(x[:0])
    online.update(x[:5])
    before = online.sums
    bad = x[5:8].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="not added"):
        online.update(bad)
    huge = torch.full((2, 6), 1e200, dtype=DTYPE)  # ‖F‖² overflows
    with pytest.raises(NonFiniteError):
        online.update(huge)
    assert online.count == 5 and all(torch.equal(before[n], online.sums[n]) for n in before)
    for kwargs in ({"estimator": "batch"}, {"estimator": "fisher"}, {"max_samples": 0}, {"chunk_size": 0},
                   {"output_label": 3}):
        with pytest.raises(InvalidArgumentError):
            OnlineImportance(model, **kwargs)
    with pytest.raises(InvalidArgumentError, match="iterable of batches"):
        online.update_from(x)


# ---------------------------------------------------------------------------------------------
# MAS takes the accumulated Ω


def two_tasks_with(reg, model, data, use_accumulator: bool):
    for task in range(2):
        if use_accumulator:
            online = OnlineImportance(model, estimator="hebbian" if reg.mode == "hebbian" else "mas")
            online.update_from(data)
            reg.after_task(model, online)
        else:
            reg.after_task(model, data)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.05)


@pytest.mark.parametrize("make", [lambda: MAS(lam=0.5), lambda: MAS(accumulate="ema", ema_alpha=0.3),
                                  lambda: MAS(accumulate="alpha"), lambda: LocalMAS(lam=2.0)])
def test_after_task_with_an_accumulator_equals_after_task_on_the_same_data(make):
    model_a, x, _ = model_and_inputs("mlp")
    model_b, _, _ = model_and_inputs("mlp")
    data = random_batches(x, seed=9)
    direct, streamed = make(), make()
    two_tasks_with(direct, model_a, data, use_accumulator=False)
    two_tasks_with(streamed, model_b, data, use_accumulator=True)
    assert relative_error(streamed.importance, direct.importance) <= 1e-12
    assert all(torch.equal(streamed.anchors[n], direct.anchors[n]) for n in direct.anchors)
    assert streamed.tasks_seen == direct.tasks_seen == 2
    expected = float(direct.penalty(model_a).detach())
    assert abs(float(streamed.penalty(model_b).detach()) - expected) <= 1e-12 * expected


def test_mas_refuses_accumulators_it_cannot_use():
    model, x, _ = model_and_inputs("mlp")
    online = OnlineImportance(model)
    online.update(x)
    with pytest.raises(InvalidArgumentError, match="batch"):
        MAS(mode="batch").after_task(model, online)
    with pytest.raises(InvalidArgumentError, match="estimator='hebbian'"):
        LocalMAS().after_task(model, online)
    with torch.no_grad():
        model[0].bias.add_(0.01)  # the model moved since the queries were answered
    with pytest.raises(MASStateError, match="other parameters"):
        MAS().after_task(model, online)


def test_add_task_importance_validates_and_runs_the_accumulation_rule():
    model, x, _ = model_and_inputs("mlp")
    reg = MAS(lam=1.0)
    omega = mas_importance(model, [x])
    reg.add_task_importance(model, omega)
    reg.add_task_importance(model, {"2.bias": omega["2.bias"]})  # a subset: the others count as 0
    assert torch.equal(reg.importance["2.bias"], 2 * omega["2.bias"])
    assert torch.equal(reg.importance["0.weight"], omega["0.weight"])
    with pytest.raises(MASStateError, match="did you mean '0.weight'"):
        reg.add_task_importance(model, {"0.weigth": omega["0.weight"]})
    with pytest.raises(MASStateError, match="shape"):
        reg.add_task_importance(model, {"0.weight": omega["0.weight"].T})
    with pytest.raises(NonFiniteError):
        reg.add_task_importance(model, {"0.bias": torch.full_like(omega["0.bias"], float("inf"))})
    with pytest.raises(InvalidArgumentError, match="≥ 0"):
        reg.add_task_importance(model, {"0.bias": -omega["0.bias"]})
    assert reg.tasks_seen == 2


def test_mix_importance():
    model, x, _ = model_and_inputs("mlp")
    train = mas_importance(model, [x[:20]])
    queries = mas_importance(model, [x[20:]])
    assert all(torch.equal(mix_importance(train, queries, 0.0)[n], train[n]) for n in train)
    assert all(torch.equal(mix_importance(train, queries, 1)[n], queries[n]) for n in train)
    mixed = mix_importance(train, queries, 0.25)
    assert relative_error(mixed, {n: 0.75 * train[n] + 0.25 * queries[n] for n in train}) <= 1e-15
    reg = MAS()
    reg.add_task_importance(model, mixed)
    assert relative_error(reg.importance, mixed) == 0.0
    for weight in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(InvalidArgumentError, match="mixing weight"):
            mix_importance(train, queries, weight)
    with pytest.raises(InvalidArgumentError, match="only in the first"):
        mix_importance(train, {n: v for n, v in queries.items() if n != "2.bias"}, 0.5)
    with pytest.raises(InvalidArgumentError, match="shape"):
        mix_importance(train, {**queries, "0.weight": queries["0.weight"].T}, 0.5)


# ---------------------------------------------------------------------------------------------
# several processes: all_reduce gives the one-process accumulator


def _all_reduce_worker(rank: int, world: int, store_path: str, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        model, x, output_fn = model_and_inputs("multihead")
        online = OnlineImportance(model, output_fn=output_fn)
        online.update_from(random_batches(x[rank::world], seed=rank))
        online.all_reduce()
        if rank == 0:
            torch.save({"count": online.count, "omega": online.importance()}, result_path)
    except BaseException:
        leave_process_group(wait=False)
        raise
    leave_process_group()  # a barrier first: rank 1 does not tear the group down while rank 0 saves


def test_all_reduce_over_two_processes_equals_one_process(tmp_path):
    result = tmp_path / "result.pt"
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "store"), str(result)), nprocs=2, join=True)
    reduced = torch.load(result, weights_only=True)
    model, x, output_fn = model_and_inputs("multihead")
    assert reduced["count"] == len(x)
    assert relative_error(reduced["omega"], mas_importance(model, [x], output_fn=output_fn)) <= 1e-12


# ---------------------------------------------------------------------------------------------
# the README example


def test_readme_online_importance_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    block = next((text for text in blocks if "OnlineImportance" in text), None)
    assert block is not None, "README has no OnlineImportance example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    deployed, mas, model = namespace["deployed"], namespace["mas"], namespace["model"]
    assert os.path.exists(tmp_path / "importance.pt")
    assert deployed.count > 0
    assert all(torch.equal(mas.importance[n], deployed.importance()[n]) for n in deployed.sums)
    assert float(mas.penalty(model).detach()) == 0.0
