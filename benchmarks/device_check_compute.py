"""The device check's compute parts: exact MAS Ω, exact retrieval and the training step's throughput.

Importance (:func:`importance_part`): :func:`mas_core.importance.mas_importance` of a freshly built
network (``small_cnn``; resnet18 with its trunk frozen, so Ω covers the two branches) on random
images. Equality: Ω on the device against Ω on the CPU for the first ``compared`` images, TF32
off, ``relative_error ≤ FLOAT32_RTOL``. Speed: the exact per-sample estimator
``Ω = (1/N) Σ_n |∂‖F(x_n)‖₂²/∂θ|`` against the batch estimator
``Ω_batch = (1/N) Σ_batches |∂ Σ_{n∈batch} ‖F(x_n)‖₂²/∂θ|`` on the device, in samples per second.

Retrieval (:func:`retrieval_part`): a database of random Gaussian rows with 1 % exact duplicates
(ties, which the exact search breaks by ascending id) and queries of which one in eight is a
database row. The CPU reference is the project's flat index (:func:`triplets.index.build_index`,
``use_gpu=False``: FAISS's brute-force candidates re-scored in float64). On the device:

* ``torch_device``: the exact search's own pieces on device tensors, TF32 off: float32 candidates
  of :class:`triplets.index.exact.TopKAccumulator` (``torch.mm`` and ``torch.topk`` in blocks of at
  most 128 MiB of scores), the float64 re-scoring of :func:`triplets.index.exact.rescore`; rows
  whose kept candidates fail the completeness check (the c-th float32 score within
  2·γ_d of the k-th, :func:`~triplets.index.exact.float32_dot_error_bound`) are counted
  (the CPU search widens them; here they would only be reported);
* ``faiss_gpu`` (faiss-gpu only): the project's flat index placed on the GPU (``use_gpu=True``,
  FAISS's float32 ranking, what ``exact_backend="auto"`` runs there), its ids compared as they
  come and after re-scoring its best k + 8 in float64 with :func:`~triplets.index.exact.rescore`.

Throughput (:func:`throughput_part`): the task loop's own training step
(:func:`mas_core.loop.train_task_epochs`: forward, ``slot_loss``, backward, SGD with momentum)
on batches already on the device, fine-tuning (no penalty), per backbone at the users' image
size, float32 and bf16 autocast; samples per second after one warm-up epoch, and the peak of
GPU memory.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mas_core.importance import mas_importance
from mas_core.loop import EpochSettings, OptimSettings, train_task_epochs
from mas_core.regularizers import make_regularizer
from triplets.index import build_index, gpu_available, normalize_rows
from triplets.index.exact import (QUERY_BLOCK, RESCORE_MARGIN, SCORE_BLOCK_BYTES, TopKAccumulator,
                                  float32_dot_error_bound, rescore)
from triplets.facts.model import BACKBONES, ModelConfig, build_model, slot_loss

from .device_check_common import (FLOAT32_RTOL, CheckFailed, Section, Sizes, Skip, float32_exact, per_second,
                                  relative_error, timed, within)
from .device_check_train import AUTOCAST, model_section


# ----------------------------------------------------------------------------- importance
def importance_part(section: Section, sizes: Sizes, device: torch.device, reference: torch.device) -> None:
    """Per case of ``sizes.importance_cases``: Ω on ``device`` against ``reference``, and the
    exact against the batch estimator's speed on ``device`` (module docs)."""
    for name, backbone, frozen, image_size, count, compared, batch in sizes.importance_cases:
        def action(figures: dict[str, Any], backbone: str = backbone, frozen: bool = frozen, size: int = image_size,
                   count: int = count, compared: int = compared, batch: int = batch) -> None:
            if backbone not in BACKBONES:
                raise Skip(f"backbone {backbone} not available")
            torch.manual_seed(0)
            model = build_model(ModelConfig(**model_section(sizes, backbone, frozen=frozen)), sizes.slot_dim, size)
            images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(1))
            on_device = model.to(device)
            batches = list(images.to(device).split(batch))
            with float32_exact():
                omega = mas_importance(on_device, batches, max_samples=compared)
                expected = mas_importance(copy.deepcopy(model).to(reference), list(images[:compared].split(batch)))
            within(figures, "omega_rel_error", relative_error(omega, expected), FLOAT32_RTOL)
            mas_importance(on_device, batches[:1])    # warm-up: kernels, allocator
            exact_s, _ = timed(lambda: mas_importance(on_device, batches), device)
            batch_s, _ = timed(lambda: mas_importance(on_device, batches, mode="batch"), device)
            figures.update(samples=count, batch_size=batch, image_size=size, omega_parameters=len(omega),
                           exact_s=round(exact_s, 4), exact_samples_per_s=per_second(count, exact_s),
                           batch_mode_s=round(batch_s, 4), batch_mode_samples_per_s=per_second(count, batch_s),
                           exact_over_batch_time=round(exact_s / batch_s, 3) if batch_s > 0 else None)
        section.run(name, action)


# ----------------------------------------------------------------------------- retrieval
def retrieval_data(sizes: Sizes, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(queries, database)`` float32 unit rows (module docs: 1 % duplicates, 1/8 of queries in the database)."""
    rng = np.random.default_rng(seed)
    database = rng.standard_normal((sizes.database, sizes.dimension), dtype=np.float32)
    copies = max(1, sizes.database // 100)
    database[-copies:] = database[:copies]
    queries = rng.standard_normal((sizes.queries, sizes.dimension), dtype=np.float32)
    inside = sizes.queries // 8
    queries[:inside] = database[rng.choice(copies, inside)]   # rows that have a duplicate: a tie at the top
    return normalize_rows(queries), normalize_rows(database)


def device_exact_search(queries: Tensor, rows: Tensor, k: int, *, margin: int = RESCORE_MARGIN,
                        block_bytes: int = SCORE_BLOCK_BYTES) -> tuple[Tensor, Tensor, int]:
    """Exact k-NN of unit ``queries`` [q, d] in unit ``rows`` [n, d] on their device: float32
    candidates (k + margin) by :class:`TopKAccumulator`, re-scored in float64 by :func:`rescore`.
    Returns ``(scores float64 [q, k'], ids [q, k'], rows failing the completeness check)``."""
    count, dim = rows.shape
    k_eff = min(k, count)
    keep = min(count, k_eff + margin)
    slack = 2.0 * float32_dot_error_bound(dim)
    out_scores, out_ids, incomplete = [], [], 0
    for start in range(0, len(queries), QUERY_BLOCK):
        block = queries[start:start + QUERY_BLOCK]
        block_rows = min(count, max(keep, block_bytes // (4 * len(block))))
        buffer = torch.empty(len(block) * block_rows, dtype=torch.float32, device=rows.device)
        best = TopKAccumulator(block, keep, buffer, block_bytes=4 * len(block) * block_rows, gemm="torch")
        best.add(0, rows)
        assert best.scores is not None and best.ids is not None
        if keep < count:
            kth = torch.topk(best.scores, k_eff, dim=1).values[:, -1]
            incomplete += int((best.scores.min(dim=1).values >= kth - slack).sum())
        scores, ids = rescore(block, best.ids, rows, k_eff)
        out_scores.append(scores)
        out_ids.append(ids)
    return torch.cat(out_scores), torch.cat(out_ids), incomplete


def retrieval_part(section: Section, sizes: Sizes, device: torch.device) -> None:
    """The CPU reference, the torch search on ``device`` and FAISS on the GPU (module docs)."""
    queries, database = retrieval_data(sizes)
    k = sizes.k
    reference: dict[str, np.ndarray] = {}
    figures_common = {"database": sizes.database, "dimension": sizes.dimension, "queries": sizes.queries, "k": k}

    def cpu(figures: dict[str, Any]) -> None:
        index = build_index(database, use_gpu=False)
        seconds, (_, ids) = timed(lambda: index.search(queries, k), torch.device("cpu"))
        reference["ids"] = ids
        figures.update(figures_common, backend=index.exact_backend, search_s=round(seconds, 4),
                       queries_per_s=per_second(len(queries), seconds))

    def torch_device(figures: dict[str, Any]) -> None:
        if "ids" not in reference:
            raise Skip("no CPU reference")
        q, x = torch.from_numpy(queries).to(device), torch.from_numpy(database).to(device)
        with float32_exact():
            device_exact_search(q[:8], x, k)   # warm-up
            seconds, (_, ids, incomplete) = timed(lambda: device_exact_search(q, x, k), device)
        _compare_ids(figures, ids.cpu().numpy(), reference["ids"], "ids_equal_fraction")
        figures.update(figures_common, device=str(device), search_s=round(seconds, 4), incomplete_rows=incomplete,
                       queries_per_s=per_second(len(queries), seconds))

    def faiss_gpu(figures: dict[str, Any]) -> None:
        import faiss

        figures["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
        if not hasattr(faiss, "StandardGpuResources"):
            raise Skip("faiss-gpu not installed (pip install -e '.[gpu]')")
        if not gpu_available():
            raise Skip("faiss sees no GPU")
        if "ids" not in reference:
            raise Skip("no CPU reference")
        index = build_index(database, use_gpu=True)
        index.search(queries[:8], k)   # warm-up
        seconds, (_, raw) = timed(lambda: index.search(queries, k), device)
        figures.update(figures_common, backend=index.exact_backend, on_gpu=index.on_gpu, search_s=round(seconds, 4),
                       queries_per_s=per_second(len(queries), seconds))
        figures["float32_ids_equal_fraction"] = float((raw == reference["ids"]).all(axis=1).mean())
        _, wide = index.search(queries, k + RESCORE_MARGIN)
        _, ids = rescore(torch.from_numpy(queries), torch.from_numpy(wide), torch.from_numpy(database), k)
        _compare_ids(figures, ids.numpy(), reference["ids"], "ids_equal_fraction")

    for name, action in (("cpu_reference", cpu), ("torch_device", torch_device), ("faiss_gpu", faiss_gpu)):
        section.run(name, action)


def _compare_ids(figures: dict[str, Any], ids: np.ndarray, expected: np.ndarray, name: str) -> None:
    """``figures[name]``: the fraction of queries whose k ids (in order) equal the reference's; must be 1."""
    fraction = float((ids == expected).all(axis=1).mean()) if ids.shape == expected.shape else 0.0
    figures[name] = fraction
    if fraction != 1.0:
        raise CheckFailed(f"{name} = {fraction:.4f}: ids differ from the CPU reference after the float64 re-scoring")


# ----------------------------------------------------------------------------- throughput of the step
class _Pool:
    """``count`` training samples drawn from a pool of images already on the device (position
    ``i`` is pool image ``i mod pool``): the task loop's data, with no reading at all."""

    def __init__(self, images: Tensor, fact_ids: Tensor, count: int) -> None:
        self.images, self.fact_ids, self.count = images, fact_ids, int(count)

    def __len__(self) -> int:
        return self.count

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        for index in index_batches:
            index = index.to(self.images.device) % len(self.images)
            yield self.images[index], self.fact_ids[index]


class _StepExperiment:
    """What :func:`train_task_epochs` needs of an experiment: ``slot_loss`` on random targets."""

    task_names = ["throughput"]

    def __init__(self, targets: Tensor, masks: Tensor, dtype: torch.dtype | None) -> None:
        self.targets, self.masks, self.dtype = targets, masks, dtype

    def loss(self, module: nn.Module, batch: Any, task: int) -> Tensor:
        images, fact_ids = batch
        with torch.autocast(images.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            return slot_loss(module(images), self.targets[fact_ids], self.masks[fact_ids])


def throughput_part(section: Section, sizes: Sizes, device: torch.device) -> None:
    """Samples per second of the loop's training step per backbone and precision (module docs)."""
    size, batch, steps = sizes.step_image_size, sizes.step_batch, sizes.step_steps
    generator = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (min(256, batch * steps), 3, size, size), dtype=torch.uint8, generator=generator)
    facts = 64
    targets = torch.randn(facts, 3 * sizes.slot_dim, generator=generator)
    for backbone in sizes.step_backbones:
        for precision, dtype in AUTOCAST.items():
            def action(figures: dict[str, Any], backbone: str = backbone, dtype: torch.dtype | None = dtype) -> None:
                if backbone not in BACKBONES:
                    raise Skip(f"backbone {backbone} not available")
                torch.manual_seed(0)
                config = ModelConfig(**{**model_section(sizes, backbone), "freeze_trunk": False, "cache_features": False})
                model = build_model(config, sizes.slot_dim, size).to(device)
                experiment = _StepExperiment(targets.to(device), torch.ones(facts, 3, device=device), dtype)
                images, ids = pool.to(device), torch.arange(len(pool), device=device) % facts
                optim = OptimSettings(epochs=1, batch_size=batch, lr=0.001, momentum=0.9)
                reg = make_regularizer("finetune")

                def run(count: int) -> float:
                    model.train()
                    return train_task_epochs(experiment, model, model, _Pool(images, ids, count), 0, reg,
                                             EpochSettings(optim=optim, seed=0, device=device, label=backbone))
                run(2 * batch)   # warm-up: kernels, cuDNN's choice of algorithms, the allocator
                seconds, loss = timed(lambda: run(batch * steps), device)
                figures.update(image_size=size, batch_size=batch, steps=steps, seconds=round(seconds, 4),
                               samples_per_s=per_second(batch * steps, seconds), mean_loss=float(loss),
                               parameters=sum(p.numel() for p in model.parameters()))
                if not np.isfinite(figures["mean_loss"]):
                    raise CheckFailed(f"the mean training loss is {figures['mean_loss']}")
            section.run(f"{backbone}/{precision}", action)


__all__ = ["device_exact_search", "importance_part", "retrieval_data", "retrieval_part", "throughput_part"]
