"""The main demo (``make demo``): synth → prepare → train finetune and MAS → evaluate → query.

    python -m triplets.demo --out runs/demo [--config configs/demo.yaml] [--set train.optim.epochs=4]

1. **synth**: write the first ``synth.num_images`` images of the real-image world
   (``data_prep.worlds.real``: Fashion-MNIST clothing, handwritten digits and font letters in
   Visual-Genome-style scenes; ``synth.world: shapes`` gives the drawn-shapes world of
   ``data_prep.worlds.synthetic``) into ``DATA/synth`` (``DATA`` = ``--data-dir``, by default ``OUT`` + ``_data``).
2. **prepare**: read it as Visual Genome, embed every fact's S, P, O with the text encoder
   (MiniLM by default, ``triplets.facts.language``), split the facts into tasks (semantic by default:
   configs/demo.yaml says why) and store 32×32 region crops: ``DATA/facts.h5``.
3. **train**: every method of the config's ``train.methods`` (finetune and MAS) on the same
   tasks, in order, into the run folder ``OUT`` (``triplets.facts.train.train_run``), which evaluates
   every task after every task (standard top-5) and writes ``OUT/results.json`` with, per
   method, ``avg_acc`` (average standard top-5) and ``forgetting`` (fractions), ``results.md`` and plots.
4. **query**: the trained MAS model answers one image → facts and one text → images query, and
   draws the text query's nearest test regions into ``OUT/query_show.png`` (as ``mas-triplets
   query --show``).
5. Prints the comparison table: average standard top-5 (the task's own facts as candidates),
   forgetting, BWT and the final generalized top-5 (the facts of all tasks as candidates).

Intermediate files are reused when their settings are unchanged (a stamp file beside each
records them), so a second ``make demo`` skips synth, prepare and finished training.
All settings live in ``configs/demo.yaml`` (:class:`DemoConfig`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from data_prep.errors import MissingDatasetError
from data_prep.facts.fact_file import open_facts
from data_prep.worlds.real import generate_real_world
from data_prep.worlds.real_sources import SOURCE_NAMES
from data_prep.worlds.synthetic import generate_world
from data_prep.sources.visual_genome import prepare_visual_genome
from mas_core.checkpoint import atomic_write_json

from .query.engine import open_query
from .cli import _user_errors
from .config import load_config, to_dict
from .errors import TripletsError
from .fingerprint import file_sha256
from .facts.language import embed_facts, load_text_encoder
from .query.show import write_query_picture
from .facts.train import train_run
from .facts.train_config import TrainConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SHOW_FILE = "query_show.png"  # the demo's picture, in the run folder
SHOW_K = 10                   # regions on the picture's contact sheet (two rows)


@dataclass
class SynthSettings:
    """``synth:`` the world (``real``: real object images, :mod:`data_prep.worlds.real`; ``shapes``:
    drawn shapes, :mod:`data_prep.worlds.synthetic`), its first ``num_images`` images, seed, image width
    and height in pixels, and for ``real`` the object sources (comma-separated)."""

    world: Literal["real", "shapes"] = "real"
    num_images: int = 1000
    seed: int = 0
    width: int = 160
    height: int = 120
    objects: str = ",".join(SOURCE_NAMES)


@dataclass
class PrepareSettings:
    """``prepare:`` how the facts file is built from the world (see ``mas-triplets prepare vg``)."""

    num_tasks: int = 4
    split: Literal["random", "semantic"] = "random"
    min_fact_count: int = 5
    image_size: int = 32
    seed: int = 0
    text_encoder: str = "minilm"


@dataclass
class DemoConfig:
    """The demo's settings: the world, the preparation, and the training config (whose
    ``data.fact_file`` the demo sets to its prepared file)."""

    synth: SynthSettings = field(default_factory=SynthSettings)
    prepare: PrepareSettings = field(default_factory=PrepareSettings)
    train: TrainConfig = field(default_factory=TrainConfig)


def _stamp_matches(stamp: Path, settings: dict[str, Any]) -> bool:
    try:
        return json.loads(stamp.read_text(encoding="utf-8")) == settings
    except (OSError, json.JSONDecodeError):
        return False


def ensure_world(settings: SynthSettings, folder: Path, *, progress: bool = True) -> tuple[Path, bool]:
    """Write the world of ``settings`` into ``folder`` unless a stamp says it is already there
    with the same settings. Returns ``(folder, reused)``."""
    stamp = folder.parent / f"{folder.name}.json"
    wanted = to_dict(settings)
    if folder.is_dir() and (folder / "image_data.json").is_file() and _stamp_matches(stamp, wanted):
        return folder, True
    if settings.world != "real" and settings.objects != ",".join(SOURCE_NAMES):
        raise TripletsError(f"synth.objects applies to world: real only (world is {settings.world!r})")
    common = {"num_images": settings.num_images, "seed": settings.seed,
              "image_size": (settings.width, settings.height), "progress": progress, "force": True}
    if settings.world == "real":
        try:
            generate_real_world(folder, sources=settings.objects, **common)
        except MissingDatasetError as exc:
            raise TripletsError(f"{exc} (or leave that source out, e.g. --set synth.objects=digits,letters, "
                                "or use the drawn shapes: --set synth.world=shapes)") from None
    else:
        generate_world(folder, **common)
    atomic_write_json(stamp, wanted)
    return folder, False


def ensure_fact_file(settings: PrepareSettings, world: Path, world_settings: SynthSettings, path: Path, *,
                     progress: bool = True) -> tuple[Path, bool]:
    """Prepare the fact file ``path`` from ``world`` unless a stamp (settings + the file's
    SHA-256) says the same file is already there. Returns ``(path, reused)``."""
    stamp = path.parent / f"{path.name}.json"
    wanted = {"prepare": to_dict(settings), "synth": to_dict(world_settings)}
    if path.is_file() and _stamp_matches(stamp, {**wanted, "sha256": file_sha256(path)}):
        with open_facts(path):  # raises FactFileError for a damaged file
            return path, True
    encoder = load_text_encoder(settings.text_encoder)

    def embed(facts: list) -> Any:
        embeddings, _masks = embed_facts(facts, encoder)
        return embeddings

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    prepare_visual_genome(world, path, num_tasks=settings.num_tasks, split=settings.split,
                          min_fact_count=settings.min_fact_count, image_size=settings.image_size,
                          seed=settings.seed, text_encoder=embed,
                          encoder_name=getattr(encoder, "name", settings.text_encoder), progress=progress,
                          command_line="python -m triplets.demo")
    atomic_write_json(stamp, {**wanted, "sha256": file_sha256(path)})
    return path, False


def _reusable_run(out_dir: Path, config: TrainConfig, *, fact_file_reused: bool = True) -> bool:
    """True when ``out_dir`` holds a run of the same settings on the same fact file (it is then
    resumed; finished methods are skipped). A run of other settings, or any run when the fact file
    was just prepared anew (``fact_file_reused`` false: e.g. another world), is the demo's own
    stale output: removed."""
    config_path = out_dir / "config.yaml"
    if not out_dir.exists():
        return False
    if fact_file_reused and config_path.is_file():
        try:
            saved = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            saved = None
        current = to_dict(config)
        if isinstance(saved, dict) and all(saved.get(k) == current[k] for k in ("data", "model", "optim", "loss", "seed")) \
                and saved.get("methods") == current["methods"]:
            return True
    print(f"demo: {out_dir} holds a run with other settings; replacing it", flush=True)
    shutil.rmtree(out_dir)
    return False


def example_queries(out_dir: Path, method: str, *, k: int = 5, show: Path | None = None,
                    show_k: int = SHOW_K) -> str:
    """One image → facts query (the first test image of task 1, the task learned first and so the
    most exposed to forgetting) and one text → images query (that image's fact, as text), answered
    by ``method``'s model; returned as text. With ``show``, the
    text query's ``show_k`` nearest test regions are also drawn as a contact sheet into that PNG
    (:func:`triplets.query.show.write_query_picture`, as ``mas-triplets query --show``)."""
    lines: list[str] = []
    with open_query(out_dir, method=method) as engine:
        image_index = int(engine.fact_file.sample_indices(0, "test")[0])
        true_fact = engine.fact_file.facts[int(engine.fact_file.sample_fact[image_index])]
        lines.append(f"image → facts ({method}): test sample {image_index}, true fact "
                     f"<{', '.join(w for w in true_fact if w)}>")
        for rank, hit in enumerate(engine.image_to_facts_by_sample(image_index, k=k), start=1):
            lines.append(f"  {rank}. {hit['fact_text']:<40} cosine {hit['score']:.3f}")
        text = " ".join(w for w in true_fact if w)
        lines.append(f"text → images ({method}): \"{text}\"")
        images = engine.text_to_images(text, k=max(k, show_k if show is not None else 0))
        for rank, hit in enumerate(images[:k], start=1):
            lines.append(f"  {rank}. sample {hit['sample']:<6} fact {hit['fact_text']:<34} cosine {hit['score']:.3f}")
        if show is not None:
            picture = write_query_picture(show, engine, {"text": text}, facts=engine.text_to_facts(text, k=show_k),
                                          images=images[:show_k])
            lines.append(f"picture of the text query's {len(images[:show_k])} nearest test regions: {picture}")
    return "\n".join(lines)


def generalized_top5(entry: dict[str, Any]) -> float:
    """A method's final generalized top-5 averaged over the tasks (fraction; NaN when not measured)."""
    generalized = entry.get("final", {}).get("generalized") or []
    return sum(task["top5"] for task in generalized) / len(generalized) if generalized else float("nan")


def format_table(results: dict[str, Any]) -> str:
    """The comparison table: method, average top-5, forgetting, BWT, final generalized top-5."""
    header = f"{'method':<14} {'avg top-5':>10} {'forgetting':>11} {'BWT':>8} {'gen. top-5':>11}"
    lines = [header, "-" * len(header)]
    for name, entry in results["methods"].items():
        gen = generalized_top5(entry)
        lines.append(f"{name:<14} {100 * entry['avg_acc']:>9.1f}% {100 * entry['forgetting']:>10.1f}% "
                     f"{100 * entry['bwt']:>7.1f}% {100 * gen:>10.1f}%")
    return "\n".join(lines)


def run_demo(out_dir: str | Path, *, config_path: str | Path = DEFAULT_CONFIG, data_dir: str | Path | None = None,
             overrides: Sequence[str] = (), progress: bool = True, query_example: bool = True) -> dict[str, Any]:
    """The whole demo; returns the results dictionary (also in ``OUT/results.json``)."""
    out_dir = Path(out_dir)
    data_dir = Path(data_dir) if data_dir is not None else out_dir.with_name(out_dir.name + "_data")
    fact_path = data_dir / "facts.h5"
    config = load_config(config_path, DemoConfig, [f"train.data.fact_file={fact_path}", *overrides])
    timings: dict[str, float] = {}
    demo_started = started = time.perf_counter()
    world, reused = ensure_world(config.synth, data_dir / "synth", progress=progress)
    timings["synth"] = time.perf_counter() - started
    print(f"demo: {config.synth.world} world of {config.synth.num_images} images {'reused' if reused else 'written'}: "
          f"{world} ({timings['synth']:.1f} s)", flush=True)

    started = time.perf_counter()
    fact_path, fact_reused = ensure_fact_file(config.prepare, world, config.synth, fact_path, progress=progress)
    timings["prepare"] = time.perf_counter() - started
    with open_facts(fact_path) as fact_file:
        sizes = [len(fact_file.facts_of_task(t)) for t in range(fact_file.num_tasks)]
        counts = len(fact_file.sample_fact)
    print(f"demo: fact file {'reused' if fact_reused else 'prepared'}: {fact_path}: {sum(sizes)} facts in "
          f"{len(sizes)} tasks {sizes}, {counts} samples ({timings['prepare']:.1f} s)", flush=True)

    started = time.perf_counter()
    train_config = dataclasses.replace(config.train, data=dataclasses.replace(
        config.train.data, fact_file=str(fact_path.resolve())))
    resume = _reusable_run(out_dir, train_config, fact_file_reused=fact_reused)
    results = train_run(train_config, out_dir, resume=resume, progress=progress)
    timings["train_and_evaluate"] = time.perf_counter() - started
    print(f"demo: training and evaluation {'resumed' if resume else 'done'} ({timings['train_and_evaluate']:.1f} s)",
          flush=True)

    if query_example:
        method = next((name for name in results["methods"] if name.startswith("mas")), next(iter(results["methods"])))
        started = time.perf_counter()
        print(example_queries(out_dir, method, show=out_dir / SHOW_FILE), flush=True)
        timings["query"] = time.perf_counter() - started

    print()
    print(format_table(results))
    finetune = results["methods"].get("finetune")
    mas = next((entry for name, entry in results["methods"].items() if name.startswith("mas")), None)
    if finetune is not None and mas is not None:
        print(f"\nforgetting (standard top-5, mean over tasks 1..T-1): finetune {100 * finetune['forgetting']:.1f} "
              f"points, MAS {100 * mas['forgetting']:.1f} points")
        print(f"MAS - finetune: average standard top-5 {100 * (mas['avg_acc'] - finetune['avg_acc']):+.1f} points, "
              f"final generalized top-5 {100 * (generalized_top5(mas) - generalized_top5(finetune)):+.1f} points")
    print(f"results: {out_dir / 'results.json'}, table: {out_dir / 'results.md'}, plots: {out_dir / 'plots'}")
    print("timings: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
          + f"; total {time.perf_counter() - demo_started:.1f} s")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triplets.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo settings (default configs/demo.yaml)")
    parser.add_argument("--data-dir", default=None, help="where the world and the fact file go (default OUT_data)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. train.optim.epochs=4; repeatable")
    parser.add_argument("--no-query", action="store_true", help="skip the example query")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)


    try:
        run_demo(args.out, config_path=args.config, data_dir=args.data_dir, overrides=args.overrides,
                 progress=not args.no_progress, query_example=not args.no_query)
    except _user_errors() as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
