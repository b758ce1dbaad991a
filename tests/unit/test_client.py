"""``cellagent-client``: what a person reads, the command line, and the RPC path.

The end-to-end tests run ``main()`` against an in-test stand-in for the top
(``FakeTop``, a few methods of the API of docs/top.md over a dict) served by
an oslo.messaging RPC server on the in-memory ``fake://`` transport.
"""

import datetime
import json
import threading
import uuid as uuidlib

import pytest

from cellagent import exception
from cellagent.cmd import client

NOW = datetime.datetime(2024, 5, 2, 10, 38, 0)
SECRET = "s3cr3t-pw"

UUID_WEB1 = "3f2a8c1e-0b5d-4c1e-9a7f-1d2e3f4a5b6c"
UUID_WEB2 = "7c9d0e1f-2a3b-4c5d-8e9f-0a1b2c3d4e5f"
UUID_DB = "a1b2c3d4-e5f6-4a5b-9c8d-7e6f5a4b3c2d"


def server(uuid=UUID_WEB1, name="web-1", cell="aws-east", tier="public", vm_state="active",
           task_state=None, age_seconds=754.0, addresses=None, fault=None, **extra):
    """A server dict as the top returns it (docs/top.md)."""
    data = {
        "uuid": uuid, "name": name, "cell": cell, "tier": tier, "vm_state": vm_state,
        "task_state": task_state, "power_state": 1 if vm_state == "active" else 0,
        "flavor": "m1.small", "image": "cirros", "access_ip_v4": None,
        "addresses": addresses if addresses is not None else [
            {"network": "private", "addr": "10.0.0.5", "type": "fixed", "version": 4},
            {"network": "private", "addr": "54.1.2.3", "type": "floating", "version": 4}],
        "created_at": "2024-05-02T10:25:26Z", "updated_at": "2024-05-02T10:26:01Z",
        "launched_at": "2024-05-02T10:26:00Z", "age_seconds": age_seconds, "fault": fault,
    }
    data.update(extra)
    return data


FAULT = {"code": 500, "message": "No valid cell: every cell is over its budget",
         "details": "aws-east: budget: 10/10 instances"}


def cell(name="aws-east", tier="public", **extra):
    """A cell dict as the top returns it (docs/top.md)."""
    data = {
        "name": name, "tier": tier,
        "transport_url": "rabbit://nova:%s@aws-broker:5672/aws" % SECRET,
        "is_parent": False, "disabled": False, "cost_per_vcpu_hour": 0.05,
        "budget": {"max_instances": 10, "max_vcpus": 40, "max_cost_per_hour": 2.0},
        "used": {"instances": 4, "vcpus": 8, "cost_per_hour": 0.4},
        "free_units": {"m1.small": 8, "m1.large": 2},
        "ram_free_mb": 12288, "disk_free_mb": 409600, "mute": False,
        "last_seen": "2024-05-02T10:37:57Z", "last_report_age_seconds": 3.2,
        "backoff_until": None,
        "capabilities": {"tier": ["public"], "region": ["us-east-1"]},
    }
    data.update(extra)
    return data


def columns(text):
    """{header: [values]} of a table, cut at the header's column offsets."""
    lines = text.splitlines()
    header = lines[0]
    names = header.split("  ")
    names = [n.strip() for n in names if n.strip()]
    starts = [header.index(n) for n in names]
    ends = starts[1:] + [None]
    return {n: [line[s:e].strip() for line in lines[1:]]
            for n, s, e in zip(names, starts, ends, strict=True)}


# -- formatting -----------------------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (12, "12s"), (59.9, "59s"), (60, "1m"), (330, "5m"), (3599, "59m"),
    (3 * 3600 + 10, "3h"), (2 * 86400 + 7200, "2d"), (-4, "0s"), (None, "-"),
])
def test_humanise_age(seconds, text):
    assert client.humanise_age(seconds) == text


def test_table_widths_come_from_the_content():
    text = client.table(("A", "LONGER"), [("abcdef", "x"), (None, "y\nz")])
    assert text.splitlines() == ["A       LONGER", "abcdef  x", "-       y", "        z"]
    assert all(line == line.rstrip() for line in text.splitlines())


def test_server_list_columns_states_addresses_and_ages():
    servers = [
        server(),
        server(UUID_WEB2, "web-2", cell=None, tier=None, vm_state="building",
               task_state="scheduling", addresses=[], age_seconds=12),
        server(UUID_DB, "db", cell="os-private", tier="private", vm_state="error",
               addresses=[{"network": "lan", "addr": "192.168.1.7", "type": "fixed",
                           "version": 4}], age_seconds=3 * 86400, fault=FAULT),
    ]
    text = client.format_servers(servers, NOW)
    assert text.splitlines()[0].split() == ["NAME", "UUID", "CELL", "TIER", "STATE",
                                            "ADDRESSES", "AGE"]
    cols = columns(text)
    # Sorted by name, whatever order the top answered in.
    assert cols["NAME"] == ["db", "web-1", "web-2"]
    assert cols["UUID"] == [UUID_DB, UUID_WEB1, UUID_WEB2]
    assert cols["CELL"] == ["os-private", "aws-east", "-"]
    assert cols["TIER"] == ["private", "public", "-"]
    assert cols["STATE"] == ["error", "active", "building/scheduling"]
    assert cols["ADDRESSES"] == ["192.168.1.7", "10.0.0.5, 54.1.2.3 (floating)", "-"]
    assert cols["AGE"] == ["3d", "12m", "12s"]


def test_server_age_falls_back_to_created_at():
    text = client.format_servers([server(age_seconds=None, created_at="2024-05-02T07:30:00Z")],
                                 NOW)
    assert columns(text)["AGE"] == ["3h"]


def test_empty_server_list():
    assert client.format_servers([], NOW) == "no servers"


def test_server_show_has_every_field_and_the_fault():
    s = server(UUID_DB, "db", vm_state="error", task_state=None, fault=FAULT,
               addresses=[{"network": "lan", "addr": "192.168.1.7", "type": "fixed"},
                          {"network": "lan", "addr": "54.1.2.3", "type": "floating"},
                          {"network": "mgmt", "addr": "172.16.0.4", "type": "fixed"}])
    text = client.format_server(s, NOW)
    fields = {}
    last = None
    for line in text.splitlines()[1:]:
        key, value = line[:15].strip(), line[15:].strip()
        if key:
            fields[key] = value
            last = key
        else:   # a continuation line of a multi-line value
            fields[last] += "\n" + value
    assert text.splitlines()[0].split() == ["FIELD", "VALUE"]
    assert fields["uuid"] == UUID_DB
    assert fields["state"] == "error"
    assert fields["cell"] == "aws-east"
    assert fields["flavor"] == "m1.small"
    assert fields["addresses"] == "lan: 192.168.1.7, 54.1.2.3 (floating)\nmgmt: 172.16.0.4"
    assert fields["created"] == "2024-05-02T10:25:26Z (12m ago)"
    assert fields["fault"] == "No valid cell: every cell is over its budget (code 500)"
    assert fields["fault details"] == "aws-east: budget: 10/10 instances"
    assert fields["power state"] == "nostate (0)"


def test_server_show_flavor_dict_and_no_fault():
    s = server(task_state="rebooting",
               flavor={"name": "m1.large", "vcpus": 4, "memory_mb": 8192, "root_gb": 80})
    text = client.format_server(s, NOW)
    assert "active/rebooting" in text
    assert "m1.large (4 vCPU, 8192 MB RAM, 80 GB disk)" in text
    assert [line.split() for line in text.splitlines() if line.startswith("fault")] == [
        ["fault", "-"]]


def test_cell_list_gives_the_whole_picture():
    cells = [
        cell(),
        cell("os-private", "private", transport_url="rabbit://os-broker/",
             budget={"max_instances": None, "max_vcpus": None, "max_cost_per_hour": None},
             used={"instances": 0, "vcpus": 0, "cost_per_hour": 0.0},
             free_units={}, ram_free_mb=512, mute=True, last_seen=None,
             last_report_age_seconds=None),
        cell("gcp", disabled=True, backoff_until="2024-05-02T10:42:03Z", ram_free_mb=None,
             last_report_age_seconds=None, last_seen="2024-05-02T10:33:00Z"),
    ]
    text = client.format_cells(cells, NOW)
    cols = columns(text)
    assert list(cols) == ["NAME", "TIER", "FREE", "RAM FREE", "MUTE", "LAST REPORT",
                          "BUDGET USED", "BACKOFF"]
    assert cols["NAME"] == ["aws-east", "gcp (disabled)", "os-private"]
    assert cols["TIER"] == ["public", "public", "private"]
    assert cols["FREE"] == ["m1.small=8 m1.large=2", "m1.small=8 m1.large=2", "-"]
    assert cols["RAM FREE"] == ["12 GiB", "-", "512 MiB"]
    assert cols["MUTE"] == ["no", "no", "yes"]
    # gcp has no age from the top: it is computed from last_seen and now.
    assert cols["LAST REPORT"] == ["3s ago", "5m ago", "never"]
    assert cols["BUDGET USED"] == [
        "4/10 inst, 8/40 vCPU, $0.40/$2.00 per h",
        "4/10 inst, 8/40 vCPU, $0.40/$2.00 per h",
        "0/- inst, 0/- vCPU, $0.00/- per h"]
    assert cols["BACKOFF"] == ["", "until 10:42:03 UTC (in 4m)", ""]
    assert SECRET not in text


def test_cell_backoff_in_the_past_is_not_shown():
    text = client.format_cells([cell(backoff_until="2024-05-02T10:37:00Z")], NOW)
    assert "until" not in text


def test_cell_show_masks_the_transport_url():
    text = client.format_cell(cell(backoff_until="2024-05-03T01:00:00Z"), NOW)
    assert SECRET not in text
    assert "rabbit://nova:***@aws-broker:5672/aws" in text
    assert "2024-05-02T10:37:57Z (3s ago)" in text
    assert "4 of 10" in text and "$0.40 of $2.00" in text
    assert "until 2024-05-03 01:00:00 UTC (in 14h)" in text
    assert "region: us-east-1" in text and "tier: public" in text
    assert "m1.small=8 m1.large=2" in text and "400 GiB" in text
    assert "$0.05\n" in text


@pytest.mark.parametrize("value, text", [(0, "$0.00"), (0.05, "$0.05"), (0.0125, "$0.0125"),
                                         (2.5, "$2.50"), (1.23456, "$1.2346")])
def test_money(value, text):
    assert client._money(value) == text


def test_json_is_raw_sorted_and_masked():
    text = client.format_json([cell()])
    assert SECRET not in text
    data = json.loads(text)
    assert data[0]["transport_url"] == "rabbit://nova:***@aws-broker:5672/aws"
    assert data[0]["free_units"] == {"m1.small": 8, "m1.large": 2}
    assert text.index('"backoff_until"') < text.index('"budget"')
    assert '\n  {\n    "backoff_until"' in text


def test_error_messages_lose_passwords():
    text = client.mask_urls_in("cell x at rabbit://u:%s@h:5672/v failed" % SECRET)
    assert text == "cell x at rabbit://u:***@h:5672/v failed"


# -- the command line ---------------------------------------------------------------


def parse(*argv):
    return client.build_parser().parse_args(list(argv))


def test_parse_create_with_every_option():
    args = parse("--config-file", "/a.conf", "--config-file", "/b.conf", "--transport-url",
                 "rabbit://h/", "--topic", "t", "--timeout", "2.5", "--format", "json",
                 "server", "create", "--flavor", "m1.small", "--image", "cirros", "--name",
                 "web", "--count", "3", "--cell", "aws-east", "--wait")
    assert args.config_file == ["/a.conf", "/b.conf"]
    assert (args.transport_url, args.topic, args.timeout, args.format) == (
        "rabbit://h/", "t", 2.5, "json")
    assert (args.command, args.action) == ("server", "create")
    assert (args.flavor, args.image, args.name, args.count, args.cell, args.wait) == (
        "m1.small", "cirros", "web", 3, "aws-east", True)


def test_parse_defaults():
    args = parse("server", "create", "--flavor", "f", "--image", "i", "--name", "n")
    assert (args.count, args.cell, args.wait, args.format) == (1, None, False, "table")
    assert (args.config_file, args.transport_url, args.topic, args.timeout) == (
        [], None, None, None)
    assert parse("server", "list").deleted is False
    assert parse("server", "list", "--deleted").deleted is True


@pytest.mark.parametrize("argv, expected", [
    (["server", "show", "web-1"], {"server": "web-1"}),
    (["server", "delete", "a", "b"], {"servers": ["a", "b"]}),
    (["server", "reboot", "web-1"], {"server": "web-1", "hard": False}),
    (["server", "reboot", "web-1", "--hard"], {"server": "web-1", "hard": True}),
    (["server", "stop", "web-1"], {"server": "web-1", "action": "stop"}),
    (["server", "start", "web-1"], {"server": "web-1", "action": "start"}),
    (["server", "console-log", "web-1", "--length", "20"], {"server": "web-1", "length": 20}),
    (["server", "console-log", "web-1"], {"length": None}),
    (["server", "pause", "web-1"], {"server": "web-1", "action": "pause"}),
    (["server", "resize", "web-1", "--flavor", "m1.large"],
     {"server": "web-1", "action": "resize", "flavor": "m1.large"}),
    (["server", "resize-revert", "web-1"], {"action": "resize-revert"}),
    (["server", "rebuild", "web-1"], {"action": "rebuild", "image": None}),
    (["server", "snapshot", "web-1", "--name", "s1"], {"action": "snapshot", "name": "s1"}),
    (["cell", "list"], {"command": "cell", "action": "list"}),
    (["cell", "show", "aws-east"], {"name": "aws-east"}),
])
def test_parse_commands(argv, expected):
    args = vars(parse(*argv))
    assert {k: args[k] for k in expected} == expected


@pytest.mark.parametrize("argv", [
    [],
    ["server"],
    ["server", "create", "--image", "i", "--name", "n"],        # no --flavor
    ["server", "create", "--flavor", "f", "--image", "i", "--name", "n", "--count", "0"],
    ["server", "delete"],
    ["--format", "yaml", "server", "list"],
    ["--timeout", "-1", "server", "list"],
    ["cell", "show"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert client.main(argv) == 2
    assert "usage: cellagent-client" in capsys.readouterr().err


def test_config_file_gives_url_and_topic(tmp_path):
    path = tmp_path / "cellagent.conf"
    path.write_text("[DEFAULT]\ntransport_url = fake:///from-file\n[top]\ntopic = t-file\n")
    conf = client.load_config(parse("--config-file", str(path), "cell", "list"))
    try:
        assert conf.transport_url == "fake:///from-file"
        assert conf.top.topic == "t-file"
    finally:
        conf.reset()


def test_missing_config_file_is_a_usage_error(tmp_path, capsys):
    assert client.main(["--config-file", str(tmp_path / "nope.conf"), "cell", "list"]) == 2
    assert "nope.conf" in capsys.readouterr().err


# -- end to end over fake:// ------------------------------------------------------------


class FakeTop:
    """A few methods of the top's client API over a dict (docs/top.md)."""

    def __init__(self):
        import oslo_messaging
        self.target = oslo_messaging.Target(version="1.0")
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.servers = {}
        self.cells = {"aws-east": cell()}
        self.calls = []
        self.shows = {}             # uuid -> states server_show walks through

    def _record(self, method, **kwargs):
        with self.lock:
            self.calls.append((method, kwargs))

    def _find(self, ref):
        for s in self.servers.values():
            if ref in (s["uuid"], s["name"]):
                return s
        raise exception.InstanceNotFound(instance_id=ref)

    def server_create(self, ctxt, name, flavor, image, count=1, cell=None):
        self._record("server_create", name=name, flavor=flavor, image=image, count=count,
                     cell=cell)
        if cell is not None and cell not in self.cells:
            raise exception.CellNotFound(cell_name=cell)
        out = []
        for i in range(count):
            uuid = str(uuidlib.uuid4())
            s = server(uuid, name if count == 1 else "%s-%d" % (name, i + 1), cell=None,
                       tier=None, vm_state="building", task_state="scheduling", addresses=[],
                       age_seconds=0.0, flavor=flavor, image=image)
            self.servers[uuid] = s
            out.append(s)
        return out

    def server_list(self, ctxt, deleted=False):
        self._record("server_list", deleted=deleted)
        return [s for s in self.servers.values() if deleted or s["vm_state"] != "deleted"]

    def server_show(self, ctxt, server):
        self._record("server_show", server=server)
        s = self._find(server)
        steps = self.shows.get(s["uuid"])
        if steps:
            s.update(steps.pop(0))
        return s

    def server_delete(self, ctxt, server):
        self._record("server_delete", server=server)
        s = self._find(server)
        s.update(vm_state="active", task_state="deleting")
        return s

    def server_reboot(self, ctxt, server, hard=False):
        self._record("server_reboot", server=server, hard=hard)
        s = self._find(server)
        s.update(task_state="rebooting_hard" if hard else "rebooting")
        return s

    def server_console_log(self, ctxt, server, length=None):
        self._record("server_console_log", server=server, length=length)
        self._find(server)
        lines = ["line %d" % i for i in range(1, 6)]
        return "\n".join(lines[-length:] if length else lines)

    def cell_list(self, ctxt):
        self._record("cell_list")
        return list(self.cells.values())

    def cell_show(self, ctxt, name):
        self._record("cell_show", name=name)
        if name == "boom":
            raise ValueError("boom at rabbit://u:%s@h/" % SECRET)
        if name not in self.cells:
            raise exception.CellNotFound(cell_name=name)
        return self.cells[name]


@pytest.fixture(scope="module")
def _served_top():
    """FakeTop served on ``fake://`` on a topic of its own, for the whole module.

    One server for every test: stopping an oslo.messaging server takes a
    second. ``top`` gives each test a fresh endpoint state.
    """
    import oslo_messaging
    from oslo_config import cfg
    from oslo_messaging.rpc import dispatcher

    from cellagent import conf as conf_mod
    from cellagent.rpc import transport as transport_mod
    conf = cfg.ConfigOpts()
    conf_mod.register_opts(conf)
    conf([], project="cellagent-test", default_config_files=[])
    url = "fake://"
    topic = "cellagent_top_test_%s" % uuidlib.uuid4().hex[:12]
    endpoint = FakeTop()
    transport = oslo_messaging.get_rpc_transport(conf, url=url)
    target = oslo_messaging.Target(topic=topic, server="top-test",
                                   exchange=transport_mod.exchange_for(url))
    server_ = oslo_messaging.get_rpc_server(transport, target, [endpoint],
                                            access_policy=dispatcher.DefaultRPCAccessPolicy)
    assert server_.executor_type == "threading"
    server_.start()
    try:
        yield topic, endpoint
    finally:
        server_.stop()
        server_.wait()
        conf.reset()


@pytest.fixture
def top(_served_top):
    """(topic, endpoint) of the running FakeTop, its state reset."""
    topic, endpoint = _served_top
    endpoint.reset()
    return topic, endpoint


def run(capsys, topic, *argv, url="fake://"):
    code = client.main(["--transport-url", url, "--topic", topic, "--timeout", "5"]
                       + list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_server_list_end_to_end(top, capsys):
    topic, endpoint = top
    endpoint.servers[UUID_WEB1] = server()
    code, out, err = run(capsys, topic, "server", "list")
    assert (code, err) == (0, "")
    cols = columns(out)
    assert cols["NAME"] == ["web-1"]
    assert cols["STATE"] == ["active"]
    assert cols["ADDRESSES"] == ["10.0.0.5, 54.1.2.3 (floating)"]
    assert endpoint.calls == [("server_list", {"deleted": False})]


def test_json_format_end_to_end(top, capsys):
    topic, endpoint = top
    endpoint.servers[UUID_WEB1] = server()
    code, out, _ = run(capsys, topic, "--format", "json", "server", "show", "web-1")
    assert code == 0
    assert json.loads(out) == server()
    assert endpoint.calls == [("server_show", {"server": "web-1"})]


def test_create_sends_the_api_kwargs(top, capsys):
    topic, endpoint = top
    code, out, _ = run(capsys, topic, "server", "create", "--flavor", "m1.small", "--image",
                       "cirros", "--name", "web", "--count", "2")
    assert code == 0
    assert endpoint.calls == [("server_create", {"name": "web", "flavor": "m1.small",
                                                 "image": "cirros", "count": 2, "cell": None})]
    assert columns(out)["NAME"] == ["web-1", "web-2"]
    assert columns(out)["STATE"] == ["building/scheduling"] * 2


def test_create_wait_reports_progress_and_fails_on_error(top, capsys, monkeypatch):
    topic, endpoint = top
    original = endpoint.server_create

    def create(ctxt, **kwargs):
        made = original(ctxt, **kwargs)
        good, bad = made
        endpoint.shows[good["uuid"]] = [
            {"cell": "aws-east", "tier": "public", "task_state": "spawning"},
            {"vm_state": "active", "task_state": None, "power_state": 1,
             "addresses": [{"network": "private", "addr": "10.0.0.9", "type": "fixed"}]}]
        endpoint.shows[bad["uuid"]] = [{"vm_state": "error", "task_state": None,
                                        "fault": FAULT}]
        return made
    monkeypatch.setattr(endpoint, "server_create", create)
    code, out, err = run(capsys, topic, "server", "create", "--flavor", "m1.small", "--image",
                         "cirros", "--name", "web", "--count", "2", "--wait",
                         "--poll-interval", "0.01")
    assert code == 1
    progress = [line.split("] ", 1)[1] for line in out.splitlines() if line.startswith("[")]
    assert progress == ["web-1: building/scheduling", "web-2: building/scheduling",
                        "web-1: building/spawning in aws-east", "web-2: error",
                        "web-1: active in aws-east"]
    final = columns(out[out.index("NAME"):])
    assert final["STATE"] == ["active", "error"]
    assert final["ADDRESSES"] == ["10.0.0.9", "-"]
    web2 = [u for u, s in endpoint.servers.items() if s["name"] == "web-2"][0]
    assert err == "error: server web-2 (%s) ended in state error: %s\n" % (
        web2, FAULT["message"])
    assert "web-1" not in err


def test_create_wait_succeeds_when_all_active(top, capsys, monkeypatch):
    topic, endpoint = top
    original = endpoint.server_create

    def create(ctxt, **kwargs):
        made = original(ctxt, **kwargs)
        endpoint.shows[made[0]["uuid"]] = [{"cell": "aws-east", "vm_state": "active",
                                            "task_state": None}]
        return made
    monkeypatch.setattr(endpoint, "server_create", create)
    code, out, err = run(capsys, topic, "server", "create", "--flavor", "m1.small", "--image",
                         "cirros", "--name", "solo", "--cell", "aws-east", "--wait",
                         "--poll-interval", "0.01")
    assert (code, err) == (0, "")
    assert endpoint.calls[0][1]["cell"] == "aws-east"
    assert "solo: active in aws-east" in out


def test_reboot_delete_and_console_log(top, capsys):
    topic, endpoint = top
    endpoint.servers[UUID_WEB1] = server()
    code, out, _ = run(capsys, topic, "server", "reboot", "web-1", "--hard")
    assert code == 0 and columns(out)["STATE"] == ["active/rebooting_hard"]
    code, out, _ = run(capsys, topic, "server", "console-log", "web-1", "--length", "2")
    assert (code, out) == (0, "line 4\nline 5\n")
    # One unknown server: the others are still deleted, the exit code says it.
    code, out, err = run(capsys, topic, "server", "delete", "nope", "web-1")
    assert code == 1
    assert err == "error: nope: Instance nope could not be found.\n"
    assert columns(out)["STATE"] == ["active/deleting"]
    assert [c for c in endpoint.calls if c[0] == "server_delete"] == [
        ("server_delete", {"server": "nope"}), ("server_delete", {"server": "web-1"})]
    assert endpoint.calls[0] == ("server_reboot", {"server": "web-1", "hard": True})
    assert endpoint.calls[1] == ("server_console_log", {"server": "web-1", "length": 2})


def test_cell_list_end_to_end(top, capsys):
    topic, endpoint = top
    code, out, _ = run(capsys, topic, "cell", "list")
    assert code == 0
    assert columns(out)["BUDGET USED"] == ["4/10 inst, 8/40 vCPU, $0.40/$2.00 per h"]
    assert SECRET not in out


def test_error_from_the_top_is_one_line(top, capsys):
    topic, endpoint = top
    code, out, err = run(capsys, topic, "cell", "show", "nope")
    assert (code, out) == (1, "")
    assert err == "error: Cell nope doesn't exist.\n"


def test_unexpected_error_from_the_top_is_one_line_without_traceback(top, capsys):
    topic, _ = top
    code, out, err = run(capsys, topic, "cell", "show", "boom")
    assert (code, out) == (1, "")
    assert err == "error: ValueError: boom at rabbit://u:***@h/\n"


def test_config_file_transport_end_to_end(top, capsys, tmp_path):
    topic, endpoint = top
    path = tmp_path / "cellagent.conf"
    path.write_text("[DEFAULT]\ntransport_url = fake://\n[top]\ntopic = %s\n" % topic)
    code = client.main(["--config-file", str(path), "cell", "list"])
    out = capsys.readouterr().out
    assert code == 0
    assert columns(out)["NAME"] == ["aws-east"]


def test_timeout_names_the_masked_broker(capsys):
    # Nobody listens on this topic.
    topic = "cellagent_top_nobody_%s" % uuidlib.uuid4().hex[:12]
    url = "fake://admin:%s@/top" % SECRET
    code = client.main(["--transport-url", url, "--topic", topic, "--timeout", "0.2",
                        "server", "list"])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err == ("error: the top cell did not answer within 0.2 s "
                   "(is cellagent-top running on fake://admin:***@/top?)\n")
    assert SECRET not in err


def test_unreachable_broker_fails_fast(capsys):
    # Port 1 on loopback: refused at once (unit tests may only use loopback).
    code = client.main(["--transport-url", "rabbit://nova:%s@127.0.0.1:1/" % SECRET,
                        "--timeout", "1", "cell", "list"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: cannot reach the top cell's broker "
                          "rabbit://nova:***@127.0.0.1:1/: ")
    assert SECRET not in err
