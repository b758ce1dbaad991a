"""The EC2 backend end to end: a stock Stein parent, a ``cellagent`` subprocess
on real RabbitMQ, and EC2 played by moto's ``ThreadedMotoServer`` on 127.0.0.1.

Every operation the child takes goes through: build, soft and hard reboot,
stop/start, pause/unpause, suspend/resume, resize (confirm and revert),
snapshot, rebuild, console output and delete; the test checks what the
parent sees and what EC2 (moto) really holds. A second test covers the
user's key pair, Nova security groups and Elastic IPs.
"""

import json
import socket
import uuid

import boto3
import pytest

from cellagent.backends.ec2_keys import key_pair_name
from tests.functional.conftest import wait_for
from tests.functional.test_lifecycle import action, build_message, check_format
from tests.functional.test_lifecycle import console_output

IMAGE_UUID = "7c2e1f0a-3b4c-4d5e-9f6a-1b2c3d4e5f60"     # example 1's image
SECRET = "ec2-secret-key-never-logged"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield "http://127.0.0.1:%d" % port
    server.stop()


@pytest.fixture
def ec2(moto_url):
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def ec2_agent(agent_factory, moto_url, ec2):
    ami = ec2.register_image(Name="cirros-%s" % uuid.uuid4().hex[:6], Architecture="x86_64",
                             RootDeviceName="/dev/xvda",
                             VirtualizationType="hvm")["ImageId"]
    owner = "cell1-%s" % uuid.uuid4().hex[:8]
    agent = agent_factory(
        backend__driver="ec2", backend__poll_interval=0.2,
        ec2__endpoint_url=moto_url, ec2__region="us-east-1",
        ec2__access_key_id="AKIAFUNCTIONALTEST01", ec2__secret_access_key=SECRET,
        ec2__owner=owner,
        ec2__instance_type_map="m1.small:t3.micro,m1.medium:t3.small",
        ec2__image_map="%s:%s" % (IMAGE_UUID, ami), ec2__batch_idle=0.05,
        ec2__batch_max=0.3)
    agent.owner = owner
    agent.ami = ami
    return agent


def _public_key():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + \
        " alice@laptop"


def _with_key(msg, key):
    """Example 1's key_data is a truncated placeholder EC2 would refuse."""
    for inst in msg["method_kwargs"]["build_inst_kwargs"]["instances"]:
        inst["nova_object.data"]["key_data"] = key
    return msg


def _ours(ec2, owner, states=("pending", "running", "stopping", "stopped")):
    out = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": "tag:cellagent:owner", "Values": [owner]},
            {"Name": "instance-state-name", "Values": list(states)}]):
        for res in page["Reservations"]:
            out.extend(res["Instances"])
    return out


def _settled(parent, u, vm_state, task_state=None, timeout=30):
    wait_for(lambda: parent.view(u).get("vm_state") == vm_state
             and parent.view(u).get("task_state") == task_state, timeout,
             what=lambda: "%s to be %s/%s, is %s/%s" % (
                 u, vm_state, task_state, parent.view(u).get("vm_state"),
                 parent.view(u).get("task_state")))


def test_whole_lifecycle_on_ec2(parent, ec2_agent, ec2):
    agent = ec2_agent.start()
    uuids = [str(uuid.uuid4()) for _ in range(2)]
    key = _public_key()
    parent.cast(_with_key(build_message(uuids), key))
    for u in uuids:
        _settled(parent, u, "active")
    insts = {i["InstanceId"]: i for i in _ours(ec2, agent.owner)}
    assert len(insts) == 2
    # The user's key, imported once ([ec2] key_pair_mode = import).
    assert {i["KeyName"] for i in insts.values()} == {key_pair_name(key)}
    assert {parent.view(u)["access_ip_v4"] for u in uuids} == {
        i["PublicIpAddress"] for i in insts.values()}
    for i in insts.values():
        assert i["InstanceType"] == "t3.micro" and i["ImageId"] == agent.ami

    target = uuids[0]
    parent.cast(action("reboot_instance", target, reboot_type="SOFT"))
    wait_for(lambda: "rebooting" in [m.instance()[0].get("task_state")
                                     for m in parent.updates(target)], 20)
    _settled(parent, target, "active")

    parent.cast(action("stop_instance", target, clean_shutdown=True))
    _settled(parent, target, "stopped")
    assert [i["State"]["Name"] for i in _ours(ec2, agent.owner, ("stopped",))] == ["stopped"]
    parent.cast(action("start_instance", target))
    _settled(parent, target, "active")

    parent.cast(action("pause_instance", target))
    _settled(parent, target, "paused")
    assert parent.view(target)["power_state"] == 3
    parent.cast(action("unpause_instance", target))
    _settled(parent, target, "active")

    parent.cast(action("suspend_instance", target))
    _settled(parent, target, "suspended")
    parent.cast(action("resume_instance", target))
    _settled(parent, target, "active")

    # Resize: stop, modify the type, start; confirmed.
    parent.cast(action("resize_instance", target, flavor={"flavorid": "3", "name": "m1.medium"},
                       extra_instance_updates={}, clean_shutdown=True))
    _settled(parent, target, "resized", timeout=40)
    running = [i for i in _ours(ec2, agent.owner, ("running",))]
    assert sorted(i["InstanceType"] for i in running) == ["t3.micro", "t3.small"]
    parent.cast(action("confirm_resize", target))
    _settled(parent, target, "active")

    # Snapshot: an AMI of the instance, reported in system_metadata.
    parent.cast(action("snapshot_instance", target, image_id="img-1"))
    wait_for(lambda: "cellagent_snapshot:img-1" in (
        parent.view(target).get("system_metadata") or {}), 30, what="snapshot reported")
    snap = parent.view(target)["system_metadata"]["cellagent_snapshot:img-1"]
    assert ec2.describe_images(ImageIds=[snap])["Images"][0]["ImageId"] == snap

    # Rebuild: a new launch generation replaces the EC2 instance.
    old_ids = {i["InstanceId"] for i in _ours(ec2, agent.owner)}
    parent.cast(action("rebuild_instance", target, image_href=IMAGE_UUID, admin_password=None,
                       files_to_inject=[], preserve_ephemeral=False, kwargs={}))
    wait_for(lambda: "rebuild_spawning" in [m.instance()[0].get("task_state")
                                            for m in parent.updates(target)], 30)
    _settled(parent, target, "active", timeout=40)
    live = {i["InstanceId"] for i in _ours(ec2, agent.owner)}
    assert len(live) == 2 and live != old_ids

    # Console output: a call answered through the cells protocol.
    _, resp = console_output(parent, target)
    entry = json.loads(resp.kwargs["responses"][0])
    assert entry["failure"] is False and isinstance(entry["value"], str)

    for u in uuids:
        parent.cast(action("terminate_instance", u, delete_type="delete"))
    wait_for(lambda: parent.destroyed() >= set(uuids), 40, what="destroy_at_top")
    assert _ours(ec2, agent.owner) == []

    for rec in parent.received():
        check_format(rec)
    assert SECRET not in agent.log()
    assert agent.terminate() == 0


def test_key_security_groups_and_elastic_ip_on_ec2(parent, agent_factory, moto_url, ec2):
    ami = ec2.register_image(Name="cirros-%s" % uuid.uuid4().hex[:6], Architecture="x86_64",
                             RootDeviceName="/dev/xvda",
                             VirtualizationType="hvm")["ImageId"]
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    web = ec2.create_security_group(GroupName="web-%s" % uuid.uuid4().hex[:6],
                                    Description="web", VpcId=vpc)["GroupId"]
    owner = "cell1-%s" % uuid.uuid4().hex[:8]
    agent = agent_factory(
        backend__driver="ec2", backend__poll_interval=0.2,
        ec2__endpoint_url=moto_url, ec2__region="us-east-1",
        ec2__access_key_id="AKIAFUNCTIONALTEST01", ec2__secret_access_key=SECRET,
        ec2__owner=owner, ec2__instance_type_map="m1.small:t3.micro",
        ec2__image_map="%s:%s" % (IMAGE_UUID, ami), ec2__batch_idle=0.05,
        ec2__batch_max=0.3, ec2__security_group_map="web:%s" % web, ec2__elastic_ip=True)
    agent.start()

    def addresses():
        return [a for a in ec2.describe_addresses()["Addresses"]
                if {t["Key"]: t["Value"] for t in a.get("Tags", [])}.get(
                    "cellagent:owner") == owner]

    good, bad = str(uuid.uuid4()), str(uuid.uuid4())
    key = _public_key()
    msg = _with_key(build_message([good]), key)
    msg["method_kwargs"]["build_inst_kwargs"]["security_groups"] = ["web"]
    parent.cast(msg)
    _settled(parent, good, "active")
    inst, = _ours(ec2, owner)
    assert [g["GroupId"] for g in inst["SecurityGroups"]] == [web]
    assert inst["KeyName"] == key_pair_name(key)
    address, = addresses()
    assert address["InstanceId"] == inst["InstanceId"]
    assert parent.view(good)["access_ip_v4"] == address["PublicIp"]

    # A group the operator did not map: ERROR with a fault naming it.
    msg = _with_key(build_message([bad]), key)
    msg["method_kwargs"]["build_inst_kwargs"]["security_groups"] = ["admin-only"]
    parent.cast(msg)
    _settled(parent, bad, "error")
    faults = [m.kwargs["instance_fault"] for m in parent.received(
        "instance_fault_create_at_top")
        if m.kwargs["instance_fault"].get("instance_uuid") == bad]
    assert faults and "admin-only" in faults[0]["message"]
    assert len(_ours(ec2, owner)) == 1

    for u in (good, bad):
        parent.cast(action("terminate_instance", u, delete_type="delete"))
    wait_for(lambda: parent.destroyed() >= {good, bad}, 40, what="destroy_at_top")
    assert _ours(ec2, owner) == [] and addresses() == []
    assert SECRET not in agent.log()
    assert agent.terminate() == 0
