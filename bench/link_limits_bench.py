"""A hostile message against the agent's MQTT link (issue 8 item 2), MQTT 3.1.1 and 5.

For each protocol, a device link in its own process (subscribed to ``desired`` with the
64 KiB document limit) receives one message of SIZE bytes and then a small one that must
still arrive. Reported: the child's RSS growth after the message and its peak RSS growth
(VmHWM), medians over RUNS, next to a 1 KiB baseline measured in the same run. Run::

    python bench/link_limits_bench.py                 # 100 MiB, 3 runs: about a minute
    python bench/link_limits_bench.py --mib 20 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests")]
from brokers import Mosquitto  # noqa: E402  (the tests' mosquitto launcher)
from hostile_link import receive_in_child  # noqa: E402

from slimfleet.agent.link import Backoff, Link  # noqa: E402
from slimfleet.agent.mqtt import BrokerSettings  # noqa: E402

MIB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100, help="hostile message size in MiB")
    parser.add_argument("--runs", type=int, default=3, help="runs per row (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto")
        broker.start()
        publisher = Link(BrokerSettings("127.0.0.1", broker.port), "bench-pub", backoff=Backoff())
        publisher.start()
        assert publisher.wait_connected(10)
        try:
            print("| protocol | message | delivered after | dropped | RSS growth | peak growth |")
            print("|---|---|---|---|---|---|")
            for protocol in ("3.1.1", "5"):
                for size in (1024, args.mib * MIB):
                    # A topic and session per run: an earlier run's session would queue it.
                    runs = [f"bench-{protocol}-{size}-{i}" for i in range(args.runs)]
                    rows = [
                        receive_in_child(
                            broker.port, protocol, f"{run}/desired", run, publisher, size
                        )
                        for run in runs
                    ]
                    rss = statistics.median(r["rss_growth"] for r in rows) / MIB
                    peak = statistics.median(r["peak_growth"] for r in rows) / MIB
                    ok = all(r["payloads"][-1:] == ["after"] for r in rows)
                    dropped = statistics.median(len(r["drops"]) for r in rows)
                    print(
                        f"| {protocol} | {size / MIB:.3g} MiB | {'yes' if ok else 'NO'} "
                        f"| {dropped:g} | {rss:+.1f} MiB | {peak:+.1f} MiB |"
                    )
        finally:
            publisher.stop()
            broker.stop()


if __name__ == "__main__":
    main()
