"""The device check's distributed part: process groups on the device, in worker processes.

Every launch runs ``python -m benchmarks.device_check_dist MODE BACKEND DEVICE SIZES FACTS OUT`` once
per rank with the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), under a wall-clock limit after which the workers are killed.

* ``one`` (world size 1): the process group is initialised directly (the project treats a world
  of 1 as a single process, :func:`mas_core.distributed.current` is ``None``, so nothing of
  it would touch the backend). One SGD step of :class:`mas_core.distributed.LossModule` wrapped
  in DistributedDataParallel against the same step unwrapped (weights within
  ``FLOAT32_RTOL``), then Ω (:func:`mas_core.importance.mas_importance`) flattened into one
  float64 buffer as :func:`mas_core.distributed.all_reduce_sums` does and all-reduced (a sum
  over one rank: the buffer must come back unchanged).
* ``two`` (world size 2, both ranks on ``cuda:0`` when the device is a GPU, ``LOCAL_RANK=0``):
  :func:`mas_core.distributed.init_from_environment`, then two tasks of exact MAS through the
  project's loop (:func:`benchmarks.device_check_train.train_sequence`: DDP, the all-reduced loss,
  Ω on each rank's :class:`~mas_core.distributed.RankShard` summed by ``all_reduce_sums``).
  Rank 0 saves the weights and Ω; the parent compares them with the one-process run of the
  same config: weights within 1e-5 and Ω within 1e-4 relative (the tolerances of
  ``tests/test_distributed_train.py``; GroupNorm, so batch statistics do not differ by rank).
  NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): that launch is reported as
  skipped with NCCL's reason, and the same run over gloo (CUDA tensors) stands in for it.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .device_check_common import (DRY, FLOAT32_RTOL, GPU, CheckFailed, Section, Sizes, Skip, one_line, relative_error,
                                  within)

REPO = Path(__file__).resolve().parents[1]
WEIGHT_TOLERANCE, IMPORTANCE_RTOL = 1e-5, 1e-4   # two processes against one (tests/test_distributed_train.py)
GRACE_S = 5.0   # seconds the other ranks get to exit once one has failed (it may wait in a collective forever)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Launch:
    """``world`` worker processes started now (module docs); :meth:`wait` collects them."""

    def __init__(self, mode: str, backend: str, world: int, device: torch.device, sizes_name: str, fact_file: Path,
                 out: Path, logs: Path) -> None:
        port = _free_port()
        self.started = time.perf_counter()
        self.processes, self.logs = [], []
        self.result: tuple[int, str, float] | None = None
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            log = open(logs / f"{mode}-{backend}-rank{rank}.log", "w+")   # noqa: SIM115 - closed in wait()
            self.logs.append(log)
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.device_check_dist", mode, backend, str(device), sizes_name,
                 str(fact_file), str(out)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))

    def wait(self, timeout: float) -> tuple[int, str, float]:
        """Wait until every rank has exited or ``timeout`` seconds after the start (then kill what
        still runs; once a rank has failed, the others get :data:`GRACE_S` more to exit). Returns
        ``(worst exit status (124: killed on time), every rank's output, seconds)``; a second call
        returns the first one's answer."""
        if self.result is not None:
            return self.result
        deadline = self.started + timeout
        try:
            while time.perf_counter() < deadline and any(process.poll() is None for process in self.processes):
                if any(process.poll() not in (None, 0) for process in self.processes):
                    deadline = min(deadline, time.perf_counter() + GRACE_S)
                time.sleep(0.1)
        finally:
            codes = []
            for process in self.processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    codes.append(124)
                else:
                    codes.append(process.returncode)
            outputs = []
            for log in self.logs:
                log.seek(0)
                outputs.append(log.read())
                log.close()
        failed = [code for code in codes if code != 0]
        self.result = (failed[0] if failed else 0), "\n".join(outputs), round(time.perf_counter() - self.started, 3)
        return self.result


def distributed_part(section: Section, sizes: Sizes, device: torch.device, fact_file: Path, workdir: Path) -> None:
    """World size 1 on the device's backend and two processes, launched together, then two
    processes over gloo on the GPU where NCCL is the backend (module docs)."""
    from .device_check_train import check_config, model_section, train_sequence

    sizes_name = "dry" if sizes is DRY else "gpu"
    backend = "nccl" if device.type == "cuda" else "gloo"
    logs = workdir / "distributed-logs"
    logs.mkdir(parents=True, exist_ok=True)
    if backend == "nccl" and not torch.distributed.is_nccl_available():
        raise Skip("this torch build has no NCCL")
    one = Launch("one", backend, 1, device, sizes_name, fact_file, workdir / "world1.json", logs)
    two = Launch("two", backend, 2, device, sizes_name, fact_file, workdir / f"world2-{backend}.pt", logs)
    reference: dict[str, Any] = {}

    def world_one(figures: dict[str, Any]) -> None:
        status, output, seconds = one.wait(min(60.0, section.budget.left()))
        figures.update(backend=backend, launch_s=seconds)
        if status != 0:
            raise CheckFailed(f"worker exited with {status}: {_last_error(output)}")
        report = json.loads((workdir / "world1.json").read_text())
        figures.update(report)
        within(figures, "ddp_step_weights_rel_error", report["ddp_step_weights_rel_error"], FLOAT32_RTOL)
        if report["all_reduce_rel_error"] != 0.0:
            raise CheckFailed(f"the all-reduce over one rank changed Ω by {report['all_reduce_rel_error']:.3g}")

    def world_two(figures: dict[str, Any], launch: Launch, backend: str) -> None:
        if "run" not in reference:   # the one-process run of the same config, while the workers start
            config = check_config(fact_file, sizes, model_section(sizes, "small_cnn", norm="group"), device, epochs=1)
            reference["run"] = train_sequence(config, device, workdir / "world2-reference")
        status, output, seconds = launch.wait(min(90.0, section.budget.left()))
        figures.update(backend=backend, launch_s=seconds)
        if status != 0:
            if "Duplicate GPU" in output:
                raise Skip(f"NCCL refuses two ranks on one GPU ({_last_error(output)})")
            raise CheckFailed(f"workers exited with {status}: {_last_error(output)}")
        result = torch.load(workdir / f"world2-{backend}.pt", map_location="cpu", weights_only=True)
        figures["train_s"] = result["train_s"]
        run = reference["run"]
        within(figures, "weights_rel_error", relative_error(result["model"], run["model"].state_dict()),
               WEIGHT_TOLERANCE)
        within(figures, "omega_rel_error", relative_error(result["omega"], run["reg"].importance), IMPORTANCE_RTOL)

    launches = [one, two]
    try:
        section.run(f"world2_{backend}", lambda figures: world_two(figures, two, backend))
        section.run(f"world1_{backend}", world_one)
        if backend == "nccl" and section.budget.left() > 0:
            launches.append(Launch("two", "gloo", 2, device, sizes_name, fact_file, workdir / "world2-gloo.pt", logs))
            section.run("world2_gloo_on_cuda", lambda figures: world_two(figures, launches[-1], "gloo"))
    finally:
        for launch in launches:   # a sub-part skipped for its budget never waited: stop its workers
            launch.wait(0.0)


def _last_error(output: str) -> str:
    """The most telling line of the workers' output: NCCL's "Duplicate GPU" line, else the last
    line naming an error, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = ([line for line in lines if "Duplicate GPU" in line]
              or [line for line in lines if "Error" in line or "error" in line])
    return (errors or lines or ["no output"])[-1][:300]


# ----------------------------------------------------------------------------- the worker
def _world_one(backend: str, device: torch.device, sizes: Sizes) -> dict[str, Any]:
    import copy

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mas_core.distributed import LossModule
    from mas_core.importance import mas_importance
    from triplets.facts.model import ModelConfig, build_model, slot_loss

    from .device_check_train import model_section

    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        size = sizes.image_size
        model = build_model(ModelConfig(**model_section(sizes, "small_cnn", norm="group")), sizes.slot_dim, size)
        model = model.to(device)
        images = torch.rand(sizes.batch_size, 3, size, size, device=device)
        targets = torch.randn(sizes.batch_size, 3 * sizes.slot_dim, device=device)
        masks = torch.ones(sizes.batch_size, 3, device=device)

        def loss_fn(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return slot_loss(module(x), targets, masks)

        plain = copy.deepcopy(model)
        stepped = []
        for module in (LossModule(plain, loss_fn), DistributedDataParallel(
                LossModule(model, loss_fn), device_ids=[device.index or 0] if device.type == "cuda" else None)):
            optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
            module(images).backward()
            optimizer.step()
            stepped.append(module)
        omega = mas_importance(model, list(images.split(max(1, sizes.batch_size // 2))))
        flat = torch.cat([value.reshape(-1).double() for value in omega.values()] + [
            torch.tensor([float(sizes.batch_size)], dtype=torch.float64, device=device)])
        sent = flat.clone()
        started = time.perf_counter()
        dist.all_reduce(flat)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"ddp_step_weights_rel_error": relative_error(model.state_dict(), plain.state_dict()),
                "all_reduce_rel_error": relative_error(flat, sent), "all_reduce_values": int(flat.numel()),
                "all_reduce_s": round(time.perf_counter() - started, 4), "world_size": dist.get_world_size()}
    finally:
        dist.destroy_process_group()


def _world_two(backend: str, device: torch.device, sizes: Sizes, fact_file: Path, out: Path) -> None:
    from mas_core.distributed import init_from_environment, is_main_process, leave_process_group

    from .device_check_train import check_config, model_section, train_sequence

    info = init_from_environment(device, backend=backend, timeout_minutes=1.5)
    if info is None or info.world_size != 2:
        raise CheckFailed(f"expected a process group of 2, got {info}")
    try:
        config = check_config(fact_file, sizes, model_section(sizes, "small_cnn", norm="group"), device, epochs=1)
        started = time.perf_counter()
        result = train_sequence(config, device, out.parent / f"world2-{backend}-run")
        seconds = time.perf_counter() - started
        if is_main_process():
            torch.save({"model": {k: v.cpu() for k, v in result["model"].state_dict().items()},
                        "omega": {k: v.cpu() for k, v in result["reg"].importance.items()},
                        "train_s": round(seconds, 3)}, out)
    except Exception:
        leave_process_group(wait=False)
        raise
    leave_process_group()


def main(argv: list[str]) -> int:
    """The worker's entry point (module docs)."""
    mode, backend, device_name, sizes_name, fact_file, out = argv
    torch.set_num_threads(1)
    device = torch.device(device_name)
    sizes = DRY if sizes_name == "dry" else GPU
    try:
        if mode == "one":
            Path(out).write_text(json.dumps(_world_one(backend, device, sizes)))
        else:
            _world_two(backend, device, sizes, Path(fact_file), Path(out))
    except Exception as exc:
        print(f"device check worker (rank {os.environ.get('RANK')}): {one_line(exc)}", file=sys.stderr)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
