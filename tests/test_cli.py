"""The command line: help with defaults, --version, program names, every argument and path
checked before any work (bad values, unwritable outputs, files that are not checkpoints),
and Ctrl-C ending with status 130 and one line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import sparseconv
from sparseconv import cli
from sparseconv.cli import EXIT_INTERRUPTED, help_text, main
from sparseconv.models import lenet5


@pytest.fixture
def no_work(monkeypatch):
    """Make every command fail loudly if it starts working: only parse-time checks may run."""
    import sparseconv.data
    import sparseconv.train

    def started(*args, **kwargs):
        raise AssertionError("the command started working before its arguments were checked")

    for module, name in [(cli, "demo"), (cli, "_train"), (cli, "_spectrum"), (sparseconv.data, "load_digits"),
                         (sparseconv.data, "load_mnist_idx"), (sparseconv.train, "train")]:
        monkeypatch.setattr(module, name, started)


def _refused(argv, capsys) -> str:
    """Run ``argv``; it must exit with status 2 and a one-line error. Returns that line."""
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    elapsed = time.perf_counter() - t0
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Refused at parse time, before any data or model is touched: well within a second.
    assert elapsed < 1.0, f"refusing {argv} took {elapsed:.2f}s"
    return err.strip().splitlines()[-1]


# ---------------------------------------------------------------- help, version, program name
def _options(help_section: str) -> dict[str, str]:
    """Option name -> its help text (joined over wrapped lines), from one ``--help`` output."""
    found = re.findall(r"^  (--[a-z-]+)(?: [A-Z_.{},a-z0-9]+)?\s*(.*(?:\n {10,}.*)*)", help_section, flags=re.M)
    return {name: " ".join(desc.split()) for name, desc in found}


def test_every_option_shows_its_default():
    sections = {m.group(1): m.group(0) for m in re.finditer(r"usage: sparseconv (\w+).*?(?=usage: |\Z)", help_text(),
                                                           flags=re.S)}
    assert set(sections) == {"demo", "train", "bench", "prune", "spectrum"}
    flags = {"--help", "--lenet", "--no-progress", "--no-plots"}
    for command, section in sections.items():
        for name, desc in _options(section).items():
            if name not in flags:
                assert "(default" in desc, f"{command} {name} does not show its default: {desc!r}"
    train, spectrum = _options(sections["train"]), _options(sections["spectrum"])
    for name, default in [("--epochs", "10"), ("--batch-size", "16"), ("--lr", "0.02"), ("--momentum", "0.9"),
                          ("--weight-decay", "0.002"), ("--schedule", "cosine"), ("--shift", "1"), ("--seed", "0"),
                          ("--dtype", "float32")]:
        assert f"(default: {default})" in train[name], name
    assert "(default: 1e-06)" in spectrum["--rtol"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparseconv {sparseconv.__version__}"


def test_console_script_program_name(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--epochs", "0"])  # the console script's entry point: main()
    assert capsys.readouterr().err.startswith("usage: sparseconv train")


@pytest.mark.slow
def test_module_program_name():
    run = subprocess.run([sys.executable, "-m", "sparseconv", "train", "--epochs", "0"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("usage: python -m sparseconv train")
    assert "python -m sparseconv train: error: argument --epochs: must be a positive integer; got '0'" in run.stderr


def test_the_console_script_entry_point_is_main():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["sparseconv"] == "sparseconv.cli:main"


# ---------------------------------------------------------------- values refused at parse time
@pytest.mark.parametrize("argv,message", [
    (["train", "--epochs", "0"], "argument --epochs: must be a positive integer; got '0'"),
    (["train", "--epochs", "2.5"], "argument --epochs: must be a positive integer; got '2.5'"),
    (["train", "--batch-size", "-4"], "argument --batch-size: must be a positive integer; got '-4'"),
    (["train", "--lr", "0"], "argument --lr: must be a positive finite number; got '0'"),
    (["train", "--lr", "nan"], "argument --lr: must be a positive finite number; got 'nan'"),
    (["train", "--lr", "inf"], "argument --lr: must be a positive finite number; got 'inf'"),
    (["train", "--momentum", "1"], r"argument --momentum: must be a number in [0, 1); got '1'"),
    (["train", "--weight-decay=-1e-3"], "argument --weight-decay: must be a non-negative finite number"),
    (["train", "--shift", "-1"], "argument --shift: must be a non-negative integer; got '-1'"),
    (["train", "--limit", "0", "--idx-dir", "."], "argument --limit: must be a positive integer; got '0'"),
    (["train", "--limit", "10"], "--limit applies to --idx-dir data only"),
    (["train", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["spectrum", "--rtol", "0"], "argument --rtol: must be a relative tolerance in (0, 1); got '0'"),
    (["spectrum", "--rtol", "1"], "argument --rtol: must be a relative tolerance in (0, 1); got '1'"),
    (["spectrum", "--rtol", "abc"], "argument --rtol: must be a relative tolerance in (0, 1); got 'abc'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_values_are_refused_before_any_work(argv, message, capsys, no_work):
    line = _refused(argv, capsys)
    assert line.startswith(f"sparseconv {argv[0]}: error: ")
    assert message in line


def test_idx_dir_must_be_a_directory(tmp_path, capsys, no_work):
    missing = tmp_path / "mnist"
    assert f"argument --idx-dir: '{missing}' is not a directory" in _refused(
        ["train", "--idx-dir", str(missing)], capsys)


# ---------------------------------------------------------------- output paths checked first
def _not_a_dir(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a directory")
    return blocker


@pytest.mark.parametrize("option", ["--save", "--plot"])
def test_unwritable_output_files_are_refused_naming_the_users_path(option, tmp_path, capsys, no_work):
    cases = {
        str(tmp_path / "missing" / "out.x"): f"directory '{tmp_path / 'missing'}' does not exist",
        str(_not_a_dir(tmp_path) / "out.x"): "does not exist",
        str(tmp_path): "is a directory, not a file name",
    }
    for path, reason in cases.items():
        line = _refused(["train", option, path], capsys)
        assert f"argument {option}:" in line and reason in line
        assert repr(path) in line or path in line
        assert ".tmp" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing was created


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write to read-only directories")
def test_read_only_directory_is_refused(tmp_path, capsys, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _refused(["train", "--save", str(locked / "c.npz")], capsys)
    finally:
        locked.chmod(0o700)
    assert f"directory '{locked}' is not writable" in line


def test_bench_output_directory_is_checked_before_running(tmp_path, capsys, monkeypatch):
    import sparseconv.bench

    def started(*args, **kwargs):
        raise AssertionError("the benchmark started before --out was checked")

    monkeypatch.setattr(sparseconv.bench, "run_from_args", started)
    blocker = _not_a_dir(tmp_path)
    line = _refused(["bench", "--suite", "smoke", "--out", str(blocker)], capsys)
    assert f"argument --out: '{blocker}' exists and is not a directory" in line
    line = _refused(["bench", "--suite", "smoke", "--out", str(blocker / "results")], capsys)
    assert f"cannot create '{blocker / 'results'}'" in line


def test_a_save_that_fails_after_training_names_the_users_path(tmp_path, capsys, monkeypatch):
    """The path was writable at the start; if writing still fails, the error names it."""
    import sparseconv.data
    import sparseconv.train
    from sparseconv.data import Dataset
    from sparseconv.nn import Module
    from sparseconv.train import History

    x = np.zeros((4, 1, 32, 32), np.float32)
    y = np.arange(4) % 2
    monkeypatch.setattr(sparseconv.data, "load_digits",
                        lambda **kwargs: Dataset(x, y, x, y, "toy", 10))
    monkeypatch.setattr(sparseconv.train, "train", lambda *a, **k: History([1.0], [0.5], [0.5], [0.1], [40.0]))

    def failing_save(self, path):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".c.npz.x1y2.tmp"))

    monkeypatch.setattr(Module, "save", failing_save)
    target = str(tmp_path / "c.npz")
    assert main(["train", "--save", target, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sparseconv train: error: could not write the checkpoint to '{target}': Permission denied"


# ---------------------------------------------------------------- files that are not checkpoints
@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "lenet5.npz"
    lenet5(dtype=np.float64, seed=3).save(path)
    return path.read_bytes()


def _corrupt_files(tmp_path, good: bytes) -> dict[str, str]:
    """name -> the reason the error must give."""
    files = {"empty.npz": (b"", "the file is empty"),
             "image.png": (b"\x89PNG\r\n\x1a\n" + bytes(200), "it is not a zip archive"),
             "text.npz": (b"hello, not an archive\n" * 10, "it is not a zip archive")}
    for k in (1, 4, 8, 12, 15):
        files[f"truncated_{k}of16.npz"] = (good[: len(good) * k // 16], "it is not a zip archive, or it is truncated")
    # A flipped byte inside the first member's data: the archive reads, the CRC does not match.
    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0xFF
    files["flipped.npz"] = (bytes(flipped), "truncated or corrupt")
    reasons = {}
    for name, (content, reason) in files.items():
        (tmp_path / name).write_bytes(content)
        reasons[name] = reason
    np.save(tmp_path / "array.npy", np.ones(3))
    reasons["array.npy"] = "it is not a zip archive"
    with zipfile.ZipFile(tmp_path / "no_arrays.npz", "w"):
        pass
    reasons["no_arrays.npz"] = "the archive holds no arrays"
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as archive:
        archive.writestr("readme.txt", "not an array")
    reasons["notes.zip"] = "member 'readme.txt' is not an array, not real numbers"
    np.savez(tmp_path / "strings.npz", weight=np.array(["a", "b"]))
    reasons["strings.npz"] = "member 'weight' is an array of <U1, not real numbers"
    np.savez(tmp_path / "complex.npz", weight=np.ones(2, complex))
    reasons["complex.npz"] = "member 'weight' is an array of complex128, not real numbers"
    return reasons


def test_files_that_are_not_checkpoints_are_refused_clearly(tmp_path, capsys, no_work, checkpoint_bytes):
    for name, reason in _corrupt_files(tmp_path, checkpoint_bytes).items():
        path = str(tmp_path / name)
        line = _refused(["spectrum", "--weights", path], capsys)
        assert line.startswith(f"sparseconv spectrum: error: argument --weights: '{path}' is not a checkpoint "
                               "written by 'train --save'"), (name, line)
        assert reason in line, (name, line)


def test_missing_checkpoint_and_directory(tmp_path, capsys, no_work):
    for path in (tmp_path / "nothing.npz", tmp_path):
        assert f"'{path}' does not exist or is not a file" in _refused(["spectrum", "--weights", str(path)], capsys)


# ---------------------------------------------------------------- Ctrl-C
def test_keyboard_interrupt_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "demo", interrupted)
    assert main(["demo"]) == EXIT_INTERRUPTED == 130
    captured = capsys.readouterr()
    assert captured.err == "sparseconv: interrupted\n"


@pytest.mark.slow
def test_sigint_in_a_real_process():
    """A real Ctrl-C (SIGINT) during a command: status 130, one line on stderr, no traceback."""
    script = ("import sys, time\n"
              "from sparseconv import cli\n"
              "def slow():\n"
              "    print('started', flush=True)\n"
              "    time.sleep(60)\n"
              "cli.demo = slow\n"
              "sys.exit(cli.main(['demo'], prog='python -m sparseconv'))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err == "python -m sparseconv: interrupted\n"


def test_plot_without_matplotlib_is_refused_before_training(monkeypatch, tmp_path, capsys, no_work):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    line = _refused(["train", "--plot", str(tmp_path / "curves.png")], capsys)
    assert line == "sparseconv train: error: --plot needs matplotlib: pip install 'sparseconv[plot]'"
