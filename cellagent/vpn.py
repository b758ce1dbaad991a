"""The site-to-site VPN from the private cloud into the EC2 VPC (issue 5, item 9).

``VpnProvisioner`` makes, shows and removes the three EC2 objects of one
named VPN, and the functions below turn what EC2 returns into a strongSwan
configuration for the private side:

* a *VPN gateway* (``ipsec.1``) attached to the VPC;
* a *customer gateway* for the private side's public IP;
* a *VPN connection* between the two, with static routes only (policy-based
  strongSwan on the private side; BGP would need VTIs and a routing daemon
  there, which this command does not set up).

Every object carries the tag ``cellagent:vpn=<name>``, set at creation
through ``TagSpecifications`` (so no object ever exists untagged), and
``create`` looks for the tagged object before it creates one: running it
again changes nothing and returns the same ids. Two steps are best effort,
because some EC2-compatible endpoints (moto among them) do not implement
them: the static routes of the connection (``CreateVpnConnectionRoute``)
and route propagation into the VPC's route tables
(``EnableVgwRoutePropagation``). When the endpoint says it cannot, the
step is logged as a warning and returned in ``VpnState.notes`` with the
command that does it by hand; any other error stops ``create``.

The pre-shared keys are secrets. They live only in ``Tunnel.psk`` (left out
of ``repr``), in the rendered ``ipsec.secrets`` and in the file written
from it (mode 0600). Nothing here logs them, ``describe`` masks them, and
the XML they come in is never logged. botocore itself logs whole responses
at DEBUG, keys included: the caller keeps botocore's loggers at INFO or
above (``cellagent-manage vpn`` does).

The EC2 client is given, built by the caller (``cmd/manage.py``): this
module reads no configuration.
"""

import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import tempfile
import time
import xml.etree.ElementTree as ET

import botocore.exceptions
import botocore.parsers

from cellagent import exception

LOG = logging.getLogger(__name__)

TAG_KEY = "cellagent:vpn"
MASK = "********"

# States in which an object still counts as "the VPN's"; EC2 keeps deleted
# objects visible to Describe* for a while, in state "deleted".
_LIVE = ("pending", "available")
_ATTACHED = ("attaching", "attached")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

# Error codes with which an endpoint says it does not implement an action.
# In-process moto raises NotImplementedError instead, and moto server
# answers with an HTML 500 page that botocore cannot parse.
_UNSUPPORTED_CODES = ("NotImplemented", "InvalidAction", "UnsupportedOperation")
_AUTH_CODES = ("AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId",
               "SignatureDoesNotMatch", "ExpiredToken", "OptInRequired")
_RETRY_CODES = ("RequestLimitExceeded", "Throttling", "ThrottlingException",
                "InternalError", "ServiceUnavailable", "Unavailable")

# EC2's names (CustomerGatewayConfiguration XML) -> strongSwan's.
_ENCRYPTION = {"aes-128-cbc": "aes128", "aes-256-cbc": "aes256",
               "aes-128-gcm-16": "aes128gcm16", "aes-256-gcm-16": "aes256gcm16"}
_INTEGRITY = {"sha1": "sha1", "sha2-256": "sha256", "sha2-384": "sha384",
              "sha2-512": "sha512", "hmac-sha1-96": "sha1",
              "hmac-sha2-256-128": "sha256", "hmac-sha256-128": "sha256"}
_DH_GROUP = {"group2": "modp1024", "group5": "modp1536", "group14": "modp2048",
             "group15": "modp3072", "group16": "modp4096", "group17": "modp6144",
             "group18": "modp8192", "group19": "ecp256", "group20": "ecp384",
             "group21": "ecp521", "group22": "modp1024s160",
             "group23": "modp2048s224", "group24": "modp2048s256"}


@dataclasses.dataclass(frozen=True)
class Tunnel:
    """One IPsec tunnel of a VPN connection, as EC2 describes it."""

    aws_outside_ip: str
    aws_inside_cidr: str
    customer_outside_ip: str
    customer_inside_cidr: str
    ike_version: str                # "ikev1" or "ikev2"
    ike_proposal: str | None        # strongSwan syntax; None if EC2's is unknown here
    ike_lifetime: int               # seconds
    esp_proposal: str | None
    ipsec_lifetime: int
    dpd_delay: int                  # seconds
    dpd_retries: int
    psk: str = dataclasses.field(repr=False)
    status: str | None = None       # VgwTelemetry: UP or DOWN, when EC2 reports it


@dataclasses.dataclass
class VpnState:
    """The EC2 objects of one VPN; ``None`` or empty where there is none."""

    name: str
    vpn_gateway: dict | None = None
    customer_gateway: dict | None = None
    connection: dict | None = None
    tunnels: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def exists(self):
        return any((self.vpn_gateway, self.customer_gateway, self.connection))


class VpnProvisioner:
    """Create, show and delete the VPN named ``name`` through ``ec2``.

    ``ec2`` is a boto3 EC2 client. ``vpc_id``, ``customer_ip`` and
    ``private_cidrs`` are needed by ``create`` only; ``remote_cidrs``
    defaults to the VPC's IPv4 CIDRs. ``create`` and ``delete`` wait, at
    most ``wait_timeout`` seconds, for the asynchronous steps EC2 needs
    settled before the next one (attachment, connection deletion,
    detachment). Only ``CellAgentError`` subclasses escape.
    """

    def __init__(self, ec2, name, vpc_id=None, customer_ip=None, private_cidrs=(),
                 remote_cidrs=None, bgp_asn=65000, wait_timeout=600, poll_interval=5,
                 sleep=time.sleep):
        if not _NAME_RE.match(name or ""):
            raise exception.ConfigurationError(
                reason="VPN name %r: use 1-63 letters, digits, '.', '_' or '-'" % name)
        self.ec2 = ec2
        self.name = name
        self.vpc_id = vpc_id
        self.customer_ip = customer_ip
        self.private_cidrs = list(private_cidrs or ())
        self.remote_cidrs = list(remote_cidrs) if remote_cidrs else None
        self.bgp_asn = bgp_asn
        self.wait_timeout = wait_timeout
        self.poll_interval = poll_interval
        self._sleep = sleep

    # -- the three commands ---------------------------------------------------

    def create(self):
        """Make what is missing; return the VpnState (with ``notes``).

        Post-condition: one live VPN gateway, customer gateway and VPN
        connection tagged with the name, the gateway attached to the VPC.
        Raises ConfigurationError for bad arguments or objects tagged with
        the name that do not match them, CellAgentError for a missing VPC.
        """
        self._check_create_args()
        with _translate_errors():
            vpc = self._vpc()
            if self.remote_cidrs is None:
                self.remote_cidrs = _vpc_cidrs(vpc)
            vgw = self._ensure_vpn_gateway()
            self._ensure_attached(vgw)
            cgw = self._ensure_customer_gateway()
            conn = self._ensure_connection(vgw, cgw)
            notes = self._ensure_routes(conn)
            notes += self._ensure_propagation(vgw)
            state = self._collect()
        state.notes = notes
        return state

    def show(self):
        """The VpnState now; raises CellAgentError if nothing has the tag."""
        with _translate_errors():
            state = self._collect()
        if not state.exists:
            raise exception.CellAgentError(
                "no VPN named %s (nothing is tagged %s=%s)" % (self.name, TAG_KEY, self.name))
        return state

    def delete(self):
        """Remove every object tagged with the name; return what was done.

        Idempotent: objects already gone (or going) are skipped, and a
        second run returns an empty list. The order is EC2's: connections
        first (waited for, since a gateway in use cannot go), then the VPN
        gateway (detached, waited for, deleted), then the customer gateway.
        """
        done = []
        with _translate_errors():
            conns = self._tagged("connection", states=_LIVE + ("deleting",))
            for conn in conns:
                if conn["State"] in _LIVE:
                    self._ignore_gone(self.ec2.delete_vpn_connection,
                                      VpnConnectionId=conn["VpnConnectionId"])
                    self._did(done, "deleted VPN connection %s" % conn["VpnConnectionId"])
            for conn in conns:
                self._wait("VPN connection %s to be deleted" % conn["VpnConnectionId"],
                           lambda c=conn: self._connection_gone(c["VpnConnectionId"]))
            for vgw in self._tagged("vpn_gateway"):
                vgw_id = vgw["VpnGatewayId"]
                for att in vgw.get("VpcAttachments", []):
                    if att.get("State") in _ATTACHED:
                        self._ignore_gone(self.ec2.detach_vpn_gateway,
                                          VpnGatewayId=vgw_id, VpcId=att["VpcId"])
                        self._did(done, "detached VPN gateway %s from %s"
                                  % (vgw_id, att["VpcId"]))
                self._wait("VPN gateway %s to be detached" % vgw_id,
                           lambda v=vgw_id: self._detached(v))
                self._ignore_gone(self.ec2.delete_vpn_gateway, VpnGatewayId=vgw_id)
                self._did(done, "deleted VPN gateway %s" % vgw_id)
            for cgw in self._tagged("customer_gateway"):
                self._ignore_gone(self.ec2.delete_customer_gateway,
                                  CustomerGatewayId=cgw["CustomerGatewayId"])
                self._did(done, "deleted customer gateway %s" % cgw["CustomerGatewayId"])
        return done

    def _did(self, done, what):
        LOG.info("VPN %(name)s: %(what)s", {"name": self.name, "what": what})
        done.append(what)

    def render(self, state):
        """``(ipsec_conf, ipsec_secrets)`` text for the private side."""
        if not state.tunnels:
            raise exception.CellAgentError(
                "VPN %s has no tunnels to configure yet" % self.name)
        return (render_ipsec_conf(self.name, state.tunnels, self.private_cidrs,
                                  self.remote_cidrs or []),
                render_ipsec_secrets(self.name, state.tunnels))

    # -- create steps ---------------------------------------------------------

    def _check_create_args(self):
        missing = [flag for flag, value in (("--vpc-id", self.vpc_id),
                                             ("--customer-ip", self.customer_ip),
                                             ("--private-cidr", self.private_cidrs))
                   if not value]
        if missing:
            raise exception.ConfigurationError(
                reason="vpn create needs %s" % ", ".join(missing))
        try:
            ip = ipaddress.ip_address(self.customer_ip)
        except ValueError:
            ip = None
        if ip is None or ip.version != 4:
            raise exception.ConfigurationError(
                reason="--customer-ip %s is not an IPv4 address" % self.customer_ip)
        self.private_cidrs = _cidrs("--private-cidr", self.private_cidrs)
        if self.remote_cidrs is not None:
            self.remote_cidrs = _cidrs("--remote-cidr", self.remote_cidrs)
        if not 1 <= int(self.bgp_asn) <= 4294967294:
            raise exception.ConfigurationError(reason="--bgp-asn %s is out of range"
                                               % self.bgp_asn)

    def _vpc(self):
        try:
            return self.ec2.describe_vpcs(VpcIds=[self.vpc_id])["Vpcs"][0]
        except botocore.exceptions.ClientError as e:
            if _code(e).startswith("InvalidVpcID."):
                raise exception.CellAgentError("VPC %s does not exist in region %s" % (
                    self.vpc_id, self.ec2.meta.region_name))
            raise

    def _ensure_vpn_gateway(self):
        vgw = self._one("vpn_gateway")
        if vgw is None:
            vgw = self.ec2.create_vpn_gateway(
                Type="ipsec.1", TagSpecifications=self._tags("vpn-gateway"))["VpnGateway"]
            LOG.info("VPN %(name)s: created VPN gateway %(id)s",
                     {"name": self.name, "id": vgw["VpnGatewayId"]})
        return vgw

    def _ensure_attached(self, vgw):
        vgw_id = vgw["VpnGatewayId"]
        for att in vgw.get("VpcAttachments", []):
            if att.get("State") in _ATTACHED and att["VpcId"] != self.vpc_id:
                raise exception.ConfigurationError(
                    reason="VPN gateway %s of VPN %s is attached to %s, not %s: delete the "
                           "VPN first" % (vgw_id, self.name, att["VpcId"], self.vpc_id))
        if not any(a.get("State") in _ATTACHED for a in vgw.get("VpcAttachments", [])):
            # A gateway still detaching (an interrupted delete) cannot attach yet.
            self._wait("VPN gateway %s to be detached" % vgw_id,
                       lambda: self._detached(vgw_id))
            self.ec2.attach_vpn_gateway(VpnGatewayId=vgw_id, VpcId=self.vpc_id)
            LOG.info("VPN %(name)s: attached VPN gateway %(id)s to %(vpc)s",
                     {"name": self.name, "id": vgw_id, "vpc": self.vpc_id})
        # Route propagation needs the attachment done, not "attaching".
        self._wait("VPN gateway %s to be attached" % vgw_id, lambda: any(
            a.get("VpcId") == self.vpc_id and a.get("State") == "attached"
            for a in self._describe_vgw(vgw_id).get("VpcAttachments", [])))

    def _ensure_customer_gateway(self):
        cgw = self._one("customer_gateway")
        if cgw is None:
            cgw = self.ec2.create_customer_gateway(
                Type="ipsec.1", PublicIp=self.customer_ip, BgpAsn=int(self.bgp_asn),
                TagSpecifications=self._tags("customer-gateway"))["CustomerGateway"]
            LOG.info("VPN %(name)s: created customer gateway %(id)s for %(ip)s",
                     {"name": self.name, "id": cgw["CustomerGatewayId"],
                      "ip": self.customer_ip})
        elif cgw.get("IpAddress") != self.customer_ip:
            raise exception.ConfigurationError(
                reason="customer gateway %s of VPN %s is for %s, not %s: delete the VPN "
                       "first" % (cgw["CustomerGatewayId"], self.name, cgw.get("IpAddress"),
                                  self.customer_ip))
        return cgw

    def _ensure_connection(self, vgw, cgw):
        conn = self._one("connection")
        if conn is None:
            conn = self.ec2.create_vpn_connection(
                Type="ipsec.1", CustomerGatewayId=cgw["CustomerGatewayId"],
                VpnGatewayId=vgw["VpnGatewayId"], Options={"StaticRoutesOnly": True},
                TagSpecifications=self._tags("vpn-connection"))["VpnConnection"]
            LOG.info("VPN %(name)s: created VPN connection %(id)s",
                     {"name": self.name, "id": conn["VpnConnectionId"]})
        elif (conn.get("VpnGatewayId"), conn.get("CustomerGatewayId")) != (
                vgw["VpnGatewayId"], cgw["CustomerGatewayId"]):
            raise exception.ConfigurationError(
                reason="VPN connection %s of VPN %s joins %s and %s, not %s and %s: delete "
                       "the VPN first" % (conn["VpnConnectionId"], self.name,
                                          conn.get("VpnGatewayId"),
                                          conn.get("CustomerGatewayId"),
                                          vgw["VpnGatewayId"], cgw["CustomerGatewayId"]))
        return conn

    def _ensure_routes(self, conn):
        conn_id = conn["VpnConnectionId"]
        present = {r.get("DestinationCidrBlock") for r in conn.get("Routes", [])
                   if r.get("State") in ("pending", "available")}
        notes = []
        for cidr in self.private_cidrs:
            if cidr in present:
                continue
            if self._best_effort(self.ec2.create_vpn_connection_route,
                                 VpnConnectionId=conn_id, DestinationCidrBlock=cidr):
                LOG.info("VPN %(name)s: added static route %(cidr)s to %(id)s",
                         {"name": self.name, "cidr": cidr, "id": conn_id})
            else:
                notes.append(self._note(
                    "CreateVpnConnectionRoute", "add the static route %s to %s yourself: "
                    "aws ec2 create-vpn-connection-route --vpn-connection-id %s "
                    "--destination-cidr-block %s" % (cidr, conn_id, conn_id, cidr)))
        return notes

    def _ensure_propagation(self, vgw):
        vgw_id = vgw["VpnGatewayId"]
        notes = []
        pages = self.ec2.get_paginator("describe_route_tables").paginate(
            Filters=[{"Name": "vpc-id", "Values": [self.vpc_id]}])
        for page in pages:
            for table in page["RouteTables"]:
                rtb = table["RouteTableId"]
                if any(p.get("GatewayId") == vgw_id for p in table.get("PropagatingVgws", [])):
                    continue
                if self._best_effort(self.ec2.enable_vgw_route_propagation,
                                     RouteTableId=rtb, GatewayId=vgw_id):
                    LOG.info("VPN %(name)s: %(rtb)s learns routes from %(vgw)s",
                             {"name": self.name, "rtb": rtb, "vgw": vgw_id})
                else:
                    notes.append(self._note(
                        "EnableVgwRoutePropagation", "enable route propagation from %s "
                        "into %s yourself: aws ec2 enable-vgw-route-propagation "
                        "--route-table-id %s --gateway-id %s" % (vgw_id, rtb, rtb, vgw_id)))
        return notes

    def _best_effort(self, call, **kwargs):
        """Call; False if the endpoint does not implement the action."""
        try:
            call(**kwargs)
        except NotImplementedError:
            return False
        except botocore.parsers.ResponseParserError:
            return False
        except botocore.exceptions.ClientError as e:
            if _code(e) in _UNSUPPORTED_CODES:
                return False
            raise
        return True

    def _note(self, action, text):
        LOG.warning("VPN %(name)s: the EC2 endpoint does not implement %(action)s; "
                    "%(text)s", {"name": self.name, "action": action, "text": text})
        return "%s not implemented by the endpoint: %s" % (action, text)

    # -- lookups ----------------------------------------------------------------

    _KINDS = {
        "vpn_gateway": ("describe_vpn_gateways", "VpnGateways", "VpnGatewayId",
                        "VPN gateways"),
        "customer_gateway": ("describe_customer_gateways", "CustomerGateways",
                             "CustomerGatewayId", "customer gateways"),
        "connection": ("describe_vpn_connections", "VpnConnections", "VpnConnectionId",
                       "VPN connections"),
    }

    def _tagged(self, kind, states=_LIVE):
        method, key, _id, _label = self._KINDS[kind]
        found = getattr(self.ec2, method)(
            Filters=[{"Name": "tag:%s" % TAG_KEY, "Values": [self.name]}])[key]
        # The tag is checked here too: moto 5.2.5 ignores tag filters on
        # DescribeCustomerGateways and returns every customer gateway.
        tag = {"Key": TAG_KEY, "Value": self.name}
        return [item for item in found
                if item.get("State") in states and tag in item.get("Tags", [])]

    def _one(self, kind):
        items = self._tagged(kind)
        if len(items) > 1:
            _method, _key, id_key, label = self._KINDS[kind]
            raise exception.ConfigurationError(
                reason="%d live %s are tagged %s=%s (%s): run 'vpn delete %s' and create "
                       "again" % (len(items), label, TAG_KEY, self.name,
                                  ", ".join(i[id_key] for i in items), self.name))
        return items[0] if items else None

    def _collect(self):
        state = VpnState(self.name, vpn_gateway=self._one("vpn_gateway"),
                         customer_gateway=self._one("customer_gateway"),
                         connection=self._one("connection"))
        if state.connection:
            # The XML holds the pre-shared keys: parse it, keep only the
            # Tunnels, so that no repr of the state can show a key.
            conn = dict(state.connection)
            xml = conn.pop("CustomerGatewayConfiguration", None)
            state.connection = conn
            if xml:
                state.tunnels = parse_customer_gateway_configuration(
                    xml, conn.get("Options", {}).get("TunnelOptions", []),
                    conn.get("VgwTelemetry", []))
        return state

    def _describe_vgw(self, vgw_id):
        found = self.ec2.describe_vpn_gateways(VpnGatewayIds=[vgw_id])["VpnGateways"]
        return found[0] if found else {}

    def _detached(self, vgw_id):
        try:
            vgw = self._describe_vgw(vgw_id)
        except botocore.exceptions.ClientError as e:
            if _code(e).endswith(".NotFound"):
                return True
            raise
        return not any(a.get("State") in _ATTACHED + ("detaching",)
                       for a in vgw.get("VpcAttachments", []))

    def _connection_gone(self, conn_id):
        try:
            found = self.ec2.describe_vpn_connections(
                VpnConnectionIds=[conn_id])["VpnConnections"]
        except botocore.exceptions.ClientError as e:
            if _code(e).endswith(".NotFound"):
                return True
            raise
        return all(c.get("State") == "deleted" for c in found)

    def _ignore_gone(self, call, **kwargs):
        """Call; an object already gone (``*.NotFound``) is not an error."""
        try:
            call(**kwargs)
        except botocore.exceptions.ClientError as e:
            if not _code(e).endswith(".NotFound"):
                raise
            LOG.warning("VPN %(name)s: %(what)s already gone (%(code)s)",
                        {"name": self.name, "what": kwargs, "code": _code(e)})

    def _wait(self, what, done):
        deadline = time.monotonic() + self.wait_timeout
        while not done():
            if time.monotonic() >= deadline:
                raise exception.BackendUnavailable(
                    backend="ec2", reason="gave up after %ds waiting for %s"
                    % (self.wait_timeout, what))
            self._sleep(self.poll_interval)

    def _tags(self, resource_type):
        return [{"ResourceType": resource_type,
                 "Tags": [{"Key": TAG_KEY, "Value": self.name},
                          {"Key": "Name", "Value": "cellagent-vpn-%s" % self.name}]}]


# -- strongSwan ------------------------------------------------------------------

def parse_customer_gateway_configuration(text, tunnel_options=(), telemetry=()):
    """The Tunnels of EC2's ``CustomerGatewayConfiguration`` XML, in order.

    The IKE version is IKEv2 where the XML names it (an ``ike/version``) or
    where ``tunnel_options`` (the connection's ``Options.TunnelOptions``)
    restrict the tunnel to ``ikev2``; otherwise IKEv1, because EC2's XML
    describes an IKEv1 main-mode exchange (``<mode>main</mode>``) and its
    proposals are the ones that go with it. ``telemetry``
    (``VgwTelemetry``) adds each tunnel's UP/DOWN status where EC2 gives it.
    Raises CellAgentError if the XML lacks something a tunnel needs; the
    message never quotes the XML, which holds the keys.
    """
    try:
        root = ET.fromstring(text.strip())
    except ET.ParseError as e:
        raise exception.CellAgentError("EC2's customer gateway configuration is not "
                                       "XML: %s" % e)
    versions = {}
    for opt in tunnel_options or ():
        values = {v.get("Value") for v in opt.get("IkeVersions", [])}
        versions[opt.get("OutsideIpAddress")] = values
    status = {t.get("OutsideIpAddress"): t.get("Status") for t in telemetry or ()}
    tunnels = []
    for number, el in enumerate(root.findall("ipsec_tunnel"), 1):
        aws_ip = _text(el, "vpn_gateway/tunnel_outside_address/ip_address", number)
        explicit = (_opt_text(el, "ike/version") or "").lower().replace("ikev", "")
        ikev2 = explicit == "2" or (not explicit and versions.get(aws_ip) == {"ikev2"})
        tunnels.append(Tunnel(
            aws_outside_ip=aws_ip,
            aws_inside_cidr=_inside(el, "vpn_gateway", number),
            customer_outside_ip=_text(
                el, "customer_gateway/tunnel_outside_address/ip_address", number),
            customer_inside_cidr=_inside(el, "customer_gateway", number),
            ike_version="ikev2" if ikev2 else "ikev1",
            ike_proposal=_proposal(el.find("ike"), ike=True),
            ike_lifetime=int(_opt_text(el, "ike/lifetime") or 28800),
            esp_proposal=_proposal(el.find("ipsec"), ike=False),
            ipsec_lifetime=int(_opt_text(el, "ipsec/lifetime") or 3600),
            dpd_delay=int(_opt_text(el, "ipsec/dead_peer_detection/interval") or 10),
            dpd_retries=int(_opt_text(el, "ipsec/dead_peer_detection/retries") or 3),
            psk=_text(el, "ike/pre_shared_key", number),
            status=status.get(aws_ip)))
    if not tunnels:
        raise exception.CellAgentError("EC2's customer gateway configuration has no "
                                       "ipsec_tunnel")
    return tunnels


def render_ipsec_conf(name, tunnels, private_cidrs, remote_cidrs):
    """A strongSwan ``ipsec.conf`` (stroke/starter syntax), no secret in it.

    Policy-based: both tunnels carry the same subnets, so the kernel uses
    one at a time and strongSwan moves the traffic to the other when DPD
    declares a tunnel dead (``dpdaction=restart``). An IKEv2 tunnel is one
    conn with every subnet in it. IKEv1 negotiates one subnet pair per
    CHILD_SA, and strongSwan reads only the first subnet of a list under
    IKEv1, so an IKEv1 tunnel gets one conn per (private, remote) pair.
    """
    lines = ["# strongSwan ipsec.conf for the cellagent VPN %s, rendered by" % name,
             "# 'cellagent-manage vpn create' from what EC2 returned. The keys are",
             "# in ipsec.secrets.", ""]
    for number, t in enumerate(tunnels, 1):
        if t.ike_version == "ikev2":
            pairs = [(",".join(private_cidrs), ",".join(remote_cidrs))]
        else:
            pairs = [(left, right) for left in private_cidrs for right in remote_cidrs]
        for index, (left, right) in enumerate(pairs, 1):
            conn = "cellagent-%s-%d" % (name, number)
            lines += ["conn %s" % (conn if len(pairs) == 1 else "%s-%d" % (conn, index)),
                      "    # AWS tunnel %d: inside %s (AWS) / %s (here)" % (
                          number, t.aws_inside_cidr, t.customer_inside_cidr)]
            lines += _conn_body(t, left, right)
    return "\n".join(lines)


def _conn_body(t, leftsubnet, rightsubnet):
    lines = ["    type=tunnel",
             "    auto=start",
             "    keyexchange=%s" % t.ike_version,
             "    authby=secret",
             "    left=%defaultroute",
             "    leftid=%s" % t.customer_outside_ip,
             "    leftsubnet=%s" % leftsubnet,
             "    right=%s" % t.aws_outside_ip,
             "    rightid=%s" % t.aws_outside_ip,
             "    rightsubnet=%s" % rightsubnet]
    for key, proposal in (("ike", t.ike_proposal), ("esp", t.esp_proposal)):
        if proposal:
            lines.append("    %s=%s!" % (key, proposal))
        else:
            lines.append("    # EC2's %s proposal has no strongSwan name here: "
                         "strongSwan's defaults apply" % key)
    lines += ["    ikelifetime=%ds" % t.ike_lifetime,
              "    lifetime=%ds" % t.ipsec_lifetime,
              "    dpddelay=%ds" % t.dpd_delay,
              "    dpdtimeout=%ds" % (t.dpd_delay * t.dpd_retries),
              "    dpdaction=restart",
              "    keyingtries=%forever"]
    if t.ike_version == "ikev2":
        lines.append("    mobike=no")
    return lines + [""]


def render_ipsec_secrets(name, tunnels):
    """A strongSwan ``ipsec.secrets``: one PSK line per tunnel. Secret."""
    lines = ["# strongSwan ipsec.secrets for the cellagent VPN %s. Keep it mode 0600." % name]
    for t in tunnels:
        if any(c in t.psk for c in '"\n\r'):
            # EC2's keys are letters, digits, '.' and '_'; anything else
            # would break out of the quotes.
            raise exception.CellAgentError("a pre-shared key of VPN %s has characters "
                                           "ipsec.secrets cannot quote" % name)
        lines.append('%s %s : PSK "%s"' % (t.customer_outside_ip, t.aws_outside_ip, t.psk))
    return "\n".join(lines) + "\n"


def write_config(directory, ipsec_conf, ipsec_secrets):
    """Write ``ipsec.conf`` and ``ipsec.secrets`` in ``directory``, mode 0600.

    Each file is written to a temporary file (created 0600) and renamed
    over the old one, so a reader never sees half a file and the secrets
    are never readable by others, even for a moment. Returns the paths.
    """
    paths = []
    path = directory
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for filename, text in (("ipsec.conf", ipsec_conf), ("ipsec.secrets", ipsec_secrets)):
            path = os.path.join(directory, filename)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".%s." % filename)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o600)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            paths.append(path)
    except OSError as e:
        raise exception.CellAgentError("cannot write %s: %s" % (path, e.strerror or e))
    return paths


def describe(state):
    """Lines for a person: the objects, their states and the tunnels, keys masked."""
    vgw, cgw, conn = state.vpn_gateway, state.customer_gateway, state.connection
    lines = ["vpn %s" % state.name]
    if vgw:
        attachments = ", ".join("%s %s" % (a.get("VpcId"), a.get("State"))
                                for a in vgw.get("VpcAttachments", [])
                                if a.get("State") != "detached") or "not attached"
        lines.append("  vpn_gateway       %s  %s  (%s)" % (
            vgw["VpnGatewayId"], vgw.get("State"), attachments))
    else:
        lines.append("  vpn_gateway       -")
    if cgw:
        lines.append("  customer_gateway  %s  %s  (%s, ASN %s)" % (
            cgw["CustomerGatewayId"], cgw.get("State"), cgw.get("IpAddress"),
            cgw.get("BgpAsn")))
    else:
        lines.append("  customer_gateway  -")
    if conn:
        routes = ", ".join("%s %s" % (r.get("DestinationCidrBlock"), r.get("State"))
                           for r in conn.get("Routes", [])) or "none"
        lines.append("  vpn_connection    %s  %s  (static routes: %s)" % (
            conn["VpnConnectionId"], conn.get("State"), routes))
    else:
        lines.append("  vpn_connection    -")
    for number, t in enumerate(state.tunnels, 1):
        lines.append("  tunnel %d          aws %s (inside %s)  here %s (inside %s)  %s  "
                     "psk %s%s" % (number, t.aws_outside_ip, t.aws_inside_cidr,
                                   t.customer_outside_ip, t.customer_inside_cidr,
                                   t.ike_version, MASK,
                                   "  %s" % t.status if t.status else ""))
    for note in state.notes:
        lines.append("  warning: %s" % note)
    return lines


# -- helpers ---------------------------------------------------------------------

@contextlib.contextmanager
def _translate_errors():
    """Turn botocore failures into the CellAgentError tree, once."""
    try:
        yield
    except botocore.exceptions.NoRegionError:
        raise exception.ConfigurationError(
            reason="no AWS region: give --region, set [ec2] region or AWS_DEFAULT_REGION")
    except (botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError) as e:
        raise exception.BackendAuthError(backend="ec2",
                                         reason="no usable AWS credentials (%s)" % e)
    except botocore.exceptions.ClientError as e:
        code = _code(e)
        reason = "%s: %s" % (code, _one_line(e.response.get("Error", {}).get("Message", "")))
        if code in _AUTH_CODES:
            raise exception.BackendAuthError(backend="ec2", reason=reason)
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in _RETRY_CODES or status >= 500:
            raise exception.BackendUnavailable(backend="ec2", reason=reason)
        raise exception.BackendError(backend="ec2", reason=reason)
    except (botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectionError,
            botocore.exceptions.ReadTimeoutError) as e:
        raise exception.BackendUnavailable(backend="ec2", reason=_one_line(e))
    except botocore.exceptions.BotoCoreError as e:
        raise exception.BackendError(backend="ec2", reason=_one_line(e))


def _code(error):
    return error.response.get("Error", {}).get("Code", "") or ""


def _one_line(text):
    return " ".join(str(text).split())


def _cidrs(flag, values):
    result = []
    for value in values:
        try:
            net = ipaddress.ip_network(value.strip(), strict=True)
        except ValueError as e:
            raise exception.ConfigurationError(reason="%s %s: %s" % (flag, value, e))
        if net.version != 4:
            raise exception.ConfigurationError(reason="%s %s is not IPv4" % (flag, value))
        if str(net) not in result:
            result.append(str(net))
    return result


def _vpc_cidrs(vpc):
    cidrs = [a["CidrBlock"] for a in vpc.get("CidrBlockAssociationSet", [])
             if a.get("CidrBlockState", {}).get("State", "associated") == "associated"]
    return cidrs or [vpc["CidrBlock"]]


def _opt_text(el, path):
    found = el.find(path)
    return found.text.strip() if found is not None and found.text else None


def _text(el, path, number):
    value = _opt_text(el, path)
    if not value:
        raise exception.CellAgentError("EC2's customer gateway configuration lacks %s "
                                       "in tunnel %d" % (path, number))
    return value


def _inside(el, side, number):
    ip = _text(el, "%s/tunnel_inside_address/ip_address" % side, number)
    prefix = _opt_text(el, "%s/tunnel_inside_address/network_cidr" % side) or "30"
    return "%s/%s" % (ip, prefix)


def _proposal(el, ike):
    """strongSwan's ``enc-integ-dh`` for an XML ike or ipsec element, or None."""
    if el is None:
        return None
    enc = _ENCRYPTION.get((_opt_text(el, "encryption_protocol") or "").lower())
    integ = _INTEGRITY.get((_opt_text(el, "authentication_protocol") or "").lower())
    dh = _DH_GROUP.get((_opt_text(el, "perfect_forward_secrecy") or "").lower())
    if enc is None or dh is None:
        return None
    if enc.endswith("gcm16"):
        # AEAD: no integrity algorithm; IKE still needs a PRF.
        if not ike:
            return "%s-%s" % (enc, dh)
        return "%s-prf%s-%s" % (enc, integ, dh) if integ else None
    return "%s-%s-%s" % (enc, integ, dh) if integ else None
