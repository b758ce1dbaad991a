"""CellManager on its own: journal replay, confirms, timeouts, pre-emption.

The parent is a recorder whose confirm futures the test controls, so the
crash windows (after the backend acted, before the parent's broker confirmed
the report) can be reproduced exactly.
"""

import concurrent.futures
import time
import uuid as uuidlib

import pytest
from oslo_config import cfg

from cellagent import backends
from cellagent import conf as conf_mod
from cellagent import manager as manager_mod
from cellagent import state
from cellagent import workqueue
from cellagent.objects import JournalStatus
from cellagent.rpc import intercell
from tests.unit.helpers import wait_for


class RecordingParent:
    """ParentAPI stand-in: records what goes up; confirms unless told not to."""

    def __init__(self):
        self.sent = []
        self.fail = False

    def _send(self, method, payload):
        self.sent.append((method, payload))
        fut = concurrent.futures.Future()
        if self.fail:
            fut.set_exception(ConnectionError("parent broker gone"))
        else:
            fut.set_result(True)
        return [fut]

    def instance_update_at_top(self, instance, ctxt=None):
        return self._send("instance_update_at_top", instance)

    def instance_destroy_at_top(self, instance, ctxt=None):
        return self._send("instance_destroy_at_top", instance)

    def instance_fault_create_at_top(self, fault, ctxt=None):
        return self._send("instance_fault_create_at_top", fault)

    def states(self, uuid):
        return [p["nova_object.data"].get("vm_state") for m, p in self.sent
                if m == "instance_update_at_top" and p["nova_object.data"]["uuid"] == uuid]

    def methods(self):
        return [m for m, _ in self.sent]


@pytest.fixture
def make_cell(tmp_path):
    made = []

    def make(driver="fake", store=None, **fake):
        conf = cfg.ConfigOpts()
        conf_mod.register_opts(conf)
        conf([], default_config_files=[])
        conf.set_override("driver", driver, "backend")
        conf.set_override("cloud_file", str(tmp_path / "cloud.json"), "fake")
        for key, value in fake.items():
            conf.set_override(key, value, "fake")
        backend = backends.load_backend(conf)
        backend.start()
        store = store or state.get_store("sqlite:///%s" % (tmp_path / "state.sqlite"))
        if store.schema_version() == 0:
            store.sync_schema()
        poller = workqueue.Poller(backend, 0.02)
        poller.start()
        work = workqueue.WorkQueue(4, poller)
        parent = RecordingParent()
        mgr = manager_mod.CellManager("cell1", "host1", store, backend, parent, work,
                                      transition_timeout=1, retries=3, retry_delay=0.01)
        made.append((poller, work, backend))
        return mgr

    yield make
    for poller, work, backend in made:
        work.drain(5)
        poller.stop()
        backend.stop()


def build_msg(uuids, msg_uuid=None):
    flavor = {"name": "m1.small", "memory_mb": 2048, "vcpus": 1, "root_gb": 20,
              "ephemeral_gb": 0}
    return intercell.Message(
        message_type="targeted", ctxt=intercell.admin_context(),
        method_name="build_instances", direction="down", routing_path="api!cell1",
        hop_count=2, max_hop_count=10, target_cell="api!cell1",
        uuid=msg_uuid or str(uuidlib.uuid4()),
        method_kwargs={"build_inst_kwargs": {
            "instances": [intercell.obj_primitive("Instance", {
                "uuid": u, "display_name": "vm", "memory_mb": 2048}) for u in uuids],
            "filter_properties": {"instance_type": intercell.obj_primitive("Flavor", flavor)},
            "admin_password": "s3cr3t"}})


def delete_msg(uuid):
    msg = build_msg([])
    msg.method_name = "terminate_instance"
    msg.uuid = str(uuidlib.uuid4())
    msg.method_kwargs = {"instance": intercell.obj_primitive("Instance", {"uuid": uuid}),
                         "delete_type": "delete"}
    return msg


def journal(mgr, msg):
    """What the endpoint wrote before the crash: the entry, nothing else."""
    return mgr.store.begin_request(msg.uuid, msg.method_name, None, manager_mod.scrub(msg))


def test_replay_of_a_journaled_build_builds_it_once(make_cell):
    mgr = make_cell()
    u = str(uuidlib.uuid4())
    entry = journal(mgr, build_msg([u]))
    assert mgr.recover() == 1
    wait_for(lambda: "active" in mgr.parent.states(u))
    wait_for(lambda: mgr.store.get_request(entry.id).status == JournalStatus.DONE)
    assert mgr.backend.creates[u] == 1
    assert "s3cr3t" not in mgr.store.get_request(entry.id).payload


def test_replay_after_spawn_but_before_the_report_creates_nothing_new(make_cell):
    mgr = make_cell()
    u = str(uuidlib.uuid4())
    msg = build_msg([u])
    mgr.parent.fail = True                     # the parent's broker never confirms
    mgr.handle(msg)
    wait_for(lambda: "active" in mgr.parent.states(u))
    assert mgr.store.unfinished(), "an unconfirmed report must keep the entry open"
    assert mgr.store.get_operation(u, "build")["status"] == "claimed"

    mgr2 = make_cell(store=mgr.store)          # restart: same store, same cloud file
    assert mgr2.recover() == 1
    wait_for(lambda: "active" in mgr2.parent.states(u))
    wait_for(lambda: not mgr2.store.unfinished())
    assert mgr2.backend.creates[u] == 1
    assert mgr2.store.get_operation(u, "build")["status"] == "done"


def test_resent_build_for_a_built_instance_is_dropped(make_cell, caplog):
    mgr = make_cell()
    u = str(uuidlib.uuid4())
    mgr.handle(build_msg([u]))
    wait_for(lambda: "active" in mgr.parent.states(u))
    before = len(mgr.parent.sent)
    mgr.handle(build_msg([u]))                 # the top's re-send: new message uuid
    time.sleep(0.1)
    # Nothing built again; one update tells the top where the instance is.
    assert len(mgr.parent.sent) == before + 1
    assert mgr.parent.states(u)[-1] == "active"
    assert mgr.backend.creates[u] == 1
    assert "already built" in caplog.text


def test_replayed_delete_after_the_delete_repeats_destroy_at_top(make_cell):
    mgr = make_cell()
    u = str(uuidlib.uuid4())
    mgr.handle(build_msg([u]))
    wait_for(lambda: "active" in mgr.parent.states(u))
    mgr.parent.fail = True
    mgr.handle(delete_msg(u))
    wait_for(lambda: "instance_destroy_at_top" in mgr.parent.methods())
    assert mgr.store.get_instance(u).deleted and mgr.store.unfinished()

    mgr2 = make_cell(store=mgr.store)
    mgr2.recover()
    wait_for(lambda: "instance_destroy_at_top" in mgr2.parent.methods())
    wait_for(lambda: not mgr2.store.unfinished())


def test_stuck_pending_build_ends_in_error_with_a_fault(make_cell):
    mgr = make_cell(driver="fake-pending-forever")
    u = str(uuidlib.uuid4())
    mgr.handle(build_msg([u]))
    wait_for(lambda: "error" in mgr.parent.states(u), 5)
    faults = [p for m, p in mgr.parent.sent if m == "instance_fault_create_at_top"]
    assert faults and "did not become active" in faults[0]["message"]


def test_delete_does_not_wait_for_a_build_stuck_in_pending(make_cell):
    mgr = make_cell(driver="fake-pending-forever")
    mgr.transition_timeout = 300
    u = str(uuidlib.uuid4())
    mgr.handle(build_msg([u]))
    wait_for(lambda: mgr.work.poller.waiting() == 1)
    start = time.monotonic()
    mgr.handle(delete_msg(u))
    wait_for(lambda: "instance_destroy_at_top" in mgr.parent.methods(), 5)
    assert time.monotonic() - start < 5


def test_transient_backend_errors_are_retried(make_cell):
    mgr = make_cell(driver="fake-flaky")
    u = str(uuidlib.uuid4())
    mgr.handle(build_msg([u]))
    wait_for(lambda: "active" in mgr.parent.states(u))
    assert mgr.backend.creates[u] == 1


def test_a_corrupt_journal_entry_fails_alone_on_replay(make_cell, caplog):
    mgr = make_cell()
    bad = mgr.store.begin_request(str(uuidlib.uuid4()), "build_instances", None, "{not json")
    u = str(uuidlib.uuid4())
    good = journal(mgr, build_msg([u]))
    assert mgr.recover() == 2
    entry = mgr.store.get_request(bad.id)
    assert entry.status == JournalStatus.FAILED and "cannot be replayed" in entry.error
    assert str(bad.id) in caplog.text
    wait_for(lambda: mgr.store.get_request(good.id).status == JournalStatus.DONE)
    assert mgr.backend.creates[u] == 1
