"""The importance estimators against brute-force definitions (docs/method.md §1, §4, §5: MAS, l-MAS, EWC Fisher)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mas_core.importance.layers as importance_layers
import mas_core.importance.per_sample as importance_per_sample
from mas_core.errors import EmptyDataError, InvalidOutputError, NoTrainableParametersError, NonFiniteError
from mas_core.importance import InvalidArgumentError, fisher_importance, hebbian_importance, mas_importance

DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------
# models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


class CNN(nn.Module):
    """Conv + BatchNorm + dropout, a grouped strided conv with reflect padding, a 'same' conv."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
            nn.Dropout(0.5),
            nn.Conv2d(6, 3, 2, padding="same", dilation=1, bias=False),
            nn.ReLU(),
        )
        self.norm = nn.BatchNorm1d(3 * 3 * 3)
        self.classifier = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.classifier(self.norm(self.features(x).flatten(1)))


class TwiceLinear(nn.Module):
    """One Linear applied twice per sample, plus a weight also used outside its module."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.other = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.other(h)) + 0.1 * F.linear(h, self.other.weight)
        return self.head(h)


class SequenceModel(nn.Module):
    """Embedding + Linear over a sequence (3-D input) + a free parameter + a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.embed(tokens)))  # [B, T, 4]
        return self.head(self.norm(h * self.scale).mean(dim=1))


def make_cnn() -> CNN:
    torch.manual_seed(1)
    model = CNN().to(DTYPE)
    with torch.no_grad():  # non-trivial running statistics
        for bn in (model.features[1], model.norm):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model


def model_and_data(kind: str, n: int = 13):
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP().to(DTYPE), torch.randn(n, 6, dtype=DTYPE)
    if kind == "cnn":
        return make_cnn(), torch.randn(n, 2, 6, 6, dtype=DTYPE)
    if kind == "twice":
        return TwiceLinear().to(DTYPE), torch.randn(n, 5, dtype=DTYPE)
    if kind == "sequence":
        return SequenceModel().to(DTYPE), torch.randint(0, 7, (n, 5))
    raise ValueError(kind)


def batches(x, size, y=None):
    return [(x[i:i + size], y[i:i + size]) if y is not None else x[i:i + size] for i in range(0, len(x), size)]


# ---------------------------------------------------------------------------------------------
# brute force: batch size 1, plain autograd


def brute_force(model, inputs, objective, phi):
    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    for k in range(len(inputs)):
        value = objective(model, k)
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads):
            if grad is not None:
                sums[name] += phi(grad)
    model.train(was_training)
    return {n: s / len(inputs) for n, s in sums.items()}


def brute_mas(model, x):
    return brute_force(model, x, lambda m, k: m(x[k:k + 1]).square().sum(), torch.abs)


def assert_close(actual, expected, rtol=1e-5):
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().clamp_min(1e-12)
        error = ((actual[name] - expected[name]).abs().max() / scale).item()
        assert error <= rtol, f"{name}: relative error {error:.3g}"


# ---------------------------------------------------------------------------------------------
# exact MAS


@pytest.mark.parametrize("kind", ["mlp", "cnn", "twice", "sequence"])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_exact_equals_brute_force_loop(kind):
    model, x = model_and_data(kind)
    expected = brute_mas(model, x)
    actual = mas_importance(model, batches(x, 5))  # partial last batch of 3
    assert_close(actual, expected)
    assert all(v.abs().sum() > 0 for v in actual.values())


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("patch_limit", [0, 10**9])
def test_both_per_sample_conv_paths_are_exact(monkeypatch, patch_limit):
    monkeypatch.setattr(importance_layers, "_STRIDED_PATCH_LIMIT", patch_limit)
    model, x = model_and_data("cnn")
    model.features[3] = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect").to(DTYPE)
    assert_close(mas_importance(model, batches(x, 5)), brute_mas(model, x))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("kernel,padding,padding_mode",
                         [(3, 1, "zeros"), ((3, 1), (1, 0), "zeros"), (3, 1, "circular")])
@pytest.mark.parametrize("chunk_elements", [1, 2**30])
def test_per_sample_conv_paths_chunks_and_padding_are_exact(monkeypatch, grouped, kernel, padding, padding_mode,
                                                            chunk_elements):
    """Both per-sample Conv2d paths, the grouped one given the padding as the convolution's argument
    (zeros) or a padded copy (other modes; the model's last conv pads "same"), in chunks of one sample
    or the whole batch; every conv of the model takes the path."""
    monkeypatch.setattr(importance_layers, "_GROUPED_PATCH_ROWS", (0, 10**9) if grouped else (-2, -1))
    monkeypatch.setattr(importance_layers, "_STRIDED_PATCH_LIMIT", 10**9)
    monkeypatch.setattr(importance_layers, "_CONV_CHUNK_ELEMENTS", chunk_elements)
    model, x = model_and_data("cnn")
    model.features[3] = nn.Conv2d(4, 6, kernel, stride=2, padding=padding, padding_mode=padding_mode).to(DTYPE)
    assert importance_layers.per_sample_conv_by_groups(model.features[3], 9) is grouped
    assert_close(mas_importance(model, batches(x, 5)), brute_mas(model, x))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_exact_path_handles_mlp_and_cnn_without_the_fallback(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the vmap fallback should not be needed here")

    monkeypatch.setattr(importance_per_sample, "_accumulate_vectorised", forbidden)
    for kind in ("mlp", "cnn"):
        model, x = model_and_data(kind)
        assert_close(mas_importance(model, batches(x, 4)), brute_mas(model, x))


def test_fallback_chunking_gives_the_same_result():
    model, x = model_and_data("sequence")
    full = mas_importance(model, batches(x, 13))
    for chunk in (1, 4):
        assert_close(mas_importance(model, batches(x, 13), chunk_size=chunk), full, rtol=1e-12)


def test_unused_head_gets_exact_zero_and_output_fn_is_used():
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 6).to(DTYPE), nn.ModuleList([nn.Linear(6, 2), nn.Linear(6, 2)]).to(DTYPE)
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    x = torch.randn(9, 4, dtype=DTYPE)
    output_fn = lambda m, batch: m["heads"][1](torch.relu(m["trunk"](batch)))  # noqa: E731
    actual = mas_importance(model, batches(x, 4), output_fn=output_fn)
    expected = brute_force(model, x, lambda m, k: output_fn(m, x[k:k + 1]).square().sum(), torch.abs)
    assert_close(actual, expected)
    assert torch.count_nonzero(actual["heads.0.weight"]) == 0 and torch.count_nonzero(actual["heads.0.bias"]) == 0


def test_dict_batches_and_labels_never_read():
    model, x = model_and_data("mlp")
    poisoned = [{"input": x[i:i + 4], "target": None} for i in range(0, len(x), 4)]
    assert_close(mas_importance(model, poisoned), brute_mas(model, x))


@pytest.mark.parametrize("kind", ["mlp", "cnn", "twice"])
def test_batch_mode_is_at_most_exact_and_equal_at_batch_size_one(kind):
    model, x = model_and_data(kind)
    exact = mas_importance(model, batches(x, 5))
    batch = mas_importance(model, batches(x, 5), mode="batch")
    for name in exact:
        assert torch.all(batch[name] <= exact[name] + 1e-12)
    assert any(torch.any(batch[n] < exact[n] - 1e-9) for n in exact)  # signs do cancel
    assert_close(mas_importance(model, batches(x, 1), mode="batch"), exact, rtol=1e-10)


@pytest.mark.parametrize("kind", ["cnn", "sequence"])
def test_exact_is_independent_of_batch_size(kind):
    model, x = model_and_data(kind, n=17)
    reference = mas_importance(model, batches(x, 17))
    for size in (1, 4, 16):  # 16 leaves a partial last batch of 1
        assert_close(mas_importance(model, batches(x, size)), reference, rtol=1e-10)


def test_modes_and_buffers_untouched_and_train_mode_restored():
    model, x = model_and_data("cnn")
    model.train()
    model.features[4].eval()  # one module in eval on purpose: per-module flags are restored
    flags = [m.training for m in model.modules()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for estimate in (
        lambda: mas_importance(model, batches(x, 5)),
        lambda: mas_importance(model, batches(x, 5), mode="batch"),
        lambda: hebbian_importance(model, batches(x, 5)),
        lambda: fisher_importance(model, batches(x, 5, torch.randint(0, 4, (len(x),)))),
    ):
        estimate()
        assert [m.training for m in model.modules()] == flags
        for name, value in model.named_buffers():
            assert torch.equal(value, buffers[name]), name
        for name, value in model.named_parameters():
            assert torch.equal(value, params[name]) and value.grad is None, name


def test_max_samples_is_exact_and_stops_reading():
    model, x = model_and_data("mlp", n=30)
    pulled = []

    def source():
        for i in range(0, 30, 8):
            pulled.append(i)
            yield x[i:i + 8]

    actual = mas_importance(model, source(), max_samples=13)
    assert_close(actual, brute_mas(model, x[:13]))
    assert pulled == [0, 8]
    assert_close(mas_importance(model, batches(x, 8), max_samples=16), brute_mas(model, x[:16]))
    with pytest.raises(InvalidArgumentError):
        mas_importance(model, batches(x, 8), max_samples=0)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 12), size=st.integers(1, 12), limit=st.one_of(st.none(), st.integers(1, 12)))
def test_property_exact_equals_brute_force_for_any_batching(n, size, limit):
    torch.manual_seed(n * 100 + size)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    x = torch.randn(n, 3, dtype=DTYPE)
    used = x if limit is None else x[:limit]
    assert_close(mas_importance(model, batches(x, size), max_samples=limit), brute_mas(model, used), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_are_clear():
    model, x = model_and_data("mlp")
    with pytest.raises(EmptyDataError):
        mas_importance(model, [])
    with pytest.raises(EmptyDataError):
        hebbian_importance(model, [x[:0]])
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(NoTrainableParametersError):
        mas_importance(frozen, [torch.randn(2, 3)])
    with pytest.raises(InvalidOutputError, match="not a tensor"):
        mas_importance(model, [x], output_fn=lambda m, b: (m(b), 1))
    with pytest.raises(InvalidOutputError, match="floating-point"):
        mas_importance(model, [x], output_fn=lambda m, b: m(b).argmax(1))
    with pytest.raises(InvalidOutputError, match="batch as its first dimension"):
        mas_importance(model, [x], output_fn=lambda m, b: m(b).sum())
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="body.0.weight"):
        mas_importance(model, [bad])
    with pytest.raises(InvalidArgumentError):
        mas_importance(model, [x], mode="sum")
    with pytest.raises(InvalidArgumentError):
        mas_importance(model, x)  # a bare tensor is not an iterable of batches


# ---------------------------------------------------------------------------------------------
# Hebbian l-MAS


def brute_hebbian(model, x):
    """Ω = (2/N) Σ_k Σ_positions |y x| from explicit per-sample, per-position loops."""
    records = {}

    def hook(module, args, output):
        records.setdefault(module, []).append((args[0].detach(), output.detach()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    model.eval()
    with torch.no_grad():
        for k in range(len(x)):
            model(x[k:k + 1])
    for h in handles:
        h.remove()
    result = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for layer_input, output in records.get(module, []):
            if isinstance(module, nn.Linear):
                y, a = output.reshape(-1, module.out_features), layer_input.reshape(-1, module.in_features)
                for t in range(len(y)):
                    result[f"{prefix}weight"] += torch.outer(y[t].abs(), a[t].abs())
                    if module.bias is not None:
                        result[f"{prefix}bias"] += y[t].abs()
                continue
            pad = module.padding if not isinstance(module.padding, str) else (0, 0)
            padded = F.pad(layer_input, [pad[1], pad[1], pad[0], pad[0]],
                           mode="constant" if module.padding_mode == "zeros" else module.padding_mode)[0]
            kh, kw = module.kernel_size
            sh, sw = module.stride
            group_in = module.in_channels // module.groups
            group_out = module.out_channels // module.groups
            weight = result[f"{prefix}weight"]
            for i in range(output.shape[2]):
                for j in range(output.shape[3]):
                    for o in range(module.out_channels):
                        g = o // group_out
                        y = output[0, o, i, j].abs()
                        if module.bias is not None:
                            result[f"{prefix}bias"][o] += y
                        patch = padded[g * group_in:(g + 1) * group_in, i * sh:i * sh + kh, j * sw:j * sw + kw]
                        weight[o] += y * patch.abs()
    return {n: 2 * v / len(x) for n, v in result.items()}


def test_hebbian_equals_brute_force():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 2, 3, stride=2, padding=1, groups=2, padding_mode="reflect"), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).to(DTYPE)
    x = torch.randn(7, 2, 6, 6, dtype=DTYPE)
    actual = hebbian_importance(model, batches(x, 3))
    expected = brute_hebbian(model, x)
    assert_close(actual, expected, rtol=1e-10)
    assert torch.count_nonzero(actual["1.weight"]) == 0  # BatchNorm: zero by definition


def test_hebbian_over_a_sequence_and_single_linear_equals_mas():
    torch.manual_seed(4)
    layer = nn.Linear(5, 3).to(DTYPE)
    x = torch.randn(9, 5, dtype=DTYPE)
    # for one Linear layer ‖y‖² has gradient 2 y xᵀ, so l-MAS equals global MAS exactly
    assert_close(hebbian_importance(layer, batches(x, 4)), mas_importance(layer, batches(x, 4)), rtol=1e-10)
    sequence = torch.randn(4, 6, 5, dtype=DTYPE)
    expected = brute_hebbian(layer, sequence)
    assert_close(hebbian_importance(layer, [sequence]), expected, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Fisher


@pytest.mark.parametrize("kind", ["mlp", "cnn", "twice"])
def test_fisher_equals_brute_force(kind):
    model, x = model_and_data(kind)
    classes = {"mlp": 3, "cnn": 4, "twice": 2}[kind]
    y = torch.randint(0, classes, (len(x),))
    expected = brute_force(model, x, lambda m, k: F.cross_entropy(m(x[k:k + 1]), y[k:k + 1]), torch.square)
    assert_close(fisher_importance(model, batches(x, 5, y)), expected)


def test_fisher_with_a_per_sample_loss_fn():
    model, tokens = model_and_data("sequence")
    targets = torch.randn(len(tokens), 3, dtype=DTYPE)
    data = batches(tokens, 4, targets)
    loss_fn = lambda m, batch: (m(batch[0]) - batch[1]).square().sum(dim=1)  # noqa: E731
    expected = brute_force(
        model, tokens, lambda m, k: (m(tokens[k:k + 1]) - targets[k:k + 1]).square().sum(), torch.square
    )
    assert_close(fisher_importance(model, data, loss_fn=loss_fn), expected)
    with pytest.raises(InvalidOutputError, match="per-sample losses"):
        fisher_importance(model, data, loss_fn=lambda m, batch: (m(batch[0]) - batch[1]).square().mean())


class DiscardedCall(nn.Module):
    """A Linear called once with its output thrown away, its weight used elsewhere once."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        self.layer(x)  # discarded
        return self.head(torch.tanh(x @ self.layer.weight.t()))


def test_a_parameter_used_outside_its_module_is_detected_and_no_grad_context_is_ignored():
    torch.manual_seed(6)
    model = DiscardedCall().to(DTYPE)
    x = torch.randn(9, 4, dtype=DTYPE)
    expected = brute_mas(model, x)
    assert_close(mas_importance(model, batches(x, 4)), expected)
    assert torch.count_nonzero(expected["layer.bias"]) == 0
    with torch.no_grad():
        assert_close(mas_importance(model, batches(x, 4)), expected)
