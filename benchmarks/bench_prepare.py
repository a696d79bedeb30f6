"""Benchmark: `mas-triplets prepare vg --no-images` on a Visual-Genome-scale relationships.json.

Generates image_data.json and relationships.json with the real schema and synthetic
content (Zipf-distributed names and predicates, ``name`` vs ``names`` mixed, about 108K
images and 2.3M relationships by default), then measures, each in its own subprocess:

* ``prepare vg --no-images --no-text --orders 3`` (the streaming reader, cleaning,
  filtering, splitting and the HDF5 write): wall time and peak RSS;
* ``json.load`` of the same relationships.json: wall time and peak RSS.

Peak RSS is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` read by a wrapper process
around each measured process (so the two measurements never share a maximum).
The last line printed is a JSON object with ``relationships_per_s`` (goal >= 30,000)
and ``peak_rss_vs_json_load`` (goal <= 0.1).

    python benchmarks/bench_prepare.py                     # full size
    python benchmarks/bench_prepare.py --images 10000 --relationships 213000   # smaller case
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL_IMAGES = 108_077
FULL_RELATIONSHIPS = 2_316_104


def _zipf_vocabulary(prefix: str, size: int, rng: random.Random) -> list[str]:
    syllables = ["ba", "ko", "ri", "te", "lu", "ma", "so", "ne", "vi", "da", "pe", "go"]
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return [f"{prefix}{word}" if prefix else word for word in sorted(words)]


def _zipf_weights(size: int, exponent: float = 1.1) -> list[float]:
    weights = [1.0 / (rank + 1) ** exponent for rank in range(size)]
    total = sum(weights)
    return [weight / total for weight in weights]


def generate(out_dir: Path, num_images: int, num_relationships: int, seed: int) -> dict[str, int]:
    """Write image_data.json and relationships.json (real schema, synthetic content) into ``out_dir``."""
    rng = random.Random(seed)
    names = _zipf_vocabulary("", 3000, rng)
    predicates = [word.upper() if i % 7 == 0 else word for i, word in enumerate(_zipf_vocabulary("", 400, rng))]
    name_cum = _cumulative(_zipf_weights(len(names)))
    predicate_cum = _cumulative(_zipf_weights(len(predicates)))
    out_dir.mkdir(parents=True, exist_ok=True)
    per_image = [num_relationships // num_images] * num_images
    for index in rng.sample(range(num_images), num_relationships - sum(per_image)):
        per_image[index] += 1
    with open(out_dir / "image_data.json", "w", encoding="utf-8") as handle:
        handle.write("[")
        for image in range(num_images):
            key = "id" if image % 10 == 0 else "image_id"
            handle.write(("," if image else "") + json.dumps(
                {key: image + 1, "width": 800, "height": 600, "url": f"https://example/VG_100K/{image + 1}.jpg",
                 "coco_id": None, "flickr_id": image * 7}))
        handle.write("]")
    relationship_id = object_id = 0
    written = 0
    with open(out_dir / "relationships.json", "w", encoding="utf-8") as handle:
        handle.write("[")
        for image in range(num_images):
            relationships = []
            for _ in range(per_image[image]):
                relationship_id += 1
                ends = []
                for _end in range(2):
                    object_id += 1
                    name = names[_draw(name_cum, rng)]
                    x, y = rng.randint(0, 700), rng.randint(0, 500)
                    record = {"object_id": object_id, "x": x, "y": y, "w": rng.randint(5, 200), "h": rng.randint(5, 200)}
                    if object_id % 3:
                        record["name"] = name
                    else:
                        record["names"] = [name.capitalize() + " "]
                    if object_id % 5:
                        record["synsets"] = [f"{name}.n.01"]
                    ends.append(record)
                predicate = predicates[_draw(predicate_cum, rng)]
                relationships.append({"relationship_id": relationship_id, "predicate": predicate,
                                      "synsets": [f"{predicate.lower()}.r.01"], "subject": ends[0], "object": ends[1]})
            handle.write(("," if image else "") + json.dumps({"relationships": relationships, "image_id": image + 1}))
            written += len(relationships)
        handle.write("]")
    sizes = {"images": num_images, "relationships": written, "seed": seed,
             "relationships_json_bytes": (out_dir / "relationships.json").stat().st_size}
    (out_dir / "bench_meta.json").write_text(json.dumps(sizes))
    return sizes


def _reusable(out_dir: Path, num_images: int, num_relationships: int, seed: int) -> dict[str, int] | None:
    """The sizes of data generated earlier in ``out_dir`` with the same arguments, else None."""
    try:
        sizes = json.loads((out_dir / "bench_meta.json").read_text())
    except (OSError, ValueError):
        return None
    same = (sizes.get("images") == num_images and sizes.get("relationships") == num_relationships
            and sizes.get("seed") == seed
            and (out_dir / "relationships.json").stat().st_size == sizes.get("relationships_json_bytes"))
    return sizes if same else None


def _cumulative(weights: list[float]) -> list[float]:
    total, cumulative = 0.0, []
    for weight in weights:
        total += weight
        cumulative.append(total)
    return cumulative


def _draw(cumulative: list[float], rng: random.Random) -> int:
    import bisect

    return min(bisect.bisect_left(cumulative, rng.random()), len(cumulative) - 1)


def _measure(command: list[str]) -> dict[str, float]:
    """Run ``command`` through a wrapper process; return its wall seconds, CPU seconds (user + system) and peak RSS (MiB)."""
    wrapper = (
        "import json, resource, subprocess, sys, time\n"
        "start = time.perf_counter()\n"
        "code = subprocess.call(sys.argv[1:])\n"
        "seconds = time.perf_counter() - start\n"
        "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'returncode': code, 'seconds': seconds, 'cpu_seconds': usage.ru_utime + usage.ru_stime,\n"
        "                  'peak_rss_mib': usage.ru_maxrss / 1024}))\n"
    )
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"measurement wrapper failed: {result.stderr.strip()}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["returncode"] != 0:
        raise SystemExit(f"measured command failed ({measured['returncode']}): {' '.join(command)}")
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=FULL_IMAGES)
    parser.add_argument("--relationships", type=int, default=FULL_RELATIONSHIPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse data generated earlier in --workdir with the same sizes and seed")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    vg_dir = workdir / "vg"
    try:
        sizes = _reusable(vg_dir, args.images, args.relationships, args.seed) if args.reuse else None
        if sizes is None:
            start = time.perf_counter()
            sizes = generate(vg_dir, args.images, args.relationships, args.seed)
            print(f"generated {sizes} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        else:
            print(f"reusing {sizes} from {vg_dir}", file=sys.stderr)
        import ijson

        backend = "yajl2_c"
        try:
            ijson.get_backend("yajl2_c")
        except Exception:
            backend = ijson.backend
        prepare = _measure([
            sys.executable, "-m", "triplets.cli", "prepare", "vg", "--vg-dir", str(vg_dir),
            "--out", str(workdir / "facts.h5"), "--no-images", "--no-text", "--orders", "3", "--tasks", "8",
            "--no-progress",
        ])
        print(f"prepare vg: {prepare}", file=sys.stderr)
        load = _measure([sys.executable, "-c",
                         "import json, sys; data = json.load(open(sys.argv[1], 'rb')); print(len(data))",
                         str(vg_dir / "relationships.json")])
        print(f"json.load: {load}", file=sys.stderr)
        result = {
            "images": sizes["images"],
            "relationships": sizes["relationships"],
            "relationships_json_mb": round(sizes["relationships_json_bytes"] / 1e6, 1),
            "ijson_backend": backend,
            "prepare_seconds": round(prepare["seconds"], 2),
            "prepare_peak_rss_mb": round(prepare["peak_rss_mib"], 1),
            "json_load_seconds": round(load["seconds"], 2),
            "json_load_peak_rss_mb": round(load["peak_rss_mib"], 1),
            "json_load_relationships_per_s": round(sizes["relationships"] / load["seconds"]),
            "relationships_per_s": round(sizes["relationships"] / prepare["seconds"]),
            "relationships_per_cpu_s": round(sizes["relationships"] / prepare["cpu_seconds"]),
            "json_load_relationships_per_cpu_s": round(sizes["relationships"] / load["cpu_seconds"]),
            "prepare_vs_json_load_speed": round(load["seconds"] / prepare["seconds"], 3),
            "peak_rss_vs_json_load": round(prepare["peak_rss_mib"] / load["peak_rss_mib"], 4),
            "goals": {"relationships_per_s": ">= 30000", "peak_rss_vs_json_load": "<= 0.1"},
            "cpu_count": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(result))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
