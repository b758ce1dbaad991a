"""BackendContract: the behaviour every backend must show, written once.

Mix it into a pytest class per backend (fake now, ec2 under moto and
openstack with novaclient stubbed later), in the manner of libcloud's
``TestCaseMixin`` and huey's ``StorageTests``::

    class TestFakeBackend(BackendContract):
        def make_backend(self, tmp_path):
            ...return a started backend...

Hooks a backend's test class provides or overrides:

* ``make_backend(self, tmp_path)`` (required): a *started* backend with
  room for a few ``FLAVOR`` instances; ``tmp_path`` is pytest's per-test
  directory (or None when the caller has none).
* ``settle(self, backend, ref)``: wait (or advance a fake clock) until the
  instance leaves its transitional state, and return its ``InstanceInfo``
  (state DELETED once gone). The default polls with ``wait_for``.
* ``make_request(self, **overrides)``: a ``BuildRequest`` the backend can
  launch (override ``FLAVOR``/``IMAGE`` or this for provider-specific ids).
* ``UNKNOWN_BACKEND_ID``: a well-formed backend id that does not exist, or
  None to skip the checks that need one.
"""

import uuid

import pytest

from cellagent import exception
from cellagent.objects import BuildRequest
from cellagent.objects import Capacity
from cellagent.objects import Flavor
from cellagent.objects import InstanceInfo
from cellagent.objects import InstanceRef
from cellagent.objects import InstanceState
from cellagent.objects import RebootKind
from tests.unit.helpers import wait_for  # noqa: F401 - the contract's tests use it


def ref_of(info, token=""):
    return InstanceRef(instance_uuid=info.instance_uuid, backend_id=info.backend_id,
                       launch_token=token)


class BackendContract:
    FLAVOR = Flavor(name="m1.small", memory_mb=2048, vcpus=1, root_gb=20)
    IMAGE = {"id": "00000000-0000-0000-0000-00000000c1a0", "name": "cirros"}
    UNKNOWN_BACKEND_ID = None
    SETTLE_TIMEOUT = 10.0

    # -- hooks -------------------------------------------------------------

    def make_backend(self, tmp_path):
        raise NotImplementedError

    def settle(self, backend, ref):
        def settled():
            info = backend.poll([ref])[ref.instance_uuid]
            return None if info.state.is_transitional else info
        return wait_for(settled, timeout=self.SETTLE_TIMEOUT)

    def make_request(self, **overrides):
        instance_uuid = overrides.pop("instance_uuid", None) or str(uuid.uuid4())
        fields = dict(instance_uuid=instance_uuid, name="contract-%s" % instance_uuid[:8],
                      flavor=self.FLAVOR, image=dict(self.IMAGE),
                      launch_token="%s-1" % instance_uuid, project_id="p1", user_id="u1")
        fields.update(overrides)
        return BuildRequest(**fields)

    # -- fixtures and helpers ----------------------------------------------

    @pytest.fixture
    def backend(self, tmp_path):
        backend = self.make_backend(tmp_path)
        yield backend
        backend.stop()

    def spawn_running(self, backend, **overrides):
        request = self.make_request(**overrides)
        info = backend.spawn(request)
        ref = ref_of(info, request.launch_token)
        assert info.instance_uuid == request.instance_uuid
        return request, ref, self.settle(backend, ref)

    def room(self, capacity):
        return (capacity.ram_free_mb, capacity.disk_free_mb,
                capacity.max_units.get(self.FLAVOR.name, float("inf")))

    # -- spawn -------------------------------------------------------------

    def test_spawn_returns_id_and_reaches_running(self, backend):
        request = self.make_request()
        info = backend.spawn(request)
        assert isinstance(info, InstanceInfo)
        assert info.backend_id
        assert info.state in (InstanceState.PENDING, InstanceState.RUNNING)
        settled = self.settle(backend, ref_of(info))
        assert settled.state is InstanceState.RUNNING
        assert settled.backend_id == info.backend_id
        assert settled.instance_uuid == request.instance_uuid
        assert settled.addresses
        assert all(a.address and a.version in (4, 6) for a in settled.addresses)

    def test_spawn_is_idempotent(self, backend):
        request = self.make_request()
        first = backend.spawn(request)
        second = backend.spawn(request)
        assert second.backend_id == first.backend_id
        ours = [i for i in backend.list_instances()
                if i.instance_uuid == request.instance_uuid]
        assert [i.backend_id for i in ours] == [first.backend_id]

    def test_spawn_that_cannot_fit_raises_backend_error(self, backend):
        huge = Flavor(name="m1.enormous", memory_mb=10 ** 9, vcpus=10 ** 5, root_gb=10 ** 6)
        request = self.make_request(flavor=huge)
        with pytest.raises(exception.BackendError):
            backend.spawn(request)
        assert request.instance_uuid not in {
            i.instance_uuid for i in backend.list_instances()}

    # -- destroy -----------------------------------------------------------

    def test_destroy_then_get_info_raises_not_found(self, backend):
        _, ref, _ = self.spawn_running(backend)
        assert backend.destroy(ref) is None
        assert self.settle(backend, ref).state is InstanceState.DELETED
        with pytest.raises(exception.InstanceNotFound):
            backend.get_info(ref)

    def test_destroy_twice_is_fine(self, backend):
        _, ref, _ = self.spawn_running(backend)
        backend.destroy(ref)
        backend.destroy(ref)
        self.settle(backend, ref)
        backend.destroy(ref)

    def test_destroy_without_backend_id_finds_by_uuid(self, backend):
        _, ref, _ = self.spawn_running(backend)
        backend.destroy(InstanceRef(instance_uuid=ref.instance_uuid))
        assert self.settle(backend, ref).state is InstanceState.DELETED
        with pytest.raises(exception.InstanceNotFound):
            backend.get_info(ref)

    def test_destroy_of_unknown_instance_succeeds(self, backend):
        backend.destroy(InstanceRef(instance_uuid=str(uuid.uuid4())))
        if self.UNKNOWN_BACKEND_ID:
            backend.destroy(InstanceRef(instance_uuid=str(uuid.uuid4()),
                                        backend_id=self.UNKNOWN_BACKEND_ID))

    # -- power and reboot --------------------------------------------------

    @pytest.mark.parametrize("kind", [RebootKind.SOFT, RebootKind.HARD])
    def test_reboot_ends_running(self, backend, kind):
        _, ref, _ = self.spawn_running(backend)
        info = backend.reboot(ref, kind)
        assert info.state in (InstanceState.REBOOTING, InstanceState.RUNNING)
        assert self.settle(backend, ref).state is InstanceState.RUNNING

    def test_power_off_then_on(self, backend):
        _, ref, _ = self.spawn_running(backend)
        info = backend.power_off(ref)
        assert info.state in (InstanceState.STOPPING, InstanceState.STOPPED)
        assert self.settle(backend, ref).state is InstanceState.STOPPED
        info = backend.power_on(ref)
        assert info.state in (InstanceState.STARTING, InstanceState.RUNNING)
        assert self.settle(backend, ref).state is InstanceState.RUNNING

    # -- queries -----------------------------------------------------------

    def test_poll_many_in_one_call_and_missing_is_deleted(self, backend):
        _, ref1, _ = self.spawn_running(backend)
        _, ref2, _ = self.spawn_running(backend)
        missing = InstanceRef(instance_uuid=str(uuid.uuid4()),
                              backend_id=self.UNKNOWN_BACKEND_ID or "")
        result = backend.poll([ref1, ref2, missing])
        assert set(result) == {ref1.instance_uuid, ref2.instance_uuid, missing.instance_uuid}
        assert result[ref1.instance_uuid].state is InstanceState.RUNNING
        assert result[ref1.instance_uuid].backend_id == ref1.backend_id
        assert result[ref2.instance_uuid].state is InstanceState.RUNNING
        assert result[missing.instance_uuid].state is InstanceState.DELETED
        assert backend.poll([]) == {}

    def test_list_instances_includes_ours_with_uuid(self, backend):
        _, ref, _ = self.spawn_running(backend)
        listed = {i.instance_uuid: i for i in backend.list_instances()}
        assert ref.instance_uuid in listed
        assert listed[ref.instance_uuid].backend_id == ref.backend_id
        backend.destroy(ref)
        self.settle(backend, ref)
        assert ref.instance_uuid not in {i.instance_uuid for i in backend.list_instances()}

    def test_capacity_shrinks_after_spawn_and_grows_back(self, backend):
        before = backend.get_capacity([self.FLAVOR])
        assert isinstance(before, Capacity)
        assert 0 <= before.ram_free_mb <= before.ram_total_mb
        assert 0 <= before.disk_free_mb <= before.disk_total_mb
        _, ref, _ = self.spawn_running(backend)
        during = backend.get_capacity([self.FLAVOR])
        assert all(d <= b for d, b in zip(self.room(during), self.room(before), strict=True))
        assert self.room(during) != self.room(before)
        backend.destroy(ref)
        self.settle(backend, ref)
        assert self.room(backend.get_capacity([self.FLAVOR])) == self.room(before)

    def test_console_output(self, backend):
        _, ref, _ = self.spawn_running(backend)
        if not backend.capabilities.get("supports_console_output"):
            with pytest.raises(exception.BackendError):
                backend.get_console_output(ref)
            return
        output = backend.get_console_output(ref)
        assert isinstance(output, str) and output.strip()
        assert len(backend.get_console_output(ref, tail_length=1).splitlines()) <= 1

    def test_get_info_of_unknown_raises_not_found(self, backend):
        with pytest.raises(exception.InstanceNotFound):
            backend.get_info(InstanceRef(instance_uuid=str(uuid.uuid4())))
        if self.UNKNOWN_BACKEND_ID:
            with pytest.raises(exception.InstanceNotFound):
                backend.get_info(InstanceRef(instance_uuid=str(uuid.uuid4()),
                                             backend_id=self.UNKNOWN_BACKEND_ID))

    @pytest.mark.parametrize("op", ["reboot", "power_off", "power_on"])
    def test_operation_on_unknown_instance_raises_not_found(self, backend, op):
        ref = InstanceRef(instance_uuid=str(uuid.uuid4()))
        args = (RebootKind.HARD,) if op == "reboot" else ()
        with pytest.raises(exception.InstanceNotFound):
            getattr(backend, op)(ref, *args)

    def test_only_backend_errors_escape(self, backend):
        ref = InstanceRef(instance_uuid=str(uuid.uuid4()),
                          backend_id=self.UNKNOWN_BACKEND_ID or "")
        calls = [
            lambda: backend.get_info(ref),
            lambda: backend.reboot(ref, RebootKind.SOFT),
            lambda: backend.reboot(ref, RebootKind.HARD),
            lambda: backend.power_off(ref),
            lambda: backend.power_on(ref),
            lambda: backend.get_console_output(ref),
            lambda: backend.destroy(ref),
            lambda: backend.poll([ref]),
        ]
        for call in calls:
            try:
                call()
            except exception.BackendError:
                pass
        # Anything else propagates and fails the test.
