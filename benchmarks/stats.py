"""Throughput, launches, host syncs and accuracy of the statistics engine against the code people use today.

Times, interleaved round-robin in one run (so machine drift hits every method alike), on synthetic gradients with
real shapes (GPT-2 small: 148 tensors, 124,439,808 values; and 1000 small tensors):

* ``tensor_stats`` (the five statistics, per tensor) with each backend available on the device;
* ``torch._foreach_norm(grads, 2)`` (L2 only: the baseline of the speed targets);
* Lightning's ``grad_norm(module, 2)``;
* a naive per-tensor loop computing the same statistics with one ``.item()`` per value;
* ``update_stats`` and ``tensor_histograms`` (reported, not in the targets);
* a flat copy and a flat sum of the same number of bytes (memory ceilings).

Prints a table per workload (median, quartiles, ratio to ``_foreach_norm``, speed-up over the naive loop, bandwidth,
and the relative error of the per-tensor sums of squares against float64) and the targets with PASS/FAIL, and writes
everything (raw times included) to JSON with the command line and the machine details. On CUDA it also counts the
kernel launches of one warm call (torch.profiler) and its host syncs (``torch.cuda.set_sync_debug_mode``).

Each method gets ``--reps`` timed calls, or fewer (at least 3) once its calls have taken ``--budget-s``.

Usage (from the repository root)::

    python benchmarks/stats.py                    # CPU: about 1-3 minutes on 2 cores
    python benchmarks/stats.py --quick            # a smoke test with shrunk shapes (JSON: stats_<device>_quick.json)
    python benchmarks/stats.py --dtypes fp32,bf16 --reps 30 --json /tmp/stats.json
    python benchmarks/stats.py --device cuda      # default on a CUDA machine: fp32 and bf16, 20 reps, 5 warm-ups

Bandwidth convention: ``GB/s`` is bytes that must be *read* per second for the read-only methods; for the copy and
for ``update_stats`` it is bytes read plus bytes written (a copy of B bytes moves 2B). The GPU target compares the
statistics' read bandwidth with the copy's read+write bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import _common as common
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_gradflow.stats import Backend

BACKENDS = ("torch", "triton", "reference", "auto")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Datasheet HBM bandwidth (GB/s) by GPU name fragment, for the "% of datasheet" column.
DATASHEET_GBS: dict[str, float] = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}

# Targets of the issue (the performance research note, §8, has stricter stretch goals).
CPU_MAX_X_FOREACH = 3.0
CPU_MIN_X_NAIVE = 5.0
GPU_MIN_COPY_FRACTION = 0.8
GPU_MAX_LAUNCHES = 2
MIN_REPS = 3


# ---------------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    device: torch.device
    dtypes: tuple[str, ...]
    backends: tuple[Backend, ...]
    workloads: tuple[str, ...]
    reps: int
    warmup: int
    quick: bool
    robust: bool
    seed: int
    small_count: int
    json_path: Path
    peak_gbs: float | None
    budget_s: float


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = common.base_parser(__doc__)
    p.add_argument(
        "--dtypes", default=None, help="comma-separated of fp32,bf16,fp16 (default: fp32 on CPU, fp32,bf16 on CUDA)"
    )
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated of torch,triton,reference (default: torch, plus triton on CUDA when it imports)",
    )
    p.add_argument("--workloads", default="gpt2,small", help="comma-separated of gpt2,small (default: both)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per method (default: 15 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 2 CPU, 5 CUDA)")
    p.add_argument("--quick", action="store_true", help="shrunk shapes and 3 reps: a smoke test that runs in seconds")
    p.add_argument(
        "--robust",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the fp32 GPT-2 set with 50%% zeros and a few NaN/Inf (default: on)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=15.0,
        help="seconds of timed calls per method and workload (default 15): a slower method stops early\n"
        "(after at least 3 reps) and skips the warm-up rounds (it had two probe calls)",
    )
    p.add_argument("--small-count", type=int, default=1000, help="number of tensors in the small set (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--peak-gbs", type=float, default=None, help="datasheet bandwidth in GB/s (default: known GPUs)")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/out/stats_<device>[_quick].json")
    return p.parse_args(argv)


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def default_backends(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda" and triton_importable():
        return ("torch", "triton")
    return ("torch",)


def make_config(args: argparse.Namespace) -> Config:
    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    dtypes = common.split_list(args.dtypes) if args.dtypes else (("fp32", "bf16") if cuda else ("fp32",))
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise SystemExit(f"Unknown dtype(s) {unknown}; expected some of {sorted(DTYPES)}.")
    backends = common.split_list(args.backends) if args.backends else default_backends(device)
    if not set(backends) <= set(BACKENDS) or not backends:
        raise SystemExit(f"Expected --backends from {','.join(BACKENDS)}, but got {args.backends!r}.")
    workloads = common.split_list(args.workloads)
    if not set(workloads) <= {"gpt2", "small"} or not workloads:
        raise SystemExit(f"Expected --workloads from gpt2,small, but got {args.workloads!r}.")
    reps = args.reps if args.reps is not None else (3 if args.quick else (20 if cuda else 15))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (5 if cuda else 2))
    suffix = "_quick" if args.quick else ""
    json_path = args.json or common.OUT_DIR / f"stats_{device.type}{suffix}.json"
    return Config(
        device=device,
        dtypes=dtypes,
        backends=cast("tuple[Backend, ...]", backends),
        workloads=workloads,
        reps=max(1, reps),
        warmup=max(0, warmup),
        quick=args.quick,
        robust=args.robust,
        seed=args.seed,
        small_count=max(1, args.small_count // (10 if args.quick else 1)),
        json_path=json_path,
        peak_gbs=args.peak_gbs or datasheet_gbs(device),
        budget_s=args.budget_s,
    )


# ---------------------------------------------------------------------------------------------------- machine


def datasheet_gbs(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbs for key, gbs in DATASHEET_GBS.items() if key in name), None)


# ---------------------------------------------------------------------------------------------------- workloads

Shape = tuple[int, ...]


def gpt2_small_shapes(shrink: int = 1) -> list[tuple[str, Shape]]:
    """GPT-2 small's parameter shapes (HF Conv1D layout), every dimension divided by ``shrink``."""
    d, vocab, ctx = 768 // shrink, 50257 // shrink, 1024 // shrink
    shapes: list[tuple[str, Shape]] = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(12):
        h = f"h.{i}."
        shapes += [(h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,))]
        shapes += [(h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,))]
        shapes += [(h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,))]
        shapes += [(h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,))]
        shapes += [(h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,))]
        shapes += [(h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,))]
    return [*shapes, ("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def small_shapes(count: int, max_numel: int, seed: int) -> list[tuple[str, Shape]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_numel + 1, (count,), generator=gen).tolist()
    return [(f"small.{i}", (n,)) for i, n in enumerate(sizes)]


@dataclass
class Workload:
    name: str
    dtype: str
    robust: bool
    names: list[str]
    grads: list[Tensor]

    @property
    def numel(self) -> int:
        return sum(g.numel() for g in self.grads)

    @property
    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.grads)


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    dtype: str
    robust: bool
    shapes: list[tuple[str, Shape]]


def workload_specs(cfg: Config) -> list[WorkloadSpec]:
    specs = []
    for dtype in cfg.dtypes:
        if "gpt2" in cfg.workloads:
            shapes = gpt2_small_shapes(8 if cfg.quick else 1)
            specs.append(WorkloadSpec("gpt2-small", dtype, False, shapes))
            if cfg.robust and dtype == "fp32":
                specs.append(WorkloadSpec("gpt2-small+nan/zeros", dtype, True, shapes))
        if "small" in cfg.workloads:
            shapes = small_shapes(cfg.small_count, 1024 if cfg.quick else 4096, cfg.seed)
            specs.append(WorkloadSpec(f"{cfg.small_count}-small", dtype, False, shapes))
    return specs


def _spoil(g: Tensor, index: int, gen: torch.Generator) -> None:
    """50 % exact zeros; one NaN/+Inf/-Inf per million values, and one in every tenth tensor however small."""
    flat = g.view(-1)
    flat.masked_fill_(torch.rand(flat.shape, generator=gen, device=g.device) < 0.5, 0.0)
    k = max(flat.numel() // 1_000_000, int(index % 10 == 0))
    if k:
        positions = torch.randint(0, flat.numel(), (k,), generator=gen, device=g.device)
        specials = torch.tensor([math.nan, math.inf, -math.inf], device=g.device)
        flat[positions] = specials[(torch.arange(k, device=g.device) + index) % 3]


def make_gradients(spec: WorkloadSpec, device: torch.device, seed: int) -> list[Tensor]:
    """``randn`` times a per-tensor scale, log-uniform in [1e-4, 1e-2], generated in fp32 then cast."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scales = (10.0 ** (-4 + 2 * torch.rand(len(spec.shapes), generator=torch.Generator().manual_seed(seed)))).tolist()
    grads = []
    for i, ((_, shape), scale) in enumerate(zip(spec.shapes, scales, strict=True)):
        g = torch.randn(shape, generator=gen, device=device).mul_(scale)
        if spec.robust:
            _spoil(g, i, gen)
        grads.append(g.to(DTYPES[spec.dtype]))
    return grads


def build_workload(spec: WorkloadSpec, cfg: Config) -> Workload:
    grads = make_gradients(spec, cfg.device, cfg.seed)
    return Workload(spec.name, spec.dtype, spec.robust, [n for n, _ in spec.shapes], grads)


def module_with_grads(names: list[str], grads: list[Tensor]) -> nn.Module:
    """A module whose parameters have these shapes and whose ``.grad`` are these tensors (sharing their memory)."""
    module = nn.Module()
    for name, g in zip(names, grads, strict=True):
        p = nn.Parameter(g.detach(), requires_grad=True)
        p.grad = g
        module.register_parameter(name.replace(".", "_"), p)
    return module


# ---------------------------------------------------------------------------------------------------- methods


@dataclass
class Method:
    name: str
    fn: Callable[[], Any]
    bytes_moved: int
    convention: str
    #: Per-tensor sum of squares (float64, CPU) from one result, for the accuracy columns.
    sumsq: Callable[[Any], Tensor] | None = None
    #: Whether absmax and the counts match the float64 reference exactly, from one result.
    exact: Callable[[Any, Tensor], bool] | None = None


def naive_loop(grads: list[Tensor]) -> list[tuple[float, float, float, int, int]]:
    """The peer code: per tensor, mask the non-finite values and take each statistic with ``.item()``."""
    rows = []
    for g in grads:
        finite = torch.isfinite(g)
        nonfinite = int((~finite).sum().item())
        x = g[finite] if nonfinite else g
        sumsq = torch.linalg.vector_norm(x, dtype=torch.float32).item() ** 2
        absmax = x.abs().max().item() if x.numel() else 0.0
        total = x.sum(dtype=torch.float32).item()
        zeros = int((g == 0).sum().item())
        rows.append((sumsq, absmax, total, nonfinite, zeros))
    return rows


def _stats_exact(result: Any, ref: Tensor) -> bool:
    """Absmax and counts equal the reference rounded to float32 (the table's dtype: counts > 2**24 round)."""
    table = result.table.detach().to("cpu", torch.float64)
    cols = [1, 3, 4, 5]  # ABSMAX, NONFINITE, ZEROS, NUMEL
    return bool(torch.equal(table[:, cols], ref[:, cols].float().double()))


def _naive_exact(rows: list[tuple[float, float, float, int, int]], ref: Tensor) -> bool:
    got = torch.tensor([[r[1], r[3], r[4]] for r in rows], dtype=torch.float64)
    return bool(torch.equal(got, ref[:, [1, 3, 4]]))


def stats_methods(wl: Workload, backends: Sequence[Backend]) -> list[Method]:
    from lightning_gradflow.stats import tensor_stats

    grads = wl.grads
    return [
        Method(
            f"tensor_stats[{b}]",
            functools.partial(tensor_stats, grads, backend=b),
            wl.nbytes,
            "read",
            sumsq=lambda r: r.table[:, 0].detach().to("cpu", torch.float64),
            exact=_stats_exact,
        )
        for b in backends
    ]


def other_engine_methods(wl: Workload, backends: Sequence[Backend]) -> list[Method]:
    from lightning_gradflow.stats import make_snapshot, tensor_histograms, update_stats

    grads, nbytes = wl.grads, wl.nbytes
    methods = []
    snapshots = make_snapshot(grads)
    for b in backends:
        methods.append(
            Method(
                f"update_stats[{b}]", functools.partial(update_stats, grads, snapshots, backend=b), 3 * nbytes, "r+w"
            )
        )
        methods.append(
            Method(f"tensor_histograms[{b}]", functools.partial(tensor_histograms, grads, backend=b), nbytes, "read")
        )
    return methods


def baseline_methods(wl: Workload) -> list[Method]:
    from lightning.pytorch.utilities import grad_norm

    grads, nbytes = wl.grads, wl.nbytes
    module = module_with_grads(wl.names, grads)

    def grad_norm_sumsq(norms: dict[str, Tensor]) -> Tensor:
        values = [v for k, v in norms.items() if not k.endswith("_total")]
        return torch.stack([v.detach().to("cpu", torch.float64) for v in values]) ** 2

    return [
        Method(
            "_foreach_norm(2)",
            lambda: torch._foreach_norm(grads, 2),
            nbytes,
            "read",
            sumsq=lambda r: torch.stack([n.detach().to("cpu", torch.float64) for n in r]) ** 2,
        ),
        Method("lightning grad_norm", lambda: grad_norm(module, norm_type=2), nbytes, "read", sumsq=grad_norm_sumsq),
        Method(
            "naive .item() loop",
            lambda: naive_loop(grads),
            nbytes,
            "read",
            sumsq=lambda rows: torch.tensor([r[0] for r in rows], dtype=torch.float64),
            exact=_naive_exact,
        ),
    ]


def ceiling_methods(wl: Workload, device: torch.device) -> list[Method]:
    dtype = DTYPES[wl.dtype]
    src = torch.empty(wl.numel, dtype=dtype, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    kind = "D2D copy" if device.type == "cuda" else "copy"
    return [
        Method(f"{kind} (same bytes)", lambda: dst.copy_(src), 2 * wl.nbytes, "r+w"),
        Method("flat sum (same bytes)", lambda: src.sum(), wl.nbytes, "read"),
    ]


# ---------------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    device_ms: list[float] = field(default_factory=list)
    host_ms: list[float] = field(default_factory=list)


class Timer:
    """Times one call: wall time on CPU; CUDA events (device) plus wall time of the call (host) on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            # Clears the L2 cache before each call (the small set fits in it otherwise).
            self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, float]:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
            return ms, ms
        self.flush.zero_()
        self.start.record()
        t0 = time.perf_counter()
        fn()
        host = (time.perf_counter() - t0) * 1e3
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end), host


def probe(methods: list[Method], device: torch.device) -> tuple[list[Method], dict[str, str], dict[str, float]]:
    """Calls each method twice (compiles and allocates, then a warm call).

    Returns the methods that ran, the errors of those that raised (dropped), and each one's faster call in ms.
    """
    ok, failed, probe_ms = [], {}, {}
    for m in methods:
        calls = []
        try:
            for _ in range(2):
                t0 = time.perf_counter()
                m.fn()
                common.synchronize(device)
                calls.append((time.perf_counter() - t0) * 1e3)
        except Exception as e:
            failed[m.name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        else:
            ok.append(m)
            probe_ms[m.name] = min(calls)
    return ok, failed, probe_ms


def wants_more(t: Timing, cfg: Config) -> bool:
    """Whether a method takes part in the next timed round: until ``cfg.reps``, or ``cfg.budget_s`` once it has 3."""
    n = len(t.device_ms)
    spent_s = sum(max(d, h) for d, h in zip(t.device_ms, t.host_ms, strict=True)) / 1e3
    return n < cfg.reps and (n < MIN_REPS or spent_s < cfg.budget_s)


def time_interleaved(methods: list[Method], probe_ms: dict[str, float], cfg: Config) -> dict[str, Timing]:
    """Round-robin: every round runs every active method once, starting from a rotating position.

    A method whose reps would not fit in the budget skips the warm-up rounds (its two probe calls warmed it up).
    """
    timer = Timer(cfg.device)
    timings = {m.name: Timing() for m in methods}
    slow = {name for name, ms in probe_ms.items() if ms * cfg.reps > cfg.budget_s * 1e3}
    gc.collect()
    gc.disable()
    try:
        for r in range(cfg.warmup + cfg.reps):
            warmup = r < cfg.warmup
            if warmup:
                active = [m for m in methods if m.name not in slow]
            else:
                active = [m for m in methods if wants_more(timings[m.name], cfg)]
            for m in common.rotated(active, r):
                device_ms, host_ms = timer(m.fn)
                if not warmup:
                    timings[m.name].device_ms.append(device_ms)
                    timings[m.name].host_ms.append(host_ms)
    finally:
        gc.enable()
    return timings


# ---------------------------------------------------------------------------------------------------- CUDA checks


def count_launches(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """CUDA kernels and memcpy/memset operations of one warm call, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    common.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        common.synchronize(device)
    kinds = [_device_event_kind(e) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return {"kernels": kinds.count("kernel"), "memcpy_memset": kinds.count("mem")}


def _device_event_kind(event: Any) -> str:
    """``"kernel"``, ``"mem"`` (memcpy/memset) or ``"other"`` (syncs, annotations) for a device-side event."""
    activity = str(getattr(event, "activity_type", None) or "")
    known = {"kernel": "kernel", "gpu_memcpy": "mem", "gpu_memset": "mem", "cuda_sync": "other"}
    if activity in known or activity.startswith("gpu_user"):
        return known.get(activity, "other")
    if event.name.startswith(("Memcpy", "Memset")):
        return "mem"
    return "other" if "Sync" in event.name else "kernel"


def count_syncs(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Host syncs of one warm call: a count under ``set_sync_debug_mode("warn")``, and the "error" mode verdict."""
    fn()
    common.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    common.synchronize(device)
    count = sum("synchroniz" in str(w.message) for w in caught)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        verdict = "0"
    except RuntimeError as e:
        verdict = "error: " + str(e).splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    common.synchronize(device)
    return {"warned": count, "error_mode": verdict}


def cuda_checks(methods: list[Method], device: torch.device) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        try:
            out[m.name] = {"launches": count_launches(m.fn, device), "syncs": count_syncs(m.fn, device)}
        except Exception as e:
            out[m.name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    return out


# ---------------------------------------------------------------------------------------------------- accuracy


def reference_rows(grads: list[Tensor], chunk: int = 1 << 22) -> Tensor:
    """float64 ``(T, 6)`` table in the column order of ``Stat``, computed in chunks to bound the memory."""
    rows = torch.zeros((len(grads), 6), dtype=torch.float64)
    for i, g in enumerate(grads):
        acc = torch.zeros(5, dtype=torch.float64, device=g.device)
        for piece in g.detach().reshape(-1).split(chunk):
            x = piece.to(torch.float64)
            finite = torch.isfinite(x)
            v = torch.where(finite, x, 0.0)
            acc[0] += (v * v).sum()
            acc[1] = torch.maximum(acc[1], v.abs().max()) if v.numel() else acc[1]
            acc[2] += v.sum()
            acc[3] += (~finite).sum()
            acc[4] += (x == 0).sum()
        rows[i, :5] = acc.cpu()
        rows[i, 5] = g.numel()
    return rows


def accuracy(method: Method, ref: Tensor) -> dict[str, Any] | None:
    if method.sumsq is None:
        return None
    result = method.fn()
    got = method.sumsq(result)
    # Tensors holding NaN/Inf are left out: an L2 norm of them is NaN/Inf by definition (counted apart).
    clean = ref[:, 3] == 0
    got_clean, want = got[clean], ref[clean, 0]
    per_tensor = (got_clean - want).abs() / want.clamp(min=torch.finfo(torch.float64).tiny)
    total = want.sum()
    out: dict[str, Any] = {
        "sumsq_max_rel_err": float(per_tensor.max()) if per_tensor.numel() else 0.0,
        "sumsq_total_rel_err": float((got_clean.sum() - total).abs() / total) if total > 0 else 0.0,
        "tensors_with_nonfinite_input": int((~clean).sum()),
        "nonfinite_results": int((~torch.isfinite(got)).sum()),
    }
    if method.exact is not None:
        out["absmax_counts_exact"] = method.exact(result, ref)
    return out


# ---------------------------------------------------------------------------------------------------- one workload


def run_workload(spec: WorkloadSpec, cfg: Config) -> dict[str, Any]:
    wl = build_workload(spec, cfg)
    methods = [
        *stats_methods(wl, cfg.backends),
        *baseline_methods(wl),
        *other_engine_methods(wl, cfg.backends),
        *ceiling_methods(wl, cfg.device),
    ]
    methods, failed, probe_ms = probe(methods, cfg.device)
    timings = time_interleaved(methods, probe_ms, cfg)
    ref = reference_rows(wl.grads)
    checks = cuda_checks(methods, cfg.device) if cfg.device.type == "cuda" else {}
    rows = {}
    for m in methods:
        rows[m.name] = summarize(m, timings[m.name], cfg)
        rows[m.name]["accuracy"] = accuracy(m, ref)
        rows[m.name].update(checks.get(m.name, {}))
    result = {
        "name": wl.name,
        "dtype": wl.dtype,
        "robust": wl.robust,
        "num_tensors": len(wl.grads),
        "numel": wl.numel,
        "bytes": wl.nbytes,
        "nonfinite": int(ref[:, 3].sum()),
        "zeros": int(ref[:, 4].sum()),
        "methods": rows,
        "unavailable": failed,
    }
    del wl, methods, ref
    gc.collect()
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def summarize(m: Method, t: Timing, cfg: Config) -> dict[str, Any]:
    median = statistics.median(t.device_ms)
    q1, q3 = common.quartiles(t.device_ms)
    gbs = m.bytes_moved / (median * 1e-3) / 1e9 if median > 0 else math.inf
    row: dict[str, Any] = {
        "reps": len(t.device_ms),
        "median_ms": median,
        "q1_ms": q1,
        "q3_ms": q3,
        "bytes_moved": m.bytes_moved,
        "bandwidth_convention": m.convention,
        "gbs": gbs,
        "device_ms": t.device_ms,
    }
    if cfg.device.type == "cuda":
        row["host_median_ms"] = statistics.median(t.host_ms)
        row["host_ms"] = t.host_ms
        if cfg.peak_gbs:
            row["datasheet_fraction"] = gbs / cfg.peak_gbs
    return row


# ---------------------------------------------------------------------------------------------------- reporting


def _fmt_ms(ms: float) -> str:
    return f"{ms:9.3f}" if ms < 100 else f"{ms:9.1f}"


def _fmt_err(acc: dict[str, Any] | None) -> str:
    if acc is None:
        return ""
    text = f"{acc['sumsq_max_rel_err']:.1e} / {acc['sumsq_total_rel_err']:.1e}"
    if "absmax_counts_exact" in acc:
        text += "  exact" if acc["absmax_counts_exact"] else "  MISMATCH"
    if acc["nonfinite_results"]:
        text += f"  ({acc['nonfinite_results']} non-finite norms)"
    return text


def _fmt_cuda(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  check failed: {row['error']}"
    if "launches" not in row:
        return ""
    launches = row["launches"]
    syncs = row["syncs"]
    sync_text = f"{syncs['warned']}{'' if syncs['error_mode'] == '0' else '*'}"
    return f" {row['host_median_ms']:8.3f} {launches['kernels']:6d}+{launches['memcpy_memset']:<3d} {sync_text:>6}"


def print_workload(res: dict[str, Any], cuda: bool) -> None:
    rows = res["methods"]
    foreach = rows.get("_foreach_norm(2)", {}).get("median_ms")
    naive = rows.get("naive .item() loop", {}).get("median_ms")
    extra = f", {res['nonfinite']} non-finite, {res['zeros']:,} zeros" if res["robust"] else ""
    print(
        f"\n== {res['name']} {res['dtype']}: {res['num_tensors']} tensors, {res['numel']:,} values,"
        f" {res['bytes'] / 1e6:.1f} MB{extra} =="
    )
    head = (
        f"{'method':28s} {'n':>3s} {'median ms':>9s} {'q1-q3 ms':>17s} {'t/foreach':>9s} {'naive/t':>8s} {'GB/s':>11s}"
    )
    if cuda:
        head += f" {'host ms':>8s} {'kern+mem':>10s} {'syncs':>6s}"
    print(head + "  sumsq rel.err max/total (vs fp64)")
    for name, row in rows.items():
        ms = row["median_ms"]
        x_foreach = f"{ms / foreach:9.2f}" if foreach else f"{'':9s}"
        speedup = f"{naive / ms:8.1f}" if naive else f"{'':8s}"
        gbs = f"{row['gbs']:6.1f} {row['bandwidth_convention']:>4s}"
        spread = f"{row['q1_ms']:.4g}-{row['q3_ms']:.4g}"
        line = f"{name:28s} {row['reps']:3d} {_fmt_ms(ms)} {spread:>17s} {x_foreach}"
        line += f" {speedup} {gbs}"
        if cuda:
            line += _fmt_cuda(row)
        print(line + "  " + _fmt_err(row["accuracy"]))
    for name, error in res["unavailable"].items():
        print(f"{name:28s} unavailable: {error}")
    if cuda:
        print_cuda_notes(rows)


def print_cuda_notes(rows: dict[str, Any]) -> None:
    print("kern+mem: CUDA kernels + memcpy/memset of one warm call (torch.profiler); syncs: count under")
    print("set_sync_debug_mode('warn'), '*' = a warm call raised under set_sync_debug_mode('error')")
    for name, row in rows.items():
        engine = name.startswith(("tensor_stats", "update_stats", "tensor_histograms"))
        if "datasheet_fraction" in row and (engine or "copy" in name):
            gbs, convention, fraction = row["gbs"], row["bandwidth_convention"], row["datasheet_fraction"]
            print(f"{name}: {gbs:.0f} GB/s ({convention}) = {fraction:.0%} of the datasheet bandwidth")
        error_mode = row.get("syncs", {}).get("error_mode", "0")
        if engine and error_mode != "0":
            print(f"{name}: {error_mode}")


# ---------------------------------------------------------------------------------------------------- targets


def primary_backend(cfg: Config) -> str:
    return "triton" if cfg.device.type == "cuda" and "triton" in cfg.backends else "torch"


def _target(name: str, workload: dict[str, Any], value: float | None, threshold: float, higher: bool) -> dict[str, Any]:
    passed = None if value is None else (value >= threshold if higher else value <= threshold)
    label = f"{workload['name']} {workload['dtype']}"
    return {"target": name, "workload": label, "value": value, "threshold": threshold, "passed": passed}


def _median(res: dict[str, Any], method: str) -> float | None:
    row = res["methods"].get(method)
    return None if row is None else row["median_ms"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def cpu_targets(res: dict[str, Any], stats: str) -> list[dict[str, Any]]:
    t = _median(res, stats)
    x_foreach = _ratio(t, _median(res, "_foreach_norm(2)"))
    x_naive = _ratio(_median(res, "naive .item() loop"), t)
    return [
        _target(
            f"{stats} time / _foreach_norm time <= {CPU_MAX_X_FOREACH:g}", res, x_foreach, CPU_MAX_X_FOREACH, False
        ),
        _target(f"naive loop time / {stats} time >= {CPU_MIN_X_NAIVE:g}", res, x_naive, CPU_MIN_X_NAIVE, True),
    ]


def _sync_value(syncs: dict[str, Any] | None) -> float | None:
    if syncs is None:
        return None
    return 0.0 if syncs["error_mode"] == "0" else float(max(1, syncs["warned"]))


def gpu_targets(res: dict[str, Any], stats: str) -> list[dict[str, Any]]:
    row = res["methods"].get(stats, {})
    out = []
    if res["name"].startswith("gpt2"):
        copy_gbs = res["methods"].get("D2D copy (same bytes)", {}).get("gbs")
        fraction = _ratio(row.get("gbs"), copy_gbs)
        x_foreach = _ratio(row.get("median_ms"), _median(res, "_foreach_norm(2)"))
        name = f"{stats} read GB/s / copy (r+w) GB/s >= {GPU_MIN_COPY_FRACTION:g}"
        out.append(_target(name, res, fraction, GPU_MIN_COPY_FRACTION, True))
        out.append(_target(f"{stats} time / _foreach_norm time <= 1", res, x_foreach, 1.0, False))
    launches = row.get("launches", {}).get("kernels")
    name = f"{stats} kernel launches per call <= {GPU_MAX_LAUNCHES}"
    out.append(_target(name, res, None if launches is None else float(launches), GPU_MAX_LAUNCHES, False))
    out.append(_target(f"{stats} host syncs per call == 0", res, _sync_value(row.get("syncs")), 0.0, False))
    return out


def evaluate_targets(results: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    stats = f"tensor_stats[{primary_backend(cfg)}]"
    targets = []
    for res in results:
        if res["robust"]:
            continue
        if cfg.device.type == "cuda":
            targets += gpu_targets(res, stats)
        elif res["name"].startswith("gpt2"):
            targets += cpu_targets(res, stats)
    return targets


def print_targets(targets: list[dict[str, Any]], quick: bool) -> None:
    note = " (--quick: shrunk shapes, not the real targets)" if quick else ""
    print(f"\n== targets{note} ==")
    if not targets:
        print("none evaluated: the CPU targets need the gpt2 workload")
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        print(f"[{verdict}] {t['workload']:28s} {t['target']:58s} got {value}")


# ---------------------------------------------------------------------------------------------------- main


def print_header(cfg: Config, machine: dict[str, Any], command: str) -> None:
    keys = ("cpu_model", "cpu_count", "torch_threads", "python", "torch", "triton", "lightning", "git", "loadavg_start")
    common.print_machine(command, machine, keys)
    print(
        f"device={cfg.device} dtypes={','.join(cfg.dtypes)} backends={','.join(cfg.backends)} reps={cfg.reps}"
        f" warmup={cfg.warmup} (interleaved round-robin; medians)"
    )
    print("GB/s: 'read' = bytes read / time; 'r+w' = (bytes read + bytes written) / time")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = common.command_line(argv, __file__)
    machine = common.machine_info(cfg.device, "loadavg_start", {"triton_interpret": os.environ.get("TRITON_INTERPRET")})
    print_header(cfg, machine, command)
    started = time.perf_counter()
    results = []
    for spec in workload_specs(cfg):
        results.append(run_workload(spec, cfg))
        print_workload(results[-1], cfg.device.type == "cuda")
    targets = evaluate_targets(results, cfg)
    print_targets(targets, cfg.quick)
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s")
    payload = common.run_record(
        command,
        machine,
        common.config_dict(cfg),
        workloads=results,
        targets=targets,
        elapsed_s=elapsed,
        loadavg_end=common.load_average(),
    )
    common.write_json(cfg.json_path, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
