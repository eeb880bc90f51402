"""ONNX export as a user runs it: every method family exports its delivered model, the exported file predicts the
same masks as the run directory (real images when the shared data is here), a bad directory or a failed parity
check leaves nothing behind, and the deploy path runs without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli_helpers import ROOT, env, semiseg

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'semiseg[export]'")
pytest.importorskip("onnx", reason="the export extra is not installed: pip install 'semiseg[export]'")

TINY_ENCODER = "tu-mobilenetv3_small_050"
TINY = ["data.size=[64,64]", "data.options.n=40", "data.options.size=64", f"model.encoder={TINY_ENCODER}",
        "model.weights=none", "model.decoder_channels=[16,8,8]", "model.options.encoder_depth=3", "train.steps=6",
        "train.eval_every=6", "train.checkpoint_every=6", "train.batch_size=4", "train.progress=false",
        "train.threads=1", "split.labeled=0.25", "split.val=0.2", "split.test=0.2"]
# one run per method family: online supervised, staged (teacher -> pseudo labels -> student), online teacher-student
FAMILIES = {"sup": ["method.name=supervised"],
            "st": ["method.name=self-training", "method.retrain_steps=4", "method.tta_flip=false"],
            "mt": ["method.name=mean-teacher"]}


def _shared_data() -> Path | None:
    candidate = ROOT.parent / "shared" / "data"
    return candidate if (candidate / "kvasir-seg" / "images").is_dir() else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for name, sets in FAMILIES.items():
        args = [*TINY, *sets, f"name={name}", f"out_dir={tmp / 'runs'}"]
        semiseg(["train", *[x for s in args for x in ("--set", s)]], tmp)
        out[name] = tmp / "runs" / name
    return tmp, out


def _images(folder: Path) -> Path:
    """A few synthetic-looking images of sizes other than the working size (resize + upsampling path)."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(50, 70), (64, 64), (97, 131)]):
        img = np.full((h, w, 3), (150, 80, 70), np.uint8)
        img[h // 4: h // 2, w // 3: w // 2] = (220, 140, 120)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
    return folder


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted((folder / "masks").glob("*.png"))}


def _assert_same_masks(a: Path, b: Path) -> None:
    ma, mb = _masks(a), _masks(b)
    assert ma.keys() == mb.keys() and ma
    differ = sum(int((ma[k] != mb[k]).sum()) for k in ma)
    pixels = sum(m.size for m in ma.values())
    # onnxruntime's float32 kernels differ from PyTorch's by ~1e-6: only an exact tie could flip a pixel
    assert differ <= max(1, pixels // 100_000), f"{differ} of {pixels} pixels differ"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_family_exports_its_delivered_model(runs, family) -> None:
    tmp, run_dirs = runs
    run = run_dirs[family]
    proc = semiseg(["export", str(run)], tmp)
    message = " ".join(proc.stderr.split())
    assert "parity on" in message and ": ok" in message
    meta = json.loads((run / "model.json").read_text())
    assert meta["run"]["method"] == json.loads((run / "results.json").read_text())["method"]
    assert meta["preprocessing"]["size"] == [64, 64] and meta["opset"] >= 13
    assert meta["normalization"]["applied_in_graph"] and len(meta["normalization"]["mean"]) == 3
    assert meta["classes"]["names"] == ["background", "polyp"]
    assert meta["parity"]["ok"] and meta["parity"]["max_abs_diff"] <= meta["parity"]["tolerance"]
    # the exported graph is the model evaluate scores: same delivered network, same predictions
    images = _images(tmp / f"images-{family}")
    semiseg(["predict", str(run / "model.onnx"), str(images), str(tmp / f"onnx-{family}")], tmp)
    semiseg(["predict", str(run), str(images), str(tmp / f"torch-{family}")], tmp)
    _assert_same_masks(tmp / f"onnx-{family}", tmp / f"torch-{family}")
    assert sorted(p.name for p in (tmp / f"onnx-{family}" / "overlays").iterdir()) == ["img0.jpg", "img1.jpg",
                                                                                       "img2.jpg"]


@pytest.mark.parametrize("protocol", ["whole", "sliding_window", "center_crop"])
def test_onnx_predict_follows_every_protocol(runs, tmp_path, protocol) -> None:
    tmp, run_dirs = runs
    run = run_dirs["sup"]
    if not (run / "model.onnx").exists():
        semiseg(["export", str(run)], tmp)
    images = _images(tmp_path / "images")
    for model, out in ((run / "model.onnx", "onnx"), (run, "torch")):
        semiseg(["predict", str(model), str(images), str(tmp_path / out), "--protocol", protocol], tmp)
    _assert_same_masks(tmp_path / "onnx", tmp_path / "torch")


def test_onnx_masks_equal_run_masks_on_real_images(runs, tmp_path) -> None:
    data = _shared_data()
    if data is None:
        pytest.skip("shared datasets not found at ../shared/data (kvasir-seg)")
    tmp, run_dirs = runs
    run = run_dirs["sup"]
    if not (run / "model.onnx").exists():
        semiseg(["export", str(run)], tmp)
    images = tmp_path / "kvasir"
    images.mkdir()
    for src in sorted((data / "kvasir-seg" / "images").iterdir())[:3]:  # full-size endoscopy frames
        os.symlink(src, images / src.name)
    semiseg(["predict", str(run / "model.onnx"), str(images), str(tmp_path / "onnx")], tmp)
    semiseg(["predict", str(run), str(images), str(tmp_path / "torch")], tmp)
    _assert_same_masks(tmp_path / "onnx", tmp_path / "torch")


def test_onnx_predict_runs_without_torch(runs, tmp_path) -> None:
    tmp, run_dirs = runs
    run = run_dirs["sup"]
    if not (run / "model.onnx").exists():
        semiseg(["export", str(run)], tmp)
    images = _images(tmp_path / "images")
    code = ("import sys; sys.modules['torch'] = None  # any import of torch now fails\n"
            "from semiseg.cli import main\n"
            f"sys.argv = ['semiseg', 'predict', {str(run / 'model.onnx')!r}, {str(images)!r}, "
            f"{str(tmp_path / 'out')!r}]\n"
            "main()\n"
            "assert sys.modules['torch'] is None\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_masks(tmp_path / "out")) == 3


def test_export_of_an_unfinished_directory_fails_and_writes_nothing(runs, tmp_path) -> None:
    tmp, run_dirs = runs
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text((run_dirs["sup"] / "config.yaml").read_text())
    before = sorted(p.name for p in half.iterdir())
    proc = semiseg(["export", str(half), "--out", str(tmp_path / "m.onnx")], tmp, check=False)
    message = " ".join(proc.stderr.split())  # rich wraps long lines
    assert proc.returncode != 0 and "no finished run here" in message and "Traceback" not in message
    assert sorted(p.name for p in half.iterdir()) == before
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".m.onnx*"))


def test_failed_parity_leaves_nothing_at_out(runs, tmp_path) -> None:
    from semiseg.errors import SemisegError
    from semiseg.export import export_run

    _, run_dirs = runs
    out = tmp_path / "deploy" / "model.onnx"
    lines: list[str] = []
    with pytest.raises(SemisegError, match="parity"):  # no float32 runtime agrees with another to 0.0
        export_run(run_dirs["sup"], out, tolerance=0.0, log=lines.append)
    assert "FAILED" in lines[0]
    assert list(out.parent.iterdir()) == []


def test_export_without_the_extra_says_what_to_install(runs, tmp_path) -> None:
    tmp, run_dirs = runs
    code = ("import sys; sys.modules['onnx'] = None\nfrom semiseg.cli import main\n"
            f"sys.argv = ['semiseg', 'export', {str(run_dirs['sup'])!r}, '--out', {str(tmp_path / 'm.onnx')!r}]\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "pip install 'semiseg[export]'" in " ".join(proc.stderr.split())
    assert not (tmp_path / "m.onnx").exists()
