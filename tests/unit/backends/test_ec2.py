"""EC2Backend on in-process moto: the backend contract, plus what only EC2 promises.

Call budgets are counted by ``Ec2Harness`` (botocore hooks of the backend's
own client); faults are injected there too, where they never reach moto.
"""

import base64
import dataclasses
import concurrent.futures
import logging
import sys
import threading
import time
import uuid as uuidlib

import botocore.exceptions
import botocore.retries.standard
import pytest
from moto import mock_aws
from oslo_config import cfg

from cellagent import exception
from cellagent.backends import base
from cellagent.backends import ec2
from cellagent.backends import ec2_keys
from cellagent.backends import ec2_support
from cellagent.backends import load_backend
from cellagent.conf import backend as backend_conf
from cellagent.conf import ec2 as ec2_conf
from cellagent.objects import BuildRequest
from cellagent.objects import Flavor
from cellagent.objects import InstanceRef
from cellagent.objects import InstanceState
from cellagent.objects import RebootKind
from tests.unit import helpers
from tests.unit.backends import ec2_harness
from tests.unit.backends.contract import BackendContract
from tests.unit.backends.contract import ref_of
from tests.unit.backends.contract import wait_for

SMALL = BackendContract.FLAVOR                        # m1.small -> t3.micro (2 vCPUs)
LARGE = Flavor(name="m1.large", memory_mb=8192, vcpus=2, root_gb=80)   # -> m5.large
OWNER = "cell-test"
ACCESS_KEY = "AKIDCELLAGENTTEST123"
SECRET_KEY = "cellagent-test-secret-KEY/never+logged"


@pytest.fixture
def aws(monkeypatch):
    """A fresh in-process moto with one AMI (moto's 1,300 default AMIs are not
    loaded: that costs a second per test); a fresh owner tag, fresh limiters,
    no retry sleeps. Yields the AMI id."""
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setattr(sys.modules[__name__], "OWNER", "cell-%s" % uuidlib.uuid4().hex[:8])
    monkeypatch.setattr(ec2_support, "_LIMITERS", {})
    monkeypatch.setattr(ec2.EC2Backend, "session_factory",
                        staticmethod(ec2_harness.shared_loader_session))
    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount",
                        lambda self, context: 0.001)
    with mock_aws():
        yield ec2_harness.register_ami()


def make_conf(ami, driver="ec2", **opts):
    conf = cfg.ConfigOpts()
    backend_conf.register_opts(conf)
    ec2_conf.register_opts(conf)
    conf(args=[], project="cellagent", default_config_files=[])
    conf.set_override("driver", driver, group="backend")
    values = dict(region="us-east-1", access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                  owner=OWNER, instance_type_map={"m1.small": "t3.micro",
                                                  "m1.large": "m5.large"},
                  image_map={"cirros": ami}, batch_idle=0.0, batch_max=0.0,
                  api_rate=10000.0, api_burst=10000, max_attempts=3, vcpu_quota=10000)
    values.update(opts)
    for name, value in values.items():
        conf.set_override(name, value, group="ec2")
    return conf


def started(ami, **opts):
    """A started backend and its harness (counts reset after start)."""
    backend = ec2.EC2Backend(make_conf(ami, **opts))
    backend.start()
    return backend, ec2_harness.Ec2Harness(backend._client)


def request(instance_uuid=None, generation=1, flavor=SMALL, **kw):
    instance_uuid = instance_uuid or str(uuidlib.uuid4())
    kw.setdefault("image", dict(BackendContract.IMAGE))
    return BuildRequest(instance_uuid=instance_uuid, name="vm-%s" % instance_uuid[:8],
                        flavor=flavor, launch_token="%s-%d" % (instance_uuid, generation),
                        generation=generation, **kw)


def spawn_many(backend, requests, workers=16):
    """spawn() from worker threads, as the manager's pool calls it; retries retryables."""
    def build(req):
        for _ in range(50):
            try:
                return backend.spawn(req)
            except exception.BackendError as exc:
                if not base.is_retryable(exc):
                    raise
                time.sleep(0.005)
        raise AssertionError("spawn of %s kept failing" % req.instance_uuid)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(build, requests))


def poll_until(backend, refs, state=InstanceState.RUNNING, timeout=30):
    def settled():
        try:
            result = backend.poll(refs)
        except exception.BackendUnavailable:
            return None
        return result if all(i.state is state for i in result.values()) else None
    return wait_for(settled, timeout=timeout, interval=0.01)


def tags_of(inst):
    return {t["Key"]: t["Value"] for t in inst.get("Tags", [])}


# -- the shared contract ---------------------------------------------------------


class TestEC2Contract(BackendContract):
    UNKNOWN_BACKEND_ID = "i-0123456789abcdef0"

    @pytest.fixture(autouse=True)
    def _moto(self, aws):
        self.ami = aws

    def make_backend(self, tmp_path):
        return started(self.ami)[0]


# -- options and loading ------------------------------------------------------------


class TestOptions:
    def test_group_listed_documented_and_secrets_secret(self):
        (group, opts), = ec2_conf.list_opts()
        assert group.name == "ec2"
        by_name = {o.dest: o for o in opts}
        assert by_name["access_key_id"].secret and by_name["secret_access_key"].secret
        for name in ("region", "endpoint_url", "profile", "subnet_id", "security_group_ids",
                     "key_name", "instance_type_map", "image_map", "tags", "max_instances",
                     "max_vcpus", "max_cost_per_hour", "prices", "vcpu_quota", "ice_ttl",
                     "batch_idle", "batch_max", "lost_instance_grace", "max_attempts",
                     "hibernate", "security_group_map", "key_pair_mode", "elastic_ip",
                     "capacity_refresh"):
            assert "Possible values" in by_name[name].help, name
        assert by_name["ice_ttl"].default == 300 and by_name["batch_idle"].default == 0.1
        assert by_name["batch_max"].default == 1.0
        assert by_name["lost_instance_grace"].default == 60
        assert by_name["key_pair_mode"].default == "import"
        assert by_name["elastic_ip"].default is False
        assert by_name["capacity_refresh"].default == 20

    def test_registered_by_the_conf_package(self, conf):
        assert conf.ec2.region == "us-east-1"

    def test_entry_point_loads_without_io(self, aws):
        backend = load_backend(make_conf(aws))
        assert type(backend) is ec2.EC2Backend and backend.name == "ec2"
        assert backend._client is None
        with pytest.raises(exception.BackendError):
            backend.spawn(request())


class TestStartValidation:
    def test_unknown_instance_type_fails_fast_naming_the_entry(self, aws):
        backend = ec2.EC2Backend(make_conf(aws, instance_type_map={"m1.small": "t3.micro",
                                                                   "m1.huge": "x9.nope"}))
        with pytest.raises(exception.ConfigurationError) as err:
            backend.start()
        assert "m1.huge -> x9.nope" in str(err.value) and "m1.small" not in str(err.value)

    def test_unknown_ami_fails_fast_naming_the_entry(self, aws):
        backend = ec2.EC2Backend(make_conf(aws, image_map={"cirros": aws,
                                                           "ubuntu": "ami-12345678"}))
        with pytest.raises(exception.ConfigurationError) as err:
            backend.start()
        assert "ubuntu -> ami-12345678" in str(err.value)

    def test_missing_price_under_a_spend_cap(self, aws):
        backend = ec2.EC2Backend(make_conf(aws, max_cost_per_hour=1.0,
                                           prices={"t3.micro": "0.01"}))
        with pytest.raises(exception.ConfigurationError) as err:
            backend.start()
        assert "m5.large" in str(err.value)

    def test_half_credentials_refused_without_leaking(self, aws):
        backend = ec2.EC2Backend(make_conf(aws, access_key_id=None))
        with pytest.raises(exception.ConfigurationError) as err:
            backend.start()
        assert SECRET_KEY not in str(err.value)

    @pytest.mark.parametrize("tags", [{"cellagent:owner": "x"}, {"aws:foo": "x"},
                                      {"k%d" % i: "v" for i in range(44)}])
    def test_bad_extra_tags(self, aws, tags):
        with pytest.raises(exception.ConfigurationError):
            ec2.EC2Backend(make_conf(aws, tags=tags)).start()

    def test_unknown_subnet(self, aws):
        with pytest.raises(exception.ConfigurationError) as err:
            ec2.EC2Backend(make_conf(aws, subnet_id="subnet-00000000")).start()
        assert "subnet_id" in str(err.value)

    def test_subnet_and_security_groups_are_used(self, aws):
        admin = ec2_harness.admin_client()
        subnet = admin.describe_subnets()["Subnets"][0]
        group = admin.create_security_group(GroupName="burst", Description="burst",
                                            VpcId=subnet["VpcId"])["GroupId"]
        admin.create_key_pair(KeyName="ops")
        backend, h = started(aws, subnet_id=subnet["SubnetId"], security_group_ids=[group],
                             key_name="ops")
        backend.spawn(request())
        body = h.requests["RunInstances"][0]
        assert body["SubnetId"] == subnet["SubnetId"] and body["KeyName"] == "ops"
        assert body["SecurityGroupId.1"] == group
        inst, = ec2_harness.admin_instances(OWNER)
        assert inst["SubnetId"] == subnet["SubnetId"]

    def test_unmapped_flavor_or_image_fails_before_any_launch(self, aws):
        backend, h = started(aws)
        with pytest.raises(exception.BackendError) as err:
            backend.spawn(request(flavor=Flavor("m1.odd", 1024, 1, 10)))
        assert "m1.odd" in str(err.value) and not base.is_retryable(err.value)
        with pytest.raises(exception.BackendError) as err:
            backend.spawn(request(image={"id": "img-1", "name": "nope"}))
        assert "img-1" in str(err.value) and not base.is_retryable(err.value)
        with pytest.raises(exception.BackendError) as err:
            backend.spawn(request(flavor=Flavor("m1.x", 1024, 1, 10,
                                                extra_specs={"ec2:instance_type": "zz.top"})))
        assert "zz.top" in str(err.value)
        assert h.calls["RunInstances"] == 0

    def test_extra_spec_and_image_property(self, aws):
        backend, h = started(aws, image_map={})
        flavor = Flavor("custom", 4096, 2, 10, extra_specs={"ec2:instance_type": "c5.large"})
        info = backend.spawn(request(flavor=flavor, image={"id": "img-2", "name": "x",
                                                           "properties": {"ec2_ami": aws}}))
        inst, = ec2_harness.admin_instances(OWNER)
        assert inst["InstanceId"] == info.backend_id
        assert (inst["InstanceType"], inst["ImageId"]) == ("c5.large", aws)
        backend.spawn(request(image={"id": aws}))       # an AMI id is used as is
        assert h.calls["RunInstances"] == 2


# -- exactly once ---------------------------------------------------------------------


class TestExactlyOnce:
    def test_tags_at_birth_and_client_token(self, aws):
        backend, h = started(aws, tags={"team": "cloud"})
        req = request(generation=3)
        info = backend.spawn(req)
        inst, = ec2_harness.admin_instances(OWNER)
        tags = tags_of(inst)
        assert tags["cellagent:owner"] == OWNER and tags["cellagent:cell"] == OWNER
        assert tags["cellagent:instance_uuid"] == req.instance_uuid
        assert tags["cellagent:generation"] == "3" and tags["team"] == "cloud"
        assert tags["cellagent:instance:" + req.instance_uuid] == "3:0"
        assert tags["Name"] == req.name
        token = h.requests["RunInstances"][0]["ClientToken"]
        assert len(token) == 64 and tags["cellagent:batch"] == token
        assert h.calls["CreateTags"] == 0        # tagged at birth, never after
        listed, = backend.list_instances()
        assert (listed.instance_uuid, listed.backend_id) == (req.instance_uuid,
                                                              info.backend_id)

    def test_harness_emulates_token_idempotency(self, aws):
        backend, h = started(aws)
        params = dict(ImageId=aws, InstanceType="t3.micro", MinCount=1, MaxCount=1,
                      ClientToken="same-token", TagSpecifications=[{
                          "ResourceType": "instance",
                          "Tags": [{"Key": "cellagent:owner", "Value": OWNER}]}])
        first = backend._client.run_instances(**params)["Instances"][0]["InstanceId"]
        second = backend._client.run_instances(**params)["Instances"][0]["InstanceId"]
        assert first == second and len(ec2_harness.admin_instances(OWNER)) == 1
        assert h.sends["RunInstances"] == 1

    def test_lost_response_recovers_to_one_instance(self, aws):
        backend, h = started(aws)
        h.lose_next_response("RunInstances")
        req = request()
        with pytest.raises(exception.BackendUnavailable) as err:
            backend.spawn(req)
        assert base.is_retryable(err.value)
        assert len(ec2_harness.admin_instances(OWNER)) == 1      # EC2 did create it
        info = backend.spawn(req)
        insts = ec2_harness.admin_instances(OWNER)
        assert [i["InstanceId"] for i in insts] == [info.backend_id]
        tokens = [b["ClientToken"] for b in h.requests["RunInstances"]]
        assert len(tokens) == 2 and tokens[0] == tokens[1]       # re-sent identically
        assert h.sends["RunInstances"] == 1
        assert backend.spawn(req).backend_id == info.backend_id
        assert h.calls["RunInstances"] == 2

    def test_restarted_agent_finds_the_instance_by_tag(self, aws):
        first, _ = started(aws)
        req = request()
        info = first.spawn(req)
        # The agent died before storing the backend id; a new one replays the build.
        second, h = started(aws)
        again = second.spawn(req)
        assert again.backend_id == info.backend_id
        assert h.calls["RunInstances"] == 0 and h.calls["DescribeInstances"] == 1
        assert len(ec2_harness.admin_instances(OWNER)) == 1

    def test_restart_after_lost_response_with_a_hidden_instance_uses_the_token(self, aws):
        # Worst case: the response was lost, the agent restarted, and the new
        # instance is not visible yet: the same batch composition gives the
        # same ClientToken, so EC2 (the harness) answers with the original.
        first, h1 = started(aws)
        h1.lose_next_response("RunInstances")
        h1.hide_new_instances(describes=100)
        req = request()
        with pytest.raises(exception.BackendUnavailable):
            first.spawn(req)
        second = ec2.EC2Backend(first.conf)
        second.start()
        h2 = ec2_harness.Ec2Harness(second._client)
        h2._tokens = h1._tokens           # the same EC2 account remembers the token...
        h2._hidden = h1._hidden           # ...and still hides the new instance
        second.spawn(req)
        assert len(ec2_harness.admin_instances(OWNER)) == 1
        assert h2.calls["RunInstances"] == 1 and h2.sends["RunInstances"] == 0

    def test_rebuild_terminates_the_older_generation(self, aws):
        backend, h = started(aws)
        uuid = str(uuidlib.uuid4())
        old = backend.spawn(request(uuid, generation=1))
        new = backend.spawn(request(uuid, generation=2))
        assert new.backend_id != old.backend_id
        states = {i["InstanceId"]: i["State"]["Name"]
                  for i in ec2_harness.admin_instances(OWNER, include_terminated=True)}
        assert states[old.backend_id] in ("shutting-down", "terminated")
        assert states[new.backend_id] in ("pending", "running")
        poll_until(backend, [InstanceRef(uuid, new.backend_id)])
        listed = {i.backend_id: i for i in backend.list_instances()}
        assert listed[new.backend_id].instance_uuid == uuid
        assert old.backend_id not in listed or listed[old.backend_id].state in (
            InstanceState.DELETING, InstanceState.DELETED)
        # An older generation arriving late is refused, not launched beside.
        stale = ec2.EC2Backend(backend.conf)
        stale.start()
        with pytest.raises(exception.BackendError) as err:
            stale.spawn(request(uuid, generation=1))
        assert "generation 2" in str(err.value)


# -- batching ---------------------------------------------------------------------------


class TestBatching:
    def test_100_identical_builds_are_a_handful_of_run_instances(self, aws):
        backend, h = started(aws, batch_idle=0.5, batch_max=2.0)
        reqs = [request() for _ in range(100)]
        infos = spawn_many(backend, reqs, workers=100)
        assert h.calls["RunInstances"] <= 3          # 47 per batch: the 50-tag limit
        assert all(i.state is InstanceState.PENDING for i in infos)
        assert [i.instance_uuid for i in infos] == [r.instance_uuid for r in reqs]
        assert len({i.backend_id for i in infos}) == 100
        # Every instance knows its own uuid: launch map + AmiLaunchIndex.
        listed = {i.instance_uuid: i.backend_id for i in backend.list_instances()}
        assert listed == {i.instance_uuid: i.backend_id for i in infos}
        assert len(ec2_harness.admin_instances(OWNER)) == 100
        h.reset_counts()
        result = poll_until(backend, [ref_of(i) for i in infos])
        assert len(result) == 100
        assert h.calls["DescribeInstances"] <= 2     # pending -> running on the next one

    def test_a_batch_of_first_launches_is_one_call(self, aws):
        backend, h = started(aws, batch_idle=0.5, batch_max=2.0)
        infos = spawn_many(backend, [dataclasses.replace(request(), first_launch=True)
                                     for _ in range(40)], workers=40)
        assert (h.calls["RunInstances"], h.calls["DescribeInstances"]) == (1, 0)
        assert len(ec2_harness.admin_instances(OWNER)) == 40
        # A known instance (here: a rebuild) is still looked up first.
        h.reset_counts()
        req = request()
        req = dataclasses.replace(req, instance_uuid=infos[0].instance_uuid,
                                  generation=2, launch_token=infos[0].instance_uuid + "-2")
        backend.spawn(req)
        assert h.calls["DescribeInstances"] == 1 and h.calls["TerminateInstances"] == 1

    def test_different_specs_are_different_batches(self, aws):
        backend, h = started(aws, batch_idle=0.5, batch_max=2.0)
        reqs = [request(flavor=SMALL if n % 2 else LARGE) for n in range(10)]
        reqs += [request(user_data="#cloud-config %d" % n) for n in range(2)]
        infos = spawn_many(backend, reqs, workers=12)
        assert h.calls["RunInstances"] == 4
        types = {i["InstanceId"]: i["InstanceType"]
                 for i in ec2_harness.admin_instances(OWNER)}
        for req, info in zip(reqs, infos, strict=True):
            assert types[info.backend_id] == ("m5.large" if req.flavor is LARGE
                                              else "t3.micro")

    def test_lost_batch_response_members_retry_separately(self, aws):
        backend, h = started(aws, batch_idle=0.5, batch_max=2.0)
        h.lose_next_response("RunInstances")
        reqs = [request() for _ in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            errors = list(pool.map(lambda r: _raises(backend.spawn, r), reqs))
        assert all(isinstance(e, exception.BackendUnavailable) for e in errors)
        assert len(ec2_harness.admin_instances(OWNER)) == 8
        infos = [backend.spawn(r) for r in reqs]          # one by one, in another order
        assert h.calls["RunInstances"] == 2 and h.sends["RunInstances"] == 1
        assert {i.backend_id for i in infos} == {
            i["InstanceId"] for i in ec2_harness.admin_instances(OWNER)}

    def test_throttled_launch_is_retried_as_the_same_batch(self, aws):
        backend, h = started(aws, max_attempts=1)
        h.fail_next("RunInstances", "RequestLimitExceeded", status=503)
        req = request()
        with pytest.raises(exception.BackendUnavailable):
            backend.spawn(req)
        assert ec2_harness.admin_instances(OWNER) == []
        backend.spawn(req)
        tokens = {b["ClientToken"] for b in h.requests["RunInstances"]}
        assert len(tokens) == 1 and len(ec2_harness.admin_instances(OWNER)) == 1


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as exc:
        return exc
    return None


# -- polling ---------------------------------------------------------------------------


class TestPolling:
    def test_one_describe_per_poll_whatever_the_refs(self, aws):
        backend, h = started(aws, batch_idle=0.05, batch_max=0.5)
        infos = spawn_many(backend, [request() for _ in range(40)], workers=40)
        refs = [ref_of(i) for i in infos]
        for subset in (refs[:1], refs[:10], refs):
            h.reset_counts()
            assert len(backend.poll(subset)) == len(subset)
            assert h.calls["DescribeInstances"] == 1
        h.reset_counts()
        by_uuid = [InstanceRef(r.instance_uuid) for r in refs]      # no backend ids
        result = backend.poll(by_uuid)
        assert h.calls["DescribeInstances"] == 1
        assert {u: i.backend_id for u, i in result.items()} == {
            r.instance_uuid: r.backend_id for r in refs}
        h.reset_counts()
        backend.get_info(refs[0])
        backend.list_instances()
        # The list's describe of everything is fresh: capacity needs none.
        backend.get_capacity([SMALL, LARGE])
        assert h.calls["DescribeInstances"] == 2

    def test_not_found_right_after_launch_is_pending_within_the_grace(self, aws):
        backend, h = started(aws, lost_instance_grace=60)
        clock = _Clock()
        backend.clock = clock
        h.hide_new_instances(describes=3)
        ref = ref_of(backend.spawn(request()))
        assert backend.poll([ref])[ref.instance_uuid].state is InstanceState.PENDING
        assert backend.get_info(ref).state is InstanceState.PENDING
        with pytest.raises(exception.BackendError) as err:
            backend.power_off(ref)
        assert base.is_retryable(err.value)
        assert backend.poll([ref])[ref.instance_uuid].state is InstanceState.RUNNING

    def test_missing_after_the_grace_is_deleted(self, aws):
        backend, h = started(aws, lost_instance_grace=60)
        clock = _Clock()
        backend.clock = clock
        h.hide_new_instances(describes=100)
        ref = ref_of(backend.spawn(request()))
        assert backend.poll([ref])[ref.instance_uuid].state is InstanceState.PENDING
        clock.advance(61)
        assert backend.poll([ref])[ref.instance_uuid].state is InstanceState.DELETED
        with pytest.raises(exception.InstanceNotFound):
            backend.get_info(ref)

    def test_addresses_fixed_and_floating_with_dns(self, aws):
        backend, _ = started(aws)
        ref = ref_of(backend.spawn(request()))
        info = poll_until(backend, [ref])[ref.instance_uuid]
        inst, = ec2_harness.admin_instances(OWNER)
        fixed, floating = info.addresses
        assert (fixed.kind, fixed.address, fixed.version) == (
            "fixed", inst["PrivateIpAddress"], 4)
        assert (floating.kind, floating.address) == ("floating", inst["PublicIpAddress"])
        assert fixed.dns_name == inst["PrivateDnsName"]
        assert floating.dns_name == inst["PublicDnsName"]
        assert fixed.network == inst["VpcId"] and fixed.mac
        assert info.launched_at


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


# -- lifecycle ---------------------------------------------------------------------------


class TestLifecycle:
    def running(self, backend, **kw):
        ref = ref_of(backend.spawn(request(**kw)))
        poll_until(backend, [ref])
        return ref

    def test_pause_and_suspend_stop_or_hibernate(self, aws):
        backend, h = started(aws, hibernate=True)
        ref = self.running(backend)
        assert h.requests["RunInstances"][0]["HibernationOptions.Configured"] == "true"
        assert backend.pause(ref).state is InstanceState.STOPPING
        assert h.requests["StopInstances"][-1]["Hibernate"] == "true"
        poll_until(backend, [ref], InstanceState.STOPPED)
        assert backend.unpause(ref).state in (InstanceState.STARTING, InstanceState.RUNNING)
        poll_until(backend, [ref])
        backend.suspend(ref)
        poll_until(backend, [ref], InstanceState.STOPPED)
        backend.resume(ref)
        poll_until(backend, [ref])

    def test_refused_hibernate_falls_back_to_stop(self, aws):
        backend, h = started(aws, hibernate=True)
        ref = self.running(backend)
        h.fail_next("StopInstances", "UnsupportedHibernationConfiguration")
        backend.pause(ref)
        assert [b.get("Hibernate") for b in h.requests["StopInstances"]] == ["true", None]
        poll_until(backend, [ref], InstanceState.STOPPED)

    def test_plain_stop_without_hibernate(self, aws):
        backend, h = started(aws)
        ref = self.running(backend)
        backend.suspend(ref)
        assert h.requests["StopInstances"][0].get("Hibernate") == "false"

    def test_resize_needs_a_stopped_instance(self, aws):
        backend, _ = started(aws)
        assert backend.capabilities["resize_needs_stop"]
        ref = self.running(backend)
        with pytest.raises(exception.BackendError) as err:
            backend.resize(ref, LARGE)
        assert "running" in str(err.value)
        backend.power_off(ref)
        poll_until(backend, [ref], InstanceState.STOPPED)
        assert backend.resize(ref, LARGE).state is InstanceState.STOPPED
        inst, = ec2_harness.admin_instances(OWNER)
        assert inst["InstanceType"] == "m5.large"
        backend.power_on(ref)
        poll_until(backend, [ref])

    def test_resize_beyond_the_budget_keeps_the_old_size(self, aws):
        backend, _ = started(aws, max_vcpus=2)
        ref = self.running(backend)
        backend.power_off(ref)
        poll_until(backend, [ref], InstanceState.STOPPED)
        with pytest.raises(exception.InsufficientCapacity):
            backend.resize(ref, Flavor("m1.xl", 16384, 8, 10,
                                       extra_specs={"ec2:instance_type": "m5.2xlarge"}))
        assert ec2_harness.admin_instances(OWNER)[0]["InstanceType"] == "t3.micro"

    def test_hard_reboot_starts_a_stopped_instance_soft_does_not(self, aws):
        backend, h = started(aws)
        ref = self.running(backend)
        backend.power_off(ref)
        poll_until(backend, [ref], InstanceState.STOPPED)
        with pytest.raises(exception.BackendError) as err:
            backend.reboot(ref, RebootKind.SOFT)
        assert not base.is_retryable(err.value)
        assert backend.reboot(ref, RebootKind.HARD).state is InstanceState.REBOOTING
        assert h.calls["StartInstances"] == 1
        poll_until(backend, [ref])

    def test_snapshot_and_image_status(self, aws):
        backend, h = started(aws)
        ref = self.running(backend)
        image_id = backend.snapshot(ref, "nightly backup #1")
        assert h.requests["CreateImage"][0]["NoReboot"] == "true"
        assert backend.image_status(image_id) in ("pending", "available")
        image = ec2_harness.admin_client().describe_images(ImageIds=[image_id])["Images"][0]
        assert image["Name"].startswith("nightly backup _1-")
        assert tags_of(image)["cellagent:instance_uuid"] == ref.instance_uuid
        assert backend.image_status("ami-00000000") == "failed"

    def test_console_output_decoding(self, aws):
        backend, _ = started(aws)
        ref = self.running(backend)
        text = backend.get_console_output(ref)
        assert "Linux version" in text        # moto answers decoded text
        assert ec2_support.decode_console(base64.b64encode(b"line1\nline2\n").decode()) == \
            "line1\nline2\n"
        assert ec2_support.decode_console("not base64 ===") == "not base64 ==="
        assert ec2_support.decode_console(None) == ""

    def test_destroy_by_uuid_terminates_every_generation_left(self, aws):
        backend, _ = started(aws)
        uuid = str(uuidlib.uuid4())
        info = backend.spawn(request(uuid))
        backend.destroy(InstanceRef(uuid))
        inst, = ec2_harness.admin_instances(OWNER, include_terminated=True)
        assert inst["InstanceId"] == info.backend_id
        assert inst["State"]["Name"] in ("shutting-down", "terminated")
        backend.destroy(InstanceRef(uuid))          # nothing left: fine

    def test_destroy_right_after_launch_of_an_invisible_instance_is_retryable(self, aws):
        backend, h = started(aws)
        ref = ref_of(backend.spawn(request()))
        h.fail_next("TerminateInstances", "InvalidInstanceID.NotFound")
        with pytest.raises(exception.BackendUnavailable):
            backend.destroy(ref)
        backend.destroy(ref)
        assert ec2_harness.admin_instances(OWNER, include_terminated=True)[0]["State"]["Name"] in (
            "shutting-down", "terminated")


# -- throttling and errors ---------------------------------------------------------


class TestErrors:
    def test_throttling_beyond_the_retries_is_retryable_and_halves_the_rate(self, aws):
        backend, h = started(aws, max_attempts=2, api_rate=100.0, api_burst=100)
        h.fail_next("DescribeInstances", "RequestLimitExceeded", status=503, times=2)
        with pytest.raises(exception.BackendUnavailable) as err:
            backend.list_instances()
        assert base.is_retryable(err.value) and "RequestLimitExceeded" in str(err.value)
        assert h.sends["DescribeInstances"] == 2 and h.calls["DescribeInstances"] == 1
        limiter = backend.limiter
        assert limiter.rate == 50.0 and limiter.stats["throttled"] == 2
        for _ in range(10):
            backend.list_instances()
        assert limiter.rate == 100.0

    def test_throttling_within_the_retries_is_invisible(self, aws):
        backend, h = started(aws, max_attempts=3)
        h.fail_next("DescribeInstances", "Throttling", status=400, times=2)
        assert backend.list_instances() == []
        assert h.sends["DescribeInstances"] == 3

    def test_limiter_is_shared_per_account_and_region(self, aws):
        one, _ = started(aws)
        two, _ = started(aws)
        other, _ = started(aws, access_key_id="AKIDOTHER", secret_access_key="other")
        assert one.limiter is two.limiter and one.limiter is not other.limiter
        assert ACCESS_KEY not in repr(list(ec2_support._LIMITERS))

    def test_limiter_paces_requests(self):
        now = [0.0]
        slept = []

        def sleep(seconds):
            slept.append(seconds)
            now[0] += seconds

        limiter = ec2_support.RateLimiter(10.0, 2, clock=lambda: now[0], sleep=sleep)
        for _ in range(4):
            limiter.acquire()
        assert sum(slept) == pytest.approx(0.2)
        limiter.throttled()
        limiter.throttled()            # one cut per second
        assert limiter.rate == 5.0
        limiter.succeeded()
        assert limiter.rate == 5.5

    @pytest.mark.parametrize("code, status", [("InternalError", 500),
                                              ("ServiceUnavailable", 503)])
    def test_5xx_is_retryable(self, aws, code, status):
        backend, h = started(aws, max_attempts=1)
        h.fail_next("DescribeInstances", code, status=status)
        with pytest.raises(exception.BackendUnavailable):
            backend.poll([InstanceRef(str(uuidlib.uuid4()), "i-0123456789abcdef0")])

    def test_connection_error_is_retryable(self, aws):
        backend, h = started(aws)
        h.lose_next_response("DescribeInstances")
        with pytest.raises(exception.BackendUnavailable):
            backend.list_instances()

    @pytest.mark.parametrize("code", ["AuthFailure", "UnauthorizedOperation"])
    def test_auth_errors(self, aws, code):
        backend, h = started(aws)
        h.fail_next("DescribeInstances", code, status=403)
        with pytest.raises(exception.BackendAuthError) as err:
            backend.list_instances()
        assert not base.is_retryable(err.value)

    def test_incorrect_state_is_retryable(self, aws):
        backend, h = started(aws)
        ref = ref_of(backend.spawn(request()))
        poll_until(backend, [ref])
        h.fail_next("StopInstances", "IncorrectInstanceState")
        with pytest.raises(exception.BackendError) as err:
            backend.power_off(ref)
        assert base.is_retryable(err.value)

    @pytest.mark.parametrize("code", ["InsufficientInstanceCapacity", "VcpuLimitExceeded",
                                      "InstanceLimitExceeded"])
    def test_capacity_errors_mark_the_type_unavailable(self, aws, code):
        backend, h = started(aws, ice_ttl=300)
        clock = _Clock()
        backend.clock = clock
        h.fail_next("RunInstances", code)
        with pytest.raises(exception.InsufficientCapacity) as err:
            backend.spawn(request())
        assert code in str(err.value) and not base.is_retryable(err.value)
        cap = backend.get_capacity([SMALL, LARGE])
        assert cap.max_units["m1.small"] == 0 and cap.max_units["m1.large"] > 0
        with pytest.raises(exception.InsufficientCapacity) as err:
            backend.spawn(request())          # fails fast: EC2 is not asked
        assert "ice_ttl" in str(err.value)
        assert h.calls["RunInstances"] == 1
        backend.spawn(request(flavor=LARGE))
        clock.advance(301)
        assert backend.get_capacity([SMALL]).max_units["m1.small"] > 0
        backend.spawn(request())
        assert h.calls["RunInstances"] == 3


# -- capacity and budget ------------------------------------------------------------


class TestCapacity:
    def test_quota_headroom_per_flavor(self, aws):
        backend, _ = started(aws, vcpu_quota=10)
        cap = backend.get_capacity([SMALL, LARGE])
        assert (cap.vcpus_total, cap.vcpus_used) == (10, 0)
        assert cap.max_units == {"m1.small": 5, "m1.large": 5}
        # RAM: the most generous flavor's MB per vCPU (m1.large: 8192 / 2).
        assert (cap.ram_total_mb, cap.ram_free_mb) == (40960, 40960)
        assert (cap.disk_total_mb, cap.disk_free_mb) == (10 * 40 * 1024, 10 * 40 * 1024)
        backend.spawn(request(flavor=LARGE))
        cap = backend.get_capacity([SMALL, LARGE])
        assert cap.vcpus_used == 2 and cap.max_units == {"m1.small": 4, "m1.large": 4}
        assert cap.ram_free_mb == 8 * 4096
        assert backend.get_capacity([Flavor("unmapped", 512, 1, 1)]).max_units == {
            "unmapped": 0}

    def test_quota_refuses_before_run_instances(self, aws):
        backend, h = started(aws, vcpu_quota=4)
        backend.spawn(request())
        backend.spawn(request())
        with pytest.raises(exception.InsufficientCapacity) as err:
            backend.spawn(request())
        assert "vCPU quota 4" in str(err.value)
        assert h.calls["RunInstances"] == 2

    def test_max_instances_budget(self, aws):
        backend, h = started(aws, max_instances=2)
        refs = [ref_of(backend.spawn(request())) for _ in range(2)]
        with pytest.raises(exception.InsufficientCapacity) as err:
            backend.spawn(request())
        assert "max_instances 2" in str(err.value) and h.calls["RunInstances"] == 2
        assert backend.get_capacity([SMALL]).max_units["m1.small"] == 0
        backend.destroy(refs[0])
        poll_until(backend, refs[:1], InstanceState.DELETED)
        assert backend.get_capacity([SMALL]).max_units["m1.small"] == 1

    def test_spend_cap(self, aws):
        backend, h = started(aws, max_cost_per_hour=0.25,
                             prices={"t3.micro": "0.0104", "m5.large": "0.096"})
        assert backend.get_capacity([SMALL, LARGE]).max_units["m1.large"] == 2
        backend.spawn(request(flavor=LARGE))
        backend.spawn(request(flavor=LARGE))
        with pytest.raises(exception.InsufficientCapacity) as err:
            backend.spawn(request(flavor=LARGE))
        assert "spend cap" in str(err.value) and h.calls["RunInstances"] == 2
        cap = backend.get_capacity([SMALL, LARGE])
        assert cap.max_units == {"m1.small": 5, "m1.large": 0}     # $0.058 left
        backend.spawn(request())

    def test_batch_over_budget_launches_what_fits(self, aws):
        backend, h = started(aws, max_instances=3, batch_idle=0.5, batch_max=2.0)
        results = []
        lock = threading.Lock()

        def build(req):
            outcome = _raises(backend.spawn, req)
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=build, args=(request(),)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(isinstance(r, exception.InsufficientCapacity) for r in results) == 2
        assert h.calls["RunInstances"] == 1
        assert len(ec2_harness.admin_instances(OWNER)) == 3


# -- scale, under faults ---------------------------------------------------------------


class TestScale:
    def test_200_builds_under_throttling_and_a_lost_response(self, aws):
        backend, h = started(aws, batch_idle=0.05, batch_max=0.5, max_attempts=5)
        h.throttle(0.2)
        h.lose_next_response("RunInstances")
        reqs = [request() for _ in range(200)]
        infos = spawn_many(backend, reqs, workers=16)
        refs = [ref_of(i) for i in infos]
        poll_until(backend, refs, timeout=60)
        insts = ec2_harness.admin_instances(OWNER)
        assert len(insts) == 200
        assert {i["InstanceId"] for i in insts} == {r.backend_id for r in refs}
        assert h.faults["lost-response"] == 1 and h.faults["RequestLimitExceeded"] > 0
        # Budget: far fewer launches than builds (16 workers: batches of up to 16).
        assert h.calls["RunInstances"] <= 40
        logging.getLogger(__name__).info("200 builds: calls %s, faults %s",
                                         dict(h.calls), dict(h.faults))


# -- secrets ---------------------------------------------------------------------------


class TestSecrets:
    def test_keys_never_in_logs_or_errors(self, aws, caplog):
        caplog.set_level(logging.DEBUG)
        backend, h = started(aws)
        ref = ref_of(backend.spawn(request()))
        backend.poll([ref])
        h.fail_next("DescribeInstances", "AuthFailure", status=401)
        with pytest.raises(exception.BackendAuthError) as err:
            backend.get_info(ref)
        h.fail_next("RunInstances", "UnauthorizedOperation", status=403)
        with pytest.raises(exception.BackendAuthError):
            backend.spawn(request())
        assert SECRET_KEY not in str(err.value) and ACCESS_KEY not in str(err.value)
        texts = [r.getMessage() for r in caplog.records]
        assert texts and not any(SECRET_KEY in t for t in texts)
        ours = [r.getMessage() for r in caplog.records if r.name.startswith("cellagent")]
        assert ours and not any(ACCESS_KEY in t for t in ours)

    def test_error_messages_are_scrubbed(self, aws):
        backend, _ = started(aws)
        exc = backend._from_client_error(
            botocore.exceptions.ClientError(
                {"Error": {"Code": "AuthFailure", "Message": "bad key %s" % SECRET_KEY}},
                "DescribeInstances"), "DescribeInstances", None, None)
        assert SECRET_KEY not in str(exc) and "***" in str(exc)


# -- through the child agent -------------------------------------------------------


def _agent_on_ec2(tmp_path, ami, backend_opts=None, **ec2_opts):
    """A started child agent (tests.unit.helpers.CellHarness) on the EC2 backend."""
    harness = helpers.CellHarness(tmp_path, driver="ec2", backend_opts=backend_opts)
    settings = dict(access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, owner=OWNER,
                    instance_type_map={"m1.small": "t3.micro"}, image_map={"cirros": ami},
                    **ec2_opts)
    for name, value in settings.items():
        harness.conf.set_override(name, value, group="ec2")
    return harness.start()


class TestThroughTheAgent:
    def test_build_and_delete_reach_the_parent(self, aws, tmp_path):
        harness = _agent_on_ec2(tmp_path, aws, batch_idle=0.05, batch_max=0.2)
        try:
            uuids = harness.build(count=3)
            insts = ec2_harness.admin_instances(OWNER)
            assert len(insts) == 3
            # The public address is what the parent shows (access_ip_v4).
            assert {harness.parent.row(u)["access_ip_v4"] for u in uuids} == {
                i["PublicIpAddress"] for i in insts}
            harness.send("terminate_instance", {"instance": helpers.instance_prim(uuids[0]),
                                                "delete_type": "delete"})
            wait_for(lambda: uuids[0] not in harness.parent.view.instances, timeout=20)
            assert len(ec2_harness.admin_instances(OWNER)) == 2
        finally:
            harness.stop()

    def test_reconciler_on_ec2(self, aws, tmp_path):
        harness = _agent_on_ec2(tmp_path, aws, backend_opts={"reconcile_interval": 0})
        try:
            uuids = harness.build(count=2)
            agent = harness.agent
            agent.reconciler.orphan_grace = 0
            # An orphan: tagged as this cell's, but no record of it.
            orphan = agent.backend.spawn(request())
            # Stopped behind our back: drift.
            rec = agent.store.get_instance(uuids[0])
            admin = ec2_harness.admin_client()
            admin.stop_instances(InstanceIds=[rec.backend_id])
            # Terminated behind our back: vanished.
            gone = agent.store.get_instance(uuids[1])
            admin.terminate_instances(InstanceIds=[gone.backend_id])
            figures = agent.reconciler.run_once()
            assert (figures["terminated"], figures["vanished"]) == (1, 1), figures
            if not figures["drifted"]:              # moto: stopping, then stopped
                figures = agent.reconciler.run_once()
                assert figures["drifted"] == 1, figures
            harness.wait_state(uuids[0], vm_state="stopped", task_state=None)
            wait_for(lambda: uuids[1] not in harness.parent.view.instances, timeout=10)
            states = {i["InstanceId"]: i["State"]["Name"]
                      for i in ec2_harness.admin_instances(OWNER, include_terminated=True)}
            assert states[orphan.backend_id] in ("shutting-down", "terminated")
        finally:
            harness.stop()


class TestLease:
    def test_lease_tags_and_the_watchdog(self, aws, tmp_path, capsys):
        backend, h = started(aws, lease_seconds=300)
        infos = spawn_many(backend, [request() for _ in range(3)], workers=3)
        now = time.time()
        assert backend.renew_lease(now) == 3
        assert h.calls["CreateTags"] == 1                 # one call for all of them
        client = ec2_harness.admin_client()
        assert ec2_support.expired_leases(client, now=now + 10, owner=OWNER) == []
        expired = ec2_support.expired_leases(client, now=now + 301, owner=OWNER)
        assert sorted(i for i, _o, _u in expired) == sorted(i.backend_id for i in infos)
        assert ec2_support.expired_leases(client, now=now + 301, owner="another-cell") == []

        # The watchdog command: nothing has expired yet, so nothing goes.
        from cellagent.cmd import manage
        conf_file = tmp_path / "manage.conf"
        # A log file, not stderr: oslo.log's handlers outlive this test.
        conf_file.write_text("[DEFAULT]\nstate_path = %s\nlog_file = %s\nuse_stderr = false\n"
                             "[ec2]\nregion = us-east-1\n" % (tmp_path, tmp_path / "m.log"))
        assert manage.main(["--config-file", str(conf_file), "ec2", "watchdog",
                            "--owner", OWNER]) == 0
        assert "no expired lease" in capsys.readouterr().out
        assert len(ec2_harness.admin_instances(OWNER)) == 3
        # The agent died: its lease ran out (renewed into the past here).
        backend.renew_lease(now - 400)
        assert manage.main(["--config-file", str(conf_file), "ec2", "watchdog",
                            "--owner", OWNER, "--dry-run"]) == 0
        assert capsys.readouterr().out.count("would terminate") == 3
        assert manage.main(["--config-file", str(conf_file), "ec2", "watchdog",
                            "--owner", OWNER]) == 0
        assert capsys.readouterr().out.count("terminating") == 3
        assert ec2_harness.admin_instances(OWNER) == []
        backend.stop()

    def test_no_lease_no_thread(self, aws):
        backend, h = started(aws)
        assert backend._lease_thread is None
        backend.stop()


# -- key pairs, security groups, Elastic IPs ------------------------------------------


def public_key(comment="alice@laptop"):
    """A fresh OpenSSH public key line (moto checks the key material)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    blob = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return "%s %s" % (blob, comment)


class TestKeyPairs:
    def test_a_storm_imports_each_key_once(self, aws):
        backend, h = started(aws, batch_idle=0.05, batch_max=0.5)
        alice, bob = public_key(), public_key("bob")
        reqs = [request(key_name="alice", key_data=alice) for _ in range(30)]
        reqs += [request(key_name="bob", key_data=bob) for _ in range(10)]
        infos = spawn_many(backend, reqs, workers=40)
        assert h.calls["ImportKeyPair"] == 2
        names = {ec2_keys.key_pair_name(alice), ec2_keys.key_pair_name(bob)}
        assert all(n.startswith("cellagent-") and len(n) == 30 for n in names)
        pairs = {k["KeyName"]: k for k in ec2_harness.admin_client().describe_key_pairs(
            KeyNames=sorted(names))["KeyPairs"]}
        assert set(pairs) == names
        assert tags_of(pairs[ec2_keys.key_pair_name(alice)])["cellagent:owner"] == OWNER
        by_id = {i["InstanceId"]: i for i in ec2_harness.admin_instances(OWNER)}
        for req, info in zip(reqs, infos, strict=True):
            assert by_id[info.backend_id]["KeyName"] == ec2_keys.key_pair_name(req.key_data)
        # A key is part of the launch spec: two keys, never one RunInstances.
        assert {tuple(sorted({b["KeyName"] for b in h.requests["RunInstances"]}))} == {
            tuple(sorted(names))}
        # Deleting instances never deletes the key pairs they share.
        backend.destroy(ref_of(infos[0]))
        assert h.calls["DeleteKeyPair"] == 0
        assert len(ec2_harness.admin_client().describe_key_pairs(
            KeyNames=sorted(names))["KeyPairs"]) == 2

    def test_a_key_pair_already_there_is_used(self, aws):
        key = public_key()
        ec2_harness.admin_client().import_key_pair(KeyName=ec2_keys.key_pair_name(key),
                                                   PublicKeyMaterial=key.encode())
        backend, h = started(aws)
        info = backend.spawn(request(key_data=key))
        assert h.calls["ImportKeyPair"] == 1 and h.faults == {}
        inst, = ec2_harness.admin_instances(OWNER)
        assert inst["InstanceId"] == info.backend_id
        assert inst["KeyName"] == ec2_keys.key_pair_name(key)
        backend.spawn(request(key_data=key))              # known now: no call
        assert h.calls["ImportKeyPair"] == 1

    def test_name_is_the_key_not_its_comment(self):
        key = public_key("one")
        same = key.rsplit(" ", 1)[0] + " another-comment"
        assert ec2_keys.key_pair_name(key) == ec2_keys.key_pair_name(same)
        assert ec2_keys.key_pair_name(key) != ec2_keys.key_pair_name(public_key("one"))

    def test_without_key_data_or_in_fixed_mode_the_configured_key(self, aws):
        ec2_harness.admin_client().create_key_pair(KeyName="ops")
        backend, h = started(aws, key_name="ops")
        backend.spawn(request())                          # no key of its own
        fixed, hf = started(aws, key_name="ops", key_pair_mode="fixed")
        fixed.spawn(request(key_name="alice", key_data=public_key()))
        assert h.calls["ImportKeyPair"] == hf.calls["ImportKeyPair"] == 0
        assert h.requests["RunInstances"][0]["KeyName"] == "ops"
        assert hf.requests["RunInstances"][0]["KeyName"] == "ops"
        nokey, hn = started(aws, key_pair_mode="fixed")
        nokey.spawn(request(key_data=public_key()))
        assert "KeyName" not in hn.requests["RunInstances"][0]

    def test_a_key_ec2_refuses_fails_the_build_clearly(self, aws):
        backend, h = started(aws)
        req = request(key_data="ssh-rsa bm90IGEga2V5 broken")
        with pytest.raises(exception.BackendError) as err:
            backend.spawn(req)
        assert req.instance_uuid in str(err.value) and "key pair" in str(err.value)
        assert not base.is_retryable(err.value)
        assert h.calls["RunInstances"] == 0

    def test_unknown_configured_key_name_fails_at_start(self, aws):
        with pytest.raises(exception.ConfigurationError) as err:
            ec2.EC2Backend(make_conf(aws, key_name="nobody")).start()
        assert "key_name" in str(err.value)


def _groups(vpc_id, *names):
    admin = ec2_harness.admin_client()
    return [admin.create_security_group(GroupName=n, Description=n, VpcId=vpc_id)["GroupId"]
            for n in names]


class TestSecurityGroups:
    @pytest.fixture
    def groups(self, aws):
        vpc = ec2_harness.admin_client().describe_vpcs()["Vpcs"][0]["VpcId"]
        return dict(zip(("base", "web", "db"), _groups(vpc, "base", "web", "db"),
                        strict=True))

    def test_mapped_groups_reach_the_instance(self, aws, groups):
        backend, h = started(aws, security_group_ids=[groups["base"]],
                             security_group_map={"web": groups["web"], "db": groups["db"]})
        asked = {"wd": ["web", "db"], "default": ["default"], "none": [],
                 "mixed": ["default", "web"]}
        infos = {k: backend.spawn(request(security_groups=v)) for k, v in asked.items()}
        by_id = {i["InstanceId"]: {g["GroupId"] for g in i["SecurityGroups"]}
                 for i in ec2_harness.admin_instances(OWNER)}
        got = {k: by_id[i.backend_id] for k, i in infos.items()}
        assert got == {"wd": {groups["web"], groups["db"]}, "default": {groups["base"]},
                       "none": {groups["base"]}, "mixed": {groups["base"], groups["web"]}}

    def test_an_unmapped_group_fails_the_build_naming_it(self, aws, groups):
        backend, h = started(aws, security_group_map={"web": groups["web"]})
        req = request(security_groups=["web", "admin-only"])
        with pytest.raises(exception.BackendError) as err:
            backend.spawn(req)
        assert "'admin-only'" in str(err.value) and "security_group_map" in str(err.value)
        assert req.instance_uuid in str(err.value) and not base.is_retryable(err.value)
        assert h.calls["RunInstances"] == 0 and ec2_harness.admin_instances(OWNER) == []

    def test_different_groups_are_different_batches(self, aws, groups):
        backend, h = started(aws, batch_idle=0.2, batch_max=1.0,
                             security_group_map={"web": groups["web"], "db": groups["db"]})
        reqs = [request(security_groups=[g]) for g in ("web", "db", "web", "db", "web")]
        spawn_many(backend, reqs, workers=5)
        sent = sorted((b["SecurityGroupId.1"], b["MinCount"])
                      for b in h.requests["RunInstances"])
        assert sent == sorted([(groups["web"], 3), (groups["db"], 2)])

    def test_an_unknown_mapped_group_fails_at_start(self, aws):
        with pytest.raises(exception.ConfigurationError) as err:
            ec2.EC2Backend(make_conf(aws, security_group_map={"web": "sg-0000000f"})).start()
        assert "security_group_map" in str(err.value)

    def test_through_the_agent_an_unmapped_group_is_an_error_with_a_fault(self, aws,
                                                                         tmp_path):
        harness = _agent_on_ec2(tmp_path, aws)
        try:
            uuid = str(uuidlib.uuid4())
            kwargs = helpers.build_kwargs([uuid])
            kwargs["build_inst_kwargs"]["security_groups"] = ["web"]
            harness.send("build_instances", kwargs)
            harness.wait_state(uuid, vm_state="error", timeout=20)
            faults = [m.method_kwargs["instance_fault"] for m in harness.parent.received(
                "instance_fault_create_at_top", uuid)]
            assert faults and "security group 'web'" in faults[0]["message"]
            assert ec2_harness.admin_instances(OWNER) == []
        finally:
            harness.stop()


def _admin_addresses(owner=None):
    out = []
    for address in ec2_harness.admin_client().describe_addresses()["Addresses"]:
        if owner is None or tags_of(address).get("cellagent:owner") == owner:
            out.append(address)
    return out


class TestElasticIp:
    def _running(self, backend, h, req=None, ticks=5):
        """spawn, then poll until RUNNING; returns (ref, info, polls)."""
        ref = ref_of(backend.spawn(req or request()))
        for tick in range(1, ticks + 1):
            info = backend.poll([ref])[ref.instance_uuid]
            if info.state is InstanceState.RUNNING:
                return ref, info, tick
        raise AssertionError("not running after %d polls: %s" % (ticks, info))

    def test_allocated_tagged_reported_and_released(self, aws):
        backend, h = started(aws, elastic_ip=True)
        ref, info, ticks = self._running(backend, h)
        assert ticks == 2            # associated at the first, seen by EC2 at the second
        assert (h.calls["AllocateAddress"], h.calls["AssociateAddress"]) == (1, 1)
        assert h.calls["DescribeAddresses"] == 1
        address, = _admin_addresses(OWNER)
        assert tags_of(address)["cellagent:instance_uuid"] == ref.instance_uuid
        assert tags_of(address)["cellagent:cell"] == backend.cell
        assert address["InstanceId"] == ref.backend_id
        floating, = [a for a in info.addresses if a.kind == "floating"]
        assert floating.address == address["PublicIp"]
        h.reset_counts()
        backend.poll([ref])                                   # settled: no more calls
        assert sum(v for k, v in h.calls.items() if "Address" in k) == 0
        backend.destroy(ref)
        assert (h.calls["DisassociateAddress"], h.calls["ReleaseAddress"]) == (1, 1)
        assert _admin_addresses(OWNER) == []
        backend.destroy(ref)                                  # again: nothing left, fine
        assert h.calls["ReleaseAddress"] == 1

    def test_a_lost_allocation_is_found_by_its_tag(self, aws):
        backend, h = started(aws, elastic_ip=True)
        ref = ref_of(backend.spawn(request()))
        h.lose_next_response("AllocateAddress")
        assert backend.poll([ref])[ref.instance_uuid].state is InstanceState.PENDING
        assert len(_admin_addresses(OWNER)) == 1              # EC2 did allocate it
        states = [backend.poll([ref])[ref.instance_uuid].state for _ in range(2)]
        assert states == [InstanceState.PENDING, InstanceState.RUNNING]
        assert h.calls["AllocateAddress"] == 1 and h.calls["DescribeAddresses"] == 2
        address, = _admin_addresses(OWNER)
        assert address["InstanceId"] == ref.backend_id

    def test_a_restarted_agent_releases_by_tag(self, aws):
        backend, _ = started(aws, elastic_ip=True)
        ref, _info, _ = self._running(backend, None)
        again, h = started(aws, elastic_ip=True)              # nothing in memory
        again.destroy(ref)
        assert h.calls["DescribeAddresses"] == 1 and h.calls["ReleaseAddress"] == 1
        assert _admin_addresses(OWNER) == []

    def test_a_refused_address_is_an_error_with_the_reason(self, aws):
        backend, h = started(aws, elastic_ip=True)
        ref = ref_of(backend.spawn(request()))
        h.fail_next("AllocateAddress", "AddressLimitExceeded")
        info = backend.poll([ref])[ref.instance_uuid]
        assert info.state is InstanceState.ERROR and "AddressLimitExceeded" in info.fault
        assert backend.get_info(ref).state is InstanceState.ERROR
        assert h.calls["AllocateAddress"] == 1
        backend.poll([ref])                                   # not asked again
        assert h.calls["AllocateAddress"] == 1

    def test_no_look_up_no_allocation(self, aws):
        backend, h = started(aws, elastic_ip=True)
        ref = ref_of(backend.spawn(request()))
        h.fail_next("DescribeAddresses", "RequestLimitExceeded", status=503, times=3)
        assert backend.poll([ref])[ref.instance_uuid].state is InstanceState.PENDING
        h.fail_next("DescribeAddresses", "UnauthorizedOperation", status=403)
        info = backend.poll([ref])[ref.instance_uuid]
        assert info.state is InstanceState.ERROR and "UnauthorizedOperation" in info.fault
        assert h.calls["AllocateAddress"] == 0 and _admin_addresses(OWNER) == []

    def test_reconciliation_releases_leaked_addresses(self, aws):
        backend, h = started(aws, elastic_ip=True)
        kept, _info, _ = self._running(backend, h)
        gone, _info, _ = self._running(backend, h)
        admin = ec2_harness.admin_client()
        admin.terminate_instances(InstanceIds=[gone.backend_id])   # behind our back

        def allocate(owner, uuid):
            return admin.allocate_address(Domain="vpc", TagSpecifications=[{
                "ResourceType": "elastic-ip", "Tags": [
                    {"Key": "cellagent:owner", "Value": owner},
                    {"Key": "cellagent:instance_uuid", "Value": uuid}]}])["AllocationId"]
        never = allocate(OWNER, str(uuidlib.uuid4()))        # its instance never was
        other = allocate("another-cell", str(uuidlib.uuid4()))
        untagged = admin.allocate_address(Domain="vpc")["AllocationId"]
        h.reset_counts()
        backend.list_instances()
        assert h.calls["DescribeAddresses"] == 1 and h.calls["ReleaseAddress"] == 2
        left = {a["AllocationId"]: a for a in _admin_addresses()}
        assert never not in left and other in left and untagged in left
        mine = [a for a in left.values() if tags_of(a).get("cellagent:owner") == OWNER]
        assert [tags_of(a)["cellagent:instance_uuid"] for a in mine] == [kept.instance_uuid]

    def test_off_costs_nothing(self, aws):
        backend, h = started(aws)
        ref = ref_of(backend.spawn(request()))
        poll_until(backend, [ref])
        backend.list_instances()
        backend.destroy(ref)
        assert not [k for k in h.calls if "Address" in k]

    def test_through_the_agent_the_parent_sees_the_elastic_ip(self, aws, tmp_path):
        harness = _agent_on_ec2(tmp_path, aws, elastic_ip=True)
        try:
            uuid, = harness.build(count=1)
            address, = _admin_addresses(OWNER)
            assert harness.parent.row(uuid)["access_ip_v4"] == address["PublicIp"]
            harness.send("terminate_instance", {"instance": helpers.instance_prim(uuid),
                                                "delete_type": "delete"})
            wait_for(lambda: uuid not in harness.parent.view.instances, timeout=20)
            assert _admin_addresses(OWNER) == []
        finally:
            harness.stop()


class TestStormBudget:
    def test_capacity_describes_only_when_its_view_is_stale(self, aws):
        backend, h = started(aws, capacity_refresh=20)
        clock = backend.clock = _Clock()
        backend._full_at = clock.now                          # as start() left it
        infos = spawn_many(backend, [request() for _ in range(3)], workers=3)
        h.reset_counts()
        cap = backend.get_capacity([SMALL])
        assert h.calls["DescribeInstances"] == 0
        assert cap.vcpus_used == 3 * 2                         # our launches are counted
        clock.now += 21
        backend.get_capacity([SMALL])
        backend.get_capacity([SMALL])
        assert h.calls["DescribeInstances"] == 1
        # A poll that describes all our instances is as good as a refresh.
        clock.now += 21
        backend.poll([InstanceRef(i.instance_uuid) for i in infos])
        backend.get_capacity([SMALL])
        assert h.calls["DescribeInstances"] == 2

    def test_a_batch_keeps_collecting_while_its_spec_is_being_sent(self, aws):
        # The first launch takes 0.6 s at EC2; builds trickling in meanwhile,
        # with gaps longer than batch_idle, go out together once it answered.
        backend, h = started(aws, batch_idle=0.05, batch_max=2.0)
        h.slow_next("RunInstances", 0.6)
        reqs = [request() for _ in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = []
            for req in reqs:
                futures.append(pool.submit(backend.spawn, req))
                time.sleep(0.15)
            infos = [f.result(10) for f in futures]
        assert len({i.backend_id for i in infos}) == 4
        assert [b["MinCount"] for b in h.requests["RunInstances"]] == [1, 3]
