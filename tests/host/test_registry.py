from dataclasses import dataclass

import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.registry import Registry


@dataclass
class Thing:
    name: str


def test_add_get_iterate_and_attribute_to_caller_module():
    reg: Registry[Thing] = Registry("thing")
    reg.add(Thing("a"))
    reg.add(Thing("b"), plugin="pkg.plugin")
    assert [t.name for t in reg] == ["a", "b"] and len(reg) == 2 and "a" in reg
    assert reg.plugin_of("a") == __name__
    assert reg.plugin_of("b") == "pkg.plugin"
    assert reg.get("b").name == "b"


def test_duplicate_names_both_plugins():
    reg: Registry[Thing] = Registry("pass")
    reg.add(Thing("x"), plugin="first")
    with pytest.raises(ValueError, match="pass 'x' is registered by both first and second"):
        reg.add(Thing("x"), plugin="second")


@pytest.mark.parametrize("name", ["", "has-dash", "a b", None])
def test_invalid_names(name):
    with pytest.raises(ValueError, match="must be letters"):
        Registry("pass").add(Thing(name))


def test_unknown_name_lists_known():
    reg: Registry[Thing] = Registry("recipe")
    reg.add(Thing("lossless"))
    with pytest.raises(InputError, match=r"unknown recipe 'nope' \(known: lossless\)"):
        reg.get("nope")
