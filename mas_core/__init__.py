"""mas_core: model-agnostic continual learning with Memory Aware Synapses (MAS) and its baselines.

Public API (the formulas are in ``docs/method.md``):

* importance estimators: :func:`mas_importance`, :func:`hebbian_importance`, :func:`fisher_importance`;
* online importance from a deployed model's unlabelled inputs: :class:`OnlineImportance` (streaming,
  savable, mergeable; ``MAS.after_task(model, accumulator)``) and :func:`mix_importance`;
* methods with one protocol (:class:`Regularizer`): :class:`MAS`, :class:`LocalMAS`, :class:`EWC`,
  :class:`SI`, :class:`LwF`, :class:`IMM`, :class:`EBLL`, :class:`Finetune`; by name through
  :func:`make_regularizer` / :data:`METHODS`; the quadratic-anchor methods share
  :class:`QuadraticAnchorRegularizer` (Ω, θ*, the penalty ``λ Σ Ω (θ − θ*)²``);
* the task loop (:mod:`mas_core.loop`): :func:`train_tasks` on any :class:`Experiment`, with
  :class:`OptimSettings` → :class:`SequenceResult` (per-task hyperparameters by the search of
  :mod:`mas_core.hparam_search`, :class:`SearchSettings`; watched and stopped through :class:`LoopHooks`,
  :class:`TrainingInterrupted`); the multi-head classification sequence on it:
  :class:`MultiHeadNet`, :class:`Task`, :func:`run_sequence`;
* metrics on an accuracy matrix: :func:`average_accuracy`, :func:`average_forgetting`,
  :func:`backward_transfer`, :func:`average_drop`;
* atomic checkpoints: :func:`save_checkpoint`, :func:`load_checkpoint`;
* several processes (``torchrun``): :mod:`mas_core.distributed` (imported on demand).

Importing the package has no side effects.
"""
from __future__ import annotations

from .batches import batch_input, batch_target
from .checkpoint import atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint
from .errors import (
    CheckpointMismatchError,
    DivergenceError,
    EmptyDataError,
    InvalidOutputError,
    MASCoreError,
    NonFiniteError,
    NoTrainableParametersError,
    TrainingInterrupted,
    UnknownMethodError,
)
from .importance import OnlineImportance, fisher_importance, hebbian_importance, mas_importance, mix_importance
from .metrics import average_accuracy, average_drop, average_forgetting, backward_transfer
from .regularizers import (
    EBLL,
    EWC,
    IMM,
    MAS,
    METHODS,
    SI,
    Finetune,
    LocalMAS,
    LwF,
    QuadraticAnchorRegularizer,
    Regularizer,
    TaskInfo,
    UnknownOptionError,
    make_regularizer,
    method_options,
)
from .experiment import EpochRecord, LoopHooks, TaskRecord
from .loop import Experiment, ImportanceSource, OptimSettings, SequenceResult, TrainData, train_tasks
from .hparam_search import SearchSettings
from .sequence import MultiHeadNet, Task, evaluate, run_sequence

__all__ = [
    "batch_input", "batch_target",
    "atomic_write_json", "atomic_write_text", "load_checkpoint", "save_checkpoint",
    "CheckpointMismatchError", "DivergenceError", "EmptyDataError", "InvalidOutputError", "MASCoreError",
    "NonFiniteError", "NoTrainableParametersError", "TrainingInterrupted", "UnknownMethodError", "UnknownOptionError",
    "fisher_importance", "hebbian_importance", "mas_importance", "OnlineImportance", "mix_importance",
    "average_accuracy", "average_drop", "average_forgetting", "backward_transfer",
    "EBLL", "EWC", "IMM", "MAS", "METHODS", "SI", "Finetune", "LocalMAS", "LwF", "QuadraticAnchorRegularizer", "Regularizer",
    "TaskInfo",
    "make_regularizer", "method_options",
    "Experiment", "ImportanceSource", "OptimSettings", "SequenceResult", "TrainData", "train_tasks",
    "EpochRecord", "LoopHooks", "TaskRecord",
    "SearchSettings",
    "MultiHeadNet", "Task", "evaluate", "run_sequence",
]
