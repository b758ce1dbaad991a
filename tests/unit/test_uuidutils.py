"""cellagent.uuidutils: version 4 UUIDs cut from buffered kernel randomness."""

import os
import threading
import uuid

from cellagent import uuidutils


def test_version_4_in_both_spellings():
    for dashed in (True, False):
        text = uuidutils.generate_uuid(dashed=dashed)
        value = uuid.UUID(text)
        assert value.version == 4
        assert value.variant == uuid.RFC_4122
        assert (str(value) if dashed else value.hex) == text


def test_unique_across_buffer_refills_and_threads():
    seen = []

    def many():
        seen.extend(uuidutils.generate_uuid() for _ in range(2000))

    threads = [threading.Thread(target=many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == len(set(seen)) == 8000


def test_forked_child_does_not_repeat_the_parents_uuids():
    uuidutils.generate_uuid()             # the buffer is filled
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, uuidutils.generate_uuid().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child != uuidutils.generate_uuid()
