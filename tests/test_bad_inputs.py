"""A table of bad inputs (config, data, split files, run directories, checkpoints), each run through the CLI:
the exit status, a message naming the culprit, no traceback, and nothing left half-written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg import api
from semiseg.api import load_config
from semiseg.config import ModelConfig
from semiseg.models.factory import build_model
from tests.safety_helpers import TINY, cli, copy_run, make_folder, plant_pickle, set_mask_value, sets, tree


@dataclass
class Env:
    tmp: Path
    data: Path
    finished: Path
    marker: Path
    _run: Path | None = None

    @property
    def runs(self) -> Path:
        return self.tmp / "runs"

    @property
    def run(self) -> Path:
        """A private copy of a finished run (made on first use)."""
        if self._run is None:
            self._run = copy_run(self.finished, self.tmp / "run")
        return self._run

    @property
    def ckpt(self) -> Path:
        return self.run / "stages" / "0-supervised" / "checkpoints"

    def train(self, *extra: str) -> list[str]:
        return ["train", *sets(*TINY, f"data.source={self.data}", "name=bad", f"out_dir={self.runs}", *extra)]

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def splits(self, **lists: str) -> str:
        for name, stems in lists.items():
            self.write(f"splits/{name}.txt", "\n".join(stems.split()) + "\n")
        return f"split.files={self.tmp / 'splits'}"

    def weights(self, state: object) -> str:
        torch.save(state, self.tmp / "w.pt")
        return f"model.weights={self.tmp / 'w.pt'}"


@dataclass
class Case:
    id: str
    build: Callable[[Env], list[str]]
    needles: tuple[str, ...]
    code: int = 2


def _config(env: Env, text: str) -> list[str]:
    return ["train", str(env.write("c.yaml", text)), *sets(f"out_dir={env.runs}")]


def _other_encoder(env: Env) -> str:
    net = build_model(ModelConfig(encoder="tu-mobilenetv3_small_075", weights="none",
                                    decoder_channels=[16, 16, 16, 8, 8]), 2)
    return env.weights(net.state_dict())


def _partial(env: Env) -> str:
    net = build_model(load_config(None, TINY).model, 2)
    return env.weights({k: v for k, v in net.state_dict().items() if not k.startswith("segmentation_head.")})


def _low_space(env: Env) -> list[str]:
    import semiseg.pipeline.preflight as preflight

    env.monkeypatch.setattr(preflight.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10, 9, 1 << 20))
    return env.train()


SUPERVISED_BLOCK = "name: supervised\n  loss: run"  # config.yaml's method block of a supervised run


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"  # an edit that misses would test nothing
    path.write_text(text.replace(old, new))


def _first(path: Path) -> str:
    return path.read_text().split()[0]


def _then(action: Callable[[], object], args: list[str]) -> list[str]:
    action()
    return args


def _unfinished(env: Env) -> list[str]:
    (env.run / "stages" / "0-supervised" / "DONE").unlink()
    return ["resume", env.run]


def _nan_best(env: Env) -> list[str]:
    state = torch.load(env.ckpt / "best.pt")
    next(v for v in state["net"].values() if v.is_floating_point()).fill_(float("inf"))
    torch.save(state, env.ckpt / "best.pt")
    return ["evaluate", env.run]


def _nan_last(env: Env) -> list[str]:
    state = torch.load(env.ckpt / "last.pt")
    next(v for v in state["nets"]["model"].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(state, env.ckpt / "last.pt")
    return _unfinished(env)


def _black_white(path: Path) -> None:
    mask = np.array(Image.open(path))
    Image.fromarray((mask * 255).astype(np.uint8)).save(path)  # the same object, saved as a black/white image


def _remove_pair(data: Path, stem: str) -> None:
    (data / "images" / f"{stem}.png").unlink()
    (data / "masks" / f"{stem}.png").unlink()


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _image_dir(env: Env, files: dict[str, bytes]) -> Path:
    folder = env.tmp / "imgs"
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


GOOD_META = {"preprocessing": {"protocol": "resize", "size": [32, 32], "window": None, "stride": None,
                               "size_divisor": 32, "pad_mode": "reflect"},
             "normalization": {"mean": [0.5, 0.5, 0.5]},
             "classes": {"names": ["background", "object"], "colors": [[0, 0, 0], [255, 255, 255]]}}


def _onnx_with_meta(env: Env, text: str | None = None, **preprocessing: object) -> list[str]:
    """``predict`` with a working one-layer ONNX model whose ``semiseg`` metadata is ``text`` (or GOOD_META with
    ``preprocessing`` changed): crafted metadata a user may receive."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 3, "h", "w"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2, "h", "w"])],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {**GOOD_META, "preprocessing": {**GOOD_META["preprocessing"], **preprocessing}}
    helper.set_model_props(model, {"semiseg": json.dumps(meta) if text is None else text})
    onnx.save(model, str(env.tmp / "model.onnx"))
    images = _image_dir(env, {"a.png": (env.data / "images" / "img00.png").read_bytes()})
    return ["predict", env.tmp / "model.onnx", images, env.tmp / "out"]


CASES = [
    # -- config ------------------------------------------------------------------------------------------
    Case("unknown-key", lambda e: e.train("train.lrr=1"), ("train.lrr: unknown key",)),
    Case("zero-steps", lambda e: e.train("train.steps=0"), ("train.steps",)),
    Case("unknown-method", lambda e: e.train("method.name=nope"), ("unknown method 'nope'",)),
    Case("name-escapes", lambda e: e.train("name=../x"), ("name:", "'../x'")),
    Case("name-with-slash", lambda e: e.train("name=a/b"), ("name:", "'a/b'")),
    Case("name-hidden", lambda e: e.train("name=.x"), ("name:", "'.x'")),
    Case("name-empty", lambda e: e.train("name="), ("name:",)),
    Case("cuda-without-gpu", lambda e: e.train("train.device=cuda"), ("train.device=cuda", "no CUDA GPU")),
    Case("unknown-device", lambda e: e.train("train.device=tpu"), ("train.device='tpu'",)),
    Case("bad-optimizer", lambda e: e.train("train.optimizer=rmsprop"), ("train.optimizer", "rmsprop")),
    Case("bad-protocol", lambda e: e.train("eval.protocol=nope"), ("eval.protocol",)),
    Case("set-without-value", lambda e: [*e.train(), "--set", "train.lr"], ("'train.lr': expected KEY=VALUE",)),
    Case("yaml-duplicate-key", lambda e: _config(e, "train:\n  lr: 0.1\n  lr: 0.2\n"),
         ("c.yaml", "'lr' appears twice", "lines 2 and 3")),
    Case("yaml-syntax", lambda e: _config(e, "train: [1, 2\n"), ("c.yaml: not valid YAML",)),
    Case("yaml-not-mapping", lambda e: _config(e, "- 1\n- 2\n"), ("c.yaml: the top level must be a mapping",)),
    Case("config-missing", lambda e: ["train", str(e.tmp / "none.yaml")], ("none.yaml: config file not found",)),
    Case("bench-seeds-not-numbers", lambda e: ["bench", "demo", "--seeds", "abc", "--out-dir", e.runs, "--results",
                                               e.tmp / "no", "--markdown", e.tmp / "no" / "B.md"],
         ("--seeds 'abc': expected comma-separated whole numbers",)),
    Case("batch-size-beyond-memory", lambda e: _then(lambda: e.monkeypatch.setattr(  # the same on any machine
        "semiseg.pipeline.preflight.available_memory", lambda _device: 8 << 30), e.train("train.batch_size=100000")),
         ("train.batch_size=100000: a training step needs at least", "cpu has 8.0 GB available")),
    Case("unknown-encoder", lambda e: e.train("model.encoder=nope"), ("encoder='nope'",)),
    # a wrong data root fails a bench once, before any run, not once per run of the matrix
    Case("bench-data-root-missing", lambda e: [
        "bench", "camvid", "--methods", "supervised,oracle", "--seeds", "0,1", "--out-dir", str(e.runs),
        "--results", str(e.tmp / "no"), "--markdown", str(e.tmp / "no" / "B.md"),
        "--set", f"data.root={e.tmp / 'nope'}"], ("nope: data folder of preset 'camvid' not found",)),
    # -- model.weights -------------------------------------------------------------------------------------
    Case("weights-missing", lambda e: e.train(f"model.weights={e.tmp / 'no.pt'}"), ("file not found", "no.pt")),
    Case("weights-crafted-pickle", lambda e: e.train(f"model.weights={e.tmp / 'evil.pt'}") if not plant_pickle(
        e.tmp / "evil.pt", e.marker) else [], ("evil.pt refused",)),
    Case("weights-not-torch", lambda e: e.train(f"model.weights={e.write('w.pt', 'hello')}"),
         ("w.pt is not a readable PyTorch state dict",)),
    Case("weights-a-jpeg", lambda e: e.train(f"model.weights={e.tmp / 'w.jpg'}") if not Image.new(
        "RGB", (8, 8)).save(e.tmp / "w.jpg") else [], ("w.jpg is not a readable PyTorch state dict", "a JPEG image")),
    Case("weights-other-encoder", lambda e: e.train(_other_encoder(e)), ("w.pt does not fit", "another shape")),
    Case("weights-partial", lambda e: e.train(_partial(e)), ("only partly", "segmentation_head.")),
    Case("weights-folder", lambda e: e.train(f"model.weights={e.finished}"), ("is a folder", "best.pt")),
    Case("weights-not-tensors", lambda e: e.train(e.weights({"a": 1})), ("not a state dict of tensors",)),
    # -- output folder ---------------------------------------------------------------------------------------
    Case("out-dir-is-a-file", lambda e: [*e.train(), "--set", f"out_dir={e.write('f', '')}"], ("is a file",)),
    Case("out-dir-no-space", _low_space, ("MB free", "needs about")),
    # -- data --------------------------------------------------------------------------------------------------
    Case("data-missing", lambda e: e.train(f"data.source={e.tmp / 'nothing'}"), ("nothing: neither a preset",)),
    Case("data-no-masks-folder", lambda e: _then(lambda: shutil.rmtree(e.data / "masks"), e.train()),
         ("masks folder not found",)),
    Case("data-image-without-mask", lambda e: _then(lambda: (e.data / "masks" / "img03.png").unlink(), e.train()),
         ("no mask for 1 images", "'img03'")),
    Case("data-stray-value", lambda e: _then(lambda: set_mask_value(e.data / "masks" / "img03.png", 7), e.train()),
         ("img03.png", "7 look stray")),
    Case("data-value-outside-declared-classes",
         lambda e: _then(lambda: set_mask_value(e.data / "masks" / "img03.png", 3),
                         e.train("data.options.classes=[a,b,c]")), ("img03.png", "outside the class table")),
    Case("data-corrupt-image", lambda e: _then(lambda: (e.data / "images" / "img02.png").write_bytes(b"x" * 50),
                                               e.train()), ("img02.png", "cannot decode")),
    Case("data-mask-size", lambda e: _then(lambda: Image.new("L", (9, 9)).save(e.data / "masks" / "img04.png"),
                                           e.train(e.splits(labeled="img00 img04", val="img01"))),
         ("img04.png", "9x9")),
    Case("data-mask-without-image", lambda e: _then(lambda: (e.data / "images" / "img05.png").unlink(), e.train()),
         ("no image for 1 masks", "'img05'")),
    Case("data-stem-with-space", lambda e: _then(lambda: [shutil.copy(e.data / d / "img00.png", e.data / d / " x.png")
                                                       for d in ("images", "masks")], e.train()),
         ("images/ x.png: a file name that starts or ends with a space", "rename it")),
    Case("data-size-zero", lambda e: e.train("data.size=[0,64]"), ("data.size:", "at least 1 pixel")),
    Case("data-bad-mask-format", lambda e: e.train("data.options.mask_format=bogus"),
         ("data.options.mask_format='bogus': choose one of auto, threshold, index, color",)),
    Case("data-mask-0-255-among-0-1", lambda e: _then(lambda: _black_white(e.data / "masks" / "img03.png"), e.train()),
         ("masks hold 0/1 and 1 hold 0/255", "become void in img03.png", "data.options.mask_format=index")),
    Case("data-one-class-name", lambda e: e.train("data.options.classes=[only]"), ("at least two class names",)),
    Case("data-bad-option", lambda e: e.train("data.options.bogus=1"), ("bad option for a folder source",)),
    # -- split files ------------------------------------------------------------------------------------------
    Case("split-missing-stem", lambda e: e.train(e.splits(labeled="img00 img01 nope", val="img02")),
         ("labeled.txt", "'nope'")),
    Case("split-stem-with-extension", lambda e: e.train(e.splits(labeled="img00 img01.png", val="img02")),
         ("img01.png", "without the file extension")),
    Case("split-no-labeled-file", lambda e: e.train(f"split.files={e.tmp}"), ("no labeled.txt",)),
    Case("split-stem-twice", lambda e: e.train(e.splits(labeled="img00 img01", val="img01")),
         ("'img01' is in both labeled and val",)),
    Case("split-val-without-mask", lambda e: _then(lambda: make_folder(e.data, n=0, unlabeled=1),
                                                   e.train(e.splits(labeled="img00", val="u0"))),
         ("val.txt", "'u0'", "no mask")),
    Case("split-no-val-file", lambda e: e.train(e.splits(labeled="img00 img01")),
         ("splits/val.txt: missing or empty",)),
    Case("split-zero-labeled", lambda e: e.train("split.labeled=0"), ("splits.labeled",)),
    # -- run directories -----------------------------------------------------------------------------------------
    Case("train-over-existing-run", lambda e: [*e.train(), "--set", f"out_dir={e.run.parent}", "--set", "name=run"],
         ("already exists", "semiseg resume")),
    Case("resume-not-a-run", lambda e: ["resume", e.data], ("not a run directory (no config.yaml)",)),
    Case("evaluate-unfinished", lambda e: _then(lambda: (e.run / "results.json").unlink(), ["evaluate", e.run]),
         ("no finished run here",)),
    # the method block edited as a whole (supervised's own option would be an unknown key of mean-teacher)
    Case("resume-method-edited", lambda e: _then(lambda: _edit(e.run / "config.yaml", SUPERVISED_BLOCK,
                                                               "name: mean-teacher"), ["resume", e.run]),
         ("config.yaml changed", "method.name: 'supervised' -> 'mean-teacher'")),
    Case("resume-method-option-edited", lambda e: _then(lambda: _edit(e.run / "config.yaml", "loss: run",
                                                                      "loss: dice"), ["resume", e.run]),
         ("config.yaml changed", "method.loss: 'run' -> 'dice'")),
    Case("resume-lr-edited", lambda e: _then(lambda: _edit(e.run / "config.yaml", "lr: 0.001", "lr: 0.5"),
                                             ["resume", e.run]), ("train.lr: 0.001 -> 0.5",)),
    Case("evaluate-test-mask-changed",
         lambda e: _then(lambda: set_mask_value(e.finished.parent.parent / "data" / "masks" /
                                                f"{_first(e.run / 'splits' / 'test.txt')}.png", 1),
                         ["evaluate", e.run]), ("test: 1 mask(s) changed", "--accept-changed-data")),
    Case("resume-val-image-gone", lambda e: _then(lambda: _remove_pair(e.finished.parent.parent / "data", _first(
        e.run / "splits" / "val.txt")), ["resume", e.run]), ("val: 1 file(s) no longer in the data",)),
    Case("resume-split-edited", lambda e: _then(lambda: (e.run / "splits" / "val.txt").write_text(
        _first(e.run / "splits" / "val.txt") + "\n"), ["resume", e.run]), ("splits/val.txt edited",)),
    Case("fingerprint-corrupt", lambda e: _then(lambda: (e.run / "fingerprint.json").write_text("{"),
                                                ["resume", e.run]), ("fingerprint.json: unreadable",)),
    Case("evaluate-fingerprint-deleted", lambda e: _then(lambda: (e.run / "fingerprint.json").unlink(),
                                                         ["evaluate", e.run]),
         ("fingerprint.json is missing", "--accept-missing-fingerprint")),
    Case("evaluate-bad-split", lambda e: ["evaluate", e.run, "--split", "bogus"], ("--split 'bogus'",)),
    Case("evaluate-json-unwritable", lambda e: ["evaluate", e.run, "--json", e.tmp / "no" / "m.json"],
         ("--json", "no/m.json", "does not exist")),
    Case("predict-missing-folder", lambda e: ["predict", e.run, e.tmp / "none", e.tmp / "out"],
         ("none: images folder not found",)),
    Case("predict-no-images", lambda e: ["predict", e.run, _image_dir(e, {"a.txt": b"x"}), e.tmp / "out"],
         ("no images",)),
    Case("predict-only-bad-images", lambda e: ["predict", e.run, _image_dir(e, {"a.png": b"x"}), e.tmp / "out"],
         ("skipped 1 unreadable image(s): a.png",), code=1),
    Case("onnx-metadata-not-json", lambda e: _onnx_with_meta(e, "{size"),
         ("model.onnx: semiseg metadata is not valid JSON",)),
    Case("onnx-metadata-not-an-object", lambda e: _onnx_with_meta(e, "[1, 2]"),
         ("model.onnx: semiseg metadata (top level): expected a JSON object",)),
    Case("onnx-metadata-size-wrong-type", lambda e: _onnx_with_meta(e, size="32x32"),
         ("model.onnx: semiseg metadata preprocessing.size: expected [height, width]", "'32x32'")),
    Case("onnx-metadata-size-zero", lambda e: _onnx_with_meta(e, size=[0, 0]),
         ("preprocessing.size: expected [height, width] of whole numbers 1..8192", "[0, 0]")),
    Case("onnx-metadata-size-huge", lambda e: _onnx_with_meta(e, size=[100000, 100000]),
         ("preprocessing.size", "[100000, 100000]")),
    Case("onnx-metadata-protocol", lambda e: _onnx_with_meta(e, protocol=7), ("preprocessing.protocol", "got 7")),
    Case("onnx-metadata-missing-key", lambda e: _onnx_with_meta(e, json.dumps({"preprocessing": {}})),
         ("semiseg metadata has no preprocessing.protocol",)),
    # -- checkpoints ------------------------------------------------------------------------------------------------
    Case("checkpoint-truncated", lambda e: _then(lambda: _truncate(e.ckpt / "best.pt", 5000), ["evaluate", e.run]),
         ("best.pt: truncated or corrupt",)),
    Case("checkpoint-empty", lambda e: _then(lambda: _truncate(e.ckpt / "best.pt", 0), ["evaluate", e.run]),
         ("best.pt: truncated or corrupt",)),
    Case("checkpoint-crafted-pickle", lambda e: _then(lambda: plant_pickle(e.ckpt / "best.pt", e.marker),
                                                      ["evaluate", e.run]), ("best.pt: refused",)),
    Case("checkpoint-non-finite", _nan_best, ("non-finite weights",)),
    Case("checkpoint-last-truncated", lambda e: _then(lambda: _truncate(e.ckpt / "last.pt", 100), _unfinished(e)),
         ("last.pt: truncated or corrupt",)),
    # resumed from, not blamed on the learning rate nor called "the last good checkpoint"
    Case("checkpoint-last-non-finite", _nan_last, ("last.pt: holds non-finite weights", "cannot be resumed from")),
    Case("checkpoint-all-missing", lambda e: _then(lambda: shutil.rmtree(e.ckpt), ["evaluate", e.run]),
         ("last.pt: checkpoint not found",)),
    Case("checkpoint-not-a-dict", lambda e: _then(lambda: torch.save([1, 2], e.ckpt / "best.pt"),
                                                  ["evaluate", e.run]), ("best.pt: not a semiseg checkpoint",)),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    mp = pytest.MonkeyPatch()
    mp.setenv("SEMISEG_CACHE", str(tmp / "cache"))
    data = make_folder(tmp / "data")
    cfg = load_config(None, [*TINY, f"data.source={data}", "name=base", f"out_dir={tmp / 'runs'}"])
    api.run(cfg, log=lambda *_: None)
    yield tmp / "runs" / "base"
    mp.undo()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    data_backup = tmp_path / "data-backup"  # cases may damage the finished run's data: restore it after
    shutil.copytree(finished.parent.parent / "data", data_backup)
    env = Env(tmp_path, make_folder(tmp_path / "data"), finished, tmp_path / "PWNED")
    env.monkeypatch = monkeypatch  # type: ignore[attr-defined]
    try:
        args = case.build(env)
        before = tree(env._run) if env._run is not None else None
        res = cli(args, capsys)
    finally:
        shutil.rmtree(finished.parent.parent / "data")
        shutil.copytree(data_backup, finished.parent.parent / "data")
    assert res.code == case.code, res.err
    for needle in case.needles:
        assert needle in res.err, f"{needle!r} not in: {res.err}"
    assert "Traceback" not in res.err + res.out and res.err.count("\n") <= 2  # one line (+ a progress line)
    assert not env.marker.exists()  # no code from a crafted file ran
    # nothing half-written: no run directory from a failed start, a run directory unchanged by a refusal
    assert not (env.runs / "bad").exists() and not (tmp_path / "x").exists()
    assert not list(env.runs.glob(".*")) if env.runs.exists() else True
    if before is not None:
        assert tree(env._run) == before
    assert not (tmp_path / "no" / "m.json").exists() and not (tmp_path / "no" / "B.md").exists()
