"""``mas-triplets evaluate``: re-evaluate every method of a run and rewrite its report."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="re-evaluate a run: top-1/5/10, MRR (standard and generalized), fact → image mAP",
        description="Re-evaluate every trained method of a run folder on every task, in the standard and "
        "generalized modes; rewrite the 'final' entries of results.json, results.md and the plots, and print "
        "the comparison table.",
    )
    parser.add_argument("--run", required=True, help="run folder written by mas-triplets train")
    parser.add_argument("--device", default="cpu", help="torch device for the models (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    parser.add_argument("--json", action="store_true", help="print the per-method summary as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import TripletsError
    from ..evaluate import evaluate_run
    from ..report import comparison_table, summary_rows

    if args.batch_size < 1:
        raise TripletsError(f"--batch-size must be positive, got {args.batch_size}")
    results = evaluate_run(args.run, device=args.device, batch_size=args.batch_size)
    if args.json:
        summary = {row.pop("method"): row for row in summary_rows(results)}
        for name, row in summary.items():
            row["final"] = results["methods"][name].get("final")
        print(json.dumps({"run": str(args.run), "methods": summary}, indent=2))
    else:
        print(comparison_table(results))
        print(f"rewrote {args.run}/results.json, results.md and plots/")
    return 0
