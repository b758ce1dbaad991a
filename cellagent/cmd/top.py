"""``cellagent-top``: the top (parent) cell daemon."""

import logging
import signal
import sys

from cellagent.cmd import init_threading

LOG = logging.getLogger(__name__)


def main(argv=None):
    init_threading()
    from cellagent import exception
    from cellagent import service
    from cellagent.cmd import agent

    conf = agent.parse_config(sys.argv[1:] if argv is None else argv, prog="cellagent-top")
    top = service.TopService(conf)
    signal.signal(signal.SIGTERM, top.request_stop)
    signal.signal(signal.SIGINT, top.request_stop)
    try:
        top.start()
    except exception.CellAgentError as e:
        LOG.error("Cannot start: %s", e.message)
        return 1
    try:
        top.wait()
    finally:
        top.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
