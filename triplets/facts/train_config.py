"""The configuration of a fact-embedding run (``mas-triplets train CONFIG``): the YAML sections
``data``, ``model``, ``optim``, ``loss``, ``methods``, ``eval`` and the run-level keys, each a
dataclass whose keys :func:`triplets.config.load_config` validates."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mas_core.errors import did_you_mean
from mas_core.hparam_search import DEFAULT_KEY, SearchSettings
from mas_core.loop import OptimSettings

from ..config import load_config
from ..errors import ConfigError
from ..runner import MethodSpec, check_methods
from .model import ModelConfig
from .ridge_model import split_options
from ..query.online_resume import OnlineImportanceConfig


MAX_SEED = (1 << 63) - 1
MAX_THREADS = 1024
MAX_BATCH_SIZE = 1 << 24


@dataclass
class DataConfig:
    """``data:``. ``fact_file``: the prepared fact HDF5. ``importance_data``: the images a
    method's ``after_task`` estimates importance on: ``"train"`` (the task's training images),
    ``"test"`` (the task's test images, unlabeled: the MAS paper's test-condition adaptation) or
    the path of another fact file (its images of the same task index, all splits); a method's own
    ``importance_data`` (``mas@test``, :class:`triplets.runner.MethodSpec`) overrides it for that method.
    ``importance_max_samples`` caps that set (first N in file order). ``in_memory`` loads each
    task's pixels once into RAM (fast for small images); false streams them from the HDF5."""

    fact_file: str = ""
    importance_data: str = "train"
    importance_max_samples: int | None = None
    in_memory: bool = True

    def validate(self) -> None:
        if not self.fact_file:
            raise ValueError("data.fact_file is required: the path of a fact file made by `mas-triplets prepare`")
        if self.importance_max_samples is not None and self.importance_max_samples <= 0:
            raise ValueError("data.importance_max_samples must be positive or null")


@dataclass
class LossConfig:
    """``loss:`` ``squared``: Caffe's ½‖·‖² per slot instead of the plain distance;
    ``contrastive_weight``: weight of the in-batch InfoNCE term (0: off) at ``temperature``;
    ``unit_norm_targets``: scale every language slot to unit norm (see model.slot_targets)."""

    squared: bool = False
    contrastive_weight: float = 0.0
    temperature: float = 0.1
    unit_norm_targets: bool = True

    def validate(self) -> None:
        if self.contrastive_weight < 0 or self.temperature <= 0:
            raise ValueError("loss.contrastive_weight must be ≥ 0 and loss.temperature > 0")


MethodConfig = MethodSpec  # one entry of ``methods:`` (:class:`triplets.runner.MethodSpec`; ``mas@test`` accepted)


@dataclass
class EvalConfig:
    """``eval:`` batch size of the evaluation passes and the kind of FAISS index saved with
    each method (``"none"`` saves no index; ``"ivfpq"``: compressed codes, for sets of
    ≥ 16,384 vectors, smaller ones get a flat index; for millions of vectors past one
    machine's memory see :func:`triplets.index.build_sharded_index`). ``exact_backend``: how
    exact (flat) searches run, see :func:`triplets.index.choose_exact_backend` (``auto``: FAISS
    where the index is on a GPU, else ``faiss-rescored``: FAISS's brute-force candidates re-scored
    in float64; ``blas`` and ``torch`` compute the candidates by blocked products instead;
    ``faiss`` is FAISS's own float32 ranking; any of them forces one). ``stale_index``: save the
    test-region embeddings after every task and report the stale-index rows
    (:mod:`triplets.facts.stale_index`; off by default, it costs 4·D bytes per region and task kept)."""

    batch_size: int = 256
    index: Literal["flat", "ivf", "ivfpq", "hnsw", "none"] = "flat"
    exact_backend: Literal["auto", "faiss-rescored", "blas", "torch", "faiss"] = "auto"
    stale_index: bool = False

    def validate(self) -> None:
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"eval.batch_size must be in 1..{MAX_BATCH_SIZE:,}, got {self.batch_size}")
        if not isinstance(self.stale_index, bool):
            raise ValueError(f"eval.stale_index must be true or false, got {self.stale_index!r}")


@dataclass
class TrainConfig:
    """A training run: the fact data, the model, the optimizer, the loss, the methods compared.

    ``search``: the per-task choice of the learning rate and each method's strength on the task's
    own training data (:class:`mas_core.hparam_search.SearchSettings`; off by default).

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``. ``num_threads``: CPU
    threads torch may use during the run (null: torch's default; 1 is much faster on a
    machine whose cores are busy with other work). ``online_importance``: what protects the last
    task when a stopped run resumes with the next one (:mod:`triplets.query.online_resume`).
    ``feature_cache_dir``: the folder of the trunk-feature cache (``model.cache_features``; null:
    ``RUN/features``); a folder shared by several run folders of the same fact file and backbone
    (one method each, in parallel) computes the cache once (:mod:`triplets.facts.feature_cache`).
    None of these four changes what a checkpoint must agree on to be resumed."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimSettings = field(default_factory=OptimSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec("finetune"), MethodSpec("mas")])
    eval: EvalConfig = field(default_factory=EvalConfig)
    online_importance: OnlineImportanceConfig = field(default_factory=OnlineImportanceConfig)
    search: SearchSettings = field(default_factory=SearchSettings)
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    feature_cache_dir: str | None = None

    def validate(self) -> None:
        if self.feature_cache_dir is not None and not str(self.feature_cache_dir).strip():
            raise ValueError("feature_cache_dir must be a folder path or null (RUN/features)")
        if self.num_threads is not None and not 1 <= self.num_threads <= MAX_THREADS:
            raise ValueError(f"num_threads must be an integer in 1..{MAX_THREADS} or null (torch's default), "
                             f"got {self.num_threads}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED} (2^63 - 1), got {self.seed}")
        check_methods(self.methods, check_ridge=split_options)
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        self.search.validate()
        self.search.check_methods([(method.name, method.key) for method in self.methods])


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config (``--set`` overrides applied) into a validated :class:`TrainConfig`."""
    return load_config(path, TrainConfig, overrides)


def select_methods(config: TrainConfig, names: list[str]) -> TrainConfig:
    """A copy of ``config`` keeping only the methods whose key is in ``names`` (config order); a
    ``search.start`` mapping keeps the entries of the kept methods (and ``default``)."""
    keys = [method.key for method in config.methods]
    for name in names:
        if name not in keys:
            raise ConfigError(f"--methods: {name!r} is not a method of this config{did_you_mean(name, keys)} "
                              f"(methods: {', '.join(keys)})")
    kept = [m for m in config.methods if m.key in names]
    search = config.search
    if isinstance(search.start, dict):
        names_kept = {DEFAULT_KEY} | {m.key for m in kept} | {m.name for m in kept}
        search = dataclasses.replace(search, start={k: v for k, v in search.start.items() if k in names_kept})
    return dataclasses.replace(config, methods=kept, search=search)


__all__ = ["DataConfig", "EvalConfig", "LossConfig", "MethodConfig", "TrainConfig", "load_train_config",
           "select_methods"]
