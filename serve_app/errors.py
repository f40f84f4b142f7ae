"""One exception hierarchy for every failure a client can cause or see, with its status and OpenAI type.

Deployments raise these; they cross Ray handles intact (their `args` rebuild them on unpickling) and
serve_app/openai/errors_http.py turns them into OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math

from pydantic import BaseModel


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """Base of all client-visible errors; subclasses fix status, type and default code.

    A client error (4xx) never has the type `server_error`: OpenAI's clients read the type to decide
    whose fault a failure was. `error_for_status` makes errors for statuses no class names.
    """

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


def error_for_status(status: int, message: str, code: str | None = None) -> APIError:
    """An error for a status that no class here names (a framework's 405 or 415, say): a client error
    (4xx) is an `invalid_request_error`, a server error (5xx) a `server_error`."""
    error: APIError = InvalidRequestError(message, code=code) if status < 500 else APIError(message, code=code)
    error.status_code = status
    return error


def unwrap(exc: BaseException) -> APIError | None:
    """The APIError behind `exc`, also when Ray wrapped it in a RayTaskError on its way back."""
    for candidate in (exc, getattr(exc, "cause", None), exc.__cause__):
        if isinstance(candidate, APIError):
            # Ray's wrapper subclasses the cause's type but may lack its instance attributes.
            inner = getattr(candidate, "cause", None)
            return inner if isinstance(inner, APIError) else candidate
    return None
