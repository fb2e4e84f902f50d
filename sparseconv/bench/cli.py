"""The ``python -m sparseconv bench`` command line: option parsing and the run it describes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

from .methods import DEFAULT_MAX_DIRECT_MACS, METHODS
from .run import run_suite
from .suites import SUITES
from .timing import DEFAULT_MAX_SECONDS

__all__ = ["parse_threads", "parse_dtypes", "parse_bytes", "parse_methods", "add_arguments", "run_from_args"]


def parse_threads(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``; ``"all"`` is ``os.cpu_count()``; ``"1,all"`` both."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if part == "all":
            out.append(os.cpu_count() or 1)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            raise ValueError(f"threads must be a comma-separated list of positive ints or 'all'; got {text!r}")
    return list(dict.fromkeys(out))


def parse_dtypes(text: str) -> list[str]:
    """``"float32,float64"`` -> ``["float32", "float64"]`` (also ``f32`` / ``f64``)."""
    aliases = {"f32": "float32", "f64": "float64", "float32": "float32", "float64": "float64"}
    out = []
    for part in str(text).split(","):
        if part.strip() not in aliases:
            raise ValueError(f"dtype must be a comma-separated list of float32 / float64; got {text!r}")
        out.append(aliases[part.strip()])
    return list(dict.fromkeys(out))


def parse_bytes(text: str) -> int:
    """``"1GiB"``, ``"512MiB"``, ``"2e9"`` -> bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "b": 1}
    lowered = str(text).strip().lower()
    for unit, scale in units.items():
        if lowered.endswith(unit):
            number, factor = lowered[:-len(unit)], scale
            break
    else:
        number, factor = lowered, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"memory budget must be a number of bytes such as 1GiB or 5e8; got {text!r}") from None
    if value <= 0:
        raise ValueError(f"memory budget must be positive; got {text!r}")
    return value


def _arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = parse.__name__
    return convert


def parse_methods(text: str) -> list[str]:
    """``"sparse,im2col"`` -> ``["sparse", "im2col"]``, each one of :data:`~sparseconv.bench.methods.METHODS`."""
    methods = [m.strip() for m in str(text).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a comma-separated subset of {', '.join(METHODS)}; got {text!r}")
    return methods


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench`` options to a parser (or sub-parser) and return it.

    Parameters
    ----------
    parser : argparse.ArgumentParser

    Returns
    -------
    argparse.ArgumentParser
        ``parser`` itself.
    """
    parser.add_argument("--suite", default="lenet", choices=[*SUITES, "all"],
                        help="which layers to run (default: lenet; 'all' runs every suite but smoke)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="directory for <suite>.json, <suite>.md and PNG plots (default: %(default)s)")
    parser.add_argument("--dtype", type=_arg_type(parse_dtypes), default=["float32", "float64"],
                        help="comma-separated dtypes (default: float32,float64)")
    parser.add_argument("--threads", type=_arg_type(parse_threads), default=parse_threads("1,all"),
                        help="comma-separated thread counts, 'all' = every core (default: 1,all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per pass (default: 5)")
    parser.add_argument("--methods", type=_arg_type(parse_methods), default=list(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--memory-budget", type=_arg_type(parse_bytes), default=None,
                        help="bytes one method's main buffer may take, e.g. 2GiB (default: 1GiB)")
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                        help=f"time budget per pass measurement (default: {DEFAULT_MAX_SECONDS})")
    parser.add_argument("--max-direct-macs", type=float, default=DEFAULT_MAX_DIRECT_MACS,
                        help=f"skip 'direct' beyond this many multiply-adds per pass (default: "
                             f"{DEFAULT_MAX_DIRECT_MACS:.0e})")
    parser.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the suite the parsed ``bench`` options describe.

    Parameters
    ----------
    args : argparse.Namespace
        As parsed by a parser given :func:`add_arguments`.

    Returns
    -------
    int
        The exit code: 1 when some method gave a wrong answer, else 0.
    """
    result = run_suite(args.suite, dtypes=args.dtype, threads=args.threads, repeats=args.repeats, out_dir=args.out,
                       progress=not args.no_progress, methods=args.methods, memory_budget=args.memory_budget,
                       max_seconds=args.max_seconds, max_direct_macs=int(args.max_direct_macs),
                       plots=not args.no_plots)
    suites = result["suites"].values() if result["suite"] == "all" else [result]
    return int(any(r["status"] == "failed" for s in suites for r in s["results"]))
