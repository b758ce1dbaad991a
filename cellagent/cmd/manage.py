"""``cellagent-manage``: db sync, journal list/show/replay, capacity.

Examples::

    cellagent-manage --config-file /etc/cellagent/cellagent.conf db sync
    cellagent-manage --config-file ... db version
    cellagent-manage --config-file ... journal list [--status failed] [--limit 20]
    cellagent-manage --config-file ... journal show <id or message uuid>
    cellagent-manage --config-file ... journal replay <id>   # failed -> received
    cellagent-manage --config-file ... capacity show

``journal replay`` marks a failed (or dropped) entry to be replayed: the agent
replays it at its next start. ``capacity show`` prints the cells v1
capacities this cell reports, computed from the backend now.
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
    except exception.CellAgentError as e:
        print("cellagent-manage: %s" % e.message, file=sys.stderr)
        return 1
    return 2


def _db(conf, action):
    from cellagent import state
    from cellagent.conf import database
    store = state.get_store(database.connection_url(conf),
                            busy_timeout=conf.database.busy_timeout)
    try:
        if action == "sync":
            before = store.schema_version()
            after = store.sync_schema()
            print("schema version %s -> %s" % (before, after))
        else:
            print(store.schema_version())
    finally:
        store.close()
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
