"""TopStore on the machine's real PostgreSQL: its contract, one database per test.

The server is the one ``test_store_postgresql.py`` uses (``pg_server``:
``CELLAGENT_TEST_PG_URL``, by default the local ``postgres`` user over
TCP). A server that cannot be reached fails the tests, never skips them.
"""

import uuid

import pytest
import sqlalchemy as sa

from cellagent import exception
from cellagent.state import top
from tests.functional.test_store_postgresql import pg_server  # noqa: F401 - fixture
from tests.unit.state.test_top_store import TopStoreContract

pytestmark = pytest.mark.functional


class TestPostgresqlTopStore(TopStoreContract):

    @pytest.fixture
    def store_env(self, pg_server):  # noqa: F811 - the imported fixture
        name = "cellagent_top_test_%s" % uuid.uuid4().hex
        with pg_server.connect() as conn:
            conn.execute(sa.text('CREATE DATABASE "%s"' % name))
        self.url = pg_server.url.set(database=name).render_as_string(hide_password=False)
        yield
        with pg_server.connect() as conn:
            conn.execute(sa.text('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name))

    def make_store(self):
        return top.TopStore(self.url, pool_size=4, max_overflow=8)

    def test_plain_postgresql_url_uses_psycopg(self):
        store = top.TopStore(self.url.replace("postgresql+psycopg://", "postgresql://"))
        self._opened.append(store)
        assert store._engine.url.drivername == "postgresql+psycopg"
        assert store.sync_schema() == top.TOP_SCHEMA_VERSION

    def test_update_at_top_locks_the_row(self, store):
        store.update_at_top("u-1", {"vm_state": "active"}, "aws")
        with store._engine.connect() as conn:
            sql_text = str(top._LOCK_INSTANCE.compile(conn))
        assert "FOR UPDATE" in sql_text

    def test_missing_database_is_state_error(self, pg_server):  # noqa: F811
        url = pg_server.url.set(database="cellagent_test_missing_%s" % uuid.uuid4().hex)
        store = top.TopStore(url.render_as_string(hide_password=False))
        self._opened.append(store)
        with pytest.raises(exception.StateError) as err:
            store.schema_version()
        assert "does not exist" in str(err.value)
