"""``cellagent-client``: run servers through the top cell.

Examples::

    cellagent-client server create --flavor m1.small --image cirros --name web --count 2 --wait
    cellagent-client server list [--deleted]
    cellagent-client server show web-1
    cellagent-client server delete web-1 web-2
    cellagent-client server reboot web-1 [--hard]
    cellagent-client server stop web-1 / server start web-1
    cellagent-client server console-log web-1 [--length 50]
    cellagent-client cell list
    cellagent-client --format json cell show aws-east

Every command is one oslo.messaging RPC ``call`` to ``cellagent-top`` on the
top's own broker: topic ``[top] topic``, version 1.0, the methods and
arguments of the table in ``docs/top.md``. The broker is ``[DEFAULT]
transport_url`` of the config files, found as the daemons find theirs
(``/etc/cellagent/cellagent.conf`` when no ``--config-file`` is given), or
``--transport-url``.

The output is meant for a person (``--format table``) or a program
(``--format json``: the raw result). The table formatting lives in the small
pure functions ``format_*`` and ``humanise_age`` below, so it can be tested
without a broker. Passwords never reach the terminal: every URL printed goes
through ``mask_url``.
"""

import argparse
import datetime
import json
import re
import sys
import time

from cellagent.cmd import init_threading
from cellagent.rpc.transport import exchange_for
from cellagent.rpc.transport import is_in_memory
from cellagent.rpc.transport import kombu_urls
from cellagent.rpc.transport import mask_url
from cellagent.rpc.transport import scheme_of

PROG = "cellagent-client"
RPC_VERSION = "1.0"
# Publishing attempts when the broker cannot be reached. oslo.messaging's
# default (None) retries for ever, which makes a person's command hang.
SEND_RETRIES = 2
# Modules whose exceptions oslo.messaging rebuilds on this side (the top
# raises cellagent.exception classes; docs/top.md).
REMOTE_EXMODS = ["cellagent.exception"]

# nova.compute.power_state, for ``server show``.
POWER_STATES = {0: "nostate", 1: "running", 3: "paused", 4: "shutdown",
                6: "crashed", 7: "suspended"}


# -- formatting (pure functions) -------------------------------------------------


def humanise_age(seconds):
    """``12s``, ``5m``, ``3h``, ``2d`` (rounded down); ``-`` when unknown."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def table(headers, rows):
    """Plain text columns, two spaces apart, widths from the content.

    A value with newlines continues on the next lines of its column. Trailing
    spaces are stripped, so the last column is never padded.
    """
    lines = []
    for row in [list(headers)] + [list(r) for r in rows]:
        cells = [("-" if v is None else str(v)).split("\n") for v in row]
        for i in range(max(len(c) for c in cells)):
            lines.append([c[i] if i < len(c) else "" for c in cells])
    widths = [max(len(line[col]) for line in lines) for col in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def format_servers(servers, now):
    """The ``server list`` table: NAME, UUID, CELL, TIER, STATE, ADDRESSES, AGE."""
    if not servers:
        return "no servers"
    rows = [(s.get("name"), s.get("uuid"), s.get("cell"), s.get("tier"), _state(s),
             _addresses(s) or "-", humanise_age(_server_age(s, now)))
            for s in sorted(servers, key=lambda s: (s.get("name") or "", s.get("uuid") or ""))]
    return table(("NAME", "UUID", "CELL", "TIER", "STATE", "ADDRESSES", "AGE"), rows)


def format_server(server, now):
    """``server show``: one field per line, the latest fault included."""
    s = server
    power = s.get("power_state")
    fault = s.get("fault") or {}
    rows = [
        ("name", s.get("name")),
        ("uuid", s.get("uuid")),
        ("state", _state(s)),
        ("power state", None if power is None else "%s (%s)" % (
            POWER_STATES.get(power, "unknown"), power)),
        ("cell", s.get("cell")),
        ("tier", s.get("tier")),
        ("flavor", _flavor(s.get("flavor"))),
        ("image", s.get("image")),
        ("addresses", _addresses(s, per_line=True) or None),
        ("access ip v4", s.get("access_ip_v4")),
        ("created", _when(s.get("created_at"), _server_age(s, now))),
        ("launched", _when(s.get("launched_at"), _age_of(s.get("launched_at"), now))),
        ("updated", _when(s.get("updated_at"), _age_of(s.get("updated_at"), now))),
        ("fault", _fault(fault) if fault else None),
    ]
    if fault.get("details"):
        rows.append(("fault details", _text(fault["details"])))
    return table(("FIELD", "VALUE"), rows)


def format_cells(cells, now):
    """The ``cell list`` table: capacity, mute state, budget and backoff per cell."""
    if not cells:
        return "no cells"
    rows = []
    for c in sorted(cells, key=lambda c: c.get("name") or ""):
        name = c.get("name")
        if c.get("disabled"):
            name = "%s (disabled)" % name
        rows.append((name, c.get("tier"), _free_units(c.get("free_units")),
                     _mb(c.get("ram_free_mb")), _yes_no(c.get("mute")),
                     _last_report(c, now), _budget(c), _backoff(c.get("backoff_until"), now)))
    return table(("NAME", "TIER", "FREE", "RAM FREE", "MUTE", "LAST REPORT", "BUDGET USED",
                  "BACKOFF"), rows)


def format_cell(cell, now):
    """``cell show``: one field per line."""
    c = cell
    budget = c.get("budget") or {}
    used = c.get("used") or {}
    caps = c.get("capabilities") or {}
    rows = [
        ("name", c.get("name")),
        ("tier", c.get("tier")),
        ("transport url", mask_url(c["transport_url"]) if c.get("transport_url") else None),
        ("parent", _yes_no(c.get("is_parent"))),
        ("disabled", _yes_no(c.get("disabled"))),
        ("mute", _yes_no(c.get("mute"))),
        ("last report", _last_report(c, now) if not c.get("last_seen")
         else "%s (%s)" % (c["last_seen"], _last_report(c, now))),
        ("free units", _free_units(c.get("free_units"))),
        ("ram free", _mb(c.get("ram_free_mb"))),
        ("disk free", _mb(c.get("disk_free_mb"))),
        ("instances", _of(used.get("instances") or 0, budget.get("max_instances"), "%d")),
        ("vcpus", _of(used.get("vcpus") or 0, budget.get("max_vcpus"), "%d")),
        ("cost per hour", _of(used.get("cost_per_hour") or 0.0,
                              budget.get("max_cost_per_hour"), "$%.2f")),
        ("cost per vcpu hour", None if c.get("cost_per_vcpu_hour") is None
         else _money(c["cost_per_vcpu_hour"])),
        ("backoff", _backoff(c.get("backoff_until"), now) or "-"),
        ("capabilities", "\n".join("%s: %s" % (k, ", ".join(str(v) for v in _listify(vals)))
                                   for k, vals in sorted(caps.items())) or "-"),
    ]
    return table(("FIELD", "VALUE"), rows)


def format_json(result):
    """The raw result, indent 2 and sorted keys, with any transport URL masked."""
    return json.dumps(_masked(result), indent=2, sort_keys=True)


def _state(s):
    state = s.get("vm_state") or "-"
    if s.get("task_state"):
        state += "/%s" % s["task_state"]
    return state


def _addresses(s, per_line=False):
    """``10.0.0.5, 54.1.2.3 (floating)``, or one ``network: addresses`` per line."""
    addrs = s.get("addresses") or []
    if not addrs:
        return s.get("access_ip_v4") or ""

    def one(a):
        text = str(a.get("addr"))
        return text + " (floating)" if a.get("type") == "floating" else text
    if not per_line:
        return ", ".join(one(a) for a in addrs)
    networks = {}
    for a in addrs:
        networks.setdefault(a.get("network") or "-", []).append(one(a))
    return "\n".join("%s: %s" % (net, ", ".join(v)) for net, v in networks.items())


def _flavor(flavor):
    if isinstance(flavor, dict):
        detail = [("%s vCPU" % flavor["vcpus"]) if flavor.get("vcpus") is not None else None,
                  ("%s MB RAM" % flavor["memory_mb"]) if flavor.get("memory_mb") else None,
                  ("%s GB disk" % flavor["root_gb"]) if flavor.get("root_gb") else None]
        detail = ", ".join(d for d in detail if d)
        return "%s (%s)" % (flavor.get("name"), detail) if detail else flavor.get("name")
    return flavor


def _fault(fault):
    message = _text(fault.get("message") or "(no message)")
    return "%s (code %s)" % (message, fault["code"]) if fault.get("code") else message


def _text(value):
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _when(iso, age):
    if not iso:
        return None
    return "%s (%s ago)" % (iso, humanise_age(age)) if age is not None else iso


def _server_age(s, now):
    # The top's own count first: it does not depend on this machine's clock.
    if s.get("age_seconds") is not None:
        return s["age_seconds"]
    return _age_of(s.get("created_at"), now)


def _age_of(iso, now):
    when = _parse_time(iso)
    if when is None or now is None:
        return None
    return (_naive_utc(now) - when).total_seconds()


def _parse_time(iso):
    """A naive UTC datetime from the top's ISO 8601 text (``...Z`` or offset)."""
    if not iso:
        return None
    try:
        when = datetime.datetime.fromisoformat(str(iso).replace("Z", "+00:00"))
    except ValueError:
        return None
    return _naive_utc(when)


def _naive_utc(when):
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return when


def _free_units(units):
    if not units:
        return "-"
    return " ".join("%s=%s" % (name, n) for name, n in units.items())


def _mb(mb):
    if mb is None:
        return "-"
    if mb < 1024:
        return "%d MiB" % mb
    gib = mb / 1024.0
    return ("%.1f GiB" % gib).replace(".0 ", " ") if gib < 10 else "%d GiB" % gib


def _yes_no(value):
    return "yes" if value else "no"


def _last_report(c, now):
    age = c.get("last_report_age_seconds")
    if age is None:
        age = _age_of(c.get("last_seen"), now)
    return "never" if age is None else "%s ago" % humanise_age(age)


def _budget(c):
    """``4/10 inst, 8/40 vCPU, $0.40/$2.00 per h`` with ``-`` for no cap."""
    budget = c.get("budget") or {}
    used = c.get("used") or {}

    def cap(value, fmt):
        return "-" if value is None else fmt % value
    return "%d/%s inst, %d/%s vCPU, $%.2f/%s per h" % (
        used.get("instances") or 0, cap(budget.get("max_instances"), "%d"),
        used.get("vcpus") or 0, cap(budget.get("max_vcpus"), "%d"),
        used.get("cost_per_hour") or 0.0, cap(budget.get("max_cost_per_hour"), "$%.2f"))


def _money(value):
    """``$0.05``, ``$0.0125``: cents always, more digits only when there are some."""
    text = "%.4f" % value
    return "$" + (text[:-2] + text[-2:].rstrip("0"))


def _of(used, cap, fmt):
    return "%s of %s" % (fmt % used, fmt % cap) if cap is not None else "%s (no cap)" % (
        fmt % used)


def _backoff(iso, now):
    """``until 10:42:03 (in 4m)``; empty when there is none or it is over."""
    until = _parse_time(iso)
    if until is None:
        return ""
    left = None
    if now is not None:
        now = _naive_utc(now)
        left = (until - now).total_seconds()
        if left <= 0:
            return ""
    same_day = now is not None and until.date() == now.date()
    text = "until %s UTC" % until.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S")
    return text if left is None else "%s (in %s)" % (text, humanise_age(left))


def _listify(values):
    return values if isinstance(values, (list, tuple, set)) else [values]


def _masked(value):
    if isinstance(value, dict):
        return {k: (mask_url(v) if k == "transport_url" and isinstance(v, str) else _masked(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


_URL_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


def mask_urls_in(text):
    """Every URL in a message with its password masked."""
    return _URL_RE.sub(lambda m: mask_url(m.group(0)), text)


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


# -- command line ---------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run servers through the cellagent top cell.")
    parser.add_argument("--config-file", action="append", default=[], metavar="F",
                        help="config file (repeatable); default: the daemons' search, "
                             "e.g. /etc/cellagent/cellagent.conf")
    parser.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                        help="directory of *.conf files read after the config files")
    parser.add_argument("--transport-url", metavar="URL",
                        help="the top's broker; default: [DEFAULT] transport_url")
    parser.add_argument("--topic", metavar="T", help="default: [top] topic")
    parser.add_argument("--timeout", type=_positive_float, metavar="S",
                        help="seconds to wait for each answer; default: "
                             "[DEFAULT] rpc_response_timeout (60)")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="table for people (default), json for programs")
    commands = parser.add_subparsers(dest="command", metavar="<command>")
    commands.required = True

    server = commands.add_parser("server", help="servers").add_subparsers(
        dest="action", metavar="<action>")
    server.required = True
    create = server.add_parser("create", help="create servers; the top picks the cell")
    create.add_argument("--flavor", required=True, metavar="F", help="flavor name")
    create.add_argument("--image", required=True, metavar="I", help="image uuid or name")
    create.add_argument("--name", required=True, metavar="N",
                        help="server name (with --count, the top numbers them)")
    create.add_argument("--count", type=_positive_int, default=1, metavar="C")
    create.add_argument("--cell", metavar="NAME", help="build in this cell only")
    create.add_argument("--wait", action="store_true",
                        help="wait until every server is active or in error; exit 1 on error")
    create.add_argument("--poll-interval", type=_positive_float, default=2.0, metavar="S",
                        help="seconds between checks with --wait (default 2)")
    listing = server.add_parser("list", help="all servers")
    listing.add_argument("--deleted", action="store_true", help="include deleted servers")
    server.add_parser("show", help="one server, with its fault").add_argument(
        "server", help="uuid or unique name")
    server.add_parser("delete", help="delete servers").add_argument(
        "servers", nargs="+", metavar="SERVER")
    reboot = server.add_parser("reboot", help="reboot a server")
    reboot.add_argument("server")
    reboot.add_argument("--hard", action="store_true", help="hard reboot (power cycle)")
    server.add_parser("stop", help="stop (power off) a server").add_argument("server")
    server.add_parser("start", help="start a stopped server").add_argument("server")
    for action, text in (("pause", "pause a server"), ("unpause", "unpause a server"),
                         ("suspend", "suspend a server"), ("resume", "resume a server"),
                         ("resize-confirm", "keep a resized server's new size"),
                         ("resize-revert", "go back to the size before the resize")):
        server.add_parser(action, help=text).add_argument("server")
    resize = server.add_parser("resize", help="change a server's flavor (then confirm "
                                              "or revert)")
    resize.add_argument("server")
    resize.add_argument("--flavor", required=True, metavar="F", help="new flavor name")
    rebuild = server.add_parser("rebuild", help="rebuild a server from an image")
    rebuild.add_argument("server")
    rebuild.add_argument("--image", metavar="I", help="default: the server's image")
    snapshot = server.add_parser("snapshot", help="image a server's disk")
    snapshot.add_argument("server")
    snapshot.add_argument("--name", metavar="N", help="the snapshot's name")
    console = server.add_parser("console-log", help="print a server's console output")
    console.add_argument("server")
    console.add_argument("--length", type=_positive_int, metavar="N", help="last N lines")

    cell = commands.add_parser("cell", help="child cells").add_subparsers(
        dest="action", metavar="<action>")
    cell.required = True
    cell.add_parser("list", help="every child cell: capacity, reports, budget, backoff")
    cell.add_parser("show", help="one child cell").add_argument("name")
    return parser


def _positive_float(text):
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


class ClientError(Exception):
    """Printed as ``error: <message>``; exit code 1.

    ``kind`` is the class name of the exception the top raised, if any.
    """

    def __init__(self, message, kind=None):
        super().__init__(message)
        self.kind = kind


def load_config(args):
    """A private ConfigOpts from the config files, as the daemons read them."""
    from oslo_config import cfg
    from oslo_messaging import opts as messaging_opts

    from cellagent import __version__
    from cellagent import conf as conf_mod
    conf = cfg.ConfigOpts()
    conf_mod.register_opts(conf)
    # [DEFAULT] rpc_response_timeout: RPCClient registers it only when built,
    # and the client needs it before (the broker check, the error message).
    for group, opts in messaging_opts.list_opts():
        if group in (None, "DEFAULT"):
            conf.register_opts(opts)
    cli = []
    for path in args.config_file:
        cli += ["--config-file", path]
    for path in args.config_dir:
        cli += ["--config-dir", path]
    conf(cli, project="cellagent", prog=PROG, version=__version__,
         default_config_files=cfg.find_config_files(project="cellagent", prog=PROG))
    return conf


class TopClient:
    """The RPC calls of docs/top.md, with errors turned into ClientError."""

    def __init__(self, conf, url, topic, timeout=None):
        import oslo_messaging
        self._om = oslo_messaging
        self.url = url
        self.safe_url = display_url(url)
        self.timeout = timeout if timeout is not None else conf.rpc_response_timeout
        if scheme_of(url) in ("rabbit", "amqp", "pyamqp"):
            check_broker(url, self.timeout)
        try:
            self._transport = oslo_messaging.get_rpc_transport(
                conf, url=url, allowed_remote_exmods=REMOTE_EXMODS)
        except oslo_messaging.MessagingException as e:
            raise ClientError("cannot use the transport %s: %s" % (
                self.safe_url, mask_urls_in(_first_line(str(e)))))
        # On an in-memory transport the top listens on a per-vhost exchange
        # (rpc.transport.exchange_for); on RabbitMQ on control_exchange.
        target = oslo_messaging.Target(topic=topic, version=RPC_VERSION,
                                       exchange=exchange_for(url))
        self._client = oslo_messaging.get_rpc_client(self._transport, target,
                                                     timeout=self.timeout, retry=SEND_RETRIES)

    def call(self, method, **kwargs):
        om = self._om
        try:
            return self._client.call({}, method, **kwargs)
        except om.MessagingTimeout:
            raise ClientError("the top cell did not answer within %s s (is cellagent-top "
                              "running on %s?)" % ("%g" % self.timeout, self.safe_url))
        except om.RemoteError as e:
            # An exception of a module this side does not rebuild.
            text = "%s: %s" % (e.exc_type, e.value) if e.value else e.exc_type
            raise ClientError(mask_urls_in(_one_line(text or "unknown error")), e.exc_type)
        except (om.MessageDeliveryFailure, om.ClientSendError) as e:
            raise ClientError("cannot send to the top cell's broker %s: %s" % (
                self.safe_url, mask_urls_in(_first_line(str(e)))))
        except om.MessagingException as e:
            raise ClientError("RPC to %s failed: %s" % (
                self.safe_url, mask_urls_in(_first_line(str(e)))))
        except Exception as e:  # noqa: B902 - an exception the top raised, rebuilt here
            raise ClientError(mask_urls_in(remote_message(e)),
                              type(e).__name__.replace("_Remote", ""))

    def close(self):
        # oslo.messaging's fake driver clears every in-memory exchange of the
        # process on cleanup, the top's too when it runs in this process
        # (tests, an embedded demo); there is no connection to close anyway.
        if not is_in_memory(self.url):
            self._transport.cleanup()


def check_broker(url, timeout):
    """Fail fast when the broker is down or refuses us.

    oslo.messaging retries for ever to open the connection of a call's reply
    queue, whatever the call's timeout, so a person would wait on a dead
    broker with nothing but its log lines to read.
    """
    import kombu
    conn = kombu.Connection(kombu_urls(url), connect_timeout=min(timeout, 10.0), heartbeat=0)
    try:
        conn.ensure_connection(max_retries=SEND_RETRIES, interval_start=0.5,
                               interval_step=0.5)
    except Exception as e:  # noqa: B902 - socket, AMQP or kombu errors alike
        raise ClientError("cannot reach the top cell's broker %s: %s" % (
            display_url(url), mask_urls_in(_one_line(str(e)) or type(e).__name__)))
    finally:
        conn.release()


def display_url(url):
    """The URL to print: as given when it cannot hold a password, else masked."""
    if "@" not in url and "?" not in url:
        return url
    return mask_url(url)


def remote_message(exc):
    """The message of an exception rebuilt from the top, without its traceback.

    oslo.messaging makes ``str()`` of a rebuilt exception its message plus
    the remote traceback; cellagent exceptions keep the bare one in
    ``message``. Exceptions that are not cellagent's (a bug in the top) are
    named, since their message alone may say little (``KeyError: 'x'``).
    """
    message = getattr(exc, "message", None)
    if isinstance(message, str) and message:
        return _one_line(message)
    text = str(exc).split("\nTraceback (most recent call last):", 1)[0].strip()
    name = type(exc).__name__
    if name.endswith("_Remote"):
        name = name[:-len("_Remote")]
    return _one_line("%s: %s" % (name, text) if text else name)


def _one_line(text):
    return " ".join(str(text).split())


def _first_line(text):
    return text.strip().split("\n", 1)[0]


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:     # --help, or a usage error argparse printed
        return e.code if isinstance(e.code, int) else 2
    init_threading()
    from oslo_config import cfg
    try:
        conf = load_config(args)
    except cfg.Error as e:
        print("%s: %s" % (PROG, e), file=sys.stderr)
        return 2
    url = args.transport_url or conf.transport_url
    if not url:
        print("error: no transport URL: set [DEFAULT] transport_url in the config file "
              "(default /etc/cellagent/cellagent.conf) or pass --transport-url",
              file=sys.stderr)
        return 1
    client = None
    try:
        client = TopClient(conf, url, args.topic or conf.top.topic, args.timeout)
        return run(args, client, sys.stdout)
    except ClientError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if client is not None:
            client.close()
        conf.reset()


def run(args, client, out):
    """Do the command; returns the exit code. ClientError propagates."""
    def emit(result, formatter):
        print(format_json(result) if args.format == "json" else formatter(result, utcnow()),
              file=out)

    if args.command == "cell":
        if args.action == "list":
            emit(client.call("cell_list"), format_cells)
        else:
            emit(client.call("cell_show", name=args.name), format_cell)
        return 0
    action = args.action
    if action == "create":
        servers = client.call("server_create", name=args.name, flavor=args.flavor,
                              image=args.image, count=args.count, cell=args.cell)
        if not args.wait:
            emit(servers, format_servers)
            return 0
        return wait_for_servers(client, servers, args, out)
    if action == "list":
        emit(client.call("server_list", deleted=args.deleted), format_servers)
    elif action == "show":
        emit(client.call("server_show", server=args.server), format_server)
    elif action == "delete":
        # Like ``nova delete``: try each, report each failure, fail at the end.
        done, failed = [], 0
        for server in args.servers:
            try:
                done.append(client.call("server_delete", server=server))
            except ClientError as e:
                print("error: %s: %s" % (server, e), file=sys.stderr)
                failed += 1
        if done:
            emit(done, format_servers)
        return 1 if failed else 0
    elif action == "reboot":
        emit([client.call("server_reboot", server=args.server, hard=args.hard)],
             format_servers)
    elif action in ("stop", "start"):
        emit([client.call("server_" + action, server=args.server)], format_servers)
    elif action in ("pause", "unpause", "suspend", "resume", "resize-confirm",
                    "resize-revert", "resize", "rebuild", "snapshot"):
        emit([client.call("server_action", server=args.server, action=action,
                          flavor=getattr(args, "flavor", None),
                          image=getattr(args, "image", None),
                          name=getattr(args, "name", None))], format_servers)
    elif action == "console-log":
        text = client.call("server_console_log", server=args.server, length=args.length)
        if args.format == "json":
            print(json.dumps(text), file=out)
        else:
            out.write(text if not text or text.endswith("\n") else text + "\n")
    return 0


def finished(server):
    """True once a server being built needs no more waiting."""
    state = server.get("vm_state")
    return state in ("error", "deleted") or (state == "active" and not server.get("task_state"))


def wait_for_servers(client, servers, args, out):
    """Poll ``server_show`` until every server is active or in error.

    Progress goes to stdout (stderr with ``--format json``, so that stdout
    stays one JSON document). Exit code 1 if any did not end active.
    """
    progress = sys.stderr if args.format == "json" else out
    start = time.monotonic()
    current = {s["uuid"]: s for s in servers}
    order = [s["uuid"] for s in servers]
    seen = {}
    gone = set()

    def report(s):
        text = "%s: %s%s" % (s.get("name") or s["uuid"], _state(s),
                             " in %s" % s["cell"] if s.get("cell") else "")
        if seen.get(s["uuid"]) != text:
            seen[s["uuid"]] = text
            print("[%5s] %s" % (humanise_age(time.monotonic() - start), text), file=progress,
                  flush=True)

    for s in servers:
        report(s)
    while True:
        pending = [u for u in order if u not in gone and not finished(current[u])]
        if not pending:
            break
        time.sleep(args.poll_interval)
        for uuid in pending:
            try:
                current[uuid] = client.call("server_show", server=uuid)
            except ClientError as e:
                # Deleted meanwhile: it will never be active.
                if e.kind != "InstanceNotFound":
                    raise
                print("error: %s: %s" % (uuid, e), file=sys.stderr)
                gone.add(uuid)
                continue
            report(current[uuid])
    final = [current[u] for u in order]
    if args.format == "json":
        print(format_json(final), file=out)
    else:
        print(format_servers(final, utcnow()), file=out)
    failed = 0
    for uuid in order:
        s = current[uuid]
        if uuid in gone:
            failed += 1
        elif s.get("vm_state") != "active":
            failed += 1
            fault = s.get("fault") or {}
            print("error: server %s (%s) ended in state %s%s" % (
                s.get("name"), uuid, s.get("vm_state"),
                ": %s" % _one_line(fault["message"]) if fault.get("message") else ""),
                file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
