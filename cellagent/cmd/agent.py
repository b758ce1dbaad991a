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


def main(argv=None):
    init_threading()
    from cellagent import exception
    from cellagent import service

    conf = parse_config(sys.argv[1:] if argv is None else argv)
    agent = service.AgentService(conf)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    try:
        agent.start()
    except exception.CellAgentError as e:
        LOG.error("Cannot start: %s", e.message)
        return 1
    try:
        agent.wait()
    finally:
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
