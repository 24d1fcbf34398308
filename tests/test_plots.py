"""The report's pictures: pure SVG builders from plain data, and the per-step and per-example data
that judging and the search keep for them."""
from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET

import pytest

import isolation_suite as iso
from isolation_suite.reporting import plots
from isolation_suite.engine.check import HISTORY_CAP, JudgedExample, search
from isolation_suite.judging.judge import StepPoint, judge
from isolation_suite.reporting.report import html_report, matrix, record
from isolation_suite.spec.scenario import Data, Intent, Layer, OptimizerRecipe, Scenario, chain
from isolation_suite.model.tree import ModelTree, Node, architecture_tree

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    """The SVG as XML (so it is well formed), after checking every coordinate is a finite number."""
    root = ET.fromstring(svg)
    for element in root.iter():
        for name in ("x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "width", "height"):
            if name in element.attrib:
                assert math.isfinite(float(element.attrib[name])), (element.tag, name, element.attrib[name])
        for name in ("points", "d"):
            numbers = re.findall(r"-?[0-9.]+(?:e-?\d+)?|nan|inf", element.attrib.get(name, ""))
            assert all(math.isfinite(float(n)) for n in numbers), (element.tag, element.attrib[name])
    return root


def find(root: ET.Element, tag: str, css: str | None = None) -> list[ET.Element]:
    return [e for e in root.iter(SVG + tag) if css is None or css in e.attrib.get("class", "").split()]


def texts(root: ET.Element) -> list[str]:
    return [e.text or "" for e in root.iter(SVG + "text")]


def points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.attrib["points"].split()]


# --- numbers in records ------------------------------------------------------------------------

def test_numbers_travel_through_strict_json_nan_and_infinities_included():
    values = [1.23456789, 0.0, -2.5e-12, float("nan"), float("inf"), float("-inf"), None]
    encoded = json.loads(json.dumps([plots.encode_number(v) for v in values], allow_nan=False))
    decoded = [plots.decode_number(v) for v in encoded]
    assert decoded[0] == 1.23457 and decoded[1] == 0.0 and decoded[2] == -2.5e-12
    assert math.isnan(decoded[3]) and decoded[4] == float("inf") and decoded[5] == float("-inf")
    assert decoded[6] is None
    assert [plots.decode_number(v) for v in ("1.5", True, [1], {})] == [None] * 4  # not ours: unreadable


# --- curves: loss and divergence per step ------------------------------------------------------

def curves(loss, reference, divergence):
    return {"loss": [plots.encode_number(v) for v in loss],
            "reference_loss": [plots.encode_number(v) for v in reference],
            "divergence": [plots.encode_number(v) for v in divergence]}


def test_curves_draw_both_losses_and_the_divergence_with_the_tolerance_line():
    root = parse(plots.curves_svg(curves([3.0, 2.0, 1.0], [3.0, 2.5, 2.0], [0.0, 0.5, 40.0])))
    technique, = find(root, "polyline", "technique-loss")
    reference, = find(root, "polyline", "reference-loss")
    divergence, = find(root, "polyline", "divergence")
    assert len(points(technique)) == len(points(reference)) == len(points(divergence)) == 3
    assert len(find(root, "circle")) == 9  # one dot per value, each with its value as a tooltip
    assert "technique loss, step 3: 1" in [t.text for t in root.iter(SVG + "title")]
    # larger values sit higher (smaller y); the loss axis spans the values
    tech_y = [y for _, y in points(technique)]
    assert tech_y[0] < tech_y[1] < tech_y[2]
    div_y = [y for _, y in points(divergence)]
    tolerance, = find(root, "line", "tolerance")
    assert div_y[2] < float(tolerance.attrib["y1"]) < div_y[1] < div_y[0]  # 40 above the tolerance, 0.5 below
    labels = texts(root)
    assert {"loss per step", "divergence per step (tolerance units)", "step 1", "step 3", "3", "1",
            "technique", "reference", "tolerance"} <= set(labels)


def test_curves_break_at_nan_and_infinities_and_survive_huge_values():
    loss = [1.0, float("nan"), 1e300, float("inf"), 2.0, 1.0]
    root = parse(plots.curves_svg(curves(loss, [1.0] * 6, [0.0, 1e6, float("inf"), 1e308, 0.0, 0.0])))
    technique = find(root, "polyline", "technique-loss")
    assert [len(points(p)) for p in technique] == [2]  # 2.0 -> 1.0; the NaN and inf break the line
    markers = [t.text for p in find(root, "path", "nonfinite") for t in p.iter(SVG + "title")]
    assert "technique loss, step 2: NaN" in markers and "technique loss, step 4: inf" in markers
    assert "divergence, step 3: inf" in markers
    assert "1e308" in texts(root)  # the log axis reaches the largest divergence
    assert "1e+300" in texts(root)  # a huge loss still gets an axis


def test_curves_of_a_single_step_with_zero_divergence():
    root = parse(plots.curves_svg(curves([0.5], [0.5], [0.0])))
    assert find(root, "polyline") == []  # nothing to join
    assert len(find(root, "circle")) == 3
    assert "step 1" in texts(root) and "step 2" not in texts(root)
    dot = [c for c in find(root, "circle") if c.find(SVG + "title").text.startswith("divergence")][0]
    tolerance, = find(root, "line", "tolerance")
    assert float(dot.attrib["cy"]) > float(tolerance.attrib["y1"])  # zero sits on the floor, under tolerance


def test_curves_of_a_crashed_run_show_the_reference_alone():
    root = parse(plots.curves_svg({"loss": [1.0, None], "reference_loss": [1.0, 0.5], "divergence": []}))
    assert len(find(root, "polyline", "reference-loss")) == 1 and find(root, "polyline", "technique-loss") == []


@pytest.mark.parametrize("data", [None, {}, {"loss": []}, "garbage", {"loss": "abc"}])
def test_no_curves_without_steps(data):
    assert plots.curves_svg(data) == ""


# --- the model tree ----------------------------------------------------------------------------

def linear(path):
    return Layer(path, "linear", (("bias", True), ("in_features", 2), ("out_features", 2)))


def test_outline_lists_modules_in_call_order_with_what_the_intent_does():
    # declared out of call order: the tree sorts by path, the drawing follows the forward
    arch = chain((2,), [linear("fc"), linear("enc.lin"), linear("enc.out"), linear("pre")],
                 ["pre", "enc.lin", "enc.out", "pre", "fc"])
    intent = Intent(frozen_modules=("enc",), pass_through=(("pre", 1),),
                    frozen_elements=(("fc.weight", ((0, 0), (1, 1))),))
    rows = plots.outline(architecture_tree(arch), intent)["rows"]
    assert [r["path"] for r in rows] == ["", "pre", "enc", "enc.lin", "enc.out", "fc"]
    marks = {r["path"]: (r["mark"], r["note"]) for r in rows}
    assert marks["enc"] == ("frozen", "") and marks["enc.lin"] == ("in-frozen", "")
    assert marks["pre"] == ("pass-through", "call 2 of 2 passes through")
    assert marks["fc"] == ("elements", "2 entries of weight frozen") and marks[""] == ("", "")
    arch = chain((2,), [linear("a"), linear("b")], ["a", "b"])
    rows = plots.outline(architecture_tree(arch), Intent(reparameterized=("b",)), cap=2)
    assert [r["mark"] for r in rows["rows"]] == ["", ""] and rows["omitted"] == 1


def test_outline_places_an_uncalled_container_before_its_first_called_child():
    tree = ModelTree((Node("", "model", (), 1), Node("blocks", "ModuleList"), Node("blocks.0", "linear", (), 1),
                      Node("blocks.1", "linear", (), 1), Node("head", "linear", (), 1), Node("spare", "linear")),
                     (("head", 0), ("blocks.0", 0), ("blocks.1", 0)))
    rows = plots.outline(tree, Intent(frozen_modules=("blocks",)))["rows"]
    assert [r["path"] for r in rows] == ["", "head", "blocks", "blocks.0", "blocks.1", "spare"]
    root = parse(plots.tree_svg({"rows": rows}))
    assert "blocks  ModuleList  (not called itself)" in texts(root)


def test_tree_drawing_colours_isolated_modules_and_has_a_legend():
    rows = [{"path": "", "kind": "model", "calls": 1, "mark": "", "note": ""},
            {"path": "enc", "kind": "block", "calls": 1, "mark": "frozen", "note": ""},
            {"path": "enc.lin", "kind": "linear", "calls": 1, "mark": "in-frozen", "note": ""},
            {"path": "fc", "kind": "linear", "calls": 2, "mark": "pass-through", "note": "call 2 of 2 passes through"},
            {"path": "out", "kind": "linear", "calls": 1, "mark": "reparameterized", "note": ""},
            {"path": "el", "kind": "linear", "calls": 1, "mark": "elements", "note": "1 entry of weight frozen"}]
    root = parse(plots.tree_svg({"rows": rows, "omitted": 3}))
    groups = {e.find(SVG + "title").text.split(":")[0]: e.attrib["class"] for e in find(root, "g", "module")}
    assert groups == {"(model)": "module plain", "enc": "module frozen", "enc.lin": "module in-frozen",
                      "fc": "module pass-through", "out": "module reparameterized", "el": "module elements"}
    labels = texts(root)
    assert {"frozen", "inside a frozen module", "pass-through call", "element-frozen", "reparameterized",
            "trains normally"} <= set(labels)
    assert "fc  linear  ×2" in labels and "call 2 of 2 passes through" in labels
    assert "... 3 more modules not drawn" in labels
    assert len(find(root, "path")) == 5  # a connector from each module to its parent


@pytest.mark.parametrize("data", [None, {}, {"rows": []}, {"rows": "x"}, {"rows": [{"kind": "linear"}]}])
def test_no_tree_without_rows(data):
    assert plots.tree_svg(data) == ""


def test_every_string_is_escaped():
    evil = 'x"><script>alert(1)</script>&'
    svg = plots.tree_svg({"rows": [{"path": evil, "kind": evil, "calls": 1, "mark": evil, "note": evil}]},
                         title=evil)
    svg += plots.timeline_svg({"phases": "g", "outcomes": ".", "divergence": [0]}, title=evil)
    svg += plots.curves_svg(curves([1.0], [1.0], [0.0]), title=evil)
    assert "<script" not in svg and "&lt;script&gt;" in svg
    for part in re.findall(r"<svg.*?</svg>", svg):
        parse(part)


# --- the timeline of a search ------------------------------------------------------------------

def test_timeline_marks_each_example_by_outcome_over_phase_bands():
    examples = [JudgedExample("trigger", "held", 0.0), JudgedExample("trigger", "held", 0.2),
                JudgedExample("generated", "held", 0.5), JudgedExample("generated", "violated", 50.0),
                JudgedExample("shrinking", "violated", 1e9), JudgedExample("shrinking", "held", 0.0)]
    data = plots.history_data(examples, omitted=4, invalid=2)
    assert data["phases"] == "ttggss" and data["outcomes"] == "...xx."
    root = parse(plots.timeline_svg(json.loads(json.dumps(data, allow_nan=False))))
    assert len(find(root, "circle", "held")) == 4 and len(find(root, "path", "violated")) == 2
    assert [b.attrib["class"] for b in find(root, "rect", "phase")] == ["phase trigger", "phase generated",
                                                                         "phase shrinking"]
    xs = [float(c.attrib["cx"]) for c in find(root, "circle", "held")]
    assert xs == sorted(xs)  # in the order judged
    violated_y = [float(re.match(r"M[-0-9.]+,([-0-9.]+)", p.attrib["d"]).group(1)) for p in
                  find(root, "path", "violated")]
    assert violated_y[1] < violated_y[0]  # 1e9 higher than 50
    assert "y: divergence (log); 4 later examples not drawn; 2 invalid draws (not judged)" in texts(root)


@pytest.mark.parametrize("data", [None, {}, {"phases": "", "outcomes": ""}, {"phases": 3, "outcomes": "."}])
def test_no_timeline_without_examples(data):
    assert plots.timeline_svg(data) == ""


def test_a_timeline_of_one_example():
    root = parse(plots.timeline_svg({"phases": "t", "outcomes": "x", "divergence": ["inf"]}))
    assert len(find(root, "path", "violated")) == 1 and "1" in texts(root)
    assert "y: divergence (log)" in texts(root)  # no invalid count claimed where none was recorded


# --- the data behind them: judging and the search ----------------------------------------------

def scenario(intent, recipe, steps=3):
    return Scenario(chain((2,), [linear("pre"), linear("enc"), linear("fc")], ["pre", "enc", "fc"]), intent, recipe,
                    Data(batch=3, seed=1, input_requires_grad=True, loss="mse"), steps=steps, dtype="float64")


def test_a_verdict_keeps_both_losses_and_the_divergence_per_step():
    sound = judge(iso.catalog()["freeze_and_eval"], scenario(Intent(frozen_modules=("enc",)),
                                                             OptimizerRecipe("SGD", (("lr", 0.1),))))
    assert sound.ok and sound.steps == ()  # nothing to show: an example that holds does not pay for it
    # restoring frozen entries after the step is wrong under gradient-norm clipping: they took part in the norm
    bad = judge(iso.catalog()["restore_after_step"], scenario(
        Intent(frozen_elements=(("fc.weight", ((0, 0), (0, 1), (1, 0))),)),
        OptimizerRecipe("SGD", (("lr", 1.0),), clip="norm", clip_value=0.01)))
    assert bad.invariants == ("matches-reference",) and len(bad.steps) == 3
    assert max(p.divergence for p in bad.steps) == bad.divergence > 1
    assert all(p.divergence > 1 for p in bad.steps)
    assert bad.steps[0].loss == bad.steps[0].reference_loss  # the first forward is the same model
    assert bad.steps[1].loss != bad.steps[1].reference_loss  # then the runs part
    assert bad.steps[0].reference_loss > bad.steps[-1].reference_loss  # training lowers the loss
    assert [isinstance(p, StepPoint) for p in bad.steps] == [True] * 3


def test_step_points_of_a_crashed_run_keep_the_reference_and_leave_the_rest_empty():
    import copy

    from isolation_suite.judging.judge import step_points
    from isolation_suite.execution.reference import Reference
    from isolation_suite.execution.runner import run
    from isolation_suite.execution.trace import Crash
    reference = run(scenario(Intent(frozen_modules=("enc",)), OptimizerRecipe("SGD", (("lr", 0.1),))), Reference())
    crashed = copy.deepcopy(reference)
    crashed.steps = crashed.steps[:1]
    crashed.crash = Crash(2, "forward", "RuntimeError: boom", "")
    points = step_points(crashed, reference, [])
    assert [p.loss is None for p in points] == [False, True, True]
    assert [p.reference_loss for p in points] == pytest.approx([float(s.losses[0]) for s in reference.steps])
    assert {p.divergence for p in points} == {None}
    root = parse(plots.curves_svg(plots.steps_data(points)))
    assert len(find(root, "polyline", "reference-loss")) == 1 and find(root, "polyline", "divergence") == []


def test_a_search_keeps_every_judged_example_in_order_up_to_a_cap(monkeypatch):
    sound = search(iso.catalog()["freeze_and_eval"], max_examples=4)
    assert "".join(e.phase[0] for e in sound.history) == "t" * sound.explicit + "g" * 4
    assert {e.outcome for e in sound.history} == {"held"}
    bad = search(iso.catalog()["restore_after_step"], max_examples=4)
    assert [e.outcome for e in bad.history][-1] == "violated" and len(bad.history) == bad.judged
    assert bad.history[-1].divergence == bad.failure.divergence
    check_mod = __import__("sys").modules["isolation_suite.engine.check"]
    monkeypatch.setattr(check_mod, "HISTORY_CAP", 3)
    capped = search(iso.catalog()["freeze_and_eval"], max_examples=4)
    assert len(capped.history) == 3 and capped.history_omitted == capped.judged - 3
    assert HISTORY_CAP >= 100


def test_invalid_draws_are_counted_from_hypothesis_statistics():
    from isolation_suite.engine.check import invalid_draws
    stats = {"generate-phase": {"test-cases": [{"status": "valid"}, {"status": "overrun"}, {"status": "invalid"}]},
             "shrink-phase": {"test-cases": [{"status": "interesting"}, {"status": "invalid"}]}, "nodeid": "x"}
    assert invalid_draws(stats) == 3
    assert invalid_draws({"generate-phase": {"test-cases": [{"status": "valid"}]}}) == 0
    assert invalid_draws({"generate-phase": None}) == 0  # another format: nothing claimed


def test_a_record_keeps_the_picture_data_and_an_older_record_still_renders():
    technique = iso.catalog()["restore_after_step"]
    bad = record(search(technique, max_examples=4), technique, 1.0, None)
    assert len(bad["steps"]["loss"]) == bad["scenario"]["steps"] and bad["model_tree"]["rows"][0]["path"] == ""
    assert bad["history"]["outcomes"].endswith("x")
    json.dumps(bad, allow_nan=False)  # strict JSON: NaN and infinities travel as strings
    old = {k: v for k, v in bad.items() if k not in ("steps", "model_tree", "history")}
    old["item"] = old["item"] + "-old"
    page = html_report({"run_id": "r", "complete": True, "ok": True, "meta": {}, "results": [bad, old],
                        "matrix": matrix([bad])})
    assert page.count('class="curves"') == 1 and page.count('class="tree"') == 1
    assert page.count('class="timeline"') == 1 and page.count('class="counterexample"') == 2
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
