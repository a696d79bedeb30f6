"""The README's Python example runs as written and computes what it says."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_and_penalty_starts_at_zero():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no Python example"
    block = next((text for text in blocks if "mas_importance" in text), None)
    assert block is not None, "README has no MAS example"
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    omega, mas, model = namespace["omega"], namespace["mas"], namespace["model"]
    assert set(omega) == {name for name, _ in model.named_parameters()}
    assert all(bool((value >= 0).all()) for value in omega.values())
    # the default proximal step puts nothing in the loss: the penalty is exactly zero, and the step
    # after the optimizer pulled θ back toward θ* (the same λ in the gradient form gives a positive penalty)
    assert mas.penalty_step == "proximal" and float(mas.penalty(model).detach()) == 0.0
    assert float(torch.nn.utils.parameters_to_vector(model.parameters()).isfinite().all())
    for name, value in mas.importance.items():
        torch.testing.assert_close(value, omega[name], rtol=1e-5, atol=1e-12)


def test_readme_names_both_front_door_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text


def test_readme_sharded_index_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    block = next(text for text in blocks if "build_sharded_index" in text)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    ids, index = namespace["ids"], namespace["index"]
    assert ids.shape == (5, 10) and ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert index.count == 20_000
    written = sorted(path.name for path in (tmp_path / "indexes" / "images").iterdir())
    assert written == ["manifest.json", "shard-00000-of-00004.faiss", "shard-00001-of-00004.faiss",
                       "shard-00002-of-00004.faiss", "shard-00003-of-00004.faiss", "vectors.npy"]


def test_readme_exact_search_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    block = next(text for text in blocks if "exact_search" in text)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    ids, same_ids, index = namespace["ids"], namespace["same_ids"], namespace["index"]
    assert index.exact_backend == "faiss-rescored"  # no GPU here
    assert ids.shape == (5, 10) and ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert (ids == same_ids).all()
