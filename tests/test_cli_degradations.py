"""`loraxir degradations`: the gallery, the listing and the errors."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from loraxir import cli, degradations


def test_gallery_of_a_suite_is_written(tmp_path, capsys):
    out = tmp_path / "gallery.png"
    assert cli.main(["degradations", "--suite", "three_task", "-o", str(out), "--size", "48"]) == 0
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size[0] == 3 * 68  # 3 columns of 48 + 20 px
        assert image.size[1] > 2 * 48  # 2 rows (clean + 5 tasks) of images and titles
        assert np.asarray(image.convert("L")).std() > 10


def test_gallery_reads_an_image_file_and_a_user_suite(tmp_path):
    gray = np.tile(np.arange(64, dtype=np.uint8) * 4, (40, 1))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    suite = tmp_path / "mine.yaml"
    suite.write_text("tasks:\n  - {name: a, steps: [noise]}\n  - {name: b, steps: [jpeg]}\n")
    out = tmp_path / "nested" / "g.png"
    argv = ["degradations", "--image", str(tmp_path / "gray.png"), "--suite", str(suite)]
    assert cli.main([*argv, "-o", str(out), "--size", "32", "--columns", "2"]) == 0
    with Image.open(out) as image:
        assert image.size[0] == 2 * 52 and image.size[1] > 2 * 32


def test_all_renders_every_registered_degradation(tmp_path):
    out = tmp_path / "all.png"
    assert (
        cli.main(["degradations", "--all", "-o", str(out), "--size", "32", "--columns", "5"]) == 0
    )
    rows = -(-(len(degradations.available()) + 1) // 5)
    with Image.open(out) as image:
        assert image.size[0] == 5 * 52 and image.size[1] > rows * 32


def test_list_prints_degradations_parameters_and_suites(capsys):
    assert cli.main(["degradations", "--list"]) == 0
    text = capsys.readouterr().out
    for name in degradations.available() + degradations.available_suites():
        assert f"{name}:" in text
    assert "sigma" in text and "allowed [1, 100]" in text


def test_a_reader_that_stops_early_gets_no_traceback():
    """`loraxir degradations --list | head -1`: the pipe closes before the listing ends."""
    code = "import sys; from loraxir import cli; sys.exit(cli.main(sys.argv[1:]))"
    listing = subprocess.Popen(
        [sys.executable, "-c", code, "degradations", "--list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    listing.stdout.close()  # before the child has written anything
    error = listing.stderr.read().decode()
    assert listing.wait(timeout=60) == 141
    assert "Traceback" not in error and "Exception ignored" not in error, error


def test_unknown_suite_exits_2_listing_the_known_ones(tmp_path, capsys):
    assert cli.main(["degradations", "--suite", "five_tasks", "-o", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert "Unknown suite 'five_tasks'" in error and "three_task" in error


def test_unreadable_image_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert cli.main(["degradations", "--image", str(bad), "-o", str(tmp_path / "x.png")]) == 2
    assert "Cannot read image" in capsys.readouterr().err  # from its header, before decoding


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 1
    assert "degradations" in capsys.readouterr().out


def test_cli_module_imports_only_the_standard_library_at_top_level():
    tree = ast.parse(Path(cli.__file__).read_text())
    modules = [
        alias.name.split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])
    ]
    assert set(modules) <= set(sys.stdlib_module_names) | {"__future__"}


def test_bad_size_is_refused(tmp_path, capsys):
    assert cli.main(["degradations", "--size", "4", "-o", str(tmp_path / "x.png")]) == 2
    assert "--size must be >= 16" in capsys.readouterr().err
    for seed in ("-1", str(2**64)):
        assert cli.main(["degradations", "--seed", seed, "-o", str(tmp_path / "x.png")]) == 2
        assert "--seed must be in [0, 2**63 - 1]" in capsys.readouterr().err


def test_an_output_suffix_matplotlib_cannot_write_exits_2(tmp_path, capsys):
    out = tmp_path / "gal.jpgx"
    assert cli.main(["degradations", "-o", str(out), "--size", "16"]) == 2
    assert "--output" in (err := capsys.readouterr().err) and ".jpgx is not a format" in err
    assert not out.exists()


def test_an_output_that_is_a_folder_or_under_a_file_exits_2_before_drawing(tmp_path, capsys):
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "afile").write_text("mine")
    for out, message in ((tmp_path / "taken.png", "is a folder"),
                         (tmp_path / "afile" / "g.png", "is a file")):  # fmt: skip
        assert cli.main(["degradations", "--suite", "three_task", "-o", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"
