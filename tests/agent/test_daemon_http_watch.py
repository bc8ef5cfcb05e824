"""Issue 8: an HTTP client cannot veto an update. A real agent swaps to a new model while
a client sends it 40 malformed requests a second through the watch window; the 4xx
answers never count against the model, so the swap is kept (no rollback)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import models

RATE = 40  # malformed requests per second
WINDOW_S = 3.0


def main(version: int) -> dict:
    return {"main": [{"name": "m", "version": version}]}


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


GOOD = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}
).encode()
MALFORMED = [  # (path, body): bad JSON, wrong shape, wrong type, unknown input, unknown slot
    ("/v2/models/main/infer", b"{not json"),
    ("/v2/models/main/infer", GOOD.replace(b"[1, 4]", b"[1, 5]")),
    ("/v2/models/main/infer", GOOD.replace(b"FP32", b"BYTES")),
    ("/v2/models/main/infer", GOOD.replace(b'"x"', b'"nope"')),
    ("/v2/models/absent/infer", GOOD),
]


def test_malformed_requests_during_the_watch_window_never_roll_back(mosquitto, rig, watcher):
    rig.publish(models.add_const(1.0), 1)
    rig.publish(models.add_const(2.0), 2)
    # Latency is not what is tested: sub-millisecond p95s on shared cores are noise.
    watch = {"window_s": WINDOW_S, "min_requests": 5, "max_error_rate": 0.05, "max_p95_ratio": 1e6}
    agent = rig.agent(mosquitto.url, watch=watch)
    agent.start()
    try:
        rig.assign(1)
        watcher.event("swap_ok", deployment=main(1))
        base = agent.http_url
        for _ in range(10):  # a baseline with no errors
            assert post(f"{base}/v2/models/main/infer", GOOD) == 200
        rig.assign(2)
        watcher.event("swap_ok", deployment=main(2))
        codes: list[int] = []
        good = 0
        started = time.monotonic()
        for i in range(int(RATE * (WINDOW_S + 1))):  # bounded: through the whole window
            path, body = MALFORMED[i % len(MALFORMED)]
            codes.append(post(base + path, body))
            if i % 4 == 0:  # real traffic too, so the watch has enough requests to judge
                good += post(f"{base}/v2/models/main/infer", GOOD) == 200
            time.sleep(max(0.0, started + (i + 1) / RATE - time.monotonic()))
        assert all(400 <= c < 500 for c in codes), sorted(set(codes))
        assert good >= 5
        state = watcher.wait("state", lambda s: s["last_good"] == main(2), timeout=WINDOW_S + 10)
        assert state["deployment"] == main(2)
        assert not watcher.events("fallback")
        # Telemetry counts per interval: the 4xx are client errors, never the model's.
        watcher.wait("telemetry", lambda t: t["ts"] > time.time() - 0.1)
        slots = [t["slots"]["main"] for t in watcher.seen["telemetry"] if "main" in t["slots"]]
        assert sum(s["client_errors"] for s in slots) >= len(codes) * 3 // 5
        assert sum(s["errors"] for s in slots) == 0
    finally:
        agent.stop()
