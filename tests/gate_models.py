"""Recurrent LightningModules, data, a recording logger and a per-rank report for the GateSurgeryCallback tests.

Everything is defined at module level so that it pickles (``ddp_spawn`` sends it to the workers).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from models import RecordingLogger, quiet_trainer
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader, TensorDataset

INPUT_SIZE = 4


class Recorder(RecordingLogger):
    """The shared recording logger, plus the rows the gate callback wrote."""

    def gate_rows(self) -> dict[int, dict[str, float]]:
        """``{step: metrics}`` of the rows holding ``gates/surgeries``."""
        return {step: m for step, m in self.rows if "gates/surgeries" in m and step is not None}


def trainer(**kwargs: Any) -> Trainer:
    """The shared quiet trainer (``tests/models.py``), without a logger unless given."""
    return quiet_trainer(**{"logger": False, **kwargs})


def sequences(n: int = 64, steps: int = 12, batch_size: int = 8, seed: int = 0, shift: float = 0.0) -> DataLoader:
    """Random sequences (plus ``shift``); the target is a squashed running sum of the first feature."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, INPUT_SIZE, generator=gen) + shift
    y = torch.tanh(x[..., :1].cumsum(1) / steps**0.5)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class RecurrentRegressor(LightningModule):
    """An LSTM/GRU (or an ``LSTMCell`` loop) reading ``(batch, T, 4)`` sequences, a linear head, MSE, Adam.

    ``packed=True`` feeds packed sequences with lengths ``T, T-1, ...`` (padding masked out of the loss).
    ``dropout`` applies to the input (so any extra draw from the global RNG changes the run).
    """

    def __init__(
        self,
        kind: str = "lstm",
        hidden: int = 8,
        num_layers: int = 1,
        bidirectional: bool = False,
        batch_first: bool = True,
        packed: bool = False,
        dropout: float = 0.0,
        lr: float = 0.01,
    ) -> None:
        super().__init__()
        self.kind, self.batch_first, self.packed, self.lr = kind, batch_first, packed, lr
        self.drop = nn.Dropout(dropout)
        dirs = 2 if bidirectional else 1
        if kind == "lstmcell":
            self.rnn: nn.Module = nn.LSTMCell(INPUT_SIZE, hidden)
        else:
            rnn_type = nn.LSTM if kind == "lstm" else nn.GRU
            self.rnn = rnn_type(
                INPUT_SIZE, hidden, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first
            )
        self.head = nn.Linear(hidden * (1 if kind == "lstmcell" else dirs), 1)
        self.losses: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(x)
        if self.kind == "lstmcell":
            h = c = x.new_zeros(x.shape[0], self.rnn.hidden_size)
            outs = []
            for t in range(x.shape[1]):
                h, c = self.rnn(x[:, t], (h, c))
                outs.append(h)
            return self.head(torch.stack(outs, dim=1))
        if self.packed:
            lengths = torch.arange(x.shape[1], x.shape[1] - x.shape[0], -1).clamp(min=1)
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
            return self.head(out)
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head(out if self.batch_first else out.transpose(0, 1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class NoGates(LightningModule):
    """A plain MLP: nothing for the gate callback to watch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12 * INPUT_SIZE, 8), nn.Tanh(), nn.Linear(8, 12))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y.flatten(1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def saturate_(module: nn.Module, gates: dict[int, float], weight_scale: float = 1.0) -> None:
    """Sets the total bias of the given gate blocks (gate index → value) in every layer and direction of an
    ``nn.LSTM``/``nn.GRU``/cell, and multiplies those rows of ``W_ih``/``W_hh`` by ``weight_scale``.
    """
    units = module.hidden_size
    with torch.no_grad():
        for name, p in module.named_parameters():
            for g, value in gates.items():
                rows = slice(g * units, (g + 1) * units)
                if name.startswith("bias_ih"):
                    p[rows] = value
                elif name.startswith("bias_hh"):
                    p[rows] = 0.0
                elif name.startswith(("weight_ih", "weight_hh")):
                    p[rows] *= weight_scale


class GateRankReport(Callback):
    """Writes what each rank saw to ``<out_dir>/rank<r>.pt`` at the end of training (``ddp_spawn`` workers cannot
    hand objects back): the gate callback's interventions and last statistics, the logged rows, the local
    saturation of the probe batch, and the final weights and optimizer state.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        watched = next(c for c in trainer.callbacks if hasattr(c, "surgeries"))  # type: ignore[attr-defined]
        recorder = next(lg for lg in trainer.loggers if isinstance(lg, Recorder))
        optimizer = trainer.optimizers[0]
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "interventions": [i.to_dict() for i in watched.interventions],
            "rows": recorder.rows,
            "losses": list(getattr(pl_module, "losses", [])),
            "weights": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": optimizer.state_dict(),
        }
        torch.save(report, f"{self.out_dir}/rank{trainer.global_rank}.pt")
