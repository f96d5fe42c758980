"""A model that did not come from the genai builder: torch.onnx.export of nn.Linear (+bias) layers."""

import pytest
import torch
from onnx_helpers import check_numerics, load_onnx, nodes_of

from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file


class Block(torch.nn.Module):
    """A tiny attention + MLP block built from nn.Linear layers with biases."""

    def __init__(self, d=64, hidden=96):
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)
        self.up = torch.nn.Linear(d, hidden)
        self.down = torch.nn.Linear(hidden, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
        x = x + self.out(att)
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("fuse_bias", [False, True])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_linear_layers_quantize_and_run(tmp_path, fuse_bias, dynamo):
    torch.manual_seed(0)
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    x = torch.randn(2, 5, 64)
    torch.onnx.export(
        Block().eval(), (x,), str(src), input_names=["x"], output_names=["y"], dynamo=dynamo, opset_version=18
    )
    out = quantize_file(src, tmp_path / "out", QuantizeOptions(fuse_bias=fuse_bias), progress=False)
    model = load_onnx(out)
    assert len(nodes_of(model, "MatMulNBits")) == 4
    assert not nodes_of(model, "Gemm") and len(nodes_of(model, "MatMul")) == 2  # only the attention products remain
    check_numerics(out, {"x": x.numpy()}, load_onnx(src))
    assert [o.name for o in model.graph.output] == ["y"]
