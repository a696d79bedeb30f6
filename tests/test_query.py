"""Queries (image → facts, text → images/facts) and the evaluate/query commands on a tiny trained run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data_prep.facts.fact_file import write_fact_file
from triplets.cli import main
from triplets.errors import RunFolderError, TripletsError
from triplets.index import build_index, load_index, normalize_rows
from triplets.query.engine import crop_and_resize, open_query, parse_box, parse_fact_text, query_image, query_text
from triplets.facts.data import fact_image_dataset

SLOT_DIM = 8
IMAGE_SIZE = 16
VOCABULARY = [
    ("man", None, None), ("man", "riding", "horse"), ("man", "holding", "umbrella"), ("horse", "brown", None),
    ("dog", None, None), ("dog", "running", None), ("woman", "riding", "bike"), ("traffic light", "red", None),
    ("woman", None, None), ("bike", "parked", None), ("dog", "on", "grass"), ("man", "wearing", "hat"),
]


def _word_vectors(words, seed):
    rng = np.random.default_rng(seed)
    return {word: rng.normal(size=SLOT_DIM).astype(np.float32) for word in sorted(words)}


def make_fact_file(path: Path, facts, *, seed: int = 0) -> Path:
    """Two tasks of six facts; each fact has a colour template, samples are template + noise."""
    rng = np.random.default_rng(seed)
    words = _word_vectors({w for fact in facts for w in fact if w}, seed)
    zero = np.zeros(SLOT_DIM, np.float32)
    embeddings = np.stack([np.concatenate([words[s], words[p] if p else zero, words[o] if o else zero])
                           for s, p, o in facts])
    templates = rng.uniform(0, 1, size=(len(facts), 4, 4, 3)).repeat(4, axis=1).repeat(4, axis=2)
    sample_fact, split, pixels = [], [], []
    for fact_id in range(len(facts)):
        for which, count in ((0, 10), (1, 4)):
            for _ in range(count):
                image = np.clip(templates[fact_id] + rng.normal(0, 0.1, templates[fact_id].shape), 0, 1)
                pixels.append((image * 255).round().astype(np.uint8))
                sample_fact.append(fact_id)
                split.append(which)
    count = len(sample_fact)
    return write_fact_file(
        path, facts=list(facts), sample_fact=np.array(sample_fact), sample_image_id=1000 + np.arange(count),
        sample_box=np.tile(np.array([0, 0, IMAGE_SIZE, IMAGE_SIZE], np.float32), (count, 1)),
        sample_split=np.array(split, np.int8), task_of_fact=np.arange(len(facts)) // (len(facts) // 2),
        sample_pixels=np.stack(pixels), provenance={"source": "tests/test_query.py"},
        fact_embeddings=embeddings, encoder_name="test-words")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from triplets.config import from_dict
    from triplets.facts.train import train_run
    from triplets.facts.train_config import TrainConfig

    root = tmp_path_factory.mktemp("query")
    fact_path = make_fact_file(root / "facts.h5", VOCABULARY)
    config = from_dict(TrainConfig, {
        "data": {"fact_file": str(fact_path)},
        "model": {"trunk_channels": [8, 16], "branch_channels": 16, "hidden_dim": 32},
        "optim": {"epochs": 2, "lr": 0.01, "batch_size": 16},  # distinct embeddings, no ties
        "methods": [{"name": "finetune"}],
        "seed": 0, "device": "cpu",
    })
    train_run(config, root / "run", progress=False)
    return root / "run"


def _brute_force_facts(model, pixels, fact_vectors, k):
    with torch.no_grad():
        image = model.embed(torch.from_numpy(pixels[None]).permute(0, 3, 1, 2).float() / 255.0).numpy()
    scores = (normalize_rows(image) @ normalize_rows(fact_vectors).T)[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


# ----------------------------------------------------------------------------- parsing
def test_parse_fact_text_forms():
    assert parse_fact_text("man|riding|horse") == ("man", "riding", "horse")
    assert parse_fact_text(" man | riding ") == ("man", "riding", None)
    assert parse_fact_text("<man, riding, horse>") == ("man", "riding", "horse")
    assert parse_fact_text("<dog>") == ("dog", None, None)
    assert parse_fact_text("man riding horse", VOCABULARY) == ("man", "riding", "horse")
    assert parse_fact_text("Man  Riding   a horse", VOCABULARY) == ("man", "riding a", "horse")
    assert parse_fact_text("traffic light red", VOCABULARY) == ("traffic light", "red", None)  # multi-word subject
    assert parse_fact_text("dog", VOCABULARY) == ("dog", None, None)
    assert parse_fact_text("woman riding dog", VOCABULARY) == ("woman", "riding", "dog")  # unseen combination
    assert parse_fact_text("zebra eating grass", VOCABULARY) == ("zebra eating grass", None, None)  # fallback
    assert parse_fact_text("horse bike", VOCABULARY) == ("horse", "bike", None)  # at least one predicate word
    for bad, message in (("", "empty"), ("a|b|c|d", "at most 3"), ("|p|o", "subject"), ("s||o", "no predicate")):
        with pytest.raises(TripletsError, match=message):
            parse_fact_text(bad, VOCABULARY)


def test_box_parsing_and_cropping():
    assert parse_box("10, 20,30.5,4") == (10.0, 20.0, 30.5, 4.0)
    with pytest.raises(TripletsError, match="four numbers"):
        parse_box("1,2,3")
    canvas = np.zeros((40, 50, 3), np.uint8)
    canvas[20:36, 10:26] = np.arange(16 * 16 * 3).reshape(16, 16, 3) % 251
    region = crop_and_resize(Image.fromarray(canvas), (10, 20, 16, 16), 16)
    np.testing.assert_array_equal(region, canvas[20:36, 10:26])
    with pytest.raises(TripletsError, match="outside"):
        crop_and_resize(Image.fromarray(canvas), (60, 0, 5, 5), 16)
    with pytest.raises(TripletsError, match="positive"):
        crop_and_resize(Image.fromarray(canvas), (0, 0, 0, 5), 16)


# ----------------------------------------------------------------------------- queries on a trained run
def test_image_query_equals_brute_force(run_dir, tmp_path):
    from triplets.run_folder import load_run

    with load_run(run_dir) as run:
        sample = int(run.fact_file.sample_indices(None, "test")[5])
        pixels = run.fact_file.pixels([sample])[0]
        fact_vectors = np.asarray(run.fact_file.fact_embeddings)
        model = run.load_model("finetune")
        expected_ids, expected_scores = _brute_force_facts(model, pixels, fact_vectors, 5)
        canvas = np.full((64, 80, 3), 255, np.uint8)
        canvas[30:46, 12:28] = pixels
        Image.fromarray(canvas).save(tmp_path / "photo.png")
        hits = query_image(run, tmp_path / "photo.png", box=(12, 30, 16, 16), k=5)
        with open_query(run) as engine:
            assert engine.method == "finetune"
            by_sample = engine.image_to_facts_by_sample(sample, k=5)
    assert [fact for fact, _ in hits] == [VOCABULARY[i] for i in expected_ids]
    np.testing.assert_allclose([score for _, score in hits], expected_scores, atol=1e-5)
    assert [h["fact_id"] for h in by_sample] == expected_ids.tolist()


def test_text_query_ranks_images_and_facts(run_dir):
    from triplets.facts.evaluate import embed_images
    from triplets.run_folder import load_run

    result = query_text(run_dir, "man riding horse", k=6)
    with load_run(run_dir) as run:
        model = run.load_model("finetune")
        images, _ = embed_images(model, fact_image_dataset(run.fact_file, None, "test"))
        test_samples = run.fact_file.sample_indices(None, "test")
        query = np.asarray(run.fact_file.fact_embeddings)[1]
        scores = normalize_rows(images) @ normalize_rows(query[None])[0]
        order = np.argsort(-scores, kind="stable")[:6]
        sample_fact = run.fact_file.sample_fact
    assert result["facts"][0][0] == ("man", "riding", "horse") and result["facts"][0][1] == pytest.approx(1.0, abs=1e-5)
    assert [hit[0] for hit in result["images"]] == test_samples[order].tolist()
    np.testing.assert_allclose([hit[3] for hit in result["images"]], scores[order], atol=1e-5)
    for sample, image_id, fact, _ in result["images"]:
        assert image_id == 1000 + sample and fact == VOCABULARY[int(sample_fact[sample])]


def test_zero_shot_text_query_uses_the_text_encoder(run_dir):
    from triplets.facts.language import embed_facts

    words = _word_vectors({w for fact in VOCABULARY for w in fact if w}, 0)
    encoder_calls = []

    class WordEncoder:
        """The fact file's 'encoder': the same random vector per phrase that made the fact vectors."""

        name = "test-words"
        dim = SLOT_DIM

        def encode(self, texts, batch_size=64):
            encoder_calls.append(list(texts))
            return np.stack([words.get(t, np.ones(SLOT_DIM, np.float32)) for t in texts])

    encoder = WordEncoder()
    result = query_text(run_dir, "woman|riding|horse", k=3, encoder=encoder)  # not a known fact
    assert encoder_calls, "an unseen fact must be embedded by the text encoder"
    expected_vector = np.asarray(embed_facts([("woman", "riding", "horse")], encoder)[0])[0]
    fact_vectors = np.asarray([np.concatenate([words[s], words[p] if p else np.zeros(SLOT_DIM),
                                               words[o] if o else np.zeros(SLOT_DIM)]) for s, p, o in VOCABULARY])
    scores = normalize_rows(fact_vectors) @ normalize_rows(expected_vector[None])[0]
    order = np.argsort(-scores, kind="stable")[:3]
    assert [fact for fact, _ in result["facts"]] == [VOCABULARY[i] for i in order]
    np.testing.assert_allclose([s for _, s in result["facts"]], scores[order], atol=1e-5)
    assert len(result["images"]) == 3

    class OtherEncoder(WordEncoder):
        name = "another-model"

    with pytest.raises(RunFolderError, match="another-model"):
        query_text(run_dir, "woman|riding|horse", k=3, encoder=OtherEncoder())
    with pytest.raises(RunFolderError, match="test-words"):
        query_text(run_dir, "woman|riding|horse", k=3)  # not a MiniLM fact file: the encoder must be given


def test_query_command_table_and_json(run_dir, capsys):
    assert main(["query", "--run", str(run_dir), "--text", "dog|running", "--k", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["query"]["parsed_fact"] == ["dog", "running", None]
    assert payload["facts"][0]["fact"] == ["dog", "running", None] and len(payload["images"]) == 3
    assert main(["query", "--run", str(run_dir), "--text", "<dog, running>", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "<dog, running>" in out and "test images" in out


def _one_line_error(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and pattern in err, err
    return err


def test_query_bad_inputs_exit_2(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _one_line_error(capsys, ["query", "--run", str(run_dir), "--image", str(broken)], "cannot decode")
    _one_line_error(capsys, ["query", "--run", str(run_dir), "--image", str(tmp_path / "absent.jpg")], "not found")
    _one_line_error(capsys, ["query", "--run", str(tmp_path / "nope"), "--text", "dog"], "no run folder")
    _one_line_error(capsys, ["evaluate", "--run", str(tmp_path)], "not a run folder")
    _one_line_error(capsys, ["query", "--run", str(run_dir), "--text", "dog", "--method", "mas"], "no trained method")
    _one_line_error(capsys, ["query", "--run", str(run_dir), "--image", str(broken), "--box", "1,2"], "four numbers")


def test_index_of_another_model_is_refused_and_kept(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    index_path = copy / "finetune" / "index" / "images.faiss"
    assert index_path.is_file(), "training saves the image index"
    original = load_index(index_path)
    build_index(np.random.default_rng(0).normal(size=(original.count, original.dim)), fingerprint="0123456789abcdef",
                ids=original.ids).save(index_path)
    before = index_path.read_bytes()
    err = _one_line_error(capsys, ["query", "--run", str(copy), "--text", "dog"], "0123456789abcdef")
    assert "rebuild" in err
    assert index_path.read_bytes() == before  # nothing overwritten


def _copy_with_other_vocabulary(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    other = [(s + "2", p, o) for s, p, o in VOCABULARY]
    fact_path = make_fact_file(tmp_path / "other.h5", other)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"]["fact_file"] = str(fact_path)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    # a run from before runs recorded their data (else refused by the recorded SHA-256 first, tests/test_faults.py)
    from mas_core.checkpoint import load_checkpoint, save_checkpoint

    (copy / "data.json").unlink()
    for model_path in copy.glob("*/model.pt"):
        state = load_checkpoint(model_path)
        del state["fact_file_sha256"]
        save_checkpoint(model_path, state)
    return copy


def test_fact_file_of_another_vocabulary_is_refused(run_dir, tmp_path, capsys):
    copy = _copy_with_other_vocabulary(run_dir, tmp_path)
    results_before = (copy / "results.json").read_bytes()
    _one_line_error(capsys, ["query", "--run", str(copy), "--text", "dog2"], "vocabulary")
    _one_line_error(capsys, ["evaluate", "--run", str(copy)], "vocabulary")
    assert (copy / "results.json").read_bytes() == results_before


def test_evaluate_command_rewrites_final_entries(run_dir, tmp_path, capsys):
    from triplets.facts.evaluate import final_metrics
    from triplets.run_folder import load_run

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    results = json.loads((copy / "results.json").read_text())
    results["methods"]["finetune"]["final"] = {"standard": [], "generalized": []}
    results.pop("sha256")  # edited by hand: without its checksum (kept, it would be refused as changed)
    (copy / "results.json").write_text(json.dumps(results))
    (copy / "results.md").unlink()
    assert main(["evaluate", "--run", str(copy), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["methods"]["finetune"]
    rewritten = json.loads((copy / "results.json").read_text())["methods"]["finetune"]
    with load_run(copy) as run:
        expected = final_metrics(run.load_model("finetune"), run.fact_file)
    assert len(rewritten["final"]["standard"]) == 2
    for mode in ("standard", "generalized"):
        for got, want in zip(rewritten["final"][mode], expected[mode]):
            for key in ("top1", "top5", "top10", "mrr", "map", "map_at_10", "map_at_100"):
                assert got[key] == pytest.approx(want[key])
    assert summary["generalized_top5"] == pytest.approx(np.mean([t["top5"] for t in expected["generalized"]]))
    assert rewritten["accuracy_matrix"] == results["methods"]["finetune"]["accuracy_matrix"]  # untouched
    assert "| finetune |" in (copy / "results.md").read_text()
    assert main(["evaluate", "--run", str(copy)]) == 0
    assert "avg top-5" in capsys.readouterr().out
    with pytest.raises(RunFolderError):
        from triplets.facts.evaluate import evaluate_run

        evaluate_run(tmp_path / "missing")
