"""The benchmarks' --quick modes run in-process so they cannot rot; structure is checked, never timings."""

from __future__ import annotations

import json
import sys

import pytest

import benchmarks.common as common
import benchmarks.decompose as decompose_bench
import benchmarks.memory as memory_bench
import benchmarks.runtime as runtime_bench

SUITES = ("decompose", "runtime", "memory")

METHODS = {f"ef-{m}" for m in decompose_bench.EF_METHODS} | set(decompose_bench.PEER_METHODS)


def test_quick_decompose_writes_json_and_markdown(tmp_path):
    assert decompose_bench.main(["--quick", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_decompose_quick.json").read_text())
    assert data["suite"] == "decompose" and data["quick"] is True
    limits = {"copy_bandwidth_gbs", "gemm_fp32_gflops", "gemm_fp64_gflops", "gemm_bf16_gflops"}
    assert limits <= set(data["machine_limits"])
    cases = data["cases"]
    assert {c["method"] for c in cases} == METHODS
    assert {c["rank"] for c in cases} == {4, 8, 16}  # d/8, d/4, d/2 of the 600×32 quick matrix
    for c in cases:
        assert c["status"] == "ok", c
        # no method beats the Eckart–Young optimum; the exact ones reach it
        assert c["relative_error"] >= c["optimal_relative_error"] - 1e-5
        assert c["x_lower_bound"] > 0 and c["lower_bound_seconds"] > 0 and c["peak_rss_mb"] > 0
        assert "speedup_vs_sklearn" in c
    exact = [c for c in cases if c["method"] in ("ef-eig", "ef-svd")]
    assert all(c["excess_error"] < 1e-4 for c in exact)
    md = (tmp_path / "bench_decompose_quick.md").read_text()
    assert "| method | rank | seconds | vs sklearn | x bound |" in md
    assert md.count("| ef-eig |") == 3
    assert not (tmp_path / "bench_decompose.json").exists()


def test_runtime_quick_structure(tmp_path):
    data = runtime_bench.run(quick=True, output=tmp_path, progress=False)
    layers = {r["layer"] for r in data["embedding"]}
    assert layers == {"nn.Embedding", "nn.Embedding sparse", "Factorized r=16", "Factorized r=16 sparse"}
    assert all(r["forward_ms"] > 0 and r["train_step_ms"] > 0 for r in data["embedding"])
    # each factorized row carries its GEMM floor (2·tokens·r·d FLOPs at the measured peak) relative to dense
    peak = data["machine_limits"]["gemm_fp32_gflops"] * 1e9
    dense = {r["tokens"]: r["forward_ms"] for r in data["embedding"] if r["layer"] == "nn.Embedding"}
    for r in data["embedding"]:
        if r["layer"].startswith("Factorized"):
            assert r["gemm_bound_ms"] == pytest.approx(2 * r["tokens"] * r["rank"] * r["d"] / peak * 1e3)
            assert r["bound_vs_dense"] == pytest.approx(r["gemm_bound_ms"] / dense[r["tokens"]])
        else:
            assert "gemm_bound_ms" not in r
    assert {(h["dtype"], h["tokens"]) for h in data["head"]} == {
        (dt, t) for dt in ("float32", "bfloat16") for t in (1, 32, 512)
    }
    h = data["head"][0]
    assert h["ideal_speedup"] == pytest.approx(h["vocab"] * h["d"] / (h["rank"] * (h["vocab"] + h["d"])))
    assert {g["head"].split()[0] for g in data["generation"]} == {"dense", "factorized"}
    assert all(g["tokens_per_s"] > 0 for g in data["generation"])
    md = (tmp_path / "bench_runtime_quick.md").read_text()
    assert "### LM head logits" in md and "### Greedy generation" in md and "### Embedding lookup" in md
    assert json.loads((tmp_path / "bench_runtime_quick.json").read_text())["suite"] == "runtime"


def test_quick_bench_never_overwrites_committed_results(tmp_path, monkeypatch):
    """`python -m benchmarks.decompose --quick` with the default output writes bench_*_quick.*, beside the committed full results."""
    results = tmp_path / "results"
    results.mkdir()
    committed = {}
    for suite in SUITES:
        for ext in ("json", "md"):
            path = results / f"bench_{suite}.{ext}"
            path.write_text(f"committed full {suite} results\n")
            committed[path] = path.read_bytes()
    monkeypatch.setattr(common, "RESULTS_DIR", results)  # the checkout's benchmarks/results, as a copy
    assert decompose_bench.main(["--quick"]) == 0
    assert {p: p.read_bytes() for p in committed} == committed
    assert json.loads((results / "bench_decompose_quick.json").read_text())["quick"] is True
    # the one writer every suite uses names quick data *_quick, whatever the folder; full runs keep their names
    for suite in SUITES:
        files = common.write_results(suite, {"quick": True}, "x", results)
        assert files == {"json": str(results / f"bench_{suite}_quick.json"),
                         "markdown": str(results / f"bench_{suite}_quick.md")}
        assert common.write_results(suite, {"quick": False}, "x", tmp_path)["json"] == str(tmp_path / f"bench_{suite}.json")
    assert {p: p.read_bytes() for p in committed} == committed


def test_memory_measurement_counts_child_peak_rss():
    touch_300mb = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"
    r = memory_bench._run_measured([sys.executable, "-c", touch_300mb], timeout=120)
    assert r["status"] == "ok"
    assert r["peak_rss_mb"] > 300
    bad = memory_bench._run_measured([sys.executable, "-c", "raise SystemExit(3)"], timeout=120)
    assert bad["status"] == "error"


def test_memory_render_structure(tmp_path):
    row = {"model": "m", "target": "--ratio 4", "params": 1000, "fp32_mb": 100.0, "imports_peak_rss_mb": 300.0,
           "load_peak_rss_mb": 400.0, "compress_peak_rss_mb": 450.0, "model_memory_mb": 150.0,
           "model_memory_over_fp32": 1.5, "extra_over_load_mb": 50.0, "compress_seconds": 3.0, "status": "ok"}
    md = memory_bench.render({"quick": True, "environment": common.environment(), "rows": [row]})
    assert "| m | --ratio 4 | 1,000 | 100 | 300 | 400 | 450 | 150 | 1.5 | 50.0 | 3 |" in md
    files = common.write_results("memory", {"rows": [row]}, md, tmp_path)
    assert json.loads(open(files["json"]).read())["rows"][0]["model"] == "m"


def test_lower_bound_model_known_numbers():
    limits = {"gemm_fp32_gflops": 100.0, "copy_bandwidth_gbs": 10.0}
    lb = decompose_bench.lower_bound("ef-eig", 1000, 100, 10, limits, {})
    assert lb["flops"] == 1000 * 100 * 100 + 2 * 1000 * 100 * 10 and lb["passes"] == 2
    assert lb["lower_bound_seconds"] == pytest.approx(max(lb["flops"] / 1e11, 2 * 4 * 1000 * 100 / 1e10))
    arpack = decompose_bench.lower_bound("scipy-svds", 1000, 100, 10, limits, {})
    assert arpack["passes"] == 2 * 21


def test_isolated_runner_keeps_results_before_a_crash():
    res = common.run_isolated("benchmarks.common", "emit", {"result": {"rank": 1, "x": 2}}, timeout=120)
    assert res[0]["x"] == 2 and res[0]["status"] == "ok" and res[0]["peak_rss_mb"] > 0
    bad = common.run_isolated("benchmarks.common", "emit", {"nope": 1}, timeout=120)
    assert bad[-1]["status"] == "error"
