"""Compressed folders load where models are usually loaded: transformers' ``from_pretrained`` and sentence-transformers.

The mechanism is transformers' own extension point for weight formats, the one bitsandbytes, torchao, GPTQ and AQLM
use: ``config.json`` of a compressed folder holds a ``quantization_config`` with ``quant_method: "embfactor"`` that
names the storage format of the embedding (``format`` + ``format_config``), the module names and whether the head is
tied; embfactor registers a config class and an ``HfQuantizer`` for that method, whose hook swaps the embedding (and
the tied head) for the format's module on the meta device before transformers loads the weights into it. No remote
code runs, and ``save_pretrained`` writes the same ``quantization_config`` back.

Registration happens on ``import embfactor`` without importing transformers (that would cost ~1 s): a post-import
hook registers the classes the moment ``transformers.quantizers.auto`` is imported, or at once if it already is.

Example:
    >>> import embfactor                                             # doctest: +SKIP
    >>> from transformers import AutoModel
    >>> model = AutoModel.from_pretrained("out/minilm-r6")           # doctest: +SKIP
"""

from __future__ import annotations

from embfactor.hf.hook import QUANT_METHOD, install_registration_hook, register

__all__ = ["QUANT_METHOD", "install_registration_hook", "register"]
