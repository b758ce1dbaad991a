"""TopManager: what the top (parent) cell does with what its children send,
and the operations people ask of it (``TopAPI``, the client RPC endpoint).

Up-methods from children (reference 3.4 and 3.5):

* ``instance_update_at_top`` applies the changed fields (``nova_object.changes``)
  to the top's row with the Stein guards, creating the row when missing;
  ``cell_name`` comes from the reversed routing path. The first update from
  the chosen cell acknowledges a build. An update from a cell the build was
  taken away from (after unanswered re-sends) is answered with a
  ``terminate_instance`` to that cell: the instance must live in one cell only.
* ``instance_destroy_at_top`` marks the row deleted; ``instance_fault_create_at_top``
  stores the fault; ``update_capacities`` / ``update_capabilities`` replace that
  child's report and its ``last_seen`` (durably: a restart does not forget).
  Reports from a cell without a record are logged and ignored, as nova did.
* BDM, bandwidth and keypair methods have nothing to act on here: ignored
  (logged at debug), ``get_keypair_at_top`` answers null.

Builds (section 3.8 plus what nova lacked): the rows are written first
(``building`` / ``scheduling``), the scheduler chooses a cell from the last
reports, and a targeted ``build_instances`` is cast in the stock format. A
build the chosen cell does not acknowledge within ``build_ack_timeout`` is
sent again with the same instance uuids (children drop duplicates); after
``build_retries`` sends the cell is backed off and the build rescheduled to a
cell it was not tried on, up to ``max_reschedules`` times, then ERROR with a
fault. Placements not yet visible in a cell's capacity report are counted as
*pending* by the scheduler, so a burst of builds does not overfill a cell
between two reports.
"""

import collections
import datetime
import json
import logging
import threading
import time
import uuid as uuidlib

from cellagent import exception
from cellagent import scheduler as scheduler_mod
from cellagent.objects import Flavor, TopCell, TopInstance
from cellagent.rpc import intercell
from cellagent.rpc import neighbours as neighbours_mod
from cellagent.rpc import transport as transport_mod

LOG = logging.getLogger(__name__)

SETTLED_STATES = frozenset({"active", "error", "stopped", "deleted", "soft-delete",
                            "shelved_offloaded"})
# Instance fields a child reports that the top keeps, by nova field name.
_FIELD_MAP = {
    "display_name": "name", "vm_state": "vm_state", "task_state": "task_state",
    "power_state": "power_state", "host": "host", "node": "node",
    "access_ip_v4": "access_ip_v4", "image_ref": "image_ref",
    "project_id": "project_id", "user_id": "user_id",
}
_IGNORED_UP = frozenset({"bw_usage_update_at_top", "bdm_update_or_create_at_top",
                         "bdm_destroy_at_top", "consoleauth_delete_tokens"})
# task_state the top records when it sends an action down (as the API does).
_ACTION_TASK_STATE = {"reboot_SOFT": "rebooting", "reboot_HARD": "rebooting_hard",
                      "stop": "powering-off", "start": "powering-on",
                      "delete": "deleting"}


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _parse_time(value):
    if not value or not isinstance(value, str):
        return None
    text = value.rstrip("Z").split("+")[0]
    for fmt in ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


def addresses_from_info_cache(value):
    """The addresses in an ``InstanceInfoCache`` primitive (nova network model)."""
    try:
        data, _ = intercell.obj_data(value, "InstanceInfoCache")
        nw_info = data.get("network_info")
        vifs = json.loads(nw_info) if isinstance(nw_info, str) else (nw_info or [])
    except (exception.MessageError, ValueError, TypeError):
        return None
    out = []
    for vif in vifs if isinstance(vifs, list) else []:
        network = (vif.get("network") or {}) if isinstance(vif, dict) else {}
        label = network.get("label") or network.get("id") or ""
        for subnet in network.get("subnets") or []:
            for ip in subnet.get("ips") or []:
                out.append({"network": label, "addr": ip.get("address"),
                            "type": ip.get("type", "fixed"), "version": ip.get("version", 4)})
                for fip in ip.get("floating_ips") or []:
                    out.append({"network": label, "addr": fip.get("address"),
                                "type": "floating", "version": fip.get("version", 4)})
    return out


def flavor_from(data):
    """A Flavor from a TopInstance.flavor dict."""
    return Flavor(name=data.get("name", "?"), memory_mb=int(data.get("memory_mb", 0)),
                  vcpus=int(data.get("vcpus", 0)), root_gb=int(data.get("root_gb", 0)),
                  ephemeral_gb=int(data.get("ephemeral_gb", 0)),
                  flavorid=str(data.get("flavorid", "")))


def cells_from_json(path):
    """TopCell records from a nova ``cells.json``, with cellagent's extra keys.

    Besides nova's keys a record may carry ``tier``, ``cost_per_vcpu_hour``,
    ``flavor_costs`` and ``budget`` (``max_instances``, ``max_vcpus``,
    ``max_cost_per_hour``); a stock nova ignores them.
    """
    with open(path) as f:
        data = json.load(f)
    records = neighbours_mod.parse_cells(data, path)
    out = {}
    for name, rec in records.items():
        extra = data[name]
        budget = extra.get("budget") or {}
        try:
            out[name] = TopCell(
                name=name, transport_url=rec.transport_url, is_parent=rec.is_parent,
                weight_offset=rec.weight_offset, weight_scale=rec.weight_scale,
                tier=str(extra.get("tier", "private")),
                cost_per_vcpu_hour=float(extra.get("cost_per_vcpu_hour", 0.0)),
                flavor_costs={str(k): float(v)
                              for k, v in (extra.get("flavor_costs") or {}).items()},
                max_instances=budget.get("max_instances"),
                max_vcpus=budget.get("max_vcpus"),
                max_cost_per_hour=budget.get("max_cost_per_hour"),
                disabled=bool(extra.get("disabled", False)))
        except (TypeError, ValueError) as e:
            raise exception.ConfigurationError(reason="%s: cell %s: %s" % (path, name, e))
        if out[name].tier not in ("private", "public"):
            raise exception.ConfigurationError(
                reason="%s: cell %s: tier must be private or public" % (path, name))
    return out


class _Pending:
    """Placements a cell's capacity report does not show yet."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_uuid = {}    # uuid -> [cell, flavor, settled_at or None]

    def add(self, uuid, cell, flavor):
        with self._lock:
            self._by_uuid[uuid] = [cell, flavor, None]

    def settle(self, uuid, when):
        with self._lock:
            item = self._by_uuid.get(uuid)
            if item is not None and item[2] is None:
                item[2] = when

    def forget(self, uuid):
        with self._lock:
            self._by_uuid.pop(uuid, None)

    def report_arrived(self, cell, when):
        """A capacity report of ``cell`` at ``when`` shows what settled before it."""
        with self._lock:
            for uuid, (c, _f, settled) in list(self._by_uuid.items()):
                if c == cell and settled is not None and settled <= when:
                    del self._by_uuid[uuid]

    def by_cell(self):
        out = collections.defaultdict(collections.Counter)
        with self._lock:
            for cell, flavor, _settled in self._by_uuid.values():
                out[cell][flavor] += 1
        return {cell: list(counter.items()) for cell, counter in out.items()}


class TopManager:
    """The top cell: the Router's handler and the operations behind TopAPI."""

    def __init__(self, our_name, store, scheduler, sender, neighbours, flavors,
                 cells_json=None, build_ack_timeout=30.0, build_retries=3,
                 max_reschedules=2, mute_interval=300.0, backoff=None, clock=time.time):
        self.our_name = our_name
        self.store = store
        self.scheduler = scheduler
        self.sender = sender
        self.neighbours = neighbours
        self.flavors = {f.name: f for f in flavors}
        self.cells_json = cells_json
        self.build_ack_timeout = build_ack_timeout
        self.build_retries = build_retries
        self.max_reschedules = max_reschedules
        self.mute_interval = mute_interval
        self.backoff = backoff or scheduler_mod.Backoff()
        self.clock = clock
        self.router = None        # set by the service; calls go through it
        self.pending = _Pending()
        self._schedule_lock = threading.Lock()
        self._cells = {}
        self._listeners = []
        self.reload_cells()
        for name, report in self.store.cell_reports().items():
            if report.backoff_until is not None:
                self.backoff.load(name, _epoch(report.backoff_until), report.failures)

    # -- cell records ----------------------------------------------------------

    def reload_cells(self):
        """Cell records: ``cells_config`` JSON, overridden by database records."""
        cells = {}
        if self.cells_json:
            try:
                cells.update(cells_from_json(self.cells_json))
            except (OSError, ValueError, exception.ConfigurationError) as e:
                if not self._cells:
                    raise exception.ConfigurationError(
                        reason="cannot read cells_config %s: %s" % (self.cells_json, e))
                LOG.error("Keeping the previous cell records: %s", e)
                return
        for cell in self.store.list_cells():
            cells[cell.name] = cell
        if set(cells) != set(self._cells):
            LOG.info("Cell records: %s", ", ".join(
                "%s (%s)" % (c.name, "parent" if c.is_parent else c.tier)
                for c in sorted(cells.values(), key=lambda c: c.name)) or "none")
        self._cells = cells
        self.neighbours.replace({name: c.to_record() for name, c in cells.items()})

    def children(self):
        return [c for c in self._cells.values() if not c.is_parent]

    def add_listener(self, fn):
        """``fn(event, **details)`` is called on placements and state changes
        (the demo draws its progress from it)."""
        self._listeners.append(fn)

    def _emit(self, event, **details):
        for fn in self._listeners:
            try:
                fn(event, **details)
            except Exception:  # noqa: B902 - a listener never breaks the top
                LOG.exception("Listener failed on %s", event)

    # -- entry from the router ---------------------------------------------

    def handle(self, msg):
        method = getattr(self, "_up_" + msg.method_name, None)
        if method is not None:
            return method(msg, msg.method_kwargs)
        if msg.method_name in _IGNORED_UP:
            LOG.debug("Ignoring %s: nothing to keep at this top", msg.describe())
            return None
        if msg.method_name == "get_keypair_at_top":
            return None
        if msg.message_type == "broadcast" and msg.direction == "down":
            # A broadcast down passes through a mid-level cell; nothing local.
            return None
        raise exception.UnknownMethod(message_type=msg.message_type,
                                      method_name=msg.method_name)

    def _child_of(self, msg):
        """Cell name (relative to us) a broadcast up came from."""
        path = intercell.reverse_path(msg.routing_path).split(intercell.PATH_SEP)
        return intercell.PATH_SEP.join(path[1:]) or None

    def _up_instance_update_at_top(self, msg, kwargs):
        data, changes = intercell.obj_data(kwargs.get("instance"), "Instance")
        uuid = data.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            raise exception.MalformedMessage(reason="instance has no uuid")
        cell = self._child_of(msg)
        fields = {}
        for key in (changes or list(data)):
            if key in _FIELD_MAP and key in data:
                fields[_FIELD_MAP[key]] = data[key]
            elif key == "launched_at":
                fields["launched_at"] = _parse_time(data.get(key))
            elif key == "flavor" and intercell.is_obj_primitive(data.get(key)):
                try:
                    fdata, _ = intercell.obj_data(data[key], "Flavor")
                except exception.MessageError:
                    continue
                fields["flavor"] = {k: fdata.get(k) for k in (
                    "name", "memory_mb", "vcpus", "root_gb", "ephemeral_gb", "flavorid")}
            elif key == "system_metadata" and isinstance(data.get(key), dict):
                for meta, value in data[key].items():
                    if meta.startswith("cellagent_snapshot:"):
                        LOG.info("[instance: %(uuid)s] Snapshot %(image)s is image %(p)s in "
                                 "cell %(cell)s", {"uuid": uuid, "cell": self._child_of(msg),
                                                   "image": meta.split(":", 1)[1], "p": value})
            elif key == "info_cache" and data.get(key) is not None:
                addresses = addresses_from_info_cache(data[key])
                if addresses is not None:
                    fields["addresses"] = addresses
        if "power_state" in fields and not isinstance(fields["power_state"], int):
            fields.pop("power_state")
        try:
            current = self.store.get_instance(uuid, include_deleted=True)
        except exception.InstanceNotFound:
            current = None
        if current is not None and cell and current.cell_name and current.cell_name != cell:
            if cell in (current.tried_cells or []):
                self._cancel_stale(uuid, cell)
                return None
        if current is None and "flavor" not in fields and data.get("memory_mb"):
            fields["flavor"] = {"name": str(data.get("instance_type_id") or "?"),
                                "memory_mb": data.get("memory_mb"), "vcpus": data.get("vcpus"),
                                "root_gb": data.get("root_gb"),
                                "ephemeral_gb": data.get("ephemeral_gb") or 0}
        if current is not None and current.cell_name == cell and not current.acked:
            fields["acked"] = True
            fields["build_deadline"] = None
        elif current is None:
            fields["acked"] = True
        try:
            inst, created = self.store.update_at_top(uuid, fields, cell)
        except exception.InstanceUpdateRejected as e:
            LOG.warning("[instance: %(uuid)s] Update from %(cell)s dropped: %(err)s",
                        {"uuid": uuid, "cell": cell, "err": e.message})
            return None
        if created:
            LOG.info("[instance: %(uuid)s] Created at the top from cell %(cell)s's update",
                     {"uuid": uuid, "cell": cell})
        self._state_changed(inst, cell, fields)
        return None

    def _state_changed(self, inst, cell, fields):
        vm_state = fields.get("vm_state")
        # The child counts an instance against its capacity once its backend
        # took the spawn, which is before it reports ``spawning`` (or a
        # settled state when the backend is synchronous): reports arriving
        # after that show it, so it stops being pending then.
        if vm_state in SETTLED_STATES or fields.get("task_state") == "spawning":
            self.pending.settle(inst.uuid, self.clock())
        if vm_state == "active" and fields.get("task_state") is None and cell:
            if self.backoff.failures(cell):
                self.backoff.succeeded(cell)
                self.store.set_backoff(cell, None, 0)
        elif vm_state == "error" and cell and inst.launched_at is None:
            until = self.backoff.failed(cell, self.clock())
            self.store.set_backoff(cell, _from_epoch(until), self.backoff.failures(cell))
            LOG.warning("Cell %(cell)s failed a build (%(uuid)s): backed off until %(until)s",
                        {"cell": cell, "uuid": inst.uuid, "until": _from_epoch(until)})
        self._emit("instance", instance=inst, cell=cell, fields=fields)

    def _cancel_stale(self, uuid, cell):
        LOG.warning("[instance: %(uuid)s] Cell %(cell)s built it after the build was moved "
                    "elsewhere: deleting it there", {"uuid": uuid, "cell": cell})
        self._cast(cell, "terminate_instance", {
            "instance": self._instance_ref(uuid), "delete_type": "delete"})

    def _up_instance_destroy_at_top(self, msg, kwargs):
        data, _ = intercell.obj_data(kwargs.get("instance"), "Instance")
        uuid = data.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            raise exception.MalformedMessage(reason="instance has no uuid")
        cell = self._child_of(msg)
        try:
            current = self.store.get_instance(uuid, include_deleted=True)
        except exception.InstanceNotFound:
            return None
        if current.cell_name and cell and current.cell_name != cell:
            LOG.info("[instance: %(uuid)s] Ignoring a destroy from %(cell)s: the instance "
                     "lives in %(ours)s", {"uuid": uuid, "cell": cell,
                                            "ours": current.cell_name})
            return None
        if self.store.destroy_instance(uuid):
            self.pending.forget(uuid)
            LOG.info("[instance: %s] Deleted", uuid)
            self._emit("deleted", instance=current, cell=cell)
        return None

    def _up_instance_fault_create_at_top(self, msg, kwargs):
        fault = kwargs.get("instance_fault")
        if not isinstance(fault, dict) or not isinstance(fault.get("instance_uuid"), str):
            raise exception.MalformedMessage(reason="instance_fault has no instance_uuid")
        entry = {"code": fault.get("code"), "message": str(fault.get("message") or ""),
                 "details": str(fault.get("details") or ""), "host": fault.get("host"),
                 "created_at": _parse_time(fault.get("created_at")) or utcnow()}
        if not self.store.add_fault(fault["instance_uuid"], entry):
            LOG.info("Fault for unknown instance %s dropped", fault["instance_uuid"])
        return None

    def _report_from(self, kwargs, what):
        name = kwargs.get("cell_name")
        value = kwargs.get(what)
        if not isinstance(name, str) or not isinstance(value, dict):
            raise exception.MalformedMessage(reason="%s needs cell_name and %s" % (
                "update_" + what, what))
        if name not in self._cells:
            LOG.warning("Ignoring %(what)s of unknown cell %(name)s",
                        {"what": what, "name": name})
            return None
        return name, value

    def _up_update_capacities(self, msg, kwargs):
        got = self._report_from(kwargs, "capacities")
        if got:
            now = self.clock()
            self.store.save_capacities(got[0], got[1], _from_epoch(now))
            self.pending.report_arrived(got[0], now)
            self._emit("capacities", cell=got[0], capacities=got[1])
        return None

    def _up_update_capabilities(self, msg, kwargs):
        got = self._report_from(kwargs, "capabilities")
        if got:
            self.store.save_capabilities(got[0], got[1], _from_epoch(self.clock()))
        return None

    # -- sending down -----------------------------------------------------------

    def _target(self, cell):
        return self.our_name + intercell.PATH_SEP + cell

    def _message(self, cell, method, kwargs, ctxt=None, need_response=False):
        return self.sender.new("targeted", method, kwargs, "down", ctxt=ctxt,
                               target_cell=self._target(cell), need_response=need_response)

    def _cast(self, cell, method, kwargs, ctxt=None):
        msg = self._message(cell, method, kwargs, ctxt)
        return self.sender.forward(msg, cell.split(intercell.PATH_SEP)[0])

    def announce(self):
        """Ask every child for its capabilities and capacities (at start)."""
        for cell in self.children():
            for method in ("announce_capabilities", "announce_capacities"):
                try:
                    self._cast(cell.name, method, {})
                except (exception.CellAgentError, transport_mod.PublishError, OSError) as e:
                    LOG.warning("Cannot reach cell %(cell)s: %(err)s",
                                {"cell": cell.name, "err": e})

    def _instance_ref(self, uuid, inst=None):
        data = {"uuid": uuid}
        if inst is not None:
            data.update(self._instance_data(inst))
        return intercell.obj_primitive("Instance", data)

    def _instance_data(self, inst):
        flavor = inst.flavor or {}
        return {
            "uuid": inst.uuid, "display_name": inst.name, "hostname": inst.name,
            "project_id": inst.project_id, "user_id": inst.user_id,
            "image_ref": inst.image_ref, "vm_state": inst.vm_state,
            "task_state": inst.task_state, "power_state": inst.power_state or 0,
            "memory_mb": flavor.get("memory_mb"), "vcpus": flavor.get("vcpus"),
            "root_gb": flavor.get("root_gb"), "ephemeral_gb": flavor.get("ephemeral_gb", 0),
            "metadata": {}, "cell_name": None, "locked": False,
            "created_at": intercell.format_obj_datetime(inst.created_at),
        }

    def _build_kwargs(self, insts, flavor, image):
        return {"build_inst_kwargs": {
            "instances": [intercell.obj_primitive("Instance", dict(
                self._instance_data(inst), launch_index=i)) for i, inst in enumerate(insts)],
            "image": image,
            "filter_properties": {"scheduler_hints": {}, "instance_type": intercell.obj_primitive(
                "Flavor", {"flavorid": flavor.flavorid or flavor.name, "name": flavor.name,
                           "memory_mb": flavor.memory_mb, "vcpus": flavor.vcpus,
                           "root_gb": flavor.root_gb, "ephemeral_gb": flavor.ephemeral_gb,
                           "swap": flavor.swap, "rxtx_factor": 1.0, "vcpu_weight": 0,
                           "disabled": False, "is_public": True, "extra_specs": {},
                           "description": None})},
            "admin_password": None, "injected_files": [], "requested_networks": None,
            "security_groups": ["default"], "block_device_mapping": None,
            "legacy_bdm": False,
        }}

    # -- scheduling -----------------------------------------------------------

    def cell_views(self, now=None):
        """A scheduler snapshot of every child cell."""
        now = self.clock() if now is None else now
        reports = self.store.cell_reports()
        usage = self.store.cell_usage()
        pending = self.pending.by_cell()
        views = []
        for cell in self.children():
            if cell.disabled:
                continue
            rep = reports.get(cell.name)
            used = usage.get(cell.name, {})
            cell_pending = pending.get(cell.name, [])
            pending_ram = sum(f.memory_mb * n for f, n in cell_pending)
            capacities = rep.capacities if rep else {}
            free = (capacities.get("ram_free") or {}).get("total_mb", 0) if capacities else 0
            cost = self._cost_of(cell, used)
            views.append(scheduler_mod.CellView(
                name=cell.name, tier=cell.tier, cost_per_vcpu_hour=cell.cost_per_vcpu_hour,
                flavor_costs=dict(cell.flavor_costs or {}), weight_offset=cell.weight_offset,
                weight_scale=cell.weight_scale, capacities=capacities or {},
                capabilities=(rep.capabilities if rep else {}) or {},
                last_seen=_epoch(rep.last_seen) if rep and rep.last_seen else None,
                ram_total_mb=max(0, free + used.get("ram_mb", 0) - pending_ram)
                if capacities else 0,
                used_instances=used.get("instances", 0), used_vcpus=used.get("vcpus", 0),
                used_cost_per_hour=cost,
                budget=scheduler_mod.Budget(cell.max_instances, cell.max_vcpus,
                                            cell.max_cost_per_hour),
                backoff_until=self.backoff.until(cell.name) or 0.0,
                pending=cell_pending, path=self._target(cell.name)))
        return views

    def _cost_of(self, cell, used):
        total = 0.0
        for name, count in (used.get("flavors") or {}).items():
            flavor = self.flavors.get(name)
            if name in (cell.flavor_costs or {}):
                total += cell.flavor_costs[name] * count
            elif flavor is not None:
                total += flavor.vcpus * cell.cost_per_vcpu_hour * count
        return total

    def _schedule(self, spec, exclude=()):
        """A Decision for ``spec``; raises NoValidCell."""
        now = self.clock()
        views = [v for v in self.cell_views(now) if v.name not in exclude]
        decision = self.scheduler.select(spec, views, now)
        LOG.info(decision.log_line())
        if decision.burst_changed:
            self._emit("burst", bursting=decision.bursting, decision=decision)
        return decision

    def create_servers(self, name, flavor, image, count=1, cell=None, ctxt=None):
        """Write the rows, choose a cell, cast the build. Returns the rows."""
        if flavor not in self.flavors:
            raise exception.InvalidRequest(reason="unknown flavor %s (known: %s)" % (
                flavor, ", ".join(sorted(self.flavors))))
        if not isinstance(count, int) or count < 1:
            raise exception.InvalidRequest(reason="count must be 1 or more")
        if not name:
            raise exception.InvalidRequest(reason="a server needs a name")
        if cell is not None and cell not in self._cells:
            raise exception.CellNotFound(cell_name=cell)
        fl = self.flavors[flavor]
        now = utcnow()
        request_id = "req-" + str(uuidlib.uuid4())
        insts = []
        for i in range(count):
            insts.append(TopInstance(
                uuid=str(uuidlib.uuid4()), name=name if count == 1 else "%s-%d" % (name, i + 1),
                cell_name=None, project_id="admin", user_id="admin",
                flavor={"name": fl.name, "memory_mb": fl.memory_mb, "vcpus": fl.vcpus,
                        "root_gb": fl.root_gb, "ephemeral_gb": fl.ephemeral_gb,
                        "flavorid": fl.flavorid},
                image_ref=image, vm_state="building", task_state="scheduling",
                power_state=0, created_at=now, updated_at=now, request_id=request_id,
                acked=False, build_attempts=0, tried_cells=[]))
        self.store.add_instances(insts)
        spec = scheduler_mod.RequestSpec(
            flavor=fl, num_instances=count, image={"id": image, "name": image, "properties": {}},
            hints={"target_cell": cell} if cell else {},
            instance_uuids=[i.uuid for i in insts], request_id=request_id)
        self._place(insts, spec, ctxt)
        return [self.store.get_instance(i.uuid, include_deleted=True) for i in insts]

    def _place(self, insts, spec, ctxt=None, exclude=()):
        with self._schedule_lock:
            try:
                decision = self._schedule(spec, exclude)
            except exception.NoValidCell as e:
                LOG.warning("%(req)s: %(err)s", {"req": spec.request_id, "err": e.message})
                for inst in insts:
                    self._fail_build(inst, e.message)
                return None
            for inst in insts:
                self.pending.add(inst.uuid, decision.cell, spec.flavor)
            deadline = _from_epoch(self.clock() + self.build_ack_timeout)
            for inst in insts:
                tried = list(inst.tried_cells or []) + [decision.cell]
                self.store.update_instance(inst.uuid, cell_name=decision.cell, acked=False,
                                           build_attempts=1, build_deadline=deadline,
                                           tried_cells=tried)
        fresh = [self.store.get_instance(i.uuid, include_deleted=True) for i in insts]
        self._emit("placed", cell=decision.cell, instances=fresh, decision=decision)
        self._send_build(decision.cell, fresh, spec.flavor, ctxt)
        return decision

    def _send_build(self, cell, insts, flavor, ctxt=None):
        image = {"id": insts[0].image_ref, "name": insts[0].image_ref, "properties": {}}
        try:
            self._cast(cell, "build_instances", self._build_kwargs(insts, flavor, image), ctxt)
        except (exception.CellAgentError, transport_mod.PublishError, OSError) as e:
            # The deadline re-sends it; the failure is logged, not fatal.
            LOG.warning("Cannot send the build of %(n)d instance(s) to %(cell)s: %(err)s",
                        {"n": len(insts), "cell": cell, "err": e})

    def _fail_build(self, inst, reason):
        self.pending.forget(inst.uuid)
        self.store.update_instance(inst.uuid, vm_state="error", task_state=None,
                                   build_deadline=None)
        self.store.add_fault(inst.uuid, {"code": 500, "message": reason, "details": "",
                                         "host": None, "created_at": utcnow()})
        self._emit("instance", instance=inst, cell=None, fields={"vm_state": "error"})

    def check_builds(self):
        """Re-send or reschedule builds without acknowledgement (periodic)."""
        due = self.store.due_builds(_from_epoch(self.clock()))
        groups = collections.defaultdict(list)
        for inst in due:
            groups[(inst.cell_name, inst.request_id, inst.build_attempts)].append(inst)
        for (cell, _req, attempts), insts in groups.items():
            flavor = flavor_from(insts[0].flavor)
            if attempts < self.build_retries:
                LOG.warning("Cell %(cell)s did not acknowledge the build of %(uuids)s within "
                            "%(t).0f s: sending it again (%(n)d/%(max)d)",
                            {"cell": cell, "uuids": ", ".join(i.uuid for i in insts),
                             "t": self.build_ack_timeout, "n": attempts + 1,
                             "max": self.build_retries})
                deadline = _from_epoch(self.clock() + self.build_ack_timeout)
                for inst in insts:
                    self.store.update_instance(inst.uuid, build_attempts=attempts + 1,
                                               build_deadline=deadline)
                self._send_build(cell, insts, flavor)
                continue
            until = self.backoff.failed(cell, self.clock())
            self.store.set_backoff(cell, _from_epoch(until), self.backoff.failures(cell))
            tried = list(insts[0].tried_cells or [])
            if len(tried) > self.max_reschedules:
                reason = ("No cell acknowledged the build: tried %s, %d time(s) each"
                          % (", ".join(tried), self.build_retries))
                for inst in insts:
                    self._fail_build(inst, reason)
                continue
            LOG.warning("Cell %(cell)s never acknowledged the build of %(uuids)s: backed off "
                        "and rescheduling", {"cell": cell,
                                             "uuids": ", ".join(i.uuid for i in insts)})
            for inst in insts:
                self.pending.forget(inst.uuid)
            spec = scheduler_mod.RequestSpec(
                flavor=flavor, num_instances=len(insts),
                image={"id": insts[0].image_ref, "name": insts[0].image_ref, "properties": {}},
                hints={}, instance_uuids=[i.uuid for i in insts],
                request_id=insts[0].request_id or "")
            self._place(insts, spec, exclude=tried)

    # -- actions on servers ---------------------------------------------------

    def find(self, server):
        return self.store.find_instance(server)

    def delete_server(self, server):
        inst = self.find(server)
        if not inst.cell_name:
            # Never placed (or its cell unknown): everywhere, and here.
            msg = self.sender.new("broadcast", "instance_delete_everywhere", {
                "instance": self._instance_ref(inst.uuid, inst), "delete_type": "delete"},
                "down")
            for rec in self.neighbours.children():
                self.sender.send_to(rec, intercell.forward_copy(msg))
            self.store.destroy_instance(inst.uuid)
            self.pending.forget(inst.uuid)
            self._emit("deleted", instance=inst, cell=None)
            return self.store.get_instance(inst.uuid, include_deleted=True)
        self.store.update_instance(inst.uuid, task_state="deleting", build_deadline=None)
        self._cast(inst.cell_name, "terminate_instance", {
            "instance": self._instance_ref(inst.uuid, inst), "delete_type": "delete"})
        return self.store.get_instance(inst.uuid, include_deleted=True)

    def _action(self, server, method, task_state, kwargs):
        inst = self.find(server)
        if not inst.cell_name:
            raise exception.InvalidRequest(
                reason="server %s is not in a cell yet (%s)" % (inst.name, inst.vm_state))
        self.store.update_instance(inst.uuid, task_state=task_state)
        kwargs = dict(kwargs, instance=self._instance_ref(inst.uuid, inst))
        self._cast(inst.cell_name, method, kwargs)
        return self.store.get_instance(inst.uuid)

    def reboot_server(self, server, hard=False):
        kind = "HARD" if hard else "SOFT"
        return self._action(server, "reboot_instance", _ACTION_TASK_STATE["reboot_" + kind],
                            {"reboot_type": kind})

    def stop_server(self, server):
        return self._action(server, "stop_instance", _ACTION_TASK_STATE["stop"],
                            {"clean_shutdown": True})

    def start_server(self, server):
        return self._action(server, "start_instance", _ACTION_TASK_STATE["start"], {})

    # The other stock actions, routed like reboot: (cells method, task_state).
    ACTIONS = {
        "pause": ("pause_instance", "pausing"),
        "unpause": ("unpause_instance", "unpausing"),
        "suspend": ("suspend_instance", "suspending"),
        "resume": ("resume_instance", "resuming"),
        "resize": ("resize_instance", "resize_prep"),
        "resize-confirm": ("confirm_resize", None),
        "resize-revert": ("revert_resize", "resize_reverting"),
        "rebuild": ("rebuild_instance", "rebuilding"),
        "snapshot": ("snapshot_instance", "image_snapshot_pending"),
    }

    def server_action(self, server, action, flavor=None, image=None, name=None):
        """pause, unpause, suspend, resume, resize (``flavor``), resize-confirm,
        resize-revert, rebuild (``image``, default the current one), snapshot."""
        if action not in self.ACTIONS:
            raise exception.InvalidRequest(reason="unknown action %s (known: %s)" % (
                action, ", ".join(sorted(self.ACTIONS))))
        method, task_state = self.ACTIONS[action]
        kwargs = {}
        if action == "resize":
            if flavor not in self.flavors:
                raise exception.InvalidRequest(reason="unknown flavor %s (known: %s)" % (
                    flavor, ", ".join(sorted(self.flavors))))
            fl = self.flavors[flavor]
            kwargs = {"flavor": {"flavorid": fl.flavorid or fl.name, "name": fl.name},
                      "extra_instance_updates": {}, "clean_shutdown": True}
        elif action == "rebuild":
            inst = self.find(server)
            kwargs = {"image_href": image or inst.image_ref, "admin_password": None,
                      "files_to_inject": [], "preserve_ephemeral": False, "kwargs": {}}
        elif action == "snapshot":
            kwargs = {"image_id": name or str(uuidlib.uuid4())}
        inst = self._action(server, method, task_state, kwargs)
        if action == "resize":
            self.store.update_instance(inst.uuid, flavor={
                "name": fl.name, "memory_mb": fl.memory_mb, "vcpus": fl.vcpus,
                "root_gb": fl.root_gb, "ephemeral_gb": fl.ephemeral_gb,
                "flavorid": fl.flavorid})
            inst = self.store.get_instance(inst.uuid)
        return inst

    def console_log(self, server, length=None):
        inst = self.find(server)
        if not inst.cell_name:
            raise exception.InvalidRequest(reason="server %s is not in a cell yet" % inst.name)
        msg = self._message(inst.cell_name, "run_compute_api_method", {
            "method_info": {"method": "get_console_output",
                            "method_args": [inst.uuid, length], "method_kwargs": {}}},
            need_response=True)
        responses = self.router.call(msg)
        resp = responses[0]
        if resp.failure:
            info = resp.failure_info() or {}
            raise exception.CellCallFailed(cell_name=inst.cell_name,
                                           reason=info.get("message") or "failed")
        return resp.value

    # -- periodic ---------------------------------------------------------------

    def tick(self):
        self.reload_cells()
        self.check_builds()

    def purge(self, older_than_seconds):
        return self.store.purge_deleted(utcnow() - datetime.timedelta(
            seconds=older_than_seconds))

    # -- views for people ---------------------------------------------------------

    def server_dict(self, inst, now=None):
        now = now or utcnow()
        cell = self._cells.get(inst.cell_name or "")
        return {
            "uuid": inst.uuid, "name": inst.name, "cell": inst.cell_name,
            "tier": cell.tier if cell else None, "vm_state": inst.vm_state,
            "task_state": inst.task_state, "power_state": inst.power_state,
            "flavor": (inst.flavor or {}).get("name"), "image": inst.image_ref,
            "access_ip_v4": inst.access_ip_v4, "addresses": list(inst.addresses or []),
            "created_at": _iso(inst.created_at), "updated_at": _iso(inst.updated_at),
            "launched_at": _iso(inst.launched_at),
            "age_seconds": (now - inst.created_at).total_seconds() if inst.created_at else None,
            "fault": ({k: inst.fault.get(k) for k in ("code", "message", "details")}
                      if inst.fault else None),
        }

    def cell_dicts(self):
        now = self.clock()
        views = {v.name: v for v in self.cell_views(now)}
        reports = self.store.cell_reports()
        usage = self.store.cell_usage()
        out = []
        for cell in sorted(self._cells.values(), key=lambda c: c.name):
            rep = reports.get(cell.name)
            view = views.get(cell.name)
            used = usage.get(cell.name, {})
            caps = (rep.capacities if rep else {}) or {}
            last_seen = _epoch(rep.last_seen) if rep and rep.last_seen else None
            until = self.backoff.until(cell.name)
            out.append({
                "name": cell.name, "tier": cell.tier, "is_parent": cell.is_parent,
                "transport_url": transport_mod.mask_url(cell.transport_url),
                "disabled": cell.disabled, "cost_per_vcpu_hour": cell.cost_per_vcpu_hour,
                "budget": {"max_instances": cell.max_instances, "max_vcpus": cell.max_vcpus,
                           "max_cost_per_hour": cell.max_cost_per_hour},
                "used": {"instances": used.get("instances", 0), "vcpus": used.get("vcpus", 0),
                         "cost_per_hour": round(self._cost_of(cell, used), 4)},
                "free_units": ({f.name: view.free_units(f) for f in self.flavors.values()}
                               if view is not None and caps else {}),
                "ram_free_mb": (caps.get("ram_free") or {}).get("total_mb"),
                "disk_free_mb": (caps.get("disk_free") or {}).get("total_mb"),
                "mute": last_seen is None or now - last_seen > self.mute_interval,
                "last_seen": _iso(rep.last_seen) if rep else None,
                "last_report_age_seconds": (now - last_seen) if last_seen else None,
                "backoff_until": _iso(_from_epoch(until)) if until and until > now else None,
                "capabilities": (rep.capabilities if rep else {}) or {},
            })
        return out


def _epoch(dt):
    return dt.replace(tzinfo=datetime.timezone.utc).timestamp()


def _from_epoch(ts):
    if not ts:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).replace(tzinfo=None)


def _iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ") if dt else None


class TopAPI:
    """The client RPC endpoint (topic ``[top] topic``); see docs/top.md."""

    def __init__(self, manager):
        import oslo_messaging
        self.target = oslo_messaging.Target(version="1.0")
        self._m = manager

    def server_create(self, ctxt, name, flavor, image, count=1, cell=None):
        rows = self._m.create_servers(name, flavor, image, count=count, cell=cell)
        return [self._m.server_dict(r) for r in rows]

    def server_list(self, ctxt, deleted=False):
        now = utcnow()
        return [self._m.server_dict(r, now)
                for r in self._m.store.list_instances(include_deleted=deleted)]

    def server_show(self, ctxt, server):
        return self._m.server_dict(self._m.find(server))

    def server_delete(self, ctxt, server):
        return self._m.server_dict(self._m.delete_server(server))

    def server_reboot(self, ctxt, server, hard=False):
        return self._m.server_dict(self._m.reboot_server(server, hard=hard))

    def server_stop(self, ctxt, server):
        return self._m.server_dict(self._m.stop_server(server))

    def server_start(self, ctxt, server):
        return self._m.server_dict(self._m.start_server(server))

    def server_action(self, ctxt, server, action, flavor=None, image=None, name=None):
        return self._m.server_dict(self._m.server_action(server, action, flavor=flavor,
                                                         image=image, name=name))

    def server_console_log(self, ctxt, server, length=None):
        return self._m.console_log(server, length)

    def cell_list(self, ctxt):
        return self._m.cell_dicts()

    def cell_show(self, ctxt, name):
        for cell in self._m.cell_dicts():
            if cell["name"] == name:
                return cell
        raise exception.CellNotFound(cell_name=name)
