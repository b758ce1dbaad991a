"""``target_cell``: only the cell the ``target_cell`` hint names (nova's TargetCellFilter).

The hint is a cell name (``private``) or its full routing path
(``top!private``). A path deeper than a child is not forwarded as nova
did: no child matches it, and every cell is removed saying so.
"""

from cellagent.scheduler import filters


class TargetCellFilter(filters.BaseCellFilter):

    name = "target_cell"

    def filter_all(self, cells, selection):
        target = selection.hints.get("target_cell")
        if not target:
            return cells
        return super().filter_all(cells, selection)

    def reject_reason(self, cell, selection):
        target = selection.hints["target_cell"]
        if target == cell.name or (cell.path and target == cell.path):
            return None
        return "target_cell hint is %s" % target
