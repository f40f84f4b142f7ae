"""OpenAI's error body over HTTP: the one place where the error hierarchy meets status codes.

`install_handlers` routes the FastAPI app's failures (our APIErrors, schema errors, Starlette's
404, 405 and body errors) through `error_response`; `UnexpectedErrors`, a middleware, answers
whatever else escapes with a 500 in the same shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    error_for_status,
    unwrap,
)

logger = logging.getLogger("ray.serve")


def error_response(error: APIError, extra_headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=error.status_code,
        content=error.body().model_dump(),
        headers={**error.headers(), **(extra_headers or {})},
    )


# Pydantic reports where a value failed as a path with union members in it: a discriminated
# union's tag right after a list index ("user", "image_url") and a plain union's member type
# ("str", "list[...]"). OpenAI names the field as `messages[0].content[1].image_url.url`.
_DISCRIMINATOR_TAGS = {"system", "developer", "user", "assistant", "tool", "text", "image_url"}
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict"}


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    previous: Any = None
    for item in loc:
        is_tag = isinstance(item, str) and (
            item in _TYPE_TAGS or "[" in item or "(" in item
            or (isinstance(previous, int) and item in _DISCRIMINATOR_TAGS)
        )
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item != "body" and not is_tag:
            parts.append(("." if parts else "") + str(item))
        previous = item
    return "".join(parts) or None


def validation_error(errors: list[ErrorDetails] | list[dict[str, Any]]) -> InvalidRequestError:
    """The first schema error of a request, as OpenAI words it."""
    if not errors:
        return InvalidRequestError("Invalid request body.")
    if any(e.get("type") == "json_invalid" for e in errors):
        return InvalidRequestError(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload.",
            code="invalid_json",
        )
    # Of a union's alternatives, the error that got furthest into the value says the most.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    param = param_from_loc(tuple(first.get("loc", ())))
    message = str(first.get("msg", "Invalid value"))
    where = f" at '{param}'" if param else ""
    return InvalidRequestError(f"Invalid request{where}: {message}", param=param, code="invalid_value")


def install_handlers(app: Any) -> None:
    """Route the failures a FastAPI app answers itself through OpenAI's error body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Only where and what, never the offending input: it may be the whole (deeply nested) body.
        errors = [{"type": e.get("type"), "loc": e.get("loc", ()), "msg": e.get("msg")} for e in exc.errors()]
        return error_response(validation_error(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(http_error(exc))


def http_error(exc: StarletteHTTPException) -> APIError:
    """The framework's own refusals (unknown path, wrong method, a body it cannot read) as our errors."""
    if exc.status_code == 404:
        return NotFoundError(f"Unknown path. {exc.detail}")
    if exc.status_code == 405:
        return error_for_status(405, "Method not allowed.", code="method_not_allowed")
    if exc.status_code == 413:
        return PayloadTooLargeError("The request body is too large.")
    if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
        return InvalidRequestError("The JSON body of your request is nested too deeply.", code="invalid_json")
    if exc.status_code == 400:
        # FastAPI's "There was an error parsing the body": a body its JSON decoder gave up on.
        return InvalidRequestError("We could not parse the JSON body of your request.", code="invalid_json")
    return error_for_status(exc.status_code, str(exc.detail))


class UnexpectedErrors:
    """ASGI middleware: any exception that escapes the app becomes OpenAI's 500 body (logged here).

    It sits inside CORS, so a 500 carries the same CORS headers as any other answer, which Starlette's
    own last-resort handler (outside every middleware) cannot give. Once a response has started (a
    stream), there is nothing left to answer: the exception goes on to Serve, which logs it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            known = unwrap(exc)
            if known is None:
                logger.exception("Unhandled error while serving a request")
                known = APIError("The server had an error while processing your request.")
            await error_response(known)(scope, receive, send)
