/* cllm's float32 matrix product: C = op(A) op(B) (+ C), row-major, in the manner of BLIS.

   The operands are copied, a block at a time, into packed panels: op(B) into panels of NR columns, each one
   kc x NR contiguous floats, and op(A) into panels of up to MR rows (the rows shared out evenly), each kc x MR.
   A register-blocked micro-kernel then computes a tile of C from one panel of each, with every load of B serving
   the panel's rows and every broadcast of A serving NR columns. Packing is what makes the transposes free (each
   is one way of gathering) and what keeps the kernel's loads in L1 whatever the operands' strides.

   The loops, outermost first: NC columns of C at a time; KC steps of the sum at a time, in order (each thread
   packs the B panels it will use); MC rows at a time (A packed by the whole team, between two barriers); then
   each of the block's A panels, held in L1, against each of the thread's B panels, streamed from L2. Threads
   share out the columns only, by whole panels, and the sum runs over k in one order: every element of C is one
   thread's chain of fused multiply-adds,
       c = fma(a[i, k-1], b[k-1, j], ... fma(a[i, 1], b[1, j], fma(a[i, 0], b[0, j], c0)))
   with c0 = 0, or C's value when accumulating; a KC block starts from the value the last one stored. So a result
   depends neither on the thread count nor on the cache blocking (which is tuned per machine), only on the path's
   arithmetic: the SIMD paths all compute that chain, and the portable one whatever its compiler makes of it.

   The paths, chosen at run time from the CPU's features (sgemm_best_isa):
       avx512  MR 14, NR 32: 28 accumulators, two loads of B and 14 broadcasts of A per 28 FMAs
       avx2    MR 6,  NR 16: 12 accumulators (of 16 registers), the classic Haswell tile
       scalar  MR 4,  NR 16: portable C, vectorised by the compiler for the build's target
   Tiles past the edge of C are computed in a buffer (the packing pads with zeros) and copied out, by a
   half-width kernel when they are at most NR / 2 columns wide.

   Nothing here checks its arguments: cllm/_kernels/sgemm.pyx and gemm() in _common.pxd do. */
#ifndef CLLM_SGEMM_H
#define CLLM_SGEMM_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <pthread.h>

#include "barrier.h"

#if defined(__x86_64__) || defined(__i386__)
#define SG_X86 1
#include <immintrin.h>
#endif

enum sgemm_isa { SGEMM_SCALAR, SGEMM_AVX2, SGEMM_AVX512, SGEMM_ISA_COUNT };

enum { SG_MAX_MR = 14, SG_MAX_NR = 32, SG_ALIGN = 64 };
/* How many steps of k ahead the SIMD kernels prefetch B's panel into L1: its panels stream from L2, and the
   hardware's own prefetch into L1 fell behind (about 15% slower without it). */
enum { SG_PREFETCH = 8 };

/* c[0:mr, 0:NR] (+)= the packed panels' product; ap holds kc x MR, bp kc x NR */
typedef void (*sg_kernel_fn)(int mr, int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc,
                             int load_c);

typedef struct {
    int mr, nr;
    int64_t kc, mc, nc; /* cache blocking (nc per thread) */
    sg_kernel_fn kernel, half; /* full tiles, and tiles of at most NR / 2 columns */
} sg_path;

/* ------------------------------------------------------------------------------------------------------------
   Micro-kernels. Each is written once for a tile of `mr` rows and `halves` (1 or 2) halves of the panel's NR
   columns, always inlined into a switch over mr, so that gcc sees constants and keeps the whole tile in
   registers. The half-width form serves a last panel of at most NR / 2 columns at half the work. */

#define SG_UNROLL _Pragma("GCC unroll 16")

/* tile(mr, halves, ...) for the mr at hand, each case with its constant; cases past the path's MR compile to
   nothing */
#define SG_CASE(tile, rows, halves)                                                                            \
    case rows:                                                                                                 \
        if (rows <= max_rows) tile(rows, halves, kc, ap, bp, c, ldc, load_c);                                  \
        break;
#define SG_SWITCH_MR(tile, MR, halves)                                                                         \
    const int max_rows = MR;                                                                                   \
    switch (mr) {                                                                                              \
        SG_CASE(tile, 14, halves) SG_CASE(tile, 13, halves) SG_CASE(tile, 12, halves) SG_CASE(tile, 11, halves) \
        SG_CASE(tile, 10, halves) SG_CASE(tile, 9, halves) SG_CASE(tile, 8, halves) SG_CASE(tile, 7, halves)   \
        SG_CASE(tile, 6, halves) SG_CASE(tile, 5, halves) SG_CASE(tile, 4, halves) SG_CASE(tile, 3, halves)    \
        SG_CASE(tile, 2, halves) SG_CASE(tile, 1, halves)                                                      \
    }
/* A path's full and half-width kernels over its inlined tile */
#define SG_KERNELS(name, attributes, tile, MR)                                                                 \
    attributes static void name(int mr, int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc,    \
                                int load_c) {                                                                  \
        SG_SWITCH_MR(tile, MR, 2)                                                                              \
    }                                                                                                          \
    attributes static void name##_half(int mr, int64_t kc, const float *ap, const float *bp, float *c,          \
                                       int64_t ldc, int load_c) {                                              \
        SG_SWITCH_MR(tile, MR, 1)                                                                              \
    }

static inline __attribute__((always_inline)) void sg_tile_scalar(const int mr, const int halves, int64_t kc,
                                                                 const float *ap, const float *bp, float *c,
                                                                 int64_t ldc, int load_c) {
    enum { MR = 4, NR = 16 };
    const int cols = halves * NR / 2;
    float acc[MR][NR];
    SG_UNROLL for (int i = 0; i < mr; i++)
        for (int j = 0; j < cols; j++) acc[i][j] = load_c ? c[i * ldc + j] : 0.0f;
    for (int64_t p = 0; p < kc; p++, ap += MR, bp += NR)
        SG_UNROLL for (int i = 0; i < mr; i++)
            for (int j = 0; j < cols; j++) acc[i][j] += ap[i] * bp[j];
    SG_UNROLL for (int i = 0; i < mr; i++)
        for (int j = 0; j < cols; j++) c[i * ldc + j] = acc[i][j];
}

SG_KERNELS(sg_kernel_scalar, , sg_tile_scalar, 4)

#ifdef SG_X86
#define SG_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))
#define SG_AVX512_INLINE static inline __attribute__((always_inline, target("avx512f,fma")))

SG_AVX2_INLINE void sg_tile_avx2(const int mr, const int halves, int64_t kc, const float *ap, const float *bp,
                                 float *c, int64_t ldc, int load_c) {
    enum { MR = 6, NR = 16 };
    __m256 acc[MR][2];
    SG_UNROLL for (int i = 0; i < mr; i++)
        SG_UNROLL for (int h = 0; h < halves; h++)
            acc[i][h] = load_c ? _mm256_loadu_ps(c + i * ldc + 8 * h) : _mm256_setzero_ps();
    for (int64_t p = 0; p < kc; p++, ap += MR, bp += NR) {
        __m256 b[2] = {_mm256_load_ps(bp), halves > 1 ? _mm256_load_ps(bp + 8) : _mm256_setzero_ps()};
        _mm_prefetch((const char *)(bp + SG_PREFETCH * NR), _MM_HINT_T0);
        SG_UNROLL for (int i = 0; i < mr; i++) {
            __m256 a = _mm256_broadcast_ss(ap + i);
            SG_UNROLL for (int h = 0; h < halves; h++) acc[i][h] = _mm256_fmadd_ps(a, b[h], acc[i][h]);
        }
    }
    SG_UNROLL for (int i = 0; i < mr; i++)
        SG_UNROLL for (int h = 0; h < halves; h++) _mm256_storeu_ps(c + i * ldc + 8 * h, acc[i][h]);
}

SG_AVX512_INLINE void sg_tile_avx512(const int mr, const int halves, int64_t kc, const float *ap, const float *bp,
                                     float *c, int64_t ldc, int load_c) {
    enum { MR = 14, NR = 32 };
    __m512 acc[MR][2];
    SG_UNROLL for (int i = 0; i < mr; i++)
        SG_UNROLL for (int h = 0; h < halves; h++)
            acc[i][h] = load_c ? _mm512_loadu_ps(c + i * ldc + 16 * h) : _mm512_setzero_ps();
    for (int64_t p = 0; p < kc; p++, ap += MR, bp += NR) {
        __m512 b[2] = {_mm512_load_ps(bp), halves > 1 ? _mm512_load_ps(bp + 16) : _mm512_setzero_ps()};
        _mm_prefetch((const char *)(bp + SG_PREFETCH * NR), _MM_HINT_T0);
        _mm_prefetch((const char *)(bp + SG_PREFETCH * NR + 16), _MM_HINT_T0);
        SG_UNROLL for (int i = 0; i < mr; i++) {
            __m512 a = _mm512_set1_ps(ap[i]);
            SG_UNROLL for (int h = 0; h < halves; h++) acc[i][h] = _mm512_fmadd_ps(a, b[h], acc[i][h]);
        }
    }
    SG_UNROLL for (int i = 0; i < mr; i++)
        SG_UNROLL for (int h = 0; h < halves; h++) _mm512_storeu_ps(c + i * ldc + 16 * h, acc[i][h]);
}

SG_KERNELS(sg_kernel_avx2, __attribute__((target("avx2,fma"))), sg_tile_avx2, 6)
SG_KERNELS(sg_kernel_avx512, __attribute__((target("avx512f,fma"))), sg_tile_avx512, 14)
#endif

/* The paths' tiles and blocking: a KC x MR panel of A (28 KB at avx512's 512 x 14) stays in L1, an MC x KC block
   of A (400 KB) and each thread's NC x KC share of B (1 MB) in its L2. avx512's KC of 512 rather than 256 halves
   the passes over C, which cost a fifth of a 3520 x 768 product with k = 3072 (MLP-down's, embedding a batch). */
static const sg_path SG_PATHS[SGEMM_ISA_COUNT] = {
    {4, 16, 256, 128, 1024, sg_kernel_scalar, sg_kernel_scalar_half},
#ifdef SG_X86
    {6, 16, 256, 192, 1024, sg_kernel_avx2, sg_kernel_avx2_half},
    {14, 32, 512, 196, 512, sg_kernel_avx512, sg_kernel_avx512_half},
#else
    {0}, {0},
#endif
};

/* The best path this CPU runs. */
static int sgemm_best_isa(void) {
#ifdef SG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return SGEMM_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SGEMM_AVX2;
#endif
    return SGEMM_SCALAR;
}

/* ------------------------------------------------------------------------------------------------------------
   Packing. An operand is a row-major matrix read either way: element (r, s) of op(X) is x[r * ld + s], or
   x[s * ld + r] when transposed. */

typedef struct {
    const float *x;
    int64_t ld;
    int trans;
} sg_operand;

#ifdef SG_X86
/* dst[p * ldd + q] = src[q * lds + p] for p, q < 8: an 8 x 8 transpose in registers */
__attribute__((target("avx2"))) static void sg_transpose8(const float *src, int64_t lds, float *dst, int64_t ldd) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
}
#endif

/* dst[p * width + q] = op(X)[p0 + p, q0 + q] for p < kc, q < cols; zero for cols <= q < width. B's panels take
   q as the column; A's take op(A)^T, so that q is the row. `simd`: 8 x 8 blocks of a transposed read through
   registers (the SIMD paths run on CPUs with AVX2). */
static void sg_pack_panel(sg_operand x, int transposed, int64_t p0, int64_t q0, int64_t kc, int64_t cols,
                          int width, int simd, float *dst) {
    if (!transposed) { /* rows of kc are contiguous in q: a copy per row */
        for (int64_t p = 0; p < kc; p++) {
            const float *src = x.x + (p0 + p) * x.ld + q0;
            float *out = dst + p * width;
            memcpy(out, src, cols * sizeof(float));
            for (int64_t q = cols; q < width; q++) out[q] = 0.0f;
        }
        return;
    }
    /* columns are contiguous in p */
    int64_t q = 0;
#ifdef SG_X86
    if (simd) {
        for (; q + 8 <= cols; q += 8) {
            const float *src = x.x + (q0 + q) * x.ld + p0;
            int64_t p = 0;
            for (; p + 8 <= kc; p += 8) sg_transpose8(src + p, x.ld, dst + p * width + q, width);
            for (; p < kc; p++)
                for (int64_t i = 0; i < 8; i++) dst[p * width + q + i] = src[i * x.ld + p];
        }
    }
#endif
    for (; q < cols; q++) {
        const float *src = x.x + (q0 + q) * x.ld + p0;
        for (int64_t p = 0; p < kc; p++) dst[p * width + q] = src[p];
    }
    for (q = cols; q < width; q++)
        for (int64_t p = 0; p < kc; p++) dst[p * width + q] = 0.0f;
}

/* ------------------------------------------------------------------------------------------------------------
   The product. */

typedef struct {
    const sg_path *path;
    sg_operand a, b;
    int64_t m, n, k;
    float *c;
    int64_t ldc;
    int accumulate;
    float *apack; /* shared: one MC x KC block of A */
    float *bpack; /* each thread's panels of one KC x NC block of B, at their place in the block, kc x NR apart */
    int64_t kc;   /* the largest KC block: a panel's stride, the same for the short last block, so that a thread
                     packing its next panels never writes where another still reads its last ones */
    int64_t kblocks;
    int64_t nc;   /* columns per block: the team's share of L2 */
    int simd;     /* a SIMD path: packing may use AVX2 */
    spin_barrier barrier;
} sg_job;

static inline int64_t sg_round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* Where part i of `parts` starts when `size` is shared out evenly: A's rows among its panels, at most MR each, so
   that 128 rows make 10 panels of 12 or 13 rows instead of 9 of 14 and one of 2 (which ran at a fraction of the
   kernel's speed), and k among its KC blocks. */
static inline int64_t sg_panel_start(int64_t i, int64_t parts, int64_t size) { return size * i / parts; }

/* Thread t's tiles of block (jc, pc, ic): every panel of A against each of its panels of B. A's panel (broadcast,
   kc x MR) stays in L1 while B's (loaded as vectors, kc x NR) stream past from L2, prefetched by the kernel. */
static void sg_block_tiles(sg_job *job, int64_t jc, int64_t ncur, int64_t j0, int64_t j1, int64_t kcur, int load_c,
                           int64_t ic, int64_t mcur) {
    const sg_path *path = job->path;
    const int mr = path->mr, nr = path->nr;
    float edge[SG_MAX_MR * SG_MAX_NR] __attribute__((aligned(SG_ALIGN)));
    const int64_t apanels = (mcur + mr - 1) / mr;
    for (int64_t apanel = 0; apanel < apanels; apanel++) {
        int64_t row = sg_panel_start(apanel, apanels, mcur);
        int rows = (int)(sg_panel_start(apanel + 1, apanels, mcur) - row);
        const float *ap = job->apack + apanel * mr * kcur;
        for (int64_t panel = j0; panel < j1; panel++) {
            const float *bp = job->bpack + panel * nr * job->kc;
            int64_t col = jc + panel * nr, cols = ncur - panel * nr < nr ? ncur - panel * nr : nr;
            float *c = job->c + (ic + row) * job->ldc + col;
            if (cols == nr) {
                path->kernel(rows, kcur, ap, bp, c, job->ldc, load_c);
                continue;
            }
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < nr; j++) edge[i * nr + j] = load_c && j < cols ? c[i * job->ldc + j] : 0.0f;
            (cols <= nr / 2 ? path->half : path->kernel)(rows, kcur, ap, bp, edge, nr, load_c);
            for (int i = 0; i < rows; i++) memcpy(c + i * job->ldc, edge + i * nr, cols * sizeof(float));
        }
    }
}

/* Panels j0:j1 of B's block (jc, pc). Stored as it is, B is read a row at a time across all of them: one long
   run per row, which the hardware prefetches, where a panel at a time would read short runs a row apart (a
   weight matrix coming from memory then cost more to pack than to multiply by 128 rows). */
static void sg_pack_b(sg_job *job, int64_t jc, int64_t ncur, int64_t j0, int64_t j1, int64_t pc, int64_t kcur) {
    const int nr = job->path->nr;
    if (job->b.trans) {
        for (int64_t panel = j0; panel < j1; panel++) {
            int64_t col = panel * nr, cols = ncur - col < nr ? ncur - col : nr;
            sg_pack_panel(job->b, 1, pc, jc + col, kcur, cols, nr, job->simd, job->bpack + panel * nr * job->kc);
        }
        return;
    }
    int64_t last = j1 * nr < ncur ? j1 * nr : ncur; /* the columns j0 * nr:last of the block */
    for (int64_t p = 0; p < kcur; p++) {
        const float *src = job->b.x + (pc + p) * job->b.ld + jc;
        for (int64_t panel = j0; panel < j1; panel++) {
            float *out = job->bpack + panel * nr * job->kc + p * nr;
            int64_t col = panel * nr, cols = last - col < nr ? last - col : nr;
            /* copies of a constant size are inlined as vector moves; a call to memcpy per panel cost as much */
            if (cols == 32)
                memcpy(out, src + col, 32 * sizeof(float));
            else if (cols == 16)
                memcpy(out, src + col, 16 * sizeof(float));
            else {
                memcpy(out, src + col, cols * sizeof(float));
                for (int64_t q = cols; q < nr; q++) out[q] = 0.0f;
            }
        }
    }
}

static void sg_thread(sg_job *job, int t, int team) {
    const sg_path *path = job->path;
    const int mr = path->mr, nr = path->nr;
    for (int64_t jc = 0; jc < job->n; jc += job->nc) {
        int64_t ncur = job->n - jc < job->nc ? job->n - jc : job->nc, panels = (ncur + nr - 1) / nr;
        int64_t j0 = panels * t / team, j1 = panels * (t + 1) / team;
        /* a narrower last block shares its panels out differently: wait until no one reads the last block's */
        if (jc > 0) spin_barrier_wait(&job->barrier, team);
        for (int64_t kblock = 0; kblock < job->kblocks; kblock++) {
            int64_t pc = sg_panel_start(kblock, job->kblocks, job->k);
            int64_t kcur = sg_panel_start(kblock + 1, job->kblocks, job->k) - pc;
            int load_c = pc > 0 || job->accumulate;
            /* B's panels: each thread packs the ones it alone reads, so no one waits for them */
            sg_pack_b(job, jc, ncur, j0, j1, pc, kcur);
            for (int64_t ic = 0; ic < job->m; ic += path->mc) {
                int64_t mcur = job->m - ic < path->mc ? job->m - ic : path->mc, apanels = (mcur + mr - 1) / mr;
                spin_barrier_wait(&job->barrier, team); /* everyone is done with the last block of A */
                for (int64_t panel = apanels * t / team; panel < apanels * (t + 1) / team; panel++) {
                    int64_t row = sg_panel_start(panel, apanels, mcur);
                    int64_t rows = sg_panel_start(panel + 1, apanels, mcur) - row;
                    /* op(A)'s rows are op(A)^T's columns: A packs transposed when it is not */
                    sg_pack_panel(job->a, !job->a.trans, pc, ic + row, kcur, rows, mr, job->simd,
                                  job->apack + panel * mr * kcur);
                }
                spin_barrier_wait(&job->barrier, team); /* the block of A is whole */
                sg_block_tiles(job, jc, ncur, j0, j1, kcur, load_c, ic, mcur);
            }
        }
    }
}

/* Each calling thread's packing buffer, kept for its next products and freed when the thread ends: allocated
   afresh per product, its pages were faulted in and zeroed by the kernel every time (7% of a product of 128 rows). */
typedef struct {
    void *data;
    size_t bytes;
} sg_buffer;

static pthread_key_t sg_buffer_key;
static pthread_once_t sg_buffer_once = PTHREAD_ONCE_INIT;

static void sg_buffer_free(void *buffer) {
    free(((sg_buffer *)buffer)->data);
    free(buffer);
}

static void sg_buffer_key_create(void) { pthread_key_create(&sg_buffer_key, sg_buffer_free); }

/* At least `bytes` of this thread's buffer, aligned to SG_ALIGN; NULL without memory */
static void *sg_thread_buffer(size_t bytes) {
    pthread_once(&sg_buffer_once, sg_buffer_key_create);
    sg_buffer *buffer = pthread_getspecific(sg_buffer_key);
    if (buffer == NULL) {
        if ((buffer = calloc(1, sizeof *buffer)) == NULL) return NULL;
        if (pthread_setspecific(sg_buffer_key, buffer) != 0) {
            free(buffer);
            return NULL;
        }
    }
    if (buffer->bytes < bytes) {
        free(buffer->data);
        buffer->data = aligned_alloc(SG_ALIGN, bytes);
        buffer->bytes = buffer->data ? bytes : 0;
    }
    return buffer->data;
}

/* C (m, n) = op(A) (m, k) op(B) (k, n), plus C if `accumulate`, on `threads` threads with path `isa`; -1 if the
   packing buffer cannot be allocated. Not reentrant within one thread (no product calls another). */
static int sgemm_packed(int isa, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, const float *a,
                        int64_t lda, const float *b, int64_t ldb, int accumulate, float *c, int64_t ldc,
                        int threads) {
    const sg_path *path = &SG_PATHS[isa];
    if (m <= 0 || n <= 0) return 0;
    if (k <= 0) {
        if (!accumulate)
            for (int64_t i = 0; i < m; i++) memset(c + i * ldc, 0, n * sizeof(float));
        return 0;
    }
    if (threads > (n + path->nr - 1) / path->nr) threads = (int)((n + path->nr - 1) / path->nr); /* each one a panel */
    /* k in equal blocks of at most KC (576 as 3 x 192, not 256 + 256 + 64) */
    int64_t kblocks = (k + path->kc - 1) / path->kc, kc = (k + kblocks - 1) / kblocks;
    int64_t mc = m < path->mc ? m : path->mc;
    int64_t nc = n < path->nc * threads ? n : path->nc * threads, panels = (nc + path->nr - 1) / path->nr;
    size_t abytes = sg_round_up(sg_round_up(mc, path->mr) * kc * sizeof(float), SG_ALIGN);
    size_t bbytes = sg_round_up(panels * path->nr * kc * sizeof(float), SG_ALIGN);
    float *apack = sg_thread_buffer(abytes + bbytes);
    if (apack == NULL) return -1;
    float *bpack = apack + abytes / sizeof(float);
    sg_job job = {path, {a, lda, trans_a}, {b, ldb, trans_b}, m, n, k, c, ldc, accumulate,
                  apack, bpack, kc, kblocks, nc, isa != SGEMM_SCALAR, {0, 0}};
#pragma omp parallel num_threads(threads) if (threads > 1)
    sg_thread(&job, omp_get_thread_num(), omp_get_num_threads());
    return 0;
}

#endif
