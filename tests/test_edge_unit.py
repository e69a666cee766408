"""The HTTP edge without the real engine: keep-alive, API keys, shutdown, health, CLI."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from pydantic import ValidationError
from ttalign.reward_clients.config import RewardConfigError
from ttalign.server.admission import Admission
from ttalign.server.app import create_app
from ttalign.server.auth import ApiKeyConfigError, ApiKeyMiddleware, load_api_keys
from ttalign.server.cli import describe_invalid_settings
from ttalign.server.health import health_report
from ttalign.server.keepalive import with_keepalive
from ttalign.server.settings import ServerSettings
from ttalign.server.shutdown import DrainingServer

from tests.conftest import fake_settings
from tests.fakes import FakeEngine

# --- keep-alive ---------------------------------------------------------------------------

KEEPALIVE = "data: keep-alive\n\n"


async def _timed(frames: AsyncIterator[str]) -> list[tuple[float, str]]:
    started = time.monotonic()
    return [(time.monotonic() - started, frame) async for frame in frames]


async def test_keepalive_comes_first_and_fills_silence() -> None:
    async def slow() -> AsyncIterator[str]:
        await asyncio.sleep(0.35)
        yield "data: a\n\n"
        yield "data: b\n\n"

    received = await _timed(with_keepalive(slow(), 0.1, KEEPALIVE))
    frames = [frame for _, frame in received]
    assert frames[0] == KEEPALIVE and received[0][0] < 0.05
    assert frames[-2:] == ["data: a\n\n", "data: b\n\n"]
    assert 2 <= frames.count(KEEPALIVE) <= 5
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(received)]
    assert max(gaps) < 0.1 + 0.05


async def test_busy_stream_gets_only_the_first_keepalive() -> None:
    async def fast() -> AsyncIterator[str]:
        for i in range(50):
            yield f"data: {i}\n\n"

    frames = [frame async for frame in with_keepalive(fast(), 10, KEEPALIVE)]
    assert frames == [KEEPALIVE] + [f"data: {i}\n\n" for i in range(50)]


async def test_closing_the_wrapper_closes_the_inner_stream() -> None:
    inner_closed = asyncio.Event()
    work_cancelled = asyncio.Event()

    async def searching() -> AsyncIterator[str]:
        try:
            yield "data: progress\n\n"
            try:
                await asyncio.sleep(60)  # the search's engine work
            except asyncio.CancelledError:
                work_cancelled.set()
                raise
            yield "data: never\n\n"
        finally:
            inner_closed.set()

    wrapped = with_keepalive(searching(), 0.05, KEEPALIVE)
    assert await anext(wrapped) == KEEPALIVE
    assert await anext(wrapped) == "data: progress\n\n"
    assert await anext(wrapped) == KEEPALIVE
    await wrapped.aclose()
    assert work_cancelled.is_set() and inner_closed.is_set()


async def test_closing_while_the_inner_stream_waits_at_a_yield_closes_it() -> None:
    closed_with: list[type[BaseException]] = []

    async def eager() -> AsyncIterator[str]:
        try:
            for i in range(10):
                yield f"data: {i}\n\n"
        except BaseException as exc:
            closed_with.append(type(exc))
            raise

    wrapped = with_keepalive(eager(), 10, KEEPALIVE)
    assert await anext(wrapped) == KEEPALIVE
    assert await anext(wrapped) == "data: 0\n\n"
    await wrapped.aclose()
    assert closed_with == [GeneratorExit]


async def test_cancelling_the_consumer_cancels_the_inner_stream() -> None:
    cancelled = asyncio.Event()

    async def searching() -> AsyncIterator[str]:
        try:
            await asyncio.sleep(60)
            yield "data: never\n\n"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def consume() -> None:
        async for _ in with_keepalive(searching(), 0.05, KEEPALIVE):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()


async def test_an_error_of_the_inner_stream_reaches_the_consumer() -> None:
    async def failing() -> AsyncIterator[str]:
        yield "data: a\n\n"
        raise RuntimeError("boom")

    received = []
    with pytest.raises(RuntimeError, match="boom"):
        async for frame in with_keepalive(failing(), 10, KEEPALIVE):
            received.append(frame)
    assert received == [KEEPALIVE, "data: a\n\n"]


# --- API keys -----------------------------------------------------------------------------


def test_key_file_lines_comments_and_the_flag_key(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nkey-one\n\n  key-two  \n")
    settings = fake_settings(api_key="flag-key", api_key_file=key_file)
    assert load_api_keys(settings) == ("flag-key", "key-one", "key-two")
    assert load_api_keys(fake_settings()) == ()


@pytest.mark.parametrize("content", [None, "# only a comment\n\n"])
def test_unusable_key_file_is_refused(tmp_path: Path, content: str | None) -> None:
    key_file = tmp_path / "keys"
    if content is not None:
        key_file.write_text(content)
    with pytest.raises(ApiKeyConfigError, match=str(key_file)):
        load_api_keys(fake_settings(api_key_file=key_file))


def test_key_check_accepts_any_configured_key_and_nothing_else() -> None:
    middleware = ApiKeyMiddleware(None, ["alpha", "beta"], protect_operations=False)  # type: ignore[arg-type]
    assert middleware._check("Bearer alpha") is None
    assert middleware._check("bearer beta") is None
    for header in (None, "", "Bearer", "Basic alpha", "Bearer alph", "Bearer alphaX"):
        error = middleware._check(header)
        assert error is not None and error.status_code == 401
        assert error.code == "invalid_api_key"
        assert "alpha" not in error.message and "beta" not in error.message


def test_which_paths_need_a_key() -> None:
    open_ops = ApiKeyMiddleware(None, ["k"], protect_operations=False)  # type: ignore[arg-type]
    closed_ops = ApiKeyMiddleware(None, ["k"], protect_operations=True)  # type: ignore[arg-type]
    for path in ("/v1", "/v1/models", "/v1/chat/completions", "/v1/rewards/score"):
        assert open_ops._protects(path) and closed_ops._protects(path)
    for path in ("/health", "/metrics"):
        assert not open_ops._protects(path) and closed_ops._protects(path)
    assert not open_ops._protects("/v10/models")


def test_settings_repr_and_errors_hide_the_key() -> None:
    settings = fake_settings(api_key="sk-very-secret")
    assert "sk-very-secret" not in repr(settings) and "sk-very-secret" not in str(settings)
    with pytest.raises(ValidationError) as caught:
        ServerSettings(api_key="sk-very-secret", max_n=0, port=-1)
    described = describe_invalid_settings(caught.value)
    assert "max_n" in described and "port" in described
    assert "sk-very-secret" not in described


def test_help_shows_no_key_from_the_environment() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ttalign.server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        env={"TTALIGN_API_KEY": "sk-env-secret", "PATH": ""},
        check=True,
    )
    assert "--api-key" in result.stdout
    assert "sk-env-secret" not in result.stdout + result.stderr


# --- health -------------------------------------------------------------------------------


class BrokenHealthEngine(FakeEngine):
    async def health(self):  # type: ignore[override]
        raise RuntimeError("engine core died")


async def test_health_reports_a_failing_check_as_unhealthy() -> None:
    status, body = await health_report(BrokenHealthEngine(), Admission(4, 1))
    assert status == 503
    assert body["engine"] == {
        "healthy": False,
        "running_requests": 0,
        "detail": "RuntimeError",
    }


async def test_health_is_503_while_draining() -> None:
    admission = Admission(4, 1)
    assert (await health_report(FakeEngine(), admission))[0] == 200
    await admission.drain(0)
    status, body = await health_report(FakeEngine(), admission)
    assert status == 503 and body["draining"] is True


# --- start-up ---------------------------------------------------------------------------


def test_the_app_checks_the_reward_config_before_starting_the_engine(tmp_path: Path) -> None:
    config = tmp_path / "rewards.json"
    config.write_text('{"clients": {"mix": {"type": "composite", "components": {"nope": 1}}}}')
    started: list[object] = []
    with pytest.raises(RewardConfigError, match="nope"):
        create_app(fake_settings(reward_config=config), engine_factory=lambda s: started.append(s))
    assert started == []


# --- shutdown -----------------------------------------------------------------------------


async def _noop_app(scope, receive, send) -> None:  # pragma: no cover - never called
    raise AssertionError


async def test_first_signal_drains_before_the_server_exits() -> None:
    release = asyncio.Event()
    drained = asyncio.Event()

    async def drain() -> None:
        await release.wait()
        drained.set()

    server = DrainingServer(uvicorn.Config(_noop_app), drain=drain)
    server.handle_exit(signal.SIGTERM, None)
    assert not server.should_exit
    assert await server.on_tick(1) is False  # draining: the listener stays open
    await asyncio.sleep(0.05)
    assert not server.should_exit
    release.set()
    await asyncio.sleep(0.05)
    assert drained.is_set() and server.should_exit
    assert await server.on_tick(2) is True


async def test_second_signal_forces_exit() -> None:
    async def drain() -> None:
        await asyncio.sleep(60)

    server = DrainingServer(uvicorn.Config(_noop_app), drain=drain)
    server.handle_exit(signal.SIGTERM, None)
    await server.on_tick(1)
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and server.force_exit
    server._drain_task.cancel()  # type: ignore[union-attr]
