"""Smoke test of the nova peer (issue 6, item 8) through the real clients.

keystoneauth1 password auth against the peer's Keystone stand-in, then
python-novaclient and openstacksdk on the real nova-api: flavors, an image
by name, a server's whole life, a quota-exceeded 403, a lost create
response and a restart (``--state-dir``, a restart that keeps the databases,
is tested with the agent in test_openstack_backend.py). The OpenStack
backend's own tests build on this.
"""

import time
import uuid

import openstack.connection
import pytest
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from novaclient import api_versions
from novaclient import client as nova_client
from novaclient import exceptions as nova_exc

from tests.functional import openstack_fixtures
from tests.functional.conftest import wait_for

# The peer's fixtures live outside conftest.py (only these tests pay for them).
nova_peer_venv = openstack_fixtures.nova_peer_venv
nova_peer = openstack_fixtures.nova_peer
nova_peer_factory = openstack_fixtures.nova_peer_factory

CIRROS_ID = "a2fe5b4c-7bd8-4a5e-9f2e-6c2b1f0d6a01"   # serve.py's CIRROS

# openstacksdk 4.x warns about its own internals (RemovedInSDK50Warning).
pytestmark = pytest.mark.filterwarnings("ignore::openstack.warnings._RemovedInSDKWarning")


def _session(peer):
    return ks_session.Session(auth=v3.Password(**peer.auth), timeout=30)


def _nova(peer):
    """A client at the newest microversion both novaclient and the peer speak."""
    sess = _session(peer)
    probe = nova_client.Client("2.1", session=sess)
    version = api_versions.discover_version(probe, api_versions.APIVersion("2.latest"))
    return nova_client.Client(version, session=sess)


def _boot(nova, name=None, **kwargs):
    name = name or "smoke-%s" % uuid.uuid4().hex[:8]
    return nova.servers.create(name, CIRROS_ID, nova.flavors.find(name="m1.tiny"),
                               nics="auto", **kwargs)


def _wait_status(nova, server_id, status, timeout=30):
    def reached():
        server = nova.servers.get(server_id)
        assert server.status != "ERROR", getattr(server, "fault", server)
        return server if server.status == status else None
    return wait_for(reached, timeout, 0.1, "server %s to be %s" % (server_id, status))


def test_authenticate_and_catalog(nova_peer):
    sess = _session(nova_peer)
    assert sess.get_token()
    assert sess.get_project_id() == "6f70656e737461636b20342065766572"
    assert sess.get_endpoint(service_type="compute", interface="public") == nova_peer.url
    # The microversion negotiated from the real nova's version document.
    nova = _nova(nova_peer)
    assert nova.api_version.get_string().startswith("2.")
    assert nova.api_version.ver_minor >= 90


def test_flavors_and_image_by_name(nova_peer):
    nova = _nova(nova_peer)
    names = {f.name for f in nova.flavors.list()}
    assert {"m1.tiny", "m1.small"} <= names
    conn = openstack.connection.Connection(session=_session(nova_peer))
    image = conn.image.find_image("cirros", ignore_missing=False)
    assert image is not None and image.id == CIRROS_ID
    assert conn.compute.find_flavor("m1.tiny", ignore_missing=False).vcpus == 1
    assert [n.name for n in conn.network.networks(name="private")]


def test_server_lifecycle(nova_peer):
    nova = _nova(nova_peer)
    top_uuid = str(uuid.uuid4())
    started = time.monotonic()
    server = _boot(nova, name="cellagent-%s" % top_uuid, meta={"cellagent:uuid": top_uuid})
    server = _wait_status(nova, server.id, "ACTIVE")
    to_active = time.monotonic() - started
    assert server.metadata == {"cellagent:uuid": top_uuid}
    assert server.addresses, "the Neutron fixture gives the server an address"
    found = nova.servers.list(search_opts={"name": "cellagent-%s" % top_uuid})
    assert [s.id for s in found] == [server.id]
    assert "FAKE CONSOLE OUTPUT" in nova.servers.get_console_output(server.id)
    server.delete()

    def gone():
        try:
            nova.servers.get(server.id)
        except nova_exc.NotFound as e:
            return e.code == 404
        return False
    wait_for(gone, 30, 0.1, "server %s to be deleted" % server.id)
    assert to_active < 15, "ACTIVE took %.1fs" % to_active


def test_lost_create_response(nova_peer):
    """nova creates the server, the client never hears about it."""
    nova = _nova(nova_peer)
    name = "lost-%s" % uuid.uuid4().hex[:8]
    nova_peer.inject_fault("POST", r"^/v2\.1/servers$", action="drop_response")
    with pytest.raises((ks_exc.ConnectFailure, ks_exc.ConnectionError)):
        _boot(nova, name=name)
    servers = wait_for(lambda: nova.servers.list(search_opts={"name": name}), 10, 0.1,
                       "the server whose create response was lost")
    assert len(servers) == 1
    _wait_status(nova, servers[0].id, "ACTIVE")
    assert nova_peer.stats()["POST /v2.1/servers"] >= 1
    servers[0].delete()


def test_quota_exceeded_is_403(nova_peer_factory):
    peer = nova_peer_factory(quota_instances=1)
    nova = _nova(peer)
    limits = {a.name: a.value for a in nova.limits.get().absolute}
    assert limits["maxTotalInstances"] == 1
    # nova's API counts instances in the cell database, which a build
    # reaches only after scheduling (a racing second create is caught later
    # by the conductor's recheck, as an ERROR server): wait for the first.
    _wait_status(nova, _boot(nova).id, "ACTIVE")
    with pytest.raises(nova_exc.Forbidden) as err:
        _boot(nova)
    assert err.value.code == 403
    assert "Quota exceeded" in str(err.value)


def test_restart(nova_peer_factory):
    peer = nova_peer_factory()
    nova = _nova(peer)
    server = _boot(nova)
    _wait_status(nova, server.id, "ACTIVE")
    port = peer.port
    peer.restart()
    assert peer.port == port and peer.alive()
    # The same client keeps working (the stand-in does not check tokens);
    # the peer's databases were in a temporary directory, so it is empty.
    assert nova.servers.list() == []
    again = _boot(nova)
    _wait_status(nova, again.id, "ACTIVE")
    assert "nova peer stopped" in peer.log()
