"""Thousands of mangled inter-cell messages against one running child.

Starting from the literal examples of the reference (tests/fixtures/wire),
hypothesis drops keys, changes types, plants random JSON, truncates the
text, inserts random bytes, deeply nested values and huge numbers, puts
wrong ``nova_object`` shapes in ``method_kwargs`` and invents method names.
The messages go to ``Router.receive`` and, wrapped in (mangled) oslo
envelopes, to ``IntercellEndpoint.process_message`` of a child agent that
keeps running for the whole module. What a user would notice:

* nothing ever raises out of the receiving side (the RPC server thread
  would otherwise log a traceback per message and, in stock oslo, keep
  the bad message in flight);
* afterwards the same agent still builds a server to ``active``;
* no admin password carried by any of those messages shows up in a log.
"""

import copy
import json
import logging
import uuid as uuidlib

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from cellagent import exception
from cellagent.rpc import endpoint
from cellagent.rpc import intercell
from tests.unit.helpers import CellHarness
from tests.unit.helpers import ListHandler
from tests.unit.helpers import wait_for
from tests.unit.helpers import wire

SECRET_PREFIX = "s3cr3t-"
EXAMPLES = [wire(1), wire(2), dict(wire(2), **wire(3)), wire(4), wire(5)]
EX1 = wire(1)
# Instance uuids the generated messages pick from, so that later messages
# (reboot, delete, console...) often find an instance an earlier one built.
POOL = [EX1["method_kwargs"]["build_inst_kwargs"]["instances"][0]["nova_object.data"]["uuid"]]
POOL += ["00000000-0000-4000-8000-%012d" % i for i in range(5)]

TARGETED_METHODS = [
    "build_instances", "run_compute_api_method", "start_instance", "stop_instance",
    "reboot_instance", "suspend_instance", "resume_instance", "pause_instance",
    "unpause_instance", "terminate_instance", "soft_delete_instance", "resize_instance",
    "live_migrate_instance", "revert_resize", "confirm_resize", "reset_network",
    "inject_network_info", "snapshot_instance", "backup_instance", "rebuild_instance",
    "set_admin_password", "instance_update_from_api", "announce_capabilities",
    "announce_capacities", "service_get_by_compute_host", "service_update",
    "service_delete", "get_host_uptime", "proxy_rpc_to_manager", "compute_node_get",
    "actions_get", "action_get_by_request_id", "action_events_get",
    "validate_console_port", "get_migrations", "task_log_get_all",
]
BROADCAST_METHODS = [
    "instance_delete_everywhere", "sync_instances", "service_get_all",
    "compute_node_get_all", "compute_node_stats", "task_log_get_all", "get_migrations",
    "instance_update_at_top", "instance_destroy_at_top", "instance_fault_create_at_top",
    "bw_usage_update_at_top", "bdm_update_or_create_at_top", "bdm_destroy_at_top",
    "get_keypair_at_top", "parse_responses",
]
COMPUTE_API_METHODS = ["get_console_output", "restore", "get_diagnostics", "rescue",
                       "get_vnc_connect_info", "__init__", "_get_live", ""]

# -- strategies ---------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([10 ** 30, 10 ** 400, -(10 ** 400), 2 ** 63, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", "api", "api!cell1", "cell1", "!", "@", "***", "2.4", "3.0",
                     "2019-06-03T10:15:42.123456", "SOFT", "HARD", "delete", "soft"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12)

instance_uuids = st.one_of(st.sampled_from(POOL), st.uuids().map(str), scalars)


def _instance_data():
    return st.fixed_dictionaries(
        {"uuid": instance_uuids},
        optional={"display_name": st.text(max_size=10), "vm_state": scalars,
                  "task_state": scalars, "memory_mb": scalars, "flavor": json_values,
                  "metadata": json_values, "launch_index": scalars,
                  "info_cache": json_values})


nova_objects = st.one_of(
    # well formed
    st.builds(lambda data, changes: intercell.obj_primitive("Instance", data, changes),
              _instance_data(),
              st.lists(st.sampled_from(["display_name", "vm_state", "task_state",
                                        "metadata", "uuid", "host"]), max_size=4)),
    # every key may be missing or of any type
    st.fixed_dictionaries({}, optional={
        "nova_object.name": st.one_of(st.sampled_from(["Instance", "Flavor", "InstanceList",
                                                       "NetworkRequestList", ""]),
                                      json_values),
        "nova_object.namespace": json_values,
        "nova_object.version": st.one_of(st.sampled_from(["2.4", "3.0", "1.0", "x", ""]),
                                         json_values),
        "nova_object.data": st.one_of(_instance_data(), json_values),
        "nova_object.changes": st.one_of(st.lists(st.text(max_size=10), max_size=3),
                                         json_values),
    }),
    json_values,
)


def _method_kwargs(secret):
    """kwargs under the names the child's methods read, each of any shape."""
    build = st.fixed_dictionaries({}, optional={
        "instances": st.one_of(st.lists(nova_objects, max_size=3), json_values),
        "image": json_values,
        "filter_properties": st.one_of(
            st.fixed_dictionaries({"instance_type": st.one_of(nova_objects, st.builds(
                lambda mb, gb: intercell.obj_primitive(
                    "Flavor", {"name": "m1.fuzz", "memory_mb": mb, "vcpus": 1,
                               "root_gb": gb}),
                st.one_of(st.integers(-5, 4096), scalars),
                st.one_of(st.integers(-5, 80), scalars)))}),
            json_values),
        "requested_networks": st.one_of(nova_objects, json_values),
        "security_groups": json_values,
    }).map(lambda d: dict(d, admin_password=secret))
    method_info = st.fixed_dictionaries({}, optional={
        "method": st.one_of(st.sampled_from(COMPUTE_API_METHODS), json_values),
        "method_args": st.one_of(st.tuples(instance_uuids, scalars).map(list), json_values),
        "method_kwargs": json_values,
    })
    return st.fixed_dictionaries({}, optional={
        "instance": nova_objects, "build_inst_kwargs": build, "method_info": method_info,
        "reboot_type": scalars, "delete_type": scalars, "filters": json_values,
        "project_id": scalars, "updated_since": scalars, "deleted": scalars,
        "hypervisor_match": scalars, "admin_state_reset": scalars,
        "clean_shutdown": scalars, "instance_fault": json_values, "responses": json_values,
        "orig_message": scalars,
    }).map(lambda d: dict(d, admin_password=secret))


def _paths(node, depth=0):
    """Every (container, key) in ``node``, for picking what to mangle."""
    out = []
    if depth > 6:
        return out
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((node, key))
            out.extend(_paths(value, depth + 1))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out.append((node, index))
            out.extend(_paths(value, depth + 1))
    return out


TOP_FIELDS = ["message_type", "ctxt", "method_name", "method_kwargs", "direction",
              "need_response", "fanout", "uuid", "routing_path", "hop_count",
              "max_hop_count", "target_cell", "response_uuid"]
TOP_VALUES = {
    "message_type": st.sampled_from(["targeted", "broadcast", "response", "fanout", ""]),
    "direction": st.sampled_from(["down", "down", "up", "sideways"]),
    "routing_path": st.sampled_from(["api", "", "api!cell1", "cell1", "x!y!z", "api!!"]),
    "target_cell": st.sampled_from(["api!cell1", "api!cell1!api", "api!cell2", "cell1",
                                    "api!cell1!leaf!x", "", None, "cell1!api"]),
    "hop_count": st.sampled_from([0, 1, 8, 9, 10, 11, -1, 2 ** 63]),
    "max_hop_count": st.sampled_from([0, 1, 10, 2 ** 63, -3]),
    "need_response": st.booleans(),
    "method_name": st.one_of(st.sampled_from(TARGETED_METHODS + BROADCAST_METHODS),
                             st.text(max_size=20)),
}


@st.composite
def cells_messages(draw):
    """(message text or bytes, the secret it carries)."""
    secret = SECRET_PREFIX + str(draw(st.integers(0, 10 ** 9)))
    if draw(st.booleans()):
        data = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
        holder = data["method_kwargs"].get("build_inst_kwargs", data["method_kwargs"])
        holder["admin_password"] = secret
        if "instances" in holder:       # example 1: build a pool or a brand-new instance
            holder["instances"][0]["nova_object.data"]["uuid"] = draw(
                st.one_of(st.sampled_from(POOL), st.uuids().map(str)))
    else:
        data = copy.deepcopy(EX1)
        data["message_type"] = draw(st.sampled_from(["targeted", "broadcast"]))
        data["method_name"] = draw(TOP_VALUES["method_name"])
        data["method_kwargs"] = draw(_method_kwargs(secret))
        data["direction"] = draw(st.sampled_from(["down"] * 7 + ["up"]))
        data["need_response"] = draw(st.booleans())
    if draw(st.integers(0, 9)):             # now and then a duplicate uuid
        data["uuid"] = str(draw(st.uuids()))

    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["drop", "retype", "field", "field", "object"]))
        if op == "field":
            field = draw(st.sampled_from(sorted(TOP_VALUES)))
            data[field] = draw(TOP_VALUES[field])
            continue
        if op == "object":
            if isinstance(data.get("method_kwargs"), dict):
                data["method_kwargs"]["instance"] = draw(nova_objects)
            continue
        paths = [(c, k) for c, k in _paths(data)
                 if not (k == "admin_password" and op == "retype")]
        if not paths:
            continue
        container, key = draw(st.sampled_from(paths))
        if op == "drop":
            del container[key]
        else:
            container[key] = draw(json_values)

    text = json.dumps(data)
    text_op = draw(st.sampled_from(["none"] * 6 + ["truncate", "bytes", "huge", "deep"]))
    if text_op == "truncate":
        text = text[:draw(st.integers(0, len(text)))]
    elif text_op == "bytes":
        raw = text.encode()
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=16)) + raw[at:], secret
    elif text_op == "huge":
        digits = "9" * draw(st.sampled_from([20, 400, 4400]))
        for field in ('"hop_count": ', '"max_hop_count": ', '"memory_mb": ', '"id": '):
            text = text.replace(field, field + digits, 1)
    elif text_op == "deep":
        depth = draw(st.sampled_from([50, 400, 900, 990, 3000, 100000]))
        nested = "[" * depth + "]" * depth
        text = text.replace('"method_kwargs": {', '"method_kwargs": {"deep": %s, ' % nested, 1)
    return text, secret


@st.composite
def envelopes(draw):
    """An AMQP body around a (mangled) cells message, itself mangled."""
    text, secret = draw(cells_messages())
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    rpc = {"method": "process_message", "args": {"message": text}, "version": "1.0",
           "_unique_id": uuidlib.uuid4().hex}
    rpc.update({"_context_" + k: v for k, v in EX1["ctxt"].items()})
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["drop", "method", "args", "message", "version"]))
        if op == "drop":
            rpc.pop(draw(st.sampled_from(sorted(rpc))), None)
        elif op == "method":
            rpc["method"] = draw(st.one_of(st.sampled_from(["process_message", "cast", ""]),
                                           json_values))
        elif op == "args":
            rpc["args"] = draw(st.one_of(json_values,
                                         st.just({"message": text, "extra": 1})))
        elif op == "message":
            # Not a string: the decoded object, or anything else.
            try:
                rpc["args"] = {"message": draw(st.one_of(st.just(json.loads(text)),
                                                         json_values))}
            except (ValueError, RecursionError):
                rpc["args"] = {"message": draw(json_values)}
        else:
            rpc["version"] = draw(json_values)
    env = {"oslo.version": "2.0", "oslo.message": json.dumps(rpc)}
    env_op = draw(st.sampled_from(["none"] * 4 + ["drop", "retype", "rpc-only"]))
    if env_op == "drop":
        env.pop(draw(st.sampled_from(sorted(env))))
    elif env_op == "retype":
        env[draw(st.sampled_from(sorted(env)))] = draw(json_values)
    elif env_op == "rpc-only":
        env = rpc
    form = draw(st.sampled_from(["dict", "text", "bytes"]))
    if form == "text":
        return json.dumps(env), secret
    if form == "bytes":
        return json.dumps(env).encode(), secret
    return env, secret


# -- the child under fire --------------------------------------------------------------------


@pytest.fixture(scope="module")
def logs():
    """Every log record of the module, at DEBUG, from every thread."""
    handler = ListHandler()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture(scope="module")
def child(tmp_path_factory, logs):
    harness = CellHarness(
        tmp_path_factory.mktemp("fuzz"),
        # Room for every build the fuzz makes, and short calls.
        fake_opts={"ram_mb": 10 ** 9, "disk_gb": 10 ** 9, "vcpus": 10 ** 6},
        cells_opts={"call_timeout": 1},
    ).start()
    yield harness
    harness.stop()


FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=False,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.filter_too_much,
                                            HealthCheck.function_scoped_fixture])


def assert_still_serving(child):
    [uuid] = child.build(1)
    assert child.agent.backend.creates[uuid] == 1
    stats = child.call("compute_node_stats", {}, message_type="broadcast")
    assert len(stats) == 1 and stats[0].failure is False


def assert_no_secret_logged(logs):
    leaks = [text for text in logs.texts() if SECRET_PREFIX in text]
    assert not leaks, "secrets in the log:\n" + "\n".join(leaks[:5])


def test_router_receive_never_raises_on_mangled_messages(child, logs):
    router = child.agent.router
    seen = {"decoded": 0, "dropped": 0}

    @settings(max_examples=1500, **FUZZ_SETTINGS)
    @given(cells_messages())
    def throw(example):
        text, _ = example
        dropped = router.dropped
        router.receive(text)            # must not raise
        seen["dropped" if router.dropped > dropped else "decoded"] += 1

    throw()

    # The fuzz reached both sides: refused messages and messages acted on.
    assert seen["dropped"] > 100 and seen["decoded"] > 100, seen
    wait_for(lambda: sum(child.agent.backend.creates.values()) > 5,
             what="some of the fuzzed builds to reach the backend")
    assert_still_serving(child)
    assert_no_secret_logged(logs)


def test_process_message_never_raises_on_mangled_envelopes(child, logs):
    ep = endpoint.IntercellEndpoint(child.agent.router)
    seen = {"unwrapped": 0, "refused": 0}

    @settings(max_examples=1000, **FUZZ_SETTINGS)
    @given(envelopes())
    def throw(example):
        body, _ = example
        try:
            message = intercell.unwrap_envelope(body)
        except exception.MalformedMessage:
            seen["refused"] += 1
            return
        seen["unwrapped"] += 1
        ep.process_message({}, message)     # must not raise

    throw()

    assert seen["refused"] > 50 and seen["unwrapped"] > 50, seen
    assert_still_serving(child)
    assert_no_secret_logged(logs)


def test_process_message_never_raises_on_any_argument(child, logs):
    ep = endpoint.IntercellEndpoint(child.agent.router)

    @settings(max_examples=500, **FUZZ_SETTINGS)
    @given(st.one_of(json_values, st.binary(max_size=64),
                     cells_messages().map(lambda example: example[0])))
    def throw(message):
        ep.process_message({"is_admin": True}, message)

    throw()

    assert_still_serving(child)
    assert_no_secret_logged(logs)
