"""Locust load test for ``/v1/chat/completions`` with a configurable strategy mix.

Prompts are AlpacaEval instructions from ``../shared/eval/alpaca_eval_dev.jsonl``.

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 8 -r 2 -t 2m \\
        --strategy-mix 'none=8,best_of_n=1' --max-tokens 64 --stream

``--strategy-mix`` weights strategies by name (``name=weight``, comma separated);
``--strategy-configs`` optionally gives each a JSON ``strategy_config``, e.g.
``'{"best_of_n": {"n": 4}}'``. Each request is reported under ``strategy:<name>``, so
locust's table shows latency per strategy. Streaming requests report time to first token
as a separate ``ttft:<name>`` entry.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from locust import HttpUser, events, task

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "eval" / "alpaca_eval_dev.jsonl"


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--strategy-mix", default="none=1", help="name=weight,...")
    parser.add_argument("--strategy-configs", default="{}", help="JSON: name -> config")
    parser.add_argument("--model", default="", help="Model name (default: first of /v1/models)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--stream", action="store_true", default=False)


def parse_mix(text: str) -> tuple[list[str], list[float]]:
    """``"none=3,best_of_n=1"`` -> (["none", "best_of_n"], [3.0, 1.0])."""
    names, weights = [], []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        names.append(name.strip())
        weights.append(float(weight or 1))
    if not names:
        raise ValueError("--strategy-mix names no strategy")
    return names, weights


def load_prompts(path: str) -> list[str]:
    with open(path) as lines:
        return [json.loads(line)["instruction"] for line in lines if line.strip()]


class ChatUser(HttpUser):
    """Sends chat completions, choosing a strategy per request by the configured weights."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.names, self.weights = parse_mix(options.strategy_mix)
        self.configs = json.loads(options.strategy_configs)
        self.prompts = load_prompts(options.prompts)
        self.max_tokens = options.max_tokens
        self.stream = options.stream
        self.model = options.model or self.client.get("/v1/models").json()["data"][0]["id"]

    @task
    def chat(self) -> None:
        strategy = random.choices(self.names, self.weights)[0]
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": random.choice(self.prompts)}],
            "max_tokens": self.max_tokens,
            "strategy": strategy,
            "stream": self.stream,
        }
        if strategy in self.configs:
            body["strategy_config"] = self.configs[strategy]
        name = f"strategy:{strategy}"
        if not self.stream:
            with self.client.post(
                "/v1/chat/completions", json=body, name=name, catch_response=True
            ) as response:
                if response.status_code != 200:
                    response.failure(response.text[:300])
            return
        started = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions", json=body, name=name, stream=True, catch_response=True
        ) as response:
            first_token = None
            for line in response.iter_lines():
                if first_token is None and line.startswith(b"data: {") and b'"content"' in line:
                    first_token = time.perf_counter()
                    self.environment.events.request.fire(
                        request_type="TTFT",
                        name=f"ttft:{strategy}",
                        response_time=(first_token - started) * 1000,
                        response_length=0,
                        exception=None,
                        context={},
                    )
                if line.startswith(b'data: {"error"'):
                    response.failure(line.decode()[:300])
            if response.status_code != 200:
                response.failure(response.text[:300])
