"""EngineProcess: an engine's loop in a process of its own, driven from the model replica.

The model replica's process receives requests through Ray, prepares them (chat template,
tokenization) and streams their chunks back. With the engine in that same process, all of it
shares one GIL with the engine thread, whose prefill dispatches hundreds of kernels from Python per
pass, so request handling and kernel launches slow each other down; vLLM separates its engine core
from its API server for the same reason. Here the replica keeps the processor, to prepare
requests, and this client, which offers the engine interface (engine/protocol.py); a child process
loads the model and runs the engine `load_engine` picks, and the two talk over two pipes:

    replica -> engine: settings (JSON, first), then ("submit", group, [PreparedRequest]),
                       ("cancel", group, index), ("probe", job), ("close",)
    engine -> replica: ("ready", EngineInfo) or ("failed", traceback), then ("step", group, entries),
                       ("done", group, error or None), ("probed", job, error or None),
                       ("beat", last_step_at, live, busy, CacheStats) twice a second

Messages are pickled by hand (protocol 5). The replica's large tensors (the images' pixels) cross
as files on tmpfs, mapped by the child (engine/process/shared_tensors.py): pickled inline, a batch of
requests is tens of MB, which a pipe moves 64 KB at a time. The child is started with `subprocess`
(not multiprocessing's spawn, which would re-import the Ray worker's `__main__`), exits when its
input pipe closes (the replica died or closed it), and the replica fails every request in flight
when the child's output pipe closes.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from engine.process import shared_tensors
from engine.prompts import PreparedRequest, Prompter
from engine.protocol import Engine, StepCallback, StepOutput, deliver
from serve_app.errors import ServiceUnavailableError
from serve_app.settings import ModelSettings
from serve_app.stage_types import CacheStats

logger = logging.getLogger("ray.serve")

_BEAT_S = 0.5


@dataclass(frozen=True)
class EngineInfo:
    """What the child reports once its model is loaded."""

    device: str
    quantization: str
    kind: str  # the engine's class, for the log


def _portable(error: BaseException | None) -> BaseException | None:
    """`error` if it pickles, else a RuntimeError with its text (e.g. one that holds a tensor)."""
    if error is None:
        return None
    try:
        pickle.dumps(error, protocol=5)
        return error
    except Exception:  # noqa: BLE001 - whatever stops it from pickling
        return RuntimeError(f"{type(error).__name__}: {error}")


def _portable_entries(entries: list[StepOutput]) -> list[StepOutput]:
    return [_portable(e) if isinstance(e, BaseException) else e for e in entries]


@dataclass
class _Group:
    batch: list[PreparedRequest]
    on_step: StepCallback
    future: Future
    files: list[str] = field(default_factory=list)  # its tensors' files, unlinked by the child as it reads them


class EngineProcess(Engine):
    """The replica's side: prepares requests itself and runs the engine interface over the child."""

    def __init__(self, settings: ModelSettings) -> None:
        from transformers import AutoProcessor

        from engine.checkpoints import checkpoint_source

        self._settings = settings
        shared_tensors.sweep()  # tensors a killed replica wrote for a child that never read them
        # The replica builds a missing demo checkpoint itself, so the child only ever loads one.
        self._prompter = Prompter(settings, AutoProcessor.from_pretrained(checkpoint_source(settings)))
        to_child, from_parent = os.pipe()[::-1]
        from_child, to_parent = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "engine.process.engine_process", str(from_parent), str(to_parent)],
            pass_fds=(from_parent, to_parent), env=env,
        )
        os.close(from_parent)
        os.close(to_parent)
        self._outbox = Connection(to_child, readable=False)
        self._inbox = Connection(from_child, writable=False)
        self._send_lock = threading.Lock()
        self._groups: dict[int, _Group] = {}
        self._probes: dict[int, Future] = {}
        self._ids = itertools.count()
        self._gone: BaseException | None = None
        self._closing = False
        self._busy = False
        self._live = 0
        self._cache_stats = CacheStats()
        self._last_step_at = time.monotonic()
        self._outbox.send_bytes(settings.model_dump_json().encode())
        self._info = self._wait_ready()
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()
        logger.info("The engine runs in process %d (%s on %s)", self._process.pid, self._info.kind, self.device)

    def _wait_ready(self) -> EngineInfo:
        try:
            kind, payload = pickle.loads(self._inbox.recv_bytes())
        except EOFError:
            raise RuntimeError(f"the engine process exited while loading (code {self._process.wait()})") from None
        if kind == "failed":
            self._process.wait(timeout=30)
            raise RuntimeError(f"the engine process could not load the model:\n{payload}")
        return payload

    # ---- the engine interface -------------------------------------------------------------------

    @property
    def settings(self) -> ModelSettings:
        return self._settings

    @property
    def quantization(self) -> str:
        return self._info.quantization

    @property
    def device(self) -> str:
        return self._info.device

    @property
    def prompter(self) -> Prompter:
        return self._prompter

    def submit(self, batch: list[PreparedRequest], on_step: StepCallback) -> Future:
        """Queue `batch` in the child; `on_step` gets each step's entries on the reader thread. A
        child that is gone fails the future (with a 503-mapped error) rather than raising."""
        group, future = next(self._ids), Future()
        if self._gone is not None:
            future.set_exception(self._gone)
            return future
        self._groups[group] = entry = _Group(batch, on_step, future)
        if not self._busy:  # the child's beat may be older than this: the stall clock starts now
            self._last_step_at = time.monotonic()
        self._busy = True
        for index, request in enumerate(batch):
            request.engine_row = (group, index)
        entry.files = self._send(("submit", group, batch))
        for request in batch:  # the child has its own now; this replica only streams the text
            request.pixel_values = None
        return future

    def cancel(self, request: PreparedRequest) -> None:
        """The client went away (or the request ended): the child drops the row at its next step."""
        request.cancelled = True
        if request.engine_row is not None and request.engine_row[0] in self._groups:
            with suppress(ServiceUnavailableError):  # the child died: its rows are gone with it
                self._send(("cancel", *request.engine_row))

    def probe(self) -> None:
        """One tiny forward pass in the child (between its iterations); raises if it cannot run."""
        job, future = next(self._ids), Future()
        if self._gone is not None:
            raise self._gone
        self._probes[job] = future
        self._send(("probe", job))
        future.result()

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def last_step_at(self) -> float:
        return self._last_step_at

    @property
    def live(self) -> int:
        return self._live

    def cache_stats(self) -> CacheStats:
        """The child's figures as of its last beat."""
        return self._cache_stats

    def close(self) -> None:
        """Ask the child to stop its engine and exit; kill it if it does not within 30 s."""
        self._closing = True
        try:
            self._send(("close",))
            self._process.wait(timeout=30)
        except Exception:  # noqa: BLE001 - already gone, or stuck: make sure it ends
            self._process.kill()
            self._process.wait()

    # ---- the pipes -------------------------------------------------------------------------------

    def _send(self, message: tuple) -> list[str]:
        """Send `message`; returns the files its tensors went into (see engine/process/shared_tensors.py)."""
        data, files = shared_tensors.dumps(message)
        with self._send_lock:
            try:
                self._outbox.send_bytes(data)
            except OSError:  # the child is gone (the reader may not have seen it yet): a 503 either way
                shared_tensors.discard(files)
                raise self._gone or ServiceUnavailableError(
                    "The model's engine process is gone; the model replica is being replaced.", retry_after_s=5
                ) from None
        return files

    def _read(self) -> None:
        while True:
            try:
                message = pickle.loads(self._inbox.recv_bytes())
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "step":
                group = self._groups.get(message[1])
                if group is not None:
                    deliver(group.on_step, message[2])
            elif kind == "done":
                group = self._groups.pop(message[1], None)
                self._busy = bool(self._groups)  # until the next beat says whether the child still drains
                if group is not None:
                    if message[2] is None:
                        group.future.set_result(None)
                    else:
                        group.future.set_exception(message[2])
            elif kind == "probed":
                probe = self._probes.pop(message[1], None)
                if probe is not None:
                    probe.set_result(None) if message[2] is None else probe.set_exception(message[2])
            elif kind == "beat":
                last_step_at, self._live, busy, self._cache_stats = message[1:]
                self._last_step_at = max(self._last_step_at, last_step_at)
                self._busy = busy or bool(self._groups)
        self._fail_everything()

    def _fail_everything(self) -> None:
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        # 503: the replica fails its next health check and Serve replaces it, engine and all.
        self._gone = ServiceUnavailableError(
            f"The model's engine process exited (code {code}); the model replica is being replaced.", retry_after_s=5
        )
        if self._closing and not self._groups:
            return
        logger.error("The engine process %d exited (code %s): failing %d groups in flight", self._process.pid, code,
                     len(self._groups))
        for group in list(self._groups.values()):
            shared_tensors.discard(group.files)  # what the child had not read yet
            group.future.set_exception(self._gone)
        for probe in list(self._probes.values()):
            probe.set_exception(self._gone)
        self._groups.clear()
        self._probes.clear()
        self._busy = False


# ---- the child process ----------------------------------------------------------------------------


def _child(from_parent: int, to_parent: int) -> int:
    inbox = Connection(from_parent, writable=False)
    outbox = Connection(to_parent, readable=False)
    lock = threading.Lock()

    def send(message: tuple) -> None:
        data = pickle.dumps(message, protocol=5)
        with lock:
            outbox.send_bytes(data)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s engine-process pid={os.getpid()} %(levelname)s %(name)s: %(message)s")
    settings = ModelSettings.model_validate_json(inbox.recv_bytes())
    try:
        from engine.factory import load_engine

        engine = load_engine(settings)
    except BaseException:  # noqa: BLE001 - reported to the replica, which raises it
        send(("failed", traceback.format_exc()))
        return 1
    send(("ready", EngineInfo(engine.device, engine.quantization, type(engine).__name__)))
    requests: dict[int, list[PreparedRequest]] = {}

    def beat() -> None:
        while True:
            send(("beat", engine.last_step_at, engine.live, engine.busy, engine.cache_stats()))
            time.sleep(_BEAT_S)

    def finished(group: int, done: Future) -> None:
        requests.pop(group, None)
        send(("done", group, _portable(done.exception())))

    def probe(job: int) -> None:
        try:
            engine.probe()
            send(("probed", job, None))
        except Exception as error:  # noqa: BLE001 - reported to the replica
            send(("probed", job, _portable(error)))

    threading.Thread(target=beat, name="beat", daemon=True).start()
    while True:
        try:
            message = pickle.loads(inbox.recv_bytes())
        except EOFError:  # the replica is gone: nobody is left to answer
            break
        kind = message[0]
        if kind == "submit":
            group, batch = message[1], message[2]
            requests[group] = batch
            try:
                future = engine.submit(batch, lambda entries, group=group: send(("step", group,
                                                                               _portable_entries(entries))))
            except Exception as error:  # noqa: BLE001 - e.g. a prompt too long for a slot
                requests.pop(group, None)
                send(("done", group, _portable(error)))
                continue
            future.add_done_callback(lambda done, group=group: finished(group, done))
        elif kind == "cancel":
            batch = requests.get(message[1])
            if batch is not None:
                engine.cancel(batch[message[2]])
        elif kind == "probe":
            threading.Thread(target=probe, args=(message[1],), daemon=True).start()
        elif kind == "close":
            break
    engine.close()
    return 0


if __name__ == "__main__":
    # Through the module's own name, so that what it pickles (EngineInfo) is found under that name.
    from engine.process.engine_process import _child as child

    sys.exit(child(int(sys.argv[1]), int(sys.argv[2])))
