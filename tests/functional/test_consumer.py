"""The agent's kombu consumer declares what oslo.messaging's RPC servers declare.

Both run for the same host on two fresh vhosts of the real RabbitMQ, with
oslo.messaging's defaults and with the options the consumer reproduces
changed; ``rabbitmqctl`` lists queues, exchanges, bindings and consumers
(flags, arguments, prefetch), and the two lists must be the same but for
the random part of the fanout queue names.
"""

import re
import subprocess

import pytest
from oslo_config import cfg

from cellagent import conf as conf_mod
from cellagent.rpc import consumer as consumer_mod
from cellagent.rpc import transport as transport_mod
from tests.functional.conftest import BASE, rabbit_url, wait_for

HOST = "agent-host"


def _ctl(*args):
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout


def snapshot(vhost):
    """What is declared on ``vhost``, one sorted list per kind, names normalised."""
    kinds = {
        "queues": ("list_queues", "name", "durable", "auto_delete", "exclusive",
                   "arguments"),
        "exchanges": ("list_exchanges", "name", "type", "durable", "auto_delete", "internal",
                      "arguments"),
        "bindings": ("list_bindings", "source_name", "source_kind", "destination_name",
                     "destination_kind", "routing_key", "arguments"),
        "consumers": ("list_consumers", "queue_name", "ack_required", "prefetch_count",
                      "arguments"),
    }
    out = {}
    for kind, (cmd, *columns) in kinds.items():
        text = _ctl(cmd, "-p", vhost, *columns, "--no-table-headers")
        text = re.sub(r"_fanout_[0-9a-f]{32}", "_fanout_<uuid>", text)
        out[kind] = sorted(line for line in text.splitlines() if line.strip())
    return out


def consumers(vhost):
    return len(_ctl("list_consumers", "-p", vhost, "queue_name",
                    "--no-table-headers").split())


def make_conf(vhost, overrides):
    conf = cfg.ConfigOpts()
    conf_mod.register_opts(conf)
    conf([], default_config_files=[])
    conf.set_override("transport_url", rabbit_url(vhost))
    for name, value in overrides.items():
        conf.set_override(name, value, "oslo_messaging_rabbit")
    return conf


class NoRouter:
    """Nothing is published in this test."""


@pytest.mark.parametrize("overrides", [
    {},
    {"amqp_durable_queues": True, "amqp_auto_delete": True, "rabbit_ha_queues": True,
     "rabbit_transient_queues_ttl": 60, "rabbit_qos_prefetch_count": 7},
], ids=["defaults", "durable-autodelete-ha-ttl-prefetch"])
def test_declarations_match_oslo_messaging(vhosts, overrides):
    oslo_vhost, ours_vhost = vhosts
    # oslo.messaging's own RPC servers, as a stock nova-cells starts them.
    conf = make_conf(oslo_vhost, overrides)
    url = rabbit_url(oslo_vhost)
    transports = transport_mod.Transports(conf)
    from cellagent.rpc import endpoint
    servers = transport_mod.rpc_servers(transports.rpc_transport(url), url, BASE, HOST,
                                        endpoint.IntercellEndpoint(NoRouter()))
    for server in servers:
        server.start()
    try:
        wait_for(lambda: consumers(oslo_vhost) == 9, 30, 0.2, "oslo.messaging's consumers")
        theirs = snapshot(oslo_vhost)
    finally:
        for server in servers:
            server.stop()
        for server in servers:
            server.wait()
        transports.close()
    # Ours, from the same options.
    conf = make_conf(ours_vhost, overrides)
    url = rabbit_url(ours_vhost)
    assert consumer_mod.supported(conf, url)
    cons = consumer_mod.KombuConsumer(url, BASE, HOST, NoRouter(), None,
                                      **consumer_mod.options(conf))
    cons.start()
    try:
        wait_for(lambda: consumers(ours_vhost) == 9, 30, 0.2, "the agent's consumers")
        ours = snapshot(ours_vhost)
    finally:
        cons.stop()
        cons.wait()
    assert ours == theirs
    assert len(ours["queues"]) == 9
    ttl = overrides.get("rabbit_transient_queues_ttl", 1800) * 1000
    assert sum("_fanout_<uuid>" in q and str(ttl) in q for q in ours["queues"]) == 3
    prefetch = str(overrides.get("rabbit_qos_prefetch_count", 100))
    assert all(c.split("\t")[2] == prefetch for c in ours["consumers"])
