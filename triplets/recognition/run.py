"""The object-recognition task sequence (Aljundi et al. 2018, Sec. 5.1): a multi-head
network learns a sequence of classification datasets, every method from the same seed.

:func:`run_recognition` builds the tasks of a :class:`RecognitionConfig` (converting
each raw dataset once to HDF5 with :func:`data_prep.image_sets.prepare.prepare_image_dataset`),
trains the sequence once per method with :func:`mas_core.sequence.run_sequence` (the task
loop; checkpoints in ``OUT/<method>/``), and writes

* ``OUT/results.json`` (schema version 1, :mod:`triplets.results_schema`): per method the
  accuracy matrix ``R[i][j]`` (fraction of the test set of task ``j`` classified correctly
  after training task ``i``), ``avg_acc`` (mean final accuracy), ``avg_drop`` (mean over
  tasks of final minus just-after accuracy; negative = forgetting), ``forgetting``
  (Chaudhry et al.), ``bwt``, ``wall_time_s`` (IMM also ``accuracy_matrix_merged`` and
  ``merged``: its merged model, apart from the models as trained; ``ridge`` also ``ridge``: per
  task the strengths tried with their validation MSE and the one chosen, :mod:`mas_core.ridge`);
* ``OUT/results.md`` and ``OUT/plots/accuracy.png``, ``OUT/plots/drop.png``
  (:func:`triplets.report.recognition_markdown`, :func:`triplets.report.write_recognition_plots`).

A method whose training diverges (:class:`~mas_core.errors.DivergenceError`) does not stop the
others: it is listed under ``diverged`` in ``results.json`` (with the error) and under the tables
of ``results.md``, ``results.json`` says ``"complete": false``, and ``--resume`` trains it again:
from its checkpoint with the same settings, or from the start when the settings that its error
advises changing (its strength in ``method_options``, say) now differ from its checkpoint's. Only
when every method diverged is the first error raised.

All files are written atomically. A method finished earlier is loaded from
``OUT/<method>/result.json`` on ``resume``; an interrupted one continues from its
last task checkpoint, so the final results equal those of an uninterrupted run
(``wall_time_s`` aside). ``OUT`` must be new, empty, or (with ``resume``) a recognition run:
anything else, and a finished run without ``resume``, is refused before any work
(:func:`triplets.run_folder.check_output_folder`). ``OUT/data.json`` records the SHA-256 of
every task's prepared HDF5 file; ``resume`` refuses a run whose prepared data changed.

Several processes (``torchrun --nproc_per_node=N -m triplets.cli recognition ...``): every
rank calls :func:`run_recognition` with the same arguments; the training itself is
:func:`mas_core.sequence.run_sequence`'s (global batches split across ranks, DDP, Ω reduced
across ranks, rank-0 checkpoints). Rank 0 alone converts the raw datasets (the others wait,
then read its HDF5 files), and writes ``config.json``, ``versions.json``, the per-method ``result.json``,
``results.json``, ``results.md`` and the plots; the other ranks return the same results
dictionary without writing anything. ``data_dir`` and ``OUT`` must be on a file system every
rank sees.

Method names and the ``@test`` suffix: :mod:`triplets.recognition.config`. The results schema and
the run folder: ``docs/run_folder.md``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mas_core.checkpoint import atomic_write_json, atomic_write_text, read_json, remove_stale_temporaries
from mas_core.distributed import is_main_process, run_on_main_process, same_on_every_rank
from mas_core.errors import CheckpointMismatchError, DivergenceError
from mas_core.experiment import LoopHooks
from mas_core.loop import OptimSettings
from mas_core.ridge import RIDGE, ridge_settings
from mas_core.sequence import Task, run_sequence

from ..config import to_dict
from ..errors import ConfigError
from .config import RecognitionConfig, TaskSpec, importance_from_inputs, parse_methods
from .ridge import run_recognition_ridge
from .data import build_tasks, ensure_prepared, model_factory, unlabeled_inputs
from ..report import recognition_markdown, write_recognition_plots
from ..results_schema import method_summary, results_document
from ..run_log import run_hooks
from ..run_folder import (
    DATA_IDENTITY_NAME, check_output_folder, identity_as_recorded, package_versions, read_data_identity,
)


def method_dir_name(method: str) -> str:
    """Folder of a method's checkpoints (``mas@test`` → ``mas_at_test``)."""
    return method.replace("@", "_at_")


def _method_options(config: RecognitionConfig, method: str) -> dict[str, Any]:
    if method in config.method_options:
        return dict(config.method_options[method])
    return dict(config.method_options.get(method.split("@")[0], {}))


def _importance_choice(config: RecognitionConfig, method: str) -> str:
    base, _, variant = method.partition("@")
    if variant:
        return variant
    return config.importance_data if importance_from_inputs(base) else "train"


def run_recognition(config: RecognitionConfig, out: str | Path, *, methods: Sequence[str] | None = None,
                    resume: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
                    hooks: LoopHooks | None = None) -> dict[str, Any]:
    """Train the sequence once per method, write results.json / results.md / plots; return the results dict.

    Under ``torchrun`` every rank calls it; rank 0 alone writes (see the module docs). ``hooks``: the
    task loop's :class:`~mas_core.experiment.LoopHooks` for every method (:mod:`triplets.run_log`; by
    default the metrics log ``OUT/metrics.csv`` alone)."""

    with same_on_every_rank():
        try:
            method_list = parse_methods(list(methods) if methods is not None else config.methods)
            every = list(config.methods) + [method for method in method_list if method not in config.methods]
            config.search.check_methods([(method.split("@")[0], method) for method in every])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    main = is_main_process()
    out = Path(out)
    emit = log or ((lambda message: print(message, file=sys.stderr, flush=True)) if progress else (lambda m: None))
    if not main:
        emit = lambda message: None  # noqa: E731 - rank 0 alone logs
    config_dict = to_dict(config)
    results_path = out / "results.json"

    def prepare_folder_and_data() -> list[Path]:
        check_output_folder(out, "recognition", resume=resume)
        paths = [ensure_prepared(spec, config.data_dir, config.seed, emit) for spec in config.tasks]
        identity = _check_prepared_data(out, config.tasks, paths)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        atomic_write_json(out / DATA_IDENTITY_NAME, {"tasks": identity}, checksum=True)
        atomic_write_json(out / "config.json", config_dict)
        atomic_write_json(out / "versions.json", package_versions())
        return paths

    # rank 0 converts the datasets once; the others wait for it, then read the same files
    run_on_main_process(prepare_folder_and_data)
    hooks = run_hooks(out, hooks, main=main)  # OUT/metrics.csv at the least
    tasks = build_tasks(config, log=emit)
    test_inputs = [unlabeled_inputs(task.test) for task in tasks]
    optim = OptimSettings(**{f.name: getattr(config.train, f.name) for f in dataclasses.fields(OptimSettings)})
    make_model = model_factory(config.model)
    per_method: dict[str, Any] = {}
    diverged: dict[str, str] = {}
    diverged_before = _diverged_before(results_path) if resume else {}
    first_divergence: DivergenceError | None = None
    for method in method_list:
        method_dir = out / method_dir_name(method)
        options = _method_options(config, method)
        importance = _importance_choice(config, method)
        identity = {"method": method, "options": options, "importance_data": importance,
                    "config": {k: v for k, v in config_dict.items() if k not in ("methods", "method_options")}}
        saved_path = method_dir / "result.json"
        if resume and saved_path.is_file():
            with same_on_every_rank():
                saved = read_json(saved_path, what="method result")
            if isinstance(saved, dict) and saved.get("identity") == identity:
                emit(f"[{method}] finished earlier; loaded {saved_path}")
                per_method[method] = saved["result"]
                continue
        run_tasks = [Task(name=t.name, train=t.train, test=t.test, num_classes=t.num_classes,
                          importance_data=test_inputs[i] if importance == "test" else None)
                     for i, t in enumerate(tasks)]
        base = method.split("@")[0]
        if base == RIDGE:  # closed form on the frozen trunk: no optimizer, nothing to diverge
            sequence_result, records = run_recognition_ridge(
                make_model, run_tasks, ridge_settings(options), seed=config.seed, batch_size=config.train.batch_size,
                eval_batch_size=config.train.eval_batch_size, num_workers=config.train.num_workers,
                checkpoint_dir=method_dir, resume=resume, log=emit, write=main)
            summary = method_summary(sequence_result, base, options, ridge=records)
        else:
            def train(from_checkpoint: bool) -> Any:
                return run_sequence(
                    make_model, run_tasks, base, optim, seed=config.seed, device=config.train.device,
                    eval_batch_size=config.train.eval_batch_size, num_workers=config.train.num_workers,
                    method_options=options or None, checkpoint_dir=method_dir, resume=from_checkpoint, progress=progress,
                    log=log, search=config.search.resolved_for(base, method) if config.search.enabled else None,
                    hooks=hooks)

            try:  # the loop all-reduces a divergence, so every rank lands here alike
                try:
                    sequence_result = train(resume)
                except CheckpointMismatchError as exc:
                    if method not in diverged_before or "another configuration" not in str(exc):
                        raise
                    # it diverged with other settings (the ones its error advised changing): start it over
                    emit(f"[{method}] diverged before with other settings ({str(exc).splitlines()[0]}); "
                         "training it from the start")
                    sequence_result = train(False)
            except DivergenceError as exc:
                emit(f"[{method}] stopped: {exc}")
                diverged[method] = str(exc)
                first_divergence = first_divergence or exc
                continue
            summary = method_summary(sequence_result, base, options,
                                     importance_data=importance if importance_from_inputs(base) else None)
        per_method[method] = summary
        if main:
            atomic_write_json(saved_path, {"identity": identity, "result": summary}, checksum=True)
            atomic_write_json(results_path, _results(config, config_dict, tasks, per_method, diverged,
                                                      complete=False), checksum=True)
    if not per_method and first_divergence is not None:
        raise first_divergence  # nothing to report: every method diverged
    results = _results(config, config_dict, tasks, per_method, diverged, complete=not diverged)
    if main:
        atomic_write_json(results_path, results, checksum=True)
        atomic_write_text(out / "results.md", recognition_markdown(results))
        write_recognition_plots(results, out / "plots")
    return results


def _diverged_before(results_path: Path) -> dict[str, str]:
    """The methods an earlier run of this folder listed under ``diverged`` (with their errors)."""
    if not results_path.is_file():
        return {}
    with same_on_every_rank():
        saved = read_json(results_path, what="results document")
    found = saved.get("diverged") if isinstance(saved, dict) else None
    return dict(found) if isinstance(found, dict) else {}


def _check_prepared_data(out: Path, specs: Sequence[TaskSpec], paths: Sequence[Path]) -> dict[str, Any]:
    """The identity (:func:`file_identity`) of every task's prepared file, by task name; refuse, in
    one line naming both SHA-256s and the path, a file whose bytes differ from what ``OUT/data.json``
    recorded (a resumed run must train on the data it started with)."""
    recorded = (read_data_identity(out) or {}).get("tasks") if out.is_dir() else None
    recorded = recorded if isinstance(recorded, dict) else {}
    identity: dict[str, Any] = {}
    for spec, path in zip(specs, paths):
        if not Path(path).is_file():
            raise ConfigError(f"task {spec.name!r}: no prepared file {path}; make it with `mas-triplets prepare images`")
        identity[spec.name] = identity_as_recorded(path, recorded.get(spec.name),
                                                   f"task {spec.name!r}: the prepared file", out)
    return identity


def _results(config: RecognitionConfig, config_dict: dict[str, Any], tasks: list[Task], per_method: dict[str, Any],
             diverged: dict[str, str], complete: bool) -> dict[str, Any]:
    """The results document (:mod:`triplets.results_schema`) of the methods finished so far (and
    of those that diverged, under ``diverged``)."""
    task_entries = [{"index": index, "name": task.name, "num_classes": int(task.num_classes),
                     "num_train": len(task.train), "num_test": len(task.test)} for index, task in enumerate(tasks)]
    return results_document(experiment="recognition", name=config.name, metric="top-1 accuracy", complete=complete,
                            tasks=task_entries, methods=dict(per_method), config=config_dict, diverged=diverged)


def comparable(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without wall times (what a resumed run must reproduce exactly)."""
    copy = json.loads(json.dumps(results))
    for summary in copy["methods"].values():
        summary.pop("wall_time_s", None)
    return copy


__all__ = ["comparable", "run_recognition"]
