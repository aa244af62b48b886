"""The project's main job: a short, real Lightning training run that logs the engine's per-layer statistics.

A character-level LSTM language model learns to write like the Python standard library's docstrings (the corpus is
assembled with :func:`inspect.getdoc`, so nothing is downloaded). While it trains, a small callback computes every
layer's gradient and update statistics with the fused engine in :mod:`lightning_gradflow.stats`, keeps them on the
device, and on logging steps brings them to the host in one transfer and hands them to every attached logger;
TensorBoard also gets per-layer gradient histograms binned on the device.

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
from typing import Any, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradflow.stats import (
    Backend,
    HistogramSpec,
    Stat,
    TensorStats,
    UpdateStat,
    UpdateStats,
    make_snapshot,
    tensor_histograms,
    tensor_stats,
    tensorboard_histogram,
    update_stats,
)

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


@dataclass
class _Pending:
    """What a logging step has measured before the optimizer step, waiting for the update statistics."""

    step: int
    layer_grads: TensorStats  # one row per layer (zeros for layers with no gradient this step), on the device
    has_grad: list[bool]
    snapshot: list[Tensor]
    histograms: Tensor | None  # (num_layers, num_bins) counts on the device, on histogram steps


class _EngineStatsLogger(Callback):
    """Logs per-layer gradient and update statistics from the fused engine to every attached logger.

    Parameters are grouped by the module that owns them; tags are ``<prefix>/<quantity>/<module path>`` with ``/``
    between path components. Every optimizer step computes the gradient statistics on the device (and accumulates
    the non-finite count); only logging steps (``global_step % log_every_n_steps == 0``) snapshot the weights, and
    after the optimizer step bring everything to the host in one transfer and pass one flat dict to each logger's
    ``log_metrics``. On rank zero, TensorBoard loggers also get per-layer gradient histograms binned on the device.

    Tags (``<layer>`` is the module path, e.g. ``lstm/0``):

    * ``grad_norm/<layer>``, ``grad_rms/<layer>``, ``grad_absmax/<layer>``, ``grad_zero_fraction/<layer>``: the
      gradients of the layer's parameters taken together (layers whose gradients are all ``None`` are left out);
    * ``weight_norm/<layer>``, ``update_ratio/<layer>``: ‖w‖ after the optimizer step and ‖Δw‖/‖w‖ of that step;
    * ``grad_norm_total``: the global gradient norm; ``nonfinite_grads``: NaN/±Inf gradient values counted over every
      step since the previous logging step (inclusive), so a bad step between logs is not missed;
    * histograms ``grad_hist/<layer>``.

    Limitations of this stand-in: it reads all of the module's parameters (one optimizer, automatic optimization)
    and does not undo the loss scale of fused optimizers under fp16 AMP.

    Args:
        log_every_n_steps: log on optimizer steps that are multiples of this.
        histogram_every_n_steps: write histograms on the first logging step at least this many steps after the
            previous histograms (the first logging step writes them); 0 turns histograms off.
        prefix: first component of every tag.
        backend: statistics backend, see :func:`~lightning_gradflow.stats.tensor_stats`.
        histogram_spec: bucket layout of the histograms.
    """

    def __init__(
        self,
        log_every_n_steps: int = 10,
        histogram_every_n_steps: int = 50,
        prefix: str = "engine",
        backend: Backend = "auto",
        histogram_spec: HistogramSpec | None = None,
    ) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"Expected `log_every_n_steps` >= 1, but got {log_every_n_steps}.")
        if histogram_every_n_steps < 0:
            raise ValueError(f"Expected `histogram_every_n_steps` >= 0, but got {histogram_every_n_steps}.")
        if backend not in _BACKENDS:
            raise ValueError(f"Expected `backend` to be one of {_BACKENDS}, but got {backend!r}.")
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.prefix = prefix
        self.backend: Backend = backend
        self.histogram_spec = histogram_spec or HistogramSpec()
        self.layer_names: list[str] = []
        #: Per-layer gradient norms of the last logged step (host floats), for reports.
        self.last_grad_norms: dict[str, float] = {}
        self.logged_steps: list[int] = []
        self._params: list[nn.Parameter] = []
        self._param_layer: list[int] = []
        self._all_rows: Tensor | None = None
        self._rows_cache: dict[tuple[int, ...], Tensor] = {}
        self._nonfinite: Tensor | None = None
        self._pending: _Pending | None = None
        self._last_histogram_step: int | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Maps every trainable parameter to the module that owns it (the model is on its device by now)."""
        self._params, self._param_layer, self.layer_names = [], [], []
        seen: set[int] = set()
        for module_name, module in pl_module.named_modules():
            owned = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
            if not owned:
                continue
            seen.update(id(p) for p in owned)
            self.layer_names.append(module_name.replace(".", "/") or type(pl_module).__name__)
            self._params.extend(owned)
            self._param_layer.extend([len(self.layer_names) - 1] * len(owned))
        self._rows_cache.clear()
        self._all_rows = self._rows(tuple(range(len(self._params)))) if self._params else None
        self._nonfinite = None
        self._pending = None

    def _rows(self, present: tuple[int, ...]) -> Tensor:
        # The layer of each present parameter, as a device tensor made once per pattern of missing gradients.
        rows = self._rows_cache.get(present)
        if rows is None:
            device = self._params[0].device
            rows = torch.tensor([self._param_layer[i] for i in present], dtype=torch.long, device=device)
            self._rows_cache[present] = rows
        return rows

    def _tensorboard_loggers(self, trainer: Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        """Gradient statistics of this step, on the device; on logging steps also a snapshot of the weights."""
        positions: list[int] = []
        grads: list[Tensor] = []
        for i, p in enumerate(self._params):
            if p.grad is not None:  # unused or skipped parameters have none: leave them out
                positions.append(i)
                grads.append(p.grad)
        if not grads:
            return
        present = tuple(positions)
        stats = tensor_stats(grads, backend=self.backend)
        nonfinite = stats.nonfinite.sum()
        self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite + nonfinite

        step = trainer.global_step
        if step % self.log_every_n_steps != 0:
            return
        rows = self._rows(present)
        num_layers = len(self.layer_names)
        has_grad = [False] * num_layers
        for i in present:
            has_grad[self._param_layer[i]] = True
        histograms = None
        if self._histogram_due(step) and trainer.is_global_zero and self._tensorboard_loggers(trainer):
            hist = tensor_histograms(grads, spec=self.histogram_spec, backend=self.backend)
            histograms = hist.reduce_rows(rows, num_layers).counts
        self._pending = _Pending(
            step=step,
            layer_grads=stats.reduce_rows(rows, num_layers),
            has_grad=has_grad,
            snapshot=make_snapshot(self._params),
            histograms=histograms,
        )

    def _histogram_due(self, step: int) -> bool:
        if self.histogram_every_n_steps == 0:
            return False
        last = self._last_histogram_step
        return last is None or step - last >= self.histogram_every_n_steps

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        """After a logging step's optimizer step: update statistics, one host transfer, one dict per logger."""
        pending, self._pending = self._pending, None
        if pending is None or self._all_rows is None or self._nonfinite is None:
            return
        num_layers = len(self.layer_names)
        layer_updates = update_stats(self._params, pending.snapshot, backend=self.backend).reduce_rows(
            self._all_rows, num_layers
        )
        num_stats, num_update_stats = len(Stat), len(UpdateStat)
        # The one device-to-host transfer of the step: both tables and the non-finite count in one float32 tensor.
        packed = torch.cat(
            [pending.layer_grads.table.flatten(), layer_updates.table.flatten(), self._nonfinite.reshape(1)]
        ).cpu()
        self._nonfinite = None
        grads = TensorStats(packed[: num_layers * num_stats].view(num_layers, num_stats))
        updates = UpdateStats(packed[num_layers * num_stats : -1].view(num_layers, num_update_stats))
        nonfinite = float(packed[-1])

        metrics = self._metrics(grads, updates, pending.has_grad, nonfinite)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=pending.step)
            logger.save()
        self.logged_steps.append(pending.step)
        self.last_grad_norms = {
            name: norm
            for name, norm, ok in zip(self.layer_names, grads.norm.tolist(), pending.has_grad, strict=True)
            if ok
        }
        if pending.histograms is not None:
            self._write_histograms(trainer, pending, grads)

    def _metrics(
        self, grads: TensorStats, updates: UpdateStats, has_grad: list[bool], nonfinite: float
    ) -> dict[str, float]:
        p = self.prefix
        metrics: dict[str, float] = {}
        columns = {
            "grad_norm": grads.norm.tolist(),
            "grad_rms": grads.rms.tolist(),
            "grad_absmax": grads.absmax.tolist(),
            "grad_zero_fraction": grads.zero_fraction.tolist(),
        }
        for name, values in columns.items():
            for layer, value, ok in zip(self.layer_names, values, has_grad, strict=True):
                if ok:
                    metrics[f"{p}/{name}/{layer}"] = value
        for layer, weight_norm, ratio in zip(
            self.layer_names, updates.param_norm.tolist(), updates.ratio.tolist(), strict=True
        ):
            metrics[f"{p}/weight_norm/{layer}"] = weight_norm
            metrics[f"{p}/update_ratio/{layer}"] = ratio
        metrics[f"{p}/grad_norm_total"] = float(grads.total_norm())
        metrics[f"{p}/nonfinite_grads"] = nonfinite
        return metrics

    def _write_histograms(self, trainer: Trainer, pending: _Pending, grads: TensorStats) -> None:
        assert pending.histograms is not None
        counts = pending.histograms.cpu()  # histogram steps only: the bucket counts, in one transfer
        self._last_histogram_step = pending.step
        loggers = self._tensorboard_loggers(trainer)
        for j, layer in enumerate(self.layer_names):
            if not pending.has_grad[j]:
                continue
            raw = tensorboard_histogram(counts[j], self.histogram_spec, TensorStats(grads.table[j : j + 1]))
            if not raw:  # every value non-finite: nothing TensorBoard can draw
                continue
            for logger in loggers:
                logger.experiment.add_histogram_raw(f"{self.prefix}/grad_hist/{layer}", **raw, global_step=pending.step)


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
    stats_logger = _EngineStatsLogger(
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
        callbacks=[stats_logger],
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
    norms = stats_logger.last_grad_norms
    if norms:
        smallest, largest = min(norms, key=norms.__getitem__), max(norms, key=norms.__getitem__)
        print(
            f"Gradient norms at step {stats_logger.logged_steps[-1]}: smallest {smallest} ({norms[smallest]:.3g}),"
            f" largest {largest} ({norms[largest]:.3g})."
        )
    print(f"Logs: {logger.log_dir}")
    print(f"View them with: tensorboard --logdir {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
