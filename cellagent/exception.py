"""The one exception tree of cellagent.

Every class carries a ``msg_fmt`` filled from keyword arguments, as
``nova.exception.NovaException`` does, so that a failure sent back over the
cells v1 wire can carry the same ``class`` / ``message`` / ``kwargs`` shape a
stock Nova cell would send. Classes whose name also exists in
``nova.exception`` set ``wire_module = "nova.exception"``: a Stein API cell
then re-raises them as its own class (for example ``InstanceNotFound`` becomes
an HTTP 404) instead of a generic ``RemoteError``.
"""


class CellAgentError(Exception):
    """Base class: ``msg_fmt % kwargs`` is the message."""

    msg_fmt = "An unknown error occurred."
    code = 500
    wire_module = "cellagent.exception"

    def __init__(self, message=None, **kwargs):
        self.kwargs = dict(kwargs)
        self.kwargs.setdefault("code", self.code)
        if message is None:
            try:
                message = self.msg_fmt % kwargs
            except (KeyError, TypeError, ValueError):
                # A wrong kwarg must not hide the original problem.
                message = self.msg_fmt
        self.message = str(message)
        super().__init__(self.message)


class ConfigurationError(CellAgentError):
    """The configuration cannot work (bad value, plugin that will not load)."""

    msg_fmt = "Configuration error: %(reason)s"


class MessageError(CellAgentError):
    """A message could not be understood or routed."""

    msg_fmt = "Bad message: %(reason)s"
    code = 400


class MalformedMessage(MessageError):
    """The envelope or the cells message is not what the protocol says."""

    msg_fmt = "Malformed cells message: %(reason)s"


class UnsupportedVersion(MessageError):
    """The message asks for an RPC or object version we do not speak."""

    msg_fmt = "Unsupported version: %(reason)s"


class CellServiceAPIMethodNotFound(MessageError):
    """run_compute_api_method named a method this cell does not have."""

    msg_fmt = "No such cell service API method: %(method_name)s"
    code = 404
    wire_module = "nova.exception"


class UnknownMethod(MessageError):
    """A cells message named a method this cell does not implement."""

    msg_fmt = "Unknown %(message_type)s method: %(method_name)s"
    code = 404


class CellRoutingInconsistency(MessageError):
    """Target and routing path disagree, or the next hop is not a neighbour."""

    msg_fmt = "Routing inconsistency: %(reason)s"
    wire_module = "nova.exception"


class CellMaxHopCountReached(MessageError):
    """A targeted message went through too many cells."""

    msg_fmt = "Cell message has reached maximum hop count: %(hop_count)s"
    wire_module = "nova.exception"


class CellTimeout(CellAgentError):
    """No reply to a call within call_timeout."""

    msg_fmt = "Timeout waiting for response from cell"
    code = 404
    wire_module = "nova.exception"


class BackendError(CellAgentError):
    """A backend operation failed; ``retryable`` says whether to try again."""

    msg_fmt = "Backend %(backend)s failed: %(reason)s"
    retryable = False

    def __init__(self, message=None, backend="unknown", retryable=None, **kwargs):
        kwargs.setdefault("reason", "unknown error")
        super().__init__(message, backend=backend, **kwargs)
        self.backend = backend
        if retryable is not None:
            self.retryable = retryable


class BackendUnavailable(BackendError):
    """Throttled, 5xx or timed out: worth retrying later."""

    msg_fmt = "Backend %(backend)s unavailable: %(reason)s"
    retryable = True


class BackendAuthError(BackendError):
    """The provider refused our credentials."""

    msg_fmt = "Backend %(backend)s refused our credentials: %(reason)s"


class InsufficientCapacity(BackendError):
    """No room (quota, budget or provider capacity) for the request."""

    msg_fmt = "Backend %(backend)s has no room: %(reason)s"


class InstanceNotFound(BackendError):
    """The instance is unknown to this cell or gone from the provider."""

    msg_fmt = "Instance %(instance_id)s could not be found."
    code = 404
    wire_module = "nova.exception"

    def __init__(self, message=None, instance_id=None, backend="cellagent", **kwargs):
        super().__init__(message, backend=backend, instance_id=instance_id, **kwargs)
        # Nova's kwargs for this class are instance_id and code only.
        self.kwargs = {"instance_id": instance_id, "code": self.code}


class InstanceInvalidState(CellAgentError):
    """The operation is not possible in the instance's current state."""

    msg_fmt = ("Instance %(instance_uuid)s in %(attr)s %(state)s. Cannot "
               "%(method)s while the instance is in this state.")
    code = 409
    wire_module = "nova.exception"


class StateError(CellAgentError):
    """The durable store failed or holds something unexpected."""

    msg_fmt = "State store error: %(reason)s"


class SchemaVersionError(StateError):
    """The database schema is older or newer than this code."""

    msg_fmt = ("Database schema is at version %(found)s, this code needs "
               "%(wanted)s: run 'cellagent-manage db sync'")


class JournalCorrupt(StateError):
    """A journal entry cannot be replayed."""

    msg_fmt = "Journal entry %(entry)s cannot be replayed: %(reason)s"


class NoValidCell(CellAgentError):
    """The scheduler found no cell for the request; ``removed`` says why, per cell."""

    msg_fmt = "No valid cell: %(reason)s"

    def __init__(self, message=None, removed=None, **kwargs):
        # ``removed`` ({cell name: "filter: reason"}) rides in kwargs too, so
        # it survives oslo.messaging's exception serialisation to a client.
        super().__init__(message, removed=dict(removed or {}), **kwargs)
        self.removed = self.kwargs["removed"]


class InvalidRequest(CellAgentError):
    """A person's request to the top cannot be done as asked."""

    msg_fmt = "Invalid request: %(reason)s"


class CellCallFailed(CellAgentError):
    """A call to a child cell came back as a failure."""

    msg_fmt = "Cell %(cell_name)s failed the call: %(reason)s"


class CellNotFound(CellAgentError):
    """The top has no record of a cell by that name."""

    msg_fmt = "Cell %(cell_name)s doesn't exist."
    code = 404
    wire_module = "nova.exception"


class InstanceExists(CellAgentError):
    """An instance with that uuid is already recorded."""

    msg_fmt = "Instance %(name)s already exists."
    code = 409
    wire_module = "nova.exception"


class InstanceUpdateRejected(CellAgentError):
    """An instance_update_at_top failed a Stein guard and was dropped."""

    msg_fmt = "Instance update rejected: %(reason)s"
    code = 409


class AmbiguousServerName(CellAgentError):
    """More than one live server has the name a person gave."""

    msg_fmt = "More than one server is named %(name)s (%(uuids)s): use its uuid"
    code = 409
