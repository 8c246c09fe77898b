"""Registry of embedding layer types, so a saved model names its layer and load rebuilds it.

A registered layer class provides:
  - attributes ``num_embeddings``, ``embedding_dim``, ``padding_idx`` and property ``num_params``;
  - ``layer_config() -> dict``: JSON-serializable constructor settings beyond (vocab, d, padding_idx);
  - classmethod ``empty(num_embeddings, embedding_dim, padding_idx, **layer_config)``: an instance with the
    right parameter shapes (values to be filled by ``load_state_dict``);
  - ``project(hidden) -> logits``: hidden (..., d) times the table's transpose, for a tied output head.
"""

from __future__ import annotations

from torch import nn

from embfactor.errors import ConfigError, UnknownMethodError

_LAYERS: dict[str, type[nn.Module]] = {}


def register_layer(name: str):
    """Class decorator: register an embedding layer type under ``name`` (stored as ``cls.layer_type``)."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _LAYERS and _LAYERS[name] is not cls:
            raise ValueError(f"an embedding layer type named {name!r} is already registered")
        cls.layer_type = name
        _LAYERS[name] = cls
        return cls

    return wrap


def get_layer(name: str) -> type[nn.Module]:
    import embfactor.layers  # noqa: F401 - registers the built-in layer types

    try:
        return _LAYERS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown embedding layer type {name!r}; valid types: {', '.join(sorted(_LAYERS))}"
        ) from None


def is_factorized_layer(module: nn.Module) -> bool:
    """True for any registered embfactor embedding layer."""
    return type(module) in _LAYERS.values()


def available_layers() -> list[str]:
    import embfactor.layers  # noqa: F401

    return sorted(_LAYERS)


def check_layer_args(num_embeddings: int, embedding_dim: int, padding_idx: int | None, **sizes: int) -> int | None:
    """Validate the arguments every embedding layer shares; return padding_idx normalized to [0, vocab).

    ``sizes`` are further arguments that must be positive integers (e.g. ``rank=16``).
    """
    for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim), *sizes.items()):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ConfigError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings
