"""Seed 001: WeightDropout, and the parametrize way to do the same."""
from __future__ import annotations

import warnings

import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from isolation_suite.technique import Capability, Technique, reparam_param_name
from isolation_suite.techniques._util import replace_submodule

REPARAM = frozenset({Capability.REPARAMETERIZE})
#: the harness asks for a wrapper that must train exactly like the bare module
WEIGHT_P = 0.0


class WeightDropoutData(nn.Module):
    "fastai's 2020 WeightDropout, as quoted in seed 001: the `.data` detaches the raw weight."

    def __init__(self, module, weight_p, layer_names="weight_hh_l0"):
        super().__init__()
        self.module, self.weight_p = module, weight_p
        self.layer_names = [layer_names] if isinstance(layer_names, str) else list(layer_names)
        for layer in self.layer_names:
            # Makes a copy of the weights of the selected layers.
            w = getattr(self.module, layer)
            delattr(self.module, layer)
            self.register_parameter(f"{layer}_raw", nn.Parameter(w.data))
            setattr(self.module, layer, F.dropout(w.data, p=self.weight_p, training=False))
            if isinstance(self.module, nn.RNNBase):
                self.module.flatten_parameters = self._do_nothing

    def _setweights(self):
        for layer in self.layer_names:
            raw_w = getattr(self, f"{layer}_raw")
            setattr(self.module, layer, F.dropout(raw_w.data, p=self.weight_p, training=self.training))

    def forward(self, *args):
        self._setweights()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.module(*args)

    def _do_nothing(self):
        pass


class WeightDropoutFixed(WeightDropoutData):
    "The fix: dropout of the raw Parameter itself (gradient reaches it), a clone in eval."

    def _setweights(self):
        for layer in self.layer_names:
            raw_w = getattr(self, f"{layer}_raw")
            w = F.dropout(raw_w, p=self.weight_p, training=True) if self.training else raw_w.clone()
            setattr(self.module, layer, w)


class _Wrap(Technique):
    capabilities = REPARAM
    wrapper: type = WeightDropoutData

    def setup(self, model, intent):
        for path in intent.reparameterized:
            module = model.get_submodule(path)
            replace_submodule(model, path, self.wrapper(module, WEIGHT_P, reparam_param_name(module)))


class WeightDropoutDataTechnique(_Wrap):
    name = "weight_dropout_data"
    seed = "001"
    wrapper = WeightDropoutData
    # F.dropout(raw_w.data, ...) is outside autograd: the raw weights never get a gradient
    expected_violations = frozenset({"trainable-trains"})
    # ... and DistributedDataParallel, which reduces them, waits for it (see freeze_module)
    mode_violations = {"ddp": frozenset({"no-crash", "matches-reference"})}
    summary = "fastai 2020 WeightDropout: setattr(module, name, F.dropout(raw_w.data, ...))"


class WeightDropoutTechnique(_Wrap):
    name = "weight_dropout"
    seed = "001"
    wrapper = WeightDropoutFixed
    summary = "WeightDropout fixed: F.dropout(raw_w, ...) in training, raw_w.clone() in eval"


class DropConnect(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, weight):
        return F.dropout(weight, p=self.p, training=self.training)


class ParametrizeDropConnect(Technique):
    name = "parametrize_dropconnect"
    seed = ""
    capabilities = REPARAM
    summary = "torch.nn.utils.parametrize with a DropConnect module on the weight"

    def setup(self, model, intent):
        for path in intent.reparameterized:
            module = model.get_submodule(path)
            parametrize.register_parametrization(module, reparam_param_name(module), DropConnect(WEIGHT_P))
