"""[backend] options, and the options of each backend in its own group.

``[backend]`` says which backend runs the instances and how the manager
drives it; ``[fake]`` configures the in-memory fake backend. The ``[ec2]``
and ``[openstack]`` groups will join them in this module.
"""

from oslo_config import cfg

from cellagent.conf import group

backend_group = cfg.OptGroup("backend", title="Backend options", help="""
Which cloud runs this cell's instances, and how the manager drives it:
worker threads, the batched poll of instances in transition, retries.
""")

backend_opts = [
    cfg.StrOpt(
        "driver",
        default="fake",
        help="""
Backend that runs this cell's instances.

The value is an entry-point name in the ``cellagent.backends`` group; the
backend is loaded by that name at startup and the agent refuses to start
if it cannot be loaded.

Possible values:

* ``fake``: an in-memory cloud (see ``[fake]``); for tests and demos
* ``fake-failing-spawn``, ``fake-pending-forever``, ``fake-flaky``,
  ``fake-error-on-boot``: fakes that fail on purpose, for tests
* ``ec2``: Amazon EC2 (see ``[ec2]``)
* ``openstack``: another OpenStack cloud (see ``[openstack]``)

Related options:

* ``[fake]``, ``[ec2]``, ``[openstack]`` groups
"""),
    cfg.FloatOpt(
        "poll_interval",
        default=2.0,
        min=0.05,
        help="""
Seconds between two batched state polls of instances in transition.

On each tick the manager asks the backend, in one call, for the state of
every instance that is building, rebooting, stopping, starting or being
deleted, and reports the ones that settled to the top cell. Shorter makes
state changes show up sooner at the cost of more provider API calls.

Possible values:

* 0.05 or more seconds

Related options:

* ``transition_timeout``
"""),
    cfg.IntOpt(
        "transition_timeout",
        default=600,
        min=1,
        help="""
Seconds an instance may stay in a transitional state before it is failed.

An instance still pending, rebooting, stopping, starting or deleting this
long after the operation was accepted is set to ERROR, with a fault saying
which transition timed out.

Possible values:

* 1 or more seconds

Related options:

* ``poll_interval``
"""),
    cfg.IntOpt(
        "workers",
        default=16,
        min=1,
        help="""
Number of worker threads that call the backend.

Operations on different instances run in parallel up to this number;
operations on one instance are always serialized.

Possible values:

* 1 or more threads

Related options:

* ``[database] max_pool_size`` should not be much smaller
"""),
    cfg.IntOpt(
        "max_pending_operations",
        default=2000,
        min=1,
        help="""
Most received messages in progress at once (flow control).

Without a bound a backlog on the broker would be pulled into memory (and
into the journal) faster than the backend works it off. When this many
journaled messages are unfinished (queued, waiting on the provider, or
waiting for the parent's broker to confirm their reports), the agent stops
taking messages (they stay on the broker) until some finish.

Possible values:

* 1 or more messages

Related options:

* ``[oslo_messaging_rabbit] rabbit_qos_prefetch_count``
"""),
    cfg.IntOpt(
        "operation_retries",
        default=3,
        min=0,
        help="""
Retries of a backend operation that failed with a retryable error.

Retryable errors are throttling, provider 5xx and timeouts. The delay before
retry N is ``retry_delay * 2 ** (N - 1)`` seconds. After the last retry the
operation fails and the instance gets a fault.

Possible values:

* 0 (never retry) or more

Related options:

* ``retry_delay``
"""),
    cfg.FloatOpt(
        "retry_delay",
        default=1.0,
        min=0.0,
        help="""
Seconds before the first retry of a retryable backend error.

Each further retry waits twice as long as the previous one.

Possible values:

* 0 or more seconds

Related options:

* ``operation_retries``
"""),
    cfg.FloatOpt(
        "reconcile_interval",
        default=60.0,
        min=0.0,
        help="""
Seconds between two comparisons of the provider with this cell's records.

Also done once at start, after the journal replay. Instances the provider
has that this cell owns but has no record of are *orphans*; records whose
instance is gone from the provider are *vanished*; settled instances whose
provider state differs from the record (stopped out of band, for example)
have *drifted*, and are reported up together in one pass.

Possible values:

* 0 (never) or more seconds

Related options:

* ``orphan_grace``, ``orphan_action``, ``vanished_action``
"""),
    cfg.FloatOpt(
        "orphan_grace",
        default=300.0,
        min=0.0,
        help="""
Seconds an orphan must stay an orphan before ``orphan_action`` applies.

The grace covers a launch whose record is still being written.

Possible values:

* 0 or more seconds
"""),
    cfg.StrOpt(
        "orphan_action",
        default="terminate",
        choices=[("terminate", "delete it at the provider: it costs money and "
                               "nobody manages it"),
                 ("adopt", "keep it, record it and report it to the top as a server "
                           "of this cell"),
                 ("ignore", "only log it")],
        help="""
What to do with an orphan after ``orphan_grace``.

Possible values:

* ``terminate``, ``adopt`` or ``ignore`` (see the choices)
"""),
    cfg.StrOpt(
        "vanished_action",
        default="destroy",
        choices=[("destroy", "report instance_destroy_at_top: the server is gone"),
                 ("error", "keep the record and set the server to ERROR with a fault")],
        help="""
What to do with a record whose instance the provider no longer has.

Possible values:

* ``destroy`` or ``error`` (see the choices)
"""),
]

fake_group = cfg.OptGroup("fake", title="Fake backend options", help="""
The in-memory fake cloud of the ``fake*`` backends: its size, how long
operations take, and an optional file that lets it outlive the agent.
""")


def _delay_opt(name, what, state):
    return cfg.FloatOpt(
        name,
        default=0.0,
        min=0.0,
        help="""
Seconds a fake instance stays %(state)s after %(what)s.

Simulated by time, not by sleeping: the state flips on the first read
(``poll``, ``get_info``, ...) after the delay has passed. With 0 the call
itself returns the settled state.

Possible values:

* 0 or more seconds

Related options:

* ``[backend] poll_interval``, ``[backend] transition_timeout``
""" % {"what": what, "state": state})


fake_opts = [
    cfg.IntOpt(
        "ram_mb",
        default=20480,
        min=0,
        help="""
RAM of the fake cloud, in MB.

A spawn whose flavor does not fit in the RAM left raises
InsufficientCapacity.

Possible values:

* 0 (no room at all) or more MB

Related options:

* ``disk_gb``, ``vcpus``, ``max_instances``
"""),
    cfg.IntOpt(
        "disk_gb",
        default=400,
        min=0,
        help="""
Disk of the fake cloud, in GB.

Flavors use root_gb + ephemeral_gb of it, as cells v1 counts disk.

Possible values:

* 0 or more GB

Related options:

* ``ram_mb``, ``vcpus``, ``max_instances``
"""),
    cfg.IntOpt(
        "vcpus",
        default=16,
        min=0,
        help="""
Virtual CPUs of the fake cloud.

Reported to the top as a per-flavor instance limit, since the cells v1
capacity payload has no vCPU figure.

Possible values:

* 0 or more vCPUs

Related options:

* ``ram_mb``, ``disk_gb``, ``max_instances``
"""),
    cfg.IntOpt(
        "max_instances",
        default=0,
        min=0,
        help="""
Largest number of instances in the fake cloud (an instance quota).

Possible values:

* 0: unlimited
* a positive number of instances

Related options:

* ``ram_mb``, ``disk_gb``, ``vcpus``
"""),
    _delay_opt("spawn_delay", "a spawn", "pending"),
    _delay_opt("reboot_delay", "a reboot", "rebooting"),
    _delay_opt("stop_delay", "a power off", "stopping"),
    _delay_opt("start_delay", "a power on", "starting"),
    _delay_opt("delete_delay", "a destroy", "deleting"),
    cfg.StrOpt(
        "cloud_file",
        default=None,
        help="""
JSON file that keeps the fake cloud across agent restarts.

When set, the fake cloud (its instances and how many times each instance
uuid was created) is written to this file after every change, atomically
(temporary file, then rename), and read back at startup, so it survives
an agent restart or SIGKILL as a real cloud would. Tests use it to prove
that an instance is created exactly once. When unset the cloud lives and
dies with the process.

Possible values:

* unset: in memory only
* a path in a writable directory

Related options:

* ``[backend] driver`` must name a ``fake*`` backend
"""),
    cfg.IntOpt(
        "console_lines",
        default=20,
        min=1,
        help="""
Number of lines of the fake boot log returned as console output.

The log ends with a login prompt.

Possible values:

* 1 or more lines
"""),
    cfg.BoolOpt(
        "public_ips",
        default=True,
        help="""
Give each fake instance a floating address besides its fixed one.

Fixed addresses come from 10.20.0.0/16, floating ones from 203.0.113.0/24
(a documentation range), both derived from the instance uuid.

Possible values:

* True: fixed and floating address
* False: fixed address only
"""),
]


def register_opts(conf):
    group.register(conf, backend_group, backend_opts)
    group.register(conf, fake_group, fake_opts)


def list_opts():
    return [(backend_group, backend_opts), (fake_group, fake_opts)]
