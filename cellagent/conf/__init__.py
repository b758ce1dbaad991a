"""Option registration. Nothing here parses or reads configuration."""

from cellagent.conf import backend
from cellagent.conf import cells
from cellagent.conf import database
from cellagent.conf import default
from cellagent.conf import ec2
from cellagent.conf import openstack
from cellagent.conf import scheduler
from cellagent.conf import top

_MODULES = (default, cells, database, backend, ec2, openstack, scheduler, top)


def register_opts(conf):
    for module in _MODULES:
        module.register_opts(conf)
