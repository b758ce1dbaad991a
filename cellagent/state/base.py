"""The Store interface: the journal, the operation claims and the instance map.

The store is the agent's durability point. The first thing the agent does
with a message is ``begin_request``: from then on the message survives a
crash, and startup replays whatever ``unfinished`` returns. (On RabbitMQ the
broker's copy is acknowledged only once that write is committed, see
``batch()``; oslo.messaging's own servers acknowledge before.) The store
holds three things:

*The journal* is one row per received cells message, keyed by the message
uuid the sending cell chose. Its life is::

    begin_request -> RECEIVED -> start_attempt -> RUNNING -> finish_request
                                      ^                        (DONE, FAILED
                                      |                         or DROPPED)
                     requeue ---------+  (operator replay of a FAILED entry)

Only RECEIVED and RUNNING (``JournalStatus.UNFINISHED``) are replayed. A
RUNNING entry found at startup is work that was cut short by a crash; its
``attempts`` counter lets the manager give up on a message that keeps killing
the agent.

*Operation claims* de-duplicate work per (instance uuid, operation) rather
than per message: Nova may send the same build twice under two message uuids
(a re-sent build, a retried delete), and only the first may reach the backend.
A claim belongs to the message that took it; the same message may resume its
own unfinished claim after a crash, nobody may take a finished one.

*The instance map* is the child cell's memory of every instance it was asked
to run: the backend id, the launch token, the states last reported to the top
and the Nova instance fields. Deleting an instance leaves a tombstone
(``deleted=True``) so that a late duplicate message for it is recognised
rather than acted on; tombstones are removed by ``purge_deleted``.

Guarantees every implementation gives:

- **Every write is one transaction.** A method either does all it says or
  nothing; no method leaves a half-written row behind. The one exception
  is asked for explicitly: inside ``batch()`` the writes of one thread
  share a transaction (see there).
- **Thread-safety.** One store object is shared by every thread of the agent
  (RPC executor, reporter, reconciler). All methods may be called
  concurrently; the uniqueness guarantees below hold between threads and,
  for stores backed by a shared database, between processes.
- **Copies out, copies in.** Returned records are fresh objects; mutating
  them changes nothing in the store until they are written back.
- **Time.** Every datetime given or returned is naive UTC
  (``datetime.now(timezone.utc).replace(tzinfo=None)``). The store stamps
  ``created_at`` and ``updated_at`` itself; values a caller puts in those
  fields are ignored.
- **JSON fields.** ``InstanceRecord.flavor``, ``addresses`` and ``instance``
  are stored as JSON. Dataclasses (``objects.Address``) and enums are
  accepted and come back as dicts and plain values.
- **Errors.** A failure of the storage itself (database unreachable, disk
  full, lock wait timed out) raises ``cellagent.exception.StateError``, whose
  message never contains a database password. Other exceptions raised are
  named in each method.
- **Cost.** The agent calls the store about three times per received message
  at thousands of messages per second: each call is one short transaction,
  in most cases a single statement. Nothing here blocks on anything but the
  database.
"""

import abc
import concurrent.futures
import dataclasses
import datetime
import enum
import logging

from cellagent import exception
from cellagent import jsonutils
from cellagent import objects

LOG = logging.getLogger(__name__)

# The schema version this code reads and writes. An implementation without a
# schema (MemoryStore) reports it as already current.
SCHEMA_VERSION = 1


class Store(abc.ABC):
    """The durable state of one child cell agent.

    Build one with ``cellagent.state.get_store(url)``. Constructing a store
    does not check the schema: ``cellagent-manage db sync`` calls
    ``sync_schema``; the agent calls ``check_schema`` at startup and refuses
    to run on a database of another version.
    """

    # -- schema -----------------------------------------------------------

    @abc.abstractmethod
    def schema_version(self):
        """Return the schema version stored in the database, or 0 if none.

        0 means the database is empty (never synced). A value greater than
        ``SCHEMA_VERSION`` means a newer release has upgraded the database.
        """

    @abc.abstractmethod
    def check_schema(self):
        """Raise unless the database is at exactly ``SCHEMA_VERSION``.

        :raises SchemaVersionError: with ``found`` and ``wanted`` kwargs.
        """

    @abc.abstractmethod
    def sync_schema(self):
        """Create the schema, or upgrade it to ``SCHEMA_VERSION``.

        Idempotent: running it on a current database changes nothing. Two
        processes running it at the same time do not corrupt the schema; one
        waits for the other. Never downgrades.

        :returns: the schema version now stored.
        :raises SchemaVersionError: if the database is newer than this code.
        """

    @abc.abstractmethod
    def close(self):
        """Release connections. The store must not be used afterwards."""

    def batch(self):
        """A context manager grouping the calling thread's writes in one transaction.

        Used by a consumer that acknowledges a burst of received messages
        only once their journal entries are stored: inside the block every
        write method called *by this thread* joins one transaction, reads
        by this thread see those writes, and the transaction is committed
        when the block exits normally, rolled back if it raises. Other
        threads are not affected: they do not see the uncommitted writes,
        and theirs wait for the commit where the database has one writer.
        A nested ``batch()`` joins the outer one.

        The object returned has ``commit()``, which commits what was
        written so far and lets the block go on in a new transaction: the
        caller must call it before waiting for anything another thread may
        only do after writing (a lock, a free slot), or the two wait for
        each other. Its ``waiting()`` is True when other threads wait for
        the transaction to end: a long block should commit then, and
        writers are served in the order they came.

        A failed statement that the method reports as a result (a
        duplicate ``begin_request``, a refused ``claim_operation``) leaves
        the transaction usable. Any other storage failure inside the block
        raises ``StateError`` there, and the commit then raises
        ``StateError`` too: nothing of the block since the last commit is
        stored, and the caller must treat those messages as not received.

        The default groups nothing: each write commits at once, so nothing
        is rolled back or hidden from other threads. That is all a store
        without transactions (``MemoryStore``) can offer; a caller relying
        on the rollback must also rely on the duplicate detection above,
        which drops what a failed batch did store when it is received again.
        """
        return _NoBatch()

    # -- journal ----------------------------------------------------------

    @abc.abstractmethod
    def begin_request(self, msg_uuid, method, instance_uuid, payload, start=False):
        """Record a received message before anything acts on it.

        With ``start`` the entry is written RUNNING with one attempt, in the
        same statement (what ``start_attempt`` would do next): the hot path
        of a message acted on at once saves a write.

        ``payload`` is the raw cells message JSON, kept so that startup can
        replay it. ``instance_uuid`` may be None for messages that are not
        about one instance.

        The uniqueness of ``msg_uuid`` is enforced by the storage itself, so
        that of two threads or two processes receiving the same message
        exactly one gets the entry.

        :returns: the new ``JournalEntry`` (status RECEIVED, attempts 0, or
            RUNNING and 1 with ``start``), or
            None if a message with this uuid was already recorded, whatever
            its status: the caller must drop the duplicate.
        """

    @abc.abstractmethod
    def start_attempt(self, entry_id):
        """Mark an entry RUNNING and count one more attempt at it.

        Called just before the manager acts on the message, including on
        replay, so ``attempts`` is the number of times the work was started.

        :returns: the updated ``JournalEntry``.
        :raises StateError: if there is no such entry.
        """

    @abc.abstractmethod
    def finish_request(self, entry_id, status, error="", operations=()):
        """Give an entry its final status and error text.

        ``status`` is one of ``JournalStatus.DONE``, ``FAILED`` or
        ``DROPPED``; ``error`` is the text to show an operator (empty on
        success). ``operations`` is an iterable of ``(instance uuid,
        operation)`` claims the message finished: they are marked done as
        ``finish_operation`` would, in the same transaction (one write per
        finished build instead of two).

        :raises ValueError: if ``status`` is not a final status.
        :raises StateError: if there is no such entry (no claim is then
            changed).
        """

    @abc.abstractmethod
    def unfinished(self):
        """Return the entries to replay at startup, oldest first.

        Those whose status is in ``JournalStatus.UNFINISHED``, ordered by id,
        which is the order they were received in.
        """

    @abc.abstractmethod
    def list_requests(self, limit=50, status=None):
        """Return up to ``limit`` entries, newest first.

        ``status``, if given, keeps only entries with that status.
        """

    @abc.abstractmethod
    def get_request(self, entry_id_or_msg_uuid):
        """Return one entry by id or by message uuid, or None.

        An int, or a string of digits (as typed on the command line), is an
        id; any other string is a message uuid.
        """

    @abc.abstractmethod
    def requeue(self, entry_id):
        """Set an entry back to RECEIVED so that it is replayed.

        Used by ``cellagent-manage journal replay`` on FAILED entries. The
        attempt count and the last error are kept.

        :raises StateError: if there is no such entry.
        """

    @abc.abstractmethod
    def purge_requests(self, older_than):
        """Delete finished entries last updated before ``older_than``.

        Entries in an unfinished status are never purged, however old.

        :returns: the number of entries deleted.
        """

    # -- operation claims -------------------------------------------------

    @abc.abstractmethod
    def claim_operation(self, instance_uuid, operation, msg_uuid):
        """Claim the right to perform ``operation`` on an instance.

        :returns: True if the caller should go ahead: nobody held the claim
            (it is now held by ``msg_uuid``), or ``msg_uuid`` already holds
            it and has not finished (a replay resuming its own work). False
            if another message holds it, or the operation is done.

        Race-free between threads and processes sharing the database: of
        several messages claiming the same operation at once, exactly one
        gets True.
        """

    @abc.abstractmethod
    def finish_operation(self, instance_uuid, operation):
        """Mark a claimed operation done; later claims of it return False.

        Does nothing if the operation was never claimed.
        """

    @abc.abstractmethod
    def get_operation(self, instance_uuid, operation):
        """Return the claim as a dict, or None if never claimed.

        The dict has the keys ``instance_uuid``, ``operation``, ``msg_uuid``
        and ``status`` ('claimed' or 'done').
        """

    # -- instance map -----------------------------------------------------

    @abc.abstractmethod
    def put_instance(self, record):
        """Insert or replace a whole ``InstanceRecord``.

        On insert ``created_at`` is set to now; on replace it keeps its
        stored value. ``updated_at`` is set to now in both cases. A
        tombstone is replaced like any other row (this is how a record is
        brought back, if ever needed).

        :returns: the stored ``InstanceRecord``, timestamps filled in.
        """

    def report_instance(self, record, fields):
        """Store ``record`` with the stored instance dict updated by ``fields``.

        The instance dict (``record.instance``) of a record being reported
        may be stale: ``instance_update_from_api`` and other writers change
        the stored one. This reads the stored dict, applies ``fields`` to
        it, sets the result as ``record.instance`` and stores ``record``
        whole, as ``put_instance`` does; with no stored record,
        ``record.instance`` itself is updated. A store with transactions
        reads and writes in one (a build's settled record is one write).

        :returns: the new instance dict (also ``record.instance``).
        """
        fresh = self.get_instance(record.instance_uuid)
        data = dict(fresh.instance if fresh is not None else record.instance)
        data.update(fields)
        record.instance = data
        self.put_instance(record)
        return data

    def report_instance_later(self, record, fields):
        """``report_instance`` without waiting for the write.

        :returns: a ``concurrent.futures.Future`` done once the write is:
            its result is the new instance dict, its exception the
            ``StateError``. ``record.instance`` is left to the caller (set
            it from the result). The default writes at once and returns a
            future already done; a store with a group-commit writer
            returns before the commit.
        """
        fut = concurrent.futures.Future()
        try:
            fut.set_result(self.report_instance(record, fields))
        except exception.StateError as e:
            fut.set_exception(e)
        return fut

    def finish_request_later(self, entry_id, status, error="", operations=()):
        """``finish_request``, possibly returning before the write is done.

        For callers that would only log a failure: a failure is logged here
        instead, and the entry then stays unfinished (replayed at the next
        start, where its finished claims make the replay a no-op). The
        default writes at once.
        """
        try:
            self.finish_request(entry_id, status, error, operations)
        except exception.StateError as e:
            LOG.error("Could not finish journal entry %(id)s: %(err)s",
                      {"id": entry_id, "err": e.message})

    @abc.abstractmethod
    def add_instance(self, record):
        """Insert a record unless the instance already has one.

        One statement where ``get_instance`` then ``put_instance`` would
        take two (the first write of every build). Stamps the timestamps
        as ``put_instance`` does on insert.

        :returns: None if the record was inserted, or the stored
            ``InstanceRecord`` (tombstones included), left unchanged.
        """

    @abc.abstractmethod
    def get_instance(self, instance_uuid):
        """Return the ``InstanceRecord``, tombstones included, or None."""

    @abc.abstractmethod
    def update_instance(self, instance_uuid, **fields):
        """Change the named fields of a record and stamp ``updated_at``.

        Fields not named are left as stored, so two threads updating
        different fields of one instance do not undo each other's work.

        :returns: the updated ``InstanceRecord``.
        :raises InstanceNotFound: if there is no such record.
        :raises ValueError: if a name is not a field of ``InstanceRecord``,
            or is ``created_at`` or ``updated_at`` (the store's to stamp).
        """

    @abc.abstractmethod
    def delete_instance(self, instance_uuid):
        """Turn a record into a tombstone.

        Sets ``deleted=True``, state ``InstanceState.DELETED`` and vm_state
        'deleted'; every other field is kept, so the tombstone still names
        the backend id. Deleting a tombstone again is not an error.

        :returns: the tombstone ``InstanceRecord``.
        :raises InstanceNotFound: if there is no such record.
        """

    @abc.abstractmethod
    def purge_deleted(self, older_than):
        """Remove tombstones last updated before ``older_than``.

        :returns: the number of records removed.
        """

    @abc.abstractmethod
    def list_instances(self, include_deleted=False, project_id=None,
                       updated_since=None, states=None):
        """Return records ordered by ``created_at`` (oldest first).

        :param include_deleted: also return tombstones.
        :param project_id: keep only this project's instances.
        :param updated_since: keep only records with ``updated_at`` at or
            after this datetime.
        :param states: keep only records whose state is in this iterable of
            ``InstanceState``.
        """

    def list_instance_states(self):
        """``(instance_uuid, backend_id, state)`` of every live record.

        What a periodic pass over every instance needs (the reconciler, once
        a minute, on cells of tens of thousands of instances), without
        reading and parsing whole records: the caller reads the few it acts
        on with ``get_instance``. Tombstones are left out; the order is
        unspecified. This default derives it from ``list_instances``.
        """
        return [(r.instance_uuid, r.backend_id, r.state) for r in self.list_instances()]

    @abc.abstractmethod
    def count_instances(self, include_deleted=False):
        """Return the number of records, tombstones only if asked."""


# -- helpers shared by the implementations (not part of the interface) -------


class _NoBatch:
    """``Store.batch()`` of a store whose writes commit one by one."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def commit(self):
        pass

    def waiting(self):
        return False


FINAL_STATUSES = frozenset({objects.JournalStatus.DONE, objects.JournalStatus.FAILED,
                            objects.JournalStatus.DROPPED})
OP_CLAIMED = "claimed"
OP_DONE = "done"

# JSON fields and what an empty stored value reads back as.
_JSON_FIELDS = {"flavor": dict, "addresses": list, "instance": dict}
_FIXED_FIELDS = ("instance_uuid", "created_at", "updated_at")
UPDATABLE_FIELDS = frozenset(f.name for f in dataclasses.fields(objects.InstanceRecord)
                             if f.name not in _FIXED_FIELDS)


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _json_default(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    raise TypeError("%r is not JSON serializable" % (value,))


def instance_values(fields):
    """Map InstanceRecord fields to stored column values."""
    unknown = set(fields) - UPDATABLE_FIELDS
    if unknown:
        raise ValueError("not updatable instance fields: %s" % ", ".join(sorted(unknown)))
    values = dict(fields)
    if "state" in values:
        values["state"] = objects.InstanceState(values["state"]).value
    for name in _JSON_FIELDS:
        if name in values:
            values[name] = jsonutils.dumps(values[name], default=_json_default)
    if "deleted" in values:
        values["deleted"] = bool(values["deleted"])
    return values


def record_values(record, skip=()):
    """All stored column values of an InstanceRecord but the timestamps (and ``skip``)."""
    fields = {name: getattr(record, name) for name in UPDATABLE_FIELDS if name not in skip}
    values = instance_values(fields)
    values["instance_uuid"] = record.instance_uuid
    return values


def to_record(row):
    """Build an InstanceRecord from stored column values (a mapping)."""
    values = dict(row)
    values["state"] = objects.InstanceState(values["state"])
    for name in _JSON_FIELDS:
        values[name] = jsonutils.loads(values[name]) if values[name] else _JSON_FIELDS[name]()
    values["deleted"] = bool(values["deleted"])
    return objects.InstanceRecord(**values)


def check_final(status):
    if status not in FINAL_STATUSES:
        raise ValueError("%r is not a final journal status" % (status,))
