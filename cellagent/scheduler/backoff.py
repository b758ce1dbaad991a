"""Per-cell exponential backoff after failed builds.

When a build sent to a cell fails, or is never acknowledged, the top calls
``failed(name, now)`` and stores the returned end of the backoff in the
cell's report row (``CellReport.backoff_until``, ``failures``); the
``backoff`` filter keeps builds away from the cell until then. The first
failure backs off for ``initial`` seconds (5 minutes), each further
consecutive failure doubles it, up to ``maximum`` (30 minutes), as the
Kubernetes cluster-autoscaler does for node groups that failed to scale
up. The first success (an acknowledged build) resets the cell.

The object holds no clock and no store: ``load`` puts back what the top
persisted, so a restart keeps both the end and the doubling.
"""

import threading

from cellagent import exception


class Backoff:
    """Consecutive failures and backoff end per cell name; thread-safe."""

    def __init__(self, initial=300.0, maximum=1800.0):
        if not initial > 0 or maximum < initial:
            raise exception.ConfigurationError(
                reason="backoff needs 0 < initial (%s) <= maximum (%s)" % (initial, maximum))
        self.initial = float(initial)
        self.maximum = float(maximum)
        self._lock = threading.Lock()
        self._state = {}            # name -> (until, failures)

    @classmethod
    def from_conf(cls, conf):
        """Build from ``[scheduler] backoff_initial`` and ``backoff_max`` of ``conf``."""
        return cls(conf.scheduler.backoff_initial, conf.scheduler.backoff_max)

    def delay(self, failures):
        """Seconds of backoff after ``failures`` consecutive failures (0 for none)."""
        if failures < 1:
            return 0.0
        # Capping the exponent keeps the float finite for any count.
        return min(self.maximum, self.initial * 2.0 ** min(failures - 1, 64))

    def failed(self, name, now):
        """Count one more failure of ``name`` at ``now``; return the new end (epoch)."""
        with self._lock:
            failures = self._state.get(name, (None, 0))[1] + 1
            until = now + self.delay(failures)
            self._state[name] = (until, failures)
            return until

    def succeeded(self, name):
        """Forget the failures of ``name``: the next failure starts at ``initial``."""
        with self._lock:
            self._state.pop(name, None)

    def until(self, name):
        """End of the current or last backoff of ``name`` (epoch), None if none."""
        with self._lock:
            return self._state.get(name, (None, 0))[0]

    def failures(self, name):
        """Consecutive failures of ``name`` since its last success."""
        with self._lock:
            return self._state.get(name, (None, 0))[1]

    def load(self, name, until, failures):
        """Restore persisted state (``until`` None and ``failures`` 0 = clean)."""
        with self._lock:
            if not failures and until is None:
                self._state.pop(name, None)
            else:
                self._state[name] = (until, int(failures or 0))
