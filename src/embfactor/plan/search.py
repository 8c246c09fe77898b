"""The proxy search of the planner: candidate formats, tiers at token-mass cuts, the knapsack over them, and the
build of the chosen plan into a ``tiered`` format (pure functions of tensors)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from embfactor.errors import ConfigError

# Cut points of the frequency tiers, as cumulative shares of the token mass; "1.0" ends the tier at the last token
# seen in the calibration text (so unseen tokens can get a tier of their own).
MASS_CUTS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0)
ALPHAS = (0.25, 0.5, 1.0)  # token weights (count + 1)^alpha under which the proxy ranks plans
MAX_TIERS = 3
CHECK_PLANS = 4  # plans scored on the model


@dataclass(frozen=True)
class FormatChoice:
    """A storage format for some rows: a registered decomposition and its options.

    Example:
        >>> FormatChoice("int", {"bits": 4, "group": 32}).label
        'int4 g32'
    """

    method: str
    options: tuple[tuple[str, Any], ...]

    def __init__(self, method: str, options: dict[str, Any] | tuple = ()) -> None:
        object.__setattr__(self, "method", method)
        items = options.items() if isinstance(options, dict) else options
        object.__setattr__(self, "options", tuple(sorted(items)))

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def label(self) -> str:
        o = self.opts
        if self.method == "int":
            g = o.get("group")
            return f"int{o['bits']} {'g' + str(g) if g else 'per-row'}" + ("" if o.get("symmetric", True) else " asym")
        if self.method in ("pq", "rvq"):
            s = f"{self.method} sub{o.get('sub_dim', 4)} K{o.get('K', 256)}"
            s += f" x{o['stages']}" if o.get("stages", 1) > 1 else ""
            return s + (" int8cb" if o.get("codebook_dtype") == "int8" else "")
        return f"{self.method} {o}"

    def bytes_for(self, rows: int, d: int) -> int:
        """Stored bytes of ``rows`` rows of width ``d`` in this format (0 rows: 0 bytes, no codebook)."""
        if rows <= 0:
            return 0
        o = self.opts
        if self.method == "int":
            from embfactor.quant import grouped_bytes

            return grouped_bytes(rows, d, o["bits"], o.get("group"), symmetric=o.get("symmetric", True))
        if self.method in ("pq", "rvq"):
            from embfactor.decomposition.codebook import codebook_bytes

            return codebook_bytes(rows, d, sub_dim=o.get("sub_dim", 4), K=o.get("K", 256), stages=o.get("stages", 1),
                                  codebook_dtype=o.get("codebook_dtype", "float16"))
        raise ConfigError(f"the planner has no byte count for method {self.method!r}")

    def bytes_per_row(self, d: int, rows: int = 1 << 20) -> float:
        """Bytes per row at a large row count (codebooks amortized): the order in which tiers get formats."""
        return self.bytes_for(rows, d) / rows


def default_formats(d: int) -> list[FormatChoice]:
    """The candidate formats: int8/6/5/4/3 per group of 32, PQ with 3..12-column sub-vectors (K = 256).

    PQ codebooks are int8 with fp16 column scales: a codebook costs K·d bytes whatever the sub-vector width (98 KB
    at d = 384 in int8), 7-13% of a 16x MiniLM budget in fp16 with two or three tiers; int8 halves that for a
    rounding error ~0.4% of each column's range (MiniLM --size 16x: fidelity 0.9866 -> 0.9882; frontier_notes.md).

    Example:
        >>> [f.label for f in default_formats(384)][:2], default_formats(384)[5].label
        (['int8 g32', 'int6 g32'], 'pq sub3 K256 int8cb')
    """
    out = [FormatChoice("int", {"bits": b, "group": 32}) for b in (8, 6, 5, 4, 3)]
    out += [FormatChoice("pq", {"sub_dim": s, "K": 256, "codebook_dtype": "int8"}) for s in (3, 4, 5, 6, 8, 12)
            if s <= d]
    return out


def token_order(counts: torch.Tensor) -> torch.Tensor:
    """Token ids by count, most frequent first; ties (e.g. unseen tokens) by id, so the order is deterministic.

    Example:
        >>> token_order(torch.tensor([0., 5., 5., 1.])).tolist()
        [1, 2, 3, 0]
    """
    c = counts.detach().double().cpu().numpy()
    return torch.from_numpy(np.lexsort((np.arange(c.size), -c))).long()


def mass_boundaries(counts: torch.Tensor, order: torch.Tensor, cuts: Sequence[float] = MASS_CUTS) -> list[int]:
    """Row counts (in ``order``) at which the cumulative token mass first reaches each cut (1.0: all seen tokens).

    Boundaries at 0 or at the whole vocabulary are dropped, duplicates merged.

    Example:
        >>> c = torch.tensor([50., 30., 15., 5., 0., 0.])
        >>> mass_boundaries(c, token_order(c), (0.5, 0.8, 1.0))
        [1, 2, 4]
    """
    sorted_c = counts.double()[order]
    total = float(sorted_c.sum())
    n = int(order.numel())
    if total <= 0:
        return []
    cum = torch.cumsum(sorted_c, 0) / total
    out = set()
    for m in cuts:
        k = int((sorted_c > 0).sum()) if m >= 1.0 else int(torch.searchsorted(cum, float(m) - 1e-12)) + 1
        if 0 < k < n:
            out.add(k)
    return sorted(out)


# k-means settings of the proxy's whole-table fits: a quarter of the default training sample and 6 iterations cost
# ~1/7 of a full fit; the proxy only ranks plans, and the chosen plan's codebooks are fitted in full.
PROXY_KMEANS = {"niter": 6, "points_per_centroid": 16}


# formats that round, train and encode in the planner's metric when it has one (hessian=, same bytes): the input
# embedding's Fisher and/or a tied head's H (embfactor.eval.head)
HEAD_METRIC_METHODS = ("int", "pq")


def fit_rows(E: torch.Tensor, fmt: FormatChoice, weights: torch.Tensor | None, seed: int = 0, *, quick: bool = False,
             hessian: torch.Tensor | None = None):
    """The decomposition of ``E`` in format ``fmt`` (its Factors; ``.rows(a, b)`` reads reconstructed rows).

    ``quick``: cheaper k-means (:data:`PROXY_KMEANS`) for codebook formats. ``hessian``: the planner's metric
    (:mod:`embfactor.eval.head`): int-k rounds, and PQ trains its codebooks and encodes, in it.
    """
    from embfactor.decomposition.registry import get_method

    info = get_method(fmt.method)
    opts = fmt.opts
    if quick and fmt.method in ("pq", "rvq"):
        opts.setdefault("niter", PROXY_KMEANS["niter"])
        opts.setdefault("max_train_points", min(E.shape[0], PROXY_KMEANS["points_per_centroid"] * opts.get("K", 256)))
    if info.data_aware and weights is not None:
        opts["token_weights"] = weights
    if hessian is not None and fmt.method in HEAD_METRIC_METHODS:
        opts["hessian"] = hessian
    return info.fn(E, None, seed=seed, **opts)


class RowwiseFit:
    """A whole-table fit of a format that quantizes each row on its own (int-k): a row is rounded when first read
    and kept packed, so the proxy, every checked plan and the build read the same rounding of a row without
    rounding it again.

    A row of int-k depends only on that row (the head metric's feedback runs across a row's columns), so rows
    rounded in any batch are bit for bit the rows of a whole-table fit, or of the build's fit of a tier
    (tests/test_plan_cache.py). Rounding each row up to three times (proxy, check, build) was 17% of
    ``compress smollm2 --size 8x`` (benchmarks/results/compress_profile.md). Kept: the packed codes and scales of the
    rows read so far (4-8 bits per value, 0.13-0.27x their fp32 bytes); the planner drops the fits no plan needs.
    """

    def __init__(self, E: torch.Tensor, fmt: FormatChoice, hessian: torch.Tensor | None = None) -> None:
        self.E, self.fmt, self.hessian = E, fmt, hessian
        self.slot = torch.full((E.shape[0],), -1, dtype=torch.long)  # where each row's rounding is kept, -1: not yet
        self.kept = 0  # rows rounded, each once (the buffers below grow by doubling)
        self.packed = self.scale = self.lo = None
        self.meta: dict[str, Any] = {}
        self.bits, self.group = 0, None

    def _round(self, ids: torch.Tensor) -> None:
        new = ids[self.slot[ids] < 0].unique()
        for chunk in new.split(_ROUND_ROWS) if new.numel() else ():  # E[chunk] is a copy: a block at a time
            f = fit_rows(self.E[chunk], self.fmt, None, hessian=self.hessian)
            if self.packed is None:
                self.meta, self.bits, self.group = dict(f.meta), f.bits, f.group
            need = self.kept + chunk.numel()
            if self.packed is None or need > self.packed.shape[0]:
                cap = max(need, 2 * (0 if self.packed is None else self.packed.shape[0]))
                self.packed, self.scale = _grown(self.packed, f.packed, cap), _grown(self.scale, f.scale, cap)
                self.lo = None if f.lo is None else _grown(self.lo, f.lo, cap)
            rows = slice(self.kept, need)
            self.packed[rows], self.scale[rows] = f.packed, f.scale
            if f.lo is not None:
                self.lo[rows] = f.lo
            self.slot[chunk] = torch.arange(self.kept, need)
            self.kept = need

    def factors(self, ids: torch.Tensor):
        """The IntFactors of rows ``ids`` (in that order), as a fit of ``E[ids]`` would return them."""
        from embfactor.decomposition.intk import IntFactors

        self._round(ids)
        at = self.slot[ids]
        n, d = int(ids.numel()), int(self.E.shape[1])
        return IntFactors(torch.empty(n, 0, dtype=self.E.dtype), torch.empty(0, d, dtype=self.E.dtype), "int", None,
                          dict(self.meta), packed=self.packed[at], scale=self.scale[at],
                          lo=None if self.lo is None else self.lo[at], bits=self.bits, group=self.group)

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        return self.factors(ids).rows(0, int(ids.numel()))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.take(torch.arange(start, stop))


_ROUND_ROWS = 16384  # rows rounded at once by RowwiseFit (hessian_round's own block)


def _grown(buf: torch.Tensor | None, like: torch.Tensor, rows: int) -> torch.Tensor:
    # a buffer of ``rows`` rows shaped and typed as ``like``, holding ``buf``'s rows first
    out = torch.empty(rows, *like.shape[1:], dtype=like.dtype)
    if buf is not None:
        out[:buf.shape[0]] = buf
    return out


ROWWISE_METHODS = ("int",)


def row_errors(E: torch.Tensor, factors: Any, block: int = 16384, *,
               metric: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error of each row of ``E`` against the factors' reconstruction (float64, vocab); ``factors`` None:
    against zero rows (each row's energy).

    ``metric``: a (d × d) matrix M; the error of a row is then ``diff M diffᵀ`` (a tied head's H: the mean
    squared logit error the row causes). ``ids``: only these rows (errors in their order; read by ``take``).
    """
    n = E.shape[0] if ids is None else int(ids.numel())
    out = torch.empty(n, dtype=torch.float64)
    M = None if metric is None else metric.double()
    for s in range(0, n, block):
        e = min(s + block, n)
        rows = E[s:e] if ids is None else E[ids[s:e]]
        if factors is None:
            diff = rows.double()
        else:
            fit = factors.rows(s, e) if ids is None else factors.take(ids[s:e])
            diff = rows.double() - fit.double()
        out[s:e] = (diff ** 2).sum(1) if M is None else ((diff @ M) * diff).sum(1)
    return out


def reachable_rows(fmt: FormatChoice, formats: Sequence[FormatChoice], n: int, d: int, budget_bytes: float) -> int:
    """How many rows, from the top of the token order, any plan within ``budget_bytes`` can store in ``fmt``: the
    proxy fits a format only on them (the row errors past them are never read).

    A row at position r in ``fmt`` has the r rows above it in ``fmt`` or richer formats (tiers get fewer bytes per
    row down the order) and the rows below in formats after it, which store at least their codes. Only bounded for
    a row-wise format (int-k) all of whose richer formats are row-wise too (bytes linear in rows); else ``n``. At
    8x on MiniLM int8 g32 reaches 43% of the rows, int4 g32 87%: the proxy rounds 3.6 tables' worth, not 5.

    Example:
        >>> fmts = default_formats(384)
        >>> reachable_rows(fmts[0], fmts, 30522, 384, 30522 * 384 * 4 / 8)    # int8 g32 at 8x
        12988
    """
    fmts = sorted(formats, key=lambda f: -f.bytes_per_row(d))  # as search_plans orders them
    i = fmts.index(fmt)
    if any(f.method not in ROWWISE_METHODS for f in fmts[:i + 1]):
        return n
    big = 1 << 20  # past every codebook's K: the bytes one more row adds (its codes)
    below = min((f.bytes_for(big + 1, d) - f.bytes_for(big, d) for f in fmts[i + 1:]), default=0)

    def fits(r: int) -> bool:
        return fmt.bytes_for(r, d) + below * (n - r) <= budget_bytes

    lo, hi = 0, n
    while lo < hi:  # bytes grow with r (fmt stores more per row than any format after it)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


# Tables with more rows than this have their candidates' errors measured on a sample of rows (:class:`RowSample`):
# fitting and encoding every row in eleven formats was most of `compress --size 8x` on a 262,144-row table.
PROXY_ROWS = 65_536


@dataclass
class RowSample:
    """The rows on which the proxy measures a large table's candidates, and how the other rows' errors follow.

    The first ``head`` rows of the token order (the most frequent, which carry most of the weight) are all sampled;
    past them every ``stride``-th row stands for the ``stride`` rows from it on. An unsampled row's error is its
    energy (its squared norm, in the metric if any) times the error-to-energy ratio of the sampled rows around it
    (``window`` of them): errors grow with a row's size, and how well a format fits changes slowly along the order.
    """

    order: torch.Tensor
    head: int
    stride: int
    window: int = 64

    @classmethod
    def of(cls, order: torch.Tensor, rows: int | None = None) -> RowSample | None:
        """The sample of a table whose token order is ``order``, or None when it has at most ``rows`` rows
        (default :data:`PROXY_ROWS`)."""
        n, rows = int(order.numel()), rows or PROXY_ROWS
        if n <= rows:
            return None
        head = rows // 2
        return cls(order, head, -(-(n - head) // (rows - head)))

    @property
    def positions(self) -> torch.Tensor:
        """Sampled positions in the token order (ascending)."""
        n = int(self.order.numel())
        return torch.cat([torch.arange(self.head), torch.arange(self.head, n, self.stride)])

    @property
    def ids(self) -> torch.Tensor:
        """Sampled token ids (in the order of :attr:`positions`)."""
        return self.order[self.positions]

    def weights(self, w: torch.Tensor) -> torch.Tensor:
        """Token weights of the sampled rows, each strided row standing for ``stride`` rows (the totals stay)."""
        out = w[self.ids].clone()
        out[self.head:] *= self.stride
        return out

    def spread(self, sampled: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """Every row's error (token id order) from the sampled rows' errors and every row's ``energy``."""
        n = int(self.order.numel())
        tail_err, tail_en = sampled[self.head:].double(), energy[self.ids[self.head:]].double()
        pad = self.window // 2
        ce = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(tail_err, 0)])
        cn = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(tail_en, 0)])
        j = torch.arange(tail_err.numel())
        lo, hi = (j - pad).clamp(min=0), (j + pad + 1).clamp(max=tail_err.numel())
        ratio = (ce[hi] - ce[lo]) / (cn[hi] - cn[lo]).clamp_min(1e-300)
        chunk = (torch.arange(self.head, n) - self.head) // self.stride  # the sampled row each tail row follows
        out = torch.empty(n, dtype=torch.float64)
        out[self.order[:self.head]] = sampled[:self.head].double()
        tail = self.order[self.head:]
        out[tail] = ratio[chunk] * energy[tail].double()
        out[self.ids[self.head:]] = tail_err  # the sampled rows keep their own errors
        return out


class EncodedOnDemand:
    """A codebook fitted on a sample of the table's rows; any other row is encoded with it when first read
    (``take``), and its codes kept (n × S × M small integers), so the checked plans encode each row once."""

    def __init__(self, E: torch.Tensor, factors: Any, hessian: torch.Tensor | None = None) -> None:
        self.E, self.factors, self.hessian = E, factors, hessian
        self.codes: torch.Tensor | None = None
        self.known = torch.zeros(E.shape[0], dtype=torch.bool)

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        from embfactor.decomposition.codebook import decode_codes, encode_codes

        if self.codes is None:
            small = self.factors.K <= 256
            self.codes = torch.zeros(self.E.shape[0], *self.factors.codes.shape[1:],
                                     dtype=torch.uint8 if small else torch.int32)
        new = ids[~self.known[ids]].unique()
        if new.numel():
            self.codes[new] = encode_codes(self.factors, self.E[new].float(), hessian=self.hessian).to(self.codes.dtype)
            self.known[new] = True
        rows = self.E[ids].float() if self.factors.row_scale is not None else None  # only row scales read them
        return decode_codes(self.factors, self.codes[ids].long(), rows)


def _proxy_fits(E: torch.Tensor, formats: Sequence[FormatChoice], w_fit: torch.Tensor, order: torch.Tensor, *,
                seed: int, hessian: torch.Tensor | None, budget_bytes: float = float("inf"),
                progress: Callable[[str], None] | None) -> tuple[dict[FormatChoice, Any], dict[FormatChoice, Any]]:
    """Each format's whole-table fit (what :func:`assemble` reads) and every row's error in it (the proxy's).

    A table of more than :data:`PROXY_ROWS` rows is measured on a :class:`RowSample`: codebooks are trained and
    errors measured on the sampled rows, and the rows a checked plan needs are encoded when it reads them. A
    row-wise format is rounded only on the rows a plan within ``budget_bytes`` can give it (:func:`reachable_rows`);
    the others' errors are infinite (no plan reads them).
    """
    sample = RowSample.of(order)
    Es = E if sample is None else E[sample.ids]
    ws = w_fit if sample is None else sample.weights(w_fit)
    energy = None if sample is None else row_errors(E, None, metric=hessian)
    n, d = E.shape
    fits, errors = {}, {}
    for f in formats:
        if progress:
            progress(f"fitting {f.label}")
        if f.method in ROWWISE_METHODS:
            fits[f] = fit = RowwiseFit(E, f, hessian)
            if sample is None:
                reach = reachable_rows(f, formats, n, d, budget_bytes)
                if reach >= n:
                    errors[f] = row_errors(E, fit, metric=hessian)
                else:
                    errors[f] = torch.full((n,), float("inf"), dtype=torch.float64)
                    ids = order[:reach].sort().values  # id order: the blocks of rows a whole-table pass rounds
                    errors[f][ids] = row_errors(E, fit, metric=hessian, ids=ids)
            else:  # the sample's rounding is not kept (at 128,256 x 4,096 it would be 0.9 GB over five formats)
                errors[f] = sample.spread(row_errors(Es, RowwiseFit(Es, f, hessian), metric=hessian), energy)
            continue
        fit = fit_rows(Es, f, ws, seed, quick=True, hessian=hessian)
        err = row_errors(Es, fit, metric=hessian)
        if sample is None:
            fits[f], errors[f] = fit, err
        else:
            fits[f] = EncodedOnDemand(E, fit, hessian)
            errors[f] = sample.spread(err, energy)
    return fits, errors


@dataclass
class Tier:
    """One tier of a plan: rows ``[start, stop)`` of the token order in ``fmt``."""

    start: int
    stop: int
    fmt: FormatChoice
    bytes: int = 0
    mass: float = 0.0
    proxy_error: float = 0.0

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.fmt.method, "options": self.fmt.opts, "label": self.fmt.label, "rows": self.rows,
                "first": self.start, "token_mass": round(self.mass, 6), "bytes": self.bytes,
                "proxy_error": self.proxy_error}


@dataclass
class Plan:
    """Tiers over the token order, their bytes, and how the plan was chosen."""

    tiers: list[Tier]
    bytes: int
    alpha: float = 0.5
    proxy: float = 0.0
    score: float | None = None
    checked: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage of choosing and building it

    @property
    def label(self) -> str:
        return " + ".join(f"{t.fmt.label} [{t.rows}]" for t in self.tiers)

    def key(self) -> tuple:
        return tuple((t.start, t.stop, t.fmt) for t in self.tiers)

    def to_dict(self) -> dict[str, Any]:
        return {"tiers": [t.to_dict() for t in self.tiers], "bytes": self.bytes, "alpha": self.alpha,
                "proxy_error": self.proxy, "score": self.score, "checked": self.checked,
                "stage_seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def tier_map_bytes(vocab: int, tiers: int) -> int:
    """Bytes of the token → tier map the ``tiered`` format stores: 1, 2, 4 or 8 bits per token (none for one tier).

    Example:
        >>> tier_map_bytes(30522, 1), tier_map_bytes(30522, 2), tier_map_bytes(30522, 3)
        (0, 3816, 7631)
    """
    from embfactor.formats.tiered import index_bits

    return 0 if tiers <= 1 else -(-vocab * index_bits(tiers) // 8)


def search_plans(
    errors: dict[FormatChoice, torch.Tensor],
    weights: torch.Tensor,
    order: torch.Tensor,
    boundaries: Sequence[int],
    budget_bytes: float,
    d: int,
    *,
    max_tiers: int = MAX_TIERS,
    top: int = 5,
    extra_bytes: Callable[[int], int] | None = None,
) -> list[Plan]:
    """The ``top`` plans of least proxy error (Σ weight·row error) whose bytes fit ``budget_bytes``.

    Args:
        errors: per-format squared error of every row (token id order), from one fit of the format to all rows;
            infinite where the format was not fitted (no plan gives it those rows).
        weights: token weights (token id order).
        order: tokens by frequency (:func:`token_order`).
        boundaries: candidate tier cuts as row counts in ``order`` (:func:`mass_boundaries`) for every cut but the
            last; the last cut goes where the budget runs out (:func:`_fill_last_cut`), so plans spend the budget.
        budget_bytes: the most the table may store (tier map included).
        d: row width.
        max_tiers: at most this many tiers; tiers get non-increasing bytes per row down the order.
        extra_bytes: bytes a plan of t tiers needs besides its tiers (default :func:`tier_map_bytes`).

    Example:
        >>> # see tests/test_plan.py
    """
    n = int(order.numel())
    extra = extra_bytes or (lambda t: tier_map_bytes(n, t))
    fmts = sorted(errors, key=lambda f: -f.bytes_per_row(d))
    w = weights.double()[order]
    total_w = float(w.sum()) or 1.0
    prefix = {f: torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w * errors[f][order], 0)]) for f in fmts}
    cuts = [b for b in sorted(set(boundaries)) if 0 < b < n]
    found: list[Plan] = []
    seen: set = set()
    for t in range(1, max_tiers + 1):
        # the cuts above the last tier come from ``boundaries``; the last cut is where the budget runs out
        for inner in itertools.combinations(cuts, max(t - 2, 0)):
            for combo in itertools.product(range(len(fmts)), repeat=t):
                if any(combo[i] >= combo[i + 1] for i in range(t - 1)):  # strictly fewer bytes per row downwards
                    continue
                edges = _fill_last_cut([fmts[k] for k in combo], (0, *inner), n, budget_bytes - extra(t), d)
                if edges is None or (edges, combo) in seen:
                    continue
                seen.add((edges, combo))
                sizes = [fmts[k].bytes_for(edges[i + 1] - edges[i], d) for i, k in enumerate(combo)]
                errs = [float(prefix[fmts[k]][edges[i + 1]] - prefix[fmts[k]][edges[i]]) / total_w
                        for i, k in enumerate(combo)]
                if not all(math.isfinite(e) for e in errs):  # rows a format was not fitted on (reachable_rows)
                    continue
                tiers = [Tier(edges[i], edges[i + 1], fmts[k], sizes[i], proxy_error=errs[i])
                         for i, k in enumerate(combo)]
                found.append(Plan(tiers, extra(t) + sum(sizes), proxy=sum(errs)))
    found.sort(key=lambda p: (p.proxy, p.bytes))
    return found[:top]


def _fill_last_cut(fmts: Sequence[FormatChoice], edges: tuple[int, ...], n: int, budget: float,
                   d: int) -> tuple[int, ...] | None:
    """``edges`` (0 and the fixed inner cuts) completed by the last cut at the largest row that fits ``budget``.

    One format: (0, n) if it fits. Several: the last cut moves down the order as long as the tiers' bytes fit, so a
    plan spends the whole budget (the tier above the cut has more bytes per row than the one below). None when even
    a last tier of one row and the one above it of one row do not fit.

    Example:
        >>> rich, poor = FormatChoice("int", {"bits": 8}), FormatChoice("int", {"bits": 4})
        >>> _fill_last_cut([rich, poor], (0,), 100, rich.bytes_for(30, 8) + poor.bytes_for(70, 8), 8)
        (0, 30, 100)
    """
    if len(fmts) == 1:
        return (0, n) if fmts[0].bytes_for(n, d) <= budget else None
    start = edges[-1]
    fixed = sum(f.bytes_for(edges[i + 1] - edges[i], d) for i, f in enumerate(fmts[:-2]))

    def fits(cut: int) -> bool:
        return fixed + fmts[-2].bytes_for(cut - start, d) + fmts[-1].bytes_for(n - cut, d) <= budget

    lo, hi = start + 1, n - 1
    if lo > hi or not fits(lo):
        return None
    while lo < hi:  # the largest cut that fits: bytes grow with the cut (more rows in the richer format)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return (*edges, lo, n)


def candidate_plans(
    E: torch.Tensor,
    counts: torch.Tensor,
    budget_bytes: float,
    *,
    formats: Sequence[FormatChoice] | None = None,
    alphas: Sequence[float] = ALPHAS,
    cuts: Sequence[float] = MASS_CUTS,
    max_tiers: int = MAX_TIERS,
    per_alpha: int = 2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    hessian: torch.Tensor | None = None,
) -> tuple[list[Plan], dict[FormatChoice, Any]]:
    """Distinct plans that fit the budget, best by the proxy under each alpha, and the fitted formats.

    Each format is fitted once to the whole table (codebooks with weights at the middle alpha); the same row errors
    serve every alpha. Returns (plans, fits) where fits maps each format to its Factors. ``hessian`` (a tied head's
    H): formats round in its metric, and row errors are measured in it.

    Raises:
        ConfigError: no plan fits the budget (the message gives the smallest size the formats reach).
    """
    n, d = E.shape
    formats = list(formats or default_formats(d))
    order = token_order(counts)
    bounds = mass_boundaries(counts, order, cuts)
    w_fit = weights_for(counts, sorted(alphas)[len(alphas) // 2])
    smallest = min(f.bytes_for(n, d) for f in formats)
    if smallest > budget_bytes:
        raise ConfigError(
            f"no plan fits {budget_bytes:,.0f} bytes: the smallest candidate format takes {smallest:,} bytes "
            f"({n * d * 4 / smallest:.1f}x fewer than fp32); ask for a smaller ratio"
        )
    # formats that no plan can use are not fitted: a tier in a format needs at least its codebook's bytes
    formats = [f for f in formats if f.bytes_for(1, d) <= budget_bytes]
    fits, errors = _proxy_fits(E, formats, w_fit, order, seed=seed, hessian=hessian, budget_bytes=budget_bytes,
                               progress=progress)
    ranked: list[list[Plan]] = []
    seen: set = set()
    for a in alphas:
        mine: list[Plan] = []
        for p in search_plans(errors, weights_for(counts, a), order, bounds, budget_bytes, d, max_tiers=max_tiers,
                              top=per_alpha * 4):
            if p.key() in seen:
                continue
            seen.add(p.key())
            p.alpha = a
            mine.append(p)
            if len(mine) >= per_alpha:
                break
        ranked.append(mine)
    # best plan of every alpha first, then the second of each: a check of the first few covers every weighting
    plans = [p for i in range(per_alpha) for mine in ranked for p in mine[i:i + 1]]
    total = float(counts.sum()) or 1.0
    for p in plans:
        for t in p.tiers:
            t.mass = float(counts.double()[order[t.start:t.stop]].sum()) / total
    return plans, fits


def weights_for(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Token weights (count + 1)^alpha, mean 1 (float64)."""
    from embfactor.data.frequency import weights_from_counts

    return weights_from_counts(counts, power=alpha)


def assemble(E: torch.Tensor, plan: Plan, order: torch.Tensor, fits: dict[FormatChoice, Any]) -> torch.Tensor:
    """The table a plan stores, read from the whole-table fits (what the check scores)."""
    out = torch.empty_like(E)
    for t in plan.tiers:
        _read_rows(fits[t.fmt], order[t.start:t.stop], out)
    return out


def _read_rows(factors: Any, ids: torch.Tensor, out: torch.Tensor, block: int = 16384) -> None:
    # out[ids] = the fit's rows at ``ids``, a block at a time (never a copy of a whole tier's rows), read directly
    # where the fit can (``take``: no range of the table decoded around them), else from the contiguous row range
    # that covers each block (the Factors API)
    for chunk in ids.split(block):
        if hasattr(factors, "take"):
            out[chunk] = factors.take(chunk).to(out.dtype)
        else:
            lo, hi = int(chunk.min()), int(chunk.max()) + 1
            out[chunk] = factors.rows(lo, hi)[chunk - lo].to(out.dtype)


def build_plan(E: torch.Tensor, plan: Plan, order: torch.Tensor, counts: torch.Tensor, *,
               padding_idx: int | None = None, seed: int = 0, hessian: torch.Tensor | None = None,
               fits: dict[FormatChoice, Any] | None = None):
    """The ``tiered`` RowFormat of ``plan``: each tier's rows fitted in its format (codebooks on its rows);
    ``hessian``: in a tied head's metric (:func:`fit_rows`).

    ``fits``: the proxy's fits of ``E`` in the same metric (:func:`candidate_plans`): a row-wise tier (int-k) takes
    the rounding they already hold, bit for bit what fitting its rows again gives. Codebook tiers are trained anew
    on their own rows at the plan's alpha and with the full k-means (the proxy's were trained on the whole table
    with a quarter of it), so their codes cannot be reused.
    """
    from embfactor.formats.base import from_factors, get_format

    children = []
    w = weights_for(counts, plan.alpha)
    position = torch.empty_like(order)
    for t in plan.tiers:
        ids = order[t.start:t.stop].sort().values  # id order inside a tier: the tiered format then stores 1 B/token
        position[ids] = torch.arange(t.start, t.stop)
        kept = (fits or {}).get(t.fmt)
        if isinstance(kept, RowwiseFit) and kept.E is E and kept.hessian is hessian:
            f = kept.factors(ids)
        else:
            f = fit_rows(E[ids].contiguous(), t.fmt, w[ids], seed, hessian=hessian)
        children.append(from_factors(f))
    if len(children) == 1:
        one = children[0]
        one.padding_idx = padding_idx
        return one
    from embfactor.formats.tiered import index_bits

    return get_format("tiered")(children, position, padding_idx=padding_idx, zero_padding=False, compact_index=True,
                                index_bits=index_bits(len(children)))
