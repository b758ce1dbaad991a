"""Transports: listening on our own broker, publishing on the neighbours'.

Listening uses oslo.messaging RPC servers (threading executor), so the
exchanges and queues are declared exactly as a stock ``nova-cells`` declares
them (section 1.2 of the protocol reference).

Publishing to a RabbitMQ neighbour goes through :class:`KombuPublisher`: the
same oslo.messaging 2.0 envelope and the same exchanges, but publisher
confirms are pipelined (many messages in flight, acknowledged in batches)
instead of one round trip per cast, which is what bounds oslo.messaging's own
cast rate (issue 3). Each publish returns a Future that resolves when the
broker confirmed the message, so callers can finish their journal entries
only once their reports are safely on the parent's broker.

In-memory transports (``fake://``, ``kombu+memory://``, for the embedded demo
and unit tests) go through oslo.messaging's own client. Their namespace is
process-wide, so each cell gets its own exchange there, derived from the URL's
virtual host; on RabbitMQ the exchange is always ``control_exchange``.
"""

import collections
import concurrent.futures
import errno
import logging
import select
import socket
import struct
import threading
import time
import urllib.parse

import amqp
import kombu
from amqp import serialization as amqp_serialization
from amqp import spec as amqp_spec

from cellagent import jsonutils
from cellagent.rpc import intercell

LOG = logging.getLogger(__name__)

IN_MEMORY_SCHEMES = ("fake", "kombu+memory")
MESSAGE_TYPES = intercell.MESSAGE_TYPES


def mask_url(url):
    """The URL with every password replaced, for logs and errors."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    hosts = []
    for hostpart in parts.netloc.split(","):
        if "@" in hostpart:
            cred, host = hostpart.rsplit("@", 1)
            user = cred.split(":", 1)[0]
            hostpart = "%s:***@%s" % (user, host) if ":" in cred else "%s@%s" % (user, host)
        hosts.append(hostpart)
    return urllib.parse.urlunsplit((parts.scheme, ",".join(hosts), parts.path, "", ""))


def scheme_of(url):
    return url.split(":", 1)[0].lower()


def is_in_memory(url):
    return scheme_of(url) in IN_MEMORY_SCHEMES


def exchange_for(url):
    """Exchange for a cell's transport: None (control_exchange) on a real broker."""
    if not is_in_memory(url):
        return None
    vhost = urllib.parse.urlsplit(url).path.strip("/") or "default"
    return "cells-" + vhost


def kombu_urls(url):
    """kombu failover URL list for an oslo.messaging ``rabbit://`` URL."""
    parts = urllib.parse.urlsplit(url)
    vhost = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = vhost or "/"
    urls = []
    for hostpart in parts.netloc.split(","):
        cred, _, host = hostpart.rpartition("@")
        if ":" not in host.strip("[]").split("]")[-1]:
            host += ":5672"
        netloc = "%s@%s" % (cred, host) if cred else host
        urls.append("amqp://%s/%s" % (netloc, urllib.parse.quote(vhost, safe="")))
    return ";".join(urls)


_READ_AHEAD = 32768


def read_ahead(connection, size=_READ_AHEAD):
    """Make a py-amqp TCP transport read up to ``size`` bytes per ``recv``.

    py-amqp's ``TCPTransport._read`` asks the socket for exactly the bytes
    of the frame part it parses: a header, a payload, a frame-end octet,
    three frames a message, so about six ``recv`` calls per message. Each
    lets go of the GIL and then waits to take it back from whichever
    thread took it; on the consumer's thread, which every message goes
    through, that wait was a fifth of its time in the issue 3 benchmark.
    This reads what the broker already sent, ``size`` bytes at most, into
    the same ``_read_buffer`` (so ``read_frame`` still puts back a frame cut
    by a timeout) and serves the next parts from it.

    Whoever waits for the socket to become readable must look at the buffer
    first: the returned ``FrameReader`` does both. ``connection`` is a
    connected ``kombu.Connection``; a transport that is not py-amqp's plain
    TCP one is left alone (None is returned).
    """
    transport = connection.connection.transport
    if not isinstance(transport, amqp.transport.TCPTransport):
        return None
    recv = transport.sock.recv
    errnos = (errno.EAGAIN, errno.EINTR)

    def _read(n, initial=False):
        rbuf = transport._read_buffer
        try:
            while len(rbuf) < n:
                try:
                    s = recv(max(size, n - len(rbuf)))
                except OSError as exc:
                    if exc.errno in errnos:
                        if initial and transport.raise_on_initial_eintr:
                            raise socket.timeout()
                        continue
                    raise
                if not s:
                    raise OSError("Server unexpectedly closed connection")
                rbuf += s
        except BaseException:
            transport._read_buffer = rbuf
            raise
        transport._read_buffer = rbuf[n:]
        return rbuf[:n]

    transport._read = _read
    return FrameReader(connection.connection, size)


class FrameReader:
    """Reads one AMQP connection frame by frame, never blocking inside a frame.

    ``Connection.drain_events(timeout)`` sets the socket's timeout before
    each frame and puts it back after: two system calls a frame that let
    go of the GIL (``socket.settimeout``), six a message, about a sixth of
    the consumer's time in the issue 3 benchmark. With ``read_ahead`` the
    frames are mostly in memory already: ``next_frame`` parses one only
    when it is there whole (``blocking_read`` without a timeout then never
    touches the socket), and ``fill`` waits for the socket with ``poll``
    and reads what arrived. Only the consumer's thread may use it.
    """

    def __init__(self, amqp_connection, size=_READ_AHEAD):
        self._conn = amqp_connection
        self._transport = amqp_connection.transport
        self._sock = self._transport.sock
        self._size = size
        self._poll = select.poll()
        self._poll.register(self._sock.fileno(), select.POLLIN | select.POLLPRI)

    def frame_ready(self):
        """True if a whole frame waits in the buffer."""
        buf = self._transport._read_buffer
        return len(buf) >= 8 and len(buf) >= 8 + int.from_bytes(buf[3:7], "big")

    def fill(self, timeout):
        """Wait up to ``timeout`` s for data; read it. False if none came."""
        if not self._poll.poll(int(timeout * 1000)):
            return False
        data = self._sock.recv(self._size)
        if not data:
            raise OSError("Server unexpectedly closed connection")
        self._transport._read_buffer += data
        return True

    def next_frame(self):
        """Handle one buffered frame (``frame_ready`` must be True);
        True if it completed a method (a delivery, with its content)."""
        return self._conn.blocking_read(None)


def topic_for(base, message_type):
    return "%s.%s" % (base, message_type)


class PublishError(Exception):
    """The publisher stopped before the broker confirmed the message."""


class _Item:
    __slots__ = ("body", "exchange", "routing_key", "future")

    def __init__(self, body, exchange, routing_key):
        self.body = body
        self.exchange = exchange
        self.routing_key = routing_key
        self.future = concurrent.futures.Future()


class KombuPublisher:
    """One connection to a neighbour's RabbitMQ with pipelined publisher confirms.

    A single thread owns the connection (py-amqp is not thread-safe): it takes
    everything queued, publishes it, then reads the broker's acks until all
    are confirmed. On a connection error it reconnects with backoff and
    re-publishes what was not confirmed (at least once; receivers drop
    duplicates by message uuid).
    """

    def __init__(self, url, durable=False, max_batch=500, confirm_timeout=30.0,
                 connect_timeout=5.0):
        self._url = url
        self._safe_url = mask_url(url)
        self._durable = durable
        self._max_batch = max_batch
        self._confirm_timeout = confirm_timeout
        self._connect_timeout = connect_timeout
        self._pending = collections.deque()
        self._exchanges = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._conn = None
        self._channel = None
        self._producer = None
        self._frames = None
        self._declared = set()
        self._unacked = {}
        self._next_tag = 1
        self._failing = False
        self.published = 0
        self.confirm_batches = 0
        # Confirm callbacks run here, never on the thread that owns the
        # connection, so a slow callback does not stall publishing; one
        # task per ack frame. Several threads: a callback may still wait
        # for a write (the journal's own finish is queued, not waited for).
        self._completer = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="confirmed")
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="publisher-%s" % self._safe_url)
        self._thread.start()

    def publish(self, message, base):
        """Queue ``message`` for its topic; returns a Future set on confirm."""
        topic = topic_for(base, message.message_type)
        # Serialized here, once, on the caller's thread.
        body = jsonutils.dumpb(intercell.envelope(message))
        key = (topic, message.fanout)
        exchange = self._exchanges.get(key)
        if exchange is None:
            # Built once per topic: a kombu Exchange is not cheap to make.
            if message.fanout:
                exchange = kombu.Exchange("%s_fanout" % topic, type="fanout",
                                          durable=False, auto_delete=True)
            else:
                exchange = kombu.Exchange("nova", type="topic", durable=self._durable,
                                          auto_delete=False)
            self._exchanges[key] = exchange
        item = _Item(body, exchange, "" if message.fanout else topic)
        with self._cond:
            if self._stopping:
                item.future.set_exception(PublishError("publisher is stopped"))
                return item.future
            self._pending.append(item)
            self._cond.notify()
        return item.future

    def close(self, timeout=10.0):
        """Stop after confirming what is queued (up to ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending or self._unacked) and time.monotonic() < deadline \
                    and self._thread.is_alive():
                self._cond.wait(0.05)
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        self._completer.shutdown(wait=True)
        for item in list(self._pending) + list(self._unacked.values()):
            if not item.future.done():
                item.future.set_exception(PublishError("publisher closed"))
        self._pending.clear()
        self._unacked.clear()

    # -- publisher thread ----------------------------------------------------

    def _run(self):
        backoff = 0.5
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                batch = [self._pending.popleft()
                         for _ in range(min(self._max_batch, len(self._pending)))]
            try:
                self._ensure_connection()
                self._publish_batch(batch)
                if self._failing:
                    LOG.info("Publishing to %s recovered", self._safe_url)
                    self._failing = False
                backoff = 0.5
            except Exception as e:  # noqa: B902 - any failure: reconnect, retry
                unconfirmed = [i for i in batch if not i.future.done()]
                unconfirmed += [i for i in self._unacked.values() if i not in unconfirmed]
                if not self._failing:
                    LOG.warning("Publishing to %(url)s failed (%(err)s); %(n)d messages "
                                "will be re-sent after reconnecting",
                                {"url": self._safe_url, "err": type(e).__name__,
                                 "n": len(unconfirmed)})
                    self._failing = True
                self._drop_connection()
                with self._cond:
                    self._pending.extendleft(reversed(unconfirmed))
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        self._drop_connection()

    def _ensure_connection(self):
        if self._conn is not None:
            return
        conn = kombu.Connection(kombu_urls(self._url), connect_timeout=self._connect_timeout,
                                heartbeat=0, transport_options={"confirm_publish": False})
        conn.connect()
        read_ahead(conn)            # the broker's confirms come in runs
        channel = conn.channel()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        self._conn, self._channel = conn, channel
        self._producer = kombu.Producer(channel, serializer="json")
        self._frames = _Frames(channel.channel_id, channel.connection.frame_max)
        self._declared = set()
        self._unacked = {}
        self._next_tag = 1
        LOG.info("Connected to neighbour broker %s", self._safe_url)

    def _drop_connection(self):
        conn, self._conn, self._channel, self._producer = self._conn, None, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # noqa: B902 - already broken
                LOG.debug("Error closing connection to %s", self._safe_url)

    def _publish_batch(self, batch):
        # This thread alone writes on the connection (heartbeats are off).
        write = self._channel.connection.transport.write
        frames = []
        for item in batch:
            if item.exchange.name not in self._declared:
                if frames:
                    write(b"".join(frames))
                    frames = []
                item.exchange(self._channel).declare()
                self._declared.add(item.exchange.name)
            frames.append(self._frames.message(item.exchange.name, item.routing_key,
                                               item.body))
            self._unacked[self._next_tag] = item
            self._next_tag += 1
        if frames:
            write(b"".join(frames))
        deadline = time.monotonic() + self._confirm_timeout
        while self._unacked:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError("no confirm within %.0f s" % self._confirm_timeout)
            try:
                self._conn.drain_events(timeout=min(remaining, 1.0))
            except socket.timeout:
                continue
        self.published += len(batch)
        self.confirm_batches += 1

    def _confirmed(self, delivery_tag, multiple):
        if multiple:
            tags = [t for t in self._unacked if t <= delivery_tag]
        else:
            tags = [delivery_tag] if delivery_tag in self._unacked else []
        return [self._unacked.pop(t) for t in tags]

    def _on_ack(self, delivery_tag, multiple):
        items = self._confirmed(delivery_tag, multiple)
        if items:
            # One hand-off per ack frame (the broker acks in runs).
            self._completer.submit(_resolve, items)

    def _on_nack(self, delivery_tag, multiple):
        items = self._confirmed(delivery_tag, multiple)
        LOG.warning("Broker %(url)s refused %(n)d messages; re-sending",
                    {"url": self._safe_url, "n": len(items)})
        with self._cond:
            self._pending.extendleft(reversed(items))


class _Frames:
    """The AMQP frames of ``basic_publish`` for one channel, built in bulk.

    The very bytes py-amqp's ``Channel.basic_publish`` writes for a message
    of ``prepare_message(body, 0, "application/json", "utf-8", {},
    {"delivery_mode": 2})`` (what kombu's ``Producer.publish`` sends): a
    Basic.Publish method frame, a content header frame, body frames of at
    most ``frame_max - 8`` bytes. What py-amqp recomputes for every message
    (the method arguments and the content properties) is the same for
    every message to one exchange and routing key, so it is computed once;
    and a whole batch goes out in one socket write instead of one per
    message (issue 3 benchmark: publishing was an eighth of the agent's
    CPU).
    """

    def __init__(self, channel_id, frame_max):
        self._channel = channel_id
        self._chunk = frame_max - 8
        self._methods = {}
        props = amqp.Message(b"", priority=0, content_type="application/json",
                             content_encoding="utf-8", application_headers={},
                             delivery_mode=2)._serialize_properties()
        self._header_tail = props

    def _frame(self, type_, payload):
        return struct.pack(">BHI", type_, self._channel, len(payload)) + payload + b"\xce"

    def message(self, exchange, routing_key, body):
        """The frames of one message, as bytes."""
        key = (exchange, routing_key)
        method = self._methods.get(key)
        if method is None:
            args = amqp_serialization.dumps("Bssbb", (0, exchange, routing_key, False, False))
            method = self._methods[key] = self._frame(
                1, struct.pack(">HH", *amqp_spec.Basic.Publish) + args)
        out = [method, self._frame(2, struct.pack(">HHQ", amqp_spec.Basic.Publish[0], 0,
                                                  len(body)) + self._header_tail)]
        chunk = self._chunk
        for i in range(0, len(body), chunk):
            out.append(self._frame(3, body[i:i + chunk]))
        return b"".join(out)


def _resolve(items):
    for item in items:
        if not item.future.done():
            item.future.set_result(True)


class OsloPublisher:
    """Publishing through oslo.messaging's client (in-memory transports)."""

    def __init__(self, transport, url, base):
        import oslo_messaging
        self._om = oslo_messaging
        self._transport = transport
        self._exchange = exchange_for(url)
        self._clients = {}
        self._base = base
        self.published = 0

    def _client(self, topic, fanout):
        key = (topic, fanout)
        client = self._clients.get(key)
        if client is None:
            target = self._om.Target(topic=topic, exchange=self._exchange,
                                     version=intercell.RPC_VERSION, fanout=fanout)
            client = self._om.get_rpc_client(self._transport, target)
            self._clients[key] = client
        return client

    def publish(self, message, base):
        future = concurrent.futures.Future()
        try:
            self._client(topic_for(base, message.message_type), message.fanout).cast(
                message.ctxt, intercell.RPC_METHOD, message=message.to_json())
            self.published += 1
            future.set_result(True)
        except Exception as e:  # noqa: B902 - reported through the future
            future.set_exception(e)
        return future

    def close(self, timeout=None):
        pass


class Transports:
    """One cached transport / publisher per URL (nova caches per transport_url)."""

    def __init__(self, conf):
        self._conf = conf
        self._lock = threading.Lock()
        self._transports = {}
        self._publishers = {}

    def rpc_transport(self, url):
        import oslo_messaging
        with self._lock:
            transport = self._transports.get(url)
            if transport is None:
                transport = oslo_messaging.get_rpc_transport(self._conf, url=url)
                self._transports[url] = transport
            return transport

    def publisher(self, url):
        with self._lock:
            pub = self._publishers.get(url)
        if pub is not None:
            return pub
        if scheme_of(url) in ("rabbit", "amqp", "pyamqp"):
            pub = KombuPublisher(url, durable=self._conf.oslo_messaging_rabbit.amqp_durable_queues)
        else:
            pub = OsloPublisher(self.rpc_transport(url), url,
                                self._conf.cells.rpc_driver_queue_base)
        with self._lock:
            return self._publishers.setdefault(url, pub)

    def close(self, timeout=10.0):
        with self._lock:
            pubs, self._publishers = list(self._publishers.values()), {}
            transports, self._transports = list(self._transports.values()), {}
        for pub in pubs:
            pub.close(timeout)
        for transport in transports:
            transport.cleanup()


def rpc_servers(transport, url, base, host, endpoint):
    """The three inter-cell RPC servers of a cell, as ``CellsRPCDriver`` starts them."""
    import oslo_messaging
    from oslo_messaging.rpc import dispatcher
    servers = []
    for mtype in MESSAGE_TYPES:
        target = oslo_messaging.Target(topic=topic_for(base, mtype), server=host,
                                       exchange=exchange_for(url))
        # No executor argument (deprecated in oslo.messaging 18): without
        # eventlet monkey-patching oslo.messaging picks the threading executor.
        server = oslo_messaging.get_rpc_server(
            transport, target, [endpoint], access_policy=dispatcher.DefaultRPCAccessPolicy)
        if server.executor_type != "threading":
            raise RuntimeError("oslo.messaging chose the %s executor; cellagent runs on "
                               "native threads only" % server.executor_type)
        servers.append(server)
    return servers


def api_server(transport, url, topic, host, endpoint):
    """The top's client API server (``[top] topic``), threading executor."""
    import oslo_messaging
    from oslo_messaging.rpc import dispatcher
    target = oslo_messaging.Target(topic=topic, server=host, exchange=exchange_for(url))
    return oslo_messaging.get_rpc_server(
        transport, target, [endpoint], access_policy=dispatcher.DefaultRPCAccessPolicy)
