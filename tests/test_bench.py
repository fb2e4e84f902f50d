"""The benchmark harness: the smoke suite yields complete, valid output. No timing assertions."""

import argparse
import json
import math
import sys

import numpy as np
import pytest

from sparseconv import bench

ROW_KEYS = {"layer", "layer_id", "method", "dtype", "threads", "status", "reason", "macs", "shapes",
            "buffer_name", "buffer_bytes", "build_s", "refresh_s", "verification", "timing", "info"}
TIMING_KEYS = {"median_s", "min_s", "times_s", "repeats", "number", "gflops", "ratio_to_im2col",
               "ratio_to_im2col_min", "ratio_to_torch", "ratio_to_torch_min", "spread"}
OPTIONAL = ("torch", "matplotlib", "tqdm", "threadpoolctl")


def _strict_json(path):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant} in {path}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    result = bench.run_suite("smoke", dtypes=("float32", "float64"), threads=(1,), repeats=2, out_dir=out,
                             progress=False, verbose=False)
    return result, out


def test_smoke_writes_valid_json_and_markdown(smoke):
    result, out = smoke
    data = _strict_json(out / "smoke.json")
    assert data["suite"] == "smoke"
    for key in ("schema", "settings", "environment", "thread_configs", "layers", "results", "summary", "files"):
        assert key in data
    env = data["environment"]
    assert env["versions"]["numpy"] == np.__version__ and env["versions"]["scipy"]
    assert env["cpu"] and env["cpu_count"] >= 1
    assert set(data["thread_configs"]) == {"1"}
    assert data["thread_configs"]["1"]["sparseconv_threads"] == 1
    assert data["settings"]["dtypes"] == ["float32", "float64"]
    markdown = (out / "smoke.md").read_text(encoding="utf-8")
    assert "# sparseconv benchmark: `smoke`" in markdown and "Key ratios" in markdown


def test_every_method_verified_or_skipped_with_reason(smoke):
    result, out = smoke
    rows = _strict_json(out / "smoke.json")["results"]
    layers = [layer.name for layer in bench.suite_layers("smoke")]
    keys = [(r["layer"], r["dtype"], r["threads"], r["method"]) for r in rows]
    assert sorted(keys) == sorted((layer, dt, 1, m) for layer in layers for dt in ("float32", "float64")
                                  for m in bench.METHODS)
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["status"] in ("ok", "skipped"), row["reason"]
        if row["status"] == "skipped":
            assert row["reason"]
            continue
        assert set(row["verification"]) == set(bench.PASSES)
        for check in row["verification"].values():
            assert check["ok"] and check["rel_err"] <= check["tol"]
        assert set(row["timing"]) == {*bench.PASSES, "total"}
        for name in bench.PASSES:
            timing = row["timing"][name]
            assert TIMING_KEYS <= set(timing)
            assert timing["repeats"] == len(timing["times_s"]) >= 1
            assert timing["ratio_to_im2col"] is not None
        assert row["timing"]["total"]["ratio_to_im2col"] is not None
    # The methods that need nothing optional always run on the smoke layers.
    for method in ("sparse", "dense", "im2col", "direct", "fft"):
        assert all(r["status"] == "ok" for r in rows if r["method"] == method)


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


def test_runs_without_optional_extras(tmp_path, monkeypatch):
    for name in OPTIONAL:
        monkeypatch.setitem(sys.modules, name, None)  # makes "import name" raise ImportError
    result = bench.run_suite("smoke", dtypes=("float64",), threads=(1,), repeats=1, out_dir=tmp_path,
                             progress=True, verbose=False)
    torch_rows = [r for r in result["results"] if r["method"] == "torch"]
    assert torch_rows and all(r["status"] == "skipped" and "not installed" in r["reason"] for r in torch_rows)
    notes = " ".join(result["notes"])
    for name in ("tqdm", "threadpoolctl", "matplotlib"):
        assert name in notes
    assert result["files"]["plots"] == [] and "matplotlib" in result["files"]["plots_skipped"]
    assert result["thread_configs"]["1"]["pools"] is None
    assert all(r["status"] == "ok" for r in result["results"] if r["method"] != "torch")
    _strict_json(tmp_path / "smoke.json")
    assert (tmp_path / "smoke.md").exists()


def test_wrong_answer_is_failed_and_not_timed(tmp_path, monkeypatch):
    original = bench._PREPARERS["fft"]

    def wrong_fft(case, **kwargs):
        prepared = original(case, **kwargs)
        forward = prepared.passes["forward"]
        prepared.passes["forward"] = lambda: forward() * 1.01
        return prepared

    monkeypatch.setitem(bench._PREPARERS, "fft", wrong_fft)
    result = bench.run_suite("smoke", dtypes=("float64",), threads=(1,), repeats=1, out_dir=None,
                             progress=False, verbose=False, methods=("im2col", "fft"))
    fft_rows = [r for r in result["results"] if r["method"] == "fft"]
    assert fft_rows and all(r["status"] == "failed" and r["timing"] is None for r in fft_rows)
    assert all("forward" in r["reason"] and not r["verification"]["forward"]["ok"] for r in fft_rows)


def test_memory_budget_skips_with_reason():
    case = bench.make_case(bench.suite_layers("smoke")[0], "float64")
    for method in ("sparse", "dense", "im2col", "fft"):
        with pytest.raises(bench.MethodSkipped, match="budget"):
            bench.prepare_method(method, case, memory_budget=64)


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
    assert bench.parse_threads("all") == [bench.os.cpu_count()]
    assert bench.parse_dtypes("f32,float64") == ["float32", "float64"]
    assert bench.parse_bytes("1GiB") == 2 ** 30 and bench.parse_bytes("5e8") == 500_000_000
    for parse, text in ((bench.parse_threads, "x"), (bench.parse_dtypes, "float16"), (bench.parse_bytes, "lots")):
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
