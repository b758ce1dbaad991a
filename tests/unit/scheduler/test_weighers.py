"""One class per weigher, and the per-request normalisation."""

import pytest

from cellagent.scheduler import weighers
from tests.unit.scheduler.fakes import NOW
from tests.unit.scheduler.fakes import SMALL
from tests.unit.scheduler.fakes import fake_cell
from tests.unit.scheduler.fakes import make_scheduler
from tests.unit.scheduler.fakes import spec


def weigh(weigher_names, cells, request=None, **kwargs):
    decision = make_scheduler([], weigher_names, **kwargs).select(request or spec(), cells, NOW)
    return decision


class TestRamByInstanceTypeWeigher:

    def test_most_free_units_wins(self):
        cells = [fake_cell("a", ram_free_mb=4 * 2048), fake_cell("b", ram_free_mb=9 * 2048),
                 fake_cell("c", ram_free_mb=6 * 2048)]
        decision = weigh(["ram_by_instance_type"], cells)
        assert decision.cell == "b"
        assert decision.weights == {"a": 0.0, "b": 10.0, "c": pytest.approx(4.0)}

    def test_pending_placements_lower_the_weight(self):
        cells = [fake_cell("a", ram_free_mb=6 * 2048, pending=[(SMALL, 4)]),
                 fake_cell("b", ram_free_mb=4 * 2048)]
        assert weigh(["ram_by_instance_type"], cells).cell == "b"

    def test_negative_multiplier_stacks(self):
        cells = [fake_cell("a", ram_free_mb=4 * 2048), fake_cell("b", ram_free_mb=9 * 2048)]
        assert weigh(["ram_by_instance_type"], cells, multipliers={"ram": -1.0}).cell == "a"


class TestMuteChildWeigher:

    def test_mute_cell_sinks_below_a_fuller_live_one(self):
        cells = [fake_cell("silent", ram_free_mb=100 * 2048, last_seen=NOW - 1000),
                 fake_cell("live", ram_free_mb=2048)]
        decision = weigh(["ram_by_instance_type", "mute_child"], cells)
        assert decision.cell == "live"
        assert decision.weights["silent"] == pytest.approx(10.0 - 10000.0)

    def test_mute_cell_can_still_win_alone(self):
        # Without the mute_child filter a silent cell is weighed, not removed.
        decision = weigh(["mute_child"], [fake_cell("silent", last_seen=None)])
        assert decision.cell == "silent"


class TestWeightOffsetWeigher:

    def test_higher_offset_wins_a_tie(self):
        cells = [fake_cell("a"), fake_cell("b", weight_offset=5.0)]
        assert weigh(["ram_by_instance_type", "weight_offset"], cells).cell == "b"

    def test_offset_is_capped_by_its_multiplier_as_in_nova(self):
        cells = [fake_cell("roomy", ram_free_mb=9 * 2048),
                 fake_cell("default", ram_free_mb=8 * 2048, weight_offset=999999999999999)]
        assert weigh(["ram_by_instance_type", "weight_offset"], cells).cell == "roomy"
        assert weigh(["ram_by_instance_type", "weight_offset"], cells,
                     multipliers={"offset": 100.0}).cell == "default"

    def test_weight_scale_weighs_nothing(self):
        cells = [fake_cell("a", weight_offset=1.0, weight_scale=0.001),
                 fake_cell("b", weight_offset=0.0, weight_scale=1000.0)]
        assert weigh(["weight_offset"], cells).cell == "a"


class TestNormalisation:

    def test_each_request_is_normalised_on_its_own(self):
        # nova bug 1870096: min/max stuck at the widest range ever seen, so
        # after one request over 0..1000 units, a request over 10..20 got
        # weights 0.1 and 0.2 and the RAM weigher stopped deciding anything.
        sched = make_scheduler([], ["ram_by_instance_type"])
        wide = [fake_cell("a", ram_free_mb=0), fake_cell("b", ram_free_mb=1000 * 2048)]
        assert sched.select(spec(), wide, NOW).weights == {"a": 0.0, "b": 10.0}
        narrow = [fake_cell("a", ram_free_mb=10 * 2048), fake_cell("b", ram_free_mb=20 * 2048)]
        assert sched.select(spec(), narrow, NOW).weights == {"a": 0.0, "b": 10.0}

    def test_equal_raw_weights_normalise_to_zero(self):
        assert weighers.normalize([3, 3, 3]) == [0.0, 0.0, 0.0]
        assert weighers.normalize([1, 3, 2]) == [0.0, 1.0, 0.5]

    def test_zero_multiplier_switches_a_weigher_off(self):
        cells = [fake_cell("a", ram_free_mb=2048), fake_cell("b", ram_free_mb=9 * 2048)]
        decision = weigh(["ram_by_instance_type"], cells, multipliers={"ram": 0})
        assert decision.weights == {"a": 0.0, "b": 0.0}

    def test_single_candidate_is_not_weighed(self):
        assert weigh(["ram_by_instance_type"], [fake_cell("a")]).weights == {"a": 0.0}
