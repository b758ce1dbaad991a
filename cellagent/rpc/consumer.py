"""KombuConsumer: a RabbitMQ cell's inter-cell topics, acknowledged after the journal.

oslo.messaging's RPC servers acknowledge a cast before the endpoint sees it
and hand each message to an executor thread on its own, so every message
paid a thread hand-off and its own journal transactions, and a crash between
the acknowledgement and the journal write lost it. On a ``rabbit://``
transport the agent consumes its three topics with kombu instead:

* **The same declarations** as oslo.messaging's RabbitMQ driver for
  ``Target(topic=<base>.<type>, server=<host>)`` (``amqpdriver.listen``,
  ``impl_rabbit.declare_topic_consumer`` and ``declare_fanout_consumer``):
  the topic exchange ``control_exchange`` with the queues ``<topic>`` and
  ``<topic>.<host>``, the fanout exchange ``<topic>_fanout`` with one queue
  ``<topic>_fanout_<uuid hex>`` per process (x-expires
  ``rabbit_transient_queues_ttl``), the same durable/auto-delete flags and
  the same prefetch. A stock parent cannot tell the difference.
* **Bursts, acknowledged after the journal.** Whatever the broker already
  delivered (up to ``max_batch`` messages, and half the prefetch count) is
  handled on the consumer's thread inside one ``intake`` (one store
  transaction for the journal entries, claims and records of the whole
  burst), and acknowledged once that transaction is committed. A crash before the commit leaves the
  burst unacknowledged: the broker delivers it again, and the journal drops
  whatever was already stored.
* **Nothing slow on the consumer's thread.** A message whose handling may
  wait (a call, a method answered from the backend; see ``Router.quick``)
  goes to a thread pool and is acknowledged when it is done.
* **Malformed bodies** (not JSON, not an oslo.messaging cast of
  ``process_message`` 1.0, not a cells message) are logged once each and
  acknowledged: redelivering them would not make them readable.
* **Connection errors**: reconnect with backoff; the broker redelivers what
  was not acknowledged.

Only the options below are reproduced; with any other oslo.messaging
RabbitMQ option that changes declarations or the connection (quorum or
stream queues, the queue manager, TLS...) the agent keeps oslo.messaging's
RPC servers (``supported``).
"""

import concurrent.futures
import logging
import socket
import threading
import time
import uuid as uuidlib

import kombu
from kombu import compression
from oslo_config import cfg

from cellagent import exception
from cellagent import jsonutils
from cellagent.rpc import intercell
from cellagent.rpc import transport as transport_mod

LOG = logging.getLogger(__name__)

# oslo.messaging RabbitMQ options (truthy) this consumer does not reproduce.
UNSUPPORTED_OPTIONS = ("rabbit_quorum_queue", "rabbit_transient_quorum_queue",
                       "rabbit_stream_fanout", "use_queue_manager",
                       "enable_cancel_on_failover", "ssl")


def supported(conf, url):
    """True if ``url`` is RabbitMQ and its options are ones this consumer declares alike."""
    if transport_mod.scheme_of(url) != "rabbit":
        return False
    rabbit = conf.oslo_messaging_rabbit
    if rabbit.rabbit_login_method != "AMQPLAIN":
        return False
    return not any(getattr(rabbit, name, False) for name in UNSUPPORTED_OPTIONS)


def options(conf):
    """KombuConsumer keyword arguments from oslo.messaging's options in ``conf``."""
    rabbit = conf.oslo_messaging_rabbit
    try:
        pool_size = conf.executor_thread_pool_size
    except cfg.NoSuchOptError:
        pool_size = 64      # oslo.messaging's default, registered with its servers
    return {"exchange": conf.control_exchange, "durable": rabbit.amqp_durable_queues,
            "auto_delete": rabbit.amqp_auto_delete, "ha_queues": rabbit.rabbit_ha_queues,
            "transient_ttl": rabbit.rabbit_transient_queues_ttl,
            "prefetch": rabbit.rabbit_qos_prefetch_count,
            "heartbeat": rabbit.heartbeat_timeout_threshold, "pool_size": pool_size}


def queue_arguments(ha_queues=False, ttl=0):
    """``impl_rabbit._get_queue_arguments`` for the options reproduced here."""
    args = {}
    if ha_queues:
        args["x-ha-policy"] = "all"
    if ttl > 0:
        args["x-expires"] = ttl * 1000
    return args


def declarations(base, host, exchange="nova", durable=False, auto_delete=False,
                 ha_queues=False, transient_ttl=1800, fanout_id=None):
    """The kombu Queues (with their exchanges and bindings) oslo.messaging declares."""
    fanout_id = fanout_id or uuidlib.uuid4().hex
    topic_exchange = kombu.Exchange(exchange, type="topic", durable=durable,
                                    auto_delete=auto_delete)
    queues = []
    for mtype in intercell.MESSAGE_TYPES:
        topic = transport_mod.topic_for(base, mtype)
        for name in (topic, "%s.%s" % (topic, host)):
            queues.append(kombu.Queue(name, topic_exchange, routing_key=name, durable=durable,
                                      auto_delete=auto_delete,
                                      queue_arguments=queue_arguments(ha_queues)))
        fanout = kombu.Exchange("%s_fanout" % topic, type="fanout", durable=False,
                                auto_delete=True)
        queues.append(kombu.Queue("%s_fanout_%s" % (topic, fanout_id), fanout,
                                  routing_key=topic, durable=False, auto_delete=False,
                                  queue_arguments=queue_arguments(ha_queues, transient_ttl)))
    return queues


def cells_message(body, headers=None):
    """The cells message JSON carried by one AMQP body; MalformedMessage if none."""
    if headers and headers.get("compression"):
        try:
            body = compression.decompress(body, headers["compression"])
        except Exception as e:  # noqa: B902 - any codec failure is a bad body
            raise exception.MalformedMessage(reason="cannot decompress: %s" % e)
    try:
        envelope = jsonutils.loads(body)
        rpc = envelope
        if isinstance(envelope, dict) and "oslo.message" in envelope:
            rpc = jsonutils.loads(envelope["oslo.message"])
        version = rpc.get("version", intercell.RPC_VERSION)
        if rpc.get("method") != intercell.RPC_METHOD:
            raise exception.MalformedMessage(reason="method is %r" % (rpc.get("method"),))
        if version != intercell.RPC_VERSION:
            raise exception.MalformedMessage(reason="RPC version %r" % (version,))
        return rpc["args"]["message"]
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
        raise exception.MalformedMessage(reason="bad envelope: %s" % type(e).__name__)


class KombuConsumer:
    """Consumes the three inter-cell topics of one RabbitMQ cell (see module docstring).

    :param router: the ``Router`` (``decode``, ``quick``, ``route``).
    :param intake: a callable returning the context that groups the
        handling of one burst (``CellManager.intake``).
    """

    def __init__(self, url, base, host, router, intake, exchange="nova", durable=False,
                 auto_delete=False, ha_queues=False, transient_ttl=1800, prefetch=100,
                 heartbeat=60, max_batch=256, pool_size=64, connect_timeout=5.0):
        self._url = url
        self._safe_url = transport_mod.mask_url(url)
        self._router = router
        self._intake = intake
        self._queues = declarations(base, host, exchange, durable, auto_delete, ha_queues,
                                    transient_ttl)
        self._prefetch = prefetch
        self._heartbeat = heartbeat
        # A burst is at most half the prefetch window: while it is handled
        # the broker still has the other half on its way, and acknowledging
        # the burst lets it send the next (a full window each time left the
        # consumer waiting for deliveries after every burst).
        self._max_batch = max(1, min(max_batch, (prefetch // 2) or max_batch))
        self._connect_timeout = connect_timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=pool_size, thread_name_prefix="intercell")
        self._stop = threading.Event()
        self._conn = None
        self._channel = None
        self._reader = None
        self._generation = 0
        self._burst = []
        self._handed = set()           # delivery tags out in the pool
        self._acks = []                # (generation, tag) done in the pool
        self._acks_lock = threading.Lock()
        self._failing = False
        self.received = 0
        self.bursts = 0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="consumer-%s" % self._safe_url)

    def start(self):
        self._thread.start()

    def stop(self):
        """Stop taking messages (those not acknowledged go back to the broker)."""
        self._stop.set()

    def wait(self, timeout=60.0):
        """Wait for the consumer thread (and the calls it handed out) to end."""
        self._thread.join(timeout)

    # -- consumer thread ------------------------------------------------------

    def _run(self):
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._connect()
                if self._failing:
                    LOG.info("Consuming from %s again", self._safe_url)
                    self._failing = False
                backoff = 0.5
                self._consume()
            except Exception as e:  # noqa: B902 - any failure: reconnect, redeliver
                if not self._failing:
                    LOG.warning("Consuming from %(url)s failed (%(err)s: %(msg)s); "
                                "reconnecting", {"url": self._safe_url,
                                                 "err": type(e).__name__, "msg": e})
                    self._failing = True
                self._drop_connection()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        # Calls still running are answered and acknowledged before closing.
        self._pool.shutdown(wait=True)
        try:
            if self._conn is not None:
                self._send_acks()
        except Exception:  # noqa: B902 - unacknowledged: redelivered, then dropped
            LOG.debug("Could not acknowledge the last calls on %s", self._safe_url)
        self._drop_connection()

    def _connect(self):
        if self._conn is not None:
            return
        conn = kombu.Connection(transport_mod.kombu_urls(self._url),
                                connect_timeout=self._connect_timeout,
                                heartbeat=self._heartbeat)
        conn.connect()
        reader = transport_mod.read_ahead(conn)
        channel = conn.channel()
        if self._prefetch > 0:
            channel.basic_qos(0, self._prefetch, False)
        for queue in self._queues:
            queue(channel).declare()
        self._conn, self._channel, self._reader = conn, channel, reader
        self._generation += 1
        self._handed = set()
        for index, queue in enumerate(self._queues):
            channel.basic_consume(queue=queue.name, consumer_tag="cellagent-%d" % index,
                                  callback=self._on_message)
        LOG.info("Consuming %(n)d queues on %(url)s", {"n": len(self._queues),
                                                      "url": self._safe_url})

    def _drop_connection(self):
        conn, self._conn, self._channel, self._reader = self._conn, None, None, None
        self._burst = []
        if conn is not None:
            try:
                conn.release()
            except Exception:  # noqa: B902 - already broken
                LOG.debug("Error closing connection to %s", self._safe_url)

    def _on_message(self, message):
        self._burst.append(message)

    def _consume(self):
        conn = self._conn
        last_beat = time.monotonic()
        reader = self._reader
        while not self._stop.is_set():
            self._send_acks()
            if reader is not None:
                self._read_burst(reader)
            else:
                try:
                    conn.drain_events(timeout=0.2)
                except socket.timeout:
                    pass
                # Take what the broker already sent, up to one burst.
                while self._burst and len(self._burst) < self._max_batch:
                    try:
                        conn.drain_events(timeout=0)
                    except socket.timeout:
                        break
            if self._burst:
                burst, self._burst = self._burst, []
                self._handle(burst)
            now = time.monotonic()
            if self._heartbeat and now - last_beat >= 1.0:
                conn.heartbeat_check()
                last_beat = now

    def _read_burst(self, reader):
        """Wait up to 0.2 s for deliveries, then take what the broker already
        sent, up to one burst, without waiting inside it."""
        if not reader.frame_ready():
            reader.fill(0.2)
        while len(self._burst) < self._max_batch:
            # Only whole frames: the socket is blocking, and a frame cut
            # short by the network must not hold the thread (heartbeats,
            # acknowledgements, stop) until the rest arrives.
            while not reader.frame_ready():
                if not reader.fill(0):
                    return
            reader.next_frame()

    def _handle(self, burst):
        self.received += len(burst)
        self.bursts += 1
        channel = self._channel
        inline = []
        dropped = []
        quick = []
        handed = []
        # Decoded before the batch: its transaction holds the write lock.
        for message in burst:
            msg = self._decode(message)
            if msg is None:
                dropped.append(message)
            elif self._router.quick(msg):
                quick.append((message, msg))
            else:
                handed.append((message, msg))
        try:
            with self._intake() as intake:
                for message, msg in quick:
                    inline.append(message)
                    if intake.failed is None:
                        self._router.route(msg)
                        intake.checkpoint()
        except exception.StateError as e:
            LOG.error("Could not journal %(n)d received messages (%(err)s); they go back "
                      "to the broker", {"n": len(inline), "err": e.message})
            for message in inline:
                channel.basic_reject(message.delivery_tag, requeue=True)
            inline = []
            self._stop.wait(1.0)
        inline += dropped
        for message, msg in handed:
            self._handed.add(message.delivery_tag)
            self._pool.submit(self._route_in_pool, self._generation,
                              message.delivery_tag, msg)
        if inline:
            last = max(m.delivery_tag for m in inline)
            if not self._handed or min(self._handed) > last:
                # Nothing older is still out in the pool: one frame for all.
                channel.basic_ack(last, multiple=True)
            else:
                for message in inline:
                    channel.basic_ack(message.delivery_tag)

    def _decode(self, message):
        try:
            text = cells_message(message.body, message.headers)
        except exception.MessageError as e:
            self._router.dropped += 1
            LOG.warning("Dropped an undecodable message from %(queue)s: %(err)s",
                        {"queue": message.delivery_info.get("routing_key"),
                         "err": e.message})
            return None
        return self._router.decode(text)

    def _route_in_pool(self, generation, tag, msg):
        try:
            self._router.route(msg)
        finally:
            with self._acks_lock:
                self._acks.append((generation, tag))

    def _send_acks(self):
        if not self._acks:
            return
        with self._acks_lock:
            acks, self._acks = self._acks, []
        for generation, tag in acks:
            if generation != self._generation:
                continue            # its channel is gone: the broker redelivered it
            self._handed.discard(tag)
            self._channel.basic_ack(tag)
