"""Codebook factorizations of an embedding table: product (``pq``) and residual (``rvq``) quantization.

PQ cuts each row into M sub-vectors of ``sub_dim`` columns and writes E ≈ [C₁B₁ | … | C_MB_M]: C_m is a one-hot
code matrix (one small integer per row) and B_m a K × sub_dim codebook. RVQ adds S such PQ stages, each fitted to
what the previous stages left: E ≈ Σ_s [C_s1B_s1 | … ]. Storage is codes (uint8 for K ≤ 256) plus tiny fp16
codebooks: PQ with 4-column sub-vectors and K = 256 stores 1 byte per 4 values (≈ 15× fewer bytes than fp32).

The k-means is faiss's (``faiss.Kmeans`` with per-point weights, one run per sub-space; faiss's own
``ProductQuantizer``/``ResidualQuantizer`` take no weights, and frequency weights matter: unweighted PQ gave
SmolLM2 perplexity 102 against 39 weighted). Rows are encoded by faiss's ``ProductQuantizer.compute_codes``
with the trained centroids loaded into it. Everything is deterministic given ``seed`` (faiss's k-means is, at
any thread count: measured identical centroids at 1 and 2 threads).

Cost: a k-means run costs n·K·iterations distance evaluations per sub-space; on MiniLM's 96 sub-spaces all rows
and 25 iterations took ~140 s of one core, so training uses a stratified sample of ``max_train_points`` rows (the
heaviest rows by token weight plus a uniform sample of the rest, re-weighted to stay unbiased) and 10
iterations by default; all rows are then encoded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from embfactor.decomposition._common import HESSIAN_DAMP, in_row_blocks, inverse_cholesky
from embfactor.decomposition.factors import _BLOCK_ROWS, Factors
from embfactor.decomposition.registry import register_method
from embfactor.errors import ConfigError, InvalidInputError

ROTATIONS = ("none", "random", "opq")
CODEBOOK_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def float_dtype(codebook_dtype: str) -> torch.dtype:
    """The dtype of the float tensors (rotation, row and codebook scales) stored with ``codebook_dtype`` codebooks."""
    dt = CODEBOOK_DTYPES[codebook_dtype]
    return torch.float16 if not dt.is_floating_point else dt


def int8_codebooks(books: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S × M × K × sub) float codebooks -> int8 values and fp16 scales (S × M × 1 × sub), one per codebook column.

    Symmetric: scale = max|column| / 127, so the rounding error (≤ scale / 2) is ~0.4% of the column's range, far
    below a codebook's quantization error; the scales are rounded to fp16 first, so values · scales is exactly what
    is stored.

    Example:
        >>> q, s = int8_codebooks(torch.tensor([[[[1.0, -2.0], [0.5, 1.0]]]]))
        >>> q.flatten().tolist(), [round(v, 3) for v in (q.float() * s.float()).flatten().tolist()]
        ([127, -127, 64, 64], [1.0, -2.0, 0.504, 1.008])
    """
    amax = books.detach().float().abs().amax(dim=2, keepdim=True)
    scale = (amax / 127).to(torch.float16)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    q = torch.round(books.detach().float() / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_codebooks(codebooks: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Codebooks as values: the stored float tensor as it is, or int8 values times their column ``scale`` (float32).

    Example:
        >>> q, scale = int8_codebooks(torch.tensor([[[[1.0, -2.0]]]]))
        >>> [round(v, 3) for v in dequantize_codebooks(q, scale).flatten().tolist()]
        [1.0, -2.0]
    """
    return codebooks if scale is None else codebooks.float() * scale.float()


def code_dtype(K: int) -> torch.dtype:
    """uint8 codes for K ≤ 256, int16 (read as unsigned) up to 65,536 (torch has no uint16 indexing)."""
    return torch.uint8 if K <= 256 else torch.int16


@dataclass
class CodebookFactors(Factors):
    """E ≈ (Σ_s [B_s1[c_s1] | … | B_sM[c_sM]])[:, :d] · Rᵀ, each row times its scale.

    ``U``/``V`` are empty placeholders (vocab × 0, 0 × d) that carry the shape; the data is:

    Attributes:
        codes: (vocab × S × M) uint8 (K ≤ 256) or int16 (K ≤ 65,536, stored as code − 32,768).
        codebooks: (S × M × K × sub_dim) float, or int8 values times ``codebook_scale``; the last sub-space is
            zero-padded when sub_dim does not divide d.
        codebook_scale: (S × M × 1 × sub_dim) fp16 scales of int8 codebooks (one per codebook column), or None.
        rotation: (d × d) orthogonal R or None: the codes quantize E·R.
        row_scale: (vocab,) or None: the codes quantize rows divided by their scale (row norms).

    Example:
        >>> f = product_quantize(torch.randn(600, 16), sub_dim=4, K=16, seed=0)
        >>> f.codes.shape, f.codebooks.shape, f.num_bytes
        (torch.Size([600, 1, 4]), torch.Size([1, 4, 16, 4]), 2912)
    """

    codes: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    codebooks: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    rotation: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None
    codebook_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.codes.ndim != 3 or self.codebooks.ndim != 4 or self.codes.shape[1:] != self.codebooks.shape[:2]:
            raise InvalidInputError(
                f"codes must be (vocab × S × M) and codebooks (S × M × K × sub_dim) with the same S, M; got "
                f"{tuple(self.codes.shape)} and {tuple(self.codebooks.shape)}"
            )

    @property
    def stages(self) -> int:
        return int(self.codebooks.shape[0])

    def books(self) -> torch.Tensor:
        """The codebooks as float32 (int8 values times their column scales)."""
        return dequantize_codebooks(self.codebooks, self.codebook_scale).float()

    @property
    def M(self) -> int:
        return int(self.codebooks.shape[1])

    @property
    def K(self) -> int:
        return int(self.codebooks.shape[2])

    @property
    def sub_dim(self) -> int:
        return int(self.codebooks.shape[3])

    @property
    def rank(self) -> int:
        """No rank: 0 (the size is in ``num_bytes``)."""
        return 0

    @property
    def num_params(self) -> int:
        extra = sum(t.numel() for t in (self.rotation, self.row_scale, self.codebook_scale) if t is not None)
        return self.codes.numel() + self.codebooks.numel() + extra

    @property
    def num_bytes(self) -> int:
        """Stored bytes: codes, codebooks (and their scales), rotation and row scales at their dtypes."""
        ts = [t for t in (self.codes, self.codebooks, self.codebook_scale, self.rotation, self.row_scale)
              if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Reconstructed rows start..stop−1 (float32)."""
        return decode(self.codes[start:stop], self.books(), self.shape[1], self.rotation,
                      None if self.row_scale is None else self.row_scale[start:stop])

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Reconstructed rows at ``ids`` (float32), decoded from their codes alone."""
        return decode(self.codes[ids], self.books(), self.shape[1], self.rotation,
                      None if self.row_scale is None else self.row_scale[ids])

    def reconstruct(self) -> torch.Tensor:
        """The dense (vocab × d) table (costs vocab × d memory)."""
        return torch.cat([self.rows(s, s + _BLOCK_ROWS) for s in range(0, self.shape[0], _BLOCK_ROWS)])

    def relative_error(self, E: torch.Tensor) -> float:
        """‖E − Ê‖_F / ‖E‖_F, a block of rows at a time."""
        num = den = 0.0
        for s in range(0, E.shape[0], _BLOCK_ROWS):
            e = E[s : s + _BLOCK_ROWS].float()
            num += float((e - self.rows(s, s + _BLOCK_ROWS)).double().pow(2).sum())
            den += float(e.double().pow(2).sum())
        return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))

    def to(self, dtype: torch.dtype) -> CodebookFactors:
        """Placeholders cast to ``dtype`` (what ``decompose`` checks); codes and codebooks keep their storage."""
        return CodebookFactors(
            self.U.to(dtype), self.V.to(dtype), self.method, None, dict(self.meta), codes=self.codes,
            codebooks=self.codebooks, rotation=self.rotation, row_scale=self.row_scale,
            codebook_scale=self.codebook_scale,
        )


def codes_as_long(codes: torch.Tensor) -> torch.Tensor:
    """Codes as int64 in [0, K) (int16 codes are stored shifted by −32,768)."""
    c = codes.long()
    return c + 32768 if codes.dtype == torch.int16 else c


def decode(
    codes: torch.Tensor, codebooks: torch.Tensor, d: int, rotation: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows for (n × S × M) codes: gather one codebook row per (stage, sub-space), sum stages, undo rotation/scale."""
    S, M, K, sub = codebooks.shape
    n = codes.shape[0]
    offsets = torch.arange(S * M, device=codes.device).view(S, M) * K
    flat = codebooks.reshape(S * M * K, sub)
    rows = torch.nn.functional.embedding(codes_as_long(codes) + offsets, flat).float()  # n × S × M × sub
    out = (rows.sum(1) if S > 1 else rows[:, 0]).reshape(n, M * sub)[:, :d]
    if rotation is not None:
        out = out @ rotation.float().T
    if row_scale is not None:
        out = out * row_scale.float()[:, None]
    return out


# --- the k-means engine -------------------------------------------------------------------------------------
def _map_subspaces(fn, items: list, threads: int | None) -> list:
    """``[fn(x) for x in items]`` on a pool of Python threads, each faiss call on one OpenMP thread.

    One k-means per sub-space is a small job (16,384 points × 256 centroids × 4 columns); faiss's own OpenMP
    parallelism synchronizes both threads at every iteration, which on a shared 2-core machine was slower than one
    thread (measured 5.1 s vs 2.0 s for the same k-means). Sub-spaces are independent, so they run side by side
    instead (faiss releases the GIL); each has its own seed, so the result does not depend on the thread count.
    """
    import faiss
    from concurrent.futures import ThreadPoolExecutor

    workers = threads or max(1, torch.get_num_threads())
    before, torch_before = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)  # the metric's small torch ops of each sub-space too (see in_row_blocks)
    try:
        if workers == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, items))
    finally:
        faiss.omp_set_num_threads(before)
        torch.set_num_threads(torch_before)


def _training_sample(n: int, w: np.ndarray | None, max_points: int, rng: np.random.Generator):
    """Rows to train on and their weights: all rows if n ≤ max_points, else a stratified unbiased sample.

    Half the sample is the heaviest rows (kept with their weights); the other half is uniform over the rest,
    each weighted by (rest / sampled) so the total weight of the rest is preserved in expectation.
    """
    if n <= max_points:
        return np.arange(n), w
    if w is None:
        return np.sort(rng.choice(n, max_points, replace=False)), None
    top = np.argsort(-w, kind="stable")[: max_points // 2]
    rest = np.setdiff1d(np.arange(n), top)
    pick = np.sort(rng.choice(rest, max_points - top.size, replace=False))
    idx = np.concatenate([top, pick])
    ws = w[idx].copy()
    ws[top.size :] *= rest.size / pick.size
    return idx, ws


def _kmeans(x: np.ndarray, w: np.ndarray | None, K: int, *, niter: int, seed: int) -> np.ndarray:
    """Weighted k-means centroids (K × dim) through faiss; K ≤ len(x) is guaranteed by the caller."""
    import faiss

    # min_points_per_centroid=1: a table is fitted, not sampled from a distribution, so few points per centroid is
    # no statistical problem (and faiss's warning about it would be noise); max_points: we sample ourselves.
    km = faiss.Kmeans(x.shape[1], K, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=1 << 30)
    km.train(np.ascontiguousarray(x), weights=None if w is None else np.ascontiguousarray(w, dtype=np.float32))
    return km.centroids.reshape(K, x.shape[1])


def _encode(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest-centroid codes for each row of x, one sub-space per (M × K × sub) centroid block, via faiss PQ.

    uint8 codes for K ≤ 256, int32 above (int64 would take 8 bytes per row and sub-space: 256 MB for a 250k-row
    table in 3-column sub-vectors).
    """
    import faiss

    M, K, sub = centroids.shape
    dtype = np.uint8 if K <= 256 else np.int32
    nbits = int(math.log2(K)) if K & (K - 1) == 0 else None
    if nbits is not None and nbits <= 16:
        pq = faiss.ProductQuantizer(M * sub, M, nbits)
        faiss.copy_array_to_vector(np.ascontiguousarray(centroids, dtype=np.float32).ravel(), pq.centroids)
        out = np.empty((x.shape[0], M), dtype=dtype)
        for s in range(0, x.shape[0], 65536):
            packed = pq.compute_codes(np.ascontiguousarray(x[s : s + 65536]))
            if nbits == 8:
                out[s : s + 65536] = packed
            else:
                out[s : s + 65536] = _unpack_faiss_codes(packed, M, nbits)
        return out
    out = np.empty((x.shape[0], M), dtype=dtype)
    for m in range(M):
        index = faiss.IndexFlatL2(sub)
        index.add(np.ascontiguousarray(centroids[m], dtype=np.float32))
        _, idx = index.search(np.ascontiguousarray(x[:, m * sub : (m + 1) * sub]), 1)
        out[:, m] = idx[:, 0]
    return out


def _unpack_faiss_codes(packed: np.ndarray, M: int, nbits: int) -> np.ndarray:
    # faiss packs codes little-endian bit by bit (PQEncoderGeneric); read them back the same way
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : M * nbits].reshape(-1, M, nbits)
    return (bits.astype(np.int64) << np.arange(nbits)).sum(-1)


# --- the decompositions -------------------------------------------------------------------------------------
def subspace_metrics(H: torch.Tensor, M: int, sub: int, *, damp: float = HESSIAN_DAMP
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(U, [T_m]): U the upper Cholesky factor of (H + damping)⁻¹ padded to M·sub columns, and T_m = U_mm⁻¹, so that
    ``‖(x − c) T_m‖²`` is sub-space m's error in the metric :func:`hessian_encode` chooses its codeword in (the
    columns after m still free to absorb part of it)."""
    U = inverse_cholesky(H, M * sub, damp=damp)
    return U, [torch.linalg.inv(U[m * sub:(m + 1) * sub, m * sub:(m + 1) * sub]) for m in range(M)]


def nearest(x: torch.Tensor, books: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of ``books`` (K × sub) to each row of ``x`` (n × sub); ``norms``: the books'
    squared row norms. argmin of ‖b‖² − 2 x·b, one GEMM with the norms as its bias: ``cdist(x, books).argmin(1)``
    made four passes over the n × K distances (norms, clamp, sqrt) and was 2/3 of PQ encoding in the head metric
    (issue 30's profile of ``compress smollm2 --size 8x``). Equal to it but for exact ties of float rounding.

    Example:
        >>> x, b = torch.randn(50, 3), torch.randn(16, 3)
        >>> torch.equal(nearest(x, b, (b * b).sum(1)), torch.cdist(x, b).argmin(1))
        True
    """
    return torch.addmm(norms, x, books.T, alpha=-2).argmin(1)


def hessian_encode(X: torch.Tensor, books: torch.Tensor, H: torch.Tensor, *, damp: float = HESSIAN_DAMP,
                   block_rows: int = 4096) -> torch.Tensor:
    """PQ codes of X's rows chosen in a tied head's metric, sub-space by sub-space with error feedback (GPTVQ-style).

    As :func:`embfactor.decomposition.intk.hessian_round` for scalars: sub-space m's codeword is the nearest in the
    metric ``(U_mm⁻¹)ᵀ U_mm⁻¹`` (U the upper Cholesky factor of H⁻¹), and its error is fed forward to the sub-spaces
    not yet encoded through U. With H = identity this is plain nearest-codeword encoding.

    Args:
        X: (n × M·sub) rows (zero-padded to the codebooks' width).
        books: (M × K × sub) float codebooks as stored.
        H: (d × d) second moment of the head's inputs, d ≤ M·sub.

    Returns:
        (n × M) int64 codes.

    Example:
        >>> X, books = torch.randn(20, 8), torch.randn(2, 16, 4)
        >>> plain = torch.cdist(X.view(20, 2, 4).transpose(0, 1), books).argmin(-1).T
        >>> torch.equal(hessian_encode(X, books, torch.eye(8)), plain)
        True
    """
    M, _, sub = books.shape
    U, T = subspace_metrics(H, M, sub, damp=damp)
    books = books.float()
    # the codewords in each sub-space's metric and their squared norms, once (not once per block of rows)
    booksT = [books[m] @ T[m] for m in range(M)]
    norms = [(b * b).sum(1) for b in booksT]
    block = max(128 // sub, 1) * sub  # columns updated lazily together (as hessian_round), whole sub-spaces
    out = torch.empty(X.shape[0], M, dtype=torch.long)

    def rows_from(r0: int, r1: int) -> None:  # rows r0..r1-1 into out (rows are independent)
        wT = X[r0:r1].float().T.contiguous()  # columns as rows, as in hessian_round
        rows = wT.shape[1]
        for b0 in range(0, M * sub, block):
            b1 = min(b0 + block, M * sub)
            errs = torch.empty(b1 - b0, rows)
            for c0 in range(b0, b1, sub):
                m, c1 = c0 // sub, c0 + sub
                x = wT[c0:c1].T  # rows × sub; (x - b) T[m] is the error in the metric of this sub-space
                code = nearest(x @ T[m], booksT[m], norms[m])
                out[r0:r0 + rows, m] = code
                err = ((x - books[m][code]) @ T[m]).T
                errs[c0 - b0:c1 - b0] = err
                wT[c1:b1].addmm_(U[c0:c1, c1:b1].T, err, alpha=-1)
            wT[b1:].addmm_(U[b0:b1, b1:].T, errs, alpha=-1)

    # blocks side by side, one torch thread each; 4,096 rows: the n × K scores stay in cache (16,384: 1.3x slower)
    in_row_blocks(rows_from, X.shape[0], block_rows)
    return out


def _check_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name} must be an integer in {rng}, got {v!r}")
    return int(v)


def _rotation(E: torch.Tensor, kind: str, M: int, seed: int, sample: np.ndarray) -> torch.Tensor | None:
    if kind == "none":
        return None
    d = E.shape[1]
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float()  # sign-fixed: a unique Haar-distributed rotation
    import faiss

    if d % M:
        raise ConfigError(f"rotation='opq' needs sub_dim to divide d = {d}; pick sub_dim among the divisors of {d}")
    opq = faiss.OPQMatrix(d, M)
    opq.niter = 10
    opq.verbose = False
    opq.pq = pq = faiss.ProductQuantizer(d, M, 8)
    pq.cp.min_points_per_centroid = 1  # as in _kmeans: no warning spam for small tables
    # OPQMatrix seeds its random initialization itself (fixed seeds): deterministic without our seed
    opq.train(np.ascontiguousarray(E[torch.from_numpy(np.asarray(sample, dtype=np.int64))].float().numpy()))
    # faiss applies y = A x with A (d_out × d_in) row-major; our convention quantizes E·R, so R = Aᵀ
    A = faiss.vector_to_array(opq.A).reshape(d, d)
    return torch.from_numpy(A.T.copy()).float()


def quantize_table(
    E: torch.Tensor,
    *,
    sub_dim: int | None = None,
    M: int | None = None,
    K: int = 256,
    stages: int = 1,
    rotation: str = "none",
    row_scale: bool = False,
    token_weights: Any = None,
    seed: int = 0,
    niter: int = 10,
    max_train_points: int | None = None,
    codebook_dtype: str = "float16",
    threads: int | None = None,
    method: str = "pq", metric: torch.Tensor | None = None, encode: bool = True,
) -> CodebookFactors:
    """Product quantization of E with ``stages`` residual stages (1: PQ, more: RVQ); see the module docstring.

    Args:
        E: (vocab × d) float table.
        sub_dim, M: sub-vector width, or number of sub-spaces (give one; default sub_dim = 4). When sub_dim does not
            divide d the last sub-space is zero-padded (its codebook stores the pad columns, counted in the bytes).
        K: codebook size per sub-space, 2..65,536 (uint8 codes up to 256); lowered to the number of rows when the
            table has fewer rows than K (then every row is its own centroid: exact).
        stages: residual stages (each a PQ of what the previous stages left).
        rotation: "none", "random" (seeded Haar orthogonal) or "opq" (faiss's OPQMatrix, unweighted; sub_dim | d).
        row_scale: quantize unit-norm rows and store each row's norm (fp16).
        token_weights: per-row importance (e.g. token frequencies, as for ``wsvd``); None = uniform.
        seed: k-means seed (results are deterministic given it).
        niter: k-means iterations per sub-space and stage.
        max_train_points: rows used to train each k-means (default K·64); every row is encoded.
        codebook_dtype: storage dtype of codebooks/rotation/scales: "float16" (default), "bfloat16", "float32", or
            "int8" (codebooks as int8 with one fp16 scale per codebook column, the rest fp16: half the codebook
            bytes, which are 7-13% of a 16x MiniLM table, for a rounding error ~0.4% of each column's range).
        threads: sub-spaces clustered side by side (None: torch's thread count); faiss itself runs one thread each.
        metric: (d × d): k-means in this metric (:func:`_metric_whiteners`); the codes stay nearest-codeword.
        encode: False: codebooks only, codes left zero, for a caller that encodes the rows itself (``pq`` in a metric).

    Example:
        >>> f = quantize_table(torch.randn(500, 10), sub_dim=4, K=32, stages=2)
        >>> f.codebooks.shape, f.relative_error(torch.zeros(500, 10)) > 0
        (torch.Size([2, 3, 32, 4]), True)
    """
    from embfactor.decomposition.wsvd import check_token_weights

    if E.ndim != 2:
        raise InvalidInputError(f"E must be a 2-D (vocab × d) table, got shape {tuple(E.shape)}")
    n, d = E.shape
    sub_dim, M, K, stages, niter = _pq_settings(d, sub_dim=sub_dim, M=M, K=K, stages=stages, niter=niter,
                                                rotation=rotation, codebook_dtype=codebook_dtype)
    K_eff = min(K, n)
    max_train_points = _check_int("max_train_points", max_train_points or K_eff * 64, K_eff)
    cb_dtype, int8 = float_dtype(codebook_dtype), codebook_dtype == "int8"
    w = None if token_weights is None else check_token_weights(token_weights, n, method).numpy().astype(np.float32)
    whiten = _metric_whiteners(metric, M, sub_dim, stages=stages, rotation=rotation, row_scale=row_scale)
    E = E.detach().cpu()
    train_idx, train_w = _training_sample(n, w, max_train_points, np.random.default_rng(seed))
    # No copy of the table: the training rows' residuals are fitted stage by stage, then every row encoded through all
    # stages a block at a time. A whole-table residual held two padded float32 copies (1.3 GB at 262,144 x 640).
    R, scale = _rotation_and_scales(E, rotation, row_scale, M=M, seed=seed, sample=train_idx, cb_dtype=cb_dtype)
    codes, books = _fit_stages(E, R, scale, train_idx, train_w, stages=stages, M=M, sub_dim=sub_dim, K=K_eff,
                               niter=niter, seed=seed, threads=threads, cb_dtype=cb_dtype, int8=int8, whiten=whiten,
                               encode=encode)
    cdt = code_dtype(K_eff)
    codes_t = torch.from_numpy(codes - (32768 if cdt == torch.int16 else 0)).to(cdt)
    meta = {"K": K_eff, "sub_dim": sub_dim, "M": M, "stages": stages, "rotation": rotation, "row_scale": row_scale,
            "niter": niter, "train_points": int(train_idx.size), "weighted": w is not None}
    meta.update({"K_requested": K} if K_eff < K else {}, **({"training": "metric"} if metric is not None else {}))
    books_t, books_scale = torch.from_numpy(books), None
    if int8:  # books hold exactly q · scale: re-deriving q and scale from them gives the stored values back
        books_t, books_scale = int8_codebooks(books_t)
    f = CodebookFactors(
        torch.empty(n, 0, dtype=E.dtype), torch.empty(0, d, dtype=E.dtype), method, None, meta, codes=codes_t,
        codebooks=books_t.to(CODEBOOK_DTYPES[codebook_dtype]), rotation=None if R is None else R.to(cb_dtype),
        row_scale=None if scale is None else scale.to(cb_dtype), codebook_scale=books_scale,
    )
    if w is not None and encode:
        f.meta["weighted_relative_error"] = _weighted_error(E, f, torch.from_numpy(w).double())
    return f


def _metric_whiteners(metric: torch.Tensor | None, M: int, sub: int, *, stages: int, rotation: str,
                      row_scale: bool) -> list[torch.Tensor] | None:
    """Per sub-space T_m (:func:`subspace_metrics`) for k-means in a metric: the error ‖(x − c)·T_m‖² is what
    :func:`hessian_encode` minimizes there. MiniLM 16x tiers encoded in the input Fisher: fidelity 0.9897 with plain
    k-means, 0.9904 trained in it (frontier_notes.md)."""
    if metric is None:
        return None
    if stages != 1 or rotation != "none" or row_scale:
        raise ConfigError("codebooks trained in a metric (metric=/hessian=) take one stage, no rotation and no row "
                          f"scale; got stages={stages}, rotation={rotation!r}, row_scale={row_scale}")
    return subspace_metrics(metric, M, sub)[1]


# Float32 values of the table encoded at once (64 MB): a 128,256 x 4096 table is read in blocks of 4,096 rows.
ENCODE_BLOCK_VALUES = 1 << 24


def _prepared_rows(rows: torch.Tensor, R: torch.Tensor | None, pad: int, scale: torch.Tensor | None) -> np.ndarray:
    """Rows as the codes quantize them: float32, rotated by ``R``, divided by their ``scale``, zero-padded by
    ``pad`` columns (a new array)."""
    X = rows.float()
    if R is not None:
        X = X @ R
    if scale is not None:
        X = X / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    return torch.nn.functional.pad(X, (0, pad)).numpy().copy()


def _row_scales(E: torch.Tensor, R: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Each row's norm (after the rotation, which keeps norms) rounded to the stored ``dtype``, in blocks."""
    out = torch.empty(E.shape[0])
    step = max(1024, ENCODE_BLOCK_VALUES // max(1, E.shape[1]))
    for a in range(0, E.shape[0], step):
        X = E[a : a + step].float()
        out[a : a + step] = (X @ R if R is not None else X).norm(dim=1)
    return out.to(dtype).float()


def _subtract(x: np.ndarray, books: np.ndarray, codes: np.ndarray) -> None:
    """Residuals in place: each sub-space of ``x`` minus its codebook row (M × K × sub books, n × M codes)."""
    sub = books.shape[2]
    for m in range(books.shape[0]):
        x[:, m * sub : (m + 1) * sub] -= books[m][codes[:, m]]


def _rotation_and_scales(E: torch.Tensor, rotation: str, row_scale: bool, *, M: int, seed: int, sample: np.ndarray,
                         cb_dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the rotation R, the row norms), rounded to their storage dtype; the codes quantize (E·R) / norms."""
    R = _rotation(E, rotation, M, seed, sample)
    if R is not None:
        R = R.to(cb_dtype).float()  # quantize against the rotation as stored
    return R, _row_scales(E, R, cb_dtype) if row_scale else None


def _pq_settings(d: int, *, sub_dim: int | None, M: int | None, K: int, stages: int, niter: int, rotation: str,
                 codebook_dtype: str) -> tuple[int, int, int, int, int]:
    """(sub_dim, M, K, stages, niter) of :func:`quantize_table`, checked (ConfigError quoting the bad value)."""
    if sub_dim is not None and M is not None:
        raise ConfigError(f"give sub_dim or M, not both (got sub_dim={sub_dim!r}, M={M!r})")
    if M is not None:
        M = _check_int("M", M, 1, d)
        sub_dim = -(-d // M)
    sub_dim = _check_int("sub_dim", 4 if sub_dim is None else sub_dim, 1, d)
    M = -(-d // sub_dim)
    K = _check_int("K", K, 2, 65536)
    stages = _check_int("stages", stages, 1, 16)
    niter = _check_int("niter", niter, 1, 1000)
    if rotation not in ROTATIONS:
        raise ConfigError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    if codebook_dtype not in CODEBOOK_DTYPES:
        raise ConfigError(f"codebook_dtype must be one of {tuple(CODEBOOK_DTYPES)}, got {codebook_dtype!r}")
    return sub_dim, M, K, stages, niter


def _fit_stages(E: torch.Tensor, R: torch.Tensor | None, scale: torch.Tensor | None, train_idx: np.ndarray,
                train_w: np.ndarray | None, *, stages: int, M: int, sub_dim: int, K: int, niter: int, seed: int,
                threads: int | None, cb_dtype: torch.dtype, int8: bool,
                whiten: list[torch.Tensor] | None = None, encode: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(codes, codebooks) of ``stages`` residual PQ stages of E: trained on the rows ``train_idx``, then every row
    encoded a block at a time (see :data:`ENCODE_BLOCK_VALUES`; ``encode`` False: codes left zero). ``whiten``: per
    sub-space T_m, k-means on x·T_m (centroids mapped back by T_m⁻¹)."""
    n, d = E.shape
    pad = M * sub_dim - d
    codes = (np.empty if encode else np.zeros)((n, stages, M), dtype=np.uint8 if K <= 256 else np.int32)  # _encode
    books = np.zeros((stages, M, K, sub_dim), dtype=np.float32)
    t_idx = torch.from_numpy(np.asarray(train_idx, dtype=np.int64))
    train = _prepared_rows(E[t_idx], R, pad, None if scale is None else scale[t_idx])
    for s in range(stages):

        def fit(m: int, s: int = s, train: np.ndarray = train) -> np.ndarray:
            x = np.ascontiguousarray(train[:, m * sub_dim : (m + 1) * sub_dim])
            if whiten is None:
                return _kmeans(x, train_w, K, niter=niter, seed=seed + 1000 * s + m)
            T = whiten[m].float()
            c = _kmeans(np.ascontiguousarray((torch.from_numpy(x) @ T).numpy()), train_w, K, niter=niter,
                        seed=seed + 1000 * s + m)
            return torch.linalg.solve(T, torch.from_numpy(c), left=False).numpy()  # c·T⁻¹: back to the table's space

        for m, cent in enumerate(_map_subspaces(fit, list(range(M)), threads)):
            # round the codebook to its storage dtype before encoding, so codes match the stored codebook
            c = torch.from_numpy(cent)
            if int8:
                q, sc = int8_codebooks(c[None, None])
                books[s, m] = (q.float() * sc.float())[0, 0].numpy()
            else:
                books[s, m] = c.to(cb_dtype).float().numpy()
        if s + 1 < stages:  # the next stage trains on what this one leaves of the training rows
            _subtract(train, books[s], _encode(train, books[s]))
    step = max(1024, ENCODE_BLOCK_VALUES // max(1, M * sub_dim))
    for a in range(0, n if encode else 0, step):
        x = _prepared_rows(E[a : a + step], R, pad, None if scale is None else scale[a : a + step])
        _encode_stages(x, books, codes[a : a + x.shape[0]])
    return codes, books


def _encode_stages(x: np.ndarray, books: np.ndarray, out: np.ndarray) -> None:
    """``out`` (n × S × M) = each stage's nearest codewords of the prepared rows ``x``, which end as the last
    stage's residuals (S × M × K × sub books)."""
    for s in range(books.shape[0]):
        out[:, s] = c = _encode(x, books[s])
        if s + 1 < books.shape[0]:
            _subtract(x, books[s], c)


def _weighted_error(E: torch.Tensor, f: CodebookFactors, w: torch.Tensor) -> float:
    num = den = 0.0
    for s in range(0, E.shape[0], _BLOCK_ROWS):
        e = E[s : s + _BLOCK_ROWS].double()
        ws = w[s : s + _BLOCK_ROWS]
        num += float(((e - f.rows(s, s + _BLOCK_ROWS).double()).pow(2).sum(1) * ws).sum())
        den += float((e.pow(2).sum(1) * ws).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def product_quantize(E: torch.Tensor, **options: Any) -> CodebookFactors:
    """PQ (one stage) of E; options as :func:`quantize_table`.

    Example:
        >>> product_quantize(torch.randn(300, 8), sub_dim=2, K=16).codes.dtype
        torch.uint8
    """
    if options.get("stages", 1) != 1:
        raise ConfigError(f"pq has one stage (use rvq for several), got stages={options['stages']!r}")
    return quantize_table(E, **{**options, "method": "pq"})


def residual_quantize(E: torch.Tensor, *, stages: int = 2, **options: Any) -> CodebookFactors:
    """RVQ of E: ``stages`` PQ stages on successive residuals (default 8-column sub-vectors); see quantize_table.

    Example:
        >>> residual_quantize(torch.randn(300, 8), stages=3, sub_dim=4, K=16).codes.shape
        torch.Size([300, 3, 2])
    """
    if options.get("sub_dim") is None and options.get("M") is None:
        options["sub_dim"] = 8
    return quantize_table(E, stages=stages, **{**options, "method": "rvq"})


# --- byte budgets --------------------------------------------------------------------------------------------
def codebook_bytes(vocab: int, d: int, *, sub_dim: int, K: int = 256, stages: int = 1, rotation: str = "none",
                   row_scale: bool = False, codebook_dtype: str = "float16") -> int:
    """Stored bytes of a codebook factorization with these settings (what :class:`CodebookFactors` counts).

    Example:
        >>> 30522 * 384 * 4 / codebook_bytes(30522, 384, sub_dim=4)      # MiniLM PQ 4-dim, K=256: 15x
        14.99...
    """
    M = -(-d // sub_dim)
    code_b = 1 if K <= 256 else 2
    value_b = CODEBOOK_DTYPES[codebook_dtype].itemsize
    float_b = float_dtype(codebook_dtype).itemsize
    b = vocab * stages * M * code_b + stages * M * min(K, vocab) * sub_dim * value_b
    if value_b == 1:  # int8 codebooks: one scale per codebook column
        b += stages * M * sub_dim * float_b
    if rotation != "none":
        b += d * d * float_b
    if row_scale:
        b += vocab * float_b
    return b


_SUB_DIMS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)


def codebook_settings(vocab: int, d: int, *, method: str = "pq", K: int | None = None,
                      **fixed: Any) -> list[tuple[int, dict[str, Any]]]:
    """Every (bytes, settings) :func:`plan_codebook` considers, in its order of preference (finest first).

    Example:
        >>> codebook_settings(30522, 384)[3]
        (3126720, {'sub_dim': 4, 'K': 256, 'stages': 1})
    """
    extra = {k: fixed[k] for k in ("rotation", "row_scale", "codebook_dtype") if k in fixed}
    if method == "rvq":
        cands = [(8, s) for s in range(16, 1, -1)] + [(sd, 1) for sd in _SUB_DIMS if sd >= 8]
    else:
        cands = [(sd, 1) for sd in _SUB_DIMS if sd <= d]
    if fixed.get("sub_dim") is not None:
        cands = [(fixed["sub_dim"], s) for s in range(16 if method == "rvq" else 1, 0, -1)]
    ks = [K] if K is not None else [256, 128, 64, 32, 16, 8, 4, 2]
    return [(codebook_bytes(vocab, d, sub_dim=sd, K=k, stages=st, **extra), {"sub_dim": sd, "K": k, "stages": st})
            for k in ks for sd, st in cands]


def plan_codebook(vocab: int, d: int, budget_bytes: float, *, method: str = "pq", K: int | None = None,
                  **fixed: Any) -> dict[str, Any]:
    """The settings (sub_dim, K, stages) with the most bytes that fit ``budget_bytes`` (smaller sub-vectors first).

    PQ varies sub_dim; RVQ keeps 8-column sub-vectors (what measured best per byte on MiniLM) and varies stages,
    falling back to wider sub-vectors at one stage. K is 256 unless given; only when nothing fits with K = 256
    (small tables, where the codebooks dominate) smaller K are tried. Raises ConfigError when nothing fits.

    Example:
        >>> plan_codebook(30522, 384, 30522 * 384 * 4 / 16)
        {'sub_dim': 5, 'K': 256, 'stages': 1}
    """
    settings = codebook_settings(vocab, d, method=method, K=K, **fixed)
    for nbytes, setting in settings:
        if nbytes <= budget_bytes:
            return setting
    smallest, setting = min(settings, key=lambda c: c[0])
    raise ConfigError(
        f"no {method} setting fits {budget_bytes:,.0f} bytes for a {vocab} × {d} table; the smallest "
        f"(K={setting['K']}) takes {smallest:,} bytes ({vocab * d * 4 / smallest:.1f}x fewer than fp32)"
    )


def _budget(E: torch.Tensor, rank: int | None, budget_bytes: float | None) -> float | None:
    # ``rank`` of the registry's signature is read as a budget: the fp32 bytes of a rank-r U·V, so that
    # ``--ratio 16 --method pq`` means ~16x fewer bytes than the fp32 table (as ``tt`` reads it as a parameter budget)
    if budget_bytes is not None:
        return float(budget_bytes)
    if rank is None:
        return None
    return 4.0 * rank * (E.shape[0] + E.shape[1])


def _codebook_method(
    name: str, E: torch.Tensor, rank: int | None, budget: float | None, options: dict[str, Any], stages: int | None,
    token_weights: Any, seed: int,
) -> CodebookFactors:
    # options that do not depend on the size are checked first, so a bad one is named even when no size fits
    if options.get("rotation") not in ROTATIONS:
        raise ConfigError(f"rotation must be one of {ROTATIONS}, got {options.get('rotation')!r}")
    if options.get("codebook_dtype") not in CODEBOOK_DTYPES:
        raise ConfigError(f"codebook_dtype must be one of {tuple(CODEBOOK_DTYPES)}, got {options.get('codebook_dtype')!r}")
    if stages is not None:
        _check_int("stages", stages, 1, 16)
    explicit = options.get("sub_dim") is not None or options.get("M") is not None or stages is not None
    if budget is None and not explicit:
        budget = _budget(E, rank, None)
    if budget is not None and not explicit:
        fixed = {k: options[k] for k in ("rotation", "row_scale", "codebook_dtype")
                 if options.get(k) not in (None, False, "none")}
        plan = plan_codebook(E.shape[0], E.shape[1], budget, method=name, K=options.get("K"), **fixed)
        options = {**options, "sub_dim": plan["sub_dim"], "K": plan["K"]}
        stages = plan["stages"]
    if name == "pq" and stages not in (None, 1):
        raise ConfigError(f"pq has one stage (use rvq for several), got stages={stages!r}")
    if name == "rvq" and options.get("sub_dim") is None and options.get("M") is None:
        options = {**options, "sub_dim": 8}
    opts = {k: v for k, v in options.items() if v is not None}
    return quantize_table(E, stages=stages or (2 if name == "rvq" else 1), token_weights=token_weights, seed=seed,
                          method=name, **opts)


def _stored_bytes(vocab: int, d: int, options: Mapping[str, Any], method: str) -> int:
    """Bytes pq/rvq store with explicit settings, resolved as :func:`_codebook_method` and quantize_table do."""
    sub_dim, M = options.get("sub_dim"), options.get("M")
    if sub_dim is not None and M is not None:
        raise ConfigError(f"give sub_dim or M, not both (got sub_dim={sub_dim!r}, M={M!r})")
    if M is not None:
        sub_dim = -(-d // _check_int("M", M, 1, d))
    sub_dim = _check_int("sub_dim", sub_dim if sub_dim is not None else (8 if method == "rvq" else 4), 1, d)
    K = _check_int("K", 256 if options.get("K") is None else options["K"], 2, 65536)
    stages = options.get("stages")
    stages = _check_int("stages", stages, 1, 16) if stages is not None else (2 if method == "rvq" else 1)
    rotation = options.get("rotation", "none")
    if rotation not in ROTATIONS:
        raise ConfigError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    dtype = options.get("codebook_dtype", "float16")
    if dtype not in CODEBOOK_DTYPES:
        raise ConfigError(f"codebook_dtype must be one of {tuple(CODEBOOK_DTYPES)}, got {dtype!r}")
    return codebook_bytes(
        vocab, d, sub_dim=sub_dim, K=min(K, vocab), stages=stages, rotation=rotation,  # K > rows is lowered
        row_scale=bool(options.get("row_scale", False)), codebook_dtype=dtype,
    )


def pq_stored_bytes(vocab: int, d: int, options: Mapping[str, Any]) -> int:
    """Bytes ``pq`` stores with explicit ``sub_dim`` or ``M`` (K default 256).

    Example:
        >>> pq_stored_bytes(30522, 384, {"sub_dim": 4}) == codebook_bytes(30522, 384, sub_dim=4)
        True
    """
    return _stored_bytes(vocab, d, options, "pq")


def rvq_stored_bytes(vocab: int, d: int, options: Mapping[str, Any]) -> int:
    """Bytes ``rvq`` stores with explicit ``stages``, ``sub_dim`` or ``M`` (defaults: 2 stages, sub_dim 8, K 256).

    Example:
        >>> rvq_stored_bytes(30522, 384, {"stages": 3}) == codebook_bytes(30522, 384, sub_dim=8, stages=3)
        True
    """
    return _stored_bytes(vocab, d, options, "rvq")


@register_method("pq", description="product quantization: frequency-weighted k-means codebooks per sub-vector (faiss)",
                 data_aware=True, size_options=("sub_dim", "M"), stored_bytes=pq_stored_bytes)
def pq(
    E: torch.Tensor, rank: int | None = None, *, seed: int = 0, progress: bool = False, token_weights: Any = None,
    budget_bytes: float | None = None, sub_dim: int | None = None, M: int | None = None, K: int | None = None,
    rotation: str = "none", row_scale: bool = False, niter: int = 10, max_train_points: int | None = None,
    codebook_dtype: str = "float16", threads: int | None = None, hessian: torch.Tensor | None = None,
) -> CodebookFactors:
    """Registered ``pq``: explicit ``sub_dim``/``M`` (K default 256), else the setting that fits the budget.

    ``rank`` is read as a budget, the fp32 bytes of a rank-r U·V (so ``--ratio 16`` means ~16x fewer bytes than
    fp32, as ``tt`` reads it as a parameter budget); ``budget_bytes`` (``--size``) overrides it. Other options as
    :func:`quantize_table` (``hessian``: a metric, a tied head's H or the input embedding's Fisher: codebooks
    trained and rows encoded in it).
    """
    options = dict(sub_dim=sub_dim, M=M, K=K, rotation=rotation, row_scale=row_scale, niter=niter,
                   max_train_points=max_train_points, codebook_dtype=codebook_dtype, threads=threads)
    if hessian is not None and (rotation != "none" or row_scale):
        raise ConfigError("encoding in the head's metric (hessian=...) takes no rotation and no row scale; got "
                          f"rotation={rotation!r}, row_scale={row_scale}")
    # in a metric the rows are encoded once, there: the plain encoding first (replaced code for code) was 13% of
    # `compress minilm --size 8x`'s planner
    options.update(metric=hessian, encode=hessian is None)
    f = _codebook_method("pq", E, rank, budget_bytes, options, None, token_weights, seed)
    return f if hessian is None else encode_in_metric(E, f, hessian, token_weights=token_weights)


def encode_in_metric(E: torch.Tensor, f: CodebookFactors, H: torch.Tensor, *, token_weights: Any = None
                     ) -> CodebookFactors:
    """``f`` (one PQ stage, no rotation or row scale) with its rows of E encoded anew in a tied head's metric
    (:func:`hessian_encode`); the codebooks stay as trained. Returns ``f``, changed.

    Example:
        >>> E = torch.randn(300, 8)
        >>> f = product_quantize(E, sub_dim=2, K=16)
        >>> encode_in_metric(E, f, torch.eye(8)).meta["encoding"]
        'hessian'
    """
    from embfactor.decomposition.wsvd import check_token_weights

    codes = encode_codes(f, E, hessian=H)
    f.codes = (codes - (32768 if f.codes.dtype == torch.int16 else 0)).to(f.codes.dtype)
    f.meta["encoding"] = "hessian"
    if token_weights is not None:
        w = check_token_weights(token_weights, E.shape[0], "pq").double()
        f.meta["weighted_relative_error"] = _weighted_error(E, f, w)
    return f


def encode_rows(f: CodebookFactors, X: torch.Tensor, *, hessian: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``X`` encoded with ``f``'s codebooks (as stored) and decoded again: what ``f`` would hold for them.

    The proxy of a large table trains codebooks on a sample of its rows and encodes other rows only when a plan
    needs them. ``hessian``: encode in a tied head's metric (one stage, no rotation or row scale, as
    :func:`encode_in_metric`); otherwise nearest codewords stage by stage, as the fit encodes.

    Example:
        >>> E = torch.randn(300, 8)
        >>> f = product_quantize(E, sub_dim=2, K=16)
        >>> torch.allclose(encode_rows(f, E[:5]), f.take(torch.arange(5)))
        True
    """
    return decode_codes(f, encode_codes(f, X, hessian=hessian), X)


def encode_codes(f: CodebookFactors, X: torch.Tensor, *, hessian: torch.Tensor | None = None) -> torch.Tensor:
    """(n × S × M) int64 codes of rows ``X`` under ``f``'s codebooks (see :func:`encode_rows`)."""
    n, d = X.shape
    books = f.books()
    S, M, _, sub = books.shape
    if hessian is not None:
        padded = torch.nn.functional.pad(X.detach().float(), (0, M * sub - d))
        return hessian_encode(padded, books[0], hessian)[:, None, :]
    R = None if f.rotation is None else f.rotation.float()
    scale = None if f.row_scale is None else _row_scales(X, R, f.row_scale.dtype)
    codes = np.empty((n, S, M), dtype=np.int64)
    _encode_stages(_prepared_rows(X, R, M * sub - d, scale), books.numpy(), codes)
    return torch.from_numpy(codes)


def decode_codes(f: CodebookFactors, codes: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of (n × S × M) ``codes`` under ``f``'s codebooks; ``X``: the rows they encode, read only for a fit with
    row scales (their norms)."""
    R = None if f.rotation is None else f.rotation.float()
    if f.row_scale is not None and X is None:
        raise InvalidInputError("decoding codes of a fit with row scales needs the rows they encode (X)")
    scale = None if f.row_scale is None else _row_scales(X, R, f.row_scale.dtype)
    return decode(codes, f.books(), f.shape[1], R, scale)


@register_method("rvq", description="residual vector quantization: stages of product quantization on the residuals "
                 "(faiss)", data_aware=True, size_options=("stages", "sub_dim", "M"), stored_bytes=rvq_stored_bytes)
def rvq(
    E: torch.Tensor, rank: int | None = None, *, seed: int = 0, progress: bool = False, token_weights: Any = None,
    budget_bytes: float | None = None, stages: int | None = None, sub_dim: int | None = None, M: int | None = None,
    K: int | None = None, rotation: str = "none", row_scale: bool = False, niter: int = 10,
    max_train_points: int | None = None, codebook_dtype: str = "float16", threads: int | None = None,
) -> CodebookFactors:
    """Registered ``rvq``: explicit ``stages``/``sub_dim`` (default 2 stages of 8-column PQ, K = 256), else the
    setting that fits the budget (``rank`` read as for ``pq``)."""
    options = dict(sub_dim=sub_dim, M=M, K=K, rotation=rotation, row_scale=row_scale, niter=niter,
                   max_train_points=max_train_points, codebook_dtype=codebook_dtype, threads=threads)
    return _codebook_method("rvq", E, rank, budget_bytes, options, stages, token_weights, seed)
