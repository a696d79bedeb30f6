"""Task-by-task training of the fact embedding, one run folder per experiment.

For every method of the config (finetune, joint, mas, lmas, ewc, si, lwf, …; ``ridge``, the
closed-form baseline on the frozen EfficientNet-Lite0, :mod:`triplets.facts.ridge`) a fresh
model is built with the same seed and trained on the tasks in order by the task loop
(:func:`mas_core.loop.train_tasks`) on :class:`triplets.facts.experiment.FactExperiment`:
the loss, importance data and per-task evaluation (standard top-5) are the experiment's; the
epochs, seeding, optimizer, hooks, divergence check, checkpoints and resume are the loop's.
``joint`` is the loop's joint mode (the union of tasks 0..t at step t, the upper bound).
The methods run through :func:`triplets.runner.run_methods` (:class:`FactRun`): a killed run
continues with ``resume=True`` after its last finished task and gives the same result as an
uninterrupted one; a finished method is loaded; a method whose training diverges is listed under
``diverged`` and the others go on (:mod:`triplets.runner`). ``mas@test`` in ``methods:`` is MAS
with this method's ``data.importance_data`` set to ``test`` (:func:`method_context`).

Run folder (:mod:`triplets.run_folder`, ``docs/run_folder.md``)::

    RUN/config.yaml  RUN/versions.json  RUN/results.json  RUN/results.md  RUN/plots/*.png
    RUN/<folder>/checkpoint.pt  RUN/<folder>/model.pt  RUN/<folder>/log.txt
    RUN/<folder>/result.json    RUN/<folder>/index/          # <folder>: the method's key, @ → _at_
    RUN/features/<fingerprint>.h5            # only with model.cache_features

Cached trunk features (``model.cache_features: true``): :mod:`triplets.facts.feature_cache`. The
saved ``model.pt`` is the full network (frozen trunk included), so :meth:`Run.load_model` and
queries work on raw images.

Several processes (``torchrun --nproc_per_node=N -m triplets.cli train --config C --out RUN``;
the rules are :mod:`mas_core.distributed`'s): the command joins the process group (gloo on
a CPU, nccl on GPUs, every rank on ``cuda:LOCAL_RANK``) and every rank runs :func:`train_run`
with the same config and seeds. Each global batch is the one-process batch (same
generator-seeded order, whatever N); rank ``r`` trains on its positions ``r, r+N, …`` (in
memory, streamed or cached features alike) through DistributedDataParallel, with the loss
``N/|batch| · Σ ℓ_k`` plus the penalty inside the wrapped forward, so the averaged gradient
is the one-process gradient. The logged loss and the divergence check use the all-reduced
global-batch loss. ``after_task`` runs on the unwrapped model over this rank's share of the
importance samples (:class:`~mas_core.distributed.RankShard`); the estimators sum across
ranks, so Ω (Fisher, Hebbian sums) is the one-process value. Every rank evaluates (no
collective); rank 0 alone writes ``config.yaml``, ``versions.json``, logs, checkpoints,
``model.pt``, results, report, plots, indexes and the feature cache (the others wait for it,
then read it). Checkpoints hold the unwrapped model, so a run checkpointed on N processes
resumes on any number. The run folder (and the fact file) must be on a file system every rank
sees. What differs from one process, beyond the rounding of sums (measured on the tests'
tiny world, 2 processes: the same accuracy matrices and logged losses, weights within 2e-7,
Ω within 5e-7 relative): the InfoNCE term
(``loss.contrastive_weight``) takes its negatives among the facts of the rank's share, not of
the whole batch; BatchNorm (``model.norm: batch``, the torchvision backbones) normalises
with per-rank batch statistics and keeps rank 0's running statistics (``model.norm: group``
has no batch statistics); dropout masks differ (ranks other than 0 draw from their own
seed); LwF's distillation is averaged per rank.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mas_core.checkpoint import load_checkpoint, save_checkpoint
from mas_core.distributed import current, is_main_process, local_device, run_on_main_process, same_on_every_rank
from mas_core.experiment import LoopHooks
from mas_core.hparam_search import SearchSettings
from mas_core.loop import JOINT, checkpoint_config, resolved_options, train_tasks
from mas_core.ridge import RIDGE

from ..config import to_dict
from ..errors import ConfigError, RunFolderError
from .evaluate import embed_images, stale_index_metrics
from .stale_index import check_resume as check_stale_resume
from .data import check_fact_file, fact_image_dataset, open_fact_file
from .experiment import FactContext, FactExperiment, fact_context
from .ridge import train_ridge_method
from .ridge_model import rebuild_saved_model
from ..fingerprint import DATA_SHA_KEY, VOCABULARY_KEY, fact_vocabulary_fingerprint, file_sha256, model_fingerprint
from ..index import build_index
from .model import FactEmbeddingNet, build_model
from ..query.online_resume import OnlineImportanceOnResume, check_online_importance, online_importance_history
from ..run_log import run_hooks
from ..report import write_report
from ..run_folder import prepare_run_folder, read_data_identity, recorded_data_sha256, results_dict
from ..runner import MethodSpec, read_method_result, run_methods, write_method_result
from ..results_schema import method_summary
from .retrieval_report import summary_extras
from .train_config import TrainConfig


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device=auto or cpu")
    return torch.device(name)


def method_checkpoint_config(config: TrainConfig, method: MethodSpec, data_sha256: str | None = None
                             ) -> dict[str, Any]:
    """What ``RUN/<method>/checkpoint.pt`` must agree on to be resumed (see
    :func:`mas_core.loop.checkpoint_config`): data (the config's section and the fact file's
    SHA-256, ``data_sha256`` or read from the file), model, loss, optimizer, seed and the method."""
    ctx_identity = FactExperiment.identity_of(config)
    ctx_identity[DATA_SHA_KEY] = data_sha256 or file_sha256(config.data.fact_file)
    recorded = checkpoint_config(ctx_identity, method.name, method.name == JOINT,
                                 resolved_options(method.name, dict(method.options)), config.optim, config.seed)
    if config.search.enabled:
        recorded["search"] = method_search(config, method).identity()
    return recorded


def method_search(config: TrainConfig, method: MethodSpec, saved: dict[str, Any] | None = None) -> SearchSettings:
    """The search settings one method trains with: a ``search.start`` mapping replaced by the
    method's own start, so that its checkpoint does not depend on which other methods ``--methods``
    selected. ``saved``: the ``"search"`` identity of the method's existing checkpoint; one written
    with the whole mapping (before this rule) is resumed with that mapping when it gives this method
    the same start (the training is the same either way)."""
    own = config.search.resolved_for(method.name, method.key)
    if saved and isinstance(saved.get("start"), dict) and not isinstance(own.start, dict):
        legacy = dataclasses.replace(config.search, start=dict(saved["start"]))
        try:
            if legacy.start_for(method.name, method.key) == own.start:
                return legacy
        except ValueError:
            pass
    return own


def train_run(config: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
              stop_after_task: int | None = None, hooks: LoopHooks | None = None) -> dict:
    """Train every method of ``config`` task by task into the run folder ``out_dir``; return
    the results dictionary also written to ``RUN/results.json`` (schema in ``docs/run_folder.md``:
    per method the accuracy matrix R, ``avg_acc``, ``forgetting``,
    ``bwt``, ``final`` metrics and ``wall_time_s``; accuracies are fractions in [0, 1]; a diverged
    method under ``diverged``, :func:`triplets.runner.run_methods`; when every method diverged the
    first :class:`~mas_core.errors.DivergenceError` is raised).

    Under ``torchrun`` (a process group joined beforehand, as ``mas-triplets train`` does with
    :func:`mas_core.distributed.init_from_environment`) every rank calls it with the same
    arguments; rank 0 writes the run folder and the others return the same dictionary
    without writing anything (see the module docs).

    ``stop_after_task=k`` trains the first ``k`` tasks only (model, result and indexes are
    written for the model after task ``k``); ``resume=True`` later continues with task ``k + 1``,
    the last task protected as ``config.online_importance`` says (:mod:`triplets.query.online_resume`).
    ``hooks``: the task loop's :class:`~mas_core.experiment.LoopHooks` for every method (the metrics
    log and the Ctrl-C of :mod:`triplets.run_log`; by default the metrics log ``RUN/metrics.csv`` alone)."""
    with same_on_every_rank():  # the checks before training fail alike on every rank
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, fact_file=str(Path(config.data.fact_file).expanduser().resolve())))
        try:
            config.validate()
        except ValueError as error:
            raise ConfigError(str(error)) from None
        out_dir = Path(out_dir)
        fact_file = open_fact_file(config.data.fact_file)
    threads_before = torch.get_num_threads()
    if config.num_threads is not None:  # CPU threads for this run only; restored below
        torch.set_num_threads(config.num_threads)
    try:
        with same_on_every_rank():
            check_fact_file(fact_file)
            device = local_device(resolve_device(config.device))  # several GPUs: cuda:LOCAL_RANK
            _check_one_gpu_per_process(config.device, device)
            ctx = fact_context(config, fact_file, device, out_dir)
            build_model(config.model, ctx.slot_dim, ctx.image_size)  # fail fast on a bad model config
        if resume:  # an accumulator that cannot apply is refused before anything is written
            with same_on_every_rank():
                last_task = fact_file.num_tasks if stop_after_task is None else min(stop_after_task, fact_file.num_tasks)
                check_online_importance(config.online_importance, out_dir, [method.folder for method in config.methods],
                                         last_task=last_task)
        # rank 0 creates or checks the folder; its answer (or its error) reaches every rank
        recorded, restart = run_on_main_process(lambda: prepare_run_folder(config, out_dir, resume))
        ctx.data_sha256 = (read_data_identity(out_dir) or {}).get("fact_file", {}).get("sha256")
        hooks = run_hooks(out_dir, hooks, main=is_main_process())  # RUN/metrics.csv at the least
        trainer = FactRun(ctx, out_dir, recorded, progress=progress, stop_after_task=stop_after_task, hooks=hooks)
        return run_methods(trainer, config.methods, out_dir, restart=restart,
                           log=(lambda line: print(line, flush=True)) if progress else None)
    finally:
        torch.set_num_threads(threads_before)
        fact_file.close()


class FactRun:
    """The fact embedding's part of :func:`triplets.runner.run_methods` (a :class:`MethodTrainer`):
    :func:`train_method` per method, :func:`triplets.run_folder.results_dict` for the document, the
    report and the FAISS indexes at the end."""

    def __init__(self, ctx: FactContext, out_dir: Path, recorded: TrainConfig, *, progress: bool,
                 stop_after_task: int | None, hooks: LoopHooks | None) -> None:
        self.ctx, self.out_dir, self.recorded = ctx, out_dir, recorded
        self.progress, self.stop_after_task, self.hooks = progress, stop_after_task, hooks

    def train_method(self, method: MethodSpec, method_dir: Path, *, restart: bool) -> dict[str, Any]:
        return train_method(method_context(self.ctx, method), method, method_dir, progress=self.progress,
                            stop_after_task=self.stop_after_task, hooks=self.hooks, restart=restart)

    def results(self, per_method: dict[str, Any], diverged: dict[str, str], complete: bool) -> dict[str, Any]:
        known = json.loads(json.dumps(per_method))  # as read back from the files
        return results_dict(self.out_dir, self.recorded, self.ctx.fact_file, known, diverged, complete)

    def finish(self, results: dict[str, Any]) -> None:
        write_report(results, self.out_dir)
        _write_index(self.out_dir, self.recorded, self.ctx)


def method_context(ctx: FactContext, method: MethodSpec) -> FactContext:
    """``ctx`` for ``method``: its own ``importance_data`` (``mas@test``) in place of the config's
    ``data.importance_data`` (the same caches)."""
    if method.importance_data is None or method.importance_data == ctx.config.data.importance_data:
        return ctx
    data = dataclasses.replace(ctx.config.data, importance_data=method.importance_data)
    return dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, data=data))


def _method_search(config: TrainConfig, method: MethodSpec, checkpoint_path: Path) -> SearchSettings | None:
    """:func:`method_search`, reading the search identity of an existing checkpoint; ``None`` when
    the search is off."""
    if not config.search.enabled:
        return None
    saved = None
    if checkpoint_path.is_file():
        saved = (load_checkpoint(checkpoint_path, map_location="cpu").get("config") or {}).get("search")
    return method_search(config, method, saved)


def train_method(ctx: FactContext, method: MethodSpec, method_dir: Path, *, progress: bool = True,
                 stop_after_task: int | None = None, hooks: LoopHooks | None = None,
                 restart: bool = False) -> dict[str, Any]:
    """Train one method over all tasks (the first ``stop_after_task``) with the task loop (resuming
    from its checkpoint if there is one, the last task's Ω replaced as ``online_importance`` says)
    and write ``model.pt`` and ``result.json`` (rank 0). A method whose ``result.json`` and
    checkpoint exist and that has nothing left to train is not retrained: its saved result is returned.
    ``ridge`` is the closed-form baseline on the frozen backbone (:mod:`triplets.facts.ridge`)."""
    if method.name == RIDGE:
        return train_ridge_method(ctx, method, method_dir, progress=progress, stop_after_task=stop_after_task)
    main = is_main_process()
    result_path = method_dir / "result.json"
    with same_on_every_rank():  # every rank reads the same files (written before this run)
        if result_path.exists() and not (method_dir / "checkpoint.pt").exists():
            raise RunFolderError(f"{method_dir} has a result but no checkpoint; delete the folder to retrain "
                                 f"{method.key}")
        if ctx.config.eval.stale_index:
            check_stale_resume(method_dir, _last_task(ctx, stop_after_task))
    if main:
        method_dir.mkdir(parents=True, exist_ok=True)
    experiment = FactExperiment(ctx)
    if ctx.config.eval.stale_index:  # the test-region embeddings after every task (triplets.facts.stale_index)
        experiment.stale_index_dir = method_dir
    checkpoint_path = method_dir / "checkpoint.pt"
    # a checkpoint written before checkpoints recorded the data is resumed as it was written
    experiment.record_data = not checkpoint_path.is_file() or recorded_data_sha256(checkpoint_path) is not None
    log = (lambda line: print(line, flush=True)) if progress else None
    queried = OnlineImportanceOnResume(ctx.config.online_importance, method.key, method_dir,
                                        experiment.importance_data, ctx.device,
                                        log if log is not None and main else (lambda line: None))
    with same_on_every_rank():  # a refused checkpoint or an all-reduced divergence: every rank alike
        outcome = train_tasks(experiment, method.name, ctx.config.optim, seed=ctx.config.seed, device=ctx.device,
                              method_options=dict(method.options), label=method.key, checkpoint_dir=method_dir,
                              resume=not restart, log=log, log_epochs=False, stop_after_task=stop_after_task,
                              after_resume=queried if ctx.config.online_importance.use != "none" else None,
                              search=_method_search(ctx.config, method, checkpoint_path), hooks=hooks)
    if outcome.trained_tasks == 0 and result_path.exists():
        return read_method_result(result_path)
    model = outcome.model
    if main:
        save_checkpoint(method_dir / "model.pt", {
            "model": model.state_dict(), "model_config": to_dict(ctx.config.model), "slot_dim": ctx.slot_dim,
            "image_size": ctx.image_size, "encoder_name": ctx.fact_file.encoder_name, VOCABULARY_KEY: ctx.fingerprint,
            DATA_SHA_KEY: ctx.data_sha256,
        })
    extras: dict[str, Any] = {"final": experiment.final_metrics(model)}
    history = online_importance_history(result_path, queried.records)
    if history:
        extras["online_importance"] = history
    if ctx.config.eval.stale_index:
        extras["stale_index"] = stale_index_metrics(method_dir, ctx.fact_file, extras["final"]["standard"],
                                                    len(outcome.accuracy))
    result = method_summary(outcome, method.name, method.options, **extras)
    result.update(summary_extras(result))
    write_method_result(method_dir, result)
    return result


def _last_task(ctx: FactContext, stop_after_task: int | None) -> int:
    """How many tasks a method has trained when this run ends (``stop_after_task`` or all)."""
    num_tasks = int(ctx.fact_file.num_tasks)
    return num_tasks if stop_after_task is None else min(int(stop_after_task), num_tasks)


def _check_one_gpu_per_process(name: str, device: torch.device) -> None:
    """Under torchrun, refuse a device naming one GPU (``cuda:1``) for several processes of one
    machine: each process must take its own ``cuda:LOCAL_RANK`` (``device: auto`` or ``cuda``)."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if current() is not None and device.type == "cuda" and name not in ("auto", "cuda") and processes_here > 1:
        raise ConfigError(f"device {name!r} names one GPU for the {processes_here} processes on this machine; "
                          "under torchrun use device=auto or device=cuda (each process takes cuda:LOCAL_RANK)")


def _write_index(out_dir: Path, config: TrainConfig, ctx: FactContext) -> None:
    """Save the FAISS indexes of every finished method (see :func:`build_run_indexes`)."""
    if config.eval.index == "none":
        return
    for method in config.methods:
        model_path = out_dir / method.folder / "model.pt"
        if not model_path.exists():
            continue
        state = load_checkpoint(model_path, map_location="cpu")
        model = rebuild_saved_model(state)  # the ridge baseline's model, else the config's
        if model is None:
            model = build_model(config.model, ctx.slot_dim, ctx.image_size)
            model.load_state_dict(state["model"])
        build_run_indexes(out_dir / method.folder / "index", model.eval(), ctx.fact_file, kind=config.eval.index,
                          device=str(ctx.device), batch_size=config.eval.batch_size)


def build_run_indexes(index_dir: str | Path, model: FactEmbeddingNet, fact_file, *, kind: str = "flat",
                      device: str = "cpu", batch_size: int = 256) -> dict[str, Path]:
    """Write ``index_dir/facts.faiss`` (the fact file's language vectors, ids = fact ids) and
    ``index_dir/images.faiss`` (the model's embeddings of all test images, ids = sample
    indices), each with its ``.json`` sidecar. Both carry ``model_fingerprint(model)``, so
    :func:`triplets.index.load_index` with the fingerprint of another model refuses them.
    Small sets fall back to a flat index (IVF needs ≥ 39 vectors per cell; IVF-PQ's
    codebooks ≥ 64 per centroid, 16,384 vectors)."""
    index_dir = Path(index_dir)
    fingerprint = model_fingerprint(model)
    fact_vectors = np.asarray(fact_file.fact_embeddings, dtype=np.float32)
    test_indices = fact_file.sample_indices(None, "test")
    image_vectors, _ = embed_images(model, fact_image_dataset(fact_file, None, "test"), batch_size=batch_size, device=device)
    written = {}
    for name, vectors, ids in (("facts", fact_vectors, np.arange(len(fact_vectors))),
                               ("images", image_vectors, test_indices)):
        enough = 64 * 256 if kind == "ivfpq" else 39 * 4
        chosen = kind if kind == "flat" or len(vectors) >= enough else "flat"
        index = build_index(vectors, kind=chosen, ids=ids, fingerprint=fingerprint, use_gpu="auto",
                            metadata={"contents": name, "encoder_name": fact_file.encoder_name,
                                      VOCABULARY_KEY: fact_vocabulary_fingerprint(fact_file)})
        written[name] = index.save(index_dir / f"{name}.faiss")
    return written


__all__ = ["build_run_indexes", "method_checkpoint_config", "resolve_device", "train_method", "train_run"]
