"""Turning a stream of token bytes into text that is safe to send: whole characters, no stop strings.

A GPT-2 token is a run of bytes that may end in the middle of a UTF-8 character, and a stop
string may be split across several tokens. Text is therefore released only once it is
known to be final: incomplete UTF-8 sequences wait for the next token, and a tail of text
that could still grow into a stop string waits until it either does (then it and
everything after it are dropped) or cannot any more.

Each stop string is followed by a Knuth-Morris-Pratt matcher that sees every character
once, so the work per token is proportional to the token's length, however long the stop
strings are; the text held back is never longer than the longest stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class _StopMatcher:
    """How much of one stop string the text so far ends with, updated a character at a time."""

    def __init__(self, stop: str):
        self.stop = stop
        # fallback[i]: length of the longest proper prefix of stop[:i + 1] that is also its suffix.
        self.fallback = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fallback[i] = k
        self.matched = 0  # the text ends with stop[:matched]

    def feed(self, char: str) -> bool:
        """Take the next character; True when the text now ends with the whole stop string."""
        k = self.matched
        while k and self.stop[k] != char:
            k = self.fallback[k - 1]
        if self.stop[k] == char:
            k += 1
        if k == len(self.stop):
            self.matched = self.fallback[k - 1]
            return True
        self.matched = k
        return False


class TextStream:

    def __init__(self, stop: Sequence[str] = ()):
        # Bytes that can never become valid UTF-8 are replaced by U+FFFD, as a client's own
        # decoder would show them, rather than failing the request.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._matchers = [_StopMatcher(s) for s in dict.fromkeys(stop) if s]
        self._pending = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that can be released now (possibly "")."""
        if self.stopped:
            return ""
        return self._release(self._decoder.decode(data))

    def finish(self) -> str:
        """Generation ended without a stop string: release whatever is still held back."""
        if self.stopped:
            return ""
        text = self._release(self._decoder.decode(b"", final=True))
        if not self.stopped:
            text += self._pending
            self._pending = ""
        return text

    def _release(self, new_text: str) -> str:
        pending = self._pending + new_text
        if not self._matchers:
            self._pending = ""
            return pending
        # Where each stop string first ends within the new text; the one that starts
        # earliest wins, as if the whole pending text had been searched.
        starts = []
        for offset, char in enumerate(new_text, start=len(self._pending)):
            for matcher in self._matchers:
                if matcher.feed(char):
                    starts.append(offset + 1 - len(matcher.stop))
        if starts:
            self.stopped = True
            self._pending = ""
            return pending[:min(starts)]
        keep = max(m.matched for m in self._matchers)
        self._pending = pending[len(pending) - keep:]
        return pending[:len(pending) - keep]
