"""Receiving cells messages: decode, route, run locally, reply.

``IntercellEndpoint.process_message`` is the one RPC method a cell exposes
(section 1.4). It never raises: a message that cannot be decoded is logged
once with the reason and dropped; a message that can be decoded but fails
(routing, hop count, an unknown method, an error in the handler) is answered
with a failure response when the sender waits for one, and logged otherwise.

The *handler* (``CellManager`` in a child, the top manager in a parent) is
called with the decoded :class:`~cellagent.rpc.intercell.Message` and
returns the value to send back, or raises. Durability (the journal) is the
handler's first act; see ``manager.py``. A handler may also tell which
messages it handles without waiting (``quick(msg)``): a consumer runs those
on its own thread (``rpc/consumer.py``) and hands the others to a pool.
"""

import logging
import queue
import threading

from cellagent import exception
from cellagent.rpc import intercell

LOG = logging.getLogger(__name__)


class ResponseWaiters:
    """Callers waiting for ``parse_responses`` by message uuid."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queues = {}

    def register(self, msg_uuid):
        q = queue.Queue()
        with self._lock:
            self._queues[msg_uuid] = q
        return q

    def unregister(self, msg_uuid):
        with self._lock:
            self._queues.pop(msg_uuid, None)

    def deliver(self, msg_uuid, responses):
        with self._lock:
            q = self._queues.get(msg_uuid)
        if q is None:
            # Late reply after a timeout, or meant for another process of
            # this cell (replies are fanout): dropped silently, as in nova.
            LOG.debug("No caller waits for response %s", msg_uuid)
            return False
        q.put(responses)
        return True

    def wait(self, q, count, timeout):
        """``count`` reply lists, concatenated; raises CellTimeout."""
        import time
        deadline = time.monotonic() + timeout
        out = []
        for _ in range(count):
            remaining = deadline - time.monotonic()
            try:
                out.extend(q.get(timeout=max(0.0, remaining)))
            except queue.Empty:
                raise exception.CellTimeout()
        return out


class Router:
    """Routes one decoded message per section 2.3-2.5 of the reference."""

    def __init__(self, sender, handler, call_timeout=60, max_hop_count=10):
        self._sender = sender
        self._handler = handler
        self.our_name = sender.our_name
        self.neighbours = sender.neighbours
        self.call_timeout = call_timeout
        self.max_hop_count = max_hop_count
        self.waiters = ResponseWaiters()
        self.dropped = 0

    def receive(self, text):
        """Decode and route one cells message JSON (never raises)."""
        msg = self.decode(text)
        if msg is not None:
            self.route(msg)

    def decode(self, text):
        """The Message, or None (logged and counted) if it cannot be decoded."""
        try:
            msg = intercell.decode(text, self.our_name, self.max_hop_count)
        except exception.MessageError as e:
            self.dropped += 1
            LOG.warning("Dropped an undecodable cells message: %s", e.message)
            return None
        LOG.debug("Received %s", msg.describe())
        return msg

    def quick(self, msg):
        """True if routing ``msg`` never waits for anything but the store.

        Responses and forwarded casts are only sent on; a cast run here is
        quick if the handler says so (``handler.quick(msg)``, optional).
        Calls wait for their answer and may ask the backend: never quick.
        """
        if msg.message_type == "response":
            return True
        if msg.need_response:
            return False
        if msg.message_type == "targeted" and not msg.is_local_target:
            return True
        quick = getattr(self._handler, "quick", None)
        return quick is not None and quick(msg)

    def route(self, msg):
        """Act on a decoded message (section 2.3-2.5); never raises."""
        try:
            if msg.message_type == "targeted":
                self._targeted(msg)
            elif msg.message_type == "broadcast":
                self._broadcast(msg)
            else:
                self._response(msg)
        except Exception as e:  # noqa: B902 - the agent must keep serving
            self.dropped += 1
            LOG.exception("Failed to process %(msg)s: %(err)s",
                          {"msg": msg.describe(), "err": e})

    # -- message types --------------------------------------------------------

    def _targeted(self, msg):
        try:
            next_name = intercell.next_hop_name(msg)
            if next_name is not None:
                intercell.check_hop_count(msg)
                self._sender.forward(msg, next_name)
                return
        except exception.MessageError as e:
            self._fail(msg, e)
            return
        self._run_locally(msg, reply=True)

    def _broadcast(self, msg):
        if msg.hop_count >= msg.max_hop_count:
            hops = []
        elif msg.direction == "down":
            hops = self.neighbours.children()
        else:
            hops = self.neighbours.parents()
        if not msg.need_response:
            for rec in hops:
                self._sender.send_to(rec, intercell.forward_copy(msg))
            self._run_locally(msg, reply=False)
            return
        # A call broadcast: gather one reply list per next hop, add ours, and
        # send the whole list one hop back (aggregation at each hop, 2.4).
        waiter = self.waiters.register(msg.uuid) if hops else None
        try:
            for rec in hops:
                self._sender.send_to(rec, intercell.forward_copy(msg))
            local = self._local_response(msg)
            gathered = []
            if hops:
                try:
                    gathered = self.waiters.wait(waiter, len(hops), self.call_timeout)
                except exception.CellTimeout as e:
                    LOG.warning("Broadcast %s: not every neighbour answered in time",
                                msg.describe())
                    gathered = [intercell.Response.from_exception(self.our_name, e)]
        finally:
            if hops:
                self.waiters.unregister(msg.uuid)
        self._reply(msg, gathered + [local])

    def _response(self, msg):
        try:
            next_name = intercell.next_hop_name(msg)
            responses = intercell.parse_response_list(msg) if next_name is None else None
        except exception.MessageError as e:
            LOG.warning("Dropped response %(msg)s: %(err)s",
                        {"msg": msg.describe(), "err": e.message})
            return
        if next_name is None:
            self.waiters.deliver(msg.response_uuid, responses)
            return
        # No hop-count check for responses; the last hop is fanout.
        fwd = intercell.forward_copy(msg)
        if msg.target_cell.count(intercell.PATH_SEP) == \
                msg.routing_path.count(intercell.PATH_SEP) + 1:
            fwd.fanout = True
        self._sender.forward(fwd, next_name)

    # -- local execution ------------------------------------------------------

    def _local_response(self, msg):
        try:
            value = self._handler.handle(msg)
            return intercell.Response(msg.routing_path, value)
        except exception.CellAgentError as e:
            # Expected failures (unknown instance, bad kwargs): no traceback.
            LOG.warning("%(msg)s failed: %(err)s", {"msg": msg.describe(), "err": e.message})
            return intercell.Response.from_exception(msg.routing_path, e)
        except Exception as e:  # noqa: B902 - reported to the caller
            LOG.exception("%s failed unexpectedly", msg.describe())
            return intercell.Response.from_exception(msg.routing_path, e)

    def _run_locally(self, msg, reply):
        resp = self._local_response(msg)
        if reply and msg.need_response:
            self._reply(msg, [resp])

    def _fail(self, msg, exc):
        LOG.warning("Cannot route %(msg)s: %(err)s", {"msg": msg.describe(), "err": exc.message})
        if msg.need_response:
            self._reply(msg, [intercell.Response.from_exception(msg.routing_path, exc)])

    def _reply(self, msg, responses):
        try:
            self._sender.respond(msg, responses)
        except exception.MessageError as e:
            # The way back does not exist (a neighbour record missing or
            # misnamed): one line, the caller will time out.
            LOG.warning("Cannot send the reply to %(msg)s: %(err)s",
                        {"msg": msg.describe(), "err": e.message})

    # -- calls originated here (used by the top and by tools) -----------------

    def call(self, msg, record=None):
        """Send ``msg`` (need_response) and wait for its replies (a list)."""
        msg.need_response = True
        waiter = self.waiters.register(msg.uuid)
        try:
            if record is not None:
                self._sender.send_to(record, msg)
                count = 1
            elif msg.message_type == "broadcast":
                hops = (self.neighbours.children() if msg.direction == "down"
                        else self.neighbours.parents())
                for rec in hops:
                    self._sender.send_to(rec, msg)
                count = len(hops)
            else:
                self._sender.forward(msg, intercell.next_hop_name(msg))
                count = 1
            return self.waiters.wait(waiter, count, self.call_timeout)
        finally:
            self.waiters.unregister(msg.uuid)


class IntercellEndpoint:
    """The RPC endpoint: ``process_message(message=<cells message JSON>)``."""

    def __init__(self, router):
        import oslo_messaging
        self.target = oslo_messaging.Target(version=intercell.RPC_VERSION)
        self._router = router

    def process_message(self, ctxt, message):
        # The RPC-level context is ignored; the cells message carries its own.
        self._router.receive(message)
