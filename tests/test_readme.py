"""The README's Python example runs as written and computes what it says."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs_and_penalty_starts_at_zero():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    omega, mas, model = namespace["omega"], namespace["mas"], namespace["model"]
    assert set(omega) == {name for name, _ in model.named_parameters()}
    assert all(bool((value >= 0).all()) for value in omega.values())
    # θ has not moved since after_task, so the penalty is exactly zero
    assert float(mas.penalty(model).detach()) == 0.0
    for name, value in mas.importance.items():
        torch.testing.assert_close(value, omega[name], rtol=1e-5, atol=1e-12)


def test_readme_names_both_front_door_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
