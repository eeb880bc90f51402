"""Run inside a private mount namespace (see test_safety.py): a training run on a small tmpfs that fills up
after its first checkpoint, then a resume once space is freed. Exit 77 = cannot mount (the test skips)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.safety_helpers import TINY, make_folder, sets  # noqa: E402


def main(mnt: Path, out: Path) -> int:
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mnt)], capture_output=True,
                           text=True)
    if mount.returncode:
        print(f"cannot mount a tmpfs ({mount.stderr.strip()})")
        return 77
    from semiseg.api import load_config
    from semiseg.models.factory import build_model
    from semiseg.pipeline.preflight import checkpoint_bytes

    data = make_folder(out / "data")
    config = [*TINY, "model.encoder=mobilenet_v2", "train.steps=9", "train.eval_every=6", f"data.source={data}",
              "name=full", f"out_dir={mnt / 'runs'}"]
    model = build_model(load_config(None, config).model, 2)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # room for the preflight's estimate and the first last.pt (~3x weights), not for best.pt + a second last.pt
    free = (checkpoint_bytes(model) + 7 * weights) // 2
    filler = mnt / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * (os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize - free))
    train_code, train_err = run_cli(["train", *sets(*config)])
    filler.unlink()
    resume_code, resume_err = run_cli(["resume", str(mnt / "runs" / "full")])
    (out / "report.json").write_text(json.dumps({
        "train_code": train_code, "train_err": train_err, "resume_code": resume_code, "resume_err": resume_err,
        "finished": (mnt / "runs" / "full" / "results.json").is_file()}))
    return 0


def run_cli(args: list[str]) -> tuple[int, str]:
    """The CLI in this process (one interpreter start for the whole test); a traceback lands in stderr."""
    import contextlib
    import io
    import traceback

    from semiseg.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as done:
            return int(done.code or 0), err.getvalue()
        except BaseException:  # noqa: BLE001 - what a user would see
            traceback.print_exc()
            return 1, err.getvalue()
    return 0, err.getvalue()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
