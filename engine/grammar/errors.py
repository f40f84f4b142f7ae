"""GrammarError: a response format or tool list that constrained decoding cannot enforce."""

from __future__ import annotations

from serve_app.errors import InvalidRequestError


class GrammarError(InvalidRequestError, ValueError):
    """A schema or tool list that cannot be compiled into a grammar, or uses a feature the grammar
    would silently ignore. The message names the problem; `param` is the request parameter it came
    from ("response_format" or "tools"), so it crosses a Ray handle and reaches the client as an
    OpenAI-shaped 400 as it is."""
