"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017), diagonal Fisher, and online EWC.

After task ``t`` the diagonal empirical Fisher of the task is estimated per sample from the
true labels (:func:`mas_core.importance.fisher_importance`, ``docs/method.md`` §5)::

    F_t = (1/N) Σ_n (∂ CE(F(x_n), y_n) / ∂θ)²

and accumulated into one importance with one anchor (constant memory)::

    offline (default):              F ← F_prev + F_t          θ* ← θ at the end of task t
    online (Schwarz et al. 2018):   F ← γ F_prev + F_t        θ* ← θ at the end of task t

The penalty, inherited from :class:`~mas_core.regularizers.quadratic.QuadraticAnchorRegularizer`,
is ``λ Σ_k F_k (θ_k − θ*_k)²`` with **no 1/2** (Kirkpatrick's λ/2 equals our λ/2). The
original offline EWC keeps one anchor per task (Σ_t λ F_t (θ − θ*_t)²); here the summed
Fisher is anchored at the latest parameters (for parameters that did not move since their
task, both agree). Parameters that did not exist at the last ``after_task`` (new heads) are free.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import Tensor, nn

from ..errors import InvalidArgumentError
from ..importance import fisher_importance
from .common import check_finite, check_max_samples, counting_samples
from .quadratic import QuadraticAnchorRegularizer


class EWC(QuadraticAnchorRegularizer):
    """EWC / online EWC: penalty ``λ Σ F (θ − θ*)²`` with the accumulated diagonal Fisher ``F``.

    ``output_fn(model, batch)`` gives the logits the Fisher is taken of (default
    ``model(input)``: the active head), with the cross-entropy against the true labels as
    the per-sample loss; ``loss_fn(model, batch) -> Tensor [B]`` replaces both with any
    per-sample loss (e.g. the slot regression loss of an embedding model).
    ``max_samples`` caps the samples used per task.
    ``gamma`` (online only) decays the previous Fisher: ``F ← γ F_prev + F_t``.
    ``penalty_step`` (``"proximal"``, the default, | ``"gradient"``, the paper's form) and ``lam_scale``
    (``"none"`` | ``"mean"``): ``docs/method.md`` §13.
    """

    name = "ewc"
    display_name = "EWC"
    importance_estimator = "fisher"
    after_task_data = "labelled"
    importance_from_loss = True  # the Fisher of the experiment's per-sample loss (loss_fn)
    importance_state_key = "fisher"
    required_extra_keys = ("tasks_seen",)

    def __init__(self, lam: float = 1.0, *, online: bool = False, gamma: float = 1.0,
                 output_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                 loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                 max_samples: int | None = None, penalty_step: str = "proximal", lam_scale: str = "none") -> None:
        super().__init__(lam, penalty_step=penalty_step, lam_scale=lam_scale)
        if output_fn is not None and loss_fn is not None:
            raise InvalidArgumentError("EWC takes output_fn (logits, cross-entropy) or loss_fn (per-sample losses), not both")
        self.online = bool(online)
        gamma = float(gamma)
        if not 0.0 <= gamma <= 1.0:
            raise InvalidArgumentError(f"gamma must be in [0, 1], got {gamma}")
        if not self.online and gamma != 1.0:
            raise InvalidArgumentError(f"gamma={gamma} only applies to online EWC: pass online=True or leave gamma=1")
        self.gamma = gamma
        self.output_fn = output_fn
        self.loss_fn = loss_fn
        self.max_samples = check_max_samples(max_samples)
        self.tasks_seen = 0

    @property
    def fisher(self) -> dict[str, Tensor]:
        """The accumulated diagonal Fisher, keyed by parameter name (the same as :attr:`importance`)."""
        return dict(self._importance)

    def after_task(self, model: nn.Module, data: Iterable[Any]) -> None:
        """Estimate this task's Fisher on labelled ``data``, accumulate it, and anchor at the current θ."""
        data, used = counting_samples(data, self.max_samples)
        new = fisher_importance(model, data, output_fn=self.output_fn, loss_fn=self.loss_fn,
                                max_samples=self.max_samples)
        self.note_importance("fisher", used())
        check_finite("the Fisher", new, "check the data and the model's outputs")
        self.check_shapes(new)
        decay = self.gamma if self.online else 1.0
        accumulated: dict[str, Tensor] = {}
        for name, value in new.items():  # F ← γ F_prev + F_t
            previous = self._importance.get(name)
            value = value.detach()
            accumulated[name] = value.clone() if previous is None else decay * previous.to(value.device) + value
        for name, previous in self._importance.items():
            if name not in accumulated:
                accumulated[name] = decay * previous
        self.tasks_seen += 1
        self.consolidate(model, accumulated)

    def accumulation_rule(self) -> str:
        """``"sum"`` (offline EWC) or ``"online (γ=…)"``: ``F ← γ F + F_t``."""
        return f"online (γ={self.gamma:g})" if self.online else "sum"

    def extra_state(self) -> dict[str, Any]:
        return {"tasks_seen": self.tasks_seen}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.tasks_seen = int(state["tasks_seen"])

    def __repr__(self) -> str:
        return (f"EWC(lam={self.lam}, online={self.online}, gamma={self.gamma}, max_samples={self.max_samples}, "
                f"penalty_step={self.penalty_step!r}, lam_scale={self.lam_scale!r})")
