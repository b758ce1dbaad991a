#!/usr/bin/env python3
"""Bus benchmark: N build casts through a real ``cellagent`` vs a raw kombu loop.

Both sides run in the same invocation, on the local RabbitMQ (127.0.0.1 only),
each on its own pair of fresh virtual hosts (child and parent), created with
``rabbitmqctl`` and deleted at the end whatever happens.

Agent side
    ``cellagent --config-file <tmp conf>`` as a subprocess: fake backend with
    no delays, journal on (SQLite under a temporary ``state_path``, or a fresh
    PostgreSQL database with ``--database-url``). The parent vhost holds what
    a stock Stein parent consumes: exchange ``nova`` with the queue
    ``cells.intercell.broadcast`` (instance updates) and the fanout exchange
    ``cells.intercell.targeted_fanout`` with one queue (capacities,
    capabilities).

Baseline side
    A raw kombu process (this script with ``--baseline-worker``) consuming the
    same N bodies from the same queue declaration and, for each one,
    publishing the up messages the agent sent for that instance (the very
    bodies captured on the agent's parent vhost, so the same count and sizes)
    with a per-message publisher confirm (``confirm_publish=True``, the plain
    kombu way), then acking the build.

Measurement (same for both sides)
    The N ``build_instances`` casts (Stein's format: oslo envelope 2.0,
    exchange ``nova``, routing key ``cells.intercell.targeted``, one m1.tiny
    instance each) are published *before* the consumer runs, and the window
    starts when a consumer attaches to the full queue (the agent is started
    once to declare its queues, stopped, the queue filled, then started
    again; the baseline worker is started after the fill). It ends when the
    parent has received an ``instance_update_at_top`` with ``vm_state``
    ``active`` for every one of the N instances (de-duplicated by uuid).
    Process start-up is outside the window.

Output: one JSON line on stdout (progress goes to stderr).

    /work/main/.venv/bin/python benchmarks/bus.py [--count 20000]
        [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
"""

import argparse
import collections
import json
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid as uuidlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BROKER = "127.0.0.1:5672"
USER = PASSWORD = "guest"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "")
BASE = "cells.intercell"
TARGETED = BASE + ".targeted"
BROADCAST = BASE + ".broadcast"
TARGETED_FANOUT = TARGETED + "_fanout"
CELLAGENT = os.path.join(ROOT, ".venv", "bin", "cellagent")
M1_TINY = {"id": 1, "flavorid": "1", "name": "m1.tiny", "memory_mb": 512, "vcpus": 1,
           "root_gb": 1, "ephemeral_gb": 0, "swap": 0, "rxtx_factor": 1.0,
           "vcpu_weight": 0, "disabled": False, "is_public": True, "extra_specs": {},
           "description": None}


def log(fmt, *args):
    sys.stderr.write("[bus %s] %s\n" % (time.strftime("%H:%M:%S"), fmt % args))
    sys.stderr.flush()


class Stop(Exception):
    """SIGTERM/SIGINT: unwind through every ``finally``."""


def _on_signal(signum, frame):
    raise Stop("signal %d" % signum)


# -- broker helpers ------------------------------------------------------------


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def amqp_url(vhost):
    return "amqp://%s:%s@%s/%s" % (USER, PASSWORD, BROKER, urllib.parse.quote(vhost, safe=""))


def rabbit_url(vhost):
    """The oslo.messaging transport_url of a vhost."""
    return "rabbit://%s:%s@%s/%s" % (USER, PASSWORD, BROKER, urllib.parse.quote(vhost, safe=""))


class Vhosts:
    """Fresh vhosts, deleted by ``delete_all`` (call it in a ``finally``)."""

    def __init__(self):
        self.tag = uuidlib.uuid4().hex[:8]
        self.created = []

    def new(self, role):
        name = "cellagent-bench-%s-%s" % (self.tag, role)
        rabbitmqctl("add_vhost", name)
        self.created.append(name)
        rabbitmqctl("set_permissions", "-p", name, USER, ".*", ".*", ".*")
        return name

    def delete_all(self):
        for name in self.created:
            try:
                rabbitmqctl("delete_vhost", name)
            except Exception as e:  # noqa: B902 - keep deleting the others
                log("could not delete vhost %s: %s", name, e)
        self.created = []


def nova_exchange(kombu):
    return kombu.Exchange("nova", type="topic", durable=False, auto_delete=False)


def declare_child_queue(kombu, channel):
    """``cells.intercell.targeted`` as oslo.messaging declares it (no quorum, no HA)."""
    kombu.Queue(TARGETED, nova_exchange(kombu), routing_key=TARGETED, durable=False,
                auto_delete=False)(channel).declare()


def declare_parent(kombu, vhost):
    """What a stock Stein parent consumes; returns the fanout queue's name."""
    fanout_q = "%s_%s" % (TARGETED_FANOUT, uuidlib.uuid4().hex)
    with kombu.Connection(amqp_url(vhost), connect_timeout=5) as conn:
        ch = conn.channel()
        kombu.Queue(BROADCAST, nova_exchange(kombu), routing_key=BROADCAST, durable=False,
                    auto_delete=False)(ch).declare()
        fanout = kombu.Exchange(TARGETED_FANOUT, type="fanout", durable=False,
                                auto_delete=True)
        kombu.Queue(fanout_q, fanout, durable=False, auto_delete=False,
                    queue_arguments={"x-expires": 1800000})(ch).declare()
    return fanout_q


class QueueWatch:
    """Passive declares of one queue: (messages, consumers)."""

    def __init__(self, vhost, queue):
        import amqp
        self._amqp = amqp
        self.queue = queue
        self.conn = amqp.Connection(host=BROKER, userid=USER, password=PASSWORD,
                                    virtual_host=vhost, connect_timeout=5)
        self.conn.connect()
        self.ch = self.conn.channel()

    def stats(self):
        """(message_count, consumer_count), or None while the queue does not exist."""
        try:
            _, messages, consumers = self.ch.queue_declare(self.queue, passive=True)
            return messages, consumers
        except self._amqp.exceptions.NotFound:
            self.ch = self.conn.channel()
            return None

    def wait(self, predicate, timeout, what, interval=0.001, alive=None):
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if st is not None and predicate(*st):
                return time.monotonic(), st
            if alive is not None:
                alive()
            if time.monotonic() > deadline:
                raise RuntimeError("timed out after %.0f s waiting for %s (queue %s: %s)"
                                   % (timeout, what, self.queue, st))
            time.sleep(interval)

    def close(self):
        try:
            self.conn.close()
        except Exception:  # noqa: B902
            pass


# -- the build casts -------------------------------------------------------------


def make_builds(n):
    """N (instance uuid, AMQP body bytes) in Stein's build_instances format (2.9 ex. 1)."""
    from cellagent.rpc import intercell
    user, project = uuidlib.uuid4().hex, uuidlib.uuid4().hex
    image_id = str(uuidlib.uuid4())
    network_id = str(uuidlib.uuid4())
    out = []
    for i in range(n):
        uuid = str(uuidlib.uuid4())
        name = "bench-%d" % i
        ctxt = intercell.admin_context()
        ctxt.update({
            "user": user, "tenant": project, "project": project, "user_domain": "default",
            "project_domain": "default", "is_admin": False,
            "auth_token": "gAAAAABbench" + uuidlib.uuid4().hex,
            "roles": ["member", "reader"],
            "user_identity": "%s %s - default default" % (user, project),
            "user_id": user, "project_id": project, "remote_address": "127.0.0.1",
            "user_name": "bench", "project_name": "bench",
            "service_catalog": [{"type": "image", "name": "glance", "endpoints": [
                {"region": "RegionOne", "interface": "public",
                 "url": "http://127.0.0.1:9292"}]}]})
        instance = intercell.obj_primitive("Instance", {
            "id": i + 1, "uuid": uuid, "display_name": name, "hostname": name,
            "project_id": project, "user_id": user, "image_ref": image_id,
            "vm_state": "building", "task_state": "scheduling", "power_state": 0,
            "memory_mb": 512, "vcpus": 1, "root_gb": 1, "ephemeral_gb": 0,
            "instance_type_id": 1, "availability_zone": None, "key_name": None,
            "key_data": None, "user_data": None, "reservation_id": "r-%08x" % i,
            "launch_index": 0, "config_drive": "", "metadata": {"bench": "bus"},
            "cell_name": None, "locked": False,
            "created_at": intercell.format_obj_datetime()})
        kwargs = {"build_inst_kwargs": {
            "instances": [instance],
            "image": {"id": image_id, "name": "cirros-0.4.0", "status": "active",
                      "container_format": "bare", "disk_format": "qcow2", "min_disk": 0,
                      "min_ram": 0, "size": 12716032, "properties": {}},
            "filter_properties": {"scheduler_hints": {},
                                  "instance_type": intercell.obj_primitive("Flavor", M1_TINY)},
            "admin_password": "bench-password",
            "injected_files": [],
            "requested_networks": intercell.obj_primitive("NetworkRequestList", {"objects": [
                intercell.obj_primitive("NetworkRequest", {
                    "network_id": network_id, "address": None, "port_id": None,
                    "tag": None}, ["address", "network_id", "port_id", "tag"])]}),
            "security_groups": ["default"],
            "block_device_mapping": intercell.obj_primitive("BlockDeviceMappingList", {
                "objects": [intercell.obj_primitive("BlockDeviceMapping", {
                    "source_type": "image", "destination_type": "local", "boot_index": 0,
                    "delete_on_termination": True, "image_id": image_id,
                    "device_name": None, "volume_size": None, "guest_format": None,
                    "disk_bus": None, "device_type": "disk", "no_device": False},
                    ["boot_index", "delete_on_termination", "destination_type",
                     "device_type", "image_id", "source_type"])]}),
            "legacy_bdm": False}}
        msg = intercell.new_message("api", "targeted", "build_instances", kwargs, "down",
                                    ctxt=ctxt, target_cell="api!cell1")
        out.append((uuid, json.dumps(intercell.envelope(msg)).encode()))
    return out


def fill_queue(kombu, vhost, bodies, timeout):
    """Declare the child queue, publish every body, wait until the queue holds them."""
    with kombu.Connection(amqp_url(vhost), connect_timeout=5) as conn:
        ch = conn.channel()
        declare_child_queue(kombu, ch)
        producer = kombu.Producer(ch, exchange=nova_exchange(kombu))
        for body in bodies:
            producer.publish(body, routing_key=TARGETED, content_type="application/json",
                             content_encoding="utf-8", retry=False)
    watch = QueueWatch(vhost, TARGETED)
    try:
        watch.wait(lambda m, c: m >= len(bodies), timeout, "the filled queue", 0.05)
    finally:
        watch.close()


# -- the parent: counts what arrives ---------------------------------------------------


def _cells_message(body):
    env = json.loads(body)
    rpc = json.loads(env["oslo.message"]) if "oslo.message" in env else env
    return json.loads(rpc["args"]["message"])


class ParentCounter(threading.Thread):
    """Consumes the parent vhost (no ack) and counts instance updates.

    Cheap byte tests classify messages; only bodies that can carry a final
    state (``active``/``error``) are decoded, to find the vm_state and uuid.
    """

    def __init__(self, vhost, fanout_queue, n, keep_bodies=False):
        super().__init__(daemon=True, name="parent-counter")
        self.vhost = vhost
        self.fanout_queue = fanout_queue
        self.n = n
        self.keep = keep_bodies
        self.bodies = []
        self.lock = threading.Lock()
        self.broadcast = 0
        self.fanout = 0
        self.methods = collections.Counter()
        self.active = set()
        self.errors = set()
        self.last_at = None
        self.done_at = None
        self.done = threading.Event()
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.failure = None

    def snapshot(self):
        with self.lock:
            return {"broadcast": self.broadcast, "fanout": self.fanout,
                    "methods": dict(self.methods), "active": len(self.active),
                    "error": len(self.errors)}

    def _body(self, msg):
        body = msg.body
        return body.encode() if isinstance(body, str) else bytes(body)

    def _on_broadcast(self, msg):
        body = self._body(msg)
        now = time.monotonic()
        if b"instance_update_at_top" in body:
            method = "instance_update_at_top"
        elif b"instance_fault_create_at_top" in body:
            method = "instance_fault_create_at_top"
        elif b"instance_destroy_at_top" in body:
            method = "instance_destroy_at_top"
        else:
            method = "other"
        final = None
        if method == "instance_update_at_top" and (b"active" in body or b"error" in body):
            data = _cells_message(body)["method_kwargs"]["instance"]["nova_object.data"]
            final = (data.get("vm_state"), data.get("uuid"))
        with self.lock:
            self.broadcast += 1
            self.methods[method] += 1
            self.last_at = now
            if self.keep:
                self.bodies.append(body)
            if final is not None:
                if final[0] == "active":
                    self.active.add(final[1])
                    if len(self.active) >= self.n and self.done_at is None:
                        self.done_at = now
                        self.done.set()
                elif final[0] == "error":
                    self.errors.add(final[1])

    def _on_fanout(self, msg):
        body = self._body(msg)
        method = ("update_capacities" if b"update_capacities" in body else
                  "update_capabilities" if b"update_capabilities" in body else "other")
        with self.lock:
            self.fanout += 1
            self.methods[method] += 1
            self.last_at = time.monotonic()

    def run(self):
        import amqp
        try:
            conn = amqp.Connection(host=BROKER, userid=USER, password=PASSWORD,
                                   virtual_host=self.vhost, connect_timeout=5)
            conn.connect()
            ch = conn.channel()
            ch.basic_consume(queue=BROADCAST, callback=self._on_broadcast, no_ack=True)
            ch.basic_consume(queue=self.fanout_queue, callback=self._on_fanout, no_ack=True)
            self.ready.set()
            while not self.stopping.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except socket.timeout:
                    pass
            conn.close()
        except Exception as e:  # noqa: B902 - reported by the main thread
            self.failure = e
            self.ready.set()
            self.done.set()

    def wait_quiet(self, quiet=1.5, limit=10.0):
        """Wait until nothing arrived for ``quiet`` s (at most ``limit`` s)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self.lock:
                last = self.last_at
            if last is None or time.monotonic() - last >= quiet:
                return
            time.sleep(0.1)

    def stop(self):
        self.stopping.set()
        self.join(5)


def up_plan(bodies, build_uuids):
    """For each build (in order), the up bodies the agent sent for its instance."""
    by_uuid = collections.defaultdict(list)
    for body in bodies:
        try:
            data = _cells_message(body)["method_kwargs"]["instance"]["nova_object.data"]
        except (KeyError, ValueError, TypeError):
            continue
        by_uuid[data.get("uuid")].append(body)
    plan = [by_uuid.get(u, []) for u in build_uuids]
    missing = sum(1 for p in plan if not p)
    if missing:
        raise RuntimeError("no up message captured for %d instances" % missing)
    return plan


def proc_cpu(pid):
    """(user, system) CPU seconds used so far by process ``pid``, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rpartition(")")[2].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb(pid):
    """Peak resident memory of process ``pid`` (VmHWM), in MB."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_cpu():
    """(busy, iowait, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle, iowait = v[3], v[4]
    return sum(v) - idle - iowait, iowait, sum(v)


class CpuMeter:
    """CPU used by one process and by the whole machine between start and stop."""

    def __init__(self, pid):
        self.pid = pid
        self.p0, self.h0 = proc_cpu(pid), host_cpu()
        self.result = None

    def stop(self):
        p1, h1 = proc_cpu(self.pid), host_cpu()
        total = max(1, h1[2] - self.h0[2])
        self.result = {
            "process_cpu_s": (round(sum(p1) - sum(self.p0), 2)
                              if p1 is not None and self.p0 is not None else None),
            "process_sys_s": (round(p1[1] - self.p0[1], 2)
                              if p1 is not None and self.p0 is not None else None),
            "process_peak_rss_mb": peak_rss_mb(self.pid),
            "host_busy_pct": round(100.0 * (h1[0] - self.h0[0]) / total, 1),
            "host_iowait_pct": round(100.0 * (h1[1] - self.h0[1]) / total, 1),
            "host_cpus": os.cpu_count()}
        return self.result


def rates(n, counter, t0, before, after, extra=None):
    seconds = counter.done_at - t0
    up = (after["broadcast"] + after["fanout"]) - (before["broadcast"] + before["fanout"])
    updates = (after["methods"].get("instance_update_at_top", 0)
               - before["methods"].get("instance_update_at_top", 0))
    out = {"seconds": round(seconds, 3),
           "builds_per_s": round(n / seconds, 1),
           "up_msgs_per_s": round(up / seconds, 1),
           "up_messages": up,
           "instance_updates": updates,
           "up_per_build": round(up / n, 3),
           "active": after["active"], "error": after["error"],
           "methods": {k: v - before["methods"].get(k, 0)
                       for k, v in sorted(after["methods"].items())}}
    out.update(extra or {})
    return out


# -- the agent side -------------------------------------------------------------------


def check_local_db(url):
    import sqlalchemy as sa
    u = sa.engine.make_url(url)
    if u.drivername.startswith("sqlite"):
        return u
    if (u.host or "") not in LOCAL_HOSTS:
        raise SystemExit("--database-url must point at 127.0.0.1 (got host %r)" % u.host)
    return u


class FreshDatabase:
    """A new PostgreSQL database on the server of ``url`` (dropped by ``drop``)."""

    def __init__(self, url):
        import sqlalchemy as sa
        self.sa = sa
        self.admin = check_local_db(url)
        if self.admin.drivername in ("postgresql", "postgres"):
            self.admin = self.admin.set(drivername="postgresql+psycopg")
        self.name = None
        self.url = url
        if self.admin.drivername.startswith("postgresql"):
            self.name = "cellagent_bench_%s" % uuidlib.uuid4().hex[:12]
            self._exec("CREATE DATABASE %s" % self.name)
            self.url = self.admin.set(database=self.name).render_as_string(
                hide_password=False)

    def _exec(self, stmt):
        engine = self.sa.create_engine(self.admin, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(self.sa.text(stmt))
        finally:
            engine.dispose()

    def drop(self):
        if self.name:
            try:
                self._exec("DROP DATABASE IF EXISTS %s WITH (FORCE)" % self.name)
            except Exception as e:  # noqa: B902
                log("could not drop database %s: %s", self.name, e)
            self.name = None


def write_agent_conf(tmp, args, child, parent, db_url):
    cells_json = os.path.join(tmp, "cells.json")
    with open(cells_json, "w") as f:
        json.dump({"api": {"transport_url": rabbit_url(parent), "is_parent": True}}, f)
    n = args.count
    lines = [
        "[DEFAULT]",
        "transport_url = %s" % rabbit_url(child),
        "host = bench-agent",
        "state_path = %s" % os.path.join(tmp, "state"),
        "log_file = %s" % os.path.join(tmp, "agent.log"),
        "debug = %s" % ("true" if args.agent_debug else "false"),
        "",
        "[cells]",
        "name = cell1",
        "cells_config = %s" % cells_json,
        "report_interval = 86400",
        "",
        "[backend]",
        "driver = fake",
        "workers = %d" % args.workers,
        "",
        "[fake]",
        "ram_mb = %d" % (512 * n * 2),
        "disk_gb = %d" % (n * 2 + 100),
        "vcpus = %d" % (n * 2 + 16),
        # The fake floating range is a /24: past 253 instances every spawn
        # would scan it in full and log a warning (not what is measured here).
        "public_ips = false",
        "",
    ]
    if db_url:
        lines += ["[database]", "connection = %s" % db_url, ""]
    sections = collections.OrderedDict()
    for item in args.agent_opt:
        key, _, value = item.partition("=")
        section, _, name = key.rpartition(".")
        sections.setdefault(section or "DEFAULT", []).append("%s = %s" % (name, value))
    for section, entries in sections.items():
        # oslo.config merges repeated sections; later values win.
        lines += ["[%s]" % section] + entries + [""]
    path = os.path.join(tmp, "agent.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


class Agent:
    def __init__(self, conf_path, tmp, command):
        self.command = command
        self.conf_path = conf_path
        self.tmp = tmp
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        out = open(os.path.join(self.tmp, "agent-%d.out" % self.starts), "wb")
        self.proc = subprocess.Popen(self.command + ["--config-file", self.conf_path],
                                     stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        out.close()
        return self.proc.pid

    def check_alive(self):
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError("the agent exited with status %s (see %s)"
                               % (self.proc.returncode, self.tmp))

    def stop(self, timeout=60):
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log("agent %d did not stop in %d s: killing it", proc.pid, timeout)
            proc.kill()
            return proc.wait(10)


def journal_stats(db_url, tmp):
    """Journal entries by status, read after the agent stopped."""
    import sqlalchemy as sa
    url = db_url or "sqlite:///" + os.path.join(tmp, "state", "cellagent.sqlite")
    u = sa.engine.make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    engine = sa.create_engine(u)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT status, count(*) FROM journal GROUP BY status")).all()
        return {str(s): int(c) for s, c in rows}
    except Exception as e:  # noqa: B902 - informative only
        return {"unavailable": type(e).__name__}
    finally:
        engine.dispose()


def stop_profiler(spy):
    """SIGINT makes py-spy write its output."""
    if spy is None or spy.poll() is not None:
        return
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(10)


def run_agent_side(args, vhosts, builds, tmp):
    import kombu
    n = len(builds)
    child, parent = vhosts.new("agent-child"), vhosts.new("agent-parent")
    fanout_q = declare_parent(kombu, parent)
    counter = ParentCounter(parent, fanout_q, n, keep_bodies=True)
    counter.start()
    counter.ready.wait(10)
    if counter.failure:
        raise counter.failure
    db = FreshDatabase(args.database_url) if args.database_url else None
    agent = None
    spy = None
    try:
        conf = write_agent_conf(tmp, args, child, parent, db.url if db else None)
        agent = Agent(conf, tmp, shlex.split(args.agent_cmd))
        # First start: the agent declares its queues; then it is stopped so the
        # queue can be filled while nobody consumes.
        agent.start()
        watch = QueueWatch(child, TARGETED)
        try:
            watch.wait(lambda m, c: c >= 1, args.start_timeout, "the agent's consumer",
                       0.05, agent.check_alive)
            log("agent ready on %s; stopping it to fill the queue", child)
            agent.stop()
            watch.wait(lambda m, c: c == 0, 30, "the agent's consumer to go", 0.05)
            t = time.monotonic()
            fill_queue(kombu, child, [b for _, b in builds], args.start_timeout)
            log("queue %s holds %d builds (%.1f s to publish)", TARGETED, n,
                time.monotonic() - t)
            counter.wait_quiet(0.5, 5)
            pid = agent.start()
            t0, st = watch.wait(lambda m, c: c >= 1, args.start_timeout,
                                "the agent's consumer", 0.001, agent.check_alive)
        finally:
            watch.close()
        meter = CpuMeter(pid)
        before = counter.snapshot()
        log("agent (pid %d) consuming: window open (queue %s)", pid, st)
        if args.profile:
            spy = subprocess.Popen(
                [args.py_spy, "record", "--pid", str(pid), "--rate", str(args.profile_rate),
                 "--format", "raw", "--threads", "--nonblocking", "--output", args.profile,
                 "--duration", str(int(args.timeout))] + (["--gil"] if args.profile_gil else []),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = t0 + args.timeout
        while not counter.done.wait(0.5):
            agent.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("agent side: only %s of %d instances active after %.0f s"
                                   % (counter.snapshot()["active"], n, args.timeout))
            if args.progress:
                log("agent side: %s", counter.snapshot())
        if counter.failure:
            raise counter.failure
        at_done = counter.snapshot()
        cpu = meter.stop()
        log("agent side: all %d active after %.2f s", n, counter.done_at - t0)
        stop_profiler(spy)
        spy = None
        counter.wait_quiet(1.5, 10)
        settled = counter.snapshot()
        agent.stop(args.start_timeout)
        extra = {"cpu": cpu, "journal": journal_stats(db.url if db else None, tmp),
                 "up_messages_incl_trailing": (settled["broadcast"] + settled["fanout"]
                                               - before["broadcast"] - before["fanout"]),
                 "queue_at_start": {"messages": st[0], "consumers": st[1]}}
        result = rates(n, counter, t0, before, at_done, extra)
    finally:
        stop_profiler(spy)
        if agent is not None:
            agent.stop(args.start_timeout)
        counter.stop()
        if db is not None:
            db.drop()
    plan = up_plan(counter.bodies, [u for u, _ in builds])
    return result, plan


# -- the baseline side ------------------------------------------------------------------


def run_baseline_side(args, vhosts, builds, plan, tmp):
    import kombu
    n = len(builds)
    child, parent = vhosts.new("base-child"), vhosts.new("base-parent")
    fanout_q = declare_parent(kombu, parent)
    counter = ParentCounter(parent, fanout_q, n)
    counter.start()
    counter.ready.wait(10)
    if counter.failure:
        raise counter.failure
    plan_path = os.path.join(tmp, "baseline-plan.pickle")
    with open(plan_path, "wb") as f:
        pickle.dump(plan, f, protocol=pickle.HIGHEST_PROTOCOL)
    proc = None
    try:
        fill_queue(kombu, child, [b for _, b in builds], args.start_timeout)
        out = open(os.path.join(tmp, "baseline.out"), "wb")
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--baseline-worker",
             "--child-vhost", child, "--parent-vhost", parent, "--plan", plan_path,
             "--count", str(n), "--timeout", str(args.timeout)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

        def alive():
            if proc.poll() is not None and not counter.done.is_set():
                raise RuntimeError("baseline worker exited with %s (see %s/baseline.out)"
                                   % (proc.returncode, tmp))

        watch = QueueWatch(child, TARGETED)
        try:
            t0, st = watch.wait(lambda m, c: c >= 1, args.start_timeout,
                                "the baseline consumer", 0.001, alive)
        finally:
            watch.close()
        meter = CpuMeter(proc.pid)
        before = counter.snapshot()
        log("baseline (pid %d) consuming: window open (queue %s)", proc.pid, st)
        deadline = t0 + args.timeout
        while not counter.done.wait(0.5):
            if proc.poll() is not None:
                counter.done.wait(2)
                if not counter.done.is_set():
                    alive()
                break
            if time.monotonic() > deadline:
                raise RuntimeError("baseline: only %s of %d active after %.0f s"
                                   % (counter.snapshot()["active"], n, args.timeout))
        if counter.failure:
            raise counter.failure
        at_done = counter.snapshot()
        cpu = meter.stop()
        log("baseline: all %d active after %.2f s", n, counter.done_at - t0)
        return rates(n, counter, t0, before, at_done,
                     {"cpu": cpu, "queue_at_start": {"messages": st[0], "consumers": st[1]}})
    finally:
        if proc is not None and proc.poll() is None:
            if not counter.done.is_set():
                proc.terminate()        # failed or interrupted: no need to wait
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        counter.stop()


def baseline_worker(args):
    """Consume the builds; per build publish its up bodies, one confirm each; ack."""
    import kombu
    with open(args.plan, "rb") as f:
        plan = pickle.load(f)
    n = args.count
    child = kombu.Connection(amqp_url(args.child_vhost), connect_timeout=5)
    parent = kombu.Connection(amqp_url(args.parent_vhost), connect_timeout=5,
                              transport_options={"confirm_publish": True})
    producer = kombu.Producer(parent.channel(), exchange=nova_exchange(kombu))
    producer.declare()
    done = [0]

    def on_message(body, message):
        for up in plan[done[0]]:
            producer.publish(up, routing_key=BROADCAST, content_type="application/json",
                             content_encoding="utf-8", retry=False)
        message.ack()
        done[0] += 1

    queue = kombu.Queue(TARGETED, nova_exchange(kombu), routing_key=TARGETED,
                        durable=False, auto_delete=False)
    deadline = time.monotonic() + args.timeout
    with kombu.Consumer(child.channel(), queues=[queue], callbacks=[on_message],
                        accept=["json"]):
        while done[0] < n and time.monotonic() < deadline:
            try:
                child.drain_events(timeout=1)
            except socket.timeout:
                pass
    child.release()
    parent.release()
    time.sleep(3)   # stay alive while the parent reads our CPU time
    return 0 if done[0] >= n else 1


# -- main --------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=20000, help="build casts (default 20000)")
    p.add_argument("--database-url",
                   help="journal on this database instead of SQLite under a temporary "
                        "state_path; for PostgreSQL a fresh database is created on that "
                        "server (and dropped at the end); must be on 127.0.0.1")
    p.add_argument("--workers", type=int, default=16, help="agent [backend] workers")
    p.add_argument("--agent-opt", action="append", default=[], metavar="SECTION.NAME=VALUE",
                   help="extra agent option (repeatable), e.g. "
                        "DEFAULT.executor_thread_pool_size=8 or fake.public_ips=true")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds allowed per measured window (default 60 + N/20)")
    p.add_argument("--start-timeout", type=float, default=60.0,
                   help="seconds allowed for agent start/stop and queue fills")
    p.add_argument("--skip-baseline", action="store_true", help="agent side only")
    p.add_argument("--profile", metavar="FILE",
                   help="py-spy record (raw collapsed stacks) of the agent during its "
                        "window; slows the agent, so its rates are not comparable")
    p.add_argument("--profile-gil", action="store_true",
                   help="py-spy --gil: only the thread holding the GIL (CPU hot spots)")
    p.add_argument("--profile-rate", type=int, default=97, help="py-spy samples per second")
    p.add_argument("--py-spy", default=os.path.join(ROOT, ".venv", "bin", "py-spy"),
                   help="py-spy executable")
    p.add_argument("--agent-cmd", default=CELLAGENT,
                   help="command that starts the agent; ``--config-file FILE`` is appended "
                        "(e.g. a profiling wrapper); default: %(default)s")
    p.add_argument("--agent-debug", action="store_true", help="agent logs at DEBUG")
    p.add_argument("--keep-tmp", action="store_true",
                   help="keep the temporary directory (conf, logs, journal)")
    p.add_argument("--progress", action="store_true", help="print counts while waiting")
    # internal: the baseline consumer process
    p.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-vhost", help=argparse.SUPPRESS)
    p.add_argument("--parent-vhost", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be positive")
    if args.timeout is None:
        args.timeout = 60.0 + args.count / 20.0
    if args.database_url:
        check_local_db(args.database_url)
    for item in args.agent_opt:
        if "=" not in item or not item.partition("=")[0].strip():
            p.error("--agent-opt takes SECTION.NAME=VALUE, not %r" % item)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.baseline_worker:
        return baseline_worker(args)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    options = {k: v for k, v in sorted(vars(args).items())
               if k not in ("baseline_worker", "child_vhost", "parent_vhost", "plan")}
    if options.get("database_url"):
        import sqlalchemy as sa
        options["database_url"] = sa.engine.make_url(args.database_url).render_as_string(
            hide_password=True)
    tmp = tempfile.mkdtemp(prefix="cellagent-bus-")
    vhosts = Vhosts()
    status = 1
    try:
        t = time.monotonic()
        builds = make_builds(args.count)
        log("%d build casts ready (%.1f s, %d bytes each on average)", len(builds),
            time.monotonic() - t, sum(len(b) for _, b in builds) // len(builds))
        agent, plan = run_agent_side(args, vhosts, builds, tmp)
        baseline = None
        if not args.skip_baseline:
            baseline = run_baseline_side(args, vhosts, builds, plan, tmp)
        up_bodies = [len(b) for p in plan for b in p]
        result = {
            "benchmark": "bus",
            "n": args.count,
            "agent": agent,
            "baseline": baseline,
            "ratio_builds": (round(agent["builds_per_s"] / baseline["builds_per_s"], 3)
                             if baseline else None),
            "ratio_up_msgs": (round(agent["up_msgs_per_s"] / baseline["up_msgs_per_s"], 3)
                              if baseline else None),
            "up_messages_per_build": agent["up_per_build"],
            "instance_updates_per_build": round(agent["instance_updates"] / args.count, 3),
            "build_body_bytes_avg": sum(len(b) for _, b in builds) // len(builds),
            "up_body_bytes_avg": sum(up_bodies) // max(1, len(up_bodies)),
            "window": "consumer attaches to the pre-filled queue -> parent has the "
                      "'active' instance_update_at_top of all N instances",
            "journal": "sqlite" if not args.database_url else "database_url",
            "options": options,
        }
        sys.stdout.write(json.dumps(result, sort_keys=False) + "\n")
        sys.stdout.flush()
        status = 0
    except Stop as e:
        log("interrupted (%s)", e)
        status = 130
    except Exception as e:  # noqa: B902 - one line, then clean up
        log("FAILED: %s: %s (files in %s)", type(e).__name__, e, tmp)
        args.keep_tmp = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        vhosts.delete_all()
        if args.keep_tmp:
            log("kept %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
