"""The HTTP app's middleware stack, and the API-key check that runs in it before routing.

Outermost first, and why in this order:
1. `outer` (the deployment's request counter): sees every answer, preflights included.
2. CORS: every answer below it, 401, 413 and 500 included, carries the CORS headers.
3. UnexpectedErrors: an exception from anything below becomes OpenAI's 500 (inside CORS).
4. ClientAddress: the client's address from the peer and trusted proxies only.
5. RequireApiKey: under /v1, a request without a valid key gets 401 before its body is read, so an
   unauthenticated client can neither make the server parse a body nor learn the schema from a 400.
6. BodySizeLimit: 413 for a body over the cap, before any route parses it.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.errors import AuthenticationError
from serve_app.openai.auth import Authenticator, Principal
from serve_app.openai.body_limit import BodySizeLimit
from serve_app.openai.client_address import ClientAddress, ClientAddressPolicy, serve_proxy_allowed_ips
from serve_app.openai.errors_http import UnexpectedErrors, error_response
from serve_app.openai.ratelimit_headers import RATE_LIMIT_HEADERS
from serve_app.settings import IngressSettings

PROTECTED_PREFIX = "/v1"
_PRINCIPAL = "principal"


def route_path(scope: Scope) -> str:
    """The path the app routes on: the request path without the application's route prefix."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def principal_of(request: Request) -> Principal:
    """The principal RequireApiKey found for this request (every /v1 route has one)."""
    principal: Principal | None = request.scope.get("state", {}).get(_PRINCIPAL)
    if principal is None:
        raise RuntimeError(f"no principal for {request.url.path}: RequireApiKey did not run")
    return principal


class RequireApiKey:
    """ASGI middleware: authenticates every request under /v1 and records who it acts for."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if scope["type"] != "http" or not (path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        try:
            principal = self.authenticator.authenticate(
                Headers(scope=scope).get("authorization"), str(client[0]) if client else "unknown"
            )
        except AuthenticationError as exc:
            await error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})[_PRINCIPAL] = principal
        await self.app(scope, receive, send)


def middleware_stack(
    settings: IngressSettings, authenticator: Authenticator, outer: Sequence[Middleware] = ()
) -> list[Middleware]:
    """The stack for `FastAPI(middleware=...)`, outermost first."""
    cors = settings.cors
    return [
        *outer,
        Middleware(
            CORSMiddleware,
            allow_origins=cors.allow_origins,
            allow_methods=cors.allow_methods,
            allow_headers=cors.allow_headers,
            allow_credentials=cors.allow_credentials,
            expose_headers=[*RATE_LIMIT_HEADERS, "Retry-After"],
            max_age=cors.max_age_s,
        ),
        Middleware(UnexpectedErrors),
        Middleware(ClientAddress, policy=ClientAddressPolicy(settings.trusted_proxies, serve_proxy_allowed_ips())),
        Middleware(RequireApiKey, authenticator=authenticator),
        Middleware(BodySizeLimit, max_bytes=settings.max_request_bytes),
    ]
