"""Load test of `embfactor serve`: a real uvicorn server on loopback, bounded concurrent traffic, valid and invalid.

Starts `embfactor serve MODEL` in a subprocess (MODEL defaults to all-MiniLM-L6-v2 compressed 6x into a temporary
folder), sends a fixed, seeded mix of requests from an httpx AsyncClient with a fixed number of concurrent clients,
samples the server's resident memory (VmRSS in /proc/<pid>/status) during the run, stops the server and reports
throughput, latency percentiles, status counts, and RSS after warm-up vs at the end.

Targets: no 5xx, every invalid request answered with a 4xx, every valid one with 200, RSS stable after warm-up.
Timings depend on the machine's load; nothing here asserts on them.

Usage:
    python benchmarks/load_test.py                 # 1,200 requests, 16 concurrent; minilm compressed 6x
    python benchmarks/load_test.py --quick         # 60 requests, 8 concurrent (CI)
    python benchmarks/load_test.py --model out/minilm-r6 --requests 2000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
MAX_TEXTS = 16
MAX_TOKENS = 128

FALLBACK_TEXTS = [
    "the movie was a delight from start to finish",
    "an overlong, tedious film with no reason to exist",
    "a quietly moving portrait of a family",
    "the plot collapses under its own weight",
    "funny, sharp and surprisingly warm",
]


def load_texts() -> list[str]:
    try:
        from embfactor.data import polarity

        texts, _ = polarity()
        return [t for t in texts if 10 < len(t) < 300][:2000]
    except Exception:  # noqa: BLE001 - the data extra is optional; any short texts will do
        return FALLBACK_TEXTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Samples the server's VmRSS every ``period`` seconds, tagged with the number of requests done so far."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int, int]] = []  # (time, requests done, rss bytes)
        self.done_requests = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            r = rss_bytes(self.pid)
            if r is not None:
                self.samples.append((time.monotonic(), self.done_requests, r))
            self.stop.wait(self.period)


def invalid_requests(long_text: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Every kind of bad request the load test sends: (label, method, path, httpx keyword arguments).

    ``{"chunked": n}`` stands for an n-byte body sent without Content-Length (see :func:`chunks`).
    """
    as_json = {"content-type": "application/json"}
    return [
        ("empty texts", "POST", "/embed", {"json": {"texts": []}}),
        ("too many texts", "POST", "/embed", {"json": {"texts": ["a text"] * (MAX_TEXTS + 1)}}),
        ("text over token limit", "POST", "/embed", {"json": {"texts": [long_text]}}),
        ("texts not a list", "POST", "/embed", {"json": {"texts": "just a string"}}),
        ("number as text", "POST", "/embed", {"json": {"texts": [42]}}),
        ("blank text", "POST", "/embed", {"json": {"texts": ["   "]}}),
        ("unknown field", "POST", "/embed", {"json": {"texts": ["a"], "pooling": "cls"}}),
        ("normalize not bool", "POST", "/embed", {"json": {"texts": ["a"], "normalize": "yes"}}),
        ("malformed JSON", "POST", "/embed", {"content": b'{"texts": ["a"', "headers": as_json}),
        ("invalid UTF-8", "POST", "/embed", {"content": b"\xff\xfe\xfd", "headers": as_json}),
        ("body not an object", "POST", "/embed", {"json": [1, 2, 3]}),
        ("body too large", "POST", "/embed", {"content": b"x" * 2_100_000, "headers": as_json}),
        ("chunked body too large", "POST", "/embed", {"chunked": 2_100_000, "headers": as_json}),
        ("NaN as text", "POST", "/embed", {"content": b'{"texts": [NaN]}', "headers": as_json}),
        ("lone surrogate", "POST", "/embed", {"content": b'{"texts": ["\\ud800"]}', "headers": as_json}),
        ("Infinity as normalize", "POST", "/embed", {"content": b'{"texts": ["a"], "normalize": Infinity}',
                                                     "headers": as_json}),
        ("wrong endpoint kind", "POST", "/generate", {"json": {"prompt": "hello", "max_new_tokens": 4}}),
        ("wrong endpoint kind", "POST", "/score", {"json": {"texts": ["hello there"]}}),
        ("wrong method", "GET", "/embed", {}),
        ("unknown path", "POST", "/v1/embeddings", {"json": {"input": ["a"]}}),
    ]


def make_requests(n: int, texts: list[str], seed: int = 0) -> list[dict[str, Any]]:
    """A seeded mix: ~60% valid (/embed batches, /info, /health), ~40% invalid of many kinds."""
    rng = random.Random(seed)
    long_text = " ".join(rng.choice(texts) for _ in range(60))  # far over MAX_TOKENS tokens
    invalid = invalid_requests(long_text)
    # Warm-up: the run starts with the largest requests the limits allow (MAX_TEXTS of the longest texts), so the
    # allocator has seen the peak shapes inside the warm-up window; later growth would then be a leak.
    longest = sorted(texts, key=len)[-4 * MAX_TEXTS:]
    reqs = [
        {"kind": "valid", "label": f"embed x{MAX_TEXTS} (warm-up, longest)", "method": "POST", "path": "/embed",
         "json": {"texts": rng.sample(longest, MAX_TEXTS)}}
        for _ in range(max(2, n // 40))
    ]
    for i in range(n - len(reqs)):
        u = rng.random()
        if u < 0.55:
            k = rng.choice([1, 1, 2, 4, 8, MAX_TEXTS])
            body = {"texts": rng.sample(texts, k), "normalize": rng.random() < 0.8}
            reqs.append({"kind": "valid", "label": f"embed x{k}", "method": "POST", "path": "/embed", "json": body})
        elif u < 0.60:
            path = rng.choice(["/info", "/health"])
            reqs.append({"kind": "valid", "label": path, "method": "GET", "path": path})
        else:
            label, method, path, kw = rng.choice(invalid)
            reqs.append({"kind": "invalid", "label": label, "method": method, "path": path, **kw})
    return reqs


async def chunks(total: int, size: int = 65536) -> Any:
    """``total`` bytes in pieces: httpx sends an async iterable with Transfer-Encoding: chunked."""
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


async def fire(base: str, reqs: list[dict[str, Any]], concurrency: int, sampler: RssSampler) -> list[dict[str, Any]]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(reqs)):
        queue.put_nowait(i)
    results: list[dict[str, Any]] = [{} for _ in reqs]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                r = reqs[i]
                kw = {k: r[k] for k in ("json", "content", "headers") if k in r}
                if "chunked" in r:  # a body without Content-Length: the server must stop reading at its limit
                    kw["content"] = chunks(r["chunked"])
                t0 = time.perf_counter()
                try:
                    resp = await client.request(r["method"], r["path"], **kw)
                    status, body = resp.status_code, resp.text[:200]
                except httpx.HTTPError as e:  # a dropped connection counts as a server failure
                    status, body = 0, f"{type(e).__name__}: {e}"
                results[i] = {"status": status, "seconds": time.perf_counter() - t0, "body": body}
                sampler.done_requests += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(reqs, results, wall, sampler: RssSampler, warmup: int, model: str, concurrency: int) -> dict[str, Any]:
    by_status: dict[str, int] = {}
    for r in results:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    lat = [r["seconds"] for r in results]
    valid = [(q, r) for q, r in zip(reqs, results) if q["kind"] == "valid"]
    invalid = [(q, r) for q, r in zip(reqs, results) if q["kind"] == "invalid"]
    bad_valid = [
        {"label": q["label"], "status": r["status"], "body": r["body"]} for q, r in valid if r["status"] != 200
    ]
    bad_invalid = [
        {"label": q["label"], "status": r["status"], "body": r["body"]}
        for q, r in invalid if not 400 <= r["status"] < 500
    ]
    invalid_status: dict[str, dict[str, int]] = {}
    for q, r in invalid:
        d = invalid_status.setdefault(q["label"], {})
        d[str(r["status"])] = d.get(str(r["status"]), 0) + 1
    s = sampler.samples
    warm = [rss for _, done, rss in s if done <= warmup] or [s[0][2]]
    after = [rss for _, done, rss in s if done > warmup] or [s[-1][2]]
    return {
        "model": model,
        "requests": len(reqs),
        "concurrency": concurrency,
        "valid_requests": len(valid),
        "invalid_requests": len(invalid),
        "wall_seconds": wall,
        "throughput_rps": len(reqs) / wall,
        "latency_p50_ms": 1000 * pct(lat, 50),
        "latency_p99_ms": 1000 * pct(lat, 99),
        "latency_valid_p50_ms": 1000 * pct([r["seconds"] for _, r in valid], 50),
        "latency_valid_p99_ms": 1000 * pct([r["seconds"] for _, r in valid], 99),
        "latency_invalid_p50_ms": 1000 * pct([r["seconds"] for _, r in invalid], 50),
        "status_counts": dict(sorted(by_status.items())),
        "server_errors_5xx": sum(v for k, v in by_status.items() if k.startswith("5")),
        "connection_errors": by_status.get("0", 0),
        "valid_not_200": bad_valid[:20],
        "valid_not_200_count": len(bad_valid),
        "invalid_not_4xx": bad_invalid[:20],
        "invalid_not_4xx_count": len(bad_invalid),
        "invalid_status_by_kind": invalid_status,
        "warmup_requests": warmup,
        "rss_start_mb": s[0][2] / 1e6,
        "rss_peak_warmup_mb": max(warm) / 1e6,
        "rss_peak_after_warmup_mb": max(after) / 1e6,
        "rss_end_mb": s[-1][2] / 1e6,
        "rss_peak_mb": max(x[2] for x in s) / 1e6,
        "rss_growth_after_warmup_mb": (max(after) - max(warm)) / 1e6,
        "rss_samples": len(s),
        # peak RSS in each tenth of the run (by requests answered): flat after the first tenths = no leak
        "rss_peak_by_decile_mb": [
            round(max([rss for _, done, rss in s if k * len(reqs) // 10 < done <= (k + 1) * len(reqs) // 10]
                      or [float("nan")]) / 1e6, 1)
            for k in range(10)
        ],
    }


def render(r: dict[str, Any]) -> str:
    ok = r["server_errors_5xx"] == 0 and r["invalid_not_4xx_count"] == 0 and r["valid_not_200_count"] == 0
    lines = [
        "# Load test: `embfactor serve`",
        "",
        f"Model `{r['model']}`; {r['requests']:,} requests ({r['valid_requests']} valid, {r['invalid_requests']} "
        f"invalid), {r['concurrency']} concurrent clients, loopback, httpx AsyncClient. "
        f"Machine: {os.cpu_count()} CPU cores, 1-min load average at the end {os.getloadavg()[0]:.2f}; "
        "timings depend on the load.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| wall time | {r['wall_seconds']:.1f} s |",
        f"| throughput | {r['throughput_rps']:.1f} requests/s |",
        f"| latency p50 / p99 (all) | {r['latency_p50_ms']:.0f} / {r['latency_p99_ms']:.0f} ms |",
        f"| latency p50 / p99 (valid) | {r['latency_valid_p50_ms']:.0f} / {r['latency_valid_p99_ms']:.0f} ms |",
        f"| latency p50 (invalid) | {r['latency_invalid_p50_ms']:.0f} ms |",
        f"| status counts | {', '.join(f'{k}: {v}' for k, v in r['status_counts'].items())} |",
        f"| 5xx / connection errors | {r['server_errors_5xx']} / {r['connection_errors']} |",
        f"| invalid requests not answered 4xx | {r['invalid_not_4xx_count']} |",
        f"| valid requests not answered 200 | {r['valid_not_200_count']} |",
        f"| server RSS: start / peak in warm-up (first {r['warmup_requests']}, largest batches first) | "
        f"{r['rss_start_mb']:.0f} / {r['rss_peak_warmup_mb']:.0f} MB |",
        f"| server RSS: peak after warm-up / end | {r['rss_peak_after_warmup_mb']:.0f} / {r['rss_end_mb']:.0f} MB |",
        f"| RSS growth after warm-up | {r['rss_growth_after_warmup_mb']:+.1f} MB |",
        f"| peak RSS per tenth of the run | {' / '.join(f'{x:.0f}' for x in r['rss_peak_by_decile_mb'])} MB |",
        "",
        f"Targets (0 5xx, every invalid request 4xx, every valid 200): **{'met' if ok else 'NOT met'}**.",
        "",
        "Invalid requests by kind → status: "
        + "; ".join(
            f"{k}: {', '.join(f'{s}×{n}' for s, n in v.items())}" for k, v in r["invalid_status_by_kind"].items()
        ),
    ]
    return "\n".join(lines) + "\n"


def compress_default(folder: Path) -> Path:
    out = folder / "minilm-r6"
    cmd = [sys.executable, "-m", "embfactor.cli.main", "compress", "minilm", "--ratio", "6", "-o", str(out), "-q"]
    print("compressing minilm 6x:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model to serve (default: minilm compressed --ratio 6 into a temporary folder)")
    p.add_argument("--requests", type=int, default=1200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="60 requests, 8 concurrent (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=0, help="passed to serve (default: torch's choice)")
    p.add_argument("--output", default=None, help="results prefix (default benchmarks/results/load_test[_quick])")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency = 60, 8
    prefix = Path(args.output) if args.output else RESULTS / ("load_test_quick" if args.quick else "load_test")
    with tempfile.TemporaryDirectory(prefix="embfactor-load-") as tmp:
        model = args.model or str(compress_default(Path(tmp)))
        port = free_port()
        cmd = [sys.executable, "-m", "embfactor.cli.main", "serve", model, "--host", "127.0.0.1", "--port", str(port),
               "--max-texts", str(MAX_TEXTS), "--max-tokens", str(MAX_TOKENS), "--log-level", "warning",
               "--no-access-log"]
        if args.torch_threads:
            cmd += ["--torch-threads", str(args.torch_threads)]
        server = subprocess.Popen(cmd)
        sampler = RssSampler(server.pid)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with {server.returncode} before answering")
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not come up within 300 s")
                time.sleep(0.25)
            print(f"server up on {base}; sending {args.requests} requests, {args.concurrency} concurrent",
                  file=sys.stderr)
            texts = load_texts()
            reqs = make_requests(args.requests, texts, args.seed)
            sampler.start()
            t0 = time.perf_counter()
            results = asyncio.run(fire(base, reqs, args.concurrency, sampler))
            wall = time.perf_counter() - t0
            time.sleep(0.3)  # a last RSS sample after the final responses
        finally:
            sampler.stop.set()
            server.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        warmup = max(1, len(reqs) // 10)
        summary = summarize(reqs, results, wall, sampler, warmup, args.model or "minilm --ratio 6", args.concurrency)
    summary["latency_all_mean_ms"] = 1000 * statistics.fmean(r["seconds"] for r in results)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    md = render(summary)
    prefix.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {prefix.with_suffix('.json')} and {prefix.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
