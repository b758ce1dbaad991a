"""CellManager: what a child cell does with each inter-cell method.

Journal first, then the backend. For every method that changes something
the first act is ``store.begin_request`` with the message uuid: a message
seen before is dropped with a warning (a redelivery, or a re-send: the
journal is the durability point, see ``Intake`` for how the consumer
acknowledges only what it holds). Builds and deletes
also claim ``(instance uuid, operation)`` so that a re-sent build (new
message uuid, same instance) or a second delete is dropped too. A journal
entry is finished only once the last report it causes was confirmed by the
parent's broker; anything unfinished is replayed at the next start, and the
backend's idempotent ``spawn`` makes the replay safe.

Reports to the top follow what a stock Stein child sends (section 3.5 and
3.8 of the protocol reference): an ``instance_update_at_top`` right away
(vm_state ``building``), one per state change with the changed fields in
``nova_object.changes`` and the whole instance in ``nova_object.data``,
ending ``active`` with the addresses in ``info_cache.network_info`` and
``access_ip_v4``, or ``error`` plus ``instance_fault_create_at_top``; a delete
ends with ``instance_destroy_at_top``.
"""

import contextlib
import datetime
import logging
import threading
import time

from cellagent import exception
from cellagent import jsonutils
from cellagent.objects import (BuildRequest, Flavor, InstanceRecord, InstanceRef,
                               InstanceState, JournalStatus, PowerState, RebootKind,
                               TaskState, VmState)
from cellagent.rpc import intercell
from cellagent.workqueue import CANCELLED, TIMED_OUT, Later, Transition

LOG = logging.getLogger(__name__)

# Fields of the Instance this cell owns and reports (sync_instances sends them).
OWNED_FIELDS = ("vm_state", "task_state", "power_state", "host", "node",
                "launched_at", "access_ip_v4", "info_cache")
# Never taken from instance_update_from_api (nova's child ignores them too).
API_IGNORED = frozenset({"vm_state", "task_state", "metadata", "system_metadata",
                         "id", "cell_name", "info_cache", "flavor"})
# Stock child methods this agent knows but no backend supports yet.
UNSUPPORTED = frozenset({
    "live_migrate_instance", "reset_network", "inject_network_info", "backup_instance",
    "set_admin_password",
})
# Methods that need a backend capability; without it they get a fault, as
# UNSUPPORTED ones do.
NEEDS_CAPABILITY = {
    "pause_instance": "supports_pause", "unpause_instance": "supports_pause",
    "suspend_instance": "supports_suspend", "resume_instance": "supports_suspend",
    "resize_instance": "supports_resize", "revert_resize": "supports_resize",
    "snapshot_instance": "supports_snapshot",
}
# Fields a Stein top resets before saving an update from a child (3.5).
TOP_RESETS = frozenset({"id", "security_groups", "volumes", "cell_name", "name",
                        "metadata"})
SECRET_KWARGS = ("admin_password", "new_pass")


def _instance_uuid(value):
    data, _ = intercell.obj_data(value, "Instance")
    uuid = data.get("uuid")
    if not isinstance(uuid, str) or not uuid:
        raise exception.MalformedMessage(reason="instance has no uuid")
    return uuid


def scrub(msg):
    """The message as stored in the journal: no passwords, no token.

    Copies only the dicts it changes (the live message keeps its secrets for
    the backend) and serializes once: this runs for every journaled message.
    """
    data = msg.to_dict()
    data["ctxt"] = dict(data["ctxt"], auth_token=None)
    kwargs = data["method_kwargs"] = dict(data["method_kwargs"])
    if isinstance(kwargs.get("build_inst_kwargs"), dict):
        kwargs["build_inst_kwargs"] = dict(kwargs["build_inst_kwargs"])
    for holder in (kwargs, kwargs.get("build_inst_kwargs")):
        if isinstance(holder, dict):
            for key in SECRET_KWARGS:
                if holder.get(key):
                    holder[key] = "***"
    return jsonutils.dumps(data)


def message_from_payload(payload, entry_id="?"):
    """Rebuild the Message stored by ``scrub`` (no routing extension)."""
    try:
        data = jsonutils.loads(payload)
        return intercell.Message(**{k: data.get(k) for k in (
            "message_type", "ctxt", "method_name", "method_kwargs", "direction",
            "routing_path", "hop_count", "max_hop_count", "need_response", "fanout",
            "uuid", "target_cell", "response_uuid")})
    except (TypeError, ValueError) as e:
        raise exception.JournalCorrupt(entry=entry_id, reason=str(e))


class Job:
    """One journal entry's outstanding work; finishes the entry when done."""

    def __init__(self, store, entry_id, release=None):
        self._store = store
        self._release = release
        self.entry_id = entry_id
        self._lock = threading.Lock()
        self._pending = 0
        self._sealed = False
        self._finished = False
        self._errors = []
        self._operations = []
        self._abandoned = False

    def part(self):
        with self._lock:
            self._pending += 1
        return self._done

    def seal(self):
        with self._lock:
            self._sealed = True
        self._maybe_finish()

    def cancel(self):
        """The message was not stored after all: free its slot, write nothing."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        if self._release is not None:
            self._release()

    def _done(self, error=None, abandon=False, operation=None):
        """One part is over; ``operation`` is the claim it finished, if any."""
        with self._lock:
            self._pending -= 1
            if error:
                self._errors.append(error)
            if abandon:
                self._abandoned = True
            elif operation is not None:
                self._operations.append(operation)
        self._maybe_finish()

    def _maybe_finish(self):
        with self._lock:
            if not self._sealed or self._pending or self._finished:
                return
            self._finished = True
            if self._release is not None:
                self._release()
            if self._abandoned:
                # A report never reached the parent: leave the entry
                # unfinished, the next start replays it.
                return
            status = JournalStatus.FAILED if self._errors else JournalStatus.DONE
            error = "; ".join(self._errors)
        # The claims finished by this message go in the same write. Not
        # waited for: this runs on a publisher's confirm thread, and a crash
        # before the write replays the entry (its claims make that a no-op).
        self._store.finish_request_later(self.entry_id, status, error, self._operations)


class Intake:
    """``CellManager.intake()``: messages handled as one store batch.

    A consumer that acknowledges messages only once they are journaled
    handles a burst of them on its own thread inside this context: their
    journal entries, claims and records go into one transaction
    (``Store.batch``), and the backend work they queue is held back until
    that transaction is committed (journal first, then the backend). Where
    handling would wait for something another thread may only do after a
    write of its own (a full ``max_pending_operations``, an instance lock),
    what was written so far is committed first.

    Leaving the block commits. It raises ``StateError`` when a commit
    failed: the messages of the block must then be received again (the
    ones that were stored are dropped as duplicates).
    """

    CHECKPOINT_EVERY = 32

    def __init__(self, manager):
        self._manager = manager
        self._scope = None
        self._store_batch = None
        self._work = []
        self._jobs = []
        self._failed = None
        self._since = 0

    def __enter__(self):
        self._scope = self._manager.store.batch()
        self._store_batch = self._scope.__enter__()
        self._manager._local.intake = self
        return self

    def __exit__(self, etype, exc, tb):
        self._manager._local.intake = None
        failed = self._failed
        if etype is None and failed is not None:
            etype, exc, tb = type(failed), failed, failed.__traceback__
        try:
            self._scope.__exit__(etype, exc, tb)
        except exception.StateError:
            self._abort()
            raise
        if etype is not None:
            self._abort()
            if failed is not None:
                raise failed
            return False
        self._release()
        return False

    def defer(self, key, fn, preempt):
        self._work.append((key, fn, preempt))

    def track(self, job):
        self._jobs.append(job)

    @property
    def failed(self):
        """The StateError of a failed commit: the rest of the block is wasted."""
        return self._failed

    def checkpoint(self):
        """Between two messages: commit if other threads wait to write.

        Not after every message: a commit and a hand-over of the write lock
        cost about what one message's writes do.
        """
        self._since += 1
        if self._since >= self.CHECKPOINT_EVERY and self._failed is None \
                and self._store_batch.waiting():
            self.flush()

    def flush(self):
        """Commit what was written so far and let its work go."""
        if self._failed is not None:
            raise self._failed
        try:
            self._store_batch.commit()
        except exception.StateError as e:
            self._failed = e
            self._abort()
            raise
        self._release()

    def _release(self):
        self._since = 0
        work, self._work, self._jobs = self._work, [], []
        for key, fn, preempt in work:
            self._manager.work.submit(key, fn, preempt=preempt)

    def _abort(self):
        jobs, self._work, self._jobs = self._jobs, [], []
        for job in jobs:
            job.cancel()


class CellManager:
    """Child-side handler of every inter-cell method (see module docstring)."""

    def __init__(self, cell_name, host, store, backend, parent_api, workqueue,
                 reporter=None, flavors=None, transition_timeout=600,
                 retries=3, retry_delay=1.0, max_inflight=None):
        self.cell_name = cell_name
        self.host = host
        self.node = "%s-%s" % (backend.name, host)
        self.store = store
        self.backend = backend
        self.parent = parent_api
        self.work = workqueue
        self.reporter = reporter
        self.flavors = flavors
        self.transition_timeout = transition_timeout
        self.retries = retries
        self.retry_delay = retry_delay
        self._locks = {}
        self._locks_lock = threading.Lock()
        self._local = threading.local()     # .intake: the thread's open Intake
        # Flow control: oslo.messaging acknowledges before dispatch, so the
        # only way to leave a backlog on the broker is to block the RPC
        # thread while max_inflight journal entries are unfinished (their
        # messages, records and reports held in memory).
        self._inflight = threading.Semaphore(max_inflight) if max_inflight else None
        self._targeted = {
            "build_instances": (self.build_instances, True),
            "terminate_instance": (self.terminate_instance, True),
            "soft_delete_instance": (self.soft_delete_instance, True),
            "reboot_instance": (self.reboot_instance, True),
            "stop_instance": (self.stop_instance, True),
            "start_instance": (self.start_instance, True),
            "instance_update_from_api": (self.instance_update_from_api, True),
            "pause_instance": (self.pause_instance, True),
            "unpause_instance": (self.unpause_instance, True),
            "suspend_instance": (self.suspend_instance, True),
            "resume_instance": (self.resume_instance, True),
            "resize_instance": (self.resize_instance, True),
            "confirm_resize": (self.confirm_resize, True),
            "revert_resize": (self.revert_resize, True),
            "rebuild_instance": (self.rebuild_instance, True),
            "snapshot_instance": (self.snapshot_instance, True),
            "run_compute_api_method": (self.run_compute_api_method, False),
            "announce_capabilities": (self.announce_capabilities, False),
            "announce_capacities": (self.announce_capacities, False),
            "get_migrations": (self.get_migrations, False),
            "task_log_get_all": (self.task_log_get_all, False),
        }
        self._broadcast = {
            "instance_delete_everywhere": (self.instance_delete_everywhere, True),
            "sync_instances": (self.sync_instances, False),
            "service_get_all": (self.service_get_all, False),
            "compute_node_get_all": (self.compute_node_get_all, False),
            "compute_node_stats": (self.compute_node_stats, False),
            "task_log_get_all": (self.task_log_get_all, False),
            "get_migrations": (self.get_migrations, False),
        }

    # -- entry from the router ---------------------------------------------

    def intake(self):
        """Handle the next messages of this thread as one batch (see Intake)."""
        return Intake(self)

    def quick(self, msg):
        """True if ``handle(msg)`` only journals, queues work and sends.

        Such a message may be handled inside an ``intake()`` on a
        consumer's own thread; anything else (reads answered at once, which
        may call the backend) is better run elsewhere.
        """
        if msg.message_type == "broadcast" and msg.direction == "up":
            return True
        table = self._targeted if msg.message_type == "targeted" else self._broadcast
        entry = table.get(msg.method_name)
        return entry is not None and entry[1]

    def handle(self, msg):
        if msg.message_type == "broadcast" and msg.direction == "up":
            # Up-broadcasts act only at the top; the router forwarded it.
            return None
        table = self._targeted if msg.message_type == "targeted" else self._broadcast
        entry = table.get(msg.method_name)
        if entry is None:
            if msg.method_name in UNSUPPORTED:
                return self._unsupported(msg)
            raise exception.UnknownMethod(message_type=msg.message_type,
                                          method_name=msg.method_name)
        method, journaled = entry
        if not isinstance(msg.method_kwargs, dict):
            raise exception.MalformedMessage(reason="method_kwargs is not an object")
        needed = NEEDS_CAPABILITY.get(msg.method_name)
        if needed and not self.backend.capabilities.get(needed):
            return self._unsupported(msg)
        if not journaled:
            return method(msg, None)
        instance_uuid = self._journal_instance(msg)
        journal = self.store.begin_request(msg.uuid, msg.method_name, instance_uuid, scrub(msg),
                                           start=True)
        if journal is None:
            LOG.warning("Dropped duplicate message %(uuid)s (%(method)s)",
                        {"uuid": msg.uuid, "method": msg.method_name})
            return None
        return self._execute(journal.id, msg, started=True)

    def _journal_instance(self, msg):
        kwargs = msg.method_kwargs
        try:
            if "instance" in kwargs:
                return _instance_uuid(kwargs["instance"])
            first = kwargs["build_inst_kwargs"]["instances"][0]
            return _instance_uuid(first)
        except (KeyError, IndexError, TypeError, exception.MessageError):
            return None

    def _execute(self, entry_id, msg, started=False):
        if not started:
            self.store.start_attempt(entry_id)
        release = None
        if self._inflight is not None:
            if not self._inflight.acquire(blocking=False):
                # The slots free up as entries finish, which takes a write.
                self._flush()
                self._inflight.acquire()
            release = self._inflight.release
        job = Job(self.store, entry_id, release)
        intake = getattr(self._local, "intake", None)
        if intake is not None:
            intake.track(job)
        method = (self._targeted if msg.message_type == "targeted"
                  else self._broadcast)[msg.method_name][0]
        try:
            return method(msg, job)
        except exception.CellAgentError as e:
            job.part()(error=e.message)
            raise
        finally:
            job.seal()

    def recover(self):
        """Replay every unfinished journal entry (called once at start)."""
        entries = self.store.unfinished()
        if entries:
            LOG.info("Replaying %d unfinished journal entries", len(entries))
        for entry in entries:
            try:
                msg = message_from_payload(entry.payload, entry.id)
                self._execute(entry.id, msg)
            except exception.CellAgentError as e:
                LOG.error("Journal entry %(id)s (%(method)s) failed on replay: %(err)s",
                          {"id": entry.id, "method": entry.method, "err": e.message})
                self.store.finish_request(entry.id, JournalStatus.FAILED, e.message)
        return len(entries)

    # -- helpers -----------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, uuid):
        lock = self._acquire(uuid)
        try:
            yield
        finally:
            lock.release()

    def _acquire(self, uuid):
        """Take the instance's report lock; returns it (release it when done)."""
        with self._locks_lock:
            lock = self._locks.get(uuid)
            if lock is None:
                lock = self._locks[uuid] = threading.Lock()
        if not lock.acquire(blocking=False):
            # Its holder may be waiting to write: commit our batch first.
            self._flush()
            lock.acquire()
        return lock

    def _flush(self):
        intake = getattr(self._local, "intake", None)
        if intake is not None:
            intake.flush()

    def _submit(self, key, fn, preempt=False):
        """Queue backend work; inside an intake, once its batch is committed."""
        intake = getattr(self._local, "intake", None)
        if intake is not None:
            intake.defer(key, fn, preempt)
        else:
            self.work.submit(key, fn, preempt=preempt)

    def _report(self, rec, changes, ctxt, persist=True, **fields):
        """Apply ``fields`` to the record, store it, send the update up.

        ``persist=False`` skips the store for intermediate states that a
        replay would recompute anyway (the hot path of a build writes the
        record twice: when received and when settled). Returns the list of
        confirm futures.
        """
        with self._lock(rec.instance_uuid):
            self._apply_states(rec, fields)
            if persist:
                # Over the stored dict: instance_update_from_api may have
                # changed it since this record was read.
                data = self.store.report_instance(rec, fields)
            else:
                data = dict(rec.instance)
                data.update(fields)
                rec.instance = data
        prim = intercell.obj_primitive("Instance", data, changes)
        return self.parent.instance_update_at_top(prim, ctxt)

    @staticmethod
    def _apply_states(rec, fields):
        """The record takes the reported states; the update names its instance."""
        for name in ("vm_state", "task_state", "power_state"):
            if name in fields:
                setattr(rec, name, fields[name])
        fields["uuid"] = rec.instance_uuid

    def _report_later(self, rec, changes, ctxt, then, **fields):
        """``_report`` for a work queue operation, without holding its thread
        while the record is written.

        Returns a ``Later`` for the work queue: once the record is stored the
        update is sent up and ``then(futures)`` (the confirm futures) gives
        the operation's next step. The instance's lock is held from the
        write to the send, as in ``_report``, so no other report of this
        instance goes between them.

        The send and ``then`` run on the thread that committed the write
        (``Later.inline``; 13% more builds per second in the issue 3
        benchmark than a hand-over to a worker): ``then`` must not wait for
        the store. The send queues the message for the publisher's thread;
        on the oslo.messaging fallback (a transport other than plain
        RabbitMQ) it waits for the broker's confirm there.
        """
        lock = self._acquire(rec.instance_uuid)
        try:
            self._apply_states(rec, fields)
            write = self.store.report_instance_later(rec, fields)
        except BaseException:
            lock.release()
            raise

        def written(fut):
            try:
                data = fut.result()
                rec.instance = data
                prim = intercell.obj_primitive("Instance", data, changes)
                futures = self.parent.instance_update_at_top(prim, ctxt)
            finally:
                lock.release()
            return then(futures)

        return Later(write, written, inline=True)

    def _fault(self, rec, message, ctxt, code=500, details=""):
        now = intercell.format_obj_datetime()
        fault = {"instance_uuid": rec.instance_uuid, "code": code, "message": message,
                 "details": details, "host": self.host, "created_at": now,
                 "updated_at": None, "deleted_at": None, "deleted": False}
        return self.parent.instance_fault_create_at_top(fault, ctxt)

    def _after_confirm(self, futures, done):
        """Call ``done()`` once every future resolved; abandon on failure."""
        futures = list(futures)
        if not futures:
            done()
            return
        remaining = [len(futures)]
        failed = []
        lock = threading.Lock()

        def one(fut):
            with lock:
                if fut.exception() is not None:
                    failed.append(fut.exception())
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                if failed:
                    done(abandon=True)
                else:
                    done()

        for fut in futures:
            fut.add_done_callback(one)

    def _call(self, rec, what, fn, *args):
        """Call the backend, retrying retryable errors with backoff."""
        delay = self.retry_delay
        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except exception.BackendError as e:
                if not e.retryable or attempt == self.retries:
                    raise
                LOG.warning("[instance: %(uuid)s] %(what)s failed (%(err)s), retry "
                            "%(n)d of %(max)d in %(delay).1f s",
                            {"uuid": rec.instance_uuid, "what": what, "err": e.message,
                             "n": attempt + 1, "max": self.retries, "delay": delay})
                time.sleep(delay)
                delay *= 2

    def _ref(self, rec):
        return InstanceRef(rec.instance_uuid, rec.backend_id, rec.launch_token)

    def _changed(self):
        if self.reporter is not None:
            self.reporter.changed()

    def _get_live(self, uuid, ctxt):
        """The record of a live instance, or InstanceNotFound (and repair the top)."""
        rec = self.store.get_instance(uuid)
        if rec is None or rec.deleted:
            # Like a stock child: tell the top the instance is gone here.
            self.parent.instance_destroy_at_top(
                intercell.obj_primitive("Instance", {"uuid": uuid}), ctxt)
            raise exception.InstanceNotFound(instance_id=uuid)
        return rec

    def _settled_fields(self, info):
        vm_state, power = {
            InstanceState.RUNNING: (VmState.ACTIVE, PowerState.RUNNING),
            InstanceState.STOPPED: (VmState.STOPPED, PowerState.SHUTDOWN),
            InstanceState.PAUSED: (VmState.PAUSED, PowerState.PAUSED),
            InstanceState.SUSPENDED: (VmState.SUSPENDED, PowerState.SUSPENDED),
        }.get(info.state, (VmState.ERROR, PowerState.NOSTATE))
        return {"vm_state": vm_state, "task_state": None, "power_state": power}

    # -- build ---------------------------------------------------------------

    def build_instances(self, msg, job):
        kwargs = msg.method_kwargs.get("build_inst_kwargs")
        if not isinstance(kwargs, dict):
            raise exception.MalformedMessage(reason="build_inst_kwargs is not an object")
        instances = kwargs.get("instances")
        if not isinstance(instances, list) or not instances:
            raise exception.MalformedMessage(reason="build_inst_kwargs.instances is empty")
        decoded = [intercell.obj_data(i, "Instance")[0] for i in instances]
        if any(not isinstance(d.get("uuid"), str) or not d["uuid"] for d in decoded):
            raise exception.MalformedMessage(reason="an instance has no uuid")
        try:
            flavor, invalid = self._flavor_of(kwargs, decoded[0]), None
        except exception.MalformedMessage as e:
            # The instances are real at the top: fail them visibly, with a fault.
            flavor, invalid = None, e.message
        image = kwargs.get("image") if isinstance(kwargs.get("image"), dict) else {}
        for index, data in enumerate(decoded):
            uuid = data["uuid"]
            if not self.store.claim_operation(uuid, "build", msg.uuid):
                LOG.warning("[instance: %(uuid)s] Dropped build from message %(msg)s: this "
                            "instance was already built or is being built",
                            {"uuid": uuid, "msg": msg.uuid})
                self._answer_resend(uuid, msg.ctxt)
                continue
            instance = {k: v for k, v in data.items() if k != "id"}
            instance.setdefault("launch_index", index)
            new = InstanceRecord(
                instance_uuid=uuid, flavor=flavor.to_dict() if flavor else {},
                image_ref=str(data.get("image_ref") or image.get("id") or ""),
                launch_token="%s-1" % uuid, generation=1,
                project_id=str(data.get("project_id") or ""), instance=instance)
            # The record as received, unless one exists (a tombstone, or ours
            # on replay): then that one, untouched.
            rec = self.store.add_instance(new) or new
            if rec.deleted:
                LOG.warning("[instance: %s] Dropped build: the instance was deleted before "
                            "its build arrived", uuid)
                self.store.finish_operation(uuid, "build")
                self.parent.instance_destroy_at_top(
                    intercell.obj_primitive("Instance", {"uuid": uuid}), msg.ctxt)
                continue
            done = job.part()
            if invalid:
                self._build_failed(rec, "Invalid build request: %s" % invalid, done, msg.ctxt)
                continue
            request = self._build_request(rec, data, kwargs, flavor, image, index,
                                          first_launch=rec is new)
            if rec.state == InstanceState.RUNNING and rec.backend_id:
                # Replay after the build finished but before its report was
                # confirmed: send every field this cell owns again.
                futures = self._report(rec, [f for f in OWNED_FIELDS if f in rec.instance],
                                       msg.ctxt)
                self._after_confirm(futures, lambda abandon=False, u=uuid, d=done:
                                    self._op_done(u, "build", d, abandon))
                continue
            LOG.debug("[instance: %(uuid)s] Build accepted (%(flavor)s)",
                     {"uuid": uuid, "flavor": flavor.name})
            self._submit(uuid, lambda r=rec, q=request, d=done, c=msg.ctxt:
                             self._spawn(r, q, d, c, first_report=True))

    def _answer_resend(self, uuid, ctxt):
        """A re-sent build means the top did not hear from us: tell it again
        where the instance stands, so it stops re-sending (and never moves
        the build to another cell while this one has the instance)."""
        rec = self.store.get_instance(uuid)
        if rec is None or rec.deleted:
            return
        fields = [f for f in OWNED_FIELDS if f in rec.instance]
        self._report(rec, sorted(set(fields) | {"vm_state", "task_state"}), ctxt,
                     persist=False)

    def _flavor_of(self, kwargs, data):
        props = kwargs.get("filter_properties")
        prim = props.get("instance_type") if isinstance(props, dict) else None
        if prim is None:
            prim = data.get("flavor")
        try:
            if prim is not None:
                fdata, _ = intercell.obj_data(prim, "Flavor")
                flavor = Flavor.from_primitive_data(fdata)
            else:
                flavor = Flavor.from_primitive_data(
                    {"name": data.get("instance_type_id") or "unknown", **data})
        except (TypeError, ValueError, OverflowError) as e:
            raise exception.MalformedMessage(reason=str(e))
        if flavor.memory_mb <= 0:
            raise exception.MalformedMessage(reason="flavor has no memory_mb")
        if self.flavors is not None and self.flavors.learn(flavor):
            self._changed()
        return flavor

    def _build_request(self, rec, data, kwargs, flavor, image, index, first_launch=False):
        networks = []
        for net in intercell.obj_list_items(kwargs.get("requested_networks"), "NetworkRequest"):
            ndata, _ = intercell.obj_data(net, "NetworkRequest")
            if ndata.get("network_id"):
                networks.append(ndata["network_id"])
        groups = kwargs.get("security_groups") or []
        password = kwargs.get("admin_password")
        return BuildRequest(
            instance_uuid=rec.instance_uuid,
            name=str(data.get("display_name") or data.get("hostname") or rec.instance_uuid),
            flavor=flavor, image=image or {"id": rec.image_ref},
            launch_token=rec.launch_token, generation=rec.generation,
            project_id=rec.project_id, user_id=str(data.get("user_id") or ""),
            key_name=str(data.get("key_name") or ""), key_data=str(data.get("key_data") or ""),
            user_data=str(data.get("user_data") or ""),
            metadata=dict(data.get("metadata") or {}),
            networks=networks, security_groups=[str(g) for g in groups],
            launch_index=int(data.get("launch_index") or index),
            admin_password=password if isinstance(password, str) and password != "***" else "",
            first_launch=first_launch)

    def _spawn(self, rec, request, done, ctxt, first_report=False):
        if first_report:
            # The first report carries every field as changed, so a top that
            # lost (or never had) the row recreates it from this message.
            # Fire-and-confirm (the last report gates the entry), sent by the
            # worker once the journal entry is committed: the consumer's
            # thread, which every message goes through, only journals.
            first = set(rec.instance) - TOP_RESETS | {"task_state", "vm_state", "uuid"}
            self._report(rec, sorted(first), ctxt, persist=False,
                         vm_state=VmState.BUILDING, task_state=TaskState.SCHEDULING)
        try:
            info = self._call(rec, "spawn", self.backend.spawn, request)
        except exception.BackendError as e:
            info = e
        if isinstance(info, exception.BackendError):
            # Outside the except block: the failure is reported, not a traceback.
            return self._build_failed(rec, info.message, done, ctxt)
        rec.backend_id = info.backend_id
        rec.state = info.state
        self._changed()
        if info.state.is_transitional:
            # Accepted by the provider: "spawning" until it runs.
            self.store.update_instance(rec.instance_uuid, backend_id=info.backend_id,
                                       state=info.state)
            self._report(rec, ["host", "node", "task_state"], ctxt, persist=False,
                         task_state=TaskState.SPAWNING, host=self.host, node=self.node)
            return Transition(self._ref(rec), lambda i: self._spawned(rec, i, done, ctxt),
                              frozenset({InstanceState.RUNNING}), self.transition_timeout)
        return self._spawned(rec, info, done, ctxt)

    def _spawned(self, rec, info, done, ctxt):
        if info is CANCELLED:
            LOG.info("[instance: %s] Build superseded by a delete", rec.instance_uuid)
            done()
            return None
        if info is TIMED_OUT:
            return self._build_failed(
                rec, "Instance did not become active within %d seconds"
                % self.transition_timeout, done, ctxt)
        if info.state != InstanceState.RUNNING:
            return self._build_failed(
                rec, info.fault or "Instance went to %s while building" % info.state.value,
                done, ctxt)
        addresses = [a.__dict__ if hasattr(a, "__dict__") else a for a in info.addresses]
        rec.addresses = addresses
        rec.state = InstanceState.RUNNING
        fields = self._settled_fields(info)
        fields.update(self._network_fields(rec, addresses))
        fields.update(launched_at=intercell.format_obj_datetime(), host=self.host,
                      node=self.node)
        def reported(futures):
            LOG.info("[instance: %(uuid)s] Active at %(ip)s",
                     {"uuid": rec.instance_uuid, "ip": fields.get("access_ip_v4")})
            self._after_confirm(futures, lambda abandon=False: self._op_done(
                rec.instance_uuid, "build", done, abandon))

        return self._report_later(rec, sorted(fields), ctxt, reported, **fields)

    def _op_done(self, uuid, operation, done, abandon=False):
        # The claim is finished with the journal entry (one transaction).
        done(abandon=abandon, operation=(uuid, operation))

    def _build_failed(self, rec, reason, done, ctxt):
        LOG.error("[instance: %(uuid)s] Build failed: %(reason)s",
                  {"uuid": rec.instance_uuid, "reason": reason})
        rec.state = InstanceState.ERROR
        rec.fault = reason
        futures = self._fault(rec, reason, ctxt)
        futures += self._report(rec, ["power_state", "task_state", "vm_state"], ctxt,
                                vm_state=VmState.ERROR, task_state=None,
                                power_state=PowerState.NOSTATE)
        self._changed()
        self._after_confirm(futures, lambda abandon=False: self._op_done(
            rec.instance_uuid, "build", lambda **kw: done(error=reason, **kw), abandon))
        return None

    def _network_fields(self, rec, addresses):
        """``access_ip_v4`` and the ``info_cache`` primitive (nova's network model)."""
        fixed = [a for a in addresses if a.get("kind", "fixed") == "fixed"]
        floating = [a for a in addresses if a.get("kind") == "floating"]
        access = (floating or fixed or [{}])[0].get("address")
        ips = []
        for i, a in enumerate(fixed):
            ips.append({
                "address": a["address"], "type": "fixed", "version": a.get("version", 4),
                "meta": {}, "floating_ips": [
                    {"address": f["address"], "type": "floating",
                     "version": f.get("version", 4), "meta": {}}
                    for f in floating[i:i + 1]]})
        network = fixed[0].get("network", "public") if fixed else "public"
        vif = {
            "id": rec.instance_uuid, "address": (fixed[0].get("mac") if fixed else "") or None,
            "type": "other", "devname": None, "ovs_interfaceid": None, "active": True,
            "preserve_on_delete": False, "vnic_type": "normal", "profile": {},
            "details": {}, "qbh_params": None, "qbg_params": None, "meta": {},
            "network": {"id": network, "bridge": None, "label": network,
                        "meta": {"injected": False, "tenant_id": rec.project_id},
                        "subnets": [{"cidr": None, "dns": [], "gateway": {"address": None,
                                     "type": "gateway", "version": None, "meta": {}},
                                     "ips": ips, "routes": [], "version": 4,
                                     "meta": {}}] if ips else []}}
        cache = intercell.obj_primitive(
            "InstanceInfoCache",
            {"instance_uuid": rec.instance_uuid,
             "network_info": jsonutils.dumps([vif] if ips else [])},
            ["network_info"])
        return {"access_ip_v4": access, "info_cache": cache}

    # -- delete --------------------------------------------------------------

    def terminate_instance(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        delete_type = msg.method_kwargs.get("delete_type", "delete")
        if delete_type not in ("delete", "force_delete"):
            raise exception.MalformedMessage(reason="delete_type %r" % delete_type)
        self._delete(uuid, msg, job)

    def _delete(self, uuid, msg, job):
        rec = self.store.get_instance(uuid)
        if rec is not None and rec.deleted:
            if self.store.claim_operation(uuid, "delete", msg.uuid):
                # Our own delete, replayed after a crash between the delete and
                # the confirm of its report: tell the top again.
                done = job.part()
                self._after_confirm(self.parent.instance_destroy_at_top(
                    intercell.obj_primitive("Instance", {"uuid": uuid}), msg.ctxt),
                    lambda abandon=False: self._op_done(uuid, "delete", done, abandon))
            else:
                LOG.warning("[instance: %s] Dropped delete: already deleted", uuid)
            return
        if rec is None:
            LOG.warning("[instance: %s] Delete of an instance this cell does not have; "
                        "telling the top it is gone", uuid)
            # A tombstone, so that a build of this instance still in flight
            # (messages are handled in parallel) is refused when it arrives.
            self.store.put_instance(InstanceRecord(
                instance_uuid=uuid, state=InstanceState.DELETED, vm_state=VmState.DELETED,
                task_state=None, deleted=True))
            done = job.part()
            self._after_confirm(self.parent.instance_destroy_at_top(
                intercell.obj_primitive("Instance", {"uuid": uuid}), msg.ctxt), done)
            return
        if not self.store.claim_operation(uuid, "delete", msg.uuid):
            LOG.warning("[instance: %(uuid)s] Dropped delete from message %(msg)s: a delete "
                        "is already under way", {"uuid": uuid, "msg": msg.uuid})
            return
        done = job.part()
        self._submit(uuid, lambda: self._destroy(rec.instance_uuid, done, msg.ctxt),
                         preempt=True)

    def _destroy(self, uuid, done, ctxt):
        rec = self.store.get_instance(uuid)
        self._report(rec, ["task_state"], ctxt, task_state=TaskState.DELETING)
        try:
            self._call(rec, "destroy", self.backend.destroy, self._ref(rec))
        except exception.BackendError as e:
            return self._op_failed(rec, "delete", e.message, done, ctxt)
        return Transition(self._ref(rec), lambda i: self._destroyed(rec, i, done, ctxt),
                          frozenset({InstanceState.DELETED}), self.transition_timeout)

    def _destroyed(self, rec, info, done, ctxt):
        if info is TIMED_OUT or (info is not CANCELLED and info.state != InstanceState.DELETED):
            reason = ("Instance was not deleted within %d seconds" % self.transition_timeout
                      if info is TIMED_OUT else "Delete ended in %s" % info.state.value)
            return self._op_failed(rec, "delete", reason, done, ctxt)
        self.store.delete_instance(rec.instance_uuid)
        self._changed()
        data = dict(rec.instance, uuid=rec.instance_uuid, vm_state=VmState.DELETED,
                    task_state=None, deleted=True)
        futures = self.parent.instance_destroy_at_top(
            intercell.obj_primitive("Instance", data), ctxt)
        LOG.info("[instance: %s] Deleted", rec.instance_uuid)
        self._after_confirm(futures, lambda abandon=False: self._op_done(
            rec.instance_uuid, "delete", done, abandon))
        return None

    def _op_failed(self, rec, operation, reason, done, ctxt):
        """An operation on an existing instance failed: ERROR plus a fault."""
        LOG.error("[instance: %(uuid)s] %(op)s failed: %(reason)s",
                  {"uuid": rec.instance_uuid, "op": operation, "reason": reason})
        rec.state = InstanceState.ERROR
        rec.fault = reason
        futures = self._fault(rec, reason, ctxt)
        futures += self._report(rec, ["task_state", "vm_state"], ctxt,
                                vm_state=VmState.ERROR, task_state=None)
        self._after_confirm(futures, lambda abandon=False: done(
            error=reason, abandon=abandon))
        return None

    def instance_delete_everywhere(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        delete_type = msg.method_kwargs.get("delete_type", "hard")
        rec = self.store.get_instance(uuid)
        if rec is None or rec.deleted:
            # Sent to every cell: not having it is the normal case.
            LOG.debug("[instance: %s] delete everywhere: not in this cell", uuid)
            return
        if delete_type == "soft":
            self._power_op(rec, msg, job, "soft_delete")
        else:
            self._delete(uuid, msg, job)

    # -- power operations ------------------------------------------------------

    _POWER_OPS = {
        # name: (task_state, backend call, target state, final vm_state override)
        "reboot_soft": (TaskState.REBOOTING, "reboot", InstanceState.RUNNING, None),
        "reboot_hard": (TaskState.REBOOTING_HARD, "reboot", InstanceState.RUNNING, None),
        "stop": (TaskState.POWERING_OFF, "power_off", InstanceState.STOPPED, None),
        "start": (TaskState.POWERING_ON, "power_on", InstanceState.RUNNING, None),
        "soft_delete": (TaskState.SOFT_DELETING, "power_off", InstanceState.STOPPED,
                        VmState.SOFT_DELETED),
        "restore": (TaskState.POWERING_ON, "power_on", InstanceState.RUNNING, None),
        # A provider without a pause or suspend (EC2) stops the instance: the
        # settled state may be STOPPED, and Nova still sees it paused.
        "pause": (TaskState.PAUSING, "pause",
                  frozenset({InstanceState.PAUSED, InstanceState.STOPPED}), VmState.PAUSED),
        "unpause": (TaskState.UNPAUSING, "unpause", InstanceState.RUNNING, None),
        "suspend": (TaskState.SUSPENDING, "suspend",
                    frozenset({InstanceState.SUSPENDED, InstanceState.STOPPED}),
                    VmState.SUSPENDED),
        "resume": (TaskState.RESUMING, "resume", InstanceState.RUNNING, None),
    }
    # Ops that need a running instance, and those that undo a vm_state.
    _NEEDS_RUNNING = frozenset({"reboot_soft", "reboot_hard", "stop", "soft_delete",
                                "pause", "suspend"})
    _UNDOES = {"unpause": VmState.PAUSED, "resume": VmState.SUSPENDED}

    @classmethod
    def _targets(cls, op):
        target = cls._POWER_OPS[op][2]
        return target if isinstance(target, frozenset) else frozenset({target})

    def reboot_instance(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        kind = msg.method_kwargs.get("reboot_type", "SOFT")
        if kind not in ("SOFT", "HARD"):
            raise exception.MalformedMessage(reason="reboot_type %r" % kind)
        self._power_op(self._get_live(uuid, msg.ctxt), msg, job, "reboot_" + kind.lower())

    def stop_instance(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        self._power_op(self._get_live(uuid, msg.ctxt), msg, job, "stop")

    def start_instance(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        self._power_op(self._get_live(uuid, msg.ctxt), msg, job, "start")

    def pause_instance(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        self._power_op(self._get_live(uuid, msg.ctxt), msg, job, "pause")

    def unpause_instance(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        self._power_op(self._get_live(uuid, msg.ctxt), msg, job, "unpause")

    def suspend_instance(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        self._power_op(self._get_live(uuid, msg.ctxt), msg, job, "suspend")

    def resume_instance(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        self._power_op(self._get_live(uuid, msg.ctxt), msg, job, "resume")

    def soft_delete_instance(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        self._power_op(self._get_live(uuid, msg.ctxt), msg, job, "soft_delete")

    def _power_op(self, rec, msg, job, op):
        done = job.part()
        self._submit(rec.instance_uuid,
                         lambda: self._run_power_op(rec.instance_uuid, op, done, msg.ctxt))

    def _run_power_op(self, uuid, op, done, ctxt):
        rec = self.store.get_instance(uuid)
        if rec is None or rec.deleted:
            done(error="instance %s is gone" % uuid)
            return None
        task_state, call = self._POWER_OPS[op][:2]
        if op in self._UNDOES and rec.vm_state != self._UNDOES[op]:
            return self._invalid_state(rec, op, done, ctxt)
        if op in self._NEEDS_RUNNING and \
                rec.state != InstanceState.RUNNING and not (
                    op == "reboot_hard" and rec.state in (InstanceState.ERROR,
                                                          InstanceState.STOPPED)):
            if op in ("stop", "soft_delete") and rec.state == InstanceState.STOPPED:
                pass  # already off: just settle the states below
            else:
                return self._invalid_state(rec, op, done, ctxt)
        if op in ("start", "restore") and rec.state == InstanceState.RUNNING:
            return self._power_settled(rec, op, self.backend.get_info(self._ref(rec)),
                                       done, ctxt)
        self._report(rec, ["task_state"], ctxt, task_state=task_state)
        fn = getattr(self.backend, call)
        args = [self._ref(rec)]
        if call == "reboot":
            args.append(RebootKind.HARD if op == "reboot_hard" else RebootKind.SOFT)
        try:
            info = self._call(rec, op, fn, *args)
        except exception.InstanceNotFound:
            return self._vanished(rec, done, ctxt)
        except exception.BackendError as e:
            return self._op_failed(rec, op, e.message, done, ctxt)
        if info.state.is_transitional:
            return Transition(self._ref(rec),
                              lambda i: self._power_settled(rec, op, i, done, ctxt),
                              self._targets(op), self.transition_timeout)
        return self._power_settled(rec, op, info, done, ctxt)

    def _power_settled(self, rec, op, info, done, ctxt):
        if info is CANCELLED:
            done()
            return None
        if info is TIMED_OUT:
            return self._op_failed(rec, op, "Instance did not settle within %d seconds"
                                   % self.transition_timeout, done, ctxt)
        if info.state == InstanceState.DELETED:
            return self._vanished(rec, done, ctxt)
        if info.state not in self._targets(op):
            return self._op_failed(rec, op, info.fault or "%s ended in %s" % (
                op, info.state.value), done, ctxt)
        rec.state = info.state
        fields = self._settled_fields(info)
        vm_override = self._POWER_OPS[op][3]
        if vm_override:
            fields["vm_state"] = vm_override
            fields["power_state"] = {VmState.PAUSED: PowerState.PAUSED,
                                     VmState.SUSPENDED: PowerState.SUSPENDED}.get(
                vm_override, fields["power_state"])
        futures = self._report(rec, sorted(fields), ctxt, **fields)
        self.store.update_instance(rec.instance_uuid, state=info.state)
        self._changed()
        LOG.info("[instance: %(uuid)s] %(op)s done: %(state)s",
                 {"uuid": rec.instance_uuid, "op": op, "state": fields["vm_state"]})
        self._after_confirm(futures, done)
        return None

    def _invalid_state(self, rec, op, done, ctxt):
        err = exception.InstanceInvalidState(instance_uuid=rec.instance_uuid,
                                             attr="vm_state", state=rec.vm_state, method=op)
        LOG.warning("[instance: %(uuid)s] %(err)s", {"uuid": rec.instance_uuid,
                                                    "err": err.message})
        futures = self._fault(rec, err.message, ctxt, code=409)
        # Clear the task_state the API set, so the top does not stay stuck.
        futures += self._report(rec, ["task_state"], ctxt, task_state=None)
        self._after_confirm(futures, lambda abandon=False: done(error=err.message,
                                                                 abandon=abandon))
        return None

    def _vanished(self, rec, done, ctxt):
        LOG.warning("[instance: %s] Gone from the backend; telling the top",
                    rec.instance_uuid)
        self.store.delete_instance(rec.instance_uuid)
        self._changed()
        futures = self.parent.instance_destroy_at_top(
            intercell.obj_primitive("Instance", {"uuid": rec.instance_uuid}), ctxt)
        self._after_confirm(futures, done)
        return None

    def _unsupported(self, msg):
        """A stock method no backend supports yet: fault and clear task_state."""
        reason = "%s is not supported by cell %s" % (msg.method_name, self.cell_name)
        LOG.warning(reason)
        try:
            uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        except exception.MessageError:
            uuid = None
        rec = self.store.get_instance(uuid) if uuid else None
        if rec is not None and not rec.deleted:
            self._fault(rec, reason, msg.ctxt, code=400)
            self._report(rec, ["task_state"], msg.ctxt, task_state=None)
        raise exception.UnknownMethod(reason, message_type=msg.message_type,
                                      method_name=msg.method_name)

    # -- resize, rebuild, snapshot ---------------------------------------------

    def _requested_flavor(self, value):
        """The flavor a resize asks for: Stein sends a flat dict of which only
        ``flavorid`` is used; the catalog (``[cells] flavors`` and flavors seen
        in builds) gives its sizes. A primitive or a dict with sizes works too."""
        if intercell.is_obj_primitive(value):
            value, _ = intercell.obj_data(value, "Flavor")
        if not isinstance(value, dict):
            raise exception.MalformedMessage(reason="flavor is not an object")
        wanted = {str(value[k]) for k in ("flavorid", "name") if value.get(k)}
        for flavor in (self.flavors.all() if self.flavors is not None else []):
            if wanted & {flavor.flavorid, flavor.name}:
                return flavor
        try:
            flavor = Flavor.from_primitive_data(value)
        except (TypeError, ValueError) as e:
            raise exception.MalformedMessage(reason="flavor: %s" % e)
        if flavor.memory_mb <= 0:
            raise exception.MalformedMessage(
                reason="unknown flavor %s" % (", ".join(sorted(wanted)) or "?"))
        return flavor

    @staticmethod
    def _flavor_fields(flavor):
        return {"memory_mb": flavor.memory_mb, "vcpus": flavor.vcpus,
                "root_gb": flavor.root_gb, "ephemeral_gb": flavor.ephemeral_gb,
                "flavor": intercell.obj_primitive("Flavor", {
                    "flavorid": flavor.flavorid or flavor.name, "name": flavor.name,
                    "memory_mb": flavor.memory_mb, "vcpus": flavor.vcpus,
                    "root_gb": flavor.root_gb, "ephemeral_gb": flavor.ephemeral_gb,
                    "swap": flavor.swap, "extra_specs": dict(flavor.extra_specs)})}

    def resize_instance(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        rec = self._get_live(uuid, msg.ctxt)
        flavor = self._requested_flavor(msg.method_kwargs.get("flavor"))
        done = job.part()
        self.work.submit(rec.instance_uuid, lambda: self._run_resize(
            uuid, flavor, done, msg.ctxt, revert=False))

    def revert_resize(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        rec = self._get_live(uuid, msg.ctxt)
        done = job.part()
        old = rec.instance.get("cellagent_old_flavor")
        if rec.vm_state != VmState.RESIZED or not old:
            self.work.submit(uuid, lambda: self._invalid_state(rec, "revert_resize", done,
                                                               msg.ctxt))
            return
        flavor = Flavor(**{k: v for k, v in old.items() if k in Flavor.__dataclass_fields__})
        self.work.submit(uuid, lambda: self._run_resize(uuid, flavor, done, msg.ctxt,
                                                        revert=True))

    def confirm_resize(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        rec = self._get_live(uuid, msg.ctxt)
        done = job.part()

        def confirm():
            fresh = self.store.get_instance(uuid)
            if fresh.vm_state != VmState.RESIZED:
                return self._invalid_state(fresh, "confirm_resize", done, msg.ctxt)
            fresh.instance.pop("cellagent_old_flavor", None)
            self.store.update_instance(uuid, instance=fresh.instance)
            vm_state = VmState.STOPPED if fresh.state == InstanceState.STOPPED \
                else VmState.ACTIVE
            futures = self._report(fresh, ["task_state", "vm_state"], msg.ctxt,
                                   vm_state=vm_state, task_state=None)
            self._after_confirm(futures, done)
            return None
        self.work.submit(rec.instance_uuid, confirm)

    def _run_resize(self, uuid, flavor, done, ctxt, revert):
        rec = self.store.get_instance(uuid)
        if rec is None or rec.deleted:
            done(error="instance %s is gone" % uuid)
            return None
        op = "revert_resize" if revert else "resize"
        if rec.state not in (InstanceState.RUNNING, InstanceState.STOPPED):
            return self._invalid_state(rec, op, done, ctxt)
        was_running = rec.state == InstanceState.RUNNING
        self._report(rec, ["task_state"], ctxt, task_state=(
            TaskState.RESIZE_REVERTING if revert else TaskState.RESIZE_PREP))
        step = _ResizeStep(rec, flavor, was_running, revert, done, ctxt)
        if was_running and self.backend.capabilities.get("resize_needs_stop"):
            try:
                info = self._call(rec, op, self.backend.power_off, self._ref(rec))
            except exception.InstanceNotFound:
                return self._vanished(rec, done, ctxt)
            except exception.BackendError as e:
                return self._resize_failed(step, "cannot stop it: %s" % e.message)
            return self._then(rec, info, frozenset({InstanceState.STOPPED}),
                              lambda i: self._resize_stopped(step, i))
        return self._resize_stopped(step, None)

    def _then(self, rec, info, targets, fn):
        """``fn(info)`` now when settled, else once the poller sees it settle."""
        if info.state.is_transitional:
            return Transition(self._ref(rec), fn, targets, self.transition_timeout)
        return fn(info)

    def _resize_stopped(self, step, info):
        rec = step.rec
        if info is CANCELLED:
            step.done()
            return None
        if info is not None and (info is TIMED_OUT or info.state != InstanceState.STOPPED):
            return self._resize_failed(step, "it did not stop")
        if not step.revert:
            self._report(rec, ["task_state"], step.ctxt,
                         task_state=TaskState.RESIZE_MIGRATING)
        try:
            info = self._call(rec, "resize", self.backend.resize, self._ref(rec), step.flavor)
        except exception.InstanceNotFound:
            return self._vanished(rec, step.done, step.ctxt)
        except exception.BackendError as e:
            return self._resize_failed(step, e.message)
        old = rec.flavor
        step.previous = (old, rec.instance.get("cellagent_old_flavor"))
        rec.flavor = step.flavor.to_dict()
        if step.revert:
            rec.instance.pop("cellagent_old_flavor", None)
        else:
            rec.instance["cellagent_old_flavor"] = old
        self.store.update_instance(rec.instance_uuid, flavor=rec.flavor, instance=rec.instance)
        self._changed()
        if not step.revert:
            self._report(rec, ["task_state"], step.ctxt, task_state=TaskState.RESIZE_MIGRATED)
        if step.was_running and self.backend.capabilities.get("resize_needs_stop"):
            self._report(rec, ["task_state"], step.ctxt, task_state=TaskState.RESIZE_FINISH)
            try:
                info = self._call(rec, "resize", self.backend.power_on, self._ref(rec))
            except exception.BackendError as e:
                return self._op_failed(rec, "resize", "resized but not started again: %s"
                                       % e.message, step.done, step.ctxt)
        return self._then(rec, info, frozenset({InstanceState.RUNNING, InstanceState.STOPPED}),
                          lambda i: self._resized(step, i))

    def _resized(self, step, info):
        rec = step.rec
        if info is CANCELLED:
            step.done()
            return None
        if info is not TIMED_OUT and info.state == InstanceState.ERROR and info.fault:
            # The provider may give up on a resize and roll back (Nova does
            # when the destination fails): a fault, but the instance still
            # runs at its old size. Then it is a failed resize, not an error.
            try:
                current = self.backend.get_info(self._ref(rec))
            except exception.BackendError:
                current = None
            if current is not None and current.state in (InstanceState.RUNNING,
                                                         InstanceState.STOPPED):
                self._restore_flavor(step)
                return self._resize_failed(step, info.fault)
        if info is TIMED_OUT or info.state not in (InstanceState.RUNNING,
                                                   InstanceState.STOPPED):
            reason = ("did not settle within %d seconds" % self.transition_timeout
                      if info is TIMED_OUT else "ended in %s" % info.state.value)
            return self._op_failed(rec, "resize", reason, step.done, step.ctxt)
        rec.state = info.state
        fields = self._settled_fields(info)
        if not step.revert:
            fields["vm_state"] = VmState.RESIZED
        fields.update(self._flavor_fields(step.flavor))
        futures = self._report(rec, sorted(fields), step.ctxt, **fields)
        self.store.update_instance(rec.instance_uuid, state=info.state)
        LOG.info("[instance: %(uuid)s] %(what)s to %(flavor)s",
                 {"uuid": rec.instance_uuid, "flavor": step.flavor.name,
                  "what": "Resize reverted" if step.revert else "Resized"})
        self._after_confirm(futures, step.done)
        return None

    def _restore_flavor(self, step):
        """Undo the record's flavor change of a resize the provider rolled back."""
        if step.previous is None:
            return
        rec = step.rec
        rec.flavor, old_flavor = step.previous
        rec.instance = dict(rec.instance)
        if old_flavor is None:
            rec.instance.pop("cellagent_old_flavor", None)
        else:
            rec.instance["cellagent_old_flavor"] = old_flavor
        self.store.update_instance(rec.instance_uuid, flavor=rec.flavor, instance=rec.instance)
        self._changed()

    def _resize_failed(self, step, why):
        """Roll back: the instance keeps its size, and runs again if it ran."""
        rec = step.rec
        reason = "%s to %s failed: %s" % ("Revert" if step.revert else "Resize",
                                          step.flavor.name, why)
        LOG.error("[instance: %(uuid)s] %(reason)s", {"uuid": rec.instance_uuid,
                                                      "reason": reason})
        futures = self._fault(rec, reason, step.ctxt)
        current = self.backend.get_info(self._ref(rec)) if step.was_running else None
        if step.was_running and current is not None and \
                current.state != InstanceState.RUNNING:
            try:
                info = self._call(rec, "resize", self.backend.power_on, self._ref(rec))
            except exception.BackendError as e:
                return self._op_failed(rec, "resize", "%s; and not started again: %s"
                                       % (reason, e.message), step.done, step.ctxt)

            def restarted(i):
                if i is CANCELLED or i is TIMED_OUT or i.state != InstanceState.RUNNING:
                    return self._op_failed(rec, "resize", reason + "; not running again",
                                           step.done, step.ctxt)
                return self._rolled_back(step, i, futures, reason)
            return self._then(rec, info, frozenset({InstanceState.RUNNING}), restarted)
        return self._rolled_back(step, current or self.backend.get_info(self._ref(rec)),
                                 futures, reason)

    def _rolled_back(self, step, info, futures, reason):
        rec = step.rec
        rec.state = info.state
        fields = self._settled_fields(info)
        if step.revert:
            fields["vm_state"] = VmState.RESIZED
        futures = list(futures) + self._report(rec, sorted(fields), step.ctxt, **fields)
        self.store.update_instance(rec.instance_uuid, state=info.state)
        self._after_confirm(futures, lambda abandon=False: step.done(error=reason,
                                                                     abandon=abandon))
        return None

    def rebuild_instance(self, msg, job):
        """A new launch generation of the instance: the backend replaces the
        old provider instance (spawn with a new launch token)."""
        kwargs = msg.method_kwargs
        uuid = _instance_uuid(kwargs.get("instance"))
        rec = self._get_live(uuid, msg.ctxt)
        image = kwargs.get("image_href") or rec.image_ref
        if not isinstance(image, str) or not image:
            raise exception.MalformedMessage(reason="image_href is not a string")
        done = job.part()
        self.work.submit(rec.instance_uuid, lambda: self._run_rebuild(
            uuid, image, kwargs, done, msg.ctxt))

    def _run_rebuild(self, uuid, image, kwargs, done, ctxt):
        rec = self.store.get_instance(uuid)
        if rec is None or rec.deleted:
            done(error="instance %s is gone" % uuid)
            return None
        if rec.state not in (InstanceState.RUNNING, InstanceState.STOPPED,
                             InstanceState.ERROR):
            return self._invalid_state(rec, "rebuild", done, ctxt)
        generation = rec.generation + 1
        rec.generation = generation
        rec.launch_token = "%s-%d" % (uuid, generation)
        rec.image_ref = image
        self.store.update_instance(uuid, generation=generation, launch_token=rec.launch_token,
                                   image_ref=image)
        self._report(rec, ["task_state", "image_ref"], ctxt,
                     task_state=TaskState.REBUILDING, image_ref=image)
        flavor = Flavor(**{k: v for k, v in rec.flavor.items()
                           if k in Flavor.__dataclass_fields__})
        password = kwargs.get("admin_password")
        request = self._build_request(
            rec, rec.instance, {"admin_password": password}, flavor, {"id": image}, 0)
        try:
            info = self._call(rec, "rebuild", self.backend.spawn, request)
        except exception.BackendError as e:
            return self._op_failed(rec, "rebuild", e.message, done, ctxt)
        rec.backend_id = info.backend_id
        self.store.update_instance(uuid, backend_id=info.backend_id, state=info.state)
        self._report(rec, ["task_state"], ctxt, task_state=TaskState.REBUILD_SPAWNING)

        def rebuilt(i):
            if i is CANCELLED:
                done()
                return None
            if i is TIMED_OUT or i.state != InstanceState.RUNNING:
                return self._op_failed(rec, "rebuild", "the new instance did not become "
                                       "active" if i is TIMED_OUT else (
                                           i.fault or "rebuild ended in %s" % i.state.value),
                                       done, ctxt)
            rec.state = InstanceState.RUNNING
            addresses = [a.__dict__ if hasattr(a, "__dict__") else a for a in i.addresses]
            rec.addresses = addresses
            fields = self._settled_fields(i)
            fields.update(self._network_fields(rec, addresses))
            fields["launched_at"] = intercell.format_obj_datetime()
            futures = self._report(rec, sorted(fields), ctxt, **fields)
            self.store.update_instance(uuid, state=i.state, addresses=addresses)
            LOG.info("[instance: %(uuid)s] Rebuilt (generation %(g)d)",
                     {"uuid": uuid, "g": generation})
            self._after_confirm(futures, done)
            return None
        return self._then(rec, info, frozenset({InstanceState.RUNNING}), rebuilt)

    def snapshot_instance(self, msg, job):
        uuid = _instance_uuid(msg.method_kwargs.get("instance"))
        rec = self._get_live(uuid, msg.ctxt)
        image_id = msg.method_kwargs.get("image_id")
        if not isinstance(image_id, str) or not image_id:
            raise exception.MalformedMessage(reason="image_id is not a string")
        done = job.part()
        self.work.submit(rec.instance_uuid, lambda: self._run_snapshot(
            uuid, image_id, done, msg.ctxt))

    def _run_snapshot(self, uuid, image_id, done, ctxt):
        """Snapshot: the provider's image id is reported up in the instance's
        ``system_metadata`` (``cellagent_snapshot:<image id>``), since this
        cell cannot upload to the top's image service."""
        rec = self.store.get_instance(uuid)
        if rec is None or rec.deleted:
            done(error="instance %s is gone" % uuid)
            return None
        self._report(rec, ["task_state"], ctxt, task_state=TaskState.IMAGE_SNAPSHOT)
        try:
            provider_image = self._call(rec, "snapshot", self.backend.snapshot,
                                        self._ref(rec), "%s-%s" % (rec.instance_uuid, image_id))
        except exception.InstanceNotFound:
            return self._vanished(rec, done, ctxt)
        except exception.BackendError as e:
            return self._snapshot_done(rec, image_id, None, e.message, done, ctxt)
        self._report(rec, ["task_state"], ctxt, task_state=TaskState.IMAGE_UPLOADING)
        deadline = time.monotonic() + self.transition_timeout
        status = "pending"
        while status == "pending" and time.monotonic() < deadline:
            try:
                status = self.backend.image_status(provider_image)
            except exception.BackendError as e:
                if not e.retryable:
                    return self._snapshot_done(rec, image_id, provider_image, e.message,
                                               done, ctxt)
            if status == "pending":
                time.sleep(min(1.0, max(0.05, self.retry_delay)))
        error = None if status == "available" else (
            "image %s is %s" % (provider_image, status) if status != "pending" else
            "image %s not available within %d seconds" % (provider_image,
                                                          self.transition_timeout))
        return self._snapshot_done(rec, image_id, provider_image, error, done, ctxt)

    def _snapshot_done(self, rec, image_id, provider_image, error, done, ctxt):
        futures = []
        fields = {"task_state": None}
        if error is None:
            meta = dict(rec.instance.get("system_metadata") or {})
            meta["cellagent_snapshot:%s" % image_id] = provider_image
            fields["system_metadata"] = meta
            LOG.info("[instance: %(uuid)s] Snapshot %(image)s is provider image %(p)s",
                     {"uuid": rec.instance_uuid, "image": image_id, "p": provider_image})
        else:
            LOG.error("[instance: %(uuid)s] Snapshot failed: %(err)s",
                      {"uuid": rec.instance_uuid, "err": error})
            futures += self._fault(rec, "Snapshot failed: %s" % error, ctxt)
        futures += self._report(rec, sorted(fields), ctxt, **fields)
        self._after_confirm(futures, lambda abandon=False: done(error=error, abandon=abandon))
        return None


    # -- updates from the API ------------------------------------------------

    def instance_update_from_api(self, msg, job):
        kwargs = msg.method_kwargs
        data, changes = intercell.obj_data(kwargs.get("instance"), "Instance")
        uuid = data.get("uuid")
        if not isinstance(uuid, str):
            raise exception.MalformedMessage(reason="instance has no uuid")
        ignored = set(API_IGNORED)
        if kwargs.get("admin_state_reset"):
            ignored -= {"vm_state", "task_state"}
        fields = {k: data[k] for k in changes if k in data and k not in ignored}
        with self._lock(uuid):
            rec = self.store.get_instance(uuid)
            if rec is None or rec.deleted:
                LOG.debug("[instance: %s] update from API for an unknown instance", uuid)
                return None
            if not fields:
                return None
            rec.instance = dict(rec.instance, **fields)
            for name in ("vm_state", "task_state"):
                if name in fields:
                    setattr(rec, name, fields[name])
            self.store.put_instance(rec)
        LOG.debug("[instance: %(uuid)s] updated from API: %(fields)s",
                  {"uuid": uuid, "fields": sorted(fields)})
        return None

    # -- calls ---------------------------------------------------------------

    def run_compute_api_method(self, msg, job):
        info = msg.method_kwargs.get("method_info")
        if not isinstance(info, dict) or not isinstance(info.get("method"), str):
            raise exception.MalformedMessage(reason="method_info has no method")
        args = info.get("method_args") or []
        kwargs = info.get("method_kwargs") or {}
        if not isinstance(args, list) or not args or not isinstance(kwargs, dict):
            raise exception.MalformedMessage(reason="method_info has no instance uuid")
        uuid = args[0]
        if isinstance(uuid, dict):
            uuid = _instance_uuid(uuid)
        if not isinstance(uuid, str):
            raise exception.MalformedMessage(reason="method_args[0] is not a uuid")
        method = info["method"]
        if method == "get_console_output":
            rec = self._get_live(uuid, msg.ctxt)
            tail = kwargs.get("tail_length", args[1] if len(args) > 1 else None)
            if tail is not None and (not isinstance(tail, int) or isinstance(tail, bool)):
                raise exception.MalformedMessage(reason="tail_length is not an integer")
            return self.backend.get_console_output(self._ref(rec), tail)
        if method == "restore":
            # Not journaled (a call-or-cast through run_compute_api_method):
            # a lost restore is simply repeated by the user.
            rec = self._get_live(uuid, msg.ctxt)
            self._submit(uuid, lambda: self._run_power_op(
                rec.instance_uuid, "restore", lambda **kw: None, msg.ctxt))
            return None
        raise exception.CellServiceAPIMethodNotFound(method_name=method)

    def announce_capabilities(self, msg, job):
        if self.reporter is not None:
            self.reporter.report_capabilities()

    def announce_capacities(self, msg, job):
        if self.reporter is not None:
            self.reporter.report_capacities()

    def sync_instances(self, msg, job):
        kwargs = msg.method_kwargs
        project_id = kwargs.get("project_id")
        since = kwargs.get("updated_since")
        when = None
        if since:
            when = _parse_iso(since)
        deleted = bool(kwargs.get("deleted"))
        count = 0
        for rec in self.store.list_instances(include_deleted=deleted, project_id=project_id,
                                             updated_since=when):
            if rec.deleted:
                self.parent.instance_destroy_at_top(
                    intercell.obj_primitive("Instance", {"uuid": rec.instance_uuid}),
                    msg.ctxt)
            else:
                data = dict(rec.instance, uuid=rec.instance_uuid)
                changes = [f for f in OWNED_FIELDS if f in data]
                self.parent.instance_update_at_top(
                    intercell.obj_primitive("Instance", data, changes), msg.ctxt)
            count += 1
        LOG.info("sync_instances: re-sent %d instances to the top", count)

    def _capacity(self):
        flavors = self.flavors.all() if self.flavors is not None else []
        return self.backend.get_capacity(flavors)

    def service_get_all(self, msg, job):
        filters = msg.method_kwargs.get("filters") or {}
        if not isinstance(filters, dict):
            raise exception.MalformedMessage(reason="filters is not an object")
        now = intercell.format_obj_datetime()
        service = {
            "id": 1, "uuid": None, "host": self.host, "binary": "nova-compute",
            "topic": "compute", "report_count": 1, "disabled": False,
            "disabled_reason": None, "last_seen_up": now, "forced_down": False,
            "version": 35, "availability_zone": "nova", "created_at": now,
            "updated_at": now, "deleted_at": None, "deleted": False,
        }
        if filters.get("disabled") is True:
            services = []
        else:
            services = [service]
        for key in ("host", "binary", "topic"):
            if key in filters:
                services = [s for s in services if s[key] == filters[key]]
        return intercell.obj_primitive(
            "ServiceList", {"objects": [intercell.obj_primitive("Service", s)
                                        for s in services]})

    def _node_data(self):
        cap = self._capacity()
        records = self.store.list_instances()
        vcpus_used = cap.vcpus_used or sum(int(r.flavor.get("vcpus") or 0) for r in records)
        vcpus = max(cap.vcpus_total, vcpus_used)
        now = intercell.format_obj_datetime()
        return {
            "id": 1, "uuid": None, "host": self.host, "hypervisor_hostname": self.node,
            "hypervisor_type": self.backend.name, "hypervisor_version": 1,
            "vcpus": vcpus, "vcpus_used": vcpus_used,
            "memory_mb": cap.ram_total_mb, "memory_mb_used": cap.ram_total_mb - cap.ram_free_mb,
            "local_gb": cap.disk_total_mb // 1024,
            "local_gb_used": (cap.disk_total_mb - cap.disk_free_mb) // 1024,
            "free_ram_mb": cap.ram_free_mb, "free_disk_gb": cap.disk_free_mb // 1024,
            "current_workload": 0, "running_vms": len(records),
            "disk_available_least": cap.disk_free_mb // 1024, "cpu_info": "{}",
            "host_ip": None, "created_at": now, "updated_at": now,
            "deleted_at": None, "deleted": False,
        }

    def compute_node_get_all(self, msg, job):
        match = msg.method_kwargs.get("hypervisor_match")
        node = self._node_data()
        nodes = [node] if not match or str(match) in node["hypervisor_hostname"] else []
        return intercell.obj_primitive(
            "ComputeNodeList", {"objects": [intercell.obj_primitive("ComputeNode", n)
                                            for n in nodes]})

    def compute_node_stats(self, msg, job):
        node = self._node_data()
        keys = ("vcpus", "memory_mb", "local_gb", "vcpus_used", "memory_mb_used",
                "local_gb_used", "free_ram_mb", "free_disk_gb", "current_workload",
                "running_vms", "disk_available_least")
        stats = {k: node[k] for k in keys}
        stats["count"] = 1
        return stats

    def task_log_get_all(self, msg, job):
        return []

    def get_migrations(self, msg, job):
        return intercell.obj_primitive("MigrationList", {"objects": []})


def _parse_iso(text):
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%S.%f",
                "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.datetime.strptime(text, fmt)
        except (TypeError, ValueError):
            continue
    raise exception.MalformedMessage(reason="updated_since %r is not an ISO time" % text)


class _ResizeStep:
    """What one resize (or revert) carries from step to step."""

    def __init__(self, rec, flavor, was_running, revert, done, ctxt):
        self.rec = rec
        self.flavor = flavor
        self.was_running = was_running
        self.revert = revert
        self.done = done
        self.ctxt = ctxt
        self.previous = None        # (flavor, cellagent_old_flavor) before the change
