"""The tiny model and data of the support-matrix, bad-input, whole-run and TensorBoard-server tests.

``TinyLSTM`` has an ``nn.LSTM`` (so GateSurgeryCallback finds gates), a ReLU layer (so dead-unit probes have
something to look at) and a Linear head; it trains in milliseconds per step on a CPU. Everything is defined at module
level so that it pickles (spawned DDP workers import this module).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

INPUT_SIZE = 4
SEQ_LEN = 6
HIDDEN = 8


def sequence_data(n: int = 64, seed: int = 0, nan_batch: int | None = None, batch_size: int = 8) -> TensorDataset:
    """Random sequences; the target is a squashed sum of the sequence. ``nan_batch=k``: batch ``k`` holds a NaN."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SEQ_LEN, INPUT_SIZE, generator=gen)
    y = torch.tanh(x.sum(dim=(1, 2)) / math.sqrt(SEQ_LEN * INPUT_SIZE)).unsqueeze(-1)
    if nan_batch is not None:
        x[nan_batch * batch_size, 0, 0] = float("nan")
    return TensorDataset(x, y)


def sequence_loader(n: int = 64, batch_size: int = 8, seed: int = 0, nan_batch: int | None = None) -> DataLoader:
    """An unshuffled loader over :func:`sequence_data`."""
    return DataLoader(sequence_data(n, seed, nan_batch, batch_size), batch_size=batch_size, shuffle=False)


class TinyDataModule(LightningDataModule):
    """:func:`sequence_loader` as a datamodule (for LightningCLI).

    Args:
        n: number of sequences.
        batch_size: sequences per batch.
    """

    def __init__(self, n: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        self.n = n
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return sequence_loader(self.n, self.batch_size)


class TinyLSTM(LightningModule):
    """LSTM → Linear + ReLU → Linear head, MSE loss.

    Args:
        lr: learning rate.
        optimizer: ``"adam"``, ``"adam-fused"``, ``"sgd"`` (momentum 0.9), ``"adamw"``, or ``"adam+sgd"``: two
            optimizers (Adam for the LSTM, SGD for the rest; manual optimization only).
        manual: manual optimization (``self.automatic_optimization = False``).
        frozen: freeze every parameter (a model with nothing to train).
        saturated: start with the LSTM's forget gates saturated open (bias 10), for GateSurgeryCallback to repair.
    """

    def __init__(
        self,
        lr: float = 0.02,
        optimizer: str = "adam",
        manual: bool = False,
        frozen: bool = False,
        saturated: bool = False,
    ) -> None:
        super().__init__()
        self.lstm = nn.LSTM(INPUT_SIZE, HIDDEN, batch_first=True)
        self.hidden = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.head = nn.Linear(HIDDEN, 1)
        self.lr = lr
        self.optimizer_name = optimizer
        self.automatic_optimization = not manual
        if saturated:
            with torch.no_grad():
                self.lstm.bias_ih_l0[HIDDEN : 2 * HIDDEN] = 10.0
        if frozen:
            self.requires_grad_(False)
        self.losses: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16:
            # oneDNN has no fp16 LSTM on the CPU ("could not create a primitive descriptor for the LSTM forward
            # propagation primitive"): the LSTM runs in fp32, the rest in fp16 under the GradScaler
            with torch.autocast("cpu", enabled=False):
                out, _ = self.lstm(x.float())
        else:
            out, _ = self.lstm(x)
        return self.head(self.hidden(out[:, -1]))

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        # No side effects here (no `self.log`, no host reads): SharpnessCallback calls it again to get the loss,
        # and under torch.compile Lightning compiles it. The loss is recorded in `on_train_batch_end`.
        loss = self._loss(batch)
        if self.automatic_optimization:
            return loss
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        return loss.detach()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.log("train_loss", float(loss))

    def _make(self, name: str, params: Any) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr)
        return torch.optim.Adam(params, lr=self.lr, fused=name == "adam-fused" or None)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam+sgd":  # two optimizers (manual optimization only)
            rest = [*self.hidden.parameters(), *self.head.parameters()]
            return [self._make("adam", self.lstm.parameters()), self._make("sgd", rest)]
        return self._make(self.optimizer_name, [p for p in self.parameters() if p.requires_grad] or self.parameters())
