"""``cellagent-manage``: db sync, journal list/show/replay, capacity.

Examples::

    cellagent-manage --config-file /etc/cellagent/cellagent.conf db sync
    cellagent-manage --config-file ... db version
    cellagent-manage --config-file ... journal list [--status failed] [--limit 20]
    cellagent-manage --config-file ... journal show <id or message uuid>
    cellagent-manage --config-file ... journal replay <id>   # failed -> received
    cellagent-manage --config-file ... capacity show

    cellagent-manage --config-file ... cell create aws-east \\
        --transport-url rabbit://user:pass@broker-aws/ --tier public \\
        --cost-per-vcpu-hour 0.05 --flavor-cost m1.large=0.20 --max-instances 50
    cellagent-manage --config-file ... cell update aws-east --disable
    cellagent-manage --config-file ... cell list | show <name> | delete <name>

    cellagent-manage --config-file ... vpn create onprem --vpc-id vpc-0abc \\
        --customer-ip 198.51.100.7 --private-cidr 10.0.0.0/16 \\
        [--remote-cidr 172.31.0.0/16] [--output-dir /etc/cellagent/vpn]
    cellagent-manage --config-file ... vpn show onprem | delete onprem

``db sync`` creates or upgrades both the child agent's tables and the top
cell's (``top_*``) in ``[database] connection``; a database serves one kind
of process, and the other set of tables stays empty. ``journal replay``
marks a failed (or dropped) entry to be replayed: the agent replays it at
its next start. ``capacity show`` prints the cells v1 capacities this cell
reports, computed from the backend now. ``cell`` edits the top cell's cell
records (the top reads them beside its ``cells_config`` file); ``update``
changes only the options given.

``vpn`` provisions the EC2 site-to-site VPN from the private cloud into the
VPC and renders strongSwan's ``ipsec.conf`` and ``ipsec.secrets`` for the
private side (``cellagent/vpn.py``, ``docs/vpn.md``). The EC2 client comes
from ``--region`` / ``--endpoint-url``, then the ``[ec2]`` group when it is
registered, then boto3's own chain (environment, profile, instance role).
"""

import json
import sys

from cellagent.cmd import init_threading


def _add_commands(subparsers):
    db = subparsers.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="action")
    db_sub.required = True
    db_sub.add_parser("sync", help="create or upgrade the schema")
    db_sub.add_parser("version", help="print the schema version")
    journal = subparsers.add_parser("journal", help="the journal of received work")
    j_sub = journal.add_subparsers(dest="action")
    j_sub.required = True
    j_list = j_sub.add_parser("list", help="newest entries first")
    j_list.add_argument("--status", help="received, running, done, failed or dropped")
    j_list.add_argument("--limit", type=int, default=50)
    j_show = j_sub.add_parser("show", help="one entry, payload with secrets masked")
    j_show.add_argument("entry", help="entry id or message uuid")
    j_replay = j_sub.add_parser("replay", help="replay an entry at the next agent start")
    j_replay.add_argument("entry", help="entry id or message uuid")
    capacity = subparsers.add_parser("capacity", help="what this cell reports")
    c_sub = capacity.add_subparsers(dest="action")
    c_sub.required = True
    c_sub.add_parser("show", help="print the cells v1 capacities payload")
    cell = subparsers.add_parser("cell", help="the top cell's records of its cells")
    cell_sub = cell.add_subparsers(dest="action")
    cell_sub.required = True
    for action, text in (("create", "add a cell record"),
                         ("update", "change the options given, keep the rest")):
        parser = cell_sub.add_parser(action, help=text)
        parser.add_argument("cell_name", metavar="NAME", help="the cell's name")
        _add_cell_options(parser, create=action == "create")
    cell_sub.add_parser("list", help="every cell record (passwords masked)")
    for action, text in (("show", "one cell record and its last report"),
                         ("delete", "remove a cell record and its report")):
        cell_sub.add_parser(action, help=text).add_argument(
            "cell_name", metavar="NAME", help="the cell's name")
    _add_vpn_commands(subparsers)
    ec2 = subparsers.add_parser("ec2", help="EC2 housekeeping")
    ec2_sub = ec2.add_subparsers(dest="action")
    ec2_sub.required = True
    watchdog = ec2_sub.add_parser(
        "watchdog", help="terminate instances whose agent lease ran out ([ec2] lease_seconds)")
    watchdog.add_argument("--owner", dest="ec2_owner",
                          help="only this cell's instances (its cellagent:owner tag)")
    watchdog.add_argument("--dry-run", dest="ec2_dry_run", action="store_true",
                          help="list what would be terminated, terminate nothing")
    watchdog.add_argument("--region", dest="vpn_region",
                          help="AWS region; default [ec2] region, then boto3's")
    watchdog.add_argument("--endpoint-url", dest="vpn_endpoint_url", metavar="URL",
                          help="EC2 endpoint; default [ec2] endpoint_url, then AWS")


# NOTE: every dest starts with "cell_": oslo.config refuses a sub-command
# argument named like a registered option (transport_url is one).
def _add_cell_options(parser, create):
    parser.add_argument("--transport-url", dest="cell_transport_url",
                        help="the cell's broker URL (its nova transport_url)%s"
                        % ("; required" if create else ""))
    parent = parser.add_mutually_exclusive_group()
    parent.add_argument("--parent", dest="cell_is_parent", action="store_const", const=True,
                        default=None, help="the cell is a parent of this one")
    if not create:
        parent.add_argument("--child", dest="cell_is_parent", action="store_const",
                            const=False, help="the cell is a child of this one")
    parser.add_argument("--tier", dest="cell_tier",
                        help="private (used first) or public (burst); default private")
    parser.add_argument("--cost-per-vcpu-hour", dest="cell_cost_per_vcpu_hour",
                        metavar="COST", help="estimated cost of one vCPU for an hour")
    parser.add_argument("--flavor-cost", dest="cell_flavor_costs", action="append",
                        metavar="FLAVOR=COST",
                        help="cost per hour of one flavor (repeatable); overrides the "
                             "per-vCPU estimate. On update, FLAVOR=none removes one")
    parser.add_argument("--weight-offset", dest="cell_weight_offset", metavar="NUMBER")
    parser.add_argument("--weight-scale", dest="cell_weight_scale", metavar="NUMBER")
    for option, dest, what in (
            ("--max-instances", "cell_max_instances", "instances"),
            ("--max-vcpus", "cell_max_vcpus", "vCPUs"),
            ("--max-cost-per-hour", "cell_max_cost_per_hour", "cost per hour")):
        parser.add_argument(option, dest=dest, metavar="N",
                            help="most %s the cell may run; 'none' for no cap" % what)
    enabled = parser.add_mutually_exclusive_group()
    enabled.add_argument("--disable", dest="cell_disabled", action="store_const", const=True,
                         default=None, help="schedule no new builds to the cell")
    enabled.add_argument("--enable", dest="cell_disabled", action="store_const", const=False,
                         help="schedule builds to the cell again")


# NOTE: every dest starts with "vpn_", for the reason given above; [ec2]
# has options named region and endpoint_url.
def _add_vpn_commands(subparsers):
    vpn = subparsers.add_parser("vpn", help="the site-to-site VPN into the EC2 VPC")
    vpn_sub = vpn.add_subparsers(dest="action")
    vpn_sub.required = True
    for action, text in (("create", "make what is missing; render the strongSwan config"),
                         ("show", "the EC2 objects, their states and the tunnels"),
                         ("delete", "remove every EC2 object of the VPN")):
        parser = vpn_sub.add_parser(action, help=text)
        parser.add_argument("vpn_name", metavar="NAME", help="the VPN's name (its tag)")
        if action == "create":
            parser.add_argument("--vpc-id", dest="vpn_vpc_id", metavar="VPC",
                                help="the VPC to attach the VPN gateway to; required")
            parser.add_argument("--customer-ip", dest="vpn_customer_ip", metavar="IP",
                                help="public IPv4 of the private side's gateway; required")
            parser.add_argument("--private-cidr", dest="vpn_private_cidrs",
                                action="append", metavar="CIDR",
                                help="a private-side network (repeatable); required")
            parser.add_argument("--remote-cidr", dest="vpn_remote_cidrs", action="append",
                                metavar="CIDR",
                                help="an EC2-side network (repeatable); default: the VPC's")
            parser.add_argument("--bgp-asn", dest="vpn_bgp_asn", type=int, default=65000,
                                metavar="ASN", help="the customer gateway's ASN")
            parser.add_argument("--output-dir", dest="vpn_output_dir", metavar="DIR",
                                help="write ipsec.conf and ipsec.secrets here (mode 0600)")
        parser.add_argument("--region", dest="vpn_region",
                            help="AWS region; default [ec2] region, then boto3's")
        parser.add_argument("--endpoint-url", dest="vpn_endpoint_url", metavar="URL",
                            help="EC2 endpoint; default [ec2] endpoint_url, then AWS")


def _fmt(entry):
    return "%6s  %-36s  %-26s  %-36s  %-8s  %d  %s" % (
        entry.id, entry.msg_uuid, entry.method, entry.instance_uuid or "-",
        entry.status, entry.attempts, entry.error or "")


def main(argv=None):
    init_threading()
    from oslo_config import cfg

    from cellagent import exception
    from cellagent import service
    from cellagent.cmd import agent

    conf = cfg.ConfigOpts()
    conf.register_cli_opt(cfg.SubCommandOpt("command", handler=_add_commands))
    try:
        agent.parse_config(sys.argv[1:] if argv is None else argv, conf,
                           prog="cellagent-manage")
    except cfg.Error as e:
        print("cellagent-manage: %s" % e, file=sys.stderr)
        return 2
    cmd, action = conf.command.name, conf.command.action
    try:
        if cmd == "db":
            return _db(conf, action)
        if cmd == "journal":
            return _journal(conf, action, service.open_store(conf))
        if cmd == "capacity":
            return _capacity(conf)
        if cmd == "cell":
            return _cell(conf, action)
        if cmd == "vpn":
            return _vpn(conf, action)
        if cmd == "ec2":
            return _ec2_watchdog(conf)
    except exception.CellAgentError as e:
        print("cellagent-manage: %s" % e.message, file=sys.stderr)
        return 1
    return 2


def _db(conf, action):
    from cellagent import state
    from cellagent.conf import database
    url = database.connection_url(conf)
    stores = [("schema", state.get_store(url, busy_timeout=conf.database.busy_timeout))]
    try:
        if url != "memory://":      # nothing to create, and no top, in memory
            stores.append(("top schema", _top_store(conf, check=False)))
        for label, store in stores:
            if action == "sync":
                before = store.schema_version()
                after = store.sync_schema()
                print("%s version %s -> %s" % (label, before, after))
            else:
                print("%s version %s" % (label, store.schema_version()))
    finally:
        for _label, store in stores:
            store.close()
    return 0


def _top_store(conf, check=True):
    """The top's store; with ``check``, its schema created on an empty database."""
    from cellagent import state
    from cellagent.conf import database
    store = state.get_top_store(database.connection_url(conf),
                                busy_timeout=conf.database.busy_timeout)
    if check:
        try:
            if store.schema_version() == 0:
                store.sync_schema()
            store.check_schema()
        except Exception:  # noqa: B902 - closed, then reported by main
            store.close()
            raise
    return store


_CELL_NUMBERS = {"cell_weight_offset": ("weight_offset", float),
                 "cell_weight_scale": ("weight_scale", float),
                 "cell_cost_per_vcpu_hour": ("cost_per_vcpu_hour", float)}
_CELL_CAPS = {"cell_max_instances": ("max_instances", int),
              "cell_max_vcpus": ("max_vcpus", int),
              "cell_max_cost_per_hour": ("max_cost_per_hour", float)}


def _number(option, text, kind):
    try:
        return kind(text)
    except ValueError:
        raise ValueError("--%s %s is not %s" % (option.replace("_", "-"), text,
                                                "an integer" if kind is int else "a number"))


def _cell_changes(args, flavor_costs):
    """The TopCell fields the command line sets, parsed (ValueError if bad)."""
    changes = {}
    for dest in ("cell_transport_url", "cell_is_parent", "cell_tier", "cell_disabled"):
        value = getattr(args, dest)
        if value is not None:
            changes[dest[len("cell_"):]] = value
    for dest, (field, kind) in _CELL_NUMBERS.items():
        value = getattr(args, dest)
        if value is not None:
            changes[field] = _number(field, value, kind)
    for dest, (field, kind) in _CELL_CAPS.items():
        value = getattr(args, dest)
        if value is not None:
            changes[field] = (None if value.strip().lower() in ("none", "")
                              else _number(field, value, kind))
    if args.cell_flavor_costs:
        costs = dict(flavor_costs)
        for item in args.cell_flavor_costs:
            flavor, sep, cost = item.partition("=")
            if not sep or not flavor.strip():
                raise ValueError("--flavor-cost %s is not FLAVOR=COST" % item)
            if cost.strip().lower() in ("none", ""):
                costs.pop(flavor.strip(), None)
            else:
                costs[flavor.strip()] = _number("flavor_cost", cost, float)
        changes["flavor_costs"] = costs
    return changes


def _cell(conf, action):
    import dataclasses

    from cellagent import exception
    from cellagent import objects
    args = conf.command
    store = _top_store(conf)
    try:
        if action == "list":
            _print_cells(store.list_cells())
            return 0
        name = args.cell_name
        if action == "show":
            _print_cell(store.get_cell(name), store.cell_reports().get(name))
            return 0
        if action == "delete":
            store.delete_cell(name)
            print("cell %s deleted" % name)
            return 0
        try:
            if action == "create":
                try:
                    store.get_cell(name)
                except exception.CellNotFound:
                    pass
                else:
                    raise exception.CellAgentError("cell %s already exists: use 'cell "
                                                   "update'" % name)
                if args.cell_transport_url is None:
                    raise ValueError("cell create needs --transport-url")
                cell = objects.TopCell(name=name, **_cell_changes(args, {}))
            else:
                current = store.get_cell(name)
                changes = _cell_changes(args, current.flavor_costs)
                if not changes:
                    raise exception.CellAgentError("nothing to change: give an option")
                cell = dataclasses.replace(current, **changes)
            if not cell.transport_url.strip():
                raise ValueError("--transport-url must not be empty")
        except ValueError as e:
            # TopCell's own messages already name the cell.
            text = str(e) if str(e).startswith("cell ") else "cell %s: %s" % (name, e)
            raise exception.CellAgentError(text)
        store.put_cell(cell)
        print("cell %s %sd" % (name, action))
        _print_cell(cell)
        return 0
    finally:
        store.close()


def _masked(url):
    from cellagent.rpc import transport
    return transport.mask_url(url) if url else "-"


def _cap(value):
    return "-" if value is None else str(value)


def _print_cells(cells):
    rows = [("NAME", "TIER", "ROLE", "STATE", "COST/VCPU-H", "MAX INST", "MAX VCPUS",
             "MAX COST/H", "TRANSPORT URL")]
    for c in cells:
        rows.append((c.name, c.tier, "parent" if c.is_parent else "child",
                     "disabled" if c.disabled else "enabled", "%g" % c.cost_per_vcpu_hour,
                     _cap(c.max_instances), _cap(c.max_vcpus), _cap(c.max_cost_per_hour),
                     _masked(c.transport_url)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row[:-1], widths, strict=True))
              + "  " + row[-1])


def _print_cell(cell, report=None):
    fields = [("name", cell.name), ("transport_url", _masked(cell.transport_url)),
              ("is_parent", cell.is_parent), ("tier", cell.tier),
              ("disabled", cell.disabled), ("weight_offset", cell.weight_offset),
              ("weight_scale", cell.weight_scale),
              ("cost_per_vcpu_hour", cell.cost_per_vcpu_hour),
              ("flavor_costs", json.dumps(cell.flavor_costs, sort_keys=True)),
              ("max_instances", _cap(cell.max_instances)),
              ("max_vcpus", _cap(cell.max_vcpus)),
              ("max_cost_per_hour", _cap(cell.max_cost_per_hour))]
    if report is not None:
        fields += [("last_seen", report.last_seen or "-"),
                   ("capacities_at", report.capacities_at or "-"),
                   ("backoff_until", report.backoff_until or "-"),
                   ("failures", report.failures)]
    for key, value in fields:
        print("%-20s %s" % (key, value))


def _journal(conf, action, store):
    from cellagent.objects import JournalStatus
    try:
        if action == "list":
            for entry in store.list_requests(limit=conf.command.limit,
                                             status=conf.command.status):
                print(_fmt(entry))
            return 0
        entry = store.get_request(conf.command.entry)
        if entry is None:
            print("no journal entry %s" % conf.command.entry, file=sys.stderr)
            return 1
        if action == "show":
            print(_fmt(entry))
            # The journal never stores passwords or tokens (manager.scrub).
            print(json.dumps(json.loads(entry.payload), indent=2, sort_keys=True))
            return 0
        if entry.status in JournalStatus.UNFINISHED:
            print("entry %s is already waiting to be replayed" % entry.id)
            return 0
        store.requeue(entry.id)
        print("entry %s will be replayed at the next agent start" % entry.id)
        return 0
    finally:
        store.close()


def _capacity(conf):
    from cellagent import backends
    from cellagent import reporter
    backend = backends.load_backend(conf)
    backend.start()
    try:
        flavors = reporter.FlavorCatalog.from_config(conf.cells.flavors).all()
        payload = reporter.capacities_payload(backend.get_capacity(flavors), flavors,
                                              conf.cells.reserve_percent)
    finally:
        backend.stop()
    print(json.dumps(payload, indent=2, sort_keys=True))
    return 0


def _ec2_settings(conf):
    """The [ec2] client options, when cellagent.conf registers the group."""
    if "ec2" not in conf:
        return {}
    ec2 = conf.ec2
    return {"region": ec2.region, "endpoint_url": ec2.endpoint_url,
            "profile": ec2.profile, "access_key": ec2.access_key_id,
            "secret_key": ec2.secret_access_key, "max_attempts": ec2.max_attempts}


def _ec2_client(conf, args):
    """A boto3 EC2 client: command line, then [ec2], then boto3's chain."""
    import boto3
    import botocore.config
    import botocore.exceptions

    from cellagent import exception
    settings = _ec2_settings(conf)
    try:
        session = boto3.session.Session(
            profile_name=settings.get("profile") or None,
            region_name=args.vpn_region or settings.get("region"),
            aws_access_key_id=settings.get("access_key"),
            aws_secret_access_key=settings.get("secret_key"))
        retries = {"mode": "standard"}
        if settings.get("max_attempts"):
            retries["max_attempts"] = settings["max_attempts"]
        return session.client(
            "ec2", endpoint_url=args.vpn_endpoint_url or settings.get("endpoint_url"),
            config=botocore.config.Config(retries=retries))
    except botocore.exceptions.NoRegionError:
        raise exception.ConfigurationError(
            reason="no AWS region: give --region, set [ec2] region or AWS_DEFAULT_REGION")
    except (botocore.exceptions.BotoCoreError, ValueError) as e:
        raise exception.ConfigurationError(reason="cannot build the EC2 client: %s" % e)


def _vpn(conf, action):
    import logging

    from cellagent import vpn
    # NOTE: botocore logs whole responses at DEBUG, and DescribeVpnConnections
    # carries the pre-shared keys; keep it at INFO even under [DEFAULT] debug.
    botocore_log = logging.getLogger("botocore")
    if botocore_log.getEffectiveLevel() < logging.INFO:
        botocore_log.setLevel(logging.INFO)
    args = conf.command
    ec2 = _ec2_client(conf, args)
    if action == "create":
        provisioner = vpn.VpnProvisioner(
            ec2, args.vpn_name, vpc_id=args.vpn_vpc_id, customer_ip=args.vpn_customer_ip,
            private_cidrs=args.vpn_private_cidrs or (), remote_cidrs=args.vpn_remote_cidrs,
            bgp_asn=args.vpn_bgp_asn)
        state = provisioner.create()
        print("\n".join(vpn.describe(state)))
        if args.vpn_output_dir:
            ipsec_conf, ipsec_secrets = provisioner.render(state)
            for path in vpn.write_config(args.vpn_output_dir, ipsec_conf, ipsec_secrets):
                print("wrote %s" % path)
        else:
            print("give --output-dir DIR to write ipsec.conf and ipsec.secrets")
        return 0
    provisioner = vpn.VpnProvisioner(ec2, args.vpn_name)
    if action == "show":
        print("\n".join(vpn.describe(provisioner.show())))
        return 0
    done = provisioner.delete()
    for line in done or ["nothing to delete"]:
        print("vpn %s: %s" % (args.vpn_name, line))
    return 0


def _ec2_watchdog(conf):
    """Terminate the instances of dead agents: their lease tag ran out."""
    import datetime

    from cellagent import exception
    from cellagent.backends import ec2_support
    args = conf.command
    client = _ec2_client(conf, args)
    try:
        expired = ec2_support.expired_leases(client, owner=args.ec2_owner)
        for instance_id, owner, until in expired:
            when = datetime.datetime.fromtimestamp(until, datetime.timezone.utc)
            print("%s %s (owner %s, lease ended %s)" % (
                "would terminate" if args.ec2_dry_run else "terminating", instance_id,
                owner or "-", when.strftime("%Y-%m-%dT%H:%M:%SZ")))
        if expired and not args.ec2_dry_run:
            ids = [i for i, _o, _u in expired]
            for start in range(0, len(ids), 500):
                client.terminate_instances(InstanceIds=ids[start:start + 500])
    except Exception as e:  # noqa: B902 - botocore's errors, in one line
        raise exception.BackendError(backend="ec2", reason=str(e))
    if not expired:
        print("no expired lease")
    return 0


if __name__ == "__main__":
    sys.exit(main())
