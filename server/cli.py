"""``ttalign``: the command line. Every setting is a flag and a ``TTALIGN_*`` variable.

Flags are generated from :class:`~server.settings.ServerSettings`, so ``--help`` always
documents every setting, with its environment variable and default.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError
from ttalign.server.settings import ServerSettings
from ttalign.server.settings_reference import ENV_PREFIX, flag

#: uvicorn's exit status when the app fails to start.
STARTUP_FAILURE = 3


def _value_type(annotation: Any) -> Any:
    options = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    for candidate in (int, float, Path):
        if candidate in options:
            return candidate
    return str


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field; unset flags fall back to the environment, then defaults."""
    for name, field in ServerSettings.model_fields.items():
        help_text = (
            f"{field.description} [env {ENV_PREFIX}{name.upper()}; default: {field.default}]"
        )
        if field.annotation is bool or set(get_args(field.annotation)) == {bool, type(None)}:
            parser.add_argument(
                flag(name),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag(name),
                type=_value_type(field.annotation),
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=name.upper(),
            )


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    given = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields}
    return ServerSettings(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttalign", description="Test-time alignment inference server (OpenAI-compatible)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="Serve the OpenAI-compatible API.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_settings_arguments(serve)
    prepare = commands.add_parser(
        "prepare-model", help="Convert the embedded SmolLM2 model into a cached HF folder."
    )
    add_settings_arguments(prepare)
    return parser


def serve(settings: ServerSettings) -> None:
    import uvicorn
    from ttalign.server.app import create_app
    from ttalign.server.shutdown import FLUSH_SECONDS, DrainingServer

    try:
        app = create_app(settings)  # reads the API key, reward config and prompt files
    except ValueError as exc:  # ApiKeyConfigError, RewardConfigError, prompt overrides
        sys.exit(f"ttalign: {exc}")
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=FLUSH_SECONDS,
    )
    server = DrainingServer(
        config, drain=lambda: app.state.admission.drain(settings.shutdown_grace_seconds)
    )
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def describe_invalid_settings(error: ValidationError) -> str:
    """One line per problem, without the offending values (they may be secrets)."""
    lines = [
        f"  {'.'.join(str(part) for part in e['loc']) or 'settings'}: {e['msg']}"
        for e in error.errors(include_input=False, include_url=False)
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        sys.exit(f"ttalign: invalid settings:\n{describe_invalid_settings(exc)}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "prepare-model":
        from ttalign.server.engine_factory import resolve_model_path

        print(resolve_model_path(settings))
    else:
        serve(settings)


if __name__ == "__main__":
    main()
