"""``mas-triplets evaluate``: re-evaluate every method of a run and rewrite its report."""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="re-evaluate a run: top-1/5/10, MRR, R@K both ways, mAP@10 (standard and generalized)",
        description="Re-evaluate every trained method of a run folder on every task, in the standard and "
        "generalized modes; rewrite the 'final' entries of results.json, results.md and the plots, and print "
        "the comparison table.",
    )
    parser.add_argument("--run", required=True, help="run folder written by mas-triplets train")
    parser.add_argument("--device", default="cpu", help="torch device for the models (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    parser.add_argument("--stale-index", action="store_true",
                        help="also evaluate the stale index: the final model's queries against the test-region "
                        "embeddings saved after each task (needs a run trained with eval.stale_index: true; "
                        "default: as the run's config says)")
    parser.add_argument("--json", action="store_true", help="print the per-method summary as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import TripletsError
    from ..facts.evaluate import evaluate_run
    from ..report import comparison_table, summary_rows
    from ..facts.retrieval_report import stale_index_tables

    if args.batch_size < 1:
        raise TripletsError(f"--batch-size must be positive, got {args.batch_size}")
    results = evaluate_run(args.run, device=args.device, batch_size=args.batch_size,
                           stale_index=True if args.stale_index else None)
    if args.json:
        summary = {row.pop("method"): row for row in summary_rows(results)}
        for name, row in summary.items():
            row["final"] = results["methods"][name].get("final")
            for key in ("retrieval", "stale_index"):
                if key in results["methods"][name]:
                    row[key] = results["methods"][name][key]
        print(json.dumps({"run": str(args.run), "methods": summary}, indent=2))
    else:
        print(comparison_table(results))
        if args.stale_index:
            print(stale_index_tables(results))
        print(f"rewrote {args.run}/results.json, results.md and plots/")
    return 0
