import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.passes import Option, Pass


class Demo(Pass):
    name = "demo"
    description = "a pass with every kind of option"
    options = (
        Option("level", str, "basic", "how hard", choices=("basic", "all")),
        Option("sparsity", float, 0.5, "fraction"),
        Option("per_channel", bool, True, "per channel"),
        Option("op_types", list, [], "ops", choices=("MatMul", "LSTM")),
    )


def test_defaults_and_coercion_from_strings():
    assert Demo().resolve_options({}) == {
        "level": "basic",
        "sparsity": 0.5,
        "per_channel": True,
        "op_types": [],
    }
    got = Demo().resolve_options(
        {"sparsity": "0.25", "per_channel": "no", "op_types": "MatMul+LSTM"}
    )
    assert got["sparsity"] == 0.25 and got["per_channel"] is False
    assert got["op_types"] == ["MatMul", "LSTM"]
    assert Demo().resolve_options({"op_types": ["LSTM"]})["op_types"] == ["LSTM"]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"speed": 1}, "unknown option 'speed'"),
        ({"sparsity": "lots"}, "sparsity='lots' is not a float"),
        ({"per_channel": "maybe"}, "is not a bool"),
        ({"level": "max"}, "level='max' is not one of basic, all"),
        ({"op_types": "MatMul+Conv"}, "op_types='Conv' is not one of"),
    ],
)
def test_bad_options_are_input_errors(given, message):
    with pytest.raises(InputError, match=message):
        Demo().resolve_options(given)


def test_base_pass_defaults():
    p = Demo()
    assert p.min_opset({}) == 1
    assert p.check(None, None, {}) is None  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError):
        p.apply(None, None, {})  # type: ignore[arg-type]
