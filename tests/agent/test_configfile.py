import pytest

from slimfleet.agent.configfile import load_yaml, parse_yaml
from slimfleet.agent.errors import ConfigError

TEXT = """\
name: cam
count: 3
ratio: 0.5
flag: true
items:
  - a
  - b
nested:
  key: value
huge: 1.0e+999
nan: .NaN
"""


def test_nodes_remember_lines_and_paths():
    root = parse_yaml(TEXT, "f.yaml")
    assert root.require("count").int() == 3
    assert root.require("ratio").float() == 0.5
    assert root.require("flag").bool() is True
    items = list(root.require("items").items())
    assert [i.str() for i in items] == ["a", "b"]
    assert items[1].where() == "f.yaml:7: items[1]"
    assert root.require("nested").require("key").where() == "f.yaml:9: nested.key"
    assert root.plain()["nested"] == {"key": "value"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.require("count").str(), "f.yaml:2: count: expected a non-empty string"),
        (lambda r: r.require("name").int(), "f.yaml:1: name: expected an integer"),
        (lambda r: r.require("flag").int(), "f.yaml:4: flag: expected an integer"),
        (lambda r: r.require("count").int(minimum=5), "f.yaml:2: count: must be >= 5"),
        (lambda r: r.require("count").int(maximum=2), "f.yaml:2: count: must be <= 2"),
        (lambda r: r.require("ratio").float(maximum=0.1), "f.yaml:3: ratio: must be <= 0.1"),
        (lambda r: r.require("huge").float(), "f.yaml:10: huge: expected a finite number"),
        (lambda r: r.require("nan").float(), "f.yaml:11: nan: expected a finite number"),
        (lambda r: r.require("name").items(), "f.yaml:1: name: expected a list"),
        (lambda r: r.require("items").scalar(), "f.yaml:6: items: expected a single value"),
        (lambda r: r.require("missing"), "f.yaml:1: <root>: missing required key 'missing'"),
        (lambda r: r.reject_unknown({"name"}), "f.yaml:2: count: unknown key 'count'"),
    ],
)
def test_errors_name_file_line_and_path(call, message):
    root = parse_yaml(TEXT, "f.yaml")
    with pytest.raises(ConfigError) as info:
        result = call(root)
        list(result)  # generators raise on iteration
    assert str(info.value).startswith(message)


def test_unknown_block_key_is_reported_at_the_key_line():
    root = parse_yaml("known: 1\nextra:\n  nested: 2\n", "f.yaml")
    with pytest.raises(ConfigError, match="f.yaml:2: extra: unknown key 'extra'"):
        root.reject_unknown({"known"})


def test_yaml_syntax_error_gives_line():
    with pytest.raises(ConfigError, match=r"f.yaml:3: invalid YAML: .*flow sequence at line 2"):
        parse_yaml("a: 1\nb: [unclosed\n", "f.yaml")


def test_duplicate_key_and_empty_file():
    with pytest.raises(ConfigError, match="f.yaml:2: duplicate key 'a'"):
        parse_yaml("a: 1\na: 2\n", "f.yaml")
    with pytest.raises(ConfigError, match="the file is empty"):
        parse_yaml("", "f.yaml")


def test_load_yaml_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_yaml(tmp_path / "bin.yaml")


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BOMB, r"f.yaml:\d+: more than 100000 values once aliases are expanded"),
        ("top:\n  a: &a [*a]\n", r"f.yaml:2: top.a\[0\]: an alias refers to itself"),
        ("k: " + "[" * 70 + "]" * 70 + "\n", r"f.yaml:1: nested deeper than 64 levels"),
        ("devices:\n  ok: 1\n  [a, b]: {site: lab}\n", r"f.yaml:3: a key must be a single value"),
        ("devices:\n  {a: 1}: x\n", r"f.yaml:2: a key must be a single value"),
    ],
)
def test_hostile_yaml_is_one_error_with_a_line(text, message):
    # a billion-laughs file used to expand without bound; the others were tracebacks
    with pytest.raises(ConfigError, match=message):
        parse_yaml(text, "f.yaml")


def test_aliases_that_nest_deeper_together_are_refused():
    # each anchor is 60 deep, under the limit; expanded inside each other they were a
    # RecursionError (exit 70)
    lines, inner = [], "x"
    for i in range(20):
        lines.append(f"a{i}: &a{i} " + "[" * 60 + inner + "]" * 60)
        inner = f"*a{i}"
    with pytest.raises(ConfigError, match=r"f.yaml:\d+: nested deeper than 64 levels"):
        parse_yaml("\n".join(lines) + "\n", "f.yaml")


def test_a_deep_file_is_refused_before_the_recursive_composer_sees_it():
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        parse_yaml("k:\n" + "".join(" " * i + "- \n" for i in range(1, 5000)), "f.yaml")


def test_aliases_within_the_budget_still_work():
    root = parse_yaml("base: &b {port: 1}\none: *b\ntwo: *b\n", "f.yaml")
    assert root.plain() == {"base": {"port": 1}, "one": {"port": 1}, "two": {"port": 1}}


def test_load_yaml_refuses_a_file_over_the_size_cap(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("a: " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big.yaml: config is larger than 1024 KiB"):
        load_yaml(path)
