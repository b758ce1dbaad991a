"""A stock Stein parent drives a ``cellagent`` subprocess on real RabbitMQ.

Every message the agent sends back is checked against the formats of the
protocol reference (sections 1.5, 2 and 3.5): the oslo envelope, the RPC
dict, the cells message fields per type, the context and the Instance
primitives with their ``nova_object.changes``.
"""

import copy
import datetime
import json
import os
import socket
import subprocess
import uuid

from tests.functional.conftest import wait_for

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "wire")
CTX_KEYS = set(json.load(open(os.path.join(FIXTURES, "example2_update_capacities.json")))
               ["ctxt"])
RPC_KEYS = set(json.load(open(os.path.join(FIXTURES, "envelope_1.json"))))


def example(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def build_message(uuids, flavor_name="m1.small", memory_mb=2048):
    """Example 1 of the reference, with fresh uuids, one instance per uuid."""
    msg = example("example1_build_instances.json")
    msg["uuid"] = str(uuid.uuid4())
    kwargs = msg["method_kwargs"]["build_inst_kwargs"]
    template = kwargs["instances"][0]
    kwargs["instances"] = []
    for i, u in enumerate(uuids):
        inst = copy.deepcopy(template)
        inst["nova_object.data"].update(uuid=u, display_name="web-%d" % i,
                                        hostname="web-%d" % i, launch_index=i,
                                        memory_mb=memory_mb)
        kwargs["instances"].append(inst)
    kwargs["filter_properties"]["instance_type"]["nova_object.data"].update(
        name=flavor_name, memory_mb=memory_mb)
    return msg


def action(method, instance_uuid, **kwargs):
    """A targeted down cast like ComputeCellsAPI sends (example 1's envelope)."""
    msg = example("example1_build_instances.json")
    msg.update(uuid=str(uuid.uuid4()), method_name=method)
    msg["method_kwargs"] = dict(kwargs, instance=instance_prim(instance_uuid))
    return msg


def console_output(parent, instance_uuid, timeout=20):
    """Make the console-output call a Stein API makes (run_compute_api_method,
    need_response); returns ``(call, response message)`` once it is answered."""
    call = example("example1_build_instances.json")
    call.update(uuid=str(uuid.uuid4()), method_name="run_compute_api_method",
                need_response=True, method_kwargs={"method_info": {
                    "method": "get_console_output", "method_args": [instance_uuid, 5],
                    "method_kwargs": {}}})
    parent.cast(call)
    resp = wait_for(lambda: [m for m in parent.received("parse_responses")
                             if m.message["response_uuid"] == call["uuid"]], timeout,
                    what="console response")[0]
    return call, resp


def instance_prim(instance_uuid):
    return {"nova_object.name": "Instance", "nova_object.namespace": "nova",
            "nova_object.version": "2.4",
            "nova_object.data": {"uuid": instance_uuid, "vm_state": "active"},
            "nova_object.changes": ["task_state"]}


def check_format(rec):
    """One received message against the reference's formats."""
    assert set(rec.envelope) == {"oslo.version", "oslo.message"}
    assert rec.envelope["oslo.version"] == "2.0"
    rpc_ctx = {k for k in rec.rpc if k.startswith("_context_")}
    assert set(rec.rpc) - rpc_ctx == {"method", "args", "version", "_unique_id"}
    assert rec.rpc["method"] == "process_message" and rec.rpc["version"] == "1.0"
    assert list(rec.rpc["args"]) == ["message"] and isinstance(rec.rpc["args"]["message"], str)
    msg = rec.message
    assert {k[len("_context_"):] for k in rpc_ctx} == set(msg["ctxt"])
    common = {"message_type", "ctxt", "method_name", "method_kwargs", "direction",
              "need_response", "fanout", "uuid", "routing_path", "hop_count", "max_hop_count"}
    extra = {"targeted": {"target_cell"}, "broadcast": set(),
             "response": {"target_cell", "response_uuid"}}[msg["message_type"]]
    assert set(msg) == common | extra
    assert msg["direction"] == "up" and msg["routing_path"] == "cell1"
    assert msg["hop_count"] == 1 and msg["max_hop_count"] == 10
    uuid.UUID(msg["uuid"])
    ts = msg["ctxt"].get("timestamp")
    if ts is not None:
        datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%f")
    if msg["method_name"] in ("instance_update_at_top", "instance_destroy_at_top"):
        prim = msg["method_kwargs"]["instance"]
        assert prim["nova_object.name"] == "Instance"
        assert prim["nova_object.namespace"] == "nova"
        assert prim["nova_object.version"] == "2.4"
        changes = prim.get("nova_object.changes", [])
        assert changes == sorted(changes)
        assert set(changes) <= set(prim["nova_object.data"])
        assert "admin_password" not in json.dumps(prim)
    if msg["method_name"] in ("update_capacities", "update_capabilities"):
        assert msg["message_type"] == "targeted" and msg["fanout"] is True
        assert msg["target_cell"] == "cell1!api"
        assert set(msg["ctxt"]) == CTX_KEYS and msg["ctxt"]["is_admin"] is True
    if msg["method_name"].endswith("_at_top"):
        assert msg["message_type"] == "broadcast" and msg["fanout"] is False


def test_lifecycle_as_a_stock_stein_parent(parent, agent_factory):
    agent = agent_factory().start()
    uuids = [str(uuid.uuid4()) for _ in range(2)]
    parent.cast(build_message(uuids))

    # Build: building at once, then each state change, ending active.
    for u in uuids:
        wait_for(lambda u=u: parent.view(u).get("vm_state") == "active", 20, what="active")
    for u in uuids:
        updates = parent.updates(u)
        first_data, first_changes = updates[0].instance()
        assert first_data["vm_state"] == "building" and "vm_state" in first_changes
        states = [m.instance()[0].get("task_state") for m in updates]
        assert states[:2] == ["scheduling", "spawning"]
        data, changes = updates[-1].instance()
        assert {"vm_state", "task_state", "power_state", "access_ip_v4",
                "info_cache", "launched_at"} <= set(changes)
        assert data["power_state"] == 1 and data["task_state"] is None
        cache = data["info_cache"]
        assert cache["nova_object.name"] == "InstanceInfoCache"
        assert cache["nova_object.changes"] == ["network_info"]
        network_info = json.loads(cache["nova_object.data"]["network_info"])
        assert data["access_ip_v4"] in json.dumps(network_info)
        assert data["display_name"].startswith("web-") and data["host"] == "agent-host"

    # Reboot, hard.
    target = uuids[0]
    parent.cast(action("reboot_instance", target, reboot_type="HARD"))
    wait_for(lambda: any(m.instance()[0].get("task_state") == "rebooting_hard"
                         for m in parent.updates(target)), 10, what="rebooting_hard")
    n = len(parent.updates(target))
    wait_for(lambda: len(parent.updates(target)) > n and
             parent.view(target).get("task_state") is None, 10, what="reboot done")
    assert parent.view(target)["vm_state"] == "active"

    # Stop, then start.
    parent.cast(action("stop_instance", target, clean_shutdown=True))
    wait_for(lambda: parent.view(target).get("vm_state") == "stopped", 10, what="stopped")
    assert parent.view(target)["power_state"] == 4
    parent.cast(action("start_instance", target))
    wait_for(lambda: parent.view(target).get("vm_state") == "active", 10, what="started")

    # Console output: a call, answered on the parent's response fanout exchange.
    call, resp = console_output(parent, target, timeout=10)
    assert resp.message["message_type"] == "response"
    assert resp.message["target_cell"] == "cell1!api" and resp.message["fanout"] is True
    exchanges = [ex for ex, m in parent.received_with_exchange("parse_responses")]
    assert "cells.intercell.response_fanout" in exchanges
    orig = json.loads(resp.kwargs["orig_message"])
    assert orig["uuid"] == call["uuid"] and orig["routing_path"] == "api!cell1"
    entry = json.loads(resp.kwargs["responses"][0])
    assert entry["cell_name"] == "api!cell1" and entry["failure"] is False
    assert "login:" in entry["value"] and len(entry["value"].splitlines()) <= 5

    # Delete: ends with instance_destroy_at_top.
    for u in uuids:
        parent.cast(action("terminate_instance", u, delete_type="delete"))
    wait_for(lambda: parent.destroyed() >= set(uuids), 10, what="destroy_at_top")

    for rec in parent.received():
        check_format(rec)
    caps = parent.received_with_exchange("update_capacities")
    assert caps and all(ex == "cells.intercell.targeted_fanout" for ex, _ in caps)
    assert "s3cr3t" not in agent.log() and "Qx7pL2vN9sTz" not in agent.log()
    assert agent.terminate() == 0


def test_capacities_shrink_after_a_build(parent, agent_factory):
    agent_factory(fake__ram_mb=10240).start()
    first = wait_for(lambda: parent.received("update_capacities"), 10, what="capacities")[0]
    units = first.kwargs["capacities"]["ram_free"]["units_by_mb"]
    assert set(units) == {"512", "2048", "4096", "8192", "16384"}
    assert set(first.kwargs["capacities"]["disk_free"]["units_by_mb"]) == \
        {"1024", "20480", "40960", "81920", "163840"}
    # 10240 MB with 10 % reserved: int((10240 - 1024) / 2048) = 4 units of m1.small.
    assert units["2048"] == 4
    assert first.kwargs["capacities"]["ram_free"]["total_mb"] == 10240
    caps = parent.received("update_capabilities")[0].kwargs["capabilities"]
    assert caps == {"hypervisor": ["kvm", "xenserver"], "os": ["linux", "windows"]}

    uuids = [str(uuid.uuid4()) for _ in range(3)]
    parent.cast(build_message(uuids))
    wait_for(lambda: all(parent.view(u).get("vm_state") == "active" for u in uuids), 20,
             what="active")
    last = wait_for(lambda: [m for m in parent.received("update_capacities")
                             if m.kwargs["capacities"]["ram_free"]["total_mb"] == 10240 - 3 * 2048],
                    10, what="a capacity report after the builds")[-1]
    assert last.kwargs["capacities"]["ram_free"]["units_by_mb"]["2048"] == 1
    # Coalesced: a handful of reports for the whole burst, not one per instance.
    assert len(parent.received("update_capacities")) <= 5


def test_unknown_instance_and_method_get_novas_errors(parent, agent_factory):
    agent = agent_factory().start()
    missing = str(uuid.uuid4())
    call = action("run_compute_api_method", missing)
    call.update(need_response=True, method_kwargs={"method_info": {
        "method": "get_console_output", "method_args": [missing], "method_kwargs": {}}})
    parent.cast(call)
    unknown = action("frobnicate_instance", missing)
    unknown["need_response"] = True
    parent.cast(unknown)

    def reply(msg_uuid):
        return [m for m in parent.received("parse_responses")
                if m.message["response_uuid"] == msg_uuid]

    r = json.loads(wait_for(lambda: reply(call["uuid"]), 10)[0].kwargs["responses"][0])
    failure = json.loads(r["value"])
    assert r["failure"] is True
    assert (failure["class"], failure["module"]) == ("InstanceNotFound", "nova.exception")
    assert failure["kwargs"] == {"instance_id": missing, "code": 404}
    assert set(failure) == {"class", "module", "message", "tb", "args", "kwargs"}
    wait_for(lambda: missing in parent.destroyed(), 10, what="repair destroy_at_top")
    r = json.loads(wait_for(lambda: reply(unknown["uuid"]), 10)[0].kwargs["responses"][0])
    assert r["failure"] is True and json.loads(r["value"])["class"] == "UnknownMethod"

    # Broadcast calls a Stein API makes get an answer well within call_timeout.
    for method, kwargs in (("service_get_all", {"filters": {}}),
                           ("compute_node_get_all", {"hypervisor_match": None}),
                           ("compute_node_stats", {}), ("task_log_get_all", {
                               "task_name": "x", "period_beginning": None,
                               "period_ending": None, "host": None, "state": None}),
                           ("get_migrations", {"filters": {}})):
        msg = example("example4_instance_update_at_top.json")
        msg.update(uuid=str(uuid.uuid4()), method_name=method, method_kwargs=kwargs,
                   direction="down", need_response=True, routing_path="api",
                   ctxt=example("example2_update_capacities.json")["ctxt"])
        parent.cast(msg, routing_key="cells.intercell.broadcast")
        got = wait_for(lambda u=msg["uuid"]: reply(u), 5, what=method)[0]
        assert got.message["target_cell"] == "cell1!api"
        entries = [json.loads(e) for e in got.kwargs["responses"]]
        assert len(entries) == 1 and entries[0]["failure"] is False, entries
    last = json.loads(reply(msg["uuid"])[0].kwargs["responses"][0])
    assert last["value"]["nova_object.name"] == "MigrationList"

    # Garbage on the wire is dropped and the agent keeps serving.
    parent.publish_raw("this is not json")
    parent.publish_raw(json.dumps({"oslo.version": "2.0", "oslo.message": "{\"method\": 1}"}))
    ok = str(uuid.uuid4())
    parent.cast(build_message([ok]))
    wait_for(lambda: parent.view(ok).get("vm_state") == "active", 20, what="still serving")
    assert agent.proc.poll() is None
    # ... and acknowledged: nothing is left on the queue, ready or unacked.
    wait_for(lambda: queue_messages(parent.child_vhost, "cells.intercell.targeted") == "0",
             10, what="the targeted queue to be empty")


def queue_messages(vhost, name):
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "messages",
                          "--no-table-headers"], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    return dict(line.split("\t") for line in out.splitlines() if "\t" in line).get(name)


def test_sigterm_drains_and_sd_notify(parent, agent_factory, tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    agent = agent_factory(fake__spawn_delay=1.0).start(env={"NOTIFY_SOCKET": sock_path})
    assert sock.recv(100) == b"READY=1"
    uuids = [str(uuid.uuid4()) for _ in range(3)]
    parent.cast(build_message(uuids))
    wait_for(lambda: all(parent.updates(u) for u in uuids), 10, what="builds accepted")
    assert agent.terminate() == 0
    assert sock.recv(100) == b"STOPPING=1"
    sock.close()
    # The drain let the in-flight builds finish before the agent exited.
    assert all(parent.view(u).get("vm_state") == "active" for u in uuids)
