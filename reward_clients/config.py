"""Build the named reward clients from the server's reward configuration file.

The file (``--reward-config`` / ``TTALIGN_REWARD_CONFIG``) is JSON or YAML (by suffix
``.yaml``/``.yml``, else JSON). It is the only place reward clients, their URLs, models and
weights are defined; requests can only pick a client by name. Example (YAML)::

    default: skywork              # optional; --default-reward overrides it; else "judge"
    clients:
      skywork:                    # vLLM pooling server: vllm serve M --runner pooling
        type: vllm_pooling
        url: http://127.0.0.1:8001  # or urls: [...] (replicas balanced, retried and
                                    # health-checked like the remote engine's)
        health_check_interval: 5    # with urls: seconds between /health checks
        model: Skywork/Skywork-Reward-V2-Llama-3.1-8B   # optional, sent as "model"
        tokenizer: /models/skywork  # optional: render locally and batch as token ids;
                                    # unset: one /classify "messages" request per candidate
        label_index: 0              # which output of the classifier is the reward
      tei-rm:                     # Text Embeddings Inference /predict
        type: tei
        url: http://127.0.0.1:8002
        tokenizer: /models/rm       # required: its chat template renders the input
        label: null                 # the label to read; null: the only one
      local-rm:                   # in-process transformers sequence classifier
        type: transformers
        path: /models/rm
        device: auto                # auto | cpu | cuda | cuda:1 ...
        dtype: float32
      strict-judge:               # LLM judge; no url: the serving engine itself
        type: judge
        url: http://127.0.0.1:8003  # optional remote OpenAI-compatible vLLM server
        engine: serving             # without url: serving (the policy) | judge (--judge-model)
        model: Qwen/Qwen2.5-7B-Instruct
        api_key_env: JUDGE_API_KEY  # optional: environment variable holding the key
        rubric: "Prefer short, exact answers."
        mode: rating                # rating (expected 1-9) | yes_no (P(Yes): obeys it all?)
                                    # | checklist (requirements listed once per request, each
                                    # checked yes/no) | pairwise (P(better) than the judge's
                                    # own reference reply); these two on an engine, not a url
        scale_min: 1
        scale_max: 9
      request-rules:              # the request's own instructions, extracted as rules
        type: auto_constraints
        engine: judge               # judge (--judge-model, the default) | serving
        fallback: judge-strong      # optional: orders ties, scores requests with no rules
        break_ties: true            # false: the fallback only scores requests with no rules
        max_tokens: 256
      safety:                     # does the reply decline exactly when it should?
        type: harmlessness
        engine: judge               # judge (--judge-model, the default) | serving
        harm_threshold: 0.6         # P(Yes) to "is it harmful?" above which it counts so
        sharpness: 10               # how sharply P(harmful) turns at the threshold
      mix:                        # weighted composite of other clients
        type: composite
        components: {skywork: 0.7, rules: 0.3}
        normalization: zscore       # zscore | minmax | none (per component, fixed per request)

Every client except ``composite`` (and ``rules``) also takes the reliability and batching
settings of :class:`~reward_clients.backend.BackendSettings`: ``timeout_seconds`` (30),
``max_retries`` (2), ``backoff_seconds`` (0.2), ``batch_window_ms`` (5; 0 for the judge)
and ``max_batch_size`` (64).

Two clients exist even without a file: ``rules`` (rule verifiers over each request's
``constraints``) and ``judge`` (the LLM judge on the serving engine, with the default
rubric). With a judge engine (``--judge-model``) there are three more:
``judge-strong-yes-no``, the yes/no judge on that engine; ``auto_constraints``, rules
extracted from each request by that engine, ties ordered by ``judge-strong-yes-no``; and
``judge-strong``, the same extracted rules with ``judge-strong-yes-no`` only for requests
that state none (one judge call per reply fewer); and ``harmlessness``, which asks once
whether the request is harmful and per reply whether it declines. A configured client of
the same name replaces a built-in one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ttalign.reward_clients import ifeval_checks
from ttalign.reward_clients.auto_constraints import AutoConstraintsReward
from ttalign.reward_clients.backend import BackendSettings
from ttalign.reward_clients.base import RewardClient
from ttalign.reward_clients.checklist import ChecklistJudge
from ttalign.reward_clients.composite import CompositeReward
from ttalign.reward_clients.constraint_extraction import ConstraintExtractor
from ttalign.reward_clients.harmlessness import (
    DEFAULT_HARM_THRESHOLD,
    DEFAULT_SHARPNESS,
    HarmlessnessJudge,
)
from ttalign.reward_clients.judge import DEFAULT_RUBRIC, JudgeReward
from ttalign.reward_clients.local_hf import TransformersReward
from ttalign.reward_clients.pairwise import PairwiseJudge
from ttalign.reward_clients.registry import RewardRegistry
from ttalign.reward_clients.rules import RuleVerifierReward
from ttalign.reward_clients.tei import TeiReward
from ttalign.reward_clients.vllm_pooling import VllmPoolingReward

BUILTIN_DEFAULT = "judge"
#: The built-in strong judge on the judge engine (``--judge-model``), when there is one: the
#: request's extracted rules, with the yes/no judge for requests that state none. Of the
#: variants measured (docs/rewards.md), it agreed best with IFEval's checkers per engine call.
STRONG_JUDGE = "judge-strong"
#: The judge engine's yes/no judge: P(Yes) that the reply obeys every instruction.
STRONG_YES_NO = "judge-strong-yes-no"
#: The built-in extracted-rules reward on the judge engine, when there is one.
AUTO_CONSTRAINTS = "auto_constraints"
#: The judge engine's harmlessness reward: does the reply decline exactly when it should?
HARMLESSNESS = "harmlessness"
#: Judge modes that make several engine calls per reply: an engine only, never a url.
ENGINE_MODES = ("checklist", "pairwise")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VllmPoolingConfig(BackendSettings):
    type: Literal["vllm_pooling"]
    url: str | None = Field(None, description="One pooling server (or a router in front).")
    urls: list[str] | None = Field(
        None, description="Replicas of the pooling server, balanced and health-checked here."
    )
    model: str | None = None
    tokenizer: str | None = None
    label_index: int = Field(0, ge=0)
    health_check_interval: float = Field(
        5.0, gt=0, description="Seconds between checks of each replica's /health."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_replica_retries(cls, data: Any) -> Any:
        if isinstance(data, dict) and "replica_retries" in data:
            raise ValueError(
                "replica_retries is gone: max_retries (default 2) now bounds every attempt of "
                "a call, each on another replica where one is left; set that instead"
            )
        return data

    @model_validator(mode="after")
    def _one_way_to_the_servers(self) -> VllmPoolingConfig:
        if (self.url is None) == (self.urls is None):
            raise ValueError("give exactly one of url and urls")
        if self.urls is not None:
            if not self.urls:
                raise ValueError("urls must list at least one URL")
            if len({u.rstrip("/") for u in self.urls}) != len(self.urls):
                raise ValueError("urls lists a URL twice")
        return self

    def replica_urls(self) -> list[str]:
        """Every server URL, whichever of ``url`` and ``urls`` gave them."""
        return [self.url] if self.url is not None else list(self.urls or [])


class TeiConfig(BackendSettings):
    type: Literal["tei"]
    url: str
    tokenizer: str
    label: str | None = None


class TransformersConfig(BackendSettings):
    type: Literal["transformers"]
    path: str
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    label_index: int = Field(0, ge=0)


class JudgeConfig(BackendSettings):
    type: Literal["judge"]
    # The engine batches concurrent calls itself; gathering them first only adds latency.
    batch_window_ms: float = Field(0.0, ge=0)
    url: str | None = None
    engine: Literal["serving", "judge"] = "serving"
    model: str | None = None
    api_key_env: str | None = None
    rubric: str = DEFAULT_RUBRIC
    mode: Literal["rating", "yes_no", "checklist", "pairwise"] = "rating"
    scale_min: int = Field(1, ge=0, le=9)
    scale_max: int = Field(9, ge=0, le=9)


class AutoConstraintsConfig(_Strict):
    type: Literal["auto_constraints"]
    engine: Literal["serving", "judge"] = "judge"
    fallback: str | None = None
    break_ties: bool = True
    max_tokens: int = Field(256, ge=16, le=1024)


class HarmlessnessConfig(BackendSettings):
    type: Literal["harmlessness"]
    # The engine batches concurrent calls itself; gathering them first only adds latency.
    batch_window_ms: float = Field(0.0, ge=0)
    engine: Literal["serving", "judge"] = "judge"
    harm_threshold: float = Field(DEFAULT_HARM_THRESHOLD, gt=0, lt=1)
    sharpness: float = Field(DEFAULT_SHARPNESS, gt=0, le=100)


class RulesConfig(_Strict):
    type: Literal["rules"]


class CompositeConfig(_Strict):
    type: Literal["composite"]
    components: dict[str, float] = Field(min_length=1)
    normalization: Literal["zscore", "minmax", "none"] = "zscore"


ClientConfig = Annotated[
    VllmPoolingConfig
    | TeiConfig
    | TransformersConfig
    | JudgeConfig
    | AutoConstraintsConfig
    | HarmlessnessConfig
    | RulesConfig
    | CompositeConfig,
    Field(discriminator="type"),
]


class RewardConfigFile(_Strict):
    """The whole reward configuration file."""

    default: str | None = None
    clients: dict[str, ClientConfig] = Field(default_factory=dict)


class RewardConfigError(ValueError):
    """The reward configuration file is invalid; the message names the file and field."""


def read_config(path: Path) -> RewardConfigFile:
    """Parse and validate a JSON or YAML reward configuration file."""
    text = Path(path).read_text()
    try:
        if Path(path).suffix.lower() in {".yaml", ".yml"}:
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
        return RewardConfigFile.model_validate(raw)
    except (ValueError, ValidationError) as exc:
        raise RewardConfigError(f"{path}: {exc}") from None


def read_reward_config(
    path: Path, default: str | None = None, *, judge_engine: bool = False
) -> RewardConfigFile:
    """Read ``path`` and check every client name it refers to, building no client.

    Cheap enough to run before the engine starts, so a bad file fails at once. ``default``
    is the server's ``--default-reward``, which must name a client too. ``judge_engine``
    says whether the server will have one (``--judge-model``).
    """
    try:
        config = read_config(path)
    except OSError as exc:
        raise RewardConfigError(f"{path}: {exc.strerror}") from None
    known = {"rules", BUILTIN_DEFAULT, *config.clients}
    if judge_engine:
        known |= {STRONG_JUDGE, STRONG_YES_NO, AUTO_CONSTRAINTS, HARMLESSNESS}
    for name, spec in config.clients.items():
        if isinstance(spec, CompositeConfig) and (missing := set(spec.components) - known):
            raise RewardConfigError(
                f"{path}: composite {name!r} names unknown clients {sorted(missing)}"
            )
        if isinstance(spec, JudgeConfig) and spec.scale_min >= spec.scale_max:
            raise RewardConfigError(f"{path}: judge {name!r}: scale_min must be below scale_max")
        if isinstance(spec, JudgeConfig) and spec.mode in ENGINE_MODES and spec.url is not None:
            raise RewardConfigError(
                f"{path}: judge {name!r}: mode {spec.mode} runs on an engine, not a url"
            )
        on_engine = JudgeConfig | AutoConstraintsConfig | HarmlessnessConfig
        on_judge = isinstance(spec, on_engine) and spec.engine == "judge"
        if on_judge and not judge_engine:
            raise RewardConfigError(
                f"{path}: {spec.type} {name!r} runs on the judge engine, and the server has "
                "none (start it with --judge-model)"
            )
        if isinstance(spec, AutoConstraintsConfig) and spec.fallback not in {None, *known}:
            raise RewardConfigError(
                f"{path}: {name!r} falls back on unknown client {spec.fallback!r}"
            )
    chosen = default or config.default
    if chosen is not None and chosen not in known:
        raise RewardConfigError(f"{path}: default reward {chosen!r} is not among {sorted(known)}")
    return config


def load_reward_registry(
    path: Path | None,
    default: str | None,
    *,
    engine: Any = None,
    judge_engine: Any = None,
    metrics: Any = None,
) -> RewardRegistry:
    """The registry of the built-in clients plus those ``path`` defines.

    ``default`` (the server setting) wins over the file's ``default``; without either the
    default is ``judge``. Without an ``engine`` there is no built-in judge; with a
    ``judge_engine`` there are also ``judge-strong``, ``judge-strong-yes-no`` and
    ``auto_constraints``.
    """
    config = read_config(path) if path is not None else RewardConfigFile()
    specs: dict[str, Any] = {"rules": RulesConfig(type="rules")}
    if engine is not None:
        specs["judge"] = JudgeConfig(type="judge")
    if judge_engine is not None:
        specs.update(_judge_engine_builtins())
    specs.update(config.clients)
    clients = _Builder(specs, engine, judge_engine, metrics).build_all()
    chosen = default or config.default or (BUILTIN_DEFAULT if BUILTIN_DEFAULT in clients else None)
    if chosen is not None and chosen not in clients:
        raise RewardConfigError(f"default reward {chosen!r} is not among {sorted(clients)}")
    return RewardRegistry(clients, default=chosen)


def _judge_engine_builtins() -> dict[str, Any]:
    """The rewards a judge engine brings. Its calls are local, so a timeout means overload,
    which a retry would only make worse; on CPU a busy 1.5B judge needs minutes, not 30 s."""
    local = {"engine": "judge", "timeout_seconds": 600.0, "max_retries": 0}
    return {
        STRONG_YES_NO: JudgeConfig(type="judge", mode="yes_no", **local),
        STRONG_JUDGE: AutoConstraintsConfig(
            type="auto_constraints", fallback=STRONG_YES_NO, break_ties=False
        ),
        AUTO_CONSTRAINTS: AutoConstraintsConfig(type="auto_constraints", fallback=STRONG_YES_NO),
        HARMLESSNESS: HarmlessnessConfig(type="harmlessness", **local),
    }


class _Builder:
    """Builds clients from their configs; composites resolve their components by name."""

    def __init__(self, specs: dict[str, Any], engine: Any, judge_engine: Any, metrics: Any):
        self.specs = specs
        self.engine = engine
        self.judge_engine = judge_engine
        self.metrics = metrics
        self.built: dict[str, RewardClient] = {}
        self._building: set[str] = set()

    def build_all(self) -> dict[str, RewardClient]:
        for name in self.specs:
            self.build(name)
        return self.built

    def build(self, name: str) -> RewardClient:
        if name in self.built:
            return self.built[name]
        if name in self._building:
            raise RewardConfigError(f"reward client {name!r} is part of a composite cycle")
        if name not in self.specs:
            raise RewardConfigError(f"composite component {name!r} is not a configured client")
        self._building.add(name)
        self.built[name] = self._make(name, self.specs[name])
        self._building.discard(name)
        return self.built[name]

    def _make(self, name: str, spec: Any) -> RewardClient:
        m = self.metrics
        if isinstance(spec, RulesConfig):
            # IFEval's checkers take most of a second to import: load them at start-up, not
            # on the event loop when the first request with an IFEval constraint arrives.
            ifeval_checks.preload()
            return RuleVerifierReward(name, metrics=m)
        if isinstance(spec, CompositeConfig):
            components = {c: (self.build(c), w) for c, w in spec.components.items()}
            return CompositeReward(name, components, spec.normalization, metrics=m)
        if isinstance(spec, AutoConstraintsConfig):
            return self._auto_constraints(name, spec)
        backend = BackendSettings.model_validate(
            spec.model_dump(include=set(BackendSettings.model_fields))
        )
        if isinstance(spec, VllmPoolingConfig):
            return VllmPoolingReward(
                name, urls=spec.replica_urls(), model=spec.model, tokenizer=spec.tokenizer,
                label_index=spec.label_index, health_check_interval=spec.health_check_interval,
                settings=backend, metrics=m,
            )  # fmt: skip
        if isinstance(spec, TeiConfig):
            return TeiReward(
                name, url=spec.url, tokenizer=spec.tokenizer, label=spec.label,
                settings=backend, metrics=m,
            )  # fmt: skip
        if isinstance(spec, HarmlessnessConfig):
            return self._harmlessness(name, spec, backend)
        if isinstance(spec, TransformersConfig):
            return TransformersReward(
                name, path=spec.path, device=spec.device, dtype=spec.dtype,
                label_index=spec.label_index, settings=backend, metrics=m,
            )  # fmt: skip
        return self._judge(name, spec, backend)

    def _auto_constraints(self, name: str, spec: AutoConstraintsConfig) -> RewardClient:
        engine = self.judge_engine if spec.engine == "judge" else self.engine
        if engine is None:
            where = "judge engine (--judge-model)" if spec.engine == "judge" else "serving engine"
            raise RewardConfigError(f"{spec.type} {name!r} has no {where}")
        fallback = self.build(spec.fallback) if spec.fallback is not None else None
        extractor = ConstraintExtractor(engine, max_tokens=spec.max_tokens)
        return AutoConstraintsReward(
            name, extractor, fallback=fallback, break_ties=spec.break_ties, metrics=self.metrics
        )

    def _harmlessness(
        self, name: str, spec: HarmlessnessConfig, backend: BackendSettings
    ) -> RewardClient:
        engine = self.judge_engine if spec.engine == "judge" else self.engine
        if engine is None:
            where = "judge engine (--judge-model)" if spec.engine == "judge" else "serving engine"
            raise RewardConfigError(f"harmlessness {name!r} has no {where}")
        return HarmlessnessJudge(
            name, engine=engine, harm_threshold=spec.harm_threshold, sharpness=spec.sharpness,
            settings=backend, metrics=self.metrics,
        )  # fmt: skip

    def _judge(self, name: str, spec: JudgeConfig, backend: BackendSettings) -> RewardClient:
        engine = self.judge_engine if spec.engine == "judge" else self.engine
        if spec.url is None and engine is None:
            where = "judge engine (--judge-model)" if spec.engine == "judge" else "serving engine"
            raise RewardConfigError(f"judge {name!r} has no url and there is no {where}")
        api_key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
        if spec.scale_min >= spec.scale_max:
            raise RewardConfigError(f"judge {name!r}: scale_min must be below scale_max")
        if spec.mode in ENGINE_MODES:
            if spec.url is not None:
                raise RewardConfigError(
                    f"judge {name!r}: mode {spec.mode} runs on an engine, not a url"
                )
            kind = ChecklistJudge if spec.mode == "checklist" else PairwiseJudge
            return kind(name, engine=engine, settings=backend, metrics=self.metrics)
        return JudgeReward(
            name,
            engine=engine if spec.url is None else None,
            url=spec.url,
            model=spec.model,
            api_key=api_key,
            rubric=spec.rubric,
            scale_min=spec.scale_min,
            scale_max=spec.scale_max,
            mode="yes_no" if spec.mode == "yes_no" else "rating",
            settings=backend,
            metrics=self.metrics,
        )
