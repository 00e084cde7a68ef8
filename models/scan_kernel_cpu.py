"""The selective scan's inference pass as one compiled CPU loop (the CPU counterpart of mamba-ssm's CUDA kernel).

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t u_t B_t,   y_t = ⟨C_t, h_t⟩ + D u_t

Why: the chunked torch scan (models/selective_scan.py) runs one `addcmul` per time step. At the official widths
that op is big enough to be worth it; at the bundled widths (4 directions × 128 channels × 8 states, 4 frames) it is
~16k floats, so the three content blocks of a batch at 512 × 910 spend most of their time on ~22k small ops. Here
each (frame, block of 8 channels) walks L once with its 8 × N states in registers: the decay, the input, the state
update and the readout of a step are fused, nothing of size (L, N) is written.

The C source below is compiled on first use with the system's C compiler (`cc`, or $CC) into a cache folder
($MAMBAST_CACHE/kernels, default ~/.cache/mambast/kernels; one file per hash of the source, the flags and the
compiler, written under a temporary name and renamed, so concurrent workers may build it at once), then loaded
with ctypes; ctypes releases the GIL, so the blocks are split between `torch.get_num_threads()` Python threads.
Where it cannot be built, `scan_kernel()` is None and the chunked torch scan runs instead (models/selective_scan.py,
which warns once).

Bits: the exponential is our own (Cephes' expf polynomial, no library call), built with -ffp-contract=off, so every
lane does the same IEEE operations whatever the vector width the compiler picks: a frame's outputs are the same on
any x86 CPU, and never depend on the other frames of its batch or on how the blocks are split between threads.
They differ from the torch path's in the last bits (another exp): the oracle for both is `selective_scan_ref`.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CHANNEL_BLOCK = 8  # channels a loop iteration carries (one AVX2 vector); D and D / G must be multiples of it
MAX_STATES = 64    # N at most (the states of a block live in a stack array)

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define CB 8
#define MAXN 64

/* CB floats: GCC/Clang vector extensions, one AVX2 register (two SSE ones on older x86, NEON pairs on ARM). */
typedef float f8 __attribute__((vector_size(4 * CB)));
typedef int32_t i8 __attribute__((vector_size(4 * CB)));

static inline f8 load(const float *p) { f8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, f8 v) { memcpy(p, &v, sizeof v); }
static inline f8 splat(float x) { return (f8){x, x, x, x, x, x, x, x}; }
static inline f8 select(i8 mask, f8 yes, f8 no) { return (f8)(((i8)yes & mask) | ((i8)no & ~mask)); }

/* exp(x): 2^k p(r), k the integer nearest x / ln 2, r = x - k ln 2, Cephes' expf polynomial. x is clamped to
   [-87, 88], where 2^k stays a normal float (exp(-87) is 1.6e-38); in the scan x = Δ A <= 0. */
static inline f8 exp_clamped(f8 x) {
    const f8 lowest = splat(-87.0f), highest = splat(88.0f);
    x = select(x < lowest, lowest, x);
    x = select(x > highest, highest, x);
    const f8 v = x * 1.44269504088896341f;
    const f8 half = select(v < splat(0.0f), splat(-0.5f), splat(0.5f));
    const i8 ki = __builtin_convertvector(v + half, i8);  /* truncation of v ± 1/2: the nearest integer */
    const f8 k = __builtin_convertvector(ki, f8);
    f8 r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;                         /* ln 2 = 0.693359375 - 2.12194440e-4 */
    f8 p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (f8)((ki + 127) << 23);
}

/* log(1 + y) for y in [0, 1]: Cephes' logf polynomial on z = 1 + y (halved above sqrt 2), and Goldberg's
   log(z) y / (z - 1), exact where 1 + y rounds (z - 1 is exact there). */
static inline f8 log1p_unit(f8 y) {
    const f8 z = splat(1.0f) + y;
    const i8 big = z > splat(1.41421356237f);
    const f8 e = select(big, splat(1.0f), splat(0.0f));
    const f8 t = select(big, z * 0.5f, z) - 1.0f, tt = t * t;
    f8 p = splat(7.0376836292e-2f);
    p = p * t - 1.1514610310e-1f;
    p = p * t + 1.1676998740e-1f;
    p = p * t - 1.2420140846e-1f;
    p = p * t + 1.4249322787e-1f;
    p = p * t - 1.6668057665e-1f;
    p = p * t + 2.0000714765e-1f;
    p = p * t - 2.4999993993e-1f;
    p = p * t + 3.3333331174e-1f;
    f8 r = t * tt * p + e * -2.12194440e-4f;
    r = r - 0.5f * tt;
    const f8 log_z = t + r + e * 0.693359375f;
    const f8 lost = z - 1.0f;
    return select(lost == splat(0.0f), y, log_z * y / lost);
}

/* softplus(x) = max(x, 0) + log(1 + exp(-|x|)) */
static inline f8 softplus(f8 x) {
    const i8 positive = x > splat(0.0f);
    const f8 magnitude = select(positive, x, -x);
    return select(positive, x, splat(0.0f)) + log1p_unit(exp_clamped(-magnitude));
}

/* Time-major operands: u, delta, y (L, batch, D); B, C (L, batch, G, N); A (D, N); skip and bias (D) or NULL.
   Δ = delta (+ bias) (through the softplus when asked). Blocks [first, last) of CB channels, numbered frame-major:
   block k is frame k / (D / CB). */
void scan_forward(const float *u, const float *delta, const float *A, const float *B, const float *C,
                  const float *skip, const float *bias, int32_t delta_softplus, float *y, int64_t L, int64_t batch,
                  int64_t D, int64_t G, int64_t N, int64_t first, int64_t last) {
    const int64_t per_frame = D / CB, per_group = D / G;
    for (int64_t block = first; block < last; block++) {
        const int64_t b = block / per_frame, d0 = (block % per_frame) * CB, g = d0 / per_group;
        f8 a[MAXN], h[MAXN];
        for (int64_t n = 0; n < N; n++) {
            float column[CB];
            for (int j = 0; j < CB; j++)
                column[j] = A[(d0 + j) * N + n];
            a[n] = load(column);
            h[n] = splat(0.0f);
        }
        const f8 d_skip = skip ? load(skip + d0) : splat(0.0f), d_bias = bias ? load(bias + d0) : splat(0.0f);
        for (int64_t t = 0; t < L; t++) {
            const int64_t row = t * batch + b;
            f8 dtt = load(delta + row * D + d0);
            if (bias)
                dtt = dtt + d_bias;
            if (delta_softplus)
                dtt = softplus(dtt);
            const f8 ut = load(u + row * D + d0), du = dtt * ut;
            const float *Bt = B + (row * G + g) * N, *Ct = C + (row * G + g) * N;
            f8 out = splat(0.0f);
            for (int64_t n = 0; n < N; n++) {
                h[n] = exp_clamped(dtt * a[n]) * h[n] + du * Bt[n];
                out = out + Ct[n] * h[n];
            }
            store(y + row * D + d0, skip ? out + d_skip * ut : out);
        }
    }
}
"""


def _flags() -> list[str]:
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64") and _cpu_has("avx2", "fma"):
        flags.append("-march=x86-64-v3")  # 8-wide vectors; the same bits as 4-wide (see the module docstring)
    return flags


def _cpu_has(*features: str) -> bool:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("flags"):
                    return set(features) <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return False


def _cache_dir() -> Path:
    root = os.environ.get("MAMBAST_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "mambast")
    return Path(root) / "kernels"


def _build() -> Path | None:
    """The shared library, compiled once per source, flags and compiler; None when no C compiler works."""
    compiler = os.environ.get("CC", "cc")
    flags = _flags()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([SOURCE, *flags, version]).encode()).hexdigest()[:16]
    library = _cache_dir() / f"scan_forward-{key}.so"
    if library.exists():
        return library
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:  # concurrent builders each rename theirs
            source, built = Path(scratch) / "scan.c", Path(scratch) / "scan.so"
            source.write_text(SOURCE)
            proc = subprocess.run([compiler, *flags, str(source), "-o", str(built)], capture_output=True, timeout=120)
            if proc.returncode != 0:
                return None
            os.replace(built, library)
    except (OSError, subprocess.SubprocessError):
        return None
    return library


@functools.cache
def scan_kernel():
    """The compiled `scan_forward` (ctypes), or None where it cannot be built. Once per process."""
    library = _build()
    if library is None:
        return None
    try:
        fn = ctypes.CDLL(str(library)).scan_forward
    except OSError:
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int32, ctypes.c_void_p] + [ctypes.c_int64] * 7
    return fn


def kernel_takes(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether `scan_forward_cpu` takes these shapes: u (batch, D, L) on the CPU, B (batch, G, N, L)."""
    dim, groups, n = u.shape[1], B.shape[1], A.shape[1]
    return (u.device.type == "cpu" and dim % CHANNEL_BLOCK == 0 and (dim // groups) % CHANNEL_BLOCK == 0
            and n <= MAX_STATES and scan_kernel() is not None)


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="mambast-scan")


@torch.no_grad()
def scan_forward_cpu(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """y = scan(u, Δ, A, B, C) + D u -> (batch, D, L), a view of time-major (L, batch, D) memory, with
    Δ = softplus(delta + delta_bias) (the parts asked for: the bias and the softplus are applied in the loop).

    u and delta (batch, D, L) fp32 (fastest as views of time-major memory), A (D, N), B and C grouped
    (batch, G, N, L), D and delta_bias (D,) or None. Check `kernel_takes` first.
    """
    batch, dim, length = u.shape
    groups, n = B.shape[1], A.shape[1]
    u_t, delta_t = (x.permute(2, 0, 1).contiguous() for x in (u, delta))   # (L, batch, D): no copy if time-major
    B_t, C_t = (x.permute(3, 0, 1, 2).contiguous() for x in (B, C))        # (L, batch, G, N)
    A, D, bias = (None if x is None else x.contiguous() for x in (A, D, delta_bias))
    y = torch.empty((length, batch, dim), dtype=torch.float32)
    blocks = batch * dim // CHANNEL_BLOCK
    workers = max(1, min(torch.get_num_threads(), blocks))
    pointer = lambda x: None if x is None else x.data_ptr()  # noqa: E731
    pointers = [pointer(x) for x in (u_t, delta_t, A, B_t, C_t, D)] + [pointer(bias), int(delta_softplus), y.data_ptr()]
    sizes = [length, batch, dim, groups, n]
    cuts = [blocks * i // workers for i in range(workers + 1)]
    kernel = scan_kernel()
    if workers == 1:
        kernel(*pointers, *sizes, 0, blocks)
    else:
        for done in [_pool(workers).submit(kernel, *pointers, *sizes, first, last)
                     for first, last in zip(cuts, cuts[1:])]:
            done.result()
    return y.permute(1, 2, 0)
