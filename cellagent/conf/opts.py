"""list_opts() for oslo-config-generator (entry point ``oslo.config.opts``).

The modules are listed explicitly, never discovered by scanning.
"""

from cellagent.conf import backend
from cellagent.conf import cells
from cellagent.conf import database
from cellagent.conf import default

_MODULES = (default, cells, database, backend)


def list_opts():
    return [item for module in _MODULES for item in module.list_opts()]


def update_defaults():
    """``oslo.config.opts.defaults`` hook: the sample shows nova's exchange."""
    from oslo_config import cfg
    from oslo_messaging import transport
    cfg.set_defaults(transport._transport_opts, control_exchange="nova")
