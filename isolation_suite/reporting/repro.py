"""Standalone repro scripts: the minimal counterexample, runnable with nothing but torch.

The script embeds the harness modules it needs (specs, builder, runner,
reference, invariants) and the technique's own module as source text, serves
them through an import hook, and judges the scenario with the harness's one judging
path (:func:`isolation_suite.judging.judge.judge`: float64 twin and second device included).
It exits 1 while the violation reproduces, 0 once it is fixed, and 2 when it could not
run at all (a missing import, a broken technique module, a device this machine lacks).
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

from isolation_suite.execution.sandbox import DEFAULT_TIMEOUT
from isolation_suite.spec.scenario import Scenario
from isolation_suite.technique import Technique

_PACKAGE = Path(__file__).resolve().parent.parent  # isolation_suite/
#: the harness the script embeds (the packages of a judged run, none of which imports hypothesis)
_EMBEDDED_PACKAGES = ("spec", "model", "execution", "judging", "techniques")
_EMBEDDED_MODULES = ("technique", "engine/__init__", "engine/loading")


def _embedded() -> list[str]:
    """Every module of the embedded packages, as paths under ``isolation_suite/`` without ``.py``."""
    found = [str(path.relative_to(_PACKAGE).with_suffix("")) for package in _EMBEDDED_PACKAGES
             for path in sorted((_PACKAGE / package).glob("*.py"))]
    return [*_EMBEDDED_MODULES, *found]


_INIT = '''"""A minimal isolation_suite for a repro script (embedded, torch only)."""
from isolation_suite.spec.scenario import Architecture, Data, Intent, Layer, Op, OptimizerRecipe, Scenario
from isolation_suite.technique import Capability, Role, Technique


def catalog():
    from isolation_suite.techniques import catalog as built_in
    return built_in()
'''

_TEMPLATE = '''#!/usr/bin/env python
"""Repro: {technique} -> {headline}

Device: {device}. Needs only torch: python {filename}
Exits 1 while the violation reproduces, 0 once the technique is fixed, 2 when it cannot run.
"""
import importlib.abc
import importlib.util
import sys

SOURCES = {sources!r}
PACKAGES = {packages!r}
SCENARIO = {scenario_json!r}
DEVICE = {device!r}
TIMEOUT = {timeout!r}  # seconds one training run may take, as in the run that found it


class _Embedded(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in SOURCES:
            return importlib.util.spec_from_loader(name, self, is_package=name in PACKAGES)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if module.__name__ in PACKAGES:
            module.__path__ = []
        exec(compile(SOURCES[module.__name__], "<embedded " + module.__name__ + ">", "exec"), module.__dict__)


def load():
    """The harness, the technique and the scenario; any failure here means the script cannot run."""
    sys.meta_path.insert(0, _Embedded())
    for name in [n for n in sys.modules if n == "isolation_suite" or n.startswith("isolation_suite.")]:
        del sys.modules[name]
    from isolation_suite.judging.judge import judge
    from isolation_suite.spec.scenario import Scenario
{technique_import}
    return judge, technique, Scenario.from_json(SCENARIO)


def main():
    try:
        judge, technique, scenario = load()
        print(repr(scenario))
        verdict = judge(technique, scenario, DEVICE, timeout=TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - a crash of the technique's own code is a verdict, not this
        first = (str(exc).strip().splitlines() or [""])[0]
        print("could not run: " + type(exc).__name__ + ": " + first, file=sys.stderr)
        return 2
    print(verdict)
    print("reproduced" if not verdict.ok else "not reproduced: the technique holds on this scenario")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
'''


def _harness_sources() -> dict[str, str]:
    sources = {"isolation_suite": _INIT}
    for rel in _embedded():
        name = "isolation_suite." + rel.replace("/", ".").replace(".__init__", "")
        sources[name] = (_PACKAGE / f"{rel}.py").read_text()
    return sources


def repro_script(technique: Technique, scenario: Scenario, device: str, headline: str,
                 filename: str = "repro.py", timeout: float | None = None) -> str:
    """The text of a standalone script reproducing ``technique`` on ``scenario``."""
    sources = _harness_sources()
    cls = type(technique)
    module_name = cls.__module__
    if module_name.startswith("isolation_suite.") and module_name in sources:
        technique_import = f"    from {module_name} import {cls.__name__}\n    technique = {cls.__name__}()"
    else:
        module = sys.modules[module_name]
        try:
            sources["repro_technique"] = inspect.getsource(module)
        except (OSError, TypeError) as exc:
            raise ValueError(f"cannot embed the source of {module_name!r}: {exc}") from None
        technique_import = f"    from repro_technique import {cls.__name__}\n    technique = {cls.__name__}()"
    packages = ["isolation_suite", *(f"isolation_suite.{package}" for package in ("engine", *_EMBEDDED_PACKAGES))]
    return _TEMPLATE.format(technique=technique.name, headline=headline.replace('"""', "'''"), device=device,
                            timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
                            filename=filename, sources=sources, packages=packages,
                            technique_import=technique_import, scenario_json=scenario.to_json())


def write_repro(path: Path, technique: Technique, scenario: Scenario, device: str, headline: str,
                timeout: float | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = repro_script(technique, scenario, device, headline, filename=path.name, timeout=timeout)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
