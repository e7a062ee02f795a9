/* kprune's Adam / AdamW step: one pass per parameter, masking and gradient clipping included.
 *
 * Per weight it reads w, g, m, v (and the AMSGrad maximum) and writes w, m, v:
 * the bytes torch's fused kernel moves, so a dense step costs what torch's
 * costs. With `mask` set, a weight that is exactly 0 (every pruned weight is)
 * takes its gradient as 0 inside the same pass: what a separate "zero the
 * gradients of pruned weights" pass did, without reading and writing the
 * gradients again. Every gradient is first multiplied by `grad_scale`, the
 * clipping coefficient (1 without clipping: exact), so clipping needs no pass
 * that rewrites the gradients either; the norm it is computed from is
 * kprune_grad_sumsq below, which reads the gradients as the step will use them.
 *
 * The arithmetic is written one IEEE float32 operation at a time in the order
 * of lib/fused_adam.py's reference (built with -ffp-contract=off, no fast-math),
 * so the two agree bit for bit; the reference is also what runs on CUDA.
 *
 * The work of one call (every tensor of a parameter group) is split into
 * `threads` contiguous ranges, one POSIX thread each; the caller runs the first.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef struct {
    float *w, *g, *m, *v, *vmax;   /* vmax: NULL without AMSGrad */
    int64_t n;
    float step_size;               /* lr / (1 - beta1^t) */
    float bc2_sqrt;                /* sqrt(1 - beta2^t) */
    int mask;                      /* gradient taken as 0 where w == 0 */
} adam_tensor;

typedef struct {
    float one_minus_beta1, beta2, one_minus_beta2, eps;
    float decay;                   /* AdamW: 1 - lr * weight_decay (1 when off) */
    float l2;                      /* Adam: weight_decay added as l2 * w to the gradient (0 when off) */
    float grad_scale;              /* the clipping coefficient every gradient is multiplied by (1: none) */
} adam_scalars;

typedef struct {
    const adam_tensor *tensors;
    int count;
    const adam_scalars *s;
    int64_t begin, end;            /* range of the concatenated elements */
} adam_work;

static inline __attribute__((always_inline)) uint32_t as_bits(float x)
{
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return b;
}

static inline __attribute__((always_inline)) float as_float(uint32_t b)
{
    float x;
    memcpy(&x, &b, sizeof x);
    return x;
}

/* All ones unless w is +0 or -0 (a pruned weight), computed with shifts: written as a comparison, gcc
 * turns it into a mask register and folds the select into a masked load of g, which ran 15-45% slower
 * (measured; AMD EPYC); as a select on a float comparison it stayed a scalar branch in the norm, which a
 * random mask mispredicts half the time (40x slower). ANDed with g's bits it gives g or +0. */
static inline __attribute__((always_inline)) uint32_t keep_bits(float w)
{
    return ~(uint32_t)((int32_t)((as_bits(w) & 0x7fffffffu) - 1) >> 31);
}

/* The loop, specialised below for each combination of (mask, AMSGrad, L2) so that no test of them
 * is left inside it: with them inside, the loop ran at half the speed of torch's fused step. */
static inline __attribute__((always_inline)) void loop(const adam_tensor *t, const adam_scalars *s, int64_t lo,
                                                       int64_t hi, const int mask, const int amsgrad, const int l2_on,
                                                       const int scaled)
{
    float *restrict w = t->w, *restrict g = t->g, *restrict m = t->m, *restrict v = t->v;
    float *restrict vmax = t->vmax;
    const float b1c = s->one_minus_beta1, b2 = s->beta2, b2c = s->one_minus_beta2, eps = s->eps;
    const float decay = s->decay, l2 = s->l2, step = -t->step_size, bc2 = t->bc2_sqrt, scale = s->grad_scale;
    for (int64_t i = lo; i < hi; i++) {
        float wi = w[i], gi, m0 = m[i], v0 = v[i], vmax0 = amsgrad ? vmax[i] : 0.0f;
        if (mask) {
            /* masked again after scaling: a pruned weight takes 0 even from a non-finite coefficient */
            uint32_t keep = keep_bits(wi);
            gi = as_float(as_bits(g[i]) & keep);
            if (scaled)
                gi = as_float(as_bits(gi * scale) & keep);
            /* and its moments are taken as 0 (the mask update zeroes only the weight): no extra memory
             * traffic, where zeroing them in the update read and wrote them once more */
            m0 = as_float(as_bits(m0) & keep);
            v0 = as_float(as_bits(v0) & keep);
            if (amsgrad)
                vmax0 = as_float(as_bits(vmax0) & keep);
        } else
            gi = scaled ? g[i] * scale : g[i];
        if (l2_on)
            gi = gi + l2 * wi;
        wi = wi * decay;            /* exact when decay is 1 */
        float mi = m0 + b1c * (gi - m0);
        float vi = b2 * v0 + b2c * (gi * gi);
        float vv = vi;
        if (amsgrad) {
            vv = vmax0 > vi ? vmax0 : vi;
            vmax[i] = vv;
        }
        float denom = sqrtf(vv) / bc2 + eps;
        w[i] = wi + step * (mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
}

/* A coefficient of exactly 1 (no clipping, or a norm within the limit: the coefficient is clamped to 1)
 * skips the multiply, which is exact anyway: measured, the masked loop with the multiply in it ran
 * 15-45% slower than without (123.5M weights, bench-pruning's tensors), the unmasked one ~35%. */
#define VARIANT(MASK, AMS, L2, SCALED)                                                                  \
    static void loop_##MASK##AMS##L2##SCALED(const adam_tensor *t, const adam_scalars *s, int64_t lo,   \
                                             int64_t hi)                                                \
    {                                                                                                   \
        loop(t, s, lo, hi, MASK, AMS, L2, SCALED);                                                      \
    }
VARIANT(0, 0, 0, 0) VARIANT(0, 0, 1, 0) VARIANT(0, 1, 0, 0) VARIANT(0, 1, 1, 0)
VARIANT(1, 0, 0, 0) VARIANT(1, 0, 1, 0) VARIANT(1, 1, 0, 0) VARIANT(1, 1, 1, 0)
VARIANT(0, 0, 0, 1) VARIANT(0, 0, 1, 1) VARIANT(0, 1, 0, 1) VARIANT(0, 1, 1, 1)
VARIANT(1, 0, 0, 1) VARIANT(1, 0, 1, 1) VARIANT(1, 1, 0, 1) VARIANT(1, 1, 1, 1)

static void run_range(const adam_tensor *t, const adam_scalars *s, int64_t lo, int64_t hi)
{
    static void (*const loops[16])(const adam_tensor *, const adam_scalars *, int64_t, int64_t) = {
        loop_0000, loop_0010, loop_0100, loop_0110, loop_1000, loop_1010, loop_1100, loop_1110,
        loop_0001, loop_0011, loop_0101, loop_0111, loop_1001, loop_1011, loop_1101, loop_1111};
    loops[(s->grad_scale != 1.0f) * 8 + (t->mask != 0) * 4 + (t->vmax != NULL) * 2 + (s->l2 != 0.0f)](t, s, lo, hi);
}

static void *run(void *arg)
{
    const adam_work *work = arg;
    int64_t offset = 0;
    for (int k = 0; k < work->count && offset < work->end; k++) {
        const adam_tensor *t = &work->tensors[k];
        int64_t lo = work->begin > offset ? work->begin - offset : 0;
        int64_t hi = work->end - offset < t->n ? work->end - offset : t->n;
        if (lo < hi)
            run_range(t, work->s, lo, hi);
        offset += t->n;
    }
    return NULL;
}

#define MAX_THREADS 256
#define ALIGN 64                    /* elements: whole cache lines per thread */

/* fn on each of `threads` work items (`size` bytes apart), the first in the caller's thread. */
static void run_parallel(void *(*fn)(void *), void *items, size_t size, int threads)
{
    pthread_t ids[MAX_THREADS];
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&ids[started], NULL, fn, (char *)items + started * size) != 0)
            break;
    fn(items);
    for (int i = started; i < threads; i++)  /* a thread that could not start: its item here */
        fn((char *)items + i * size);
    for (int i = 1; i < started; i++)
        pthread_join(ids[i], NULL);
}

int kprune_adam_step(const adam_tensor *tensors, int count, const adam_scalars *s, int threads)
{
    int64_t total = 0;
    for (int k = 0; k < count; k++)
        total += tensors[k].n;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 1 || total < (int64_t)1 << 16)  /* below ~256 KB a thread costs more than it saves */
        threads = 1;
    adam_work work[MAX_THREADS];
    int64_t per = (total + threads - 1) / threads;
    per = (per + ALIGN - 1) / ALIGN * ALIGN;
    for (int i = 0; i < threads; i++) {
        int64_t begin = per * i, end = per * (i + 1);
        work[i] = (adam_work){tensors, count, s, begin < total ? begin : total, end < total ? end : total};
    }
    run_parallel(run, work, sizeof work[0], threads);
    return 0;
}

/* The sum of squares of the gradients as the step uses them (for clipping's norm): where `mask` is
 * set, the entries whose weight is exactly 0 are left out. Squares and sums in double (a float's
 * square is exact there), and the same result for any thread count: each tensor is cut into blocks
 * of NORM_BLOCK elements, a block sums its elements into NORM_LANES running sums (element i into
 * sum i mod NORM_LANES, so the compiler can keep them in vector registers without reordering
 * anything) added in a fixed tree, and the blocks' sums are added in order by the caller's thread.
 * Threads only decide who computes which blocks. */
typedef struct {
    const float *w, *g;
    int64_t n;
    int mask;                      /* leave out the entries of pruned weights: */
    const uint8_t *pruned;         /* those whose bit is set (the pruner's mask bits); NULL: whose weight is 0 */
} norm_tensor;

#define NORM_BLOCK 8192
#define NORM_LANES 8

/* g where w != 0, else +0 (the step's mask, on the bits) */
static inline __attribute__((always_inline)) float kept(float g, float w)
{
    return as_float(as_bits(g) & keep_bits(w));
}

static inline __attribute__((always_inline)) double block_sumsq(const float *restrict w, const float *restrict g,
                                                                int64_t lo, int64_t hi, const int mask)
{
    double acc[NORM_LANES] = {0};
    int64_t i = lo;
    for (; i + NORM_LANES <= hi; i += NORM_LANES)
        for (int j = 0; j < NORM_LANES; j++) {
            double x = mask ? kept(g[i + j], w[i + j]) : g[i + j];
            acc[j] += x * x;
        }
    for (int j = 0; i < hi; i++, j++) {
        double x = mask ? kept(g[i], w[i]) : g[i];
        acc[j] += x * x;
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static double block_sumsq_masked(const float *w, const float *g, int64_t lo, int64_t hi)
{
    return block_sumsq(w, g, lo, hi, 1);
}

/* The same sum over the entries whose bit in `pruned` (8 to a byte, least significant first) is clear,
 * reading a byte per 8 entries instead of 8 weights; lo is a multiple of 8 (a block's start). Entry i + j
 * adds its rounded square to lane j, as in block_sumsq, so every version below gives the same sum bit for
 * bit (tests/lib/test_grad_clip.py builds both). With AVX2 a byte is widened to 8 lane masks by one
 * compare, and the sum runs as fast as the unmasked one (two threads, 124M entries: 0.95-0.98x). Without
 * it a byte's 8 AND masks come from a table (8 KiB, in L1): one vector load, where shifting the byte per
 * entry left the loop scalar, but 1.6-1.8x the unmasked sum. (AVX-512's masked load of g, with the byte
 * as its mask, was 2.8-3.1x: slower than the table.) */
static uint32_t keep_of_byte[256][8];

__attribute__((constructor)) static void fill_keep_of_byte(void)
{
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < 8; j++)
            keep_of_byte[b][j] = (b >> j) & 1 ? 0u : ~0u;
}

static double block_sumsq_bits(const uint8_t *restrict pruned, const float *restrict g, int64_t lo, int64_t hi)
{
    double acc[NORM_LANES] = {0};
    int64_t i = lo;
#if defined(__AVX2__)
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256d low = _mm256_setzero_pd(), high = _mm256_setzero_pd();
    for (; i + NORM_LANES <= hi; i += NORM_LANES) {
        __m256i set = _mm256_and_si256(_mm256_set1_epi32(pruned[i >> 3]), bit);
        __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, _mm256_setzero_si256()));
        __m256 x = _mm256_and_ps(_mm256_loadu_ps(g + i), keep);
        __m256d xl = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), xh = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
        low = _mm256_add_pd(low, _mm256_mul_pd(xl, xl));
        high = _mm256_add_pd(high, _mm256_mul_pd(xh, xh));
    }
    _mm256_storeu_pd(acc, low);
    _mm256_storeu_pd(acc + 4, high);
#else
    for (; i + NORM_LANES <= hi; i += NORM_LANES) {
        const uint32_t *keep = keep_of_byte[pruned[i >> 3]];
        for (int j = 0; j < NORM_LANES; j++) {
            double x = as_float(as_bits(g[i + j]) & keep[j]);
            acc[j] += x * x;
        }
    }
#endif
    for (int j = 0; i < hi; i++, j++) {
        double x = as_float(as_bits(g[i]) & keep_of_byte[pruned[i >> 3]][i & 7]);
        acc[j] += x * x;
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static double block_sumsq_plain(const float *w, const float *g, int64_t lo, int64_t hi)
{
    return block_sumsq(w, g, lo, hi, 0);
}

typedef struct {
    const norm_tensor *tensors;
    int count;
    int64_t first, last;           /* global block numbers [first, last) */
    double *sums;                  /* one per block, indexed by global block number */
} norm_work;

static int64_t blocks_of(int64_t n)
{
    return (n + NORM_BLOCK - 1) / NORM_BLOCK;
}

static void *run_norm(void *arg)
{
    const norm_work *work = arg;
    int64_t base = 0;              /* global number of tensor k's first block */
    for (int k = 0; k < work->count && base < work->last; k++) {
        const norm_tensor *t = &work->tensors[k];
        int64_t nb = blocks_of(t->n);
        for (int64_t b = work->first > base ? work->first - base : 0; b < nb && base + b < work->last; b++) {
            int64_t lo = b * NORM_BLOCK, hi = lo + NORM_BLOCK < t->n ? lo + NORM_BLOCK : t->n;
            work->sums[base + b] = !t->mask ? block_sumsq_plain(t->w, t->g, lo, hi)
                                   : t->pruned != NULL ? block_sumsq_bits(t->pruned, t->g, lo, hi)
                                                       : block_sumsq_masked(t->w, t->g, lo, hi);
        }
        base += nb;
    }
    return NULL;
}

/* Returns the sum of squares, or -1 if the block sums could not be allocated. */
double kprune_grad_sumsq(const norm_tensor *tensors, int count, int threads)
{
    int64_t blocks = 0, total = 0;
    for (int k = 0; k < count; k++) {
        blocks += blocks_of(tensors[k].n);
        total += tensors[k].n;
    }
    if (blocks == 0)
        return 0.0;
    double *sums = malloc(blocks * sizeof(double));
    if (sums == NULL)
        return -1.0;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 1 || total < (int64_t)1 << 16)  /* as the step: below ~256 KB one thread */
        threads = 1;
    if (threads > blocks)
        threads = (int)blocks;
    norm_work work[MAX_THREADS];
    int64_t per = (blocks + threads - 1) / threads;
    for (int i = 0; i < threads; i++) {
        int64_t first = per * i, last = per * (i + 1);
        work[i] = (norm_work){tensors, count, first < blocks ? first : blocks, last < blocks ? last : blocks, sums};
    }
    run_parallel(run_norm, work, sizeof work[0], threads);
    double sum = 0.0;
    for (int64_t b = 0; b < blocks; b++)  /* in block order, whatever the threads were */
        sum += sums[b];
    free(sums);
    return sum;
}
