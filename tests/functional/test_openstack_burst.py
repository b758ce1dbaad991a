"""A top cell bursting into the real nova-api peer, on the real RabbitMQ (issue 6).

The top (``cellagent-top``) has two children, ``cellagent`` subprocesses on
their own vhosts: a private cell on the fake backend and an OpenStack cell
(``[backend] driver = openstack``) whose servers are really created in the
nova-api peer (tests/openstack_peer). The test drives the top through
``cellagent-client`` as tests/functional/test_top_burst.py does: fill the
private cell, burst into the OpenStack one, list, reboot, stop and start,
delete everything, and the next server goes private again. Then the
exactly-once promise of the OpenStack cell: a create whose response the peer
drops, the agent killed and restarted, still ends with one remote server.
"""

import collections
import contextlib
import json
import subprocess
import uuid

import pytest
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from novaclient import client as nova_client

from tests.functional import conftest
from tests.functional import openstack_fixtures
from tests.functional.conftest import AgentProcess, rabbit_url, wait_for
from tests.functional.test_top_burst import PRIVATE_RAM_MB, TopProcess

nova_peer_venv = openstack_fixtures.nova_peer_venv
nova_peer = openstack_fixtures.nova_peer

CREATE = "POST /v2.1/servers"


@pytest.fixture
def os_vhosts(rabbit):
    names = {role: "cellagent-test-%s-%s" % (role, uuid.uuid4().hex[:8])
             for role in ("top", "private", "openstack")}
    for name in names.values():
        conftest._ctl("add_vhost", name)
        conftest._ctl("set_permissions", "-p", name, conftest.RABBIT_USER, ".*", ".*", ".*")
    yield names
    for name in names.values():
        with contextlib.suppress(subprocess.CalledProcessError):
            conftest._ctl("delete_vhost", name)


class OpenStackTop(TopProcess):
    """The template's top with a private cell and an OpenStack (public) cell."""

    def __init__(self, tmp_path, vhosts, **overrides):
        # The template names its cells public and silent: rewritten below.
        super().__init__(tmp_path, dict(vhosts, public=vhosts["openstack"],
                                        silent=vhosts["openstack"]), **overrides)
        cells = {
            "private": {"transport_url": rabbit_url(vhosts["private"]), "tier": "private"},
            "openstack": {"transport_url": rabbit_url(vhosts["openstack"]),
                          "tier": "public", "cost_per_vcpu_hour": 0.05},
        }
        (tmp_path / "top-cells.json").write_text(json.dumps(cells))


def admin_nova(peer):
    sess = ks_session.Session(auth=v3.Password(**peer.auth), timeout=30)
    return nova_client.Client("2.96", session=sess)


def remote_servers(peer, owner):
    """Servers in the peer carrying ``owner``'s metadata (deleted ones excluded)."""
    return [s for s in admin_nova(peer).servers.list(search_opts={"name": "^cellagent-"})
            if s.metadata.get("cellagent_owner") == owner]


@pytest.fixture
def os_cloud(tmp_path, os_vhosts, nova_peer):
    procs = []
    owner = "burst-%s" % uuid.uuid4().hex[:8]

    def child(name, **overrides):
        path = tmp_path / name
        path.mkdir()
        agent = AgentProcess(path, os_vhosts[name], os_vhosts["top"], name=name,
                             **overrides)
        (path / "cells.json").write_text(json.dumps(
            {"top": {"transport_url": rabbit_url(os_vhosts["top"]), "is_parent": True}}))
        procs.append(agent)
        return agent

    top = OpenStackTop(tmp_path, os_vhosts)
    procs.append(top)
    private = child("private", fake__ram_mb=PRIVATE_RAM_MB, fake__spawn_delay=0.3)
    auth = nova_peer.auth
    openstack = child(
        "openstack", backend__driver="openstack", backend__poll_interval=0.3,
        openstack__auth_url=auth["auth_url"], openstack__username=auth["username"],
        openstack__password=auth["password"], openstack__project_name=auth["project_name"],
        openstack__owner=owner,
        openstack__flavor_map="m1.small:m1.small,m1.tiny:m1.tiny",
        openstack__image_map="cirros:cirros", openstack__networks="auto",
        openstack__lost_create_grace=5)
    yield top, private, openstack, owner
    for p in reversed(procs):
        with contextlib.suppress(AssertionError):
            p.terminate()
    for server in remote_servers(nova_peer, owner):
        with contextlib.suppress(Exception):
            server.delete()


def _all_active(top, count):
    servers = top.servers()
    return len(servers) == count and all(s["vm_state"] == "active" for s in servers)


def _settled(top, uuid_, vm_state):
    s = top.client("server", "show", uuid_)
    return s and s["vm_state"] == vm_state and s["task_state"] is None


def _remote_status(peer, owner, uuid_):
    for s in remote_servers(peer, owner):
        if s.name == "cellagent-" + uuid_:
            return s.status
    return None


def test_burst_into_openstack_and_back(os_cloud, nova_peer):
    top, private, openstack, owner = os_cloud
    private.start()
    openstack.start()
    top.start()
    wait_for(lambda: all(top.cells()[c]["last_seen"] for c in ("private", "openstack")),
             30, 0.2, "both children to report")

    for i in range(6):
        created = top.client("server", "create", "--flavor", "m1.small", "--image", "cirros",
                             "--name", "web-%d" % i)
        assert created and created[0]["vm_state"] == "building"
        wait_for(lambda n=i + 1: _all_active(top, n), 40, 0.2, "server %d active" % i)

    servers = top.servers()
    cells = collections.Counter(s["cell"] for s in servers)
    assert cells == {"private": 3, "openstack": 3}, cells
    first_burst = min(s["created_at"] for s in servers if s["cell"] == "openstack")
    assert all(s["created_at"] <= first_burst for s in servers if s["cell"] == "private")
    assert len(private.cloud()["instances"]) == 3

    # Really created in the peer, one server per instance, named for it.
    bursted = {s["uuid"]: s for s in servers if s["cell"] == "openstack"}
    remote = {s.name: s for s in remote_servers(nova_peer, owner)}
    assert sorted(remote) == sorted("cellagent-" + u for u in bursted)
    assert all(s.status == "ACTIVE" for s in remote.values())
    # The uniform view shows the remote addresses.
    for uuid_, s in bursted.items():
        remote_ips = {a["addr"] for net in remote["cellagent-" + uuid_].addresses.values()
                      for a in net}
        assert s["access_ip_v4"] in remote_ips, (s, remote_ips)
        shown = {a.get("address") or a.get("addr") for a in s.get("addresses") or []}
        assert shown & remote_ips, (s.get("addresses"), remote_ips)
        assert s["tier"] == "public"

    target = sorted(bursted)[0]
    assert top.client("server", "reboot", target)
    wait_for(lambda: _settled(top, target, "active"), 40, 0.2, "rebooted")
    assert top.client("server", "stop", target)
    wait_for(lambda: _settled(top, target, "stopped"), 40, 0.2, "stopped")
    assert _remote_status(nova_peer, owner, target) == "SHUTOFF"
    assert top.client("server", "start", target)
    wait_for(lambda: _settled(top, target, "active"), 40, 0.2, "started")
    assert _remote_status(nova_peer, owner, target) == "ACTIVE"

    for s in servers:
        assert top.client("server", "delete", s["uuid"])
    wait_for(lambda: not top.servers(), 40, 0.2, "every server deleted")
    wait_for(lambda: not remote_servers(nova_peer, owner), 30, 0.2,
             "no server left in the peer")
    assert private.cloud()["instances"] == []

    created = top.client("server", "create", "--flavor", "m1.small", "--image", "cirros",
                         "--name", "after")
    wait_for(lambda: _all_active(top, 1), 30, 0.2, "the new server active")
    assert top.servers()[0]["cell"] == "private"
    assert created[0]["uuid"] == top.servers()[0]["uuid"]
    assert not remote_servers(nova_peer, owner)
    assert top.terminate() == 0


def test_lost_create_response_and_restart_leave_one_remote_server(os_cloud, nova_peer):
    top, private, openstack, owner = os_cloud
    openstack.start()
    top.start()
    wait_for(lambda: top.cells()["openstack"]["last_seen"], 30, 0.2, "the cell to report")

    nova_peer.reset_stats()
    nova_peer.inject_fault("POST", r"^/v2\.1/servers$", action="drop_response")
    try:
        created = top.client("server", "create", "--flavor", "m1.tiny", "--image", "cirros",
                             "--name", "once", "--cell", "openstack")
        uuid_ = created[0]["uuid"]
        # nova made the server; its answer was dropped. The agent dies
        # before it learns the outcome, its journal holds the build.
        wait_for(lambda: nova_peer.stats().get(CREATE, 0) >= 1, 20, 0.1, "the create sent")
        openstack.kill()
    finally:
        nova_peer.clear_faults()
    openstack.start()
    wait_for(lambda: _all_active(top, 1), 60, 0.2, "the build active after the restart")
    assert top.client("server", "show", uuid_)["cell"] == "openstack"
    servers = wait_for(lambda: [s for s in remote_servers(nova_peer, owner)
                                if s.status == "ACTIVE"], 20, 0.2, "the remote server")
    assert [s.name for s in remote_servers(nova_peer, owner)] == ["cellagent-" + uuid_]
    assert len(servers) == 1

    assert top.client("server", "delete", uuid_)
    wait_for(lambda: not top.servers(), 30, 0.2, "deleted")
    wait_for(lambda: not remote_servers(nova_peer, owner), 30, 0.2, "deleted remotely")
    assert top.terminate() == 0
