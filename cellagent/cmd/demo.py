"""``cellagent-demo``: a child agent and an in-process parent, no broker.

The embedded scenario of issue 3 (the full top cell comes with issue 4): a
``cellagent`` child with the fake backend and a minimal parent cell talk the
cells v1 wire over oslo.messaging's in-memory ``fake://`` transport, each on
its own exchange. The parent sends builds, a reboot, a stop/start, a
console-output call and deletes, and prints its view of the servers as the
child's reports arrive.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid as uuidlib

from cellagent.cmd import init_threading

LOG = logging.getLogger(__name__)


class ParentView:
    """A minimal top: applies what a child reports, as a Stein API cell does."""

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


def _instance(uuid, name, flavor):
    from cellagent.rpc import intercell
    return intercell.obj_primitive("Instance", {
        "uuid": uuid, "display_name": name, "hostname": name, "project_id": "demo",
        "user_id": "alice", "image_ref": "cirros", "vm_state": "building",
        "task_state": "scheduling", "memory_mb": flavor["memory_mb"],
        "vcpus": flavor["vcpus"], "root_gb": flavor["root_gb"], "ephemeral_gb": 0,
        "metadata": {}, "created_at": intercell.format_obj_datetime()})


def run(out=sys.stdout, servers=3):
    init_threading()
    from oslo_config import cfg

    from cellagent import conf as conf_mod
    from cellagent import service
    from cellagent.rpc import endpoint, intercell, neighbours, parent_api, transport

    tmp = tempfile.mkdtemp(prefix="cellagent-demo-")
    cells_json = os.path.join(tmp, "cells.json")
    with open(cells_json, "w") as f:
        json.dump({"api": {"transport_url": "fake:///api", "is_parent": True}}, f)
    conf = cfg.ConfigOpts()
    conf_mod.register_opts(conf)
    conf([], project="cellagent-demo", default_config_files=[])
    for name, value, group in (
            ("transport_url", "fake:///cell1", None), ("host", "demo-agent", None),
            ("state_path", tmp, None), ("name", "cell1", "cells"),
            ("cells_config", cells_json, "cells"), ("report_delay", 0.2, "cells"),
            ("call_timeout", 10, "cells"), ("driver", "fake", "backend"),
            ("poll_interval", 0.1, "backend"), ("ram_mb", 8192, "fake"),
            ("spawn_delay", 0.6, "fake"), ("reboot_delay", 0.4, "fake"),
            ("stop_delay", 0.3, "fake"), ("start_delay", 0.3, "fake"),
            ("delete_delay", 0.3, "fake")):
        conf.set_override(name, value, group)

    agent = service.AgentService(conf)
    agent.start()

    # The parent: its own exchange on the in-memory transport, a router whose
    # handler is the ParentView, and a record for its child.
    view = ParentView()
    records = {"cell1": neighbours.CellRecord("cell1", "fake:///cell1")}
    sender = parent_api.IntercellSender("api", neighbours.Neighbours(records=records),
                                        agent.transports, "cells.intercell", 10)
    router = endpoint.Router(sender, view, call_timeout=10)
    parent_servers = transport.rpc_servers(
        agent.transports.rpc_transport("fake:///api"), "fake:///api", "cells.intercell",
        "demo-api", endpoint.IntercellEndpoint(router))
    for s in parent_servers:
        s.start()

    def send(method, kwargs, call=False):
        msg = sender.new("targeted", method, kwargs, "down", target_cell="api!cell1",
                         ctxt=intercell.admin_context())
        if call:
            return router.call(msg)
        sender.send_to(records["cell1"], msg)

    def show(title):
        out.write("\n== %s ==\n%s\n" % (title, view.table()))
        out.flush()

    try:
        send("announce_capacities", {})
        view.wait(lambda v: "cell1" in v.capacities, 10)
        flavor = {"name": "m1.small", "memory_mb": 2048, "vcpus": 1, "root_gb": 20}
        uuids = [str(uuidlib.uuid4()) for _ in range(servers)]
        send("build_instances", {"build_inst_kwargs": {
            "instances": [_instance(u, "web-%d" % i, flavor) for i, u in enumerate(uuids)],
            "image": {"id": "cirros", "name": "cirros"},
            "filter_properties": {"instance_type": intercell.obj_primitive(
                "Flavor", dict(flavor, flavorid="2", ephemeral_gb=0, swap=0,
                               extra_specs={}))},
            "admin_password": "not-logged", "security_groups": ["default"]}})
        view.wait(lambda v: len(v.instances) == servers, 10)
        show("build accepted by cell1")
        view.wait(lambda v: all(v.instances.get(u, {}).get("vm_state") == "active"
                                for u in uuids), 30)
        time.sleep(0.5)   # let the coalesced capacity report land
        show("all active")
        send("reboot_instance", {"instance": _instance(uuids[0], "web-0", flavor),
                                 "reboot_type": "HARD"})
        view.wait(lambda v: v.instances[uuids[0]].get("task_state") == "rebooting_hard", 10)
        show("hard reboot of web-0 in progress")
        view.wait(lambda v: v.instances[uuids[0]].get("task_state") is None, 10)
        show("web-0 rebooted")
        send("stop_instance", {"instance": _instance(uuids[1], "web-1", flavor),
                               "clean_shutdown": True})
        view.wait(lambda v: v.instances[uuids[1]].get("vm_state") == "stopped", 10)
        show("web-1 stopped")
        send("start_instance", {"instance": _instance(uuids[1], "web-1", flavor)})
        view.wait(lambda v: v.instances[uuids[1]].get("vm_state") == "active", 10)
        responses = send("run_compute_api_method", {"method_info": {
            "method": "get_console_output", "method_args": [uuids[2], 3],
            "method_kwargs": {}}}, call=True)
        out.write("\n== console output of web-2 (a call answered by cell1) ==\n%s\n"
                  % responses[0].value)
        for u in uuids:
            send("terminate_instance", {"instance": _instance(u, "", flavor),
                                        "delete_type": "delete"})
        view.wait(lambda v: not v.instances, 15)
        time.sleep(0.5)
        show("all deleted")
        ok = not view.instances
    finally:
        for s in parent_servers:
            s.stop()
        for s in parent_servers:
            s.wait()
        agent.stop()
    out.write("\ndemo %s\n" % ("finished" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=3, help="servers to build")
    parser.add_argument("--debug", action="store_true", help="log to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run(servers=args.servers)


if __name__ == "__main__":
    sys.exit(main())
