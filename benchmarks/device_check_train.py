"""The device check's training parts: the fact embedding trained with MAS by the project's task loop.

Data: :func:`write_check_fact_file`, a synthetic fact file written with
:func:`data_prep.facts.fact_file.write_fact_file` (random word vectors as the language side, so no text
encoder is needed): ``tasks`` tasks of ``facts_per_task`` facts mixing ⟨S⟩, ⟨S,P⟩ and ⟨S,P,O⟩;
each fact's images are its own colour plus a coarse 4×4 pattern plus Gaussian noise (σ = 0.12).

Training (:func:`training_part`): every variant runs :func:`mas_core.loop.train_tasks` on a
:class:`triplets.facts.experiment.FactExperiment` (the code path of ``mas-triplets train``) with
exact MAS (λ = 1): ``loss = slot_loss(model(x), L[f], w[f])`` per step, Ω after each task,
standard top-5 per task. :class:`CheckedExperiment` runs the loss's forward under
``torch.autocast(dtype=bfloat16)`` for the bf16 variants (backward, Ω and evaluation stay
float32, the usual mixed-precision split) and keeps every step's loss, so the check can assert
that all are finite. One more sub-part runs :func:`triplets.facts.train.train_run` end to end
(run folder, evaluation, FAISS indexes with ``use_gpu="auto"``).

Equality (:func:`equality_part`): a fixed tiny case (one task, a few steps of SGD, Ω after it)
trained once on the CPU and once on the device with TF32 off; the logged losses, the weights
and Ω must agree within :data:`~benchmarks.device_check_common.FLOAT32_RTOL` (relative to the
largest entry, :func:`~benchmarks.device_check_common.relative_error`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from data_prep.facts.fact_file import write_fact_file
from mas_core.loop import train_tasks
from mas_core.regularizers import make_regularizer
from triplets.config import from_dict
from triplets.facts.data import open_fact_file
from triplets.facts.experiment import FactExperiment, fact_context
from triplets.facts.model import BACKBONES
from triplets.facts.train import train_run
from triplets.facts.train_config import TrainConfig

from .device_check_common import (FLOAT32_RTOL, Budget, CheckFailed, Section, Sizes, Skip, float32_exact,
                                  per_second, relative_error, replace_sizes, within)

PRETRAINED = "efficientnet_lite0"   # the pretrained backbone users train with; skipped until model.py has it
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def write_check_fact_file(path: Path, sizes: Sizes, seed: int = 0) -> Path:
    """The synthetic fact file of the check (module docs); returns its path."""
    rng = np.random.default_rng(seed)
    facts, task_of_fact = [], []
    for task in range(sizes.tasks):
        for i in range(sizes.facts_per_task):
            subject = f"subject{task}n{i}"
            shape = (subject, None, None), (subject, f"pred{i % 5}", None), (subject, f"pred{i % 5}", f"obj{(i + task) % 7}")
            facts.append(shape[i % 3])
            task_of_fact.append(task)
    vocabulary = sorted({word for fact in facts for word in fact if word is not None})
    word_vectors = {word: rng.standard_normal(sizes.slot_dim).astype(np.float32) for word in vocabulary}
    blank = np.zeros(sizes.slot_dim, np.float32)
    language = np.stack([np.concatenate([word_vectors.get(word, blank) if word else blank for word in fact])
                         for fact in facts])
    side, cell = sizes.image_size, sizes.image_size // 4
    looks = rng.uniform(0.15, 0.85, (len(facts), 1, 1, 3)) + np.kron(
        rng.uniform(-0.15, 0.15, (len(facts), 4, 4, 3)), np.ones((1, cell, cell, 1)))
    per_fact = sizes.train_per_fact + sizes.test_per_fact
    sample_fact = np.repeat(np.arange(len(facts)), per_fact)
    split = np.tile(np.r_[np.zeros(sizes.train_per_fact), np.ones(sizes.test_per_fact)], len(facts)).astype(np.int8)
    pixels = np.clip(looks[sample_fact] + rng.normal(0.0, 0.12, (len(sample_fact), side, side, 3)), 0.0, 1.0)
    count = len(sample_fact)
    return write_fact_file(
        path, facts=facts, sample_fact=sample_fact, sample_image_id=np.arange(count),
        sample_box=np.tile(np.array([0, 0, side, side], np.float32), (count, 1)), sample_split=split,
        task_of_fact=np.asarray(task_of_fact), sample_pixels=(pixels * 255).round().astype(np.uint8),
        provenance={"source": "benchmarks/device_check.py synthetic facts", "seed": seed},
        fact_embeddings=language, encoder_name="random-words")


def model_section(sizes: Sizes, backbone: str, *, frozen: bool = False, cached: bool = False,
                  norm: str = "batch") -> dict[str, Any]:
    """The ``model:`` section: the small CNN (narrow in the dry run) or a torchvision-style backbone
    (``weights`` null: nothing is downloaded) with a frozen trunk, its features cached or not."""
    if backbone == "small_cnn":
        narrow = sizes.image_size < 64
        return {"backbone": "small_cnn", "norm": norm, "trunk_channels": [8, 16] if narrow else [32, 64],
                "branch_channels": 16 if narrow else 64, "hidden_dim": 32 if narrow else 256}
    return {"backbone": backbone, "hidden_dim": 32 if sizes.image_size < 64 else 256,
            "freeze_trunk": frozen and not cached, "cache_features": cached}


def check_config(fact_file: Path, sizes: Sizes, model: dict[str, Any], device: torch.device, *,
                 epochs: int | None = None, lr: float = 0.02) -> TrainConfig:
    """A training config of the check: exact MAS (λ = 1), SGD with momentum 0.9, no weight decay."""
    return from_dict(TrainConfig, {
        "data": {"fact_file": str(fact_file), "importance_max_samples": sizes.importance_samples},
        "model": model,
        "optim": {"epochs": epochs or sizes.epochs, "batch_size": sizes.batch_size, "lr": lr, "momentum": 0.9},
        "methods": [{"name": "mas", "options": {"lam": 1.0, "mode": "exact"}}],
        "eval": {"batch_size": 4 * sizes.batch_size, "index": "flat"},
        "seed": 0, "device": str(device),
    })


class CheckedExperiment(FactExperiment):
    """:class:`FactExperiment` whose loss forward runs under ``torch.autocast(dtype)`` (``None``:
    float32) and which keeps each step's loss, batch size and time; it raises
    :class:`BudgetSpent` at the first step past ``budget``."""

    def __init__(self, ctx: Any, *, dtype: torch.dtype | None = None, budget: Budget | None = None) -> None:
        super().__init__(ctx)
        self.dtype, self.budget = dtype, budget
        self.losses: list[Tensor] = []
        self.steps: list[tuple[int, int, float]] = []   # (task, batch size, perf_counter at the step)

    def loss(self, module: nn.Module, batch: Any, task: int) -> Tensor:
        if self.budget is not None:
            self.budget.check(f"step {len(self.losses) + 1}")
        self.steps.append((task, int(batch[1].shape[0]), time.perf_counter()))
        with torch.autocast(self.ctx.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            loss = super().loss(module, batch, task)
        self.losses.append(loss.detach().float().reshape(1))
        return loss

    def step_rate(self) -> float:
        """Samples per second of the training steps alone: per task, the samples of steps 2..n over
        the time from step 1 to step n (the loop reads each loss back, so steps are synchronous)."""
        samples, seconds = 0, 0.0
        for task in sorted({task for task, _, _ in self.steps}):
            mine = [(size, at) for t, size, at in self.steps if t == task]
            if len(mine) > 1:
                samples += sum(size for size, _ in mine[:-1])
                seconds += mine[-1][1] - mine[0][1]
        return per_second(samples, seconds) if seconds > 0 else 0.0


def train_sequence(config: TrainConfig, device: torch.device, run_dir: Path, *, dtype: torch.dtype | None = None,
                   budget: Budget | None = None, tasks: int | None = None) -> dict[str, Any]:
    """Train the tasks of ``config`` (the first ``tasks``; all by default) with exact MAS by
    :func:`train_tasks`; returns the figures, the step losses (``"losses"``), the model
    (``"model"``) and the regularizer (``"reg"``)."""
    fact_file = open_fact_file(config.data.fact_file)
    try:
        experiment = CheckedExperiment(fact_context(config, fact_file, device, run_dir), dtype=dtype, budget=budget)
        reg = make_regularizer("mas", **config.methods[0].options)
        started = time.perf_counter()
        outcome = train_tasks(experiment, reg, config.optim, seed=config.seed, device=device, label="mas",
                              stop_after_task=tasks)
        wall = time.perf_counter() - started
    finally:
        fact_file.close()
    losses = torch.cat(experiment.losses).cpu() if experiment.losses else torch.zeros(0)
    trained = sum(size for _, size, _ in experiment.steps)
    omega = reg.importance
    return {"model": outcome.model, "reg": reg, "losses": losses, "figures": {
        "steps": len(experiment.steps), "samples_trained": trained, "train_s": round(wall, 3),
        "train_samples_per_s": per_second(trained, wall), "step_samples_per_s": experiment.step_rate(),
        "loss_first": float(losses[0]) if len(losses) else None, "loss_last": float(losses[-1]) if len(losses) else None,
        "losses_finite": bool(torch.isfinite(losses).all()) if len(losses) else False,
        "top5_last_row": [round(float(v), 4) for v in outcome.accuracy[-1] if v is not None],
        "omega_parameters": len(omega), "omega_mean": float(torch.cat([v.reshape(-1).double() for v in omega.values()]).mean())
        if omega else None,
    }}


def _variants(sizes: Sizes) -> list[tuple[str, str, bool, bool]]:
    """(name, backbone, frozen, cached) of every trained variant."""
    out = [("small_cnn", "small_cnn", False, False)]
    for backbone in ("resnet18", PRETRAINED):
        out += [(f"{backbone}_frozen", backbone, True, False), (f"{backbone}_cached", backbone, True, True)]
    return out


def training_part(section: Section, sizes: Sizes, device: torch.device, fact_file: Path, workdir: Path) -> None:
    """Every variant in float32 then bf16 autocast (module docs), then ``train_run`` end to end."""
    for name, backbone, frozen, cached in _variants(sizes):
        for precision, dtype in AUTOCAST.items():
            def action(figures: dict[str, Any], backbone: str = backbone, frozen: bool = frozen, cached: bool = cached,
                       dtype: torch.dtype | None = dtype, label: str = f"{name}_{precision}") -> None:
                if backbone not in BACKBONES:
                    raise Skip(f"backbone {backbone} not available")
                config = check_config(fact_file, sizes, model_section(sizes, backbone, frozen=frozen, cached=cached),
                                      device)
                tasks = None if backbone == "small_cnn" else sizes.backbone_tasks
                figures.update(train_sequence(config, device, workdir / label, dtype=dtype, budget=section.budget,
                                              tasks=tasks)["figures"])
                if not figures["losses_finite"]:
                    raise CheckFailed(f"a training loss is not finite (first {figures['loss_first']}, "
                                      f"last {figures['loss_last']})")
            section.run(f"{name}/{precision}", action)

    def end_to_end(figures: dict[str, Any]) -> None:
        config = check_config(fact_file, sizes, model_section(sizes, "small_cnn"), device, epochs=1)
        started = time.perf_counter()
        results = train_run(config, workdir / "train_run", progress=False)
        mas = results["methods"]["mas"]
        figures.update(train_run_s=round(time.perf_counter() - started, 3), avg_acc=mas.get("avg_acc"),
                       index_files=sorted(p.name for p in (workdir / "train_run" / "mas" / "index").glob("*.faiss")))
        if len(figures["index_files"]) != 2:
            raise CheckFailed(f"train_run wrote {figures['index_files']} instead of facts.faiss and images.faiss")
    section.run("train_run/small_cnn_fp32", end_to_end)


def equality_part(section: Section, sizes: Sizes, device: torch.device, reference: torch.device,
                  workdir: Path) -> None:
    """The fixed tiny case (its own fact file: 4 facts of 4 training images per task, batches of 8,
    ``equality_epochs`` epochs of task 1 = 2 SGD steps each, then Ω on 16 of its images, 4 in the dry
    run) on ``reference`` (the CPU) and on ``device``, TF32 off; losses, weights and Ω compared
    within :data:`FLOAT32_RTOL`."""
    tiny = replace_sizes(sizes, facts_per_task=4, train_per_fact=4, test_per_fact=2, batch_size=8,
                         epochs=sizes.equality_epochs, importance_samples=min(16, sizes.importance_samples))
    fact_file = write_check_fact_file(workdir / "equality-facts.h5", tiny, seed=1)
    cases = {"small_cnn": ("small_cnn", False), "resnet18_frozen": ("resnet18", True)}
    for name in sizes.equality_cases:
        backbone, frozen = cases[name]

        def action(figures: dict[str, Any], backbone: str = backbone, frozen: bool = frozen, name: str = name) -> None:
            config = check_config(fact_file, tiny, model_section(tiny, backbone, frozen=frozen), device, lr=0.01)
            with float32_exact():
                cpu, dev = (train_sequence(config, where, workdir / f"equal-{name}-{where.type}", tasks=1,
                                           budget=section.budget) for where in (reference, device))
            figures.update(steps=cpu["figures"]["steps"], devices=[str(reference), str(device)])
            within(figures, "loss_rel_error", relative_error(dev["losses"], cpu["losses"]), FLOAT32_RTOL)
            within(figures, "weights_rel_error", relative_error(dev["model"].state_dict(), cpu["model"].state_dict()),
                   FLOAT32_RTOL)
            within(figures, "omega_rel_error", relative_error(dev["reg"].importance, cpu["reg"].importance),
                   FLOAT32_RTOL)
        section.run(name, action)


__all__ = ["AUTOCAST", "CheckedExperiment", "PRETRAINED", "check_config", "equality_part", "model_section",
           "train_sequence", "training_part", "write_check_fact_file"]
