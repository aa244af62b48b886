"""Models, data and helper callbacks for the EarlyCollapseCallback tests and example.

Everything is defined at module level so that it pickles (``ddp_spawn`` sends it to the workers).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class ReluMLP(LightningModule):
    """``in → hidden → ReLU → hidden → ReLU → out`` regression (MSE), SGD with momentum or Adam.

    ``losses`` keeps ``(global_step, loss)`` of every training step; ``warmup_steps`` adds a LinearLR warm-up.
    """

    def __init__(
        self,
        in_features: int = 8,
        hidden: int = 32,
        lr: float = 0.05,
        optimizer: str = "sgd",
        warmup_steps: int = 0,
        lr_growth: float = 1.0,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(hidden, 1)
        self.lr = lr
        self.optimizer_name = optimizer
        self.warmup_steps = warmup_steps
        self.lr_growth = lr_growth
        self.losses: list[tuple[int, float]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append((self.trainer.global_step, float(loss.detach())))
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.warmup_steps:
            sched: Any = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=self.warmup_steps)
        elif self.lr_growth != 1.0:
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=self.lr_growth)
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def final_loss(self, n: int = 10) -> float:
        """Mean of the last ``n`` training losses."""
        values = [loss for _, loss in self.losses[-n:]]
        return sum(values) / len(values)


def regression_data(n: int, in_features: int = 8, seed: int = 0, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen)
    teacher = torch.randn(in_features, 1, generator=gen) / math.sqrt(in_features)
    y = torch.tanh(x @ teacher) + noise * torch.randn(n, 1, generator=gen)
    return x, y


def collapse_loader(
    steps: int,
    batch_size: int = 16,
    extreme_batch: int | None = None,
    extreme_scale: float = 1e3,
    seed: int = 0,
    noise: float = 0.1,
    start: int = 0,
) -> DataLoader:
    """``steps`` unshuffled regression batches; batch ``extreme_batch`` has inputs × ``extreme_scale``.

    ``start`` drops the first ``start`` batches (to replay the tail of a run).
    """
    x, y = regression_data(steps * batch_size, seed=seed, noise=noise)
    if extreme_batch is not None:
        x[extreme_batch * batch_size : (extreme_batch + 1) * batch_size] *= extreme_scale
    x, y = x[start * batch_size :], y[start * batch_size :]
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def first_nonfinite_step(model: ReluMLP) -> int | None:
    return next((step for step, loss in model.losses if not math.isfinite(loss)), None)


class StateLoader(Callback):
    """Loads optimizer, scheduler and RNG states when training starts (to replay a run from a snapshot)."""

    def __init__(self, optimizers: list[dict[str, Any]], schedulers: list[dict[str, Any]], rng: Any = None) -> None:
        self.optimizers = optimizers
        self.schedulers = schedulers
        self.rng = rng

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning.fabric.utilities.seed import _set_rng_states

        from lightning_gradflow.collapse import copy_tree

        for opt, state in zip(trainer.optimizers, self.optimizers, strict=True):
            opt.load_state_dict(copy_tree(state))
        for config, state in zip(trainer.lr_scheduler_configs, self.schedulers, strict=True):
            config.scheduler.load_state_dict(copy_tree(state))
        if self.rng is not None:
            _set_rng_states(self.rng)


class LinearRegressor(LightningModule):
    """A linear model trained with plain SGD at a fixed learning rate (full batch: a deterministic loss)."""

    def __init__(self, in_features: int, lr: float) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 1, bias=False)
        nn.init.zeros_(self.fc.weight)
        self.lr = lr
        self.losses: list[tuple[int, float]] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.fc(x), y)
        self.losses.append((self.trainer.global_step, float(loss.detach())))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def slow_divergence_problem(
    n: int = 256, in_features: int = 8, growth: float = 1.01, seed: int = 0, noise: float = 1.0
) -> tuple[DataLoader, float]:
    """Full-batch least squares whose learning rate sits just above the stability limit ``2 / λ_max``.

    Every direction converges except the top one, whose error is multiplied by ``-growth`` per step (the loss there
    by ``growth²``); the teacher has a tiny component along it, so the loss first falls to the noise floor
    (``noise²``), then creeps up slowly.
    Returns the loader and the learning rate.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen)
    hessian = 2 * x.T @ x / n
    eigvals, eigvecs = torch.linalg.eigh(hessian)
    teacher = eigvecs[:, :-1] @ torch.randn(in_features - 1, generator=gen) + 1e-3 * eigvecs[:, -1]
    y = (x @ teacher).unsqueeze(-1) + noise * torch.randn(n, 1, generator=gen)
    lr = float((1 + growth) / eigvals[-1])
    return DataLoader(TensorDataset(x, y), batch_size=n, shuffle=False), lr


class ManualReluMLP(ReluMLP):
    """:class:`ReluMLP` with manual optimization (``manual_backward`` and ``opt.step()`` in ``training_step``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append((self.trainer.global_step, float(loss.detach())))
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        return loss


# ------------------------------------------------------------------------------------ audit models (issue 12)


class SparseEmbedding(LightningModule):
    """``nn.Embedding(sparse=True)`` summed per bag, MSE; ``optimizer`` "sgd" or "sparse_adam"; optionally manual."""

    def __init__(self, optimizer: str = "sgd", manual: bool = False, num: int = 32, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(num, dim, sparse=True)
        self.optimizer_name = optimizer
        self.automatic_optimization = not manual
        self.losses: list[tuple[int, float]] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, y = batch
        loss = nn.functional.mse_loss(self.emb(ids).sum(dim=(1, 2)), y)
        self.losses.append((self.trainer.global_step, float(loss.detach())))
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(loss)
            opt.step()  # type: ignore[union-attr]
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sparse_adam":
            return torch.optim.SparseAdam(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.05)


def sparse_loader(steps: int, batch_size: int = 8, num: int = 32, nan_batch: int | None = None) -> DataLoader:
    """Bags of 3 ids and a target; batch ``nan_batch`` has NaN targets (a NaN loss and NaN sparse gradients)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, num, (steps * batch_size, 3), generator=gen)
    y = torch.randn(steps * batch_size, generator=gen)
    if nan_batch is not None:
        y[nan_batch * batch_size : (nan_batch + 1) * batch_size] = math.nan
    return DataLoader(TensorDataset(ids, y), batch_size=batch_size, shuffle=False)


class ComplexLinear(LightningModule):
    """``|x · w - y|²`` with a complex weight vector ``w``; SGD or Adam."""

    def __init__(self, in_features: int = 8, optimizer: str = "sgd") -> None:
        super().__init__()
        self.w = nn.Parameter(0.1 * torch.randn(in_features, dtype=torch.complex64))
        self.optimizer_name = optimizer
        self.losses: list[tuple[int, float]] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = (x.to(torch.complex64) @ self.w - y).abs().pow(2).mean()
        self.losses.append((self.trainer.global_step, float(loss.detach())))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.05)


def same_batch_loader(x: Tensor, y: Tensor, steps: int, bad: dict[int, str] | None = None) -> DataLoader:
    """``steps`` copies of the full batch ``(x, y)`` (a deterministic loss); ``bad[k]`` is ``"nan"`` (a NaN input)
    or ``"spike"`` (inputs × 10) for batch ``k``."""
    xs, ys = x.repeat(steps, 1), y.repeat(steps, 1)
    n = x.shape[0]
    for k, kind in (bad or {}).items():
        if kind == "nan":
            xs[k * n, 0] = math.nan
        else:
            xs[k * n : (k + 1) * n] *= 10.0
    return DataLoader(TensorDataset(xs, ys), batch_size=n, shuffle=False)
