"""Checks that run before a run directory appears: everything a user can get wrong fails here, with the
culprit named, instead of after minutes of training or halfway through writing a run directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from semiseg.data.classes import IGNORE_INDEX
from semiseg.data.splits import Splits
from semiseg.data.types import DataSource
from semiseg.errors import ConfigError, DataError, OutputError

MB = 1 << 20


def check_split_masks(source: DataSource, splits: Splits, where: str) -> None:
    """Every stem of a split exists, labeled / val / test stems have masks (unlabeled need none), and there are
    labeled and validation images (a missing test.txt is a run without a test score)."""
    by_stem = source.by_stem()
    for name in ("labeled", "unlabeled", "val", "test"):
        stems = getattr(splits, name)
        unknown = [s for s in stems if s not in by_stem]
        if unknown:
            with_ext = [s for s in unknown if Path(s).stem in by_stem]
            hint = f" ({', '.join(with_ext[:3])}: list stems without the file extension)" if with_ext else ""
            raise DataError(f"{where}/{name}.txt: {len(unknown)} stem(s) not in the data: "
                            f"{', '.join(map(repr, unknown[:5]))}{hint}")
        if name != "unlabeled":
            no_mask = [s for s in stems if by_stem[s].mask is None]
            if no_mask:
                raise DataError(f"{where}/{name}.txt: {len(no_mask)} stem(s) have no mask ("
                                f"{', '.join(map(repr, no_mask[:5]))}); only unlabeled.txt may list them")
    if not splits.labeled:
        raise DataError(f"{where}/labeled.txt: no labeled images")
    if not splits.val:
        raise DataError(f"{where}/val.txt: missing or empty: a run needs validation images (they choose its best "
                        "checkpoint); list some there")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out_dir: Path, need_bytes: int) -> None:
    """``out_dir`` can be created and written, and has room for about ``need_bytes`` (one checkpoint)."""
    base = check_output_folder(out_dir)
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise OutputError(f"out_dir={out_dir}: {free / MB:.0f} MB free on its disk, a checkpoint of this model "
                          f"needs about {need_bytes / MB:.0f} MB; free space or choose another out_dir")


def check_output_folder(out_dir: Path) -> Path:
    """``out_dir`` can be created and written; returns its nearest existing folder."""
    base = _existing_ancestor(Path(out_dir))
    if not base.is_dir():
        raise OutputError(f"out_dir={out_dir}: {base} is a file, not a folder")
    try:  # a real write, not os.access: root passes access() on read-only bind mounts too
        fd, probe = tempfile.mkstemp(prefix=".semiseg-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"out_dir={out_dir}: cannot write in {base} ({err.strerror}); choose another "
                          "folder with --set out_dir=...") from None
    return base


def checkpoint_bytes(model: object) -> int:
    """Rough size of one full-state checkpoint: weights plus two optimizer moments (Adam), plus the best
    weights, plus a margin."""
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # type: ignore[attr-defined]
    return 4 * params + 4 * MB


def check_writable_file(path: Path, option: str) -> None:
    """``path`` can be written (its folder exists and takes files), checked before any long work."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: folder {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise OutputError(f"{option} {path}: cannot write there ({err.strerror})") from None


def preflight_run(ctx: Any, log: Callable[[str], None]) -> None:
    """Everything a fresh run (a :class:`~semiseg.pipeline.context.RunContext`) can fail on before it trains,
    checked before its directory appears: every mask with a label is decoded (values outside the class table
    name their files), masks void everywhere are named (:func:`check_void_masks`), the model is built
    (architecture, encoder, ``model.weights``), the batch fits the device's memory (:func:`check_batch_memory`)
    and ``out_dir`` is writable with room for a checkpoint."""
    from semiseg.models.factory import build_model

    for split in ("labeled", "val", "test"):
        if getattr(ctx.splits, split):
            check_void_masks(split, ctx.arrays(split), ctx.source, log)
    model = build_model(ctx.config.model, ctx.classes.num_classes)
    check_output_dir(ctx.run_dir.parent, checkpoint_bytes(model))
    check_batch_memory(ctx.config, model, ctx.device)  # last: it moves the model to the meta device


def check_void_masks(split: str, arrays: Any, source: DataSource, log: Callable[[str], None]) -> None:
    """An image whose mask is void (255) everywhere has nothing to learn from and no score: a split made only of
    such images is a DataError naming a mask; some of them are a warning naming them (they are left out of every
    score and counted in the results)."""
    void = void_stems(arrays)
    if not void:
        return
    by_stem = source.by_stem()
    named = ", ".join(str(by_stem[s].mask) for s in void[:3]) + (f", ... ({len(void)} in all)" if len(void) > 3 else "")
    use = "to learn from" if split == "labeled" else "to score"
    if len(void) == len(arrays.stems):
        raise DataError(f"{split}: every mask is void ({IGNORE_INDEX}) everywhere ({named}): nothing {use}; fix "
                        f"the masks or put labeled images in the {split} split")
    log(f"warning: {split}: {len(void)} mask(s) void ({IGNORE_INDEX}) everywhere, nothing {use}: {named}"
        + ("" if split == "labeled" else "; left out of the scores and counted (n_void_images)"))


def void_stems(arrays: Any) -> list[str]:
    """Stems of decoded arrays whose mask is void everywhere (no pixel to learn from or to score)."""
    return [stem for stem, mask in zip(arrays.stems, arrays.masks, strict=True) if bool((mask == IGNORE_INDEX).all())]


def void_warning(split: str, stems: list[str]) -> str | None:
    """The results' warning about images of ``split`` left out of its scores because their mask is all void."""
    if not stems:
        return None
    shown = ", ".join(stems[:5]) + (f", ... ({len(stems)} in all)" if len(stems) > 5 else "")
    return (f"{split}: {len(stems)} image(s) whose mask is void ({IGNORE_INDEX}) everywhere have no score and are "
            f"left out of the {split} scores: {shown}")


def available_memory(device: Any) -> int | None:
    """Bytes a training step can still allocate on ``device`` (None where that cannot be told)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_batch_memory(config: Any, model: Any, device: Any) -> None:
    """A batch size the device cannot hold fails here, naming ``train.batch_size`` and the memory it would need,
    not in an allocator traceback. The need is a lower bound: the activations one forward pass keeps per image
    (measured on one image at ``data.size``, on the meta device: no memory, no compute; ``model`` ends there),
    times the batch."""
    import torch

    free = available_memory(device)
    if free is None:
        return
    kept = [0]

    def count(_module: Any, _inputs: Any, output: Any) -> None:
        kept[0] += sum(t.numel() * 4 for t in (output if isinstance(output, tuple | list) else [output])
                       if torch.is_tensor(t))

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.to("meta").eval()(torch.zeros(1, 3, *config.data.size, device="meta"))
    except Exception:  # noqa: BLE001 - an estimate only: a model the meta device cannot run is not checked here
        return
    finally:
        for hook in hooks:
            hook.remove()
    need = kept[0] * config.train.batch_size
    if need > free:
        h, w = config.data.size
        raise ConfigError(f"train.batch_size={config.train.batch_size}: a training step needs at least "
                          f"{need / 2**30:.1f} GB ({kept[0] / MB:.1f} MB of activations per {h}x{w} image) and "
                          f"{device} has {free / 2**30:.1f} GB available; lower train.batch_size (or data.size)")
