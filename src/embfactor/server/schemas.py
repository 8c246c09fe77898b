"""Request and response bodies of the REST API (pydantic), and the server's configurable limits.

Types are strict (a number is not a text, a string is not a number) and unknown fields are refused, so a client's
mistake is answered with a 422 that names the field instead of being silently coerced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from embfactor.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; everything above is answered with a 4xx, never computed.

    Args:
        max_texts: texts per /embed or /score request.
        max_tokens: tokens per text (and per /generate prompt), special tokens included; also capped by the
            model's maximum sequence length.
        max_new_tokens: cap of /generate's ``max_new_tokens``.
        max_text_chars: characters per text, checked before tokenizing so a huge text costs nothing.
        max_body_bytes: size of a request body (413 above it).
        max_temperature: cap of /generate's ``temperature``.
        max_pending: requests waiting for the model at once (429 "server busy" beyond).

    Example:
        >>> Limits(max_texts=8).max_tokens
        256
    """

    max_texts: int = 64
    max_tokens: int = 256
    max_new_tokens: int = 128
    max_text_chars: int = 20_000
    max_body_bytes: int = 2_000_000
    max_temperature: float = 5.0
    max_pending: int = 256

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_tokens", "max_new_tokens", "max_text_chars", "max_body_bytes", "max_pending"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.max_temperature, (int, float)) and self.max_temperature > 0):
            raise ConfigError(f"max_temperature must be > 0, got {self.max_temperature!r}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Strict):
    texts: Annotated[list[StrictStr], Field(min_length=1, description="non-empty list of texts")]
    normalize: StrictBool = Field(True, description="L2-normalize the embeddings (cosine = dot product)")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    tokens: list[int] = Field(description="tokens per text, special tokens included")


class GenerateRequest(_Strict):
    prompt: Annotated[StrictStr, Field(min_length=1)]
    max_new_tokens: Annotated[StrictInt | None, Field(ge=1, description="default: min(32, the server's cap)")] = None
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0)] = 0.0
    seed: StrictInt = Field(
        0, ge=0, le=2**64 - 1, description="seed of the sampler when temperature > 0 (same seed, same text)"
    )


class GenerateResponse(BaseModel):
    text: str = Field(description="the continuation only (without the prompt)")
    prompt_tokens: int
    new_tokens: int
    finish_reason: str = Field(description="'eos' (the model ended the text) or 'length' (max_new_tokens reached)")


class ScoreRequest(_Strict):
    texts: Annotated[list[StrictStr], Field(min_length=1)]


class TextScore(BaseModel):
    perplexity: float
    nll: float = Field(description="mean negative log-likelihood per predicted token (nats)")
    tokens: int = Field(description="tokens predicted (the first token of a text has no context)")


class ScoreResponse(BaseModel):
    scores: list[TextScore]
    perplexity: float = Field(description="token-weighted perplexity of all texts together")


class HealthResponse(BaseModel):
    status: str
    kind: str


class InfoResponse(BaseModel):
    model: str
    kind: str
    source: str
    compressed: bool
    vocab_size: int
    hidden_size: int
    rank: int | None
    method: str | None
    layer_type: str | None
    tied_head: bool
    relative_error: float | None
    params_before: int
    params_after: int
    embedding_params_before: int
    embedding_params_after: int
    bytes_before: int = Field(
        description="bytes of the source model's weights, as `compress` reported them (float32 size if unrecorded)"
    )
    bytes_after: int = Field(description="bytes of the served weights (model.safetensors when compressed)")
    limits: dict[str, float]
