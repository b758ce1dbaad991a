"""KombuConsumer's handling of one burst, without a broker.

The channel is a recorder, so the tests see exactly what would be
acknowledged or sent back, and when: a burst is acknowledged only once its
journal transaction is committed, malformed bodies are acknowledged and
dropped, a failed commit sends the whole burst back, calls are acknowledged
when the pool is done with them. The declarations themselves are compared
with oslo.messaging's on a real broker (tests/functional/test_consumer.py).
"""

import json
import threading
import types
import uuid as uuidlib
import zlib

import pytest
from oslo_config import cfg

from cellagent import conf as conf_mod
from cellagent import exception
from cellagent import state
from cellagent.objects import JournalStatus
from cellagent.rpc import consumer as consumer_mod
from cellagent.rpc import endpoint
from cellagent.rpc import intercell
from cellagent.state import memory
from tests.unit import helpers
from tests.unit.test_manager import make_cell  # noqa: F401 - the fixture


class FakeChannel:
    def __init__(self, on_ack=None):
        self.acks = []
        self.rejects = []
        self._on_ack = on_ack

    def basic_ack(self, tag, multiple=False):
        if self._on_ack is not None:
            self._on_ack(tag, multiple)
        self.acks.append((tag, multiple))

    def basic_reject(self, tag, requeue):
        self.rejects.append((tag, requeue))

    def acked(self):
        """Every delivery tag acknowledged, ``multiple`` expanded."""
        done = set()
        for tag, multiple in self.acks:
            done.update(range(1, tag + 1) if multiple else [tag])
        return done


class FakeMessage:
    def __init__(self, tag, body, headers=None):
        self.delivery_tag = tag
        self.body = body
        self.headers = headers
        self.delivery_info = {"routing_key": "cells.intercell.targeted"}


class Sender:
    """What the Router needs of IntercellSender: names, no neighbours, replies."""

    def __init__(self):
        self.our_name = "cell1"
        self.neighbours = types.SimpleNamespace(children=lambda: [], parents=lambda: [])
        self.replies = []

    def respond(self, msg, responses):
        self.replies.append((msg.uuid, responses))


def wire_body(method, kwargs, need_response=False, **fields):
    msg = intercell.new_message("api", "targeted", method, kwargs, "down",
                                target_cell="api!cell1", need_response=need_response)
    for key, value in fields.items():
        setattr(msg, key, value)
    return msg.uuid, json.dumps(intercell.envelope(msg)).encode()


def build_body(instance_uuid):
    return wire_body("build_instances", helpers.build_kwargs([instance_uuid]))


@pytest.fixture
def make_consumer():
    made = []

    def make(mgr, channel):
        sender = Sender()
        router = endpoint.Router(sender, mgr)
        cons = consumer_mod.KombuConsumer("rabbit://guest:guest@127.0.0.1:1/test",
                                          "cells.intercell", "host1", router, mgr.intake,
                                          pool_size=2)
        cons._channel = channel
        cons.sender = sender
        made.append(cons)
        return cons

    yield make
    for cons in made:
        cons._pool.shutdown(wait=True)


def test_malformed_bodies_are_acknowledged_and_dropped(make_cell, make_consumer):  # noqa: F811
    mgr = make_cell()
    channel = FakeChannel()
    cons = make_consumer(mgr, channel)
    good_uuid, good = build_body(str(uuidlib.uuid4()))
    cells = intercell.new_message("api", "targeted", "build_instances", {}, "down",
                                  target_cell="api!cell1").to_dict()
    del cells["message_type"]
    not_cells = json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(
        {"method": "process_message", "args": {"message": json.dumps(cells)},
         "version": "1.0"})})
    bodies = [
        b"not json at all",
        b"[1, 2, 3]",
        json.dumps({"oslo.version": "2.0", "oslo.message": "{"}).encode(),
        json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(
            {"method": "other", "args": {"message": "{}"}, "version": "1.0"})}).encode(),
        json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(
            {"method": "process_message", "args": {"message": "{}"}, "version": "2.0"})}
        ).encode(),
        not_cells.encode(),
        b"\xff\xfe",
        good,
    ]
    burst = [FakeMessage(i + 1, body) for i, body in enumerate(bodies)]
    burst.append(FakeMessage(len(bodies) + 1, good,
                             headers={"compression": "application/x-gzip"}))
    burst.append(FakeMessage(len(bodies) + 2, zlib.compress(b"{not json"),
                             headers={"compression": "application/x-gzip"}))
    cons._handle(burst)
    assert channel.acked() == set(range(1, len(burst) + 1))
    assert channel.rejects == []
    assert cons._router.dropped == 9
    # The one good build went through (its gzip twin was not JSON either).
    assert mgr.store.get_request(good_uuid) is not None
    helpers.wait_for(lambda: "active" in mgr.parent.states(
        json.loads(json.loads(json.loads(good)["oslo.message"])["args"]["message"])
        ["method_kwargs"]["build_inst_kwargs"]["instances"][0]["nova_object.data"]["uuid"]))


def test_compressed_bodies_are_read(make_cell, make_consumer):  # noqa: F811
    mgr = make_cell()
    channel = FakeChannel()
    cons = make_consumer(mgr, channel)
    msg_uuid, body = build_body(str(uuidlib.uuid4()))
    cons._handle([FakeMessage(1, zlib.compress(body),
                              headers={"compression": "application/x-gzip"})])
    assert channel.acked() == {1}
    assert mgr.store.get_request(msg_uuid) is not None


def test_a_burst_is_acknowledged_after_its_journal_commit(make_cell, make_consumer,  # noqa: F811
                                                          tmp_path):
    db = "sqlite:///%s" % (tmp_path / "journal.sqlite")
    store = state.get_store(db)
    store.sync_schema()
    mgr = make_cell(store=store)
    other = state.get_store(db)       # another connection: sees committed rows only
    bodies = [build_body(str(uuidlib.uuid4())) for _ in range(5)]
    seen = []

    def on_ack(tag, multiple):
        seen.append([other.get_request(u) is not None for u, _ in bodies])

    channel = FakeChannel(on_ack)
    cons = make_consumer(mgr, channel)
    cons._handle([FakeMessage(i + 1, body) for i, (_, body) in enumerate(bodies)])
    assert channel.acks == [(5, True)]          # one frame for the burst
    assert seen == [[True] * 5]
    for msg_uuid, _ in bodies:
        helpers.wait_for(lambda u=msg_uuid: other.get_request(u).status == JournalStatus.DONE)
    other.close()


class FailingStore(memory.MemoryStore):
    """Commits of batch() fail until ``broken`` is cleared."""

    broken = True

    def batch(self):
        store = self

        class Batch:
            def __enter__(self):
                return self

            def __exit__(self, etype, exc, tb):
                if etype is None and store.broken:
                    raise exception.StateError(reason="disk full")
                return False

            def commit(self):
                if store.broken:
                    raise exception.StateError(reason="disk full")

            def waiting(self):
                return False

        return Batch()


def test_a_failed_commit_sends_the_burst_back_and_runs_nothing(make_cell,  # noqa: F811
                                                               make_consumer):
    store = FailingStore()
    mgr = make_cell(store=store)
    mgr._inflight = threading.Semaphore(2)      # max_pending_operations = 2
    channel = FakeChannel()
    cons = make_consumer(mgr, channel)
    first = [build_body(str(uuidlib.uuid4())) for _ in range(2)]
    cons._handle([FakeMessage(i + 1, body) for i, (_, body) in enumerate(first)])
    assert channel.acks == []
    assert channel.rejects == [(1, True), (2, True)]
    assert mgr.backend.calls["spawn"] == 0
    # Their slots were given back: the next burst goes through. (A store
    # without transactions kept their entries: redelivered, they would be
    # dropped as duplicates, which is why the agent's stores are SQL.)
    store.broken = False
    done = threading.Event()
    second = [build_body(str(uuidlib.uuid4())) for _ in range(2)]

    def again():
        cons._handle([FakeMessage(i + 3, body) for i, (_, body) in enumerate(second)])
        done.set()

    threading.Thread(target=again, daemon=True).start()
    assert done.wait(30), "the intake waited for slots a failed burst kept"
    assert channel.acked() == {1, 2, 3, 4}
    helpers.wait_for(lambda: mgr.backend.calls["spawn"] == 2)


def test_calls_go_to_the_pool_and_are_acknowledged_when_answered(make_cell,  # noqa: F811
                                                                 make_consumer):
    mgr = make_cell()
    channel = FakeChannel()
    cons = make_consumer(mgr, channel)
    call_uuid, call = wire_body("get_migrations", {"filters": {}}, need_response=True)
    build_uuid, build = build_body(str(uuidlib.uuid4()))
    cons._handle([FakeMessage(1, call), FakeMessage(2, build)])
    # The build is acknowledged alone: the call is still out in the pool.
    assert channel.acks == [(2, False)]
    helpers.wait_for(lambda: cons._acks)
    cons._send_acks()
    assert channel.acked() == {1, 2}
    assert [u for u, _ in cons.sender.replies] == [call_uuid]
    assert mgr.store.get_request(build_uuid) is not None


def test_supported_only_on_plain_rabbit():
    conf = cfg.ConfigOpts()
    conf_mod.register_opts(conf)
    conf([], default_config_files=[])
    assert consumer_mod.supported(conf, "rabbit://guest:guest@127.0.0.1:5672/")
    assert not consumer_mod.supported(conf, "fake:///cell1")
    assert not consumer_mod.supported(conf, "kombu+memory:////cell1")
    conf.set_override("rabbit_quorum_queue", True, "oslo_messaging_rabbit")
    assert not consumer_mod.supported(conf, "rabbit://guest:guest@127.0.0.1:5672/")


class _CutReader:
    """A FrameReader whose socket gave part of a frame and then nothing."""

    def __init__(self, whole_frames):
        self.whole = whole_frames
        self.fills = 0
        self.frames = 0

    def frame_ready(self):
        return self.whole > 0

    def fill(self, timeout):
        self.fills += 1
        return self.fills == 1          # the first read brings a partial frame

    def next_frame(self):
        assert self.whole > 0, "asked to parse a frame that is not all there"
        self.whole -= 1
        self.frames += 1
        return True


def test_a_burst_stops_at_a_frame_cut_short(make_cell, make_consumer):  # noqa: F811
    cons = make_consumer(make_cell(), FakeChannel())
    reader = _CutReader(whole_frames=3)
    cons._read_burst(reader)            # must not block reading the cut frame
    assert reader.frames == 3
    # Bytes arrived but no whole frame: it asked again, then gave up.
    assert reader.fills == 2
