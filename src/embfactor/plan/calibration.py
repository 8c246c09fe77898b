"""Calibration text of the planner: the split that holds text apart from the token counts, passages to score on."""

from __future__ import annotations

from collections.abc import Sequence

from embfactor.data.corpora import calibration_passages, spread  # noqa: F401 - the plan reads its text through these

CHECK_EVERY = 5  # one calibration text in five is held apart from the token counts for the check


def calibration_split(texts: Sequence[str], every: int = CHECK_EVERY) -> tuple[list[str], list[str]]:
    """(texts to count tokens on, texts to check plans on): every ``every``-th text is held apart.

    Checking plans on the very text whose counts ordered the tokens rewards starving every token that text happens
    to lack: on MiniLM at 16x the check then preferred a plan with a 12-column PQ tail (calibration score 0.9935 vs
    0.9922) that held-out text scored 0.981 vs 0.987. Held-apart text contains tokens the counts missed, as real
    input does. With fewer than ``2 * every`` texts the split is by non-empty lines; one line is both.

    Example:
        >>> calibration_split([f"t{i}" for i in range(10)])
        (['t1', 't2', 't3', 't4', 't6', 't7', 't8', 't9'], ['t0', 't5'])
    """
    items = [t for t in texts if t.strip()]
    if len(items) < 2 * every:
        items = [line for t in items for line in t.splitlines() if line.strip()]
    if len(items) < 2:
        return items, items
    every = min(every, len(items))
    return [t for i, t in enumerate(items) if i % every], items[::every]


def _train_text() -> list[str]:
    from embfactor.data import wiki_split

    return spread(wiki_split("train"), 16)


# below this share of the table's rows reached by the calibration text, compress says so and how to fix it: English
# text reaches 50-60% of MiniLM's and SmolLM2's rows but 7% of multilingual-e5-small's (250k rows), whose other
# languages then sit in the coarsest tiers (32x: 16-language fidelity 0.9833; with --text in those languages 0.9931)
LOW_REACH = 0.25


def calibration_reach(counts) -> dict:
    """How many table rows the counted calibration text reaches, and a note when that is a small share.

    Example:
        >>> import torch
        >>> calibration_reach(torch.tensor([3., 0., 0., 0., 0.]))["note"][:38]
        'the calibration text reaches 1 of 5 ro'
        >>> calibration_reach(torch.tensor([3., 1., 2., 0.]))
        {'rows_reached': 3, 'rows': 4}
    """
    reached, rows = int((counts > 0).sum()), int(counts.numel())
    out = {"rows_reached": reached, "rows": rows}
    if reached < LOW_REACH * rows:
        share = 100 * reached / max(rows, 1)
        out["note"] = (f"the calibration text reaches {reached:,} of {rows:,} rows ({share:.0f}%); the others are "
                       "stored in the coarsest tiers: give --text with (more) text in the languages and domains the "
                       "model will read")
    return out
