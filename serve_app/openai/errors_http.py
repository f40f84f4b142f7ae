"""OpenAI's error body over HTTP: the one place where the error hierarchy meets status codes.

`install_handlers` routes every failure of the FastAPI app (our APIErrors, schema errors, Starlette's
404 and 405, anything unexpected) through `error_response`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.errors import APIError, InvalidRequestError, NotFoundError, unwrap

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
    """Route every failure of a FastAPI app through OpenAI's error body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(jsonable_encoder(exc.errors())))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        known = unwrap(exc)
        if known is not None:
            return error_response(known)
        logger.exception("Unhandled error while serving a request")
        return error_response(APIError("The server had an error while processing your request."))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFoundError(f"Unknown path. {exc.detail}"))
        if exc.status_code == 405:
            error = InvalidRequestError("Method not allowed.", code="method_not_allowed")
            response = error_response(error)
            response.status_code = 405
            return response
        error = APIError(str(exc.detail))
        error.status_code = exc.status_code
        return error_response(error)
