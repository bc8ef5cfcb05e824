"""The demo's stage: keys, an embedded broker, three in-process agents and their configs.

Everything lives under the demo's work directory and listens on 127.0.0.1 only (the
broker on a free port, each agent's HTTP API on port 0). :meth:`Stage.close` stops
every agent, the host's broker link and the broker; the demo always calls it.
"""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

from slimfleet.agent.config import load_agent_config
from slimfleet.agent.daemon import Agent
from slimfleet.agent.deployment import Deployment
from slimfleet.agent.errors import SlimfleetError
from slimfleet.host.fleet import deploy
from slimfleet.host.fleet.broker import EmbeddedBroker
from slimfleet.host.fleet.config import FleetConfig, load_fleet
from slimfleet.host.fleet.keys import generate_keys
from slimfleet.host.fleet.mqttio import BrokerLink
from slimfleet.host.fleet.outcomes import Outcome, sent, wait_for_outcomes

PREFIX = "slimfleet/demo"
DEVICES = ("edge-1", "edge-2", "edge-3")
GROUP = "all"
OUTCOME_TIMEOUT_S = 60.0  # how long a device has to report serving or refusing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_fleet_yaml(work: Path, broker_url: str) -> Path:
    path = work / "fleet.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            # written by `slimfleet demo`
            broker: {broker_url}
            prefix: {PREFIX}
            keys:
              private: keys/signing.key
              public: keys/signing.pub
            devices: {{{", ".join(f"{d}: {{}}" for d in DEVICES)}}}
            groups:
              {GROUP}: [{", ".join(DEVICES)}]
            """)
    )
    return path


def write_agent_yaml(work: Path, device: str, broker_url: str) -> Path:
    path = work / f"agent-{device}.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            # written by `slimfleet demo`
            device_id: {device}
            broker: {broker_url}
            prefix: {PREFIX}
            public_keys: [keys/signing.pub]
            store_dir: store-{device}
            http: {{host: 127.0.0.1, port: 0}}
            telemetry_interval_s: 1
            watch: {{window_s: 0}}
            """)
    )
    return path


class Stage:
    """A broker, the fleet that uses it and one running agent per device of DEVICES."""

    def __init__(self, work: Path) -> None:
        generate_keys(work / "keys" / "signing.key", work / "keys" / "signing.pub")
        self.broker = EmbeddedBroker("127.0.0.1", free_port()).start()
        self.agents: dict[str, Agent] = {}
        self.link: BrokerLink | None = None
        try:
            self.fleet: FleetConfig = load_fleet(
                write_fleet_yaml(work, self.broker.url), broker_url=self.broker.url
            )
            for device in DEVICES:
                config = load_agent_config(write_agent_yaml(work, device, self.broker.url))
                self.agents[device] = agent = Agent(config)
                agent.start()
            self.link = BrokerLink(self.fleet.broker)
            self.link.connect()
        except BaseException:
            self.close()
            raise

    def url(self, device: str) -> str:
        url = self.agents[device].http_url
        if url is None:
            raise SlimfleetError(f"{device} has no HTTP API")
        return url

    def deploy(self, slots: Deployment, devices: list[str]) -> list[Outcome]:
        """Merge ``slots`` into each device's deployment (signed desired states) and wait
        until every device serves it; a refusal or silence is a SlimfleetError."""
        assert self.link is not None
        seqs, times = sent(deploy.assign(self.fleet, self.link, slots, devices))
        outcomes = wait_for_outcomes(
            self.link, self.fleet.topics, seqs, OUTCOME_TIMEOUT_S, issued=times
        )
        bad = [o for o in outcomes if not o.ok]
        if bad:
            raise SlimfleetError("; ".join(o.line() for o in bad))
        return outcomes

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        for agent in self.agents.values():
            agent.stop()
        self.broker.stop()
