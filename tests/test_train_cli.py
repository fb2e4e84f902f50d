"""Training loop and the command line's commands: smoke runs, failure behaviour, outputs.

The command line's argument checking is in test_cli.py, the plots in test_plotting.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import sparseconv as sc
from sparseconv.cli import lenet_table, main
from sparseconv.data import Dataset
from sparseconv.models import LENET5_TABLE, lenet5
from sparseconv.nn import Conv2d, Flatten, Linear, Sequential, Tanh
from sparseconv.train import TrainingDiverged, evaluate, train


def _toy_data(n: int = 48, seed: int = 0, dtype=np.float64) -> Dataset:
    """Two classes told apart by which half of an 8x8 image is bright."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.normal(0, 0.1, size=(n, 1, 8, 8))
    x[y == 0, :, :4] += 1
    x[y == 1, :, 4:] += 1
    x = x.astype(dtype)
    return Dataset(x_train=x[: n * 3 // 4], y_train=y[: n * 3 // 4].astype(np.int64), x_test=x[n * 3 // 4:],
                   y_test=y[n * 3 // 4:].astype(np.int64), name="toy", classes=2)


def _toy_net(dtype=np.float64) -> Sequential:
    return Sequential(Conv2d(1, 2, 3, rng=0, dtype=dtype), Tanh(), Flatten(), Linear(72, 2, rng=1, dtype=dtype))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_training_smoke_loss_decreases(loss):
    data = _toy_data()
    net = _toy_net()
    history = train(net, data, epochs=4, batch_size=8, lr=0.1, loss=loss, progress=False, log=None)
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.test_accuracy[-1] == evaluate(net, data.x_test, data.y_test)
    assert len(history.seconds) == 4 and all(s > 0 for s in history.samples_per_second)


def test_training_is_reproducible_with_a_seed():
    runs = [train(_toy_net(), _toy_data(), epochs=2, batch_size=8, progress=False, log=None, seed=3).train_loss
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_float32_training_stays_float32():
    data = _toy_data(dtype=np.float32)
    net = _toy_net(np.float32)
    train(net, data, epochs=1, batch_size=8, progress=False, log=None)
    assert all(p.data.dtype == np.float32 and p.grad.dtype == np.float32 for p in net.parameters())


def test_nan_loss_names_epoch_and_step():
    data = _toy_data()
    bad = data.x_train.copy()
    bad[:] = np.nan
    data = Dataset(bad, data.y_train, data.x_test, data.y_test, "nan", 2)
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step 1 .*lower learning rate"):
        train(_toy_net(), data, epochs=2, batch_size=8, progress=False, log=None)


# The point of this test is an overflowing loss, so numpy's overflow warning is expected.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_divergence_from_a_huge_learning_rate():
    data = _toy_data()
    net = Sequential(Flatten(), Linear(64, 2, rng=0))
    with pytest.raises(TrainingDiverged, match=r"the loss became (nan|inf) at epoch \d+, step \d+ \(lr=1e\+30\)"):
        train(net, data, epochs=5, batch_size=8, lr=1e30, momentum=0.0, loss="mse", schedule="constant",
              progress=False, log=None)


@pytest.mark.parametrize("kwargs,match", [
    (dict(epochs=0), "epochs must be a positive int; got 0"),
    (dict(batch_size=0), "batch_size must be a positive int; got 0"),
    (dict(loss="hinge"), r"loss must be one of \['cross_entropy', 'mse'\]; got 'hinge'"),
    (dict(schedule="step"), "schedule must be 'cosine' or 'constant'; got 'step'"),
    (dict(shift=-1), "shift must be a non-negative int; got -1"),
])
def test_train_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train(_toy_net(), _toy_data(), progress=False, log=None, **kwargs)


def test_labels_out_of_range_name_the_loss():
    data = _toy_data()
    data = Dataset(data.x_train, data.y_train + 5, data.x_test, data.y_test, "bad", 2)
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: labels must be in \[0, 2\)"):
        train(_toy_net(), data, epochs=1, progress=False, log=None)


def test_wrong_input_shape_names_the_layer():
    net = lenet5()
    with pytest.raises(sc.nn.LayerInputError, match=r"layer 0 \(Conv2d\(1, 6"):
        net.forward(np.zeros((2, 3, 32, 32)))


def test_demo_prints_the_seed_examples(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "w0  w1   .  w2  w3   .   .   .   ." in out
    assert "nnz = 16, distinct parameters = 4, a fully connected 9 -> 4 layer would need 36" in out
    assert out.count("max |difference| = 0.0e+00") == 2


def test_demo_lenet_table(capsys):
    rows = {r["layer"]: r for r in lenet_table()}
    for name, (params, connections) in LENET5_TABLE.items():
        assert (rows[name]["params"], rows[name]["connections"]) == (params, connections), name
    assert rows["C1"]["shape"] == (6 * 28 * 28, 32 * 32) and rows["C1"]["nnz"] == 117_600
    assert rows["C3"]["dense_params"] == 1600 * 1176 + 1600
    main(["demo", "--lenet"])
    out = capsys.readouterr().out
    assert "C3     Conv2d           1600x1176    150,000   1,516      151,600" in out


@pytest.mark.slow
def test_cli_train_on_digits_saves_checkpoint_and_plot(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the bundled digits need scikit-learn (pip install 'sparseconv[data]')")
    pytest.importorskip("matplotlib", reason="the training-curve plot needs matplotlib")
    ckpt, png = tmp_path / "lenet.npz", tmp_path / "curves.png"
    assert main(["train", "--epochs", "1", "--no-progress", "--save", str(ckpt), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "epoch   1/1" in out and "final test accuracy" in out
    net = lenet5(dtype=np.float32, seed=123)
    net.load(ckpt)
    with np.load(ckpt, allow_pickle=False) as saved:
        np.testing.assert_array_equal(net.state_dict()["0.weight"], saved["0.weight"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_spectrum_command_cross_checks_fft(capsys):
    assert main(["spectrum"]) == 0
    out = capsys.readouterr().out
    for name in ("C1", "S2", "C3", "S4", "C5", "F6"):
        assert f"\n{name} " in out
    diffs = [float(part.split("rel. diff ")[1].rstrip(")")) for part in out.splitlines() if "rel. diff" in part]
    assert len(diffs) == 3 and max(diffs) < 1e-8
    assert "bound / exact" in out


def test_spectrum_with_a_mismatched_checkpoint_names_the_parameter(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    state = lenet5().state_dict()
    state["4.weight"] = state["4.weight"][:, :, :3, :3].copy()
    np.savez(bad, **state)
    assert main(["spectrum", "--weights", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "parameter '4.weight' has shape (16, 6, 5, 5) in the network but (16, 6, 3, 3) in the checkpoint" in err
    missing = tmp_path / "missing.npz"
    del state["4.weight"]
    np.savez(missing, **state)
    assert main(["spectrum", "--weights", str(missing)]) == 2
    assert "missing parameters ['4.weight']" in capsys.readouterr().err


@pytest.mark.slow
def test_spectrum_with_a_trained_style_checkpoint(tmp_path, capsys):
    net = lenet5(seed=5)
    path = tmp_path / "w.npz"
    net.save(path)
    assert main(["spectrum", "--weights", str(path)]) == 0
    assert f"LeNet-5 weights from {path}" in capsys.readouterr().out


def test_training_a_sequential_subclass_with_its_own_backward():
    """train() asks a plain Sequential for parameter gradients only (input_grad=False) and calls a
    subclass's own backward(dy) as it is: the same weights either way, the override honoured."""
    calls = []

    class LoggingNet(Sequential):
        def backward(self, dy):
            calls.append(np.shape(dy))
            return super().backward(dy)

    data = _toy_data()
    plain, logging = _toy_net(), LoggingNet(*_toy_net().layers)
    for net in (plain, logging):
        train(net, data, epochs=2, batch_size=8, lr=0.1, progress=False, log=None, seed=3)
    assert len(calls) == 2 * 5  # 36 training samples in batches of 8, two epochs
    for a, b in zip(plain.parameters(), logging.parameters()):
        np.testing.assert_array_equal(a.data, b.data)
