"""The prune command: argument checks before any work, and one small end-to-end run."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest

from sparseconv import prune_cli


def _parser():
    return prune_cli.add_arguments(argparse.ArgumentParser(prog="prune"))


@pytest.fixture
def no_work(monkeypatch):
    """Any attempt to load data (the first piece of work) fails the test."""
    import sparseconv.data

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")
    monkeypatch.setattr(sparseconv.data, "load_digits", refuse)


@pytest.mark.parametrize("argv,match", [
    (["--epochs", "0"], r"--epochs must be a positive int; got 0"),
    (["--train-epochs", "-1"], r"--train-epochs must be a positive int; got -1"),
    (["--repeats", "0"], r"--repeats must be a positive int"),
    (["--lr", "-0.1"], r"--lr must be a positive number; got -0.1"),
    (["--lr", "nan"], r"--lr must be a positive number; got nan"),
    (["--structure", "filter", "--scope", "global"],
     r"--structure filter prunes whole units layer by layer: add --scope layer"),
    (["--weights", "/nonexistent/w.npz"], r"--weights: no such file '/nonexistent/w.npz'"),
    (["--plot", "/nonexistent/dir/p.png"], r"--plot: directory '/nonexistent/dir' does not exist"),
])
def test_bad_arguments_are_refused_before_any_work(no_work, argv, match):
    args = _parser().parse_args(argv)
    with pytest.raises(ValueError, match=match):
        prune_cli.run(args)


def test_a_file_that_is_not_a_lenet_checkpoint_is_refused(no_work, tmp_path):
    bad = tmp_path / "other.npz"
    np.savez(bad, weight=np.zeros(3))
    with pytest.raises(ValueError, match=r"--weights: '.*other.npz' is not a LeNet-5 checkpoint"):
        prune_cli.run(_parser().parse_args(["--weights", str(bad)]))


def test_plot_path_that_is_a_directory_is_refused(no_work, tmp_path):
    with pytest.raises(ValueError, match=r"--plot must be a file path; got the directory"):
        prune_cli.run(_parser().parse_args(["--plot", str(tmp_path)]))


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "half"])
def test_sparsity_outside_0_1_is_an_argument_error(value, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--sparsity", value])
    assert "sparsity must be" in capsys.readouterr().err


def test_defaults():
    args = _parser().parse_args([])
    assert args.sparsity == [0.5, 0.75, 0.9, 0.95]
    assert args.epochs >= 1 and args.scope == "layer" and args.structure == "element"


def test_a_small_run_prints_one_row_per_sparsity_and_plots(tmp_path, capsys):
    from sparseconv.models import lenet5

    weights = tmp_path / "w.npz"
    lenet5(dtype=np.float32, seed=0).save(weights)
    plot = tmp_path / "prune.png"
    args = _parser().parse_args(["--weights", str(weights), "--sparsity", "0.9", "0.5", "--epochs", "1",
                                 "--repeats", "1", "--plot", str(plot), "--no-progress"])
    assert prune_cli.run_from_args(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert plot.stat().st_size > 0
    assert re.match(r"sparsity 0\.50: test accuracy 0\.\d{4}, conv weights kept 25,275 of 50,550, stored entries "
                    r"[\d,]+, inference [\d.]+ ms sparse", lines[-2])
    # The last line is the highest sparsity asked, whatever the order given.
    assert re.match(r"sparsity 0\.90: test accuracy 0\.\d{4}, conv weights kept 5,055 of 50,550", lines[-1])
    assert lines[-3].startswith("dense ")
