"""Hostile and careless input to `mas-triplets prepare vg|sgg|lll|images`, run as a user runs it
(``python -m triplets.cli`` in a subprocess, under a memory limit): exit code 2, exactly one line
on stderr naming the problem, and the output folder left byte for byte as it was."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_lll_benchmark import SPLIT, write_lll_fixture  # noqa: E402
from test_sgg_h5 import write_sgg_fixture  # noqa: E402
from test_visual_genome import write_vg_fixture  # noqa: E402

from data_prep.errors import DataPrepError  # noqa: E402
from data_prep.sources.json_stream import DepthLimitedReader, stream_json_array  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--no-text", "--no-progress", "--tasks", "2", "--min-fact-count", "1", "--image-size", "8"]
#: address-space limit of each CLI run: far below the machine, above what importing torch maps
CLI_MEMORY_LIMIT = 5 << 30


def _limit_memory(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_cli(*args: str, memory_limit: int = CLI_MEMORY_LIMIT, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "triplets.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout, preexec_fn=lambda: _limit_memory(memory_limit))


def folder_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``, hidden temporary files included."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture()
def out_dir(tmp_path: Path) -> Path:
    """An output folder already holding a fact file and a note, which a failed run must not touch."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "facts.h5").write_bytes(b"an earlier fact file the user keeps")
    (folder / "notes.txt").write_text("keep me\n")
    return folder


def assert_refused(result: subprocess.CompletedProcess, out_dir: Path, before: dict[str, str],
                   *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert folder_digest(out_dir) == before
    return lines[0]


def write_bomb(path: Path, side: int = 12000) -> Path:
    """A PNG declaring side x side pixels (144 million by default) in a few kilobytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", (side, side), 0).save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------- JSON nesting depth
def test_vg_deeply_nested_relationships_refused_in_bounded_memory_and_time(tmp_path: Path, out_dir: Path) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    (root / "relationships.json").write_text("[" * 100_000 + "]" * 100_000)  # 200 KB; ijson alone needs ~25 GB
    before = folder_digest(out_dir)
    started = time.monotonic()
    result = run_cli("prepare", "vg", "--vg-dir", str(root), "--out", str(out_dir / "facts.h5"), *COMMON)
    assert time.monotonic() - started < 120
    assert_refused(result, out_dir, before, "relationships.json", "deeper than 64 levels", "--max-json-depth")


def test_deep_json_refused_by_the_reader_with_small_peak_memory(tmp_path: Path) -> None:
    """data_prep alone in a child process under a 1.5 GB address-space limit: refused, peak RSS small."""
    path = tmp_path / "relationships.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    code = ("import sys\n"
            "from pathlib import Path\n"
            "from data_prep.sources.json_stream import stream_json_array\n"
            "from data_prep.errors import DataPrepError\n"
            "try:\n"
            f"    list(stream_json_array(Path({str(path)!r})))\n"
            "except DataPrepError as exc:\n"
            "    print('refused:', exc)\n"
            "peak = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0]\n"
            "print('peak_mb', int(peak.split()[1]) // 1024)\n")  # VmHWM: ru_maxrss keeps the forking parent's
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=lambda: _limit_memory(3 << 29))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stdout and "deeper than 64" in result.stdout
    peak = int(result.stdout.split("peak_mb")[1])
    assert peak < 200, peak  # ~50 MB of interpreter and numpy; the 40 KB case took ~1 GB before the limit


def test_sgg_deeply_nested_dicts_refused(tmp_path: Path, out_dir: Path) -> None:
    fixture = write_sgg_fixture(tmp_path / "sgg")
    fixture["dicts_path"].write_text('{"idx_to_label": ' + "[" * 50_000 + "]" * 50_000 + "}")
    before = folder_digest(out_dir)
    result = run_cli("prepare", "sgg", "--h5", str(fixture["h5_path"]), "--dicts", str(fixture["dicts_path"]),
                     "--image-data", str(fixture["image_data_path"]), "--images", str(fixture["images_dir"]),
                     "--out", str(out_dir / "facts.h5"), *COMMON)
    assert_refused(result, out_dir, before, "VG-SGG-dicts.json", "deeper than 64")


def test_depth_limit_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"a": [[[[1]]]]}]))  # depth 6
    assert list(stream_json_array(path, max_depth=6)) == [{"a": [[[[1]]]]}]
    with pytest.raises(DataPrepError, match="deeper than 5 levels"):
        list(stream_json_array(path, max_depth=5))


def test_depth_reader_ignores_brackets_in_strings_across_chunks(tmp_path: Path) -> None:
    records = [{"name": "[[[[{{{{" * 40, "quote": 'a \\" [[[ \\\\', "x": [[1]]}, {"name": "}}}]]]" * 40}]
    text = json.dumps(records)
    for chunk in (1, 2, 3, 7, 64):  # every split point, escapes and quotes cut in two
        reader = DepthLimitedReader(None, tmp_path / "x.json", max_depth=4)
        data = text.encode()
        for start in range(0, len(data), chunk):
            reader.check(data[start:start + chunk])
        assert reader.depth == 0 and not reader.in_string
    path = tmp_path / "x.json"
    path.write_text(text)
    assert list(stream_json_array(path, max_depth=4)) == records


# ---------------------------------------------------------------------------- decompression bombs
def test_vg_bomb_image_is_one_line_naming_file_and_size(tmp_path: Path, out_dir: Path) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    (root / "VG_100K" / "1.jpg").unlink()
    bomb = write_bomb(root / "VG_100K" / "1.png")
    before = folder_digest(out_dir)
    result = run_cli("prepare", "vg", "--vg-dir", str(root), "--out", str(out_dir / "facts.h5"), *COMMON)
    assert_refused(result, out_dir, before, str(bomb), "12000 x 12000", "144,000,000 pixels", "--max-image-pixels")


def test_sgg_bomb_image(tmp_path: Path, out_dir: Path) -> None:
    fixture = write_sgg_fixture(tmp_path / "sgg")
    (fixture["images_dir"] / "VG_100K" / "10.jpg").unlink()
    bomb = write_bomb(fixture["images_dir"] / "VG_100K" / "10.png")
    before = folder_digest(out_dir)
    result = run_cli("prepare", "sgg", "--h5", str(fixture["h5_path"]), "--dicts", str(fixture["dicts_path"]),
                     "--image-data", str(fixture["image_data_path"]), "--images", str(fixture["images_dir"]),
                     "--out", str(out_dir / "facts.h5"), *COMMON)
    assert_refused(result, out_dir, before, str(bomb), "12000 x 12000")


def test_lll_bomb_image(tmp_path: Path, out_dir: Path) -> None:
    root = write_lll_fixture(tmp_path / "data")
    bomb = write_bomb(root / "images" / "train" / "img1.png")
    before = folder_digest(out_dir)
    result = run_cli("prepare", "lll", "--root", str(root), "--split", SPLIT, "--out", str(out_dir / "facts.h5"),
                     "--image-size", "8", "--no-progress", "--text-encoder", "native")
    assert_refused(result, out_dir, before, str(bomb), "12000 x 12000")


def _image_folder(root: Path) -> Path:
    for split, count in (("train", 3), ("test", 2)):
        for label, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.new("RGB", (20 + index, 16), colour).save(folder / f"{index}.png")
    return root


def test_images_bomb_is_one_line_not_a_traceback(tmp_path: Path, out_dir: Path) -> None:
    root = _image_folder(tmp_path / "folder")
    bomb = write_bomb(root / "train" / "red" / "9.png")
    before = folder_digest(out_dir)
    result = run_cli("prepare", "images", "--dataset", "image_folder", "--root", str(root),
                     "--out", str(out_dir / "facts.h5"), "--image-size", "8")
    assert_refused(result, out_dir, before, str(bomb), "12000 x 12000", "--max-image-pixels")


def prepare_commands(base: Path) -> dict[str, list[str]]:
    """The four `prepare` commands on their fixtures under ``base``, without ``--out``."""
    vg = write_vg_fixture(base / "vg")
    sgg = write_sgg_fixture(base / "sgg")
    lll = write_lll_fixture(base / "data")
    folder = _image_folder(base / "folder")
    return {
        "vg": ["prepare", "vg", "--vg-dir", str(vg), *COMMON],
        "sgg": ["prepare", "sgg", "--h5", str(sgg["h5_path"]), "--dicts", str(sgg["dicts_path"]), "--image-data",
                str(sgg["image_data_path"]), "--images", str(sgg["images_dir"]), *COMMON],
        "lll": ["prepare", "lll", "--root", str(lll), "--split", SPLIT, "--image-size", "8", "--no-progress",
                "--text-encoder", "native"],
        "images": ["prepare", "images", "--dataset", "image_folder", "--root", str(folder), "--image-size", "8"],
    }


def test_pixel_limit_option_applies_to_every_command(tmp_path: Path, out_dir: Path) -> None:
    """The fixtures' largest images are 256 x 128 (sgg), 40 x 30 (vg), 23 x 16 (images), 17 x 9 (lll)."""
    commands = prepare_commands(tmp_path)
    before = folder_digest(out_dir)
    for name, command in commands.items():
        result = run_cli(*command, "--out", str(out_dir / "facts.h5"), "--max-image-pixels", "100")
        assert_refused(result, out_dir, before, "above the limit of 100 pixels")
    result = run_cli(*commands["images"], "--out", str(tmp_path / "ok.h5"), "--max-image-pixels", "400")
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- misleading messages
def test_vg_without_any_image_on_disk_says_where_it_looked(tmp_path: Path, out_dir: Path) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    for path in list(root.rglob("*.jpg")):
        path.unlink()
    before = folder_digest(out_dir)
    result = run_cli("prepare", "vg", "--vg-dir", str(root), "--out", str(out_dir / "facts.h5"), *COMMON)
    line = assert_refused(result, out_dir, before, "no image file", str(root / "VG_100K"), "--no-images")
    assert "min-fact-count" not in line


def test_vg_images_of_another_dump_do_not_say_lower_min_fact_count(tmp_path: Path, out_dir: Path) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    for path in list(root.rglob("*.jpg")):
        path.rename(path.with_name(f"9{path.name}"))  # images exist, none of the listed ids
    before = folder_digest(out_dir)
    result = run_cli("prepare", "vg", "--vg-dir", str(root), "--out", str(out_dir / "facts.h5"), *COMMON)
    line = assert_refused(result, out_dir, before, "image found on disk", "images missing")
    assert "min-fact-count" not in line


def test_vg_relationships_without_relationships_key_is_exit_2(tmp_path: Path, out_dir: Path) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    records = json.loads((root / "relationships.json").read_text())
    for record in records:
        record["rels"] = record.pop("relationships")
    (root / "relationships.json").write_text(json.dumps(records))
    before = folder_digest(out_dir)
    result = run_cli("prepare", "vg", "--vg-dir", str(root), "--out", str(out_dir / "facts.h5"), *COMMON)
    assert_refused(result, out_dir, before, "relationships.json", f"none of its {len(records)} records",
                   "'relationships' list")


def test_vg_corrupt_image_found_by_the_check_is_dropped_not_fatal(tmp_path: Path) -> None:
    """A truncated JPEG (as in the real dump) is found by the check pass and its samples dropped."""
    root = write_vg_fixture(tmp_path / "vg")
    good = root / "VG_100K_2" / "2.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    result = run_cli("prepare", "vg", "--vg-dir", str(root), "--out", str(tmp_path / "f.h5"), *COMMON)
    assert result.returncode == 0, result.stderr
    assert "images that do not decode" in result.stdout
    from data_prep import open_facts

    with open_facts(tmp_path / "f.h5") as facts:
        assert set(facts.sample_image_id.tolist()) == {1}


def test_huge_image_size_is_one_line_before_any_work(tmp_path: Path, out_dir: Path) -> None:
    root = write_vg_fixture(tmp_path / "vg")
    folder = _image_folder(tmp_path / "folder")
    before = folder_digest(out_dir)
    for command in (["prepare", "vg", "--vg-dir", str(root), "--no-text", "--no-progress", "--image-size", "100000"],
                    ["prepare", "images", "--dataset", "image_folder", "--root", str(folder),
                     "--image-size", "100000"]):
        result = run_cli(*command, "--out", str(out_dir / "facts.h5"))
        assert_refused(result, out_dir, before, "must be at most 1024", "100000")


def test_images_of_16_bit_grey_pngs_are_stored_as_a_gradient(tmp_path: Path) -> None:
    """`prepare images` used to clip 16-bit PNGs to all-white; the values are now scaled (÷ 257)."""
    import h5py

    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))  # 64 x 16, left to right
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            Image.fromarray(gradient).save(root / split / label / "0.png")
    out = tmp_path / "grey16.h5"
    result = run_cli("prepare", "images", "--dataset", "image_folder", "--root", str(root), "--out", str(out),
                     "--image-size", "16")
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as handle:
        images = handle["train"]["images"][()]
    assert images.shape[1:] == (16, 16, 1)  # grey stays one channel
    expected = ((gradient[:, 24:40].astype(np.uint32) + 128) // 257).astype(np.uint8)  # the centre crop
    np.testing.assert_array_equal(images[0, :, :, 0], expected)
    assert images.max() < 255 and len(np.unique(images)) == 16


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(item) for item in value.values()), default=0)
    return 0


def test_depth_reader_agrees_with_the_parsed_depth_for_random_documents(tmp_path: Path) -> None:
    """Random documents with strings full of quotes, backslashes and brackets, cut at random points."""
    rng = np.random.default_rng(7)
    alphabet = list('[]{}"\\\\ab ,:\\u00e9')

    def document(level: int) -> object:
        kind = rng.integers(0, 4 if level < 9 else 1)
        if kind == 0:
            return "".join(rng.choice(alphabet, rng.integers(0, 12)))
        if kind == 1:
            return [document(level + 1) for _ in range(rng.integers(0, 4))]
        if kind == 2:
            return {"".join(rng.choice(alphabet, 3)): document(level + 1) for _ in range(rng.integers(0, 3))}
        return float(rng.normal())

    for _ in range(300):
        value = [document(1)]
        data = json.dumps(value, ensure_ascii=bool(rng.integers(0, 2))).encode()
        true_depth = _depth(value)
        cuts = np.sort(rng.integers(0, len(data) + 1, rng.integers(0, 6)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        for limit, refused in ((true_depth, False), (true_depth - 1, True)):
            reader = DepthLimitedReader(None, tmp_path / "r.json", limit)
            try:
                for piece in pieces:
                    reader.check(piece)
                assert not refused, (data, limit)
                assert reader.depth == 0 and not reader.in_string
            except DataPrepError:
                assert refused, (data, limit)


def test_depth_reader_fast_path_agrees_with_the_general_pass(tmp_path: Path) -> None:
    """Plain documents (the fast path's case) and ones with a few tricky strings, cut at random points:
    after every piece the reader is in the state the general pass alone reaches, and a refusal names
    the same byte (issue 27)."""
    rng = np.random.default_rng(27)
    plain, tricky = list("abc xyz"), list('[]{}"\\ab')

    def document(level: int) -> object:
        kind = rng.integers(0, 4 if level < 8 else 1)
        if kind == 0:
            alphabet = tricky if rng.random() < 0.05 else plain
            return "".join(rng.choice(alphabet, rng.integers(0, 8)))
        if kind == 1:
            return [document(level + 1) for _ in range(rng.integers(0, 4))]
        if kind == 2:
            return {"".join(rng.choice(plain, 3)): document(level + 1) for _ in range(rng.integers(0, 3))}
        return int(rng.integers(0, 100))

    class GeneralOnly(DepthLimitedReader):
        def _check_fast(self, data: bytes) -> bool:
            return False

    fast_taken = 0
    for _ in range(300):
        data = json.dumps([document(1) for _ in range(3)]).encode()
        cuts = np.sort(rng.integers(0, len(data) + 1, rng.integers(0, 8)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        limit = int(rng.integers(2, 9))
        fast, general = DepthLimitedReader(None, tmp_path / "r.json", limit), GeneralOnly(None, tmp_path / "r.json", limit)
        for piece in pieces:
            state = (fast.depth, fast.in_string, fast.escape_next, fast.offset)
            fast_taken += bool(piece) and fast._check_fast(piece)
            fast.depth, fast.in_string, fast.escape_next, fast.offset = state  # undo: now the full check
            errors = []
            for reader in (fast, general):
                try:
                    reader.check(piece)
                except DataPrepError as error:
                    errors.append(str(error))
            assert len(errors) in (0, 2) and (not errors or errors[0] == errors[1]), (data, limit, errors)
            if errors:
                break
            assert (fast.depth, fast.in_string, fast.escape_next, fast.offset) == \
                (general.depth, general.in_string, general.escape_next, general.offset), (data, piece)
    assert fast_taken > 300  # the fast path was exercised, not only the general pass
