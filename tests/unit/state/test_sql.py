"""SqlStore on SQLite: the contract on a temporary file, plus SQLite specifics."""

import concurrent.futures
import sqlite3
import time

import pytest
import sqlalchemy as sa

from cellagent import exception
from cellagent import objects
from cellagent import state
from cellagent.state import base
from cellagent.state import sql
from tests.unit.state.contract import StoreContract


class TestSqliteStore(StoreContract):

    @pytest.fixture
    def store_env(self, tmp_path):
        self.path = tmp_path / "state" / "cellagent.sqlite"
        self.url = "sqlite:///%s" % self.path
        yield

    def make_store(self):
        return sql.SqlStore(self.url)

    def test_get_store_gives_sql_store(self):
        store = state.get_store(self.url, busy_timeout=500, pool_size=2)
        self._opened.append(store)
        assert isinstance(store, sql.SqlStore)

    def test_wal_and_pragmas(self, store):
        with store._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1    # NORMAL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
        # WAL is a property of the file, seen by any other client too.
        with sqlite3.connect(self.path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def test_parent_directory_created(self, tmp_path):
        path = tmp_path / "a" / "b" / "c" / "db.sqlite"
        store = sql.SqlStore("sqlite:///%s" % path)
        self._opened.append(store)
        store.sync_schema()
        assert path.is_file()

    def test_in_memory_sqlite_refused(self):
        for url in ("sqlite://", "sqlite:///:memory:"):
            with pytest.raises(exception.ConfigurationError):
                sql.SqlStore(url)

    def test_newer_schema_refused(self, store):
        with store._engine.begin() as conn:
            conn.execute(sql.SCHEMA_VERSION_TABLE.update().values(version=99))
        assert store.schema_version() == 99
        with pytest.raises(exception.SchemaVersionError) as err:
            store.check_schema()
        assert err.value.kwargs == {"found": 99, "wanted": sql.SCHEMA_VERSION, "code": 500}
        with pytest.raises(exception.SchemaVersionError):
            store.sync_schema()
        assert store.schema_version() == 99

    def test_tables_match_metadata(self, store):
        inspector = sa.inspect(store._engine)
        assert set(inspector.get_table_names()) == set(sql.METADATA.tables)
        unique = inspector.get_unique_constraints("journal")
        indexes = inspector.get_indexes("journal")
        assert any(u["column_names"] == ["msg_uuid"] for u in unique) or any(
            i["column_names"] == ["msg_uuid"] and i["unique"] for i in indexes)
        assert inspector.get_pk_constraint("operations")["constrained_columns"] == [
            "instance_uuid", "operation"]

    def test_database_error_is_state_error(self, store):
        store.close()    # last close checkpoints the WAL into the file: do it first
        with open(self.path, "wb") as f:
            f.write(b"this is not a database" * 1000)
        with pytest.raises(exception.StateError) as err:
            store.get_instance("x")
        assert str(self.path) in str(err.value)

    def test_sqlite_error_never_shows_password(self, tmp_path):
        # SQLite has no passwords, but a URL carrying one must not leak it.
        with pytest.raises(exception.CellAgentError) as err:
            sql.SqlStore("sqlite://user:s3cr3tpw@/%s" % (tmp_path / "db"))
        assert "s3cr3tpw" not in str(err.value)
        assert "s3cr3tpw" not in repr(err.value.kwargs)
        assert "user:***@" in str(err.value)

    def test_postgresql_error_never_shows_password(self):
        # Nothing listens on loopback port 1: the connection is refused at once.
        store = sql.SqlStore("postgresql://bob:s3cr3tpw@127.0.0.1:1/cellagent")
        self._opened.append(store)
        assert store._engine.url.drivername == "postgresql+psycopg"
        with pytest.raises(exception.StateError) as err:
            store.begin_request("u", "m", None, "{}")
        assert "s3cr3tpw" not in str(err.value)
        assert "bob:***@127.0.0.1" in str(err.value)

    def test_two_stores_share_one_write_lock(self):
        first, second = self.new_store(sync=False), self.new_store(sync=False)
        assert first._write_lock is second._write_lock

    def test_finishes_queued_together_are_written_together(self, store, caplog):
        """The writer joins queued finishes into a few statements; an entry
        that is missing fails alone, the others and their claims are done."""
        JS = objects.JournalStatus
        entries = []
        for n in range(1, 41):
            msg, inst = "aaaaaaaa-0000-4000-8000-%012d" % n, "bbbbbbbb-0000-4000-8000-%012d" % n
            entries.append((store.begin_request(msg, "m", inst, "{}", start=True).id, inst))
            assert store.claim_operation(inst, "build", msg)
        missing = 999999
        # Queued while this thread holds the write lock: one writer batch.
        with store.batch():
            store.begin_request("cccccccc-0000-4000-8000-000000000001", "m", None, "{}",
                                start=True)
            with concurrent.futures.ThreadPoolExecutor(1) as other:
                def queue_all():
                    for i, (entry_id, inst) in enumerate(entries):
                        status, error = (JS.DONE, "") if i % 3 else (JS.FAILED, "boom")
                        store.finish_request_later(entry_id, status, error,
                                                   operations=[(inst, "build")])
                        if i == 20:
                            store.finish_request_later(missing, JS.DONE)
                other.submit(queue_all).result()
        deadline = time.monotonic() + 10
        while (store.get_request(entries[-1][0]).status == JS.RUNNING
               and time.monotonic() < deadline):
            time.sleep(0.01)
        for i, (entry_id, inst) in enumerate(entries):
            entry = store.get_request(entry_id)
            assert (entry.status, entry.error) == ((JS.DONE, "") if i % 3
                                                   else (JS.FAILED, "boom"))
            assert store.get_operation(inst, "build")["status"] == base.OP_DONE
        deadline = time.monotonic() + 10
        while "999999" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "Could not finish journal entry 999999" in caplog.text
