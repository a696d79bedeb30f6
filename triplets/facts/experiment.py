"""The fact embedding as an experiment of the task loop (:class:`mas_core.loop.Experiment`).

Per task ``t`` the loop trains on the task's training images (joint mode: tasks ``0..t``) with

    loss = slot_loss(model(x), L[f], w[f]) [+ c · InfoNCE(model(x), f)]      (means over the batch)

(``triplets.facts.model``: the per-slot distance to the fact's language vectors, the in-batch
contrastive term at ``loss.temperature``); ``after_task`` reads the images of
``data.importance_data`` (``train``, ``test`` or another fact file; label-free methods) or the
labelled training samples with the per-sample slot loss (EWC's Fisher); ``R[t][j]`` is the
standard top-5 of task ``j`` (:func:`triplets.facts.evaluate.evaluate_task`).

Cached trunk features (``model.cache_features``, :mod:`triplets.facts.feature_cache`): the loop then
trains the branches alone (:meth:`FactEmbeddingNet.branch_head`) on the cached features, so
every regularizer's state covers the branch parameters only; importance images from another
fact file go through the frozen trunk on the fly; evaluation embeds the cached test features.
Several processes: the cache is written by rank 0 alone, the others wait and read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mas_core.batches import batch_input
from mas_core.distributed import current, is_main_process, run_on_main_process
from mas_core.loop import ImportanceSource

from ..config import to_dict
from ..errors import ConfigError, RunFolderError
from .retrieval_report import RETRIEVAL_MODES
from .evaluate import candidate_facts, embed_images, evaluate_embeddings, final_metrics
from .data import FactSamples, fact_image_dataset, open_fact_file
from .feature_cache import (
    FeatureSamples,
    cached_embeddings,
    ensure_feature_cache,
    feature_cache_folder,
    feature_cache_path,
)
from ..fingerprint import DATA_SHA_KEY, fact_vocabulary_fingerprint, feature_cache_fingerprint
from .model import FactEmbeddingNet, build_model, contrastive_loss, slot_loss, slot_targets
from .stale_index import save_task_embeddings
from .train_config import TrainConfig


@dataclass
class FactContext:
    """What every method of a run shares: the config, the open fact file, the regression
    targets ``[F, 3d]`` and slot masks ``[F, 3]`` on the device, and the samples read so far.
    ``data_sha256``: the SHA-256 of the fact file's bytes, recorded in every checkpoint's own
    payload (:data:`DATA_SHA_KEY` of the experiment's identity) once the run folder knows it."""

    config: TrainConfig
    fact_file: Any
    device: torch.device
    targets: Tensor
    masks: Tensor
    slot_dim: int
    image_size: int
    fingerprint: str
    run_dir: Path | None = None
    cache: dict = field(default_factory=dict)
    data_sha256: str | None = None

    def samples(self, key: tuple, parts: list[tuple[int, int | None]], max_samples: int | None = None,
                features: Path | None = None) -> FactSamples | FeatureSamples:
        """Images (``features`` None) or cached trunk features of the samples of ``parts``."""
        if features is not None:
            key = ("features", str(features)) + key
            if key not in self.cache:
                self.cache[key] = FeatureSamples(features, self.fact_file, parts, max_samples=max_samples)
        elif key not in self.cache:
            self.cache[key] = FactSamples(self.fact_file, parts, in_memory=self.config.data.in_memory,
                                          max_samples=max_samples)
        return self.cache[key]


def fact_context(config: TrainConfig, fact_file: Any, device: torch.device, run_dir: Path | None) -> FactContext:
    """The :class:`FactContext` of ``config`` on the open ``fact_file``: the regression targets
    ``slot_targets(fact_embeddings)`` (unit slots when ``loss.unit_norm_targets``) and the slot masks
    on ``device``, ``slot_dim = fact_embeddings.shape[1] // 3``, the file's image size and fingerprint."""
    embeddings = torch.as_tensor(np.asarray(fact_file.fact_embeddings), dtype=torch.float32)
    return FactContext(
        config=config, fact_file=fact_file, device=device,
        targets=slot_targets(embeddings, unit_norm=config.loss.unit_norm_targets).to(device),
        masks=torch.as_tensor(np.asarray(fact_file.slot_masks), dtype=torch.float32).to(device),
        slot_dim=embeddings.shape[1] // 3, image_size=int(fact_file.image_size),
        fingerprint=fact_vocabulary_fingerprint(fact_file), run_dir=run_dir)


class _ThroughTrunk:
    """Images of another fact file, passed through the frozen trunk batch by batch (the
    importance source of a run on cached features)."""

    def __init__(self, samples: FactSamples, model: FactEmbeddingNet, device: torch.device) -> None:
        self.samples, self.model, self.device = samples.inputs_only(), model, device

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Tensor]:
        with torch.no_grad():
            for images in self.samples.batches(index_batches):
                yield self.model.trunk_features(images.to(self.device))


class FactExperiment:
    """One method's view of a fact-embedding run (see the module docs)."""

    metric_name = "standard top-5"

    def __init__(self, ctx: FactContext) -> None:
        self.ctx = ctx
        self.record_data = True  # False: resuming a checkpoint written before checkpoints recorded the data
        self.task_names = [f"t{task + 1}" for task in range(int(ctx.fact_file.num_tasks))]
        self.features: Path | None = None
        self.stale_index_dir: Path | None = None  # the method's folder: save the stale-index embeddings there

    def identity(self) -> dict[str, Any]:
        identity = self.identity_of(self.ctx.config)
        if self.ctx.data_sha256 and self.record_data:
            identity[DATA_SHA_KEY] = self.ctx.data_sha256
        return identity

    @staticmethod
    def identity_of(config: TrainConfig) -> dict[str, Any]:
        """The sections of ``config`` that change a method's numbers besides the optimizer and
        the seed: ``data``, ``model`` (without the trunk flags when false) and ``loss``."""
        plain = to_dict(config)
        model = {key: value for key, value in plain["model"].items()
                 if not (key in ("freeze_trunk", "cache_features") and value is False)
                 and not (key == "input_size" and value is None)
                 and not (key == "trunk_blocks" and plain["model"]["backbone"] != "efficientnet_lite0")}
        return {"data": plain["data"], "model": model, "loss": plain["loss"]}

    def build_model(self) -> nn.Module:
        return build_model(self.ctx.config.model, self.ctx.slot_dim, self.ctx.image_size)

    def trained_module(self, model: nn.Module) -> nn.Module:
        if not self.ctx.config.model.cache_features:
            return model
        if self.ctx.run_dir is None:
            raise ConfigError("model.cache_features needs a run folder to keep the features in")
        self.features = shared_feature_cache(self.ctx, model)
        return model.branch_head()

    def begin_task(self, model: nn.Module, task: int) -> None:
        return None

    def train_data(self, tasks: Sequence[int]) -> FactSamples | FeatureSamples:
        parts = [(task, 0) for task in tasks]
        return self.ctx.samples(("train-parts", tuple(parts)), parts, None, self.features)

    def loss(self, module: nn.Module, batch: Any, task: int) -> Tensor:
        images, fact_ids = batch
        loss_config = self.ctx.config.loss
        embedding = module(images)  # images, or cached trunk features
        loss = slot_loss(embedding, self.ctx.targets[fact_ids], self.ctx.masks[fact_ids], squared=loss_config.squared)
        if loss_config.contrastive_weight > 0:
            loss = loss + loss_config.contrastive_weight * contrastive_loss(
                embedding, fact_ids, self.ctx.targets, temperature=loss_config.temperature)
        return loss

    def importance_loss(self, module: nn.Module, batch: Any) -> Tensor:
        """Per-sample slot loss ``[B]`` of ``(images, fact_ids)`` (EWC's Fisher on the regression loss)."""
        images, fact_ids = batch[0], batch[1].to(self.ctx.targets.device)
        return slot_loss(module(images), self.ctx.targets[fact_ids], self.ctx.masks[fact_ids],
                         squared=self.ctx.config.loss.squared, reduction="none")

    def importance_data(self, model: nn.Module, task: int, kind: str) -> ImportanceSource:
        ctx, data = self.ctx, self.ctx.config.data
        batch_size, limit = ctx.config.eval.batch_size, data.importance_max_samples
        if kind == "labelled":
            return ImportanceSource(ctx.samples(("train", task, limit), [(task, 0)], limit, self.features), batch_size)
        if data.importance_data in ("train", "test"):
            split = 0 if data.importance_data == "train" else 1
            samples = ctx.samples((data.importance_data, task, limit), [(task, split)], limit, self.features)
        else:
            key = ("external", task, limit)
            if key not in ctx.cache:
                other = open_fact_file(data.importance_data)
                if other.num_tasks <= task or not other.has_pixels or other.image_size != ctx.image_size:
                    raise ConfigError(
                        f"data.importance_data: {data.importance_data} must hold pixels of size {ctx.image_size} "
                        f"for task {task}; it has {other.num_tasks} tasks, image size {other.image_size}")
                ctx.cache[key] = FactSamples(other, [(task, None)], in_memory=data.in_memory, max_samples=limit)
            samples = ctx.cache[key]
            if self.features is not None:
                return ImportanceSource(_ThroughTrunk(samples, model, ctx.device), batch_size)
        if len(samples) == 0:
            raise ConfigError(f"data.importance_data={data.importance_data!r} has no images for task {task}")
        return ImportanceSource(samples.inputs_only(), batch_size)

    def pretrained_output(self, module: nn.Module, batch: Any) -> Tensor:
        """F₀ of MAS anchored at the pretrained weights (``anchor: start``): the pretrained part of
        both branches (:func:`triplets.facts.model.pretrained_features`) on ``batch``'s images or cached
        trunk features."""
        return module.pretrained_output(batch_input(batch))

    def evaluate(self, model: nn.Module, task: int) -> list[float]:
        """The row ``R[task]``: standard top-5 of tasks ``0..task``. With ``stale_index_dir`` set
        (``eval.stale_index``) the test-region embeddings it ranked are saved there as the index
        after ``task`` (:func:`triplets.facts.stale_index.save_task_embeddings`; rank 0; the loop evaluates
        before each checkpoint, the model it delivers last)."""
        row, kept = [], []
        for j in range(task + 1):
            vectors, fact_ids = self._test_embeddings(model, j)
            if self.stale_index_dir is not None:
                kept.append((vectors, fact_ids))
            row.append(float(evaluate_embeddings(vectors, fact_ids, self.ctx.fact_file, j, mode="standard")["top5"]))
        if kept and is_main_process():
            save_task_embeddings(self.stale_index_dir, task, kept, self.ctx.fingerprint)
        return row

    def validation_score(self, module: nn.Module, task: int, positions: Tensor) -> float:
        """Standard top-5 of ``module`` (the network, or its branches on cached features) on the
        training samples of ``task`` at ``positions``, ranked among the task's facts (the held-out
        split of the hyperparameter search, :mod:`mas_core.hparam_search`)."""
        samples = self.train_data([task])
        vectors, fact_ids = [], []
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                for inputs, ids in samples.batches(list(positions.split(self.ctx.config.eval.batch_size))):
                    vectors.append(module.embed(inputs.to(self.ctx.device)).float().cpu())
                    fact_ids.append(ids.reshape(-1).cpu())
        finally:
            module.train(was_training)
        embeddings = torch.cat(vectors).numpy().astype("float32")
        return float(evaluate_embeddings(embeddings, torch.cat(fact_ids).numpy().astype("int64"), self.ctx.fact_file,
                                         task, mode="standard")["top5"])

    def chance_score(self, task: int) -> float:
        """``min(5, C)/C`` with ``C`` the task's candidate facts (standard mode): the top-5 of a
        uniformly random ranking, the level at or below which the search's plasticity reference counts as
        collapsed (:mod:`mas_core.hparam_search`)."""
        count = len(candidate_facts(self.ctx.fact_file, task, "standard"))
        return min(5, count) / max(count, 1)

    def _test_embeddings(self, model: FactEmbeddingNet, task: int) -> tuple[np.ndarray, np.ndarray]:
        """Unit embeddings [n, D] and true fact ids [n] of ``task``'s test regions (cached trunk
        features through the branches, or the images through the whole model)."""
        ctx = self.ctx
        if self.features is not None:
            samples = ctx.samples(("test", task, None), [(task, 1)], None, self.features)
            return cached_embeddings(model.branch_head(), samples, ctx.device, ctx.config.eval.batch_size)
        return embed_images(model, fact_image_dataset(ctx.fact_file, task, "test"), batch_size=ctx.config.eval.batch_size,
                            device=str(ctx.device))

    def final_metrics(self, model: FactEmbeddingNet) -> dict[str, Any]:
        """Per mode and task the retrieval metrics of the final model (:func:`triplets.facts.evaluate.final_metrics`)."""
        ctx = self.ctx
        if self.features is None:
            return final_metrics(model, ctx.fact_file, split="test", device=str(ctx.device),
                                 batch_size=ctx.config.eval.batch_size)
        final: dict[str, list[dict[str, float]]] = {mode: [] for mode in RETRIEVAL_MODES}
        head = model.branch_head()
        for task in range(int(ctx.fact_file.num_tasks)):
            samples = ctx.samples(("test", task, None), [(task, 1)], None, self.features)
            vectors, fact_ids = cached_embeddings(head, samples, ctx.device, ctx.config.eval.batch_size)
            for mode in RETRIEVAL_MODES:
                final[mode].append(evaluate_embeddings(vectors, fact_ids, ctx.fact_file, task, mode=mode, field=True))
        return final


def shared_feature_cache(ctx: FactContext, model: FactEmbeddingNet) -> Path:
    """:func:`~triplets.facts.feature_cache.ensure_feature_cache` written by rank 0 alone; the other
    ranks wait for it (in :func:`mas_core.distributed.run_on_main_process`) and then only check
    that rank 0's file is the one they expect."""
    assert ctx.run_dir is not None
    batch_size = ctx.config.eval.batch_size
    folder = feature_cache_folder(ctx.run_dir, ctx.config.feature_cache_dir)
    if current() is None:
        return ensure_feature_cache(folder, model, ctx.fact_file, batch_size=batch_size, device=ctx.device)
    written = run_on_main_process(lambda: ensure_feature_cache(folder, model, ctx.fact_file,
                                                               batch_size=batch_size, device=ctx.device))
    path = feature_cache_path(folder, feature_cache_fingerprint(model, ctx.fact_file))
    if Path(written) != path or not path.is_file():
        raise RunFolderError(f"this rank cannot read the feature cache {written} that rank 0 wrote; the run "
                             "folder must be on a file system every process sees, with the same model on every rank")
    return path


__all__ = ["FactContext", "FactExperiment", "fact_context", "shared_feature_cache"]
