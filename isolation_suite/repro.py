"""Standalone repro scripts: the minimal counterexample, runnable with nothing but torch.

The script embeds the harness modules it needs (specs, builder, runner,
reference, invariants) and the technique's own module as source text, serves
them through an import hook, and re-runs the check. It exits 1 while the
violation reproduces and 0 once it is fixed.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

from .scenario import Scenario
from .technique import Technique

_PACKAGE = Path(__file__).resolve().parent
#: harness modules the script needs; none of them imports hypothesis
_EMBEDDED = ("scenario", "technique", "build", "runner", "reference", "invariants",
             "techniques/__init__", "techniques/_util", "techniques/conditions", "techniques/pass_through",
             "techniques/freeze_module", "techniques/freeze_elements", "techniques/reparameterize")

_INIT = '''"""A minimal isolation_suite for a repro script (embedded, torch only)."""
from .scenario import Architecture, Data, Intent, Layer, Op, OptimizerRecipe, Scenario
from .technique import Capability, Role, Technique


def catalog():
    from .techniques import catalog as built_in
    return built_in()
'''

_TEMPLATE = '''#!/usr/bin/env python
"""Repro: {technique} -> {headline}

Device: {device}. Needs only torch: python {filename}
Exits 1 while the violation reproduces, 0 once the technique is fixed.
"""
import importlib.abc
import importlib.util
import sys

SOURCES = {sources!r}
PACKAGES = {packages!r}


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


sys.meta_path.insert(0, _Embedded())
for _name in [n for n in sys.modules if n == "isolation_suite" or n.startswith("isolation_suite.")]:
    del sys.modules[_name]

from isolation_suite.invariants import Context, evaluate  # noqa: E402
from isolation_suite.reference import Reference  # noqa: E402
from isolation_suite.runner import TechniqueDriver, run  # noqa: E402
from isolation_suite.scenario import Scenario  # noqa: E402
{technique_import}

SCENARIO = {scenario_json!r}
DEVICE = {device!r}


def main():
    scenario = Scenario.from_json(SCENARIO)
    print(repr(scenario))
    reference = run(scenario, Reference(), DEVICE)
    trace = run(scenario, TechniqueDriver(technique), DEVICE)
    violations = evaluate(Context(scenario, trace, reference))
    for violation in violations:
        print(violation)
    if trace.crash is not None:
        print(trace.crash.detail)
    print("reproduced" if violations else "not reproduced: the technique holds on this scenario")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
'''


def _harness_sources() -> dict[str, str]:
    sources = {"isolation_suite": _INIT}
    for rel in _EMBEDDED:
        name = "isolation_suite." + rel.replace("/", ".").replace(".__init__", "")
        sources[name] = (_PACKAGE / f"{rel}.py").read_text()
    return sources


def repro_script(technique: Technique, scenario: Scenario, device: str, headline: str,
                 filename: str = "repro.py") -> str:
    """The text of a standalone script reproducing ``technique`` on ``scenario``."""
    sources = _harness_sources()
    cls = type(technique)
    module_name = cls.__module__
    if module_name.startswith("isolation_suite.") and module_name in sources:
        technique_import = f"from {module_name} import {cls.__name__}\ntechnique = {cls.__name__}()"
    else:
        module = sys.modules[module_name]
        try:
            sources["repro_technique"] = inspect.getsource(module)
        except (OSError, TypeError) as exc:
            raise ValueError(f"cannot embed the source of {module_name!r}: {exc}") from None
        technique_import = f"from repro_technique import {cls.__name__}\ntechnique = {cls.__name__}()"
    packages = ["isolation_suite", "isolation_suite.techniques"]
    return _TEMPLATE.format(technique=technique.name, headline=headline.replace('"""', "'''"), device=device,
                            filename=filename, sources=sources, packages=packages,
                            technique_import=technique_import, scenario_json=scenario.to_json())


def write_repro(path: Path, technique: Technique, scenario: Scenario, device: str, headline: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = repro_script(technique, scenario, device, headline, filename=path.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
