import os
import subprocess
import sys
import tempfile

import numpy as np

from olive_int4_pass.kernels.scale_search import SearchResult
from olive_int4_pass.plan.activation_store import ActivationStore
from olive_int4_pass.plan.search_store import SearchStore


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_runs_activations_are_removed_by_the_next_run(tmp_path):
    stale = tmp_path / f"olive-int4-activations-{dead_pid()}-abc"
    (stale / "sub").mkdir(parents=True)
    (stale / "0.f32").write_bytes(b"\0" * 64)
    live = tmp_path / f"olive-int4-activations-{os.getppid()}-def"  # a process that is running
    live.mkdir()
    other = tmp_path / "olive-int4-activations-old"  # no process id: not ours to judge
    other.mkdir()
    unrelated = tmp_path / f"something-{dead_pid()}-x"
    unrelated.mkdir()

    store = ActivationStore({"x": 4}, directory=tmp_path)
    assert not stale.exists()
    assert live.is_dir() and other.is_dir() and unrelated.is_dir()
    assert store.folder.name.startswith(f"olive-int4-activations-{os.getpid()}-")
    store.add("x", np.ones((2, 4), np.float32))
    assert store.tokens("x") == 2

    ActivationStore({"x": 4}, directory=tmp_path).close()  # the running process's own store stays
    assert store.folder.is_dir()
    store.close()
    assert not store.folder.exists()


def test_a_killed_runs_searched_scales_are_removed_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"olive-int4-searches-{dead_pid()}-abc"
    stale.mkdir()
    store = SearchStore()
    store["w"] = SearchResult(np.ones((2, 1), np.float16), None, 1.0, 2.0, 3.0)
    assert not stale.exists()
    assert store.get("w").scales.shape == (2, 1)
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_a_killed_child_leaves_nothing_after_the_next_store(tmp_path):
    # A child that keeps calibration inputs and is killed (SIGKILL: no cleanup runs) leaves its folder ...
    code = (
        "import os, sys, numpy as np\n"
        "from olive_int4_pass.plan.activation_store import ActivationStore\n"
        f"s = ActivationStore({{'x': 8}}, directory={str(tmp_path)!r})\n"
        "s.add('x', np.ones((4, 8), np.float32))\n"
        "print(s.folder, flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    folder = child.stdout.readline().strip()
    child.kill()
    child.wait()
    assert os.path.isdir(folder)
    # ... which the next run removes.
    ActivationStore({"x": 8}, directory=tmp_path).close()
    assert not os.path.exists(folder)
