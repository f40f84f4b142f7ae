"""Where a model config's checkpoint is: a local directory or a hub id that `from_pretrained` loads."""

from __future__ import annotations

from serve_app.settings import ModelSettings


def checkpoint_source(settings: ModelSettings) -> str:
    """A path or hub id for `from_pretrained`: the local directory when `path` names one, else `path`
    itself as a hub id (transformers resolves it through its cache)."""
    local = settings.checkpoint_dir()
    return str(local) if local is not None else settings.path
