# Sourced by scripts/demo.sh and scripts/test.sh: create .venv once and
# install cellagent (and the given extras) at the pinned versions.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CELLAGENT_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
extras=${1:-}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.cellagent-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] \
    || [ "$ROOT/requirements/constraints.txt" -nt "$stamp" ]; then
  echo "installing cellagent${extras:+[$extras]} into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -c "$ROOT/requirements/constraints.txt" -e "$ROOT${extras:+[$extras]}"
  touch "$stamp"
fi
