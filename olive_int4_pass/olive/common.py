"""What every pass of ours declares alike."""

from __future__ import annotations

from olive.passes.pass_config import PassConfigParam

from olive_int4_pass import __version__


def plugin_version_param() -> PassConfigParam:
    """``plugin_version``: part of Olive's cache key (pass type + config + input), so that an upgrade of this package
    never reuses outputs an older release cached."""
    return PassConfigParam(
        type_=str,
        default_value=__version__,
        description="Version of olive-int4-pass. Part of Olive's cache key, so an upgrade never reuses outputs cached"
        " by an older release. Leave as is.",
    )
