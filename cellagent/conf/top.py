"""[top] options: the parent (top) cell, ``cellagent-top`` (cellagent's own).

Nova's cells v1 parent never re-sent a build and had no client topic of its
own; these options are cellagent's. The scheduler's options are in
``[scheduler]`` (``conf/scheduler.py``); ``[cells] mute_child_interval`` is
nova's.
"""

from oslo_config import cfg

from cellagent.conf import group

top_group = cfg.OptGroup("top", title="Top cell options", help="""
The top (parent) cell: the client API topic, build delivery and re-sends,
and housekeeping of the instance view.
""")

top_opts = [
    cfg.StrOpt(
        "topic",
        default="cellagent_top",
        help="""
RPC topic on the top cell's own broker where ``cellagent-client`` calls.

Like nova's local ``cells`` topic: it is never used between cells.

Possible values:

* A topic name; the client must use the same.
"""),
    cfg.FloatOpt(
        "build_ack_timeout",
        default=30.0,
        min=0.1,
        help="""
Seconds the top waits for a child to acknowledge a build.

The acknowledgement is the child's first ``instance_update_at_top`` for the
instance. Without it the build is sent again, with the same instance uuid
(children drop duplicates), up to ``build_retries`` times.

Possible values:

* A positive number of seconds.

Related options:

* ``build_retries``
"""),
    cfg.IntOpt(
        "build_retries",
        default=3,
        min=1,
        help="""
How many times a build is sent to one cell before giving up on that cell.

After the last unacknowledged send the cell is backed off and the build is
rescheduled to another cell, or the instance set to ERROR with a fault when
no other cell fits.

Possible values:

* 1 or more.
"""),
    cfg.IntOpt(
        "max_reschedules",
        default=2,
        min=0,
        help="""
How many other cells an unacknowledged build may be moved to.

Possible values:

* 0 (never move a build) or more.
"""),
    cfg.FloatOpt(
        "periodic_interval",
        default=1.0,
        min=0.05,
        help="""
Seconds between the top's housekeeping ticks (re-sends, mute detection).

Possible values:

* A positive number of seconds.
"""),
    cfg.IntOpt(
        "purge_deleted_after",
        default=86400,
        min=0,
        help="""
Seconds a deleted server stays visible in ``server list --deleted``.

Possible values:

* 0 (purge at the next tick) or more seconds.
"""),
]


def register_opts(conf):
    group.register(conf, top_group, top_opts)


def list_opts():
    return [(top_group, top_opts)]
