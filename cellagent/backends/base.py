"""The backend contract: what the manager may ask of a cloud, and what it gets.

A *backend* runs the instances of this cell somewhere: in memory
(``fake``), on EC2 (``ec2``, boto3) or on another OpenStack (``openstack``,
novaclient). The manager never talks to a provider directly; it calls the
methods below, from worker threads, and records what they return in the
store. Everything a backend must guarantee is written here, in the base
class only (as ``nova/virt/driver.py`` does for ``ComputeDriver``);
implementations stay lean and do not repeat it.
"""

import abc
import logging

from cellagent import exception
from cellagent.objects import InstanceInfo
from cellagent.objects import InstanceState
from cellagent.objects import RebootKind

LOG = logging.getLogger(__name__)


def is_retryable(exc):
    """True when ``exc`` is a BackendError worth trying again later.

    The manager retries an operation ``[backend] operation_retries`` times,
    with exponential backoff from ``[backend] retry_delay`` seconds, when
    this returns True, and records a fault otherwise. Anything that is not a
    BackendError is a bug in the backend, never retried.
    """
    return isinstance(exc, exception.BackendError) and bool(exc.retryable)


class Backend(abc.ABC):
    """Base class and contract for all backends.

    **Vocabulary.**

    * The *instance uuid* is the parent's id of an instance: the Nova
      ``Instance.uuid`` the top cell chose. Every log line about an
      instance carries it, and every result is keyed by it.
    * The *backend id* is the provider's id of that instance: an EC2
      instance id (``i-0abc…``), a remote Nova server id, or ``fake-1a2b3c4d``.
      It never leaves the backend or the store: the parent never sees it,
      and the manager treats it as an opaque string it keeps for the next
      call.
    * A *launch token* (``BuildRequest.launch_token``) names one launch
      generation of an instance. The manager derives it from the instance
      uuid and the generation and stores it *before* calling ``spawn``, so
      a re-issued spawn carries the same token. Backends use it as their
      idempotency key (EC2 ``ClientToken``; server metadata on OpenStack).

    Instances are named to the backend with an ``InstanceRef`` (instance
    uuid, backend id, launch token). The backend id may be empty when the
    agent crashed after asking the provider for an instance but before it
    stored the answer; every method taking a ref must then find the
    instance by its instance uuid (tag, metadata or name), or treat it as
    never created.

    **States.** A backend reports state as one ``InstanceState``, translated
    from the provider's own vocabulary through the class's ``STATE_MAP``
    (libcloud's ``NODE_STATE_MAP`` idea), with ``map_state`` as the one
    place that does it. Operations are asynchronous at most providers: a
    method that starts a change returns as soon as the provider accepted
    it, with the transitional state (PENDING, REBOOTING, STOPPING,
    STARTING, DELETING) or, if the provider is quick, already the settled
    one. The manager then follows the instance with ``poll`` until it
    settles, and gives up with a fault after ``[backend]
    transition_timeout`` seconds.

    **Errors.** Only ``BackendError`` subclasses may escape a method:

    * ``InstanceNotFound``: the instance does not exist (any more);
    * ``InsufficientCapacity``: no room (quota, budget, provider capacity);
    * ``BackendUnavailable``: throttling, 5xx, timeouts; retryable;
    * ``BackendAuthError``: the provider refused our credentials;
    * ``BackendError`` itself for anything else, with ``retryable`` set
      when trying again later may help (for example an operation refused
      because the instance is still in a transitional state).

    Provider exceptions (botocore, novaclient, keystoneauth1, requests)
    are translated in one private ``_translate_errors`` helper per backend,
    so the mapping is read in one place. An exception of any other class
    escaping a backend is a bug.

    **Threads.** The manager calls one backend object from several worker
    threads at once (``[backend] workers``), but never runs two operations
    on the *same instance* at the same time. Implementations must be safe
    across instances: shared clients, caches and counters need a lock or a
    thread-safe client (boto3 clients are thread-safe; boto3 *sessions*
    and *resources* are not, so build them in ``start``). Methods may block
    on the network; none should wait for a transition to finish, because
    the manager's batched ``poll`` does that for everything in flight at
    once.

    **Life cycle.** ``__init__(conf)`` only keeps the configuration: no
    I/O, no clients, so that loading a backend by name cannot hang.
    ``start()`` is called once before any other method, ``stop()`` once at
    shutdown.

    **Configuration.** ``conf`` is an oslo.config ``ConfigOpts`` already
    registered and parsed by ``cmd/``. A backend reads its own group
    (``[fake]``, ``[ec2]``, ``[openstack]``) and nothing else; it never
    reads a global ``CONF``.
    """

    #: The entry-point name in ``cellagent.backends``; also the value of
    #: ``[backend] driver`` that selects this class.
    name = "base"

    #: What the provider can do. The manager consults these before calling
    #: an optional operation; missing keys count as False. Subclasses
    #: replace the whole dict rather than mutating this one.
    capabilities = {
        "supports_soft_reboot": False,   # ACPI/guest reboot; else HARD is used
        "supports_pause": False,
        "supports_suspend": False,
        "supports_console_output": False,
        "supports_resize": False,
        "resize_needs_stop": False,      # the manager stops it first, starts it after
        "supports_snapshot": False,
    }

    #: Provider state string -> InstanceState. Every state the provider can
    #: report should be listed; anything else becomes UNKNOWN, with a
    #: warning logged once per state.
    STATE_MAP = {}

    def __init__(self, conf):
        """Keep the parsed configuration. No I/O here; see ``start``."""
        self.conf = conf
        self._unknown_states = set()

    # -- life cycle -------------------------------------------------------
    # start/stop are deliberately concrete no-ops (hence noqa B027): a backend
    # without clients, like the fake without cloud_file, need not define them.

    def start(self):  # noqa: B027
        """Build provider clients and load whatever state the backend keeps.

        Post-condition: every other method may be called. Called once, from
        the service's main thread, before the workers start. May block
        (authentication, endpoint discovery). Raises ``BackendAuthError``
        when the credentials are refused, ``BackendUnavailable`` when the
        provider cannot be reached, ``BackendError`` otherwise. The default
        does nothing.
        """

    def stop(self):  # noqa: B027
        """Release clients and connections.

        Post-condition: no thread or socket of the backend is left. Called
        once at shutdown after the workers finished. Must not raise; the
        default does nothing. Instances are left running: stopping the
        agent never stops the cloud.
        """

    # -- instance operations ----------------------------------------------

    @abc.abstractmethod
    def spawn(self, request):
        """Launch the instance described by ``request`` (a ``BuildRequest``).

        Returns an ``InstanceInfo`` carrying the new backend id as soon as
        the provider *accepted* the request: its state is PENDING, or
        already RUNNING (or ERROR) if the provider was quick. The caller
        stores the backend id and follows the rest with ``poll``; spawn
        itself does not wait for the boot.

        Idempotent per instance uuid and launch token: calling it again
        with the same request (after a crash, a timeout or a lost response)
        returns the instance the first call created and never creates a
        second one. A *different* launch token for the same instance uuid
        is a new generation (a rebuild): the backend replaces the old
        instance with a new one.

        On failure the backend cleans up whatever it created for this
        request (volumes, ports, security groups, a half-created server)
        before raising, so a failed spawn leaves nothing billed behind.

        Raises ``InsufficientCapacity`` when the request does not fit (the
        manager reports the build as failed and the scheduler picks another
        cell next time), ``BackendUnavailable`` on transient trouble (the
        manager retries with the same request, which idempotency makes
        safe), ``BackendError`` otherwise. May block.
        """

    @abc.abstractmethod
    def destroy(self, ref):
        """Delete the instance named by ``ref`` (an ``InstanceRef``).

        Post-condition: the instance is gone, or going (a following
        ``get_info`` may show DELETING for a while, then raises
        ``InstanceNotFound``; ``poll`` then reports DELETED).

        Succeeds, with a warning logged, when the instance is already gone:
        deleting twice is normal after a retry or a replayed message. When
        ``ref.backend_id`` is empty the backend finds the instance by
        instance uuid, which covers an agent that crashed between launching
        and storing the backend id; if nothing is found, that too is
        success.

        Releases everything ``spawn`` created for the instance (addresses,
        ports, volumes it owns). Raises ``BackendUnavailable`` on transient
        trouble, ``BackendError`` otherwise; never ``InstanceNotFound``.
        May block.
        """

    @abc.abstractmethod
    def reboot(self, ref, kind):
        """Reboot the instance; ``kind`` is a ``RebootKind`` (SOFT or HARD).

        SOFT asks the guest to restart; HARD power-cycles it. When
        ``capabilities['supports_soft_reboot']`` is false a SOFT request is
        carried out as HARD (``_reboot_kind`` does the choice and logs it).
        A HARD reboot may also start a stopped or errored instance, as
        Nova's does; SOFT needs a running one.

        Returns the ``InstanceInfo`` once the provider accepted the reboot
        (REBOOTING, or RUNNING if it was immediate). Raises
        ``InstanceNotFound`` if the instance is gone, ``BackendError``
        (retryable if the instance is in a transitional state) when its
        state forbids a reboot, ``BackendUnavailable`` on transient
        trouble. May block.
        """

    @abc.abstractmethod
    def power_off(self, ref):
        """Stop the instance, keeping its disks and addresses.

        Returns the ``InstanceInfo`` once the provider accepted the stop
        (STOPPING, or STOPPED). Stopping a stopped instance is a no-op that
        returns its info. Raises ``InstanceNotFound`` if the instance is
        gone, ``BackendError`` (retryable if transitional) when its state
        forbids a stop, ``BackendUnavailable`` on transient trouble. May
        block.
        """

    @abc.abstractmethod
    def power_on(self, ref):
        """Start a stopped instance.

        Returns the ``InstanceInfo`` once the provider accepted the start
        (STARTING, or RUNNING). Starting a running instance is a no-op that
        returns its info. Raises as ``power_off`` does. May block.
        """

    # -- optional operations (``capabilities`` say which exist) ------------

    def _unsupported(self, what):
        return exception.BackendError(backend=self.name,
                                      reason="%s is not supported" % what)

    def pause(self, ref):
        """Pause the instance (``supports_pause``).

        Returns the ``InstanceInfo`` once the provider accepted it. The
        settled state is PAUSED, or STOPPED on a provider without a pause
        (EC2 carries pause out as a stop, or a hibernate where enabled; the
        backend documents its mapping). The manager reports ``paused`` once
        either is reached. Raises as ``power_off`` does. The default raises
        a non-retryable ``BackendError``.
        """
        raise self._unsupported("pause")

    def unpause(self, ref):
        """Undo ``pause``; settles RUNNING. Raises as ``power_on`` does."""
        raise self._unsupported("unpause")

    def suspend(self, ref):
        """Suspend the instance (``supports_suspend``): as ``pause``, settled
        SUSPENDED or STOPPED."""
        raise self._unsupported("suspend")

    def resume(self, ref):
        """Undo ``suspend``; settles RUNNING."""
        raise self._unsupported("resume")

    def resize(self, ref, flavor):
        """Change the instance to ``flavor`` (a ``Flavor``), ``supports_resize``.

        With ``resize_needs_stop`` the manager calls this only on a STOPPED
        instance (it stops it first and starts it again after, or on
        failure, so a resize never leaves an instance stopped that was
        running); otherwise on a running one. Returns the ``InstanceInfo``
        once the provider accepted the change. Raises
        ``InsufficientCapacity`` when the new size does not fit (the
        instance keeps its old size), ``InstanceNotFound``, ``BackendError``
        otherwise. A revert is a resize back to the old flavor.
        """
        raise self._unsupported("resize")

    def snapshot(self, ref, name):
        """Start an image of the instance's disk (``supports_snapshot``).

        Returns the provider's image id as soon as the provider accepted
        the request; the image may still be in progress. Raises
        ``InstanceNotFound``, ``BackendUnavailable`` on transient trouble,
        ``BackendError`` otherwise.
        """
        raise self._unsupported("snapshot")

    def image_status(self, image_id):
        """``"pending"``, ``"available"`` or ``"failed"`` for an image
        ``snapshot`` returned; the manager polls it until not pending."""
        raise self._unsupported("snapshot")

    # -- queries -----------------------------------------------------------

    @abc.abstractmethod
    def get_info(self, ref):
        """Return the current ``InstanceInfo`` of one instance.

        The info carries the instance uuid, the backend id, the mapped
        state, the addresses known so far, and a fault text when the state
        is ERROR. Raises ``InstanceNotFound`` when the instance is gone
        (including a provider that still lists it as terminated),
        ``BackendUnavailable`` on transient trouble. May block, but must
        not wait for a transition.
        """

    def poll(self, refs):
        """Return ``{instance uuid: InstanceInfo}`` for every ref in ``refs``.

        This is the batched state query: the manager calls it once per
        ``[backend] poll_interval`` tick with every instance it has in
        flight, so a backend with a list call should override it with one
        (EC2: one paginated DescribeInstances filtered by id; OpenStack:
        one ``servers.list(changes-since=…)``), and make its cost
        independent of ``len(refs)`` where the provider allows.

        An instance that no longer exists is reported with state DELETED
        (and the ref's backend id), never by raising ``InstanceNotFound``.
        Raises ``BackendUnavailable`` on transient trouble for the whole
        batch. May block.

        This default calls ``get_info`` once per ref, for backends without
        a batch call.
        """
        result = {}
        for ref in refs:
            try:
                result[ref.instance_uuid] = self.get_info(ref)
            except exception.InstanceNotFound:
                result[ref.instance_uuid] = InstanceInfo(
                    backend_id=ref.backend_id, state=InstanceState.DELETED,
                    instance_uuid=ref.instance_uuid)
        return result

    @abc.abstractmethod
    def list_instances(self):
        """Return an ``InstanceInfo`` for every instance this backend owns.

        "Owns" means launched by this cell: tagged or named so (EC2 tag,
        server metadata), not everything in the account or project. Each
        info has ``instance_uuid`` filled in, recovered from that tag. The
        reconciler compares this list with the store to find instances the
        store forgot (a crash after launch) and records whose instance
        vanished. Instances being deleted are included with state DELETING;
        gone ones are not. Raises ``BackendUnavailable`` on transient
        trouble. May block (paginates).
        """

    @abc.abstractmethod
    def get_capacity(self, flavors):
        """Return the ``Capacity`` of this backend for the given flavors.

        ``ram_*`` and ``disk_*`` are totals and free room in MB, raw: the
        reserve (``[cell] reserve_percent``) is applied by the reporter,
        not here. ``max_units`` may cap the number of instances of a flavor
        (by flavor name) for limits that RAM and disk do not express:
        vcpus, an instance quota, a budget, an instance type the region
        does not offer. A flavor missing from ``max_units`` is limited by
        RAM and disk only. Called every ``[cell] report_interval`` from the
        reporter thread. Raises ``BackendUnavailable`` on transient
        trouble. May block.
        """

    def get_console_output(self, ref, tail_length=None):
        """Return the instance's console log as one string.

        Only the last ``tail_length`` lines when it is an integer; all of
        what the provider keeps when None. Raises ``InstanceNotFound`` if
        the instance is gone. This default raises a non-retryable
        ``BackendError``: backends that set
        ``capabilities['supports_console_output']`` override it. May block.
        """
        raise exception.BackendError(backend=self.name,
                                     reason="console output is not supported")

    # -- helpers for implementations ---------------------------------------

    def map_state(self, provider_state):
        """Translate a provider state through ``STATE_MAP``.

        An unmapped state becomes UNKNOWN rather than an error, so that a
        provider adding a state does not stop the manager; it is logged
        once per state because it means ``STATE_MAP`` needs an entry.
        """
        try:
            return self.STATE_MAP[provider_state]
        except KeyError:
            if provider_state not in self._unknown_states:
                self._unknown_states.add(provider_state)
                LOG.warning("Backend %(backend)s reported state %(state)r, "
                            "which its STATE_MAP does not know; treating it "
                            "as unknown", {"backend": self.name,
                                           "state": provider_state})
            return InstanceState.UNKNOWN

    def _reboot_kind(self, ref, kind):
        """The reboot kind to carry out: SOFT falls back to HARD if unsupported."""
        kind = RebootKind(kind)
        if kind is RebootKind.SOFT and not self.capabilities.get("supports_soft_reboot"):
            LOG.debug("[instance: %(uuid)s] backend %(backend)s has no soft "
                      "reboot; rebooting HARD",
                      {"uuid": ref.instance_uuid, "backend": self.name})
            return RebootKind.HARD
        return kind
