"""TopStore: the top cell's durable state, on SQLAlchemy Core.

The top (``cellagent-top``) keeps four things here:

*Cell records* (``TopCell``): how to reach each neighbour cell, its tier
and its budget. Operators write them with ``cellagent-manage cell``; the top
merges them with its ``cells_config`` file.

*Cell reports* (``CellReport``): the last capacities and capabilities each
child sent, when they arrived, and the child's build back-off. A report row
may exist for a name without a cell record: the store keeps what it is
given, and the caller decides what an unknown name means.

*Instances* (``TopInstance``): one row per server in any cell, the view
users list. Children change them through ``update_at_top`` (the cells v1
``instance_update_at_top``, with Nova Stein's guards against out-of-order
updates); the top itself writes the build bookkeeping. A deleted server
keeps a soft-deleted row (``deleted=True``) until ``purge_deleted``.

*Faults*: every fault a child reported, in ``top_faults``; the latest one
is also copied into the instance row, where listings read it.

The tables are prefixed ``top_`` and versioned in their own
``top_schema_version`` table, so that a child agent's schema
(``state/sql.py``) and the top's never depend on each other, even in one
database. ``cellagent-manage db sync`` creates and upgrades both.

Guarantees, as for the child's store (``state/base.py``):

- **Every call is one transaction**, committed before it returns, and
  most are a single statement. ``update_at_top``, which the top runs for
  every state change of every server, reads and writes the row under a row
  lock (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite has one writer at a
  time anyway), so two updates of one instance never interleave.
- **Thread- and process-safe.** One store object serves every thread of
  the top; several top processes may share one PostgreSQL database.
- **Copies out.** Returned objects are fresh; changing them changes
  nothing stored.
- **Time.** Every datetime is naive UTC. Datetime fields also accept an
  aware datetime (converted) or an ISO 8601 string. ``updated_at`` is the
  store's to stamp.
- **JSON fields** (``flavor``, ``addresses``, ``tried_cells``, ``fault``,
  the reports and ``flavor_costs``) are stored as JSON text.
- **Errors.** A failure of the database raises ``StateError`` with any
  password masked; bad field values raise ValueError; the other exceptions
  are named per method.
"""

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import zlib

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from cellagent import exception
from cellagent import objects
from cellagent.state import base
# NOTE: the SQLite write lock must be the very object SqlStore uses, since a
# child's and a top's store may write one database file from one process
# (``db sync`` does); the error translation is shared as well.
from cellagent.state import sql
from cellagent.state.sql import _sqlite_lock, _translate_errors

LOG = logging.getLogger(__name__)

# The version of the top's tables this code reads and writes.
TOP_SCHEMA_VERSION = 1

# Schema choices that cannot be changed without a migration (as in sql.py):
# naive UTC datetimes, JSON as Text, and instance uuid uniqueness enforced by
# the primary key, the one rule every top process sharing a database obeys.
METADATA = sa.MetaData()

SCHEMA_VERSION_TABLE = sa.Table(
    "top_schema_version", METADATA,
    sa.Column("version", sa.Integer, nullable=False),
)

CELLS = sa.Table(
    "top_cells", METADATA,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("transport_url", sa.Text, nullable=False),
    sa.Column("is_parent", sa.Boolean, nullable=False),
    sa.Column("weight_offset", sa.Float, nullable=False),
    sa.Column("weight_scale", sa.Float, nullable=False),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("cost_per_vcpu_hour", sa.Float, nullable=False),
    sa.Column("flavor_costs", sa.Text, nullable=False),
    sa.Column("max_instances", sa.Integer, nullable=True),
    sa.Column("max_vcpus", sa.Integer, nullable=True),
    sa.Column("max_cost_per_hour", sa.Float, nullable=True),
    sa.Column("disabled", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

REPORTS = sa.Table(
    "top_cell_reports", METADATA,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("capacities", sa.Text, nullable=False),
    sa.Column("capabilities", sa.Text, nullable=False),
    sa.Column("last_seen", sa.DateTime, nullable=True),
    sa.Column("capacities_at", sa.DateTime, nullable=True),
    sa.Column("backoff_until", sa.DateTime, nullable=True),
    sa.Column("failures", sa.Integer, nullable=False),
)

INSTANCES = sa.Table(
    "top_instances", METADATA,
    sa.Column("uuid", sa.String(36), primary_key=True),
    # Looked up by name (find_instance), listed and counted per cell
    # (cell_usage) and filtered on deleted by nearly every query.
    sa.Column("name", sa.String(255), nullable=False, index=True),
    sa.Column("cell_name", sa.String(255), nullable=True, index=True),
    sa.Column("project_id", sa.String(255), nullable=False),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("flavor", sa.Text, nullable=False),
    sa.Column("image_ref", sa.String(255), nullable=False),
    sa.Column("vm_state", sa.String(32), nullable=True),
    sa.Column("task_state", sa.String(64), nullable=True),
    sa.Column("power_state", sa.Integer, nullable=False),
    sa.Column("host", sa.String(255), nullable=True),
    sa.Column("node", sa.String(255), nullable=True),
    sa.Column("access_ip_v4", sa.String(64), nullable=True),
    sa.Column("addresses", sa.Text, nullable=False),
    sa.Column("launched_at", sa.DateTime, nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, index=True),
    sa.Column("deleted_at", sa.DateTime, nullable=True),
    sa.Column("fault", sa.Text, nullable=True),
    sa.Column("acked", sa.Boolean, nullable=False),
    sa.Column("build_attempts", sa.Integer, nullable=False),
    # Non-NULL only while a build waits for its acknowledgement, so the
    # periodic due_builds scan reads a handful of index entries.
    sa.Column("build_deadline", sa.DateTime, nullable=True, index=True),
    sa.Column("tried_cells", sa.Text, nullable=False),
    sa.Column("request_id", sa.String(255), nullable=False),
)

FAULTS = sa.Table(
    "top_faults", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("instance_uuid", sa.String(36), nullable=False, index=True),
    sa.Column("code", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("details", sa.Text, nullable=False),
    sa.Column("host", sa.String(255), nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
)


def _create_current(conn):
    METADATA.create_all(conn)


# MIGRATIONS[n] takes the top's tables from version n to n + 1; MIGRATIONS[0]
# creates the current tables (see sql.py).
MIGRATIONS = [_create_current]
assert len(MIGRATIONS) == TOP_SCHEMA_VERSION

_SYNC_LOCK_KEY = zlib.crc32(b"cellagent.top.sync_schema")

# Nova Stein's guards (nova/cells/messaging.py, _get_expected_*_state): an
# update setting the key is applied only while the row is in one of the
# listed states, so that a late message cannot undo a newer one.
VM_STATE_GUARDS = {objects.VmState.BUILDING: (objects.VmState.BUILDING, None)}
TASK_STATE_GUARDS = {
    "rebuild_block_device_mapping": ("rebuild_block_device_mapping", "rebuilding"),
    "rebuild_spawning": ("rebuild_spawning", "rebuild_block_device_mapping", "rebuilding"),
    "resize_migrating": ("resize_migrating", "resize_prep"),
    "resize_migrated": ("resize_migrated", "resize_migrating", "resize_prep"),
    "resize_finish": ("resize_finish", "resize_migrated", "resize_migrating", "resize_prep"),
}

_INSTANCE_FIELDS = frozenset(f.name for f in dataclasses.fields(objects.TopInstance))
_INSTANCE_DEFAULTS = {name: getattr(objects.TopInstance(uuid=""), name)
                      for name in _INSTANCE_FIELDS}
_JSON_DEFAULTS = {"flavor": dict, "addresses": list, "tried_cells": list}
_DATETIMES = frozenset({"launched_at", "created_at", "updated_at", "deleted_at",
                        "build_deadline"})
_NOT_NULL_TEXT = frozenset({"name", "project_id", "user_id", "image_ref", "request_id"})
_CELL_FIELDS = tuple(f.name for f in dataclasses.fields(objects.TopCell))
_USAGE_EXCLUDED_STATES = (objects.VmState.ERROR, objects.VmState.DELETED)


# -- value conversion -----------------------------------------------------------

def to_naive_utc(value, field="datetime"):
    """A naive UTC datetime from a datetime (naive or aware), ISO string or None."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            value = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError("%s: %r is not an ISO 8601 datetime" % (field, value))
    if not isinstance(value, datetime.datetime):
        raise ValueError("%s: %r is not a datetime" % (field, value))
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return value


def _dumps(value):
    return json.dumps(value, default=base._json_default, sort_keys=True)


def _fault(value):
    """The stored form of an instance's latest fault (None or a dict)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("fault %r is not a dict" % (value,))
    return {"code": _fault_code(value.get("code")),
            "message": str(value.get("message") or ""),
            "details": str(value.get("details") or ""),
            "created_at": to_naive_utc(value.get("created_at"), "fault created_at")
            or base.utcnow()}


def _fault_code(code):
    try:
        return int(code)
    except (TypeError, ValueError):
        return 500


def _instance_column(name, value):
    """One TopInstance field as its stored column value."""
    if name in _DATETIMES:
        return to_naive_utc(value, name)
    if name in _JSON_DEFAULTS:
        return _dumps(_JSON_DEFAULTS[name]() if value is None else value)
    if name == "fault":
        fault = _fault(value)
        return None if fault is None else _dumps(fault)
    if name in ("deleted", "acked"):
        return bool(value)
    if name in ("power_state", "build_attempts"):
        if isinstance(value, bool):
            raise ValueError("%s=%r is not an integer" % (name, value))
        try:
            return int(value or 0)
        except (TypeError, ValueError):
            raise ValueError("%s=%r is not an integer" % (name, value))
    if name in _NOT_NULL_TEXT:
        return "" if value is None else str(value)
    return None if value is None else str(value)


def _instance_values(fields, strict=True):
    """Stored column values for TopInstance ``fields``.

    ``uuid`` and ``updated_at`` are never taken from ``fields``. With
    ``strict`` an unknown name (or one of those two) raises ValueError;
    otherwise it is ignored.
    """
    values = {}
    for name, value in fields.items():
        if name not in _INSTANCE_FIELDS or name in ("uuid", "updated_at"):
            if strict:
                raise ValueError("not an updatable instance field: %s" % name)
            continue
        values[name] = _instance_column(name, value)
    return values


def _to_instance(row):
    values = dict(row._mapping)
    for name in _JSON_DEFAULTS:
        values[name] = json.loads(values[name]) if values[name] else _JSON_DEFAULTS[name]()
    fault = json.loads(values["fault"]) if values["fault"] else None
    if fault is not None:
        fault["created_at"] = to_naive_utc(fault.get("created_at"))
    values["fault"] = fault
    values["deleted"] = bool(values["deleted"])
    values["acked"] = bool(values["acked"])
    return objects.TopInstance(**values)


def _to_cell(row):
    values = {name: row._mapping[name] for name in _CELL_FIELDS}
    values["flavor_costs"] = json.loads(values["flavor_costs"] or "{}")
    return objects.TopCell(**values)


def _to_report(row):
    values = dict(row._mapping)
    values["capacities"] = json.loads(values["capacities"] or "{}")
    values["capabilities"] = json.loads(values["capabilities"] or "{}")
    return objects.CellReport(**values)


def _count(value):
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


_SELECT_INSTANCE = INSTANCES.select().where(INSTANCES.c.uuid == sa.bindparam("b_uuid"))
_LOCK_INSTANCE = _SELECT_INSTANCE.with_for_update()
_DESTROY_INSTANCE = (
    INSTANCES.update()
    .where(INSTANCES.c.uuid == sa.bindparam("b_uuid"), INSTANCES.c.deleted.is_(False))
    .values(deleted=True, deleted_at=sa.bindparam("b_now"), vm_state=objects.VmState.DELETED,
            task_state=None, build_deadline=None, updated_at=sa.bindparam("b_now")))
_SET_FAULT = (
    INSTANCES.update()
    .where(INSTANCES.c.uuid == sa.bindparam("b_uuid"))
    .values(fault=sa.bindparam("b_fault"), updated_at=sa.bindparam("b_now")))


class TopStore:
    """The top cell's state on SQLite (WAL) or PostgreSQL; see the module doc.

    Build one with ``cellagent.state.get_top_store(url)``. The constructor
    does no I/O and does not check the schema: ``cellagent-manage db sync``
    runs ``sync_schema``; the top calls ``check_schema`` at startup.

    :param url: a SQLAlchemy URL; ``postgresql://`` gets the psycopg 3
        driver; a SQLite file's directory is created.
    :param busy_timeout: milliseconds SQLite waits for another process's
        write lock (ignored on PostgreSQL).
    :param pool_size: connections kept open; ``max_overflow`` more may be
        opened under load; a caller waits ``pool_timeout`` seconds at most.
    :param pool_recycle: seconds after which a PostgreSQL connection is
        replaced (-1 never).
    """

    def __init__(self, url, busy_timeout=10000, pool_size=10, max_overflow=20,
                 pool_timeout=30, pool_recycle=3600):
        url = sa.engine.make_url(url)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        self._password = url.password
        self.url = url.render_as_string(hide_password=True)
        self._is_sqlite = url.get_backend_name() == "sqlite"
        if not self._is_sqlite and url.get_backend_name() != "postgresql":
            raise exception.ConfigurationError(
                reason="database %s: the top's store runs on SQLite or PostgreSQL" % self.url)

        kwargs = {"pool_size": pool_size, "max_overflow": max_overflow,
                  "pool_timeout": pool_timeout}
        if self._is_sqlite:
            path = url.database
            if not path or path == ":memory:" or path.startswith("file:"):
                raise exception.ConfigurationError(
                    reason="SQLite needs a database file path (each connection would see "
                           "its own in-memory database)")
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError as exc:
                raise exception.StateError(reason="%s: %s" % (self.url, exc)) from exc
            self._write_lock = _sqlite_lock(path)
            self._insert = sqlite_dialect.insert
        else:
            kwargs["pool_recycle"] = pool_recycle
            self._write_lock = None
            self._insert = pg_dialect.insert
        self._writer = None
        try:
            self._engine = sa.create_engine(url, **kwargs)
        except (sa_exc.ArgumentError, ImportError) as exc:
            raise exception.ConfigurationError(
                reason="database %s: %s" % (self.url, self._scrub(str(exc)))) from exc
        self._dbapi_error = self._engine.dialect.loaded_dbapi.Error
        if self._is_sqlite:
            self._setup_sqlite(busy_timeout)
        LOG.debug("Top store on %s", self.url)

    def __repr__(self):
        return "<TopStore %s>" % self.url

    def _setup_sqlite(self, busy_timeout):
        sql.setup_sqlite(self._engine, busy_timeout)

    # -- transaction helpers ----------------------------------------------

    @contextlib.contextmanager
    def _write(self):
        """One write transaction: committed on exit, rolled back on error."""
        if self._write_lock is None:
            with self._engine.begin() as conn:
                yield conn
            return
        with self._write_lock:
            if self._writer is None:
                self._writer = self._engine.connect().execution_options(cellagent_write=True)
            try:
                with self._writer.begin():
                    yield self._writer
            except sa_exc.DBAPIError as exc:
                if not isinstance(exc, sa_exc.IntegrityError):
                    self._writer.close()
                    self._writer = None
                raise

    def _read(self):
        return self._engine.connect()

    def _insert_unique(self, conn, stmt, values):
        """Execute an INSERT; False on a unique conflict, transaction intact."""
        try:
            if self._write_lock is None:
                with conn.begin_nested():        # PostgreSQL aborts otherwise
                    return conn.execute(stmt, values)
            return conn.execute(stmt, values)
        except sa_exc.IntegrityError:
            return False

    def _upsert(self, conn, table, values, update):
        """Insert ``values``, or update the ``update`` columns of the row there."""
        stmt = self._insert(table).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[c.name for c in table.primary_key.columns],
            set_={name: stmt.excluded[name] for name in update})
        conn.execute(stmt)

    def _scrub(self, text):
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _state_error(self, exc):
        detail = getattr(exc, "orig", None) or exc
        reason = "%s: %s: %s" % (self.url, type(detail).__name__, " ".join(str(detail).split()))
        return exception.StateError(reason=self._scrub(reason))

    # -- schema -----------------------------------------------------------

    @staticmethod
    def _stored_version(conn):
        if not sa.inspect(conn).has_table(SCHEMA_VERSION_TABLE.name):
            return 0
        return conn.execute(sa.select(SCHEMA_VERSION_TABLE.c.version)).scalar() or 0

    @_translate_errors
    def schema_version(self):
        """The stored version of the top's tables; 0 when never synced."""
        with self._read() as conn:
            return self._stored_version(conn)

    def check_schema(self):
        """Raise SchemaVersionError unless the tables are at TOP_SCHEMA_VERSION."""
        found = self.schema_version()
        if found != TOP_SCHEMA_VERSION:
            raise exception.SchemaVersionError(found=found, wanted=TOP_SCHEMA_VERSION)

    @_translate_errors
    def sync_schema(self):
        """Create or upgrade the top's tables; idempotent; returns the version.

        Raises SchemaVersionError if the database is newer than this code.
        """
        with self._write() as conn:
            if not self._is_sqlite:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SYNC_LOCK_KEY)))
            found = self._stored_version(conn)
            if found > TOP_SCHEMA_VERSION:
                raise exception.SchemaVersionError(found=found, wanted=TOP_SCHEMA_VERSION)
            if found == TOP_SCHEMA_VERSION:
                return found
            if found == 0:
                LOG.info("Creating the top schema in %s", self.url)
                MIGRATIONS[0](conn)
            else:
                for version in range(found, TOP_SCHEMA_VERSION):
                    LOG.info("Upgrading the top schema of %(url)s to version %(version)d",
                             {"url": self.url, "version": version + 1})
                    MIGRATIONS[version](conn)
            conn.execute(SCHEMA_VERSION_TABLE.delete())
            conn.execute(SCHEMA_VERSION_TABLE.insert().values(version=TOP_SCHEMA_VERSION))
        LOG.info("Top schema of %(url)s is at version %(version)d",
                 {"url": self.url, "version": TOP_SCHEMA_VERSION})
        return TOP_SCHEMA_VERSION

    def close(self):
        """Release connections. The store must not be used afterwards."""
        if self._write_lock is not None:
            with self._write_lock:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
        self._engine.dispose()

    # -- cells ------------------------------------------------------------

    @_translate_errors
    def put_cell(self, cell):
        """Insert or replace the record of ``cell`` (a TopCell)."""
        now = base.utcnow()
        values = {name: getattr(cell, name) for name in _CELL_FIELDS}
        values["flavor_costs"] = _dumps(values["flavor_costs"] or {})
        values.update(created_at=now, updated_at=now)
        with self._write() as conn:
            self._upsert(conn, CELLS, values,
                         [n for n in values if n not in ("name", "created_at")])

    @_translate_errors
    def get_cell(self, name):
        """The TopCell named ``name``; raises CellNotFound."""
        with self._read() as conn:
            row = conn.execute(CELLS.select().where(CELLS.c.name == name)).first()
        if row is None:
            raise exception.CellNotFound(cell_name=name)
        return _to_cell(row)

    @_translate_errors
    def list_cells(self):
        """Every TopCell, sorted by name."""
        with self._read() as conn:
            return [_to_cell(row) for row in conn.execute(CELLS.select().order_by(CELLS.c.name))]

    @_translate_errors
    def delete_cell(self, name):
        """Remove a cell record and its report row; raises CellNotFound.

        Instances recorded in the cell keep their ``cell_name``.
        """
        with self._write() as conn:
            conn.execute(REPORTS.delete().where(REPORTS.c.name == name))
            if conn.execute(CELLS.delete().where(CELLS.c.name == name)).rowcount != 1:
                raise exception.CellNotFound(cell_name=name)

    # -- reports ----------------------------------------------------------

    def _report_values(self, name, **values):
        row = {"name": name, "capacities": "{}", "capabilities": "{}", "last_seen": None,
               "capacities_at": None, "backoff_until": None, "failures": 0}
        row.update(values)
        return row

    @_translate_errors
    def save_capacities(self, name, capacities, seen_at):
        """Replace the capacities of ``name``; sets last_seen and capacities_at."""
        seen_at = to_naive_utc(seen_at, "seen_at")
        values = self._report_values(name, capacities=_dumps(capacities or {}),
                                     last_seen=seen_at, capacities_at=seen_at)
        with self._write() as conn:
            self._upsert(conn, REPORTS, values, ("capacities", "last_seen", "capacities_at"))

    @_translate_errors
    def save_capabilities(self, name, capabilities, seen_at):
        """Replace the capabilities of ``name``; sets last_seen."""
        values = self._report_values(name, capabilities=_dumps(capabilities or {}),
                                     last_seen=to_naive_utc(seen_at, "seen_at"))
        with self._write() as conn:
            self._upsert(conn, REPORTS, values, ("capabilities", "last_seen"))

    @_translate_errors
    def set_backoff(self, name, until, failures):
        """Record the build back-off of ``name`` (``until`` None: none)."""
        values = self._report_values(name, backoff_until=to_naive_utc(until, "until"),
                                     failures=int(failures or 0))
        with self._write() as conn:
            self._upsert(conn, REPORTS, values, ("backoff_until", "failures"))

    @_translate_errors
    def cell_reports(self):
        """{name: CellReport} for every report row, with or without a cell record."""
        with self._read() as conn:
            return {row.name: _to_report(row) for row in conn.execute(REPORTS.select())}

    # -- instances --------------------------------------------------------

    @_translate_errors
    def add_instances(self, instances):
        """Insert new TopInstances, all or none, in one transaction.

        ``created_at`` is kept when given (else now); ``updated_at`` is now.

        :returns: the stored TopInstances.
        :raises InstanceExists: if a uuid is already stored (deleted or not)
            or given twice; nothing is inserted then.
        """
        now = base.utcnow()
        rows = []
        for inst in instances:
            values = _instance_values({f: getattr(inst, f) for f in _INSTANCE_FIELDS},
                                      strict=False)
            values["uuid"] = inst.uuid
            values["created_at"] = values["created_at"] or now
            values["updated_at"] = now
            rows.append(values)
        if not rows:
            return []
        uuids = [r["uuid"] for r in rows]
        repeated = sorted({u for u in uuids if uuids.count(u) > 1})
        if repeated:
            raise exception.InstanceExists(name=", ".join(repeated))
        try:
            with self._write() as conn:
                taken = conn.execute(sa.select(INSTANCES.c.uuid).where(
                    INSTANCES.c.uuid.in_(uuids))).scalars().all()
                if taken:
                    raise exception.InstanceExists(name=", ".join(sorted(taken)))
                conn.execute(INSTANCES.insert(), rows)
        except sa_exc.IntegrityError:
            # Another process inserted one of them since the check above.
            raise exception.InstanceExists(name=", ".join(uuids))
        return [_to_instance(_Row(r)) for r in rows]

    @_translate_errors
    def get_instance(self, uuid, include_deleted=False):
        """The TopInstance; raises InstanceNotFound (also for a deleted one
        unless ``include_deleted``)."""
        with self._read() as conn:
            row = conn.execute(_SELECT_INSTANCE, {"b_uuid": uuid}).first()
        if row is None or (row.deleted and not include_deleted):
            raise exception.InstanceNotFound(instance_id=uuid)
        return _to_instance(row)

    @_translate_errors
    def find_instance(self, uuid_or_name):
        """A live instance by uuid, else by its (unique) name.

        :raises InstanceNotFound: if no live instance has that uuid or name.
        :raises AmbiguousServerName: if several live instances have the name.
        """
        live = INSTANCES.c.deleted.is_(False)
        with self._read() as conn:
            row = conn.execute(INSTANCES.select().where(
                INSTANCES.c.uuid == uuid_or_name, live)).first()
            if row is not None:
                return _to_instance(row)
            rows = conn.execute(INSTANCES.select().where(
                INSTANCES.c.name == uuid_or_name, live)
                .order_by(INSTANCES.c.created_at, INSTANCES.c.uuid)).all()
        if not rows:
            raise exception.InstanceNotFound(instance_id=uuid_or_name)
        if len(rows) > 1:
            raise exception.AmbiguousServerName(name=uuid_or_name,
                                                uuids=", ".join(r.uuid for r in rows))
        return _to_instance(rows[0])

    @_translate_errors
    def list_instances(self, include_deleted=False, cell_name=None):
        """TopInstances ordered by created_at then uuid."""
        stmt = INSTANCES.select().order_by(INSTANCES.c.created_at, INSTANCES.c.uuid)
        if not include_deleted:
            stmt = stmt.where(INSTANCES.c.deleted.is_(False))
        if cell_name is not None:
            stmt = stmt.where(INSTANCES.c.cell_name == cell_name)
        with self._read() as conn:
            return [_to_instance(row) for row in conn.execute(stmt)]

    @_translate_errors
    def update_instance(self, uuid, /, **fields):
        """Set the named fields (deleted rows too) and stamp updated_at.

        :returns: the updated TopInstance.
        :raises InstanceNotFound: if there is no such row.
        :raises ValueError: for a name that is not a TopInstance field, or
            is ``uuid`` or ``updated_at``.
        """
        values = _instance_values(fields)
        values["updated_at"] = base.utcnow()
        stmt = (INSTANCES.update().where(INSTANCES.c.uuid == uuid).values(**values)
                .returning(*INSTANCES.c))
        with self._write() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            raise exception.InstanceNotFound(instance_id=uuid)
        return _to_instance(row)

    @_translate_errors
    def update_at_top(self, uuid, fields, cell_name=None):
        """Apply an ``instance_update_at_top`` from a child, atomically.

        ``fields`` are the changed fields under TopInstance names; unknown
        names (and ``uuid``, ``updated_at``) are ignored. ``cell_name``, when
        not None, is recorded as the instance's cell.

        A missing row is created from ``fields`` (other fields take the
        TopInstance defaults: name "", vm_state "building"); no guard
        applies then. On an existing row the Stein guards apply first
        (``VM_STATE_GUARDS``, ``TASK_STATE_GUARDS``). A row deleted at the
        top stays deleted: the other fields are applied, but ``deleted``,
        ``deleted_at``, ``vm_state`` and ``task_state`` keep their values.
        ``created_at`` is taken from ``fields`` only when creating.

        :returns: (the stored TopInstance, True if the row was created).
        :raises InstanceUpdateRejected: a guard failed; nothing changed.
        :raises ValueError: a field value cannot be stored.
        """
        values = _instance_values(fields, strict=False)
        if cell_name is not None:
            values["cell_name"] = cell_name
        now = base.utcnow()

        def create(conn):
            row = {name: _instance_column(name, value)
                   for name, value in _INSTANCE_DEFAULTS.items()}
            row.update(values)
            row.update(uuid=uuid, created_at=row["created_at"] or now, updated_at=now)
            if row["deleted"] and row["deleted_at"] is None:
                row["deleted_at"] = now
            if self._insert_unique(conn, INSTANCES.insert(), row) is False:
                return None
            return _Row(row)

        with self._write() as conn:
            current = conn.execute(_LOCK_INSTANCE, {"b_uuid": uuid}).first()
            if current is None:
                created = create(conn)
                if created is not None:
                    return _to_instance(created), True
                # Another top process created it meanwhile: update that row.
                current = conn.execute(_LOCK_INSTANCE, {"b_uuid": uuid}).first()
            _check_guards(uuid, current, fields)
            values.pop("created_at", None)
            if current.deleted:
                for name in ("deleted", "deleted_at", "vm_state", "task_state"):
                    values.pop(name, None)
            elif values.get("deleted") and values.get("deleted_at") is None:
                values["deleted_at"] = now
            values["updated_at"] = now
            row = conn.execute(INSTANCES.update().where(INSTANCES.c.uuid == uuid)
                               .values(**values).returning(*INSTANCES.c)).first()
        return _to_instance(row), False

    @_translate_errors
    def destroy_instance(self, uuid):
        """Soft-delete: deleted, deleted_at now, vm_state "deleted", no task.

        :returns: True if a live row was deleted; False if the uuid is
            unknown or already deleted.
        """
        with self._write() as conn:
            return conn.execute(_DESTROY_INSTANCE,
                                {"b_uuid": uuid, "b_now": base.utcnow()}).rowcount == 1

    @_translate_errors
    def add_fault(self, uuid, fault):
        """Record a fault and make it the instance's latest ``fault``.

        ``fault`` is a dict of ``code`` (an int; 500 if missing), ``message``,
        ``details``, ``host`` and ``created_at`` (now if missing).

        :returns: False, recording nothing, if the instance is unknown.
        """
        stored = _fault(fault)
        host = fault.get("host")
        now = base.utcnow()
        with self._write() as conn:
            if conn.execute(_SET_FAULT, {"b_uuid": uuid, "b_fault": _dumps(stored),
                                         "b_now": now}).rowcount != 1:
                return False
            conn.execute(FAULTS.insert().values(
                instance_uuid=uuid, host=None if host is None else str(host), **stored))
        return True

    @_translate_errors
    def list_faults(self, uuid):
        """Every fault recorded for an instance, oldest first, as dicts."""
        stmt = (sa.select(FAULTS.c.code, FAULTS.c.message, FAULTS.c.details, FAULTS.c.host,
                          FAULTS.c.created_at)
                .where(FAULTS.c.instance_uuid == uuid)
                .order_by(FAULTS.c.created_at, FAULTS.c.id))
        with self._read() as conn:
            return [dict(row._mapping) for row in conn.execute(stmt)]

    @_translate_errors
    def due_builds(self, now):
        """Live, unacknowledged builds whose ``build_deadline`` is at or before ``now``."""
        stmt = (INSTANCES.select()
                .where(INSTANCES.c.build_deadline.is_not(None),
                       INSTANCES.c.build_deadline <= to_naive_utc(now, "now"),
                       INSTANCES.c.deleted.is_(False), INSTANCES.c.acked.is_(False),
                       INSTANCES.c.vm_state == objects.VmState.BUILDING)
                .order_by(INSTANCES.c.build_deadline, INSTANCES.c.created_at,
                          INSTANCES.c.uuid))
        with self._read() as conn:
            return [_to_instance(row) for row in conn.execute(stmt)]

    @_translate_errors
    def cell_usage(self):
        """What each cell runs, from the live rows that are placed in a cell.

        Rows in vm_state "error" (and "deleted", which a child may report
        before it destroys the instance) hold nothing and are not counted.

        :returns: ``{cell_name: {"instances": n, "vcpus": v, "ram_mb": r,
            "flavors": {flavor name: n}}}``; cells with nothing are absent,
            and rows whose flavor has no name count in all but ``flavors``.
        """
        stmt = (sa.select(INSTANCES.c.cell_name, INSTANCES.c.flavor)
                .where(INSTANCES.c.deleted.is_(False), INSTANCES.c.cell_name.is_not(None),
                       sa.func.coalesce(INSTANCES.c.vm_state, "").not_in(
                           _USAGE_EXCLUDED_STATES)))
        usage = {}
        with self._read() as conn:
            for cell_name, flavor in conn.execute(stmt):
                flavor = json.loads(flavor) if flavor else {}
                used = usage.setdefault(cell_name, {"instances": 0, "vcpus": 0, "ram_mb": 0,
                                                    "flavors": {}})
                used["instances"] += 1
                used["vcpus"] += _count(flavor.get("vcpus"))
                used["ram_mb"] += _count(flavor.get("memory_mb"))
                name = flavor.get("name")
                if name:        # a row a child created may not know its flavor
                    used["flavors"][name] = used["flavors"].get(name, 0) + 1
        return usage

    @_translate_errors
    def purge_deleted(self, older_than):
        """Remove rows deleted before ``older_than``, and their faults.

        :returns: the number of instance rows removed.
        """
        old = sa.and_(INSTANCES.c.deleted.is_(True),
                      sa.func.coalesce(INSTANCES.c.deleted_at, INSTANCES.c.updated_at)
                      < to_naive_utc(older_than, "older_than"))
        with self._write() as conn:
            conn.execute(FAULTS.delete().where(
                FAULTS.c.instance_uuid.in_(sa.select(INSTANCES.c.uuid).where(old))))
            count = conn.execute(INSTANCES.delete().where(old)).rowcount
        if count:
            LOG.info("Purged %(count)d deleted instances older than %(when)s",
                     {"count": count, "when": older_than})
        return count


class _Row:
    """Column values written by this process, read back like a result row."""

    def __init__(self, values):
        self._mapping = values


def _check_guards(uuid, current, fields):
    for key, guards, state in (("vm_state", VM_STATE_GUARDS, current.vm_state),
                               ("task_state", TASK_STATE_GUARDS, current.task_state)):
        if key not in fields or fields[key] not in guards:
            continue
        if state not in guards[fields[key]]:
            raise exception.InstanceUpdateRejected(reason=(
                "instance %s: %s %s only after %s, not %s" % (
                    uuid, key, fields[key],
                    " or ".join("null" if s is None else s for s in guards[fields[key]]),
                    "null" if state is None else state)))
