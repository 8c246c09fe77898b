"""What a byte target picked for one method (pq, rvq, int), and the finer setting it narrowly missed.

A size target picks the setting with the most bytes that fit; a setting a hair over the budget is refused, which is
defensible but invisible: ``--method pq --size 15x`` on MiniLM stores sub_dim 5 (18.4x) because sub_dim 4 takes
14.99x. The report says which setting was picked, the bytes it reached and, when a finer one missed by at most
``NEAR``, which flag gets it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

NEAR = 0.05  # a finer setting at most 5% over the budget "missed narrowly"
# the options that fix each method's size: given instead of --size, they store exactly that setting
SIZE_KEYS = {"pq": ("sub_dim",), "rvq": ("sub_dim", "stages"), "int": ("bits", "group")}


def settings_for(method: str, vocab: int, d: int, options: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """The (bytes, settings) a size target chooses among for ``method`` with the user's ``options`` ([] if none)."""
    if method in ("pq", "rvq"):
        from embfactor.decomposition.codebook import codebook_settings

        fixed = {k: options[k] for k in ("rotation", "row_scale", "codebook_dtype")
                 if options.get(k) not in (None, False, "none")}
        return codebook_settings(vocab, d, method=method, K=options.get("K"), **fixed)
    if method == "int":
        from embfactor.decomposition.intk import int_settings

        fixed = {"symmetric": options.get("symmetric", True)}
        if options.get("group", "auto") != "auto":
            fixed["group"] = options["group"]
        return int_settings(vocab, d, **fixed)
    return []


def size_choice(method: str, vocab: int, d: int, budget: float, picked: Mapping[str, Any], nbytes: int,
                options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The setting a byte ``budget`` picked (``picked``: the stored format's config, ``nbytes``: its bytes), and
    the finer setting over the budget by at most :data:`NEAR`, with the flags that get it; None for methods that
    pick no setting.

    Example:
        >>> c = size_choice("pq", 30522, 384, 30522 * 384 * 4 / 15, {"sub_dim": 5, "K": 256, "stages": 1}, 2547314)
        >>> c["finer"]["settings"], c["finer"]["flags"]
        ({'sub_dim': 4}, ['--size 14.99x', '--method-option sub_dim=4'])
    """
    settings = settings_for(method, vocab, d, options or {})
    if not settings:
        return None
    fp32 = 4 * vocab * d
    keys = list(settings[0][1])
    chosen = {k: picked.get(k) for k in keys}
    out: dict[str, Any] = {"method": method, "settings": chosen, "bytes": int(nbytes), "ratio": fp32 / nbytes,
                           "budget_bytes": float(budget), "budget_ratio": fp32 / budget}
    # finer = preferred before the picked one (codebooks take the first that fits) or more bytes (int-k takes the most)
    ahead = next((i for i, (_, s) in enumerate(settings) if s == chosen), len(settings))
    over = [(b, s) for b, s in (settings[:ahead] if method != "int" else settings)
            if max(budget, nbytes) < b <= budget * (1 + NEAR)]
    if over:
        b, s = min(over, key=lambda c: (c[0], -c[1].get("bits", 0)))  # equal bytes: more bits, as plan_int
        differ = {k: v for k, v in s.items() if v != chosen.get(k) or k in SIZE_KEYS[method]}
        ratio = math.floor(fp32 / b * 100) / 100  # a --size this many x allows its bytes
        out["finer"] = {
            "settings": differ, "bytes": b, "ratio": fp32 / b, "over": b / budget - 1,
            "flags": [f"--size {ratio:g}x",
                      " ".join(f"--method-option {k}={'none' if v is None else v}" for k, v in differ.items())],
        }
    return out


def describe_choice(c: dict[str, Any]) -> str:
    """The choice in words, for the compress report.

    Example:
        >>> c = size_choice("pq", 30522, 384, 30522 * 384 * 4 / 15, {"sub_dim": 5, "K": 256, "stages": 1}, 2547314)
        >>> print(describe_choice(c))
        size target 15x (3,125,453 bytes): pq picked sub_dim=5, K=256, stages=1, 2,547,314 bytes (18.40x fewer than fp32); sub_dim=4 takes 3,126,720 bytes (14.99x), 0.04% over the budget: --size 14.99x, or --method-option sub_dim=4 instead of --size, gets it
    """  # noqa: E501
    picked = ", ".join(f"{k}={v}" for k, v in c["settings"].items())
    text = (f"size target {c['budget_ratio']:.4g}x ({c['budget_bytes']:,.0f} bytes): {c['method']} picked {picked}, "
            f"{c['bytes']:,} bytes ({c['ratio']:.2f}x fewer than fp32)")
    f = c.get("finer")
    if f:
        finer = ", ".join(f"{k}={v}" for k, v in f["settings"].items())
        text += (f"; {finer} takes {f['bytes']:,} bytes ({f['ratio']:.2f}x), {100 * f['over']:.2f}% over the budget: "
                 f"{f['flags'][0]}, or {f['flags'][1]} instead of --size, gets it")
    return text


__all__ = ["NEAR", "describe_choice", "settings_for", "size_choice"]
