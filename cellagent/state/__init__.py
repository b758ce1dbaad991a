"""Durable state of the agent: the journal, operation claims, the instance map.

The interface is ``base.Store``; ``get_store`` picks the implementation from
the URL, so callers never import one directly.
"""

from cellagent.state.base import SCHEMA_VERSION, Store  # noqa: F401


def get_store(url, **kwargs):
    """Return a Store for ``url``.

    ``memory://`` gives a MemoryStore (nothing survives the process); any
    other URL is a SQLAlchemy URL for SqlStore, to which ``kwargs``
    (busy_timeout, pool_size, ...) are passed. The schema is not checked
    here: call ``check_schema()`` or ``sync_schema()``.
    """
    if url == "memory://":
        from cellagent.state import memory
        return memory.MemoryStore(url, **kwargs)
    from cellagent.state import sql
    return sql.SqlStore(url, **kwargs)
