"""semiseg.atomic: the one atomic-write helper (temp file next to the target, fsync, rename, cleanup)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from semiseg.atomic import atomic_path, atomic_write_bytes, atomic_write_text, publish_directory
from semiseg.errors import OutputError


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "first\n")
    assert target.read_text(encoding="utf-8") == "first\n"
    atomic_write_bytes(target, "zwei – ü\r\n".encode())
    assert target.read_bytes() == "zwei – ü\r\n".encode()  # bytes as given, no newline translation
    atomic_write_text(target, "ü\n")
    assert target.read_bytes() == "ü\n".encode()
    assert _leftovers(target.parent, {"out.json"}) == []


def test_temp_path_is_hidden_next_to_target_with_its_suffix(tmp_path):
    target = tmp_path / "mask.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".mask.png.") and tmp.suffix == ".png"
        assert tmp.exists() and not target.exists()
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"
    assert not tmp.exists()
    assert _leftovers(tmp_path, {"mask.png"}) == []


def test_exception_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("boom")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"state.bin"}) == []


def test_keyboard_interrupt_also_cleans_up(tmp_path):
    target = tmp_path / "x.txt"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert _leftovers(tmp_path, set()) == []


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_mode_applied(tmp_path, mode):
    old = os.umask(0o077)  # the mode is set explicitly, not left to the umask
    try:
        atomic_write_bytes(tmp_path / "f", b"x", mode=mode)
        with atomic_path(tmp_path / "g.png", mode=mode) as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == mode
    assert (tmp_path / "g.png").stat().st_mode & 0o777 == mode


def test_no_mode_keeps_private_default(tmp_path):
    atomic_write_bytes(tmp_path / "f", b"x")
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES])
def test_output_errnos_become_output_error_naming_the_path(tmp_path, code):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(OutputError) as info, atomic_path(target) as tmp:
        tmp.write_text("new")
        raise OSError(code, os.strerror(code))
    assert str(info.value).startswith(f"{target}: cannot write (")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    if code == errno.ENOSPC:
        assert "no space left on the device" in str(info.value)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path, {"results.json"}) == []


def test_other_oserrors_pass_through(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "a") as tmp:
        tmp.write_text("x")
        raise FileNotFoundError(errno.ENOENT, "gone")
    assert _leftovers(tmp_path, set()) == []


def test_failed_rename_is_cleaned_up(tmp_path):
    target = tmp_path / "dir"
    (target / "inside").mkdir(parents=True)  # os.replace(file, non-empty dir) fails
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_text("x")
    assert _leftovers(tmp_path, {"dir"}) == []


def test_missing_folder_is_output_error(tmp_path):
    with pytest.raises(OutputError, match="nope"), atomic_path(tmp_path / "nope" / "f.txt"):
        pass


def test_on_error_sees_the_temp_file_and_translates(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    seen: list[tuple[BaseException, Path, bool, int]] = []

    def on_error(err: BaseException, tmp: Path) -> BaseException:
        seen.append((err, tmp, tmp.exists(), tmp.stat().st_size))
        return OSError(errno.ENOSPC, "full")

    with pytest.raises(OutputError, match="no space left"), atomic_path(target, on_error=on_error) as tmp:
        tmp.write_bytes(b"12345")
        raise RuntimeError("PytorchStreamWriter failed writing file")
    ((err, tmp_seen, existed, size),) = seen
    assert isinstance(err, RuntimeError) and tmp_seen == tmp and existed and size == 5
    assert not tmp.exists() and target.read_bytes() == b"old"


def test_on_error_can_return_its_own_error_or_keep_the_original(tmp_path):
    class Mine(Exception):
        pass

    with pytest.raises(Mine), atomic_path(tmp_path / "a", on_error=lambda err, tmp: Mine(str(err))):
        raise ValueError("x")
    original = ValueError("kept")
    with pytest.raises(ValueError) as info, atomic_path(tmp_path / "b", on_error=lambda err, tmp: err):
        raise original
    assert info.value is original
    assert _leftovers(tmp_path, set()) == []


def test_on_error_not_called_on_success(tmp_path):
    def on_error(err: BaseException, tmp: Path) -> BaseException:
        raise AssertionError("called")

    with atomic_path(tmp_path / "a", on_error=on_error) as tmp:
        tmp.write_text("ok")
    assert (tmp_path / "a").read_text() == "ok"


def test_module_imports_no_heavy_libraries():
    code = ("import sys, semiseg.atomic; "
            "print(sorted(m for m in ('torch', 'numpy', 'PIL', 'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"


# -- the sites built on it ------------------------------------------------------------------------------------


def test_pil_save_picks_the_format_from_the_suffix(tmp_path):
    from PIL import Image

    from semiseg.deploy.outputs import save_atomic

    save_atomic(Image.new("L", (4, 3)), tmp_path / "m.png")
    save_atomic(Image.new("RGB", (4, 3)), tmp_path / "o.jpg")
    assert Image.open(tmp_path / "m.png").format == "PNG" and Image.open(tmp_path / "o.jpg").format == "JPEG"
    assert (tmp_path / "m.png").stat().st_mode & 0o777 == 0o644
    assert _leftovers(tmp_path, {"m.png", "o.jpg"}) == []


def test_split_file_and_cache_file(tmp_path):
    from semiseg.atomic import atomic_write_bytes
    from semiseg.data.cache import CACHE_FILE_MODE
    from semiseg.data.sources import write_stem_list

    write_stem_list(tmp_path / "splits" / "train.txt", ["a", "ü"])
    assert (tmp_path / "splits" / "train.txt").read_bytes() == "a\nü\n".encode()
    atomic_write_bytes(tmp_path / "memo.json", b"{}", mode=CACHE_FILE_MODE)
    assert (tmp_path / "memo.json").stat().st_mode & 0o777 == 0o644


def test_checkpoint_full_disk_from_torch_keeps_its_message(tmp_path, monkeypatch):
    import torch

    from semiseg.engine import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, {"w": torch.zeros(2)})
    seen: list[bool] = []

    def full(folder: Path) -> bool:  # the check runs while the partial temporary file still exists
        seen.append(any(p.name.startswith(".last.pt.") for p in folder.iterdir()))
        return True

    def failing_save(obj, fh) -> None:
        fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpoint, "_nearly_full", full)
    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OutputError) as info:
        checkpoint.save_checkpoint(path, {"w": torch.ones(2)})
    assert str(info.value) == f"{path}: cannot write (no space left on the device) (the previous file is intact)"
    assert seen == [True] and _leftovers(tmp_path, {"last.pt"}) == []
    monkeypatch.undo()
    assert torch.equal(checkpoint.load_checkpoint(path)["w"], torch.zeros(2))


KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from semiseg.atomic import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"half a checkpoint")
    print(tmp, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up code runs
    sys.stdin.readline()  # a live writer, still writing
"""


def _writer(target: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(target), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_temporaries_of_killed_writers_are_removed_and_a_live_writers_kept(tmp_path):
    from semiseg.atomic import remove_stale_temporaries

    (tmp_path / "run" / "ckpt").mkdir(parents=True)
    killed, dead_tmp = _writer(tmp_path / "run" / "ckpt" / "last.pt", "kill")
    assert killed.wait() == -9 and dead_tmp.is_file()  # what a SIGKILL during a checkpoint write leaves
    live, live_tmp = _writer(tmp_path / "run" / "model.onnx", "live")
    other_host = tmp_path / "run" / ".model.onnx.w1h000000.abc.tmp.onnx"  # pid 1 of a host we cannot see
    other_host.write_bytes(b"x")
    try:
        assert remove_stale_temporaries(tmp_path / "run", recursive=False) == []  # not below the folder
        assert remove_stale_temporaries(tmp_path / "run") == [dead_tmp]
        assert not dead_tmp.exists() and live_tmp.is_file() and other_host.is_file()
    finally:
        live.stdin.write("\n")
        live.stdin.close()
        live.wait()
    assert (tmp_path / "run" / "model.onnx").read_bytes() == b"half a checkpoint"  # the live write completed


# --------------------------------------------------------------------------------- publishing a folder
def test_a_published_folder_appears_whole_and_replaces_the_old_one(tmp_path):
    final = tmp_path / "out" / "set"
    with publish_directory(final, mode=0o755) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".set.w") and not final.exists()
        (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "new" and oct(final.stat().st_mode & 0o777) == "0o755"
    with publish_directory(final) as tmp:
        (tmp / "b.txt").write_text("newer")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["set"]  # no temporaries or old copies left


def test_a_failed_folder_leaves_nothing_and_keeps_the_old_one(tmp_path):
    final = tmp_path / "set"
    final.mkdir()
    (final / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), publish_directory(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert (final / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["set"]


def test_without_replace_a_folder_another_writer_published_first_stays(tmp_path):
    final = tmp_path / "set"
    with pytest.raises(OSError), publish_directory(final, replace=False) as tmp:
        (tmp / "mine.txt").write_text("late")
        final.mkdir()
        (final / "theirs.txt").write_text("first")
    assert [p.name for p in final.iterdir()] == ["theirs.txt"] and [p.name for p in tmp_path.iterdir()] == ["set"]
