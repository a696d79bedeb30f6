"""Run folders: the rules every command that writes one follows, the data's identity, and the
fact-embedding run's folder (creating or checking it, its results document, reading a run back:
:func:`load_run`). The layout and the results schema: ``docs/run_folder.md``; the saved config,
the resume rule and the divergence policy of both experiments: :mod:`triplets.runner`.

    RUN/config.yaml  RUN/versions.json  RUN/data.json  RUN/results.json  RUN/results.md  RUN/plots/*.png
    RUN/<folder>/checkpoint.pt  RUN/<folder>/log.txt  RUN/<folder>/model.pt
    RUN/<folder>/result.json    RUN/<folder>/index/
    RUN/features/<fingerprint>.h5            # only with model.cache_features

The rules every command that writes a run folder follows (:func:`check_output_folder`): it
writes only into a new folder, an empty one or a run of its own kind (``--resume``), and
refuses anything else (a file, another kind of run, a folder of other files, a folder it
cannot write to) before any work, in one line, changing nothing. ``RUN/data.json`` records
the SHA-256 of the data the run was trained on (:func:`triplets.fingerprint.file_identity`);
``--resume``, ``evaluate`` and ``query`` refuse a file whose bytes differ.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mas_core.checkpoint import TEMPORARY_SUFFIX, load_checkpoint, read_json
from mas_core.errors import CheckpointMismatchError, did_you_mean

from .config import from_dict, to_dict
from .errors import RunFolderError
from .facts.data import open_fact_file
from .fingerprint import DATA_SHA_KEY, VOCABULARY_KEY, fact_vocabulary_fingerprint, file_identity
from .facts.ridge_model import rebuild_saved_model
from .facts.model import FactEmbeddingNet, ModelConfig, build_model
from .results_schema import results_document
from .runner import (
    CONFIG_NAME,
    DATA_IDENTITY_NAME,
    LEGACY_CONFIG_NAME,
    RESULT_NAME,
    MethodSpec,
    diverged_before,
    method_folder,
    package_versions,
    read_method_result,
    read_saved_config,
    resume_config,
    write_run_records,
)
from .facts.train_config import TrainConfig


RUN_COMMANDS = {"facts": "mas-triplets train", "recognition": "mas-triplets recognition"}


def run_kind(folder: Path) -> str | None:
    """The kind of run ``folder`` holds: ``"recognition"`` for a ``config.yaml`` whose first line
    names ``mas-triplets recognition`` (:func:`triplets.runner.saved_config_text`) or a legacy
    ``config.json``; ``"facts"`` for any other ``config.yaml``; ``None`` without either."""
    if (folder / CONFIG_NAME).is_file():
        try:
            with open(folder / CONFIG_NAME, "rb") as file:
                first = file.readline(200).decode("utf-8", errors="replace")
        except OSError:
            return "facts"  # reading it in full says why
        return "recognition" if RUN_COMMANDS["recognition"] in first else "facts"
    return "recognition" if (folder / LEGACY_CONFIG_NAME).is_file() else None


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def check_output_folder(out_dir: str | Path, kind: str, *, resume: bool, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder a ``kind`` command (``"facts"`` or
    ``"recognition"``) must not write into: an existing file; a run of the other kind; a
    non-empty folder that is not a run of this kind (with or without ``--resume``); a run of
    this kind without ``resume``; a folder (or, for a new one, its nearest existing parent)
    that cannot be written to. Raises :class:`RunFolderError` (one line, nothing written)."""
    out = Path(out_dir)
    command = RUN_COMMANDS[kind]
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{option} {out} is a file, not a folder; choose a folder (nothing was written)")
    if out.is_dir():
        found = run_kind(out)
        own = found == kind
        if found is not None and not own:
            raise RunFolderError(f"{out} holds a {found} run (made by `{RUN_COMMANDS[found]}`), not a {kind} run; "
                                 f"choose another {option} (nothing was written)")
        if own and not resume:
            raise RunFolderError(f"{out} already holds a run; pass --resume to continue it or choose a new {option} "
                                 "(nothing was overwritten)")
        if not own and any(not _is_temporary(entry) for entry in out.iterdir()):
            if resume:
                raise RunFolderError(f"{out} is not a run folder of `{command}` (no {CONFIG_NAME}) and is not empty; "
                                     f"--resume continues only such a run: choose its folder or a new {option} "
                                     "(nothing was written)")
            raise RunFolderError(f"{out} exists and is not empty; choose a new {option} (nothing was overwritten)")
        _check_writable(out, out, option)
    else:
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise RunFolderError(f"{option} {out}: {parent} is a file, not a folder; choose another path "
                                 "(nothing was written)")
        _check_writable(parent, out, option)
    return out


def _check_writable(folder: Path, out: Path, option: str) -> None:
    """Create and remove a hidden temporary file in ``folder``: the one sure test of writing."""
    try:
        fd, name = tempfile.mkstemp(prefix=".mas-write-probe.", suffix=TEMPORARY_SUFFIX, dir=folder)
    except OSError as exc:
        raise RunFolderError(f"{option} {out}: cannot write into {folder} ({exc.strerror or exc}); choose a folder "
                             "you can write to (nothing was written)") from None
    os.close(fd)
    os.unlink(name)


def read_run_config(config_path: Path) -> TrainConfig:
    """The :class:`TrainConfig` of ``RUN/config.yaml`` (:func:`triplets.runner.read_saved_config`)."""
    return read_saved_config(config_path, TrainConfig)


def read_data_identity(run_dir: Path) -> dict[str, Any] | None:
    """``RUN/data.json`` (``None`` for a run written before runs recorded it)."""
    path = run_dir / DATA_IDENTITY_NAME
    if not path.exists():
        return None
    identity = read_json(path, what="data record")
    if not isinstance(identity, dict):
        raise RunFolderError(f"{path} is not a data record (a JSON mapping); restore it or use a new run folder")
    return identity


def identity_as_recorded(path: str | Path, recorded: Any, what: str, run_dir: Path) -> dict[str, Any]:
    """The identity of the file at ``path`` (:func:`file_identity`, reusing ``recorded`` when the
    file is unchanged); refuse it in one line naming ``what``, the path and both SHA-256s when the
    run ``run_dir`` recorded another one (a run must resume, evaluate and answer on its own data)."""
    before = recorded if isinstance(recorded, dict) else None
    current = file_identity(path, before)
    if before is not None and before.get("sha256") != current["sha256"]:
        raise RunFolderError(
            f"{what} {path} is not the one {run_dir} was trained on: its SHA-256 is "
            f"{current['sha256'][:16]}…, the run recorded {str(before.get('sha256'))[:16]}…; restore that file "
            "or start a new run")
    return current


def check_data_identity(run_dir: Path, fact_file_path: str | Path) -> dict[str, Any]:
    """The identity of the fact file at ``fact_file_path``, checked against ``RUN/data.json``
    (:func:`identity_as_recorded`)."""
    recorded = (read_data_identity(run_dir) or {}).get("fact_file")
    return identity_as_recorded(fact_file_path, recorded, "the fact file", run_dir)


def recorded_data_sha256(path: Path) -> str | None:
    """The SHA-256 of the fact file that the checkpoint or ``model.pt`` at ``path`` records in its
    own payload (the loop's checkpoint: in its experiment identity), read without loading its
    tensors; ``None`` when it records none (written before runs recorded it) or cannot be read
    (loading it in full then says why)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a damaged file is reported by the full load
        return None
    return _data_sha_of(state)


def _data_sha_of(state: Any) -> str | None:
    if not isinstance(state, dict):
        return None
    config = state.get("config")
    experiment = config.get("experiment") if isinstance(config, dict) else None
    value = experiment.get(DATA_SHA_KEY) if isinstance(experiment, dict) else state.get(DATA_SHA_KEY)
    return value if isinstance(value, str) else None


def check_recorded_data(identity: dict[str, Any], records: list[tuple[str, str | None]], run_dir: Path) -> None:
    """Refuse (one line) a fact file whose SHA-256 is not the one a checkpoint or model of the run
    ``run_dir`` records in its own payload (``records``: ``(file, sha256 or None)``): what deleting
    or forging ``data.json`` cannot switch off."""
    for where, recorded in records:
        if recorded is not None and recorded != identity["sha256"]:
            raise RunFolderError(
                f"the fact file {identity['path']} is not the one {run_dir} was trained on: its SHA-256 is "
                f"{identity['sha256'][:16]}…, {where} records {recorded[:16]}…; restore that file or start a new run")


def same_search(saved: TrainConfig, config: TrainConfig) -> bool:
    """Whether ``config``'s search is the recorded one for the methods it trains: every setting equal,
    and a ``start`` mapping compared by each of ``config``'s methods' own start (``--methods`` keeps
    only the selected methods' entries, so a subset resumes a run started with more)."""
    old, new = to_dict(saved.search), to_dict(config.search)
    old.pop("start", None)
    new.pop("start", None)
    if old != new:
        return False
    for method in config.methods:
        try:
            if saved.search.start_for(method.name, method.key) != config.search.start_for(method.name, method.key):
                return False
        except ValueError:  # no start for this method in one of them: equal only if in neither
            if _has_start(saved, method) or _has_start(config, method):
                return False
    return True


def _merged_search(saved: TrainConfig, config: TrainConfig) -> Any:
    """The search section to record on resume: ``config``'s, with a ``start`` mapping holding the
    recorded entries too (``--methods`` keeps only the selected methods' entries; the recorded
    methods that were not selected keep theirs)."""
    if isinstance(saved.search.start, dict) and isinstance(config.search.start, dict):
        return dataclasses.replace(config.search, start={**saved.search.start, **config.search.start})
    return config.search


def _has_start(config: TrainConfig, method: Any) -> bool:
    try:
        config.search.start_for(method.name, method.key)
    except ValueError:
        return False
    return True


def resolved_fact_method(config: TrainConfig, method: MethodSpec) -> MethodSpec:
    """``method`` with its importance data filled in (``data.importance_data`` unless it names its own)."""
    return dataclasses.replace(method, importance_data=method.importance_data or config.data.importance_data)


def prepare_run_folder(config: TrainConfig, out_dir: Path, resume: bool) -> tuple[TrainConfig, set[str]]:
    """Create or check the run folder (:func:`check_output_folder`; on ``resume`` the resume rule of
    :func:`triplets.runner.resume_config` over the sections ``data``, ``model``, ``optim``, ``loss``,
    ``search``, ``seed`` and the methods, and the fact file's content must be the recorded one); return
    the config whose methods are recorded there and the methods to train again from their start.
    Removes the hidden temporary files a killed run left."""
    check_output_folder(out_dir, "facts", resume=resume)
    config_path = out_dir / CONFIG_NAME
    payload_records: list[tuple[str, str | None]] = []
    restart: set[str] = set()
    if config_path.exists():
        saved = read_run_config(config_path)
        recorded, restart = resume_config(
            saved, config, out_dir, sections=("data", "model", "optim", "loss", "search", "seed"),
            resolve=resolved_fact_method, diverged=diverged_before(out_dir),
            same_section=lambda section, old, new: section == "search" and same_search(old, new))
        recorded = dataclasses.replace(recorded, search=_merged_search(saved, config))
        for method in config.methods:  # damaged files are refused before anything is written
            for name in ("checkpoint.pt", "model.pt"):
                if (out_dir / method.folder / name).is_file():
                    state = load_checkpoint(out_dir / method.folder / name, map_location="cpu")
                    payload_records.append((str(out_dir / method.folder / name), _data_sha_of(state)))
                    del state
            if (out_dir / method.folder / RESULT_NAME).is_file():
                read_method_result(out_dir / method.folder / RESULT_NAME)
    else:
        recorded = config
    identity = check_data_identity(out_dir, config.data.fact_file)
    check_recorded_data(identity, payload_records, out_dir)
    write_run_records(out_dir, recorded, RUN_COMMANDS["facts"], {"fact_file": identity})
    return recorded, restart


def results_dict(out_dir: Path, config: TrainConfig, fact_file, known: dict[str, Any] | None = None,
                 diverged: dict[str, str] | None = None, complete: bool = True) -> dict:
    """The contents of ``RUN/results.json`` (:mod:`triplets.results_schema`): the methods' results
    (``known`` ones as given, the others from their ``result.json``), the tasks' sizes, the config and
    the methods that ``diverged``; complete when ``complete``, every method has a result and every
    result every task (not a run stopped by ``--stop-after-task``)."""
    known = known or {}
    methods: dict[str, Any] = {}
    for method in config.methods:
        path = out_dir / method.folder / RESULT_NAME
        if method.key in known:
            methods[method.key] = known[method.key]
        elif path.exists() and method.key not in (diverged or {}):
            methods[method.key] = read_method_result(path)
    tasks = [{
        "index": task, "name": f"t{task + 1}",
        "num_facts": int(len(fact_file.facts_of_task(task))),
        "num_train": int(len(fact_file.sample_indices(task=task, split=0))),
        "num_test": int(len(fact_file.sample_indices(task=task, split=1))),
    } for task in range(fact_file.num_tasks)]
    return results_document(experiment="facts", name=out_dir.name, metric="standard top-5",
                            complete=complete and len(methods) == len(config.methods) and all(
                                len(entry.get("accuracy_matrix", [])) == fact_file.num_tasks
                                for entry in methods.values()),  # a run stopped early (--stop-after-task)
                            tasks=tasks, methods=methods, config=to_dict(config), diverged=diverged)


@dataclass
class Run:
    """A finished (or partly finished) run folder, opened for evaluation and queries."""

    dir: Path
    config: TrainConfig
    methods: list[str]
    fact_file: Any

    def load_model(self, method: str, *, device: str | torch.device = "cpu") -> FactEmbeddingNet:
        """The final model of ``method`` in eval mode. Raises RunFolderError if the method has
        no final model or was trained on a fact file with another vocabulary."""
        if method not in self.methods:
            raise RunFolderError(f"{self.dir} has no trained method {method!r}{did_you_mean(method, self.methods)} "
                                 f"(trained: {', '.join(self.methods)})")
        path = self.dir / method_folder(method) / "model.pt"
        try:
            state = load_checkpoint(path, map_location=device)
        except (CheckpointMismatchError, FileNotFoundError) as exc:
            raise RunFolderError(f"cannot read {path} ({exc}); retrain with `mas-triplets train --resume`") from None
        if state.get(VOCABULARY_KEY) != fact_vocabulary_fingerprint(self.fact_file):
            raise RunFolderError(
                f"{self.fact_file.path} has another fact vocabulary than the one {method!r} in {self.dir} was "
                "trained on; use the run's own fact file")
        model = rebuild_saved_model(state)  # the ridge baseline's model, else the config's
        if model is None:
            model_config = from_dict(ModelConfig, state["model_config"], f"{path}: model_config")
            model = build_model(model_config, int(state["slot_dim"]), int(state["image_size"]))
            model.load_state_dict(state["model"])
        return model.to(device).eval()

    def close(self) -> None:
        """Close the fact file."""
        self.fact_file.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_run(run_dir: str | Path) -> Run:
    """Open the run folder ``run_dir``. Raises RunFolderError for a folder that is not a run,
    has no finished method, or whose fact file is gone."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_NAME
    if run_kind(run_dir) == "recognition":
        raise RunFolderError(f"{run_dir} holds a recognition run (made by `mas-triplets recognition`); evaluate and "
                             "query open fact runs (made by `mas-triplets train`)")
    if not config_path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (no config.yaml); train one with `mas-triplets train`")
    config = read_run_config(config_path)
    methods = [m.key for m in config.methods if (run_dir / m.folder / "model.pt").is_file()]
    if not methods:
        raise RunFolderError(f"{run_dir} has no finished method yet; finish it with `mas-triplets train --resume`")
    if not Path(config.data.fact_file).is_file():
        raise RunFolderError(f"the run's fact file {config.data.fact_file} is gone; restore it to use {run_dir}")
    identity = check_data_identity(run_dir, config.data.fact_file)
    check_recorded_data(identity, [(str(run_dir / method_folder(m) / "model.pt"),
                                    recorded_data_sha256(run_dir / method_folder(m) / "model.pt"))
                                   for m in methods], run_dir)
    return Run(dir=run_dir, config=config, methods=methods, fact_file=open_fact_file(config.data.fact_file))


__all__ = ["DATA_IDENTITY_NAME", "RUN_COMMANDS", "Run", "check_data_identity", "check_output_folder",
           "check_recorded_data", "identity_as_recorded", "load_run", "package_versions", "prepare_run_folder",
           "read_data_identity", "read_run_config", "recorded_data_sha256", "resolved_fact_method", "results_dict",
           "run_kind"]
