"""``capacity``: only cells with room for every instance of the request (cellagent's own).

Cells v1 had no capacity filter, so a full cell stayed a candidate. Here a
cell passes when ``free_units`` for the flavor (RAM and disk units from its
last report, minus what was placed there since) is at least
``num_instances``. A cell that never reported capacities is removed.
"""

from cellagent.scheduler import filters


class CapacityFilter(filters.BaseCellFilter):

    name = "capacity"

    def filter_all(self, cells, selection):
        need = selection.num_instances
        mem, mem_key = selection.memory_mb, selection.memory_key
        disk_mb, disk_key = selection.disk_mb, selection.disk_key
        cache = selection.unit_cache
        passing = []
        for cell in cells:
            caps = cell.capacities
            if not caps:
                selection.remove(self, cell, "no capacity report yet")
                continue
            # CellView.units' fast path, inlined: this loop is the hottest
            # of a decision (every cell, every request).
            if cell.pending or not mem:
                ram, disk = cell.units(mem, mem_key, disk_mb, disk_key)
            else:
                try:
                    ram = caps["ram_free"]["units_by_mb"][mem_key]
                    disk = caps["disk_free"]["units_by_mb"][disk_key] if disk_mb else None
                except (KeyError, TypeError):
                    ram, disk = cell.units(mem, mem_key, disk_mb, disk_key)
            cache[cell.name] = (ram, disk)
            if disk is None or ram <= disk:
                if ram >= need:
                    passing.append(cell)
                    continue
                selection.remove(self, cell, "%d free unit(s), needs %d" % (ram, need))
            elif disk >= need:
                passing.append(cell)
            else:
                selection.remove(self, cell, "%d free unit(s), needs %d (disk-bound)"
                                 % (disk, need))
        return passing
