"""transport.read_ahead: py-amqp reads whole runs of frames per recv, and
still parses, times out and fails as it did."""

import socket

import amqp.transport
import pytest

from cellagent.rpc import transport


class _Counting:
    """A socket whose recv calls are counted."""

    def __init__(self, sock):
        self._sock = sock
        self.recvs = 0

    def recv(self, n):
        self.recvs += 1
        return self._sock.recv(n)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Connection:
    def __init__(self, tr):
        self.connection = self
        self.transport = tr


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    tr = amqp.transport.TCPTransport("127.0.0.1:5672")
    tr.sock = _Counting(ours)
    tr._setup_transport()
    transport.read_ahead(_Connection(tr))
    yield tr, theirs
    ours.close()
    theirs.close()


def _messages(n, size):
    frames = transport._Frames(channel_id=1, frame_max=131072)
    bodies = [bytes([i]) * size for i in range(n)]
    return bodies, b"".join(frames.message("nova", "cells.intercell.targeted", b)
                            for b in bodies)


def test_frames_parse_as_before_with_one_recv_per_run(pair):
    tr, theirs = pair
    bodies, data = _messages(3, 7000)
    theirs.sendall(data)
    seen = [tr.read_frame() for _ in range(9)]
    # method, header, body for each message, in order.
    assert [f[0] for f in seen] == [1, 2, 3] * 3
    assert [f[2] for f in seen[2::3]] == bodies
    # py-amqp alone: three recv calls per frame (header, payload, end).
    assert tr.sock.recvs == 1


def test_a_frame_cut_by_a_timeout_is_read_whole_later(pair):
    tr, theirs = pair
    bodies, data = _messages(1, 100)
    theirs.sendall(data[:10])          # the method frame's header and a bit
    with tr.having_timeout(0.05):
        with pytest.raises(socket.timeout):
            tr.read_frame()
        with pytest.raises(socket.timeout):
            tr.read_frame()            # nothing more: the same cut frame
    theirs.sendall(data[10:])
    seen = [tr.read_frame() for _ in range(3)]
    assert [f[0] for f in seen] == [1, 2, 3]
    assert seen[2][2] == bodies[0]


def test_a_closed_connection_is_an_error(pair):
    tr, theirs = pair
    theirs.sendall(b"\x01\x00")
    theirs.close()
    with pytest.raises(OSError, match="closed connection"):
        tr.read_frame()


def test_other_transports_are_left_alone():
    class Other:
        _read = object()

    other = Other()
    transport.read_ahead(_Connection(other))
    assert other._read is Other._read


class _Amqp:
    """The part of amqp.Connection a FrameReader uses: one frame a call."""

    def __init__(self, tr):
        self.transport = tr
        self.frames = []

    def blocking_read(self, timeout):
        assert timeout is None
        self.frames.append(self.transport.read_frame())
        return True


def test_frame_reader_takes_only_whole_frames_and_never_waits_inside_one(pair):
    tr, theirs = pair
    reader = transport.FrameReader(_Amqp(tr))
    bodies, data = _messages(2, 3000)
    assert not reader.frame_ready()
    assert reader.fill(0) is False                 # nothing sent: no wait
    theirs.sendall(data[:20])                      # the first frame, cut
    assert reader.fill(1.0) is True
    assert not reader.frame_ready()
    theirs.sendall(data[20:])
    while reader.fill(0.2):
        pass
    seen = reader._conn.frames
    while reader.frame_ready():
        reader.next_frame()
    assert [f[0] for f in seen] == [1, 2, 3, 1, 2, 3]
    assert [f[2] for f in seen[2::3]] == bodies
    assert tr._read_buffer == b""


def test_frame_reader_reports_a_closed_connection(pair):
    tr, theirs = pair
    reader = transport.FrameReader(_Amqp(tr))
    theirs.close()
    with pytest.raises(OSError, match="closed connection"):
        reader.fill(1.0)
