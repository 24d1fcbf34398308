"""Scenarios validate at construction: every bad value is a typed ScenarioError naming it."""
import json

import pytest

import isolation_suite as iso
from isolation_suite.cli import main
from isolation_suite.techniques.triggers import FROZEN_LINEAR

BASE = FROZEN_LINEAR.to_dict()


def _edited(edit):
    data = json.loads(json.dumps(BASE))
    edit(data)
    return data


def _layer_arg(index, name, value):
    def edit(d):
        args = d["architecture"]["layers"][0]["args"]
        d["architecture"]["layers"][0]["args"] = [a for a in args if a[0] != name] + [[name, value]]
    return edit


BAD = [
    ("unknown top-level field", lambda d: d.update(foo=1), "unknown field(s) ['foo'] in scenario"),
    ("negative steps", lambda d: d.update(steps=-1), "steps=-1 must be an integer in [1, 64]"),
    ("absurd steps", lambda d: d.update(steps=10**9), "steps=1000000000 must be an integer in [1, 64]"),
    ("unknown layer argument", _layer_arg(0, "wat", 3), "layer 'pre' (linear) has no argument 'wat'"),
    ("unknown layer kind", lambda d: d["architecture"]["layers"][0].update(kind="transformer"),
     "layer 'pre' kind='transformer' is not one of"),
    ("negative size", _layer_arg(0, "out_features", -2), "out_features=-2 must be an integer in [1, 1024]"),
    ("absurd width", _layer_arg(0, "out_features", 10**9), "out_features=1000000000 must be an integer in [1, 1024]"),
    ("unknown optimizer", lambda d: d["optimizer"].update(name="Lion"), "optimizer='Lion' is not one of"),
    ("batch of zero", lambda d: d["data"].update(batch=0), "batch=0 must be an integer in [1, 64]"),
    ("intent names a missing module", lambda d: d["intent"].update(frozen_modules=["nope"]),
     "the intent names module 'nope'"),
    ("missing field", lambda d: d.pop("architecture"), "scenario misses field(s) ['architecture']"),
]


@pytest.mark.parametrize("edit, needle", [(e, n) for _, e, n in BAD], ids=[name for name, _, _ in BAD])
def test_a_bad_scenario_is_a_typed_error_naming_the_value(edit, needle):
    with pytest.raises(iso.ScenarioError) as error:
        iso.Scenario.from_json(json.dumps(_edited(edit)))
    assert needle in str(error.value)


@pytest.mark.parametrize("edit, needle", [(e, n) for _, e, n in BAD], ids=[name for name, _, _ in BAD])
def test_repro_of_a_bad_scenario_is_one_line_and_exit_2(edit, needle, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_edited(edit)))
    assert main(["repro", str(path), "--technique", "freeze_and_eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


def test_a_scenario_whose_layers_do_not_chain_is_rejected_by_check():
    broken = iso.Scenario.from_dict(_edited(lambda d: d["architecture"]["layers"][1]["args"].__setitem__(
        1, ["in_features", 3])))
    with pytest.raises(iso.ScenarioError, match="the scenario's model does not run: RuntimeError"):
        iso.check(iso.catalog()["freeze_and_eval"], broken)


def test_constructing_a_bad_spec_directly_raises_too():
    with pytest.raises(iso.ScenarioError, match="kernel_size=99"):
        iso.Layer("c", "conv1d", (("in_channels", 1), ("out_channels", 1), ("kernel_size", 99)))
    with pytest.raises(iso.ScenarioError, match="activation='swish'"):
        iso.Op("act", "swish")
