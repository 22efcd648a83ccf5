/* CPU kernels for inference on x86-64 with AVX2, FMA and F16C, threaded with OpenMP (the runtime torch
 * already loaded, so both share one thread pool and torch.set_num_threads governs both). A few functions are
 * built for AVX-512 with target attributes and called only where the CPU has it, chosen at run time: bf16 decode
 * rows and the integer ones of batched steps (mx_use_avx512), and the prompt path's int8/int4 -> bf16 widening and
 * bf16 GEMM (mx_bf16_supported) and integer GEMM (mx_vnni_supported).
 *
 * Weights are read where they lie, in the checkpoint's own format: fp32, bf16 or fp16 values, or our int8
 * (one bf16 scale per row) and int4 (two codes per byte, one bf16 or fp16 scale per group of columns) codes, as
 * quantize.py stores them. Nothing is repacked, so a model keeps one copy of its weights. A block of 4
 * weight rows is widened to fp32 in a small tile that stays in the L1 cache, then multiplied with every
 * activation row: at batch 1 the weights stream from memory once, at batch N they are widened once.
 *
 * Every product is computed in fp32 from the exact fp32 value of each weight (bf16, fp16, code * scale are
 * all exact in fp32), so results equal a plain fp32 matmul with the dequantized weight up to summation order.
 * One exception: int8 and int4 (groups of 32 or more) in one-row products (mx_linear with M = 1, and every row
 * of a decode step) round the activation to int16, one scale per span of columns, and sum the products in
 * integers (see "integer codes at batch 1" below). A decode step computes each of its rows exactly as at batch 1
 * (linear_rows), so a row's numbers do not depend on its batch. The prompt path's GEMMs (mx_gemm_i8, mx_gemm_bf16)
 * are not exact: they round their rows to int8 or bf16 (kernels/prompt.py states their contract).
 *
 * Entry points (fp32 activations, row-major, but where said):
 *   mx_linear      y[M,N] (+)= x[M,K] @ W^T, for one weight or one expert of a stacked weight
 *   mx_linear_rows the same, each row computed as a decode step computes it (the same numbers alone or batched)
 *   mx_moe         router -> top-k -> softmax -> SwiGLU experts -> weighted sum, added to a residual (all the
 *                  experts, or the ones a process holds when they are split over processes)
 *   mx_route       the routing half of mx_moe alone (the prompt path of kernels/prompt.py runs the experts)
 *   mx_to_bf16     an expert's rows as bf16, for the prompt path's bf16 GEMMs
 *   mx_quantize_rows  activation rows rounded to int8 with a scale per row, for the prompt path's integer GEMMs
 *   mx_gemm_i8     the prompt path's integer GEMM (AVX512_VNNI): int8 or int4 weights as they lie, int8 rows
 *   mx_gemm_bf16   the prompt path's bf16 GEMM for few rows (AVX512_BF16): bf16 weights as they lie, bf16 rows
 *   mx_expert_bf16 the same for an expert's three GEMMs and the SwiGLU between them, in one call
 *   mx_attention   rotary embedding, key/value cache write and attention for one new token per sequence
 *   mx_prompt_attention  attention for a prompt's tokens on AVX512_BF16 (the prompt path's; bf16 products)
 *   mx_rmsnorm     RMS normalization
 *   mx_decode      a whole decode step in one call: the embedding, every decoder block (all of the above), the
 *                  final norm and the output projection, for one new token per sequence
 *   mx_logsumexp   log(sum(exp(x))) of each row: what log-softmax subtracts, for the sampled token's log-prob
 *   mx_argmax      the greedy choice of each row
 *   mx_use_avx512, mx_forbid_avx512, mx_bf16_supported, mx_vnni_supported, mx_release_threads,
 *   mx_set_num_threads   run-time
 *                  settings and checks (see each)
 *   mx_struct_sizes the sizes of the structures above, for the Python side's check
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include <sys/mman.h>

enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_F16 = 2, FMT_I8 = 3, FMT_I4 = 4 };

/* A weight (N, K), or a stack of experts (E, N, K), as the Python side describes it (native.py: Weight). */
typedef struct {
    const void *data;          /* values, int8 codes (N, K) or int4 code pairs (N, Kp/2) */
    const uint16_t *scales;    /* scales: int8 (N,) or, in groups, (N, K/G); int4 (N, Kp/G); NULL for float weights */
    int64_t fmt, n, k, group;  /* format, rows, columns, group size (columns per scale): int4's; int8's 0 (a scale
                                * per row) or 32 (a GGUF file's Q8_0 blocks; K a multiple of 32) */
    int64_t expert_stride;     /* elements (fp formats, int8) or bytes (int4) from one expert to the next */
    int64_t scale_stride;      /* scales from one expert to the next */
    const void *const *slots;  /* or, for experts that are not all in memory (an expert cache), expert e's values at
                                * slots[e] and its scales at slot_scales[e] (kernels/offload.py); NULL: none */
    const uint16_t *const *slot_scales;
    int64_t scale_fmt;         /* group scales: FMT_BF16 (ours) or FMT_F16 (a GGUF file's blocks); int8 rows': FMT_BF16 */
    const uint16_t *offsets;   /* int4: NULL, or one per group (shape and format of the scales), added to each of the
                                * group's weights: (code - 8) * scale + offset (a GGUF file's Q4_K / Q4_1 blocks, whose
                                * weights are code * scale - min); not with slots */
} weight_t;

static inline const void *expert_data(const weight_t *w, int64_t e) {
    static const int64_t bytes[] = {4, 2, 2, 1, 1}; /* per element (FMT_I4: per byte of code pairs) */
    return w->slots ? w->slots[e] : (const char *)w->data + e * w->expert_stride * bytes[w->fmt];
}

static inline const uint16_t *expert_scales(const weight_t *w, int64_t e) {
    return w->slots ? w->slot_scales[e] : w->scales + e * w->scale_stride;
}

static inline const uint16_t *expert_offsets(const weight_t *w, int64_t e) {
    return w->offsets ? w->offsets + e * w->scale_stride : NULL;
}

/* Experts that are not all in memory (an expert store, kernels/offload.py). Before a mixture-of-experts layer runs
 * its experts, `fetch` is told which ones its tokens need, and returns once they are in place (their addresses in
 * the layer's slots); it is also told which experts the next layer's router picks for this layer's input, a guess
 * it may read ahead. Returns 0, nonzero on failure. Called on the thread that called in, outside parallel regions. */
typedef int (*fetch_fn)(int64_t layer, const int64_t *needed, int64_t n_needed, const int64_t *guessed,
                        int64_t n_guessed);
typedef struct {
    fetch_fn fetch;
    int64_t layer;
    const weight_t *next_router; /* the next mixture-of-experts layer's router, or NULL: no guesses */
    int64_t next_top_k;
} store_t;

/* Threads per parallel region: set from torch.get_num_threads() (native.py), since OpenMP's own setting is per
 * calling thread and a server runs the model on a thread of its own. */
static int threads = 1;

/* bf16 one-row products (every row of a decode step) on 512-bit vectors: set by mx_use_avx512 where the CPU has
 * AVX-512 F/BW/DQ (native_lib.py). Every row then takes that kernel, so a row's numbers still do not depend on its
 * batch; they differ from the AVX2 kernel's in the order of summation only. The integer rows of batched steps (and
 * int4 in groups of 32, int8 with group scales) take 512-bit kernels too, whose numbers are the AVX2 kernel's bit
 * for bit (prep_t.wide). */
static int avx512_rows = 0;

/* Set once by native_lib.py where MIXTRAL_AVX512=0: no AVX-512 kernel of any kind runs (mx_use_avx512,
 * mx_bf16_supported and mx_vnni_supported say no), as on a CPU without AVX-512. */
static int avx512_forbidden = 0;

void mx_forbid_avx512(void) {
    avx512_forbidden = 1;
    avx512_rows = 0;
}

/* Let the calling thread's OpenMP worker threads go (omp_pause_resource_all, where the runtime has it; torch's
 * libgomp does). libgomp spins its idle workers only while it manages no more threads than there are CPUs: a
 * model run on a thread of its own (the engine's) beside the idle workers of the thread that loaded it got 100
 * spins instead of GOMP_SPINCOUNT, and each parallel region a futex wake-up: 5-14 us instead of 0.7 here, a decode
 * step of the shipped model 1.9 ms instead of 0.66. Called by that loading thread before the other takes over. */
#pragma weak omp_pause_resource_all /* (omp.h declares it; a runtime without it leaves the address null) */

void mx_release_threads(void) {
    if (&omp_pause_resource_all != NULL) omp_pause_resource_all(omp_pause_hard);
}

int mx_use_avx512(int on) {
    avx512_rows = on && !avx512_forbidden && __builtin_cpu_supports("avx512f")
                  && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    return avx512_rows;
}

void mx_set_num_threads(int n) { threads = n > 0 ? n : 1; }

/* Back the 2 MiB-aligned part of [ptr, ptr + bytes) with 2 MiB pages, where the kernel allows it (Linux with
 * transparent huge pages on "madvise" or "always"): pages written from now on come as huge pages, and with
 * `collapse` (Linux 6.1 and later) the pages already written are turned into huge ones at once. Decode streams
 * every weight once per token: on 4 KiB pages that is a TLB miss and a hardware prefetcher restart every 4 KiB
 * (README: a plain read is much slower on them). Returns the bytes advised (0: not supported here). */
int64_t mx_hugepages(void *ptr, int64_t bytes, int collapse) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    const uintptr_t lo = ((uintptr_t)ptr + huge - 1) & ~(huge - 1), hi = ((uintptr_t)ptr + (uintptr_t)bytes) & ~(huge - 1);
    if (bytes <= 0 || hi <= lo || madvise((void *)lo, hi - lo, MADV_HUGEPAGE) != 0) return 0;
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
    if (collapse) madvise((void *)lo, hi - lo, MADV_COLLAPSE); /* best effort: EAGAIN or ENOMEM leave 4 KiB pages */
    return (int64_t)(hi - lo);
#else
    (void)ptr; (void)bytes; (void)collapse;
    return 0;
#endif
}

/* Copy `bytes` from src to dst in 4 MiB steps; with `release`, give each step's whole pages of src back to the
 * OS once copied, so moving a tensor never holds two copies of it. Only for memory that nothing reads again (the
 * caller owns it and frees it next). */
void mx_move(void *dst, void *src, int64_t bytes, int release) {
    const int64_t step = (int64_t)4 << 20, page = 4096;
    for (int64_t at = 0; at < bytes; at += step) {
        const int64_t n = bytes - at < step ? bytes - at : step;
        memcpy((char *)dst + at, (const char *)src + at, (size_t)n);
#ifdef __linux__
        const uintptr_t lo = ((uintptr_t)src + at + page - 1) & ~(uintptr_t)(page - 1);
        const uintptr_t hi = ((uintptr_t)src + at + n) & ~(uintptr_t)(page - 1);
        if (release && hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
#endif
    }
}

#define ROWS 4        /* weight rows per tile */
#define MBLOCK 64     /* activation rows per pass of the tiled matmul */
#define KCHUNK 1024   /* columns per tile: 4 x 1024 fp32 = 16 KiB, within L1 */

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* An int4 group scale's value: bf16, or fp16 (weight_t.scale_fmt) */
static inline float scale_value(const weight_t *w, uint16_t bits) {
    return w->scale_fmt == FMT_F16 ? _cvtsh_ss(bits) : bf16_to_float(bits);
}

/* Software prefetch distance in bytes for the batch-1 kernels: a weight row is one sequential stream, and
 * asking for it this far ahead keeps more of it in flight than the hardware prefetcher alone. */
#define PREFETCH 1024

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* exp(t) for t <= 0 (t = x - max), 8 at a time: t = n ln 2 + r with |r| <= ln(2)/2, e^r by its Taylor series to r^7
 * (relative error < 2e-8 before rounding), 2^n put into the exponent bits; below -87 the result is 0, NaN stays NaN.
 * EXP_REMAINDER and EXP_SERIES are its steps at any vector width (FNMADD, FMADD, SET1: that width's intrinsics), so
 * the 512-bit copy (exp16_nonpositive) computes the same values. */
#define EXP_REMAINDER(FNMADD, SET1, t, n) FNMADD(n, SET1(1.42860677e-6f), FNMADD(n, SET1(0.693145752f), t))
#define EXP_SERIES(FMADD, SET1, r)                                                                                   \
    FMADD(FMADD(FMADD(FMADD(FMADD(FMADD(FMADD(SET1(1.0f / 5040.0f), r, SET1(1.0f / 720.0f)), r, SET1(1.0f / 120.0f)), \
                                  r, SET1(1.0f / 24.0f)), r, SET1(1.0f / 6.0f)), r, SET1(0.5f)), r, SET1(1.0f)), r,   \
          SET1(1.0f))
static inline __m256 exp_nonpositive(const __m256 t_in) {
    __m256 t = t_in;
    const __m256 low = _mm256_set1_ps(-87.0f);
    const __m256 keep = _mm256_cmp_ps(t, low, _CMP_GE_OQ);
    t = _mm256_max_ps(t, low);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = EXP_REMAINDER(_mm256_fnmadd_ps, _mm256_set1_ps, t, n);
    const __m256 p = EXP_SERIES(_mm256_fmadd_ps, _mm256_set1_ps, r);
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(scale)), keep);
    return _mm256_blendv_ps(e, t_in, _mm256_cmp_ps(t_in, t_in, _CMP_UNORD_Q));
}

/* silu(g) * u, 8 at a time: g * sigmoid(g), the sigmoid from e = exp(-|g|) (1 / (1 + e) where g >= 0, e / (1 + e)
 * where not), so exp never overflows; NaN stays NaN, silu(-inf) is NaN as g / (1 + exp(-g)) gives. */
static inline __m256 silu_times8(const __m256 g, const __m256 u) {
    const __m256 e = exp_nonpositive(_mm256_or_ps(g, _mm256_set1_ps(-0.0f)));
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 top = _mm256_blendv_ps(e, one, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ));
    return _mm256_mul_ps(_mm256_mul_ps(g, _mm256_div_ps(top, _mm256_add_ps(one, e))), u);
}

/* g[i] = silu(g[i]) * u[i] for n elements; the last n % 8 through the same code, so an element's value does not
 * depend on where it lies (a decode row's numbers alone and in a batch). */
static void silu_times(float *g, const float *u, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(g + i, silu_times8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    if (i < n) {
        float a[8] = {0}, b[8] = {0};
        memcpy(a, g + i, sizeof(float) * (size_t)(n - i));
        memcpy(b, u + i, sizeof(float) * (size_t)(n - i));
        _mm256_storeu_ps(a, silu_times8(_mm256_loadu_ps(a), _mm256_loadu_ps(b)));
        memcpy(g + i, a, sizeof(float) * (size_t)(n - i));
    }
}

/* The largest of x[0, n) (of |x| with `absolute`), NaN left out; *nan says whether there was one. */
static float max_of(const float *x, int64_t n, int absolute, int *nan) {
    const __m256 sign = _mm256_set1_ps(absolute ? -0.0f : 0.0f);
    __m256 top8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
        top8 = _mm256_max_ps(v, top8); /* the second operand where either is NaN: NaN is left out */
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float tops[8], top = -INFINITY;
    _mm256_storeu_ps(tops, top8);
    for (int j = 0; j < 8; j++) top = fmaxf(top, tops[j]);
    int found = _mm256_movemask_ps(nan8) != 0;
    for (; i < n; i++) {
        const float v = absolute ? fabsf(x[i]) : x[i];
        found |= isnan(v) != 0;
        top = fmaxf(top, v);
    }
    *nan = found;
    return top;
}

/* Widen rows [r0, r0 + nr) x columns [k0, k0 + kc) of expert e to fp32 in `tile` (row stride kc).
 * For fp32 weights nothing is copied: the returned pointer and *stride point into the weight itself. */
static const float *widen(const weight_t *w, int64_t e, int64_t r0, int nr, int64_t k0, int64_t kc,
                          float *tile, int64_t *stride) {
    const int64_t K = w->k;
    if (w->fmt == FMT_F32) {
        *stride = K;
        return (const float *)expert_data(w, e) + r0 * K + k0;
    }
    *stride = kc;
    for (int r = 0; r < nr; r++) {
        float *dst = tile + r * kc;
        const int64_t row = r0 + r;
        int64_t i = 0;
        if (w->fmt == FMT_BF16) {
            const uint16_t *src = (const uint16_t *)expert_data(w, e) + row * K + k0;
            for (; i + 8 <= kc; i += 8) {
                __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
                _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
            }
            for (; i < kc; i++) dst[i] = bf16_to_float(src[i]);
        } else if (w->fmt == FMT_F16) {
            const uint16_t *src = (const uint16_t *)expert_data(w, e) + row * K + k0;
            for (; i + 8 <= kc; i += 8)
                _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
            for (; i < kc; i++) dst[i] = _cvtsh_ss(src[i]);
        } else if (w->fmt == FMT_I8 && w->group) { /* a scale per group of 32 columns */
            const int8_t *src = (const int8_t *)expert_data(w, e) + row * K + k0;
            const uint16_t *scales = expert_scales(w, e) + row * (K / w->group);
            for (; i < kc; i += 8) {
                const __m256 scale = _mm256_set1_ps(scale_value(w, scales[(k0 + i) / w->group]));
                __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(src + i)));
                _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(v), scale));
            }
        } else if (w->fmt == FMT_I8) {
            const int8_t *src = (const int8_t *)expert_data(w, e) + row * K + k0;
            const __m256 scale = _mm256_set1_ps(bf16_to_float(expert_scales(w, e)[row]));
            for (; i + 8 <= kc; i += 8) {
                __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(src + i)));
                _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(v), scale));
            }
            const float s = bf16_to_float(expert_scales(w, e)[row]);
            for (; i < kc; i++) dst[i] = (float)src[i] * s;
        } else { /* FMT_I4: byte j of a row holds columns 2j (low nibble) and 2j + 1 (high), offset by 8 */
            const int64_t G = w->group, n_groups = (K + G - 1) / G, row_bytes = n_groups * G / 2;
            const uint8_t *src = (const uint8_t *)expert_data(w, e) + row * row_bytes + k0 / 2;
            const uint16_t *scales = expert_scales(w, e) + row * n_groups + k0 / G;
            const uint16_t *offsets = w->offsets ? expert_offsets(w, e) + row * n_groups + k0 / G : NULL;
            const __m128i low4 = _mm_set1_epi8(0x0F);
            const __m256i eight = _mm256_set1_epi32(8);
            for (; i < kc; i += 16) { /* kc is a multiple of 16 except at the row's end (the codes are padded) */
                const __m256 scale = _mm256_set1_ps(scale_value(w, scales[i / G]));
                const __m256 offset = _mm256_set1_ps(offsets ? scale_value(w, offsets[i / G]) : 0.0f);
                __m128i b = _mm_loadl_epi64((const __m128i *)(src + i / 2));
                __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
                __m128i codes = _mm_unpacklo_epi8(lo, hi); /* 16 codes in column order */
                __m256i c0 = _mm256_sub_epi32(_mm256_cvtepu8_epi32(codes), eight);
                __m256i c1 = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)), eight);
                float tmp[16];
                float *out = i + 16 <= kc ? dst + i : tmp;
                __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(c0), scale);
                __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(c1), scale);
                __asm__("" : "+x"(w0), "+x"(w1)); /* code x scale rounded, then the offset added: never fused */
                _mm256_storeu_ps(out, _mm256_add_ps(w0, offset));
                _mm256_storeu_ps(out + 8, _mm256_add_ps(w1, offset));
                if (out == tmp) memcpy(dst + i, tmp, (size_t)(kc - i) * sizeof(float));
            }
        }
    }
    return tile;
}

/* acc[m * ROWS + r] += tile row r . x row m over kc columns, for nr <= ROWS tile rows and M activation rows. */
static void tile_dot(const float *t, int64_t ts, int nr, const float *x, int64_t ldx, int64_t M, int64_t kc,
                     float *acc) {
    if (nr == ROWS) {
        const float *t0 = t, *t1 = t + ts, *t2 = t + 2 * ts, *t3 = t + 3 * ts;
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) { /* two activation rows share each widened weight load */
            const float *xa = x + m * ldx, *xb = xa + ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            int64_t i = 0;
            for (; i + 8 <= kc; i += 8) {
                __m256 va = _mm256_loadu_ps(xa + i), vb = _mm256_loadu_ps(xb + i), w;
                w = _mm256_loadu_ps(t0 + i); a0 = _mm256_fmadd_ps(w, va, a0); b0 = _mm256_fmadd_ps(w, vb, b0);
                w = _mm256_loadu_ps(t1 + i); a1 = _mm256_fmadd_ps(w, va, a1); b1 = _mm256_fmadd_ps(w, vb, b1);
                w = _mm256_loadu_ps(t2 + i); a2 = _mm256_fmadd_ps(w, va, a2); b2 = _mm256_fmadd_ps(w, vb, b2);
                w = _mm256_loadu_ps(t3 + i); a3 = _mm256_fmadd_ps(w, va, a3); b3 = _mm256_fmadd_ps(w, vb, b3);
            }
            float sa[ROWS] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
            float sb[ROWS] = {hsum(b0), hsum(b1), hsum(b2), hsum(b3)};
            for (; i < kc; i++)
                for (int r = 0; r < ROWS; r++) { sa[r] += t[r * ts + i] * xa[i]; sb[r] += t[r * ts + i] * xb[i]; }
            for (int r = 0; r < ROWS; r++) { acc[m * ROWS + r] += sa[r]; acc[(m + 1) * ROWS + r] += sb[r]; }
        }
        for (; m < M; m++) {
            const float *xa = x + m * ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t i = 0;
            for (; i + 8 <= kc; i += 8) {
                __m256 va = _mm256_loadu_ps(xa + i);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(t0 + i), va, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(t1 + i), va, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(t2 + i), va, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(t3 + i), va, a3);
            }
            float sa[ROWS] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
            for (; i < kc; i++)
                for (int r = 0; r < ROWS; r++) sa[r] += t[r * ts + i] * xa[i];
            for (int r = 0; r < ROWS; r++) acc[m * ROWS + r] += sa[r];
        }
        return;
    }
    for (int64_t m = 0; m < M; m++)
        for (int r = 0; r < nr; r++) acc[m * ROWS + r] += dot(t + r * ts, x + m * ldx, kc);
}

/* ---- one activation row (batch-1 decode): each weight row is read once, widened in registers ---- */

/* x reordered in blocks of 16 columns: the 8 even columns, then the 8 odd ones. That is how a 32-byte load of
 * bf16 pairs, or 8 bytes of int4 nibble pairs, splits into two vectors of 8 fp32 with a shift and a mask. */
static void split_even_odd(const float *x, int64_t K, float *xp) {
    int64_t i = 0;
    for (; i + 16 <= K; i += 16)
        for (int j = 0; j < 8; j++) { xp[i + j] = x[i + 2 * j]; xp[i + 8 + j] = x[i + 2 * j + 1]; }
    for (; i < K; i++) xp[i] = x[i];
}

/* Row `row` of expert e . x over all K columns, as 8 partial sums (their total is the product; see reduce4).
 * One row at a time keeps each thread's reads one sequential stream (the hardware prefetcher's best case;
 * interleaving rows read slower), and four accumulators keep the FMA latency chains from
 * bounding the loop.
 * xp is x split by split_even_odd; group_sums[g] = sum of x over int4 group g (int4 codes carry an offset of 8,
 * taken out once per group instead of once per code). */
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq")))
#define INT_ROWS 4 /* activation rows per pass of the 512-bit integer row kernels (row_int_512_multi) */

/* x split for the 512-bit bf16 rows: per 32 columns, the 16 even ones then the 16 odd ones (a 32-bit lane of bf16
 * pairs widens to its even column by a shift and to its odd one by a mask); the columns past the last 32 as they
 * are. */
static void split_even_odd32(const float *x, int64_t K, float *xp) {
    int64_t i = 0;
    for (; i + 32 <= K; i += 32)
        for (int j = 0; j < 16; j++) { xp[i + j] = x[i + 2 * j]; xp[i + 16 + j] = x[i + 2 * j + 1]; }
    for (; i < K; i++) xp[i] = x[i];
}

/* Four bf16 weight rows (src, rows of K; n of them, the last repeated past n) . each of nm activation rows (nm <=
 * 2), on 512-bit vectors, 32 columns a step: per weight row and activation row two FMA chains (the even columns of
 * each 32, the odd ones: xp's split), added and folded to 8 partial sums at the end, the columns past the last 32
 * added to lane 0 in order. A pair's numbers are the same for any nm and any rows beside it, so a sequence's numbers
 * do not depend on the rows beside it, and a decode step's rows alone (nm = 1, every bf16 row on these kernels)
 * are the batch's. Read as `mode` says (QUAD_STREAM and the others): the weight rows are loaded and widened once
 * for the nm activation rows, and the 8 x nm chains (16 at most, plus the two activation vectors) stay in
 * registers. (One row at a time with eight chains per
 * activation row, as before, ran batched steps at 25-35% of the FMA peak on Zen 4: 28 loads per 24 FMAs, a call
 * and a reduction per weight row; these ran 16 rows of "small"'s shapes at 1.4-2.2x its speed with the weights in
 * memory, one row at 0.9-1.5x.) */
/* How quad_bf16_512 reads its four weight rows: */
enum {
    QUAD_STREAM = 0, /* from memory, in memory order (row after row), for the first (or only) activation rows: the
                      * rows are one sequential stream for the hardware's prefetcher, which four rows read side by
                      * side are not (a decode step of two rows on "small", Zen 4: 7.6 ms side by side with our
                      * prefetches, 6.8 row after row with them, 5.7 without them; 6.2 before the quads) */
    QUAD_CACHED = 1, /* from the L1 cache, side by side (each activation vector loaded once for all four) */
    QUAD_CACHED_AHEAD = 2, /* the same, asking for the next four rows meanwhile (in memory order, into L2) */
};

AVX512_TARGET static inline __attribute__((always_inline)) void quad_bf16_512(
    const int nm, const int mode, const uint16_t *src, int64_t K, int n, const float *const *x,
    const float *const *xp, __m256 out[4][INT_ROWS]) {
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    const uint16_t *w[4];
    for (int r = 0; r < 4; r++) w[r] = src + (r < n ? r : n - 1) * K;
    const char *next = (const char *)(src + 4 * K);
    __m512 even[4][2], odd[4][2];
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < nm; j++) even[r][j] = odd[r][j] = _mm512_setzero_ps();
    const int64_t body = K / 32 * 32; /* columns in whole steps of 32 */
#define STEP(r, i, xe, xo)                                                                                           \
    do {                                                                                                             \
        const __m512i v = _mm512_loadu_si512(w[r] + (i));                                                            \
        const __m512 ev = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));                                             \
        const __m512 ov = _mm512_castsi512_ps(_mm512_and_si512(v, high));                                           \
        for (int j = 0; j < nm; j++) {                                                                               \
            even[r][j] = _mm512_fmadd_ps(ev, xe[j], even[r][j]);                                                     \
            odd[r][j] = _mm512_fmadd_ps(ov, xo[j], odd[r][j]);                                                       \
        }                                                                                                            \
    } while (0)
    if (mode == QUAD_STREAM) {
        for (int r = 0; r < 4; r++)
            for (int64_t i = 0; i < body; i += 32) {
                __m512 xe[2], xo[2];
                for (int j = 0; j < nm; j++) {
                    xe[j] = _mm512_loadu_ps(xp[j] + i);
                    xo[j] = _mm512_loadu_ps(xp[j] + i + 16);
                }
                STEP(r, i, xe, xo);
            }
    } else {
        for (int64_t i = 0; i < body; i += 32) {
            __m512 xe[2], xo[2];
            for (int j = 0; j < nm; j++) {
                xe[j] = _mm512_loadu_ps(xp[j] + i);
                xo[j] = _mm512_loadu_ps(xp[j] + i + 16);
            }
            for (int r = 0; r < 4; r++) {
                if (mode == QUAD_CACHED_AHEAD) _mm_prefetch(next + 2 * (4 * i + 32 * r), _MM_HINT_T1);
                STEP(r, i, xe, xo);
            }
        }
    }
#undef STEP
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < nm; j++) {
            float tail = 0.0f;
            for (int64_t t = body; t < K; t++) tail += bf16_to_float(w[r][t]) * x[j][t];
            const __m512 s = _mm512_add_ps(even[r][j], odd[r][j]);
            const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
            out[r][j] = _mm256_add_ps(h, _mm256_setr_ps(tail, 0, 0, 0, 0, 0, 0, 0));
        }
}

/* quad_bf16_512 for one or two activation rows, read as `mode` says (a constant in each copy) */
#define QUAD(nm, mode)                                                                                               \
    AVX512_TARGET static void quad_bf16_512_##nm##_##mode(const uint16_t *src, int64_t K, int n,                     \
                                                          const float *const *x, const float *const *xp,             \
                                                          __m256 out[4][INT_ROWS]) {                                 \
        quad_bf16_512(nm, mode, src, K, n, x, xp, out);                                                              \
    }
QUAD(1, 0) QUAD(1, 1) QUAD(1, 2) QUAD(2, 0) QUAD(2, 1) QUAD(2, 2)
#undef QUAD
typedef void (*quad_fn)(const uint16_t *, int64_t, int, const float *const *, const float *const *,
                        __m256 (*)[INT_ROWS]);
static const quad_fn quads[2][3] = {{quad_bf16_512_1_0, quad_bf16_512_1_1, quad_bf16_512_1_2},
                                    {quad_bf16_512_2_0, quad_bf16_512_2_1, quad_bf16_512_2_2}};

static inline __attribute__((always_inline)) __m256 row_vec(const int64_t fmt, const weight_t *w, int64_t e,
                                                            int64_t row, const float *x, const float *xp,
                                                            const float *group_sums) {
    const int64_t K = w->k;
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    float tail = 0.0f;
    int64_t i = 0;
    if (fmt == FMT_BF16) {
        const uint16_t *src = (const uint16_t *)expert_data(w, e) + row * K;
        const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
        __m256 a2 = a, b2 = a, c2 = a, d2 = a; /* 64 columns a step on eight chains: fewer loop overheads */
        for (; i + 64 <= K; i += 64) {
            _mm_prefetch((const char *)(src + i) + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(src + i) + PREFETCH + 64, _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(src + i));
            const __m256i u = _mm256_loadu_si256((const __m256i *)(src + i + 16));
            const __m256i v2 = _mm256_loadu_si256((const __m256i *)(src + i + 32));
            const __m256i u2 = _mm256_loadu_si256((const __m256i *)(src + i + 48));
            a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xp + i), a);
            b = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), _mm256_loadu_ps(xp + i + 8), b);
            c = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), _mm256_loadu_ps(xp + i + 16), c);
            d = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(u, high)), _mm256_loadu_ps(xp + i + 24), d);
            a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v2, 16)), _mm256_loadu_ps(xp + i + 32), a2);
            b2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v2, high)), _mm256_loadu_ps(xp + i + 40), b2);
            c2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u2, 16)), _mm256_loadu_ps(xp + i + 48), c2);
            d2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(u2, high)), _mm256_loadu_ps(xp + i + 56), d2);
        }
        a = _mm256_add_ps(a, a2); b = _mm256_add_ps(b, b2); c = _mm256_add_ps(c, c2); d = _mm256_add_ps(d, d2);
        for (; i + 32 <= K; i += 32) {
            _mm_prefetch((const char *)(src + i) + PREFETCH, _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(src + i));
            const __m256i u = _mm256_loadu_si256((const __m256i *)(src + i + 16));
            a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xp + i), a);
            b = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), _mm256_loadu_ps(xp + i + 8), b);
            c = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), _mm256_loadu_ps(xp + i + 16), c);
            d = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(u, high)), _mm256_loadu_ps(xp + i + 24), d);
        }
        for (; i + 16 <= K; i += 16) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(src + i));
            a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xp + i), a);
            b = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), _mm256_loadu_ps(xp + i + 8), b);
        }
        for (; i < K; i++) tail += bf16_to_float(src[i]) * x[i];
    } else if (fmt == FMT_F16) {
        const uint16_t *src = (const uint16_t *)expert_data(w, e) + row * K;
        for (; i + 32 <= K; i += 32) {
            _mm_prefetch((const char *)(src + i) + PREFETCH, _MM_HINT_T0);
            a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))), _mm256_loadu_ps(x + i), a);
            b = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i + 8))), _mm256_loadu_ps(x + i + 8), b);
            c = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i + 16))), _mm256_loadu_ps(x + i + 16), c);
            d = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i + 24))), _mm256_loadu_ps(x + i + 24), d);
        }
        for (; i + 8 <= K; i += 8)
            a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))), _mm256_loadu_ps(x + i), a);
        for (; i < K; i++) tail += _cvtsh_ss(src[i]) * x[i];
    } else if (fmt == FMT_F32) {
        const float *src = (const float *)expert_data(w, e) + row * K;
        for (; i + 32 <= K; i += 32) {
            _mm_prefetch((const char *)(src + i) + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(src + i + 16) + PREFETCH, _MM_HINT_T0);
            a = _mm256_fmadd_ps(_mm256_loadu_ps(src + i), _mm256_loadu_ps(x + i), a);
            b = _mm256_fmadd_ps(_mm256_loadu_ps(src + i + 8), _mm256_loadu_ps(x + i + 8), b);
            c = _mm256_fmadd_ps(_mm256_loadu_ps(src + i + 16), _mm256_loadu_ps(x + i + 16), c);
            d = _mm256_fmadd_ps(_mm256_loadu_ps(src + i + 24), _mm256_loadu_ps(x + i + 24), d);
        }
        for (; i + 8 <= K; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(src + i), _mm256_loadu_ps(x + i), a);
        for (; i < K; i++) tail += src[i] * x[i];
    } else { /* FMT_I4: per group, sum(code * x) in four accumulators; then scale and remove the offset */
        const int64_t G = w->group, n_groups = (K + G - 1) / G;
        const uint8_t *src = (const uint8_t *)expert_data(w, e) + row * (n_groups * G / 2);
        const uint16_t *scales = expert_scales(w, e) + row * n_groups;
        const __m128i low4 = _mm_set1_epi8(0x0F);
        __m256 total = _mm256_setzero_ps();
        float offset = 0.0f;
#define LO4(v) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, low4)))
#define HI4(v) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low4)))
        for (int64_t g = 0; g < n_groups; g++) {
            const int64_t end = (g + 1) * G < K ? (g + 1) * G : K;
            a = b = c = d = _mm256_setzero_ps();
            for (i = g * G; i + 32 <= end; i += 32) {
                const __m128i v = _mm_loadl_epi64((const __m128i *)(src + i / 2));
                const __m128i u = _mm_loadl_epi64((const __m128i *)(src + i / 2 + 8));
                a = _mm256_fmadd_ps(LO4(v), _mm256_loadu_ps(xp + i), a);
                b = _mm256_fmadd_ps(HI4(v), _mm256_loadu_ps(xp + i + 8), b);
                c = _mm256_fmadd_ps(LO4(u), _mm256_loadu_ps(xp + i + 16), c);
                d = _mm256_fmadd_ps(HI4(u), _mm256_loadu_ps(xp + i + 24), d);
            }
            for (; i + 16 <= end; i += 16) {
                const __m128i v = _mm_loadl_epi64((const __m128i *)(src + i / 2));
                a = _mm256_fmadd_ps(LO4(v), _mm256_loadu_ps(xp + i), a);
                b = _mm256_fmadd_ps(HI4(v), _mm256_loadu_ps(xp + i + 8), b);
            }
            float part = 0.0f;
            for (; i < end; i++) part += (float)((src[i / 2] >> (4 * (i & 1))) & 15) * x[i];
            const float scale = scale_value(w, scales[g]);
            total = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)), _mm256_set1_ps(scale), total);
            offset += scale * (8.0f * group_sums[g] - part);
        }
#undef LO4
#undef HI4
        return _mm256_add_ps(total, _mm256_setr_ps(-offset, 0, 0, 0, 0, 0, 0, 0));
    }
    return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)),
                         _mm256_setr_ps(tail, 0, 0, 0, 0, 0, 0, 0));
}

/* ---- integer codes at batch 1: activations rounded to 16 bits, products in integer arithmetic ----
 *
 * Widening each int8 or int4 code to fp32 costs more instructions than the memory system needs to deliver it,
 * so these kernels were compute-bound at about half the bandwidth bf16 reaches. Instead x is rounded once per
 * call to int16, with one fp32 scale per span of columns (error <= 2^-16 of the span's largest |x|, far below
 * the weights' own rounding), and the products of a whole span are summed exactly in int32 lanes with vpmaddwd:
 * one conversion to fp32 per span. A span is 256 columns for int8 (per lane at most 16 blocks x 2 x 127 x 32767
 * < 2^31) and one group for int4, whose scale it then shares. */

#define QBLOCK 32        /* columns per vpmaddwd block */
#define I8_SPAN 8        /* int8: blocks per activation scale */
#define I4_GROUPS_AHEAD 512 /* int4, groups of 64: the groups whose scales are multiplied ahead, at a time */

typedef struct {
    int16_t *q;       /* x / scale rounded, zero past K; for int4 in nibble order per chunk (see quantize_x) */
    float *scale;     /* one per span */
    int32_t *qsum;    /* sum of q over each span: int4 codes carry an offset of 8, taken out once per span */
    int64_t blocks, span, spans;  /* blocks of QBLOCK columns; blocks per span; spans (int4: groups) */
} xq_t;

/* Columns 4j, 4j + 1, 4j + 2, 4j + 3 of a chunk of n (32, 64 or 128) to lanes j, n/4 + j, n/2 + j, 3n/4 + j: the
 * order int4 codes unpack in (16-bit lane j of the chunk's bytes holds columns 4j..4j+3 in its four nibbles). */
static void nibble_order(int16_t *q, const int16_t *cols, int64_t n) {
    for (int64_t j = 0; j < n / 4; j++)
        for (int64_t t = 0; t < 4; t++) q[t * (n / 4) + j] = cols[4 * j + t];
}

/* Round x to int16 per span of `span` blocks. With chunk = 0 the columns stay in order (int8); else each chunk of
 * `chunk` columns (32, 64 or 128) is put in nibble order, and the last columns, short of a whole chunk, in chunks
 * of `last` (a divisor of the span's width). */
static int quantize_x(const float *x, int64_t K, int64_t chunk, int64_t last, int64_t span, xq_t *out) {
    const int64_t blocks = (K + QBLOCK - 1) / QBLOCK, spans = (blocks + span - 1) / span, width = span * QBLOCK;
    out->blocks = blocks;
    out->span = span;
    out->spans = spans;
    /* whole spans (an int4 group may reach past K), on whole cache lines (no vector load straddles two) */
    const int64_t total = spans * width;
    const size_t q_bytes = ((size_t)total * sizeof(int16_t) + 63) / 64 * 64;
    out->q = aligned_alloc(64, q_bytes);
    out->scale = malloc(sizeof(float) * spans);
    out->qsum = malloc(sizeof(int32_t) * spans);
    int16_t *cols = chunk ? malloc(sizeof(int16_t) * total) : NULL; /* the row in column order, before nibble_order */
    if (!out->q || !out->scale || !out->qsum || (chunk && !cols)) { free(cols); return -1; }
    int16_t *const dst = chunk ? cols : out->q;
    memset(dst + K, 0, sizeof(int16_t) * (total - K)); /* past K: zeros (the columns below are all written) */
    memset((char *)out->q + sizeof(int16_t) * total, 0, q_bytes - sizeof(int16_t) * total);
    for (int64_t sp = 0; sp < spans; sp++) {
        const int64_t start = sp * width, n = K - start < width ? K - start : width;
        int nan;
        const float top = max_of(x + start, n, 1, &nan);
        const int finite = !nan && top < INFINITY;
        int64_t i;
        const float scale = top > 0.0f ? top / 32767.0f : 1.0f;
        int16_t *q = dst + start;
        int32_t sum = 0;
        if (finite) { /* x / scale rounded to nearest even, as lrintf does */
            const __m256 s8 = _mm256_set1_ps(scale);
            __m256i sum8 = _mm256_setzero_si256();
            for (i = 0; i + 16 <= n; i += 16) {
                const __m256i lo = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + start + i), s8));
                const __m256i hi = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + start + i + 8), s8));
                sum8 = _mm256_add_epi32(sum8, _mm256_add_epi32(lo, hi));
                _mm256_storeu_si256((__m256i *)(q + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
            }
            int32_t sums[8];
            _mm256_storeu_si256((__m256i *)sums, sum8);
            for (int j = 0; j < 8; j++) sum += sums[j];
            for (; i < n; i++) sum += q[i] = (int16_t)lrintf(x[start + i] / scale);
        } else {
            memset(q, 0, sizeof(int16_t) * n);
        }
        out->scale[sp] = finite ? scale : NAN; /* an inf or NaN in x makes the products NaN, as in fp32 */
        out->qsum[sp] = sum;
    }
    if (chunk) {
        int64_t base = 0;
        for (; base + chunk <= total; base += chunk) nibble_order(out->q + base, cols + base, chunk);
        for (; base < total; base += last) nibble_order(out->q + base, cols + base, last);
    }
    free(cols);
    return 0;
}

static void free_xq(xq_t *xq) { free(xq->q); free(xq->scale); free(xq->qsum); }

/* sum over one block of int8 codes * q, as 8 int32 lanes */
static inline __m256i i8_block(const int8_t *src, const int16_t *q) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)src));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(src + 16)));
    return _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)q)),
                            _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(q + 16))));
}

/* int4 codes as stored (0..15, the offset of 8 not taken out) of 64 columns (32 bytes) . q in nibble order, as 8
 * int32 lanes: shifts and masks within 16-bit lanes, no shuffles */
static inline __m256i i4_chunk64(const uint8_t *src, const int16_t *q) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)src), m = _mm256_set1_epi16(15);
    const __m256i c0 = _mm256_and_si256(v, m), c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), m), c3 = _mm256_srli_epi16(v, 12);
    return _mm256_add_epi32(
        _mm256_add_epi32(_mm256_madd_epi16(c0, _mm256_loadu_si256((const __m256i *)q)),
                         _mm256_madd_epi16(c1, _mm256_loadu_si256((const __m256i *)(q + 16)))),
        _mm256_add_epi32(_mm256_madd_epi16(c2, _mm256_loadu_si256((const __m256i *)(q + 32))),
                         _mm256_madd_epi16(c3, _mm256_loadu_si256((const __m256i *)(q + 48)))));
}

/* the same for 32 columns (16 bytes), as 4 int32 lanes, for groups that are an odd multiple of 32 */
static inline __m128i i4_chunk32(const uint8_t *src, const int16_t *q) {
    const __m128i v = _mm_loadu_si128((const __m128i *)src), m = _mm_set1_epi16(15);
    const __m128i c0 = _mm_and_si128(v, m), c1 = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    const __m128i c2 = _mm_and_si128(_mm_srli_epi16(v, 8), m), c3 = _mm_srli_epi16(v, 12);
    return _mm_add_epi32(_mm_add_epi32(_mm_madd_epi16(c0, _mm_loadu_si128((const __m128i *)q)),
                                       _mm_madd_epi16(c1, _mm_loadu_si128((const __m128i *)(q + 8)))),
                         _mm_add_epi32(_mm_madd_epi16(c2, _mm_loadu_si128((const __m128i *)(q + 16))),
                                       _mm_madd_epi16(c3, _mm_loadu_si128((const __m128i *)(q + 24)))));
}

/* both[i] = weight scale (bf16) x activation scale of group i, for up to I4_GROUPS_AHEAD of the n groups left;
 * returns how many */
static inline int64_t group_scales(const weight_t *w, float *both, const uint16_t *scales, const float *scale,
                                   int64_t n) {
    if (n > I4_GROUPS_AHEAD) n = I4_GROUPS_AHEAD;
    int64_t g = 0;
    for (; g + 8 <= n; g += 8) {
        const __m128i bits = _mm_loadu_si128((const __m128i *)(scales + g));
        const __m256 ws = w->scale_fmt == FMT_F16 ? _mm256_cvtph_ps(bits)
                          : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
        _mm256_storeu_ps(both + g, _mm256_mul_ps(ws, _mm256_loadu_ps(scale + g)));
    }
    for (; g < n; g++) both[g] = scale_value(w, scales[g]) * scale[g];
    return n;
}

/* The same for the integer kernels (int8: before the row's scale, which rows_of applies to four rows at once). */
static inline __attribute__((always_inline)) __m256 row_vec_int(const int64_t fmt, const weight_t *w, int64_t e,
                                                                int64_t row, const float *x, const xq_t *xq) {
    const int64_t K = w->k;
    const float *scale = xq->scale;
    const int16_t *q = xq->q;
    __m256 a = _mm256_setzero_ps();
    if (fmt == FMT_I8 && w->group) { /* a scale per group of 32 (one block): each group's sum times its weight and
                                      * activation scales, even groups on chain a, odd ones on b */
        const int64_t n_groups = xq->spans;
        const int8_t *at = (const int8_t *)expert_data(w, e) + row * K;
        const uint16_t *scales = expert_scales(w, e) + row * n_groups;
        __m256 b = _mm256_setzero_ps();
        float both[I4_GROUPS_AHEAD];
        for (int64_t g0 = 0, g = 0; g0 < n_groups; g0 = g) { /* the scales multiplied ahead, as for int4 */
            const int64_t end = g0 + group_scales(w, both, scales + g0, scale + g0, n_groups - g0);
            for (; g < end; g++, at += QBLOCK, q += QBLOCK) {
                if (!(g & 1)) _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
                const __m256 f = _mm256_cvtepi32_ps(i8_block(at, q)), s8 = _mm256_set1_ps(both[g - g0]);
                if (g & 1) b = _mm256_fmadd_ps(f, s8, b);
                else a = _mm256_fmadd_ps(f, s8, a);
            }
        }
        return _mm256_add_ps(a, b);
    }
    if (fmt == FMT_I8) { /* one span (I8_SPAN blocks) at a time */
        const int8_t *src = (const int8_t *)expert_data(w, e) + row * K;
        const int8_t *at = src;
        for (int64_t left = K / QBLOCK; left > 0; left -= I8_SPAN) {
            const int64_t n = left < I8_SPAN ? left : I8_SPAN;
            __m256i sum = _mm256_setzero_si256();
            int64_t b = 0;
            for (; b + 2 <= n; b += 2, at += 2 * QBLOCK, q += 2 * QBLOCK) {
                _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
                sum = _mm256_add_epi32(sum, _mm256_add_epi32(i8_block(at, q), i8_block(at + QBLOCK, q + QBLOCK)));
            }
            if (b < n) {
                sum = _mm256_add_epi32(sum, i8_block(at, q));
                at += QBLOCK;
                q += QBLOCK;
            }
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(*scale++), a);
        }
        float tail = 0.0f;
        for (int64_t i = at - src; i < K; i++) tail += (float)src[i] * x[i];
        return _mm256_add_ps(a, _mm256_setr_ps(tail, 0, 0, 0, 0, 0, 0, 0));
    }
    /* FMT_I4 with a group size that is a multiple of 32: one span per group, its codes padded to whole groups */
    const int64_t G = w->group, n_groups = xq->spans; /* (K + G - 1) / G, without a division per row */
    const uint8_t *at = (const uint8_t *)expert_data(w, e) + row * (n_groups * G / 2);
    const uint16_t *scales = expert_scales(w, e) + row * n_groups;
    if (G % 64 == 0) {
        __m256 b = _mm256_setzero_ps(); /* two FMA chains */
        int64_t g = 0;
        if (G == 64) { /* the common case: one chunk per group, two groups a step */
            float both[I4_GROUPS_AHEAD];
            while (g + 2 <= n_groups) { /* scales multiplied ahead for I4_GROUPS_AHEAD groups at a time */
                const int64_t g0 = g, end = g0 + group_scales(w, both, scales + g0, scale + g0, n_groups - g0);
                const float *o = both;
                const int32_t *qs = xq->qsum + g0;
                for (; g + 2 <= end; g += 2, at += 64, q += 128, o += 2, qs += 2) {
                    _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
                    const __m256i s0 = _mm256_sub_epi32(i4_chunk64(at, q), _mm256_set1_epi32(qs[0]));
                    const __m256i s1 = _mm256_sub_epi32(i4_chunk64(at + 32, q + 64), _mm256_set1_epi32(qs[1]));
                    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_broadcast_ss(o), a);
                    b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_broadcast_ss(o + 1), b);
                }
            }
        }
        for (; g < n_groups; g++) {
            __m256i sum = _mm256_setzero_si256();
            for (int64_t c = 0; c < G; c += 64, at += 32, q += 64) {
                _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
                sum = _mm256_add_epi32(sum, i4_chunk64(at, q));
            }
            sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(xq->qsum[g])); /* 8 lanes: the offset of 8, exactly */
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale_value(w, scales[g]) * scale[g]), a);
        }
        return _mm256_add_ps(a, b);
    }
    __m128 chain[4] = {_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps()}; /* group g: g % 4 */
    for (int64_t g = 0; g < n_groups; g++) {
        __m128i sum = _mm_setzero_si128();
        for (int64_t c = 0; c < G; c += 32, at += 16, q += 32) {
            _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
            sum = _mm_add_epi32(sum, i4_chunk32(at, q));
        }
        sum = _mm_sub_epi32(sum, _mm_set1_epi32(2 * xq->qsum[g])); /* 4 lanes */
        chain[g & 3] = _mm_fmadd_ps(_mm_cvtepi32_ps(sum), _mm_set1_ps(scale_value(w, scales[g]) * scale[g]), chain[g & 3]);
    }
    const __m128 b = _mm_add_ps(_mm_add_ps(chain[0], chain[1]), _mm_add_ps(chain[2], chain[3]));
    return _mm256_insertf128_ps(_mm256_setzero_ps(), b, 0);
}

/* ---- the integer kernels on 512-bit vectors (AVX-512 BW), chosen with the bf16 rows (mx_use_avx512) ----
 * The same products as row_vec_int: the same int16 activations (quantize_x puts int4 columns in chunks of 128, so
 * one 64-byte load unpacks 128 codes), the same exact int32 sum of each span in each of row_vec_int's lanes (16
 * lanes folded to its 8, or its 4 for groups of 32) and the same fp32 steps after it, so every result is bit for
 * bit row_vec_int's. A weight row's codes are loaded and unpacked once for nm activation rows (nm <= INT_ROWS):
 * batched decode reuses the unpacking, which is most of the work. */

AVX512_TARGET static inline __attribute__((always_inline)) void row_int_512_multi(
    const int64_t fmt, const int nm, const weight_t *w, int64_t e, int64_t row, const float *const *x,
    const xq_t *const *xq, __m256 *out) {
    const int64_t K = w->k;
    __m256 a[INT_ROWS], b[INT_ROWS];
    for (int j = 0; j < nm; j++) a[j] = b[j] = _mm256_setzero_ps();
    if (fmt == FMT_I8 && w->group) { /* as row_vec_int: groups of 32 two a load, lanes 0-7 its chain a (even
                                      * groups), lanes 8-15 its chain b (odd ones) */
        const int64_t n_groups = xq[0]->spans;
        const int8_t *at = (const int8_t *)expert_data(w, e) + row * K;
        const uint16_t *scales = expert_scales(w, e) + row * n_groups;
        float both[INT_ROWS][I4_GROUPS_AHEAD];
        __m512 acc[INT_ROWS];
        for (int j = 0; j < nm; j++) acc[j] = _mm512_setzero_ps();
        const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        int64_t g = 0;
        for (int64_t g0 = 0; g0 < n_groups; g0 = g) {
            int64_t end = g0;
            for (int j = 0; j < nm; j++) end = g0 + group_scales(w, both[j], scales + g0, xq[j]->scale + g0, n_groups - g0);
            for (; g + 2 <= end; g += 2, at += 2 * QBLOCK) {
                _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512(at);
                const __m512i c0 = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(v));
                const __m512i c1 = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(v, 1));
                for (int j = 0; j < nm; j++) {
                    const __m512i s0 = _mm512_madd_epi16(c0, _mm512_loadu_si512(xq[j]->q + g * QBLOCK));
                    const __m512i s1 = _mm512_madd_epi16(c1, _mm512_loadu_si512(xq[j]->q + (g + 1) * QBLOCK));
                    const __m512i t = _mm512_add_epi32(_mm512_shuffle_i64x2(s0, s1, 0x44), _mm512_shuffle_i64x2(s0, s1, 0xEE));
                    const __m512 scale = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(
                        _mm_load_sd((const double *)(both[j] + (g - g0)))))); /* the two groups' scales */
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scale, acc[j]);
                }
            }
            if (g < end) { /* the last of an odd number of groups (g even: chain a, lanes 0-7), alone */
                const __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)at));
                for (int j = 0; j < nm; j++) {
                    const __m512i sum = _mm512_madd_epi16(v, _mm512_loadu_si512(xq[j]->q + g * QBLOCK));
                    const __m256i s8 = _mm256_add_epi32(_mm512_castsi512_si256(sum), _mm512_extracti64x4_epi64(sum, 1));
                    acc[j] = _mm512_mask3_fmadd_ps(_mm512_castps256_ps512(_mm256_cvtepi32_ps(s8)),
                                                   _mm512_set1_ps(both[j][g - g0]), acc[j], 0x00FF);
                }
                g++, at += QBLOCK;
            }
        }
        for (int j = 0; j < nm; j++)
            out[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[j]), _mm512_extractf32x8_ps(acc[j], 1));
        return;
    }
    if (fmt == FMT_I8) {
        const int8_t *src = (const int8_t *)expert_data(w, e) + row * K, *at = src;
        int64_t col = 0, sp = 0;
        for (int64_t left = K / QBLOCK; left > 0; left -= I8_SPAN, sp++) {
            const int64_t n = left < I8_SPAN ? left : I8_SPAN;
            __m512i s[INT_ROWS];
            for (int j = 0; j < nm; j++) s[j] = _mm512_setzero_si512();
            for (int64_t blk = 0; blk < n; blk++, at += QBLOCK, col += QBLOCK) {
                if (!(blk & 1)) _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
                const __m512i c = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)at));
                for (int j = 0; j < nm; j++)
                    s[j] = _mm512_add_epi32(s[j], _mm512_madd_epi16(c, _mm512_loadu_si512(xq[j]->q + col)));
            }
            for (int j = 0; j < nm; j++) {
                const __m256i s8 = _mm256_add_epi32(_mm512_castsi512_si256(s[j]), _mm512_extracti64x4_epi64(s[j], 1));
                a[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s8), _mm256_set1_ps(xq[j]->scale[sp]), a[j]);
            }
        }
        for (int j = 0; j < nm; j++) {
            float tail = 0.0f;
            for (int64_t i = col; i < K; i++) tail += (float)src[i] * x[j][i];
            out[j] = _mm256_add_ps(a[j], _mm256_setr_ps(tail, 0, 0, 0, 0, 0, 0, 0));
        }
        return;
    }
    const int64_t G = w->group, n_groups = xq[0]->spans;
    const uint8_t *at = (const uint8_t *)expert_data(w, e) + row * (n_groups * G / 2);
    const uint16_t *scales = expert_scales(w, e) + row * n_groups;
    const __m512i low = _mm512_set1_epi16(15);
    __m512i c0, c1, c2, c3;
#define UNPACK(v) (c0 = _mm512_and_si512(v, low), c1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low), \
                   c2 = _mm512_and_si512(_mm512_srli_epi16(v, 8), low), c3 = _mm512_srli_epi16(v, 12))
#define DOT128(q) _mm512_add_epi32(                                                                            \
        _mm512_add_epi32(_mm512_madd_epi16(c0, _mm512_loadu_si512(q)), _mm512_madd_epi16(c1, _mm512_loadu_si512((q) + 32))), \
        _mm512_add_epi32(_mm512_madd_epi16(c2, _mm512_loadu_si512((q) + 64)), _mm512_madd_epi16(c3, _mm512_loadu_si512((q) + 96))))
    int64_t g = 0;
    if (G % 64 == 0) {
        if (G == 64) { /* two groups a load: lanes 0-7 are row_vec_int's chain a, lanes 8-15 its chain b */
            float both[INT_ROWS][I4_GROUPS_AHEAD];
            __m512 acc[INT_ROWS];
            for (int j = 0; j < nm; j++) acc[j] = _mm512_setzero_ps();
            const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
            while (g + 2 <= n_groups) { /* as row_vec_int: scales multiplied ahead, I4_GROUPS_AHEAD groups at a time */
                const int64_t g0 = g;
                int64_t end = g0;
                for (int j = 0; j < nm; j++) end = g0 + group_scales(w, both[j], scales + g0, xq[j]->scale + g0, n_groups - g0);
                for (; g + 2 <= end; g += 2, at += 64) {
                    _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
                    UNPACK(_mm512_loadu_si512(at));
                    for (int j = 0; j < nm; j++) {
                        const __m512i offset = _mm512_permutexvar_epi32(
                            halves, _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(xq[j]->qsum + g))));
                        const __m512 scale = _mm512_permutexvar_ps(
                            halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(both[j] + (g - g0))))));
                        const __m512i s = _mm512_sub_epi32(DOT128(xq[j]->q + g * 64), offset);
                        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[j]);
                    }
                }
            }
            for (int j = 0; j < nm; j++) {
                a[j] = _mm512_castps512_ps256(acc[j]);
                b[j] = _mm512_extractf32x8_ps(acc[j], 1);
            }
        }
        for (; g < n_groups; g++) { /* groups of 128 or more; or the last of an odd number of groups of 64 */
            __m256i sum[INT_ROWS];
            if (G == 64) { /* 64 columns, in row_vec_int's order (quantize_x's `last`) */
                for (int j = 0; j < nm; j++) sum[j] = i4_chunk64(at, xq[j]->q + g * 64);
                at += 32;
            } else {
                __m512i s[INT_ROWS];
                for (int j = 0; j < nm; j++) s[j] = _mm512_setzero_si512();
                for (int64_t c = 0; c < G; c += 128, at += 64) {
                    _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
                    UNPACK(_mm512_loadu_si512(at));
                    for (int j = 0; j < nm; j++) s[j] = _mm512_add_epi32(s[j], DOT128(xq[j]->q + g * G + c));
                }
                for (int j = 0; j < nm; j++)
                    sum[j] = _mm256_add_epi32(_mm512_castsi512_si256(s[j]), _mm512_extracti64x4_epi64(s[j], 1));
            }
            for (int j = 0; j < nm; j++) {
                const __m256i t = _mm256_sub_epi32(sum[j], _mm256_set1_epi32(xq[j]->qsum[g]));
                a[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(scale_value(w, scales[g]) * xq[j]->scale[g]),
                                       a[j]);
            }
        }
        for (int j = 0; j < nm; j++) out[j] = _mm256_add_ps(a[j], b[j]);
        return;
    }
    /* groups of 32: four groups a load, lanes 4i..4i+3 group g + i, which are row_vec_int's chain i (g % 4 == 0) */
    __m512 acc[INT_ROWS];
    for (int j = 0; j < nm; j++) acc[j] = _mm512_setzero_ps();
    const __m512i quarters = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const int half = w->scale_fmt == FMT_F16;
    for (; g + 4 <= n_groups; g += 4, at += 64) {
        _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
        UNPACK(_mm512_loadu_si512(at));
        const __m128i bits = _mm_loadl_epi64((const __m128i *)(scales + g)); /* the four groups' weight scales */
        const __m128 ws = half ? _mm_cvtph_ps(bits) : _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16));
        for (int j = 0; j < nm; j++) {
            const __m512i offset = _mm512_permutexvar_epi32(
                quarters, _mm512_castsi128_si512(_mm_slli_epi32(_mm_loadu_si128((const __m128i *)(xq[j]->qsum + g)), 1)));
            const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(DOT128(xq[j]->q + g * 32), offset));
            const __m128 both = _mm_mul_ps(ws, _mm_loadu_ps(xq[j]->scale + g)); /* as row_vec_int's, one at a time */
            acc[j] = _mm512_fmadd_ps(f, _mm512_permutexvar_ps(quarters, _mm512_castps128_ps512(both)), acc[j]);
        }
    }
    for (int j = 0; j < nm; j++) {
        __m128 chain[4] = {_mm512_castps512_ps128(acc[j]), _mm512_extractf32x4_ps(acc[j], 1),
                           _mm512_extractf32x4_ps(acc[j], 2), _mm512_extractf32x4_ps(acc[j], 3)};
        const uint8_t *left = at;
        for (int64_t h = g; h < n_groups; h++, left += 16) { /* the last groups, in row_vec_int's order of 32 */
            const __m128i s = _mm_sub_epi32(i4_chunk32(left, xq[j]->q + h * 32), _mm_set1_epi32(2 * xq[j]->qsum[h]));
            chain[h & 3] = _mm_fmadd_ps(_mm_cvtepi32_ps(s), _mm_set1_ps(scale_value(w, scales[h]) * xq[j]->scale[h]),
                                        chain[h & 3]);
        }
        const __m128 b = _mm_add_ps(_mm_add_ps(chain[0], chain[1]), _mm_add_ps(chain[2], chain[3]));
        out[j] = _mm256_insertf128_ps(_mm256_setzero_ps(), b, 0);
    }
#undef UNPACK
#undef DOT128
}

/* Weight rows [r0, r0 + nr) (nr <= 4) . each of nm activation rows, into out[row][activation row] */
typedef void (*int_rows_fn)(const weight_t *, int64_t, int64_t, int, const float *const *, const xq_t *const *,
                            __m256 (*)[INT_ROWS]);
#define INT_ROWS_FN(name, fmt, nm)                                                                                  \
    AVX512_TARGET static void name(const weight_t *w, int64_t e, int64_t r0, int nr, const float *const *x,       \
                                   const xq_t *const *xq, __m256 (*out)[INT_ROWS]) {                               \
        for (int r = 0; r < nr; r++) row_int_512_multi(fmt, nm, w, e, r0 + r, x, xq, out[r]);                      \
    }
INT_ROWS_FN(row_i8_512_x1, FMT_I8, 1) INT_ROWS_FN(row_i8_512_x2, FMT_I8, 2)
INT_ROWS_FN(row_i8_512_x3, FMT_I8, 3) INT_ROWS_FN(row_i8_512_x4, FMT_I8, 4)
INT_ROWS_FN(row_i4_512_x1, FMT_I4, 1) INT_ROWS_FN(row_i4_512_x2, FMT_I4, 2)
INT_ROWS_FN(row_i4_512_x3, FMT_I4, 3) INT_ROWS_FN(row_i4_512_x4, FMT_I4, 4)
#undef INT_ROWS_FN
/* [int4?][activation rows - 1] */
static const int_rows_fn int_rows_512[2][INT_ROWS] = {{row_i8_512_x1, row_i8_512_x2, row_i8_512_x3, row_i8_512_x4},
                                                      {row_i4_512_x1, row_i4_512_x2, row_i4_512_x3, row_i4_512_x4}};

/* One matrix-vector product of a batch-1 step: y = (y if accumulate else 0) + W_e . x. */
typedef struct {
    const weight_t *w;
    int64_t e;
    const float *x;
    float *y;
    int accumulate;
} job_t;

/* What a job's x becomes before the products: int16 blocks (integer kernels) or the even/odd split (fp32 kernels),
 * and for int4 the sum of x over each group (the fp32 kernels' offset of 8; weight_t.offsets). Jobs with the same x
 * and weight layout share one. `wide`: the integer kernels run on 512-bit vectors (int_rows_512), whose int4 columns
 * come in chunks of 128. They are chosen for the rows of a batched step (linear_rows), where they unpack a weight
 * once for several rows, for int4 groups of 32 (four groups a load) and for int8 with group scales (two groups a
 * load); a batch-1 product of int8 with a scale per row or int4 in groups of 64 or more measured no faster on them
 * (and its int4 a few percent slower), so it keeps row_vec_int. Either way the numbers are the same. */
typedef struct {
    int integer, wide;
    xq_t xq;
    float *xp, *sums;
} prep_t;

static int prepare_x(const weight_t *w, const float *x, prep_t *p, int batched) {
    const int64_t K = w->k;
    memset(p, 0, sizeof *p);
    p->integer = w->fmt == FMT_I8 || (w->fmt == FMT_I4 && w->group % QBLOCK == 0);
    const int64_t n_groups = w->fmt == FMT_I4 ? (K + w->group - 1) / w->group : 0;
    if (n_groups) {
        p->sums = malloc(sizeof(float) * n_groups);
        if (!p->sums) return -1;
        for (int64_t g = 0; g < n_groups; g++) {
            const int64_t end = (g + 1) * w->group < K ? (g + 1) * w->group : K;
            float sum = 0.0f;
            for (int64_t i = g * w->group; i < end; i++) sum += x[i];
            p->sums[g] = sum;
        }
    }
    if (p->integer) {
        const int pow2 = (w->group & (w->group - 1)) == 0; /* the 512-bit int4 kernels step through groups of 32,
                                                              * 64 or 128 and more by halves of 128 columns */
        p->wide = avx512_rows && (w->fmt == FMT_I8 || pow2)
                  && (batched || (w->fmt == FMT_I4 && w->group % 64) || (w->fmt == FMT_I8 && w->group));
        if (w->fmt == FMT_I8) return quantize_x(x, K, 0, 0, w->group ? w->group / QBLOCK : I8_SPAN, &p->xq);
        const int64_t chunk = w->group % 64 == 0 ? 64 : 32; /* row_vec_int's chunk; the 512-bit kernels read 128 */
        return quantize_x(x, K, p->wide ? 128 : chunk, chunk, w->group / QBLOCK, &p->xq);
    }
    p->xp = aligned_alloc(64, (sizeof(float) * K + 63) / 64 * 64); /* whole cache lines: a 512-bit load never straddles two */
    if (!p->xp) return -1;
    (w->fmt == FMT_BF16 && avx512_rows ? split_even_odd32 : split_even_odd)(x, K, p->xp);
    return 0;
}

/* sum over groups g of offset[g] * (x's sum over group g): what a weight row's group offsets add to its product.
 * Not inlined: every kernel's rows get it from the same code (store4), so its rounding is the same everywhere. */
static __attribute__((noinline)) float offsets_dot(const weight_t *w, const uint16_t *offsets, const float *sums, int64_t n_groups) {
    __m256 a = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= n_groups; g += 8) {
        const __m128i bits = _mm_loadu_si128((const __m128i *)(offsets + g));
        const __m256 o = w->scale_fmt == FMT_F16 ? _mm256_cvtph_ps(bits)
                         : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
        a = _mm256_fmadd_ps(o, _mm256_loadu_ps(sums + g), a);
    }
    float total = hsum(a);
    for (; g < n_groups; g++) total += scale_value(w, offsets[g]) * sums[g];
    return total;
}

static void free_prep(prep_t *p) { free_xq(&p->xq); free(p->xp); free(p->sums); }

static int same_layout(const weight_t *a, const weight_t *b) {
    return a->fmt == b->fmt && a->k == b->k && a->group == b->group; /* (and so the same `wide`) */
}

/* The totals of four rows' partial sums: ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)) of each. A row reduced
 * alone goes through the same order (with zeros beside it), so a row's result does not depend on how the rows
 * were split between threads. */
static inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* Four weight rows' partial sums (v0..v3, zeros past n) reduced and stored as y[r .. r + n) of a job: times the row
 * scale for int8, plus the group offsets' part for int4 that has them, added to y when the job accumulates. Every
 * kernel's rows end here, in the same order. */
static inline __attribute__((always_inline)) void store4(const int64_t fmt, const job_t *job, const prep_t *p,
                                                          int64_t r, int n, __m256 v0, __m256 v1, __m256 v2,
                                                          __m256 v3) {
    float sum[4];
    _mm_storeu_ps(sum, reduce4(v0, v1, v2, v3));
    const uint16_t *offsets = fmt == FMT_I4 ? expert_offsets(job->w, job->e) : NULL;
    const int64_t n_groups = offsets ? (job->w->k + job->w->group - 1) / job->w->group : 0;
    for (int i = 0; i < n; i++) {
        /* (the int8 scale's product rounded on its own: a multiply-add the compiler fused at some inlined copies of
         * this and not at others would give a row other numbers in a batch than alone) */
        const int row_scale = fmt == FMT_I8 && !job->w->group;
        const float scale = row_scale ? bf16_to_float(expert_scales(job->w, job->e)[r + i]) : 1.0f;
        float v = row_scale ? _mm_cvtss_f32(_mm_mul_ss(_mm_set_ss(sum[i]), _mm_set_ss(scale))) : sum[i];
        if (offsets) v += offsets_dot(job->w, offsets + (r + i) * n_groups, p->sums, n_groups);
        job->y[r + i] = job->accumulate ? job->y[r + i] + v : v;
    }
}

/* y[row] (+)= W_e[row] . x for rows [r0, r1) of one job, on the calling thread; fmt is a constant at each call. */
static inline __attribute__((always_inline)) void rows_of(const int64_t fmt, const job_t *job, const prep_t *p,
                                                           int64_t r0, int64_t r1) {
    const weight_t *w = job->w;
    const int64_t e = job->e;
#define ROW(r) (p->integer ? row_vec_int(fmt, w, e, (r), job->x, &p->xq) : row_vec(fmt, w, e, (r), job->x, p->xp, p->sums))
    if (fmt == FMT_BF16 && avx512_rows) { /* four weight rows at a time (quad_bf16_512) */
        for (int64_t r = r0; r < r1; r += 4) {
            const int n = r1 - r < 4 ? (int)(r1 - r) : 4;
            __m256 v[4][INT_ROWS];
            quads[0][QUAD_STREAM]((const uint16_t *)expert_data(w, e) + r * w->k, w->k, n, &job->x,
                                  (const float *const *)&p->xp, v);
            store4(fmt, job, p, r, n, v[0][0], v[1][0], v[2][0], v[3][0]);
        }
        return;
    }
    for (int64_t r = r0; r < r1; r += 4) {
        const int n = r1 - r < 4 ? (int)(r1 - r) : 4;
        const __m256 zero = _mm256_setzero_ps();
        const __m256 v0 = ROW(r), v1 = n > 1 ? ROW(r + 1) : zero, v2 = n > 2 ? ROW(r + 2) : zero, v3 = n > 3 ? ROW(r + 3) : zero;
        store4(fmt, job, p, r, n, v0, v1, v2, v3);
    }
#undef ROW
}

/* rows_of for an integer weight whose x was prepared `wide` (prep_t): the same numbers, on the 512-bit kernels */
static void rows_wide(const job_t *job, const prep_t *p, int64_t r0, int64_t r1) {
    const weight_t *w = job->w;
    const int64_t e = job->e;
    const xq_t *xq = &p->xq;
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t r = r0; r < r1; r += 4) {
        const int n = r1 - r < 4 ? (int)(r1 - r) : 4;
        __m256 v[4][INT_ROWS] = {{zero}, {zero}, {zero}, {zero}};
        int_rows_512[w->fmt == FMT_I4][0](w, e, r, n, &job->x, &xq, v);
        store4(w->fmt, job, p, r, n, v[0][0], v[1][0], v[2][0], v[3][0]);
    }
}

static void rows_dot(const job_t *job, const prep_t *p, int64_t r0, int64_t r1) {
    if (p->wide) {
        rows_wide(job, p, r0, r1);
        return;
    }
    switch (job->w->fmt) {
    case FMT_BF16: rows_of(FMT_BF16, job, p, r0, r1); break;
    case FMT_I8: rows_of(FMT_I8, job, p, r0, r1); break;
    case FMT_I4: rows_of(FMT_I4, job, p, r0, r1); break;
    case FMT_F16: rows_of(FMT_F16, job, p, r0, r1); break;
    default: rows_of(FMT_F32, job, p, r0, r1); break;
    }
}

#define MAX_JOBS 16
#define BF16_BLOCK_BYTES (256 * 1024) /* batched products (linear_rows_many): the bytes of a range of weight rows */
#define PARALLEL_MIN_WORK 65536 /* weights: below this a fork and join of the threads costs more than it saves */
#define PARALLEL_MIN_PRODUCTS (1 << 20) /* multiply-adds of a tiled product: below this, one thread */

/* ---- AVX512_BF16, chosen at run time ------------------------------------------------------------------
 * Built into the same library with per-function target attributes, and called only where the CPU reports it
 * (mx_bf16_supported): the prompt path's int8/int4 -> bf16 widening (mx_to_bf16), one instruction per 32 roundings. */
#define BF_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

int mx_bf16_supported(void) {
    return !avx512_forbidden && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vl");
}

/* One row of int4 codes (K columns, groups of G, a multiple of 32) times their group scales (w's scale_fmt), plus
 * the group offsets where there are any, rounded to the nearest bf16 (ties to even, as the AVX2 path does) into dst. */
BF_TARGET static void i4_row_to_bf16(const weight_t *w, const uint8_t *src, const uint16_t *scales,
                                     const uint16_t *offsets, int64_t K, int64_t G, uint16_t *dst) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m512i eight = _mm512_set1_epi32(8);
    for (int64_t i = 0; i < K; i += 32) { /* 16 bytes: columns i .. i + 31 */
        const __m512 scale = _mm512_set1_ps(scale_value(w, scales[i / G]));
        const __m512 offset = _mm512_set1_ps(offsets ? scale_value(w, offsets[i / G]) : 0.0f);
        const __m128i b = _mm_loadu_si128((const __m128i *)(src + i / 2));
        const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
        const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi); /* column order */
        __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(first), eight)), scale);
        __m512 c = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(second), eight)), scale);
        __asm__("" : "+v"(a), "+v"(c)); /* code x scale rounded, then the offset added (as dequantize): never fused */
        a = _mm512_add_ps(a, offset);
        c = _mm512_add_ps(c, offset);
        const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(c, a);
        if (i + 32 <= K) _mm512_storeu_si512(dst + i, packed);
        else _mm512_mask_storeu_epi16(dst + i, (__mmask32)((1ull << (K - i)) - 1), packed);
    }
}

/* One row of int8 codes times their bf16 row scale (G = 0) or their group scales (groups of G, a multiple of 32, in
 * w's scale_fmt), rounded to the nearest bf16 (ties to even) into dst. */
BF_TARGET static void i8_row_to_bf16(const weight_t *w, const int8_t *src, const uint16_t *scales, int64_t G,
                                     int64_t K, uint16_t *dst) {
    __m512 scale = _mm512_set1_ps(bf16_to_float(scales[0]));
    for (int64_t i = 0; i < K; i += 32) {
        const int64_t n = K - i < 32 ? K - i : 32;
        if (G) scale = _mm512_set1_ps(scale_value(w, scales[i / G]));
        const __m256i b = _mm256_maskz_loadu_epi8((__mmask32)(n == 32 ? ~0u : (1u << n) - 1), src + i);
        const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b))), scale);
        const __m512 c = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1))), scale);
        const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(c, a);
        if (n == 32) _mm512_storeu_si512(dst + i, packed);
        else _mm512_mask_storeu_epi16(dst + i, (__mmask32)((1ull << n) - 1), packed);
    }
}

/* Expert e's rows [r0, r0 + nr) as bf16 (row stride K) for a bf16 GEMM (kernels/prompt.py): bf16 as is; fp32, fp16,
 * int8 and int4 (code * scale, + offset) rounded to the nearest bf16 (ties to even). Returns 0, -1 when out of memory. */
int mx_to_bf16(const weight_t *w, int64_t e, int64_t r0, int64_t nr, uint16_t *out) {
    const int64_t K = w->k;
    const int fast_bf16 = mx_bf16_supported();
    int failed = 0;
#pragma omp parallel num_threads(threads) if (nr * K >= PARALLEL_MIN_WORK)
    {
        float *tile = malloc(sizeof(float) * K);
        if (!tile) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < nr; r++) {
            uint16_t *dst = out + r * K;
            const int64_t row = r0 + r;
            if (w->fmt == FMT_BF16) {
                memcpy(dst, (const uint16_t *)expert_data(w, e) + row * K, sizeof(uint16_t) * K);
                continue;
            }
            if (w->fmt == FMT_I8 && fast_bf16) {
                const int64_t G = w->group;
                i8_row_to_bf16(w, (const int8_t *)expert_data(w, e) + row * K,
                               expert_scales(w, e) + (G ? row * (K / G) : row), G, K, dst);
                continue;
            }
            if (w->fmt == FMT_I4 && w->group % 32 == 0 && fast_bf16) {
                const int64_t G = w->group, n_groups = (K + G - 1) / G;
                const uint16_t *offsets = expert_offsets(w, e);
                i4_row_to_bf16(w, (const uint8_t *)expert_data(w, e) + row * (n_groups * G / 2),
                               expert_scales(w, e) + row * n_groups, offsets ? offsets + row * n_groups : NULL, K,
                               G, dst);
                continue;
            }
            if (!tile) continue;
            int64_t stride;
            const float *f = widen(w, e, row, 1, 0, K, tile, &stride);
            int64_t i = 0;
            const __m256i lsb = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
            for (; i + 8 <= K; i += 8) {
                __m256i u = _mm256_castps_si256(_mm256_loadu_ps(f + i));
                u = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), lsb)));
                u = _mm256_srli_epi32(u, 16);
                __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
                _mm_storeu_si128((__m128i *)(dst + i), packed);
            }
            for (; i < K; i++) {
                uint32_t u;
                memcpy(&u, f + i, sizeof u);
                dst[i] = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
            }
        }
        free(tile);
    }
    return failed ? -1 : 0;
}

/* One row of K values rounded to int8 codes as mx_quantize_rows does (x * inverse rounded to the nearest, ties to
 * even: _mm256_cvtps_epi32 and nearbyintf round so in the default rounding mode); returns max |x|. */
static float quantize_row(const float *x, int64_t K, int8_t *q) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 top8 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) top8 = _mm256_max_ps(top8, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    float top = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
    for (; k < K; k++) top = fmaxf(top, fabsf(x[k]));
    const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
    const __m256 inv = _mm256_set1_ps(inverse);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (k = 0; k + 32 <= K; k += 32) { /* |codes| <= 127: the packs never saturate */
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), inv));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), inv));
        const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 16), inv));
        const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 24), inv));
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permutevar8x32_epi32(bytes, order));
    }
    for (; k < K; k++) q[k] = (int8_t)nearbyintf(x[k] * inverse);
    return top;
}

/* Rows of x (M rows of K, element (m, k) at x[m * sm + k * sk]) rounded to int8 for the prompt path's integer
 * GEMMs (kernels/prompt.py), one scale per row: scale = max |x| / 127 and q = x * (127 / max |x|) rounded to the
 * nearest integer (ties to even), so |q| <= 127; a row of zeros gets scale 0 and codes 0. q is (M, K) row-major.
 * Rows given with sk != 1 (columns of a matrix) are gathered into a contiguous row first. */
void mx_quantize_rows(const float *x, int64_t M, int64_t K, int64_t sm, int64_t sk, int8_t *q, float *scales) {
#pragma omp parallel num_threads(threads) if (M * K >= PARALLEL_MIN_WORK)
    {
        float *line = sk == 1 ? NULL : malloc(sizeof(float) * (size_t)K);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const float *row = x + m * sm;
            if (sk != 1) {
                if (line) {
                    for (int64_t k = 0; k < K; k++) line[k] = row[k * sk];
                    row = line;
                } else { /* (out of memory for the line: the same numbers, more slowly) */
                    float top = 0.0f;
                    for (int64_t k = 0; k < K; k++) top = fmaxf(top, fabsf(row[k * sk]));
                    const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
                    for (int64_t k = 0; k < K; k++) q[m * K + k] = (int8_t)nearbyintf(row[k * sk] * inverse);
                    scales[m] = top / 127.0f;
                    continue;
                }
            }
            scales[m] = quantize_row(row, K, q + m * K) / 127.0f;
        }
        free(line);
    }
}

/* ---- The prompt path's integer GEMM: AVX512_VNNI, chosen at run time (mx_vnni_supported) -------------------------
 * out (N, M) = W_e (N, K) @ x^T for M activation rows already rounded to int8 with a scale per row
 * (mx_quantize_rows), on VNNI's 8-bit dot products (vpdpbusd: four u8 x s8 products summed into each 32-bit lane).
 * The weight is read where it lies, never repacked: a tile of weight rows (I8_ROWS, I4_ROWS) meets 16 activation
 * rows per vector, one activation row per lane with four consecutive columns, and each weight row's same four
 * columns broadcast to every lane. The activations are laid out that way once per call (quads[k / 4][m][k % 4]).
 * - int8 weights (a scale per row, K a multiple of 4): the activations go in as u8 (code + 128) against the
 *   weight's s8 codes, and 128 x the weight row's sum is taken off; the sums are exact in int32. out = (float)sum *
 *   w scale * x scale, rounded in that order (as kernels/prompt.py's oneDNN int8 GEMM path does: the same numbers).
 * - int4 weights (groups of G, a multiple of 32; no offsets): the weight's u8 codes (0..15 for values code - 8)
 *   against the activations' s8 codes, with 8 x the activations' sum over the group taken off; each group's exact
 *   int32 sum times its scale is added in fp32, group after group (fused multiply-add); out = that total * x scale. */
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define I8_ROWS 8 /* int8 weight rows per tile (with up to I8_VECTORS vectors of 16 activation rows) */
#define I8_VECTORS 2
#define I4_ROWS 4 /* int4 weight rows per tile (with up to 2 vectors: its fp32 totals need registers too) */
/* Activation bytes per pass over the weight: every tile reads them all again, from the L2 or L3 cache. At the 8x7B
 * down projection's shape (K = 14,336) on Zen 4, 384 KiB (within L2: the weight read again every 16 rows) ran
 * 0.6-0.85x as fast as 2 MiB at 32 and 128 rows; 8 MiB was no faster. */
#define VNNI_X_BYTES (2 << 20)

int mx_vnni_supported(void) {
    return !avx512_forbidden && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

/* Store the 16 lanes of v for activation rows m0 .. m0 + 15 of an output row, those below `limit` (AVX-512 F only,
 * so it inlines into both GEMMs' targets). */
__attribute__((target("avx512f"))) static inline void store_lanes(float *row, int64_t m0, int64_t limit, __m512 v) {
    const int64_t left = limit - m0;
    _mm512_mask_storeu_ps(row + m0, (__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1), v);
}

/* Weight bytes a tile asks the cache for while it multiplies (prefetch, spread over its columns), so that the next
 * reads find them there: the rows this thread multiplies next (likely the next tile). (Asking also for the start of
 * the weight the next GEMM reads, as this did before, so that an expert with few tokens would find its weight in
 * cache, cost the bf16 GEMMs on Zen 4, 2 threads: without it "medium" prefilled 128 tokens at 346-391 tok/s against
 * 278-375 with it, ahead in each of four alternating pairs of runs; at 512 tokens it was ahead in two pairs of three
 * (444-457 against 420-447) and behind in the third (413-447 against 432-438); "small" at 128 was even or ahead.) */
typedef struct {
    const char *at;
    int64_t lines; /* of 64 bytes */
} ahead_t;

/* Ask for the lines of a that are due by column step q of `steps` (each tile spreads them evenly) */
static inline __attribute__((always_inline)) void ahead_step(const ahead_t *a, int64_t *done, int64_t q,
                                                             int64_t steps) {
    while (*done < a->lines && *done * steps < (q + 1) * a->lines) _mm_prefetch(a->at + 64 * (*done)++, _MM_HINT_T1);
}

/* What a tile of weight rows [n0, n0 + per_tile) of (N, row_bytes) at `data` prefetches: the next tile's rows */
static inline ahead_t tile_ahead(const char *data, int64_t row_bytes, int64_t N, int64_t n0, int64_t per_tile) {
    const int64_t n1 = n0 + per_tile, rows = N - n1 < per_tile ? N - n1 : per_tile;
    return (ahead_t){data + n1 * row_bytes, rows > 0 ? rows * row_bytes / 64 : 0};
}

/* One tile of int8 weight rows w[0 .. I8_ROWS) (the last ones repeat where the weight ends: `rows` are stored)
 * against V activation vectors from row m0 */
VNNI_TARGET static inline __attribute__((always_inline)) void i8_tile(
        const int8_t *const *w, int rows, const uint8_t *quads, int64_t Mp, int64_t m0, int64_t quads_k, const int V,
        const int32_t *wsum, const float *wscale, const float *xs, int64_t limit, float *out, int64_t ldo,
        const ahead_t *ahead) {
    __m512i acc[I8_ROWS][I8_VECTORS];
    int64_t done = 0;
    for (int i = 0; i < I8_ROWS; i++)
        for (int j = 0; j < V; j++) acc[i][j] = _mm512_setzero_si512();
    for (int64_t q = 0; q < quads_k; q++) {
        ahead_step(ahead, &done, q, quads_k);
        const uint8_t *a_at = quads + (q * Mp + m0) * 4;
        __m512i a[I8_VECTORS];
        for (int j = 0; j < V; j++) a[j] = _mm512_load_si512(a_at + 64 * j);
        for (int i = 0; i < I8_ROWS; i++) {
            int32_t four;
            memcpy(&four, w[i] + 4 * q, sizeof four);
            const __m512i b = _mm512_set1_epi32(four);
            for (int j = 0; j < V; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], a[j], b);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < V; j++) {
            const __m512i sum = _mm512_sub_epi32(acc[i][j], _mm512_set1_epi32(128 * wsum[i]));
            __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(wscale[i]));
            __asm__("" : "+v"(y)); /* each product rounded on its own, as the torch path's two multiplies */
            store_lanes(out + i * ldo, m0 + 16 * j, limit, _mm512_mul_ps(y, _mm512_loadu_ps(xs + m0 + 16 * j)));
        }
}

/* One tile of int4 weight rows, their codes unpacked to one byte each in `codes` (I4_ROWS rows of Kp), their
 * group scales in `scale` (I4_ROWS rows of n_groups) */
VNNI_TARGET static inline __attribute__((always_inline)) void i4_tile(
        const uint8_t *codes, int64_t Kp, const float *scale, int64_t n_groups, int64_t G, int rows,
        const uint8_t *quads, const int32_t *xsum, int64_t Mp, int64_t m0, const int V, const float *xs, int64_t limit,
        float *out, int64_t ldo, const ahead_t *ahead) {
    __m512 total[I4_ROWS][2];
    int64_t done = 0;
    for (int i = 0; i < I4_ROWS; i++)
        for (int j = 0; j < V; j++) total[i][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; g++) {
        __m512i acc[I4_ROWS][2];
        for (int i = 0; i < I4_ROWS; i++)
            for (int j = 0; j < V; j++) acc[i][j] = _mm512_setzero_si512();
        for (int64_t q = g * G / 4; q < (g + 1) * G / 4; q++) {
            ahead_step(ahead, &done, q, n_groups * G / 4);
            const uint8_t *a_at = quads + (q * Mp + m0) * 4;
            __m512i a[2];
            for (int j = 0; j < V; j++) a[j] = _mm512_load_si512(a_at + 64 * j);
            for (int i = 0; i < I4_ROWS; i++) {
                int32_t four;
                memcpy(&four, codes + i * Kp + 4 * q, sizeof four);
                const __m512i b = _mm512_set1_epi32(four);
                for (int j = 0; j < V; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], b, a[j]);
            }
        }
        __m512i eights[2];
        for (int j = 0; j < V; j++) eights[j] = _mm512_slli_epi32(_mm512_load_si512(xsum + g * Mp + m0 + 16 * j), 3);
        for (int i = 0; i < I4_ROWS; i++) {
            const __m512 s = _mm512_set1_ps(scale[i * n_groups + g]);
            for (int j = 0; j < V; j++)
                total[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], eights[j])), s,
                                              total[i][j]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < V; j++)
            store_lanes(out + i * ldo, m0 + 16 * j, limit,
                        _mm512_mul_ps(total[i][j], _mm512_loadu_ps(xs + m0 + 16 * j)));
}

/* A row of int4 code pairs (two per byte, low nibble first) as one byte per code (Kp codes, a multiple of 32) */
VNNI_TARGET static void unpack_i4(const uint8_t *src, int64_t Kp, uint8_t *dst) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (int64_t i = 0; i < Kp; i += 32) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(src + i / 2));
        const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
        _mm_storeu_si128((__m128i *)(dst + i), _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128((__m128i *)(dst + i + 16), _mm_unpackhi_epi8(lo, hi));
    }
}

/* Sum of an int8 row of K columns (a multiple of 4) */
VNNI_TARGET static int32_t row_sum_i8(const int8_t *row, int64_t K) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i acc = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
        const __mmask64 keep = K - k >= 64 ? ~0ull : (1ull << (K - k)) - 1;
        acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(keep, row + k));
    }
    return _mm512_reduce_add_epi32(acc);
}

/* The activation rows [m0, m0 + rows) of codes (M, K) in quads (Kp / 4, Mp, 4), Mp = rows rounded up to 16, zero
 * past K and M (xor 0x80 for int8 weights: u8 = code + 128), and for int4 weights their sums per group (n_groups,
 * Mp). Returns 0, -1 when out of memory. */
static int pack_rows(const int8_t *codes, int64_t K, int64_t m0, int64_t rows, int64_t Kp, int64_t Mp, int flip,
                     int64_t G, uint8_t *quads, int32_t *xsum) {
    int failed = 0;
#pragma omp parallel num_threads(threads) if (Mp * Kp >= PARALLEL_MIN_WORK)
    {
        uint8_t *line = malloc((size_t)Kp);
        if (!line) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < Mp; m++) {
            if (!line) continue;
            memset(line, 0, (size_t)Kp);
            if (m < rows) memcpy(line, codes + (m0 + m) * K, (size_t)K);
            for (int64_t q = 0; q < Kp / 4; q++) {
                uint32_t four;
                memcpy(&four, line + 4 * q, sizeof four);
                if (flip) four ^= 0x80808080u;
                memcpy(quads + (q * Mp + m) * 4, &four, sizeof four);
            }
            if (G)
                for (int64_t g = 0; g < Kp / G; g++) {
                    int32_t s = 0;
                    for (int64_t k = g * G; k < (g + 1) * G; k++) s += (int8_t)line[k];
                    xsum[g * Mp + m] = s;
                }
        }
        free(line);
    }
    return failed ? -1 : 0;
}

/* out (N, M) = expert e of w (int8 with a scale per row, K a multiple of 4 up to 65,536; or int4 in groups of a
 * multiple of 32, no offsets) @ (codes * scales)^T, codes (M, K) int8 with a scale per row. Each tile prefetches the
 * rows after it (not the next call's weight: on Zen 4 that cost 0-7% at the 8x7B shapes and gained nothing seen at
 * smaller ones). Returns 0, -1 when out of memory, -2 for a weight this kernel does not take. */
VNNI_TARGET int mx_gemm_i8(const weight_t *w, int64_t e, const int8_t *codes, const float *scales, int64_t M,
                           float *out) {
    const int int4 = w->fmt == FMT_I4;
    const int64_t N = w->n, K = w->k, G = int4 ? w->group : 0;
    if (!(w->fmt == FMT_I8 && w->group == 0 && K % 4 == 0) && !(int4 && G > 0 && G % 32 == 0 && !w->offsets))
        return -2;
    if (K > 65536) return -2; /* (an int8 row's int32 sum holds K x 255 x 128) */
    if (M <= 0) return 0;
    const int64_t n_groups = int4 ? (K + G - 1) / G : 0, Kp = int4 ? n_groups * G : K;
    const int64_t chunk = VNNI_X_BYTES / Kp / 16 * 16 > 16 ? VNNI_X_BYTES / Kp / 16 * 16 : 16;
    const int64_t Mp_max = (M < chunk ? M + 15 : chunk) / 16 * 16;
    uint8_t *quads = aligned_alloc(64, (size_t)(Kp * Mp_max));
    int32_t *xsum = aligned_alloc(64, sizeof(int32_t) * (size_t)((n_groups ? n_groups : 1) * Mp_max));
    float *xs = aligned_alloc(64, sizeof(float) * (size_t)Mp_max);
    int failed = !quads || !xsum || !xs;
    const int64_t per_tile = int4 ? I4_ROWS : I8_ROWS, tiles = (N + per_tile - 1) / per_tile;
    const int64_t row_bytes = int4 ? Kp / 2 : K;
    for (int64_t m0 = 0; m0 < M && !failed; m0 += chunk) { /* a pass over the weight per chunk of activations */
        const int64_t rows = M - m0 < chunk ? M - m0 : chunk, Mp = (rows + 15) / 16 * 16;
        if (pack_rows(codes, K, m0, rows, Kp, Mp, !int4, G, quads, xsum)) {
            failed = 1;
            break;
        }
        for (int64_t m = 0; m < Mp; m++) xs[m] = m < rows ? scales[m0 + m] : 0.0f;
        float *block = out + m0; /* output column m0; rows of stride M */
#pragma omp parallel num_threads(threads) if (N * K * Mp >= PARALLEL_MIN_PRODUCTS)
        {
            uint8_t *unpacked = int4 ? aligned_alloc(64, (size_t)(I4_ROWS * Kp)) : NULL;
            float *scale = int4 ? malloc(sizeof(float) * (size_t)(I4_ROWS * n_groups)) : NULL;
            if (int4 && (!unpacked || !scale)) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 4)
            for (int64_t t = 0; t < tiles; t++) {
                if (int4 && (!unpacked || !scale)) continue;
                const int64_t n0 = t * per_tile;
                const int rows_here = N - n0 < per_tile ? (int)(N - n0) : (int)per_tile;
                const ahead_t ahead = tile_ahead(expert_data(w, e), row_bytes, N, n0, per_tile), none = {NULL, 0};
                if (int4) {
                    for (int i = 0; i < I4_ROWS; i++) {
                        const int64_t n = n0 + (i < rows_here ? i : rows_here - 1);
                        unpack_i4((const uint8_t *)expert_data(w, e) + n * (Kp / 2), Kp, unpacked + i * Kp);
                        const uint16_t *s = expert_scales(w, e) + n * n_groups;
                        for (int64_t g = 0; g < n_groups; g++) scale[i * n_groups + g] = scale_value(w, s[g]);
                    }
                    for (int64_t v0 = 0; v0 < Mp; v0 += 32) {
                        const ahead_t *asks = v0 ? &none : &ahead;
                        if (Mp - v0 >= 32)
                            i4_tile(unpacked, Kp, scale, n_groups, G, rows_here, quads, xsum, Mp, v0, 2, xs, rows,
                                    block + n0 * M, M, asks);
                        else
                            i4_tile(unpacked, Kp, scale, n_groups, G, rows_here, quads, xsum, Mp, v0, 1, xs, rows,
                                    block + n0 * M, M, asks);
                    }
                } else {
                    const int8_t *wr[I8_ROWS];
                    int32_t wsum[I8_ROWS];
                    float wscale[I8_ROWS];
                    for (int i = 0; i < I8_ROWS; i++) {
                        const int64_t n = n0 + (i < rows_here ? i : rows_here - 1);
                        wr[i] = (const int8_t *)expert_data(w, e) + n * K;
                        wsum[i] = row_sum_i8(wr[i], K);
                        wscale[i] = bf16_to_float(expert_scales(w, e)[n]);
                    }
                    for (int64_t v0 = 0; v0 < Mp;) {
                        const int V = Mp - v0 >= 32 ? 2 : 1;
                        float *at = block + n0 * M;
                        const ahead_t *asks = v0 ? &none : &ahead;
                        if (V == 2)
                            i8_tile(wr, rows_here, quads, Mp, v0, Kp / 4, 2, wsum, wscale, xs, rows, at, M, asks);
                        else
                            i8_tile(wr, rows_here, quads, Mp, v0, Kp / 4, 1, wsum, wscale, xs, rows, at, M, asks);
                        v0 += 16 * V;
                    }
                }
            }
            free(unpacked);
            free(scale);
        }
    }
    free(quads);
    free(xsum);
    free(xs);
    return failed ? -1 : 0;
}

/* ---- The prompt path's bf16 GEMM: AVX512_BF16 (mx_bf16_supported) ---------------------------------------------
 * out (M, N) fp32 = x @ W_e^T, W_e (N, K) bf16, for M activation rows already rounded to bf16, with the integer GEMM's
 * scheme: BF_ROWS weight rows read where they lie, each pair of columns broadcast against 16 activation rows per
 * vector (pairs[k / 2][m][k % 2], laid out by pack_rows as 4-byte units), on vdpbf16ps (two bf16 products added
 * into each fp32 lane; subnormals flushed to zero). Sums are fp32, column pair after column pair; K even. */
#define BF_ROWS 8

/* Row-major stores of a tile: r[i] holds weight row i's sums for 16 (8) consecutive activation rows; out row m
 * (of stride ldo) gets r[0..rows)[m] side by side, for the activation rows m < limit. Transposed in registers. */
BF_TARGET static inline __attribute__((always_inline)) void store_transposed16(const __m512 r[8], int rows,
                                                                               float *out, int64_t ldo, int64_t limit) {
    __m512 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);     /* per 128-bit lane k: r_i[4k], r_i+1[4k], r_i[4k+1], .. */
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]); /* r_i[4k+2], r_i+1[4k+2], r_i[4k+3], .. */
    }
    for (int h = 0; h < 8; h += 4) { /* rows h .. h + 3 */
        u[h + 0] = _mm512_shuffle_ps(t[h], t[h + 2], 0x44);     /* lane k: activation row 4k */
        u[h + 1] = _mm512_shuffle_ps(t[h], t[h + 2], 0xEE);     /* 4k + 1 */
        u[h + 2] = _mm512_shuffle_ps(t[h + 1], t[h + 3], 0x44); /* 4k + 2 */
        u[h + 3] = _mm512_shuffle_ps(t[h + 1], t[h + 3], 0xEE); /* 4k + 3 */
    }
    const __mmask8 keep = (__mmask8)((1u << rows) - 1);
    for (int c = 0; c < 4; c++) {
        /* lanes 0 and 2 of rows 0-3 and 4-7 -> activation rows c, 8 + c; lanes 1 and 3 -> 4 + c, 12 + c */
        const __m512 even = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512 odd = _mm512_shuffle_f32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
        const __m512 a = _mm512_shuffle_f32x4(even, even, _MM_SHUFFLE(3, 1, 2, 0));
        const __m512 b = _mm512_shuffle_f32x4(odd, odd, _MM_SHUFFLE(3, 1, 2, 0));
        const int64_t m[4] = {c, 8 + c, 4 + c, 12 + c};
        const __m256 v[4] = {_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)),
                             _mm512_castps512_ps256(b), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1))};
        for (int q = 0; q < 4; q++)
            if (m[q] < limit) _mm256_mask_storeu_ps(out + m[q] * ldo, keep, v[q]);
    }
}

/* 8 vectors of 8 activation rows (weight rows i0 .. i0 + 7 of a narrow tile) -> out rows m < limit, columns i0 .. */
BF_TARGET static inline __attribute__((always_inline)) void store_transposed8(const __m256 r[8], int rows,
                                                                              float *out, int64_t ldo, int64_t limit) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int h = 0; h < 8; h += 4) {
        u[h + 0] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
        u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
        u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
        u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
    }
    const __mmask8 keep = (__mmask8)(rows >= 8 ? 0xFF : (1u << rows) - 1);
    for (int c = 0; c < 4; c++) { /* 128-bit lane 0: activation row c; lane 1: 4 + c */
        if (c < limit) _mm256_mask_storeu_ps(out + c * ldo, keep, _mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
        if (4 + c < limit) _mm256_mask_storeu_ps(out + (4 + c) * ldo, keep, _mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
    }
}

/* (Rows are read at one stride from one pointer, and the prefetches are asked for every AHEAD_EVERY column pairs:
 * with a pointer per row and a check per pair, the loop ran out of registers and was bound by its loads.) */
#define AHEAD_EVERY 8

/* BF_ROWS weight rows against V (up to 3) vectors of 16 activation rows from row m0 and, with H, a 256-bit half of 8
 * rows after them (the same sums, lane by lane, as a 512-bit vector's) */
BF_TARGET static inline __attribute__((always_inline)) void bf16_tile(
        const uint16_t *w, int64_t ld, int rows, const uint8_t *pairs, int64_t Mp, int64_t m0, int64_t K2, const int V,
        const int H, int64_t limit, float *out, int64_t ldo, const int row_major, const ahead_t *ahead) {
    __m512 acc[BF_ROWS][3];
    __m256 half[BF_ROWS];
    int64_t done = 0;
    for (int i = 0; i < BF_ROWS; i++) {
        for (int j = 0; j < V; j++) acc[i][j] = _mm512_setzero_ps();
        if (H) half[i] = _mm256_setzero_ps();
    }
    for (int64_t q0 = 0; q0 < K2; q0 += AHEAD_EVERY) {
        const int64_t q1 = q0 + AHEAD_EVERY < K2 ? q0 + AHEAD_EVERY : K2;
        ahead_step(ahead, &done, q1 - 1, K2);
        for (int64_t q = q0; q < q1; q++) {
            const uint8_t *a_at = pairs + (q * Mp + m0) * 4;
            __m512bh a[3];
            __m256bh a_half;
            for (int j = 0; j < V; j++) a[j] = (__m512bh)_mm512_load_si512(a_at + 64 * j);
            if (H) a_half = (__m256bh)_mm256_load_si256((const __m256i *)(a_at + 64 * V));
            const uint16_t *at = w + 2 * q;
            for (int i = 0; i < BF_ROWS; i++) {
                int32_t two;
                memcpy(&two, at + i * ld, sizeof two);
                const __m512i b = _mm512_set1_epi32(two);
                for (int j = 0; j < V; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a[j], (__m512bh)b);
                if (H) half[i] = _mm256_dpbf16_ps(half[i], a_half, (__m256bh)_mm512_castsi512_si256(b));
            }
        }
    }
    const int64_t m_half = m0 + 16 * V; /* the 8 rows of the half vector */
    if (row_major) {
        for (int j = 0; j < V; j++) {
            __m512 r[BF_ROWS];
            for (int i = 0; i < BF_ROWS; i++) r[i] = acc[i][j];
            store_transposed16(r, rows, out + (m0 + 16 * j) * ldo, ldo, limit - m0 - 16 * j);
        }
        if (H && m_half < limit) store_transposed8(half, rows, out + m_half * ldo, ldo, limit - m_half);
        return;
    }
    const int64_t left = limit - m_half;
    const __mmask8 keep = (__mmask8)(left >= 8 ? 0xFF : left <= 0 ? 0 : (1u << left) - 1);
    for (int i = 0; i < rows; i++) {
        for (int j = 0; j < V; j++) store_lanes(out + i * ldo, m0 + 16 * j, limit, acc[i][j]);
        if (H) _mm256_mask_storeu_ps(out + i * ldo + m_half, keep, half[i]);
    }
}

/* The same for at most 8 activation rows (m0 = 0) on 256-bit vectors, 2 x BF_ROWS weight rows: at few rows a
 * 512-bit vector would be half empty. The same sums in the same order. (On Zen 4, 16 chains of 256-bit vdpbf16ps
 * ran at the 512-bit ones' peak, 8 chains at 2/3 of it.) */
BF_TARGET static inline __attribute__((always_inline)) void bf16_tile_narrow(
        const uint16_t *w, int64_t ld, int rows, const uint8_t *pairs, int64_t Mp, int64_t K2, int64_t limit,
        float *out, int64_t ldo, const int row_major, const ahead_t *ahead) {
    __m256 acc[2 * BF_ROWS];
    int64_t done = 0;
    for (int i = 0; i < 2 * BF_ROWS; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t q0 = 0; q0 < K2; q0 += AHEAD_EVERY) {
        const int64_t q1 = q0 + AHEAD_EVERY < K2 ? q0 + AHEAD_EVERY : K2;
        ahead_step(ahead, &done, q1 - 1, K2);
        for (int64_t q = q0; q < q1; q++) {
            const __m256bh a = (__m256bh)_mm256_load_si256((const __m256i *)(pairs + q * Mp * 4));
            const uint16_t *at = w + 2 * q;
            for (int i = 0; i < 2 * BF_ROWS; i++) {
                int32_t two;
                memcpy(&two, at + i * ld, sizeof two);
                acc[i] = _mm256_dpbf16_ps(acc[i], a, (__m256bh)_mm256_set1_epi32(two));
            }
        }
    }
    if (row_major) {
        store_transposed8(acc, rows, out, ldo, limit);
        if (rows > 8) store_transposed8(acc + 8, rows - 8, out + 8, ldo, limit);
        return;
    }
    const __mmask8 keep = (__mmask8)(limit >= 8 ? 0xFF : (1u << limit) - 1);
    for (int i = 0; i < rows; i++) _mm256_mask_storeu_ps(out + i * ldo, keep, acc[i]);
}

/* Weight rows [n0, n0 + rows) of W (bf16, rows of K) against the first `cover` (a multiple of 8) of the Mp activation
 * rows in pairs, into out: those weight rows' outputs, rows of ldo, columns below `limit` stored; or, `row_major`,
 * out's columns n0 .. of its activation rows below `limit` (out at column n0 of activation row 0, rows of ldo). Up to
 * BF_ROWS rows on 512-bit tiles of up to 3 vectors and a 256-bit half (on Zen 4, 2 threads, medium's experts: 3
 * vectors against 2 and the half against rows padded to 16 took a 512-token prefill from 394-430 to 437-454 tok/s),
 * or, `narrow` (at most 8 activation rows), up to 2 x BF_ROWS on 256-bit ones. The first tile asks for `ahead`. A
 * last tile of fewer rows reads a copy of them, its last row repeated. Returns 0, -1 when out of memory. */
BF_TARGET static int bf16_rows(const uint16_t *W, int64_t K, int64_t n0, int rows, int narrow, const uint8_t *pairs,
                               int64_t Mp, int64_t cover, int64_t limit, float *out, int64_t ldo, int row_major,
                               const ahead_t *ahead) {
    const int per_tile = narrow ? 2 * BF_ROWS : BF_ROWS;
    const uint16_t *w = W + n0 * K;
    uint16_t *copy = NULL;
    if (rows < per_tile) {
        copy = malloc(sizeof(uint16_t) * (size_t)(per_tile * K));
        if (!copy) return -1;
        for (int i = 0; i < per_tile; i++) memcpy(copy + i * K, w + (i < rows ? i : rows - 1) * K, 2 * (size_t)K);
        w = copy;
    }
    const ahead_t none = {NULL, 0};
    if (narrow && row_major) bf16_tile_narrow(w, K, rows, pairs, Mp, K / 2, limit, out, ldo, 1, ahead);
    else if (narrow) bf16_tile_narrow(w, K, rows, pairs, Mp, K / 2, limit, out, ldo, 0, ahead);
    for (int64_t v0 = 0, step; v0 < cover && !narrow; v0 += step) {
        /* blocks of 48 rows (3 vectors of 16) while they fit, then 40, 32, 24, 16 or 8 (a 256-bit half vector for
         * the last 8), so at most 7 padding rows are computed; 56 goes as 32 + 24 (a lone half vector has only 8
         * chains of sums: 2/3 of the peak) */
        const int64_t rest = cover - v0;
        const ahead_t *asks = v0 ? &none : ahead;
        step = rest >= 64 || rest == 48 ? 48 : rest == 56 ? 32 : rest;
#define BF16_BLOCK(V, H)                                                                                              \
    (row_major ? bf16_tile(w, K, rows, pairs, Mp, v0, K / 2, V, H, limit, out, ldo, 1, asks)                           \
               : bf16_tile(w, K, rows, pairs, Mp, v0, K / 2, V, H, limit, out, ldo, 0, asks))
        switch (step) {
        case 48: BF16_BLOCK(3, 0); break;
        case 40: BF16_BLOCK(2, 1); break;
        case 32: BF16_BLOCK(2, 0); break;
        case 24: BF16_BLOCK(1, 1); break;
        case 16: BF16_BLOCK(1, 0); break;
        default: BF16_BLOCK(0, 1); break; /* 8 */
        }
#undef BF16_BLOCK
    }
    free(copy);
    return 0;
}

/* out (M, N), rows of ldo >= N, = x @ (expert e of w)^T, x (M, K) bf16, w bf16 with K even. Returns 0, -1 when out
 * of memory, -2 for a weight this kernel does not take. */
BF_TARGET int mx_gemm_bf16(const weight_t *w, int64_t e, const uint16_t *x, int64_t M, float *out, int64_t ldo) {
    const int64_t N = w->n, K = w->k;
    if (w->fmt != FMT_BF16 || K % 2) return -2;
    if (M <= 0) return 0;
    const int64_t bytes = 2 * K; /* a row's bytes: pack_rows' columns */
    const int64_t chunk = VNNI_X_BYTES / bytes / 16 * 16 > 16 ? VNNI_X_BYTES / bytes / 16 * 16 : 16;
    const int64_t Mp_max = (M < chunk ? M + 15 : chunk) / 16 * 16;
    uint8_t *pairs = aligned_alloc(64, (size_t)(bytes * Mp_max));
    int failed = !pairs;
    const int narrow = M <= 8;
    const int64_t per_tile = narrow ? 2 * BF_ROWS : BF_ROWS, tiles = (N + per_tile - 1) / per_tile;
    const uint16_t *W = expert_data(w, e);
    for (int64_t m0 = 0; m0 < M && !failed; m0 += chunk) {
        const int64_t rows = M - m0 < chunk ? M - m0 : chunk, Mp = (rows + 15) / 16 * 16, cover = (rows + 7) / 8 * 8;
        if (pack_rows((const int8_t *)(x + m0 * K), bytes, 0, rows, bytes, Mp, 0, 0, pairs, NULL)) {
            failed = 1;
            break;
        }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) if (N * K * Mp >= PARALLEL_MIN_PRODUCTS)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * per_tile;
            const int rows_here = N - n0 < per_tile ? (int)(N - n0) : (int)per_tile;
            const ahead_t ahead = tile_ahead((const char *)W, 2 * K, N, n0, per_tile);
            if (bf16_rows(W, K, n0, rows_here, narrow, pairs, Mp, cover, rows, out + m0 * ldo + n0, ldo, 1, &ahead)) {
#pragma omp atomic write
                failed = 1;
            }
        }
    }
    free(pairs);
    return failed ? -1 : 0;
}

/* silu(g) * u for 16 lanes: silu_times8's numbers */
BF_TARGET static inline __m512 swiglu16(const __m512 g, const __m512 u) {
    const __m256 lo = silu_times8(_mm512_castps512_ps256(g), _mm512_castps512_ps256(u));
    const __m256 hi = silu_times8(_mm512_extractf32x8_ps(g, 1), _mm512_extractf32x8_ps(u, 1));
    return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

/* The prompt path's bf16 expert, one call: out (M, D) fp32, rows of ldo >= D, = h @ w2_e^T, h = silu(x @ w1_e^T) *
 * (x @ w3_e^T) computed
 * in fp32 on the two GEMMs' fp32 sums and rounded to the nearest bf16 (ties to even), for M rows x (M, D) already
 * rounded to bf16 (w1, w3 (F, D), w2 (D, F), all bf16, D and F even). The numbers of mx_gemm_bf16 for the three
 * products, with h laid out for the down projection as it is made (no fp32 h in memory, no second packing) and two
 * parallel passes per chunk of rows instead of three calls. Returns 0, -1 when out of memory, -2 for weights
 * this kernel does not take. */
BF_TARGET int mx_expert_bf16(const weight_t *w1, const weight_t *w3, const weight_t *w2, int64_t e, const uint16_t *x,
                             int64_t M, float *out, int64_t ldo) {
    const int64_t D = w1->k, F = w1->n;
    if (w1->fmt != FMT_BF16 || w3->fmt != FMT_BF16 || w2->fmt != FMT_BF16 || w3->n != F || w3->k != D
        || w2->n != D || w2->k != F || D % 2 || F % 2)
        return -2;
    if (M <= 0) return 0;
    const int64_t widest = 2 * (D > F ? D : F); /* a row's bytes in the wider of the two packed inputs */
    const int64_t chunk = VNNI_X_BYTES / widest / 16 * 16 > 16 ? VNNI_X_BYTES / widest / 16 * 16 : 16;
    const int64_t Mp_max = (M < chunk ? M + 15 : chunk) / 16 * 16;
    uint8_t *pairs = aligned_alloc(64, (size_t)(2 * D * Mp_max)), *hidden = aligned_alloc(64, (size_t)(2 * F * Mp_max));
    int failed = !pairs || !hidden;
    const int narrow = M <= 8;
    const int64_t per_tile = narrow ? 2 * BF_ROWS : BF_ROWS;
    const int64_t up_tiles = (F + per_tile - 1) / per_tile, down_tiles = (D + per_tile - 1) / per_tile;
    const uint16_t *W1 = expert_data(w1, e), *W3 = expert_data(w3, e), *W2 = expert_data(w2, e);
    /* interleave two rows of 16 bf16 values (lanes 0-15 and 16-31) as 16 pairs: h's layout for the down GEMM */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t m0 = 0; m0 < M && !failed; m0 += chunk) {
        const int64_t rows = M - m0 < chunk ? M - m0 : chunk, Mp = (rows + 15) / 16 * 16, cover = (rows + 7) / 8 * 8;
        if (pack_rows((const int8_t *)(x + m0 * D), 2 * D, 0, rows, 2 * D, Mp, 0, 0, pairs, NULL)) {
            failed = 1;
            break;
        }
        const int parallel = F * D * Mp >= PARALLEL_MIN_PRODUCTS;
#pragma omp parallel num_threads(threads) if (parallel)
        {
            /* one tile's gate and up sums (lanes a narrow tile leaves are zero: h's padding rows stay finite) */
            float *gate = calloc((size_t)(2 * per_tile * Mp), sizeof(float)), *up = gate + per_tile * Mp;
            if (!gate) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 4)
            for (int64_t t = 0; t < up_tiles; t++) {
                if (!gate) continue;
                const int64_t n0 = t * per_tile;
                const int rows_here = F - n0 < per_tile ? (int)(F - n0) : (int)per_tile;
                const ahead_t a1 = tile_ahead((const char *)W1, 2 * D, F, n0, per_tile),
                              a3 = tile_ahead((const char *)W3, 2 * D, F, n0, per_tile);
                if (bf16_rows(W1, D, n0, rows_here, narrow, pairs, Mp, cover, Mp, gate, Mp, 0, &a1)
                    || bf16_rows(W3, D, n0, rows_here, narrow, pairs, Mp, cover, Mp, up, Mp, 0, &a3)) {
#pragma omp atomic write
                    failed = 1;
                }
                for (int i = 0; i < rows_here; i += 2) /* (rows_here is even: F is) */
                    for (int64_t m = 0; m < Mp; m += 16) {
                        const __m512 h0 = swiglu16(_mm512_loadu_ps(gate + i * Mp + m), _mm512_loadu_ps(up + i * Mp + m));
                        const __m512 h1 = swiglu16(_mm512_loadu_ps(gate + (i + 1) * Mp + m),
                                                   _mm512_loadu_ps(up + (i + 1) * Mp + m));
                        const __m512i two = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(h1, h0));
                        _mm512_store_si512(hidden + (((n0 + i) / 2) * Mp + m) * 4, two);
                    }
            }
            free(gate); /* (the loop's end waits for every thread: h is whole below) */
#pragma omp for schedule(dynamic, 4)
            for (int64_t t = 0; t < down_tiles; t++) {
                const int64_t n0 = t * per_tile;
                const int rows_here = D - n0 < per_tile ? (int)(D - n0) : (int)per_tile;
                const ahead_t a2 = tile_ahead((const char *)W2, 2 * F, D, n0, per_tile);
                if (bf16_rows(W2, F, n0, rows_here, narrow, hidden, Mp, cover, rows, out + m0 * ldo + n0, ldo, 1, &a2)) {
#pragma omp atomic write
                    failed = 1;
                }
            }
        }
    }
    free(pairs);
    free(hidden);
    return failed ? -1 : 0;
}

/* Run `count` jobs (each one activation row) in one parallel pass over all of their weight rows: the projections
 * of q, k and v, or the experts of one token, cost one fork and join. Returns 0, or -1 when out of memory. */
static int run_jobs(const job_t *jobs, int count) {
    prep_t preps[MAX_JOBS];
    const prep_t *prep_of[MAX_JOBS];
    int prepared = 0, status = 0;
    int64_t total = 0, work = 0;
    for (int i = 0; i < count; i++) {
        prep_of[i] = NULL;
        for (int j = 0; j < i && !prep_of[i]; j++)
            if (jobs[j].x == jobs[i].x && same_layout(jobs[j].w, jobs[i].w)) prep_of[i] = prep_of[j];
        if (!prep_of[i]) {
            if (prepare_x(jobs[i].w, jobs[i].x, &preps[prepared], 0)) status = -1;
            prep_of[i] = &preps[prepared++];
        }
        total += jobs[i].w->n;
        work += jobs[i].w->n * jobs[i].w->k;
    }
    if (status == 0) {
#pragma omp parallel num_threads(threads) if (work >= PARALLEL_MIN_WORK)
        { /* each thread one contiguous range of all the jobs' rows, taken job by job */
            const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
            int64_t lo = total * t / nt, hi = total * (t + 1) / nt, first = 0;
            for (int i = 0; i < count && lo < hi; first += jobs[i++].w->n) {
                const int64_t end = first + jobs[i].w->n;
                if (lo >= end) continue;
                const int64_t stop = hi < end ? hi : end;
                rows_dot(&jobs[i], prep_of[i], lo - first, stop - first);
                lo = stop;
            }
        }
    }
    for (int i = 0; i < prepared; i++) free_prep(&preps[i]);
    return status;
}

/* One product of a batched pass: y[m] (+)= W_e . x[m] for M activation rows (x and y rows ldx and ldy apart). */
typedef struct {
    const weight_t *w;
    int64_t e;
    const float *x;
    int64_t M, ldx;
    float *y;
    int64_t ldy;
    int accumulate;
} product_t;

/* Weight rows [lo, hi) of one product for all of its M activation rows (jobs and preps: one per row), each row
 * computed exactly as at batch 1 (run_jobs' kernel and order of summation). Where the CPU has AVX-512, each four
 * weight rows go over all activation rows, a few at a time (two for bf16, INT_ROWS for the integer kernels), the
 * weight loaded and widened or unpacked once for them and read from the L1 cache after the first, while the next
 * four rows stream in (prefetched by the first); else each activation row in turn over four weight rows at a time,
 * the weight rows read from memory for the first activation rows and from the cache for the others
 * (linear_rows_many's ranges are BF16_BLOCK_BYTES at most, or four rows where four are larger). */
static void rows_range(const weight_t *w, int64_t e, const job_t *jobs, const prep_t *preps, int64_t M, int64_t lo,
                       int64_t hi) {
    if (!(avx512_rows && (w->fmt == FMT_BF16 || preps[0].wide))) {
        for (int64_t r0 = lo; r0 < hi; r0 += 4)
            for (int64_t m = 0; m < M; m++) rows_dot(&jobs[m], &preps[m], r0, r0 + 4 < hi ? r0 + 4 : hi);
        return;
    }
    const int integer = preps[0].integer, per = integer ? INT_ROWS : 2;
    const int64_t K = w->k;
    const uint16_t *data = (const uint16_t *)expert_data(w, e);
    for (int64_t r0 = lo; r0 < hi; r0 += 4) { /* each four weight rows for all activation rows: the weight streams in
                                               * (prefetched ahead) while the rows are multiplied, from the L1 cache */
        const int n = (int)(hi - r0 < 4 ? hi - r0 : 4);
        for (int64_t m0 = 0; m0 < M; m0 += per) {
            const int nm = M - m0 < per ? (int)(M - m0) : per;
            const float *xs[INT_ROWS], *xps[INT_ROWS];
            const xq_t *xqs[INT_ROWS];
            for (int j = 0; j < nm; j++) {
                xs[j] = jobs[m0 + j].x; xps[j] = preps[m0 + j].xp; xqs[j] = &preps[m0 + j].xq;
            }
            __m256 v[4][INT_ROWS];
            if (integer) int_rows_512[w->fmt == FMT_I4][nm - 1](w, e, r0, n, xs, xqs, v);
            else quads[nm - 1][m0 == 0 ? QUAD_STREAM : m0 == per ? QUAD_CACHED_AHEAD : QUAD_CACHED](
                data + r0 * K, K, n, xs, xps, v);
            for (int j = 0; j < nm; j++) { /* as rows_of stores them */
                const __m256 zero = _mm256_setzero_ps();
                store4(w->fmt, &jobs[m0 + j], &preps[m0 + j], r0, n, v[0][j], n > 1 ? v[1][j] : zero,
                       n > 2 ? v[2][j] : zero, n > 3 ? v[3][j] : zero);
            }
        }
    }
}

/* Several products (of any weights and activation rows: a layer's q, k and v, or every expert's gate and up
 * projections over the tokens routed to it) in one parallel region: the threads take ranges of weight rows of any
 * of them in turn, so a batched step joins its threads once for all of them, and each thread streams one range of
 * a weight into its cache and reads it back for every activation row. Each row's numbers are the batch-1 kernel's
 * (rows_range), whatever the products beside it: a decode step gives a sequence the same numbers alone or in a
 * batch. Returns 0, or -1 when out of memory. */
static int linear_rows_many(const product_t *ps, int64_t count) {
    int64_t rows = 0, units = 0, work = 0;
    for (int64_t p = 0; p < count; p++) rows += ps[p].M;
    job_t *jobs = malloc(sizeof(job_t) * (rows ? rows : 1));
    prep_t *preps = calloc((size_t)(rows ? rows : 1), sizeof(prep_t));
    int64_t *first = malloc(sizeof(int64_t) * (count ? count : 1)), *span = malloc(sizeof(int64_t) * (count ? count : 1));
    int64_t *prep_first = malloc(sizeof(int64_t) * (count ? count : 1)), prepared = 0;
    int status = jobs && preps && first && span && prep_first ? 0 : -1;
    for (int64_t p = 0, at = 0; p < count && status == 0; p++) {
        const weight_t *w = ps[p].w;
        const int64_t row_bytes = w->fmt == FMT_I4 ? (w->k + 1) / 2
                                  : w->k * (w->fmt == FMT_F32 ? 4 : w->fmt == FMT_I8 ? 1 : 2);
        /* weight rows per range: a multiple of four, BF16_BLOCK_BYTES at most (a thread's L2 holds it) */
        span[p] = 4 * (BF16_BLOCK_BYTES / (4 * row_bytes) > 1 ? BF16_BLOCK_BYTES / (4 * row_bytes) : 1);
        units += (w->n + span[p] - 1) / span[p];
        work += w->n * w->k;
        first[p] = at;
        /* a product on the same activation rows as the one before it, in the same layout (an expert's gate and up
         * projections; q, k and v), shares its prepared rows */
        const int shared = p > 0 && ps[p].x == ps[p - 1].x && ps[p].M == ps[p - 1].M && ps[p].ldx == ps[p - 1].ldx
                           && same_layout(w, ps[p - 1].w);
        prep_first[p] = shared ? prep_first[p - 1] : prepared;
        for (int64_t m = 0; m < ps[p].M && status == 0; m++, at++) {
            jobs[at] = (job_t){w, ps[p].e, ps[p].x + m * ps[p].ldx, ps[p].y + m * ps[p].ldy, ps[p].accumulate};
            if (!shared && prepare_x(w, jobs[at].x, &preps[prepared++], 1)) status = -1;
        }
    }
    if (status == 0) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (work >= PARALLEL_MIN_WORK)
        for (int64_t u = 0; u < units; u++) {
            int64_t p = 0, lo = u;
            while (lo >= (ps[p].w->n + span[p] - 1) / span[p]) lo -= (ps[p].w->n + span[p] - 1) / span[p], p++;
            lo *= span[p];
            const int64_t hi = lo + span[p] < ps[p].w->n ? lo + span[p] : ps[p].w->n;
            if (ps[p].M) rows_range(ps[p].w, ps[p].e, jobs + first[p], preps + prep_first[p], ps[p].M, lo, hi);
        }
    }
    if (preps)
        for (int64_t m = 0; m < prepared; m++) free_prep(&preps[m]);
    free(jobs); free(preps); free(first); free(span); free(prep_first);
    return status;
}

/* y[m] (+)= W_e . x[m] for M activation rows, each computed exactly as at batch 1 (linear_rows_many), so that a
 * row's result does not depend on the rows beside it. Returns 0, or -1 when out of memory. */
static int linear_rows(const weight_t *w, int64_t e, const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy,
                       int accumulate) {
    if (M == 1) {
        const job_t job = {w, e, x, y, accumulate};
        return run_jobs(&job, 1);
    }
    const product_t product = {w, e, x, M, ldx, y, ldy, accumulate};
    return linear_rows_many(&product, 1);
}

/* ---- the entry points ---- */

/* y[m, n] = (y[m, n] if accumulate else 0) + sum_k x[m, k] * W_e[n, k]; threads split the rows of W.
 * Returns 0, or -1 when out of memory. */
int mx_linear(const weight_t *w, int64_t e, const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy,
              int accumulate) {
    if (M == 1) {
        const job_t job = {w, e, x, y, accumulate};
        if (run_jobs(&job, 1) == 0) return 0; /* (out of memory: the tiled path below allocates less) */
    }
    const int64_t N = w->n, K = w->k, blocks = (N + ROWS - 1) / ROWS;
    const int64_t kchunk = w->fmt == FMT_I4 && w->group > KCHUNK ? w->group : KCHUNK;
    /* Activation rows go MBLOCK at a time, so the ones a weight tile meets stay in the L2 cache (all of a long
     * prompt's rows, re-read for every tile, made this memory-bound); the weights are re-read once per block. */
    const int64_t rows_all = M;
    /* per thread: partial sums for the block's rows, and a tile for weight groups wider than KCHUNK */
    const int64_t per_thread = ROWS * (M < MBLOCK ? M : MBLOCK) + (kchunk > KCHUNK ? ROWS * kchunk : 0);
    float *scratch = malloc(sizeof(float) * per_thread * threads);
    if (!scratch) return -1;
    for (int64_t m0 = 0; m0 < rows_all; m0 += MBLOCK, x += MBLOCK * ldx, y += MBLOCK * ldy) {
    M = rows_all - m0 < MBLOCK ? rows_all - m0 : MBLOCK;
#pragma omp parallel num_threads(threads) if (N * K * M >= PARALLEL_MIN_PRODUCTS)
    {
        float tile[ROWS * KCHUNK];
        float *acc = scratch + per_thread * omp_get_thread_num();
        float *wide = kchunk > KCHUNK ? acc + ROWS * M : tile;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t r0 = b * ROWS;
            const int nr = (int)(N - r0 < ROWS ? N - r0 : ROWS);
            memset(acc, 0, sizeof(float) * ROWS * M);
            for (int64_t k0 = 0; k0 < K; k0 += kchunk) {
                const int64_t kc = K - k0 < kchunk ? K - k0 : kchunk;
                int64_t ts;
                const float *t = widen(w, e, r0, nr, k0, kc, wide, &ts);
                tile_dot(t, ts, nr, x + k0, ldx, M, kc, acc);
            }
            for (int64_t m = 0; m < M; m++)
                for (int r = 0; r < nr; r++) {
                    float *out = y + m * ldy + r0 + r;
                    *out = accumulate ? *out + acc[m * ROWS + r] : acc[m * ROWS + r];
                }
        }
    }
    }
    free(scratch);
    return 0;
}

/* y[m] (+)= W_e . x[m] for M rows, each computed as a decode step computes it (linear_rows): a row's numbers are the
 * same alone or among others. Returns 0, or -1 when out of memory. */
int mx_linear_rows(const weight_t *w, int64_t e, const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy,
                   int accumulate) {
    return linear_rows(w, e, x, M, ldx, y, ldy, accumulate);
}

/* The products of a pass: ROWS_EXACT (decode: every row as at batch 1, a row's numbers never depend on the rows
 * beside it), ROWS_TILED (a prompt), ROWS_SHORT (a short prompt: short_linear). */
enum { ROWS_TILED = 0, ROWS_EXACT = 1, ROWS_SHORT = 2 };

/* Whether a product of M rows of w runs on the batch-1 kernels (linear_rows) under `mode`: always for decode
 * (ROWS_EXACT). For a few tokens of a short prompt (ROWS_SHORT), where the weight is too large to stay in the cache
 * (it streams the weight once per few rows, where the tiled kernel widens every tile to fp32 for rows too few to
 * pay for it); the tiled one for small weights or more rows. Measured on a 2-core Xeon: up to 16 rows of the
 * "small" benchmark model's products (262K-917K weights) ran faster on the rows' kernel, the shipped model's
 * (33K-66K) on the tiled one. */
static int on_batch1_kernels(int mode, const weight_t *w, int64_t M) {
    return mode == ROWS_EXACT || (mode == ROWS_SHORT && M <= 16 && w->n * w->k >= (1 << 18));
}

static int short_linear(const weight_t *w, int64_t e, const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy,
                        int accumulate) {
    return (on_batch1_kernels(ROWS_SHORT, w, M) ? linear_rows : mx_linear)(w, e, x, M, ldx, y, ldy, accumulate);
}

typedef int (*linear_fn)(const weight_t *, int64_t, const float *, int64_t, int64_t, float *, int64_t, int);

static linear_fn products(int mode) {
    return mode == ROWS_EXACT ? linear_rows : mode == ROWS_SHORT ? short_linear : mx_linear;
}

/* Products of a pass under `mode` (ROWS_EXACT or ROWS_SHORT), each on the kernel `products(mode)` gives it: those
 * on the batch-1 kernels together in one linear_rows_many pass (in their order: neighbours on the same rows share
 * their prepared rows), the others one by one (mx_linear); so the numbers are those of running them one by one.
 * Returns 0, or -1 when out of memory. */
static int run_products(const product_t *ps, int64_t count, int mode) {
    product_t *batch1 = malloc(sizeof(product_t) * (count ? count : 1));
    if (!batch1) return -1;
    int64_t rows = 0;
    for (int64_t p = 0; p < count; p++)
        if (on_batch1_kernels(mode, ps[p].w, ps[p].M)) batch1[rows++] = ps[p];
    int status = linear_rows_many(batch1, rows);
    free(batch1);
    for (int64_t p = 0; p < count && status == 0; p++)
        if (!on_batch1_kernels(mode, ps[p].w, ps[p].M))
            status = mx_linear(ps[p].w, ps[p].e, ps[p].x, ps[p].M, ps[p].ldx, ps[p].y, ps[p].ldy, ps[p].accumulate);
    return status;
}


/* One token's experts (decode at batch 1): with top-k a multiple of the threads, each thread runs whole experts;
 * else all of their w1 and w3 rows in one parallel pass, then all of their w2 rows in another. Outputs are summed
 * in ascending expert order, as the grouped path does. */
static int moe_one_token(const float *x, const weight_t *w1, const weight_t *w3, const weight_t *w2, int64_t topk,
                         float *out, const int64_t *ids, const float *mix) {
    const int64_t D = w1->k, I = w1->n;
    int64_t order[MAX_JOBS / 2];
    for (int64_t j = 0; j < topk; j++) { /* ascending expert ids (insertion sort of topk entries) */
        int64_t at = j;
        while (at > 0 && ids[order[at - 1]] > ids[j]) { order[at] = order[at - 1]; at--; }
        order[at] = j;
    }
    float *h = malloc(sizeof(float) * 2 * topk * I), *ys = malloc(sizeof(float) * topk * D);
    job_t jobs[MAX_JOBS] = {0};
    int status = -1;
    if (!h || !ys) goto done;
    for (int64_t j = 0; j < topk; j++) {
        jobs[2 * j] = (job_t){w1, ids[order[j]], x, h + 2 * j * I, 0};
        jobs[2 * j + 1] = (job_t){w3, ids[order[j]], x, h + (2 * j + 1) * I, 0};
    }
    if (threads > 1 && topk % threads == 0) {
        /* As many experts per thread as each thread can take whole: a thread streams its experts' w1, w3 and w2
         * in one go, with no join between the gate/up products and the down product (a join restarts every
         * thread's memory stream; on small experts that costs a sizeable part of the bandwidth). */
        prep_t shared, own3; /* w3's x: w1's, unless the two are held in different formats (a GGUF file's) */
        const int apart = !same_layout(w1, w3);
        int failed = prepare_x(w1, x, &shared, 0);
        if (apart) failed |= prepare_x(w3, x, &own3, 0);
        if (!failed)
#pragma omp parallel num_threads(threads)
        for (int64_t j = omp_get_thread_num(); j < topk; j += omp_get_num_threads()) {
            float *gate = h + 2 * j * I, *up = gate + I;
            rows_dot(&jobs[2 * j], &shared, 0, I);
            rows_dot(&jobs[2 * j + 1], apart ? &own3 : &shared, 0, I);
            silu_times(gate, up, I);
            const job_t down = {w2, ids[order[j]], gate, ys + j * D, 0};
            prep_t own;
            if (prepare_x(w2, gate, &own, 0) == 0) rows_dot(&down, &own, 0, D);
            else {
#pragma omp atomic write
                failed = 1;
            }
            free_prep(&own);
        }
        free_prep(&shared);
        if (apart) free_prep(&own3);
        if (failed) goto done;
    } else {
        if (run_jobs(jobs, (int)(2 * topk))) goto done;
        for (int64_t j = 0; j < topk; j++) {
            float *gate = h + 2 * j * I, *up = gate + I;
            silu_times(gate, up, I);
            jobs[j] = (job_t){w2, ids[order[j]], gate, ys + j * D, 0};
        }
        if (run_jobs(jobs, (int)topk)) goto done;
    }
    for (int64_t d = 0; d < D; d++) {
        float sum = 0.0f;
        for (int64_t j = 0; j < topk; j++) sum += ys[j * D + d] * mix[order[j]];
        out[d] += sum;
    }
    status = 0;
done:
    free(h); free(ys);
    return status;
}

/* The top `topk` of each of M rows of E logits, best first (ties: lower index; NaN never above a number). */
static void select_top(const float *logits_all, int64_t M, int64_t E, int64_t topk, int64_t *ids_out) {
    for (int64_t m = 0; m < M; m++) {
        const float *logits = logits_all + m * E;
        int64_t *ids = ids_out + m * topk;
        for (int64_t j = 0; j < topk; j++) { /* selection: the best expert not yet chosen */
            int64_t best = -1;
            for (int64_t c = 0; c < E; c++) {
                int taken = 0;
                for (int64_t p = 0; p < j; p++) taken |= ids[p] == c;
                if (!taken && (best < 0 || (!isnan(logits[best]) && (isnan(logits[c]) || logits[c] > logits[best]))))
                    best = c;
            }
            ids[j] = best;
        }
    }
}

/* The distinct ids among n (each in [0, E)), ascending, into out; returns how many. */
static int64_t distinct(const int64_t *ids, int64_t n, int64_t E, int64_t *out) {
    int64_t count = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t i = 0; i < n; i++)
            if (ids[i] == e) { out[count++] = e; break; }
    return count;
}

/* Tell the expert store which experts the M tokens need (ids, M x topk), and which the next layer's router guesses
 * from x; returns once the needed ones are in place. Returns 0, -1 when out of memory, -5 when the store failed. */
static int ask_store(const store_t *store, const float *x, int64_t M, const int64_t *ids, int64_t topk, int64_t E,
                     int mode) {
    const weight_t *next = store->next_router;
    const int64_t E2 = next ? next->n : 0, k2 = next ? store->next_top_k : 0;
    int64_t *needed = malloc(sizeof(int64_t) * (E + E2 + 1)), *guessed = needed + E;
    float *logits = next ? malloc(sizeof(float) * M * E2) : NULL;
    int64_t *picks = next ? malloc(sizeof(int64_t) * M * k2) : NULL;
    int status = -1;
    if (!needed || (next && (!logits || !picks))) goto done;
    const int64_t n_needed = distinct(ids, M * topk, E, needed);
    int64_t n_guessed = 0;
    if (next) {
        if (products(mode)(next, 0, x, M, next->k, logits, E2, 0)) goto done;
        select_top(logits, M, E2, k2, picks);
        n_guessed = distinct(picks, M * k2, E2, guessed);
    }
    status = store->fetch(store->layer, needed, n_needed, guessed, n_guessed) ? -5 : 0;
done:
    free(needed); free(logits); free(picks);
    return status;
}

/* The routing half of a sparse MoE block for M tokens: router logits (fp32 arithmetic) into logits_out (M, E), the
 * top-k best first (ties: lower index) into ids_out (M, topk), their softmax into weights_out (M, topk); then the
 * store, if any, is asked for the chosen experts. Returns 0, -1 when out of memory, -5 when the store failed. */
static int route(const float *x, int64_t M, const weight_t *router, int64_t topk, float *logits_out,
                 int64_t *ids_out, float *weights_out, int mode, const store_t *store) {
    const int64_t E = router->n;
    if (products(mode)(router, 0, x, M, router->k, logits_out, E, 0)) return -1;
    select_top(logits_out, M, E, topk, ids_out);
    for (int64_t m = 0; m < M; m++) {
        const float *logits = logits_out + m * E;
        const int64_t *ids = ids_out + m * topk;
        float *mix = weights_out + m * topk;
        float top = logits[ids[0]], total = 0.0f;
        for (int64_t j = 0; j < topk; j++) total += mix[j] = expf(logits[ids[j]] - top);
        for (int64_t j = 0; j < topk; j++) mix[j] /= total;
    }
    return store ? ask_store(store, x, M, ids_out, topk, E, mode) : 0;
}

int mx_route(const float *x, int64_t M, const weight_t *router, int64_t topk, float *logits_out, int64_t *ids_out,
             float *weights_out, const store_t *store) {
    return route(x, M, router, topk, logits_out, ids_out, weights_out, ROWS_TILED, store);
}

/* The experts of the tokens of a decode step or a short prompt (ROWS_EXACT, ROWS_SHORT; one token takes
 * moe_one_token unless top-k is over MAX_JOBS / 2): every held expert's gate and up projections over the tokens
 * routed to it in one pass (run_products: those on the batch-1 kernels in one parallel region), then every down
 * projection in another; the outputs summed in ascending expert order, as the per-expert path of a long prompt
 * (moe, below) does. */
static int moe_rows(const float *x, int64_t M, const weight_t *w1, const weight_t *w3, const weight_t *w2,
                    int64_t topk, int64_t first, int64_t held, float *out, const int64_t *ids, const float *mix,
                    int mode) {
    const int64_t D = w1->k, I = w1->n, R = M * topk; /* at most R (token, expert) pairs */
    float *xs = malloc(sizeof(float) * R * D), *h1 = malloc(sizeof(float) * R * I);
    float *h3 = malloc(sizeof(float) * R * I), *ys = malloc(sizeof(float) * R * D);
    float *sum = calloc((size_t)(M * D), sizeof(float)), *scale = malloc(sizeof(float) * R);
    int64_t *token = malloc(sizeof(int64_t) * R);
    product_t *ps = malloc(sizeof(product_t) * 2 * (held ? held : 1));
    int64_t used = 0, n = 0;
    int status = -1;
    if (!xs || !h1 || !h3 || !ys || !sum || !scale || !token || !ps) goto done;
    for (int64_t e = first; e < first + held; e++) { /* the pairs by expert, ascending; each expert's in token order */
        const int64_t start = n;
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < topk; j++)
                if (ids[m * topk + j] == e) {
                    memcpy(xs + n * D, x + m * D, sizeof(float) * D);
                    token[n] = m; scale[n++] = mix[m * topk + j];
                }
        if (n == start) continue;
        ps[used++] = (product_t){w1, e - first, xs + start * D, n - start, D, h1 + start * I, I, 0};
        ps[used++] = (product_t){w3, e - first, xs + start * D, n - start, D, h3 + start * I, I, 0};
    }
    if (run_products(ps, used, mode)) goto done;
    silu_times(h1, h3, n * I);
    for (int64_t p = 0; p < used / 2; p++) { /* the down projection of each expert's pairs: h1 rows to ys rows */
        const product_t *up = &ps[2 * p];
        const int64_t start = (up->x - xs) / D;
        ps[p] = (product_t){w2, up->e, h1 + start * I, up->M, I, ys + start * D, D, 0};
    }
    if (run_products(ps, used / 2, mode)) goto done;
    for (int64_t i = 0; i < n; i++) {
        float *dst = sum + token[i] * D;
        const float *src = ys + i * D;
        for (int64_t d = 0; d < D; d++) dst[d] += src[d] * scale[i];
    }
    for (int64_t i = 0; i < M * D; i++) out[i] += sum[i];
    status = 0;
done:
    free(xs); free(h1); free(h3); free(ys); free(sum); free(scale); free(token); free(ps);
    return status;
}

/* The sparse MoE block for M tokens: out[m] += sum over the top-k experts of weight * expert(x[m]), routed by
 * `route` (which writes logits_out, ids_out, weights_out). Experts run in ascending order, each once for all of its
 * tokens. w1, w3 and w2 hold experts [first, first + held) of the router's E (all of them in one process; a rank's
 * share when the experts are split over processes, distributed.py): the others' contributions are left out.
 * `store`: see store_t (NULL: every expert in memory). Returns 0, -1 when out of memory, -5 when the store
 * failed. */
static int moe(const float *x, int64_t M, const weight_t *router, const weight_t *w1, const weight_t *w3,
               const weight_t *w2, int64_t topk, int64_t first, int64_t held, float *out, float *logits_out,
               int64_t *ids_out, float *weights_out, int mode, const store_t *store) {
    const int64_t D = w1->k, I = w1->n;
    /* mode: see products (ROWS_EXACT for decode, so a token's result does not depend on the tokens beside it) */
    const linear_fn linear = products(mode);
    const int routed = route(x, M, router, topk, logits_out, ids_out, weights_out, mode, store);
    if (routed) return routed;
    if (M == 1 && topk <= MAX_JOBS / 2) {
        int64_t ids[MAX_JOBS / 2], n = 0; /* the chosen experts held here, as indices into w1, w3, w2 */
        float mix[MAX_JOBS / 2];
        for (int64_t j = 0; j < topk; j++)
            if (ids_out[j] >= first && ids_out[j] < first + held) {
                ids[n] = ids_out[j] - first;
                mix[n++] = weights_out[j];
            }
        return n ? moe_one_token(x, w1, w3, w2, n, out, ids, mix) : 0;
    }
    if (mode != ROWS_TILED) return moe_rows(x, M, w1, w3, w2, topk, first, held, out, ids_out, weights_out, mode);
    float *xs = malloc(sizeof(float) * M * D), *h1 = malloc(sizeof(float) * M * I);
    float *h3 = malloc(sizeof(float) * M * I), *ys = malloc(sizeof(float) * M * D);
    float *sum = calloc((size_t)(M * D), sizeof(float));
    int64_t *token = malloc(sizeof(int64_t) * M);
    float *scale = malloc(sizeof(float) * M);
    int status = 0;
    if (!xs || !h1 || !h3 || !ys || !sum || !token || !scale) { status = -1; goto done; }
    for (int64_t e = first; e < first + held; e++) {
        int64_t n = 0;
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < topk; j++)
                if (ids_out[m * topk + j] == e) { token[n] = m; scale[n++] = weights_out[m * topk + j]; }
        if (!n) continue;
        for (int64_t i = 0; i < n; i++) memcpy(xs + i * D, x + token[i] * D, sizeof(float) * D);
        if (linear(w1, e - first, xs, n, D, h1, I, 0) || linear(w3, e - first, xs, n, D, h3, I, 0)) {
            status = -1;
            goto done;
        }
        silu_times(h1, h3, n * I);
        if (linear(w2, e - first, h1, n, I, ys, D, 0)) { status = -1; goto done; }
        for (int64_t i = 0; i < n; i++) {
            float *dst = sum + token[i] * D;
            const float *src = ys + i * D;
            for (int64_t d = 0; d < D; d++) dst[d] += src[d] * scale[i];
        }
    }
    for (int64_t i = 0; i < M * D; i++) out[i] += sum[i];
done:
    free(xs); free(h1); free(h3); free(ys); free(sum); free(token); free(scale);
    return status;
}

int mx_moe(const float *x, int64_t M, const weight_t *router, const weight_t *w1, const weight_t *w3,
           const weight_t *w2, int64_t topk, int64_t first, int64_t held, float *out, float *logits_out,
           int64_t *ids_out, float *weights_out, const store_t *store, int exact_rows) {
    return moe(x, M, router, w1, w3, w2, topk, first, held, out, logits_out, ids_out, weights_out,
               exact_rows ? ROWS_EXACT : ROWS_TILED, store);
}

/* One query head over S positions of its keys and values (S, Dh): softmax(q . k * scale) . v into o (Dh). Scores
 * go 8 positions at a time (8 dot products reduced together), exp 8 at a time, and the weighted sum of the values
 * is normalized once at the end. */
static void attend(const float *q, const float *keys, const float *values, int64_t S, int64_t Dh, float scale,
                   float *scores, float *o) {
    int64_t s = 0;
    if (Dh % 8 == 0)
        for (; s + 8 <= S; s += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < Dh; d += 8) {
                const __m256 qd = _mm256_loadu_ps(q + d);
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(keys + (s + j) * Dh + d), acc[j]);
            }
            const __m128 lo = reduce4(acc[0], acc[1], acc[2], acc[3]), hi = reduce4(acc[4], acc[5], acc[6], acc[7]);
            _mm256_storeu_ps(scores + s, _mm256_mul_ps(_mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1), _mm256_set1_ps(scale)));
        }
    for (; s < S; s++) scores[s] = dot(q, keys + s * Dh, Dh) * scale;
    float top = -INFINITY, total = 0.0f;
    for (s = 0; s < S; s++) top = scores[s] > top ? scores[s] : top;
    s = 0;
    if (top > -INFINITY && top < INFINITY) {
        const __m256 top8 = _mm256_set1_ps(top);
        __m256 total8 = _mm256_setzero_ps();
        for (; s + 8 <= S; s += 8) {
            const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + s), top8));
            _mm256_storeu_ps(scores + s, p);
            total8 = _mm256_add_ps(total8, p);
        }
        total = hsum(total8);
    }
    for (; s < S; s++) total += scores[s] = expf(scores[s] - top); /* NaN or inf scores stay NaN, as in torch */
    memset(o, 0, sizeof(float) * Dh);
    if (Dh % 8 == 0 && Dh <= 256)
        for (int64_t d0 = 0; d0 < Dh; d0 += 64) { /* up to 8 vectors of the output held in registers */
            const int nv = (int)((Dh - d0 < 64 ? Dh - d0 : 64) / 8);
            __m256 acc[8];
            for (int j = 0; j < nv; j++) acc[j] = _mm256_setzero_ps();
            for (s = 0; s < S; s++) {
                const __m256 p = _mm256_set1_ps(scores[s]);
                const float *v = values + s * Dh + d0;
                for (int j = 0; j < nv; j++) acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * j), acc[j]);
            }
            for (int j = 0; j < nv; j++) _mm256_storeu_ps(o + d0 + 8 * j, acc[j]);
        }
    else
        for (s = 0; s < S; s++) {
            const float p = scores[s];
            const float *v = values + s * Dh;
            for (int64_t d = 0; d < Dh; d++) o[d] += p * v[d];
        }
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < Dh; d++) o[d] *= inv;
}

/* One new token for each of M sequences: rotate its query and key heads (the "rotate half" layout of Hugging
 * Face checkpoints) for position pos[m], write its key and value into cache row rows[m] at that position, then
 * attend over positions [0, pos[m]] (the last `window` of them when window > 0).
 * qkv: (M, H + 2G, Dh), rotated in place. caches: (rows, G, S_max, Dh). out: (M, H, Dh). */
int mx_attention(float *qkv, int64_t M, int64_t H, int64_t G, int64_t Dh, const int64_t *pos,
                 const int64_t *rows, float *k_cache, float *v_cache, int64_t s_max, int64_t window, float theta,
                 float *out) {
    const int64_t half = Dh / 2, width = (H + 2 * G) * Dh;
    for (int64_t m = 0; m < M; m++) {
        float *q = qkv + m * width;
        for (int64_t i = 0; i < half; i++) {
            const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)Dh);
            const float angle = (float)pos[m] * inv_freq, c = cosf(angle), s = sinf(angle);
            for (int64_t h = 0; h < H + G; h++) { /* query heads, then key heads */
                float *v = q + h * Dh;
                const float a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            const int64_t at = ((rows[m] * G + g) * s_max + pos[m]) * Dh;
            memcpy(k_cache + at, q + (H + g) * Dh, sizeof(float) * Dh);
            memcpy(v_cache + at, q + (H + G + g) * Dh, sizeof(float) * Dh);
        }
    }
    int status = 0;
    const float scale = 1.0f / sqrtf((float)Dh);
    const int64_t R = H / G; /* query heads per key/value head: they read the same keys and values */
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * s_max);
        if (!scores) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(static)
        for (int64_t mg = 0; mg < M * G; mg++) {
            if (!scores) continue;
            const int64_t m = mg / G, g = mg % G;
            const int64_t last = pos[m], first = window > 0 && last - window + 1 > 0 ? last - window + 1 : 0;
            const int64_t S = last - first + 1;
            const float *keys = k_cache + ((rows[m] * G + g) * s_max + first) * Dh;
            const float *values = v_cache + ((rows[m] * G + g) * s_max + first) * Dh;
            const float *q = qkv + m * width + g * R * Dh;
            for (int64_t r = 0; r < R; r++)
                attend(q + r * Dh, keys, values, S, Dh, scale, scores, out + (m * H + g * R + r) * Dh);
        }
        free(scores);
    }
    return status;
}

/* ---- prompt attention on AVX512_BF16 (kernels/prompt.py: attention) ------------------------------------
 * Attention for the T new tokens of each of B sequences (a prompt or a chunk of one), their keys and values
 * already in the cache: query t of sequence b at position pos[b, t] sees keys [0, S) up to that position (the last
 * `window` of them when window > 0), as SDPA with model.attention_mask computes it. The numbers (torch's bf16 flash
 * attention's contract): q, k and v rounded to bf16 (ties to even); each score the fp32 sum of exact products
 * (vdpbf16ps), times 1/sqrt(Dh); the softmax in fp32, 64 keys at a time against the running maximum (online); its
 * weights rounded to bf16 for the product with v, summed in fp32; divided by the fp32 sum of the unrounded weights.
 *
 * For each (sequence, key/value head), its keys are packed in blocks of 16 for the scores (pack_keys: 16 keys'
 * pairs of columns side by side) and its values in pairs of keys (pack_values: the two keys' values of each column
 * side by side), then the R query heads that read them are taken 4 rows at a time (position-major: row i is position i / R,
 * head i % R), each row group over the 64-key chunks its rows may see: 16 score sums (4 rows x 64 keys) in
 * registers, then 16 output sums (4 rows x 64 columns) per 64 columns (8 for a last 32), rescaled at each chunk. */
#define PA_ROWS 4
#define PA_CHUNK 64

/* exp(t) for t <= 0, 16 at a time: exp_nonpositive's method on 512-bit vectors (0 below -87 and for -inf; NaN stays
 * NaN, so a NaN score makes its row's output NaN, as in SDPA). */
BF_TARGET static inline __m512 exp16_nonpositive(const __m512 t_in) {
    const __m512 low = _mm512_set1_ps(-87.0f);
    const __mmask16 keep = _mm512_cmp_ps_mask(t_in, low, _CMP_GE_OQ);
    const __m512 t = _mm512_max_ps(t_in, low);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = EXP_REMAINDER(_mm512_fnmadd_ps, _mm512_set1_ps, t, n);
    const __m512 p = EXP_SERIES(_mm512_fmadd_ps, _mm512_set1_ps, r);
    const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __m512 e = _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(scale));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(t_in, t_in, _CMP_UNORD_Q), e, t_in);
}

/* Keys [0, S) of one head (row stride ss floats) into 16-key blocks: block b, column pair c holds keys 16b .. 16b +
 * 15's columns 2c, 2c + 1 (as one 32-bit pair each); keys past S are zero, up to Sp (a multiple of PA_CHUNK). */
BF_TARGET static void pack_keys(const float *k, int64_t ss, int64_t S, int64_t Sp, int64_t Dh, uint32_t *out) {
    const int64_t C = Dh / 2;
    for (int64_t j = 0; j < Sp; j++) {
        uint32_t *dst = out + (j / 16) * C * 16 + j % 16;
        if (j >= S) {
            for (int64_t c = 0; c < C; c++) dst[c * 16] = 0;
            continue;
        }
        for (int64_t d = 0; d < Dh; d += 32) { /* Dh is a multiple of 32 */
            uint32_t two[16];
            const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(k + j * ss + d + 16), _mm512_loadu_ps(k + j * ss + d));
            _mm512_storeu_si512(two, b);
            for (int c = 0; c < 16; c++) dst[(d / 2 + c) * 16] = two[c];
        }
    }
}

/* Values [0, S) of one head into pairs of keys: pair p, column d holds keys 2p and 2p + 1's column d (the first in
 * the low half); keys past S are zero, up to Sp. */
BF_TARGET static void pack_values(const float *v, int64_t ss, int64_t S, int64_t Sp, int64_t Dh, uint16_t *out) {
    __m512i order = _mm512_setzero_si512(); /* 2c <- a's c, 2c + 1 <- b's c */
    {
        uint16_t idx[32];
        for (int c = 0; c < 16; c++) idx[2 * c] = (uint16_t)c, idx[2 * c + 1] = (uint16_t)(32 + c);
        order = _mm512_loadu_si512(idx);
    }
    for (int64_t j = 0; j < Sp; j += 2) {
        uint16_t *dst = out + j * Dh;
        for (int64_t d = 0; d < Dh; d += 16) {
            const __m512 zero = _mm512_setzero_ps();
            const __m512 a = j < S ? _mm512_loadu_ps(v + j * ss + d) : zero;
            const __m512 b = j + 1 < S ? _mm512_loadu_ps(v + (j + 1) * ss + d) : zero;
            const __m512i ab = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(a));
            const __m512i bb = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(b));
            _mm512_storeu_si512(dst + 2 * d, _mm512_permutex2var_epi16(ab, order, bb));
        }
    }
}

/* o[r][d0 .. d0 + 16 V) = o[r][..] * rescale[r] + the chunk's values (vc, pairs of keys) weighted by weights[r]. */
BF_TARGET static inline __attribute__((always_inline)) void weigh_values(
        const uint16_t *vc, int64_t Dh, int64_t d0, const int V, const uint32_t weights[PA_ROWS][PA_CHUNK / 2],
        const float *rescale, float *o) {
    __m512 acc[PA_ROWS][4];
    for (int r = 0; r < PA_ROWS; r++)
        for (int u = 0; u < V; u++)
            acc[r][u] = _mm512_mul_ps(_mm512_loadu_ps(o + r * Dh + d0 + 16 * u), _mm512_set1_ps(rescale[r]));
    for (int p = 0; p < PA_CHUNK / 2; p++) {
        __m512bh v[4];
        for (int u = 0; u < V; u++) v[u] = (__m512bh)_mm512_loadu_si512(vc + (p * Dh + d0 + 16 * u) * 2);
        for (int r = 0; r < PA_ROWS; r++) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int32_t)weights[r][p]);
            for (int u = 0; u < V; u++) acc[r][u] = _mm512_dpbf16_ps(acc[r][u], v[u], w);
        }
    }
    for (int r = 0; r < PA_ROWS; r++)
        for (int u = 0; u < V; u++) _mm512_storeu_ps(o + r * Dh + d0 + 16 * u, acc[r][u]);
}

/* PA_ROWS query rows (qs: their bf16 column pairs, Dh / 2 each) over the chunks [c0, c1] of one head's packed keys
 * and values: each row r sees keys [lo[r], hi[r]] (none where hi < lo). Writes each row's normalized output to
 * out[r] (Dh floats; zero for a row that sees no key). o: PA_ROWS * Dh floats of scratch. */
BF_TARGET static void attend_rows(const uint32_t *qs, const uint32_t *keys, const uint16_t *values, int64_t Dh,
                                  float scale, const int64_t *lo, const int64_t *hi, int64_t c0, int64_t c1,
                                  float *o, float *const *out) {
    const int64_t C = Dh / 2;
    float top[PA_ROWS], total[PA_ROWS];
    uint32_t weights[PA_ROWS][PA_CHUNK / 2]; /* the chunk's softmax weights in bf16, pairs of keys */
    for (int r = 0; r < PA_ROWS; r++) top[r] = -INFINITY, total[r] = 0.0f;
    memset(o, 0, sizeof(float) * PA_ROWS * Dh);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t c = c0; c <= c1; c++) {
        __m512 s[PA_ROWS][4];
        for (int r = 0; r < PA_ROWS; r++)
            for (int b = 0; b < 4; b++) s[r][b] = _mm512_setzero_ps();
        const uint32_t *kc = keys + c * 4 * C * 16;
        for (int64_t p = 0; p < C; p++) {
            __m512bh k[4];
            for (int b = 0; b < 4; b++) k[b] = (__m512bh)_mm512_loadu_si512(kc + (b * C + p) * 16);
            for (int r = 0; r < PA_ROWS; r++) {
                const __m512bh q = (__m512bh)_mm512_set1_epi32((int32_t)qs[r * C + p]);
                for (int b = 0; b < 4; b++) s[r][b] = _mm512_dpbf16_ps(s[r][b], k[b], q);
            }
        }
        float rescale[PA_ROWS];
        for (int r = 0; r < PA_ROWS; r++) {
            __m512 m = _mm512_set1_ps(-INFINITY);
            __mmask16 nan = 0; /* (max drops NaN: a NaN score is looked for on its own, and kept as the maximum) */
            for (int b = 0; b < 4; b++) {
                const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)(c * PA_CHUNK + 16 * b)));
                const __mmask16 seen = _mm512_cmp_epi32_mask(key, _mm512_set1_epi32((int32_t)lo[r]), _MM_CMPINT_NLT)
                                     & _mm512_cmp_epi32_mask(key, _mm512_set1_epi32((int32_t)hi[r]), _MM_CMPINT_LE);
                s[r][b] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), seen, s[r][b], _mm512_set1_ps(scale));
                m = _mm512_max_ps(m, s[r][b]);
                nan |= _mm512_cmp_ps_mask(s[r][b], s[r][b], _CMP_UNORD_Q);
            }
            const float chunk_top = nan ? NAN : _mm512_reduce_max_ps(m);
            const float new_top = chunk_top > top[r] || chunk_top != chunk_top ? chunk_top : top[r];
            if (new_top == -INFINITY) { /* nothing seen yet */
                rescale[r] = 1.0f;
                memset(weights[r], 0, sizeof weights[r]);
                continue;
            }
            rescale[r] = top[r] == -INFINITY ? 0.0f : expf(top[r] - new_top);
            top[r] = new_top;
            __m512 sum = _mm512_setzero_ps();
            for (int b = 0; b < 4; b++) {
                const __m512 e = exp16_nonpositive(_mm512_sub_ps(s[r][b], _mm512_set1_ps(new_top)));
                sum = _mm512_add_ps(sum, e);
                _mm256_storeu_si256((__m256i *)(weights[r] + 8 * b), (__m256i)_mm512_cvtneps_pbh(e));
            }
            total[r] = total[r] * rescale[r] + _mm512_reduce_add_ps(sum);
        }
        const uint16_t *vc = values + c * PA_CHUNK * Dh;
        for (int64_t d0 = 0; d0 < Dh; d0 += 64) {
            if (Dh - d0 >= 64) weigh_values(vc, Dh, d0, 4, weights, rescale, o);
            else weigh_values(vc, Dh, d0, 2, weights, rescale, o);
        }
    }
    for (int r = 0; r < PA_ROWS; r++) {
        if (!out[r]) continue;
        const float inv = total[r] > 0.0f || total[r] != total[r] ? 1.0f / total[r] : 0.0f; /* (NaN stays NaN) */
        for (int64_t d = 0; d < Dh; d++) out[r][d] = o[r * Dh + d] * inv;
    }
}

/* q: (B, T, H, Dh) at strides (qs[0], qs[1], Dh, 1); k, v: (B, G, S, Dh) at strides (ks[0], ks[1], ks[2], 1) and
 * (vs[0], vs[1], vs[2], 1); pos: (B, T); out: (B, T, H, Dh) contiguous. Dh a multiple of 32. Returns 0, -1 when out
 * of memory, -2 for a shape it does not take. */
BF_TARGET int mx_prompt_attention(const float *q, const int64_t *qs, const float *k, const int64_t *ks, const float *v,
                                  const int64_t *vs, const int64_t *pos, int64_t B, int64_t T, int64_t H, int64_t G,
                                  int64_t S, int64_t Dh, int64_t window, float *out) {
    if (Dh % 32 || H % G) return -2;
    const int64_t R = H / G, Sp = (S + PA_CHUNK - 1) / PA_CHUNK * PA_CHUNK, C = Dh / 2;
    const int64_t groups = (T * R + PA_ROWS - 1) / PA_ROWS;
    const float scale = 1.0f / sqrtf((float)Dh);
    uint32_t *keys = aligned_alloc(64, sizeof(uint32_t) * Sp * C);
    uint16_t *values = aligned_alloc(64, sizeof(uint16_t) * Sp * Dh);
    int status = keys && values ? 0 : -1;
    for (int64_t bg = 0; bg < B * G && !status; bg++) {
        const int64_t b = bg / G, g = bg % G;
        const int64_t blocks = Sp / 16;
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < blocks; i++) {
                const int64_t j0 = 16 * i, n = S - j0 < 0 ? 0 : (S - j0 < 16 ? S - j0 : 16);
                pack_keys(k + b * ks[0] + g * ks[1] + j0 * ks[2], ks[2], n, 16, Dh, keys + i * 16 * C);
                pack_values(v + b * vs[0] + g * vs[1] + j0 * vs[2], vs[2], n, 16, Dh, values + j0 * Dh);
            }
            uint32_t *rows = aligned_alloc(64, sizeof(uint32_t) * PA_ROWS * C);
            float *o = aligned_alloc(64, sizeof(float) * PA_ROWS * Dh);
            if (!rows || !o) {
#pragma omp atomic write
                status = -1;
            }
#pragma omp for schedule(dynamic, 4)
            for (int64_t i = 0; i < groups; i++) {
                if (!rows || !o) continue;
                int64_t lo[PA_ROWS], hi[PA_ROWS], c0 = INT64_MAX, c1 = -1;
                float *dst[PA_ROWS];
                for (int r = 0; r < PA_ROWS; r++) {
                    const int64_t row = i * PA_ROWS + r;
                    if (row >= T * R) {
                        lo[r] = 0, hi[r] = -1, dst[r] = NULL;
                        memset(rows + r * C, 0, sizeof(uint32_t) * C);
                        continue;
                    }
                    const int64_t t = row / R, h = g * R + row % R, p = pos[b * T + t];
                    hi[r] = p < S - 1 ? p : S - 1;
                    lo[r] = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
                    dst[r] = out + ((b * T + t) * H + h) * Dh;
                    const float *src = q + b * qs[0] + t * qs[1] + h * Dh;
                    for (int64_t d = 0; d < Dh; d += 32)
                        _mm512_storeu_si512(rows + r * C + d / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + d + 16), _mm512_loadu_ps(src + d)));
                    if (hi[r] >= lo[r]) {
                        c0 = lo[r] / PA_CHUNK < c0 ? lo[r] / PA_CHUNK : c0;
                        c1 = hi[r] / PA_CHUNK > c1 ? hi[r] / PA_CHUNK : c1;
                    }
                }
                attend_rows(rows, keys, values, Dh, scale, lo, hi, c0, c1, o, dst);
            }
            free(rows);
            free(o);
        }
    }
    free(keys);
    free(values);
    return status;
}

/* y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * weight, for M rows of D. */
void mx_rmsnorm(const float *x, int64_t M, int64_t D, const float *weight, float eps, float *y) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * D;
        const float scale = 1.0f / sqrtf(dot(row, row, D) / (float)D + eps);
        for (int64_t d = 0; d < D; d++) y[m * D + d] = row[d] * scale * weight[d];
    }
}

/* One decoder block for one new token of each of B sequences (see mx_attention for pos, rows and the caches). */
typedef struct {
    weight_t q, k, v, o, router, w1, w3, w2; /* router.n == 0: a dense SwiGLU MLP instead of experts */
    const float *attn_norm, *ffn_norm;       /* fp32 (D,) */
    double eps, theta;
    int64_t n_heads, n_kv_heads, head_dim, window, top_k;
    const store_t *store;                    /* NULL: every expert in memory */
} layer_t;

/* sizeof(weight_t), sizeof(store_t), sizeof(layer_t) into out[0..2]: native_lib.py checks them against its ctypes
 * mirrors before it calls anything, so a library built from another version's source is refused, not misread. */
void mx_struct_sizes(int64_t *out) {
    out[0] = (int64_t)sizeof(weight_t);
    out[1] = (int64_t)sizeof(store_t);
    out[2] = (int64_t)sizeof(layer_t);
}

/* x (B, D) += attention(norm(x)); x += feed-forward(norm(x)). The router's logits, choices and weights go to
 * logits (B, E), ids (B, top_k), mix (B, top_k) for a mixture of experts. Returns 0, -1 when out of memory, -5 when
 * the layer's expert store failed. */
static int decode_layer(const layer_t *L, float *x, int64_t B, const int64_t *pos, const int64_t *rows,
                    float *k_cache, float *v_cache, int64_t s_max, float *logits, int64_t *ids, float *mix,
                    int mode) {
    const int64_t D = L->q.k, H = L->n_heads, G = L->n_kv_heads, Dh = L->head_dim, width = (H + 2 * G) * Dh;
    const int64_t I = L->w1.n;
    float *h = malloc(sizeof(float) * B * D), *qkv = malloc(sizeof(float) * B * width);
    float *attn = malloc(sizeof(float) * B * H * Dh);
    float *h1 = L->router.n ? NULL : malloc(sizeof(float) * B * I), *h3 = L->router.n ? NULL : malloc(sizeof(float) * B * I);
    int status = -1;
    if (!h || !qkv || !attn || (!L->router.n && (!h1 || !h3))) goto done;
    mx_rmsnorm(x, B, D, L->attn_norm, (float)L->eps, h);
    const job_t proj[3] = {{&L->q, 0, h, qkv, 0}, {&L->k, 0, h, qkv + H * Dh, 0}, {&L->v, 0, h, qkv + (H + G) * Dh, 0}};
    /* every product of a decode step as at batch 1 (ROWS_EXACT): a row's numbers do not depend on its batch; a short
     * prompt's (ROWS_SHORT) on whichever kernel suits the shape */
    const linear_fn linear = products(mode);
    const product_t qkv_rows[3] = {{&L->q, 0, h, B, D, qkv, width, 0}, {&L->k, 0, h, B, D, qkv + H * Dh, width, 0},
                                   {&L->v, 0, h, B, D, qkv + (H + G) * Dh, width, 0}};
    if (B == 1 ? run_jobs(proj, 3) : run_products(qkv_rows, 3, mode)) goto done;
    if (mx_attention(qkv, B, H, G, Dh, pos, rows, k_cache, v_cache, s_max, L->window, (float)L->theta, attn)
        || linear(&L->o, 0, attn, B, H * Dh, x, D, 1))
        goto done;
    mx_rmsnorm(x, B, D, L->ffn_norm, (float)L->eps, h);
    if (L->router.n) {
        const int failed = moe(h, B, &L->router, &L->w1, &L->w3, &L->w2, L->top_k, 0, L->router.n, x, logits, ids,
                               mix, mode, L->store);
        if (failed) { status = failed; goto done; }
    } else {
        if (linear(&L->w1, 0, h, B, D, h1, I, 0) || linear(&L->w3, 0, h, B, D, h3, I, 0)) goto done;
        silu_times(h1, h3, B * I);
        if (linear(&L->w2, 0, h1, B, I, x, D, 1)) goto done;
    }
    status = 0;
done:
    free(h); free(qkv); free(attn); free(h1); free(h3);
    return status;
}

void mx_logsumexp(const float *x, int64_t M, int64_t n, double *out);

/* out[m] = the index of the largest of x[m] (M rows of n), NaN counted as -inf; the first one on ties; 0 when
 * nothing is above -inf. What greedy decoding picks (sampling.py: a NaN logit is never chosen). */
void mx_argmax(const float *x, int64_t M, int64_t n, int64_t *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * n;
        int nan;
        const float top = max_of(row, n, 0, &nan);
        int64_t i = 0;
        if (top != -INFINITY) {
            const __m256 t8 = _mm256_set1_ps(top);
            for (; i + 8 <= n; i += 8) {
                const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), t8, _CMP_EQ_OQ));
                if (hit) break;
            }
            while (row[i] != top) i++; /* within the 8 that hit, or the tail */
        }
        out[m] = i;
    }
}

/* A whole decode step for one new token of each of B sequences: the embedding of tokens[b] (into x, (B, D)), every
 * block (layer i's caches k_caches[i] and v_caches[i]; its router's logits, choices and weights at i * B * E,
 * i * B * top_k, i * B * top_k), the final norm and the output projection into out (B, V), then each row's
 * log(sum(exp(logits))) into lse and greedy choice (mx_argmax) into best. One call per step: between calls from
 * Python the weights just streamed have pushed the interpreter's own data out of the caches, so each Python
 * statement in between is slow. Tokens, positions (< s_max) and cache rows (< cache_rows) are checked before
 * anything is written. Returns 0; -1 when out of memory; -2, -3, -4 for a token, position or cache row out of range;
 * -5 when a layer's expert store failed (store_t); -6 for a head row out of range.
 *
 * The same call runs a short prompt (or a chunk of one) in one go: its T tokens are T rows of the same cache row
 * at consecutive positions (every row's key and value are written before any row attends, and each attends up to
 * its own position: causal). mode picks the kernels of the products (`products`: ROWS_EXACT for decode, ROWS_SHORT
 * for a short prompt). head_rows, when not NULL, names the n_head rows whose logits are wanted (out, lse and best
 * then have n_head rows), so a prompt pays for the output projection of its last token only. */
int mx_decode(const layer_t *layers, int64_t n_layers, const weight_t *embed, const int64_t *tokens, float *x,
              int64_t B, const int64_t *pos, const int64_t *rows, int64_t cache_rows, float *const *k_caches,
              float *const *v_caches, int64_t s_max, int64_t E, int64_t top_k, float *logits, int64_t *ids,
              float *mix, const float *norm, float eps, const weight_t *head, float *out, double *lse, int64_t *best,
              const int64_t *head_rows, int64_t n_head, int mode) {
    const int64_t D = head->k, V = head->n;
    for (int64_t b = 0; b < B; b++) {
        if (tokens[b] < 0 || tokens[b] >= embed->n) return -2;
        if (pos[b] < 0 || pos[b] >= s_max) return -3;
        if (rows[b] < 0 || rows[b] >= cache_rows) return -4;
    }
    if (head_rows == NULL) n_head = B;
    for (int64_t i = 0; head_rows && i < n_head; i++)
        if (head_rows[i] < 0 || head_rows[i] >= B) return -6;
    for (int64_t b = 0; b < B; b++) {
        int64_t stride;
        const float *row = widen(embed, 0, tokens[b], 1, 0, D, x + b * D, &stride);
        if (row != x + b * D) memcpy(x + b * D, row, sizeof(float) * D);
    }
    for (int64_t i = 0; i < n_layers; i++) {
        const int status = decode_layer(&layers[i], x, B, pos, rows, k_caches[i], v_caches[i], s_max,
                                        logits + i * B * E, ids + i * B * top_k, mix + i * B * top_k, mode);
        if (status) return status;
    }
    float *h = malloc(sizeof(float) * n_head * D);
    if (!h) return -1;
    for (int64_t i = 0; i < n_head; i++)
        mx_rmsnorm(x + (head_rows ? head_rows[i] : i) * D, 1, D, norm, eps, h + i * D);
    const int status = products(mode)(head, 0, h, n_head, D, out, V, 0);
    free(h);
    if (status) return status;
    mx_logsumexp(out, n_head, V, lse);
    mx_argmax(out, n_head, V, best);
    return 0;
}

/* out[m] = log(sum(exp(x[m]))) for M rows of n, in double: the row's max plus the log of the sum of exp(x - max). Like
 * torch's log-softmax: NaN when the row holds a NaN or +inf (x - max is then NaN somewhere), -inf when every
 * entry is -inf. */
void mx_logsumexp(const float *x, int64_t M, int64_t n, double *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * n;
        int nan;
        const float top = max_of(row, n, 0, &nan);
        if (nan || top == INFINITY) { out[m] = NAN; continue; }
        if (top == -INFINITY) { out[m] = -INFINITY; continue; }
        const __m256 t8 = _mm256_set1_ps(top);
        __m256 sum8 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) sum8 = _mm256_add_ps(sum8, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + i), t8)));
        float sum = hsum(sum8);
        for (; i < n; i++) sum += expf(row[i] - top);
        out[m] = (double)top + log((double)sum); /* in double: logit - out keeps small log-probs exact */
    }
}
