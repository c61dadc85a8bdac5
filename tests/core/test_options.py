"""options.py: typed coercion of CLI strings and YAML values, bounds/choices, --set and recipes."""

import dataclasses
import json
from typing import Literal, Optional

import pytest

from graphs import user_error

from onnxslim_cnn.options import coerce, describe, load_recipe, make_options, option, parse_set


@dataclasses.dataclass(frozen=True)
class Opts:
    flag: bool = option(True, "a flag")
    n: int = option(3, "a count", min=1, max=10)
    ratio: float = option(0.5, "a fraction", min=0.0, max=1.0)
    rounds: int = option(8, "at least one", min=1)
    name: str = option("x", "a name")
    mode: Literal["l1", "l2"] = option("l1", "a literal")
    crit: str = option("l1", "with choices", choices=("l1", "l2", "fpgm"))
    limit: Optional[int] = option(None, "optional")
    layers: list[str] = option([], "names")
    sizes: list[int] = option([], "ints", min=0)
    per_layer: dict[str, float] = option({}, "per-layer fraction", min=0.0, max=1.0)


def make(**values):
    return make_options(Opts, values, "p")


# --------------------------------------------------------------------------- coerce


@pytest.mark.parametrize("raw, expected", [
    ("true", True), ("1", True), ("yes", True), ("ON", True), (True, True),
    ("false", False), ("0", False), ("no", False), ("Off", False), (False, False),
])
def test_bool(raw, expected):
    assert coerce(raw, bool, "p.flag") is expected


@pytest.mark.parametrize("raw", ["maybe", 1, 0, None, ""])
def test_bool_refuses(raw):
    assert user_error(coerce, raw, bool, "p.flag") == f"bad value for p.flag: {raw!r} (expected true or false)"


@pytest.mark.parametrize("raw, expected", [("3", 3), (" 3 ", 3), (3, 3), (2.0, 2), ("-4", -4)])
def test_int(raw, expected):
    value = coerce(raw, int, "p.n")
    assert value == expected and type(value) is int


@pytest.mark.parametrize("raw", ["1.5", "x", 2.5, True, None, [1]])
def test_int_refuses(raw):
    assert user_error(coerce, raw, int, "p.n") == f"bad value for p.n: {raw!r} (expected an integer)"


@pytest.mark.parametrize("raw, expected", [("0.25", 0.25), ("1e-3", 1e-3), (1, 1.0), (0.5, 0.5)])
def test_float(raw, expected):
    value = coerce(raw, float, "p.ratio")
    assert value == expected and type(value) is float


def test_float_refuses():
    assert user_error(coerce, "abc", float, "p.ratio") == "bad value for p.ratio: 'abc' (expected a number)"
    assert user_error(coerce, False, float, "p.ratio") == "bad value for p.ratio: False (expected a number)"
    assert user_error(coerce, "nan", float, "p.ratio") == "bad value for p.ratio: nan"


def test_str():
    assert coerce("abc", str, "p.name") == "abc"
    assert coerce(3, str, "p.name") == "3"  # YAML reads `name: 3` as an int
    assert user_error(coerce, True, str, "p.name") == "bad value for p.name: True (expected a string)"
    assert user_error(coerce, ["a"], str, "p.name") == "bad value for p.name: ['a'] (expected a string)"


def test_literal():
    tp = Literal["l1", "l2"]
    assert coerce("l2", tp, "p.mode") == "l2"
    assert coerce(4, Literal[2, 4], "p.k") == 4
    assert coerce("4", Literal[2, 4], "p.k") == 4
    assert user_error(coerce, "l3", tp, "p.mode") == "bad value for p.mode: 'l3' (choose from l1, l2)"


def test_optional():
    tp = Optional[int]
    for raw in (None, "none", "None", "null", ""):
        assert coerce(raw, tp, "p.limit") is None
    assert coerce("5", tp, "p.limit") == 5
    assert user_error(coerce, "abc", tp, "p.limit") == "bad value for p.limit: 'abc' (expected an integer)"
    assert coerce("x", int | str, "p.u") == "x"


def test_list():
    assert coerce("a,b, c", list[str], "p.layers") == ["a", "b", "c"]
    assert coerce("", list[str], "p.layers") == []
    assert coerce(["a", "b"], list[str], "p.layers") == ["a", "b"]
    assert coerce("1,2,3", list[int], "p.sizes") == [1, 2, 3]
    assert coerce([1, "2"], list[int], "p.sizes") == [1, 2]
    assert user_error(coerce, "1,x", list[int], "p.sizes") == "bad value for p.sizes: 'x' (expected an integer)"
    assert user_error(coerce, {"a": 1}, list[str], "p.layers") == "bad value for p.layers: {'a': 1} (expected a list)"


def test_dict():
    tp = dict[str, float]
    assert coerce("a:1,b:0.5", tp, "p.per_layer") == {"a": 1.0, "b": 0.5}
    assert coerce(" conv.1 : 0.25 ", tp, "p.per_layer") == {"conv.1": 0.25}
    assert coerce("ns:conv:0.25", tp, "p.per_layer") == {"ns:conv": 0.25}  # the last colon splits
    assert coerce({"a": 1, "b": "0.5"}, tp, "p.per_layer") == {"a": 1.0, "b": 0.5}
    assert coerce("", tp, "p.per_layer") == {}
    assert user_error(coerce, "a", tp, "p.per_layer") == "bad value for p.per_layer: 'a' (expected name:value pairs)"
    assert user_error(coerce, "a:x", tp, "p.per_layer") == "bad value for p.per_layer: 'x' (expected a number)"
    assert user_error(coerce, [1], tp, "p.per_layer") == "bad value for p.per_layer: [1] (expected a mapping)"


# --------------------------------------------------------------------------- make_options: bounds, choices, names


def test_defaults_and_typed_values():
    o = make()
    assert (o.flag, o.n, o.ratio, o.limit, o.layers, o.per_layer) == (True, 3, 0.5, None, [], {})
    assert make().layers is not o.layers  # list defaults are not shared
    o = make(flag="false", n="10", ratio="1", limit="2", layers="a,b", per_layer="a:0", crit="fpgm", mode="l2")
    assert (o.flag, o.n, o.ratio, o.limit, o.layers, o.per_layer, o.crit, o.mode) == (
        False, 10, 1.0, 2, ["a", "b"], {"a": 0.0}, "fpgm", "l2")


@pytest.mark.parametrize("values, message", [
    ({"n": "0"}, "bad value for p.n: 0 (must be within [1, 10])"),
    ({"n": 11}, "bad value for p.n: 11 (must be within [1, 10])"),
    ({"ratio": "1.5"}, "bad value for p.ratio: 1.5 (must be within [0.0, 1.0])"),
    ({"ratio": "-inf"}, "bad value for p.ratio: -inf (must be within [0.0, 1.0])"),
    ({"rounds": "0"}, "bad value for p.rounds: 0 (must be >= 1)"),
    ({"sizes": "1,-1"}, "bad value for p.sizes: -1 (must be >= 0)"),
    ({"per_layer": "a:0.5,b:2"}, "bad value for p.per_layer: 2.0 (must be within [0.0, 1.0])"),
    ({"crit": "l3"}, "bad value for p.crit: 'l3' (choose from l1, l2, fpgm)"),
    ({"mode": "l3"}, "bad value for p.mode: 'l3' (choose from l1, l2)"),
    ({"flag": "2"}, "bad value for p.flag: '2' (expected true or false)"),
])
def test_bad_values(values, message):
    assert user_error(make, **values) == message


def test_unknown_option():
    assert user_error(make, bogus=1) == (
        "unknown option 'p.bogus' (options of p: crit, flag, layers, limit, mode, n, name, per_layer, ratio, "
        "rounds, sizes)")


def test_describe():
    rows = {r["name"]: r for r in describe(Opts)}
    assert rows["n"] == {"name": "n", "type": "int", "default": 3, "help": "a count", "choices": None}
    assert rows["mode"]["type"] == "l1|l2"
    assert rows["limit"]["type"] == "int | none"
    assert rows["per_layer"]["type"] == "dict[str, float]"
    assert rows["crit"]["choices"] == ("l1", "l2", "fpgm")


# --------------------------------------------------------------------------- --set


def test_parse_set():
    assert parse_set(["slim.cse=false", " prune.ratio = 0.5", "a.b=c=d", "slim.max_rounds=2"]) == {
        "slim": {"cse": "false", "max_rounds": "2"}, "prune": {"ratio": "0.5"}, "a": {"b": "c=d"}}
    assert parse_set([]) == {}


@pytest.mark.parametrize("item", ["slim.cse", "cse=false", "=1", "x=a.b", ""])
def test_parse_set_errors(item):
    assert user_error(parse_set, [item]) == f"bad --set {item!r} (expected PASS.OPTION=VALUE, e.g. prune.ratio=0.5)"


# --------------------------------------------------------------------------- recipes


def recipe(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_recipe_yaml_all_forms(tmp_path):
    p = recipe(tmp_path, """
passes:
  - slim: {fuse_pad: false}
  - prune
  - svd:
options:
  slim: {max_rounds: 4}
  prune: {ratio: 0.5, layers: [a, b], per_layer: {conv1: 0.1}}
""")
    assert load_recipe(p) == (["slim", "prune", "svd"], {
        "slim": {"fuse_pad": False, "max_rounds": 4},
        "prune": {"ratio": 0.5, "layers": ["a", "b"], "per_layer": {"conv1": 0.1}}})


def test_recipe_yaml_names_only_and_empty(tmp_path):
    assert load_recipe(recipe(tmp_path, "passes: [slim, prune]\n")) == (["slim", "prune"], {})
    assert load_recipe(recipe(tmp_path, "")) == ([], {})
    assert load_recipe(recipe(tmp_path, "options:\n  slim: {cse: false}\n")) == ([], {"slim": {"cse": False}})


def test_recipe_json_all_forms(tmp_path):
    data = {"passes": ["slim", {"prune": {"ratio": 0.5}}], "options": {"slim": {"cse": False}, "prune": {"l": 1}}}
    p = recipe(tmp_path, json.dumps(data), "r.json")
    assert load_recipe(p) == (["slim", "prune"], {"slim": {"cse": False}, "prune": {"ratio": 0.5, "l": 1}})
    p = recipe(tmp_path, json.dumps({"passes": ["slim"]}), "names.JSON")
    assert load_recipe(p) == (["slim"], {})


def test_recipe_options_entry_overrides_inline(tmp_path):
    p = recipe(tmp_path, "passes:\n  - slim: {cse: true, fuse_pad: false}\noptions:\n  slim: {cse: false}\n")
    assert load_recipe(p) == (["slim"], {"slim": {"cse": False, "fuse_pad": False}})


@pytest.mark.parametrize("text, name, expect", [
    ("passes: [slim\n", "r.yaml", "not a valid recipe ("),
    ('{"passes": ["slim",]}', "r.json", "not a valid recipe ("),
    ("passes: slim: x\n", "r.yaml", "not a valid recipe ("),
    ("- slim\n", "r.yaml", "a recipe is a mapping with keys 'passes' and 'options'"),
    ("passes: [slim]\nextra: 1\n", "r.yaml", "a recipe is a mapping with keys 'passes' and 'options'"),
    ("passes:\n  - {slim: {}, prune: {}}\n", "r.yaml", "bad pass entry {'slim': {}, 'prune': {}}"),
    ("passes:\n  - 3\n", "r.yaml", "bad pass entry 3"),
    ("passes:\n  - slim: 3\n", "r.yaml", "options of pass slim must be a mapping"),
    ("options:\n  slim: 3\n", "r.yaml", "'options' must map pass names to option mappings"),
    ("options: [slim]\n", "r.yaml", "'options' must map pass names to option mappings"),
    # a single name or a mapping where a list is expected: must not be read character by character
    # or key by key (options silently dropped)
    ("passes: slim\n", "r.yaml", "'passes' must be a list"),
    ("passes:\n  slim: {cse: false}\n", "r.yaml", "'passes' must be a list"),
])
def test_bad_recipes(tmp_path, text, name, expect):
    p = recipe(tmp_path, text, name)
    msg = user_error(load_recipe, p)
    assert msg.startswith(f"{p}: ") and expect in msg, msg


def test_missing_recipe(tmp_path):
    assert user_error(load_recipe, tmp_path / "nope.yaml") == f"recipe not found: {tmp_path / 'nope.yaml'}"
    assert user_error(load_recipe, tmp_path) == f"recipe not found: {tmp_path}"
