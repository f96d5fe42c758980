"""The files of an onnxruntime-genai package folder: their names, genai_config.json read with typed accessors, and
publishing a folder's files so that a reader never sees them half-written. Standard library only.

Publishing goes through a staging folder beside the target, on the same file system, so that the final moves are
``os.replace`` renames::

    with staged(output_dir) as tmp:                 # .{output_dir.name}.XXXX.tmp beside output_dir
        write_everything_into(tmp)
        publish(tmp, output_dir)                    # data and side files first, model.onnx last
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
HF_CONFIG = "config.json"
# What a published package folder (e.g. Microsoft's cpu-int4-rtn-block-32-acc-level-4/) holds, exactly.
PACKAGE_FILES = (GENAI_CONFIG, MODEL_NAME, DATA_NAME, SPECIAL_TOKENS_MAP, TOKENIZER, TOKENIZER_CONFIG)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON file as a dict, with a ValueError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


class GenAIConfig:
    """A package's genai_config.json; each accessor raises ValueError naming the file when its entry is unusable."""

    def __init__(self, path: str | os.PathLike, data: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data = data

    @classmethod
    def read(cls, location: str | os.PathLike) -> GenAIConfig:
        """The genai_config.json of a package folder, or that file itself."""
        path = Path(location)
        path = path / GENAI_CONFIG if path.is_dir() else path
        return cls(path, read_json(path))

    @property
    def model(self) -> dict:
        return self._section(self.data, "model", "model")

    @property
    def decoder(self) -> dict:
        """The ``model.decoder`` section: the decoder file, its inputs/outputs, KV heads, session options."""
        return self._section(self.model, "decoder", "model.decoder")

    @property
    def decoder_filename(self) -> str:
        name = self.decoder.get("filename")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.path}: model.decoder.filename is missing or not a file name ({name!r})")
        return name

    @property
    def decoder_path(self) -> Path:
        """The decoder's ONNX file, beside genai_config.json."""
        return self.path.parent / self.decoder_filename

    @property
    def head_size(self) -> int:
        return self._positive_int(self.decoder, "head_size", "model.decoder.head_size")

    @property
    def num_key_value_heads(self) -> int:
        return self._positive_int(self.decoder, "num_key_value_heads", "model.decoder.num_key_value_heads")

    @property
    def vocab_size(self) -> int:
        return self._positive_int(self.model, "vocab_size", "model.vocab_size")

    @property
    def context_length(self) -> int | None:
        """``model.context_length``; None when absent (or 0)."""
        if not self.model.get("context_length"):
            return None
        return self._positive_int(self.model, "context_length", "model.context_length")

    @property
    def providers(self) -> list[str]:
        """Execution providers the decoder's session options ask for (empty: CPU)."""
        session = self.decoder.get("session_options") or {}
        entries = (session.get("provider_options") or []) if isinstance(session, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{self.path}: model.decoder.session_options.provider_options is not a list of objects")
        return [name for entry in entries for name in entry]

    def _section(self, parent: dict, key: str, where: str) -> dict:
        value = parent.get(key)
        if not isinstance(value, dict):
            raise ValueError(f"{self.path} is not an onnxruntime-genai config: it has no {where} section")
        return value

    def _positive_int(self, section: dict, key: str, where: str) -> int:
        value = section.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{self.path}: {where} is missing or not a positive integer ({value!r})")
        return value


@contextlib.contextmanager
def staged(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh, empty staging folder ``.{target.name}.{pid}.XXXX.tmp`` beside ``target``, removed on exit with whatever
    is still in it (so an exception leaves nothing behind).

    Write the output into it, then move it into place with :func:`publish` (files into a folder) or
    :func:`publish_folder` (a whole folder). Being beside the target, the staging folder is on the target's file
    system, so those moves are atomic renames. Parent folders created for it are removed again if left empty.
    Staging folders that a killed run (SIGKILL, a power cut) left beside ``target`` are removed first: the process
    id in their name tells whether their run is still going.
    """
    target = Path(target)
    missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # innermost first
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for parent in missing:
            try:
                parent.rmdir()
            except OSError:  # not empty: something was published into it
                break


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove the staging folders beside ``target`` whose process is gone; return them."""
    target = Path(target)
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = path.name[len(target.name) + 2 :].split(".", 1)[0]
        if path.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (run by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, run by someone else
        return True
    return True


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on ``folder`` (created if needed) for as long as the block runs: two runs publishing into
    one folder take turns, so a model never lands beside another run's data. A no-op where ``fcntl`` is missing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def publish(
    staged_folder: str | os.PathLike,
    target: str | os.PathLike,
    *,
    last: str = MODEL_NAME,
    replaces: Iterable[str] = (),
) -> None:
    """Move every file and folder of ``staged_folder`` into the folder ``target`` (created if needed), replacing
    entries of the same name; the entry named ``last`` moves last. Entries named in ``replaces`` that the new set
    does not bring (an earlier run's data file or report) are removed after it, so the folder holds one whole set.
    Other entries of ``target`` are left alone. The folder is locked meanwhile (see :func:`locked`).

    With the graph file last (the default, ``model.onnx``), a reader that finds the graph finds its external data
    and side files complete. ``staged_folder`` must be on ``target``'s file system (see :func:`staged`).
    """
    staged_folder, target = Path(staged_folder), Path(target)
    names = sorted(os.listdir(staged_folder), key=lambda n: n == last)
    with locked(target):
        for name in names:
            os.replace(staged_folder / name, target / name)
        for name in set(replaces) - set(names):
            stale = target / name
            if stale.is_file() or stale.is_symlink():
                stale.unlink()


def publish_folder(staged_folder: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the folder ``staged_folder`` at ``target`` whole: a previous ``target`` is swapped out and deleted, so
    readers see the old folder or the new one, never a mix. ``staged_folder`` must be on ``target``'s file system.
    """
    staged_folder, target = Path(staged_folder), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.replace(staged_folder, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.replace(target, trash / target.name)
        try:
            os.replace(staged_folder, target)
        except OSError:
            os.replace(trash / target.name, target)  # put the previous folder back
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link ``src`` as ``dst`` (model files are large), or copy it where links fail (another file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def describe_os_error(error: OSError) -> str:
    """``error`` in words that name the file and the cause (a full disk says so)."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"no space left on the device{where}"
    return f"{error.strerror or error}{where}"
