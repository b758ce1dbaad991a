"""An in-memory cloud, plus subclasses that fail on purpose (nova/virt/fake.py style).

``FakeBackend`` keeps real bookkeeping (capacity, addresses, idempotent
spawn, time-based transitions) so the manager, the reporter and the
functional tests exercise the same paths they would against EC2. With
``[fake] cloud_file`` the cloud is also kept on disk, so it outlives an
agent killed with SIGKILL the way a real cloud does.

File format (``cloud_file``)::

    {"version": 1,
     "instances": [{"backend_id": "fake-1a2b3c4d", "instance_uuid": ...,
                    "launch_token": ..., "status": "active", ...}, ...],
     "creates": {"<instance uuid>": <real creations>}}
"""

import collections
import contextlib
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import tempfile
import threading
import time

from cellagent import exception
from cellagent import uuidutils
from cellagent.backends import base
from cellagent.objects import Address
from cellagent.objects import Capacity
from cellagent.objects import InstanceInfo
from cellagent.objects import InstanceState
from cellagent.objects import RebootKind

LOG = logging.getLogger(__name__)

_FIXED_NET = ipaddress.ip_network("10.20.0.0/16")
_FLOATING_NET = ipaddress.ip_network("203.0.113.0/24")   # RFC 5737 documentation range
_FILE_VERSION = 1
_DELETED = "deleted"    # transition target that removes the instance

_BOOT_LOG = (
    "[    0.000000] Linux version 6.1.0-fake (cellagent@fake) #1 SMP",
    "[    0.000000] Command line: BOOT_IMAGE=/vmlinuz root=LABEL=cloudimg-rootfs ro console=ttyS0",
    "[    0.412345] virtio_net virtio0 eth0: renamed from ens3",
    "[    1.203456] EXT4-fs (vda1): mounted filesystem with ordered data mode",
    "[    2.345678] systemd[1]: Detected virtualization kvm.",
    "cloud-init[512]: Cloud-init v. 23.1 running 'init' (instance %(uuid)s)",
    "ci-info: | eth0 | True | %(ip)s | 255.255.0.0 | global | %(mac)s |",
    "cloud-init[512]: Generating public/private ed25519 key pair.",
    "[  OK  ] Started OpenSSH server daemon.",
    "[  OK  ] Reached target Multi-User System.",
)


class FakeBackend(base.Backend):
    """A working cloud in memory; see ``[fake]`` for its size and delays.

    Provider states are Nova-like strings mapped through ``STATE_MAP``.
    ``calls`` counts every public call by method name (tests and benchmarks
    use it as an API call budget); ``creates`` counts real creations per
    instance uuid (exactly-once checks) and is kept in ``cloud_file``.
    ``clock`` is the time source of the delays; tests may replace it.
    """

    name = "fake"
    capabilities = {
        "supports_soft_reboot": True,
        "supports_pause": True,
        "supports_suspend": True,
        "supports_console_output": True,
        "supports_resize": True,
        "resize_needs_stop": False,
        "supports_snapshot": True,
    }
    STATE_MAP = {
        "building": InstanceState.PENDING,
        "active": InstanceState.RUNNING,
        "rebooting": InstanceState.REBOOTING,
        "hard_rebooting": InstanceState.REBOOTING,
        "stopping": InstanceState.STOPPING,
        "shutoff": InstanceState.STOPPED,
        "starting": InstanceState.STARTING,
        "deleting": InstanceState.DELETING,
        "error": InstanceState.ERROR,
        "pausing": InstanceState.STOPPING,
        "paused": InstanceState.PAUSED,
        "suspending": InstanceState.STOPPING,
        "suspended": InstanceState.SUSPENDED,
        "resuming": InstanceState.STARTING,
        "resizing": InstanceState.PENDING,
    }

    #: (status after the spawn delay, fault). None: never leaves "building".
    boot_outcome = ("active", "")

    def __init__(self, conf):
        super().__init__(conf)
        self._opts = conf.fake
        self.calls = collections.Counter()
        self.creates = collections.Counter()
        self.clock = time.time      # wall clock: deadlines are kept in cloud_file
        self._lock = threading.Lock()
        self._started = False
        self._reset()

    def _reset(self):
        self._instances = {}        # backend id -> record (a JSON-ready dict)
        self._by_uuid = {}          # instance uuid -> backend id
        self._pending = set()       # backend ids with a scheduled transition
        self._used = collections.Counter()   # ram_mb, disk_mb, vcpus, instances
        self._ips = set()
        self._images = {}           # snapshot image id -> {name, instance_uuid, ready_at}
        self._dirty = False

    # -- life cycle -------------------------------------------------------

    def start(self):
        with self._lock:
            self.calls["start"] += 1
            self._load()
            self._started = True
        LOG.info("Fake backend %(name)s started with %(n)d instances",
                 {"name": self.name, "n": len(self._instances)})

    def stop(self):
        with self._lock:
            self.calls["stop"] += 1
            self._started = False

    # -- instance operations ----------------------------------------------

    def spawn(self, request):
        with self._op("spawn"):
            uuid = request.instance_uuid
            old = self._instances.get(self._by_uuid.get(uuid))
            if old is not None and old["launch_token"] == request.launch_token:
                LOG.info("[instance: %(uuid)s] spawn repeated with the same launch "
                         "token; returning %(bid)s", {"uuid": uuid, "bid": old["backend_id"]})
                return self._to_info(old)
            self._check_room(request.flavor, freeing=old)
            if old is not None:
                LOG.info("[instance: %(uuid)s] new launch token: replacing %(bid)s",
                         {"uuid": uuid, "bid": old["backend_id"]})
                self._remove(old)
            rec = self._create(request)
            # DEBUG: the manager logs the build at INFO once it is active.
            LOG.debug("[instance: %(uuid)s] created %(bid)s (%(flavor)s)",
                     {"uuid": uuid, "bid": rec["backend_id"], "flavor": rec["flavor"]})
            return self._to_info(rec)

    def destroy(self, ref):
        with self._op("destroy"):
            try:
                rec = self._lookup(ref)
            except exception.InstanceNotFound:
                LOG.warning("[instance: %(uuid)s] destroy: no instance %(bid)r, "
                            "already gone", {"uuid": ref.instance_uuid,
                                             "bid": ref.backend_id})
                return
            if rec["status"] != "deleting":
                LOG.info("[instance: %(uuid)s] deleting %(bid)s",
                         {"uuid": rec["instance_uuid"], "bid": rec["backend_id"]})
                self._begin(rec, "deleting", _DELETED, self._opts.delete_delay)

    def reboot(self, ref, kind):
        with self._op("reboot"):
            rec = self._lookup(ref)
            if self._reboot_kind(ref, kind) is RebootKind.SOFT:
                self._require(rec, "reboot", ("active",))
                self._begin(rec, "rebooting", "active", self._opts.reboot_delay)
            else:
                # Like Nova, a hard reboot also revives a stopped or errored instance.
                self._require(rec, "reboot", ("active", "shutoff", "error"))
                self._begin(rec, "hard_rebooting", "active", self._opts.reboot_delay)
            return self._to_info(rec)

    def power_off(self, ref):
        with self._op("power_off"):
            rec = self._lookup(ref)
            if rec["status"] != "shutoff":
                self._require(rec, "power off", ("active", "error"))
                self._begin(rec, "stopping", "shutoff", self._opts.stop_delay)
            return self._to_info(rec)

    def power_on(self, ref):
        with self._op("power_on"):
            rec = self._lookup(ref)
            if rec["status"] != "active":
                self._require(rec, "power on", ("shutoff",))
                self._begin(rec, "starting", "active", self._opts.start_delay)
            return self._to_info(rec)

    def pause(self, ref):
        return self._toggle(ref, "pause", ("active",), "pausing", "paused")

    def unpause(self, ref):
        return self._toggle(ref, "unpause", ("paused",), "resuming", "active")

    def suspend(self, ref):
        return self._toggle(ref, "suspend", ("active",), "suspending", "suspended")

    def resume(self, ref):
        return self._toggle(ref, "resume", ("suspended",), "resuming", "active")

    def _toggle(self, ref, op, allowed, during, final):
        with self._op(op):
            rec = self._lookup(ref)
            if rec["status"] != final:
                self._require(rec, op, allowed)
                self._begin(rec, during, final, self._opts.stop_delay)
            return self._to_info(rec)

    def resize(self, ref, flavor):
        """Resize in place (running or stopped); the room is checked first."""
        with self._op("resize"):
            rec = self._lookup(ref)
            self._require(rec, "resize", ("active", "shutoff"))
            self._check_room(flavor, freeing=rec)
            self._used.subtract(self._usage(rec))
            rec.update(flavor=flavor.name, ram_mb=flavor.memory_mb, disk_mb=flavor.disk_mb,
                       vcpus=flavor.vcpus)
            self._used.update(self._usage(rec))
            self._begin(rec, "resizing", rec["status"], self._opts.reboot_delay)
            return self._to_info(rec)

    def snapshot(self, ref, name):
        with self._op("snapshot"):
            rec = self._lookup(ref)
            image = "fake-img-%s" % uuidutils.generate_uuid(dashed=False)[:8]
            self._images[image] = {"name": name, "instance_uuid": rec["instance_uuid"],
                                   "ready_at": self.clock() + self._opts.reboot_delay}
            return image

    def image_status(self, image_id):
        with self._op("image_status"):
            image = self._images.get(image_id)
            if image is None:
                return "failed"
            return "available" if self.clock() >= image["ready_at"] else "pending"

    # -- queries -----------------------------------------------------------

    def get_info(self, ref):
        with self._op("get_info"):
            return self._to_info(self._lookup(ref))

    def poll(self, refs):
        # One call whatever len(refs), as EC2's DescribeInstances would be.
        with self._op("poll"):
            result = {}
            for ref in refs:
                try:
                    result[ref.instance_uuid] = self._to_info(self._lookup(ref))
                except exception.InstanceNotFound:
                    result[ref.instance_uuid] = InstanceInfo(
                        backend_id=ref.backend_id, state=InstanceState.DELETED,
                        instance_uuid=ref.instance_uuid)
            return result

    def list_instances(self):
        with self._op("list_instances"):
            return self._to_instances(self._instances.values())

    def get_capacity(self, flavors):
        with self._op("get_capacity"):
            ram, disk = self._opts.ram_mb, self._opts.disk_gb * 1024
            free_vcpus = max(self._opts.vcpus - self._used["vcpus"], 0)
            max_units = {}
            # RAM and disk are left to the reporter (it applies the reserve);
            # only the limits the cells v1 payload cannot express go here.
            for flavor in flavors:
                limits = []
                if flavor.vcpus:
                    limits.append(free_vcpus // flavor.vcpus)
                if self._opts.max_instances:
                    limits.append(max(self._opts.max_instances - self._used["instances"], 0))
                if limits:
                    max_units[flavor.name] = min(limits)
            return Capacity(ram_total_mb=ram,
                            ram_free_mb=max(ram - self._used["ram_mb"], 0),
                            disk_total_mb=disk,
                            disk_free_mb=max(disk - self._used["disk_mb"], 0),
                            max_units=max_units, vcpus_total=self._opts.vcpus,
                            vcpus_used=self._used["vcpus"])

    def get_console_output(self, ref, tail_length=None):
        with self._op("get_console_output"):
            rec = self._lookup(ref)
            values = {"uuid": rec["instance_uuid"], "ip": rec["fixed_ip"], "mac": rec["mac"]}
            count = self._opts.console_lines
            lines = [_BOOT_LOG[i % len(_BOOT_LOG)] % values for i in range(count - 1)]
            lines.append("%s login: " % (rec["name"] or "fake"))
            if tail_length is not None:
                lines = lines[-tail_length:] if tail_length > 0 else []
            return "\n".join(lines)

    # -- bookkeeping (all called with self._lock held) ---------------------

    @contextlib.contextmanager
    def _op(self, op):
        """Count the call, inject faults, apply due transitions, persist changes."""
        with self._lock:
            self.calls[op] += 1
            if not self._started:
                raise exception.BackendError(backend=self.name,
                                             reason="%s called before start()" % op)
            self._inject_fault(op)
            self._settle()
            try:
                yield
            finally:
                if self._dirty:
                    self._save()

    def _inject_fault(self, op):
        """Hook for the failing subclasses; the working cloud never fails."""

    def _lookup(self, ref):
        # A backend id is authoritative: a stale one (replaced by a rebuild)
        # must not fall back to the uuid and hit the new generation.
        bid = ref.backend_id or self._by_uuid.get(ref.instance_uuid)
        rec = self._instances.get(bid)
        if rec is None:
            raise exception.InstanceNotFound(instance_id=ref.instance_uuid, backend=self.name)
        return rec

    def _require(self, rec, what, allowed):
        if rec["status"] in allowed:
            return
        state = self.map_state(rec["status"])
        raise exception.BackendError(
            backend=self.name,
            retryable=state.is_transitional and state is not InstanceState.DELETING,
            reason="cannot %s instance %s while it is %s" % (
                what, rec["instance_uuid"], state.value))

    def _check_room(self, flavor, freeing=None):
        used = collections.Counter(self._used)
        if freeing is not None:
            used.subtract(self._usage(freeing))
        want = {"ram_mb": flavor.memory_mb, "disk_mb": flavor.disk_mb, "vcpus": flavor.vcpus}
        have = {"ram_mb": self._opts.ram_mb, "disk_mb": self._opts.disk_gb * 1024,
                "vcpus": self._opts.vcpus}
        for key, amount in want.items():
            if used[key] + amount > have[key]:
                raise exception.InsufficientCapacity(
                    backend=self.name,
                    reason="%s: %d requested, %d of %d free" % (
                        key, amount, have[key] - used[key], have[key]))
        if self._opts.max_instances and used["instances"] >= self._opts.max_instances:
            raise exception.InsufficientCapacity(
                backend=self.name,
                reason="max_instances %d reached" % self._opts.max_instances)

    def _create(self, request):
        bid = "fake-%s" % uuidutils.generate_uuid(dashed=False)[:8]
        while bid in self._instances:
            bid = "fake-%s" % uuidutils.generate_uuid(dashed=False)[:8]
        uuid = request.instance_uuid
        digest = hashlib.sha1(uuid.encode()).digest()
        fixed = self._allocate_ip(_FIXED_NET, digest)
        if fixed is None:
            raise exception.InsufficientCapacity(backend=self.name,
                                                 reason="no fixed address left")
        floating = None
        if self._opts.public_ips:
            floating = self._allocate_ip(_FLOATING_NET, digest)
            if floating is None:
                LOG.warning("[instance: %s] no floating address left; fixed only", uuid)
        flavor = request.flavor
        rec = {
            "backend_id": bid, "instance_uuid": uuid, "launch_token": request.launch_token,
            "name": request.name, "flavor": flavor.name, "ram_mb": flavor.memory_mb,
            "disk_mb": flavor.disk_mb, "vcpus": flavor.vcpus, "fixed_ip": fixed,
            "floating_ip": floating, "mac": "fa:16:3e:%02x:%02x:%02x" % tuple(digest[-3:]),
            "status": "building", "fault": "", "launched_at": "",
            "next": None, "next_fault": "", "until": 0.0,
        }
        self._add(rec)
        self.creates[uuid] += 1
        status, fault = self.boot_outcome
        self._begin(rec, "building", status, self._opts.spawn_delay, fault)
        return rec

    def _allocate_ip(self, net, digest):
        # Start at a uuid-derived host so an instance keeps its address
        # across runs; probe linearly on collision.
        hosts = net.num_addresses - 2
        start = int.from_bytes(digest[:4], "big") % hosts
        for i in range(hosts):
            ip = str(net.network_address + 1 + (start + i) % hosts)
            if ip not in self._ips:
                return ip
        return None

    @staticmethod
    def _usage(rec):
        return {"ram_mb": rec["ram_mb"], "disk_mb": rec["disk_mb"],
                "vcpus": rec["vcpus"], "instances": 1}

    def _add(self, rec):
        self._instances[rec["backend_id"]] = rec
        self._by_uuid[rec["instance_uuid"]] = rec["backend_id"]
        self._used.update(self._usage(rec))
        self._ips.update(ip for ip in (rec["fixed_ip"], rec["floating_ip"]) if ip)
        if rec["next"] is not None:
            self._pending.add(rec["backend_id"])
        self._dirty = True

    def _remove(self, rec):
        bid = rec["backend_id"]
        del self._instances[bid]
        if self._by_uuid.get(rec["instance_uuid"]) == bid:
            del self._by_uuid[rec["instance_uuid"]]
        self._pending.discard(bid)
        self._used.subtract(self._usage(rec))
        self._ips.difference_update((rec["fixed_ip"], rec["floating_ip"]))
        self._dirty = True

    def _begin(self, rec, status, final, delay, fault=""):
        """Put rec in ``status`` now and in ``final`` once ``delay`` has passed."""
        rec.update(status=status, next=final, next_fault=fault, until=self.clock() + delay)
        if final is None:
            self._pending.discard(rec["backend_id"])
        else:
            self._pending.add(rec["backend_id"])
            if delay <= 0:
                self._finish(rec)
        self._dirty = True

    def _settle(self):
        now = self.clock()
        for bid in [b for b in self._pending if self._instances[b]["until"] <= now]:
            self._finish(self._instances[bid])

    def _finish(self, rec):
        self._pending.discard(rec["backend_id"])
        final, rec["next"] = rec["next"], None
        self._dirty = True
        if final == _DELETED:
            self._remove(rec)
            LOG.info("[instance: %(uuid)s] %(bid)s deleted",
                     {"uuid": rec["instance_uuid"], "bid": rec["backend_id"]})
            return
        rec.update(status=final, fault=rec["next_fault"])
        if final == "active" and not rec["launched_at"]:
            rec["launched_at"] = datetime.datetime.fromtimestamp(
                self.clock(), datetime.timezone.utc).isoformat()
        LOG.debug("[instance: %(uuid)s] %(bid)s is now %(status)s",
                  {"uuid": rec["instance_uuid"], "bid": rec["backend_id"], "status": final})

    # -- cloud_file ----------------------------------------------------------

    @contextlib.contextmanager
    def _translate_errors(self, what):
        # The fake's only "provider" is its file: keep OS and JSON errors
        # inside the BackendError contract.
        try:
            yield
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise exception.BackendError(backend=self.name,
                                         reason="%s: %s" % (what, exc)) from exc

    def _load(self):
        path = self._opts.cloud_file
        if not path or not os.path.exists(path):
            return      # no file: keep the in-memory cloud (it outlives stop/start)
        with self._translate_errors("reading fake cloud %s" % path):
            with open(path) as f:
                data = json.load(f)
            if data.get("version") != _FILE_VERSION:
                raise ValueError("unsupported version %r" % data.get("version"))
            self._reset()
            for rec in data["instances"]:
                self._add(rec)
            self.creates = collections.Counter(data["creates"])
        self._dirty = False

    def _save(self):
        self._dirty = False
        path = self._opts.cloud_file
        if not path:
            return
        data = {"version": _FILE_VERSION, "instances": list(self._instances.values()),
                "creates": dict(self.creates)}
        with self._translate_errors("writing fake cloud %s" % path):
            fd, tmp = tempfile.mkstemp(prefix=".fake-cloud-",
                                       dir=os.path.dirname(os.path.abspath(path)))
            try:
                # No fsync: the file must survive SIGKILL of the agent, which
                # the page cache already guarantees, not a power cut.
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    # -- converters (last, as in libcloud) -----------------------------------

    def _to_info(self, rec):
        state = self.map_state(rec["status"])
        addresses = []
        if state is not InstanceState.ERROR:
            addresses.append(Address(rec["fixed_ip"], 4, "fixed", "private", rec["mac"]))
            if rec["floating_ip"]:
                addresses.append(Address(rec["floating_ip"], 4, "floating", "private",
                                         rec["mac"]))
        return InstanceInfo(backend_id=rec["backend_id"], state=state, addresses=addresses,
                            instance_uuid=rec["instance_uuid"], fault=rec["fault"],
                            launched_at=rec["launched_at"])

    def _to_instances(self, recs):
        return [self._to_info(rec) for rec in recs]


class FailingSpawnBackend(FakeBackend):
    """Every spawn fails with a non-retryable BackendError; nothing is created."""

    name = "fake-failing-spawn"

    def spawn(self, request):
        with self._op("spawn"):
            raise exception.BackendError(
                backend=self.name,
                reason="spawn of %s refused on purpose by the %s backend" % (
                    request.instance_uuid, self.name))


class PendingForeverBackend(FakeBackend):
    """Spawned instances never leave PENDING (tests the transition timeout)."""

    name = "fake-pending-forever"
    boot_outcome = (None, "")


class ErrorOnBootBackend(FakeBackend):
    """Spawn is accepted, then the instance goes to ERROR after the spawn delay."""

    name = "fake-error-on-boot"
    boot_outcome = ("error", "No valid host was found")


class FlakyBackend(FakeBackend):
    """The first ``failures`` calls of each operation raise BackendUnavailable.

    The failure happens before the operation does anything, so a retried
    spawn still creates exactly one instance. ``start``/``stop`` never fail.
    """

    name = "fake-flaky"
    failures = 2

    def _inject_fault(self, op):
        if self.calls[op] <= self.failures:
            raise exception.BackendUnavailable(
                backend=self.name, reason="injected failure %d of %d for %s" % (
                    self.calls[op], self.failures, op))
