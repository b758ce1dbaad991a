"""MemoryStore: the contract in process memory."""

from cellagent import state
from cellagent.state import base
from cellagent.state import memory
from tests.unit.state.contract import StoreContract


class TestMemoryStore(StoreContract):
    persistent_schema = False
    shared_backend = False
    transactional = False

    def make_store(self):
        return state.get_store("memory://")

    def test_get_store_gives_memory_store(self, store):
        assert isinstance(store, memory.MemoryStore)

    # Where the contract needs a database, MemoryStore's own behaviour instead.

    def test_check_schema_raises_before_sync(self):
        store = self.new_store(sync=False)
        store.check_schema()        # nothing to create: always current
        assert store.schema_version() == base.SCHEMA_VERSION

    def test_sync_schema_concurrently(self):
        store = self.new_store(sync=False)
        assert [store.sync_schema() for _ in range(4)] == [base.SCHEMA_VERSION] * 4

    def test_two_stores_race(self):
        first, second = self.new_store(), self.new_store()
        first.begin_request("11111111-1111-1111-1111-111111111111", "m", None, "{}")
        assert second.unfinished() == []    # each MemoryStore is its own world
