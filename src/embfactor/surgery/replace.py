"""The one replacement primitive: swap submodules in place, all or nothing."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from embfactor.errors import SurgeryError
from embfactor.formats.base import EmbedScale
from embfactor.layers.head import FactorizedLMHead
from embfactor.layers.shared import SharedEmbedding


def find_modules(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool]) -> dict[str, nn.Module]:
    """All submodules (by fully qualified name) for which ``filter_fn(module, fqn)`` is true."""
    return {fqn: m for fqn, m in model.named_modules(remove_duplicate=False) if fqn and filter_fn(m, fqn)}


def fqn_of(model: nn.Module, target: nn.Module) -> str:
    """The first fully qualified name of ``target`` inside ``model``."""
    for fqn, m in model.named_modules():
        if m is target and fqn:
            return fqn
    raise SurgeryError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def replace_modules_(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Replace submodules by fully qualified name. Every name is checked before anything changes.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> replace_modules_(m, {"1": nn.Tanh()}); type(m[1]).__name__
        'Tanh'
    """
    if not replacements:
        raise SurgeryError("nothing to replace: no module matched")
    parents = {}
    for fqn in replacements:
        parent_name, _, child = fqn.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError as e:
            raise SurgeryError(f"cannot replace {fqn!r}: {e}") from None
        if not isinstance(getattr(parent, child, None), nn.Module):
            raise SurgeryError(f"cannot replace {fqn!r}: {type(parent).__name__} has no submodule {child!r}")
        parents[fqn] = (parent, child)
    for fqn, new in replacements.items():
        parent, child = parents[fqn]
        setattr(parent, child, new)


def _disable_hf_retying(model: nn.Module) -> None:
    # transformers re-ties `lm_head.weight = embed.weight` in tie_weights(); after surgery neither module has a
    # `weight` parameter, and the factors are already shared, so the model must not try again.
    for m in model.modules():
        if hasattr(m, "all_tied_weights_keys"):
            m.all_tied_weights_keys = {}


def apply_structure_(
    model: nn.Module,
    *,
    embedding_module: str,
    new_embedding: nn.Module,
    tied_head: bool,
    head_module: str | None,
    embed_scale: EmbedScale = None,
    shared_modules: dict[str, EmbedScale] | None = None,
) -> nn.Module:
    """Swap in a factorized embedding layer (and a FactorizedLMHead tied to it) at known module names.

    Args:
        embed_scale: what the replaced module multiplied its lookup by (:mod:`embfactor.surgery.conform`).
        shared_modules: other modules that held the same table (name -> their scale): each becomes a
            :class:`SharedEmbedding` reading ``new_embedding``.
    """
    emb = model.get_submodule(embedding_module)
    if not isinstance(emb, nn.Embedding):
        raise SurgeryError(f"{embedding_module!r} is a {type(emb).__name__}, expected nn.Embedding")
    if (new_embedding.num_embeddings, new_embedding.embedding_dim) != (emb.num_embeddings, emb.embedding_dim):
        raise SurgeryError(
            f"the new embedding is {new_embedding.num_embeddings}×{new_embedding.embedding_dim}, "
            f"but {embedding_module!r} is {emb.num_embeddings}×{emb.embedding_dim}"
        )
    replacements: dict[str, nn.Module] = {embedding_module: new_embedding}
    replacements.update(shared_views(shared_modules, new_embedding))
    if tied_head:
        if head_module is None:
            raise SurgeryError("tied_head=True needs the head's module name")
        head = model.get_submodule(head_module)
        replacements[head_module] = FactorizedLMHead(new_embedding, getattr(head, "bias", None))
    replace_modules_(model, replacements)
    new_embedding.embed_scale = embed_scale
    _disable_hf_retying(model)
    return new_embedding


def shared_views(names: dict[str, EmbedScale] | None, table: nn.Module) -> dict[str, nn.Module]:
    """Replacements that point the :class:`SharedEmbedding` modules at ``names`` to a new ``table`` (same scales)."""
    return {fqn: SharedEmbedding(table, scale) for fqn, scale in (names or {}).items()}
