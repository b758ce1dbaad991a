"""What the scheduler knows of one cell at one decision: ``CellView``.

The top builds these snapshots from its store (cell records, the last
capacity and capability reports, the instance view and the backoff state)
and hands a list of them to ``Scheduler.select``. Nothing here reads the
store or the clock; the methods are arithmetic over the snapshot.
"""

import dataclasses

PRIVATE = "private"
PUBLIC = "public"
TIERS = (PRIVATE, PUBLIC)


@dataclasses.dataclass
class Budget:
    """An operator's caps on one cell; ``None`` means no cap."""

    max_instances: int | None = None
    max_vcpus: int | None = None
    max_cost_per_hour: float | None = None


@dataclasses.dataclass
class CellView:
    """A child cell as the top sees it when it takes one decision.

    See the package docstring for the meaning of every field. The unit
    arithmetic (``free_units``) follows cells v1's ``units_by_mb``, with
    two additions of ours: a fallback for a flavor size the child did not
    report, and the deduction of ``pending`` placements.
    """

    name: str
    tier: str = PRIVATE
    cost_per_vcpu_hour: float = 0.0
    flavor_costs: dict = dataclasses.field(default_factory=dict)
    weight_offset: float = 0.0
    weight_scale: float = 1.0
    capacities: dict = dataclasses.field(default_factory=dict)
    capabilities: dict = dataclasses.field(default_factory=dict)
    last_seen: float | None = None
    ram_total_mb: int = 0
    used_instances: int = 0
    used_vcpus: int = 0
    used_cost_per_hour: float = 0.0
    budget: Budget = dataclasses.field(default_factory=Budget)
    backoff_until: float | None = None
    pending: list = dataclasses.field(default_factory=list)
    path: str = ""

    def __post_init__(self):
        if self.tier not in TIERS:
            raise ValueError("cell %s: tier %r is not one of %s"
                             % (self.name, self.tier, ", ".join(TIERS)))

    def cost_for(self, flavor):
        """Estimated cost per hour of one instance of ``flavor`` here."""
        cost = self.flavor_costs.get(flavor.name)
        if cost is None:
            return flavor.vcpus * self.cost_per_vcpu_hour
        return cost

    def free_units(self, flavor):
        """Instances of ``flavor`` this cell can still take, after ``pending``.

        The smaller of the RAM and the disk units (disk ignored for a
        flavor without disk); 0 when the cell never reported.
        """
        ram, disk = self.units(flavor.memory_mb, str(flavor.memory_mb),
                               flavor.disk_mb, str(flavor.disk_mb))
        return ram if disk is None or ram <= disk else disk

    def units(self, memory_mb, memory_key, disk_mb, disk_key):
        """``(ram units, disk units or None)`` for one slot, after ``pending``.

        The keys are the ``units_by_mb`` strings of the sizes, passed in so
        that a caller weighing many cells converts them once. ``disk units``
        is None when ``disk_mb`` is 0 (the disk does not limit such a flavor).
        """
        # The scheduler's hot path (once per cell and decision): the usual
        # case, a report listing both sizes, costs a few dict lookups; the
        # rest goes to _units_slow.
        try:
            caps = self.capacities
            ram = caps["ram_free"]["units_by_mb"][memory_key]
            disk = caps["disk_free"]["units_by_mb"][disk_key] if disk_mb else None
        except (KeyError, TypeError):
            ram, disk = self._units_slow(memory_mb, memory_key, disk_mb, disk_key)
        if not memory_mb:
            # A flavor without RAM has no units, in cells v1 too ("0 if slot is 0").
            return 0, disk
        pending = self.pending
        if pending:
            for flavor, count in pending:
                size = flavor.memory_mb
                if size:
                    ram -= count * -(-size // memory_mb)
                if disk_mb:
                    size = flavor.root_gb + flavor.ephemeral_gb
                    if size:
                        disk -= count * -(-size * 1024 // disk_mb)
            if ram < 0:
                ram = 0
            if disk is not None and disk < 0:
                disk = 0
        return ram, disk

    def _units_slow(self, memory_mb, memory_key, disk_mb, disk_key):
        caps = self.capacities
        if not caps or not memory_mb:
            return 0, (0 if disk_mb else None)
        ram = _section_units(caps.get("ram_free"), memory_key, memory_mb)
        disk = _section_units(caps.get("disk_free"), disk_key, disk_mb) if disk_mb else None
        return ram, disk

    def ram_free_mb(self):
        """Reported free RAM (``ram_free.total_mb``) minus ``pending``, at least 0."""
        try:
            free = self.capacities["ram_free"]["total_mb"] or 0
        except (KeyError, TypeError):
            return 0
        pending = self.pending
        if pending:
            for flavor, count in pending:
                free -= flavor.memory_mb * count
            if free < 0:
                return 0
        return free

    def is_mute(self, now, interval):
        """True when no report arrived within ``interval`` seconds of ``now``, or never."""
        return self.last_seen is None or now - self.last_seen > interval

    def is_backed_off(self, now):
        """True while ``backoff_until`` lies after ``now``."""
        until = self.backoff_until
        return until is not None and until > now


def _section_units(section, key, size):
    if not section:
        return 0
    units = (section.get("units_by_mb") or {}).get(key)
    if units is None:
        # A size the child did not list (its flavor list differs from ours,
        # reference 8: "flavors must match across cells"): estimate from
        # the free total, the raw figure without the child's reserve, so the
        # estimate is optimistic by at most that reserve.
        units = (section.get("total_mb") or 0) // size
    return units
