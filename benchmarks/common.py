"""Shared machinery of the benchmarks: timing, subprocess isolation with peak RSS, machine limits, output.

Every decomposition case runs in a fresh Python process so that its peak resident set size
(``ru_maxrss``) is its own: PyTorch's and glibc's allocators never give all memory back, so in-process
tracemalloc or RSS deltas undercount native allocations.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
CACHE_DIR = Path(os.environ.get("EMBFACTOR_BENCH_CACHE", Path(tempfile.gettempdir()) / "embfactor-bench-cache"))
RESULT_TAG = "@@EMBFACTOR_BENCH_RESULT@@"


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def current_rss_mb() -> float:
    """Current resident set size in MB (from /proc; falls back to the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def time_call(
    fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, min_seconds: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median/min/max wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs.

    With ``min_seconds`` > 0, each sample loops ``fn`` until that much time has passed (for microsecond calls)
    and reports the time per call.
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        n = 0
        t0 = clock()
        while True:
            fn()
            n += 1
            dt = clock() - t0
            if dt >= min_seconds:
                break
        samples.append(dt / n)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "repeats": repeats}


def machine_limits(*, quick: bool = False, cpu_time: bool = False) -> dict[str, float]:
    """Measure this machine now: copy bandwidth and GEMM throughput (float32, float64, bfloat16).

    Bandwidth counts read + write bytes of a large ``copy_`` (bigger than any cache); FLOP/s come from a square
    matmul. Each is the best of several runs: the machine's ceiling, against which every method's time is a
    multiple ≥ 1 in the results.
    """
    clock = time.process_time if cpu_time else time.perf_counter
    n_copy = (8 if quick else 64) * 2**20  # float32 elements: 32 MB or 256 MB
    x = torch.empty(n_copy, dtype=torch.float32).normal_()
    y = torch.empty_like(x)
    t = time_call(lambda: y.copy_(x), repeats=3 if quick else 7, warmup=1, clock=clock)
    out: dict[str, float] = {"copy_bandwidth_gbs": 2 * x.numel() * 4 / t["min"] / 1e9}
    x = y = None  # free 512 MB before the GEMM runs
    m = 384 if quick else 2048
    kinds = ((torch.float32, "gemm_fp32_gflops"), (torch.float64, "gemm_fp64_gflops"), (torch.bfloat16, "gemm_bf16_gflops"))
    for dt, key in kinds:
        a = torch.randn(m, m).to(dt)
        b = torch.randn(m, m).to(dt)
        t = time_call(lambda: a @ b, repeats=3 if quick else 5, warmup=1, clock=clock)
        out[key] = 2 * m**3 / t["min"] / 1e9
    out["threads"] = torch.get_num_threads()
    out["clock"] = "cpu" if cpu_time else "wall"
    return out


def emit_machine_limits(quick: bool = False) -> None:
    """Subprocess entry: machine limits in CPU time on this process's threads (see :func:`run_isolated`)."""
    emit(machine_limits(quick=quick, cpu_time=True))


SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def environment() -> dict[str, Any]:
    """What the numbers depend on: CPU, threads, library versions, and how busy the machine was."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1m": round(load[0], 2),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def emit(result: dict[str, Any]) -> None:
    """Print one result line for :func:`run_isolated` (a case may emit several, e.g. one per rank)."""
    result = dict(result, peak_rss_mb=peak_rss_mb())
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_isolated(
    module: str, function: str, kwargs: dict[str, Any], *, timeout: float, single_thread: bool = False
) -> list[dict[str, Any]]:
    """Run ``module.function(**kwargs)`` in a fresh Python process; return the results it :func:`emit`-ted.

    ``single_thread`` pins every BLAS/OpenMP pool to one thread: CPU time then equals compute time, which stays
    meaningful on a machine shared with other jobs (wall time does not). Each result carries ``peak_rss_mb`` (the process's high-water mark when it was emitted). A timeout or crash
    keeps the results emitted before it and appends one ``{"status": "timeout"|"error"}`` record, so one bad
    case does not lose a whole benchmark run.
    """
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"from {module} import {function} as _f\n"
        "_f(**json.loads(sys.argv[1]))\n"
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    if single_thread:  # torch (OpenMP/MKL) and numpy/scipy (OpenBLAS) all on one thread
        env.update(SINGLE_THREAD_ENV)
    failure: dict[str, Any] | None = None
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(kwargs)],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT),
        )
        stdout = proc.stdout
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
            failure = {"status": "error", "returncode": proc.returncode, "error": " | ".join(tail)[-400:]}
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
        stdout = out.decode() if isinstance(out, bytes) else out
        failure = {"status": "timeout", "timeout_seconds": timeout}
    results = []
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            r = json.loads(line[len(RESULT_TAG):])
            r.setdefault("status", "ok")
            results.append(r)
    if failure is not None:
        results.append(failure)
    return results


def fmt_cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01 or v == 0:
            return f"{v:.3f}".rstrip("0").rstrip(".") if "." in f"{v:.3f}" else f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def markdown_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A GitHub markdown table; numbers are right-aligned."""
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join(":--" if i == 0 else "--:" for i in range(len(headers))) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt_cell(c) for c in r) + " |")
    return "\n".join(lines)


def write_result_files(prefix: str | os.PathLike, data: Any, markdown: str) -> dict[str, str]:
    """Write ``<prefix>.json`` and ``<prefix>.md`` atomically; return their paths."""
    from embfactor.fileio import atomic_write_json, atomic_write_text

    prefix = Path(prefix)
    jp, mp = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    atomic_write_json(jp, data)
    atomic_write_text(mp, markdown.rstrip() + "\n")
    return {"json": str(jp), "markdown": str(mp)}


def publish(prefix: str | os.PathLike, data: Any, markdown: str) -> dict[str, str]:
    """What a benchmark's ``main`` ends with: :func:`write_result_files`, the table on stdout, the paths on stderr."""
    paths = write_result_files(prefix, data, markdown)
    print(markdown)
    print(f"wrote {paths['markdown']} and {paths['json']}", file=sys.stderr)
    return paths


def results_prefix(name: str, quick: bool, output: str | os.PathLike | None = None) -> Path:
    """Where a suite's results go: ``<output>/bench_<name>`` (``output`` defaults to benchmarks/results).

    A quick run's files are always named ``bench_<name>_quick.*``, whatever the folder: its tiny figures must never
    replace the committed full results (and ``*_quick.*`` is git-ignored).

    Example:
        >>> results_prefix("runtime", quick=True, output="/tmp/b").name
        'bench_runtime_quick'
    """
    return Path(output if output is not None else RESULTS_DIR) / f"bench_{name}{'_quick' if quick else ''}"


def write_results(name: str, data: dict[str, Any], markdown: str, output: str | os.PathLike | None) -> dict[str, str]:
    """Write ``bench_<name>[_quick].json`` and ``.md`` atomically into ``output``; return their paths.

    ``data["quick"]`` selects the ``_quick`` names (see :func:`results_prefix`).
    """
    return write_result_files(results_prefix(name, bool(data.get("quick")), output), data, markdown)


def header(title: str, env: dict[str, Any], limits: dict[str, float] | None, command: str) -> str:
    """The first lines of every results file: what ran, where, and how loaded the machine was."""
    s = [f"## {title}", "", f"`{command}` — {env['time_utc']}, {env['cpu']} ({env['cpu_count']} cores, "
         f"{env['torch_threads']} torch threads), torch {env['torch']}, 1-min load average at start "
         f"{env['load_average_1m']}."]
    if limits:
        s.append(
            f"Machine limits measured in the same run: copy bandwidth {limits['copy_bandwidth_gbs']:.1f} GB/s, "
            f"GEMM {limits['gemm_fp32_gflops']:.0f} GFLOP/s fp32, {limits['gemm_fp64_gflops']:.0f} fp64, "
            f"{limits['gemm_bf16_gflops']:.0f} bf16."
        )
    return "\n".join(s) + "\n"
