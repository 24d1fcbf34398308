"""Pictures for the HTML report: inline SVG built from a record's plain data, no script, no library.

Three pictures, each a pure function from JSON-ready data to one ``<svg>`` element:

- :func:`curves_svg`: a counterexample's training steps: the technique's loss against the
  reference's, and the per-step divergence (``invariants.divergence_by_step``, the distance the
  search's ``target()`` steers by) on a log scale with the tolerance at 1;
- :func:`tree_svg`: the minimal model's module tree in call order, isolated modules coloured;
- :func:`timeline_svg`: every example a search judged, in order, coloured by outcome, over bands
  for its phases (trigger examples, coverage examples, generated, shrinking).

The data comes from :func:`steps_data`, :func:`outline` and :func:`history_data` (what a record
keeps, a few numbers per step or example). Non-finite numbers travel as the strings ``"nan"``,
``"inf"`` and ``"-inf"`` (JSON has no such numbers). Every string that reaches the SVG is escaped.
"""
from __future__ import annotations

import math
from html import escape
from typing import Any, Iterable, Sequence

# --- what a record keeps -----------------------------------------------------------------------

#: rows of a model outline kept in a record (a real model can have hundreds of modules)
MAX_TREE_ROWS = 120


def encode_number(x: float | None, digits: int = 6) -> float | str | None:
    """A float for JSON: rounded to ``digits`` significant digits; NaN and infinities as strings."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.{digits}g}")


def decode_number(x: Any) -> float | None:
    """The inverse of :func:`encode_number`; None for a missing or unreadable value."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if x in ("nan", "inf", "-inf"):
        return float(x)
    return None


def steps_data(points: Iterable) -> dict[str, list]:
    """A verdict's ``steps`` (``judge.StepPoint``) as three lists: the technique's loss, the
    reference's, and the per-step divergence."""
    points = list(points)
    return {"loss": [encode_number(p.loss) for p in points],
            "reference_loss": [encode_number(p.reference_loss) for p in points],
            "divergence": [encode_number(p.divergence, 4) for p in points]}


_PHASE_CODE = {"trigger": "t", "coverage": "c", "generated": "g", "shrinking": "s"}
_OUTCOME_CODE = {"held": ".", "violated": "x"}
_PHASE_NAME = {v: k for k, v in _PHASE_CODE.items()}
_OUTCOME_NAME = {v: k for k, v in _OUTCOME_CODE.items()}


def history_data(history: Iterable, omitted: int = 0, invalid: int = 0) -> dict[str, Any]:
    """A search's judged examples (``check.JudgedExample``) compactly: one character per example for
    its phase (``t`` trigger, ``c`` coverage, ``g`` generated, ``s`` shrinking) and its outcome (``.`` held,
    ``x`` violated), their divergences, how many were judged but not kept (``omitted``), and how
    many draws Hypothesis rejected before judging (``invalid``)."""
    history = list(history)
    return {"phases": "".join(_PHASE_CODE[e.phase] for e in history),
            "outcomes": "".join(_OUTCOME_CODE[e.outcome] for e in history),
            "divergence": [encode_number(e.divergence, 3) for e in history], "omitted": omitted,
            "invalid": invalid}


def outline(tree, intent, cap: int = MAX_TREE_ROWS) -> dict[str, Any]:
    """The rows of a model's module tree (``tree.ModelTree``) in call order, each with what the
    ``intent`` does to it: ``frozen``, ``in-frozen`` (inside a frozen module), ``pass-through``,
    ``elements`` (some entries of its parameters frozen), ``reparameterized`` or ``""``.

    A module comes where the forward first calls it (or, for a container that is never called
    itself such as an ``nn.ModuleList``, its first called descendant); modules the forward never
    reaches come last. At most ``cap`` rows; ``omitted`` counts the rest.
    """
    first: dict[str, int] = {}
    for i, (path, _) in enumerate(tree.order):
        first.setdefault(path, i)

    def start(path: str) -> float:
        if path == "":
            return -1
        return min((i for p, i in first.items() if p == path or p.startswith(path + ".")), default=math.inf)

    passes: dict[str, list[int]] = {}
    for path, use in intent.pass_through:
        passes.setdefault(path, []).append(use)
    elements: dict[str, list[str]] = {}
    for param, indices in intent.frozen_elements:
        owner, _, name = param.rpartition(".")
        n = len(indices)
        elements.setdefault(owner, []).append(f"{n} {'entry' if n == 1 else 'entries'} of {name} frozen")

    def mark(path: str) -> tuple[str, str]:
        if path in intent.frozen_modules:
            return "frozen", ""
        if intent.is_frozen_module(path):
            return "in-frozen", ""
        if path in passes:
            uses = sorted(passes[path])
            return "pass-through", f"call{'s' * (len(uses) > 1)} {', '.join(str(u + 1) for u in uses)} " \
                                   f"of {tree.node(path).calls} pass{'es' * (len(uses) == 1)} through"
        if path in elements:
            return "elements", "; ".join(elements[path])
        if path in intent.reparameterized:
            return "reparameterized", ""
        return "", ""

    order = sorted(enumerate(tree.nodes), key=lambda item: (start(item[1].path),
                                                            item[1].path.count(".") if item[1].path else -1,
                                                            item[0]))
    rows = []
    for _, node in order[:cap]:
        what, note = mark(node.path)
        rows.append({"path": node.path, "kind": node.kind, "calls": node.calls, "mark": what, "note": note})
    return {"rows": rows, "omitted": max(0, len(order) - cap)}


# --- drawing helpers ---------------------------------------------------------------------------

FONT = 'font-family="sans-serif" font-size="11"'
TECHNIQUE_COLOR, REFERENCE_COLOR, DIVERGENCE_COLOR = "#d62728", "#1f77b4", "#6a3d9a"
#: beyond this a value is drawn at this size (so that spans of the axis stay finite)
_HUGE = 1e300


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3g}"


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {FONT}{extra}>{escape(text)}</text>'


def _numbers(values: Any) -> list[float | None]:
    """A record's list of encoded numbers, decoded (anything else reads as no numbers)."""
    return [decode_number(v) for v in values] if isinstance(values, list) else []


def _finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _x_positions(n: int, left: float, width: float) -> list[float]:
    """x of n evenly spaced points across ``width`` (a single one in the middle)."""
    if n == 1:
        return [left + width / 2]
    return [left + width * i / (n - 1) for i in range(n)]


def _linear(lo: float, hi: float, top: float, height: float):
    lo, hi = max(lo, -_HUGE), min(hi, _HUGE)
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad

    def y(v: float) -> float:
        v = min(max(v, lo), hi)
        return top + height * (1 - (v - lo) / (hi - lo))
    return y, lo, hi


def _log_range(values: Sequence[float | None]) -> tuple[int, int]:
    """Decades for a log axis of non-negative values, always showing 1 (the tolerance)."""
    positive = [v for v in _finite(values) if v > 0]
    lo = min(-1, max(-6, math.floor(math.log10(min(positive))))) if positive else -2
    big = max(positive, default=1.0)
    hi = max(1, min(308, math.ceil(math.log10(big)) if big > 1 else 1))
    if any(v is not None and math.isinf(v) for v in values):
        hi = 308
    return lo, hi


def _log(lo: int, hi: int, top: float, height: float):
    def y(v: float) -> float:
        e = math.log10(v) if v > 0 else lo  # zero (no gap at all) sits on the floor
        e = min(max(e, lo), hi)
        return top + height * (1 - (e - lo) / (hi - lo))
    return y


def _series(xs: Sequence[float], values: Sequence[float | None], y, color: str, label: str, top: float,
            under: bool = False) -> list[str]:
    """A polyline through the finite values (broken where one is missing or not finite), a dot on
    each finite value (with its value as a tooltip) and a marker at the top edge for NaN and inf.
    ``under``: a wide pale dashed line, for a series drawn beneath another it may coincide with."""
    out, run = [], []
    style = ' stroke-width="4" stroke-opacity="0.45" stroke-dasharray="6,3"' if under else ' stroke-width="1.6"'
    css = escape(label.replace(" ", "-"))

    def flush():
        if len(run) > 1:
            pts = " ".join(f"{px:.1f},{py:.1f}" for px, py in run)
            out.append(f'<polyline class="{css}" points="{pts}" fill="none" stroke="{color}"{style}/>')
        run.clear()
    for i, (px, v) in enumerate(zip(xs, values)):
        if v is None:
            flush()
            continue
        if not math.isfinite(v):
            flush()
            out.append(f'<path d="M{px - 4:.1f},{top + 1:.1f} l8,0 l-4,7 z" fill="{color}" class="nonfinite">'
                       f'<title>{escape(f"{label}, step {i + 1}: {_fmt(v)}")}</title></path>')
            continue
        py = y(v)
        run.append((px, py))
        dot = ' r="4" fill-opacity="0.45"' if under else ' r="2.5"'
        out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}"{dot} fill="{color}">'
                   f'<title>{escape(f"{label}, step {i + 1}: {_fmt(v)}")}</title></circle>')
    flush()
    return out


def _frame(left: float, top: float, width: float, height: float, title: str) -> list[str]:
    return [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="#fff" stroke="#bbb"/>',
            _text(left, top - 8, title, extra=' font-weight="bold"')]


def _svg(width: float, height: float, label: str, body: Iterable[str], css_class: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="{css_class}" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{escape(label)}">'
            f'<title>{escape(label)}</title>' + "".join(body) + "</svg>")


# --- the pictures ------------------------------------------------------------------------------

def curves_svg(steps: dict[str, Any] | None, title: str = "") -> str:
    """Loss per step (technique red, reference blue dashed) and divergence per step (log scale,
    the tolerance at 1) of one counterexample; ``""`` when ``steps`` holds no step."""
    if not isinstance(steps, dict):
        return ""
    loss, ref, div = (_numbers(steps.get(key)) for key in ("loss", "reference_loss", "divergence"))
    n = max(len(loss), len(ref), len(div))
    if all(v is None for v in loss + ref + div):
        return ""
    loss, ref, div = (v + [None] * (n - len(v)) for v in (loss, ref, div))
    pw, ph, top, gap = 270.0, 130.0, 34.0, 80.0
    left1 = 58.0
    left2 = left1 + pw + gap
    body = [_text(left1, 12, title or "the minimal counterexample, step by step", extra=' fill="#444"')]
    # loss panel
    body += _frame(left1, top, pw, ph, "loss per step")
    finite = _finite(loss + ref)
    y, lo, hi = _linear(min(finite, default=0.0), max(finite, default=1.0), top + 6, ph - 12)
    body += [_text(left1 - 4, top + 10, _fmt(hi), "end"), _text(left1 - 4, top + ph, _fmt(lo), "end")]
    xs = _x_positions(n, left1 + 10, pw - 20)
    body += _series(xs, ref, y, REFERENCE_COLOR, "reference loss", top, under=True)
    body += _series(xs, loss, y, TECHNIQUE_COLOR, "technique loss", top)
    # divergence panel
    body += _frame(left2, top, pw, ph, "divergence per step (tolerance units)")
    dlo, dhi = _log_range(div)
    ylog = _log(dlo, dhi, top + 6, ph - 12)
    tol = ylog(1.0)
    body.append(f'<line x1="{left2}" y1="{tol:.1f}" x2="{left2 + pw}" y2="{tol:.1f}" stroke="#888" '
                f'stroke-dasharray="3,3" class="tolerance"/>')
    body.append(_text(left2 + pw - 4, tol - 3, "tolerance", "end", ' fill="#666"'))
    body += [_text(left2 - 4, top + 10, f"1e{dhi}", "end"), _text(left2 - 4, top + ph, f"1e{dlo}", "end")]
    xs_div = _x_positions(n, left2 + 10, pw - 20)
    body += _series(xs_div, div, ylog, DIVERGENCE_COLOR, "divergence", top)
    # x axes and the legend
    for axis in (xs, xs_div):
        body.append(_text(axis[0], top + ph + 14, "step 1", "middle"))
        if n > 1:
            body.append(_text(axis[-1], top + ph + 14, f"step {n}", "middle"))
    ly = top + ph + 34
    body += [f'<line x1="{left1}" y1="{ly - 4}" x2="{left1 + 20}" y2="{ly - 4}" stroke="{TECHNIQUE_COLOR}" '
             f'stroke-width="2"/>', _text(left1 + 24, ly, "technique"),
             f'<line x1="{left1 + 100}" y1="{ly - 4}" x2="{left1 + 120}" y2="{ly - 4}" stroke="{REFERENCE_COLOR}" '
             f'stroke-width="4" stroke-opacity="0.45" stroke-dasharray="6,3"/>', _text(left1 + 124, ly, "reference"),
             f'<line x1="{left2}" y1="{ly - 4}" x2="{left2 + 20}" y2="{ly - 4}" stroke="{DIVERGENCE_COLOR}" '
             f'stroke-width="2"/>', _text(left2 + 24, ly, "divergence (what the search steers by)")]
    return _svg(left2 + pw + 10, ly + 8, "loss and divergence per training step", body, "curves")


_MARK_STYLE = {  # fill, stroke, legend
    "frozen": ("#9ecae1", "#3182bd", "frozen"),
    "in-frozen": ("#deebf7", "#9ecae1", "inside a frozen module"),
    "pass-through": ("#fdd0a2", "#e6550d", "pass-through call"),
    "elements": ("#dadaeb", "#756bb1", "element-frozen"),
    "reparameterized": ("#c7e9c0", "#31a354", "reparameterized"),
    "": ("#ffffff", "#bbbbbb", "trains normally"),
}


def tree_svg(data: dict[str, Any] | None, title: str = "the minimal model") -> str:
    """The module tree of ``outline`` rows, one row per module in call order, indented by depth,
    isolated modules coloured (a legend on top); ``""`` without rows."""
    rows = data.get("rows") if isinstance(data, dict) else None
    if not rows or not isinstance(rows, list):
        return ""
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("path"), str)]
    if not rows:
        return ""
    row_h, indent, top = 20.0, 16.0, 44.0
    body = [_text(8, 12, title, extra=' font-weight="bold"')]
    lx = 8.0
    for key in ("frozen", "in-frozen", "pass-through", "elements", "reparameterized", ""):
        fill, stroke, label = _MARK_STYLE[key]
        body.append(f'<rect x="{lx:.1f}" y="20" width="10" height="10" fill="{fill}" stroke="{stroke}"/>')
        body.append(_text(lx + 14, 29, label))
        lx += 14 + 6.2 * len(label) + 12
    where: dict[str, tuple[float, float]] = {}
    width = lx
    for i, row in enumerate(rows):
        path = row["path"]
        depth = path.count(".") + 1 if path else 0
        x, y = 8 + depth * indent, top + i * row_h
        calls = row.get("calls") if isinstance(row.get("calls"), int) else 0
        label = f"{path}  {row.get('kind', '')}" if path else "model"
        if calls > 1:
            label += f"  ×{calls}"
        elif calls == 0 and path:
            label += "  (not called itself)"
        note = str(row.get("note") or "")
        fill, stroke, legend = _MARK_STYLE.get(row.get("mark") or "", _MARK_STYLE[""])
        w = 10 + 6.4 * len(label)
        parent = path.rpartition(".")[0] if "." in path else ("" if path else None)
        if parent is not None and parent in where:
            px, py = where[parent]
            body.append(f'<path d="M{px + 6:.1f},{py + 16:.1f} V{y + 8:.1f} H{x:.1f}" fill="none" stroke="#999"/>')
        tip = f"{path or '(model)'}: {legend}" + (f"; {note}" if note else "")
        body.append(f'<g class="module {escape(row.get("mark") or "plain")}"><title>{escape(tip)}</title>'
                    f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="16" rx="3" fill="{fill}" '
                    f'stroke="{stroke}"/>' + _text(x + 5, y + 12, label) + "</g>")
        if note:
            body.append(_text(x + w + 6, y + 12, note, extra=' fill="#555"'))
        width = max(width, x + w + 6 + 6.2 * len(note) + 8)
        where[path] = (x, y)
    height = top + len(rows) * row_h + 6
    omitted = data.get("omitted") if isinstance(data.get("omitted"), int) else 0
    if omitted:
        body.append(_text(8, height + 8, f"... {omitted} more modules not drawn", extra=' fill="#666"'))
        height += 16
    return _svg(width, height, "module tree of the minimal model", body, "tree")


_PHASE_FILL = {"t": "#fff4d6", "c": "#e4f0fb", "g": "#ffffff", "s": "#eeeeee"}


def timeline_svg(history: dict[str, Any] | None, title: str = "") -> str:
    """Every judged example of one search in order (x), its divergence on a log scale (y), held
    (green dot) or violated (red cross), over bands for the phases; the draws Hypothesis rejected
    before judging (invalid: they have no place in the order) are counted beside the legend."""
    if not isinstance(history, dict):
        return ""
    phases, outcomes = history.get("phases"), history.get("outcomes")
    if not isinstance(phases, str) or not isinstance(outcomes, str):
        return ""
    div = _numbers(history.get("divergence"))
    n = min(len(phases), len(outcomes))
    if n == 0:
        return ""
    div = (div + [None] * n)[:n]
    left, top, pw, ph = 58.0, 34.0, 560.0, 90.0
    body = [_text(left, 12, title or "examples judged, in order", extra=' font-weight="bold"')]
    step = pw / n
    start = 0
    for i in range(1, n + 1):  # one band per run of one phase
        if i == n or phases[i] != phases[start]:
            code = phases[start]
            name = _PHASE_NAME.get(code, "other")
            body.append(f'<rect x="{left + start * step:.1f}" y="{top}" width="{(i - start) * step:.1f}" '
                        f'height="{ph}" fill="{_PHASE_FILL.get(code, "#fff")}" class="phase {name}">'
                        f'<title>{escape(f"{name}: examples {start + 1}-{i}")}</title></rect>')
            if (i - start) * step > 40:
                body.append(_text(left + start * step + 3, top + 11, name, extra=' fill="#999"'))
            start = i
    body.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>')
    lo, hi = _log_range(div)
    y = _log(lo, hi, top + 6, ph - 12)
    tol = y(1.0)
    body.append(f'<line x1="{left}" y1="{tol:.1f}" x2="{left + pw}" y2="{tol:.1f}" stroke="#888" '
                f'stroke-dasharray="3,3" class="tolerance"/>')
    body += [_text(left - 4, top + 10, f"1e{hi}", "end"), _text(left - 4, top + ph, f"1e{lo}", "end"),
             _text(left + pw + 3, tol + 4, "tolerance", extra=' fill="#666"')]
    for i in range(n):
        x = left + (i + 0.5) * step
        v = div[i]
        py = top + 7 if v is not None and not math.isfinite(v) else y(v if v is not None else 0.0)
        what = _OUTCOME_NAME.get(outcomes[i], "unknown")
        where = _PHASE_NAME.get(phases[i], "?")
        tip = f"<title>{escape(f'example {i + 1} ({where}): {what}, divergence {_fmt(v or 0.0)}')}</title>"
        if what == "violated":
            body.append(f'<path class="violated" d="M{x - 3:.1f},{py - 3:.1f} l6,6 m0,-6 l-6,6" stroke="#d62728" '
                        f'stroke-width="2">{tip}</path>')
        else:
            body.append(f'<circle class="held" cx="{x:.1f}" cy="{py:.1f}" r="2.2" fill="#2ca02c">{tip}</circle>')
    body.append(_text(left + 0.5 * step, top + ph + 14, "1", "middle"))
    if n > 1:  # a single example's own number sits where the axis title would
        body.append(_text(left + (n - 0.5) * step, top + ph + 14, str(n), "middle"))
        body.append(_text(left + pw / 2, top + ph + 14, "example", "middle", ' fill="#666"'))
    omitted, invalid = (history.get(k) if isinstance(history.get(k), int) else None for k in ("omitted", "invalid"))
    ly = top + ph + 32
    legend = [('<circle cx="{x}" cy="{y}" r="3" fill="#2ca02c"/>', "held"),
              ('<path d="M{x0},{y0} l6,6 m0,-6 l-6,6" stroke="#d62728" stroke-width="2"/>', "violated"),
              ('<rect x="{x0}" y="{y0}" width="10" height="8" fill="#fff4d6" stroke="#ccc"/>', "trigger examples"),
              ('<rect x="{x0}" y="{y0}" width="10" height="8" fill="#ffffff" stroke="#ccc"/>', "generated"),
              ('<rect x="{x0}" y="{y0}" width="10" height="8" fill="#eeeeee" stroke="#ccc"/>', "shrinking")]
    if "c" in phases:  # a user's model: one example per target, after the trigger examples
        legend.insert(3, ('<rect x="{x0}" y="{y0}" width="10" height="8" fill="#e4f0fb" stroke="#ccc"/>',
                          "coverage examples"))
    lx = left
    for shape, label in legend:
        body.append(shape.format(x=lx + 3, y=ly - 4, x0=lx, y0=ly - 8))
        body.append(_text(lx + 14, ly, label))
        lx += 14 + 6.2 * len(label) + 14
    note = "; ".join(["y: divergence (log)"] + ([f"{omitted} later examples not drawn"] if omitted else [])
                     + ([f"{invalid} invalid draw{'s' * (invalid != 1)} (not judged)"] if invalid is not None else []))
    body.append(_text(lx, ly, note, extra=' fill="#666" class="invalid"'))
    width = max(left + pw + 64, lx + 6.2 * len(note) + 8)
    return _svg(width, ly + 8, "examples judged by the search", body, "timeline")
