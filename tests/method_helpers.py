"""A method planned over a fake run (nothing is read or trained): for stage keys, steps and lineage."""

from __future__ import annotations

from pathlib import Path

import torch

from semiseg.api import config_from_dict
from semiseg.data.classes import ClassTable
from semiseg.data.splits import Splits
from semiseg.data.types import DataSource
from semiseg.methods.registry import Method, get_method
from semiseg.pipeline.context import RunContext


def method_for(name: str, *, labeled: int = 4, unlabeled: int = 10, steps: int = 12, batch: int = 2,
               **options: object) -> Method:
    """A method instance over a run with ``labeled`` / ``unlabeled`` stems (nothing is read)."""
    cfg = config_from_dict({"train": {"steps": steps, "batch_size": batch},
                            "method": {"name": name, **options}})
    source = DataSource("fake", None, ClassTable.binary("obj"), [], lambda p: None)
    splits = Splits(labeled=[f"l{i}" for i in range(labeled)], unlabeled=[f"u{i}" for i in range(unlabeled)])
    run = RunContext(cfg, Path("/nonexistent/run"), source, splits, torch.device("cpu"))
    return get_method(name)(run, cfg.method)
