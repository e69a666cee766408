"""Budgets every strategy obeys, on the real engine: per-step token caps, the per-request
compute budget, and deadlines that bound every strategy's wall time."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.conftest import REAL_SERVER_LIMITS
from tests.servers import RunningServer

pytestmark = pytest.mark.real_engine

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
RULES = {"reward": "rules", "constraints": [{"type": "word_count", "min": 20}]}
#: The goal: a request returns within this long after its deadline.
OVERSHOOT = 1.0


def _post(server: RunningServer, **fields: object) -> tuple[httpx.Response, float]:
    body = {"model": MODEL, "messages": QUESTION, **fields}
    started = time.monotonic()
    response = httpx.post(f"{server.api_url}/chat/completions", json=body, timeout=120)
    return response, time.monotonic() - started


def _idle(server: RunningServer, timeout: float = 5.0) -> bool:
    engine = server.app.state.engine
    deadline = time.monotonic() + timeout
    while engine.engine_running_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    return engine.engine_running_requests() == 0


@pytest.mark.parametrize(
    ("config", "param"),
    [
        ({"max_tokens": {"loss": REAL_SERVER_LIMITS["max_tokens_cap"] + 1}}, "loss"),
        ({"max_tokens": {"gradient": 32768}}, "gradient"),
        ({"max_tokens": {"update": 4096}}, "update"),
        ({"max_tokens": {"sample": 600}}, "sample"),
    ],
)
def test_every_tpo_step_stays_under_the_token_cap(
    real_server: RunningServer, config: dict, param: str
) -> None:
    response, _ = _post(real_server, max_tokens=8, strategy="tpo", strategy_config=config, **RULES)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == f"strategy_config.max_tokens.{param}"


def test_configs_that_cannot_fit_the_budget_are_400s_up_front(serve_on_real_engine) -> None:
    with serve_on_real_engine(max_request_engine_tokens=1000, max_request_candidates=6) as server:
        too_many, _ = _post(
            server, max_tokens=8, strategy="best_of_n", strategy_config={"n": 8}, **RULES
        )
        too_long, _ = _post(
            server, max_tokens=512, strategy="best_of_n", strategy_config={"n": 4}, **RULES
        )
        for response in (too_many, too_long):
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["param"] == "strategy_config.n" and error["code"] == "budget_exceeded"
        fits, _ = _post(
            server, max_tokens=8, strategy="best_of_n", strategy_config={"n": 4}, **RULES
        )
        assert fits.status_code == 200


def test_a_search_stops_early_at_the_budget(serve_on_real_engine) -> None:
    # 2 first samples, then each round: loss 1 + gradient 1 + update 2 = 4 candidates.
    # A budget of 6 admits the first round and refuses the second round's loss.
    with serve_on_real_engine(max_request_candidates=6) as server:
        response, _ = _post(
            server,
            max_tokens=16,
            strategy="tpo",
            return_trace=True,
            strategy_config={"depth": 3, "width": 2, "max_tokens": {"loss": 16, "gradient": 16}},
            **RULES,
        )
    assert response.status_code == 200
    alignment = response.json()["alignment"]
    assert alignment["stopped_early"] is True
    assert alignment["rounds"] == 1
    assert alignment["candidates_generated"] <= 6
    assert alignment["trace"]["stop_reason"] == "budget"


def test_a_judge_heavy_request_stops_at_its_engine_token_budget(serve_on_real_engine) -> None:
    # Room for sampling eight 4-token candidates of a ~30-token prompt (~62 tokens), not
    # for the judge's ratings of them (each a prompt of a few hundred tokens).
    with serve_on_real_engine(max_request_engine_tokens=150) as server:
        judged = dict(strategy="best_of_n", strategy_config={"n": 8}, reward="judge")
        response, _ = _post(server, max_tokens=4, seed=0, **judged)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "budget_exceeded"
        assert "--max-request-engine-tokens" in error["message"]
        assert _idle(server)
    # The same request with room for the judge: its ratings count in the engine tokens.
    with serve_on_real_engine() as server:
        response, _ = _post(server, max_tokens=4, seed=0, **judged)
    alignment = response.json()["alignment"]
    assert alignment["reward_engine_calls"] >= 1
    assert alignment["engine_tokens"]["prompt_tokens"] > 150


TPO_HEAVY = {"depth": 3, "width": 4, "max_tokens": {"loss": 200, "gradient": 200}}


@pytest.mark.parametrize(
    ("strategy", "config", "reward"),
    [
        ("none", None, None),
        ("best_of_n", {"n": 4}, RULES),
        ("best_of_n", {"n": 4}, {"reward": "judge"}),
        ("tpo", TPO_HEAVY, RULES),
        ("tpo", TPO_HEAVY, {"reward": "judge"}),
    ],
    ids=["none", "best_of_n-rules", "best_of_n-judge", "tpo-rules", "tpo-judge"],
)
def test_deadline_bounds_every_strategy(
    real_server: RunningServer, strategy: str, config: dict | None, reward: dict | None
) -> None:
    deadline = 3.0
    fields = {"strategy_config": config, **reward} if config else {}
    response, elapsed = _post(
        real_server,
        max_tokens=400,
        temperature=1.0,
        strategy=strategy,
        deadline_seconds=deadline,
        ignore_eos=True,
        **fields,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    ChatCompletion.model_validate(body)
    assert elapsed <= deadline + OVERSHOOT, f"{strategy} took {elapsed:.2f} s"
    assert body["alignment"]["stopped_early"] is True
    choice = body["choices"][0]
    assert choice["message"]["content"], "the partial answer is returned"
    if strategy != "tpo":  # TPO may return a finished response from an earlier step
        assert choice["finish_reason"] == "length"
    assert _idle(real_server), "the deadline aborted the engine work"


def test_streamed_answer_stops_at_the_deadline(real_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=real_server.api_url, api_key="unused", max_retries=0)
    started = time.monotonic()
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=400,
            stream=True,
            extra_body={"deadline_seconds": 2.0, "ignore_eos": True},
        )
    )
    assert time.monotonic() - started <= 2.0 + OVERSHOOT
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].model_extra["alignment"]["stopped_early"] is True
    assert _idle(real_server)


def test_server_request_timeout_bounds_requests_without_a_deadline(serve_on_real_engine) -> None:
    with serve_on_real_engine(request_timeout_seconds=2.0) as server:
        response, elapsed = _post(
            server,
            max_tokens=400,
            strategy="best_of_n",
            strategy_config={"n": 3},
            ignore_eos=True,
            **RULES,
        )
    assert response.status_code == 200
    assert elapsed <= 2.0 + OVERSHOOT
    assert response.json()["alignment"]["stopped_early"] is True
