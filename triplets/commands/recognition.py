"""``mas-triplets recognition``: train an object-recognition task sequence once per method
and write results.json, results.md and bar plots into the run folder (see
:mod:`triplets.recognition.run`)."""
from __future__ import annotations

import argparse
from typing import Any

from mas_core.distributed import process_group_session, same_on_every_rank

from ..recognition.run import run_recognition
from ..recognition.config import load_recognition_config
from ..report import recognition_markdown
from ..run_folder import check_output_folder
from ..run_log import RunComforts, check_log_option
from .arguments import add_log_option, diverged_exit_status


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``recognition`` subcommand."""
    parser = subparsers.add_parser(
        "recognition", help="train a multi-head recognition task sequence with each continual-learning method",
        description="Train the task sequence of CONFIG once per method (same seeds), evaluate every task after "
        "every task, and write OUT/results.json, OUT/results.md and OUT/plots/*.png.")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/recognition_offline.yaml")
    parser.add_argument("--out", required=True, help="run folder to create, new or empty (checkpoints per method under "
                        "OUT/<method>/); an existing run is continued with --resume, never replaced")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (default: the config's), e.g. finetune,lwf,ebll,imm,ewc,si,"
                        "mas,lmas,joint; 'mas@test' estimates importance on the unlabeled test inputs")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: finished methods are loaded, the others resume "
                        "from their last task checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted for nested keys, e.g. train.epochs=2); repeatable")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress on stderr")
    add_log_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the config, run every method, print the results table; exit status 1 when a method
    diverged (the others' results are written, the diverged ones listed); 130 after a Ctrl-C, with the
    ``--resume`` command (:class:`triplets.run_log.RunComforts`)."""
    with same_on_every_rank():  # read by every rank alike: rank 0 alone reports a bad config
        check_log_option(args.log)  # an extra that is not installed: one line before any work
        config = load_recognition_config(args.config, args.overrides)
        check_output_folder(args.out, "recognition", resume=args.resume)  # before any work (nothing written)
    methods = None
    if args.methods:
        methods = [item.strip() for item in args.methods.split(",") if item.strip()]
    # under torchrun: gloo for a CPU train.device, nccl for cuda (every rank its LOCAL_RANK's GPU)
    with process_group_session(config.train.device) as info:
        main = info is None or info.is_main
        with RunComforts(args.out, log=args.log, command_line=args.command_line, main=main,
                         command="recognition") as comforts:
            results = run_recognition(config, args.out, methods=methods, resume=args.resume, progress=not args.quiet,
                                      hooks=comforts.hooks)
    if comforts.interrupted:
        return comforts.exit_code
    if info is None or info.is_main:
        print(recognition_markdown(results), end="")
        print(f"\nwritten: {args.out}/results.json, {args.out}/results.md, {args.out}/plots/")
        return diverged_exit_status(results, "recognition")
    return 1 if results.get("diverged") else 0
