/* The SIMD forms of quants.h's products, on its packed layout, 256 bits wide, included once per target with
       QS_ISA     the path's name, the suffix of every function here
       QS_TARGET  gcc's target string for it
       QS_DPBUSD  (acc, u, s): acc + the u8 x s8 products of each 4-byte group, summed into 32-bit lanes
       QS_VNNI    1 if QS_DPBUSD is one instruction (it then takes any u8), 0 for AVX2's maddubs, which saturates
                  pairs of products at 2^15: every code is below 2^7 there but Q8_0's, which it multiplies as |w|
                  times x with w's sign.
   A product's lanes are its 8 rows: each sums codes times activation codes as integers per block of 32, takes
   the codes' offset out in integers, and is scaled per group in float, in one fixed order. */

#define QS_CAT2(a, b) a##_##b
#define QS_CAT(a, b) QS_CAT2(a, b)
#define QS_FN(name) QS_CAT(name, QS_ISA)
#define QS_ATTR static inline __attribute__((target(QS_TARGET)))

QS_ATTR __m256i QS_FN(load32)(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* A packed group (8 rows) against NR activation rows at a time, which share each load of the weights. */

#define QS_INLINE static inline __attribute__((always_inline, target(QS_TARGET)))

QS_INLINE __m256i QS_FN(bcast4)(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* acc[t] + signed codes w (8 rows x 4) times 4 activations x (every lane), exactly */
#if QS_VNNI
#define QS_SIGNED(acc, w, x) QS_DPBUSD((acc), _mm256_xor_si256((w), _mm256_set1_epi8((char)0x80)), (x))
#define QS_SIGNED_OFFSET 128 /* the xor added 128 to every code: taken out per block */
#else
#define QS_SIGNED(acc, w, x) QS_DPBUSD((acc), _mm256_sign_epi8((w), (w)), _mm256_sign_epi8((x), (w)))
#define QS_SIGNED_OFFSET 0
#endif

QS_INLINE void QS_FN(store8)(__m256 v, float *out, const float *bias) {
    _mm256_storeu_ps(out, bias ? _mm256_add_ps(v, _mm256_loadu_ps(bias)) : v);
}

/* sum(q) of activation block b, as every lane */
QS_INLINE __m256i QS_FN(block_sum)(const qact *a, int64_t b) {
    return _mm256_set1_epi32(a->s16[2 * b] + a->s16[2 * b + 1]);
}

QS_INLINE void QS_FN(tile_Q8_0)(const uint8_t *g, int64_t cols, const qact *a, float *out, int64_t ldo,
                                const float *bias, const int NR) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < cols / 32; b++, g += 272) {
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        __m256i p[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int k = 0; k < 8; k++) {
            __m256i w = QS_FN(load32)(g + 16 + 32 * k);
            for (int t = 0; t < NR; t++) p[t] = QS_SIGNED(p[t], w, QS_FN(bcast4)(a[t].q + 32 * b + 4 * k));
        }
        for (int t = 0; t < NR; t++) {
            if (QS_SIGNED_OFFSET) p[t] = _mm256_sub_epi32(p[t], _mm256_slli_epi32(QS_FN(block_sum)(&a[t], b), 7));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[t]), _mm256_mul_ps(dw, _mm256_set1_ps(a[t].d[b])), acc[t]);
        }
    }
    for (int t = 0; t < NR; t++) QS_FN(store8)(acc[t], out + t * ldo, bias);
}

/* Q4_0 and Q5_0, whose packed blocks differ only in Q5_0's fifth bits (32 bytes after the scales) and the codes'
   offset (8 or 16); with `fifth` a constant, each inlined form keeps its own half. */
QS_INLINE void QS_FN(tile_nibbles)(const uint8_t *g, int64_t cols, const qact *a, float *out, int64_t ldo,
                                   const float *bias, const int NR, const int fifth) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    const int runs = fifth ? 48 : 16, offset_shift = fifth ? 4 : 3; /* codes less 16, or less 8 */
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < cols / 32; b++, g += fifth ? 176 : 144) {
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        __m256i bits = fifth ? QS_FN(load32)(g + 16) : _mm256_setzero_si256();
        __m256i p[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int k = 0; k < 4; k++) {
            __m256i w = QS_FN(load32)(g + runs + 32 * k);
            __m256i lo = _mm256_and_si256(w, low4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
            if (fifth) {
                /* bit k of each byte to bit 4 for the low nibbles' values, bit 4 + k for the high ones' (16-bit
                   shifts: bit 4 of a byte only ever receives a bit of the same byte) */
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(bits, 4 - k), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srli_epi16(bits, k), bit4));
            }
            for (int t = 0; t < NR; t++) {
                p[t] = QS_DPBUSD(p[t], lo, QS_FN(bcast4)(a[t].q + 32 * b + 4 * k));
                p[t] = QS_DPBUSD(p[t], hi, QS_FN(bcast4)(a[t].q + 32 * b + 16 + 4 * k));
            }
        }
        for (int t = 0; t < NR; t++) {
            p[t] = _mm256_sub_epi32(p[t], _mm256_slli_epi32(QS_FN(block_sum)(&a[t], b), offset_shift));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[t]), _mm256_mul_ps(dw, _mm256_set1_ps(a[t].d[b])), acc[t]);
        }
    }
    for (int t = 0; t < NR; t++) QS_FN(store8)(acc[t], out + t * ldo, bias);
}

QS_INLINE void QS_FN(tile_Q4_0)(const uint8_t *g, int64_t cols, const qact *a, float *out, int64_t ldo,
                                const float *bias, const int NR) {
    QS_FN(tile_nibbles)(g, cols, a, out, ldo, bias, NR, 0);
}

QS_INLINE void QS_FN(tile_Q5_0)(const uint8_t *g, int64_t cols, const qact *a, float *out, int64_t ldo,
                                const float *bias, const int NR) {
    QS_FN(tile_nibbles)(g, cols, a, out, ldo, bias, NR, 1);
}

QS_INLINE __m256 QS_FN(bytes8_u)(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

QS_INLINE void QS_FN(tile_Q4_K)(const uint8_t *g, int64_t cols, const qact *a, float *out, int64_t ldo,
                                const float *bias, const int NR) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t sb = 0; sb < cols / QK; sb++, g += 1184) {
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + 16)));
        const uint8_t *qs = g + 160;
        for (int j = 0; j < 4; j++) { /* sub-blocks 2j (low nibbles) and 2j + 1 (high) */
            __m256i lo[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            __m256i hi[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int k = 0; k < 8; k++) {
                __m256i w = QS_FN(load32)(qs + 32 * (8 * j + k));
                __m256i wl = _mm256_and_si256(w, low4), wh = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
                for (int t = 0; t < NR; t++) {
                    const int8_t *x = a[t].q + QK * sb + 64 * j + 4 * k;
                    lo[t] = QS_DPBUSD(lo[t], wl, QS_FN(bcast4)(x));
                    hi[t] = QS_DPBUSD(hi[t], wh, QS_FN(bcast4)(x + 32));
                }
            }
            __m256 scale_lo = _mm256_mul_ps(d, QS_FN(bytes8_u)(g + 32 + 16 * j));
            __m256 scale_hi = _mm256_mul_ps(d, QS_FN(bytes8_u)(g + 40 + 16 * j));
            __m256 min_lo = _mm256_mul_ps(dmin, QS_FN(bytes8_u)(g + 96 + 16 * j));
            __m256 min_hi = _mm256_mul_ps(dmin, QS_FN(bytes8_u)(g + 104 + 16 * j));
            for (int t = 0; t < NR; t++) {
                int64_t b = 8 * sb + 2 * j;
                float da = a[t].d[b], db = a[t].d[b + 1];
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo[t]), _mm256_mul_ps(scale_lo, _mm256_set1_ps(da)), acc[t]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi[t]), _mm256_mul_ps(scale_hi, _mm256_set1_ps(db)), acc[t]);
                acc[t] = _mm256_fnmadd_ps(min_lo, _mm256_set1_ps(da * (float)(a[t].s16[2 * b] + a[t].s16[2 * b + 1])),
                                          acc[t]);
                acc[t] = _mm256_fnmadd_ps(min_hi, _mm256_set1_ps(db * (float)(a[t].s16[2 * b + 2] + a[t].s16[2 * b + 3])),
                                          acc[t]);
            }
        }
    }
    for (int t = 0; t < NR; t++) QS_FN(store8)(acc[t], out + t * ldo, bias);
}

QS_INLINE void QS_FN(tile_Q6_K)(const uint8_t *g, int64_t cols, const qact *a, float *out, int64_t ldo,
                                const float *bias, const int NR) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(0x03);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t sb = 0; sb < cols / QK; sb++, g += 1680) {
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        const int8_t *sc = (const int8_t *)(g + 16);
        for (int h = 0; h < 2; h++) {
            for (int g4 = 0; g4 < 2; g4++) { /* 16 values of each of the four runs of 32 */
                __m256i p[4][4]; /* [run e][activation row t] */
                for (int e = 0; e < 4; e++)
                    for (int t = 0; t < 4; t++) p[e][t] = _mm256_setzero_si256();
                for (int kk = 0; kk < 4; kk++) {
                    int k = 4 * g4 + kk;
                    const uint8_t *run = g + 144 + 96 * (8 * h + k);
                    __m256i A = QS_FN(load32)(run), B = QS_FN(load32)(run + 32), H = QS_FN(load32)(run + 64);
                    __m256i c[4] = {
                        _mm256_or_si256(_mm256_and_si256(A, low4), _mm256_slli_epi16(_mm256_and_si256(H, low2), 4)),
                        _mm256_or_si256(_mm256_and_si256(B, low4),
                                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 2), low2), 4)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), low4),
                                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 4), low2), 4)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), low4),
                                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 6), low2), 4)),
                    };
                    for (int t = 0; t < NR; t++) {
                        const int8_t *x = a[t].q + QK * sb + 128 * h + 4 * k;
                        for (int e = 0; e < 4; e++) p[e][t] = QS_DPBUSD(p[e][t], c[e], QS_FN(bcast4)(x + 32 * e));
                    }
                }
                for (int e = 0; e < 4; e++) { /* values 128h + 32e + 16 g4 ..: scale 8h + 2e + g4, block 8sb + 4h + e */
                    __m256 scale = _mm256_mul_ps(
                        d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sc + 8 * (8 * h + 2 * e + g4))))));
                    for (int t = 0; t < NR; t++) {
                        int64_t b = 8 * sb + 4 * h + e;
                        __m256i q = _mm256_sub_epi32(p[e][t], _mm256_slli_epi32(_mm256_set1_epi32(a[t].s16[2 * b + g4]), 5));
                        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_mul_ps(scale, _mm256_set1_ps(a[t].d[b])), acc[t]);
                    }
                }
            }
        }
    }
    for (int t = 0; t < NR; t++) QS_FN(store8)(acc[t], out + t * ldo, bias);
}

/* A packed group against every activation row: tiles of 4 rows, then one at a time. */
#define QS_GEMM8_OF(T)                                                                                              \
    QS_ATTR void QS_FN(gemm8_##T)(const uint8_t *g, int64_t cols, const qact *acts, int64_t n, float *out,         \
                                  int64_t ldo, const float *bias) {                                                \
        int64_t i = 0;                                                                                             \
        for (; i + 4 <= n; i += 4) QS_FN(tile_##T)(g, cols, acts + i, out + i * ldo, ldo, bias, 4);                \
        for (; i < n; i++) QS_FN(tile_##T)(g, cols, acts + i, out + i * ldo, ldo, bias, 1);                        \
    }
QS_GEMM8_OF(Q8_0)
QS_GEMM8_OF(Q4_0)
QS_GEMM8_OF(Q5_0)
QS_GEMM8_OF(Q4_K)
QS_GEMM8_OF(Q6_K)

#undef QS_SIGNED
#undef QS_SIGNED_OFFSET
#undef QS_ISA
#undef QS_TARGET
#undef QS_DPBUSD
#undef QS_VNNI
