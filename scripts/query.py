"""Query a trained run from Python: a worked example over ``triplets.query.engine``.

    python scripts/query.py runs/demo --text "man riding horse"
    python scripts/query.py runs/demo --image photo.jpg --box 10,20,64,48
    python scripts/query.py runs/demo --sample 0          # a test region stored in the fact file
    python scripts/query.py runs/demo --sample 0 --accumulate-importance   # and add its MAS importance
    python scripts/query.py runs/demo --text "man riding horse" --show answer.png   # and draw the answer

The same calls from your own code::

    from triplets.query.engine import open_query, query_image, query_text
    facts = query_image("runs/demo", "photo.jpg", box=(10, 20, 64, 48), k=5)   # [(fact, score)]
    found = query_text("runs/demo", "man riding horse", k=5)                    # {"images": [...], "facts": [...]}
    with open_query("runs/demo", method="mas") as engine:                       # keep the model loaded
        engine.text_to_images("dog|on|grass", k=3)
        record_image_queries(engine, ["photo.jpg"])                              # online importance (§12)
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the text encoder is read from local files only


def main(argv: list[str] | None = None) -> int:
    from triplets.errors import TripletsError
    from triplets.query.engine import fact_text, open_query, parse_box
    from triplets.query.online_importance import check_accumulate_flags, record_image_queries, record_sample_queries
    from triplets.query.show import check_show_path, write_query_picture

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder written by mas-triplets train")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a fact: 'S|P|O', '<S, P>' or a phrase")
    what.add_argument("--image", help="an image file")
    what.add_argument("--sample", type=int, help="position of a test region in the run's fact file")
    parser.add_argument("--box", help="x,y,w,h of the region in --image (pixels)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--method", help="trained method (default: mas if trained)")
    parser.add_argument("--accumulate-importance", action="store_true",
                        help="add the image query's MAS importance to RUN/<method>/online_importance.pt")
    parser.add_argument("--show", metavar="FILE.png", help="also draw the answer into this PNG")
    args = parser.parse_args(argv)
    try:
        image = args.image if args.image is not None else args.sample
        check_accumulate_flags(accumulate=args.accumulate_importance, image=image, text=args.text)
        if args.show is not None:  # checked before the query, the importance recorded after the picture
            check_show_path(args.show, writable=True)
        record = None
        with open_query(args.run, method=args.method) as engine:
            if args.text is not None:
                print(f"{args.text!r} → {fact_text(engine.parse(args.text))}  (method {engine.method})")
                images = engine.text_to_images(args.text, k=args.k)
                for hit in images:
                    print(f"  image sample {hit['sample']:>6} (image {hit['image_id']}, {hit['fact_text']}): {hit['score']:.3f}")
                hits = engine.text_to_facts(args.text, k=args.k)
                for hit in hits:
                    print(f"  fact {hit['fact_text']}: {hit['score']:.3f}")
                query = {"text": args.text}
            else:
                images = None
                if args.image is not None:
                    box = parse_box(args.box) if args.box else None
                    hits = engine.image_to_facts(args.image, box=box, k=args.k)
                    if args.accumulate_importance:
                        record = lambda: record_image_queries(engine, [args.image], box=box)  # noqa: E731
                    query = {"image": args.image, "box": box}
                else:
                    sample = int(engine.fact_file.sample_indices(None, "test")[args.sample])
                    true_fact = engine.facts[int(engine.fact_file.sample_fact[sample])]
                    print(f"test sample {sample}, true fact {fact_text(true_fact)}")
                    hits = engine.image_to_facts_by_sample(sample, k=args.k)
                    if args.accumulate_importance:
                        record = lambda: record_sample_queries(engine, [sample])  # noqa: E731
                    query = {"sample": sample}
                for rank, hit in enumerate(hits, start=1):
                    print(f"  {rank}. {hit['fact_text']}: {hit['score']:.3f}")
            if args.show is not None:
                print(f"picture: {write_query_picture(args.show, engine, query, facts=hits, images=images)}")
            if record is not None:
                print(record().describe())
    except (TripletsError, IndexError) as exc:
        print(f"query.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
