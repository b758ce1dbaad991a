#!/usr/bin/env python3
"""Scheduler benchmark: decisions per second of the top's burst scheduler.

``decisions`` builds a seeded, random set of cells (a mix of private and
public; random free RAM, budgets, costs, report ages and backoffs) and
flavors (512 MB to 64 GB), then asks one ``cellagent.scheduler.Scheduler`` with the default
filter and weigher lists (``DEFAULT_FILTERS``, ``DEFAULT_WEIGHERS``) for N
decisions, as the top would:

* each request is a random flavor, 1 instance most of the time and up to
  5 otherwise, sometimes with a ``different_cell`` or ``target_cell`` hint
  or an image that needs a hypervisor version;
* the simulated clock advances ``--tick`` (10 ms) per decision, so 100
  builds a second reach the top: far more than a real top sees, which
  keeps many placements pending at any moment;
* each placement is added to the chosen cell's ``pending`` (one entry per
  flavor, as the top keeps them) and its ``used_*``; ``--report-delay``
  (1 s, the child's ``[cells] report_delay``) later the cell reports: its
  pending instances are folded into new ``capacities`` (a new dict, keyed
  by every flavor's RAM and disk size, as a child sends);
* every ``--delete-every`` decisions one random cell has instances deleted
  (RAM freed) and reports, so the private room rises again and the policy
  can leave bursting;
* one cell in ten never reports again (it goes mute during the run), one
  in twenty is backed off for the first 10 minutes.

Only the ``select`` calls are timed (wall clock, and CPU time of this
process), the bookkeeping around them is not.

``staleness`` measures how old the top's view of a child's capacity is: a
real ``TopService`` and a child ``AgentService`` (fake backend, default
``[cells] report_delay``) run in this process on two fresh vhosts of the
real RabbitMQ (127.0.0.1:5672, made and removed with ``rabbitmqctl``). The
top builds and deletes servers one at a time; for each change the time from
the moment the child's backend took it (its free RAM changed) to the moment
the top stored a capacity report showing it is one sample. ``--no-staleness``
skips it (no broker needed then).

Output: one JSON line on stdout.

    /work/main/.venv/bin/python benchmarks/scheduler.py [--count 20000]
        [--cells 100] [--flavors 20] [--seed 1] [--changes 20] [--no-staleness]
"""

import argparse
import heapq
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cellagent import exception  # noqa: E402
from cellagent import objects  # noqa: E402
from cellagent import scheduler  # noqa: E402

START = 1_700_000_000.0
TICK = 0.01                       # seconds of simulated time per decision
MUTE_INTERVAL = 300.0


def make_flavors(rng, count):
    sizes = rng.sample(range(1, 129), count)
    flavors = []
    for i, k in enumerate(sorted(sizes)):
        memory_mb = 512 * k
        flavors.append(objects.Flavor("bench.%02d" % i, memory_mb, max(1, memory_mb // 2048),
                                      rng.choice((0, 10, 20, 40, 80, 160))))
    return flavors


class SimCell:
    """One child as the simulation tracks it, and the CellView the top shows."""

    def __init__(self, rng, index, flavors, public):
        name = ("aws-%02d" if public else "dc-%02d") % index
        self.ram_total = rng.choice((256, 512, 1024, 2048, 4096)) * 1024
        if public:
            self.ram_total *= 8               # provider quota, not hardware
        self.ram_free = int(self.ram_total * rng.uniform(0.0, 1.0))
        self.disk_free = int(self.ram_total * rng.uniform(2.0, 20.0))
        self.flavors = flavors
        budget = scheduler.Budget()
        if public and rng.random() < 0.5:
            budget = scheduler.Budget(max_instances=rng.randint(50, 2000),
                                      max_cost_per_hour=rng.choice((None, 50.0, 200.0)))
        self.view = scheduler.CellView(
            name=name, path="top!" + name, tier="public" if public else "private",
            cost_per_vcpu_hour=rng.uniform(0.02, 0.08) if public else 0.0,
            flavor_costs=({flavors[0].name: 0.005} if public and rng.random() < 0.3 else {}),
            weight_offset=rng.choice((0.0, 0.0, 1.0, 10.0)),
            capabilities={"prominent_hypervisor_version": [rng.choice(("6.2", "7.1", "8.0"))]},
            budget=budget,
            backoff_until=START + 600 if rng.random() < 0.05 else None)
        self.silent = rng.random() < 0.1
        self.report(START - (rng.uniform(200, 300) if self.silent else rng.uniform(0, 60)))

    def report(self, now):
        """Fold ``pending`` into fresh capacities, as a capacity report does."""
        view = self.view
        for flavor, count in view.pending:
            self.ram_free = max(0, self.ram_free - flavor.memory_mb * count)
            self.disk_free = max(0, self.disk_free - flavor.disk_mb * count)
        view.pending = []
        ram, disk = self.ram_free, self.disk_free
        view.capacities = {
            "ram_free": {"total_mb": ram, "units_by_mb": {
                str(f.memory_mb): ram // f.memory_mb for f in self.flavors}},
            "disk_free": {"total_mb": disk, "units_by_mb": {
                str(f.disk_mb): disk // f.disk_mb for f in self.flavors if f.disk_mb}},
        }
        view.ram_total_mb = self.ram_total
        view.last_seen = now

    def place(self, flavor, num):
        # One (flavor, count) entry per flavor, as the top aggregates them.
        view = self.view
        for i, (pending_flavor, count) in enumerate(view.pending):
            if pending_flavor == flavor:
                view.pending[i] = (flavor, count + num)
                break
        else:
            view.pending.append((flavor, num))
        view.used_instances += num
        view.used_vcpus += flavor.vcpus * num
        view.used_cost_per_hour += view.cost_for(flavor) * num

    def delete_some(self, rng):
        freed = int(self.ram_total * rng.uniform(0.0, 0.3))
        self.ram_free = min(self.ram_total, self.ram_free + freed)
        self.disk_free += freed * 4
        view = self.view
        view.used_instances = max(0, view.used_instances - freed // 4096)
        view.used_vcpus = max(0, view.used_vcpus - freed // 2048)
        view.used_cost_per_hour = max(0.0, view.used_cost_per_hour - freed / 2048 * 0.04)


def make_requests(rng, flavors, names):
    """An endless stream of requests (made one at a time, as the top does)."""
    image_plain = {"id": "img-1", "name": "plain", "properties": {}}
    image_hv = {"id": "img-2", "name": "hv", "properties": {
        "hypervisor_version_requires": ">=7.0, <9.0"}}
    i = 0
    while True:
        hints = {}
        draw = rng.random()
        if draw < 0.05:
            hints["different_cell"] = rng.sample(names, 2)
        elif draw < 0.07:
            hints["target_cell"] = "top!" + rng.choice(names)
        num = 1 if rng.random() < 0.7 else rng.randint(2, 5)
        yield scheduler.RequestSpec(
            flavor=rng.choice(flavors), num_instances=num,
            image=image_hv if rng.random() < 0.1 else image_plain,
            hints=hints, instance_uuids=[], request_id="req-%d" % i)
        i += 1


def decisions(count=20000, cells=100, flavors=20, seed=1, public_share=0.4, tick=TICK,
              report_delay=1.0, delete_every=10):
    """Run ``count`` decisions; return the figures (see the module docstring)."""
    rng = random.Random(seed)
    flavor_list = make_flavors(rng, flavors)
    n_public = int(round(cells * public_share))
    sims = [SimCell(rng, i, flavor_list, public=i >= cells - n_public) for i in range(cells)]
    by_name = {s.view.name: s for s in sims}
    views = [s.view for s in sims]
    requests = make_requests(random.Random(seed + 1), flavor_list, list(by_name))
    sched = scheduler.Scheduler(scheduler.DEFAULT_FILTERS, scheduler.DEFAULT_WEIGHERS,
                                mute_interval=MUTE_INTERVAL)
    select = sched.select
    clock = time.perf_counter
    cpu_clock = time.process_time
    elapsed = cpu = 0.0
    no_valid = public = changes = pending_sum = 0
    due = []                          # (report time, cell name), a heap
    now = START
    for i in range(count):
        spec = next(requests)
        now += tick
        while due and due[0][0] <= now:
            sim = by_name[heapq.heappop(due)[1]]
            if not sim.silent:
                sim.report(now)
        if i % delete_every == 0:
            other = rng.choice(sims)
            if not other.silent:
                other.delete_some(rng)
                other.report(now)
        pending_sum += len(due)
        c0 = cpu_clock()
        t0 = clock()
        try:
            decision = select(spec, views, now)
        except exception.NoValidCell:
            elapsed += clock() - t0
            cpu += cpu_clock() - c0
            no_valid += 1
            continue
        elapsed += clock() - t0
        cpu += cpu_clock() - c0
        public += decision.tier == "public"
        changes += decision.burst_changed
        sim = by_name[decision.cell]
        if not sim.view.pending:
            heapq.heappush(due, (now + report_delay, sim.view.name))
        sim.place(spec.flavor, spec.num_instances)
    return {
        "cells": cells,
        "flavors": flavors,
        "decisions": count,
        "decisions_per_s": round(count / elapsed, 1),
        "us_per_decision": round(1e6 * elapsed / count, 1),
        # CPU time of this process only: leaves out waiting for a core, but
        # still grows when other work shares the cores (see load_avg_1m).
        "cpu_decisions_per_s": round(count / cpu, 1) if cpu else None,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cells_with_pending_avg": round(pending_sum / count, 1),
        "no_valid_cell": no_valid,
        "placed_public": public,
        "burst_changes": changes,
        "seed": seed,
    }


def _rabbitmqctl(*args):
    import subprocess
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def staleness(changes=20, broker="guest:guest@127.0.0.1:5672"):
    """Seconds from a child's capacity change to the top holding it."""
    import tempfile
    import threading
    import uuid as uuidlib

    from cellagent.cmd import init_threading
    init_threading()
    from oslo_config import cfg

    from cellagent import conf as conf_mod
    from cellagent import service

    tag = uuidlib.uuid4().hex[:8]
    vhosts = {"top": "bench-top-" + tag, "private": "bench-private-" + tag}
    for name in vhosts.values():
        _rabbitmqctl("add_vhost", name)
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    url = {k: "rabbit://%s/%s" % (broker, v) for k, v in vhosts.items()}
    tmp = tempfile.mkdtemp(prefix="cellagent-bench-")

    def make_conf(overrides):
        conf = cfg.ConfigOpts()
        conf_mod.register_opts(conf)
        conf([], project="cellagent-bench", default_config_files=[])
        for (group, name), value in overrides.items():
            conf.set_override(name, value, group)
        return conf

    def write(name, data):
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            json.dump(data, f)
        return path

    child = top = None
    changed = []            # (monotonic time of the change, free RAM after it)
    seen = []               # (monotonic time, free RAM) of reports stored at the top
    got = threading.Condition()
    try:
        child = service.AgentService(make_conf({
            (None, "transport_url"): url["private"], (None, "host"): "bench-child",
            (None, "state_path"): os.path.join(tmp, "child"), ("cells", "name"): "private",
            ("cells", "cells_config"): write("child.json", {"top": {
                "transport_url": url["top"], "is_parent": True}}),
            ("backend", "driver"): "fake", ("backend", "poll_interval"): 0.05,
            ("fake", "ram_mb"): 200000}))
        child.start()
        backend = child.backend
        spawn, destroy = backend.spawn, backend.destroy

        def mark(fn):
            def wrapper(*args, **kwargs):
                result = fn(*args, **kwargs)
                # The fake backend takes the room (or frees it) in this call.
                free = backend.get_capacity([]).ram_free_mb
                changed.append((time.monotonic(), int(free)))
                return result
            return wrapper
        backend.spawn, backend.destroy = mark(spawn), mark(destroy)

        top = service.TopService(make_conf({
            (None, "transport_url"): url["top"], (None, "host"): "bench-top",
            (None, "state_path"): os.path.join(tmp, "top"), ("cells", "name"): "top",
            ("cells", "cells_config"): write("top.json", {"private": {
                "transport_url": url["private"], "tier": "private"}}),
            ("top", "periodic_interval"): 0.1}))
        top.start()

        def on_event(event, **details):
            if event == "capacities":
                with got:
                    seen.append((time.monotonic(),
                                 int(details["capacities"]["ram_free"]["total_mb"])))
                    got.notify_all()
        top.manager.add_listener(on_event)

        def wait_seen(free, since, timeout=10.0):
            deadline = time.monotonic() + timeout
            with got:
                while True:
                    for when, ram in seen:
                        if ram == free and when >= since:
                            return when
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    got.wait(left)

        deadline = time.monotonic() + 20
        while "private" not in top.store.cell_reports() and time.monotonic() < deadline:
            time.sleep(0.05)
        samples = []
        lost = 0
        for i in range(changes):
            before = len(changed)
            if i % 2 == 0:
                rows = top.manager.create_servers("s%d" % i, "m1.small", "cirros")
                uuid = rows[0].uuid
            else:
                top.manager.delete_server(uuid)
            deadline = time.monotonic() + 10
            while len(changed) == before and time.monotonic() < deadline:
                time.sleep(0.005)
            if len(changed) == before:
                print("change %d: the backend never changed" % i, file=sys.stderr)
                lost += 1
                continue
            at, free = changed[-1]
            when = wait_seen(free, at)
            if when is None:
                print("change %d (free %d MB) never seen at the top; seen: %s" % (
                    i, free, seen[-3:]), file=sys.stderr)
                lost += 1
                continue
            samples.append(when - at)
            time.sleep(0.3)
        samples.sort()
        return {
            "staleness_changes": changes,
            "staleness_p50_s": round(samples[len(samples) // 2], 3) if samples else None,
            "staleness_p95_s": round(samples[max(0, int(len(samples) * 0.95) - 1)], 3)
            if samples else None,
            "staleness_max_s": round(samples[-1], 3) if samples else None,
            "staleness_lost": lost,
            "report_delay_s": child.conf.cells.report_delay,
        }
    finally:
        if top is not None:
            top.stop()
        if child is not None:
            child.stop()
        for name in vhosts.values():
            try:
                _rabbitmqctl("delete_vhost", name)
            except Exception as e:  # noqa: B902 - best effort
                print("could not delete vhost %s: %s" % (name, e), file=sys.stderr)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="decisions to time")
    parser.add_argument("--cells", type=int, default=100)
    parser.add_argument("--flavors", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--public-share", type=float, default=0.4,
                        help="share of the cells that are public")
    parser.add_argument("--tick", type=float, default=TICK,
                        help="simulated seconds between two requests")
    parser.add_argument("--report-delay", type=float, default=1.0,
                        help="simulated seconds from a placement to the cell's report")
    parser.add_argument("--delete-every", type=int, default=10,
                        help="decisions between deletions (and a report) in a random cell")
    parser.add_argument("--changes", type=int, default=20,
                        help="capacity changes timed for the staleness figure")
    parser.add_argument("--no-staleness", action="store_true",
                        help="skip the staleness measurement (needs RabbitMQ)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = {"benchmark": "scheduler"}
    result.update(decisions(count=args.count, cells=args.cells, flavors=args.flavors,
                            seed=args.seed, public_share=args.public_share, tick=args.tick,
                            report_delay=args.report_delay, delete_every=args.delete_every))
    if not args.no_staleness:
        result.update(staleness(changes=args.changes))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
