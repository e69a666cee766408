"""Whether the KV cache fits in memory on vLLM's CPU build, said before anything slow starts.

vLLM's CPU worker compares the requested KV cache with the *available* memory of its
NUMA node only after it has spawned the engine core and loaded the weights, and then
fails with "Engine core initialization failed" in the parent process. ttalign checks the
same numbers first, and explains a failed start in terms of the setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ttalign.engine.base import EngineStartupError

#: The setting that sizes the KV cache, as a flag and as an environment variable.
KV_CACHE_SETTING = "--kv-cache-memory (TTALIGN_KV_CACHE_MEMORY)"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class NodeMemory:
    """Memory of the NUMA node that vLLM's CPU worker allocates its KV cache from."""

    node: int
    total: int
    available: int


def cpu_node_memory() -> NodeMemory | None:
    """The worker's NUMA node memory as vLLM measures it; ``None`` on GPU builds."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    # The same node and the same measure (free + file cache + reclaimable, capped by the
    # cgroup limit) as vLLM's CPUWorker.determine_available_memory.
    node = get_allowed_cpu_list()[0].numa_node
    info = get_memory_node_info(node)
    return NodeMemory(node, info.total_memory, info.available_memory)


def check_kv_cache_fits(kv_cache_bytes: int | None, memory: NodeMemory | None) -> None:
    """Refuse, before the engine starts, a KV cache larger than the node's available memory.

    Raises :class:`~ttalign.engine.base.EngineStartupError` naming the setting to change.
    """
    if kv_cache_bytes is None or memory is None or kv_cache_bytes <= memory.available:
        return
    raise EngineStartupError(
        f"The KV cache does not fit in memory: {KV_CACHE_SETTING} asks for "
        f"{format_bytes(kv_cache_bytes)}, but NUMA node {memory.node} has only "
        f"{format_bytes(memory.available)} available ({format_bytes(memory.total)} total), "
        f"and the model's weights need room too. {_advice(memory.available)}"
    )


def start_failure_message(
    error: BaseException,
    kv_cache_bytes: int | None,
    memory: NodeMemory | None,
    model_path: str,
) -> str:
    """Explain vLLM's failed start, in terms of the KV cache setting where memory explains it.

    ``memory`` is measured after the failure (the engine core has exited and freed its
    memory). When the KV cache plus the weights' size on disk exceeds what is available,
    the failure is vLLM's own KV cache check; otherwise the cause is only in vLLM's log.
    """
    if kv_cache_bytes is None or memory is None:
        return f"vLLM's engine failed to start ({error}). Its log above says why."
    weights = model_weight_bytes(model_path)
    sizes = (
        f"{KV_CACHE_SETTING} asks for {format_bytes(kv_cache_bytes)}; the model's weights "
        f"take about {format_bytes(weights)} on disk; NUMA node {memory.node} has "
        f"{format_bytes(memory.available)} available ({format_bytes(memory.total)} total)"
    )
    if kv_cache_bytes + weights > memory.available:
        return (
            f"vLLM's engine failed to start: the KV cache and the model do not fit in memory "
            f"({sizes}). {_advice(memory.available - weights)}"
        )
    return (
        f"vLLM's engine failed to start ({error}). Its log above says why. If the log "
        f"blames memory, lower {KV_CACHE_SETTING} ({sizes})."
    )


def model_weight_bytes(model_path: str) -> int:
    """The size of a local model folder's weight files (0 when it is not a local folder)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return 0
    return sum(
        f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES
    )


def format_bytes(size: int) -> str:
    """``size`` in the largest binary unit that keeps it at least 1 (e.g. ``1.5 GiB``)."""
    value, unit = float(size), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


def suggested_kv_cache(available: int) -> str | None:
    """A round KV cache size that leaves half of ``available`` to everything else."""
    mib = max(available // 2, 0) >> 20
    if mib < 64:
        return None
    power = 1 << (mib.bit_length() - 1)  # largest power of two MiB not above half
    return f"{power >> 10}GiB" if power >= 1024 else f"{power}MiB"


def _advice(available: int) -> str:
    suggestion = suggested_kv_cache(available)
    example = f", e.g. to {suggestion}," if suggestion else ""
    return f"Lower {KV_CACHE_SETTING}{example} or free memory on the machine."
