"""``mute_child``: a mute cell weighs 1.0, others 0 (nova's MuteChildWeigher).

With the negative multiplier (key ``mute``, ``[scheduler]
mute_weight_multiplier``, -10000.0) a mute cell sinks to the bottom, yet can
still win when nothing else is left. With the ``mute_child`` filter in the
list no mute cell gets here; keep the weigher for configurations without it.
"""

from cellagent.scheduler import weighers


class MuteChildWeigher(weighers.BaseCellWeigher):

    name = "mute_child"
    multiplier_key = "mute"
    default_multiplier = -10000.0

    def weigh_all(self, cells, selection):
        cutoff = selection.now - selection.mute_interval
        never = float("-inf")
        return [0.0 if (c.last_seen or never) >= cutoff else 1.0 for c in cells]

    def weigh(self, cell, selection):
        return 1.0 if cell.is_mute(selection.now, selection.mute_interval) else 0.0
