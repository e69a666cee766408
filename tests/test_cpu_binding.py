"""How the in-process engines' threads share the CPU cores (:mod:`ttalign.engine.cpu_binding`)."""

from __future__ import annotations

import os

import pytest
from ttalign.engine.cpu_binding import BIND_VARIABLE, bound_to, split_cores, user_binding
from ttalign.server.engine_factory import engine_cores, in_process_judge
from ttalign.server.settings import ServerSettings


@pytest.mark.parametrize(
    ("cores", "engines", "shares"),
    [
        ([0, 1], 2, [[0], [1]]),  # 2 cores: one each, none left for the server
        ([0, 1, 2], 2, [[0], [1, 2]]),
        ([0, 1, 2, 3], 2, [[0, 1], [2, 3]]),
        ([3, 2, 1, 0, 4], 2, [[0, 1], [2, 3]]),  # the fifth core stays with the server
        (list(range(8)), 2, [[0, 1, 2], [3, 4, 5, 6]]),
        (list(range(8)), 3, [[0, 1], [2, 3], [4, 5, 6]]),
        ([0, 1], 1, None),  # one engine: vLLM's own binding
        ([0], 2, None),  # fewer cores than engines: nothing to split
    ],
)
def test_split_cores_gives_each_engine_cores_of_its_own(
    cores: list[int], engines: int, shares: list[list[int]] | None
) -> None:
    assert split_cores(cores, engines) == shares
    if shares:
        flat = [core for share in shares for core in share]
        assert len(flat) == len(set(flat))


def test_bound_to_sets_vllms_variable_only_while_an_engine_is_spawned(monkeypatch) -> None:
    monkeypatch.delenv(BIND_VARIABLE, raising=False)
    with bound_to([2, 3]):
        assert os.environ[BIND_VARIABLE] == "2,3"
    assert BIND_VARIABLE not in os.environ
    monkeypatch.setenv(BIND_VARIABLE, "auto")
    with bound_to([1]):
        assert os.environ[BIND_VARIABLE] == "1"
    assert os.environ[BIND_VARIABLE] == "auto"
    with bound_to(None):
        assert os.environ[BIND_VARIABLE] == "auto"


def test_a_binding_the_user_set_wins(monkeypatch) -> None:
    monkeypatch.setenv(BIND_VARIABLE, "auto")
    assert user_binding() is None
    monkeypatch.setenv(BIND_VARIABLE, "0-3")
    assert user_binding() == "0-3"
    settings = ServerSettings(model="m", judge_model="j")
    assert engine_cores(settings) == (None, None)


def test_engine_cores_are_split_only_for_an_in_process_judge_beside_the_policy(
    monkeypatch,
) -> None:
    pytest.importorskip("vllm")
    monkeypatch.delenv(BIND_VARIABLE, raising=False)
    monkeypatch.setattr("ttalign.engine.cpu_binding.available_cores", lambda: [0, 1])
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "is_cpu", lambda: True)
    split = ServerSettings(model="m", judge_model="j")
    assert in_process_judge(split)
    assert engine_cores(split) == ([0], [1])
    assert engine_cores(ServerSettings(model="m", judge_model="j", engine_cores="shared")) == (
        None,
        None,
    )
    assert engine_cores(ServerSettings(model="m")) == (None, None)
    fleet_judge = ServerSettings(model="m", judge_model="j", judge_engine_urls="http://j:8000")
    assert not in_process_judge(fleet_judge)
    assert engine_cores(fleet_judge) == (None, None)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    assert engine_cores(split) == (None, None)
