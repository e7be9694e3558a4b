//! Dense linear algebra for the merging methods, in f64 and without LAPACK: the symmetric
//! eigen-decomposition (Householder tridiagonalisation + implicit QL, after JAMA/EISPACK
//! tred2/tql2), the thin SVD through the eigen-decomposition of the smaller Gram matrix, the polar
//! factor, and a solver for symmetric positive (semi)definite systems (Cholesky, with an
//! eigen-decomposition pseudo-inverse as the fallback). Products go through ndarray's `dot`
//! (matrixmultiply's dgemm).

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use ndarray::{Array1, Array2, ArrayView2, Axis};

/// Why a decomposition or a solve failed.
#[derive(Clone, Debug, PartialEq)]
pub enum LinalgError {
    /// A matrix has the wrong shape for the operation.
    Shape { what: &'static str, detail: String },
    /// A matrix holds a NaN or an infinity.
    NotFinite { what: &'static str },
    /// The QL iteration did not converge.
    NoConvergence,
}

impl fmt::Display for LinalgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinalgError::Shape { what, detail } => write!(f, "{what} has the wrong shape: {detail}"),
            LinalgError::NotFinite { what } => write!(f, "{what} holds a NaN or infinite value"),
            LinalgError::NoConvergence => write!(f, "the symmetric eigenvalue iteration did not converge"),
        }
    }
}

fn check_finite(a: &ArrayView2<'_, f64>, what: &'static str) -> Result<(), LinalgError> {
    if a.iter().all(|x| x.is_finite()) { Ok(()) } else { Err(LinalgError::NotFinite { what }) }
}

/// Eigen-decomposition of a symmetric matrix: `values` ascending, `vectors` row i = eigenvector i.
pub struct SymEig {
    pub values: Array1<f64>,
    /// n x n, one eigenvector per row.
    pub vectors: Array2<f64>,
}

/// Eigen-decomposition of the symmetric matrix `a` (only its values are read as given; it must be
/// symmetric).
pub fn sym_eig(a: ArrayView2<'_, f64>) -> Result<SymEig, LinalgError> {
    let n = a.nrows();
    if a.ncols() != n {
        return Err(LinalgError::Shape { what: "the symmetric matrix", detail: alloc::format!("{:?}", a.shape()) });
    }
    check_finite(&a, "the symmetric matrix")?;
    if n == 0 {
        return Ok(SymEig { values: Array1::zeros(0), vectors: Array2::zeros((0, 0)) });
    }
    // w is V stored column-major: V[k][j] = w[j * n + k]. For a symmetric input that is a itself.
    let mut w: Vec<f64> = a.iter().copied().collect();
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    tred2(n, &mut w, &mut d, &mut e, None);
    tql2(n, &mut d, &mut e, |i, c, s| {
        // Rotate eigenvector columns i and i + 1 (contiguous in w).
        let (a, b) = w.split_at_mut((i + 1) * n);
        let vi = &mut a[i * n..];
        let vi1 = &mut b[..n];
        for (x, y) in vi.iter_mut().zip(vi1.iter_mut()) {
            let hh = *y;
            *y = s * *x + c * hh;
            *x = c * *x - s * hh;
        }
    })?;
    // Sort ascending (tql2 leaves them nearly sorted).
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[i].total_cmp(&d[j]));
    let values = Array1::from_iter(order.iter().map(|&i| d[i]));
    let mut vectors = Array2::zeros((n, n));
    for (row, &i) in order.iter().enumerate() {
        vectors.row_mut(row).assign(&ndarray::ArrayView1::from(&w[i * n..(i + 1) * n]));
    }
    Ok(SymEig { values, vectors })
}

#[allow(clippy::needless_range_loop)]
/// Householder tridiagonalisation (JAMA tred2). With `reflectors` None, w ends as the orthogonal
/// factor Q; otherwise Q is not formed: `reflectors[i]` gets the h of the reflector
/// P = I - u u^T / h of accumulation step i, whose u stays in `w[(i + 1) n ..= (i + 1) n + i]`, and
/// Q = P_{n-2} ... P_0 (each acting on the leading i + 1 coordinates).
fn tred2(n: usize, w: &mut [f64], d: &mut [f64], e: &mut [f64], mut reflectors: Option<&mut [f64]>) {
    macro_rules! v {
        ($k:expr, $j:expr) => {
            w[($j) * n + ($k)]
        };
    }
    for j in 0..n {
        d[j] = v!(n - 1, j);
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for k in 0..i {
            scale += d[k].abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v!(i - 1, j);
                v!(i, j) = 0.0;
                v!(j, i) = 0.0;
            }
        } else {
            for k in 0..i {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            let mut f = d[i - 1];
            let mut g = libm::sqrt(h);
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for j in 0..i {
                e[j] = 0.0;
            }
            for j in 0..i {
                f = d[j];
                v!(j, i) = f;
                g = e[j] + v!(j, j) * f;
                let col = &w[j * n..j * n + i];
                for k in j + 1..i {
                    g += col[k] * d[k];
                    e[k] += col[k] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                let (f, g) = (d[j], e[j]);
                let col = &mut w[j * n..j * n + i];
                for k in j..i {
                    col[k] -= f * e[k] + g * d[k];
                }
                d[j] = v!(i - 1, j);
                v!(i, j) = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations.
    for i in 0..n - 1 {
        v!(n - 1, i) = v!(i, i);
        if let Some(r) = reflectors.as_deref_mut() {
            r[i] = d[i + 1];
            continue;
        }
        v!(i, i) = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v!(k, i + 1) / h;
            }
            for j in 0..=i {
                let (head, tail) = w.split_at_mut((i + 1) * n);
                let next = &tail[..=i];
                let col = &mut head[j * n..j * n + i + 1];
                let g: f64 = next.iter().zip(col.iter()).map(|(a, b)| a * b).sum();
                for k in 0..=i {
                    col[k] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v!(k, i + 1) = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v!(n - 1, j);
        v!(n - 1, j) = 0.0;
    }
    v!(n - 1, n - 1) = 1.0;
    e[0] = 0.0;
}

/// Implicit QL on the tridiagonal (d, e) (JAMA tql2); every plane rotation of the eigenvector
/// columns (i, i + 1) by (c, s) goes to `rotate` in the order it is applied.
fn tql2(n: usize, d: &mut [f64], e: &mut [f64], mut rotate: impl FnMut(usize, f64, f64)) -> Result<(), LinalgError> {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0f64;
    let mut tst1 = 0.0f64;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iter = 0;
            loop {
                iter += 1;
                if iter > 100 {
                    return Err(LinalgError::NoConvergence);
                }
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = libm::hypot(p, 1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let mut c = 1.0;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0;
                let mut s2 = 0.0;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = libm::hypot(p, e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    rotate(i, c, s);
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    Ok(())
}

/// A thin SVD A = U diag(s) V^T with r = min(m, n) triplets, s descending.
pub struct Svd {
    /// m x r, orthonormal columns.
    pub u: Array2<f64>,
    /// r singular values, descending, >= 0.
    pub s: Array1<f64>,
    /// n x r, orthonormal columns.
    pub v: Array2<f64>,
}

/// The thin SVD of `a` through the eigen-decomposition of the smaller Gram matrix. Left (or right)
/// vectors of singular values below `1e-10 * s_max` are completed to an orthonormal set.
pub fn svd(a: ArrayView2<'_, f64>) -> Result<Svd, LinalgError> {
    check_finite(&a, "the matrix")?;
    let (m, n) = a.dim();
    if m < n {
        let t = svd(a.t())?;
        return Ok(Svd { u: t.v, s: t.s, v: t.u });
    }
    // m >= n: G = A^T A (n x n).
    let gram = a.t().dot(&a);
    let eig = sym_eig(gram.view())?;
    let r = n;
    let mut v = Array2::zeros((n, r));
    for i in 0..r {
        v.column_mut(i).assign(&eig.vectors.row(r - 1 - i));
    }
    Ok(svd_from_right(a, v))
}

/// The k largest singular triplets of `a` (k <= min(m, n)): `u` m x k, `s` descending, `v` n x k,
/// through the top-k eigenpairs of the smaller Gram matrix ([`sym_eig_top`]); the same triplets
/// as the first k of [`svd`] (to rounding, and up to sign and the basis chosen inside repeated
/// singular values).
pub fn svd_top(a: ArrayView2<'_, f64>, k: usize) -> Result<Svd, LinalgError> {
    check_finite(&a, "the matrix")?;
    let (m, n) = a.dim();
    if k > m.min(n) {
        return Err(LinalgError::Shape {
            what: "the number of singular triplets",
            detail: alloc::format!("{k} for a {m} x {n} matrix"),
        });
    }
    if m < n {
        let t = svd_top(a.t(), k)?;
        return Ok(Svd { u: t.v, s: t.s, v: t.u });
    }
    let gram = a.t().dot(&a);
    let (_, v) = sym_eig_top(gram.view(), k)?;
    Ok(svd_from_right(a, v))
}

/// The k largest eigenpairs of the symmetric matrix `a`: values descending, vectors n x k (column
/// i belongs to value i). The tridiagonalisation does not form its orthogonal factor and the QL
/// iteration only records its rotations; both are then applied to the k wanted unit vectors only
/// (O(n^2 k) instead of O(n^3) for the eigenvectors). Same values and (to rounding) vectors as
/// [`sym_eig`].
pub fn sym_eig_top(a: ArrayView2<'_, f64>, k: usize) -> Result<(Array1<f64>, Array2<f64>), LinalgError> {
    let n = a.nrows();
    if a.ncols() != n || k > n {
        return Err(LinalgError::Shape {
            what: "the symmetric matrix",
            detail: alloc::format!("{:?} with {k} eigenpairs wanted", a.shape()),
        });
    }
    check_finite(&a, "the symmetric matrix")?;
    if k == 0 {
        return Ok((Array1::zeros(0), Array2::zeros((n, 0))));
    }
    let mut w: Vec<f64> = a.iter().copied().collect();
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    let mut hs = vec![0.0; n];
    tred2(n, &mut w, &mut d, &mut e, Some(&mut hs));
    let mut rotations: Vec<(u32, f64, f64)> = Vec::new();
    tql2(n, &mut d, &mut e, |i, c, s| rotations.push((i as u32, c, s)))?;
    // The same order as sym_eig (stable ascending sort), largest first.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[i].total_cmp(&d[j]));
    let wanted: Vec<usize> = (0..k).map(|c| order[n - 1 - c]).collect();
    let values = Array1::from_iter(wanted.iter().map(|&i| d[i]));
    // Y (n x k, row-major) = R_1 ... R_N E: the rotations in reverse order on the unit vectors.
    let mut y = vec![0.0f64; n * k];
    for (c, &j) in wanted.iter().enumerate() {
        y[j * k + c] = 1.0;
    }
    for &(i, c, s) in rotations.iter().rev() {
        let i = i as usize;
        let (a, b) = y.split_at_mut((i + 1) * k);
        let (yi, yi1) = (&mut a[i * k..], &mut b[..k]);
        for (x, z) in yi.iter_mut().zip(yi1.iter_mut()) {
            let (p, q) = (*x, *z);
            *x = c * p + s * q;
            *z = c * q - s * p;
        }
    }
    // Q Y with Q = P_{n-2} ... P_0: P_0 first.
    let mut g = vec![0.0f64; k];
    for (i, &h) in hs.iter().enumerate().take(n - 1) {
        if h == 0.0 {
            continue;
        }
        let u = &w[(i + 1) * n..(i + 1) * n + i + 1];
        g.fill(0.0);
        for (r, &uk) in u.iter().enumerate() {
            for (gc, &yc) in g.iter_mut().zip(&y[r * k..(r + 1) * k]) {
                *gc += uk * yc;
            }
        }
        for (r, &uk) in u.iter().enumerate() {
            let f = uk / h;
            for (yc, &gc) in y[r * k..(r + 1) * k].iter_mut().zip(&g) {
                *yc -= gc * f;
            }
        }
    }
    let vectors = Array2::from_shape_vec((n, k), y).expect("n x k");
    Ok((values, vectors))
}

/// The thin SVD of `a` (m >= n) from right singular vectors `v` (n x r, orthonormal, by
/// descending singular value): U = A V normalised, with the weak columns re-orthogonalised or
/// completed.
fn svd_from_right(a: ArrayView2<'_, f64>, mut v: Array2<f64>) -> Svd {
    let r = v.ncols();
    let mut u = a.dot(&v);
    // s_i = ||A v_i||: as accurate as v_i, unlike sqrt(lambda_i) for small values. Columns with
    // s_i > 1e-4 s_max are orthonormal to ~1e-8 after normalising; the smaller ones are
    // re-orthogonalised (twice) against the others, or completed when nothing is left of them.
    let mut s: Array1<f64> = (0..r).map(|i| libm::sqrt(u.column(i).dot(&u.column(i)))).collect();
    let smax = s.iter().fold(0.0f64, |m, &x| m.max(x));
    let mut good = vec![false; r];
    for i in 0..r {
        if s[i] > 1e-4 * smax {
            let norm = s[i];
            u.column_mut(i).mapv_inplace(|x| x / norm);
            good[i] = true;
        }
    }
    let mut weak = Vec::new();
    let mut order: Vec<usize> = (0..r).filter(|&i| !good[i]).collect();
    order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    for i in order {
        let mut x = u.column(i).to_owned();
        for _ in 0..2 {
            for j in (0..r).filter(|&j| good[j]) {
                let c = u.column(j);
                let d = c.dot(&x);
                x.scaled_add(-d, &c);
            }
        }
        let norm = libm::sqrt(x.dot(&x));
        if s[i] > 1e-13 * smax && norm > 0.5 * s[i] {
            u.column_mut(i).assign(&(x / norm));
            good[i] = true;
        } else {
            weak.push(i);
        }
    }
    complete(&mut u, &weak);
    for &i in &weak {
        s[i] = u.column(i).dot(&a.dot(&v.column(i))).abs().min(s[i]);
    }
    // Descending order.
    let mut order: Vec<usize> = (0..r).collect();
    order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    if order.iter().enumerate().any(|(k, &i)| k != i) {
        u = u.select(Axis(1), &order);
        v = v.select(Axis(1), &order);
        s = s.select(Axis(0), &order);
    }
    Svd { u, s, v }
}

/// Replace the columns `weak` of `q` (whose other columns are orthonormal) by unit vectors
/// orthogonal to every other column: Gram-Schmidt (twice) on the standard basis vectors.
fn complete(q: &mut Array2<f64>, weak: &[usize]) {
    if weak.is_empty() {
        return;
    }
    let (m, r) = q.dim();
    let mut good: Vec<bool> = vec![true; r];
    for &i in weak {
        good[i] = false;
    }
    let mut candidate = 0usize;
    for &i in weak {
        loop {
            let mut x = Array1::<f64>::zeros(m);
            x[candidate % m] = 1.0;
            candidate += 1;
            for _ in 0..2 {
                for j in (0..r).filter(|&j| good[j]) {
                    let c = q.column(j);
                    let dot = c.dot(&x);
                    x.scaled_add(-dot, &c);
                }
            }
            let norm = libm::sqrt(x.dot(&x));
            if norm > 1e-3 {
                q.column_mut(i).assign(&(x / norm));
                good[i] = true;
                break;
            }
            if candidate > 2 * m + r {
                // Cannot happen for r <= m; keep the column as it is.
                break;
            }
        }
    }
}

/// The polar factor of `a` (m x n): the orthonormal-columns (m >= n) or orthonormal-rows (m < n)
/// matrix U V^T of its thin SVD, the nearest such matrix to `a` in the Frobenius norm.
pub fn polar(a: ArrayView2<'_, f64>) -> Result<Array2<f64>, LinalgError> {
    let d = svd(a)?;
    Ok(d.u.dot(&d.v.t()))
}

/// Solve A X = B for a symmetric positive (semi)definite A (n x n), B (n x k). Cholesky first; when
/// a pivot is not positive (A singular or indefinite by rounding), the minimum-norm least-squares
/// solution through the eigen-decomposition, with eigenvalues below `1e-12 * max` treated as zero.
pub fn solve_spd(a: ArrayView2<'_, f64>, b: ArrayView2<'_, f64>) -> Result<Array2<f64>, LinalgError> {
    let n = a.nrows();
    if a.ncols() != n {
        return Err(LinalgError::Shape { what: "the system matrix", detail: alloc::format!("{:?}", a.shape()) });
    }
    if b.nrows() != n {
        return Err(LinalgError::Shape {
            what: "the right-hand side",
            detail: alloc::format!("{} rows for a {n} x {n} system", b.nrows()),
        });
    }
    check_finite(&a, "the system matrix")?;
    check_finite(&b, "the right-hand side")?;
    match cholesky(a) {
        Some(l) => Ok(cholesky_solve(&l, b)),
        None => {
            let eig = sym_eig(a)?;
            let max = eig.values.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let tol = max * 1e-12;
            // X = V^T-rows... vectors rows are eigenvectors: A = Q^T diag Q with Q = vectors.
            let mut y = eig.vectors.dot(&b);
            for (mut row, &l) in y.axis_iter_mut(Axis(0)).zip(eig.values.iter()) {
                let inv = if l > tol { 1.0 / l } else { 0.0 };
                row.mapv_inplace(|x| x * inv);
            }
            Ok(eig.vectors.t().dot(&y))
        }
    }
}

/// The lower Cholesky factor, or None when a pivot is not positive.
fn cholesky(a: ArrayView2<'_, f64>) -> Option<Array2<f64>> {
    let n = a.nrows();
    let max_diag = (0..n).fold(0.0f64, |m, i| m.max(a[[i, i]].abs()));
    let mut l = vec![0.0f64; n * n];
    for j in 0..n {
        let lj = &mut l[j * n..(j + 1) * n];
        let s = a[[j, j]] - lj[..j].iter().map(|x| x * x).sum::<f64>();
        if s <= max_diag * 1e-14 || !s.is_finite() {
            return None;
        }
        lj[j] = libm::sqrt(s);
        for i in j + 1..n {
            let (upper, lower) = l.split_at_mut(i * n);
            let (lj, li) = (&upper[j * n..j * n + j + 1], &mut lower[..n]);
            let dot: f64 = li[..j].iter().zip(&lj[..j]).map(|(x, y)| x * y).sum();
            li[j] = (a[[i, j]] - dot) / lj[j];
        }
    }
    Array2::from_shape_vec((n, n), l).ok()
}

fn cholesky_solve(l: &Array2<f64>, b: ArrayView2<'_, f64>) -> Array2<f64> {
    let n = l.nrows();
    let mut x = b.to_owned();
    // L Y = B.
    for i in 0..n {
        for j in 0..i {
            let c = l[[i, j]];
            let (head, mut tail) = x.view_mut().split_at(Axis(0), i);
            tail.row_mut(0).scaled_add(-c, &head.row(j));
        }
        let d = l[[i, i]];
        x.row_mut(i).mapv_inplace(|v| v / d);
    }
    // L^T X = Y.
    for i in (0..n).rev() {
        for j in i + 1..n {
            let c = l[[j, i]];
            let (mut head, tail) = x.view_mut().split_at(Axis(0), i + 1);
            head.row_mut(i).scaled_add(-c, &tail.row(j - i - 1));
        }
        let d = l[[i, i]];
        x.row_mut(i).mapv_inplace(|v| v / d);
    }
    x
}

#[cfg(test)]
mod tests;
