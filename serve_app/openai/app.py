"""The HTTP app, made per replica from the settings: OpenAI routes, the chat page, the middleware stack.

The routes only take the request apart and hand it to the service (the Ingress deployment, which
calls the other stages); who the caller is comes from the middleware (`principal_of`).
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at runtime.
from collections.abc import Sequence
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from starlette.middleware import Middleware

from serve_app.errors import ErrorResponse
from serve_app.openai.auth import Authenticator, Principal
from serve_app.openai.docs import docs_router
from serve_app.openai.errors_http import install_handlers
from serve_app.openai.middleware import middleware_stack, principal_of
from serve_app.openai.protocol import ChatCompletion, ChatCompletionRequest, Model, ModelList
from serve_app.settings import IngressSettings
from serve_app.web.router import router as web_router

TITLE = "vlm-serve"
OPENAPI_URL = "/openapi.json"
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 503)
}


class OpenAIService(Protocol):
    """What the routes call; the Ingress deployment implements it."""

    async def list_models(self) -> ModelList: ...

    async def get_model(self, model_id: str) -> Model: ...

    async def health(self) -> dict: ...

    async def chat_completions(self, body: ChatCompletionRequest, principal: Principal, response: Response) -> Any:
        """A ChatCompletion, or a streaming response of chunks when `body.stream`."""


def build_api(
    settings: IngressSettings,
    service: OpenAIService,
    authenticator: Authenticator,
    outer_middleware: Sequence[Middleware] = (),
) -> FastAPI:
    api = FastAPI(
        title=TITLE,
        summary="OpenAI-compatible chat completions with images, on Ray Serve.",
        responses=_ERRORS,
        openapi_url=OPENAPI_URL,
        docs_url=None,
        redoc_url=None,
        middleware=middleware_stack(settings, authenticator, outer_middleware),
    )
    install_handlers(api)
    api.include_router(web_router)  # the chat page at / and its assets under /static
    if settings.api_docs:
        api.include_router(docs_router(OPENAPI_URL, TITLE))

    @api.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return await service.list_models()

    @api.get("/v1/models/{model_id:path}", response_model=Model)
    async def get_model(model_id: str) -> Model:
        return await service.get_model(model_id)

    @api.get("/health")
    async def health() -> dict:
        """Ready when every stage of the graph answers; 503 (OpenAI-shaped) otherwise."""
        return await service.health()

    @api.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response):
        return await service.chat_completions(body, principal_of(request), response)

    return api
