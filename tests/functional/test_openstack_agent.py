"""The OpenStack backend end to end: a stock Stein parent, a ``cellagent``
subprocess (``[backend] driver = openstack``) on real RabbitMQ, and the
remote cloud played by the real nova-api peer (tests/openstack_peer).

It does what tests/functional/test_ec2_agent.py does for EC2: every
operation the child takes goes through, as Stein casts it (build, soft and hard reboot,
stop/start, pause/unpause, suspend/resume, resize and confirm, snapshot,
rebuild, console output as a call, delete); the test checks what the parent
sees and what the peer's nova really holds.
"""

import json
import uuid

from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

from tests.functional import openstack_fixtures
from tests.functional.conftest import wait_for
from tests.functional.test_ec2_agent import IMAGE_UUID, _settled
from tests.functional.test_lifecycle import action, build_message, check_format
from tests.functional.test_lifecycle import console_output
from tests.functional.test_openstack_backend import CIRROS_ID
from tests.functional.test_openstack_burst import remote_servers

nova_peer_venv = openstack_fixtures.nova_peer_venv
nova_peer_factory = openstack_fixtures.nova_peer_factory

SECRET = "openstack-password-never-logged"    # the peer takes any password


def _remote(peer, owner, instance_uuid):
    """The peer's live servers of one instance (normally one)."""
    return [s for s in remote_servers(peer, owner) if s.name == "cellagent-" + instance_uuid]


def _status(peer, owner, instance_uuid):
    server, = _remote(peer, owner, instance_uuid)
    return server.status


def _cast_and_see(parent, u, msg, task_state, timeout=30):
    """Cast ``msg`` and wait until the parent saw ``task_state`` for ``u``
    (so that a settled check afterwards is not met by the state before)."""
    mark = len(parent.updates(u))
    parent.cast(msg)
    wait_for(lambda: task_state in [m.instance()[0].get("task_state")
                                    for m in parent.updates(u)[mark:]], timeout,
             what="%s to be seen for %s" % (task_state, u))


def _addresses(server):
    return {a["addr"] for net in server.addresses.values() for a in net}


def test_whole_lifecycle_on_openstack(parent, agent_factory, nova_peer_factory):
    # Two computes: nova does not resize onto the same host by default (with
    # one, the resize below ends in NoValidHost, see test_openstack_backend).
    peer = nova_peer_factory(computes=2)
    auth = peer.auth
    owner = "agent-%s" % uuid.uuid4().hex[:8]
    agent = agent_factory(
        backend__driver="openstack", backend__poll_interval=0.2,
        openstack__auth_url=auth["auth_url"], openstack__username=auth["username"],
        openstack__password=SECRET, openstack__project_name=auth["project_name"],
        openstack__owner=owner,
        # Local m1.small runs as the peer's m1.tiny; the resize target
        # m1.medium as the peer's m1.small.
        openstack__flavor_map="m1.small:m1.tiny,m1.medium:m1.small",
        openstack__image_map="%s:cirros" % IMAGE_UUID, openstack__networks="auto",
        openstack__lost_create_grace=5)
    try:
        _lifecycle(parent, agent.start(), peer, owner)
    finally:
        agent.terminate()
        for server in remote_servers(peer, owner):
            server.delete()


def _lifecycle(parent, agent, peer, owner):
    # Build: two servers, active with the remote addresses.
    uuids = [str(uuid.uuid4()) for _ in range(2)]
    parent.cast(build_message(uuids))
    for u in uuids:
        _settled(parent, u, "active")
    servers = {u: _remote(peer, owner, u) for u in uuids}
    assert all(len(s) == 1 for s in servers.values()), servers
    servers = {u: s[0] for u, s in servers.items()}
    for u, server in servers.items():
        assert server.status == "ACTIVE"
        assert server.flavor["original_name"] == "m1.tiny"
        assert server.image["id"] == CIRROS_ID
        assert server.metadata == {"cellagent_instance_uuid": u, "cellagent_generation": "1",
                                   "cellagent_owner": owner}
        # NOTE: nova's Neutron fixture gives every port the same fixed IP
        # (192.168.1.30), so this cannot tell two servers' addresses apart;
        # it checks that the parent sees the remote address, not whose.
        row = parent.view(u)
        ips = _addresses(server)
        assert row["access_ip_v4"] in ips, (row["access_ip_v4"], ips)
        network_info = json.loads(row["info_cache"]["nova_object.data"]["network_info"])
        shown = {ip["address"] for vif in network_info
                 for subnet in vif["network"]["subnets"] for ip in subnet["ips"]}
        assert shown and shown <= ips, (shown, ips)
        assert row["power_state"] == 1

    target = uuids[0]
    _cast_and_see(parent, target, action("reboot_instance", target, reboot_type="SOFT"),
                  "rebooting")
    _settled(parent, target, "active")
    _cast_and_see(parent, target, action("reboot_instance", target, reboot_type="HARD"),
                  "rebooting_hard")
    _settled(parent, target, "active")
    assert _status(peer, owner, target) == "ACTIVE"

    parent.cast(action("stop_instance", target, clean_shutdown=True))
    _settled(parent, target, "stopped")
    assert parent.view(target)["power_state"] == 4
    assert _status(peer, owner, target) == "SHUTOFF"
    parent.cast(action("start_instance", target))
    _settled(parent, target, "active")
    assert _status(peer, owner, target) == "ACTIVE"

    parent.cast(action("pause_instance", target))
    _settled(parent, target, "paused")
    assert parent.view(target)["power_state"] == 3
    assert _status(peer, owner, target) == "PAUSED"
    parent.cast(action("unpause_instance", target))
    _settled(parent, target, "active")
    assert _status(peer, owner, target) == "ACTIVE"

    parent.cast(action("suspend_instance", target))
    _settled(parent, target, "suspended")
    assert parent.view(target)["power_state"] == 7
    assert _status(peer, owner, target) == "SUSPENDED"
    parent.cast(action("resume_instance", target))
    _settled(parent, target, "active")
    assert _status(peer, owner, target) == "ACTIVE"

    # Resize to m1.medium (the peer's m1.small): nova resizes the running
    # server; the backend confirms it remotely when it reaches VERIFY_RESIZE,
    # the parent sees it resized, then confirm_resize settles it active.
    parent.cast(action("resize_instance", target, flavor={"flavorid": "3", "name": "m1.medium"},
                       extra_instance_updates={}, clean_shutdown=True))
    _settled(parent, target, "resized", timeout=60)
    row = parent.view(target)
    flavor = row["flavor"]["nova_object.data"]
    assert (flavor["name"], flavor["memory_mb"], flavor["vcpus"]) == ("m1.medium", 4096, 2)
    assert (row["memory_mb"], row["vcpus"], row["root_gb"]) == (4096, 2, 40)
    server, = _remote(peer, owner, target)
    assert server.flavor["original_name"] == "m1.small"
    assert server.status == "ACTIVE"        # confirmed remotely, not VERIFY_RESIZE
    parent.cast(action("confirm_resize", target))
    _settled(parent, target, "active")
    assert parent.view(target)["flavor"]["nova_object.data"]["name"] == "m1.medium"
    other, = _remote(peer, owner, uuids[1])
    assert other.flavor["original_name"] == "m1.tiny"

    # Snapshot: an image of the server in the peer's Glance, reported in
    # system_metadata.
    _cast_and_see(parent, target, action("snapshot_instance", target, image_id="img-1"),
                  "image_snapshot")
    wait_for(lambda: "cellagent_snapshot:img-1" in (
        parent.view(target).get("system_metadata") or {}), 30, what="snapshot reported")
    _settled(parent, target, "active")
    snap = parent.view(target)["system_metadata"]["cellagent_snapshot:img-1"]
    image = _session(peer).get(peer.base + "/image/v2/images/%s" % snap).json()
    assert (image["id"], image["status"]) == (snap, "active")

    # Rebuild: a new launch generation, a new remote server replaces the old
    # one (with the flavor it has now: the peer's m1.small).
    old_id = server.id
    _cast_and_see(parent, target, action(
        "rebuild_instance", target, image_href=IMAGE_UUID, admin_password=None,
        files_to_inject=[], preserve_ephemeral=False, kwargs={}), "rebuild_spawning")
    _settled(parent, target, "active", timeout=40)

    def only_the_new_one():
        live = _remote(peer, owner, target)
        return live if len(live) == 1 and live[0].id != old_id else None
    server, = wait_for(only_the_new_one, 30, what="the old server replaced")
    assert server.metadata["cellagent_generation"] == "2"
    assert server.status == "ACTIVE"
    assert server.flavor["original_name"] == "m1.small"
    assert parent.view(target)["access_ip_v4"] in _addresses(server)

    # Console output: a call answered through the cells protocol, with what
    # the peer's (fake) hypervisor prints.
    _, resp = console_output(parent, target)
    entry = json.loads(resp.kwargs["responses"][0])
    assert entry["failure"] is False
    assert entry["value"] == "FAKE CONSOLE OUTPUT\nANOTHER\nLAST LINE"

    # Delete: destroyed at the top, and really gone from the peer.
    for u in uuids:
        parent.cast(action("terminate_instance", u, delete_type="delete"))
    wait_for(lambda: parent.destroyed() >= set(uuids), 40, what="destroy_at_top")
    # Nova may still list a server whose delete it has accepted for a moment.
    wait_for(lambda: remote_servers(peer, owner) == [], 30, what="no server left in the peer")

    assert parent.received("instance_fault_create_at_top") == []
    for rec in parent.received():
        check_format(rec)
    assert SECRET not in agent.log()
    assert agent.terminate() == 0


def _session(peer):
    return ks_session.Session(auth=v3.Password(**peer.auth), timeout=30)

