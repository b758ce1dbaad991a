"""Random (version 4) UUIDs without a system call each.

``uuid.uuid4()`` reads 16 bytes with ``os.urandom``: one ``getrandom``
system call, during which the thread lets go of the GIL and must then wait
to take it back from whichever thread took it meanwhile. A build creates
several (its up messages' uuids and ``_unique_id``\\ s, the fake backend's
ids), most of them on the consumer's thread, where that wait held up every
message behind it: about a tenth of that thread's time in the issue 3
benchmark. Here each thread reads 4 KB of the same kernel randomness at a
time and cuts its UUIDs from it: the same values as ``uuid.uuid4()`` (the
version and variant bits set the same way), one system call per 256.

A forked child drops the buffer it inherited (``os.register_at_fork``), so
parent and child never hand out the same UUIDs.
"""

import os
import threading
import uuid

_CHUNK = 4096


class _Buffer(threading.local):
    data = b""
    pos = 0


_local = _Buffer()


def _reset():
    _local.data = b""
    _local.pos = 0


os.register_at_fork(after_in_child=_reset)


def _random16():
    local = _local
    pos = local.pos
    if pos + 16 > len(local.data):
        local.data = os.urandom(_CHUNK)
        pos = 0
    local.pos = pos + 16
    return local.data[pos:pos + 16]


def uuid4():
    """A ``uuid.UUID`` of version 4, as ``uuid.uuid4()`` returns."""
    return uuid.UUID(bytes=_random16(), version=4)


def generate_uuid(dashed=True):
    """A new random UUID as a string (``oslo_utils.uuidutils.generate_uuid``)."""
    value = uuid4()
    return str(value) if dashed else value.hex
