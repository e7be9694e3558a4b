//! Average ranks with tie groups (`scipy.stats.rankdata(method='average')`).

use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Ordering;

/// Ranks 1..=n of finite `values` in input order, ties given the average of the ranks they span,
/// and the sizes of the tie groups (one entry per distinct value, in ascending value order).
/// `-0.0` and `0.0` are equal. Callers check finiteness first (a NaN would rank as equal to all).
pub fn average_ranks(values: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let n = values.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| values[a].partial_cmp(&values[b]).unwrap_or(Ordering::Equal));
    let mut ranks = vec![0.0; n];
    let mut groups = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = start + 1;
        while end < n && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Ordinal ranks start+1 ..= end; their average.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        groups.push(end - start);
        start = end;
    }
    (ranks, groups)
}

/// sum over tie groups of t^3 - t (the tie-correction term of the rank tests).
pub(crate) fn tie_term(groups: &[usize]) -> f64 {
    groups.iter().map(|&t| (t as f64) * (t as f64) * (t as f64) - t as f64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_ties_like_rankdata() {
        // scipy.stats.rankdata([3, 2, 1, 2, 2, 2, 1]) = [7, 4.5, 1.5, 4.5, 4.5, 4.5, 1.5].
        let (r, g) = average_ranks(&[3.0, 2.0, 1.0, 2.0, 2.0, 2.0, 1.0]);
        assert_eq!(r, [7.0, 4.5, 1.5, 4.5, 4.5, 4.5, 1.5]);
        assert_eq!(g, [2, 4, 1]);
        assert_eq!(tie_term(&g), 6.0 + 60.0);
        let (r, g) = average_ranks(&[-0.0, 0.0, -1.0]);
        assert_eq!(r, [2.5, 2.5, 1.0]);
        assert_eq!(g, [1, 2]);
        let (r, g) = average_ranks(&[]);
        assert!(r.is_empty() && g.is_empty());
    }
}
