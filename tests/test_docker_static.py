"""docker/ checked without Docker: the fleet's compose file, the Dockerfiles, the replicas'
entry point and the gateway's reward file.

No Docker engine runs here and base images cannot be pulled, so everything is validated by
parsing: compose.yaml with PyYAML (defaults interpolated as compose does), the Dockerfiles
instruction by instruction, the replicas' command lines by running the entry-point script in
dry-run mode and parsing its output with vLLM's own server argument parser, ``TTALIGN_*``
variables against :class:`ServerSettings`, and the reward file with the server's reader.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from ttalign.engine.adaptive_replicas import HEADS_CONFIG_KEY, PROCESSOR_FQCN, ROUTES_MIDDLEWARE
from ttalign.reward_clients.config import VllmPoolingConfig, read_reward_config
from ttalign.server.model_prep import embedded_model_dir
from ttalign.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENTRYPOINT_SCRIPT = DOCKER / "vllm-entrypoint.sh"
PROFILES = ("cpu", "gpu")
VLLM_MODULE = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
#: Python of each base image (vllm/vllm-openai ships 3.12), which pyproject must allow.
IMAGE_PYTHON = {"Dockerfile.cpu": "3.11", "Dockerfile.gpu": "3.12"}
BASE_IMAGES = {"Dockerfile.cpu": "python:3.11-", "Dockerfile.gpu": "vllm/vllm-openai:"}

# --- compose: loading ------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?)-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation of ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$$``."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, colon, default = match.groups()
        if name in env and (env[name] or not colon):
            return env[name]
        return default or ""

    return _VARIABLE.sub(substitute, value)


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml as compose sees it: anchors merged, variables interpolated from ``env``."""
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env or {})


def services(profile: str, env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The services ``docker compose --profile PROFILE up`` starts."""
    return {
        name: spec
        for name, spec in load_compose(env)["services"].items()
        if profile in spec.get("profiles", [])
    }


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def host_names(name: str, service: Mapping[str, Any]) -> set[str]:
    """The names a service answers to on the compose network: its own and its aliases."""
    names = {name}
    for network in (service.get("networks") or {}).values():
        names.update((network or {}).get("aliases", []))
    return names


def is_replica(service: Mapping[str, Any]) -> bool:
    return any("vllm-entrypoint.sh" in part for part in service.get("entrypoint") or [])


def role(name: str) -> str:
    """policy, reward or gateway, from the service name (policy-0-cpu -> policy)."""
    return name.split("-")[0]


def listen_port(service: Mapping[str, Any]) -> int:
    env = environment(service)
    return int(env.get("REPLICA_PORT") or env.get("TTALIGN_PORT") or 8000)


@dataclass(frozen=True)
class Mount:
    source: str
    target: str


def bind_mounts(service: Mapping[str, Any]) -> list[Mount]:
    """Short-syntax bind mounts (``./x:/y[:ro]``, ``/x:/y``); named volumes are left out."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(Mount(source, target))
    return mounts


def host_path(source: str) -> Path:
    """A bind mount's source on the host: relative paths are relative to docker/."""
    return (DOCKER / source).resolve()


def by_host(profile_services: Mapping[str, dict[str, Any]], host: str) -> str:
    matches = [n for n, s in profile_services.items() if host in host_names(n, s)]
    assert len(matches) == 1, f"host {host!r} names {matches or 'no service'}"
    return matches[0]


def gateway(profile: str, env: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    (name,) = [n for n in services(profile, env) if role(n) == "gateway"]
    return name, services(profile, env)[name]


def replica_services() -> list[tuple[str, str]]:
    return [
        (profile, name)
        for profile in PROFILES
        for name, service in services(profile).items()
        if is_replica(service)
    ]


# --- Dockerfiles: parsing ------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path}: dangling continuation"
    return instructions


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            words = shlex.split(instruction.args)
            if all("=" in w for w in words):
                env.update(w.split("=", 1) for w in words)
            else:  # legacy form: ENV KEY value
                env[words[0]] = " ".join(words[1:])
    return env


def exec_form(instruction: Instruction) -> list[str]:
    assert instruction.args.startswith("["), f"{instruction} is not in exec form"
    return json.loads(instruction.args)


def copy_instructions(instructions: list[Instruction]) -> Iterator[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context."""
    for instruction in instructions:
        if instruction.keyword in ("COPY", "ADD"):
            words = shlex.split(instruction.args)
            if any(w.startswith("--from=") for w in words):
                continue
            paths = [w for w in words if not w.startswith("--")]
            yield paths[:-1], paths[-1]


def base_image(instructions: list[Instruction]) -> str:
    args: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            args[name.strip()] = default.strip()
        elif instruction.keyword == "FROM":
            image = instruction.args.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), image)
    pytest.fail("no FROM")


# --- the entry-point script --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpuinfo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """/proc/cpuinfo stand-ins: a CPU without native bfloat16 and one with it."""
    folder = tmp_path_factory.mktemp("cpuinfo")
    files = {
        "no_bf16": "processor\t: 0\nflags\t\t: fpu sse4_2 avx2 avx512f avx512bw\n",
        "bf16": "processor\t: 0\nflags\t\t: fpu sse4_2 avx2 avx512f avx512_bf16 amx_tile\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    return {name: folder / name for name in files}


@functools.cache
def python3_shim() -> Path:
    """A folder whose ``python3`` runs the test's own interpreter."""
    folder = Path(tempfile.mkdtemp(prefix="python3-shim-"))
    shim = folder / "python3"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    return folder


def run_entrypoint(
    env: Mapping[str, str], *args: str, cpuinfo: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # python3 is this interpreter, which has ttalign as the image's has (the replica flags).
    full_env = {
        "PATH": f"{python3_shim()}{os.pathsep}{os.environ['PATH']}",
        **env,
        "REPLICA_DRY_RUN": "1",
    }
    if cpuinfo is not None:
        full_env["REPLICA_CPUINFO"] = str(cpuinfo)
    return subprocess.run(
        ["bash", str(ENTRYPOINT_SCRIPT), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def command_line(env: Mapping[str, str], *args: str, cpuinfo: Path | None = None) -> list[str]:
    """The command the entry point would exec, as an argument list."""
    result = run_entrypoint(env, *args, cpuinfo=cpuinfo)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


@pytest.fixture(scope="module")
def vllm_parser() -> Any:
    """vLLM's OpenAI server argument parser, built in-process (no server starts)."""
    pytest.importorskip("vllm")
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # vLLM releases before the launchers package
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    return make_arg_parser(FlexibleArgumentParser(prog="vllm-openai-server"))


def parse_vllm(parser: Any, argv: list[str]) -> Any:
    """The parsed arguments of an entry-point command line; fails on any unknown flag."""
    assert argv[: len(VLLM_MODULE)] == VLLM_MODULE, argv
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv[len(VLLM_MODULE) :])
    except SystemExit:
        pytest.fail(f"vLLM refuses {shlex.join(argv)}:\n{errors.getvalue()}")


def test_the_entry_point_maps_every_variable_to_its_flag(cpuinfo: dict[str, Path]) -> None:
    env = {
        "REPLICA_MODEL": "/models/my model",
        "REPLICA_SERVED_MODEL_NAME": "policy",
        "REPLICA_HOST": "127.0.0.1",
        "REPLICA_PORT": "8101",
        "REPLICA_RUNNER": "generate",
        "REPLICA_DTYPE": "cpu-auto",
        "REPLICA_MAX_MODEL_LEN": "2048",
        "REPLICA_MAX_NUM_SEQS": "32",
        "REPLICA_KV_CACHE_MEMORY_BYTES": "536870912",
        "REPLICA_TENSOR_PARALLEL_SIZE": "1",
        "REPLICA_SEED": "7",
        "REPLICA_ENFORCE_EAGER": "yes",
        "REPLICA_CHUNKED_PREFILL": "false",
        "REPLICA_PREFIX_CACHING": "True",
        "REPLICA_EXTRA_ARGS": "--max-logprobs 20  --disable-log-stats",
    }
    argv = command_line(env, "--api-key", "two words", cpuinfo=cpuinfo["no_bf16"])
    assert argv == [
        *VLLM_MODULE,
        "--model", "/models/my model", "--host", "127.0.0.1", "--port", "8101",
        "--served-model-name", "policy", "--runner", "generate", "--dtype", "float32",
        "--max-model-len", "2048", "--max-num-seqs", "32",
        "--kv-cache-memory-bytes", "536870912", "--tensor-parallel-size", "1", "--seed", "7",
        "--enforce-eager", "--no-enable-chunked-prefill", "--enable-prefix-caching",
        "--max-logprobs", "20", "--disable-log-stats", "--api-key", "two words",
    ]  # fmt: skip


def test_unset_variables_add_no_flags() -> None:
    argv = command_line({"REPLICA_MODEL": "m", "REPLICA_ENFORCE_EAGER": "", "REPLICA_SEED": ""})
    assert argv == [*VLLM_MODULE, "--model", "m", "--host", "0.0.0.0", "--port", "8000"]


@pytest.mark.parametrize(
    ("flags", "dtype"), [("no_bf16", "float32"), ("bf16", "auto")], ids=["emulated", "native"]
)
def test_cpu_auto_dtype_is_float32_unless_the_cpu_has_native_bf16(
    cpuinfo: dict[str, Path], flags: str, dtype: str
) -> None:
    argv = command_line({"REPLICA_MODEL": "m", "REPLICA_DTYPE": "cpu-auto"}, cpuinfo=cpuinfo[flags])
    assert argv[argv.index("--dtype") + 1] == dtype
    gpu = command_line({"REPLICA_MODEL": "m", "REPLICA_DTYPE": "bfloat16"}, cpuinfo=cpuinfo[flags])
    assert gpu[gpu.index("--dtype") + 1] == "bfloat16"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "REPLICA_MODEL is not set"),
        (
            {
                "REPLICA_MODEL": "m",
                "REPLICA_KV_CACHE_MEMORY_BYTES": "1",
                "REPLICA_GPU_MEMORY_UTILIZATION": "0.9",
            },
            "not both",
        ),
        ({"REPLICA_MODEL": "m", "REPLICA_ENFORCE_EAGER": "maybe"}, "REPLICA_ENFORCE_EAGER"),
    ],
    ids=["no-model", "two-cache-sizes", "bad-boolean"],
)
def test_the_entry_point_refuses_a_bad_configuration(env: dict[str, str], message: str) -> None:
    result = run_entrypoint(env)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_the_vllm_parser_check_has_teeth(vllm_parser: Any) -> None:
    with pytest.raises(pytest.fail.Exception, match="no-such-flag"):
        parse_vllm(vllm_parser, [*VLLM_MODULE, "--model", "m", "--no-such-flag", "1"])


# --- compose: shape ----------------------------------------------------------------------------


def test_every_service_belongs_to_exactly_one_profile() -> None:
    for name, service in load_compose()["services"].items():
        assert len(service.get("profiles", [])) == 1, name
        assert service["profiles"][0] in PROFILES, name


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_runs_two_policies_a_reward_server_and_the_gateway(profile: str) -> None:
    fleet = services(profile)
    roles = sorted(role(name) for name in fleet)
    assert roles == ["gateway", "policy", "policy", "reward"]
    names = set().union(*(host_names(n, s) for n, s in fleet.items()))
    assert {"policy-0", "policy-1", "reward", "gateway"} <= names
    assert all(is_replica(s) for n, s in fleet.items() if role(n) != "gateway")
    assert not is_replica(fleet[gateway(profile)[0]])


@pytest.mark.parametrize("profile", PROFILES)
def test_every_service_is_health_checked_on_its_own_port(profile: str) -> None:
    for name, service in services(profile).items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] == "CMD", name
        urls = re.findall(r"https?://[^'\" ]+", " ".join(check["test"][1:]))
        assert urls == [f"http://127.0.0.1:{listen_port(service)}/health"], name
        assert {"interval", "timeout", "retries", "start_period"} <= check.keys(), name


def published(service: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) of each published port."""
    pairs = []
    for port in service.get("ports", []):
        parts = str(port).split(":")
        assert len(parts) >= 2, f"{port!r} publishes no fixed host port"
        pairs.append((int(parts[-2]), int(parts[-1])))
    return pairs


@pytest.mark.parametrize("profile", PROFILES)
def test_ports_publish_each_service_where_it_listens(profile: str) -> None:
    fleet = services(profile)
    host_ports = []
    for name, service in fleet.items():
        pairs = published(service)
        assert pairs, f"{name} publishes no port"
        assert all(container == listen_port(service) for _, container in pairs), name
        host_ports += [host for host, _ in pairs]
    assert len(host_ports) == len(set(host_ports)), host_ports
    assert published(fleet[gateway(profile)[0]]) == [(8000, 8000)]
    policy_ports = sorted(
        p for n, s in fleet.items() if role(n) == "policy" for p, _ in published(s)
    )
    assert policy_ports == [8101, 8102]  # what the docs' by-hand fleet uses


@pytest.mark.parametrize("profile", PROFILES)
def test_the_gateway_starts_after_the_whole_fleet_is_healthy(profile: str) -> None:
    name, service = gateway(profile)
    fleet = set(services(profile)) - {name}
    depends = service.get("depends_on") or {}
    assert set(depends) == fleet
    assert all(depends[n]["condition"] == "service_healthy" for n in fleet)


@pytest.mark.parametrize("profile", PROFILES)
def test_engine_urls_name_every_policy_replica_on_its_container_port(profile: str) -> None:
    fleet = services(profile)
    env = environment(gateway(profile)[1])
    assert env["TTALIGN_ENGINE"] == "remote"
    named = []
    for url in env["TTALIGN_ENGINE_URLS"].split(","):
        parts = urlsplit(url.strip())
        assert parts.scheme == "http" and parts.path in ("", "/"), url
        target = by_host(fleet, parts.hostname or "")
        assert role(target) == "policy", url
        assert parts.port == listen_port(fleet[target]), url
        named.append(target)
    assert sorted(named) == sorted(n for n in fleet if role(n) == "policy")


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("env", [{}, {"POLICY_SERVED_MODEL_NAME": "qwen"}], ids=["defaults", "set"])
def test_the_gateway_renders_for_the_model_the_replicas_serve(
    profile: str, env: dict[str, str]
) -> None:
    fleet = services(profile, env)
    name, service = gateway(profile, env)
    gateway_env = environment(service)
    for policy, replica in fleet.items():
        if role(policy) != "policy":
            continue
        replica_env = environment(replica)
        assert gateway_env["TTALIGN_MODEL"] == replica_env["REPLICA_MODEL"], policy
        assert gateway_env["TTALIGN_SERVED_MODEL_NAME"] == replica_env["REPLICA_SERVED_MODEL_NAME"]
        assert gateway_env["TTALIGN_MAX_MODEL_LEN"] == replica_env["REPLICA_MAX_MODEL_LEN"]
        # A mounted model folder must be the same host folder in both containers.
        model = gateway_env["TTALIGN_MODEL"]
        sources = {
            svc: [m.source for m in bind_mounts(s) if m.target == model]
            for svc, s in ((name, service), (policy, replica))
        }
        assert sources[name] == sources[policy], sources


def test_cpu_policies_serve_the_model_baked_into_the_cpu_image() -> None:
    cache_dir = dockerfile_env(parse_dockerfile(DOCKER / "Dockerfile.cpu"))["TTALIGN_CACHE_DIR"]
    baked = str(embedded_model_dir(Path(cache_dir)))
    for name, service in services("cpu").items():
        if role(name) == "policy":
            assert environment(service)["REPLICA_MODEL"] == baked
            assert service["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert environment(gateway("cpu")[1])["TTALIGN_MODEL"] == baked


# --- compose: settings -------------------------------------------------------------------------


def ttalign_variables() -> dict[str, set[str]]:
    """Every TTALIGN_* variable set anywhere in docker/, with where it is set."""
    found: dict[str, set[str]] = {}
    for name, service in load_compose()["services"].items():
        for key in environment(service):
            found.setdefault(key, set()).add(f"compose.yaml:{name}")
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        for key in dockerfile_env(parse_dockerfile(DOCKER / dockerfile)):
            found.setdefault(key, set()).add(dockerfile)
    return {key: where for key, where in found.items() if key.startswith("TTALIGN_")}


def test_every_ttalign_variable_is_a_server_setting() -> None:
    variables = ttalign_variables()
    assert "TTALIGN_ENGINE_URLS" in variables  # the scan sees the gateway's environment
    unknown = {
        key: sorted(where)
        for key, where in variables.items()
        if key.removeprefix("TTALIGN_").lower() not in ServerSettings.model_fields
    }
    assert not unknown, f"not ServerSettings fields: {unknown}"


@pytest.mark.parametrize("profile", PROFILES)
def test_the_gateway_environment_is_valid_server_settings(
    profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith("TTALIGN_"):
            monkeypatch.delenv(key)
    env = environment(gateway(profile)[1])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = ServerSettings()
    fields = settings.model_dump()
    assert fields.get("engine") == "remote"
    assert fields.get("engine_routing") == "consistent_hash"
    assert fields.get("session_header") == "X-Session-ID"
    assert str(settings.reward_config) == env["TTALIGN_REWARD_CONFIG"]
    assert settings.host == "0.0.0.0"
    # The browser playground is on by default, and off in the fleet.
    assert ServerSettings.model_fields["playground"].default is True
    assert settings.playground is False


@pytest.mark.parametrize("profile", PROFILES)
def test_the_mounted_reward_config_points_at_the_reward_server(profile: str) -> None:
    fleet = services(profile)
    _, service = gateway(profile)
    config_path = environment(service)["TTALIGN_REWARD_CONFIG"]
    (mount,) = [m for m in bind_mounts(service) if m.target == config_path]
    config = read_reward_config(host_path(mount.source))
    pooling = {n: c for n, c in config.clients.items() if isinstance(c, VllmPoolingConfig)}
    assert pooling, "no vllm_pooling client"
    assert config.default in pooling
    for client in pooling.values():
        urls = list(getattr(client, "urls", None) or []) + [u for u in [client.url] if u]
        assert urls
        for url in urls:
            parts = urlsplit(url)
            target = by_host(fleet, parts.hostname or "")
            reward_env = environment(fleet[target])
            assert role(target) == "reward"
            assert parts.port == listen_port(fleet[target])
            assert reward_env["REPLICA_RUNNER"] == "pooling"
            # vLLM answers 404 to a model name it does not serve.
            assert client.model == reward_env["REPLICA_SERVED_MODEL_NAME"]


# --- compose: replicas -------------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "name"), replica_services())
def test_replica_command_lines_are_valid_vllm_server_arguments(
    vllm_parser: Any, cpuinfo: dict[str, Path], profile: str, name: str
) -> None:
    service = services(profile)[name]
    env = environment(service)
    argv = command_line(env, *(service.get("command") or []), cpuinfo=cpuinfo["no_bf16"])
    args = parse_vllm(vllm_parser, argv)
    assert args.model == env["REPLICA_MODEL"]
    assert args.host == "0.0.0.0"
    assert args.port == listen_port(service)
    assert args.served_model_name == [env["REPLICA_SERVED_MODEL_NAME"]]
    assert args.runner == ("pooling" if role(name) == "reward" else "auto")
    if profile == "cpu":
        assert args.kv_cache_memory_bytes and args.kv_cache_memory_bytes >= 1 << 28
        assert "--gpu-memory-utilization" not in argv
        assert args.enable_chunked_prefill is False
        assert args.enforce_eager is True
        assert args.dtype == "float32"
    else:
        assert args.kv_cache_memory_bytes is None
        assert "--gpu-memory-utilization" in argv
    # CPU policy replicas run ttalign's processor and routes (the gateway then serves
    # adaptive_temperature); the stock GPU image has no ttalign to load.
    adaptive = profile == "cpu" and role(name) == "policy"
    assert (args.logits_processors == [PROCESSOR_FQCN]) is adaptive
    assert (args.middleware == [ROUTES_MIDDLEWARE]) is adaptive
    if adaptive:
        heads = args.additional_config[HEADS_CONFIG_KEY]
        assert sorted(heads) == ["smollm2-example", "smollm2-token"]


@pytest.mark.parametrize("profile", PROFILES)
def test_only_gpu_replicas_reserve_a_gpu_each_of_their_own(profile: str) -> None:
    fleet = services(profile)
    devices: dict[str, list[str]] = {}
    for name, service in fleet.items():
        reserved = (
            service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        )
        if profile == "cpu" or role(name) == "gateway":
            assert not reserved, f"{name} reserves a GPU"
            continue
        (device,) = reserved
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        devices[name] = device["device_ids"]
        assert service["image"].startswith("vllm/vllm-openai:"), name
    if profile == "gpu":
        assert len(devices) == 3
        all_ids = [i for ids in devices.values() for i in ids]
        assert len(all_ids) == len(set(all_ids)), devices


def entrypoint_script(name: str, service: Mapping[str, Any]) -> Path | None:
    """The host file of a service's entry-point script: bind-mounted or copied into its image."""
    scripts = [p for p in service.get("entrypoint") or [] if p.endswith(".sh")]
    if not scripts:
        return None
    (script,) = scripts
    for mount in bind_mounts(service):
        if mount.target == script:
            return host_path(mount.source)
    assert "build" in service, f"{name}: {script} is neither mounted nor built into the image"
    dockerfile = parse_dockerfile(ROOT / service["build"]["dockerfile"])
    copies = {dest: sources for sources, dest in copy_instructions(dockerfile)}
    assert script in copies, f"{name}: the image does not copy {script}"
    (source,) = copies[script]
    return ROOT / source


def check_script(path: Path) -> None:
    assert path.is_file(), path
    assert os.access(path, os.X_OK), f"{path} is not executable"
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_entry_point_scripts_exist_are_executable_and_parse() -> None:
    checked = set()
    for profile in PROFILES:
        for name, service in services(profile).items():
            script = entrypoint_script(name, service)
            if script is not None:
                check_script(script)
                checked.add(script)
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        for instruction in parse_dockerfile(DOCKER / dockerfile):
            if instruction.keyword in ("ENTRYPOINT", "CMD"):
                for part in exec_form(instruction):
                    if part.endswith(".sh"):
                        check_script(ROOT / part)
                        checked.add(ROOT / part)
    assert ENTRYPOINT_SCRIPT.resolve() in {p.resolve() for p in checked}


def test_compose_bind_mounts_of_repository_files_exist() -> None:
    for name, service in load_compose()["services"].items():
        for mount in bind_mounts(service):
            if PurePosixPath(mount.source).suffix:  # files; model folders are the user's
                assert host_path(mount.source).is_file(), f"{name}: {mount.source}"


def test_compose_builds_from_the_repository_with_existing_dockerfiles() -> None:
    for name, service in load_compose()["services"].items():
        if "build" not in service:
            continue
        assert (DOCKER / service["build"]["context"]).resolve() == ROOT, name
        dockerfile = ROOT / service["build"]["dockerfile"]
        assert dockerfile.is_file(), name
        declared = {
            i.args.split("=")[0].strip() for i in parse_dockerfile(dockerfile) if i.keyword == "ARG"
        }
        assert set(service["build"].get("args", {})) <= declared, name


def test_compose_file_follows_the_compose_specification() -> None:
    compose_spec = pytest.importorskip("compose_spec")

    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    # The parser knows no YAML merge keys; give it the merged, interpolated file.
    text = yaml.dump(load_compose(), Dumper=NoAliases, sort_keys=False)
    compose_spec.PyCompose.from_yaml(text)


# --- Dockerfiles -------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", sorted(BASE_IMAGES))
def test_dockerfile_base_image_and_python(dockerfile: str) -> None:
    instructions = parse_dockerfile(DOCKER / dockerfile)
    assert base_image(instructions).startswith(BASE_IMAGES[dockerfile])
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert IMAGE_PYTHON[dockerfile] in SpecifierSet(requires), (
        f"{dockerfile}'s Python {IMAGE_PYTHON[dockerfile]} is outside requires-python {requires}"
    )


@pytest.mark.parametrize("dockerfile", sorted(BASE_IMAGES))
def test_dockerfile_copies_only_what_exists(dockerfile: str) -> None:
    copies = list(copy_instructions(parse_dockerfile(DOCKER / dockerfile)))
    assert copies
    for sources, destination in copies:
        for source in sources:
            assert list(ROOT.glob(source)), f"{dockerfile}: COPY {source} {destination}"
    destinations = {dest for _, dest in copies}
    assert "/usr/local/bin/vllm-entrypoint.sh" in destinations


@pytest.mark.parametrize("dockerfile", sorted(BASE_IMAGES))
def test_dockerfile_serves_ttalign_on_all_interfaces(dockerfile: str) -> None:
    instructions = parse_dockerfile(DOCKER / dockerfile)
    env = dockerfile_env(instructions)
    assert env["TTALIGN_HOST"] == "0.0.0.0"
    assert [i.args for i in instructions if i.keyword == "EXPOSE"] == [env["TTALIGN_PORT"]]
    starts = [exec_form(i) for i in instructions if i.keyword in ("ENTRYPOINT", "CMD")]
    assert starts[-1][:2] == ["ttalign", "serve"]


def test_the_cpu_image_prepares_the_embedded_model_at_build_time() -> None:
    instructions = parse_dockerfile(DOCKER / "Dockerfile.cpu")
    keywords = [(i.keyword, i.args) for i in instructions]
    cache_env = next(n for n, (k, a) in enumerate(keywords) if k == "ENV" and "CACHE_DIR" in a)
    prepare = next(n for n, (k, a) in enumerate(keywords) if a == "ttalign prepare-model")
    assert keywords[prepare][0] == "RUN" and prepare > cache_env


# --- allocator -------------------------------------------------------------------------------


def test_the_cpu_image_preloads_the_tcmalloc_it_installs() -> None:
    instructions = parse_dockerfile(DOCKER / "Dockerfile.cpu")
    preload = dockerfile_env(instructions)["LD_PRELOAD"]
    assert preload == "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    installs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "libtcmalloc-minimal4" in installs  # Debian's package of that file


def preload_after_run_serve(tmp_path: Path, ldconfig_output: str, **env: str) -> tuple[str, str]:
    """LD_PRELOAD as ``./run serve`` leaves it, with ``ldconfig -p`` printing the given text."""
    (tmp_path / "ldconfig").write_text(f"#!/bin/sh\nprintf '%s\\n' '{ldconfig_output}'\n")
    (tmp_path / "ldconfig").chmod(0o755)
    # An apt-get that cannot install anything: the missing-library case must not touch the
    # machine, and then serves on glibc's allocator.
    (tmp_path / "apt-get").write_text("#!/bin/sh\nexit 100\n")
    (tmp_path / "apt-get").chmod(0o755)
    functions = "\n".join(
        subprocess.run(
            ["sed", "-n", f"/^{name}() {{/,/^}}/p", str(ROOT / "run")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for name in ("apt_install", "tcmalloc_library", "preload_tcmalloc")
    )
    script = f'{functions}\npreload_tcmalloc\nprintf "%s" "${{LD_PRELOAD:-}}"'
    result = subprocess.run(
        ["bash", "-c", script],
        env={"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", **env},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout, result.stderr


def test_run_serve_preloads_tcmalloc_when_the_system_has_it(tmp_path: Path) -> None:
    library = "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    line = f"\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => {library}"
    preload, _ = preload_after_run_serve(tmp_path, line)
    assert preload == library
    preload, _ = preload_after_run_serve(tmp_path, line, TTALIGN_ALLOCATOR="default")
    assert preload == ""
    preload, warning = preload_after_run_serve(tmp_path, "\tlibc.so.6 (libc6,x86-64) => /x")
    assert preload == "" and "apt-get install libtcmalloc-minimal4" in warning
