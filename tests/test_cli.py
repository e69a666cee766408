"""The command line: every setting is a documented flag and a TTALIGN_* variable."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ttalign.server.cli import build_parser, settings_from_args
from ttalign.server.settings import ServerSettings


def test_help_documents_every_setting() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "ttalign.server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
        assert "TTALIGN_" + name.upper() in " ".join(help_text.split())


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTALIGN_PORT", "9100")
    monkeypatch.setenv("TTALIGN_MAX_N", "3")
    args = build_parser().parse_args(["serve", "--max-n", "5", "--no-warmup"])
    settings = settings_from_args(args)
    assert settings.port == 9100
    assert settings.max_n == 5
    assert settings.warmup is False


def test_invalid_setting_exits_with_a_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ttalign.server.cli", "serve", "--max-n", "0"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "max_n" in result.stderr


def test_unknown_prompt_override_exits_at_start_listing_the_valid_names(tmp_path) -> None:
    overrides = tmp_path / "prompts.json"
    overrides.write_text('{"tpo.los_user": "typo", "rain.question": "fine"}')
    result = subprocess.run(
        [sys.executable, "-m", "ttalign.server.cli", "serve", "--prompt-overrides", str(overrides)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "unknown prompt template(s) tpo.los_user" in result.stderr
    for valid in ("tpo.loss_user", "rain.question", "rain.rubric.harmless", "darwin.mutation"):
        assert valid in result.stderr  # the valid names are listed
    assert "rain.question," not in result.stderr.split("valid names are")[0]  # known: not refused


def test_deterministic_mode_is_refused_in_remote_mode() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ttalign.server.cli", "serve", "--engine", "remote",
         "--engine-urls", "http://127.0.0.1:1", "--deterministic"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--deterministic applies to the in-process engine" in result.stderr
