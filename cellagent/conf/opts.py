"""list_opts() for oslo-config-generator (entry point ``oslo.config.opts``).

The modules are listed explicitly, never discovered by scanning.
"""

from cellagent.conf import backend
from cellagent.conf import cells
from cellagent.conf import database
from cellagent.conf import default
from cellagent.conf import ec2
from cellagent.conf import openstack
from cellagent.conf import scheduler
from cellagent.conf import top

_MODULES = (default, cells, database, backend, ec2, openstack, scheduler, top)


def list_opts():
    return [item for module in _MODULES for item in module.list_opts()]


def update_defaults():
    """``oslo.config.opts.defaults`` hook: the sample shows the defaults we set."""
    from oslo_config import cfg
    from oslo_messaging._drivers import impl_rabbit
    from oslo_messaging import transport

    from cellagent.conf.default import PREFETCH
    # On the original option objects: oslo.messaging's list_opts copies them.
    cfg.set_defaults(transport._transport_opts, control_exchange="nova")
    cfg.set_defaults(impl_rabbit.rabbit_opts, rabbit_qos_prefetch_count=PREFETCH)
