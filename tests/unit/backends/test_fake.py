"""FakeBackend: the backend contract, plus what only the fake promises."""

import ipaddress
import json
import os
import threading
import uuid

import pytest
from oslo_config import cfg

from cellagent import exception
from cellagent.backends import base
from cellagent.backends import fake
from cellagent.backends import load_backend
from cellagent.conf import backend as backend_conf
from cellagent.objects import Flavor
from cellagent.objects import InstanceInfo
from cellagent.objects import InstanceRef
from cellagent.objects import InstanceState
from cellagent.objects import RebootKind
from tests.unit.backends.contract import BackendContract
from tests.unit.backends.contract import ref_of
from tests.unit.backends.contract import wait_for

FLAVOR = BackendContract.FLAVOR       # 2048 MB, 1 vcpu, 20 GB


def make_conf(driver="fake", **fake_opts):
    conf = cfg.ConfigOpts()
    backend_conf.register_opts(conf)
    conf(args=[], project="cellagent", default_config_files=[])
    conf.set_override("driver", driver, group="backend")
    for name, value in fake_opts.items():
        conf.set_override(name, value, group="fake")
    return conf


def started(cls=fake.FakeBackend, clock=None, **fake_opts):
    backend = cls(make_conf(**fake_opts))
    if clock is not None:
        backend.clock = clock
    backend.start()
    return backend


class FakeClock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def request(instance_uuid=None, token=None, flavor=FLAVOR):
    return BackendContract().make_request(
        **{k: v for k, v in dict(instance_uuid=instance_uuid, launch_token=token,
                                 flavor=flavor).items() if v is not None})


class TestFakeContract(BackendContract):
    UNKNOWN_BACKEND_ID = "fake-00000000"

    def make_backend(self, tmp_path):
        return started()


class TestFakeContractWithDelays(BackendContract):
    """Every operation goes through a transitional state first."""

    UNKNOWN_BACKEND_ID = "fake-00000000"

    def make_backend(self, tmp_path):
        return started(spawn_delay=0.02, reboot_delay=0.02, stop_delay=0.02,
                       start_delay=0.02, delete_delay=0.02)


class TestFakeContractWithCloudFile(BackendContract):
    UNKNOWN_BACKEND_ID = "fake-00000000"

    def make_backend(self, tmp_path):
        return started(cloud_file=str(tmp_path / "cloud.json"))


class TestCapacity:
    def test_ram_exhaustion(self):
        backend = started(ram_mb=4096)
        backend.spawn(request())
        backend.spawn(request())
        req = request()
        with pytest.raises(exception.InsufficientCapacity) as err:
            backend.spawn(req)
        assert not err.value.retryable
        assert "ram_mb" in str(err.value)
        assert backend.creates[req.instance_uuid] == 0
        assert len(backend.list_instances()) == 2
        assert backend.get_capacity([FLAVOR]).ram_free_mb == 0

    @pytest.mark.parametrize("opts", [{"max_instances": 1}, {"vcpus": 1}, {"disk_gb": 20}])
    def test_other_limits(self, opts):
        backend = started(**opts)
        backend.spawn(request())
        with pytest.raises(exception.InsufficientCapacity):
            backend.spawn(request())
        if "disk_gb" not in opts:
            assert backend.get_capacity([FLAVOR]).max_units[FLAVOR.name] == 0

    def test_capacity_figures(self):
        backend = started(ram_mb=8192, disk_gb=100, vcpus=3, max_instances=10)
        backend.spawn(request())
        cap = backend.get_capacity([FLAVOR, Flavor("tiny", 512, 0, 1)])
        assert (cap.ram_total_mb, cap.ram_free_mb) == (8192, 6144)
        assert (cap.disk_total_mb, cap.disk_free_mb) == (102400, 102400 - 20 * 1024)
        # vcpus: 2 free; the vcpu-less flavor is limited by max_instances only.
        assert cap.max_units == {FLAVOR.name: 2, "tiny": 9}

    def test_new_launch_token_replaces_even_when_full(self):
        backend = started(ram_mb=2048)
        first = backend.spawn(request("u-1", token="u-1-1"))
        second = backend.spawn(request("u-1", token="u-1-2"))
        assert second.backend_id != first.backend_id
        assert backend.creates["u-1"] == 2
        assert [i.backend_id for i in backend.list_instances()] == [second.backend_id]
        with pytest.raises(exception.InstanceNotFound):
            backend.get_info(InstanceRef("u-1", first.backend_id))


class TestDelays:
    @pytest.mark.parametrize("op, delay_opt, during, after", [
        ("reboot_soft", "reboot_delay", InstanceState.REBOOTING, InstanceState.RUNNING),
        ("reboot_hard", "reboot_delay", InstanceState.REBOOTING, InstanceState.RUNNING),
        ("power_off", "stop_delay", InstanceState.STOPPING, InstanceState.STOPPED),
        ("destroy", "delete_delay", InstanceState.DELETING, InstanceState.DELETED),
    ])
    def test_transition_flips_on_read_after_delay(self, op, delay_opt, during, after):
        clock = FakeClock()
        backend = started(clock=clock, **{delay_opt: 30.0})
        ref = ref_of(backend.spawn(request()))
        if op.startswith("reboot"):
            backend.reboot(ref, RebootKind[op.split("_")[1].upper()])
        else:
            getattr(backend, op)(ref)
        clock.advance(29.9)
        assert backend.poll([ref])[ref.instance_uuid].state is during
        clock.advance(0.2)
        assert backend.poll([ref])[ref.instance_uuid].state is after

    def test_spawn_and_start_delays(self):
        clock = FakeClock()
        backend = started(clock=clock, spawn_delay=5.0, start_delay=5.0)
        info = backend.spawn(request())
        ref = ref_of(info)
        assert info.state is InstanceState.PENDING
        assert not info.launched_at
        clock.advance(5.0)
        info = backend.get_info(ref)
        assert info.state is InstanceState.RUNNING and info.launched_at
        backend.power_off(ref)
        assert backend.power_on(ref).state is InstanceState.STARTING
        clock.advance(5.0)
        assert backend.get_info(ref).state is InstanceState.RUNNING

    def test_real_time_spawn_delay(self):
        backend = started(spawn_delay=0.05)
        ref = ref_of(backend.spawn(request()))
        assert backend.get_info(ref).state is InstanceState.PENDING
        wait_for(lambda: backend.get_info(ref).state is InstanceState.RUNNING, timeout=2)

    def test_deleting_instance_still_holds_capacity(self):
        clock = FakeClock()
        backend = started(clock=clock, delete_delay=10.0, ram_mb=2048)
        ref = ref_of(backend.spawn(request()))
        backend.destroy(ref)
        assert backend.get_capacity([FLAVOR]).ram_free_mb == 0
        assert [i.state for i in backend.list_instances()] == [InstanceState.DELETING]
        clock.advance(10.0)
        assert backend.get_capacity([FLAVOR]).ram_free_mb == 2048

    def test_operations_refused_while_transitional_are_retryable(self):
        clock = FakeClock()
        backend = started(clock=clock, spawn_delay=10.0)
        ref = ref_of(backend.spawn(request()))
        with pytest.raises(exception.BackendError) as err:
            backend.power_off(ref)
        assert base.is_retryable(err.value)

    def test_soft_reboot_of_stopped_instance_is_refused_hard_starts_it(self):
        backend = started()
        ref = ref_of(backend.spawn(request()))
        backend.power_off(ref)
        with pytest.raises(exception.BackendError) as err:
            backend.reboot(ref, RebootKind.SOFT)
        assert not base.is_retryable(err.value)
        assert backend.reboot(ref, RebootKind.HARD).state is InstanceState.RUNNING

    def test_soft_reboot_falls_back_to_hard_without_capability(self):
        class NoSoft(fake.FakeBackend):
            capabilities = dict(fake.FakeBackend.capabilities, supports_soft_reboot=False)

        backend = started(NoSoft, reboot_delay=10.0)
        ref = ref_of(backend.spawn(request()))
        backend.power_off(ref)
        # SOFT would be refused on a stopped instance; as HARD it is accepted.
        assert backend.reboot(ref, RebootKind.SOFT).state is InstanceState.REBOOTING
        assert backend._instances[ref.backend_id]["status"] == "hard_rebooting"


class TestCloudFile:
    def test_restart_does_not_create_twice(self, tmp_path):
        path = tmp_path / "cloud.json"
        req = request()
        first = started(cloud_file=str(path))
        info = first.spawn(req)
        # No stop(): the agent was SIGKILLed before it stored the backend id.
        second = started(cloud_file=str(path))
        again = second.spawn(req)
        assert again.backend_id == info.backend_id
        assert second.creates[req.instance_uuid] == 1
        data = json.loads(path.read_text())
        assert data["creates"] == {req.instance_uuid: 1}
        assert [r["backend_id"] for r in data["instances"]] == [info.backend_id]
        assert os.listdir(tmp_path) == ["cloud.json"]     # no temp file left behind

    def test_deletes_and_pending_transitions_survive(self, tmp_path):
        path = str(tmp_path / "cloud.json")
        clock = FakeClock()
        first = started(cloud_file=path, clock=clock, spawn_delay=5.0)
        kept = ref_of(first.spawn(request()))
        gone = ref_of(first.spawn(request()))
        first.destroy(gone)
        second = started(cloud_file=path, clock=clock, spawn_delay=5.0)
        assert second.get_info(kept).state is InstanceState.PENDING
        clock.advance(5.0)
        assert second.get_info(kept).state is InstanceState.RUNNING
        assert second.poll([gone])[gone.instance_uuid].state is InstanceState.DELETED
        assert second.get_capacity([FLAVOR]).ram_free_mb == 20480 - 2048

    def test_unreadable_file_fails_start(self, tmp_path):
        path = tmp_path / "cloud.json"
        path.write_text("{not json")
        with pytest.raises(exception.BackendError):
            started(cloud_file=str(path))

    def test_unwritable_file_raises_backend_error(self, tmp_path):
        backend = started(cloud_file=str(tmp_path / "missing-dir" / "cloud.json"))
        with pytest.raises(exception.BackendError):
            backend.spawn(request())

    def test_stop_then_start_keeps_memory_cloud(self):
        backend = started()
        ref = ref_of(backend.spawn(request()))
        backend.stop()
        with pytest.raises(exception.BackendError):
            backend.get_info(ref)
        backend.start()
        assert backend.get_info(ref).state is InstanceState.RUNNING


class TestFailingSubclasses:
    def test_failing_spawn(self):
        backend = started(fake.FailingSpawnBackend)
        req = request()
        with pytest.raises(exception.BackendError) as err:
            backend.spawn(req)
        assert type(err.value) is exception.BackendError
        assert not base.is_retryable(err.value)
        assert "on purpose" in str(err.value) and req.instance_uuid in str(err.value)
        assert backend.list_instances() == []
        assert backend.creates[req.instance_uuid] == 0

    def test_pending_forever(self):
        clock = FakeClock()
        backend = started(fake.PendingForeverBackend, clock=clock)
        ref = ref_of(backend.spawn(request()))
        clock.advance(10 ** 6)
        assert backend.get_info(ref).state is InstanceState.PENDING
        backend.destroy(ref)
        assert backend.poll([ref])[ref.instance_uuid].state is InstanceState.DELETED

    def test_error_on_boot(self):
        clock = FakeClock()
        backend = started(fake.ErrorOnBootBackend, clock=clock, spawn_delay=1.0)
        info = backend.spawn(request())
        assert info.state is InstanceState.PENDING
        clock.advance(1.0)
        info = backend.get_info(ref_of(info))
        assert info.state is InstanceState.ERROR
        assert info.fault == "No valid host was found"
        assert info.addresses == []

    def test_flaky_fails_first_calls_of_each_operation(self):
        backend = started(fake.FlakyBackend)
        req = request()
        for _ in range(fake.FlakyBackend.failures):
            with pytest.raises(exception.BackendUnavailable) as err:
                backend.spawn(req)
            assert base.is_retryable(err.value)
        ref = ref_of(backend.spawn(req))
        assert backend.creates[req.instance_uuid] == 1
        for _ in range(fake.FlakyBackend.failures):
            with pytest.raises(exception.BackendUnavailable):
                backend.get_info(ref)
        assert backend.get_info(ref).state is InstanceState.RUNNING


class TestFakeDetails:
    def test_poll_is_one_call_for_many_instances(self):
        backend = started()
        refs = [ref_of(backend.spawn(request())) for _ in range(5)]
        result = backend.poll(refs)
        assert len(result) == 5
        assert backend.calls["poll"] == 1
        assert backend.calls["get_info"] == 0
        assert backend.calls["spawn"] == 5 and backend.calls["start"] == 1

    def test_addresses(self):
        uuid_ = str(uuid.uuid4())
        info = started().spawn(request(uuid_))
        fixed, floating = info.addresses
        assert ipaddress.ip_address(fixed.address) in ipaddress.ip_network("10.20.0.0/16")
        assert ipaddress.ip_address(floating.address) in ipaddress.ip_network("203.0.113.0/24")
        assert (fixed.kind, floating.kind, fixed.version) == ("fixed", "floating", 4)
        assert fixed.mac.startswith("fa:16:3e:") and len(fixed.mac) == 17
        # Deterministic per instance uuid, in another cloud too.
        assert started().spawn(request(uuid_)).addresses == info.addresses
        only_fixed = started(public_ips=False).spawn(request(uuid_)).addresses
        assert [a.kind for a in only_fixed] == ["fixed"]

    def test_addresses_are_unique(self):
        backend = started(ram_mb=10 ** 6, vcpus=1000, disk_gb=10 ** 5)
        infos = [backend.spawn(request(flavor=Flavor("t", 1, 0, 0))) for _ in range(300)]
        fixed = [i.addresses[0].address for i in infos]
        assert len(set(fixed)) == 300
        # Only 254 floating addresses exist; the rest get a fixed one only.
        floating = [a.address for i in infos for a in i.addresses if a.kind == "floating"]
        assert len(floating) == len(set(floating)) == 254

    def test_console_output(self):
        backend = started(console_lines=7)
        req = request()
        ref = ref_of(backend.spawn(req))
        lines = backend.get_console_output(ref).splitlines()
        assert len(lines) == 7
        assert lines[-1].startswith(req.name) and "login:" in lines[-1]
        assert backend.get_console_output(ref, tail_length=2).splitlines() == lines[-2:]
        assert backend.get_console_output(ref, tail_length=0) == ""
        with pytest.raises(exception.InstanceNotFound):
            backend.get_console_output(InstanceRef(str(uuid.uuid4())))

    def test_calls_before_start_are_refused(self):
        backend = fake.FakeBackend(make_conf())
        with pytest.raises(exception.BackendError):
            backend.spawn(request())

    def test_concurrent_spawns(self):
        backend = started(ram_mb=10 ** 6, vcpus=1000, disk_gb=10 ** 5)
        same = request()
        reqs = [request() for _ in range(32)] + [same] * 8
        errors = []

        def run(req):
            try:
                backend.spawn(req)
            except Exception as exc:    # surfaced by the assert below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(r,)) for r in reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert backend.calls["spawn"] == 40
        assert len(backend.list_instances()) == 33
        assert set(backend.creates.values()) == {1}

    def test_unknown_provider_state_maps_to_unknown(self):
        backend = started()
        assert backend.map_state("levitating") is InstanceState.UNKNOWN
        assert backend.map_state("shutoff") is InstanceState.STOPPED


class TestBaseDefaults:
    class OneByOne(base.Backend):
        name = "one-by-one"
        known = {"u-1": InstanceInfo("b-1", InstanceState.RUNNING, instance_uuid="u-1")}

        def get_info(self, ref):
            try:
                return self.known[ref.instance_uuid]
            except KeyError:
                raise exception.InstanceNotFound(instance_id=ref.instance_uuid) from None

        spawn = destroy = reboot = power_off = power_on = None
        list_instances = get_capacity = None

    def test_default_poll_loops_over_get_info(self):
        backend = self.OneByOne(make_conf())
        result = backend.poll([InstanceRef("u-1", "b-1"), InstanceRef("u-2", "b-2")])
        assert result["u-1"].state is InstanceState.RUNNING
        assert result["u-2"] == InstanceInfo("b-2", InstanceState.DELETED, instance_uuid="u-2")

    def test_default_console_output_is_unsupported(self):
        with pytest.raises(exception.BackendError):
            self.OneByOne(make_conf()).get_console_output(InstanceRef("u-1"))

    def test_is_retryable(self):
        assert base.is_retryable(exception.BackendUnavailable(backend="x"))
        assert base.is_retryable(exception.BackendError(backend="x", retryable=True))
        assert not base.is_retryable(exception.InsufficientCapacity(backend="x"))
        assert not base.is_retryable(ValueError())


class TestLoadBackend:
    def test_loads_by_name_not_started(self):
        backend = load_backend(make_conf("fake"))
        assert type(backend) is fake.FakeBackend
        assert backend.calls == {}

    @pytest.mark.parametrize("name, cls", [
        ("fake-failing-spawn", fake.FailingSpawnBackend),
        ("fake-pending-forever", fake.PendingForeverBackend),
        ("fake-flaky", fake.FlakyBackend),
        ("fake-error-on-boot", fake.ErrorOnBootBackend),
    ])
    def test_failing_fakes_are_entry_points(self, name, cls):
        backend = load_backend(make_conf(name))
        assert type(backend) is cls and backend.name == name

    def test_unknown_name_raises_configuration_error(self):
        with pytest.raises(exception.ConfigurationError) as err:
            load_backend(make_conf("nope"))
        assert "'nope'" in str(err.value)
        assert "fake, fake-error-on-boot" in str(err.value)
