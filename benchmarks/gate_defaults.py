"""``GateSurgeryCallback(auto_intervene=True)`` with default arguments on saturated and healthy char-RNNs.

Each case is a character language model (embedding → ``nn.LSTM``/``nn.GRU`` → linear head, Adam) on one of two
corpora — tinyshakespeare (``../shared/data/tinyshakespeare.txt`` beside the checkout) and the docstrings of the
Python standard library (:func:`lightning_gradflow.demo.corpus.build_corpus`) — with one saturation pattern written
into the biases of every layer at initialisation (total bias ±8, σ(−8) ≈ 3e-4):

* ``io_shut``: LSTM input and output gates shut (the issue-17 scenario);
* ``forget_open`` / ``forget_shut``: LSTM forget gates saturated open (σ ≈ 1) / shut (σ ≈ 0);
* ``update_open`` / ``update_shut``: GRU update gates saturated open (the state never changes) / shut;
* ``reset_shut``: GRU reset gates shut (no recurrence into the candidate);
* ``healthy``: PyTorch's initialisation (the twin that must be left alone).

Every case is trained three times from the same seed: without the callback (``none``), with
``GateSurgeryCallback()`` (``monitor``: its weights must be bitwise identical to ``none``) and with
``GateSurgeryCallback(auto_intervene=True)`` (``auto``). The final loss is the mean cross-entropy on held-out windows
after the last step. A saturated case passes when every saturated gate of every layer was repaired within the first
30 steps and ``auto / none ≤ 0.8``; a healthy one when ``auto`` made no surgery and ``monitor`` is bitwise ``none``.
Each saturated case also shows its healthy twin's loss and ``healthy / none``, the ratio a perfect repair would reach:
where the saturated run heals itself within the run (shallow models), it is above 0.8 and no surgery can pass.

Usage (from the repository root)::

    python benchmarks/gate_defaults.py            # the full grid (about 10 minutes on 2 CPU cores)
    python benchmarks/gate_defaults.py --quick    # a few cases
    python benchmarks/gate_defaults.py --cases lstm-io_shut-h64-l2-shakespeare --steps 300
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradflow import GateSurgeryCallback
from lightning_gradflow.demo.corpus import CharData, build_corpus

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
#: Gate blocks by name, in PyTorch's order (LSTM: i, f, g, o; GRU: r, z, n).
GATE_INDEX = {"lstm": {"input": 0, "forget": 1, "cell": 2, "output": 3}, "gru": {"reset": 0, "update": 1, "new": 2}}
#: Saturation patterns: the total bias written into gate blocks of every layer.
PATTERNS: dict[str, dict[str, float]] = {
    "healthy": {},
    "io_shut": {"input": -8.0, "output": -8.0},
    "forget_open": {"forget": 8.0},
    "forget_shut": {"forget": -8.0},
    "update_open": {"update": 8.0},
    "update_shut": {"update": -8.0},
    "reset_shut": {"reset": -8.0},
}
SURGERY_DEADLINE = 30
MAX_RATIO = 0.8


@dataclass(frozen=True)
class Case:
    """One model, corpus and saturation pattern."""

    kind: str
    pattern: str
    hidden: int
    layers: int
    corpus: str

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.pattern}-h{self.hidden}-l{self.layers}-{self.corpus}"

    @classmethod
    def parse(cls, name: str) -> Case:
        kind, pattern, hidden, layers, corpus = name.split("-")
        return cls(kind, pattern, int(hidden[1:]), int(layers[1:]), corpus)


def grid() -> list[Case]:
    """The full grid: LSTM and GRU, each pattern, 1-3 layers, hidden 32-128, both corpora."""
    cases = []
    shapes = [(64, 1, "shakespeare"), (128, 2, "shakespeare"), (32, 3, "stdlib"), (64, 2, "stdlib")]
    patterns = {"lstm": ("io_shut", "forget_open", "forget_shut"), "gru": ("update_open", "update_shut", "reset_shut")}
    for kind, saturated in patterns.items():
        for pattern in (*saturated, "healthy"):
            cases += [Case(kind, pattern, h, n, corpus) for h, n, corpus in shapes]
    return cases


QUICK = [
    Case("lstm", "io_shut", 64, 2, "shakespeare"),
    Case("gru", "update_open", 64, 2, "stdlib"),
    Case("lstm", "healthy", 64, 2, "shakespeare"),
    Case("gru", "healthy", 64, 2, "stdlib"),
]


@cache
def corpus_text(corpus: str, max_chars: int = 200_000) -> str:
    """The corpus's first ``max_chars`` characters; ``FileNotFoundError`` when tinyshakespeare is not beside us."""
    if corpus == "shakespeare":
        return SHAKESPEARE.read_text(encoding="utf-8")[:max_chars]
    if corpus == "stdlib":
        return build_corpus()[:max_chars]
    raise ValueError(f"Expected a corpus 'shakespeare' or 'stdlib', but got {corpus!r}.")


def loaders(corpus: str, seq_len: int, batch_size: int, held_out: int) -> tuple[DataLoader, Tensor, Tensor, int]:
    """Training windows (shuffled with a fixed seed), ``held_out`` evaluation windows and the vocabulary size."""
    data = CharData.from_text(corpus_text(corpus), seq_len)
    inputs, targets = data.dataset.tensors
    train = TensorDataset(inputs[:-held_out], targets[:-held_out])
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen, drop_last=True)
    return loader, inputs[-held_out:], targets[-held_out:], len(data.vocab)


class CharRNN(LightningModule):
    """Embedding → ``nn.LSTM``/``nn.GRU`` → linear head, cross-entropy, Adam."""

    def __init__(self, kind: str, vocab: int, hidden: int, layers: int, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(vocab, 32)
        rnn_type = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = rnn_type(32, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, inputs: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(inputs))
        return self.head(out)

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(self(inputs).flatten(0, 1), targets.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.loss(*batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def saturate_(rnn: nn.Module, kind: str, pattern: str) -> None:
    """Writes ``PATTERNS[pattern]`` into the biases of every layer (``b_ih`` = value, ``b_hh`` = 0)."""
    h = rnn.hidden_size
    with torch.no_grad():
        for gate, value in PATTERNS[pattern].items():
            rows = slice(GATE_INDEX[kind][gate] * h, (GATE_INDEX[kind][gate] + 1) * h)
            for name, p in rnn.named_parameters():
                if name.startswith("bias_ih"):
                    p[rows] = value
                elif name.startswith("bias_hh"):
                    p[rows] = 0.0


def saturated_keys(case: Case) -> set[str]:
    """The gate keys (``rnn/l<k>/<gate>``) the pattern saturates."""
    return {f"rnn/l{k}/{gate}" for k in range(case.layers) for gate in PATTERNS[case.pattern]}


def run_arm(case: Case, arm: str, steps: int, seed: int = 0, batch_size: int = 32, seq_len: int = 64) -> dict[str, Any]:
    """Trains ``case`` for ``steps`` steps with the callback of ``arm`` (``none``, ``monitor``, ``auto``)."""
    loader, held_x, held_y, vocab = loaders(case.corpus, seq_len, batch_size, held_out=64)
    seed_everything(seed, verbose=False)
    model = CharRNN(case.kind, vocab, case.hidden, case.layers)
    saturate_(model.rnn, case.kind, case.pattern)
    callback = {"none": None, "monitor": GateSurgeryCallback(), "auto": GateSurgeryCallback(auto_intervene=True)}[arm]
    trainer = Trainer(
        max_steps=steps,
        callbacks=[callback] if callback is not None else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        deterministic=True,
    )
    trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        final = float(model.loss(held_x, held_y))
    records = [r for r in callback.interventions if r.kind == "gate_surgery" and r.applied] if callback else []
    return {
        "final": final,
        "surgeries": [(r.step, r.target) for r in records],
        "weights": [p.detach().clone() for p in model.parameters()],
    }


_NONE_RUNS: dict[tuple[Case, int, int], dict[str, Any]] = {}


def run_plain(case: Case, steps: int, seed: int) -> dict[str, Any]:
    """The ``none`` arm of ``case``, run once per process (healthy twins are the saturated cases' reference)."""
    key = (case, steps, seed)
    if key not in _NONE_RUNS:
        _NONE_RUNS[key] = run_arm(case, "none", steps, seed)
    return _NONE_RUNS[key]


def evaluate(case: Case, steps: int, seed: int = 0) -> dict[str, Any]:
    """All arms of one case and whether it passes (see the module docstring)."""
    none = run_plain(case, steps, seed)
    auto = run_arm(case, "auto", steps, seed)
    healthy = run_plain(Case(case.kind, "healthy", case.hidden, case.layers, case.corpus), steps, seed)
    ratio = auto["final"] / none["final"]
    repaired = {key for _, key in auto["surgeries"]}
    counts: dict[int, int] = {}
    for step, _ in auto["surgeries"]:
        counts[step] = counts.get(step, 0) + 1
    steps_done = [f"{step}({n})" for step, n in sorted(counts.items())]  # step(gates repaired)
    row: dict[str, Any] = {
        "case": case.name,
        "surgery_steps": steps_done,
        "surgeries": auto["surgeries"],
        "repaired": sorted(repaired),
        "none": none["final"],
        "auto": auto["final"],
        "ratio": ratio,
        "healthy": healthy["final"],
        "best_ratio": healthy["final"] / none["final"],  # the ratio of a perfect repair: the healthy twin's
    }
    if case.pattern == "healthy":
        monitor = run_arm(case, "monitor", steps, seed)
        identical = all(torch.equal(a, b) for a, b in zip(monitor["weights"], none["weights"], strict=True))
        row["monitor_identical"] = identical
        row["passed"] = not auto["surgeries"] and identical
    else:
        early = {key for step, key in auto["surgeries"] if step < SURGERY_DEADLINE}
        row["all_repaired_early"] = saturated_keys(case) <= early
        row["passed"] = row["all_repaired_early"] and ratio <= MAX_RATIO
    return row


def quiet() -> None:
    """Silences Lightning's start-up chatter and the callback's warnings (the table reports what it did)."""
    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--quick", action="store_true", help="only a few cases")
    parser.add_argument("--cases", default=None, help="comma-separated case names (kind-pattern-hH-lL-corpus)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    cases = [Case.parse(c) for c in args.cases.split(",")] if args.cases else QUICK if args.quick else grid()
    print(f"python benchmarks/gate_defaults.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, Adam 3e-3, batch 32x64")
    header = (
        f"{'model':<26} {'pattern':<12} {'seed':>4} {'surgeries':<22} {'none':>7} {'auto':>7} {'ratio':>6}"
        f" {'healthy':>7} {'h/none':>6}  ok"
    )
    print(header)
    print("-" * len(header))
    failed = 0
    for seed in (int(s) for s in args.seeds.split(",")):
        for case in cases:
            try:
                row = evaluate(case, args.steps, seed)
            except FileNotFoundError as err:
                print(f"{case.name}: skipped ({err})")
                continue
            model = f"{case.kind} h{case.hidden} l{case.layers} {case.corpus}"
            when = ",".join(map(str, row["surgery_steps"])) or "-"
            check = "yes" if row["passed"] else "NO"
            if case.pattern == "healthy":
                check += "" if row["monitor_identical"] else " (monitor not bitwise)"
            print(
                f"{model:<26} {case.pattern:<12} {seed:>4} {when:<22} {row['none']:>7.3f} {row['auto']:>7.3f}"
                f" {row['ratio']:>6.2f} {row['healthy']:>7.3f} {row['best_ratio']:>6.2f}  {check}",
                flush=True,
            )
            failed += not row["passed"]
    print("surgeries: step(gates repaired at that step); none / auto / healthy: held-out loss after the last step of")
    print("the saturated run without / with the callback and of its healthy twin; h/none: a perfect repair's ratio")
    print(f"{failed} case(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
