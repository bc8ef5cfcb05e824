"""The device side of fleet_bench.py: one worker process hosting many real agents.

Each agent is a :class:`slimfleet.agent.daemon.Agent` with its own agent.yaml, store
directory and MQTT connection (HTTP off), exactly as a device runs it; only the process
is shared. The worker talks to the bench over a pipe:

- it sends ``("ready", rss_before, rss_started)`` once every agent has started;
- ``("watch", {device: seq}, timeout_s)``: it answers ``("served", last_time)`` (wall
  clock when its last agent switched to its seq) or ``("late", [devices])`` after the
  timeout;
- ``("rss",)``: it answers ``("rss", bytes)``; ``("stop",)``: it stops every agent and exits.

Bounds: the bench chooses the agents per process; each wait has the timeout it is sent.
"""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Connection
from pathlib import Path

import psutil


def rss() -> int:
    return psutil.Process().memory_info().rss


def run_worker(configs: list[str], conn: Connection) -> None:
    """Start an agent per config file, then answer the bench's commands until ``stop``."""
    logging.basicConfig(level=logging.ERROR)
    from slimfleet.agent.config import load_agent_config
    from slimfleet.agent.daemon import Agent

    before = rss()
    agents = {}
    for path in configs:
        config = load_agent_config(Path(path))
        agents[config.device_id] = Agent(config)
    for agent in agents.values():
        agent.start()
    conn.send(("ready", before, rss()))
    try:
        while True:
            command = conn.recv()
            if command[0] == "watch":
                conn.send(_watch(agents, command[1], command[2]))
            elif command[0] == "rss":
                conn.send(("rss", rss()))
            else:
                break
    finally:
        for agent in agents.values():
            agent.stop()


def _watch(agents: dict, seqs: dict[str, int], timeout_s: float) -> tuple:
    """Poll until every agent of ``seqs`` serves its seq; when the last one did."""
    waiting = {d: s for d, s in seqs.items() if d in agents}
    last = time.time()
    deadline = time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        for device, seq in list(waiting.items()):
            update = agents[device].last_update
            if update is not None and update.get("seq") == seq:
                del waiting[device]
                last = time.time()
        time.sleep(0.01)
    return ("late", sorted(waiting)) if waiting else ("served", last)
