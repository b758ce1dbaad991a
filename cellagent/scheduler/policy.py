"""The burst policy: private first, public when the private side runs short.

It runs after the filters and the weighers, on the cells that survived,
split by tier into (weight, cell) pairs: ``private`` (P) and ``public``
(Q). The *best* private cell has the highest weight (ties: by name).

*Private room* is the free share of the private side's RAM, over the
private cells given to the decision that are neither mute nor backed off
(those cannot take work, so their room does not count), ignoring cells
whose ``ram_total_mb`` is 0 (unknown)::

    room now   = 100 * sum(ram_free_mb()) / sum(ram_total_mb)
    room after = 100 * (sum(ram_free_mb()) - flavor.memory_mb * num) / sum(ram_total_mb)

``ram_free_mb()`` already deducts pending placements. When no private cell
counts, the room is unknown (None) and never the reason to burst.

Two watermarks (percent) give hysteresis, as a thermostat does:

* **Not bursting.** If P is not empty and room after >= ``low``: the best
  weighted private cell. Else, if Q is not empty: *enter bursting* and take
  the cheapest public cell. Else, if P is not empty: the best private cell
  (no public cell fits, so the low watermark is crossed anyway).
* **Bursting.** If P is not empty, room now >= ``high`` and room after >=
  ``low``: *leave bursting*, best private cell. Else, if Q is not empty: the
  cheapest public cell. Else, if P is not empty: the best private cell (and
  stay bursting: the private side is still short).

So once it bursts it stays public until the private room climbs back to
the high watermark (instances deleted, a cell added), instead of flapping
between tiers around one threshold. *Cheapest* is ``cost_for(flavor) *
num_instances``, ties broken by the higher weight, then by name. A
``target_cell`` hint bypasses the policy (the scheduler takes the best of
what the filters left and leaves the bursting state as it is).
"""

import operator

from cellagent import exception


_NEVER = float("-inf")


class BurstPolicy:
    """The watermarks and the choice; the bursting state is the caller's."""

    def __init__(self, low_watermark=20.0, high_watermark=40.0):
        low = float(low_watermark)
        high = float(high_watermark)
        if not 0.0 <= low <= high <= 100.0:
            raise exception.ConfigurationError(
                reason="[scheduler] needs 0 <= low_watermark (%g) <= high_watermark (%g) "
                       "<= 100" % (low, high))
        self.low = low
        self.high = high

    @staticmethod
    def private_room(cells, need_mb, now, mute_interval):
        """``(room now, room after placing need_mb)`` in percent, or ``(None, None)``."""
        free = total = 0
        cutoff = now - mute_interval
        for cell in cells:
            ram_total = cell.ram_total_mb
            if (not ram_total or cell.tier != "private" or (cell.last_seen or _NEVER) < cutoff
                    or (cell.backoff_until or 0.0) > now):
                continue
            if cell.pending:
                free += cell.ram_free_mb()
            else:
                section = cell.capacities.get("ram_free")
                free += (section.get("total_mb") or 0) if section else 0
            total += ram_total
        if not total:
            return None, None
        after = free - need_mb
        return 100.0 * free / total, (100.0 * after / total if after > 0 else 0.0)

    def choose(self, private, public, bursting, room_now, room_after, flavor, num):
        """Pick from ``private`` and ``public``, lists of (weight, cell) pairs.

        Returns ``(cell, reason, bursting after)``; ``cell`` is None only
        when both lists are empty.
        """
        low, high = self.low, self.high
        after_ok = room_after is None or room_after >= low
        if not bursting:
            if private and after_ok:
                if room_after is None:
                    return best(private), "private first (private room unknown)", False
                return (best(private), "private first: private room after placement "
                        "%.1f%% >= low watermark %g%%" % (room_after, low), False)
            if public:
                cell, cost = _cheapest(public, flavor, num)
                why = ("private room would fall to %.1f%% (< low watermark %g%%)"
                       % (room_after, low) if private else "no private cell fits")
                return cell, "%s: burst to the cheapest public cell (%.4g/h)" % (why, cost), True
            if private:
                return best(private), "no public cell fits (private room after %s)" % (
                    _pct(room_after)), False
            return None, "", False
        if private and after_ok and (room_now is None or room_now >= high):
            return (best(private), "private room %s >= high watermark %g%%: stop bursting"
                    % (_pct(room_now), high), False)
        if public:
            cell, cost = _cheapest(public, flavor, num)
            if not private:
                why = "no private cell fits"
            elif room_now is not None and room_now < high:
                why = "private room %.1f%% < high watermark %g%%" % (room_now, high)
            else:
                why = "private room would fall to %.1f%% (< low watermark %g%%)" % (
                    room_after, low)
            return cell, "bursting, %s: cheapest public cell (%.4g/h)" % (why, cost), True
        if private:
            return best(private), "bursting, but no public cell fits", True
        return None, "", bursting


def best(pairs):
    """The cell of the highest weight among (weight, cell) pairs; ties by name."""
    top = max(pairs, key=_WEIGHT)[0]
    tied = [cell for weight, cell in pairs if weight == top]
    return tied[0] if len(tied) == 1 else min(tied, key=_NAME)


_WEIGHT = operator.itemgetter(0)
_NAME = operator.attrgetter("name")


def _cheapest(public, flavor, num):
    """(cell, cost of the request there): lowest cost, then highest weight, then name."""
    # cost_for() inlined: this runs over every public candidate while bursting.
    name = flavor.name
    vcpus = flavor.vcpus
    found = None
    found_cost = found_weight = 0.0
    for weight, cell in public:
        cost = cell.flavor_costs.get(name)
        if cost is None:
            cost = vcpus * cell.cost_per_vcpu_hour
        if (found is None or cost < found_cost
                or (cost == found_cost and (weight > found_weight or (
                    weight == found_weight and cell.name < found.name)))):
            found, found_cost, found_weight = cell, cost, weight
    return found, found_cost * num


def _pct(value):
    return "unknown" if value is None else "%.1f%%" % value
