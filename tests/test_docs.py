"""The documentation: README.md stays a short front page, every relative link in it and in docs/
resolves, the catalog table in docs/catalog.md and the compatibility table in docs/compatibility.md
are what docs/catalog_table.py and docs/compatibility_table.py generate from the code, and the
README's two commands are the ones CI runs."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (a link there is code, not a link)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    heading = heading.strip().lower().replace("`", "")
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in HEADING.findall(_prose(page.read_text(encoding="utf-8"))):
        slug, n = _slug(heading), 1
        while slug in found:  # a repeated heading gets -1, -2, ...
            slug, n = f"{_slug(heading)}-{n}", n + 1
        found.add(slug)
    return found


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(_prose(page.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)]  # http:, https:, mailto: ...


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved})")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.relative_to(ROOT)})")
    return broken


def test_readme_is_a_short_front_page():
    size = README.stat().st_size
    assert size < 25_000, f"README.md is {size} bytes: move reference material into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert relative_links(page) or page != README, "README.md links to nothing"
    assert not broken_links(page), f"{page.relative_to(ROOT)}: broken links: {broken_links(page)}"


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    missing = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not missing, f"README.md's Documentation section does not link {missing}"


def _script(name: str):
    """The docs script ``docs/NAME.py``, loaded as a module."""
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["catalog_table", "compatibility_table", "options_table"])
def test_every_generated_table_is_current(script):
    """Each table a docs script generates from the code (``docs/generated_block.py``) is what the code
    renders now."""
    generated = _script(script).GENERATED
    text = generated.page.read_text(encoding="utf-8")
    assert generated.replaced(text) == text, (
        f"docs/{generated.page.name}'s {generated.what} is stale: run python docs/{script}.py --write")


def test_catalog_table_has_a_row_per_technique():
    from isolation_suite.techniques import CATALOG
    table = _script("catalog_table").table()
    for entry in CATALOG:
        assert f"| `{entry.technique.name}` |" in table
    assert len(table.strip().splitlines()) == len(CATALOG) + 2


def test_compatibility_table_has_a_row_per_library_row():
    from isolation_suite.techniques.library import library_modes, library_rows
    table = _script("compatibility_table").table()
    lines = table.strip().splitlines()
    assert len(lines) == len(library_rows()) + 2
    for row, line in zip(library_rows(), lines[2:]):
        assert line.startswith(f"| {row.library} | {row.judged_on} | `{row.name}` |")
        assert line.count("|") == 6 + len(library_modes())


def _two_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Two commands\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else None]
    return [block.strip() for block in re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)]


def test_two_commands_are_the_ones_ci_runs():
    commands = _two_commands()
    assert len(commands) == 2, commands
    fuzz, tests = commands
    assert "\n" not in fuzz and "\n" not in tests, "each command is one line to copy"
    assert fuzz.endswith("pip install -e . && isolation-suite fuzz")
    assert tests.endswith("python -m pytest -n 2 -q")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    if tests not in ci:  # .ci/run spells the same steps over several lines
        assert "python -m pytest -n 2 -q" in ci
        system_packages = re.search(r"\{ command -v redis-server .*?; \}; \}", tests)
        assert system_packages and system_packages.group(0) in ci, (
            "the README's system-package step differs from .ci/run's")


def test_options_table_describes_every_option():
    from isolation_suite.engine.settings import OPTIONS
    table = _script("options_table").table()
    assert all(o.help.split()[0] in table for o in OPTIONS)
