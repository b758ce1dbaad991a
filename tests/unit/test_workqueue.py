"""WorkQueue.Later: an operation waits for a future without holding a worker."""

import concurrent.futures
import threading
import time

from cellagent import workqueue


def _wait(event):
    assert event.wait(10), "timed out"


def test_a_waiting_operation_frees_its_worker_but_keeps_the_instance_busy():
    work = workqueue.WorkQueue(1)
    write = concurrent.futures.Future()
    seen = []
    other_ran = threading.Event()
    all_done = threading.Event()

    def first():
        seen.append("a: before the write")
        return workqueue.Later(write, lambda fut: seen.append("a: after %s" % fut.result()))

    work.submit("a", first)
    work.submit("a", lambda: (seen.append("a: next op"), all_done.set()))
    # One worker only: "b" runs while "a" waits, so the wait holds no thread.
    work.submit("b", lambda: (seen.append("b"), other_ran.set()))
    _wait(other_ran)
    assert work.is_busy("a")
    assert "a: next op" not in seen
    write.set_result("committed")
    _wait(all_done)
    assert seen == ["a: before the write", "b", "a: after committed", "a: next op"]
    assert work.drain(10) == 0


def test_the_continuation_may_wait_again_and_sees_failures():
    work = workqueue.WorkQueue(2)
    first, second = concurrent.futures.Future(), concurrent.futures.Future()
    seen = []
    finished = threading.Event()

    def step2(fut):
        seen.append(repr(fut.exception()))
        finished.set()

    work.submit("a", lambda: workqueue.Later(
        first, lambda fut: (seen.append(fut.result()), workqueue.Later(second, step2))[1]))
    first.set_result(1)
    second.set_exception(RuntimeError("write failed"))
    _wait(finished)
    assert seen == [1, "RuntimeError('write failed')"]
    assert work.drain(10) == 0
    assert not work.is_busy("a")


def test_an_inline_continuation_runs_on_the_completing_thread():
    work = workqueue.WorkQueue(2)
    write = concurrent.futures.Future()
    ran_on = []
    finished = threading.Event()

    def then(fut):
        ran_on.append(threading.current_thread().name)
        finished.set()

    waiting = threading.Event()

    def first():
        waiting.set()
        return workqueue.Later(write, then, inline=True)

    work.submit("a", first)
    _wait(waiting)
    deadline = time.monotonic() + 10
    while not write._done_callbacks and time.monotonic() < deadline:
        time.sleep(0.001)       # until the work queue waits on the future
    completer = threading.Thread(target=lambda: write.set_result(1), name="the-writer")
    completer.start()
    completer.join()
    _wait(finished)
    assert ran_on == ["the-writer"]
    assert work.drain(10) == 0
