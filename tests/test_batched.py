"""Batched inference: the same scores as one image at a time; prefetch order and errors; progress output."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console

from semiseg.config import ModelConfig
from semiseg.data.classes import ClassTable
from semiseg.data.prefetch import group_batches, prefetch
from semiseg.data.types import DataSource, Sample
from semiseg.deploy.onnx_predict import bilinear_resize
from semiseg.evaluation.evaluator import evaluate_source
from semiseg.models.factory import build_model
from semiseg.progress import progress_bar

TINY_ENCODER = "tu-mobilenetv3_small_050"


def tiny_model(classes: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="Unet", encoder=TINY_ENCODER, weights="none", decoder_channels=[16, 8, 8],
                      options={"encoder_depth": 3})
    return build_model(cfg, classes).eval()


def mixed_size_source(tmp_path, n: int = 7) -> DataSource:
    """Images of three sizes, in runs and interleaved, with random binary masks."""
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (64, 64), (48, 80), (64, 64), (48, 80), (48, 80), (96, 64)]
    samples = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"i{i}.png")
        Image.fromarray((rng.random((h, w)) > 0.7).astype(np.uint8)).save(tmp_path / f"i{i}_m.png")
        samples.append(Sample(f"i{i}", tmp_path / f"i{i}.png", tmp_path / f"i{i}_m.png"))
    return DataSource("mixed", tmp_path, ClassTable.binary("thing"), samples,
                      decode_mask=lambda p: np.array(Image.open(p)))


@pytest.mark.parametrize("protocol", ["resize", "whole", "center_crop"])
def test_batched_evaluation_equals_one_at_a_time(tmp_path, protocol) -> None:
    source = mixed_size_source(tmp_path)
    stems = [s.stem for s in source.samples]
    model = tiny_model()
    one = evaluate_source(model, source, stems, protocol=protocol, size=(64, 64), batch_size=1)
    seen: list[int] = []
    many = evaluate_source(model, source, stems, protocol=protocol, size=(64, 64), batch_size=4,
                           progress=lambda done, total: seen.append(done))
    assert seen == list(range(1, len(stems) + 1))
    assert [r["stem"] for r in many.per_image] == stems  # order kept across size groups
    np.testing.assert_array_equal(one.confusion, many.confusion)
    assert one.to_dict(per_image=True) == many.to_dict(per_image=True)


def test_prefetch_keeps_order_and_raises_in_turn() -> None:
    assert list(prefetch(lambda x: x * x, range(20), workers=2, depth=3)) == [x * x for x in range(20)]

    def load(x: int) -> int:
        if x == 5:
            raise ValueError("bad item 5")
        return x

    got = []
    with pytest.raises(ValueError, match="bad item 5"):
        for x in prefetch(load, range(10), depth=4):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]


def test_group_batches_by_key_count_and_size() -> None:
    items = [("a", 1), ("a", 1), ("a", 1), ("b", 5), ("b", 1), ("a", 1)]
    groups = list(group_batches(items, key=lambda it: it[0], size=lambda it: it[1], max_items=2, max_size=5))
    assert [[k for k, _ in g] for g in groups] == [["a", "a"], ["a"], ["b"], ["b"], ["a"]]


@pytest.mark.parametrize("shape", [((2, 16, 16), (37, 53)), ((3, 64, 64), (529, 622)), ((2, 40, 30), (20, 17))])
def test_numpy_bilinear_matches_torch(shape) -> None:
    (c, h, w), size = shape
    probs = np.random.default_rng(0).random((c, h, w), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(probs)[None], size=size, mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(bilinear_resize(probs, size), ref, atol=1e-5)


def test_progress_off_a_terminal_prints_a_summary_line() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    with progress_bar("evaluate", 3, console=console) as update:
        for k in range(3):
            update(k + 1, 3)
    assert "evaluate: 3/3 in" in buffer.getvalue() and "img/s" in buffer.getvalue()
    quiet = io.StringIO()
    with progress_bar("evaluate", 3, enabled=False, console=Console(file=quiet)) as update:
        update(1, 3)
    assert quiet.getvalue() == ""


def test_a_data_phase_speaks_only_when_it_lasts_as_the_command_configured(monkeypatch) -> None:
    import semiseg.progress as progress

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200)
    with progress.phase("reading masks", 3) as update:  # no command configured it: a library call is quiet
        update(3, 3)
    progress.configure(enabled=True, console=console)
    try:
        with progress.phase("reading masks", 3) as update:  # shorter than FIRST_LINE_S: nothing to say
            update(3, 3)
        assert buffer.getvalue() == ""
        monkeypatch.setattr(progress, "FIRST_LINE_S", 0.0)
        with progress_bar("training", 10, console=console), progress.phase("reading masks", 3) as update:
            update(1, 3)  # inside another live display: plain lines, never a second (unnestable) rich bar
            update(3, 3)
        assert "reading masks: 1/3 · " in buffer.getvalue() and "reading masks: 3/3 in" in buffer.getvalue()
    finally:
        progress.configure(enabled=False)
