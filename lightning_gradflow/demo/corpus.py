"""The demo's text: docstrings of the Python standard library, assembled at run time (nothing is downloaded)."""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

#: Standard-library modules whose docstrings (and those of their public classes and functions) form the corpus.
CORPUS_MODULES: tuple[str, ...] = (
    "argparse",
    "bisect",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "itertools",
    "json",
    "logging",
    "math",
    "operator",
    "os",
    "pathlib",
    "pprint",
    "random",
    "re",
    "shlex",
    "statistics",
    "string",
    "textwrap",
    "typing",
    "unittest",
    "zipfile",
)


def build_corpus(modules: Sequence[str] = CORPUS_MODULES) -> str:
    """Concatenates the docstrings of standard-library modules and of the public classes and functions they define.

    The text is deterministic for a given Python version: modules and members are visited in a fixed order,
    repeated docstrings are kept once, and only printable ASCII and newlines are kept.

    Args:
        modules: importable module names.

    Returns:
        The corpus, docstrings separated by blank lines.
    """
    docs: list[str] = []
    seen: set[str] = set()
    for module_name in modules:
        module = importlib.import_module(module_name)
        members = [getattr(module, name) for name in sorted(vars(module)) if not name.startswith("_")]
        owned = [
            m
            for m in members
            if (inspect.isclass(m) or inspect.isroutine(m)) and getattr(m, "__module__", None) == module_name
        ]
        for obj in (module, *owned):
            with warnings.catch_warnings():  # deprecated aliases (e.g. typing.io) warn when their docs are read
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    text = "\n\n".join(docs)
    return "".join(ch for ch in text if ch == "\n" or " " <= ch <= "~")


@dataclass(frozen=True)
class CharData:
    """A corpus encoded as character ids, cut into ``(input, next-character target)`` windows.

    Args:
        vocab: the characters, index = id.
        dataset: ``TensorDataset(inputs, targets)``, both ``(num_windows, seq_len)`` long tensors.
    """

    vocab: str
    dataset: TensorDataset

    @classmethod
    def from_text(cls, text: str, seq_len: int) -> CharData:
        """Encodes ``text`` and cuts it into non-overlapping windows of ``seq_len`` characters.

        Args:
            text: the corpus.
            seq_len: characters per training window.
        """
        vocab = "".join(sorted(set(text)))
        index = {ch: i for i, ch in enumerate(vocab)}
        ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
        n = (ids.numel() - 1) // seq_len
        if n < 1:
            raise ValueError(f"Expected a corpus longer than `seq_len`={seq_len} characters, but got {len(text)}.")
        inputs = ids[: n * seq_len].view(n, seq_len)
        targets = ids[1 : n * seq_len + 1].view(n, seq_len)
        return cls(vocab, TensorDataset(inputs, targets))
