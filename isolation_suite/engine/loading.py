"""``load_technique("pkg.module:attr")``: a user's technique, or one clear error."""
from __future__ import annotations

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
    return technique


def _call(factory, spec: str) -> Technique:
    try:
        return factory()
    except Exception as exc:  # noqa: BLE001
        raise TechniqueLoadError(f"creating {spec} failed: {type(exc).__name__}: {exc}") from None
