"""[scheduler] options: the top cell's burst scheduler.

The multipliers keep the names and defaults of nova's ``[cells]
*_weight_multiplier`` options (Stein); the plugin lists hold entry-point
names instead of nova's class paths, and the watermarks and the backoff are
cellagent's own. ``[cells] mute_child_interval`` also feeds the scheduler.
"""

from oslo_config import cfg

from cellagent.conf import group

scheduler_group = cfg.OptGroup("scheduler", title="Scheduler options", help="""
The top cell's load-based burst scheduler: filters, weighers, and the
policy that keeps builds on private cells until they run short, then sends
them to the cheapest public cell.
""")

scheduler_opts = [
    cfg.ListOpt(
        "filters",
        default=["target_cell", "different_cell", "image_properties", "backoff",
                 "mute_child", "capacity", "budget"],
        help="""
Cell filters to run, in this order, for every build.

Each name is an entry point in the ``cellagent.scheduler.filters`` group
(never a class path). Nova's ``target_cell``, ``different_cell`` and
``image_properties`` are joined by ``backoff`` (cells whose builds recently
failed), ``mute_child`` (cells that stopped reporting), ``capacity`` (cells
without room for every instance) and ``budget`` (cells whose operator caps
would be exceeded). A cell removed by a filter is named, with the reason,
in the decision's log line and in the "no valid cell" error.

Possible values:

* A list of filter names; an unknown name stops ``cellagent-top`` at start,
  listing the available ones.

Related options:

* ``weighers``
* ``[cells] mute_child_interval``
"""),
    cfg.ListOpt(
        "weighers",
        default=["ram_by_instance_type", "mute_child", "weight_offset"],
        help="""
Cell weighers that rank the cells the filters left.

Each name is an entry point in the ``cellagent.scheduler.weighers`` group.
Each weigher's raw weights are normalised to 0..1 over the candidates of
the request at hand (not over the process lifetime, as nova did, bug
1870096), multiplied by its multiplier and summed.

Possible values:

* A list of weigher names.

Related options:

* ``ram_weight_multiplier``, ``mute_weight_multiplier``,
  ``offset_weight_multiplier``
"""),
    cfg.FloatOpt(
        "ram_weight_multiplier",
        default=10.0,
        help="""
Multiplier of the ``ram_by_instance_type`` weigher.

The weigher prefers cells with more free units of the requested flavor's
memory size. Nova's ``[cells] ram_weight_multiplier``.

Possible values:

* A positive number spreads builds over the cells with most room.
* A negative number stacks them on the fullest cells.
* 0 switches the weigher off.

Related options:

* ``weighers``
"""),
    cfg.FloatOpt(
        "mute_weight_multiplier",
        default=-10000.0,
        help="""
Multiplier of the ``mute_child`` weigher.

A mute cell weighs 1.0 before this multiplier, others 0. Nova's
``[cells] mute_weight_multiplier``; only matters when the ``mute_child``
filter is not in ``filters``.

Possible values:

* A negative number pushes mute cells to the bottom.

Related options:

* ``[cells] mute_child_interval``
"""),
    cfg.FloatOpt(
        "offset_weight_multiplier",
        default=1.0,
        help="""
Multiplier of the ``weight_offset`` weigher.

The weigher uses each cell record's ``weight_offset``. After normalisation
it can move a cell by at most this much, so raise it above
``ram_weight_multiplier`` to make the offsets decide. Nova's ``[cells]
offset_weight_multiplier``.

Possible values:

* A number; 0 switches the weigher off.

Related options:

* ``ram_weight_multiplier``
"""),
    cfg.FloatOpt(
        "low_watermark",
        default=20.0,
        min=0.0,
        max=100.0,
        help="""
Private room, in percent, below which builds burst to public cells.

Private room is the free share of the RAM of the private cells that report
and are not backed off. While not bursting, a build goes to a private cell
if the room after placing it stays at or above this value; otherwise it
goes to the cheapest public cell and the scheduler starts bursting.

Possible values:

* A percentage between 0 and 100, at most ``high_watermark``.

Related options:

* ``high_watermark``
"""),
    cfg.FloatOpt(
        "high_watermark",
        default=40.0,
        min=0.0,
        max=100.0,
        help="""
Private room, in percent, at which bursting stops.

While bursting, builds keep going to public cells until the private room
is back at or above this value (and would stay above ``low_watermark``
after the build). The gap between the two watermarks keeps the scheduler
from flapping between tiers.

Possible values:

* A percentage between 0 and 100, at least ``low_watermark``.

Related options:

* ``low_watermark``
"""),
    cfg.IntOpt(
        "backoff_initial",
        default=300,
        min=1,
        help="""
Seconds a cell is avoided after a failed or unacknowledged build.

Each further consecutive failure doubles the time, up to ``backoff_max``;
the first acknowledged build resets it.

Possible values:

* A positive number of seconds.

Related options:

* ``backoff_max``
* ``[top] build_retries``
"""),
    cfg.IntOpt(
        "backoff_max",
        default=1800,
        min=1,
        help="""
Longest time, in seconds, a cell is avoided after repeated failed builds.

Possible values:

* A number of seconds, at least ``backoff_initial``.

Related options:

* ``backoff_initial``
"""),
]


def register_opts(conf):
    group.register(conf, scheduler_group, scheduler_opts)


def list_opts():
    return [(scheduler_group, scheduler_opts)]
