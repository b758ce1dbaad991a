"""One request to place, and the per-decision context the plugins share.

``RequestSpec`` is what the top asks for. ``Selection`` is built by
``Scheduler.select`` for one decision and passed to every filter and
weigher: it carries the clock reading the top gave, the request's slot keys
converted once, the reasons for removals, and a cache of each cell's units
so that the capacity filter, the RAM weigher and the policy do the unit
arithmetic once per cell and decision.
"""

import dataclasses

from cellagent import objects


@dataclasses.dataclass
class RequestSpec:
    """What to place: ``num_instances`` instances of ``flavor`` from ``image``."""

    flavor: objects.Flavor
    num_instances: int = 1
    image: dict = dataclasses.field(default_factory=dict)
    hints: dict = dataclasses.field(default_factory=dict)
    instance_uuids: list = dataclasses.field(default_factory=list)
    request_id: str = ""

    def __post_init__(self):
        if not isinstance(self.num_instances, int) or self.num_instances < 1:
            raise ValueError("num_instances must be an integer >= 1, not %r"
                             % (self.num_instances,))
        if self.hints is None:
            self.hints = {}
        if self.image is None:
            self.image = {}

    @property
    def image_properties(self):
        return self.image.get("properties") or {}


class Selection:
    """The context of one decision, shared by the filters and the weighers.

    Read-only for plugins except through ``remove`` and ``units``.
    Attributes: ``spec``, ``flavor``, ``num_instances``, ``hints``, ``now``
    (epoch seconds, from the top), ``mute_interval``, ``removed``
    ({cell name: "filter: reason"}), and the request's slot as
    ``CellView.units`` takes it: ``memory_mb``, ``memory_key``, ``disk_mb``,
    ``disk_key``. ``unit_cache`` ({cell name: units}) backs ``units``; a
    plugin that computes ``cell.units(...)`` for this slot itself may store
    the result there.
    """

    __slots__ = ("spec", "flavor", "num_instances", "hints", "now", "mute_interval",
                 "removed", "memory_mb", "memory_key", "disk_mb", "disk_key", "unit_cache")

    def __init__(self, spec, now, mute_interval):
        self.spec = spec
        flavor = self.flavor = spec.flavor
        self.num_instances = spec.num_instances
        self.hints = spec.hints
        self.now = now
        self.mute_interval = mute_interval
        self.removed = {}
        self.memory_mb = flavor.memory_mb
        self.memory_key = str(flavor.memory_mb)
        self.disk_mb = flavor.disk_mb
        self.disk_key = str(self.disk_mb)
        self.unit_cache = {}

    def remove(self, plugin, cell, reason):
        """Record that ``plugin`` removed ``cell`` because of ``reason``."""
        self.removed[cell.name] = plugin.name + ": " + reason

    def units(self, cell):
        """``cell.units(...)`` for this request's flavor, computed once per decision."""
        try:
            return self.unit_cache[cell.name]
        except KeyError:
            units = self.unit_cache[cell.name] = cell.units(
                self.memory_mb, self.memory_key, self.disk_mb, self.disk_key)
            return units
