"""The declaration tables: every execution mode's row provides every behaviour, every layer kind is
declared once with its torch side and its draw keyed by the same names, every subset of kinds is
computed from the rows, and the package's top-level imports make no circle."""
import ast
import dataclasses
import pathlib

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import strategies
from isolation_suite.execution import ddp, modes
from isolation_suite.model import layers
from isolation_suite.model.build import param_shapes, train_mode
from isolation_suite.spec import kinds, mode_kinds
from isolation_suite.spec.mode_kinds import ModeKind
from isolation_suite.spec.scenario import Mode, ScenarioError
from isolation_suite.strategies import _draft
from isolation_suite.strategies.scenarios import MODE_DRAWS
from isolation_suite.techniques import PLACEMENTS

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "isolation_suite"


# --- execution modes ---------------------------------------------------------------------------

def _required(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def test_the_behaviours_of_a_mode_have_no_default_so_every_row_sets_each_itself():
    assert _required(modes.ModeInfo) - _required(ModeKind) == set(modes.BEHAVIOURS)
    assert "show" in _required(ModeKind)


@pytest.mark.parametrize("row", modes.MODE_INFOS, ids=lambda row: row.kind)
def test_every_mode_row_provides_every_behaviour(row):
    for name in ("before_setup", "before_training", "autocast", "launch", "show"):
        assert callable(getattr(row, name)), (row.kind, name)
    assert isinstance(row.grace, float) and row.grace >= 0 and isinstance(row.retire, bool)
    autocast = {device: row.autocast(device) for device in ("cpu", "cuda")}
    assert all(dtype is None or dtype.is_floating_point for dtype in autocast.values())
    assert row.show(Mode(row.kind)).startswith(row.kind) and repr(Mode(row.kind)) == row.show(Mode(row.kind))
    # the torch row extends the declared one, field for field
    declared = mode_kinds.BY_KIND[row.kind]
    assert all(getattr(row, f.name) == getattr(declared, f.name) for f in dataclasses.fields(ModeKind))
    # the per-kind tables of the strategies and the catalog say what this mode draws and where it goes
    assert row.kind in MODE_DRAWS and row.kind in PLACEMENTS


def test_the_mode_tables_list_the_same_modes_in_order():
    assert tuple(modes.MODE_BY_KIND) == mode_kinds.MODE_KINDS == tuple(MODE_DRAWS) == tuple(PLACEMENTS)
    assert Mode().kind == mode_kinds.DEFAULT == mode_kinds.MODE_KINDS[0] and Mode().eager


def test_a_modes_ranks_are_the_processes_its_launch_starts():
    for row in modes.MODE_INFOS:
        if row.distributed:
            assert row.launch is ddp.run and row.ranks == ddp.WORLD and row.grace == ddp.GRACE
        else:
            assert row.launch is modes.one_process and row.ranks == 1 and row.grace == 0.0


def test_mode_subsets_come_from_the_rows():
    assert mode_kinds.modes_where(targeted=True) == ("checkpoint", "compile")
    assert mode_kinds.modes_where(recomputes=True) == ("checkpoint",)
    assert mode_kinds.modes_where(wraps_trainable=True) == ("ddp",)
    assert tuple(r.kind for r in mode_kinds.MODES if r.distributed) == ("ddp", "fsdp")
    assert mode_kinds.modes_where(shards_parameters=True) == ("fsdp",)
    assert tuple(r.kind for r in modes.MODE_INFOS if r.autocast("cpu") is not None) == ("autocast",)
    assert modes.MODE_BY_KIND["autocast"].autocast("cuda") is torch.float16


@pytest.mark.parametrize("kind", mode_kinds.MODE_KINDS)
def test_a_boolean_option_belongs_to_the_modes_that_declare_it(kind):
    row = mode_kinds.BY_KIND[kind]
    for option in ("reentrant", "find_unused", "static_graph", "nested", "keep_gathered"):
        if option in row.flags:
            assert getattr(Mode(kind, **{option: True}), option)
        else:
            with pytest.raises(ScenarioError, match=f"a {kind} mode has no {option}"):
                Mode(kind, **{option: True})
    if not row.targeted:
        with pytest.raises(ScenarioError, match="has no target"):
            Mode(kind, target="blk")


# --- layer kinds -------------------------------------------------------------------------------

def test_the_kind_table_the_torch_table_and_the_draws_cover_the_same_kinds():
    assert tuple(layers.BY_KIND) == kinds.LAYER_KINDS == tuple(kinds.BY_KIND)
    assert tuple(_draft.DRAW_ARGS) == kinds.LAYER_KINDS


@pytest.mark.parametrize("name, members, non_members", [
    ("TUPLE_KINDS", {"lstm", "mha"}, {"linear", "dropout"}),
    ("REPARAM_KINDS", {"linear", "conv2d", "gru"}, {"embedding", "layernorm", "dropout"}),
    ("SHAPE_PRESERVING", {"linear", "conv1d", "dropout"}, {"embedding"}),
    ("PARAM_KINDS", {"linear", "embedding", "batchnorm1d"}, {"dropout"}),
    ("STATELESS_KINDS", {"dropout"}, {"linear"}),
    ("TRAIN_MODE_KINDS", {"batchnorm1d", "batchnorm2d", "dropout"}, {"linear", "layernorm", "groupnorm"}),
    ("BATCH_STATISTICS_KINDS", {"batchnorm1d", "batchnorm2d"}, {"layernorm", "groupnorm", "dropout"}),
    ("RANDOM_KINDS", {"dropout"}, {"batchnorm1d"}),
    ("TOKEN_KINDS", {"embedding"}, {"linear"}),
    ("FLOAT_KINDS", {"linear", "dropout", "mha"}, {"embedding"}),
    ("REUSABLE_KINDS", {"linear", "lstm", "batchnorm2d"}, {"embedding", "dropout"}),
])
def test_each_subset_of_kinds_is_computed_from_the_rows(name, members, non_members):
    subset = getattr(kinds, name)
    assert subset and members <= set(subset) and not non_members & set(subset)
    assert set(subset) <= set(kinds.LAYER_KINDS)
    assert list(subset) == [k for k in kinds.LAYER_KINDS if k in subset]  # in table order


def test_kinds_where_reads_the_rows():
    assert kinds.kinds_where(reparam_weight="weight_hh_l0") == ("lstm", "gru", "rnn")
    assert kinds.kinds_where(parameters=True, takes_tokens=False) == kinds.REUSABLE_KINDS
    assert kinds.in_place("seq", chained=True) == ("linear", "layernorm", "dropout")


@pytest.mark.parametrize("module, kind, effect", [
    (nn.BatchNorm1d(2), "batchnorm1d", kinds.BATCHNORM_EFFECT),
    (nn.BatchNorm3d(2), "batchnorm", kinds.BATCHNORM_EFFECT),
    (nn.BatchNorm2d(2, track_running_stats=False).eval(), "batchnorm2d", ""),
    (nn.Dropout2d(0.5), "dropout", kinds.DROPOUT_EFFECT),
    (nn.Dropout(0.0), "dropout", ""),
    (layers.SeededDropout(0.5), "dropout", kinds.DROPOUT_EFFECT),
    (nn.InstanceNorm1d(2), "instancenorm", ""),
    (nn.LayerNorm(2), "layernorm", ""),
    (nn.ReLU(), "ReLU", ""),
])
def test_a_users_module_gets_its_kind_and_training_mode_effect_from_the_rows(module, kind, effect):
    assert layers.kind_of(module) == kind and layers.train_mode_effect(module) == effect


@settings(max_examples=40, database=None, deadline=None)
@given(strategies.architectures(max_blocks=4))
def test_every_drawn_layer_is_what_its_rows_declare(arch):
    for layer in arch.layers:
        info = kinds.BY_KIND[layer.kind]
        with torch.device("meta"):
            module = layers.build_layer(layer.kind, layer.kwargs)
        assert isinstance(module, layers.BY_KIND[layer.kind].cls) and layers.kind_of(module) == layer.kind
        names = {name for name, _ in param_shapes(layer.kind, layer.args)}
        assert bool(names) == info.parameters
        assert not info.reparam_weight or info.reparam_weight in names
        assert bool(train_mode(layer.kind, layer.args)) == (bool(info.train_mode) and layer.kwargs.get("p") != 0)


def test_a_layer_that_declares_it_keeps_its_input_shape():
    cases = [("linear", dict(in_features=3, out_features=3), (2, 3)),
             ("lstm", dict(input_size=3, hidden_size=3), (2, 4, 3)),
             ("layernorm", dict(normalized_shape=3), (2, 3)),
             ("groupnorm", dict(num_groups=1, num_channels=2), (2, 2, 3)),
             ("batchnorm1d", dict(num_features=2), (2, 2, 3)),
             ("mha", dict(embed_dim=4, num_heads=2), (2, 3, 4))]
    for kind, args, shape in cases:
        assert kinds.BY_KIND[kind].keeps_shape(args), kind
        module, x = layers.build_layer(kind, args), torch.randn(shape)
        out = module(x, x, x) if kinds.BY_KIND[kind].called_with == "x,x,x" else module(x)
        assert (out[0] if kinds.BY_KIND[kind].returns_tuple else out).shape == x.shape, kind
    assert not kinds.BY_KIND["linear"].keeps_shape(dict(in_features=3, out_features=2))
    assert not kinds.BY_KIND["conv1d"].keeps_shape(dict(in_channels=2, out_channels=2, kernel_size=1))


# --- the import graph --------------------------------------------------------------------------

def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _top_level(tree: ast.Module, type_checking: bool = False):
    """The import statements a module runs when it is imported: at module level, in ``if``/``try``
    blocks there, but not inside a function or class, nor (unless ``type_checking``) under ``if
    TYPE_CHECKING:``."""
    def walk(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, ast.If):
                if type_checking or not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    yield from walk(block)
    yield from walk(tree.body)


def _targets(node, module: str, is_package: bool, known) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    base = node.module or ""
    if node.level:  # relative: from the module's package, up level - 1 more
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in known else base)  # a submodule, else a name of the module itself
    return [m for m in out if m in known]


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    graph = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        graph[module] = {t for node in _top_level(tree) for t in _targets(node, module, is_package, known)
                         if t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None
    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "isolation_suite.strategies._draft" in graph["isolation_suite.strategies.architectures"]
    assert "isolation_suite.strategies.reuse" in graph["isolation_suite.strategies.architectures"]


def test_the_packages_top_level_imports_make_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "top-level imports in a circle: " + " -> ".join(cycle)


#: modules whose imports of the package are all at the top (a late import hides a circle)
NO_LATE_IMPORTS = ("strategies", "techniques", "spec", "model/build.py", "model/layers.py", "model/tree.py",
                   "execution/modes.py", "judging/coverage.py")


def test_no_late_imports_of_the_package_in_the_tables_and_strategies():
    late = []
    for name in NO_LATE_IMPORTS:
        root = PACKAGE / name
        for path in sorted(root.rglob("*.py") if root.is_dir() else [root]):
            tree = ast.parse(path.read_text(), str(path))
            top = set(map(id, _top_level(tree, type_checking=True)))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    if any(n.startswith("isolation_suite") for n in names) or getattr(node, "level", 0):
                        late.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not late, f"function-level imports of the package: {late}"


@pytest.mark.parametrize("row", layers.LAYERS, ids=lambda row: row.kind)
def test_every_kind_has_a_tiny_example_that_trains(row):
    """``warm_up_kernels`` runs these, and swallows a failure (speed only): a broken example would
    silently warm nothing, so each is run here."""
    arguments, shape = row.example
    assert arguments and shape, f"{row.kind} has no example"
    layers._example_forward(row).sum().backward()


def test_the_kernel_warm_up_runs_every_example_once_per_process_and_leaves_the_process_as_it_was(monkeypatch):
    """... and runs no backward: on a machine with a GPU, autograd's first backward starts device
    threads that a child forked after it cannot use."""
    ran, backward = [], []
    real = layers._example_forward
    monkeypatch.setattr(layers, "_KERNELS_WARM", [])
    monkeypatch.setattr(layers, "_example_forward", lambda row: ran.append(row.kind) or real(row))
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: backward.append(1))
    rng = torch.get_rng_state()
    layers.warm_up_kernels()
    layers.warm_up_kernels()
    assert torch.is_grad_enabled() and not backward
    assert ran == [row.kind for row in layers.LAYERS]
    assert torch.equal(torch.get_rng_state(), rng)


def test_settling_the_process_before_a_fork_runs_the_kernel_warm_up(monkeypatch):
    from isolation_suite.execution import sandbox
    called = []
    monkeypatch.setattr(sandbox, "warm_up_kernels", lambda: called.append(1))
    sandbox.settle_lazy_imports()
    assert called
