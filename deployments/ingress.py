"""Ingress: the HTTP face of the graph — OpenAI routes, errors, streaming and the web page.

It validates requests, sends images to the ImagePreprocessor (concurrently) and the prompt to the
VLMServer, which gets the preprocessor's tensors straight from it, and turns the token stream into
OpenAI responses.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at runtime.
import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.metrics import CountRequests, IngressMetrics
from serve_app.errors import (
    APIError,
    ErrorResponse,
    ModelNotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    unwrap,
)
from serve_app.openai.auth import Authenticator, Principal, load_keys
from serve_app.openai.body_limit import BodySizeLimit
from serve_app.openai.conversation import estimate_tokens, sampling_params, split_request
from serve_app.openai.errors_http import install_handlers
from serve_app.openai.protocol import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Choice,
    CompletionUsage,
    Model,
    ModelList,
    completion_id,
)
from serve_app.openai.ratelimit_headers import RATE_LIMIT_HEADERS, ratelimit_headers
from serve_app.openai.sse import chat_completion_events
from serve_app.settings import IngressSettings, ModelSettings
from serve_app.stage_types import GenerationChunk, GenerationRequest, ModelInfo, RateDecision
from serve_app.web.router import router as web_router

logger = logging.getLogger("ray.serve")

_READY_TIMEOUT_S = 3.0
_BACKPRESSURE = (BackPressureError,)
_UNAVAILABLE = (DeploymentUnavailableError, ReplicaUnavailableError, ActorDiedError, ActorUnavailableError)

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 503)}

api = FastAPI(
    title="vlm-serve",
    summary="OpenAI-compatible chat completions with images, on Ray Serve.",
    responses=_ERRORS,
)
install_handlers(api)
api.include_router(web_router)  # the chat page at / and its assets under /static


class _Budget:
    """One request's rate-limit reservation, settled exactly once with the tokens really used."""

    def __init__(self, limiter: DeploymentHandle | None, principal: Principal, decision: RateDecision | None) -> None:
        self._limiter = limiter
        self._principal = principal
        self._decision = decision
        self.headers = ratelimit_headers(decision)

    async def settle(self, tokens_used: int) -> None:
        if self._limiter is None or self._decision is None or self._decision.reservation is None:
            return
        reservation, self._decision = self._decision.reservation, None
        await self._limiter.settle.remote(self._principal.name, reservation, tokens_used)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        settings: IngressSettings,
        model: ModelSettings,
        preprocessor: DeploymentHandle,
        vlm: DeploymentHandle,
        rate_limiter: DeploymentHandle | None = None,
    ) -> None:
        self._settings = settings
        self._model = model
        self._preprocessor = preprocessor
        self._vlm = vlm
        self._rate_limiter = rate_limiter
        self._created = int(time.time())
        self._model_info: ModelInfo | None = None
        self._auth = Authenticator(load_keys(settings), settings.rate_limits)
        if self._auth.open:
            logger.warning("No API keys are configured: /v1 is OPEN to anyone who can reach this server.")
        else:
            logger.info("API keys are required on /v1 (%d configured).", self._auth.key_count)
        # The app object is per replica process, and no request has reached it yet.
        cors = settings.cors
        api.add_middleware(
            CORSMiddleware,
            allow_origins=cors.allow_origins,
            allow_methods=cors.allow_methods,
            allow_headers=cors.allow_headers,
            allow_credentials=cors.allow_credentials,
            expose_headers=[*RATE_LIMIT_HEADERS, "Retry-After"],
            max_age=cors.max_age_s,
        )
        api.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
        self._metrics = IngressMetrics()
        api.add_middleware(CountRequests, counter=self._metrics.requests)

    def _authenticate(self, request: Request) -> Principal:
        client = request.client.host if request.client else "unknown"
        return self._auth.authenticate(request.headers.get("authorization"), client)

    # ---- models ------------------------------------------------------------------------------

    async def _info(self) -> ModelInfo:
        await self._ensure_model_ready()
        assert self._model_info is not None
        return self._model_info

    async def _models(self) -> list[Model]:
        info = await self._info()
        return [
            Model(id=name, created=self._created, owned_by=self._model.owned_by,
                  quantization=info.quantization, max_model_len=info.max_model_len)
            for name in self._model.names
        ]

    @api.get("/v1/models", response_model=ModelList)
    async def list_models(self, request: Request) -> ModelList:
        self._authenticate(request)
        return ModelList(data=await self._models())

    @api.get("/v1/models/{model_id:path}", response_model=Model)
    async def get_model(self, model_id: str, request: Request) -> Model:
        self._authenticate(request)
        for model in await self._models():
            if model.id == model_id:
                return model
        raise self._unknown_model(model_id)

    def _unknown_model(self, name: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"The model `{name}` does not exist. Served models: {', '.join(self._model.names)}.", param="model"
        )

    @api.get("/health")
    async def health(self) -> dict:
        """Ready when every stage of the graph answers; 503 (OpenAI-shaped) otherwise."""
        await self._ensure_model_ready()
        try:
            await asyncio.wait_for(self._preprocessor.ping.remote(), _READY_TIMEOUT_S)
        except (TimeoutError, *_UNAVAILABLE) as exc:
            raise ServiceUnavailableError("The image stage is not ready.", retry_after_s=5) from exc
        return {"status": "ok", "model": self._model.id}

    async def _ensure_model_ready(self) -> None:
        """Answer 503 instead of queueing behind a model stage that is still loading."""
        if self._model_info is not None:
            return
        try:
            self._model_info = await asyncio.wait_for(self._vlm.model_info.remote(), _READY_TIMEOUT_S)
        except (TimeoutError, *_UNAVAILABLE) as exc:
            raise ServiceUnavailableError("The model is still loading; try again shortly.", retry_after_s=5) from exc

    # ---- chat completions --------------------------------------------------------------------

    @api.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request, response: Response):
        started = time.perf_counter()
        principal = self._authenticate(request)
        if body.model not in self._model.names:
            raise self._unknown_model(body.model)
        messages, image_inputs = split_request(body, self._settings)
        sampling = sampling_params(body, self._settings)
        await self._ensure_model_ready()
        budget = await self._admit(principal, estimate_tokens(body, self._model.default_max_tokens))
        try:
            # The preprocessor's responses go to the model stage as they are: Serve hands each to it as
            # an object reference, so pixels travel from one replica to the other through the object
            # store without this event loop waiting for them, deserializing and sending them on.
            images = [self._preprocessor.process.remote(image) for image in image_inputs]
            generation = GenerationRequest(messages=messages, images=[], sampling=sampling)
            stream = self._observed(self._vlm.options(stream=True).generate.remote(generation, *images), started)
            # Request errors arrive here, before any byte is sent: the image stage's too.
            first = await self._call(anext(stream))
        except APIError as exc:
            await budget.settle(0)
            exc.extra_headers = budget.headers
            raise
        cid = completion_id()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = chat_completion_events(stream, first, cid, body.model, include_usage, budget.settle)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **budget.headers}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            completion = await self._call(self._collect(stream, first, cid, body.model))
        except BaseException:
            await budget.settle(0)
            raise
        await budget.settle(completion.usage.total_tokens)
        response.headers.update(budget.headers)
        return completion

    async def _admit(self, principal: Principal, tokens: int) -> "_Budget":
        if self._rate_limiter is None or not principal.limits.enabled:
            return _Budget(None, principal, None)
        decision: RateDecision = await self._rate_limiter.admit.remote(principal.name, tokens, principal.limits)
        if not decision.admitted:
            self._metrics.rate_limited.inc()
            error = RateLimitError(
                f"Rate limit reached for {principal.name.split(':', 1)[0]} requests. "
                f"Please try again in {decision.retry_after_s:.1f}s.",
                retry_after_s=decision.retry_after_s,
            )
            error.extra_headers = ratelimit_headers(decision)
            raise error
        return _Budget(self._rate_limiter, principal, decision)

    async def _observed(self, stream, started: float) -> AsyncIterator[GenerationChunk]:
        """The model stage's stream, timed into the metrics; cancelled upstream if abandoned."""
        previous: float | None = None
        finished = False
        try:
            async for chunk in stream:
                now = time.perf_counter()
                if previous is None:
                    self._metrics.ttft.observe(now - started)
                else:
                    self._metrics.inter_token.observe(now - previous)
                previous = now
                if chunk.finish_reason is not None:
                    finished = True
                    # Ray's counters refuse an increment of 0 (an answer may end at its first token).
                    if chunk.prompt_tokens:
                        self._metrics.prompt_tokens.inc(chunk.prompt_tokens)
                    if chunk.completion_tokens:
                        self._metrics.completion_tokens.inc(chunk.completion_tokens)
                yield chunk
        finally:
            if not finished:
                stream.cancel()  # the client went away or failed: free the batch slot now

    @staticmethod
    async def _call(awaitable):
        """Await a call into another stage, turning its failures into the client's error."""
        try:
            return await awaitable
        except APIError:
            raise
        except _BACKPRESSURE as exc:
            retry = getattr(exc, "retry_after_s", None) or 2
            raise ServiceUnavailableError("The model is at capacity; try again shortly.", retry_after_s=retry) from exc
        except _UNAVAILABLE as exc:
            raise ServiceUnavailableError("The model stage is unavailable; try again shortly.", retry_after_s=5) from exc
        except Exception as exc:
            raise unwrap(exc) or exc

    @staticmethod
    async def _collect(
        stream: AsyncIterator[GenerationChunk], first: GenerationChunk, cid: str, model: str
    ) -> ChatCompletion:
        texts, last = [first.text], first
        while last.finish_reason is None:
            try:
                last = await anext(stream)
            except StopAsyncIteration:
                raise APIError("The model stage ended the answer early.") from None
            texts.append(last.text)
        usage = CompletionUsage.of(last.prompt_tokens, last.completion_tokens, last.image_tokens)
        choice = Choice(message=ChatCompletionMessage(content="".join(texts)), finish_reason=last.finish_reason)
        return ChatCompletion(id=cid, model=model, choices=[choice], usage=usage)

