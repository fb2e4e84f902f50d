"""The ``prune`` command: LeNet-5 pruned to several sparsities, fine-tuned, measured.

``python -m sparseconv prune`` trains LeNet-5 on the bundled digits (or loads ``--weights``),
then for each ``--sparsity`` in increasing order prunes the network by weight magnitude
(:func:`sparseconv.prune.prune`, starting from the previous level's fine-tuned network, so
the pruning is gradual), fine-tunes it for ``--epochs`` with the mask fixed, and reports the
test accuracy, the weights kept and matrix entries stored, and the inference time of the
pruned sparse network against PyTorch's dense network with the same weights (when PyTorch is
installed), measured in the same run. The last line is the highest sparsity's result.

:func:`add_arguments` and :func:`run_from_args` plug the command into :mod:`sparseconv.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

__all__ = ["DEFAULT_SPARSITIES", "PruneRow", "add_arguments", "check_args", "run", "run_from_args",
           "format_row", "plot_rows"]

#: Sparsities run when ``--sparsity`` is not given.
DEFAULT_SPARSITIES = (0.5, 0.75, 0.9, 0.95)


@dataclass
class PruneRow:
    """One line of the result table.

    Attributes
    ----------
    sparsity : float
        Asked sparsity (None for the dense network the pruning starts from).
    accuracy : float
        Test accuracy after fine-tuning, in [0, 1].
    kept, weights : int
        Convolution weights present, of all convolution weights.
    entries : int
        Stored entries of the convolution matrices.
    sparse_s, torch_s : float or None
        Median seconds of one inference over the test set: sparseconv's network, and
        PyTorch's dense network with the same weights (None without PyTorch).
    """

    sparsity: Optional[float]
    accuracy: float
    kept: int
    weights: int
    entries: int
    sparse_s: float
    torch_s: Optional[float]

    @property
    def speedup(self) -> Optional[float]:
        """PyTorch dense time over sparse time (> 1: the sparse network is faster)."""
        return None if self.torch_s is None else self.torch_s / self.sparse_s


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1); got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1); got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``prune`` options to a parser (or sub-parser) and return it."""
    parser.add_argument("--sparsity", type=_sparsity, nargs="+", default=list(DEFAULT_SPARSITIES),
                        help="sparsities in [0, 1), run in increasing order (default: 0.5 0.75 0.9 0.95)")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs per sparsity (default: 4)")
    parser.add_argument("--lr", type=float, default=0.02, help="fine-tuning learning rate (default: 0.02)")
    parser.add_argument("--weights", type=Path,
                        help="a LeNet-5 checkpoint written by 'train --save' (default: train one here)")
    parser.add_argument("--train-epochs", type=int, default=20,
                        help="epochs of the initial training when no --weights is given (default: 20)")
    parser.add_argument("--scope", choices=["global", "layer"], default="layer",
                        help="the sparsity in each convolution, or one magnitude threshold over all of them "
                             "(default: layer; global spares C1 and C3, whose few weights fill most of the "
                             "matrix entries, so it cuts fewer entries and less time)")
    parser.add_argument("--structure", choices=["element", "filter", "channel"], default="element",
                        help="prune single weights, whole filters or whole input channels (the last two need "
                             "--scope layer, the default; default: element)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="precision of training, pruning and timing (default: float32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the initialisation, the split and the batch order (default: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for both networks' inference timing (default: 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each inference (default: 5)")
    parser.add_argument("--plot", type=Path, help="draw accuracy and speed-up against sparsity (PNG) here (default: no plot)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check_writable(path: Path, what: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"{what} must be a file path; got the directory {str(path)!r}")
    if not parent.is_dir():
        raise ValueError(f"{what}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{what}: {str(path)!r} is not writable")


def check_args(args: argparse.Namespace) -> None:
    """Validate the options before any work; raises ``ValueError`` (or ``ImportError``) naming the option."""
    sparsities = list(args.sparsity)
    if not sparsities or not all(isinstance(s, float) and 0 <= s < 1 for s in sparsities):
        raise ValueError(f"--sparsity must be numbers in [0, 1); got {sparsities!r}")
    for name in ("epochs", "train_epochs", "repeats", "threads"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int; got {value!r}")
    if not np.isfinite(args.lr) or args.lr <= 0:
        raise ValueError(f"--lr must be a positive number; got {args.lr!r}")
    if args.structure != "element" and args.scope != "layer":
        raise ValueError(f"--structure {args.structure} prunes whole units layer by layer: add --scope layer")
    if args.weights is not None:
        if not Path(args.weights).is_file():
            raise ValueError(f"--weights: no such file {str(args.weights)!r}")
        if not os.access(args.weights, os.R_OK):
            raise ValueError(f"--weights: {str(args.weights)!r} is not readable")
        from .models import lenet5
        try:
            lenet5(dtype=np.dtype(args.dtype), build=False).load(args.weights)
        except (ValueError, OSError) as err:
            raise ValueError(f"--weights: {str(args.weights)!r} is not a LeNet-5 checkpoint: {err}") from err
    if args.plot is not None:
        _check_writable(Path(args.plot), "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install 'sparseconv[plot]'") from None


def _torch_twin(net, torch):
    """PyTorch's dense LeNet-5: the same weights (pruned ones as zeros) in torch's own layers."""
    from .nn import Conv2d, Flatten, Linear, Subsampling2d, Tanh

    nn, functional = torch.nn, torch.nn.functional

    class Subsampling(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.window = int(np.prod(np.broadcast_to(layer.kernel_size, (2,))))
            self.kernel = layer.kernel_size
            self.beta = nn.Parameter(torch.from_numpy(layer.params["beta"].data.copy()).reshape(-1, 1, 1))
            self.bias = nn.Parameter(torch.from_numpy(layer.params["bias"].data.copy()).reshape(-1, 1, 1))

        def forward(self, x):
            return functional.avg_pool2d(x, self.kernel) * self.window * self.beta + self.bias

    modules = []
    for layer in net:
        if isinstance(layer, Conv2d):
            w = layer.params["weight"].data
            m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, dtype=getattr(torch, w.dtype.name))
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(np.array(w)))
                m.bias.copy_(torch.from_numpy(np.array(layer.params["bias"].data)))
        elif isinstance(layer, Linear):
            w = layer.params["weight"].data
            m = nn.Linear(layer.in_features, layer.out_features, dtype=getattr(torch, w.dtype.name))
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(np.array(w)))
                m.bias.copy_(torch.from_numpy(np.array(layer.params["bias"].data)))
        elif isinstance(layer, Subsampling2d):
            m = Subsampling(layer)
        elif isinstance(layer, Tanh):
            m = nn.Tanh()
        elif isinstance(layer, Flatten):
            m = nn.Flatten()
        else:
            raise TypeError(f"no dense PyTorch twin for {layer!r}")
        modules.append(m)
    return nn.Sequential(*modules).eval()


def _time(net, x: np.ndarray, threads: int, repeats: int) -> tuple[float, Optional[float]]:
    """Median seconds of one inference over ``x``: the sparse network, and PyTorch's dense twin."""
    from .bench import measure_interleaved, thread_limits
    from .testing import tolerance

    try:
        import torch
    except ImportError:
        torch = None
    fns: dict[str, Callable[[], object]] = {"sparse": lambda: net.forward(x)}
    if torch is not None:
        twin = _torch_twin(net, torch)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            expected, got = net.forward(x), twin(xt).numpy()
        rtol, atol = tolerance(x.dtype)
        # The twin must be the same function, or the timing comparison means nothing.
        if not np.allclose(got, expected, rtol=rtol, atol=atol * max(float(np.abs(expected).max()), 1.0)):
            raise RuntimeError("PyTorch's dense twin of the pruned network computes something else "
                               f"(max difference {float(np.abs(got - expected).max()):.3g})")

        def dense() -> object:
            with torch.no_grad():
                return twin(xt)
        fns["torch"] = dense
    with thread_limits(threads, use_torch=torch is not None):
        times = measure_interleaved(fns, repeats=repeats)
    return times["sparse"]["median_s"], times["torch"]["median_s"] if "torch" in times else None


def format_row(row: PruneRow) -> str:
    """``sparsity 0.90: test accuracy 0.9750, ...``: one line of the table."""
    head = "dense      " if row.sparsity is None else f"sparsity {row.sparsity:.2f}:"
    timing = f"inference {row.sparse_s * 1e3:.2f} ms sparse"
    if row.torch_s is not None:
        timing += f" vs {row.torch_s * 1e3:.2f} ms PyTorch dense (speed-up {row.speedup:.2f}x)"
    else:
        timing += " (PyTorch not installed: no dense comparison)"
    return (f"{head} test accuracy {row.accuracy:.4f}, conv weights kept {row.kept:,} of {row.weights:,}, "
            f"stored entries {row.entries:,}, {timing}")


def plot_rows(rows: list[PruneRow], path: Path) -> Path:
    """Test accuracy and speed-up over PyTorch dense against sparsity, side by side (PNG at ``path``)."""
    import matplotlib.pyplot as plt

    dense = rows[0]
    pruned = rows[1:]
    s = [100 * r.sparsity for r in pruned]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        ax1.plot(s, [r.accuracy for r in pruned], marker="o", label="pruned, fine-tuned")
        ax1.axhline(dense.accuracy, color="gray", linestyle="--", label="dense")
        ax1.set(xlabel="convolution weights pruned (%)", ylabel="test accuracy")
        ax1.legend()
        if all(r.speedup is not None for r in rows):
            ax2.plot(s, [r.speedup for r in pruned], marker="o", label="pruned sparse network")
            ax2.axhline(dense.speedup, color="gray", linestyle="--", label="unpruned sparse network")
            ax2.axhline(1.0, color="black", linewidth=0.8)
            ax2.set(xlabel="convolution weights pruned (%)", ylabel="PyTorch dense time / sparse time")
            ax2.legend()
        else:
            ax2.text(0.5, 0.5, "PyTorch not installed:\nno speed-up to draw", ha="center", va="center")
            ax2.set_axis_off()
        fig.suptitle("LeNet-5 on digits: magnitude pruning with fine-tuning")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="pruning", unit="sparsity", file=sys.stderr)


def run(args: argparse.Namespace, *, log: Callable[[str], None] = print) -> list[PruneRow]:
    """Train or load LeNet-5, prune, fine-tune and measure; returns the dense row and one per sparsity.

    Parameters
    ----------
    args : argparse.Namespace
        As :func:`add_arguments` defines them; checked by :func:`check_args` first.
    log : callable
        Receives progress lines (where the weights came from, the dense network's row).

    Returns
    -------
    list of PruneRow
    """
    check_args(args)
    from .data import load_digits
    from .models import lenet5
    from .prune import mask_summary, prune
    from .train import evaluate, train

    dtype = np.dtype(args.dtype)
    data = load_digits(dtype=dtype, seed=args.seed)
    net = lenet5(dtype=dtype, seed=args.seed, classes=data.classes)
    progress = not args.no_progress
    if args.weights is not None:
        net.load(args.weights)
        log(f"LeNet-5 weights from {args.weights}")
    else:
        log(f"training LeNet-5 for {args.train_epochs} epochs on {data}")
        train(net, data, epochs=args.train_epochs, seed=args.seed, progress=progress, log=None)

    def row(sparsity: Optional[float], network) -> PruneRow:
        summary = mask_summary(network)
        sparse_s, torch_s = _time(network, data.x_test, args.threads, args.repeats)
        return PruneRow(sparsity, evaluate(network, data.x_test, data.y_test), summary["kept"], summary["weights"],
                        summary["entries"], sparse_s, torch_s)

    rows = [row(None, net)]
    log(format_row(rows[0]))
    levels = sorted(set(args.sparsity))
    bar = _progress(len(levels), progress)
    try:
        for sparsity in levels:
            net, _ = prune(net, sparsity, scope=args.scope, structure=args.structure)
            train(net, data, epochs=args.epochs, lr=args.lr, seed=args.seed, progress=progress, log=None)
            rows.append(row(sparsity, net))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(sparsity=f"{sparsity:.2f}", acc=f"{rows[-1].accuracy:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return rows


def run_from_args(args: argparse.Namespace) -> int:
    """Run the parsed ``prune`` options, print the table (last line: the highest sparsity); returns 0."""
    rows = run(args, log=lambda line: print(line, file=sys.stderr))
    if args.plot is not None:
        plot_rows(rows, args.plot)
        print(f"wrote {args.plot}")
    print(f"LeNet-5 on digits, {args.dtype}, {args.scope} {args.structure} magnitude pruning, {args.epochs} "
          f"fine-tuning epoch(s) per sparsity, inference over the test set on {args.threads} thread(s)")
    for r in rows:
        print(format_row(r))
    return 0
