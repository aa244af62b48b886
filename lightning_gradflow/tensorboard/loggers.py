"""Which loggers get the TensorBoard extras, and the tags as they write them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch.loggers import TensorBoardLogger

if TYPE_CHECKING:
    import lightning.pytorch as pl


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    """The attached TensorBoard loggers, on rank zero only (other ranks write nothing)."""
    if not trainer.is_global_zero:
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def prefixed(logger: TensorBoardLogger, tag: str) -> str:
    """The tag as the logger writes it: with ``TensorBoardLogger(prefix=...)`` Lightning prepends ``prefix-``."""
    prefix = getattr(logger, "_prefix", "")
    return f"{prefix}{logger.LOGGER_JOIN_CHAR}{tag}" if prefix else tag
