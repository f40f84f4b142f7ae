"""One exception hierarchy for every failure a client can cause or see, mapped to HTTP here only.

Deployments raise these; they cross Ray handles intact (their `args` rebuild them on unpickling) and
the ingress turns them into OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """Base of all client-visible errors; subclasses fix status, type and default code."""

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        # Keep all three in `args`: exceptions are rebuilt from `args` when they cross a Ray handle.
        super().__init__(message, param, code)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        # Set where the error is answered (e.g. rate-limit headers); not carried across handles.
        self.extra_headers: dict[str, str] = {}

    def __str__(self) -> str:
        return self.message

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.error_type, param=self.param, code=self.code)
        )

    def headers(self) -> dict[str, str]:
        return dict(getattr(self, "extra_headers", {}))


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ImageError(InvalidRequestError):
    """An image could not be fetched, decoded or accepted."""

    default_code = "invalid_image"


class ContextLengthError(InvalidRequestError):
    default_code = "context_length_exceeded"


class ModelNotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RetryableError(APIError):
    """Refusals that name when to come back (429, 503)."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, retry_after_s: float = 1.0
    ) -> None:
        APIError.__init__(self, message, param, code)
        self.args = (message, param, code, retry_after_s)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        # Retry-After counts whole seconds; round up so a client that obeys it is admitted.
        return {**super().headers(), "Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class RateLimitError(RetryableError):
    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"


class ServiceUnavailableError(RetryableError):
    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


def unwrap(exc: BaseException) -> APIError | None:
    """The APIError behind `exc`, also when Ray wrapped it in a RayTaskError on its way back."""
    for candidate in (exc, getattr(exc, "cause", None), exc.__cause__):
        if isinstance(candidate, APIError):
            # Ray's wrapper subclasses the cause's type but may lack its instance attributes.
            inner = getattr(candidate, "cause", None)
            return inner if isinstance(inner, APIError) else candidate
    return None


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
