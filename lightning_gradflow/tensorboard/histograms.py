"""Histograms in TensorBoard's ``add_histogram_raw`` form, from bucket counts made on the device.

Two kinds of counts reach TensorBoard: the statistics engine's log-spaced ``|x|`` buckets
(:func:`~lightning_gradflow.stats.tensor_histograms`: gradients, gate pre-activations) and equal-width buckets
(gate activations over ``[0, 1]`` or ``[−1, 1]``). Everything here is host-side formatting of counts already
copied from the device. This module imports neither the statistics engine nor the gates at load time (both re-export
names from here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning_gradflow.tensorboard.loggers import prefixed

if TYPE_CHECKING:
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch import Tensor

    from lightning_gradflow.gates.discovery import GatedModule
    from lightning_gradflow.stats import HistogramSpec, TensorStats


def tensorboard_histogram(counts: Tensor, spec: HistogramSpec, stats: TensorStats | None = None) -> dict[str, Any]:
    """Arguments for ``SummaryWriter.add_histogram_raw`` from one histogram row (and optionally its statistics).

    TensorBoard buckets are ``(previous limit, limit]``: the negative underflow and the zeros share the bucket
    ending at 0. Non-finite values are left out (they are reported by :class:`TensorStats`). Empty buckets at either
    end are trimmed. Without ``stats``, ``sum`` and ``sum_squares`` are estimated from bucket midpoints and
    ``min``/``max`` are bucket edges.

    Args:
        counts: ``(num_bins,)`` counts, e.g. ``hist.total()`` or ``hist.counts[i]``; any device.
        spec: the layout the counts were made with.
        stats: a one-row :class:`TensorStats` of the same values, for exact ``sum``, ``sum_squares`` and
            ``max(|x|)``.

    Returns:
        ``dict(min=, max=, num=, sum=, sum_squares=, bucket_limits=, bucket_counts=)``, or an empty dict when every
        value is non-finite (TensorBoard cannot draw an empty histogram).

    Example::

        >>> import torch
        >>> from lightning_gradflow.stats import HistogramSpec, tensor_histograms, tensorboard_histogram
        >>> spec = HistogramSpec(min_exp=-2, max_exp=2, bins_per_octave=1)
        >>> h = tensor_histograms([torch.tensor([0.0, 0.3, -1.5, 3.0])], spec=spec)
        >>> raw = tensorboard_histogram(h.total(), spec)
        >>> raw["num"], raw["bucket_limits"], raw["bucket_counts"]
        (4, [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0], [1, 0, 0, 1, 0, 1, 0, 0, 1])
    """
    return _log_spaced(counts, spec, None if stats is None else stats.to_host().table[0])


def _log_spaced(counts: Tensor, spec: HistogramSpec, row: Tensor | None) -> dict[str, Any]:
    """:func:`tensorboard_histogram` with the statistics row (sum of squares, max |x|, sum, ...) given directly."""
    values = [int(c) for c in counts.detach().cpu().tolist()]
    if len(values) != spec.num_bins:
        raise ValueError(f"Expected {spec.num_bins} counts for {spec}, but got {len(values)}.")
    m = spec.num_magnitude_bins
    edges = spec.magnitude_edges()
    top = 2.0 ** (spec.max_exp + 1)
    # (limit, count, midpoint) per TensorBoard bucket, ascending.
    buckets: list[tuple[float, int, float]] = [(-edges[-1], values[spec.neg_overflow], -top)]
    for j in range(m - 1, -1, -1):  # negative magnitude buckets, large to small |x|
        buckets.append((-edges[j], values[m - j], -(edges[j] + edges[j + 1]) / 2))
    buckets.append((0.0, values[spec.neg_underflow] + values[spec.zero], -edges[0] / 2))
    buckets.append((edges[0], values[spec.pos_underflow], edges[0] / 2))
    for j in range(m):
        buckets.append((edges[j + 1], values[spec.pos_underflow + 1 + j], (edges[j] + edges[j + 1]) / 2))
    buckets.append((top, values[spec.pos_overflow], top))
    nonzero = [i for i, (_, c, _) in enumerate(buckets) if c]
    if not nonzero:
        return {}
    first, last = nonzero[0], nonzero[-1]
    kept = buckets[first : last + 1]
    lower = buckets[first - 1][0] if first > 0 else -top
    num = sum(c for _, c, _ in kept)
    if row is not None:  # the statistics table's first columns: sum of squares, max |x|, sum
        total, sum_squares, absmax = float(row[2]), float(row[0]), float(row[1])
        lower, upper = max(lower, -absmax), min(kept[-1][0], absmax)
    else:
        total = sum(c * mid for _, c, mid in kept)
        sum_squares = sum(c * mid * mid for _, c, mid in kept)
        upper = kept[-1][0]
    limits = [lim for lim, _, _ in kept]
    limits[-1] = max(upper, lower)
    return {
        "min": lower,
        "max": limits[-1],
        "num": num,
        "sum": total,
        "sum_squares": sum_squares,
        "bucket_limits": limits,
        "bucket_counts": [c for _, c, _ in kept],
    }


def layer_histograms(
    layers: Sequence[str], present: Sequence[int], counts: Tensor, stats: TensorStats, spec: HistogramSpec
) -> dict[str, dict[str, Any]]:
    """``add_histogram_raw`` arguments of one gradient-histogram step, by tag ``grad_hist/<layer>``.

    Args:
        layers: the layer names, by row.
        present: the rows to write (layers with gradients this step).
        counts: ``(rows, spec.num_bins)`` bucket counts on the host.
        stats: the same layers' statistics on the host, for the exact sum, sum of squares and max ``|x|``.
        spec: the counts' bucket layout.
    """
    table = stats.to_host().table
    return {f"grad_hist/{layers[i]}": _log_spaced(counts[i], spec, table[i]) for i in present}


def histogram_raw(counts: Sequence[int], low: float, high: float) -> dict[str, Any]:
    """Arguments for ``SummaryWriter.add_histogram_raw`` from equal-width bucket counts over ``[low, high]``.

    ``sum`` and ``sum_squares`` are estimated from bucket midpoints. Returns an empty dict when all counts are 0.

    Example::

        >>> raw = histogram_raw([0, 2, 0, 1], low=0.0, high=1.0)
        >>> raw["min"], raw["max"], raw["bucket_limits"], raw["bucket_counts"]
        (0.25, 1.0, [0.5, 0.75, 1.0], [2, 0, 1])
    """
    bins = len(counts)
    width = (high - low) / bins
    limits = [low + width * (i + 1) for i in range(bins)]
    mids = [low + width * (i + 0.5) for i in range(bins)]
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return {}
    first, last = nonzero[0], nonzero[-1]
    kept = range(first, last + 1)
    return {
        "min": low + width * first,
        "max": limits[last],
        "num": int(sum(counts)),
        "sum": float(sum(counts[i] * mids[i] for i in kept)),
        "sum_squares": float(sum(counts[i] * mids[i] * mids[i] for i in kept)),
        "bucket_limits": [limits[i] for i in kept],
        "bucket_counts": [int(counts[i]) for i in kept],
    }


def gate_histograms(
    gated: GatedModule, activation_counts: Tensor, preact_counts: Tensor, preact_spec: HistogramSpec
) -> dict[str, dict[str, Any]]:
    """``add_histogram_raw`` arguments of one module's probe by tag: ``activation_hist/<key>``, ``preact_hist/<key>``.

    Args:
        gated: the module.
        activation_counts: ``(rows, gates, bins)`` counts from :func:`~lightning_gradflow.gates.activation_histograms`
            (summed over calls).
        preact_counts: ``(rows · gates, preact_spec.num_bins)`` counts of the pre-activations.
        preact_spec: their bucket layout.
    """
    from lightning_gradflow.gates.discovery import gate_key  # not at the top: `gates` and `stats` import this module

    out = {}
    for row, row_name in enumerate(gated.row_names()):
        for g, gate in enumerate(gated.gates):
            key = gate_key(gated.name, row_name, gate)
            low = -1.0 if gated.tanh_mask[g] else 0.0
            counts = [int(c) for c in activation_counts[row, g].tolist()]
            out[f"activation_hist/{key}"] = histogram_raw(counts, low, 1.0)
            out[f"preact_hist/{key}"] = tensorboard_histogram(
                preact_counts[row * len(gated.gates) + g].long(), preact_spec
            )
    return out


def add_histogram(logger: TensorBoardLogger, tag: str, raw: dict[str, Any], step: int) -> None:
    """Writes a histogram made by :func:`tensorboard_histogram` or :func:`histogram_raw` (skipped when empty)."""
    if raw:
        logger.experiment.add_histogram_raw(prefixed(logger, tag), global_step=step, **raw)
