"""The demo's broken trainings: small real models, each made to have one of the problems the callbacks handle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_gradflow.callbacks import (
    EarlyCollapseCallback,
    GateSurgeryCallback,
    GradientFlowCallback,
    SharpnessCallback,
)
from lightning_gradflow.demo.corpus import CharData

INPUT_GATE, OUTPUT_GATE = 0, 3  # gate blocks in PyTorch's LSTM row order (input, forget, cell, output)


Batch = tuple[Tensor, Tensor, Tensor]


class GlitchingBatches(IterableDataset):
    """Shuffled batches of ``(inputs, targets, input_scale)``; the scale is 1 except during a pipeline glitch.

    The glitch is tied to the count of batches delivered, not to the samples: a broken shard read once. A rollback
    does not rewind the data, so the glitching batches are not seen again (PaLM's "rewind and skip").

    Args:
        inputs: ``(N, T)`` character ids.
        targets: ``(N, T)`` next-character ids.
        batch_size: windows per batch (the last partial batch of an epoch is dropped).
        seed: seeds the shuffling.
        glitch: ``(first_batch, batches, input_scale)``, or None.
    """

    def __init__(
        self, inputs: Tensor, targets: Tensor, batch_size: int, seed: int, glitch: tuple[int, int, float] | None
    ) -> None:
        super().__init__()
        self.inputs, self.targets, self.batch_size, self.glitch = inputs, targets, batch_size, glitch
        self.generator = torch.Generator().manual_seed(seed)
        self.delivered = 0

    def __len__(self) -> int:
        return len(self.inputs) // self.batch_size

    def __iter__(self) -> Any:
        order = torch.randperm(len(self.inputs), generator=self.generator)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            scale = 1.0
            if self.glitch is not None and self.glitch[0] <= self.delivered < self.glitch[0] + self.glitch[1]:
                scale = self.glitch[2]
            self.delivered += 1
            yield self.inputs[index], self.targets[index], torch.tensor(scale)


class DemoModule(LightningModule):
    """Next-character cross-entropy; keeps every step's loss on the device (read once, after training)."""

    def __init__(self) -> None:
        super().__init__()
        self.step_losses: list[Tensor] = []

    def logits_and_targets(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(N, vocab)`` logits and ``(N,)`` targets of a batch."""
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Cross-entropy of the next character (nats per character).

        Args:
            batch: ``(inputs, targets, input_scale)``: character ids, and the factor the embedded inputs are
                multiplied by (1 unless the data pipeline glitches, see :class:`GlitchingBatches`).
            batch_idx: index of the batch in the epoch.
        """
        logits, targets = self.logits_and_targets(batch)
        loss = nn.functional.cross_entropy(logits, targets)
        self.log("train/loss", loss, prog_bar=True)
        self.step_losses.append(loss.detach())
        return loss

    def losses(self) -> list[float]:
        """Every training step's loss, in order."""
        return torch.stack(self.step_losses).tolist() if self.step_losses else []


class CharLSTM(DemoModule):
    """Embedding → stacked LSTM → linear head, trained with Adam.

    Args:
        vocab_size: number of distinct characters.
        hidden_size: LSTM width.
        num_layers: stacked LSTM layers.
        lr: Adam learning rate.
        gate_bias: when given, the input and output gates of every layer start with this total bias (−6 leaves them
            saturated shut, σ ≈ 0.0025: the state a bad initialisation or checkpoint leaves them in).
    """

    def __init__(
        self, vocab_size: int, hidden_size: int = 128, num_layers: int = 2, lr: float = 3e-3, gate_bias: float = 0.0
    ) -> None:
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(vocab_size, 32)
        self.lstm = nn.LSTM(32, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)
        if gate_bias:
            h = hidden_size
            with torch.no_grad():
                for k in range(num_layers):
                    for gate in (INPUT_GATE, OUTPUT_GATE):
                        getattr(self.lstm, f"bias_ih_l{k}")[gate * h : (gate + 1) * h] = gate_bias
                        getattr(self.lstm, f"bias_hh_l{k}")[gate * h : (gate + 1) * h] = 0.0

    @override
    def logits_and_targets(self, batch: Batch) -> tuple[Tensor, Tensor]:
        inputs, targets, scale = batch
        out, _ = self.lstm(self.embed(inputs) * scale)
        return self.head(out).flatten(0, 1), targets.flatten()

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class ContextMLP(DemoModule):
    """Predicts each character from the ``context`` characters before it with a plain MLP (no residuals, no norms).

    Args:
        vocab_size: number of distinct characters.
        context: characters of context.
        width: hidden width.
        depth: hidden layers.
        activation: ``"sigmoid"`` (deep stacks of it make gradients vanish) or ``"relu"``.
        lr: SGD learning rate (momentum 0.9).
        residual: hidden layers after the first become pre-norm residual blocks ``h + act(Linear(LayerNorm(h)))``:
            the fix GradientFlowCallback suggests for vanishing gradients.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int = 8,
        width: int = 96,
        depth: int = 3,
        activation: str = "relu",
        lr: float = 0.05,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.context, self.lr = context, lr
        self.embed = nn.Embedding(vocab_size, 16)
        act: Callable[[], nn.Module] = nn.Sigmoid if activation == "sigmoid" else nn.ReLU
        layers: list[nn.Module] = [nn.Linear(context * 16, width), act()]
        for _ in range(depth - 1):
            layers += [_Residual(width, act())] if residual else [nn.Linear(width, width), act()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, vocab_size)

    @override
    def logits_and_targets(self, batch: Batch) -> tuple[Tensor, Tensor]:
        inputs, targets, scale = batch
        windows = inputs.unfold(1, self.context, 1)  # (B, T - context + 1, context)
        features = self.embed(windows).flatten(2) * scale
        logits = self.head(self.body(features))
        return logits.flatten(0, 1), targets[:, self.context - 1 :].flatten()

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class _Residual(nn.Module):
    def __init__(self, width: int, activation: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)
        self.activation = activation

    def forward(self, h: Tensor) -> Tensor:
        return h + self.activation(self.linear(self.norm(h)))


@dataclass(frozen=True)
class Scenario:
    """One broken training: its story, its model, and the callbacks' settings for it.

    Args:
        name: the ``--scenario`` value.
        title: one line saying what is wrong with the run.
        steps: optimizer steps by default.
        make_model: builds the model for a vocabulary size.
        batch_size: windows per batch.
        callbacks: builds the four callbacks for ``auto_intervene``.
        glitch: ``(first_batch, batches, input_scale)``: the data pipeline delivers ``batches`` batches from the
            ``first_batch``-th one on with inputs ``input_scale`` times too large (a broken shard, read once).
        fixed_by_hand: for a problem no callback repairs by itself: what the suggested fix is, and the model with it
            applied (trained once more, for comparison).
    """

    name: str
    title: str
    steps: int
    make_model: Callable[[int], DemoModule]
    batch_size: int
    callbacks: Callable[[bool], list[Callback]]
    fixed_by_hand: tuple[str, Callable[[int], DemoModule]] | None = None
    glitch: tuple[int, int, float] | None = None

    def loader(self, data: CharData, seed: int) -> DataLoader:
        """The batches, shuffled with ``seed`` (the same order for the run with and without interventions)."""
        inputs, targets = data.dataset.tensors
        return DataLoader(GlitchingBatches(inputs, targets, self.batch_size, seed, self.glitch), batch_size=None)


def all_callbacks(
    auto_intervene: bool, gate_every: int = 25, sharpness_every: int = 50, snapshot_every: int = 20
) -> list[Callback]:
    """The four callbacks, as a user would attach them."""
    return [
        GradientFlowCallback(auto_intervene=auto_intervene),
        GateSurgeryCallback(auto_intervene=auto_intervene, every_n_steps=gate_every, probe_size=8),
        SharpnessCallback(every_n_steps=sharpness_every, auto_intervene=auto_intervene),
        EarlyCollapseCallback(auto_intervene=auto_intervene, snapshot_every_n_steps=snapshot_every),
    ]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="saturated-lstm",
            title="a character LSTM whose input and output gates start saturated shut (bias −6, σ ≈ 0.0025)",
            steps=300,
            make_model=lambda vocab: CharLSTM(vocab, hidden_size=96, num_layers=2, gate_bias=-6.0),
            batch_size=32,
            callbacks=all_callbacks,
        ),
        Scenario(
            name="vanishing",
            title="a deep plain sigmoid MLP (12 layers, no residuals or normalisation): early layers barely learn",
            steps=300,
            make_model=lambda vocab: ContextMLP(vocab, width=64, depth=12, activation="sigmoid", lr=0.1),
            batch_size=32,
            callbacks=all_callbacks,
            fixed_by_hand=(
                "the suggested fix by hand: ReLU, residual connections and LayerNorm",
                lambda vocab: ContextMLP(vocab, width=64, depth=12, activation="relu", lr=0.1, residual=True),
            ),
        ),
        Scenario(
            name="collapse",
            title="a ReLU MLP fed 3 batches of un-normalised inputs (x300) at step 150 by a broken data shard",
            steps=300,
            make_model=lambda vocab: ContextMLP(vocab, width=96, depth=3, lr=0.05),
            batch_size=32,
            callbacks=all_callbacks,
            glitch=(150, 3, 300.0),
        ),
    )
}
