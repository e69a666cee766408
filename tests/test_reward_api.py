"""Reward configuration and reward failures through the HTTP API (fake engine, stub backends)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from ttalign.reward_clients.config import RewardConfigError, load_reward_registry
from ttalign.reward_clients.tei import TeiReward
from ttalign.server.app import create_app

from tests.conftest import fake_settings
from tests.fakes import FakeEngine
from tests.servers import RunningServer, free_port, serve_in_thread

CHAT = [{"role": "user", "content": "Say hi."}]


def stub_backend(delay: float = 0.0) -> FastAPI:
    """A TEI-style /predict that scores by length, after ``delay`` seconds."""
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> list:
        body = await request.json()
        await asyncio.sleep(delay)
        return [[{"label": "LABEL_0", "score": float(len(text[0]))}] for text in body["inputs"]]

    return app


@pytest.fixture(scope="module")
def stub() -> Iterator[RunningServer]:
    with serve_in_thread(stub_backend()) as running:
        yield running


@pytest.fixture(scope="module")
def slow_stub() -> Iterator[RunningServer]:
    with serve_in_thread(stub_backend(delay=2.0)) as running:
        yield running


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    from ttalign.server.model_prep import prepare_embedded_model

    return str(prepare_embedded_model())


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    stub: RunningServer,
    slow_stub: RunningServer,
    tokenizer_dir: str,
) -> Iterator[RunningServer]:
    """ttalign on the fake engine with a reward config naming up, down and slow backends."""
    fast = {"timeout_seconds": 0.3, "max_retries": 1, "backoff_seconds": 0.01}
    config = {
        "default": "tei-up",
        "clients": {
            "tei-up": {"type": "tei", "url": stub.base_url, "tokenizer": tokenizer_dir},
            "rm-down": {
                "type": "vllm_pooling",
                "url": f"http://127.0.0.1:{free_port()}",
                "tokenizer": tokenizer_dir,
                **fast,
            },
            "tei-slow": {
                "type": "tei",
                "url": slow_stub.base_url,
                "tokenizer": tokenizer_dir,
                **fast,
            },
            "mix": {"type": "composite", "components": {"tei-up": 1, "rules": 1}},
        },
    }
    path = tmp_path_factory.mktemp("rewards") / "rewards.json"
    path.write_text(json.dumps(config))
    app = create_app(fake_settings(reward_config=path), engine_factory=lambda _: FakeEngine())
    with serve_in_thread(app) as running:
        yield running


def score(gateway: RunningServer, **body) -> httpx.Response:
    payload = {"messages": CHAT, "candidates": ["a", "bbb"], **body}
    return httpx.post(f"{gateway.api_url}/rewards/score", json=payload, timeout=30)


def test_configured_and_builtin_clients_are_listed(gateway: RunningServer) -> None:
    listed = httpx.get(f"{gateway.api_url}/rewards").json()["data"]
    assert {r["name"] for r in listed} == {"tei-up", "rm-down", "tei-slow", "mix", "rules", "judge"}
    assert [r["name"] for r in listed if r["default"]] == ["tei-up"]


def test_tei_client_scores_through_the_stub(gateway: RunningServer) -> None:
    response = score(gateway, reward="tei-up")
    assert response.status_code == 200
    low, high = response.json()["scores"]
    assert high - low == 2.0  # the rendered texts differ only by the candidate


def test_rules_client_through_the_api(gateway: RunningServer) -> None:
    response = score(gateway, reward="rules", constraints=[{"type": "char_count", "max": 2}])
    assert response.json() == {"object": "reward.scores", "reward": "rules", "scores": [1.0, 0.0]}


def test_reward_server_down_is_a_503_naming_the_client(gateway: RunningServer) -> None:
    response = score(gateway, reward="rm-down")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "reward_unavailable" and error["param"] == "reward"
    assert "'rm-down'" in error["message"] and "2 attempts" in error["message"]


def test_slow_reward_server_times_out(gateway: RunningServer) -> None:
    response = score(gateway, reward="tei-slow")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "reward_timeout" and "'tei-slow'" in error["message"]


def test_failure_inside_a_strategy_is_an_openai_error(gateway: RunningServer) -> None:
    response = httpx.post(
        f"{gateway.api_url}/chat/completions",
        json={
            "model": "fake-model",
            "messages": CHAT,
            "strategy": "best_of_n",
            "reward": "rm-down",
        },
        timeout=30,
    )
    assert response.status_code == 503
    assert "'rm-down'" in response.json()["error"]["message"]


def test_unknown_reward_lists_the_valid_names(gateway: RunningServer) -> None:
    for body in ({"reward": "nope"}, {"strategy_config": {"reward": "nope"}}):
        response = httpx.post(
            f"{gateway.api_url}/chat/completions",
            json={"model": "fake-model", "messages": CHAT, "strategy": "best_of_n", **body},
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "unknown_reward"
        assert error["param"] in {"reward", "strategy_config.reward"}
        assert "tei-up" in error["message"] and "rules" in error["message"]


@pytest.mark.parametrize("reward", ["http://169.254.169.254/", "127.0.0.1:8001", "a/b"])
def test_a_url_as_reward_is_rejected(gateway: RunningServer, reward: str) -> None:
    response = httpx.post(
        f"{gateway.api_url}/chat/completions",
        json={"model": "fake-model", "messages": CHAT, "strategy": "best_of_n", "reward": reward},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "reward"
    assert score(gateway, reward=reward).status_code == 400


def test_constraint_errors_are_400s_naming_the_field(gateway: RunningServer) -> None:
    body = {"model": "fake-model", "messages": CHAT, "strategy": "best_of_n", "reward": "rules"}
    missing = httpx.post(f"{gateway.api_url}/chat/completions", json=body)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "constraints"
    bad = httpx.post(
        f"{gateway.api_url}/chat/completions",
        json={**body, "constraints": [{"type": "word_count", "min": 3, "max": 1}]},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "constraints[0].max"
    mixed = score(gateway, reward="mix", constraints=[{"type": "regex", "pattern": r"(x)\1"}])
    assert mixed.status_code == 400
    assert mixed.json()["error"]["param"] == "constraints[0].pattern"


def test_reward_metrics_are_exported(gateway: RunningServer) -> None:
    score(gateway, reward="tei-up")
    text = httpx.get(f"{gateway.base_url}/metrics").text
    assert 'ttalign_reward_calls_total{client="tei-up",outcome="ok"}' in text
    assert 'ttalign_reward_latency_seconds_count{client="tei-up"}' in text
    assert 'ttalign_reward_batch_size_sum{client="tei-up"}' in text


def test_builtin_clients_and_default_without_a_file() -> None:
    registry = load_reward_registry(None, None, engine=FakeEngine())
    assert registry.names() == ["judge", "rules"] and registry.default == "judge"
    assert load_reward_registry(None, "rules", engine=FakeEngine()).default == "rules"


def test_yaml_config_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "r.yaml"
    good.write_text(
        "default: strict\nclients:\n  strict:\n    type: judge\n    rubric: Be harsh.\n"
        "    scale_max: 5\n"
    )
    registry = load_reward_registry(good, None, engine=FakeEngine())
    judge = registry.get()
    assert judge.name == "strict" and judge.rubric == "Be harsh." and judge.scale == (1, 5)
    for text, words in [
        ("clients:\n  x:\n    type: telepathy\n", "telepathy"),
        ("clients:\n  x:\n    type: tei\n    url: http://h\n", "tokenizer"),
        ("clients:\n  m:\n    type: composite\n    components: {ghost: 1}\n", "ghost"),
        ("clients:\n  a:\n    type: composite\n    components: {a: 1}\n", "cycle"),
        ("default: missing\n", "missing"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(RewardConfigError, match=words):
            load_reward_registry(bad, None, engine=FakeEngine())


async def test_tei_multi_label_needs_a_configured_label(stub: RunningServer) -> None:
    from ttalign.server.model_prep import prepare_embedded_model

    client = TeiReward(
        "tei", url=stub.base_url, tokenizer=str(prepare_embedded_model()), label="LABEL_1"
    )
    with pytest.raises(Exception, match="no label 'LABEL_1'"):
        await client.score(CHAT, ["x"])
    await client.close()
