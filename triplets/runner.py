"""One runner for both experiments: a config's methods trained in turn into one run folder.

``mas-triplets train`` (the fact embedding, :mod:`triplets.facts.train`) and ``mas-triplets
recognition`` (:mod:`triplets.recognition.run`) both run their methods through
:func:`run_methods`; each supplies only what differs, a :class:`MethodTrainer` (how one method
trains, what its results document and report are).

The method spec (:class:`MethodSpec`, one entry of ``methods:`` in either config)::

    {name: mas, options: {lam: 1.0}, label: strong, importance_data: test}
    "mas@test"   # shorthand: name mas, label "mas@test", importance_data test
    "mas"        # shorthand: name mas

``key`` (``label`` or ``name``) names the method in results and messages; ``folder`` (``@`` →
``_at_``) is its folder ``RUN/<folder>/``. ``importance_data`` (``train`` | ``test`` | null: the
experiment's default) is where a label-free method (:attr:`Regularizer.importance_from_inputs`:
MAS, l-MAS) estimates Ω; ``test`` is the MAS paper's test-condition adaptation (unlabelled test
inputs of each task).

The rules, the same for both experiments:

* **saved config**: ``RUN/config.yaml`` (:data:`CONFIG_NAME`), its first line naming the command
  that wrote it; a recognition folder written before (``RUN/config.json``) is read the same way
  and rewritten as ``config.yaml`` on ``--resume`` (:func:`read_saved_config`).
* **resume** (:func:`resume_config`): the sections that change a method's numbers must equal the
  recorded ones, and every method's settings (:meth:`MethodSpec.settings`: name, resolved options,
  importance data) its recorded settings; otherwise refused in one line
  (:class:`~mas_core.errors.CheckpointMismatchError`), nothing written. The exceptions: a
  method listed under ``diverged`` whose settings changed (what its error advised) trains again
  from its start, and one whose folder holds nothing yet takes its new settings. Within a method
  the checkpoint decides (the loop refuses one of another configuration); a method whose
  checkpoint holds every task and whose ``result.json`` exists is loaded, not retrained.
* **divergence** (:class:`~mas_core.errors.DivergenceError`): the method is listed under
  ``diverged`` in ``RUN/results.json`` with its one-line error, the others go on, the document says
  ``"complete": false`` and the command exits with status 1; only when every method diverged does
  the first error stand (exit status 2).
* **results**: ``RUN/<folder>/result.json`` (the method's entry of the results schema,
  :mod:`triplets.results_schema`) and ``RUN/results.json`` (rewritten after every method), written
  atomically with a checksum by rank 0 alone.
"""
from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml

from mas_core.checkpoint import atomic_write_json, atomic_write_text, read_json, remove_stale_temporaries
from mas_core.distributed import is_main_process, same_on_every_rank
from mas_core.errors import CheckpointMismatchError, DivergenceError, MASCoreError, did_you_mean
from mas_core.loop import JOINT
from mas_core.regularizers import METHODS, make_regularizer
from mas_core.ridge import RIDGE, ridge_settings

from .config import MAX_CONFIG_BYTES, from_dict, read_yaml, to_dict
from .errors import ConfigError, RunFolderError

CONFIG_NAME = "config.yaml"
LEGACY_CONFIG_NAME = "config.json"  # recognition folders written before the one runner
RESULTS_NAME = "results.json"
DATA_IDENTITY_NAME = "data.json"  # the SHA-256 of the data the run trained on (triplets.run_folder)
RESULT_NAME = "result.json"
IMPORTANCE_CHOICES = ("train", "test")


@dataclass
class MethodSpec:
    """One entry of ``methods:`` (see the module docs): a registered method ``name`` (finetune,
    joint, ridge, mas, lmas, ewc, si, lwf, imm, ebll, …) with its ``options`` (e.g. ``{lam: 1.0,
    mode: exact}``; the quadratic-anchor methods run ``penalty_step: proximal`` unless the options
    say ``gradient``, ``docs/method.md`` §13), an optional ``label`` naming it in the run folder (to
    compare two settings of one method) and ``importance_data`` (``train`` | ``test`` | null)."""

    name: str = "finetune"
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    importance_data: Literal["train", "test"] | None = None

    @classmethod
    def from_string(cls, text: str) -> MethodSpec:
        """``"mas"`` → ``MethodSpec("mas")``; ``"mas@test"`` → name mas, label ``mas@test``,
        importance data ``test``."""
        text = text.strip()
        name, at, variant = text.partition("@")
        if not at:
            return cls(name=name)
        if variant not in IMPORTANCE_CHOICES:
            raise ValueError(f"method {text!r}: the suffix after @ must be 'train' or 'test'")
        return cls(name=name, label=text, importance_data=variant)  # type: ignore[arg-type]

    @property
    def key(self) -> str:
        """The name of this method in results and messages: ``label`` or ``name``."""
        return self.label or self.name

    @property
    def folder(self) -> str:
        """Its folder in the run folder (``mas@test`` → ``mas_at_test``)."""
        return method_folder(self.key)

    def settings(self) -> dict[str, Any]:
        """What a finished method must have been trained with to be resumed (compared by
        :func:`resume_config` on the resolved spec)."""
        return {"method": self.name, "options": to_dict(dict(self.options)), "importance_data": self.importance_data}

    def to_plain(self) -> str | dict[str, Any]:
        """The spec as the config writes it: the shorthand when it says everything, else a mapping."""
        shorthand = self.name if self.importance_data is None else f"{self.name}@{self.importance_data}"
        if not self.options and (self.label is None and self.importance_data is None or self.label == shorthand):
            return shorthand
        plain = {"name": self.name, "options": to_dict(dict(self.options)), "label": self.label}
        if self.importance_data is not None:
            plain["importance_data"] = self.importance_data
        return plain

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("methods: every method needs a name (e.g. finetune, mas)")
        if self.importance_data not in (None, *IMPORTANCE_CHOICES):
            raise ValueError(f"method {self.key!r}: importance_data must be train, test or null, "
                             f"got {self.importance_data!r}")
        if not self.folder.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"methods: {self.key!r} is not a folder-safe name; use letters, digits, '_', '-' "
                             "(and '@train' / '@test')")


def method_folder(key: str) -> str:
    """The folder of the method named ``key`` in a run folder (``@`` → ``_at_``)."""
    return key.replace("@", "_at_")


def known_methods() -> list[str]:
    """The method names accepted: ``joint`` (the loop's mode), ``ridge`` (:mod:`mas_core.ridge`)
    and what :mod:`mas_core.regularizers` registers."""
    return [*METHODS, JOINT, RIDGE]


def importance_from_inputs(name: str) -> bool:
    """Whether method ``name`` estimates importance from unlabelled inputs alone (MAS, l-MAS)."""
    return name in METHODS and bool(METHODS[name].importance_from_inputs)


def check_methods(methods: Sequence[MethodSpec],
                  check_ridge: Callable[[dict[str, Any]], Any] = ridge_settings) -> None:
    """Refuse (``ValueError``, one line) an empty list, a key or folder named twice, an unknown
    method, ``importance_data: test`` for a method that needs labels, or options the method does
    not take (built once, so they fail before any training; ``check_ridge`` checks ``ridge``'s)."""
    if not methods:
        raise ValueError("methods: list at least one method (e.g. finetune, mas)")
    folders = [method.folder for method in methods]
    twice = sorted({method.key for method in methods if folders.count(method.folder) > 1})
    if twice:
        raise ValueError(f"methods: {twice} appear twice; give one of them a distinct label")
    known = known_methods()
    for method in methods:
        if method.name not in known:
            raise ValueError(f"unknown method {method.name!r}{did_you_mean(method.name, known)} "
                             f"(known: {', '.join(known)})")
        if method.importance_data == "test" and not importance_from_inputs(method.name):
            label_free = [name for name in METHODS if importance_from_inputs(name)]
            raise ValueError(f"method {method.key!r}: only {label_free} estimate importance without labels; "
                             "drop '@test' (importance_data: test)")
        try:
            if method.name == JOINT:
                if method.options:
                    raise ValueError(f"joint takes no options, got {sorted(method.options)}")
            elif method.name == RIDGE:
                check_ridge(dict(method.options))
            else:
                make_regularizer(method.name, **method.options)
        except (MASCoreError, ConfigError, ValueError) as exc:
            raise ValueError(f"method {method.key!r}: {str(exc).splitlines()[0]}") from None


def parse_methods(items: Iterable[str | MethodSpec | dict[str, Any]] | str) -> list[MethodSpec]:
    """Method specs from ``"a,b@test"``, strings, mappings or specs (the ``--methods`` option)."""
    if isinstance(items, str):
        items = [part for part in items.split(",") if part.strip()]
    specs = []
    for item in items:
        if isinstance(item, MethodSpec):
            specs.append(item)
        elif isinstance(item, dict):
            specs.append(from_dict(MethodSpec, item, "methods"))
        else:
            spec = MethodSpec.from_string(str(item))
            spec.validate()
            specs.append(spec)
    return specs


# ---------------------------------------------------------------------------------------------- run folder

def write_run_records(out_dir: Path, recorded: Any, command: str, data_identity: dict[str, Any]) -> None:
    """Create ``out_dir`` (removing the hidden temporaries a killed run left) and write, atomically,
    ``data.json`` (``data_identity``, with a checksum), ``config.yaml`` (``recorded``, its first line
    naming ``command``) and ``versions.json`` (:func:`package_versions`); a legacy ``config.json`` is
    removed once ``config.yaml`` holds the config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    atomic_write_json(out_dir / DATA_IDENTITY_NAME, data_identity, checksum=True)
    atomic_write_text(out_dir / CONFIG_NAME, saved_config_text(recorded, command))
    (out_dir / LEGACY_CONFIG_NAME).unlink(missing_ok=True)
    atomic_write_json(out_dir / "versions.json", package_versions())


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


def saved_config_text(config: Any, command: str) -> str:
    """``RUN/config.yaml``: a first line naming ``command``, then the config as YAML."""
    return f"# {command}: the config of this run\n" + yaml.safe_dump(to_dict(config), sort_keys=False)


def saved_config_path(run_dir: Path) -> Path | None:
    """``RUN/config.yaml``, else a legacy ``RUN/config.json``, else ``None``."""
    for name in (CONFIG_NAME, LEGACY_CONFIG_NAME):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def read_saved_config(path: Path, cls: type) -> Any:
    """The config of type ``cls`` recorded at ``path`` (``config.yaml`` or a legacy ``config.json``,
    JSON being YAML); :class:`RunFolderError` (one line) for one that cannot be read or is not such
    a config."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path.stat().st_size:,} bytes, more than a config may hold")
        raw = read_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise RunFolderError(f"{path} is not a readable run config ({reason}); restore it or use a new "
                             "run folder") from None
    try:
        return from_dict(cls, raw, str(path))
    except ConfigError as exc:
        raise RunFolderError(f"{path} is not a valid run config ({str(exc).splitlines()[0]}); restore it or "
                             "use a new run folder") from None


def resume_config(saved: Any, config: Any, out_dir: Path, *, sections: Sequence[str],
                  resolve: Callable[[Any, MethodSpec], MethodSpec], diverged: Iterable[str] = (),
                  same_section: Callable[[str, Any, Any], bool] | None = None) -> tuple[Any, set[str]]:
    """The resume rule (module docs): ``config`` checked against the ``saved`` one; return the config
    to record (its methods: the saved ones, then the new ones) and the keys of the methods to train
    again from their start (listed in ``diverged``, their settings changed). A method whose folder
    holds nothing yet may change its settings freely. ``sections``: the
    attributes that must be equal (``same_section(name, saved, config)`` may decide one);
    ``resolve(config, spec)``: the spec with its options and importance data filled in."""
    for section in sections:
        if same_section is not None and same_section(section, saved, config):
            continue
        if to_dict(getattr(saved, section)) != to_dict(getattr(config, section)):
            raise CheckpointMismatchError(
                f"{out_dir} was trained with another {section!r} section; resume with the original config "
                "or use a new --out")
    recorded = {method.key: method for method in saved.methods}
    restart, diverged = set(), set(diverged)
    for method in config.methods:
        old = recorded.get(method.key)
        if old is None or resolve(saved, old).settings() == resolve(config, method).settings():
            continue
        folder = out_dir / method.folder
        if not (folder.is_dir() and any(folder.iterdir())):
            continue  # nothing trained with the old settings yet: the new ones are recorded
        if method.key not in diverged:
            raise CheckpointMismatchError(
                f"method {method.key!r} in {out_dir} was trained with {resolve(saved, old).settings()}; resume "
                "with the original config or give the new setting another label")
        restart.add(method.key)
    merged = [next((m for m in config.methods if m.key == old.key), old) for old in saved.methods]
    merged += [m for m in config.methods if m.key not in recorded]
    return dataclasses.replace(config, methods=merged), restart


def read_method_result(path: Path) -> dict[str, Any]:
    """A method's ``result.json`` (a legacy recognition file ``{"identity", "result"}`` unwrapped)."""
    saved = read_json(path, what="method result")
    if isinstance(saved, dict) and set(saved) == {"identity", "result"}:
        return saved["result"]
    return saved


def diverged_before(run_dir: Path) -> dict[str, str]:
    """The methods an earlier run of this folder listed under ``diverged`` (with their errors)."""
    path = run_dir / RESULTS_NAME
    if not path.is_file():
        return {}
    with same_on_every_rank():
        saved = read_json(path, what="results document")
    found = saved.get("diverged") if isinstance(saved, dict) else None
    return dict(found) if isinstance(found, dict) else {}


# ---------------------------------------------------------------------------------------------- the loop

class MethodTrainer(Protocol):
    """What an experiment gives :func:`run_methods`."""

    def train_method(self, method: MethodSpec, method_dir: Path, *, restart: bool) -> dict[str, Any]:
        """Train (or resume, or load when finished) one method; return its ``methods[key]`` entry,
        written to ``method_dir/result.json`` (rank 0). ``restart``: ignore its checkpoint.
        Raises :class:`DivergenceError` when its training diverges."""

    def results(self, per_method: dict[str, Any], diverged: dict[str, str], complete: bool) -> dict[str, Any]:
        """The results document (:func:`triplets.results_schema.results_document`)."""

    def finish(self, results: dict[str, Any]) -> None:
        """Rank 0, after the last method: the report (``results.md``, plots) and anything else."""


def run_methods(trainer: MethodTrainer, methods: Sequence[MethodSpec], out_dir: Path, *,
                restart: Iterable[str] = (), log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``methods`` in turn with ``trainer`` into ``out_dir`` under the rules of the module
    docs; return the results document (also ``RUN/results.json``). ``restart``: the keys of methods
    to train from their start (:func:`resume_config`). Under ``torchrun`` every rank calls it
    (the loop all-reduces a divergence, so every rank lists it alike); rank 0 alone writes."""
    main, restart = is_main_process(), set(restart)
    emit = log if log is not None and main else (lambda message: None)
    per_method: dict[str, Any] = {}
    diverged: dict[str, str] = {}
    first_divergence: DivergenceError | None = None
    for method in methods:
        if method.key in restart:
            emit(f"[{method.key}] diverged before with other settings; training it from the start")
        try:
            per_method[method.key] = trainer.train_method(method, out_dir / method.folder,
                                                          restart=method.key in restart)
        except DivergenceError as exc:
            emit(f"[{method.key}] stopped: {exc}")
            diverged[method.key] = str(exc)
            first_divergence = first_divergence or exc
            continue
        if main:
            atomic_write_json(out_dir / RESULTS_NAME, trainer.results(per_method, diverged, False), checksum=True)
    if not per_method and first_divergence is not None:
        raise first_divergence  # nothing to report: every method diverged
    results = trainer.results(per_method, diverged, not diverged)
    if main:
        atomic_write_json(out_dir / RESULTS_NAME, results, checksum=True)
        trainer.finish(results)
    return results


def write_method_result(method_dir: Path, result: dict[str, Any]) -> None:
    """``method_dir/result.json``, atomically with a checksum (rank 0 alone)."""
    if is_main_process():
        atomic_write_json(method_dir / RESULT_NAME, result, checksum=True)


__all__ = ["CONFIG_NAME", "DATA_IDENTITY_NAME", "IMPORTANCE_CHOICES", "LEGACY_CONFIG_NAME", "MethodSpec", "MethodTrainer", "RESULTS_NAME",
           "RESULT_NAME", "check_methods", "diverged_before", "importance_from_inputs", "known_methods",
           "method_folder", "package_versions", "parse_methods", "read_method_result", "read_saved_config", "resume_config",
           "run_methods", "saved_config_path", "saved_config_text", "write_method_result", "write_run_records"]
