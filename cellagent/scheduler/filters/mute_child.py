"""``mute_child``: not the cells that stopped reporting (cellagent's own).

Nova only weighed mute cells down (reference 4.5), so a silent cell could
still win when every candidate was silent. A cell is mute when no report
arrived within ``mute_interval`` seconds (``[cells] mute_child_interval``),
or none ever did. Leave this filter out of ``[scheduler] filters`` to get
nova's behaviour back (the ``mute_child`` weigher then does the work).
"""

from cellagent.scheduler import filters

# last_seen None (or 0, the epoch) means never: mute at any time.
NEVER = float("-inf")


class MuteChildFilter(filters.BaseCellFilter):

    name = "mute_child"

    def filter_all(self, cells, selection):
        now = selection.now
        interval = selection.mute_interval
        # A cell is mute when now - last_seen > interval: compare with one
        # cutoff instead of subtracting per cell.
        cutoff = now - interval
        passing = [c for c in cells if (c.last_seen or NEVER) >= cutoff]
        if len(passing) != len(cells):
            for cell in cells:
                if (cell.last_seen or NEVER) >= cutoff:
                    continue
                if not cell.last_seen:
                    selection.remove(self, cell, "never reported")
                else:
                    selection.remove(self, cell, "no report for %.0f s (mute after %.0f s)"
                                     % (now - cell.last_seen, interval))
        return passing
