"""Real libraries' recipes, judged through the plug-in contract, and the table of every library row.

Every library row is a ``Technique`` that calls the library's own code, with four more class
attributes: ``library`` (the distribution, as ``pip`` and ``importlib.metadata`` name it),
``judged_on`` (the version its declared verdicts were verified on), ``judged_models`` (the model
factories it was judged on; empty: generated models) and ``judged_modes`` (the execution modes its
verdicts were verified in). :func:`library_rows` lists them with the installed version, read from the
package metadata without importing the library; ``isolation-suite list``, ``docs/compatibility.md``
and the HTML report show them. The rows live in this module (Lightning),
:mod:`~isolation_suite.techniques.library_peft` (PEFT) and
:mod:`~isolation_suite.techniques.library_transformers` (transformers' gradient checkpointing).

Lightning's fine-tuning callbacks (``lightning.pytorch.callbacks.BaseFinetuning``, the base of
``BackboneFinetuning``) freeze a backbone with ``BaseFinetuning.freeze(modules, train_bn=...)`` and
ask for an optimizer over the parameters that still require gradient
(``filter(lambda p: p.requires_grad, self.parameters())``, as its docstring says); at its unfreeze
epoch ``BackboneFinetuning`` thaws the backbone with ``BaseFinetuning.unfreeze_and_add_param_group``,
which adds the thawed parameters to the optimizer as a new group (``lightning_backbone_finetuning``, a
``FREEZE_SCHEDULE`` row). The classes here call Lightning's own code, so the harness judges Lightning's
recipe, not a re-implementation of it.

What ``freeze`` does (lightning 2.6, ``lightning/pytorch/callbacks/finetuning.py``):

* ``flatten_modules(modules)`` lists the leaf modules and the containers that own parameters;
* a ``_BatchNorm`` among them goes, with ``train_bn=True``, to ``make_trainable``
  (``track_running_stats = True``; ``requires_grad = True`` on its own parameters): it keeps training;
* everything else goes to ``freeze_module``: ``requires_grad = False`` on its own parameters and,
  for a ``_BatchNorm``, ``track_running_stats = False``.

Nothing there calls ``eval()``: the frozen module stays in training mode. (Lightning's ``Trainer``
keeps each submodule's mode since 2.2 and warns "Found N module(s) in eval mode at the start of
training"; the harness calls ``model.train()`` before every step, as a training loop may.) So a
frozen BatchNorm normalises with batch statistics and a frozen Dropout keeps dropping, in both
variants.

``lightning`` is imported when a technique is *constructed* (and again, a no-op then, in ``setup``),
never when this module is: the module imports without it. Constructing, not ``setup``, because
importing Lightning replaces ``torch.compile`` for the whole process (``lightning_fabric.wrappers``
ends with ``torch.compile = _capture_compile_kwargs(torch.compile)``). Imported for the first time
inside a run, that patch is a global change the technique leaves behind, and the harness reports it
(``state-restored: torch.compile was replaced``) on every run, whatever the intent. Imported in the
process that builds the technique, before any run, it is part of the environment every run starts
from, and the verdict is about Lightning's freezing.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from isolation_suite.spec.mode_kinds import MODE_KINDS
from isolation_suite.technique import Capability, Technique
from isolation_suite.techniques.freeze_module import STARVES_REENTRANT_CHECKPOINT
from isolation_suite.techniques.library_peft import PEFT_TECHNIQUES
from isolation_suite.techniques.library_transformers import HF_TECHNIQUES

FREEZE = frozenset({Capability.FREEZE_MODULE})


def _base_finetuning():
    from lightning.pytorch.callbacks import BaseFinetuning
    return BaseFinetuning


class LightningFreeze(Technique):
    """``BaseFinetuning.freeze(frozen, train_bn=True)`` (Lightning's default), optimizer over
    ``filter(lambda p: p.requires_grad, model.parameters())``.

    Sound where the frozen module holds no BatchNorm and no Dropout (``FROZEN_LINEAR``, Rprop,
    OneCycleLR, clip-norm, colliding names: the frozen parameters are switched off and are not in the
    optimizer, so nothing can move them). With ``train_bn=True`` a BatchNorm inside the frozen module
    goes to ``make_trainable``: its weight and bias keep ``requires_grad=True``, are in the optimizer
    and move, and with ``track_running_stats=True`` in training mode it updates its running stats
    (``frozen-unchanged``; on ``FROZEN_BATCHNORM`` the first one reported is ``enc.bn.weight``). In
    training mode it also normalises with the batch's statistics, which differ from the eval-mode
    function the oracle freezes (``matches-reference``) and cancel a per-channel shift upstream: a bias
    before it gets a zero gradient (``gradient-flows``; with one feature and a batch of two the
    normalised output is +-1 whatever its input). That is Lightning's documented intent ("leave the
    BatchNorm layers in training mode"), but it is not a frozen module. Keeping the frozen module in
    eval mode does not fix this variant: the BatchNorm's affine parameters still train.
    """

    name = "lightning_freeze"
    capabilities = FREEZE
    expected_violations = frozenset({"gradient-flows", "frozen-unchanged", "matches-reference"})
    #: ``requires_grad = False``: a reentrant checkpoint fed only by frozen modules gets no gradient
    mode_violations = STARVES_REENTRANT_CHECKPOINT
    summary = "Lightning's BaseFinetuning.freeze(modules, train_bn=True); optimizer over requires_grad params"
    train_bn = True
    library = "lightning"
    judged_on = "2.6.6"
    judged_models = ()  # generated models
    judged_modes = ("eager", "checkpoint", "compile", "autocast", "ddp")

    def __init__(self) -> None:
        try:  # before any run: importing Lightning patches torch.compile (see the module docstring)
            _base_finetuning()
        except ImportError:  # setup then raises it, reported as no-crash, when a run needs Lightning
            pass

    def setup(self, model, intent):
        _base_finetuning().freeze([model.get_submodule(path) for path in intent.frozen_modules],
                                  train_bn=self.train_bn)

    def make_optimizer(self, model, intent, build):
        # what BaseFinetuning asks of configure_optimizers (and what BackboneFinetuning relies on)
        return build(filter(lambda p: p.requires_grad, model.parameters()))


class LightningFreezeNoBN(LightningFreeze):
    """``BaseFinetuning.freeze(frozen, train_bn=False)``, optimizer over the ``requires_grad`` parameters.

    Nothing frozen moves: ``freeze_module`` switches ``requires_grad`` off on every parameter of the
    frozen module, a BatchNorm's included, and sets ``track_running_stats = False`` on a BatchNorm.
    In training mode ``_BatchNorm.forward`` then passes no running stats to ``F.batch_norm``, so the
    buffers are not updated either (``frozen-unchanged`` holds). But nothing puts the frozen module in
    eval mode, and in training mode a BatchNorm normalises with the batch's statistics, whatever
    ``track_running_stats`` says (``bn_training = True if self.training``). (In eval mode it would use
    its running stats: ``track_running_stats=False`` set after construction leaves the buffers in
    place, and only ``running_mean is None`` switches eval mode to batch statistics.) So the frozen
    module is not the constant eval-mode function the oracle defines: losses and trained parameters
    differ (``matches-reference``; a frozen Dropout keeps dropping too), and the batch statistics
    cancel a per-channel shift upstream, so a bias before the BatchNorm gets a zero gradient
    (``gradient-flows``) or one so small, rounding noise, that it never moves (``trainable-trains``:
    with ``train_bn=True`` the moving BatchNorm weight is reported first). Run the frozen module in
    eval mode (the ``call`` hook) and this variant holds.
    """

    name = "lightning_freeze_no_bn"
    expected_violations = frozenset({"gradient-flows", "trainable-trains", "matches-reference"})
    mode_violations = STARVES_REENTRANT_CHECKPOINT
    summary = "Lightning's BaseFinetuning.freeze(modules, train_bn=False); optimizer over requires_grad params"
    train_bn = False


def _thawed_modules(old, new) -> list[str]:
    """The modules ``old`` froze that ``new`` freezes neither themselves nor inside a module it freezes."""
    return [path for path in old.frozen_modules
            if not any(path == f or path.startswith(f + ".") for f in new.frozen_modules)]


class LightningBackboneFinetuning(LightningFreeze):
    """``BackboneFinetuning``'s unfreezing recipe, through ``BaseFinetuning``'s own static methods: at the
    start ``freeze(frozen, train_bn=True)`` and an optimizer over the ``requires_grad`` parameters (as
    ``lightning_freeze``); at a step boundary of a freeze schedule, what ``finetune_function`` does at its
    unfreeze epoch, ``unfreeze_and_add_param_group(thawed, optimizer, initial_denom_lr=1.0,
    train_bn=True)`` (one call for every module thawed there, as ``BackboneFinetuning`` makes one for its
    backbone), then ``freeze(newly frozen, train_bn=True)`` for a module the schedule freezes (what a
    ``BaseFinetuning`` subclass calls: Lightning has no call that takes a parameter out of an optimizer).

    ``train_bn=True`` is what ``BackboneFinetuning`` freezes with whatever its own ``train_bn`` says
    (``freeze_before_training`` calls ``self.freeze(pl_module.backbone)``). The learning rate: the thawed
    group gets ``param_groups[0]["lr"] / initial_denom_lr``; with 1.0 that is the recipe's lr, which the
    oracle's reference gives a thawed module (``add_param_group`` with the recipe's hyper-parameters).
    ``BackboneFinetuning`` itself passes ``lr=current_lr * backbone_initial_ratio_lr`` (0.1 by default;
    Lightning's default ``initial_denom_lr=10`` divides the same way when no lr is given): a smaller lr by
    design, not an isolation fault, so the row is ``BackboneFinetuning(backbone_initial_ratio_lr=1.0)``,
    whose later epochs' ramp (``lambda_func``, aligned to the current lr by ``should_align``) then keeps
    the lr where it is. The harness's loop has no resume: Lightning#21901 (``setup`` re-freezes modules
    that were already unfrozen when a run resumes from a checkpoint) is not judged here.

    What it breaks, judged on generated models (Lightning 2.6.6, torch 2.13):

    * everything ``lightning_freeze`` breaks where a frozen module holds a BatchNorm or a Dropout, at
      every step it is frozen: with ``train_bn=True`` the BatchNorm's weight and bias train and its
      running stats update (``frozen-unchanged``; on ``THAW_BATCHNORM`` ``enc.bn.weight`` moves at step
      1), and in training mode it and a Dropout compute another function than the eval-mode one the
      oracle freezes (``matches-reference``), which can cancel or drop everything upstream
      (``gradient-flows``; ``trainable-trains`` where a frozen Dropout drops every unit a trainable layer
      downstream sees);
    * a module frozen at a boundary stays in the optimizer with ``requires_grad=False``: with
      ``zero_grad(set_to_none=False)`` it keeps a zero gradient that momentum, an adaptive optimizer or
      weight decay still move (``frozen-unchanged``, pytorch#83769's mechanism; on
      ``REFREEZE_MOMENTUM`` ``enc.weight`` moves at step 2). With ``set_to_none=True`` it does not move;
    * a module thawed again after that is still in the optimizer, so ``filter_on_optimizer`` skips it
      (with its warning "The provided params to be frozen already exist within another group"): it
      trains on with its old group's state (momentum, Adam's moments and step count), not the fresh
      state of a thawed module (``matches-reference``);
    * ``filter_on_optimizer`` tests membership with ``torch.equal``, by value, not identity: a thawed
      parameter whose values equal those of one already in the optimizer (a zero-initialised bias or a
      LayerNorm's ones and zeros that have not moved yet) is skipped, keeps ``requires_grad=True`` and
      never moves (``trainable-trains``; the same warning);
    * ``filter_params`` lists ``parameters(recurse=False)`` of every module ``flatten_modules`` finds,
      and nothing removes repeats: a parameter tied between two thawed modules (an embedding and its
      tied decoder inside one backbone) is put in the new group twice, and the optimizer steps it twice
      (``matches-reference``; torch warns "optimizer contains a parameter group with duplicate
      parameters").

    Under ``checkpoint``, ``requires_grad=False`` starves a reentrant checkpoint fed only by frozen
    modules, as for every such row (``trainable-trains``; where nothing else reaches the loss it has no
    gradient at all: ``gradient-flows``); both are already declared. Under ``ddp`` (the model wrapped
    after ``setup``), DistributedDataParallel registered only the parameters that required gradient when
    it was built: a module thawed later trains, but its gradient is never averaged (each rank steps on
    its own half of the batch: ``matches-reference``; ``trainable-trains`` where Rprop's sign test on a
    rank's own gradient skips a step the average takes), with any ``find_unused_parameters`` or
    ``static_graph`` (Lightning#20340). And a module frozen at a boundary is one DDP still expects a
    gradient for: with DDP's defaults or ``static_graph=True`` the next forward raises "Expected to
    have finished reduction in the prior iteration" (``no-crash``); with ``find_unused_parameters=True``
    DDP skips it. ``compile`` and ``autocast`` add nothing.
    """

    name = "lightning_backbone_finetuning"
    # like unfreeze_add_param_group: following a schedule includes freezing (``engine.sweep.covers``)
    capabilities = frozenset({Capability.FREEZE_SCHEDULE})
    expected_violations = frozenset({"frozen-unchanged", "gradient-flows", "matches-reference", "trainable-trains"})
    mode_violations = {"ddp": frozenset({"matches-reference", "no-crash"})}
    summary = ("BackboneFinetuning's recipe: BaseFinetuning.freeze(modules, train_bn=True), optimizer over "
               "requires_grad params; at a boundary unfreeze_and_add_param_group(thawed, optimizer, "
               "initial_denom_lr=1.0) and freeze(newly frozen)")
    library = "lightning"
    judged_on = "2.6.6"
    judged_models = ()  # generated models
    judged_modes = ("eager", "checkpoint", "compile", "autocast", "ddp")
    #: the thawed group's lr is the first group's divided by this (Lightning's default 10; 1.0: the recipe's lr)
    initial_denom_lr = 1.0

    def on_intent_change(self, model, optimizer, old, new):
        finetuning = _base_finetuning()
        thawed = _thawed_modules(old, new)
        if thawed:  # what BackboneFinetuning.finetune_function does at its unfreeze epoch, in one call
            finetuning.unfreeze_and_add_param_group([model.get_submodule(path) for path in thawed], optimizer,
                                                    initial_denom_lr=self.initial_denom_lr, train_bn=self.train_bn)
        frozen = [path for path in new.frozen_modules if path not in old.frozen_modules]
        if frozen:
            finetuning.freeze([model.get_submodule(path) for path in frozen], train_bn=self.train_bn)
        return None


LIGHTNING_TECHNIQUES = (LightningFreeze, LightningFreezeNoBN, LightningBackboneFinetuning)
#: every library row, by library
LIBRARY_TECHNIQUES = LIGHTNING_TECHNIQUES + PEFT_TECHNIQUES + HF_TECHNIQUES


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (from its metadata: nothing is imported), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class LibraryRow:
    """One library technique, as the compatibility table shows it."""

    technique: type[Technique]

    @property
    def name(self) -> str:
        return self.technique.name

    @property
    def library(self) -> str:
        return self.technique.library

    @property
    def judged_on(self) -> str:
        return self.technique.judged_on

    @property
    def spec(self) -> str:
        """How to name it on the command line (``isolation-suite check SPEC``)."""
        return f"{self.technique.__module__}:{self.technique.__qualname__}"

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.technique.judged_models)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.technique.judged_modes)

    def installed(self) -> str | None:
        return installed_version(self.library)

    def expected(self, mode: str) -> frozenset[str]:
        """``expected_in(mode)``, read off the class: constructing a Lightning row imports Lightning."""
        return Technique.expected_in(self.technique, mode)

    def verdict(self, mode: str) -> str | None:
        """The declared verdict in ``mode``: ``"sound"`` or the expected invariants, sorted and joined;
        None where the row was not judged in that mode."""
        if mode not in self.modes:
            return None
        return ", ".join(sorted(self.expected(mode))) or "sound"

    def verdict_line(self) -> str:
        """The eager verdict, then what each other judged mode adds: ``sound; under checkpoint: ...``."""
        eager = self.expected("eager")
        parts = [", ".join(sorted(eager)) or "sound"]
        for mode in self.modes:
            extra = sorted(self.expected(mode) - eager)
            if extra:
                parts.append(f"under {mode}: " + ", ".join(extra))
        return "; ".join(parts)


def library_rows() -> tuple[LibraryRow, ...]:
    """Every library row, in :data:`LIBRARY_TECHNIQUES` order; none is constructed and no library
    imported."""
    return tuple(LibraryRow(t) for t in LIBRARY_TECHNIQUES)


def library_modes(rows: tuple[LibraryRow, ...] | None = None) -> tuple[str, ...]:
    """The execution modes any row was judged in, in ``spec.mode_kinds`` order."""
    judged = {m for row in (library_rows() if rows is None else rows) for m in row.modes}
    return tuple(m for m in MODE_KINDS if m in judged) + tuple(sorted(judged - set(MODE_KINDS)))
