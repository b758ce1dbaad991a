"""A real nova-api to test the OpenStack backend against (issue 6, item 8).

``serve.py`` beside this file runs nova 34's own functional-test harness
(real API, conductor, scheduler and a fake-driver compute in one process) in
the separate virtualenv ``.venv-nova`` made by ``scripts/nova-peer-venv.sh``
from ``requirements/nova-peer.txt``. :class:`NovaPeer` starts it as a
subprocess and talks to it with the standard library only, so this module
imports from the cellagent venv without nova (nor requests) installed. Never
import ``serve.py`` itself here: importing nova.tests patches the process.

What the peer serves, and which parts are stand-ins (Keystone, Glance and
Neutron look-ups), is told in ``serve.py``'s docstring. Credentials are not
checked: any user name and password get an admin token of one project.
"""

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py")
VENV = os.environ.get("CELLAGENT_NOVA_VENV", os.path.join(ROOT, ".venv-nova"))

__all__ = ["NovaPeer", "NovaPeerError", "PROJECT_ID", "venv_python"]

#: The one project of the peer (nova's test fixtures' PROJECT_ID).
PROJECT_ID = "6f70656e737461636b20342065766572"


class NovaPeerError(Exception):
    """The peer could not be started, or stopped unexpectedly."""


def venv_python():
    """The peer venv's interpreter; NovaPeerError when the venv is missing."""
    python = os.path.join(VENV, "bin", "python")
    if not os.access(python, os.X_OK):
        raise NovaPeerError("the nova peer's virtualenv %s is missing: run "
                            "scripts/nova-peer-venv.sh (scripts/test.sh does)" % VENV)
    if not os.path.exists(os.path.join(VENV, ".nova-peer-installed")):
        raise NovaPeerError("%s is not fully installed: run scripts/nova-peer-venv.sh" % VENV)
    return python


class NovaPeer:
    """One ``serve.py`` subprocess.

    ``url`` is the compute endpoint (``.../compute/v2.1``), ``auth_url`` the
    Keystone v3 stand-in, ``auth`` the keystoneauth password options that
    work with it. ``restart()`` keeps the port, so clients keep their
    endpoint. Without ``state_dir`` the peer's state (servers, quotas used)
    does not survive it; with it, nova's databases are files of that
    directory and a restarted peer still has its servers (serve.py,
    ``--state-dir``). The peer's log (stderr) is appended to ``log_path``.
    """

    def __init__(self, log_path, port=0, quota_instances=None, quota_cores=None,
                 quota_ram=None, computes=None, debug=False, extra_args=(),
                 start_timeout=90.0, state_dir=None):
        self.log_path = str(log_path)
        self.port = port
        self.state_dir = None if state_dir is None else str(state_dir)
        self.args = []
        if self.state_dir is not None:
            self.args += ["--state-dir", self.state_dir]
        for flag, value in (("--quota-instances", quota_instances),
                            ("--quota-cores", quota_cores), ("--quota-ram", quota_ram),
                            ("--computes", computes)):
            if value is not None:
                self.args += [flag, str(value)]
        if debug:
            self.args.append("--debug")
        self.args += list(extra_args)
        self.start_timeout = start_timeout
        self.proc = None
        self.base = None
        self.start_seconds = None

    # -- endpoints ---------------------------------------------------------------

    @property
    def url(self):
        return self.base + "/compute/v2.1"

    @property
    def auth_url(self):
        return self.base + "/identity/v3"

    @property
    def auth(self):
        return {"auth_url": self.auth_url, "username": "admin", "password": "secret",
                "project_name": "admin", "user_domain_name": "Default",
                "project_domain_name": "Default"}

    # -- life cycle --------------------------------------------------------------

    def start(self):
        python = venv_python()
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [python, SERVE, "--port", str(self.port), "--watch-stdin", *self.args],
                # The peer stops when this pipe closes: when we die, too.
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.PIPE,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        ready = []
        reader = threading.Thread(target=self._read_stdout, args=(self.proc, ready),
                                  daemon=True)
        reader.start()
        deadline = started + self.start_timeout
        while not ready:
            if self.proc.poll() is not None:
                raise NovaPeerError("the nova peer exited with %s before READY; log %s:\n%s"
                                    % (self.proc.returncode, self.log_path,
                                       self.log()[-3000:]))
            if time.monotonic() > deadline:
                self.stop()
                raise NovaPeerError("the nova peer was not READY in %.0fs; log %s:\n%s"
                                    % (self.start_timeout, self.log_path, self.log()[-3000:]))
            time.sleep(0.05)
        self.base = ready[0]
        self.port = int(self.base.rsplit(":", 1)[1])
        self.start_seconds = time.monotonic() - started
        return self

    @staticmethod
    def _read_stdout(proc, ready):
        for line in iter(proc.stdout.readline, b""):
            m = re.match(rb"READY (http://\S+)", line)
            if m and not ready:
                ready.append(m.group(1).decode())
        proc.stdout.close()

    def stop(self, timeout=30.0):
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc.stdin.close()
        return self.proc.returncode

    def kill(self):
        """SIGKILL: no clean stop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            self.proc.stdin.close()

    def restart(self, kill=False):
        """Stop (SIGTERM, or SIGKILL with ``kill``) and start again on the
        same port; the state is kept only with ``state_dir``."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # -- test hooks (see serve.py) -------------------------------------------------

    def stats(self):
        """Requests the compute API served, by method and templated path."""
        return self._hook("GET", "/stats")["requests"]

    def reset_stats(self):
        self._hook("DELETE", "/stats")

    def inject_fault(self, method, path, action="drop_response", count=1, status=500):
        """Fault on the next ``count`` compute requests matching ``path`` (a regex).

        ``drop_response``: nova handles the request, the connection is then
        closed without an answer (a create whose response is lost).
        ``error``: answer ``status`` without calling nova.
        """
        return self._hook("POST", "/faults", {"method": method, "path": path,
                                              "action": action, "count": count,
                                              "status": status})

    def inject_driver_fault(self, driver_method, rollback=False, delay=0.0, count=1):
        """The fake driver's ``driver_method`` (``migrate_disk_and_power_off``
        or ``finish_migration``) fails its next ``count`` calls, after
        ``delay`` seconds. nova then puts the server in ERROR, or with
        ``rollback`` back to ACTIVE with its old flavor (a resize it gave
        up on). ``clear_faults`` removes these too."""
        return self._hook("POST", "/faults", {"action": "driver_error",
                                              "path": driver_method, "count": count,
                                              "rollback": rollback, "delay": delay})

    def clear_faults(self):
        self._hook("DELETE", "/faults")

    def _hook(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + "/_peer" + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def __repr__(self):
        return "<NovaPeer %s pid=%s>" % (self.base, self.proc.pid if self.proc else None)

