"""The installed extension: import, build flags, registration."""

import pytest
import torch

import vlcore


def test_import_and_flags():
    assert isinstance(vlcore.WITH_CUDA, bool)
    assert vlcore.cuda_available() == vlcore.WITH_CUDA


@pytest.mark.parametrize("op", ["seq_pack", "seq_unpack", "scatter_image_embeds", "scatter_image_embeds_backward"])
def test_ops_registered(op):
    assert hasattr(torch.ops.vlcore, op)


@pytest.mark.skipif(vlcore.WITH_CUDA or not torch.cuda.is_available(), reason="needs a CPU-only build on a GPU machine")
def test_cuda_tensor_in_cpu_only_build_raises_clear_error():
    x = torch.zeros(2, 3, 4, device="cuda")
    cu = torch.tensor([0, 1, 3], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        vlcore.ops.pack(x, cu, 3)
