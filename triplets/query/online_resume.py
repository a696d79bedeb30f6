"""Training the next task with the importance learned from queries (``docs/method.md`` §12).

A run stopped after task ``t`` (``mas-triplets train --stop-after-task t``) serves queries; with
``mas-triplets query --accumulate-importance`` each answered image adds its MAS importance to
``RUN/<method>/online_importance.pt`` (:mod:`triplets.query.online_importance`). When the run is resumed
to learn task ``t + 1``, the config's ``online_importance`` section decides what protects task
``t``::

    use: none      Ω_t = Ω_train                      (the paper: the task's training images; default)
    use: queries   Ω_t = Ω_queries                    (the inputs the deployed model answered)
    use: mixed     Ω_t = (1 − ρ) Ω_train + ρ Ω_queries  ρ = query_weight ∈ [0, 1]   (mix_importance)

The accumulated Ω already holds Ω_train of task ``t`` (``after_task`` ran before the checkpoint),
so task ``t``'s contribution is *replaced* (:meth:`mas_core.MAS.replace_last_task_importance`,
whatever the accumulation rule): Ω_train is estimated again exactly as ``after_task`` did (same
data, same θ, same estimator) when it is needed (``mixed``, or any ``use`` after the first task,
to take it out of the sum). After the first task ``use: queries`` gives Ω = Ω_queries exactly.

Which queries: those of the accumulator whose fingerprint equals the parameters the run resumes
from (the model that answered them is the model that continues). An accumulator that cannot apply
(another model's: queried after an earlier task and already used, or the run has moved on; or
recorded after another task than the one resumed) is refused in one line before any training
(:func:`check_online_importance`), naming why: answer queries with the model the run resumes
from, delete the file, or set ``use: none``. A method with no accumulator keeps Ω_train. What was used is recorded per method in
``result.json`` / ``results.json`` under ``"online_importance"`` (one entry per replaced task:
``after_task``, ``use``, ``query_weight`` ρ, ``query_samples``, ``query_calls``, ``train_samples``).

The section is not part of what a checkpoint must agree on: it may change between segments.
The accumulator's file (``RUN/<method>/online_importance.pt``) and its reader live here too, so that
the query side (:mod:`triplets.query.online_importance`) and the training side share one definition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn

from mas_core.batches import move_to
from mas_core.checkpoint import load_checkpoint, read_json
from mas_core.distributed import RankShard
from mas_core.errors import CheckpointMismatchError
from mas_core.importance import OnlineImportance, mix_importance
from mas_core.importance.online import fingerprint_difference
from mas_core.regularizers import MAS
from mas_core.regularizers.base import Regularizer

from ..errors import ConfigError, RunFolderError

USES = ("none", "queries", "mixed")
ACCUMULATOR_NAME = "online_importance.pt"
SIDECAR_NAME = "online_importance.json"
LOCK_NAME = ".online_importance.lock"
FILE_FORMAT = 1
OUTPUT_LABEL = "fact embedding S‖P‖O before normalisation"
"""The output F whose importance is accumulated (the accumulators' ``output_label``)."""


def read_accumulator_file(path: Path) -> dict[str, Any]:
    """The checked contents of an ``online_importance.pt`` (:class:`RunFolderError`, one line, otherwise)."""
    try:
        state = load_checkpoint(path, map_location="cpu")
    except CheckpointMismatchError as exc:
        raise RunFolderError(f"{str(exc).splitlines()[0]} (delete {path} to start accumulating again)") from None
    if state.get("format") != FILE_FORMAT or not isinstance(state.get("accumulator"), dict):
        raise RunFolderError(f"{path} is not an online-importance file of format {FILE_FORMAT}; delete it to start "
                             "accumulating again")
    return state




@dataclass
class OnlineImportanceConfig:
    """``online_importance:`` what Ω protects the last task when a run resumes with the next one
    (see the module docs). ``use``: ``none`` | ``queries`` | ``mixed``; ``query_weight``: ρ, the
    share of the queried Ω under ``mixed`` (in [0, 1]; ignored otherwise)."""

    use: Literal["none", "queries", "mixed"] = "none"
    query_weight: float = 0.5

    def validate(self) -> None:
        if isinstance(self.query_weight, bool) or not isinstance(self.query_weight, (int, float)) \
                or not math.isfinite(self.query_weight) or not 0.0 <= self.query_weight <= 1.0:
            raise ValueError(f"online_importance.query_weight must be a number in [0, 1], got {self.query_weight!r}")

    @property
    def weight(self) -> float:
        """ρ as applied: 1 for ``queries``, ``query_weight`` for ``mixed``, 0 for ``none``."""
        return {"none": 0.0, "queries": 1.0, "mixed": float(self.query_weight)}[self.use]


def check_online_importance(config: OnlineImportanceConfig, run_dir: Path, method_keys: list[str],
                             last_task: int | None = None) -> None:
    """Before a resume of a run with checkpoints: with ``use`` other than ``none`` some method of the
    run must hold online importance, and every accumulator of a method that will train a next task
    (its checkpoint has fewer than ``last_task`` tasks) must apply to it: recorded after the task
    the checkpoint holds, on its parameters. Else :class:`ConfigError`, one line naming why (the
    setting would silently do nothing)."""
    if config.use == "none" or not any((run_dir / key / "checkpoint.pt").is_file() for key in method_keys):
        return  # nothing to resume: a fresh run (or one resumed before its first task finished)
    if not any((run_dir / key / ACCUMULATOR_NAME).is_file() for key in method_keys):
        raise ConfigError(
            f"online_importance.use={config.use} but no method of {run_dir} holds online importance "
            f"({ACCUMULATOR_NAME}); answer queries with `mas-triplets query --accumulate-importance` first, "
            "or set online_importance.use: none")
    for key in method_keys:
        checkpoint_path, path = run_dir / key / "checkpoint.pt", run_dir / key / ACCUMULATOR_NAME
        if not (checkpoint_path.is_file() and path.is_file()):
            continue
        checkpoint = load_checkpoint(checkpoint_path, map_location="cpu")
        completed = int(checkpoint.get("completed_tasks", 0))
        if last_task is not None and completed >= last_task:
            continue  # nothing left to train: the hook never runs
        why = why_not_applicable(read_accumulator_file(path), checkpoint.get("model"), completed)
        if why is not None:
            raise ConfigError(not_applicable_message(config, path, why, completed))


def why_not_applicable(saved: dict[str, Any], model_state: Any, completed: int) -> str | None:
    """Why the accumulator file contents ``saved`` cannot replace the Ω of the model after task
    ``completed`` whose state_dict is ``model_state`` (``None``: it can)."""
    after = saved.get("after_task")
    if after is not None and int(after) != completed:
        return f"it was accumulated on the model after task {after}, and the run resumes after task {completed}"
    fingerprint = saved["accumulator"].get("fingerprint")
    if not isinstance(fingerprint, dict) or not isinstance(model_state, dict):
        return "it records no parameters to compare with the checkpoint's"
    missing = [name for name in fingerprint if name not in model_state]
    if missing:
        return f"it was accumulated on another model (its parameter {missing[0]!r} is not in the checkpoint)"
    with torch.no_grad():
        actual = {name: [float(model_state[name].double().abs().sum()), float(model_state[name].double().square().sum())]
                  for name in fingerprint}
    problem = fingerprint_difference(fingerprint, actual)
    if problem is not None:
        return f"it was accumulated on another model than the one the run resumes from ({problem})"
    return None


def not_applicable_message(config: OnlineImportanceConfig, path: Path, why: str, completed: int) -> str:
    """The one line refusing an accumulator that cannot apply (see :func:`check_online_importance`)."""
    return (f"online_importance.use={config.use}: {path} cannot be used: {why}; answer queries with the model after "
            f"task {completed} (`mas-triplets query --accumulate-importance`), delete the file, or set "
            "online_importance.use: none")


@dataclass
class OnlineImportanceOnResume:
    """The loop's ``after_resume`` hook of one method (:func:`mas_core.loop.train_tasks`): replaces
    the last task's Ω as the config says and keeps a record of it in :attr:`records`.

    ``importance_data(model, task, kind)``: the experiment's importance source (the one
    ``after_task`` read); ``device``: where batches go; ``log``: progress lines."""

    config: OnlineImportanceConfig
    method_key: str
    method_dir: Path
    importance_data: Callable[[nn.Module, int, str], Any]
    device: torch.device
    log: Callable[[str], None] = lambda line: None
    records: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, model: nn.Module, trained: nn.Module, reg: Regularizer, completed_tasks: int) -> None:
        if self.config.use == "none":
            return
        prefix = f"[{self.method_key}] online_importance.use={self.config.use}:"
        path = self.method_dir / ACCUMULATOR_NAME
        if not path.is_file():
            self.log(f"{prefix} no online importance ({path}); task {completed_tasks} keeps its training-data Ω")
            return
        if not isinstance(reg, MAS):
            raise ConfigError(f"{path}: method {self.method_key!r} does not take online importance (MAS or l-MAS "
                              "only); delete the file or set online_importance.use: none")
        state = read_accumulator_file(path)
        accumulator = OnlineImportance(trained, estimator=str(state["accumulator"].get("estimator", "mas")),
                                       output_label=OUTPUT_LABEL)
        try:
            accumulator.load_state_dict(state["accumulator"])
        except CheckpointMismatchError as exc:  # check_online_importance refuses it before training
            raise ConfigError(not_applicable_message(self.config, path, f"it was accumulated on another model "
                                                     f"({str(exc).splitlines()[0]})", completed_tasks)) from None
        queried = reg.importance_from_accumulator(trained, accumulator)
        train_importance, train_samples = None, None
        if self.config.use == "mixed" or reg.tasks_seen > 1:
            train_importance, train_samples = self._training_importance(model, trained, reg, completed_tasks - 1)
        weight = self.config.weight
        new = queried if self.config.use == "queries" else mix_importance(train_importance, queried, weight)
        reg.replace_last_task_importance(trained, train_importance, new)
        record = {"after_task": completed_tasks, "use": self.config.use, "query_weight": weight,
                  "query_samples": accumulator.count, "query_calls": int(state.get("query_calls", 0)),
                  "train_samples": train_samples, "estimator": accumulator.estimator}
        self.records = [r for r in self.records if r["after_task"] != completed_tasks] + [record]
        what = "the queried Ω" if self.config.use == "queries" else f"(1 − {weight:g})·Ω_train + {weight:g}·Ω_queries"
        self.log(f"{prefix} task {completed_tasks}'s Ω replaced by {what} ({accumulator.count} query samples)")

    def _training_importance(self, model: nn.Module, trained: nn.Module, reg: MAS,
                             task: int) -> tuple[dict[str, torch.Tensor], int]:
        """Ω_train of ``task`` estimated as ``after_task`` did (the loop's importance source, this
        rank's share of it, the regularizer's own estimator and ``max_samples``)."""
        source = self.importance_data(model, task, reg.after_task_data)
        device = self.device

        def make_batches(positions: list[int]) -> Iterable[Any]:
            index = torch.as_tensor(positions, dtype=torch.long)
            return (move_to(batch, device) for batch in source.data.batches(list(index.split(source.batch_size))))

        count = len(source.data)
        used = count if reg.max_samples is None else min(count, reg.max_samples)
        return reg.estimate(trained, RankShard(make_batches, count)), used


def online_importance_history(result_path: Path, new_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The method's ``online_importance`` entries: those of its earlier ``result.json`` (an earlier
    segment of the run) with ``new_records`` replacing any of the same ``after_task``."""
    earlier: list[dict[str, Any]] = []
    if result_path.is_file():
        try:
            saved = read_json(result_path, what="method result")
        except CheckpointMismatchError:
            saved = {}
        if isinstance(saved, dict) and isinstance(saved.get("online_importance"), list):
            earlier = list(saved["online_importance"])
    replaced = {record["after_task"] for record in new_records}
    return sorted([r for r in earlier if r.get("after_task") not in replaced] + new_records,
                  key=lambda record: record["after_task"])


__all__ = ["ACCUMULATOR_NAME", "FILE_FORMAT", "LOCK_NAME", "OUTPUT_LABEL", "SIDECAR_NAME", "USES",
           "OnlineImportanceConfig", "OnlineImportanceOnResume", "check_online_importance", "not_applicable_message",
           "why_not_applicable",
           "online_importance_history", "read_accumulator_file"]
