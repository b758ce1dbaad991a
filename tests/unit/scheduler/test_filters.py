"""One class per filter: which cells a user sees removed, and the reason given."""

import hypothesis
import hypothesis.strategies as st
import pytest

from cellagent import exception
from cellagent import scheduler
from tests.unit.scheduler.fakes import FLAVORS
from tests.unit.scheduler.fakes import MEDIUM
from tests.unit.scheduler.fakes import NOW
from tests.unit.scheduler.fakes import SMALL
from tests.unit.scheduler.fakes import capacities
from tests.unit.scheduler.fakes import fake_cell
from tests.unit.scheduler.fakes import make_scheduler
from tests.unit.scheduler.fakes import spec


def run(filter_name, cells, request=None, **kwargs):
    """Run one filter (no weighers); return (names kept, removed reasons)."""
    sched = make_scheduler([filter_name], **kwargs)
    request = request or spec()
    try:
        decision = sched.select(request, cells, NOW)
    except exception.NoValidCell as exc:
        return [], exc.removed
    return sorted(decision.weights), decision.removed


class TestTargetCellFilter:

    cells = [fake_cell("private"), fake_cell("aws", tier="public")]

    def test_no_hint_keeps_every_cell(self):
        assert run("target_cell", self.cells) == (["aws", "private"], {})

    def test_bare_name_keeps_only_that_cell(self):
        kept, removed = run("target_cell", self.cells, spec(hints={"target_cell": "aws"}))
        assert kept == ["aws"]
        assert removed == {"private": "target_cell: target_cell hint is aws"}

    def test_full_path_keeps_only_that_cell(self):
        kept, _ = run("target_cell", self.cells, spec(hints={"target_cell": "top!private"}))
        assert kept == ["private"]

    def test_unknown_target_leaves_no_cell(self):
        sched = make_scheduler(["target_cell"])
        with pytest.raises(exception.NoValidCell, match="hint is top!gone"):
            sched.select(spec(hints={"target_cell": "top!gone"}), self.cells, NOW)


class TestDifferentCellFilter:

    cells = [fake_cell("a"), fake_cell("b"), fake_cell("c")]

    def test_one_name(self):
        kept, removed = run("different_cell", self.cells, spec(hints={"different_cell": "b"}))
        assert kept == ["a", "c"]
        assert removed == {"b": "different_cell: different_cell hint lists it"}

    def test_list_of_names_and_paths(self):
        kept, _ = run("different_cell", self.cells,
                      spec(hints={"different_cell": ["a", "top!c"]}))
        assert kept == ["b"]

    def test_no_hint_keeps_every_cell(self):
        assert run("different_cell", self.cells)[0] == ["a", "b", "c"]


class TestImagePropertiesFilter:

    cells = [fake_cell("xen6", capabilities={"prominent_hypervisor_version": ["6.2"]}),
             fake_cell("xen7", capabilities={"prominent_hypervisor_version": ["7.0.1"]}),
             fake_cell("plain", capabilities={"hypervisor": ["kvm"]})]

    @staticmethod
    def image(requires):
        return {"id": "img", "name": "img",
                "properties": {"hypervisor_version_requires": requires}}

    def test_requirement_keeps_matching_and_unlabelled_cells(self):
        kept, removed = run("image_properties", self.cells,
                            spec(image=self.image(">=6.0, <7.0")))
        assert kept == ["plain", "xen6"]
        assert removed == {"xen7": "image_properties: hypervisor version 7.0.1 does "
                                   "not satisfy >=6.0, <7.0"}

    def test_no_property_keeps_every_cell(self):
        assert len(run("image_properties", self.cells,
                       spec(image={"id": "i", "properties": {}}))[0]) == 3

    def test_capability_that_is_not_a_version_removes_its_cell(self):
        cells = [fake_cell("odd", capabilities={"prominent_hypervisor_version": ["xen-six"]})]
        _, removed = run("image_properties", cells, spec(image=self.image(">=6.0")))
        assert "is not a version" in removed["odd"]

    def test_unparsable_requirement_removes_every_cell(self):
        kept, removed = run("image_properties", self.cells, spec(image=self.image("about 6")))
        assert kept == []
        assert set(removed) == {"xen6", "xen7", "plain"}
        assert "is not a version requirement" in removed["plain"]


class TestBackoffFilter:

    def test_backed_off_cell_is_removed_until_the_end(self):
        cells = [fake_cell("flaky", backoff_until=NOW + 240), fake_cell("fine"),
                 fake_cell("over", backoff_until=NOW)]
        kept, removed = run("backoff", cells)
        assert kept == ["fine", "over"]
        assert removed == {"flaky": "backoff: backed off until 2023-11-14T22:17:20Z "
                                    "(240 s from now)"}


class TestMuteChildFilter:

    def test_silent_and_never_seen_cells_are_removed(self):
        cells = [fake_cell("fresh", last_seen=NOW - 300),
                 fake_cell("silent", last_seen=NOW - 412),
                 fake_cell("new", last_seen=None)]
        kept, removed = run("mute_child", cells)
        assert kept == ["fresh"]
        assert removed == {"silent": "mute_child: no report for 412 s (mute after 300 s)",
                           "new": "mute_child: never reported"}

    def test_interval_comes_from_the_scheduler(self):
        cells = [fake_cell("c", last_seen=NOW - 100)]
        assert run("mute_child", cells, mute_interval=60.0)[0] == []


class TestCapacityFilter:

    def test_cell_without_room_for_every_instance_is_removed(self):
        cells = [fake_cell("small", ram_free_mb=2 * 2048), fake_cell("big")]
        kept, removed = run("capacity", cells, spec(SMALL, 3))
        assert kept == ["big"]
        assert removed == {"small": "capacity: 2 free unit(s), needs 3"}

    def test_never_reported_cell_is_removed(self):
        _, removed = run("capacity", [fake_cell("new", capacities={})])
        assert removed == {"new": "capacity: no capacity report yet"}

    def test_disk_bound_cell_says_so(self):
        cells = [fake_cell("c", ram_free_mb=10 * 4096, disk_free_mb=40 * 1024)]
        _, removed = run("capacity", cells, spec(MEDIUM, 2))
        assert removed == {"c": "capacity: 1 free unit(s), needs 2 (disk-bound)"}

    def test_pending_placements_count(self):
        cells = [fake_cell("c", ram_free_mb=2 * 2048, pending=[(SMALL, 1)])]
        _, removed = run("capacity", cells, spec(SMALL, 2))
        assert removed == {"c": "capacity: 1 free unit(s), needs 2"}

    def test_unreported_flavor_size_is_estimated_from_the_free_total(self):
        odd = SMALL.__class__("odd", 3000, 1, 0)
        cells = [fake_cell("c", ram_free_mb=10000)]
        assert run("capacity", cells, spec(odd, 3))[0] == ["c"]
        _, removed = run("capacity", cells, spec(odd, 4))
        assert removed == {"c": "capacity: 3 free unit(s), needs 4"}

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(ram=st.integers(0, 64), disk=st.integers(0, 64),
                      listed=st.booleans(), num=st.integers(1, 8),
                      pending=st.lists(st.tuples(st.sampled_from(FLAVORS), st.integers(1, 3)),
                                       max_size=3),
                      flavor=st.sampled_from(FLAVORS))
    def test_filter_agrees_with_free_units(self, ram, disk, listed, num, pending, flavor):
        # The filter inlines CellView.units' fast path; both must agree.
        caps = capacities(ram * 512, disk * 1024)
        if not listed:
            del caps["ram_free"]["units_by_mb"][str(flavor.memory_mb)]
        cell = fake_cell("c", capacities=caps, pending=pending)
        kept, _ = run("capacity", [cell], spec(flavor, num))
        assert (kept == ["c"]) == (cell.free_units(flavor) >= num)

    def test_exactly_enough_passes(self):
        assert run("capacity", [fake_cell("c", ram_free_mb=3 * 2048)], spec(SMALL, 3))[0] == ["c"]


class TestBudgetFilter:

    def test_max_instances_reached(self):
        cells = [fake_cell("aws", tier="public", used_instances=10,
                           budget=scheduler.Budget(max_instances=10))]
        _, removed = run("budget", cells)
        assert removed == {"aws": "budget: max_instances 10 reached"}

    def test_max_instances_would_be_exceeded(self):
        cells = [fake_cell("aws", tier="public", used_instances=8,
                           budget=scheduler.Budget(max_instances=10))]
        assert run("budget", cells, spec(SMALL, 2))[0] == ["aws"]
        _, removed = run("budget", cells, spec(SMALL, 3))
        assert removed == {"aws": "budget: max_instances 10 would be exceeded (8 used + 3)"}

    def test_max_vcpus(self):
        cells = [fake_cell("aws", tier="public", used_vcpus=6,
                           budget=scheduler.Budget(max_vcpus=8))]
        _, removed = run("budget", cells, spec(MEDIUM, 2))
        assert removed == {"aws": "budget: max_vcpus 8 would be exceeded (6 used + 4)"}

    def test_max_cost_uses_the_flavor_cost(self):
        cells = [fake_cell("aws", tier="public", used_cost_per_hour=0.9,
                           flavor_costs={"m1.small": 0.05},
                           budget=scheduler.Budget(max_cost_per_hour=1.0))]
        assert run("budget", cells, spec(SMALL, 2))[0] == ["aws"]
        _, removed = run("budget", cells, spec(SMALL, 3))
        assert removed == {"aws": "budget: max_cost_per_hour 1 would be exceeded "
                                  "(0.9 used + 0.15)"}

    def test_no_caps_pass(self):
        assert run("budget", [fake_cell("p", used_instances=10 ** 6)])[0] == ["p"]
