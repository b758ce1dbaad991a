"""The cells v1 message codec against the literal examples of the reference.

Every example of section 2.9 (tests/fixtures/wire) must decode as the
receiving cell would decode it, re-encode to the same JSON, and be exactly
what this agent itself produces for the same content. Section numbers refer
to shared/reference/cells-v1-protocol.md.
"""

import concurrent.futures
import datetime
import json
import re

import pytest

from cellagent import exception
from cellagent.rpc import intercell
from cellagent.rpc import neighbours
from cellagent.rpc import parent_api
from tests.unit.helpers import wire
from tests.unit.helpers import wire_text

TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
INSTANCE_UUID = "9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"
CALL_UUID = "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9"

# The failure entry quoted in the text after example 5 (abbreviated values).
REFERENCE_FAILURE_ENTRY = json.dumps({
    "cell_name": "api!cell1", "failure": True,
    "value": json.dumps({
        "class": "InstanceNotFound", "module": "nova.exception",
        "message": "Instance 9a1b… could not be found.", "tb": ["Traceback …"],
        "args": [], "kwargs": {"instance_id": "9a1b…", "code": 404}})})


def example3():
    """Example 3 is a fragment: example 2's envelope with other method and kwargs."""
    full = wire(2)
    full.update(wire(3))
    return full


def example_text(number):
    return json.dumps(example3()) if number == 3 else wire_text(number)


def example(number):
    return example3() if number == 3 else wire(number)


def example5_original():
    """The call example 5 answers, as the API cell put it on the wire (text of ex. 5)."""
    return {
        "message_type": "targeted", "ctxt": wire(5)["ctxt"],
        "method_name": "run_compute_api_method",
        "method_kwargs": {"method_info": {
            "method": "get_console_output", "method_args": [INSTANCE_UUID, 50],
            "method_kwargs": {}}},
        "direction": "down", "need_response": True, "fanout": False,
        "uuid": CALL_UUID, "routing_path": "api", "hop_count": 1, "max_hop_count": 10,
        "target_cell": "api!cell1",
    }


class RecordingTransports:
    """Stands in for ``transport.Transports``: records instead of publishing."""

    def __init__(self):
        self.sent = []      # (transport_url, Message)

    def publisher(self, url):
        sent = self.sent

        class Publisher:
            def publish(self, msg, base):
                sent.append((url, msg))
                future = concurrent.futures.Future()
                future.set_result(True)
                return future

        return Publisher()


def child_api(parents=("api",)):
    """A ParentAPI of cell ``cell1`` whose parents are ``parents``."""
    records = {name: neighbours.CellRecord(name, "fake:///%s" % name, is_parent=True)
               for name in parents}
    transports = RecordingTransports()
    sender = parent_api.IntercellSender("cell1", neighbours.Neighbours(records=records),
                                        transports, "cells.intercell", 10)
    return parent_api.ParentAPI(sender), transports


def assert_fresh_admin_ctxt(ctxt, expected):
    """Same keys and values as ``expected`` except request_id and timestamp."""
    assert set(ctxt) == set(expected)
    for key in set(expected) - {"request_id", "timestamp"}:
        assert ctxt[key] == expected[key], key
    datetime.datetime.strptime(ctxt["timestamp"], TS_FORMAT)
    assert ctxt["request_id"].startswith("req-")
    assert UUID_RE.match(ctxt["request_id"][4:])


# -- round trip of every literal example (2.9) -----------------------------------

# example, receiving cell, path after receipt, destination reached?
RECEIVERS = [
    (1, "cell1", "api!cell1", True),
    (2, "api", "cell1!api", True),
    (3, "api", "cell1!api", True),
    (4, "api", "cell1!api", False),      # a broadcast has no target
    (5, "api", "cell1!api", True),
]


@pytest.mark.parametrize("number,receiver,path,local", RECEIVERS)
def test_example_decodes_as_the_receiving_cell_sees_it(number, receiver, path, local):
    msg = intercell.decode(example_text(number), receiver)

    original = example(number)
    assert msg.routing_path == path
    assert msg.hop_count == original["hop_count"] + 1 == 2
    assert msg.is_local_target is local
    assert not msg.source_is_us
    assert msg.origin == original["routing_path"]


@pytest.mark.parametrize("number,receiver,path,local", RECEIVERS)
def test_example_reencodes_to_the_same_json_but_for_path_and_hops(number, receiver, path,
                                                                  local):
    original = example(number)
    again = intercell.decode(example_text(number), receiver).to_dict()

    assert again.pop("routing_path") == path
    assert again.pop("hop_count") == 2
    original.pop("routing_path")
    original.pop("hop_count")
    assert again == original
    # And the text survives a JSON round trip unchanged.
    assert json.loads(json.dumps(again)) == original


def test_new_targeted_message_has_example1_keys_and_content():
    ex = wire(1)
    msg = intercell.new_message("api", "targeted", "build_instances", ex["method_kwargs"],
                                "down", ctxt=ex["ctxt"], target_cell="api!cell1")
    out = msg.to_dict()

    assert set(out) == set(ex)
    assert "response_uuid" not in out
    assert UUID_RE.match(out.pop("uuid"))
    ex.pop("uuid")
    assert out == ex


def test_new_broadcast_message_has_example4_keys_and_no_target_cell():
    ex = wire(4)
    msg = intercell.new_message("cell1", "broadcast", "instance_update_at_top",
                                ex["method_kwargs"], "up", ctxt=ex["ctxt"])
    out = msg.to_dict()

    assert set(out) == set(ex)
    assert "target_cell" not in out and "response_uuid" not in out
    out.pop("uuid")
    ex.pop("uuid")
    assert out == ex


def test_new_response_message_has_example5_keys_including_response_uuid():
    ex = wire(5)
    msg = intercell.new_message("cell1", "response", "parse_responses", ex["method_kwargs"],
                                "up", ctxt=ex["ctxt"], target_cell="cell1!api",
                                fanout=True, response_uuid=CALL_UUID)
    out = msg.to_dict()

    assert set(out) == set(ex)
    assert out["response_uuid"] == CALL_UUID
    out.pop("uuid")
    ex.pop("uuid")
    assert out == ex


def test_new_message_refuses_unknown_type_or_direction():
    with pytest.raises(ValueError):
        intercell.new_message("cell1", "multicast", "m", {}, "up")
    with pytest.raises(ValueError):
        intercell.new_message("cell1", "targeted", "m", {}, "sideways", target_cell="x")


# -- what this child sends up, compared with examples 2, 3 and 4 ---------------------


def test_update_capacities_is_example2():
    ex = wire(2)
    api, transports = child_api()

    futures = api.update_capacities(ex["method_kwargs"]["capacities"])

    assert len(futures) == 1 and futures[0].result() is True
    [(url, msg)] = transports.sent
    assert url == "fake:///api"
    out = msg.to_dict()
    assert set(out) == set(ex)
    assert UUID_RE.match(out["uuid"])
    assert_fresh_admin_ctxt(out["ctxt"], ex["ctxt"])
    for key in set(ex) - {"uuid", "ctxt"}:
        assert out[key] == ex[key], key
    assert (out["message_type"], out["direction"], out["fanout"], out["target_cell"]) == \
        ("targeted", "up", True, "cell1!api")


def test_update_capabilities_is_example3():
    ex = example3()
    api, transports = child_api()
    # What [cells] capabilities = hypervisor=xenserver;kvm, os=linux;windows gives.
    api.update_capabilities({"hypervisor": {"xenserver", "kvm"}, "os": {"linux", "windows"}})

    [(_, msg)] = transports.sent
    out = msg.to_dict()
    assert set(out) == set(ex)
    assert_fresh_admin_ctxt(out["ctxt"], ex["ctxt"])
    for key in set(ex) - {"uuid", "ctxt", "method_kwargs"}:
        assert out[key] == ex[key], key
    # Nova sends a set as a list in no particular order: compare the members.
    kwargs = out["method_kwargs"]
    assert kwargs["cell_name"] == "cell1"
    assert {k: sorted(v) for k, v in kwargs["capabilities"].items()} == \
        {k: sorted(v) for k, v in ex["method_kwargs"]["capabilities"].items()}
    assert (out["message_type"], out["direction"], out["fanout"], out["target_cell"]) == \
        ("targeted", "up", True, "cell1!api")


def test_reports_go_to_every_parent_each_with_its_own_target():
    api, transports = child_api(parents=("api", "api2"))

    api.update_capacities(wire(2)["method_kwargs"]["capacities"])

    sent = sorted((url, msg.target_cell) for url, msg in transports.sent)
    assert sent == [("fake:///api", "cell1!api"), ("fake:///api2", "cell1!api2")]
    assert len({msg.uuid for _, msg in transports.sent}) == 2


def test_instance_update_at_top_is_example4_a_broadcast_up_without_target():
    ex = wire(4)
    api, transports = child_api()

    api.instance_update_at_top(ex["method_kwargs"]["instance"], ctxt=ex["ctxt"])

    [(_, msg)] = transports.sent
    out = msg.to_dict()
    assert set(out) == set(ex)
    assert "target_cell" not in out
    assert (out["message_type"], out["direction"], out["fanout"], out["need_response"]) == \
        ("broadcast", "up", False, False)
    out.pop("uuid")
    ex.pop("uuid")
    assert out == ex


def test_destroy_and_fault_are_broadcasts_up_too():
    api, transports = child_api()
    api.instance_destroy_at_top(intercell.obj_primitive("Instance", {"uuid": INSTANCE_UUID}))
    api.instance_fault_create_at_top({"instance_uuid": INSTANCE_UUID, "code": 500})

    methods = [(m.method_name, m.message_type, m.direction, m.fanout, m.target_cell)
               for _, m in transports.sent]
    assert methods == [
        ("instance_destroy_at_top", "broadcast", "up", False, None),
        ("instance_fault_create_at_top", "broadcast", "up", False, None),
    ]


# -- responses (example 5, 2.5) ---------------------------------------------------------


def test_response_to_example5_call_is_example5():
    ex = wire(5)
    orig = intercell.decode(json.dumps(example5_original()), "cell1")
    assert orig.routing_path == "api!cell1" and orig.is_local_target
    console = json.loads(ex["method_kwargs"]["responses"][0])["value"]

    resp = intercell.make_response(orig, "cell1", [intercell.Response("api!cell1", console)])

    out = resp.to_dict()
    assert set(out) == set(ex)
    assert UUID_RE.match(out["uuid"]) and out["uuid"] != CALL_UUID
    assert out["response_uuid"] == CALL_UUID
    assert out["target_cell"] == "cell1!api"
    assert out["fanout"] is True
    for key in set(ex) - {"uuid", "method_kwargs"}:
        assert out[key] == ex[key], key
    # orig_message: the complete original as the replier saw it (path includes cell1).
    seen = json.loads(out["method_kwargs"]["orig_message"])
    assert seen == orig.to_dict()
    abbreviated = json.loads(ex["method_kwargs"]["orig_message"])
    abbreviated.pop("...")
    assert {k: seen[k] for k in abbreviated} == abbreviated
    # responses: JSON strings of {cell_name, value, failure}, like the example's.
    assert all(isinstance(r, str) for r in out["method_kwargs"]["responses"])
    assert [json.loads(r) for r in out["method_kwargs"]["responses"]] == \
        [json.loads(r) for r in ex["method_kwargs"]["responses"]]


def test_response_of_example5_parses_back_into_the_console_text():
    msg = intercell.decode(wire_text(5), "api")
    [resp] = intercell.parse_response_list(msg)
    assert resp.cell_name == "api!cell1"
    assert resp.failure is False
    assert resp.value.startswith("[    0.000000] Linux version")
    assert resp.failure_info() is None


def test_response_to_a_broadcast_goes_one_hop_back_with_fanout():
    orig = intercell.decode(json.dumps({
        "message_type": "broadcast", "ctxt": {}, "method_name": "service_get_all",
        "method_kwargs": {"filters": {}}, "direction": "down", "need_response": True,
        "routing_path": "api!region", "hop_count": 2}), "cell1")

    resp = intercell.make_response(orig, "cell1", [intercell.Response("api!region!cell1", [])])

    assert resp.target_cell == "cell1!region"
    assert resp.fanout is True
    assert resp.direction == "up"
    assert "target_cell" in resp.to_dict() and "response_uuid" in resp.to_dict()


def test_response_to_a_deep_targeted_call_goes_straight_back_without_fanout():
    orig = intercell.decode(json.dumps({
        "message_type": "targeted", "ctxt": {}, "method_name": "get_migrations",
        "method_kwargs": {}, "direction": "down", "need_response": True,
        "routing_path": "api!region", "hop_count": 2, "target_cell": "api!region!cell1"}),
        "cell1")

    resp = intercell.make_response(orig, "cell1", [intercell.Response("api!region!cell1", [])])

    assert resp.target_cell == "cell1!region!api"
    assert resp.fanout is False          # the last hop (region) switches it on


def test_failure_response_has_the_reference_shape():
    exc = exception.InstanceNotFound(instance_id=INSTANCE_UUID)

    entry = json.loads(intercell.Response.from_exception("api!cell1", exc).to_json())

    reference = json.loads(REFERENCE_FAILURE_ENTRY)
    assert set(entry) == set(reference)
    assert entry["failure"] is True and entry["cell_name"] == "api!cell1"
    assert isinstance(entry["value"], str)
    value = json.loads(entry["value"])
    ref_value = json.loads(reference["value"])
    assert set(value) == set(ref_value)
    assert {k: type(v) for k, v in value.items()} == {k: type(v) for k, v in ref_value.items()}
    assert value["class"] == "InstanceNotFound"
    assert value["module"] == "nova.exception"
    assert value["message"] == "Instance %s could not be found." % INSTANCE_UUID
    assert value["tb"] and all(isinstance(line, str) for line in value["tb"])
    assert value["args"] == []
    assert value["kwargs"] == {"instance_id": INSTANCE_UUID, "code": 404}


def test_failure_response_round_trips_through_a_parse_responses_message():
    exc = exception.InstanceNotFound(instance_id=INSTANCE_UUID)
    orig = intercell.decode(json.dumps(example5_original()), "cell1")
    msg = intercell.make_response(orig, "cell1",
                                  [intercell.Response.from_exception("api!cell1", exc)])

    [resp] = intercell.parse_response_list(intercell.decode(msg.to_json(), "api"))

    assert resp.failure is True
    info = resp.failure_info()
    assert (info["class"], info["module"], info["kwargs"]["code"]) == \
        ("InstanceNotFound", "nova.exception", 404)


@pytest.mark.parametrize("exc,module", [
    (exception.CellRoutingInconsistency(reason="x"), "nova.exception"),
    (exception.CellMaxHopCountReached(hop_count=10), "nova.exception"),
    (exception.CellServiceAPIMethodNotFound(method_name="frob"), "nova.exception"),
    (exception.UnknownMethod(message_type="targeted", method_name="frob"),
     "cellagent.exception"),
    (ValueError("boom"), "builtins"),
])
def test_failure_module_tells_the_api_cell_which_classes_it_knows(exc, module):
    value = intercell.failure_value(exc)
    assert value["class"] == type(exc).__name__
    assert value["module"] == module
    json.dumps(value)       # always serializable


@pytest.mark.parametrize("text", ["not json", "[]", json.dumps({"value": 1}), "null"])
def test_bad_response_entry_is_malformed(text):
    with pytest.raises(exception.MalformedMessage):
        intercell.Response.from_json(text)


# -- the oslo.messaging envelope (1.5) -------------------------------------------------


def _ctxt_of(number):
    return wire(number)["ctxt"]


@pytest.mark.parametrize("number", [1, 2])
def test_envelope_has_the_oslo_keys_and_the_rpc_dict_of_section_1_5(number):
    rpc_keys = set(wire("envelope_1.json"))
    msg = intercell.new_message("cell1", "targeted", "update_capacities", {}, "up",
                                ctxt=_ctxt_of(number), target_cell="cell1!api", fanout=True)

    env = intercell.envelope(msg)

    assert set(env) == set(wire("envelope_0.json")) == {"oslo.version", "oslo.message"}
    assert env["oslo.version"] == "2.0"
    assert isinstance(env["oslo.message"], str)
    rpc = json.loads(env["oslo.message"])
    assert set(rpc) == rpc_keys
    assert rpc["method"] == "process_message"
    assert rpc["version"] == "1.0"
    assert set(rpc["args"]) == {"message"}
    assert isinstance(rpc["args"]["message"], str)
    assert json.loads(rpc["args"]["message"]) == msg.to_dict()
    assert re.match(r"^[0-9a-f]{32}$", rpc["_unique_id"])
    for key, value in msg.ctxt.items():
        assert rpc["_context_" + key] == value
    assert not {"namespace", "_msg_id", "_reply_q"} & set(rpc)


def test_envelope_of_the_reference_context_is_envelope_1():
    expected = wire("envelope_1.json")
    ctxt = {k[len("_context_"):]: v for k, v in expected.items() if k.startswith("_context_")}
    msg = intercell.new_message("cell1", "targeted", "update_capacities", {}, "up",
                                ctxt=ctxt, target_cell="cell1!api", fanout=True)

    rpc = json.loads(intercell.envelope(msg, unique_id=expected["_unique_id"])["oslo.message"])

    rpc["args"]["message"] = expected["args"]["message"]    # a placeholder there
    assert rpc == expected


def test_unwrap_envelope_gives_back_the_message_string():
    msg = intercell.new_message("cell1", "broadcast", "instance_update_at_top",
                                wire(4)["method_kwargs"], "up", ctxt=_ctxt_of(4))
    env = intercell.envelope(msg)

    assert intercell.unwrap_envelope(env) == msg.to_json()
    assert intercell.unwrap_envelope(json.dumps(env)) == msg.to_json()
    assert intercell.unwrap_envelope(json.dumps(env).encode()) == msg.to_json()
    assert intercell.unwrap_envelope(json.loads(env["oslo.message"])) == msg.to_json()
    assert intercell.decode(intercell.unwrap_envelope(env), "api").to_dict()["uuid"] == msg.uuid


@pytest.mark.parametrize("body", [
    "not json", 5, None, [1, 2], {}, {"oslo.message": "{"}, {"oslo.message": 5},
    {"method": "other_method", "args": {"message": "{}"}},
    {"method": "process_message"}, {"method": "process_message", "args": "x"},
])
def test_unwrap_envelope_rejects_bad_bodies(body):
    with pytest.raises(exception.MalformedMessage):
        intercell.unwrap_envelope(body)


@pytest.mark.parametrize("body", ["[" * 100000, {"oslo.message": "[" * 100000}])
def test_unwrap_envelope_rejects_deeply_nested_json(body):
    with pytest.raises(exception.MalformedMessage):
        intercell.unwrap_envelope(body)


# -- routing (2.2, 2.3) -----------------------------------------------------------------


def _at(path, target, hop_count=2, max_hop_count=10):
    return intercell.Message("targeted", {}, "m", {}, "down", routing_path=path,
                             hop_count=hop_count, max_hop_count=max_hop_count,
                             target_cell=target)


@pytest.mark.parametrize("path,target,expected", [
    ("api", "api!cell1", "cell1"),
    ("api!region", "api!region!cell1", "cell1"),
    ("api!region", "api!region!cell1!leaf", "cell1"),
    ("cell1", "cell1!api", "api"),
])
def test_next_hop_is_the_next_name_of_a_target_that_continues_the_path(path, target,
                                                                       expected):
    assert intercell.next_hop_name(_at(path, target)) == expected


def test_no_next_hop_at_the_destination():
    msg = _at("api!cell1", "api!cell1")
    assert msg.is_local_target
    assert intercell.next_hop_name(msg) is None


@pytest.mark.parametrize("path,target", [
    ("api!cell1", "api!cell2"),            # sibling
    ("api!cell1", "api!cell2!leaf"),       # diverges in the middle
    ("api!cell1", "api"),                  # behind us
    ("api!cell1", "other!cell1!leaf"),     # another tree
    ("api!cell1", "api!cell1x"),           # prefix of a name is not a name
    ("api!cell1", ""),
    ("api!cell1", None),                   # null target
])
def test_target_that_does_not_continue_the_path_is_a_routing_inconsistency(path, target):
    with pytest.raises(exception.CellRoutingInconsistency):
        intercell.next_hop_name(_at(path, target))


def test_hop_count_below_the_limit_may_be_forwarded():
    intercell.check_hop_count(_at("api!cell1", "api!cell1!leaf", hop_count=9))


@pytest.mark.parametrize("hop_count", [10, 11])
def test_hop_count_at_the_limit_stops_the_message(hop_count):
    with pytest.raises(exception.CellMaxHopCountReached) as err:
        intercell.check_hop_count(_at("api!cell1", "api!cell1!leaf", hop_count=hop_count))
    assert err.value.kwargs["hop_count"] == hop_count


def test_forward_copy_is_a_separate_message_with_the_same_view():
    msg = _at("api!cell1", "api!cell1!leaf")
    fwd = intercell.forward_copy(msg)
    assert fwd == msg and fwd is not msg
    fwd.fanout = True
    assert msg.fanout is False


def test_reverse_path():
    assert intercell.reverse_path("api!region!cell1") == "cell1!region!api"
    assert intercell.reverse_path("cell1") == "cell1"


def test_decode_fills_protocol_defaults_for_optional_fields():
    msg = intercell.decode(json.dumps({
        "message_type": "broadcast", "ctxt": {}, "method_name": "sync_instances",
        "method_kwargs": {}, "direction": "down"}), "cell1", default_max_hop_count=7)
    assert (msg.routing_path, msg.hop_count, msg.max_hop_count) == ("cell1", 1, 7)
    assert msg.need_response is False and msg.fanout is False
    assert UUID_RE.match(msg.uuid)
    assert msg.source_is_us


# -- decode rejects malformed input (2.1, 2.7) ----------------------------------------------


def _ex1(**changes):
    data = wire(1)
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data)


_DROP = object()


@pytest.mark.parametrize("text", [
    "", "{", "not json", "{'single': 'quotes'}", "[" * 100000,
    b"\xff\xfe\x00garbage",
], ids=["empty", "truncated", "words", "python-repr", "deep", "not-utf8"])
def test_decode_rejects_what_is_not_json(text):
    with pytest.raises(exception.MalformedMessage):
        intercell.decode(text, "cell1")


@pytest.mark.parametrize("text", ["[]", "42", "null", '"a string"', "true"])
def test_decode_rejects_json_that_is_not_an_object(text):
    with pytest.raises(exception.MalformedMessage):
        intercell.decode(text, "cell1")


@pytest.mark.parametrize("value", [None, 42, {"message_type": "targeted"}, ["x"]])
def test_decode_rejects_a_message_argument_that_is_not_a_string(value):
    with pytest.raises(exception.MalformedMessage):
        intercell.decode(value, "cell1")


def test_decode_accepts_utf8_bytes():
    assert intercell.decode(wire_text(1).encode(), "cell1").routing_path == "api!cell1"


@pytest.mark.parametrize("field", ["message_type", "ctxt", "method_name", "method_kwargs",
                                   "direction"])
def test_decode_rejects_a_missing_required_field(field):
    with pytest.raises(exception.MalformedMessage) as err:
        intercell.decode(_ex1(**{field: _DROP}), "cell1")
    assert field in err.value.message


@pytest.mark.parametrize("field,value", [
    ("message_type", 1), ("message_type", None),
    ("ctxt", []), ("ctxt", "admin"), ("ctxt", None),
    ("method_name", 7), ("method_name", None), ("method_name", ""),
    ("method_kwargs", []), ("method_kwargs", "x"), ("method_kwargs", None),
    ("direction", 1), ("direction", None),
    ("need_response", "yes"), ("need_response", 1),
    ("fanout", "true"), ("fanout", 0),
    ("uuid", 5), ("uuid", ["u"]),
    ("routing_path", 5), ("routing_path", ["api"]),
    ("hop_count", "1"), ("hop_count", True), ("hop_count", 1.5), ("hop_count", -1),
    ("max_hop_count", "10"), ("max_hop_count", False), ("max_hop_count", 1e400),
    ("target_cell", 5), ("target_cell", ["api", "cell1"]),
])
def test_decode_rejects_a_field_of_the_wrong_type(field, value):
    with pytest.raises(exception.MalformedMessage):
        intercell.decode(_ex1(**{field: value}), "cell1")


@pytest.mark.parametrize("field,value", [
    ("message_type", "fanout"), ("message_type", "TARGETED"),
    ("direction", "sideways"), ("direction", "Up"),
])
def test_decode_rejects_unknown_message_type_or_direction(field, value):
    with pytest.raises(exception.MalformedMessage):
        intercell.decode(_ex1(**{field: value}), "cell1")


def test_decode_rejects_targeted_without_target_cell():
    with pytest.raises(exception.MalformedMessage) as err:
        intercell.decode(_ex1(target_cell=_DROP), "cell1")
    assert "target_cell" in err.value.message


def test_decode_rejects_response_without_target_cell_or_response_uuid():
    no_target = wire(5)
    no_target.pop("target_cell")
    no_uuid = wire(5)
    no_uuid.pop("response_uuid")
    bad_uuid = dict(wire(5), response_uuid=5)
    for data in (no_target, no_uuid, bad_uuid):
        with pytest.raises(exception.MalformedMessage):
            intercell.decode(json.dumps(data), "api")


def test_decode_accepts_a_null_target_and_leaves_routing_to_refuse_it():
    msg = intercell.decode(_ex1(target_cell=None), "cell1")
    assert msg.target_cell is None
    with pytest.raises(exception.CellRoutingInconsistency):
        intercell.next_hop_name(msg)


@pytest.mark.parametrize("timestamp", [
    "2019-06-03T10:15:42",                # no microseconds
    "2019-06-03 10:15:42.123456",         # space
    "2019-06-03T10:15:42.123456Z",        # zone suffix
    "yesterday", 1559556942, ["2019"],
])
def test_decode_rejects_a_ctxt_timestamp_nova_cannot_parse(timestamp):
    data = wire(1)
    data["ctxt"]["timestamp"] = timestamp
    with pytest.raises(exception.MalformedMessage):
        intercell.decode(json.dumps(data), "cell1")


def test_decode_accepts_a_ctxt_subset_and_a_missing_timestamp():
    data = wire(1)
    data["ctxt"] = {"is_admin": True}
    assert intercell.decode(json.dumps(data), "cell1").ctxt == {"is_admin": True}


def test_decode_rejects_ctxt_roles_that_are_not_a_list():
    data = wire(1)
    data["ctxt"]["roles"] = "admin"
    with pytest.raises(exception.MalformedMessage):
        intercell.decode(json.dumps(data), "cell1")


def test_decode_accepts_and_ignores_unknown_extra_keys():
    data = wire(1)
    data["from_the_future"] = {"x": [1, 2]}
    data["_unique_id"] = "abc"

    msg = intercell.decode(json.dumps(data), "cell1")

    assert msg.method_name == "build_instances"
    assert "from_the_future" not in msg.to_dict()


def test_public_context_hides_the_token_and_catalog():
    safe = intercell.public_context(wire(1)["ctxt"])
    assert safe["auth_token"] == "***"
    assert "service_catalog" not in safe
    assert safe["user_name"] == "alice"


def test_admin_context_has_the_full_key_set_of_2_7():
    ctxt = intercell.admin_context()
    assert set(ctxt) == set(intercell.CONTEXT_KEYS) == set(wire(2)["ctxt"])
    assert_fresh_admin_ctxt(ctxt, wire(2)["ctxt"])


# -- Nova object primitives (2.8) --------------------------------------------------------------


def test_obj_primitive_omits_empty_changes():
    prim = intercell.obj_primitive("Instance", {"uuid": INSTANCE_UUID}, changes=[])
    assert "nova_object.changes" not in prim
    assert prim == {"nova_object.name": "Instance", "nova_object.namespace": "nova",
                    "nova_object.version": "2.4",
                    "nova_object.data": {"uuid": INSTANCE_UUID}}


def test_obj_primitive_sorts_and_dedups_changes():
    prim = intercell.obj_primitive("Instance", {}, ["vm_state", "task_state", "launched_at",
                                                    "power_state", "vm_state"])
    assert prim["nova_object.changes"] == ["launched_at", "power_state", "task_state",
                                           "vm_state"]


def test_obj_primitive_of_example4_is_example4():
    ex = wire(4)["method_kwargs"]["instance"]
    prim = intercell.obj_primitive("Instance", ex["nova_object.data"],
                                   reversed(ex["nova_object.changes"]))
    assert prim == ex


def test_obj_primitive_versions_are_stein_ones():
    assert intercell.obj_primitive("Flavor", {})["nova_object.version"] == "1.2"
    assert intercell.obj_primitive("Unknown", {})["nova_object.version"] == "1.0"
    assert intercell.obj_primitive("Instance", {}, version="2.3")["nova_object.version"] == \
        "2.3"


def test_obj_data_returns_data_and_changes():
    data, changes = intercell.obj_data(wire(4)["method_kwargs"]["instance"], "Instance")
    assert data["uuid"] == INSTANCE_UUID
    assert changes == ["launched_at", "power_state", "task_state", "vm_state"]


def test_obj_data_takes_a_plain_dict_as_data():
    assert intercell.obj_data({"uuid": INSTANCE_UUID}, "Instance") == \
        ({"uuid": INSTANCE_UUID}, [])


@pytest.mark.parametrize("version", ["2.0", "2.3", "2.4"])
def test_obj_data_accepts_same_major(version):
    prim = intercell.obj_primitive("Instance", {"uuid": "u"}, version=version)
    assert intercell.obj_data(prim, "Instance")[0] == {"uuid": "u"}


def test_obj_data_rejects_the_wrong_object_name():
    flavor = wire(1)["method_kwargs"]["build_inst_kwargs"]["filter_properties"]["instance_type"]
    with pytest.raises(exception.MalformedMessage):
        intercell.obj_data(flavor, "Instance")


@pytest.mark.parametrize("version", ["3.0", "4.1"])
def test_obj_data_rejects_a_newer_major_version(version):
    prim = intercell.obj_primitive("Instance", {"uuid": "u"}, version=version)
    with pytest.raises(exception.UnsupportedVersion):
        intercell.obj_data(prim, "Instance")


@pytest.mark.parametrize("data", [None, [], "uuid", 5])
def test_obj_data_rejects_data_that_is_not_an_object(data):
    prim = intercell.obj_primitive("Instance", {})
    prim["nova_object.data"] = data
    with pytest.raises(exception.MalformedMessage):
        intercell.obj_data(prim, "Instance")


def test_obj_data_rejects_a_missing_data_key():
    prim = intercell.obj_primitive("Instance", {})
    del prim["nova_object.data"]
    with pytest.raises(exception.MalformedMessage):
        intercell.obj_data(prim, "Instance")


@pytest.mark.parametrize("changes", ["vm_state", {"vm_state": 1}, 5])
def test_obj_data_rejects_changes_that_are_not_a_list(changes):
    prim = intercell.obj_primitive("Instance", {"uuid": "u"})
    prim["nova_object.changes"] = changes
    with pytest.raises(exception.MalformedMessage):
        intercell.obj_data(prim, "Instance")


@pytest.mark.parametrize("value", [None, 5, "Instance", ["uuid"]])
def test_obj_data_rejects_values_that_are_no_object_at_all(value):
    with pytest.raises(exception.MalformedMessage):
        intercell.obj_data(value, "Instance")


def test_obj_data_rejects_a_name_that_is_not_a_string():
    with pytest.raises(exception.MalformedMessage):
        intercell.obj_data({"nova_object.name": ["Instance"], "nova_object.data": {}})


def test_obj_list_items_of_example1_networks():
    networks = wire(1)["method_kwargs"]["build_inst_kwargs"]["requested_networks"]

    [item] = intercell.obj_list_items(networks, "NetworkRequest")

    data, changes = intercell.obj_data(item, "NetworkRequest")
    assert data["network_id"] == "3e4f5a6b-7c8d-4e9f-a0b1-c2d3e4f5a6b7"
    assert changes == ["address", "network_id", "port_id", "tag"]


def test_obj_list_items_of_example1_block_device_mappings():
    bdms = wire(1)["method_kwargs"]["build_inst_kwargs"]["block_device_mapping"]
    [item] = intercell.obj_list_items(bdms, "BlockDeviceMapping")
    assert intercell.obj_data(item, "BlockDeviceMapping")[0]["boot_index"] == 0


def test_obj_list_items_accepts_none_and_plain_lists():
    assert intercell.obj_list_items(None, "NetworkRequest") == []
    assert intercell.obj_list_items([{"network_id": "n"}], "NetworkRequest") == \
        [{"network_id": "n"}]
    empty = intercell.obj_primitive("NetworkRequestList", {})
    assert intercell.obj_list_items(empty, "NetworkRequest") == []


def test_obj_list_items_rejects_wrong_list_shapes():
    bad_objects = intercell.obj_primitive("NetworkRequestList", {"objects": {"a": 1}})
    with pytest.raises(exception.MalformedMessage):
        intercell.obj_list_items(bad_objects, "NetworkRequest")
    wrong_list = intercell.obj_primitive("SecurityGroupList", {"objects": []})
    with pytest.raises(exception.MalformedMessage):
        intercell.obj_list_items(wrong_list, "NetworkRequest")
    with pytest.raises(exception.MalformedMessage):
        intercell.obj_list_items("net-1", "NetworkRequest")


def test_context_and_object_timestamps_use_their_own_formats():
    when = datetime.datetime(2019, 6, 3, 10, 17, 5, 42)
    assert intercell.format_timestamp(when) == "2019-06-03T10:17:05.000042"
    assert intercell.format_obj_datetime(when) == "2019-06-03T10:17:05Z"
    datetime.datetime.strptime(intercell.format_timestamp(), TS_FORMAT)


def test_describe_never_shows_ctxt_or_kwargs():
    msg = intercell.decode(wire_text(1), "cell1")
    line = msg.describe()
    assert msg.uuid in line and "build_instances" in line
    assert "Qx7pL2vN9sTz" not in line and "gAAAAAB" not in line
