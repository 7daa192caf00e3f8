/* exp, tanh and a row's max for float32 that gcc can inline and vectorise (libm's are opaque calls, one value at
 * a time).
 *
 * cllm_expf: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then the Cephes degree-6 polynomial for
 * exp(r) and a scale by 2^n built in the exponent bits. About 2 ulp over the clamped range [-87, 88]; below it
 * returns ~1e-38 instead of a subnormal or 0, which no softmax or GELU here can tell apart.
 */
#ifndef CLLM_FASTMATH_H
#define CLLM_FASTMATH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline float cllm_expf(float x) {
    /* Ternaries, not fminf/fmaxf: those must honour NaN operands, which stops gcc from vectorising. */
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union { int32_t i; float f; } scale;  /* 2^n, built in the exponent bits */
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits of -1 and 1, and an absolute error of a few 1e-8 near 0. */
static inline float cllm_tanhf(float x) {
    return 1.0f - 2.0f / (cllm_expf(2.0f * x) + 1.0f);
}

/* max(x[:n]), NaNs skipped, -INFINITY for n = 0. A plain loop, one running `m = x > m ? x : m`, is a chain of
 * dependent compares that gcc leaves scalar (it may not turn it into a max reduction while NaNs are honoured):
 * it took a third of the attention forward. Two vectors of running maxima (GCC vector extensions, lowered to
 * whatever SSE, AVX or AVX-512 the build targets) go a vector at a time. A max is exact in any order. */
typedef float cllm_v8f __attribute__((vector_size(32)));
typedef int cllm_v8i __attribute__((vector_size(32)));

static inline float cllm_row_max(const float* x, ptrdiff_t n) {
    cllm_v8f a = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    cllm_v8f b = a, v, w;
    cllm_v8i take;
    ptrdiff_t i = 0;
    float m = -INFINITY;
    for (; i + 16 <= n; i += 16) {
        memcpy(&v, x + i, sizeof v);
        memcpy(&w, x + i + 8, sizeof w);
        take = v > a;
        a = (cllm_v8f)(((cllm_v8i)v & take) | ((cllm_v8i)a & ~take));
        take = w > b;
        b = (cllm_v8f)(((cllm_v8i)w & take) | ((cllm_v8i)b & ~take));
    }
    for (; i < n; i++)
        m = x[i] > m ? x[i] : m;
    for (int k = 0; k < 8; k++) {
        m = a[k] > m ? a[k] : m;
        m = b[k] > m ? b[k] : m;
    }
    return m;
}

#endif
