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
        return dataclasses.asdict(self)


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
