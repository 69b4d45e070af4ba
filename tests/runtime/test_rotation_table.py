"""RotationTable equals kernels/reference.rotate_keys to the rounding of the key dtype."""

import pytest
import torch

from kvloft.kernels import reference
from kvloft.runtime.rotation_table import RotationTable


def _inv_freq(d: int) -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,hkv,d,per_head,reach", [(7, 3, 10, True, 1_000_000), (33, 1, 64, False, 100_000),
                                                     (5, 5, 2, True, 1_000_000), (1, 2, 128, False, 70_000)])
def test_table_matches_rotate_keys(dtype, n, hkv, d, per_head, reach):
    g = torch.Generator().manual_seed(n * d + hkv)
    k = torch.randn(n, hkv, d, generator=g).to(dtype)
    shape = (hkv, n) if per_head else (n,)
    delta = torch.randint(-reach, reach + 1, shape, generator=g)
    delta.view(-1)[0] = 0 if n > 1 else -reach
    delta.view(-1)[-1] = -reach
    inv = _inv_freq(d)
    table = RotationTable(inv)
    got = table.rotate(k, delta)
    want = reference.rotate_keys(k, delta, inv)
    assert got.dtype == k.dtype and got.shape == k.shape
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=4 * eps, atol=4 * eps)
    assert table.rows > reach  # the table served it (no fallback)


def test_table_grows_and_falls_back_past_its_limit():
    inv = _inv_freq(8)
    k = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0))
    table = RotationTable(inv, max_bytes=2048 * 8 * 4)  # 2048 offsets
    small = torch.tensor([3, -5, 0, 900])
    torch.testing.assert_close(table.rotate(k, small), reference.rotate_keys(k, small, inv), rtol=0, atol=1e-6)
    assert 1024 <= table.rows <= 2048
    big = torch.tensor([3, -5, 0, 50_000])
    torch.testing.assert_close(table.rotate(k, big), reference.rotate_keys(k, big, inv), rtol=0, atol=0)
    assert table.rows <= 2048  # past the limit: rotate_keys, no growth
    with pytest.raises(ValueError):
        RotationTable(inv, max_bytes=-1)


def test_caller_bound_sizes_the_table_and_a_wrong_bound_fails():
    inv = _inv_freq(8)
    k = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(1))
    delta = torch.tensor([[7, -3000, 0], [2999, 1, -1]])
    table = RotationTable(inv)
    torch.testing.assert_close(table.rotate(k, delta, bound=3001), reference.rotate_keys(k, delta, inv), rtol=0, atol=0)
    small = RotationTable(inv)
    with pytest.raises(IndexError):
        small.rotate(k, delta, bound=100)  # rows up to 1024 < 3000: the lookup fails, no wrong row


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_on_cuda_matches_rotate_keys(dtype):
    dev = torch.device("cuda")
    inv = _inv_freq(64).to(dev)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2048, 2, 64, generator=g).to(dev, dtype)
    delta = torch.randint(-131_072, 131_073, (2, 2048), generator=g).to(dev)
    got = RotationTable(inv).rotate(k, delta, bound=131_073)
    want = reference.rotate_keys(k, delta, inv)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), want.float(), rtol=4 * eps, atol=4 * eps)
