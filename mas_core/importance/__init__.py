"""Parameter importance estimators: exact MAS, batch-level MAS, Hebbian l-MAS, diagonal Fisher.

All estimators are pure functions of ``(model, data, output_fn)`` and return a dict
``{parameter name: Tensor}`` with one entry per parameter that has ``requires_grad=True``,
keyed by :meth:`torch.nn.Module.named_parameters` names and shaped like the parameter.
The definitions are in ``docs/method.md`` (N = number of samples actually seen):

* :func:`mas_importance`, ``mode="exact"`` (§1.1): ``Ω = (1/N) Σ_n |∂‖F(x_n)‖₂²/∂θ|``
  (elementwise; units of ‖F‖² per unit θ);
* :func:`mas_importance`, ``mode="batch"`` (§1.2), the estimator of the original code, Avalanche
  and FACIL, **for comparison only**: ``Ω_batch = (1/N) Σ_batches |∂ Σ_{n∈batch} ‖F(x_n)‖₂²/∂θ|``;
* :func:`hebbian_importance` (l-MAS, §4), forward passes only;
* :func:`fisher_importance` (§5): the diagonal empirical Fisher ``(1/N) Σ_n (∂ℓ_n/∂θ)²``, per sample;
* :class:`OnlineImportance` (§12): MAS or l-MAS accumulated from a stream of unlabelled batches
  (the inputs a deployed model answers) in constant memory; savable, resumable, mergeable;
  :func:`mix_importance` (§12): ``(1 − ρ) Ω_a + ρ Ω_b``.

``F(x)`` is ``output_fn(model, batch)`` when given, else ``model(batch_input(batch))``
(:mod:`mas_core.batches` lists the batch layouts). The model is put in eval mode while
estimating (dropout off, BatchNorm on its running statistics) and every module's previous
``training`` flag is restored afterwards. No buffer is written, no ``.grad`` is touched, and the
label-free estimators never read labels.

Where things are: ``mas.py``, ``fisher.py``, ``hebbian.py`` (the three public estimators);
``per_sample.py`` (the exact per-sample engine, shared by MAS and Fisher, and its vmap fallback);
``layers.py`` (closed-form per-sample gradients of Linear, Conv2d, BatchNorm); ``batch.py`` (the
batch-level estimate); ``common.py`` (F, batches, eval mode, the final average); ``online.py`` (the
streaming accumulator); ``mixing.py`` (mixing two estimates).

Several processes: when ``data`` is one rank's :class:`mas_core.distributed.RankShard`, each
rank sums ``φ(g_n)`` over its own samples on the module it is given (pass the unwrapped model,
never the DistributedDataParallel wrapper, whose backward averages gradients across ranks before
``φ`` could be applied), then the sums and the sample counts are all-reduced before dividing:
``Ω = Σ_r S_r / Σ_r N_r``, the single-process value, the same on every rank. ``max_samples``
then counts samples of the whole source.
"""
from __future__ import annotations

from ..errors import InvalidArgumentError
from .common import LossFn, OutputFn
from .fisher import fisher_importance
from .hebbian import hebbian_importance
from .mas import MAS_MODES, mas_importance
from .mixing import mix_importance
from .online import ESTIMATORS as ONLINE_ESTIMATORS
from .online import OnlineImportance, parameter_fingerprint

__all__ = [
    "InvalidArgumentError",
    "LossFn",
    "MAS_MODES",
    "ONLINE_ESTIMATORS",
    "OnlineImportance",
    "OutputFn",
    "fisher_importance",
    "hebbian_importance",
    "mas_importance",
    "mix_importance",
    "parameter_fingerprint",
]
