"""Reconciler: the provider and this cell's records, compared both ways.

Once at start (after the journal replay) and every ``[backend]
reconcile_interval`` seconds, one ``backend.list_instances()`` (every
instance this cell owns, by tag or metadata) is compared with the store:

* **orphans**: instances the provider has, owned by this cell, with no live
  record (a record lost with a database, an instance launched by an agent
  that crashed before it wrote anything, a copy left by a rebuild). After
  ``orphan_grace`` seconds of being seen as orphans they are terminated
  (the default: nobody manages them and they cost money), adopted (recorded
  and reported to the top as servers of this cell), or only logged.
* **vanished**: settled records whose instance the provider no longer has
  (deleted out of band). The top is told with ``instance_destroy_at_top``
  (default) or the server is set to ERROR with a fault.
* **drifted**: settled records whose provider state changed out of band
  (stopped or started in the provider's console, or failed). Every drifted
  instance is reported in the same pass, not one per run as cells v1's heal
  task did.

Instances with work in progress (queued, running, or waiting on the provider)
are left alone: the operation in flight owns them.
"""

import logging
import threading
import time

from cellagent import exception
from cellagent.objects import InstanceRecord, InstanceRef, InstanceState, VmState
from cellagent.rpc import intercell

LOG = logging.getLogger(__name__)

_SETTLED = frozenset({InstanceState.RUNNING, InstanceState.STOPPED, InstanceState.PAUSED,
                      InstanceState.SUSPENDED, InstanceState.ERROR})


class Reconciler:
    def __init__(self, manager, interval=60.0, orphan_grace=300.0, orphan_action="terminate",
                 vanished_action="destroy", clock=time.monotonic):
        self.manager = manager
        self.interval = interval
        self.orphan_grace = orphan_grace
        self.orphan_action = orphan_action
        self.vanished_action = vanished_action
        self.clock = clock
        self._orphans = {}          # instance uuid -> first seen (clock)
        self._stop = threading.Event()
        self._thread = None
        self.last = {}              # figures of the last pass, for logs and tests

    def start(self):
        if self.interval <= 0:
            return
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.run_once()
            except exception.BackendError as e:
                LOG.warning("Reconciliation skipped: %s", e.message)
            except Exception:  # noqa: B902 - the next pass may do better
                LOG.exception("Reconciliation failed")
            self._stop.wait(self.interval)

    def run_once(self):
        """One comparison; returns ``{orphans, adopted, terminated, vanished, drifted}``."""
        m = self.manager
        now = self.clock()
        infos = m.backend.list_instances()
        by_uuid = {}
        for info in infos:
            if info.instance_uuid:
                by_uuid.setdefault(info.instance_uuid, []).append(info)
        # (backend id, state) per uuid; whole records only for those acted on.
        records = {uuid: (bid, state) for uuid, bid, state in m.store.list_instance_states()}
        figures = dict.fromkeys(("orphans", "adopted", "terminated", "vanished", "drifted"), 0)

        for uuid, found in by_uuid.items():
            rec = records.get(uuid)
            current = [i for i in found if rec is not None and i.backend_id == rec[0]]
            stale = [i for i in found if i not in current
                     and i.state not in (InstanceState.DELETING, InstanceState.DELETED)]
            if rec is not None and not rec[0]:
                continue                       # launch in flight: its spawn owns it
            if not stale or m.work.is_busy(uuid):
                self._orphans.pop(uuid, None)
                continue
            figures["orphans"] += len(stale)
            first = self._orphans.setdefault(uuid, now)
            if now - first < self.orphan_grace:
                continue
            self._orphans.pop(uuid, None)
            if rec is None and self.orphan_action == "adopt" and len(stale) == 1:
                self._adopt(stale[0])
                figures["adopted"] += 1
            elif self.orphan_action in ("terminate", "adopt"):
                for info in stale:
                    self._terminate(info)
                    figures["terminated"] += 1
            else:
                LOG.warning("[instance: %(uuid)s] Orphan %(bids)s left alone (orphan_action "
                            "ignore)", {"uuid": uuid,
                                        "bids": ", ".join(i.backend_id for i in stale)})
        for uuid in [u for u in self._orphans if u not in by_uuid]:
            del self._orphans[uuid]

        for uuid, (backend_id, state) in records.items():
            if not backend_id or state not in _SETTLED or m.work.is_busy(uuid):
                continue
            current = [i for i in by_uuid.get(uuid, ()) if i.backend_id == backend_id]
            vanished = not current or current[0].state == InstanceState.DELETED
            if not vanished and not (current[0].state in _SETTLED
                                     and current[0].state != state):
                continue
            rec = m.store.get_instance(uuid)
            if rec is None or rec.deleted or rec.backend_id != backend_id:
                continue                       # changed since the listing
            if vanished:
                if self._vanished(rec):
                    figures["vanished"] += 1
                continue
            if current[0].state != rec.state:
                self._drifted(rec, current[0])
                figures["drifted"] += 1
        if any(figures.values()):
            LOG.info("Reconciliation: %s", ", ".join(
                "%s %d" % (k, v) for k, v in figures.items() if v))
        self.last = figures
        return figures

    def _terminate(self, info):
        LOG.warning("[instance: %(uuid)s] Terminating orphan %(bid)s: this cell owns it but "
                    "has no record of it", {"uuid": info.instance_uuid,
                                             "bid": info.backend_id})
        try:
            self.manager.backend.destroy(InstanceRef(info.instance_uuid, info.backend_id, ""))
        except exception.BackendError as e:
            LOG.warning("[instance: %(uuid)s] Could not terminate orphan %(bid)s: %(err)s",
                        {"uuid": info.instance_uuid, "bid": info.backend_id,
                         "err": e.message})
        self.manager._changed()

    def _adopt(self, info):
        m = self.manager
        LOG.warning("[instance: %(uuid)s] Adopting orphan %(bid)s", {
            "uuid": info.instance_uuid, "bid": info.backend_id})
        rec = InstanceRecord(instance_uuid=info.instance_uuid, state=info.state,
                             backend_id=info.backend_id, launch_token="",
                             instance={"uuid": info.instance_uuid,
                                       "display_name": info.instance_uuid})
        m.store.put_instance(rec)
        addresses = [a.__dict__ if hasattr(a, "__dict__") else a for a in info.addresses]
        fields = m._settled_fields(info)
        fields.update(m._network_fields(rec, addresses), host=m.host, node=m.node)
        m._report(rec, sorted(set(fields) | {"display_name"}), intercell.admin_context(),
                  **fields)
        m._changed()

    def _vanished(self, rec):
        m = self.manager
        ctxt = intercell.admin_context()
        if self.vanished_action == "error":
            if rec.state == InstanceState.ERROR:
                return False
            reason = "The instance vanished from the provider"
            LOG.warning("[instance: %s] %s: set to ERROR", rec.instance_uuid, reason)
            m._fault(rec, reason, ctxt)
            m._report(rec, ["task_state", "vm_state"], ctxt, vm_state=VmState.ERROR,
                      task_state=None)
            m.store.update_instance(rec.instance_uuid, state=InstanceState.ERROR,
                                    fault=reason)
            return True
        LOG.warning("[instance: %s] Vanished from the provider: telling the top",
                    rec.instance_uuid)
        m.store.delete_instance(rec.instance_uuid)
        m.parent.instance_destroy_at_top(
            intercell.obj_primitive("Instance", {"uuid": rec.instance_uuid}), ctxt)
        m._changed()
        return True

    def _drifted(self, rec, info):
        m = self.manager
        LOG.info("[instance: %(uuid)s] Provider says %(now)s, the record %(was)s: reporting",
                 {"uuid": rec.instance_uuid, "now": info.state.value, "was": rec.state.value})
        ctxt = intercell.admin_context()
        fields = m._settled_fields(info)
        if info.state == InstanceState.ERROR:
            m._fault(rec, info.fault or "The provider reports the instance failed", ctxt)
        rec.state = info.state
        m._report(rec, sorted(fields), ctxt, **fields)
        m.store.update_instance(rec.instance_uuid, state=info.state)
        m._changed()
