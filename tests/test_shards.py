"""Fanning a fuzz run out: ``--shard I/N`` and ``merge``."""
import json
import subprocess
import sys

import pytest

from isolation_suite.engine.settings import FUZZ, SettingError, Shard, settings

ITEMS = [f"t{i}[CAP-cpu]" for i in range(11)]


def test_shards_split_the_items_deterministically_and_evenly():
    for count in (1, 2, 3, 4, 11, 13):
        parts = [Shard(i, count).select(reversed(ITEMS)) for i in range(1, count + 1)]
        assert sorted(x for p in parts for x in p) == sorted(ITEMS)  # every item once
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
        assert parts == [Shard(i, count).select(ITEMS) for i in range(1, count + 1)]  # order does not matter


@pytest.mark.parametrize("text", ["0/2", "3/2", "a/b", "2", "1/0", ""])
def test_a_bad_shard_spec_is_one_clear_error(text):
    with pytest.raises(SettingError, match="^--shard "):
        settings({"shard": text}, FUZZ)


def _cli(*args):
    return [sys.executable, "-c", "import sys; from isolation_suite.cli import main; sys.exit(main())", *args]


TECHNIQUES = "no_grad_call,functional_detach,weight_dropout_data,freeze_and_eval,tensor_hook_mask"


def _fuzz_args(report_dir, *extra):
    return _cli("fuzz", "--techniques", TECHNIQUES, "--profile", "isolation-ci", "--max-examples", "5",
                "--budget", "120", "--workers", "1", "--devices", "cpu", "--report-dir", report_dir, *extra)


def _fuzz_together(cwd, *runs):
    """Several fuzz runs at once (each mostly starts processes), their completed runs in order."""
    started = [subprocess.Popen(_fuzz_args(*run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=cwd) for run in runs]
    done = []
    for proc in started:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _verdicts(summary):
    return ({r["item"]: (r["outcome"], tuple(v["invariant"] for v in r["violations"])) for r in summary["results"]},
            {t: {inv: cell["verdict"] for inv, cell in row.items()} for t, row in summary["matrix"].items()})


def _summary(folder):
    run_dir = folder / (folder / "LATEST").read_text().strip()
    return json.loads((run_dir / "summary.json").read_text())


def test_two_shards_and_merge_give_what_one_run_gives(tmp_path):
    _, *shard_runs = _fuzz_together(tmp_path, ("whole",), *[(f"shard{i}", "--shard", f"{i}/2") for i in (1, 2)])
    assert "(shard 1/2 of 5 items)" in shard_runs[0].stdout and "--shard 1/2" in shard_runs[0].stdout
    # the live view, as plain lines off a terminal: one per finished item, the last one complete
    assert "progress: 1/3 items, " in shard_runs[0].stdout and "progress: 3/3 items, " in shard_runs[0].stdout
    assert "progress: 2/2 items, " in shard_runs[1].stdout
    merged = subprocess.run(_cli("merge", "shard1", "shard2", "--report-dir", "merged"), capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    whole, combined = _summary(tmp_path / "whole"), _summary(tmp_path / "merged")
    assert combined["ok"] and combined["complete"] and combined["meta"]["shards"] == ["1/2", "2/2"]
    assert _verdicts(combined) == _verdicts(whole)
    # the merged report draws what the shards recorded: a timeline per search, curves per counterexample
    page = (tmp_path / "merged" / (tmp_path / "merged" / "LATEST").read_text().strip() / "report.html").read_text()
    assert page.count('class="timeline"') == 5
    assert page.count('class="curves"') == sum(bool(r["violations"]) for r in combined["results"]) > 0
    shards = [_summary(tmp_path / f"shard{i}") for i in (1, 2)]
    assert sorted(len(s["results"]) for s in shards) == [2, 3]
    # a missing shard: the merged report says which, and does not pass
    partial = subprocess.run(_cli("merge", "shard1", "--report-dir", "partial"), capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
    assert partial.returncode == 1 and "missing shard(s) 2/2" in partial.stdout, partial.stdout
    assert not _summary(tmp_path / "partial")["ok"]


def test_merge_of_a_folder_without_a_report_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    run = subprocess.run(_cli("merge", "empty"), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a run folder" in lines[0]


def test_plugin_runs_only_its_shard_and_rejects_a_bad_one(pytester):
    args = ["--isolation-technique", "functional_detach", "--isolation-technique", "freeze_and_eval",
            "--isolation-devices", "cpu", "--isolation-max-examples", "3"]
    result = pytester.runpytest_subprocess(*args, "--isolation-shard", "2/2", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*functional_detach[[]PASS_THROUGH-cpu[]]*"])
    assert "freeze_and_eval" not in result.stdout.str()
    bad = pytester.runpytest_subprocess(*args, "--isolation-shard", "5/2")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR and "INTERNALERROR" not in bad.stdout.str() + bad.stderr.str()
    bad.stderr.fnmatch_lines(["*--isolation-shard*I must be between 1 and N*"])


# --- the live view -----------------------------------------------------------------------------

def test_progress_text_counts_items_examples_rate_violations_and_time_left():
    from isolation_suite.reporting.live import progress_text
    records = [{"explicit_examples": 2, "examples": 60, "shrink_examples": 0, "violations": []},
               {"explicit_examples": 1, "examples": 0, "shrink_examples": 7, "violations": [{"invariant": "x"}]},
               {"explicit_examples": 0, "examples": 0, "shrink_examples": 0, "violations": [], "outcome": "error"}]
    assert progress_text(records, 18, started=100.0, deadline=170.0, now=110.0) == (
        "3/18 items, 70 examples (7.0/s), 2 with violations, 60s left")
    empty = progress_text([], 4, started=0.0, deadline=None, now=1.0)
    assert empty == "0/4 items, 0 examples (0.0/s), 0 with violations"


def test_live_view_draws_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch):
    import io

    from isolation_suite.reporting.live import LiveView
    lines = []
    plain = LiveView(2, None, lines.append, interactive=False)
    plain.update([{"examples": 5}])
    plain.update([{"examples": 5}])  # nothing new: nothing printed
    plain.update([{"examples": 5}, {"examples": 3}])
    assert [line.split(" examples")[0] for line in lines] == ["progress: 1/2 items, 5", "progress: 2/2 items, 8"]
    screen = io.StringIO()
    monkeypatch.setattr("sys.stderr", screen)
    bar = LiveView(2, None, lines.append, interactive=True)
    bar.update([{"examples": 5}, {"examples": 3}])
    bar.close()
    assert "2/2" in screen.getvalue() and "8 examples" in screen.getvalue() and len(lines) == 2
