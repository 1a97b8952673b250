"""An incremental decoder of server-sent events: bytes in, the `data` of each complete event out."""

from __future__ import annotations


class SSEDecoder:
    """Feed it chunks as they arrive; it returns the data of each event the chunk completed.

    Follows the SSE framing: lines end in LF, CRLF or CR; an empty line ends an event; the `data`
    lines of one event join with LF; comments (":") and other fields (event, id, retry) are ignored.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across two chunks
        self._pending_cr = chunk.endswith(b"\r")
        self._buffer += chunk
        events: list[str] = []
        lines = self._buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._buffer = lines.pop()  # an incomplete last line, or b"" after a final newline
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events

    def flush(self) -> list[str]:
        """At the end of the stream: the last event, if it lacked its closing empty line."""
        self._pending_cr = False
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        self._buffer, self._data = b"", []
        return events
