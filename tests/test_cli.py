"""The console script's front door and the package layering."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from triplets.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("mas-triplets 0.")
    assert main([]) == 0
    help_text = capsys.readouterr().out
    for name in COMMANDS:
        assert name in help_text, f"subcommand {name} missing from --help"


def test_every_subcommand_is_registered():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(COMMANDS) <= set(choices)


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "mas-triplets"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: mas-triplets" in result.stdout


def _imports(package: str) -> set[str]:
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_mas_core_and_data_prep_do_not_import_each_other_or_the_application():
    assert not {"triplets", "data_prep"} & _imports("mas_core")
    assert not {"triplets", "mas_core"} & _imports("data_prep")


def test_importing_the_packages_has_no_side_effects():
    code = (
        "import os, sys; before = dict(os.environ); "
        "import mas_core, data_prep, triplets, triplets.cli; "
        "assert dict(os.environ) == before, 'environment changed at import'; "
        "assert 'transformers' not in sys.modules and 'faiss' not in sys.modules, 'heavy import at import time'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
