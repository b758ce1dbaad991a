"""Pause, suspend, resize, rebuild and snapshot through a child cell.

The parent sends the stock Stein casts; the fake backend carries them out;
the checks are on what the parent sees: the task_state sequence, the final
vm_state and power_state, the flavor after a resize, faults.
"""

import dataclasses

import pytest

from cellagent.objects import InstanceState
from cellagent.objects import PowerState
from tests.unit.helpers import instance_prim
from tests.unit.helpers import wait_for

FAST = {"spawn_delay": 0.05, "reboot_delay": 0.1, "stop_delay": 0.1, "start_delay": 0.1,
        "delete_delay": 0.05}
M1_MEDIUM = {"flavorid": "3", "name": "m1.medium"}


@pytest.fixture
def fast_cell(make_cell):
    return make_cell(fake_opts=FAST)


def test_pause_then_unpause(fast_cell):
    cell = fast_cell
    [uuid] = cell.build(1)
    cell.send("pause_instance", {"instance": instance_prim(uuid)})
    cell.wait_state(uuid, vm_state="paused", task_state=None)
    assert cell.parent.row(uuid)["power_state"] == PowerState.PAUSED
    assert "pausing" in cell.task_states(uuid)
    cell.send("unpause_instance", {"instance": instance_prim(uuid)})
    cell.wait_state(uuid, vm_state="active", task_state=None,
                    power_state=PowerState.RUNNING)


def test_suspend_then_resume(fast_cell):
    cell = fast_cell
    [uuid] = cell.build(1)
    cell.send("suspend_instance", {"instance": instance_prim(uuid)})
    cell.wait_state(uuid, vm_state="suspended", task_state=None,
                    power_state=PowerState.SUSPENDED)
    cell.send("resume_instance", {"instance": instance_prim(uuid)})
    cell.wait_state(uuid, vm_state="active", task_state=None)


def test_unpause_of_a_running_instance_is_refused_with_a_fault(fast_cell):
    cell = fast_cell
    [uuid] = cell.build(1)
    cell.send("unpause_instance", {"instance": instance_prim(uuid)})
    wait_for(lambda: cell.parent.received("instance_fault_create_at_top", uuid))
    cell.wait_state(uuid, vm_state="active", task_state=None)


def test_resize_then_confirm(fast_cell):
    cell = fast_cell
    [uuid] = cell.build(1)
    cell.send("resize_instance", {"instance": instance_prim(uuid), "flavor": M1_MEDIUM,
                                  "extra_instance_updates": {}, "clean_shutdown": True})
    cell.wait_state(uuid, vm_state="resized", task_state=None)
    row = cell.parent.row(uuid)
    assert (row["memory_mb"], row["vcpus"], row["root_gb"]) == (4096, 2, 40)
    assert cell.task_states(uuid)[-4:] == ["resize_prep", "resize_migrating",
                                           "resize_migrated", None]
    info = cell.agent.backend.get_info(cell.agent.manager._ref(
        cell.agent.store.get_instance(uuid)))
    assert info.state.value == "running"
    cell.send("confirm_resize", {"instance": instance_prim(uuid)})
    cell.wait_state(uuid, vm_state="active", task_state=None)
    assert cell.agent.store.get_instance(uuid).flavor["memory_mb"] == 4096


def test_resize_then_revert_restores_the_old_flavor(fast_cell):
    cell = fast_cell
    [uuid] = cell.build(1)
    cell.send("resize_instance", {"instance": instance_prim(uuid), "flavor": M1_MEDIUM,
                                  "extra_instance_updates": {}, "clean_shutdown": True})
    cell.wait_state(uuid, vm_state="resized", task_state=None)
    cell.send("revert_resize", {"instance": instance_prim(uuid)})
    cell.wait_state(uuid, vm_state="active", task_state=None, memory_mb=2048)
    assert "resize_reverting" in cell.task_states(uuid)


def test_resize_that_does_not_fit_keeps_the_instance_running(make_cell):
    cell = make_cell(fake_opts=dict(FAST, ram_mb=6000))
    [uuid] = cell.build(1)
    cell.send("resize_instance", {"instance": instance_prim(uuid),
                                  "flavor": {"flavorid": "5", "name": "m1.xlarge"},
                                  "extra_instance_updates": {}, "clean_shutdown": True})
    wait_for(lambda: cell.parent.received("instance_fault_create_at_top", uuid))
    cell.wait_state(uuid, vm_state="active", task_state=None)
    [fault] = cell.parent.received("instance_fault_create_at_top", uuid)
    assert "Resize to m1.xlarge failed" in fault.method_kwargs["instance_fault"]["message"]
    assert cell.agent.store.get_instance(uuid).flavor["memory_mb"] == 2048


def test_resize_the_provider_rolls_back_is_a_failed_resize(fast_cell):
    # Nova gives up on a resize after choosing a host and rolls it back:
    # its server shows the fault once, then runs on at its old size.
    cell = fast_cell
    [uuid] = cell.build(1)
    backend = cell.agent.backend

    def rolled_back(ref, flavor):
        info = backend.get_info(ref)
        return dataclasses.replace(info, state=InstanceState.ERROR,
                                   fault="Resize error: disk full on the destination")

    backend.resize = rolled_back
    msg = cell.send("resize_instance", {"instance": instance_prim(uuid), "flavor": M1_MEDIUM,
                                        "extra_instance_updates": {}, "clean_shutdown": True})
    wait_for(lambda: cell.parent.received("instance_fault_create_at_top", uuid))
    cell.wait_state(uuid, vm_state="active", task_state=None,
                    power_state=PowerState.RUNNING)
    [fault] = cell.parent.received("instance_fault_create_at_top", uuid)
    assert fault.method_kwargs["instance_fault"]["message"] == (
        "Resize to m1.medium failed: Resize error: disk full on the destination")
    # Never reported resized nor error; the record keeps the old flavor.
    assert "resized" not in [data.get("vm_state") for data, _ in cell.parent.updates(uuid)]
    assert "error" not in [data.get("vm_state") for data, _ in cell.parent.updates(uuid)]
    rec = cell.agent.store.get_instance(uuid)
    assert rec.flavor["memory_mb"] == 2048
    assert "cellagent_old_flavor" not in rec.instance
    wait_for(lambda: cell.agent.store.get_request(msg.uuid).status == "failed")


def test_rebuild_replaces_the_provider_instance(fast_cell):
    cell = fast_cell
    [uuid] = cell.build(1)
    old = cell.agent.store.get_instance(uuid).backend_id
    cell.send("rebuild_instance", {"instance": instance_prim(uuid), "image_href": "ubuntu",
                                   "admin_password": "x", "files_to_inject": [],
                                   "preserve_ephemeral": False, "kwargs": {}})
    wait_for(lambda: "rebuild_spawning" in cell.task_states(uuid))
    cell.wait_state(uuid, vm_state="active", task_state=None)
    rec = cell.agent.store.get_instance(uuid)
    assert rec.generation == 2 and rec.backend_id != old and rec.image_ref == "ubuntu"
    assert [i.backend_id for i in cell.agent.backend.list_instances()] == [rec.backend_id]
    assert cell.agent.backend.creates[uuid] == 2


def test_snapshot_reports_the_provider_image(fast_cell):
    cell = fast_cell
    [uuid] = cell.build(1)
    cell.send("snapshot_instance", {"instance": instance_prim(uuid), "image_id": "img-1"})
    wait_for(lambda: "image_snapshot" in cell.task_states(uuid))
    cell.wait_state(uuid, task_state=None)
    data, changes = cell.parent.updates(uuid)[-1]
    assert "system_metadata" in changes
    assert data["system_metadata"]["cellagent_snapshot:img-1"].startswith("fake-img-")
    assert cell.parent.row(uuid)["vm_state"] == "active"
