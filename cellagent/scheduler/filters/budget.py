"""``budget``: not the cells whose operator budget the request would exceed (cellagent's own).

The request's instances, vCPUs (``flavor.vcpus * num_instances``) and
estimated cost (``cost_for(flavor) * num_instances``) are added to the
cell's current use (``used_*``) and compared with ``budget.max_*``; a cap
of None is no cap. The first cap exceeded is the reason.
"""

from cellagent.scheduler import filters


class BudgetFilter(filters.BaseCellFilter):

    name = "budget"

    def filter_all(self, cells, selection):
        n = selection.num_instances
        vcpus = selection.flavor.vcpus * n
        flavor = selection.flavor
        passing = []
        for cell in cells:
            b = cell.budget
            cap = b.max_instances
            if cap is not None and cell.used_instances + n > cap:
                selection.remove(self, cell, self.reject_reason(cell, selection))
                continue
            cap = b.max_vcpus
            if cap is not None and cell.used_vcpus + vcpus > cap:
                selection.remove(self, cell, self.reject_reason(cell, selection))
                continue
            cap = b.max_cost_per_hour
            if cap is not None and cell.used_cost_per_hour + cell.cost_for(flavor) * n > cap:
                selection.remove(self, cell, self.reject_reason(cell, selection))
                continue
            passing.append(cell)
        return passing

    def reject_reason(self, cell, selection):
        b = cell.budget
        n = selection.num_instances
        flavor = selection.flavor
        if b.max_instances is not None and cell.used_instances + n > b.max_instances:
            return _exceeded("max_instances", "%d", b.max_instances, cell.used_instances, n)
        if b.max_vcpus is not None and cell.used_vcpus + flavor.vcpus * n > b.max_vcpus:
            return _exceeded("max_vcpus", "%d", b.max_vcpus, cell.used_vcpus, flavor.vcpus * n)
        if b.max_cost_per_hour is not None:
            cost = cell.cost_for(flavor) * n
            if cell.used_cost_per_hour + cost > b.max_cost_per_hour:
                return _exceeded("max_cost_per_hour", "%.4g", b.max_cost_per_hour,
                                 cell.used_cost_per_hour, cost)
        return None


def _exceeded(cap, fmt, limit, used, wanted):
    if used >= limit:
        return ("%s " + fmt + " reached") % (cap, limit)
    return ("%s " + fmt + " would be exceeded (" + fmt + " used + " + fmt + ")") % (
        cap, limit, used, wanted)
