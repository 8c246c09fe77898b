"""Model surgery on Hugging Face models: find, replace, tie, save and load."""

from embfactor.surgery.factorize import (
    EmbeddingSite,
    FactorizationReport,
    apply_structure_,
    count_params,
    factorize_,
    find_embedding_and_head,
    install_format_,
)
from embfactor.surgery.meta import META_ATTR, CompressionMeta, get_meta, set_meta
from embfactor.surgery.io import load, load_compressed, read_record, save, save_compressed
from embfactor.surgery.quantize import quantize_
from embfactor.surgery.replace import find_modules, fqn_of, replace_modules_

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
    "load",
    "load_compressed",
    "quantize_",
    "read_record",
    "replace_modules_",
    "save",
    "save_compressed",
    "set_meta",
]
