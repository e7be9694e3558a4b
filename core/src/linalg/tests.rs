use super::*;
use alloc::vec::Vec;
use ndarray::Array2;
use rand::RngExt;

fn random(m: usize, n: usize, seed: u64) -> Array2<f64> {
    let mut rng = crate::rng::stream(seed, &[b"linalg-test"]);
    Array2::from_shape_fn((m, n), |_| rng.random::<f64>() * 2.0 - 1.0)
}

/// m x r orthonormal columns by modified Gram-Schmidt (twice), independent of the code under test.
fn orthonormal(m: usize, r: usize, seed: u64) -> Array2<f64> {
    let mut q = random(m, r, seed);
    for _ in 0..2 {
        for j in 0..r {
            for i in 0..j {
                let d = q.column(i).dot(&q.column(j));
                let ci = q.column(i).to_owned();
                q.column_mut(j).scaled_add(-d, &ci);
            }
            let n = q.column(j).dot(&q.column(j)).sqrt();
            q.column_mut(j).mapv_inplace(|x| x / n);
        }
    }
    q
}

fn max_abs(a: &Array2<f64>) -> f64 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn assert_orthonormal_columns(q: &Array2<f64>, tol: f64) {
    let g = q.t().dot(q);
    let err = max_abs(&(&g - &Array2::<f64>::eye(g.nrows())));
    assert!(err < tol, "Q^T Q - I: {err}");
}

fn reconstruct(d: &Svd) -> Array2<f64> {
    let us = &d.u * &d.s.view().insert_axis(ndarray::Axis(0));
    us.dot(&d.v.t())
}

#[test]
fn eig_of_the_second_difference_matrix() {
    // tridiag(-1, 2, -1): eigenvalues 2 - 2 cos(k pi / (n + 1)).
    let n = 40;
    let a = Array2::from_shape_fn((n, n), |(i, j)| match i.abs_diff(j) {
        0 => 2.0,
        1 => -1.0,
        _ => 0.0,
    });
    let e = sym_eig(a.view()).unwrap();
    for k in 1..=n {
        let want = 2.0 - 2.0 * (k as f64 * core::f64::consts::PI / (n + 1) as f64).cos();
        assert!((e.values[k - 1] - want).abs() < 1e-12, "eigenvalue {k}");
    }
    assert_orthonormal_columns(&e.vectors.t().to_owned(), 1e-12);
}

#[test]
fn eig_residuals_of_a_random_symmetric_matrix() {
    let b = random(60, 60, 1);
    let a = &b + &b.t();
    let e = sym_eig(a.view()).unwrap();
    for i in 0..60 {
        let v = e.vectors.row(i);
        let r = a.dot(&v) - &v * e.values[i];
        assert!(r.iter().all(|x| x.abs() < 1e-11), "residual of pair {i}");
    }
    assert!(e.values.windows(2).into_iter().all(|w| w[0] <= w[1]));
}

#[test]
fn svd_reconstructs_tall_and_wide_matrices() {
    for (m, n) in [(120, 40), (40, 120), (33, 33), (1, 5)] {
        let a = random(m, n, (m * 1000 + n) as u64);
        let d = svd(a.view()).unwrap();
        let r = m.min(n);
        assert_eq!(d.u.dim(), (m, r));
        assert_eq!(d.v.dim(), (n, r));
        let err = max_abs(&(reconstruct(&d) - &a));
        assert!(err < 1e-10, "{m}x{n}: reconstruction error {err}");
        assert_orthonormal_columns(&d.u, 1e-10);
        assert_orthonormal_columns(&d.v, 1e-10);
        assert!(d.s.windows(2).into_iter().all(|w| w[0] >= w[1]));
    }
}

#[test]
fn svd_finds_known_singular_values() {
    let (m, n) = (90, 30);
    let s: Vec<f64> = (0..n).map(|i| 10.0 * 0.7f64.powi(i as i32)).collect();
    let q = orthonormal(m, n, 7);
    let p = orthonormal(n, n, 8);
    let a = (&q * &ndarray::ArrayView1::from(&s).insert_axis(ndarray::Axis(0))).dot(&p.t());
    let d = svd(a.view()).unwrap();
    for i in 0..n {
        assert!((d.s[i] - s[i]).abs() < 1e-9 * s[0], "singular value {i}: {} vs {}", d.s[i], s[i]);
    }
    // Polar factor: Q P^T.
    let pol = polar(a.view()).unwrap();
    assert!(max_abs(&(&pol - &q.dot(&p.t()))) < 1e-8);
}

#[test]
fn rank_deficient_svd_still_has_orthonormal_factors() {
    let a = random(30, 5, 3).dot(&random(5, 20, 4));
    let d = svd(a.view()).unwrap();
    assert!(d.s[5] < 1e-6 * d.s[0]);
    assert_orthonormal_columns(&d.u, 1e-9);
    assert_orthonormal_columns(&d.v, 1e-9);
    assert!(max_abs(&(reconstruct(&d) - &a)) < 1e-9);
    let zero = Array2::<f64>::zeros((4, 3));
    let d = svd(zero.view()).unwrap();
    assert_orthonormal_columns(&d.u, 1e-12);
    assert!(d.s.iter().all(|&x| x == 0.0));
}

#[test]
fn f32_sized_matrix_reconstructs_to_1e_5() {
    // A ViT-like block shape, scaled down: 384 x 96.
    let a = random(384, 96, 9);
    let d = svd(a.view()).unwrap();
    let rel = max_abs(&(reconstruct(&d) - &a)) / max_abs(&a);
    assert!(rel < 1e-10, "relative error {rel}");
}

#[test]
fn spd_solve_residuals_and_the_semidefinite_fallback() {
    let b = random(25, 25, 11);
    let a = b.t().dot(&b) + Array2::<f64>::eye(25) * 0.1;
    let rhs = random(25, 3, 12);
    let x = solve_spd(a.view(), rhs.view()).unwrap();
    assert!(max_abs(&(a.dot(&x) - &rhs)) < 1e-10);
    // Rank 4 PSD matrix with a right-hand side in its range: the fallback solves it exactly.
    let c = random(25, 4, 13);
    let a = c.dot(&c.t());
    let rhs = a.dot(&random(25, 2, 14));
    let x = solve_spd(a.view(), rhs.view()).unwrap();
    assert!(max_abs(&(a.dot(&x) - &rhs)) < 1e-9);
    assert!(matches!(solve_spd(a.view(), random(3, 1, 1).view()), Err(LinalgError::Shape { .. })));
    let mut bad = a.clone();
    bad[[0, 0]] = f64::NAN;
    assert!(matches!(solve_spd(bad.view(), rhs.view()), Err(LinalgError::NotFinite { .. })));
}

#[test]
fn top_eigenpairs_equal_the_full_decomposition() {
    for (n, k, seed) in [(60usize, 7usize, 21u64), (33, 33, 22), (5, 1, 23), (1, 1, 24)] {
        let b = random(n, n, seed);
        let a = &b + &b.t();
        let full = sym_eig(a.view()).unwrap();
        let (values, vectors) = sym_eig_top(a.view(), k).unwrap();
        assert_eq!(vectors.dim(), (n, k));
        for c in 0..k {
            // The same QL iteration: the same eigenvalues, bit for bit.
            assert_eq!(values[c].to_bits(), full.values[n - 1 - c].to_bits(), "n {n} value {c}");
            let want = full.vectors.row(n - 1 - c);
            let got = vectors.column(c);
            let sign = if want.dot(&got) < 0.0 { -1.0 } else { 1.0 };
            let err = got.iter().zip(want.iter()).fold(0.0f64, |m, (g, w)| m.max((g - sign * w).abs()));
            assert!(err < 1e-10, "n {n} vector {c}: {err}");
            let r = a.dot(&got) - &got * values[c];
            assert!(r.iter().all(|x| x.abs() < 1e-10), "n {n} residual of pair {c}");
        }
        assert_orthonormal_columns(&vectors, 1e-12);
    }
    assert!(matches!(sym_eig_top(random(3, 3, 1).view(), 4), Err(LinalgError::Shape { .. })));
}

#[test]
fn top_singular_triplets_of_tall_wide_and_rank_deficient_matrices() {
    let deficient = random(40, 3, 31).dot(&random(3, 25, 32));
    for (a, k) in [(random(120, 40, 33), 9usize), (random(40, 120, 34), 40), (deficient, 6)] {
        let full = svd(a.view()).unwrap();
        let top = svd_top(a.view(), k).unwrap();
        let (m, n) = a.dim();
        assert_eq!((top.u.dim(), top.v.dim(), top.s.len()), ((m, k), (n, k), k));
        for i in 0..k {
            assert!((top.s[i] - full.s[i]).abs() < 1e-10 * full.s[0], "singular value {i}");
        }
        // U^T A V = diag(s), with orthonormal factors.
        let core = top.u.t().dot(&a).dot(&top.v);
        let want = Array2::from_diag(&top.s);
        assert!(max_abs(&(&core - &want)) < 1e-9 * full.s[0], "{m}x{n}: U^T A V");
        assert_orthonormal_columns(&top.u, 1e-9);
        assert_orthonormal_columns(&top.v, 1e-9);
    }
    assert!(matches!(svd_top(random(4, 3, 1).view(), 4), Err(LinalgError::Shape { .. })));
}
