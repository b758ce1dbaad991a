"""``weight_offset``: the operator's per-cell preference (nova's WeightOffsetWeigher).

The raw weight is the cell record's ``weight_offset``. The record's
``weight_scale`` is carried in ``CellView`` but, as in nova (reference 8:
"weight_scale is never used"), weighs nothing, so records copied from a
nova deployment keep their meaning. Multiplier key ``offset``
(``[scheduler] offset_weight_multiplier``, 1.0).
"""

from cellagent.scheduler import weighers


class WeightOffsetWeigher(weighers.BaseCellWeigher):

    name = "weight_offset"
    multiplier_key = "offset"
    default_multiplier = 1.0

    def weigh_all(self, cells, selection):
        return [c.weight_offset for c in cells]

    def weigh(self, cell, selection):
        return cell.weight_offset
