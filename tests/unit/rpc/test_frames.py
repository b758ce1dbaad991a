"""The publisher's AMQP frames are the bytes py-amqp's basic_publish writes."""

import amqp
import pytest
from amqp import method_framing
from amqp import spec

from cellagent.rpc import transport


class _Capture:
    def __init__(self, frame_max):
        self.frame_max = frame_max
        self.written = []
        self.bytes_sent = 0

    def write(self, data):
        self.written.append(bytes(data))


def _py_amqp_bytes(frame_max, channel_id, exchange, routing_key, body):
    """What amqp.Channel.basic_publish writes for kombu's prepared message."""
    conn = _Capture(frame_max)
    write_frame = method_framing.frame_writer(conn, conn)
    msg = amqp.Message(body, priority=0, content_type="application/json",
                       content_encoding="utf-8", application_headers={}, delivery_mode=2)
    args = amqp.serialization.dumps("Bssbb", (0, exchange, routing_key, False, False))
    write_frame(1, channel_id, spec.Basic.Publish, args, msg)
    return b"".join(conn.written)


@pytest.mark.parametrize("size", [0, 1, 5618, 131072 - 200, 131072, 300000])
@pytest.mark.parametrize("exchange,routing_key", [
    ("nova", "cells.intercell.broadcast"), ("cells.intercell.targeted_fanout", "")])
def test_frames_equal_py_amqp(size, exchange, routing_key):
    body = bytes(i % 251 for i in range(size))
    frames = transport._Frames(channel_id=3, frame_max=131072)
    assert frames.message(exchange, routing_key, body) == _py_amqp_bytes(
        131072, 3, exchange, routing_key, body)
    # The cached method frame gives the same bytes the second time.
    assert frames.message(exchange, routing_key, body) == _py_amqp_bytes(
        131072, 3, exchange, routing_key, body)


def test_small_frame_max_splits_the_body_alike():
    body = b"x" * 10000
    frames = transport._Frames(channel_id=1, frame_max=4096)
    assert frames.message("nova", "k", body) == _py_amqp_bytes(4096, 1, "nova", "k", body)
