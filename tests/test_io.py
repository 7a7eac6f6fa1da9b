import os

import pytest
import torch

from norton.io import atomic_save, atomic_write_text


def test_atomic_save_round_trips_and_leaves_no_temporary_files(tmp_path):
    path = atomic_save({"w": torch.arange(3)}, tmp_path / "sub" / "ckpt.pt")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]


def test_files_get_the_umask_default_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write_text("hello\n", tmp_path / "a.txt")
    finally:
        os.umask(umask)
    assert path.read_text() == "hello\n"
    assert (path.stat().st_mode & 0o777) == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_save({"epoch": 1}, tmp_path / "ckpt.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_save({"epoch": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
