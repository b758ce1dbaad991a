"""Durable state: the child agent's store and the top cell's store.

The child's interface is ``base.Store``; ``get_store`` picks the
implementation from the URL, so callers never import one directly. The top
cell's store is ``top.TopStore``, from ``get_top_store``.
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


def get_top_store(url, **kwargs):
    """Return the top cell's TopStore for ``url`` (SQLite or PostgreSQL).

    ``kwargs`` (busy_timeout, pool_size, ...) go to ``TopStore``. The
    schema is not checked here: call ``check_schema()`` or ``sync_schema()``.

    :raises ConfigurationError: for ``memory://`` (the top keeps its state
        in a database) or a URL SQLAlchemy cannot use.
    """
    if url == "memory://":
        from cellagent import exception
        raise exception.ConfigurationError(
            reason="the top cell needs a database (sqlite:///path or postgresql://...), "
                   "not memory://")
    from cellagent.state import top
    return top.TopStore(url, **kwargs)
