"""OpenStack backend (python-novaclient on a keystoneauth1 session).

The contract is in ``base.py``; ``docs/openstack.md`` has the per-operation
mapping. What is particular to bursting into another OpenStack:

**Idempotent create.** The Nova API has no idempotency token. Every server
is named ``<name_prefix><instance uuid>`` and carries the metadata
``cellagent_instance_uuid``, ``cellagent_generation`` and
``cellagent_owner``. ``spawn`` lists the servers of that name (one ``GET
/servers/detail?name=^…$``) before every create: a server of the same
generation is returned instead of creating one, older generations are
deleted (a rebuild), and when several of one generation exist (a create
retried after a lost response, by another process) the oldest is kept and
the others deleted. A create that failed without a definite answer
(timeout, connection lost, 5xx) is looked up again at once; if nothing is
found, further creates of that instance are refused as retryable for
``lost_create_grace`` seconds, since the first may still be in progress.

**Polling.** ``poll`` is one paged ``GET
/servers/detail?name=^<prefix>&changes-since=<mark>`` whatever the number
of refs. The mark is the newest ``updated`` time the cloud itself reported,
less a margin, so our clock's skew does not matter. Changes update a
cache of our live servers; deleted servers come back from ``changes-since``
with status DELETED and are reported so. A full list (no
``changes-since``) is done at the first poll, every ``_FULL_SYNC`` seconds,
and whenever a ref names a server the cache does not know.

**Capacity.** ``GET /limits`` (absolute quota and usage: instances, cores,
RAM), capped by the operator's budget counted over our own servers. A
create refused with a quota 403 reports no room at once, until the next
delete of ours or ``_QUOTA_HOLD`` seconds.

**Resize.** Nova answers a resize with 202 and schedules it afterwards, so
``resize`` waits (up to ``_RESIZE_SCHEDULE_WAIT``) for a host: a resize
Nova gives up on there (NoValidHost; the server settles back with its old
flavor) is raised as ``InsufficientCapacity``, with the failed event of the
instance action. One that fails later, on the compute, and is rolled back
is reported by ``poll`` once as ERROR with that fault, never as resized.

**Cloud unreachable.** Every call raises ``BackendUnavailable`` (retryable)
while the cloud does not answer; nothing is cached as deleted. A cloud
that comes back with its servers (a restart) is seen by the next full list.
"""

import contextlib
import datetime
import logging
import re
import threading
import time
import urllib.parse
import uuid as uuidlib

from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from novaclient import api_versions
from novaclient import client as nova_client
from novaclient import exceptions as nova_exc
from oslo_config import cfg

from cellagent import exception
from cellagent.backends import base
from cellagent.objects import Address
from cellagent.objects import Capacity
from cellagent.objects import InstanceInfo
from cellagent.objects import InstanceState
from cellagent.objects import RebootKind

LOG = logging.getLogger(__name__)

UUID_KEY = "cellagent_instance_uuid"
GENERATION_KEY = "cellagent_generation"
OWNER_KEY = "cellagent_owner"

_SKEW_MARGIN = 5.0          # seconds subtracted from the changes-since mark
_FULL_SYNC = 300.0          # seconds between full lists in poll
_QUOTA_HOLD = 60.0          # seconds a quota 403 zeroes the reported room
_TIMEOUT = 60.0             # seconds per HTTP request
_RESIZE_SCHEDULE_WAIT = 30.0   # seconds resize() waits for Nova to pick a host
_RESIZE_STEPS = frozenset({"resize_migrating", "resize_migrated", "resize_finish"})
_MIN_VERSION = api_versions.APIVersion("2.47")   # flavor embedded in the server
_GONE = frozenset({"DELETED", "SOFT_DELETED"})

# Nova task states that make a settled status transitional.
_TASK_STATES = {
    "deleting": InstanceState.DELETING,
    "soft-deleting": InstanceState.DELETING,
    "powering-off": InstanceState.STOPPING,
    "pausing": InstanceState.STOPPING,
    "suspending": InstanceState.STOPPING,
    "shelving": InstanceState.STOPPING,
    "powering-on": InstanceState.STARTING,
    "unpausing": InstanceState.STARTING,
    "resuming": InstanceState.STARTING,
    "resize_prep": InstanceState.PENDING,
    "resize_migrating": InstanceState.PENDING,
    "resize_migrated": InstanceState.PENDING,
    "resize_finish": InstanceState.PENDING,
    "resize_reverting": InstanceState.PENDING,
    "resize_confirming": InstanceState.PENDING,
    "rebuilding": InstanceState.PENDING,
    "rebuild_spawning": InstanceState.PENDING,
    "rebooting": InstanceState.REBOOTING,
    "reboot_pending": InstanceState.REBOOTING,
    "reboot_started": InstanceState.REBOOTING,
    "rebooting_hard": InstanceState.REBOOTING,
    "reboot_pending_hard": InstanceState.REBOOTING,
    "reboot_started_hard": InstanceState.REBOOTING,
}


class OpenStackBackend(base.Backend):
    """Instances of this cell as servers of another OpenStack; see ``[openstack]``."""

    name = "openstack"
    capabilities = {
        "supports_soft_reboot": True,
        "supports_pause": True,
        "supports_suspend": True,
        "supports_console_output": True,
        "supports_resize": True,
        "resize_needs_stop": False,     # Nova resizes a running server
        "supports_snapshot": True,
    }
    STATE_MAP = {
        "BUILD": InstanceState.PENDING,
        "ACTIVE": InstanceState.RUNNING,
        "PASSWORD": InstanceState.RUNNING,
        "REBOOT": InstanceState.REBOOTING,
        "HARD_REBOOT": InstanceState.REBOOTING,
        "REBUILD": InstanceState.PENDING,
        "SHUTOFF": InstanceState.STOPPED,
        "PAUSED": InstanceState.PAUSED,
        "SUSPENDED": InstanceState.SUSPENDED,
        "SHELVED": InstanceState.STOPPED,
        "SHELVED_OFFLOADED": InstanceState.STOPPED,
        "RESIZE": InstanceState.PENDING,
        "VERIFY_RESIZE": InstanceState.PENDING,     # poll confirms it
        "REVERT_RESIZE": InstanceState.PENDING,
        "MIGRATING": InstanceState.RUNNING,
        "RESCUE": InstanceState.RUNNING,
        "ERROR": InstanceState.ERROR,
        "DELETED": InstanceState.DELETED,
        "SOFT_DELETED": InstanceState.DELETED,
        "UNKNOWN": InstanceState.UNKNOWN,
    }

    def __init__(self, conf):
        super().__init__(conf)
        self._opts = conf.openstack
        self.owner = self._opts.owner or _cell_name(conf) or "cellagent"
        self.prefix = self._opts.name_prefix
        self.clock = time.monotonic
        self.sleep = time.sleep
        self._session = None
        self._nova = None
        self._region = None
        self._interface = None
        self._lock = threading.Lock()
        self._flavors = {}          # remote flavor id -> novaclient Flavor
        self._flavor_ids = {}       # local flavor name -> remote flavor id
        self._image_ids = {}        # image map key or name -> remote image id
        self._nics = "auto"
        self._servers = {}          # server id -> server dict, our live servers
        self._deleted = set()       # server ids seen DELETED
        self._mark = None           # changes-since mark (cloud time, datetime)
        self._full_at = None        # clock() of the last full list
        self._uncertain = {}        # instance uuid -> clock() of a create of unknown outcome
        self._created = {}          # server id -> clock() when we created it
        self._resizing = {}         # server id -> {"target", ...}: resizes of ours, for poll
        self._images = {}           # snapshot image id -> clock() when created
        self._quota_hit = None      # clock() of the last quota 403 on create
        self._prices = {}

    # -- life cycle -------------------------------------------------------

    def start(self):
        opts = self._opts
        for name, value in opts.prices.items():
            try:
                self._prices[name] = float(value)
            except ValueError:
                raise exception.ConfigurationError(
                    reason="[openstack] prices: %s=%r is not a price" % (name, value))
        with self._translate_errors("connecting to the cloud"):
            self._session = self._make_session()
            try:
                self._session.get_token()   # fail here, not in the first list
            except ks_exc.NotFound as exc:
                raise exception.ConfigurationError(
                    reason="[openstack] no Keystone v3 at the auth URL: %s"
                    % self._scrub(exc)) from exc
            version = self._version()
            self._nova = nova_client.Client(
                version, session=self._session, region_name=self._region,
                endpoint_type=self._interface, timeout=_TIMEOUT)
        self._validate_maps()
        self._sync(full=True)
        LOG.info("OpenStack backend started at microversion %(v)s as owner %(owner)s: "
                 "%(n)d servers", {"v": self._nova.api_version.get_string(),
                                   "owner": self.owner, "n": len(self._servers)})

    def stop(self):
        session, self._session, self._nova = self._session, None, None
        if session is not None:
            with contextlib.suppress(Exception):
                session.session.close()

    def _make_session(self):
        opts = self._opts
        if opts.cloud:
            import openstack.config   # only when clouds.yaml is used: it is slow to import
            try:
                cloud = openstack.config.OpenStackConfig().get_one(opts.cloud)
            except Exception as exc:   # openstacksdk raises its own tree and KeyError
                raise exception.ConfigurationError(
                    reason="[openstack] cloud %s: %s" % (opts.cloud, exc)) from exc
            self._region = cloud.region_name or None
            self._interface = cloud.interface or opts.interface
            return cloud.get_session()
        missing = [n for n in ("auth_url", "username", "password", "project_name")
                   if not getattr(opts, n)]
        if missing:
            raise exception.ConfigurationError(
                reason="[openstack] set cloud, or %s" % ", ".join(missing))
        self._region, self._interface = opts.region_name, opts.interface
        auth = v3.Password(auth_url=opts.auth_url, username=opts.username,
                           password=opts.password, project_name=opts.project_name,
                           user_domain_name=opts.user_domain_name,
                           project_domain_name=opts.project_domain_name)
        return ks_session.Session(auth=auth, verify=opts.cacert or True, timeout=_TIMEOUT)

    def _version(self):
        wanted = self._opts.compute_api_version
        if wanted == "auto":
            probe = nova_client.Client("2.1", session=self._session,
                                       region_name=self._region,
                                       endpoint_type=self._interface)
            version = api_versions.discover_version(probe, api_versions.APIVersion("2.latest"))
        else:
            try:
                version = api_versions.APIVersion(wanted)
            except nova_exc.UnsupportedVersion as exc:
                raise exception.ConfigurationError(
                    reason="[openstack] compute_api_version %s: %s" % (wanted, exc)) from exc
        if version < _MIN_VERSION:
            raise exception.ConfigurationError(
                reason="[openstack] compute_api_version %s: at least %s is needed"
                % (version.get_string(), _MIN_VERSION.get_string()))
        return version

    def _validate_maps(self):
        """Fail fast, at start, on a flavor, image or network the cloud does not have."""
        opts = self._opts
        with self._translate_errors("listing flavors"):
            self._flavors = {f.id: f for f in self._nova.flavors.list(is_public=None)}
        missing = []
        for local, remote in sorted(opts.flavor_map.items()):
            found = self._remote_flavor(remote)
            if found is None:
                missing.append("%s -> %s" % (local, remote))
            else:
                self._flavor_ids[local] = found
        if missing:
            raise exception.ConfigurationError(
                reason="[openstack] flavor_map: %s: no such remote flavor"
                % "; ".join(missing))
        missing = []
        for key, remote in sorted(opts.image_map.items()):
            image_id = self._find_image(remote)
            if image_id is None:
                missing.append("%s -> %s" % (key, remote))
            else:
                self._image_ids[key] = image_id
        if missing:
            raise exception.ConfigurationError(
                reason="[openstack] image_map: %s: no such remote image" % "; ".join(missing))
        nets = [n.strip() for n in opts.networks if n.strip()]
        if not nets or nets in (["auto"], ["none"]):
            self._nics = nets[0] if nets else "auto"
            return
        nics = []
        for net in nets:
            if _is_uuid(net):
                nics.append({"net-id": net})
                continue
            try:
                with self._translate_errors("finding network %s" % net):
                    nics.append({"net-id": self._nova.neutron.find_network(net).id})
            except exception.BackendError as exc:
                if isinstance(exc, exception.BackendUnavailable):
                    raise
                raise exception.ConfigurationError(
                    reason="[openstack] networks: %s: no such remote network" % net) from exc
        self._nics = nics

    def _remote_flavor(self, name_or_id):
        if name_or_id in self._flavors:
            return name_or_id
        named = sorted(f.id for f in self._flavors.values() if f.name == name_or_id)
        return named[0] if named else None

    def _find_image(self, name_or_id):
        try:
            with self._translate_errors("finding image %s" % name_or_id):
                return self._nova.glance.find_image(name_or_id).id
        except exception.InstanceNotFound:
            return None
        except exception.BackendError as exc:
            if isinstance(exc, (exception.BackendUnavailable, exception.BackendAuthError)):
                raise
            return None     # not found, or several of that name

    # -- instance operations ----------------------------------------------

    def spawn(self, request):
        self._check_started("spawn")
        uuid = request.instance_uuid
        flavor_id = self._flavor_id(request.flavor)
        image_id = self._image_id(request.image)
        found = self._settle_existing(request)
        if found is not None:
            return found
        since = self._uncertain.get(uuid)
        if since is not None and self.clock() - since < self._opts.lost_create_grace:
            raise exception.BackendUnavailable(
                backend=self.name, reason="an earlier create of instance %s has an unknown "
                "outcome and no server is visible yet; not creating another for %d s"
                % (uuid, self._opts.lost_create_grace - (self.clock() - since)))
        self._check_budget(flavor_id, uuid)
        kwargs = {"meta": {UUID_KEY: uuid, GENERATION_KEY: str(request.generation),
                           OWNER_KEY: self.owner},
                  "nics": self._nics}
        if self._opts.key_name:
            kwargs["key_name"] = self._opts.key_name
        if request.user_data:
            kwargs["userdata"] = request.user_data
        try:
            with self._translate_errors("creating server", create=True):
                server = self._nova.servers.create(self._server_name(uuid), image_id,
                                                   flavor_id, **kwargs)
        except exception.BackendError as exc:
            if not exc.retryable:
                raise
            # Lost response, timeout or 5xx: nova may have created it anyway.
            LOG.warning("[instance: %(uuid)s] create failed without a definite answer "
                        "(%(err)s); looking for the server", {"uuid": uuid, "err": exc})
            with self._lock:
                self._uncertain[uuid] = self.clock()
            found = self._settle_existing(request)
            if found is not None:
                return found
            raise
        flavor = self._flavors[flavor_id]
        with self._lock:
            self._uncertain.pop(uuid, None)
            self._deleted.discard(server.id)
            self._created[server.id] = self.clock()
            # Counted against the budget at once; the next list fills it in.
            self._servers.setdefault(server.id, {
                "id": server.id, "name": self._server_name(uuid), "status": "BUILD",
                "metadata": kwargs["meta"], "addresses": {},
                "flavor": {"vcpus": flavor.vcpus, "ram": flavor.ram,
                           "original_name": flavor.name}})
        # The create answer is the server's id only: report it as building.
        info = InstanceInfo(backend_id=server.id, state=InstanceState.PENDING,
                            instance_uuid=uuid)
        LOG.info("[instance: %(uuid)s] created server %(id)s (flavor %(flavor)s, image "
                 "%(image)s)", {"uuid": uuid, "id": server.id, "flavor": flavor_id,
                                "image": image_id})
        return info

    def _settle_existing(self, request):
        """The server this build already has, after replacing older generations."""
        uuid = request.instance_uuid
        servers = self._by_uuid(uuid)
        newer = [s for s in servers if _generation(s) > request.generation]
        if newer:
            raise exception.BackendError(
                backend=self.name, reason="instance %s already has generation %d remotely, "
                "newer than this build's %d" % (uuid, max(map(_generation, newer)),
                                                 request.generation))
        stale = [s for s in servers if _generation(s) < request.generation]
        same = sorted((s for s in servers if _generation(s) == request.generation),
                      key=_age)
        for server in stale + same[1:]:
            why = "older generation" if server in stale else "duplicate"
            LOG.warning("[instance: %(uuid)s] deleting %(why)s server %(id)s",
                        {"uuid": uuid, "why": why, "id": server["id"]})
            self._delete_server(server["id"], uuid)
        if not same:
            return None
        with self._lock:
            self._uncertain.pop(uuid, None)
        LOG.info("[instance: %(uuid)s] found server %(id)s already created for this "
                 "build", {"uuid": uuid, "id": same[0]["id"]})
        return self._to_info(same[0], uuid)

    def destroy(self, ref):
        self._check_started("destroy")
        if ref.backend_id:
            ids = [ref.backend_id]
        else:
            ids = [s["id"] for s in self._by_uuid(ref.instance_uuid)]
        gone = [i for i in ids if not self._delete_server(i, ref.instance_uuid)]
        if not ids or len(gone) == len(ids):
            LOG.warning("[instance: %s] destroy: no server for it; already gone",
                        ref.instance_uuid)
        with self._lock:
            self._quota_hit = None
            self._uncertain.pop(ref.instance_uuid, None)

    def _delete_server(self, server_id, instance_uuid):
        """Delete one server; False when it was already gone."""
        try:
            with self._translate_errors("deleting server", instance_uuid=instance_uuid):
                self._retry_conflicts(lambda: self._nova.servers.delete(server_id))
        except exception.InstanceNotFound:
            with self._lock:
                self._servers.pop(server_id, None)
                self._created.pop(server_id, None)
            return False
        LOG.info("[instance: %(uuid)s] deleting server %(id)s",
                 {"uuid": instance_uuid, "id": server_id})
        return True

    def reboot(self, ref, kind):
        self._check_started("reboot")
        kind = self._reboot_kind(ref, kind)
        server = self._current(ref)
        if kind is RebootKind.SOFT and server["status"] != "ACTIVE":
            raise self._refused(server, ref, "soft reboot")
        nova_kind = "SOFT" if kind is RebootKind.SOFT else "HARD"
        self._action(ref, server, "reboot", lambda: self._nova.servers.reboot(
            server["id"], reboot_type=nova_kind))
        return self._to_info(server, ref.instance_uuid, InstanceState.REBOOTING)

    def power_off(self, ref):
        self._check_started("power_off")
        return self._toggle(ref, "stop", ("SHUTOFF",), ("ACTIVE", "ERROR"),
                            InstanceState.STOPPING, self._nova.servers.stop)

    def power_on(self, ref):
        self._check_started("power_on")
        return self._toggle(ref, "start", ("ACTIVE",), ("SHUTOFF",),
                            InstanceState.STARTING, self._nova.servers.start)

    def pause(self, ref):
        self._check_started("pause")
        return self._toggle(ref, "pause", ("PAUSED",), ("ACTIVE",),
                            InstanceState.STOPPING, self._nova.servers.pause)

    def unpause(self, ref):
        self._check_started("unpause")
        return self._toggle(ref, "unpause", ("ACTIVE",), ("PAUSED",),
                            InstanceState.STARTING, self._nova.servers.unpause)

    def suspend(self, ref):
        self._check_started("suspend")
        return self._toggle(ref, "suspend", ("SUSPENDED",), ("ACTIVE",),
                            InstanceState.STOPPING, self._nova.servers.suspend)

    def resume(self, ref):
        self._check_started("resume")
        return self._toggle(ref, "resume", ("ACTIVE",), ("SUSPENDED",),
                            InstanceState.STARTING, self._nova.servers.resume)

    def resize(self, ref, flavor):
        self._check_started("resize")
        flavor_id = self._flavor_id(flavor)
        server = self._current(ref)
        target = self._flavors[flavor_id].name
        if (server.get("flavor") or {}).get("original_name") == target:
            return self._to_info(server, ref.instance_uuid)
        self._check_budget(flavor_id, ref.instance_uuid, new_instance=False, server=server)
        self._action(ref, server, "resize", lambda: self._nova.servers.resize(
            server["id"], flavor_id))
        with self._lock:
            self._resizing[server["id"]] = {"target": target}
        LOG.info("[instance: %(uuid)s] resizing %(id)s to %(flavor)s",
                 {"uuid": ref.instance_uuid, "id": server["id"], "flavor": flavor.name})
        server = self._await_resize_host(ref, server, target) or server
        return self._to_info(server, ref.instance_uuid, InstanceState.PENDING)

    def _await_resize_host(self, ref, server, target):
        """Wait until Nova has a host for the resize; raise if it gave up.

        Nova answers a resize with 202 before scheduling it: a NoValidHost
        comes later, as the server settling back to its old flavor (or to
        ERROR) with a failed instance action. Waiting for the scheduler here
        (seconds) lets that be raised as the contract's InsufficientCapacity,
        so the manager rolls back with the old size and sends the fault up,
        instead of seeing the server settle ACTIVE and calling it resized.
        Past ``_RESIZE_SCHEDULE_WAIT``, or if the cloud stops answering
        (Nova did accept the resize), the outcome is left to ``poll``.
        """
        deadline = self.clock() + _RESIZE_SCHEDULE_WAIT
        delay = 0.2
        while True:
            try:
                with self._translate_errors("getting server", ref):
                    server = self._nova.servers.get(server["id"]).to_dict()
            except exception.BackendUnavailable as exc:
                LOG.warning("[instance: %(uuid)s] cannot watch the resize of %(id)s "
                            "(%(err)s); poll will see how it ends",
                            {"uuid": ref.instance_uuid, "id": server["id"],
                             "err": exc.message})
                return server
            with self._lock:
                self._servers[server["id"]] = server
            outcome = self._resize_outcome(server, target)
            if outcome == "accepted":
                return server
            if outcome == "failed":
                with self._lock:
                    self._resizing.pop(server["id"], None)
                fault = self._resize_fault(server)
                reason = "resize of server %s to %s failed remotely: %s; it is %s with " \
                    "flavor %s" % (server["id"], target, fault, server["status"],
                                   (server.get("flavor") or {}).get("original_name"))
                if "no valid host" in fault.lower():
                    raise exception.InsufficientCapacity(backend=self.name, reason=reason)
                raise exception.BackendError(backend=self.name, reason=reason)
            if self.clock() >= deadline:
                LOG.warning("[instance: %(uuid)s] no host for the resize of %(id)s after "
                            "%(s)d s; poll will see how it ends",
                            {"uuid": ref.instance_uuid, "id": server["id"],
                             "s": _RESIZE_SCHEDULE_WAIT})
                return server
            self.sleep(delay)
            delay = min(delay * 2, 2.0)

    @staticmethod
    def _resize_outcome(server, target):
        """None while Nova schedules a resize, else ``accepted`` or ``failed``."""
        task = server.get("OS-EXT-STS:task_state")
        status = server.get("status")
        if status == "ERROR":
            return "failed"
        if status == "VERIFY_RESIZE" or task in _RESIZE_STEPS:
            return "accepted"
        if task:        # resize_prep: the conductor is still looking for a host
            return None
        if (server.get("flavor") or {}).get("original_name") == target:
            return "accepted"
        return "failed"     # settled again with its old flavor: Nova gave up

    def _resize_fault(self, server):
        """Why Nova gave up on a resize: the server's fault, else the failed
        event of its last resize action (two requests, a few more at most).

        The event is finished after the server is saved back to its old
        state, so it is read again a few times (up to 3 s) until it has
        its result."""
        fault = (server.get("fault") or {}).get("message")
        if fault:
            return str(fault)
        detail = {}
        for attempt in range(5):
            if attempt:
                self.sleep(0.1 * 2 ** attempt)
            try:
                with self._translate_errors("reading the actions of server %s" % server["id"]):
                    actions = [a.to_dict()
                               for a in self._nova.instance_action.list(server["id"])]
                    resize = next((a for a in actions
                                   if a.get("action") in ("resize", "migrate")), None)
                    if resize is None:
                        return "no resize action recorded"
                    detail = self._nova.instance_action.get(
                        server["id"], resize["request_id"]).to_dict()
            except exception.BackendError as exc:
                return "its instance actions could not be read: %s" % exc.message
            for event in detail.get("events") or []:
                if event.get("result") == "Error":
                    return "%s: %s" % (event.get("event"), event.get("details") or
                                       detail.get("message") or "Error")
        return str(detail.get("message") or "Error")

    def snapshot(self, ref, name):
        self._check_started("snapshot")
        server = self._current(ref)
        image_name = "%s-%s" % ((name or "snapshot")[:200], ref.instance_uuid[:8])
        image_id = self._action(ref, server, "snapshot", lambda: self._nova.servers.create_image(
            server["id"], image_name, metadata={UUID_KEY: ref.instance_uuid}))
        with self._lock:
            self._images[str(image_id)] = self.clock()
        LOG.info("[instance: %(uuid)s] snapshot %(image)s (%(name)s) of %(id)s started",
                 {"uuid": ref.instance_uuid, "image": image_id, "name": image_name,
                  "id": server["id"]})
        return str(image_id)

    def image_status(self, image_id):
        self._check_started("image_status")
        try:
            with self._translate_errors("getting image %s" % image_id):
                resp = self._session.get(
                    "/v2/images/%s" % image_id, endpoint_filter={
                        "service_type": "image", "interface": self._interface,
                        "region_name": self._region})
            status = resp.json().get("status")
        except exception.InstanceNotFound:
            created = self._images.get(image_id)
            fresh = created is not None and \
                self.clock() - created < self._opts.lost_create_grace
            return "pending" if fresh else "failed"
        if status == "active":
            return "available"
        return "pending" if status in ("queued", "saving", "uploading", "importing") \
            else "failed"

    def get_console_output(self, ref, tail_length=None):
        self._check_started("get_console_output")
        server = self._current(ref)
        if tail_length is not None and tail_length <= 0:
            return ""
        with self._translate_errors("getting console output", ref):
            text = self._nova.servers.get_console_output(server["id"], length=tail_length)
        return str(text or "")

    # -- queries -----------------------------------------------------------

    def get_info(self, ref):
        self._check_started("get_info")
        server = self._lookup(ref)
        if server is None or server["status"] in _GONE:
            raise exception.InstanceNotFound(instance_id=ref.instance_uuid, backend=self.name)
        return self._to_info(server, ref.instance_uuid)

    def poll(self, refs):
        self._check_started("poll")
        refs = list(refs)
        if not refs:
            return {}
        with self._lock:
            unknown = any(r.backend_id not in self._servers and
                          r.backend_id not in self._deleted if r.backend_id
                          else not self._cached_by_uuid(r.instance_uuid) for r in refs)
        full = unknown or self._full_at is None or \
            self.clock() - self._full_at >= _FULL_SYNC
        self._sync(full=full)
        result = {}
        confirm, failed = [], []
        with self._lock:
            for ref in refs:
                server = self._servers.get(ref.backend_id) if ref.backend_id else \
                    self._pick(self._cached_by_uuid(ref.instance_uuid))
                if server is None:
                    result[ref.instance_uuid] = InstanceInfo(
                        backend_id=ref.backend_id, state=InstanceState.DELETED,
                        instance_uuid=ref.instance_uuid)
                    continue
                resize = self._resizing.get(server["id"])
                if resize is not None:
                    verdict = self._resize_settled(server, resize)
                    if verdict == "confirm":
                        confirm.append((ref, server))
                    elif verdict == "failed":
                        failed.append((ref, server, resize))
                        continue
                result[ref.instance_uuid] = self._to_info(server, ref.instance_uuid)
        for ref, server in confirm:
            self._confirm_resize(ref, server)
        for ref, server, resize in failed:
            result[ref.instance_uuid] = self._resize_failed(ref, server, resize)
        return result

    def _resize_settled(self, server, resize):
        """What a poll makes of a server we resized (lock held): ``confirm``,
        ``failed`` (it settled again with its old flavor), or None."""
        status = server["status"]
        if status == "VERIFY_RESIZE":
            return None if resize.get("confirmed") else "confirm"
        if status == "ERROR":
            del self._resizing[server["id"]]    # reported as ERROR with its fault
            return None
        if server.get("OS-EXT-STS:task_state") or status in ("RESIZE", "REVERT_RESIZE"):
            return None
        del self._resizing[server["id"]]
        if (server.get("flavor") or {}).get("original_name") == resize["target"]:
            return None
        return "failed"

    def _resize_failed(self, ref, server, resize):
        """A resize Nova gave up on after accepting it: the server is usable
        with its old flavor, but the resize must not look done. ERROR with a
        fault is the one failure a settled poll result can carry; it is
        reported once, the next poll shows the server as it is."""
        fault = resize.get("fault") or self._resize_fault(server)
        reason = "resize to %s failed: %s; the server is %s with its old flavor %s" % (
            resize["target"], fault, server["status"],
            (server.get("flavor") or {}).get("original_name"))
        LOG.warning("[instance: %(uuid)s] %(reason)s", {"uuid": ref.instance_uuid,
                                                        "reason": reason})
        info = self._to_info(server, ref.instance_uuid, InstanceState.ERROR)
        info.fault = reason
        return info

    def list_instances(self):
        self._check_started("list_instances")
        self._sync(full=True)
        with self._lock:
            servers = list(self._servers.values())
        return [self._to_info(s, _uuid_of(s)) for s in servers]

    def get_capacity(self, flavors):
        self._check_started("get_capacity")
        with self._translate_errors("getting limits"):
            absolute = {a.name: a.value for a in self._nova.limits.get().absolute}

        def room(limit, used):
            top = absolute.get(limit, -1)
            if top is None or top < 0:
                return None, None           # unlimited
            return top, max(top - (absolute.get(used) or 0), 0)

        inst_total, inst_free = room("maxTotalInstances", "totalInstancesUsed")
        core_total, core_free = room("maxTotalCores", "totalCoresUsed")
        ram_total, ram_free = room("maxTotalRAMSize", "totalRAMUsed")
        opts = self._opts
        with self._lock:
            usage = self._usage()
            held = self._quota_hit is not None and \
                self.clock() - self._quota_hit < _QUOTA_HOLD
        if opts.max_instances:
            left = max(opts.max_instances - usage["instances"], 0)
            inst_free = left if inst_free is None else min(inst_free, left)
        if opts.max_vcpus:
            left = max(opts.max_vcpus - usage["vcpus"], 0)
            core_total = opts.max_vcpus if core_total is None else \
                min(core_total, opts.max_vcpus)
            core_free = left if core_free is None else min(core_free, left)
        max_units = {}
        disk_free_mb = disk_total_mb = 0
        for flavor in flavors:
            remote = self._flavors.get(self._flavor_id(flavor, strict=False) or "")
            if remote is None or held:
                max_units[flavor.name] = 0
                continue
            limits = [inst_free]
            if core_free is not None:
                limits.append(core_free // max(remote.vcpus, 1))
            if ram_free is not None:
                limits.append(ram_free // max(remote.ram, 1))
            if opts.max_cost_per_hour:
                price = self._prices.get(remote.name)
                if price is None:
                    limits.append(0)
                elif price > 0:
                    limits.append(max(int((opts.max_cost_per_hour - usage["cost"]) / price
                                          + 1e-9), 0))
            units = min((u for u in limits if u is not None), default=None)
            if units is None:       # nothing limits it: report a generous figure
                units = 1000
            max_units[flavor.name] = units
            disk_free_mb = max(disk_free_mb, units * flavor.disk_mb)
            per = inst_total if inst_total is not None else units + usage["instances"]
            disk_total_mb = max(disk_total_mb, per * flavor.disk_mb)
        if ram_total is None:
            biggest = max((self._flavors[f].ram for f in self._flavor_ids.values()
                           if f in self._flavors), default=0)
            ram_total = ram_free = biggest * max(max_units.values(), default=0)
        if held:
            ram_free, disk_free_mb = 0, 0
        return Capacity(ram_total_mb=int(ram_total), ram_free_mb=int(min(ram_free, ram_total)),
                        disk_total_mb=int(max(disk_total_mb, disk_free_mb)),
                        disk_free_mb=int(disk_free_mb), max_units=max_units,
                        vcpus_total=int(core_total or 0),
                        vcpus_used=int((core_total or 0) - (core_free or 0)))

    # -- sync --------------------------------------------------------------

    def _list(self, search):
        """Every server of a paged ``GET /servers/detail``, following ``servers_links``.

        Not novaclient's ``servers.list(limit=-1)``: that asks for one more
        page until it gets an empty one, doubling the requests of a poll.
        """
        url = "/servers/detail?" + urllib.parse.urlencode(sorted(search.items()))
        servers = []
        with self._translate_errors("listing servers"):
            while url:
                _resp, body = self._nova.client.get(url)
                servers.extend(body.get("servers", []))
                url = next((link["href"] for link in body.get("servers_links", [])
                            if link.get("rel") == "next"), None)
                if url:
                    # Relative to the compute endpoint, as novaclient wants it.
                    url = url[url.index("/servers/detail"):]
        return servers

    def _sync(self, full=False):
        """One paged server list into the cache (changes only unless ``full``)."""
        search = {"name": "^" + re.escape(self.prefix)}
        with self._lock:
            mark = self._mark
        if not full and mark is not None:
            since = mark - datetime.timedelta(seconds=_SKEW_MARGIN)
            search["changes-since"] = since.strftime("%Y-%m-%dT%H:%M:%SZ")
        servers = self._list(search)
        with self._lock:
            # A deleted server has lost its metadata: it is ours if we knew it.
            servers = [s for s in servers if self._ours(s) or (
                s.get("status") in _GONE and s["id"] in self._servers)]
            if full:
                # The listing replaces the cache, except for servers we have
                # just created: nova's list can miss one while it moves from
                # build request to instance, and that is not a deletion.
                now, grace = self.clock(), self._opts.lost_create_grace
                self._created = {i: t for i, t in self._created.items() if now - t < grace}
                self._servers = {i: s for i, s in self._servers.items()
                                 if i in self._created}
                self._full_at = now
            for server in servers:
                if server.get("status") in _GONE:
                    self._servers.pop(server["id"], None)
                    self._deleted.add(server["id"])
                    self._resizing.pop(server["id"], None)
                else:
                    self._servers[server["id"]] = server
                updated = _parse_time(server.get("updated"))
                if updated is not None and (self._mark is None or updated > self._mark):
                    self._mark = updated
            if len(self._deleted) > 10000:
                self._deleted = set(list(self._deleted)[-5000:])

    def _by_uuid(self, instance_uuid):
        """Our live servers named for ``instance_uuid`` (one request)."""
        name = "^%s$" % re.escape(self._server_name(instance_uuid))
        servers = [s for s in self._list({"name": name}) if self._ours(s)
                   and _uuid_of(s) == instance_uuid and s.get("status") not in _GONE]
        with self._lock:
            for server in servers:
                self._servers[server["id"]] = server
        return servers

    def _cached_by_uuid(self, instance_uuid):
        return [s for s in self._servers.values() if _uuid_of(s) == instance_uuid]

    @staticmethod
    def _pick(servers):
        """The newest generation, oldest server of it."""
        if not servers:
            return None
        return min(servers, key=lambda s: (-_generation(s),) + _age(s))

    def _lookup(self, ref):
        """The server ``ref`` names (by id, else by name), or None when gone."""
        if not ref.backend_id:
            return self._pick(self._by_uuid(ref.instance_uuid))
        try:
            with self._translate_errors("getting server", ref):
                server = self._nova.servers.get(ref.backend_id).to_dict()
        except exception.InstanceNotFound:
            with self._lock:
                self._servers.pop(ref.backend_id, None)
            return None
        with self._lock:
            if server.get("status") in _GONE:
                self._servers.pop(server["id"], None)
            elif self._ours(server):
                self._servers[server["id"]] = server
        return server

    def _current(self, ref):
        server = self._lookup(ref)
        if server is None or server["status"] in _GONE:
            raise exception.InstanceNotFound(instance_id=ref.instance_uuid, backend=self.name)
        return server

    def _ours(self, server):
        return (server.get("metadata") or {}).get(OWNER_KEY) == self.owner and \
            str(server.get("name", "")).startswith(self.prefix)

    # -- actions -------------------------------------------------------------

    def _toggle(self, ref, what, done, allowed, state, call):
        server = self._current(ref)
        if server["status"] in done and not server.get("OS-EXT-STS:task_state"):
            return self._to_info(server, ref.instance_uuid)
        if server["status"] not in allowed:
            raise self._refused(server, ref, what)
        self._action(ref, server, what, lambda: call(server["id"]))
        LOG.info("[instance: %(uuid)s] %(what)s %(id)s",
                 {"uuid": ref.instance_uuid, "what": what, "id": server["id"]})
        return self._to_info(server, ref.instance_uuid, state)

    def _action(self, ref, server, what, call):
        with self._translate_errors(what, ref):
            return self._retry_conflicts(call)

    def _retry_conflicts(self, call):
        """``call()``, retried on a 409 naming a task state (transient)."""
        delay = 0.5
        for attempt in range(self._opts.conflict_retries + 1):
            try:
                return call()
            except nova_exc.Conflict as exc:
                transient = "task_state" in str(exc) or "task state" in str(exc)
                if not transient or attempt == self._opts.conflict_retries:
                    raise
                LOG.debug("409 from the cloud (%s); retrying in %.1f s", exc, delay)
                self.sleep(delay)
                delay *= 2

    def _confirm_resize(self, ref, server):
        try:
            with self._translate_errors("confirming resize", ref):
                self._nova.servers.confirm_resize(server["id"])
            LOG.info("[instance: %(uuid)s] confirmed the resize of %(id)s",
                     {"uuid": ref.instance_uuid, "id": server["id"]})
        except exception.BackendError as exc:
            if exc.retryable:
                return              # next poll tries again
            LOG.warning("[instance: %(uuid)s] confirming the resize of %(id)s failed "
                        "(%(err)s); reverting", {"uuid": ref.instance_uuid,
                                                  "id": server["id"], "err": exc})
            with contextlib.suppress(exception.BackendError), \
                    self._translate_errors("reverting resize", ref):
                self._nova.servers.revert_resize(server["id"])
            # Back to the old flavor: poll reports the resize as failed.
            with self._lock:
                if server["id"] in self._resizing:
                    self._resizing[server["id"]]["fault"] = "confirm refused (%s), " \
                        "reverted" % exc.message
            return
        with self._lock:
            if server["id"] in self._resizing:
                # Settles ACTIVE with the new flavor; not confirmed twice.
                self._resizing[server["id"]]["confirmed"] = True

    def _refused(self, server, ref, what):
        state = self._state(server)
        return exception.BackendError(
            backend=self.name, retryable=state.is_transitional,
            reason="cannot %s instance %s while its server is %s" % (
                what, ref.instance_uuid, server["status"]))

    # -- maps and budget -------------------------------------------------------

    def _check_started(self, op):
        if self._nova is None:
            raise exception.BackendError(backend=self.name,
                                         reason="%s called before start()" % op)

    def _server_name(self, instance_uuid):
        return self.prefix + instance_uuid

    def _flavor_id(self, flavor, strict=True):
        remote = self._flavor_ids.get(flavor.name)
        if remote is None:
            remote = self._remote_flavor(self._opts.flavor_map.get(flavor.name, flavor.name))
        if remote is None and strict:
            raise exception.BackendError(
                backend=self.name, reason="flavor %s has no remote flavor: map it in "
                "[openstack] flavor_map" % flavor.name)
        return remote

    def _image_id(self, image):
        image = image or {}
        for key in (image.get("id"), image.get("name")):
            if key and key in self._image_ids:
                return self._image_ids[key]
        for key in (image.get("id"), image.get("name")):
            if not key:
                continue
            found = self._find_image(key)
            if found is not None:
                with self._lock:
                    self._image_ids[key] = found
                return found
        raise exception.BackendError(
            backend=self.name, reason="image %s (%s) has no remote image: map it in "
            "[openstack] image_map" % (image.get("id"), image.get("name")))

    def _usage(self):
        """Our servers as counted against the budget (lock held)."""
        usage = {"instances": 0, "vcpus": 0, "cost": 0.0}
        for server in self._servers.values():
            flavor = server.get("flavor") or {}
            usage["instances"] += 1
            usage["vcpus"] += int(flavor.get("vcpus") or 0)
            usage["cost"] += self._prices.get(flavor.get("original_name"), 0.0)
        return usage

    def _check_budget(self, flavor_id, instance_uuid, new_instance=True, server=None):
        opts = self._opts
        remote = self._flavors[flavor_id]
        with self._lock:
            usage = self._usage()
        if server is not None:      # a resize: the server's old size is freed
            old = server.get("flavor") or {}
            usage["vcpus"] -= int(old.get("vcpus") or 0)
            usage["cost"] -= self._prices.get(old.get("original_name"), 0.0)
        reason = None
        if new_instance and opts.max_instances and usage["instances"] >= opts.max_instances:
            reason = "budget: [openstack] max_instances %d reached" % opts.max_instances
        elif opts.max_vcpus and usage["vcpus"] + remote.vcpus > opts.max_vcpus:
            reason = "budget: [openstack] max_vcpus %d: %d in use, %s needs %d" % (
                opts.max_vcpus, usage["vcpus"], remote.name, remote.vcpus)
        elif opts.max_cost_per_hour:
            price = self._prices.get(remote.name)
            if price is None:
                reason = "spend cap: no price for %s in [openstack] prices" % remote.name
            elif usage["cost"] + price > opts.max_cost_per_hour + 1e-9:
                reason = "spend cap: [openstack] max_cost_per_hour %.4f reached" % (
                    opts.max_cost_per_hour)
        if reason:
            raise exception.InsufficientCapacity(
                backend=self.name, reason="%s (instance %s)" % (reason, instance_uuid))

    # -- error translation ---------------------------------------------------

    def _scrub(self, text):
        text = str(text)
        if self._opts.password:
            text = text.replace(self._opts.password, "***")
        return text

    @contextlib.contextmanager
    def _translate_errors(self, what, ref=None, instance_uuid=None, create=False):
        """Turn novaclient's and keystoneauth1's exceptions into ours, once."""
        uuid = instance_uuid or (ref.instance_uuid if ref else None)
        try:
            yield
        except exception.CellAgentError:
            raise
        except nova_exc.ClientException as exc:
            raise self._from_http(exc, getattr(exc, "code", 0) or 0, what, uuid,
                                  create) from exc
        except ks_exc.HttpError as exc:
            raise self._from_http(exc, exc.http_status or 0, what, uuid, create) from exc
        except ks_exc.Unauthorized as exc:
            raise exception.BackendAuthError(
                backend=self.name, reason="%s: %s" % (what, self._scrub(exc))) from exc
        except (ks_exc.ConnectionError, ks_exc.ConnectFailure, ks_exc.ConnectTimeout,
                ks_exc.RetriableConnectionFailure) as exc:
            raise exception.BackendUnavailable(
                backend=self.name, reason="%s: %s" % (what, self._scrub(exc))) from exc
        except (ks_exc.EndpointNotFound, ks_exc.CatalogException,
                ks_exc.MissingAuthPlugin, ks_exc.AuthPluginException,
                ks_exc.DiscoveryFailure) as exc:
            raise exception.ConfigurationError(
                reason="[openstack] %s: %s" % (what, self._scrub(exc))) from exc
        except ks_exc.ClientException as exc:
            raise exception.BackendError(
                backend=self.name, reason="%s: %s" % (what, self._scrub(exc))) from exc
        except nova_exc.UnsupportedVersion as exc:
            raise exception.ConfigurationError(
                reason="[openstack] compute_api_version: %s" % self._scrub(exc)) from exc

    def _from_http(self, exc, status, what, uuid, create):
        message = self._scrub(getattr(exc, "message", None) or exc)
        reason = "%s: HTTP %s: %s" % (what, status, message)
        if status == 404:
            return exception.InstanceNotFound(instance_id=uuid, backend=self.name)
        if status in (403, 413) and "quota" in message.lower():
            if create:
                with self._lock:
                    self._quota_hit = self.clock()
            return exception.InsufficientCapacity(backend=self.name, reason=reason)
        if status == 401:
            return exception.BackendAuthError(backend=self.name, reason=reason)
        if status == 409:
            return exception.BackendError(backend=self.name, retryable=True, reason=reason)
        if status == 429 or status >= 500 or status == 0:
            return exception.BackendUnavailable(backend=self.name, reason=reason)
        if status == 403:
            return exception.BackendAuthError(backend=self.name, reason=reason)
        return exception.BackendError(backend=self.name, reason=reason)

    # -- converters (last, as in libcloud) -----------------------------------

    def _state(self, server):
        status = server.get("status", "UNKNOWN")
        task = server.get("OS-EXT-STS:task_state")
        if status not in _GONE and status != "ERROR" and task in _TASK_STATES:
            return _TASK_STATES[task]
        return self.map_state(status)

    def _to_info(self, server, instance_uuid=None, state=None):
        state = state or self._state(server)
        fault = ""
        if state is InstanceState.ERROR:
            fault = (server.get("fault") or {}).get("message") or "remote server in ERROR"
        return InstanceInfo(
            backend_id=server["id"], state=state,
            addresses=self._to_addresses(server) if state is not InstanceState.DELETED
            else [],
            instance_uuid=instance_uuid or _uuid_of(server), fault=fault,
            launched_at=server.get("OS-SRV-USG:launched_at") or ""
            if state is InstanceState.RUNNING else "")

    @staticmethod
    def _to_addresses(server):
        addresses = []
        for network, entries in sorted((server.get("addresses") or {}).items()):
            for entry in entries or []:
                if not entry.get("addr"):
                    continue
                addresses.append(Address(
                    entry["addr"], int(entry.get("version") or 4),
                    "floating" if entry.get("OS-EXT-IPS:type") == "floating" else "fixed",
                    network, entry.get("OS-EXT-IPS-MAC:mac_addr", "")))
        return addresses


def _uuid_of(server):
    return str((server.get("metadata") or {}).get(UUID_KEY, ""))


def _age(server):
    """Sort key, oldest first: ``created`` has whole seconds only, so the
    launch time (microseconds, unset while building) breaks ties."""
    return (server.get("created") or "", server.get("OS-SRV-USG:launched_at") or "~",
            server["id"])


def _generation(server):
    value = str((server.get("metadata") or {}).get(GENERATION_KEY, ""))
    return int(value) if value.isdigit() else 1


def _parse_time(value):
    if not value:
        return None
    try:
        return datetime.datetime.strptime(str(value)[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None


def _is_uuid(value):
    try:
        uuidlib.UUID(value)
    except ValueError:
        return False
    return True


def _cell_name(conf):
    # NOTE: as in ec2.py, the one value read outside [openstack]: the
    # cell's name is the default owner. Absent in unit tests.
    try:
        return conf.cells.name
    except (AttributeError, cfg.Error):
        return None
