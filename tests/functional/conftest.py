"""Functional fixtures: the machine's real RabbitMQ (and PostgreSQL).

Each test gets its own pair of RabbitMQ vhosts (the child's broker and the
parent's broker: a parent and a child must never share queues), created and
removed with ``rabbitmqctl`` as nameko's ``vhost_pipeline`` does with the
management API. The agent runs as a subprocess of the installed
``cellagent`` console script. A missing broker is a test FAILURE, never a
skip: in CI a skip would hide a broken install.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid

import kombu
import pytest

from tests.unit import helpers

RABBIT_HOST = os.environ.get("CELLAGENT_TEST_RABBIT_HOST", "127.0.0.1")
RABBIT_PORT = int(os.environ.get("CELLAGENT_TEST_RABBIT_PORT", "5672"))
RABBIT_USER = os.environ.get("CELLAGENT_TEST_RABBIT_USER", "guest")
RABBIT_PASS = os.environ.get("CELLAGENT_TEST_RABBIT_PASSWORD", "guest")
BIN = os.path.join(os.path.dirname(sys.executable), "cellagent")
BASE = "cells.intercell"


def pytest_collection_modifyitems(items):
    for item in items:
        if "/functional/" in str(item.fspath):
            item.add_marker(pytest.mark.functional)


def wait_for(predicate, timeout=30.0, interval=0.05, what="condition"):
    """tests.unit.helpers.wait_for with the broker's slower defaults."""
    return helpers.wait_for(predicate, timeout, interval, what)


def rabbit_url(vhost):
    return "rabbit://%s:%s@%s:%d/%s" % (RABBIT_USER, RABBIT_PASS, RABBIT_HOST, RABBIT_PORT,
                                        vhost)


def amqp_url(vhost):
    return "amqp://%s:%s@%s:%d/%s" % (RABBIT_USER, RABBIT_PASS, RABBIT_HOST, RABBIT_PORT,
                                      vhost)


@pytest.fixture(scope="session")
def rabbit():
    """Fail (not skip) when the broker or rabbitmqctl is missing."""
    try:
        with socket.create_connection((RABBIT_HOST, RABBIT_PORT), timeout=5):
            pass
    except OSError as e:
        pytest.fail("RabbitMQ is not reachable on %s:%d (%s); start it with "
                    "'rabbitmq-server -detached'" % (RABBIT_HOST, RABBIT_PORT, e))
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is needed to create a vhost per test")
    return True


def _ctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=60)


@pytest.fixture
def vhosts(rabbit):
    """Two fresh vhosts: (child, parent)."""
    names = ["cellagent-test-%s-%s" % (role, uuid.uuid4().hex[:8]) for role in ("child", "api")]
    for name in names:
        _ctl("add_vhost", name)
        _ctl("set_permissions", "-p", name, RABBIT_USER, ".*", ".*", ".*")
    yield names
    for name in names:
        try:
            _ctl("delete_vhost", name)
        except subprocess.CalledProcessError:
            pass


class Received:
    """One message as a stock Stein parent would take it off its broker."""

    def __init__(self, queue, body, properties):
        self.queue = queue
        self.raw = body
        self.properties = properties
        self.envelope = json.loads(body)
        self.rpc = json.loads(self.envelope["oslo.message"])
        self.message = json.loads(self.rpc["args"]["message"])

    @property
    def method(self):
        return self.message["method_name"]

    @property
    def kwargs(self):
        return self.message["method_kwargs"]

    def instance(self):
        prim = self.kwargs["instance"]
        return prim["nova_object.data"], prim.get("nova_object.changes", [])


class StockParent:
    """Plays a stock Stein API cell named ``api`` on RabbitMQ.

    Declares on the parent vhost exactly what a ``nova-cells`` process
    declares (section 1.2), records every message that arrives, and
    publishes Stein-format casts on the child's vhost.
    """

    def __init__(self, parent_vhost, child_vhost, name="api"):
        self.name = name
        self.child_vhost = child_vhost
        self.messages = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._conn = kombu.Connection(amqp_url(parent_vhost))
        self._pub = kombu.Connection(amqp_url(child_vhost))
        nova = kombu.Exchange("nova", type="topic", durable=False, auto_delete=False)
        self._queues = []
        host = "api-host"
        for mtype in ("targeted", "broadcast", "response"):
            topic = "%s.%s" % (BASE, mtype)
            self._queues.append(kombu.Queue(topic, nova, routing_key=topic, durable=False,
                                            auto_delete=False))
            self._queues.append(kombu.Queue("%s.%s" % (topic, host), nova,
                                            routing_key="%s.%s" % (topic, host),
                                            durable=False, auto_delete=False))
            fan = kombu.Exchange(topic + "_fanout", type="fanout", durable=False,
                                 auto_delete=True)
            self._queues.append(kombu.Queue("%s_fanout_%s" % (topic, uuid.uuid4().hex), fan,
                                            durable=False, auto_delete=False,
                                            queue_arguments={"x-expires": 1800000}))
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        assert self._ready.wait(20), "parent consumer did not start"

    def _consume(self):
        with self._conn.channel() as channel:
            consumer = kombu.Consumer(channel, self._queues, callbacks=[self._on_message],
                                      accept=["json"])
            consumer.consume()
            self._ready.set()
            while not self._stop.is_set():
                try:
                    self._conn.drain_events(timeout=0.2)
                except socket.timeout:
                    pass

    def _on_message(self, body, message):
        queue = message.delivery_info.get("routing_key") or message.delivery_info.get(
            "exchange")
        rec = Received(queue or "", message.body, message.properties)
        with self.lock:
            self.messages.append((message.delivery_info.get("exchange"), rec))
        message.ack()

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self._conn.release()
        self._pub.release()

    # -- what arrived ---------------------------------------------------------

    def received(self, method=None):
        with self.lock:
            return [m for _, m in self.messages if method is None or m.method == method]

    def received_with_exchange(self, method):
        with self.lock:
            return [(ex, m) for ex, m in self.messages if m.method == method]

    def updates(self, instance_uuid):
        return [m for m in self.received("instance_update_at_top")
                if m.instance()[0].get("uuid") == instance_uuid]

    def view(self, instance_uuid):
        """The top's row after applying every update's changed fields."""
        row = {}
        for m in self.updates(instance_uuid):
            data, changes = m.instance()
            for field in changes:
                row[field] = data.get(field)
        return row

    def destroyed(self):
        return {m.kwargs["instance"]["nova_object.data"]["uuid"]
                for m in self.received("instance_destroy_at_top")}

    # -- sending like Stein ---------------------------------------------------

    def cast(self, message, routing_key=BASE + ".targeted"):
        """Publish one cells message as Stein's oslo.messaging 9.5 put it on the wire."""
        ctxt = message["ctxt"]
        rpc = {"method": "process_message", "args": {"message": json.dumps(message)},
               "version": "1.0", "_unique_id": uuid.uuid4().hex}
        rpc.update(("_context_%s" % k, v) for k, v in ctxt.items())
        body = json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(rpc)})
        self.publish_raw(body, routing_key)

    def publish_raw(self, body, routing_key=BASE + ".targeted"):
        producer = kombu.Producer(self._pub.channel())
        producer.publish(body, exchange=kombu.Exchange("nova", type="topic", durable=False),
                         routing_key=routing_key, content_type="application/json",
                         content_encoding="utf-8", declare=[])
        producer.channel.close()


@pytest.fixture
def parent(vhosts):
    child_vhost, parent_vhost = vhosts
    p = StockParent(parent_vhost, child_vhost)
    yield p
    p.close()


class AgentProcess:
    """A ``cellagent`` subprocess with its own config file and state."""

    def __init__(self, tmp_path, child_vhost, parent_vhost, name="cell1", db_url=None,
                 **overrides):
        self.tmp = tmp_path
        self.child_vhost = child_vhost
        self.log_path = tmp_path / "agent.log"
        self.cloud_file = tmp_path / "cloud.json"
        cells = tmp_path / "cells.json"
        cells.write_text(json.dumps({"api": {"transport_url": rabbit_url(parent_vhost),
                                             "is_parent": True, "weight_offset": 0.0,
                                             "weight_scale": 1.0}}))
        groups = {
            "DEFAULT": {"transport_url": rabbit_url(child_vhost), "host": "agent-host",
                        "state_path": str(tmp_path / "state"), "debug": "false",
                        "log_file": str(self.log_path)},
            "cells": {"name": name, "cells_config": str(cells), "report_delay": "0.2",
                      "report_interval": "30", "drain_timeout": "10"},
            "backend": {"driver": "fake", "poll_interval": "0.1", "transition_timeout": "30"},
            "fake": {"ram_mb": "20480", "cloud_file": str(self.cloud_file),
                     "spawn_delay": "0.2", "reboot_delay": "0.2", "stop_delay": "0.1",
                     "start_delay": "0.1", "delete_delay": "0.1"},
            "database": {},
        }
        if db_url:
            groups["database"]["connection"] = db_url
        for key, value in overrides.items():
            group, _, opt = key.rpartition("__")
            groups.setdefault(group or "DEFAULT", {})[opt] = str(value)
        lines = []
        for group, opts in groups.items():
            lines.append("[%s]" % group)
            lines.extend("%s = %s" % kv for kv in opts.items())
        self.conf_path = tmp_path / "cellagent.conf"
        self.conf_path.write_text("\n".join(lines) + "\n")
        self.proc = None

    def start(self, env=None, wait=True):
        self.proc = subprocess.Popen([BIN, "--config-file", str(self.conf_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=dict(os.environ, **(env or {})))
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=30):
        def consuming():
            if self.proc.poll() is not None:
                raise AssertionError("agent exited with %s: %s" % (
                    self.proc.returncode, self.proc.stderr.read().decode()[-2000:]))
            try:
                with kombu.Connection(amqp_url(self.child_vhost)) as conn:
                    ch = conn.channel()
                    _, _, consumers = ch.queue_declare(BASE + ".targeted", passive=True)
                    return consumers > 0
            except Exception:  # noqa: B902 - not declared yet
                return False
        wait_for(consuming, timeout, 0.1, "the agent to consume")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout=30):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("agent did not stop on SIGTERM")
        return self.proc.returncode if self.proc else None

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def cloud(self):
        return json.loads(self.cloud_file.read_text())


@pytest.fixture
def agent_factory(tmp_path, vhosts):
    child_vhost, parent_vhost = vhosts
    agents = []

    def make(**kwargs):
        a = AgentProcess(tmp_path, child_vhost, parent_vhost, **kwargs)
        agents.append(a)
        return a

    yield make
    for a in agents:
        try:
            a.terminate()
        except AssertionError:
            pass
