"""Backoff after failed builds: 5 minutes, doubling to 30, reset on success."""

import pytest

from cellagent import exception
from cellagent import scheduler
from tests.unit.scheduler.fakes import NOW
from tests.unit.scheduler.fakes import fake_cell
from tests.unit.scheduler.fakes import make_scheduler
from tests.unit.scheduler.fakes import spec


class TestBackoff:

    def test_doubles_up_to_the_cap(self):
        backoff = scheduler.Backoff()
        delays = [backoff.failed("aws", NOW) - NOW for _ in range(6)]
        assert delays == [300.0, 600.0, 1200.0, 1800.0, 1800.0, 1800.0]
        assert backoff.failures("aws") == 6
        assert backoff.until("aws") == NOW + 1800.0

    def test_success_resets(self):
        backoff = scheduler.Backoff()
        backoff.failed("aws", NOW)
        backoff.failed("aws", NOW)
        backoff.succeeded("aws")
        assert backoff.failures("aws") == 0 and backoff.until("aws") is None
        assert backoff.failed("aws", NOW + 10) == NOW + 10 + 300.0

    def test_cells_are_independent(self):
        backoff = scheduler.Backoff(initial=10, maximum=100)
        backoff.failed("a", NOW)
        assert backoff.failed("b", NOW) == NOW + 10
        assert backoff.failed("a", NOW) == NOW + 20

    def test_load_restores_the_doubling(self):
        backoff = scheduler.Backoff()
        backoff.load("aws", NOW + 600.0, 2)
        assert backoff.until("aws") == NOW + 600.0
        assert backoff.failed("aws", NOW) == NOW + 1200.0
        backoff.load("aws", None, 0)
        assert backoff.failures("aws") == 0

    def test_bounds_are_checked(self):
        with pytest.raises(exception.ConfigurationError):
            scheduler.Backoff(initial=600, maximum=300)
        with pytest.raises(exception.ConfigurationError):
            scheduler.Backoff(initial=0)

    def test_a_failed_cell_is_skipped_until_its_backoff_ends(self):
        backoff = scheduler.Backoff()
        sched = make_scheduler(["backoff"], ["ram_by_instance_type"])

        def cells():
            return [fake_cell("a", ram_free_mb=99 * 2048, backoff_until=backoff.until("a")),
                    fake_cell("b", ram_free_mb=2048)]

        assert sched.select(spec(), cells(), NOW).cell == "a"
        backoff.failed("a", NOW)
        assert sched.select(spec(), cells(), NOW + 299).cell == "b"
        assert sched.select(spec(), cells(), NOW + 300).cell == "a"

    def test_from_conf(self, conf):
        conf.set_override("backoff_initial", 60, "scheduler")
        backoff = scheduler.Backoff.from_conf(conf)
        assert (backoff.initial, backoff.maximum) == (60.0, 1800.0)
