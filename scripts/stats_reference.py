#!/usr/bin/env python3
"""Reference values for the statistics tests of mergeattack-core (core/src/stats/).

Maintainer script: prints the values scipy / numpy compute for fixed inputs; the Rust tests in
core/src/stats/*.rs embed these numbers (rounded-trip `repr` floats). Regenerate on purpose only:

    pip install scipy numpy && python3 scripts/stats_reference.py

The inputs below are built from small integer formulas (exact in binary floating point) that the
Rust tests rebuild the same way; each block says which Rust test uses it.
"""
import numpy as np
import scipy
from scipy import special, stats


def lin(n, mul, mod, off, scale=1.0):
    """x_i = ((i*mul) % mod - off) * scale for i = 1..n (exact small dyadic values)."""
    return np.array([((i * mul) % mod - off) * scale for i in range(1, n + 1)], dtype=np.float64)


def show(name, *vals):
    print(f"{name}: " + ", ".join(repr(float(v)) for v in vals))


print(f"# scipy {scipy.__version__}, numpy {np.__version__}")

print("\n## scipy.stats.wilcoxon(d) (defaults): statistic, pvalue")
wilcoxon_cases = {
    # exact branch (n <= 50, no ties, no zeros)
    "w_exact_10": np.array([1.5, -0.3, 2.1, 0.8, -1.2, 3.3, 0.45, -0.05, 1.9, 2.7]),
    "w_exact_30": lin(30, 37, 61, 30.25),
    "w_exact_50": lin(50, 37, 61, 30.25),
    "w_exact_all_pos_15": np.arange(1, 16, dtype=np.float64),
    # normal approximation without ties (len > 50)
    "w_normal_60": lin(60, 37, 61, 30.25),
    # permutation branch (ties or zeros, len <= 13)
    "w_perm_ties_8": np.array([1.0, -2.0, 2.0, 3.0, -1.0, 4.0, 2.0, -5.0]),
    "w_perm_zeros_12": np.array([0.0, 1.5, -0.5, 2.0, 0.0, 3.0, -2.0, 1.5, 4.0, 2.5, -1.0, 6.0]),
    "w_perm_ties_13": lin(13, 7, 11, 4.0),
    # normal approximation with ties / zeros (len > 13 with ties, or len > 50)
    "w_normal_ties_14": lin(14, 7, 11, 4.0),
    "w_normal_ties_20": lin(20, 7, 11, 5.0),
    "w_normal_ties_60": lin(60, 7, 11, 3.0, 0.5),
}
for name, d in wilcoxon_cases.items():
    r = stats.wilcoxon(d)
    show(name, r.statistic, r.pvalue)

print("\n## scipy.stats.spearmanr(x, y): statistic, pvalue")
spearman_cases = {
    "s_pos_ties": (np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10.0]), np.array([2, 1, 4, 3, 7, 5, 6, 9, 8, 9.0])),
    "s_neg_ties": (np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5.0]), np.array([2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4.0]) * -1.0),
    "s_n40": (lin(40, 13, 17, 0.0), lin(40, 7, 23, 0.0) - 0.5 * lin(40, 13, 17, 0.0)),
    "s_n3": (np.array([1.0, 2.0, 3.0]), np.array([2.0, 1.0, 3.0])),
    "s_strong_neg_n25": (lin(25, 1, 1000, 0.0), -lin(25, 1, 1000, 0.0) + lin(25, 3, 5, 0.0)),
}
for name, (x, y) in spearman_cases.items():
    r = stats.spearmanr(x, y)
    show(name, r.statistic, r.pvalue)

print("\n## scipy.stats.friedmanchisquare(*samples): statistic, pvalue; mean ranks (ascending in a block)")
friedman_cases = {
    "f_k4_n6_ties": [
        np.array([1.0, 2.0, 3.0, 4.0, 2.0, 1.0]),
        np.array([2.0, 2.0, 1.0, 4.0, 3.0, 2.0]),
        np.array([3.0, 1.0, 2.0, 1.0, 3.0, 3.0]),
        np.array([4.0, 3.0, 3.0, 2.0, 1.0, 4.0]),
    ],
    "f_k3_n10": [lin(10, 3, 7, 0.0), lin(10, 5, 11, 0.0) + 0.5, lin(10, 2, 13, 0.0) + 0.25],
    "f_k8_n42_ties": [lin(42, j + 2, 5 + j, 0.0) for j in range(8)],
}
for name, samples in friedman_cases.items():
    r = stats.friedmanchisquare(*samples)
    ranks = stats.rankdata(np.stack(samples, axis=1), axis=1)
    show(name, r.statistic, r.pvalue)
    show(name + " mean_ranks", *ranks.mean(axis=0))

print("\n## special functions")
show("ndtr(-1.959963984540054), ndtr(0.5), ndtr(-8), ndtr(3)",
     special.ndtr(-1.959963984540054), special.ndtr(0.5), special.ndtr(-8.0), special.ndtr(3.0))
show("stdtr(df, t) for (1,-2), (3,-0.5), (10,-2.228138851986274), (7.5,-4), (100,-6), (2,1.3)",
     special.stdtr(1, -2.0), special.stdtr(3, -0.5), special.stdtr(10, -2.228138851986274),
     special.stdtr(7.5, -4.0), special.stdtr(100, -6.0), special.stdtr(2, 1.3))
show("chdtrc(k, x) for (1,3.841458820694124), (2,1), (7,14.067140449340169), (5,0.3), (41,80), (3,25)",
     special.chdtrc(1, 3.841458820694124), special.chdtrc(2, 1.0), special.chdtrc(7, 14.067140449340169),
     special.chdtrc(5, 0.3), special.chdtrc(41, 80.0), special.chdtrc(3, 25.0))
show("betainc(a, b, x) for (2,3,0.4), (0.5,0.5,0.2), (10,0.5,0.9), (50,0.5,0.3), (1.5,20,0.05)",
     special.betainc(2, 3, 0.4), special.betainc(0.5, 0.5, 0.2), special.betainc(10, 0.5, 0.9),
     special.betainc(50, 0.5, 0.3), special.betainc(1.5, 20, 0.05))
show("gammaincc(a, x) for (0.5,2), (3,1), (10,15), (20.5,5), (1,30)",
     special.gammaincc(0.5, 2.0), special.gammaincc(3, 1.0), special.gammaincc(10, 15.0),
     special.gammaincc(20.5, 5.0), special.gammaincc(1, 30.0))

print("\n## numpy.percentile(v, q) (method 'linear')")
v37 = lin(37, 11, 37, 18.0, 0.125)
v1000 = lin(1000, 7919, 1009, 500.0, 0.001)
qs = [0.0, 2.5, 25.0, 50.0, 97.5, 100.0, 33.3]
show("v37 at " + str(qs), *np.percentile(v37, qs))
show("v1000 at " + str(qs), *np.percentile(v1000, qs))
