"""Encoder Based Lifelong Learning (Rannen, Aljundi, Blaschko & Tuytelaars, ICCV 2017; ``docs/method.md`` §9).

After task ``t`` an undercomplete autoencoder is trained on the shared features
``f(x) = model.features(x)`` of the task's labelled data (model in eval mode), as in the paper
(Sec. 3, the autoencoder loss; the authors' ``cnn_autoencoder_with_classerror``): the
reconstruction must both resemble the features and keep the task solvable by the task's own
head ``h_t`` (frozen)::

    code = σ(E_t f + b_E)  (``code_dim`` < ``feature_dim``),   r(f) = D_t code + b_D
    minimise  (1/B) Σ_k [ ae_rec_lam · ‖r(f_k) − f_k‖²  +  CE(h_t(r(f_k)), y_k) ]
    (Adam, ``ae_epochs`` epochs, ``ae_lr``, batches of ``ae_batch_size``)

``ae_rec_lam`` is the paper's λ, 1e-6 by default (the authors' value, set for AlexNet's 9216-wide
pool5 features; on narrow features the classification term then dominates: raise it to make the
codes closer to a plain reconstruction). A model without ``heads`` (single output, no task head
to apply) trains its autoencoder on the reconstruction alone, ``(1/(N·d)) Σ ‖r(f) − f‖²``.

While a later task is trained, the penalty is LwF's distillation of the old heads
plus the preservation of every old task's codes:

    L_EBLL(θ) = L_LwF(θ) + ae_lam Σ_{old t} (1/B) Σ_k ‖σ(E_t f(x_k)) − σ(E_t f_old(x_k))‖²

(``ae_lam``, the weight of the code loss, 1e-3 by default) where ``f_old`` are the features of the snapshot
taken at the task start (see :mod:`mas_core.regularizers.lwf`). The encoders ``(E_t, b_E)`` are kept for every
task (their memory grows by ``code_dim × feature_dim`` per task) and saved in
``state_dict``; decoders are only needed while training the autoencoder.
The model must expose ``features(x)`` (as :class:`~mas_core.sequence.MultiHeadNet` does). A model
without ``heads`` is distilled as in LwF (``λ_o · mean((out − out_old)²)``) with the code term above
on its ``features``; when it also has ``output_from_features(f)`` (``model(x) =
output_from_features(features(x))``, as the fact model's), the output is computed from the features,
so the penalty costs one forward of the model. The labelled batches ``after_task`` reads then need
only their inputs (``batch_input``: whatever ``model.features`` takes).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batches import batch_input, batch_target
from ..errors import EmptyDataError, InvalidArgumentError, MASCoreError, NonFiniteError
from .base import TaskInfo
from .lwf import LwF


class Autoencoder(nn.Module):
    """``f → σ(E f + b) → D code + c``: a one-layer undercomplete autoencoder with a sigmoid code."""

    def __init__(self, feature_dim: int, code_dim: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(feature_dim, code_dim)
        self.decoder = nn.Linear(code_dim, feature_dim)

    def encode(self, features: Tensor) -> Tensor:
        """The code ``σ(E f + b)`` in (0, 1)^code_dim."""
        return torch.sigmoid(self.encoder(features))

    def forward(self, features: Tensor) -> Tensor:
        """The reconstruction of ``features``."""
        return self.decoder(self.encode(features))


def train_autoencoder(features: Tensor, code_dim: int, *, epochs: int = 20, lr: float = 1e-3,
                      batch_size: int = 128, seed: int = 0, targets: Tensor | None = None,
                      head: nn.Module | None = None,
                      reconstruction_weight: float = 1e-6) -> tuple[Autoencoder, list[float]]:
    """Train an :class:`Autoencoder` on ``features [N, d]`` with Adam; return it and the mean
    reconstruction error ``(1/(N·d)) Σ ‖f̂ − f‖²`` measured before training and after every epoch.

    Without ``head``: the loss of a batch of ``B`` is the reconstruction error alone,
    ``(1/(B·d)) Σ ‖f̂ − f‖²``. With ``head`` (the old task's head, kept frozen: its parameters are
    neither updated nor given a gradient) and ``targets [N]`` (class indices): Rannen et al.'s loss
    ``(1/B) Σ_k [reconstruction_weight · ‖f̂_k − f_k‖² + CE(head(f̂_k), y_k)]``.

    Initialisation and batch order depend only on ``seed`` (the global RNG is left untouched).
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise EmptyDataError(f"the autoencoder needs features of shape [N>0, d], got {tuple(features.shape)}")
    if (head is None) != (targets is None):
        raise MASCoreError("train_autoencoder takes head and targets together (the classification term) or neither")
    if targets is not None and tuple(targets.shape) != (features.shape[0],):
        raise MASCoreError(f"targets must have shape [{features.shape[0]}], got {tuple(targets.shape)}")
    if not (reconstruction_weight >= 0 and math.isfinite(reconstruction_weight)):
        raise MASCoreError(f"reconstruction_weight must be a finite number >= 0, got {reconstruction_weight}")
    features = features.detach()
    n, feature_dim = features.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = Autoencoder(feature_dim, code_dim).to(device=features.device, dtype=features.dtype)
    frozen_head = None
    if head is not None:
        frozen_head = copy.deepcopy(head).requires_grad_(False).eval()
        targets = targets.detach().to(device=features.device, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)

    def reconstruction_error() -> float:
        with torch.no_grad():
            total = sum(F.mse_loss(autoencoder(chunk), chunk, reduction="sum").item()
                        for chunk in features.split(4096))
        return total / (n * feature_dim)

    errors = [reconstruction_error()]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(features.device)
        for begin in range(0, n, batch_size):
            index = order[begin:begin + batch_size]
            batch = features[index]
            optimizer.zero_grad(set_to_none=True)
            reconstruction = autoencoder(batch)
            if frozen_head is None:
                loss = F.mse_loss(reconstruction, batch)
            else:
                loss = autoencoder_loss(reconstruction, batch, frozen_head, targets[index], reconstruction_weight)
            loss.backward()
            optimizer.step()
        errors.append(reconstruction_error())
    if not math.isfinite(errors[-1]):
        raise NonFiniteError(f"the autoencoder's reconstruction error is {errors[-1]}; lower ae_lr (now {lr})")
    return autoencoder, errors


def autoencoder_loss(reconstruction: Tensor, features: Tensor, head: nn.Module, targets: Tensor,
                     reconstruction_weight: float) -> Tensor:
    """Rannen et al.'s autoencoder loss of a batch of ``B``:
    ``(1/B) Σ_k [reconstruction_weight · ‖r_k − f_k‖² + CE(head(r_k), y_k)]``."""
    squared = (reconstruction - features).pow(2).sum(dim=1).mean()
    return reconstruction_weight * squared + F.cross_entropy(head(reconstruction), targets)


class EBLL(LwF):
    """EBLL: LwF plus the preservation of per-task autoencoder codes of the shared features.

    Args:
        lam: λ_o of the LwF distillation (1, as in the paper's LwF part).
        code_dim: width of every task's code (100 in the authors' code).
        ae_lam: weight of the code-preservation term while training later tasks (1e-3).
        ae_rec_lam: weight of the reconstruction error in the autoencoder's loss, beside the
            old task's cross-entropy on the reconstructed features (the paper's λ, 1e-6).
        ae_epochs, ae_lr, ae_batch_size: the autoencoder's Adam training.
        temperature, t_squared: LwF's distillation (T = 2, no T² factor).
        seed: the autoencoders' initialisation and batch order.
    """

    name = "ebll"
    after_task_data = "labelled"  # the autoencoder's loss reads the task's labels (with heads)
    importance_from_loss = False  # it trains an autoencoder on the features, estimates no importance from a loss

    def __init__(self, lam: float = 1.0, *, code_dim: int = 100, ae_lam: float = 1e-3, ae_rec_lam: float = 1e-6,
                 ae_epochs: int = 20, ae_lr: float = 1e-3, ae_batch_size: int = 128, temperature: float = 2.0,
                 t_squared: bool = False, seed: int = 0) -> None:
        super().__init__(lam, temperature=temperature, t_squared=t_squared)
        if int(code_dim) < 1 or int(ae_epochs) < 1 or int(ae_batch_size) < 1:
            raise MASCoreError(f"code_dim, ae_epochs and ae_batch_size must be >= 1, got {code_dim}, {ae_epochs}, {ae_batch_size}")
        if not float(ae_lam) >= 0 or not float(ae_lr) > 0 or not (0 <= float(ae_rec_lam) < math.inf):
            raise MASCoreError(f"ae_lam and ae_rec_lam must be finite and >= 0 and ae_lr > 0, got {ae_lam}, "
                               f"{ae_rec_lam} and {ae_lr}")
        self.code_dim = int(code_dim)
        self.ae_lam = float(ae_lam)
        self.ae_rec_lam = float(ae_rec_lam)
        self.ae_epochs = int(ae_epochs)
        self.ae_lr = float(ae_lr)
        self.ae_batch_size = int(ae_batch_size)
        self.seed = int(seed)
        self.encoders: list[dict[str, Tensor]] = []
        self.reconstruction_errors: list[list[float]] = []
        self._task_head: int | None = None  # the head of the task being trained (TaskInfo.head)

    @staticmethod
    def _require_features(model: nn.Module) -> None:
        if not callable(getattr(model, "features", None)):
            raise MASCoreError(
                "EBLL needs model.features(x) (the shared features its autoencoders encode); "
                "use a MultiHeadNet or add a features method"
            )

    def before_task(self, model: nn.Module, task: TaskInfo) -> None:
        self._require_features(model)
        super().before_task(model, task)
        self._task_head = task.head

    def _task_head_module(self, model: nn.Module) -> nn.Module | None:
        """The head of the task that just ended (``TaskInfo.head``, else ``model.active_head``), or
        ``None`` for a model without ``heads``."""
        heads = getattr(model, "heads", None)
        if heads is None:
            return None
        index = self._task_head if self._task_head is not None else getattr(model, "active_head", None)
        if index is None or not 0 <= int(index) < len(heads):
            raise MASCoreError(
                f"EBLL cannot tell which head belongs to the task that ended (head {index}, the model has "
                f"{len(heads)}); call before_task with TaskInfo(head=...)"
            )
        return heads[int(index)]

    def after_task(self, model: nn.Module, data: Iterable[Any]) -> None:
        """Train this task's autoencoder on ``model.features`` of the labelled ``data``
        (``(inputs, targets)`` batches) with the reconstruction and the task head's
        cross-entropy on the reconstruction, and keep its encoder."""
        self._require_features(model)
        head = self._task_head_module(model)
        was_training = model.training
        model.eval()
        device = next(iter(model.parameters())).device
        chunks, labels = [], []
        try:
            with torch.no_grad():
                for batch in data:
                    inputs = batch_input(batch)
                    inputs = inputs.to(device) if isinstance(inputs, Tensor) else inputs
                    chunks.append(model.features(inputs).detach())
                    if head is not None:
                        try:
                            labels.append(batch_target(batch).reshape(-1).to(device))
                        except ValueError:
                            raise InvalidArgumentError(
                                "EBLL.after_task needs labelled (inputs, targets) batches: its autoencoder is "
                                "trained with the task's classification loss on the reconstructed features"
                            ) from None
        finally:
            model.train(was_training)
        if not chunks:
            raise EmptyDataError("EBLL.after_task got no data: pass the task's data to train its autoencoder")
        features = torch.cat(chunks).flatten(1)
        targets = torch.cat(labels) if head is not None else None
        if self.code_dim >= features.shape[1]:
            raise MASCoreError(
                f"code_dim={self.code_dim} is not below the feature width {features.shape[1]}: "
                "the EBLL autoencoder must be undercomplete; lower code_dim"
            )
        autoencoder, errors = train_autoencoder(
            features, self.code_dim, epochs=self.ae_epochs, lr=self.ae_lr, batch_size=self.ae_batch_size,
            seed=self.seed * 1000 + len(self.encoders), targets=targets, head=head,
            reconstruction_weight=self.ae_rec_lam,
        )
        self.encoders.append({name: value.detach().clone() for name, value in autoencoder.encoder.state_dict().items()})
        self.reconstruction_errors.append(errors)

    def _has_feature_penalty(self) -> bool:
        return bool(self.encoders) and self.ae_lam != 0

    def _feature_penalty(self, new_features: Tensor, old_features: Tensor) -> Tensor:
        """``ae_lam Σ_t (1/B) Σ_k ‖σ(E_t f_k) − σ(E_t f_old,k)‖²`` over the stored encoders."""
        code_loss = new_features.new_zeros(())
        if not self.encoders or self.ae_lam == 0:
            return code_loss
        new_features = new_features.flatten(1)
        old_features = old_features.flatten(1)
        for encoder in self.encoders:
            weight = encoder["weight"].to(new_features.device)
            bias = encoder["bias"].to(new_features.device)
            new_code = torch.sigmoid(F.linear(new_features, weight, bias))
            old_code = torch.sigmoid(F.linear(old_features, weight, bias))
            code_loss = code_loss + (new_code - old_code).pow(2).sum(dim=1).mean()
        return self.ae_lam * code_loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["encoders"] = [dict(encoder) for encoder in self.encoders]
        state["reconstruction_errors"] = [list(errors) for errors in self.reconstruction_errors]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.encoders = [{name: value.detach().clone() for name, value in encoder.items()} for encoder in state["encoders"]]
        self.reconstruction_errors = [[float(x) for x in errors] for errors in state["reconstruction_errors"]]

    def __repr__(self) -> str:
        return (f"EBLL(lam={self.lam}, code_dim={self.code_dim}, ae_lam={self.ae_lam}, ae_rec_lam={self.ae_rec_lam}, "
                f"ae_epochs={self.ae_epochs}, ae_lr={self.ae_lr}, temperature={self.temperature}, "
                f"t_squared={self.t_squared})")
