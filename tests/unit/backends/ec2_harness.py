"""A moto-backed EC2 for the EC2 backend tests: token idempotency, call counts, faults.

moto 5.2.5 ignores ``ClientToken`` (the same token twice gives two
instances), and a fault injected *after* moto answered still leaves moto's
instance behind. ``Ec2Harness`` therefore sits at the botocore layer of the
backend's own EC2 client, in front of moto:

* ``before-call.ec2.*`` counts logical API calls (``calls``, what a call
  budget is about) and answers a RunInstances whose ClientToken it has seen
  succeed with the remembered reservation, without reaching moto, as EC2
  does for a retried token;
* ``before-send.ec2.*`` replaces moto's stub on this client (it runs after
  the backend's rate limiter, registered first): it counts wire attempts
  (``sends``: retries included) and either injects a fault that never
  reaches moto (throttling at a rate, one-shot error codes: 5xx, ICE,
  auth, ...) or hands the request to moto's stub, optionally after a delay
  (``slow_next``: an EC2 call that takes its time);
* ``after-call.ec2.*`` remembers RunInstances answers by token, *loses* a
  response moto really gave (the caller gets a connection error while the
  instances exist), and hides new instances from DescribeInstances for a
  few calls (eventual consistency).

``admin_instances`` reads moto with a separate client that has none of
this, to count what really exists.
"""

import collections
import copy
import random
import threading
import time

import boto3
import botocore.awsrequest
import botocore.exceptions
import botocore.loaders
import botocore.session
from moto.core import models as moto_models

_ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
               '<Code>%s</Code><Message>%s</Message></Error></Errors>'
               '<RequestID>harness-fault</RequestID></Response>')


class _Raw:
    def __init__(self, body):
        self._body = body

    def stream(self, **kwargs):
        yield self._body


def _response(status, body=b""):
    return botocore.awsrequest.AWSResponse("https://ec2.us-east-1.amazonaws.com/", status,
                                           {"Content-Type": "text/xml"}, _Raw(body))


def _operation(event_name):
    return event_name.rsplit(".", 1)[-1]


class Ec2Harness:
    """Attach to a started EC2Backend's client; see the module docstring."""

    def __init__(self, client, seed=1):
        self.calls = collections.Counter()      # logical API calls by operation
        self.sends = collections.Counter()      # wire attempts (faults included)
        self.faults = collections.Counter()     # injected faults by code
        self.requests = collections.defaultdict(list)   # serialized bodies by operation
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._tokens = {}                       # ClientToken -> parsed RunInstances answer
        self._throttle = (0.0, None)            # (rate, operations or None for all)
        self._fail = collections.defaultdict(collections.deque)  # op -> [(code, status)]
        self._lose = collections.Counter()      # op -> responses to lose
        self._hide_for = 0                      # describes a new instance stays hidden
        self._slow = collections.defaultdict(collections.deque)  # op -> [seconds]
        self._hidden = {}                       # instance id -> describes left
        events = client.meta.events
        events.register("before-call.ec2", self._before_call)
        # botocore runs *every* before-send handler and keeps the first
        # answer, so a fault answered beside moto's stub would still let moto
        # act (phantom instances). Take moto's stub off this client and call
        # it ourselves, only when no fault is injected.
        events.unregister("before-send", moto_models.botocore_stubber)
        events.register("before-send.ec2", self._before_send)
        events.register("after-call.ec2", self._after_call)

    # -- fault controls -------------------------------------------------------

    def throttle(self, rate, operations=None):
        """Answer RequestLimitExceeded to this share of attempts (of ``operations``)."""
        with self._lock:
            self._throttle = (rate, set(operations) if operations else None)

    def fail_next(self, operation, code, status=400, times=1):
        """The next ``times`` attempts of ``operation`` get ``code`` (never reach moto)."""
        with self._lock:
            self._fail[operation].extend([(code, status)] * times)

    def slow_next(self, operation, seconds, times=1):
        """The next ``times`` attempts of ``operation`` reach moto ``seconds`` late."""
        with self._lock:
            self._slow[operation].extend([seconds] * times)

    def lose_next_response(self, operation="RunInstances", times=1):
        """moto does the next ``times`` calls, then the caller gets a connection error."""
        with self._lock:
            self._lose[operation] += times

    def hide_new_instances(self, describes):
        """Leave instances launched from now on out of their first ``describes`` describes."""
        with self._lock:
            self._hide_for = describes

    def reset_counts(self):
        with self._lock:
            self.calls.clear()
            self.sends.clear()
            self.faults.clear()
            self.requests.clear()

    # -- botocore hooks ------------------------------------------------------

    def _before_call(self, event_name, params, context, **kwargs):
        op = _operation(event_name)
        body = params.get("body") if isinstance(params.get("body"), dict) else {}
        with self._lock:
            self.calls[op] += 1
            self.requests[op].append(dict(body))
            token = body.get("ClientToken") if op == "RunInstances" else None
            context["harness_token"] = token
            cached = self._tokens.get(token) if token else None
        if cached is not None:
            context["harness_cached"] = True
            return _response(200), copy.deepcopy(cached)
        return None

    def _before_send(self, event_name, **kwargs):
        op = _operation(event_name)
        with self._lock:
            self.sends[op] += 1
            fault = None
            if self._fail[op]:
                fault = self._fail[op].popleft()
            else:
                rate, ops = self._throttle
                if rate and (ops is None or op in ops) and self._random.random() < rate:
                    fault = ("RequestLimitExceeded", 503)
            if fault is not None:
                self.faults[fault[0]] += 1
            delay = self._slow[op].popleft() if fault is None and self._slow[op] else 0
        if fault is None:
            if delay:
                time.sleep(delay)
            return moto_models.botocore_stubber(event_name=event_name, **kwargs)
        code, status = fault
        return _response(status, (_ERROR_BODY % (code, "injected by the test harness")).encode())

    def _after_call(self, event_name, http_response, parsed, context, **kwargs):
        op = _operation(event_name)
        if http_response.status_code >= 300 or context.get("harness_cached"):
            return
        lose = False
        with self._lock:
            if op == "RunInstances":
                token = context.get("harness_token")
                if token:
                    self._tokens[token] = copy.deepcopy(parsed)
                if self._hide_for:
                    for inst in parsed.get("Instances", []):
                        self._hidden[inst["InstanceId"]] = self._hide_for
            elif op == "DescribeInstances" and self._hidden:
                seen = set()
                for reservation in parsed.get("Reservations", []):
                    kept = []
                    for inst in reservation.get("Instances", []):
                        if inst["InstanceId"] in self._hidden:
                            seen.add(inst["InstanceId"])
                        else:
                            kept.append(inst)
                    reservation["Instances"] = kept
                parsed["Reservations"] = [r for r in parsed.get("Reservations", [])
                                          if r["Instances"]]
                for bid in list(self._hidden):
                    self._hidden[bid] -= 1
                    if self._hidden[bid] <= 0:
                        del self._hidden[bid]
            if self._lose[op] > 0:
                self._lose[op] -= 1
                self.faults["lost-response"] += 1
                lose = True
        if lose:
            raise botocore.exceptions.EndpointConnectionError(
                endpoint_url="https://ec2.us-east-1.amazonaws.com/")


_LOADER = botocore.loaders.create_loader()


def shared_loader_session(**kwargs):
    """A boto3 Session that reuses one botocore model loader (parsing the EC2
    model takes about half a second per new session)."""
    core = botocore.session.Session()
    core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core, **kwargs)


def admin_client():
    """An EC2 client on the same moto, without harness or limiter."""
    return shared_loader_session().client("ec2", region_name="us-east-1",
                                          aws_access_key_id="admin",
                                          aws_secret_access_key="admin")


def admin_instances(owner=None, include_terminated=False):
    """Every instance moto really has (optionally only ``owner``'s)."""
    client = admin_client()
    filters = [{"Name": "tag:cellagent:owner", "Values": [owner]}] if owner else []
    out = []
    for page in client.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            for inst in reservation["Instances"]:
                if include_terminated or inst["State"]["Name"] != "terminated":
                    out.append(inst)
    return out


def register_ami(name="cirros-0.6"):
    """An AMI in moto (run the tests with MOTO_EC2_LOAD_DEFAULT_AMIS=false:
    loading moto's 1,300 default AMIs costs about a second per test)."""
    return admin_client().register_image(
        Name=name, Architecture="x86_64", RootDeviceName="/dev/xvda",
        VirtualizationType="hvm")["ImageId"]
