"""fm.ops.uniform: the counter-based Philox stream, bit-identical on every backend."""

import math

import pytest
import torch

import fastmask as fm
from fastmask import ref

from conftest import device_backend_params

SEEDS_OFFSETS = [(0, 0), (123456789, 5), (2**40 + 7, 2**33 - 3), (2**62 + 11, 2**45)]


# Known values of Triton's tl.rand (checked against triton 3.8's tl.rand under the interpreter when written):
# they pin the definition, so a refactor of the reference cannot silently change every mask ever saved.
def test_reference_pins_triton_rand_values():
    u = ref.uniform_ref((3,), seed=0, offset=0)
    expected = torch.tensor([0.7981, 0.0555, 0.0389])
    torch.testing.assert_close(u, expected, atol=5e-5, rtol=0)
    assert ref.uniform_ref((1,), seed=123456789, offset=5).item() == pytest.approx(0.4614, abs=5e-5)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 1, 37)])
def test_uniform_bits_equal_reference(device, backend, seed, offset, shape):
    fm.set_backend(backend)
    u = fm.ops.uniform(shape, seed=seed, offset=offset, device=device)
    expected = ref.uniform_ref(shape, seed, offset)
    assert u.dtype == torch.float32 and u.shape == shape and u.device.type == device
    assert torch.equal(u.cpu(), expected), "noise must be bit-identical to the reference"


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_offset_advances_the_stream(device, backend):
    fm.set_backend(backend)
    whole = fm.ops.uniform((100,), seed=9, offset=1000, device=device)
    tail = fm.ops.uniform((60,), seed=9, offset=1040, device=device)
    assert torch.equal(whole[40:], tail)
    assert not torch.equal(whole, fm.ops.uniform((100,), seed=10, offset=1000, device=device))


def test_uniform_distribution():
    """Kolmogorov-Smirnov against U[0, 1) and the range guarantee, on 200k draws."""
    n = 200_000
    u = fm.ops.uniform((n,), seed=2024, offset=7)
    assert u.min().item() >= 0.0 and u.max().item() < 1.0
    sorted_u, _ = torch.sort(u.double())
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((grid - sorted_u).abs(), (sorted_u - (grid - 1 / n)).abs()).max().item()
    # 99.9% critical value of the KS statistic: 1.95 / sqrt(n).
    assert ks < 1.95 / math.sqrt(n), f"KS statistic {ks:.5f}"
    # Adjacent counters are independent: lag-1 correlation within binomial noise.
    corr = torch.corrcoef(torch.stack([u[:-1], u[1:]]).double())[0, 1].item()
    assert abs(corr) < 4 / math.sqrt(n)


def test_uniform_bad_input():
    with pytest.raises(ValueError, match="seed"):
        fm.ops.uniform((3,), seed=-1)
    with pytest.raises(ValueError, match="offset"):
        fm.ops.uniform((3,), seed=0, offset=2**63)
    with pytest.raises(TypeError, match="seed"):
        fm.ops.uniform((3,), seed=1.5)
    with pytest.raises(ValueError, match="shape"):
        fm.ops.uniform((3, -1))


def test_uniform_opcheck():
    torch.library.opcheck(torch.ops.fastmask.uniform.default, ([4, 5], 3, 11, torch.device("cpu")))
