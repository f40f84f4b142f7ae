"""Ingress: the HTTP face of the graph — OpenAI routes, errors, streaming and the web page.

It validates requests, sends images to the ImagePreprocessor (concurrently) and the prompt plus
tensors to the VLMServer, and turns the token stream into OpenAI responses.
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
from ray.serve.handle import DeploymentHandle

from deployments.vlm import ModelInfo
from serve_app.auth import Authenticator, Principal, load_keys
from serve_app.body_limit import BodySizeLimit
from serve_app.conversation import estimate_tokens, sampling_params, split_request
from serve_app.errors import APIError, ErrorResponse, ModelNotFoundError, RateLimitError, install_handlers, unwrap
from serve_app.ratelimit_headers import RATE_LIMIT_HEADERS, ratelimit_headers
from serve_app.protocol import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Choice,
    CompletionUsage,
    Model,
    ModelList,
    completion_id,
)
from serve_app.settings import IngressSettings, ModelSettings
from serve_app.sse import chat_completion_events
from serve_app.web import router as web_router
from serve_app.stage_types import GenerationChunk, GenerationRequest, ImageInput, PreprocessedImage, RateDecision

logger = logging.getLogger("ray.serve")

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 503)}

api = FastAPI(
    title="vlm-serve",
    summary="OpenAI-compatible chat completions with images, on Ray Serve.",
    responses=_ERRORS,
)
install_handlers(api)
api.include_router(web_router)  # TEMP(issue 5 helper): the chat page at / and /static


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
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

    def _authenticate(self, request: Request) -> Principal:
        client = request.client.host if request.client else "unknown"
        return self._auth.authenticate(request.headers.get("authorization"), client)

    # ---- models ------------------------------------------------------------------------------

    async def _info(self) -> ModelInfo:
        if self._model_info is None:
            self._model_info = await self._vlm.model_info.remote()
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
        return {"status": "ok"}

    # ---- chat completions --------------------------------------------------------------------

    @api.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(self, body: ChatCompletionRequest, request: Request, response: Response):
        principal = self._authenticate(request)
        if body.model not in self._model.names:
            raise self._unknown_model(body.model)
        messages, image_inputs = split_request(body, self._settings)
        sampling = sampling_params(body, self._settings)
        decision = await self._admit(principal, estimate_tokens(body, self._model.default_max_tokens))
        headers = ratelimit_headers(decision)
        settled = False

        async def settle(tokens_used: int) -> None:
            nonlocal settled
            if decision is not None and decision.reservation is not None and not settled:
                settled = True
                await self._rate_limiter.settle.remote(principal.name, decision.reservation, tokens_used)

        try:
            images = await self._preprocess(image_inputs)
            request_ = GenerationRequest(messages=messages, images=images, sampling=sampling)
            stream = self._vlm.options(stream=True).generate.remote(request_)
            try:
                first: GenerationChunk = await anext(stream)  # request errors arrive here, before any byte
            except Exception as exc:
                raise unwrap(exc) or exc
        except APIError as exc:
            await settle(0)
            exc.extra_headers = headers
            raise
        cid = completion_id()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = chat_completion_events(stream, first, cid, body.model, include_usage, settle)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        try:
            completion = await self._collect(stream, first, cid, body.model)
        except BaseException:
            await settle(0)
            raise
        await settle(completion.usage.total_tokens)
        response.headers.update(headers)
        return completion

    async def _admit(self, principal: Principal, tokens: int) -> RateDecision | None:
        if self._rate_limiter is None or not principal.limits.enabled:
            return None
        decision: RateDecision = await self._rate_limiter.admit.remote(principal.name, tokens, principal.limits)
        if not decision.admitted:
            error = RateLimitError(
                f"Rate limit reached for {principal.name.split(':', 1)[0]} requests. "
                f"Please try again in {decision.retry_after_s:.1f}s.",
                retry_after_s=decision.retry_after_s,
            )
            error.extra_headers = ratelimit_headers(decision)
            raise error
        return decision

    async def _preprocess(self, inputs: list[ImageInput]) -> list[PreprocessedImage]:
        try:
            return list(await asyncio.gather(*(self._preprocessor.process.remote(i) for i in inputs)))
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
        usage = CompletionUsage(
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            total_tokens=last.prompt_tokens + last.completion_tokens,
        )
        choice = Choice(message=ChatCompletionMessage(content="".join(texts)), finish_reason=last.finish_reason)
        return ChatCompletion(id=cid, model=model, choices=[choice], usage=usage)
