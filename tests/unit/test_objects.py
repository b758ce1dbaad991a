"""Small value objects and the JSON helpers of the hot paths."""

import dataclasses
import json
import math

import pytest

from cellagent import jsonutils
from cellagent import objects


def test_flavor_to_dict_is_asdict():
    flavor = objects.Flavor("m1.small", 2048, vcpus=2, root_gb=20, ephemeral_gb=1,
                            flavorid="2", swap=512, extra_specs={"hw:cpu_policy": "dedicated"})
    assert flavor.to_dict() == dataclasses.asdict(flavor)
    # Every field is there, and the result does not share extra_specs.
    assert set(flavor.to_dict()) == {f.name for f in dataclasses.fields(objects.Flavor)}
    flavor.to_dict()["extra_specs"]["x"] = "y"
    assert "x" not in flavor.extra_specs


@pytest.mark.parametrize("value", [
    {"a": [1, 2.5, None, True, "\u00e9\u4e2d"], "b": {"c": {}}},
    {1: "int key", "nested": {2: [3]}},
    [10 ** 30],                       # beyond 64 bits: orjson refuses, json does not
    {"deep": json.loads("[" * 300 + "]" * 300)},
])
def test_dumps_gives_the_value_json_gives(value):
    assert json.loads(jsonutils.dumps(value)) == json.loads(json.dumps(value))
    assert json.loads(jsonutils.dumpb(value).decode("utf-8")) == json.loads(json.dumps(value))


def test_dumps_default_hook():
    class Thing:
        pass

    assert json.loads(jsonutils.dumps({"t": Thing()}, default=lambda o: "thing")) == {
        "t": "thing"}
    with pytest.raises(TypeError):
        jsonutils.dumps({"t": Thing()})


@pytest.mark.parametrize("text", [
    '{"a": [1, 2, {"b": "c"}]}', b'{"a": "\\u00e9"}', '"\\ud800"', '[NaN, Infinity]',
])
def test_loads_accepts_what_json_accepts(text):
    got, want = jsonutils.loads(text), json.loads(text)
    if text == '[NaN, Infinity]':
        assert math.isnan(got[0]) and got[1] == math.inf
    else:
        assert got == want


@pytest.mark.parametrize("text", ["{", "", "[1,]", b"\xff\xfe", "nul"])
def test_loads_refuses_what_json_refuses(text):
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        jsonutils.loads(text)


def test_loads_too_deep_raises_recursion_error_as_json_does():
    text = "[" * 100000 + "]" * 100000
    with pytest.raises(RecursionError):
        jsonutils.loads(text)
