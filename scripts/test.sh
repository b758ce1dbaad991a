#!/usr/bin/env bash
# Set up .venv with the test extras, make sure RabbitMQ and PostgreSQL run,
# then run the whole suite (unit and functional). Extra args go to pytest.
set -euo pipefail
# .venv-nova (the nova peer of the OpenStack tests) is set up at the same
# time as .venv: two independent installs, each mostly one core's work.
"$(dirname "$0")/nova-peer-venv.sh" &
nova_venv=$!
source "$(dirname "$0")/venv.sh" test
cd "$ROOT"
if ! wait "$nova_venv"; then
  echo "setting up the nova peer's virtualenv failed" >&2
  exit 1
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 5672; then
  echo "RabbitMQ is down: starting it"
  rabbitmq-server -detached || true
  for _ in $(seq 1 60); do port_open 5672 && break; sleep 1; done
  rabbitmqctl -q await_startup || true
fi
if ! port_open 5432; then
  echo "PostgreSQL is down: starting it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 30); do port_open 5432 && break; sleep 1; done
fi
# Not fatal here: the functional tests fail (never skip) with a clear
# message when a service is still missing.

set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $rc
