import paho.mqtt.client as mqtt
import pytest

from slimfleet.agent.configfile import parse_yaml
from slimfleet.agent.errors import ConfigError
from slimfleet.agent.mqtt import BrokerSettings, make_client


def test_from_url_defaults_ports():
    assert BrokerSettings.from_url("mqtt://h").port == 1883
    tls = BrokerSettings.from_url("mqtts://h")
    assert tls.tls and tls.port == 8883 and tls.url == "mqtts://h:8883"
    with pytest.raises(ValueError):
        BrokerSettings.from_url("http://h")


def test_an_ipv6_broker_url_reads_back_as_given():
    assert BrokerSettings.from_url("mqtt://[::1]:1884").url == "mqtt://[::1]:1884"


@pytest.mark.parametrize("url", ["mqtt://h:0", "mqtt://h:70000", "mqtts://h:x"])
def test_a_port_no_broker_listens_on_is_refused_not_replaced(url):
    """Port 0 was taken as 'no port' and replaced by 1883 without a word."""
    with pytest.raises(ValueError, match="the port must be 1 to 65535"):
        BrokerSettings.from_url(url)


def test_from_node_shorthand():
    node = parse_yaml("broker: mqtt://b:1999\n", "f.yaml").require("broker")
    assert BrokerSettings.from_node(node, ".").port == 1999


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("broker:\n  url: http://x\n", "f.yaml:2: broker.url: broker URL must look like"),
        ("broker:\n  url: mqtt://x\n  username_env: NOPE_UNSET\n", "NOPE_UNSET is not set"),
        ("broker:\n  url: mqtt://x\n  ca_file: none.pem\n", "f.yaml:3: broker.ca_file"),
        (
            "broker:\n  url: mqtt://x\n  ca_file: .\n",
            "f.yaml:3: broker.ca_file: ca file .* is not a file",
        ),
        ("broker:\n  url: mqtt://x\n  protocol: 4\n", "f.yaml:3: broker.protocol"),
        ("broker:\n  url: mqtt://x\n  colour: red\n", "unknown key 'colour'"),
        (
            "broker:\n  url: mqtt://x\n  keepalive: 70000\n",
            "f.yaml:3: broker.keepalive: must be <= 65535",
        ),
    ],
)
def test_from_node_errors(tmp_path, text, message):
    node = parse_yaml(text, "f.yaml").require("broker")
    with pytest.raises(ConfigError, match=message):
        BrokerSettings.from_node(node, tmp_path)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_make_client_connects_to_mosquitto(mosquitto, protocol):
    settings = BrokerSettings.from_url(mosquitto.url, protocol=protocol)
    client = make_client(settings, f"t-{protocol}", persistent=True)
    assert client.protocol == (mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
    assert client.connect(settings.host, settings.port) == mqtt.MQTT_ERR_SUCCESS
    client.disconnect()
