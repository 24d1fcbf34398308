"""Real libraries' freezing, judged through the plug-in contract.

Lightning's fine-tuning callbacks (``lightning.pytorch.callbacks.BaseFinetuning``, the base of
``BackboneFinetuning``) freeze a backbone with ``BaseFinetuning.freeze(modules, train_bn=...)`` and
ask for an optimizer over the parameters that still require gradient
(``filter(lambda p: p.requires_grad, self.parameters())``, as its docstring says). The classes here
call Lightning's own code, so the harness judges Lightning's recipe, not a re-implementation of it.

What ``freeze`` does (lightning 2.6, ``lightning/pytorch/callbacks/finetuning.py``):

* ``flatten_modules(modules)`` lists the leaf modules and the containers that own parameters;
* a ``_BatchNorm`` among them goes, with ``train_bn=True``, to ``make_trainable``
  (``track_running_stats = True``; ``requires_grad = True`` on its own parameters): it keeps training;
* everything else goes to ``freeze_module``: ``requires_grad = False`` on its own parameters and,
  for a ``_BatchNorm``, ``track_running_stats = False``.

Nothing there calls ``eval()``: the frozen module runs in whatever mode the model is in, and
Lightning's ``Trainer``, like the harness, trains with ``model.train()``. So a frozen Dropout keeps
dropping, in both variants (``matches-reference``).

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

from .technique import Capability, Technique

FREEZE = frozenset({Capability.FREEZE_MODULE})


def _base_finetuning():
    from lightning.pytorch.callbacks import BaseFinetuning
    return BaseFinetuning


class LightningFreeze(Technique):
    """``BaseFinetuning.freeze(frozen, train_bn=True)`` (Lightning's default), optimizer over
    ``filter(lambda p: p.requires_grad, model.parameters())``.

    Sound where the frozen module holds no BatchNorm and no Dropout. With ``train_bn=True`` a
    BatchNorm inside the frozen module is handed to ``make_trainable``: its weight and bias keep
    ``requires_grad=True``, so they are in the optimizer and move (``frozen-unchanged``: the first
    violation reported on ``FROZEN_BATCHNORM`` is ``enc.bn.weight`` moving), and with
    ``track_running_stats=True`` in training mode it normalises with batch statistics and updates its
    running stats (``frozen-unchanged`` on the buffers, ``matches-reference`` on the loss). That is
    Lightning's documented intent ("leave the BatchNorm layers in training mode"), but it is not a
    frozen module: the oracle's frozen module is the constant eval-mode function.
    """

    name = "lightning_freeze"
    capabilities = FREEZE
    expected_violations = frozenset({"frozen-unchanged", "matches-reference"})
    summary = "Lightning's BaseFinetuning.freeze(modules, train_bn=True); optimizer over requires_grad params"
    train_bn = True

    def __init__(self) -> None:
        try:  # before any run: importing Lightning patches torch.compile (see the module docstring)
            _base_finetuning()
        except ImportError:  # setup says so, as a no-crash, when a run needs it
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
    frozen module, BatchNorm's included, and sets ``track_running_stats = False`` on a BatchNorm, so
    its running stats are no longer updated either. But ``track_running_stats=False`` also changes
    what the BatchNorm computes: ``_BatchNorm.forward`` normalises with the *batch's* statistics
    whenever the running stats are not tracked, in training mode and in eval mode alike. The frozen
    module is then not the constant eval-mode function the oracle defines (running statistics), and
    the output and every later loss differ (``matches-reference``); a Dropout inside it keeps
    dropping too. ``frozen-unchanged`` holds.
    """

    name = "lightning_freeze_no_bn"
    expected_violations = frozenset({"matches-reference"})
    summary = "Lightning's BaseFinetuning.freeze(modules, train_bn=False); optimizer over requires_grad params"
    train_bn = False


LIBRARY_TECHNIQUES = (LightningFreeze, LightningFreezeNoBN)
