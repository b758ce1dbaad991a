"""``cellagent-top``: the top (parent) cell daemon."""

import sys

from cellagent.cmd import init_threading


def main(argv=None):
    init_threading()
    from cellagent import service
    from cellagent.cmd import agent
    return agent.serve(service.TopService, argv, "cellagent-top")


if __name__ == "__main__":
    sys.exit(main())
