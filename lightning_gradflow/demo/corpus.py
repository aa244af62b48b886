"""The project's main job: a short, real Lightning training run that logs the engine's per-layer statistics.

A character-level LSTM language model learns to write like the Python standard library's docstrings (the corpus is
assembled with :func:`inspect.getdoc`, so nothing is downloaded). While it trains,
:class:`~lightning_gradflow.GradientFlowCallback` computes every layer's gradient and update statistics with the
fused engine in :mod:`lightning_gradflow.stats`, keeps them on the device, and on logging steps brings them to the
host in one transfer and hands them to every attached logger; TensorBoard also gets the per-layer gradient
histograms binned on the device, the gradient-flow figure and a custom-scalars layout.

Run it with ``python -m lightning_gradflow.demo`` (or the ``gradflow-demo`` console script), then
``tensorboard --logdir runs/gradflow-demo``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradflow.callbacks import GradientFlowCallback
from lightning_gradflow.stats import Backend

_BACKENDS: tuple[str, ...] = get_args(Backend)

#: Standard-library modules whose docstrings (and those of their public classes and functions) form the corpus.
CORPUS_MODULES: tuple[str, ...] = (
    "argparse",
    "bisect",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "itertools",
    "json",
    "logging",
    "math",
    "operator",
    "os",
    "pathlib",
    "pprint",
    "random",
    "re",
    "shlex",
    "statistics",
    "string",
    "textwrap",
    "typing",
    "unittest",
    "zipfile",
)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def build_corpus(modules: Sequence[str] = CORPUS_MODULES) -> str:
    """Concatenates the docstrings of standard-library modules and of the public classes and functions they define.

    The text is deterministic for a given Python version: modules and members are visited in a fixed order,
    repeated docstrings are kept once, and only printable ASCII and newlines are kept.

    Args:
        modules: importable module names.

    Returns:
        The corpus, docstrings separated by blank lines.
    """
    docs: list[str] = []
    seen: set[str] = set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        members = [getattr(module, name) for name in sorted(vars(module)) if not name.startswith("_")]
        owned = [
            m
            for m in members
            if (inspect.isclass(m) or inspect.isroutine(m)) and getattr(m, "__module__", None) == module_name
        ]
        for obj in (module, *owned):
            with warnings.catch_warnings():  # deprecated aliases (e.g. typing.io) warn when their docs are read
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    text = "\n\n".join(docs)
    return "".join(ch for ch in text if ch == "\n" or " " <= ch <= "~")


@dataclass(frozen=True)
class CharData:
    """A corpus encoded as character ids, cut into ``(input, next-character target)`` windows.

    Args:
        vocab: the characters, index = id.
        dataset: ``TensorDataset(inputs, targets)``, both ``(num_windows, seq_len)`` long tensors.
    """

    vocab: str
    dataset: TensorDataset

    @classmethod
    def from_text(cls, text: str, seq_len: int) -> CharData:
        """Encodes ``text`` and cuts it into non-overlapping windows of ``seq_len`` characters.

        Args:
            text: the corpus.
            seq_len: characters per training window.
        """
        vocab = "".join(sorted(set(text)))
        index = {ch: i for i, ch in enumerate(vocab)}
        ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
        n = (ids.numel() - 1) // seq_len
        if n < 1:
            raise ValueError(f"Expected a corpus longer than `seq_len`={seq_len} characters, but got {len(text)}.")
        inputs = ids[: n * seq_len].view(n, seq_len)
        targets = ids[1 : n * seq_len + 1].view(n, seq_len)
        return cls(vocab, TensorDataset(inputs, targets))


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class CharLSTM(LightningModule):
    """Character-level language model: embedding → stacked single-layer LSTMs → linear head.

    The LSTMs are separate modules (``lstm.0``, ``lstm.1``, …) so each appears as a layer of its own in the
    per-layer statistics.

    Args:
        vocab_size: number of distinct characters.
        embed_dim: embedding width.
        hidden_size: LSTM width.
        num_layers: number of stacked LSTMs.
        lr: Adam learning rate.
    """

    def __init__(
        self, vocab_size: int, embed_dim: int = 32, hidden_size: int = 128, num_layers: int = 2, lr: float = 3e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.embed = nn.Embedding(vocab_size, embed_dim)
        sizes = [embed_dim] + [hidden_size] * num_layers
        self.lstm = nn.ModuleList(nn.LSTM(sizes[i], sizes[i + 1], batch_first=True) for i in range(num_layers))
        self.head = nn.Linear(hidden_size, vocab_size)
        self.first_loss: Tensor | None = None
        self.last_loss: Tensor | None = None

    def forward(self, ids: Tensor) -> Tensor:
        """Next-character logits, shape ``(batch, seq_len, vocab_size)``.

        Args:
            ids: ``(batch, seq_len)`` character ids.
        """
        h = self.embed(ids)
        for lstm in self.lstm:
            h, _ = lstm(h)
        return self.head(h)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of the next character (nats per character).

        Args:
            batch: ``(inputs, targets)`` character ids.
            batch_idx: index of the batch in the epoch.
        """
        inputs, targets = batch
        logits = self(inputs)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        self.log("train/loss", loss, prog_bar=True)
        # Kept as device tensors: reading them here would synchronise with the host on every step.
        self.last_loss = loss.detach()
        if self.first_loss is None:
            self.first_loss = self.last_loss
        return loss

    def configure_optimizers(self) -> Optimizer:
        """Adam over every parameter."""
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ----------------------------------------------------------------------------------------------------------------
# The statistics callback (a stand-in until GradientFlowCallback lands)
# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The demo's command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_gradflow.demo",
        description="Train a small character-level LSTM on standard-library docstrings and log per-layer gradient"
        " statistics from the lightning_gradflow engine to TensorBoard.",
    )
    parser.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps (default: 200)")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("runs/gradflow-demo"), help="TensorBoard root (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--log-every-n-steps", type=_positive_int, default=10, help="log statistics every N steps (default: 10)"
    )
    parser.add_argument(
        "--histogram-every-n-steps",
        type=_non_negative_int,
        default=50,
        help="write gradient histograms about every N steps, on logging steps; 0: never (default: 50)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="windows per batch (default: 32)")
    parser.add_argument("--seq-len", type=_positive_int, default=64, help="characters per window (default: 64)")
    parser.add_argument("--hidden-size", type=_positive_int, default=128, help="LSTM width (default: 128)")
    parser.add_argument("--num-layers", type=_positive_int, default=2, help="stacked LSTMs (default: 2)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    parser.add_argument(
        "--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto, ... (default: cpu)"
    )
    parser.add_argument(
        "--backend", choices=_BACKENDS, default="auto", help="statistics engine backend (default: auto)"
    )
    parser.add_argument(
        "--no-progress-bar", action="store_true", help="hide Lightning's progress bar (it is shown by default)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Trains the demo model and prints where the TensorBoard logs are.

    Args:
        argv: command-line arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status, 0 on success.
    """
    args = build_parser().parse_args(argv)
    seed_everything(args.seed, workers=True, verbose=False)

    data = CharData.from_text(build_corpus(), args.seq_len)
    loader = DataLoader(data.dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model = CharLSTM(len(data.vocab), hidden_size=args.hidden_size, num_layers=args.num_layers, lr=args.lr)
    gradflow = GradientFlowCallback(
        log_every_n_steps=args.log_every_n_steps,
        histogram_every_n_steps=args.histogram_every_n_steps,
        backend=args.backend,
    )
    logger = TensorBoardLogger(save_dir=str(args.output_dir), name="", default_hp_metric=False)
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.steps,
        max_epochs=-1,
        logger=logger,
        callbacks=[gradflow],
        log_every_n_steps=args.log_every_n_steps,
        enable_checkpointing=False,
        enable_progress_bar=not args.no_progress_bar,
        default_root_dir=str(args.output_dir),
    )
    print(
        f"Corpus: {len(data.dataset) * args.seq_len:,} characters of standard-library docstrings,"
        f" {len(data.vocab)} distinct; {len(data.dataset) // args.batch_size} batches per epoch."
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        # The data are an in-memory tensor: worker processes would only add start-up time.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, train_dataloaders=loader)
    elapsed = time.perf_counter() - start

    print()
    print(f"Trained {trainer.global_step} steps in {elapsed:.1f} s.")
    if model.first_loss is not None and model.last_loss is not None:
        uniform = math.log(len(data.vocab))
        print(
            f"Training loss: {float(model.first_loss):.3f} at the first step -> {float(model.last_loss):.3f} at the"
            f" last (nats per character; a uniform guess over {len(data.vocab)} characters scores {uniform:.3f})."
        )
    prefix = "gradflow/grad_norm/"
    norms = {k[len(prefix) :]: v for k, v in gradflow.last_metrics.items() if k.startswith(prefix)}
    if norms:
        smallest, largest = min(norms, key=norms.__getitem__), max(norms, key=norms.__getitem__)
        print(
            f"Gradient norms at the last logged step: smallest {smallest} ({norms[smallest]:.3g}),"
            f" largest {largest} ({norms[largest]:.3g}); layers in depth order: {', '.join(gradflow.layers)}."
        )
    for record in gradflow.interventions:
        print(f"  {record}")
    print(f"Logs: {logger.log_dir}")
    print(f"View them with: tensorboard --logdir {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
