"""Process wiring of the child agent: threads, signals, drain, sd_notify.

Start order: state (schema checked), backend, neighbours and publishers,
manager, journal replay, then the RPC servers (so replayed work goes before
new messages), then the poller and the reporter. Stop order is the reverse:
stop consuming first, drain in-flight work for up to ``drain_timeout``
seconds (what is left stays in the journal for the next start), then stop
the threads and close the connections.
"""

import logging
import os
import socket
import threading
import time

from cellagent import backends
from cellagent import exception
from cellagent import manager as manager_mod
from cellagent import reconciler as reconciler_mod
from cellagent import reporter as reporter_mod
from cellagent import state
from cellagent import workqueue
from cellagent.conf import database
from cellagent.rpc import consumer as consumer_mod
from cellagent.rpc import endpoint as endpoint_mod
from cellagent.rpc import neighbours as neighbours_mod
from cellagent.rpc import parent_api
from cellagent.rpc import transport as transport_mod

LOG = logging.getLogger(__name__)


def sd_notify(state_line):
    """Send one sd_notify line when run by systemd (NOTIFY_SOCKET set)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(state_line.encode())
        return True
    except OSError as e:
        LOG.warning("sd_notify %(line)s failed: %(err)s", {"line": state_line, "err": e})
        return False


def stop_servers(servers):
    """Stop RPC servers: stop all, then wait for them in parallel (each
    oslo.messaging ``wait`` can take a second or more on its own)."""
    for server in servers:
        server.stop()
    waiters = [threading.Thread(target=server.wait, name="stop-server") for server in servers]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()


def open_store(conf):
    """The state store, with its schema created on first use."""
    url = database.connection_url(conf)
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url[len("sqlite:///"):]) or ".", exist_ok=True)
    store = state.get_store(url, busy_timeout=conf.database.busy_timeout,
                            pool_size=conf.database.max_pool_size)
    if store.schema_version() == 0:
        LOG.info("Empty state database: creating the schema")
        store.sync_schema()
    store.check_schema()
    return store


class AgentService:
    """The ``cellagent`` daemon: one child cell agent."""

    def __init__(self, conf, store=None, backend=None, transports=None):
        self.conf = conf
        self.store = store
        self.backend = backend
        self.transports = transports
        self._stop_requested = threading.Event()
        self._stopped = False
        self.servers = []
        self.reconciler = None

    def start(self):
        conf = self.conf
        cells = conf.cells
        neighbours_mod.check_cell_name(cells.name)
        if self.store is None:
            self.store = open_store(conf)
        if self.backend is None:
            self.backend = backends.load_backend(conf)
        self.backend.start()
        LOG.info("Backend %s started", self.backend.name)
        self.neighbours = neighbours_mod.Neighbours(cells.cells_config)
        if not self.neighbours.parents():
            LOG.warning("No parent cell in cells_config: reports go nowhere")
        if self.transports is None:
            self.transports = transport_mod.Transports(conf)
        self.sender = parent_api.IntercellSender(
            cells.name, self.neighbours, self.transports, cells.rpc_driver_queue_base,
            cells.max_hop_count)
        self.parent_api = parent_api.ParentAPI(self.sender)
        self.flavors = reporter_mod.FlavorCatalog.from_config(cells.flavors)
        self.reporter = reporter_mod.Reporter(
            self.parent_api, self.backend, self.flavors,
            reporter_mod.parse_capabilities(cells.capabilities), cells.reserve_percent,
            cells.report_interval, cells.report_delay)
        self.poller = workqueue.Poller(self.backend, conf.backend.poll_interval)
        self.work = workqueue.WorkQueue(conf.backend.workers, self.poller)
        self.manager = manager_mod.CellManager(
            cells.name, conf.host, self.store, self.backend, self.parent_api, self.work,
            reporter=self.reporter, flavors=self.flavors,
            transition_timeout=conf.backend.transition_timeout,
            retries=conf.backend.operation_retries, retry_delay=conf.backend.retry_delay,
            max_inflight=conf.backend.max_pending_operations)
        self.router = endpoint_mod.Router(self.sender, self.manager, cells.call_timeout,
                                          cells.max_hop_count)
        self.poller.start()
        self.manager.recover()
        url = conf.transport_url
        if consumer_mod.supported(conf, url):
            # RabbitMQ: our own consumer, acknowledging after the journal.
            self.servers = [self._kombu_consumer(url)]
        else:
            self.servers = transport_mod.rpc_servers(
                self.transports.rpc_transport(url), url, cells.rpc_driver_queue_base,
                conf.host, endpoint_mod.IntercellEndpoint(self.router))
        for server in self.servers:
            server.start()
        LOG.info("Cell %(name)s listening on %(url)s (%(base)s.*)",
                 {"name": cells.name, "url": transport_mod.mask_url(url),
                  "base": cells.rpc_driver_queue_base})
        self.reporter.start()
        self.reconciler = reconciler_mod.Reconciler(
            self.manager, conf.backend.reconcile_interval, conf.backend.orphan_grace,
            conf.backend.orphan_action, conf.backend.vanished_action)
        self.reconciler.start()
        sd_notify("READY=1")

    def _kombu_consumer(self, url):
        return consumer_mod.KombuConsumer(
            url, self.conf.cells.rpc_driver_queue_base, self.conf.host, self.router,
            self.manager.intake, **consumer_mod.options(self.conf))

    def request_stop(self, *_args):
        """Signal handler: only sets a flag (huey's rule)."""
        self._stop_requested.set()

    def wait(self):
        while not self._stop_requested.wait(1.0):
            self.neighbours.refresh()

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        sd_notify("STOPPING=1")
        LOG.info("Stopping: no new messages, draining in-flight work")
        stop_servers(self.servers)
        left = self.work.drain(self.conf.cells.drain_timeout)
        if left:
            LOG.warning("%d instances still had work in flight; the journal replays it "
                        "at the next start", left)
        if self.reconciler is not None:
            self.reconciler.stop()
        self.reporter.stop()
        self.poller.stop()
        self.transports.close()
        try:
            self.backend.stop()
        except exception.BackendError as e:
            LOG.warning("Backend did not stop cleanly: %s", e.message)
        self.store.close()
        LOG.info("Stopped")


def open_top_store(conf):
    """The top's state store, with its schema created on first use."""
    url = database.connection_url(conf)
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url[len("sqlite:///"):]) or ".", exist_ok=True)
    store = state.get_top_store(url, busy_timeout=conf.database.busy_timeout,
                                pool_size=conf.database.max_pool_size)
    if store.schema_version() == 0:
        LOG.info("Empty state database: creating the top schema")
        store.sync_schema()
    store.check_schema()
    return store


def build_scheduler(conf):
    """The burst scheduler and its backoff tracker from ``[scheduler]``."""
    from cellagent import scheduler
    sc = conf.scheduler
    sched = scheduler.Scheduler(
        sc.filters, sc.weighers,
        multipliers={"ram": sc.ram_weight_multiplier, "mute": sc.mute_weight_multiplier,
                     "offset": sc.offset_weight_multiplier},
        mute_interval=conf.cells.mute_child_interval,
        low_watermark=sc.low_watermark, high_watermark=sc.high_watermark)
    return sched, scheduler.Backoff(initial=sc.backoff_initial, maximum=sc.backoff_max)


class TopService:
    """The ``cellagent-top`` daemon: the parent cell.

    Start order: state, cell records, scheduler, manager, the inter-cell RPC
    servers and the client API server, then ``announce_*`` to every child and
    the housekeeping thread (re-sends, cell record reloads, purges).
    """

    def __init__(self, conf, store=None, transports=None):
        self.conf = conf
        self.store = store
        self.transports = transports
        self._stop_requested = threading.Event()
        self._stopped = False
        self._thread = None
        self.servers = []

    def start(self):
        from cellagent import top as top_mod
        conf = self.conf
        cells = conf.cells
        neighbours_mod.check_cell_name(cells.name)
        if self.store is None:
            self.store = open_top_store(conf)
        if self.transports is None:
            self.transports = transport_mod.Transports(conf)
        self.neighbours = neighbours_mod.Neighbours()
        self.sender = parent_api.IntercellSender(
            cells.name, self.neighbours, self.transports, cells.rpc_driver_queue_base,
            cells.max_hop_count)
        scheduler, backoff = build_scheduler(conf)
        self.manager = top_mod.TopManager(
            cells.name, self.store, scheduler, self.sender, self.neighbours,
            reporter_mod.FlavorCatalog.from_config(cells.flavors).all(),
            cells_json=cells.cells_config, build_ack_timeout=conf.top.build_ack_timeout,
            build_retries=conf.top.build_retries, max_reschedules=conf.top.max_reschedules,
            mute_interval=cells.mute_child_interval, backoff=backoff)
        self.router = endpoint_mod.Router(self.sender, self.manager, cells.call_timeout,
                                          cells.max_hop_count)
        self.manager.router = self.router
        url = conf.transport_url
        transport = self.transports.rpc_transport(url)
        self.servers = transport_mod.rpc_servers(
            transport, url, cells.rpc_driver_queue_base, conf.host,
            endpoint_mod.IntercellEndpoint(self.router))
        self.servers.append(transport_mod.api_server(
            transport, url, conf.top.topic, conf.host, top_mod.TopAPI(self.manager)))
        # One worker per inter-cell topic: a child's updates of one instance
        # (powering-on, then active) must be applied in the order they were
        # sent, which a pool of workers would not keep. The client API
        # server keeps its pool: its calls are independent.
        for server in self.servers[:-1]:
            server.start(override_pool_size=1)
        self.servers[-1].start()
        LOG.info("Top cell %(name)s listening on %(url)s (%(base)s.*, client topic %(topic)s)",
                 {"name": cells.name, "url": transport_mod.mask_url(url),
                  "base": cells.rpc_driver_queue_base, "topic": conf.top.topic})
        self.manager.announce()
        self._thread = threading.Thread(target=self._loop, name="top-periodic", daemon=True)
        self._thread.start()
        sd_notify("READY=1")

    def _loop(self):
        interval = self.conf.top.periodic_interval
        last_purge = 0.0
        while not self._stop_requested.wait(interval):
            try:
                self.manager.tick()
                now = time.monotonic()
                if now - last_purge > 60:
                    last_purge = now
                    self.manager.purge(self.conf.top.purge_deleted_after)
            except Exception:  # noqa: B902 - housekeeping must go on
                LOG.exception("Top housekeeping failed; retrying next tick")

    def request_stop(self, *_args):
        self._stop_requested.set()

    def wait(self):
        self._stop_requested.wait()

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        self._stop_requested.set()
        sd_notify("STOPPING=1")
        stop_servers(self.servers)
        if self._thread is not None:
            self._thread.join(10)
        self.transports.close()
        self.store.close()
        LOG.info("Stopped")
