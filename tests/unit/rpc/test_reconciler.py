"""Reconciliation: orphans, vanished instances and drift, seen by the parent."""

import pytest

from cellagent.objects import BuildRequest, Flavor, InstanceRef, InstanceState
from tests.unit.helpers import wait_for

FAST = {"spawn_delay": 0.0, "stop_delay": 0.0, "delete_delay": 0.0}


@pytest.fixture
def cell(make_cell):
    c = make_cell(fake_opts=FAST, backend_opts={"reconcile_interval": 0})
    c.agent.reconciler.orphan_grace = 0
    return c


def _launch_behind_our_back(backend, uuid):
    return backend.spawn(BuildRequest(instance_uuid=uuid, name="orphan",
                                      flavor=Flavor("m1.tiny", 512, 1, 1),
                                      image={"id": "cirros"}, launch_token=uuid + "-1"))


def test_orphan_is_terminated_after_the_grace(cell):
    uuid = "0000aaaa-0000-4000-8000-000000000001"
    _launch_behind_our_back(cell.agent.backend, uuid)
    cell.agent.reconciler.orphan_grace = 3600
    assert cell.agent.reconciler.run_once()["orphans"] == 1
    assert len(cell.agent.backend.list_instances()) == 1       # still within the grace
    cell.agent.reconciler.orphan_grace = 0
    assert cell.agent.reconciler.run_once()["terminated"] == 1
    assert cell.agent.backend.list_instances() == []
    assert not cell.parent.received(instance_uuid=uuid)


def test_orphan_is_adopted_when_asked(cell):
    uuid = "0000aaaa-0000-4000-8000-000000000002"
    _launch_behind_our_back(cell.agent.backend, uuid)
    cell.agent.reconciler.orphan_action = "adopt"
    assert cell.agent.reconciler.run_once()["adopted"] == 1
    cell.wait_state(uuid, vm_state="active", task_state=None)
    assert cell.parent.row(uuid)["access_ip_v4"]
    assert cell.agent.store.get_instance(uuid).backend_id
    assert cell.agent.reconciler.run_once()["orphans"] == 0


def test_vanished_instance_is_destroyed_at_the_top(cell):
    [uuid] = cell.build(1)
    backend = cell.agent.backend
    backend.destroy(InstanceRef(uuid, cell.agent.store.get_instance(uuid).backend_id, ""))
    backend.poll([])                                          # let the delete settle
    assert cell.agent.reconciler.run_once()["vanished"] == 1
    wait_for(lambda: cell.parent.received("instance_destroy_at_top", uuid))
    assert cell.agent.store.get_instance(uuid).deleted


def test_vanished_instance_can_be_set_to_error_instead(cell):
    [uuid] = cell.build(1)
    cell.agent.reconciler.vanished_action = "error"
    backend = cell.agent.backend
    backend.destroy(InstanceRef(uuid, cell.agent.store.get_instance(uuid).backend_id, ""))
    backend.poll([])
    assert cell.agent.reconciler.run_once()["vanished"] == 1
    cell.wait_state(uuid, vm_state="error")
    assert cell.parent.received("instance_fault_create_at_top", uuid)
    assert cell.agent.reconciler.run_once()["vanished"] == 0    # reported once


def test_drift_is_reported_up(cell):
    uuids = cell.build(3)
    backend = cell.agent.backend
    for uuid in uuids[:2]:
        backend.power_off(InstanceRef(uuid, cell.agent.store.get_instance(uuid).backend_id, ""))
    backend.poll([])
    assert cell.agent.reconciler.run_once()["drifted"] == 2
    for uuid in uuids[:2]:
        cell.wait_state(uuid, vm_state="stopped", task_state=None)
        assert cell.agent.store.get_instance(uuid).state == InstanceState.STOPPED
    assert cell.parent.row(uuids[2])["vm_state"] == "active"
    assert cell.agent.reconciler.run_once()["drifted"] == 0
