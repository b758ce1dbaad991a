"""Fixtures of the rpc tests: a running child cell with an in-process parent."""

import pytest

from tests.unit.helpers import CellHarness


@pytest.fixture
def make_cell(tmp_path):
    """Factory: ``make_cell(driver=..., fake_opts={...})`` starts a child + parent.

    Every harness started here is stopped (servers, agent, transports) at teardown.
    """
    started = []

    def make(**kwargs):
        harness = CellHarness(tmp_path, **kwargs)
        started.append(harness)
        return harness.start()

    yield make
    for harness in reversed(started):
        harness.stop()


@pytest.fixture
def cell(make_cell):
    """A child ``cell1`` on the fake backend, with its parent ``api``."""
    return make_cell()
