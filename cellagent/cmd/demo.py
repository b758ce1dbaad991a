"""``cellagent-demo``: the all-in-one hybrid cloud, in one process, no broker.

A top cell (``cellagent-top``'s service) and two child cells (``cellagent``
agents with the fake backend) talk the cells v1 wire over oslo.messaging's
in-memory ``fake://`` transport, each on its own exchange:

* ``private``: the private cloud (fake backend), room for 10 ``m1.small``;
* ``public``: Amazon EC2 through the ``ec2`` backend, played by moto in this
  process (``mock_aws``: no network, no account), priced per vCPU-hour.
  Without moto installed the public cell falls back to the fake backend.

A workload ramps up (30 servers over about 20 s by default). The scheduler
places them in the private cell until its free room after placement would
drop under the low watermark, then bursts into the public cell. The demo
prints a progress bar and the moment it bursts, the uniform server list,
scales back in (deletes, public first), shows that new servers go private
again, and writes a PNG plot of instances per cell over time.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time

from cellagent.cmd import init_threading

LOG = logging.getLogger(__name__)

PRIVATE_RAM_MB = 22800      # 10 x m1.small (2048 MB) after the 10 % reserve


def _conf(overrides):
    from oslo_config import cfg

    from cellagent import conf as conf_mod
    conf = cfg.ConfigOpts()
    conf_mod.register_opts(conf)
    conf([], project="cellagent-demo", default_config_files=[])
    for (group, name), value in overrides.items():
        conf.set_override(name, value, group)
    return conf


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path


def _moto():
    """Start moto's in-process EC2 and register the demo's AMI; None without moto."""
    os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    try:
        import boto3
        import moto
    except ImportError:
        LOG.warning("moto is not installed: the public cell uses the fake backend")
        return None
    mock = moto.mock_aws()
    mock.start()
    for key, value in (("AWS_ACCESS_KEY_ID", "demo"), ("AWS_SECRET_ACCESS_KEY", "demo"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    ami = boto3.client("ec2", region_name="us-east-1").register_image(
        Name="cirros", Architecture="x86_64", RootDeviceName="/dev/xvda",
        VirtualizationType="hvm")["ImageId"]
    return mock, ami


def _child(tmp, name, ram_mb, spawn_delay, ec2_ami=None):
    from cellagent import service
    state = os.path.join(tmp, name)
    os.makedirs(state)
    cells_json = _write_json(os.path.join(state, "cells.json"),
                             {"top": {"transport_url": "fake:///top", "is_parent": True}})
    ec2 = {}
    if ec2_ami:
        ec2 = {("backend", "driver"): "ec2", ("backend", "poll_interval"): 0.3,
               ("ec2", "region"): "us-east-1", ("ec2", "image_map"): {"cirros": ec2_ami},
               ("ec2", "instance_type_map"): {"m1.tiny": "t3.nano", "m1.small": "t3.small",
                                              "m1.medium": "t3.medium",
                                              "m1.large": "t3.large",
                                              "m1.xlarge": "t3.xlarge"},
               ("ec2", "prices"): {"t3.nano": "0.0052", "t3.small": "0.0208",
                                   "t3.medium": "0.0416", "t3.large": "0.0832",
                                   "t3.xlarge": "0.1664"},
               ("ec2", "vcpu_quota"): 256, ("ec2", "batch_idle"): 0.05,
               ("ec2", "batch_max"): 0.3}
    conf = _conf({
        (None, "transport_url"): "fake:///%s" % name, (None, "host"): "%s-agent" % name,
        (None, "state_path"): state, ("cells", "name"): name,
        ("cells", "cells_config"): cells_json, ("cells", "report_delay"): 0.1,
        ("cells", "report_interval"): 5, ("backend", "driver"): "fake",
        ("backend", "poll_interval"): 0.1, ("fake", "ram_mb"): ram_mb,
        ("fake", "vcpus"): 512, ("fake", "disk_gb"): 100000,
        ("fake", "spawn_delay"): spawn_delay, ("fake", "delete_delay"): 0.4,
        **ec2,
    })
    agent = service.AgentService(conf)
    agent.start()
    return agent


def _top(tmp, low, high):
    from cellagent import service
    state = os.path.join(tmp, "top")
    os.makedirs(state)
    cells_json = _write_json(os.path.join(state, "cells.json"), {
        "private": {"transport_url": "fake:///private", "tier": "private"},
        "public": {"transport_url": "fake:///public", "tier": "public",
                   "cost_per_vcpu_hour": 0.0464,
                   "budget": {"max_instances": 40, "max_cost_per_hour": 5.0}},
    })
    conf = _conf({
        (None, "transport_url"): "fake:///top", (None, "host"): "top",
        (None, "state_path"): state, ("cells", "name"): "top",
        ("cells", "cells_config"): cells_json, ("cells", "call_timeout"): 10,
        ("top", "build_ack_timeout"): 10.0, ("top", "periodic_interval"): 0.2,
        ("scheduler", "low_watermark"): low, ("scheduler", "high_watermark"): high,
    })
    top = service.TopService(conf)
    top.start()
    return top


class Timeline:
    """Instances per cell over time, and the moments the top burst."""

    def __init__(self, store, cells):
        self.store = store
        self.cells = cells
        self.t0 = time.monotonic()
        self.samples = []        # (t, {cell: live}, {cell: active})
        self.events = []         # (t, text)
        self.lock = threading.Lock()

    def now(self):
        return time.monotonic() - self.t0

    def sample(self):
        live = {c: 0 for c in self.cells}
        active = {c: 0 for c in self.cells}
        errors = 0
        for inst in self.store.list_instances():
            if inst.vm_state == "error":
                errors += 1
                continue
            if inst.cell_name in live:
                live[inst.cell_name] += 1
                if inst.vm_state == "active":
                    active[inst.cell_name] += 1
        with self.lock:
            self.samples.append((self.now(), live, active))
        return live, active, errors

    def event(self, text):
        with self.lock:
            self.events.append((self.now(), text))


class Progress:
    """A one-line progress bar on a terminal, periodic lines otherwise."""

    def __init__(self, out, timeline, target):
        self.out = out
        self.timeline = timeline
        self.target = target
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._last_line = 0.0
        self.bursting = False

    def line(self, live, active, errors):
        done = sum(active.values())
        width = 30
        filled = int(width * done / max(1, self.target))
        cells = "  ".join("%s %2d/%-2d" % (c, active[c], live[c]) for c in sorted(live))
        return "[%s%s] %2d/%d active  %s%s%s" % (
            "#" * filled, "." * (width - filled), done, self.target, cells,
            "  errors %d" % errors if errors else "", "  BURSTING" if self.bursting else "")

    def show(self, live, active, errors, force=False):
        text = self.line(live, active, errors)
        if self.tty:
            self.out.write("\r" + text + "\033[K")
        elif force or time.monotonic() - self._last_line >= 2.0:
            self.out.write("%5.1fs %s\n" % (self.timeline.now(), text))
            self._last_line = time.monotonic()
        self.out.flush()

    def say(self, text):
        self.out.write(("\n" if self.tty else "") + "%5.1fs %s\n" % (self.timeline.now(), text))
        self.out.flush()


def plot(timeline, path):
    """Write the instances-per-cell plot; returns the path or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        LOG.warning("matplotlib is not installed: no plot (pip install cellagent[demo])")
        return None
    with timeline.lock:
        samples = list(timeline.samples)
        events = list(timeline.events)
    times = [s[0] for s in samples]
    fig, ax = pyplot.subplots(figsize=(9, 4.5), dpi=100)
    colours = {"private": "#2b7bba", "public": "#f28e2b"}
    series = [[s[1][c] for s in samples] for c in timeline.cells]
    ax.stackplot(times, series, labels=["%s cell" % c for c in timeline.cells],
                 colors=[colours.get(c, None) for c in timeline.cells], alpha=0.85,
                 step="post")
    for t, text in events:
        ax.axvline(t, color="#444444", linestyle="--", linewidth=1)
        ax.annotate(text, (t, ax.get_ylim()[1] * 0.97), rotation=90, fontsize=8,
                    va="top", ha="right")
    ax.set_xlabel("seconds")
    ax.set_ylabel("servers (building or active)")
    ax.set_title("cellagent all-in-one demo: private first, burst when short")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    pyplot.close(fig)
    return path


def run(out=sys.stdout, servers=30, ramp_seconds=20.0, plot_path="cellagent-demo.png",
        low=20.0, high=40.0):
    init_threading()
    from cellagent.cmd import client

    tmp = tempfile.mkdtemp(prefix="cellagent-demo-")
    children = []
    top = None
    ok = False
    moto = _moto()
    try:
        children.append(_child(tmp, "private", PRIVATE_RAM_MB, spawn_delay=1.0))
        children.append(_child(tmp, "public", 1024 * 1024, spawn_delay=2.5,
                               ec2_ami=moto[1] if moto else None))
        top = _top(tmp, low, high)
        manager = top.manager
        timeline = Timeline(top.store, ["private", "public"])
        progress = Progress(out, timeline, servers)

        def on_event(event, **details):
            if event == "burst":
                d = details["decision"]
                progress.bursting = d.bursting
                text = ("BURST into %s: %s" % (d.cell, d.reason) if d.bursting else
                        "burst over, back to %s: %s" % (d.cell, d.reason))
                timeline.event("burst" if d.bursting else "burst over")
                progress.say(text)
        manager.add_listener(on_event)

        out.write("cellagent demo: top cell 'top', children 'private' (room for 10 m1.small) "
                  "and 'public' (%s, burst target)\nlow watermark %.0f%%, high watermark %.0f%%; "
                  "ramping up %d servers over %.0f s\n\n" % (
                      "EC2 on in-process moto" if moto else "fake", low, high, servers,
                      ramp_seconds))
        _wait_for_reports(manager, ["private", "public"], 10)
        out.write(client.format_cells(manager.cell_dicts(), time.time()) + "\n\n")

        interval = ramp_seconds / max(1, servers)
        next_at = time.monotonic()
        for i in range(servers):
            manager.create_servers("web-%02d" % (i + 1), "m1.small", "cirros")
            next_at += interval
            while time.monotonic() < next_at:
                progress.show(*timeline.sample())
                time.sleep(min(0.1, max(0.0, next_at - time.monotonic())))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            live, active, errors = timeline.sample()
            progress.show(live, active, errors)
            if sum(active.values()) + errors >= servers:
                break
            time.sleep(0.1)
        progress.show(*timeline.sample(), force=True)
        time.sleep(0.5)
        out.write("\n\n== the uniform server list (cellagent-client server list) ==\n")
        out.write(client.format_servers(_server_dicts(manager), time.time()) + "\n\n")
        out.write(client.format_cells(manager.cell_dicts(), time.time()) + "\n\n")
        _, active, errors = timeline.sample()
        built = sum(active.values())

        progress.say("scaling in: deleting every server, public cell first")
        timeline.event("scale in")
        rows = sorted(top.store.list_instances(), key=lambda r: (r.cell_name != "public",
                                                                 r.name))
        for row in rows:
            manager.delete_server(row.uuid)
            progress.show(*timeline.sample())
            time.sleep(0.15)
        _wait(lambda: not top.store.list_instances(), 20, timeline, progress)
        time.sleep(0.5)   # the children's capacity reports land
        progress.say("after the scale-in: two new servers")
        extra = manager.create_servers("db", "m1.small", "cirros", count=2)
        _wait(lambda: all(top.store.get_instance(r.uuid).vm_state == "active"
                          for r in extra), 15, timeline, progress)
        cells = sorted({top.store.get_instance(r.uuid).cell_name for r in extra})
        progress.say("db-1 and db-2 went to: %s" % ", ".join(cells))
        for r in extra:
            manager.delete_server(r.uuid)
        _wait(lambda: not top.store.list_instances(), 15, timeline, progress)
        timeline.sample()
        path = plot(timeline, plot_path) if plot_path else None
        if path:
            out.write("\nplot of instances per cell over time: %s\n" % os.path.abspath(path))
        ok = (built == servers and errors == 0 and cells == ["private"]
              and not top.store.list_instances()
              and any(t == "burst" for _, t in timeline.events))
        out.write("\n%d/%d servers built (%d in private, %d burst to public), all deleted; "
                  "demo %s in %.0f s\n" % (built, servers, active["private"],
                                           active["public"], "finished" if ok else "FAILED",
                                           timeline.now()))
    finally:
        if top is not None:
            top.stop()
        for child in children:
            child.stop()
        if moto is not None:
            moto[0].stop()
    return 0 if ok else 1


def _server_dicts(manager):
    return [manager.server_dict(r) for r in manager.store.list_instances()]


def _wait_for_reports(manager, names, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reports = manager.store.cell_reports()
        if all(n in reports and reports[n].capacities for n in names):
            return True
        time.sleep(0.05)
    return False


def _wait(predicate, timeout, timeline, progress):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress.show(*timeline.sample())
        if predicate():
            return True
        time.sleep(0.1)
    return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=30, help="servers to ramp up")
    parser.add_argument("--ramp-seconds", type=float, default=20.0,
                        help="seconds over which the servers are asked for")
    parser.add_argument("--plot", default="cellagent-demo.png",
                        help="where to write the PNG plot ('' for none)")
    parser.add_argument("--debug", action="store_true", help="log to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run(servers=args.servers, ramp_seconds=args.ramp_seconds, plot_path=args.plot)


if __name__ == "__main__":
    sys.exit(main())
