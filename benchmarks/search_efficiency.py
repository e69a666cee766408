"""What the search-efficiency benchmarks share: vLLM's counters, prefill, statistics, tables.

``rain_efficiency``, ``prefix_cache`` and ``fair_sharing`` (issue 19) read vLLM's own
Prometheus counters from a server's ``/metrics``, take each request's prefill from its
``alignment.engine_prefill`` (or from those counters, or report ``None`` on a server that
has neither), summarize latencies by median and percentile, and start ttalign either from
this tree or from an older one (``benchmarks/run_from_tree.py``). They also share their
request bodies, their command-line options and how a run starts and writes its results.
Nothing here does I/O except :func:`scrape_counters`, :func:`settled_counters`,
:func:`timed_chat`, :func:`warm_up`, :func:`worktree`, :func:`baseline_tree`,
:func:`start_run` and :func:`write_results`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from ttalign.benchmarks.strategy_cost import MODEL_NAME
from ttalign.server.model_prep import prepare_embedded_model

#: The repository root (the ``ttalign`` package's folder).
REPO = Path(__file__).resolve().parents[1]

#: vLLM's counters the benchmarks read, by short name: prompt tokens looked up in the prefix
#: cache and found there, prompt tokens prefilled, tokens generated.
COUNTERS = {
    "queries": "vllm:prefix_cache_queries_total",
    "hits": "vllm:prefix_cache_hits_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
}

Counters = Mapping[str, float | None]


# --- vLLM's counters ------------------------------------------------------------------------


def parse_counters(metrics_text: str) -> dict[str, float | None]:
    """:data:`COUNTERS` from Prometheus text, each summed over its label sets.

    A counter the text does not have (a server that does not export vLLM's metrics, such
    as ttalign before issue 19) is ``None``, not 0, so that a delta of it is ``None`` too.
    """
    wanted = {name: key for key, name in COUNTERS.items()}
    totals: dict[str, float | None] = dict.fromkeys(COUNTERS)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                totals[key] = (totals[key] or 0.0) + sample.value
    return totals


def counter_delta(before: Counters, after: Counters) -> dict[str, float | None]:
    """``after - before`` per counter; ``None`` where either scrape lacked it."""
    delta: dict[str, float | None] = {}
    for key in COUNTERS:
        old, new = before.get(key), after.get(key)
        delta[key] = None if old is None or new is None else new - old
    return delta


async def scrape_counters(http: httpx.AsyncClient, base_url: str) -> dict[str, float | None]:
    """A server's :data:`COUNTERS` (all ``None`` when it has no ``/metrics``)."""
    response = await http.get(f"{base_url}/metrics")
    if response.status_code != 200:
        return dict.fromkeys(COUNTERS)
    return parse_counters(response.text)


async def settled_counters(
    http: httpx.AsyncClient, base_url: str, *, pause: float = 0.2, tries: int = 10
) -> dict[str, float | None]:
    """:func:`scrape_counters` until two scrapes ``pause`` apart agree (at most ``tries``).

    vLLM records an engine step's statistics as it hands the step's outputs on, so the
    last step of a request may reach the counters just after the response did.
    """
    current = await scrape_counters(http, base_url)
    for _ in range(tries):
        await asyncio.sleep(pause)
        following = await scrape_counters(http, base_url)
        if following == current:
            break
        current = following
    return current


def hit_rate(delta: Counters) -> float | None:
    """Share of the queried prompt tokens found in the prefix cache; ``None`` without data."""
    queries, hits = delta.get("queries"), delta.get("hits")
    if queries is None or hits is None or queries <= 0:
        return None
    return hits / queries


def request_prefill(alignment: Mapping[str, Any], delta: Counters | None) -> dict[str, Any]:
    """One request's prefill: prompt tokens computed and found cached, and where that came from.

    ``alignment.engine_prefill`` (every engine call of the request) when the server reports
    it; else the prefix-cache counters' delta around the request (valid only when it ran
    alone): cached = hits, computed = queries - hits; else ``None`` for both.
    """
    prefill = alignment.get("engine_prefill")
    if isinstance(prefill, Mapping):
        return {
            "computed_tokens": prefill.get("computed_tokens"),
            "cached_tokens": prefill.get("cached_tokens"),
            "source": "alignment",
        }
    queries = None if delta is None else delta.get("queries")
    hits = None if delta is None else delta.get("hits")
    if queries is not None and hits is not None:
        return {"computed_tokens": queries - hits, "cached_tokens": hits, "source": "counters"}
    return {"computed_tokens": None, "cached_tokens": None, "source": None}


# --- requests ---------------------------------------------------------------------------------


def plain_body(prompt: str, tokens: int, seed: int) -> dict[str, Any]:
    """Plain generation of exactly ``tokens`` tokens on ``prompt`` (strategy ``none``)."""
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 1.0,
        "ignore_eos": True,
        "seed": seed,
        "strategy": "none",
    }


def rain_body(prompt: str, seed: int, args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    """RAIN as served, on its tree's default configuration, sized by ``args.max_tokens`` and
    ``args.max_iterations`` (``None``: RAIN's own), with further request ``fields``."""
    config: dict[str, Any] = {}
    if args.max_iterations is not None:
        config["max_iterations"] = args.max_iterations
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "seed": seed,
        "strategy": "rain",
        "strategy_config": config,
        **fields,
    }


def with_sizes(args: argparse.Namespace, **sizes: Any) -> argparse.Namespace:
    """A copy of ``args`` with other request sizes, e.g. a warm-up request's small ones."""
    return argparse.Namespace(**{**vars(args), **sizes})


async def timed_chat(
    http: httpx.AsyncClient, base_url: str, body: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """POST a chat completion; (wall seconds, response JSON)."""
    started = time.perf_counter()
    response = await http.post(f"{base_url}/v1/chat/completions", json=body)
    seconds = time.perf_counter() - started
    response.raise_for_status()
    return seconds, response.json()


async def warm_up(http: httpx.AsyncClient, base_url: str, bodies: Iterable[dict[str, Any]]) -> None:
    """POST each chat completion in turn, unmeasured: first requests on CPU are slow (the
    engine's and each strategy's first paths)."""
    for body in bodies:
        (await http.post(f"{base_url}/v1/chat/completions", json=body)).raise_for_status()


# --- statistics -------------------------------------------------------------------------------


def present(values: Iterable[float | None]) -> list[float]:
    """The values that are not ``None``."""
    return [v for v in values if v is not None]


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not ``None``; ``None`` when there are none."""
    known = present(values)
    return statistics.median(known) if known else None


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """The ``q``-th percentile (0-100), interpolated linearly between closest ranks.

    The same as ``numpy.percentile``'s default: 50 is the median, 0 the minimum, 100 the
    maximum. ``None`` values are skipped; ``None`` when none is left.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in [0, 100]")
    known = sorted(present(values))
    if not known:
        return None
    position = (len(known) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return known[low] + (known[high] - known[low]) * (position - low)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; ``None`` when either is unknown or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def per_token(value: float | None, tokens: int | None) -> float | None:
    """``value`` per token; ``None`` for no tokens or an unknown value."""
    return ratio(value, tokens) if tokens else None


def relative_half_range(values: Iterable[float | None]) -> float | None:
    """Half the spread of the values, relative to their median: a crude noise level."""
    known = present(values)
    if not known:
        return None
    middle = statistics.median(known)
    return (max(known) - min(known)) / 2 / middle if middle else None


# --- markdown ---------------------------------------------------------------------------------


def cell(value: Any, digits: int = 2) -> str:
    """A table cell: "–" for unknown, floats with ``digits`` decimals below 100, whole above."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def percent(value: float | None) -> str:
    """A share as a percentage cell ("–" for unknown)."""
    return "–" if value is None else f"{100 * value:.1f} %"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table's lines; cells that are not strings go through :func:`cell`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} headers")
        cells = [c if isinstance(c, str) else cell(c) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- servers ----------------------------------------------------------------------------------


def setting_default(name: str) -> tuple[bool, Any]:
    """Whether this tree's ``ttalign serve`` has setting ``name``, and its default."""
    from ttalign.server.settings import ServerSettings

    field = ServerSettings.model_fields.get(name)
    return (False, None) if field is None else (True, field.default)


def require_settings(*names: str) -> None:
    """Exit with a message naming the ``ttalign serve`` flags this tree lacks, if any."""
    missing = [name for name in names if not setting_default(name)[0]]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise SystemExit(f"this tree's `ttalign serve` has no {flags}: this benchmark needs it")


def from_tree(command: Sequence[str], tree: Path) -> list[str]:
    """A ``ttalign serve`` command (:func:`~processes.ttalign_server_command`) that runs
    ``tree``'s code instead of this one's, through ``benchmarks/run_from_tree.py``."""
    cli = list(command).index("ttalign.server.cli")
    return [
        sys.executable, str(REPO / "benchmarks" / "run_from_tree.py"), str(tree),
        *command[cli + 1 :],
    ]  # fmt: skip


@contextmanager
def worktree(ref: str) -> Iterator[Path]:
    """A detached git worktree of ``ref``, removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="ttalign-baseline-")) / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(folder), ref],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield folder
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=REPO, check=False)


@contextmanager
def baseline_tree(tree: Path | None, ref: str) -> Iterator[Path]:
    """``tree`` when given; else a :func:`worktree` of ``ref``, removed at the end."""
    if tree is not None:
        if not (tree / "server" / "__init__.py").is_file():
            raise SystemExit(f"{tree} is not a ttalign source tree (no server/__init__.py)")
        yield tree
        return
    with worktree(ref) as folder:
        yield folder


# --- runs -------------------------------------------------------------------------------------


def command_prefix(module: str) -> str:
    """How a benchmark module is run: ``python -m ttalign.benchmarks.<module>``."""
    return f"python -m ttalign.benchmarks.{module}"


def argument_parser(module: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of benchmark ``module``'s command line; ``description`` is its docstring."""
    return argparse.ArgumentParser(
        prog=command_prefix(module),
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_rain_options(parser: argparse.ArgumentParser, own_iterations: str) -> None:
    """``--max-tokens`` and ``--max-iterations``, which size :func:`rain_body`.

    ``own_iterations`` says whose default ``max_iterations`` RAIN runs without the flag.
    """
    parser.add_argument("--max-tokens", type=int, default=32, help="RAIN's max_tokens")
    parser.add_argument(
        "--max-iterations",
        type=int,
        default=None,
        help=f"RAIN's max_iterations (default: {own_iterations}; set it only for a smoke run)",
    )


def add_run_options(
    parser: argparse.ArgumentParser, *, name: str, output_dir: Path, request_timeout: float
) -> None:
    """``--seed``, ``--request-timeout``, ``--name`` and ``--output-dir``, with these defaults."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=request_timeout,
        help="seconds one request may take",
    )
    parser.add_argument("--name", default=name, help="stem of the result files")
    parser.add_argument("--output-dir", type=Path, default=output_dir)


def start_run(log_prefix: str) -> tuple[str, Path]:
    """A run's start: the embedded model's folder and a new folder for the server logs.

    A SIGTERM from here on unwinds like Ctrl-C, so the servers the run starts are stopped
    with their engines.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    model = str(prepare_embedded_model())
    logs = Path(tempfile.mkdtemp(prefix=log_prefix))
    print(f"server logs in {logs}", flush=True)
    return model, logs


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command line that ran benchmark ``module`` (``argv``, else this process's)."""
    words = sys.argv[1:] if argv is None else argv
    return " ".join([command_prefix(module), *words])


def run_footer(result: Mapping[str, Any]) -> list[str]:
    """A report's last lines: the whole run's wall time and its command line."""
    return [
        f"Whole run (server starts included): {result['wall_seconds']:.0f} s.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]


def write_results(out: Path, result: Mapping[str, Any], markdown: str) -> None:
    """``result`` as ``out``.json and ``markdown`` as ``out``.md; the markdown printed too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
