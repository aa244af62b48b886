"""The main job: realistic broken trainings, repaired while they run by the four callbacks.

Each scenario (:data:`~lightning_gradflow.demo.scenarios.SCENARIOS`) is a small real model on real text — the
Python standard library's docstrings, assembled at run time, so nothing is downloaded — made to have one problem:
saturated LSTM gates, vanishing gradients in a deep plain network, a collapse. Each is trained twice from the same
seed on the same batches, with all four callbacks attached: monitoring only (``auto_intervene=False``), then
repairing (``auto_intervene=True``). A short health report per scenario says what the callbacks found, what they did,
and the loss with and without their interventions; TensorBoard logs go to ``--output-dir``.

Run it with ``python -m lightning_gradflow.demo`` (or the ``gradflow-demo`` console script); ``--help`` lists the
options.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradflow.demo.corpus import CORPUS_MODULES, CharData, build_corpus
from lightning_gradflow.demo.scenarios import SCENARIOS, Scenario
from lightning_gradflow.interventions import Intervention

__all__ = ["CORPUS_MODULES", "SCENARIOS", "CharData", "RunResult", "build_corpus", "main", "run_scenario"]

_TAIL = 20  # the loss reported is the mean over the last _TAIL steps


@dataclass
class RunResult:
    """What one training run left behind.

    Args:
        scenario: the scenario's name.
        auto_intervene: whether the callbacks repaired the run.
        losses: every step's training loss.
        findings: the callbacks' warnings (each says what was found, once).
        interventions: every callback's interventions, in step order.
        seconds: wall time of ``fit``.
        log_dir: where TensorBoard's event files are.
        stop_reason: why training stopped early, when a callback stopped it.
        steps: optimizer steps taken.
        label: ``"monitored"``, ``"repaired"`` or ``"fixed-by-hand"``.
    """

    scenario: str
    auto_intervene: bool
    losses: list[float]
    findings: list[str]
    interventions: list[Intervention]
    seconds: float
    log_dir: str
    stop_reason: str | None = None
    steps: int = 0
    label: str = ""

    def final_loss(self) -> float:
        """Mean loss over the last steps (NaN when any of them is not finite: the run collapsed)."""
        tail = self.losses[-_TAIL:]
        return sum(tail) / len(tail) if tail else math.nan


def run_scenario(
    scenario: Scenario,
    data: CharData,
    auto_intervene: bool,
    steps: int,
    output_dir: Path,
    seed: int = 0,
    progress_bar: bool = True,
    fixed_by_hand: bool = False,
) -> RunResult:
    """Trains one scenario once, with the four callbacks monitoring or repairing.

    Args:
        scenario: what to train.
        data: the encoded corpus.
        auto_intervene: passed to every callback.
        steps: optimizer steps.
        output_dir: TensorBoard root; the run logs to ``<output_dir>/<scenario>/<repaired|monitored>``.
        seed: seeds the model and the batch order (the same for both runs of a scenario).
        progress_bar: show Lightning's progress bar.
        fixed_by_hand: train the scenario's hand-fixed model instead (see ``Scenario.fixed_by_hand``); it logs to
            ``<output_dir>/<scenario>/fixed-by-hand``.
    """
    seed_everything(seed, verbose=False)
    if fixed_by_hand and scenario.fixed_by_hand is None:
        raise ValueError(f"Scenario {scenario.name!r} has no hand-fixed model; pass `fixed_by_hand=False`.")
    make_model = scenario.fixed_by_hand[1] if fixed_by_hand and scenario.fixed_by_hand else scenario.make_model
    model = make_model(len(data.vocab))
    callbacks: list[Callback] = scenario.callbacks(auto_intervene)
    version = "fixed-by-hand" if fixed_by_hand else "repaired" if auto_intervene else "monitored"
    logger = TensorBoardLogger(save_dir=str(output_dir), name=scenario.name, version=version)
    logger._default_hp_metric = False
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        default_root_dir=str(output_dir),
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=scenario.loader(data, seed))
    seconds = time.perf_counter() - start
    names = {type(cb).__name__ for cb in callbacks}
    findings = list(dict.fromkeys(str(w.message) for w in caught if str(w.message).split(":")[0] in names))
    interventions = sorted(
        (i for cb in callbacks for i in getattr(cb, "interventions", [])), key=lambda i: (i.step, i.callback)
    )
    stop = next((str(r) for cb in callbacks if (r := getattr(cb, "stop_reason", None)) is not None), None)
    return RunResult(
        scenario.name,
        auto_intervene,
        model.losses(),
        findings,
        interventions,
        seconds,
        logger.log_dir,
        stop,
        trainer.global_step,
        version,
    )


def health_report(
    scenario: Scenario, monitored: RunResult | None, repaired: RunResult | None, fixed: RunResult | None = None
) -> str:
    """A few lines per scenario: what was found, what was done, and the loss with and without interventions."""
    lines = [f"== {scenario.name}: {scenario.title}"]
    runs = [r for r in (monitored, repaired) if r is not None]
    findings = _grouped_findings([f for r in runs for f in r.findings])
    lines.append(f"   found: {len(findings)} kind(s) of problem" if findings else "   found: nothing")
    lines += [f"     - {_shorten(f)}" for f in findings]
    if repaired is not None:
        lines.append(f"   done (auto_intervene=True): {_summary(repaired.interventions)}")
        lines += [f"     - {_shorten(str(i))}" for i in _first_of_each(repaired.interventions)]
    elif monitored is not None:
        lines.append(f"   would do (auto_intervene=False): {_summary(monitored.interventions)}")
    if fixed is not None and scenario.fixed_by_hand is not None:
        lines.append(f"   no callback repairs this by itself; {scenario.fixed_by_hand[0]}:")
        runs.append(fixed)
    for run in runs:
        label = run.label
        stopped = f"; stopped: {run.stop_reason}" if run.stop_reason else ""
        lines.append(f"   loss ({label:>13}): {_loss(run)} after {run.steps} steps ({run.seconds:.0f} s{stopped})")
        lines.append(f"   {'':>19}logs: {run.log_dir}")
    return "\n".join(lines)


def _grouped_findings(findings: list[str]) -> list[str]:
    """One line per kind of finding: "<callback>: <problem> in layer 'a', 'b' … at step N: <details of the first>".

    Warnings name their subject in quotes; the same problem in several layers (or in both runs) becomes one line.
    """
    groups: dict[str, tuple[list[str], str]] = {}
    for text in findings:
        head, quote, rest = text.partition("'")
        subject, _, tail = rest.partition("'")
        if not quote:  # no subject named: the same finding at another step is the same kind
            head, subject, tail = text.split(" at step")[0], "", text
        names, _ = groups.setdefault(head, ([], tail))
        if subject and subject not in names:
            names.append(subject)
    lines = []
    for head, (names, tail) in groups.items():
        if not names:
            lines.append(tail)
            continue
        shown = ", ".join(f"'{n}'" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"{head}{shown}{tail}")
    return lines


def _summary(records: list[Intervention]) -> str:
    if not records:
        return "no intervention"
    counts: dict[str, int] = {}
    for r in records:
        key = f"{r.callback}.{r.kind}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items())


def _first_of_each(records: list[Intervention], limit: int = 6) -> list[Intervention]:
    seen: dict[tuple[str, str], Intervention] = {}
    for r in records:
        seen.setdefault((r.callback, r.kind), r)
    return list(seen.values())[:limit]


def _loss(run: RunResult) -> str:
    value = run.final_loss()
    return "non-finite (collapsed)" if not math.isfinite(value) else f"{value:.3f} nats/char (mean of last {_TAIL})"


def _shorten(text: str, width: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The demo's command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_gradflow.demo",
        description="Train small real models made to break (saturated LSTM gates, vanishing gradients, a collapse)"
        " with the four lightning_gradflow callbacks, with and without their interventions, and report.",
    )
    parser.add_argument(
        "--scenario",
        choices=("all", *SCENARIOS),
        default="all",
        help="which broken training to run (default: all)",
    )
    parser.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps per run (default: 300)")
    parser.add_argument(
        "--output-dir", type=Path, default=Path("runs/gradflow-demo"), help="TensorBoard root (default: %(default)s)"
    )
    parser.add_argument(
        "--no-intervene",
        action="store_true",
        help="only the monitoring run (auto_intervene=False): findings and what would be done",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--no-progress-bar", action="store_true", help="hide Lightning's progress bar (shown by default)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the chosen scenarios and prints a health report for each.

    Args:
        argv: command-line arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status, 0 on success.
    """
    args = build_parser().parse_args(argv)
    chosen = list(SCENARIOS.values()) if args.scenario == "all" else [SCENARIOS[args.scenario]]
    data = CharData.from_text(build_corpus(), seq_len=64)
    print(f"Corpus: {len(data.dataset) * 64:,} characters of standard-library docstrings, {len(data.vocab)} distinct.")
    reports = []
    for scenario in chosen:
        steps = args.steps or scenario.steps
        runs: dict[bool, RunResult] = {}
        for intervene in (False,) if args.no_intervene else (False, True):
            mode = "repairing (auto_intervene=True)" if intervene else "monitoring only"
            print(f"\n{scenario.name}: {scenario.title} — {mode}, {steps} steps")
            runs[intervene] = run_scenario(
                scenario, data, intervene, steps, args.output_dir, args.seed, not args.no_progress_bar
            )
        fixed = None
        if scenario.fixed_by_hand is not None and not args.no_intervene:
            print(f"\n{scenario.name}: {scenario.fixed_by_hand[0]}, {steps} steps")
            fixed = run_scenario(
                scenario, data, True, steps, args.output_dir, args.seed, not args.no_progress_bar, fixed_by_hand=True
            )
        reports.append(health_report(scenario, runs.get(False), runs.get(True), fixed))
    print("\nHealth report")
    print("\n\n".join(reports))
    print(f"\nView the runs with: tensorboard --logdir {args.output_dir}")
    return 0
