"""The top cell and two child agents, as subprocesses on the real RabbitMQ.

Each cell has its own vhost. The test drives the top through
``cellagent-client`` (in-process, over the top's broker) as a person would:
fill the private cell, watch the burst into the public one, delete
everything, keep builds away from a mute child, and recover a build whose
child was killed and whose message was lost, by the top's re-send, with no
duplicate.
"""

import collections
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from tests.functional import conftest
from tests.functional.conftest import AgentProcess, rabbit_url, wait_for

TOP_BIN = os.path.join(os.path.dirname(sys.executable), "cellagent-top")
# 4 x m1.small (2048 MB) after the 10 % reserve.
PRIVATE_RAM_MB = 9200


@pytest.fixture
def cell_vhosts(rabbit):
    names = {role: "cellagent-test-%s-%s" % (role, uuid.uuid4().hex[:8])
             for role in ("top", "private", "public", "silent")}
    for name in names.values():
        conftest._ctl("add_vhost", name)
        conftest._ctl("set_permissions", "-p", name, conftest.RABBIT_USER, ".*", ".*", ".*")
    yield names
    for name in names.values():
        with contextlib.suppress(subprocess.CalledProcessError):
            conftest._ctl("delete_vhost", name)


class TopProcess:
    def __init__(self, tmp_path, vhosts, **overrides):
        self.tmp = tmp_path
        self.url = rabbit_url(vhosts["top"])
        self.log_path = tmp_path / "top.log"
        cells = {
            "private": {"transport_url": rabbit_url(vhosts["private"]), "tier": "private"},
            "public": {"transport_url": rabbit_url(vhosts["public"]), "tier": "public",
                       "cost_per_vcpu_hour": 0.05},
            # Has a broker but no agent: never reports, so it is mute.
            "silent": {"transport_url": rabbit_url(vhosts["silent"]), "tier": "private"},
        }
        (tmp_path / "top-cells.json").write_text(json.dumps(cells))
        groups = {
            "DEFAULT": {"transport_url": self.url, "host": "top-host",
                        "state_path": str(tmp_path / "top-state"),
                        "log_file": str(self.log_path)},
            "cells": {"name": "top", "cells_config": str(tmp_path / "top-cells.json"),
                      "call_timeout": "10", "mute_child_interval": "30"},
            "top": {"build_ack_timeout": "2", "build_retries": "10",
                    "periodic_interval": "0.2"},
            "scheduler": {"low_watermark": "20", "high_watermark": "40"},
        }
        for key, value in overrides.items():
            group, _, opt = key.rpartition("__")
            groups.setdefault(group or "DEFAULT", {})[opt] = str(value)
        self.conf_path = tmp_path / "top.conf"
        self.conf_path.write_text("\n".join(
            "[%s]\n%s" % (g, "\n".join("%s = %s" % kv for kv in opts.items()))
            for g, opts in groups.items()) + "\n")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([TOP_BIN, "--config-file", str(self.conf_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: self._alive() and self.client("cell", "list") is not None, 30,
                 0.2, "the top to answer")
        return self

    def _alive(self):
        if self.proc.poll() is not None:
            raise AssertionError("cellagent-top exited with %s: %s" % (
                self.proc.returncode, self.proc.stderr.read().decode()[-2000:]))
        return True

    def client(self, *args, check=True):
        from cellagent.cmd import client
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            rc = client.main(["--transport-url", self.url, "--timeout", "5",
                              "--format", "json", *args])
        if rc != 0:
            if check:
                return None
            return rc
        return json.loads(out.getvalue())

    def servers(self):
        return self.client("server", "list") or []

    def cells(self):
        return {c["name"]: c for c in self.client("cell", "list") or []}

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def terminate(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError("cellagent-top did not stop on SIGTERM")
        return self.proc.returncode if self.proc else None


@pytest.fixture
def cloud(tmp_path, cell_vhosts):
    procs = []

    def child(name, **overrides):
        path = tmp_path / name
        path.mkdir()
        agent = AgentProcess(path, cell_vhosts[name], cell_vhosts["top"], name=name,
                             **overrides)
        # The child's parent record is the top, named "top".
        (path / "cells.json").write_text(json.dumps(
            {"top": {"transport_url": rabbit_url(cell_vhosts["top"]), "is_parent": True}}))
        procs.append(agent)
        return agent

    top = TopProcess(tmp_path, cell_vhosts)
    procs.append(top)
    private = child("private", fake__ram_mb=PRIVATE_RAM_MB, fake__spawn_delay=0.3)
    public = child("public", fake__ram_mb=200000, fake__spawn_delay=0.6)
    yield top, private, public, cell_vhosts
    for p in reversed(procs):
        with contextlib.suppress(AssertionError):
            p.terminate()


def _by_cell(servers):
    return collections.Counter(s["cell"] for s in servers)


def _all_active(top, count):
    servers = top.servers()
    return len(servers) == count and all(s["vm_state"] == "active" for s in servers)


def test_fill_private_then_burst_then_delete_everything(cloud):
    top, private, public, _ = cloud
    private.start()
    public.start()
    top.start()
    wait_for(lambda: all(top.cells()[c]["last_seen"] for c in ("private", "public")), 20,
             0.2, "both children to report")
    assert top.cells()["silent"]["mute"] is True

    for i in range(8):
        created = top.client("server", "create", "--flavor", "m1.small", "--image", "cirros",
                             "--name", "web-%d" % i)
        assert created and created[0]["vm_state"] == "building"
        # One at a time, as load arrives: each decision sees the last one.
        wait_for(lambda n=i + 1: _all_active(top, n), 30, 0.2, "server %d active" % i)

    servers = top.servers()
    cells = _by_cell(servers)
    # Private first, while its room after placement stays above 20 %:
    # 9200 MB total, 2048 MB each -> 3 fit above the watermark.
    assert cells["private"] == 3, cells
    assert cells["public"] == 5, cells
    assert "silent" not in cells, "the mute child was chosen"
    first_public = min(s["created_at"] for s in servers if s["cell"] == "public")
    assert all(s["created_at"] <= first_public for s in servers if s["cell"] == "private")
    for s in servers:
        assert s["access_ip_v4"], s
        assert s["tier"] == s["cell"]
    assert "bursting" in top.log().lower() or "burst" in top.log().lower()
    assert len(private.cloud()["instances"]) == 3
    assert len(public.cloud()["instances"]) == 5

    # The private cell's capacity report reached the top.
    assert top.cells()["private"]["free_units"]["m1.small"] <= 1

    for s in servers:
        assert top.client("server", "delete", s["uuid"])
    wait_for(lambda: not top.servers(), 30, 0.2, "every server deleted")
    assert private.cloud()["instances"] == []
    assert public.cloud()["instances"] == []
    # After the scale-in, new work goes private again (room above 40 %).
    created = top.client("server", "create", "--flavor", "m1.small", "--image", "cirros",
                         "--name", "after")
    wait_for(lambda: _all_active(top, 1), 30, 0.2, "the new server active")
    assert top.servers()[0]["cell"] == "private"
    assert created[0]["uuid"] == top.servers()[0]["uuid"]
    assert top.terminate() == 0


def test_killed_child_recovered_by_resend_without_duplicate(cloud):
    top, private, public, vhosts = cloud
    private.start()
    public.start()
    top.start()
    wait_for(lambda: all(top.cells()[c]["last_seen"] for c in ("private", "public")), 20,
             0.2, "both children to report")

    private.kill()
    created = top.client("server", "create", "--flavor", "m1.small", "--image", "cirros",
                         "--name", "survivor", "--cell", "private")
    uuid_ = created[0]["uuid"]
    # The build cast is lost with the agent (as when oslo.messaging acked it
    # and the process died before the journal write).
    wait_for(lambda: _queue_depth(vhosts["private"]) >= 1, 10, 0.1, "the build queued")
    conftest._ctl("purge_queue", "-p", vhosts["private"], conftest.BASE + ".targeted")
    wait_for(lambda: "sending it again" in top.log(), 15, 0.2, "a re-send")
    private.start()
    wait_for(lambda: _all_active(top, 1), 40, 0.2, "the build active after the re-send")
    server = top.client("server", "show", uuid_)
    assert server["cell"] == "private"
    creates = collections.Counter(private.cloud()["creates"])
    assert creates == {uuid_: 1}, creates
    assert not public.cloud_file.exists() or public.cloud()["instances"] == []

    # Console output is a call answered by the child through the top.
    log = top.client("server", "console-log", uuid_)
    assert isinstance(log, str) and log

    # Reboot, stop and start are routed to the instance's cell.
    assert top.client("server", "stop", uuid_)
    wait_for(lambda: top.client("server", "show", uuid_)["vm_state"] == "stopped", 20, 0.2,
             "stopped")
    assert top.client("server", "start", uuid_)
    wait_for(lambda: top.client("server", "show", uuid_)["vm_state"] == "active", 20, 0.2,
             "active again")
    assert top.client("server", "reboot", uuid_, "--hard")
    wait_for(lambda: top.client("server", "show", uuid_)["task_state"] is None
             and top.client("server", "show", uuid_)["vm_state"] == "active", 20, 0.2,
             "rebooted")
    assert top.terminate() == 0


def _queue_depth(vhost):
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name",
                          "messages"], capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == conftest.BASE + ".targeted":
            return int(parts[1])
    return 0
