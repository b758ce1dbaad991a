"""Shared fixtures. Unit tests may only open loopback sockets."""

import socket

import pytest
from oslo_config import cfg

from cellagent.cmd import init_threading

init_threading()


@pytest.fixture
def conf():
    """A fresh ConfigOpts with every cellagent option registered and parsed."""
    from cellagent import conf as conf_mod
    c = cfg.ConfigOpts()
    conf_mod.register_opts(c)
    c([], project="cellagent-test", default_config_files=[])
    yield c
    c.reset()


_real_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")
                                      or self.family == socket.AF_UNIX):
        raise RuntimeError("unit tests must not reach %r" % (address,))
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def _ban_network(request, monkeypatch):
    if "functional" not in request.keywords:
        monkeypatch.setattr(socket.socket, "connect", _loopback_only)
    yield
