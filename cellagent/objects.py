"""Plain data shared by the layers: enums, flavors, build requests, capacity.

Nothing here does I/O. The wire forms (Nova object primitives) live in
``rpc/intercell.py``; these are the in-process shapes the manager, the store
and the backends agree on.
"""

import dataclasses
import enum


class InstanceState(str, enum.Enum):
    """The one state vocabulary every backend maps its provider's states to.

    Backends translate with a ``STATE_MAP`` dict (libcloud's NODE_STATE_MAP
    idea); the manager translates these into Nova's vm_state / task_state /
    power_state when it reports to the top (see ``NOVA_STATES``).
    """

    PENDING = "pending"        # accepted by the provider, not running yet
    RUNNING = "running"
    REBOOTING = "rebooting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    DELETING = "deleting"
    DELETED = "deleted"        # gone from the provider
    ERROR = "error"
    UNKNOWN = "unknown"

    @property
    def is_transitional(self):
        return self in _TRANSITIONAL


_TRANSITIONAL = frozenset({
    InstanceState.PENDING, InstanceState.REBOOTING, InstanceState.STOPPING,
    InstanceState.STARTING, InstanceState.DELETING,
})


class VmState:
    """nova.compute.vm_states values (strings on the wire)."""

    ACTIVE = "active"
    BUILDING = "building"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    STOPPED = "stopped"
    RESIZED = "resized"
    SOFT_DELETED = "soft-delete"
    DELETED = "deleted"
    ERROR = "error"


class TaskState:
    """nova.compute.task_states values used by this agent."""

    SCHEDULING = "scheduling"
    SPAWNING = "spawning"
    REBOOTING = "rebooting"
    REBOOTING_HARD = "rebooting_hard"
    POWERING_OFF = "powering-off"
    POWERING_ON = "powering-on"
    SOFT_DELETING = "soft-deleting"
    DELETING = "deleting"
    PAUSING = "pausing"
    UNPAUSING = "unpausing"
    SUSPENDING = "suspending"
    RESUMING = "resuming"
    RESIZE_PREP = "resize_prep"
    RESIZE_MIGRATING = "resize_migrating"
    RESIZE_MIGRATED = "resize_migrated"
    RESIZE_FINISH = "resize_finish"
    RESIZE_REVERTING = "resize_reverting"
    REBUILDING = "rebuilding"
    REBUILD_SPAWNING = "rebuild_spawning"
    IMAGE_SNAPSHOT = "image_snapshot"
    IMAGE_PENDING_UPLOAD = "image_pending_upload"
    IMAGE_UPLOADING = "image_uploading"


class PowerState:
    """nova.compute.power_state values (integers on the wire)."""

    NOSTATE = 0
    RUNNING = 1
    PAUSED = 3
    SHUTDOWN = 4
    CRASHED = 6
    SUSPENDED = 7


# What Nova would show for a settled backend state: (vm_state, power_state).
NOVA_STATES = {
    InstanceState.RUNNING: (VmState.ACTIVE, PowerState.RUNNING),
    InstanceState.STOPPED: (VmState.STOPPED, PowerState.SHUTDOWN),
    InstanceState.PAUSED: (VmState.PAUSED, PowerState.PAUSED),
    InstanceState.SUSPENDED: (VmState.SUSPENDED, PowerState.SUSPENDED),
    InstanceState.ERROR: (VmState.ERROR, PowerState.NOSTATE),
    InstanceState.DELETED: (VmState.DELETED, PowerState.NOSTATE),
}


MAX_INT = 2 ** 31 - 1


class RebootKind(str, enum.Enum):
    SOFT = "SOFT"
    HARD = "HARD"


@dataclasses.dataclass(frozen=True)
class Flavor:
    """The parts of a Nova flavor a cell needs to place and count instances."""

    name: str
    memory_mb: int
    vcpus: int = 1
    root_gb: int = 0
    ephemeral_gb: int = 0
    flavorid: str = ""
    swap: int = 0
    extra_specs: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def disk_mb(self):
        """Disk slot size exactly as cells v1 counts it (swap ignored)."""
        return (self.root_gb + self.ephemeral_gb) * 1024

    @classmethod
    def parse(cls, text):
        """Parse ``name:memory_mb:vcpus:root_gb[:ephemeral_gb]``."""
        parts = [p.strip() for p in text.split(":")]
        if len(parts) not in (4, 5) or not parts[0]:
            raise ValueError("flavor %r is not name:memory_mb:vcpus:root_gb"
                             "[:ephemeral_gb]" % text)
        nums = [int(p) for p in parts[1:]]
        if any(n < 0 for n in nums) or nums[0] <= 0:
            raise ValueError("flavor %r has a negative or zero size" % text)
        return cls(parts[0], *nums)

    def __post_init__(self):
        # Nova's own bounds (db.MAX_INT): anything larger is not a flavor.
        for field in ("memory_mb", "vcpus", "root_gb", "ephemeral_gb", "swap"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or \
                    not 0 <= value <= MAX_INT:
                raise ValueError("flavor %s: %s=%r is not an integer between 0 and %d"
                                 % (self.name, field, value, MAX_INT))

    @classmethod
    def from_primitive_data(cls, data):
        """From the ``nova_object.data`` of a Flavor primitive (or a plain dict).

        Raises ValueError for sizes that are not integers within Nova's bounds.
        """
        return cls(name=str(data.get("name") or data.get("flavorid") or "unnamed"),
                   memory_mb=int(data.get("memory_mb") or 0),
                   vcpus=int(data.get("vcpus") or 0),
                   root_gb=int(data.get("root_gb") or 0),
                   ephemeral_gb=int(data.get("ephemeral_gb") or 0),
                   flavorid=str(data.get("flavorid") or ""),
                   swap=int(data.get("swap") or 0),
                   extra_specs=dict(data.get("extra_specs") or {}))

    def to_dict(self):
        # dataclasses.asdict deep-copies field by field; this runs for
        # every build (issue 3 benchmark).
        return {"name": self.name, "memory_mb": self.memory_mb, "vcpus": self.vcpus,
                "root_gb": self.root_gb, "ephemeral_gb": self.ephemeral_gb,
                "flavorid": self.flavorid, "swap": self.swap,
                "extra_specs": dict(self.extra_specs)}


@dataclasses.dataclass
class Address:
    """One address of an instance, as the backend learned it."""

    address: str
    version: int = 4
    kind: str = "fixed"        # "fixed" or "floating" (Nova's network model types)
    network: str = "public"
    mac: str = ""
    dns_name: str = ""


@dataclasses.dataclass
class BuildRequest:
    """Everything a backend needs to launch one instance.

    ``launch_token`` is derived from the instance uuid and ``generation`` and
    is stored before the backend is called, so that a re-issued launch (after
    a crash or a lost response) carries the same token.
    """

    instance_uuid: str
    name: str
    flavor: Flavor
    image: dict
    launch_token: str
    generation: int = 1
    project_id: str = ""
    user_id: str = ""
    key_name: str = ""
    key_data: str = ""
    user_data: str = ""
    metadata: dict = dataclasses.field(default_factory=dict)
    networks: list = dataclasses.field(default_factory=list)
    security_groups: list = dataclasses.field(default_factory=list)
    launch_index: int = 0
    admin_password: str = dataclasses.field(default="", repr=False)
    #: True when this cell never recorded the instance before this request:
    #: no process of this cell can have launched it, so a backend may skip
    #: its look-up for an earlier launch. False on replays, retries after a
    #: restart and rebuilds, where the look-up is what keeps launches
    #: exactly-once.
    first_launch: bool = False


@dataclasses.dataclass
class InstanceInfo:
    """What a backend knows of one instance at one moment."""

    backend_id: str
    state: InstanceState
    addresses: list = dataclasses.field(default_factory=list)
    instance_uuid: str = ""
    fault: str = ""
    launched_at: str = ""


@dataclasses.dataclass
class Capacity:
    """A backend's room, from which the reporter builds the cells v1 payload.

    ``*_total_mb`` and ``*_free_mb`` are raw figures (reserve not applied).
    ``vcpus_*`` feed the compute node Nova's API shows for this cell.
    ``max_units`` optionally caps the number of instances per flavor name
    (quota, budget or an unavailable instance type); a flavor missing from it
    is limited by RAM and disk only.
    """

    ram_total_mb: int
    ram_free_mb: int
    disk_total_mb: int
    disk_free_mb: int
    max_units: dict = dataclasses.field(default_factory=dict)
    vcpus_total: int = 0       # 0: the backend does not count vCPUs
    vcpus_used: int = 0


@dataclasses.dataclass(frozen=True)
class InstanceRef:
    """How the manager names an instance to a backend.

    ``backend_id`` may be empty when the agent crashed between asking the
    provider for an instance and storing its answer: the backend must then
    find the instance by ``instance_uuid`` (tag, metadata or name), or treat
    it as never created.
    """

    instance_uuid: str
    backend_id: str = ""
    launch_token: str = ""


@dataclasses.dataclass
class InstanceRecord:
    """One row of the instance map (``state/``): the child's memory of an instance.

    ``instance`` holds the Nova Instance fields as last reported to the top
    (the ``nova_object.data`` dict), so every later report can send the whole
    instance and list only what changed in ``nova_object.changes``.
    """

    instance_uuid: str
    state: InstanceState = InstanceState.PENDING
    backend_id: str = ""
    vm_state: str = VmState.BUILDING
    task_state: str | None = TaskState.SCHEDULING
    power_state: int = PowerState.NOSTATE
    flavor: dict = dataclasses.field(default_factory=dict)
    image_ref: str = ""
    addresses: list = dataclasses.field(default_factory=list)
    launch_token: str = ""
    generation: int = 1
    project_id: str = ""
    instance: dict = dataclasses.field(default_factory=dict)
    fault: str = ""
    deleted: bool = False
    created_at: object = None     # datetime (UTC, naive) set by the store
    updated_at: object = None     # datetime (UTC, naive) set by the store


@dataclasses.dataclass
class JournalEntry:
    """One received message in the journal (``state/``)."""

    id: int
    msg_uuid: str
    method: str
    instance_uuid: str | None
    payload: str
    status: str
    attempts: int = 0
    error: str = ""
    created_at: object = None
    updated_at: object = None


class JournalStatus:
    """Journal entry statuses. Only RECEIVED and RUNNING are replayed."""

    RECEIVED = "received"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DROPPED = "dropped"

    UNFINISHED = (RECEIVED, RUNNING)


# -- the top cell (``state/top.py``, ``top.py``) ------------------------------

CELL_TIERS = ("private", "public")


@dataclasses.dataclass
class TopCell:
    """The top's record of one neighbour cell: how to reach it and its budget.

    ``tier`` says where the scheduler looks first: ``private`` cells, then
    ``public`` (burst) ones. ``flavor_costs`` ({flavor name: cost per hour})
    overrides ``cost_per_vcpu_hour`` for the flavors it names. A ``max_*``
    of None means no cap. ``transport_url`` holds broker credentials, so it
    is left out of ``repr`` (and so of logs).

    Values are checked and coerced on construction (numbers from strings or
    JSON ints become floats or ints); a bad one raises ValueError.
    """

    name: str
    transport_url: str = dataclasses.field(repr=False)
    is_parent: bool = False
    weight_offset: float = 0.0
    weight_scale: float = 1.0
    tier: str = "private"
    cost_per_vcpu_hour: float = 0.0
    flavor_costs: dict = dataclasses.field(default_factory=dict)
    max_instances: int | None = None
    max_vcpus: int | None = None
    max_cost_per_hour: float | None = None
    disabled: bool = False

    def __post_init__(self):
        # Same rule as rpc.neighbours.check_cell_name: "!" separates routing
        # path hops, and "." and "@" confuse the transport URL of a path.
        if not isinstance(self.name, str) or not self.name or any(
                c in self.name for c in "!.@"):
            raise ValueError("cell name %r must be non-empty and contain none of ! . @"
                             % (self.name,))
        if not isinstance(self.transport_url, str):
            raise ValueError("cell %s: transport_url must be a string" % self.name)
        if self.tier not in CELL_TIERS:
            raise ValueError("cell %s: tier %r is not one of %s"
                             % (self.name, self.tier, ", ".join(CELL_TIERS)))
        self.is_parent = bool(self.is_parent)
        self.disabled = bool(self.disabled)
        self.weight_offset = self._number("weight_offset", float, signed=True)
        self.weight_scale = self._number("weight_scale", float, signed=True)
        self.cost_per_vcpu_hour = self._number("cost_per_vcpu_hour", float)
        self.max_instances = self._number("max_instances", int, optional=True)
        self.max_vcpus = self._number("max_vcpus", int, optional=True)
        self.max_cost_per_hour = self._number("max_cost_per_hour", float, optional=True)
        costs = {}
        for flavor, cost in dict(self.flavor_costs or {}).items():
            costs[str(flavor)] = self._check(float, cost, "flavor_costs[%s]" % flavor)
        self.flavor_costs = costs

    def _number(self, field, kind, optional=False, signed=False):
        value = getattr(self, field)
        if value is None and optional:
            return None
        return self._check(kind, value, field, signed)

    def _check(self, kind, value, field, signed=False):
        try:
            if isinstance(value, bool):
                raise TypeError
            number = kind(value)
            if kind is int and isinstance(value, float) and number != value:
                raise TypeError
        except (TypeError, ValueError):
            raise ValueError("cell %s: %s=%r is not %s" % (
                self.name, field, value, "an integer" if kind is int else "a number"))
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError("cell %s: %s=%r is not a finite number" % (self.name, field, value))
        if not signed and number < 0:
            raise ValueError("cell %s: %s=%r is negative" % (self.name, field, value))
        return number

    def to_record(self):
        """The ``rpc.neighbours.CellRecord`` the router sends through."""
        from cellagent.rpc import neighbours
        return neighbours.CellRecord(name=self.name, transport_url=self.transport_url,
                                     is_parent=self.is_parent,
                                     weight_offset=self.weight_offset,
                                     weight_scale=self.weight_scale)


@dataclasses.dataclass
class CellReport:
    """What the top last heard from a child, and its build back-off.

    ``capacities`` is the cells v1 ``update_capacities`` payload;
    ``capabilities`` is ``{name: [values]}``. ``last_seen`` is when either
    report last arrived, ``capacities_at`` when the capacities did. All
    datetimes are naive UTC. ``failures`` counts consecutive failed (or
    unacknowledged) builds; the cell gets no builds until ``backoff_until``.
    """

    name: str
    capacities: dict = dataclasses.field(default_factory=dict)
    capabilities: dict = dataclasses.field(default_factory=dict)
    last_seen: object = None
    capacities_at: object = None
    backoff_until: object = None
    failures: int = 0


@dataclasses.dataclass
class TopInstance:
    """One server as the top sees it (``state/top.py``), in whichever cell.

    ``flavor`` is ``{name, memory_mb, vcpus, root_gb, ephemeral_gb,
    flavorid}``; ``addresses`` a list of ``{network, addr, type ("fixed" or
    "floating"), version}``; ``fault`` None or the latest ``{code, message,
    details, created_at}``. Datetimes are naive UTC.

    The build bookkeeping: ``acked`` is set once the chosen cell answered
    with an ``instance_update_at_top``; until then the top re-sends the
    build at ``build_deadline`` (``build_attempts`` sends so far) and
    reschedules it away from ``tried_cells``. ``request_id`` groups the
    instances of one create request.
    """

    uuid: str
    name: str = ""
    cell_name: str | None = None
    project_id: str = ""
    user_id: str = ""
    flavor: dict = dataclasses.field(default_factory=dict)
    image_ref: str = ""
    vm_state: str | None = VmState.BUILDING
    task_state: str | None = None
    power_state: int = PowerState.NOSTATE
    host: str | None = None
    node: str | None = None
    access_ip_v4: str | None = None
    addresses: list = dataclasses.field(default_factory=list)
    launched_at: object = None
    created_at: object = None
    updated_at: object = None
    deleted: bool = False
    deleted_at: object = None
    fault: dict | None = None
    acked: bool = False
    build_attempts: int = 0
    build_deadline: object = None
    tried_cells: list = dataclasses.field(default_factory=list)
    request_id: str = ""
