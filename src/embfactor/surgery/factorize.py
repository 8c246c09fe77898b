"""factorize_: replace a model's input embedding (and the output head tied to it) by shared factors."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from embfactor.config import FactorizationConfig
from embfactor.decomposition import (
    budget_bytes, decompose, explicit_size_rank, get_method, max_rank, optimal_relative_error,
    rank_for_bytes, resolve_rank, spectrum, takes_budget,
)
from embfactor.errors import InvalidTypeError, SurgeryError
from embfactor.formats import from_factors, is_row_format
from embfactor.surgery.conform import table_readers
from embfactor.surgery.integration import attach_quantization_config
from embfactor.surgery.meta import CompressionMeta, set_meta
from embfactor.surgery.replace import apply_structure_, fqn_of



@dataclass
class FactorizationReport:
    """What factorize_ did, with the numbers a user judges it by."""

    model: str
    method: str
    rank: int
    vocab_size: int
    hidden_size: int
    embedding_params_before: int
    embedding_params_after: int
    model_params_before: int
    model_params_after: int
    ratio: float
    relative_error: float
    optimal_relative_error: float
    tied_head: bool
    seconds: float
    embedding_module: str = ""
    head_module: str | None = None
    embedding_bytes_before: int = 0  # the dense table at the model's dtype
    embedding_bytes_after: int = 0  # what the format stores (codes, codebooks, scales: all of it)
    bytes_ratio: float = 0.0  # fp32 bytes of the table / embedding_bytes_after
    head_bytes_after: int = 0  # an untied head's own bytes (a tied head shares the embedding's: 0)
    format: str = ""
    format_config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    """Parameters of a model, each shared tensor counted once; an integer Linear's weight counts as its in × out."""
    from embfactor.layers.intk_linear import IntKLinear

    ints = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, IntKLinear))
    return sum(p.numel() for p in model.parameters()) + ints


@dataclass(frozen=True)
class EmbeddingSite:
    """Where a model's input embedding and output head are, and whether the head shares the embedding's weight."""

    embedding_module: str
    embedding: nn.Embedding
    head_module: str | None
    head: nn.Module | None
    tied: bool


def find_embedding_and_head(model: nn.Module, module_name: str | None = None) -> EmbeddingSite:
    """Locate the (dense) input embedding and the output head; tell whether the head is tied (same weight tensor).

    Example:
        >>> site = find_embedding_and_head(model)          # doctest: +SKIP
        >>> site.embedding_module, site.tied               # doctest: +SKIP
        ('transformer.wte', True)
    """
    if module_name is not None:
        try:
            emb = model.get_submodule(module_name)
        except AttributeError:
            raise SurgeryError(f"{type(model).__name__} has no submodule {module_name!r}") from None
    elif hasattr(model, "get_input_embeddings"):
        try:
            emb = model.get_input_embeddings()
        except NotImplementedError:
            emb = None
        if emb is None:
            raise SurgeryError(f"{type(model).__name__}.get_input_embeddings() returned nothing")
    else:
        raise SurgeryError(
            f"{type(model).__name__} has no get_input_embeddings(); pass module_name= (e.g. 'embed') to say which "
            "nn.Embedding to factorize"
        )
    if is_row_format(emb):
        raise SurgeryError(
            f"the input embedding of {type(model).__name__} is already factorized ({type(emb).__name__})"
        )
    if not isinstance(emb, nn.Embedding):
        raise SurgeryError(f"the input embedding is a {type(emb).__name__}, not an nn.Embedding; cannot factorize it")
    emb_fqn = fqn_of(model, emb)
    head = None
    if hasattr(model, "get_output_embeddings"):
        try:
            head = model.get_output_embeddings()
        except NotImplementedError:
            head = None
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    head_fqn = fqn_of(model, head) if head is not None else None
    return EmbeddingSite(emb_fqn, emb, head_fqn, head, tied)


def as_module(model: Any, caller: str) -> nn.Module:
    """The nn.Module to work on: ``model`` itself, or the ``.model`` of what :func:`embfactor.load_model` returns.

    Example:
        >>> lm = load_model("minilm"); as_module(lm, "factorize_") is lm.model   # doctest: +SKIP
        True
    """
    # a LoadedModel is recognised by its shape, not imported: models.py sits above surgery (it loads through it)
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        return model.model
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(
            f"{caller} needs a torch nn.Module, got {type(model).__name__} (or pass what embfactor.load_model returns)"
        )
    return model


def factorize_(
    model: nn.Module | Any,
    config: FactorizationConfig | None = None,
    *,
    rank: int | None = None,
    ratio: float | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    method: str | None = None,
    seed: int = 0,
    module_name: str | None = None,
    progress: bool = False,
    token_weights: torch.Tensor | None = None,
    **method_options: Any,
) -> FactorizationReport:
    """Factorize a model's input embedding in place; a tied output head shares the same factors.

    Everything is validated and the factors computed before the model is touched: on any error the model
    is unchanged.

    Args:
        model: a Hugging Face model (or any nn.Module with ``get_input_embeddings()``; else give ``module_name``),
            or what :func:`embfactor.load_model` returns (its model is factorized).
        config: a FactorizationConfig; or give its fields as keyword arguments.
        module_name: fully qualified name of the nn.Embedding, for models without get_input_embeddings().
        progress: progress bars for iterative methods.
        token_weights: per-token importance (one weight per embedding row) for data-aware methods (``wsvd``,
            ``block``); see :func:`embfactor.data.frequency.token_weights`. Not stored in the config.

    Returns:
        A FactorizationReport (sizes, errors, the optimum for the rank, time).

    Example:
        >>> report = factorize_(model, ratio=6, method="svd")     # doctest: +SKIP
        >>> report.rank, report.relative_error                    # doctest: +SKIP
    """
    t0 = time.perf_counter()
    model = as_module(model, "factorize_")
    if config is None:
        config = FactorizationConfig(
            method=method, rank=rank, ratio=ratio, energy=energy, max_error=max_error, seed=seed,
            method_options=dict(method_options),
        )
    elif any(v is not None for v in (rank, ratio, energy, max_error, method)) or method_options:
        raise SurgeryError("give either config= or keyword settings, not both")
    site = find_embedding_and_head(model, module_name)
    emb_fqn, emb, head_fqn = site.embedding_module, site.embedding, site.head_module
    tie = site.tied and config.factorize_head
    readers = table_readers(model, emb, emb_fqn, site.head)  # refuses what a format cannot reproduce, before any work
    params_before = count_params(model)
    E = emb.weight.detach()
    sv = spectrum(E)
    r, fixed, data_opts = _rank_and_options(E, config, sv)
    if config.method is not None and get_method(config.method).data_aware:
        data_opts["token_weights"] = token_weights  # the method explains how to pass them when None
    f = decompose(
        E, None if fixed else r, method=config.method, seed=config.seed, progress=progress, **config.method_options,
        **data_opts,
    )
    pad = emb.padding_idx
    pad_is_zero = pad is None or not bool(E[pad].any())
    # --- the model is mutated only below this line ---
    # copy=False: f is this call's own temporary, so the layer adopts its U (one vocab × r block less at the peak)
    new = from_factors(f, pad, sparse=emb.sparse, zero_padding_row=pad_is_zero, copy=False).to(emb.weight.device)
    apply_structure_(model, embedding_module=emb_fqn, new_embedding=new, tied_head=tie, head_module=head_fqn,
                     embed_scale=readers.embed_scale, shared_modules=readers.shared)
    del E
    report = _factorization_report(
        model, site, new, f, rank=r, tie=tie, params_before=params_before,
        optimal_error=optimal_relative_error(sv, r), seconds=time.perf_counter() - t0,
    )
    set_meta(model, CompressionMeta(
        embedding_module=emb_fqn, head_module=head_fqn if tie else None, tied_head=tie, rank=r, method=f.method,
        factorization=config.to_dict(), report=report.to_dict(), embed_scale=readers.embed_scale,
        shared_modules=readers.shared,
    ))
    attach_quantization_config(model)  # so that model.save_pretrained writes a folder from_pretrained rebuilds
    return report


def _rank_and_options(
    E: torch.Tensor, config: FactorizationConfig, sv: torch.Tensor
) -> tuple[int, bool, dict[str, Any]]:
    """(rank to record, whether the method options fix the stored size, extra decompose options) for ``config``."""
    data_opts: dict[str, Any] = {}
    fixed = config.method is not None and get_method(config.method).fixes_size(config.method_options)
    if fixed:
        # the method options fix the stored size (int's bits=, pq's sub_dim=, ...): a target given with them is a
        # byte budget they must fit, checked here where it is named as the user gave it; the recorded rank is the
        # target's, or the equal-budget rank of the options' bytes. decompose gets no target: nothing to resolve
        r = explicit_size_rank(tuple(E.shape), config.method, config.method_options, rank=config.rank,
                               ratio=config.ratio, energy=config.energy, max_error=config.max_error, size=config.size)
    elif config.size is not None:
        # a byte target: methods that choose their own settings get the budget; U·V methods get the largest
        # rank whose fp32 factors fit it (rank_for_bytes explains when none does)
        budget = budget_bytes(config.size, *E.shape)
        if config.method is not None and takes_budget(config.method):
            data_opts["budget_bytes"] = budget
            r = max(1, min(int(budget // (4 * sum(E.shape))), max_rank(*E.shape)))
        else:
            r = rank_for_bytes(*E.shape, budget)
    else:
        r = resolve_rank(
            tuple(E.shape), rank=config.rank, ratio=config.ratio, energy=config.energy,
            max_error=config.max_error, singular_values=sv,
        )
    return r, fixed, data_opts


def _factorization_report(model: nn.Module, site: EmbeddingSite, new: nn.Module, f: Any, *, rank: int, tie: bool,
                          params_before: int, optimal_error: float, seconds: float) -> FactorizationReport:
    """The report of :func:`factorize_` once ``new`` (built from the factors ``f``) has replaced ``site``."""
    emb, head = site.embedding, site.head
    return FactorizationReport(
        model=type(model).__name__,
        method=f.method,
        rank=rank,
        vocab_size=emb.num_embeddings,
        hidden_size=emb.embedding_dim,
        embedding_params_before=emb.weight.numel(),
        embedding_params_after=new.num_params,
        model_params_before=params_before,
        model_params_after=count_params(model),
        ratio=emb.weight.numel() / new.num_params,
        relative_error=float(f.meta["relative_error"]),
        optimal_relative_error=optimal_error,
        embedding_bytes_before=emb.weight.numel() * emb.weight.element_size(),
        embedding_bytes_after=new.num_bytes(),
        bytes_ratio=emb.weight.numel() * 4 / new.num_bytes(),
        head_bytes_after=0 if tie or head is None else sum(
            t.numel() * t.element_size() for t in (*head.parameters(), *head.buffers())
        ),
        format=new.format_name,
        format_config=new.format_config(),
        tied_head=tie,
        seconds=seconds,
        embedding_module=site.embedding_module,
        head_module=site.head_module if tie else None,
    )


def install_format_(
    model: nn.Module,
    new_embedding: nn.Module,
    *,
    module_name: str | None = None,
    tie_head: bool = True,
    method: str | None = None,
    rank: int = 1,
) -> CompressionMeta:
    """Put a ready storage format (e.g. a hand-built tiered one) in place of the model's embedding, with metadata.

    For formats no decomposition makes; :func:`factorize_` does the same for a decomposition's result. The model can
    then be saved and loaded like any compressed model. A tied head is replaced by a FactorizedLMHead on the format.

    Example:
        >>> install_format_(model, TieredFormat([...], position))     # doctest: +SKIP
    """
    if not is_row_format(new_embedding):
        raise InvalidTypeError(f"install_format_ needs a storage format (RowFormat), got {type(new_embedding).__name__}")
    site = find_embedding_and_head(model, module_name)
    tie = site.tied and tie_head
    readers = table_readers(model, site.embedding, site.embedding_module, site.head)
    meta = CompressionMeta(
        embedding_module=site.embedding_module, head_module=site.head_module if tie else None, tied_head=tie,
        rank=rank, method=method or new_embedding.format_name, factorization=FactorizationConfig(rank=rank).to_dict(),
        embed_scale=readers.embed_scale, shared_modules=readers.shared,
    )
    # --- the model is mutated only below this line ---
    apply_structure_(
        model, embedding_module=site.embedding_module, new_embedding=new_embedding, tied_head=tie,
        head_module=site.head_module, embed_scale=readers.embed_scale, shared_modules=readers.shared,
    )
    set_meta(model, meta)
    attach_quantization_config(model)
    return meta
