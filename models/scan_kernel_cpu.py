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

Bits: the exponential is our own (2^x by Cephes' exp2f polynomial, the decay's log2(e) folded into A once per
block: a third fewer operations per state than expf's two-step range reduction), built with -ffp-contract=off, so every
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

/* 2^x: 2^k 2^f, k the integer nearest x (rounded by adding 1.5·2^23, which leaves k in the low mantissa bits),
   f = x - k in [-1/2, 1/2] (exact), 2^f by Cephes' exp2f polynomial. x is clamped to [-126, 127], where 2^k stays
   a normal float. */
static inline f8 exp2_clamped(f8 x) {
    const f8 lowest = splat(-126.0f), highest = splat(127.0f), magic = splat(12582912.0f);
    x = select(x < lowest, lowest, x);
    x = select(x > highest, highest, x);
    const f8 shifted = x + magic;
    const f8 f = x - (shifted - magic);
    f8 p = splat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    return p * (f8)((((i8)shifted - (i8)magic) + 127) << 23);
}

#define LOG2E 1.44269504088896341f

static inline f8 exp_clamped(f8 x) { return exp2_clamped(x * LOG2E); }

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

/* A block's decay rates a = A log2(e) (the decay is 2^(Δ a)), CB channels from d0, and zero states. */
static inline void start_block(f8 *a, f8 *h, const float *A, int64_t d0, int64_t N) {
    for (int64_t n = 0; n < N; n++) {
        float column[CB];
        for (int i = 0; i < CB; i++)
            column[i] = A[(d0 + i) * N + n];
        a[n] = load(column) * LOG2E;
        h[n] = splat(0.0f);
    }
}

/* h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t u_t B_t, with du = Δ_t u_t */
static inline void update_states(f8 *h, const f8 *a, f8 dt, f8 du, const float *Bt, int64_t N) {
    for (int64_t n = 0; n < N; n++)
        h[n] = exp2_clamped(dt * a[n]) * h[n] + du * Bt[n];
}

/* ⟨C_t, h_t⟩, summed over n in order */
static inline f8 read_states(const float *Ct, const f8 *h, int64_t N) {
    f8 out = splat(0.0f);
    for (int64_t n = 0; n < N; n++)
        out = out + Ct[n] * h[n];
    return out;
}

/* Time-major operands: u, delta, y (L, batch, D); B, C (L, batch, G, N); A (D, N); skip and bias (D) or NULL.
   Δ = delta (+ bias) (through the softplus when asked). Blocks [first, last) of CB channels, numbered frame-major:
   block k is frame k / (D / CB). */
void scan_forward(const float *u, const float *delta, const float *A, const float *B, const float *C,
                  const float *skip, const float *bias, int32_t delta_softplus, float *y, int64_t L, int64_t batch,
                  int64_t D, int64_t G, int64_t N, int64_t first, int64_t last) {
    const int64_t per_frame = D / CB, per_group = D / G;
    f8 a[MAXN], h[MAXN];
    for (int64_t block = first; block < last; block++) {
        const int64_t b = block / per_frame, d0 = block % per_frame * CB, g = d0 / per_group;
        start_block(a, h, A, d0, N);
        for (int64_t t = 0; t < L; t++) {
            const int64_t row = t * batch + b;
            f8 dt = load(delta + row * D + d0);
            if (bias)
                dt = dt + load(bias + d0);
            if (delta_softplus)
                dt = softplus(dt);
            const f8 ut = load(u + row * D + d0);
            update_states(h, a, dt, dt * ut, B + (row * G + g) * N, N);
            const f8 out = read_states(C + (row * G + g) * N, h, N);
            store(y + row * D + d0, skip ? out + load(skip + d0) * ut : out);
        }
    }
}

/* The MSTD's scan once, read out for every frame: u, delta (L, D) of the one style, Δ final (biased, soft-plussed);
   B (L, G, N) of the style; C (L, batch, G, N) of the frames; skip (L, D) or NULL; y (L, batch, D). Blocks
   [first, last) of CB channels. A frame's y is what scan_forward gives for it with the style expanded to the
   batch and skip as D u: the same operations in the same order. */
void mstd_readout(const float *u, const float *delta, const float *A, const float *B, const float *C,
                  const float *skip, float *y, int64_t L, int64_t batch, int64_t D, int64_t G, int64_t N,
                  int64_t first, int64_t last) {
    const int64_t per_group = D / G;
    f8 a[MAXN], h[MAXN];
    for (int64_t block = first; block < last; block++) {
        const int64_t d0 = block * CB, g = d0 / per_group;
        start_block(a, h, A, d0, N);
        for (int64_t t = 0; t < L; t++) {
            const f8 dt = load(delta + t * D + d0);
            update_states(h, a, dt, dt * load(u + t * D + d0), B + (t * G + g) * N, N);
            const f8 st = skip ? load(skip + t * D + d0) : splat(0.0f);
            for (int64_t b = 0; b < batch; b++) {
                const f8 out = read_states(C + ((t * batch + b) * G + g) * N, h, N);
                store(y + (t * batch + b) * D + d0, skip ? out + st : out);
            }
        }
    }
}

/* SS2D's four directions straight from the token grid, so that neither the direction-ordered copies of the
   sequences (cross-scan: two copies and a flip) nor their merge back (a flip, a transpose) exist: direction k's
   t-th element is the token `token_at(k, t)` of the h×w grid (row-major tokens), read and written in place. */
static inline int64_t token_at(int64_t k, int64_t t, int64_t h, int64_t w) {
    const int64_t s = k >= 2 ? h * w - 1 - t : t;  /* directions 2 and 3 are 0 and 1 reversed */
    return (k & 1) ? (s % h) * w + s / h : s;       /* 1 and 3 walk the columns */
}

/* x (batch, L, di): the tokens, shared by the K = 4 directions; delta (K, batch, L, di), before bias and softplus;
   BC: per token and direction a row of `row` floats (the x projection, (batch, L, K, row)), B_t at b_off and C_t at
   c_off; A (K·di, N), D and bias (K·di); y (batch, L, K, di): each direction's output at each token (the merge is
   their sum). Blocks [first, last) of CB channels, numbered (frame, direction, channel block). */
void cross_scan_forward(const float *x, const float *delta, const float *A, const float *BC, const float *D,
                        const float *bias, float *y, int64_t batch, int64_t h, int64_t w, int64_t di, int64_t N,
                        int64_t row, int64_t b_off, int64_t c_off, int64_t first, int64_t last) {
    const int64_t K = 4, L = h * w, per_dir = di / CB, per_frame = K * per_dir;
    f8 a[MAXN], hs[MAXN];
    for (int64_t block = first; block < last; block++) {
        const int64_t b = block / per_frame, k = block % per_frame / per_dir, c = block % per_dir * CB, d = k * di + c;
        start_block(a, hs, A, d, N);
        const f8 d_skip = load(D + d), d_bias = load(bias + d);
        const float *xb = x + b * L * di + c, *db = delta + (k * batch + b) * L * di + c;
        const float *bc = BC + (b * L * K + k) * row;
        float *yb = y + b * L * K * di + k * di + c;
        for (int64_t t = 0; t < L; t++) {
            const int64_t p = token_at(k, t, h, w);
            const f8 dt = softplus(load(db + p * di) + d_bias), ut = load(xb + p * di);
            update_states(hs, a, dt, dt * ut, bc + p * K * row + b_off, N);
            store(yb + p * K * di, read_states(bc + p * K * row + c_off, hs, N) + d_skip * ut);
        }
    }
}

/* The MSTD readout with the frames' side on the token grid: the style's u, delta (Δ final) (L, K·di), B (L, K, N)
   and skip (L, K·di) or NULL in scan order (cached once per clip); C per frame token and direction, a row of `row`
   floats at c_off ((batch, L, K, row)); y (batch, L, K, di). Blocks [first, last) of CB channels, numbered
   (direction, channel block). */
void cross_readout(const float *u, const float *delta, const float *A, const float *B, const float *C,
                   const float *skip, float *y, int64_t batch, int64_t h, int64_t w, int64_t di, int64_t N,
                   int64_t row, int64_t c_off, int64_t first, int64_t last) {
    const int64_t K = 4, L = h * w, per_dir = di / CB, D = K * di;
    f8 a[MAXN], hs[MAXN];
    for (int64_t block = first; block < last; block++) {
        const int64_t k = block / per_dir, c = block % per_dir * CB, d = k * di + c;
        start_block(a, hs, A, d, N);
        for (int64_t t = 0; t < L; t++) {
            const int64_t p = token_at(k, t, h, w);
            const f8 dt = load(delta + t * D + d);
            update_states(hs, a, dt, dt * load(u + t * D + d), B + (t * K + k) * N, N);
            const f8 st = skip ? load(skip + t * D + d) : splat(0.0f);
            for (int64_t b = 0; b < batch; b++) {
                const f8 out = read_states(C + ((b * L + p) * K + k) * row + c_off, hs, N);
                store(y + ((b * L + p) * K + k) * di + c, skip ? out + st : out);
            }
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
def _library() -> ctypes.CDLL | None:
    library = _build()
    if library is None:
        return None
    try:
        return ctypes.CDLL(str(library))
    except OSError:
        return None


@functools.cache
def scan_kernel():
    """The compiled `scan_forward` (ctypes), or None where it cannot be built. Once per process."""
    if _library() is None:
        return None
    fn = _library().scan_forward
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int32, ctypes.c_void_p] + [ctypes.c_int64] * 7
    return fn


@functools.cache
def readout_kernel():
    """The compiled `mstd_readout` (ctypes), or None where it cannot be built."""
    if _library() is None:
        return None
    fn = _library().mstd_readout
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7
    return fn


@functools.cache
def cross_kernels():
    """The compiled (`cross_scan_forward`, `cross_readout`) (ctypes), or None where they cannot be built."""
    if _library() is None:
        return None
    scan, readout = _library().cross_scan_forward, _library().cross_readout
    for fn in (scan, readout):
        fn.restype = None
    scan.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 10
    readout.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 9
    return scan, readout


def kernel_takes(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether `scan_forward_cpu` takes these shapes: u (batch, D, L) on the CPU, B (batch, G, N, L)."""
    dim, groups, n = u.shape[1], B.shape[1], A.shape[1]
    return (u.device.type == "cpu" and dim % CHANNEL_BLOCK == 0 and (dim // groups) % CHANNEL_BLOCK == 0
            and n <= MAX_STATES and scan_kernel() is not None)


@functools.cache  # a process-wide compute pool, like torch's OpenMP threads (not a pipeline stage's threads)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="scan-kernel")


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
    pointer = lambda x: None if x is None else x.data_ptr()  # noqa: E731
    pointers = [pointer(x) for x in (u_t, delta_t, A, B_t, C_t, D)] + [pointer(bias), int(delta_softplus), y.data_ptr()]
    _run_blocks(scan_kernel(), [*pointers, length, batch, dim, groups, n], blocks)
    return y.permute(1, 2, 0)


@torch.no_grad()
def readout_forward_cpu(u, delta, A, B, C, skip=None):
    """models/mstd_readout.py's contract (u, delta (1, D, L), Δ final; A (D, N); B (1, G, N, L); C (batch, G, N,
    L); skip (1, D, L) or None) -> (batch, D, L) fp32, a view of time-major (L, batch, D) memory. The style's
    states are made once per block of channels, in registers, and every frame reads them there."""
    batch, groups, n, length = C.shape
    dim = u.shape[1]
    u_t, delta_t = (x[0].float().t().contiguous() for x in (u, delta))    # (L, D): no copy if time-major
    skip_t = None if skip is None else skip[0].float().t().contiguous()
    B_t = B[0].float().permute(2, 0, 1).contiguous()                     # (L, G, N)
    C_t = C.float().permute(3, 0, 1, 2).contiguous()                     # (L, batch, G, N)
    A = A.float().contiguous()
    y = torch.empty((length, batch, dim), dtype=torch.float32)
    pointers = [x.data_ptr() for x in (u_t, delta_t, A, B_t, C_t)] + [None if skip_t is None else skip_t.data_ptr(),
                                                                      y.data_ptr()]
    _run_blocks(readout_kernel(), [*pointers, length, batch, dim, groups, n], dim // CHANNEL_BLOCK)
    return y.permute(1, 2, 0)


def _run_blocks(kernel, arguments: list, blocks: int) -> None:
    """kernel(*arguments, first, last) over blocks [0, blocks), split between torch's thread count."""
    workers = max(1, min(torch.get_num_threads(), blocks))
    if workers == 1:
        kernel(*arguments, 0, blocks)
        return
    cuts = [blocks * i // workers for i in range(workers + 1)]
    for done in [_pool(workers).submit(kernel, *arguments, first, last) for first, last in zip(cuts, cuts[1:])]:
        done.result()


# ----------------------------------------------------------------------------------------------------------
# SS2D's four directions on the token grid (models/mambast.py `SS2D`, its CPU inference path)


def cross_kernels_take(d_inner: int, d_state: int) -> bool:
    return d_inner % CHANNEL_BLOCK == 0 and d_state <= MAX_STATES and cross_kernels() is not None


@torch.no_grad()
def cross_scan_forward_cpu(x, delta, A, BC, D, delta_bias, grid: tuple[int, int], b_off: int, c_off: int):
    """SS2D's scan in its four directions, read from and written to the token grid (no cross-scan copies):

    x (batch, L, di) fp32 tokens (row-major over `grid` = (h, w)); delta (K=4, batch, L, di), Δ before its bias
    and softplus; BC (batch, L, K, row) the x projection, B_t at [b_off, b_off + N) and C_t at [c_off, c_off + N)
    of each row; A (K·di, N); D, delta_bias (K·di). -> y (batch, L, K, di): direction k's output at each token.
    The same per-channel operations as `scan_forward_cpu` on the cross-scanned sequences."""
    batch, length, di = x.shape
    h, w = grid
    n = A.shape[1]
    y = torch.empty((batch, length, 4, di), dtype=torch.float32)
    operands = [t.contiguous() for t in (x, delta, A, BC, D, delta_bias)]
    _run_blocks(cross_kernels()[0], [*(t.data_ptr() for t in operands), y.data_ptr(), batch, h, w, di, n,
                                     BC.shape[-1], b_off, c_off], batch * 4 * di // CHANNEL_BLOCK)
    return y


@torch.no_grad()
def cross_readout_cpu(u, delta, A, B, C, skip, grid: tuple[int, int], c_off: int = 0):
    """The MSTD readout with the frames on the token grid: the style's u, delta (Δ final) (1, K·di, L), B (1, K,
    N, L), skip (1, K·di, L) or None, in scan order (fastest as views of time-major memory, as the style code
    keeps them); C (batch, L, K, row) the frames' x projection, C_t at [c_off, c_off + N). -> y (batch, L, K, di).
    Per frame the same operations as `readout_forward_cpu` on the cross-scanned sequences."""
    batch, length = C.shape[:2]
    h, w = grid
    dim, n = A.shape
    di = dim // 4
    u_t, delta_t = (t[0].t().contiguous() for t in (u, delta))   # (L, K·di): no copy if time-major
    skip_t = None if skip is None else skip[0].t().contiguous()
    B_t = B[0].permute(2, 0, 1).contiguous()                      # (L, K, N)
    A, C = A.contiguous(), C.contiguous()
    y = torch.empty((batch, length, 4, di), dtype=torch.float32)
    pointers = [t.data_ptr() for t in (u_t, delta_t, A, B_t, C)] + [None if skip_t is None else skip_t.data_ptr(),
                                                                     y.data_ptr()]
    _run_blocks(cross_kernels()[1], [*pointers, batch, h, w, di, n, C.shape[-1], c_off], 4 * di // CHANNEL_BLOCK)
    return y
