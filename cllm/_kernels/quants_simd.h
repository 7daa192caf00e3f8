/* The SIMD forms of quants.h's dot products, 256 bits wide, included once per target with
       QS_ISA     the path's name, the suffix of every function here
       QS_TARGET  gcc's target string for it
       QS_DPBUSD  (acc, u, s): acc + the u8 x s8 products of each 4-byte group, summed into 32-bit lanes
   Each dot_<type>_<isa> computes exactly what dot_ref does, in its own fixed order: codes times activation codes
   as integers per block of 32, scaled per group in float. maddubs (AVX2) saturates pairs at 2^15: every code
   here is below 2^7 but Q8_0's, whose weights are therefore multiplied as |w| times a with w's sign. */

#define QS_CAT2(a, b) a##_##b
#define QS_CAT(a, b) QS_CAT2(a, b)
#define QS_FN(name) QS_CAT(name, QS_ISA)
#define QS_ATTR static inline __attribute__((target(QS_TARGET)))

QS_ATTR float QS_FN(hsum)(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

QS_ATTR __m256i QS_FN(load32)(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* The lanes of sum((code - offset) x) for unsigned codes: the offset is taken out of every lane in integers, before
   the lanes become floats (subtracting offset * sum(x) once, in float, cancels two large sums). */
QS_ATTR __m256i QS_FN(offset_dot)(__m256i codes, uint8_t offset, __m256i x) {
    __m256i p = QS_DPBUSD(_mm256_setzero_si256(), codes, x);
    return _mm256_sub_epi32(p, QS_DPBUSD(_mm256_setzero_si256(), _mm256_set1_epi8((char)offset), x));
}

/* acc + int32 lanes p (as floats) times scale */
QS_ATTR __m256 QS_FN(scaled)(__m256i p, __m256 scale, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc);
}

QS_ATTR float QS_FN(dot_Q8_0)(const uint8_t *w, qact a, int64_t cols) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < cols / 32; b++, w += 34) {
        __m256i codes = QS_FN(load32)(w + 2), x = QS_FN(load32)(a.q + 32 * b);
        __m256i p = QS_DPBUSD(_mm256_setzero_si256(), _mm256_sign_epi8(codes, codes), _mm256_sign_epi8(x, codes));
        acc = QS_FN(scaled)(p, _mm256_set1_ps(_cvtsh_ss(read_u16(w)) * a.d[b]), acc);
    }
    return QS_FN(hsum)(acc);
}

/* Q4_0's 32 codes, in value order: the 16 bytes' low nibbles, then their high nibbles */
QS_ATTR __m256i QS_FN(nibbles16)(const uint8_t *p) {
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(0x0F));
}

QS_ATTR float QS_FN(dot_Q4_0)(const uint8_t *w, qact a, int64_t cols) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < cols / 32; b++, w += 18) {
        __m256i p = QS_FN(offset_dot)(QS_FN(nibbles16)(w + 2), 8, QS_FN(load32)(a.q + 32 * b));
        acc = QS_FN(scaled)(p, _mm256_set1_ps(_cvtsh_ss(read_u16(w)) * a.d[b]), acc);
    }
    return QS_FN(hsum)(acc);
}

/* 0x10 in byte k where bit k of the 32 bits is set: Q5_0's fifth bits */
QS_ATTR __m256i QS_FN(high_bits)(uint32_t bits) {
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i select = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i x = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread); /* byte k: byte k / 8 of bits */
    x = _mm256_cmpeq_epi8(_mm256_and_si256(x, select), select);           /* 0xFF where bit k is set */
    return _mm256_and_si256(x, _mm256_set1_epi8(0x10));
}

QS_ATTR float QS_FN(dot_Q5_0)(const uint8_t *w, qact a, int64_t cols) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < cols / 32; b++, w += 22) {
        uint32_t high;
        memcpy(&high, w + 2, 4);
        __m256i codes = _mm256_or_si256(QS_FN(nibbles16)(w + 6), QS_FN(high_bits)(high));
        __m256i p = QS_FN(offset_dot)(codes, 16, QS_FN(load32)(a.q + 32 * b));
        acc = QS_FN(scaled)(p, _mm256_set1_ps(_cvtsh_ss(read_u16(w)) * a.d[b]), acc);
    }
    return QS_FN(hsum)(acc);
}

QS_ATTR float QS_FN(dot_Q4_K)(const uint8_t *w, qact a, int64_t cols) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f; /* sum of dmin * min_j * d_a * sum(q) */
    for (int64_t sb = 0; sb < cols / QK; sb++, w += 144) {
        float d = _cvtsh_ss(read_u16(w)), dmin = _cvtsh_ss(read_u16(w + 2));
        for (int j = 0; j < 4; j++) { /* 64 values: low nibbles the first 32 (sub-block 2j), high the next */
            int64_t b = 8 * sb + 2 * j;
            int sc0, m0, sc1, m1;
            q4k_scale_min(w + 4, 2 * j, &sc0, &m0);
            q4k_scale_min(w + 4, 2 * j + 1, &sc1, &m1);
            __m256i bytes = QS_FN(load32)(w + 16 + 32 * j);
            __m256i p0 = QS_DPBUSD(_mm256_setzero_si256(), _mm256_and_si256(bytes, low4), QS_FN(load32)(a.q + 32 * b));
            __m256i p1 = QS_DPBUSD(_mm256_setzero_si256(), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4),
                                   QS_FN(load32)(a.q + 32 * b + 32));
            acc = QS_FN(scaled)(p0, _mm256_set1_ps(d * (float)sc0 * a.d[b]), acc);
            acc = QS_FN(scaled)(p1, _mm256_set1_ps(d * (float)sc1 * a.d[b + 1]), acc);
            mins += dmin * (float)m0 * a.d[b] * (float)(a.s16[2 * b] + a.s16[2 * b + 1]) +
                    dmin * (float)m1 * a.d[b + 1] * (float)(a.s16[2 * b + 2] + a.s16[2 * b + 3]);
        }
    }
    return QS_FN(hsum)(acc) - mins;
}

QS_ATTR float QS_FN(dot_Q6_K)(const uint8_t *w, qact a, int64_t cols) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(0x03);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < cols / QK; sb++, w += 210) {
        const int8_t *sc = (const int8_t *)(w + 192);
        float d = _cvtsh_ss(read_u16(w + 208));
        for (int half = 0; half < 2; half++) {
            __m256i l0 = QS_FN(load32)(w + 64 * half), l1 = QS_FN(load32)(w + 64 * half + 32);
            __m256i hb = QS_FN(load32)(w + 128 + 32 * half);
            __m256i codes[4] = {
                _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_slli_epi16(_mm256_and_si256(hb, low2), 4)),
                _mm256_or_si256(_mm256_and_si256(l1, low4),
                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), low2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), low2), 4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), low2), 4)),
            };
            for (int k = 0; k < 4; k++) { /* 32 values, two groups of 16: lanes 0-3 and 4-7 */
                int64_t b = 8 * sb + 4 * half + k;
                const int8_t *s = sc + 8 * half + 2 * k;
                float f = d * a.d[b], f0 = f * (float)s[0], f1 = f * (float)s[1];
                __m256i p = QS_FN(offset_dot)(codes[k], 32, QS_FN(load32)(a.q + 32 * b));
                acc = QS_FN(scaled)(p, _mm256_set_m128(_mm_set1_ps(f1), _mm_set1_ps(f0)), acc);
            }
        }
    }
    return QS_FN(hsum)(acc);
}

#undef QS_ISA
#undef QS_TARGET
#undef QS_DPBUSD
