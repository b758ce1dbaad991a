"""Per-instance ordered work on a thread pool, and the batched state poller.

Operations on one instance run one at a time, in the order received (a
delete never overtakes the build it follows); operations on different
instances run in parallel on ``workers`` threads. An operation that has to
wait for the provider (an instance in PENDING, REBOOTING...) returns a
:class:`Transition`; the instance then stays busy without holding a thread,
and the :class:`Poller` asks the backend about *all* waiting instances in one
batched ``poll()`` call per tick, never one call per instance. An operation
that has to wait for its own journal write returns a :class:`Later`: the
instance stays busy, the thread goes back to the pool, and the operation
goes on on a worker once the write is committed.
"""

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time

from cellagent import exception

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Transition:
    """Wait until the instance leaves a transitional state, then call ``then``.

    ``then(info)`` is called with the backend's InstanceInfo once its state is
    no longer transitional (or is in ``targets``), with ``TIMED_OUT`` after
    ``timeout`` seconds, or with ``CANCELLED`` when a later operation (a
    delete) pre-empts the wait. It may return another Transition.
    """

    ref: object
    then: object
    targets: frozenset = frozenset()
    timeout: float = 600.0
    started: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class Later:
    """Go on with ``then(future)`` once ``future`` is done, without a thread.

    ``future`` is a ``concurrent.futures.Future`` completed by someone else
    (the store's group-commit writer). Until it is done the instance stays
    busy (later operations on it wait) but holds no worker thread: with the
    journal on SQLite a worker that waited for its write sat idle for most
    of a build (issue 3 benchmark). ``then`` runs on a worker and may return
    another Later or a Transition.

    With ``inline``, ``then`` runs on the thread that completes the future
    (the store's writer, after its commit), saving a hand-over to a worker
    and its wake-up. Only for a ``then`` that is short and never waits for
    the store (the writer would wait for itself) or for anything slow.
    """

    future: object
    then: object
    inline: bool = False


TIMED_OUT = object()
CANCELLED = object()


class WorkQueue:
    def __init__(self, workers, poller=None):
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="backend")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queues = {}          # instance uuid -> deque of callables
        self.poller = poller
        self._closed = False

    def submit(self, key, fn, preempt=False):
        """Run ``fn()`` after the work already queued for ``key``.

        With ``preempt``, a Transition the instance is waiting on is cancelled
        first (its continuation sees CANCELLED), so a delete does not wait for
        a build that may never finish.
        """
        with self._lock:
            if self._closed:
                raise exception.CellAgentError("work queue is stopping")
            q = self._queues.get(key)
            if q is not None:
                q.append(fn)
                waiting = True
            else:
                self._queues[key] = collections.deque()
                waiting = False
        if not waiting:
            self._pool.submit(self._run, key, fn)
        elif preempt and self.poller is not None:
            self.poller.cancel(key)

    def is_busy(self, key):
        """True while work for ``key`` is queued, running or waiting on the provider."""
        with self._lock:
            return key in self._queues

    def busy(self):
        with self._lock:
            return len(self._queues)

    def _run(self, key, fn):
        try:
            result = fn()
        except Exception:  # noqa: B902 - one operation's bug must not stall the queue
            LOG.exception("[instance: %s] operation failed unexpectedly", key)
            result = None
        if isinstance(result, Transition) and self.poller is not None:
            self.poller.watch(key, result, self._resume)
            return
        if isinstance(result, Later):
            result.future.add_done_callback(
                lambda fut, later=result: self._continue(key, later, fut))
            return
        self._next(key)

    def _resume(self, key, transition, info):
        self._pool.submit(self._run, key, lambda: transition.then(info))

    def _continue(self, key, later, fut):
        # On the thread that completed the future: hand over, never block.
        if later.inline:
            self._run(key, lambda: later.then(fut))
            return
        try:
            self._pool.submit(self._run, key, lambda: later.then(fut))
        except RuntimeError:
            # The pool is shut down (drain timed out): finish here.
            self._run(key, lambda: later.then(fut))

    def _next(self, key):
        with self._lock:
            q = self._queues.get(key)
            if q:
                fn = q.popleft()
            else:
                self._queues.pop(key, None)
                self._idle.notify_all()
                return
        self._pool.submit(self._run, key, fn)

    def drain(self, timeout):
        """Stop taking work; wait up to ``timeout`` s for what is running."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
            while self._queues and time.monotonic() < deadline:
                self._idle.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            left = len(self._queues)
        self._pool.shutdown(wait=left == 0, cancel_futures=True)
        return left


class Poller:
    """One thread, one batched backend ``poll()`` per tick for every waiter."""

    def __init__(self, backend, interval):
        self._backend = backend
        self._interval = interval
        self._lock = threading.Lock()
        self._watched = {}         # key -> (Transition, callback)
        self._stop = threading.Event()
        self._failing = False
        self.ticks = 0
        self._thread = threading.Thread(target=self._loop, name="poller", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def watch(self, key, transition, callback):
        with self._lock:
            self._watched[key] = (transition, callback)

    def cancel(self, key):
        with self._lock:
            item = self._watched.pop(key, None)
        if item is not None:
            transition, callback = item
            callback(key, transition, CANCELLED)

    def waiting(self):
        with self._lock:
            return len(self._watched)

    def _loop(self):
        while not self._stop.wait(self._interval):
            self.poll_once()

    def poll_once(self, items=None):
        if items is None:
            with self._lock:
                items = list(self._watched.items())
        if not items:
            return
        self.ticks += 1
        try:
            infos = self._backend.poll([t.ref for _, (t, _) in items])
            if self._failing:
                LOG.info("Polling the backend recovered")
                self._failing = False
        except exception.BackendError as e:
            if not self._failing:
                LOG.warning("Polling the backend failed, will retry: %s", e.message)
                self._failing = True
            infos = {}
        now = time.monotonic()
        for key, (transition, callback) in items:
            info = infos.get(transition.ref.instance_uuid)
            if info is not None and (info.state in transition.targets
                                     or not info.state.is_transitional):
                result = info
            elif now - transition.started > transition.timeout:
                result = TIMED_OUT
            else:
                continue
            with self._lock:
                if self._watched.get(key, (None,))[0] is not transition:
                    continue
                del self._watched[key]
            callback(key, transition, result)
