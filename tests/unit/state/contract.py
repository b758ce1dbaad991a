"""StoreContract: the Store behaviour, written once, run on every implementation.

A test module mixes it into a ``Test*`` class and provides ``make_store()``
(and, to give each test a fresh database, overrides the ``store_env``
fixture). ``new_store()`` builds, syncs and later closes stores.
"""

import datetime
import threading
import time
import uuid

import pytest

from cellagent import exception
from cellagent import objects
from cellagent.state import base

JS = objects.JournalStatus
IS = objects.InstanceState


def _uuid(n):
    return str(uuid.UUID(int=n))


def tick():
    """Wait until the clock has moved, so that the next stamp is later."""
    start = base.utcnow()
    while base.utcnow() == start:
        pass


def run_threads(count, target):
    """Run ``target(index)`` in ``count`` threads started together.

    Returns the results by index; re-raises the first exception.
    """
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def run(index):
        try:
            barrier.wait()
            results[index] = target(index)
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "threads hung"
    if errors:
        raise errors[0]
    return results


class StoreContract:
    # False for a store with no schema to create (MemoryStore).
    persistent_schema = True
    # True when two make_store() calls reach the same data.
    shared_backend = True
    # False when batch() groups nothing (each write commits at once).
    transactional = True

    def make_store(self):
        raise NotImplementedError

    @pytest.fixture
    def store_env(self):
        """Override to set up what make_store() needs, such as a fresh database."""
        yield

    @pytest.fixture(autouse=True)
    def _stores(self, store_env):
        self._opened = []
        yield
        for store in self._opened:
            store.close()

    def new_store(self, sync=True):
        store = self.make_store()
        self._opened.append(store)
        if sync:
            store.sync_schema()
        return store

    @pytest.fixture
    def store(self):
        return self.new_store()

    # -- schema -----------------------------------------------------------

    def test_schema_current_after_sync(self, store):
        assert store.schema_version() == base.SCHEMA_VERSION
        store.check_schema()

    def test_sync_schema_idempotent(self, store):
        entry = store.begin_request(_uuid(1), "m", None, "{}")
        assert store.sync_schema() == base.SCHEMA_VERSION
        assert store.sync_schema() == base.SCHEMA_VERSION
        assert store.get_request(entry.id) == entry
        store.check_schema()

    def test_check_schema_raises_before_sync(self):
        if not self.persistent_schema:
            pytest.skip("no schema to create")
        store = self.new_store(sync=False)
        assert store.schema_version() == 0
        with pytest.raises(exception.SchemaVersionError) as err:
            store.check_schema()
        assert err.value.kwargs["found"] == 0
        assert err.value.kwargs["wanted"] == base.SCHEMA_VERSION
        store.sync_schema()
        store.check_schema()

    def test_sync_schema_concurrently(self):
        if not (self.persistent_schema and self.shared_backend):
            pytest.skip("no shared schema")
        stores = [self.new_store(sync=False) for _ in range(4)]
        assert run_threads(4, lambda i: stores[i].sync_schema()) == [base.SCHEMA_VERSION] * 4
        for store in stores:
            store.check_schema()

    # -- journal ----------------------------------------------------------

    def test_begin_request(self, store):
        entry = store.begin_request(_uuid(1), "build_instances", _uuid(99), '{"a": "\u00e9"}')
        assert isinstance(entry.id, int)
        assert (entry.msg_uuid, entry.method, entry.instance_uuid) == (
            _uuid(1), "build_instances", _uuid(99))
        assert entry.payload == '{"a": "\u00e9"}'
        assert (entry.status, entry.attempts, entry.error) == (JS.RECEIVED, 0, "")
        assert entry.created_at.tzinfo is None
        assert entry.created_at == entry.updated_at
        assert store.get_request(entry.id) == entry

    def test_begin_request_started(self, store):
        entry = store.begin_request(_uuid(1), "build_instances", None, "{}", start=True)
        assert (entry.status, entry.attempts) == (JS.RUNNING, 1)
        assert store.get_request(entry.id) == entry
        assert [e.id for e in store.unfinished()] == [entry.id]
        assert store.begin_request(_uuid(1), "build_instances", None, "{}", start=True) is None

    def test_begin_request_without_instance(self, store):
        entry = store.begin_request(_uuid(1), "update_capabilities", None, "{}")
        assert store.get_request(entry.id).instance_uuid is None

    def test_duplicate_msg_uuid_returns_none(self, store):
        first = store.begin_request(_uuid(1), "m", None, "{}")
        assert store.begin_request(_uuid(1), "other", None, "[]") is None
        store.finish_request(first.id, JS.DONE)
        assert store.begin_request(_uuid(1), "m", None, "{}") is None
        assert len(store.list_requests()) == 1

    def test_start_attempt_counts(self, store):
        entry = store.begin_request(_uuid(1), "m", None, "{}")
        first = store.start_attempt(entry.id)
        assert (first.status, first.attempts) == (JS.RUNNING, 1)
        assert first.updated_at >= entry.updated_at
        second = store.start_attempt(entry.id)
        assert second.attempts == 2
        assert store.get_request(entry.id) == second
        assert second.created_at == entry.created_at

    def test_start_attempt_missing(self, store):
        with pytest.raises(exception.StateError):
            store.start_attempt(12345)

    @pytest.mark.parametrize("status", [JS.DONE, JS.FAILED, JS.DROPPED])
    def test_finish_request(self, store, status):
        entry = store.begin_request(_uuid(1), "m", None, "{}")
        store.start_attempt(entry.id)
        store.finish_request(entry.id, status, error="boom" if status == JS.FAILED else "")
        got = store.get_request(entry.id)
        assert got.status == status
        assert got.error == ("boom" if status == JS.FAILED else "")
        assert got.attempts == 1

    def test_finish_request_rejects_unfinished_status(self, store):
        entry = store.begin_request(_uuid(1), "m", None, "{}")
        with pytest.raises(ValueError):
            store.finish_request(entry.id, JS.RUNNING)
        assert store.get_request(entry.id).status == JS.RECEIVED

    def test_finish_request_missing(self, store):
        with pytest.raises(exception.StateError):
            store.finish_request(12345, JS.DONE)

    def test_finish_request_finishes_its_claims(self, store):
        entry = store.begin_request(_uuid(1), "m", _uuid(2), "{}", start=True)
        assert store.claim_operation(_uuid(2), "build", _uuid(1))
        assert store.claim_operation(_uuid(3), "build", _uuid(1))
        assert store.claim_operation(_uuid(4), "build", _uuid(1))
        store.finish_request(entry.id, JS.DONE,
                             operations=[(_uuid(2), "build"), (_uuid(3), "build")])
        assert store.get_request(entry.id).status == JS.DONE
        for n, status in ((2, base.OP_DONE), (3, base.OP_DONE), (4, base.OP_CLAIMED)):
            assert store.get_operation(_uuid(n), "build")["status"] == status
        assert not store.claim_operation(_uuid(2), "build", _uuid(1))

    def test_finish_request_missing_changes_no_claim(self, store):
        assert store.claim_operation(_uuid(2), "build", _uuid(1))
        with pytest.raises(exception.StateError):
            store.finish_request(12345, JS.DONE, operations=[(_uuid(2), "build")])
        assert store.get_operation(_uuid(2), "build")["status"] == base.OP_CLAIMED

    def test_add_instance_inserts_once(self, store):
        assert store.add_instance(self._record(1)) is None
        got = store.get_instance(_uuid(1))
        assert got.backend_id == "i-0001" and got.created_at is not None
        again = store.add_instance(self._record(1, backend_id="i-other"))
        assert again.backend_id == "i-0001"
        assert store.get_instance(_uuid(1)).backend_id == "i-0001"

    def test_add_instance_returns_a_tombstone(self, store):
        store.put_instance(self._record(1))
        store.delete_instance(_uuid(1))
        got = store.add_instance(self._record(1))
        assert got.deleted
        assert store.get_instance(_uuid(1)).deleted

    def test_batch_commits_on_exit(self, store):
        with store.batch() as batch:
            entry = store.begin_request(_uuid(1), "m", _uuid(2), "{}", start=True)
            assert store.begin_request(_uuid(1), "m", None, "{}") is None
            assert store.claim_operation(_uuid(2), "build", _uuid(1))
            assert not store.claim_operation(_uuid(2), "build", _uuid(9))
            store.put_instance(self._record(2))
            assert store.get_instance(_uuid(2)).backend_id == "i-0002"
            assert store.get_request(_uuid(1)).id == entry.id
            batch.commit()
            store.finish_request(entry.id, JS.DONE, operations=[(_uuid(2), "build")])
            with store.batch():         # nested: joins the outer one
                store.update_instance(_uuid(2), backend_id="i-9")
        assert store.get_request(entry.id).status == JS.DONE
        assert store.get_operation(_uuid(2), "build")["status"] == base.OP_DONE
        assert store.get_instance(_uuid(2)).backend_id == "i-9"

    def test_batch_rolls_back_after_the_last_commit(self, store):
        with pytest.raises(RuntimeError):
            with store.batch() as batch:
                store.begin_request(_uuid(1), "m", None, "{}")
                batch.commit()
                store.begin_request(_uuid(2), "m", None, "{}")
                store.put_instance(self._record(3))
                raise RuntimeError("consumer failed")
        assert store.get_request(_uuid(1)) is not None
        # A store without transactions (batch() groups nothing) kept them.
        kept = not self.transactional
        assert (store.get_request(_uuid(2)) is not None) == kept
        assert (store.get_instance(_uuid(3)) is not None) == kept
        # The store is usable afterwards; the duplicate check still holds.
        assert (store.begin_request(_uuid(2), "m", None, "{}") is None) == kept

    def test_batch_is_not_seen_by_other_threads_before_commit(self, store):
        with store.batch() as batch:
            store.begin_request(_uuid(1), "m", None, "{}")
            seen = run_threads(1, lambda i: store.get_request(_uuid(1)))[0]
            assert (seen is None) == self.transactional
            # Another thread's write waits at most until the commit.
            other = threading.Thread(
                target=lambda: store.begin_request(_uuid(2), "m", None, "{}"))
            other.start()
            batch.commit()
            other.join(60)
            assert not other.is_alive()
        assert store.get_request(_uuid(1)) is not None
        assert store.get_request(_uuid(2)) is not None

    def test_unfinished_in_received_order(self, store):
        entries = [store.begin_request(_uuid(i), "m", None, "{}") for i in range(6)]
        store.start_attempt(entries[1].id)
        store.start_attempt(entries[4].id)
        store.finish_request(entries[2].id, JS.DONE)
        store.finish_request(entries[3].id, JS.FAILED, "x")
        store.finish_request(entries[5].id, JS.DROPPED)
        got = store.unfinished()
        assert [e.id for e in got] == [entries[0].id, entries[1].id, entries[4].id]
        assert [e.status for e in got] == [JS.RECEIVED, JS.RUNNING, JS.RUNNING]

    def test_list_requests(self, store):
        entries = [store.begin_request(_uuid(i), "m", None, "{}") for i in range(5)]
        store.finish_request(entries[1].id, JS.FAILED, "x")
        store.finish_request(entries[3].id, JS.FAILED, "y")
        assert [e.id for e in store.list_requests()] == [e.id for e in reversed(entries)]
        assert [e.id for e in store.list_requests(limit=2)] == [entries[4].id, entries[3].id]
        assert [e.id for e in store.list_requests(status=JS.FAILED)] == [
            entries[3].id, entries[1].id]
        assert store.list_requests(status=JS.DONE) == []

    def test_get_request_by_id_or_uuid(self, store):
        entry = store.begin_request(_uuid(7), "m", None, "{}")
        assert store.get_request(entry.id) == entry
        assert store.get_request(str(entry.id)) == entry
        assert store.get_request(_uuid(7)) == entry
        assert store.get_request(_uuid(8)) is None
        assert store.get_request(entry.id + 1000) is None

    def test_requeue(self, store):
        entry = store.begin_request(_uuid(1), "m", None, "{}")
        store.start_attempt(entry.id)
        store.finish_request(entry.id, JS.FAILED, "boom")
        store.requeue(entry.id)
        got = store.get_request(entry.id)
        assert (got.status, got.attempts, got.error) == (JS.RECEIVED, 1, "boom")
        assert [e.id for e in store.unfinished()] == [entry.id]
        with pytest.raises(exception.StateError):
            store.requeue(entry.id + 1000)

    def test_purge_requests_keeps_unfinished(self, store):
        entries = [store.begin_request(_uuid(i), "m", None, "{}") for i in range(4)]
        store.finish_request(entries[0].id, JS.DONE)
        store.finish_request(entries[1].id, JS.FAILED, "x")
        store.start_attempt(entries[2].id)
        past = entries[0].created_at - datetime.timedelta(seconds=1)
        assert store.purge_requests(past) == 0
        future = base.utcnow() + datetime.timedelta(seconds=1)
        assert store.purge_requests(future) == 2
        assert sorted(e.id for e in store.list_requests()) == [entries[2].id, entries[3].id]
        # A purged uuid is forgotten: housekeeping bounds how long
        # duplicates are recognised.
        assert store.begin_request(_uuid(0), "m", None, "{}") is not None

    # -- operation claims -------------------------------------------------

    def test_claim_new_operation(self, store):
        assert store.get_operation(_uuid(1), "build") is None
        assert store.claim_operation(_uuid(1), "build", _uuid(100)) is True
        assert store.get_operation(_uuid(1), "build") == {
            "instance_uuid": _uuid(1), "operation": "build", "msg_uuid": _uuid(100),
            "status": base.OP_CLAIMED}

    def test_claim_resumed_by_same_message(self, store):
        assert store.claim_operation(_uuid(1), "build", _uuid(100))
        assert store.claim_operation(_uuid(1), "build", _uuid(100)) is True

    def test_claim_refused_to_other_message(self, store):
        assert store.claim_operation(_uuid(1), "build", _uuid(100))
        assert store.claim_operation(_uuid(1), "build", _uuid(101)) is False
        assert store.get_operation(_uuid(1), "build")["msg_uuid"] == _uuid(100)

    def test_claim_refused_when_done(self, store):
        assert store.claim_operation(_uuid(1), "build", _uuid(100))
        store.finish_operation(_uuid(1), "build")
        assert store.get_operation(_uuid(1), "build")["status"] == base.OP_DONE
        assert store.claim_operation(_uuid(1), "build", _uuid(100)) is False
        assert store.claim_operation(_uuid(1), "build", _uuid(101)) is False

    def test_claims_are_per_instance_and_operation(self, store):
        assert store.claim_operation(_uuid(1), "build", _uuid(100))
        assert store.claim_operation(_uuid(1), "delete", _uuid(101))
        assert store.claim_operation(_uuid(2), "build", _uuid(102))

    def test_finish_unclaimed_operation_is_noop(self, store):
        store.finish_operation(_uuid(1), "build")
        assert store.get_operation(_uuid(1), "build") is None

    # -- instance map -----------------------------------------------------

    @staticmethod
    def _record(n=1, **kw):
        fields = dict(
            instance_uuid=_uuid(n), state=IS.RUNNING, backend_id="i-%04d" % n,
            vm_state=objects.VmState.ACTIVE, task_state=None,
            power_state=objects.PowerState.RUNNING,
            flavor={"name": "m1.small", "memory_mb": 2048, "extra_specs": {"a": "b"}},
            image_ref="img-1", addresses=[objects.Address("10.0.0.%d" % n)],
            launch_token="tok-%d" % n, generation=2, project_id="p1",
            instance={"uuid": _uuid(n), "display_name": "vm\u00e9", "metadata": {}},
            fault="")
        fields.update(kw)
        return objects.InstanceRecord(**fields)

    def test_put_and_get_instance(self, store):
        stored = store.put_instance(self._record())
        got = store.get_instance(_uuid(1))
        assert got == stored
        assert got.state is IS.RUNNING
        assert got.task_state is None
        assert got.flavor == {"name": "m1.small", "memory_mb": 2048, "extra_specs": {"a": "b"}}
        assert got.addresses == [{"address": "10.0.0.1", "version": 4, "kind": "fixed",
                                  "network": "public", "mac": "", "dns_name": ""}]
        assert got.instance["display_name"] == "vm\u00e9"
        assert (got.backend_id, got.launch_token, got.generation) == ("i-0001", "tok-1", 2)
        assert got.deleted is False
        assert got.created_at is not None and got.created_at == got.updated_at
        assert got.created_at.tzinfo is None

    def test_put_defaults_round_trip(self, store):
        store.put_instance(objects.InstanceRecord(_uuid(1)))
        got = store.get_instance(_uuid(1))
        assert got.state is IS.PENDING
        assert (got.flavor, got.addresses, got.instance) == ({}, [], {})
        assert got.task_state == objects.TaskState.SCHEDULING

    def test_get_missing_instance(self, store):
        assert store.get_instance(_uuid(1)) is None

    def test_put_upsert_keeps_created_at(self, store):
        first = store.put_instance(self._record(backend_id="a"))
        second = store.put_instance(self._record(
            backend_id="b", state=IS.STOPPED,
            created_at=datetime.datetime(2000, 1, 1), updated_at=datetime.datetime(2000, 1, 1)))
        assert second.created_at == first.created_at
        assert second.updated_at >= first.updated_at
        got = store.get_instance(_uuid(1))
        assert (got.backend_id, got.state) == ("b", IS.STOPPED)
        assert got.created_at == first.created_at
        assert store.count_instances() == 1

    @pytest.mark.parametrize("later", [False, True], ids=["now", "later"])
    def test_report_instance_merges_over_the_stored_dict(self, store, later):
        store.put_instance(self._record())
        # Another writer (instance_update_from_api) changed the stored dict
        # after this record was read.
        stale = store.get_instance(_uuid(1))
        store.update_instance(_uuid(1), instance=dict(stale.instance, display_name="renamed"))
        stale.state = IS.STOPPED
        fields = {"vm_state": "stopped", "uuid": _uuid(1)}
        if later:
            # Done means stored: the reads below come after the future.
            data = store.report_instance_later(stale, fields).result(timeout=10)
        else:
            data = store.report_instance(stale, fields)
            assert stale.instance == data
        assert data == {"uuid": _uuid(1), "display_name": "renamed", "metadata": {},
                        "vm_state": "stopped"}
        got = store.get_instance(_uuid(1))
        assert got.instance == data
        assert got.state is IS.STOPPED
        assert got.flavor["extra_specs"] == {"a": "b"}
        assert store.count_instances() == 1

    def test_report_instance_without_a_stored_record(self, store):
        rec = self._record(instance={"uuid": _uuid(1), "display_name": "a"})
        data = store.report_instance(rec, {"vm_state": "active"})
        assert data == {"uuid": _uuid(1), "display_name": "a", "vm_state": "active"}
        assert store.get_instance(_uuid(1)).instance == data

    def test_report_instance_later_keeps_the_order_of_writes(self, store):
        store.put_instance(self._record())
        rec = store.get_instance(_uuid(1))
        futures = [store.report_instance_later(rec, {"step": i}) for i in range(20)]
        assert [f.result(timeout=10)["step"] for f in futures] == list(range(20))
        assert store.get_instance(_uuid(1)).instance["step"] == 19

    def test_finish_request_later(self, store):
        entry = store.begin_request(_uuid(1), "m", _uuid(2), "{}", start=True)
        assert store.claim_operation(_uuid(2), "build", _uuid(1))
        store.finish_request_later(entry.id, JS.DONE, operations=[(_uuid(2), "build")])
        deadline = time.monotonic() + 10
        while store.get_request(entry.id).status != JS.DONE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.get_request(entry.id).status == JS.DONE
        assert store.get_operation(_uuid(2), "build")["status"] == base.OP_DONE

    def test_finish_request_later_logs_a_failure(self, store, caplog):
        with pytest.raises(ValueError):
            store.finish_request_later(1, JS.RUNNING)
        store.finish_request_later(12345, JS.DONE)
        deadline = time.monotonic() + 10
        while "12345" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "Could not finish journal entry 12345" in caplog.text
        # The store still works after the failed write.
        entry = store.begin_request(_uuid(1), "m", None, "{}", start=True)
        store.finish_request(entry.id, JS.DONE)
        assert store.get_request(entry.id).status == JS.DONE

    def test_put_ignores_given_timestamps(self, store):
        old = datetime.datetime(2000, 1, 1)
        stored = store.put_instance(self._record(created_at=old, updated_at=old))
        assert stored.created_at > old and stored.updated_at > old

    def test_returned_records_are_copies(self, store):
        stored = store.put_instance(self._record())
        stored.instance["display_name"] = "changed"
        stored.addresses.append("x")
        got = store.get_instance(_uuid(1))
        assert got.instance["display_name"] == "vm\u00e9"
        assert len(got.addresses) == 1

    def test_update_instance(self, store):
        first = store.put_instance(self._record())
        updated = store.update_instance(_uuid(1), state=IS.STOPPED, power_state=4,
                                        task_state=objects.TaskState.POWERING_OFF,
                                        instance={"uuid": _uuid(1), "x": 1})
        assert updated.state is IS.STOPPED
        assert (updated.power_state, updated.task_state) == (4, "powering-off")
        assert updated.instance == {"uuid": _uuid(1), "x": 1}
        # Fields not named are untouched.
        assert (updated.backend_id, updated.flavor, updated.launch_token) == (
            first.backend_id, first.flavor, first.launch_token)
        assert updated.created_at == first.created_at
        assert updated.updated_at >= first.updated_at
        assert store.get_instance(_uuid(1)) == updated

    def test_update_instance_accepts_state_value(self, store):
        store.put_instance(self._record())
        assert store.update_instance(_uuid(1), state="error").state is IS.ERROR

    def test_update_missing_instance(self, store):
        with pytest.raises(exception.InstanceNotFound) as err:
            store.update_instance(_uuid(1), state=IS.RUNNING)
        assert err.value.kwargs["instance_id"] == _uuid(1)

    @pytest.mark.parametrize("field", ["nonsense", "created_at", "updated_at"])
    def test_update_rejects_fields(self, store, field):
        store.put_instance(self._record())
        with pytest.raises(ValueError):
            store.update_instance(_uuid(1), **{field: "x"})

    def test_delete_leaves_tombstone(self, store):
        store.put_instance(self._record())
        tomb = store.delete_instance(_uuid(1))
        assert (tomb.deleted, tomb.state, tomb.vm_state) == (True, IS.DELETED, "deleted")
        assert tomb.backend_id == "i-0001"
        assert store.get_instance(_uuid(1)) == tomb
        assert store.list_instances() == []
        assert [r.instance_uuid for r in store.list_instances(include_deleted=True)] == [
            _uuid(1)]
        assert store.count_instances() == 0
        assert store.count_instances(include_deleted=True) == 1
        assert store.delete_instance(_uuid(1)).deleted is True

    def test_delete_missing_instance(self, store):
        with pytest.raises(exception.InstanceNotFound):
            store.delete_instance(_uuid(1))

    def test_purge_deleted(self, store):
        for n in (1, 2, 3):
            store.put_instance(self._record(n))
        store.delete_instance(_uuid(1))
        store.delete_instance(_uuid(2))
        assert store.purge_deleted(datetime.datetime(2000, 1, 1)) == 0
        assert store.purge_deleted(base.utcnow() + datetime.timedelta(seconds=1)) == 2
        assert store.get_instance(_uuid(1)) is None
        assert [r.instance_uuid for r in store.list_instances(include_deleted=True)] == [
            _uuid(3)]

    def test_list_instances_ordered_by_created_at(self, store):
        # Inserted out of uuid order: the order is creation, not the key.
        for n in (3, 1, 2):
            store.put_instance(self._record(n))
            tick()
        store.put_instance(self._record(3, backend_id="again"))
        assert [r.instance_uuid for r in store.list_instances()] == [
            _uuid(3), _uuid(1), _uuid(2)]

    def test_list_instance_states(self, store):
        store.put_instance(self._record(1))
        store.put_instance(self._record(2, backend_id="", state=IS.PENDING))
        store.put_instance(self._record(3))
        store.delete_instance(_uuid(3))
        assert sorted(store.list_instance_states()) == [
            (_uuid(1), "i-0001", IS.RUNNING), (_uuid(2), "", IS.PENDING)]
        assert all(isinstance(state, IS) for _, _, state in store.list_instance_states())

    def test_list_instances_filters(self, store):
        store.put_instance(self._record(1, project_id="p1", state=IS.RUNNING))
        store.put_instance(self._record(2, project_id="p2", state=IS.STOPPED))
        tick()
        store.put_instance(self._record(3, project_id="p1", state=IS.ERROR))
        store.put_instance(self._record(4, project_id="p1", state=IS.RUNNING))
        store.delete_instance(_uuid(4))

        def uuids(**kw):
            return [r.instance_uuid for r in store.list_instances(**kw)]

        assert uuids(project_id="p1") == [_uuid(1), _uuid(3)]
        assert uuids(project_id="p1", include_deleted=True) == [_uuid(1), _uuid(3), _uuid(4)]
        assert uuids(states=[IS.RUNNING, IS.STOPPED]) == [_uuid(1), _uuid(2)]
        assert uuids(states=["error"]) == [_uuid(3)]
        assert uuids(states=[]) == []
        assert uuids(project_id="nope") == []

        mark = store.get_instance(_uuid(3)).updated_at
        tick()
        store.update_instance(_uuid(1), fault="late")
        assert uuids(updated_since=mark) == [_uuid(1), _uuid(3)]
        assert uuids(updated_since=base.utcnow() + datetime.timedelta(seconds=1)) == []

    # -- concurrency ------------------------------------------------------

    def test_concurrent_begin_request_one_winner_per_uuid(self, store):
        # Thread t sends messages t*100 .. t*100+199: each overlaps the next.
        def work(t):
            return [store.begin_request(_uuid(t * 100 + i), "m", None, "{}")
                    for i in range(200)]

        results = run_threads(8, work)
        winners = [e for entries in results for e in entries if e is not None]
        expected = {_uuid(n) for n in range(7 * 100 + 200)}
        assert len(winners) == len(expected)
        assert {e.msg_uuid for e in winners} == expected
        assert len({e.id for e in winners}) == len(winners)
        assert len(store.unfinished()) == len(expected)

    def test_concurrent_claims_one_winner(self, store):
        def work(t):
            return [store.claim_operation(_uuid(op), "build", _uuid(1000 + t))
                    for op in range(50)]

        results = run_threads(8, work)
        for op in range(50):
            assert sum(results[t][op] for t in range(8)) == 1
            winner = [t for t in range(8) if results[t][op]][0]
            assert store.get_operation(_uuid(op), "build")["msg_uuid"] == _uuid(1000 + winner)

    def test_concurrent_request_lifecycles(self, store):
        def work(t):
            for i in range(50):
                entry = store.begin_request(_uuid(t * 1000 + i), "m", _uuid(t), "{}")
                store.start_attempt(entry.id)
                store.claim_operation(_uuid(t * 1000 + i), "build", entry.msg_uuid)
                store.put_instance(self._record(t * 1000 + i))
                store.finish_request(entry.id, JS.DONE)

        run_threads(8, work)
        assert store.unfinished() == []
        assert store.count_instances() == 400
        assert len(store.list_requests(limit=1000, status=JS.DONE)) == 400

    def test_two_stores_race(self):
        if not self.shared_backend:
            pytest.skip("stores do not share data")
        stores = [self.new_store(), self.new_store()]

        def work(t):
            store = stores[t % 2]
            won = [store.begin_request(_uuid(i), "m", None, "{}") is not None
                   for i in range(100)]
            claims = [store.claim_operation(_uuid(i), "build", _uuid(5000 + t))
                      for i in range(100)]
            return won, claims

        results = run_threads(6, work)
        for i in range(100):
            assert sum(results[t][0][i] for t in range(6)) == 1
            assert sum(results[t][1][i] for t in range(6)) == 1
        assert len(stores[0].list_requests(limit=1000)) == 100
