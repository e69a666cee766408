"""SSE line splitting: only \r\n, \n and \r end a line, wherever the network cuts the bytes."""

from __future__ import annotations

import json

import pytest
from ttalign.engine.sse_lines import sse_lines


async def lines_of(*chunks: bytes) -> list[str]:
    async def source():
        for chunk in chunks:
            yield chunk

    return [line async for line in sse_lines(source())]


async def test_a_json_string_with_unicode_line_separators_stays_one_line() -> None:
    # vLLM writes generated text unescaped: U+2028, U+0085 and U+001E-like characters that
    # str.splitlines would break at.
    text = "one\u2028two\x85three\u2029four"
    frame = f"data: {json.dumps({'text': text}, ensure_ascii=False)}\n\n".encode()
    [line, blank] = await lines_of(frame)
    assert json.loads(line.removeprefix("data: "))["text"] == text
    assert blank == ""


@pytest.mark.parametrize("cut", range(1, 12))
async def test_lines_split_anywhere_across_chunks(cut: int) -> None:
    data = "data: a\r\ndata: é\rdata: c\n\n".encode()
    assert await lines_of(data[:cut], data[cut:]) == ["data: a", "data: é", "data: c", ""]


async def test_a_carriage_return_at_a_chunk_end_waits_for_its_newline() -> None:
    assert await lines_of(b"data: a\r", b"\ndata: b\n") == ["data: a", "data: b"]
    assert await lines_of(b"data: a\r", b"data: b\n") == ["data: a", "data: b"]


async def test_a_last_line_without_an_end_is_still_read() -> None:
    assert await lines_of(b"data: [DONE]") == ["data: [DONE]"]
    assert await lines_of(b"data: [DONE]\r") == ["data: [DONE]"]
