"""Small LightningModules, data and a reference gradient-norm probe for the GradientFlowCallback tests.

Everything here is defined at module level so that it pickles (``ddp_spawn`` sends it to the workers).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

# ---------------------------------------------------------------------------------------------------------- data


def regression_loader(
    n: int, in_features: int, out_features: int = 1, batch_size: int = 16, seed: int = 0, nan_batch: int | None = None
) -> DataLoader:
    """A fixed, unshuffled regression data set (a random linear teacher plus a nonlinearity).

    With ``nan_batch=k`` the first input of batch ``k`` holds a NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen)
    teacher = torch.randn(in_features, out_features, generator=gen) / math.sqrt(in_features)
    y = torch.tanh(x @ teacher) + 0.1 * torch.randn(n, out_features, generator=gen)
    if nan_batch is not None:
        x[nan_batch * batch_size, 0] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


# ------------------------------------------------------------------------------------------------------- modules


class RegressionModule(LightningModule):
    """Base: MSE on ``(x, y)`` batches, SGD or Adam."""

    def __init__(self, lr: float = 0.01, optimizer: str = "sgd") -> None:
        super().__init__()
        self.lr = lr
        self.optimizer_name = optimizer
        self.losses: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SmallMLP(RegressionModule):
    """Three layers, nested in containers, with dropout (so any extra draw from the RNG changes the run)."""

    def __init__(self, in_features: int = 8, hidden: int = 16, dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.body = nn.ModuleDict({"mid": nn.Linear(hidden, hidden)})
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body["mid"](self.encoder(x))))


class PlainDeepMLP(RegressionModule):
    """The broken model: ``depth`` Linear layers with sigmoid between them, default init. Gradients vanish."""

    def __init__(self, depth: int = 24, width: int = 16, in_features: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dims = [in_features] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return self.head(x)


class PreNormBlock(nn.Module):
    """``h + scale · W2 relu(W1 LayerNorm(h))``: a pre-norm residual MLP block with a down-scaled branch."""

    def __init__(self, width: int, scale: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.scale = scale

    def forward(self, h: Tensor) -> Tensor:
        return h + self.scale * self.fc2(torch.relu(self.fc1(self.norm(h))))


class ResidualDeepMLP(RegressionModule):
    """The healthy twin: the same depth as :class:`PlainDeepMLP` with pre-norm residual blocks and a final LayerNorm.

    The residual branch is scaled by ``1/sqrt(depth)`` so the residual stream's variance stays bounded with depth.
    """

    def __init__(self, depth: int = 24, width: int = 16, in_features: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inp = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(PreNormBlock(width, 1 / math.sqrt(depth)) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class ScrambledOrderNet(RegressionModule):
    """Modules registered in an order unlike the forward order, and one module (``shared``) used twice.

    Forward: ``inp → shared → mid → shared → head``; registration: ``head, mid, shared, inp``.
    """

    def __init__(self, width: int = 8, in_features: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head = nn.Linear(width, 1)
        self.mid = nn.Linear(width, width)
        self.shared = nn.Linear(width, width)
        self.inp = nn.Linear(in_features, width)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        h = torch.tanh(self.shared(torch.tanh(self.mid(h))))
        return self.head(h)


class VanillaRNN(RegressionModule):
    """``nn.RNN`` (tanh) reading a sequence; the head predicts a target from the last hidden state.

    ``recurrent_scale`` multiplies the recurrent weights at init (a scale > 1 makes the gradients explode).
    """

    def __init__(self, input_size: int = 4, hidden: int = 32, recurrent_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rnn = nn.RNN(input_size, hidden, batch_first=True, nonlinearity="tanh")
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(recurrent_scale)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def sequence_loader(n: int, seq_len: int, input_size: int, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """Random sequences; the target is a squashed sum over the sequence (needs memory of all steps)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq_len, input_size, generator=gen)
    y = torch.tanh(x.sum(dim=(1, 2), keepdim=False) / math.sqrt(seq_len * input_size)).unsqueeze(-1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def parameters_snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Detached clones of every parameter."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# ----------------------------------------------------------------------------------------------------- callbacks


def layer_of(param_name: str, group_by: str = "module") -> str:
    """A parameter's layer tag, derived independently of the callback: ``a.b.weight`` → ``a/b`` or ``a/b/weight``."""
    path = param_name if group_by == "parameter" else param_name.rpartition(".")[0]
    return path.replace(".", "/") or "root"


class GradNormProbe(Callback):
    """Records the reference gradient norms in ``on_before_optimizer_step``; list it *before* the callback under test.

    ``norms[step]`` maps each layer to ``sqrt(Σ ‖p.grad‖²)`` over its parameters (float64), and ``"__total__"`` to
    ``torch.nn.utils.get_total_norm`` of every gradient.
    """

    def __init__(self, group_by: str = "module") -> None:
        self.group_by = group_by
        self.norms: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        sums: dict[str, float] = {}
        grads = []
        for name, p in pl_module.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            layer = layer_of(name, self.group_by)
            sums[layer] = sums.get(layer, 0.0) + float(p.grad.detach().double().norm()) ** 2
        row = {layer: math.sqrt(s) for layer, s in sums.items()}
        row["__total__"] = float(torch.nn.utils.get_total_norm(grads))
        self.norms[trainer.global_step] = row
