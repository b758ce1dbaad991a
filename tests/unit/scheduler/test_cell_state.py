"""CellView arithmetic: free units, the fallback, pending placements, cost, mute."""

import pytest

from cellagent import scheduler
from tests.unit.scheduler.fakes import LARGE
from tests.unit.scheduler.fakes import MEDIUM
from tests.unit.scheduler.fakes import NOW
from tests.unit.scheduler.fakes import SMALL
from tests.unit.scheduler.fakes import TINY
from tests.unit.scheduler.fakes import capacities
from tests.unit.scheduler.fakes import fake_cell


class TestFreeUnits:

    def test_reported_units_are_used_as_they_are(self):
        cell = fake_cell("c", capacities={
            "ram_free": {"total_mb": 99999, "units_by_mb": {"2048": 5}},
            "disk_free": {"total_mb": 99999, "units_by_mb": {"20480": 7}}})
        # The child's counts win over total_mb (they carry its reserve).
        assert cell.free_units(SMALL) == 5

    def test_disk_limits_when_it_is_smaller(self):
        cell = fake_cell("c", ram_free_mb=10 * 2048, disk_free_mb=3 * 20480)
        assert cell.free_units(SMALL) == 3

    def test_disk_is_ignored_for_a_flavor_without_disk(self):
        diskless = SMALL.__class__("boot-from-volume", 2048, 1, 0)
        cell = fake_cell("c", ram_free_mb=4 * 2048, disk_free_mb=0)
        assert cell.free_units(diskless) == 4

    def test_missing_size_falls_back_to_total_over_size(self):
        odd = SMALL.__class__("odd", 3000, 1, 10)
        cell = fake_cell("c", ram_free_mb=10000, disk_free_mb=25 * 1024)
        assert "3000" not in cell.capacities["ram_free"]["units_by_mb"]
        # floor(10000 / 3000) = 3 by RAM, floor(25600 / 10240) = 2 by disk.
        assert cell.free_units(odd) == 2

    def test_never_reported_cell_has_no_units(self):
        cell = fake_cell("c", capacities={})
        assert cell.free_units(SMALL) == 0
        assert cell.ram_free_mb() == 0

    def test_zero_memory_flavor_has_no_units(self):
        zero = SMALL.__class__("zero", 0, 1, 0)
        assert fake_cell("c").free_units(zero) == 0


class TestPending:

    def test_pending_of_the_same_flavor_is_subtracted(self):
        cell = fake_cell("c", ram_free_mb=5 * 2048, pending=[(SMALL, 2)])
        assert cell.free_units(SMALL) == 3
        assert cell.ram_free_mb() == 3 * 2048

    def test_a_bigger_flavor_takes_several_small_slots(self):
        cell = fake_cell("c", ram_free_mb=8192, pending=[(MEDIUM, 1)])
        # 16 tiny slots, minus ceil(4096 / 512) = 8.
        assert cell.free_units(TINY) == 8

    def test_a_smaller_flavor_takes_a_whole_big_slot(self):
        # Conservative: one tiny instance may split the one free large slot.
        cell = fake_cell("c", ram_free_mb=2 * 8192, pending=[(TINY, 1)])
        assert cell.free_units(LARGE) == 1
        assert cell.ram_free_mb() == 2 * 8192 - 512

    def test_pending_disk_is_subtracted_too(self):
        cell = fake_cell("c", ram_free_mb=100 * 2048, disk_free_mb=4 * 20480,
                         pending=[(MEDIUM, 1)])
        # MEDIUM has 40 GB of disk: two 20 GB slots.
        assert cell.free_units(SMALL) == 2

    def test_units_never_go_below_zero(self):
        cell = fake_cell("c", ram_free_mb=2048, pending=[(LARGE, 3)])
        assert cell.free_units(SMALL) == 0
        assert cell.ram_free_mb() == 0


class TestCostAndState:

    def test_cost_is_per_vcpu_unless_the_flavor_has_its_own(self):
        cell = fake_cell("aws", tier="public", cost_per_vcpu_hour=0.05,
                         flavor_costs={"m1.small": 0.023})
        assert cell.cost_for(MEDIUM) == pytest.approx(0.10)
        assert cell.cost_for(SMALL) == 0.023

    def test_mute_after_the_interval_or_when_never_seen(self):
        assert not fake_cell("c", last_seen=NOW - 300).is_mute(NOW, 300)
        assert fake_cell("c", last_seen=NOW - 301).is_mute(NOW, 300)
        assert fake_cell("c", last_seen=None).is_mute(NOW, 300)

    def test_backed_off_only_while_the_end_is_ahead(self):
        assert fake_cell("c", backoff_until=NOW + 1).is_backed_off(NOW)
        assert not fake_cell("c", backoff_until=NOW).is_backed_off(NOW)
        assert not fake_cell("c", backoff_until=None).is_backed_off(NOW)

    def test_tier_is_checked(self):
        with pytest.raises(ValueError, match="tier"):
            scheduler.CellView("c", tier="hybrid")

    def test_request_needs_at_least_one_instance(self):
        with pytest.raises(ValueError, match="num_instances"):
            scheduler.RequestSpec(SMALL, 0)

    def test_fake_capacities_match_the_cells_v1_shape(self):
        caps = capacities(4096, 40960)
        assert caps["ram_free"]["units_by_mb"]["2048"] == 2
        assert caps["disk_free"]["units_by_mb"]["20480"] == 2
