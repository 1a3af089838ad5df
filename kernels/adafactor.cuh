// adafactor.cuh: Adafactor (Shazeer & Stern 2018) as Keras 3 writes it (reference.adafactor):
// G = g^2 + eps_1; a variable of rank >= 2 keeps row and column means of G over its last
// two axes (r <- beta*r + (1-beta)*mean(G, -1), c likewise over axis -2) and rebuilds its
// second moment v = (r/mean(r)) * c from them; smaller ones keep v <- beta*v + (1-beta)*G.
// u = g/sqrt(v);  p <- p - alpha*(u/max(1, rms(u)/clip_threshold)), alpha =
// max(eps_2, rms(p))*rho, rms over the whole (decayed) variable.
// A whole-variable rule: its kernels are adafactor.cu (GPU) and adafactor_host.cpp (CPU).
// Scalars: rho = min(lr, 1/sqrt(t)), beta = 1 - t^beta_2_decay, 1-beta, eps_1, eps_2,
// clip_threshold. Slots: r, c (the factored statistics, flat, per-segment offsets in the
// table below), v (params-sized). Hyperparameters: beta_2_decay, epsilon_1, epsilon_2,
// clip_threshold, relative_step.
//
// The segment table (Adafactor._kernel_segments), FO_ADAFACTOR_FIELDS doubles per segment
// and one more row with the totals: [element offset, R (rows; -1: not factored), C
// (columns), r offset, c offset, leading offset]. A factored segment of shape (..., R, C)
// has L = size/(R*C) leading indices; its r entries (L*R, row-major) start at the r
// offset of the r slot, its c entries (L*C) at the c offset, its L row means at the
// leading offset of a scratch: the r and c slots are the NumPy executor's, so state_dicts
// move between executors.
#pragma once
#include "step.cuh"

#define FO_ADAFACTOR_FIELDS 6

struct adafactor {
    static FO_HD void scalars(const double* h, long long t, double lr, double, StepValues& v) {
        const double step = (double)t, bound = 1.0 / sqrt(step);
        v.c[0] = bound < lr ? bound : lr;  // Python's min(lr, 1/sqrt(t))
        v.c[1] = 1 - pow(step, h[0]);
        v.c[2] = 1 - v.c[1];
        v.c[3] = h[1], v.c[4] = h[2], v.c[5] = h[3];
    }

    template <typename T>
    static FO_HD T regulated(T g, const T* c) { return g * g + c[3]; }

    // An unfactored segment's second moment, element by element.
    template <typename T>
    static FO_HD void moment(T g, T& v, const T* c) { v = c[1] * v + c[2] * regulated(g, c); }

    // A row or column statistic from the sum of its `count` regulated squares.
    template <typename T>
    static FO_HD T statistic(T s, T sum, long long count, const T* c) {
        return c[1] * s + c[2] * (sum / (T)count);
    }

    // A factored segment's second moment at (row, column).
    template <typename T>
    static FO_HD T factored(T r, T r_mean, T c) { return (r / r_mean) * c; }

    // p (already decayed) moves by u = g/sqrt(v), with the segment's scale =
    // max(eps_2, rms(p)) and divisor = max(1, rms(u)/clip_threshold).
    template <typename T>
    static FO_HD void apply(T& p, T g, T v, T scale, T divisor, const T* c) {
        p -= (scale * c[0]) * ((g / fo_sqrt(v)) / divisor);
    }
};

// Where the elements of a factored, non-empty segment (table row `seg`) take their
// statistics from: element i's (leading index, row, column), then every `stride`-th
// element's by increments (the stride is split into leads, rows and columns once, so
// there is no integer division per element).
struct AdafactorWalk {
    long long rows, cols, lead, row, col, dl, dr, dc;

    // Standing still (for a segment that is not factored: never read).
    FO_HD AdafactorWalk() : rows(1), cols(1), lead(0), row(0), col(0), dl(0), dr(0), dc(0) {}

    FO_HD AdafactorWalk(const double* seg, long long i, long long stride) {
        rows = (long long)seg[1], cols = (long long)seg[2];
        const long long size = rows * cols, local = i - (long long)seg[0];
        lead = local / size, row = (local - lead * size) / cols;
        col = local - lead * size - row * cols;
        dl = stride / size, dr = (stride - dl * size) / cols;
        dc = stride - dl * size - dr * cols;
    }

    FO_HD void advance() {
        col += dc, row += dr, lead += dl;
        if (col >= cols) col -= cols, ++row;
        if (row >= rows) row -= rows, ++lead;
    }

    // The current element's entries in the r and c slots and in the row means.
    FO_HD long long r_at(const double* seg) const { return (long long)seg[3] + lead * rows + row; }
    FO_HD long long c_at(const double* seg) const { return (long long)seg[4] + lead * cols + col; }
    FO_HD long long l_at(const double* seg) const { return (long long)seg[5] + lead; }

    // v at the current element: (r / row mean) * c.
    template <typename T>
    FO_HD T v(const double* seg, const T* r, const T* c, const T* row_means) const {
        return adafactor::factored(r[r_at(seg)], row_means[l_at(seg)], c[c_at(seg)]);
    }
};

// The segment whose entries [table[s][field], table[s + 1][field]) hold entry q.
FO_HD long long adafactor_segment_of(const double* table, long long nsegments, int field,
                                     long long q) {
    // The last s with table[s][field] <= q (segments without entries come before it).
    long long lo = 0, hi = nsegments;
    while (hi - lo > 1) {
        const long long mid = (lo + hi) / 2;
        if ((long long)table[mid * FO_ADAFACTOR_FIELDS + field] <= q) lo = mid; else hi = mid;
    }
    return lo;
}

// The segment's scale and divisor from its sums of p^2 and u^2 (in double) over its
// `n` elements, as the reference's rms: sqrt(sum/n) in the math type.
template <typename T>
FO_HD void adafactor_scales(double p_sum, double u_sum, long long n, const Hyper& h, T* out) {
    const T rms_p = fo_sqrt((T)p_sum / (T)n), rms_u = fo_sqrt((T)u_sum / (T)n);
    out[0] = fo_max((T)h.rule[2], rms_p);
    out[1] = fo_max(T(1), rms_u / (T)h.rule[3]);
}
