#!/usr/bin/env bash
# Create or update .venv-nova, the separate virtualenv of the nova peer that
# the OpenStack functional tests run (tests/openstack_peer/serve.py), from
# the lock file requirements/nova-peer.txt. Idempotent: a stamp file newer
# than the lock file means there is nothing to do. Called by scripts/test.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NOVA_VENV=${CELLAGENT_NOVA_VENV:-$ROOT/.venv-nova}
PYTHON=${PYTHON:-python3}
lock="$ROOT/requirements/nova-peer.txt"
stamp="$NOVA_VENV/.nova-peer-installed"
if [ ! -x "$NOVA_VENV/bin/python" ]; then
  echo "creating virtualenv $NOVA_VENV (the nova peer of the functional tests)"
  "$PYTHON" -m venv "$NOVA_VENV"
fi
if [ ! -f "$stamp" ] || [ "$lock" -nt "$stamp" ]; then
  echo "installing the nova peer's pinned packages into $NOVA_VENV (about a minute)"
  # pip's own log goes to a file: this machine's pip config prints a warning
  # line per package that would drown the test output.
  if ! "$NOVA_VENV/bin/python" -m pip install --disable-pip-version-check -r "$lock" \
      > "$NOVA_VENV/install.log" 2>&1; then
    grep -v '^WARNING: Location' "$NOVA_VENV/install.log" | tail -n 40 >&2
    echo "installing $lock into $NOVA_VENV failed (log: $NOVA_VENV/install.log)" >&2
    exit 1
  fi
  # nova's api-paste.ini comes as data files under the venv's etc/.
  test -f "$NOVA_VENV/etc/nova/api-paste.ini"
  touch "$stamp"
fi
