"""The agent with its state on the machine's real PostgreSQL."""

import os
import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa

from cellagent.state import sql
from tests.functional.conftest import wait_for
from tests.functional.test_lifecycle import action, build_message
from tests.functional.test_store_postgresql import pg_server  # noqa: F401 - fixture

MANAGE = os.path.join(os.path.dirname(sys.executable), "cellagent-manage")


@pytest.fixture
def pg_database(pg_server):  # noqa: F811 - the imported fixture
    name = "cellagent_agent_%s" % uuid.uuid4().hex[:12]
    with pg_server.connect() as conn:
        conn.execute(sa.text('CREATE DATABASE "%s"' % name))
    yield pg_server.url.set(database=name).render_as_string(hide_password=False)
    with pg_server.connect() as conn:
        conn.execute(sa.text('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name))


def manage(agent, *args):
    return subprocess.run([MANAGE, "--config-file", str(agent.conf_path), *args],
                          capture_output=True, text=True, timeout=60)


def test_agent_keeps_its_journal_and_instances_in_postgresql(parent, agent_factory,
                                                             pg_database):
    agent = agent_factory(db_url=pg_database)
    synced = manage(agent, "db", "sync")
    assert synced.returncode == 0 and "-> 1" in synced.stdout, synced.stderr
    agent.start()
    uuids = [str(uuid.uuid4()) for _ in range(4)]
    parent.cast(build_message(uuids))
    wait_for(lambda: all(parent.view(u).get("vm_state") == "active" for u in uuids), 30,
             what="active")
    parent.cast(action("terminate_instance", uuids[0], delete_type="delete"))
    wait_for(lambda: uuids[0] in parent.destroyed(), 10, what="destroyed")
    assert agent.terminate() == 0

    store = sql.SqlStore(pg_database)
    try:
        live = {r.instance_uuid for r in store.list_instances()}
        assert live == set(uuids[1:])
        assert store.get_instance(uuids[0]).deleted
        assert all(r.backend_id.startswith("fake-") and r.addresses for r in
                   store.list_instances())
        methods = [e.method for e in store.list_requests()]
        assert sorted(methods) == ["build_instances", "terminate_instance"]
        assert not store.unfinished()
    finally:
        store.close()
    listed = manage(agent, "journal", "list")
    assert listed.returncode == 0 and "terminate_instance" in listed.stdout
