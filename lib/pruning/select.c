/* kprune's exact selection on the CPU (lib/pruning/selection.py, lib/pruning/pruner.py).
 *
 * kprune_histogram: the two radix-histogram passes that find the k-th key.
 * kprune_select_store: the pass after them, when every key equal to the threshold is
 * selected: the mask bits (key <= threshold, 8 to a byte, least significant bit first)
 * and the zeroing of each selected weight and its optimizer states, in one pass.
 *
 * Keys are int32. Pass 1 counts every key by its top 16 bits (bin = (key >> 16) + 32768);
 * pass 2 counts, by their low 16 bits, only the keys whose top 16 bits are `high`. Each
 * pass reads the keys once and writes nothing else: what torch's version (shift, add,
 * compare, gather, bincount with its own min/max passes) did in several.
 *
 * `threads` POSIX threads each count a contiguous range into their own 65,536 bins,
 * which are then added into `hist` (int64, 65,536 bins, not cleared here). Returns -1,
 * counting nothing, if the counters cannot be allocated.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BINS 65536
#define MAX_THREADS 64

/* fn over work[0..threads): threads 1.. each on a POSIX thread, work[0] here; a range whose thread
 * could not start runs here too, in turn. work is an array of `size`-byte items. */
static void run_parallel(void *(*fn)(void *), void *work, size_t size, int threads)
{
    pthread_t ids[MAX_THREADS];
    char *item = work;
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&ids[started], NULL, fn, item + started * size) != 0)
            break;
    fn(item);
    for (int i = started; i < threads; i++)
        fn(item + i * size);
    for (int i = 1; i < started; i++)
        pthread_join(ids[i], NULL);
}

typedef struct {
    const int32_t *keys;
    int64_t begin, end;
    int low_pass;
    int32_t high;
    int64_t *hist;
    uint32_t *sub;                  /* COPIES x BINS counts of this thread's own */
} hist_work;

/* Pruned weights all carry one key and often half the weights are pruned: counting them into one
 * counter makes every increment wait for the one before. COPIES counters per bin, used in turn,
 * let COPIES increments of a hot bin run at once; they are added up at the end. */
#define COPIES 4

static void *count(void *arg)
{
    hist_work *w = arg;
    const int32_t *restrict k = w->keys;
    uint32_t *restrict s = w->sub;
    int64_t i = w->begin;
    if (!w->low_pass) {
        for (; i + COPIES <= w->end; i += COPIES)
            for (int c = 0; c < COPIES; c++)
                s[c * BINS + (k[i + c] >> 16) + 32768]++;
        for (; i < w->end; i++)
            s[(k[i] >> 16) + 32768]++;
    } else {
        const int32_t high = w->high;
        /* Branch-free: a key outside the bin adds 0 (which keys are inside is unpredictable). */
        for (; i + COPIES <= w->end; i += COPIES)
            for (int c = 0; c < COPIES; c++)
                s[c * BINS + (k[i + c] & 0xFFFF)] += (k[i + c] >> 16) == high;
        for (; i < w->end; i++)
            s[k[i] & 0xFFFF] += (k[i] >> 16) == high;
    }
    return NULL;
}

int kprune_histogram(const int32_t *keys, int64_t n, int low_pass, int32_t high, int64_t *hist, int threads)
{
    /* A thread's uint32 counters hold at most its range / COPIES (+1) keys: ranges are capped below. */
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 1 || n < (int64_t)1 << 18)  /* a thread's own bins cost more than it saves below this */
        threads = 1;
    const int64_t cap = (int64_t)1 << 32;  /* keys per range: COPIES x 2**30, far within uint32 */
    int64_t ranges = (n + cap - 1) / cap;
    if (ranges > threads)
        threads = ranges < MAX_THREADS ? (int)ranges : MAX_THREADS;
    hist_work work[MAX_THREADS];
    uint32_t *sub = calloc((size_t)threads * COPIES * BINS, sizeof(uint32_t));
    if (sub == NULL)
        return -1;
    int64_t per = (n + threads - 1) / threads;
    for (int i = 0; i < threads; i++) {
        int64_t begin = per * i < n ? per * i : n, end = per * (i + 1) < n ? per * (i + 1) : n;
        work[i] = (hist_work){keys, begin, end, low_pass, high, hist, sub + (int64_t)i * COPIES * BINS};
    }
    run_parallel(count, work, sizeof work[0], threads);
    for (int64_t j = 0; j < (int64_t)threads * COPIES; j++)
        for (int b = 0; b < BINS; b++)
            hist[b] += sub[j * BINS + b];
    free(sub);
    return 0;
}

typedef struct {
    const int32_t *keys;
    int64_t n, begin, end;          /* element range, begin a multiple of 8 */
    int32_t threshold;
    uint8_t *bits;
    float *const *targets;          /* the weight and its optimizer states, zeroed where selected */
    int ntargets;
} select_work;

#define BLOCK 4096                  /* elements per block: its keys stay in L1 for the zeroing loops */

static void *select_store(void *arg)
{
    const select_work *w = arg;
    const int32_t *restrict k = w->keys;
    const int32_t thr = w->threshold;
    for (int64_t b0 = w->begin; b0 < w->end; b0 += BLOCK) {
        int64_t b1 = b0 + BLOCK < w->end ? b0 + BLOCK : w->end;
        for (int64_t i = b0; i < b1; i += 8) {
            uint8_t byte = 0;
            for (int j = 0; j < 8 && i + j < w->n; j++)
                byte |= (uint8_t)((k[i + j] <= thr) << j);
            w->bits[i / 8] = byte;
        }
        for (int t = 0; t < w->ntargets; t++) {
            float *restrict x = w->targets[t];
            for (int64_t i = b0; i < b1; i++)
                x[i] = k[i] <= thr ? 0.0f : x[i];
        }
    }
    return NULL;
}

int kprune_select_store(const int32_t *keys, int64_t n, int32_t threshold, uint8_t *bits, float *const *targets,
                        int ntargets, int threads)
{
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 1 || n < (int64_t)1 << 16)
        threads = 1;
    select_work work[MAX_THREADS];
    int64_t per = (n + threads - 1) / threads;
    per = (per + 63) / 64 * 64;     /* whole bytes of bits and whole cache lines per thread */
    for (int i = 0; i < threads; i++) {
        int64_t begin = per * i < n ? per * i : n, end = per * (i + 1) < n ? per * (i + 1) : n;
        work[i] = (select_work){keys, n, begin, end, threshold, bits, targets, ntargets};
    }
    run_parallel(select_store, work, sizeof work[0], threads);
    return 0;
}

/* kprune_nm_cap: N:M structure (lib/pruning/structure.py nm_cap_). keys viewed as
 * [rows, groups, m, rest] (rest: a convolution's kernel positions, 1 for a Linear); in every
 * group of m keys along dim 2, all but the m - n lowest become INT32_MAX. Ranks as the torch
 * version: position j ranks before l > j when keys[j] <= keys[l] (an equal key earlier in the
 * group first). One pass over the keys, `threads` threads over contiguous ranges of groups;
 * m is a compile-time constant in the loop (4 or 8), so the comparisons unroll. */
typedef struct {
    int32_t *keys;
    int64_t begin, end, rest;
    int m, keep;
} nm_work;

#define NM_CAP_LOOP(M)                                                              \
    for (int64_t g = w->begin; g < w->end; g++) {                                   \
        int32_t *base = w->keys + g * (int64_t)(M) * w->rest;                       \
        for (int64_t t = 0; t < w->rest; t++) {                                     \
            int32_t v[M];                                                           \
            int rank[M];                                                            \
            for (int j = 0; j < (M); j++) { v[j] = base[(int64_t)j * w->rest + t]; rank[j] = 0; } \
            for (int j = 0; j < (M); j++)                                           \
                for (int l = j + 1; l < (M); l++) {                                 \
                    int first = v[j] <= v[l];                                       \
                    rank[l] += first;                                               \
                    rank[j] += !first;                                              \
                }                                                                   \
            for (int j = 0; j < (M); j++)                                           \
                if (rank[j] >= w->keep) base[(int64_t)j * w->rest + t] = INT32_MAX;  \
        }                                                                           \
    }

/* 2:4 and 1:4 of a Linear (rest 1, m 4), the common case: the same ranks, branch-free. */
static void nm_cap4_rows(nm_work *w)
{
    const int32_t cap = INT32_MAX;
    int keep = w->keep;
    for (int64_t g = w->begin; g < w->end; g++) {
        int32_t *k = w->keys + g * 4;
        int32_t a = k[0], b = k[1], c = k[2], d = k[3];
        int ra = (a > b) + (a > c) + (a > d);
        int rb = (b >= a) + (b > c) + (b > d);
        int rc = (c >= a) + (c >= b) + (c > d);
        int rd = (d >= a) + (d >= b) + (d >= c);
        k[0] = ra >= keep ? cap : a;
        k[1] = rb >= keep ? cap : b;
        k[2] = rc >= keep ? cap : c;
        k[3] = rd >= keep ? cap : d;
    }
}

static void *nm_cap(void *arg)
{
    nm_work *w = arg;
    if (w->m == 4 && w->rest == 1) nm_cap4_rows(w);
    else if (w->m == 4) { NM_CAP_LOOP(4) }
    else { NM_CAP_LOOP(8) }  /* kprune's M is 4 or 8: the caller passes nothing else */
    return NULL;
}

void kprune_nm_cap(int32_t *keys, int64_t groups, int m, int64_t rest, int n, int threads)
{
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (groups < 65536) threads = 1;
    nm_work work[MAX_THREADS];
    for (int i = 0; i < threads; i++)
        work[i] = (nm_work){keys, groups * i / threads, groups * (i + 1) / threads, rest, m, m - n};
    run_parallel(nm_cap, work, sizeof work[0], threads);
}
