"""Find the checkpoint a model config names, building the embedded demo one when it is missing."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from serve_app.settings import ModelSettings

logger = logging.getLogger("ray.serve")


def ensure_checkpoint(settings: ModelSettings) -> str:
    """A path or hub id that `from_pretrained` can load; makes the demo checkpoint if asked to."""
    local = settings.checkpoint_dir()
    if local is None:
        return settings.path  # a hub id: transformers resolves it through its cache
    if settings.make_demo_if_missing:
        # Several replicas may start at once: one builds, the others wait for it.
        local.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(local) + ".lock"):
            if not (local / "config.json").exists():
                _build_demo(local)
    return str(local)


def _build_demo(target: Path) -> None:
    from serve_app.demo_model import make_demo_model

    logger.info("Building the demo checkpoint at %s", target)
    # Build beside the target and rename, so a crash never leaves a half-written checkpoint.
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        make_demo_model(scratch)
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
