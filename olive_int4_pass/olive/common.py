"""What every pass of ours declares alike."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from olive.passes.pass_config import PassConfigParam

from olive_int4_pass import __version__
from olive_int4_pass.genai.files import describe_os_error


def plugin_version_param() -> PassConfigParam:
    """``plugin_version``: part of Olive's cache key (pass type + config + input), so that an upgrade of this package
    never reuses outputs an older release cached."""
    return PassConfigParam(
        type_=str,
        default_value=__version__,
        description="Version of olive-int4-pass. Part of Olive's cache key, so an upgrade never reuses outputs cached"
        " by an older release. Leave as is.",
    )


class PassFailedError(ValueError):
    """A pass of ours failed. A ValueError on purpose: Olive 0.13 logs any other exception (RuntimeError, OSError,
    the tokenizers library's plain Exception, onnxruntime's Fail) as a failed pass and exits 0 with "No output model
    produced"; Assertion/Attribute/Import/Type/ValueError end the run with a non-zero exit."""


_Run = TypeVar("_Run", bound=Callable)


def fails_loudly(run: _Run) -> _Run:
    """Decorate a pass's ``_run_for_config`` so every failure ends ``olive run`` with a non-zero exit, and says why."""

    @functools.wraps(run)
    def wrapper(self, *args, **kwargs):
        try:
            return run(self, *args, **kwargs)
        except (AssertionError, AttributeError, ImportError, TypeError, ValueError):
            raise
        except OSError as e:
            raise PassFailedError(f"{type(self).__name__}: {describe_os_error(e)}") from e
        except Exception as e:
            raise PassFailedError(f"{type(self).__name__} failed: {type(e).__name__}: {e}") from e

    return wrapper  # type: ignore[return-value]
