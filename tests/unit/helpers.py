"""Shared test helpers: fixtures on disk, waiting, and a running child + parent.

``CellHarness`` wires a real child agent (``service.AgentService``) and a
minimal in-process parent over oslo.messaging's in-memory ``fake://``
transport, the way ``cellagent.cmd.demo`` wires its cells. The fake transport keeps its
exchanges in one process-global dict keyed by exchange name (``cells-<vhost>``),
so every harness uses fresh, random virtual hosts.
"""

import json
import logging
import os
import threading
import time
import uuid as uuidlib

from oslo_config import cfg

WIRE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "wire")
WIRE_FILES = {
    1: "example1_build_instances.json",
    2: "example2_update_capacities.json",
    3: "example3_update_capabilities_fragment.json",
    4: "example4_instance_update_at_top.json",
    5: "example5_response.json",
}
BASE = "cells.intercell"

FLAVOR = {"name": "m1.small", "memory_mb": 2048, "vcpus": 1, "root_gb": 20}


def wire_text(name):
    """The raw text of a fixture file (``1``..``5`` or a file name)."""
    fname = WIRE_FILES.get(name, name)
    with open(os.path.join(WIRE_DIR, fname)) as f:
        return f.read()


def wire(name):
    """A fresh decoded copy of a fixture (``1``..``5`` or a file name)."""
    return json.loads(wire_text(name))


def wait_for(predicate, timeout=10.0, interval=0.02, what=None):
    """Call ``predicate`` until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            if callable(what):
                what = what()
            raise AssertionError("timed out after %.1f s waiting for %s"
                                 % (timeout, what or getattr(predicate, "__name__", "?")))
        time.sleep(interval)


class ListHandler(logging.Handler):
    """Keeps every record it sees (thread-safe), for secret-leak checks."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []
        self._lock_ = threading.Lock()

    def emit(self, record):
        with self._lock_:
            self.records.append(record)

    def texts(self):
        """Every record as the operator would read it, traceback included."""
        fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
        with self._lock_:
            records = list(self.records)
        return [fmt.format(r) for r in records]


# -- Nova object primitives used by the tests --------------------------------


def instance_prim(uuid, name="web", flavor=FLAVOR, **extra):
    from cellagent.rpc import intercell
    data = {
        "uuid": uuid, "display_name": name, "hostname": name, "project_id": "demo",
        "user_id": "alice", "image_ref": "cirros", "vm_state": "building",
        "task_state": "scheduling", "memory_mb": flavor["memory_mb"],
        "vcpus": flavor["vcpus"], "root_gb": flavor["root_gb"], "ephemeral_gb": 0,
        "metadata": {}, "created_at": "2019-06-03T10:15:42Z",
    }
    data.update(extra)
    return intercell.obj_primitive("Instance", data)


def build_kwargs(uuids, password="not-logged", flavor=FLAVOR):
    from cellagent.rpc import intercell
    return {"build_inst_kwargs": {
        "instances": [instance_prim(u, "web-%d" % i, flavor) for i, u in enumerate(uuids)],
        "image": {"id": "cirros", "name": "cirros"},
        "filter_properties": {"scheduler_hints": {}, "instance_type": intercell.obj_primitive(
            "Flavor", dict(flavor, flavorid="2", ephemeral_gb=0, swap=0, extra_specs={}))},
        "admin_password": password, "injected_files": [], "security_groups": ["default"]}}


# -- the parent side ----------------------------------------------------------


class ParentView:
    """A minimal Stein API cell: applies what a child reports (no guards)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.instances = {}
        self.faults = []
        self.capacities = {}
        self.capabilities = {}
        self.changed = threading.Condition(self.lock)

    def handle(self, msg):
        from cellagent.rpc import intercell
        kwargs = msg.method_kwargs
        with self.lock:
            if msg.method_name == "instance_update_at_top":
                data, changes = intercell.obj_data(kwargs["instance"], "Instance")
                row = self.instances.setdefault(data["uuid"], {"uuid": data["uuid"]})
                for field in changes:
                    row[field] = data.get(field)
                row["cell_name"] = intercell.reverse_path(msg.routing_path)
            elif msg.method_name == "instance_destroy_at_top":
                data, _ = intercell.obj_data(kwargs["instance"], "Instance")
                self.instances.pop(data["uuid"], None)
            elif msg.method_name == "instance_fault_create_at_top":
                self.faults.append(kwargs["instance_fault"])
            elif msg.method_name == "update_capacities":
                self.capacities[kwargs["cell_name"]] = kwargs["capacities"]
            elif msg.method_name == "update_capabilities":
                self.capabilities[kwargs["cell_name"]] = kwargs["capabilities"]
            self.changed.notify_all()
        return None

    def wait(self, predicate, timeout=30):
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    def table(self):
        lines = ["%-38s %-8s %-9s %-14s %-16s %s" % (
            "uuid", "name", "vm_state", "task_state", "address", "cell")]
        with self.lock:
            rows = sorted(self.instances.values(), key=lambda r: r.get("display_name") or "")
            for r in rows:
                lines.append("%-38s %-8s %-9s %-14s %-16s %s" % (
                    r["uuid"], r.get("display_name", "?"), r.get("vm_state"),
                    r.get("task_state") or "-", r.get("access_ip_v4") or "-",
                    r.get("cell_name")))
            units = self.capacities.get("cell1", {}).get("ram_free", {}).get("units_by_mb", {})
        lines.append("cell1 free units by flavor RAM: %s" % json.dumps(units, sort_keys=True))
        return "\n".join(lines)



class RecordingParent:
    """A ``ParentView`` that also keeps every message it got."""

    def __init__(self):
        self.view = ParentView()
        self._lock = threading.Lock()
        self.messages = []

    def handle(self, msg):
        with self._lock:
            self.messages.append(msg)
        return self.view.handle(msg)

    def received(self, method=None, instance_uuid=None):
        """Messages received so far, optionally by method and instance uuid."""
        with self._lock:
            msgs = list(self.messages)
        out = []
        for m in msgs:
            if method is not None and m.method_name != method:
                continue
            if instance_uuid is not None and self.instance_uuid_of(m) != instance_uuid:
                continue
            out.append(m)
        return out

    @staticmethod
    def instance_uuid_of(msg):
        kwargs = msg.method_kwargs
        if "instance" in kwargs:
            return kwargs["instance"].get("nova_object.data", {}).get("uuid")
        if "instance_fault" in kwargs:
            return kwargs["instance_fault"].get("instance_uuid")
        return None

    def updates(self, uuid):
        """(data, changes) of every instance_update_at_top for ``uuid``."""
        return [(m.method_kwargs["instance"]["nova_object.data"],
                 m.method_kwargs["instance"].get("nova_object.changes", []))
                for m in self.received("instance_update_at_top", uuid)]

    def row(self, uuid):
        """The parent's merged view of the instance (dirty fields applied)."""
        with self.view.lock:
            return dict(self.view.instances.get(uuid, {}))


class CellHarness:
    """A running child ``cell1`` and an in-process parent ``api``.

    Both listen on ``fake://`` URLs with random virtual hosts. Use
    ``send``/``call`` to talk to the child as its parent would, ``cast_raw``
    to put any ``message`` argument on the child's targeted topic.
    """

    def __init__(self, state_path, driver="fake", fake_opts=None, cells_opts=None,
                 backend_opts=None):
        tag = uuidlib.uuid4().hex[:12]
        self.child_name = "cell1"
        self.parent_name = "api"
        self.child_url = "fake:///cell1-%s" % tag
        self.parent_url = "fake:///api-%s" % tag
        self.host = "agent-%s" % tag
        cells_json = os.path.join(str(state_path), "cells-%s.json" % tag)
        with open(cells_json, "w") as f:
            json.dump({self.parent_name: {"transport_url": self.parent_url,
                                          "is_parent": True}}, f)
        from cellagent import conf as conf_mod
        conf = cfg.ConfigOpts()
        conf_mod.register_opts(conf)
        conf([], project="cellagent-test", default_config_files=[])
        overrides = [
            ("transport_url", self.child_url, None), ("host", self.host, None),
            ("state_path", str(state_path), None), ("connection", "memory://", "database"),
            ("name", self.child_name, "cells"), ("cells_config", cells_json, "cells"),
            ("report_delay", 0.05, "cells"), ("call_timeout", 5, "cells"),
            ("report_interval", 3600, "cells"), ("drain_timeout", 5, "cells"),
            ("driver", driver, "backend"), ("poll_interval", 0.05, "backend"),
            ("retry_delay", 0.0, "backend"),
        ]
        overrides += [(k, v, "cells") for k, v in (cells_opts or {}).items()]
        overrides += [(k, v, "backend") for k, v in (backend_opts or {}).items()]
        overrides += [(k, v, "fake") for k, v in (fake_opts or {}).items()]
        for name, value, group in overrides:
            conf.set_override(name, value, group)
        self.conf = conf
        self.agent = None
        self.parent_servers = []
        self._parent_transports = None

    # -- life cycle -----------------------------------------------------------

    def start(self):
        from cellagent import service
        from cellagent.rpc import endpoint, neighbours, parent_api, transport
        # The parent listens first, so the child's start-up reports arrive.
        self._parent_transports = transport.Transports(self.conf)
        self.parent = RecordingParent()
        self.child_record = neighbours.CellRecord(self.child_name, self.child_url)
        self.sender = parent_api.IntercellSender(
            self.parent_name,
            neighbours.Neighbours(records={self.child_name: self.child_record}),
            self._parent_transports, BASE, 10)
        self.router = endpoint.Router(self.sender, self.parent, call_timeout=5)
        self.parent_servers = transport.rpc_servers(
            self._parent_transports.rpc_transport(self.parent_url), self.parent_url, BASE,
            "api-" + self.host, endpoint.IntercellEndpoint(self.router))
        for server in self.parent_servers:
            # One worker: the parent applies reports in the order they arrive.
            server.start(override_pool_size=1)
        self.agent = service.AgentService(self.conf)
        self.agent.start()
        return self

    def stop(self):
        # oslo.messaging may take a second to wait for each stopped server:
        # stop all six, wait for them in parallel, then let the agent stop
        # (stop/wait of an oslo server run once, so its own calls return at once).
        servers = list(self.parent_servers) + list(self.agent.servers if self.agent else [])
        for server in servers:
            server.stop()
        waiters = [threading.Thread(target=server.wait) for server in servers]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join()
        self.parent_servers = []
        if self.agent is not None:
            self.agent.stop()
        if self._parent_transports is not None:
            self._parent_transports.close()
        self.conf.reset()

    # -- talking to the child ---------------------------------------------------

    @property
    def target(self):
        return "%s!%s" % (self.parent_name, self.child_name)

    def new(self, method, kwargs, message_type="targeted", **kw):
        from cellagent.rpc import intercell
        if message_type == "targeted":
            kw.setdefault("target_cell", self.target)
        kw.setdefault("ctxt", intercell.admin_context())
        return self.sender.new(message_type, method, kwargs, "down", **kw)

    def send(self, method, kwargs, message_type="targeted", **kw):
        """Cast one message to the child; returns the Message sent."""
        msg = self.new(method, kwargs, message_type, **kw)
        self.send_msg(msg)
        return msg

    def send_msg(self, msg):
        self.sender.send_to(self.child_record, msg).result(5)

    def call(self, method, kwargs, message_type="targeted", record=None, **kw):
        """A call (need_response): the list of Responses the parent gets back."""
        msg = self.new(method, kwargs, message_type, **kw)
        return self.router.call(msg, record=record)

    def cast_raw(self, message, topic="targeted"):
        """Cast ``process_message(message=<anything>)`` on the child's broker."""
        import oslo_messaging
        from cellagent.rpc import transport
        target = oslo_messaging.Target(topic="%s.%s" % (BASE, topic),
                                       exchange=transport.exchange_for(self.child_url),
                                       version="1.0")
        client = oslo_messaging.get_rpc_client(
            self._parent_transports.rpc_transport(self.child_url), target)
        client.cast({}, "process_message", message=message)

    # -- watching -----------------------------------------------------------------

    def wait_state(self, uuid, timeout=10.0, **expected):
        """Wait until the parent's row for ``uuid`` has the ``expected`` values."""
        def ok():
            row = self.parent.row(uuid)
            return all(row.get(k) == v for k, v in expected.items())
        return wait_for(ok, timeout, what=lambda: "%s to reach %s (now %s)" % (
            uuid, expected, self.parent.row(uuid)))

    def task_states(self, uuid):
        """The task_state of every report for ``uuid`` that changed it, in order."""
        return [data.get("task_state") for data, changes in self.parent.updates(uuid)
                if "task_state" in changes]

    def wait_task_states(self, uuid, *states, timeout=10.0):
        """Wait until the last reports of ``uuid`` changed task_state to ``states``."""
        n = len(states)
        return wait_for(lambda: self.task_states(uuid)[-n:] == list(states), timeout,
                        what=lambda: "task states %s of %s (now %s)" % (
                            list(states), uuid, self.task_states(uuid)))

    def build(self, count=1, **kw):
        """Build ``count`` instances in one message; wait until each is active."""
        uuids = [str(uuidlib.uuid4()) for _ in range(count)]
        self.send("build_instances", build_kwargs(uuids, **kw))
        for u in uuids:
            self.wait_state(u, vm_state="active", task_state=None)
        return uuids
