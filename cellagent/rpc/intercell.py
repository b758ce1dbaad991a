"""The nova cells v1 inter-cell message, as Nova Stein put it on the wire.

One inter-cell cast is an oslo.messaging RPC cast of ``process_message`` whose
single argument ``message`` is a JSON *string*: the cells message. This module
turns that string into a :class:`Message` and back, extends the routing path
as every cell does on receipt, computes next hops, and builds and parses the
``parse_responses`` replies and the Nova object primitives carried inside.
Section numbers refer to shared/reference/cells-v1-protocol.md.

Nothing here does I/O or reads configuration.
"""

import dataclasses
import datetime
import re
import traceback

from cellagent import exception
from cellagent import jsonutils
from cellagent import uuidutils

MESSAGE_TYPES = ("targeted", "broadcast", "response")
DIRECTIONS = ("up", "down")
PATH_SEP = "!"
ITEM_SEP = "@"
RPC_METHOD = "process_message"
RPC_VERSION = "1.0"
ENVELOPE_VERSION = "2.0"
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"       # oslo.context / nova RequestContext
OBJ_DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"      # oslo.versionedobjects DateTime
# TIMESTAMP_FORMAT with every field at full width, ASCII digits only.
_TIMESTAMP_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}\Z")

# The newest object versions a Rocky/Stein cell accepts (section 2.8).
OBJECT_VERSIONS = {
    "Instance": "2.4",
    "InstanceList": "2.4",
    "Flavor": "1.2",
    "InstanceInfoCache": "1.5",
    "InstanceFault": "1.2",
    "BlockDeviceMapping": "1.20",
    "BlockDeviceMappingList": "1.17",
    "SecurityGroup": "1.2",
    "SecurityGroupList": "1.1",
    "Service": "1.22",
    "ServiceList": "1.19",
    "ComputeNode": "1.18",
    "ComputeNodeList": "1.17",
    "Migration": "1.5",
    "MigrationList": "1.4",
    "NetworkRequest": "1.2",
    "NetworkRequestList": "1.1",
    "KeyPair": "1.4",
}

_REQUIRED = {
    "message_type": str, "ctxt": dict, "method_name": str,
    "method_kwargs": dict, "direction": str,
}
_OPTIONAL = {
    "need_response": bool, "fanout": bool, "uuid": str, "routing_path": str,
    "hop_count": int, "max_hop_count": int, "target_cell": (str, type(None)),
    "response_uuid": str,
}
# Keys of RequestContext.to_dict() with oslo.context 2.22 plus nova's (2.7).
CONTEXT_KEYS = (
    "user", "tenant", "system_scope", "project", "domain", "user_domain",
    "project_domain", "is_admin", "read_only", "show_deleted", "auth_token",
    "request_id", "global_request_id", "resource_uuid", "roles", "user_identity",
    "is_admin_project", "user_id", "project_id", "read_deleted", "remote_address",
    "timestamp", "quota_class", "user_name", "service_catalog", "project_name",
)


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def format_timestamp(when=None):
    """Context timestamp: ``%Y-%m-%dT%H:%M:%S.%f`` (microseconds required)."""
    return (when or utcnow()).strftime(TIMESTAMP_FORMAT)


def format_obj_datetime(when=None):
    """Object date-time field: ISO-8601 with a ``Z`` (section 2.8)."""
    return (when or utcnow()).strftime(OBJ_DATETIME_FORMAT)


def admin_context(request_id=None, timestamp=None):
    """The admin context Nova sends for periodic messages (example 2)."""
    return {
        "user": None, "tenant": None, "system_scope": None, "project": None,
        "domain": None, "user_domain": None, "project_domain": None,
        "is_admin": True, "read_only": False, "show_deleted": False,
        "auth_token": None,
        "request_id": request_id or "req-" + uuidutils.generate_uuid(),
        "global_request_id": None, "resource_uuid": None, "roles": [],
        "user_identity": "- - - - -", "is_admin_project": True,
        "user_id": None, "project_id": None, "read_deleted": "no",
        "remote_address": None, "timestamp": format_timestamp(timestamp),
        "quota_class": None, "user_name": None, "service_catalog": [],
        "project_name": None,
    }


def check_context(ctxt):
    """Raise MalformedMessage unless ``ctxt`` decodes as Nova would decode it.

    ``RequestContext.from_dict`` reads every key with ``get`` so any subset is
    fine, but a string timestamp must parse with the fixed format.
    """
    ts = ctxt.get("timestamp")
    if ts is not None:
        if not isinstance(ts, str):
            raise exception.MalformedMessage(reason="ctxt.timestamp is not a string")
        try:
            # The usual shape (what oslo.context writes) is checked without
            # strptime, which cost more than the rest of the decoding; any
            # other string still goes through strptime, as Nova's does.
            if _TIMESTAMP_RE.match(ts):
                datetime.datetime.fromisoformat(ts)
            else:
                datetime.datetime.strptime(ts, TIMESTAMP_FORMAT)
        except ValueError:
            raise exception.MalformedMessage(
                reason="ctxt.timestamp %r does not match %s" % (ts, TIMESTAMP_FORMAT))
    roles = ctxt.get("roles")
    if roles is not None and not isinstance(roles, list):
        raise exception.MalformedMessage(reason="ctxt.roles is not a list")


def public_context(ctxt):
    """A copy of ``ctxt`` safe to log: no token, no service catalog."""
    safe = dict(ctxt)
    if safe.get("auth_token"):
        safe["auth_token"] = "***"
    safe.pop("service_catalog", None)
    return safe


@dataclasses.dataclass
class Message:
    """One cells message (section 2.1), as seen by the cell holding it."""

    message_type: str
    ctxt: dict
    method_name: str
    method_kwargs: dict
    direction: str
    routing_path: str
    hop_count: int
    max_hop_count: int
    need_response: bool = False
    fanout: bool = False
    uuid: str = dataclasses.field(default_factory=uuidutils.generate_uuid)
    target_cell: str | None = None
    response_uuid: str | None = None

    def to_dict(self):
        """Every field that applies to the message type (``_BaseMessage.to_json``)."""
        out = {
            "message_type": self.message_type,
            "ctxt": self.ctxt,
            "method_name": self.method_name,
            "method_kwargs": self.method_kwargs,
            "direction": self.direction,
            "need_response": self.need_response,
            "fanout": self.fanout,
            "uuid": self.uuid,
            "routing_path": self.routing_path,
            "hop_count": self.hop_count,
            "max_hop_count": self.max_hop_count,
        }
        if self.message_type in ("targeted", "response"):
            out["target_cell"] = self.target_cell
        if self.message_type == "response":
            out["response_uuid"] = self.response_uuid
        return out

    def to_json(self):
        return jsonutils.dumps(self.to_dict())

    @property
    def is_local_target(self):
        """True at the destination of a targeted or response message."""
        return self.target_cell == self.routing_path

    @property
    def source_is_us(self):
        return PATH_SEP not in self.routing_path

    @property
    def origin(self):
        return self.routing_path.split(PATH_SEP)[0]

    def describe(self):
        """One short line for logs (never the ctxt or kwargs: they hold secrets)."""
        return "%s %s/%s uuid=%s path=%s hop=%d" % (
            self.message_type, self.method_name, self.direction, self.uuid,
            self.routing_path, self.hop_count)


def new_message(our_name, message_type, method_name, method_kwargs, direction,
                ctxt=None, target_cell=None, need_response=False, fanout=False,
                max_hop_count=10, response_uuid=None):
    """A message created in this cell: path is our name, hop count 1 (2.2)."""
    if message_type not in MESSAGE_TYPES:
        raise ValueError("bad message type %r" % message_type)
    if direction not in DIRECTIONS:
        raise ValueError("bad direction %r" % direction)
    return Message(message_type=message_type,
                   ctxt=ctxt if ctxt is not None else admin_context(),
                   method_name=method_name, method_kwargs=method_kwargs,
                   direction=direction, routing_path=our_name, hop_count=1,
                   max_hop_count=max_hop_count, need_response=need_response,
                   fanout=fanout, target_cell=target_cell,
                   response_uuid=response_uuid)


def decode(text, our_name, default_max_hop_count=10):
    """Decode the ``message`` argument as the receiving cell ``our_name``.

    Validates what ``MessageRunner.message_from_json`` needs, then extends the
    routing path with our name and adds one hop, as the receiver's first act.
    Raises MalformedMessage with the reason for anything else.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise exception.MalformedMessage(reason="message is not UTF-8")
    if not isinstance(text, str):
        raise exception.MalformedMessage(
            reason="message argument is %s, not a JSON string" % type(text).__name__)
    try:
        data = jsonutils.loads(text)
    except (ValueError, RecursionError) as e:
        raise exception.MalformedMessage(reason="invalid JSON: %s" % e)
    if not isinstance(data, dict):
        raise exception.MalformedMessage(reason="message is not a JSON object")
    for key, kind in _REQUIRED.items():
        if key not in data:
            raise exception.MalformedMessage(reason="missing field %r" % key)
        if not isinstance(data[key], kind) or (kind is dict and data[key] is None):
            raise exception.MalformedMessage(
                reason="field %r is %s, expected %s" % (
                    key, type(data[key]).__name__, kind.__name__))
    for key, kind in _OPTIONAL.items():
        value = data.get(key)
        if value is None and key not in ("target_cell",):
            continue
        # bool is an int subclass: a hop count of true is still malformed.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise exception.MalformedMessage(
                reason="field %r has type %s" % (key, type(value).__name__))
    mtype = data["message_type"]
    if mtype not in MESSAGE_TYPES:
        raise exception.MalformedMessage(reason="unknown message_type %r" % mtype)
    if data["direction"] not in DIRECTIONS:
        raise exception.MalformedMessage(reason="unknown direction %r" % data["direction"])
    if not data["method_name"]:
        raise exception.MalformedMessage(reason="empty method_name")
    if mtype in ("targeted", "response") and "target_cell" not in data:
        raise exception.MalformedMessage(reason="missing field 'target_cell'")
    if mtype == "response" and not data.get("response_uuid"):
        raise exception.MalformedMessage(reason="missing field 'response_uuid'")
    check_context(data["ctxt"])
    hop_count = data.get("hop_count") or 0
    max_hops = data.get("max_hop_count")
    if max_hops is None:
        max_hops = default_max_hop_count
    if hop_count < 0 or max_hops < 0:
        raise exception.MalformedMessage(reason="negative hop count")
    path = data.get("routing_path") or ""
    # Receiving cell extends the path and the hop count (_BaseMessage.__init__).
    path = path + PATH_SEP + our_name if path else our_name
    return Message(
        message_type=mtype, ctxt=data["ctxt"], method_name=data["method_name"],
        method_kwargs=data["method_kwargs"], direction=data["direction"],
        routing_path=path, hop_count=hop_count + 1, max_hop_count=max_hops,
        need_response=bool(data.get("need_response")), fanout=bool(data.get("fanout")),
        uuid=data.get("uuid") or uuidutils.generate_uuid(),
        target_cell=data.get("target_cell"), response_uuid=data.get("response_uuid"))


def reverse_path(path):
    return PATH_SEP.join(reversed(path.split(PATH_SEP)))


def next_hop_name(msg):
    """Name of the neighbour a targeted or response message goes to next (2.3).

    Returns None when this cell is the destination. Raises
    CellRoutingInconsistency when the target does not extend our path.
    """
    if msg.target_cell is None:
        raise exception.CellRoutingInconsistency(reason="target_cell is null")
    if msg.is_local_target:
        return None
    ours = msg.routing_path.split(PATH_SEP)
    target = msg.target_cell.split(PATH_SEP)
    if len(target) <= len(ours) or target[:len(ours)] != ours:
        raise exception.CellRoutingInconsistency(
            reason="target %s does not continue routing path %s" % (
                msg.target_cell, msg.routing_path))
    return target[len(ours)]


def check_hop_count(msg):
    """Raise CellMaxHopCountReached before forwarding a targeted message."""
    if msg.hop_count >= msg.max_hop_count:
        raise exception.CellMaxHopCountReached(hop_count=msg.hop_count)


def forward_copy(msg):
    """The message as this cell sends it on (the path already holds our name)."""
    return dataclasses.replace(msg)


# -- responses ------------------------------------------------------------


@dataclasses.dataclass
class Response:
    """One cell's answer to a call (``nova.cells.messaging.Response``)."""

    cell_name: str
    value: object
    failure: bool = False

    def to_json(self):
        value = self.value
        if self.failure:
            value = jsonutils.dumps(value) if not isinstance(value, str) else value
        return jsonutils.dumps({"cell_name": self.cell_name, "value": value,
                           "failure": self.failure})

    @classmethod
    def from_json(cls, text):
        try:
            data = jsonutils.loads(text)
            return cls(cell_name=data["cell_name"], value=data.get("value"),
                       failure=bool(data.get("failure")))
        except (TypeError, ValueError, KeyError) as e:
            raise exception.MalformedMessage(reason="bad response entry: %s" % e)

    @classmethod
    def from_exception(cls, cell_name, exc):
        return cls(cell_name=cell_name, value=failure_value(exc), failure=True)

    def failure_info(self):
        """The decoded failure dict (class, module, message, ...) or None."""
        if not self.failure:
            return None
        try:
            return jsonutils.loads(self.value) if isinstance(self.value, str) else self.value
        except ValueError:
            return {"class": "RemoteError", "module": "", "message": str(self.value)}


def failure_value(exc):
    """Nova's serialized failure (``oslo_messaging`` ``serialize_remote_exception``).

    The traceback lists only exception lines, never local values, so no secret
    can leak through it.
    """
    kwargs = getattr(exc, "kwargs", {}) or {}
    return {
        "class": type(exc).__name__,
        "module": getattr(exc, "wire_module", type(exc).__module__),
        "message": getattr(exc, "message", None) or str(exc),
        "tb": traceback.format_exception_only(type(exc), exc),
        "args": [],
        "kwargs": {k: v for k, v in kwargs.items()
                   if isinstance(v, (str, int, float, bool, type(None)))},
    }


def make_response(orig, our_name, responses, max_hop_count=10):
    """The ``parse_responses`` message answering ``orig`` (section 2.5).

    For a targeted original the target is the whole reversed routing path;
    for a broadcast only the neighbour it came from, with fanout.
    """
    direction = "up" if orig.direction == "down" else "down"
    reversed_path = reverse_path(orig.routing_path)
    if orig.message_type == "broadcast":
        target = PATH_SEP.join(reversed_path.split(PATH_SEP)[:2])
        fanout = True
    else:
        target = reversed_path
        fanout = False
    resp = new_message(
        our_name, "response", "parse_responses",
        {"orig_message": orig.to_json(),
         "responses": [r.to_json() for r in responses]},
        direction, ctxt=orig.ctxt, target_cell=target, fanout=fanout,
        max_hop_count=max_hop_count, response_uuid=orig.uuid)
    # A reply going straight to its final target is sent fanout, so every
    # process of the origin cell sees it (section 2.5).
    if len(target.split(PATH_SEP)) == 2:
        resp.fanout = True
    return resp


def parse_response_list(msg):
    """The Response objects carried by a ``parse_responses`` message."""
    entries = msg.method_kwargs.get("responses")
    if not isinstance(entries, list):
        raise exception.MalformedMessage(reason="responses is not a list")
    return [Response.from_json(e) for e in entries]


# -- the oslo.messaging envelope (section 1.5) --------------------------------


def rpc_dict(msg, unique_id=None):
    """The oslo.messaging RPC dict: method, args, version, _unique_id, _context_*."""
    out = {"method": RPC_METHOD, "args": {"message": msg.to_json()},
           "version": RPC_VERSION,
           "_unique_id": unique_id or uuidutils.generate_uuid(dashed=False)}
    for key, value in msg.ctxt.items():
        out["_context_%s" % key] = value
    return out


def envelope(msg, unique_id=None):
    """The AMQP body of one cast carrying ``msg``."""
    return {"oslo.version": ENVELOPE_VERSION,
            "oslo.message": jsonutils.dumps(rpc_dict(msg, unique_id))}


def unwrap_envelope(body):
    """The cells message JSON string inside an AMQP body (dict or JSON text)."""
    try:
        if isinstance(body, (bytes, str)):
            body = jsonutils.loads(body)
        if "oslo.message" in body:
            body = jsonutils.loads(body["oslo.message"])
        if body.get("method") != RPC_METHOD:
            raise exception.MalformedMessage(reason="method is %r" % body.get("method"))
        return body["args"]["message"]
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
        raise exception.MalformedMessage(reason="bad envelope: %s" % type(e).__name__)


# -- Nova object primitives (section 2.8) --------------------------------------


def obj_primitive(name, data, changes=None, version=None):
    """A ``nova_object`` primitive; ``changes`` is written only when non-empty."""
    prim = {"nova_object.name": name, "nova_object.namespace": "nova",
            "nova_object.version": version or OBJECT_VERSIONS.get(name, "1.0"),
            "nova_object.data": data}
    if changes:
        prim["nova_object.changes"] = sorted(set(changes))
    return prim


def is_obj_primitive(value):
    return isinstance(value, dict) and "nova_object.name" in value


def obj_data(value, name=None):
    """(data, changes) of a primitive; a plain dict is taken as data itself.

    Raises MalformedMessage for the wrong object name or data shape, and
    UnsupportedVersion for a newer major version than we know.
    """
    if not is_obj_primitive(value):
        if isinstance(value, dict):
            return value, []
        raise exception.MalformedMessage(
            reason="expected %s object, got %s" % (name or "an", type(value).__name__))
    if not isinstance(value["nova_object.name"], str):
        raise exception.MalformedMessage(reason="nova_object.name is not a string")
    if name and value["nova_object.name"] != name:
        raise exception.MalformedMessage(
            reason="expected %s object, got %s" % (name, value["nova_object.name"]))
    data = value.get("nova_object.data")
    if not isinstance(data, dict):
        raise exception.MalformedMessage(reason="nova_object.data is not an object")
    version = str(value.get("nova_object.version", "1.0"))
    known = OBJECT_VERSIONS.get(value["nova_object.name"])
    if known and version.split(".")[0] != known.split(".")[0]:
        raise exception.UnsupportedVersion(
            reason="%s %s (we speak %s)" % (value["nova_object.name"], version, known))
    changes = value.get("nova_object.changes") or []
    if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
        raise exception.MalformedMessage(reason="nova_object.changes is not a list of names")
    return data, list(changes)


def obj_list_items(value, name):
    """The member primitives of a ``<name>List`` primitive, or of a plain list."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    data, _ = obj_data(value, name + "List")
    objects = data.get("objects", [])
    if not isinstance(objects, list):
        raise exception.MalformedMessage(reason="%sList.objects is not a list" % name)
    return objects
