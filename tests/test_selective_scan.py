"""Every fast scan path against the sequential oracle `selective_scan_ref`."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from models import selective_scan as scan_module
from models.scan_kernel_cpu import scan_kernel
from models.selective_scan import (read_out_states, resolve_backend, scan_states, selective_scan_chunked,
                                   selective_scan_cpu, selective_scan_ref)

needs_kernel = pytest.mark.skipif(scan_kernel() is None, reason="no C compiler here: the CPU kernel cannot be built")

SHAPES = [  # batch, groups (0 = ungrouped 3-D B/C), channels per group, d_state, length
    (1, 4, 8, 16, 200),
    (2, 0, 6, 4, 63),
    (3, 2, 5, 3, 1),
    (1, 1, 7, 16, 130),
]


def make_inputs(batch, groups, c, n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = max(groups, 1) * c
    bc = (batch, groups, n, length) if groups else (batch, n, length)
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) * 0.5,
        A=-torch.rand(dim, n, generator=g) * 3,
        B=torch.randn(*bc, generator=g),
        C=torch.randn(*bc, generator=g),
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, dim, length, generator=g),
        delta_bias=torch.randn(dim, generator=g) * 0.3,
    )


KERNEL_SHAPES = [  # the CPU kernel's: channel counts multiples of 8
    (1, 4, 8, 16, 200),
    (2, 0, 16, 4, 63),
    (3, 2, 8, 3, 1),
    (2, 4, 32, 8, 97),
]
FAST_SCANS = ([pytest.param(selective_scan_chunked, shape, 0, id=f"chunked-{shape}") for shape in SHAPES]
              + [pytest.param(selective_scan_cpu, shape, 7, id=f"cpu-{shape}", marks=needs_kernel)
                 for shape in KERNEL_SHAPES])


@pytest.mark.parametrize("scan, shape, seed", FAST_SCANS)
@pytest.mark.parametrize("options", [dict(delta_softplus=True), dict(delta_softplus=False, drop=("z", "D", "delta_bias"))])
def test_fast_scans_match_reference(scan, shape, seed, options):
    inputs = make_inputs(*shape, seed=seed)
    options = dict(options)
    for k in options.pop("drop", ()):
        inputs[k] = None
    if not options.get("delta_softplus"):
        inputs["delta"] = inputs["delta"].abs()  # Δ must be positive without the softplus
    ref = selective_scan_ref(**inputs, **options)
    fast = scan(**inputs, **options)
    assert fast.shape == ref.shape
    assert (fast - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("shape", [(2, 4, 3, 5, 150), (1, 0, 4, 2, 70)])
def test_chunked_gradients_match_reference(shape):
    inputs = {k: v.requires_grad_() for k, v in make_inputs(*shape, seed=1).items()}
    names = list(inputs)
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    fast = selective_scan_chunked(**inputs, delta_softplus=True)
    gout = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, [inputs[k] for k in names], gout)
    g_fast = torch.autograd.grad(fast, [inputs[k] for k in names], gout)
    for name, a, b in zip(names, g_ref, g_fast):
        scale = max(1.0, a.abs().max().item())
        assert (a - b).abs().max().item() <= 2e-5 * scale, name


@pytest.mark.parametrize("layout", ["time_major", "expanded_batch"])
def test_chunked_reads_any_strides(layout):
    """The model passes time-major views ((L, batch, D) memory) and, for the MSTD projection cache, one style
    expanded to the batch (stride 0); the result must not depend on strides, only on values."""
    inputs = make_inputs(3, 4, 5, 6, 90, seed=2)
    if layout == "time_major":
        for k in ("u", "delta", "z"):
            inputs[k] = inputs[k].permute(2, 0, 1).contiguous().permute(1, 2, 0)
        inputs["B"] = inputs["B"].permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    else:
        for k in ("u", "delta", "B"):
            inputs[k] = inputs[k][:1].expand_as(inputs[k])
    dense = {k: v.contiguous() for k, v in inputs.items()}
    ref = selective_scan_ref(**dense, delta_softplus=True)
    assert (selective_scan_chunked(**inputs, delta_softplus=True) - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())
    grads = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    g_fast = torch.autograd.grad(selective_scan_chunked(**grads, delta_softplus=True).sum(), list(grads.values()))
    dense = {k: v.detach().contiguous().requires_grad_() for k, v in inputs.items()}
    g_ref = torch.autograd.grad(selective_scan_ref(**dense, delta_softplus=True).sum(), list(dense.values()))
    for name, a, b in zip(grads, g_ref, g_fast):
        assert (a - b).abs().max() <= 2e-5 * max(1.0, a.abs().max()), name


def test_last_state_matches_reference():
    inputs = make_inputs(2, 4, 3, 5, 97)
    _, h_ref = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    _, h_fast = selective_scan_chunked(**inputs, delta_softplus=True, return_last_state=True)
    assert (h_ref - h_fast.reshape(h_ref.shape)).abs().max() <= 1e-5


def test_state_cache_readout_matches_reference():
    """The MSTD cache: states once, then y_t = <C_t, h_t> + D u_t for a batch of different C."""
    inputs = make_inputs(1, 4, 6, 16, 140)
    delta = F.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    states = scan_states(inputs["u"], delta, inputs["A"], inputs["B"])
    Cs = torch.randn(3, *inputs["C"].shape[1:], generator=torch.Generator().manual_seed(1))
    y = read_out_states(states, Cs, skip=inputs["u"] * inputs["D"][:, None])
    for i in range(3):
        ref = selective_scan_ref(inputs["u"], delta, inputs["A"], inputs["B"], Cs[i:i + 1], inputs["D"])
        assert (y[i:i + 1] - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_per_frame_states_readout_matches_reference():
    """read_out_states with one state sequence per frame (batch > 1 states), grouped and ungrouped."""
    for groups in (3, 0):
        inputs = make_inputs(2, groups, 5, 4, 37, seed=4)
        delta = F.softplus(inputs["delta"])
        states = scan_states(inputs["u"], delta, inputs["A"], inputs["B"])
        y = read_out_states(states, inputs["C"])
        assert (y - selective_scan_ref(inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"])).abs().max() <= 1e-5


def test_backend_choice():
    assert resolve_backend("auto", "cpu") == ("cpu" if scan_kernel() is not None else "chunked")
    assert resolve_backend("ref", "cpu") == "ref"
    with pytest.raises(ValueError, match="unknown scan backend"):
        resolve_backend("fastest", "cpu")


def test_bf16_autocast_cannot_downcast_inside_the_scans():
    """Inside a caller's bf16 autocast region every scan entry point computes exactly what it computes outside."""
    inputs = make_inputs(2, 4, 8, 16, 40, seed=5)
    delta = F.softplus(inputs["delta"])

    def run_all():
        states = scan_states(inputs["u"][:1], delta[:1], inputs["A"], inputs["B"][:1])
        return (selective_scan_chunked(**inputs, delta_softplus=True), selective_scan_ref(**inputs, delta_softplus=True),
                states, read_out_states(states, inputs["C"]))

    plain = run_all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        autocast = run_all()
    for name, a, b in zip(("chunked", "ref", "scan_states", "read_out_states"), plain, autocast):
        assert b.dtype == torch.float32 and torch.equal(a, b), name


def test_cuda_without_mamba_ssm_warns_once_that_the_scan_is_slow():
    if scan_module._mamba_ssm_scan() is not None:
        pytest.skip("mamba-ssm imports here")
    scan_module._warn_slow_cuda_scan.cache_clear()
    with pytest.warns(RuntimeWarning, match="pip install 'mambast-video\\[cuda\\]'"):
        assert resolve_backend("auto", "cuda") == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert resolve_backend("auto", torch.device("cuda", 0)) == "chunked"
        assert resolve_backend("auto", "cpu") in ("cpu", "chunked")


# ----------------------------------------------------------------------------------------------------------
# The compiled CPU loop (models/scan_kernel_cpu.py)

@needs_kernel
def test_cpu_kernel_handles_long_decays_and_time_major_views():
    """Large Δ|A| (exp underflows towards 0: the clamp at -87) and u, Δ as views of (L, batch, D) memory, as the
    model passes them."""
    inputs = make_inputs(2, 4, 8, 6, 300, seed=8)
    inputs["A"] = inputs["A"] * 40
    inputs["u"], inputs["delta"] = (x.permute(2, 0, 1).contiguous().permute(1, 2, 0) for x in (inputs["u"], inputs["delta"]))
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    fast = selective_scan_cpu(**inputs, delta_softplus=True)
    assert torch.isfinite(fast).all()
    assert (fast - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@needs_kernel
def test_cpu_kernel_softplus_over_the_whole_range():
    """The kernel applies the bias and softplus itself: steps from -30 (Δ ≈ 1e-13) through 0 to 30 (Δ = delta)."""
    inputs = make_inputs(1, 2, 8, 4, 60, seed=13)
    inputs["delta"] = torch.linspace(-30, 30, 60).expand(1, 16, 60).contiguous()
    inputs["delta_bias"] = torch.zeros(16)
    inputs["A"] = inputs["A"] / 40  # keeps some memory at the large steps
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    fast = selective_scan_cpu(**inputs, delta_softplus=True)
    assert (fast - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@needs_kernel
def test_cpu_kernel_takes_any_sign_of_the_step():
    """Without the softplus Δ may be negative (Δ A > 0: growing states); the kernel's exp is right there too."""
    inputs = make_inputs(1, 2, 8, 4, 25, seed=12)
    inputs["delta"] = inputs["delta"] * 0.2
    ref = selective_scan_ref(**inputs)
    fast = selective_scan_cpu(**inputs)
    assert (inputs["delta"] < 0).any() and torch.isfinite(ref).all()
    assert (fast - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@needs_kernel
def test_cpu_kernel_bits_do_not_depend_on_the_batch_or_the_threads():
    """A frame's outputs are the same alone or in a batch, on one thread or several (deterministic renders)."""
    inputs = make_inputs(3, 4, 16, 8, 120, seed=9)
    together = selective_scan_cpu(**inputs, delta_softplus=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for i in range(3):
            alone = selective_scan_cpu(**{k: (v[i:i + 1] if v.dim() > 1 and v.shape[0] == 3 else v)
                                          for k, v in inputs.items()}, delta_softplus=True)
            assert torch.equal(alone[0], together[i])
    finally:
        torch.set_num_threads(threads)


def test_cpu_backend_falls_back_to_the_chunked_scan_for_what_the_kernel_does_not_take():
    """Autograd, the last state and channel counts that are not multiples of 8 run the chunked scan: same results."""
    inputs = make_inputs(2, 2, 5, 4, 40, seed=10)  # 10 channels
    assert torch.equal(selective_scan_cpu(**inputs, delta_softplus=True),
                       selective_scan_chunked(**inputs, delta_softplus=True))
    with_last = make_inputs(1, 2, 8, 4, 30, seed=14)
    for a, b in zip(selective_scan_cpu(**with_last, delta_softplus=True, return_last_state=True),
                    selective_scan_chunked(**with_last, delta_softplus=True, return_last_state=True)):
        assert torch.equal(a, b)
    grads = {k: v.requires_grad_() for k, v in make_inputs(1, 2, 8, 4, 30, seed=11).items()}
    out = selective_scan_cpu(**grads, delta_softplus=True)
    assert out.requires_grad
    out.sum().backward()
    assert grads["u"].grad is not None
