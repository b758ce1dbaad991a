"""TopStore: its contract on a SQLite file, plus SQLite specifics.

``TopStoreContract`` is written once and also run against the machine's
PostgreSQL by ``tests/functional/test_top_store_postgresql.py``. A test
class mixes it in and provides ``make_store()`` (and a ``store_env`` fixture
giving each test a fresh database).
"""

import dataclasses
import datetime
import sqlite3
import threading
import uuid

import pytest
import sqlalchemy as sa

from cellagent import exception
from cellagent import objects
from cellagent import state
from cellagent.rpc import neighbours
from cellagent.state import base
from cellagent.state import sql
from cellagent.state import top

T0 = datetime.datetime(2024, 5, 1, 12, 0, 0)


def _uuid(n):
    return str(uuid.UUID(int=n))


def run_threads(count, target):
    """``target(index)`` in ``count`` threads started together; results by index."""
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


def _cell(name="aws", **kw):
    fields = dict(name=name, transport_url="rabbit://bob:s3cr3t@broker-%s:5672/" % name,
                  tier="public", cost_per_vcpu_hour=0.05,
                  flavor_costs={"m1.large": 0.2}, max_instances=10, max_vcpus=None,
                  max_cost_per_hour=4.5, weight_offset=-1.5, weight_scale=2.0)
    fields.update(kw)
    return objects.TopCell(**fields)


FLAVOR = {"name": "m1.small", "memory_mb": 2048, "vcpus": 1, "root_gb": 20,
          "ephemeral_gb": 0, "flavorid": "2"}
ADDRESSES = [{"network": "private", "addr": "10.0.0.5", "type": "fixed", "version": 4},
             {"network": "private", "addr": "203.0.113.9", "type": "floating", "version": 4}]


def _inst(n=1, **kw):
    fields = dict(uuid=_uuid(n), name="vm-%d" % n, project_id="p1", user_id="u1",
                  flavor=dict(FLAVOR), image_ref="img-1", vm_state="building",
                  task_state="scheduling", request_id="req-1")
    fields.update(kw)
    return objects.TopInstance(**fields)


class TopStoreContract:

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
        assert store.schema_version() == top.TOP_SCHEMA_VERSION
        store.check_schema()

    def test_check_schema_raises_before_sync(self):
        store = self.new_store(sync=False)
        assert store.schema_version() == 0
        with pytest.raises(exception.SchemaVersionError) as err:
            store.check_schema()
        assert err.value.kwargs["found"] == 0
        assert err.value.kwargs["wanted"] == top.TOP_SCHEMA_VERSION
        assert "db sync" in str(err.value)
        assert store.sync_schema() == top.TOP_SCHEMA_VERSION
        store.check_schema()

    def test_sync_schema_idempotent(self, store):
        store.put_cell(_cell())
        assert store.sync_schema() == top.TOP_SCHEMA_VERSION
        assert store.sync_schema() == top.TOP_SCHEMA_VERSION
        assert store.get_cell("aws") == _cell()

    def test_sync_schema_concurrently(self):
        stores = [self.new_store(sync=False) for _ in range(4)]
        assert run_threads(4, lambda i: stores[i].sync_schema()) == [
            top.TOP_SCHEMA_VERSION] * 4
        for store in stores:
            store.check_schema()

    def test_newer_schema_refused(self, store):
        with store._engine.begin() as conn:
            conn.execute(top.SCHEMA_VERSION_TABLE.update().values(version=99))
        assert store.schema_version() == 99
        with pytest.raises(exception.SchemaVersionError) as err:
            store.check_schema()
        assert err.value.kwargs == {"found": 99, "wanted": top.TOP_SCHEMA_VERSION, "code": 500}
        with pytest.raises(exception.SchemaVersionError):
            store.sync_schema()
        assert store.schema_version() == 99

    def test_schema_independent_of_child_store(self, store):
        # One database, two schemas, each with its own version table.
        child = sql.SqlStore(self.url)
        try:
            assert child.schema_version() == 0
            assert child.sync_schema() == sql.SCHEMA_VERSION
            assert store.schema_version() == top.TOP_SCHEMA_VERSION
            tables = set(sa.inspect(store._engine).get_table_names())
            assert set(top.METADATA.tables) <= tables
            assert set(sql.METADATA.tables) <= tables
            assert all(name.startswith("top_") for name in top.METADATA.tables)
            assert not set(top.METADATA.tables) & set(sql.METADATA.tables)
        finally:
            child.close()

    def test_indexes(self, store):
        inspector = sa.inspect(store._engine)
        indexed = {tuple(i["column_names"]) for i in inspector.get_indexes("top_instances")}
        for column in ("cell_name", "deleted", "name", "build_deadline"):
            assert (column,) in indexed
        assert ("instance_uuid",) in {
            tuple(i["column_names"]) for i in inspector.get_indexes("top_faults")}

    # -- cells ------------------------------------------------------------

    def test_put_and_get_cell(self, store):
        cell = _cell(is_parent=False, disabled=True)
        store.put_cell(cell)
        got = store.get_cell("aws")
        assert got == cell
        assert got is not cell
        assert got.transport_url == "rabbit://bob:s3cr3t@broker-aws:5672/"
        assert (got.max_vcpus, got.max_instances, got.max_cost_per_hour) == (None, 10, 4.5)
        assert got.flavor_costs == {"m1.large": 0.2}

    def test_cell_defaults_round_trip(self, store):
        store.put_cell(objects.TopCell("plain", "rabbit://h/"))
        got = store.get_cell("plain")
        assert got == objects.TopCell("plain", "rabbit://h/")
        assert (got.tier, got.is_parent, got.disabled, got.flavor_costs) == (
            "private", False, False, {})
        assert (got.weight_offset, got.weight_scale, got.cost_per_vcpu_hour) == (0.0, 1.0, 0.0)
        assert (got.max_instances, got.max_vcpus, got.max_cost_per_hour) == (None, None, None)

    def test_put_cell_replaces(self, store):
        store.put_cell(_cell())
        store.put_cell(_cell(tier="private", max_instances=None, flavor_costs={}))
        got = store.get_cell("aws")
        assert (got.tier, got.max_instances, got.flavor_costs) == ("private", None, {})
        assert len(store.list_cells()) == 1

    def test_get_missing_cell(self, store):
        with pytest.raises(exception.CellNotFound) as err:
            store.get_cell("nope")
        assert err.value.kwargs["cell_name"] == "nope"
        assert "nope" in str(err.value)

    def test_list_cells_sorted(self, store):
        for name in ("zeta", "alpha", "mid"):
            store.put_cell(_cell(name))
        assert [c.name for c in store.list_cells()] == ["alpha", "mid", "zeta"]

    def test_delete_cell_and_its_report(self, store):
        store.put_cell(_cell("a"))
        store.put_cell(_cell("b"))
        store.save_capacities("a", {"ram_free": {"total_mb": 1}}, T0)
        store.save_capacities("b", {"ram_free": {"total_mb": 2}}, T0)
        store.delete_cell("a")
        assert [c.name for c in store.list_cells()] == ["b"]
        assert set(store.cell_reports()) == {"b"}
        with pytest.raises(exception.CellNotFound):
            store.delete_cell("a")

    # -- reports ----------------------------------------------------------

    def test_save_capacities(self, store):
        caps = {"ram_free": {"total_mb": 4096, "units_by_mb": {"2048": 2}},
                "disk_free": {"total_mb": 0, "units_by_mb": {}}}
        store.save_capacities("aws", caps, T0)
        report = store.cell_reports()["aws"]
        assert report == objects.CellReport(name="aws", capacities=caps, last_seen=T0,
                                            capacities_at=T0)
        later = T0 + datetime.timedelta(seconds=30)
        store.save_capacities("aws", {"ram_free": {"total_mb": 1}}, later)
        report = store.cell_reports()["aws"]
        assert report.capacities == {"ram_free": {"total_mb": 1}}     # replaced, not merged
        assert report.last_seen == report.capacities_at == later

    def test_save_capabilities_keeps_capacities(self, store):
        store.save_capacities("aws", {"ram_free": {"total_mb": 1}}, T0)
        later = T0 + datetime.timedelta(seconds=5)
        store.save_capabilities("aws", {"hypervisor": ["ec2"]}, later)
        store.save_capabilities("aws", {"supports_burst": ["True"]}, later)
        report = store.cell_reports()["aws"]
        assert report.capabilities == {"supports_burst": ["True"]}
        assert report.capacities == {"ram_free": {"total_mb": 1}}
        assert report.last_seen == later
        assert report.capacities_at == T0

    def test_capabilities_first(self, store):
        store.save_capabilities("aws", {"x": ["1"]}, T0)
        report = store.cell_reports()["aws"]
        assert (report.capacities, report.capacities_at, report.last_seen) == ({}, None, T0)

    def test_set_backoff(self, store):
        store.set_backoff("aws", T0, 3)
        report = store.cell_reports()["aws"]
        assert (report.backoff_until, report.failures, report.last_seen) == (T0, 3, None)
        store.save_capacities("aws", {"ram_free": {"total_mb": 1}}, T0)
        store.set_backoff("aws", None, 0)
        report = store.cell_reports()["aws"]
        assert (report.backoff_until, report.failures) == (None, 0)
        assert report.capacities == {"ram_free": {"total_mb": 1}}

    def test_reports_need_no_cell_record(self, store):
        assert store.cell_reports() == {}
        store.save_capacities("ghost", {}, T0)
        assert set(store.cell_reports()) == {"ghost"}
        assert store.list_cells() == []

    def test_aware_datetimes_become_naive_utc(self, store):
        aware = datetime.datetime(2024, 5, 1, 14, 0, tzinfo=datetime.timezone(
            datetime.timedelta(hours=2)))
        store.save_capacities("aws", {}, aware)
        assert store.cell_reports()["aws"].last_seen == T0
        store.set_backoff("aws", "2024-05-01T12:00:00Z", 1)
        assert store.cell_reports()["aws"].backoff_until == T0

    # -- instances --------------------------------------------------------

    def test_add_and_get_instance(self, store):
        inst = _inst(addresses=ADDRESSES, launched_at=T0, build_deadline=T0,
                     tried_cells=["aws"], cell_name="aws", power_state=1, host="h1",
                     node="n1", access_ip_v4="10.0.0.5", build_attempts=2)
        [stored] = store.add_instances([inst])
        got = store.get_instance(_uuid(1))
        assert got == stored
        assert got.created_at is not None and got.created_at.tzinfo is None
        assert got.updated_at == got.created_at
        assert dataclasses.replace(got, created_at=None, updated_at=None) == inst
        assert got.flavor == FLAVOR and got.addresses == ADDRESSES
        assert (got.fault, got.deleted, got.deleted_at, got.acked) == (None, False, None, False)

    def test_add_instance_defaults(self, store):
        store.add_instances([objects.TopInstance(uuid=_uuid(1))])
        got = store.get_instance(_uuid(1))
        assert (got.name, got.cell_name, got.vm_state, got.task_state, got.power_state) == (
            "", None, "building", None, 0)
        assert (got.flavor, got.addresses, got.tried_cells) == ({}, [], [])
        assert (got.host, got.node, got.access_ip_v4, got.fault) == (None, None, None, None)

    def test_add_instances_keeps_given_created_at(self, store):
        [stored] = store.add_instances([_inst(created_at=T0, updated_at=T0)])
        assert stored.created_at == T0
        assert stored.updated_at > T0
        assert store.get_instance(_uuid(1)).created_at == T0

    def test_add_instances_empty(self, store):
        assert store.add_instances([]) == []

    def test_add_duplicate_inserts_none(self, store):
        store.add_instances([_inst(1)])
        with pytest.raises(exception.InstanceExists) as err:
            store.add_instances([_inst(2), _inst(1, name="other"), _inst(3)])
        assert _uuid(1) in str(err.value)
        assert [i.uuid for i in store.list_instances()] == [_uuid(1)]
        assert store.get_instance(_uuid(1)).name == "vm-1"

    def test_add_duplicate_of_deleted_row(self, store):
        store.add_instances([_inst(1)])
        store.destroy_instance(_uuid(1))
        with pytest.raises(exception.InstanceExists):
            store.add_instances([_inst(1)])

    def test_add_same_uuid_twice_in_one_call(self, store):
        with pytest.raises(exception.InstanceExists):
            store.add_instances([_inst(1), _inst(2), _inst(1)])
        assert store.list_instances(include_deleted=True) == []

    def test_get_missing_and_deleted_instance(self, store):
        with pytest.raises(exception.InstanceNotFound) as err:
            store.get_instance(_uuid(1))
        assert err.value.kwargs["instance_id"] == _uuid(1)
        store.add_instances([_inst(1)])
        store.destroy_instance(_uuid(1))
        with pytest.raises(exception.InstanceNotFound):
            store.get_instance(_uuid(1))
        assert store.get_instance(_uuid(1), include_deleted=True).deleted is True

    def test_returned_instances_are_copies(self, store):
        [stored] = store.add_instances([_inst(1, addresses=list(ADDRESSES))])
        stored.addresses.append("x")
        stored.flavor["vcpus"] = 99
        got = store.get_instance(_uuid(1))
        assert got.addresses == ADDRESSES and got.flavor == FLAVOR

    def test_find_instance(self, store):
        store.add_instances([_inst(1, name="web"), _inst(2, name="db"),
                             _inst(3, name="web2")])
        assert store.find_instance(_uuid(2)).name == "db"
        assert store.find_instance("web").uuid == _uuid(1)
        with pytest.raises(exception.InstanceNotFound):
            store.find_instance("nothing")
        store.destroy_instance(_uuid(2))
        with pytest.raises(exception.InstanceNotFound):
            store.find_instance(_uuid(2))
        with pytest.raises(exception.InstanceNotFound):
            store.find_instance("db")

    def test_find_instance_ambiguous_name(self, store):
        store.add_instances([_inst(1, name="web", created_at=T0),
                             _inst(2, name="web", created_at=T0 + datetime.timedelta(1)),
                             _inst(3, name="web")])
        store.destroy_instance(_uuid(3))
        with pytest.raises(exception.AmbiguousServerName) as err:
            store.find_instance("web")
        assert _uuid(1) in str(err.value) and _uuid(2) in str(err.value)
        assert _uuid(3) not in str(err.value)
        store.destroy_instance(_uuid(1))
        assert store.find_instance("web").uuid == _uuid(2)

    def test_find_instance_uuid_wins_over_name(self, store):
        store.add_instances([_inst(1), _inst(2, name=_uuid(1))])
        assert store.find_instance(_uuid(1)).uuid == _uuid(1)

    def test_list_instances(self, store):
        store.add_instances([_inst(3, created_at=T0, cell_name="aws"),
                             _inst(1, created_at=T0 + datetime.timedelta(seconds=1),
                                   cell_name="priv"),
                             _inst(2, created_at=T0, cell_name="aws"),
                             _inst(4, created_at=T0)])
        store.destroy_instance(_uuid(2))

        def uuids(**kw):
            return [i.uuid for i in store.list_instances(**kw)]

        # created_at first, then uuid for equal stamps.
        assert uuids() == [_uuid(3), _uuid(4), _uuid(1)]
        assert uuids(include_deleted=True) == [_uuid(2), _uuid(3), _uuid(4), _uuid(1)]
        assert uuids(cell_name="aws") == [_uuid(3)]
        assert uuids(cell_name="aws", include_deleted=True) == [_uuid(2), _uuid(3)]
        assert uuids(cell_name="none") == []

    def test_update_instance(self, store):
        [first] = store.add_instances([_inst(1)])
        got = store.update_instance(_uuid(1), cell_name="aws", acked=False, build_attempts=1,
                                    build_deadline=T0, tried_cells=["aws"])
        assert (got.cell_name, got.build_attempts, got.build_deadline, got.tried_cells) == (
            "aws", 1, T0, ["aws"])
        assert (got.name, got.flavor, got.created_at) == ("vm-1", FLAVOR, first.created_at)
        assert got.updated_at >= first.updated_at
        assert store.get_instance(_uuid(1)) == got
        got = store.update_instance(_uuid(1), vm_state="error", task_state=None,
                                    build_deadline=None)
        assert (got.vm_state, got.task_state, got.build_deadline) == ("error", None, None)

    def test_update_instance_rejects(self, store):
        with pytest.raises(exception.InstanceNotFound):
            store.update_instance(_uuid(1), vm_state="active")
        store.add_instances([_inst(1)])
        for field in ("nonsense", "uuid", "updated_at"):
            with pytest.raises(ValueError):
                store.update_instance(_uuid(1), **{field: "x"})
        with pytest.raises(ValueError):
            store.update_instance(_uuid(1), launched_at="yesterday")
        with pytest.raises(ValueError):
            store.update_instance(_uuid(1), power_state="on")
        assert store.get_instance(_uuid(1)) == store.list_instances()[0]

    # -- update_at_top ----------------------------------------------------

    def test_update_at_top_creates_missing_row(self, store):
        inst, created = store.update_at_top(
            _uuid(1), {"vm_state": "active", "power_state": 1, "host": "h",
                       "launched_at": "2024-05-01T12:00:00.000000", "acked": True,
                       "metadata": {"ignored": "yes"}, "security_groups": []}, "aws")
        assert created is True
        assert (inst.name, inst.vm_state, inst.power_state, inst.host, inst.cell_name) == (
            "", "active", 1, "h", "aws")
        assert (inst.launched_at, inst.acked, inst.deleted) == (T0, True, False)
        assert store.get_instance(_uuid(1)) == inst
        inst, created = store.update_at_top(_uuid(2), {"name": "x"}, None)
        assert (created, inst.vm_state, inst.cell_name, inst.task_state) == (
            True, "building", None, None)

    def test_update_at_top_updates_changed_fields_only(self, store):
        store.add_instances([_inst(1)])
        inst, created = store.update_at_top(
            _uuid(1), {"vm_state": "active", "task_state": None, "addresses": ADDRESSES,
                       "unknown": 5, "uuid": _uuid(9), "updated_at": T0}, "aws")
        assert created is False
        assert (inst.vm_state, inst.task_state, inst.cell_name) == ("active", None, "aws")
        assert inst.addresses == ADDRESSES
        assert (inst.uuid, inst.name, inst.flavor, inst.request_id) == (
            _uuid(1), "vm-1", FLAVOR, "req-1")
        assert inst.updated_at > T0
        assert store.get_instance(_uuid(1)) == inst

    def test_update_at_top_keeps_cell_when_none(self, store):
        store.add_instances([_inst(1, cell_name="aws")])
        inst, _ = store.update_at_top(_uuid(1), {"power_state": 1}, None)
        assert inst.cell_name == "aws"

    def test_update_at_top_keeps_created_at(self, store):
        [first] = store.add_instances([_inst(1)])
        inst, _ = store.update_at_top(_uuid(1), {"created_at": T0}, "aws")
        assert inst.created_at == first.created_at
        inst, _ = store.update_at_top(_uuid(2), {"created_at": T0}, "aws")
        assert inst.created_at == T0

    @pytest.mark.parametrize("current, update", [
        ("building", {"vm_state": "building"}),
        (None, {"vm_state": "building"}),
        ("active", {"vm_state": "active"}),
        ("building", {"vm_state": "active"}),
        ("active", {"vm_state": "error"}),
    ])
    def test_vm_state_guard_allows(self, store, current, update):
        store.add_instances([_inst(1, vm_state=current)])
        inst, _ = store.update_at_top(_uuid(1), update, "aws")
        assert inst.vm_state == update["vm_state"]

    @pytest.mark.parametrize("current", ["active", "error", "stopped", "deleted"])
    def test_vm_state_guard_rejects_building(self, store, current):
        [before] = store.add_instances([_inst(1, vm_state=current, cell_name="priv")])
        with pytest.raises(exception.InstanceUpdateRejected) as err:
            store.update_at_top(_uuid(1), {"vm_state": "building", "host": "late"}, "aws")
        assert "vm_state building" in str(err.value) and _uuid(1) in str(err.value)
        assert store.get_instance(_uuid(1)) == before        # nothing changed

    @pytest.mark.parametrize("current, new", [
        ("rebuilding", "rebuild_block_device_mapping"),
        ("rebuild_block_device_mapping", "rebuild_block_device_mapping"),
        ("rebuilding", "rebuild_spawning"),
        ("rebuild_block_device_mapping", "rebuild_spawning"),
        ("rebuild_spawning", "rebuild_spawning"),
        ("resize_prep", "resize_migrating"),
        ("resize_migrating", "resize_migrating"),
        ("resize_prep", "resize_migrated"),
        ("resize_migrating", "resize_migrated"),
        ("resize_migrated", "resize_finish"),
        ("resize_migrating", "resize_finish"),
        ("resize_prep", "resize_finish"),
        ("resize_finish", "resize_finish"),
        (None, "spawning"),
        ("resize_finish", None),
        ("rebuild_spawning", None),
    ])
    def test_task_state_guard_allows(self, store, current, new):
        store.add_instances([_inst(1, vm_state="active", task_state=current)])
        inst, _ = store.update_at_top(_uuid(1), {"task_state": new}, "aws")
        assert inst.task_state == new

    @pytest.mark.parametrize("current, new", [
        (None, "rebuild_block_device_mapping"),
        ("rebuild_spawning", "rebuild_block_device_mapping"),
        (None, "rebuild_spawning"),
        ("spawning", "rebuild_spawning"),
        (None, "resize_migrating"),
        ("resize_migrated", "resize_migrating"),
        (None, "resize_migrated"),
        ("resize_finish", "resize_migrated"),
        (None, "resize_finish"),
        ("rebuilding", "resize_finish"),
    ])
    def test_task_state_guard_rejects(self, store, current, new):
        [before] = store.add_instances([_inst(1, vm_state="active", task_state=current)])
        with pytest.raises(exception.InstanceUpdateRejected):
            store.update_at_top(_uuid(1), {"task_state": new, "power_state": 4}, "aws")
        assert store.get_instance(_uuid(1)) == before

    def test_guards_do_not_apply_when_creating(self, store):
        inst, created = store.update_at_top(_uuid(1), {"task_state": "resize_finish"}, "aws")
        assert created and inst.task_state == "resize_finish"

    def test_deleted_row_stays_deleted(self, store):
        store.add_instances([_inst(1)])
        store.destroy_instance(_uuid(1))
        before = store.get_instance(_uuid(1), include_deleted=True)
        inst, created = store.update_at_top(
            _uuid(1), {"vm_state": "active", "task_state": None, "deleted": False,
                       "deleted_at": None, "host": "late-host", "power_state": 1}, "aws")
        assert created is False
        assert (inst.deleted, inst.deleted_at, inst.vm_state) == (
            True, before.deleted_at, "deleted")
        assert (inst.host, inst.power_state, inst.cell_name) == ("late-host", 1, "aws")
        with pytest.raises(exception.InstanceNotFound):
            store.get_instance(_uuid(1))
        assert store.list_instances() == []

    def test_update_at_top_can_delete(self, store):
        store.add_instances([_inst(1)])
        inst, _ = store.update_at_top(_uuid(1), {"deleted": True, "vm_state": "deleted"},
                                      "aws")
        assert inst.deleted and inst.deleted_at is not None

    def test_update_at_top_bad_value(self, store):
        store.add_instances([_inst(1)])
        with pytest.raises(ValueError):
            store.update_at_top(_uuid(1), {"launched_at": "not a time"}, "aws")

    # -- destroy, faults --------------------------------------------------

    def test_destroy_instance(self, store):
        store.add_instances([_inst(1, task_state="deleting", build_deadline=T0)])
        assert store.destroy_instance(_uuid(1)) is True
        got = store.get_instance(_uuid(1), include_deleted=True)
        assert (got.deleted, got.vm_state, got.task_state) == (True, "deleted", None)
        assert got.deleted_at is not None and got.deleted_at.tzinfo is None
        assert store.destroy_instance(_uuid(1)) is False
        assert store.get_instance(_uuid(1), include_deleted=True).deleted_at == got.deleted_at
        assert store.destroy_instance(_uuid(2)) is False

    def test_add_fault(self, store):
        store.add_instances([_inst(1)])
        first = {"code": 500, "message": "No valid host", "details": "trace",
                 "host": "h1", "created_at": T0}
        assert store.add_fault(_uuid(1), first) is True
        assert store.get_instance(_uuid(1)).fault == {
            "code": 500, "message": "No valid host", "details": "trace", "created_at": T0}
        later = T0 + datetime.timedelta(minutes=1)
        assert store.add_fault(_uuid(1), {"code": "404", "message": "gone",
                                          "created_at": later.isoformat()}) is True
        assert store.get_instance(_uuid(1)).fault == {
            "code": 404, "message": "gone", "details": "", "created_at": later}
        assert [(f["message"], f["host"], f["created_at"]) for f in store.list_faults(
            _uuid(1))] == [("No valid host", "h1", T0), ("gone", None, later)]

    def test_add_fault_defaults(self, store):
        store.add_instances([_inst(1)])
        assert store.add_fault(_uuid(1), {"code": None, "message": "x"})
        fault = store.get_instance(_uuid(1)).fault
        assert fault["code"] == 500 and fault["created_at"] is not None

    def test_add_fault_unknown_instance(self, store):
        assert store.add_fault(_uuid(1), {"code": 500, "message": "x"}) is False
        assert store.list_faults(_uuid(1)) == []

    def test_add_fault_to_deleted_instance(self, store):
        store.add_instances([_inst(1)])
        store.destroy_instance(_uuid(1))
        assert store.add_fault(_uuid(1), {"code": 500, "message": "late"}) is True
        assert store.get_instance(_uuid(1), include_deleted=True).deleted

    # -- builds, usage, purge ---------------------------------------------

    def test_due_builds(self, store):
        soon, late = T0 + datetime.timedelta(seconds=30), T0 + datetime.timedelta(hours=1)
        store.add_instances([
            _inst(1, build_deadline=soon),
            _inst(2, build_deadline=T0),
            _inst(3, build_deadline=late),
            _inst(4, build_deadline=None),
            _inst(5, build_deadline=T0, acked=True),
            _inst(6, build_deadline=T0, vm_state="error"),
            _inst(7, build_deadline=T0),
        ])
        store.destroy_instance(_uuid(7))
        assert [i.uuid for i in store.due_builds(soon)] == [_uuid(2), _uuid(1)]
        assert [i.uuid for i in store.due_builds(T0 - datetime.timedelta(1))] == []
        assert [i.uuid for i in store.due_builds(late)] == [_uuid(2), _uuid(1), _uuid(3)]

    def test_cell_usage(self, store):
        large = {"name": "m1.large", "memory_mb": 8192, "vcpus": 4}
        store.add_instances([
            _inst(1, cell_name="aws"),
            _inst(2, cell_name="aws", flavor=large, vm_state="active"),
            _inst(3, cell_name="aws", flavor=large, vm_state="stopped"),
            _inst(4, cell_name="aws", vm_state="error"),
            _inst(5, cell_name="aws"),
            _inst(6, cell_name="priv", vm_state=None),
            _inst(7, cell_name=None),
            _inst(8, cell_name="priv", flavor={}),
        ])
        store.destroy_instance(_uuid(5))
        assert store.cell_usage() == {
            "aws": {"instances": 3, "vcpus": 9, "ram_mb": 2048 + 2 * 8192,
                    "flavors": {"m1.small": 1, "m1.large": 2}},
            "priv": {"instances": 2, "vcpus": 1, "ram_mb": 2048, "flavors": {"m1.small": 1}},
        }

    def test_cell_usage_empty(self, store):
        assert store.cell_usage() == {}

    def test_purge_deleted(self, store):
        for n in (1, 2, 3):
            store.add_instances([_inst(n)])
            store.add_fault(_uuid(n), {"code": 500, "message": "m%d" % n})
        store.destroy_instance(_uuid(1))
        store.destroy_instance(_uuid(2))
        assert store.purge_deleted(T0) == 0
        assert store.purge_deleted(base.utcnow() + datetime.timedelta(seconds=1)) == 2
        with pytest.raises(exception.InstanceNotFound):
            store.get_instance(_uuid(1), include_deleted=True)
        assert store.list_faults(_uuid(1)) == [] and store.list_faults(_uuid(2)) == []
        assert len(store.list_faults(_uuid(3))) == 1
        assert [i.uuid for i in store.list_instances(include_deleted=True)] == [_uuid(3)]
        # A purged uuid may be used again.
        store.add_instances([_inst(1)])

    # -- concurrency ------------------------------------------------------

    def test_concurrent_update_at_top_creates_once(self):
        stores = [self.new_store(), self.new_store()]

        def work(t):
            return [stores[t % 2].update_at_top(_uuid(n), {"host": "h%d" % t}, "aws")[1]
                    for n in range(20)]

        results = run_threads(6, work)
        for n in range(20):
            assert sum(results[t][n] for t in range(6)) == 1
        assert len(stores[0].list_instances()) == 20

    def test_concurrent_guards_are_atomic(self):
        # "active" is never refused and a late "building" is refused once a
        # row left building: however the updates interleave, every row must
        # end active. A guard checked outside the row lock would let a
        # "building" that read the old state overwrite a newer "active".
        stores = [self.new_store(), self.new_store()]
        stores[0].add_instances([_inst(n) for n in range(30)])

        def work(t):
            for n in range(30):
                try:
                    stores[t % 2].update_at_top(
                        _uuid(n), {"vm_state": "active" if t % 2 else "building"}, "aws")
                except exception.InstanceUpdateRejected:
                    pass

        run_threads(6, work)
        assert {i.vm_state for i in stores[0].list_instances()} == {"active"}


class TestSqliteTopStore(TopStoreContract):

    @pytest.fixture
    def store_env(self, tmp_path):
        self.path = tmp_path / "state" / "top.sqlite"
        self.url = "sqlite:///%s" % self.path
        yield

    def make_store(self):
        return top.TopStore(self.url)

    def test_get_top_store(self):
        store = state.get_top_store(self.url, busy_timeout=500, pool_size=2)
        self._opened.append(store)
        assert isinstance(store, top.TopStore)
        assert repr(store) == "<TopStore %s>" % self.url

    def test_get_top_store_refuses_memory(self):
        with pytest.raises(exception.ConfigurationError):
            state.get_top_store("memory://")

    def test_in_memory_sqlite_refused(self):
        for url in ("sqlite://", "sqlite:///:memory:"):
            with pytest.raises(exception.ConfigurationError):
                top.TopStore(url)

    def test_other_databases_refused(self):
        with pytest.raises(exception.ConfigurationError):
            top.TopStore("mysql://u:pw@127.0.0.1/x")

    def test_wal_and_pragmas(self, store):
        with store._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
        with sqlite3.connect(self.path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def test_shares_the_write_lock_with_the_child_store(self, store):
        child = sql.SqlStore(self.url)
        try:
            assert child._write_lock is store._write_lock
        finally:
            child.close()

    def test_database_error_is_state_error(self, store):
        store.close()
        with open(self.path, "wb") as f:
            f.write(b"this is not a database" * 1000)
        with pytest.raises(exception.StateError) as err:
            store.list_cells()
        assert str(self.path) in str(err.value)

    def test_sqlite_url_password_never_shown(self, tmp_path):
        with pytest.raises(exception.CellAgentError) as err:
            top.TopStore("sqlite://user:s3cr3tpw@/%s" % (tmp_path / "db"))
        assert "s3cr3tpw" not in str(err.value)
        assert "s3cr3tpw" not in repr(err.value.kwargs)

    def test_postgresql_error_never_shows_password(self):
        # Nothing listens on loopback port 1: the connection is refused at once.
        store = top.TopStore("postgresql://bob:s3cr3tpw@127.0.0.1:1/cellagent")
        self._opened.append(store)
        assert store._engine.url.drivername == "postgresql+psycopg"
        assert "s3cr3tpw" not in repr(store)
        with pytest.raises(exception.StateError) as err:
            store.update_at_top(_uuid(1), {"vm_state": "active"}, "aws")
        assert "s3cr3tpw" not in str(err.value)
        assert "bob:***@127.0.0.1" in str(err.value)


class TestTopObjects:

    def test_transport_url_not_in_repr(self):
        cell = _cell()
        assert "s3cr3t" not in repr(cell) and "transport_url" not in repr(cell)
        assert "s3cr3t" not in str(cell)

    def test_to_record(self):
        record = _cell(is_parent=True).to_record()
        assert record == neighbours.CellRecord(
            name="aws", transport_url="rabbit://bob:s3cr3t@broker-aws:5672/", is_parent=True,
            weight_offset=-1.5, weight_scale=2.0)

    @pytest.mark.parametrize("kw", [
        {"name": ""}, {"name": "a!b"}, {"name": "a.b"}, {"name": "a@b"}, {"tier": "cheap"},
        {"cost_per_vcpu_hour": -1}, {"max_instances": -1}, {"max_instances": 1.5},
        {"max_vcpus": "many"}, {"max_cost_per_hour": float("nan")},
        {"flavor_costs": {"m1": "x"}}, {"transport_url": None}, {"max_instances": True},
    ])
    def test_cell_validation(self, kw):
        with pytest.raises(ValueError):
            _cell(**kw)

    def test_cell_coerces_numbers(self):
        cell = _cell(max_instances="5", cost_per_vcpu_hour="0.25", max_vcpus=8.0,
                     flavor_costs={"m1": 1})
        assert (cell.max_instances, cell.cost_per_vcpu_hour, cell.max_vcpus) == (5, 0.25, 8)
        assert isinstance(cell.max_vcpus, int) and cell.flavor_costs == {"m1": 1.0}

    def test_defaults(self):
        assert objects.CellReport("x") == objects.CellReport(
            name="x", capacities={}, capabilities={}, last_seen=None, capacities_at=None,
            backoff_until=None, failures=0)
        inst = objects.TopInstance("u")
        assert (inst.vm_state, inst.acked, inst.build_attempts, inst.fault) == (
            "building", False, 0, None)

    def test_top_instance_fields_as_documented(self):
        assert [f.name for f in dataclasses.fields(objects.TopInstance)] == [
            "uuid", "name", "cell_name", "project_id", "user_id", "flavor", "image_ref",
            "vm_state", "task_state", "power_state", "host", "node", "access_ip_v4",
            "addresses", "launched_at", "created_at", "updated_at", "deleted", "deleted_at",
            "fault", "acked", "build_attempts", "build_deadline", "tried_cells", "request_id"]
        assert [f.name for f in dataclasses.fields(objects.TopCell)] == [
            "name", "transport_url", "is_parent", "weight_offset", "weight_scale", "tier",
            "cost_per_vcpu_hour", "flavor_costs", "max_instances", "max_vcpus",
            "max_cost_per_hour", "disabled"]
