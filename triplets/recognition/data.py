"""The data and the model of the recognition sequence: each task's images converted once to
HDF5 (:func:`data_prep.image_sets.prepare.prepare_image_dataset`), read as :class:`mas_core.sequence.Task`
lists, and the shared trunk of the multi-head network (pretrained weights from a local file, or for
efficientnet_lite0 from the installed weights package; nothing is downloaded).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.models as tv_models
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from data_prep.image_sets.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from data_prep.image_sets.prepare import prepare_image_dataset
from data_prep.image_sets.image_file import open_image_dataset
from mas_core.sequence import MultiHeadNet, Task

from ..errors import ConfigError
from ..fingerprint import options_fingerprint
from ..backbones import EFFICIENTNET_MEAN, EFFICIENTNET_STD, FrozenModule, load_local_weights
from ..facts.model import IMAGENET_MEAN, IMAGENET_STD
from .config import ModelSpec, RecognitionConfig, TaskSpec

EFFICIENTNET = "efficientnet_lite0"
#: the class pairs of split Fashion-MNIST, one task each (issue 2, point 5)
FASHION_MNIST_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def prepared_path(spec: TaskSpec, data_dir: str | Path, seed: int) -> Path:
    """The HDF5 file a task reads: its ``h5``, or the cached conversion of its raw dataset."""
    if spec.h5 is not None:
        return Path(spec.h5)
    options = {"dataset": spec.dataset, "root": str(Path(spec.root).resolve()) if spec.root else None,
               "image_size": spec.image_size, "renders_per_class": spec.renders_per_class,
               "seed": seed if spec.dataset in ("font_letters", "digits", "chars74k") else 0}
    return Path(data_dir) / f"{spec.dataset}-{options_fingerprint(options)}.h5"


def ensure_prepared(spec: TaskSpec, data_dir: str | Path, seed: int, log: Callable[[str], None]) -> Path:
    """Convert the task's raw dataset to HDF5 once (atomically) and return the file's path."""
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
    kind = model.normalize
    if kind == "auto" and model.arch == EFFICIENTNET:  # the backbone's own standardisation, [−1, 1]
        return torch.tensor(EFFICIENTNET_MEAN).view(-1, 1, 1), torch.tensor(EFFICIENTNET_STD).view(-1, 1, 1)
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
    ``model.resize`` they are uint8 tensors cropped and normalised per item. With
    ``model.cache_features`` the ``TensorDataset`` holds the frozen prefix's output instead
    (:func:`prefix_features`), what :func:`make_trunk`'s suffix-only trunk reads.
    """

    emit = log or (lambda message: None)
    mean, std = _normalisation(config.model)
    prefix = _frozen_prefix(config.model) if config.model.cache_features else None
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
                if prefix is not None:
                    emit(f"{spec.name}: the frozen prefix's features of {len(inputs)} {split} images")
                    inputs = prefix_features(prefix, inputs)
                parts[split] = TensorDataset(inputs, labels)
            else:
                parts[split] = _CropDataset(images, labels, config.model.input_size, mean, std,
                                            random_crop=(split == "train" and config.model.augment))
            num_classes = view.num_classes
        tasks.append(Task(name=spec.name, train=parts["train"], test=parts["test"], num_classes=num_classes))
    return tasks


def unlabeled_inputs(dataset: Any) -> Any:
    """The inputs of a labelled dataset without its labels (a ``TensorDataset`` of one tensor)."""
    if isinstance(dataset, TensorDataset):
        return TensorDataset(dataset.tensors[0])
    return TensorDataset(torch.stack([dataset[i][0] for i in range(len(dataset))]))


class GlobalMeanPool(nn.Module):
    """``[B, C, H, W] → [B, C]``: ``mean_{h,w} x`` (EfficientNet-Lite0's pooled features)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def _freeze_batch_norms(module: nn.Module) -> None:
    """Replace every batch norm below ``module`` by ``FrozenModule(bn)`` (statistics and affine fixed)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenModule(child))
        else:
            _freeze_batch_norms(child)


def _frozen_prefix(model: ModelSpec) -> nn.Module:
    """The efficientnet_lite0 prefix (stem + the first ``trunk_blocks`` blocks) in eval mode, frozen."""
    return FrozenModule(model.backbone_spec.split().prefix)


def prefix_features(prefix: nn.Module, inputs: Tensor, batch_size: int = 256) -> Tensor:
    """``prefix(inputs)`` (standardised images ``[N, 3, S, S]``) batch by batch without gradients."""
    prefix.eval()
    with torch.no_grad():
        return torch.cat([prefix(chunk) for chunk in inputs.split(batch_size)]) if len(inputs) else inputs


def make_trunk(model: ModelSpec) -> tuple[Any, int]:
    """Build the shared trunk and return ``(trunk, feature_dim)``; pretrained weights only from a
    local file, or (efficientnet_lite0) the installed package's. efficientnet_lite0: the frozen
    prefix (``FrozenModule``), the trainable suffix and the global mean pool, 1280 features; with
    ``cache_features`` the suffix and the pool alone (the inputs are the prefix's output)."""
    if model.arch == "small_cnn":
        side = model.input_size // 4
        trunk = nn.Sequential(
            nn.Conv2d(model.channels, model.width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(model.width, 2 * model.width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * model.width * side * side, model.feature_dim), nn.ReLU(),
        )
        return trunk, model.feature_dim
    if model.arch == EFFICIENTNET:
        split = model.backbone_spec.split()
        if model.freeze_batch_norm:
            _freeze_batch_norms(split.suffix)
        if model.cache_features:  # the tasks hold the prefix's output (build_tasks)
            return nn.Sequential(split.suffix, GlobalMeanPool()), split.feature_dim
        return nn.Sequential(FrozenModule(split.prefix), split.suffix, GlobalMeanPool()), split.feature_dim
    network = tv_models.alexnet(weights=None) if model.arch == "alexnet" else tv_models.resnet18(weights=None)
    if model.pretrained_weights:
        load_local_weights(network, model.pretrained_weights, arch=model.arch, key="model.pretrained_weights")
    if model.arch == "alexnet":
        classifier = network.classifier
        trunk = nn.Sequential(network.features, network.avgpool, nn.Flatten(), *list(classifier.children())[:-1])
        return trunk, int(classifier[-1].in_features)
    feature_dim = int(network.fc.in_features)
    network.fc = nn.Identity()
    return network, feature_dim


def model_factory(model: ModelSpec) -> Callable[[], Any]:
    """A ``make_model`` for :func:`run_sequence`: a fresh :class:`MultiHeadNet` without heads."""
    def make_model() -> Any:
        trunk, feature_dim = make_trunk(model)
        return MultiHeadNet(trunk, feature_dim)

    return make_model


# --------------------------------------------------------------------------- split Fashion-MNIST

def split_fashion_mnist(root: str | Path = FASHION_MNIST_DIR, *, num_tasks: int = 5, train_per_class: int | None = None,
                        test_per_class: int | None = None, seed: int = 0) -> list[Task]:
    """The first ``num_tasks`` class-pair tasks of Fashion-MNIST (:data:`FASHION_MNIST_PAIRS`);
    labels ``2t, 2t+1`` become 0, 1; inputs ``[N, 784]`` in [0, 1] (pixels / 255).

    ``train_per_class`` / ``test_per_class`` keep the first so many images of each class
    after a shuffle seeded by ``seed`` (``None``: all 6,000 / 1,000, in file order)."""
    if not 1 <= num_tasks <= len(FASHION_MNIST_PAIRS):
        raise ConfigError(f"split Fashion-MNIST has 1 to {len(FASHION_MNIST_PAIRS)} tasks, got {num_tasks}")
    splits = {split: load_fashion_mnist(root, split) for split in ("train", "test")}
    rng = np.random.default_rng(seed)
    tasks = []
    for pair in FASHION_MNIST_PAIRS[:num_tasks]:
        datasets = {}
        for split, limit in (("train", train_per_class), ("test", test_per_class)):
            images, labels = splits[split]
            chosen = []
            for cls in pair:
                index = np.flatnonzero(labels == cls)
                index = rng.permutation(index) if limit is not None else index
                chosen.append(index[:limit] if limit is not None else index)
            index = np.sort(np.concatenate(chosen))
            inputs = torch.from_numpy(images[index].reshape(len(index), -1).astype(np.float32) / 255.0)
            targets = torch.from_numpy(labels[index] - pair[0])
            datasets[split] = TensorDataset(inputs, targets)
        name = f"{FASHION_MNIST_CLASSES[pair[0]]}/{FASHION_MNIST_CLASSES[pair[1]]}"
        tasks.append(Task(name=name, train=datasets["train"], test=datasets["test"], num_classes=2))
    return tasks


def fashion_mnist_mlp() -> MultiHeadNet:
    """Split Fashion-MNIST's network: the shared trunk 784-256-256 (ReLU), no heads yet (the task
    loop adds one 2-way head per task)."""
    trunk = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
    return MultiHeadNet(trunk, 256)


__all__ = ["FASHION_MNIST_PAIRS", "GlobalMeanPool", "build_tasks", "ensure_prepared", "fashion_mnist_mlp", "make_trunk",
           "model_factory", "prefix_features", "prepared_path", "split_fashion_mnist", "unlabeled_inputs"]
