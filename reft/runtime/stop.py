"""Stop strings over streamed text: emit only what can no longer turn into a stop string."""
from __future__ import annotations


class StopStrings:
    def __init__(self, stops: tuple[str, ...] | list[str] = ()):
        self.stops = [s for s in stops if s]
        self.text = ""        # everything received
        self.emitted = 0      # chars of `text` already released
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add decoded text; return the part that is safe to show."""
        if self.stopped:
            return ""
        self.text += piece
        hit = min((i for i in (self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stops)
                   if i >= 0), default=-1)
        if hit >= 0:
            self.stopped = True
            out, self.emitted = self.text[self.emitted:hit], hit
            self.text = self.text[:hit]
            return out
        hold = 0
        for s in self.stops:  # longest suffix of text that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted:end], end
        return out

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out
