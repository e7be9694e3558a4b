//! Every backward rule against central finite differences, run through ONNX Runtime in f64.

use std::borrow::Cow;

use ort::session::{Session, SessionInputValue};
use ort::value::Tensor;

use super::*;

/// A tiny deterministic generator for test data (xorshift64*), uniform in [lo, hi).
pub(crate) struct TestRng(u64);
impl TestRng {
    pub(crate) fn new(seed: u64) -> Self {
        TestRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        lo + (hi - lo) * ((r >> 11) as f64 / (1u64 << 53) as f64)
    }
    pub(crate) fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// An input fed to a test session.
#[derive(Clone, Debug)]
pub(crate) enum Feed {
    F64(Vec<usize>, Vec<f64>),
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<usize>, Vec<i64>),
}

/// The process's ONNX Runtime environment (`mergeattack setup` fetches the library).
pub(crate) fn env() -> &'static ort::environment::Environment {
    crate::library::environment().expect("ONNX Runtime library (run `mergeattack setup`)")
}

pub(crate) fn session(g: &Graph) -> Session {
    let b = Session::builder(env()).unwrap().with_intra_threads(1).unwrap();
    let mut b = super::custom::register(b).unwrap();
    super::custom::commit(&mut b, &g.to_bytes()).unwrap_or_else(|e| panic!("ORT rejected graph `{}`: {e}", g.name))
}

/// Run and return every requested output as f64 values.
pub(crate) fn run(s: &mut Session, feeds: &[(&str, Feed)], outputs: &[&str]) -> Vec<Vec<f64>> {
    let inputs: Vec<(Cow<str>, SessionInputValue)> = feeds
        .iter()
        .map(|(n, f)| {
            let v: SessionInputValue = match f {
                Feed::F64(s, d) => Tensor::from_array((s.clone(), d.clone())).unwrap().into(),
                Feed::F32(s, d) => Tensor::from_array((s.clone(), d.clone())).unwrap().into(),
                Feed::I64(s, d) => Tensor::from_array((s.clone(), d.clone())).unwrap().into(),
            };
            (Cow::Owned(n.to_string()), v)
        })
        .collect();
    let out = s.run(inputs).unwrap();
    outputs
        .iter()
        .map(|o| match out[*o].try_extract_tensor::<f64>() {
            Ok((_, d)) => d.to_vec(),
            Err(_) => out[*o].try_extract_tensor::<f32>().unwrap().1.iter().map(|&v| v as f64).collect(),
        })
        .collect()
}

/// Check `d(sum(R * f(x...)))/dx_i` from the graph against central differences, for float
/// inputs `xs` (shape, values) and fixed int64 inputs `ints`. `f` builds the function.
fn check(
    name: &str,
    xs: &[(&[usize], Vec<f64>)],
    ints: &[(&[usize], Vec<i64>)],
    f: impl Fn(&mut Graph, &[Value], &[Value]) -> Value,
) {
    check_in(ElemType::F64, name, xs, ints, f)
}

/// [`check`] in a chosen float type: f64 (step 1e-6, tolerance 1e-6 relative) or f32 (step 1e-2,
/// tolerance 2e-3, for ops ONNX Runtime has no f64 kernel for).
fn check_in(
    ft: ElemType,
    name: &str,
    xs: &[(&[usize], Vec<f64>)],
    ints: &[(&[usize], Vec<i64>)],
    f: impl Fn(&mut Graph, &[Value], &[Value]) -> Value,
) {
    let mut g = Graph::new(name, ft);
    let xv: Vec<Value> = xs.iter().enumerate().map(|(i, (s, _))| g.input(&format!("x{i}"), ft, &dims(s))).collect();
    let iv: Vec<Value> =
        ints.iter().enumerate().map(|(i, (s, _))| g.input(&format!("i{i}"), ElemType::I64, &dims(s))).collect();
    let out = f(&mut g, &xv, &iv);
    let oshape: Vec<usize> =
        g.shape(out).iter().map(|d| d.fixed().expect("test outputs have fixed shapes") as usize).collect();
    let mut rng = TestRng::new(name.len() as u64 * 7919);
    let r = g.const_float(&oshape, &rng.vec(oshape.iter().product(), -1.0, 1.0));
    let m = g.mul(out, r);
    let y = g.sum_all(m);
    let grads = g.grad(y, &xv);
    g.output(y, "y");
    let gnames: Vec<String> = (0..xv.len()).map(|i| format!("g{i}")).collect();
    for (gv, n) in grads.iter().zip(&gnames) {
        g.output(*gv, n);
    }
    let mut s = session(&g);
    let feeds = |vals: &[Vec<f64>]| -> Vec<(String, Feed)> {
        let mut v: Vec<(String, Feed)> =
            xs.iter().enumerate().map(|(i, (s, _))| (format!("x{i}"), feed(ft, s, &vals[i]))).collect();
        v.extend(ints.iter().enumerate().map(|(i, (s, d))| (format!("i{i}"), Feed::I64(s.to_vec(), d.clone()))));
        v
    };
    let base: Vec<Vec<f64>> = xs.iter().map(|(_, d)| d.clone()).collect();
    let mut names: Vec<&str> = vec!["y"];
    names.extend(gnames.iter().map(String::as_str));
    let call = |s: &mut Session, vals: &[Vec<f64>], outs: &[&str]| {
        let f = feeds(vals);
        let fr: Vec<(&str, Feed)> = f.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
        run(s, &fr, outs)
    };
    let res = call(&mut s, &base, &names);
    let (h, tol) = if ft == ElemType::F64 { (1e-6, 1e-6) } else { (1e-2, 2e-3) };
    for i in 0..xs.len() {
        assert_eq!(res[1 + i].len(), base[i].len(), "{name}: gradient {i} has the wrong size");
        for j in 0..base[i].len() {
            let mut p = base.clone();
            p[i][j] = base[i][j] + h;
            let yp = call(&mut s, &p, &["y"])[0][0];
            p[i][j] = base[i][j] - h;
            let ym = call(&mut s, &p, &["y"])[0][0];
            let fd = (yp - ym) / (2.0 * h);
            let an = res[1 + i][j];
            assert!(
                (fd - an).abs() <= tol * (1.0 + fd.abs()),
                "{name}: d/dx{i}[{j}] analytic {an} vs finite difference {fd}"
            );
        }
    }
}

/// f64 values as a feed of element type `ft` (f64 as is, otherwise rounded to f32).
fn feed(ft: ElemType, shape: &[usize], v: &[f64]) -> Feed {
    match ft {
        ElemType::F64 => Feed::F64(shape.to_vec(), v.to_vec()),
        _ => Feed::F32(shape.to_vec(), v.iter().map(|&a| a as f32).collect()),
    }
}

fn data(seed: u64, shape: &[usize], lo: f64, hi: f64) -> Vec<f64> {
    TestRng::new(seed).vec(shape.iter().product(), lo, hi)
}

#[test]
fn elementwise_binary_with_broadcasting() {
    let a = data(1, &[2, 3], -1.0, 1.0);
    let b = data(2, &[3], 0.5, 2.0);
    let c = data(3, &[2, 1], 0.5, 2.0);
    type B = fn(&mut Graph, Value, Value) -> Value;
    let ops: [(&str, B); 4] = [("add", Graph::add), ("sub", Graph::sub), ("mul", Graph::mul), ("div", Graph::div)];
    for (n, op) in ops {
        check(&format!("{n}_row"), &[(&[2, 3], a.clone()), (&[3], b.clone())], &[], |g, x, _| op(g, x[0], x[1]));
        check(&format!("{n}_col"), &[(&[2, 1], c.clone()), (&[2, 3], a.clone())], &[], |g, x, _| op(g, x[1], x[0]));
        check(&format!("{n}_same"), &[(&[2, 3], a.clone())], &[], |g, x, _| op(g, x[0], x[0]));
    }
}

#[test]
fn elementwise_unary() {
    let x = data(4, &[2, 3], -1.5, 1.5);
    let pos = data(5, &[2, 3], 0.5, 2.0);
    type U = fn(&mut Graph, Value) -> Value;
    let ops: [(&str, U, bool); 10] = [
        ("neg", Graph::neg, false),
        ("exp", Graph::exp, false),
        ("log", Graph::log, true),
        ("sqrt", Graph::sqrt, true),
        ("reciprocal", Graph::reciprocal, true),
        ("sigmoid", Graph::sigmoid, false),
        ("tanh", Graph::tanh, false),
        ("quick_gelu", Graph::quick_gelu, false),
        ("identity", Graph::identity, false),
        ("square", Graph::square, false),
    ];
    for (n, op, positive) in ops {
        let d = if positive { pos.clone() } else { x.clone() };
        check(n, &[(&[2, 3], d)], &[], |g, x, _| op(g, x[0]));
    }
    // No f64 kernels in ORT: checked in f32 with a coarser step.
    check_in(ElemType::F32, "erf", &[(&[2, 3], x.clone())], &[], |g, x, _| g.erf(x[0]));
    check_in(ElemType::F32, "gelu", &[(&[2, 3], x.clone())], &[], |g, x, _| g.gelu(x[0]));
    check_in(ElemType::F32, "quick_gelu_f32", &[(&[2, 3], x.clone())], &[], |g, x, _| g.quick_gelu(x[0]));
    check("pow3", &[(&[2, 3], x.clone())], &[], |g, x, _| g.pow(x[0], 3.0));
    check("pow2", &[(&[2, 3], x.clone())], &[], |g, x, _| g.pow(x[0], 2.0));
    check("pow_half", &[(&[2, 3], pos.clone())], &[], |g, x, _| g.pow(x[0], 0.5));
    check("scale", &[(&[2, 3], x.clone())], &[], |g, x, _| g.scale(x[0], -2.5));
    check("l2_normalize", &[(&[2, 3], x)], &[], |g, x, _| g.l2_normalize(x[0]));
}

#[test]
fn matmul_shapes() {
    let cases: [(&[usize], &[usize]); 5] = [
        (&[3, 4], &[4, 2]),
        (&[2, 3, 4], &[4, 5]),
        (&[2, 1, 3, 4], &[3, 4, 2]),
        (&[3, 4], &[2, 4, 5]),
        (&[2, 3, 4], &[2, 4, 2]),
    ];
    for (k, (sa, sb)) in cases.iter().enumerate() {
        let a = data(10 + k as u64, sa, -1.0, 1.0);
        let b = data(20 + k as u64, sb, -1.0, 1.0);
        check(&format!("matmul{k}"), &[(sa, a), (sb, b)], &[], |g, x, _| g.matmul(x[0], x[1]));
    }
    let x = data(30, &[2, 3, 4], -1.0, 1.0);
    let w = data(31, &[5, 4], -1.0, 1.0);
    let b = data(32, &[5], -1.0, 1.0);
    check("linear", &[(&[2, 3, 4], x), (&[5, 4], w.clone()), (&[5], b)], &[], |g, x, _| {
        g.linear(x[0], x[1], Some(x[2]))
    });
    check("linear_2d", &[(&[3, 4], data(33, &[3, 4], -1.0, 1.0)), (&[5, 4], w)], &[], |g, x, _| {
        g.linear(x[0], x[1], None)
    });
}

/// The fused backward kernels ([`super::custom`]) give the gradients of the chains of standard
/// nodes they replace (f64 to rounding, f32 within f32 rounding), and appear only in backward.
#[test]
fn fused_backward_kernels_equal_the_standard_node_chains() {
    let s: &[usize] = &[3, 5, 16];
    let x = data(70, s, -3.0, 3.0);
    let (gam, bet, r) = (data(71, &[16], 0.5, 1.5), data(72, &[16], -0.5, 0.5), data(73, s, -1.0, 1.0));
    let grads = |ft: ElemType, fused: bool| {
        let mut g = Graph::new("fused", ft);
        g.set_fused_backward(fused);
        let xv = g.input("x", ft, &dims(s));
        let gv = g.input("g", ft, &dims(&[16]));
        let bv = g.input("b", ft, &dims(&[16]));
        let h = g.layer_norm(xv, gv, bv, 1e-5);
        let y = g.quick_gelu(h);
        let y = g.layer_norm(y, gv, bv, 1e-5);
        let rv = g.const_float(s, &r);
        let m = g.mul(y, rv);
        let l = g.sum_all(m);
        let forward_custom = g.nodes.iter().any(|n| n.domain == super::custom::DOMAIN);
        assert!(!forward_custom, "forward nodes stay standard ONNX");
        let gr = g.grad(l, &[xv, gv, bv]);
        let n_custom = g.nodes.iter().filter(|n| n.domain == super::custom::DOMAIN).count();
        assert_eq!(
            n_custom,
            if fused { 4 } else { 0 },
            "{ft:?} fused={fused}: QuickGeluWithSigmoid, QuickGeluGrad, 2 LayerNormGrad"
        );
        for (v, n) in gr.iter().zip(["dx", "dg", "db"]) {
            g.output(*v, n);
        }
        let f = |shape: &[usize], v: &[f64]| feed(ft, shape, v);
        let mut sess = session(&g);
        run(&mut sess, &[("x", f(s, &x)), ("g", f(&[16], &gam)), ("b", f(&[16], &bet))], &["dx", "dg", "db"])
    };
    for (ft, tol) in [(ElemType::F64, 1e-12), (ElemType::F32, 3e-5)] {
        let (a, b) = (grads(ft, true), grads(ft, false));
        assert_eq!(a[0].len(), 3 * 5 * 16);
        for (p, q) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((p - q).abs() <= tol * (1.0 + q.abs()), "{ft:?}: fused {p} vs standard {q}");
        }
    }
}

#[test]
fn shape_ops() {
    let x = data(40, &[2, 3, 4], -1.0, 1.0);
    let s: &[usize] = &[2, 3, 4];
    check("reshape", &[(s, x.clone())], &[], |g, x, _| g.reshape(x[0], &[0, -1, 2]));
    check("transpose", &[(s, x.clone())], &[], |g, x, _| g.transpose(x[0], &[2, 0, 1]));
    check("transpose_last2", &[(s, x.clone())], &[], |g, x, _| g.transpose_last2(x[0]));
    check("unsqueeze_squeeze", &[(s, x.clone())], &[], |g, x, _| {
        let u = g.unsqueeze(x[0], &[1, 4]);
        let m = g.scale(u, 3.0);
        let q = g.squeeze(m, &[4]);
        g.reshape(q, &[2, 3, 4])
    });
    let y = data(41, &[2, 1, 4], -1.0, 1.0);
    check("concat", &[(s, x.clone()), (&[2, 1, 4], y)], &[], |g, x, _| g.concat(&[x[1], x[0], x[1]], 1));
    check("slice", &[(s, x.clone())], &[], |g, x, _| g.slice(x[0], &[1, -1], &[1, 1], &[3, -1]));
    check("pad", &[(s, x.clone())], &[], |g, x, _| g.pad(x[0], &[0, 1, 0, 0, 2, 1]));
    check("split_partial", &[(s, x.clone())], &[], |g, x, _| {
        let p = g.split(x[0], 2, &[1, 2, 1]);
        g.mul(p[0], p[2])
    });
    check("gather_scalar", &[(s, x.clone())], &[], |g, x, _| g.select(x[0], 1, 0));
    check("gather_scalar_negative", &[(s, x.clone())], &[], |g, x, _| g.select(x[0], 2, -2));
    check("gather_scalar_input", &[(s, x.clone())], &[(&[], vec![2])], |g, x, i| g.gather(x[0], i[0], 1));
    check("gather_vector", &[(s, x.clone())], &[(&[4], vec![2, 0, 2, -1])], |g, x, i| g.gather(x[0], i[0], 1));
    check("gather_elements", &[(s, x.clone())], &[(&[2, 3, 1], vec![0, 3, 1, 1, 2, 0])], |g, x, i| {
        g.gather_elements(x[0], i[0], 2)
    });
    let upd = data(42, &[2, 3, 2], -1.0, 1.0);
    check(
        "scatter_add",
        &[(s, x.clone()), (&[2, 3, 2], upd)],
        &[(&[2, 3, 2], vec![0, 0, 1, 3, 2, 2, 3, 1, 0, 1, 2, 2])],
        |g, x, i| g.scatter_elements_add(x[0], i[0], x[1], 2),
    );
    check("expand", &[(&[3, 1], data(43, &[3, 1], -1.0, 1.0))], &[], |g, x, _| {
        let sh = g.const_i64(&[2, 3, 4]);
        g.expand(x[0], sh, dims(&[2, 3, 4]))
    });
    check("where", &[(s, x.clone()), (&[4], data(44, &[4], -1.0, 1.0))], &[], |g, x, _| {
        let z = g.scalar(0.1);
        let c = g.greater(x[0], z);
        g.where_(c, x[0], x[1])
    });
}

#[test]
fn reductions_and_normalisations() {
    let s: &[usize] = &[2, 3, 4];
    let x = data(50, s, -1.0, 1.0);
    check("reduce_sum_keep", &[(s, x.clone())], &[], |g, x, _| g.reduce_sum(x[0], &[0, 2], true));
    check("reduce_sum", &[(s, x.clone())], &[], |g, x, _| g.reduce_sum(x[0], &[1], false));
    check("reduce_mean_keep", &[(s, x.clone())], &[], |g, x, _| g.reduce_mean(x[0], &[-1], true));
    check("reduce_mean", &[(s, x.clone())], &[], |g, x, _| g.reduce_mean(x[0], &[0, 1], false));
    check("softmax", &[(s, x.clone())], &[], |g, x, _| g.softmax(x[0], -1));
    check("softmax_axis1", &[(s, x.clone())], &[], |g, x, _| g.softmax(x[0], 1));
    check("log_softmax", &[(s, x.clone())], &[], |g, x, _| g.log_softmax(x[0], -1));
    let gam = data(51, &[4], 0.5, 1.5);
    let bet = data(52, &[4], -0.5, 0.5);
    check("layer_norm", &[(s, x.clone()), (&[4], gam.clone()), (&[4], bet.clone())], &[], |g, x, _| {
        g.layer_norm(x[0], x[1], x[2], 1e-5)
    });
    // f32: the backward reads the mean and 1/sigma the forward node saved (f64 recomputes them).
    check_in(
        ElemType::F32,
        "layer_norm_f32",
        &[(s, x.clone()), (&[4], gam.clone()), (&[4], bet.clone())],
        &[],
        |g, x, _| g.layer_norm(x[0], x[1], x[2], 1e-5),
    );
    check("cross_entropy", &[(&[3, 5], data(53, &[3, 5], -2.0, 2.0))], &[(&[3], vec![4, 0, 2])], |g, x, i| {
        let lp = g.log_softmax(x[0], -1);
        let l = g.unsqueeze(i[0], &[1]);
        let picked = g.gather_elements(lp, l, 1);
        g.neg(picked)
    });
}

#[test]
fn symbolic_batch_and_dynamic_mean() {
    // A symbolic batch: the ReduceMean count and the Reshape backward are computed at run time.
    let mut g = Graph::new("sym", ElemType::F64);
    let x = g.input("x", ElemType::F64, &[Dim::n(), Dim::Fixed(3)]);
    let w = g.initializer("w", &[3, 2], TensorData::F64(vec![1.0, -2.0, 0.5, 3.0, -1.0, 0.25]));
    let h = g.matmul(x, w);
    let r = g.reshape(h, &[-1]);
    let m = g.reduce_mean(r, &[0], false);
    let gr = g.grad(m, &[x, w]);
    g.output(m, "m");
    g.output(gr[0], "dx");
    g.output(gr[1], "dw");
    assert_eq!(g.shape(gr[0]), &[Dim::n(), Dim::Fixed(3)]);
    let mut s = session(&g);
    let xs = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
    let o = run(&mut s, &[("x", Feed::F64(vec![3, 3], xs))], &["m", "dx", "dw"]);
    // m = mean over 6 entries of x w; dx[i, k] = sum_j w[k, j] / 6, dw[k, j] = sum_i x[i, k] / 6.
    assert!((o[1][0] - (1.0 - 2.0) / 6.0).abs() < 1e-12);
    assert!((o[1][4] - (0.5 + 3.0) / 6.0).abs() < 1e-12);
    assert!((o[2][0] - 12.0 / 6.0).abs() < 1e-12);
    assert!((o[2][5] - 18.0 / 6.0).abs() < 1e-12);
}

#[test]
fn external_initializers_bind_at_session_creation() {
    let mut g = Graph::new("ext", ElemType::F32);
    let x = g.input("x", ElemType::F32, &[Dim::n(), Dim::Fixed(2)]);
    let w = g.weight("layer.weight", &[3, 2]);
    let y = g.linear(x, w, None);
    g.output(y, "y");
    assert_eq!(g.external_initializers(), vec!["layer.weight".to_string()]);
    let wv = Tensor::from_array((vec![3usize, 2], vec![1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0])).unwrap();
    let mut s = Session::builder(env())
        .unwrap()
        .with_external_initializer("layer.weight", wv.into_dyn())
        .unwrap()
        .commit_from_memory(&g.to_bytes())
        .unwrap();
    let xin = Tensor::from_array((vec![1usize, 2], vec![2.0f32, 5.0])).unwrap();
    let out = s.run(ort::inputs!["x" => xin]).unwrap();
    assert_eq!(out["y"].try_extract_tensor::<f32>().unwrap().1, &[2.0, 5.0, 7.0]);
}

#[test]
fn f32_layer_norm_gradients_from_saved_statistics_equal_the_f64_recomputation() {
    let (s, d) = (&[3usize, 5, 16][..], 3 * 5 * 16);
    let x = data(60, s, -2.0, 3.0);
    let (gam, bet, r) = (data(61, &[16], 0.5, 1.5), data(62, &[16], -0.5, 0.5), data(63, s, -1.0, 1.0));
    let grads = |ft: ElemType| {
        let mut g = Graph::new("ln_stats", ft);
        let xv = g.input("x", ft, &dims(s));
        let gv = g.input("g", ft, &dims(&[16]));
        let bv = g.input("b", ft, &dims(&[16]));
        let y = g.layer_norm(xv, gv, bv, 1e-5);
        let rv = g.const_float(s, &r);
        let m = g.mul(y, rv);
        let l = g.sum_all(m);
        let gr = g.grad(l, &[xv, gv, bv]);
        let ln = g.nodes.iter().find(|n| n.op_type == "LayerNormalization").expect("one LayerNorm");
        assert_eq!(ln.outputs.len(), if ft == ElemType::F32 { 3 } else { 1 }, "{ft:?}");
        for (v, n) in gr.iter().zip(["dx", "dg", "db"]) {
            g.output(*v, n);
        }
        let f = |shape: &[usize], v: &[f64]| feed(ft, shape, v);
        let mut sess = session(&g);
        run(&mut sess, &[("x", f(s, &x)), ("g", f(&[16], &gam)), ("b", f(&[16], &bet))], &["dx", "dg", "db"])
    };
    let (g32, g64) = (grads(ElemType::F32), grads(ElemType::F64));
    assert_eq!(g32[0].len(), d);
    for (a, b) in g32.iter().flatten().zip(g64.iter().flatten()) {
        assert!((a - b).abs() <= 2e-5 * (1.0 + b.abs()), "f32 {a} vs f64 {b}");
    }
}

/// Packed-weight graphs: forward nodes read the weights as initializers, backward nodes through
/// the `.bwd` inputs (only those weights they read); without a backward pass nothing changes.
#[test]
fn backward_nodes_read_weights_through_aliases() {
    let mut g = Graph::new("alias", ElemType::F32);
    let x = g.input("x", ElemType::F32, &dims(&[2, 3]));
    let w = g.weight("w", &[4, 3]);
    let b = g.weight("b", &[4]);
    let gam = g.weight("gamma", &[4]);
    let bet = g.weight("beta", &[4]);
    let h = g.linear(x, w, Some(b));
    let h = g.quick_gelu(h);
    let y = g.layer_norm(h, gam, bet, 1e-5);
    let l = g.sum_all(y);
    g.output(l, "loss");
    assert!(g.backward_weight_aliases().is_empty());
    assert_eq!(g.to_bytes_backward_weights_as_inputs(), g.to_bytes());
    let forward_nodes = g.nodes.len();
    let dx = g.grad(l, &[x])[0];
    g.output(dx, "dx");
    let aliases = g.backward_weight_aliases();
    let want: Vec<(String, String)> =
        ["w", "gamma"].iter().map(|n| (format!("{n}{}", super::BACKWARD_ALIAS), n.to_string())).collect();
    assert_eq!(aliases, want, "the linear's weight and the LayerNorm scale; not the biases");
    let m = g.to_model_backward_weights_as_inputs().graph.expect("graph");
    let inputs: Vec<&str> = m.input.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(inputs, ["x", "w.bwd", "gamma.bwd"]);
    let inits: Vec<&str> = m.initializer.iter().map(|i| i.name.as_str()).filter(|n| !n.starts_with('_')).collect();
    for wt in ["w", "b", "gamma", "beta"] {
        assert!(inits.contains(&wt), "{wt} stays an initializer ({inits:?})");
    }
    for (k, n) in m.node.iter().enumerate() {
        let reads = |name: &str| n.input.iter().any(|i| i == name);
        if k < forward_nodes {
            assert!(!reads("w.bwd") && !reads("gamma.bwd"), "forward node {} reads an alias", n.name);
        } else {
            assert!(!reads("w") && !reads("gamma"), "backward node {} reads an initializer", n.name);
        }
    }
    assert!(m.node.iter().skip(forward_nodes).any(|n| n.input.iter().any(|i| i == "w.bwd")));
}

/// The fused quick-GELU forward's f32 exponential: within 2 ulp of the f64 `exp` over the range
/// sigmoids use, and saturating sigmoids stay finite in [0, 1].
#[test]
fn fast_exp_is_within_two_ulp() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let (got, want) = (f64::from(super::custom::exp_f32(x)), f64::from(x).exp());
        worst = worst.max((got - want).abs() / want);
        x += 0.000_731;
    }
    assert!(worst < 2.0 * f64::from(f32::EPSILON), "largest relative error {worst:e}");
    use super::custom::Real;
    for z in [-1e4f32, -100.0, -88.0, 0.0, 88.0, 100.0, 1e4] {
        let s = z.sigmoid();
        assert!(s.is_finite() && (0.0..=1.0).contains(&s), "sigmoid({z}) = {s}");
        assert!((f64::from(s) - 1.0 / (1.0 + (-f64::from(z)).exp())).abs() < 1e-7, "sigmoid({z}) = {s}");
    }
}
