"""``cellagent``: the child cell agent daemon."""

import logging
import signal
import sys

from cellagent.cmd import init_threading

LOG = logging.getLogger(__name__)


def parse_config(argv, conf=None, prog="cellagent"):
    """Register every option, parse the command line and config files."""
    from oslo_config import cfg
    from oslo_log import log

    from cellagent import __version__
    from cellagent import conf as conf_mod
    conf = conf if conf is not None else cfg.ConfigOpts()
    conf_mod.register_opts(conf)
    log.register_options(conf)
    conf(argv, project="cellagent", prog=prog, version=__version__,
         default_config_files=cfg.find_config_files(project="cellagent", prog=prog))
    log.setup(conf, "cellagent")
    conf.log_opt_values(LOG, logging.DEBUG)   # secret options are masked
    return conf


def serve(factory, argv, prog):
    """Parse config, build the service with ``factory(conf)``, run it until
    SIGTERM/SIGINT, stop it. Shared by ``cellagent`` and ``cellagent-top``."""
    from cellagent import exception

    conf = parse_config(sys.argv[1:] if argv is None else argv, prog=prog)
    svc = factory(conf)
    signal.signal(signal.SIGTERM, svc.request_stop)
    signal.signal(signal.SIGINT, svc.request_stop)
    try:
        svc.start()
    except exception.CellAgentError as e:
        LOG.error("Cannot start: %s", e.message)
        return 1
    try:
        svc.wait()
    finally:
        svc.stop()
    return 0


def main(argv=None):
    init_threading()
    from cellagent import service
    return serve(service.AgentService, argv, "cellagent")


if __name__ == "__main__":
    sys.exit(main())
