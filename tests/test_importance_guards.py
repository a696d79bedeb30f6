"""Shapes that lie to the exact per-sample engine (issue 11): each case against the brute-force
per-sample definition (relative error ≤ 1e-6, float64) or a clear one-line error, never a wrong Ω."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mas_core.errors import InvalidOutputError
from mas_core.importance import OnlineImportance, fisher_importance, hebbian_importance, mas_importance

DTYPE = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def brute_force(model: nn.Module, count: int, sample_objective, phi=torch.abs) -> dict[str, torch.Tensor]:
    """(1/N) Σ_n φ(∂s_n/∂θ), one sample at a time, plain autograd."""
    model.eval()
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for n in range(count):
        grads = torch.autograd.grad(sample_objective(n), list(parameters.values()), allow_unused=True)
        for name, grad in zip(parameters, grads):
            if grad is not None:
                sums[name] += phi(grad)
    return {name: value / count for name, value in sums.items()}


def relative_error(actual: dict, expected: dict) -> float:
    assert actual.keys() == expected.keys()
    return max(float((actual[k] - expected[k]).abs().max() / expected[k].abs().max().clamp_min(1e-12))
               for k in expected)


class Prototypes(nn.Module):
    """A Linear applied to a table of 5 learned prototypes: its input has 5 rows whatever the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 4)
        self.prototypes = nn.Parameter(torch.randn(5, 6))
        self.project = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x) @ self.project(self.prototypes).T


def test_a_layer_input_with_batch_size_rows_that_is_not_per_sample_takes_the_exact_path() -> None:
    torch.manual_seed(0)
    model = Prototypes().to(DTYPE)
    x = torch.randn(10, 6, dtype=DTYPE)
    expected = brute_force(model, 10, lambda n: model(x[n:n + 1]).square().sum())
    assert relative_error(mas_importance(model, [x[:5], x[5:]]), expected) <= 1e-6  # batches of 5 = 5 prototypes
    assert relative_error(mas_importance(model, [x[:5], x[5:8], x[8:]]), expected) <= 1e-6
    stream = OnlineImportance(model)
    for begin in (0, 5):
        stream.update(x[begin:begin + 5])
    assert relative_error(stream.importance(), expected) <= 1e-6
    labels = torch.randint(0, 5, (10,))
    ce = nn.functional.cross_entropy
    expected_fisher = brute_force(model, 10, lambda n: ce(model(x[n:n + 1]), labels[n:n + 1]), torch.square)
    fisher = fisher_importance(model, [(x[:5], labels[:5]), (x[5:], labels[5:])])
    assert relative_error(fisher, expected_fisher) <= 1e-6


def _shared_table_case():
    """A Linear + LayerNorm model, 8 inputs and a [4, 4] table shared by every sample of a batch of
    4 (so it has batch-size rows without being per-sample); the output projects onto the table."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4)).to(DTYPE)
    x = torch.randn(8, 6, dtype=DTYPE)
    table = torch.randn(4, 4, dtype=DTYPE)

    def output_fn(module, batch):
        return module(batch[0]) @ batch[1].T

    return model, x, table, output_fn


def test_a_batch_leaf_with_batch_size_rows_that_is_not_per_sample_is_not_cut() -> None:
    """The batch carries a [B, 4] table shared by all its samples (B = 4); LayerNorm's parameters go
    through the fallback, which must not hand each sample one row of the table."""
    model, x, table, output_fn = _shared_table_case()

    expected = brute_force(model, 8, lambda n: output_fn(model, (x[n:n + 1], table)).square().sum())
    actual = mas_importance(model, [(x[:4], table), (x[4:], table)], output_fn=output_fn)
    assert relative_error(actual, expected) <= 1e-6
    # per-sample leaves (the labels) are still cut for the fast vmap fallback: same numbers
    labels = torch.randint(0, 4, (8,))
    expected = brute_force(model, 8, lambda n: model(x[n:n + 1]).square().sum())
    assert relative_error(mas_importance(model, [(x[:4], labels[:4]), (x[4:], labels[4:])]), expected) <= 1e-6


class CheckpointedFirst(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.body, x, use_reentrant=self.reentrant))


class CheckpointedMiddle(CheckpointedFirst):
    def __init__(self, reentrant: bool) -> None:
        super().__init__(reentrant)
        self.first = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.first(x))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("model_class", [CheckpointedFirst, CheckpointedMiddle])
def test_reentrant_checkpointing_raises_instead_of_a_zero_omega(model_class) -> None:
    torch.manual_seed(0)
    model = model_class(reentrant=False).to(DTYPE)
    x = torch.randn(8, 6, dtype=DTYPE)
    expected = brute_force(model, 8, lambda n: model(x[n:n + 1]).square().sum())
    assert relative_error(mas_importance(model, [x[:4], x[4:]]), expected) <= 1e-6  # non-reentrant: exact
    model.reentrant = True
    with pytest.raises(InvalidOutputError, match="use_reentrant=False") as error:
        mas_importance(model, [x[:4], x[4:]])
    assert "\n" not in str(error.value)
    if model_class is CheckpointedFirst:
        assert "'body.0.weight'" in str(error.value)


def test_unused_heads_pass_the_hidden_parameter_check_with_exact_zero() -> None:
    torch.manual_seed(0)
    trunk, head, other = nn.Linear(6, 5).double(), nn.Linear(5, 3).double(), nn.Linear(5, 3).double()
    model = nn.ModuleDict({"trunk": trunk, "head": head, "other": other})
    x = torch.randn(9, 6, dtype=DTYPE)
    omega = mas_importance(model, [x[:4], x[4:]], output_fn=lambda m, b: m["head"](m["trunk"](b)))
    assert float(omega["other.weight"].abs().sum()) == 0.0 and float(omega["trunk.weight"].abs().sum()) > 0


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_recurrent_layers_are_exact(cell) -> None:
    torch.manual_seed(0)
    model = Recurrent(cell).to(DTYPE)
    x = torch.randn(7, 4, 3, dtype=DTYPE)
    expected = brute_force(model, 7, lambda n: model(x[n:n + 1]).square().sum())
    assert relative_error(mas_importance(model, [x[:3], x[3:]]), expected) <= 1e-6
    assert relative_error(mas_importance(model, [x[:3], x[3:]], chunk_size=2), expected) <= 1e-6
    assert all(float(value.abs().sum()) > 0 for value in expected.values())


class _RefusesBackward(torch.autograd.Function):
    """Stands for a backward that refuses to run (cuDNN's RNN backward in eval mode)."""

    @staticmethod
    def forward(ctx, x, weight):
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this backward can only be called in training mode")


class Refusing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RefusesBackward.apply(x, self.scale)


def test_a_backward_that_cannot_run_is_a_clear_error_naming_the_parameter() -> None:
    with pytest.raises(InvalidOutputError, match="'scale' cannot be computed in eval mode") as error:
        mas_importance(Refusing(), [torch.randn(3, 4, dtype=DTYPE)])
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------ l-MAS and the max_samples cap read the same guards

def hebbian_brute_force(model: nn.Module, samples: list, output_fn=None) -> dict[str, torch.Tensor]:
    """l-MAS by its definition, (2/N) Σ_k Σ_{rows of every Linear call in sample k's own forward} |y x|,
    one sample at a time, with plain hooks (Linear layers only; other parameters 0)."""
    sums = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    names = {id(p): name for name, p in model.named_parameters()}

    def hook(module, args, output):
        x, y = args[0].reshape(-1, module.in_features).abs(), output.reshape(-1, module.out_features).abs()
        sums[names[id(module.weight)]] += y.T @ x
        sums[names[id(module.bias)]] += y.sum(dim=0)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for sample in samples:
            model(sample) if output_fn is None else output_fn(model, sample)
    for handle in handles:
        handle.remove()
    return {name: 2 * value / len(samples) for name, value in sums.items()}


def test_hebbian_with_a_layer_input_of_batch_size_rows_that_is_not_per_sample_is_exact() -> None:
    """Prototypes.project sees the 5 prototypes in every sample's forward; with batches of 5 its input
    has B rows. The old sum over the batch's rows counted it once per batch (1/5 of its Ω)."""
    torch.manual_seed(0)
    model = Prototypes().to(DTYPE)
    x = torch.randn(10, 6, dtype=DTYPE)
    expected = hebbian_brute_force(model, [x[n:n + 1] for n in range(10)])
    with torch.no_grad():  # what the old sum over the rows of each batch gave: the table once per batch
        batched_sum = 2 * (model.project(model.prototypes).abs().T @ model.prototypes.abs()) * 2 / 10
    assert float((expected["project.weight"] - batched_sum).abs().max()) > 0.5 * float(batched_sum.abs().max())
    assert relative_error(hebbian_importance(model, [x[:5], x[5:]]), expected) <= 1e-6
    assert relative_error(hebbian_importance(model, [x[:5], x[5:8], x[8:]]), expected) <= 1e-6
    stream = OnlineImportance(model, estimator="hebbian")
    for begin in (0, 5):
        stream.update(x[begin:begin + 5])
    assert relative_error(stream.importance(), expected) <= 1e-6
    # the max_samples cap: the first 7 samples, the batch of 5 that crosses it counted to its 2nd sample
    first7 = hebbian_brute_force(model, [x[n:n + 1] for n in range(7)])
    assert relative_error(hebbian_importance(model, [x[:5], x[5:]], max_samples=7), first7) <= 1e-6
    capped = OnlineImportance(model, estimator="hebbian", max_samples=7)
    assert [capped.update(x[:5]), capped.update(x[5:])] == [5, 2]
    assert relative_error(capped.importance(), first7) <= 1e-6


class TableHead(nn.Module):
    """The batch carries a [B, 4] table shared by all its samples; ``project`` reads that table."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 4)
        self.project = nn.Linear(4, 4)


def _table_output(module: TableHead, batch) -> torch.Tensor:
    return module.encoder(batch[0]) @ module.project(batch[1]).T


def test_a_linear_reading_a_batch_table_of_batch_size_rows_is_not_taken_for_per_sample() -> None:
    """Cutting the batch cuts the table, so the cut run is no run of the first B − 1 samples: its layer
    inputs say nothing. MAS takes the exact path; l-MAS cannot tell the samples apart and says so."""
    torch.manual_seed(0)
    model = TableHead().to(DTYPE)
    x = torch.randn(8, 6, dtype=DTYPE)
    table = torch.randn(4, 4, dtype=DTYPE)
    expected = brute_force(model, 8, lambda n: _table_output(model, (x[n:n + 1], table)).square().sum())
    batches = [(x[:4], table), (x[4:], table)]
    assert relative_error(mas_importance(model, batches, output_fn=_table_output), expected) <= 1e-6
    with pytest.raises(InvalidOutputError, match="l-MAS cannot tell .*'project'.*batches of one sample") as error:
        hebbian_importance(model, batches, output_fn=_table_output)
    assert "\n" not in str(error.value)
    one_by_one = [(x[n:n + 1], table) for n in range(8)]  # batches of one sample: exact, nothing to tell apart
    assert relative_error(hebbian_importance(model, one_by_one, output_fn=_table_output),
                          hebbian_brute_force(model, one_by_one, _table_output)) <= 1e-6


def test_the_max_samples_cap_never_cuts_a_table_that_only_looks_per_sample() -> None:
    """Batches (x[4], table[4]) capped at 6 samples: the old cap cut the second batch's table to 2 rows."""
    model, x, table, output_fn = _shared_table_case()

    batches = [(x[:4], table), (x[4:], table)]
    expected = brute_force(model, 6, lambda n: output_fn(model, (x[n:n + 1], table)).square().sum())
    assert relative_error(mas_importance(model, batches, output_fn=output_fn, max_samples=6), expected) <= 1e-6
    stream = OnlineImportance(model, output_fn=output_fn, max_samples=6)
    assert [stream.update(batch) for batch in batches] == [4, 2]
    assert relative_error(stream.importance(), expected) <= 1e-6
    # batch mode: (1/N) Σ_batches |∂ Σ_{counted n in batch} s_n/∂θ|, the second batch's sum over samples 4, 5
    params = dict(model.named_parameters())
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    for members in (range(0, 4), range(4, 6)):
        total = sum(output_fn(model, (x[n:n + 1], table)).square().sum() for n in members)
        for name, grad in zip(params, torch.autograd.grad(total, list(params.values()))):
            sums[name] += grad.abs()
    batch_mode = mas_importance(model, batches, output_fn=output_fn, mode="batch", max_samples=6)
    assert relative_error(batch_mode, {name: value / 6 for name, value in sums.items()}) <= 1e-6
    labels = torch.randint(0, 4, (8,))
    ce = nn.functional.cross_entropy
    expected_fisher = brute_force(model, 6, lambda n: ce(output_fn(model, (x[n:n + 1], table)), labels[n:n + 1]),
                                  torch.square)
    fisher = fisher_importance(model, [(x[:4], labels[:4], table), (x[4:], labels[4:], table)],
                               loss_fn=lambda m, b: ce(output_fn(m, (b[0], b[2])), b[1], reduction="none"),
                               max_samples=6)
    assert relative_error(fisher, expected_fisher) <= 1e-6
