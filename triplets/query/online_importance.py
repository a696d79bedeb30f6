"""Online importance from queries: the images a trained run answers add their MAS importance to
the run folder (``mas-triplets query --accumulate-importance``; ``docs/method.md`` §12).

For every image query (image → facts) the region the model embedded is fed once more through
the method's visual side and its per-sample importance is added to a streaming accumulator
(:class:`mas_core.importance.OnlineImportance`)::

    S_k += φ_k(x)      N += 1      Ω_queries = c · S / N
    φ_k(x) = |∂‖F(x)‖₂²/∂θ_k|  (MAS, c = 1)   or   |y_i x_j| of each layer (l-MAS, c = 2)

with **the same F and the same parameters as the training-time MAS of the fact experiment**
(:class:`triplets.facts.experiment.FactExperiment`): F is the pre-normalisation embedding
``S‖P‖O = model(x)`` (``FactEmbeddingNet.forward``) and θ the model's trainable parameters (the
whole network; with a frozen or cached trunk the branches only, under the same names as
``branch_head()``'s). So Ω_queries is a task's Ω as ``after_task`` would compute it on those
images, and it can replace or be mixed with the training-data Ω when the run is resumed with the
next task (:mod:`triplets.query.online_resume`). No label is read: the importance is that of the
output the model actually produces. Text queries (fact → images) add nothing: the language side
(the text encoder and the fact vectors) is fixed, not trained, and the image embeddings they are
compared with are the test images', not a user's input.

Files, per method ``RUN/<method>/`` (``docs/run_folder.md``):

- ``online_importance.pt`` (:func:`mas_core.checkpoint.save_checkpoint`: atomic, SHA-256):
  ``{"format": 1, "method": key, "after_task": t, "query_calls": k, "accumulator":
  OnlineImportance.state_dict()}`` — the sums S (float64), the sample count N, the estimator,
  the output label and the fingerprint of θ (which identifies the model the queries were
  answered by). The source of truth.
- ``online_importance.json`` (atomic, SHA-256): ``{"method", "estimator", "output", "after_task",
  "samples", "query_calls", "parameters", "replaced_stale"}``, for people and tools; rewritten
  after the ``.pt``, so a kill between the two leaves it one call behind, never half-written.

Every call removes the hidden temporary files a killed call left (``.online_importance.pt.*.tmp``,
``.online_importance.json.*.tmp``), loads the accumulator (when it belongs to the model being
queried: same parameter names, shapes and fingerprint), adds the new samples and writes both files
atomically, under an advisory lock on ``RUN/<method>/.online_importance.lock`` so that concurrent query processes add
rather than overwrite. An accumulator of another model (the run has been trained further since)
is replaced by a fresh one, and the sidecar records how many samples were dropped.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mas_core.checkpoint import TEMPORARY_SUFFIX, atomic_write_json, exclusive_file_lock, read_json, save_checkpoint
from mas_core.errors import CheckpointMismatchError, MASCoreError
from mas_core.importance import OnlineImportance
from mas_core.loop import JOINT
from mas_core.regularizers import MAS, make_regularizer

from ..errors import RunFolderError, TripletsError
from .online_resume import (
    ACCUMULATOR_NAME, FILE_FORMAT, LOCK_NAME, OUTPUT_LABEL, SIDECAR_NAME, read_accumulator_file,
)
from .engine import crop_and_resize, load_image




def query_estimator(method: Any) -> str:
    """The :class:`~mas_core.importance.OnlineImportance` estimator of a config method
    (:class:`triplets.facts.train_config.MethodConfig`): ``"mas"`` for MAS with ``mode: exact``,
    ``"hebbian"`` for l-MAS (or MAS ``mode: hebbian``). Any other method (one whose importance is
    not a per-sample sum over unlabelled inputs, or MAS's batch estimator, which depends on the
    batch boundaries) raises :class:`TripletsError`."""
    if method.name == JOINT:
        raise TripletsError(f"method {method.key!r} (joint) has no importance; online importance needs a MAS or "
                            "l-MAS method (--method)")
    try:
        regularizer = make_regularizer(method.name, **dict(method.options))
    except MASCoreError as exc:
        raise TripletsError(f"method {method.key!r}: {str(exc).splitlines()[0]}") from None
    if not isinstance(regularizer, MAS):
        raise TripletsError(f"method {method.key!r} ({method.name}) does not take its importance from unlabelled "
                            "inputs; online importance needs a MAS or l-MAS method (--method)")
    if regularizer.mode == "batch":
        raise TripletsError(f"method {method.key!r} uses MAS's batch estimator, which depends on the batch "
                            "boundaries and has no streaming form; query a method with mode exact")
    return "hebbian" if regularizer.mode == "hebbian" else "mas"


def pixels_to_batch(pixels: np.ndarray, device: str | torch.device = "cpu") -> Tensor:
    """uint8 regions ``[k, S, S, 3]`` → the model's float input ``[k, 3, S, S]`` in [0, 1] (as the
    query engine embeds them)."""
    array = np.asarray(pixels)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise TripletsError(f"query pixels must be uint8 [k, S, S, 3], got {array.dtype} {array.shape}")
    return torch.from_numpy(np.array(array, copy=True)).permute(0, 3, 1, 2).float().div_(255.0).to(device)


def new_accumulator(model: nn.Module, estimator: str) -> OnlineImportance:
    """An empty accumulator of ``model`` measuring F = ``model(x)`` (see the module docs)."""
    return OnlineImportance(model, estimator=estimator, output_label=OUTPUT_LABEL)


def completed_tasks(method_dir: Path) -> int | None:
    """How many tasks the method's saved model has learned (rows of its ``result.json``), or
    ``None`` when that is not recorded."""
    try:
        result = read_json(method_dir / "result.json", what="method result")
    except (FileNotFoundError, CheckpointMismatchError):
        return None
    matrix = result.get("accuracy_matrix") if isinstance(result, dict) else None
    return len(matrix) if isinstance(matrix, list) else None


@contextlib.contextmanager
def locked(method_dir: Path) -> Iterator[None]:
    """Hold the method's advisory lock (POSIX ``flock``; elsewhere concurrent query processes are not
    serialised) for a load-add-save of its accumulator."""
    method_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_file_lock(method_dir / LOCK_NAME):
        yield


@dataclass
class OnlineImportanceRecord:
    """What one call added: ``added`` samples, ``samples`` in the accumulator now, over
    ``query_calls`` calls, for the model after ``after_task`` tasks; ``path`` of the accumulator;
    ``replaced_stale``: samples of another model's accumulator that this call dropped."""

    method: str
    added: int
    samples: int
    query_calls: int
    after_task: int | None
    path: Path
    replaced_stale: int = 0

    def describe(self) -> str:
        """One line for the command's output."""
        stale = (f" (replaced an accumulator of {self.replaced_stale} samples from an earlier model)"
                 if self.replaced_stale else "")
        task = f" after task {self.after_task}" if self.after_task is not None else ""
        return (f"online importance: added {self.added} sample(s) to {self.path} (method {self.method}{task}): "
                f"{self.samples} samples from {self.query_calls} query call(s){stale}")


def record_query_pixels(run_dir: str | os.PathLike, method: Any, model: nn.Module, pixels: np.ndarray,
                        *, device: str | torch.device = "cpu") -> OnlineImportanceRecord:
    """Add the MAS importance of the regions ``pixels`` (uint8 ``[k, S, S, 3]``), answered by
    ``model`` (the method's saved model, as loaded by :meth:`triplets.run_folder.Run.load_model`),
    to ``RUN/<method>/online_importance.pt`` and its sidecar; return what was recorded.
    ``method``: the run's :class:`~triplets.facts.train_config.MethodConfig`."""
    estimator = query_estimator(method)
    batch = pixels_to_batch(pixels, device)
    if batch.shape[0] == 0:
        raise TripletsError("no query images to add")
    method_dir = Path(run_dir) / method.folder
    path = method_dir / ACCUMULATOR_NAME
    with locked(method_dir):
        for name in (ACCUMULATOR_NAME, SIDECAR_NAME):  # what a write killed before its rename left
            for leftover in method_dir.glob(f".{name}.*{TEMPORARY_SUFFIX}"):
                leftover.unlink(missing_ok=True)
        accumulator = new_accumulator(model, estimator)
        calls, stale = 0, 0
        if path.is_file():
            state = read_accumulator_file(path)
            try:
                accumulator.load_state_dict(state["accumulator"])
                calls = int(state.get("query_calls", 0))
            except CheckpointMismatchError:
                stale = int(state["accumulator"].get("count", 0))  # another model's queries: start over
        added = accumulator.update(batch)
        after_task = completed_tasks(method_dir)
        save_checkpoint(path, {"format": FILE_FORMAT, "method": method.key, "after_task": after_task,
                               "query_calls": calls + 1, "accumulator": accumulator.state_dict()})
        atomic_write_json(method_dir / SIDECAR_NAME, {
            "method": method.key, "estimator": estimator, "output": OUTPUT_LABEL, "after_task": after_task,
            "samples": accumulator.count, "query_calls": calls + 1, "parameters": len(accumulator.fingerprint),
            "replaced_stale": stale,
        }, checksum=True)
    return OnlineImportanceRecord(method=method.key, added=added, samples=accumulator.count, query_calls=calls + 1,
                                 after_task=after_task, path=path, replaced_stale=stale)


def record_image_queries(engine: Any, images: Sequence[Any], *, box: Sequence[float] | None = None
                         ) -> OnlineImportanceRecord:
    """:func:`record_query_pixels` for image queries answered by a
    :class:`~triplets.query.engine.QueryEngine`: each image (a path, PIL image or uint8 array) is cropped
    to ``box`` and resized exactly as :meth:`~triplets.query.engine.QueryEngine.image_to_facts` does."""
    size = int(engine.fact_file.image_size or 0)
    if not size:
        raise RunFolderError(f"the run's fact file {engine.fact_file.path} has no image size (prepared without images)")
    pixels = np.stack([crop_and_resize(load_image(image), box, size) for image in images])
    return record_query_pixels(engine.run.dir, run_method(engine), engine.model, pixels, device=engine.device)


def record_sample_queries(engine: Any, samples: Sequence[int]) -> OnlineImportanceRecord:
    """:func:`record_query_pixels` for regions stored in the run's fact file (sample indices)."""
    pixels = engine.fact_file.pixels([int(sample) for sample in samples])
    return record_query_pixels(engine.run.dir, run_method(engine), engine.model, pixels, device=engine.device)


def run_method(engine: Any) -> Any:
    """The :class:`~triplets.facts.train_config.MethodConfig` of the engine's method in its run's config."""
    for method in engine.run.config.methods:
        if method.key == engine.method:
            return method
    raise RunFolderError(f"{engine.run.dir}: method {engine.method!r} is not in the run's config")


def check_accumulate_flags(*, accumulate: bool, image: Any, text: Any = None) -> None:
    """Refuse, in one line, ``--accumulate-importance`` with a text query (see the module docs)."""
    if accumulate and image is None and text is not None:
        raise TripletsError("--accumulate-importance counts image queries only: a text query does not pass through "
                            "the trained visual side (the language side is fixed), so it adds no importance")


__all__ = ["OnlineImportanceRecord", "check_accumulate_flags", "completed_tasks", "new_accumulator", "pixels_to_batch",
           "query_estimator", "record_image_queries", "record_query_pixels", "record_sample_queries", "run_method"]
