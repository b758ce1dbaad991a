"""Killing the agent mid-way through 200 builds loses nothing, doubles nothing.

On RabbitMQ the agent acknowledges a cast only once it is journaled, so
nothing is lost between the broker and the journal either: every build
comes back after the restart without the top having to re-send it.
"""

import collections
import uuid

from tests.functional.conftest import wait_for
from tests.functional.test_lifecycle import build_message


def test_sigkill_mid_builds_then_restart_builds_each_once(parent, agent_factory):
    # At most 20 builds in progress: the 200 take several rounds of the
    # spawn delay, so the kill lands mid-way (all 200 in parallel finished
    # before the test could kill the agent).
    agent = agent_factory(fake__spawn_delay=0.3, fake__ram_mb=600000, fake__vcpus=1000,
                          fake__disk_gb=100000, backend__workers=8,
                          backend__max_pending_operations=20).start()
    uuids = [str(uuid.uuid4()) for _ in range(200)]
    batches = [uuids[i:i + 5] for i in range(0, len(uuids), 5)]
    for batch in batches:
        parent.cast(build_message(batch, flavor_name="m1.tiny", memory_mb=512))

    def active():
        return {u for u in uuids if parent.view(u).get("vm_state") == "active"}

    wait_for(lambda: len(active()) >= 50, 60, what="a quarter of the builds")
    agent.kill()
    done_before = len(active())
    assert done_before < len(uuids), "the kill came too late to test anything"

    agent.start()
    # No re-send: what was not journaled was not acknowledged either, and the
    # broker delivers it again.
    wait_for(lambda: len(active()) == len(uuids), 90, what="every build active")

    cloud = agent.cloud()
    creates = collections.Counter(cloud["creates"])
    assert set(creates) == set(uuids)
    assert set(creates.values()) == {1}, {u: n for u, n in creates.items() if n != 1}
    assert sorted(i["instance_uuid"] for i in cloud["instances"]) == sorted(uuids)
    # Usually some journaled builds were unfinished at the kill and are
    # replayed ("Replaying" in the log); a kill between two bursts leaves
    # none, and the broker redelivers the rest. Either way: once each.
    assert agent.terminate() == 0
