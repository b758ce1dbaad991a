"""Elastic IPs of the Amazon EC2 backend (``[ec2] elastic_ip``).

Part of the EC2 backend (``ec2.py``): ``ElasticIPMixin`` holds the
backend's Elastic IP methods and ``_Address`` what it knows of one
address. ``poll`` gives each running instance a tagged address through
``_elastic_ips``, ``destroy`` releases the instance's addresses and
``list_instances`` releases ours whose instance is gone.
"""

import dataclasses
import logging

import botocore.exceptions

from cellagent import exception
from cellagent.backends.ec2_support import MAX_FILTER_VALUES
from cellagent.backends.ec2_support import OWNER_TAG
from cellagent.backends.ec2_support import UUID_TAG
from cellagent.backends.ec2_support import error_code
from cellagent.objects import InstanceState

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class _Address:
    """Our Elastic IP of one instance uuid, as far as we know it."""

    allocation_id: str
    public_ip: str
    instance_id: str = ""       # the instance it is associated with, if any
    association_id: str = ""
    associated_at: float = 0.0  # clock() of our AssociateAddress


class ElasticIPMixin:
    """The Elastic IP methods of ``EC2Backend``, which inherits them.

    They rely on these attributes of the backend: ``_client`` (the boto3
    EC2 client), ``_cond`` (the lock its state is kept under), ``_eips``
    (instance uuid -> ``_Address``) and ``_eip_faults`` (instance uuid ->
    why EC2 refused it an address), both created by the backend,
    ``owner``, ``clock``, ``_opts.lost_instance_grace``, and the methods
    ``_owner_filter``, ``_tags`` and ``_translate_errors``.
    """

    def _elastic_ips(self, running, result):
        """Give each running instance its Elastic IP (poll only).

        An instance is reported RUNNING once EC2 describes it with its
        address, PENDING until then (the next tick looks again), ERROR when
        EC2 refuses an address. Allocations whose answer was lost are found
        by their instance uuid tag first: one DescribeAddresses per tick for
        the instances this process knows no address of.
        """
        with self._cond:
            unknown = sorted({r.instance_uuid for r, _ in running
                              if r.instance_uuid not in self._eips})
        looked_up = None
        try:
            for start in range(0, len(unknown), MAX_FILTER_VALUES):
                found = self._describe_addresses([self._owner_filter(), {
                    "Name": "tag:" + UUID_TAG,
                    "Values": unknown[start:start + MAX_FILTER_VALUES]}])
                with self._cond:
                    for address in found:
                        self._eips.setdefault(address["_uuid"], _Address(
                            address["AllocationId"], address.get("PublicIp", ""),
                            address.get("InstanceId", ""), address.get("AssociationId", "")))
        except exception.BackendError as exc:
            looked_up = exc             # allocating now could give one instance two
        for ref, inst in running:
            uuid, bid = ref.instance_uuid, inst["InstanceId"]
            with self._cond:
                if uuid in self._eip_faults:
                    continue                    # _to_info made it ERROR
                address = self._eips.get(uuid)
            if looked_up is not None and uuid in unknown:
                self._eip_failed(result, uuid, looked_up)
                continue
            if address is not None and address.instance_id == bid:
                if inst.get("PublicIpAddress") == address.public_ip:
                    continue                    # running with its address
                if self.clock() - address.associated_at < self._opts.lost_instance_grace:
                    # Associated by us a moment ago; describes lag behind.
                    result[uuid] = dataclasses.replace(result[uuid],
                                                       state=InstanceState.PENDING)
                    continue
            try:
                if address is None:
                    address = self._allocate_address(uuid)
                self._associate_address(address, bid, uuid)
            except exception.BackendError as exc:
                self._eip_failed(result, uuid, exc)
                continue
            # PENDING until a describe shows the instance with its address.
            result[uuid] = dataclasses.replace(result[uuid], state=InstanceState.PENDING)

    def _eip_failed(self, result, uuid, exc):
        """Retryable trouble: PENDING, again at the next tick; a refusal: ERROR."""
        if exc.retryable or isinstance(exc, exception.InstanceNotFound):
            LOG.warning("[instance: %(uuid)s] Elastic IP not attached yet, trying again at "
                        "the next poll: %(err)s", {"uuid": uuid, "err": exc.message})
            result[uuid] = dataclasses.replace(result[uuid], state=InstanceState.PENDING)
            return
        fault = "Elastic IP refused: %s" % exc.message
        LOG.error("[instance: %(uuid)s] %(fault)s", {"uuid": uuid, "fault": fault})
        with self._cond:
            self._eip_faults[uuid] = fault
        result[uuid] = dataclasses.replace(result[uuid], state=InstanceState.ERROR, fault=fault)

    def _allocate_address(self, uuid):
        with self._translate_errors("AllocateAddress for instance %s" % uuid):
            resp = self._client.allocate_address(Domain="vpc", TagSpecifications=[{
                "ResourceType": "elastic-ip", "Tags": self._tags({UUID_TAG: uuid})}])
        address = _Address(resp["AllocationId"], resp.get("PublicIp", ""))
        with self._cond:
            self._eips[uuid] = address
        LOG.info("[instance: %(uuid)s] allocated Elastic IP %(ip)s (%(id)s)",
                 {"uuid": uuid, "ip": address.public_ip, "id": address.allocation_id})
        return address

    def _associate_address(self, address, backend_id, uuid):
        try:
            with self._translate_errors("AssociateAddress for instance %s" % uuid):
                resp = self._client.associate_address(
                    AllocationId=address.allocation_id, InstanceId=backend_id,
                    AllowReassociation=True)
        except exception.BackendError as exc:
            if "InvalidAllocationID.NotFound" in exc.message:
                # Released behind our back: allocate another next time.
                with self._cond:
                    self._eips.pop(uuid, None)
                exc.retryable = True
            raise
        with self._cond:
            address.instance_id = backend_id
            address.association_id = resp.get("AssociationId", "")
            address.associated_at = self.clock()
        LOG.info("[instance: %(uuid)s] Elastic IP %(ip)s associated with %(bid)s",
                 {"uuid": uuid, "ip": address.public_ip, "bid": backend_id})

    def _addresses_of(self, uuid):
        """Our addresses for ``uuid``: the one we know, else found by tag."""
        with self._cond:
            known = self._eips.get(uuid)
        if known is not None:
            return [{"AllocationId": known.allocation_id, "PublicIp": known.public_ip,
                     "AssociationId": known.association_id, "_uuid": uuid}]
        return self._describe_addresses([self._owner_filter(),
                                         {"Name": "tag:" + UUID_TAG, "Values": [uuid]}])

    def _release_addresses(self, addresses, why):
        """Disassociate and release ``addresses``; already gone is done."""
        for address in addresses:
            uuid = address.get("_uuid", "")
            with self._translate_errors("releasing Elastic IP %s of instance %s" % (
                    address.get("PublicIp"), uuid)):
                try:
                    if address.get("AssociationId"):
                        self._client.disassociate_address(
                            AssociationId=address["AssociationId"])
                except botocore.exceptions.ClientError as exc:
                    if error_code(exc) not in ("InvalidAssociationID.NotFound",
                                               "InvalidAddress.NotFound"):
                        raise
                try:
                    self._client.release_address(AllocationId=address["AllocationId"])
                except botocore.exceptions.ClientError as exc:
                    if error_code(exc) not in ("InvalidAllocationID.NotFound",
                                               "InvalidAddress.NotFound"):
                        raise
            with self._cond:
                self._eips.pop(uuid, None)
                self._eip_faults.pop(uuid, None)
            LOG.info("[instance: %(uuid)s] released Elastic IP %(ip)s (%(why)s)",
                     {"uuid": uuid, "ip": address.get("PublicIp"), "why": why})

    def _describe_addresses(self, filters):
        """Our Elastic IPs matching ``filters``, each with its uuid tag as ``_uuid``."""
        with self._translate_errors("DescribeAddresses"):
            addresses = self._client.describe_addresses(Filters=filters).get("Addresses", [])
        out = []
        for address in addresses:
            tags = {t["Key"]: t["Value"] for t in address.get("Tags", [])}
            if tags.get(OWNER_TAG) == self.owner and tags.get(UUID_TAG):
                out.append(dict(address, _uuid=tags[UUID_TAG]))
        return out
