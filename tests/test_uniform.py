"""fm.ops.uniform: the counter-based Philox stream, bit-identical on every backend."""

import math
import os

import pytest
import torch

import fastmask as fm
from fastmask import ref

from conftest import device_backend_params

SEEDS_OFFSETS = [(0, 0), (123456789, 5), (2**40 + 7, 2**33 - 3), (2**62 + 11, 2**45)]


# Known values (checked against triton 3.8's tl.rand4x / tl.rand under the interpreter when written): they pin both
# definitions, so a refactor of the reference cannot silently change every mask ever saved.
def test_reference_pins_the_noise_definitions():
    # NOISE: position p is word p % 4 of counter p // 4, so positions 0-3 are tl.rand4x(0, 0) and 4 starts counter 1
    u = ref.uniform_ref((5,), seed=0, offset=0)
    torch.testing.assert_close(u, torch.tensor([0.7981, 0.2390, 0.5286, 0.7890, 0.0555]), atol=5e-5, rtol=0)
    assert ref.uniform_ref((1,), seed=123456789, offset=5).item() == pytest.approx(0.0088, abs=5e-5)
    # the definition of mask files before fastmask 0.2: tl.rand(seed, p), the first word of counter p
    old = ref.uniform_ref((3,), seed=0, offset=0, noise=ref.NOISE_FIRST_WORD)
    torch.testing.assert_close(old, torch.tensor([0.7981, 0.0555, 0.0389]), atol=5e-5, rtol=0)
    assert ref.uniform_ref((1,), 123456789, 5, noise=ref.NOISE_FIRST_WORD).item() == pytest.approx(0.4614, abs=5e-5)
    with pytest.raises(ValueError, match="noise must be one of"):
        ref.uniform_ref((3,), 0, 0, noise="philox")


@pytest.mark.parametrize("seed,offset", SEEDS_OFFSETS)
def test_reference_is_tritons_rand4x_and_rand(seed, offset):
    """The reference's two definitions against Triton's own tl.rand4x / tl.rand (the interpreter runs on CPU)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
        pytest.skip("Triton runs on CPU only under TRITON_INTERPRET=1")

    @triton.jit
    def draw(out4_ptr, out1_ptr, seed, first_counter, N: tl.constexpr):
        counters = first_counter + tl.arange(0, N).to(tl.int64)
        u0, u1, u2, u3 = tl.rand4x(seed, counters)
        i = tl.arange(0, N)
        tl.store(out4_ptr + 4 * i, u0)
        tl.store(out4_ptr + 4 * i + 1, u1)
        tl.store(out4_ptr + 4 * i + 2, u2)
        tl.store(out4_ptr + 4 * i + 3, u3)
        tl.store(out1_ptr + i, tl.rand(seed, counters))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, first = 16, offset // 4
    out4 = torch.empty(4 * n, device=device)
    out1 = torch.empty(n, device=device)
    draw[(1,)](out4, out1, seed, first, N=n)
    assert torch.equal(out4.cpu(), ref.uniform_ref((4 * n,), seed, 4 * first))
    assert torch.equal(out1.cpu(), ref.uniform_ref((n,), seed, first, noise=ref.NOISE_FIRST_WORD))


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
