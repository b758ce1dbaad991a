"""MemoryStore: the contract in process memory."""

from cellagent import state
from cellagent.state import memory
from tests.unit.state.contract import StoreContract


class TestMemoryStore(StoreContract):
    persistent_schema = False
    shared_backend = False

    def make_store(self):
        return state.get_store("memory://")

    def test_get_store_gives_memory_store(self, store):
        assert isinstance(store, memory.MemoryStore)
