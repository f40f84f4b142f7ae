"""The engine interface: what the model replica (deployments/vlm.py) drives, whichever engine runs.

Three implementations:
- `engine.generate.engine.GenerateEngine`: each batch through one transformers `generate()` call,
  one batch at a time on the engine's own thread;
- `engine.continuous.engine.ContinuousEngine`: iteration-level batching over a slot KV cache;
  requests join the running decode at the next step and leave it the step they finish;
- `engine.process.engine_process.EngineProcess`: either of the two in a child process, driven over
  pipes.
`engine.factory.load_engine` picks and builds an in-process one from the model settings.

Lifecycle, as the replica uses it: the engine is built loaded (its constructor returns once the
model can run); then, from any thread, `prepare` turns each request into token ids, `submit` hands
batches of prepared requests to the engine's loop and `cancel` withdraws one; the health check reads
`busy` and `last_step_at` and calls `probe` when idle; `close` is called once, at shutdown.

Streaming contract of `submit`: the callback gets, per engine step, one entry per request of the
batch, in the batch's order:
- a `GenerationChunk`: new text (possibly empty) and the cumulative token counts; the last one of a
  request carries its `finish_reason`, and nothing comes for that request after it;
- an exception: that request failed alone (for example its sampling parameters could not be used);
  nothing comes for it after this, and the batch's other requests go on;
- None: nothing new for that request at this step.
A request that was cancelled gets no further entries (nobody is listening). Every callback of a
batch happens before its future completes.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

from serve_app.stage_types import CacheStats, GenerationChunk, GenerationRequest

if TYPE_CHECKING:
    from engine.prompts import PreparedRequest, Prompter
    from serve_app.settings import ModelSettings

logger = logging.getLogger("ray.serve")

# One request's entry in one step's callback (see the module docstring).
StepOutput = GenerationChunk | BaseException | None
# Called with one step's entries, one per request of the submitted batch, from an engine thread.
StepCallback = Callable[[list[StepOutput]], None]


class Engine(ABC):
    """A loaded model that turns prepared requests into streamed text."""

    # ---- what is served -------------------------------------------------------------------------

    @property
    @abstractmethod
    def settings(self) -> ModelSettings:
        """The model settings the engine was built from (id, aliases, limits).

        Read at any time, e.g. by the replica's `model_info`; never changes.
        """
        raise NotImplementedError

    @property
    @abstractmethod
    def quantization(self) -> str:
        """How the weights (and KV cache) are stored, as `/v1/models` reports it: "none",
        "gptq-4bit", with "+kv-int8" (or "+kv-int4") where the KV cache is quantized.

        Read at any time; never changes.
        """
        raise NotImplementedError

    @property
    @abstractmethod
    def device(self) -> str:
        """Where the model runs, as torch names the device ("cpu", "cuda", "cuda:1").

        Read at any time; never changes.
        """
        raise NotImplementedError

    @property
    @abstractmethod
    def prompter(self) -> Prompter:
        """What prepares this engine's requests: the model's chat template and tokenizer, the prompt
        limits, and the generation defaults a request's left-out fields get.

        Read at any time (e.g. by `model_info`); needs only the processor, never the model.
        """
        raise NotImplementedError

    # ---- requests -------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Render `request` with the model's chat template and tokenize it, its limits resolved.

        Called once per request, on a worker thread of the replica (it may take milliseconds),
        before the request is admitted; touches no model state, so it may run while the engine
        steps.

        Returns:
            The prepared request, to pass to `submit` and `cancel`.

        Raises:
            InvalidRequestError, ContextLengthError: the request cannot be served as asked.
        """
        return self.prompter.prepare(request)

    @abstractmethod
    def submit(self, batch: list[PreparedRequest], on_step: StepCallback) -> Future:
        """Hand `batch` to the engine's loop and return at once.

        Called once per batch that the replica gathered (`@serve.batch`), from the replica's event
        loop; must not block. The requests join the engine's running work: at the continuous
        engine's next step, or after the batches before them on the generate() engine.

        Args:
            batch: prepared requests, each submitted once.
            on_step: called from an engine thread after every step that has news for any request
                of the batch, with one entry per request (see the module docstring). It must be
                quick and must not raise; an error it raises is logged and ignored.

        Returns:
            A future that completes (with None) when every request of the batch is done, after its
            last `on_step` call; or fails with the error that failed the whole batch (a broken
            step, a prompt the model refused, an engine that was closed).

        Raises:
            ValueError: a request cannot fit the engine at all (e.g. longer than a KV cache slot).
            RuntimeError: the engine is closed.
        """
        raise NotImplementedError

    @abstractmethod
    def cancel(self, request: PreparedRequest) -> None:
        """Withdraw `request`: the engine drops its row at its next step and sends it nothing more.

        Called once when a request's stream ends for any reason (finished, failed, or the client
        went away), from the replica's event loop; must not block. Harmless for a request that
        already finished or was never submitted.
        """
        raise NotImplementedError

    # ---- health -----------------------------------------------------------------------------------

    @abstractmethod
    def probe(self) -> None:
        """Run one tiny forward pass, between the engine's steps (never concurrently with one).

        Called by the replica's health check while the engine is not `busy`, on a thread of its
        own, with a timeout. Blocks until the pass ran.

        Raises:
            Exception: the model can no longer run (a broken device, a dead engine process).
        """
        raise NotImplementedError

    @property
    @abstractmethod
    def busy(self) -> bool:
        """Whether the engine has requests submitted and not yet finished.

        Read by the health check: while busy, the engine must keep making steps (`last_step_at`).
        """
        raise NotImplementedError

    @property
    @abstractmethod
    def last_step_at(self) -> float:
        """`time.monotonic()` of the engine's last step, or of the submit that made it busy.

        Read by the health check while `busy`: a value older than the stall timeout means the
        engine is stuck.
        """
        raise NotImplementedError

    @property
    @abstractmethod
    def live(self) -> int:
        """Sequences being decoded now (not those waiting for room). Read for logs and metrics."""
        raise NotImplementedError

    def cache_stats(self) -> CacheStats:
        """The prefix cache's and the encoder cache's figures so far (all zero for an engine without them).

        Read at any time, from any thread, by the replica's metrics; the counts only grow.
        """
        return CacheStats()

    # ---- shutdown -------------------------------------------------------------------------------

    @abstractmethod
    def close(self) -> None:
        """Stop the engine's threads (or process); requests still in flight fail.

        Called once, when the replica shuts down; `submit` and `probe` raise after it.
        """
        raise NotImplementedError

    # ---- conveniences built on the above ----------------------------------------------------------

    def generate_batch(self, batch: list[PreparedRequest], on_step: StepCallback) -> None:
        """`submit(batch, on_step)` and wait for it: for tests and benchmarks, which drive an engine
        from a plain thread. Raises what failed the batch."""
        self.submit(batch, on_step).result()


def deliver(on_step: StepCallback, entries: list[StepOutput]) -> None:
    """Call a batch's `on_step` with one step's entries, as every engine must: an error the callback
    raises is logged and goes no further (one consumer must not stop the others' decoding)."""
    try:
        on_step(entries)
    except Exception:
        logger.exception("A step callback failed")
