"""``load_technique("pkg.module:attr")``: a user's technique, or one clear error."""
from __future__ import annotations

from isolation_suite.judging.invariants import INVARIANTS
from isolation_suite.judging.judge import as_technique
from isolation_suite.spec.objects import import_object
from isolation_suite.technique import Capability, Technique
from isolation_suite.techniques import catalog


class TechniqueLoadError(ValueError):
    """The spec does not name a loadable technique; the message says why in one line."""


def technique_of(technique: "str | Technique | type[Technique]") -> Technique:
    """A technique given any way the API takes one: an instance, a subclass, or its spec (a catalog
    name or ``pkg.module:attr``, as on the command line)."""
    return load_technique(technique) if isinstance(technique, str) else as_technique(technique)


def load_technique(spec: str) -> Technique:
    """Load ``pkg.module:attr`` (a Technique instance, subclass, or zero-argument factory).

    A bare name without ``:`` is looked up in the built-in catalog.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TechniqueLoadError(f"technique spec must be 'pkg.module:attr' or a catalog name, got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        built_in = catalog()
        if spec in built_in:
            return built_in[spec]
        raise TechniqueLoadError(f"unknown technique {spec!r}: not in the catalog (see 'isolation-suite list'), "
                                 "and a plug-in needs the form 'pkg.module:attr'")
    obj = import_object(spec, "technique", TechniqueLoadError)
    if isinstance(obj, Technique):
        technique = obj
    elif isinstance(obj, type) and issubclass(obj, Technique):
        technique = _call(obj, spec)
    elif callable(obj):
        technique = _call(obj, spec)
        if not isinstance(technique, Technique):
            raise TechniqueLoadError(f"{spec} returned {type(technique).__name__}, not an isolation_suite.Technique")
    else:
        raise TechniqueLoadError(f"{spec} is a {type(obj).__name__}, not a Technique instance, class or factory")
    if not technique.capabilities:
        raise TechniqueLoadError(f"{spec} declares no capabilities: set capabilities = frozenset({{...}})")
    bad = [c for c in technique.capabilities if not isinstance(c, Capability)]
    if bad:
        raise TechniqueLoadError(f"{spec} declares capabilities {bad!r}: use isolation_suite.Capability members, "
                                 f"e.g. Capability.FREEZE_MODULE")
    declared = [*technique.expected_violations, *(i for ids in technique.mode_violations.values() for i in ids)]
    unknown = sorted({i for i in declared if i not in INVARIANTS})
    if unknown:  # a misspelt id would never match: the known-bad technique could never be "caught"
        raise TechniqueLoadError(f"{spec} expects violations of {', '.join(map(repr, unknown))}, which are not "
                                 f"invariant ids: choose from {', '.join(INVARIANTS)}")
    return technique


def unique_names(techniques: "dict[str, Technique]") -> None:
    """Each technique of a run has a name of its own: its records and report rows are keyed by it."""
    by_name: dict[str, list[str]] = {}
    for spec, technique in techniques.items():
        by_name.setdefault(technique.name, []).append(spec)
    for name, specs in by_name.items():
        if len(specs) > 1:
            raise TechniqueLoadError(f"{' and '.join(specs)} are both named {name!r}: a run keys its records "
                                     "and report rows by technique name; give each its own name")


def _call(factory, spec: str) -> Technique:
    try:
        return factory()
    except Exception as exc:  # noqa: BLE001
        raise TechniqueLoadError(f"creating {spec} failed: {type(exc).__name__}: {exc}") from None
