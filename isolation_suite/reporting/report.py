"""Reports: ``summary.json``, ``summary.md``, ``report.html`` and ``repro/*.py`` in one run folder.

Each finished search writes its own record under ``results/`` (so parallel
workers never share a file); the summary files are rebuilt from those records
after every record and written atomically, so an interrupted run still leaves
a valid report of what finished.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Iterable

from isolation_suite.reporting import plots
from isolation_suite import __version__
from isolation_suite.execution.modes import MODE_INFOS
from isolation_suite.engine.check import SearchResult, seed_text
from isolation_suite.engine.plan import record_key
from isolation_suite.judging.coverage import coverage_line
from isolation_suite.judging.invariants import DEVICE_PARITY, INVARIANTS
from isolation_suite.model.factory import tree_of
from isolation_suite.reporting.repro import write_repro
from isolation_suite.spec.scenario import Scenario
from isolation_suite.spec.mode_kinds import DEFAULT as DEFAULT_MODE
from isolation_suite.technique import Technique
from isolation_suite.techniques.library import library_modes, library_rows


class ReportDirError(ValueError):
    """The report folder cannot be created or written; the message says why in one line."""


def ensure_writable(directory: Path) -> Path:
    """Create ``directory`` and prove a file can be written there, before any search starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ReportDirError(f"cannot write reports into {directory}: {exc.strerror or exc}") from None
    return directory


def run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def environment(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import hypothesis
    import torch

    meta = {
        "isolation_suite": __version__, "torch": torch.__version__, "hypothesis": hypothesis.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    meta.update(extra or {})
    return meta


def outcome(result: SearchResult, expected: Iterable[str]) -> tuple[str, bool]:
    """(``held`` | ``caught`` | ``violated`` | ``missed`` | ``n/a``, passed) against the technique's
    expectation; ``n/a``: the user's model offers no place for the capability, nothing was judged."""
    expected = frozenset(expected)
    if result.not_applicable:
        return "n/a", True
    if result.failure is None:
        return ("held", True) if not expected else ("missed", False)
    if not expected:
        return "violated", False
    return ("caught", True) if result.failure.first.invariant in expected else ("violated", False)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def reason(status: str, result: SearchResult, expected: Iterable[str]) -> str:
    """Why an item passed or failed, in one line a reader can act on."""
    if status == "n/a":
        return f"not applicable: {result.not_applicable}"
    judged = f"{result.explicit} trigger{coverage_text(result)} and {result.examples} generated examples" + (
        f" ({result.unrunnable} left out: the reference cannot train the model that way)" if result.unrunnable else "")
    if status == "missed":
        return (f"expected violation ({', '.join(sorted(expected))}) not found in {judged} "
                f"({seed_text(result.seed)})")
    if status == "held":
        return f"no violation in {judged}"
    first = result.failure.first
    how = {"explicit": "a trigger example", "coverage": "a coverage example"}.get(
        result.found_by or "", f"the search ({seed_text(result.seed)})")
    if status == "caught":
        return f"caught as expected by {how}: {first.invariant}"
    return f"{first.invariant} (not expected), found by {how}: {first.message}"


def coverage_text(result: SearchResult) -> str:
    """``, 39 coverage (freeze targets judged: 39 of 39)``: a user's model's coverage, else ""."""
    if not result.coverage:
        return ""
    return f", {result.coverage_examples} coverage ({coverage_line(result.coverage)})"


def record(result: SearchResult, technique: Technique, seconds: float, run_dir: Path | None,
           spec: str | None = None, sweep: str | None = None, plan: str | None = None) -> dict[str, Any]:
    """One search as JSON; with ``run_dir`` also writes its record file and repro script.

    ``spec`` is how the technique is imported (``pkg.module:attr`` or a catalog name), so
    ``isolation-suite repro RECORD`` can load it again without ``--technique``. ``sweep`` names the
    sweep the result came from (``seconds`` is then the whole sweep's).
    """
    expected = technique.expected_in(result.mode)
    status, passed = outcome(result, expected)
    data: dict[str, Any] = {
        **_identity(technique, [c.value for c in result.capabilities], result.device, result.mode),
        "spec": spec or technique.name, "outcome": status, "passed": passed,
        "reason": reason(status, result, expected),
        "explicit_examples": result.explicit, "examples": result.examples, "max_examples": result.max_examples,
        "shrink_examples": result.shrink_examples, "seed": result.seed, "budget": result.budget,
        "coverage_examples": result.coverage_examples,
        "unrunnable": result.unrunnable, "unrunnable_why": result.unrunnable_why, "timeout": result.timeout,
        "coverage": {name: list(counts) for name, counts in result.coverage.items()},
        "seconds": round(seconds, 3), "found_by": result.found_by, "first_failure_at": result.first_failure_at,
        "sandbox": result.sandbox, "model": result.model, "parity_not_judged": result.parity_not_judged,
        "budget_reached": result.budget_reached, "invariant_counts": result.invariant_counts,
        "violations": [], "scenario": None, "repro": None, "sweep": sweep, "plan": plan,
        "history": plots.history_data(result.history, result.history_omitted, result.invalid_draws),
    }
    if result.database_ops:  # a shared example database was in use
        data["database_ops"], data["database_warning"] = result.database_ops, result.database_warning
    if result.failure is not None:
        data["violations"] = [{"invariant": v.invariant, "message": v.message} for v in result.failure.violations]
        data["scenario"] = result.failure.scenario.to_dict()
        data["steps"] = plots.steps_data(result.failure.steps)
        data["model_tree"] = _model_outline(result.failure.scenario)
    if run_dir is not None:
        run_dir = Path(run_dir)
        if result.failure is not None:
            rel = Path("repro") / f"{_slug(data['item'])}.py"
            try:
                write_repro(run_dir / rel, technique, result.failure.scenario, result.device,
                            str(result.failure.first), result.timeout)
                data["repro"] = str(rel)
            except ValueError as exc:  # a plug-in whose source cannot be read
                data["repro_error"] = str(exc)
        _write_record(run_dir, data)
    return data


def _model_outline(scenario: Scenario) -> dict[str, Any] | None:
    """The minimal model's module tree for the report's drawing; None when it cannot be had (a user's
    factory that no longer imports): the report then goes without the drawing."""
    try:
        return plots.outline(tree_of(scenario), scenario.intent)
    except Exception:  # noqa: BLE001 - a drawing is never worth losing the record
        return None


def _identity(technique: Technique, capabilities: Iterable[str], device: str, mode: str = DEFAULT_MODE) -> dict[str, Any]:
    """The fields that name a record's item; every record starts with them."""
    caps = sorted(capabilities)
    return {"item": record_key(technique.name, caps, device, mode),
            "technique": technique.name, "capabilities": caps, "device": device, "mode": mode,
            "expected": sorted(technique.expected_in(mode))}


def record_path(run_dir: Path, item: str) -> Path:
    """Where the record of ``item`` (its record key) is written."""
    return Path(run_dir) / "results" / f"{_slug(item)}.json"


def _write_record(run_dir: Path, data: dict[str, Any]) -> None:
    path = record_path(run_dir, data["item"])
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(data, indent=2, sort_keys=True))


def error_record(run_dir: Path, technique: Technique, capabilities: Iterable[str], device: str,
                 error: str, spec: str | None = None, outcome: str = "error", mode: str = DEFAULT_MODE,
                 plan: str | None = None) -> dict[str, Any]:
    """The record of an item that ended without a verdict: its worker died (a segfault in a
    kernel, out of memory), the harness itself failed, or (``not-run``) the run's time was spent
    before it started. It fails the run; it is never a pass."""
    data: dict[str, Any] = {
        **_identity(technique, capabilities, device, mode), "spec": spec or technique.name, "outcome": outcome,
        "passed": False, "error": error, "reason": error, "explicit_examples": 0, "examples": 0,
        "shrink_examples": 0, "seed": None, "seconds": None, "first_failure_at": None, "budget_reached": False,
        "invariant_counts": {}, "violations": [], "scenario": None, "repro": None, "plan": plan,
    }
    _write_record(run_dir, data)
    return data


def has_record(run_dir: Path, technique: Technique, capabilities: Iterable[str], device: str,
               mode: str = DEFAULT_MODE) -> bool:
    return record_path(run_dir, _identity(technique, capabilities, device, mode)["item"]).exists()


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((Path(run_dir) / "results").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a record being replaced right now; the next rebuild picks it up
    return records


def matrix(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """technique -> invariant -> {verdict, count, first_message, scenario}.

    ``device-parity`` is ``n/a`` until a record of the technique ran on a second device (CUDA)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    judged = {rec["technique"] for rec in records if rec.get("outcome") != "n/a"}
    for rec in records:
        row = out.setdefault(rec["technique"], {inv: {"verdict": "n/a" if inv == DEVICE_PARITY else "held",
                                                       "count": 0, "first_message": None, "scenario": None}
                                                 for inv in INVARIANTS})
        if rec["technique"] not in judged:  # the user's model offers the technique no place: nothing held
            for cell in row.values():
                cell["verdict"] = "n/a"
            continue
        if rec["device"].startswith("cuda") and row[DEVICE_PARITY]["verdict"] == "n/a" \
                and not rec.get("parity_not_judged"):
            row[DEVICE_PARITY]["verdict"] = "held"
        for inv, n in rec["invariant_counts"].items():
            row[inv]["count"] += n
        for rank, v in enumerate(rec["violations"]):
            cell = row[v["invariant"]]
            if v["invariant"] in rec["expected"]:
                verdict = "expected"
            elif rank > 0 and rec["passed"]:
                verdict = "secondary"  # a knock-on effect of the expected first violation
            else:
                verdict = "violated"
            if cell["verdict"] != "violated":
                cell["verdict"] = verdict
            if cell["first_message"] is None:
                cell["first_message"], cell["scenario"] = v["message"], rec["scenario"]
    return out


def write_summary(run_dir: Path, meta: dict[str, Any], complete: bool = False, progress: dict | None = None,
                  interrupted: bool = False, items: Iterable[str] | None = None) -> dict[str, Any]:
    """Rebuild ``summary.json``/``.md`` and ``report.html`` from the records so far.

    ``ok`` is true only for a complete run whose every item passed: an incomplete run never passes.
    ``progress`` names the items that finished, were running, and never started. ``items`` (record
    keys): only their records count, where the folder may hold an earlier run's (``check``'s).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    records = load_records(run_dir)
    if items is not None:
        keys = set(items)
        records = [r for r in records if r["item"] in keys]
    summary = {
        "run_id": run_dir.name, "complete": complete, "interrupted": interrupted, "meta": meta,
        "items": progress,
        "ok": complete and all(r["passed"] for r in records),
        "examples_per_technique": _examples(records),
        "results": records, "matrix": matrix(records), "modes": mode_matrix(records),
    }
    _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    _atomic_write(run_dir / "summary.md", markdown(summary))
    _atomic_write(run_dir / "report.html", html_report(summary))
    return summary


#: how one outcome outweighs another when several items of a technique share a mode
_OUTCOME_RANK = {"violated": 6, "error": 5, "not-run": 5, "missed": 4, "caught": 3, "held": 2, "n/a": 1}


def mode_matrix(records: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """technique -> execution mode -> the outcome of its items in that mode (the worst of them:
    ``violated`` over ``missed`` over ``caught`` over ``held``), with the first invariant when caught
    or violated (``caught: trainable-trains``). Records written before modes existed are eager."""
    out: dict[str, dict[str, str]] = {}
    for rec in records:
        mode = rec.get("mode", DEFAULT_MODE)
        outcome = rec["outcome"]
        text = f"{outcome}: {rec['violations'][0]['invariant']}" if rec.get("violations") \
            and outcome in ("caught", "violated") else outcome
        row = out.setdefault(rec["technique"], {})
        current = row.get(mode)
        if current is None or _OUTCOME_RANK.get(outcome, 0) > _OUTCOME_RANK.get(current.split(":")[0], 0):
            row[mode] = text
    return out


def _examples(records):
    out: dict[str, int] = {}
    for r in records:
        out[r["technique"]] = out.get(r["technique"], 0) + r["examples"]
    return out


def point_latest(reports_dir: Path, run_dir: Path) -> None:
    """``reports/latest`` (a symlink where possible) and ``reports/LATEST`` (a file naming the run)."""
    reports_dir = Path(reports_dir)
    _atomic_write(reports_dir / "LATEST", Path(run_dir).name + "\n")
    link = reports_dir / "latest"
    try:
        tmp = reports_dir / f".latest.{os.getpid()}"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(Path(run_dir).name)
        tmp.replace(link)
    except OSError:
        pass  # no symlinks here: LATEST still names the run


# --- renderers ----------------------------------------------------------------------------

_MARK = {"held": "ok", "expected": "caught", "secondary": "also", "violated": "VIOLATED", "n/a": "n/a"}
_LEGEND = ("ok = held; caught = a known-bad technique violated an expected invariant; also = a knock-on "
           "violation after an expected one; VIOLATED = an unexpected violation; n/a = not judged here "
           "(device-parity needs a second device; a user's model may offer a capability no place). "
           "A count in brackets is the number of judged examples "
           "in which the invariant fired.")


def _row_cells(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return matrix([rec])[rec["technique"]]


def _examples_text(r: dict[str, Any]) -> str:
    """``2 trigger + 60 generated (+41 shrinking)``: what an item judged, each count labelled."""
    text = f"{r.get('explicit_examples', 0)} trigger + "
    text += f"{r['coverage_examples']} coverage + " if r.get("coverage_examples") else ""
    text += f"{r['examples']} generated"
    text += f" (+{r['shrink_examples']} shrinking)" if r.get("shrink_examples") else ""
    covered = r.get("coverage") or {}
    return text + (f"; {coverage_line({k: tuple(v) for k, v in covered.items()})}" if covered else "")


def _short_scenario(data: dict[str, Any] | None) -> str:
    try:
        return repr(Scenario.from_dict(data)) if data else ""
    except (KeyError, TypeError, ValueError):  # a record from another version: show the JSON only
        return ""


def _run_line(meta: dict[str, Any]) -> str:
    """What ran: versions, devices, profile, seed, budget, example cap."""
    seed = meta.get("seed_text") or f"seed {meta.get('seed')}"
    budget, per_item = meta.get("budget"), meta.get("item_budget")
    if not budget:
        budgeted = "no time budget"
    elif per_item and abs(per_item - budget) > 1e-9:  # fuzz: the whole run's, shared out among its items
        budgeted = f"budget {budget:.3g}s for the run (up to {per_item:.3g}s per item)"
    else:
        budgeted = f"budget {budget:.3g}s per item"
    return (f"torch {meta.get('torch')}, hypothesis {meta.get('hypothesis')}, devices {meta.get('devices')}, "
            f"profile {meta.get('profile')}, {seed}, {budgeted}"
            + f", at most {meta.get('max_examples')} generated examples per search")


def _status_line(summary: dict[str, Any]) -> str:
    state = "PASS" if summary["ok"] else "FAIL"
    if not summary["complete"]:
        why = "interrupted" if summary.get("interrupted") else "incomplete"
        items = summary.get("items") or {}
        counts = ", ".join(f"{len(items[k])} {k.replace('_', ' ')}" for k in ("finished", "running", "not_started")
                           if k in items)
        return f"{state} ({why}: the run did not finish, so it cannot pass" + (f"; items: {counts})" if counts
                                                                                   else ")")
    failed = [r for r in summary["results"] if not r["passed"]]
    return state + (f" ({len(failed)} of {len(summary['results'])} items failed)" if failed else "")


def _unfinished_lines(summary: dict[str, Any]) -> list[str]:
    """For a run that did not finish: which items were running and which never started."""
    items = summary.get("items") or {}
    if summary["complete"]:
        return []
    return [f"{label}: {', '.join(items[key])}" for key, label in (("running", "running when it stopped"),
                                                                    ("not_started", "never started"))
            if items.get(key)]


def markdown(summary: dict[str, Any]) -> str:
    meta = summary["meta"]
    lines = [f"# isolation-suite run {summary['run_id']}", "",
             f"status: **{_status_line(summary)}**", *_unfinished_lines(summary), _run_line(meta), "", _LEGEND, "",
             "| technique | device | mode | expected | outcome | examples judged | " + " | ".join(INVARIANTS)
             + " | why |", "|" + "---|" * (7 + len(INVARIANTS))]
    for r in summary["results"]:
        cells = [_MARK[cell["verdict"]] for cell in _row_cells(r).values()]
        lines.append(f"| {r['technique']} | {r['device']} | {r.get('mode', 'eager')} | "
                     f"{', '.join(r['expected']) or 'sound'} | "
                     f"{r['outcome']} | {_examples_text(r)} | " + " | ".join(cells)
                     + f" | {r.get('reason', '')} |")
    modes = _modes_in(summary)
    if modes != [DEFAULT_MODE]:
        lines += ["", "## Verdicts per mode", "", "| technique | " + " | ".join(modes) + " |",
                  "|" + "---|" * (1 + len(modes))]
        for technique, row in summary.get("modes", {}).items():
            lines.append(f"| {technique} | " + " | ".join(row.get(m, "-") for m in modes) + " |")
    lines += ["", "## Counterexamples", ""]
    for r in summary["results"]:
        if r.get("error"):
            lines += [f"### {r['item']} ({r['outcome']}: no verdict)", f"- {r['error']}", ""]
        if r["violations"]:
            lines.append(f"### {r['item']} ({r['outcome']})")
            lines += [f"- `{v['invariant']}`: {v['message']}" for v in r["violations"]]
            if r.get("repro"):
                lines.append(f"- repro: `python {r['repro']}`")
            short = _short_scenario(r["scenario"])
            if short:
                lines += ["", "```", short, "```"]
            lines.append("")
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px}.held{background:#e6f4ea}.expected{background:#fff4d6}
.secondary{background:#fdf8ec;color:#777}.violated{background:#f8d7da;font-weight:bold}.na{color:#999}
.why{font-size:90%}.pass{background:#e6f4ea}.fail{background:#f8d7da;font-weight:bold}
pre{background:#f6f6f6;padding:8px;overflow-x:auto}
.plots{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start;margin:8px 0}
.plots svg{border:1px solid #eee;background:#fff}.search{margin:4px 0 12px 0}"""


def _matrix_rows(summary: dict[str, Any]) -> str:
    """One table row per technique: status, what was judged, the invariant cells, why."""
    esc = html.escape
    rows = []
    for technique, cells in summary["matrix"].items():
        tds = "".join(f'<td class="{c["verdict"].replace("/", "")}" title="{esc(c["first_message"] or "")}">'
                      f'{_MARK[c["verdict"]]}{" (" + str(c["count"]) + ")" if c["count"] else ""}</td>'
                      for c in cells.values())
        recs = [r for r in summary["results"] if r["technique"] == technique]
        status = "pass" if all(r["passed"] for r in recs) else "fail"
        why = "<br>".join(esc(r.get("reason", "")) for r in recs if not r["passed"]) or esc(
            "; ".join(r.get("reason", "") for r in recs))
        judged = "<br>".join(esc(f"{r['device']}: {_examples_text(r)}") for r in recs)
        rows.append(f'<tr><th>{esc(technique)}</th><td class="{status}">{status}</td><td>{judged}</td>{tds}'
                    f'<td class="why">{why}</td></tr>')
    return "".join(rows)


def _counterexample_plots(r: dict[str, Any]) -> str:
    """The step-by-step curves and the model drawing of one counterexample (nothing for a record
    without their data: an older version's, or an error)."""
    pictures = [plots.curves_svg(r.get("steps")), plots.tree_svg(r.get("model_tree"))]
    pictures = [p for p in pictures if p]
    return f'<div class="plots">{"".join(pictures)}</div>' if pictures else ""


def _counterexample_html(r: dict[str, Any]) -> str:
    esc = html.escape
    out = ""
    if r.get("error"):
        out += (f"<details open><summary>{esc(r['item'])}: {esc(r['outcome'])}, no verdict</summary>"
                f"<p>{esc(r['error'])}</p></details>")
    if r["violations"]:
        msgs = "".join(f"<li><b>{esc(v['invariant'])}</b>: {esc(v['message'])}</li>" for v in r["violations"])
        repro = f"<p>repro: <code>python {esc(r['repro'])}</code></p>" if r.get("repro") else ""
        scenario = esc(json.dumps(r["scenario"], indent=1))
        out += (f'<details open class="counterexample"><summary>{esc(r["item"])}: {esc(r["outcome"])}</summary>'
                f"<ul>{msgs}</ul>{_counterexample_plots(r)}"
                f"{repro}<pre>{esc(_short_scenario(r['scenario']))}</pre>"
                f"<details><summary>scenario JSON</summary><pre>{scenario}</pre></details></details>")
    return out


def _searches_html(summary: dict[str, Any]) -> str:
    """Per technique, a timeline of the examples each of its searches judged."""
    esc = html.escape
    parts = []
    for technique in summary["matrix"]:
        recs = [(r, plots.timeline_svg(r.get("history"), f"{r['item']}: {_examples_text(r)}"))
                for r in summary["results"] if r["technique"] == technique]
        drawn = [f'<div class="search">{svg}</div>' for _, svg in recs if svg]
        if drawn:
            parts.append(f"<h3>{esc(technique)}</h3>" + "".join(drawn))
    return "".join(parts)


def _modes_in(summary: dict[str, Any]) -> list[str]:
    """The execution modes the run's records cover, in ``modes.MODE_INFOS`` order."""
    seen = {m for row in summary.get("modes", {}).values() for m in row}
    return [m.kind for m in MODE_INFOS if m.kind in seen] + sorted(seen - {m.kind for m in MODE_INFOS})


def _modes_html(summary: dict[str, Any]) -> str:
    """The per-mode table (technique x execution mode -> outcome); empty for an eager-only run."""
    esc = html.escape
    modes = _modes_in(summary)
    if modes == [DEFAULT_MODE] or not modes:
        return ""
    css = {"held": "held", "caught": "expected", "n/a": "na"}
    rows = "".join(
        f"<tr><td>{esc(technique)}</td>" + "".join(
            f"<td class='{css.get(row.get(m, '-').split(':')[0], 'violated' if m in row else 'na')}'>"
            f"{esc(row.get(m, '-'))}</td>" for m in modes) + "</tr>"
        for technique, row in summary.get("modes", {}).items())
    head = "".join(f"<th>{esc(m)}</th>" for m in modes)
    return f"<h2>Verdicts per mode</h2><table><tr><th>technique</th>{head}</tr>{rows}</table>"


def _libraries_html(summary: dict[str, Any]) -> str:
    """The compatibility table (docs/compatibility.md): every library row, the library version
    installed where the report was written and the one its verdicts were judged on, its declared
    verdict per mode (``—``: not judged there), and what this run found for it, where it ran."""
    esc = html.escape
    rows = library_rows()
    modes = library_modes(rows)
    body = "".join(_library_row_html(row, modes, summary.get("modes", {}).get(row.name)) for row in rows)
    head = "".join(f"<th>{esc(m)}</th>" for m in modes)
    return (f"<h2>Library compatibility</h2><p>{esc(_LIBRARY_LEGEND)}</p><table><tr><th>installed</th>"
            f"<th>judged on</th><th>technique</th>{head}<th>this run</th></tr>{body}</table>")


def _library_row_html(row, modes: tuple[str, ...], found: dict[str, str] | None) -> str:
    esc = html.escape
    cells = []
    for mode in modes:
        verdict = row.verdict(mode)
        css = "na" if verdict is None else "held" if verdict == "sound" else "expected"
        cells.append(f"<td class='{css}'>{esc(verdict or '—')}</td>")
    run = "; ".join(f"{m}: {o}" for m, o in found.items()) if found else "—"
    return (f"<tr><td>{esc(row.library)} {esc(row.installed() or '(not installed)')}</td><td>{esc(row.judged_on)}</td>"
            f"<td>{esc(row.name)}</td>{''.join(cells)}<td>{esc(run)}</td></tr>")


_LIBRARY_LEGEND = ("Real libraries' recipes judged through the contract, each calling the library's own code: the "
                   "declared verdict per execution mode (sound, or the invariants it is known to break; —: not "
                   "judged in that mode), as docs/compatibility.md lists them.")


def html_report(summary: dict[str, Any]) -> str:
    """One self-contained page: the matrix, each counterexample with its pictures (inline SVG) and a
    timeline of every search; no script, no external file."""
    esc = html.escape
    details = "".join(_counterexample_html(r) for r in summary["results"])
    searches = _searches_html(summary)
    head = "".join(f"<th>{esc(i)}</th>" for i in INVARIANTS)
    rows = _matrix_rows(summary)
    meta = summary["meta"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>isolation-suite {esc(summary['run_id'])}</title>
<style>{_CSS}</style></head>
<body><h1>isolation-suite run {esc(summary['run_id'])}: {esc(_status_line(summary))}</h1>
{''.join(f"<p>{esc(line)}</p>" for line in _unfinished_lines(summary))}
<p>{esc(_run_line(meta))}</p>
<p>{esc(_LEGEND)}</p>
<table><tr><th>technique</th><th>status</th><th>examples judged</th>{head}<th>why</th></tr>{rows}</table>
{_modes_html(summary)}
{_libraries_html(summary)}
<h2>Counterexamples</h2>{details or '<p>none</p>'}
<h2>Searches</h2>{searches or '<p>no search recorded its examples</p>'}</body></html>
"""
