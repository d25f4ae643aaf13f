"""Turning a stream of token bytes into text that is safe to send: whole characters, no stop strings.

A GPT-2 token is a run of bytes that may end in the middle of a UTF-8 character, and a stop
string may be split across several tokens. Text is therefore released only once it is
known to be final: incomplete UTF-8 sequences wait for the next token, and a tail of text
that could still grow into a stop string waits until it either does (then it and
everything after it are dropped) or cannot any more.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:

    def __init__(self, stop: Sequence[str] = ()):
        # Bytes that can never become valid UTF-8 are replaced by U+FFFD, as a client's own
        # decoder would show them, rather than failing the request.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stop if s)
        self._pending = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that can be released now (possibly "")."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._release()

    def finish(self) -> str:
        """Generation ended without a stop string: release whatever is still held back."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        text = self._release()
        if not self.stopped:
            text += self._pending
            self._pending = ""
        return text

    def _release(self) -> str:
        pending = self._pending
        if not self._stops:
            self._pending = ""
            return pending
        hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return pending[:min(hits)]
        keep = self._stop_prefix_length(pending)
        self._pending = pending[len(pending) - keep:]
        return pending[:len(pending) - keep]

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that some stop string begins with."""
        longest = min(len(text), max(len(s) for s in self._stops) - 1)
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
