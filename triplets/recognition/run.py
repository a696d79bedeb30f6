"""The object-recognition task sequence (Aljundi et al. 2018, Sec. 5.1): a multi-head
network learns a sequence of classification datasets, every method from the same seed.

:func:`run_recognition` builds the tasks of a :class:`RecognitionConfig` (converting
each raw dataset once to HDF5 with :func:`data_prep.image_sets.prepare.prepare_image_dataset`),
and hands :func:`triplets.runner.run_methods` a :class:`RecognitionRun`, which trains the sequence
once per method with :func:`mas_core.sequence.run_sequence` (the task loop; checkpoints in
``OUT/<folder>/``, ``mas@test`` → ``mas_at_test``); the run writes

* ``OUT/results.json`` (schema version 1, :mod:`triplets.results_schema`): per method the
  accuracy matrix ``R[i][j]`` (fraction of the test set of task ``j`` classified correctly
  after training task ``i``), ``avg_acc`` (mean final accuracy), ``avg_drop`` (mean over
  tasks of final minus just-after accuracy; negative = forgetting), ``forgetting``
  (Chaudhry et al.), ``bwt``, ``wall_time_s`` (IMM also ``accuracy_matrix_merged`` and
  ``merged``: its merged model, apart from the models as trained; ``ridge`` also ``ridge``: per
  task the strengths tried with their validation MSE and the one chosen, :mod:`mas_core.ridge`);
* ``OUT/results.md`` and ``OUT/plots/accuracy.png``, ``OUT/plots/drop.png``
  (:func:`triplets.report.recognition_markdown`, :func:`triplets.report.write_recognition_plots`).

Resume, divergence and the files are the runner's (:mod:`triplets.runner`, one rule for both
experiments): ``OUT/config.yaml`` records the config (a folder of the older layout, with
``OUT/config.json``, is read and rewritten as ``config.yaml``); on ``resume`` the sections
:data:`RESUME_SECTIONS` (``train`` but its ``device`` and ``num_workers``) and every method's
settings must be the recorded ones; a finished method is loaded from ``OUT/<folder>/result.json``,
an interrupted one continues from its last task checkpoint, so the final results equal those of an
uninterrupted run (``wall_time_s`` aside); a method whose training diverges is listed under
``diverged`` (``"complete": false``, exit status 1) and the others go on, and ``--resume`` trains
it again, from the start when the settings its error advises changing (its strength in
``method_options``, say) now differ. ``OUT`` must be new, empty, or (with ``resume``) a
recognition run: anything else, and a finished run without ``resume``, is refused before any work
(:func:`triplets.run_folder.check_output_folder`). ``OUT/data.json`` records the SHA-256 of
every task's prepared HDF5 file; ``resume`` refuses a run whose prepared data changed.

Several processes (``torchrun --nproc_per_node=N -m triplets.cli recognition ...``): every
rank calls :func:`run_recognition` with the same arguments; the training itself is
:func:`mas_core.sequence.run_sequence`'s (global batches split across ranks, DDP, Ω reduced
across ranks, rank-0 checkpoints). Rank 0 alone converts the raw datasets (the others wait,
then read its HDF5 files), and writes ``config.yaml``, ``versions.json``, the per-method ``result.json``,
``results.json``, ``results.md`` and the plots; the other ranks return the same results
dictionary without writing anything. ``data_dir`` and ``OUT`` must be on a file system every
rank sees.

Method specs and the ``@test`` shorthand: :mod:`triplets.runner`, :mod:`triplets.recognition.config`.
The results schema and the run folder: ``docs/run_folder.md``.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mas_core.checkpoint import atomic_write_text
from mas_core.distributed import is_main_process, run_on_main_process, same_on_every_rank
from mas_core.experiment import LoopHooks
from mas_core.loop import OptimSettings
from mas_core.ridge import RIDGE, ridge_settings
from mas_core.sequence import Task, run_sequence

from ..config import to_dict
from ..errors import ConfigError
from .config import RecognitionConfig, TaskSpec, resolved_method
from .ridge import run_recognition_ridge
from .data import build_tasks, ensure_prepared, model_factory, unlabeled_inputs
from ..report import recognition_markdown, write_recognition_plots
from ..results_schema import method_summary, results_document
from ..run_log import run_hooks
from ..run_folder import RUN_COMMANDS, check_output_folder, identity_as_recorded, read_data_identity
from ..runner import (
    RESULT_NAME, MethodSpec, check_methods, diverged_before, importance_from_inputs, parse_methods,
    read_method_result, read_saved_config, resume_config, run_methods, saved_config_path, write_method_result,
    write_run_records,
)

#: what a resumed run must share with the recorded config (the methods are compared one by one)
RESUME_SECTIONS = ("tasks", "model", "train", "search", "seed")
RUN_ONLY_TRAIN_KEYS = ("device", "num_workers")  # where and how fast, not what is computed


def run_recognition(config: RecognitionConfig, out: str | Path, *,
                    methods: Sequence[str | MethodSpec] | None = None, resume: bool = False, progress: bool = True,
                    log: Callable[[str], None] | None = None, hooks: LoopHooks | None = None) -> dict[str, Any]:
    """Train the sequence once per method (``methods``: a subset or others, default the config's) through
    :func:`triplets.runner.run_methods`; write results.json / results.md / plots; return the results dict.

    Under ``torchrun`` every rank calls it; rank 0 alone writes (see the module docs). ``hooks``: the
    task loop's :class:`~mas_core.experiment.LoopHooks` for every method (:mod:`triplets.run_log`; by
    default the metrics log ``OUT/metrics.csv`` alone)."""
    with same_on_every_rank():
        try:
            method_list = parse_methods(methods) if methods is not None else list(config.methods)
            check_methods([resolved_method(config, method) for method in method_list])
            every = list(config.methods) + [m for m in method_list if m.key not in {c.key for c in config.methods}]
            config.search.check_methods([(method.name, method.key) for method in every])
        except (ValueError, ConfigError) as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
    main = is_main_process()
    out = Path(out)
    emit = log or ((lambda message: print(message, file=sys.stderr, flush=True)) if progress else (lambda m: None))
    if not main:
        emit = lambda message: None  # noqa: E731 - rank 0 alone logs
    this_run = dataclasses.replace(config, methods=[_with_options(config, method) for method in method_list])

    def prepare_folder_and_data() -> set[str]:
        check_output_folder(out, "recognition", resume=resume)
        recorded, restart = this_run, set()
        saved_path = saved_config_path(out) if out.is_dir() else None
        if saved_path is not None:
            saved = read_saved_config(saved_path, RecognitionConfig)
            saved = dataclasses.replace(saved, methods=[_with_options(saved, method) for method in saved.methods])
            recorded, restart = resume_config(saved, this_run, out, sections=RESUME_SECTIONS, resolve=resolved_method,
                                              diverged=diverged_before(out), same_section=_same_train)
        paths = [ensure_prepared(spec, config.data_dir, config.seed, emit) for spec in config.tasks]
        identity = _check_prepared_data(out, config.tasks, paths)
        write_run_records(out, recorded, RUN_COMMANDS["recognition"], {"tasks": identity})
        return restart

    # rank 0 converts the datasets once; the others wait for it, then read the same files
    restart = run_on_main_process(prepare_folder_and_data)
    trainer = RecognitionRun(config, out, build_tasks(config, log=emit), progress=progress, log=log, emit=emit,
                             hooks=run_hooks(out, hooks, main=main))  # OUT/metrics.csv at the least
    return run_methods(trainer, method_list, out, restart=restart, log=emit)


def _with_options(config: RecognitionConfig, method: MethodSpec) -> MethodSpec:
    """``method`` holding its resolved options (what ``method_options`` gave it), so that the recorded
    config keeps each method's own options whatever a later ``method_options`` says."""
    return dataclasses.replace(method, options=resolved_method(config, method).options)


def _same_train(section: str, saved: RecognitionConfig, config: RecognitionConfig) -> bool:
    """The ``train`` sections agree but for where and how fast the run goes (``device``, ``num_workers``)."""
    if section != "train":
        return False
    old, new = to_dict(saved.train), to_dict(config.train)
    return all(old.get(key) == new.get(key) for key in set(old) | set(new) if key not in RUN_ONLY_TRAIN_KEYS)


class RecognitionRun:
    """The recognition sequence's part of :func:`triplets.runner.run_methods` (a ``MethodTrainer``):
    one method through :func:`mas_core.sequence.run_sequence` (``ridge``: in closed form), the results
    document, ``results.md`` and the plots."""

    def __init__(self, config: RecognitionConfig, out: Path, tasks: list[Task], *, progress: bool,
                 log: Callable[[str], None] | None, emit: Callable[[str], None], hooks: LoopHooks) -> None:
        self.config, self.out, self.tasks = config, out, tasks
        self.progress, self.log, self.emit, self.hooks = progress, log, emit, hooks
        self.test_inputs = [unlabeled_inputs(task.test) for task in tasks]
        self.optim = OptimSettings(**{f.name: getattr(config.train, f.name) for f in dataclasses.fields(OptimSettings)})
        self.make_model = model_factory(config.model)
        self.config_dict = to_dict(config)

    def train_method(self, method: MethodSpec, method_dir: Path, *, restart: bool) -> dict[str, Any]:
        config, spec = self.config, resolved_method(self.config, method)
        run_tasks = [Task(name=t.name, train=t.train, test=t.test, num_classes=t.num_classes,
                          importance_data=self.test_inputs[i] if spec.importance_data == "test" else None)
                     for i, t in enumerate(self.tasks)]
        extras: dict[str, Any] = {}
        if method.name == RIDGE:  # closed form on the frozen trunk: no optimizer, nothing to diverge
            outcome, extras["ridge"] = run_recognition_ridge(
                self.make_model, run_tasks, ridge_settings(spec.options), seed=config.seed,
                batch_size=config.train.batch_size, eval_batch_size=config.train.eval_batch_size,
                num_workers=config.train.num_workers, checkpoint_dir=method_dir, resume=not restart, log=self.emit,
                write=is_main_process())
        else:  # the loop all-reduces a divergence, so every rank raises it alike
            outcome = run_sequence(
                self.make_model, run_tasks, method.name, self.optim, seed=config.seed, device=config.train.device,
                eval_batch_size=config.train.eval_batch_size, num_workers=config.train.num_workers,
                method_options=spec.options or None, checkpoint_dir=method_dir, resume=not restart,
                progress=self.progress, log=self.log, hooks=self.hooks,
                search=config.search.resolved_for(method.name, method.key) if config.search.enabled else None)
            extras["importance_data"] = spec.importance_data if importance_from_inputs(method.name) else None
        if outcome.trained_tasks == 0 and (method_dir / RESULT_NAME).is_file():
            self.emit(f"[{method.key}] finished earlier; loaded {method_dir / RESULT_NAME}")
            return read_method_result(method_dir / RESULT_NAME)
        summary = method_summary(outcome, method.name, spec.options, **extras)
        write_method_result(method_dir, summary)
        return summary

    def results(self, per_method: dict[str, Any], diverged: dict[str, str], complete: bool) -> dict[str, Any]:
        return _results(self.config, self.config_dict, self.tasks, per_method, diverged, complete)

    def finish(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.out / "results.md", recognition_markdown(results))
        write_recognition_plots(results, self.out / "plots")


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
