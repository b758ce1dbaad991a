"""One helper shared by the option modules."""

from oslo_config import cfg


def register(conf, group, opts):
    """Register ``opts`` under a fresh copy of ``group`` on ``conf``.

    ``ConfigOpts.register_group`` only shallow-copies the group it is given,
    so a module-level OptGroup would share its option dict (and
    ``set_override`` values) between every ConfigOpts of the process.
    """
    conf.register_group(cfg.OptGroup(group.name, title=group.title, help=group.help))
    conf.register_opts(opts, group=group.name)
