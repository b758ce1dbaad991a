"""The burst policy: private first, watermarks with hysteresis, cheapest public."""

import pytest

from cellagent import exception
from cellagent import objects
from cellagent import scheduler
from tests.unit.scheduler.fakes import NOW
from tests.unit.scheduler.fakes import SMALL
from tests.unit.scheduler.fakes import fake_cell
from tests.unit.scheduler.fakes import spec

UNIT = objects.Flavor("unit", 1000, 1, 0)        # 1000 MB, no disk
PRIVATE_TOTAL = 10 * 1000


def default_scheduler(**kwargs):
    return scheduler.Scheduler(scheduler.DEFAULT_FILTERS, scheduler.DEFAULT_WEIGHERS, **kwargs)


def private(free_mb, name="private", **kwargs):
    return fake_cell(name, ram_free_mb=free_mb, ram_total_mb=PRIVATE_TOTAL, **kwargs)


def public(name="aws", cost=0.05, **kwargs):
    return fake_cell(name, tier="public", ram_free_mb=1000 * 1000, cost_per_vcpu_hour=cost,
                     **kwargs)


class TestHysteresis:

    def test_fill_burst_and_come_back(self):
        """A 10-unit private cell fills up, bursts, then empties (20% / 40%)."""
        sched = default_scheduler()
        free = PRIVATE_TOTAL
        seen = []

        def place(free):
            decision = sched.select(spec(UNIT), [private(free), public()], NOW)
            seen.append((free // 1000, decision.cell, decision.bursting,
                         decision.burst_changed))
            return decision

        # Private while the room after placement stays >= 20%.
        decision = place(free)
        while decision.cell == "private":
            free -= 1000
            decision = place(free)
        # 2 units free: placing one would leave 10% < 20%: burst.
        assert seen[-1] == (2, "aws", True, True)
        assert decision.reason == ("private room would fall to 10.0% (< low watermark 20%): "
                                   "burst to the cheapest public cell (0.05/h)")
        # Instances deleted: at 30% it stays public (it would have gone
        # private at 30% before bursting), as it does at 39%...
        for free in (3000, 3900):
            decision = place(free)
            assert (decision.cell, decision.bursting, decision.burst_changed) == (
                "aws", True, False)
            assert "high watermark 40%" in decision.reason
        # ... and comes back at 40%.
        free = 4000
        decision = place(free)
        assert (decision.cell, decision.bursting, decision.burst_changed) == (
            "private", False, True)
        assert "stop bursting" in decision.reason
        # Not bursting any more, 30% is private again.
        free = 3000
        assert place(free).cell == "private"
        assert [s[0] for s in seen[:9]] == list(range(10, 1, -1))
        assert all(s[1] == "private" and not s[2] for s in seen[:8])

    def test_bursting_stays_public_when_placement_would_cross_low(self):
        sched = default_scheduler(bursting=True)
        big = objects.Flavor("big", 3000, 1, 0)
        decision = sched.select(spec(big), [private(4500), public()], NOW)
        # Room now 45% >= 40%, but after placement 15% < 20%.
        assert decision.cell == "aws" and decision.bursting

    def test_private_room_counts_live_private_cells_only(self):
        cells = [private(1000), private(9000, name="mute", last_seen=NOW - 1000),
                 private(9000, name="off", backoff_until=NOW + 60),
                 fake_cell("unknown", ram_free_mb=9000, ram_total_mb=0), public()]
        decision = default_scheduler().select(spec(UNIT), cells, NOW)
        assert decision.private_room_percent == pytest.approx(10.0)
        assert decision.cell == "aws"

    def test_unknown_room_never_causes_a_burst(self):
        cells = [fake_cell("p", ram_free_mb=5000, ram_total_mb=0), public()]
        decision = default_scheduler().select(spec(UNIT), cells, NOW)
        assert decision.private_room_percent is None
        assert decision.cell == "p" and "unknown" in decision.reason


class TestTierChoice:

    def test_cheapest_public_cell_wins_over_a_better_weighted_one(self):
        cells = [private(0), public("gcp", cost=0.04, weight_offset=0),
                 public("aws", cost=0.05, weight_offset=100),
                 public("azure", cost=0.06)]
        decision = default_scheduler().select(spec(SMALL), cells, NOW)
        assert decision.weights["aws"] > decision.weights["gcp"]
        assert decision.cell == "gcp"
        assert "cheapest public cell (0.04/h)" in decision.reason

    def test_equal_cost_goes_to_the_higher_weight_then_the_name(self):
        cells = [public("b", weight_offset=1), public("a"), public("c", weight_offset=1)]
        assert default_scheduler().select(spec(SMALL), cells, NOW).cell == "b"

    def test_flavor_cost_overrides_the_vcpu_estimate(self):
        cells = [public("gcp", cost=0.04), public("aws", cost=0.05,
                                                  flavor_costs={"m1.small": 0.01})]
        assert default_scheduler().select(spec(SMALL), cells, NOW).cell == "aws"

    def test_no_private_cell_fits_bursts(self):
        decision = default_scheduler().select(spec(SMALL), [public()], NOW)
        assert decision.cell == "aws" and decision.bursting and decision.burst_changed
        assert decision.reason.startswith("no private cell fits")

    def test_no_public_cell_fits_stays_private(self):
        decision = default_scheduler().select(spec(UNIT), [private(2000)], NOW)
        assert decision.cell == "private" and not decision.bursting
        assert "no public cell fits" in decision.reason

    def test_best_weighted_private_cell_wins(self):
        cells = [private(3000, name="p1"), private(6000, name="p2"), public()]
        assert default_scheduler().select(spec(UNIT), cells, NOW).cell == "p2"

    def test_target_cell_hint_bypasses_the_policy(self):
        sched = default_scheduler()
        request = spec(UNIT, hints={"target_cell": "top!private"})
        decision = sched.select(request, [private(2000), public()], NOW)
        assert (decision.cell, decision.reason, decision.bursting) == (
            "private", "target_cell hint", False)
        sched.bursting = True
        decision = sched.select(request, [private(9000), public()], NOW)
        assert decision.cell == "private" and decision.bursting and not decision.burst_changed


class TestBurstingState:

    def test_starts_not_bursting_unless_told(self):
        assert not default_scheduler().bursting
        assert default_scheduler(bursting=True).bursting

    def test_top_can_set_it(self):
        sched = default_scheduler()
        sched.bursting = True
        decision = sched.select(spec(UNIT), [private(3000), public()], NOW)
        assert decision.cell == "aws"

    def test_watermarks_are_validated(self):
        with pytest.raises(exception.ConfigurationError, match="low_watermark"):
            default_scheduler(low_watermark=50, high_watermark=40)
        with pytest.raises(exception.ConfigurationError):
            default_scheduler(high_watermark=140)
