"""A device link in its own process receiving one big message on a topic it limits to
64 KiB: what it got, what it dropped, how its RSS moved. Shared by
``tests/agent/test_link.py`` and ``bench/link_limits_bench.py``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

CHILD = """
import json, sys, time
from slimfleet.agent.inbox import DOCUMENT_LIMIT
from slimfleet.agent.link import Backoff, Link
from slimfleet.agent.mqtt import BrokerSettings

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

port, protocol, topic = int(sys.argv[1]), sys.argv[2], sys.argv[3]
drops = []
link = Link(BrokerSettings("127.0.0.1", port, protocol=protocol), sys.argv[4],
            backoff=Backoff(0.1, 0.5), on_drop=drops.append)
sub = link.subscribe([topic], max_bytes=DOCUMENT_LIMIT)
link.start()
assert link.wait_connected(10)
time.sleep(0.3)
before, peak_before = rss("VmRSS"), rss("VmHWM")
print("ready", flush=True)
payloads = []
deadline = time.monotonic() + 60
while b"after" not in payloads and time.monotonic() < deadline:
    msg = sub.get(timeout=0.5)
    if msg is not None:
        payloads.append(msg.payload)
time.sleep(0.3)
print(json.dumps({
    "payloads": [p.decode() for p in payloads], "drops": [d.size for d in drops],
    "rss_growth": rss("VmRSS") - before, "peak_growth": rss("VmHWM") - peak_before,
    "connects": link.connects,
}), flush=True)
link.stop()
"""


def receive_in_child(
    port: int, protocol: str, topic: str, client_id: str, publisher: Any, size: int
) -> dict[str, Any]:
    """Start the child link, publish ``size`` bytes then ``b"after"`` on ``topic`` with
    ``publisher`` (a started Link), and return the child's report: ``payloads`` it got,
    ``drops`` (sizes), ``rss_growth`` and ``peak_growth`` (bytes), ``connects``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(port), protocol, topic, client_id],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        publisher.publish(topic, b"h" * size)
        time.sleep(1.0 if protocol == "5" else 0.2)  # the broker discards it first (5)
        publisher.publish(topic, b"after")
        return json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
