"""The ``--run`` specification: which strategy, with which settings and reward, to evaluate.

Grammar (one ``--run`` per configuration)::

    [LABEL=]STRATEGY[@REWARD][:CONFIG_JSON]

- ``STRATEGY`` is a strategy name served by ``GET /v1/strategies`` (``none``, ``best_of_n`` ...);
- ``@REWARD`` names a reward client configured on the server; without it the run uses the
  command's ``--reward`` if the strategy uses a reward at all (``GET /v1/strategies``);
- ``:CONFIG_JSON`` is the strategy's ``strategy_config`` as a JSON object;
- ``LABEL=`` names the run in tables and plots; without it a label is built from the rest.

Examples: ``none``, ``best_of_n:{"n":4}``, ``bon8-judge=best_of_n@judge:{"n":8}``,
``tpo:{"depth":2,"width":5,"mode":"revision"}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class RunSpecError(ValueError):
    """A ``--run`` value does not follow the grammar in this module's docstring."""


@dataclass(frozen=True)
class RunSpec:
    """One configuration to evaluate: sent as ``strategy``/``strategy_config``/``reward``."""

    strategy: str
    config: dict[str, Any] = field(default_factory=dict)
    reward: str | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", default_label(self))

    def request_fields(self, default_reward: str | None, uses_reward: bool) -> dict[str, Any]:
        """The ttalign fields of a chat request (for the openai client's ``extra_body``)."""
        fields: dict[str, Any] = {"strategy": self.strategy}
        if self.config:
            fields["strategy_config"] = self.config
        reward = self.reward or (default_reward if uses_reward else None)
        if reward:
            fields["reward"] = reward
        return fields


def default_label(spec: RunSpec) -> str:
    """``best_of_n(n=4)@judge``-style label from the spec's parts."""
    label = spec.strategy
    if spec.config:
        label += "(" + ",".join(f"{k}={_compact(v)}" for k, v in spec.config.items()) + ")"
    if spec.reward:
        label += f"@{spec.reward}"
    return label


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def parse_run(text: str) -> RunSpec:
    """Parse one ``--run`` value; raises :class:`RunSpecError` naming what is wrong."""
    head, sep, raw_config = text.partition(":")
    config: dict[str, Any] = {}
    if sep:
        try:
            config = json.loads(raw_config)
        except json.JSONDecodeError as exc:
            raise RunSpecError(f"{text!r}: strategy config is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise RunSpecError(f"{text!r}: strategy config must be a JSON object")
    label, _, rest = head.rpartition("=")
    strategy, _, reward = rest.partition("@")
    for part, what in ((strategy, "strategy"), (reward, "reward")):
        if part and not _NAME.match(part):
            raise RunSpecError(f"{text!r}: {what} {part!r} is not a plain name")
    if not strategy:
        raise RunSpecError(f"{text!r}: no strategy name")
    return RunSpec(strategy, config, reward or None, label)


def check_unique_labels(specs: list[RunSpec]) -> None:
    """Labels key the results; two runs with one label would overwrite each other."""
    seen: set[str] = set()
    for spec in specs:
        if spec.label in seen:
            raise RunSpecError(f"two runs are labelled {spec.label!r}; name one with LABEL=")
        seen.add(spec.label)
