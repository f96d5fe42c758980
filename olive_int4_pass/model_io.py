"""Model files in and out: load lazily after checking the external data, save atomically with a progress bar.

Loading never reads the weights (they stay memory-mapped in the input's data file); saving computes the lazy
quantized tensors as they are written, two writers at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import onnx_ir as ir

from olive_int4_pass.genai.files import DATA_NAME, MODEL_NAME, describe_os_error, publish, staged

logger = logging.getLogger(__name__)

_PROTOBUF_LIMIT = 2**31 - 1
_SAVE_WORKERS = 2


class InvalidModelError(ValueError):
    """The input is not a model we can quantize (missing, not ONNX, broken external data, bad weights)."""


class OutputError(ValueError):
    """The output cannot be written (a full disk, no permission, a file where a folder should be). A ValueError so
    that Olive fails the run instead of logging it and exiting 0."""


def load_checked(path: Path) -> ir.Model:
    """Load an ONNX model without reading its external data, after checking that data is all there."""
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass
        raise InvalidModelError(f"{path} is not a readable ONNX model: {e}") from e
    if len(model.graph) == 0 and not model.graph.outputs:
        raise InvalidModelError(f"{path} holds no ONNX graph")
    _check_external_data(model, path.parent)
    return model


def save_atomically(
    model: ir.Model,
    output_dir: Path,
    *,
    model_name: str = MODEL_NAME,
    external_data_name: str | None = DATA_NAME,
    size_threshold: int = 1024,
    progress: bool | None = None,
    before_publish: Callable[[Path], None] | None = None,
    replaces: Iterable[str] = (),
) -> Path:
    """Save ``model`` into ``output_dir`` so that an interrupted run leaves nothing half-written there.

    ``before_publish(folder)`` may add files (e.g. a report) to the temporary folder before it is published. The
    files named in ``replaces`` (an earlier run's report and data, see :func:`external_locations`) are removed
    from ``output_dir`` when this set does not bring them: the folder holds one run's set, never a mix.
    Failing to write (a full disk, no permission, a file in the way) raises :class:`OutputError`.
    """
    if external_data_name is None and _initializer_bytes(model) > _PROTOBUF_LIMIT // 2:
        logger.info("Model too large for a single protobuf file; saving weights to %s", DATA_NAME)
        external_data_name = DATA_NAME
    try:
        with staged(output_dir) as tmp:
            try:
                _save(model, tmp / model_name, external_data_name, size_threshold, progress)
            except Exception as e:
                # Packed weights are computed during the save, so a bad weight surfaces here wrapped by onnx_ir
                # (SerdeError): re-raise our own typed error so callers (and Olive) see it as such.
                cause = _typed_cause(e)
                if cause is None or cause is e:
                    raise
                raise type(cause)(str(cause)) from e
            if before_publish is not None:
                before_publish(tmp)
            publish(tmp, output_dir, last=model_name, replaces=replaces)
    except OSError as e:
        raise OutputError(f"cannot write the output to {output_dir}: {describe_os_error(e)}") from e
    return output_dir / model_name


def external_locations(model_file: Path) -> set[str]:
    """The external data files an existing model in the output folder points at (plain names only)."""
    if not model_file.is_file():
        return set()
    try:
        model = ir.load(model_file)
    except Exception:  # not a model we wrote: leave its neighbours alone
        return set()
    return {
        t.location
        for t in initializer_tensors(model)
        if isinstance(t, ir.ExternalTensor) and Path(t.location).name == t.location
    }


def _save(model: ir.Model, path: Path, external_data_name: str | None, size_threshold: int, progress) -> None:
    with _progress_bar(model, progress) as callback:
        if external_data_name:
            # Two writers: one tensor is quantized while the previous one is written (or the embedding copied).
            ir.save(
                model,
                path,
                external_data=external_data_name,
                size_threshold_bytes=size_threshold,
                callback=callback,
                max_workers=_SAVE_WORKERS,
            )
        else:
            # One file: the float tensors still read from the input's data file are loaded into the model too
            # (left as they are, they would point at a data file this output does not have).
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is not None:
                    callback(tensor, None)
                    if isinstance(tensor, ir.ExternalTensor):
                        value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)
            ir.save(model, path)


def _typed_cause(error: BaseException) -> BaseException | None:
    while error is not None:
        if isinstance(error, (ValueError, TypeError)):
            return error
        error = error.__cause__ or error.__context__
    return None


def resolve_input(path: Path) -> Path:
    if not path.exists():
        raise InvalidModelError(f"input model {path} does not exist")
    if path.is_dir():
        candidates = sorted(path.glob("*.onnx"))
        if len(candidates) != 1:
            raise InvalidModelError(f"{path} must hold exactly one .onnx file, found {len(candidates)}")
        path = candidates[0]
    return path


def _check_external_data(model: ir.Model, base_dir: Path) -> None:
    for tensor in initializer_tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        data_path = Path(tensor.base_dir or base_dir) / tensor.location
        if not data_path.is_file():
            raise InvalidModelError(f"external data file {data_path} of tensor {tensor.name!r} is missing")
        size = data_path.stat().st_size
        if tensor.length is not None and tensor.length < tensor.nbytes:
            raise InvalidModelError(
                f"external data of tensor {tensor.name!r} in {data_path} is {tensor.length} bytes long, but its shape"
                f" and dtype need {tensor.nbytes}"
            )
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if size < end:
            raise InvalidModelError(
                f"external data file {data_path} is truncated: tensor {tensor.name!r} needs bytes up to {end}, "
                f"the file has {size}"
            )


def refuse_overwriting_input(input_path: Path, output_dir: Path, model_name: str, data_name: str | None) -> None:
    inputs = {input_path.resolve(), *(p.resolve() for p in input_path.parent.glob("*.data"))}
    targets = {(output_dir / model_name).resolve()} | ({(output_dir / data_name).resolve()} if data_name else set())
    clash = inputs & targets
    if clash:
        raise InvalidModelError(f"output would overwrite the input file(s) {sorted(map(str, clash))}")


def initializer_tensors(model: ir.Model):
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            yield value.const_value


def _initializer_bytes(model: ir.Model) -> int:
    return sum(t.nbytes for t in initializer_tensors(model))


class _progress_bar:
    """A tqdm bar over the bytes written by ``ir.save`` (packed weights are computed during the save)."""

    def __init__(self, model: ir.Model, enabled: bool | None) -> None:
        from tqdm.auto import tqdm

        disable = (not enabled) if enabled is not None else None  # None: only on a terminal
        self._bar = tqdm(
            total=_initializer_bytes(model), unit="B", unit_scale=True, desc="quantize+write", disable=disable
        )
        self._last: ir.TensorProtocol | None = None

    def __enter__(self):
        return self._callback

    def _callback(self, tensor: ir.TensorProtocol, _info) -> None:
        # Called before each tensor is written: account for the previous one.
        if self._last is not None:
            self._bar.update(self._last.nbytes)
        self._last = tensor
        self._bar.set_postfix_str(str(tensor.name)[-40:], refresh=False)

    def __exit__(self, *exc) -> None:
        if self._last is not None and exc[0] is None:
            self._bar.update(self._last.nbytes)
        self._bar.close()
