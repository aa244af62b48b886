"""Recurrent LightningModules, data and a gate-saturating helper for the GateSurgeryCallback tests.

Everything is defined at module level so that it pickles (``ddp_spawn`` sends it to the workers).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, seed_everything
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.models import RegressionModule

INPUT_SIZE = 4


def sequences(n: int = 64, steps: int = 12, batch_size: int = 8, seed: int = 0, shift: float = 0.0) -> DataLoader:
    """Random sequences (plus ``shift``); the target is a squashed running sum of the first feature."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, steps, INPUT_SIZE, generator=gen) + shift
    y = torch.tanh(x[..., :1].cumsum(1) / steps**0.5)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class RecurrentRegressor(RegressionModule):
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
        super().__init__(lr=lr, optimizer="adam")
        self.kind, self.batch_first, self.packed = kind, batch_first, packed
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


def saturated_regressor(seed: int = 0, **kwargs: Any) -> RecurrentRegressor:
    """A :class:`RecurrentRegressor` (seeded) with its input and output gates pinned near 0 (σ(−8) ≈ 3e-4) in every
    layer and direction."""
    seed_everything(seed, verbose=False)
    model = RecurrentRegressor(**kwargs)
    saturate_(model.rnn, {0: -8.0, 3: -8.0})
    return model


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
