"""Test helpers: flavors, a fixed clock, and ``fake_cell`` to build CellViews.

``fake_cell`` plays the top's part: from a cell's free RAM and disk it
builds the cells v1 ``capacities`` a child would report, with a
``units_by_mb`` key for every flavor of ``FLAVORS`` (and the reserve at 0).
"""

from cellagent import objects
from cellagent import scheduler

NOW = 1_700_000_000.0

TINY = objects.Flavor("m1.tiny", 512, 1, 1)
SMALL = objects.Flavor("m1.small", 2048, 1, 20)
MEDIUM = objects.Flavor("m1.medium", 4096, 2, 40)
LARGE = objects.Flavor("m1.large", 8192, 4, 80)
FLAVORS = (TINY, SMALL, MEDIUM, LARGE)

BIG_DISK_MB = 10 * 1024 * 1024


def capacities(ram_free_mb, disk_free_mb=BIG_DISK_MB, flavors=FLAVORS):
    """The cells v1 payload of a one-host cell with this much free RAM and disk."""
    return {
        "ram_free": {"total_mb": ram_free_mb,
                     "units_by_mb": {str(f.memory_mb): ram_free_mb // f.memory_mb
                                     for f in flavors}},
        "disk_free": {"total_mb": disk_free_mb,
                      "units_by_mb": {str(f.disk_mb): disk_free_mb // f.disk_mb
                                      for f in flavors if f.disk_mb}},
    }


def fake_cell(name, tier="private", ram_free_mb=64 * 1024, ram_total_mb=None,
              disk_free_mb=BIG_DISK_MB, last_seen=NOW, **kwargs):
    """A CellView that reported ``ram_free_mb`` free just now.

    ``ram_total_mb`` defaults to twice the free RAM (half used).
    """
    kwargs.setdefault("capacities", capacities(ram_free_mb, disk_free_mb))
    kwargs.setdefault("path", "top!" + name)
    if ram_total_mb is None:
        ram_total_mb = 2 * ram_free_mb
    return scheduler.CellView(name=name, tier=tier, ram_total_mb=ram_total_mb,
                              last_seen=last_seen, **kwargs)


def spec(flavor=SMALL, num=1, **kwargs):
    return scheduler.RequestSpec(flavor=flavor, num_instances=num, **kwargs)


def make_scheduler(filters=(), weighers=(), **kwargs):
    return scheduler.Scheduler(list(filters), list(weighers), **kwargs)
