"""Self-contained pieces of the Amazon EC2 backend (``ec2.py``).

Part of the EC2 backend, holding what needs no backend object: the tag
names every EC2 resource of ours carries, the EC2 error codes by the
backend error ``EC2Backend._translate_errors`` turns them into, the AIMD
rate limiter and the process's one registry of them (shared by every
backend of the process), the launch spec that groups builds into one
RunInstances, and the plain functions over EC2 answers: ``error_code``,
``decode_console`` and ``expired_leases`` (the ``ec2 watchdog`` query of
``cellagent-manage``).

Nothing here reads config; the backend passes in what it needs.
"""

import base64
import binascii
import collections
import dataclasses
import hashlib
import logging
import threading
import time

LOG = logging.getLogger(__name__)

OWNER_TAG = "cellagent:owner"
CELL_TAG = "cellagent:cell"
BATCH_TAG = "cellagent:batch"
UUID_TAG = "cellagent:instance_uuid"
GENERATION_TAG = "cellagent:generation"
LEASE_TAG = "cellagent:lease-until"      # Unix time; see [ec2] lease_seconds
SLOT_PREFIX = "cellagent:instance:"      # + instance uuid = "<generation>:<launch index>"
RESERVED_TAG_PREFIXES = ("cellagent:", "aws:")

MAX_FILTER_VALUES = 200     # EC2: values of one filter

# EC2 error codes, by the backend error they become (docs/ec2.md, "Throttling and errors").
THROTTLE_CODES = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottled", "RequestThrottledException", "TooManyRequestsException",
    "EC2ThrottledException", "SlowDown", "PriorRequestNotComplete", "BandwidthLimitExceeded",
})
UNAVAILABLE_CODES = frozenset({
    "InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable",
    "RequestTimeout", "RequestTimeoutException",
})
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InstanceLimitExceeded", "VcpuLimitExceeded",
    "InsufficientHostCapacity", "InsufficientCapacity",
})
AUTH_CODES = frozenset({
    "AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "ExpiredToken", "OptInRequired", "Blocked", "AccessDenied", "AccessDeniedException",
    "UnrecognizedClientException", "MissingAuthenticationToken", "PendingVerification",
})
NOT_FOUND_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
STATE_CODES = frozenset({"IncorrectInstanceState", "IncorrectState", "InvalidInstanceState"})


def error_code(exc):
    """The error code of a botocore ClientError, or "" for any other exception."""
    return exc.response.get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""


class RateLimiter:
    """A token bucket with AIMD rate control, for one account and region.

    ``acquire`` blocks until a request may go. ``throttled`` halves the rate
    (at most once a second: the throttled answers to requests already sent
    at the old rate are one signal, not many) and empties the bucket;
    ``succeeded`` adds a twentieth of the configured rate back.
    """

    def __init__(self, rate, burst, clock=time.monotonic, sleep=time.sleep):
        self.max_rate = float(rate)
        self.min_rate = min(1.0, self.max_rate)
        self.rate = self.max_rate
        self.burst = float(burst)
        self.tokens = self.burst
        self.stats = collections.Counter()
        self._clock = clock
        self._sleep = sleep
        self._stamp = clock()
        self._last_cut = float("-inf")
        self._lock = threading.Lock()

    def acquire(self):
        while True:
            with self._lock:
                now = self._clock()
                self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    self.stats["requests"] += 1
                    return
                wait = (1.0 - self.tokens) / self.rate
                self.stats["waits"] += 1
            self._sleep(wait)

    def throttled(self):
        with self._lock:
            self.stats["throttled"] += 1
            now = self._clock()
            if now - self._last_cut >= 1.0:
                self._last_cut = now
                self.rate = max(self.min_rate, self.rate / 2.0)
                self.tokens = min(self.tokens, 0.0)

    def succeeded(self):
        with self._lock:
            self.rate = min(self.max_rate, self.rate + self.max_rate / 20.0)


# NOTE: module-level on purpose. EC2 throttles per account and region, not
# per backend object, and the demo runs several cells in one process: they
# must draw on one bucket. Keyed by endpoint, region and credential identity
# (a digest, never the key itself).
_LIMITERS = {}
_LIMITERS_LOCK = threading.Lock()


def shared_limiter(key, rate, burst):
    """The process's RateLimiter for ``key`` (created with rate/burst on first use)."""
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            limiter = _LIMITERS[key] = RateLimiter(rate, burst)
        return limiter


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """What makes two builds launchable by one RunInstances."""

    image_id: str
    instance_type: str
    subnet_id: str = ""
    security_groups: tuple = ()
    key_name: str = ""
    user_data: str = ""
    hibernate: bool = False

    def digest(self):
        return hashlib.sha256(repr(dataclasses.astuple(self)).encode()).hexdigest()


def decode_console(raw):
    """EC2 returns base64 text; some stand-ins (moto) return it decoded."""
    if not raw:
        return ""
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return raw
    return data.decode("utf-8", errors="replace")


def expired_leases(client, now=None, owner=None):
    """Instances whose ``cellagent:lease-until`` is in the past (the watchdog).

    ``owner`` limits it to one cell's instances. Instances without the tag,
    or already shutting down, are not listed.
    """
    now = time.time() if now is None else now
    filters = [{"Name": "tag-key", "Values": [LEASE_TAG]},
               {"Name": "instance-state-name",
                "Values": ["pending", "running", "stopping", "stopped"]}]
    if owner:
        filters.append({"Name": "tag:" + OWNER_TAG, "Values": [owner]})
    out = []
    for page in client.get_paginator("describe_instances").paginate(Filters=filters):
        for res in page["Reservations"]:
            for inst in res["Instances"]:
                tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                try:
                    until = float(tags.get(LEASE_TAG, ""))
                except ValueError:
                    continue
                if until < now:
                    out.append((inst["InstanceId"], tags.get(OWNER_TAG, ""), until))
    return out
