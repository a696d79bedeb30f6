"""The object-recognition task sequence (Aljundi et al. 2018, Sec. 5.1): a multi-head
network learns a sequence of classification datasets, every method from the same seed.

:func:`run_recognition` builds the tasks of a :class:`RecognitionConfig` (converting
each raw dataset once to HDF5 with :func:`data_prep.images.prepare_image_dataset`),
trains the sequence once per method with :func:`mas_core.sequence.run_sequence`
(checkpoints in ``OUT/<method>/``), and writes

* ``OUT/results.json``: per method the accuracy matrix ``R[i][j]`` (fraction of the
  test set of task ``j`` classified correctly after training task ``i``), ``avg_acc``
  (mean final accuracy), ``avg_drop`` (mean over tasks of final minus just-after
  accuracy; negative = forgetting), ``avg_forgetting``, ``bwt``, ``wall_time_s``;
* ``OUT/results.md``: the paper's Table 2 layout for two tasks (first-task accuracy
  with its drop in parentheses, second-task accuracy; percentages), else a table of
  average accuracy and drop per method, and per-task final accuracies;
* ``OUT/plots/accuracy.png`` and ``OUT/plots/drop.png``: per-task bars per method.

All files are written atomically. A method finished earlier is loaded from
``OUT/<method>/result.json`` on ``resume``; an interrupted one continues from its
last task checkpoint, so the final results equal those of an uninterrupted run
(``wall_time_s`` aside).

Several processes (``torchrun --nproc_per_node=N -m triplets.cli recognition ...``): every
rank calls :func:`run_recognition` with the same arguments; the training itself is
:func:`mas_core.sequence.run_sequence`'s (global batches split across ranks, DDP, Ω reduced
across ranks, rank-0 checkpoints). Rank 0 alone converts the raw datasets (the others wait,
then read its HDF5 files), and writes ``config.json``, the per-method ``result.json``,
``results.json``, ``results.md`` and the plots; the other ranks return the same results
dictionary without writing anything. ``data_dir`` and ``OUT`` must be on a file system every
rank sees.

Method names: ``finetune``, ``joint``, ``mas``, ``lmas``, ``ewc``, ``si``, ``lwf``,
``imm``, ``ebll`` (and any name :mod:`mas_core.regularizers` registers). A suffix
``@test`` or ``@train`` (e.g. ``mas@test``) overrides ``importance_data`` for that
run: ``test`` estimates importance on the unlabeled test inputs of each task (the
paper's Table 3). Only label-free importance methods (mas, lmas) accept ``@test``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mas_core.errors import did_you_mean
from mas_core.loop import JOINT, OptimSettings
from mas_core.regularizers import METHODS

from .errors import ConfigError, RunFolderError

ALL_METHODS = ("finetune", "lwf", "ebll", "imm", "ewc", "si", "mas", "lmas", JOINT)  # the paper's comparison
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- configuration


@dataclass
class TaskSpec:
    """One task: a dataset (raw ``dataset`` under ``root``, or a prepared ``h5`` file) and a class subset.

    ``classes``: names or indices (default: all), relabelled 0..k-1 in the order given.
    ``max_train_per_class`` / ``max_test_per_class``: per-class subsampling (seeded).
    ``image_size`` (pixels): the size ``prepare`` stores (photographs: shorter side then
    centre crop; default 256 for photographs, native for fixed-size sources).
    ``renders_per_class`` ([train, test]) applies to ``font_letters`` only.
    """

    name: str = ""
    dataset: str | None = None
    root: str | None = None
    h5: str | None = None
    classes: list[int | str] | None = None
    max_train_per_class: int | None = None
    max_test_per_class: int | None = None
    image_size: int | None = None
    renders_per_class: list[int] | None = None

    def validate(self) -> None:
        if not self.name:
            raise ValueError("every task needs a name")
        if (self.dataset is None) == (self.h5 is None):
            raise ValueError(f"task {self.name!r}: give exactly one of 'dataset' (a source name) or 'h5' "
                             "(a file from `mas-triplets prepare images`)")
        if self.dataset is not None:
            from data_prep.images import SOURCES

            if self.dataset not in SOURCES:
                raise ValueError(f"task {self.name!r}: unknown dataset {self.dataset!r}"
                                 f"{did_you_mean(self.dataset, SOURCES)}")
        for key in ("max_train_per_class", "max_test_per_class", "image_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"task {self.name!r}: {key} must be >= 1, got {value}")
        if self.renders_per_class is not None and (len(self.renders_per_class) != 2
                                                   or min(self.renders_per_class) < 1):
            raise ValueError(f"task {self.name!r}: renders_per_class must be [train, test] positive counts")


@dataclass
class ModelSpec:
    """The shared trunk. ``small_cnn``: two conv(3x3)+ReLU+maxpool(2) blocks of ``width`` and
    ``2*width`` channels and a ``feature_dim`` fully connected ReLU layer. ``alexnet`` /
    ``resnet18``: torchvision architectures with ImageNet weights read from the local file
    ``pretrained_weights`` (a state_dict; never downloaded); ``null`` trains from scratch.

    Inputs are ``channels`` x ``input_size`` x ``input_size``. With ``resize`` set, images are
    first resized to ``resize`` and cropped to ``input_size`` (random crop + horizontal flip
    for training when ``augment``, centre crop for testing): the paper's 256 → 224.
    ``normalize``: ``imagenet`` (mean/std of ImageNet) or ``unit`` ((x/255 − 0.5)/0.5);
    ``auto`` picks imagenet for the pretrained architectures.
    """

    arch: Literal["small_cnn", "alexnet", "resnet18"] = "small_cnn"
    input_size: int = 28
    channels: int = 1
    width: int = 32
    feature_dim: int = 128
    pretrained_weights: str | None = None
    resize: int | None = None
    augment: bool = False
    normalize: Literal["auto", "imagenet", "unit"] = "auto"

    def validate(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"model.channels must be 1 or 3, got {self.channels}")
        if self.input_size < 8:
            raise ValueError(f"model.input_size must be >= 8, got {self.input_size}")
        if self.resize is not None and self.resize < self.input_size:
            raise ValueError(f"model.resize ({self.resize}) must be >= input_size ({self.input_size})")
        if self.arch != "small_cnn" and self.channels != 3:
            raise ValueError(f"model.arch {self.arch} needs channels: 3")
        if self.width < 1 or self.feature_dim < 1:
            raise ValueError("model.width and model.feature_dim must be positive")


@dataclass
class OptimSpec(OptimSettings):
    """``train:`` the optimizer of every task and method (:class:`mas_core.loop.OptimSettings`:
    SGD, ``lr`` per step, ``epochs`` per task) and where the sequence runs: ``eval_batch_size``
    test images per evaluation batch, ``num_workers`` DataLoader workers, ``device``."""

    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0
    device: str = "cpu"


@dataclass
class RecognitionConfig:
    """A recognition experiment: tasks, model, optimisation, methods and their options.

    ``method_options`` maps a method name (or ``name@variant``) to its keyword options,
    e.g. ``{"mas": {"lam": 1.0}}``. ``importance_data``: ``train`` or ``test`` (unlabeled
    test inputs, for mas/lmas). ``data_dir``: where raw datasets are converted to HDF5
    once (relative paths are relative to the working directory).
    """

    name: str = "recognition"
    tasks: list[TaskSpec] = field(default_factory=list)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: OptimSpec = field(default_factory=OptimSpec)
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    importance_data: Literal["train", "test"] = "train"
    seed: int = 0
    data_dir: str = "data_cache"

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: give at least one task")
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: names must be distinct, got {names}")
        self.train.validate()
        parse_methods(self.methods)
        known = set(known_methods())
        for key in self.method_options:
            if key.split("@")[0] not in known:
                raise ValueError(f"method_options: unknown method {key!r}{did_you_mean(key, sorted(known))}")


def known_methods() -> list[str]:
    """The method names accepted: the paper's set plus what :mod:`mas_core.regularizers` registers."""
    return list(ALL_METHODS) + [name for name in METHODS if name not in ALL_METHODS]


def importance_from_inputs(method: str) -> bool:
    """Whether ``method`` (a name, optionally ``name@variant``) estimates importance from
    unlabelled inputs alone (its regularizer's ``importance_from_inputs``: MAS, l-MAS)."""
    base = method.split("@")[0]
    return base in METHODS and bool(METHODS[base].importance_from_inputs)


def parse_methods(methods: Sequence[str] | str) -> list[str]:
    """Validate a method list (``"a,b"`` or a list); ``name@test``/``name@train`` allowed for mas/lmas."""
    items = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [m.strip() for m in methods]
    items = [m for m in items if m]
    if not items:
        raise ValueError("methods: give at least one method")
    known = known_methods()
    for item in items:
        base, _, variant = item.partition("@")
        if base not in known:
            raise ValueError(f"unknown method {base!r}{did_you_mean(base, known)} "
                             f"(known: {', '.join(known)})")
        if variant and variant not in ("train", "test"):
            raise ValueError(f"method {item!r}: the suffix after @ must be 'train' or 'test'")
        if variant == "test" and not importance_from_inputs(base):
            label_free = [name for name in METHODS if importance_from_inputs(name)]
            raise ValueError(f"method {item!r}: only {label_free} estimate importance "
                             "without labels; drop '@test'")
    if len(set(items)) != len(items):
        raise ValueError(f"methods: {items} names a method twice")
    return items


def load_recognition_config(path: str | Path, overrides: list[str] | None = None) -> RecognitionConfig:
    """Read and validate a recognition YAML config (unknown keys rejected with the nearest name)."""
    from .config import load_config

    return load_config(path, RecognitionConfig, overrides)


# --------------------------------------------------------------------------- data


def prepared_path(spec: TaskSpec, data_dir: str | Path, seed: int) -> Path:
    """The HDF5 file a task reads: its ``h5``, or the cached conversion of its raw dataset."""
    if spec.h5 is not None:
        return Path(spec.h5)
    options = {"dataset": spec.dataset, "root": str(Path(spec.root).resolve()) if spec.root else None,
               "image_size": spec.image_size, "renders_per_class": spec.renders_per_class,
               "seed": seed if spec.dataset in ("font_letters", "digits", "chars74k") else 0}
    digest = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    return Path(data_dir) / f"{spec.dataset}-{digest}.h5"


def ensure_prepared(spec: TaskSpec, data_dir: str | Path, seed: int, log: Callable[[str], None]) -> Path:
    """Convert the task's raw dataset to HDF5 once (atomically) and return the file's path."""
    from data_prep.images import prepare_image_dataset

    path = prepared_path(spec, data_dir, seed)
    if path.is_file() or spec.h5 is not None:
        return path
    log(f"preparing {spec.dataset} from {spec.root or 'its default location'} -> {path}")
    kwargs: dict[str, Any] = {"image_size": spec.image_size, "seed": seed}
    if spec.renders_per_class is not None:
        kwargs["renders_per_class"] = tuple(spec.renders_per_class)
    return prepare_image_dataset(spec.dataset or "", spec.root, path, **kwargs)


class _CropDataset:
    """uint8 images (N, C, S, S) → float inputs: crop ``size`` (random + flip when ``train`` and
    ``augment``, else centre) and normalise ``(x/255 − mean)/std``. Randomness from torch's
    global generator (checkpointed by the sequence runner)."""

    def __init__(self, images: Any, labels: Any, size: int, mean: Any, std: Any, random_crop: bool) -> None:
        self.images, self.labels, self.size = images, labels, size
        self.mean, self.std, self.random_crop = mean, std, random_crop

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        import torch

        image = self.images[index]
        full = image.shape[-1]
        if self.random_crop:
            top, left = (int(v) for v in torch.randint(0, full - self.size + 1, (2,)))
        else:
            top = left = (full - self.size) // 2
        crop = image[:, top:top + self.size, left:left + self.size].float().div_(255.0)
        if self.random_crop and bool(torch.rand(()) < 0.5):
            crop = crop.flip(-1)
        return (crop - self.mean) / self.std, int(self.labels[index])


def _to_model_input(images: Any, model: ModelSpec) -> Any:
    """(N, H, W, C) uint8 numpy → (N, model.channels, S, S) uint8 tensor, S = resize or input_size."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if tensor.shape[1] == 1 and model.channels == 3:
        tensor = tensor.expand(-1, 3, -1, -1)
    elif tensor.shape[1] == 3 and model.channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        tensor = (tensor.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    side = model.resize or model.input_size
    if tuple(tensor.shape[2:]) != (side, side):
        tensor = F.interpolate(tensor.float(), size=(side, side), mode="bilinear", align_corners=False,
                               antialias=True).round().clamp(0, 255).to(torch.uint8)
    return tensor.contiguous()


def _normalisation(model: ModelSpec) -> tuple[Any, Any]:
    import torch

    kind = model.normalize
    if kind == "auto":
        kind = "unit" if model.arch == "small_cnn" else "imagenet"
    if kind == "imagenet":
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        if model.channels == 1:
            mean, std = mean.mean().reshape(1), std.mean().reshape(1)
    else:
        mean, std = torch.full((model.channels,), 0.5), torch.full((model.channels,), 0.5)
    return mean.view(-1, 1, 1), std.view(-1, 1, 1)


def build_tasks(config: RecognitionConfig, *, log: Callable[[str], None] | None = None) -> list[Any]:
    """The :class:`mas_core.sequence.Task` list of ``config`` (``importance_data`` left unset).

    Without cropping the inputs are precomputed float tensors in a ``TensorDataset``; with
    ``model.resize`` they are uint8 tensors cropped and normalised per item.
    """
    import torch
    from torch.utils.data import TensorDataset

    from data_prep.images import open_image_dataset
    from mas_core.sequence import Task

    emit = log or (lambda message: None)
    mean, std = _normalisation(config.model)
    tasks = []
    for index, spec in enumerate(config.tasks):
        path = ensure_prepared(spec, config.data_dir, config.seed, emit)
        data = open_image_dataset(path)
        parts = {}
        for split, limit in (("train", spec.max_train_per_class), ("test", spec.max_test_per_class)):
            view = data.view(split, spec.classes, max_per_class=limit, seed=config.seed + 1000 * index)
            images = _to_model_input(view.images, config.model)
            labels = torch.from_numpy(view.labels.copy())
            if config.model.resize is None:
                inputs = (images.float().div_(255.0) - mean) / std
                parts[split] = TensorDataset(inputs, labels)
            else:
                parts[split] = _CropDataset(images, labels, config.model.input_size, mean, std,
                                            random_crop=(split == "train" and config.model.augment))
            num_classes = view.num_classes
        tasks.append(Task(name=spec.name, train=parts["train"], test=parts["test"], num_classes=num_classes))
    return tasks


def unlabeled_inputs(dataset: Any) -> Any:
    """The inputs of a labelled dataset without its labels (a ``TensorDataset`` of one tensor)."""
    import torch
    from torch.utils.data import TensorDataset

    if isinstance(dataset, TensorDataset):
        return TensorDataset(dataset.tensors[0])
    return TensorDataset(torch.stack([dataset[i][0] for i in range(len(dataset))]))


# --------------------------------------------------------------------------- models


def make_trunk(model: ModelSpec) -> tuple[Any, int]:
    """Build the shared trunk and return ``(trunk, feature_dim)``; pretrained weights only from a local file."""
    import torch
    from torch import nn

    if model.arch == "small_cnn":
        side = model.input_size // 4
        trunk = nn.Sequential(
            nn.Conv2d(model.channels, model.width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(model.width, 2 * model.width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * model.width * side * side, model.feature_dim), nn.ReLU(),
        )
        return trunk, model.feature_dim
    import torchvision.models as tv_models

    network = tv_models.alexnet(weights=None) if model.arch == "alexnet" else tv_models.resnet18(weights=None)
    if model.pretrained_weights:
        weights_path = Path(model.pretrained_weights)
        if not weights_path.is_file():
            raise RunFolderError(f"pretrained weights {weights_path} not found; save a torchvision {model.arch} "
                                 "state_dict there (nothing is downloaded) or set model.pretrained_weights: null")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise RunFolderError(f"{weights_path} is not a torchvision {model.arch} state_dict "
                                 f"({str(exc).splitlines()[0]})") from None
    if model.arch == "alexnet":
        classifier = network.classifier
        trunk = nn.Sequential(network.features, network.avgpool, nn.Flatten(), *list(classifier.children())[:-1])
        return trunk, int(classifier[-1].in_features)
    feature_dim = int(network.fc.in_features)
    network.fc = nn.Identity()
    return network, feature_dim


def model_factory(model: ModelSpec) -> Callable[[], Any]:
    """A ``make_model`` for :func:`run_sequence`: a fresh :class:`MultiHeadNet` without heads."""
    from mas_core.sequence import MultiHeadNet

    def make_model() -> Any:
        trunk, feature_dim = make_trunk(model)
        return MultiHeadNet(trunk, feature_dim)

    return make_model


# --------------------------------------------------------------------------- running


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
                    resume: bool = False, progress: bool = True,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the sequence once per method, write results.json / results.md / plots; return the results dict.

    Under ``torchrun`` every rank calls it; rank 0 alone writes (see the module docs)."""
    from mas_core.checkpoint import atomic_write_json, atomic_write_text
    from mas_core.distributed import is_main_process
    from mas_core.sequence import Task, run_sequence

    from .config import to_dict
    from mas_core.distributed import run_on_main_process, same_on_every_rank

    with same_on_every_rank():
        try:
            method_list = parse_methods(list(methods) if methods is not None else config.methods)
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
        out.mkdir(parents=True, exist_ok=True)
        if not resume and results_path.is_file():
            results_path.unlink()
        atomic_write_json(out / "config.json", config_dict)
        return [ensure_prepared(spec, config.data_dir, config.seed, emit) for spec in config.tasks]

    # rank 0 converts the datasets once; the others wait for it, then read the same files
    run_on_main_process(prepare_folder_and_data)
    tasks = build_tasks(config, log=emit)
    test_inputs = [unlabeled_inputs(task.test) for task in tasks]
    optim = OptimSettings(**{f.name: getattr(config.train, f.name) for f in dataclasses.fields(OptimSettings)})
    make_model = model_factory(config.model)
    per_method: dict[str, Any] = {}
    for method in method_list:
        method_dir = out / method_dir_name(method)
        options = _method_options(config, method)
        importance = _importance_choice(config, method)
        identity = {"method": method, "options": options, "importance_data": importance,
                    "config": {k: v for k, v in config_dict.items() if k not in ("methods", "method_options")}}
        saved_path = method_dir / "result.json"
        if resume and saved_path.is_file():
            saved = json.loads(saved_path.read_text(encoding="utf-8"))
            if saved.get("identity") == identity:
                emit(f"[{method}] finished earlier; loaded {saved_path}")
                per_method[method] = saved["result"]
                continue
        run_tasks = [Task(name=t.name, train=t.train, test=t.test, num_classes=t.num_classes,
                          importance_data=test_inputs[i] if importance == "test" else None)
                     for i, t in enumerate(tasks)]
        base = method.split("@")[0]
        sequence_result = run_sequence(make_model, run_tasks, base, optim, seed=config.seed,
                                       device=config.train.device, eval_batch_size=config.train.eval_batch_size,
                                       num_workers=config.train.num_workers, method_options=options or None,
                                       checkpoint_dir=method_dir, resume=resume, progress=progress, log=log)
        summary = {
            "accuracy": sequence_result.accuracy,
            "avg_acc": sequence_result.avg_acc,
            "avg_drop": sequence_result.avg_drop,
            "avg_forgetting": sequence_result.avg_forgetting,
            "bwt": sequence_result.bwt,
            "wall_time_s": sequence_result.wall_time_s,
            "importance_data": importance if importance_from_inputs(base) else None,
            "options": options,
        }
        per_method[method] = summary
        if main:
            atomic_write_json(saved_path, {"identity": identity, "result": summary})
            _write_results(results_path, config, config_dict, per_method, complete=False)
    results = _write_results(results_path, config, config_dict, per_method, complete=True, write=main)
    if main:
        atomic_write_text(out / "results.md", results_markdown(results))
        write_plots(results, out / "plots")
    return results


def _write_results(path: Path, config: RecognitionConfig, config_dict: dict[str, Any],
                   per_method: dict[str, Any], complete: bool, write: bool = True) -> dict[str, Any]:
    from mas_core.checkpoint import atomic_write_json

    results = {"name": config.name, "complete": complete, "tasks": [t.name for t in config.tasks],
               "methods": dict(per_method), "config": config_dict}
    if write:
        atomic_write_json(path, results)
    return results


# --------------------------------------------------------------------------- reporting


def _pct(value: float) -> str:
    return f"{100.0 * value:.2f}"


def results_markdown(results: dict[str, Any]) -> str:
    """Markdown tables of a results dict (accuracies and drops in percent)."""
    tasks = results["tasks"]
    methods = results["methods"]
    lines = [f"# {results['name']}: {' → '.join(tasks)}", ""]
    if len(tasks) == 2:
        lines += [f"| method | {tasks[0]} (drop) | {tasks[1]} |", "|---|---|---|"]
        for name, m in methods.items():
            R = m["accuracy"]
            lines.append(f"| {name} | {_pct(R[1][0])} ({100.0 * (R[1][0] - R[0][0]):+.2f}) | {_pct(R[1][1])} |")
        lines.append("")
        lines.append("First-task accuracy after learning the second task, with its drop from the accuracy right "
                     "after learning it (Table 2 layout); second-task accuracy. Percent.")
    else:
        lines += ["| method | avg acc | avg drop | avg forgetting | wall time (s) |", "|---|---|---|---|---|"]
        for name, m in methods.items():
            lines.append(f"| {name} | {_pct(m['avg_acc'])} | {100.0 * m['avg_drop']:+.2f} | "
                         f"{_pct(m['avg_forgetting'])} | {m['wall_time_s']:.1f} |")
        lines.append("")
        lines.append("avg acc: mean final test accuracy over tasks; avg drop: mean over tasks of final minus "
                     "just-after accuracy (negative = forgetting). Percent.")
    lines += ["", "Final accuracy per task (drop from just after learning it):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, m in methods.items():
        R = m["accuracy"]
        last = R[-1]
        cells = [f"{_pct(last[j])} ({100.0 * (last[j] - R[j][j]):+.1f})" for j in range(len(tasks))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plots(results: dict[str, Any], folder: str | Path) -> list[Path]:
    """Grouped bar plots (per task, one bar per method) of final accuracy and drop; PNGs written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mas_core.checkpoint import atomic_write_bytes

    tasks = results["tasks"]
    methods = list(results["methods"])
    folder = Path(folder)
    written = []
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(tasks))
    for kind in ("accuracy", "drop"):
        figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2), 4.0))
        for k, method in enumerate(methods):
            R = results["methods"][method]["accuracy"]
            values = [100.0 * (R[-1][j] if kind == "accuracy" else R[-1][j] - R[j][j]) for j in range(len(tasks))]
            axis.bar(x + (k - (len(methods) - 1) / 2) * width, values, width, label=method)
        axis.set_xticks(x)
        axis.set_xticklabels(tasks, rotation=20)
        axis.set_ylabel("final test accuracy (%)" if kind == "accuracy" else "drop: final − just after (points)")
        axis.set_title(f"{results['name']}: per-task {'accuracy' if kind == 'accuracy' else 'drop'}")
        axis.axhline(0.0, color="black", linewidth=0.5)
        axis.legend(fontsize=7, ncol=min(5, len(methods)))
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        path = folder / f"{kind}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def comparable(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without wall times (what a resumed run must reproduce exactly)."""
    copy = json.loads(json.dumps(results))
    for summary in copy["methods"].values():
        summary.pop("wall_time_s", None)
    return copy


__all__ = [
    "ALL_METHODS", "ModelSpec", "OptimSpec", "RecognitionConfig", "TaskSpec", "build_tasks", "comparable",
    "ensure_prepared", "load_recognition_config", "make_trunk", "model_factory", "parse_methods",
    "prepared_path", "results_markdown", "run_recognition", "write_plots",
]
