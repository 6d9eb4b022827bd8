"""Recipes and benchmark scripts run from a shell: a loraxir error is one line and exit
status 2, other outcomes keep their exit status."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loraxir.errors import ConfigError
from loraxir.training.entry import run_script

ROOT = Path(__file__).resolve().parents[1]


def test_a_loraxir_error_is_one_line_and_exit_status_2(capsys) -> None:
    def main() -> None:
        raise ConfigError("Config file 'nope.yaml' does not exist.")

    with pytest.raises(SystemExit) as exited:
        run_script(main)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("error: Config file 'nope.yaml' does not exist.")
    assert "Traceback" not in err


def test_a_new_run_forgets_a_ctrl_c_of_an_earlier_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes run in one process (the benchmark, the tests) each start uninterrupted."""
    from loraxir.training import entry

    monkeypatch.setattr(entry, "_interrupted", True)
    with pytest.raises(SystemExit) as exited:
        run_script(entry.raise_if_interrupted)
    assert exited.value.code == 0


def test_ctrl_c_exits_130_with_the_hint_and_a_bug_keeps_its_traceback(capsys) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        run_script(interrupted, "Add --resume latest.")
    assert exited.value.code == 130 and "Add --resume latest." in capsys.readouterr().err

    def terminated() -> None:  # what `timeout` and job schedulers send
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited:
        run_script(terminated, "Add --resume latest.")
    assert exited.value.code == 143 and "Interrupted. Add --resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before, "the process's own handling is back"

    def buggy() -> None:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run_script(buggy)


def test_a_full_disk_is_one_line_with_the_resume_hint_and_other_os_errors_keep_theirs(
    capsys,
) -> None:
    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "out/results.json")

    with pytest.raises(SystemExit) as exited:
        run_script(full, "Rerun the same command.")
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "Traceback" not in err
    assert "No space left on device: 'out/results.json'" in err and "Rerun the same" in err

    for raised in (  # a read-only or foreign folder, a quota
        PermissionError(errno.EACCES, "Permission denied", "out/checkpoints"),
        OSError(errno.EROFS, "Read-only file system", "out"),
        OSError(errno.EDQUOT, "Disk quota exceeded", "out"),
    ):

        def writing(error: Exception = raised) -> None:
            raise error

        with pytest.raises(SystemExit) as exited:
            run_script(writing, "Rerun the same command.")
        assert exited.value.code == 1 and "Rerun the same" in capsys.readouterr().err

    for raised in (  # how safetensors and torch.save report a full disk
        Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    ):

        def saving(error: Exception = raised) -> None:
            raise error

        with pytest.raises(SystemExit) as exited:
            run_script(saving, "Rerun the same command.")
        assert exited.value.code == 1 and "Rerun the same" in capsys.readouterr().err

    for raised in (  # a GPU's and the CPU allocator's out-of-memory errors
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] can't allocate memory: 1200 bytes"),
        MemoryError(),
        Exception("Unable to allocate 1.00 PiB for an array with shape (2**50,)"),  # NumPy
    ):

        def allocating(error: Exception = raised) -> None:
            raise error

        with pytest.raises(SystemExit) as exited:
            run_script(allocating, "Rerun the same command.")
        err = capsys.readouterr().err
        assert exited.value.code == 1 and "Traceback" not in err
        assert "out of memory" in err and "Lower batch_size or patch_size" in err

    def missing() -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file", "x")

    with pytest.raises(FileNotFoundError):
        run_script(missing)


@pytest.mark.parametrize("script", ["pretrain", "finetune", "add_degradation", "train_router"])
def test_recipes_report_a_missing_config_without_a_traceback(script, tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / f"{script}.py"),
            "--config",
            str(tmp_path / "no.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert f"{script}.py: error: Config file" in result.stderr
    assert "Traceback" not in result.stderr
