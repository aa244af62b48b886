"""Does the default clip rule leave healthy runs alone and still catch spikes? ``"trend"`` against ZClip, side by side.

Third-party-style models built from configs with random weights (no downloads): a small Hugging Face GPT-2 (tied
embeddings) and a BERT-style masked-LM encoder from ``transformers`` configs, a stock ``nn.TransformerEncoder`` used
as a causal model, and a residual CNN with BatchNorm. Each is trained with AdamW and a linear LR warm-up (so the
global gradient norm rises in the early phase, the regime where ZClip clips healthy steps) on a learnable synthetic
task (a fixed random Markov chain for the token models, a random linear teacher for the CNN), for several seeds, in
three arms on the same data and initialisation:

* ``none``: no callback;
* ``trend``: ``GradientFlowCallback(auto_intervene=True)`` with its defaults (``clip_mode="trend"``);
* ``zscore``: the same with ``clip_mode="zscore"``, ZClip's official rule (z 2.5, EMA 0.97, 25 warm-up steps).

**Healthy runs** report the held-out loss of each arm, its ratio to ``none`` and how many steps each rule clipped.
**Spike runs** inject a fault: ``burst`` multiplies the model's input (the embedding output of token models, the
images of the CNN) by ``--burst-factors`` on ``--burst-steps`` steps; ``lr`` multiplies the learning rate by
``--lr-factor`` on one step (a poisoned schedule). They report, per arm, the held-out loss and which of the fault's
steps (the fault steps and the ``--after`` steps that follow) each rule clipped.

Usage (from the repository root)::

    python benchmarks/clip_efficacy.py                     # CPU, 4 models x 3 seeds: a few minutes
    python benchmarks/clip_efficacy.py --quick             # a smoke test
    python benchmarks/clip_efficacy.py --models gpt2,cnn --seeds 0,1,2,3,4 --steps 300
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 32
SEQ = 16
MODELS = ("gpt2", "bert", "transformer", "cnn")
ARMS = ("none", "trend", "zscore")
FAULTS = ("healthy", "burst", "lr")


# ---------------------------------------------------------------------------------------------------- data, models


def markov_tokens(n: int, seed: int) -> Tensor:
    """``n`` sequences of a fixed random Markov chain over :data:`VOCAB` tokens."""
    logits = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(1234)) * 3.0
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
    """A stock ``nn.TransformerEncoder`` as a causal token model."""

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


class ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


class ResidualCNN(nn.Module):
    """A small ResNet-style CNN with BatchNorm."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.Sequential(ResBlock(width), ResBlock(width))
        self.head = nn.Linear(width, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def build(name: str) -> nn.Module:
    """The model ``name`` (one of :data:`MODELS`) with random weights."""
    if name == "gpt2":
        import transformers

        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=True
        )
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        return transformers.GPT2LMHeadModel(config)
    if name == "bert":
        import transformers

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
    if name == "transformer":
        return CausalTransformer()
    if name == "cnn":
        return ResidualCNN()
    raise ValueError(f"Expected `name` to be one of {MODELS}, but got {name!r}.")


def input_module(name: str, model: nn.Module) -> nn.Module | None:
    """The module whose output is the model's input representation (scaled by a ``burst``); None: scale the batch."""
    if name == "gpt2":
        return model.transformer.wte  # type: ignore[return-value]
    if name == "bert":
        return model.bert.embeddings.word_embeddings  # type: ignore[return-value]
    if name == "transformer":
        return model.embed  # type: ignore[return-value]
    return None


@dataclass
class Fault:
    """What goes wrong in a run: nothing (``healthy``), an input ``burst`` or a poisoned ``lr`` step."""

    kind: str = "healthy"
    steps: tuple[int, ...] = ()
    factors: tuple[float, ...] = ()

    def factor(self, step: int) -> float:
        return self.factors[self.steps.index(step)] if step in self.steps else 1.0


def make_module(name: str, fault: Fault, lr: float, warmup: int, norm_ramp: int) -> Any:
    """The LightningModule of ``name``: AdamW, a linear LR warm-up over ``warmup`` steps, and a loss weight rising
    linearly from 0.1 to 1 over ``norm_ramp`` steps (the gradient norm rises with it: AdamW's updates barely change,
    the norm-based clip rules see a steadily trending norm)."""
    from lightning.pytorch import LightningModule

    def ramp(step: int) -> float:
        return 1.0 if norm_ramp <= 0 else min(1.0, 0.1 + 0.9 * step / norm_ramp)

    class ClipModule(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build(name)
            self.scale = 1.0
            target = input_module(name, self.model)
            if target is not None:
                target.register_forward_hook(lambda _m, _i, out: out * self.scale if self.scale != 1.0 else out)

        def loss(self, batch: Any) -> Tensor:
            if name == "cnn":
                x, y = batch
                return nn.functional.cross_entropy(self.model(x * self.scale), y)
            (tokens,) = batch
            if name == "bert":
                masked = tokens.clone()
                where = torch.zeros_like(tokens, dtype=torch.bool)
                where[:, 1::4] = True
                masked[where] = VOCAB
                labels = torch.where(where, tokens, torch.full_like(tokens, -100))
                return self.model(input_ids=masked, labels=labels).loss  # type: ignore[no-any-return]
            if name == "gpt2":
                return self.model(input_ids=tokens, labels=tokens).loss  # type: ignore[no-any-return]
            logits = self.model(tokens[:, :-1])
            return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            step = self.trainer.global_step
            self.scale = fault.factor(step) if fault.kind == "burst" else 1.0
            loss = self.loss(batch)
            self.scale = 1.0
            return loss * ramp(step)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01)

            def schedule(step: int) -> float:
                poison = fault.factor(step) if fault.kind == "lr" else 1.0
                return poison * min(1.0, (step + 1) / warmup)

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return ClipModule()


# ---------------------------------------------------------------------------------------------------- one run


class RecordingClipper:
    """Wraps a callback's clipper and keeps every (norm, threshold) pair on the device (read once at the end)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def __call__(self, norm: Tensor) -> Tensor:
        threshold = self.inner(norm)
        self.pairs.append((norm.detach().float().clone(), threshold.detach().clone()))
        return threshold  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def clipped_steps(self) -> list[int]:
        return [i for i, (n, t) in enumerate(self.pairs) if math.isfinite(float(n)) and float(n) > float(t)]


@dataclass
class RunResult:
    model: str
    fault: str
    arm: str
    seed: int
    loss: float
    clipped: list[int] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    seconds: float = 0.0


def run(
    name: str,
    arm: str,
    seed: int,
    fault: Fault | None = None,
    steps: int = 150,
    lr: float = 3e-3,
    warmup: int = 30,
    norm_ramp: int = 60,
    batch_size: int = 16,
) -> RunResult:
    """Trains ``name`` in arm ``arm`` (see :data:`ARMS`) and returns the held-out loss and the clipped steps."""
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lightning_gradflow import GradientFlowCallback

    fault = fault or Fault()
    seed_everything(seed, workers=True, verbose=False)
    module = make_module(name, fault, lr, warmup, norm_ramp)
    n = steps * batch_size
    if name == "cnn":
        train, held = TensorDataset(*teacher_images(n, seed)), TensorDataset(*teacher_images(256, 10_000 + seed))
    else:
        train, held = TensorDataset(markov_tokens(n, seed)), TensorDataset(markov_tokens(256, 10_000 + seed))
    loader = DataLoader(train, batch_size=batch_size, shuffle=False)
    recorder: RecordingClipper | None = None
    callbacks: list[Any] = []
    if arm != "none":
        flow = GradientFlowCallback(auto_intervene=True, clip_mode=arm)  # type: ignore[arg-type]

        class Wrap(Callback):
            def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
                nonlocal recorder
                recorder = RecordingClipper(flow.clipper)
                flow.clipper = recorder  # type: ignore[assignment]

        callbacks = [flow, Wrap()]
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        loss = float(module.loss(tuple(held.tensors)))
    result = RunResult(name, fault.kind, arm, seed, loss if math.isfinite(loss) else math.inf, seconds=seconds)
    if recorder is not None:
        result.clipped = recorder.clipped_steps()
        result.norms = [float(n) for n, _ in recorder.pairs]
    return result


def fault_for(
    kind: str, burst_steps: tuple[int, ...], burst_factors: tuple[float, ...], lr_step: int, lr_factor: float
) -> Fault:
    if kind == "burst":
        return Fault("burst", burst_steps, burst_factors)
    if kind == "lr":
        return Fault("lr", (lr_step,), (lr_factor,))
    return Fault()


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common

    parser = common.base_parser(__doc__, device=False)
    parser.add_argument("--models", type=common.split_list, default=MODELS)
    parser.add_argument("--seeds", type=lambda s: tuple(int(v) for v in common.split_list(s)), default=(0, 1, 2))
    parser.add_argument("--faults", type=common.split_list, default=FAULTS)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30, help="linear LR warm-up steps (the rising-norm phase)")
    parser.add_argument("--norm-ramp", type=int, default=60, help="steps of the rising loss weight (0: none)")
    parser.add_argument(
        "--burst-steps", type=lambda s: tuple(int(v) for v in common.split_list(s)), default=(60, 61, 62)
    )
    parser.add_argument(
        "--burst-factors", type=lambda s: tuple(float(v) for v in common.split_list(s)), default=(30.0, 100.0, 300.0)
    )
    parser.add_argument("--lr-step", type=int, default=60)
    parser.add_argument("--lr-factor", type=float, default=100.0)
    parser.add_argument("--after", type=int, default=1, help="steps after a fault that count as its spikes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one seed, 2 models, 80 steps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.steps = ("gpt2", "cnn"), (0,), 80
        args.burst_steps, args.lr_step = (40, 41, 42), 40
    torch.set_num_threads(args.threads)
    common.quiet_lightning()
    command = common.command_line(argv, "benchmarks/clip_efficacy.py")
    results: list[RunResult] = []
    for kind in args.faults:
        fault = fault_for(kind, args.burst_steps, args.burst_factors, args.lr_step, args.lr_factor)
        for name in args.models:
            for seed in args.seeds:
                for arm in ARMS:
                    r = run(
                        name,
                        arm,
                        seed,
                        fault,
                        steps=args.steps,
                        lr=args.lr,
                        warmup=args.warmup,
                        norm_ramp=args.norm_ramp,
                    )
                    results.append(r)
    summary = summarise(results, args)
    print_tables(summary, command)
    machine = common.machine_info(torch.device("cpu")) if hasattr(common, "machine_info") else {}
    payload = common.run_record(
        command, machine, common.config_dict(args), summary=summary, runs=[vars(r) for r in results]
    )
    out = args.out or common.OUT_DIR / f"clip_efficacy{'_quick' if args.quick else ''}.json"
    common.write_json(out, payload)
    return payload


def spike_window(args: Any, kind: str) -> set[int]:
    steps = args.burst_steps if kind == "burst" else (args.lr_step,)
    return {s + k for s in steps for k in range(args.after + 1)}


def spike_ratio(norms: list[float], step: int, history: int = 15) -> float:
    """The norm at ``step`` over the median of the ``history`` norms before it."""
    if step >= len(norms) or step < history:
        return math.nan
    past = sorted(norms[step - history : step])
    return norms[step] / past[len(past) // 2]


def summarise(results: list[RunResult], args: Any) -> list[dict[str, Any]]:
    """One row per (fault, model, seed): each arm's loss, ratio to ``none`` and clipped steps."""
    rows = []
    keys = sorted({(r.fault, r.model, r.seed) for r in results}, key=lambda k: (FAULTS.index(k[0]), k[1], k[2]))
    for kind, name, seed in keys:
        by_arm = {r.arm: r for r in results if (r.fault, r.model, r.seed) == (kind, name, seed)}
        base = by_arm["none"].loss
        row: dict[str, Any] = {"fault": kind, "model": name, "seed": seed, "loss_none": base}
        window = spike_window(args, kind) if kind != "healthy" else set()
        for arm in ("trend", "zscore"):
            r = by_arm[arm]
            row[f"loss_{arm}"] = r.loss
            row[f"ratio_{arm}"] = r.loss / base if math.isfinite(base) and base > 0 else math.nan
            row[f"clipped_{arm}"] = len(r.clipped)
            row[f"spikes_{arm}"] = sorted(set(r.clipped) & window)
            row[f"early_norm_rise_{arm}"] = (
                max(r.norms[: max(args.norm_ramp, args.warmup)]) / r.norms[0]
                if r.norms and r.norms[0] > 0
                else math.nan
            )
        missed = sorted(set(row["spikes_zscore"]) - set(row["spikes_trend"]))
        row["zscore_spikes_missed_by_trend"] = missed
        # how far above the run's recent norms each fault step was (in the trend arm: the norms before clipping)
        row["fault_norm_ratio"] = {s: spike_ratio(by_arm["trend"].norms, s) for s in sorted(window)}
        row["missed_max_ratio"] = max((row["fault_norm_ratio"][s] for s in missed), default=math.nan)
        rows.append(row)
    return rows


def print_tables(rows: list[dict[str, Any]], command: str) -> None:
    print(f"\n{command}\n")
    head = (
        f"{'fault':8} {'model':12} {'seed':>4} {'none':>8} {'trend':>8} {'ratio':>7} {'clips':>5}"
        f" {'zscore':>8} {'ratio':>7} {'clips':>5}  spikes clipped (trend | zscore)"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        spikes = f"{r['spikes_trend']} | {r['spikes_zscore']}" if r["fault"] != "healthy" else ""
        print(
            f"{r['fault']:8} {r['model']:12} {r['seed']:>4} {r['loss_none']:8.4f} {r['loss_trend']:8.4f}"
            f" {r['ratio_trend']:7.3f} {r['clipped_trend']:>5} {r['loss_zscore']:8.4f} {r['ratio_zscore']:7.3f}"
            f" {r['clipped_zscore']:>5}  {spikes}"
        )
    healthy = [r for r in rows if r["fault"] == "healthy"]
    if healthy:
        worst_t = max(r["ratio_trend"] for r in healthy)
        worst_z = max(r["ratio_zscore"] for r in healthy)
        print(f"\nhealthy runs: worst loss ratio to no callback: trend {worst_t:.4f}, zscore {worst_z:.4f}")
    spikes = [r for r in rows if r["fault"] != "healthy"]
    if spikes:
        missed = sum(len(r["zscore_spikes_missed_by_trend"]) for r in spikes)
        ratios = [r["missed_max_ratio"] for r in spikes if r["zscore_spikes_missed_by_trend"]]
        print(
            f"spike runs: fault steps ZClip clipped that the trend rule did not: {missed}"
            f" (largest of them: {max(ratios, default=math.nan):.2f}x the median of the 15 norms before)"
        )
        for kind in ("burst", "lr"):
            rows_k = [r for r in spikes if r["fault"] == kind]
            if rows_k:
                worst = max(r["loss_trend"] / r["loss_zscore"] for r in rows_k)
                print(f"{kind}: worst final loss of trend / ZClip: {worst:.4f}")


if __name__ == "__main__":
    main()
