"""The MSTD readout (models/mstd_readout.py): every backend against the oracle and today's state cache.

The Triton kernel runs on CPU under TRITON_INTERPRET=1, which triton reads when the kernel is defined, so it runs
in a child process: this file run as a script (see the bottom) prints the child's measurements as JSON.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.mstd_readout import (FRAME_TILE, mstd_readout, mstd_readout_chunked, mstd_readout_cpu, mstd_readout_ref,
                                 resolve_readout_backend)
from models.scan_kernel_cpu import readout_kernel, scan_forward_cpu
from models.selective_scan import read_out_states, scan_states, selective_scan_ref

needs_compiler = pytest.mark.skipif(readout_kernel() is None, reason="no C compiler: the compiled loop is not built")
# the torch path, and the compiled CPU loop (which takes blocks of 8 channels per group; other shapes fall back)
READOUTS = [pytest.param(mstd_readout_chunked, id="chunked"),
            pytest.param(mstd_readout_cpu, id="cpu", marks=needs_compiler)]

TOLERANCE = 1e-4  # max abs error against the oracle

SHAPES = [  # groups (0 = ungrouped 3-D B/C), channels per group, d_state, length, frames
    (4, 8, 16, 150, 3),  # SS2D's 4 direction groups; L not a multiple of the chunk (64)
    (4, 8, 8, 200, 1),
    (4, 6, 16, 64, 6),  # L exactly one chunk; two frame tiles, the second padded
    (0, 5, 3, 63, 2),
    (2, 3, 5, 1, 1),
    (4, 16, 16, 130, 5),  # the compiled loop's shapes: blocks of 8 channels in every group
    (2, 8, 3, 77, 9),
    (0, 24, 16, 40, 2),
]


def make_inputs(groups, c, n, length, frames, seed=0):
    """One style's scan inputs (delta biased and soft-plussed, as the MSTD caches them) and `frames` frames' C."""
    g = torch.Generator().manual_seed(seed)
    dim = max(groups, 1) * c
    grouped = (groups, n, length) if groups else (n, length)
    u = torch.randn(1, dim, length, generator=g)
    D = torch.randn(dim, generator=g)
    return dict(
        u=u,
        delta=F.softplus(torch.randn(1, dim, length, generator=g) * 0.5 - 0.5),
        A=-torch.rand(dim, n, generator=g) * 3 - 0.05,
        B=torch.randn(1, *grouped, generator=g),
        C=torch.randn(frames, *grouped, generator=g),
        skip=u * D[:, None],
    ), D


def max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_the_per_frame_scan(shape):
    inputs, D = make_inputs(*shape)
    y = mstd_readout_ref(**inputs)
    for b in range(inputs["C"].shape[0]):
        one = selective_scan_ref(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"][b:b + 1], D)
        assert max_err(y[b:b + 1], one) <= TOLERANCE


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_paths_match_reference(shape, skip, readout):
    inputs, _ = make_inputs(*shape)
    if not skip:
        inputs["skip"] = None
    y = readout(**inputs)
    assert y.permute(2, 0, 1).is_contiguous()  # time-major memory
    assert max_err(y, mstd_readout_ref(**inputs)) <= TOLERANCE


@pytest.mark.parametrize("shape", [(4, 8, 16, 150, 3), (0, 5, 3, 63, 2)])
def test_chunked_matches_the_state_cache(shape):
    """Today's cached readout: all states once, then read_out_states."""
    inputs, _ = make_inputs(*shape)
    states = scan_states(inputs["u"], inputs["delta"], inputs["A"], inputs["B"])
    cached = read_out_states(states, inputs["C"], skip=inputs["skip"])
    assert max_err(mstd_readout_chunked(**inputs), cached) <= TOLERANCE


@pytest.mark.parametrize("readout", READOUTS)
def test_frames_do_not_depend_on_their_batch_companions(readout):
    """Bit for bit: a frame alone, in a batch of 7 (two tiles, the second padded) and at another place in it."""
    inputs, _ = make_inputs(4, 8, 16, 150, 7)
    C = inputs.pop("C")
    together = readout(C=C, **inputs)
    alone = torch.cat([readout(C=C[b:b + 1], **inputs) for b in range(7)])
    order = torch.tensor([6, 2, 4, 0, 5, 1, 3])
    shuffled = readout(C=C[order], **inputs)
    assert torch.equal(together, alone)
    assert torch.equal(together[order], shuffled)


@needs_compiler
def test_compiled_readout_is_the_compiled_scan_of_each_frame_bit_for_bit():
    """The compiled readout runs scan_forward's operations for the one style: each frame's y equals the compiled
    scan's with the style expanded to it, to the last bit, and does not depend on the thread count."""
    inputs, D = make_inputs(4, 16, 16, 130, 3)
    y = mstd_readout_cpu(**inputs)
    for b in range(3):
        one = scan_forward_cpu(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"][b:b + 1], D)
        assert torch.equal(y[b:b + 1], one)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(mstd_readout_cpu(**inputs), y)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name, change, message", [
    ("C", lambda x: x["C"][..., :-1], "C has shape"),
    ("C", lambda x: x["C"][:, :2], "C has shape"),
    ("B", lambda x: x["B"].expand(2, -1, -1, -1), "B has shape"),
    ("delta", lambda x: x["delta"][..., 1:], "delta has shape"),
    ("skip", lambda x: x["skip"].expand(3, -1, -1), "skip has shape"),
    ("A", lambda x: x["A"][None], "A has shape"),
])
def test_bad_shapes_are_named(name, change, message):
    inputs, _ = make_inputs(4, 8, 16, 20, 3)
    inputs[name] = change(inputs)
    for backend in ("ref", "chunked", "cpu"):
        with pytest.raises(ValueError, match=message):
            mstd_readout(**inputs, backend=backend)


def test_backend_choice(monkeypatch):
    assert resolve_readout_backend("auto", "cpu") == ("chunked" if readout_kernel() is None else "cpu")
    with pytest.raises(ValueError, match="unknown mstd_readout backend 'fast'"):
        resolve_readout_backend("fast", "cpu")
    inputs, _ = make_inputs(4, 8, 16, 20, 3)
    assert torch.equal(mstd_readout(**inputs, backend="chunked"), mstd_readout_chunked(**inputs))
    assert torch.equal(mstd_readout(**inputs), mstd_readout(**inputs, backend=resolve_readout_backend("auto", "cpu")))
    assert torch.equal(mstd_readout(**inputs, backend="ref"), mstd_readout_ref(**inputs))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'triton'"):  # no triton, or CPU tensors without the interpreter
        mstd_readout(**inputs, backend="triton")


def test_works_without_triton(monkeypatch):
    """triton is optional: without it 'auto' is the torch path everywhere, and forcing 'triton' says what to install."""
    from models import mstd_readout as module

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    module._triton_kernel.cache_clear()
    try:
        assert not module.triton_available()
        assert resolve_readout_backend("auto", "cuda") == "chunked"
        inputs, _ = make_inputs(4, 8, 16, 20, 3)
        with pytest.raises(RuntimeError, match=r"needs triton: pip install 'mambast-video\[triton\]'"):
            mstd_readout(**inputs, backend="triton")
    finally:
        module._triton_kernel.cache_clear()


# ----------------------------------------------------------------------------------------------------------
# The Triton kernel: interpreted on CPU in a child process, and compiled for a Hopper GPU without one

TRITON_SHAPES = [  # as SHAPES; tiny, the interpreter runs each program's time loop in Python
    (4, 8, 16, 40, 3),  # SS2D-like, one frame tile
    (4, 8, 8, 37, 5),  # two frame tiles, the second padded
    (0, 12, 5, 23, 2),  # ungrouped; channel tile (16) and N (8) padded and masked
    (2, 40, 4, 20, 1),  # two channel tiles per group, the second partial
]


def interpreted_kernel_errors() -> list[dict]:
    """In the child (TRITON_INTERPRET=1): per shape, the kernel's error against the oracle and the state cache."""
    from models.mstd_readout import mstd_readout_triton

    results = []
    for shape in TRITON_SHAPES:
        inputs, _ = make_inputs(*shape)
        y = mstd_readout(**inputs, backend="triton")
        no_skip = mstd_readout_triton(**{**inputs, "skip": None})
        states = scan_states(inputs["u"], inputs["delta"], inputs["A"], inputs["B"])
        C = inputs.pop("C")
        alone = torch.cat([mstd_readout_triton(C=C[b:b + 1], **inputs) for b in range(C.shape[0])])
        results.append(dict(
            shape=shape,
            vs_ref=max_err(y, mstd_readout_ref(C=C, **inputs)),
            vs_ref_no_skip=max_err(no_skip, mstd_readout_ref(C=C, **{**inputs, "skip": None})),
            vs_state_cache=max_err(y, read_out_states(states, C, skip=inputs["skip"])),
            alone_equals_together=torch.equal(alone, y)))
    return results


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@needs_triton
def test_triton_kernel_interpreted_matches_reference():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    child = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    assert [tuple(r["shape"]) for r in results] == TRITON_SHAPES
    for r in results:
        assert r["vs_ref"] <= TOLERANCE, r
        assert r["vs_ref_no_skip"] <= TOLERANCE, r
        assert r["vs_state_cache"] <= TOLERANCE, r
        assert r["alone_equals_together"], r


@needs_triton
def test_triton_kernel_compiles_for_hopper():
    """The interpreter runs the kernel as numpy; this lowers it through the real compiler to sm_90 machine code
    (triton's bundled ptxas, no GPU needed), which catches what only the compiler checks (types, constexprs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from models.mstd_readout import BLOCK_D, _triton_kernel

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 makes the kernel an interpreted function")
    kernel = _triton_kernel()
    constants = dict(N=16, BLOCK_N=16, BLOCK_D=BLOCK_D, BLOCK_F=FRAME_TILE, HAS_SKIP=True)
    signature = {name: "constexpr" if name in constants else "*fp32" if name.endswith("_ptr") else "i32"
                 for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),  # raises on any compile error
                              options=dict(enable_fp_fusion=True))  # as mstd_readout_triton launches it
    assert compiled.asm["cubin"]


if __name__ == "__main__":  # the child process of test_triton_kernel_interpreted_matches_reference
    torch.set_num_threads(1)
    print(json.dumps(interpreted_kernel_errors()))
