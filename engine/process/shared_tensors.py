"""Large tensors handed to another process of this machine as files on tmpfs, not through a pipe.

The model replica sends each batch of requests to its engine process (engine/process/engine_process.py)
over a pipe. Pickled inline, a batch of 14 requests with one 448x448 image each is 34 MB, and a pipe
moves it 64 KB at a time: the reader takes the GIL back for every chunk, from an engine thread busy
with a prefill pass, and the replica's event loop waits in the write meanwhile. Measured on a 2-core
machine, one such batch took 130-160 ms to cross, and 440 ms while the reader's process ran Python on
another thread. On an H100 the replica handed a burst of 32 requests to the engine over 0.24 s though
they had reached it within 0.12 s (benchmarks/RESULTS.md, run H).

`dumps` instead writes every tensor of `min_bytes` or more to a file under /dev/shm and pickles its
name; unpickling maps the file privately (no copy) and unlinks it, so the kernel frees the memory once
the receiver drops the tensor. Where no tmpfs has room (a container's 64 MB /dev/shm, say), the space
is reserved up front and, failing that, the tensor is pickled inline as before.

Written here because the libraries' ways do not fit: `multiprocessing.shared_memory` registers every
segment with a resource tracker that, on Python 3.11, unlinks it when the attaching process exits;
torch.multiprocessing passes tensors as file descriptors, which needs a socket round trip per tensor
(or, with its file_system strategy, a manager daemon).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import uuid
from pathlib import Path

import torch

logger = logging.getLogger("ray.serve")

DIRECTORY = Path("/dev/shm")
MIN_BYTES = 64 * 1024  # smaller tensors cross the pipe in one write anyway
_PREFIX = "vlm-tensor-"
_NAME = re.compile(rf"{_PREFIX}(\d+)-[0-9a-f]+$")  # the writer's pid, then a unique part


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, directory: Path, min_bytes: int) -> None:
        super().__init__(file, protocol=5)
        self.directory, self.min_bytes = directory, min_bytes
        self.paths: list[str] = []

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.nbytes >= self.min_bytes:
            path = _write(obj, self.directory)
            if path is not None:
                self.paths.append(path)
                return _map, (path, obj.dtype, tuple(obj.shape))
        return NotImplemented


def dumps(message: object, directory: Path = DIRECTORY, min_bytes: int = MIN_BYTES) -> tuple[bytes, list[str]]:
    """`message` pickled, its large tensors written to files; returns the bytes and those files (which
    the receiver unlinks when it unpickles them: `discard` them if it never will)."""
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, directory, min_bytes)
    try:
        pickler.dump(message)
    except BaseException:
        discard(pickler.paths)
        raise
    return buffer.getvalue(), pickler.paths


def _write(tensor: torch.Tensor, directory: Path) -> str | None:
    """The tensor's bytes in a new file under `directory`, or None where it cannot hold them."""
    path = str(directory / f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
    data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        return None
    try:
        # Reserved first, so that a tmpfs without room fails here (ENOSPC) before a byte is copied,
        # and the tensor goes inline.
        os.posix_fallocate(fd, 0, len(data))
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError as error:
        os.close(fd)
        os.unlink(path)
        logger.debug("%s has no room for a %d-byte tensor (%s): sent inline", directory, len(data), error)
        return None
    os.close(fd)
    return path


def _map(path: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Unpickling: the file's tensor, mapped copy-on-write; the file is unlinked at once."""
    try:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        flat = torch.from_file(path, shared=False, size=size, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    finally:
        os.unlink(path)
    return flat.view(dtype).view(shape)


def discard(paths: list[str]) -> None:
    """Remove files a receiver will never unpickle (it died, or the message was never sent)."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def sweep(directory: Path = DIRECTORY) -> int:
    """Remove files left by processes that are gone (a replica killed with its engine process
    between writing a batch and the engine reading it); returns how many."""
    if not Path("/proc").is_dir() or not directory.is_dir():
        return 0
    removed = 0
    for path in directory.glob(f"{_PREFIX}*"):
        match = _NAME.match(path.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            path.unlink(missing_ok=True)
            removed += 1
    return removed
