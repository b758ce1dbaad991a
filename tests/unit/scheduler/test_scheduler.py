"""The Scheduler as the top uses it: loading, errors, the decision and its log line."""

import pytest

from cellagent import exception
from cellagent import scheduler
from cellagent.scheduler import filters
from tests.unit.scheduler.fakes import NOW
from tests.unit.scheduler.fakes import SMALL
from tests.unit.scheduler.fakes import fake_cell
from tests.unit.scheduler.fakes import make_scheduler
from tests.unit.scheduler.fakes import spec


def default_scheduler(**kwargs):
    return scheduler.Scheduler(scheduler.DEFAULT_FILTERS, scheduler.DEFAULT_WEIGHERS, **kwargs)


class TestLoading:

    def test_unknown_filter_is_named_with_the_available_ones(self):
        with pytest.raises(exception.ConfigurationError) as info:
            make_scheduler(["capacity", "ram_filter"])
        message = str(info.value)
        assert "'ram_filter'" in message and "[scheduler] filters" in message
        assert "available filters: backoff, budget, capacity" in message

    def test_unknown_weigher_is_named(self):
        with pytest.raises(exception.ConfigurationError, match="unknown scheduler weigher "
                                                              "'cpu'"):
            make_scheduler([], ["cpu"])

    def test_plugins_run_in_the_configured_order_and_know_their_names(self):
        sched = make_scheduler(["budget", "capacity"], ["weight_offset"])
        assert [f.name for f in sched.filters] == ["budget", "capacity"]
        assert [w.name for w in sched.weighers] == ["weight_offset"]

    def test_first_filter_to_remove_a_cell_gives_the_reason(self):
        cells = [fake_cell("new", last_seen=None, capacities={}), fake_cell("ok")]
        decision = default_scheduler().select(spec(), cells, NOW)
        assert decision.removed == {"new": "mute_child: never reported"}

    def test_a_filter_instance_may_be_given_directly(self):
        class NoAws(filters.BaseCellFilter):
            name = "no_aws"

            def reject_reason(self, cell, selection):
                return "no aws today" if cell.name == "aws" else None

        sched = make_scheduler([NoAws()])
        decision = sched.select(spec(), [fake_cell("aws", tier="public"), fake_cell("p")], NOW)
        assert decision.cell == "p"
        assert decision.removed == {"aws": "no_aws: no aws today"}

    def test_from_conf(self, conf):
        conf.set_override("filters", ["capacity"], "scheduler")
        conf.set_override("ram_weight_multiplier", -1.0, "scheduler")
        conf.set_override("low_watermark", 10.0, "scheduler")
        sched = scheduler.Scheduler.from_conf(conf)
        assert [f.name for f in sched.filters] == ["capacity"]
        assert [w.name for w in sched.weighers] == list(scheduler.DEFAULT_WEIGHERS)
        assert sched.multipliers == {"ram": -1.0, "mute": -10000.0, "offset": 1.0}
        assert (sched.policy.low, sched.policy.high) == (10.0, 40.0)
        assert sched.mute_interval == conf.cells.mute_child_interval

    def test_option_defaults_are_the_package_defaults(self, conf):
        assert conf.scheduler.filters == list(scheduler.DEFAULT_FILTERS)
        assert conf.scheduler.weighers == list(scheduler.DEFAULT_WEIGHERS)
        assert scheduler.Scheduler.from_conf(conf).multipliers == scheduler.DEFAULT_MULTIPLIERS

    def test_every_shipped_plugin_loads(self):
        from cellagent.scheduler import plugins
        sched = make_scheduler(plugins.available(plugins.FILTERS),
                               plugins.available(plugins.WEIGHERS))
        assert len(sched.filters) == 7 and len(sched.weighers) == 3

    def test_from_conf_refuses_crossed_watermarks(self, conf):
        conf.set_override("low_watermark", 60.0, "scheduler")
        with pytest.raises(exception.ConfigurationError, match="high_watermark"):
            scheduler.Scheduler.from_conf(conf)


class TestNoValidCell:

    def test_message_lists_each_cell_and_the_filter_that_removed_it(self):
        cells = [fake_cell("private", ram_free_mb=2048),
                 fake_cell("aws", tier="public", used_instances=10,
                           budget=scheduler.Budget(max_instances=10))]
        with pytest.raises(exception.NoValidCell) as info:
            default_scheduler().select(spec(SMALL, 3), cells, NOW)
        assert str(info.value) == ("No cell can take 3 x m1.small: private: capacity: 1 free "
                                   "unit(s), needs 3; aws: budget: max_instances 10 reached")
        assert info.value.removed == {"private": "capacity: 1 free unit(s), needs 3",
                                      "aws": "budget: max_instances 10 reached"}

    def test_cells_are_listed_in_the_order_given(self):
        cells = [fake_cell("b", capacities={}), fake_cell("a", last_seen=None)]
        with pytest.raises(exception.NoValidCell) as info:
            default_scheduler().select(spec(), cells, NOW)
        assert str(info.value) == ("No cell can take 1 x m1.small: b: capacity: no capacity "
                                   "report yet; a: mute_child: never reported")

    def test_no_cells_at_all(self):
        with pytest.raises(exception.NoValidCell, match="1 x m1.small: no cells are known"):
            default_scheduler().select(spec(), [], NOW)

    def test_is_a_cellagent_error_with_the_removals_in_its_kwargs(self):
        exc = exception.NoValidCell("x", removed={"a": "capacity: full"})
        assert isinstance(exc, exception.CellAgentError)
        assert exc.kwargs["removed"] == {"a": "capacity: full"}
        assert "boom" in str(exception.NoValidCell(reason="boom"))


class TestDecision:

    def test_decision_carries_what_the_top_needs(self):
        cells = [fake_cell("p1", ram_free_mb=4 * 2048), fake_cell("p2", ram_free_mb=8 * 2048),
                 fake_cell("gone", last_seen=None)]
        request = spec(SMALL, 2, request_id="req-42", instance_uuids=["u1", "u2"])
        decision = default_scheduler().select(request, cells, NOW)
        assert (decision.cell, decision.tier, decision.path) == ("p2", "private", "top!p2")
        assert decision.weights == {"p1": 0.0, "p2": 10.0}
        assert decision.removed == {"gone": "mute_child: never reported"}
        assert not decision.bursting and not decision.burst_changed
        assert decision.private_room_percent == pytest.approx(50.0)

    def test_log_line_says_everything_on_one_line(self):
        cells = [fake_cell("p1", ram_free_mb=4 * 2048), fake_cell("p2", ram_free_mb=8 * 2048),
                 fake_cell("gone", last_seen=None)]
        line = default_scheduler().select(spec(SMALL, 2, request_id="req-42"), cells,
                                          NOW).log_line()
        assert "\n" not in line
        assert line.startswith("[req-42] 2 x m1.small: candidates p1, p2, gone; ")
        assert "removed: gone (mute_child: never reported)" in line
        assert "weights: p2=10.000, p1=0.000" in line
        assert "chose p2 (private): private first" in line

    def test_cells_are_not_changed(self):
        cell = fake_cell("p", pending=[(SMALL, 1)])
        before = repr(cell)
        default_scheduler().select(spec(), [cell], NOW)
        assert repr(cell) == before
