"""``ram_by_instance_type``: more free RAM units wins (nova's RamByInstanceTypeWeigher).

The raw weight is the cell's ``ram_free.units_by_mb`` count for the
flavor's memory size, as in cells v1, but after ``pending`` placements and
with the same fallback for an unreported size as ``CellView.free_units``
(cells v1 used 0). ``num_instances`` does not enter, as in nova. Multiplier
key ``ram`` (``[scheduler] ram_weight_multiplier``, 10.0); a negative
multiplier stacks instead of spreading.
"""

from cellagent.scheduler import weighers


class RamByInstanceTypeWeigher(weighers.BaseCellWeigher):

    name = "ram_by_instance_type"
    multiplier_key = "ram"
    default_multiplier = 10.0

    def weigh_all(self, cells, selection):
        cache = selection.unit_cache
        try:
            # The usual case: the capacity filter computed them already.
            return [cache[cell.name][0] for cell in cells]
        except KeyError:
            pass
        units = selection.units
        return [units(cell)[0] for cell in cells]

    def weigh(self, cell, selection):
        return selection.units(cell)[0]
