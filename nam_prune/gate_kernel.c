/* NAM training gate in fused CPU passes (float32, NCHW contiguous).

   out = (a x_hat + b) * sigmoid(c x_hat + d),  x_hat = (x - mean) * invstd,  per channel a, b, c, d.

   Plain batch norm reads the feature map twice forward (statistics, output) and twice backward
   (reductions, input gradient); these four functions do the same passes for the gated form,
   recomputing the sigmoid from x instead of keeping extra maps. Built and loaded by
   nam_prune/gate_kernel.py; the torch-op path in gates.py is the reference and the fallback. */

#include <stdint.h>
#include <string.h>

#define CHUNK 1024 /* float partial sums over at most this many elements, then double */

/* exp(t) for t <= 0 (Cephes expf: range reduction by ln 2, degree-6 polynomial): written
   branch-free so the compiler vectorizes the loops that call it. */
static inline float exp_nonpositive(float t) {
    t = t < -87.0f ? -87.0f : t;
    float n = __builtin_floorf(t * 1.44269504088896341f + 0.5f);
    float r = t - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid(float z) {
    float e = exp_nonpositive(z < 0.0f ? z : -z);
    return (z < 0.0f ? e : 1.0f) / (1.0f + e);
}

/* Per-channel batch mean and biased variance in one read, from sums shifted by the mean of the channel's
   first plane (close to the batch mean, so the float sums of squares lose little to cancellation). */
void nam_gate_stats(const float *x, int64_t n, int64_t channels, int64_t hw, float *mean, float *var, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ch = 0; ch < channels; ch++) {
        double first = 0.0;
        for (int64_t j = 0; j < hw; j++) first += x[ch * hw + j];
        const float shift = (float)(first / (double)hw);
        double s1 = 0.0, s2 = 0.0;
        for (int64_t i = 0; i < n; i++) {
            const float *p = x + (i * channels + ch) * hw;
            for (int64_t j0 = 0; j0 < hw; j0 += CHUNK) {
                const int64_t j1 = j0 + CHUNK < hw ? j0 + CHUNK : hw;
                float f1 = 0.0f, f2 = 0.0f;
#pragma omp simd reduction(+ : f1, f2)
                for (int64_t j = j0; j < j1; j++) {
                    const float v = p[j] - shift;
                    f1 += v;
                    f2 += v * v;
                }
                s1 += f1;
                s2 += f2;
            }
        }
        const double count = (double)(n * hw), m = s1 / count;
        mean[ch] = (float)(shift + m);
        const double v = s2 / count - m * m;
        var[ch] = (float)(v > 0.0 ? v : 0.0);
    }
}

void nam_gate_forward(const float *x, float *out, int64_t n, int64_t channels, int64_t hw, const float *mean,
                      const float *invstd, const float *a, const float *b, const float *c, const float *d, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t plane = 0; plane < n * channels; plane++) {
        const int64_t ch = plane % channels;
        const float m = mean[ch], is = invstd[ch], ac = a[ch], bc = b[ch], cc = c[ch], dc = d[ch];
        const float *p = x + plane * hw;
        float *o = out + plane * hw;
#pragma omp simd
        for (int64_t j = 0; j < hw; j++) {
            const float xh = (p[j] - m) * is;
            o[j] = (ac * xh + bc) * sigmoid(cc * xh + dc);
        }
    }
}

/* Per-channel sums(4 x channels): sum g_u, sum g_u x_hat, sum g_z, sum g_z x_hat, where g_u = grad * s and
   g_z = grad * u * s (1 - s) are the gradients at u = a x_hat + b and z = c x_hat + d, s = sigmoid(z).
   The sums run in LANES float lanes across a channel's planes (small maps are common: 5 x 5 in YOLO),
   flushed into double every CHUNK values per lane. grad's planes are contiguous; its samples lie
   grad_stride apart (a channel slice of a larger gradient, as a concat's backward hands out). */
#define LANES 16
/* Adds one value's g_u, g_u x_hat, g_z, g_z x_hat to float lane l (see nam_gate_backward_sums). */
static inline void accumulate(float lane[4][LANES], int l, float x, float grad, float mean, float invstd, float a, float b,
                              float c, float d) {
    const float xh = (x - mean) * invstd;
    const float s = sigmoid(c * xh + d);
    const float g_u = grad * s;
    const float g_z = g_u * (a * xh + b) * (1.0f - s);
    lane[0][l] += g_u;
    lane[1][l] += g_u * xh;
    lane[2][l] += g_z;
    lane[3][l] += g_z * xh;
}

void nam_gate_backward_sums(const float *grad, int64_t grad_stride, const float *x, int64_t n, int64_t channels,
                            int64_t hw, const float *mean, const float *invstd, const float *a, const float *b,
                            const float *c, const float *d, double *sums, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ch = 0; ch < channels; ch++) {
        const float m = mean[ch], is = invstd[ch], ac = a[ch], bc = b[ch], cc = c[ch], dc = d[ch];
        double total[4] = {0.0, 0.0, 0.0, 0.0};
        float lane[4][LANES] = {{0.0f}};
        int64_t pending = 0;
        for (int64_t i = 0; i < n; i++) {
            const float *p = x + (i * channels + ch) * hw, *g = grad + i * grad_stride + ch * hw;
            int64_t j = 0;
            for (; j + LANES <= hw; j += LANES) {
#pragma omp simd
                for (int l = 0; l < LANES; l++) accumulate(lane, l, p[j + l], g[j + l], m, is, ac, bc, cc, dc);
            }
#pragma omp simd /* the rest of the plane, in lanes 0.. */
            for (int l = 0; l < (int)(hw - j); l++) accumulate(lane, l, p[j + l], g[j + l], m, is, ac, bc, cc, dc);
            pending += hw < LANES ? LANES : hw; /* a lane takes at most ~2 CHUNK values between flushes */
            if (pending >= CHUNK * LANES || i == n - 1) {
                for (int k = 0; k < 4; k++)
                    for (int l = 0; l < LANES; l++) {
                        total[k] += lane[k][l];
                        lane[k][l] = 0.0f;
                    }
                pending = 0;
            }
        }
        for (int k = 0; k < 4; k++) sums[k * channels + ch] = total[k];
    }
}

/* grad_x = u_scale g_u + z_scale g_z + slope x_hat + offset, per channel (grad laid out as above). */
void nam_gate_backward_input(const float *grad, int64_t grad_stride, const float *x, float *grad_x, int64_t n,
                             int64_t channels, int64_t hw, const float *mean, const float *invstd, const float *a,
                             const float *b, const float *c, const float *d, const float *u_scale, const float *z_scale,
                             const float *slope, const float *offset, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t plane = 0; plane < n * channels; plane++) {
        const int64_t ch = plane % channels;
        const float m = mean[ch], is = invstd[ch], ac = a[ch], bc = b[ch], cc = c[ch], dc = d[ch];
        const float us = u_scale[ch], zs = z_scale[ch], sl = slope[ch], of = offset[ch];
        const float *p = x + plane * hw, *g = grad + (plane / channels) * grad_stride + ch * hw;
        float *o = grad_x + plane * hw;
#pragma omp simd
        for (int64_t j = 0; j < hw; j++) {
            const float xh = (p[j] - m) * is;
            const float s = sigmoid(cc * xh + dc);
            const float g_u = g[j] * s;
            o[j] = us * g_u + zs * g_u * (ac * xh + bc) * (1.0f - s) + sl * xh + of;
        }
    }
}
