"""Block-32 INT4 round-to-nearest quantization of ONNX MatMuls to ``com.microsoft::MatMulNBits``, as Olive passes.

Kept import-light on purpose: the start-up hook (``olive_int4_pass.pth``) imports this package in every Python
process, so nothing heavy (numpy, onnx, olive, torch) is imported here.
"""

__version__ = "0.1.0"


def register() -> None:
    """Make Olive resolve this package's pass types (done automatically by the installed start-up hook)."""
    from olive_int4_pass.olive.registration import install

    install()
