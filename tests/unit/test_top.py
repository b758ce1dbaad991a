"""The top cell with real child agents on oslo.messaging's ``fake://`` transport.

Each test wires a ``TopService`` and one or two ``AgentService`` children
(fake backend) in this process, each on its own random virtual host, and
checks what a person sees through the top: rows, states, addresses, faults,
capacity, re-sends and reschedules.
"""

import json
import os
import uuid as uuidlib

import pytest
from oslo_config import cfg

from cellagent import exception
from cellagent.rpc import intercell
from tests.unit.helpers import wait_for

BASE = "cells.intercell"


def _conf(overrides):
    from cellagent import conf as conf_mod
    conf = cfg.ConfigOpts()
    conf_mod.register_opts(conf)
    conf([], project="cellagent-test", default_config_files=[])
    for (group, name), value in overrides.items():
        conf.set_override(name, value, group)
    return conf


class Cloud:
    """A top named ``top`` and children on fake:// URLs unique to this test."""

    def __init__(self, tmp_path, children=("private", "public"), cells=None, top_opts=None):
        self.tmp = tmp_path
        self.tag = uuidlib.uuid4().hex[:10]
        self.top_url = "fake:///top-%s" % self.tag
        self.urls = {name: "fake:///%s-%s" % (name, self.tag)
                     for name in set(children) | set(cells or {})}
        records = {"private": {"tier": "private"},
                   "public": {"tier": "public", "cost_per_vcpu_hour": 0.05}}
        records.update(cells or {})
        self.cells_json = tmp_path / "top-cells.json"
        self.cells_json.write_text(json.dumps({
            name: dict(records.get(name, {"tier": "private"}), transport_url=url)
            for name, url in self.urls.items()}))
        self.children = {}
        self.top = None
        self.top_opts = top_opts or {}
        self.child_names = children

    def start_child(self, name, driver="fake", **fake):
        from cellagent import service
        state = self.tmp / name
        state.mkdir(exist_ok=True)
        cj = state / "cells.json"
        cj.write_text(json.dumps({"top": {"transport_url": self.top_url, "is_parent": True}}))
        opts = {"ram_mb": 22800, "spawn_delay": 0.05, "delete_delay": 0.05}
        opts.update(fake)
        overrides = {
            (None, "transport_url"): self.urls[name], (None, "host"): "%s-%s" % (name, self.tag),
            (None, "state_path"): str(state), ("database", "connection"): "memory://",
            ("cells", "name"): name, ("cells", "cells_config"): str(cj),
            ("cells", "report_delay"): 0.05, ("cells", "report_interval"): 3600,
            ("cells", "drain_timeout"): 2, ("backend", "driver"): driver,
            ("backend", "poll_interval"): 0.05}
        overrides.update({("fake", k): v for k, v in opts.items()})
        conf = _conf(overrides)
        agent = service.AgentService(conf)
        agent.start()
        self.children[name] = agent
        return agent

    def start(self, **opts_by_child):
        for name in self.child_names:
            self.start_child(name, **opts_by_child.get(name, {}))
        self.start_top()
        return self

    def start_top(self):
        from cellagent import service
        state = self.tmp / "top"
        state.mkdir(exist_ok=True)
        overrides = {
            (None, "transport_url"): self.top_url, (None, "host"): "top-%s" % self.tag,
            (None, "state_path"): str(state), ("cells", "name"): "top",
            ("cells", "cells_config"): str(self.cells_json), ("cells", "call_timeout"): 5,
            ("top", "periodic_interval"): 0.05, ("top", "build_ack_timeout"): 0.5,
        }
        overrides.update(self.top_opts)
        self.top = service.TopService(_conf(overrides))
        self.top.start()
        return self.top

    @property
    def manager(self):
        return self.top.manager

    def reported(self, *names):
        return wait_for(lambda: all(
            n in self.manager.store.cell_reports()
            and self.manager.store.cell_reports()[n].capacities for n in names),
            what="capacity reports of %s" % (names,))

    def server(self, uuid):
        return self.manager.server_dict(self.manager.store.get_instance(uuid, True))

    def wait_state(self, uuid, vm_state, task_state=None, timeout=10):
        return wait_for(lambda: (self.server(uuid)["vm_state"] == vm_state
                                 and self.server(uuid)["task_state"] == task_state),
                        timeout, what=lambda: "%s in %s, is %s" % (uuid, vm_state,
                                                                  self.server(uuid)))

    def stop_child(self, name):
        agent = self.children.pop(name)
        agent.stop()
        agent.conf.reset()

    def stop(self):
        if self.top is not None:
            self.top.stop()
            self.top.conf.reset()
            self.top = None
        for name in list(self.children):
            self.stop_child(name)


@pytest.fixture
def cloud(tmp_path):
    clouds = []

    def make(**kw):
        c = Cloud(tmp_path, **kw)
        clouds.append(c)
        return c

    yield make
    for c in clouds:
        c.stop()


def _up_message(manager, child, method, kwargs):
    """A broadcast up as it arrives at the top from ``child``."""
    msg = intercell.new_message(child, "broadcast", method, kwargs, "up")
    return intercell.decode(msg.to_json(), manager.our_name)


class TestBuildThroughTheTop:
    def test_build_goes_private_and_reports_up_to_active(self, cloud):
        c = cloud().start()
        c.reported("private", "public")
        rows = c.manager.create_servers("web", "m1.small", "cirros", count=2)
        assert [r.vm_state for r in rows] == ["building", "building"]
        assert {r.cell_name for r in rows} == {"private"}
        for r in rows:
            c.wait_state(r.uuid, "active")
            s = c.server(r.uuid)
            assert s["cell"] == "private" and s["tier"] == "private"
            assert s["access_ip_v4"]
            assert {a["type"] for a in s["addresses"]} == {"fixed", "floating"}
            assert s["launched_at"]
        assert sorted(s["name"] for s in map(c.server, [r.uuid for r in rows])) == \
            ["web-1", "web-2"]
        # The child's capacity report reached the top and shows the two.
        wait_for(lambda: c.manager.store.cell_usage()["private"]["instances"] == 2)
        # Until a report shows the two, they count as pending (conservative).
        wait_for(lambda: {d["name"]: d for d in c.manager.cell_dicts()}[
            "private"]["free_units"]["m1.small"] == 8, what="the report showing both")
        cells = {d["name"]: d for d in c.manager.cell_dicts()}
        assert cells["private"]["mute"] is False
        assert cells["private"]["used"]["instances"] == 2

    def test_bursts_to_public_below_the_low_watermark(self, cloud):
        c = cloud().start()
        c.reported("private", "public")
        placed = []
        for i in range(10):
            (row,) = c.manager.create_servers("w%d" % i, "m1.small", "cirros")
            placed.append(row.cell_name)
        # 22800 MB private: 8 x 2048 leave 28 %, a 9th would leave 19 % < 20 %.
        # A placement not yet shown by a report counts as pending, and one
        # whose report races its acknowledgement may count twice for a
        # moment (conservative): 7 or 8 private, then public only.
        first_public = placed.index("public")
        assert first_public in (7, 8), placed
        assert placed == ["private"] * first_public + ["public"] * (10 - first_public)
        assert c.manager.scheduler.bursting is True

    def test_unknown_flavor_is_refused_before_any_row(self, cloud):
        c = cloud().start()
        with pytest.raises(exception.InvalidRequest, match="unknown flavor m9"):
            c.manager.create_servers("x", "m9", "cirros")
        assert c.manager.store.list_instances() == []

    def test_no_cell_fits_ends_in_error_with_the_reasons(self, cloud):
        c = cloud(children=("private",)).start()
        c.reported("private")
        # Room for one m1.xlarge (16 GiB) only.
        rows = c.manager.create_servers("big", "m1.xlarge", "cirros", count=2)
        for row in rows:
            s = c.server(row.uuid)
            assert s["vm_state"] == "error"
            assert "private: capacity" in s["fault"]["message"], s["fault"]
        assert c.children["private"].backend.list_instances() == []


class TestUpMethods:
    def test_update_for_an_unknown_instance_creates_the_row(self, cloud):
        c = cloud(children=()).start()
        uuid = str(uuidlib.uuid4())
        inst = intercell.obj_primitive("Instance", {
            "uuid": uuid, "display_name": "adopted", "vm_state": "active",
            "task_state": None, "memory_mb": 512, "vcpus": 1, "root_gb": 1},
            ["display_name", "vm_state", "task_state", "memory_mb", "vcpus", "root_gb"])
        c.top.router._run_locally(_up_message(c.manager, "private",
                                              "instance_update_at_top", {"instance": inst}),
                                  reply=False)
        s = c.server(uuid)
        assert (s["name"], s["cell"], s["vm_state"]) == ("adopted", "private", "active")

    def test_stein_guard_drops_building_over_active(self, cloud):
        c = cloud(children=()).start()
        uuid = str(uuidlib.uuid4())

        def update(**data):
            inst = intercell.obj_primitive("Instance", dict(data, uuid=uuid), list(data))
            c.top.router._run_locally(_up_message(
                c.manager, "private", "instance_update_at_top", {"instance": inst}), False)

        update(vm_state="active", task_state=None, display_name="a")
        update(vm_state="building", task_state="scheduling")
        assert c.server(uuid)["vm_state"] == "active"

    def test_fault_and_destroy(self, cloud):
        c = cloud(children=()).start()
        uuid = str(uuidlib.uuid4())
        inst = intercell.obj_primitive("Instance", {"uuid": uuid, "vm_state": "error"},
                                       ["vm_state"])
        run = c.top.router._run_locally
        run(_up_message(c.manager, "private", "instance_update_at_top", {"instance": inst}),
            False)
        run(_up_message(c.manager, "private", "instance_fault_create_at_top", {
            "instance_fault": {"instance_uuid": uuid, "code": 500, "message": "No room",
                               "details": "", "host": "h",
                               "created_at": "2026-11-27T00:00:00Z"}}), False)
        assert c.server(uuid)["fault"]["message"] == "No room"
        run(_up_message(c.manager, "private", "instance_destroy_at_top",
                        {"instance": intercell.obj_primitive("Instance", {"uuid": uuid})}),
            False)
        assert c.manager.store.list_instances() == []

    def test_reports_of_an_unknown_cell_are_ignored(self, cloud):
        c = cloud(children=()).start()
        msg = intercell.new_message("stranger", "targeted", "update_capacities", {
            "cell_name": "stranger", "capacities": {"ram_free": {"total_mb": 1}}}, "up",
            target_cell="stranger!top")
        c.top.router.receive(msg.to_json())
        assert "stranger" not in c.manager.store.cell_reports()

    def test_last_seen_and_backoff_survive_a_restart(self, cloud):
        c = cloud(children=("private",)).start()
        c.reported("private")
        c.manager.backoff.failed("private", c.manager.clock())
        c.manager.store.set_backoff("private", intercell.utcnow(), 1)
        seen = c.manager.store.cell_reports()["private"].last_seen
        c.top.stop()
        c.top.conf.reset()
        c.start_top()
        assert c.manager.store.cell_reports()["private"].last_seen >= seen
        assert c.manager.backoff.failures("private") == 1


class TestDelivery:
    def test_unacknowledged_build_is_resent_then_rescheduled(self, cloud):
        # "dead" has a record and a (stale) report but no agent listening.
        c = cloud(children=("public",), cells={"dead": {"tier": "private"}},
                  top_opts={("top", "build_retries"): 2}).start()
        c.reported("public")
        c.manager.store.save_capacities("dead", {
            "ram_free": {"total_mb": 20000, "units_by_mb": {"2048": 9}},
            "disk_free": {"total_mb": 10 ** 6, "units_by_mb": {"20480": 50}}},
            intercell.utcnow())
        (row,) = c.manager.create_servers("r", "m1.small", "cirros")
        assert row.cell_name == "dead"
        c.wait_state(row.uuid, "active", timeout=15)
        s = c.server(row.uuid)
        assert s["cell"] == "public"
        inst = c.manager.store.get_instance(row.uuid)
        assert inst.tried_cells == ["dead", "public"]
        assert c.manager.backoff.failures("dead") == 1
        cells = {d["name"]: d for d in c.manager.cell_dicts()}
        assert cells["dead"]["backoff_until"]
        # One instance in one cell.
        assert len(c.children["public"].backend.list_instances()) == 1

    def test_build_moved_away_is_deleted_where_it_landed_late(self, cloud):
        c = cloud(children=("public",), cells={"late": {"tier": "private"}},
                  top_opts={("top", "build_retries"): 1}).start()
        c.reported("public")
        c.manager.store.save_capacities("late", {
            "ram_free": {"total_mb": 20000, "units_by_mb": {"2048": 9}},
            "disk_free": {"total_mb": 10 ** 6, "units_by_mb": {"20480": 50}}},
            intercell.utcnow())
        (row,) = c.manager.create_servers("l", "m1.small", "cirros")
        assert row.cell_name == "late"
        c.wait_state(row.uuid, "active", timeout=15)
        assert c.server(row.uuid)["cell"] == "public"
        # The late cell comes up and builds what was queued for it (the
        # in-memory broker kept the cast): the top deletes it there.
        late = c.start_child("late")
        wait_for(lambda: late.backend.creates if hasattr(late.backend, "creates") else True)
        wait_for(lambda: not late.backend.list_instances(), 10,
                 what="the late copy deleted")
        assert c.server(row.uuid)["cell"] == "public"
        assert len(c.children["public"].backend.list_instances()) == 1

    def test_a_cell_that_fails_builds_is_backed_off(self, cloud):
        c = cloud().start(private={"driver": "fake-failing-spawn"})
        c.reported("private", "public")
        (first,) = c.manager.create_servers("f1", "m1.small", "cirros")
        assert first.cell_name == "private"
        c.wait_state(first.uuid, "error")
        assert "refused on purpose" in c.server(first.uuid)["fault"]["message"]
        wait_for(lambda: c.manager.backoff.failures("private") == 1)
        # The private cell has room, but it is backed off: the next build
        # goes public, and the cell list says until when.
        (second,) = c.manager.create_servers("f2", "m1.small", "cirros")
        assert second.cell_name == "public"
        c.wait_state(second.uuid, "active")
        cells = {d["name"]: d for d in c.manager.cell_dicts()}
        assert cells["private"]["backoff_until"]
        assert cells["public"]["backoff_until"] is None

    def test_delete_of_a_never_placed_server_goes_everywhere(self, cloud):
        c = cloud(children=("private",)).start()
        c.reported("private")
        rows = c.manager.create_servers("nowhere", "m1.xlarge", "cirros", count=2)
        for row in rows:
            assert c.server(row.uuid)["vm_state"] == "error"
            assert c.server(row.uuid)["cell"] is None
            c.manager.delete_server(row.uuid)
        assert c.manager.store.list_instances() == []

    def test_actions_are_routed_to_the_instance_cell(self, cloud):
        c = cloud(children=("private",)).start()
        c.reported("private")
        (row,) = c.manager.create_servers("a", "m1.small", "cirros")
        c.wait_state(row.uuid, "active")
        c.manager.stop_server("a")
        c.wait_state(row.uuid, "stopped")
        c.manager.start_server(row.uuid)
        c.wait_state(row.uuid, "active")
        c.manager.reboot_server("a", hard=True)
        c.wait_state(row.uuid, "active")
        assert "a" in c.manager.console_log(row.uuid) or c.manager.console_log(row.uuid)
        c.manager.delete_server("a")
        wait_for(lambda: c.manager.store.list_instances() == [])
        assert c.children["private"].backend.list_instances() == []


def test_other_actions_are_routed_too(cloud, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="cellagent.top")
    c = cloud(children=("private",)).start()
    c.reported("private")
    (row,) = c.manager.create_servers("b", "m1.small", "cirros")
    c.wait_state(row.uuid, "active")
    c.manager.server_action("b", "pause")
    c.wait_state(row.uuid, "paused")
    c.manager.server_action("b", "unpause")
    c.wait_state(row.uuid, "active")
    c.manager.server_action("b", "resize", flavor="m1.medium")
    c.wait_state(row.uuid, "resized")
    assert c.server(row.uuid)["flavor"] == "m1.medium"
    c.manager.server_action("b", "resize-confirm")
    c.wait_state(row.uuid, "active")
    assert c.manager.store.get_instance(row.uuid).flavor["memory_mb"] == 4096
    c.manager.server_action("b", "snapshot", name="img-b")
    wait_for(lambda: "Snapshot img-b is image fake-img-" in caplog.text)
    with pytest.raises(exception.InvalidRequest, match="unknown action"):
        c.manager.server_action("b", "levitate")


def test_demo_bursts_and_writes_its_plot(tmp_path):
    import io

    from cellagent.cmd import demo
    out = io.StringIO()
    plot = tmp_path / "demo.png"
    cwd = os.getcwd()
    rc = demo.run(out=out, servers=12, ramp_seconds=2.0, plot_path=str(plot))
    assert os.getcwd() == cwd
    text = out.getvalue()
    assert rc == 0, text
    assert "BURST into public" in text
    assert "burst over, back to private" in text
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
