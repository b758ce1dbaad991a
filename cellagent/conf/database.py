"""[database] options: where the journal and the instance map live."""

from oslo_config import cfg

from cellagent.conf import group

database_group = cfg.OptGroup("database", title="Database options", help="""
The durable state of the agent: the journal of received work and the
instance map. SQLite (WAL) by default; PostgreSQL lets several agent
processes of one cell share state.
""")

database_opts = [
    cfg.StrOpt(
        "connection",
        secret=True,
        sample_default="sqlite:///$state_path/cellagent.sqlite",
        help="""
SQLAlchemy URL of the state database.

Same option name as oslo.db. When unset, a SQLite file
``cellagent.sqlite`` under ``[DEFAULT] state_path`` is used.

Possible values:

* ``sqlite:////var/lib/cellagent/cellagent.sqlite``
* ``postgresql+psycopg://user:password@host/cellagent``
* ``memory://`` (nothing kept across restarts; tests only)

Related options:

* ``[DEFAULT] state_path``
"""),
    cfg.IntOpt(
        "busy_timeout",
        default=10000,
        min=0,
        help="""
Milliseconds SQLite waits for a lock held by another process.

Possible values:

* 0 or more milliseconds. Ignored for PostgreSQL.
"""),
    cfg.IntOpt(
        "max_pool_size",
        default=10,
        min=1,
        help="""
Largest number of pooled database connections per agent process.

Possible values:

* A positive integer. Ignored for SQLite.
"""),
]


def register_opts(conf):
    group.register(conf, database_group, database_opts)


def list_opts():
    return [(database_group, database_opts)]


def connection_url(conf):
    """The configured URL, or the SQLite default under state_path."""
    import os
    if conf.database.connection:
        return conf.database.connection
    return "sqlite:///" + os.path.join(conf.state_path, "cellagent.sqlite")
