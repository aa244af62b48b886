"""The zoo: models this project did not write (Hugging Face ``transformers``, stock PyTorch layers), tiny and random.

Every model is built from a config with random weights (no downloads: ``HF_HUB_OFFLINE=1``) and trained by
:class:`ZooModule` on a learnable synthetic task: token models on sequences of a fixed random Markov chain (next-token
prediction; masked-token prediction for the BERT-style encoder), the residual CNN on 8×8 images labelled by a fixed
random teacher. Each model has a *broken twin* (:data:`BROKEN`) that one of the callbacks is meant to catch:

* ``"saturated"`` (LSTM, GRU): gates saturated shut at initialisation — GateSurgeryCallback;
* ``"spike"`` (GPT-2, Llama): a burst of two steps whose loss is multiplied by ``1e4`` (AdamW's second moments
  then throttle training for hundreds of steps) — EarlyCollapseCallback;
* ``"nan"`` (BERT, ``nn.TransformerEncoder``): one batch whose loss is NaN — EarlyCollapseCallback / GradientFlow;
* ``"deep"`` (CNN): a deep plain stack of sigmoid layers, no residuals, no BatchNorm — GradientFlowCallback
  (diagnosis: no callback here can repair vanishing gradients by itself).

:func:`run` trains one model with all four callbacks at their defaults (``auto_intervene`` on or off, or no callbacks)
and returns a :class:`ZooResult`: the held-out loss, the callbacks' warnings and interventions, the wall time.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 32
SEQ = 16
TOKEN_MODELS = ("gpt2", "bert", "llama", "transformer", "lstm", "gru")
MODELS = (*TOKEN_MODELS, "cnn")
BROKEN = {
    "gpt2": "spike",
    "llama": "spike",
    "bert": "nan",
    "transformer": "nan",
    "lstm": "saturated",
    "gru": "saturated",
    "cnn": "deep",
}
SPIKE_STEPS = (30, 31)
NAN_STEP = 10
SPIKE_FACTOR = 1e4
CALLBACK_NAMES = ("GradientFlowCallback", "GateSurgeryCallback", "SharpnessCallback", "EarlyCollapseCallback")
NOTICES = ("no logger to write to", "found no gated module")  # setup notices about the run, not findings


def markov_tokens(n: int, seed: int) -> Tensor:
    """``n`` sequences of a fixed random Markov chain over :data:`VOCAB` tokens (the chain is seed 1234's)."""
    chain = torch.Generator().manual_seed(1234)
    logits = torch.randn(VOCAB, VOCAB, generator=chain) * 3.0
    probs = logits.softmax(-1)
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, SEQ, dtype=torch.long)
    out[:, 0] = torch.randint(VOCAB, (n,), generator=gen)
    for t in range(1, SEQ):
        out[:, t] = torch.multinomial(probs[out[:, t - 1]], 1, generator=gen).squeeze(1)
    return out


def teacher_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` random 1×8×8 images labelled by a fixed random linear teacher (4 classes)."""
    teacher = torch.randn(64, 4, generator=torch.Generator().manual_seed(4321))
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x, (x.flatten(1) @ teacher).argmax(1)


class CausalTransformer(nn.Module):
    """A stock ``nn.TransformerEncoder`` used as a causal character model (embedding, positions, linear head)."""

    def __init__(self, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.randn(SEQ, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 2, dim_feedforward=2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.encoder(self.embed(tokens) + self.pos[: tokens.shape[1]], mask=mask, is_causal=True))


class RecurrentLM(nn.Module):
    """A stock ``nn.LSTM``/``nn.GRU`` (2 layers) character model."""

    def __init__(self, kind: str, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(width, width, num_layers=layers, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity (``residual=False``, ``norm=False``: a plain block)."""

    def __init__(self, width: int, residual: bool = True, norm: bool = True, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width) if norm else nn.Identity()
        self.act = act()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width) if norm else nn.Identity()
        self.out = act()

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.out(x + y if self.residual else y)


class ResidualCNN(nn.Module):
    """A small ResNet-style CNN with BatchNorm; ``deep=True``: its broken twin, 12 plain sigmoid blocks."""

    def __init__(self, width: int = 8, deep: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        if deep:
            blocks = [Block(width, residual=False, norm=False, act=nn.Sigmoid) for _ in range(12)]
        else:
            blocks = [Block(width) for _ in range(2)]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def build(name: str, broken: bool = False) -> nn.Module:
    """The zoo model ``name`` (one of :data:`MODELS`), random weights; ``broken``: its twin's initialisation."""
    if name in ("gpt2", "bert", "llama"):
        import transformers

        if name == "gpt2":
            config = transformers.GPT2Config(
                vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=True
            )
            config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
            return transformers.GPT2LMHeadModel(config)
        if name == "bert":
            config = transformers.BertConfig(
                vocab_size=VOCAB + 1,  # + a [MASK] token
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=SEQ,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
            return transformers.BertForMaskedLM(config)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=SEQ,
        )
        return transformers.LlamaForCausalLM(config)
    if name == "transformer":
        return CausalTransformer()
    if name in ("lstm", "gru"):
        model = RecurrentLM(name)
        if broken:  # LSTM gates (i, f, g, o): input and output shut; GRU gates (r, z, n): update gate shut
            saturate(model.rnn, {0: -8.0, 3: -8.0} if name == "lstm" else {1: 8.0})
        return model
    if name == "cnn":
        return ResidualCNN(deep=broken)
    raise ValueError(f"Expected `name` to be one of {MODELS}, but got {name!r}.")


def saturate(rnn: nn.Module, gates: dict[int, float]) -> None:
    """Sets the bias of the given gate blocks in every layer of an ``nn.LSTM``/``nn.GRU`` (and zeroes ``bias_hh``)."""
    units = rnn.hidden_size
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            for g, value in gates.items():
                rows = slice(g * units, (g + 1) * units)
                if name.startswith("bias_ih"):
                    p[rows] = value
                elif name.startswith("bias_hh"):
                    p[rows] = 0.0


class ZooModule(LightningModule):
    """Trains one zoo model with AdamW; ``fault`` injects the broken twin's data fault (``"spike"``, ``"nan"``)."""

    def __init__(self, name: str, broken: bool = False, lr: float = 3e-3) -> None:
        super().__init__()
        self.name, self.lr = name, lr
        self.fault = BROKEN[name] if broken else ""
        self.model = build(name, broken)
        self.losses: list[float] = []

    def loss(self, batch: Any) -> Tensor:
        if self.name == "cnn":
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)
        (tokens,) = batch
        if self.name == "bert":
            masked = tokens.clone()
            where = torch.zeros_like(tokens, dtype=torch.bool)
            where[:, 1::4] = True
            masked[where] = VOCAB
            labels = torch.where(where, tokens, torch.full_like(tokens, -100))
            return self.model(input_ids=masked, labels=labels).loss
        if self.name in ("gpt2", "llama"):
            return self.model(input_ids=tokens, labels=tokens).loss
        logits = self.model(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.losses.append(float(loss.detach()))
        step = self.trainer.global_step
        if self.fault == "spike" and step in SPIKE_STEPS:
            loss = loss * SPIKE_FACTOR
        elif self.fault == "nan" and step == NAN_STEP:
            loss = loss * math.nan
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def loaders(name: str, steps: int, batch_size: int = 16, seed: int = 0) -> tuple[DataLoader, TensorDataset]:
    """A training loader of ``steps`` batches and a held-out set (fixed seeds)."""
    n = steps * batch_size
    if name == "cnn":
        train, held = TensorDataset(*teacher_images(n, seed)), TensorDataset(*teacher_images(256, 10_000 + seed))
    else:
        train, held = TensorDataset(markov_tokens(n, seed)), TensorDataset(markov_tokens(256, 10_000 + seed))
    return DataLoader(train, batch_size=batch_size, shuffle=False), held


def held_out_loss(module: ZooModule, held: TensorDataset) -> float:
    """Mean loss on the held-out set (eval mode, no fault); ``inf`` when it is not finite."""
    module.eval()
    with torch.no_grad():
        loss = float(module.loss(tuple(t for t in held.tensors)))
    module.train()
    return loss if math.isfinite(loss) else math.inf


def callbacks(auto_intervene: bool) -> list[Any]:
    """All four callbacks at their defaults (only ``auto_intervene`` set)."""
    from lightning_gradflow import (
        EarlyCollapseCallback,
        GateSurgeryCallback,
        GradientFlowCallback,
        SharpnessCallback,
    )

    return [
        GradientFlowCallback(auto_intervene=auto_intervene),
        GateSurgeryCallback(auto_intervene=auto_intervene),
        SharpnessCallback(auto_intervene=auto_intervene),
        EarlyCollapseCallback(auto_intervene=auto_intervene),
    ]


@dataclass
class ZooResult:
    """One zoo run: the held-out loss, our callbacks' warnings and interventions, the wall time, the weights."""

    name: str
    broken: bool
    mode: str
    loss: float
    warnings: list[str] = field(default_factory=list)
    interventions: list[tuple[str, str, int]] = field(default_factory=list)  # (callback, kind, step)
    seconds: float = 0.0
    state: dict[str, Tensor] = field(default_factory=dict)

    @property
    def kinds(self) -> set[str]:
        """The kinds of interventions recorded."""
        return {kind for _, kind, _ in self.interventions}


def run(name: str, broken: bool = False, mode: str = "auto", steps: int = 60, seed: int = 0) -> ZooResult:
    """Trains zoo model ``name`` for ``steps`` optimizer steps.

    Args:
        name: one of :data:`MODELS`.
        broken: train its broken twin.
        mode: ``"none"`` (no callbacks), ``"monitor"`` (the four callbacks, monitoring only) or ``"auto"``.
        steps: optimizer steps (one epoch of that many batches).
        seed: the weights' seed.
    """
    seed_everything(seed, workers=True)
    module = ZooModule(name, broken)
    train, held = loaders(name, steps)
    cbs = [] if mode == "none" else callbacks(mode == "auto")
    trainer = Trainer(
        max_steps=steps,
        max_epochs=1,
        callbacks=cbs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add synchronisation
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, train)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    ours = [str(w.message) for w in caught if str(w.message).startswith(CALLBACK_NAMES)]
    ours = [m for m in ours if not any(n in m for n in NOTICES)]
    done = [(type(c).__name__, r.kind, r.step) for c in cbs for r in c.interventions]
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return ZooResult(name, broken, mode, held_out_loss(module, held), ours, done, seconds, state)
