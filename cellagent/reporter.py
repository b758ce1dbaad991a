"""Capability and capacity reports from a child to its parents.

Sent at start, on ``announce_*``, every ``report_interval`` (with jitter, so
a fleet of agents does not report in lock-step) and within ``report_delay``
of a change, coalesced: a burst of a hundred builds makes one report, not a
hundred (issue 3). The loop follows neutron's ``_report_state`` and IPA's
heartbeater: a stop event, failures logged once, recovery logged once.

Capacities are in the exact cells v1 shape (section 4.1), computed as
``CellStateManager._update_our_capacity`` does for one host: the backend
gives raw totals and free room, this module applies ``reserve_percent`` and
counts units for every flavor memory size and disk size, as strings. A
backend may cap units per flavor (quota, budget); the cap is applied per
slot. No version key is added: a stock parent merges every key it gets.
"""

import logging
import random
import threading
import time

from cellagent import exception
from cellagent.objects import Flavor

LOG = logging.getLogger(__name__)


class FlavorCatalog:
    """The flavors this cell counts capacity for, thread-safe."""

    def __init__(self, flavors=()):
        self._lock = threading.Lock()
        self._flavors = {f.name: f for f in flavors}

    @classmethod
    def from_config(cls, entries):
        try:
            return cls(Flavor.parse(e) for e in entries)
        except ValueError as e:
            raise exception.ConfigurationError(reason="[cells] flavors: %s" % e)

    def learn(self, flavor):
        """Add a flavor seen in a build; True if it was new or changed."""
        with self._lock:
            old = self._flavors.get(flavor.name)
            if old == flavor:
                return False
            self._flavors[flavor.name] = flavor
        LOG.info("Counting capacity for flavor %(name)s (%(mb)d MB) from now on",
                 {"name": flavor.name, "mb": flavor.memory_mb})
        return True

    def all(self):
        with self._lock:
            return list(self._flavors.values())


def _units(free, total, reserve_percent, slot):
    if slot <= 0:
        return 0
    return int(max(0, free - total * reserve_percent / 100.0) / slot)


def capacities_payload(capacity, flavors, reserve_percent):
    """The cells v1 ``capacities`` dict for one backend."""
    def slots(size_of, free, total):
        out = {}
        for size in sorted({size_of(f) for f in flavors}):
            units = _units(free, total, reserve_percent, size)
            caps = [capacity.max_units[f.name] for f in flavors
                    if size_of(f) == size and f.name in capacity.max_units]
            if caps and len(caps) == len([f for f in flavors if size_of(f) == size]):
                units = min(units, max(caps))
            out[str(size)] = max(0, int(units))
        return out

    return {
        "ram_free": {"total_mb": max(0, int(capacity.ram_free_mb)),
                     "units_by_mb": slots(lambda f: f.memory_mb, capacity.ram_free_mb,
                                          capacity.ram_total_mb)},
        "disk_free": {"total_mb": max(0, int(capacity.disk_free_mb)),
                      "units_by_mb": slots(lambda f: f.disk_mb, capacity.disk_free_mb,
                                           capacity.disk_total_mb)},
    }


def parse_capabilities(entries):
    """``key=v1;v2`` entries into ``{key: set(values)}``."""
    caps = {}
    for entry in entries:
        key, sep, values = entry.partition("=")
        if not sep or not key.strip():
            raise exception.ConfigurationError(
                reason="[cells] capabilities entry %r is not key=v1;v2" % entry)
        caps.setdefault(key.strip(), set()).update(
            v.strip() for v in values.split(";") if v.strip())
    return caps


class Reporter:
    def __init__(self, parent_api, backend, flavors, capabilities, reserve_percent,
                 interval, delay=1.0, jitter=0.1):
        self._parent = parent_api
        self._backend = backend
        self._flavors = flavors
        self._capabilities = capabilities
        self._reserve = reserve_percent
        self._interval = interval
        self._delay = delay
        self._jitter = jitter
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._failing = False
        self._send_lock = threading.Lock()
        self.sent = {"capabilities": 0, "capacities": 0}
        self.last_capacities = None
        self._thread = threading.Thread(target=self._loop, name="reporter", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._dirty.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def changed(self):
        """Something that moves capacity happened: report within ``delay``."""
        self._dirty.set()

    def capacities(self):
        return capacities_payload(self._backend.get_capacity(self._flavors.all()),
                                  self._flavors.all(), self._reserve)

    def report_capabilities(self):
        with self._send_lock:
            self.sent["capabilities"] += 1
            return self._parent.update_capabilities(self._capabilities)

    def report_capacities(self):
        try:
            payload = self.capacities()
        except exception.BackendError as e:
            if not self._failing:
                LOG.warning("Cannot read capacity from the backend, reports paused: %s",
                            e.message)
                self._failing = True
            return []
        if self._failing:
            LOG.info("Capacity reports resumed")
            self._failing = False
        with self._send_lock:
            self.sent["capacities"] += 1
            self.last_capacities = payload
            return self._parent.update_capacities(payload)

    def _next_period(self):
        return self._interval * (1 + random.uniform(-self._jitter, self._jitter))

    def _loop(self):
        self.report_capabilities()
        self.report_capacities()
        due = time.monotonic() + self._next_period()
        while not self._stop.is_set():
            self._dirty.wait(max(0.0, due - time.monotonic()))
            if self._stop.is_set():
                return
            if self._dirty.is_set():
                # Coalesce: gather every change of the next ``delay`` seconds.
                if self._stop.wait(self._delay):
                    return
                self._dirty.clear()
                self.report_capacities()
            if time.monotonic() >= due:
                self.report_capabilities()
                self.report_capacities()
                due = time.monotonic() + self._next_period()
