"""The REST API: ``create_app(lm, limits)`` serves one (compressed) model with FastAPI.

Every model call runs on one dedicated worker thread (a single-thread executor, plus a lock for direct callers), so
concurrent clients never run the model (or the tokenizer, whose Rust backend is not safe to share across threads) at
the same time, and the event loop stays free to answer /health and reject bad requests. Memory stays bounded by one
request's size, which the limits bound, and by ``max_pending`` queued requests (429 beyond). Using one thread, not a
pool, also keeps the allocator's per-thread arenas from multiplying the resident memory. Everything a client can get
wrong is answered with a 4xx and a message.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from embfactor.errors import EmbfactorError, InvalidInputError
from embfactor.fileio import release_free_heap
from embfactor.models import LoadedModel
from embfactor.server.schemas import (
    EmbedRequest,
    EmbedResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    InfoResponse,
    Limits,
    ScoreRequest,
    ScoreResponse,
    TextScore,
)
from embfactor.server.body import route_class

T = TypeVar("T")

#: Where the API docs' JavaScript/CSS are served from (instead of FastAPI's default CDN, unreachable offline).
DOCS_ASSETS_URL = "/docs-assets"


class RequestError(Exception):
    """A request that cannot be served as asked: answered with ``status`` and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def model_max_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (None when unbounded, e.g. rotary)."""
    from embfactor.eval.embed import usable_positions

    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            # RoBERTa-style models (MPNet: 514 positions) hold padding_idx + 1 fewer tokens than positions
            return usable_positions(model) if key == "max_position_embeddings" else v
    return None


def model_info(lm: LoadedModel, limits: Limits) -> dict[str, Any]:
    """What /info returns: :func:`embfactor.pipeline.describe` (what ``embfactor inspect`` shows) and the limits."""
    from embfactor.pipeline import describe

    facts = describe(lm).to_dict()
    facts["layer_type"] = facts["format"]  # the /info field's name since 0.1
    return {**facts, "limits": {k: float(v) for k, v in vars(limits).items()}}


def _token_counts(tokenizer: Any, texts: list[str], max_tokens: int) -> list[int]:
    # Truncating at max_tokens + 1 tells "too long" apart without tokenizing (or warning about) a whole huge text.
    enc = tokenizer(texts, truncation=True, max_length=max_tokens + 1)
    return [len(ids) for ids in enc["input_ids"]]


def _check_texts(texts: list[str], limits: Limits, max_tokens: int, tokenizer: Any) -> list[int]:
    """Refuse too many, too long or blank texts before any model work; return the token counts."""
    if len(texts) > limits.max_texts:
        raise RequestError(413, f"too many texts: {len(texts)} > max_texts={limits.max_texts}; split the request")
    for i, t in enumerate(texts):
        if len(t) > limits.max_text_chars:
            raise RequestError(
                413, f"texts[{i}] has {len(t)} characters > max_text_chars={limits.max_text_chars}"
            )
        if not t.strip():
            raise RequestError(422, f"texts[{i}] is blank; give non-empty texts")
    counts = _token_counts(tokenizer, texts, max_tokens)
    for i, n in enumerate(counts):
        if n > max_tokens:
            raise RequestError(413, f"texts[{i}] has more than max_tokens={max_tokens} tokens; shorten or split it")
    return counts


@torch.inference_mode()
def generate_text(
    lm: LoadedModel, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
) -> tuple[list[int], str]:
    """Continue ``prompt_ids``: greedy when ``temperature`` is 0, else sampling with a seeded generator.

    Uses the model's KV cache, one token per step; stops at the tokenizer's EOS token.

    Returns:
        (new token ids, finish reason "eos" or "length").

    Example:
        >>> ids, why = generate_text(lm, lm.tokenizer("Once")["input_ids"], max_new_tokens=8)   # doctest: +SKIP
    """
    model = lm.model
    device = next(model.parameters()).device
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True)
    new: list[int] = []
    for step in range(max_new_tokens):
        logits = out.logits[0, -1].float().cpu()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        if eos is not None and nxt == eos:
            return new, "eos"
        new.append(nxt)
        if step + 1 < max_new_tokens:
            step_ids = torch.tensor([[nxt]], dtype=torch.long, device=device)
            out = model(input_ids=step_ids, past_key_values=out.past_key_values, use_cache=True)
    return new, "length"


@torch.inference_mode()
def text_perplexities(lm: LoadedModel, token_ids: list[list[int]]) -> list[tuple[float, int]]:
    """Mean next-token negative log-likelihood (nats) and the number of predicted tokens of each text."""
    model = lm.model
    device = next(model.parameters()).device
    out = []
    for ids in token_ids:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        logits = model(input_ids=x).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="mean")
        out.append((float(nll), len(ids) - 1))
    return out


@dataclass(frozen=True)
class _Served:
    """What the endpoints need: the model, the limits, and the token caps derived from the model."""

    lm: LoadedModel
    limits: Limits
    max_tokens: int
    max_len: int | None


class ModelWorker:
    """Runs model calls one at a time on one thread; at most ``max_pending`` wait for it (429 beyond).

    The lock also serializes direct callers of the same functions (the module docstring says why one thread).
    """

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embfactor-model")
        self.pending = 0

    def _locked(self, fn: Callable[..., T], *args: Any) -> Callable[[], T]:
        def call() -> T:
            with self.lock:
                try:
                    with torch.inference_mode():
                        return fn(*args)
                finally:
                    # batches of different sizes leave freed activations in glibc's heap: RSS crept up ~40 MB over
                    # 1,200 mixed requests without this (benchmarks/load_test.py); it costs well under a millisecond
                    release_free_heap()

        return call

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.pending >= self.max_pending:
            raise RequestError(
                429, f"server busy: {self.pending} requests are queued (max_pending={self.max_pending})"
            )
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self._locked(fn, *args))
        finally:
            self.pending -= 1


def create_app(lm: LoadedModel, limits: Limits | None = None) -> FastAPI:
    """A FastAPI app serving ``lm``: /health, /info, /embed (encoders), /generate and /score (decoders).

    Args:
        lm: the model to serve (``embfactor.load_model(...)``; typically an embfactor output folder).
        limits: request limits; defaults to :class:`Limits` ().

    Example:
        >>> app = create_app(load_model("out/minilm-r6"), Limits(max_texts=16))   # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)                           # doctest: +SKIP
    """
    limits = limits or Limits()
    lm.model.eval()
    max_len = model_max_length(lm.model)
    max_tokens = min(limits.max_tokens, max_len) if max_len else limits.max_tokens
    worker = ModelWorker(limits.max_pending)
    app = FastAPI(
        title="embfactor",
        version=_version(),
        description=f"Serving {lm.name} ({lm.kind}{', factorized' if lm.compressed else ''}).",
        docs_url=None,  # replaced by add_offline_docs: FastAPI's pages load Swagger UI / ReDoc from a CDN
        redoc_url=None,
    )
    # bodies are counted while they stream in (413 at the limit, chunked or not) and parsed as strict JSON (422 for
    # NaN, Infinity, lone surrogates); body.py says why
    app.router.route_class = route_class(limits.max_body_bytes)
    add_offline_docs(app)
    app.state.lm = lm
    app.state.worker = worker.executor
    app.state.limits = limits
    _add_error_handlers(app)
    _add_routes(app, _Served(lm, limits, max_tokens, max_len), worker)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI's handler echoes the bad input, which may not be JSON-renderable (a 500 instead of this 422)
        return JSONResponse({"detail": json_safe(jsonable_encoder(e.errors()))}, status_code=422)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"detail": e.message}, status_code=e.status)

    @app.exception_handler(EmbfactorError)
    async def _embfactor_error(request: Request, e: EmbfactorError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=422)


def _add_routes(app: FastAPI, s: _Served, worker: ModelWorker) -> None:
    info = model_info(s.lm, s.limits)

    @app.get("/health", response_model=HealthResponse)
    async def health() -> dict[str, str]:
        return {"status": "ok", "kind": s.lm.kind}

    @app.get("/info", response_model=InfoResponse)
    async def get_info() -> dict[str, Any]:
        return info

    @app.post("/embed", response_model=EmbedResponse)
    async def embed(req: EmbedRequest) -> dict[str, Any]:
        """Mean-pooled sentence embeddings (as sentence-transformers computes them for MiniLM)."""
        _need(s.lm, "encoder", "/embed")
        return await worker.run(_embed, s, req)

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        """Continue a prompt: greedy at temperature 0, seeded sampling otherwise."""
        _need(s.lm, "decoder", "/generate")
        _check_generate_request(req, s.limits)
        return await worker.run(_generate, s, req)

    @app.post("/score", response_model=ScoreResponse)
    async def score(req: ScoreRequest) -> dict[str, Any]:
        """Perplexity of each text under the model (next-token prediction)."""
        _need(s.lm, "decoder", "/score")
        return await worker.run(_score, s, req)


def _need(lm: LoadedModel, kind: str, endpoint: str) -> None:
    if lm.kind != kind:
        other = "/embed" if lm.kind == "encoder" else "/generate and /score"
        a = "an" if kind == "encoder" else "a"
        raise RequestError(400, f"{endpoint} needs {a} {kind} model; {lm.name} is not one (use {other})")


def _embed(s: _Served, req: EmbedRequest) -> dict[str, Any]:
    from embfactor.eval.embed import sentence_embeddings

    counts = _check_texts(req.texts, s.limits, s.max_tokens, s.lm.tokenizer)
    e = sentence_embeddings(s.lm.model, s.lm.tokenizer, req.texts, max_length=s.max_tokens, normalize=req.normalize)
    if not torch.isfinite(e).all():
        raise RequestError(422, "the model produced non-finite embeddings for these texts")
    return {"embeddings": e.tolist(), "dim": int(e.shape[1]), "tokens": counts}


def _check_generate_request(req: GenerateRequest, limits: Limits) -> None:
    """Settle the request's max_new_tokens and check it and the temperature against the limits (before queueing)."""
    if req.max_new_tokens is None:
        req.max_new_tokens = min(32, limits.max_new_tokens)
    if req.max_new_tokens > limits.max_new_tokens:
        raise RequestError(
            422, f"max_new_tokens={req.max_new_tokens} is above the server's cap of {limits.max_new_tokens}"
        )
    if req.temperature > limits.max_temperature or not math.isfinite(req.temperature):
        raise RequestError(422, f"temperature must be in [0, {limits.max_temperature}], got {req.temperature}")


def _generate(s: _Served, req: GenerateRequest) -> dict[str, Any]:
    (n,) = _check_texts([req.prompt], s.limits, s.max_tokens, s.lm.tokenizer)
    ids = s.lm.tokenizer(req.prompt)["input_ids"]
    if s.max_len and n + req.max_new_tokens > s.max_len:
        raise RequestError(
            413, f"prompt ({n} tokens) + max_new_tokens ({req.max_new_tokens}) > the model's "
            f"{s.max_len} positions; shorten the prompt or ask for fewer tokens"
        )
    new, why = generate_text(
        s.lm, ids, max_new_tokens=req.max_new_tokens, temperature=float(req.temperature), seed=req.seed
    )
    text = s.lm.tokenizer.decode(new, skip_special_tokens=True)
    return {"text": text, "prompt_tokens": n, "new_tokens": len(new), "finish_reason": why}


def _score(s: _Served, req: ScoreRequest) -> dict[str, Any]:
    counts = _check_texts(req.texts, s.limits, s.max_tokens, s.lm.tokenizer)
    for i, n in enumerate(counts):
        if n < 2:
            raise RequestError(422, f"texts[{i}] has {n} token(s); perplexity needs at least 2")
    ids = s.lm.tokenizer(req.texts)["input_ids"]
    res = text_perplexities(s.lm, ids)
    scores = [TextScore(perplexity=math.exp(min(nll, 700.0)), nll=nll, tokens=k) for nll, k in res]
    total = sum(k for _, k in res)
    mean = sum(nll * k for nll, k in res) / total
    return {"scores": scores, "perplexity": math.exp(min(mean, 700.0))}


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings and strings made valid UTF-8, so JSONResponse can render it.

    Example:
        >>> json_safe({"input": [float("nan"), "a\\ud800"]})
        {'input': ['nan', 'a\\\\ud800']}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def docs_assets_dir() -> Path:
    """The folder of Swagger UI's and ReDoc's dist files, shipped by ``fastapi-offline`` (the [server] extra)."""
    try:
        from importlib.resources import files

        folder = Path(str(files("fastapi_offline") / "static"))
    except ImportError:  # pragma: no cover - the [server] extra is incomplete
        raise InvalidInputError("the API docs need fastapi-offline: pip install 'embfactor[server]'") from None
    missing = [name for name in _DOCS_ASSETS if not (folder / name).is_file()]
    if missing:  # pragma: no cover - a broken install
        raise InvalidInputError(f"fastapi-offline in {folder} lacks {', '.join(missing)}; reinstall embfactor[server]")
    return folder


_DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def add_offline_docs(app: FastAPI) -> None:
    """Serve /docs (Swagger UI) and /redoc from local copies of their assets, so they work without internet.

    FastAPI's documented self-hosting pattern: the app is created with ``docs_url=None, redoc_url=None``; the assets
    are mounted under :data:`DOCS_ASSETS_URL` and the pages are rendered with the local URLs.

    Example:
        >>> app = FastAPI(docs_url=None, redoc_url=None); add_offline_docs(app)   # doctest: +SKIP
    """
    assets = docs_assets_dir()
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=assets), name="docs-assets")
    oauth2_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")  # behind a proxy that mounts the app under a prefix
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{oauth2_url}",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
        )

    @app.get(oauth2_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            with_google_fonts=False,  # fonts would come from Google's CDN
        )


def _version() -> str:
    from embfactor import __version__

    return __version__


__all__ = [
    "DOCS_ASSETS_URL",
    "Limits",
    "RequestError",
    "add_offline_docs",
    "create_app",
    "docs_assets_dir",
    "generate_text",
    "json_safe",
    "model_info",
    "text_perplexities",
]
