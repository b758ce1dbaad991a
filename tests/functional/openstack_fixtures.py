"""Fixtures for tests against the real nova-api peer (tests/openstack_peer).

Bind the ones a module needs at its top level (an assignment, not an
import, keeps ruff's F811 quiet where a test names them as arguments)::

    from tests.functional import openstack_fixtures
    nova_peer_venv = openstack_fixtures.nova_peer_venv
    nova_peer = openstack_fixtures.nova_peer

(kept out of conftest.py on purpose, so only OpenStack tests pay for a peer).
A missing ``.venv-nova`` is a test FAILURE, never a skip, like a missing
broker: scripts/test.sh makes it with scripts/nova-peer-venv.sh.
"""

import pytest

from tests.openstack_peer import NovaPeer, NovaPeerError, venv_python


@pytest.fixture(scope="session")
def nova_peer_venv():
    try:
        return venv_python()
    except NovaPeerError as e:
        pytest.fail(str(e))


def _start(peer):
    try:
        return peer.start()
    except NovaPeerError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def nova_peer(nova_peer_venv, tmp_path_factory):
    """One peer per test module, default (large) quotas; log in the tmp dir."""
    peer = _start(NovaPeer(tmp_path_factory.mktemp("nova-peer") / "nova-peer.log"))
    yield peer
    peer.stop()


@pytest.fixture
def nova_peer_factory(nova_peer_venv, tmp_path):
    """Start peers with options (quotas, computes...); all stopped at teardown."""
    peers = []

    def make(**kwargs):
        peer = NovaPeer(tmp_path / ("nova-peer-%d.log" % len(peers)), **kwargs)
        peers.append(peer)
        return _start(peer)

    yield make
    for peer in peers:
        peer.stop()
