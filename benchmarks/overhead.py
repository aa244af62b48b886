"""Training-step overhead of ``GradientFlowCallback`` against no monitoring and against the code people use today.

Runs the real ``lightning.Trainer`` on two language models (a GPT-style transformer and a 2-layer LSTM) with these
*arms*, all in the same process, on the same data, each with its own copy of the model built from the same seed:

* ``baseline``: no gradient monitoring;
* ``gradflow``: ``GradientFlowCallback()`` (statistics on the device every step, one host transfer per log);
* ``gradflow_clip``: ``GradientFlowCallback(auto_intervene=True)`` (ZClip clipping; one host read per step to skip
  non-finite steps);
* ``lightning_grad_norm``: Lightning's documented recipe, ``self.log_dict(grad_norm(self, norm_type=2))`` in the
  module's ``on_before_optimizer_step``;
* ``naive_loop``: a callback that loops over the parameters computing the same per-layer statistics as the callback
  (L2 norm, RMS, max |g|, non-finite count, zero fraction) with one ``.item()`` per value, and logs them every step
  with ``pl_module.log``.

Plus ``baseline#2``, a second baseline identical to the first: the A/A comparison shows the noise floor.

Every module also logs its loss every step with ``self.log`` (as most training code does), and every Trainer uses
``log_every_n_steps=50`` (``--log-every``) and a cheap logger: ``CSVLogger`` to a temporary folder, or, for a variant
named ``<arm>@noop``, a ``Logger`` subclass whose methods do nothing (the difference separates the logger's own cost).
No checkpointing, validation, progress bar or model summary.

**Interleaving.** One Trainer per variant, kept for the whole run: global step, optimizer state (the module returns
the same optimizer object from ``configure_optimizers`` on every ``fit``), callback state and logger carry on as in
one long run. Two modes (``--interleave``):

* ``step`` (CPU default): each variant's single ``trainer.fit`` runs in its own thread, and the threads take turns
  *every step*: at ``on_train_batch_start`` a variant ends its previous step, hands the turn to the next variant and
  waits for it to come back (every lap goes round the variants in a new random order, so that none always follows
  the same one, e.g. inherits its garbage-collection debt or cache state). Only the thread
  holding the turn runs, Trainer set-up and tear-down included, so variants never compete for the cores and every
  variant sees the same machine noise, step by step. The first ``--warmup-steps`` steps are not measured; the rest
  are grouped into ``--rounds`` rounds of ``--steps`` steps (the strata of the bootstrap). Every step starts with
  caches that another variant's step has just used: the same for all variants.
* ``block`` (CUDA default, where a turn would need a device synchronisation per step): ``trainer.fit`` is called
  once per block, with ``trainer.fit_loop.epoch_loop.max_steps`` raised by the block length each time. Round 0 runs
  a warm-up block of ``--warmup-steps`` per variant (not measured); each further round runs one block of ``--steps``
  per variant, round-robin from a rotating start. The first ``--skip`` steps of every block (caches refilled after
  another variant ran) and its last step (no next mark) are not measured. The warm-up block is half a log interval
  by default, so every measured block of 50 steps holds one logging step, in its middle.

**Timing.** A timing callback (first in the callback list) marks every ``on_train_batch_start``; a step lasts until
the next mark, so it covers the whole step: forward, backward, the hooks, the optimizer, Lightning's logging and the
logger, and fetching the next batch (from an in-memory pool). On CUDA the marks are CUDA events on the current stream
(block mode: no synchronisation inside a block; step mode: one at the end of every step, before the turn passes);
host times are kept too. The time spent inside the arm's own hooks (the callback's ``on_before_optimizer_step`` and
``on_train_batch_end``, or the module's ``on_before_optimizer_step``) is recorded per step as well ("hook ms": host
time; CUDA-event time on CUDA): a less noisy, *isolated* cost that leaves out work Lightning does later for
``self.log`` calls (its per-step result bookkeeping and the flush on logging steps).

**Memory.** With glibc's defaults, the activations freed at the end of a step go back to the OS and are faulted in
again in the next one (thousands of minor page faults per step on the CPU models here), by an amount that depends on
where each variant's tensors landed (and, in step mode, on its thread's malloc arena): a few per cent of step time
that differs between *identical* variants. So the script re-executes itself with ``MALLOC_ARENA_MAX=1``,
``MALLOC_MMAP_THRESHOLD_=32 MiB`` and ``MALLOC_TRIM_THRESHOLD_=4 GiB`` (unless they are set, or
``--no-malloc-tuning``); the page faults of every step are recorded (in the JSON; printed when the median of a
variant exceeds 100).

**Statistics.** Per variant: the median step time and its quartiles; the median of the logging steps; the *amortised*
step time ``median(other steps) × (1 - 1/L) + median(logging steps) / L`` for a log interval ``L`` (steps with
histograms or figures, every 10 L, are rarer still and not sampled). Overhead is ``t_variant / t_baseline - 1``
against the baseline with the same logger, with a 95 % CI from a bootstrap stratified by round (steps resampled
within each round; logging steps pooled). The target (issue: ``gradflow`` with the CSV logger costs at most 3 % on
CPU and 1 % on GPU) is checked on the amortised overhead; the median overhead, the CI, the isolated hook cost and the
A/A difference are printed beside it. The bootstrap only sees step-to-step noise: a variant can also be a few per cent
slower or faster *as a whole* (where its tensors landed in memory: page faults, huge pages, cache-set conflicts),
which is what the A/A row measures (up to 4 % here without the malloc settings above). The hook cost is steadier.

Usage (from the repository root)::

    python benchmarks/overhead.py                 # CPU: about 5 minutes on 2 cores
    python benchmarks/overhead.py --quick         # tiny models, few steps: a smoke test (overhead_<device>_quick.json)
    python benchmarks/overhead.py --models lstm --arms baseline,gradflow --rounds 8
    python benchmarks/overhead.py --device cuda   # default on a CUDA machine: GPT-2 small shapes, bf16-mixed
    python benchmarks/overhead.py --threads 1     # steadier when other processes share the cores

``--arms`` takes a comma-separated list of ``<arm>[@noop][#<n>]`` (``#<n>``: an identical extra copy); a ``@noop``
variant needs its baseline (``baseline@noop``) to report an overhead. The machine details, the command line, every
step time and the summary go to JSON (default ``benchmarks/out/overhead_<device>[_quick].json``).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as common
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

ARMS = ("baseline", "gradflow", "gradflow_clip", "lightning_grad_norm", "naive_loop")
LOGGERS = ("csv", "noop")
MODELS = ("transformer", "lstm")
SIZES = ("tiny", "small", "large")
#: ``baseline#2`` is a second, identical baseline: the A/A comparison shows the noise floor of the overheads.
DEFAULT_VARIANTS = (*ARMS, "baseline@noop", "gradflow@noop", "baseline#2")
AA_VARIANT = "baseline#2"
# The targets for `gradflow` (amortised overhead against the baseline, CSV logger).
CPU_MAX_OVERHEAD = 0.03
GPU_MAX_OVERHEAD = 0.01
TARGET_VARIANT = "gradflow"
#: glibc settings the script re-executes itself with (``--no-malloc-tuning`` keeps the defaults): without them glibc
#: hands freed activation memory back to the OS and faults it in again on the next step (thousands of minor page
#: faults per step here), by an amount that depends on each variant's memory layout: a few per cent of step time
#: that differs between identical variants. One arena: in step mode every variant runs in its own thread, and a
#: per-thread arena (heaps of at most 64 MiB, mapped and unmapped as a step's memory comes and goes) brings the
#: faults back for some variants; only one thread runs at a time, so a single arena costs no lock contention.
MALLOC_TUNING = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
}


# ---------------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    device: torch.device
    models: tuple[str, ...]
    variants: tuple[str, ...]
    size: str
    precision: str
    interleave: str
    steps: int
    rounds: int
    warmup_steps: int
    skip: int
    log_every: int
    threads: int
    batch_size: int | None
    seq_len: int | None
    seed: int
    bootstrap: int
    quick: bool
    json_path: Path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = common.base_parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {','.join(MODELS)} (default: both)")
    p.add_argument(
        "--arms",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated of {','.join(ARMS)}, each optionally suffixed '@noop' (no-op logger)\n"
        "and/or '#<n>' (an identical replica, e.g. baseline#2 for an A/A check)\n"
        f"(default: {','.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument(
        "--size",
        default=None,
        choices=SIZES,
        help="model shapes: tiny (smoke test), small (CPU: 4x256 GPT, 2x512 LSTM), large (GPU: GPT-2 small,\n"
        "2x1024 LSTM); default: tiny with --quick, else large on CUDA and small on CPU",
    )
    p.add_argument(
        "--precision", default=None, help="Trainer precision (default: bf16-mixed on CUDA when supported, else 32-true)"
    )
    p.add_argument(
        "--interleave",
        default=None,
        choices=("step", "block"),
        help="step: the variants take turns every step (threads in lockstep; CPU default);\n"
        "block: round-robin blocks of --steps steps, one `fit` each (CUDA default)",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per round (default 50; 10 with --quick)")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="measured rounds of --steps steps per variant (default: 3 CPU, 5 CUDA, 2 with --quick)",
    )
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="unmeasured steps first (default: half a log interval)"
    )
    p.add_argument(
        "--skip", type=int, default=None, help="block mode: unmeasured steps at the start of every block (default 3)"
    )
    p.add_argument(
        "--log-every", type=int, default=None, help="Trainer(log_every_n_steps) (default 50; 10 with --quick)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: the CPUs usable here)")
    p.add_argument("--batch-size", type=int, default=None, help="override the size preset's batch size")
    p.add_argument("--seq-len", type=int, default=None, help="override the size preset's sequence length")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs (0: none)")
    p.add_argument("--quick", action="store_true", help="tiny models, 2 rounds of 10 steps: a smoke test")
    p.add_argument(
        "--malloc-tuning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc: re-execute with MALLOC_ARENA_MAX=1, MALLOC_MMAP_THRESHOLD_=32 MiB and\n"
        "MALLOC_TRIM_THRESHOLD_=4 GiB unless set (no page faults from memory handed back to the OS every step;\n"
        "default: on)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/out/overhead_<device>[_quick].json")
    return p.parse_args(argv)


def split_variant(variant: str) -> tuple[str, str, str]:
    """``"<arm>[@<logger>][#<replica>]"`` as ``(arm, logger, replica)``; a replica is an identical extra copy."""
    name, _, replica = variant.partition("#")
    arm, _, logger = name.partition("@")
    return arm, logger or "csv", replica


def variant_name(arm: str, logger: str, replica: str = "") -> str:
    return (arm if logger == "csv" else f"{arm}@{logger}") + (f"#{replica}" if replica else "")


def make_config(args: argparse.Namespace) -> Config:
    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    models = common.split_list(args.models)
    if not models or not set(models) <= set(MODELS):
        raise SystemExit(f"Expected --models from {','.join(MODELS)}, but got {args.models!r}.")
    variants = tuple(variant_name(*split_variant(v)) for v in common.split_list(args.arms))
    for v in variants:
        arm, logger, replica = split_variant(v)
        if arm not in ARMS or logger not in LOGGERS or not (replica == "" or replica.isdigit()):
            raise SystemExit(
                f"Unknown arm {v!r}: expected one of {','.join(ARMS)}, optionally with '@noop' and/or '#<n>'."
            )
    if not variants or len(set(variants)) != len(variants):
        raise SystemExit(f"Expected distinct --arms, but got {args.arms!r}.")
    size = args.size or ("tiny" if args.quick else ("large" if cuda else "small"))
    precision = args.precision or ("bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true")
    log_every = args.log_every or (10 if args.quick else 50)
    steps = args.steps or (10 if args.quick else 50)
    rounds = args.rounds or (2 if args.quick else (5 if cuda else 3))
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, log_every // 2)
    skip = args.skip if args.skip is not None else (2 if args.quick else 3)
    interleave = args.interleave or ("block" if cuda else "step")
    if min(log_every, steps, rounds) < 1 or warmup < 0 or skip < 0:
        raise SystemExit("--log-every, --steps and --rounds must be positive; --warmup-steps and --skip non-negative.")
    if interleave == "block" and steps - skip < 2:
        raise SystemExit(f"--steps {steps} leaves fewer than 2 measured steps per block after --skip {skip}.")
    suffix = "_quick" if args.quick else ""
    return Config(
        device=device,
        models=models,
        variants=variants,
        size=size,
        precision=precision,
        interleave=interleave,
        steps=steps,
        rounds=rounds,
        warmup_steps=warmup,
        skip=skip,
        log_every=log_every,
        threads=args.threads or common.usable_cpus(),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        bootstrap=max(0, args.bootstrap),
        quick=args.quick,
        json_path=args.json or common.OUT_DIR / f"overhead_{device.type}{suffix}.json",
    )


# ---------------------------------------------------------------------------------------------------- machine


def reexec_with_malloc_tuning() -> None:
    """Replaces this process by the same command with :data:`MALLOC_TUNING` in its environment (glibc only)."""
    missing = {k: v for k, v in MALLOC_TUNING.items() if k not in os.environ}
    if not missing or platform.libc_ver()[0] != "glibc":
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})


def machine_details(device: torch.device) -> dict[str, Any]:
    extra = {"libc": "-".join(platform.libc_ver()), "malloc_env": {k: os.environ.get(k) for k in MALLOC_TUNING}}
    return common.machine_info(device, "load_average_at_start", extra)


# ---------------------------------------------------------------------------------------------------- models

#: Shapes per model and size preset.
PRESETS: dict[str, dict[str, dict[str, int]]] = {
    "transformer": {
        "tiny": {"layers": 2, "d_model": 64, "heads": 4, "vocab": 1024, "seq_len": 32, "batch_size": 4},
        "small": {"layers": 4, "d_model": 256, "heads": 4, "vocab": 8192, "seq_len": 64, "batch_size": 8},
        "large": {"layers": 12, "d_model": 768, "heads": 12, "vocab": 50257, "seq_len": 1024, "batch_size": 8},
    },
    "lstm": {
        "tiny": {"layers": 2, "hidden": 128, "embed": 128, "vocab": 1024, "seq_len": 32, "batch_size": 4},
        "small": {"layers": 2, "hidden": 512, "embed": 512, "vocab": 8192, "seq_len": 64, "batch_size": 8},
        "large": {"layers": 2, "hidden": 1024, "embed": 512, "vocab": 32000, "seq_len": 128, "batch_size": 32},
    },
}


def model_shapes(model: str, cfg: Config) -> dict[str, int]:
    shapes = dict(PRESETS[model][cfg.size])
    if cfg.batch_size:
        shapes["batch_size"] = cfg.batch_size
    if cfg.seq_len:
        shapes["seq_len"] = cfg.seq_len
    return shapes


class LanguageModel:
    """Shared by both models: next-token cross-entropy, the loss logged every step, one optimizer kept across fits."""

    fused_adam: bool = False
    _kept_optimizer: torch.optim.Optimizer | None = None

    def logits(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self.logits(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        self.log("train_loss", loss)  # type: ignore[attr-defined]
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The same object on every fit: Adam's state carries on from block to block as in one long run.
        if self._kept_optimizer is None:
            kwargs = {"fused": True} if self.fused_adam else {}
            params = self.parameters()  # type: ignore[attr-defined]
            self._kept_optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01, **kwargs)
        return self._kept_optimizer


def _lightning_module() -> type:
    from lightning.pytorch import LightningModule

    return LightningModule


def make_module_classes() -> dict[str, type]:
    """The two LightningModules (defined lazily so the script's --help does not import Lightning)."""
    base = _lightning_module()

    class TinyGPT(LanguageModel, base):  # type: ignore[valid-type,misc]
        def __init__(self, layers: int, d_model: int, heads: int, vocab: int, seq_len: int, **_: int) -> None:
            super().__init__()
            self.tok_emb = nn.Embedding(vocab, d_model)
            self.pos_emb = nn.Embedding(seq_len, d_model)
            self.blocks = nn.ModuleList(common.Block(d_model, heads) for _ in range(layers))
            self.ln_f = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab, bias=False)
            self.head.weight = self.tok_emb.weight  # tied, as in GPT-2
            for name, p in self.named_parameters():
                if p.dim() > 1:
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02)

        def logits(self, x: Tensor) -> Tensor:
            h = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
            for block in self.blocks:
                h = block(h)
            return self.head(self.ln_f(h))

    class LSTMLM(LanguageModel, base):  # type: ignore[valid-type,misc]
        def __init__(self, layers: int, hidden: int, embed: int, vocab: int, **_: int) -> None:
            super().__init__()
            self.embedding = nn.Embedding(vocab, embed)
            self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
            self.head = nn.Linear(hidden, vocab)

        def logits(self, x: Tensor) -> Tensor:
            out, _ = self.lstm(self.embedding(x))
            return self.head(out)

    return {"transformer": TinyGPT, "lstm": LSTMLM}


def with_grad_norm_recipe(cls: type) -> type:
    """The module with Lightning's documented recipe (docs/source-pytorch/debug/debugging_intermediate.rst)."""
    from lightning.pytorch.utilities import grad_norm

    def on_before_optimizer_step(self: Any, optimizer: torch.optim.Optimizer) -> None:
        self.log_dict(grad_norm(self, norm_type=2))

    return type(f"{cls.__name__}WithGradNorm", (cls,), {"on_before_optimizer_step": on_before_optimizer_step})


class BatchPool(torch.utils.data.IterableDataset):
    """Cycles forever over a fixed pool of random token batches (already on the device): fetching costs nothing."""

    def __init__(self, batches: list[Tensor]) -> None:
        super().__init__()
        self.batches = batches

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield from self.batches


def make_batches(shapes: dict[str, int], device: torch.device, seed: int, count: int = 16) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    size = (shapes["batch_size"], shapes["seq_len"] + 1)
    return [torch.randint(0, shapes["vocab"], size, generator=gen).to(device) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------- the naive peer


def make_naive_callback() -> Any:
    from lightning.pytorch import Callback

    class NaiveStatsCallback(Callback):
        """The peer: per-parameter loop, one ``.item()`` per statistic, per-layer values logged every step."""

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            layers: dict[str, list[float]] = {}  # sumsq, absmax, nonfinite, zeros, numel
            for name, p in pl_module.named_parameters():
                if p.grad is None:
                    continue
                g = p.grad.detach()
                finite = torch.isfinite(g)
                nonfinite = int((~finite).sum().item())
                x = g[finite] if nonfinite else g
                sumsq = torch.linalg.vector_norm(x, dtype=torch.float32).item() ** 2
                absmax = x.abs().max().item() if x.numel() else 0.0
                zeros = int((g == 0).sum().item())
                acc = layers.setdefault(name.rpartition(".")[0] or "root", [0.0, 0.0, 0.0, 0.0, 0.0])
                acc[0] += sumsq
                acc[1] = max(acc[1], absmax)
                acc[2] += nonfinite
                acc[3] += zeros
                acc[4] += g.numel()
            for layer, (sumsq, absmax, nonfinite, zeros, numel) in layers.items():
                key = layer.replace(".", "/")
                pl_module.log(f"naive/grad_norm/{key}", math.sqrt(sumsq))
                pl_module.log(f"naive/grad_rms/{key}", math.sqrt(sumsq / max(numel, 1.0)))
                pl_module.log(f"naive/grad_absmax/{key}", absmax)
                pl_module.log(f"naive/nonfinite/{key}", nonfinite)
                pl_module.log(f"naive/zero_fraction/{key}", zeros / max(numel, 1.0))

    return NaiveStatsCallback()


def make_noop_logger() -> Any:
    from lightning.pytorch.loggers import Logger

    class NoOpLogger(Logger):
        """A logger that drops everything: Lightning still does all of its logging work up to the call."""

        @property
        def name(self) -> str:
            return "noop"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            pass

    return NoOpLogger()


# ---------------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    name: str
    arm: str
    logger_kind: str
    module: Any
    trainer: Any
    clock: common.StepClock
    loader: Any
    blocks: list[common.BlockTimes] = field(default_factory=list)
    error: str | None = None


def build_variant(
    name: str, model: str, shapes: dict[str, int], cfg: Config, tmp: Path, turns: common.TurnTaker | None
) -> Variant:
    from lightning.pytorch.loggers import CSVLogger

    from lightning_gradflow import GradientFlowCallback

    arm, logger_kind, _ = split_variant(name)
    cls = make_module_classes()[model]
    if arm == "lightning_grad_norm":
        cls = with_grad_norm_recipe(cls)
    torch.manual_seed(cfg.seed)  # every variant's model starts from the same weights
    module = cls(**shapes)
    module.fused_adam = cfg.device.type == "cuda"
    clock_cb = common.clock_callback(cfg.device, name, turns)
    clock: common.StepClock = clock_cb.clock
    monitor: Any = None
    if arm == "gradflow":
        monitor = GradientFlowCallback()
    elif arm == "gradflow_clip":
        monitor = GradientFlowCallback(auto_intervene=True)
    elif arm == "naive_loop":
        monitor = make_naive_callback()
    callbacks = [clock_cb]
    if monitor is not None:
        for hook in ("on_before_optimizer_step", "on_train_batch_end"):
            setattr(monitor, hook, clock.wrap(getattr(monitor, hook)))
        callbacks.append(monitor)
    if arm == "lightning_grad_norm":
        module.on_before_optimizer_step = clock.wrap(module.on_before_optimizer_step)
    if logger_kind == "csv":
        logger: Any = CSVLogger(str(tmp / model), name=name.replace("@", "_").replace("#", "_"))
    else:
        logger = make_noop_logger()
    trainer = common.quiet_trainer(
        cfg.device,
        precision=cfg.precision,
        max_epochs=-1,
        max_steps=0,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=cfg.log_every,
        limit_val_batches=0,
    )
    loader = torch.utils.data.DataLoader(
        BatchPool(make_batches(shapes, cfg.device, cfg.seed)), batch_size=None, num_workers=0
    )
    return Variant(name, arm, logger_kind, module, trainer, clock, loader)


def _fit(v: Variant, max_steps: int, round_index: int) -> bool:
    """Runs ``v``'s Trainer up to ``max_steps``; a failure is recorded (the variant is dropped), not raised."""
    if v.error is not None:
        return False
    v.trainer.fit_loop.epoch_loop.max_steps = max_steps
    try:
        v.trainer.fit(v.module, train_dataloaders=v.loader)
    except Exception as e:  # a broken arm is reported and dropped; the others go on
        v.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"  {v.name}: failed in round {round_index}: {v.error}")
        return False
    return True


def run_blocks(variants: list[Variant], cfg: Config, progress: Callable[[str], None]) -> None:
    """Block mode: one ``fit`` per variant and round, round-robin from a rotating start."""
    for r in range(cfg.rounds + 1):
        steps = cfg.warmup_steps if r == 0 else cfg.steps
        if steps == 0:
            continue
        for v in common.rotated(variants, r):
            gc.collect()
            first = v.trainer.global_step
            if _fit(v, first + steps, r) and r > 0:
                in_block = range(first + cfg.skip, first + steps)
                v.blocks += v.clock.take(lambda step, r=r, in_block=in_block: r if step in in_block else None)
            else:
                v.clock.take(lambda step: None)
        progress("warm-up" if r == 0 else f"round {r}/{cfg.rounds}")


def run_lockstep(
    variants: list[Variant], turns: common.TurnTaker, cfg: Config, progress: Callable[[str], None]
) -> None:
    """Step mode: every variant's single ``fit`` in its own thread; the turn passes from variant to variant each step.

    Only the thread holding the turn runs (set-up and tear-down included), so the variants never compete for the
    cores. Round ``r`` is the ``r``-th run of ``cfg.steps`` steps after the warm-up.
    """

    def work(v: Variant) -> None:
        turns.wait(v.name)
        try:
            _fit(v, cfg.warmup_steps + cfg.rounds * cfg.steps, 0)
        finally:
            turns.leave(v.name)

    gc.collect()
    threads = [threading.Thread(target=work, args=(v,), name=v.name, daemon=True) for v in variants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress(f"{cfg.rounds} rounds")

    def round_of(step: int) -> int | None:
        return None if step < cfg.warmup_steps else 1 + (step - cfg.warmup_steps) // cfg.steps

    for v in variants:
        v.blocks = v.clock.take(round_of) if v.error is None else []


def describe_model(module: nn.Module) -> dict[str, Any]:
    params = list(module.parameters())
    owners = {name.rpartition(".")[0] for name, _ in module.named_parameters()}
    return {"params": sum(p.numel() for p in params), "tensors": len(params), "layers": len(owners)}


def run_model(model: str, cfg: Config) -> dict[str, Any]:
    shapes = model_shapes(model, cfg)
    turns = common.TurnTaker(cfg.variants, cfg.seed) if cfg.interleave == "step" else None
    with tempfile.TemporaryDirectory(prefix="gradflow_overhead_") as tmp:
        variants = [build_variant(name, model, shapes, cfg, Path(tmp), turns) for name in cfg.variants]
        info = describe_model(variants[0].module)
        print_model_header(model, shapes, info, cfg)
        started = time.perf_counter()
        loads: list[Any] = []

        def progress(label: str) -> None:
            loads.append(common.load_average())
            print(f"  {label} done at {time.perf_counter() - started:.0f} s (load average {loads[-1]})", flush=True)

        if turns is not None:
            run_lockstep(variants, turns, cfg, progress)
        else:
            run_blocks(variants, cfg, progress)
        rows = {v.name: summarize(v, cfg) for v in variants}
        add_overheads(rows, variants, cfg)
        result = {
            "model": model,
            "shapes": shapes,
            **info,
            "variants": rows,
            "load_average_after_each_round": loads,
            "elapsed_s": time.perf_counter() - started,
        }
        for v in variants:
            v.trainer = v.module = None
        del variants
        gc.collect()
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------------- statistics


def is_log_step(step: int, cfg: Config) -> bool:
    return (step + 1) % cfg.log_every == 0


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def amortised(other: float | None, log: float | None, cfg: Config) -> float | None:
    if other is None:
        return None
    if log is None:
        return other
    return other * (1 - 1 / cfg.log_every) + log / cfg.log_every


def _by_kind(v: Variant, attr: str, cfg: Config) -> tuple[list[float], list[float]]:
    """The values of ``attr`` of the logging steps, and of the other steps."""
    log, other = [], []
    for b in v.blocks:
        for step, value in zip(b.steps, getattr(b, attr), strict=True):
            (log if is_log_step(step, cfg) else other).append(value)
    return log, other


def summarize(v: Variant, cfg: Config) -> dict[str, Any]:
    ms = [t for b in v.blocks for t in b.ms]
    log, other = _by_kind(v, "ms", cfg)
    hook = [t for b in v.blocks for t in b.hook_ms]
    hook_log, hook_other = _by_kind(v, "hook_ms", cfg)
    row: dict[str, Any] = {"arm": v.arm, "logger": v.logger_kind, "error": v.error, "steps": len(ms)}
    if ms:
        q1, q3 = common.quartiles(ms)
        row.update(
            median_ms=statistics.median(ms),
            q1_ms=q1,
            q3_ms=q3,
            mean_ms=statistics.fmean(ms),
            log_steps=len(log),
            log_median_ms=_median(log),
            other_median_ms=_median(other),
            amortised_ms=amortised(_median(other), _median(log), cfg),
            hook_mean_ms=statistics.fmean(hook),
            hook_log_median_ms=_median(hook_log),
            hook_other_median_ms=_median(hook_other),
            hook_amortised_ms=amortised(_median(hook_other), _median(hook_log), cfg),
            minor_faults_median=_median([float(f) for b in v.blocks for f in b.minor_faults]),
        )
        if cfg.device.type == "cuda":
            row["hook_host_mean_ms"] = statistics.fmean(t for b in v.blocks for t in b.hook_host_ms)
    row["blocks"] = [b.__dict__ for b in v.blocks]
    return row


def _block_tensors(v: Variant, cfg: Config) -> tuple[list[Tensor], Tensor]:
    """Per block, the times of its non-logging steps; and all logging-step times pooled."""
    others, logs = [], []
    for b in v.blocks:
        flags = [is_log_step(s, cfg) for s in b.steps]
        others.append(torch.tensor([t for t, f in zip(b.ms, flags, strict=True) if not f], dtype=torch.float64))
        logs += [t for t, f in zip(b.ms, flags, strict=True) if f]
    return [o for o in others if o.numel()], torch.tensor(logs, dtype=torch.float64)


def _resample(samples: Tensor, n: int, gen: torch.Generator) -> Tensor:
    return samples[torch.randint(0, samples.numel(), (n, samples.numel()), generator=gen)]


def _row_medians(x: Tensor) -> Tensor:
    """Row medians, averaging the two middle values as ``statistics.median`` does (``Tensor.median`` does not)."""
    return torch.quantile(x, 0.5, dim=1)


def bootstrap(v: Variant, cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor] | None:
    """``(medians, amortised)``: ``cfg.bootstrap`` resampled estimates, stratified by block."""
    others, logs = _block_tensors(v, cfg)
    if not others or cfg.bootstrap == 0:
        return None
    n = cfg.bootstrap
    other_med = _row_medians(torch.cat([_resample(o, n, gen) for o in others], dim=1))
    all_steps = [*others, logs] if logs.numel() else others
    medians = _row_medians(torch.cat([_resample(o, n, gen) for o in all_steps], dim=1))
    if not logs.numel():
        return medians, other_med
    log_med = _row_medians(_resample(logs, n, gen))
    return medians, other_med * (1 - 1 / cfg.log_every) + log_med / cfg.log_every


def _ci(ratios: Tensor) -> list[float]:
    return [float(torch.quantile(ratios, 0.025)), float(torch.quantile(ratios, 0.975))]


def per_round_overheads(v: Variant, base: Variant) -> list[float]:
    """Ratio - 1 of the block medians of the same round (a paired view, robust to slow drift)."""
    base_blocks = {b.round: b for b in base.blocks}
    return [
        statistics.median(b.ms) / statistics.median(base_blocks[b.round].ms) - 1
        for b in v.blocks
        if b.round in base_blocks and b.ms and base_blocks[b.round].ms
    ]


def add_overheads(rows: dict[str, dict[str, Any]], variants: list[Variant], cfg: Config) -> None:
    """Overhead of every variant against the baseline with the same logger (point estimates and bootstrap CIs)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    by_name = {v.name: v for v in variants}
    boots = {v.name: bootstrap(v, cfg, gen) for v in variants if v.blocks}
    for v in variants:
        row = rows[v.name]
        base_name = variant_name("baseline", v.logger_kind)
        base = rows.get(base_name)
        if base is None or "median_ms" not in base or "median_ms" not in row:
            continue
        row["baseline"] = base_name
        row["overhead_median"] = row["median_ms"] / base["median_ms"] - 1
        row["overhead_amortised"] = row["amortised_ms"] / base["amortised_ms"] - 1
        row["hook_fraction"] = row["hook_amortised_ms"] / base["amortised_ms"]
        row["overhead_median_per_round"] = per_round_overheads(v, by_name[base_name])
        a, b = boots.get(v.name), boots.get(base_name)
        if a is not None and b is not None and v.name != base_name:
            row["overhead_median_ci95"] = _ci(a[0] / b[0] - 1)
            row["overhead_amortised_ci95"] = _ci(a[1] / b[1] - 1)
        if by_name[base_name].error:
            row["note"] = f"{base_name} failed: {by_name[base_name].error}"


# ---------------------------------------------------------------------------------------------------- reporting


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _pct_ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "-"
    if ci is None:
        return _pct(value)
    return f"{_pct(value)} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.1f}")


def print_model_header(model: str, shapes: dict[str, int], info: dict[str, Any], cfg: Config) -> None:
    shape_text = ", ".join(f"{k}={v}" for k, v in shapes.items())
    if cfg.interleave == "step":
        measured = cfg.rounds * cfg.steps - 1
        how = f"the variants take turns every step, {cfg.rounds} rounds x {cfg.steps} steps"
    else:
        measured = cfg.rounds * (cfg.steps - cfg.skip - 1)
        how = f"then {cfg.rounds} rounds x {cfg.steps}-step blocks per variant (skip {cfg.skip})"
    print(
        f"\n== {model} ({cfg.size}: {shape_text}): {info['params'] / 1e6:.2f}M params in {info['tensors']} tensors,"
        f" {info['layers']} layers; precision {cfg.precision} =="
    )
    print(f"  warm-up {cfg.warmup_steps} steps; {how} ({measured} measured steps each); log every {cfg.log_every}")


def print_model(res: dict[str, Any], cfg: Config) -> None:
    print(f"\n-- {res['model']}: step times in ms ({'CUDA events' if cfg.device.type == 'cuda' else 'wall'}) --")
    head = (
        f"{'variant':26s} {'n':>4s} {'median':>8s} {'q1-q3':>15s} {'log':>8s} {'amort.':>8s}"
        f" {'overhead median [95% CI]':>27s} {'overhead amort. [95% CI]':>27s} {'hook ms':>8s} {'hook %':>7s}"
    )
    print(head)
    for name, row in res["variants"].items():
        if "median_ms" not in row:
            print(f"{name:26s} no measurements{': ' + row['error'] if row['error'] else ''}")
            continue
        spread = f"{_ms(row['q1_ms'])}-{_ms(row['q3_ms'])}"
        log = f"{_ms(row['log_median_ms'])}" + (f"/{row['log_steps']}" if row["log_steps"] else "")
        is_base = name == row.get("baseline")
        med = "" if is_base else _pct_ci(row.get("overhead_median"), row.get("overhead_median_ci95"))
        amort = "" if is_base else _pct_ci(row.get("overhead_amortised"), row.get("overhead_amortised_ci95"))
        hook_pct = "" if is_base else _pct(row.get("hook_fraction")).lstrip("+")
        print(
            f"{name:26s} {row['steps']:4d} {_ms(row['median_ms']):>8s} {spread:>15s} {log:>8s}"
            f" {_ms(row['amortised_ms']):>8s} {med:>27s} {amort:>27s}"
            f" {_ms(row['hook_amortised_ms']):>8s} {hook_pct:>7s}" + (f"  ({row['error']})" if row["error"] else "")
        )
    faults = {n: r.get("minor_faults_median") for n, r in res["variants"].items()}
    if any(f is not None and f > 100 for f in faults.values()):
        print("minor page faults per step (median): " + ", ".join(f"{n} {f:.0f}" for n, f in faults.items() if f))
    print(
        "log: median of the logging steps/how many; amort.: median(other steps) x (1-1/L) + median(log) / L;\n"
        "hook ms: time in the arm's own hooks per step (amortised the same way); hook %: of the baseline's amort."
    )


def evaluate_targets(results: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    threshold = GPU_MAX_OVERHEAD if cfg.device.type == "cuda" else CPU_MAX_OVERHEAD
    targets = []
    for res in results:
        row = res["variants"].get(TARGET_VARIANT)
        aa = res["variants"].get(AA_VARIANT, {}).get("overhead_amortised")
        value = None if row is None else row.get("overhead_amortised")
        targets.append(
            {
                "model": res["model"],
                "target": f"{TARGET_VARIANT} amortised overhead vs baseline (CSVLogger) <= {100 * threshold:g}%",
                "value": value,
                "ci95": None if row is None else row.get("overhead_amortised_ci95"),
                "median_overhead": None if row is None else row.get("overhead_median"),
                "hook_fraction": None if row is None else row.get("hook_fraction"),
                "aa_overhead": aa,
                "threshold": threshold,
                "passed": None if value is None else value <= threshold,
            }
        )
    return targets


def print_targets(targets: list[dict[str, Any]], cfg: Config) -> None:
    note = " (--quick: tiny models, not the real targets)" if cfg.quick else ""
    print(f"\n== targets{note} ==")
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        print(f"[{verdict}] {t['model']:12s} {t['target']:58s} got {_pct(t['value'])}")
        if t["value"] is None:
            continue
        ci, threshold, aa = t["ci95"], t["threshold"], t["aa_overhead"]
        aa_text = "" if aa is None else f"; A/A ({AA_VARIANT} vs baseline) {_pct(aa)}"
        print(
            f"       95% CI {_pct_ci(t['value'], ci)}; median-step overhead {_pct(t['median_overhead'])};"
            f" isolated hook cost {_pct(t['hook_fraction'])}{aa_text}"
        )
        if ci and ci[0] <= threshold < ci[1]:
            print("       the CI straddles the threshold: inconclusive on this machine")
        elif aa is not None and abs(aa) >= abs(t["value"] - threshold):
            print("       the A/A difference is as large as the margin to the threshold: inconclusive on this machine")


def print_header(cfg: Config, machine: dict[str, Any], command: str) -> None:
    keys = ("cpu_model", "cpu_count", "cpu_affinity", "torch_threads", "load_average_at_start", "torch", "lightning")
    common.print_machine(command, machine, (*keys, "git", "malloc_env"))
    print(
        f"device={cfg.device} size={cfg.size} precision={cfg.precision} interleave={cfg.interleave}"
        f" variants={','.join(cfg.variants)}"
    )
    load, cpus = machine.get("load_average_at_start"), common.usable_cpus()
    if cfg.device.type == "cpu" and load and load[0] > cpus - cfg.threads + 0.5:
        advice = (
            "OpenMP oversubscription can dominate the step times; `--threads 1` is steadier"
            if cfg.threads > 1
            else "expect noisy step times"
        )
        print(f"warning: load average {load[0]} on {cpus} CPUs: other processes compete for the cores; {advice}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if argv is None and args.malloc_tuning:
        reexec_with_malloc_tuning()
    cfg = make_config(args)
    torch.set_num_threads(cfg.threads)
    if cfg.device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    common.quiet_lightning()
    command = common.command_line(argv, __file__)
    machine = machine_details(cfg.device)
    print_header(cfg, machine, command)
    started = time.perf_counter()
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        common.quiet_lightning()
        for model in cfg.models:
            results.append(run_model(model, cfg))
            print_model(results[-1], cfg)
    messages = sorted({f"{w.category.__name__}: {w.message}".splitlines()[0][:300] for w in caught})
    if messages:
        print(f"\n{len(messages)} distinct warning(s) during the runs (in the JSON); first: {messages[0]}")
    targets = evaluate_targets(results, cfg)
    print_targets(targets, cfg)
    elapsed = time.perf_counter() - started
    machine["load_average_at_end"] = common.load_average()
    print(f"\ntotal {elapsed:.0f} s (load average at the end {machine['load_average_at_end']})")
    payload = common.run_record(
        command, machine, common.config_dict(cfg), models=results, targets=targets, warnings=messages, elapsed_s=elapsed
    )
    common.write_json(cfg.json_path, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
