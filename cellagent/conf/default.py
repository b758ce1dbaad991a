"""[DEFAULT] options: who this agent is and where it keeps its state.

``transport_url`` (this cell's own broker) and ``control_exchange`` are
oslo.messaging's own options; they are registered from oslo.messaging so the
one definition is shared, and they appear in the sample under its namespace.
"""

import socket

from oslo_config import cfg

# Unacknowledged messages the broker may push to one consumer. oslo.messaging's
# default (0, unlimited) would pull a whole backlog into memory; with a bound
# the flow control of [backend] max_pending_operations keeps it on the broker.
PREFETCH = 100

default_opts = [
    cfg.HostAddressOpt(
        "host",
        default=socket.gethostname(),
        sample_default="<current_hostname>",
        help="""
Name of this agent host.

Used in the per-host queue names of the inter-cell topics
(``<rpc_driver_queue_base>.<type>.<host>``) and reported to the top as the
``host`` and ``node`` of the instances this cell runs.

Possible values:

* A hostname, FQDN or IP address. Defaults to the machine's hostname.
"""),
    cfg.StrOpt(
        "state_path",
        default="/var/lib/cellagent",
        help="""
Directory where the agent keeps its durable state.

The default SQLite database (journal and instance map) lives here unless
``[database] connection`` names another database.

Possible values:

* An absolute path to a directory writable by the agent.

Related options:

* ``[database] connection``
"""),
]


def register_opts(conf):
    conf.register_opts(default_opts)
    # NOTE: imported here, not at module level: oslo.messaging must only be
    # imported after cmd/ selected oslo.service's threading backend.
    from oslo_messaging._metrics import client as metrics
    from oslo_messaging._tracing import client as tracing
    from oslo_messaging import transport
    conf.register_opts(transport._transport_opts)
    # oslo.messaging registers these two groups on the global cfg.CONF only,
    # and a cast through a private ConfigOpts needs them.
    for group, opts in (("oslo_messaging_metrics", metrics.oslo_messaging_metrics),
                        ("oslo_messaging_tracing", tracing.oslo_messaging_tracing)):
        conf.register_opts(opts, group=group)
    # The rabbit driver's options (amqp_durable_queues...) are read by our own
    # publisher too, possibly before oslo.messaging's driver registered them.
    from oslo_messaging import opts as messaging_opts
    for group, opts in messaging_opts.list_opts():
        if group == "oslo_messaging_rabbit":
            conf.register_opts(opts, group=group)
    # Nova's exchange (nova/config.py sets control_exchange='nova').
    conf.set_default("control_exchange", "nova")
    conf.set_default("rabbit_qos_prefetch_count", PREFETCH, group="oslo_messaging_rabbit")


def list_opts():
    return [("DEFAULT", default_opts)]
