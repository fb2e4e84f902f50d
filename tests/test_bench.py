"""The benchmark harness: the smoke suite yields complete, valid output. No timing assertions."""

import argparse
import json
import math
import os
import sys

import numpy as np
import pytest

from sparseconv import bench
from sparseconv import engines as sc_engines
from sparseconv.bench import methods, suites

ROW_KEYS = {"layer", "layer_id", "method", "dtype", "threads", "status", "reason", "macs", "shapes",
            "buffer_name", "buffer_bytes", "build_s", "refresh_s", "verification", "timing", "info"}
TIMING_KEYS = {"median_s", "min_s", "times_s", "repeats", "number", "gflops", "ratio_to_im2col",
               "ratio_to_im2col_min", "ratio_to_torch", "ratio_to_torch_min", "spread"}
OPTIONAL = ("torch", "pylops", "pylops.signalprocessing", "matplotlib", "tqdm", "threadpoolctl")
# Methods needing nothing optional: they run on every smoke layer.
CORE_METHODS = ("sparse", "csr", "factored", "dense", "im2col", "direct", "fft")


def _strict_json(path):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant} in {path}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def _installed(name):
    try:
        __import__(name)
    except ImportError:
        return False
    return True


# The smoke run takes seconds and is paid by whichever of its tests runs first: every test
# that reads it is marked slow.
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    result = bench.run_suite("smoke", dtypes=("float32", "float64"), threads=(1,), repeats=2, out_dir=out,
                             progress=False, verbose=False)
    return result, out


@pytest.mark.slow
def test_smoke_writes_valid_json_and_markdown(smoke):
    result, out = smoke
    data = _strict_json(out / "smoke.json")
    assert data["suite"] == "smoke" and data["schema"] == bench.SCHEMA
    for key in ("settings", "environment", "thread_configs", "layers", "results", "summary", "files"):
        assert key in data
    env = data["environment"]
    assert env["versions"]["numpy"] == np.__version__ and env["versions"]["scipy"]
    assert env["cpu"] and env["cpu_count"] >= 1
    assert set(data["thread_configs"]) == {"1"}
    assert data["thread_configs"]["1"]["sparseconv_threads"] == 1
    assert data["settings"]["dtypes"] == ["float32", "float64"]
    assert data["settings"]["passes"] == ["forward", "adjoint", "weight_grad"]
    assert [layer["name"] for layer in data["layers"]] == [layer.name for layer in bench.suite_layers("smoke")]
    assert {tuple(layer["passes"]) for layer in data["layers"]} == {bench.PASSES, bench.LINEAR_OPERATOR_PASSES}
    markdown = (out / "smoke.md").read_text(encoding="utf-8")
    assert "# sparseconv benchmark: `smoke`" in markdown and "Key ratios" in markdown


@pytest.mark.slow
def test_every_method_verified_or_skipped_with_reason(smoke):
    result, out = smoke
    rows = _strict_json(out / "smoke.json")["results"]
    layers = {layer.name: layer for layer in bench.suite_layers("smoke")}
    keys = [(r["layer"], r["dtype"], r["threads"], r["method"]) for r in rows]
    assert sorted(keys) == sorted((layer, dt, 1, m) for layer in layers for dt in ("float32", "float64")
                                  for m in bench.METHODS)
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["status"] in ("ok", "skipped"), row["reason"]
        if row["status"] == "skipped":
            assert row["reason"]
            continue
        passes = layers[row["layer"]].passes
        assert set(row["verification"]) == set(passes)
        for check in row["verification"].values():
            assert check["ok"] and check["rel_err"] <= check["tol"]
        assert set(row["timing"]) == {*passes, "total"}
        for name in passes:
            timing = row["timing"][name]
            assert TIMING_KEYS <= set(timing)
            assert timing["repeats"] == len(timing["times_s"]) >= 1
            assert timing["ratio_to_im2col"] is not None
        assert row["timing"]["total"]["ratio_to_im2col"] is not None
    for method in CORE_METHODS:
        assert all(r["status"] == "ok" for r in rows if r["method"] == method), method


@pytest.mark.slow
def test_operator_methods_record_their_engines(smoke):
    result, _ = smoke
    for row in result["results"]:
        if row["method"] in ("csr", "factored"):
            layer = next(x for x in bench.suite_layers("smoke") if x.name == row["layer"])
            assert row["info"]["engines"] == {p: row["method"] for p in layer.passes}
        if row["method"] == "sparse":
            assert set(row["info"]["engines"].values()) <= set(sc_engines.ENGINE_NAMES)


@pytest.mark.slow
@pytest.mark.skipif(not _installed("pylops"), reason="pylops is not installed")
def test_pylops_runs_on_the_image_layer_only(smoke):
    result, _ = smoke
    rows = [r for r in result["results"] if r["method"] == "pylops"]
    image = [r for r in rows if r["layer"] == "smoke image k5"]
    assert image and all(r["status"] == "ok" for r in image)
    assert all(r["status"] == "skipped" and "single-channel" in r["reason"] for r in rows if r not in image)
    for config in result["summary"]["configs"]:
        compared = {e["layer"] for e in config["layers"] if e["sparse_over_pylops"] is not None}
        assert compared == {"smoke image k5"}
    assert "Against PyLops" in (smoke[1] / "smoke.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_summary_has_a_ratio_per_layer(smoke):
    result, _ = smoke
    configs = result["summary"]["configs"]
    assert [(c["dtype"], c["threads"]) for c in configs] == [("float32", 1), ("float64", 1)]
    for config in configs:
        assert len(config["layers"]) == len(bench.suite_layers("smoke"))
        assert all(e["sparse_over_im2col"] is not None and e["sparse_over_im2col_min"] is not None
                   for e in config["layers"])
        assert set(config["geomean_sparse_over_im2col_by_pass"]) == set(bench.PASSES)
        assert 0 <= config["noisy_measurements"] <= config["measurements"]


@pytest.mark.slow
def test_plots_are_readable_size(smoke):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    result, out = smoke
    assert result["files"]["plots"]
    for path in result["files"]["plots"]:
        height, width = imread(path).shape[:2]
        assert width == 900 and height >= 600


@pytest.mark.slow
def test_runs_without_optional_extras(tmp_path, monkeypatch):
    for name in OPTIONAL:
        monkeypatch.setitem(sys.modules, name, None)  # makes "import name" raise ImportError
    result = bench.run_suite("smoke", dtypes=("float64",), threads=(1,), repeats=1, out_dir=tmp_path,
                             progress=True, verbose=False)
    for method in ("torch", "pylops"):
        rows = [r for r in result["results"] if r["method"] == method]
        assert rows and all(r["status"] == "skipped" for r in rows)
    assert all("not installed" in r["reason"] for r in result["results"] if r["method"] == "torch"
               or r["method"] == "pylops" and r["layer"] == "smoke image k5")
    notes = " ".join(result["notes"])
    for name in ("tqdm", "threadpoolctl", "matplotlib"):
        assert name in notes
    assert result["files"]["plots"] == [] and "matplotlib" in result["files"]["plots_skipped"]
    assert result["thread_configs"]["1"]["pools"] is None
    # The compiled engines are skipped, saying so, where numba is missing; the stencil also on
    # layers it cannot run (it runs only zero-padded stride-1 layers).
    compiled = [r for r in result["results"] if r["method"] in ("numba", "implicit", "stencil")]
    assert compiled
    if _installed("numba"):
        assert all(r["status"] == "ok" for r in compiled if r["method"] == "numba")
        assert all(r["status"] == "ok" or "cannot run" in r["reason"] for r in compiled
                   if r["method"] in ("stencil", "implicit"))
    else:
        assert all(r["status"] == "skipped" and "numba is not available" in r["reason"] for r in compiled)
    assert all(r["status"] == "ok" for r in result["results"]
               if r["method"] not in ("torch", "pylops", "numba", "implicit", "stencil"))
    _strict_json(tmp_path / "smoke.json")
    assert (tmp_path / "smoke.md").exists()


@pytest.mark.parametrize("method, pass_name", [("fft", "forward"), ("sparse", "adjoint"),
                                               ("csr", "weight_grad")], ids=["fft-forward", "sparse-adjoint",
                                                                             "csr-weight_grad"])
def test_wrong_answer_is_failed_and_not_timed(monkeypatch, method, pass_name):
    original = methods.PREPARERS[method]

    def wrong(case, settings):
        prepared = original(case, settings)
        if pass_name in prepared.passes:
            right = prepared.passes[pass_name]
            prepared.passes[pass_name] = lambda: right() * 1.01
        return prepared

    monkeypatch.setitem(methods.PREPARERS, method, wrong)
    result = bench.run_suite("smoke", dtypes=("float64",), threads=(1,), repeats=1, out_dir=None,
                             progress=False, verbose=False, methods=("im2col", method))
    rows = [r for r in result["results"] if r["method"] == method and pass_name in r["verification"]]
    assert rows and all(r["status"] == "failed" and r["timing"] is None for r in rows)
    assert all(pass_name in r["reason"] and not r["verification"][pass_name]["ok"] for r in rows)
    assert all(r["status"] == "ok" for r in result["results"] if r["method"] == "im2col")


def test_memory_budget_skips_with_reason():
    case = bench.make_case(bench.suite_layers("smoke")[0], "float64")
    for method in ("sparse", "csr", "factored", "dense", "im2col", "fft"):
        with pytest.raises(bench.MethodSkipped, match="budget"):
            bench.prepare_method(method, case, bench.Settings(budget=64))


def test_an_engine_this_sparseconv_lacks_is_skipped(uncompiled_policy):
    from sparseconv.bench.methods._engine import engine_method

    case = bench.make_case(bench.suite_layers("smoke")[0], "float64")
    with pytest.raises(bench.MethodSkipped, match="'gpu' is not in this sparseconv"):
        engine_method("gpu", "gpu")(case, bench.Settings())


def test_an_engine_registered_but_not_importable_is_skipped(monkeypatch):
    from sparseconv import engines
    from sparseconv.bench.methods._engine import engine_method

    monkeypatch.setitem(engines._MODULES, "broken", ".no_such_engine_module")
    case = bench.make_case(bench.suite_layers("smoke")[0], "float64")
    with pytest.raises(bench.MethodSkipped, match="'broken' is registered but cannot be imported here: No module"):
        engine_method("broken", "broken")(case, bench.Settings())


def test_a_registered_engine_joins_the_benchmark(monkeypatch):
    from sparseconv import engines
    from sparseconv.bench.methods._engine import engine_method

    monkeypatch.setitem(engines._MODULES, "dense", "engine_dense")  # tests/engine_dense.py
    layer = bench.suite_layers("smoke")[0]
    case = bench.make_case(layer, "float64")
    prepared = engine_method("dense", "dense")(case, bench.Settings(repeats=1))
    assert prepared.info["engines"] == {p: "dense" for p in layer.passes}
    assert all(bench.verify(prepared, case)[p]["ok"] for p in layer.passes)


def test_engine_methods_share_an_operator_only_when_they_run_the_same_engines(uncompiled_policy):
    from sparseconv.bench.methods import _operator

    budget = bench.resolve_budget(None)
    layer, image = bench.suite_layers("smoke")[0], bench.suite_layers("smoke")[-1]
    case = bench.make_case(layer, "float64", reference=False)
    first, csr_bytes, _ = _operator.shared_build(case, budget, "csr")
    assert _operator.shared_build(case, budget, "csr")[0] is first
    factored, factored_bytes, _ = _operator.shared_build(case, budget, "factored")
    assert factored is not first and factored._structure._pattern is None  # no matrix built for it
    assert first._structure._pattern is not None and 0 < factored_bytes < csr_bytes
    # "auto" runs this layer's kernel gradient on the factored engine: an operator of its own.
    assert _operator.shared_build(case, budget)[0] not in (first, factored)
    assert _operator.build(case, budget, "csr")[0] is not first  # build() is always a new one
    other = bench.make_case(layer, "float64", reference=False)
    assert _operator.shared_build(other, budget, "csr")[0] is not first
    # The single-channel image: "auto" picks the CSR kernel for both passes, so "sparse" and
    # "csr" hold one matrix between them.
    image_case = bench.make_case(image, "float64", reference=False)
    auto, auto_bytes, _ = _operator.shared_build(image_case, budget)
    assert _operator.engines_in_force(auto, image.passes) == {"forward": "csr", "adjoint": "csr"}
    shared, shared_bytes, _ = _operator.shared_build(image_case, budget, "csr")
    assert shared is auto and shared_bytes == auto_bytes


def test_passes_name_the_engine_only_where_the_operator_would_choose_another(uncompiled_policy):
    from sparseconv.bench.methods import _operator

    layer = bench.suite_layers("smoke")[0]
    case = bench.make_case(layer, "float64", reference=False)
    op, _ = _operator.build(case, bench.resolve_budget(None))
    assert op.engine("adjoint") == "csr" and op._structure._adjoint_tables is None
    _operator.passes(op, case)["adjoint"]()
    assert op._structure._adjoint_tables is None  # the operator's own engine
    _operator.passes(op, case, "factored")["adjoint"]()
    assert op._structure._adjoint_tables is not None  # pinned to the factored engine


def test_methods_are_discovered_in_rank_order():
    assert bench.METHODS[:3] == ("sparse", "csr", "factored")
    assert set(bench.METHODS) == {"sparse", "csr", "factored", "numba", "implicit", "stencil", "dense", "im2col",
                                  "direct", "fft", "torch", "pylops"}
    with pytest.raises(ValueError, match="method must be one of"):
        bench.prepare_method("magic", bench.make_case(bench.suite_layers("smoke")[0], "float64"))


# ---------------------------------------------------------------------- suites and cases
def test_pruned_suite_sweeps_the_issue_sparsities():
    layers = bench.suite_layers("pruned")
    assert bench.PRUNED_SPARSITIES == (0.0, 0.5, 0.75, 0.9, 0.95, 0.99)
    shapes = {}
    for layer in layers:
        shapes.setdefault(layer.describe(pruning=False), []).append(layer.prune)
    assert sorted(shapes) == sorted(["N32-C64-32x32-F64-k3-s1-p1", "N64-C6-14x14-F16-k5-s1-p0",
                                     "N64-C16-5x5-F120-k5-s1-p0"])
    assert all(v == list(bench.PRUNED_SPARSITIES) for v in shapes.values())
    assert all(layer.prune_by == "magnitude" for layer in layers)


def test_image_suite_is_single_channel_true_convolution_through_the_linear_operator():
    layers = bench.suite_layers("image")
    assert [layer.kernel for layer in layers] == [7, 15]
    for layer in layers:
        assert (layer.batch, layer.in_channels, layer.out_channels, layer.size) == (1, 1, 1, 512)
        assert layer.flip and layer.interface == "linear_operator" and layer.out_size == 512
        assert layer.passes == ("forward", "adjoint")


@pytest.mark.parametrize("prune_by", suites.PRUNE_BY)
@pytest.mark.parametrize("prune", [0.5, 0.9, 0.99])
def test_masks_prune_exactly_the_fraction(prune, prune_by):
    layer = bench.Layer("m", 2, 8, 8, 6, 3, prune=prune, prune_by=prune_by)
    case = bench.make_case(layer, "float64", reference=False)
    size = int(np.prod(layer.weight_shape))
    assert case.mask.sum() == size - round(prune * size)
    assert np.all(case.w[~case.mask] == 0)
    if prune_by == "magnitude":
        rng = np.random.default_rng(0)
        drawn = np.abs(rng.standard_normal(layer.weight_shape))
        assert drawn[case.mask].min() >= drawn[~case.mask].max()
    again = bench.make_case(layer, "float32", reference=False)
    np.testing.assert_array_equal(again.mask, case.mask)  # fixed seed, same in every dtype


def test_flip_case_expects_true_convolution():
    from sparseconv import reference as ref

    layer = bench.suite_layers("smoke")[-1]
    case = bench.make_case(layer, "float64")
    flipped = case.w[:, :, ::-1, ::-1]
    np.testing.assert_allclose(case.expected["forward"], ref.conv_im2col(case.x, flipped, padding=layer.padding),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(case.kernel, flipped)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prune=1.0), "prune must be in"),
    (dict(prune_by="largest"), "prune_by must be one of"),
    (dict(interface="rows"), "interface must be one of"),
    (dict(interface="linear_operator"), "batch=1"),
    (dict(flip=True), "flip=True layers"),
], ids=["prune", "prune_by", "interface", "linop-batch", "flip-batch"])
def test_bad_layers_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.Layer("bad", 2, 2, 2, 8, 3, **kwargs)


# ---------------------------------------------------------------------- timing
def test_interleaved_timing_takes_repeats_in_turn_under_each_context():
    import contextlib

    calls, entered = [], []

    @contextlib.contextmanager
    def tagged(tag):
        entered.append(tag)
        yield

    result = bench.measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                       repeats=3, min_repeat_seconds=0.0,
                                       contexts={"a": lambda: tagged("a"), "b": lambda: tagged("b")})
    assert {k: v["repeats"] for k, v in result.items()} == {"a": 3, "b": 3}
    assert all(v["number"] == 1 for v in result.values())
    timed = calls[-6:]
    assert timed == ["a", "b"] * 3  # round-robin, not all of a then all of b
    assert entered.count("a") == entered.count("b") == 4  # calibration + 3 repeats each
    with pytest.raises(ValueError, match="contexts must be keyed"):
        bench.measure_interleaved({"a": lambda: None}, contexts={"z": contextlib.nullcontext})


def test_time_once_returns_the_result():
    value, seconds = bench.time_once(lambda: 42)
    assert value == 42 and seconds >= 0


# ---------------------------------------------------------------------- settings and command line
@pytest.mark.parametrize("kwargs, match", [
    (dict(name="nope"), "suite must be one of"),
    (dict(name="smoke", dtypes=("float16",)), "dtypes must be among"),
    (dict(name="smoke", threads=(0,)), "threads must be"),
    (dict(name="smoke", repeats=0), "repeats must be"),
    (dict(name="smoke", methods=("magic",)), "methods must be"),
    (dict(name="smoke", memory_budget=-1), "memory_budget must be"),
], ids=["suite", "dtype", "threads", "repeats", "methods", "budget"])
def test_bad_settings_raise_value_error(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        bench.run_suite(name, out_dir=None, progress=False, verbose=False, **kwargs)


def test_parsers():
    assert bench.parse_threads("1,2") == [1, 2]
    assert bench.parse_threads("all") == [os.cpu_count()]
    assert bench.parse_dtypes("f32,float64") == ["float32", "float64"]
    assert bench.parse_bytes("1GiB") == 2 ** 30 and bench.parse_bytes("5e8") == 500_000_000
    assert bench.parse_methods("sparse,factored") == ["sparse", "factored"]
    for parse, text in ((bench.parse_threads, "x"), (bench.parse_dtypes, "float16"), (bench.parse_bytes, "lots"),
                        (bench.parse_methods, "taps")):
        with pytest.raises(ValueError, match=repr(text)):
            parse(text)


def test_command_line_wiring(tmp_path):
    parser = bench.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--suite", "smoke", "--out", str(tmp_path), "--dtype", "float64", "--threads", "1",
                              "--repeats", "1", "--methods", "sparse,im2col", "--no-plots", "--no-progress"])
    assert bench.run_from_args(args) == 0
    data = _strict_json(tmp_path / "smoke.json")
    assert {r["method"] for r in data["results"]} == {"sparse", "im2col"}
    assert math.isfinite(data["wall_s"])


@pytest.mark.slow
def test_crossover_plot_of_a_pruning_sweep(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    sweep = [bench.Layer(f"tiny zero {round(q * 100)}%", 2, 4, 4, 6, 3, padding=1, prune=q, prune_by="magnitude")
             for q in (0.0, 0.5, 0.9)]
    monkeypatch.setitem(suites._SUITE_BUILDERS, "smoke", lambda: sweep)
    result = bench.run_suite("smoke", dtypes=("float64",), threads=(1,), repeats=1, out_dir=tmp_path,
                             progress=False, verbose=False, methods=("sparse", "factored", "im2col"))
    names = sorted(os.path.basename(p) for p in result["files"]["plots"])
    assert names == sorted(f"smoke_crossover{tag}_float64_t1.png"
                           for tag in ("", "_forward", "_adjoint", "_weight_grad"))
    for path in result["files"]["plots"]:
        assert imread(path).shape[:2] == (600, 900)


# ---------------------------------------------------------------------- the one im2col
@pytest.mark.parametrize("kernel, stride, dilation, padding, mode", [
    (3, 1, 1, 1, "zeros"), (3, 2, 1, 1, "zeros"), (2, 1, 2, (1, 2), "zeros"), (3, 2, 2, 2, "circular"),
    (3, 1, 1, 2, "reflect"), ((2, 3), (2, 1), (1, 2), 1, "replicate"),
], ids=["3x3", "stride2", "dilated-asym", "circular", "reflect", "rect-replicate"])
def test_im2col_layouts_and_col2im_scatter(kernel, stride, dilation, padding, mode):
    from sparseconv import reference as ref

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    patch = dict(stride=stride, dilation=dilation, padding=padding, padding_mode=mode)
    cols = ref.im2col(x, kernel, **patch)
    rows = ref.im2col(x, kernel, layout="rows", **patch)
    np.testing.assert_array_equal(rows, cols.transpose(0, 2, 1).reshape(-1, cols.shape[1]))
    # col2im against the literal scatter: every patch entry added back, with np.add.at, at the
    # input position im2col read it from (found by unrolling 1 + the positions' own indices;
    # 0 is a zero-padding read, which the adjoint drops).
    d = rng.standard_normal(cols.shape)
    mine = ref.col2im(d, x.shape[1:], kernel, **patch)
    index = ref.im2col(np.arange(1, x[0].size + 1, dtype=float).reshape(x[:1].shape), kernel, **patch)[0]
    index = index.astype(np.intp)
    read = np.broadcast_to(index > 0, d.shape)
    literal = np.zeros((2, x[0].size))
    np.add.at(literal, (np.broadcast_to(np.arange(2)[:, None, None], d.shape)[read],
                        np.broadcast_to(index - 1, d.shape)[read]), d[read])
    np.testing.assert_allclose(mine, literal.reshape(x.shape), rtol=1e-13, atol=1e-13)
    by_rows = ref.col2im(np.ascontiguousarray(d.transpose(0, 2, 1)).reshape(-1, d.shape[1]), x.shape[1:], kernel,
                         layout="rows", **patch)
    np.testing.assert_array_equal(by_rows, mine)
    with pytest.raises(ValueError, match="layout must be one of"):
        ref.im2col(x, kernel, layout="cols", **patch)


@pytest.mark.parametrize("blocked", [False, True], ids=["interleaved", "blocked"])
def test_measure_each_times_every_callable(blocked):
    calls = {"a": 0, "b": 0}

    def make(key):
        def fn():
            calls[key] += 1
        return fn

    timings = bench.measure_each({"a": make("a"), "b": make("b")}, blocked=blocked, repeats=3, max_seconds=0.2)
    assert set(timings) == {"a", "b"}
    for t in timings.values():
        assert t["repeats"] == 3 and len(t["times_s"]) == 3 and t["min_s"] <= t["median_s"]
    assert calls["a"] >= 3 and calls["b"] >= 3


def _fault_count(prelude: str) -> int:
    """Page faults of 20 rounds of eight 1 MiB blocks allocated and freed, in a fresh process."""
    import subprocess

    code = (f"import numpy as np, resource\n{prelude}\n"
            "def rounds(k):\n"
            "    for _ in range(k):\n"
            "        blocks = [np.ones(1 << 17) for _ in range(8)]\n"
            "        del blocks\n"
            "rounds(3)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "rounds(20)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_malloc_no_trim_stops_page_faults_of_reallocated_blocks():
    """Process-wide, so in subprocesses. By default glibc trims the 8 MiB its heap grew by at
    every round and faults the pages in again (about 40000 faults here); after
    ``malloc_no_trim`` the pages stay (a handful at most)."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        with pytest.raises(RuntimeError, match="needs glibc's mallopt"):
            bench.malloc_no_trim()
        return
    default = _fault_count("")
    tuned = _fault_count("from sparseconv.bench import malloc_no_trim; malloc_no_trim()")
    assert default > 20 * 1024, default  # at least half the 40960 pages of the 20 rounds: the pattern trims
    assert tuned < 256, tuned
