"""SqlStore on the machine's real PostgreSQL: the Store contract, one database per test.

The server comes from ``CELLAGENT_TEST_PG_URL`` (a URL of its maintenance
database, by default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``).
A server that cannot be reached fails the tests: CI must not turn a missing
service into a green run.
"""

import os
import uuid

import pytest
import sqlalchemy as sa

from cellagent import exception
from cellagent.state import sql
from tests.unit.state.contract import StoreContract

pytestmark = pytest.mark.functional

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="module")
def pg_server():
    """An AUTOCOMMIT engine on the maintenance database (CREATE DATABASE needs it)."""
    url = sa.engine.make_url(os.environ.get("CELLAGENT_TEST_PG_URL", DEFAULT_URL))
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    error = None
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as exc:
        error = " ".join(str(exc.orig).split())
    if error:
        pytest.fail("PostgreSQL at %s is not reachable (set CELLAGENT_TEST_PG_URL): %s"
                    % (url.render_as_string(hide_password=True), error), pytrace=False)
    yield engine
    engine.dispose()


class TestPostgresqlStore(StoreContract):

    @pytest.fixture
    def store_env(self, pg_server):
        name = "cellagent_test_%s" % uuid.uuid4().hex
        with pg_server.connect() as conn:
            conn.execute(sa.text('CREATE DATABASE "%s"' % name))
        self.url = pg_server.url.set(database=name).render_as_string(hide_password=False)
        yield
        with pg_server.connect() as conn:
            conn.execute(sa.text('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name))

    def make_store(self):
        return sql.SqlStore(self.url, pool_size=4, max_overflow=8)

    def test_plain_postgresql_url_uses_psycopg(self):
        store = sql.SqlStore(self.url.replace("postgresql+psycopg://", "postgresql://"))
        self._opened.append(store)
        assert store._engine.url.drivername == "postgresql+psycopg"
        assert store.sync_schema() == sql.SCHEMA_VERSION

    def test_newer_schema_refused(self, store):
        with store._engine.begin() as conn:
            conn.execute(sql.SCHEMA_VERSION_TABLE.update().values(version=99))
        with pytest.raises(exception.SchemaVersionError):
            store.sync_schema()
        with pytest.raises(exception.SchemaVersionError):
            store.check_schema()

    def test_missing_database_is_state_error(self, pg_server):
        url = pg_server.url.set(database="cellagent_test_missing_%s" % uuid.uuid4().hex)
        store = sql.SqlStore(url.render_as_string(hide_password=False))
        self._opened.append(store)
        with pytest.raises(exception.StateError) as err:
            store.schema_version()
        assert "does not exist" in str(err.value)
