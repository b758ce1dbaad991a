"""Amazon EC2 backend (boto3): exactly-once batched launches, one describe per poll.

The contract is in ``base.py``; ``docs/ec2.md`` has the per-operation
mapping and the figures. What is particular to EC2:

**Exactly once.** A launch is keyed by ``BuildRequest.launch_token`` (the
instance uuid and its generation, stored by the manager before ``spawn``).
Builds are sent in batches (below); a batch's ``ClientToken`` is a SHA-256
of its launch spec and its members' launch tokens, so re-sending the same
batch is idempotent at EC2. A batch whose RunInstances failed with a
retryable error (throttled, 5xx, timeout, lost response) is remembered,
and a retried spawn of any member re-sends that batch *identically* (same
token, same parameters), which returns the original reservation if EC2 had
created it. Before a new batch is sent, one DescribeInstances looks for
instances already tagged for its members (an agent restarted after the
launch, when the in-memory batch is gone); found ones are returned, not
launched again. Older generations of a member are terminated there too
(rebuild).

**Tags at birth, and the batching trade-off.** Every instance is tagged in
RunInstances' ``TagSpecifications``, never after: ``cellagent:owner`` and
``cellagent:cell`` (whose instances these are), ``cellagent:batch`` (the
ClientToken) and the operator's ``[ec2] tags``. One TagSpecification
applies to every instance of a RunInstances, so per-instance tags cannot
differ inside a batch. Instead of tagging after launch (a crash between
RunInstances and CreateTags would leave unattributable instances, and one
CreateTags per instance would cost what batching saves) every instance of
a batch carries the batch's whole *launch map*: one tag per member,
``cellagent:instance:<uuid> = <generation>:<launch index>``. An instance is
the member whose launch index equals its ``AmiLaunchIndex``, which EC2
assigns 0..N-1 within a reservation. A lone launch also gets the readable
``cellagent:instance_uuid``, ``cellagent:generation`` and ``Name`` tags.
The price: EC2 allows 50 tags per resource, so a batch holds at most
``47 - len([ec2] tags)`` instances, and a batched instance shows its uuid
through the map, not a tag of its own.

**Polling.** ``poll`` is one paginated DescribeInstances whatever the
number of refs: filtered by instance id when every ref has one (at most 200
of them), else by the owner tag. An instance launched less than
``lost_instance_grace`` seconds ago and missing from the answer (EC2 is
eventually consistent) is PENDING; later it is DELETED.

**Key pairs, security groups, Elastic IPs.** A build's public key is
imported once per key as ``cellagent-<digest>`` (``[ec2] key_pair_mode``)
and never deleted; its Nova security group names map through ``[ec2]
security_group_map`` (an unmapped name other than ``default`` fails the
build); both are part of the launch spec. With ``[ec2] elastic_ip``,
``poll`` gives each running instance a tagged Elastic IP (reporting it
PENDING until EC2 shows the address), ``destroy`` releases it, and
``list_instances`` releases ours whose instance is gone.

**Throttling.** Every request, retries included, takes a token from one
AIMD bucket per account (or endpoint) and region shared by the process;
RequestLimitExceeded halves its rate, each success adds a twentieth back.
botocore's standard retry mode retries underneath. Errors are translated
once, in ``_translate_errors``.

**Capacity.** vCPU headroom is the quota (Service Quotas, else ``[ec2]
vcpu_quota``), capped by ``max_vcpus``, minus the vCPUs of our live
instances; each flavor's ``max_units`` is that over its type's vCPUs, also
capped by ``max_instances`` and ``max_cost_per_hour``, and 0 for a type in
the insufficient-capacity cache. RAM and disk are the same headroom at the
most generous flavor's MB per vCPU, so they never bind before the vCPUs.
Launches are checked against the same figures before RunInstances.

**Modules.** ``EC2Backend`` is here; ``ec2_support`` has the tag names,
error codes, rate limiter and launch spec and ``expired_leases`` (the
watchdog); ``ec2_addresses`` and ``ec2_keys`` have the Elastic IP and key
pair methods, as mixins ``EC2Backend`` inherits.
"""

import collections
import contextlib
import copy
import dataclasses
import hashlib
import logging
import re
import threading
import time

import boto3
import botocore.config
import botocore.exceptions
from oslo_config import cfg

from cellagent import exception
from cellagent.backends import base
from cellagent.backends.ec2_addresses import ElasticIPMixin
from cellagent.backends.ec2_keys import KeyPairMixin
from cellagent.backends.ec2_support import (AUTH_CODES, BATCH_TAG, CAPACITY_CODES, CELL_TAG,
                                            GENERATION_TAG, LEASE_TAG, MAX_FILTER_VALUES,
                                            NOT_FOUND_CODES, OWNER_TAG, RESERVED_TAG_PREFIXES,
                                            SLOT_PREFIX, STATE_CODES, THROTTLE_CODES,
                                            UNAVAILABLE_CODES, UUID_TAG, LaunchSpec,
                                            decode_console, error_code, shared_limiter)
from cellagent.objects import Address
from cellagent.objects import Capacity
from cellagent.objects import InstanceInfo
from cellagent.objects import InstanceState
from cellagent.objects import RebootKind

LOG = logging.getLogger(__name__)

_MAX_TAGS = 50              # EC2: tags per resource
_BASE_TAGS = 3              # owner, cell, batch
_LONE_TAGS = 3              # instance_uuid, generation, Name (a batch of one)
_PAGE_SIZE = 1000           # DescribeInstances MaxResults
_TYPES_PER_CALL = 100       # DescribeInstanceTypes InstanceTypes
_QUOTA_CODE = "L-1216C47A"  # Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances
_QUOTA_TTL = 3600.0
_LIVE = frozenset({"pending", "running", "stopping", "shutting-down"})   # count as running
_GONE = frozenset({"shutting-down", "terminated"})

_IMAGE_NOT_FOUND = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Malformed",
                              "InvalidAMIID.Unavailable"})
_IMAGE_STATUS = {"pending": "pending", "available": "available"}    # anything else: failed
_IMAGE_NAME_BAD = re.compile(r"[^A-Za-z0-9()\[\] ./'@_-]")


class _Item:
    """One build waiting in a batch; ``info`` or ``error`` is its outcome."""

    def __init__(self, request, spec):
        self.request = request
        self.spec = spec
        self.info = None
        self.error = None


class _Batch:
    """Builds with one LaunchSpec, sent as one RunInstances."""

    def __init__(self, spec, now):
        self.spec = spec
        self.items = []
        self.created = self.last_add = now
        self.sent = []          # the items launched, in launch index order
        self.params = None      # RunInstances parameters, kept to re-send identically
        self.resolved = False
        self.lock = threading.Lock()
        self.done = threading.Event()


@dataclasses.dataclass
class _Usage:
    instances: int = 0
    vcpus: int = 0
    cost: float = 0.0


class EC2Backend(ElasticIPMixin, KeyPairMixin, base.Backend):
    """Instances of this cell as EC2 instances; see the module docstring and ``[ec2]``.

    ``clock`` (monotonic seconds) times the grace and cache windows; tests
    may replace it. ``limiter`` is the shared RateLimiter once started.
    """

    name = "ec2"
    capabilities = {
        "supports_soft_reboot": True,
        "supports_pause": True,         # StopInstances (Hibernate with [ec2] hibernate)
        "supports_suspend": True,       # the same
        "supports_console_output": True,
        "supports_resize": True,
        "resize_needs_stop": True,      # ModifyInstanceAttribute needs a stopped instance
        "supports_snapshot": True,
    }
    STATE_MAP = {
        "pending": InstanceState.PENDING,
        "running": InstanceState.RUNNING,
        "stopping": InstanceState.STOPPING,
        "stopped": InstanceState.STOPPED,
        "shutting-down": InstanceState.DELETING,
        "terminated": InstanceState.DELETED,
    }

    #: Builds the boto3 session in ``start``; tests share botocore's model loader.
    session_factory = boto3.session.Session

    def __init__(self, conf):
        super().__init__(conf)
        self._opts = conf.ec2
        self.owner = self._opts.owner or _cell_name(conf) or "cellagent"
        self.cell = _cell_name(conf) or self.owner
        self.clock = time.monotonic
        self.limiter = None
        self._client = None
        self._quotas = None
        self._secrets = ()
        self._prices = {}
        self._max_batch = max(1, _MAX_TAGS - _BASE_TAGS - len(self._opts.tags))
        self._cond = threading.Condition()
        self._open = {}           # LaunchSpec -> _Batch still collecting builds
        self._inflight = {}       # launch token -> _Batch collecting or being sent
        self._unresolved = {}     # launch token -> _Batch whose RunInstances outcome is unknown
        self._launched = {}       # instance uuid -> (launch token, InstanceInfo at launch)
        self._launch_times = {}   # backend id -> clock() when we launched or found it
        self._known_uuids = set()  # instance uuids with an instance seen since start
        self._ledger = {}         # backend id -> (instance type, EC2 state) of our instances
        self._reserved = {}       # launch token -> instance type, budget held until launched
        self._ice = {}            # instance type -> clock() until which it is unavailable
        self._types = {}          # instance type -> vCPUs
        self._bad_types = set()   # instance types the region does not offer
        self._images = {}         # snapshot image id -> clock() when created
        self._quota = None
        self._quota_at = None
        self._lease_stop = threading.Event()
        self._lease_thread = None
        self._full_at = None      # clock() of the last describe of all our instances
        self._sending = collections.Counter()   # LaunchSpec -> batches being sent
        self._keys = set()        # EC2 key pairs imported (or found) since start
        self._key_imports = {}    # key pair name -> Event, while one thread imports it
        self._eips = {}           # instance uuid -> ec2_addresses._Address (our Elastic IP)
        self._eip_faults = {}     # instance uuid -> why EC2 refused it an Elastic IP

    # -- life cycle -------------------------------------------------------

    def start(self):
        opts = self._opts
        if bool(opts.access_key_id) != bool(opts.secret_access_key):
            raise exception.ConfigurationError(
                reason="[ec2] access_key_id and secret_access_key must be set together, "
                       "or neither (to use the boto3 credential chain)")
        self._secrets = tuple(s for s in (opts.access_key_id, opts.secret_access_key) if s)
        self._check_tags()
        self._prices = self._parse_prices()
        with self._translate_errors("connecting to EC2"):
            session = self.session_factory(
                profile_name=opts.profile or None, aws_access_key_id=opts.access_key_id or None,
                aws_secret_access_key=opts.secret_access_key or None, region_name=opts.region)
            config = botocore.config.Config(
                region_name=opts.region, connect_timeout=10, read_timeout=30,
                max_pool_connections=50,
                retries={"mode": "standard", "total_max_attempts": opts.max_attempts})
            client = session.client("ec2", endpoint_url=opts.endpoint_url or None,
                                    config=config)
            if not opts.endpoint_url:
                self._quotas = session.client(
                    "service-quotas", config=config.merge(botocore.config.Config(
                        retries={"mode": "standard", "total_max_attempts": 2})))
        self.limiter = shared_limiter(self._limiter_key(), opts.api_rate, opts.api_burst)
        # First, so that it also paces requests a test stub answers.
        client.meta.events.register_first("before-send.ec2", self._before_send)
        client.meta.events.register("response-received.ec2", self._response_received)
        self._client = client
        self._validate_maps()
        self._vcpu_quota()
        self._observe(self._describe([self._owner_filter()]), complete=True)
        self._start_lease()
        LOG.info("EC2 backend started in %(region)s as owner %(owner)s: %(n)d instances, "
                 "vCPU quota %(quota)d", {"region": opts.region, "owner": self.owner,
                                          "n": len(self._ledger), "quota": self._quota})

    def stop(self):
        self._lease_stop.set()
        if self._lease_thread is not None:
            self._lease_thread.join(10)
        client, self._client = self._client, None
        for c in (client, self._quotas):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
        self._quotas = None

    # -- lease ---------------------------------------------------------------

    def _start_lease(self):
        if self._opts.lease_seconds <= 0:
            return
        self._lease_thread = threading.Thread(target=self._lease_loop, name="ec2-lease",
                                              daemon=True)
        self._lease_thread.start()

    def _lease_loop(self):
        period = max(1.0, self._opts.lease_seconds / 3.0)
        while not self._lease_stop.is_set():
            try:
                self.renew_lease()
            except exception.BackendError as e:
                LOG.warning("Lease renewal failed, retrying in %(p).0f s: %(err)s",
                            {"p": period, "err": e.message})
            self._lease_stop.wait(period)

    def renew_lease(self, now=None):
        """Tag every instance we own with a lease ending ``lease_seconds``
        from now; one CreateTags per 500 instances. Returns how many."""
        until = int((time.time() if now is None else now) + self._opts.lease_seconds)
        with self._cond:
            ids = sorted(b for b, (_t, state) in self._ledger.items() if state not in _GONE)
        for start in range(0, len(ids), 500):
            with self._translate_errors("CreateTags"):
                self._client.create_tags(Resources=ids[start:start + 500],
                                         Tags=[{"Key": LEASE_TAG, "Value": str(until)}])
        return len(ids)

    # -- instance operations ----------------------------------------------

    def spawn(self, request):
        self._check_started("spawn")
        spec = self._launch_spec(request)
        token, uuid = request.launch_token, request.instance_uuid
        while True:
            with self._cond:
                known = self._launched.get(uuid)
                if known is not None and known[0] == token:
                    LOG.info("[instance: %(uuid)s] spawn repeated; already launched as "
                             "%(bid)s", {"uuid": uuid, "bid": known[1].backend_id})
                    return dataclasses.replace(known[1])
                busy = self._inflight.get(token)
                unresolved = self._unresolved.get(token)
                if busy is None and unresolved is None:
                    self._check_ice(spec.instance_type, uuid)
                    item = _Item(request, spec)
                    batch, leader = self._join(item)
                    break
            if busy is not None:
                # The same build is already in a batch (a retry racing the
                # first attempt): wait for that batch, then look again.
                busy.done.wait()
                continue
            return self._resend(unresolved, token)
        if leader:
            self._lead(batch)
        else:
            batch.done.wait()
        if item.error is not None:
            raise item.error
        if item.info is None:       # a bug in the batch code; never return None
            raise exception.BackendError(backend=self.name, reason="batched launch of %s "
                                         "ended without an outcome" % uuid)
        return item.info

    def destroy(self, ref):
        self._check_started("destroy")
        if self._opts.elastic_ip:
            self._release_addresses(self._addresses_of(ref.instance_uuid), "instance deleted")
        if ref.backend_id:
            ids = [ref.backend_id]
        else:
            ids = [i["InstanceId"] for i in self._by_uuid(ref.instance_uuid)
                   if i["State"]["Name"] not in _GONE]
        if not ids:
            LOG.warning("[instance: %s] destroy: no instance tagged for it; already gone",
                        ref.instance_uuid)
            self._forget(ref.instance_uuid)
            return
        try:
            with self._translate_errors("TerminateInstances", ref):
                resp = self._client.terminate_instances(InstanceIds=ids)
        except exception.InstanceNotFound:
            if self._in_grace(ref.backend_id):
                raise exception.BackendUnavailable(
                    backend=self.name, reason="instance %s of %s was just launched and is not "
                    "visible yet; delete again later" % (ref.backend_id, ref.instance_uuid))
            LOG.warning("[instance: %(uuid)s] destroy: %(bid)s does not exist; already gone",
                        {"uuid": ref.instance_uuid, "bid": ref.backend_id})
            self._forget(ref.instance_uuid)
            return
        self._observe_changes(resp.get("TerminatingInstances", []))
        self._forget(ref.instance_uuid)
        LOG.info("[instance: %(uuid)s] terminating %(ids)s",
                 {"uuid": ref.instance_uuid, "ids": ", ".join(ids)})

    def reboot(self, ref, kind):
        self._check_started("reboot")
        kind = self._reboot_kind(ref, kind)
        inst = self._current(ref)
        state = inst["State"]["Name"]
        if state == "running":
            # NOTE: HARD is RebootInstances too: EC2 power-cycles a guest that
            # has not shut down within four minutes. A stop-then-start would
            # move the instance to another host and lose its instance store,
            # which Nova's hard reboot does not do (docs/ec2.md).
            with self._translate_errors("RebootInstances", ref):
                self._client.reboot_instances(InstanceIds=[inst["InstanceId"]])
            LOG.info("[instance: %(uuid)s] rebooting %(bid)s (%(kind)s)",
                     {"uuid": ref.instance_uuid, "bid": inst["InstanceId"],
                      "kind": kind.value})
            return self._to_info(inst, ref.instance_uuid)
        if kind is RebootKind.HARD and state == "stopped":
            # As Nova's, a hard reboot revives a stopped instance.
            self._start_instance(inst, ref)
            return self._to_info(inst, ref.instance_uuid, InstanceState.REBOOTING)
        raise self._refused(inst, ref, "reboot")

    def power_off(self, ref):
        self._check_started("power_off")
        return self._stop(ref, "power off", hibernate=False)

    def power_on(self, ref):
        self._check_started("power_on")
        return self._start(ref, "power on")

    def pause(self, ref):
        self._check_started("pause")
        return self._stop(ref, "pause", hibernate=self._opts.hibernate)

    def unpause(self, ref):
        self._check_started("unpause")
        return self._start(ref, "unpause")

    def suspend(self, ref):
        self._check_started("suspend")
        return self._stop(ref, "suspend", hibernate=self._opts.hibernate)

    def resume(self, ref):
        self._check_started("resume")
        return self._start(ref, "resume")

    def resize(self, ref, flavor):
        self._check_started("resize")
        itype = self._instance_type(flavor)
        self._check_ice(itype, ref.instance_uuid)
        inst = self._current(ref)
        if inst["InstanceType"] == itype:
            return self._to_info(inst, ref.instance_uuid)
        if inst["State"]["Name"] != "stopped":
            raise self._refused(inst, ref, "resize")
        self._check_budget(itype, ref.instance_uuid, new_instance=False)
        with self._translate_errors("ModifyInstanceAttribute", ref, instance_type=itype):
            self._client.modify_instance_attribute(InstanceId=inst["InstanceId"],
                                                   InstanceType={"Value": itype})
        LOG.info("[instance: %(uuid)s] resized %(bid)s from %(old)s to %(new)s",
                 {"uuid": ref.instance_uuid, "bid": inst["InstanceId"],
                  "old": inst["InstanceType"], "new": itype})
        inst = dict(inst, InstanceType=itype)
        self._observe([inst])
        return self._to_info(inst, ref.instance_uuid)

    def snapshot(self, ref, name):
        self._check_started("snapshot")
        inst = self._current(ref)
        clean = _IMAGE_NAME_BAD.sub("_", name or "").strip()[:110] or "snapshot"
        image_name = "%s-%s" % (clean, ref.instance_uuid[:8])
        tags = self._tags({UUID_TAG: ref.instance_uuid})
        with self._translate_errors("CreateImage", ref):
            try:
                image_id = self._client.create_image(
                    InstanceId=inst["InstanceId"], Name=image_name, NoReboot=True,
                    Description="cellagent snapshot of instance %s" % ref.instance_uuid,
                    # NOTE: image tags only; a "snapshot" TagSpecification
                    # is valid on EC2 but moto 5.2.5 raises NotImplementedError.
                    TagSpecifications=[{"ResourceType": "image", "Tags": tags}],
                )["ImageId"]
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) != "InvalidAMIName.Duplicate":
                    raise
                image_id = self._own_image(image_name, ref)
        with self._cond:
            self._images[image_id] = self.clock()
        LOG.info("[instance: %(uuid)s] snapshot %(image)s (%(name)s) of %(bid)s started",
                 {"uuid": ref.instance_uuid, "image": image_id, "name": image_name,
                  "bid": inst["InstanceId"]})
        return image_id

    def image_status(self, image_id):
        self._check_started("image_status")
        with self._translate_errors("DescribeImages"):
            try:
                images = self._client.describe_images(ImageIds=[image_id])["Images"]
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) not in _IMAGE_NOT_FOUND:
                    raise
                images = []
        if not images:
            created = self._images.get(image_id)
            fresh = created is not None and \
                self.clock() - created < self._opts.lost_instance_grace
            return "pending" if fresh else "failed"
        return _IMAGE_STATUS.get(images[0].get("State"), "failed")

    # -- queries -----------------------------------------------------------

    def get_info(self, ref):
        self._check_started("get_info")
        info = self._info_or_missing(ref, self._lookup(ref))
        if info.state is InstanceState.DELETED:
            raise exception.InstanceNotFound(instance_id=ref.instance_uuid, backend=self.name)
        return info

    def poll(self, refs):
        self._check_started("poll")
        refs = list(refs)
        if not refs:
            return {}
        ids = sorted({r.backend_id for r in refs if r.backend_id})
        if all(r.backend_id for r in refs) and len(ids) <= MAX_FILTER_VALUES:
            instances = self._describe([{"Name": "instance-id", "Values": ids}])
            self._observe(instances)
        else:
            instances = self._describe([self._owner_filter()])
            self._observe(instances, complete=True)
        by_id = {i["InstanceId"]: i for i in instances}
        by_uuid = collections.defaultdict(list)
        for inst in instances:
            by_uuid[self._decode(inst)[0]].append(inst)
        result, running = {}, []
        for ref in refs:
            if ref.backend_id:
                inst = by_id.get(ref.backend_id)
            else:
                inst = self._pick(by_uuid.get(ref.instance_uuid, []))
            info = result[ref.instance_uuid] = self._info_or_missing(ref, inst)
            if info.state is InstanceState.RUNNING:
                running.append((ref, inst))
        if running and self._opts.elastic_ip:
            self._elastic_ips(running, result)
        return result

    def list_instances(self):
        self._check_started("list_instances")
        # Addresses first: one allocated after the instance describe below
        # would look as if its instance were gone.
        addresses = self._describe_addresses([self._owner_filter()]) \
            if self._opts.elastic_ip else []
        instances = self._describe([self._owner_filter()])
        self._observe(instances, complete=True)
        if addresses:
            live = {self._decode(i)[0] for i in instances if i["State"]["Name"] not in _GONE}
            for address in addresses:
                if address["_uuid"] in live:
                    continue
                try:
                    self._release_addresses([address], "its instance is gone")
                except exception.BackendError as exc:
                    # The listing matters more; the next pass tries again.
                    LOG.warning("[instance: %(uuid)s] could not release leaked Elastic IP "
                                "%(ip)s: %(err)s", {"uuid": address["_uuid"],
                                                    "ip": address.get("PublicIp"),
                                                    "err": exc.message})
        result = []
        for inst in instances:
            if inst["State"]["Name"] == "terminated":
                continue
            uuid = self._decode(inst)[0]
            if not uuid:
                LOG.warning("Instance %s has our owner tag but no instance uuid in its tags; "
                            "leaving it out", inst["InstanceId"])
                continue
            result.append(self._to_info(inst, uuid))
        return result

    def get_capacity(self, flavors):
        self._check_started("get_capacity")
        # The ledger follows our own launches, polls and terminations; a
        # describe of everything adds only what changed behind our back,
        # which [ec2] capacity_refresh bounds (docs/ec2.md, "Capacity").
        if self._full_at is None or \
                self.clock() - self._full_at >= self._opts.capacity_refresh:
            self._observe(self._describe([self._owner_filter()]), complete=True)
        flavor_types = {}
        for flavor in flavors:
            with contextlib.suppress(exception.BackendError):
                flavor_types[flavor.name] = self._instance_type(flavor, check=False)
        with self._cond:
            used_types = {t for t, _ in self._ledger.values()}
        self._ensure_types(set(flavor_types.values()) | used_types)
        opts = self._opts
        quota = self._vcpu_quota()
        cap = min(quota, opts.max_vcpus) if opts.max_vcpus else quota
        now = self.clock()
        with self._cond:
            usage = self._usage()
            unavailable = {t for t, until in self._ice.items() if now < until}
        free = max(cap - usage.vcpus, 0)
        max_units = {}
        ram_per_vcpu = disk_per_vcpu = 0.0
        for flavor in flavors:
            itype = flavor_types.get(flavor.name)
            vcpus = self._types.get(itype)
            if not vcpus or itype in unavailable:
                max_units[flavor.name] = 0
                continue
            units = free // vcpus
            if opts.max_instances:
                units = min(units, max(opts.max_instances - usage.instances, 0))
            if opts.max_cost_per_hour:
                price = self._prices.get(itype)
                if price is None:
                    units = 0
                elif price > 0:
                    left = opts.max_cost_per_hour - usage.cost
                    units = min(units, max(int(left / price + 1e-9), 0))
            max_units[flavor.name] = units
            ram_per_vcpu = max(ram_per_vcpu, flavor.memory_mb / vcpus)
            disk_per_vcpu = max(disk_per_vcpu, flavor.disk_mb / vcpus)
        return Capacity(ram_total_mb=int(cap * ram_per_vcpu),
                        ram_free_mb=int(free * ram_per_vcpu),
                        disk_total_mb=int(cap * disk_per_vcpu),
                        disk_free_mb=int(free * disk_per_vcpu),
                        max_units=max_units, vcpus_total=cap, vcpus_used=usage.vcpus)

    def get_console_output(self, ref, tail_length=None):
        self._check_started("get_console_output")
        inst = self._current(ref)
        with self._translate_errors("GetConsoleOutput", ref):
            raw = self._client.get_console_output(InstanceId=inst["InstanceId"]).get("Output")
        lines = decode_console(raw).splitlines()
        if tail_length is not None:
            lines = lines[-tail_length:] if tail_length > 0 else []
        return "\n".join(lines)

    # -- batched launch ------------------------------------------------------

    def _join(self, item):
        """Add ``item`` to the open batch of its spec (lock held); True if it leads."""
        now = time.monotonic()
        batch = self._open.get(item.spec)
        leader = batch is None or len(batch.items) >= self._max_batch
        if leader:
            batch = self._open[item.spec] = _Batch(item.spec, now)
        batch.items.append(item)
        batch.last_add = now
        self._inflight[item.request.launch_token] = batch
        self._cond.notify_all()
        return batch, leader

    def _lead(self, batch):
        """Hold the batch open (batch_idle, at most batch_max), then send it."""
        idle = self._opts.batch_idle
        longest = max(self._opts.batch_max, idle)
        with self._cond:
            while len(batch.items) < self._max_batch:
                now = time.monotonic()
                deadline = batch.created + longest
                # NOTE: a quiet spell while a batch of the same spec is being
                # sent is no sign that the storm is over: the builds that
                # would join are held up behind that call (the workers it
                # occupies, the GIL, the agent's own journal writes). Only
                # batch_max bounds the wait then, so a storm goes out in
                # fewer, fuller RunInstances; alone, a build still leaves
                # after batch_idle.
                if not (idle and self._sending[batch.spec]):
                    deadline = min(batch.last_add + idle, deadline)
                if now >= deadline:
                    break
                self._cond.wait(deadline - now)
            if self._open.get(batch.spec) is batch:
                del self._open[batch.spec]
            self._sending[batch.spec] += 1
        try:
            self._send(batch)
        except exception.BackendError as exc:
            for item in batch.items:
                if item.info is None and item.error is None:
                    item.error = copy.copy(exc)
        except Exception as exc:
            # A bug: fail the waiting builds with a BackendError, never hang them.
            LOG.exception("Batched launch of %d instances failed", len(batch.items))
            for item in batch.items:
                if item.info is None and item.error is None:
                    item.error = exception.BackendError(
                        backend=self.name, reason="batched launch failed: %s" % exc)
        finally:
            with self._cond:
                for item in batch.items:
                    if self._inflight.get(item.request.launch_token) is batch:
                        del self._inflight[item.request.launch_token]
                self._sending[batch.spec] -= 1
                if not self._sending[batch.spec]:
                    del self._sending[batch.spec]
                self._cond.notify_all()
            batch.done.set()

    def _send(self, batch):
        """Find members already launched, replace older generations, launch the rest."""
        existing = collections.defaultdict(list)
        uuids = sorted({item.request.instance_uuid for item in batch.items})
        if self._lookup_needless(batch.items):
            uuids = []
        for start in range(0, len(uuids), MAX_FILTER_VALUES):
            keys = [SLOT_PREFIX + u for u in uuids[start:start + MAX_FILTER_VALUES]]
            for inst in self._describe([self._owner_filter(),
                                        {"Name": "tag-key", "Values": keys}]):
                uuid, generation = self._decode(inst)
                if inst["State"]["Name"] not in _GONE:
                    existing[uuid].append((generation, inst))
        launch, old = [], {}
        for item in batch.items:
            req = item.request
            found = existing.get(req.instance_uuid, [])
            newer = [g for g, _ in found if g > req.generation]
            same = [i for g, i in found if g == req.generation]
            if newer:
                item.error = exception.BackendError(
                    backend=self.name, reason="instance %s already has generation %d in EC2, "
                    "newer than this build's %d" % (req.instance_uuid, max(newer),
                                                     req.generation))
            elif same:
                item.info = self._to_info(same[0], req.instance_uuid)
                self._remember(req, item.info, same[0])
                LOG.info("[instance: %(uuid)s] found %(bid)s already launched for this "
                         "build", {"uuid": req.instance_uuid, "bid": item.info.backend_id})
            else:
                stale = [i["InstanceId"] for g, i in found if g < req.generation]
                if stale:
                    old[req.instance_uuid] = (item, stale)
                launch.append(item)
        for uuid, (item, ids) in old.items():
            # Rebuild: the new generation replaces the old one, never beside it.
            try:
                with self._translate_errors("TerminateInstances"):
                    resp = self._client.terminate_instances(InstanceIds=ids)
                self._observe_changes(resp.get("TerminatingInstances", []))
                LOG.info("[instance: %(uuid)s] terminating older generation %(ids)s",
                         {"uuid": uuid, "ids": ", ".join(ids)})
            except exception.BackendError as exc:
                item.error = exc
                launch.remove(item)
        launch = self._reserve(launch)
        if not launch:
            return
        batch.sent = sorted(launch, key=lambda i: i.request.launch_token)
        batch.params = self._run_params(batch.spec, batch.sent)
        with self._cond:
            for item in batch.sent:
                self._unresolved[item.request.launch_token] = batch
        self._run(batch)

    def _resend(self, batch, token):
        """A member of a batch whose outcome is unknown retried: re-send it identically."""
        LOG.info("Re-sending RunInstances %(token)s (%(n)d instances) with the same "
                 "ClientToken", {"token": batch.params["ClientToken"][:12],
                                 "n": len(batch.sent)})
        self._run(batch)
        item = next(i for i in batch.sent if i.request.launch_token == token)
        if item.error is not None:
            raise copy.copy(item.error)
        return item.info

    def _run(self, batch):
        """RunInstances for ``batch.sent``; sets each item's info or error."""
        with batch.lock:
            if batch.resolved:
                return
            spec = batch.spec
            try:
                with self._translate_errors("RunInstances", instance_type=spec.instance_type):
                    resp = self._client.run_instances(**batch.params)
            except exception.BackendError as exc:
                with self._cond:
                    for item in batch.sent:
                        token = item.request.launch_token
                        self._reserved.pop(token, None)
                        if not exc.retryable and self._unresolved.get(token) is batch:
                            # A refusal is final: a retry builds a new batch.
                            del self._unresolved[token]
                for item in batch.sent:
                    item.info, item.error = None, copy.copy(exc)
                LOG.warning("RunInstances of %(n)d x %(type)s failed%(again)s: %(err)s",
                            {"n": len(batch.sent), "type": spec.instance_type, "err": exc,
                             "again": " (a retry re-sends it)" if exc.retryable else ""})
                return
            by_index = {inst.get("AmiLaunchIndex", 0): inst
                        for inst in resp.get("Instances", [])}
            for index, item in enumerate(batch.sent):
                inst = by_index.get(index)
                if inst is None:
                    item.info, item.error = None, exception.BackendError(
                        backend=self.name, reason="RunInstances returned no instance at "
                        "launch index %d" % index)
                    continue
                item.info, item.error = self._to_info(inst, item.request.instance_uuid), None
                self._remember(item.request, item.info, inst)
                LOG.info("[instance: %(uuid)s] launched %(bid)s (%(type)s, %(ami)s, "
                         "%(i)d of %(n)d in reservation %(res)s)",
                         {"uuid": item.request.instance_uuid, "bid": inst["InstanceId"],
                          "type": spec.instance_type, "ami": spec.image_id, "i": index + 1,
                          "n": len(batch.sent), "res": resp.get("ReservationId")})
            batch.resolved = True
            with self._cond:
                for item in batch.sent:
                    self._reserved.pop(item.request.launch_token, None)
                    if self._unresolved.get(item.request.launch_token) is batch:
                        del self._unresolved[item.request.launch_token]

    def _run_params(self, spec, items):
        token = hashlib.sha256(spec.digest().encode())
        for item in items:
            token.update(item.request.launch_token.encode() + b"\0")
        client_token = token.hexdigest()          # 64 characters, EC2's limit
        slots = {SLOT_PREFIX + item.request.instance_uuid: "%d:%d" % (
            item.request.generation, index) for index, item in enumerate(items)}
        tags = self._tags(dict(slots, **{BATCH_TAG: client_token}))
        if len(items) == 1:
            req = items[0].request
            tags += [{"Key": UUID_TAG, "Value": req.instance_uuid},
                     {"Key": GENERATION_TAG, "Value": str(req.generation)},
                     {"Key": "Name", "Value": (req.name or req.instance_uuid)[:255]}]
        params = {
            "ImageId": spec.image_id, "InstanceType": spec.instance_type,
            "MinCount": len(items), "MaxCount": len(items), "ClientToken": client_token,
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": self._tags({BATCH_TAG: client_token})},
            ],
        }
        if spec.subnet_id:
            params["SubnetId"] = spec.subnet_id
        if spec.security_groups:
            params["SecurityGroupIds"] = list(spec.security_groups)
        if spec.key_name:
            params["KeyName"] = spec.key_name
        if spec.user_data:
            params["UserData"] = spec.user_data
        if spec.hibernate:
            params["HibernationOptions"] = {"Configured": True}
        return params

    def _lookup_needless(self, items):
        """True when no member can have an instance EC2 would show us.

        The look-up before a launch finds instances an earlier process of
        this cell launched (a replay after a crash, possibly too recent for
        the describe at start) and older generations (rebuilds). A request
        marked ``first_launch`` (this cell never recorded the instance
        before) for a uuid never seen since start has neither; a lost
        response within this process is covered by re-sending the same batch
        with the same ClientToken. Skipping it halves the calls per batch.
        """
        with self._cond:
            return all(item.request.first_launch
                       and item.request.instance_uuid not in self._known_uuids
                       for item in items)

    def _remember(self, request, info, inst):
        with self._cond:
            self._launched[request.instance_uuid] = (request.launch_token, info)
            self._known_uuids.add(request.instance_uuid)
            now = self.clock()
            self._launch_times[info.backend_id] = now
            if len(self._launch_times) > 4096:
                grace = self._opts.lost_instance_grace
                self._launch_times = {b: t for b, t in self._launch_times.items()
                                      if now - t < grace}
            self._ledger[info.backend_id] = (inst["InstanceType"], inst["State"]["Name"])

    def _forget(self, instance_uuid):
        with self._cond:
            self._launched.pop(instance_uuid, None)

    # -- budget, quota and capacity --------------------------------------------

    def _reserve(self, items):
        """The items that fit quota and budget; the others get InsufficientCapacity."""
        if not items:
            return items
        quota = self._vcpu_quota()
        fitting = []
        with self._cond:
            usage = self._usage()
            for item in items:
                itype = item.spec.instance_type
                reason = self._over_budget(usage, itype, quota, new_instance=True)
                if reason:
                    item.error = exception.InsufficientCapacity(
                        backend=self.name, reason="%s (instance %s)" % (
                            reason, item.request.instance_uuid))
                    LOG.warning("[instance: %(uuid)s] not launched: %(reason)s",
                                {"uuid": item.request.instance_uuid, "reason": reason})
                    continue
                usage.instances += 1
                usage.vcpus += self._types.get(itype, 1)
                usage.cost += self._prices.get(itype, 0.0)
                self._reserved[item.request.launch_token] = itype
                fitting.append(item)
        return fitting

    def _check_budget(self, itype, instance_uuid, new_instance):
        quota = self._vcpu_quota()
        with self._cond:
            reason = self._over_budget(self._usage(), itype, quota, new_instance)
        if reason:
            raise exception.InsufficientCapacity(
                backend=self.name, reason="%s (instance %s)" % (reason, instance_uuid))

    def _over_budget(self, usage, itype, quota, new_instance):
        """Why one more (or one more running) ``itype`` does not fit, or None."""
        opts = self._opts
        vcpus = self._types.get(itype, 1)
        price = self._prices.get(itype)
        if new_instance and opts.max_instances and usage.instances >= opts.max_instances:
            return "budget: [ec2] max_instances %d reached" % opts.max_instances
        if opts.max_vcpus and usage.vcpus + vcpus > opts.max_vcpus:
            return "budget: [ec2] max_vcpus %d: %d in use, %s needs %d" % (
                opts.max_vcpus, usage.vcpus, itype, vcpus)
        if usage.vcpus + vcpus > quota:
            return "EC2 vCPU quota %d: %d in use, %s needs %d" % (
                quota, usage.vcpus, itype, vcpus)
        if opts.max_cost_per_hour:
            if price is None:
                return "spend cap: no price for %s in [ec2] prices" % itype
            if usage.cost + price > opts.max_cost_per_hour + 1e-9:
                return ("spend cap: $%.4f/h in use + $%.4f/h for %s would exceed [ec2] "
                        "max_cost_per_hour $%.4f/h" % (usage.cost, price, itype,
                                                       opts.max_cost_per_hour))
        return None

    def _usage(self):
        """Our instances and budget holds, as counted against quota and caps (lock held)."""
        usage = _Usage()
        entries = list(self._ledger.values()) + [(t, "pending") for t in self._reserved.values()]
        for itype, state in entries:
            if state == "terminated":
                continue
            usage.instances += 1
            if state in _LIVE:
                usage.vcpus += self._types.get(itype, 1)
                usage.cost += self._prices.get(itype, 0.0)
        return usage

    def _vcpu_quota(self):
        now = self.clock()
        if self._quota is not None and now - self._quota_at < _QUOTA_TTL:
            return self._quota
        value = None
        if self._quotas is not None:
            try:
                value = int(self._quotas.get_service_quota(
                    ServiceCode="ec2", QuotaCode=_QUOTA_CODE)["Quota"]["Value"])
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError,
                    KeyError, TypeError, ValueError) as exc:
                if self._quota is None:
                    LOG.info("EC2 vCPU quota not available from Service Quotas (%(err)s); "
                             "using [ec2] vcpu_quota %(q)d",
                             {"err": self._scrub(type(exc).__name__), "q": self._opts.vcpu_quota})
        if value is None:
            value = self._opts.vcpu_quota
        self._quota, self._quota_at = value, now
        return value

    def _check_ice(self, itype, instance_uuid):
        until = self._ice.get(itype)
        if until is not None and self.clock() < until:
            raise exception.InsufficientCapacity(
                backend=self.name, reason="EC2 reported no capacity for %s; not trying it "
                "again for %d s ([ec2] ice_ttl) (instance %s)" % (
                    itype, until - self.clock(), instance_uuid))

    def _mark_unavailable(self, itype, code):
        if not self._opts.ice_ttl:
            return
        with self._cond:
            fresh = self._ice.get(itype, 0) <= self.clock()
            self._ice[itype] = self.clock() + self._opts.ice_ttl
        if fresh:
            LOG.warning("EC2 answered %(code)s for %(type)s: it reports no room for "
                        "%(ttl)d s", {"code": code, "type": itype, "ttl": self._opts.ice_ttl})

    def _observe(self, instances, complete=False):
        """Refresh the ledger from a describe (``complete``: all our instances)."""
        with self._cond:
            if complete:
                now, grace = self.clock(), self._opts.lost_instance_grace
                self._full_at = now
                # Keep launches too recent to be listed (eventual consistency).
                self._ledger = {b: v for b, v in self._ledger.items()
                                if now - self._launch_times.get(b, float("-inf")) < grace}
            for inst in instances:
                tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                if tags.get(OWNER_TAG) != self.owner:
                    continue
                if inst["State"]["Name"] == "terminated":
                    self._ledger.pop(inst["InstanceId"], None)
                else:
                    uuid, _generation = self._decode(inst)
                    if uuid:
                        self._known_uuids.add(uuid)
                    self._ledger[inst["InstanceId"]] = (inst["InstanceType"],
                                                        inst["State"]["Name"])

    def _observe_changes(self, changes):
        """Apply the CurrentState of Terminate/Stop/StartInstances answers to the ledger."""
        with self._cond:
            for change in changes:
                bid = change.get("InstanceId")
                if bid in self._ledger:
                    self._ledger[bid] = (self._ledger[bid][0],
                                         change.get("CurrentState", {}).get("Name", "pending"))

    # -- lookups -------------------------------------------------------------

    def _describe(self, filters):
        """One paginated DescribeInstances; every instance of every page."""
        instances = []
        with self._translate_errors("DescribeInstances"):
            pages = self._client.get_paginator("describe_instances").paginate(
                Filters=filters, PaginationConfig={"PageSize": _PAGE_SIZE})
            for page in pages:
                for reservation in page.get("Reservations", []):
                    instances.extend(reservation.get("Instances", []))
        return instances

    def _by_uuid(self, instance_uuid):
        """Our instances (any generation and state) tagged for ``instance_uuid``."""
        instances = self._describe([self._owner_filter(), {
            "Name": "tag-key", "Values": [SLOT_PREFIX + instance_uuid]}])
        self._observe(instances)
        return [i for i in instances if self._decode(i)[0] == instance_uuid]

    def _lookup(self, ref):
        """The instance ``ref`` names (by backend id, else by uuid tag), or None."""
        if not ref.backend_id:
            return self._pick(self._by_uuid(ref.instance_uuid))
        instances = self._describe([{"Name": "instance-id", "Values": [ref.backend_id]}])
        self._observe(instances)
        return next((i for i in instances if i["InstanceId"] == ref.backend_id), None)

    def _pick(self, instances):
        """The live instance of the newest generation, else the newest gone one."""
        if not instances:
            return None
        return max(instances, key=lambda i: (i["State"]["Name"] not in _GONE,
                                             self._decode(i)[1], str(i.get("LaunchTime"))))

    def _current(self, ref):
        """The live instance ``ref`` names, for an operation on it."""
        inst = self._lookup(ref)
        if inst is None and self._in_grace(ref.backend_id):
            raise exception.BackendError(
                backend=self.name, retryable=True, reason="instance %s of %s was just "
                "launched and is not visible yet" % (ref.backend_id, ref.instance_uuid))
        if inst is None or inst["State"]["Name"] in _GONE:
            raise exception.InstanceNotFound(instance_id=ref.instance_uuid, backend=self.name)
        return inst

    def _in_grace(self, backend_id):
        launched = self._launch_times.get(backend_id) if backend_id else None
        return launched is not None and \
            self.clock() - launched < self._opts.lost_instance_grace

    def _info_or_missing(self, ref, inst):
        if inst is not None:
            return self._to_info(inst, ref.instance_uuid)
        state = InstanceState.PENDING if self._in_grace(ref.backend_id) \
            else InstanceState.DELETED
        return InstanceInfo(backend_id=ref.backend_id, state=state,
                            instance_uuid=ref.instance_uuid)

    def _own_image(self, image_name, ref):
        """The image a previous attempt of this snapshot created (a retry)."""
        images = self._client.describe_images(
            Owners=["self"], Filters=[{"Name": "name", "Values": [image_name]}])["Images"]
        for image in images:
            tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
            if tags.get(UUID_TAG) == ref.instance_uuid:
                return image["ImageId"]
        raise exception.BackendError(
            backend=self.name, reason="an image named %r exists already and is not a "
            "snapshot of instance %s" % (image_name, ref.instance_uuid))

    # -- power ------------------------------------------------------------------

    def _stop(self, ref, what, hibernate):
        inst = self._current(ref)
        state = inst["State"]["Name"]
        if state in ("stopped", "stopping"):
            return self._to_info(inst, ref.instance_uuid)
        if state != "running":
            raise self._refused(inst, ref, what)
        try:
            with self._translate_errors("StopInstances", ref):
                resp = self._client.stop_instances(InstanceIds=[inst["InstanceId"]],
                                                   Hibernate=hibernate)
        except exception.BackendError as exc:
            if not hibernate or exc.retryable or isinstance(
                    exc, (exception.InstanceNotFound, exception.BackendAuthError)):
                raise
            LOG.warning("[instance: %(uuid)s] hibernate refused (%(err)s); stopping "
                        "instead", {"uuid": ref.instance_uuid, "err": exc})
            with self._translate_errors("StopInstances", ref):
                resp = self._client.stop_instances(InstanceIds=[inst["InstanceId"]])
        changes = resp.get("StoppingInstances", [])
        self._observe_changes(changes)
        LOG.info("[instance: %(uuid)s] %(what)s: stopping %(bid)s%(hib)s",
                 {"uuid": ref.instance_uuid, "what": what, "bid": inst["InstanceId"],
                  "hib": " (hibernate)" if hibernate else ""})
        return self._to_info(inst, ref.instance_uuid, self._state_of(changes, "stopping"))

    def _start(self, ref, what):
        inst = self._current(ref)
        state = inst["State"]["Name"]
        if state in ("running", "pending"):
            return self._to_info(inst, ref.instance_uuid)
        if state != "stopped":
            raise self._refused(inst, ref, what)
        changes = self._start_instance(inst, ref)
        LOG.info("[instance: %(uuid)s] %(what)s: starting %(bid)s",
                 {"uuid": ref.instance_uuid, "what": what, "bid": inst["InstanceId"]})
        state = self._state_of(changes, "pending")
        # EC2 says "pending" for a start as for a launch; to the manager it is a start.
        if state is InstanceState.PENDING:
            state = InstanceState.STARTING
        return self._to_info(inst, ref.instance_uuid, state)

    def _start_instance(self, inst, ref):
        with self._translate_errors("StartInstances", ref, instance_type=inst["InstanceType"]):
            changes = self._client.start_instances(
                InstanceIds=[inst["InstanceId"]]).get("StartingInstances", [])
        self._observe_changes(changes)
        return changes

    def _state_of(self, changes, default):
        name = changes[0].get("CurrentState", {}).get("Name", default) if changes else default
        return self.map_state(name)

    def _refused(self, inst, ref, what):
        state = self.map_state(inst["State"]["Name"])
        return exception.BackendError(
            backend=self.name,
            retryable=state.is_transitional and state is not InstanceState.DELETING,
            reason="cannot %s instance %s while it is %s" % (what, ref.instance_uuid,
                                                              state.value))

    # -- configuration ---------------------------------------------------------

    def _check_started(self, op):
        if self._client is None:
            raise exception.BackendError(backend=self.name,
                                         reason="%s called before start()" % op)

    def _check_tags(self):
        extra = self._opts.tags
        bad = sorted(k for k in extra if k.startswith(RESERVED_TAG_PREFIXES))
        if bad:
            raise exception.ConfigurationError(
                reason="[ec2] tags: keys %s use a reserved prefix (%s)" % (
                    ", ".join(bad), ", ".join(RESERVED_TAG_PREFIXES)))
        room = _MAX_TAGS - _BASE_TAGS - _LONE_TAGS - 1
        if len(extra) > room:
            raise exception.ConfigurationError(
                reason="[ec2] tags: %d tags, at most %d fit beside ours (EC2 allows %d per "
                       "resource)" % (len(extra), room, _MAX_TAGS))

    def _parse_prices(self):
        prices = {}
        for itype, value in self._opts.prices.items():
            try:
                prices[itype] = float(value)
                if not prices[itype] >= 0:
                    raise ValueError
            except ValueError:
                raise exception.ConfigurationError(
                    reason="[ec2] prices: %s=%r is not a price in $/h" % (itype, value))
        if self._opts.max_cost_per_hour:
            missing = sorted({t for t in self._opts.instance_type_map.values()
                              if t not in prices})
            if missing:
                raise exception.ConfigurationError(
                    reason="[ec2] max_cost_per_hour is set but [ec2] prices has no price "
                           "for %s (used in instance_type_map)" % ", ".join(missing))
        return prices

    def _validate_maps(self):
        """Fail fast, at start, on a map entry EC2 does not know."""
        opts = self._opts
        bad = self._ensure_types(set(opts.instance_type_map.values()))
        if bad:
            entries = ["%s -> %s" % (f, t) for f, t in sorted(opts.instance_type_map.items())
                       if t in bad]
            raise exception.ConfigurationError(
                reason="[ec2] instance_type_map: %s: no such instance type in region %s"
                       % ("; ".join(entries), opts.region))
        missing = []
        for ami in sorted(set(opts.image_map.values())):
            with self._translate_errors("DescribeImages"):
                try:
                    images = self._client.describe_images(ImageIds=[ami])["Images"]
                except botocore.exceptions.ClientError as exc:
                    if error_code(exc) not in _IMAGE_NOT_FOUND:
                        raise
                    images = []
            if not images or images[0].get("State") not in ("available", "pending"):
                missing.append(ami)
        if missing:
            entries = ["%s -> %s" % (i, a) for i, a in sorted(opts.image_map.items())
                       if a in missing]
            raise exception.ConfigurationError(
                reason="[ec2] image_map: %s: no such available AMI in region %s for this "
                       "account" % ("; ".join(entries), opts.region))
        checks = [("subnet_id", "describe_subnets", "SubnetIds",
                   [opts.subnet_id] if opts.subnet_id else []),
                  ("security_group_ids", "describe_security_groups", "GroupIds",
                   list(opts.security_group_ids)),
                  ("security_group_map", "describe_security_groups", "GroupIds",
                   sorted(set(opts.security_group_map.values()))),
                  ("key_name", "describe_key_pairs", "KeyNames",
                   [opts.key_name] if opts.key_name else [])]
        for option, method, param, values in checks:
            if not values:
                continue
            with self._translate_errors("validating [ec2] %s" % option):
                try:
                    getattr(self._client, method)(**{param: values})
                except botocore.exceptions.ClientError as exc:
                    if not error_code(exc).endswith((".NotFound", ".Malformed")):
                        raise
                    raise exception.ConfigurationError(
                        reason="[ec2] %s: %s" % (option, self._scrub(
                            exc.response["Error"].get("Message", error_code(exc)))))

    def _ensure_types(self, types):
        """Learn the vCPUs of ``types``; returns the ones the region does not offer."""
        unknown = sorted(t for t in types if t and t not in self._types
                         and t not in self._bad_types)
        for start in range(0, len(unknown), _TYPES_PER_CALL):
            chunk = unknown[start:start + _TYPES_PER_CALL]
            with self._translate_errors("DescribeInstanceTypes"):
                try:
                    found = self._describe_types(chunk)
                except botocore.exceptions.ClientError as exc:
                    if error_code(exc) != "InvalidInstanceType":
                        raise
                    # Rare (a typo): find which ones, one call each.
                    found = {}
                    for itype in chunk:
                        try:
                            found.update(self._describe_types([itype]))
                        except botocore.exceptions.ClientError as one:
                            if error_code(one) != "InvalidInstanceType":
                                raise
            with self._cond:
                self._types.update(found)
                self._bad_types.update(t for t in chunk if t not in found)
        return {t for t in types if t in self._bad_types}

    def _describe_types(self, types):
        found = {}
        pages = self._client.get_paginator("describe_instance_types").paginate(
            InstanceTypes=types)
        for page in pages:
            for item in page.get("InstanceTypes", []):
                found[item["InstanceType"]] = int(item["VCpuInfo"]["DefaultVCpus"])
        return found

    def _instance_type(self, flavor, check=True):
        itype = self._opts.instance_type_map.get(flavor.name) or \
            (flavor.extra_specs or {}).get("ec2:instance_type")
        if not itype:
            raise exception.BackendError(
                backend=self.name, reason="flavor %s has no EC2 instance type: map it in "
                "[ec2] instance_type_map or give it the extra spec ec2:instance_type"
                % flavor.name)
        if check and self._ensure_types({itype}):
            raise exception.BackendError(
                backend=self.name, reason="flavor %s: EC2 region %s does not offer instance "
                "type %s" % (flavor.name, self._opts.region, itype))
        return itype

    def _image_id(self, image):
        image = image or {}
        properties = image.get("properties") or {}
        for key in (image.get("id"), image.get("name")):
            if key and key in self._opts.image_map:
                return self._opts.image_map[key]
        ami = properties.get("ec2_ami") or image.get("ec2_ami")
        if ami:
            return str(ami)
        if str(image.get("id") or "").startswith("ami-"):
            return image["id"]
        raise exception.BackendError(
            backend=self.name, reason="image %s (%s) has no AMI: map it in [ec2] image_map "
            "or give it the property ec2_ami" % (image.get("id"), image.get("name")))

    def _launch_spec(self, request):
        # In this order: the checks that need no EC2 call fail first.
        opts = self._opts
        return LaunchSpec(image_id=self._image_id(request.image),
                          instance_type=self._instance_type(request.flavor),
                          subnet_id=opts.subnet_id or "",
                          security_groups=self._security_groups(request),
                          key_name=self._key_name(request), user_data=request.user_data or "",
                          hibernate=bool(opts.hibernate))

    def _security_groups(self, request):
        """The EC2 group ids for the build's Nova security group names (sorted)."""
        opts = self._opts
        ids = set()
        for name in [str(n) for n in request.security_groups or [] if n] or ["default"]:
            if name in opts.security_group_map:
                ids.add(opts.security_group_map[name])
            elif name == "default":
                ids.update(opts.security_group_ids)
            else:
                # NOTE: never launch with other rules than asked for: the
                # VPC's default group may be wide open, or shut.
                raise exception.BackendError(
                    backend=self.name, reason="security group %r of instance %s has no EC2 "
                    "security group: map it in [ec2] security_group_map" % (
                        name, request.instance_uuid))
        return tuple(sorted(ids))

    def _owner_filter(self):
        return {"Name": "tag:" + OWNER_TAG, "Values": [self.owner]}

    def _tags(self, extra):
        tags = {OWNER_TAG: self.owner, CELL_TAG: self.cell}
        tags.update(self._opts.tags)
        tags.update(extra)
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    def _limiter_key(self):
        opts = self._opts
        if opts.profile:
            who = "profile:" + opts.profile
        elif opts.access_key_id:
            who = "key:" + hashlib.sha256(opts.access_key_id.encode()).hexdigest()[:16]
        else:
            who = "default-chain"
        return (opts.endpoint_url or "aws", opts.region, who)

    # -- botocore hooks and error translation --------------------------------

    def _before_send(self, **kwargs):
        self.limiter.acquire()

    def _response_received(self, parsed_response=None, **kwargs):
        code = ((parsed_response or {}).get("Error") or {}).get("Code")
        if code in THROTTLE_CODES:
            self.limiter.throttled()
        elif kwargs.get("exception") is None and parsed_response is not None and not code:
            self.limiter.succeeded()

    def _scrub(self, text):
        text = str(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    @contextlib.contextmanager
    def _translate_errors(self, what, ref=None, instance_type=None):
        """Turn botocore's exceptions into the backend error tree, once."""
        try:
            yield
        except botocore.exceptions.ClientError as exc:
            raise self._from_client_error(exc, what, ref, instance_type) from exc
        except botocore.exceptions.ProfileNotFound as exc:
            raise exception.ConfigurationError(
                reason="[ec2] profile: %s" % self._scrub(exc)) from exc
        except (botocore.exceptions.NoCredentialsError,
                botocore.exceptions.PartialCredentialsError,
                botocore.exceptions.CredentialRetrievalError) as exc:
            raise exception.BackendAuthError(
                backend=self.name, reason="%s: %s" % (what, self._scrub(exc))) from exc
        except (botocore.exceptions.ConnectionError,
                botocore.exceptions.HTTPClientError) as exc:
            raise exception.BackendUnavailable(
                backend=self.name, reason="%s: %s" % (what, self._scrub(exc))) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise exception.BackendError(
                backend=self.name, reason="%s: %s" % (what, self._scrub(exc))) from exc

    def _from_client_error(self, exc, what, ref, instance_type):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        reason = "%s: %s: %s" % (what, code or status, self._scrub(error.get("Message", exc)))
        if code in THROTTLE_CODES or code in UNAVAILABLE_CODES or status >= 500:
            return exception.BackendUnavailable(backend=self.name, reason=reason)
        if code in CAPACITY_CODES:
            if instance_type:
                self._mark_unavailable(instance_type, code)
            return exception.InsufficientCapacity(backend=self.name, reason=reason)
        if code in AUTH_CODES:
            return exception.BackendAuthError(backend=self.name, reason=reason)
        if code in NOT_FOUND_CODES:
            return exception.InstanceNotFound(
                instance_id=ref.instance_uuid if ref else None, backend=self.name)
        if code in STATE_CODES:
            return exception.BackendError(backend=self.name, retryable=True, reason=reason)
        return exception.BackendError(backend=self.name, reason=reason)

    # -- converters (last, as in libcloud) -----------------------------------

    @staticmethod
    def _decode(inst):
        """(instance uuid, generation) from an instance's tags, or ("", 0)."""
        tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
        index = inst.get("AmiLaunchIndex", 0)
        for key, value in tags.items():
            if key.startswith(SLOT_PREFIX):
                generation, _, slot = value.partition(":")
                if slot.isdigit() and int(slot) == index and generation.isdigit():
                    return key[len(SLOT_PREFIX):], int(generation)
        uuid = tags.get(UUID_TAG, "")
        generation = tags.get(GENERATION_TAG, "")
        return uuid, int(generation) if generation.isdigit() else (1 if uuid else 0)

    def _to_info(self, inst, instance_uuid=None, state=None):
        state = state or self.map_state(inst["State"]["Name"])
        instance_uuid = instance_uuid or self._decode(inst)[0]
        reason = inst.get("StateReason") or {}
        fault = reason.get("Message", "") if str(reason.get("Code", "")).startswith(
            "Server.") else ""
        if state is InstanceState.RUNNING and instance_uuid in self._eip_faults:
            state, fault = InstanceState.ERROR, self._eip_faults[instance_uuid]
        launched = inst.get("LaunchTime")
        return InstanceInfo(
            backend_id=inst["InstanceId"], state=state,
            addresses=self._to_addresses(inst) if state is not InstanceState.DELETED else [],
            instance_uuid=instance_uuid, fault=fault,
            launched_at=launched.isoformat() if state is InstanceState.RUNNING and
            hasattr(launched, "isoformat") else "")

    @staticmethod
    def _to_addresses(inst):
        network = inst.get("VpcId") or "ec2"
        interfaces = inst.get("NetworkInterfaces") or [{}]
        mac = interfaces[0].get("MacAddress", "")
        addresses = []
        if inst.get("PrivateIpAddress"):
            addresses.append(Address(inst["PrivateIpAddress"], 4, "fixed", network, mac,
                                     inst.get("PrivateDnsName", "")))
        for interface in interfaces:
            for v6 in interface.get("Ipv6Addresses", []):
                addresses.append(Address(v6["Ipv6Address"], 6, "fixed", network,
                                         interface.get("MacAddress", mac)))
        if inst.get("PublicIpAddress"):
            addresses.append(Address(inst["PublicIpAddress"], 4, "floating", network, mac,
                                     inst.get("PublicDnsName", "")))
        return addresses


def _cell_name(conf):
    # NOTE: the one value read outside [ec2]: the cell's name is the
    # default owner identity and the cellagent:cell tag. Absent when only
    # the backend options are registered (unit tests).
    try:
        return conf.cells.name
    except (AttributeError, cfg.Error):
        return None
