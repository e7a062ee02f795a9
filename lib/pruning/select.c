/* kprune's exact selection on the CPU (lib/pruning/selection.py, lib/pruning/update_pass.py).
 *
 * kprune_score_keys: an element-wise score (lib/pruning/scores.py's formulas, one rounding per
 * operation in the same order; square roots correctly rounded) turned into its int32 selection
 * key, pruned weights given the lowest key, and optionally the first radix histogram counted,
 * all in one pass that reads the weight and the optimizer states it needs and writes the key.
 * kprune_histogram: the radix-histogram passes that find the k-th key.
 * kprune_score_window: where a sample says a window [lo, hi] of keys holds the k-th key, the pass that
 * scores the weights writes no keys: it writes the mask bits of the keys below lo, counts them, and
 * keeps the few keys inside the window with their positions, all into the buffer the keys would have
 * taken; kprune_window_set then sets the bits of the kept keys below the threshold found among them,
 * and kprune_zero_selected zeroes the selected weights. No pass reads the keys again.
 * kprune_sample_keys: the keys of a sample of the weights (a few cache lines each), for the window.
 * kprune_select_store: the pass after them: the mask bits (key <= threshold, 8 to a byte, least
 * significant bit first) and the zeroing of each selected weight (and of its optimizer states,
 * where the optimizer's step does not take them as 0 itself), in one pass; when only some of the
 * keys equal to the threshold are selected, it selects those below it and hands back where the
 * equal ones are (the caller picks and sets its share).
 * kprune_nm_cap: the N:M structure's cap on the keys.
 *
 * Keys are int32. Pass 1 counts every key by its top 16 bits (bin = (key >> 16) + 32768);
 * pass 2 counts, by their low 16 bits, only the keys whose top 16 bits are `high` (low_pass 2:
 * few keys lie in that bin, so groups of keys with none of them are skipped; low_pass 1: many do). Each
 * pass reads the keys once and writes nothing else: what torch's version (shift, add,
 * compare, gather, bincount with its own min/max passes) did in several.
 *
 * The counts go into counters (kprune_counters_new): each of up to `threads` POSIX threads
 * counts a contiguous range into its own COPIES x 65,536 uint32 bins, across every tensor of
 * a pass; kprune_counters_take adds them into `hist` (int64, 65,536 bins) once per pass.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BINS 65536
#define STRIDE (BINS + 16)          /* one copy's counters: the bins, then the slot keys outside pass 2's bin go to */
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

/* Pruned weights all carry one key and often half the weights are pruned: counting them into one
 * counter makes every increment wait for the one before. COPIES counters per bin, used in turn,
 * let COPIES increments of a hot bin run at once; they are added up at the end. */
#define COPIES 4

typedef struct {
    int threads;
    uint32_t *sub;                  /* threads x COPIES x STRIDE */
} counters;

/* Counters for passes of up to `threads` threads; NULL if there is no memory. A thread's uint32
 * counters hold at most the keys it counts / COPIES: kprune's pools are below 2**32 weights. */
void *kprune_counters_new(int threads)
{
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    counters *c = malloc(sizeof *c);
    if (c == NULL)
        return NULL;
    c->threads = threads;
    c->sub = calloc((size_t)threads * COPIES * STRIDE, sizeof(uint32_t));
    if (c->sub == NULL) {
        free(c);
        return NULL;
    }
    return c;
}

/* hist += every count so far; returns how many of the keys of a pass 1 were exactly 0. The counters
 * start again from zero. */
int64_t kprune_counters_take(void *handle, int64_t *hist)
{
    counters *c = handle;
    int64_t zeros = 0;
    for (int64_t j = 0; j < (int64_t)c->threads * COPIES; j++) {
        uint32_t *s = c->sub + j * STRIDE;
        for (int b = 0; b < BINS; b++)
            hist[b] += s[b];
        zeros += s[BINS + 1];       /* ZEROS (defined with pass 1 below) */
    }
    memset(c->sub, 0, (size_t)c->threads * COPIES * STRIDE * sizeof(uint32_t));
    return zeros;
}

void kprune_counters_free(void *handle)
{
    counters *c = handle;
    if (c != NULL)
        free(c->sub);
    free(c);
}

/* Threads for a pass over n elements with these counters: one below `small` elements, where a
 * thread costs more than it saves. */
static int pass_threads(int threads, const counters *c, int64_t n, int64_t small)
{
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (c != NULL && threads > c->threads) threads = c->threads;
    if (threads < 1 || n < small) threads = 1;
    return threads;
}

/* [begin, end) of thread i of `threads` over n elements, in whole cache lines (64 elements). */
static void thread_range(int64_t n, int threads, int i, int64_t *begin, int64_t *end)
{
    int64_t per = ((n + threads - 1) / threads + 63) / 64 * 64;
    *begin = per * i < n ? per * i : n;
    *end = per * (i + 1) < n ? per * (i + 1) : n;
}

/* Pass 1 over keys [begin, end): each counted in the bin of its top 16 bits, and the keys that
 * are exactly 0 (scores of exactly +0.0) in the ZEROS slot: when the k-th key's bin holds nothing
 * else, it is 0 and pass 2 is not needed (the weights an earlier pruning zeroed, SPT's unexplored). */
#define ZEROS (BINS + 1)

static inline void count_high(uint32_t *restrict s, const int32_t *restrict k, int64_t begin, int64_t end)
{
    int64_t i = begin;
    uint32_t zeros = 0;
    for (; i + COPIES <= end; i += COPIES)
        for (int c = 0; c < COPIES; c++) {
            s[c * STRIDE + (k[i + c] >> 16) + 32768]++;
            zeros += k[i + c] == 0;
        }
    for (; i < end; i++) {
        s[(k[i] >> 16) + 32768]++;
        zeros += k[i] == 0;
    }
    s[ZEROS] += zeros;
}

#define GROUP 32                    /* keys tested at once in the filtered passes (two 64-byte vectors of keys) */

typedef struct {
    const int32_t *keys;
    int64_t begin, end;
    int low_pass;
    int32_t high;
    uint32_t *sub;                  /* COPIES x STRIDE counts of this thread's own */
} hist_work;


static void *count(void *arg)
{
    hist_work *w = arg;
    const int32_t *restrict k = w->keys;
    uint32_t *restrict s = w->sub;
    if (!w->low_pass) {
        count_high(s, k, w->begin, w->end);
        return NULL;
    }
    const int32_t high = w->high;
    int64_t i = w->begin;
    if (w->low_pass == 2) {
        /* Most keys lie outside the bin: a vectorised test of GROUP keys at a time, and only a group
         * that holds one of the bin's keys is counted (one L1-resident counter per key of the bin,
         * instead of a read-modify-write of a random counter of 1 MiB for every key). */
        for (; i + GROUP <= w->end; i += GROUP) {
            int inside = 0;
            for (int j = 0; j < GROUP; j++)
                inside |= (k[i + j] >> 16) == high;
            if (inside)
                for (int j = 0; j < GROUP; j++)
                    if ((k[i + j] >> 16) == high)
                        s[k[i + j] & 0xFFFF]++;
        }
    } else {
        /* Branch-free (which keys are inside is unpredictable when many are): a key outside the
         * bin is counted in the slot past the bins, which stays in L1 like the hot bins (adding 0 to
         * the bin of its low bits instead would touch a random counter of 1 MiB for every key). */
        for (; i + COPIES <= w->end; i += COPIES)
            for (int c = 0; c < COPIES; c++) {
                int32_t inside = -(int32_t)((k[i + c] >> 16) == high);  /* all ones or zero: no branch */
                s[c * STRIDE + ((k[i + c] & 0xFFFF & inside) | (BINS & ~inside))]++;
            }
    }
    for (; i < w->end; i++)
        s[k[i] & 0xFFFF] += (k[i] >> 16) == high;
    return NULL;
}

/* low_pass 0: pass 1; 1, 2: pass 2 of the keys whose top 16 bits are `high`. */
void kprune_histogram(const int32_t *keys, int64_t n, int low_pass, int32_t high, void *handle, int threads)
{
    counters *c = handle;
    threads = pass_threads(threads, c, n, (int64_t)1 << 18);
    hist_work work[MAX_THREADS];
    for (int i = 0; i < threads; i++) {
        work[i] = (hist_work){keys, 0, 0, low_pass, high, c->sub + (int64_t)i * COPIES * STRIDE};
        thread_range(n, threads, i, &work[i].begin, &work[i].end);
    }
    run_parallel(count, work, sizeof work[0], threads);
}

/* The element-wise scores of lib/pruning/scores.py, in their order of operations. */
enum { MAGNITUDE, BITTER0, BITTER3, BITTER5, BITTER6, BITTER7, BITTER8, BITTER9 };
#define EPS 1e-8f

static inline float sgn(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }
static inline float bitter3_(float w, float m) { return fabsf(sqrtf(fabsf(m) + EPS) * w); }
static inline float mtz(float w, float m, float v) { return sgn(w) * m / (sqrtf(v) + EPS); }

typedef struct {
    int formula;
    const float *w, *m, *v;
    int32_t *keys;
    const uint8_t *pruned;
    int64_t begin, end;
    float correction;
    uint32_t *sub;                  /* NULL: no histogram */
    int raw;                        /* the float scores themselves, not keys (a group structure sums them) */
} score_work;

#define SCORE_LOOP(EXPR)                                                \
    for (int64_t i = b0; i < b1; i++) {                                 \
        float s = (EXPR);                                               \
        int32_t bits;                                                   \
        memcpy(&bits, &s, sizeof bits);                                 \
        k[i] = raw ? bits : bits ^ ((bits >> 31) & 0x7FFFFFFF);         \
    }

#define SCORE_BLOCK 2048            /* keys of a block stay in L1 for the pruned and counting loops */

/* k[b0..b1) = the keys (raw: the float scores) of w[b0..b1) by `formula` */
static inline void score_range(int formula, const float *restrict w, const float *restrict m,
                               const float *restrict v, int32_t *restrict k, int64_t b0, int64_t b1,
                               float corr, int raw)
{
    switch (formula) {
    case MAGNITUDE: SCORE_LOOP(fabsf(w[i])) break;
    case BITTER0: SCORE_LOOP(w[i] * w[i] * fabsf(m[i]) / (sqrtf(v[i]) + EPS)) break;
    case BITTER3: SCORE_LOOP(bitter3_(w[i], m[i])) break;
    case BITTER5: SCORE_LOOP(fabsf(w[i]) * 0.1f - mtz(w[i], m[i], v[i])) break;
    case BITTER6: SCORE_LOOP(bitter3_(w[i], m[i]) * sqrtf(m[i] * m[i] / (v[i] + EPS))) break;
    case BITTER7: SCORE_LOOP(fabsf(sqrtf(sqrtf(fabsf(v[i]) + EPS)) * w[i])) break;
    case BITTER8: SCORE_LOOP(fabsf(sqrtf(fabsf(m[i]) / corr + EPS) * w[i])) break;
    case BITTER9: SCORE_LOOP(bitter3_(w[i], m[i]) - mtz(w[i], m[i], v[i]) * 0.1f) break;
    }
}

/* Pruned stays pruned: k[0..len), the keys of weights first.., become the lowest key where the bit is set. */
static inline void lowest_where_pruned(int32_t *restrict k, const uint8_t *restrict pruned, int64_t first, int64_t len)
{
    for (int64_t i = 0; i < len; i++)
        k[i] = (pruned[(first + i) >> 3] >> ((first + i) & 7)) & 1 ? INT32_MIN : k[i];
}

/* The byte of bits (least significant first) of which of k[0..count) (count <= 8) are <= thr. */
static inline __attribute__((always_inline)) uint8_t byte_at_most(const int32_t *restrict k, int count, int32_t thr)
{
    uint8_t byte = 0;
    for (int j = 0; j < count; j++)
        byte |= (uint8_t)((k[j] <= thr) << j);
    return byte;
}

/* A key equal to the tie at `position`: its position into tied (room for tied_max), counted in *tied_count
 * (atomically: threads share it), also past the room. */
static inline void note_tied(int64_t position, int64_t *tied, int64_t tied_max, int64_t *tied_count)
{
    int64_t slot = __atomic_fetch_add(tied_count, 1, __ATOMIC_RELAXED);
    if (slot < tied_max)
        tied[slot] = position;
}

static void *score_keys(void *arg)
{
    const score_work *a = arg;
    int32_t *restrict k = a->keys;
    for (int64_t b0 = a->begin; b0 < a->end; b0 += SCORE_BLOCK) {
        int64_t b1 = b0 + SCORE_BLOCK < a->end ? b0 + SCORE_BLOCK : a->end;
        score_range(a->formula, a->w, a->m, a->v, k, b0, b1, a->correction, a->raw);
        if (a->pruned != NULL)
            lowest_where_pruned(k + b0, a->pruned, b0, b1 - b0);
        if (a->sub != NULL)
            count_high(a->sub, k, b0, b1);
    }
    return NULL;
}

/* Keys of n weights by `formula` (m, v: the optimizer's moments, NULL where the formula reads none;
 * pruned: the mask bits or NULL), and with a handle their first histogram added to its counters.
 * A negative formula -1 - f writes formula f's float scores themselves (no key, pruned and handle
 * unused). Returns -1 for an unknown formula, writing nothing. */
int kprune_score_keys(int formula, const float *w, const float *m, const float *v, int32_t *keys,
                      const uint8_t *pruned, int64_t n, float correction, void *handle, int threads)
{
    int raw = formula < 0;
    if (raw) {
        formula = -1 - formula;
        pruned = NULL;
        handle = NULL;
    }
    if (formula < MAGNITUDE || formula > BITTER9)
        return -1;
    counters *c = handle;
    threads = pass_threads(threads, c, n, (int64_t)1 << 16);
    score_work work[MAX_THREADS];
    for (int i = 0; i < threads; i++) {
        work[i] = (score_work){formula, w, m, v, keys, pruned, 0, 0, correction,
                               c != NULL ? c->sub + (int64_t)i * COPIES * STRIDE : NULL, raw};
        thread_range(n, threads, i, &work[i].begin, &work[i].end);
    }
    run_parallel(score_keys, work, sizeof work[0], threads);
    return 0;
}

/* kprune_sample_keys: the keys of a sample of n weights (lib/pruning/window.py): `runs` runs of `len`
 * consecutive weights, the r-th starting at r * stride (runs * stride <= n), into out[runs * len], pruned
 * weights the lowest key, as kprune_score_keys writes them. Returns -1 for an unknown formula. */
int kprune_sample_keys(int formula, const float *w, const float *m, const float *v, const uint8_t *pruned,
                       int64_t runs, int64_t stride, int64_t len, float correction, int32_t *out)
{
    if (formula < MAGNITUDE || formula > BITTER9)
        return -1;
    for (int64_t r = 0; r < runs; r++) {
        int64_t base = r * stride;
        int32_t *k = out + r * len;
        score_range(formula, w + base, m != NULL ? m + base : NULL, v != NULL ? v + base : NULL, k, 0, len,
                    correction, 0);
        if (pruned != NULL)
            lowest_where_pruned(k, pruned, base, len);
    }
    return 0;
}

/* kprune_score_window: the keys of n weights, as kprune_score_keys computes them, sorted against a window
 * [lo, hi] (INT32_MIN < lo <= hi) instead of written. Each of up to `threads` threads scores a contiguous
 * part [begin, end) of the weights (begin a multiple of 64) and writes into the same part of `buffer`
 * (n int32: the memory the keys would have taken, a spent gradient):
 *   at byte 4 * begin: the part's mask bits of the keys below lo (8 to a byte, least significant first;
 *     pruned weights carry the lowest key, so their bits stay set), nbytes = (end - begin + 7) / 8;
 *   from int32 index first = begin + (nbytes + 3) / 4: room for cap = (end - first) / 2 keys inside the
 *     window, their keys at [first, first + cap) and their positions in the tensor at [first + cap, ...).
 * out[6 t ..]: thread t's begin, end, first, cap, the keys it kept (-1: more than cap, the part overflowed)
 * and the keys below lo. Returns the number of threads (parts), or -1 for an unknown formula. */
typedef struct {
    int formula;
    const float *w, *m, *v;
    const uint8_t *pruned;
    int32_t *buffer;
    int64_t n, begin, end;
    float correction;
    int32_t lo, hi;
    int64_t *out;
} window_work;

static void *score_window(void *arg)
{
    const window_work *a = arg;
    const uint32_t ulo = (uint32_t)a->lo, span = (uint32_t)a->hi - ulo;
    const int32_t lo = a->lo;
    int64_t nbytes = (a->end - a->begin + 7) / 8, first = a->begin + (nbytes + 3) / 4;
    int64_t cap = first < a->end ? (a->end - first) / 2 : 0, kept = 0, below = 0;
    uint8_t *bits = (uint8_t *)(a->buffer + a->begin);
    int32_t *keys = a->buffer + first, *where = a->buffer + first + cap;
    int32_t k[SCORE_BLOCK];         /* one block's keys, in L1 */
    for (int64_t b0 = a->begin; b0 < a->end && kept >= 0; b0 += SCORE_BLOCK) {  /* (an overflow ends the part) */
        int64_t len = (b0 + SCORE_BLOCK < a->end ? b0 + SCORE_BLOCK : a->end) - b0;
        score_range(a->formula, a->w + b0, a->m != NULL ? a->m + b0 : NULL, a->v != NULL ? a->v + b0 : NULL, k,
                    0, len, a->correction, 0);
        if (a->pruned != NULL)
            lowest_where_pruned(k, a->pruned, b0, len);
        for (int64_t i = 0; i < len; i += 8) {  /* (the tensor's last byte may be partial) */
            uint8_t byte = len - i >= 8 ? byte_at_most(k + i, 8, lo - 1) : byte_at_most(k + i, (int)(len - i), lo - 1);
            bits[(b0 - a->begin + i) >> 3] = byte;
            below += __builtin_popcount(byte);
        }
        /* Few keys lie in the window: a group without one is skipped after one vectorised test. */
        for (int64_t i = 0; i < len && kept >= 0; i += GROUP) {
            int64_t end = i + GROUP < len ? i + GROUP : len;
            int hit = 0;
            for (int64_t j = i; j < end; j++)
                hit |= (uint32_t)k[j] - ulo <= span;
            if (!hit)
                continue;
            for (int64_t j = i; j < end; j++)
                if ((uint32_t)k[j] - ulo <= span) {
                    if (kept == cap) {
                        kept = -1;
                        break;
                    }
                    keys[kept] = k[j];
                    where[kept++] = (int32_t)(b0 + j);
                }
        }
    }
    int64_t *o = a->out;
    o[0] = a->begin;
    o[1] = a->end;
    o[2] = first;
    o[3] = cap;
    o[4] = kept;
    o[5] = below;
    return NULL;
}

int kprune_score_window(int formula, const float *w, const float *m, const float *v, const uint8_t *pruned,
                        int64_t n, float correction, int32_t lo, int32_t hi, int32_t *buffer, int threads,
                        int64_t *out)
{
    if (formula < MAGNITUDE || formula > BITTER9)
        return -1;
    threads = pass_threads(threads, NULL, n, (int64_t)1 << 16);
    window_work work[MAX_THREADS];
    for (int i = 0; i < threads; i++) {
        work[i] = (window_work){formula, w, m, v, pruned, buffer, n, 0, 0, correction, lo, hi, out + 6 * i};
        thread_range(n, threads, i, &work[i].begin, &work[i].end);
    }
    run_parallel(score_window, work, sizeof work[0], threads);
    return threads;
}

/* After kprune_score_window, where the window held the k-th key: of `count` kept keys with their positions,
 * set the bits of those below `threshold` (with all_equal, also of those equal to it); without all_equal,
 * write offset + position of each key equal to it into tied (room for tied_max; *tied_count counts them
 * all): the caller takes its share of them. */
void kprune_window_set(uint8_t *bits, const int32_t *keys, const int32_t *where, int64_t count, int32_t threshold,
                       int all_equal, int64_t offset, int64_t *tied, int64_t tied_max, int64_t *tied_count)
{
    for (int64_t j = 0; j < count; j++) {
        int32_t key = keys[j], i = where[j];
        if (key < threshold || (all_equal && key == threshold))
            bits[i >> 3] |= (uint8_t)(1u << (i & 7));
        else if (!all_equal && key == threshold)
            note_tied(offset + i, tied, tied_max, tied_count);
    }
}

/* Every tensor of targets (n floats each) zeroed where its bit is set: x AND a byte's 8 lane masks, from
 * a table (8 KiB, in L1), so the loop is vectorised and every line is written back as it was read. */
static uint32_t keep_of_byte[256][8];

__attribute__((constructor)) static void fill_keep_of_byte(void)
{
    for (int b = 0; b < 256; b++)
        for (int j = 0; j < 8; j++)
            keep_of_byte[b][j] = (b >> j) & 1 ? 0u : ~0u;
}

typedef struct {
    const uint8_t *bits;
    float *const *targets;
    int ntargets;
    int64_t begin, end;
} zero_work;

static void *zero_selected(void *arg)
{
    const zero_work *z = arg;
    for (int t = 0; t < z->ntargets; t++) {
        uint32_t *restrict x = (uint32_t *)z->targets[t];
        int64_t i = z->begin;
        for (; i + 8 <= z->end; i += 8) {
            const uint32_t *keep = keep_of_byte[z->bits[i >> 3]];
            for (int j = 0; j < 8; j++)
                x[i + j] &= keep[j];
        }
        for (; i < z->end; i++)
            x[i] &= keep_of_byte[z->bits[i >> 3]][i & 7];
    }
    return NULL;
}

void kprune_zero_selected(const uint8_t *bits, float *const *targets, int ntargets, int64_t n, int threads)
{
    threads = pass_threads(threads, NULL, n, (int64_t)1 << 16);
    zero_work work[MAX_THREADS];
    for (int i = 0; i < threads; i++) {
        work[i] = (zero_work){bits, targets, ntargets, 0, 0};
        thread_range(n, threads, i, &work[i].begin, &work[i].end);
    }
    run_parallel(zero_selected, work, sizeof work[0], threads);
}

typedef struct {
    const int32_t *keys;
    int64_t n, begin, end;          /* element range, begin a multiple of 8 */
    int32_t threshold;              /* selected: key <= threshold */
    uint8_t *bits;
    float *const *targets;          /* the weight and its optimizer states, zeroed where selected */
    int ntargets;
    int32_t tie;                    /* with tied != NULL: the positions of the keys equal to it, offset + i, */
    int64_t offset, *tied, tied_max, *tied_count;  /* go to tied (a shared count, room for tied_max) */
} select_work;

#define BLOCK 4096                  /* elements per block: its keys stay in L1 for the zeroing loops */

static void *select_store(void *arg)
{
    const select_work *w = arg;
    const int32_t *restrict k = w->keys;
    const int32_t thr = w->threshold, tie = w->tie;
    for (int64_t b0 = w->begin; b0 < w->end; b0 += BLOCK) {
        int64_t b1 = b0 + BLOCK < w->end ? b0 + BLOCK : w->end;
        for (int64_t i = b0; i < b1; i += 8)
            w->bits[i / 8] = byte_at_most(k + i, w->n - i < 8 ? (int)(w->n - i) : 8, thr);
        for (int t = 0; t < w->ntargets; t++) {
            float *restrict x = w->targets[t];
            for (int64_t i = b0; i < b1; i++)
                x[i] = k[i] <= thr ? 0.0f : x[i];
        }
        if (w->tied == NULL)
            continue;
        /* The keys equal to the tie, from the block's keys while they are in L1: few, so a group of keys
         * without one is skipped after one vectorised test (kprune_find_equal's loop, without its pass). */
        int64_t i = b0;
        for (; i + GROUP <= b1; i += GROUP) {
            int hit = 0;
            for (int j = 0; j < GROUP; j++)
                hit |= k[i + j] == tie;
            if (hit)
                for (int j = 0; j < GROUP; j++)
                    if (k[i + j] == tie)
                        note_tied(w->offset + i + j, w->tied, w->tied_max, w->tied_count);
        }
        for (; i < b1; i++)
            if (k[i] == tie)
                note_tied(w->offset + i, w->tied, w->tied_max, w->tied_count);
    }
    return NULL;
}

/* tied: NULL, or room for tied_max positions of keys equal to `tie` (written as offset + i, in no particular
 * order; *tied_count counts them, also those beyond tied_max) */
int kprune_select_store(const int32_t *keys, int64_t n, int32_t threshold, uint8_t *bits, float *const *targets,
                        int ntargets, int threads, int32_t tie, int64_t offset, int64_t *tied, int64_t tied_max,
                        int64_t *tied_count)
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
        work[i] = (select_work){keys, n, begin, end, threshold, bits, targets, ntargets, tie, offset, tied, tied_max,
                                tied_count};
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
