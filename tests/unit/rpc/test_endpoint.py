"""A running child cell, driven by an in-process parent over ``fake://``.

Each test starts a real ``AgentService`` (fake backend, memory store) and a
parent with its own router and RPC servers (see tests/unit/helpers.py), and
checks what the parent, i.e. the user of the API cell, would notice.
"""

import json
import logging
import time
import uuid as uuidlib

import pytest

from cellagent.rpc import intercell
from tests.unit.helpers import FLAVOR
from tests.unit.helpers import build_kwargs
from tests.unit.helpers import instance_prim
from tests.unit.helpers import wait_for
from tests.unit.helpers import wire

DEFAULT_RAM_SLOTS = {"512", "2048", "4096", "8192", "16384"}
DEFAULT_DISK_SLOTS = {str(gb * 1024) for gb in (1, 20, 40, 80, 160)}
FAST = {"spawn_delay": 0.05, "reboot_delay": 0.1, "stop_delay": 0.1, "start_delay": 0.1,
        "delete_delay": 0.05}


def new_uuid():
    return str(uuidlib.uuid4())


def warnings_containing(caplog, text):
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


def failure_of(responses):
    """The decoded failure of the one response of a call."""
    assert len(responses) == 1, responses
    [resp] = responses
    assert resp.failure is True, resp
    return resp.failure_info()


def one_value(responses):
    assert len(responses) == 1, responses
    [resp] = responses
    assert resp.failure is False, resp.failure_info()
    assert resp.cell_name == "api!cell1"
    return resp.value


# -- duplicates -------------------------------------------------------------------


def test_message_delivered_twice_builds_once(cell, caplog):
    caplog.set_level(logging.WARNING)
    uuid = new_uuid()
    msg = cell.new("build_instances", build_kwargs([uuid]))

    cell.send_msg(msg)
    cell.send_msg(msg)          # the broker redelivered it: same message uuid

    cell.wait_state(uuid, vm_state="active", task_state=None)
    wait_for(lambda: warnings_containing(caplog, "Dropped duplicate message"),
             what="the duplicate warning")
    time.sleep(0.2)             # room for a second build, which must not come
    assert cell.agent.backend.creates[uuid] == 1
    assert len(warnings_containing(caplog, "Dropped duplicate message")) == 1
    assert len(warnings_containing(caplog, msg.uuid)) == 1
    building = [d for d, _ in cell.parent.updates(uuid) if d.get("vm_state") == "building"
                and d.get("task_state") == "scheduling"]
    assert len(building) == 1


def test_build_resent_with_a_new_message_uuid_is_dropped(cell, caplog):
    caplog.set_level(logging.WARNING)
    [uuid] = cell.build(1)
    updates_before = len(cell.parent.updates(uuid))

    again = cell.send("build_instances", build_kwargs([uuid]))

    wait_for(lambda: warnings_containing(caplog, "Dropped build from message"),
             what="the re-sent build warning")
    time.sleep(0.2)
    assert cell.agent.backend.creates[uuid] == 1
    assert [again.uuid in r.getMessage()
            for r in warnings_containing(caplog, "Dropped build")] == [True]
    # The re-send is answered with where the instance stands, so a top
    # that missed the acknowledgement stops re-sending.
    wait_for(lambda: len(cell.parent.updates(uuid)) == updates_before + 1)
    data, changes = cell.parent.updates(uuid)[-1]
    assert data["vm_state"] == "active" and "vm_state" in changes
    assert data["access_ip_v4"] and "info_cache" in changes
    assert cell.parent.row(uuid)["vm_state"] == "active"


def test_build_resent_while_the_first_one_runs_is_dropped(make_cell, caplog):
    caplog.set_level(logging.WARNING)
    cell = make_cell(fake_opts={"spawn_delay": 0.5})
    uuid = new_uuid()
    cell.send("build_instances", build_kwargs([uuid]))
    cell.wait_task_states(uuid, "scheduling", "spawning")

    cell.send("build_instances", build_kwargs([uuid]))

    wait_for(lambda: warnings_containing(caplog, "Dropped build from message"))
    cell.wait_state(uuid, vm_state="active", task_state=None)
    assert cell.agent.backend.creates[uuid] == 1


# -- malformed input --------------------------------------------------------------------


def _wrong(**changes):
    data = wire(1)
    data.update(changes)
    return json.dumps(data)


MALFORMED = [
    "this is not json",
    '{"message_type": "targeted", "ctxt": {',
    "[1, 2, 3]",
    42,
    None,
    _wrong(method_kwargs=["not", "a", "dict"]),
    _wrong(hop_count="2"),
    _wrong(hop_count=True),
    _wrong(ctxt="admin"),
    _wrong(direction="sideways"),
    _wrong(message_type="multicast"),
    json.dumps({k: v for k, v in wire(1).items() if k != "method_name"}),
    json.dumps({k: v for k, v in wire(1).items() if k != "target_cell"}),
    _wrong(ctxt=dict(wire(1)["ctxt"], timestamp="2019-06-03 10:15:42")),
]


def test_malformed_messages_are_dropped_with_one_warning_each(cell, caplog):
    caplog.set_level(logging.WARNING)

    for message in MALFORMED:
        cell.cast_raw(message)

    wait_for(lambda: len(warnings_containing(caplog, "Dropped an undecodable")) >= len(MALFORMED),
             what="one warning per malformed message")
    time.sleep(0.1)
    assert len(warnings_containing(caplog, "Dropped an undecodable")) == len(MALFORMED)
    assert cell.agent.router.dropped == len(MALFORMED)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # The secret in the mangled example 1 messages was never logged.
    assert not [r for r in caplog.records if "Qx7pL2vN9sTz" in r.getMessage()]
    # ... and the agent still serves.
    assert one_value(cell.call("compute_node_stats", {}, message_type="broadcast"))["count"] == 1
    [uuid] = cell.build(1)
    assert cell.agent.backend.creates[uuid] == 1


def test_message_with_wrong_kwargs_is_refused_and_the_agent_keeps_serving(cell, caplog):
    caplog.set_level(logging.WARNING)
    cell.send("build_instances", {"build_inst_kwargs": "not a dict"})
    cell.send("reboot_instance", {"instance": instance_prim(new_uuid()), "reboot_type": "WARM"})
    cell.send("terminate_instance", {"instance": "no object here"})

    wait_for(lambda: len(warnings_containing(caplog, "Malformed cells message")) >= 3,
             what="three refusals")
    [uuid] = cell.build(1)
    assert cell.agent.backend.creates[uuid] == 1


# -- failures answered to calls ---------------------------------------------------------


@pytest.mark.parametrize("method,kwargs,message_type", [
    ("service_get_all", {"filters": "disabled"}, "broadcast"),
    ("instance_update_from_api",
     {"instance": dict(instance_prim("9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"),
                       **{"nova_object.changes": [["display_name"]]})}, "targeted"),
])
def test_kwargs_of_the_wrong_shape_are_a_malformed_message(cell, method, kwargs,
                                                           message_type):
    info = failure_of(cell.call(method, kwargs, message_type=message_type))
    assert info["class"] == "MalformedMessage"


def test_unknown_method_called_gets_an_unknown_method_failure(cell):
    info = failure_of(cell.call("frobnicate_instance", {}))
    assert info["class"] == "UnknownMethod"
    assert "frobnicate_instance" in info["message"]


def test_unknown_broadcast_method_called_gets_a_failure_too(cell):
    info = failure_of(cell.call("frobnicate_everything", {}, message_type="broadcast"))
    assert info["class"] == "UnknownMethod"


def test_stock_method_the_cell_does_not_support_fails_and_clears_task_state(cell):
    [uuid] = cell.build(1)
    before = cell.task_states(uuid)

    info = failure_of(cell.call("live_migrate_instance", {
        "instance": instance_prim(uuid), "block_migration": False,
        "disk_over_commit": False, "host_name": None}))

    assert info["class"] == "UnknownMethod"
    assert "not supported" in info["message"]
    wait_for(lambda: cell.parent.received("instance_fault_create_at_top", uuid))
    wait_for(lambda: cell.task_states(uuid) == before + [None],
             what="task_state cleared once more")
    assert cell.parent.row(uuid)["vm_state"] == "active"


def test_target_that_does_not_continue_the_path_gets_a_routing_failure(cell):
    # The parent puts it on cell1's broker, but the target names cell2.
    info = failure_of(cell.call("get_migrations", {"filters": {}}, target_cell="api!cell2",
                                record=cell.child_record))
    assert info["class"] == "CellRoutingInconsistency"
    assert info["module"] == "nova.exception"


def test_target_beyond_an_unknown_child_gets_a_routing_failure(cell):
    info = failure_of(cell.call("get_migrations", {}, target_cell="api!cell1!nowhere"))
    assert info["class"] == "CellRoutingInconsistency"
    assert "nowhere" in info["message"]


def test_routing_failure_of_a_cast_is_only_logged(cell, caplog):
    caplog.set_level(logging.WARNING)
    msg = cell.new("get_migrations", {}, target_cell="api!cell2")
    cell.send_msg(msg)
    wait_for(lambda: warnings_containing(caplog, "Cannot route"))
    assert msg.uuid in warnings_containing(caplog, "Cannot route")[0].getMessage()
    assert not cell.parent.received("parse_responses")


def test_call_whose_reply_cannot_be_routed_is_one_warning_not_a_traceback(cell, caplog):
    caplog.set_level(logging.WARNING)
    # The parent calls itself "top", but cell1's cells.json knows it as "api".
    msg = cell.new("get_migrations", {"filters": {}}, target_cell="top!cell1",
                   need_response=True)
    msg.routing_path = "top"

    cell.send_msg(msg)

    wait_for(lambda: [r for r in caplog.records if msg.uuid in r.getMessage()],
             what="a log line about the call")
    time.sleep(0.1)
    about = [r for r in caplog.records if msg.uuid in r.getMessage()]
    assert [r.levelno for r in about] == [logging.WARNING]
    assert "top" in about[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


def test_message_at_the_hop_limit_gets_max_hop_count_reached(cell):
    msg = cell.new("get_migrations", {}, target_cell="api!cell1!leaf")
    msg.hop_count = 9           # cell1 makes it 10 = max_hop_count

    info = failure_of(cell.router.call(msg))

    assert info["class"] == "CellMaxHopCountReached"
    assert info["module"] == "nova.exception"
    assert info["kwargs"]["hop_count"] == 10


def test_message_below_the_hop_limit_is_routed_on(cell):
    msg = cell.new("get_migrations", {}, target_cell="api!cell1!leaf")
    msg.hop_count = 8
    # Routed on, and only then found to have nowhere to go.
    assert failure_of(cell.router.call(msg))["class"] == "CellRoutingInconsistency"


# -- broadcast calls ------------------------------------------------------------------


@pytest.mark.parametrize("method,kwargs", [
    ("service_get_all", {"filters": {}}),
    ("compute_node_get_all", {"hypervisor_match": None}),
    ("compute_node_stats", {}),
    ("task_log_get_all", {"task_name": "instance_usage_audit", "period_beginning": None,
                          "period_ending": None, "host": None, "state": None}),
    ("get_migrations", {"filters": {}}),
])
def test_broadcast_call_gets_one_answer_quickly(cell, method, kwargs):
    start = time.monotonic()
    value = one_value(cell.call(method, kwargs, message_type="broadcast"))
    assert time.monotonic() - start < 2.0
    json.dumps(value)


def test_service_get_all_lists_this_agent_as_a_compute_service(cell):
    value = one_value(cell.call("service_get_all", {"filters": {}}, message_type="broadcast"))
    [service] = intercell.obj_list_items(value, "Service")
    data, _ = intercell.obj_data(service, "Service")
    assert (data["host"], data["binary"], data["disabled"]) == \
        (cell.host, "nova-compute", False)
    disabled = one_value(cell.call("service_get_all", {"filters": {"disabled": True}},
                                   message_type="broadcast"))
    assert intercell.obj_list_items(disabled, "Service") == []


def test_compute_node_stats_count_what_runs(cell):
    cell.build(2)
    stats = one_value(cell.call("compute_node_stats", {}, message_type="broadcast"))
    assert stats["running_vms"] == 2
    assert stats["vcpus_used"] == 2
    assert stats["memory_mb_used"] == 2 * 2048


def test_compute_node_reports_total_vcpus_above_used(cell):
    cell.build(1)
    stats = one_value(cell.call("compute_node_stats", {}, message_type="broadcast"))
    assert stats["vcpus"] > stats["vcpus_used"]


# -- run_compute_api_method -----------------------------------------------------------


def test_console_output_comes_back_as_text(cell):
    [uuid] = cell.build(1)

    text = one_value(cell.call("run_compute_api_method", {"method_info": {
        "method": "get_console_output", "method_args": [uuid, 3], "method_kwargs": {}}}))

    assert isinstance(text, str)
    assert len(text.splitlines()) == 3
    assert text.endswith("login: ")


def test_console_output_of_an_unknown_instance_is_instance_not_found(cell):
    uuid = new_uuid()

    info = failure_of(cell.call("run_compute_api_method", {"method_info": {
        "method": "get_console_output", "method_args": [uuid, 50], "method_kwargs": {}}}))

    assert info["class"] == "InstanceNotFound"
    assert info["module"] == "nova.exception"
    assert info["kwargs"] == {"instance_id": uuid, "code": 404}
    # Like a stock child, it also tells the top the instance is gone here.
    [destroy] = wait_for(lambda: cell.parent.received("instance_destroy_at_top", uuid))
    assert (destroy.message_type, destroy.direction) == ("broadcast", "up")


def test_compute_api_method_the_cell_lacks_is_reported_as_such(cell):
    [uuid] = cell.build(1)
    info = failure_of(cell.call("run_compute_api_method", {"method_info": {
        "method": "get_vnc_console_of_doom", "method_args": [uuid], "method_kwargs": {}}}))
    assert info["class"] == "CellServiceAPIMethodNotFound"
    assert info["module"] == "nova.exception"


# -- builds and life cycle ------------------------------------------------------------------


def test_build_of_three_instances_ends_with_each_active_and_addressed(cell):
    uuids = cell.build(3)

    for uuid in uuids:
        data, changes = cell.parent.updates(uuid)[-1]
        assert data["vm_state"] == "active" and data["power_state"] == 1
        assert {"access_ip_v4", "info_cache", "vm_state", "task_state"} <= set(changes)
        cache = data["info_cache"]
        assert cache["nova_object.name"] == "InstanceInfoCache"
        network_info = cache["nova_object.data"]["network_info"]
        assert isinstance(network_info, str)
        assert data["access_ip_v4"] and data["access_ip_v4"] in network_info
        assert isinstance(json.loads(network_info), list)
        assert cell.parent.row(uuid)["cell_name"] == "api!cell1"
        assert cell.agent.backend.creates[uuid] == 1
    assert len({cell.parent.row(u)["access_ip_v4"] for u in uuids}) == 3


def test_build_reports_building_then_spawning_then_active(make_cell):
    cell = make_cell(fake_opts=FAST)
    [uuid] = cell.build(1)
    assert cell.task_states(uuid) == ["scheduling", "spawning", None]
    first_data, first_changes = cell.parent.updates(uuid)[0]
    assert first_data["vm_state"] == "building"
    assert "display_name" in first_changes


def test_build_hands_the_admin_password_to_the_backend(cell):
    requests = []
    real_spawn = cell.agent.backend.spawn

    def spawn(request):
        requests.append(request)
        return real_spawn(request)

    cell.agent.backend.spawn = spawn
    cell.build(1, password="correct horse")

    assert [r.admin_password for r in requests] == ["correct horse"]


@pytest.mark.parametrize("reboot_type,task_state", [("SOFT", "rebooting"),
                                                    ("HARD", "rebooting_hard")])
def test_reboot(make_cell, reboot_type, task_state):
    cell = make_cell(fake_opts=FAST)
    [uuid] = cell.build(1)

    cell.send("reboot_instance", {"instance": instance_prim(uuid), "reboot_type": reboot_type})

    cell.wait_task_states(uuid, task_state, None)
    assert cell.parent.row(uuid)["vm_state"] == "active"
    assert cell.parent.row(uuid)["power_state"] == 1
    assert cell.agent.backend.calls["reboot"] == 1


def test_stop_then_start(make_cell):
    cell = make_cell(fake_opts=FAST)
    [uuid] = cell.build(1)

    cell.send("stop_instance", {"instance": instance_prim(uuid), "clean_shutdown": True})
    cell.wait_task_states(uuid, "powering-off", None)
    cell.wait_state(uuid, vm_state="stopped", power_state=4)
    cell.send("start_instance", {"instance": instance_prim(uuid)})
    cell.wait_task_states(uuid, "powering-off", None, "powering-on", None)
    cell.wait_state(uuid, vm_state="active", power_state=1)


def test_soft_delete_then_delete(make_cell):
    cell = make_cell(fake_opts=FAST)
    [uuid] = cell.build(1)

    cell.send("soft_delete_instance", {"instance": instance_prim(uuid)})
    cell.wait_task_states(uuid, "soft-deleting", None)
    cell.wait_state(uuid, vm_state="soft-delete")
    cell.send("terminate_instance", {"instance": instance_prim(uuid), "delete_type": "delete"})

    wait_for(lambda: cell.parent.received("instance_destroy_at_top", uuid),
             what="instance_destroy_at_top")
    assert cell.parent.row(uuid) == {}
    assert cell.agent.store.get_instance(uuid).deleted
    wait_for(lambda: not cell.agent.backend.list_instances(), what="the cloud to be empty")


def test_delete_ends_with_instance_destroy_at_top(make_cell):
    cell = make_cell(fake_opts=FAST)
    uuids = cell.build(2)

    cell.send("terminate_instance", {"instance": instance_prim(uuids[0]),
                                     "delete_type": "delete"})

    [destroy] = wait_for(lambda: cell.parent.received("instance_destroy_at_top", uuids[0]))
    data, _ = intercell.obj_data(destroy.method_kwargs["instance"], "Instance")
    assert data["uuid"] == uuids[0]
    assert (destroy.message_type, destroy.direction, destroy.fanout) == \
        ("broadcast", "up", False)
    assert cell.parent.row(uuids[0]) == {}
    assert cell.parent.row(uuids[1])["vm_state"] == "active"
    wait_for(lambda: len(cell.agent.backend.list_instances()) == 1)


def test_delete_sent_right_after_a_build_wins_even_if_the_journal_is_slow(cell):
    # A journal write that takes a while (a busy database) for the build only.
    store = cell.agent.store
    real_begin = store.begin_request

    def slow_begin(msg_uuid, method, instance_uuid, payload, **kwargs):
        if method == "build_instances":
            time.sleep(0.5)
        return real_begin(msg_uuid, method, instance_uuid, payload, **kwargs)

    store.begin_request = slow_begin
    uuid = new_uuid()

    build = cell.send("build_instances", build_kwargs([uuid]))
    delete = cell.send("terminate_instance", {"instance": instance_prim(uuid),
                                              "delete_type": "delete"})

    wait_for(lambda: all(store.get_request(m.uuid) for m in (build, delete)),
             what="both messages in the journal")
    # What the user asked for last: the server is gone, here and at the top.
    wait_for(lambda: not cell.agent.backend.list_instances(), timeout=3,
             what="the cloud to be empty")
    wait_for(lambda: cell.parent.row(uuid) == {}, timeout=3, what="no row at the top")
    time.sleep(0.3)
    assert not cell.agent.backend.list_instances()
    assert cell.parent.row(uuid) == {}


def test_delete_of_an_unknown_instance_repairs_the_top(cell):
    uuid = new_uuid()
    cell.send("terminate_instance", {"instance": instance_prim(uuid), "delete_type": "delete"})
    wait_for(lambda: cell.parent.received("instance_destroy_at_top", uuid))


def test_delete_everywhere_deletes_here(make_cell):
    cell = make_cell(fake_opts=FAST)
    [uuid] = cell.build(1)
    cell.send("instance_delete_everywhere", {"instance": instance_prim(uuid),
                                             "delete_type": "hard"}, message_type="broadcast")
    wait_for(lambda: cell.parent.received("instance_destroy_at_top", uuid))


def test_update_from_api_stores_names_but_never_states(cell):
    [uuid] = cell.build(1)
    prim = instance_prim(uuid, name="renamed", vm_state="error", task_state="deleting")
    prim["nova_object.changes"] = ["display_name", "vm_state"]

    cell.send("instance_update_from_api", {"instance": prim, "expected_vm_state": None,
                                           "expected_task_state": None,
                                           "admin_state_reset": False})

    wait_for(lambda: cell.agent.store.get_instance(uuid).instance["display_name"] == "renamed",
             what="the new display_name in the store")
    rec = cell.agent.store.get_instance(uuid)
    assert rec.vm_state == "active"
    assert rec.instance["vm_state"] == "active"
    assert rec.instance["task_state"] is None


def test_update_from_api_with_admin_reset_applies_vm_state(cell):
    [uuid] = cell.build(1)
    prim = instance_prim(uuid, vm_state="error")
    prim["nova_object.changes"] = ["vm_state"]

    cell.send("instance_update_from_api", {"instance": prim, "admin_state_reset": True})

    wait_for(lambda: cell.agent.store.get_instance(uuid).vm_state == "error")


def test_failing_backend_ends_in_error_with_a_fault(make_cell):
    cell = make_cell(driver="fake-failing-spawn")
    uuid = new_uuid()

    cell.send("build_instances", build_kwargs([uuid]))

    cell.wait_state(uuid, vm_state="error", task_state=None)
    [fault_msg] = wait_for(lambda: cell.parent.received("instance_fault_create_at_top", uuid))
    fault = fault_msg.method_kwargs["instance_fault"]
    assert fault["instance_uuid"] == uuid
    assert "refused on purpose" in fault["message"]
    assert fault["code"] == 500
    assert cell.parent.view.faults == [fault]


def test_sync_instances_resends_every_instance(cell):
    uuids = cell.build(2)
    before = {u: len(cell.parent.updates(u)) for u in uuids}

    cell.send("sync_instances", {"project_id": None, "updated_since": None, "deleted": False},
              message_type="broadcast")

    for u in uuids:
        wait_for(lambda u=u: len(cell.parent.updates(u)) == before[u] + 1)
        data, changes = cell.parent.updates(u)[-1]
        assert data["vm_state"] == "active"
        assert {"vm_state", "task_state", "power_state", "access_ip_v4", "info_cache"} <= \
            set(changes)


def test_sync_instances_with_deleted_resends_the_destroys(make_cell):
    cell = make_cell(fake_opts=FAST)
    uuids = cell.build(2)
    cell.send("terminate_instance", {"instance": instance_prim(uuids[0])})
    wait_for(lambda: cell.parent.received("instance_destroy_at_top", uuids[0]))

    cell.send("sync_instances", {"project_id": "demo", "updated_since": "2019-06-03T10:15:42Z",
                                 "deleted": True}, message_type="broadcast")

    wait_for(lambda: len(cell.parent.received("instance_destroy_at_top", uuids[0])) == 2)


def test_announce_capacities_reports_units_for_every_flavor_size(cell):
    before = len(cell.parent.received("update_capacities"))

    cell.send("announce_capacities", {})

    msgs = wait_for(lambda: cell.parent.received("update_capacities")[before:])
    msg = msgs[0]
    assert (msg.message_type, msg.direction, msg.fanout, msg.target_cell) == \
        ("targeted", "up", True, "cell1!api")
    assert msg.method_kwargs["cell_name"] == "cell1"
    caps = msg.method_kwargs["capacities"]
    assert set(caps) == {"ram_free", "disk_free"}
    assert set(caps["ram_free"]["units_by_mb"]) == DEFAULT_RAM_SLOTS
    assert set(caps["disk_free"]["units_by_mb"]) == DEFAULT_DISK_SLOTS
    # 20480 MB of fake RAM, 10 % reserved: 18432 MB usable.
    assert caps["ram_free"]["total_mb"] == 20480
    assert caps["ram_free"]["units_by_mb"]["2048"] == 9
    assert caps["ram_free"]["units_by_mb"]["16384"] == 1
    assert all(isinstance(v, int) for v in caps["ram_free"]["units_by_mb"].values())


def test_capacities_shrink_after_a_build(cell):
    cell.build(2)
    before = len(cell.parent.received("update_capacities"))
    cell.send("announce_capacities", {})
    msg = wait_for(lambda: cell.parent.received("update_capacities")[before:])[-1]
    assert msg.method_kwargs["capacities"]["ram_free"]["total_mb"] == 20480 - 2 * 2048


def test_absurd_flavor_in_one_build_does_not_stop_capacity_reports(cell):
    uuid = new_uuid()
    absurd = dict(FLAVOR, name="m1.absurd", memory_mb=10 ** 400)
    cell.send("build_instances", build_kwargs([uuid], flavor=absurd))
    cell.wait_state(uuid, vm_state="error")         # no room for it, as expected
    before = len(cell.parent.received("update_capacities"))

    cell.send("announce_capacities", {})

    wait_for(lambda: cell.parent.received("update_capacities")[before:], timeout=3,
             what="a capacity report after the absurd build")


def test_announce_capabilities_reports_the_configured_ones(cell):
    before = len(cell.parent.received("update_capabilities"))
    cell.send("announce_capabilities", {})
    msg = wait_for(lambda: cell.parent.received("update_capabilities")[before:])[0]
    assert msg.method_kwargs == {"cell_name": "cell1", "capabilities": {
        "hypervisor": ["kvm", "xenserver"], "os": ["linux", "windows"]}}
    assert cell.parent.view.capabilities["cell1"] == msg.method_kwargs["capabilities"]
