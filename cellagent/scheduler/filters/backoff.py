"""``backoff``: not the cells backed off after failed builds (cellagent's own).

The top backs a cell off (``scheduler.Backoff``) when builds sent there
fail or are never acknowledged; ``CellView.backoff_until`` carries the end.
"""

import datetime
import functools

from cellagent.scheduler import filters


class BackoffFilter(filters.BaseCellFilter):

    name = "backoff"

    def filter_all(self, cells, selection):
        now = selection.now
        passing = [c for c in cells if (c.backoff_until or 0.0) <= now]
        if len(passing) != len(cells):
            for cell in cells:
                until = cell.backoff_until
                if until is not None and until > now:
                    selection.remove(self, cell, "backed off until %s (%.0f s from now)"
                                     % (_iso(until), until - now))
        return passing


@functools.lru_cache(maxsize=256)
def _iso(epoch):
    # Memoised: the same backed-off cells are listed decision after decision.
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
