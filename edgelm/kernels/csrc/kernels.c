/* edgelm's CPU kernels: fused dequantize-and-dot over packed low-bit weights.
 *
 * Weights are in the "plane" layout (edgelm/kernels/layout.py): b-bit codes stored as bit planes of 4, 2 and
 * 1 bits (b = 4+2+1 at most, 8 = raw bytes), a row going by quads of 256 codes. A full quad holds the four
 * "transposed" vectors the VNNI dot product consumes (vector k, byte 16q + 4j + b = code 64j + 16q + 4k + b):
 *   nibble plane (128 B): byte 64h + i = vector 2h's byte i (low nibble) | vector 2h+1's (high nibble)
 *   crumb plane   (64 B): byte i = vectors 0..3's byte i at bits 0, 2, 4, 6
 *   bit plane     (32 B): bit i of the little-endian uint64 at byte 8k = vector k's byte i
 * and the chunks of a partial last quad are stored chunk by chunk (64 codes: a 32 B nibble plane with code j
 * low and j+32 high, a 16 B crumb plane with codes j, j+16, j+32, j+48, an 8 B bit plane), so that either
 * decodes to unsigned bytes with a few shifts and masks in registers. Every group
 * of `group` codes (16, or a multiple of 32) has an fp16 scale s and a zero point z (uint8, or fp16 for
 * ggml Q4_K's mins): w = s * (code - z).
 *
 * Activations are quantized on the fly to int8 in blocks of 32 (scale dx per block, as llama.cpp's Q8_0),
 * and y_r = sum_g s_g * (sum_b dx_b * <codes, xq>_b - z_g * sum_{j in g} x_j). The integer dot products
 * use AVX-512 VNNI (vpdpbusd: u8 x s8) where the CPU has it, else a portable C loop; the choice is made
 * at run time, so one build serves every x86-64 machine (and the generic loop any other CPU).
 *
 * Threads: a small persistent pool (workers spin briefly, then sleep), so a 262k-row matrix-vector product
 * is split across cores without paying a thread start per call.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define EK_X86 1
#include <immintrin.h>
#endif

#define EK_EXPORT __attribute__((visibility("default")))

typedef struct {
    int32_t rows, cols, bits, group;
    const uint8_t *q;        /* [rows][cols * bits / 8] in the plane layout */
    const uint16_t *scales;  /* [rows][cols / group] fp16 */
    const uint8_t *zeros;    /* [rows][cols / group] integer zero points, or NULL when: */
    const uint16_t *zeros_f16;  /* [rows][cols / group] fp16 zero points (ggml's Q4_K mins), else NULL */
} ek_matrix;

/* ----------------------------------------------------------------------------------------------------- */
/* fp16 <-> fp32 without relying on hardware conversion (the generic path)                                */

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal */
            float f = ldexpf((float)man, -24);
            return sign ? -f : f;
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ----------------------------------------------------------------------------------------------------- */
/* thread pool                                                                                             */

typedef void (*ek_task)(void *ctx, int64_t begin, int64_t end);

#define EK_MAX_THREADS 64
static struct {
    int n_threads;           /* including the calling thread */
    pthread_t workers[EK_MAX_THREADS];
    pthread_mutex_t lock;
    pthread_cond_t wake;
    atomic_int generation;   /* bumped once per parallel job */
    atomic_int sleeping;
    atomic_int busy;         /* workers still inside the current job */
    atomic_llong next;       /* next unclaimed item */
    int64_t total, grain;
    ek_task fn;
    void *ctx;
    int started;
} pool = {.n_threads = 1, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static void run_items(void) {
    for (;;) {
        int64_t begin = atomic_fetch_add(&pool.next, pool.grain);
        if (begin >= pool.total) break;
        int64_t end = begin + pool.grain < pool.total ? begin + pool.grain : pool.total;
        pool.fn(pool.ctx, begin, end);
    }
}

static inline void cpu_relax(void) {
#ifdef EK_X86
    _mm_pause();
#endif
}

static void *worker_main(void *arg) {
    /* The generation when this worker was created (not when it first runs): a job posted in between is
     * then still seen as new, instead of being waited for forever. */
    int seen = (int)(intptr_t)arg;
    for (;;) {
        /* Spin a little (the next matrix of a decode step comes within microseconds), then sleep. */
        int spins = 0;
        while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen && spins < 20000) {
            cpu_relax();
            spins++;
        }
        if (atomic_load(&pool.generation) == seen) {
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleeping, 1);
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = atomic_load(&pool.generation);
        run_items();
        atomic_fetch_sub_explicit(&pool.busy, 1, memory_order_release);
    }
    return NULL;
}

EK_EXPORT int ek_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > EK_MAX_THREADS) n = EK_MAX_THREADS;
    /* Workers are started once and kept; asking for fewer later just leaves some idle (asleep). */
    while (pool.started < n - 1) {
        void *created_at = (void *)(intptr_t)atomic_load(&pool.generation);
        if (pthread_create(&pool.workers[pool.started], NULL, worker_main, created_at) != 0) break;
        pthread_detach(pool.workers[pool.started]);
        pool.started++;
    }
    pool.n_threads = n <= pool.started + 1 ? n : pool.started + 1;
    return pool.n_threads;
}

EK_EXPORT int ek_get_threads(void) { return pool.n_threads; }

/* Run fn over [0, total) in pieces of `grain` items on all threads; returns when every piece is done. */
static void parallel_for(int64_t total, int64_t grain, ek_task fn, void *ctx) {
    if (pool.n_threads <= 1 || total <= grain) {
        fn(ctx, 0, total);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.total = total;
    pool.grain = grain;
    atomic_store(&pool.next, 0);
    /* Only the first n_threads - 1 workers join; extra started workers see the job and find it drained. */
    atomic_store(&pool.busy, pool.started);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    if (atomic_load(&pool.sleeping)) pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    run_items();
    while (atomic_load_explicit(&pool.busy, memory_order_acquire) > 0) cpu_relax();
}

/* ----------------------------------------------------------------------------------------------------- */
/* CPU dispatch                                                                                            */

enum { EK_GENERIC = 0, EK_AVX2_LEVEL = 1, EK_AVX512_VNNI = 2 };

static int cpu_level = -1;

EK_EXPORT int ek_cpu_level(void) {
    if (cpu_level < 0) {
        cpu_level = EK_GENERIC;
#ifdef EK_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
            cpu_level = EK_AVX512_VNNI;
        else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                 __builtin_cpu_supports("bmi2"))
            cpu_level = EK_AVX2_LEVEL;
#endif
    }
    return cpu_level;
}

/* Use at most this level (0: the generic C path), e.g. to compare paths; returns the level in effect. */
EK_EXPORT int ek_limit_cpu_level(int level) {
    cpu_level = -1;
    int best = ek_cpu_level();
    cpu_level = level < best ? level : best;
    return cpu_level;
}

/* ----------------------------------------------------------------------------------------------------- */
/* activation quantization                                                                                 */

/* x[n] (n a multiple of 32) -> xq[n] int8, dx[n/32] scales, bsum[n/32] = dx * sum(xq) per block: the sum
 * of the *quantized* block, so that the zero-point term and the dot product see the same activations. */
#ifdef EK_X86
static void quantize_act_avx512(const float *x, int64_t n, int8_t *xq, float *dx, float *bsum);
static void quantize_act_avx2(const float *x, int64_t n, int8_t *xq, float *dx, float *bsum);
#endif

EK_EXPORT void ek_quantize_act(const float *x, int64_t n, int8_t *xq, float *dx, float *bsum) {
#ifdef EK_X86
    if (ek_cpu_level() >= EK_AVX512_VNNI) { /* the same values, 32 at a time (prefill quantizes millions) */
        quantize_act_avx512(x, n, xq, dx, bsum);
        return;
    }
    if (ek_cpu_level() == EK_AVX2_LEVEL) {
        quantize_act_avx2(x, n, xq, dx, bsum);
        return;
    }
#endif
    for (int64_t b = 0; b < n / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.f;
        for (int j = 0; j < 32; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) {
            int8_t v = (int8_t)lrintf(xb[j] * inv);
            xq[b * 32 + j] = v;
            sum += v;
        }
        dx[b] = d;
        bsum[b] = d * (float)sum;
    }
}

/* ----------------------------------------------------------------------------------------------------- */
/* generic path                                                                                            */

static void decode_chunk_generic(const uint8_t *p, int bits, uint8_t *codes) {
    if (bits == 8) {
        memcpy(codes, p, 64);
        return;
    }
    memset(codes, 0, 64);
    int shift = 0;
    if (bits & 4) {
        for (int j = 0; j < 32; j++) {
            codes[j] = p[j] & 15;
            codes[j + 32] = p[j] >> 4;
        }
        p += 32;
        shift = 4;
    }
    if (bits & 2) {
        for (int j = 0; j < 16; j++)
            for (int k = 0; k < 4; k++) codes[j + 16 * k] |= ((p[j] >> (2 * k)) & 3) << shift;
        p += 16;
        shift += 2;
    }
    if (bits & 1) {
        for (int i = 0; i < 64; i++) codes[i] |= ((p[i >> 3] >> (i & 7)) & 1) << shift;
    }
}

/* A full quad's 256 codes (32 * bits bytes at p) in natural order: its planes hold the quad's four
 * transposed vectors (vector k, byte 16 q + 4 j + b = code 64 j + 16 q + 4 k + b; see the AVX-512 path). */
static void decode_quad_generic(const uint8_t *p, int bits, uint8_t *codes) {
    uint8_t v[256] = {0}; /* v[64 k + i]: byte i of transposed vector k */
    if (bits == 8) {
        memcpy(v, p, 256);
    } else {
        int shift = 0;
        if (bits & 4) {
            for (int h = 0; h < 2; h++)
                for (int i = 0; i < 64; i++) {
                    v[128 * h + i] = p[64 * h + i] & 15;
                    v[128 * h + 64 + i] = p[64 * h + i] >> 4;
                }
            p += 128;
            shift = 4;
        }
        if (bits & 2) {
            for (int k = 0; k < 4; k++)
                for (int i = 0; i < 64; i++) v[64 * k + i] |= ((p[i] >> (2 * k)) & 3) << shift;
            p += 64;
            shift += 2;
        }
        if (bits & 1)
            for (int k = 0; k < 4; k++)
                for (int i = 0; i < 64; i++) v[64 * k + i] |= ((p[8 * k + (i >> 3)] >> (i & 7)) & 1) << shift;
    }
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 64; i++) codes[64 * ((i >> 2) & 3) + 16 * (i >> 4) + 4 * k + (i & 3)] = v[64 * k + i];
}

/* All codes of a row (cols / 64 chunks: full quads, then the chunks of a partial one) in natural order. */
static void decode_row_generic(const uint8_t *q, int bits, int64_t cols, uint8_t *codes) {
    const int64_t n_chunks = cols / 64, n_full = n_chunks / 4;
    for (int64_t k = 0; k < n_full; k++) decode_quad_generic(q + k * 32 * bits, bits, codes + 256 * k);
    for (int64_t c = 4 * n_full; c < n_chunks; c++) decode_chunk_generic(q + c * 8 * bits, bits, codes + 64 * c);
}

typedef struct {
    const ek_matrix *m;
    const int8_t *xq;     /* [T][cols] */
    const float *dx;      /* [T][cols/32] */
    const float *bsum;    /* [T][cols/32] */
    float *y;             /* [T][out_stride] */
    const int32_t *out_index;  /* row r of m -> output column (NULL: r) */
    int64_t n_tokens, out_stride;
} matvec_job;

static void matvec_rows_generic(void *ctx, int64_t begin, int64_t end) {
    const matvec_job *job = ctx;
    const ek_matrix *m = job->m;
    const int64_t cols = m->cols, n_groups = cols / m->group, row_bytes = cols * m->bits / 8;
    const int64_t n_blocks = cols / 32, sub = m->group < 32 ? m->group : 32; /* codes sharing a scale and a dx */
    uint8_t codes[cols];
    for (int64_t r = begin; r < end; r++) {
        decode_row_generic(m->q + r * row_bytes, m->bits, cols, codes);
        const uint16_t *sc = m->scales + r * n_groups;
        const uint8_t *zr = m->zeros ? m->zeros + r * n_groups : NULL;
        const uint16_t *zf = m->zeros_f16 ? m->zeros_f16 + r * n_groups : NULL;
        int64_t out = job->out_index ? job->out_index[r] : r;
        for (int64_t t = 0; t < job->n_tokens; t++) {
            const int8_t *xq = job->xq + t * cols;
            const float *dx = job->dx + t * n_blocks;
            float acc = 0.f;
            for (int64_t col = 0; col < cols; col += sub) {
                const int64_t g = col / m->group;
                int32_t dot = 0, xsum = 0;
                for (int64_t j = 0; j < sub; j++) {
                    dot += (int32_t)codes[col + j] * xq[col + j];
                    xsum += xq[col + j];
                }
                const float zero = zr ? (float)zr[g] : half_to_float(zf[g]);
                acc += half_to_float(sc[g]) * dx[col / 32] * ((float)dot - zero * (float)xsum);
            }
            job->y[t * job->out_stride + out] = acc;
        }
    }
}

/* ----------------------------------------------------------------------------------------------------- */
/* AVX-512 VNNI path                                                                                       */

#ifdef EK_X86
/* A matrix's row shape, shared by the AVX-512 and AVX2 paths (plain integer code: no target of its own, so
 * it inlines into either). */
typedef struct {
    int64_t cols, n_chunks, n_groups, n_blocks, n_quads, row_bytes, sz_stride;
    int group_shift, has_zeros;
} row_shape;

static inline __attribute__((always_inline)) row_shape shape_of(const ek_matrix *m, int bits) {
    const int64_t cols = m->cols, n_chunks = cols / 64, n_groups = cols / m->group;
    return (row_shape){cols, n_chunks, n_groups, cols / 32, (n_chunks + 3) / 4, cols * bits / 8,
                       (n_groups + 15) & ~(int64_t)15, __builtin_ctz((unsigned)m->group), m->zeros || m->zeros_f16};
}

#define EK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#define EK_INLINE static inline __attribute__((always_inline)) /* the kernels' helpers: constants propagate, registers stay registers */

EK_AVX512 EK_INLINE __m512i nibbles(const uint8_t *p) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

EK_AVX512 EK_INLINE __m512i crumbs(const uint8_t *p) {
    /* 128-bit lane k holds codes 16k..16k+15: the 16 bytes shifted right by 2k. */
    __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p));
    const __m512i shifts = _mm512_set_epi64(6 * 0x0001000100010001LL, 6 * 0x0001000100010001LL,
                                            4 * 0x0001000100010001LL, 4 * 0x0001000100010001LL,
                                            2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), _mm512_set1_epi8(3));
}

EK_AVX512 EK_INLINE __m512i bitplane(const uint8_t *p, int value) {
    uint64_t m;
    memcpy(&m, p, 8);
    return _mm512_maskz_mov_epi8((__mmask64)m, _mm512_set1_epi8((char)value));
}

/* 64 codes of one chunk as unsigned bytes; `bits` is a compile-time constant at every call site. */
EK_AVX512 EK_INLINE __m512i decode_chunk(const uint8_t *p, const int bits) {
    switch (bits) {
    case 8: return _mm512_loadu_si512((const void *)p);
    case 4: return nibbles(p);
    case 2: return crumbs(p);
    case 1: return bitplane(p, 1);
    case 3: return _mm512_or_si512(crumbs(p), bitplane(p + 16, 4));
    case 5: return _mm512_or_si512(nibbles(p), bitplane(p + 32, 16));
    case 6: return _mm512_or_si512(nibbles(p), _mm512_slli_epi16(crumbs(p + 32), 4));
    default: /* 7 */
        return _mm512_or_si512(_mm512_or_si512(nibbles(p), _mm512_slli_epi16(crumbs(p + 32), 4)),
                               bitplane(p + 48, 64));
    }
}

/* ek_quantize_act's blocks with AVX-512: the same maximum, the same scale, the same products rounded to
 * nearest even (cvtps_epi32 under the default rounding mode, as lrintf), so the same codes and sums. */
EK_AVX512 static void quantize_act_avx512(const float *x, int64_t n, int8_t *xq, float *dx, float *bsum) {
    for (int64_t b = 0; b < n / 32; b++) {
        const __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        const __m512 scale = _mm512_set1_ps(inv);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, scale));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, scale));
        _mm_storeu_si128((__m128i *)(xq + b * 32), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + b * 32 + 16), _mm512_cvtsepi32_epi8(q1));
        dx[b] = d;
        bsum[b] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

/* A matvec job on a SIMD path (AVX-512 VNNI or AVX2). */
typedef struct {
    matvec_job base;
    const float *gsum;  /* [T][n_groups] activation sums per group (the zero-point terms) */
    const int8_t *xt;   /* [T][n_quads * 256] activations in quad-transposed order */
} simd_job;

/* Lanes [0, min(left, 16)) of a 16-lane vector: the tail of a loop in steps of 16. */
EK_AVX512 EK_INLINE __mmask16 first_lanes(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* s_g * z_g for the 16 groups from g (0 past n_groups; mask in *k): zero points are uint8 integers (zr) or
 * fp16 (zf, ggml Q4_K's mins). */
EK_AVX512 static inline __m512 scaled_zero16(const uint16_t *sc, const uint8_t *zr, const uint16_t *zf, int64_t g,
                                             int64_t n_groups, __mmask16 *k) {
    *k = first_lanes(n_groups - g);
    const __m512 scale = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(*k, sc + g));
    const __m512 zero = zr ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(*k, zr + g)))
                           : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(*k, zf + g));
    return _mm512_mul_ps(scale, zero);
}

/* sum_g s_g * z_g * gsum_g: a row's zero-point term (the dot products use the unsigned codes as they are). */
EK_AVX512 static inline float zero_term(const uint16_t *sc, const uint8_t *zr, const uint16_t *zf,
                                        const float *gsum, int64_t n_groups) {
    if (!zr && !zf) return 0.f;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; g += 16) {
        __mmask16 k;
        const __m512 sz = scaled_zero16(sc, zr, zf, g, n_groups, &k);
        acc = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(k, gsum + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* The products s_g * z_g of a row (0 past the end), kept by the tile path so that each token's zero-point
 * term is one multiply-add per 16 groups. */
EK_AVX512 static inline void scaled_zeros(const uint16_t *sc, const uint8_t *zr, const uint16_t *zf, int64_t n_groups,
                                          float *out) {
    for (int64_t g = 0; g < n_groups; g += 16) {
        __mmask16 k;
        _mm512_storeu_ps(out + g, scaled_zero16(sc, zr, zf, g, n_groups, &k));
    }
}

/* The lanes zero_term sums, from scaled_zeros' products: the same operations in the same order, so summed
 * in the same order too (reduce16) the same result. */
EK_AVX512 static inline __m512 zero_acc(const float *sz, const float *gsum, int64_t n_groups) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; g += 16) {
        const __mmask16 k = first_lanes(n_groups - g);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(sz + g), _mm512_maskz_loadu_ps(k, gsum + g), acc);
    }
    return acc;
}

EK_AVX512 EK_INLINE __m512 load_scales16(const uint16_t *sc, int64_t first, int64_t n_groups) {
    int64_t left = n_groups - first;
    const __mmask16 k = first_lanes(left);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sc + first));
}

/* Rows are worked on four chunks (a "quad", 256 codes) at a time. A quad's codes are held as four
 * "transposed" vectors: vector k, dword lane 4q + j = chunk j's dword 4q + k (4x4 dwords transposed within
 * each 128-bit lane). Full quads are stored that way (layout.py); a row's last, partial quad is stored chunk
 * by chunk and transposed here. The activations are transposed alike (quad_transpose_act, once per call),
 * so four chained vpdpbusd leave in lane 4q + j the integer sum over codes 64j + 16q .. + 15, and one
 * convert and one multiply-add per quad do the float work of 256 codes. */

/* The first code of each lane's 16 within the quad: (lane & 3) * 64 + (lane >> 2) * 16. */
EK_AVX512 EK_INLINE __m512i quad_positions(void) {
    return _mm512_set_epi32(240, 176, 112, 48, 224, 160, 96, 32, 208, 144, 80, 16, 192, 128, 64, 0);
}

/* A row's group scales for the quad starting at chunk c, per lane (groups of 16, 32 or 64 x 2^k). */
EK_AVX512 EK_INLINE __m512 quad_scales(const uint16_t *sc, int64_t n_groups, int64_t c, int group_shift) {
    const int64_t start = c * 64, first = start >> group_shift;
    const __m512i offset = _mm512_set1_epi32((int)(start - (first << group_shift)));
    const __m512i idx = _mm512_srlv_epi32(_mm512_add_epi32(quad_positions(), offset), _mm512_set1_epi32(group_shift));
    return _mm512_permutexvar_ps(idx, load_scales16(sc, first, n_groups));
}

/* A token's activation scales (one per block of 32) for the quad starting at chunk c, per lane. */
EK_AVX512 EK_INLINE __m512 quad_dx(const float *dx, int64_t n_blocks, int64_t c) {
    const int64_t left = n_blocks - 2 * c;
    const __mmask16 k = left >= 8 ? (__mmask16)0xFF : (__mmask16)((1u << left) - 1);
    const __m512i idx = _mm512_set_epi32(7, 5, 3, 1, 7, 5, 3, 1, 6, 4, 2, 0, 6, 4, 2, 0);
    return _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(k, dx + 2 * c));
}

/* The sums of the lanes of 16 vectors at once, each summed in exactly the order _mm512_reduce_add_ps uses
 * (halves, then quarters, then pairs, then the last two), so a tile's results match single tokens bit for
 * bit; lane 4 L + j of the result is the sum of a[4 j + L]. */
EK_AVX512 EK_INLINE __m512 reduce16(const __m512 *a) {
    __m512 b[8], c[4], d[2];
    for (int m = 0; m < 8; m++) /* lanes: a[2m]'s v[i] + v[i + 8] (i < 8), then a[2m + 1]'s */
        b[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                             _mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)));
    for (int m = 0; m < 4; m++) /* 128-bit lane L: a[4m + L]'s s[i + 4] + s[i] (i < 4) */
        c[m] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)),
                             _mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)));
    for (int m = 0; m < 2; m++) /* lane L: a[8m + L]'s s[0] + s[2], s[1] + s[3], then a[8m + 4 + L]'s */
        d[m] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c[2 * m]), _mm512_castps_pd(c[2 * m + 1])));
    for (int m = 0; m < 2; m++)
        d[m] = _mm512_add_ps(d[m], _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c[2 * m]),
                                                                       _mm512_castps_pd(c[2 * m + 1]))));
    return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* 4x4 dwords transposed within each 128-bit lane (its own inverse). */
EK_AVX512 EK_INLINE void transpose_quad(__m512i *out, __m512i c0, __m512i c1, __m512i c2, __m512i c3) {
    const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    out[0] = _mm512_unpacklo_epi64(t0, t2);
    out[1] = _mm512_unpackhi_epi64(t0, t2);
    out[2] = _mm512_unpacklo_epi64(t1, t3);
    out[3] = _mm512_unpackhi_epi64(t1, t3);
}

/* The bits [from, from + width) of every byte of v moved to [to, to + width), the rest of each byte 0. The
 * 16-bit shifts carry bits across bytes only into positions the mask clears. */
EK_AVX512 EK_INLINE __m512i byte_field(__m512i v, int from, int to, int width) {
    const __m512i shifted = from > to ? _mm512_srli_epi16(v, (unsigned)(from - to))
                            : from < to ? _mm512_slli_epi16(v, (unsigned)(to - from)) : v;
    return _mm512_and_si512(shifted, _mm512_set1_epi8((char)(((1 << width) - 1) << to)));
}

/* A full quad's four transposed vectors of codes from its planes (32 * bits bytes at p; layout.py): a nibble
 * plane (two vectors of 64 bytes, low nibble = vector 2h, high = 2h + 1), then a crumb plane (one vector,
 * bits 2k = vector k), then a bit plane (8 bytes per vector). `bits` is a compile-time constant. */
EK_AVX512 EK_INLINE void decode_quad(const uint8_t *p, const int bits, __m512i *c) {
    if (bits == 8) {
        for (int k = 0; k < 4; k++) c[k] = _mm512_loadu_si512((const void *)(p + 64 * k));
        return;
    }
    int shift = 0;
    if (bits & 4) {
        const __m512i v0 = _mm512_loadu_si512((const void *)p), v1 = _mm512_loadu_si512((const void *)(p + 64));
        c[0] = byte_field(v0, 0, 0, 4);
        c[1] = byte_field(v0, 4, 0, 4);
        c[2] = byte_field(v1, 0, 0, 4);
        c[3] = byte_field(v1, 4, 0, 4);
        p += 128;
        shift = 4;
    }
    if (bits & 2) {
        const __m512i v = _mm512_loadu_si512((const void *)p);
        for (int k = 0; k < 4; k++) {
            const __m512i f = byte_field(v, 2 * k, shift, 2);
            c[k] = shift ? _mm512_or_si512(c[k], f) : f;
        }
        p += 64;
        shift += 2;
    }
    if (bits & 1) {
        const __m512i one = _mm512_set1_epi8((char)(1 << shift));
        for (int k = 0; k < 4; k++) {
            uint64_t m;
            memcpy(&m, p + 8 * k, 8);
            c[k] = shift ? _mm512_mask_add_epi8(c[k], (__mmask64)m, c[k], one) : _mm512_maskz_mov_epi8((__mmask64)m, one);
        }
    }
}

/* Quad k of a row (q: the row's codes) as four transposed vectors. */
EK_AVX512 EK_INLINE void row_quad(const uint8_t *q, const int bits, int64_t k, int64_t n_chunks, __m512i *c) {
    if (4 * k + 4 <= n_chunks) {
        decode_quad(q + k * 32 * bits, bits, c);
        return;
    }
    __m512i ch[4];
    for (int j = 0; j < 4; j++)
        ch[j] = 4 * k + j < n_chunks ? decode_chunk(q + (4 * k + j) * 8 * bits, bits) : _mm512_setzero_si512();
    transpose_quad(c, ch[0], ch[1], ch[2], ch[3]);
}

/* One quad of one (row, token) pair, the only place its arithmetic is written: the integer dot of the
 * quad's transposed codes c with the token's transposed activations x (per lane), then
 * acc + float(dot) * (dx * scale). */
EK_AVX512 EK_INLINE __m512 quad_step(const __m512i *c, __m512i x0, __m512i x1, __m512i x2, __m512i x3, __m512 dx,
                                     __m512 scale, __m512 acc) {
    __m512i u = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], x0);
    u = _mm512_dpbusd_epi32(u, c[1], x1);
    u = _mm512_dpbusd_epi32(u, c[2], x2);
    u = _mm512_dpbusd_epi32(u, c[3], x3);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), _mm512_mul_ps(dx, scale), acc);
}

/* quad_step with the token's activations read from xt (a quad's 256 transposed values). */
EK_AVX512 EK_INLINE __m512 quad_step_at(const __m512i *c, const int8_t *xt, __m512 dx, __m512 scale, __m512 acc) {
    return quad_step(c, _mm512_loadu_si512((const void *)xt), _mm512_loadu_si512((const void *)(xt + 64)),
                     _mm512_loadu_si512((const void *)(xt + 128)), _mm512_loadu_si512((const void *)(xt + 192)),
                     dx, scale, acc);
}

/* Every (row, token) pair below goes through the same operations in the same order: quad_step per quad, then the lanes summed in _mm512_reduce_add_ps' order, minus the
 * zero-point term. So a result does not depend on how many tokens or rows were computed with it. */
#define EK_TILE_ROWS 4   /* rows whose quads are decoded once for all the tile's tokens */
#define EK_TILE_TOKENS 4 /* tokens whose 4 x 4 accumulators are reduced together */
#ifndef EK_TILE_MAX_TOKENS
#define EK_TILE_MAX_TOKENS 8 /* longer batches (prefill) decode each row once into a buffer instead */
#endif
#ifndef EK_PREFETCH_BYTES
#define EK_PREFETCH_BYTES 8192 /* one token, row by row: into L2, far enough ahead to hide DRAM latency */
#endif
#ifndef EK_TILE_PREFETCH_BYTES
#define EK_TILE_PREFETCH_BYTES 3072 /* tiles, quad by quad, into L2 (3 to 12 KB ahead measured alike) */
#endif

/* The activation scales of tokens [t0, t0 + n) per quad, laid out [t][n_quads]. */
EK_AVX512 static inline void tokens_dx(const float *dx, int64_t n_blocks, int64_t n_quads, int64_t t0, int n,
                                       __m512 *out) {
    for (int t = 0; t < n; t++)
        for (int64_t k = 0; k < n_quads; k++) out[t * n_quads + k] = quad_dx(dx + (t0 + t) * n_blocks, n_blocks, 4 * k);
}

/* Writes a tile's results (lane 4 i + t of y: row r0 + i, token t0 + t) after subtracting the zero-point
 * terms (sz: the rows' s * z products, or NULL). */
EK_AVX512 static inline void store_tile(const simd_job *job, __m512 y, const float *sz, int64_t sz_stride,
                                        int64_t n_groups, int64_t r0, int nr, int64_t t0, int nt) {
    if (sz) {
        __m512 zacc[EK_TILE_TOKENS * EK_TILE_ROWS];
        for (int t = 0; t < EK_TILE_TOKENS; t++) {
            const float *gs = job->gsum + (t0 + (t < nt ? t : 0)) * n_groups;
            for (int i = 0; i < EK_TILE_ROWS; i++) zacc[4 * t + i] = zero_acc(sz + i * sz_stride, gs, n_groups);
        }
        y = _mm512_sub_ps(y, reduce16(zacc));
    }
    float out[16];
    _mm512_storeu_ps(out, y);
    for (int i = 0; i < nr; i++) {
        const int64_t r = r0 + i, col = job->base.out_index ? job->base.out_index[r] : r;
        for (int t = 0; t < nt; t++) job->base.y[(t0 + t) * job->base.out_stride + col] = out[4 * i + t];
    }
}

EK_AVX512 static inline const uint8_t *row_zeros(const ek_matrix *m, int64_t r, int64_t n_groups) {
    return m->zeros ? m->zeros + r * n_groups : NULL;
}
EK_AVX512 static inline const uint16_t *row_zeros_f16(const ek_matrix *m, int64_t r, int64_t n_groups) {
    return m->zeros_f16 ? m->zeros_f16 + r * n_groups : NULL;
}

/* One token: a row at a time (a 4-row tile would pay its 16-way sums and zero-point terms for one token). */
EK_AVX512 EK_INLINE void single_rows(const simd_job *job, int64_t begin, int64_t end, const int bits) {
    const ek_matrix *m = job->base.m;
    const row_shape s = shape_of(m, bits);
    __m512 dq[s.n_quads];
    tokens_dx(job->base.dx, s.n_blocks, s.n_quads, 0, 1, dq);
    for (int64_t r = begin; r < end; r++) {
        const uint8_t *q = m->q + r * s.row_bytes;
        const uint16_t *sc = m->scales + r * s.n_groups;
        for (int64_t off = 0; off < s.row_bytes; off += 64)
            _mm_prefetch((const char *)(q + EK_PREFETCH_BYTES + off), _MM_HINT_T1);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < s.n_quads; k++) {
            __m512i c[4];
            row_quad(q, bits, k, s.n_chunks, c);
            acc = quad_step_at(c, job->xt + k * 256, dq[k], quad_scales(sc, s.n_groups, 4 * k, s.group_shift), acc);
        }
        job->base.y[job->base.out_index ? job->base.out_index[r] : r] =
            _mm512_reduce_add_ps(acc) - zero_term(sc, row_zeros(m, r, s.n_groups), row_zeros_f16(m, r, s.n_groups),
                                                  job->gsum, s.n_groups);
    }
}

/* The rows of the tile at r0 (nr of them; a short tile repeats its first row): their codes and scales, and
 * with zero points their s * z products into sz [4][sz_stride]. */
EK_AVX512 EK_INLINE void tile_setup(const ek_matrix *m, const row_shape *s, int64_t r0, int nr, const uint8_t **q,
                                    const uint16_t **sc, float *sz) {
    for (int i = 0; i < EK_TILE_ROWS; i++) {
        const int64_t r = r0 + (i < nr ? i : 0);
        q[i] = m->q + r * s->row_bytes;
        sc[i] = m->scales + r * s->n_groups;
        if (s->has_zeros)
            scaled_zeros(sc[i], row_zeros(m, r, s->n_groups), row_zeros_f16(m, r, s->n_groups), s->n_groups,
                         sz + i * s->sz_stride);
    }
}

/* Tokens [t0, t0 + nt) (nt <= 4, a constant) against one tile of 4 rows: each quad of each row decoded into
 * registers once for these tokens. */
EK_AVX512 EK_INLINE void tile_group(const simd_job *job, const row_shape *s, const uint8_t *const *q,
                                    const uint16_t *const *sc, const float *sz, const __m512 *dq, int64_t r0, int nr,
                                    int64_t t0, const int bits, const int nt, const int prefetch) {
    __m512 acc[EK_TILE_TOKENS * EK_TILE_ROWS]; /* acc[4 t + i]: row i, token t0 + t */
    _Pragma("GCC unroll 16") /* unrolled whole: the accumulators stay in registers */
    for (int a = 0; a < EK_TILE_TOKENS * EK_TILE_ROWS; a++) acc[a] = _mm512_setzero_ps();
    for (int64_t k = 0; k < s->n_quads; k++) {
        _Pragma("GCC unroll 4")
        for (int i = 0; i < EK_TILE_ROWS; i++) {
            if (prefetch)
                for (int64_t off = 0; off < 32 * bits; off += 64)
                    _mm_prefetch((const char *)(q[i] + k * 32 * bits + EK_TILE_PREFETCH_BYTES + off), _MM_HINT_T1);
            __m512i c[4];
            row_quad(q[i], bits, k, s->n_chunks, c);
            const __m512 scale = quad_scales(sc[i], s->n_groups, 4 * k, s->group_shift);
            _Pragma("GCC unroll 4")
            for (int t = 0; t < nt; t++)
                acc[4 * t + i] = quad_step_at(c, job->xt + ((t0 + t) * s->n_quads + k) * 256,
                                              dq[(t0 + t) * s->n_quads + k], scale, acc[4 * t + i]);
        }
    }
    store_tile(job, reduce16(acc), s->has_zeros ? sz : NULL, s->sz_stride, s->n_groups, r0, nr, t0, nt);
}

/* 2..8 tokens (speculative verification): tiles of 4 rows, the tokens in groups of up to 4, each group
 * decoding the tile's rows into registers again (from L1 after the first: the weights are read once). */
EK_AVX512 EK_INLINE void tile_rows(const simd_job *job, int64_t begin, int64_t end, const int bits) {
    const ek_matrix *m = job->base.m;
    const row_shape s = shape_of(m, bits);
    const int64_t T = job->base.n_tokens;
    __m512 dq[T * s.n_quads];
    tokens_dx(job->base.dx, s.n_blocks, s.n_quads, 0, (int)T, dq);
    float sz[EK_TILE_ROWS * s.sz_stride];
    for (int64_t r0 = begin; r0 < end; r0 += EK_TILE_ROWS) {
        const int nr = end - r0 < EK_TILE_ROWS ? (int)(end - r0) : EK_TILE_ROWS;
        const uint8_t *q[EK_TILE_ROWS];
        const uint16_t *sc[EK_TILE_ROWS];
        tile_setup(m, &s, r0, nr, q, sc, sz);
        int64_t t0 = 0;
        if (T >= 4) {
            tile_group(job, &s, q, sc, sz, dq, r0, nr, 0, bits, 4, 1);
            for (t0 = 4; t0 + 4 <= T; t0 += 4) tile_group(job, &s, q, sc, sz, dq, r0, nr, t0, bits, 4, 0);
        }
        switch (T - t0) { /* the rest, fewer than 4 */
        case 1: tile_group(job, &s, q, sc, sz, dq, r0, nr, t0, bits, 1, t0 == 0); break;
        case 2: tile_group(job, &s, q, sc, sz, dq, r0, nr, t0, bits, 2, t0 == 0); break;
        case 3: tile_group(job, &s, q, sc, sz, dq, r0, nr, t0, bits, 3, t0 == 0); break;
        default: break;
        }
    }
}

/* More tokens (prefill): a tile's rows are decoded once into a buffer, then every group of 4 tokens runs
 * against them (the activations of a token held in registers, the codes read from the buffer). */
EK_AVX512 EK_INLINE void buffered_rows(const simd_job *job, int64_t begin, int64_t end, const int bits) {
    const ek_matrix *m = job->base.m;
    const row_shape s = shape_of(m, bits);
    const int64_t T = job->base.n_tokens;
    __m512i codes[EK_TILE_ROWS][4 * s.n_quads];
    __m512 scales[EK_TILE_ROWS][s.n_quads];
    float sz[EK_TILE_ROWS * s.sz_stride];
    for (int64_t r0 = begin; r0 < end; r0 += EK_TILE_ROWS) {
        const int nr = end - r0 < EK_TILE_ROWS ? (int)(end - r0) : EK_TILE_ROWS;
        const uint8_t *q[EK_TILE_ROWS];
        const uint16_t *sc[EK_TILE_ROWS];
        tile_setup(m, &s, r0, nr, q, sc, sz);
        for (int i = 0; i < EK_TILE_ROWS; i++)
            for (int64_t k = 0; k < s.n_quads; k++) {
                row_quad(q[i], bits, k, s.n_chunks, &codes[i][4 * k]);
                scales[i][k] = quad_scales(sc[i], s.n_groups, 4 * k, s.group_shift);
            }
        for (int64_t t0 = 0; t0 < T; t0 += EK_TILE_TOKENS) {
            const int nt = T - t0 < EK_TILE_TOKENS ? (int)(T - t0) : EK_TILE_TOKENS;
            __m512 acc[EK_TILE_TOKENS * EK_TILE_ROWS]; /* acc[4 t + i]: row i, token t0 + t */
            _Pragma("GCC unroll 16")
            for (int a = 0; a < EK_TILE_TOKENS * EK_TILE_ROWS; a++) acc[a] = _mm512_setzero_ps();
            for (int64_t k = 0; k < s.n_quads; k++) {
                _Pragma("GCC unroll 4")
                for (int t = 0; t < EK_TILE_TOKENS; t++) { /* a short tile repeats its first token */
                    const int64_t tt = t0 + (t < nt ? t : 0);
                    const int8_t *xt = job->xt + (tt * s.n_quads + k) * 256;
                    const __m512i x0 = _mm512_loadu_si512((const void *)xt);
                    const __m512i x1 = _mm512_loadu_si512((const void *)(xt + 64));
                    const __m512i x2 = _mm512_loadu_si512((const void *)(xt + 128));
                    const __m512i x3 = _mm512_loadu_si512((const void *)(xt + 192));
                    const __m512 d = quad_dx(job->base.dx + tt * s.n_blocks, s.n_blocks, 4 * k);
                    _Pragma("GCC unroll 4")
                    for (int i = 0; i < EK_TILE_ROWS; i++)
                        acc[4 * t + i] = quad_step(&codes[i][4 * k], x0, x1, x2, x3, d, scales[i][k], acc[4 * t + i]);
                }
            }
            store_tile(job, reduce16(acc), s.has_zeros ? sz : NULL, s.sz_stride, s.n_groups, r0, nr, t0, nt);
        }
    }
}

#define EK_ROW_KERNEL(BITS)                                                                                  \
    EK_AVX512 static void matvec_rows_avx512_##BITS(void *ctx, int64_t begin, int64_t end) {                  \
        const simd_job *job = ctx;                                                                         \
        if (job->base.n_tokens == 1) single_rows(job, begin, end, BITS);                                     \
        else if (job->base.n_tokens <= EK_TILE_MAX_TOKENS) tile_rows(job, begin, end, BITS);                 \
        else buffered_rows(job, begin, end, BITS);                                                           \
    }

EK_ROW_KERNEL(1)
EK_ROW_KERNEL(2)
EK_ROW_KERNEL(3)
EK_ROW_KERNEL(4)
EK_ROW_KERNEL(5)
EK_ROW_KERNEL(6)
EK_ROW_KERNEL(7)
EK_ROW_KERNEL(8)

static const ek_task avx512_kernels[9] = {NULL, matvec_rows_avx512_1, matvec_rows_avx512_2, matvec_rows_avx512_3,
                                          matvec_rows_avx512_4, matvec_rows_avx512_5, matvec_rows_avx512_6,
                                          matvec_rows_avx512_7, matvec_rows_avx512_8};
#endif

/* ----------------------------------------------------------------------------------------------------- */
/* AVX2 path (x86-64-v3: AVX2, FMA, F16C; most laptops and servers without AVX-512)                       */

/* The same quad-transposed arithmetic as the AVX-512 path, each 64-byte vector as two 32-byte halves (half
 * h: dword lanes 8h..8h+7). Without VNNI the u8 x s8 products go through vpmaddubsw (pairs summed into
 * saturating int16: exact for codes up to 127; 8-bit codes see dot_lanes) and vpmaddwd. */
#ifdef EK_X86
#define EK_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))

typedef struct {
    __m256i h[2];
} ek_v64; /* one 64-byte vector */

EK_AVX2 EK_INLINE __m256i field256(__m256i v, int from, int to, int width) {
    const __m256i shifted = from > to ? _mm256_srli_epi16(v, from - to) : from < to ? _mm256_slli_epi16(v, to - from) : v;
    return _mm256_and_si256(shifted, _mm256_set1_epi8((char)(((1 << width) - 1) << to)));
}

/* 32 of 64 bits (half h) -> 32 bytes: byte i = `value` where bit 32h + i is set, else 0 (one 64-bit broadcast). */
EK_AVX2 EK_INLINE __m256i expand_bits32(const uint8_t *p, int value, int h) {
    long long m;
    memcpy(&m, p, 8);
    const __m256i all = _mm256_set1_epi64x(m);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL), v = _mm256_set1_epi8((char)value);
    const __m256i spread = h ? _mm256_shuffle_epi8(all, _mm256_set_epi64x(0x0707070707070707LL, 0x0606060606060606LL,
                                                                        0x0505050505050505LL, 0x0404040404040404LL))
                             : _mm256_shuffle_epi8(all, _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                                                        0x0101010101010101LL, 0));
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), v);
}

/* 64 bits -> 64 bytes: byte i = `value` where bit i is set, else 0. */
EK_AVX2 EK_INLINE void expand_bits64(const uint8_t *p, int value, ek_v64 *out) {
    out->h[0] = expand_bits32(p, value, 0);
    out->h[1] = expand_bits32(p, value, 1);
}

/* Half h of a full quad's four transposed vectors (as decode_quad): the halves decode independently. */
EK_AVX2 EK_INLINE void decode_quad_half_avx2(const uint8_t *p, const int bits, int h, __m256i *c) {
    if (bits == 8) {
        for (int k = 0; k < 4; k++) c[k] = _mm256_loadu_si256((const __m256i *)(p + 64 * k + 32 * h));
        return;
    }
    int shift = 0;
    if (bits & 4) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(p + 32 * h));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 64 + 32 * h));
        c[0] = field256(v0, 0, 0, 4);
        c[1] = field256(v0, 4, 0, 4);
        c[2] = field256(v1, 0, 0, 4);
        c[3] = field256(v1, 4, 0, 4);
        p += 128;
        shift = 4;
    }
    if (bits & 2) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * h));
        for (int k = 0; k < 4; k++) {
            const __m256i f = field256(v, 2 * k, shift, 2);
            c[k] = shift ? _mm256_or_si256(c[k], f) : f;
        }
        p += 64;
        shift += 2;
    }
    if (bits & 1) {
        for (int k = 0; k < 4; k++) {
            const __m256i b = expand_bits32(p + 8 * k, 1 << shift, h);
            c[k] = shift ? _mm256_or_si256(c[k], b) : b;
        }
    }
}

/* A full quad's four transposed vectors (as decode_quad). */
EK_AVX2 EK_INLINE void decode_quad_avx2(const uint8_t *p, const int bits, ek_v64 *c) {
    for (int h = 0; h < 2; h++) {
        __m256i half[4];
        decode_quad_half_avx2(p, bits, h, half);
        for (int k = 0; k < 4; k++) c[k].h[h] = half[k];
    }
}

/* One chunk of a partial quad (stored chunk by chunk) in natural order (as decode_chunk). */
EK_AVX2 EK_INLINE void decode_chunk_avx2(const uint8_t *p, const int bits, ek_v64 *out) {
    if (bits == 8) {
        for (int h = 0; h < 2; h++) out->h[h] = _mm256_loadu_si256((const __m256i *)(p + 32 * h));
        return;
    }
    ek_v64 r = {{_mm256_setzero_si256(), _mm256_setzero_si256()}};
    int shift = 0;
    if (bits & 4) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)p);
        r.h[0] = field256(v, 0, 0, 4);
        r.h[1] = field256(v, 4, 0, 4);
        p += 32;
        shift = 4;
    }
    if (bits & 2) { /* 16 bytes: codes 16k..16k+15 at bits 2k */
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
        const __m256i lo = _mm256_srlv_epi64(v, _mm256_set_epi64x(2, 2, 0, 0));
        const __m256i hi = _mm256_srlv_epi64(v, _mm256_set_epi64x(6, 6, 4, 4));
        const __m256i mask = _mm256_set1_epi8(3);
        r.h[0] = _mm256_or_si256(r.h[0], _mm256_slli_epi16(_mm256_and_si256(lo, mask), shift));
        r.h[1] = _mm256_or_si256(r.h[1], _mm256_slli_epi16(_mm256_and_si256(hi, mask), shift));
        p += 16;
        shift += 2;
    }
    if (bits & 1) {
        ek_v64 b;
        expand_bits64(p, 1 << shift, &b);
        r.h[0] = _mm256_or_si256(r.h[0], b.h[0]);
        r.h[1] = _mm256_or_si256(r.h[1], b.h[1]);
    }
    *out = r;
}

/* 4x4 dwords transposed within each 128-bit lane, on each half (its own inverse, as transpose_quad). */
EK_AVX2 EK_INLINE void transpose_quad_avx2(ek_v64 *c) {
    for (int h = 0; h < 2; h++) {
        const __m256i t0 = _mm256_unpacklo_epi32(c[0].h[h], c[1].h[h]), t1 = _mm256_unpackhi_epi32(c[0].h[h], c[1].h[h]);
        const __m256i t2 = _mm256_unpacklo_epi32(c[2].h[h], c[3].h[h]), t3 = _mm256_unpackhi_epi32(c[2].h[h], c[3].h[h]);
        c[0].h[h] = _mm256_unpacklo_epi64(t0, t2);
        c[1].h[h] = _mm256_unpackhi_epi64(t0, t2);
        c[2].h[h] = _mm256_unpacklo_epi64(t1, t3);
        c[3].h[h] = _mm256_unpackhi_epi64(t1, t3);
    }
}

/* Quad k of a row as four transposed vectors (as row_quad). */
EK_AVX2 EK_INLINE void row_quad_avx2(const uint8_t *q, const int bits, int64_t k, int64_t n_chunks, ek_v64 *c) {
    if (4 * k + 4 <= n_chunks) {
        decode_quad_avx2(q + k * 32 * bits, bits, c);
        return;
    }
    for (int j = 0; j < 4; j++) {
        if (4 * k + j < n_chunks) decode_chunk_avx2(q + (4 * k + j) * 8 * bits, bits, &c[j]);
        else c[j].h[0] = c[j].h[1] = _mm256_setzero_si256();
    }
    transpose_quad_avx2(c);
}

/* xq [T][cols] -> xt [T][n_quads * 256], each quad transposed as the codes are (zeros past the row): for the
 * AVX-512 path as well (every AVX-512 CPU has AVX2; it runs once per call). */
EK_AVX2 static void quad_transpose_act(const int8_t *xq, int64_t n_tokens, int64_t cols, int8_t *xt) {
    const int64_t n_chunks = cols / 64, n_quads = (n_chunks + 3) / 4;
    for (int64_t t = 0; t < n_tokens; t++)
        for (int64_t k = 0; k < n_quads; k++) {
            ek_v64 c[4];
            for (int j = 0; j < 4; j++)
                for (int h = 0; h < 2; h++)
                    c[j].h[h] = 4 * k + j < n_chunks
                                    ? _mm256_loadu_si256((const __m256i *)(xq + t * cols + (4 * k + j) * 64 + 32 * h))
                                    : _mm256_setzero_si256();
            transpose_quad_avx2(c);
            for (int j = 0; j < 4; j++)
                for (int h = 0; h < 2; h++)
                    _mm256_storeu_si256((__m256i *)(xt + (t * n_quads + k) * 256 + 64 * j + 32 * h), c[j].h[h]);
        }
}

/* ek_quantize_act's blocks, 8 values at a time: the same maximum, scale and rounding (cvtps_epi32 under the
 * default rounding mode, as lrintf), so the same codes and sums as the portable loop. */
EK_AVX2 static void quantize_act_avx2(const float *x, int64_t n, int8_t *xq, float *dx, float *bsum) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t b = 0; b < n / 32; b++) {
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(x + b * 32 + 8 * i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        const __m256 scale = _mm256_set1_ps(inv);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], scale));
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(xq + b * 32),
                            _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, _MM_SHUFFLE(1, 0, 3, 2)));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, _MM_SHUFFLE(2, 3, 0, 1)));
        dx[b] = d;
        bsum[b] = d * (float)_mm_cvtsi128_si32(t4);
    }
}

/* Per dword lane of a half: sum over its 4 bytes of u8 codes x s8 activations. 8-bit codes would overflow
 * vpmaddubsw's int16 pairs, so they are taken as signed (code - 128, the caller's zero points shifted alike)
 * and multiplied as |code - 128| (at most 128: unsigned) x (x with the sign of code - 128). */
EK_AVX2 EK_INLINE __m256i dot_lanes(__m256i codes, __m256i x, const int bits) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (bits < 8) return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), ones);
    const __m256i centered = _mm256_xor_si256(codes, _mm256_set1_epi8((char)0x80));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(centered), _mm256_sign_epi8(x, centered)), ones);
}

#define EK_AVX2_MAX_COLS 16384 /* a row's decoded codes live on the stack */

/* A row's scales as floats, and scale x (zero point - shift) per group, 8 groups at a time (shift 128 for
 * codes taken as signed). A last partial 8 reads past the row into the next one's scales (and zeros) where
 * the buffer goes on, one by one at the matrix's end; the values past n_groups are never used. */
EK_AVX2 EK_INLINE void row_scales_avx2(const ek_matrix *m, int64_t r, int64_t n_groups, float shift, float *sc,
                                       float *sz) {
    const uint16_t *scales = m->scales + r * n_groups;
    const uint8_t *zr = m->zeros ? m->zeros + r * n_groups : NULL;
    const uint16_t *zf = m->zeros_f16 ? m->zeros_f16 + r * n_groups : NULL;
    const int64_t vector_end = (r + 1) * n_groups + 8 <= m->rows * n_groups ? n_groups : n_groups & ~(int64_t)7;
    int64_t g = 0;
    for (; g < vector_end; g += 8) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + g)));
        __m256 z = _mm256_setzero_ps();
        if (zr) z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zr + g))));
        else if (zf) z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zf + g)));
        _mm256_storeu_ps(sc + g, s);
        _mm256_storeu_ps(sz + g, _mm256_mul_ps(s, _mm256_sub_ps(z, _mm256_set1_ps(shift))));
    }
    for (; g < n_groups; g++) {
        sc[g] = _cvtsh_ss(scales[g]);
        sz[g] = sc[g] * ((zr ? (float)zr[g] : zf ? _cvtsh_ss(zf[g]) : 0.f) - shift);
    }
}

EK_AVX2 EK_INLINE float sum8(__m256 v) { /* halves, then pairs, then the last two */
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
}

/* sum8 of 8 vectors at once, lane i = sum8(v[i]) bit for bit (the same pairs added: lanes j and j + 4, then
 * 0 + 2 and 1 + 3, then the two), in 19 instructions instead of 8 dependent chains of 7. */
EK_AVX2 EK_INLINE __m256 sum8_rows(const __m256 *v) {
    __m256 a[4]; /* a[p] = [v[2p] halves summed | v[2p + 1] halves summed] */
    for (int p = 0; p < 4; p++)
        a[p] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * p], v[2 * p + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * p], v[2 * p + 1], 0x31));
    /* per 128-bit lane [r, r', ...]: (s0 + s2, s1 + s3) of rows 0, 2 | 1, 3 and of 4, 6 | 5, 7 */
    const __m256 b0 = _mm256_add_ps(_mm256_shuffle_ps(a[0], a[1], 0x44), _mm256_shuffle_ps(a[0], a[1], 0xEE));
    const __m256 b1 = _mm256_add_ps(_mm256_shuffle_ps(a[2], a[3], 0x44), _mm256_shuffle_ps(a[2], a[3], 0xEE));
    /* rows 0, 2, 4, 6 | 1, 3, 5, 7 */
    const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(b0, b1, 0x88), _mm256_shuffle_ps(b0, b1, 0xDD));
    return _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}


/* sum_g s_g z_g * (a token's activation sum over group g): the zero points' share of the dot product, 8
 * groups at a time, the last few masked; for nt <= 4 tokens (gsum rows gsum_stride apart) at once, the row's
 * s * z loaded once for all of them, each token's sum formed as when alone. */
EK_AVX2 EK_INLINE void zero_term_lanes_avx2(const float *sz, const float *gsum, int64_t gsum_stride, int64_t n_groups,
                                            __m256 *acc, const int nt) {
#pragma GCC unroll 4
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= n_groups; g += 8) {
        const __m256 s = _mm256_loadu_ps(sz + g);
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) acc[t] = _mm256_fmadd_ps(s, _mm256_loadu_ps(gsum + t * gsum_stride + g), acc[t]);
    }
    if (g < n_groups) {
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n_groups - g)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 s = _mm256_maskload_ps(sz + g, live);
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) acc[t] = _mm256_fmadd_ps(s, _mm256_maskload_ps(gsum + t * gsum_stride + g, live), acc[t]);
    }
}

EK_AVX2 EK_INLINE void zero_terms_avx2(const float *sz, const float *gsum, int64_t gsum_stride, int64_t n_groups,
                                       float *out, const int nt) {
    __m256 acc[4];
    zero_term_lanes_avx2(sz, gsum, gsum_stride, n_groups, acc, nt);
#pragma GCC unroll 4
    for (int t = 0; t < nt; t++) out[t] = sum8(acc[t]);
}

EK_AVX2 EK_INLINE float zero_term_avx2(const float *sz, const float *gsum, int64_t n_groups) {
    float out;
    zero_terms_avx2(sz, gsum, 0, n_groups, &out, 1);
    return out;
}

/* Per dword lane, the integer dot product of half a transposed quad (4 vectors) with the token's transposed
 * activations (from x, 64 bytes apart). vpmaddubsw's int16 pair sums of several vectors are added before the
 * one vpmaddwd while they cannot overflow (|pair| <= 2 * (2^bits - 1) * 127: four of them up to 5 bits, two
 * at 6 bits): the same integers as a vpmaddwd per vector, with fewer instructions. */
EK_AVX2 EK_INLINE __m256i half_dot_avx2(const __m256i *c, const int8_t *x, const int bits) {
    __m256i u = _mm256_setzero_si256();
    if (bits <= 6) {
        const int per = bits <= 5 ? 4 : 2;
        for (int j0 = 0; j0 < 4; j0 += per) {
            __m256i pairs = _mm256_maddubs_epi16(c[j0], _mm256_loadu_si256((const __m256i *)(x + 64 * j0)));
            for (int j = j0 + 1; j < j0 + per; j++)
                pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(c[j], _mm256_loadu_si256((const __m256i *)(x + 64 * j))));
            u = _mm256_add_epi32(u, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
        }
        return u;
    }
    for (int j = 0; j < 4; j++) u = _mm256_add_epi32(u, dot_lanes(c[j], _mm256_loadu_si256((const __m256i *)(x + 64 * j)), bits));
    return u;
}

/* Both halves of a transposed quad against the token's transposed activations xt. */
EK_AVX2 EK_INLINE void quad_dot_avx2(const ek_v64 *c, const int8_t *xt, const int bits, __m256i *u0, __m256i *u1) {
    for (int h = 0; h < 2; h++) {
        const __m256i half[4] = {c[0].h[h], c[1].h[h], c[2].h[h], c[3].h[h]};
        *(h ? u1 : u0) = half_dot_avx2(half, xt + 32 * h, bits);
    }
}

/* A row's per-lane scales for transposed quad k: groups of 32 to 256, a permute of the quad's <= 8
 * consecutive scales; groups of 16, two permutes of its 16 and a blend (each lane's 16 codes are one group);
 * a partial last quad of groups of 16, a gather clamped to the row's last group (past it the codes are
 * zeros and the scales finite). */
typedef struct {
    int shift, permuted;
    int64_t n_groups;
    __m256i rel0, rel1, pos0, pos1, last_group;
} quad_scales_map;

EK_AVX2 EK_INLINE quad_scales_map quad_scales_init(const ek_matrix *m, const row_shape *shape) {
    const int64_t n_groups = shape->n_groups;
    quad_scales_map map;
    map.shift = shape->group_shift;
    map.permuted = m->group >= 32 && m->group <= 256;
    map.n_groups = n_groups;
    /* The first code of each lane's 16 within the quad: (lane & 3) * 64 + (lane >> 2) * 16. */
    map.pos0 = _mm256_setr_epi32(0, 64, 128, 192, 16, 80, 144, 208);
    map.pos1 = _mm256_setr_epi32(32, 96, 160, 224, 48, 112, 176, 240);
    map.rel0 = _mm256_srli_epi32(map.pos0, map.shift);
    map.rel1 = _mm256_srli_epi32(map.pos1, map.shift);
    map.last_group = _mm256_set1_epi32((int)(n_groups - 1));
    return map;
}

/* A matrix's rows as the AVX2 row functions walk them: its shape, the transposed quads (all of them; with
 * groups of 32 to 256 only the full ones, a partial last quad's chunks then read in natural order), and the
 * map from a quad's lanes to the row's scales. */
typedef struct {
    row_shape shape;
    int64_t n_tq, n_tail;
    quad_scales_map map;
} row_layout;

EK_AVX2 EK_INLINE row_layout row_layout_init(const ek_matrix *m, const int bits) {
    row_layout l;
    l.shape = shape_of(m, bits);
    l.map = quad_scales_init(m, &l.shape);
    l.n_tq = l.map.permuted ? l.shape.n_chunks / 4 : l.shape.n_quads;
    l.n_tail = l.map.permuted ? l.shape.n_chunks % 4 : 0;
    return l;
}

EK_AVX2 EK_INLINE __m256 quad_scale_half_avx2(const quad_scales_map *map, const float *sc, int64_t k, int h) {
    if (map->permuted) return _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc + ((k * 256) >> map->shift)), h ? map->rel1 : map->rel0);
    if (map->shift == 4 && 16 * k + 16 <= map->n_groups) { /* lane l: group (l & 3) * 4 + (l >> 2) + 2h */
        const __m256i pick = h ? _mm256_setr_epi32(2, 6, 2, 6, 3, 7, 3, 7) : _mm256_setr_epi32(0, 4, 0, 4, 1, 5, 1, 5);
        const __m256 a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc + 16 * k), pick);
        const __m256 b = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc + 16 * k + 8), pick);
        return _mm256_blend_ps(a, b, 0xCC);
    }
    const __m256i start = _mm256_set1_epi32((int)(k * 256));
    const __m256i g = _mm256_min_epi32(_mm256_srli_epi32(_mm256_add_epi32(start, h ? map->pos1 : map->pos0), map->shift),
                                       map->last_group);
    return _mm256_i32gather_ps(sc, g, 4);
}

EK_AVX2 EK_INLINE void quad_scales_avx2(const quad_scales_map *map, const float *sc, int64_t k, __m256 *s0, __m256 *s1) {
    *s0 = quad_scale_half_avx2(map, sc, k, 0);
    *s1 = quad_scale_half_avx2(map, sc, k, 1);
}

/* A token's activation scales per lane of transposed quad k (dx of the quad's 8 blocks, a partial quad's
 * missing blocks zero), for the two halves. */
EK_AVX2 EK_INLINE void quad_dx_avx2(const float *dx, int64_t k, int64_t n_blocks, __m256 *d0, __m256 *d1) {
    const int64_t left = n_blocks - 8 * k;
    const __m256 d = left >= 8 ? _mm256_loadu_ps(dx + 8 * k)
                               : _mm256_maskload_ps(dx + 8 * k, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left),
                                                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    *d0 = _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
    *d1 = _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7));
}

/* acc += the quad's lane sums times scale x activation scale. */
EK_AVX2 EK_INLINE void quad_accumulate(__m256i u0, __m256i u1, __m256 s0, __m256 s1, __m256 d0, __m256 d1,
                                       __m256 *acc0, __m256 *acc1) {
    *acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(u0), _mm256_mul_ps(d0, s0), *acc0);
    *acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(u1), _mm256_mul_ps(d1, s1), *acc1);
}

/* The chunks of a partial last quad, with groups of 32 or more, in natural order against the token's
 * untransposed activations: each 32-code half is one activation block in one group, so one scale per half
 * and no transposition, nor the zero chunks that fill a transposed quad. */
EK_AVX2 EK_INLINE void tail_accumulate(const ek_v64 *c, int64_t first_chunk, int64_t n_tail, const int8_t *xq,
                                       const float *dx, const float *sc, int shift, const int bits, __m256 *acc0,
                                       __m256 *acc1) {
    for (int64_t i = 0; i < n_tail; i++) {
        const int64_t j = first_chunk + i;
        const __m256i u0 = dot_lanes(c[i].h[0], _mm256_loadu_si256((const __m256i *)(xq + 64 * j)), bits);
        const __m256i u1 = dot_lanes(c[i].h[1], _mm256_loadu_si256((const __m256i *)(xq + 64 * j + 32)), bits);
        *acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(u0), _mm256_set1_ps(sc[(64 * j) >> shift] * dx[2 * j]), *acc0);
        *acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(u1), _mm256_set1_ps(sc[(64 * j + 32) >> shift] * dx[2 * j + 1]), *acc1);
    }
}

/* One (row, token)'s lanes from its quad accumulators, the tail chunks included: their sum8 is its sum. */
EK_AVX2 EK_INLINE __m256 row_token_lanes(__m256 acc0, __m256 acc1, const ek_v64 *tail, int64_t first_chunk,
                                         int64_t n_tail, const int8_t *xq, const float *dx, const float *sc,
                                         int shift, const int bits) {
    tail_accumulate(tail, first_chunk, n_tail, xq, dx, sc, shift, bits, &acc0, &acc1);
    return _mm256_add_ps(acc0, acc1);
}

EK_AVX2 EK_INLINE float row_token_sum(__m256 acc0, __m256 acc1, const ek_v64 *tail, int64_t first_chunk,
                                      int64_t n_tail, const int8_t *xq, const float *dx, const float *sc, int shift,
                                      const int bits) {
    return sum8(row_token_lanes(acc0, acc1, tail, first_chunk, n_tail, xq, dx, sc, shift, bits));
}

/* One (row, token)'s result: its lane sum less the zero points' term. Every path ends with these two
 * sums, formed the same way, which keeps them bit-identical. */
EK_AVX2 EK_INLINE float row_token_result(__m256 acc0, __m256 acc1, const ek_v64 *tail, int64_t first_chunk,
                                         int64_t n_tail, const int8_t *xq, const float *dx, const float *sc,
                                         const float *sz, const float *gsum, int64_t n_groups, int shift,
                                         const int bits) {
    return row_token_sum(acc0, acc1, tail, first_chunk, n_tail, xq, dx, sc, shift, bits) -
           zero_term_avx2(sz, gsum, n_groups);
}

/* One token (decoding): each quad decoded into registers and used at once; the lane sums of 8 rows are
 * reduced together (one at a time they were ~15 % of a 640-column row's time). */
EK_AVX2 EK_INLINE void rows_one_token_avx2(const simd_job *job, int64_t begin, int64_t end, const int bits) {
    const ek_matrix *m = job->base.m;
    const row_layout L = row_layout_init(m, bits);
    ek_v64 tail[3];
    float sc[EK_AVX2_MAX_COLS / 16 + 8], sz[EK_AVX2_MAX_COLS / 16 + 8];
    __m256 dq[EK_AVX2_MAX_COLS / 128]; /* the token's activation scales per quad lane */
    __m256 lanes[8], zero_lanes[8];
    for (int64_t k = 0; k < L.n_tq; k++) quad_dx_avx2(job->base.dx, k, L.shape.n_blocks, &dq[2 * k], &dq[2 * k + 1]);
    for (int64_t r = begin; r < end; r++) {
        const int64_t i = (r - begin) & 7;
        const uint8_t *q = m->q + r * L.shape.row_bytes;
        row_scales_avx2(m, r, L.shape.n_groups, bits == 8 ? 128.f : 0.f, sc, sz);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t k = 0; k < L.n_tq; k++) {
            ek_v64 c[4];
            __m256i u0, u1;
            __m256 s0, s1;
            /* a quad's bytes EK_PREFETCH_BYTES ahead, quad by quad: a whole long row's lines requested at
             * once at its start left rows of 8960 columns at ~65 % of the rate of rows of 1536 */
            for (int off = 0; off < 32 * bits; off += 64)
                _mm_prefetch((const char *)(q + k * 32 * bits + EK_PREFETCH_BYTES + off), _MM_HINT_T1);
            row_quad_avx2(q, bits, k, L.shape.n_chunks, c);
            quad_dot_avx2(c, job->xt + k * 256, bits, &u0, &u1);
            quad_scales_avx2(&L.map, sc, k, &s0, &s1);
            quad_accumulate(u0, u1, s0, s1, dq[2 * k], dq[2 * k + 1], &acc0, &acc1);
        }
        for (int64_t j = 0; j < L.n_tail; j++) decode_chunk_avx2(q + (4 * L.n_tq + j) * 8 * bits, bits, &tail[j]);
        /* as row_token_result, the two sums left as lanes for sum8_rows */
        lanes[i] = row_token_lanes(acc0, acc1, tail, 4 * L.n_tq, L.n_tail, job->base.xq, job->base.dx, sc,
                                   L.map.shift, bits);
        zero_term_lanes_avx2(sz, job->gsum, 0, L.shape.n_groups, &zero_lanes[i], 1);
        if (i == 7 || r + 1 == end) {
            const int64_t first = r - i;
            for (int64_t j = i + 1; j < 8; j++) lanes[j] = zero_lanes[j] = _mm256_setzero_ps();
            float y[8];
            _mm256_storeu_ps(y, _mm256_sub_ps(sum8_rows(lanes), sum8_rows(zero_lanes)));
            for (int64_t j = 0; j <= i; j++) job->base.y[job->base.out_index ? job->base.out_index[first + j] : first + j] = y[j];
        }
    }
}

/* A few tokens (speculative verification): each half quad of a row is decoded into registers once and used
 * at once by up to EK_AVX2_TILE_TOKENS tokens, whose accumulators stay in registers (the several-token path's
 * decode to L1 and reload is load-bound at 2-8 tokens). Long rows go by segments of quads, a block of rows
 * at a time, so that the tokens' activations of a segment stay in L1; the accumulators wait in memory
 * between segments. Each (row, token) does the one-token arithmetic in the same order, so a token alone =
 * in a few, bit for bit. */
#define EK_AVX2_TILE_TOKENS 4
#define EK_AVX2_TILE_ROWS 8
#ifndef EK_AVX2_SEGMENT_QUADS
/* A row's quads per segment, whatever the token count: with rows from DRAM, 6 (768 bytes of 4-bit codes)
 * beat a segment sized by the tokens' activations (8 KB of them: 16 quads at 2 tokens, 8 at 4, 4 at 8) by
 * 1.4x at 2 tokens and 1.1x at 8 on rows of 8960 columns, and tie at 4 and on short rows. */
#define EK_AVX2_SEGMENT_QUADS 6
#endif
#ifndef EK_AVX2_FEW_TOKENS
#define EK_AVX2_FEW_TOKENS 8 /* longer batches (prefill) go by blocks of rows decoded into L1 */
#endif

/* One half quad's codes c (lane scales s) against nt tokens' activations (xt, 256 * n_quads apart) and
 * activation scales (dq, dq_stride apart), into their accumulators a: as quad_accumulate. */
EK_AVX2 EK_INLINE void tile_half_quad_avx2(const __m256i *c, __m256 s, const int8_t *xt, int64_t xt_stride,
                                           const __m256 *dq, int64_t dq_stride, __m256 *a, const int nt,
                                           const int bits) {
#pragma GCC unroll 4
    for (int t = 0; t < nt; t++) {
        const __m256i u = half_dot_avx2(c, xt + t * xt_stride, bits);
        a[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(u), _mm256_mul_ps(dq[t * dq_stride], s), a[t]);
    }
}

/* Quads k0..k1 of a row (lane scales ls[2 * (k - k0) + h]) for nt tokens; a partial quad decodes first. */
EK_AVX2 EK_INLINE void tile_segment_avx2(const uint8_t *q, const __m256 *ls, const int8_t *xt, const __m256 *dq,
                                         int64_t dq_stride, const row_shape *shape, int64_t k0, int64_t k1,
                                         __m256 (*acc)[2], const int nt, const int bits) {
    const int64_t n_chunks = shape->n_chunks;
    const int64_t full_end = k1 < n_chunks / 4 ? k1 : n_chunks / 4, xt_stride = shape->n_quads * 256;
    for (int h = 0; h < 2; h++) { /* half by half: a half's codes and the tokens' accumulators fit the registers */
        __m256 a[EK_AVX2_TILE_TOKENS];
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) a[t] = acc[t][h];
        for (int64_t k = k0; k < full_end; k++) {
            __m256i c[4];
            decode_quad_half_avx2(q + k * 32 * bits, bits, h, c);
            tile_half_quad_avx2(c, ls[2 * (k - k0) + h], xt + k * 256 + 32 * h, xt_stride, dq + 2 * k + h, dq_stride,
                                a, nt, bits);
        }
        if (full_end < k1) { /* the partial last quad of groups of 16 */
            ek_v64 whole[4];
            row_quad_avx2(q, bits, full_end, n_chunks, whole);
            const __m256i c[4] = {whole[0].h[h], whole[1].h[h], whole[2].h[h], whole[3].h[h]};
            tile_half_quad_avx2(c, ls[2 * (full_end - k0) + h], xt + full_end * 256 + 32 * h, xt_stride,
                                dq + 2 * full_end + h, dq_stride, a, nt, bits);
        }
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) acc[t][h] = a[t];
    }
}

EK_AVX2 EK_INLINE void rows_few_tokens_avx2(const simd_job *job, int64_t begin, int64_t end, const int bits) {
    const ek_matrix *m = job->base.m;
    const row_layout L = row_layout_init(m, bits);
    const int64_t T = job->base.n_tokens;
    const int64_t dq_stride = 2 * L.n_tq, group_stride = L.shape.n_groups + 8, quad_bytes = 32 * bits;
    const int64_t segment = EK_AVX2_SEGMENT_QUADS;
    ek_v64 tail[3];
    float sc[EK_AVX2_TILE_ROWS * (EK_AVX2_MAX_COLS / 16 + 8)], sz[EK_AVX2_TILE_ROWS * (EK_AVX2_MAX_COLS / 16 + 8)];
    __m256 dq[EK_AVX2_FEW_TOKENS * EK_AVX2_MAX_COLS / 128]; /* each token's activation scales per quad lane */
    __m256 acc[EK_AVX2_TILE_ROWS][EK_AVX2_FEW_TOKENS][2], ls[2 * EK_AVX2_SEGMENT_QUADS];
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < L.n_tq; k++)
            quad_dx_avx2(job->base.dx + t * L.shape.n_blocks, k, L.shape.n_blocks, &dq[t * dq_stride + 2 * k],
                         &dq[t * dq_stride + 2 * k + 1]);
    for (int64_t r0 = begin; r0 < end; r0 += EK_AVX2_TILE_ROWS) {
        const int64_t nr = end - r0 < EK_AVX2_TILE_ROWS ? end - r0 : EK_AVX2_TILE_ROWS;
        for (int64_t i = 0; i < nr; i++) {
            row_scales_avx2(m, r0 + i, L.shape.n_groups, bits == 8 ? 128.f : 0.f, sc + i * group_stride,
                            sz + i * group_stride);
            for (int64_t t = 0; t < T; t++) acc[i][t][0] = acc[i][t][1] = _mm256_setzero_ps();
        }
        for (int64_t k0 = 0; k0 < L.n_tq; k0 += segment) {
            const int64_t k1 = L.n_tq - k0 < segment ? L.n_tq : k0 + segment;
            for (int64_t i = 0; i < nr; i++) {
                const uint8_t *q = m->q + (r0 + i) * L.shape.row_bytes;
                /* this row's next segment, or the next block's row's first one: a block of rows ahead */
                const uint8_t *next = k1 < L.n_tq ? q + k1 * quad_bytes : q + EK_AVX2_TILE_ROWS * L.shape.row_bytes;
                const int64_t left = k1 < L.n_tq ? L.n_tq - k1 : L.n_tq, next_quads = left < segment ? left : segment;
                for (int64_t off = 0; off < next_quads * quad_bytes; off += 64)
                    _mm_prefetch((const char *)(next + off), _MM_HINT_T1);
                for (int64_t k = k0; k < k1; k++)
                    for (int h = 0; h < 2; h++) ls[2 * (k - k0) + h] = quad_scale_half_avx2(&L.map, sc + i * group_stride, k, h);
                for (int64_t t0 = 0; t0 < T; t0 += EK_AVX2_TILE_TOKENS) {
                    const int8_t *xt = job->xt + t0 * L.shape.n_quads * 256;
                    const __m256 *d = dq + t0 * dq_stride;
                    switch (T - t0 < EK_AVX2_TILE_TOKENS ? T - t0 : EK_AVX2_TILE_TOKENS) { /* constant widths */
                    case 1: tile_segment_avx2(q, ls, xt, d, dq_stride, &L.shape, k0, k1, &acc[i][t0], 1, bits); break;
                    case 2: tile_segment_avx2(q, ls, xt, d, dq_stride, &L.shape, k0, k1, &acc[i][t0], 2, bits); break;
                    case 3: tile_segment_avx2(q, ls, xt, d, dq_stride, &L.shape, k0, k1, &acc[i][t0], 3, bits); break;
                    default: tile_segment_avx2(q, ls, xt, d, dq_stride, &L.shape, k0, k1, &acc[i][t0], 4, bits); break;
                    }
                }
            }
        }
        for (int64_t i = 0; i < nr; i++) { /* as row_token_result, the tokens' zero-point terms together */
            const uint8_t *q = m->q + (r0 + i) * L.shape.row_bytes;
            const int64_t out = job->base.out_index ? job->base.out_index[r0 + i] : r0 + i;
            const float *rsz = sz + i * group_stride;
            float zero[EK_AVX2_FEW_TOKENS];
            for (int64_t t0 = 0; t0 < T; t0 += EK_AVX2_TILE_TOKENS) {
                const float *g = job->gsum + t0 * L.shape.n_groups;
                switch (T - t0 < EK_AVX2_TILE_TOKENS ? T - t0 : EK_AVX2_TILE_TOKENS) {
                case 1: zero_terms_avx2(rsz, g, L.shape.n_groups, L.shape.n_groups, zero + t0, 1); break;
                case 2: zero_terms_avx2(rsz, g, L.shape.n_groups, L.shape.n_groups, zero + t0, 2); break;
                case 3: zero_terms_avx2(rsz, g, L.shape.n_groups, L.shape.n_groups, zero + t0, 3); break;
                default: zero_terms_avx2(rsz, g, L.shape.n_groups, L.shape.n_groups, zero + t0, 4); break;
                }
            }
            for (int64_t j = 0; j < L.n_tail; j++) decode_chunk_avx2(q + (4 * L.n_tq + j) * 8 * bits, bits, &tail[j]);
            for (int64_t t = 0; t < T; t++)
                job->base.y[t * job->base.out_stride + out] =
                    row_token_sum(acc[i][t][0], acc[i][t][1], tail, 4 * L.n_tq, L.n_tail, job->base.xq + t * L.shape.cols,
                                  job->base.dx + t * L.shape.n_blocks, sc + i * group_stride, L.map.shift, bits) - zero[t];
        }
    }
}

/* Several tokens: a block of rows is decoded once (codes, per-lane scales, s * z per group) into buffers
 * that stay in L1 with a block of tokens' activations, and every (row, token) of the two blocks runs from
 * there. Each (row, token) does the one-token arithmetic in the same order, so a token alone = in a
 * batch, bit for bit. */
#define EK_AVX2_CODE_VECTORS 512   /* 32 KB of decoded codes */
#define EK_AVX2_SCALE_VECTORS 256  /* 8 KB of per-lane scales; as much for the tokens' dx */
#define EK_AVX2_GROUP_FLOATS 2048  /* 8 KB of scales per group; as much for s * z */
EK_AVX2 EK_INLINE void rows_tokens_avx2(const simd_job *job, int64_t begin, int64_t end, const int bits) {
    const ek_matrix *m = job->base.m;
    const row_layout L = row_layout_init(m, bits);
    const int64_t T = job->base.n_tokens;
    const int64_t row_vectors = 4 * L.n_tq + L.n_tail, group_stride = L.shape.n_groups + 8;
    int64_t block_rows = EK_AVX2_CODE_VECTORS / row_vectors;
    if (block_rows > EK_AVX2_SCALE_VECTORS / (2 * L.n_tq + 1)) block_rows = EK_AVX2_SCALE_VECTORS / (2 * L.n_tq + 1);
    if (block_rows > EK_AVX2_GROUP_FLOATS / group_stride) block_rows = EK_AVX2_GROUP_FLOATS / group_stride;
    if (block_rows > 8) block_rows = 8;
    int64_t block_tokens = EK_AVX2_SCALE_VECTORS / (2 * L.n_tq + 1);
    if (block_tokens > 8) block_tokens = 8;
    ek_v64 codes[EK_AVX2_CODE_VECTORS];
    __m256 scales[EK_AVX2_SCALE_VECTORS], dq[EK_AVX2_SCALE_VECTORS];
    float sc[EK_AVX2_GROUP_FLOATS], sz[EK_AVX2_GROUP_FLOATS];
    for (int64_t r0 = begin; r0 < end; r0 += block_rows) {
        const int64_t nr = end - r0 < block_rows ? end - r0 : block_rows;
        for (int64_t i = 0; i < nr; i++) {
            const uint8_t *q = m->q + (r0 + i) * L.shape.row_bytes;
            ek_v64 *c = codes + i * row_vectors;
            float *rsc = sc + i * group_stride;
            row_scales_avx2(m, r0 + i, L.shape.n_groups, bits == 8 ? 128.f : 0.f, rsc, sz + i * group_stride);
            for (int64_t k = 0; k < L.n_tq; k++) {
                row_quad_avx2(q, bits, k, L.shape.n_chunks, &c[4 * k]);
                quad_scales_avx2(&L.map, rsc, k, &scales[i * 2 * L.n_tq + 2 * k], &scales[i * 2 * L.n_tq + 2 * k + 1]);
            }
            for (int64_t j = 0; j < L.n_tail; j++) decode_chunk_avx2(q + (4 * L.n_tq + j) * 8 * bits, bits, &c[4 * L.n_tq + j]);
        }
        for (int64_t t0 = 0; t0 < T; t0 += block_tokens) {
            const int64_t nt = T - t0 < block_tokens ? T - t0 : block_tokens;
            for (int64_t t = 0; t < nt; t++)
                for (int64_t k = 0; k < L.n_tq; k++)
                    quad_dx_avx2(job->base.dx + (t0 + t) * L.shape.n_blocks, k, L.shape.n_blocks,
                                 &dq[t * 2 * L.n_tq + 2 * k], &dq[t * 2 * L.n_tq + 2 * k + 1]);
            for (int64_t i = 0; i < nr; i++) {
                const ek_v64 *c = codes + i * row_vectors;
                const __m256 *s = scales + i * 2 * L.n_tq;
                const int64_t out = job->base.out_index ? job->base.out_index[r0 + i] : r0 + i;
                for (int64_t t = t0; t < t0 + nt; t++) {
                    const __m256 *d = dq + (t - t0) * 2 * L.n_tq;
                    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
                    for (int64_t k = 0; k < L.n_tq; k++) {
                        __m256i u0, u1;
                        quad_dot_avx2(&c[4 * k], job->xt + (t * L.shape.n_quads + k) * 256, bits, &u0, &u1);
                        quad_accumulate(u0, u1, s[2 * k], s[2 * k + 1], d[2 * k], d[2 * k + 1], &acc0, &acc1);
                    }
                    job->base.y[t * job->base.out_stride + out] = row_token_result(
                        acc0, acc1, &c[4 * L.n_tq], 4 * L.n_tq, L.n_tail, job->base.xq + t * L.shape.cols,
                        job->base.dx + t * L.shape.n_blocks, sc + i * group_stride, sz + i * group_stride,
                        job->gsum + t * L.shape.n_groups, L.shape.n_groups, L.map.shift, bits);
                }
            }
        }
    }
}

EK_AVX2 EK_INLINE void rows_avx2(const simd_job *job, int64_t begin, int64_t end, const int bits) {
    if (job->base.n_tokens == 1) rows_one_token_avx2(job, begin, end, bits);
    else if (job->base.n_tokens <= EK_AVX2_FEW_TOKENS) rows_few_tokens_avx2(job, begin, end, bits);
    else rows_tokens_avx2(job, begin, end, bits);
}

#define EK_AVX2_KERNEL(BITS)                                                                                 \
    EK_AVX2 static void matvec_rows_avx2_##BITS(void *ctx, int64_t begin, int64_t end) {                      \
        rows_avx2(ctx, begin, end, BITS);                                                                    \
    }
EK_AVX2_KERNEL(1)
EK_AVX2_KERNEL(2)
EK_AVX2_KERNEL(3)
EK_AVX2_KERNEL(4)
EK_AVX2_KERNEL(5)
EK_AVX2_KERNEL(6)
EK_AVX2_KERNEL(7)
EK_AVX2_KERNEL(8)

static const ek_task avx2_kernels[9] = {NULL, matvec_rows_avx2_1, matvec_rows_avx2_2, matvec_rows_avx2_3,
                                        matvec_rows_avx2_4, matvec_rows_avx2_5, matvec_rows_avx2_6,
                                        matvec_rows_avx2_7, matvec_rows_avx2_8};
#endif

/* ----------------------------------------------------------------------------------------------------- */
/* prepared activations and the matrix-vector entry point                                                  */

/* T activation vectors of `cols` values, quantized once and reusable for every matrix with `cols` columns
 * (q, k and v share one; gate and up another). */
typedef struct {
    int64_t n_tokens, cols;
    const int8_t *xq;
    const float *dx, *bsum;
    const int8_t *xt; /* the AVX-512 path's transposed copy of xq (set by matvec_stacked) */
} prepared_act;

static int supported(const ek_matrix *m, int64_t cols) {
    return m->cols == cols && m->cols % 64 == 0 && (m->group % 32 == 0 || (m->group == 16 && m->zeros)) &&
           m->cols % m->group == 0 && m->bits >= 1 && m->bits <= 8;
}

/* Rows [begin, end) of one matrix against prepared activations, on the best path for this CPU. `gsum`
 * ([T][n_groups] activation sums per group) is needed only for fp16 zero points. */
static void matrix_rows(const ek_matrix *m, const prepared_act *pa, const float *gsum, float *y, int64_t out_stride,
                        const int32_t *out_index, int64_t begin, int64_t end) {
    matvec_job job = {m, pa->xq, pa->dx, pa->bsum, y, out_index, pa->n_tokens, out_stride};
#ifdef EK_X86
    /* The SIMD paths need groups of 16, 32 or 64 x 2^k codes (a chunk -> group map by shifting). */
    const int shifted_groups = m->group == 16 || m->group == 32 ||
                               (m->group % 64 == 0 && !((m->group / 64) & (m->group / 64 - 1)));
    simd_job sjob = {job, gsum, pa->xt};
    if (ek_cpu_level() >= EK_AVX512_VNNI && shifted_groups) {
        avx512_kernels[m->bits](&sjob, begin, end);
        return;
    }
    if (ek_cpu_level() == EK_AVX2_LEVEL && shifted_groups && m->cols <= EK_AVX2_MAX_COLS) {
        avx2_kernels[m->bits](&sjob, begin, end);
        return;
    }
#endif
    (void)gsum;
    matvec_rows_generic(&job, begin, end);
}

/* Per-group sums of the quantized activations [T][n_groups] (dx times the int8 values), for the zero-point
 * term (malloc'd; NULL when out of memory). */
static float *group_sums(const ek_matrix *m, const prepared_act *pa) {
    const int64_t cols = m->cols, n_groups = cols / m->group, n_blocks = cols / 32;
    float *gsum = malloc(sizeof(float) * (size_t)(pa->n_tokens * n_groups));
    if (!gsum) return NULL;
    for (int64_t t = 0; t < pa->n_tokens; t++)
        for (int64_t g = 0; g < n_groups; g++) {
            float total = 0.f;
            if (m->group >= 32) {
                for (int64_t b = g * (m->group / 32); b < (g + 1) * (m->group / 32); b++) total += pa->bsum[t * n_blocks + b];
            } else { /* groups of 16: half a block */
                int32_t sum = 0;
                for (int64_t j = g * m->group; j < (g + 1) * m->group; j++) sum += pa->xq[t * cols + j];
                total = pa->dx[t * n_blocks + g * m->group / 32] * (float)sum;
            }
            gsum[t * n_groups + g] = total;
        }
    return gsum;
}

/* Several matrices with the same input, as one parallel job over their stacked rows (one thread
 * hand-off instead of one per matrix: q/k/v, gate/up, the row tiers of an output matrix). Matrix i writes
 * ys[i][t * strides[i] + out_index[i][row]] (out_index NULL or its entry NULL: the row itself). */
#define EK_MAX_STACK 8
typedef struct {
    int n;
    const ek_matrix *ms[EK_MAX_STACK];
    float *ys[EK_MAX_STACK];
    int64_t strides[EK_MAX_STACK];
    float *gsums[EK_MAX_STACK];
    int64_t first_row[EK_MAX_STACK + 1];
    const prepared_act *pa;
    const int32_t *out_index[EK_MAX_STACK];
} stacked_job;

static void stacked_rows(void *ctx, int64_t begin, int64_t end) {
    const stacked_job *job = ctx;
    for (int i = 0; i < job->n; i++) {
        int64_t lo = begin > job->first_row[i] ? begin : job->first_row[i];
        int64_t hi = end < job->first_row[i + 1] ? end : job->first_row[i + 1];
        if (lo < hi)
            matrix_rows(job->ms[i], job->pa, job->gsums[i], job->ys[i], job->strides[i], job->out_index[i],
                        lo - job->first_row[i], hi - job->first_row[i]);
    }
}

static int matvec_stacked(const ek_matrix *const *ms, float *const *ys, const int64_t *strides, int n,
                          const prepared_act *given, const int32_t *const *out_index) {
    prepared_act act = *given;
    const prepared_act *pa = &act;
    stacked_job job = {.n = n, .pa = pa};
    if (n < 1 || n > EK_MAX_STACK) return -1;
    int status = 0;
    for (int i = 0; i < n; i++) {
        if (!supported(ms[i], pa->cols)) return -1;
        job.ms[i] = ms[i];
        job.ys[i] = ys[i];
        job.strides[i] = strides[i];
        job.out_index[i] = out_index ? out_index[i] : NULL;
        job.first_row[i + 1] = job.first_row[i] + ms[i]->rows;
    }
    int8_t *xt = NULL;
#ifdef EK_X86
    if (ek_cpu_level() >= EK_AVX2_LEVEL) {
        const int64_t quads = (pa->cols / 64 + 3) / 4;
        if (!(xt = malloc((size_t)(pa->n_tokens * quads * 256)))) return -2;
        quad_transpose_act(pa->xq, pa->n_tokens, pa->cols, xt);
        act.xt = xt;
    }
#endif
    int owned[EK_MAX_STACK] = {0};
    for (int i = 0; i < n; i++) { /* once per call, not per parallel piece; shared by equal group sizes */
        for (int j = 0; j < i && !job.gsums[i]; j++)
            if (ms[j]->group == ms[i]->group) job.gsums[i] = job.gsums[j];
        if (!job.gsums[i]) {
            owned[i] = 1;
            if (!(job.gsums[i] = group_sums(ms[i], pa))) status = -2;
        }
    }
    if (status == 0) {
        const int64_t total = job.first_row[n];
        int64_t grain = total / (8 * (int64_t)pool.n_threads);
        grain = grain < 16 ? 16 : grain > 1024 ? 1024 : grain;
        parallel_for(total, grain, stacked_rows, &job);
    }
    for (int i = 0; i < n; i++)
        if (owned[i]) free(job.gsums[i]);
    free(xt);
    return status;
}

/* y[t][out_index[r]] = (W x_t)[r] for T activation vectors already quantized by ek_quantize_act.
 * Returns 0, -1 when the matrix is not in a supported shape (cols % 64, group 16 or % 32, bits 1..8), -2
 * when out of memory. */
EK_EXPORT int ek_matvec(const ek_matrix *m, int64_t n_tokens, const int8_t *xq, const float *dx,
                        const float *bsum, float *y, int64_t out_stride, const int32_t *out_index) {
    const prepared_act pa = {n_tokens, m->cols, xq, dx, bsum};
    return matvec_stacked(&m, &y, &out_stride, 1, &pa, &out_index);
}

/* The same for up to 8 matrices writing disjoint columns of one output y [T][out_stride] (an output
 * matrix split into row tiers), as one parallel job. */
EK_EXPORT int ek_matvec_parts(const ek_matrix *const *ms, const int32_t *const *out_index, int n, int64_t n_tokens,
                              const int8_t *xq, const float *dx, const float *bsum, float *y, int64_t out_stride) {
    if (n < 1 || n > EK_MAX_STACK) return -1;
    const prepared_act pa = {n_tokens, ms[0]->cols, xq, dx, bsum};
    float *ys[EK_MAX_STACK];
    int64_t strides[EK_MAX_STACK];
    for (int i = 0; i < n; i++) {
        ys[i] = y;
        strides[i] = out_stride;
    }
    return matvec_stacked(ms, ys, strides, n, &pa, out_index);
}

/* ----------------------------------------------------------------------------------------------------- */
/* dequantization for batched (prefill) matmuls                                                          */

/* Many tokens at once are compute-bound, and a bf16 matrix multiply (oneDNN in PyTorch) runs at several times
 * the int8 kernels' rate: the weight is dequantized block by block into a cache-sized buffer for it. */

static inline uint16_t float_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

typedef struct {
    const ek_matrix *m;
    void *out;
    int64_t first, ld; /* first row, output row stride (elements) */
    int bf16;
} dequant_job;

static void dequant_rows_generic(const dequant_job *job, int64_t begin, int64_t end) {
    const ek_matrix *m = job->m;
    const int64_t cols = m->cols, n_groups = cols / m->group, row_bytes = cols * m->bits / 8;
    uint8_t codes[cols];
    for (int64_t r = begin; r < end; r++) {
        const int64_t src = job->first + r;
        decode_row_generic(m->q + src * row_bytes, m->bits, cols, codes);
        for (int64_t col = 0; col < cols; col++) {
            const int64_t g = src * n_groups + col / m->group;
            const float zero = m->zeros ? (float)m->zeros[g] : m->zeros_f16 ? half_to_float(m->zeros_f16[g]) : 0.f;
            const float w = half_to_float(m->scales[g]) * ((float)codes[col] - zero);
            if (job->bf16) ((uint16_t *)job->out)[r * job->ld + col] = float_to_bf16(w);
            else ((float *)job->out)[r * job->ld + col] = w;
        }
    }
}

#ifdef EK_X86
/* The four natural-order chunks of quad k of a row (a switch on the bit width, so each decode is specialized). */
EK_AVX512 static inline void quad_chunks(const uint8_t *q, int bits, int64_t k, int64_t n_chunks, __m512i *out) {
    __m512i c[4];
    switch (bits) {
    case 1: row_quad(q, 1, k, n_chunks, c); break;
    case 2: row_quad(q, 2, k, n_chunks, c); break;
    case 3: row_quad(q, 3, k, n_chunks, c); break;
    case 4: row_quad(q, 4, k, n_chunks, c); break;
    case 5: row_quad(q, 5, k, n_chunks, c); break;
    case 6: row_quad(q, 6, k, n_chunks, c); break;
    case 7: row_quad(q, 7, k, n_chunks, c); break;
    default: row_quad(q, 8, k, n_chunks, c);
    }
    transpose_quad(out, c[0], c[1], c[2], c[3]);
}

/* Weights of 16 columns of a row starting at column `col` (16 codes in `lane`): s * (code - z), exactly as
 * the float reference computes them. */
EK_AVX512 static inline __m512 dequant16(const ek_matrix *m, int64_t row, int64_t col, __m128i lane) {
    const int64_t g = row * (m->cols / m->group) + col / m->group; /* groups >= 16: one per 16 columns */
    const float zero = m->zeros ? (float)m->zeros[g] : m->zeros_f16 ? _cvtsh_ss(m->zeros_f16[g]) : 0.f;
    const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lane));
    return _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(m->scales[g])), _mm512_sub_ps(codes, _mm512_set1_ps(zero)));
}

#define EK_DEQUANT_ROWS(NAME, TARGET, STORE_BF16)                                                            \
    TARGET static void NAME(const dequant_job *job, int64_t begin, int64_t end) {                            \
        const ek_matrix *m = job->m;                                                                         \
        const int64_t cols = m->cols, row_bytes = cols * m->bits / 8;                                        \
        for (int64_t r = begin; r < end; r++) {                                                              \
            const int64_t src = job->first + r;                                                              \
            const uint8_t *q = m->q + src * row_bytes;                                                       \
            __m512i chunks[4];                                                                               \
            for (int64_t c = 0; c < cols / 64; c++) {                                                        \
                if (c % 4 == 0) quad_chunks(q, m->bits, c / 4, cols / 64, chunks);                          \
                const __m512i codes = chunks[c % 4];                                                         \
                const int64_t col = c * 64;                                                                  \
                const __m512 w0 = dequant16(m, src, col, _mm512_extracti32x4_epi32(codes, 0));               \
                const __m512 w1 = dequant16(m, src, col + 16, _mm512_extracti32x4_epi32(codes, 1));          \
                const __m512 w2 = dequant16(m, src, col + 32, _mm512_extracti32x4_epi32(codes, 2));          \
                const __m512 w3 = dequant16(m, src, col + 48, _mm512_extracti32x4_epi32(codes, 3));          \
                if (job->bf16) {                                                                             \
                    uint16_t *o = (uint16_t *)job->out + r * job->ld + col;                                  \
                    STORE_BF16(o, w0, w1);                                                                   \
                    STORE_BF16(o + 32, w2, w3);                                                              \
                } else {                                                                                     \
                    float *o = (float *)job->out + r * job->ld + col;                                        \
                    _mm512_storeu_ps(o, w0);                                                                 \
                    _mm512_storeu_ps(o + 16, w1);                                                            \
                    _mm512_storeu_ps(o + 32, w2);                                                            \
                    _mm512_storeu_ps(o + 48, w3);                                                            \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

/* float -> bf16, round to nearest even, in integers (CPUs without AVX-512 BF16; the weights are finite) */
EK_AVX512 static inline __m256i bf16_rounded(__m512 w) {
    const __m512i u = _mm512_castps_si512(w);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16));
}
#define EK_STORE_BF16_INT(o, a, b)                                                                           \
    do {                                                                                                     \
        _mm256_storeu_si256((__m256i *)(o), bf16_rounded(a));                                                \
        _mm256_storeu_si256((__m256i *)((o) + 16), bf16_rounded(b));                                         \
    } while (0)
#define EK_STORE_BF16_NATIVE(o, a, b) _mm512_storeu_si512((void *)(o), (__m512i)_mm512_cvtne2ps_pbh(b, a))
#define EK_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,f16c,fma")))

EK_DEQUANT_ROWS(dequant_rows_avx512, EK_AVX512, EK_STORE_BF16_INT)
EK_DEQUANT_ROWS(dequant_rows_avx512_bf16, EK_AVX512_BF16, EK_STORE_BF16_NATIVE)
#endif

#ifdef EK_X86
/* 16 codes (bytes 0..15 of v) -> float32 s * (code - z), exactly as the reference computes them. */
EK_AVX2 EK_INLINE void dequant16_avx2(__m128i v, float s, float z, __m256 *w0, __m256 *w1) {
    const __m256 scale = _mm256_set1_ps(s), zero = _mm256_set1_ps(z);
    *w0 = _mm256_mul_ps(scale, _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), zero));
    *w1 = _mm256_mul_ps(scale, _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))), zero));
}

EK_AVX2 EK_INLINE __m256i bf16_bits_avx2(__m256 w) { /* round to nearest even, as float_to_bf16 */
    const __m256i u = _mm256_castps_si256(w);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

EK_AVX2 static void dequant_rows_avx2(const dequant_job *job, int64_t begin, int64_t end) {
    const ek_matrix *m = job->m;
    const int64_t cols = m->cols, n_groups = cols / m->group, row_bytes = cols * m->bits / 8;
    const int64_t n_chunks = cols / 64, n_full = n_chunks / 4;
    for (int64_t r = begin; r < end; r++) {
        const int64_t src = job->first + r;
        const uint8_t *q = m->q + src * row_bytes;
        for (int64_t k = 0; 4 * k < n_chunks; k++) {
            ek_v64 c[4];
            if (k < n_full) {
                decode_quad_avx2(q + k * 32 * m->bits, m->bits, c);
                transpose_quad_avx2(c); /* back to natural order: c[j] = chunk 4k + j */
            }
            for (int j = 0; j < 4 && 4 * k + j < n_chunks; j++) {
                if (k >= n_full) decode_chunk_avx2(q + (4 * k + j) * 8 * m->bits, m->bits, &c[j]);
                for (int seg = 0; seg < 4; seg++) {
                    const int64_t col = (4 * k + j) * 64 + 16 * seg, g = src * n_groups + col / m->group;
                    const float s = _cvtsh_ss(m->scales[g]);
                    const float z = m->zeros ? (float)m->zeros[g] : m->zeros_f16 ? _cvtsh_ss(m->zeros_f16[g]) : 0.f;
                    const __m256i half = c[j].h[seg >> 1];
                    const __m128i v = seg & 1 ? _mm256_extracti128_si256(half, 1) : _mm256_castsi256_si128(half);
                    __m256 w0, w1;
                    dequant16_avx2(v, s, z, &w0, &w1);
                    if (job->bf16) {
                        const __m256i packed = _mm256_permute4x64_epi64(
                            _mm256_packus_epi32(bf16_bits_avx2(w0), bf16_bits_avx2(w1)), 0xD8);
                        _mm256_storeu_si256((__m256i *)((uint16_t *)job->out + r * job->ld + col), packed);
                    } else {
                        float *o = (float *)job->out + r * job->ld + col;
                        _mm256_storeu_ps(o, w0);
                        _mm256_storeu_ps(o + 8, w1);
                    }
                }
            }
        }
    }
}
#endif

/* Whether the CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX): then batched matmuls use bf16. */
EK_EXPORT int ek_cpu_has_bf16(void) {
    static int has = -1;
    if (has < 0) {
#ifdef EK_X86
        __builtin_cpu_init();
        has = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
        has = 0;
#endif
    }
    return has;
}

static void dequant_rows(void *ctx, int64_t begin, int64_t end) {
    const dequant_job *job = ctx;
#ifdef EK_X86
    if (ek_cpu_level() >= EK_AVX512_VNNI) {
        if (ek_cpu_has_bf16()) dequant_rows_avx512_bf16(job, begin, end);
        else dequant_rows_avx512(job, begin, end);
        return;
    }
    if (ek_cpu_level() == EK_AVX2_LEVEL) {
        dequant_rows_avx2(job, begin, end);
        return;
    }
#endif
    dequant_rows_generic(job, begin, end);
}

/* Rows [first, first + n) of m as float32 (bf16 = 0) or bfloat16 (bf16 = 1) into out[n][ld], on the pool's
 * threads, or on the calling thread alone (`parallel` = 0: between PyTorch's own parallel matmuls, whose
 * OpenMP threads still spin on the other cores). Returns 0, or -1 when the matrix is not in a supported shape. */
EK_EXPORT int ek_dequantize(const ek_matrix *m, int64_t first, int64_t n, void *out, int64_t ld, int bf16,
                            int parallel) {
    if (!supported(m, m->cols) || first < 0 || n < 0 || first + n > m->rows || ld < m->cols) return -1;
    dequant_job job = {m, out, first, ld, bf16};
    if (parallel) parallel_for(n, 16, dequant_rows, &job);
    else dequant_rows(&job, 0, n);
    return 0;
}


/* ----------------------------------------------------------------------------------------------------- */
/* one decode step of a transformer block stack                                                          */

/* The plain loops below (norms, attention, activations) are compiled for AVX-512 and AVX2 as well, the
 * best chosen at load time (GCC/Clang function multi-versioning); elsewhere they are plain C. */
#if defined(EK_X86) && defined(__GNUC__) && !defined(__clang__)
#define EK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EK_CLONES
#endif

/* A quantized KV cache (edgelm/runtime/kv_cache.py): each cached vector of head_dim values is cut into
 * groups with an fp16 scale and a uint8 zero point, codes of `bits` bits packed densely (4-bit: two per byte,
 * low nibble first). bits 16: a float16 cache (codes hold the halves; no scales or zeros). */
typedef struct {
    int32_t bits, group;   /* bits 0: not quantized */
    uint8_t *codes;        /* [n_kv_heads][max_len][head_dim * bits / 8] */
    uint16_t *scales;      /* [n_kv_heads][max_len][head_dim / group] */
    uint8_t *zeros;        /* [n_kv_heads][max_len][head_dim / group] */
} ek_kv_quant;

/* float -> fp16, round to nearest even (subnormals and overflow included). */
static uint16_t float_to_half(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7FFFFFFFu;
    if (u >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (u > 0x7F800000u ? 0x200u : 0u));
    if (u >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* rounds past the largest half */
    if (u < 0x38800000u) { /* subnormal half (or zero): value / 2^-24, rounded to even */
        float scaled;
        memcpy(&scaled, &u, 4);
        return (uint16_t)(sign | (uint16_t)rintf(scaled * 16777216.0f));
    }
    const uint32_t rounded = u + 0xFFFu + ((u >> 13) & 1u);
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
}

/* n fp16 values -> floats (F16C where the CPU has AVX-512: the attention reads a float16 KV cache this way). */
#ifdef EK_X86
EK_AVX512 static void halves_to_floats_avx512(const uint16_t *h, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
    for (; i < n; i++) out[i] = half_to_float(h[i]);
}
#endif

#ifdef EK_X86
EK_AVX2 static void halves_to_floats_avx2(const uint16_t *h, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) out[i] = half_to_float(h[i]);
}
#endif

static void halves_to_floats(const uint16_t *h, float *out, int64_t n) {
#ifdef EK_X86
    if (ek_cpu_level() >= EK_AVX512_VNNI) {
        halves_to_floats_avx512(h, out, n);
        return;
    }
    if (ek_cpu_level() == EK_AVX2_LEVEL) {
        halves_to_floats_avx2(h, out, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) out[i] = half_to_float(h[i]);
}

/* Quantize one head's vector x[n] into position `row` of a quantized cache, as compute_params / quantize /
 * pack do (asymmetric min-max per group, round half to even, codes clamped to [0, 2^bits - 1]). */
static void kv_store(const ek_kv_quant *c, int64_t row, const float *x, int64_t n) {
    if (c->bits == 16) { /* as PyTorch's float -> float16 (round to nearest even) */
        uint16_t *h = (uint16_t *)c->codes + row * n;
        for (int64_t i = 0; i < n; i++) h[i] = float_to_half(x[i]);
        return;
    }
    const int64_t n_groups = n / c->group, qmax = (1 << c->bits) - 1;
    uint8_t *codes = c->codes + row * (n * c->bits / 8);
    if (c->bits == 4) memset(codes, 0, (size_t)(n / 2));
    for (int64_t g = 0; g < n_groups; g++) {
        const float *xg = x + g * c->group;
        float lo = 0.f, hi = 0.f;
        for (int64_t i = 0; i < c->group; i++) {
            lo = xg[i] < lo ? xg[i] : lo;
            hi = xg[i] > hi ? xg[i] : hi;
        }
        float scale = (hi - lo) / (float)qmax;
        float zero = rintf(-lo / (scale > 0.f ? scale : 1.f));
        if (!(scale > 0.f)) scale = 1e-8f;
        zero = zero < 0.f ? 0.f : zero > (float)qmax ? (float)qmax : zero;
        for (int64_t i = 0; i < c->group; i++) {
            float q = rintf(xg[i] / scale) + zero;
            q = q < 0.f ? 0.f : q > (float)qmax ? (float)qmax : q;
            const int64_t j = g * c->group + i;
            if (c->bits == 8) codes[j] = (uint8_t)q;
            else codes[j / 2] |= (uint8_t)((int)q << (4 * (j & 1)));
        }
        c->scales[row * n_groups + g] = float_to_half(scale);
        c->zeros[row * n_groups + g] = (uint8_t)zero;
    }
}

/* Position `row` of a quantized cache as floats, s * (code - z) with the stored fp16 scale. */
EK_CLONES static void kv_load(const ek_kv_quant *c, int64_t row, float *out, int64_t n) {
    if (c->bits == 16) {
        halves_to_floats((const uint16_t *)c->codes + row * n, out, n);
        return;
    }
    const int64_t n_groups = n / c->group;
    const uint8_t *codes = c->codes + row * (n * c->bits / 8);
    for (int64_t g = 0; g < n_groups; g++) {
        const float scale = half_to_float(c->scales[row * n_groups + g]), zero = (float)c->zeros[row * n_groups + g];
        float *o = out + g * c->group;
        if (c->bits == 8) {
            const uint8_t *cg = codes + g * c->group;
            for (int64_t i = 0; i < c->group; i++) o[i] = ((float)cg[i] - zero) * scale;
        } else {
            const uint8_t *cg = codes + g * c->group / 2;
            for (int64_t i = 0; i < c->group / 2; i++) {
                o[2 * i] = ((float)(cg[i] & 15) - zero) * scale;
                o[2 * i + 1] = ((float)(cg[i] >> 4) - zero) * scale;
            }
        }
    }
}

/* Exposed for tests: quantize n values (one cached vector) as the cache does. */
EK_EXPORT void ek_kv_quantize(const float *x, int64_t n, int32_t bits, int32_t group, uint8_t *codes,
                              uint16_t *scales, uint8_t *zeros) {
    const ek_kv_quant c = {bits, group, codes, scales, zeros};
    kv_store(&c, 0, x, n);
}

/* Hyper-parameters of the block stack (mirrors edgelm/models/base.py). */
typedef struct {
    int32_t n_layers, dim, n_heads, n_kv_heads, head_dim, hidden_dim, max_len;
    int32_t activation;   /* 0: silu (SwiGLU), 1: tanh-GELU (GeGLU) */
    int32_t rope_neox;    /* rotate halves (1) or interleaved pairs (0) */
    float norm_eps, attn_scale;
} ek_block_args;

typedef struct {
    ek_matrix wq, wk, wv, wo, w_gate, w_up, w_down;
    const float *attn_norm, *ffn_norm;
    const float *post_attn_norm, *post_ffn_norm;  /* Gemma's sandwich norms, or NULL */
    const float *q_norm, *k_norm;                 /* per-head RMSNorm of q and k (Gemma 3), or NULL */
    const float *bq, *bk, *bv;                    /* q/k/v biases (Qwen2), or NULL */
    const float *rope_cos, *rope_sin;             /* [max_len][head_dim / 2] for this layer's rope base */
    float *k_cache, *v_cache;                     /* [n_kv_heads][max_len][head_dim], or NULL when: */
    ek_kv_quant k_quant, v_quant;                 /* the cache is quantized (runtime/kv_cache.py) or fp16 */
    int32_t window;                               /* sliding window (attend to the last `window`), 0 = global */
} ek_layer;

#ifdef EK_X86
EK_AVX512 static float dot_avx512(const float *a, const float *b, int64_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    for (; i < n; i += 16) {
        const __mmask16 k = first_lanes(n - i);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

EK_AVX2 static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i < n; i += 8) {
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - i < 8 ? n - i : 8)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        acc0 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, live), _mm256_maskload_ps(b + i, live), acc0);
    }
    return sum8(_mm256_add_ps(acc0, acc1));
}
#endif

/* <a, b> in float32 (SIMD where the CPU has it; the sum's rounding then differs from a left-to-right one). */
static float dot_f32(const float *a, const float *b, int64_t n) {
#ifdef EK_X86
    if (ek_cpu_level() >= EK_AVX512_VNNI) return dot_avx512(a, b, n);
    if (ek_cpu_level() == EK_AVX2_LEVEL) return dot_avx2(a, b, n);
#endif
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float total = 0.f;
    for (; i < n; i++) total += a[i] * b[i];
    for (int j = 0; j < 8; j++) total += acc[j];
    return total;
}

EK_CLONES static void rms_norm(float *out, const float *x, const float *w, int64_t n, float eps) {
    float ss = dot_f32(x, x, n);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* The final norm of the compiled step's callers: the same arithmetic as the blocks' norms. */
EK_EXPORT void ek_rms_norm(const float *x, float *out, const float *w, int64_t n_rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < n_rows; r++) rms_norm(out + r * dim, x + r * dim, w, dim, eps);
}

static void rope(float *v, const float *cos_row, const float *sin_row, int64_t head_dim, int neox) {
    const int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; i++) {
        int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        float x1 = v[a], x2 = v[b], c = cos_row[i], s = sin_row[i];
        v[a] = x1 * c - x2 * s;
        v[b] = x2 * c + x1 * s;
    }
}

/* out = act(gate) * up; tanh(u) = 1 - 2 / (exp(2u) + 1) keeps to one exp per element. */
EK_CLONES static void gated_activation(float *out, const float *gate, const float *up, int64_t n, int activation) {
    if (activation == 1) {
        const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
        for (int64_t i = 0; i < n; i++) {
            float g = gate[i], u = k * (g + 0.044715f * g * g * g);
            u = u > 15.f ? 15.f : u < -15.f ? -15.f : u;
            out[i] = 0.5f * g * (2.0f - 2.0f / (expf(2.0f * u) + 1.0f)) * up[i];
        }
    } else {
        for (int64_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

/* Element-wise work of a batch (prefill chunks) split across the threads: each element is computed as it is
 * alone, so the split changes nothing. */
#define EK_ELEMENTWISE_GRAIN 8192

typedef struct {
    float *out;
    const float *gate, *up;
    int activation;
} activation_job;

static void activation_range(void *ctx, int64_t begin, int64_t end) {
    const activation_job *job = ctx;
    gated_activation(job->out + begin, job->gate + begin, job->up + begin, end - begin, job->activation);
}

static void gated_activation_batch(float *out, const float *gate, const float *up, int64_t n, int activation) {
    activation_job job = {out, gate, up, activation};
    parallel_for(n, EK_ELEMENTWISE_GRAIN, activation_range, &job);
}

typedef struct {
    const float *x;
    int8_t *xq;
    float *dx, *bsum;
} quantize_job;

static void quantize_blocks(void *ctx, int64_t begin, int64_t end) { /* blocks of 32 values */
    const quantize_job *job = ctx;
    ek_quantize_act(job->x + begin * 32, (end - begin) * 32, job->xq + begin * 32, job->dx + begin,
                    job->bsum + begin);
}

static void quantize_act_batch(const float *x, int64_t n, int8_t *xq, float *dx, float *bsum) {
    quantize_job job = {x, xq, dx, bsum};
    parallel_for(n / 32, EK_ELEMENTWISE_GRAIN / 32, quantize_blocks, &job);
}

/* Scratch for the quantized activations of the widest projection input. */
typedef struct {
    int8_t *xq;
    float *dx, *bsum;
} act_scratch;

/* x [T][cols] -> W x for each matrix, outs[i] [T][rows_i]; activations quantized here, once for all the
 * matrices that share them (q/k/v, gate/up). Token t's result does not depend on the other tokens. */
static int project(const ek_matrix *const *ms, float *const *outs, int n, const float *x, int64_t n_tokens,
                   int64_t cols, const act_scratch *scratch) {
    int64_t strides[EK_MAX_STACK];
    for (int i = 0; i < n && i < EK_MAX_STACK; i++) strides[i] = ms[i]->rows;
    quantize_act_batch(x, n_tokens * cols, scratch->xq, scratch->dx, scratch->bsum);
    const prepared_act pa = {n_tokens, cols, scratch->xq, scratch->dx, scratch->bsum};
    return matvec_stacked(ms, outs, strides, n, &pa, NULL);
}

/* x [T][dim] += post_norm(o) (Gemma's sandwich norm when there is one). */
static void add_residual(float *x, float *o, const float *post_norm, int64_t n_tokens, int64_t dim, float eps) {
    for (int64_t t = 0; t < n_tokens; t++) {
        if (post_norm) rms_norm(o + t * dim, o + t * dim, post_norm, dim, eps);
        for (int64_t i = 0; i < dim; i++) x[t * dim + i] += o[t * dim + i];
    }
}

/* Attention splits each token's visible positions in EK_ATTN_SPLITS ranges (so that even one token keeps
 * every core busy), and one work item takes all the query heads that share a KV head (so the cache, the
 * largest read of a long-context step, is read once per token, not once per query head) for a block of up to
 * EK_ATTN_TOKENS consecutive tokens (a prefill chunk reads and converts each cached row once per block, not
 * once per token). The partial softmax of each range is merged afterwards; the ranges depend only on the
 * token's position and every token's sums run over its own range in order, never on the batch. */
#define EK_ATTN_SPLITS 2
#define EK_ATTN_TOKENS 16

typedef struct {
    const ek_block_args *a;
    const ek_layer *L;
    const float *q;    /* [T][n_heads * head_dim] */
    float *part_o;     /* [T][n_heads][SPLITS][head_dim] unnormalized outputs of each range */
    float *part_ml;    /* [T][n_heads][SPLITS][2] running max and sum of exponentials of each range */
    int64_t pos;       /* position of token 0 */
    int64_t n_tokens;
} attention_job;

/* Token pos's range `split` of the positions it sees: [*lo, *hi). */
static void attention_range(const attention_job *job, int64_t pos, int64_t split, int64_t *lo, int64_t *hi) {
    const int64_t window = job->L->window;
    const int64_t first = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
    const int64_t n_all = pos - first + 1, size = (n_all + EK_ATTN_SPLITS - 1) / EK_ATTN_SPLITS;
    *lo = first + split * size;
    *hi = *lo + size < pos + 1 ? *lo + size : pos + 1;
    if (*hi < *lo) *hi = *lo;
}

/* Rows [first, first + n) of a cache into tile [n][hd] as float32 (float16 or quantized rows converted). */
static void cache_rows(const float *cache, const ek_kv_quant *quant, int64_t first, int64_t n, float *tile,
                       int64_t hd) {
    if (cache) memcpy(tile, cache + first * hd, sizeof(float) * (size_t)(n * hd));
    else for (int64_t j = 0; j < n; j++) kv_load(quant, first + j, tile + j * hd, hd);
}

/* o[hd] += sum_j p[j] * rows[j][hd], j in order (each element gets one multiply-add per j, so splitting the
 * rows over several calls changes nothing); 64 outputs at a time (AVX-512) or 32 (AVX2) stay in registers
 * across j. */
#ifdef EK_X86
EK_AVX512 static void accumulate_rows_avx512(float *o, const float *p, const float *rows, int64_t n, int64_t hd) {
    for (int64_t c = 0; c < hd; c += 64) {
        __m512 a0 = _mm512_loadu_ps(o + c), a1 = _mm512_loadu_ps(o + c + 16);
        __m512 a2 = _mm512_loadu_ps(o + c + 32), a3 = _mm512_loadu_ps(o + c + 48);
        for (int64_t j = 0; j < n; j++) {
            const __m512 pj = _mm512_set1_ps(p[j]);
            const float *v = rows + j * hd + c;
            a0 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v), a0);
            a1 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + 16), a1);
            a2 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + 32), a2);
            a3 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + 48), a3);
        }
        _mm512_storeu_ps(o + c, a0);
        _mm512_storeu_ps(o + c + 16, a1);
        _mm512_storeu_ps(o + c + 32, a2);
        _mm512_storeu_ps(o + c + 48, a3);
    }
}

EK_AVX2 static void accumulate_rows_avx2(float *o, const float *p, const float *rows, int64_t n, int64_t hd) {
    for (int64_t c = 0; c < hd; c += 32) {
        __m256 a0 = _mm256_loadu_ps(o + c), a1 = _mm256_loadu_ps(o + c + 8);
        __m256 a2 = _mm256_loadu_ps(o + c + 16), a3 = _mm256_loadu_ps(o + c + 24);
        for (int64_t j = 0; j < n; j++) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            const float *v = rows + j * hd + c;
            a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v), a0);
            a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8), a1);
            a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 16), a2);
            a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 24), a3);
        }
        _mm256_storeu_ps(o + c, a0);
        _mm256_storeu_ps(o + c + 8, a1);
        _mm256_storeu_ps(o + c + 16, a2);
        _mm256_storeu_ps(o + c + 24, a3);
    }
}
#endif

static void accumulate_rows(float *o, const float *p, const float *rows, int64_t n, int64_t hd) {
#ifdef EK_X86
    if (ek_cpu_level() >= EK_AVX512_VNNI && hd % 64 == 0) {
        accumulate_rows_avx512(o, p, rows, n, hd);
        return;
    }
    if (ek_cpu_level() == EK_AVX2_LEVEL && hd % 32 == 0) {
        accumulate_rows_avx2(o, p, rows, n, hd);
        return;
    }
#endif
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < hd; i++) o[i] += p[j] * rows[j * hd + i];
}

#define EK_ATTN_ROWS 32 /* cached rows converted at a time: a 32 x 256 float tile stays in L1 */

EK_CLONES static void attention_ranges(void *ctx, int64_t begin, int64_t end) {
    const attention_job *job = ctx;
    const ek_block_args *a = job->a;
    const ek_layer *L = job->L;
    const int64_t hd = a->head_dim, group = a->n_heads / a->n_kv_heads, q_dim = (int64_t)a->n_heads * hd;
    const int64_t per_block = (int64_t)a->n_kv_heads * EK_ATTN_SPLITS;
    const int64_t n_blocks = (job->n_tokens + EK_ATTN_TOKENS - 1) / EK_ATTN_TOKENS;
    float *scores = NULL, *tile = malloc(sizeof(float) * (size_t)(EK_ATTN_ROWS * hd));
    int64_t capacity = 0;
    if (!tile) return;
    for (int64_t item = begin; item < end; item++) {
        /* the last tokens (the most positions to attend) first: the threads finish together */
        const int64_t t0 = (n_blocks - 1 - item / per_block) * EK_ATTN_TOKENS;
        const int64_t kvh = (item % per_block) / EK_ATTN_SPLITS, split = item % EK_ATTN_SPLITS;
        const int64_t nt = job->n_tokens - t0 < EK_ATTN_TOKENS ? job->n_tokens - t0 : EK_ATTN_TOKENS;
        int64_t lo[EK_ATTN_TOKENS], hi[EK_ATTN_TOKENS], first = INT64_MAX, last = 0, width = 0;
        for (int64_t b = 0; b < nt; b++) {
            attention_range(job, job->pos + t0 + b, split, &lo[b], &hi[b]);
            if (hi[b] > lo[b]) {
                first = lo[b] < first ? lo[b] : first;
                last = hi[b] > last ? hi[b] : last;
            }
            width = hi[b] - lo[b] > width ? hi[b] - lo[b] : width;
        }
        if (nt * group * width > capacity) {
            free(scores);
            capacity = nt * group * width;
            if (!(scores = malloc(sizeof(float) * (size_t)capacity))) break;
        }
        const int64_t base = kvh * (int64_t)a->max_len; /* cache row of position 0 for this KV head */
        /* scores[b][g][j - lo[b]]: each cached key converted once for the block's tokens and the group's heads */
        for (int64_t j0 = first; j0 < last; j0 += EK_ATTN_ROWS) {
            const int64_t j1 = j0 + EK_ATTN_ROWS < last ? j0 + EK_ATTN_ROWS : last;
            cache_rows(L->k_cache, &L->k_quant, base + j0, j1 - j0, tile, hd);
            for (int64_t b = 0; b < nt; b++) {
                const int64_t from = lo[b] > j0 ? lo[b] : j0, to = hi[b] < j1 ? hi[b] : j1;
                const float *q = job->q + (t0 + b) * q_dim + kvh * group * hd;
                for (int64_t g = 0; g < group; g++) {
                    float *sc = scores + (b * group + g) * width - lo[b];
                    for (int64_t j = from; j < to; j++)
                        sc[j] = dot_f32(q + g * hd, tile + (j - j0) * hd, hd) * a->attn_scale;
                }
            }
        }
        for (int64_t b = 0; b < nt; b++) {
            const int64_t n = hi[b] - lo[b], t = t0 + b;
            for (int64_t g = 0; g < group; g++) {
                const int64_t h = kvh * group + g;
                float *sc = scores + (b * group + g) * width;
                float *ml = job->part_ml + ((t * a->n_heads + h) * EK_ATTN_SPLITS + split) * 2;
                float *o = job->part_o + ((t * a->n_heads + h) * EK_ATTN_SPLITS + split) * hd;
                float best = -INFINITY, total = 0.f;
                for (int64_t j = 0; j < n; j++) best = sc[j] > best ? sc[j] : best;
                for (int64_t j = 0; j < n; j++) {
                    sc[j] = expf(sc[j] - best);
                    total += sc[j];
                }
                ml[0] = best;
                ml[1] = total;
                memset(o, 0, sizeof(float) * (size_t)hd);
            }
        }
        for (int64_t j0 = first; j0 < last; j0 += EK_ATTN_ROWS) { /* and each cached value once */
            const int64_t j1 = j0 + EK_ATTN_ROWS < last ? j0 + EK_ATTN_ROWS : last;
            cache_rows(L->v_cache, &L->v_quant, base + j0, j1 - j0, tile, hd);
            for (int64_t b = 0; b < nt; b++) {
                const int64_t from = lo[b] > j0 ? lo[b] : j0, to = hi[b] < j1 ? hi[b] : j1, t = t0 + b;
                for (int64_t g = 0; g < group; g++) {
                    float *o = job->part_o + ((t * a->n_heads + kvh * group + g) * EK_ATTN_SPLITS + split) * hd;
                    const float *sc = scores + (b * group + g) * width - lo[b];
                    if (to > from) accumulate_rows(o, sc + from, tile + (from - j0) * hd, to - from, hd);
                }
            }
        }
    }
    free(scores);
    free(tile);
}

/* out [T][n_heads * head_dim] = the ranges' partial softmaxes merged. */
static void merge_attention(const attention_job *job, float *out, int64_t n_tokens) {
    const ek_block_args *a = job->a;
    const int64_t hd = a->head_dim;
    for (int64_t th = 0; th < n_tokens * a->n_heads; th++) {
        const float *ml = job->part_ml + th * EK_ATTN_SPLITS * 2;
        float best = -INFINITY, total = 0.f, weight[EK_ATTN_SPLITS];
        for (int s = 0; s < EK_ATTN_SPLITS; s++)
            if (ml[2 * s + 1] > 0.f && ml[2 * s] > best) best = ml[2 * s];
        for (int s = 0; s < EK_ATTN_SPLITS; s++) {
            weight[s] = ml[2 * s + 1] > 0.f ? expf(ml[2 * s] - best) : 0.f;
            total += weight[s] * ml[2 * s + 1];
        }
        float *o = out + th * hd;
        memset(o, 0, sizeof(float) * (size_t)hd);
        for (int s = 0; s < EK_ATTN_SPLITS; s++) {
            if (weight[s] == 0.f) continue;
            const float *po = job->part_o + (th * EK_ATTN_SPLITS + s) * hd, w = weight[s] / total;
            for (int64_t i = 0; i < hd; i++) o[i] += w * po[i];
        }
    }
}

/* Run the hidden states x [T][dim] of T consecutive tokens at positions pos .. pos + T - 1 through every
 * layer (the caches must hold the positions before pos); x is updated in place. Each token's arithmetic is
 * the same whatever T is, so a batch (speculative verification) gives bit-identical results to one token at
 * a time. Returns 0, or a negative status (bad matrix shape, out of memory, position out of range). */
EK_EXPORT int ek_decode_layers(const ek_block_args *a, const ek_layer *layers, float *x, int64_t pos,
                               int64_t n_tokens) {
    const int64_t T = n_tokens, dim = a->dim, hd = a->head_dim;
    const int64_t q_dim = (int64_t)a->n_heads * hd, kv_dim = (int64_t)a->n_kv_heads * hd, hidden = a->hidden_dim;
    int64_t wide = q_dim > hidden ? q_dim : hidden;
    wide = wide > dim ? wide : dim;
    float *h = malloc(sizeof(float) * (size_t)(T * wide));
    float *q = malloc(sizeof(float) * (size_t)(T * q_dim)), *k = malloc(sizeof(float) * (size_t)(T * kv_dim));
    float *v = malloc(sizeof(float) * (size_t)(T * kv_dim)), *att = malloc(sizeof(float) * (size_t)(T * q_dim));
    float *gate = malloc(sizeof(float) * (size_t)(T * hidden)), *up = malloc(sizeof(float) * (size_t)(T * hidden));
    float *o = malloc(sizeof(float) * (size_t)(T * dim));
    float *part_o = malloc(sizeof(float) * (size_t)(T * q_dim * EK_ATTN_SPLITS));
    float *part_ml = malloc(sizeof(float) * (size_t)(T * a->n_heads * EK_ATTN_SPLITS * 2));
    act_scratch scratch = {malloc((size_t)(T * wide)), malloc(sizeof(float) * (size_t)(T * wide / 32)),
                           malloc(sizeof(float) * (size_t)(T * wide / 32))};
    int status = (h && q && k && v && att && gate && up && o && part_o && part_ml && scratch.xq && scratch.dx &&
                  scratch.bsum) ? 0 : -2;
    if (T < 1 || pos < 0 || pos + T > a->max_len) status = -3;
    for (int32_t l = 0; l < a->n_layers && status == 0; l++) {
        const ek_layer *L = &layers[l];
        /* attention */
        for (int64_t t = 0; t < T; t++) rms_norm(h + t * dim, x + t * dim, L->attn_norm, dim, a->norm_eps);
        const ek_matrix *qkv[3] = {&L->wq, &L->wk, &L->wv};
        float *qkv_out[3] = {q, k, v};
        if ((status = project(qkv, qkv_out, 3, h, T, dim, &scratch))) break;
        for (int64_t t = 0; t < T; t++) {
            float *qt = q + t * q_dim, *kt = k + t * kv_dim, *vt = v + t * kv_dim;
            const int64_t p = pos + t;
            if (L->bq) for (int64_t i = 0; i < q_dim; i++) qt[i] += L->bq[i];
            if (L->bk) for (int64_t i = 0; i < kv_dim; i++) kt[i] += L->bk[i];
            if (L->bv) for (int64_t i = 0; i < kv_dim; i++) vt[i] += L->bv[i];
            const float *cos_row = L->rope_cos + p * (hd / 2), *sin_row = L->rope_sin + p * (hd / 2);
            for (int64_t head = 0; head < a->n_heads; head++) {
                if (L->q_norm) rms_norm(qt + head * hd, qt + head * hd, L->q_norm, hd, a->norm_eps);
                rope(qt + head * hd, cos_row, sin_row, hd, a->rope_neox);
            }
            for (int64_t head = 0; head < a->n_kv_heads; head++) {
                if (L->k_norm) rms_norm(kt + head * hd, kt + head * hd, L->k_norm, hd, a->norm_eps);
                rope(kt + head * hd, cos_row, sin_row, hd, a->rope_neox);
                const int64_t cache_row = head * (int64_t)a->max_len + p;
                if (L->k_cache) memcpy(L->k_cache + cache_row * hd, kt + head * hd, sizeof(float) * (size_t)hd);
                else kv_store(&L->k_quant, cache_row, kt + head * hd, hd);
                if (L->v_cache) memcpy(L->v_cache + cache_row * hd, vt + head * hd, sizeof(float) * (size_t)hd);
                else kv_store(&L->v_quant, cache_row, vt + head * hd, hd);
            }
        }
        attention_job aj = {a, L, q, part_o, part_ml, pos, T};
        const int64_t blocks = (T + EK_ATTN_TOKENS - 1) / EK_ATTN_TOKENS;
        parallel_for(blocks * a->n_kv_heads * EK_ATTN_SPLITS, 1, attention_ranges, &aj);
        merge_attention(&aj, att, T);
        const ek_matrix *wo[1] = {&L->wo};
        float *o_out[1] = {o};
        if ((status = project(wo, o_out, 1, att, T, q_dim, &scratch))) break;
        add_residual(x, o, L->post_attn_norm, T, dim, a->norm_eps);
        /* feed-forward */
        for (int64_t t = 0; t < T; t++) rms_norm(h + t * dim, x + t * dim, L->ffn_norm, dim, a->norm_eps);
        const ek_matrix *gu[2] = {&L->w_gate, &L->w_up};
        float *gu_out[2] = {gate, up};
        if ((status = project(gu, gu_out, 2, h, T, dim, &scratch))) break;
        gated_activation_batch(h, gate, up, T * hidden, a->activation);
        const ek_matrix *down[1] = {&L->w_down};
        float *down_out[1] = {o};
        if ((status = project(down, down_out, 1, h, T, hidden, &scratch))) break;
        add_residual(x, o, L->post_ffn_norm, T, dim, a->norm_eps);
    }
    free(h); free(q); free(k); free(v); free(att); free(gate); free(up); free(o); free(part_o); free(part_ml);
    free(scratch.xq); free(scratch.dx); free(scratch.bsum);
    return status;
}
