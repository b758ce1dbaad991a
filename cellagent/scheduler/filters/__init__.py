"""Cell filters: which cells may take a request at all.

A filter is an entry point in the ``cellagent.scheduler.filters`` group,
named like its module (``capacity`` is ``filters/capacity.py``), and
``[scheduler] filters`` lists the names to run, in order. The scheduler
constructs each filter once, with no arguments, and sets its ``name``
attribute to the entry-point name; everything a decision depends on comes
in through the ``Selection`` of that decision (``request.py``), so a filter
keeps no state between decisions and may serve several threads at once.

**Contract.** ``filter_all(cells, selection)`` receives the cells still in
the running (in the order the top gave them, minus what earlier filters
removed) and returns those that pass, in the same order. For every cell it
drops it calls ``selection.remove(self, cell, reason)`` exactly once, with
a short reason in plain words that an operator can act on ("no capacity
report yet", "backed off until 2025-01-01T12:04:00Z (240 s from now)");
the scheduler prefixes it with the filter's name, shows it in the
decision's log line and, when nothing is left, in the ``NoValidCell``
message. A filter never raises for a cell it dislikes; it removes the
cell. A filter that does not apply to a request (no hint, no image
property) returns ``cells`` as it is, which is also what makes the default
list cheap.

The base class implements ``filter_all`` on top of ``reject_reason(cell,
selection)``, which returns None when the cell passes and the reason
otherwise; most filters only write that. Filters on the hot path override
``filter_all`` to look at the request once instead of once per cell.

Differences from nova's cells v1 filters (reference section 5.2): there are
capacity, mute, budget and backoff filters (cells v1 had none, so a full or
silent cell could win); hints are not popped and no policy is checked here
(the top authorises ``target_cell`` before it asks); and ``target_cell``
never forwards to a grandchild, it only keeps one child.
"""


class BaseCellFilter:
    """Base class of the cell filters; see the module docstring."""

    #: The entry-point name; set by the scheduler when it loads the filter.
    name = "filter"

    def filter_all(self, cells, selection):
        """Return the cells of ``cells`` that pass, recording each removal."""
        passing = []
        for cell in cells:
            reason = self.reject_reason(cell, selection)
            if reason is None:
                passing.append(cell)
            else:
                selection.remove(self, cell, reason)
        return passing

    def reject_reason(self, cell, selection):
        """None when ``cell`` passes, else why it cannot take the request."""
        raise NotImplementedError()
