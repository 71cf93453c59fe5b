# Shared set-up for scripts/*: creates .venv when missing and installs aiomemo
# with the extras the scripts need. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
fi
EXTRAS="${AIOMEMO_EXTRAS:-test,redis,parsl}"
STAMP="$VENV/.aiomemo-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "installing aiomemo[$EXTRAS] into $VENV" >&2
    "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]" >&2
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
