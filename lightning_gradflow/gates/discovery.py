r"""Which modules have gates, and how PyTorch lays them out.

:func:`find_gated_modules` finds every ``nn.LSTM`` (any ``num_layers``, ``bidirectional``, ``batch_first``,
``proj_size``), ``nn.GRU``, ``nn.LSTMCell`` and ``nn.GRUCell``. Other modules join by name:

* ``"sigmoid"``: the module's output (or the first element of a tuple output) is the gate's *pre-activation* ``z``
  and the model applies ``σ(z)`` to it. Its last dimension holds the units, every other dimension is a position.
  If the module is an ``nn.Linear``, its rows can be repaired (``z = W x + b``); otherwise it is monitored only.
* ``"sigmoid_output"``: the module's output already is ``σ(z)`` (values in ``[0, 1]``); ``z`` is recovered as
  ``logit`` (clamped to ``[1e-6, 1 − 1e-6]``, i.e. ``|z| ≤ 13.8``). Monitored only.

**Gate order.** PyTorch packs the gates row-wise: LSTM ``W_ih = [W_ii; W_if; W_ig; W_io]`` (input, forget, cell,
output), GRU ``[W_ir; W_iz; W_in]`` (reset, update, new), each block ``hidden_size`` rows; the same for ``W_hh``,
``b_ih`` and ``b_hh``. The cell gate ``g`` and the GRU's new gate ``n`` use tanh, the others the sigmoid. The GRU's
new gate is ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``: its recurrent term, bias included, is scaled by the
reset gate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from lightning_gradflow.flow import layer_path

GateFamily = Literal["lstm", "gru", "sigmoid"]
EXTRA_GATE_KINDS: tuple[str, ...] = ("sigmoid", "sigmoid_output")

LSTM_GATES: tuple[str, ...] = ("input", "forget", "cell", "output")
GRU_GATES: tuple[str, ...] = ("reset", "update", "new")
SIGMOID_GATES: tuple[str, ...] = ("gate",)
ALL_GATES: tuple[str, ...] = LSTM_GATES + GRU_GATES + SIGMOID_GATES
TANH_GATES = frozenset({"cell", "new"})
#: Gates whose healthy bias is ``forget_bias`` rather than 0: they decide how much of the old state is kept.
MEMORY_GATES = frozenset({"forget", "update"})


# ------------------------------------------------------------------------------------------------- finding gates


@dataclass(frozen=True)
class GatedModule:
    """A module with gates and how to read them.

    Attributes:
        name: the module's dotted path in the model (``""`` for the model itself).
        module: the module.
        family: ``"lstm"``, ``"gru"`` or ``"sigmoid"`` (a gate named in ``extra_gates``).
        cell: whether it is an ``nn.LSTMCell``/``nn.GRUCell`` (one time step per call).
        output_is_activation: for ``"sigmoid"`` modules, whether the output is ``σ(z)`` rather than ``z``.
        units: units per gate (``hidden_size``; ``out_features`` of an ``nn.Linear``; ``None`` until the first
            output of another module has been seen).
    """

    name: str
    module: nn.Module
    family: GateFamily
    cell: bool = False
    output_is_activation: bool = False
    units: int | None = None

    @property
    def gates(self) -> tuple[str, ...]:
        """Gate names in PyTorch's row order."""
        return {"lstm": LSTM_GATES, "gru": GRU_GATES, "sigmoid": SIGMOID_GATES}[self.family]

    @property
    def num_directions(self) -> int:
        """2 for a bidirectional ``nn.LSTM``/``nn.GRU``, else 1."""
        return 2 if getattr(self.module, "bidirectional", False) and not self.cell else 1

    @property
    def num_layers(self) -> int:
        """Stacked layers (1 for cells and ``extra_gates``)."""
        return int(getattr(self.module, "num_layers", 1)) if self.family != "sigmoid" else 1

    @property
    def num_rows(self) -> int:
        """Layer/direction rows of the statistics: ``num_layers · num_directions``."""
        return self.num_layers * self.num_directions

    def row_names(self) -> list[str]:
        """``l0``, ``l0_reverse``, ``l1``, … as in PyTorch's parameter names."""
        suffixes = ["", "_reverse"][: self.num_directions]
        return [f"l{k}{s}" for k in range(self.num_layers) for s in suffixes]

    @property
    def tanh_mask(self) -> list[bool]:
        """Per gate, whether it uses tanh (the LSTM cell gate, the GRU new gate)."""
        return [g in TANH_GATES for g in self.gates]

    @property
    def repairable(self) -> bool:
        """Whether :func:`repair_gate_units_` can change its rows."""
        return self.family != "sigmoid" or (isinstance(self.module, nn.Linear) and not self.output_is_activation)

    def with_units(self, units: int) -> GatedModule:
        """A copy with the unit count filled in."""
        return GatedModule(self.name, self.module, self.family, self.cell, self.output_is_activation, units)


def find_gated_modules(
    model: nn.Module, extra_gates: Mapping[str, str] | None = None, exclude: Sequence[str] | None = None
) -> list[GatedModule]:
    """Every gated module in ``model``, in registration order.

    Args:
        model: the model to search.
        extra_gates: dotted module path → ``"sigmoid"`` or ``"sigmoid_output"`` (see the module docstring).
        exclude: dotted module paths to leave out; excluding a module excludes everything inside it.

    Raises:
        ValueError: for a path in ``extra_gates`` or ``exclude`` that is not a module of ``model``, or an unknown
            kind in ``extra_gates``.
    """
    extra_gates = dict(extra_gates or {})
    exclude = list(exclude or [])
    modules = dict(model.named_modules())
    for arg, names in (("extra_gates", list(extra_gates)), ("exclude", exclude)):
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(
                f"`{arg}` names {missing}, which {'is' if len(missing) == 1 else 'are'} not a module of"
                f" {type(model).__name__}. Use dotted paths from `model.named_modules()`, e.g."
                f" {[n for n in modules if n][:5]}."
            )
    for name, kind in extra_gates.items():
        if kind not in EXTRA_GATE_KINDS:
            raise ValueError(f"Expected `extra_gates[{name!r}]` to be one of {EXTRA_GATE_KINDS}, but got {kind!r}.")

    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") or e == "" for e in exclude)

    found = []
    for name, module in modules.items():
        if excluded(name):
            continue
        gated = _builtin_gates(name, module)
        if name in extra_gates:
            gated = _extra_gate(name, module, extra_gates[name])
        if gated is not None:
            found.append(gated)
    return found


def _builtin_gates(name: str, module: nn.Module) -> GatedModule | None:
    if isinstance(module, nn.LSTM):
        return GatedModule(name, module, "lstm", units=module.hidden_size)
    if isinstance(module, nn.GRU):
        return GatedModule(name, module, "gru", units=module.hidden_size)
    if isinstance(module, nn.LSTMCell):
        return GatedModule(name, module, "lstm", cell=True, units=module.hidden_size)
    if isinstance(module, nn.GRUCell):
        return GatedModule(name, module, "gru", cell=True, units=module.hidden_size)
    return None


def _extra_gate(name: str, module: nn.Module, kind: str) -> GatedModule:
    units = module.out_features if isinstance(module, nn.Linear) else None
    return GatedModule(name, module, "sigmoid", output_is_activation=kind == "sigmoid_output", units=units)


def layer_parameters(gated: GatedModule, layer: int, direction: int) -> dict[str, Tensor]:
    """The parameters of one layer and direction, under their names without the ``_l{k}[_reverse]`` suffix.

    ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``, ``weight_hr`` (the present ones); for an ``extra_gates``
    ``nn.Linear``: ``weight``, ``bias``.
    """
    module = gated.module
    if gated.family == "sigmoid":
        return {k: v for k, v in (("weight", module.weight), ("bias", module.bias)) if isinstance(v, Tensor)}
    suffix = "" if gated.cell else f"_l{layer}{'_reverse' if direction else ''}"
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    params = {name: getattr(module, name + suffix, None) for name in names}
    return {name: p for name, p in params.items() if isinstance(p, Tensor)}


def gate_key(module_name: str, row_name: str, gate: str) -> str:
    """The tag path of one gate of one layer/direction: ``"encoder/lstm/l0_reverse/forget"``.

    Example::

        >>> gate_key("encoder.lstm", "l0_reverse", "forget")
        'encoder/lstm/l0_reverse/forget'
    """
    return f"{layer_path(module_name)}/{row_name}/{gate}"
