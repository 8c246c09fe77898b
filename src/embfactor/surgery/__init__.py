"""Model surgery on Hugging Face models: find, replace, tie, save and load."""

from embfactor.surgery.factorize import (
    EmbeddingSite,
    FactorizationReport,
    count_params,
    factorize_,
    find_embedding_and_head,
    install_format_,
)
from embfactor.surgery.meta import META_ATTR, CompressionMeta, get_meta, set_meta
from embfactor.surgery.io import load_compressed, read_record, save_compressed
from embfactor.surgery.quantize import quantize_
from embfactor.surgery.replace import apply_structure_, find_modules, fqn_of, replace_modules_

__all__ = [
    "META_ATTR",
    "CompressionMeta",
    "EmbeddingSite",
    "FactorizationReport",
    "apply_structure_",
    "count_params",
    "factorize_",
    "find_embedding_and_head",
    "find_modules",
    "get_meta",
    "install_format_",
    "fqn_of",
    "load_compressed",
    "quantize_",
    "read_record",
    "replace_modules_",
    "save_compressed",
    "set_meta",
]
