"""The ridge baseline of the fact embedding: S‖P‖O regressed on the frozen EfficientNet-Lite0's features.

Features ``x = φ(region) ∈ R^1280``: the pooled features of the whole ImageNet-trained
EfficientNet-Lite0 (:func:`triplets.backbones.efficientnet_lite0`, frozen, eval mode) of each
region image, resized bilinearly to ``input_size`` (option; default the fact model's own input
size) and standardised to ``[−1, 1]`` by :class:`~triplets.facts.model.FactEmbeddingNet` as for every fact model.
Targets: the slot vectors ``L = L_S‖L_P‖L_O`` of the sample's fact (:func:`triplets.facts.model.slot_targets`,
``loss.unit_norm_targets`` as configured). Sherlock's loss ignores a missing slot, so each slot is
its own weighted ridge problem with the slot's mask as sample weights (:mod:`mas_core.ridge`): for
slot ``k ∈ {S, P, O}`` with mask ``w_ik``::

    (W_k, b_k) = argmin Σ_i w_ik ‖L_k(f_i) − W_kᵀx_i − b_k‖² + α_k‖W_k‖²,   α_k = λ_t · tr(C_k)/d

accumulated over the tasks so far (after task ``t`` exactly ridge on tasks ``1..t`` together), one
strength ``λ_t`` per task chosen on a validation part of task ``t``'s training samples (the masked
MSE summed over the three slots, :func:`mas_core.ridge.choose_strength`). The model is a
:class:`~triplets.facts.model.FactEmbeddingNet` whose trunk is the frozen backbone and whose branches are
``Linear(1280, d)`` (subject: ``W_S``, ``b_S``) and ``Linear(1280, 2d)`` (predicate+object:
``[W_P W_O]``, ``[b_P b_O]``), so evaluation, indexes and queries treat it like any other run's
model; ``RUN/ridge/model.pt`` says how to rebuild it (:mod:`triplets.facts.ridge_model`). Nothing is
trained by gradient: the optimizer settings, ``online_importance`` and the search do not apply.

On a run whose fact model caches its trunk (``model.cache_features`` on efficientnet_lite0 with the
ridge's own weights and input size) the ridge reads that cache instead of running the whole network
on every region again: ``φ(region) = pool(suffix(cache[region]))`` with ``suffix`` the pretrained
blocks after ``model.trunk_blocks`` and the head convolution (a fresh fact model's branch before its
projection, :func:`triplets.facts.model.pretrained_features`),
the same function as ``pooled_features`` (the cache was computed in channels-last layout, so the
features agree to float rounding, not bit for bit). The cache is written by the first method that
needs it (:func:`triplets.facts.experiment.shared_feature_cache`).

Options of ``{name: ridge, options: {...}}``: ``strengths``, ``val_fraction``
(:class:`mas_core.ridge.RidgeSettings`), ``weights`` (null: the installed package's ImageNet
weights; a path; ``scratch``; default: ``model.weights`` when ``model.backbone`` is
efficientnet_lite0, else null) and ``input_size`` (pixels the images are resized to; default:
``model.input_size`` of such a config, else null: the fact file's image size).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mas_core.checkpoint import save_checkpoint
from mas_core.distributed import is_main_process
from mas_core.ridge import RIDGE, RidgeProblem, RidgeStatistics, ridge_settings, run_ridge

from ..config import to_dict
from .retrieval_report import RETRIEVAL_MODES
from .evaluate import evaluate_embeddings, stale_index_metrics
from .data import FactSamples
from .experiment import shared_feature_cache
from .feature_cache import FeatureSamples
from .model import build_model
from ..fingerprint import VOCABULARY_KEY
from .ridge_model import SAVED_KEY, build_ridge_model, split_options
from ..results_schema import method_summary
from ..runner import read_method_result, write_method_result
from .retrieval_report import summary_extras
from .stale_index import check_resume, save_task_embeddings

class FactRidge:
    """A :class:`mas_core.ridge.RidgeExperiment` over a fact file (see the module docs)."""

    def __init__(self, ctx: Any, options: dict[str, Any]) -> None:
        self.ctx = ctx
        self.settings_options, self.backbone = split_options(dict(options))
        model_config = ctx.config.model  # a config on EfficientNet-Lite0 lends the ridge its weights
        if getattr(model_config, "backbone", None) == "efficientnet_lite0":
            self.backbone.setdefault("weights", getattr(model_config, "weights", None))
            self.backbone.setdefault("input_size", getattr(model_config, "input_size", None))
        self.model = build_ridge_model(ctx.slot_dim, self.backbone).to(ctx.device)
        self.task_names = [f"t{task + 1}" for task in range(int(ctx.fact_file.num_tasks))]
        self._statistics: list[RidgeStatistics] = []
        self._test: dict[int, tuple[Tensor, np.ndarray]] = {}
        self.stale_index_dir: Path | None = None  # the method's folder when eval.stale_index
        self.cache: tuple[Path, nn.Module] | None = None  # (feature cache, pooled suffix): use_feature_cache

    def use_feature_cache(self) -> bool:
        """Read the run's trunk-feature cache when it holds this ridge's features (module docs):
        write it when missing, and return whether the ridge now reads it."""
        model = self.ctx.config.model
        if (self.ctx.run_dir is None or not getattr(model, "cache_features", False)
                or getattr(model, "backbone", None) != "efficientnet_lite0"
                or self.backbone.get("weights") != model.weights or self.backbone.get("input_size") != model.input_size):
            return False
        fact_model = build_model(model, self.ctx.slot_dim, self.ctx.image_size).to(self.ctx.device).eval()
        path = shared_feature_cache(self.ctx, fact_model)
        # a fresh branch's pretrained part is the pretrained suffix, pooling and flatten (pretrained_features)
        self.cache = (path, fact_model.subject_branch[:fact_model.pretrained_depth])
        return True

    def identity(self) -> dict[str, Any]:
        plain = to_dict(self.ctx.config)
        return {"data": plain["data"], "unit_norm_targets": plain["loss"]["unit_norm_targets"],
                "backbone": dict(self.backbone), "eval_batch_size": plain["eval"]["batch_size"]}

    def _features(self, task: int, split: int) -> tuple[Tensor, Tensor]:
        """``(features [n, 1280], fact ids [n])`` of a task's split, in file order."""
        if self.cache is not None:
            path, pooled = self.cache
            cached = FeatureSamples(path, self.ctx.fact_file, [(task, split)], with_labels=False)
            with torch.no_grad():
                chunks = [pooled(batch.to(self.ctx.device)).cpu() for batch in cached.in_order(self.ctx.config.eval.batch_size)]
            return (torch.cat(chunks) if chunks else torch.zeros(0, 1280)), cached.fact_ids
        samples = FactSamples(self.ctx.fact_file, [(task, split)], in_memory=self.ctx.config.data.in_memory)
        features, fact_ids = [], []
        with torch.no_grad():
            for images, ids in samples.in_order(self.ctx.config.eval.batch_size):
                features.append(self.model.trunk_features(images.to(self.ctx.device)).cpu())
                fact_ids.append(ids.reshape(-1))
        if not features:
            return torch.zeros(0, 1280), torch.zeros(0, dtype=torch.long)
        return torch.cat(features), torch.cat(fact_ids)

    def statistics(self, task: int) -> list[RidgeStatistics]:
        if task == 0:
            self._statistics = [RidgeStatistics(1280, self.ctx.slot_dim) for _ in range(3)]
        return self._statistics

    def task_problems(self, task: int) -> list[RidgeProblem]:
        features, fact_ids = self._features(task, 0)
        ids = fact_ids.to(self.ctx.targets.device)
        targets, masks = self.ctx.targets[ids].cpu().double(), self.ctx.masks[ids].cpu().double()
        d = self.ctx.slot_dim
        return [RidgeProblem(features, targets[:, k * d:(k + 1) * d], masks[:, k]) for k in range(3)]

    def set_solution(self, solutions: list[tuple[Tensor, Tensor]], task: int) -> None:
        (w_s, b_s), (w_p, b_p), (w_o, b_o) = solutions
        with torch.no_grad():
            subject, predicate_object = self.model.subject_branch, self.model.predicate_object_branch
            subject.weight.copy_(w_s.T.float())
            subject.bias.copy_(b_s.float())
            predicate_object.weight.copy_(torch.cat([w_p, w_o], dim=1).T.float())
            predicate_object.bias.copy_(torch.cat([b_p, b_o]).float())

    def _test_embeddings(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        if task not in self._test:
            self._test[task] = self._features(task, 1)
        features, fact_ids = self._test[task]
        with torch.no_grad():
            vectors = F.normalize(self.model.forward_features(features.to(self.ctx.device)), dim=1)
        return vectors.float().cpu().numpy(), fact_ids.numpy().astype("int64")

    def evaluate(self, task: int) -> list[float]:
        rows, kept = [], []
        for j in range(task + 1):
            vectors, fact_ids = self._test_embeddings(j)
            kept.append((vectors, fact_ids))
            rows.append(float(evaluate_embeddings(vectors, fact_ids, self.ctx.fact_file, j, mode="standard")["top5"]))
        if self.stale_index_dir is not None and is_main_process():  # eval.stale_index: triplets.facts.stale_index
            save_task_embeddings(self.stale_index_dir, task, kept, self.ctx.fingerprint)
        return rows

    def final_metrics(self) -> dict[str, list[dict[str, float]]]:
        """Per mode and task the retrieval metrics of the final model (as :func:`triplets.facts.evaluate.final_metrics`)."""
        final: dict[str, list[dict[str, float]]] = {mode: [] for mode in RETRIEVAL_MODES}
        for task in range(len(self.task_names)):
            vectors, fact_ids = self._test_embeddings(task)
            for mode in RETRIEVAL_MODES:
                final[mode].append(evaluate_embeddings(vectors, fact_ids, self.ctx.fact_file, task, mode=mode,
                                                       field=True))
        return final


def train_ridge_method(ctx: Any, method: Any, method_dir: Path, *, progress: bool = True,
                       stop_after_task: int | None = None) -> dict[str, Any]:
    """The fact runner's ``ridge`` (``triplets.facts.train.train_method`` dispatches here): the ridge
    sequence with a checkpoint after every task (resumed when one exists), then ``model.pt`` and
    ``result.json`` as for every method; a finished method's saved result is returned as is."""
    main = is_main_process()
    result_path = method_dir / "result.json"
    if main:
        method_dir.mkdir(parents=True, exist_ok=True)
    experiment = FactRidge(ctx, method.options)
    experiment.use_feature_cache()
    if ctx.config.eval.stale_index:
        num_tasks = int(ctx.fact_file.num_tasks)
        check_resume(method_dir, num_tasks if stop_after_task is None else min(int(stop_after_task), num_tasks))
        experiment.stale_index_dir = method_dir
    log = (lambda line: print(line, flush=True)) if progress and main else None
    outcome, records = run_ridge(experiment, ridge_settings(experiment.settings_options), seed=ctx.config.seed,
                                 checkpoint_dir=method_dir, resume=True, stop_after_task=stop_after_task, log=log,
                                 write=main)
    if outcome.trained_tasks == 0 and result_path.exists():
        return read_method_result(result_path)
    if main:
        save_checkpoint(method_dir / "model.pt", {
            "model": experiment.model.state_dict(), "model_config": to_dict(ctx.config.model),
            SAVED_KEY: dict(experiment.backbone), "slot_dim": ctx.slot_dim, "image_size": ctx.image_size,
            "encoder_name": ctx.fact_file.encoder_name, VOCABULARY_KEY: ctx.fingerprint,
        })
    final = experiment.final_metrics()
    result = method_summary(outcome, RIDGE, method.options, final=final, ridge=records)
    result.update(summary_extras(result))
    if ctx.config.eval.stale_index:
        result["stale_index"] = stale_index_metrics(method_dir, ctx.fact_file, final["standard"], len(outcome.accuracy))
    write_method_result(method_dir, result)
    return result


__all__ = ["FactRidge", "train_ridge_method"]
