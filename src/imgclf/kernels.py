"""A fused CPU kernel for fastnet's bf16 training: [2x2 max-pool ->] batch norm -> GELU.

torch runs these as separate passes, each over a whole activation: the pool writes int64 indices, its backward
zero-fills the full-size gradient before scattering, batch norm and GELU each read and write everything again
(benchmarks/fastnet_step.py: about 40% of a fastnet step on Sapphire Rapids, more than the forward convs).
Here the forward is two passes (pool + channel sums, then normalize + GELU) and so is the backward. The kernel
is plain C, compiled once per machine with the system C compiler into ~/.cache/imgclf/kernels and called
through ctypes; without a compiler, or off the CPU, or outside bf16 channels_last training, fastnet uses
torch's own layers (same results up to rounding). IMGCLF_FUSED=0 turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from imgclf.device import cpuinfo
from imgclf.errors import disk_full

_SOURCE = r"""
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, NaN stays NaN */
    uint32_t u; memcpy(&u, &f, 4);
    uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : rounded;
}

/* exp(x) for x <= 0 (Cephes' expf polynomial), written so that the compiler vectorizes it */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f; p = p * r + 8.3334519073e-3f; p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f; p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23; float scale; memcpy(&scale, &e, 4);
    return p * scale;
}

/* Phi(z), the normal CDF, by Abramowitz-Stegun 7.1.26 (|error of erf| < 1.5e-7), and exp(-z^2/2) with it */
static inline float normal_cdf(float z, float *gauss) {
    float a = fabsf(z) * 0.70710678118654752f;
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float e = exp_nonpositive(-a * a);
    float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
    float half_erfc = 0.5f * poly * e;
    *gauss = e;
    return z >= 0.0f ? 1.0f - half_erfc : half_erfc;
}

typedef struct {
    const uint16_t *x; uint16_t *pooled; uint8_t *code; const uint16_t *grad; uint16_t *grad_x, *y, *deriv;
    long N, H, W, C, pool;  /* channels_last shape of the input; pool: 0 or 1 */
    const float *mean, *invstd, *weight, *bias, *mean_grad_z, *mean_grad_z_xhat;  /* per channel */
} Args;

typedef void (*Work)(const Args *, long, long, double *);

/* Splits rows [0, rows) over threads; each thread's channel sums go to its own slice, added up at the end. The
   threads are OpenMP's: loaded after torch, this library shares torch's libgomp and so its thread pool (a pool
   of our own would fight torch's spinning threads for the cores). */
static void parallel(Work work, const Args *a, long rows, int threads, double *out) {
    if (threads > rows) threads = (int)rows;
    if (threads < 1) threads = 1;
    double *sums = calloc((size_t)threads * 2 * a->C, sizeof(double));
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        work(a, rows * t / n, rows * (t + 1) / n, sums + (size_t)t * 2 * a->C);
    }
    if (out)
        for (long i = 0; i < 2 * a->C; i++) {
            double s = 0;
            for (int t = 0; t < threads; t++) s += sums[(size_t)t * 2 * a->C + i];
            out[i] = s;
        }
    free(sums);
}

/* The workers copy the pointers they use into restrict locals: otherwise a store could alias the Args struct,
   and the compiler would reload every field in the inner loop instead of vectorizing it. */

/* the pool's running maximum: the first maximum wins ties, as in torch; NaN wins */
static inline void take_larger(uint16_t candidate, uint8_t index, float *max, uint16_t *bits, uint8_t *code) {
    float v = bf16_to_float(candidate);
    int take = v > *max || (v != v && *max == *max);
    *max = take ? v : *max; *bits = take ? candidate : *bits; *code = take ? index : *code;
}

/* forward pass 1: 2x2 max-pool (first maximum wins ties, NaN wins) and the channel sums of its output */
static void pool_and_sum(const Args *a, long start, long end, double *restrict sums) {
    const long C = a->C, W = a->W, H = a->H, pool = a->pool, W2 = pool ? W / 2 : W, H2 = pool ? H / 2 : H;
    const uint16_t *restrict x = a->x; uint16_t *restrict pooled = a->pooled; uint8_t *restrict code = a->code;
    float *restrict s = calloc(2 * C, sizeof(float));
    for (long r = start; r < end; r++) {
        long n = r / H2, h2 = r % H2;
        memset(s, 0, 2 * C * sizeof(float));
        for (long w2 = 0; w2 < W2; w2++) {
            long out = (r * W2 + w2) * C;
            if (pool) {
                const uint16_t *restrict x0 = x + ((n * H + 2 * h2) * W + 2 * w2) * C, *restrict x1 = x0 + W * C;
                for (long c = 0; c < C; c++) {
                    uint16_t bits = x0[c]; float m = bf16_to_float(bits); uint8_t k = 0;
                    take_larger(x0[C + c], 1, &m, &bits, &k);
                    take_larger(x1[c], 2, &m, &bits, &k);
                    take_larger(x1[C + c], 3, &m, &bits, &k);
                    pooled[out + c] = bits; code[out + c] = k;
                    s[c] += m; s[C + c] += m * m;
                }
            } else {
                const uint16_t *restrict xr = x + out;
                for (long c = 0; c < C; c++) { float v = bf16_to_float(xr[c]); s[c] += v; s[C + c] += v * v; }
            }
        }
        for (long c = 0; c < 2 * C; c++) sums[c] += s[c];
    }
    free(s);
}

/* forward pass 2: GELU(batch norm), and GELU's derivative there for the backward */
static void normalize_gelu(const Args *a, long start, long end, double *restrict sums) {
    (void)sums;
    const long C = a->C;
    const uint16_t *restrict pooled = a->pooled; uint16_t *restrict y = a->y, *restrict deriv = a->deriv;
    const float *restrict mean = a->mean, *restrict invstd = a->invstd, *restrict weight = a->weight,
                *restrict bias = a->bias;
    for (long r = start; r < end; r++) {
        const uint16_t *restrict p = pooled + r * C; uint16_t *restrict yr = y + r * C, *restrict dr = deriv + r * C;
        for (long c = 0; c < C; c++) {
            float z = (bf16_to_float(p[c]) - mean[c]) * invstd[c] * weight[c] + bias[c], gauss;
            float cdf = normal_cdf(z, &gauss);
            yr[c] = float_to_bf16(z * cdf);
            dr[c] = float_to_bf16(cdf + z * gauss * 0.39894228040143268f);
        }
    }
}

/* backward pass 1: the channel sums of the gradient at the batch norm's output, plain and times xhat */
static void grad_z_sums(const Args *a, long start, long end, double *restrict sums) {
    const long C = a->C;
    const uint16_t *restrict pooled = a->pooled, *restrict grad = a->grad, *restrict deriv = a->deriv;
    const float *restrict mean = a->mean, *restrict invstd = a->invstd;
    float *restrict s = calloc(2 * C, sizeof(float));
    for (long r = start; r < end; r++) {
        const uint16_t *restrict p = pooled + r * C, *restrict g = grad + r * C, *restrict d = deriv + r * C;
        for (long c = 0; c < C; c++) {
            float xhat = (bf16_to_float(p[c]) - mean[c]) * invstd[c], gz = bf16_to_float(g[c]) * bf16_to_float(d[c]);
            s[c] += gz; s[C + c] += gz * xhat;
        }
        if ((r - start) % 64 == 63 || r == end - 1) {  /* float partial sums over 64 pixels, then double */
            for (long c = 0; c < 2 * C; c++) sums[c] += s[c];
            memset(s, 0, 2 * C * sizeof(float));
        }
    }
    free(s);
}

/* backward pass 2: the batch norm's input gradient, scattered to the pool's maxima (zeros elsewhere) */
static void grad_x(const Args *a, long start, long end, double *restrict sums) {
    (void)sums;
    const long C = a->C, W = a->W, H = a->H, pool = a->pool, W2 = pool ? W / 2 : W, H2 = pool ? H / 2 : H;
    const uint16_t *restrict pooled = a->pooled; const uint8_t *restrict code = a->code;
    const uint16_t *restrict grad = a->grad, *restrict deriv = a->deriv; uint16_t *restrict grad_x = a->grad_x;
    const float *restrict mean = a->mean, *restrict invstd = a->invstd, *restrict weight = a->weight,
                *restrict mgz = a->mean_grad_z, *restrict mgzx = a->mean_grad_z_xhat;
    float *restrict row = malloc(W2 * C * sizeof(float));
    for (long r = start; r < end; r++) {
        long n = r / H2, h2 = r % H2;
        const long first = r * W2 * C;
        const uint16_t *restrict p = pooled + first, *restrict g = grad + first, *restrict d = deriv + first;
        for (long w2 = 0; w2 < W2; w2++)
            for (long c = 0; c < C; c++) {
                long i = w2 * C + c;
                float xhat = (bf16_to_float(p[i]) - mean[c]) * invstd[c];
                float gz = bf16_to_float(g[i]) * bf16_to_float(d[i]);
                row[i] = weight[c] * invstd[c] * (gz - mgz[c] - xhat * mgzx[c]);
            }
        if (!pool) {
            uint16_t *restrict gx = grad_x + r * W2 * C;
            for (long i = 0; i < W2 * C; i++) gx[i] = float_to_bf16(row[i]);
            continue;
        }
        const uint8_t *restrict k = code + r * W2 * C;
        for (long dy = 0; dy < 2; dy++) {
            uint16_t *restrict gx = grad_x + (n * H + 2 * h2 + dy) * W * C;
            for (long w2 = 0; w2 < W2; w2++)
                for (long dx = 0; dx < 2; dx++) {
                    uint16_t *restrict o = gx + (2 * w2 + dx) * C;
                    const float *restrict v = row + w2 * C; const uint8_t *restrict kw = k + w2 * C;
                    uint8_t want = (uint8_t)(2 * dy + dx);
                    for (long c = 0; c < C; c++) o[c] = kw[c] == want ? float_to_bf16(v[c]) : 0;
                }
            if (W % 2) memset(gx + (W - 1) * C, 0, C * sizeof(uint16_t));
        }
        if (H % 2 && h2 == H2 - 1) memset(grad_x + (n * H + H - 1) * W * C, 0, W * C * sizeof(uint16_t));
    }
    free(row);
}

void forward(const uint16_t *x, long N, long H, long W, long C, long pool, uint16_t *pooled, uint8_t *code,
             double *sums, int threads) {
    Args a = {.x = x, .pooled = pooled, .code = code, .N = N, .H = H, .W = W, .C = C, .pool = pool};
    parallel(pool_and_sum, &a, pool ? N * (H / 2) : N * H, threads, sums);
}

void forward_output(const uint16_t *pooled, long rows, long C, const float *mean, const float *invstd,
                    const float *weight, const float *bias, uint16_t *y, uint16_t *deriv, int threads) {
    Args a = {.pooled = pooled, .y = y, .deriv = deriv, .C = C, .mean = mean, .invstd = invstd, .weight = weight,
              .bias = bias};
    parallel(normalize_gelu, &a, rows, threads, NULL);
}

void backward(const uint16_t *grad, const uint16_t *deriv, const uint16_t *pooled, const uint8_t *code, long N,
              long H, long W, long C, long pool, const float *mean, const float *invstd, const float *weight,
              double *sums, uint16_t *grad_x_out, int threads) {
    long rows = pool ? N * (H / 2) * (W / 2) : N * H * W;
    Args a = {.grad = grad, .deriv = (uint16_t *)deriv, .pooled = pooled, .code = code, .grad_x = grad_x_out,
              .N = N, .H = H, .W = W, .C = C, .pool = pool, .mean = mean, .invstd = invstd, .weight = weight};
    parallel(grad_z_sums, &a, rows, threads, sums);
    float *means = malloc(2 * C * sizeof(float));
    for (long c = 0; c < 2 * C; c++) means[c] = (float)(sums[c] / rows);
    a.mean_grad_z = means; a.mean_grad_z_xhat = means + C;
    parallel(grad_x, &a, pool ? N * (H / 2) : N * H, threads, NULL);
    free(means);
}
"""

_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    _FLAGS.append("-mprefer-vector-width=512")  # GCC's default of 256 bits on AVX-512 CPUs: 1.3x slower here


def _cpu_signature() -> str:
    """-march=native builds for this processor: the cached library is keyed by its model and flags."""
    lines = {line for line in cpuinfo().splitlines() if line.startswith(("model name", "flags"))}
    return "\n".join(sorted(lines)) if lines else platform.processor()


def _build(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        source, built = Path(scratch) / "kernel.c", Path(scratch) / "kernel.so"
        source.write_text(_SOURCE)
        subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built), "-lm"], check=True, capture_output=True,
                       timeout=300)
        os.replace(built, path)  # atomic: a killed build leaves no half-written library


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cached_path(compiler: str) -> Path:
    """Keyed by the compiler's version too: an upgraded `cc` at the same path builds a new library."""
    parts = [_SOURCE, *_FLAGS, _cpu_signature(), compiler, _compiler_version(compiler)]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]
    return Path("~/.cache/imgclf/kernels").expanduser() / f"pool_bn_gelu-{key}.so"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _load(compiler: str, path: Path) -> ctypes.CDLL:
    if not path.exists():
        _build(compiler, path)
    try:
        return ctypes.CDLL(str(path))
    except OSError:  # a damaged library file: build it again, once
        _build(compiler, path)
        return ctypes.CDLL(str(path))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (no C compiler with OpenMP) or IMGCLF_FUSED=0.

    A failed build leaves its compiler output in a .failed file beside the library, so that later processes do
    not try again; delete ~/.cache/imgclf/kernels to retry (after installing a compiler, say).
    """
    cc = compiler()
    if os.environ.get("IMGCLF_FUSED", "1") == "0" or cc is None:
        return None
    path = cached_path(cc)
    failed = path.with_suffix(".failed")
    if failed.exists():
        return None
    try:
        try:
            lib = _load(cc, path)
        except OSError:  # e.g. a read-only home: build a private copy for this process (Linux keeps it mapped)
            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as scratch:
                lib = _load(cc, Path(scratch) / path.name)
    except (OSError, subprocess.SubprocessError) as e:
        # Killed by a signal (Ctrl-C; the OOM killer takes cc1, and the driver then says so) or slowed past the
        # timeout by a busy machine: not the compiler's fault, so the next process tries again.
        killed = isinstance(e, subprocess.TimeoutExpired) or isinstance(e, subprocess.CalledProcessError) and (
            e.returncode < 0 or b"signal terminated program" in (e.stderr or b""))
        if killed or disk_full(path.parent):
            return None
        try:
            failed.write_text(getattr(e, "stderr", b"").decode(errors="replace") or str(e))
        except OSError:
            pass
        return None
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.forward.argtypes = [p, n, n, n, n, n, p, p, p, ctypes.c_int]
    lib.forward_output.argtypes = [p, n, n, p, p, p, p, p, p, ctypes.c_int]
    lib.backward.argtypes = [p, p, p, p, n, n, n, n, n, p, p, p, p, p, ctypes.c_int]
    return lib


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel can take this activation (bf16, channels_last, on the CPU, while training)."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4 and torch.is_grad_enabled()
            and x.is_contiguous(memory_format=torch.channels_last) and library() is not None)


class _PoolBatchNormGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, pool: bool, eps: float,
                stats: list) -> torch.Tensor:
        lib, threads = library(), torch.get_num_threads()
        n, c, h, w = x.shape
        out_h, out_w = (h // 2, w // 2) if pool else (h, w)
        pooled = (torch.empty((n, c, out_h, out_w), dtype=x.dtype, memory_format=torch.channels_last) if pool
                  else x)
        code = torch.empty((n, out_h, out_w, c) if pool else (0,), dtype=torch.uint8)
        sums = torch.empty(2 * c, dtype=torch.float64)
        lib.forward(x.data_ptr(), n, h, w, c, int(pool), pooled.data_ptr(), code.data_ptr(), sums.data_ptr(), threads)
        count = n * out_h * out_w
        mean = sums[:c] / count
        var = (sums[c:] / count - mean * mean).clamp_min(0)
        stats.extend([mean.float(), var.float() * count / max(count - 1, 1)])  # for the running statistics
        mean, invstd = mean.float(), (var + eps).rsqrt().float()
        weight, bias = weight.detach().float().contiguous(), bias.detach().float().contiguous()
        y, deriv = torch.empty_like(pooled), torch.empty_like(pooled)
        lib.forward_output(pooled.data_ptr(), count, c, mean.data_ptr(), invstd.data_ptr(), weight.data_ptr(),
                           bias.data_ptr(), y.data_ptr(), deriv.data_ptr(), threads)
        ctx.save_for_backward(deriv, pooled, code, mean, invstd, weight)
        ctx.pool, ctx.input_shape = pool, x.shape
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        deriv, pooled, code, mean, invstd, weight = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        grad = grad.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        sums = torch.empty(2 * c, dtype=torch.float64)
        grad_x = torch.empty(ctx.input_shape, dtype=torch.bfloat16, memory_format=torch.channels_last)
        library().backward(grad.data_ptr(), deriv.data_ptr(), pooled.data_ptr(), code.data_ptr(), n, h, w, c,
                           int(ctx.pool), mean.data_ptr(), invstd.data_ptr(), weight.data_ptr(), sums.data_ptr(),
                           grad_x.data_ptr(), torch.get_num_threads())
        return grad_x, sums[:c].float(), None, None, None, None


def pool_batch_norm_gelu(x: torch.Tensor, bn: torch.nn.BatchNorm2d, pool: bool) -> torch.Tensor:
    """GELU(bn(max_pool2d(x, 2) if pool else x)) in training mode, updating bn's running statistics.

    bn's scale must be frozen (fastnet's ShiftOnlyBatchNorm): only the shift gets a gradient.
    """
    stats: list[torch.Tensor] = []
    y = _PoolBatchNormGelu.apply(x, bn.bias, bn.weight, pool, bn.eps, stats)
    with torch.no_grad():
        mean, var = stats
        bn.running_mean.lerp_(mean, bn.momentum)
        bn.running_var.lerp_(var, bn.momentum)
        bn.num_batches_tracked.add_(1)
    return y
