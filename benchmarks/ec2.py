#!/usr/bin/env python3
"""EC2 backend benchmark: a build storm and a sync cycle, on in-process moto.

``storm``: ``--builds`` (1,000) servers built through a real child agent
(``service.AgentService``, ``[backend] driver = ec2``) to ACTIVE as its
parent sees it. The parent is a small in-process one (a counting handler
behind ``endpoint.Router``, as ``tests/unit/helpers.CellHarness`` wires it)
on oslo.messaging's ``fake://`` transport; EC2 is moto's ``mock_aws`` in
this process. The builds are Stein ``build_instances`` casts of 1 to 10
instances each (seeded), all m1.small from the same image, all sent at
once; the window runs from the first cast to the last ``active`` update
at the parent. EC2 API calls of the backend's client are counted with a
botocore ``before-call.ec2`` hook (one per API call, each page of a
paginated describe included).

``sync``: ``--sync-instances`` (10,000) instances owned by a cell, launched
straight into moto with an admin client in batches of
``--sync-batch`` (47, the backend's largest batch) tagged exactly as the
backend tags a batched launch (owner, cell, batch token and one
``cellagent:instance:<uuid>`` slot tag per member). Then a started
EC2Backend is timed on one reconciliation cycle, ``list_instances()``,
and one ``poll()`` of every instance; each is one paginated
DescribeInstances (page size 1,000).

moto is patched in this process to behave like EC2 where the figures
depend on it (``patch_moto``: an indexed tag lookup, DescribeInstances paged
by instance); ``--stock-moto`` leaves it alone.

Output: one JSON line on stdout; progress on stderr. moto runs in this
process, so the RSS figures include moto's own state.

    /work/main/.venv/bin/python benchmarks/ec2.py [--builds 1000]
        [--sync-instances 10000] [--skip-storm] [--skip-sync] [--skip-sync-poll]
        [--seed 1] [--workers 200] [--stock-moto]
"""

import argparse
import collections
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid as uuidlib

# Before moto is imported: no 1,300 default AMIs, no real AWS files or keys.
os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"
os.environ.setdefault("AWS_CONFIG_FILE", "/nonexistent/aws-config")
os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import boto3  # noqa: E402
from moto import mock_aws  # noqa: E402
from oslo_config import cfg  # noqa: E402

from cellagent.backends import ec2  # noqa: E402
from cellagent.backends.ec2_support import (  # noqa: E402
    BATCH_TAG, CELL_TAG, OWNER_TAG, SLOT_PREFIX)
from cellagent.objects import InstanceRef  # noqa: E402

REGION = "us-east-1"
FLAVOR = {"name": "m1.small", "memory_mb": 2048, "vcpus": 1, "root_gb": 20}
INSTANCE_TYPE = "t3.micro"
BASE = "cells.intercell"


def log(fmt, *args):
    sys.stderr.write("[ec2-bench %s] %s\n" % (time.strftime("%H:%M:%S"), fmt % args))
    sys.stderr.flush()


class Stop(Exception):
    pass


def _on_signal(signum, frame):
    raise Stop(signal.Signals(signum).name)


# -- memory and counting --------------------------------------------------------------


def proc_status_kb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset VmHWM (Linux: "5" to clear_refs), so the next peak is this phase's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb():
    kb = proc_status_kb("VmRSS")
    return round(kb / 1024.0, 1) if kb is not None else None


def peak_rss_mb():
    kb = proc_status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024.0, 1)


class CallCounter:
    """EC2 API calls of one client, by operation (botocore ``before-call.ec2``)."""

    def __init__(self, client):
        self.calls = collections.Counter()
        self._lock = threading.Lock()
        client.meta.events.register("before-call.ec2", self._before_call)

    def _before_call(self, event_name, **kwargs):
        with self._lock:
            self.calls[event_name.rsplit(".", 1)[-1]] += 1

    def snapshot(self):
        with self._lock:
            return collections.Counter(self.calls)


# -- moto, made to behave like EC2 where the figures depend on it ----------------------

MOTO_TIME = collections.Counter()      # seconds inside moto's stub, by operation (all threads)


def patch_moto():
    """Two benchmark-only changes to moto 5.2.5 in this process (``--stock-moto`` skips them).

    * ``TaggedEC2Resource.get_tags`` reads the resource's own tags from the
      tag backend's dict instead of ``describe_tags(resource-id=...)``, which
      scans (with a regex per tag) every tag of the account: one describe of
      N instances carrying 50 tags each costs O(50 N^2) in stock moto (hours
      for 10,000). The answer is the same list.
    * ``DescribeInstances`` with ``MaxResults`` pages by *instances*, as EC2
      does, not by reservations as moto does (a page of 1,000 reservations of
      47 instances would carry 47,000 instances in one call). A reservation may
      be split across pages; the NextToken is an instance offset.
    """
    from moto.core.responses import ActionResult
    from moto.ec2.models import core as moto_core
    from moto.ec2.responses import instances as moto_instances
    from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

    def get_tags(self):
        tags = self.ec2_backend.tags.get(self.id) if self.id else None
        if not tags:
            return []
        rtype = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
        return [{"resource_id": self.id, "key": k, "value": v, "resource_type": rtype}
                for k, v in tags.items()]

    stock_describe = moto_instances.InstanceResponse.describe_instances

    def describe_instances(self):
        max_results = int(self._get_param("MaxResults", 0) or 0)
        if not max_results or self._get_param("InstanceIds", []):
            return stock_describe(self)
        self.error_on_dryrun()
        reservations = self.ec2_backend.describe_instances(
            filters=self._filters_from_querystring())
        start = int(self._get_param("NextToken") or 0)
        page, pos, taken = [], 0, 0
        for reservation in reservations:       # copies: their instance lists are ours
            n = len(reservation.instances)
            if pos + n > start and taken < max_results:
                lo = max(0, start - pos)
                hi = min(n, lo + max_results - taken)
                reservation.instances = reservation.instances[lo:hi]
                page.append(reservation)
                taken += hi - lo
            pos += n
        end = start + taken
        return ActionResult({"Reservations": page,
                             "NextToken": str(end) if end < pos else None})

    moto_core.TaggedEC2Resource.get_tags = get_tags
    moto_instances.InstanceResponse.describe_instances = describe_instances


def time_moto():
    """Count the seconds spent inside moto's botocore stub, by operation."""
    from moto.core import botocore_stubber
    stock_call = botocore_stubber.BotocoreStubber.__call__

    def call(self, event_name, request, **kwargs):
        t = time.monotonic()
        try:
            return stock_call(self, event_name, request, **kwargs)
        finally:
            MOTO_TIME[event_name.rsplit(".", 1)[-1]] += time.monotonic() - t

    botocore_stubber.BotocoreStubber.__call__ = call


def admin_client():
    return boto3.session.Session().client("ec2", region_name=REGION,
                                          aws_access_key_id="admin",
                                          aws_secret_access_key="admin")


def register_ami(client, name="cirros-0.6"):
    return client.register_image(Name=name, Architecture="x86_64",
                                 RootDeviceName="/dev/xvda",
                                 VirtualizationType="hvm")["ImageId"]


def ec2_overrides(args, ami, owner):
    return {
        "region": REGION, "access_key_id": "AKIDBENCHMARK0000001",
        "secret_access_key": "benchmark-secret", "owner": owner,
        "instance_type_map": {FLAVOR["name"]: INSTANCE_TYPE}, "image_map": {"cirros": ami},
        "vcpu_quota": 100000, "max_instances": 0, "max_vcpus": 0, "max_cost_per_hour": 0.0,
        "batch_idle": args.batch_idle, "batch_max": args.batch_max,
        "api_rate": 10000.0, "api_burst": 10000,
    }


def new_conf(project="cellagent-bench"):
    from cellagent import conf as conf_mod
    conf = cfg.ConfigOpts()
    conf_mod.register_opts(conf)
    conf([], project=project, default_config_files=[])
    return conf


def per_instance(calls, n):
    return {op: round(c / n, 4) for op, c in sorted(calls.items())} if n else {}


# -- the storm --------------------------------------------------------------------------


class CountingParent:
    """The parent cell: counts what the child reports, notes when each is active."""

    def __init__(self, uuids):
        self.expected = set(uuids)
        self.lock = threading.Lock()
        self.methods = collections.Counter()
        self.active_at = {}
        self.errors = {}
        self.first_update_at = {}
        self.done = threading.Event()

    def handle(self, msg):
        from cellagent.rpc import intercell
        now = time.monotonic()
        with self.lock:
            self.methods[msg.method_name] += 1
            if msg.method_name != "instance_update_at_top":
                return None
            data, changes = intercell.obj_data(msg.method_kwargs["instance"], "Instance")
            uuid = data.get("uuid")
            if uuid not in self.expected:
                return None
            self.first_update_at.setdefault(uuid, now)
            state = data.get("vm_state")
            if "vm_state" in changes or not changes:
                if state == "active" and uuid not in self.active_at:
                    self.active_at[uuid] = now
                    if len(self.active_at) == len(self.expected):
                        self.done.set()
                elif state == "error":
                    self.errors[uuid] = now
        return None

    def counts(self):
        with self.lock:
            return len(self.active_at), len(self.errors)


def make_casts(rng, n, lo, hi):
    """``build_instances`` kwargs of ``lo``..``hi`` instances each, ``n`` in all."""
    from cellagent.rpc import intercell
    casts, left, i = [], n, 0
    while left:
        size = min(left, rng.randint(lo, hi))
        left -= size
        uuids = [str(uuidlib.UUID(int=rng.getrandbits(128), version=4)) for _ in range(size)]
        instances = []
        for u in uuids:
            data = {
                "uuid": u, "display_name": "storm-%d" % i, "hostname": "storm-%d" % i,
                "project_id": "bench", "user_id": "bench", "image_ref": "cirros",
                "vm_state": "building", "task_state": "scheduling",
                "memory_mb": FLAVOR["memory_mb"], "vcpus": FLAVOR["vcpus"],
                "root_gb": FLAVOR["root_gb"], "ephemeral_gb": 0, "metadata": {},
                "created_at": "2019-06-03T10:15:42Z"}
            instances.append(intercell.obj_primitive("Instance", data))
            i += 1
        kwargs = {"build_inst_kwargs": {
            "instances": instances,
            "image": {"id": "cirros", "name": "cirros"},
            "filter_properties": {"scheduler_hints": {}, "instance_type": intercell.obj_primitive(
                "Flavor", dict(FLAVOR, flavorid="2", ephemeral_gb=0, swap=0, extra_specs={}))},
            "admin_password": "not-logged", "injected_files": [],
            "security_groups": ["default"]}}
        casts.append((uuids, kwargs))
    return casts


class Storm:
    """A child agent on the ec2 backend and an in-process parent, on ``fake://``."""

    def __init__(self, args, tmp, ami, uuids):
        tag = uuidlib.uuid4().hex[:12]
        self.child_name, self.parent_name = "cell1", "api"
        self.child_url = "fake:///cell1-%s" % tag
        self.parent_url = "fake:///api-%s" % tag
        self.host = "bench-%s" % tag
        cells_json = os.path.join(tmp, "cells.json")
        with open(cells_json, "w") as f:
            json.dump({self.parent_name: {"transport_url": self.parent_url,
                                          "is_parent": True}}, f)
        conf = new_conf()
        overrides = [
            ("transport_url", self.child_url, None), ("host", self.host, None),
            ("state_path", tmp, None),                       # SQLite journal under it
            ("name", self.child_name, "cells"), ("cells_config", cells_json, "cells"),
            ("drain_timeout", 5, "cells"),
            ("driver", "ec2", "backend"), ("workers", args.workers, "backend"),
            ("max_pending_operations", max(2000, 2 * len(uuids)), "backend"),
        ]
        overrides += [(k, v, "ec2") for k, v in ec2_overrides(args, ami, "bench-storm").items()]
        for name, value, group in overrides:
            conf.set_override(name, value, group)
        self.conf = conf
        self.parent = CountingParent(uuids)
        self.agent = None
        self.parent_servers = []
        self.parent_transports = None

    def start(self):
        from cellagent import service
        from cellagent.rpc import endpoint, neighbours, parent_api, transport
        self.parent_transports = transport.Transports(self.conf)
        self.child_record = neighbours.CellRecord(self.child_name, self.child_url)
        self.sender = parent_api.IntercellSender(
            self.parent_name,
            neighbours.Neighbours(records={self.child_name: self.child_record}),
            self.parent_transports, BASE, 10)
        router = endpoint.Router(self.sender, self.parent, call_timeout=5)
        self.parent_servers = transport.rpc_servers(
            self.parent_transports.rpc_transport(self.parent_url), self.parent_url, BASE,
            "api-" + self.host, endpoint.IntercellEndpoint(router))
        for server in self.parent_servers:
            server.start(override_pool_size=1)     # a parent applies updates in order
        self.agent = service.AgentService(self.conf)
        self.agent.start()

    def cast(self, kwargs):
        from cellagent.rpc import intercell
        msg = self.sender.new("targeted", "build_instances", kwargs, "down",
                              target_cell="%s!%s" % (self.parent_name, self.child_name),
                              ctxt=intercell.admin_context())
        self.sender.send_to(self.child_record, msg).result(10)

    def stop(self):
        from cellagent import service
        servers = list(self.parent_servers) + list(self.agent.servers if self.agent else [])
        service.stop_servers(servers)
        self.parent_servers = []
        if self.agent is not None:
            self.agent.stop()
        if self.parent_transports is not None:
            self.parent_transports.close()
        self.conf.reset()


def run_storm(args, rng):
    tmp = tempfile.mkdtemp(prefix="cellagent-ec2-bench-")
    try:
        with mock_aws():
            ami = register_ami(admin_client())
            casts = make_casts(rng, args.builds, args.min_per_cast, args.max_per_cast)
            storm = Storm(args, tmp, ami, [u for us, _ in casts for u in us])
            try:
                return storm_window(args, storm, casts)
            finally:
                # Inside mock_aws: the agent's last calls must still reach moto.
                if storm.agent is not None:
                    t = time.monotonic()
                    storm.stop()
                    log("agent stopped in %.1f s", time.monotonic() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def storm_window(args, storm, casts):
    n = args.builds
    uuids = [u for us, _ in casts for u in us]
    t = time.monotonic()
    rss_before = rss_mb()
    storm.start()
    backend = storm.agent.backend
    log("agent started on ec2/moto in %.1f s; %d casts of %d builds",
        time.monotonic() - t, len(casts), n)
    counter = CallCounter(backend._client)
    reset_peak_rss()
    moto_before = sum(MOTO_TIME.values())
    t0 = time.monotonic()
    for _, kwargs in casts:
        storm.cast(kwargs)
    sent_s = time.monotonic() - t0
    log("%d casts sent in %.2f s", len(casts), sent_s)
    deadline = t0 + args.timeout
    parent = storm.parent
    while not parent.done.wait(2.0):
        active, errors = parent.counts()
        log("active %d/%d, error %d, EC2 calls so far %s", active, n, errors,
            dict(counter.snapshot()))
        if errors and active + errors >= n:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("storm: only %d of %d active after %.0f s"
                               % (active, n, args.timeout))
    window = max(parent.active_at.values()) - t0 if parent.active_at else None
    calls = counter.snapshot()
    moto_s = sum(MOTO_TIME.values()) - moto_before
    peak = peak_rss_mb()
    rss_after = rss_mb()
    active, errors = parent.counts()
    if errors:
        raise RuntimeError("storm: %d builds ended in ERROR" % errors)
    total = sum(calls.values())
    times = sorted(parent.active_at[u] - t0 for u in uuids)
    existing = sum(1 for page in admin_client().get_paginator(
        "describe_instances").paginate(Filters=[{
            "Name": "tag:" + OWNER_TAG, "Values": ["bench-storm"]}])
        for r in page["Reservations"] for _ in r["Instances"])
    log("storm: %d active in %.1f s, %d EC2 calls (%.4f per instance)",
        active, window, total, total / n)
    result = {
        "builds": n,
        "casts": len(casts),
        "seconds_to_all_active": round(window, 2),
        "builds_per_s": round(n / window, 1),
        "seconds_to_first_active": round(times[0], 2),
        "seconds_to_median_active": round(times[len(times) // 2], 2),
        "casts_sent_s": round(sent_s, 2),
        "ec2_calls": total,
        "ec2_calls_per_instance": round(total / n, 4),
        "ec2_calls_by_operation": dict(sorted(calls.items())),
        "ec2_calls_per_instance_by_operation": per_instance(calls, n),
        "run_instances": calls.get("RunInstances", 0),
        "describe_instances": calls.get("DescribeInstances", 0),
        "instances_per_run_instances": round(n / max(1, calls.get("RunInstances", 0)),
                                             1),
        "instances_in_moto": existing,
        "seconds_in_moto_all_threads": round(moto_s, 1),
        "poller_ticks": storm.agent.poller.ticks,
        "capacity_reports": storm.agent.reporter.sent["capacities"],
        "up_messages": dict(sorted(parent.methods.items())),
        "rss_mb_before_agent": rss_before,
        "rss_mb_after": rss_after,
        "peak_rss_mb": peak,
    }
    return result


# -- the sync ---------------------------------------------------------------------------


def seed_instances(client, ami, owner, cell, m, batch, rng):
    """``m`` instances tagged as the backend tags batched launches; their refs."""
    refs = []
    left = m
    while left:
        size = min(batch, left)
        left -= size
        uuids = [str(uuidlib.UUID(int=rng.getrandbits(128), version=4)) for _ in range(size)]
        token = "%064x" % rng.getrandbits(256)
        tags = [{"Key": OWNER_TAG, "Value": owner}, {"Key": CELL_TAG, "Value": cell},
                {"Key": BATCH_TAG, "Value": token}]
        tags += [{"Key": SLOT_PREFIX + u, "Value": "1:%d" % i} for i, u in enumerate(uuids)]
        resp = client.run_instances(
            ImageId=ami, InstanceType=INSTANCE_TYPE, MinCount=size, MaxCount=size,
            ClientToken=token, TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
        for inst in resp["Instances"]:
            refs.append(InstanceRef(uuids[inst["AmiLaunchIndex"]], inst["InstanceId"]))
        if len(refs) % 2000 < batch:
            log("seeded %d/%d instances", len(refs), m)
    return refs


def timed(counter, fn):
    """fn()'s result, seconds, EC2 calls and seconds inside moto."""
    before, moto_before = counter.snapshot(), sum(MOTO_TIME.values())
    t = time.monotonic()
    out = fn()
    seconds = time.monotonic() - t
    calls = counter.snapshot()
    calls.subtract(before)
    return (out, round(seconds, 2), {k: v for k, v in sorted(calls.items()) if v},
            round(sum(MOTO_TIME.values()) - moto_before, 2))


def run_sync(args, rng):
    m = args.sync_instances
    with mock_aws():
        backend = None
        try:
            admin = admin_client()
            ami = register_ami(admin)
            conf = new_conf()
            conf.set_override("name", "cell-sync", "cells")
            conf.set_override("driver", "ec2", "backend")
            for name, value in ec2_overrides(args, ami, "bench-sync").items():
                conf.set_override(name, value, "ec2")
            backend = ec2.EC2Backend(conf)
            backend.start()
            counter = CallCounter(backend._client)
            reset_peak_rss()
            t = time.monotonic()
            refs = seed_instances(admin, ami, backend.owner, backend.cell, m,
                                  args.sync_batch, rng)
            seed_s = time.monotonic() - t
            log("seeded %d instances in %.1f s; list_instances...", m, seed_s)
            listed, list_s, list_calls, list_moto = timed(counter, backend.list_instances)
            log("list_instances: %d in %.1f s (%.1f s in moto), calls %s", len(listed),
                list_s, list_moto, list_calls)
            uuids = {r.instance_uuid for r in refs}
            result = {
                "instances": m,
                "seed_seconds": round(seed_s, 1),
                "seed_run_instances": -(-m // args.sync_batch),
                "describe_instances_per_cycle": list_calls.get("DescribeInstances", 0),
                "seconds_per_cycle": list_s,
                "seconds_in_moto": list_moto,
                "seconds_outside_moto": round(list_s - list_moto, 2),
                "instances_seen": len(listed),
                "uuids_matched": sum(1 for info in listed if info.instance_uuid in uuids),
                "list_instances_calls": list_calls,
                "poll_all": None,
            }
            if not args.skip_sync_poll:
                polled, poll_s, poll_calls, poll_moto = timed(counter,
                                                              lambda: backend.poll(refs))
                running = sum(1 for i in polled.values() if i.state.value == "running")
                log("poll: %d (%d running) in %.1f s (%.1f s in moto), calls %s",
                    len(polled), running, poll_s, poll_moto, poll_calls)
                result["poll_all"] = {
                    "describe_instances": poll_calls.get("DescribeInstances", 0),
                    "seconds": poll_s, "seconds_in_moto": poll_moto,
                    "instances": len(polled), "running": running, "calls": poll_calls}
            result.update(peak_rss_mb=peak_rss_mb(), rss_mb_after=rss_mb())
            return result
        finally:
            if backend is not None:
                backend.stop()


# -- main --------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--builds", type=int, default=1000, help="storm builds (default 1000)")
    p.add_argument("--sync-instances", type=int, default=10000,
                   help="instances owned by the cell in the sync (default 10000)")
    p.add_argument("--skip-storm", action="store_true", help="no storm")
    p.add_argument("--skip-sync", action="store_true", help="no sync")
    p.add_argument("--seed", type=int, default=1, help="random seed (cast sizes, uuids)")
    p.add_argument("--min-per-cast", type=int, default=1, help="instances per cast, least")
    p.add_argument("--max-per-cast", type=int, default=10, help="instances per cast, most")
    p.add_argument("--workers", type=int, default=200,
                   help="agent [backend] workers (default 200; a spawn holds a worker "
                        "until its batch's RunInstances returns, so this bounds the batch)")
    p.add_argument("--batch-idle", type=float, default=0.1, help="[ec2] batch_idle")
    p.add_argument("--batch-max", type=float, default=1.0, help="[ec2] batch_max")
    p.add_argument("--sync-batch", type=int, default=47,
                   help="instances per RunInstances when seeding the sync (default 47, "
                        "the backend's largest batch: 50 tags minus its 3)")
    p.add_argument("--skip-sync-poll", action="store_true",
                   help="time list_instances only, not also one poll() of every instance")
    p.add_argument("--stock-moto", action="store_true",
                   help="do not patch moto (quadratic tag lookup, DescribeInstances paged "
                        "by reservation); see patch_moto()")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds allowed for the storm (default 120 + builds/5)")
    p.add_argument("--verbose", action="store_true", help="the agent's INFO log on stderr")
    args = p.parse_args(argv)
    if args.builds < 1 or args.sync_instances < 1:
        p.error("--builds and --sync-instances must be positive")
    if not 1 <= args.min_per_cast <= args.max_per_cast:
        p.error("need 1 <= --min-per-cast <= --max-per-cast")
    if not 1 <= args.sync_batch <= 47:
        p.error("--sync-batch must be 1..47 (EC2 allows 50 tags per instance)")
    if args.timeout is None:
        args.timeout = 120.0 + args.builds / 5.0
    return args


def main(argv=None):
    import logging
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if not args.stock_moto:
        patch_moto()
    time_moto()
    result = {"benchmark": "ec2", "storm": None, "sync": None}
    t = time.monotonic()
    try:
        if not args.skip_storm:
            result["storm"] = run_storm(args, random.Random(args.seed))
        if not args.skip_sync:
            result["sync"] = run_sync(args, random.Random(args.seed + 1))
    except Stop as e:
        log("interrupted (%s)", e)
        return 130
    except Exception as e:  # noqa: B902 - one line, not a traceback
        log("FAILED: %s: %s", type(e).__name__, e)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    result.update({
        "targets": {"ec2_calls_per_instance": 0.05, "describe_instances_per_cycle": 10},
        "rss_note": "the child agent, the parent and moto share this process",
        "seconds": round(time.monotonic() - t, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "moto": __import__("moto").__version__,
        "options": {k: v for k, v in sorted(vars(args).items())},
    })
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
