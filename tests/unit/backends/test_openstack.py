"""OpenStackBackend's pure logic, without a cloud (no peer, no socket).

The behaviour against a real nova-api is tested in
tests/functional/test_openstack_backend.py; here only what can be decided
from one answer: error translation (novaclient's and keystoneauth1's own
exception classes, raised inside ``_translate_errors``), the changes-since
mark and its margin, capacity from ``/limits`` under the budget caps, and
the reading of a resize Nova gave up on. novaclient is stubbed at the client
boundary (``backend._nova``), as the style guide's B.7 says; no HTTP is
mocked.
"""

import types

import pytest
from keystoneauth1 import exceptions as ks_exc
from novaclient import exceptions as nova_exc

from cellagent import exception
from cellagent.backends import openstack
from cellagent.objects import Flavor
from cellagent.objects import InstanceRef
from cellagent.objects import InstanceState

TINY = Flavor(name="m1.tiny", memory_mb=512, vcpus=1, root_gb=1)
SMALL = Flavor(name="m1.small", memory_mb=2048, vcpus=2, root_gb=20)
SECRET = "hunter2-secret"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class StubNova:
    """What the backend reads of a novaclient Client: limits and client.get."""

    def __init__(self):
        self.absolute = {}
        self.pages = []             # bodies returned by client.get, in order
        self.urls = []
        self.limits = types.SimpleNamespace(get=lambda: types.SimpleNamespace(
            absolute=[types.SimpleNamespace(name=k, value=v)
                      for k, v in self.absolute.items()]))
        self.client = types.SimpleNamespace(get=self._get)

    def _get(self, url):
        self.urls.append(url)
        return None, (self.pages.pop(0) if self.pages else {"servers": []})


@pytest.fixture
def backend(conf):
    conf.set_override("password", SECRET, group="openstack")
    conf.set_override("owner", "unit", group="openstack")
    conf.set_override("flavor_map", {"m1.tiny": "r.tiny", "m1.small": "r.small"},
                      group="openstack")
    b = openstack.OpenStackBackend(conf)
    b.clock = Clock()
    b.sleep = lambda s: None
    b._nova = StubNova()
    b._flavors = {
        "1": types.SimpleNamespace(id="1", name="r.tiny", vcpus=1, ram=512),
        "2": types.SimpleNamespace(id="2", name="r.small", vcpus=2, ram=2048),
    }
    b._flavor_ids = {"m1.tiny": "1", "m1.small": "2"}
    return b


def raised(backend, exc, create=False):
    with pytest.raises(exception.CellAgentError) as err:
        with backend._translate_errors("doing it", instance_uuid="u-1", create=create):
            raise exc
    return err.value


# -- error translation ------------------------------------------------------------

@pytest.mark.parametrize("exc, expected, retryable", [
    (nova_exc.NotFound(404, "Instance x could not be found."),
     exception.InstanceNotFound, False),
    (nova_exc.Forbidden(403, "Policy doesn't allow it"), exception.BackendAuthError, False),
    (nova_exc.Unauthorized(401, "The request you have made requires authentication."),
     exception.BackendAuthError, False),
    (nova_exc.Conflict(409, "Cannot 'reboot' instance while it is in task_state "
                       "powering-off"), exception.BackendError, True),
    (nova_exc.RateLimit(429, "Rate limit"), exception.BackendUnavailable, True),
    (nova_exc.ClientException(503, "Service Unavailable"), exception.BackendUnavailable,
     True),
    (nova_exc.BadRequest(400, "Invalid flavorRef"), exception.BackendError, False),
    (ks_exc.ConnectFailure("Unable to establish connection to http://127.0.0.1:1"),
     exception.BackendUnavailable, True),
    (ks_exc.ConnectTimeout("timed out"), exception.BackendUnavailable, True),
    (ks_exc.ServiceUnavailable(), exception.BackendUnavailable, True),
    (ks_exc.EndpointNotFound("no compute endpoint"), exception.ConfigurationError, None),
])
def test_translation(backend, exc, expected, retryable):
    err = raised(backend, exc)
    assert type(err) is expected
    if retryable is not None:
        assert err.retryable is retryable


def test_quota_403_on_create_holds_capacity_at_zero(backend):
    backend._nova.absolute = {"maxTotalInstances": 10, "totalInstancesUsed": 0}
    assert backend.get_capacity([TINY]).max_units["m1.tiny"] == 10
    err = raised(backend, nova_exc.Forbidden(
        403, "Quota exceeded for instances: Requested 1, but already used 10 of 10"),
        create=True)
    assert isinstance(err, exception.InsufficientCapacity)
    cap = backend.get_capacity([TINY])
    assert cap.max_units["m1.tiny"] == 0 and cap.ram_free_mb == 0
    backend.clock.now += openstack._QUOTA_HOLD + 1
    assert backend.get_capacity([TINY]).max_units["m1.tiny"] == 10


def test_quota_403_outside_create_does_not_hold(backend):
    err = raised(backend, nova_exc.Forbidden(403, "Quota exceeded for cores"))
    assert isinstance(err, exception.InsufficientCapacity)
    assert backend._quota_hit is None


def test_password_never_in_messages(backend):
    for exc in (nova_exc.ClientException(500, "boom with %s inside" % SECRET),
                ks_exc.ConnectFailure("cannot reach http://u:%s@host" % SECRET),
                ks_exc.Unauthorized("bad password %s" % SECRET)):
        err = raised(backend, exc)
        assert SECRET not in str(err) and "***" in str(err)


def test_our_own_errors_pass_through(backend):
    mine = exception.InsufficientCapacity(backend="openstack", reason="budget")
    assert raised(backend, mine) is mine


def test_conflict_in_a_task_state_is_retried(backend):
    answers = [nova_exc.Conflict(409, "in task_state rebooting"), "done"]

    def call():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
    assert backend._retry_conflicts(call) == "done"
    with pytest.raises(nova_exc.Conflict):
        backend._retry_conflicts(lambda: (_ for _ in ()).throw(
            nova_exc.Conflict(409, "Instance is locked")))


# -- changes-since -----------------------------------------------------------------

def server(sid, updated, status="ACTIVE", owner="unit", uuid="u-%s", **extra):
    return dict({"id": sid, "name": "cellagent-" + (uuid % sid), "status": status,
                 "updated": updated, "flavor": {"vcpus": 1, "ram": 512,
                                                "original_name": "r.tiny"},
                 "metadata": {openstack.OWNER_KEY: owner,
                              openstack.UUID_KEY: uuid % sid}}, **extra)


def test_changes_since_is_the_clouds_newest_time_less_the_margin(backend):
    nova = backend._nova
    nova.pages = [{"servers": [server("a", "2030-01-01T10:00:00Z"),
                               server("b", "2030-01-01T10:00:07Z"),
                               server("x", "2030-01-01T11:00:00Z", owner="someone-else")]}]
    backend._sync(full=True)
    assert "changes-since" not in nova.urls[-1]
    assert set(backend._servers) == {"a", "b"}      # not another owner's
    backend._sync()
    # 10:00:07, the newest time of OUR servers, less 5 s; our clock plays no part.
    assert "changes-since=2030-01-01T10%3A00%3A02Z" in nova.urls[-1]
    assert openstack._SKEW_MARGIN == 5.0


def test_a_deleted_server_without_metadata_is_ours_if_we_knew_it(backend):
    nova = backend._nova
    nova.pages = [{"servers": [server("a", "2030-01-01T10:00:00Z")]},
                  {"servers": [dict(server("a", "2030-01-01T10:01:00Z", status="DELETED"),
                                    metadata={}),
                               dict(server("z", "2030-01-01T10:01:00Z", status="DELETED"),
                                    metadata={})]}]
    backend._sync(full=True)
    backend._sync()
    assert backend._servers == {} and backend._deleted == {"a"}


def test_paging_follows_servers_links(backend):
    nova = backend._nova
    nova.pages = [{"servers": [server("a", "2030-01-01T10:00:00Z")], "servers_links": [
        {"rel": "next", "href": "http://peer/compute/v2.1/servers/detail?marker=a"}]},
        {"servers": [server("b", "2030-01-01T10:00:00Z")]}]
    assert [s["id"] for s in backend._list({"name": "^x"})] == ["a", "b"]
    assert nova.urls[-1] == "/servers/detail?marker=a"


# -- capacity -------------------------------------------------------------------------

def test_capacity_from_limits(backend):
    backend._nova.absolute = {
        "maxTotalInstances": 10, "totalInstancesUsed": 4,
        "maxTotalCores": 20, "totalCoresUsed": 15,
        "maxTotalRAMSize": 8192, "totalRAMUsed": 2048}
    cap = backend.get_capacity([TINY, SMALL])
    # tiny: min(6 instances, 5 cores, 12 RAM) = 5; small: min(6, 2, 3) = 2
    assert cap.max_units == {"m1.tiny": 5, "m1.small": 2}
    assert (cap.ram_total_mb, cap.ram_free_mb) == (8192, 6144)
    assert (cap.vcpus_total, cap.vcpus_used) == (20, 15)
    assert cap.disk_free_mb == max(5 * TINY.disk_mb, 2 * SMALL.disk_mb)


def test_unlimited_quota_is_capped_by_the_budget(backend):
    backend.conf.set_override("max_instances", 3, group="openstack")
    backend.conf.set_override("max_vcpus", 4, group="openstack")
    backend._nova.absolute = {"maxTotalInstances": -1, "maxTotalCores": -1,
                              "maxTotalRAMSize": -1}
    backend._servers = {"a": server("a", "2030-01-01T10:00:00Z")}     # 1 vCPU used
    cap = backend.get_capacity([TINY, SMALL])
    # instances: 3 - 1 = 2; vCPUs: 4 - 1 = 3 -> tiny 2, small 1
    assert cap.max_units == {"m1.tiny": 2, "m1.small": 1}
    assert (cap.vcpus_total, cap.vcpus_used) == (4, 1)


def test_spend_cap(backend):
    conf = backend.conf
    conf.set_override("max_cost_per_hour", 0.1, group="openstack")
    backend._prices = {"r.tiny": 0.02, "r.small": 0.08}
    backend._nova.absolute = {"maxTotalInstances": -1}
    backend._servers = {"a": server("a", "2030-01-01T10:00:00Z")}     # 0.02 spent
    assert backend.get_capacity([TINY, SMALL]).max_units == {"m1.tiny": 4, "m1.small": 1}
    backend._check_budget("2", "u-new")       # 0.02 + 0.08 is the cap exactly: fits
    backend._servers["b"] = server("b", "2030-01-01T10:00:00Z")
    backend._servers["b"]["flavor"]["original_name"] = "r.small"        # 0.10 spent
    assert backend.get_capacity([TINY, SMALL]).max_units == {"m1.tiny": 0, "m1.small": 0}
    with pytest.raises(exception.InsufficientCapacity, match="spend cap"):
        backend._check_budget("1", "u-new")


def test_unreachable_cloud_capacity_raises_retryable(backend):
    def down():
        raise ks_exc.ConnectFailure("Connection refused")
    backend._nova.limits = types.SimpleNamespace(get=down)
    with pytest.raises(exception.BackendUnavailable):
        backend.get_capacity([TINY])


# -- a resize Nova gave up on --------------------------------------------------------------

def test_resize_outcome(backend):
    base = server("a", "2030-01-01T10:00:00Z")
    outcome = backend._resize_outcome
    assert outcome(dict(base, status="RESIZE", **{"OS-EXT-STS:task_state": "resize_prep"}),
                   "r.small") is None
    assert outcome(dict(base, status="RESIZE",
                        **{"OS-EXT-STS:task_state": "resize_migrating"}), "r.small") == "accepted"
    assert outcome(dict(base, status="VERIFY_RESIZE"), "r.small") == "accepted"
    done = dict(base, flavor={"original_name": "r.small", "vcpus": 2})
    assert outcome(done, "r.small") == "accepted"
    assert outcome(base, "r.small") == "failed"        # settled, old flavor
    assert outcome(dict(base, status="ERROR"), "r.small") == "failed"


def test_poll_reports_a_resize_rolled_back_as_a_failure_once(backend):
    nova = backend._nova
    nova.pages = [{"servers": [server("a", "2030-01-01T10:00:00Z")]}]
    backend._sync(full=True)
    backend._full_at = backend.clock()
    backend._resizing["a"] = {"target": "r.small"}
    backend._resize_fault = lambda server_id: "No valid host was found."
    nova.pages = [{"servers": [server("a", "2030-01-01T10:00:09Z")]}]
    ref = InstanceRef(instance_uuid="u-a", backend_id="a")
    info = backend.poll([ref])["u-a"]
    assert info.state is InstanceState.ERROR
    assert "resize to r.small failed" in info.fault and "No valid host" in info.fault
    assert "a" not in backend._resizing
    assert backend.poll([ref])["u-a"].state is InstanceState.RUNNING


class Answers:
    """``servers.get`` answers in order (the last repeats); an exception is raised."""

    def __init__(self, *answers):
        self.answers = list(answers)

    def __call__(self, server_id):
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return types.SimpleNamespace(to_dict=lambda: answer)


def resizing(backend, *answers, events=()):
    base = server("a", "2030-01-01T10:00:00Z")
    gets = Answers(base, *[a if isinstance(a, Exception) else dict(base, **a)
                           for a in answers])
    backend._nova.servers = types.SimpleNamespace(get=gets, resize=lambda sid, fid: None)
    action = {"action": "resize", "request_id": "req-1", "message": "Error"}
    backend._nova.instance_action = types.SimpleNamespace(
        list=lambda sid: [types.SimpleNamespace(to_dict=lambda: action)],
        get=lambda sid, rid: types.SimpleNamespace(to_dict=lambda: dict(
            action, events=list(events))))
    return backend.resize(InstanceRef(instance_uuid="u-a", backend_id="a"), SMALL)


PREP = {"status": "RESIZE", "OS-EXT-STS:task_state": "resize_prep"}


def test_resize_without_a_host_raises_insufficient_capacity(backend):
    with pytest.raises(exception.InsufficientCapacity, match="No valid host") as err:
        resizing(backend, PREP, PREP, {}, events=[
            {"event": "conductor_migrate_server", "result": "Error",
             "details": "No valid host was found. There are not enough hosts available."}])
    assert "r.small" in str(err.value) and "flavor r.tiny" in str(err.value)
    assert "a" not in backend._resizing


def test_resize_failed_event_read_again_until_finished(backend):
    events = []
    backend.sleep = lambda s: events.append(
        {"event": "conductor_migrate_server", "result": "Error", "details": "boom"})
    with pytest.raises(exception.BackendError, match="conductor_migrate_server: boom") as err:
        resizing(backend, PREP, {}, events=events)
    assert not isinstance(err.value, exception.InsufficientCapacity)
    assert not err.value.retryable


def test_resize_with_a_host_is_pending_and_left_to_poll(backend):
    info = resizing(backend, PREP, {"status": "RESIZE",
                                    "OS-EXT-STS:task_state": "resize_migrating"})
    assert info.state is InstanceState.PENDING
    assert backend._resizing == {"a": {"target": "r.small"}}


def test_resize_watch_lost_is_pending(backend):
    info = resizing(backend, PREP, ks_exc.ConnectFailure("Connection refused"))
    assert info.state is InstanceState.PENDING and "a" in backend._resizing
