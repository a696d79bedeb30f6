"""The device check: one command that proves the CUDA paths of the project on one GPU in minutes.

Run (on a machine with one CUDA GPU; at most 8 minutes)::

    python benchmarks/device_check.py --out docs/device_check_<gpu>.json
    python benchmarks/device_check.py --dry-run --out /tmp/device_check.json   # every part on the CPU, tiny

It writes one JSON report (``--out``, default ``device_check.json``) and prints a short table.
Parts, each with a wall-clock budget (seconds, :data:`~benchmarks.device_check_common.BUDGETS`),
each sub-part ``ok``, ``skipped (why)`` or ``failed (one line)`` in its own ``try``/``except``:

* ``environment``: device name, memory, capability, driver (``nvidia-smi``), torch, CUDA, cuDNN,
  NCCL and faiss versions, faiss's GPU count;
* ``training`` (:mod:`benchmarks.device_check_train`): the fact embedding trained a few hundred
  steps with exact MAS by the project's task loop on a synthetic fact file: small CNN, resnet18
  (``weights: null``) and the pretrained ``efficientnet_lite0`` (skipped while
  ``triplets.facts.model.BACKBONES`` lacks it), trunk frozen and features cached or not, float32 then bf16
  autocast; every loss finite; plus ``train_run`` end to end;
* ``equality``: a fixed tiny case on the CPU and on the device, TF32 off: losses, weights and Ω
  within ``FLOAT32_RTOL`` (1e-4) relative;
* ``importance``, ``retrieval``, ``throughput`` (:mod:`benchmarks.device_check_compute`): exact
  Ω device vs CPU and its speed against the batch estimator; exact retrieval on the device
  (torch, FAISS on the GPU with faiss-gpu) against the CPU path, ids equal after the float64
  re-scoring; the training step's samples per second per backbone at 224 px;
* ``distributed`` (:mod:`benchmarks.device_check_dist`): an NCCL process group of world size 1
  (one DDP step, the importance all-reduce), then two processes sharing the GPU.

``--dry-run`` runs every part on the CPU with tiny sizes (gloo for NCCL; the "device against
CPU" comparisons compare the CPU with itself), which ``tests/test_device_check.py`` does so that
the script cannot rot between uses. Exit status: 0 when no part failed, 1 when one did, 2 when
there is no CUDA device (and no ``--dry-run``). The report's figures: ``docs/benchmarks.md``,
section "The device check".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
FORMAT = "mas-triplets-device-check"
TOTAL_BUDGET_S = 480.0
PARTS = ("environment", "training", "equality", "importance", "retrieval", "distributed", "throughput")
SUMMARY_KEYS = ("step_samples_per_s", "samples_per_s", "exact_samples_per_s", "batch_mode_samples_per_s",
                "queries_per_s", "ids_equal_fraction", "loss_rel_error", "weights_rel_error", "omega_rel_error",
                "ddp_step_weights_rel_error", "loss_last", "avg_acc", "device_name")


def environment(device: Any, dry_run: bool) -> dict[str, Any]:
    """Versions and the device: what a figure of the report holds for."""
    import faiss
    import torch

    info: dict[str, Any] = {
        "dry_run": dry_run, "device": str(device), "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "faiss": getattr(faiss, "__version__", None), "faiss_gpu_build": hasattr(faiss, "StandardGpuResources"),
        "faiss_gpus": int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0,
        "torch_threads": torch.get_num_threads(),
        "tf32_defaults": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device_name=properties.name, device_memory_bytes=int(properties.total_memory),
                    capability=f"{properties.major}.{properties.minor}",
                    nccl=_nccl_version())
    else:
        info["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15)
            info["nvidia_smi"] = smi.stdout.strip().splitlines()
            info["driver"] = info["nvidia_smi"][0].split(",")[1].strip() if info["nvidia_smi"] else None
        except (OSError, subprocess.SubprocessError, IndexError) as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    return info


def _nccl_version() -> str | None:
    import torch

    if not torch.distributed.is_nccl_available():
        return None
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def run_check(out: Path, *, dry_run: bool, workdir: Path, total_budget: float = TOTAL_BUDGET_S,
              only: list[str] | None = None) -> dict[str, Any]:
    """Run every part (or those named in ``only``) and write the report to ``out``; returns it."""
    import torch

    from benchmarks.device_check_common import DRY, GPU, FAILED, SKIPPED, Budget, Section, one_line
    from benchmarks.device_check_compute import importance_part, retrieval_part, throughput_part
    from benchmarks.device_check_dist import distributed_part
    from benchmarks.device_check_train import equality_part, training_part, write_check_fact_file

    sizes = DRY if dry_run else GPU
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    reference = torch.device("cpu")
    started = time.perf_counter()
    overall = Budget(total_budget if not dry_run else sum(sizes.budgets.values()))
    facts: dict[str, Path] = {}

    def fact_file() -> Path:
        if "path" not in facts:
            facts["path"] = write_check_fact_file(workdir / "facts.h5", sizes)
        return facts["path"]

    def versions(section: Section) -> None:
        section.run("versions", lambda figures: figures.update(environment(device, dry_run)))

    parts: dict[str, Callable[[Section], None]] = {
        "environment": versions,
        "training": lambda section: training_part(section, sizes, device, fact_file(), workdir),
        "equality": lambda section: equality_part(section, sizes, device, reference, workdir),
        "importance": lambda section: importance_part(section, sizes, device, reference),
        "retrieval": lambda section: retrieval_part(section, sizes, device),
        "distributed": lambda section: distributed_part(section, sizes, device, fact_file(), workdir),
        "throughput": lambda section: throughput_part(section, sizes, device),
    }
    assert tuple(parts) == PARTS
    report: dict[str, Any] = {"format": FORMAT, "version": 1, "command": " ".join(sys.argv),
                              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": dry_run,
                              "float32_rtol": None, "parts": {}}
    for name, action in parts.items():
        if only and name not in only:
            continue
        section = Section(Budget(sizes.budgets[name], until=overall.deadline), device)
        part_started = time.perf_counter()
        try:
            action(section)
        except Exception as exc:  # noqa: BLE001 - the set-up of a part failed; the others still run
            section.subparts["setup"] = {"status": FAILED, "reason": one_line(exc), "wall_s": 0.0}
        status, reason = section.status()
        peaks = [record["gpu_memory_peak_bytes"] for record in section.subparts.values()
                 if "gpu_memory_peak_bytes" in record]
        report["parts"][name] = {
            "status": status, "reason": reason, "summary": status if reason is None else f"{status} ({reason})",
            "wall_s": round(time.perf_counter() - part_started, 3), "budget_s": sizes.budgets[name],
            "gpu_memory_peak_bytes": max(peaks) if peaks else None, "subparts": section.subparts}
        if status == SKIPPED and reason is None:
            report["parts"][name]["summary"] = "skipped"
    from benchmarks.device_check_common import FLOAT32_RTOL

    report["float32_rtol"] = FLOAT32_RTOL
    report["environment"] = report["parts"].get("environment", {}).get("subparts", {}).get("versions", {})
    report["throughput"] = throughput_summary(report["parts"])
    report["wall_s"] = round(time.perf_counter() - started, 3)
    report["failed_parts"] = [name for name, part in report["parts"].items() if part["status"] == FAILED]
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(json.dumps(_finite_or_none(report), indent=1, sort_keys=False) + "\n")
    temporary.replace(out)
    return report


def throughput_summary(parts: dict[str, Any]) -> dict[str, Any]:
    """The speed figures of every part in one place (samples or queries per second, bytes)."""
    def collect(part: str, key: str) -> dict[str, Any]:
        subparts = parts.get(part, {}).get("subparts", {})
        return {name: record[key] for name, record in subparts.items() if record.get("status") == "ok" and key in record}

    peaks = [part.get("gpu_memory_peak_bytes") for part in parts.values() if part.get("gpu_memory_peak_bytes")]
    return {
        "training_step_samples_per_s": collect("throughput", "samples_per_s"),
        "training_loop_step_samples_per_s": collect("training", "step_samples_per_s"),
        "training_loop_samples_per_s": collect("training", "train_samples_per_s"),
        "omega_exact_samples_per_s": collect("importance", "exact_samples_per_s"),
        "omega_batch_mode_samples_per_s": collect("importance", "batch_mode_samples_per_s"),
        "retrieval_queries_per_s": collect("retrieval", "queries_per_s"),
        "gpu_memory_peak_bytes": max(peaks) if peaks else None,
    }


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: such floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def table(report: dict[str, Any]) -> str:
    """The short table printed at the end: one row per part and per sub-part."""
    env = report.get("environment", {})
    lines = [f"device check{' (dry run)' if report['dry_run'] else ''}: {env.get('device_name')}, "
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, faiss {env.get('faiss')} "
             f"({env.get('faiss_gpus')} GPUs), {report['wall_s']:.0f} s",
             f"{'part':34} {'status':8} {'wall s':>7}  figures"]
    for name, part in report["parts"].items():
        lines.append(f"{name:34} {part['status']:8} {part['wall_s']:7.1f}")
        for sub, record in part["subparts"].items():
            if name == "environment":
                continue
            detail = record["reason"] if record["status"] != "ok" else ", ".join(
                f"{key}={_short(record[key])}" for key in SUMMARY_KEYS if key in record)
            lines.append(f"  {sub:32} {record['status']:8} {record['wall_s']:7.1f}  {detail}")
    lines.append(f"report: {report.get('out')}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("device_check.json"), help="the JSON report")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny sizes")
    parser.add_argument("--only", nargs="+", metavar="PART", choices=PARTS,
                        help=f"run only these parts, of: {' '.join(PARTS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (dry run default: 1)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the working files in this folder")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("device_check: no CUDA device was found (torch.cuda.is_available() is False); "
              "run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    if args.threads or args.dry_run:
        torch.set_num_threads(args.threads or 1)
    with tempfile.TemporaryDirectory(prefix="device-check-") as scratch:
        workdir = args.keep or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        report = run_check(args.out, dry_run=args.dry_run, workdir=workdir, only=args.only)
    report["out"] = str(args.out)
    print(table(report))
    return 1 if report["failed_parts"] else 0


if __name__ == "__main__":
    sys.exit(main())
