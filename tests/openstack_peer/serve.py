"""Serve a real nova-api, with conductor, scheduler and compute, on 127.0.0.1.

This is the OpenStack peer of the functional tests (issue 6, item 8). It is
run by ``.venv-nova/bin/python`` (scripts/nova-peer-venv.sh), never imported
from the cellagent venv: importing ``nova.tests`` monkey-patches the process
(logging, warnings, RPC, the database layer).

It subclasses nova 34's own functional-test harness,
``nova.tests.functional.integrated_helpers._IntegratedTestBase``, and keeps
its real services: the API (the paste pipeline of the installed
``etc/nova/api-paste.ini``), conductor, scheduler and a ``fake.SmallFakeDriver``
compute, all in this one process on native threads
(``OS_NOVA_DISABLE_EVENTLET_PATCHING=1``), talking over oslo.messaging's fake
in-memory transport. Placement, Glance, Neutron and Cinder are nova's
in-process fixtures.

Databases: under native threads nova's harness keeps the API, cell0, cell1
and placement databases in SQLite files (WAL) of a temporary directory
removed at exit, so a restarted peer starts empty. With ``--state-dir`` they
are files of that directory instead, kept across restarts: a restarted peer
still has its servers, flavors, quotas used and placement allocations (see
PeerState for what else is kept and what is not).

What a client sees on ``http://127.0.0.1:PORT``:

``/compute/v2.1``
    the real nova API. nova 34 has no ``noauth2``: the harness stubs out
    keystonemiddleware and builds the request context from ``X-Auth-User``,
    ``X-Auth-Project-Id`` and ``X-Roles``, which this front fills (an admin
    of one project) unless the client set them. Tokens are not checked.
``/identity/v3``
    just enough Keystone for keystoneauth password (or token) auth:
    ``POST /v3/auth/tokens`` returns a token and a catalog (compute, image,
    network, identity) pointing at this server.
``/image/v2/images[?name=]``, ``/image/v2/images/{id}``
    Glance v2 look-ups over the images of nova's Glance fixture (plus one
    ``cirros`` image with a stable id), so images can be found by name.
``/network/v2.0/networks[?name=]``
    the networks of nova's Neutron fixture, read-only.
``/_peer/stats`` and ``/_peer/faults``
    test hooks: request counts per method and path, and faults to inject
    (drop the response of the next matching request after nova handled it:
    the "lost create response" case; answer an error instead of calling
    nova; make a fake driver method fail, see DriverFaults).

Two parts of the harness are replaced, both invisible through the API: its
CellDatabases fixture's global cell switch (it deadlocks under concurrent
requests, see PeerCellDatabases) and, unless --full-claims, the compute's
read-back of every allocation on its node at each claim (only used to
reshape, which the fake driver never does; it made 100 builds take minutes).
Logging goes to stderr instead of memory, and warnings are not errors.

When ready it prints one line, ``READY http://127.0.0.1:PORT``, on stdout.
SIGTERM or SIGINT stops it cleanly.
"""

import argparse
import collections
import datetime
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import socketserver
import sys
import threading
import time
import urllib.parse
import uuid
import wsgiref.simple_server

# Must be set before the first nova import: nova.tests.functional calls
# nova.monkey_patch.patch() on import, which otherwise patches with eventlet.
os.environ["OS_NOVA_DISABLE_EVENTLET_PATCHING"] = "1"

import nova.tests.functional  # noqa: E402,F401 - first: it calls monkey_patch.patch()
import nova.tests.functional.fixtures  # noqa: E402,F401 - patched by module object
import fixtures  # noqa: E402
from nova import context as nova_context  # noqa: E402
from nova import objects  # noqa: E402
from nova.tests import fixtures as nova_fixtures  # noqa: E402
from nova.tests.functional import integrated_helpers  # noqa: E402
from nova.virt import fake as fake_virt  # noqa: E402
from oslo_utils.fixture import uuidsentinel  # noqa: E402

LOG = logging.getLogger("nova_peer")

PROJECT_ID = nova_fixtures.PROJECT_ID
USER_ID = "admin"   # the harness's context stub makes user "admin" an admin
ROLES = "reader,member,admin"
REGION = "RegionOne"

# One image with a unique, well-known name; the fixture's own names repeat.
CIRROS = {
    "id": "a2fe5b4c-7bd8-4a5e-9f2e-6c2b1f0d6a01",
    "name": "cirros",
    "status": "active",
    "visibility": "public",
    "container_format": "bare",
    "disk_format": "qcow2",
    "size": 21430272,
    "min_ram": 0,
    "min_disk": 0,
    "protected": False,
    "tags": [],
    "properties": {"architecture": "x86_64", "os_distro": "cirros"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--quota-instances", type=int, default=1000)
    p.add_argument("--quota-cores", type=int, default=4000)
    p.add_argument("--quota-ram", type=int, default=4096000, help="MiB")
    p.add_argument("--computes", type=int, default=1, help="compute services")
    # SmallFakeDriver reports 2 vCPUs and 8 GiB per compute: too few for a
    # benchmark of 100 builds, so the sizes are options.
    p.add_argument("--vcpus", type=int, default=256, help="per compute")
    p.add_argument("--memory-mb", type=int, default=524288, help="per compute")
    p.add_argument("--disk-gb", type=int, default=100000, help="per compute")
    p.add_argument("--full-claims", action="store_true",
                   help="keep the compute's per-claim allocation read-back (slow)")
    p.add_argument("--state-dir", default=None,
                   help="keep the databases (and the stand-ins' ports) in this "
                   "directory across restarts; default: a temporary one")
    p.add_argument("--debug", action="store_true", help="log at DEBUG")
    p.add_argument("--watch-stdin", action="store_true",
                   help="stop when stdin closes (the parent that started us died)")
    return p.parse_args(argv)


# -- fixtures replacing three of the harness's ------------------------------

class PeerLogging(fixtures.Fixture):
    """StandardLogging kept every line in memory; a server logs to stderr."""

    level = logging.INFO

    def setUp(self):
        super().setUp()
        root = logging.getLogger()
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s [%(name)s] %(message)s"))
        self.useFixture(fixtures.LogHandler(handler, level=self.level, nuke_handlers=True))
        root.setLevel(self.level)
        for noisy in ("migrate.versioning.api", "alembic", "oslo_db.sqlalchemy",
                      "stevedore", "oslo_policy"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # As StandardLogging does: nothing may reconfigure logging later.
        self.useFixture(fixtures.MonkeyPatch("oslo_log.log.setup", lambda *a, **k: None))
        self.logger = self  # harness code reads stdlog.logger.output

    output = ""

    def delete_stored_logs(self):
        pass


class PeerWarnings(fixtures.Fixture):
    """WarningsFixture turns some warnings into errors, i.e. HTTP 500s.

    Right for nova's own CI, wrong for a peer other code talks to; the lock
    file also pins SQLAlchemy below 2.1 (whose deprecations were the 500s).
    """

    def setUp(self):
        super().setUp()
        import warnings
        saved = warnings.filters[:]
        warnings.simplefilter("ignore", DeprecationWarning)
        self.addCleanup(setattr, warnings, "filters", saved)


class PeerCellDatabases(nova_fixtures.CellDatabases):
    """CellDatabases without its global "current cell" switch.

    The harness fakes per-cell database connections by pointing one global
    at the cell last targeted, under a writer-preferring ReaderWriterLock.
    With a few concurrent API requests that deadlocks: a thread holding the
    read lock waits for a scatter-gather worker that needs a read lock,
    while a writer queued between them blocks it (seen here with 8
    concurrent creates). Here targeting works as in a real deployment:
    ``target_cell`` gives the context its cell's connection, and untargeted
    code (the compute service) uses the default cell, cell1.
    """

    def _wrap_target_cell(self, context, cell_mapping):
        return self._real_target_cell(context, cell_mapping)

    def _wrap_get_context_manager(self, context):
        db_connection = getattr(context, "db_connection", None)
        return db_connection or self._default_ctxt_mgr

    def _cache_schema(self, connection_str):
        # The harness migrates the first cell database and replays a dump of
        # it (schema and rows) into the next ones: on a kept database that
        # would fail on the existing tables, or copy cell0's rows. A
        # database that has its schema already is left as it is.
        engine = self._ctxt_mgrs[connection_str].writer.get_engine()
        with engine.connect() as conn:
            tables = conn.exec_driver_sql(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'").scalar()
        if tables:
            LOG.info("cell database %s kept from the last run (%d tables)",
                     connection_str, tables)
            return
        super()._cache_schema(connection_str)


class PeerDefaultFlavors(nova_fixtures.DefaultFlavorsFixture):
    """The harness's m1.* flavors, unless a kept API database has them."""

    def setUp(self):
        ctxt = nova_context.get_admin_context()
        if objects.FlavorList.get_all(ctxt):
            fixtures.Fixture.setUp(self)
            return
        super().setUp()


class PeerState:
    """What ``--state-dir`` keeps across restarts, besides the databases.

    * nova's harness names things with ``oslo_utils.fixture.uuidsentinel``,
      random per process: cell1's uuid (which is also its database's
      "connection") and every compute node's uuid (by which the resource
      tracker finds its ComputeNode and placement provider). They are
      saved in ``uuidsentinels.json`` and loaded before anything is named.
    * the Neutron fixture's ports and bindings (``neutron.json``, written
      at a clean stop; after a SIGKILL the ports are rebuilt from the cell
      database's VIFs), so a server's ports are still there for a reboot or
      a delete, and a new port does not reuse an old one's id or MAC.
    * the fake driver's guests are rebuilt from the cell database (the
      driver keeps them in memory only).

    Not kept: Glance fixture images other than ``cirros`` (snapshots), the
    request counters and injected faults of the front.
    """

    def __init__(self, path):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)

    def file(self, name):
        return os.path.join(self.path, name)

    def sqlite_url(self, name):
        """Replaces nova's _use_file_backed_sqlite_with_wal: same WAL file
        set-up, but a stable name here instead of mkstemp in a temp dir."""
        name = name.replace("/", "_").replace(":", "_")
        path = self.file("%s.sqlite" % name)
        if not os.path.exists(path):
            with sqlite3.connect(path) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
        return "sqlite:///%s" % path, path

    def load_sentinels(self):
        try:
            with open(self.file("uuidsentinels.json")) as f:
                saved = json.load(f)
        except FileNotFoundError:
            return False
        with uuidsentinel._lock:
            uuidsentinel._sentinels.update(saved)
        return True

    def save_sentinels(self):
        with uuidsentinel._lock:
            saved = dict(uuidsentinel._sentinels)
        self._write("uuidsentinels.json", saved)

    def load_neutron(self, neutron):
        try:
            with open(self.file("neutron.json")) as f:
                saved = json.load(f)
        except FileNotFoundError:
            return
        neutron._ports.update(saved["ports"])
        for port_id, bindings in saved["bindings"].items():
            neutron._port_bindings[port_id].update(bindings)

    def save_neutron(self, neutron):
        self._write("neutron.json", {
            "ports": neutron._ports,
            "bindings": {k: v for k, v in neutron._port_bindings.items() if v}})

    def _write(self, name, data):
        tmp = self.file(name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, default=str)
        os.replace(tmp, self.file(name))


class DriverFaults:
    """Failures of the fake driver on demand (``/_peer/faults``, action
    ``driver_error``): the next ``count`` calls of a driver method raise,
    after ``delay`` seconds, either plainly (nova puts the server in ERROR)
    or, with ``rollback``, as InstanceFaultRollback (nova puts it back to
    ACTIVE with its old flavor: a resize it gave up on)."""

    METHODS = ("migrate_disk_and_power_off", "finish_migration")
    lock = threading.Lock()
    rules = []

    @classmethod
    def wrap(cls, method, real):
        def call(driver, *args, **kwargs):
            rule = cls.take(method)
            if rule is None:
                return real(driver, *args, **kwargs)
            time.sleep(float(rule.get("delay") or 0))
            LOG.warning("fault: fake driver %s fails (rollback=%s)", method,
                        bool(rule.get("rollback")))
            from nova import exception as nova_exception
            error = nova_exception.NovaException(
                "injected by the peer: %s failed" % method)
            if rule.get("rollback"):
                raise nova_exception.InstanceFaultRollback(inner_exception=error)
            raise error
        return call

    @classmethod
    def take(cls, method):
        with cls.lock:
            for rule in cls.rules:
                if rule["path"] == method:
                    rule["count"] -= 1
                    if rule["count"] <= 0:
                        cls.rules.remove(rule)
                    return rule
        return None


# -- the harness --------------------------------------------------------------

class NovaPeerCase(integrated_helpers._IntegratedTestBase):
    """nova's integrated test base, kept running instead of testing."""

    ADMIN_API = True
    CAST_AS_CALL = False   # builds go through the fake RPC asynchronously
    options = None         # argparse namespace, set before instantiation

    def setUp(self):
        self.useFixture(fixtures.MonkeyPatch(
            "nova.tests.fixtures.StandardLogging", PeerLogging))
        self.useFixture(fixtures.MonkeyPatch(
            "nova.tests.fixtures.WarningsFixture", PeerWarnings))
        self.useFixture(fixtures.MonkeyPatch(
            "nova.tests.fixtures.CellDatabases", PeerCellDatabases))
        PeerLogging.level = logging.DEBUG if self.options.debug else logging.INFO
        self.state = PeerState(self.options.state_dir) if self.options.state_dir else None
        if self.state is not None:
            self._keep_state()
        super().setUp()
        self.glance.create(None, dict(CIRROS, created_at=self.glance.timestamp,
                                      updated_at=self.glance.timestamp))
        if self.state is not None:
            self.state.load_neutron(self.neutron)
            self._restore_ports()
            self._restore_guests()
            self.state.save_sentinels()
            self.addCleanup(self.state.save_neutron, self.neutron)

    def _keep_state(self):
        """--state-dir: the harness's databases in it, and not wiped at exit."""
        if self.state.load_sentinels():
            LOG.info("kept state: restarting from %s", self.state.path)
        # By module object: as a dotted path, "nova.tests.fixtures.nova"
        # resolves to the top nova package (the fixtures package's
        # __init__ has a name "nova" of its own) and the patch would miss.
        for where in ("nova.tests.fixtures.nova", "nova.tests.functional.fixtures"):
            self.useFixture(fixtures.MockPatchObject(
                sys.modules[where], "_use_file_backed_sqlite_with_wal",
                self.state.sqlite_url))
        self.useFixture(fixtures.MonkeyPatch(
            "nova.tests.fixtures.DefaultFlavorsFixture", PeerDefaultFlavors))
        # oslo.db's fixture, when the harness is cleaned up (at our exit),
        # drops every table of the placement database and then removes
        # its SQLite file: not those of a kept one.
        from oslo_db.sqlalchemy import provision
        sqlite_impl = type(provision.BackendImpl.impl("sqlite"))
        drop_file = sqlite_impl._drop_url_file
        kept = self.state.path + os.sep

        def drop_unless_kept(impl, url, conditional):
            if not str(url.database or "").startswith(kept):
                drop_file(impl, url, conditional)
        self.useFixture(fixtures.MonkeyPatch(
            "oslo_db.sqlalchemy.provision.SchemaResource.clean",
            lambda self, resource: None))
        self.useFixture(fixtures.MockPatchObject(
            sqlite_impl, "_drop_url_file", drop_unless_kept))

    def _setup_cells(self):
        """The harness's cell0 and cell1, or the ones a kept database has."""
        if self.state is None:
            return super()._setup_cells()
        ctxt = nova_context.get_context()
        cells = objects.CellMappingList.get_all(ctxt)
        if not cells:
            return super()._setup_cells()
        celldbs = nova_fixtures.CellDatabases()
        for cell in sorted(cells, key=lambda c: c.name):    # cell0 first, as the harness
            self.cell_mappings[cell.name] = cell
            celldbs.add_cell_database(cell.database_connection,
                                      default=(cell.name == "cell1"))
        self.useFixture(celldbs)
        # start_service creates a compute's HostMapping unless it knows it.
        for mapping in objects.HostMappingList.get_all(ctxt):
            self.host_mappings[mapping.host] = mapping
        LOG.info("kept state: cells %s, hosts %s", sorted(self.cell_mappings),
                 sorted(self.host_mappings))
        return None

    def _restore_ports(self):
        """Ports the cell database knows and the Neutron fixture does not.

        ``neutron.json`` is written at a clean stop only; after a SIGKILL
        the fixture would hand out its fixed first port (id and MAC) again,
        which nova refuses as a duplicate VIF. Each VIF of the cell database
        becomes a port again, bound to its instance.
        """
        import copy
        ctxt = nova_context.get_admin_context()
        restored = 0
        with nova_context.target_cell(ctxt, self.cell_mappings["cell1"]) as cctxt:
            for vif in objects.VirtualInterfaceList.get_all(cctxt):
                if vif.uuid in self.neutron._ports:
                    continue
                port = copy.deepcopy(self.neutron.default_port)
                port.update(id=vif.uuid, mac_address=vif.address.split("/")[0],
                            device_id=vif.instance_uuid, device_owner="compute:nova")
                self.neutron._ports[vif.uuid] = port
                restored += 1
        if restored:
            LOG.info("kept state: %d ports rebuilt from the cell database", restored)

    def _restore_guests(self):
        """The fake driver's guests, from the cell database (restart only)."""
        from nova.virt import fake
        ctxt = nova_context.get_admin_context()
        restored = 0
        with nova_context.target_cell(ctxt, self.cell_mappings["cell1"]) as cctxt:
            for compute in self.computes.values():
                driver = compute.manager.driver
                for inst in objects.InstanceList.get_by_host(cctxt, compute.host):
                    if inst.uuid not in driver.instances:
                        driver.instances[inst.uuid] = fake.FakeInstance(
                            inst.name, inst.power_state, inst.uuid)
                        restored += 1
        if restored:
            LOG.info("kept state: %d guests back in the fake driver", restored)

    def _setup_services(self):
        opts = self.options
        paste = os.path.join(sys.prefix, "etc", "nova", "api-paste.ini")
        if not os.path.exists(paste):
            raise RuntimeError("%s is missing: nova is not installed in this venv" % paste)
        self.flags(api_paste_config=paste, group="wsgi")
        self.flags(instances=opts.quota_instances, cores=opts.quota_cores,
                   ram=opts.quota_ram, group="quota")
        # A test peer: class attributes, read by the driver's resource report.
        for attr, value in (("vcpus", opts.vcpus), ("memory_mb", opts.memory_mb),
                            ("local_gb", opts.disk_gb)):
            self.useFixture(fixtures.MonkeyPatch(
                "nova.virt.fake.SmallFakeDriver.%s" % attr, value))
        self.flags(compute_driver="fake.SmallFakeDriver")
        for method in DriverFaults.METHODS:
            self.useFixture(fixtures.MonkeyPatch(
                "nova.virt.fake.SmallFakeDriver.%s" % method,
                DriverFaults.wrap(method, getattr(fake_virt.SmallFakeDriver, method))))
        if not opts.full_claims:
            # Every claim reads back the allocations of every instance on the
            # node (one placement GET each), only for a reshape that the fake
            # driver never asks for; under the compute's global claim lock that
            # made 100 builds take minutes. Skipping it changes nothing the
            # API shows.
            self.useFixture(fixtures.MonkeyPatch(
                "nova.scheduler.client.report.SchedulerReportClient."
                "get_allocations_for_provider_tree", lambda self, context, nodename: {}))
        super()._setup_services()
        for n in range(2, opts.computes + 1):
            self._start_compute("compute%d" % n)

    def wsgi_app(self):
        return self.api_fixture.app()

    def test_serve(self):
        """Only here so that the TestCase can be instantiated."""


# -- the HTTP front -----------------------------------------------------------

def _iso(value):
    if isinstance(value, datetime.datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return value


def _glance_v2(image):
    """nova's Glance fixture image (v1-ish dict) -> a Glance v2 image."""
    out = {k: _iso(image.get(k)) for k in (
        "id", "name", "status", "container_format", "disk_format", "size", "min_ram",
        "min_disk", "protected", "created_at", "updated_at")}
    out.update(visibility=image.get("visibility", "public"), tags=image.get("tags", []),
               owner=image.get("owner"), checksum=None, os_hidden=False,
               virtual_size=None, schema="/v2/schemas/image",
               self="/v2/images/%s" % image["id"], file="/v2/images/%s/file" % image["id"])
    out.update(image.get("properties") or {})
    return out


class Front:
    """Routes a request to nova or to one of the small stand-ins."""

    def __init__(self, case, nova_app):
        self.case = case
        self.nova = nova_app
        self.base = None            # set once the port is known
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.faults = []            # [{"method", "path" (regex), "action", "count"}]

    # Fault rules are matched against "METHOD /path" of the compute API path.
    def _take_fault(self, method, path):
        with self.lock:
            for rule in self.faults:
                if rule["method"] in (method, "*") and re.search(rule["path"], path):
                    rule["count"] -= 1
                    if rule["count"] <= 0:
                        self.faults.remove(rule)
                    return rule
        return None

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        method = environ["REQUEST_METHOD"]
        prefix, _, rest = path.lstrip("/").partition("/")
        try:
            if prefix == "compute":
                return self._compute(environ, start_response, "/" + rest)
            if prefix == "identity":
                return self._identity(environ, start_response, method, "/" + rest)
            if prefix == "image":
                return self._image(environ, start_response, method, "/" + rest)
            if prefix == "network":
                return self._network(environ, start_response, method, "/" + rest)
            if prefix == "_peer":
                return self._peer(environ, start_response, method, "/" + rest)
            if path == "/":
                return self._json(start_response, 200, {
                    "compute": self.base + "/compute/v2.1",
                    "identity": self.base + "/identity/v3",
                    "image": self.base + "/image", "network": self.base + "/network"})
            return self._json(start_response, 404, {"error": "no such path %s" % path})
        except Exception:  # noqa: B902 - a stand-in's bug must not kill the server
            LOG.exception("front failed on %s %s", method, path)
            return self._json(start_response, 500, {"error": "peer front failed"})

    # compute: the real nova-api ----------------------------------------------

    def _compute(self, environ, start_response, rest):
        method = environ["REQUEST_METHOD"]
        environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + "/compute"
        environ["PATH_INFO"] = rest
        environ.setdefault("HTTP_X_AUTH_USER", USER_ID)
        environ.setdefault("HTTP_X_AUTH_PROJECT_ID", PROJECT_ID)
        environ.setdefault("HTTP_X_ROLES", ROLES)
        with self.lock:
            self.counts["%s %s" % (method, re.sub(r"[0-9a-f-]{32,36}", "{id}", rest))] += 1
        rule = self._take_fault(method, rest)
        if rule and rule["action"] == "error":
            return self._json(start_response, int(rule.get("status", 500)),
                              {"error": "injected by the peer"})
        if rule and rule["action"] == "drop_response":
            # nova does the work; the client never hears about it.
            captured = []
            body = b"".join(self.nova(environ, lambda s, h, e=None: captured.append(s)))
            LOG.warning("fault: dropped the response %s to %s %s (%d bytes)",
                        captured[:1], method, rest, len(body))
            sock = environ.get("nova_peer.socket")
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            environ["nova_peer.dropped"] = True
            start_response("500 Dropped", [("Content-Length", "0")])
            return []
        return self.nova(environ, start_response)

    # identity: a token and a catalog -----------------------------------------

    def _identity(self, environ, start_response, method, rest):
        rest = rest.rstrip("/")
        version = {"id": "v3.14", "status": "stable", "updated": "2020-04-07T00:00:00Z",
                   "links": [{"rel": "self", "href": self.base + "/identity/v3/"}],
                   "media-types": [{"base": "application/json",
                                    "type": "application/vnd.openstack.identity-v3+json"}]}
        if rest == "" and method == "GET":
            return self._json(start_response, 300, {"versions": {"values": [version]}})
        if rest == "/v3" and method == "GET":
            return self._json(start_response, 200, {"version": version})
        if rest == "/v3/auth/tokens" and method in ("POST", "GET", "HEAD"):
            token = uuid.uuid4().hex if method == "POST" else environ.get(
                "HTTP_X_SUBJECT_TOKEN", "")
            now = datetime.datetime.now(datetime.timezone.utc)
            body = {"token": {
                "methods": ["password"], "audit_ids": [uuid.uuid4().hex[:22]],
                "issued_at": now.strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
                "expires_at": (now + datetime.timedelta(hours=12)).strftime(
                    "%Y-%m-%dT%H:%M:%S.000000Z"),
                "user": {"id": USER_ID, "name": "admin", "password_expires_at": None,
                         "domain": {"id": "default", "name": "Default"}},
                "project": {"id": PROJECT_ID, "name": "admin",
                            "domain": {"id": "default", "name": "Default"}},
                "roles": [{"id": r, "name": r} for r in ROLES.split(",")],
                "is_domain": False,
                "catalog": self._catalog()}}
            return self._json(start_response, 201 if method == "POST" else 200, body,
                              [("X-Subject-Token", token)])
        return self._json(start_response, 404, {"error": {
            "code": 404, "title": "Not Found", "message": "not in this stand-in"}})

    def _catalog(self):
        def service(stype, name, url):
            return {"type": stype, "name": name, "id": uuid.uuid5(uuid.NAMESPACE_URL, url).hex,
                    "endpoints": [{"id": "%s-%s" % (stype, i), "interface": i, "region": REGION,
                                   "region_id": REGION, "url": url}
                                  for i in ("public", "internal", "admin")]}
        return [service("compute", "nova", self.base + "/compute/v2.1"),
                service("image", "glance", self.base + "/image"),
                service("network", "neutron", self.base + "/network"),
                service("identity", "keystone", self.base + "/identity")]

    # image: Glance v2 look-ups -----------------------------------------------

    def _image(self, environ, start_response, method, rest):
        rest = rest.rstrip("/")
        if method != "GET":
            return self._json(start_response, 405, {"error": "read-only stand-in"})
        if rest == "":
            return self._json(start_response, 300, {"versions": [{
                "id": "v2.16", "status": "CURRENT",
                "links": [{"rel": "self", "href": self.base + "/image/v2/"}]}]})
        images = {i["id"]: i for i in self.case.glance.detail(None)}
        if rest == "/v2/images":
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            found = [_glance_v2(i) for i in images.values()]
            for key in ("name", "id", "status", "visibility"):
                if key in query:
                    found = [i for i in found if i.get(key) == query[key][0]]
            found.sort(key=lambda i: (i["created_at"] or "", i["id"]))
            if "marker" in query:
                ids = [i["id"] for i in found]
                marker = query["marker"][0]
                found = found[ids.index(marker) + 1:] if marker in ids else []
            limit = int(query.get("limit", ["1000"])[0])
            page = found[:limit]
            body = {"images": page, "schema": "/v2/schemas/images", "first": "/v2/images"}
            if len(found) > limit:
                body["next"] = "/v2/images?%s" % urllib.parse.urlencode(
                    {"limit": limit, "marker": page[-1]["id"]})
            return self._json(start_response, 200, body)
        m = re.fullmatch(r"/v2/images/([^/]+)", rest)
        if m and m.group(1) in images:
            return self._json(start_response, 200, _glance_v2(images[m.group(1)]))
        return self._json(start_response, 404, {"message": "No image found"})

    # network: the Neutron fixture's networks --------------------------------

    def _network(self, environ, start_response, method, rest):
        rest = rest.rstrip("/")
        if method != "GET":
            return self._json(start_response, 405, {"error": "read-only stand-in"})
        if rest == "":
            return self._json(start_response, 200, {"versions": [{
                "id": "v2.0", "status": "CURRENT",
                "links": [{"rel": "self", "href": self.base + "/network/v2.0/"}]}]})
        nets = list(self.case.neutron._networks.values())
        if rest == "/v2.0/networks":
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            for key in ("name", "id"):
                if key in query:
                    nets = [n for n in nets if n.get(key) in query[key]]
            return self._json(start_response, 200, {"networks": nets})
        m = re.fullmatch(r"/v2.0/networks/([^/]+)", rest)
        found = [n for n in nets if m and n["id"] == m.group(1)]
        if found:
            return self._json(start_response, 200, {"network": found[0]})
        return self._json(start_response, 404, {"NeutronError": {"type": "NetworkNotFound"}})

    # test hooks ----------------------------------------------------------------

    def _peer(self, environ, start_response, method, rest):
        if rest == "/stats" and method == "GET":
            with self.lock:
                return self._json(start_response, 200, {"requests": dict(self.counts)})
        if rest == "/stats" and method == "DELETE":
            with self.lock:
                self.counts.clear()
            return self._json(start_response, 204, None)
        if rest == "/faults" and method == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            rule = json.loads(environ["wsgi.input"].read(size) or b"{}")
            rule = {"method": rule.get("method", "*"), "path": rule.get("path", ""),
                    "action": rule.get("action", "drop_response"),
                    "count": int(rule.get("count", 1)), "status": rule.get("status", 500),
                    "delay": float(rule.get("delay") or 0),
                    "rollback": bool(rule.get("rollback"))}
            if rule["action"] == "driver_error":
                if rule["path"] not in DriverFaults.METHODS:
                    return self._json(start_response, 400, {
                        "error": "driver_error: path is one of %s" % (DriverFaults.METHODS,)})
                with DriverFaults.lock:
                    DriverFaults.rules.append(rule)
                return self._json(start_response, 201, rule)
            if rule["action"] not in ("drop_response", "error"):
                return self._json(start_response, 400, {"error": "unknown action"})
            with self.lock:
                self.faults.append(rule)
            return self._json(start_response, 201, rule)
        if rest == "/faults" and method == "GET":
            with self.lock, DriverFaults.lock:
                return self._json(start_response, 200, {
                    "faults": list(self.faults) + list(DriverFaults.rules)})
        if rest == "/faults" and method == "DELETE":
            with self.lock, DriverFaults.lock:
                self.faults.clear()
                DriverFaults.rules.clear()
            return self._json(start_response, 204, None)
        return self._json(start_response, 404, {"error": "no such hook"})

    @staticmethod
    def _json(start_response, status, body, headers=()):
        data = b"" if body is None else json.dumps(body).encode()
        reason = {200: "OK", 201: "Created", 204: "No Content", 300: "Multiple Choices",
                  400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        start_response("%d %s" % (status, reason.get(status, "Error")),
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(data))), *headers])
        return [data]


class Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class Handler(wsgiref.simple_server.WSGIRequestHandler):
    def get_environ(self):
        env = super().get_environ()
        env["nova_peer.socket"] = self.connection
        return env

    def log_message(self, fmt, *args):
        LOG.debug("%s %s", self.address_string(), fmt % args)


def main(argv=None):
    opts = parse_args(argv)
    started = time.monotonic()
    NovaPeerCase.options = opts
    case = NovaPeerCase("test_serve")
    case.setUp()
    front = Front(case, case.wsgi_app())
    httpd = wsgiref.simple_server.make_server(opts.host, opts.port, front,
                                              server_class=Server, handler_class=Handler)
    front.base = "http://%s:%d" % (opts.host, httpd.server_port)

    stopping = threading.Event()

    def stop(signum, frame):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if opts.watch_stdin:
        def watch():
            while sys.stdin.buffer.read(4096):
                pass
            LOG.warning("stdin closed: the parent is gone, stopping")
            stop(None, None)
        threading.Thread(target=watch, daemon=True).start()
    LOG.info("nova peer ready at %s in %.1fs", front.base, time.monotonic() - started)
    print("READY %s" % front.base, flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
        # The harness's cleanups stop nova's services; never hang on them.
        watchdog = threading.Timer(20, os._exit, (0,))
        watchdog.daemon = True
        watchdog.start()
        try:
            case.doCleanups()
        except Exception:  # noqa: B902 - exiting anyway
            LOG.exception("harness cleanup failed")
    # The cleanups removed the log handler: write straight to stderr.
    print("nova peer stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
