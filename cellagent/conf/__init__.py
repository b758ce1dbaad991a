"""Option registration. Nothing here parses or reads configuration."""

from cellagent.conf import backend
from cellagent.conf import cells
from cellagent.conf import database
from cellagent.conf import default

_MODULES = (default, cells, database, backend)


def register_opts(conf):
    for module in _MODULES:
        module.register_opts(conf)
