"""Request bodies: a size limit enforced while the body streams in, and strict JSON (RFC 8259).

Size: the limit was checked against the Content-Length header only, so a body sent with ``Transfer-Encoding:
chunked`` was read and parsed whatever its size (100 MB each, three at once: RSS 473 -> 964 MB). The body is now
counted as it arrives and reading stops one chunk past the limit, with a 413, whatever the framing.

Strict JSON: Python's parser accepts ``NaN``/``Infinity``, turns ``1e400`` into ``inf`` and keeps lone UTF-16 surrogates
(``"\\ud800"``) in strings. None of these is JSON text or Unicode: they reached the validation error (which then
could not be rendered as JSON) or the tokenizer (which cannot encode them), and each ended as a 500. FastAPI's
documented hook for custom body handling (a ``Request`` subclass served by a custom ``APIRoute``) refuses them here
with a 422 that names the value and where it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

_SURROGATE = re.compile("[\ud800-\udfff]")


class StrictJSONError(ValueError):
    """A request body that Python's json module parses but that is not strict JSON of Unicode text."""


def _reject_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON value (JSON has no NaN or Infinity); send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise StrictJSONError(f"the number {text[:40]} is too large for a 64-bit float; send a finite number")
    return value


def _where(path: list[Any]) -> str:
    return "body" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _check_strings(value: Any) -> None:
    """Raise StrictJSONError naming the first string (or key) holding a lone surrogate; iterative, any depth."""
    stack: list[tuple[Any, list[Any]]] = [(value, [])]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            m = _SURROGATE.search(v)
            if m:
                raise StrictJSONError(
                    f"{_where(path)} contains a lone UTF-16 surrogate (\\u{ord(m.group()):04x} at character "
                    f"{m.start()}), which is not a Unicode character; send valid UTF-8 text"
                )
        elif isinstance(v, dict):
            for k, item in v.items():
                if _SURROGATE.search(k):
                    raise StrictJSONError(f"a key of {_where(path)} contains a lone UTF-16 surrogate; send valid text")
                stack.append((item, [*path, k]))
        elif isinstance(v, list):
            stack.extend((item, [*path, i]) for i, item in enumerate(v))


def parse_strict_json(body: bytes) -> Any:
    """Parse a request body as strict JSON; raise HTTPException(422) for what only Python's parser accepts.

    Syntax errors raise ``json.JSONDecodeError`` as ``json.loads`` does (FastAPI answers them with its usual 422).

    Example:
        >>> parse_strict_json(b'{"texts": ["a"]}')
        {'texts': ['a']}
        >>> parse_strict_json(b'{"texts": [NaN]}')
        Traceback (most recent call last):
        ...
        fastapi.exceptions.HTTPException: 422: NaN is not a JSON value (JSON has no NaN or Infinity); send a finite number
    """
    try:
        value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
        _check_strings(value)
    except json.JSONDecodeError:
        raise
    except StrictJSONError as e:
        raise HTTPException(422, str(e)) from None
    except UnicodeDecodeError as e:
        raise HTTPException(422, f"the request body is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise HTTPException(422, "the request body's JSON is nested too deeply to parse") from None
    except ValueError as e:  # Python refuses integer literals of more than 4,300 digits
        if "integer string conversion" in str(e):
            raise HTTPException(422, "the request body holds an integer of more than 4,300 digits") from None
        raise HTTPException(422, f"the request body is not acceptable JSON: {e}") from None
    return value


class LimitedJSONRequest(Request):
    """A Request whose body is read up to ``max_body_bytes`` (413 beyond) and parsed by :func:`parse_strict_json`.

    FastAPI reads and parses every body through ``body()`` and ``json()``, so no endpoint can bypass either.
    """

    def __init__(self, scope: Any, receive: Any, max_body_bytes: int) -> None:
        super().__init__(scope, receive)
        self.max_body_bytes = max_body_bytes

    def _too_large(self, what: str) -> HTTPException:
        return HTTPException(413, f"{what} > max_body_bytes={self.max_body_bytes}; send fewer or shorter texts")

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            size = self.headers.get("content-length", "")
            if size.isdigit() and int(size) > self.max_body_bytes:  # refused before a byte of it is read
                raise self._too_large(f"request body of {size} bytes")
            chunks, total = [], 0
            async for chunk in self.stream():
                total += len(chunk)
                if total > self.max_body_bytes:  # chunked (or a lying client): stop reading here
                    raise self._too_large(f"request body of at least {total} bytes")
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_strict_json(await self.body())
        return self._json


class LimitedJSONRoute(APIRoute):
    """An APIRoute whose endpoints get a :class:`LimitedJSONRequest` (use :func:`route_class` to set the limit)."""

    max_body_bytes: int = 2_000_000

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        limit = self.max_body_bytes

        async def limited_handler(request: Request) -> Response:
            return await handler(LimitedJSONRequest(request.scope, request.receive, limit))

        return limited_handler


def route_class(max_body_bytes: int) -> type[LimitedJSONRoute]:
    """A :class:`LimitedJSONRoute` with this body limit, for ``app.router.route_class`` (set before adding routes).

    Example:
        >>> app = FastAPI(); app.router.route_class = route_class(2_000_000)   # doctest: +SKIP
    """
    return type("LimitedJSONRoute", (LimitedJSONRoute,), {"max_body_bytes": int(max_body_bytes)})


__all__ = ["LimitedJSONRequest", "LimitedJSONRoute", "StrictJSONError", "parse_strict_json", "route_class"]
