"""A run made to collapse at a known step, and EarlyCollapseCallback bringing it back.

A ReLU MLP classifies points of a Gaussian mixture (``--classes`` clusters in ``--dim`` dimensions) with SGD and
momentum. At step ``--spike-step`` a faulty schedule multiplies the learning rate by ``--spike-factor`` for
``--spike-length`` steps. The weights blow up and the loss turns to NaN for good.

The script trains the same model three times from the same seed, on the same batches:

1. unperturbed (the reference);
2. perturbed, without the callback: the loss ends non-finite;
3. perturbed, with ``EarlyCollapseCallback(auto_intervene=True)``: the loss and gradient-norm z-scores raise the
   alarm on the first step after the spike, the learning rate is cut, and on the second alarm step the callback rolls
   back to its last healthy in-memory snapshot (weights, optimizer and scheduler state); the data stream moves on,
   so the batches that led into the collapse are not replayed. Training continues from there.

It prints the interventions and the final loss of each run (mean of the last 20 steps). Near the end the converged
classifier (loss ~1e-4) has a genuine loss spike of its own on one batch; the callback answers it with one
learning-rate cut. On CPU it takes a few seconds.

Run: ``python examples/collapse_recovery.py [--steps 400] [--spike-step 150] [--spike-factor 1000]``
"""

from __future__ import annotations

import argparse
import math
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradflow.callbacks.early_collapse import EarlyCollapseCallback


class MixtureMLP(LightningModule):
    """``dim → hidden → ReLU → hidden → ReLU → classes``, cross-entropy, SGD with momentum."""

    def __init__(self, dim: int, classes: int, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class LRSpike(Callback):
    """A faulty schedule: the learning rate × ``factor`` for ``length`` optimizer steps from ``step`` on."""

    def __init__(self, step: int, factor: float, length: int) -> None:
        self.step, self.factor, self.length = step, factor, length
        self._saved: list[float] | None = None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.step <= trainer.global_step < self.step + self.length:
            self._saved = [g["lr"] for g in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] *= self.factor

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._saved is not None:
            for group, lr in zip(trainer.optimizers[0].param_groups, self._saved, strict=True):
                group["lr"] = lr
            self._saved = None


def mixture_loader(steps: int, dim: int, classes: int, batch_size: int, seed: int) -> DataLoader:
    """``steps`` batches of a Gaussian mixture (unit-variance clusters around random centres), unshuffled."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=gen)
    y = torch.randint(classes, (steps * batch_size,), generator=gen)
    x = centres[y] + torch.randn(steps * batch_size, dim, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def train(args: argparse.Namespace, perturbed: bool, callback: EarlyCollapseCallback | None) -> MixtureMLP:
    seed_everything(args.seed, verbose=False)
    model = MixtureMLP(args.dim, args.classes)
    callbacks: list[Callback] = []
    if perturbed:
        callbacks.append(LRSpike(args.spike_step, args.spike_factor, args.spike_length))
    if callback is not None:
        callbacks.append(callback)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, mixture_loader(args.steps, args.dim, args.classes, args.batch_size, args.seed))
    return model


def final_loss(model: MixtureMLP, last: int = 20) -> float:
    """Mean of the last ``last`` training losses (NaN once any of them is non-finite)."""
    values = model.losses[-last:]
    return sum(values) / len(values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--spike-step", type=int, default=150)
    p.add_argument("--spike-factor", type=float, default=1000.0)
    p.add_argument("--spike-length", type=int, default=3)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--snapshot-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the three trainings, prints the comparison and returns its numbers."""
    args = parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        reference = train(args, perturbed=False, callback=None)
        broken = train(args, perturbed=True, callback=None)
        callback = EarlyCollapseCallback(auto_intervene=True, snapshot_every_n_steps=args.snapshot_every)
        recovered = train(args, perturbed=True, callback=callback)
    first_nonfinite = next((i for i, v in enumerate(broken.losses) if not math.isfinite(v)), None)
    result = {
        "reference_loss": final_loss(reference),
        "broken_loss": final_loss(broken),
        "recovered_loss": final_loss(recovered),
        "first_nonfinite_step": first_nonfinite,
        "first_alarm_step": next((i.step for i in callback.interventions), None),
        "rollbacks": callback.rollbacks,
        "interventions": [str(i) for i in callback.interventions],
    }
    print(f"learning rate x {args.spike_factor:g} for {args.spike_length} steps from step {args.spike_step}")
    print(f"first non-finite loss without the callback: step {first_nonfinite}")
    print(f"first intervention of the callback:         step {result['first_alarm_step']}")
    print("interventions:")
    for line in result["interventions"]:
        print(f"  {line}")
    print(f"\ntraining loss after {args.steps} steps (mean of the last 20):")
    print(f"  unperturbed                        {result['reference_loss']:.4f}")
    print(f"  perturbed, no callback             {result['broken_loss']:.4f}")
    print(f"  perturbed, EarlyCollapseCallback   {result['recovered_loss']:.4f}")
    return result


if __name__ == "__main__":
    main()
