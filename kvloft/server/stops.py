"""An answer's text as its tokens arrive, cut at the first stop string, whatever tokens it spans.

    text = AnswerText(tokenizer, stops=["\\n\\n", "END"])
    piece, stopped = text.push(token_id)      # text safe to send now; True once a stop string is complete
    tail = text.flush()                       # at EOS or max_tokens: what was held back

The text is decoded from all the answer's tokens at each step (as Session.stream does, so a
multi-byte character split over tokens is never sent half). A stop string may end in a later
token than it starts in: text that could be the start of a stop string is held back until the
next tokens show it is not, so no piece of a stop string is ever sent. With no stop strings
nothing is held back and the pieces are exactly Session.stream's.
"""

from __future__ import annotations

from collections.abc import Sequence


class AnswerText:
    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.complete = ""  # the text at the last step that did not end in a partial character
        self.sent = 0  # characters of `complete` given out
        self.stopped = False

    @property
    def text(self) -> str:
        """The answer so far, as it will read: cut before a stop string once one is complete."""
        return self.complete[: self.sent] if self.stopped else self.complete

    def push(self, token: int) -> tuple[str, bool]:
        """Add one generated token: (text that can be sent now, whether a stop string completed)."""
        if self.stopped:
            raise RuntimeError("the answer already ended at a stop string")
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait
            return "", False
        self.complete = text
        hit = self._first_stop(text)
        if hit is not None:
            self.stopped = True
            return self._send_to(max(hit, self.sent)), True
        return self._send_to(len(text) - self._held(text)), False

    def flush(self) -> str:
        """The text held back (the answer ended without completing a stop string)."""
        return "" if self.stopped else self._send_to(len(self.complete))

    def _send_to(self, end: int) -> str:
        piece = self.complete[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """Characters at the end of `text` that begin some stop string (so may become one)."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
