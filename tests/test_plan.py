"""One run plan: settings declared once, typed items, a fingerprint, and a merge that cannot lose an item."""
import json
import subprocess
import sys
import time

import pytest

from isolation_suite.cli import main
from isolation_suite.engine.plan import Item, Plan, items_of, make_plan
from isolation_suite.engine.runs import load_techniques
from isolation_suite.engine.settings import CHECK, FUZZ, PYTEST, OPTIONS, SettingError, Shard, settings
from isolation_suite.reporting.merge import MergeError, merge


# --- settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field, text", [("timeout", "nan"), ("timeout", "inf"), ("timeout", "-1"), ("budget", "nan"),
                                         ("budget", "inf"), ("budget", "0"), ("max_examples", "1.5"),
                                         ("modes", ""), ("modes", " , "), ("shard", "3/2"), ("workers", "0"),
                                         ("profile", "bogus"), ("seed", "-3")])
def test_a_bad_value_is_one_line_naming_the_option(field, text):
    with pytest.raises(SettingError) as info:
        settings({field: text}, FUZZ, environ={})
    message = str(info.value)
    assert "\n" not in message and repr(text) in message
    option = next(o for o in OPTIONS if o.field == field)
    assert message.startswith(option.cli)


@pytest.mark.parametrize("env, text", [("ISOLATION_TIMEOUT", "abc"), ("ISOLATION_PROFILE", "bogus"),
                                       ("ISOLATION_MODES", ""), ("ISOLATION_DATABASE_READONLY", "maybe")])
def test_a_bad_environment_variable_is_one_line_naming_it(env, text):
    with pytest.raises(SettingError, match=f"^{env}={text!r}"):
        settings({}, CHECK, environ={env: text})


def test_the_command_line_wins_over_the_environment_and_defaults_differ_by_surface():
    chosen = settings({"timeout": "5"}, CHECK, environ={"ISOLATION_TIMEOUT": "9", "ISOLATION_MODES": "eager"})
    assert chosen.timeout == 5.0 and chosen.modes == ("eager",)
    assert settings({}, CHECK, environ={}).devices == ("cpu",)
    assert settings({}, FUZZ, environ={}).devices == ("auto",) and settings({}, FUZZ, environ={}).budget == 120.0
    assert settings({"techniques": ["a", "b,c"]}, PYTEST, environ={}).techniques == ("a", "b", "c")


@pytest.mark.parametrize("argv", [["check", "functional_detach", "--timeout", "nan"],
                                  ["fuzz", "--budget", "inf"], ["fuzz", "--modes", ""],
                                  ["check", "functional_detach", "--budget", "nan"]])
def test_the_cli_says_one_line_and_exits_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("isolation-suite: error: ")
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("env, text", [("ISOLATION_TIMEOUT", "abc"), ("ISOLATION_PROFILE", "bogus")])
def test_the_cli_checks_the_environment_too(env, text, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(env, text)
    assert main(["check", "functional_detach"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and env in err


def test_a_database_under_a_file_is_refused_before_anything_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert main(["check", "functional_detach", "--database", str(tmp_path / "afile" / "db")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and len(err.strip().splitlines()) == 1


def test_the_plugin_rejects_a_bad_number_as_a_usage_error(pytester):
    result = pytester.runpytest_subprocess("--isolation-technique", "functional_detach", "--isolation-timeout", "nan")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--isolation-timeout 'nan': must be positive (a finite number above 0)*"])
    assert "Traceback" not in result.stderr.str()


def test_a_pytest_session_without_the_gate_imports_neither_torch_nor_the_engine(pytester, monkeypatch):
    """Installed, the plug-in loads in every pytest session: it must cost nothing there."""
    monkeypatch.delenv("ISOLATION_PROFILE", raising=False)
    pytester.makeconftest("import sys\n"
                          "def pytest_collection_finish(session):\n"
                          "    heavy = [m for m in ('torch', 'isolation_suite.engine.runs', 'isolation_suite.pytest_gate')\n"
                          "             if m in sys.modules]\n"
                          "    print('HEAVY', heavy)\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-s")  # the plug-in arrives through its entry point
    result.stdout.fnmatch_lines(["HEAVY []"])
    assert result.ret == 0


# --- items and plans -----------------------------------------------------------------------------

def test_an_item_names_itself_once_for_every_use():
    item = Item("tech", "FREEZE_MODULE", "cpu", "compile", "pkg.mod:Tech")
    assert item.name == "tech[FREEZE_MODULE-cpu-compile]"
    assert item.key == "tech-FREEZE_MODULE-cpu-compile"
    assert item.group == "sweep[FREEZE_MODULE-cpu-compile]"
    assert item.weight > Item("tech", "FREEZE_MODULE", "cpu").weight  # a compiled item gets more time
    assert Item("tech", "FREEZE_MODULE", "cpu").name == "tech[FREEZE_MODULE-cpu]"


def _plan(specs=("functional_detach", "no_grad_call", "freeze_and_eval"), **given):
    chosen = settings({"techniques": list(specs), **given}, FUZZ, environ={})
    techniques = load_techniques(chosen.techniques)
    return make_plan(chosen, techniques, ("cpu",), ("eager", "checkpoint"), chosen.seed)


def test_a_plan_travels_as_data_and_its_shards_share_one_fingerprint():
    whole = _plan(seed="7")
    assert Plan.from_json(whole.to_json()) == whole
    shards = [_plan(seed="7", shard=f"{i}/3") for i in (1, 2, 3)]
    assert len({s.fingerprint for s in shards}) == 1 and shards[0].fingerprint != whole.fingerprint  # shard count
    assert sorted(i for s in shards for i in s.items) == sorted(whole.every)  # every item exactly once
    assert _plan(("functional_detach", "no_grad_call"), seed="7", shard="1/3").fingerprint != shards[0].fingerprint
    assert _plan(seed="8", shard="1/3").fingerprint != shards[0].fingerprint  # a given seed is part of the plan
    assert _plan(seed=None, shard="1/3").fingerprint == _plan(seed=None, shard="2/3").fingerprint  # drawn ones not


def test_items_of_cover_every_capability_device_and_mode():
    techniques = load_techniques(["functional_detach", "freeze_and_eval"])
    items = items_of(techniques, ("cpu", "cuda"), ("eager", "ddp"))
    assert len(items) == 2 * 2 * 2 and len({i.name for i in items}) == len(items)


# --- merge ------------------------------------------------------------------------------------

def _shard_report(folder, plan: Plan, skip=(), complete=True, seed=None):
    """A shard's report as fuzz writes it: the summary with its plan, one record per item."""
    (folder / "results").mkdir(parents=True)
    for item in plan.items:
        if item.key in skip:
            continue
        record = {"item": item.key, "technique": item.technique, "capabilities": [item.capability],
                  "device": item.device, "mode": item.mode, "passed": True, "outcome": "held", "plan": plan.fingerprint,
                  "expected": [], "violations": [], "invariant_counts": {}, "scenario": None, "repro": None}
        (folder / "results" / f"{item.key}.json").write_text(json.dumps(record))
    summary = {"complete": complete, "meta": {"plan": plan.summary()}, "results": []}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_merge_needs_every_planned_item_exactly_once(tmp_path):
    shards = [_plan(seed="3", shard=f"{i}/2") for i in (1, 2)]
    a, b = (_shard_report(tmp_path / f"s{i}", s) for i, s in enumerate(shards))
    meta, problems = merge([a, b], tmp_path / "out")
    assert problems == [] and meta["seeds"] == [3] and len(list((tmp_path / "out" / "results").iterdir())) == 6
    _, problems = merge([a], tmp_path / "out1")  # a shard missing
    assert any("missing shard(s) 2/2" in p for p in problems) and any("no valid record" in p for p in problems)
    victim = next((b / "results").iterdir())
    victim.write_text(victim.read_text()[:20])  # truncated
    _, problems = merge([a, b], tmp_path / "out2")
    assert problems and victim.stem in problems[-1]
    victim.unlink()  # deleted
    _, problems = merge([a, b], tmp_path / "out3")
    assert problems and victim.stem in problems[-1]


def test_merge_counts_a_record_of_another_plan_as_missing(tmp_path):
    mine, other = _plan(seed="3", shard="1/2"), _plan(seed="4", shard="2/2")
    a = _shard_report(tmp_path / "a", mine)
    b = _shard_report(tmp_path / "b", _plan(seed="3", shard="2/2"))
    for path in (b / "results").iterdir():  # records a stale run left behind
        path.write_text(path.read_text().replace(mine.fingerprint, other.fingerprint))
    _, problems = merge([a, b], tmp_path / "out")
    assert any("no valid record" in p for p in problems)


def test_merge_refuses_shards_of_different_plans_and_things_that_are_not_reports(tmp_path):
    a = _shard_report(tmp_path / "a", _plan(seed="3", shard="1/2"))
    b = _shard_report(tmp_path / "b", _plan(("functional_detach",), seed="3", shard="2/2"))
    with pytest.raises(MergeError, match="different plans"):
        merge([a, b], tmp_path / "out")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "summary.json").write_text("[1, 2]")
    with pytest.raises(MergeError, match="not the report of a planned run"):
        merge([tmp_path / "c"], tmp_path / "out")
    # the command says so in one line and leaves no empty run folder behind
    from isolation_suite.cli import main
    assert main(["merge", str(a), str(b), "--report-dir", str(tmp_path / "merged")]) == 2
    assert [p for p in (tmp_path / "merged").iterdir() if p.is_dir()] == []


def test_an_empty_shard_writes_a_valid_report_that_merge_accepts(tmp_path):
    cli = [sys.executable, "-c", "import sys; from isolation_suite.cli import main; sys.exit(main())"]
    done = subprocess.run(cli + ["fuzz", "--techniques", "functional_detach", "--devices", "cpu", "--modes", "eager",
                                 "--shard", "3/5", "--seed", "1", "--report-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    latest = tmp_path / "r" / (tmp_path / "r" / "LATEST").read_text().strip()
    summary = json.loads((latest / "summary.json").read_text())
    assert summary["complete"] and summary["ok"] and summary["meta"]["plan"]["items"] == []
    assert summary["meta"]["plan"]["every"] == ["functional_detach-PASS_THROUGH-cpu"]


def test_shards_are_dealt_by_name():
    assert Shard(2, 3).select(["c", "a", "b", "d"]) == ["b"]
