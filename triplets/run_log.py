"""The run comforts both experiments share (``mas-triplets train`` and ``mas-triplets recognition``):
a metrics log in the run folder, TensorBoard event files, and a Ctrl-C that stops safely.

The task loop tells what happens through :class:`mas_core.experiment.LoopHooks`; this module is
the application's side of it, written once for both runners (:class:`RunComforts`):

- ``RUN/metrics.csv`` (:data:`METRICS_NAME`, always): one row per epoch of every method's real
  training (``method, task, task_name, attempt, epoch, loss, penalty, seconds``) and one row per
  evaluation after each task (``evaluated_task, metric, value``: the row ``R[task]`` of the
  accuracy matrix, and ``<metric> (merged)`` for IMM's merged model). Tasks, epochs and evaluated
  tasks count from 1, as the log lines do. Numbers are written with ``repr`` (exact round trip).
  Each row is one ``write`` of a whole line to the file opened with ``O_APPEND`` and flushed to the
  operating system at once, so a killed process leaves whole rows; a line without its newline (a
  machine that lost power mid-write) is not a row: :func:`read_metrics` skips it and the next start
  removes it. On resume the rows a method wrote after its checkpoint (the epochs of the task it was
  interrupted in) are removed before it trains again, so the file holds every epoch once and ends
  equal to an uninterrupted run's (``seconds`` aside).
- ``RUN/tensorboard/<method>/`` (``--log tensorboard``; needs the optional ``tensorboard`` extra,
  ``pip install 'mas-triplets[tensorboard]'``): scalars ``task<t>/loss`` and ``task<t>/penalty``
  per epoch, ``<metric>/task<j>`` and ``<metric>/average`` per finished task. A resumed task's
  epochs may show twice there (TensorBoard keeps both event files); the CSV holds them once.
- Ctrl-C (SIGINT): the current batch is finished, the loop stops (:class:`~mas_core.errors.
  TrainingInterrupted`), the checkpoint of the last finished task stays as written (the task in
  progress is trained again from its start on resume: the resumed run equals an uninterrupted one),
  the command prints what is saved and the ``--resume`` command line and exits with 130. A second
  Ctrl-C stops at once (Python's ``KeyboardInterrupt``; finished tasks are still checkpointed).
  The closed-form ``ridge`` method has no epochs: it writes no rows and is not stopped mid-way.
"""
from __future__ import annotations

import csv
import io
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from mas_core.checkpoint import atomic_write_text
from mas_core.errors import TrainingInterrupted
from mas_core.experiment import EpochRecord, LoopHooks, TaskRecord

from .errors import ConfigError

METRICS_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
COLUMNS = ["method", "task", "task_name", "attempt", "epoch", "loss", "penalty", "seconds", "evaluated_task",
           "metric", "value"]
LOG_CHOICES = ("csv", "tensorboard")
INTERRUPTED_EXIT = 130


def tensorboard_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line :class:`ConfigError` naming the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional
    except ImportError:
        raise ConfigError("--log tensorboard needs the optional tensorboard package: pip install "
                          "'mas-triplets[tensorboard]' (or use the CSV log, RUN/metrics.csv, which is always written)"
                          ) from None
    return SummaryWriter


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """The rows of a metrics CSV as dictionaries (strings; empty where a column does not apply); a
    last line without its newline (cut by a crash mid-write) is not a row."""
    text = Path(path).read_text(encoding="utf-8") if Path(path).is_file() else ""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    return list(csv.DictReader(lines))


def _line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(["" if value is None else value for value in values])
    return buffer.getvalue()


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class MetricsLog(LoopHooks):
    """The loop's hooks of one run folder: ``metrics.csv`` (and TensorBoard when ``writer_class`` is
    given, e.g. :func:`tensorboard_writer_class`'s), written on this process only when ``main``;
    ``stop_requested`` answers :class:`InterruptRequest`'s flag."""

    def __init__(self, run_dir: str | Path, *, main: bool = True, writer_class: Any = None,
                 stop: Callable[[], bool] = lambda: False) -> None:
        self.run_dir, self.main, self.writer_class, self._stop = Path(run_dir), main, writer_class, stop
        self.path = self.run_dir / METRICS_NAME
        self.writers: dict[str, Any] = {}

    # -- the CSV
    def _append(self, rows: list[list[Any]]) -> None:
        data = "".join(_line(row) for row in rows).encode("utf-8")
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, data)  # one write of whole lines: a kill leaves whole rows
        finally:
            os.close(descriptor)

    def run_started(self, method: str, completed_tasks: int, num_tasks: int) -> None:
        """Keep the rows of other methods and ``method``'s rows of its first ``completed_tasks`` tasks
        (what its checkpoint holds); drop the rest (an interrupted task's epochs) and a cut last line."""
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = [row for row in read_metrics(self.path)
                if row.get("method") != method or (str(row.get("task")).isdigit() and int(row["task"]) <= completed_tasks)]
        atomic_write_text(self.path, _line(COLUMNS) + "".join(_line([row.get(c, "") for c in COLUMNS]) for row in kept))

    def epoch_ended(self, record: EpochRecord) -> None:
        if not self.main:
            return
        self._append([[record.method, record.task + 1, record.task_name, record.attempt, record.epoch + 1,
                       _number(record.loss), _number(record.penalty), _number(record.seconds), None, None, None]])
        writer = self._writer(record.method)
        if writer is not None:
            writer.add_scalar(f"task{record.task + 1}/loss", record.loss, record.epoch + 1)
            writer.add_scalar(f"task{record.task + 1}/penalty", record.penalty, record.epoch + 1)
            writer.flush()

    def task_ended(self, record: TaskRecord) -> None:
        if not self.main:
            return
        rows = []
        for metric, row in ((record.metric, record.row), (f"{record.metric} (merged)", record.merged_row)):
            for evaluated, value in enumerate((row or [])[:record.task + 1]):
                rows.append([record.method, record.task + 1, record.task_name, None, None, None, None,
                             _number(record.seconds), evaluated + 1, metric, _number(value)])
        self._append(rows)
        writer = self._writer(record.method)
        if writer is not None:
            values = [float(value) for value in record.row[:record.task + 1] if value is not None]
            for evaluated, value in enumerate(values):
                writer.add_scalar(f"{record.metric}/task{evaluated + 1}", value, record.task + 1)
            writer.add_scalar(f"{record.metric}/average", sum(values) / max(len(values), 1), record.task + 1)
            writer.flush()

    def stop_requested(self) -> bool:
        return self._stop()

    # -- TensorBoard
    def _writer(self, method: str) -> Any:
        if self.writer_class is None:
            return None
        if method not in self.writers:
            folder = self.run_dir / TENSORBOARD_DIR / method.replace("@", "_at_")
            self.writers[method] = self.writer_class(log_dir=str(folder))
        return self.writers[method]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


class InterruptRequest:
    """SIGINT handling while it is entered (main thread only; elsewhere nothing is installed): the
    first Ctrl-C sets :attr:`requested` and says so on stderr, the second raises ``KeyboardInterrupt``.
    The previous handler is restored on exit."""

    def __init__(self, announce: bool = True) -> None:
        self.requested, self.announce, self._previous = False, announce, None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nmas-triplets: Ctrl-C: stopping after the current batch (Ctrl-C again stops at once)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> InterruptRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def resume_command(command_line: str) -> str:
    """``command_line`` (``mas-triplets …``) with ``--resume`` (added once)."""
    words = shlex.split(command_line)
    return shlex.join(words if "--resume" in words else words + ["--resume"])


class RunComforts:
    """The run comforts of one command (see the module docs), entered around the runner::

        with RunComforts(args.out, log=args.log, command_line=args.command_line, main=...) as comforts:
            results = train_run(..., hooks=comforts.hooks)
        if comforts.interrupted:
            return comforts.exit_code

    On :class:`~mas_core.errors.TrainingInterrupted` it prints (``main`` only) what is saved and the
    ``--resume`` command on stderr and swallows the exception; :attr:`interrupted` is then true."""

    def __init__(self, run_dir: str | Path, *, log: str = "csv", command_line: str = "mas-triplets",
                 main: bool = True, command: str = "train") -> None:
        if log not in LOG_CHOICES:
            raise ConfigError(f"--log must be one of {', '.join(LOG_CHOICES)}, got {log!r}")
        writer_class = tensorboard_writer_class() if log == "tensorboard" else None
        self.interrupt = InterruptRequest(announce=main)
        self.hooks = MetricsLog(run_dir, main=main, writer_class=writer_class, stop=self.interrupt)
        self.command_line, self.main, self.command = command_line, main, command
        self.interrupted: TrainingInterrupted | None = None
        self.exit_code = INTERRUPTED_EXIT

    def __enter__(self) -> RunComforts:
        self.interrupt.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> bool:
        self.interrupt.__exit__()
        self.hooks.close()
        if not isinstance(exc, TrainingInterrupted):
            return False
        self.interrupted = exc
        if self.main:
            print(f"mas-triplets {self.command}: {exc}; methods finished before it keep their results", file=sys.stderr)
            print(f"continue with: {resume_command(self.command_line)}", file=sys.stderr, flush=True)
        return True


def run_hooks(run_dir: str | Path, hooks: LoopHooks | None, *, main: bool) -> LoopHooks:
    """The hooks a runner gives the task loop for ``run_dir``: ``hooks`` when the command made them
    (:class:`RunComforts`), else a :class:`MetricsLog` of the run folder (no TensorBoard, no Ctrl-C
    handler: a library call installs no signal handler), so every run folder has its metrics log."""
    return hooks if hooks is not None else MetricsLog(run_dir, main=main)


def check_log_option(log: str) -> None:
    """Refuse, before any work, a ``--log`` the installation cannot write (one line naming the extra)."""
    if log == "tensorboard":
        tensorboard_writer_class()


__all__ = ["COLUMNS", "INTERRUPTED_EXIT", "LOG_CHOICES", "METRICS_NAME", "MetricsLog", "InterruptRequest",
           "RunComforts", "check_log_option", "read_metrics", "resume_command", "run_hooks", "tensorboard_writer_class"]
