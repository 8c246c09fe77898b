"""The real text embfactor evaluates and heals on, from gensim's bundled test data, and user files.

- Wikipedia extract (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``): cleaned to plain
  text with gensim's own wiki markup filter; the last 10% of articles (by file order) are held apart for evaluation.
- Lee corpus: 50 news documents (``lee.cor``) with the mean human similarity judgements (``similarities0-1.txt``),
  and the 300 background documents (``lee_background.cor``).
- Pang & Lee polarity: 200 sentences labelled ``__label__pos`` / ``__label__neg`` (``pang_lee_polarity.cor``).
- Newsgroup posts (``mini_newsgroup``): 200 Usenet posts of 1993 (alt.atheism, sci.space, ...), text from outside
  the calibration domain (e-mail style, quotations, addresses); :func:`newsgroup_posts`.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embfactor.errors import InvalidInputError, ModelNotFoundError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELDOUT_SHARE = 0.1
MIN_ARTICLE_CHARS = 400


def gensim_data_dir() -> Path:
    """gensim's ``test/test_data`` folder (gensim is a dependency of the ``data`` extra)."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise ModelNotFoundError("the bundled data sets need gensim: pip install 'embfactor[data]'") from None
    return Path(datapath(WIKI_FILE)).parent


def _data_file(name: str) -> Path:
    p = gensim_data_dir() / name
    if not p.is_file():
        raise ModelNotFoundError(f"{p} is missing from gensim's test data; reinstall gensim")
    return p


_WS = re.compile(r"[ \t]+")


def _clean(text: str) -> str:
    lines = []
    for line in text.splitlines():
        line = _WS.sub(" ", line.replace("'''", "").replace("''", "")).strip()
        # leftovers of tables, lists of links and section markers carry no prose
        if len(line) < 40 or line.startswith(("|", "!", "{", "}", "=", "*", "#", ":")):
            continue
        lines.append(line)
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _wiki_articles() -> tuple[str, ...]:
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.open(_data_file(WIKI_FILE), "rb") as fh:
        for _title, text, _pageid in extract_pages(fh):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            clean = _clean(filter_wiki(text))
            if len(clean) >= MIN_ARTICLE_CHARS:
                out.append(clean)
    return tuple(out)


def wiki_articles() -> list[str]:
    """All cleaned Wikipedia articles of the bundled extract (plain text, one string per article)."""
    return list(_wiki_articles())


def wiki_split(part: str = "train") -> list[str]:
    """``"train"``: the first 90% of articles; ``"heldout"``: the last 10%, never used for healing."""
    arts = _wiki_articles()
    cut = len(arts) - max(1, int(len(arts) * HELDOUT_SHARE))
    if part == "train":
        return list(arts[:cut])
    if part == "heldout":
        return list(arts[cut:])
    raise InvalidInputError(f"part must be 'train' or 'heldout', got {part!r}")


def lee_documents() -> list[str]:
    """The 50 Lee news documents, in the order of the similarity matrix."""
    docs = [line.strip() for line in _data_file("lee.cor").read_text(encoding="latin-1").splitlines() if line.strip()]
    return docs


def lee_similarity() -> np.ndarray:
    """The 50×50 symmetric matrix of mean human similarity scores (0..1) for the Lee documents."""
    rows = [
        [float(x) for x in line.split()]
        for line in _data_file("similarities0-1.txt").read_text().splitlines()
        if line.strip()
    ]
    m = np.asarray(rows, dtype=np.float64)
    upper = np.triu(m)
    return upper + upper.T - np.diag(np.diag(m))


def lee_background() -> list[str]:
    """The 300 Lee background news documents."""
    return [line.strip() for line in _data_file("lee_background.cor").read_text(encoding="latin-1").splitlines() if line.strip()]


def polarity() -> tuple[list[str], list[int]]:
    """The 200 Pang & Lee sentences with labels (1 = positive, 0 = negative)."""
    texts, labels = [], []
    for line in _data_file("pang_lee_polarity.cor").read_text(encoding="cp1252", errors="replace").splitlines():
        if not line.strip():
            continue
        tag, _, text = line.partition(" ")
        if tag not in ("__label__pos", "__label__neg"):
            continue
        texts.append(text.strip())
        labels.append(1 if tag == "__label__pos" else 0)
    return texts, labels


NEWSGROUP_CHARS = 600  # of each post's body: a passage of a few sentences, like the held-out Wikipedia passages


@functools.lru_cache(maxsize=1)
def _newsgroup_bodies() -> tuple[str, ...]:
    import zlib

    # the file is a zlib-compressed protocol-0 pickle of a scikit-learn Bunch; its posts are the lines "V..." or
    # "aV..." (unicode strings in raw-unicode-escape). They are read as text, without unpickling (no code runs).
    raw = zlib.decompress(_data_file("mini_newsgroup").read_bytes())
    posts = [line.split(b"V", 1)[1].decode("raw_unicode_escape") for line in raw.split(b"\n")
             if line.startswith((b"V", b"aV"))]
    bodies = []
    for post in posts:
        _, _, body = post.partition("\n\n")  # the headers end at the first blank line
        body = " ".join(body.split())
        if len(body) >= 200:
            bodies.append(body)
    return tuple(bodies)


def newsgroup_posts(n: int = 100, chars: int = NEWSGROUP_CHARS) -> list[str]:
    """``n`` newsgroup post bodies (every other post of the file), each cut to ``chars`` characters at a word end.

    Text from another domain than the Wikipedia calibration text: quoted replies (``>``), e-mail addresses, informal
    writing. ``evaluate --task similarity`` reports fidelity on it as ``fidelity_other``.

    Example:
        >>> len(newsgroup_posts(10)), max(len(t) for t in newsgroup_posts(10)) <= 600      # doctest: +SKIP
        (10, True)
    """
    bodies = _newsgroup_bodies()
    picked = list(bodies[::2]) + list(bodies[1::2])
    return [b if len(b) <= chars else b[:chars].rsplit(" ", 1)[0] for b in picked[:n]]


def read_texts(paths: list[str | Path]) -> list[str]:
    """User text files: every non-empty paragraph (blank-line separated) of each file is one text.

    Raises:
        InvalidInputError: a missing file, or no text at all.
    """
    out: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise InvalidInputError(f"text file {p} does not exist")
        try:
            content = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"text file {p} is not UTF-8 text") from None
        out.extend(par.strip() for par in re.split(r"\n\s*\n", content) if par.strip())
    if not out:
        raise InvalidInputError(f"no text found in {', '.join(map(str, paths))}")
    return out


def read_labelled(path: str | Path) -> tuple[list[str], list[str]]:
    """A user's labelled data: CSV with a header (columns ``text`` and ``label``) or JSONL with those keys.

    Raises:
        InvalidInputError: missing file, missing column, empty rows, or fewer than two classes.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"labels file {p} does not exist")
    raw = p.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InvalidInputError(
            f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); the labels file must be a "
            "UTF-8 CSV with columns text,label or JSONL with keys text and label"
        ) from None
    if "\x00" in content:
        line = content[: content.index("\x00")].count("\n") + 1
        raise InvalidInputError(f"{p}:{line}: holds NUL bytes: a binary file, not a CSV or JSONL labels file")
    texts, labels = [], []
    if p.suffix.lower() in (".jsonl", ".json"):
        for i, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "text" not in row or "label" not in row:
                raise InvalidInputError(f"{p}:{i}: each line needs the keys 'text' and 'label'")
            texts.append(str(row["text"]))
            labels.append(str(row["label"]))
    else:
        reader = csv.DictReader(io.StringIO(content, newline=""), strict=True)
        try:
            cols = reader.fieldnames or []
        except csv.Error as e:
            raise InvalidInputError(f"{p}:1: not a valid CSV header ({e})") from None
        for col in ("text", "label"):
            if col not in cols:
                raise InvalidInputError(f"{p}: no '{col}' column (found columns: {', '.join(cols) or 'none'})")
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                hint = " (a quote opened here is never closed)" if "end of data" in str(e) or "EOF" in str(e) else ""
                raise InvalidInputError(f"{p}:{start}: not valid CSV: {e}{hint}") from None
            if None in row or None in row.values():
                raise InvalidInputError(
                    f"{p}:{start}: {len(cols)} columns expected ({', '.join(cols)}), the row has a different number"
                    " (a text with a comma needs quotes)"
                )
            if row["text"] and row["label"] not in (None, ""):
                texts.append(row["text"])
                labels.append(row["label"])
            start = reader.line_num + 1
    if not texts:
        raise InvalidInputError(f"{p}: no labelled rows")
    if len(set(labels)) < 2:
        raise InvalidInputError(f"{p}: needs at least two different labels, found {sorted(set(labels))}")
    return texts, labels


def spread(items: Sequence[str], n: int) -> list[str]:
    """At most ``n`` items taken evenly across ``items`` (calibration text from the whole corpus, not its start)."""
    return list(items[:: max(1, len(items) // n)])[:n]


def calibration_passages(n: int = 64, sentences: int = 3, articles: Sequence[str] | None = None) -> list[str]:
    """Passages of up to ``sentences`` sentences from the first line of ``n`` articles spread over ``articles``
    (default: the *training* part of the bundled Wikipedia extract; the held-out part stays for evaluation)."""
    split = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
    out: list[str] = []
    arts = list(articles) if articles is not None else wiki_split("train")
    for article in spread(arts, n) if len(arts) > n else arts:
        sents = [s.strip() for s in split.split(article.strip().splitlines()[0]) if s.strip()]
        if sents:
            out.append(" ".join(sents[:sentences]))
    return out
