"""Load filters and weighers by entry-point name (stevedore), in the given order."""

import importlib.metadata
import logging

from stevedore import named

from cellagent import exception

LOG = logging.getLogger(__name__)

FILTERS = "cellagent.scheduler.filters"
WEIGHERS = "cellagent.scheduler.weighers"


def available(namespace):
    """Sorted entry-point names in ``namespace`` (nothing imported)."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=namespace)})


def _reraise(manager, entrypoint, exc):
    # As in backends/__init__.py: stevedore would log and drop the plugin.
    raise exc


def load(namespace, names, kind, option, base):
    """Instances of the plugins ``names`` in that order, each with ``.name`` set.

    ``kind`` ("filter", "weigher") and ``option`` (the config option that
    holds the names) only word the error. An element of ``names`` that is
    already a ``base`` instance is used as it is (tests, embedding).
    Raises ConfigurationError naming the unknown plugin and the available
    ones, or the plugin that failed to load.
    """
    wanted = [n for n in names if not isinstance(n, base)]
    known = available(namespace)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise exception.ConfigurationError(
            reason="unknown scheduler %s %s (%s); available %ss: %s"
                   % (kind, ", ".join(repr(n) for n in unknown), option, kind,
                      ", ".join(known) or "none"))
    loaded = {}
    if wanted:
        try:
            mgr = named.NamedExtensionManager(namespace, wanted, name_order=True,
                                              invoke_on_load=True,
                                              on_load_failure_callback=_reraise)
        except Exception as exc:
            raise exception.ConfigurationError(
                reason="cannot load scheduler %ss %s (%s): %s"
                       % (kind, ", ".join(wanted), option, exc))
        for ext in mgr.extensions:
            ext.obj.name = ext.name
            loaded[ext.name] = ext.obj
    plugins = []
    for n in names:
        if isinstance(n, base):
            plugins.append(n)
        else:
            plugins.append(loaded[n])
    LOG.debug("Scheduler %(kind)ss: %(names)s",
              {"kind": kind, "names": ", ".join(p.name for p in plugins)})
    return plugins
