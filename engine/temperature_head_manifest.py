"""What a temperature head's files say about themselves, readable without torch.

A head is stored as ``NAME.safetensors`` (its weights) beside ``NAME.json`` (this
manifest). A gateway, which loads no weights, reads the manifests to know which heads its
replicas serve.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Level = Literal["example", "token"]

#: Heads trained for the embedded SmolLM2, shipped in the package (engine/heads).
SHIPPED_HEADS = {
    f"smollm2-{level}": Path(__file__).resolve().parent / "heads" / f"smollm2-{level}"
    for level in ("example", "token")
}


class HeadFileError(ValueError):
    """A head file is missing, malformed, or was trained for another model."""


@dataclass(frozen=True)
class HeadManifest:
    """What a head file says about itself."""

    temperatures: tuple[float, ...]
    level: Level
    input_dim: int
    hidden_dim: int
    #: :func:`unembedding_fingerprint` of the model the head was trained on.
    model_fingerprint: str
    #: Training data, reward, seed, metrics and command: free-form, for people.
    training: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "temperatures": list(self.temperatures),
            "level": self.level,
            "input_dim": self.input_dim,
            "hidden_dim": self.hidden_dim,
            "model_fingerprint": self.model_fingerprint,
            "training": dict(self.training),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HeadManifest:
        try:
            level = data["level"]
            if level not in ("example", "token"):
                raise HeadFileError(f"level must be 'example' or 'token', not {level!r}")
            return cls(
                temperatures=tuple(float(t) for t in data["temperatures"]),
                level=level,
                input_dim=int(data["input_dim"]),
                hidden_dim=int(data["hidden_dim"]),
                model_fingerprint=str(data["model_fingerprint"]),
                training=dict(data.get("training") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HeadFileError(f"malformed head manifest: {exc}") from exc


def head_paths(path: str | Path) -> tuple[Path, Path]:
    """The weights file and the manifest of the head stored at ``path`` (with or without
    its ``.safetensors`` suffix)."""
    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def read_manifest(path: str | Path) -> HeadManifest:
    """The manifest of the head at ``path``, without loading its weights."""
    _, manifest_path = head_paths(path)
    try:
        return HeadManifest.from_json(json.loads(manifest_path.read_text()))
    except FileNotFoundError:
        raise HeadFileError(f"head manifest {manifest_path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise HeadFileError(f"head manifest {manifest_path} is not JSON: {exc}") from exc
