"""Fused kernels of the codebook format: the head's gather-sum at batch 1 (logits_v = Σ_c LUT[c, codes[v, c]])
and the embedding's row gather (codes -> codebook rows, summed over stages) in one pass.

PyTorch has no op that gathers from a small table with uint8 indices and sums without materializing a
vocab × (S·M) intermediate: ``L[:, codes].sum(-1)`` first widens the codes to int64 (8× their bytes) and writes
every gathered value out, which is as much memory traffic as the dense head it replaces (measured 6.6 ms vs 7.0 ms
on SmolLM2's 49,152 × 576 table). This C loop reads each code byte once with the lookup table in cache. Likewise
the forward's ``F.embedding`` over (ids × M) 4-float codebook rows pays per-row overhead on 16-byte rows (3.8x
``nn.Embedding`` measured); the gather loop writes each output row once.

It is compiled on first use with the system C compiler (``cc -O3``) into the user cache
(``$XDG_CACHE_HOME/embfactor/kernels``), and loaded through ctypes: no build step at install time, no Python C
API. It runs on one thread: no OpenMP, because PyTorch wheels bundle their own libgomp and a second OpenMP
runtime's spinning workers slowed PyTorch's own parallel ops (measured: embedding_bag 0.29 s -> 2.2 s at batch 8
on 2 busy cores after an OpenMP build had run). Without a compiler (or if the build fails) :func:`lut_kernel` returns None and the PyTorch path is used;
tests check both paths against each other.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* EF_CLONES: one copy per x86-64 level, picked at load time by the CPU (AVX-512 / AVX2+FMA / baseline); a build
   without ifunc support (not glibc, not x86) compiles one portable copy instead */
#if defined(EF_CLONES)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

/* out[v] = sum_c lut[c*K + codes[v*C + c]] for uint8 codes; 4 accumulators hide the load latency */
/* out[col(v)] with col(v) = cols[v] (a tier's rows scattered to their token ids) or v */
HOT void lut_sum_u8(const uint8_t* codes, int64_t V, int64_t C, const float* lut, int64_t K, float* out,
                    const int64_t* cols) {
    for (int64_t v = 0; v < V; ++v) {
        const uint8_t* c = codes + v * C;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        int64_t m = 0;
        for (; m + 4 <= C; m += 4) {
            a0 += lut[(m + 0) * K + c[m + 0]];
            a1 += lut[(m + 1) * K + c[m + 1]];
            a2 += lut[(m + 2) * K + c[m + 2]];
            a3 += lut[(m + 3) * K + c[m + 3]];
        }
        for (; m < C; ++m) a0 += lut[m * K + c[m]];
        out[cols ? cols[v] : v] = (a0 + a1) + (a2 + a3);
    }
}
/* 8 hidden vectors at once: lut is C x K x 8 floats (an entry's 8 values contiguous: one vector add per code);
   out[b*ldo + col(v)] for b < B (B <= 8, the rest of the lanes are padding) */
HOT void lut_sum_batch_u8(const uint8_t* codes, int64_t V, int64_t C, const float* lut, int64_t K, int64_t B,
                          float* out, int64_t ldo, const int64_t* cols) {
    for (int64_t v = 0; v < V; ++v) {
        const uint8_t* c = codes + v * C;
        float a0[8] = {0}, a1[8] = {0};
        int64_t m = 0;
        for (; m + 2 <= C; m += 2) {
            const float* l0 = lut + (m * K + c[m]) * 8;
            const float* l1 = lut + ((m + 1) * K + c[m + 1]) * 8;
            for (int b = 0; b < 8; ++b) { a0[b] += l0[b]; a1[b] += l1[b]; }
        }
        if (m < C) {
            const float* l0 = lut + (m * K + c[m]) * 8;
            for (int b = 0; b < 8; ++b) a0[b] += l0[b];
        }
        const int64_t col = cols ? cols[v] : v;
        for (int64_t b = 0; b < B; ++b) out[b * ldo + col] = a0[b] + a1[b];
    }
}
/* lookup tables of B hidden vectors (B x hd floats, hd = M*sub): out[b, g, k] = sum_j books[g, k, j] * h[b, (g%M)*sub + j]
   for the G = S*M sub-codebooks (books: G x K x sub floats). In C so that a batch-1 head is two calls with no
   parallel PyTorch op in between: at 2 threads each small op's OpenMP barrier cost more than the op (issue 30). The
   sum runs over j in order from 0, as the PyTorch reference (lookup_tables) adds its terms. */
HOT void lut_build(const float* books, int64_t G, int64_t M, int64_t K, int64_t sub, const float* h, int64_t B,
                   float* out) {
    for (int64_t b = 0; b < B; ++b)
        for (int64_t g = 0; g < G; ++g) {
            const float* hv = h + b * M * sub + (g % M) * sub;
            const float* bk = books + g * K * sub;
            float* o = out + (b * G + g) * K;
            for (int64_t k = 0; k < K; ++k) {
                float acc = bk[k * sub] * hv[0];
                for (int64_t j = 1; j < sub; ++j) acc += bk[k * sub + j] * hv[j];
                o[k] = acc;
            }
        }
}
/* rows for ids: out[i, :] = sum_s concat_m cb[(s*M + m)*K + codes[ids[i], s, m], :]  (cb: S*M*K x sub floats) */
void pq_gather_u8(const uint8_t* codes, const int64_t* ids, int64_t n, int64_t S, int64_t M, const float* cb,
                  int64_t K, int64_t sub, float* out) {
    const int64_t w = M * sub;
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t* c = codes + ids[i] * S * M;
        float* o = out + i * w;
        for (int64_t m = 0; m < M; ++m) {
            const float* r = cb + (m * K + c[m]) * sub;
            for (int64_t j = 0; j < sub; ++j) o[m * sub + j] = r[j];
        }
        for (int64_t s = 1; s < S; ++s)
            for (int64_t m = 0; m < M; ++m) {
                const float* r = cb + ((s * M + m) * K + c[s * M + m]) * sub;
                for (int64_t j = 0; j < sub; ++j) o[m * sub + j] += r[j];
            }
    }
}

/* --- dense int-k: rows of packed k-bit integers per group with fp16 scales (embfactor.quant.quantize_groups) --- */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    float f;
    if (e == 0) { /* zero or subnormal: m * 2^-24 (int-k scales of small embeddings are often subnormal) */
        f = (float)m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    memcpy(&f, &bits, 4);
    return f;
}

/* n values of k bits (8 values in k bytes, a little-endian word, as quant.pack_bits) -> floats. Words are read
   with one 8-byte load (a K-byte memcpy into a zeroed word stalled on store forwarding: 4x slower at K = 5) */
#define UNPACK(K)                                                                                       \
    static inline void unpack_##K(const uint8_t* p, int64_t n, float* out) {                            \
        int64_t i = 0;                                                                                  \
        for (; i + 8 < n; i += 8, p += K) { /* an 8-byte load: the next word's bytes are ignored */     \
            uint64_t w;                                                                                 \
            memcpy(&w, p, 8);                                                                           \
            for (int j = 0; j < 8; ++j) out[i + j] = (float)((w >> (j * K)) & ((1u << K) - 1u));        \
        }                                                                                               \
        if (i < n) { /* the row's last word: exactly K bytes (the table may end here) */               \
            uint64_t w = 0;                                                                             \
            memcpy(&w, p, K);                                                                           \
            for (int j = 0; j < 8; ++j) out[i + j] = (float)((w >> (j * K)) & ((1u << K) - 1u));        \
        }                                                                                               \
    }
UNPACK(2) UNPACK(3) UNPACK(4) UNPACK(5) UNPACK(6)

/* AVX-512 VBMI (Ice Lake, Zen 4 and later): 64 values of K bits per step. vpermb puts each 8-value word's K bytes
   in its own 64-bit lane, vpmultishiftqb pulls value t from bit t*K of the lane, then bytes widen to floats.
   Writes up to 8 floats past n (the row buffer has room). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(EF_PORTABLE)
#include <immintrin.h>
static int has_vbmi(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw");
    }
    return known;
}
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) static void unpack_vbmi(const uint8_t* p, int64_t n, int K,
                                                                               float* out) {
    uint8_t perm[64], shift[64];
    for (int j = 0; j < 8; ++j)
        for (int b = 0; b < 8; ++b) {
            perm[j * 8 + b] = (uint8_t)(j * K + b);
            shift[j * 8 + b] = (uint8_t)(b * K);
        }
    const __m512i vperm = _mm512_loadu_si512(perm), vshift = _mm512_loadu_si512(shift);
    const __m512i vmask = _mm512_set1_epi8((char)((1 << K) - 1));
    for (int64_t i = 0; i < n; i += 64) {
        const int64_t cnt = n - i < 64 ? n - i : 64, nbytes = cnt / 8 * K;
        const __mmask64 lm = nbytes >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << nbytes) - 1);
        __m512i x = _mm512_maskz_loadu_epi8(lm, p);
        p += nbytes;
        x = _mm512_and_si512(_mm512_multishift_epi64_epi8(vshift, _mm512_permutexvar_epi8(vperm, x)), vmask);
        float* o = out + i;
        _mm512_storeu_ps(o, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(x))));
        if (cnt > 16) _mm512_storeu_ps(o + 16, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(x, 1))));
        if (cnt > 32) _mm512_storeu_ps(o + 32, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(x, 2))));
        if (cnt > 48) _mm512_storeu_ps(o + 48, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(x, 3))));
    }
}
#else
static int has_vbmi(void) { return 0; }
static void unpack_vbmi(const uint8_t* p, int64_t n, int K, float* out) { (void)p; (void)n; (void)K; (void)out; }
#endif

/* row v dequantized as torch does it: (q - qmax) * s (symmetric) or q * s + lo */
static inline void intk_row(const uint8_t* packed, int64_t pw, const uint16_t* scale, const uint16_t* lo,
                            int64_t G, int64_t g, int64_t bits, int64_t v, float* row) {
    const uint8_t* p = packed + v * pw;
    const int64_t n = (G * g + 7) / 8 * 8; /* packed values come in words of 8 (a row of d = 20 holds 24) */
    if (bits < 8 && has_vbmi()) {
        unpack_vbmi(p, n, (int)bits, row);
    } else switch (bits) {
        case 2: unpack_2(p, n, row); break;
        case 3: unpack_3(p, n, row); break;
        case 4: unpack_4(p, n, row); break;
        case 5: unpack_5(p, n, row); break;
        case 6: unpack_6(p, n, row); break;
        default: for (int64_t j = 0; j < n; ++j) row[j] = (float)p[j];
    }
    const float qmax = (float)((1 << (bits - 1)) - 1);
    for (int64_t k = 0; k < G; ++k) {
        float* r = row + k * g;
        const float s = half_to_float(scale[v * G + k]);
        if (lo) {
            const float l = half_to_float(lo[v * G + k]);
            for (int64_t j = 0; j < g; ++j) r[j] = r[j] * s + l;
        } else {
            for (int64_t j = 0; j < g; ++j) r[j] = (r[j] - qmax) * s;
        }
    }
}

static inline float dot(const float* a, const float* b, int64_t n) {
    float acc[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int k = 0; k < 16; ++k) acc[k] += a[j + k] * b[j + k];
    float t = 0.f;
    for (; j < n; ++j) t += a[j] * b[j];
    for (int k = 0; k < 16; ++k) t += acc[k];
    return t;
}

/* logits of rows [r0, r1) for B hidden vectors (B x d floats): out[b*ldo + col(v)] = row_v . h_b, where
   col(v) = cols[v] (a tier's rows scattered to their token ids) or v. One row is unpacked into L1 at a time,
   so the packed bytes are read once whatever B is. */
HOT void intk_project(const uint8_t* packed, int64_t pw, const uint16_t* scale, const uint16_t* lo, int64_t G,
                      int64_t g, int64_t bits, int64_t d, int64_t r0, int64_t r1, const float* h, int64_t B,
                      float* out, int64_t ldo, const int64_t* cols) {
    float row[G * g + 16]; /* the padded row + 8 floats the unpack may write past it */
    for (int64_t v = r0; v < r1; ++v) {
        intk_row(packed, pw, scale, lo, G, g, bits, v, row);
        const int64_t c = cols ? cols[v] : v;
        for (int64_t b = 0; b < B; ++b) out[b * ldo + c] = dot(row, h + b * d, d);
    }
}

/* rows [r0, r1) dequantized into out ((r1 - r0) x d floats): the blocks a GEMM multiplies at prefill sizes */
HOT void intk_dequant(const uint8_t* packed, int64_t pw, const uint16_t* scale, const uint16_t* lo, int64_t G,
                      int64_t g, int64_t bits, int64_t d, int64_t r0, int64_t r1, float* out) {
    float row[G * g + 16]; /* the padded row + 8 floats the unpack may write past it */
    for (int64_t v = r0; v < r1; ++v) {
        intk_row(packed, pw, scale, lo, G, g, bits, v, row);
        memcpy(out + (v - r0) * d, row, d * sizeof(float));
    }
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embfactor" / "kernels"


def _build(target: Path) -> bool:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "lut.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        # per-CPU clones first (x86-64 with glibc's ifunc); then one copy; then without AVX-512 intrinsics
        for extra in (["-DEF_CLONES"], [], ["-DEF_PORTABLE"]):
            cmd = [cc, "-O3", "-fPIC", "-shared", *extra, str(src), "-o", str(out)]
            if subprocess.run(cmd, capture_output=True, check=False).returncode == 0:
                os.replace(out, target)  # atomic: a concurrent build never leaves half a library
                return True
        return False


_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "lut_sum_u8": [_P, _I, _I, _P, _I, _P, _P],
    "lut_sum_batch_u8": [_P, _I, _I, _P, _I, _I, _P, _I, _P],
    "pq_gather_u8": [_P, _P, _I, _I, _I, _P, _I, _I, _P],
    "lut_build": [_P, _I, _I, _I, _I, _P, _I, _P],
    "intk_project": [_P, _I, _P, _P, _I, _I, _I, _I, _I, _I, _P, _I, _P, _I, _P],
    "intk_dequant": [_P, _I, _P, _P, _I, _I, _I, _I, _I, _I, _P],
}


def lut_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None when no compiler is available."""
    global _lib, _tried
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # a ctypes call is opaque to Dynamo and to tracing: under torch.compile the kernel broke the graph and its
        # output rows came back uninitialized; compiled and traced code takes the PyTorch path instead
        return None
    if _tried or os.environ.get("EMBFACTOR_NO_KERNELS"):
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        key = hashlib.sha256((_SOURCE + sys.platform).encode()).hexdigest()[:16]
        target = _cache_dir() / f"lut_{key}.so"
        try:
            if target.is_file() or _build(target):
                lib = ctypes.CDLL(str(target))
                for name, args in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = args, None
                _lib = lib
        except OSError:
            _lib = None
    return _lib


# Rows per thread below which one thread does all the work (a thread hand-off costs ~50 µs, 2,048 rows ~0.1 ms).
_MIN_ROWS_PER_THREAD = 2048
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _split_rows(n: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(r0, r1)`` over [0, n) split among torch's intra-op threads.

    The kernels are single-threaded C (see the module docstring: no OpenMP); ctypes releases the GIL during a call,
    so Python threads run the parts in parallel. The calling thread does the last part itself.
    """
    global _pool, _pool_size
    parts = max(1, min(torch.get_num_threads(), n // _MIN_ROWS_PER_THREAD))
    if parts == 1:
        work(0, n)
        return
    with _lock:
        if _pool is None or _pool_size < parts - 1:
            _pool, _pool_size = ThreadPoolExecutor(parts - 1, thread_name_prefix="embfactor-kernel"), parts - 1
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [_pool.submit(work, bounds[i], bounds[i + 1]) for i in range(parts - 1)]
    work(bounds[-2], bounds[-1])
    for f in futures:
        f.result()


def _cols_arg(cols: torch.Tensor | None, out: torch.Tensor) -> int | None:
    if cols is None:
        return None
    if cols.dtype != torch.int64 or not cols.is_contiguous():
        raise ValueError("cols must be a contiguous int64 tensor")
    return cols.data_ptr()


def lut_sum(
    codes: torch.Tensor, lut: torch.Tensor, out: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Σ_c lut[c, codes[v, c]] for uint8 codes (V × C) and a float32 (C × K) table; None if no kernel.

    Writes ``out[v]`` (a new V-vector when ``out`` is None), or ``out[cols[v]]`` when ``cols`` (int64) is given.
    """
    lib = lut_kernel()
    if lib is None or codes.dtype != torch.uint8 or codes.device.type != "cpu":
        return None
    codes = codes.contiguous()
    lut = lut.detach().float().contiguous()
    V, C = codes.shape
    if out is None:
        out = torch.empty(V, dtype=torch.float32)
    cp = _cols_arg(cols, out)

    def work(r0: int, r1: int) -> None:
        dst = out.data_ptr() + (0 if cp else r0 * 4)
        lib.lut_sum_u8(codes.data_ptr() + r0 * C, r1 - r0, C, lut.data_ptr(), lut.shape[1], dst,
                       cp + r0 * 8 if cp else None)

    _split_rows(V, work)
    return out


def lut_sum_batch(codes: torch.Tensor, lut: torch.Tensor, out: torch.Tensor, cols: torch.Tensor | None = None) -> bool:
    """out[b, v] (or out[b, cols[v]]) = Σ_c lut[c, codes[v, c], b] for uint8 codes (V × C), a float32 (C × K × B)
    table and ``out`` (B × n float32, rows contiguous); False when there is no kernel.

    The kernel takes 8 vectors per pass (the table padded to 8 lanes: one vector add per code); more than 8 take
    several passes over the codes.
    """
    lib = lut_kernel()
    if lib is None or codes.dtype != torch.uint8 or codes.device.type != "cpu" or out.stride(1) != 1:
        return False
    codes = codes.contiguous()
    (V, C), (_, K, B) = codes.shape, lut.shape
    cp = _cols_arg(cols, out)
    for b0 in range(0, B, 8):
        nb = min(8, B - b0)
        lanes = torch.zeros(C, K, 8)
        lanes[..., :nb] = lut[..., b0 : b0 + nb].detach()
        dst0 = out[b0:]

        def work(r0: int, r1: int, lanes: torch.Tensor = lanes, dst0: torch.Tensor = dst0, nb: int = nb) -> None:
            dst = dst0.data_ptr() + (0 if cp else r0 * 4)
            lib.lut_sum_batch_u8(codes.data_ptr() + r0 * C, r1 - r0, C, lanes.data_ptr(), K, nb, dst, out.stride(0),
                                 cp + r0 * 8 if cp else None)

        _split_rows(V, work)
    return True


def lut_build(books: torch.Tensor, h: torch.Tensor, M: int) -> torch.Tensor | None:
    """(B × G × K) lookup tables LUT[b, g, k] = books[g, k] · h[b, (g mod M)·sub : ...] for float32 contiguous
    ``books`` (G × K × sub, G = stages·M) and ``h`` (B × M·sub, float32); None when there is no kernel."""
    lib = lut_kernel()
    if lib is None or books.dtype != torch.float32 or h.dtype != torch.float32 or books.device.type != "cpu":
        return None
    G, K, sub = books.shape
    books, h = books.contiguous(), h.contiguous()
    out = torch.empty(h.shape[0], G, K, dtype=torch.float32)
    lib.lut_build(books.data_ptr(), G, M, K, sub, h.data_ptr(), h.shape[0], out.data_ptr())
    return out


def pq_gather(codes: torch.Tensor, ids: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor | None:
    """(n × M·sub) float32 rows for int64 ``ids`` from uint8 codes (V × S × M) and (S × M × K × sub) codebooks.

    None when there is no kernel (the caller then uses ``F.embedding``).
    """
    lib = lut_kernel()
    if lib is None or codes.dtype != torch.uint8 or codes.device.type != "cpu":
        return None
    S, M, K, sub = codebooks.shape
    codes = codes.contiguous()
    ids = ids.contiguous()
    cb = codebooks.detach().float().contiguous()
    out = torch.empty(ids.shape[0], M * sub, dtype=torch.float32)
    lib.pq_gather_u8(codes.data_ptr(), ids.data_ptr(), ids.shape[0], S, M, cb.data_ptr(), K, sub, out.data_ptr())
    return out


def _intk_args(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, bits: int, group: int | None,
               d: int) -> tuple | None:
    """The leading kernel arguments of an int-k table, or None when the kernel does not apply (no compiler,
    not CPU, scales not fp16)."""
    if lut_kernel() is None or packed.device.type != "cpu" or scale.dtype != torch.float16:
        return None
    if lo is not None and lo.dtype != torch.float16:
        return None
    G = scale.shape[1]
    for t in (packed, scale, lo):
        if t is not None and not t.is_contiguous():
            return None
    return (packed.data_ptr(), packed.shape[1], scale.data_ptr(), None if lo is None else lo.data_ptr(), G,
            group or d, bits, d)


def intk_project(
    packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, *, bits: int, group: int | None,
    hidden: torch.Tensor, out: torch.Tensor, cols: torch.Tensor | None = None,
) -> bool:
    """Logits of every row of a dense int-k table (:func:`embfactor.quant.quantize_groups`'s layout) for
    ``hidden`` (B × d float32), written to ``out`` (B × n float32, rows contiguous) at column v or ``cols[v]``.

    One row is unpacked and dequantized into L1 at a time, then multiplied with each of the B vectors: the packed
    bytes are read once, no float table is built. Returns False (``out`` untouched) when the kernel does not apply.
    """
    args = _intk_args(packed, scale, lo, bits, group, hidden.shape[1])
    if args is None or hidden.dtype != torch.float32 or out.dtype != torch.float32 or out.stride(1) != 1:
        return False
    h = hidden.contiguous()
    cp = _cols_arg(cols, out)
    _split_rows(packed.shape[0], lambda r0, r1: lut_kernel().intk_project(
        *args, r0, r1, h.data_ptr(), h.shape[0], out.data_ptr(), out.stride(0), cp))
    return True


def intk_dequant(
    packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, *, bits: int, group: int | None, d: int,
    r0: int, r1: int, out: torch.Tensor,
) -> bool:
    """Rows [r0, r1) of a dense int-k table dequantized into ``out`` ((r1 − r0) × d float32, contiguous) by the C
    kernel; False when it does not apply."""
    args = _intk_args(packed, scale, lo, bits, group, d)
    if args is None or out.dtype != torch.float32 or not out.is_contiguous():
        return False
    _split_rows(r1 - r0, lambda a, b: lut_kernel().intk_dequant(*args, r0 + a, r0 + b, out.data_ptr() + a * d * 4))
    return True
