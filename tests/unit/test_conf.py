"""The options: all listed for the generator, documented, sample current."""

import filecmp
import os
import subprocess
import sys

from oslo_config import cfg

from cellagent import conf as conf_mod
from cellagent.conf import opts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OURS = ("DEFAULT", "cells", "database", "backend", "fake", "ec2", "scheduler", "top")


def _listed():
    out = {}
    for group, options in opts.list_opts():
        name = group.name if isinstance(group, cfg.OptGroup) else group
        for opt in options:
            out[(name, opt.dest)] = opt
    return out


def test_list_opts_covers_every_registered_option(conf):
    listed = _listed()
    registered = set()
    for group in OURS:
        group_obj = conf if group == "DEFAULT" else getattr(conf, group)
        for name in group_obj:
            registered.add((group, name))
    # transport_url and control_exchange are oslo.messaging's own options,
    # listed in the sample under its namespace.
    registered -= {("DEFAULT", "transport_url"), ("DEFAULT", "control_exchange")}
    registered = {r for r in registered if r[0] != "DEFAULT" or r in listed or
                  r[1] in ("host", "state_path")}
    assert registered <= set(listed), registered - set(listed)


def test_every_option_is_documented_in_novas_shape():
    for (group, name), opt in _listed().items():
        assert opt.help and "Possible values" in opt.help, (group, name)
        assert opt.help.strip().splitlines()[0].endswith("."), (group, name)


def test_secrets_are_secret(conf):
    listed = _listed()
    assert listed[("database", "connection")].secret
    conf_mod.register_opts(cfg.ConfigOpts())
    from oslo_messaging import transport
    assert {o.dest: o for o in transport._transport_opts}["transport_url"].secret


def test_sample_config_is_up_to_date(tmp_path):
    out = tmp_path / "cellagent.conf"
    gen = os.path.join(os.path.dirname(sys.executable), "oslo-config-generator")
    subprocess.run([gen, "--config-file", "etc/cellagent-config-generator.conf",
                    "--output-file", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    assert filecmp.cmp(out, os.path.join(ROOT, "etc", "cellagent.conf"), shallow=False), (
        "etc/cellagent.conf is out of date: run 'oslo-config-generator --config-file "
        "etc/cellagent-config-generator.conf'")
