"""Small LightningModules, data and a recording logger for the GradientFlowCallback tests.

Everything here is defined at module level so that it pickles (``ddp_spawn`` sends it to the workers).
"""

from __future__ import annotations

import itertools
import math
from argparse import Namespace
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

# ------------------------------------------------------------------------------------------------------ the logger


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory: ``rows`` is a list of ``(step, metrics)``.

    Not decorated with ``rank_zero_only``, so under DDP each rank records what the callback logged there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def series(self, key: str) -> dict[int, float]:
        """``{step: value}`` of one metric (the last value wins when a step was logged twice)."""
        return {step: m[key] for step, m in self.rows if key in m and step is not None}

    def keys(self) -> set[str]:
        return {k for _, m in self.rows for k in m}

    def gradflow_rows(self) -> dict[int, dict[str, float]]:
        """``{step: metrics}`` of the rows the callback wrote (those holding ``gradflow/grad_norm_total``)."""
        return {step: m for step, m in self.rows if "gradflow/grad_norm_total" in m and step is not None}


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A CPU Trainer without progress bar, model summary, checkpointing or sanity checks (overridable)."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    defaults.update(kwargs)
    return Trainer(**defaults)


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


class RankReport(Callback):
    """Under DDP, writes what each rank saw to ``<out_dir>/rank<r>.pt`` when training ends (``ddp_spawn`` workers
    cannot hand objects back to the test process).

    The file holds the probe's reference norms, the rows the recording logger got on that rank, the losses, the
    callback's layers and interventions, and the final weights.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        probe = next(c for c in trainer.callbacks if isinstance(c, GradNormProbe))  # type: ignore[attr-defined]
        watched = next(c for c in trainer.callbacks if hasattr(c, "interventions"))  # type: ignore[attr-defined]
        recording = next(lg for lg in trainer.loggers if isinstance(lg, RecordingLogger))
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "probe": probe.norms,
            "rows": recording.rows,
            "losses": list(getattr(pl_module, "losses", [])),
            "layers": list(watched.layers),
            "interventions": [i.to_dict() for i in watched.interventions],
            "weights": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
        }
        torch.save(report, f"{self.out_dir}/rank{trainer.global_rank}.pt")


class RankStridedDataset(torch.utils.data.Dataset):
    """Rank ``r`` of ``w`` reads samples ``r, r + w, r + 2w, ...`` (rank read lazily, in the worker process).

    Use with ``Trainer(use_distributed_sampler=False)`` and an unshuffled DataLoader: which sample lands in which
    rank's batch is then known in advance (Lightning's own DistributedSampler always shuffles training data).
    """

    def __init__(self, x: Tensor, y: Tensor, world_size: int) -> None:
        self.x, self.y, self.world_size = x, y, world_size

    def __len__(self) -> int:
        return len(self.x) // self.world_size

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        j = i * self.world_size + rank
        return self.x[j], self.y[j]
