"""The lines of a server-sent-event stream, split the way the SSE specification splits them.

A line ends at ``\\r\\n``, ``\\n`` or ``\\r`` and nowhere else. ``str.splitlines`` (and so
httpx's ``aiter_lines``) also breaks at U+2028, U+0085 and other characters that JSON
leaves unescaped inside strings, so a generated token such as U+2028 would cut a chunk of
vLLM's stream in two.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


async def sse_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """Decode ``chunks`` (raw bytes as they arrive) into lines, without their line ends."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        # A trailing \r may be the first half of \r\n: keep it until the next chunk.
        while True:
            end = _line_end(pending)
            if end is None:
                break
            cut, skip = end
            yield pending[:cut].decode("utf-8", errors="replace")
            pending = pending[cut + skip :]
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8", errors="replace")


def _line_end(data: bytes) -> tuple[int, int] | None:
    """Where the first complete line of ``data`` ends, and the length of its terminator."""
    newline = data.find(b"\n")
    carriage = data.find(b"\r")
    if carriage == -1 or (newline != -1 and newline < carriage):
        return None if newline == -1 else (newline, 1)
    if carriage + 1 == len(data):
        return None  # \r at the very end: wait to see whether \n follows
    return (carriage, 2) if data[carriage + 1 : carriage + 2] == b"\n" else (carriage, 1)
