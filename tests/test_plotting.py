"""Plotting conventions: ``ax=`` honoured, the Figure returned, a file only when asked for, the
backend never changed; what plot_matrix draws for every kind of matrix it accepts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import sparseconv as sc

matplotlib = pytest.importorskip("matplotlib", reason="plotting needs matplotlib (pip install 'sparseconv[plot]')")
plt = pytest.importorskip("matplotlib.pyplot")
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402

from sparseconv.plotting import DETAIL_LIMIT  # noqa: E402
from sparseconv.train import History  # noqa: E402

pytestmark = pytest.mark.usefixtures("close_figures")

PNG = b"\x89PNG\r\n\x1a\n"


def _conv(seed: int = 0) -> sc.ConvOperator:
    return sc.ConvOperator(np.random.default_rng(seed).standard_normal((2, 2, 3, 3)), (2, 6, 6), padding=1)


def _history() -> History:
    return History(train_loss=[1.0, 0.5, 0.3], train_accuracy=[0.5, 0.7, 0.9], test_accuracy=[0.4, 0.6, 0.8],
                   seconds=[1.0] * 3, samples_per_second=[10.0] * 3)


def _scatter(ax) -> PathCollection:
    (points,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    return points


# ---------------------------------------------------------------- conventions
@pytest.mark.parametrize("draw", [
    pytest.param(lambda path, ax: sc.plot_matrix(_conv(), path, ax=ax), id="plot_matrix"),
    pytest.param(lambda path, ax: sc.plot_history(_history(), path, ax=None if ax is None else (ax, ax.twinx())),
                 id="plot_history"),
])
class TestConventions:
    def test_backend_is_never_changed(self, draw, monkeypatch, tmp_path):
        def refuse(*args, **kwargs):
            raise AssertionError("matplotlib.use must not be called by sparseconv")

        plt.close(plt.figure())  # pyplot resolves its backend once, at its first figure
        monkeypatch.setattr(matplotlib, "use", refuse)
        monkeypatch.setattr(plt, "switch_backend", refuse)
        before = (matplotlib.get_backend(), matplotlib.rcParams["backend"])
        draw(tmp_path / "x.png", None)
        assert (matplotlib.get_backend(), matplotlib.rcParams["backend"]) == before

    def test_returns_the_figure_and_writes_nothing_without_a_path(self, draw, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        fig = draw(None, None)
        assert isinstance(fig, Figure)
        assert fig.number in plt.get_fignums()  # left open, for notebooks and galleries
        assert list(tmp_path.iterdir()) == []

    def test_writes_the_file_only_when_given_a_path(self, draw, tmp_path):
        path = tmp_path / "out.png"
        draw(path, None)
        assert path.read_bytes()[:8] == PNG

    def test_draws_into_the_given_axes(self, draw, tmp_path):
        fig, ax = plt.subplots()
        n_figures = len(plt.get_fignums())
        assert draw(None, ax) is fig
        assert len(plt.get_fignums()) == n_figures  # no new figure
        assert ax.has_data()


# ---------------------------------------------------------------- plot_matrix: what is drawn
def test_entries_are_coloured_by_their_tied_weight():
    op = _conv()
    fig = sc.plot_matrix(op)
    points = _scatter(fig.axes[0])
    coo = op.matrix.tocoo()
    np.testing.assert_array_equal(points.get_offsets(), np.column_stack([coo.col, coo.row]))
    # The colour is the index of the weight each entry holds: read the weights back through it.
    np.testing.assert_array_equal(op.weight.ravel()[points.get_array().astype(int)], coo.data)


@pytest.mark.parametrize("convert", [sp.csr_array, sp.csr_matrix, sp.coo_array, sp.csc_matrix, sp.lil_array,
                                     lambda m: m.toarray()],
                         ids=["csr_array", "csr_matrix", "coo_array", "csc_matrix", "lil_array", "ndarray"])
def test_any_sparse_format_or_array_is_drawn_by_value(convert):
    dense = np.array([[0.0, 2.0, 0.0], [-1.0, 0.0, 3.0]])
    fig = sc.plot_matrix(convert(sp.csr_array(dense)))
    points = _scatter(fig.axes[0])
    rows, cols = np.nonzero(dense)
    np.testing.assert_array_equal(points.get_offsets(), np.column_stack([cols, rows]))
    np.testing.assert_array_equal(points.get_array(), dense[rows, cols])


@pytest.mark.parametrize("op", [
    pytest.param(sc.PoolOperator((2, 4, 4), 2), id="PoolOperator"),
    pytest.param(sc.ConvTransposeOperator(np.ones((2, 1, 3, 3)), (2, 3, 3), stride=2), id="ConvTransposeOperator"),
])
def test_operators_with_a_matrix_are_accepted(op):
    points = _scatter(sc.plot_matrix(op).axes[0])
    assert len(points.get_offsets()) == op.matrix.nnz


def test_max_pooling_is_refused_with_a_pointer_to_its_selection_matrix():
    pool = sc.MaxPoolOperator((1, 4, 4), 2)
    with pytest.raises(TypeError, match=r"MaxPoolOperator has no fixed matrix.*selection_matrix\(x\)"):
        sc.plot_matrix(pool)
    pool.forward(np.random.default_rng(0).standard_normal((1, 1, 4, 4)))
    assert len(_scatter(sc.plot_matrix(pool.selection_matrix()).axes[0]).get_offsets()) == 4


@pytest.mark.parametrize("bad", [object(), [1, 2, 3], np.zeros(3)], ids=["object", "list", "1-d array"])
def test_objects_without_a_matrix_are_refused(bad):
    with pytest.raises((TypeError, ValueError), match="plot_matrix"):
        sc.plot_matrix(bad)


def test_a_large_matrix_is_shown_whole_as_a_density_view():
    rng = np.random.default_rng(1)
    matrix = sp.random_array((3000, 1000), density=0.002, random_state=rng, format="csr")
    assert max(matrix.shape) > DETAIL_LIMIT
    ax = sc.plot_matrix(matrix, bins=100).axes[0]
    (image,) = ax.images
    assert isinstance(image, AxesImage)
    counts = image.get_array()
    assert counts.sum() == matrix.nnz  # every stored entry is counted in some cell
    assert counts.shape == (100, 33)   # bins along the longer side, square cells
    assert ax.get_xlim() == (-0.5, 999.5) and ax.get_ylim() == (2999.5, -0.5)


def test_zoom_on_a_block_draws_its_entries():
    rng = np.random.default_rng(2)
    matrix = sp.random_array((3000, 1000), density=0.01, random_state=rng, format="csr")
    ax = sc.plot_matrix(matrix, rows=(100, 200), cols=(50, 150)).axes[0]
    points = _scatter(ax)
    block = matrix[100:200, 50:150].tocoo()
    assert len(points.get_offsets()) == block.nnz
    np.testing.assert_array_equal(np.sort(points.get_offsets()[:, 1]), np.sort(block.row + 100))
    assert ax.get_xlim() == (49.5, 149.5) and ax.get_ylim() == (199.5, 99.5)
    assert "rows 100:200, cols 50:150" in ax.get_title()


def test_the_view_can_be_forced():
    assert _scatter(sc.plot_matrix(_conv(), view="entries").axes[0])
    assert sc.plot_matrix(_conv(), view="density").axes[0].images


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rows=(0, 73)), ValueError, r"rows must be \(start, stop\) with 0 <= start < stop <= 72; got \(0, 73\)"),
    (dict(cols=(5, 5)), ValueError, r"cols must be \(start, stop\)"),
    (dict(rows=(1.5, 3)), ValueError, r"rows must be"),
    (dict(rows=3), TypeError, r"rows must be a pair \(start, stop\) of ints; got 3"),
    (dict(view="spy"), ValueError, r"view must be 'auto', 'entries' or 'density'; got 'spy'"),
    (dict(bins=0), ValueError, r"bins must be a positive int; got 0"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        sc.plot_matrix(_conv(), **kwargs)


# ---------------------------------------------------------------- plot_history
def test_history_curves_hold_the_recorded_values():
    h = _history()
    loss_ax, acc_ax = sc.plot_history(h).axes
    np.testing.assert_array_equal(loss_ax.lines[0].get_ydata(), h.train_loss)
    np.testing.assert_array_equal([line.get_ydata() for line in acc_ax.lines], [h.train_accuracy, h.test_accuracy])


def test_history_needs_a_pair_of_axes():
    fig, ax = plt.subplots()
    with pytest.raises(TypeError, match="ax must be a pair of Axes"):
        sc.plot_history(_history(), ax=ax)


def test_plotting_without_matplotlib_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'sparseconv\[plot\]'"):
        sc.plot_matrix(_conv())


def test_a_constant_matrix_states_its_value_instead_of_a_colour_bar():
    fig = sc.plot_matrix(sc.pool_matrix((1, 4, 4), 2))
    assert fig.axes[0].child_axes == []  # no colour bar (an inset of the axes)
    assert fig.axes[0].get_title() == "4x16 matrix, nnz=16, every entry 0.25"
    assert len(sc.plot_matrix(_conv()).axes[0].child_axes) == 1  # a colour bar for the tied weights
