"""The scheduler: filters, then weighers, then the burst policy."""

import dataclasses
import logging
import threading

from cellagent import exception
from cellagent.scheduler import filters as filters_mod
from cellagent.scheduler import plugins
from cellagent.scheduler import policy as policy_mod
from cellagent.scheduler import request
from cellagent.scheduler import weighers as weighers_mod

LOG = logging.getLogger(__name__)

DEFAULT_FILTERS = ("target_cell", "different_cell", "image_properties", "backoff",
                   "mute_child", "capacity", "budget")
DEFAULT_WEIGHERS = ("ram_by_instance_type", "mute_child", "weight_offset")
# nova's [cells] *_weight_multiplier defaults (reference section 6).
DEFAULT_MULTIPLIERS = {"ram": 10.0, "mute": -10000.0, "offset": 1.0}


@dataclasses.dataclass
class Decision:
    """Where a request goes, and why; ``log_line()`` says it in one line."""

    cell: str
    tier: str
    weights: dict
    removed: dict
    bursting: bool
    burst_changed: bool
    reason: str
    private_room_percent: float | None = None
    path: str = ""
    request_id: str = ""
    flavor_name: str = ""
    num_instances: int = 1
    candidates: list = dataclasses.field(default_factory=list)

    def log_line(self):
        removed = "; ".join("%s (%s)" % item for item in self.removed.items()) or "none"
        weights = ", ".join("%s=%.3f" % item for item in
                            sorted(self.weights.items(), key=lambda kv: (-kv[1], kv[0])))
        room = ("unknown" if self.private_room_percent is None
                else "%.1f%%" % self.private_room_percent)
        return ("[%s] %d x %s: candidates %s; removed: %s; weights: %s; chose %s (%s): %s; "
                "private room %s; bursting %s%s"
                % (self.request_id or "-", self.num_instances, self.flavor_name,
                   ", ".join(self.candidates) or "none", removed, weights or "none",
                   self.cell, self.tier, self.reason, room,
                   "yes" if self.bursting else "no",
                   " (changed)" if self.burst_changed else ""))


class Scheduler:
    """Chooses a cell for each request; see the package docstring."""

    def __init__(self, filters, weighers, multipliers=None, mute_interval=300.0,
                 low_watermark=20.0, high_watermark=40.0, bursting=False):
        self.policy = policy_mod.BurstPolicy(low_watermark, high_watermark)
        self.filters = plugins.load(plugins.FILTERS, list(filters), "filter",
                                    "[scheduler] filters", filters_mod.BaseCellFilter)
        self.weighers = plugins.load(plugins.WEIGHERS, list(weighers), "weigher",
                                     "[scheduler] weighers", weighers_mod.BaseCellWeigher)
        mult = dict(DEFAULT_MULTIPLIERS)
        mult.update(multipliers or {})
        self.multipliers = mult
        # (weigher, multiplier) once, not per decision; a 0 multiplier is off.
        self._weighing = [(w, float(mult.get(w.multiplier_key, w.default_multiplier)))
                          for w in self.weighers]
        self._weighing = [(w, m) for w, m in self._weighing if m]
        self.mute_interval = float(mute_interval)
        self._bursting = bool(bursting)
        self._lock = threading.Lock()

    @classmethod
    def from_conf(cls, conf, bursting=False):
        """Build from ``[scheduler]`` and ``[cells] mute_child_interval`` of ``conf``."""
        s = conf.scheduler
        return cls(s.filters, s.weighers,
                   multipliers={"ram": s.ram_weight_multiplier,
                                "mute": s.mute_weight_multiplier,
                                "offset": s.offset_weight_multiplier},
                   mute_interval=conf.cells.mute_child_interval,
                   low_watermark=s.low_watermark, high_watermark=s.high_watermark,
                   bursting=bursting)

    @property
    def bursting(self):
        """True while new builds go to public cells (see ``policy.py``)."""
        return self._bursting

    @bursting.setter
    def bursting(self, value):
        with self._lock:
            self._bursting = bool(value)

    def select(self, spec, cells, now):
        """Choose a cell for ``spec`` among ``cells`` at ``now``; return a Decision.

        Raises NoValidCell, carrying ``removed``, when no cell is left.
        """
        sel = request.Selection(spec, now, self.mute_interval)
        survivors = cells
        for flt in self.filters:
            if not survivors:
                break
            survivors = flt.filter_all(survivors, sel)
        if not survivors:
            raise self._no_valid_cell(spec, cells, sel.removed)

        weights = self._weigh(survivors, sel)
        flavor = spec.flavor
        num = spec.num_instances
        room_now, room_after = self.policy.private_room(
            cells, flavor.memory_mb * num, now, self.mute_interval)
        private = []
        public = []
        for pair in zip(weights, survivors, strict=True):
            (private if pair[1].tier == "private" else public).append(pair)
        with self._lock:
            before = self._bursting
            if spec.hints.get("target_cell"):
                cell, reason, after = policy_mod.best(private + public), "target_cell hint", before
            else:
                cell, reason, after = self.policy.choose(private, public, before, room_now,
                                                         room_after, flavor, num)
            self._bursting = after
        if after != before:
            LOG.info("%(what)s bursting: %(reason)s",
                     {"what": "Started" if after else "Stopped", "reason": reason})
        return Decision(cell=cell.name, tier=cell.tier,
                        weights={c.name: w for w, c in zip(weights, survivors, strict=True)},
                        removed=sel.removed, bursting=after, burst_changed=after != before,
                        reason=reason, private_room_percent=room_now, path=cell.path,
                        request_id=spec.request_id, flavor_name=flavor.name, num_instances=num,
                        candidates=[c.name for c in cells])

    def _weigh(self, cells, sel):
        n = len(cells)
        if n < 2:
            return [0.0] * n
        totals = None
        for weigher, mult in self._weighing:
            raw = weigher.weigh_all(cells, sel)
            # weighers.normalize() and the multiplier in one pass.
            lo = min(raw)
            hi = max(raw)
            if hi == lo:
                continue
            scale = mult / (hi - lo)
            if totals is None:
                totals = [(r - lo) * scale for r in raw]
            else:
                totals = [t + (r - lo) * scale for t, r in zip(totals, raw, strict=True)]
        return totals if totals is not None else [0.0] * n

    @staticmethod
    def _no_valid_cell(spec, cells, removed):
        what = "%d x %s" % (spec.num_instances, spec.flavor.name)
        if not cells:
            why = "no cells are known"
        else:
            why = "; ".join("%s: %s" % (c.name, removed[c.name])
                            for c in cells if c.name in removed)
        return exception.NoValidCell("No cell can take %s: %s" % (what, why),
                                     removed=removed, reason=why)
