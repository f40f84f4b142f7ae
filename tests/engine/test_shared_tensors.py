"""How pixels cross processes without torch's pickler: to the engine process as tmpfs files
(engine/process/shared_tensors.py), between Ray replicas as numpy arrays (PreprocessedImage)."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.process import shared_tensors
from serve_app.stage_types import PreprocessedImage

# Reads one pickled message from stdin, as the engine process reads its pipe, and reports what it got.
_RECEIVER = """
import pickle, sys
message = pickle.loads(sys.stdin.buffer.read())
pixels = message["pixels"]
print(pixels.dtype, tuple(pixels.shape), float(pixels.float().sum()), message["ids"].tolist())
"""


def _pixels() -> torch.Tensor:
    return torch.randn(1024, 1176, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def test_a_large_tensor_crosses_to_another_process_as_a_file_it_unlinks() -> None:
    pixels, ids = _pixels(), torch.arange(5)
    data, files = shared_tensors.dumps({"pixels": pixels, "ids": ids})
    assert len(files) == 1 and Path(files[0]).exists()  # the pixels, not the 5 ids
    assert len(data) < 4096  # the pipe carries the file's name, not 2.4 MB
    received = subprocess.run([sys.executable, "-c", _RECEIVER], input=data, capture_output=True, check=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.decode().split(" ", 3)
    assert received[0] == "torch.bfloat16" and received[1:3] == ["(1024,", "1176)"]
    assert float(received[3].split()[0]) == pytest.approx(float(pixels.float().sum()), rel=1e-6)
    assert not Path(files[0]).exists()  # the receiver unlinked it: freed once it drops the tensor


def test_the_received_tensor_equals_the_sent_one_whatever_its_layout() -> None:
    pixels = _pixels()
    message = (pixels, pixels.t(), pixels[::2, 100:], torch.ones(3, dtype=torch.bool))
    data, files = shared_tensors.dumps(message)
    assert len(files) == 3
    for sent, received in zip(message, pickle.loads(data)):
        assert received.dtype == sent.dtype and torch.equal(received, sent)
    assert not any(Path(f).exists() for f in files)


def test_where_no_tmpfs_has_room_the_tensor_goes_inline(monkeypatch, tmp_path: Path) -> None:
    pixels = _pixels()
    data, files = shared_tensors.dumps(pixels, directory=tmp_path / "missing")
    assert files == [] and torch.equal(pickle.loads(data), pixels)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    data, files = shared_tensors.dumps(pixels, directory=tmp_path)
    assert files == [] and torch.equal(pickle.loads(data), pixels)
    assert list(tmp_path.iterdir()) == []  # the file it began is gone too


def test_files_nobody_will_read_are_discarded_and_a_dead_writers_swept(tmp_path: Path) -> None:
    _, files = shared_tensors.dumps(_pixels(), directory=tmp_path)
    shared_tensors.discard(files + [str(tmp_path / "already-gone")])
    assert list(tmp_path.iterdir()) == []

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          check=True).stdout.decode().strip()
    (tmp_path / f"vlm-tensor-{gone}-0a1b").write_bytes(b"left by a killed replica")
    _, mine = shared_tensors.dumps(_pixels(), directory=tmp_path)
    assert shared_tensors.sweep(tmp_path) == 1
    assert [str(p) for p in tmp_path.iterdir()] == mine  # this live process's file stays
    shared_tensors.discard(mine)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_preprocessed_image_pickles_its_pixels_out_of_band_as_ray_passes_them(dtype) -> None:
    # Ray pickles with protocol 5 and keeps the out-of-band buffers in its object store, which hands
    # numpy arrays back without a copy; a torch tensor would be pickled in band, through torch.save.
    image = PreprocessedImage(_pixels().to(dtype), (1, 32, 32), 448, 448, 256)
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(image, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1 and buffers[0].raw().nbytes == image.pixel_values.nbytes and len(data) < 1024
    received = pickle.loads(data, buffers=buffers)
    assert received.pixel_values.dtype == dtype and torch.equal(received.pixel_values, image.pixel_values)
    assert (received.grid_thw, received.width, received.height, received.tokens) == ((1, 32, 32), 448, 448, 256)
