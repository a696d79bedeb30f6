"""``mas-triplets query``: image → facts, or text → images and facts, against a trained run."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "query",
        help="query a trained run: an image region → facts, or a fact text → test images and facts",
        description="Rank the known facts for an image region (--image, optional --box), or the test images "
        "and known facts for a fact given as text (--text 'man|riding|horse', '<man, riding, horse>' or "
        "'man riding horse'; unseen facts work: the text is embedded by the run's text encoder).",
    )
    parser.add_argument("--run", required=True, help="run folder written by mas-triplets train")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="image file (PNG, JPEG, ...)")
    what.add_argument("--text", help="a fact: 'S|P|O', 'S|P', 'S', '<S, P, O>' or a phrase 'man riding horse'")
    parser.add_argument("--box", help="region of --image as x,y,w,h in pixels (default: the whole image)")
    parser.add_argument("--k", type=int, default=10, help="results to return (default: 10)")
    parser.add_argument("--method", help="trained method to query (default: mas if trained, else the first)")
    parser.add_argument("--encoder", help="text encoder spec (default: the one that prepared the fact file)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--accumulate-importance", action="store_true",
                        help="add this image query's MAS importance to RUN/<method>/online_importance.pt, for "
                        "training the next task (online_importance in the train config; docs/method.md §12)")
    parser.add_argument("--show", metavar="FILE.png", help="also draw the answer: a contact sheet of the retrieved "
                        "regions (text query) or the image with its box and facts (image query); at most the "
                        "first 50 regions and 40 facts are drawn, whatever --k")
    return parser


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(header[c]), *(len(row[c]) for row in rows)) if rows else len(header[c]) for c in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _fact_rows(hits: list[dict]) -> list[list[str]]:
    return [[str(rank), hit["fact_text"], f"{hit['score']:.4f}"] for rank, hit in enumerate(hits, start=1)]


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import TripletsError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a text encoder is only ever read from local files
    from ..query.engine import open_query, parse_box
    from ..query.online_importance import check_accumulate_flags, record_image_queries

    if args.k < 1:
        raise TripletsError(f"--k must be a positive integer, got {args.k}")
    if args.box is not None and args.image is None:
        raise TripletsError("--box applies to --image only")
    box = parse_box(args.box) if args.box is not None else None
    check_accumulate_flags(accumulate=args.accumulate_importance, image=args.image, text=args.text)
    if args.show is not None:  # a picture that cannot be written is refused before the query runs
        from ..query.show import check_show_path

        check_show_path(args.show, writable=True)
    with open_query(args.run, method=args.method, device=args.device, encoder=args.encoder) as engine:
        if args.image is not None:
            facts = engine.image_to_facts(args.image, box=box, k=args.k)
            images = None
            query = {"image": args.image, "box": list(box) if box else None}
        else:
            parsed = engine.parse(args.text)
            images = engine.text_to_images(args.text, k=args.k)
            facts = engine.text_to_facts(args.text, k=args.k)
            query = {"text": args.text, "parsed_fact": list(parsed)}
        method = engine.method
        if args.show is not None:
            from ..query.show import write_query_picture

            write_query_picture(args.show, engine, query, facts=facts, images=images)
        if args.accumulate_importance:  # the one step that cannot be undone comes last
            print(record_image_queries(engine, [args.image], box=box).describe(), file=sys.stderr)
    if args.json:
        payload = {"run": str(args.run), "method": method, "query": query,
                   "facts": [{"rank": r, "fact": list(h["fact"]), "fact_id": h["fact_id"], "score": h["score"]}
                             for r, h in enumerate(facts, start=1)]}
        if images is not None:
            payload["images"] = [{"rank": r, "sample": h["sample"], "image_id": h["image_id"], "fact": list(h["fact"]),
                                  "score": h["score"]} for r, h in enumerate(images, start=1)]
        print(json.dumps(payload, indent=2))
        return 0
    if images is not None:
        from ..query.engine import fact_text

        print(f"query {args.text!r} parsed as {fact_text(query['parsed_fact'])} (method {method})")
        print(_table("test images (cosine with the model's image embedding):", ["rank", "sample", "image", "true fact", "score"],
                     [[str(r), str(h["sample"]), str(h["image_id"]), h["fact_text"], f"{h['score']:.4f}"]
                      for r, h in enumerate(images, start=1)]))
        print()
        print(_table("known facts (cosine of language vectors):", ["rank", "fact", "score"], _fact_rows(facts)))
    else:
        where = f" box {args.box}" if box else ""
        print(_table(f"facts for {args.image}{where} (method {method}):", ["rank", "fact", "score"], _fact_rows(facts)))
    return 0
