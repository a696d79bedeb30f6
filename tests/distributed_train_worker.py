"""Test helper: ``mas-triplets`` whose rank 0 dies right after one checkpoint (a killed job).

Launched by tests/test_distributed_train.py as
``python -m torch.distributed.run --nproc_per_node=2 tests/distributed_train_worker.py METHOD:TASKS train ...``:
the process that writes ``RUN/METHOD/checkpoint.pt`` with ``completed_tasks == TASKS`` leaves
at once with ``os._exit(137)`` (no cleanup, like ``kill -9``); ``torchrun`` then stops the
other ranks and fails. Everything else is the ordinary command line (:func:`triplets.cli.main`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def _die_after(method: str, finished_tasks: int) -> None:
    import mas_core.loop as train_module

    real_save = train_module.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if Path(path).parent.name == method and state.get("completed_tasks") == finished_tasks:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(137)

    train_module.save_checkpoint = save_then_die


if __name__ == "__main__":
    spec, *command = sys.argv[1:]
    method, _, tasks = spec.partition(":")
    _die_after(method, int(tasks))
    from triplets.cli import main

    sys.exit(main(command))
