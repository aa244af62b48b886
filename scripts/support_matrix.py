"""The support matrix: one list of Trainer set-ups every callback is tested under, with the outcome each must have.

``tests/test_support_matrix.py`` runs every cell with all the callbacks of :data:`CALLBACK_FACTORIES` attached,
and ``python -m scripts.support_table`` prints the README's table from the same list, so the table cannot drift from
what is tested.

The cells are a covering design, not the cartesian product (which would not fit a 2-core CI): every value of every
axis appears, and so do the pairs that exercise distinct code paths: fp16 + GradScaler with accumulation and with a
fused optimizer (gradients still scaled in ``on_before_optimizer_step``), manual optimization with several
optimizers, with DDP and with the GradScaler, resume with fp16 and accumulation, and ``torch.compile`` in fp32.

It lives beside the table script, not in ``tests/``: the script and the tests import it as ``scripts.support_matrix``
(from the repository root), and it imports no test code, only the package.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning.pytorch import Callback

from lightning_gradflow import GateSurgeryCallback, GradientFlowCallback

Precision = Literal["32", "bf16-mixed", "16-mixed"]
Optimization = Literal["automatic", "manual"]
Strategy = Literal["single", "ddp"]
#: ``"adam+sgd"`` is two optimizers (LSTM / the rest), which Lightning allows only in manual optimization.
Optimizers = Literal["adam", "sgd", "adamw", "adam-fused", "adam+sgd"]


@dataclass(frozen=True)
class Outcome:
    """What a cell must do.

    Args:
        error: ``None`` when training must pass; else the exception's class name ...
        match: ... and a regular expression its message must match (``re.search``).
        documented: the error as the README table states it.
    """

    error: str | None = None
    match: str = ""
    documented: str = ""

    @property
    def passes(self) -> bool:
        """Whether training must pass."""
        return self.error is None


PASSES = Outcome()


@dataclass(frozen=True)
class Cell:
    """One Trainer set-up.

    Args:
        precision: ``"16-mixed"`` is run with a ``GradScaler`` injected on the CPU (Lightning would silently use
            bf16 there), so the scaler's unscale, overflow and skipped-step paths are exercised.
        accumulate: ``Trainer(accumulate_grad_batches=...)``.
        optimization: automatic or manual (``self.automatic_optimization = False``).
        strategy: one process, or DDP with 2 CPU (gloo) processes.
        resume: fit to a mid-run checkpoint written by ``ModelCheckpoint``, then resume from it in a new Trainer
            with new callback instances.
        cli: the run is configured by a LightningCLI YAML file (callbacks as ``class_path``/``init_args``).
        compile: the LightningModule is ``torch.compile``-d before ``fit``.
        optimizers: the optimizer(s).
        outcome: passes, or the documented error.
        xfail: a known bug (the test is marked ``xfail(strict=True)`` with this reason).
        slow: marks the test ``slow``.
    """

    precision: Precision = "32"
    accumulate: int = 1
    optimization: Optimization = "automatic"
    strategy: Strategy = "single"
    resume: bool = False
    cli: bool = False
    compile: bool = False
    optimizers: Optimizers = "adam"
    outcome: Outcome = field(default=PASSES)
    xfail: str | None = None
    slow: bool = False

    @property
    def id(self) -> str:
        """The test id, e.g. ``p32-acc1-automatic-single-adam-resume``."""
        parts = [f"p{self.precision}", f"acc{self.accumulate}", self.optimization, self.strategy, self.optimizers]
        parts += [flag for flag in ("resume", "cli", "compile") if getattr(self, flag)]
        return "-".join(parts)


_LIGHTNING_MANUAL_ACCUMULATION = Outcome(
    error="MisconfigurationException",
    match="Automatic gradient accumulation is not supported for manual optimization",
    documented="Lightning refuses it at set-up (accumulate by hand in `training_step`)",
)

#: Every cell the callbacks are tested under (the README table lists them in this order).
CELLS: list[Cell] = [
    # precision × accumulation × optimizer, automatic optimization, one process
    Cell("32", 1, optimizers="adam"),
    Cell("32", 4, optimizers="sgd"),
    Cell("bf16-mixed", 1, optimizers="adamw"),
    Cell("bf16-mixed", 4, optimizers="adam"),
    Cell("16-mixed", 1, optimizers="adam"),
    Cell("16-mixed", 4, optimizers="sgd"),
    Cell("16-mixed", 1, optimizers="adam-fused"),  # fused: gradients are still scaled in on_before_optimizer_step
    # manual optimization, one and two optimizers
    Cell("32", 1, "manual", optimizers="adam"),
    Cell("32", 1, "manual", optimizers="adam+sgd"),
    Cell("bf16-mixed", 1, "manual", optimizers="adam+sgd"),
    Cell("16-mixed", 1, "manual", optimizers="adam"),
    Cell("32", 4, "manual", optimizers="adam", outcome=_LIGHTNING_MANUAL_ACCUMULATION),
    # resume from a mid-run checkpoint
    Cell("32", 1, resume=True, optimizers="adam"),
    Cell("16-mixed", 4, resume=True, optimizers="adam"),
    Cell("32", 1, "manual", resume=True, optimizers="adam+sgd"),
    # LightningCLI YAML and torch.compile
    Cell("32", 1, cli=True, optimizers="adam"),
    Cell("bf16-mixed", 4, cli=True, optimizers="sgd"),
    Cell("32", 1, compile=True, optimizers="adam", slow=True),
    # DDP, 2 CPU processes (run together in one spawned pair of processes)
    Cell("32", 1, strategy="ddp", optimizers="adam", slow=True),
    Cell("32", 1, "manual", strategy="ddp", optimizers="adam+sgd", slow=True),
    Cell("16-mixed", 4, strategy="ddp", optimizers="sgd", slow=True),
    Cell("bf16-mixed", 1, strategy="ddp", optimizers="adam-fused", slow=True),
]

# --------------------------------------------------------------------------------------------- the callbacks


@dataclass(frozen=True)
class CallbackSpec:
    """One callback to attach to every cell: its class, cheap constructor arguments and its tag family.

    Args:
        cls: the callback class.
        kwargs: constructor arguments (plain values, so a LightningCLI YAML can hold them too).
        family: the prefix of the tags it logs (``"gradflow"`` → ``gradflow/...``).
    """

    cls: type[Callback]
    kwargs: dict[str, Any]
    family: str

    @property
    def name(self) -> str:
        """The class name (the key in :data:`CALLBACK_FACTORIES`)."""
        return self.cls.__name__

    @property
    def class_path(self) -> str:
        """The import path LightningCLI takes (``class_path``)."""
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    def __call__(self) -> Callback:
        """A fresh instance."""
        return self.cls(**self.kwargs)


def _supported(cls: type, **wanted: Any) -> dict[str, Any]:
    """The subset of ``wanted`` that ``cls``'s constructor accepts (for callbacks whose arguments may still change)."""
    parameters = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in wanted.items() if k in parameters}


#: Callback name → factory (call it for a fresh instance). Built from what is importable, so callbacks still being
#: written join the matrix as soon as they exist.
CALLBACK_FACTORIES: dict[str, CallbackSpec] = {
    "GradientFlowCallback": CallbackSpec(
        GradientFlowCallback,
        # a fixed, tiny clip threshold: every step is clipped, so every cell records interventions to restore
        {
            "auto_intervene": True,
            "clip_mode": "norm",
            "clip_value": 1e-2,
            "log_every_n_steps": 1,
            "histogram_every_n_steps": 2,
            "figure_every_n_steps": 4,
        },
        "gradflow",
    ),
    # the matrix model's forget gates start saturated: surgery happens at step 0 in every cell
    "GateSurgeryCallback": CallbackSpec(
        GateSurgeryCallback, {"auto_intervene": True, "every_n_steps": 1, "patience": 1}, "gates"
    ),
}

try:
    from lightning_gradflow.callbacks.sharpness import SharpnessCallback
except ImportError:  # pragma: no cover - being written
    pass
else:
    CALLBACK_FACTORIES["SharpnessCallback"] = CallbackSpec(
        SharpnessCallback,
        _supported(
            SharpnessCallback,
            every_n_steps=2,
            num_hvps=4,
            trace_hvps=3,
            random_directions=1,
            auto_intervene=True,
        ),
        "sharpness",
    )

try:
    from lightning_gradflow.callbacks.early_collapse import EarlyCollapseCallback
except ImportError:  # pragma: no cover - being written
    pass
else:
    CALLBACK_FACTORIES["EarlyCollapseCallback"] = CallbackSpec(
        EarlyCollapseCallback,
        _supported(
            EarlyCollapseCallback, every_n_steps=2, log_every_n_steps=1, snapshot_every_n_steps=2, auto_intervene=True
        ),
        "collapse",
    )


def callbacks() -> list[Callback]:
    """Fresh instances of every registered callback."""
    return [spec() for spec in CALLBACK_FACTORIES.values()]


#: Documented refusals: callback name → (the cells it refuses, its error). A refusing callback is checked to raise
#: that error at set-up; the cell then runs with the other callbacks, which must pass.
REFUSALS: dict[str, tuple[Callable[[Cell], bool], Outcome]] = {
    "SharpnessCallback": (
        lambda cell: cell.optimization == "manual",
        Outcome(
            error="MisconfigurationException",
            match="under manual optimization would step the optimizer",
            documented="refuses manual optimization at set-up unless its `loss_fn(pl_module, batch)` is overridden",
        ),
    ),
}


def refusals(cell: Cell) -> dict[str, Outcome]:
    """The registered callbacks that refuse ``cell``, with their documented errors."""
    return {name: o for name, (applies, o) in REFUSALS.items() if name in CALLBACK_FACTORIES and applies(cell)}


#: Known bugs, found by the matrix: callback name → [(the cells it breaks, why)]. In such a cell the callback is
#: left out of the run that must pass, and a separate ``xfail(strict=True)`` test runs the cell with it attached
#: (so the test fails, as XPASS, once the bug is fixed and the entry can go).
KNOWN_BUGS: dict[str, list[tuple[Callable[[Cell], bool], str]]] = {}


def known_bugs(cell: Cell) -> dict[str, str]:
    """The registered callbacks with a known bug in ``cell``: name → reason."""
    found: dict[str, str] = {}
    for name, entries in KNOWN_BUGS.items():
        reasons = [reason for applies, reason in entries if applies(cell)]
        if name in CALLBACK_FACTORIES and reasons and cell.outcome.passes:
            found[name] = "; ".join(reasons)
    return found


def attached(cell: Cell) -> list[str]:
    """The callbacks a cell must pass with: all registered ones, less those that refuse it or have a known bug."""
    left_out = {*refusals(cell), *known_bugs(cell)}
    return [name for name in CALLBACK_FACTORIES if name not in left_out]


# ----------------------------------------------------------------------------------------------------- table


def _yes(flag: bool) -> str:
    return "✓" if flag else ""


def _notes(cells: list[Cell]) -> dict[str, int]:
    """Footnote text → number, in order of first use."""
    notes: dict[str, int] = {}
    for cell in cells:
        for text in _cell_notes(cell):
            notes.setdefault(text, len(notes) + 1)
    return notes


def _cell_notes(cell: Cell) -> list[str]:
    texts = [f"`{name}` raises `{o.error}`: it {o.documented}." for name, o in refusals(cell).items()]
    texts += [f"`{name}`: known issue, {reason}." for name, reason in known_bugs(cell).items()]
    return texts


def outcome_text(cell: Cell, notes: dict[str, int] | None = None) -> str:
    """The outcome column of the README table (footnote marks refer to ``notes``)."""
    if not cell.outcome.passes:
        return f"`{cell.outcome.error}`: {cell.outcome.documented}"
    if cell.xfail:
        return f"known issue: {cell.xfail}"
    notes = _notes([cell]) if notes is None else notes
    marks = [f"[{number}]" for number in sorted(notes[text] for text in _cell_notes(cell))]
    return "passes" + (f" except {', '.join(marks)}" if marks else "")


_OPTIMIZER_TEXT: dict[str, str] = {
    "adam": "Adam",
    "sgd": "SGD (momentum)",
    "adamw": "AdamW",
    "adam-fused": "Adam (fused)",
    "adam+sgd": "Adam + SGD (2 optimizers)",
}
_PRECISION_TEXT: dict[str, str] = {"32": "32", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed (GradScaler)"}


def table_rows(cells: list[Cell] | None = None) -> list[list[str]]:
    """The table as rows of cells (header first)."""
    cells = CELLS if cells is None else cells
    notes = _notes(cells)
    header = ["precision", "accumulate", "optimization", "strategy", "optimizers", "resume", "CLI", "compile"]
    rows = [[*header, "outcome"]]
    for cell in cells:
        rows.append(
            [
                _PRECISION_TEXT[cell.precision],
                str(cell.accumulate),
                cell.optimization,
                "DDP (2 processes)" if cell.strategy == "ddp" else "single device",
                _OPTIMIZER_TEXT[cell.optimizers],
                _yes(cell.resume),
                _yes(cell.cli),
                _yes(cell.compile),
                outcome_text(cell, notes),
            ]
        )
    return rows


def support_table_markdown(cells: list[Cell] | None = None) -> str:
    """The README's support-matrix table (Markdown), from :data:`CELLS`, with its footnotes."""
    cells = CELLS if cells is None else cells
    rows = table_rows(cells)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    names = ", ".join(f"`{name}`" for name in CALLBACK_FACTORIES)
    lines += ["", f"Every cell runs with {names} attached, less those a note names (`tests/test_support_matrix.py`)."]
    notes = _notes(cells)
    if notes:
        lines.append("")
        lines += [f"[{number}] {text}" + ("  " if number < len(notes) else "") for text, number in notes.items()]
    return "\n".join(lines)
