"""``different_cell``: not the cells the ``different_cell`` hint names (nova's DifferentCellFilter).

The hint is one cell name or path, or a list of them; a cell is removed
when its name or its full path is listed.
"""

from cellagent.scheduler import filters


class DifferentCellFilter(filters.BaseCellFilter):

    name = "different_cell"

    def filter_all(self, cells, selection):
        hint = selection.hints.get("different_cell")
        if not hint:
            return cells
        avoid = {hint} if isinstance(hint, str) else set(hint)
        passing = []
        for cell in cells:
            if cell.name in avoid or (cell.path and cell.path in avoid):
                selection.remove(self, cell, "different_cell hint lists it")
            else:
                passing.append(cell)
        return passing
