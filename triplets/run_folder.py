"""The run folder of a fact-embedding run: creating or checking it, gathering the results,
reading a run back (:func:`load_run`). The layout and the results schema: ``docs/run_folder.md``.

    RUN/config.yaml  RUN/versions.json  RUN/results.json  RUN/results.md  RUN/plots/*.png
    RUN/<method>/checkpoint.pt  RUN/<method>/log.txt  RUN/<method>/model.pt
    RUN/<method>/result.json    RUN/<method>/index/
    RUN/features/<fingerprint>.h5            # only with model.cache_features
"""
from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import yaml

from mas_core.checkpoint import atomic_write_json, atomic_write_text, load_checkpoint
from mas_core.errors import CheckpointMismatchError, did_you_mean

from .config import from_dict, to_dict
from .errors import ConfigError, RunFolderError
from .fact_data import fact_file_fingerprint, open_fact_file
from .model import FactEmbeddingNet, ModelConfig, build_model
from .report import write_report
from .results_schema import results_document
from .train_config import TrainConfig


def prepare_run_folder(config: TrainConfig, out_dir: Path, resume: bool) -> TrainConfig:
    """Create or check the run folder; return the config whose methods are recorded there."""
    config_path = out_dir / "config.yaml"
    if config_path.exists():
        if not resume:
            raise RunFolderError(f"{out_dir} already holds a run; pass --resume to continue it or choose a new --out")
        try:
            saved = from_dict(TrainConfig, yaml.safe_load(config_path.read_text(encoding="utf-8")), str(config_path))
        except ConfigError as exc:
            raise RunFolderError(f"{config_path} is not a readable run config ({exc}); use a new --out") from None
        for section in ("data", "model", "optim", "loss", "seed"):
            if to_dict(getattr(saved, section)) != to_dict(getattr(config, section)):
                raise CheckpointMismatchError(
                    f"{out_dir} was trained with another {section!r} section; resume with the original config "
                    "or use a new --out")
        methods = list(saved.methods) + [m for m in config.methods if m.key not in {s.key for s in saved.methods}]
        for method in config.methods:
            old = next(s for s in methods if s.key == method.key)
            if to_dict(old) != to_dict(method):
                raise CheckpointMismatchError(
                    f"method {method.key!r} in {out_dir} was trained with options {old.options}; "
                    "resume with the original config or give the new setting another label")
        recorded = dataclasses.replace(config, methods=methods)
    else:
        if out_dir.exists() and any(out_dir.iterdir()) and not resume:
            raise RunFolderError(f"{out_dir} exists and is not empty; choose a new --out (nothing was overwritten)")
        recorded = config
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, yaml.safe_dump(to_dict(recorded), sort_keys=False))
    atomic_write_json(out_dir / "versions.json", package_versions())
    return recorded


def package_versions() -> dict[str, str | None]:
    """Versions of the packages a run depends on (None for one that is not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name, distributions in (("torch", ["torch"]), ("torchvision", ["torchvision"]),
                                ("transformers", ["transformers"]), ("faiss", ["faiss-cpu", "faiss-gpu", "faiss"]),
                                ("numpy", ["numpy"]), ("h5py", ["h5py"]), ("mas-triplets", ["mas-triplets"])):
        found[name] = None
        for dist in distributions:
            try:
                found[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return found


def collect_results(out_dir: Path, config: TrainConfig, fact_file) -> dict:
    """Gather every finished method's ``result.json`` into ``RUN/results.json`` and write the
    Markdown table and plots (:func:`triplets.report.write_report`)."""
    results = results_dict(out_dir, config, fact_file)
    atomic_write_json(out_dir / "results.json", results)
    write_report(results, out_dir)
    return results


def results_dict(out_dir: Path, config: TrainConfig, fact_file, known: dict[str, Any] | None = None) -> dict:
    """The contents of ``RUN/results.json`` (:mod:`triplets.results_schema`): the methods' results
    (``known`` ones as given, the others from their ``result.json``), the tasks' sizes and the config."""
    known = known or {}
    methods: dict[str, Any] = {}
    for method in config.methods:
        path = out_dir / method.key / "result.json"
        if method.key in known:
            methods[method.key] = known[method.key]
        elif path.exists():
            methods[method.key] = json.loads(path.read_text(encoding="utf-8"))
    tasks = [{
        "index": task, "name": f"t{task + 1}",
        "num_facts": int(len(fact_file.facts_of_task(task))),
        "num_train": int(len(fact_file.sample_indices(task=task, split=0))),
        "num_test": int(len(fact_file.sample_indices(task=task, split=1))),
    } for task in range(fact_file.num_tasks)]
    return results_document(experiment="facts", name=out_dir.name, metric="standard top-5",
                            complete=len(methods) == len(config.methods), tasks=tasks, methods=methods,
                            config=to_dict(config))


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
        path = self.dir / method / "model.pt"
        try:
            state = load_checkpoint(path, map_location=device)
        except (CheckpointMismatchError, FileNotFoundError) as exc:
            raise RunFolderError(f"cannot read {path} ({exc}); retrain with `mas-triplets train --resume`") from None
        if state.get("fact_file_sha") != fact_file_fingerprint(self.fact_file):
            raise RunFolderError(
                f"{self.fact_file.path} has another fact vocabulary than the one {method!r} in {self.dir} was "
                "trained on; use the run's own fact file")
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
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder (no config.yaml); train one with `mas-triplets train`")
    try:
        config = from_dict(TrainConfig, yaml.safe_load(config_path.read_text(encoding="utf-8")), str(config_path))
    except (ConfigError, yaml.YAMLError) as exc:
        raise RunFolderError(f"{config_path} is not a valid run config ({str(exc).splitlines()[0]})") from None
    methods = [m.key for m in config.methods if (run_dir / m.key / "model.pt").is_file()]
    if not methods:
        raise RunFolderError(f"{run_dir} has no finished method yet; finish it with `mas-triplets train --resume`")
    if not Path(config.data.fact_file).is_file():
        raise RunFolderError(f"the run's fact file {config.data.fact_file} is gone; restore it to use {run_dir}")
    return Run(dir=run_dir, config=config, methods=methods, fact_file=open_fact_file(config.data.fact_file))


__all__ = ["Run", "collect_results", "load_run", "package_versions", "prepare_run_folder", "results_dict"]
