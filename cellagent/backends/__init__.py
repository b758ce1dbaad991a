"""Backends run this cell's instances; ``load_backend`` picks one by name.

The contract is in ``base.py``. Backends are entry points in the
``cellagent.backends`` group, and ``[backend] driver`` holds an entry-point
name (``fake``, ``ec2``, ``openstack``), never a dotted import path.
"""

import importlib.metadata
import logging

from stevedore import driver

from cellagent import exception

LOG = logging.getLogger(__name__)

NAMESPACE = "cellagent.backends"


def available_backends():
    """Sorted entry-point names in ``cellagent.backends`` (nothing imported)."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=NAMESPACE)})


def _reraise(manager, entrypoint, exc):
    # stevedore otherwise logs the import/constructor error and reports a
    # bare "no driver found", hiding the reason from the operator.
    raise exc


def load_backend(conf):
    """Return the (not yet started) backend named by ``[backend] driver``.

    The class is constructed with ``conf``; the caller calls ``start()``.
    Raises ``ConfigurationError`` naming the driver and the available names
    when the name is unknown, its module does not import (a missing
    optional dependency such as boto3) or its constructor refuses the
    configuration.
    """
    name = conf.backend.driver
    try:
        mgr = driver.DriverManager(NAMESPACE, name, invoke_on_load=True,
                                   invoke_args=(conf,),
                                   on_load_failure_callback=_reraise)
    except Exception as exc:
        raise exception.ConfigurationError(
            reason="cannot load backend %r ([backend] driver): %s; available "
                   "backends: %s" % (name, exc, ", ".join(available_backends()) or "none")
        ) from exc
    LOG.info("Loaded backend %(name)s (%(cls)s)",
             {"name": name, "cls": type(mgr.driver).__name__})
    return mgr.driver
