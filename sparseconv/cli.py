"""Command-line interface: ``python -m sparseconv <command>``.

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
spectrum [--weights FILE.npz]
    Per-layer spectral norms of LeNet-5 from the explicit matrices, the product bound on the
    network's Lipschitz constant and the exact norm of the composed linear maps.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Optional, Sequence

import numpy as np

__all__ = ["main", "demo", "lenet_table", "format_tied_matrix"]


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
        net.save(args.save)
        print(f"saved checkpoint to {args.save}")
    if args.plot:
        from .plotting import plot_history
        plot_history(history, args.plot)
        print(f"saved training curves to {args.plot}")


def _spectrum(args: argparse.Namespace) -> None:
    import time

    from .conv import ConvOperator
    from .export import to_mlp
    from .models import lenet5
    from .spectral import composed_norm, fft_singular_values, spectral_norm

    net = lenet5()
    if args.weights:
        net.load(args.weights)
        print(f"LeNet-5 weights from {args.weights}")
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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparseconv",
                                     description="Convolution layers as tied-parameter sparse matrices.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="the seeds' worked examples through the sparse matrix")
    p_demo.add_argument("--lenet", action="store_true", help="also print LeNet-5's layers as sparse matrices")
    p_train = sub.add_parser("train", help="train LeNet-5 through sparse matrices")
    p_train.add_argument("--epochs", type=int, default=10)
    p_train.add_argument("--batch-size", type=int, default=16)
    p_train.add_argument("--lr", type=float, default=0.02)
    p_train.add_argument("--momentum", type=float, default=0.9)
    p_train.add_argument("--weight-decay", type=float, default=2e-3)
    p_train.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p_train.add_argument("--shift", type=int, default=1, help="random shift augmentation in pixels (0: off)")
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p_train.add_argument("--idx-dir", help="directory with MNIST IDX files (default: scikit-learn's digits)")
    p_train.add_argument("--limit", type=int, help="use only the first LIMIT samples of each IDX split")
    p_train.add_argument("--save", help="write a checkpoint (.npz) here")
    p_train.add_argument("--plot", help="write the training curves (PNG) here; needs matplotlib")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    from . import bench
    bench.add_arguments(sub.add_parser(
        "bench", help="benchmark sparse vs dense, im2col, direct, FFT and PyTorch (table, JSON, Markdown, plots)"))
    p_spec = sub.add_parser("spectrum", help="spectral norms of LeNet-5's layers from their sparse matrices")
    p_spec.add_argument("--weights", help="a checkpoint written by 'train --save' (default: fresh initialisation)")
    p_spec.add_argument("--rtol", type=float, default=1e-6, help="relative accuracy of each norm")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
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
            from . import bench
            return bench.run_from_args(args)
    except (ValueError, TypeError, ImportError, OSError) as err:
        # A user-facing mistake (bad file, missing extra, bad option value): one clear line.
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
