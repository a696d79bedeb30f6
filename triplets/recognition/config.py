"""The configuration of the object-recognition sequence (``mas-triplets recognition --config``):
tasks, the shared trunk, the optimizer, the methods and their options.

Methods (``methods:``, :class:`triplets.runner.MethodSpec`: a name such as ``mas@test`` or a mapping
``{name, options, label, importance_data}``): ``finetune``, ``joint``, ``mas``, ``lmas``, ``ewc``,
``si``, ``lwf``, ``imm``, ``ebll`` (and any name :mod:`mas_core.regularizers` registers), and
``ridge``: ridge regression from the frozen initial trunk's features to the one-hot labels
(:mod:`triplets.recognition.ridge`; its options ``strengths`` and ``val_fraction``,
:class:`mas_core.ridge.RidgeSettings`; the optimizer settings do not apply to it). A suffix
``@test`` or ``@train`` (e.g. ``mas@test``) overrides ``importance_data`` for that method: ``test``
estimates importance on the unlabelled test inputs of each task (the paper's Table 3); only
methods whose regularizer declares ``importance_from_inputs`` (mas, lmas) accept ``@test``.
A method's options (:func:`resolved_method`): ``method_options[key]`` or else
``method_options[name]``, updated with the spec's own ``options``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_prep.image_decode import MAX_STORED_IMAGE_SIZE
from data_prep.image_sets.sources import SOURCES
from mas_core.errors import MASCoreError, did_you_mean
from mas_core.hparam_search import SearchSettings
from mas_core.loop import JOINT, OptimSettings
from mas_core.regularizers import METHODS, make_regularizer
from mas_core.ridge import RIDGE, ridge_settings

from ..backbones import BackboneSpec
from ..config import load_config
from ..runner import MethodSpec, check_methods, importance_from_inputs, known_methods as registered_methods

MAX_SEED = (1 << 63) - 1
MAX_SIDE = 4096          # model.input_size / resize, pixels
MAX_WIDTH = 1 << 16      # model.width / feature_dim
MAX_BATCH = 1 << 24
MAX_WORKERS = 256
DEFAULT_TRUNK_BLOCKS = 16  # efficientnet_lite0: stem + all 16 blocks frozen, the head conv trains (as the fact model)
ALL_METHODS = ("finetune", "lwf", "ebll", "imm", "ewc", "si", "mas", "lmas", JOINT)  # the paper's comparison


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
            if self.dataset not in SOURCES:
                raise ValueError(f"task {self.name!r}: unknown dataset {self.dataset!r}"
                                 f"{did_you_mean(self.dataset, SOURCES)}")
        for key in ("max_train_per_class", "max_test_per_class", "image_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"task {self.name!r}: {key} must be >= 1, got {value}")
        if self.image_size is not None and self.image_size > MAX_STORED_IMAGE_SIZE:
            raise ValueError(f"task {self.name!r}: image_size must be at most {MAX_STORED_IMAGE_SIZE}, "
                             f"got {self.image_size}")
        if self.renders_per_class is not None and (len(self.renders_per_class) != 2
                                                   or min(self.renders_per_class) < 1):
            raise ValueError(f"task {self.name!r}: renders_per_class must be [train, test] positive counts")


@dataclass
class ModelSpec:
    """The shared trunk. ``small_cnn``: two conv(3x3)+ReLU+maxpool(2) blocks of ``width`` and
    ``2*width`` channels and a ``feature_dim`` fully connected ReLU layer. ``alexnet`` /
    ``resnet18``: torchvision architectures with ImageNet weights read from the local file
    ``pretrained_weights`` (a state_dict; never downloaded); ``null`` trains from scratch.
    ``efficientnet_lite0`` (:mod:`triplets.backbones`): ``pretrained_weights`` ``null`` is the
    installed package's ImageNet weights, a path a local state_dict, ``scratch`` random weights;
    the stem and the first ``trunk_blocks`` of its 16 blocks are frozen (``FrozenModule``: always
    in eval mode, batch-norm statistics fixed), the remaining blocks and the head convolution
    train, and the trunk's output is the pooled 1280-d feature ``mean_{h,w}`` of the head's map.
    ``cache_features`` (efficientnet_lite0 without ``resize``, not ``scratch``): the frozen
    prefix's output is computed once per image when the tasks are built, and the tasks hold it
    instead of the images (the trunk is then the trainable suffix alone; the same numbers, the
    prefix being a fixed function of the image). ``freeze_batch_norm`` (efficientnet_lite0): the
    trainable suffix's batch norms keep their ImageNet statistics and affine parameters (eval mode,
    ``FrozenModule``); otherwise their running statistics follow each new task's data, a change no
    penalty on the parameters holds back.

    Inputs are ``channels`` x ``input_size`` x ``input_size``. With ``resize`` set, images are
    first resized to ``resize`` and cropped to ``input_size`` (random crop + horizontal flip
    for training when ``augment``, centre crop for testing): the paper's 256 → 224.
    ``normalize``: ``imagenet`` (mean/std of ImageNet) or ``unit`` ((x/255 − 0.5)/0.5);
    ``auto`` picks imagenet for the torchvision architectures and the backbone's own ((x − 0.5)/0.5,
    i.e. [−1, 1]) for efficientnet_lite0. Grayscale sources are replicated to ``channels: 3``.
    """

    arch: Literal["small_cnn", "alexnet", "resnet18", "efficientnet_lite0"] = "small_cnn"
    input_size: int = 28
    channels: int = 1
    width: int = 32
    feature_dim: int = 128
    pretrained_weights: str | None = None
    resize: int | None = None
    augment: bool = False
    normalize: Literal["auto", "imagenet", "unit"] = "auto"
    trunk_blocks: int | None = None  # efficientnet_lite0: frozen blocks (null: DEFAULT_TRUNK_BLOCKS)
    cache_features: bool = False
    freeze_batch_norm: bool = False

    @property
    def frozen_blocks(self) -> int:
        """The efficientnet_lite0 blocks in the frozen prefix (``trunk_blocks`` or the default)."""
        return DEFAULT_TRUNK_BLOCKS if self.trunk_blocks is None else self.trunk_blocks

    @property
    def backbone_spec(self) -> BackboneSpec:
        """The trunk as :class:`triplets.backbones.BackboneSpec` (``arch``, ``pretrained_weights``,
        ``trunk_blocks``)."""
        return BackboneSpec(self.arch, self.pretrained_weights, self.frozen_blocks,
                            weights_key="model.pretrained_weights")

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
        for key, most in (("input_size", MAX_SIDE), ("resize", MAX_SIDE), ("width", MAX_WIDTH),
                          ("feature_dim", MAX_WIDTH)):
            value = getattr(self, key)
            if value is not None and value > most:
                raise ValueError(f"model.{key} must be at most {most:,}, got {value}")
        self.backbone_spec.validate()  # scratch weights, trunk_blocks: the one backbone spec
        if self.arch != "efficientnet_lite0":
            for key in ("trunk_blocks", "cache_features", "freeze_batch_norm"):
                if getattr(self, key) not in (None, False):
                    raise ValueError(f"model.{key} is for arch efficientnet_lite0; drop it for {self.arch}")
            return
        if self.cache_features and (self.resize is not None or self.pretrained_weights == "scratch"):
            raise ValueError("model.cache_features needs the images at input_size (resize: null) and fixed "
                             "pretrained weights (not scratch); drop cache_features or those keys")


@dataclass
class OptimSpec(OptimSettings):
    """``train:`` the optimizer of every task and method (:class:`mas_core.loop.OptimSettings`:
    SGD, ``lr`` per step, ``epochs`` per task) and where the sequence runs: ``eval_batch_size``
    test images per evaluation batch, ``num_workers`` DataLoader workers, ``device``."""

    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.eval_batch_size <= MAX_BATCH or self.batch_size > MAX_BATCH:
            raise ValueError(f"train.batch_size and train.eval_batch_size must be in 1..{MAX_BATCH:,}")
        if not 0 <= self.num_workers <= MAX_WORKERS:
            raise ValueError(f"train.num_workers must be in 0..{MAX_WORKERS}, got {self.num_workers}")


@dataclass
class RecognitionConfig:
    """A recognition experiment: tasks, model, optimisation, methods and their options.

    ``methods``: :class:`triplets.runner.MethodSpec` entries (``mas``, ``mas@test`` or
    ``{name, options, label, importance_data}``). ``method_options`` maps a method's key or name
    (e.g. ``mas@test``, ``mas``) to its keyword options (a spec's own ``options`` update them),
    e.g. ``{"mas": {"lam": 1.0}}``; the quadratic-anchor methods (mas, lmas, ewc, si, imm) run
    ``penalty_step: proximal`` unless an entry says ``penalty_step: gradient`` (the papers' form;
    ``docs/method.md`` §13). ``importance_data``: ``train`` or ``test`` (unlabeled
    test inputs, for mas/lmas). ``data_dir``: where raw datasets are converted to HDF5
    once (relative paths are relative to the working directory). ``search``: the per-task choice
    of the learning rate and each method's strength on the task's own training data
    (:class:`mas_core.hparam_search.SearchSettings`; off by default; ``start`` may name a method
    as listed in ``methods``, e.g. ``mas@test``, or its base name).
    """

    name: str = "recognition"
    tasks: list[TaskSpec] = field(default_factory=list)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: OptimSpec = field(default_factory=OptimSpec)
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec(name) for name in ALL_METHODS])
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    importance_data: Literal["train", "test"] = "train"
    search: SearchSettings = field(default_factory=SearchSettings)
    seed: int = 0
    data_dir: str = "data_cache"

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: give at least one task")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED} (2^63 - 1), got {self.seed}")
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: names must be distinct, got {names}")
        self.train.validate()
        check_methods([resolved_method(self, method) for method in self.methods])
        known = set(known_methods())
        for key in self.method_options:
            if key.split("@")[0] not in known:
                raise ValueError(f"method_options: unknown method {key!r}{did_you_mean(key, sorted(known))}")
        for key, options in self.method_options.items():  # bad options fail here, before any training
            base = key.split("@")[0]
            if base in METHODS or base == RIDGE:
                try:
                    ridge_settings(options) if base == RIDGE else make_regularizer(base, **options)
                except MASCoreError as exc:
                    raise ValueError(f"method_options.{key}: {exc}") from None
        self.search.validate()
        self.search.check_methods([(method.name, method.key) for method in self.methods])


def known_methods() -> list[str]:
    """The method names accepted: the paper's set first, then ``ridge`` and the rest of the registry."""
    return list(ALL_METHODS) + [name for name in registered_methods() if name not in ALL_METHODS]


def resolved_method(config: RecognitionConfig, method: MethodSpec) -> MethodSpec:
    """``method`` with its options (``method_options[key]``, else ``method_options[name]``, then the
    spec's own) and its importance data (its own, else ``config.importance_data`` for a label-free
    method, else ``train``) filled in."""
    base = config.method_options.get(method.key, config.method_options.get(method.name, {}))
    importance = method.importance_data or (config.importance_data if importance_from_inputs(method.name)
                                            else "train")
    return MethodSpec(name=method.name, options={**base, **method.options}, label=method.label,
                      importance_data=importance)


def load_recognition_config(path: str | Path, overrides: list[str] | None = None) -> RecognitionConfig:
    """Read and validate a recognition YAML config (unknown keys rejected with the nearest name)."""
    return load_config(path, RecognitionConfig, overrides)


__all__ = ["ALL_METHODS", "DEFAULT_TRUNK_BLOCKS", "ModelSpec", "OptimSpec", "RecognitionConfig", "TaskSpec",
           "known_methods", "load_recognition_config", "resolved_method"]
