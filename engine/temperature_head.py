"""The temperature head of Adaptive Decoding: a small MLP that picks a sampling temperature.

The head reads the frozen policy's final hidden state at the current position and scores a
discrete set of temperatures (Dhuliawala et al., 2024). Inside vLLM a logits processor sees
logits, not hidden states, so :class:`LogitsTemperatureHead` folds the head's first layer
onto the logits through the pseudo-inverse of the unembedding matrix: for a model whose
logits are ``U @ h`` (no logit scaling or soft-capping, as in SmolLM2 and Llama), ``pinv(U)
@ logits`` is ``h`` exactly, so the folded head computes the trained head's scores.

A head is stored as two files side by side: ``NAME.safetensors`` (the weights, a few hundred
KB) and ``NAME.json`` (the manifest: temperatures, level, shapes, the fingerprint of the
model it was trained on, and how it was trained). Nothing here imports vLLM.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from ttalign.engine.temperature_head_manifest import (
    HeadFileError,
    HeadManifest,
    Level,
    head_paths,
    read_manifest,
)

__all__ = ["HeadFileError", "HeadManifest", "Level", "head_paths", "read_manifest"]

#: The paper's temperature set.
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


class TemperatureHead(nn.Module):
    """Three linear layers with SiLU over standardized hidden states; outputs one score per
    temperature. ``feature_mean`` and ``feature_scale`` standardize the input."""

    def __init__(self, input_dim: int, hidden_dim: int, num_temperatures: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, num_temperatures),
        )
        # The last layer starts at zero: an untrained head is uniform over the set, as LPO's
        # first round assumes, and early stopping keeps what was learned, not the init noise.
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)
        self.register_buffer("feature_mean", torch.zeros(input_dim))
        self.register_buffer("feature_scale", torch.ones(input_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers((hidden - self.feature_mean) / self.feature_scale)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the temperature set, one row per hidden state."""
        return torch.log_softmax(self(hidden), dim=-1)


class LogitsTemperatureHead:
    """A :class:`TemperatureHead` whose first layer reads logits instead of hidden states.

    ``first(logits) = A @ ((pinv(U) @ logits - mean) / scale) + b`` is precomputed as one
    ``(hidden, vocab)`` matrix, cheaper than recovering the 576-wide hidden state first
    whenever the head is narrower than the model.
    """

    def __init__(self, head: TemperatureHead, unembedding: torch.Tensor) -> None:
        first, *rest = list(head.layers)
        assert isinstance(first, nn.Linear)
        with torch.no_grad():
            recover = torch.linalg.pinv(unembedding.float())  # (hidden, vocab)
            weight = first.weight / head.feature_scale  # (head_hidden, model_hidden)
            self.first_weight = (weight @ recover).contiguous()  # (head_hidden, vocab)
            self.first_bias = first.bias - weight @ head.feature_mean
        self.rest = nn.Sequential(*rest).eval()

    def to(self, device: torch.device) -> LogitsTemperatureHead:
        """Move the folded weights to ``device`` (the logits' device); returns ``self``."""
        self.first_weight = self.first_weight.to(device)
        self.first_bias = self.first_bias.to(device)
        self.rest = self.rest.to(device)
        return self

    @torch.no_grad()
    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores over the temperature set for each row of ``logits`` (rows, vocab)."""
        return self.rest(torch.addmm(self.first_bias, logits, self.first_weight.T))


def unembedding_fingerprint(unembedding: torch.Tensor) -> str:
    """A short hash of the unembedding matrix, so a head is never used on another model."""
    data = unembedding.detach().to(torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    return f"{tuple(unembedding.shape)}:{digest}"


def load_unembedding(model_dir: str | Path) -> torch.Tensor:
    """The unembedding matrix ``U`` (vocab, hidden) from a Hugging Face model folder.

    Tied models (SmolLM2) store it once as the input embeddings.
    """
    from safetensors import safe_open

    folder = Path(model_dir)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HeadFileError(f"no safetensors weights in {folder}")
    found: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), "pt") as weights:
            names = set(weights.keys())
            for name in ("lm_head.weight", "model.embed_tokens.weight"):
                if name in names:
                    found[name] = weights.get_tensor(name)
    matrix = found.get("lm_head.weight", found.get("model.embed_tokens.weight"))
    if matrix is None:
        raise HeadFileError(f"{folder} has neither lm_head.weight nor model.embed_tokens.weight")
    return matrix.to(torch.float32)


def save_head(head: TemperatureHead, manifest: HeadManifest, path: str | Path) -> Path:
    """Write ``head`` and its manifest; returns the weights file's path."""
    from safetensors.torch import save_file

    weights, manifest_path = head_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous() for name, t in head.state_dict().items()}
    save_file(state, str(weights))
    manifest_path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return weights


def load_head(path: str | Path) -> tuple[TemperatureHead, HeadManifest]:
    """Load a head written by :func:`save_head`."""
    from safetensors.torch import load_file

    manifest = read_manifest(path)
    weights, _ = head_paths(path)
    head = TemperatureHead(manifest.input_dim, manifest.hidden_dim, len(manifest.temperatures))
    try:
        head.load_state_dict(load_file(str(weights)))
    except (FileNotFoundError, RuntimeError) as exc:
        raise HeadFileError(f"cannot load head weights {weights}: {exc}") from exc
    return head.eval(), manifest


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax divided by log(vocab): 0 for one certain token, 1 for
    uniform."""
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).nan_to_num().sum(dim=-1)
    return entropy / math.log(logits.shape[-1])


def entropy_temperature(
    logits: torch.Tensor, low: torch.Tensor, high: torch.Tensor, exponent: torch.Tensor
) -> torch.Tensor:
    """DynaTemp's rule: ``low + (high - low) * normalized_entropy ** exponent`` per row.

    Uncertain positions get hotter, confident ones cooler.
    """
    return low + (high - low) * normalized_entropy(logits).pow(exponent)


def nearest_index(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For each row, the index of the entry of ``table`` (rows, K; padded with ``inf``)
    nearest to ``values`` (rows,)."""
    return (table - values[:, None]).abs().argmin(dim=-1)


def temperature_table(sets: Sequence[Sequence[float]]) -> torch.Tensor:
    """Rows of temperature sets padded with ``inf`` to one width."""
    width = max(len(s) for s in sets)
    table = torch.full((len(sets), width), float("inf"))
    for row, values in enumerate(sets):
        table[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return table


def available_heads(
    configured: Mapping[str, str | Path], model_dir: str | Path
) -> tuple[dict[str, HeadManifest], dict[str, str]]:
    """The configured heads usable with the model in ``model_dir``, and why the others are not.

    A head is usable when its files load and it was trained on this model's unembedding.
    """
    fingerprint = unembedding_fingerprint(load_unembedding(model_dir))
    usable: dict[str, HeadManifest] = {}
    refused: dict[str, str] = {}
    for name, path in configured.items():
        try:
            manifest = read_manifest(path)
        except HeadFileError as exc:
            refused[name] = str(exc)
            continue
        if manifest.model_fingerprint != fingerprint:
            refused[name] = f"trained for another model ({manifest.model_fingerprint})"
            continue
        if not head_paths(path)[0].is_file():
            refused[name] = f"{head_paths(path)[0]} does not exist"
            continue
        usable[name] = manifest
    return usable, refused
