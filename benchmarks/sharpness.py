"""Cost of one sharpness estimate in training-step equivalents, per Hessian-vector-product method, against PyHessian.

What ``SharpnessCallback`` spends on a probe step, measured on the functions it calls (``lightning_gradflow.curvature``)
under the same wrappers (``isolated``: weights, gradients, buffers and RNG saved and restored; ``fixed_dropout``):

* **training step**: forward, loss, backward, AdamW step (the unit);
* **λ_max, cold**: what one probe of the callback (``metrics=("lambda_max",)``) computes: plain Lanczos (no
  reorthogonalisation), at most ``--hvps`` products (default 20, the callback's ``num_hvps``), early stop ``--tol``
  (default 1e-3, the callback's ``lanczos_tol``), from a random start;
* **λ_max, warm**: the same from the previous round's top Ritz vector (the callback's ``warm_start``): the weights
  moved by one training step (``--warm-gap`` steps) since that vector was computed, as for a callback probing every
  step (every ``--warm-gap`` steps); the first (warm-up) round starts cold;
* with ``--full-reorth``, also Lanczos with exactly ``--hvps`` products, with and without full reorthogonalisation
  (the previous version of this table);
* HVP methods: ``double_backward`` (exact: one ``create_graph`` forward/backward, then a double backward per product)
  and ``finite_difference`` (central differences: two gradients per product, no graph kept);
* **batch sharpness** (one gradient and one product), per method;
* **PyHessian** ``hessian(model, criterion, data).eigenvalues()`` (power iteration, Gaussian start, relative tolerance
  1e-3, at most 100 products; double backward) when the ``pyhessian`` package can be imported: the peer the callback
  is compared with. Otherwise the row says "skipped: not installed".

Every part runs round-robin (one of each per round, ``--reps`` rounds after ``--warmup``), so machine drift hits all
parts alike; the table shows medians and the ratio to the training step, the products per estimate, and each λ_max
estimate's error against a **reference** computed in the same round at the same weights (untimed): Lanczos with 40
exact products and full reorthogonalisation, from a random start.

Models: a 4-layer pre-norm transformer language model (d=256, written-out attention: PyTorch's fused CPU attention has
no double backward) and a 3-layer MLP classifier, a few million parameters each.

Usage (from the repository root)::

    python benchmarks/sharpness.py --threads 1          # CPU: a few minutes
    python benchmarks/sharpness.py --quick              # a smoke test
    PYTHONPATH=/path/to/pyhessian python benchmarks/sharpness.py --threads 1   # with the PyHessian comparison
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common as common
import torch
from torch import Tensor, nn

from lightning_gradflow.curvature import HessianVectorProduct, batch_sharpness, fixed_dropout, isolated
from lightning_gradflow.curvature import lanczos as curvature_lanczos

METHODS = ("double_backward", "finite_difference")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = common.base_parser(__doc__)
    p.add_argument("--models", default="transformer,mlp", help="comma-separated: transformer, mlp")
    p.add_argument("--hvps", type=int, default=20, help="Lanczos products per λ_max estimate (default 20)")
    p.add_argument("--tol", type=float, default=1e-3, help="Lanczos early-stop tolerance (callback default 1e-3)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--warm-gap", type=int, default=1, help="training steps between warm estimates (default 1)")
    p.add_argument("--reference-hvps", type=int, default=40, help="products of the reference λ_max (default 40)")
    p.add_argument("--full-reorth", action="store_true", help="also time fixed-length Lanczos, full reorth./plain")
    p.add_argument("--quick", action="store_true", help="small models, one round: a smoke test")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/out/sharpness_<device>[_quick].json")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 1, 1
    args.warmup = max(args.warmup, 1)  # the warm estimates need a vector from an earlier round
    return args


def _pyhessian() -> Any:
    try:
        import pyhessian  # type: ignore[import-not-found]
    except ImportError:
        return None
    return pyhessian


# ------------------------------------------------------------------------------------------------------ models


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(common.Block(d, heads, explicit_attention=True) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def build(name: str, quick: bool, device: torch.device) -> tuple[nn.Module, Tensor, Tensor, Callable[..., Tensor], str]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "transformer":
        vocab, d, layers, seq, batch = (256, 64, 2, 32, 8) if quick else (2048, 256, 4, 64, 16)
        model: nn.Module = TinyGPT(vocab, d, layers, 4, seq)
        x = torch.randint(0, vocab, (batch, seq), generator=gen)
        y = torch.randint(0, vocab, (batch, seq), generator=gen)

        def criterion(out: Tensor, target: Tensor) -> Tensor:
            return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))

        shape = f"TinyGPT {layers}×{d}, vocab {vocab}, batch {batch}×{seq}"
    elif name == "mlp":
        width, batch = (128, 32) if quick else (1024, 128)
        model = nn.Sequential(
            nn.Linear(784, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10)
        )
        x = torch.randn(batch, 784, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        criterion = nn.functional.cross_entropy
        shape = f"MLP 784-{width}-{width}-10, batch {batch}"
    else:
        raise ValueError(f"unknown model {name!r}")
    params = sum(p.numel() for p in model.parameters())
    return model.to(device), x.to(device), y.to(device), criterion, f"{shape} ({params / 1e6:.2f}M params)"


# ------------------------------------------------------------------------------------------------------ timing


def measure_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model, x, y, criterion, description = build(name, args.quick, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    pyhessian = _pyhessian()
    # per λ part: one (round, value, products) per call; the reference: round -> value
    estimates: dict[str, list[tuple[int, float, int]]] = {}
    reference: dict[int, float] = {}
    values: dict[str, list[float]] = {}
    vectors: dict[str, Tensor | None] = {}  # warm parts: the last top Ritz vector
    current_round = [0]

    def loss() -> Tensor:
        return criterion(model(x), y)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    def estimate(method: str, hvps: int, tol: float | None, reorthogonalize: bool, v0: Tensor | None) -> Any:
        with isolated(model, params, seed=0):
            op = HessianVectorProduct(fixed_dropout(loss, 0), params, method)  # type: ignore[arg-type]
            try:
                ritz, vector = curvature_lanczos(
                    op,
                    op.dim,
                    hvps,
                    dtype=op.dtype,
                    device=op.device,
                    generator=torch.Generator().manual_seed(current_round[0]),
                    tol=tol,
                    reorthogonalize=reorthogonalize,
                    v0=v0,
                    return_vector=True,
                )
            finally:
                op.release()
        return float(ritz.max()), vector, op.num_products

    def lanczos(part: str, method: str, tol: float | None, reorthogonalize: bool, warm: bool) -> Callable[[], None]:
        def run() -> None:
            v0 = vectors.get(part) if warm else None
            value, vector, products = estimate(method, args.hvps, tol, reorthogonalize, v0)
            if warm:
                vectors[part] = vector
            estimates.setdefault(part, []).append((current_round[0], value, products))

        return run

    def batch(method: str) -> Callable[[], None]:
        def run() -> None:
            with isolated(model, params, seed=0):
                value = batch_sharpness(fixed_dropout(loss, 0), params, method)  # type: ignore[arg-type]
            values.setdefault(f"batch_sharpness {method}", []).append(value)

        return run

    def pyhessian_power() -> None:
        import pyhessian  # type: ignore[import-not-found]  # noqa: F401

        ph: Any = sys.modules["pyhessian.hessian"]  # the package re-exports the class `hessian` under the module's name

        count = [0]
        original = ph.hessian_vector_product

        def counted(*a: Any, **k: Any) -> Any:
            count[0] += 1
            return original(*a, **k)

        ph.hessian_vector_product = counted
        try:
            with isolated(model, params, seed=0):
                h = ph.hessian(model, criterion, data=(x, y), cuda=device.type == "cuda")
                eigenvalues, _ = h.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
                model.zero_grad(set_to_none=True)
        finally:
            ph.hessian_vector_product = original
            model.train()
        estimates.setdefault(PYHESSIAN, []).append((current_round[0], float(eigenvalues[0]), count[0]))

    parts: dict[str, Callable[[], None]] = {"training step": step}
    for method in METHODS:
        part = f"λ_max cold: Lanczos ≤{args.hvps} HVPs, plain, tol {args.tol:g}, {method}"
        parts[part] = lanczos(part, method, args.tol, False, warm=False)
        part = f"λ_max warm: Lanczos ≤{args.hvps} HVPs, plain, tol {args.tol:g}, {method}"
        parts[part] = lanczos(part, method, args.tol, False, warm=True)
    if args.full_reorth:
        for method in METHODS:
            part = f"λ_max: Lanczos {args.hvps} HVPs, full reorth., {method}"
            parts[part] = lanczos(part, method, None, True, warm=False)
            part = f"λ_max: Lanczos {args.hvps} HVPs, plain, {method}"
            parts[part] = lanczos(part, method, None, False, warm=False)
    for method in METHODS:
        parts[f"batch sharpness, {method}"] = batch(method)
    if pyhessian is not None:
        parts[PYHESSIAN] = pyhessian_power

    def before_round(round_: int) -> None:
        current_round[0] = round_
        for _ in range(args.warm_gap - 1):  # untimed: more weight change between two warm estimates
            step()

    def after_round(round_: int) -> None:
        if round_ >= args.warmup:  # untimed, at the same weights as this round's estimates
            reference[round_] = estimate("double_backward", args.reference_hvps, None, True, None)[0]

    times_ms = common.interleave(
        parts, args.reps, device, warmup=args.warmup, before_round=before_round, after_round=after_round
    )
    times = {part: [ms / 1e3 for ms in samples] for part, samples in times_ms.items()}
    step_time = statistics.median(times["training step"])
    rows = []
    for part, samples in times.items():
        median = statistics.median(samples)
        row: dict[str, Any] = {
            "part": part,
            "median_s": median,
            "step_equivalents": median / step_time,
            "samples_s": samples,
        }
        timed = [(r, v, n) for r, v, n in estimates.get(part, []) if r >= args.warmup]
        if timed:
            row["products"] = [n for _, _, n in timed]
            row["values"] = [v for _, v, _ in timed]
            row["rel_errors"] = [v / reference[r] - 1 for r, v, _ in timed]
            row["median_rel_error"] = statistics.median(row["rel_errors"])
            row["max_abs_rel_error"] = max(abs(e) for e in row["rel_errors"])
        rows.append(row)
    if pyhessian is None:
        rows.append({"part": PYHESSIAN, "skipped": "not installed (pip install pyhessian)"})
    return {
        "model": name,
        "description": description,
        "rows": rows,
        "reference": {"hvps": args.reference_hvps, "values": [reference[r] for r in sorted(reference)]},
        "values": {k: statistics.median(v) for k, v in values.items()},
    }


PYHESSIAN = "PyHessian power iteration (tol 1e-3, ≤100 HVPs, double backward)"


def print_report(results: list[dict[str, Any]]) -> None:
    for result in results:
        print(f"\n{result['description']}")
        reference = result["reference"]
        print(f"reference λ_max ({reference['hvps']} exact products, full reorth.) per round: {reference['values']}")
        print(f"{'part':<72} {'median':>10} {'× step':>8} {'products':>12} {'rel. error (median, max |·|)':>30}")
        for row in result["rows"]:
            if "skipped" in row:
                print(f"{row['part']:<72} {'skipped: ' + row['skipped']}")
                continue
            extra = ""
            if "products" in row:
                products = ",".join(str(n) for n in row["products"])
                extra = f" {products:>12} {row['median_rel_error']:+14.1e} {row['max_abs_rel_error']:14.1e}"
            print(f"{row['part']:<72} {row['median_s'] * 1e3:8.1f}ms {row['step_equivalents']:8.2f}{extra}")
        for key, value in result["values"].items():
            print(f"  {key:<40} {value:12.6g}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    command = common.command_line(argv, __file__)
    pyhessian = common.package_version("pyhessian") or ("importable" if _pyhessian() is not None else None)
    machine = common.machine_info(device, extra={"pyhessian": pyhessian})
    keys = ("cpu_model", "cpu_count", "torch_threads", "load_average", "torch", "lightning", "pyhessian", "device")
    common.print_machine(command, machine, keys)
    results = [measure_model(name, args, device) for name in common.split_list(args.models)]
    print_report(results)
    path = args.json or common.OUT_DIR / f"sharpness_{device.type}{'_quick' if args.quick else ''}.json"
    common.write_json(path, common.run_record(command, machine, common.config_dict(args), results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
