"""Split-wheel models: the parts are found from wheel metadata, joined in order and verified."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from ttalign.server.gguf_conversion import ModelPreparationError
from ttalign.server.split_wheel_models import (
    SPLIT_WHEEL_MODELS,
    SplitWheelModel,
    join_parts,
    locate_parts,
    split_wheel_model,
)

TOY = SplitWheelModel(
    name="Toy-Model",
    description="three parts",
    wheel_stem="toy-model-part",
    version="1.0.0",
    parts=3,
    gguf_bytes=0,
    gguf_sha256="",
)


def install_fake_wheel(site: Path, number: int, payload: bytes, version: str = "1.0.0") -> None:
    """A wheel as pip leaves it: the package's data file and a dist-info with its RECORD.
    Its __init__.py raises, so a test fails if anything imports it."""
    package = f"toy_model_part{number}"
    data = site / package / "data" / f"part{number:02d}.bin"
    data.parent.mkdir(parents=True)
    data.write_bytes(payload)
    (site / package / "__init__.py").write_text("raise ImportError('never import me')\n")
    info = site / f"{package}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: toy-model-part{number}\nVersion: {version}\n"
    )
    (info / "RECORD").write_text(
        f"{package}/__init__.py,,\n{package}/data/part{number:02d}.bin,,\n"
        f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n"
    )


def test_the_parts_are_found_in_order_from_wheel_metadata(tmp_path):
    for number in (3, 1, 2):
        install_fake_wheel(tmp_path, number, f"part {number}".encode())
    parts = locate_parts(TOY, search_path=[str(tmp_path)])
    assert [part.read_bytes() for part in parts] == [b"part 1", b"part 2", b"part 3"]


def test_missing_and_wrong_version_wheels_are_named(tmp_path):
    install_fake_wheel(tmp_path, 1, b"a")
    install_fake_wheel(tmp_path, 2, b"b", version="0.9.0")
    with pytest.raises(ModelPreparationError) as caught:
        locate_parts(TOY, search_path=[str(tmp_path)])
    message = str(caught.value)
    assert "toy-model-part2 (0.9.0 installed, 1.0.0 pinned)" in message
    assert "toy-model-part3" in message
    assert "toy-model-part1" not in message


def test_parts_join_into_the_pinned_file(tmp_path):
    parts = []
    for number, payload in enumerate([b"GGUF", b"-middle-", b"end"], start=1):
        parts.append(tmp_path / f"p{number}")
        parts[-1].write_bytes(payload)
    whole = b"GGUF-middle-end"
    target = tmp_path / "out" / "model.gguf"
    joined = join_parts(parts, target, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    assert joined == target
    assert target.read_bytes() == whole
    assert not list(target.parent.glob("*.partial"))


@pytest.mark.parametrize("wrong", ["size", "sha256"])
def test_a_join_that_does_not_match_the_pin_leaves_no_file(tmp_path, wrong):
    part = tmp_path / "p1"
    part.write_bytes(b"payload")
    pins = {"size": 7, "sha256": hashlib.sha256(b"payload").hexdigest()}
    pins[wrong] = 8 if wrong == "size" else "0" * 64
    target = tmp_path / "model.gguf"
    with pytest.raises(ModelPreparationError, match="expected"):
        join_parts([part], target, **pins)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p1"]


def test_models_are_looked_up_by_name_and_unknown_names_list_the_known_ones():
    assert split_wheel_model("qwen2.5-coder-1.5b-instruct").parts == 22
    with pytest.raises(ModelPreparationError, match=r"Qwen2\.5-Coder-0\.5B-Instruct"):
        split_wheel_model("llama")


def test_every_packaged_model_pins_its_size_and_sha256():
    for model in SPLIT_WHEEL_MODELS.values():
        assert model.gguf_bytes > 0, model.name
        assert len(model.gguf_sha256) == 64, model.name
        assert model.requirements()[0] == f"{model.wheel_stem}1=={model.version}"
