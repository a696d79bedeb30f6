"""Encoder Based Lifelong Learning (Rannen, Aljundi, Blaschko & Tuytelaars, ICCV 2017; ``docs/method.md`` §9).

After task ``t`` an undercomplete autoencoder is trained on the shared features
``f(x) = model.features(x)`` of the task's data (model in eval mode):

    code = σ(E_t f + b_E)  (``code_dim`` < ``feature_dim``),   f̂ = D_t code + b_D
    minimise  (1/(N·d)) Σ_k ‖f̂_k − f_k‖²   (Adam, ``ae_epochs`` epochs, ``ae_lr``)

While a later task is trained, the penalty is LwF's distillation of the old heads
plus the preservation of every old task's codes:

    L_EBLL(θ) = L_LwF(θ) + ae_lam Σ_{old t} (1/B) Σ_k ‖σ(E_t f(x_k)) − σ(E_t f_old(x_k))‖²

where ``f_old`` are the features of the snapshot taken at the task start (see
:mod:`mas_core.regularizers.lwf`). The encoders ``(E_t, b_E)`` are kept for every
task (their memory grows by ``code_dim × feature_dim`` per task) and saved in
``state_dict``; decoders are only needed while training the autoencoder.
The model must expose ``features(x)`` (as :class:`~mas_core.sequence.MultiHeadNet` does).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batches import batch_input
from ..errors import EmptyDataError, MASCoreError, NonFiniteError
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
                      batch_size: int = 128, seed: int = 0) -> tuple[Autoencoder, list[float]]:
    """Train an :class:`Autoencoder` on ``features [N, d]`` with Adam; return it and the mean
    reconstruction error ``(1/(N·d)) Σ ‖f̂ − f‖²`` measured before training and after every epoch.

    Initialisation and batch order depend only on ``seed`` (the global RNG is left untouched).
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise EmptyDataError(f"the autoencoder needs features of shape [N>0, d], got {tuple(features.shape)}")
    features = features.detach()
    n, feature_dim = features.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = Autoencoder(feature_dim, code_dim).to(device=features.device, dtype=features.dtype)
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
            batch = features[order[begin:begin + batch_size]]
            optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(autoencoder(batch), batch)
            loss.backward()
            optimizer.step()
        errors.append(reconstruction_error())
    if not math.isfinite(errors[-1]):
        raise NonFiniteError(f"the autoencoder's reconstruction error is {errors[-1]}; lower ae_lr (now {lr})")
    return autoencoder, errors


class EBLL(LwF):
    """EBLL: LwF plus the preservation of per-task autoencoder codes of the shared features."""

    name = "ebll"
    after_task_data = "inputs"

    def __init__(self, lam: float = 1.0, *, code_dim: int = 100, ae_lam: float = 1e-3, ae_epochs: int = 20,
                 ae_lr: float = 1e-3, ae_batch_size: int = 128, temperature: float = 2.0, seed: int = 0) -> None:
        super().__init__(lam, temperature=temperature)
        if int(code_dim) < 1 or int(ae_epochs) < 1 or int(ae_batch_size) < 1:
            raise MASCoreError(f"code_dim, ae_epochs and ae_batch_size must be >= 1, got {code_dim}, {ae_epochs}, {ae_batch_size}")
        if not float(ae_lam) >= 0 or not float(ae_lr) > 0:
            raise MASCoreError(f"ae_lam must be >= 0 and ae_lr > 0, got {ae_lam} and {ae_lr}")
        self.code_dim = int(code_dim)
        self.ae_lam = float(ae_lam)
        self.ae_epochs = int(ae_epochs)
        self.ae_lr = float(ae_lr)
        self.ae_batch_size = int(ae_batch_size)
        self.seed = int(seed)
        self.encoders: list[dict[str, Tensor]] = []
        self.reconstruction_errors: list[list[float]] = []

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

    def after_task(self, model: nn.Module, data: Iterable[Any]) -> None:
        """Train this task's autoencoder on ``model.features`` of ``data`` and keep its encoder."""
        self._require_features(model)
        was_training = model.training
        model.eval()
        device = next(iter(model.parameters())).device
        chunks = []
        try:
            with torch.no_grad():
                for batch in data:
                    inputs = batch_input(batch)
                    inputs = inputs.to(device) if isinstance(inputs, Tensor) else inputs
                    chunks.append(model.features(inputs).detach())
        finally:
            model.train(was_training)
        if not chunks:
            raise EmptyDataError("EBLL.after_task got no data: pass the task's data to train its autoencoder")
        features = torch.cat(chunks).flatten(1)
        if self.code_dim >= features.shape[1]:
            raise MASCoreError(
                f"code_dim={self.code_dim} is not below the feature width {features.shape[1]}: "
                "the EBLL autoencoder must be undercomplete; lower code_dim"
            )
        autoencoder, errors = train_autoencoder(
            features, self.code_dim, epochs=self.ae_epochs, lr=self.ae_lr, batch_size=self.ae_batch_size,
            seed=self.seed * 1000 + len(self.encoders),
        )
        self.encoders.append({name: value.detach().clone() for name, value in autoencoder.encoder.state_dict().items()})
        self.reconstruction_errors.append(errors)

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
        return (f"EBLL(lam={self.lam}, code_dim={self.code_dim}, ae_lam={self.ae_lam}, ae_epochs={self.ae_epochs}, "
                f"ae_lr={self.ae_lr}, temperature={self.temperature})")
