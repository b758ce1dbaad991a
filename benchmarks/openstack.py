#!/usr/bin/env python3
"""OpenStack backend benchmark: N builds to ACTIVE against the real nova-api peer.

The peer is ``tests.openstack_peer.NovaPeer`` (nova 34's own API, conductor,
scheduler and a fake-driver compute in a subprocess, in ``.venv-nova``: make
it with ``scripts/nova-peer-venv.sh``). The backend is a started
``cellagent.backends.openstack.OpenStackBackend`` in this process, driven as
the agent drives it: ``spawn`` from a pool of ``--workers`` threads (the
agent's worker pool), and one ``poll()`` of every instance still in flight
per tick of ``--poll-interval`` seconds from one thread (the agent's
periodic poll), until every instance is RUNNING. No broker, no agent
manager: the figures are the backend's and the peer's.

Nova API calls are counted at the client: a wrapper around
``keystoneauth1.session.Session.request`` (every HTTP request the
novaclient of the backend makes, by method and path; Keystone token requests
are counted apart). The peer's own ``/_peer/stats`` counts are reported next
to them as a cross-check.

Keys of ``nova_calls_by_request`` are method and path with ids templated
(the query string, which varies with ``changes-since``, is left out).

Output: one JSON line on stdout; progress on stderr.

    /work/main/.venv/bin/python benchmarks/openstack.py [--count 100]
        [--workers 16] [--poll-interval 1.0] [--flavor m1.tiny]
"""

import argparse
import collections
import concurrent.futures
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from keystoneauth1 import session as ks_session  # noqa: E402
from oslo_config import cfg  # noqa: E402

from cellagent.backends import openstack  # noqa: E402
from cellagent.conf import backend as backend_conf  # noqa: E402
from cellagent.conf import openstack as openstack_conf  # noqa: E402
from cellagent.objects import BuildRequest  # noqa: E402
from cellagent.objects import Flavor  # noqa: E402
from cellagent.objects import InstanceRef  # noqa: E402
from cellagent.objects import InstanceState  # noqa: E402
from tests.openstack_peer import NovaPeer  # noqa: E402

FLAVORS = {"m1.tiny": Flavor(name="m1.tiny", memory_mb=512, vcpus=1, root_gb=1),
           "m1.small": Flavor(name="m1.small", memory_mb=2048, vcpus=1, root_gb=20)}
IMAGE = {"id": "00000000-0000-0000-0000-00000000c1a0", "name": "cirros"}
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def log(msg, *args):
    print("[openstack-bench] " + (msg % args if args else msg), file=sys.stderr, flush=True)


class Counter:
    """Client-side count of the HTTP requests made through keystoneauth sessions."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        # Requests made from the main thread: the poll ticks (spawns run
        # in the pool's threads, their look-ups are lists too).
        self.poller = collections.Counter()
        self._orig = ks_session.Session.request

    def install(self):
        counter = self

        def request(session, url, method, *args, **kwargs):
            # Relative URLs are resolved against the endpoint by the session.
            path = urllib.parse.urlsplit(url).path
            key = "%s %s" % (method.upper(), _UUID.sub("{id}", path))
            with counter.lock:
                counter.counts[key] += 1
                if threading.current_thread() is threading.main_thread():
                    counter.poller[key] += 1
            return counter._orig(session, url, method, *args, **kwargs)

        ks_session.Session.request = request

    def uninstall(self):
        ks_session.Session.request = self._orig

    def snapshot(self):
        with self.lock:
            return collections.Counter(self.counts)

    def poll_snapshot(self):
        with self.lock:
            return collections.Counter(self.poller)

    def poll_lists(self):
        with self.lock:
            return sum(v for k, v in self.poller.items() if _is_list(k))


def _is_identity(key):
    return "/identity/" in key or "/auth/tokens" in key or key.endswith("/v3")


def _is_list(key):
    return key.startswith("GET ") and "/servers/detail" in key


def make_backend(peer, owner):
    conf = cfg.ConfigOpts()
    backend_conf.register_opts(conf)
    openstack_conf.register_opts(conf)
    conf([], project="cellagent-bench")
    settings = dict(peer.auth, owner=owner, image_map={IMAGE["id"]: "cirros"},
                    flavor_map={"m1.small": "m1.small", "m1.tiny": "m1.tiny"})
    for key, value in settings.items():
        conf.set_override(key, value, group="openstack")
    conf.set_override("driver", "openstack", group="backend")
    backend = openstack.OpenStackBackend(conf)
    backend.start()
    return backend


def run(args):
    tmp = tempfile.mkdtemp(prefix="cellagent-openstack-bench-")
    peer = NovaPeer(os.path.join(tmp, "nova-peer.log"), computes=args.computes)
    log("starting the nova peer (log %s)", peer.log_path)
    peer.start()
    log("peer ready at %s in %.1fs", peer.base, peer.start_seconds)
    counter = Counter()
    counter.install()
    backend = None
    try:
        backend = make_backend(peer, "bench-%s" % uuid.uuid4().hex[:8])
        flavor = FLAVORS[args.flavor]
        requests = []
        for _ in range(args.count):
            u = str(uuid.uuid4())
            requests.append(BuildRequest(instance_uuid=u, name="bench-%s" % u[:8],
                                         flavor=flavor, image=dict(IMAGE),
                                         launch_token="%s-1" % u, project_id="p1",
                                         user_id="u1"))
        before = counter.snapshot()
        poll_before = counter.poll_snapshot()
        peer.reset_stats()
        refs = {}
        refs_lock = threading.Lock()
        errors = []

        def spawn(req):
            try:
                info = backend.spawn(req)
            except Exception as e:  # noqa: B902 - reported in the result
                errors.append("%s: %s" % (type(e).__name__, e))
                return
            with refs_lock:
                refs[req.instance_uuid] = InstanceRef(instance_uuid=req.instance_uuid,
                                                      backend_id=info.backend_id,
                                                      launch_token=req.launch_token)

        log("spawning %d instances from %d worker threads", args.count, args.workers)
        started = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(args.workers)
        futures = [pool.submit(spawn, r) for r in requests]
        ticks = 0
        tick_lists = []
        active = {}
        spawn_done_at = None
        deadline = started + args.timeout
        while True:
            time.sleep(args.poll_interval)
            if spawn_done_at is None and all(f.done() for f in futures):
                spawn_done_at = time.monotonic() - started
            with refs_lock:
                pending = [r for u, r in refs.items() if u not in active]
            if pending:
                lists_before = counter.poll_lists()
                result = backend.poll(pending)
                lists_after = counter.poll_lists()
                ticks += 1
                tick_lists.append(lists_after - lists_before)
                now = time.monotonic() - started
                for u, info in result.items():
                    if info.state is InstanceState.RUNNING:
                        active[u] = now
                    elif info.state in (InstanceState.ERROR, InstanceState.DELETED):
                        errors.append("%s: %s" % (u, info.state))
                        active[u] = None
            if spawn_done_at is not None and len(active) + len(errors) >= args.count \
                    and len(refs) == len(active):
                break
            if time.monotonic() > deadline:
                errors.append("timeout after %ss: %d of %d active" % (
                    args.timeout, len(active), args.count))
                break
            if ticks and ticks % 5 == 0:
                log("tick %d: %d/%d active", ticks, len(active), args.count)
        elapsed = time.monotonic() - started
        pool.shutdown()
        after = counter.snapshot()
        calls = after - before
        peer_stats = peer.stats()
        compute = {k: v for k, v in calls.items() if not _is_identity(k)}
        identity = {k: v for k, v in calls.items() if _is_identity(k)}
        n_active = sum(1 for v in active.values() if v is not None)
        list_total = sum(v for k, v in compute.items() if _is_list(k))
        poll_lists = sum(tick_lists)
        poll_calls = sum(v for k, v in (counter.poll_snapshot() - poll_before).items()
                         if not _is_identity(k))
        result = {
            "benchmark": "openstack",
            "instances": args.count,
            "active": n_active,
            "seconds_to_all_active": round(elapsed, 2),
            "spawn_phase_seconds": round(spawn_done_at or elapsed, 2),
            "builds_per_s": round(n_active / elapsed, 2) if elapsed else None,
            "nova_calls": sum(compute.values()),
            "nova_calls_per_instance": round(sum(compute.values()) / args.count, 2),
            "nova_calls_per_instance_spawn": round(
                (sum(compute.values()) - poll_calls) / args.count, 2),
            "poll_calls": poll_calls,
            "nova_calls_by_request": dict(sorted(compute.items())),
            "identity_calls": sum(identity.values()),
            "list_calls_total": list_total,
            "ticks": ticks,
            "sync_list_calls_per_tick": round(poll_lists / ticks, 2) if ticks else None,
            "sync_list_calls_per_tick_max": max(tick_lists) if tick_lists else None,
            "peer_stats": dict(sorted(peer_stats.items())),
            "workers": args.workers,
            "poll_interval_s": args.poll_interval,
            "flavor": args.flavor,
            "computes": args.computes,
            "errors": errors[:10],
            "error_count": len(errors),
        }
        return result
    finally:
        if backend is not None:
            log("deleting the servers")
            try:
                for info in backend.list_instances():
                    backend.destroy(InstanceRef(instance_uuid=info.instance_uuid,
                                                backend_id=info.backend_id))
            except Exception as e:  # noqa: B902 - cleanup only; the peer goes anyway
                log("cleanup: %s", e)
            backend.stop()
        counter.uninstall()
        peer.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100, help="builds (100)")
    p.add_argument("--workers", type=int, default=16, help="spawn threads (16)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds per tick (1.0)")
    p.add_argument("--flavor", default="m1.tiny", choices=sorted(FLAVORS))
    p.add_argument("--computes", type=int, default=1, help="peer compute services (1)")
    p.add_argument("--timeout", type=float, default=600.0, help="bound on the window (600)")
    args = p.parse_args(argv)
    result = run(args)
    print(json.dumps(result, sort_keys=False), flush=True)
    return 0 if result["active"] == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
