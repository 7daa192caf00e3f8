/* Products of float activations with GGML's block-quantized weights (cllm/quantized.py has GGML's layouts).

   The activations are quantized on the fly, a row at a time, to int8 in blocks of 32 (d = max|x| / 127,
   q = x / d rounded to nearest, as llama.cpp quantizes them for its Q8_0 and Q4_0 products), with the integer sum
   of every 16. A weight block then meets an activation block as integers: its codes are read as unsigned bytes
   with an offset (Q8_0's signed ones with 128 added, Q4_0's nibbles less 8, ...), one u8 x s8 dot product gives
   sum(code * q) in 32-bit lanes, and the offset comes back out through the activation sums, in integers:
       sum_k w_k x_k  ~=  d_a * sum over the weight's scale groups g of  scale_g * (sum_k code_k q_k - offset_g * sum_k q_k)
   (Q4_K's min is a value, not a code: dmin * min_g * d_a * sum_k q_k comes off in float). Every type shares that
   inner product (vpdpbusd with AVX-512 VNNI or AVX-VNNI, maddubs and madd with AVX2) and differs only in how it
   unpacks its codes and scales.

   Here: the types' reference row functions in portable C (dequantization, which also serves the embedding lookup,
   and the dot product, the scalar path), cllm's packed layout and its packing, and the dispatch; the SIMD forms
   on the packed layout are quants_simd.h's, compiled per target and chosen at run time from the CPU's features
   (quant_best_isa). Every output is one thread's sum in one fixed order, so it does not depend on the number of
   threads.

   Nothing here checks its arguments: cllm/_kernels/quantized.pyx does, at the boundary. */
#ifndef CLLM_QUANTS_H
#define CLLM_QUANTS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__x86_64__) || defined(__i386__)
#define CLLM_X86 1
#include <immintrin.h>
#endif

enum { QA_BLOCK = 32, QA_GROUP = 16, QK = 256 };

/* The GGML types with kernels, in cllm's own numbering (quantized.pyx maps GGML's ids onto these). */
enum quant_type { QT_Q8_0, QT_Q4_0, QT_Q5_0, QT_Q4_K, QT_Q6_K, QT_COUNT };
/* Values per block and bytes per block, per type. */
static const int QT_BLOCK[QT_COUNT] = {32, 32, 32, 256, 256};
static const int QT_BYTES[QT_COUNT] = {34, 18, 22, 144, 210};

/* The instruction-set paths, portable first. */
enum quant_isa { ISA_SCALAR, ISA_AVX2, ISA_AVXVNNI, ISA_AVX512VNNI, ISA_COUNT };

/* One activation row, quantized: q[cols] codes, d[cols / 32] scales, s16[cols / 16] sums of 16 codes. */
typedef struct {
    const int8_t *q;
    const float *d;
    const int32_t *s16;
} qact;

static inline float fp16_to_float(uint16_t h) {
    /* IEEE half to single, exactly (subnormals and inf/NaN included). */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else if (exp == 0) {
        float f = (float)mant * (1.0f / 16777216.0f); /* mant * 2^-24 */
        return sign ? -f : f;
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t read_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Q4_K's 6-bit (scale, min) pair of sub-block j, from its 12 packed bytes. */
static inline void q4k_scale_min(const uint8_t *s, int j, int *scale, int *min) {
    if (j < 4) {
        *scale = s[j] & 63;
        *min = s[j + 4] & 63;
    } else {
        *scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* ------------------------------------------------------------------------------------------------------------
   Activations */

static void quantize_activation_row(const float *x, int64_t cols, int8_t *q, float *d, int32_t *s16) {
    for (int64_t b = 0; b < cols / QA_BLOCK; b++) {
        const float *xb = x + b * QA_BLOCK;
        float amax = 0.0f;
        int nan = 0;
        for (int k = 0; k < QA_BLOCK; k++) { /* (loops that gcc vectorises) */
            float a = fabsf(xb[k]);
            amax = a > amax ? a : amax;
            nan |= a != a;
        }
        if (nan) amax = NAN; /* the block's scale is NaN, and so is every product with it */
        float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
        d[b] = amax / 127.0f;
        int8_t *qb = q + b * QA_BLOCK;
        for (int k = 0; k < QA_BLOCK; k++) {
            float v = nearbyintf(xb[k] * inverse); /* |v| <= 127, but for NaN or inf, which become 0 */
            qb[k] = (int8_t)(v >= -127.0f && v <= 127.0f ? (int)v : 0);
        }
        for (int g = 0; g < 2; g++) {
            int32_t sum = 0;
            for (int k = g * QA_GROUP; k < (g + 1) * QA_GROUP; k++) sum += qb[k];
            s16[2 * b + g] = sum;
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------
   Reference row functions: dequantization (the embedding lookup) and the dot product with a quantized
   activation row. */

static void dequant_ref(int type, const uint8_t *w, int64_t cols, float *out) {
    for (int64_t b = 0; b < cols / QT_BLOCK[type]; b++, w += QT_BYTES[type]) {
        float *y = out + b * QT_BLOCK[type];
        if (type == QT_Q8_0) {
            float d = fp16_to_float(read_u16(w));
            for (int k = 0; k < 32; k++) y[k] = d * (float)(int8_t)w[2 + k];
        } else if (type == QT_Q4_0) {
            float d = fp16_to_float(read_u16(w));
            for (int k = 0; k < 16; k++) {
                y[k] = d * (float)((w[2 + k] & 0x0F) - 8);
                y[k + 16] = d * (float)((w[2 + k] >> 4) - 8);
            }
        } else if (type == QT_Q5_0) {
            float d = fp16_to_float(read_u16(w));
            uint32_t high;
            memcpy(&high, w + 2, 4);
            for (int k = 0; k < 16; k++) {
                y[k] = d * (float)((int)((w[6 + k] & 0x0F) | ((high >> k) & 1) << 4) - 16);
                y[k + 16] = d * (float)((int)((w[6 + k] >> 4) | ((high >> (k + 16)) & 1) << 4) - 16);
            }
        } else if (type == QT_Q4_K) {
            float d = fp16_to_float(read_u16(w)), dmin = fp16_to_float(read_u16(w + 2));
            const uint8_t *qs = w + 16;
            for (int j = 0; j < 8; j++) {
                int sc, m;
                q4k_scale_min(w + 4, j, &sc, &m);
                float scale = d * (float)sc, offset = dmin * (float)m;
                const uint8_t *bytes = qs + (j / 2) * 32;
                for (int k = 0; k < 32; k++) {
                    int code = j % 2 ? bytes[k] >> 4 : bytes[k] & 0x0F;
                    y[j * 32 + k] = scale * (float)code - offset;
                }
            }
        } else { /* QT_Q6_K */
            const uint8_t *ql = w, *qh = w + 128;
            const int8_t *sc = (const int8_t *)(w + 192);
            float d = fp16_to_float(read_u16(w + 208));
            for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, y += 128) {
                for (int l = 0; l < 32; l++) {
                    int is = l / 16;
                    y[l] = d * (float)sc[is] * (float)(((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32);
                    y[l + 32] = d * (float)sc[is + 2] * (float)(((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32);
                    y[l + 64] = d * (float)sc[is + 4] * (float)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                    y[l + 96] = d * (float)sc[is + 6] * (float)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
                }
            }
        }
    }
}

/* The unsigned codes of one block of a type, in value order, and per group of 16 values its scale and offset
   (value = scale * (code - offset), an offset in codes); Q4_K's min is carried as scale * offset = dmin * min,
   so its offset is fractional: min_scale holds dmin * min per group instead, and offset is 0. */
typedef struct {
    uint8_t code[QK];
    float scale[QK / QA_GROUP];
    float offset[QK / QA_GROUP];    /* in codes */
    float min_value[QK / QA_GROUP]; /* subtracted as a value (Q4_K) */
} unpacked_block;

static void unpack_ref(int type, const uint8_t *w, unpacked_block *u) {
    int n = QT_BLOCK[type];
    for (int g = 0; g < n / QA_GROUP; g++) u->min_value[g] = 0.0f;
    if (type == QT_Q8_0 || type == QT_Q4_0 || type == QT_Q5_0) {
        float d = fp16_to_float(read_u16(w));
        float offset = type == QT_Q8_0 ? 128.0f : type == QT_Q4_0 ? 8.0f : 16.0f;
        for (int g = 0; g < 2; g++) u->scale[g] = d, u->offset[g] = offset;
        if (type == QT_Q8_0) {
            for (int k = 0; k < 32; k++) u->code[k] = w[2 + k] ^ 0x80;
        } else if (type == QT_Q4_0) {
            for (int k = 0; k < 16; k++) u->code[k] = w[2 + k] & 0x0F, u->code[k + 16] = w[2 + k] >> 4;
        } else {
            uint32_t high;
            memcpy(&high, w + 2, 4);
            for (int k = 0; k < 16; k++) {
                u->code[k] = (w[6 + k] & 0x0F) | (((high >> k) & 1) << 4);
                u->code[k + 16] = (w[6 + k] >> 4) | (((high >> (k + 16)) & 1) << 4);
            }
        }
    } else if (type == QT_Q4_K) {
        float d = fp16_to_float(read_u16(w)), dmin = fp16_to_float(read_u16(w + 2));
        for (int j = 0; j < 8; j++) {
            int sc, m;
            q4k_scale_min(w + 4, j, &sc, &m);
            for (int g = 2 * j; g < 2 * j + 2; g++) {
                u->scale[g] = d * (float)sc, u->offset[g] = 0.0f, u->min_value[g] = dmin * (float)m;
            }
            const uint8_t *bytes = w + 16 + (j / 2) * 32;
            for (int k = 0; k < 32; k++) u->code[j * 32 + k] = j % 2 ? bytes[k] >> 4 : bytes[k] & 0x0F;
        }
    } else { /* QT_Q6_K */
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        float d = fp16_to_float(read_u16(w + 208));
        for (int half = 0; half < 2; half++) {
            const uint8_t *l8 = ql + 64 * half, *h8 = qh + 32 * half;
            uint8_t *c = u->code + 128 * half;
            for (int l = 0; l < 32; l++) {
                c[l] = (l8[l] & 0x0F) | ((h8[l] & 3) << 4);
                c[l + 32] = (l8[l + 32] & 0x0F) | (((h8[l] >> 2) & 3) << 4);
                c[l + 64] = (l8[l] >> 4) | (((h8[l] >> 4) & 3) << 4);
                c[l + 96] = (l8[l + 32] >> 4) | (((h8[l] >> 6) & 3) << 4);
            }
            for (int g = 0; g < 8; g++) {
                /* groups of 16 in value order: l 0-15 and 16-31 take sc[0], sc[1]; +32: sc[2], sc[3]; ... */
                u->scale[8 * half + g] = d * (float)sc[8 * half + g], u->offset[8 * half + g] = 32.0f;
            }
        }
    }
}

static float dot_ref(int type, const uint8_t *w, qact a, int64_t cols) {
    unpacked_block u;
    float total = 0.0f;
    int n = QT_BLOCK[type];
    for (int64_t b = 0; b < cols / n; b++, w += QT_BYTES[type]) {
        unpack_ref(type, w, &u);
        int64_t first = b * n;
        for (int g = 0; g < n / QA_GROUP; g++) {
            int64_t at = first + g * QA_GROUP;
            int32_t isum = 0;
            for (int k = 0; k < QA_GROUP; k++) isum += (int32_t)u.code[g * QA_GROUP + k] * a.q[at + k];
            int32_t qsum = a.s16[at / QA_GROUP];
            float da = a.d[at / QA_BLOCK];
            total += da * (u.scale[g] * ((float)isum - u.offset[g] * (float)qsum) - u.min_value[g] * (float)qsum);
        }
    }
    return total;
}

/* ------------------------------------------------------------------------------------------------------------
   cllm's packed layout: the rows of a matrix in groups of PACK_ROWS, interleaved 4 bytes at a time, so that one
   256-bit register holds the same 4 codes of 8 rows, a u8 x s8 dot product against 4 activations broadcast to
   every lane advances 8 rows at once, and a row's sum never needs gathering across lanes: an output tile is a
   register. (llama.cpp's runtime repacking for AVX2 interleaves rows so too.) A group holds each block of its 8
   rows in turn; the bytes are GGML's own, moved, so a packed matrix is the size of its blocks:

     Q8_0 (272 bytes a block): float16 d[8], then for k = 0..7: rows' codes 4k..4k+3 (signed)
     Q4_0 (144): float16 d[8], then for k = 0..3: rows' bytes qs[4k..4k+3] (low nibbles values 4k.., high 16+4k..)
     Q5_0 (176): float16 d[8], rows' fifth bits (4 bytes: bit k of byte j is value 4k + j's, bit 4 + k value
          16 + 4k + j's, so that one shift puts run k's in place), then Q4_0's runs of low nibbles
     Q4_K (1184 a super-block): float16 d[8], dmin[8], uint8 scale[sub-block][8], min[sub-block][8], then for each
          64 values j = 0..3 and k = 0..7: rows' qs[32j + 4k ..] (low nibbles values 64j + 4k.., high 64j + 32 + 4k..)
     Q6_K (1680): float16 d[8], int8 scale[16][8], then for half h = 0..1 and k = 0..7 three runs of 32: rows'
          ql[64h + 4k ..], ql[64h + 32 + 4k ..], qh[32h + 4k ..]
   Rows past the last whole group are multiplied from GGML's blocks. */

enum { PACK_ROWS = 8 };

static int64_t packed_block_bytes(int type) { return (int64_t)QT_BYTES[type] * PACK_ROWS + (type == QT_Q4_K ? 32 : 0); }

/* 4 bytes of each of the 8 rows, from offset `at` of their blocks at `src` (rows `stride` bytes apart) */
static inline uint8_t *pack_run(uint8_t *dst, const uint8_t *src, int64_t stride, int64_t at) {
    for (int r = 0; r < PACK_ROWS; r++) memcpy(dst + 4 * r, src + r * stride + at, 4);
    return dst + 4 * PACK_ROWS;
}

/* One group: 8 rows of GGML blocks (rows `stride` bytes apart) into dst, cllm's layout. */
static void pack_group(int type, const uint8_t *src, int64_t stride, int64_t cols, uint8_t *dst) {
    int64_t size = QT_BYTES[type];
    for (int64_t b = 0; b < cols / QT_BLOCK[type]; b++) {
        const uint8_t *blk = src + b * size;
        int d_at = type == QT_Q6_K ? 208 : 0;
        for (int r = 0; r < PACK_ROWS; r++) memcpy(dst + 2 * r, blk + r * stride + d_at, 2);
        dst += 16;
        if (type == QT_Q8_0) {
            for (int k = 0; k < 8; k++) dst = pack_run(dst, blk, stride, 2 + 4 * k);
        } else if (type == QT_Q4_0) {
            for (int k = 0; k < 4; k++) dst = pack_run(dst, blk, stride, 2 + 4 * k);
        } else if (type == QT_Q5_0) {
            for (int r = 0; r < PACK_ROWS; r++) {
                uint32_t high;
                memcpy(&high, blk + r * stride + 2, 4);
                for (int j = 0; j < 4; j++) {
                    uint8_t bits = 0;
                    for (int k = 0; k < 4; k++)
                        bits |= (uint8_t)(((high >> (4 * k + j)) & 1) << k | ((high >> (16 + 4 * k + j)) & 1) << (4 + k));
                    dst[4 * r + j] = bits;
                }
            }
            dst += 32;
            for (int k = 0; k < 4; k++) dst = pack_run(dst, blk, stride, 6 + 4 * k);
        } else if (type == QT_Q4_K) {
            for (int r = 0; r < PACK_ROWS; r++) memcpy(dst + 2 * r, blk + r * stride + 2, 2);
            dst += 16;
            for (int j = 0; j < 8; j++) {
                for (int r = 0; r < PACK_ROWS; r++) {
                    int sc, m;
                    q4k_scale_min(blk + r * stride + 4, j, &sc, &m);
                    dst[8 * j + r] = (uint8_t)sc;
                    dst[64 + 8 * j + r] = (uint8_t)m;
                }
            }
            dst += 128;
            for (int k = 0; k < 32; k++) dst = pack_run(dst, blk, stride, 16 + 4 * k);
        } else { /* QT_Q6_K */
            for (int g = 0; g < 16; g++)
                for (int r = 0; r < PACK_ROWS; r++) dst[8 * g + r] = blk[r * stride + 192 + g];
            dst += 128;
            for (int h = 0; h < 2; h++) {
                for (int k = 0; k < 8; k++) {
                    dst = pack_run(dst, blk, stride, 64 * h + 4 * k);
                    dst = pack_run(dst, blk, stride, 64 * h + 32 + 4 * k);
                    dst = pack_run(dst, blk, stride, 128 + 32 * h + 4 * k);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------------
   SIMD forms: quants_simd.h, once per target, each defining gemm8_<type>_<isa>; the three differ in the u8 x s8
   dot product of 4-byte groups into 32-bit lanes. */

#ifdef CLLM_X86
#define QS_ISA avx2
#define QS_VNNI 0
#define QS_TARGET "avx2,fma,f16c"
#define QS_DPBUSD(acc, u, s) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#include "quants_simd.h"

#define QS_ISA avxvnni
#define QS_VNNI 1
#define QS_TARGET "avx2,fma,f16c,avxvnni"
#define QS_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#include "quants_simd.h"

#define QS_ISA avx512vnni
#define QS_VNNI 1
#define QS_TARGET "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"
#define QS_DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#include "quants_simd.h"
#endif

/* out[i, 0..7] = acts[i] . the group's 8 rows (+ bias), for i < n: a packed group's product */
typedef void (*gemm8_fn)(const uint8_t *group, int64_t cols, const qact *acts, int64_t n, float *out, int64_t ldo,
                         const float *bias);
#ifdef CLLM_X86
#define QS_GEMM8(isa) {gemm8_Q8_0_##isa, gemm8_Q4_0_##isa, gemm8_Q5_0_##isa, gemm8_Q4_K_##isa, gemm8_Q6_K_##isa}
static const gemm8_fn GEMM8S[ISA_COUNT][QT_COUNT] = {{NULL}, QS_GEMM8(avx2), QS_GEMM8(avxvnni), QS_GEMM8(avx512vnni)};
#else
static const gemm8_fn GEMM8S[ISA_COUNT][QT_COUNT] = {{NULL}};
#endif

/* The best path this CPU runs. */
static int quant_best_isa(void) {
#ifdef CLLM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
        return ISA_AVX512VNNI;
    if (__builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("fma"))
        return ISA_AVXVNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
        return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

/* ------------------------------------------------------------------------------------------------------------
   The product: out[i, r] = x[i] . W[r] + bias[r] for a matrix of up to QMAX_PARTS row parts, in units of work that
   any thread may take: a part's packed groups of 8 rows, then its remaining rows ROW_CHUNK at a time. Each output
   is computed whole by the unit that holds it, so how units are shared out never changes a result. */

enum { QMAX_PARTS = 4, ROW_CHUNK = 16 };

typedef struct {
    int type;
    int64_t rows, row_bytes;
    const uint8_t *data;
    const uint8_t *packed; /* its whole groups of PACK_ROWS rows in cllm's layout, or NULL */
} quant_part;

/* A weight matrix (rows, cols) as parts stacked by rows; nparts 0 stands for one that is not quantized. */
typedef struct {
    int nparts;
    int64_t rows, cols;
    quant_part parts[QMAX_PARTS];
} qmatrix;

static int64_t part_groups(int isa, const quant_part *w) {
    return w->packed && GEMM8S[isa][w->type] ? w->rows / PACK_ROWS : 0;
}

static int64_t part_units(int isa, const quant_part *w) {
    int64_t groups = part_groups(isa, w);
    return groups + (w->rows - groups * PACK_ROWS + ROW_CHUNK - 1) / ROW_CHUNK;
}

static int64_t quant_units(int isa, const qmatrix *w) {
    int64_t units = 0;
    for (int p = 0; p < w->nparts; p++) units += part_units(isa, &w->parts[p]);
    return units;
}

/* Units u0..u1 of the product (a thread's share). */
static void quant_matmul_units(int isa, const qmatrix *w, const qact *acts, int64_t n, float *out, int64_t ldo,
                               const float *bias, int64_t u0, int64_t u1) {
    int64_t first_unit = 0, first_row = 0, cols = w->cols;
    for (int p = 0; p < w->nparts && first_unit < u1; p++) {
        const quant_part *part = &w->parts[p];
        int64_t groups = part_groups(isa, part), units = part_units(isa, part);
        int64_t group_bytes = cols / QT_BLOCK[part->type] * packed_block_bytes(part->type);
        int64_t lo = u0 > first_unit ? u0 - first_unit : 0, hi = u1 - first_unit < units ? u1 - first_unit : units;
        for (int64_t u = lo; u < hi; u++) {
            if (u < groups) { /* 8 packed rows, every activation row */
                int64_t r = first_row + u * PACK_ROWS;
                GEMM8S[isa][part->type](part->packed + u * group_bytes, cols, acts, n, out + r, ldo, bias ? bias + r : NULL);
                continue;
            }
            int64_t r0 = groups * PACK_ROWS + (u - groups) * ROW_CHUNK;
            int64_t r1 = r0 + ROW_CHUNK < part->rows ? r0 + ROW_CHUNK : part->rows;
            for (int64_t i = 0; i < n; i++) {
                for (int64_t r = r0; r < r1; r++) {
                    float v = dot_ref(part->type, part->data + r * part->row_bytes, acts[i], cols);
                    out[i * ldo + first_row + r] = bias ? v + bias[first_row + r] : v;
                }
            }
        }
        first_unit += units;
        first_row += part->rows;
    }
}

/* Activation rows quantized for a product: n rows of cols values in one allocation of quant_act_bytes(n, cols),
   laid out by quant_act_layout. */
static size_t quant_act_bytes(int64_t n, int64_t cols) {
    return (size_t)n * (sizeof(qact) + (size_t)cols + (size_t)cols / QA_BLOCK * sizeof(float) +
                        (size_t)cols / QA_GROUP * sizeof(int32_t));
}

static qact *quant_act_layout(void *memory, int64_t n, int64_t cols) {
    qact *rows = (qact *)memory;
    float *d = (float *)(rows + n);
    int32_t *s16 = (int32_t *)(d + n * (cols / QA_BLOCK));
    int8_t *q = (int8_t *)(s16 + n * (cols / QA_GROUP));
    for (int64_t i = 0; i < n; i++) {
        rows[i].q = q + i * cols;
        rows[i].d = d + i * (cols / QA_BLOCK);
        rows[i].s16 = s16 + i * (cols / QA_GROUP);
    }
    return rows;
}

/* Rows i0..i1 of x quantized into their places (a thread's share of the rows). */
static void quant_act_quantize(qact *rows, const float *x, int64_t cols, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++)
        quantize_activation_row(x + i * cols, cols, (int8_t *)rows[i].q, (float *)rows[i].d, (int32_t *)rows[i].s16);
}

static void quant_act_rows(void *memory, int64_t n, int64_t cols, const float *x, qact *rows_out[]) {
    *rows_out = quant_act_layout(memory, n, cols);
    quant_act_quantize(*rows_out, x, cols, 0, n);
}

/* The whole product on `threads` threads, each a contiguous share of the units; -1 if the activations' memory
   cannot be allocated. */
static int quant_matmul(int isa, const qmatrix *w, const float *x, int64_t n, float *out, int64_t ldo,
                        const float *bias, int threads) {
    void *memory = malloc(quant_act_bytes(n, w->cols));
    if (memory == NULL) return -1;
    qact *acts = quant_act_layout(memory, n, w->cols);
    int64_t units = quant_units(isa, w);
#pragma omp parallel num_threads(threads) if (threads > 1 && units > 1)
    {
        int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
        quant_act_quantize(acts, x, w->cols, n * t / team, n * (t + 1) / team);
#pragma omp barrier
        quant_matmul_units(isa, w, acts, n, out, ldo, bias, units * t / team, units * (t + 1) / team);
    }
    free(memory);
    return 0;
}

#endif
