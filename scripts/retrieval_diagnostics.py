"""Why a method's fact → image mAP differs from another's: the test-region embeddings and the fact
vectors of a finished run, measured the ways that separate the two retrieval directions.

    python scripts/retrieval_diagnostics.py RUN --methods finetune,mas [--json out.json]

Per method, over every task's test regions (standard mode: each task's own regions and facts):

- ``map`` / ``mrr``: fact → image mAP and image → fact MRR, as ``results.json`` has them;
- ``slot_share``: the mean share of a unit region embedding's squared norm in each slot (S, P, O);
- ``mean_cosine``: the mean cosine between two regions of different facts (1: every region points
  the same way, the rankings of fact → image then rest on small differences);
- ``within_minus_between``: mean cosine of two regions of one fact minus ``mean_cosine``;
- ``hub_share_top1pc``: the share of all facts' top-10 region lists held by the 1 % of regions
  that appear in the most lists (hubness; 0.01 when no region is a hub), and ``n10_skewness``, the
  skewness of that count N₁₀ (Radovanović et al., JMLR 2010);
- ``ap_by_positives``: mean per-fact AP for facts with 1, 2–4, 5–19 and ≥ 20 test regions;
- ``strict_mrr_regions`` / ``strict_mrr_facts`` / ``strict_mrr_rarest_half``: image → fact MRR with
  only the true fact a hit (no Sherlock group), averaged over the regions (as ``mrr``), over the
  facts (each fact's mean over its regions: every fact counts once, as in mAP), and over the rarer
  half of the facts;
- ``map_masked`` / ``map_csls`` / ``map_zscored``: fact → image mAP with three corrections of a
  per-region bias: the cosine over the fact's present slots only; CSLS, ``2·cos − r_x`` with ``r_x``
  the region's mean cosine with its 10 nearest facts; each region's scores z-scored over the facts;
- ``top1_on_frequent_facts``: the share of regions whose top-ranked fact is one of the 10 % of facts
  most often ranked first (1.0: every region answered with a few facts).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from triplets.facts.evaluate import candidate_facts, embed_images, evaluate_embeddings, fact_table
from triplets.facts.retrieval_metrics import average_precision
from triplets.facts.data import fact_image_dataset
from triplets.run_folder import load_run

BINS = ((1, 1), (2, 4), (5, 19), (20, None))


def diagnose(model, fact_file, num_tasks: int, *, seed: int = 0) -> dict:
    """The figures of the module docs for one trained model (see there)."""
    table = fact_table(fact_file)
    rng = np.random.default_rng(seed)
    totals = {"map": [], "mrr": [], "slot_share": [], "mean_cosine": [], "within": [], "n10": [], "ap": [],
              "positives": [], "rr_regions": [], "rr_facts": [], "rr_rare": [], "top1_frequent": [],
              "masked": [], "csls": [], "zscored": []}
    slot_mask = np.asarray(fact_file.slot_masks, dtype=np.float32)
    for task in range(num_tasks):
        images, truth = embed_images(model, fact_image_dataset(fact_file, task, "test"))
        metrics = evaluate_embeddings(images, truth, fact_file, task, mode="standard")
        totals["map"].append(metrics["map"])
        totals["mrr"].append(metrics["mrr"])
        d = images.shape[1] // 3
        totals["slot_share"].append([(images[:, k * d:(k + 1) * d] ** 2).sum(1).mean() for k in range(3)])
        pairs = rng.integers(0, len(images), size=(20000, 2))
        cos = (images[pairs[:, 0]] * images[pairs[:, 1]]).sum(1)
        same = truth[pairs[:, 0]] == truth[pairs[:, 1]]
        totals["mean_cosine"].append(float(cos[~same].mean()))
        totals["within"].append(float(cos[same].mean()) if same.any() else float("nan"))
        facts = np.intersect1d(candidate_facts(fact_file, task, "standard"), truth)
        scores = table.unit_rows(facts) @ images.T                         # [facts, regions]
        top = np.argsort(-scores, axis=1)[:, :10]
        totals["n10"].append(np.bincount(top.ravel(), minlength=len(images)))
        labels = truth[None, :] == facts[:, None]
        totals["ap"].append(average_precision(scores, labels))
        totals["positives"].append(labels.sum(1))
        candidates = candidate_facts(fact_file, task, "standard")
        ranked = table.unit_rows(candidates) @ images.T                     # [candidates, regions]
        own = ranked[np.searchsorted(candidates, truth), np.arange(len(truth))]
        reciprocal = 1.0 / (1 + (ranked > own[None, :]).sum(0))
        ids, inverse, counts = np.unique(truth, return_inverse=True, return_counts=True)
        per_fact = np.bincount(inverse, weights=reciprocal) / counts
        totals["rr_regions"].append(reciprocal.mean())
        totals["rr_facts"].append(per_fact.mean())
        totals["rr_rare"].append(per_fact[np.argsort(-counts, kind="stable")[len(ids) - len(ids) // 2:]].mean())
        first = np.bincount(ranked.argmax(0), minlength=len(candidates))
        present = np.repeat(slot_mask[facts], d, axis=1)                     # [facts, D]: the fact's slots
        totals["masked"].append(average_precision(scores / np.sqrt(np.maximum(present @ (images ** 2).T, 1e-12)),
                                                  labels))
        nearest = np.sort(ranked, axis=0)[-10:].mean(0)
        totals["csls"].append(average_precision(2 * scores - nearest[None, :], labels))
        rows = np.searchsorted(candidates, facts)
        totals["zscored"].append(average_precision(((ranked - ranked.mean(0)) / ranked.std(0))[rows], labels))
        totals["top1_frequent"].append(np.sort(first)[::-1][:max(1, len(candidates) // 10)].sum() / len(truth))
    n10 = np.concatenate(totals["n10"]).astype(np.float64)
    ordered = np.sort(n10)[::-1]
    top_count = max(1, len(ordered) // 100)
    ap, positives = np.concatenate(totals["ap"]), np.concatenate(totals["positives"])
    by_positives = {}
    for low, high in BINS:
        keep = (positives >= low) & (positives <= (high if high is not None else np.inf))
        name = f"{low}" if low == high else (f"{low}-{high}" if high is not None else f">={low}")
        by_positives[name] = {"facts": int(keep.sum()), "mean_ap": float(ap[keep].mean()) if keep.any() else None}
    within = float(np.nanmean(totals["within"]))
    return {
        "map": float(np.mean(totals["map"])), "mrr": float(np.mean(totals["mrr"])),
        "slot_share": [float(v) for v in np.mean(totals["slot_share"], axis=0)],
        "mean_cosine": float(np.mean(totals["mean_cosine"])),
        "within_minus_between": within - float(np.mean(totals["mean_cosine"])),
        "hub_share_top1pc": float(ordered[:top_count].sum() / ordered.sum()),
        "n10_skewness": float(((n10 - n10.mean()) ** 3).mean() / n10.std() ** 3),
        "ap_by_positives": by_positives,
        "map_per_task": [float(v) for v in totals["map"]],
        "strict_mrr_regions": float(np.mean(totals["rr_regions"])),
        "strict_mrr_facts": float(np.mean(totals["rr_facts"])),
        "strict_mrr_rarest_half": float(np.mean(totals["rr_rare"])),
        "top1_on_frequent_facts": float(np.mean(totals["top1_frequent"])),
        **{f"map_{key}": float(np.mean(np.concatenate(totals[key]))) for key in ("masked", "csls", "zscored")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished run folder (mas-triplets train --out RUN)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every method)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    figures = {}
    with load_run(args.run) as run:
        methods = args.methods.split(",") if args.methods else list(run.methods)
        for method in methods:
            figures[method] = diagnose(run.load_model(method), run.fact_file, int(run.fact_file.num_tasks))
            print(method, json.dumps(figures[method]), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
