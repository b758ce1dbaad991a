"""Sending cells messages: to one neighbour, up to every parent, and replies.

Version history of what this agent sends up (the inter-cell API itself is
``1.0`` and never changed, section 1.4):

* 1.0 - ``instance_update_at_top``, ``instance_destroy_at_top``,
  ``instance_fault_create_at_top`` (broadcast up, not fanout);
  ``update_capabilities``, ``update_capacities`` (targeted to each parent,
  fanout); ``parse_responses`` replies. Object versions are capped at what a
  Stein cell accepts (Instance 2.4).
"""

import logging

from cellagent.rpc import intercell

LOG = logging.getLogger(__name__)


class IntercellSender:
    """Builds and sends messages from this cell to its neighbours."""

    def __init__(self, our_name, neighbours, transports, base, max_hop_count):
        self.our_name = our_name
        self.neighbours = neighbours
        self._transports = transports
        self._base = base
        self.max_hop_count = max_hop_count

    def send_to(self, record, msg):
        """Publish ``msg`` on ``record``'s broker; returns a confirm Future."""
        LOG.debug("Sending %(msg)s to cell %(cell)s", {"msg": msg.describe(),
                                                      "cell": record.name})
        return self._transports.publisher(record.transport_url).publish(msg, self._base)

    def forward(self, msg, next_name):
        """Send a routed message on to the neighbour ``next_name``."""
        direction = msg.direction
        record = self.neighbours.neighbour(next_name, direction)
        return self.send_to(record, intercell.forward_copy(msg))

    def respond(self, orig, responses):
        """Reply to ``orig`` (a call) with a list of Response objects."""
        resp = intercell.make_response(orig, self.our_name, responses, self.max_hop_count)
        next_name = intercell.next_hop_name(resp)
        if next_name is None:
            return None
        return self.forward(resp, next_name)

    def new(self, *args, **kwargs):
        kwargs.setdefault("max_hop_count", self.max_hop_count)
        return intercell.new_message(self.our_name, *args, **kwargs)


class ParentAPI:
    """What a child cell tells its parents. Every method returns the list of
    confirm Futures (one per parent)."""

    def __init__(self, sender):
        self._sender = sender

    def _broadcast_up(self, method, kwargs, ctxt):
        futures = []
        for parent in self._sender.neighbours.parents():
            msg = self._sender.new("broadcast", method, kwargs, "up", ctxt=ctxt)
            futures.append(self._sender.send_to(parent, msg))
        return futures

    def _targeted_up(self, method, kwargs, ctxt=None):
        futures = []
        for parent in self._sender.neighbours.parents():
            msg = self._sender.new(
                "targeted", method, kwargs, "up", ctxt=ctxt,
                target_cell=self._sender.our_name + intercell.PATH_SEP + parent.name,
                fanout=True)
            futures.append(self._sender.send_to(parent, msg))
        return futures

    def instance_update_at_top(self, instance, ctxt=None):
        return self._broadcast_up("instance_update_at_top", {"instance": instance}, ctxt)

    def instance_destroy_at_top(self, instance, ctxt=None):
        return self._broadcast_up("instance_destroy_at_top", {"instance": instance}, ctxt)

    def instance_fault_create_at_top(self, instance_fault, ctxt=None):
        return self._broadcast_up("instance_fault_create_at_top",
                                  {"instance_fault": instance_fault}, ctxt)

    def update_capabilities(self, capabilities):
        return self._targeted_up("update_capabilities", {
            "cell_name": self._sender.our_name,
            "capabilities": {k: sorted(v) for k, v in capabilities.items()}})

    def update_capacities(self, capacities):
        return self._targeted_up("update_capacities", {
            "cell_name": self._sender.our_name, "capacities": capacities})
