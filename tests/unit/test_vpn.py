"""``cellagent.vpn`` and ``cellagent-manage vpn`` on in-process moto.

moto 5.2.5 makes VPN gateways, customer gateways and VPN connections (with
the CustomerGatewayConfiguration XML, both tunnels alike: one outside IP,
one key), but does not implement CreateVpnConnectionRoute or
EnableVgwRoutePropagation (issue 5, item 10). The calls are counted with a
botocore ``before-call`` hook, which also answers for moto where a test
needs EC2's real behaviour (a ``before-call`` handler that returns a
response stops the request before it reaches moto).
"""

import logging
import os
import stat
import types

import boto3
import botocore.parsers
import pytest
from moto import mock_aws
from oslo_config import cfg

from cellagent import exception
from cellagent import vpn
from cellagent.cmd import manage

REGION = "us-east-1"
VPC_CIDR = "10.20.0.0/16"
CUSTOMER_IP = "203.0.113.5"
PRIVATE = ["192.168.0.0/24", "192.168.1.0/24"]

# An AWS-shaped configuration with two different tunnels, as AWS returns it
# (moto's has two identical ones).
AWS_XML = """<?xml version="1.0" encoding="UTF-8"?>
<vpn_connection id="vpn-0123456789abcdef0">
  <customer_gateway_id>cgw-0123456789abcdef0</customer_gateway_id>
  <vpn_gateway_id>vgw-0123456789abcdef0</vpn_gateway_id>
  <vpn_connection_type>ipsec.1</vpn_connection_type>
  <vpn_connection_attributes>NoBGPVPNConnection</vpn_connection_attributes>
  %s
</vpn_connection>"""
TUNNEL_XML = """<ipsec_tunnel>
    <customer_gateway>
      <tunnel_outside_address><ip_address>198.51.100.7</ip_address></tunnel_outside_address>
      <tunnel_inside_address><ip_address>%(cgw_in)s</ip_address>
        <network_mask>255.255.255.252</network_mask><network_cidr>30</network_cidr>
      </tunnel_inside_address>
    </customer_gateway>
    <vpn_gateway>
      <tunnel_outside_address><ip_address>%(aws_ip)s</ip_address></tunnel_outside_address>
      <tunnel_inside_address><ip_address>%(vgw_in)s</ip_address>
        <network_mask>255.255.255.252</network_mask><network_cidr>30</network_cidr>
      </tunnel_inside_address>
    </vpn_gateway>
    <ike>
      <authentication_protocol>sha2-256</authentication_protocol>
      <encryption_protocol>aes-256-cbc</encryption_protocol>
      <lifetime>28800</lifetime>
      <perfect_forward_secrecy>group14</perfect_forward_secrecy>
      <mode>main</mode>
      <pre_shared_key>%(psk)s</pre_shared_key>
    </ike>
    <ipsec>
      <protocol>esp</protocol>
      <authentication_protocol>hmac-sha1-96</authentication_protocol>
      <encryption_protocol>aes-128-cbc</encryption_protocol>
      <lifetime>3600</lifetime>
      <perfect_forward_secrecy>group2</perfect_forward_secrecy>
      <mode>tunnel</mode>
      <dead_peer_detection><interval>10</interval><retries>3</retries></dead_peer_detection>
    </ipsec>
  </ipsec_tunnel>"""
PSK1, PSK2 = "k3yOne.for_tunnel1xxxxxxxxxxxxxx", "k3yTwo.for_tunnel2yyyyyyyyyyyyyy"
TUNNELS = [dict(aws_ip="34.200.1.10", cgw_in="169.254.10.2", vgw_in="169.254.10.1",
                psk=PSK1),
           dict(aws_ip="52.70.2.20", cgw_in="169.254.20.2", vgw_in="169.254.20.1",
                psk=PSK2)]


def aws_xml():
    return AWS_XML % "\n".join(TUNNEL_XML % t for t in TUNNELS)


class Calls:
    """Every EC2 operation a client makes, with its parameters; can answer some."""

    def __init__(self, client):
        self.log = []
        self.answers = {}
        client.meta.events.register("before-parameter-build.ec2.*", self._record)
        client.meta.events.register("before-call.ec2.*", self._before_call)

    def _record(self, model, params, context, **kwargs):
        context["test_params"] = dict(params)
        self.log.append((model.name, context["test_params"]))

    def _before_call(self, model, context, **kwargs):
        answer = self.answers.get(model.name)
        if answer is None:
            return None
        status, parsed = answer(context["test_params"]) if callable(answer) else answer
        parsed.setdefault("ResponseMetadata", {"HTTPStatusCode": status})
        return types.SimpleNamespace(status_code=status, headers={}), parsed

    def named(self, name):
        return [params for op, params in self.log if op == name]

    def creates(self):
        return [op for op, _params in self.log if op.startswith(("Create", "Attach"))
                and op != "CreateVpnConnectionRoute"]


@pytest.fixture(autouse=True)
def _botocore_log_level():
    # cellagent-manage vpn raises botocore's logger to INFO; undo it.
    logger = logging.getLogger("botocore")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.fixture
def aws(monkeypatch):
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield


@pytest.fixture
def ec2(aws):
    return boto3.client("ec2", region_name=REGION)


@pytest.fixture
def vpc_id(ec2):
    return ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]


@pytest.fixture
def calls(ec2):
    return Calls(ec2)


@pytest.fixture
def raw(aws):
    """A second client, without the hooks: what happens behind our back."""
    return boto3.client("ec2", region_name=REGION)


def provisioner(ec2, vpc_id, name="onprem", **kwargs):
    kwargs.setdefault("customer_ip", CUSTOMER_IP)
    kwargs.setdefault("private_cidrs", PRIVATE)
    return vpn.VpnProvisioner(ec2, name, vpc_id=vpc_id, poll_interval=0,
                              sleep=lambda _s: None, **kwargs)


def tagged(ec2, name="onprem"):
    """Live objects tagged with the VPN's name, by kind."""
    f = [{"Name": "tag:%s" % vpn.TAG_KEY, "Values": [name]}]
    live = ("pending", "available")
    return {
        "vgw": [g for g in ec2.describe_vpn_gateways(Filters=f)["VpnGateways"]
                if g["State"] in live],
        # moto ignores the tag filter here (see cellagent.vpn._tagged)
        "cgw": [g for g in ec2.describe_customer_gateways(Filters=f)["CustomerGateways"]
                if g["State"] in live and {"Key": vpn.TAG_KEY, "Value": name} in g["Tags"]],
        "vpn": [c for c in ec2.describe_vpn_connections(Filters=f)["VpnConnections"]
                if c["State"] in live],
    }


def everything(ec2):
    """How many of each object exist at all (any state, any tag)."""
    return (len(ec2.describe_vpn_gateways()["VpnGateways"]),
            len(ec2.describe_customer_gateways()["CustomerGateways"]),
            len(ec2.describe_vpn_connections()["VpnConnections"]))


def moto_psk(ec2):
    conn = ec2.describe_vpn_connections()["VpnConnections"][0]
    return vpn.parse_customer_gateway_configuration(
        conn["CustomerGatewayConfiguration"])[0].psk


# -- create -------------------------------------------------------------------

def test_create_makes_three_tagged_objects_and_attaches(ec2, vpc_id, calls):
    state = provisioner(ec2, vpc_id).create()
    found = tagged(ec2)
    assert [len(found[k]) for k in ("vgw", "cgw", "vpn")] == [1, 1, 1]
    vgw, cgw, conn = found["vgw"][0], found["cgw"][0], found["vpn"][0]
    for obj in (vgw, cgw, conn):
        tags = {t["Key"]: t["Value"] for t in obj["Tags"]}
        assert tags == {"cellagent:vpn": "onprem", "Name": "cellagent-vpn-onprem"}
    assert vgw["Type"] == "ipsec.1"
    assert vgw["VpcAttachments"] == [{"VpcId": vpc_id, "State": "attached"}]
    assert (cgw["IpAddress"], cgw["BgpAsn"]) == (CUSTOMER_IP, "65000")
    assert (conn["VpnGatewayId"], conn["CustomerGatewayId"]) == (
        vgw["VpnGatewayId"], cgw["CustomerGatewayId"])
    # moto does not echo Options back: check what was asked for.
    [params] = calls.named("CreateVpnConnection")
    assert params["Options"] == {"StaticRoutesOnly": True} and params["Type"] == "ipsec.1"
    assert state.vpn_gateway["VpnGatewayId"] == vgw["VpnGatewayId"]
    assert state.customer_gateway["CustomerGatewayId"] == cgw["CustomerGatewayId"]
    assert state.connection["VpnConnectionId"] == conn["VpnConnectionId"]
    assert len(state.tunnels) == 2 and state.tunnels[0].aws_outside_ip


def test_create_again_changes_nothing(ec2, vpc_id, calls):
    first = provisioner(ec2, vpc_id).create()
    before = everything(ec2)
    assert before == (1, 1, 1)
    n = len(calls.log)
    second = provisioner(ec2, vpc_id).create()
    assert everything(ec2) == before
    assert calls.creates() == [
        "CreateVpnGateway", "AttachVpnGateway", "CreateCustomerGateway", "CreateVpnConnection"]
    assert not [op for op, _ in calls.log[n:] if op in (
        "CreateVpnGateway", "AttachVpnGateway", "CreateCustomerGateway", "CreateVpnConnection")]
    assert vpn.describe(second) == vpn.describe(first)
    assert provisioner(ec2, vpc_id).render(second) == provisioner(ec2, vpc_id).render(first)


def test_create_attempts_each_route_and_propagation_and_keeps_going(ec2, vpc_id, calls,
                                                                     caplog):
    caplog.set_level(logging.WARNING, logger="cellagent.vpn")
    state = provisioner(ec2, vpc_id).create()
    conn_id = state.connection["VpnConnectionId"]
    assert calls.named("CreateVpnConnectionRoute") == [
        {"VpnConnectionId": conn_id, "DestinationCidrBlock": cidr} for cidr in PRIVATE]
    tables = [t["RouteTableId"] for t in ec2.describe_route_tables(
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["RouteTables"]]
    assert tables and calls.named("EnableVgwRoutePropagation") == [
        {"RouteTableId": rtb, "GatewayId": state.vpn_gateway["VpnGatewayId"]}
        for rtb in tables]
    # One warning per step EC2 could not do, each with the command that does it.
    assert len(state.notes) == len(PRIVATE) + len(tables)
    for cidr in PRIVATE:
        assert any("create-vpn-connection-route" in n and cidr in n for n in state.notes)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(state.notes)
    assert all("does not implement" in w for w in warnings)


def test_create_on_an_endpoint_that_implements_routes(ec2, vpc_id, calls):
    calls.answers["CreateVpnConnectionRoute"] = (200, {})
    calls.answers["EnableVgwRoutePropagation"] = (200, {})
    state = provisioner(ec2, vpc_id).create()
    assert state.notes == []
    assert len(calls.named("CreateVpnConnectionRoute")) == len(PRIVATE)


def test_create_skips_routes_the_connection_has(ec2, vpc_id, calls, raw):
    p = provisioner(ec2, vpc_id)
    p.create()

    def with_routes(params):
        conns = raw.describe_vpn_connections(**params)["VpnConnections"]
        for c in conns:
            c["Routes"] = [{"DestinationCidrBlock": PRIVATE[0], "State": "available"}]
        return 200, {"VpnConnections": conns}
    calls.answers["DescribeVpnConnections"] = with_routes
    n = len(calls.named("CreateVpnConnectionRoute"))
    state = provisioner(ec2, vpc_id).create()
    assert calls.named("CreateVpnConnectionRoute")[n:] == [
        {"VpnConnectionId": state.connection["VpnConnectionId"],
         "DestinationCidrBlock": PRIVATE[1]}]


def _raise(error):
    def answer(_params):
        raise error
    return answer


@pytest.mark.parametrize("answer", [
    # moto server's HTML 500 page, after botocore's retries
    _raise(botocore.parsers.ResponseParserError("invalid XML received")),
    # an EC2-compatible endpoint that says so in EC2's own words
    (400, {"Error": {"Code": "InvalidAction", "Message": "not supported"}}),
    (501, {"Error": {"Code": "NotImplemented", "Message": "not implemented"}}),
])
def test_create_on_other_endpoints_without_routes(ec2, vpc_id, calls, answer):
    calls.answers["CreateVpnConnectionRoute"] = answer
    calls.answers["EnableVgwRoutePropagation"] = answer
    state = provisioner(ec2, vpc_id).create()
    assert len(state.notes) == len(PRIVATE) + 1
    assert len(calls.named("CreateVpnConnectionRoute")) == len(PRIVATE)


def test_create_stops_on_a_real_route_error(ec2, vpc_id, calls):
    calls.answers["CreateVpnConnectionRoute"] = (400, {"Error": {
        "Code": "InvalidParameterValue", "Message": "bad\ncidr"}})
    with pytest.raises(exception.BackendError) as e:
        provisioner(ec2, vpc_id).create()
    assert "InvalidParameterValue" in e.value.message and "\n" not in e.value.message


def test_create_in_a_missing_vpc(ec2, vpc_id):
    with pytest.raises(exception.CellAgentError) as e:
        provisioner(ec2, "vpc-12345678").create()
    assert e.value.message == "VPC vpc-12345678 does not exist in region us-east-1"
    assert everything(ec2) == (0, 0, 0)


@pytest.mark.parametrize("kwargs, words", [
    ({"customer_ip": None}, ("--customer-ip",)),
    ({"private_cidrs": []}, ("--private-cidr",)),
    ({"customer_ip": "host.example"}, ("--customer-ip", "IPv4")),
    ({"customer_ip": "2001:db8::1"}, ("--customer-ip", "IPv4")),
    ({"private_cidrs": ["192.168.0.1/24"]}, ("--private-cidr", "192.168.0.1/24")),
    ({"private_cidrs": ["fd00::/64"]}, ("--private-cidr", "IPv4")),
    ({"remote_cidrs": ["nope"]}, ("--remote-cidr", "nope")),
    ({"bgp_asn": 0}, ("--bgp-asn",)),
])
def test_create_bad_arguments(ec2, vpc_id, calls, kwargs, words):
    with pytest.raises(exception.ConfigurationError) as e:
        provisioner(ec2, vpc_id, **kwargs).create()
    for word in words:
        assert word in e.value.message
    assert calls.log == []


def test_bad_name(ec2):
    with pytest.raises(exception.ConfigurationError):
        vpn.VpnProvisioner(ec2, "on prem")


def test_create_refuses_objects_that_do_not_match(ec2, vpc_id):
    provisioner(ec2, vpc_id).create()
    with pytest.raises(exception.ConfigurationError) as e:
        provisioner(ec2, vpc_id, customer_ip="198.51.100.9").create()
    assert "198.51.100.9" in e.value.message and CUSTOMER_IP in e.value.message
    other = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    with pytest.raises(exception.ConfigurationError) as e:
        provisioner(ec2, other).create()
    assert "attached to %s, not %s" % (vpc_id, other) in e.value.message
    assert everything(ec2) == (1, 1, 1)


def test_create_gives_up_waiting_for_the_attachment(ec2, vpc_id, calls, raw):
    def attaching(params):
        return 200, {"VpnGateways": [{"VpnGatewayId": params["VpnGatewayIds"][0],
                                      "State": "available", "Type": "ipsec.1",
                                      "VpcAttachments": [{"VpcId": vpc_id,
                                                          "State": "attaching"}]}]}
    # Once asked to attach, the gateway stays "attaching".
    calls.answers["DescribeVpnGateways"] = lambda p: (
        attaching(p) if calls.named("AttachVpnGateway")
        else (200, raw.describe_vpn_gateways(**p)))
    p = provisioner(ec2, vpc_id)
    p.wait_timeout = 0
    with pytest.raises(exception.BackendUnavailable) as e:
        p.create()
    assert "to be attached" in e.value.message and e.value.retryable
    assert not calls.named("CreateCustomerGateway")


# -- strongSwan -----------------------------------------------------------------

def test_parse_and_render_two_tunnels():
    tunnels = vpn.parse_customer_gateway_configuration(
        aws_xml(), tunnel_options=[{"OutsideIpAddress": "52.70.2.20",
                                    "IkeVersions": [{"Value": "ikev2"}]}],
        telemetry=[{"OutsideIpAddress": "34.200.1.10", "Status": "UP"}])
    assert [t.aws_outside_ip for t in tunnels] == ["34.200.1.10", "52.70.2.20"]
    assert [t.ike_version for t in tunnels] == ["ikev1", "ikev2"]
    assert [t.status for t in tunnels] == ["UP", None]
    t = tunnels[0]
    assert (t.customer_outside_ip, t.aws_inside_cidr, t.customer_inside_cidr) == (
        "198.51.100.7", "169.254.10.1/30", "169.254.10.2/30")
    assert (t.ike_proposal, t.esp_proposal) == ("aes256-sha256-modp2048", "aes128-sha1-modp1024")
    assert PSK1 not in repr(tunnels)

    conf = vpn.render_ipsec_conf("onprem", tunnels, PRIVATE, [VPC_CIDR])
    secrets = vpn.render_ipsec_secrets("onprem", tunnels)
    for aws_ip in ("34.200.1.10", "52.70.2.20"):
        assert "right=%s" % aws_ip in conf and aws_ip in secrets
    assert PSK1 not in conf and PSK2 not in conf
    assert '198.51.100.7 34.200.1.10 : PSK "%s"' % PSK1 in secrets.splitlines()
    assert '198.51.100.7 52.70.2.20 : PSK "%s"' % PSK2 in secrets.splitlines()
    conns = {c.splitlines()[0]: [line.strip() for line in c.splitlines()]
             for c in conf.split("\nconn ")[1:]}
    # IKEv1 (tunnel 1): one conn per subnet pair; IKEv2 (tunnel 2): one conn.
    assert list(conns) == ["cellagent-onprem-1-1", "cellagent-onprem-1-2",
                           "cellagent-onprem-2"]
    expected = {"cellagent-onprem-1-1": ("ikev1", "34.200.1.10", PRIVATE[0]),
                "cellagent-onprem-1-2": ("ikev1", "34.200.1.10", PRIVATE[1]),
                "cellagent-onprem-2": ("ikev2", "52.70.2.20", ",".join(PRIVATE))}
    for conn, (version, aws_ip, left) in expected.items():
        lines = conns[conn]
        assert "keyexchange=%s" % version in lines
        assert "right=%s" % aws_ip in lines and "rightid=%s" % aws_ip in lines
        assert "leftsubnet=%s" % left in lines
        assert "rightsubnet=%s" % VPC_CIDR in lines
        assert "auto=start" in lines and "authby=secret" in lines
        assert "leftid=198.51.100.7" in lines
        assert {"dpddelay=10s", "dpdtimeout=30s", "dpdaction=restart"} <= set(lines)
        assert "ike=aes256-sha256-modp2048!" in lines and "esp=aes128-sha1-modp1024!" in lines
        assert ("mobike=no" in lines) == (version == "ikev2")


def test_unknown_proposal_falls_back_to_strongswan_defaults():
    xml = aws_xml().replace("aes-256-cbc", "chacha-9000")
    conf = vpn.render_ipsec_conf("x", vpn.parse_customer_gateway_configuration(xml),
                                 PRIVATE, [VPC_CIDR])
    assert "ike=" not in conf and "esp=aes128-sha1-modp1024!" in conf
    assert "strongSwan's defaults apply" in conf


@pytest.mark.parametrize("xml", ["not xml", "<vpn_connection/>",
                                 aws_xml().replace("<pre_shared_key>", "<other>")
                                 .replace("</pre_shared_key>", "</other>")])
def test_parse_bad_configuration(xml):
    with pytest.raises(exception.CellAgentError) as e:
        vpn.parse_customer_gateway_configuration(xml)
    assert PSK1 not in e.value.message


def test_secrets_refuse_a_key_that_breaks_quoting():
    xml = aws_xml().replace(PSK1, 'a"b')
    with pytest.raises(exception.CellAgentError):
        vpn.render_ipsec_secrets("x", vpn.parse_customer_gateway_configuration(xml))


def test_render_from_moto(ec2, vpc_id):
    p = provisioner(ec2, vpc_id, remote_cidrs=["10.20.1.0/24"])
    state = p.create()
    conf, secrets = p.render(state)
    psk = moto_psk(ec2)
    for t in state.tunnels:
        assert "right=%s" % t.aws_outside_ip in conf
        assert t.aws_outside_ip in secrets
    assert psk in secrets and psk not in conf
    assert "rightsubnet=10.20.1.0/24" in conf


def test_remote_cidrs_default_to_the_vpc(ec2, vpc_id):
    p = provisioner(ec2, vpc_id)
    conf, _ = p.render(p.create())
    assert "rightsubnet=%s" % VPC_CIDR in conf


def test_write_config_mode_0600(tmp_path):
    out = tmp_path / "vpn" / "onprem"
    paths = vpn.write_config(str(out), "conf\n", "secret\n")
    assert paths == [str(out / "ipsec.conf"), str(out / "ipsec.secrets")]
    for path in paths:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(paths[1], 0o644)
    vpn.write_config(str(out), "conf2\n", "secret2\n")
    assert stat.S_IMODE(os.stat(paths[1]).st_mode) == 0o600
    assert open(paths[1]).read() == "secret2\n"
    assert sorted(os.listdir(out)) == ["ipsec.conf", "ipsec.secrets"]


# -- show -----------------------------------------------------------------------

def test_show_masks_the_keys(ec2, vpc_id):
    created = provisioner(ec2, vpc_id).create()
    state = vpn.VpnProvisioner(ec2, "onprem").show()
    psk = moto_psk(ec2)
    text = "\n".join(vpn.describe(state))
    assert psk not in text and psk not in repr(state)
    assert "CustomerGatewayConfiguration" not in state.connection
    assert text.count("psk %s" % vpn.MASK) == 2
    for obj_id in (created.vpn_gateway["VpnGatewayId"],
                   created.customer_gateway["CustomerGatewayId"],
                   created.connection["VpnConnectionId"]):
        assert obj_id in text
    assert "available" in text and state.tunnels[0].aws_outside_ip in text


def test_show_nothing(ec2):
    with pytest.raises(exception.CellAgentError) as e:
        vpn.VpnProvisioner(ec2, "onprem").show()
    assert "no VPN named onprem" in e.value.message


# -- delete ---------------------------------------------------------------------

def test_delete_removes_everything_and_is_idempotent(ec2, vpc_id, calls):
    created = provisioner(ec2, vpc_id).create()
    done = vpn.VpnProvisioner(ec2, "onprem", poll_interval=0).delete()
    vgw_id = created.vpn_gateway["VpnGatewayId"]
    assert done == ["deleted VPN connection %s" % created.connection["VpnConnectionId"],
                    "detached VPN gateway %s from %s" % (vgw_id, vpc_id),
                    "deleted VPN gateway %s" % vgw_id,
                    "deleted customer gateway %s"
                    % created.customer_gateway["CustomerGatewayId"]]
    assert tagged(ec2) == {"vgw": [], "cgw": [], "vpn": []}
    [vgw] = ec2.describe_vpn_gateways(VpnGatewayIds=[vgw_id])["VpnGateways"]
    assert vgw["State"] == "deleted"
    assert all(a["State"] == "detached" for a in vgw["VpcAttachments"])
    n = len(calls.log)
    assert vpn.VpnProvisioner(ec2, "onprem").delete() == []
    assert not [op for op, _ in calls.log[n:] if not op.startswith("Describe")]
    with pytest.raises(exception.CellAgentError):
        vpn.VpnProvisioner(ec2, "onprem").show()


def test_delete_leaves_other_vpns(ec2, vpc_id):
    provisioner(ec2, vpc_id).create()
    other_vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
    provisioner(ec2, other_vpc, name="other", customer_ip="198.51.100.9").create()
    vpn.VpnProvisioner(ec2, "onprem").delete()
    assert [len(v) for v in tagged(ec2, "other").values()] == [1, 1, 1]


def test_delete_ignores_objects_already_gone(ec2, vpc_id, calls, raw):
    # Someone deletes each object between our describe and our delete.
    provisioner(ec2, vpc_id).create()

    def gone(call, code):
        def answer(params):
            call(**params)
            return 400, {"Error": {"Code": code, "Message": "gone"}}
        return answer
    calls.answers["DeleteVpnConnection"] = gone(raw.delete_vpn_connection,
                                                "InvalidVpnConnectionID.NotFound")
    calls.answers["DeleteCustomerGateway"] = gone(raw.delete_customer_gateway,
                                                  "InvalidCustomerGatewayID.NotFound")
    vpn.VpnProvisioner(ec2, "onprem", wait_timeout=5).delete()
    assert calls.named("DeleteVpnConnection") and calls.named("DeleteCustomerGateway")
    assert tagged(ec2) == {"vgw": [], "cgw": [], "vpn": []}


def test_delete_gives_up_waiting(ec2, vpc_id, calls):
    provisioner(ec2, vpc_id).create()
    calls.answers["DeleteVpnConnection"] = (200, {})     # accepted, never done
    with pytest.raises(exception.BackendUnavailable) as e:
        vpn.VpnProvisioner(ec2, "onprem", wait_timeout=0).delete()
    assert "to be deleted" in e.value.message


def test_create_after_delete_makes_new_objects(ec2, vpc_id):
    first = provisioner(ec2, vpc_id).create()
    vpn.VpnProvisioner(ec2, "onprem").delete()
    second = provisioner(ec2, vpc_id).create()
    assert second.vpn_gateway["VpnGatewayId"] != first.vpn_gateway["VpnGatewayId"]
    assert [len(v) for v in tagged(ec2).values()] == [1, 1, 1]


# -- logs -----------------------------------------------------------------------

def test_no_key_in_logs(ec2, vpc_id, caplog, tmp_path):
    # Callers keep botocore at INFO (it logs response bodies at DEBUG);
    # everything else, cellagent included, is captured at DEBUG.
    caplog.set_level(logging.DEBUG)
    logging.getLogger("botocore").setLevel(logging.INFO)
    p = provisioner(ec2, vpc_id)
    state = p.create()
    conf, secrets = p.render(state)
    vpn.write_config(str(tmp_path), conf, secrets)
    vpn.VpnProvisioner(ec2, "onprem").show()
    vpn.VpnProvisioner(ec2, "onprem").delete()
    psk = state.tunnels[0].psk
    assert "created VPN connection" in caplog.text
    assert psk not in caplog.text
    for record in caplog.records:
        assert psk not in repr(record.args)


# -- cellagent-manage vpn -------------------------------------------------------

@pytest.fixture
def cli(tmp_path, capsys, aws):
    conf = tmp_path / "cellagent.conf"
    log = tmp_path / "manage.log"
    # debug on: the leak test below must see DEBUG logging at work.
    conf.write_text("[DEFAULT]\ndebug = true\nlog_file = %s\nuse_stderr = false\n"
                    "[database]\nconnection = memory://\n" % log)

    def run(*args):
        code = manage.main(["--config-file", str(conf), "vpn", *args])
        out, err = capsys.readouterr()
        return code, out, err
    run.log = log
    return run


def _create_args(vpc_id, *extra):
    args = ["create", "onprem", "--vpc-id", vpc_id, "--customer-ip", CUSTOMER_IP]
    for cidr in PRIVATE:
        args += ["--private-cidr", cidr]
    return args + ["--region", REGION, *extra]


def _one_line_error(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cellagent-manage: ")
    for word in words:
        assert word in lines[0]


def test_cli_end_to_end(cli, ec2, vpc_id, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = cli(*_create_args(vpc_id, "--output-dir", str(out_dir)))
    assert code == 0, err
    paths = [str(out_dir / "ipsec.conf"), str(out_dir / "ipsec.secrets")]
    assert ["wrote %s" % p for p in paths] == out.splitlines()[-2:]
    for path in paths:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    psk = moto_psk(ec2)
    assert psk not in out and psk not in err
    assert psk in open(paths[1]).read() and psk not in open(paths[0]).read()
    assert "warning: CreateVpnConnectionRoute" in out
    found = tagged(ec2)
    assert found["vgw"][0]["VpnGatewayId"] in out and found["vpn"][0]["VpnConnectionId"] in out

    code, again, _ = cli(*_create_args(vpc_id, "--output-dir", str(out_dir)))
    assert code == 0 and again == out
    assert everything(ec2) == (1, 1, 1)

    code, shown, _ = cli("show", "onprem", "--region", REGION)
    assert code == 0 and psk not in shown and "psk %s" % vpn.MASK in shown
    assert shown.splitlines()[0] == "vpn onprem"
    assert shown.splitlines() == [line for line in out.splitlines()
                                  if not line.startswith(("  warning", "wrote"))]

    code, out, _ = cli("delete", "onprem", "--region", REGION)
    assert code == 0 and len(out.splitlines()) == 4
    assert all(line.startswith("vpn onprem: d") for line in out.splitlines())
    assert cli("delete", "onprem", "--region", REGION)[:2] == (
        0, "vpn onprem: nothing to delete\n")
    code, _, err = cli("show", "onprem", "--region", REGION)
    assert code == 1
    _one_line_error(err, "no VPN named onprem")

    log = open(cli.log).read()
    assert "DEBUG" in log and "created VPN connection" in log
    assert psk not in log


def test_cli_without_output_dir_writes_nothing(cli, vpc_id, tmp_path):
    code, out, _ = cli(*_create_args(vpc_id))
    assert code == 0
    assert out.splitlines()[-1] == "give --output-dir DIR to write ipsec.conf and ipsec.secrets"


def test_cli_without_region_flag(cli, vpc_id, monkeypatch):
    # [ec2] region (us-east-1 by default) or, without the group, boto3's chain.
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    args = [a for a in _create_args(vpc_id) if a not in ("--region", REGION)]
    assert cli(*args)[0] == 0
    assert cli("show", "onprem")[0] == 0


@pytest.mark.parametrize("change, words", [
    ({"--vpc-id": "vpc-12345678"}, ("VPC vpc-12345678 does not exist", REGION)),
    ({"--vpc-id": None}, ("--vpc-id",)),
    ({"--customer-ip": "300.1.1.1"}, ("--customer-ip", "300.1.1.1")),
])
def test_cli_errors(cli, ec2, vpc_id, change, words):
    args = _create_args(vpc_id)
    for flag, value in change.items():
        i = args.index(flag)
        if value is None:
            del args[i:i + 2]
        else:
            args[i + 1] = value
    code, out, err = cli(*args)
    assert code == 1 and out == ""
    _one_line_error(err, *words)
    assert everything(ec2) == (0, 0, 0)


def test_cli_unwritable_output_dir(cli, vpc_id, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = cli(*_create_args(vpc_id, "--output-dir", str(blocker / "sub")))
    assert code == 1
    _one_line_error(err, "cannot write")


def test_ec2_settings_from_the_ec2_group(conf):
    assert manage._ec2_settings(cfg.ConfigOpts()) == {}
    conf.set_override("region", "eu-west-1", group="ec2")
    conf.set_override("endpoint_url", "http://127.0.0.1:5000", group="ec2")
    conf.set_override("secret_access_key", "s", group="ec2")
    settings = manage._ec2_settings(conf)
    assert (settings["region"], settings["endpoint_url"], settings["secret_key"]) == (
        "eu-west-1", "http://127.0.0.1:5000", "s")
    args = types.SimpleNamespace(vpn_region=None, vpn_endpoint_url=None)
    client = manage._ec2_client(conf, args)
    assert client.meta.region_name == "eu-west-1"
    assert client.meta.endpoint_url == "http://127.0.0.1:5000"
    args = types.SimpleNamespace(vpn_region="ap-south-1", vpn_endpoint_url="http://127.0.0.1:1")
    client = manage._ec2_client(conf, args)
    assert (client.meta.region_name, client.meta.endpoint_url) == (
        "ap-south-1", "http://127.0.0.1:1")
