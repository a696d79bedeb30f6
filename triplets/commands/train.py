"""``mas-triplets train``: learn the fact embedding task by task with the methods of a config."""
from __future__ import annotations

import argparse

from mas_core.distributed import process_group_session, same_on_every_rank

from ..errors import ConfigError
from ..run_folder import check_output_folder
from ..run_log import RunComforts, check_log_option
from ..facts.train import resolve_device, train_run
from ..facts.train_config import load_train_config, select_methods
from .arguments import add_log_option, diverged_exit_status


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train the fact embedding task by task (finetune, joint, MAS, EWC, SI, LwF, ...)",
        description="Train every method of a YAML config on the fact file's tasks, in order, into a run "
        "folder (checkpoints after every task, results.json, results.md, plots, FAISS indexes).",
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for sections (e.g. optim.lr=0.01); repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run after its last finished task (same config required)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names (labels) of the config to train, e.g. finetune,mas")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or per-task lines")
    parser.add_argument("--stop-after-task", type=int, default=None, metavar="K",
                        help="train the first K tasks only (the model after task K is saved and can be queried); "
                        "continue later with --resume (online_importance in the config: docs/method.md §12)")
    add_log_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Read the config, join ``torchrun``'s process group when launched by it (the config's
    device picks gloo or nccl), train, and print the summary (rank 0 only). Exit status 1 when a
    method diverged (listed with its error; the others trained, :mod:`triplets.runner`). Ctrl-C:
    exit status 130 after the current batch, with the ``--resume`` command
    (:class:`triplets.run_log.RunComforts`)."""
    with same_on_every_rank():  # read by every rank alike: rank 0 alone reports a bad config
        check_log_option(args.log)  # an extra that is not installed: one line before any work
        config = load_train_config(args.config, args.overrides)
        if args.methods:
            config = select_methods(config, [name.strip() for name in args.methods.split(",") if name.strip()])
        device = resolve_device(config.device)
        if args.stop_after_task is not None and args.stop_after_task < 1:
            raise ConfigError(f"--stop-after-task must be a positive number of tasks, got {args.stop_after_task}")
        check_output_folder(args.out, "facts", resume=args.resume)  # before any work: nothing is written on refusal
    with process_group_session(device) as info:
        main = info is None or info.is_main
        with RunComforts(args.out, log=args.log, command_line=args.command_line, main=main) as comforts:
            results = train_run(config, args.out, resume=args.resume, progress=not args.no_progress,
                                stop_after_task=args.stop_after_task, hooks=comforts.hooks)
    if comforts.interrupted:
        return comforts.exit_code
    if info is None or info.is_main:
        print(format_summary(results))
        print(f"run folder: {args.out} (results.json, results.md, plots/)")
        return diverged_exit_status(results, "train")
    return 1 if results.get("diverged") else 0


def format_summary(results: dict) -> str:
    """A plain-text table: method, average top-5, forgetting, BWT (fractions shown as %)."""
    lines = [f"{'method':<16} {'avg top-5':>10} {'forgetting':>11} {'BWT':>8}"]
    for name, entry in results.get("methods", {}).items():
        lines.append(f"{name:<16} {100 * entry['avg_acc']:>9.1f}% {100 * entry['forgetting']:>10.1f}% "
                     f"{100 * entry['bwt']:>7.1f}%")
    return "\n".join(lines)
