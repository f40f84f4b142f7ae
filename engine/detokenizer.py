"""Detokenizer: one sequence's growing token list turned into text deltas that are safe to stream.

Safe means: never half a character (a multi-byte character split across tokens waits for its
rest) and never the start of a stop sequence that the next tokens may complete (held back until
it is either completed, and cut, or ruled out). Needs only a tokenizer's `decode`, no torch.
"""

from __future__ import annotations


def decodes_piecewise(tokenizer) -> bool:
    """Whether decoding a token list equals decoding two parts of it and joining the texts, for any
    split after which the first part's text is whole (does not end in U+FFFD, half a character).

    True for byte-level BPE (GLM's tokenizer, the demo's): decoding concatenates each token's bytes
    and reads them as UTF-8, so a split at a character boundary changes nothing; unless the
    tokenizer cleans up spaces around punctuation afterwards, which looks across the split.
    """
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel" and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False


class Detokenizer:
    """Turns a growing token list into text deltas, holding back what a stop sequence might claim."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already emitted
        # Decoding the whole answer again at every token costs O(length) per token and sequence;
        # where the tokenizer allows, only the tokens after the last whole-character point are.
        self._piecewise = decodes_piecewise(tokenizer)
        self._settled_text = ""
        self._settled = 0  # tokens whose text is _settled_text

    @property
    def piecewise(self) -> bool:
        """Whether only the tokens after the last whole character are decoded again."""
        return self._piecewise

    def _text(self) -> str:
        tail = self._tokenizer.decode(self.tokens[self._settled:], skip_special_tokens=True)
        text = self._settled_text + tail
        if self._piecewise and not tail.endswith("\ufffd"):
            self._settled_text, self._settled = text, len(self.tokens)
        return text

    def add(self, token: int) -> tuple[str, bool]:
        """Append `token`; returns the text that is now safe to emit, and whether a stop sequence was met
        (then the text ends where the stop sequence began, and nothing more is to be sent)."""
        self.tokens.append(token)
        text = self._text()
        for stop in self._stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                return self._take(text[:at]), True
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return "", False
        return self._take(text[: len(text) - self._held_back(text)]), False

    def flush(self) -> str:
        """Everything not sent yet (the sequence ended): held-back text, less a trailing half character."""
        text = self._text().rstrip("\ufffd")
        return self._take(text)

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop sequence."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _take(self, text: str) -> str:
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta
