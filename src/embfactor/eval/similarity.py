"""Document similarity (encoders): Lee corpus correlation with human judgements, and fidelity to the original.

- Correlation: the 50 Lee news documents are embedded (mean-pooled, L2-normalized, max 256 tokens as
  sentence-transformers does for all-MiniLM-L6-v2); the cosine of every document pair (upper triangle, 1225 pairs)
  is compared with the mean human similarity score by Spearman and Pearson correlation.
- Fidelity (with a reference): the mean cosine between the embedding of each text by the model and by the
  reference, over the 50 Lee documents and the first ``FIDELITY_PASSAGES`` = 200 passages of ``PASSAGE_SENTENCES``
  = 3 sentences of the held-out Wikipedia articles (never used for healing).
- Fidelity on another domain (``fidelity_other``, with a reference): the same mean cosine over 100 newsgroup posts
  (:func:`embfactor.data.newsgroup_posts`): text unlike the Wikipedia calibration text reaches rows the token counts
  never saw. Reported beside ``fidelity``, which keeps its texts so that numbers stay comparable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from embfactor.errors import InvalidInputError
from embfactor.eval.embed import pooled_embeddings
from embfactor.eval.registry import register_task

FIDELITY_PASSAGES = 200
PASSAGE_SENTENCES = 3
MAX_LENGTH = 256

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def wiki_passages(n: int = FIDELITY_PASSAGES, sentences: int = PASSAGE_SENTENCES) -> list[str]:
    """The first ``n`` passages of ``sentences`` consecutive sentences of the held-out Wikipedia articles.

    Sentences are split at ``.``, ``!`` or ``?`` followed by a space and a capital, digit or quote; passages never
    span two articles or two lines (paragraphs).

    Example:
        >>> len(wiki_passages(10))          # doctest: +SKIP
        10
    """
    from embfactor.data import wiki_split

    out: list[str] = []
    for article in wiki_split("heldout"):
        for para in article.splitlines():
            sents = [s.strip() for s in _SENT.split(para) if s.strip()]
            for i in range(0, len(sents) - sentences + 1, sentences):
                out.append(" ".join(sents[i : i + sentences]))
                if len(out) >= n:
                    return out
    return out


def check_texts(texts: Sequence[str], what: str = "texts") -> list[str]:
    """Raise InvalidInputError for an empty list or an empty/blank text; return the texts as a list."""
    if isinstance(texts, str) or texts is None or not len(texts):
        raise InvalidInputError(f"{what} must be a non-empty list of strings")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str) or not t.strip():
            raise InvalidInputError(f"{what}[{i}] is empty or not a string ({t!r}); every text needs some words")
    return out


def correlations(predicted: np.ndarray, human: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson correlation of the upper-triangle (i < j) entries of two square similarity matrices.

    Example:
        >>> h = np.array([[1, .2, .9], [.2, 1, .1], [.9, .1, 1]])
        >>> correlations(h, h)["spearman"]
        1.0
    """
    from scipy.stats import pearsonr, spearmanr

    predicted, human = np.asarray(predicted, dtype=np.float64), np.asarray(human, dtype=np.float64)
    if predicted.shape != human.shape or predicted.ndim != 2 or predicted.shape[0] != predicted.shape[1]:
        raise InvalidInputError(
            f"similarity matrices must be square and of one shape, got {predicted.shape} and {human.shape}"
        )
    if predicted.shape[0] < 3:
        raise InvalidInputError(f"need at least 3 documents to correlate similarities, got {predicted.shape[0]}")
    iu = np.triu_indices(predicted.shape[0], k=1)
    a, b = predicted[iu], human[iu]
    return {
        "spearman": float(spearmanr(a, b).statistic),
        "pearson": float(pearsonr(a, b).statistic),
        "n_pairs": int(a.size),
    }


def _embed(lm, texts: list[str], *, batch_size: int, progress: bool, cache: dict | None, tag: str) -> torch.Tensor:
    # The reference's embeddings are the same at every point of a sweep; a caller may keep them in `cache`.
    key = (tag, id(lm.model), len(texts), hash(tuple(texts)))
    if cache is not None and key in cache:
        return cache[key]
    e = pooled_embeddings(lm, texts, batch_size=batch_size, max_length=MAX_LENGTH, progress=progress)
    if cache is not None:
        cache[key] = e
    return e


@register_task(
    "similarity",
    kinds=("encoder",),
    description="Lee documents: Spearman/Pearson vs human scores; fidelity (mean cosine) vs the reference",
    metric="spearman",
)
def similarity(
    lm,
    *,
    reference=None,
    texts: Sequence[str] | None = None,
    human: np.ndarray | None = None,
    fidelity_texts: Sequence[str] | None = None,
    other_texts: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = False,
    cache: dict | None = None,
) -> dict[str, Any]:
    """Similarity correlation with human scores, and fidelity to ``reference``.

    Args:
        lm: the model (LoadedModel, encoder).
        reference: the original model; adds ``fidelity`` (mean cosine of each text's embeddings by both models).
        texts, human: documents and their (n × n) human similarity matrix; default the 50 Lee documents.
        fidelity_texts: extra texts for fidelity; default 200 held-out Wikipedia passages of 3 sentences.
        other_texts: texts from another domain, scored apart (``fidelity_other``); default 100 newsgroup posts;
            an empty list leaves them out.
        batch_size: texts per forward pass.
        progress: progress bars.
        cache: a dict kept by the caller to reuse the reference's embeddings across calls (sweeps).

    Returns:
        ``spearman``, ``pearson``, ``n_docs``, ``n_pairs``; with a reference also the reference's own
        ``reference_spearman`` and ``reference_pearson``, ``fidelity`` (over all texts), ``fidelity_docs``,
        ``fidelity_passages``, ``fidelity_min`` and ``n_fidelity_texts``, and ``fidelity_other``,
        ``fidelity_other_min``, ``n_other_texts`` on the other domain's texts.

    Example:
        >>> similarity(load_model("minilm"))["spearman"]            # doctest: +SKIP
    """
    from embfactor.data import lee_documents, lee_similarity

    if texts is None:
        texts, human = lee_documents(), lee_similarity() if human is None else human
    texts = check_texts(texts, "texts")
    if human is None:
        raise InvalidInputError("texts were given without their human similarity matrix (human=)")
    human = np.asarray(human, dtype=np.float64)
    if human.shape != (len(texts), len(texts)):
        raise InvalidInputError(f"human similarity matrix is {human.shape}, expected {(len(texts), len(texts))}")
    emb = _embed(lm, texts, batch_size=batch_size, progress=progress, cache=None, tag="model")
    predicted = (emb @ emb.T).double().numpy()
    out: dict[str, Any] = {"n_docs": len(texts), **correlations(predicted, human)}
    if reference is not None:
        extra = check_texts(wiki_passages() if fidelity_texts is None else fidelity_texts, "fidelity_texts")
        emb_extra = _embed(lm, extra, batch_size=batch_size, progress=progress, cache=None, tag="model")
        ref_docs = _embed(reference, texts, batch_size=batch_size, progress=progress, cache=cache, tag="ref")
        ref_extra = _embed(reference, extra, batch_size=batch_size, progress=progress, cache=cache, tag="ref")
        cos_docs = (emb * ref_docs).sum(-1).clamp(-1, 1)  # both L2-normalized: the dot product is the cosine
        cos_extra = (emb_extra * ref_extra).sum(-1).clamp(-1, 1)
        allcos = torch.cat([cos_docs, cos_extra])
        ref_corr = correlations((ref_docs @ ref_docs.T).double().numpy(), human)
        out.update(
            reference_spearman=ref_corr["spearman"],
            reference_pearson=ref_corr["pearson"],
            fidelity=float(allcos.mean()),
            fidelity_docs=float(cos_docs.mean()),
            fidelity_passages=float(cos_extra.mean()),
            fidelity_min=float(allcos.min()),
            n_fidelity_texts=int(allcos.numel()),
        )
        other = _other_domain() if other_texts is None else list(other_texts)
        if other:
            other = check_texts(other, "other_texts")
            emb_other = _embed(lm, other, batch_size=batch_size, progress=progress, cache=None, tag="model")
            ref_other = _embed(reference, other, batch_size=batch_size, progress=progress, cache=cache, tag="ref")
            cos_other = (emb_other * ref_other).sum(-1).clamp(-1, 1)
            out.update(fidelity_other=float(cos_other.mean()), fidelity_other_min=float(cos_other.min()),
                       n_other_texts=len(other))
    return out


def _other_domain() -> list[str]:
    from embfactor.data import newsgroup_posts

    return newsgroup_posts()
