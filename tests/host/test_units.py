import click
import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.units import Duration, FiniteFloat, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300),
        ("5min", 300),
        ("90s", 90),
        ("1h", 3600),
        ("2.5", 2.5),
        ("500ms", 0.5),
        ("7d", 7 * 86400),
        ("2w", 14 * 86400),
        (" 3S ", 3),
        (30, 30),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text, "--wait") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "-1s", "0", "5 fortnights", "1e3s", "s"])
def test_bad_durations_name_the_option_and_the_text(text):
    with pytest.raises(InputError, match=rf"^--soak {text!r}: expected a duration such as"):
        parse_duration(text, "--soak")


def test_a_maximum_is_enforced():
    assert parse_duration("3650d", "--expires", maximum=3650 * 86400) == 3650 * 86400
    with pytest.raises(InputError, match="at most 3650d"):
        parse_duration("3651d", "--expires", maximum=3650 * 86400)


@pytest.mark.parametrize("text", ["99999999999999d", "9" * 30, "600w"])
def test_every_duration_has_a_ceiling_of_ten_years(text):
    """Unbounded, a soak of 8.6e18 s was signed into a rollout record."""
    with pytest.raises(InputError, match=r"at most 3652\.5d"):
        parse_duration(text, "--soak")
    with pytest.raises(click.BadParameter, match="between 0s and 3652.5d"):
        Duration().convert(text, None, None)
    assert parse_duration("520w", "--soak") == 520 * 7 * 86400


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN"])
def test_finite_float_refuses_what_float_accepts_but_no_bound_catches(text):
    # click's FloatRange lets nan through: it compares false with every bound
    with pytest.raises(click.BadParameter, match="is not a finite number"):
        FiniteFloat().convert(text, None, None)
    assert FiniteFloat(0, 1, min_open=True).convert("0.5", None, None) == 0.5


def test_duration_option_type_takes_units_and_refuses_nan():
    assert Duration(minimum=0.001).convert("12h", None, None) == 43200
    with pytest.raises(click.BadParameter, match="expected a duration"):
        Duration(minimum=0.001).convert("nan", None, None)
