"""Command-line interface: ``sparseconv <command>`` (or ``python -m sparseconv <command>``).

Commands
--------
demo [--lenet]
    The seeds' worked examples through the sparse matrix: the matrix with its tied parameter
    indices, ``W @ x`` against the direct convolution and ``W.T @ delta`` against the rot180
    full convolution. ``--lenet`` adds LeNet-5's layers as sparse matrices.
train
    Train LeNet-5 on the bundled digits (or MNIST IDX files) through sparse matrices.
bench --suite NAME [--out DIR]
    Benchmark sparse against dense, im2col, direct, FFT and PyTorch (table, JSON, Markdown,
    plots); see :mod:`sparseconv.bench`.
prune [--sparsity S ...]
    Magnitude-prune LeNet-5 to each sparsity, fine-tune with the masks fixed, and report test
    accuracy, stored entries and inference time against PyTorch's dense network; see
    :mod:`sparseconv.prune_cli`.
spectrum [--weights FILE.npz]
    Per-layer spectral norms of LeNet-5 from the explicit matrices, the product bound on the
    network's Lipschitz constant and the exact norm of the composed linear maps.

Every argument, input file and output path is checked when the command line is parsed, before
any work starts: a bad value or an unwritable path costs nothing. ``--help`` on each command
lists every option with its default. Ctrl-C ends a run with exit status 130 and one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["main", "demo", "lenet_table", "format_tied_matrix", "build_parser", "help_text", "Checkpoint",
           "EXIT_INTERRUPTED"]

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def format_tied_matrix(op) -> str:
    """Render a small operator's matrix with each entry shown as the weight it is tied to.

    Parameters
    ----------
    op : ConvOperator
        With one weight per entry (``op.param_index`` defined).

    Returns
    -------
    str
        One line per row; ``w3`` means ``weight.ravel()[3]`` and ``.`` a structural zero.
    """
    rows, cols = op.shape
    cells = [["." for _ in range(cols)] for _ in range(rows)]
    indptr, indices, params = op.matrix.indptr, op.matrix.indices, op.param_index
    for r in range(rows):
        for e in range(indptr[r], indptr[r + 1]):
            cells[r][indices[e]] = f"w{params[e]}"
    width = max(len(c) for row in cells for c in row)
    return "\n".join("  ".join(c.rjust(width) for c in row) for row in cells)


def _print_array(title: str, arr: np.ndarray) -> None:
    print(title)
    print(textwrap.indent(np.array2string(np.asarray(arr), precision=4, suppress_small=True), "      "))


def demo() -> None:
    """Print the seeds' examples computed through the sparse matrix and through the references."""
    from . import reference as ref
    from .conv import ConvOperator

    print("1. A 3x3 image and a 2x2 kernel (seed 004): the convolution is a 4x9 sparse matrix")
    kernel = np.array([[1.0, 2.0], [3.0, 4.0]])
    op = ConvOperator(kernel[None, None], input_shape=(1, 3, 3))
    print(format_tied_matrix(op))
    print(f"   nnz = {op.nnz}, distinct parameters = {len(np.unique(op.param_index))}, "
          f"a fully connected 9 -> 4 layer would need {op.shape[0] * op.shape[1]}")
    print()

    print("2. Forward (seed 001): W @ x equals the direct convolution")
    x = np.array([[3, 3, 2, 1, 0], [0, 0, 1, 3, 1], [3, 1, 2, 2, 3], [2, 0, 0, 2, 2], [2, 0, 0, 0, 1]], float)
    k = np.array([[0, 1, 2], [2, 2, 0], [0, 1, 2]], float)
    op = ConvOperator(k[None, None], input_shape=(1, 5, 5))
    sparse_out = (op.matrix @ x.ravel()).reshape(3, 3)
    direct_out = ref.conv_direct(x[None, None], k[None, None])[0, 0]
    _print_array("   W @ x:", sparse_out)
    _print_array("   direct:", direct_out)
    print(f"   max |difference| = {np.abs(sparse_out - direct_out).max():.1e}")
    print()

    print("3. Backward (seed 000): W.T @ delta equals the full convolution with rot180(w)")
    w = np.array([[0.2, 0.3], [0.5, 0.6]])
    delta = np.array([[1.0, 1.0], [2.0, 3.0]])
    op = ConvOperator(w[None, None], input_shape=(1, 3, 3))
    sparse_dx = (op.matrix.T @ delta.ravel()).reshape(3, 3)
    rot180_dx = ref.conv_direct(delta[None, None], w[None, None, ::-1, ::-1].copy(), padding="full")[0, 0]
    _print_array("   W.T @ delta:", sparse_dx)
    _print_array("   correlate(pad_full(delta), rot180(w)):", rot180_dx)
    print(f"   max |difference| = {np.abs(sparse_dx - rot180_dx).max():.1e}")


def lenet_table() -> list[dict]:
    """Per-layer matrix facts of LeNet-5 (NOTES section 4), printed by ``demo --lenet``."""
    from .export import to_mlp
    from .models import lenet5

    net = lenet5()
    names = {0: "C1", 2: "S2", 4: "C3", 6: "S4", 8: "C5", 11: "F6", 13: "output"}
    rows = []
    shape: tuple[int, ...] = (1, 32, 32)
    for i, layer in enumerate(net):
        if i in names:
            stage = to_mlp(layer, shape).stages[0]
            n_out, n_in = stage.shape
            biased = stage.bias is not None
            rows.append(dict(layer=names[i], kind=type(layer).__name__, shape=(n_out, n_in), nnz=stage.nnz,
                             params=layer.n_params(), connections=layer.connections(shape),
                             density=stage.nnz / (n_out * n_in), dense_params=n_out * n_in + (n_out if biased else 0)))
        shape = layer.output_shape(shape)
    return rows


def _print_lenet() -> None:
    print("LeNet-5 as sparse matrices (input 1x32x32 flattened to 1024)")
    print(f"{'layer':<7}{'type':<15}{'matrix':>13}{'nnz':>9}{'params':>8}{'connections':>13}{'density':>9}"
          f"{'FC params':>12}")
    for r in lenet_table():
        print(f"{r['layer']:<7}{r['kind']:<15}{r['shape'][0]:>6}x{r['shape'][1]:<6}{r['nnz']:>9,}{r['params']:>8,}"
              f"{r['connections']:>13,}{r['density']:>9.4f}{r['dense_params']:>12,}")


# ---------------------------------------------------------------- argument checks (parse time)
class Checkpoint(NamedTuple):
    """A checkpoint read and checked when the command line is parsed.

    Attributes
    ----------
    path : str
        As the user gave it.
    state : dict of str to ndarray
        Every array of the file, by parameter name.
    """

    path: str
    state: dict


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer; got {text!r}")
    return value


def _float_in(text: str, low: float, high: float, low_open: bool, high_open: bool, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}") from None
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _float_in(text, 0.0, math.inf, True, True, "a positive finite number")


def _non_negative_float(text: str) -> float:
    return _float_in(text, 0.0, math.inf, False, True, "a non-negative finite number")


def _momentum(text: str) -> float:
    return _float_in(text, 0.0, 1.0, False, True, "a number in [0, 1)")


def _rtol(text: str) -> float:
    return _float_in(text, 0.0, 1.0, True, True, "a relative tolerance in (0, 1)")


def _check_writable_dir(directory: Path, text: str) -> None:
    """Refuse unless a file can be created in ``directory`` (tried, so it holds for root too)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: directory '{directory}' is not writable ({err.strerror})") from None


def _output_file(text: str) -> str:
    """An output file path whose directory exists and is writable; returned as given."""
    path = Path(text)
    if text == "" or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file name")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory '{parent}' does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the file is read-only")
    _check_writable_dir(parent, text)
    return text


def _output_dir(text: str) -> Path:
    """An output directory that exists and is writable, or can be created."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: '{existing}' is not a directory")
    _check_writable_dir(existing, text)
    return path


def _existing_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def _checkpoint(text: str) -> Checkpoint:
    """Read a checkpoint written by ``train --save`` (an .npz of arrays, no pickle) in full."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist or is not a file")
    what = f"{text!r} is not a checkpoint written by 'train --save' (an .npz of arrays)"
    if path.stat().st_size == 0:
        raise argparse.ArgumentTypeError(f"{what}: the file is empty")
    if not zipfile.is_zipfile(path):
        raise argparse.ArgumentTypeError(
            f"{what}: it is not a zip archive, or it is truncated (no zip directory at its end)")
    try:
        with np.load(path, allow_pickle=False) as data:
            state = {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, NotImplementedError) as err:
        raise argparse.ArgumentTypeError(f"{what}: the archive is truncated or corrupt ({err})") from None
    if not state:
        raise argparse.ArgumentTypeError(f"{what}: the archive holds no arrays")
    for name, value in state.items():
        # A zip member that is not an .npy file reads as bytes; parameters are real numbers.
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            kind = f"an array of {value.dtype}" if isinstance(value, np.ndarray) else "not an array"
            raise argparse.ArgumentTypeError(f"{what}: member {name!r} is {kind}, not real numbers")
    return Checkpoint(text, state)


# ---------------------------------------------------------------- commands
def _train(args: argparse.Namespace) -> None:
    from .data import load_digits, load_mnist_idx
    from .models import lenet5
    from .train import train

    dtype = np.dtype(args.dtype)
    data = load_mnist_idx(args.idx_dir, dtype=dtype, limit=args.limit) if args.idx_dir else load_digits(
        dtype=dtype, seed=args.seed)
    print(f"data: {data}")
    net = lenet5(dtype=dtype, seed=args.seed, classes=data.classes)
    print(f"LeNet-5 with {net.n_params():,} trainable parameters, {args.dtype}")
    history = train(net, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay, schedule=args.schedule, shift=args.shift, seed=args.seed,
                    progress=not args.no_progress)
    print(f"final test accuracy {history.test_accuracy[-1]:.4f} after {len(history.seconds)} epochs, "
          f"{sum(history.seconds):.1f}s of training")
    if args.save:
        try:
            net.save(args.save)
        except OSError as err:
            # The path was writable when the run started; say which one failed, not a temp name.
            raise OSError(f"could not write the checkpoint to {args.save!r}: {err.strerror or err}") from err
        print(f"saved checkpoint to {args.save}")
    if args.plot:
        import matplotlib.pyplot as plt

        from .plotting import plot_history
        fig = plot_history(history)
        try:
            fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        except OSError as err:
            raise OSError(f"could not write the training curves to {args.plot!r}: {err.strerror or err}") from err
        finally:
            plt.close(fig)
        print(f"saved training curves to {args.plot}")


def _spectrum(args: argparse.Namespace) -> None:
    import time

    from .conv import ConvOperator
    from .export import to_mlp
    from .models import lenet5
    from .spectral import composed_norm, fft_singular_values, spectral_norm

    # float64 whatever the models' default: the FFT cross-check is meant to agree to ~1e-12.
    net = lenet5(dtype=np.float64)
    if args.weights:
        net.load_state_dict(args.weights.state)
        print(f"LeNet-5 weights from {args.weights.path}")
    else:
        print("LeNet-5 at its seeded initialisation (pass --weights FILE.npz for a trained checkpoint)")
    names = {0: "C1", 2: "S2", 4: "C3", 6: "S4", 8: "C5", 11: "F6", 13: "output"}
    print(f"{'layer':<7}{'matrix':>13}{'spectral norm':>16}{'seconds':>9}  FFT cross-check")
    matrices = []
    shape: tuple[int, ...] = (1, 32, 32)
    for i, layer in enumerate(net):
        if i in names:
            matrix = to_mlp(layer, shape).stages[0].matrix
            matrices.append(matrix)
            t0 = time.perf_counter()
            norm = spectral_norm(matrix, rtol=args.rtol)
            seconds = time.perf_counter() - t0
            check = "n/a (not a convolution)"
            if names[i] in ("C1", "C3", "C5"):
                # The FFT formula holds for circular padding at stride 1: check both methods on
                # the same kernel with that padding.
                weight = layer.params["weight"].data
                circular = ConvOperator(weight, shape, padding="same", padding_mode="circular")
                sparse_norm = spectral_norm(circular, rtol=args.rtol)
                fft_norm = fft_singular_values(weight, shape)[0]
                check = (f"circular padding: sparse {sparse_norm:.8g}, FFT {fft_norm:.8g} "
                         f"(rel. diff {abs(sparse_norm - fft_norm) / fft_norm:.1e})")
            print(f"{names[i]:<7}{matrix.shape[0]:>6}x{matrix.shape[1]:<6}{norm:>16.8g}{seconds:>9.3f}  {check}")
        shape = layer.output_shape(shape)
    t0 = time.perf_counter()
    bound = float(np.prod([spectral_norm(m, rtol=args.rtol) for m in matrices]))
    exact = composed_norm(matrices, rtol=args.rtol)
    seconds = time.perf_counter() - t0
    print(f"product of layer norms (Lipschitz bound, tanh is 1-Lipschitz): {bound:.6g}")
    print(f"exact norm of the composed linear maps (activations removed):   {exact:.6g}  "
          f"(bound / exact = {bound / exact:.3g}; {seconds:.2f}s)")


# ---------------------------------------------------------------- parser and entry point
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every option's default, unless its help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def _version() -> str:
    from . import __version__
    return f"sparseconv {__version__}"


def build_parser(prog: str = "sparseconv") -> argparse.ArgumentParser:
    """The command-line parser.

    Parameters
    ----------
    prog : str, default "sparseconv"
        Program name shown in usage and error lines (``python -m sparseconv`` when run as a module).

    Returns
    -------
    argparse.ArgumentParser
    """
    return _build(prog)[0]


def _build(prog: str) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its command parsers by name."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=_HelpFormatter,
                                     description="Convolution layers as tied-parameter sparse matrices.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,train,bench,prune,spectrum}")

    p_demo = sub.add_parser("demo", help="the seeds' worked examples through the sparse matrix",
                            formatter_class=_HelpFormatter)
    p_demo.add_argument("--lenet", action="store_true", help="also print LeNet-5's layers as sparse matrices")

    p_train = sub.add_parser("train", help="train LeNet-5 through sparse matrices", formatter_class=_HelpFormatter,
                             description="Train LeNet-5 through sparse matrices on scikit-learn's bundled digits "
                                         "(or MNIST IDX files with --idx-dir).")
    p_train.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training set")
    p_train.add_argument("--batch-size", type=_positive_int, default=16, help="samples per SGD step")
    p_train.add_argument("--lr", type=_positive_float, default=0.02, help="initial learning rate")
    p_train.add_argument("--momentum", type=_momentum, default=0.9, help="SGD momentum")
    p_train.add_argument("--weight-decay", type=_non_negative_float, default=2e-3, help="L2 weight decay")
    p_train.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                         help="learning-rate schedule (cosine: decay to 0 over all steps)")
    p_train.add_argument("--shift", type=_non_negative_int, default=1,
                         help="random shift augmentation in pixels (0: off)")
    p_train.add_argument("--seed", type=int, default=0, help="seeds the initialisation, split and batch order")
    p_train.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="precision")
    p_train.add_argument("--idx-dir", type=_existing_dir,
                         help="directory with MNIST IDX files (default: scikit-learn's digits)")
    p_train.add_argument("--limit", type=_positive_int,
                         help="use only the first LIMIT samples of each IDX split (default: all)")
    p_train.add_argument("--save", type=_output_file, metavar="FILE.npz",
                         help="write a checkpoint here (default: not saved)")
    p_train.add_argument("--plot", type=_output_file, metavar="FILE.png",
                         help="write the training curves here; needs matplotlib (default: no plot)")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")

    from .bench import add_arguments
    p_bench = sub.add_parser(
        "bench", help="benchmark sparse vs dense, im2col, direct, FFT and PyTorch (table, JSON, Markdown, plots)",
        formatter_class=_HelpFormatter)
    add_arguments(p_bench)

    from . import prune_cli
    p_prune = sub.add_parser(
        "prune", help="magnitude-prune LeNet-5, fine-tune it, time it against PyTorch's dense network",
        formatter_class=_HelpFormatter)
    prune_cli.add_arguments(p_prune)

    p_spec = sub.add_parser("spectrum", help="spectral norms of LeNet-5's layers from their sparse matrices",
                            formatter_class=_HelpFormatter)
    p_spec.add_argument("--weights", type=_checkpoint, metavar="FILE.npz",
                        help="a checkpoint written by 'train --save' (default: the seeded initialisation)")
    p_spec.add_argument("--rtol", type=_rtol, default=1e-6, help="relative accuracy of each norm")
    commands = {"demo": p_demo, "train": p_train, "bench": p_bench, "prune": p_prune, "spectrum": p_spec}
    for command_parser in commands.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser, commands


def help_text(prog: str = "sparseconv") -> str:
    """The ``--help`` text of the program and of every command, one after the other.

    Parameters
    ----------
    prog : str, default "sparseconv"

    Returns
    -------
    str
    """
    parser, commands = _build(prog)
    return "\n".join([parser.format_help(), *(command.format_help() for command in commands.values())])


def _check_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need more than one option, or options defined elsewhere (bench)."""
    sub = args.command_parser  # errors then show the sub-command's usage line
    if args.command == "train":
        if args.limit is not None and not args.idx_dir:
            sub.error("--limit applies to --idx-dir data only")
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            sub.error("--plot needs matplotlib: pip install 'sparseconv[plot]'")
    if args.command == "bench" and isinstance(getattr(args, "out", None), (str, os.PathLike)):
        try:
            args.out = _output_dir(os.fspath(args.out))
        except argparse.ArgumentTypeError as err:
            sub.error(f"argument --out: {err}")
    if args.command == "prune":
        from . import prune_cli
        try:
            prune_cli.check_args(args)
        except (ValueError, ImportError) as err:
            sub.error(str(err))


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Entry point; returns the process exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default: ``sys.argv[1:]``).
    prog : str, optional
        Program name for usage and error lines (default: ``sparseconv``, the console script).

    Returns
    -------
    int
        0 on success, 1 when a run fails (a failed benchmark check, a diverged training),
        2 for a usage error or an unusable input, 130 after Ctrl-C.
    """
    prog = prog or "sparseconv"
    try:
        parser = build_parser(prog)
        args = parser.parse_args(argv)
        _check_parsed(parser, args)
        if args.command == "demo":
            demo()
            if args.lenet:
                print()
                _print_lenet()
        elif args.command == "train":
            _train(args)
        elif args.command == "spectrum":
            _spectrum(args)
        elif args.command == "bench":
            from .bench import run_from_args
            return run_from_args(args)
        elif args.command == "prune":
            from . import prune_cli
            return prune_cli.run_from_args(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ArithmeticError as err:
        # TrainingDiverged and the like: the run itself failed.
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, ImportError, OSError) as err:
        # A user-facing mistake (bad file, missing extra, bad option value): one clear line.
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m sparseconv"))
