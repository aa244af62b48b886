"""Models with known Hessians and reference probes, for the SharpnessCallback tests (module level: they pickle)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradflow.callbacks.sharpness import SharpnessCallback


def regression_data(n: int = 64, features: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Inputs with unequal feature scales (a well separated top eigenvalue) and a noisy linear target."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen) * torch.linspace(2.0, 0.5, features)
    y = x @ torch.randn(features, 1, generator=gen) + 0.1 * torch.randn(n, 1, generator=gen)
    return x, y


def loader(x: Tensor, y: Tensor, batch_size: int | None = None) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or len(x), shuffle=False)


def exact_hessian(x: Tensor) -> Tensor:
    """The Hessian of ``mean((x w + b − y)²)`` in (w, b): ``2/n [x 1]ᵀ[x 1]`` (float64), in parameter order."""
    design = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    return 2 * design.T @ design / len(x)


def top_eigenvalue(x: Tensor) -> float:
    """λ_max of :func:`exact_hessian`."""
    return float(torch.linalg.eigvalsh(exact_hessian(x))[-1])


class LinearRegression(LightningModule):
    """``nn.Linear(features, 1)`` with MSE: a quadratic loss whose Hessian does not depend on the weights."""

    def __init__(
        self, features: int = 4, lr: float = 0.1, optimizer: str = "sgd", momentum: float = 0.0, schedule: bool = False
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(features, 1)
        with torch.no_grad():
            self.layer.weight.zero_()
            self.layer.bias.zero_()
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.schedule = schedule
        self.losses: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            raise AssertionError("the probe must run with gradients enabled")
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        elif self.optimizer_name == "rmsprop":
            opt = torch.optim.RMSprop(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if not self.schedule:
            return opt
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # recomputes lr from base_lrs
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def unstable_regression(schedule: bool = False) -> tuple[LinearRegression, DataLoader, float]:
    """Full-batch GD at 1.5× its edge of stability (``lr = 3 / λ_max``: ``|1 − ηλ_max| = 2``, the top direction
    doubles every step): the model, its loader and the learning rate."""
    x, y = regression_data()
    lr = 3.0 / top_eigenvalue(x)
    return LinearRegression(lr=lr, schedule=schedule), loader(x, y), lr


class NoisyNet(LightningModule):
    """BatchNorm, dropout and momentum: anything a probe could disturb (running statistics, RNG, gradients)."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 16), nn.ReLU()
        )
        self.head = nn.Linear(16, 1)
        self.optimizer_name = optimizer

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.net(x)), y)
        self.log("train_loss", loss, on_epoch=True)
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.AdamW(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True)


class LocalProbe(Callback):
    """Records, per step, what the callback measured locally before the all-reduce (list it after the callback)."""

    def __init__(self) -> None:
        self.local: dict[int, float] = {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        x, _ = batch
        self.local[trainer.global_step - 1] = top_eigenvalue(x)


class QuietMLP(LightningModule):
    """A small tanh MLP whose ``training_step`` has no side effects (no ``self.log``): it can be ``torch.compile``-d."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


# ----------------------------------------------------------------------------------------- reliability audit


def token_data(n: int = 32, vocab: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token ids (every id appears, some repeat within a batch) and a real target."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen), torch.randn(n, generator=gen)


class SparseEmbedding(LightningModule):
    """``nn.Embedding(sparse=True)`` → tanh → linear: sparse gradients for the table, dense for the head.

    ``optimizer="sgd"``: one SGD, automatic optimization. ``optimizer="sparse_adam"``: SparseAdam for the table and
    Adam for the head, manual optimization (Lightning needs it for two optimizers). ``sparse=False``: the dense twin.
    """

    def __init__(self, optimizer: str = "sgd", sparse: bool = True, vocab: int = 10, dim: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim, sparse=sparse)
        self.head = nn.Linear(dim, 1)
        self.optimizer_name = optimizer
        self.automatic_optimization = optimizer == "sgd"

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(torch.tanh(self.emb(x))).squeeze(-1), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        if not self.automatic_optimization:
            optimizers = self.optimizers()
            for opt in optimizers:  # type: ignore[union-attr]
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in optimizers:  # type: ignore[union-attr]
                opt.step()
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return [torch.optim.SparseAdam(self.emb.parameters(), lr=1e-2), torch.optim.Adam(self.head.parameters(), 1e-2)]


class ModuleLossSharpness(SharpnessCallback):
    """SharpnessCallback for manual optimization: the loss is ``pl_module.loss(batch)`` (no optimizer step)."""

    def loss_fn(self, pl_module: LightningModule, batch: Any) -> Tensor:
        return pl_module.loss(batch)  # type: ignore[operator]


def dense_curvature(model: SparseEmbedding, batch: tuple[Tensor, Tensor]) -> dict[str, float]:
    """The exact float64 Hessian of :class:`SparseEmbedding`'s loss (dense lookup): λ_max, trace, batch sharpness."""
    x, y = batch
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def loss(v: Tensor) -> Tensor:
        pieces, offset = [], 0
        for shape in shapes:
            pieces.append(v[offset : offset + shape.numel()].view(shape))
            offset += shape.numel()
        table, weight, bias = pieces
        out = torch.tanh(table[x]) @ weight.T + bias
        return nn.functional.mse_loss(out.squeeze(-1), y.double())

    h = torch.autograd.functional.hessian(loss, flat)
    g = torch.autograd.functional.jacobian(loss, flat)
    return {
        "lambda_max": float(torch.linalg.eigvalsh(h)[-1]),
        "trace": float(h.trace()),
        "batch_sharpness": float(g @ h @ g / (g @ g)),
    }


class DenseCurvature(Callback):
    """Records :func:`dense_curvature` of the batch after each batch, by the last optimizer step (list it after the
    SharpnessCallback)."""

    def __init__(self) -> None:
        self.exact: dict[int, dict[str, float]] = {}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.exact[trainer.global_step - 1] = dense_curvature(pl_module, batch)  # type: ignore[arg-type]


class LinearLoss(LinearRegression):
    """A loss linear in the weights, ``mean(x w + b − y)``: its Hessian is zero."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return (self(x) - y).mean()


# ------------------------------------------------------------------------ models people use (tests/test_hvp_models.py)


class ThirdPartyModule(LightningModule):
    """A module whose loss is :meth:`loss` (also what :func:`exact_lambda_max` differentiates), SGD."""

    def loss(self, batch: Any) -> Tensor:
        raise NotImplementedError

    def reference_loss(self, batch: Any) -> Tensor:
        """The same loss, computed in a way that has a double backward (default: :meth:`loss`)."""
        return self.loss(batch)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class StockEncoder(ThirdPartyModule):
    """``nn.TransformerEncoder`` (fused SDPA attention in training, no double backward) → linear head, MSE."""

    def __init__(self, d_model: int = 8, layers: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(d_model, 2, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 1)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.encoder(x)).squeeze(-1), y)


def encoder_data(n: int = 8, seq: int = 5, d_model: int = 8) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, seq, d_model, generator=gen), torch.randn(n, seq, generator=gen)


class HFCausalLM(ThirdPartyModule):
    """A Hugging Face causal LM built from a config with random weights (``"gpt2"``: tied embeddings; ``"llama"``),
    SDPA attention, next-token loss on the batch's ids."""

    def __init__(self, kind: str = "llama", vocab: int = 32, hidden: int = 8) -> None:
        super().__init__()
        import transformers

        torch.manual_seed(0)
        config: Any
        if kind == "gpt2":
            config = transformers.GPT2Config(
                vocab_size=vocab, n_positions=16, n_embd=hidden, n_layer=1, n_head=2, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
            )  # fmt: skip
            self.model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
        else:
            config = transformers.LlamaConfig(
                vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, bos_token_id=0,
                eos_token_id=0, pad_token_id=None, tie_word_embeddings=True,
            )  # fmt: skip
            self.model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")

    def loss(self, batch: tuple[Tensor]) -> Tensor:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss


def token_batches(n: int = 4, seq: int = 8, vocab: int = 32) -> tuple[Tensor]:
    return (torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(2)),)


class CheckpointedMLP(ThirdPartyModule):
    """``tanh`` MLP whose middle block runs under reentrant ``torch.utils.checkpoint`` (refuses ``autograd.grad``)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, width)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, 1)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        x, y = batch
        h = checkpoint(self.block, self.inp(x), use_reentrant=True)
        return nn.functional.mse_loss(self.head(h).squeeze(-1), y)

    def reference_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.block(self.inp(x))).squeeze(-1), y)


class SparseBag(ThirdPartyModule):
    """``nn.EmbeddingBag(sparse=True)`` (mean of each row's ids; its backward has no derivative) → tanh → linear."""

    def __init__(self, vocab: int = 10, dim: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(vocab, dim, mode="mean", sparse=True)
        self.head = nn.Linear(dim, 1)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        ids, y = batch
        return nn.functional.mse_loss(self.head(torch.tanh(self.bag(ids))).squeeze(-1), y)

    def reference_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        ids, y = batch
        return nn.functional.mse_loss(self.head(torch.tanh(self.bag.weight[ids].mean(1))).squeeze(-1), y)


def bag_data(n: int = 16, width: int = 3, vocab: int = 10) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab, (n, width), generator=gen), torch.randn(n, generator=gen)


def exact_lambda_max(module: ThirdPartyModule, batch: Any) -> float:
    """λ_max of the full float64 Hessian of ``module.reference_loss(batch)`` (row by row, math attention kernel).

    No finite differences and no Lanczos: the reference the callback's defaults are checked against.
    """
    import copy

    from torch.nn.attention import SDPBackend, sdpa_kernel

    ref = copy.deepcopy(module).double()
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    params = [p for p in ref.parameters() if p.requires_grad]
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(ref.reference_loss(batch), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        rows = []
        for i in range(flat.numel()):
            row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
            pieces = [torch.zeros_like(p) if r is None else r for p, r in zip(params, row, strict=True)]
            rows.append(torch.cat([r.reshape(-1) for r in pieces]))
    hessian = torch.stack(rows)
    return float(torch.linalg.eigvalsh((hessian + hessian.T) / 2)[-1])
