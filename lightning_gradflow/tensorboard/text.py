"""Text for TensorBoard's text dashboard: Markdown, and each callback's interventions as a table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_gradflow.interventions import Intervention, interventions_markdown
from lightning_gradflow.tensorboard.loggers import prefixed

if TYPE_CHECKING:
    from lightning.pytorch.loggers import TensorBoardLogger


def add_text(logger: TensorBoardLogger, tag: str, text: str, step: int) -> None:
    """Writes Markdown text."""
    logger.experiment.add_text(prefixed(logger, tag), text, global_step=step)


def add_interventions(logger: TensorBoardLogger, family: str, records: list[Intervention], step: int) -> None:
    """Writes interventions as a Markdown table under ``<family>/interventions``."""
    add_text(logger, f"{family}/interventions", interventions_markdown(records), step)
