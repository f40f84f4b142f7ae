"""Ingress: the HTTP face of the graph. Its app (OpenAI routes, middleware, errors, the web page) is
made per replica from the settings by serve_app/openai/app.py, and its routes call this deployment.

It takes validated requests, sends images to the ImagePreprocessor (concurrently) and the prompt to the
VLMServer, which gets the preprocessor's tensors straight from it, and turns the token stream into
OpenAI responses.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.middleware import Middleware

from deployments.affinity_router import conversation_key
from deployments.choice_tally import ChoiceTally
from deployments.metrics import CountRequests, IngressMetrics
from deployments.rate_budget import Budget, RateLimitGate
from serve_app.errors import (
    APIError,
    ModelNotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    unwrap,
)
from serve_app.openai.app import build_api
from serve_app.openai.auth import Authenticator, Principal
from serve_app.openai.choices import OutputOptions, collect_completion
from serve_app.openai.conversation import (
    check_prompt_length,
    choices,
    estimate_tokens,
    sampling_params,
    split_request,
    template_tools,
)
from serve_app.openai.protocol import ChatCompletionRequest, Model, ModelList, completion_id
from serve_app.openai.sse import chat_completion_events
from serve_app.settings import IngressSettings, ModelSettings
from serve_app.stage_types import GenerationChunk, GenerationRequest, ModelInfo

logger = logging.getLogger("ray.serve")

_READY_TIMEOUT_S = 3.0
_BACKPRESSURE = (BackPressureError,)
_UNAVAILABLE = (DeploymentUnavailableError, ReplicaUnavailableError, ActorDiedError, ActorUnavailableError)


@serve.deployment
@serve.ingress()  # the app is made per replica, from its settings, by __serve_build_asgi_app__
class Ingress:
    def __init__(
        self,
        settings: IngressSettings,
        model: ModelSettings,
        preprocessor: DeploymentHandle,
        vlm: DeploymentHandle,
        rate_limiter: DeploymentHandle | None = None,
        keyed_routing: bool = False,
    ) -> None:
        self._settings = settings
        # Whether the model replicas' router reads a conversation key (deployments/affinity_router.py):
        # hashing a first turn's images costs the event loop time that Ray's default router would waste.
        self._keyed_routing = keyed_routing
        self._model = model
        self._preprocessor = preprocessor
        self._vlm = vlm
        self._rate_gate = RateLimitGate(rate_limiter, settings.rate_limits)
        self._created = int(time.time())
        self._model_info: ModelInfo | None = None
        # A key source that yields no key stops the replica here (KeySourceError): fail closed.
        self._auth = Authenticator.from_settings(settings)
        if self._auth.open:
            logger.warning("No API keys are configured: /v1 is OPEN to anyone who can reach this server.")
        else:
            logger.info("API keys are required on /v1 (%d configured).", self._auth.key_count)
        self._metrics = IngressMetrics()

    def __serve_build_asgi_app__(self) -> FastAPI:
        counter = Middleware(CountRequests, counter=self._metrics.requests)
        return build_api(self._settings, self, self._auth, outer_middleware=[counter])

    # ---- models ------------------------------------------------------------------------------

    async def _info(self) -> ModelInfo:
        await self._ensure_model_ready()
        assert self._model_info is not None
        return self._model_info

    async def _models(self) -> list[Model]:
        info = await self._info()
        return [
            Model(id=name, created=self._created, owned_by=self._model.owned_by,
                  quantization=info.quantization, max_model_len=info.max_model_len,
                  generation_defaults=info.generation_defaults)
            for name in self._model.names
        ]

    async def list_models(self) -> ModelList:
        return ModelList(data=await self._models())

    async def get_model(self, model_id: str) -> Model:
        for model in await self._models():
            if model.id == model_id:
                return model
        raise self._unknown_model(model_id)

    def _unknown_model(self, name: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"The model `{name}` does not exist. Served models: {', '.join(self._model.names)}.", param="model"
        )

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

    async def chat_completions(self, body: ChatCompletionRequest, principal: Principal, response: Response):
        started = time.perf_counter()
        if body.model not in self._model.names:
            raise self._unknown_model(body.model)
        messages, image_inputs = split_request(body, self._settings)
        info = await self._info()
        # Oversized text is refused here, before the model stage spends time tokenizing it.
        check_prompt_length(body, info.max_prompt_chars, info.max_model_len)
        sampling = sampling_params(body, self._settings, info.generation_defaults)
        n = choices(body, self._settings)
        budget = await self._admit(principal, estimate_tokens(body, self._model.default_max_tokens))
        try:
            # The preprocessor's responses go to the model stage as they are: Serve hands each to it as
            # an object reference, so pixels travel from one replica to the other through the object
            # store without this event loop waiting for them, deserializing and sending them on.
            images = [self._preprocessor.process.remote(image) for image in image_inputs]
            generation = GenerationRequest(
                messages=messages, images=[], sampling=sampling, tools=template_tools(body), n=n,
                cache_salt=body.cache_salt,
                routing_key=conversation_key(messages, image_inputs, body.cache_salt) if self._keyed_routing else None,
            )
            stream = self._observed(self._vlm.options(stream=True).generate.remote(generation, *images), started, n)
            # The budget settles from the stream itself, however it ends (done, failed, or cut).
            stream = budget.metered(stream, n)
            # Request errors arrive here, before any byte is sent: the image stage's too.
            first = await self._call(anext(stream))
        except BaseException as exc:
            budget.settle()
            if isinstance(exc, APIError):
                exc.extra_headers = budget.headers
            raise
        cid = completion_id()
        output = OutputOptions.of(body)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = chat_completion_events(stream, first, cid, body.model, include_usage, options=output)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **budget.headers}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            completion = await self._call(collect_completion(stream, first, cid, body.model, output))
        finally:
            budget.settle()
        response.headers.update(budget.headers)
        return completion

    async def _admit(self, principal: Principal, tokens: int) -> Budget:
        try:
            return await self._rate_gate.admit(principal, tokens)
        except RateLimitError:
            self._metrics.rate_limited.inc()
            raise

    async def _observed(self, stream, started: float, n: int) -> AsyncIterator[GenerationChunk]:
        """The model stage's stream of a request of `n` choices, timed into the metrics; its tokens (the
        prompt once, every choice's completion) counted once all n have finished. Cancelled upstream if
        abandoned before then, so a client that leaves mid-answer frees every choice's batch row."""
        previous: float | None = None
        tally = ChoiceTally(n)
        try:
            async for chunk in stream:
                now = time.perf_counter()
                if previous is None:
                    self._metrics.ttft.observe(now - started)
                else:
                    self._metrics.inter_token.observe(now - previous)
                previous = now
                tally.add(chunk)
                if chunk.finish_reason is not None and tally.finished:
                    used = tally.usage()
                    # Ray's counters refuse an increment of 0 (an answer may end at its first token).
                    if used.prompt_tokens:
                        self._metrics.prompt_tokens.inc(used.prompt_tokens)
                    if used.completion_tokens:
                        self._metrics.completion_tokens.inc(used.completion_tokens)
                yield chunk
        finally:
            if not tally.finished:
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
