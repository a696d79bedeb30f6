"""Continual-learning methods sharing the :class:`~mas_core.regularizers.base.Regularizer` protocol, and their registry.

==========  ==========================================================  ==========================
name        method                                                      file
==========  ==========================================================  ==========================
finetune    no penalty (lower bound)                                    base.py
mas         Memory Aware Synapses, ``λ Σ Ω (θ − θ*)²``                   mas.py
lmas        local (Hebbian) MAS: MAS with ``mode="hebbian"``             mas.py
ewc         EWC / online EWC, ``λ Σ F (θ − θ*)²``                        ewc.py
si          Synaptic Intelligence, path-integral Ω                      si.py
lwf         Learning without Forgetting (distillation)                  lwf.py
imm         Incremental Moment Matching, ``mode="mean"|"mode"``          imm.py
ebll        Encoder Based Lifelong Learning (LwF + autoencoder codes)   ebll.py
==========  ==========================================================  ==========================

MAS, l-MAS, EWC, SI and IMM's L2 transfer share the quadratic-anchor base of
``quadratic.py`` (Ω, θ*, the fused penalty ``λ Σ Ω (θ − θ*)²``, its checks and state);
``common.py`` holds the helpers every method uses. The formulas are in ``docs/method.md``.

``"joint"`` (training on the union of all tasks so far) is the upper bound handled
by :func:`mas_core.sequence.run_sequence`; it is not a regularizer.
"""
from __future__ import annotations

import inspect
from typing import Any

from ..errors import UnknownMethodError, UnknownOptionError, did_you_mean
from .base import Finetune, Regularizer, TaskInfo
from .ebll import EBLL
from .ewc import EWC
from .imm import IMM
from .lwf import LwF
from .mas import MAS, LocalMAS
from .quadratic import QuadraticAnchorRegularizer
from .si import SI


METHODS: dict[str, type[Regularizer]] = {
    "finetune": Finetune,
    "mas": MAS,
    "lmas": LocalMAS,
    "ewc": EWC,
    "si": SI,
    "lwf": LwF,
    "imm": IMM,
    "ebll": EBLL,
}

JOINT = "joint"
"""The name of the loop's joint mode (every task's data at once; no regularizer): accepted wherever a method is."""


def method_options(name: str) -> list[str]:
    """The keyword options :func:`make_regularizer` accepts for method ``name``."""
    parameters = inspect.signature(METHODS[_canonical(name)].__init__).parameters.values()
    return [p.name for p in parameters
            if p.name != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


def option_default(name: str, option: str) -> Any:
    """The constructor's default of ``option`` for method ``name`` (e.g. ``penalty_step`` → ``"proximal"``);
    ``None`` when the method takes no such option or has no default for it."""
    parameter = inspect.signature(METHODS[_canonical(name)].__init__).parameters.get(option)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise UnknownMethodError(f"a method name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key == JOINT:
        raise UnknownMethodError(
            "'joint' is the joint-training upper bound, not a regularizer: pass method='joint' to run_sequence"
        )
    if key not in METHODS:
        hint = did_you_mean(key, list(METHODS) + [JOINT])
        raise UnknownMethodError(f"unknown method {name!r}{hint} (valid: {', '.join(list(METHODS) + [JOINT])})")
    return key


def make_regularizer(name: str, **options: Any) -> Regularizer:
    """Build the method registered as ``name`` (case-insensitive; ``l-mas`` = ``lmas``) with ``options``.

    Unknown names raise :class:`~mas_core.errors.UnknownMethodError` naming the nearest
    valid name; unknown options raise :class:`UnknownOptionError` naming the valid ones.
    """
    key = _canonical(name)
    valid = method_options(key)
    for option in options:
        if option not in valid:
            hint = did_you_mean(option, valid)
            listed = ", ".join(valid) if valid else "none"
            raise UnknownOptionError(f"method {key!r} has no option {option!r}{hint} (valid options: {listed})")
    return METHODS[key](**options)


__all__ = [
    "METHODS", "make_regularizer", "method_options", "option_default", "UnknownOptionError",
    "Regularizer", "QuadraticAnchorRegularizer", "TaskInfo", "Finetune", "MAS", "LocalMAS", "EWC", "SI", "LwF", "IMM", "EBLL",
]
