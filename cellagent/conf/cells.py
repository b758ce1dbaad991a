"""[cells] options: this cell's place in the cells v1 tree.

Names, defaults and meanings follow nova's ``nova/conf/cells.py`` (Stein) so
that an operator's nova.conf knowledge carries over; options nova did not
have are marked as cellagent's own.
"""

from oslo_config import cfg

from cellagent.conf import group

cells_group = cfg.OptGroup("cells", title="Cells options", help="""
The nova cells v1 inter-cell protocol as this agent speaks it: the cell's
name, its neighbours, what it reports to its parents and how long it waits.
""")

DEFAULT_FLAVORS = [
    "m1.tiny:512:1:1",
    "m1.small:2048:1:20",
    "m1.medium:4096:2:40",
    "m1.large:8192:4:80",
    "m1.xlarge:16384:8:160",
]

cells_opts = [
    cfg.StrOpt(
        "name",
        default="nova",
        help="""
Name of this cell.

This is the cell's segment in every routing path (``api!cell1``). It must be
unique, must match the name under which the parent records this cell, and
must not contain ``!``, ``.`` or ``@``.

Possible values:

* A short name such as ``aws-east``.

Related options:

* ``cells_config``: the neighbour records, which carry the parent's name.
"""),
    cfg.ListOpt(
        "capabilities",
        default=["hypervisor=xenserver;kvm", "os=linux;windows"],
        help="""
Capabilities of this cell, reported to every parent.

Each entry is ``key=value1;value2``. Sent as ``update_capabilities`` at
start, on ``announce_capabilities`` and every ``report_interval``.

Possible values:

* A list of ``key=v1;v2`` entries.
"""),
    cfg.FloatOpt(
        "reserve_percent",
        default=10.0,
        min=0.0,
        max=100.0,
        help="""
Percentage of the cell's total RAM and disk held back when counting units.

Applied as in nova: ``units = int(max(0, free - total * reserve / 100) /
slot)``. ``total_mb`` in the report stays the raw free figure.

Possible values:

* A float between 0 and 100.
"""),
    cfg.StrOpt(
        "rpc_driver_queue_base",
        default="cells.intercell",
        help="""
Base of the inter-cell topics.

The agent consumes ``<base>.targeted``, ``<base>.broadcast`` and
``<base>.response`` on its own broker and publishes to the same topics on
its parents' brokers, so a parent and its children must use the same base.

Possible values:

* A topic prefix; nova's default is ``cells.intercell``.
"""),
    cfg.IntOpt(
        "max_hop_count",
        default=10,
        min=1,
        help="""
Maximum number of cells a message may travel through.

Stamped into every message this cell creates; a targeted message that
reaches it is dropped with ``CellMaxHopCountReached``.

Possible values:

* A positive integer.
"""),
    cfg.IntOpt(
        "call_timeout",
        default=60,
        min=1,
        help="""
Seconds to wait for the reply to an inter-cell call.

The agent also answers every call it receives well within this time, so the
parent's API never times out on this cell.

Possible values:

* A positive number of seconds.
"""),
    cfg.IntOpt(
        "report_interval",
        default=30,
        min=1,
        help="""
Seconds between periodic capability and capacity reports to the parents.

Reports are also sent at start, on ``announce_*`` and within
``report_delay`` of a change. Keep this well under the parent's
``mute_child_interval`` (300 s in nova).

Possible values:

* A positive number of seconds.

Related options:

* ``report_delay``
"""),
    cfg.FloatOpt(
        "report_delay",
        default=0.5,
        min=0.0,
        help="""
Seconds to gather changes before reporting capacities (cellagent's own).

Changes within this window are coalesced into one ``update_capacities``
message, never one per instance. The default keeps the parent's view of
this cell's room under a second old (``benchmarks/scheduler.py`` measures
it), which is what its burst scheduler decides on.

Possible values:

* 0 or more seconds.
"""),
    cfg.StrOpt(
        "cells_config",
        help="""
Path of a JSON file of neighbour cell records (nova's ``cells.json``).

The top-level keys are cell names; each value holds ``transport_url``,
``is_parent``, ``weight_offset`` and ``weight_scale`` (and optionally
``api_url``). A child agent needs at least its parent's record. The file is
re-read when its modification time changes.

Possible values:

* A path to a JSON file.
"""),
    cfg.ListOpt(
        "flavors",
        default=DEFAULT_FLAVORS,
        help="""
Flavors this cell counts capacity for (cellagent's own).

Each entry is ``name:memory_mb:vcpus:root_gb[:ephemeral_gb]``. The capacity
report carries a ``units_by_mb`` key for every memory size and disk size
listed here, so keep it equal to the parent's flavor list. Flavors seen in
build requests are added while the agent runs.

Possible values:

* A list of flavor descriptions.
"""),
    cfg.FloatOpt(
        "mute_child_interval",
        default=300.0,
        min=1.0,
        help="""
Seconds after which a child that sent no report is treated as mute.

Used by a parent (``cellagent-top``): a child is mute when neither
``update_capabilities`` nor ``update_capacities`` arrived for this long, or
never. The ``mute_child`` filter keeps builds away from it and the
``mute_child`` weigher pushes it to the bottom, as nova's did.

Possible values:

* A positive number of seconds.
"""),
    cfg.IntOpt(
        "drain_timeout",
        default=30,
        min=0,
        help="""
Seconds a stopping agent waits for in-flight work (cellagent's own).

On SIGTERM the agent stops consuming, waits up to this long for started
operations, and leaves the rest in the journal to be replayed at the next
start. Keep systemd's ``TimeoutStopSec`` longer.

Possible values:

* 0 or more seconds.
"""),
]


def register_opts(conf):
    group.register(conf, cells_group, cells_opts)


def list_opts():
    return [(cells_group, cells_opts)]
