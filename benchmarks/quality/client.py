"""The harness's side of the wire: one official ``AsyncOpenAI`` client for every call.

Chat completions go through ``chat.completions.create`` with ttalign's fields in
``extra_body``; ttalign's own endpoints (``/v1/strategies``, ``/v1/rewards/score``) go
through the same client's generic ``get``/``post`` so retries and timeouts are shared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from openai import AsyncOpenAI, Timeout


@dataclass(frozen=True)
class Answer:
    """One prompt's reply: the text, the server's ``alignment`` object and the client wall time."""

    text: str
    alignment: dict[str, Any]
    wall_seconds: float
    finish_reason: str | None = None


class TtalignClient:
    """A ttalign server at ``base_url`` (with or without the ``/v1`` suffix)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "EMPTY",
        timeout: float = 900.0,
        max_retries: int = 2,
    ) -> None:
        root = base_url.rstrip("/")
        if not root.endswith("/v1"):
            root += "/v1"
        self.base_url = root
        self.openai = AsyncOpenAI(
            base_url=root,
            api_key=api_key,
            max_retries=max_retries,
            # openai's own Timeout: openai 3.63 moved from httpx to httpx2 and refuses httpx's.
            timeout=Timeout(timeout, connect=10.0),
        )

    async def model(self) -> str:
        """The served model's id (the first one ``/v1/models`` lists)."""
        models = await self.openai.models.list()
        if not models.data:
            raise RuntimeError(f"{self.base_url}/models lists no model")
        return models.data[0].id

    async def strategies_using_reward(self) -> dict[str, bool]:
        """Each served strategy's name and whether it steers by a reward."""
        body = await self.openai.get("/strategies", cast_to=object)
        return {s["name"]: bool(s.get("uses_reward")) for s in body["data"]}

    async def chat(
        self,
        model: str,
        prompt: str,
        sampling: dict[str, Any],
        ttalign_fields: dict[str, Any],
    ) -> Answer:
        """Send ``prompt`` as a single user turn; ``sampling`` holds max_tokens, temperature..."""
        started = time.perf_counter()
        completion = await self.openai.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            extra_body=ttalign_fields,
            **sampling,
        )
        wall = time.perf_counter() - started
        choice = completion.choices[0]
        alignment = (completion.model_extra or {}).get("alignment") or {}
        return Answer(choice.message.content or "", alignment, wall, choice.finish_reason)

    async def score(
        self,
        reward: str | None,
        prompt: str,
        candidates: list[str],
        constraints: list[dict[str, Any]] | None = None,
    ) -> list[float]:
        """Scores of ``candidates`` as replies to ``prompt`` under the reward client ``reward``."""
        body: dict[str, Any] = {
            "reward": reward,
            "messages": [{"role": "user", "content": prompt}],
            "candidates": candidates,
        }
        if constraints:
            body["constraints"] = constraints
        reply = await self.openai.post("/rewards/score", body=body, cast_to=object)
        return [float(s) for s in reply["scores"]]

    async def close(self) -> None:
        await self.openai.close()
