"""How long the engine's processes busy-wait for each other (:mod:`ttalign.engine.engine_spin`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from importlib.metadata import entry_points
from unittest.mock import MagicMock

import pytest
from ttalign.engine.engine_spin import SPIN_VARIABLE, cap_spin, register, spinning
from ttalign.engine.spawn_environment import spawned_with
from ttalign.server.settings import ServerSettings


def test_spawned_with_sets_a_variable_only_while_the_block_runs(monkeypatch) -> None:
    monkeypatch.delenv("TTALIGN_TEST_VARIABLE", raising=False)
    with spawned_with("TTALIGN_TEST_VARIABLE", "1"):
        assert os.environ["TTALIGN_TEST_VARIABLE"] == "1"
    assert "TTALIGN_TEST_VARIABLE" not in os.environ
    monkeypatch.setenv("TTALIGN_TEST_VARIABLE", "before")
    with pytest.raises(RuntimeError), spawned_with("TTALIGN_TEST_VARIABLE", "during"):
        raise RuntimeError
    assert os.environ["TTALIGN_TEST_VARIABLE"] == "before"
    with spawned_with("TTALIGN_TEST_VARIABLE", None):
        assert os.environ["TTALIGN_TEST_VARIABLE"] == "before"


def test_an_engine_spawns_with_the_cap_it_was_given(monkeypatch) -> None:
    monkeypatch.delenv(SPIN_VARIABLE, raising=False)
    with spinning(0):
        assert float(os.environ[SPIN_VARIABLE]) == 0.0
    with spinning(None):
        assert SPIN_VARIABLE not in os.environ
    assert ServerSettings(model="m").engine_spin_seconds is None  # vLLM's, as measured


def test_vllm_finds_the_plugin_through_its_entry_point() -> None:
    plugins = entry_points(group="vllm.general_plugins")
    [plugin] = [entry for entry in plugins if entry.name.startswith("ttalign")]
    assert plugin.load() is register


@pytest.fixture
def spin_condition(monkeypatch):
    """vLLM's shared-memory wait, restored after the test whatever the test patched. Its
    sockets are mocks: only the wait's own settings are under test."""
    shm_broadcast = pytest.importorskip("vllm.distributed.device_communicators.shm_broadcast")
    condition = shm_broadcast.SpinCondition
    monkeypatch.setattr(condition, "__init__", condition.__init__)
    return lambda is_reader=True: condition(is_reader, MagicMock(), "inproc://unused")


def test_the_cap_shortens_every_reader_made_after_it(spin_condition, monkeypatch) -> None:
    assert spin_condition().busy_loop_s == 1  # vLLM's own
    monkeypatch.setenv(SPIN_VARIABLE, "0.0")
    register()
    assert spin_condition().busy_loop_s == 0
    cap_spin(0.25)  # a second cap replaces the first, it does not stack
    assert spin_condition().busy_loop_s == 0.25
    assert spin_condition(is_reader=False).busy_loop_s == 0


def test_without_the_variable_vllm_keeps_its_spin(spin_condition, monkeypatch) -> None:
    monkeypatch.delenv(SPIN_VARIABLE, raising=False)
    register()
    assert spin_condition().busy_loop_s == 1


def test_a_cap_that_cannot_apply_warns_and_leaves_the_engine_running(
    spin_condition, monkeypatch, caplog
) -> None:
    monkeypatch.setenv(SPIN_VARIABLE, "soon")
    with caplog.at_level(logging.WARNING):
        register()
    assert "not applied" in caplog.text
    assert spin_condition().busy_loop_s == 1


def test_vllms_own_plugin_loader_applies_the_cap_in_a_fresh_process() -> None:
    pytest.importorskip("vllm")
    probe = (
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "import zmq\n"
        "from vllm.distributed.device_communicators.shm_broadcast import SpinCondition\n"
        "print(SpinCondition(True, zmq.Context(), 'inproc://probe').busy_loop_s)\n"
    )
    env = {**os.environ, SPIN_VARIABLE: "0.0"}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) == 0.0  # vLLM's own is 1
