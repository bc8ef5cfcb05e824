import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.recipes import Recipe, Step, parse_recipe


def test_parse_plain_and_optioned_steps():
    recipe = parse_recipe("simplify, quantize_dynamic[op_types=MatMul+LSTM,per_channel=true],fp16")
    assert recipe.steps == (
        Step("simplify"),
        Step("quantize_dynamic", {"op_types": "MatMul+LSTM", "per_channel": "true"}),
        Step("fp16"),
    )
    assert recipe.label() == (
        "simplify > quantize_dynamic[op_types=MatMul+LSTM,per_channel=true] > fp16"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no pass given"),
        (" , ", "no pass given"),
        ("prune[sparsity=0.5", "missing ']'"),
        ("prune[sparsity]", "expected key=value"),
        ("quantize_dynamic[", "missing ']'"),  # was accepted as quantize_dynamic
        ("prune[a=1]]", "missing ']'"),
        ("prune[a=[1]]", "missing ']'"),
        ("simplify,,fp16", "an empty item"),
        ("[a=1]", "expected NAME or NAME"),
        ("prune]", "expected NAME or NAME"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_recipe(text)


def test_empty_brackets_are_no_options():
    assert parse_recipe("simplify[],fp16").steps[0].options == {}


def test_labels_show_lists_and_empty_recipe():
    assert Step("q", {"exclude_nodes": ["a", "b"]}).label() == "q[exclude_nodes=a+b]"
    assert Recipe("none", ()).label() == "(original)"


def test_passes_text_reads_back_as_the_same_steps():
    from slimfleet.plugins.recipes import BUILTIN_RECIPES

    for recipe in BUILTIN_RECIPES:
        again = parse_recipe(recipe.passes_text())
        assert [s.label() for s in again.steps] == [s.label() for s in recipe.steps]
