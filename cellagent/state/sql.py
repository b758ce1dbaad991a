"""SqlStore: the Store on SQLAlchemy Core, for SQLite (WAL) and PostgreSQL.

The contract is in ``state/base.py``. This module keeps the tables as data,
one transaction helper for writes and one for reads, and the schema versions.
"""

import collections
import concurrent.futures
import contextlib
import datetime
import functools
import logging
import os
import queue
import sqlite3
import threading
import zlib

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from cellagent import exception
from cellagent import jsonutils
from cellagent import objects
from cellagent.state import base
from cellagent.state.base import SCHEMA_VERSION

LOG = logging.getLogger(__name__)

# Schema choices that cannot be changed without a migration:
# - datetimes are naive UTC: SQLite has no time zone type, and one rule for
#   both databases beats two;
# - JSON is Text holding json.dumps output, not a JSON type, so the same
#   bytes work on SQLite and PostgreSQL;
# - duplicate detection (journal.msg_uuid, the operations primary key) is a
#   database constraint: it is the only thing two agent processes sharing a
#   PostgreSQL database both obey.
METADATA = sa.MetaData()

SCHEMA_VERSION_TABLE = sa.Table(
    "schema_version", METADATA,
    sa.Column("version", sa.Integer, nullable=False),
)

JOURNAL = sa.Table(
    "journal", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("msg_uuid", sa.String(36), nullable=False, unique=True),
    sa.Column("method", sa.String(255), nullable=False),
    sa.Column("instance_uuid", sa.String(36), nullable=True, index=True),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    # Startup replay and `journal list --status` would otherwise scan a
    # journal that only housekeeping keeps small.
    sa.Index("ix_journal_status", "status"),
)

OPERATIONS = sa.Table(
    "operations", METADATA,
    sa.Column("instance_uuid", sa.String(36), primary_key=True),
    sa.Column("operation", sa.String(64), primary_key=True),
    sa.Column("msg_uuid", sa.String(36), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

INSTANCES = sa.Table(
    "instances", METADATA,
    sa.Column("instance_uuid", sa.String(36), primary_key=True),
    sa.Column("backend_id", sa.String(255), nullable=False, default=""),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("vm_state", sa.String(32), nullable=False),
    sa.Column("task_state", sa.String(32), nullable=True),
    sa.Column("power_state", sa.Integer, nullable=False),
    sa.Column("flavor", sa.Text, nullable=False),
    sa.Column("image_ref", sa.String(255), nullable=False, default=""),
    sa.Column("addresses", sa.Text, nullable=False),
    sa.Column("launch_token", sa.String(255), nullable=False, default=""),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("project_id", sa.String(255), nullable=False, default="", index=True),
    sa.Column("instance", sa.Text, nullable=False),
    sa.Column("fault", sa.Text, nullable=False, default=""),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False, index=True),
)


def _create_current(conn):
    METADATA.create_all(conn)


# MIGRATIONS[n] takes a database from version n to n + 1; a new schema
# version appends one function. MIGRATIONS[0] creates the *current* tables,
# so a fresh database goes straight to SCHEMA_VERSION and the later entries
# only ever run on databases created by older code.
MIGRATIONS = [_create_current]
assert len(MIGRATIONS) == SCHEMA_VERSION

# Serialises concurrent `db sync` runs on one PostgreSQL database.
_SYNC_LOCK_KEY = zlib.crc32(b"cellagent.sync_schema")

# SQLite has one writer at a time. Left to itself, a second writer sleeps in
# the busy handler in growing steps, which under the agent's write rate costs
# far more than waiting on a lock; so writers of one process queue here, one
# lock per database file, and only other processes go through busy_timeout.
_SQLITE_LOCKS = {}
_SQLITE_LOCKS_GUARD = threading.Lock()


class _FifoLock:
    """A lock granted in request order, that tells whether anyone waits.

    ``threading.Lock`` lets the thread that releases it take it straight
    back; a consumer committing its batch between two messages would then
    starve the group-commit writer (and every worker waiting on it).
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._next = 0          # next ticket to hand out
        self._serving = 0       # ticket that holds the lock

    def acquire(self):
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()

    def release(self):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def waiting(self):
        """True if another thread waits for the lock (racy: a hint)."""
        return self._next - self._serving > 1

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _sqlite_lock(path):
    with _SQLITE_LOCKS_GUARD:
        return _SQLITE_LOCKS.setdefault(os.path.realpath(path), _FifoLock())


def _translate_errors(method):
    """Re-raise database failures as StateError with the password masked."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sa_exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise self._state_error(exc) from exc

    return wrapper


def setup_sqlite(engine, busy_timeout):
    """Connection setup of every SQLite engine of cellagent (the child's and the
    top's stores): WAL, busy timeout, and BEGIN IMMEDIATE for writes."""
    @sa.event.listens_for(engine, "connect")
    def on_connect(dbapi_conn, record):
        # pysqlite's own BEGIN handling defers BEGIN to the first DML and
        # commits before DDL; turn it off and emit BEGIN in on_begin.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA busy_timeout=%d" % int(busy_timeout))
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power cut may lose the last commits but
        # never corrupts; fsync per commit would cap us far below the
        # message rate.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def on_begin(conn):
        # A write takes SQLite's write lock at BEGIN: a deferred
        # transaction that read first could not wait for it later
        # (SQLITE_BUSY without the busy handler). Reads are single
        # statements, each its own snapshot: they need no BEGIN.
        # Straight to the driver, as this runs on every write.
        if conn.get_execution_options().get("cellagent_write"):
            conn.connection.driver_connection.execute("BEGIN IMMEDIATE")


class _BatchItem:
    __slots__ = ("fn", "result", "error", "done", "on_error", "future", "finish")

    def __init__(self, fn, on_error=None, future=None, finish=None):
        self.fn = fn
        # A journal entry's finish as data, (entry id, status, error,
        # operations, time), for the writer to join with its neighbours
        # (``SqlStore._finish_run``); ``fn`` does the same alone.
        self.finish = finish
        self.result = None
        self.error = None
        # Nobody waits for an item with ``on_error`` (it gets the failure)
        # or with a ``future`` (it gets the result or the failure).
        self.on_error = on_error
        self.future = future
        self.done = threading.Event() if on_error is None and future is None else None


class _Batch:
    """``SqlStore.batch()``: one thread's writes in one transaction.

    The transaction is opened at the first statement and, on SQLite, holds
    the process's write lock until ``commit``: the group-commit writer and
    other threads' writes wait for it, which is why callers commit before
    blocking on anything else.
    """

    def __init__(self, store):
        self._store = store
        self.conn = None
        self._trans = None
        self.failed = None

    def connection(self):
        if self.conn is None:
            store = self._store
            if store._write_lock is None:
                self.conn = store._engine.connect()
            else:
                store._write_lock.acquire()
                try:
                    self.conn = store._writer_connection()
                except BaseException:
                    store._write_lock.release()
                    raise
            try:
                self._trans = self.conn.begin()
            except BaseException:
                self._close(broken=True)
                raise
        return self.conn

    def commit(self):
        """Commit what was written so far; StateError if any of it failed."""
        if self.conn is None:
            return
        failed, self.failed = self.failed, None
        try:
            if failed is not None:
                raise failed
            self._trans.commit()
        except exception.StateError:
            self._close(broken=True)
            raise
        except (sa_exc.SQLAlchemyError, self._store._dbapi_error) as exc:
            self._close(broken=True)
            raise self._store._state_error(exc) from exc
        self._close()

    def waiting(self):
        """True if other threads wait for this transaction to end."""
        lock = self._store._write_lock
        return self.conn is not None and lock is not None and (
            lock.waiting() or not self._store._batch_queue_empty())

    def rollback(self):
        self.failed = None
        if self.conn is not None:
            self._close(broken=True)

    def _close(self, broken=False):
        store, conn, trans = self._store, self.conn, self._trans
        self.conn = self._trans = None
        try:
            if broken and trans is not None and trans.is_active:
                trans.rollback()
        except (sa_exc.SQLAlchemyError, store._dbapi_error):
            LOG.debug("Rollback of a failed batch failed too", exc_info=True)
        finally:
            if store._write_lock is None:
                conn.close()
            else:
                if broken:
                    # Start the next write on a fresh connection.
                    conn.close()
                    store._writer = None
                store._write_lock.release()


def _entry(row):
    return objects.JournalEntry(**row._mapping)


_INSERT_REQUEST = JOURNAL.insert()
_START_ATTEMPT = (
    JOURNAL.update()
    .where(JOURNAL.c.id == sa.bindparam("b_id"))
    .values(status=objects.JournalStatus.RUNNING, attempts=JOURNAL.c.attempts + 1,
            updated_at=sa.bindparam("b_now"))
    .returning(*JOURNAL.c))
_SET_STATUS = (
    JOURNAL.update()
    .where(JOURNAL.c.id == sa.bindparam("b_id"))
    .values(status=sa.bindparam("b_status"), updated_at=sa.bindparam("b_now")))
_FINISH_REQUEST = _SET_STATUS.values(error=sa.bindparam("b_error"))
_SELECT_UNFINISHED = (
    JOURNAL.select()
    .where(JOURNAL.c.status.in_(objects.JournalStatus.UNFINISHED))
    .order_by(JOURNAL.c.id))
_SELECT_REQUEST_BY_ID = JOURNAL.select().where(JOURNAL.c.id == sa.bindparam("b_key"))
_SELECT_REQUEST_BY_UUID = JOURNAL.select().where(JOURNAL.c.msg_uuid == sa.bindparam("b_key"))

_INSERT_OPERATION = OPERATIONS.insert()

# The hot statements of a build on SQLite, handed to the driver as they are
# (``exec_driver_sql``): no statement cache look-up, no bind processing. About
# half of a small insert's CPU time was SQLAlchemy's (issue 3 benchmark).
# Timestamps are then bound as text in SQLAlchemy's own SQLite format
# (``_sqlite_time``), so either path reads back what the other wrote.
_RAW_INSERT_REQUEST = (
    "INSERT INTO journal (msg_uuid, method, instance_uuid, payload, status, attempts, "
    "error, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_RAW_INSERT_OPERATION = (
    "INSERT INTO operations (instance_uuid, operation, msg_uuid, status, created_at, "
    "updated_at) VALUES (?, ?, ?, ?, ?, ?)")
_RAW_FINISH_REQUEST = "UPDATE journal SET status = ?, error = ?, updated_at = ? WHERE id = ?"
_RAW_FINISH_OPERATION = ("UPDATE operations SET status = ?, updated_at = ? "
                         "WHERE instance_uuid = ? AND operation = ?")
_RAW_FINISH_REQUESTS = ("UPDATE journal SET status = ?, error = ?, updated_at = ? "
                        "WHERE id IN (%s)")
_RAW_FINISH_OPERATIONS = ("UPDATE operations SET status = ?, updated_at = ? "
                          "WHERE operation = ? AND instance_uuid IN (%s)")
# Values in one IN list (SQLite before 3.32 allows 999 variables a statement).
_IN_LIMIT = 900


def _chunks(values, size):
    for start in range(0, len(values), size):
        yield values[start:start + size]


_INSTANCE_COLUMNS = [c.name for c in INSTANCES.c]
_RAW_INSERT_INSTANCE = "INSERT INTO instances (%s) VALUES (%s) ON CONFLICT (instance_uuid) " \
    "DO NOTHING" % (", ".join(_INSTANCE_COLUMNS), ", ".join("?" for _ in _INSTANCE_COLUMNS))
_RAW_UPSERT_INSTANCE = "INSERT INTO instances (%s) VALUES (%s) ON CONFLICT (instance_uuid) " \
    "DO UPDATE SET %s RETURNING created_at" % (
        ", ".join(_INSTANCE_COLUMNS), ", ".join("?" for _ in _INSTANCE_COLUMNS),
        ", ".join("%s = excluded.%s" % (c, c) for c in _INSTANCE_COLUMNS
                  if c not in ("instance_uuid", "created_at")))


_RAW_SELECT_INSTANCE_DICT = "SELECT instance FROM instances WHERE instance_uuid = ?"
_RAW_PUT_INSTANCE = "INSERT INTO instances (%s) VALUES (%s) ON CONFLICT (instance_uuid) " \
    "DO UPDATE SET %s" % (
        ", ".join(_INSTANCE_COLUMNS), ", ".join("?" for _ in _INSTANCE_COLUMNS),
        ", ".join("%s = excluded.%s" % (c, c) for c in _INSTANCE_COLUMNS
                  if c not in ("instance_uuid", "created_at")))
_SELECT_INSTANCE_DICT_FOR_UPDATE = (
    sa.select(INSTANCES.c.instance).where(INSTANCES.c.instance_uuid == sa.bindparam("b_uuid"))
    .with_for_update())


def _driver(conn):
    """The sqlite3 connection under a SQLAlchemy one, for the hot statements.

    Inside the transaction SQLAlchemy opened (``setup_sqlite`` emits the
    BEGIN on this very connection); errors are sqlite3's own, which
    ``_translate_errors`` and the writer handle as they do SQLAlchemy's.
    """
    return conn.connection.driver_connection


def _sqlite_time(value):
    """A naive datetime as SQLAlchemy's SQLite DateTime stores it."""
    return value.isoformat(" ", "microseconds")
_OPERATION_KEY = sa.and_(OPERATIONS.c.instance_uuid == sa.bindparam("b_uuid"),
                         OPERATIONS.c.operation == sa.bindparam("b_op"))
_SELECT_OPERATION = sa.select(OPERATIONS.c.instance_uuid, OPERATIONS.c.operation,
                              OPERATIONS.c.msg_uuid, OPERATIONS.c.status).where(_OPERATION_KEY)
_FINISH_OPERATION = (OPERATIONS.update().where(_OPERATION_KEY)
                     .values(status=base.OP_DONE, updated_at=sa.bindparam("b_now")))

_SELECT_INSTANCE = INSTANCES.select().where(
    INSTANCES.c.instance_uuid == sa.bindparam("b_uuid"))
_DELETE_INSTANCE = (
    INSTANCES.update()
    .where(INSTANCES.c.instance_uuid == sa.bindparam("b_uuid"))
    .values(deleted=True, state=objects.InstanceState.DELETED.value,
            vm_state=objects.VmState.DELETED, updated_at=sa.bindparam("b_now"))
    .returning(*INSTANCES.c))


class SqlStore(base.Store):
    """The Store on SQLite or PostgreSQL; see ``state/base.py``.

    :param url: a SQLAlchemy URL. ``postgresql://`` (and ``postgres://``)
        get the psycopg 3 driver; a SQLite file's directory is created.
    :param busy_timeout: milliseconds SQLite waits for another process's
        write lock (ignored on PostgreSQL).
    :param pool_size: connections kept open; ``max_overflow`` more may be
        opened under load, and a caller waits at most ``pool_timeout``
        seconds for one.
    :param pool_recycle: seconds after which a connection is replaced
        (PostgreSQL; -1 never).
    """

    def __init__(self, url, busy_timeout=10000, pool_size=10, max_overflow=20,
                 pool_timeout=30, pool_recycle=3600):
        url = sa.engine.make_url(url)
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")
        self._password = url.password
        self.url = url.render_as_string(hide_password=True)
        self._is_sqlite = url.get_backend_name() == "sqlite"

        kwargs = {"pool_size": pool_size, "max_overflow": max_overflow,
                  "pool_timeout": pool_timeout}
        if self._is_sqlite:
            path = url.database
            if not path or path == ":memory:" or path.startswith("file:"):
                raise exception.ConfigurationError(
                    reason="SQLite needs a database file path (each connection would see its "
                           "own in-memory database); use memory:// for a throwaway store")
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError as exc:
                raise exception.StateError(reason="%s: %s" % (self.url, exc)) from exc
            self._write_lock = _sqlite_lock(path)
        else:
            kwargs["pool_recycle"] = pool_recycle
            # PostgreSQL takes row locks itself; writers need no queue here.
            self._write_lock = None
        self._writer = None
        self._writer_cache_kb = 65536
        self._local = threading.local()     # .batch: the thread's open batch()
        self._batch_queue = None
        self._batch_thread = None

        try:
            self._engine = sa.create_engine(url, **kwargs)
        except (sa_exc.ArgumentError, ImportError) as exc:
            raise exception.ConfigurationError(
                reason="database %s: %s" % (self.url, self._scrub(str(exc)))) from exc
        self._dbapi_error = self._engine.dialect.loaded_dbapi.Error
        if self._is_sqlite:
            self._setup_sqlite(busy_timeout)

        # Insert, or on conflict overwrite every column but created_at, in
        # one statement (both dialects spell it ON CONFLICT DO UPDATE).
        # Spelled as text: SQLAlchemy cannot cache the compiled form of
        # on_conflict_do_update (no cache key), and compiling it on every call
        # cost ~1 ms, several times per build (issue 3 benchmark).
        cols = [c.name for c in INSTANCES.c]
        self._upsert_instance = sa.text(
            "INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (instance_uuid) DO UPDATE SET %s "
            "RETURNING created_at" % (
                INSTANCES.name, ", ".join(cols), ", ".join(":" + c for c in cols),
                ", ".join("%s = excluded.%s" % (c, c) for c in cols
                          if c not in ("instance_uuid", "created_at")))
        ).bindparams(*[sa.bindparam(c.name, type_=c.type) for c in INSTANCES.c]
                     ).columns(created_at=INSTANCES.c.created_at.type)
        self._insert_instance = sa.text(
            "INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (instance_uuid) DO NOTHING" % (
                INSTANCES.name, ", ".join(cols), ", ".join(":" + c for c in cols))
        ).bindparams(*[sa.bindparam(c.name, type_=c.type) for c in INSTANCES.c])
        LOG.debug("State store on %s", self.url)

    def __repr__(self):
        return "<SqlStore %s>" % self.url

    def _setup_sqlite(self, busy_timeout):
        setup_sqlite(self._engine, busy_timeout)

    # -- transaction helpers ----------------------------------------------

    @contextlib.contextmanager
    def _write(self):
        """One write transaction: committed on exit, rolled back on error."""
        if self._write_lock is None:
            with self._engine.begin() as conn:
                yield conn
            return
        # SQLite writes are serialised anyway, so they share one connection
        # instead of going through the pool: that nearly halves their cost.
        with self._write_lock:
            self._writer_connection()
            try:
                with self._writer.begin():
                    yield self._writer
            except (sa_exc.DBAPIError, sqlite3.Error) as exc:
                if not isinstance(exc, (sa_exc.IntegrityError, sqlite3.IntegrityError)):
                    # Start the next write on a fresh connection.
                    self._writer.close()
                    self._writer = None
                raise

    def _writer_connection(self):
        """The SQLite connection every write of this process goes through."""
        if self._writer is None:
            conn = self._engine.connect().execution_options(cellagent_write=True)
            # Inserts land on random pages of the uuid indexes: past a few
            # thousand instances SQLite's default 2 MB page cache misses on
            # most of them (issue 3 benchmark at 20,000 builds). Only this
            # connection writes, so only it gets the bigger cache.
            conn.connection.driver_connection.execute(
                "PRAGMA cache_size=-%d" % self._writer_cache_kb)
            self._writer = conn
        return self._writer

    def _batched(self, fn, on_error=None, future=None, finish=None):
        """Run ``fn(conn)`` in a write transaction; returns what it returns.

        On SQLite, writes from every thread go to one writer thread that
        commits whatever is queued as one transaction (group commit): the
        caller still returns only once its write is committed, but a burst
        of messages pays one BEGIN/COMMIT and one lock hand-off, not one per
        write. ``fn`` must leave the transaction usable when it fails: on
        SQLite a failed statement (a unique conflict) undoes only itself.
        PostgreSQL keeps one transaction per call.

        With ``on_error`` (SQLite's writer thread only) the call returns at
        once, with None: the write is done with the next group commit, and
        a failure goes to ``on_error(exc)`` on the writer thread. With
        ``future`` (likewise) the call returns at once and the writer
        completes the future after the commit: ``fn``'s result, or the
        failure as a StateError.
        """
        scope = getattr(self._local, "batch", None)
        if scope is not None:
            try:
                return fn(scope.connection())
            except exception.CellAgentError:
                raise
            except (sa_exc.IntegrityError, sqlite3.IntegrityError) as exc:
                # SQLite undoes only the failed statement; PostgreSQL aborts
                # the transaction.
                if self._write_lock is None:
                    scope.failed = self._state_error(exc)
                raise
            except Exception as exc:  # noqa: B902 - the batch cannot commit now
                scope.failed = self._state_error(exc)
                raise
        if self._write_lock is None:
            with self._write() as conn:
                return fn(conn)
        if self._batch_thread is None:
            with self._write_lock:
                if self._batch_thread is None:
                    self._batch_queue = queue.SimpleQueue()
                    self._batch_thread = threading.Thread(
                        target=self._batch_loop, name="sqlite-writer", daemon=True)
                    self._batch_thread.start()
        item = _BatchItem(fn, on_error, future, finish)
        self._batch_queue.put(item)
        if on_error is not None or future is not None:
            return None
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def _batch_queue_empty(self):
        return self._batch_queue is None or self._batch_queue.empty()

    def _batch_loop(self):
        while True:
            items = [self._batch_queue.get()]
            while items[-1] is not None and len(items) < 500:
                try:
                    items.append(self._batch_queue.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is None
            items = [i for i in items if i is not None]
            try:
                with self._write() as conn:
                    start = 0
                    while start < len(items):
                        end = start + 1
                        if items[start].finish is not None:
                            while end < len(items) and items[end].finish is not None:
                                end += 1
                            self._finish_run(items[start:end], conn)
                        else:
                            self._run_item(items[start], conn)
                        start = end
            except Exception:  # noqa: B902 - the batch failed: redo each alone
                for item in items:
                    item.error = None
                    try:
                        with self._write() as conn:
                            item.result = item.fn(conn)
                    except Exception as exc:  # noqa: B902 - handed to the caller
                        item.error = exc
            for item in items:
                if item.done is not None:
                    item.done.set()
                elif item.future is not None:
                    self._complete(item)
                elif item.error is not None:
                    try:
                        item.on_error(item.error)
                    except Exception:  # noqa: B902 - the writer must go on
                        LOG.exception("Reporting a failed write failed")
            if stop:
                return

    @staticmethod
    def _run_item(item, conn):
        try:
            item.result = item.fn(conn)
        except (sa_exc.IntegrityError, sqlite3.IntegrityError,
                exception.CellAgentError) as exc:
            item.error = exc      # this statement only

    def _finish_run(self, run, conn):
        """Finish consecutive journal entries in a few statements.

        One ``UPDATE ... WHERE id IN (...)`` for the entries of a status and
        error, one per operation name for their claims, instead of two
        statements an entry: each statement the sqlite3 module runs lets go
        of the GIL and must take it back, while the writer holds SQLite's
        write lock and every message waits on it (issue 3 benchmark). If an
        entry is missing, each entry of its group is finished alone, to
        tell which one failed.
        """
        raw = _driver(conn)
        stamp = _sqlite_time(max(item.finish[4] for item in run))
        groups = collections.defaultdict(list)
        for item in run:
            groups[item.finish[1:3]].append(item)
        alone = set()
        for (status, error), group in groups.items():
            for chunk in _chunks(group, _IN_LIMIT):
                count = raw.execute(
                    _RAW_FINISH_REQUESTS % ", ".join("?" * len(chunk)),
                    [status, error, stamp] + [item.finish[0] for item in chunk]).rowcount
                if count != len(chunk):
                    for item in chunk:
                        self._run_item(item, conn)      # with its claims
                        alone.add(id(item))
        claims = collections.defaultdict(list)
        for item in run:
            if id(item) not in alone:
                for uuid, op in item.finish[3]:
                    claims[op].append(uuid)
        for op, uuids in claims.items():
            for chunk in _chunks(uuids, _IN_LIMIT):
                raw.execute(_RAW_FINISH_OPERATIONS % ", ".join("?" * len(chunk)),
                            [base.OP_DONE, stamp, op] + chunk)

    def _complete(self, item):
        # Callbacks run here, on the writer thread: they must not block.
        try:
            if item.error is None:
                item.future.set_result(item.result)
                return
            exc = item.error
            if not isinstance(exc, exception.CellAgentError):
                exc = self._state_error(exc)
            item.future.set_exception(exc)
        except Exception:  # noqa: B902 - the writer must go on
            LOG.exception("A callback of a queued write failed")

    def _insert_unique(self, conn, stmt, values):
        """Execute an INSERT; False on a unique conflict, transaction intact."""
        try:
            if self._write_lock is None:
                with conn.begin_nested():        # PostgreSQL aborts otherwise
                    return conn.execute(stmt, values)
            return conn.execute(stmt, values)
        except sa_exc.IntegrityError:
            return False

    @contextlib.contextmanager
    def _read(self):
        scope = getattr(self._local, "batch", None)
        if scope is not None and scope.conn is not None:
            # Inside batch(): see this thread's uncommitted writes.
            yield scope.conn
            return
        with self._engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def batch(self):
        outer = getattr(self._local, "batch", None)
        if outer is not None:
            yield outer
            return
        scope = self._local.batch = _Batch(self)
        try:
            yield scope
        except BaseException:
            self._local.batch = None
            scope.rollback()
            raise
        self._local.batch = None
        scope.commit()

    def _scrub(self, text):
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _state_error(self, exc):
        detail = getattr(exc, "orig", None) or exc
        # One line: drivers put newlines in messages that end up in logs.
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
        with self._read() as conn:
            return self._stored_version(conn)

    def check_schema(self):
        found = self.schema_version()
        if found != SCHEMA_VERSION:
            raise exception.SchemaVersionError(found=found, wanted=SCHEMA_VERSION)

    @_translate_errors
    def sync_schema(self):
        # Both databases have transactional DDL, so a failed upgrade leaves
        # the previous version intact.
        with self._write() as conn:
            if not self._is_sqlite:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SYNC_LOCK_KEY)))
            found = self._stored_version(conn)
            if found > SCHEMA_VERSION:
                raise exception.SchemaVersionError(found=found, wanted=SCHEMA_VERSION)
            if found == SCHEMA_VERSION:
                return found
            if found == 0:
                LOG.info("Creating the state schema in %s", self.url)
                MIGRATIONS[0](conn)
            else:
                for version in range(found, SCHEMA_VERSION):
                    LOG.info("Upgrading the state schema of %(url)s to version %(version)d",
                             {"url": self.url, "version": version + 1})
                    MIGRATIONS[version](conn)
            conn.execute(SCHEMA_VERSION_TABLE.delete())
            conn.execute(SCHEMA_VERSION_TABLE.insert().values(version=SCHEMA_VERSION))
        LOG.info("State schema of %(url)s is at version %(version)d",
                 {"url": self.url, "version": SCHEMA_VERSION})
        return SCHEMA_VERSION

    def close(self):
        if self._batch_thread is not None:
            self._batch_queue.put(None)
            self._batch_thread.join(10)
            self._batch_thread = None
        if self._write_lock is not None:
            with self._write_lock:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
        self._engine.dispose()

    # -- journal ----------------------------------------------------------

    @_translate_errors
    def begin_request(self, msg_uuid, method, instance_uuid, payload, start=False):
        now = base.utcnow()
        values = {"msg_uuid": msg_uuid, "method": method, "instance_uuid": instance_uuid,
                  "payload": payload,
                  "status": (objects.JournalStatus.RUNNING if start
                             else objects.JournalStatus.RECEIVED),
                  "attempts": 1 if start else 0, "error": "", "created_at": now,
                  "updated_at": now}
        def insert(conn):
            if self._is_sqlite:
                try:
                    return _driver(conn).execute(_RAW_INSERT_REQUEST, (
                        msg_uuid, method, instance_uuid, payload, values["status"],
                        values["attempts"], "", _sqlite_time(now), _sqlite_time(now))
                    ).lastrowid
                except sqlite3.IntegrityError:
                    result = False
            else:
                result = self._insert_unique(conn, _INSERT_REQUEST, values)
            if result is not False:
                return result.inserted_primary_key[0]
            # Only a duplicate uuid is an expected conflict; anything else
            # (a NULL method, say) is a bug that must not pass as a duplicate.
            if conn.execute(_SELECT_REQUEST_BY_UUID, {"b_key": msg_uuid}).first() is None:
                raise exception.StateError(reason="journal insert of %s refused" % msg_uuid)
            return None

        entry_id = self._batched(insert)
        if entry_id is None:
            return None
        return objects.JournalEntry(id=entry_id, **values)

    @_translate_errors
    def start_attempt(self, entry_id):
        row = self._batched(lambda conn: conn.execute(
            _START_ATTEMPT, {"b_id": entry_id, "b_now": base.utcnow()}).first())
        if row is None:
            raise exception.StateError(reason="no journal entry %s" % entry_id)
        return _entry(row)

    def _set_status(self, stmt, params):
        params["b_now"] = base.utcnow()
        if self._batched(lambda conn: conn.execute(stmt, params).rowcount) != 1:
            raise exception.StateError(reason="no journal entry %s" % params["b_id"])

    @_translate_errors
    def finish_request(self, entry_id, status, error="", operations=()):
        base.check_final(status)
        self._batched(self._finish_fn(entry_id, status, error, operations))

    def _finish_fn(self, entry_id, status, error, operations):
        now = base.utcnow()
        params = {"b_id": entry_id, "b_status": status, "b_error": error or "",
                  "b_now": now}
        ops = [{"b_uuid": uuid, "b_op": op, "b_now": now} for uuid, op in operations]

        def finish(conn):
            if self._is_sqlite:
                stamp = _sqlite_time(now)
                count = _driver(conn).execute(
                    _RAW_FINISH_REQUEST, (status, params["b_error"], stamp, entry_id)).rowcount
            else:
                count = conn.execute(_FINISH_REQUEST, params).rowcount
            if count != 1:
                raise exception.StateError(reason="no journal entry %s" % entry_id)
            if ops and self._is_sqlite:
                _driver(conn).executemany(_RAW_FINISH_OPERATION, [
                    (base.OP_DONE, stamp, uuid, op) for uuid, op in operations])
            elif ops:
                conn.execute(_FINISH_OPERATION, ops)

        return finish

    @_translate_errors
    def requeue(self, entry_id):
        self._set_status(_SET_STATUS, {"b_id": entry_id,
                                       "b_status": objects.JournalStatus.RECEIVED})

    @_translate_errors
    def unfinished(self):
        with self._read() as conn:
            return [_entry(row) for row in conn.execute(_SELECT_UNFINISHED)]

    @_translate_errors
    def list_requests(self, limit=50, status=None):
        stmt = JOURNAL.select().order_by(JOURNAL.c.id.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(JOURNAL.c.status == status)
        with self._read() as conn:
            return [_entry(row) for row in conn.execute(stmt)]

    @_translate_errors
    def get_request(self, entry_id_or_msg_uuid):
        key = entry_id_or_msg_uuid
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            stmt, key = _SELECT_REQUEST_BY_ID, int(key)
        else:
            stmt = _SELECT_REQUEST_BY_UUID
        with self._read() as conn:
            row = conn.execute(stmt, {"b_key": key}).first()
        return _entry(row) if row is not None else None

    @_translate_errors
    def purge_requests(self, older_than):
        stmt = JOURNAL.delete().where(
            JOURNAL.c.status.not_in(objects.JournalStatus.UNFINISHED),
            JOURNAL.c.updated_at < older_than)
        with self._write() as conn:
            count = conn.execute(stmt).rowcount
        LOG.info("Purged %(count)d journal entries older than %(when)s",
                 {"count": count, "when": older_than})
        return count

    # -- operation claims -------------------------------------------------

    @_translate_errors
    def claim_operation(self, instance_uuid, operation, msg_uuid):
        now = base.utcnow()
        values = {"instance_uuid": instance_uuid, "operation": operation,
                  "msg_uuid": msg_uuid, "status": base.OP_CLAIMED,
                  "created_at": now, "updated_at": now}

        def claim(conn):
            if self._is_sqlite:
                stamp = _sqlite_time(now)
                try:
                    _driver(conn).execute(_RAW_INSERT_OPERATION, (
                        instance_uuid, operation, msg_uuid, base.OP_CLAIMED, stamp, stamp))
                    return True
                except sqlite3.IntegrityError:
                    pass
            elif self._insert_unique(conn, _INSERT_OPERATION, values) is not False:
                return True
            # Someone holds it: ours only if it is our own unfinished claim.
            # Claims are never deleted, so the row is there to read.
            held = conn.execute(_SELECT_OPERATION, {"b_uuid": instance_uuid,
                                                    "b_op": operation}).first()
            if held is None:
                raise exception.StateError(reason="claim of %s refused" % instance_uuid)
            return held.msg_uuid == msg_uuid and held.status == base.OP_CLAIMED

        return self._batched(claim)

    @_translate_errors
    def finish_operation(self, instance_uuid, operation):
        params = {"b_uuid": instance_uuid, "b_op": operation, "b_now": base.utcnow()}
        self._batched(lambda conn: conn.execute(_FINISH_OPERATION, params))

    @_translate_errors
    def get_operation(self, instance_uuid, operation):
        with self._read() as conn:
            row = conn.execute(_SELECT_OPERATION,
                               {"b_uuid": instance_uuid, "b_op": operation}).first()
        return dict(row._mapping) if row is not None else None

    # -- instance map -----------------------------------------------------

    @_translate_errors
    def put_instance(self, record):
        now = base.utcnow()
        values = base.record_values(record)
        values.update(created_at=now, updated_at=now)
        if self._is_sqlite:
            stamp = _sqlite_time(now)
            raw = dict(values, created_at=stamp, updated_at=stamp)
            params = tuple(raw[c] for c in _INSTANCE_COLUMNS)
            created = self._batched(lambda conn: _driver(conn).execute(
                _RAW_UPSERT_INSTANCE, params).fetchall()[0][0])
            values["created_at"] = datetime.datetime.fromisoformat(created)
        else:
            values["created_at"] = self._batched(
                lambda conn: conn.execute(self._upsert_instance, values).scalar_one())
        return base.to_record(values)

    @_translate_errors
    def report_instance(self, record, fields):
        data = self._batched(self._report_fn(record, fields))
        record.instance = data
        return data

    def report_instance_later(self, record, fields):
        if self._write_lock is None or getattr(self._local, "batch", None) is not None:
            return super().report_instance_later(record, fields)
        # SQLite: queued for the writer's next group commit, not waited for.
        fut = concurrent.futures.Future()
        self._batched(self._report_fn(record, fields), future=fut)
        return fut

    def _report_fn(self, record, fields):
        # One write: the stored instance dict is read inside it (SQLite: on
        # the writer's connection, whose transaction holds the write lock;
        # PostgreSQL: SELECT ... FOR UPDATE), instead of a read through the
        # pool then a write.
        now = base.utcnow()
        values = base.record_values(record, skip=("instance",))
        uuid = record.instance_uuid

        def report(conn):
            if self._is_sqlite:
                raw = _driver(conn)
                row = raw.execute(_RAW_SELECT_INSTANCE_DICT, (uuid,)).fetchall()
            else:
                row = conn.execute(_SELECT_INSTANCE_DICT_FOR_UPDATE, {"b_uuid": uuid}).all()
            data = jsonutils.loads(row[0][0]) if row and row[0][0] else dict(record.instance)
            data.update(fields)
            values["instance"] = jsonutils.dumps(data, default=base._json_default)
            if self._is_sqlite:
                stamp = _sqlite_time(now)
                full = dict(values, created_at=stamp, updated_at=stamp)
                raw.execute(_RAW_PUT_INSTANCE, tuple(full[c] for c in _INSTANCE_COLUMNS))
            else:
                conn.execute(self._upsert_instance, dict(values, created_at=now,
                                                          updated_at=now)).all()
            return data

        return report

    def finish_request_later(self, entry_id, status, error="", operations=()):
        if self._write_lock is None or getattr(self._local, "batch", None) is not None:
            return super().finish_request_later(entry_id, status, error, operations)
        # SQLite: queued for the writer's next group commit, not waited for.
        base.check_final(status)

        def failed(exc):
            if not isinstance(exc, exception.CellAgentError):
                exc = self._state_error(exc)
            LOG.error("Could not finish journal entry %(id)s: %(err)s",
                      {"id": entry_id, "err": exc.message})

        operations = tuple(operations)
        self._batched(self._finish_fn(entry_id, status, error, operations), on_error=failed,
                      finish=(entry_id, status, error or "", operations, base.utcnow()))

    @_translate_errors
    def add_instance(self, record):
        now = base.utcnow()
        values = base.record_values(record)
        values.update(created_at=now, updated_at=now)

        def add(conn):
            if self._is_sqlite:
                stamp = _sqlite_time(now)
                raw = dict(values, created_at=stamp, updated_at=stamp)
                inserted = _driver(conn).execute(
                    _RAW_INSERT_INSTANCE, tuple(raw[c] for c in _INSTANCE_COLUMNS)).rowcount
            else:
                inserted = conn.execute(self._insert_instance, values).rowcount
            if inserted == 1:
                return None
            return conn.execute(_SELECT_INSTANCE, {"b_uuid": record.instance_uuid}).first()

        row = self._batched(add)
        return base.to_record(row._mapping) if row is not None else None

    @_translate_errors
    def get_instance(self, instance_uuid):
        with self._read() as conn:
            row = conn.execute(_SELECT_INSTANCE, {"b_uuid": instance_uuid}).first()
        return base.to_record(row._mapping) if row is not None else None

    @_translate_errors
    def update_instance(self, instance_uuid, **fields):
        values = base.instance_values(fields)
        values["updated_at"] = base.utcnow()
        # Compiled once per set of field names (SQLAlchemy's statement cache).
        stmt = (INSTANCES.update()
                .where(INSTANCES.c.instance_uuid == instance_uuid)
                .values(**values)
                .returning(*INSTANCES.c))
        row = self._batched(lambda conn: conn.execute(stmt).first())
        if row is None:
            raise exception.InstanceNotFound(instance_id=instance_uuid)
        return base.to_record(row._mapping)

    @_translate_errors
    def delete_instance(self, instance_uuid):
        params = {"b_uuid": instance_uuid, "b_now": base.utcnow()}
        row = self._batched(lambda conn: conn.execute(_DELETE_INSTANCE, params).first())
        if row is None:
            raise exception.InstanceNotFound(instance_id=instance_uuid)
        return base.to_record(row._mapping)

    @_translate_errors
    def purge_deleted(self, older_than):
        stmt = INSTANCES.delete().where(INSTANCES.c.deleted.is_(True),
                                        INSTANCES.c.updated_at < older_than)
        with self._write() as conn:
            count = conn.execute(stmt).rowcount
        LOG.info("Purged %(count)d deleted instances older than %(when)s",
                 {"count": count, "when": older_than})
        return count

    @_translate_errors
    def list_instances(self, include_deleted=False, project_id=None,
                       updated_since=None, states=None):
        stmt = INSTANCES.select().order_by(INSTANCES.c.created_at, INSTANCES.c.instance_uuid)
        if not include_deleted:
            stmt = stmt.where(INSTANCES.c.deleted.is_(False))
        if project_id is not None:
            stmt = stmt.where(INSTANCES.c.project_id == project_id)
        if updated_since is not None:
            stmt = stmt.where(INSTANCES.c.updated_at >= updated_since)
        if states is not None:
            stmt = stmt.where(INSTANCES.c.state.in_(
                [objects.InstanceState(s).value for s in states]))
        with self._read() as conn:
            return [base.to_record(row._mapping) for row in conn.execute(stmt)]

    @_translate_errors
    def list_instance_states(self):
        stmt = sa.select(INSTANCES.c.instance_uuid, INSTANCES.c.backend_id,
                         INSTANCES.c.state).where(INSTANCES.c.deleted.is_(False))
        with self._read() as conn:
            return [(uuid, bid, objects.InstanceState(state))
                    for uuid, bid, state in conn.execute(stmt)]

    @_translate_errors
    def count_instances(self, include_deleted=False):
        stmt = sa.select(sa.func.count()).select_from(INSTANCES)
        if not include_deleted:
            stmt = stmt.where(INSTANCES.c.deleted.is_(False))
        with self._read() as conn:
            return conn.execute(stmt).scalar_one()
