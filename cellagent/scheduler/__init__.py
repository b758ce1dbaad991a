"""The top cell's scheduler: which child cell takes a build, and why.

This package is pure logic. It never reads the configuration, the database
or the clock by itself: the top (``top.py``) builds a snapshot of every
cell, states the request, passes the time, and gets back a ``Decision`` or
a ``NoValidCell``. The same inputs always give the same answer, apart from
the one piece of state the scheduler keeps, whether it is *bursting*.

One decision runs in three steps, as nova's cells v1 scheduler did
(reference section 5), plus a third step of ours:

1. **Filters** (``filters/``) remove the cells that cannot take the
   request, each recording why.
2. **Weighers** (``weighers/``) rank the survivors, normalised per request.
3. **The burst policy** (``policy.py``) chooses between the private and the
   public cells: private first, the cheapest public cell once the private
   side would drop under a low watermark, and private again only when it is
   back above a high one.

**RequestSpec** (``request.py``): ``flavor`` (``objects.Flavor``),
``num_instances`` (an int >= 1; all instances go to the one chosen cell),
``image`` (a dict with ``id``, ``name`` and a ``properties`` dict),
``hints`` (a dict: ``target_cell`` is a cell name or a full routing path
such as ``top!private``; ``different_cell`` is a name or path, or a list of
them), ``instance_uuids`` (a list) and ``request_id`` (a str for the log).

**Budget** (``cell_state.py``): ``max_instances``, ``max_vcpus``,
``max_cost_per_hour`` of one cell, each None for no cap.

**CellView** (``cell_state.py``) is what the top knows of one child at the
moment of the decision; it builds a fresh one for every decision and the
scheduler never changes it. Names are unique within one decision.

* ``name``, ``path`` (the full routing path, ``top!private``; "" means
  unknown and only the name is matched), ``tier`` (``"private"`` or
  ``"public"``);
* ``cost_per_vcpu_hour`` (float) and ``flavor_costs`` ({flavor name: cost
  per hour}), which overrides ``vcpus * cost_per_vcpu_hour`` for the flavors
  it names; ``cost_for(flavor)`` is the cost of one instance per hour;
* ``weight_offset`` and ``weight_scale`` from the cell record (the scale is
  carried but, as in nova, weighs nothing);
* ``capacities``: the last ``update_capacities`` payload, in the cells v1
  shape ``{"ram_free": {"total_mb": int, "units_by_mb": {"2048": 5, ...}},
  "disk_free": {...}}``, ``{}`` when the cell never reported; and
  ``capabilities`` ({name: [values]});
* ``last_seen``: epoch seconds of the last report of either kind, None if
  never; ``is_mute(now, interval)`` is True when that is more than
  ``interval`` seconds before ``now``, or never (nova's "mute"; the
  filter and the weigher also read 0 as never);
* ``ram_total_mb``: the cell's RAM as the top reckons it, the reported free
  RAM plus the RAM of the instances it knows live there and that the report
  already reflects (so not ``pending`` ones); 0 = unknown;
* ``used_instances``, ``used_vcpus``, ``used_cost_per_hour``: what the top's
  instance view counts in the cell now, *including* builds it has sent
  there and not seen deleted, acknowledged or not (budgets are about what
  runs and costs, not about report staleness);
* ``budget`` (a ``Budget``);
* ``backoff_until``: epoch seconds; while it lies after ``now`` the cell is
  backed off (None or an earlier time: not);
* ``pending``: a list of ``(Flavor, count)`` placed in the cell since its
  last capacity report, which the report therefore does not reflect yet
  (the top drops them when a newer report arrives). One entry per flavor
  keeps the arithmetic short: it runs for every cell of every decision.

``free_units(flavor)`` is how many instances of ``flavor`` the cell can
still take: the smaller of ``ram_free.units_by_mb[str(memory_mb)]`` and
``disk_free.units_by_mb[str(disk_mb)]`` (the disk is ignored for a flavor
whose ``disk_mb`` is 0), after ``pending``. Two rules of ours:

* a size missing from ``units_by_mb`` (the child's flavor list differs
  from the top's) falls back to ``floor(total_mb / size)``, which ignores
  the child's reserve and so may be a little optimistic;
* each pending instance of a flavor of size ``g`` takes ``ceil(g / s)``
  units from a slot of size ``s``. That is exact for a cell that is one
  big host (every EC2 or OpenStack burst cell looks like one), and
  conservative for a cell of many hosts, where small instances pack
  into the gaps; the count never goes below 0.

``ram_free_mb()`` is ``ram_free.total_mb`` minus the RAM of ``pending``.

**Decision** (``manager.py``): ``cell`` (the chosen name), ``tier``,
``path``, ``weights`` ({name: total weight} of the cells that passed the
filters), ``removed`` ({name: "filter_name: reason"}), ``bursting`` (the
state after this decision), ``burst_changed`` (this decision entered or
left bursting), ``reason`` (a short phrase: why the winner won),
``private_room_percent`` (the private room before placement, or None), and
for the log ``request_id``, ``flavor_name``, ``num_instances`` and
``candidates``. ``log_line()`` says all of it in one line; the top logs it.

**Scheduler(filters, weighers, multipliers=None, mute_interval=300.0,
low_watermark=20.0, high_watermark=40.0, bursting=False)** (``manager.py``).
``filters`` and ``weighers`` are lists of entry-point names in the groups
``cellagent.scheduler.filters`` and ``cellagent.scheduler.weighers``, run
in the order given; an unknown name raises ``ConfigurationError`` naming it
and the available ones. ``multipliers`` maps a weigher's key to its
multiplier; missing keys take nova's defaults ``{"ram": 10.0, "mute":
-10000.0, "offset": 1.0}``. ``low_watermark`` > ``high_watermark`` raises
``ConfigurationError``. ``Scheduler.from_conf(conf)`` builds one from
``[scheduler]`` and ``[cells] mute_child_interval`` of a parsed ``conf``.

``select(spec, cells, now)`` returns a ``Decision``, or raises
``exception.NoValidCell`` when the filters leave nothing. Its message
names the request and, per cell, the filter that removed it and why, for
example ``No cell can take 3 x m1.small: private: capacity: 1 free unit(s),
needs 3; aws: budget: max_instances 10 reached``; its ``removed`` attribute
holds the same as a dict. ``select`` may be called from several threads.

The property ``bursting`` reads the state and can be assigned; a new
Scheduler starts non-bursting unless told (``bursting=True``), so a top
that wants the state to survive a restart persists it and passes it back.

**Backoff(initial=300.0, maximum=1800.0)** (``backoff.py``) counts failed
builds per cell: ``failed(name, now)`` returns the end of the backoff (5
minutes, doubling per consecutive failure up to 30), ``succeeded(name)``
resets, ``until(name)`` and ``failures(name)`` read, and ``load(name,
until, failures)`` restores what the top persisted. The top copies
``until`` into ``CellView.backoff_until``.
"""

from cellagent.scheduler.backoff import Backoff
from cellagent.scheduler.cell_state import Budget
from cellagent.scheduler.cell_state import CellView
from cellagent.scheduler.manager import DEFAULT_FILTERS
from cellagent.scheduler.manager import DEFAULT_MULTIPLIERS
from cellagent.scheduler.manager import DEFAULT_WEIGHERS
from cellagent.scheduler.manager import Decision
from cellagent.scheduler.manager import Scheduler
from cellagent.scheduler.request import RequestSpec

__all__ = [
    "Backoff",
    "Budget",
    "CellView",
    "DEFAULT_FILTERS",
    "DEFAULT_MULTIPLIERS",
    "DEFAULT_WEIGHERS",
    "Decision",
    "RequestSpec",
    "Scheduler",
]
