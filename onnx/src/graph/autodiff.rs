//! Reverse-mode differentiation: walks the nodes backwards from the seeded outputs and appends
//! each op's vector-Jacobian product (ENGINE.md) as new nodes.

use super::{Dim, Graph, Node, Op, Value};

pub(super) fn vjp(g: &mut Graph, seeds: &[(Value, Value)], wrt: &[Value]) -> Vec<Value> {
    let n_nodes = g.nodes.len();
    let nv = g.values.len();
    // Values that depend on some `wrt` value through differentiable ops.
    let mut dep = vec![false; nv];
    for &w in wrt {
        assert!(g.elem(w).is_float(), "grad: `{}` is not a float value", g.name(w));
        dep[w.0] = true;
    }
    for node in &g.nodes {
        if node.op != Op::NoGrad && node.inputs.iter().any(|i| dep[i.0]) {
            for o in &node.outputs {
                dep[o.0] = true;
            }
        }
    }
    let mut contrib: Vec<Vec<Value>> = vec![Vec::new(); nv];
    for &(y, s) in seeds {
        assert_eq!(g.elem(y), g.elem(s), "vjp: seed type differs from `{}`", g.name(y));
        assert_eq!(g.rank(y), g.rank(s), "vjp: seed rank differs from `{}`", g.name(y));
        if dep[y.0] {
            contrib[y.0].push(s);
        }
    }
    for k in (0..n_nodes).rev() {
        if g.nodes[k].op == Op::NoGrad {
            continue;
        }
        // ORT's CPU LayerNormalization has its mean and 1/sigma outputs for f32 only.
        if matches!(g.nodes[k].op, Op::LayerNorm { .. }) && g.elem(g.nodes[k].inputs[0]) == super::ElemType::F32 {
            g.layer_norm_stats(k);
        }
        if matches!(g.nodes[k].op, Op::QuickGelu(_)) && g.fused_backward() {
            g.fuse_quick_gelu(k);
        }
        let node = g.nodes[k].clone();
        let need: Vec<bool> = node.inputs.iter().map(|i| dep[i.0] && g.elem(*i).is_float()).collect();
        if !need.iter().any(|&b| b) {
            continue;
        }
        let dys: Vec<Option<Value>> = node.outputs.iter().map(|&o| total(g, &mut contrib, o)).collect();
        if dys.iter().all(Option::is_none) {
            continue;
        }
        let dxs = rule(g, &node, &dys, &need);
        for ((i, dx), &nd) in node.inputs.iter().zip(dxs).zip(&need) {
            if let (Some(dx), true) = (dx, nd) {
                contrib[i.0].push(dx);
            }
        }
    }
    wrt.iter().map(|&w| total(g, &mut contrib, w).unwrap_or_else(|| g.zeros_like(w))).collect()
}

/// Sum of the gradient contributions to `v` (in the order they were made).
fn total(g: &mut Graph, contrib: &mut [Vec<Value>], v: Value) -> Option<Value> {
    // Values made during this pass (e.g. LayerNorm statistics) have no contributions.
    let parts = std::mem::take(contrib.get_mut(v.0)?);
    let mut it = parts.into_iter();
    let mut acc = it.next()?;
    for p in it {
        acc = g.add(acc, p);
    }
    contrib[v.0] = vec![acc];
    Some(acc)
}

/// Reduce `dy` (of a broadcast result's shape) to the shape of `x`.
fn unbroadcast(g: &mut Graph, dy: Value, x: Value) -> Value {
    let (sy, sx) = (g.shape(dy).to_vec(), g.shape(x).to_vec());
    assert!(sy.len() >= sx.len(), "unbroadcast: gradient rank below operand rank");
    let lead = sy.len() - sx.len();
    let mut out = dy;
    if lead > 0 {
        let axes: Vec<i64> = (0..lead as i64).collect();
        out = g.reduce_sum(out, &axes, false);
    }
    let axes: Vec<i64> = sx
        .iter()
        .zip(&sy[lead..])
        .enumerate()
        .filter(|(_, (dx, dy))| **dx == Dim::Fixed(1) && **dy != Dim::Fixed(1))
        .map(|(i, _)| i as i64)
        .collect();
    if !axes.is_empty() {
        out = g.reduce_sum(out, &axes, true);
    }
    out
}

/// Reshape `dy` back to the shape of `x` (static target when all of x's sizes are fixed).
fn reshape_like(g: &mut Graph, dy: Value, x: Value) -> Value {
    let sx = g.shape(x).to_vec();
    if g.shape(dy) == sx.as_slice() {
        return dy;
    }
    let fixed: Option<Vec<i64>> = sx.iter().map(Dim::fixed).collect();
    match fixed {
        Some(t) => g.reshape(dy, &t),
        None => {
            let sh = g.shape_of(x, None);
            g.reshape_dyn(dy, sh, sx)
        }
    }
}

fn rule(g: &mut Graph, node: &Node, dys: &[Option<Value>], need: &[bool]) -> Vec<Option<Value>> {
    let x = node.inputs.first().copied().unwrap_or(Value(usize::MAX));
    let y = node.outputs[0];
    let single = |v: Value| vec![Some(v)];
    match &node.op {
        Op::Split(axis) => {
            let mut parts = Vec::with_capacity(dys.len());
            for (o, dy) in node.outputs.iter().zip(dys) {
                parts.push(match dy {
                    Some(d) => *d,
                    None => g.zeros_like(*o),
                });
            }
            return vec![Some(g.concat(&parts, *axis))];
        }
        Op::NoGrad => return vec![None; node.inputs.len()],
        _ => {}
    }
    let dy = dys[0].expect("single-output node without gradient");
    let a = x;
    let b = node.inputs.get(1).copied().unwrap_or(Value(usize::MAX));
    match &node.op {
        Op::Add | Op::Sub => {
            let da = need[0].then(|| unbroadcast(g, dy, a));
            let db = need[1].then(|| {
                let d = if node.op == Op::Sub { g.neg(dy) } else { dy };
                unbroadcast(g, d, b)
            });
            vec![da, db]
        }
        Op::QuickGelu(alpha) if g.fused_backward() => {
            // The forward node was fused ([`Graph::fuse_quick_gelu`]): inputs [x], outputs [y, s].
            // The whole derivative in x in one kernel from x and s.
            let s = node.outputs[1];
            let attrs = vec![super::attr_s("alpha", &alpha.to_string())];
            vec![Some(g.fused_node("QuickGeluGrad", &[dy, a, s], attrs, a))]
        }
        Op::Mul | Op::QuickGelu(_) => {
            let da = need[0].then(|| {
                let m = g.mul(dy, b);
                unbroadcast(g, m, a)
            });
            let db = need[1].then(|| {
                let m = g.mul(dy, a);
                unbroadcast(g, m, b)
            });
            vec![da, db]
        }
        Op::Div => {
            let da = need[0].then(|| {
                let m = g.div(dy, b);
                unbroadcast(g, m, a)
            });
            let db = need[1].then(|| {
                // d(a/b)/db = -y/b
                let m = g.mul(dy, y);
                let m = g.div(m, b);
                let m = g.neg(m);
                unbroadcast(g, m, b)
            });
            vec![da, db]
        }
        Op::Neg => single(g.neg(dy)),
        Op::Exp => single(g.mul(dy, y)),
        Op::Log => single(g.div(dy, x)),
        Op::Sqrt => {
            let h = g.scale(dy, 0.5);
            single(g.div(h, y))
        }
        Op::Reciprocal => {
            let y2 = g.square(y);
            let m = g.mul(dy, y2);
            single(g.neg(m))
        }
        Op::Sigmoid => {
            let one = g.scalar_as(g.elem(y), 1.0);
            let om = g.sub(one, y);
            let d = g.mul(y, om);
            single(g.mul(dy, d))
        }
        Op::Tanh => {
            let one = g.scalar_as(g.elem(y), 1.0);
            let y2 = g.square(y);
            let d = g.sub(one, y2);
            single(g.mul(dy, d))
        }
        Op::Erf => {
            // 2/sqrt(pi) exp(-x^2)
            let x2 = g.square(x);
            let nx2 = g.neg(x2);
            let e = g.exp(nx2);
            let d = g.scale(e, std::f64::consts::FRAC_2_SQRT_PI);
            single(g.mul(dy, d))
        }
        Op::Gelu => {
            // Phi(x) + x phi(x), Phi = (1 + erf(x/sqrt2))/2, phi = exp(-x^2/2)/sqrt(2 pi)
            let xs = g.scale(x, std::f64::consts::FRAC_1_SQRT_2);
            let er = g.erf(xs);
            let one = g.scalar_as(g.elem(y), 1.0);
            let p1 = g.add(er, one);
            let cdf = g.scale(p1, 0.5);
            let x2 = g.square(x);
            let e = g.scale(x2, -0.5);
            let e = g.exp(e);
            let pdf = g.scale(e, 1.0 / (2.0 * std::f64::consts::PI).sqrt());
            let xp = g.mul(x, pdf);
            let d = g.add(cdf, xp);
            let mut v = single(g.mul(dy, d));
            v.resize(node.inputs.len(), None);
            v
        }
        Op::Pow(p) => {
            let d = if *p == 1.0 {
                dy
            } else {
                let xp = if *p == 2.0 { x } else { g.pow(x, p - 1.0) };
                let m = g.mul(dy, xp);
                g.scale(m, *p)
            };
            vec![Some(d), None]
        }
        Op::MatMul => matmul_rule(g, a, b, dy, need),
        Op::Identity => single(dy),
        Op::Reshape | Op::Unsqueeze | Op::Squeeze => {
            let mut v = single(reshape_like(g, dy, x));
            v.resize(node.inputs.len(), None);
            v
        }
        Op::Transpose(perm) => {
            let mut inv = vec![0i64; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p as usize] = i as i64;
            }
            single(g.transpose(dy, &inv))
        }
        Op::Concat(axis) => {
            let ax = *axis as usize;
            let sizes: Vec<i64> = node
                .inputs
                .iter()
                .map(|&i| g.shape(i)[ax].fixed().expect("Concat backward needs fixed sizes on the axis"))
                .collect();
            if sizes.len() == 1 {
                return single(dy);
            }
            let parts = g.split(dy, *axis, &sizes);
            parts.into_iter().zip(need).map(|(p, &n)| n.then_some(p)).collect()
        }
        Op::Slice { axes, starts, ends } => {
            let r = g.rank(x);
            let mut pads = vec![0i64; 2 * r];
            for ((&ax, &st), &en) in axes.iter().zip(starts).zip(ends) {
                let d = g.shape(x)[ax as usize].fixed().expect("Slice backward needs fixed sizes");
                pads[ax as usize] = st;
                pads[ax as usize + r] = d - en;
            }
            let mut v = single(g.pad(dy, &pads));
            v.resize(node.inputs.len(), None);
            v
        }
        Op::Pad => {
            let pads = match &g.values[b.0].constant {
                Some(super::TensorData::I64(p)) => p.clone(),
                _ => panic!("Pad backward needs constant pads"),
            };
            let r = g.rank(x);
            let mut axes = Vec::new();
            let mut starts = Vec::new();
            let mut ends = Vec::new();
            for i in 0..r {
                if pads[i] != 0 || pads[i + r] != 0 {
                    axes.push(i as i64);
                    starts.push(pads[i]);
                    ends.push(-pads[i + r]);
                    if pads[i + r] == 0 {
                        *ends.last_mut().unwrap() = i64::MAX;
                    }
                }
            }
            let d = if axes.is_empty() { dy } else { g.slice(dy, &axes, &starts, &ends) };
            vec![Some(d), None]
        }
        Op::Gather(axis) => {
            let ax = *axis;
            let r = g.rank(x);
            let d = g.shape(x)[ax as usize].fixed();
            if let (Some(super::TensorData::I64(idx)), Some(d)) = (&g.values[b.0].constant, d)
                && g.rank(b) == 0
            {
                // A constant scalar index (e.g. the CLS token): zero-pad dy around it.
                let i = if idx[0] < 0 { idx[0] + d } else { idx[0] };
                let u = g.unsqueeze(dy, &[ax]);
                let mut pads = vec![0i64; 2 * r];
                pads[ax as usize] = i;
                pads[ax as usize + r] = d - i - 1;
                return vec![Some(g.pad(u, &pads)), None];
            }
            let ri = g.rank(b);
            let (dyu, idx_shape): (Value, Vec<i64>) = match ri {
                0 => (g.unsqueeze(dy, &[ax]), vec![1; r]),
                1 => {
                    let mut t = vec![1; r];
                    t[ax as usize] = -1;
                    (dy, t)
                }
                _ => panic!("Gather backward supports scalar or 1-D indices"),
            };
            let idx = g.reshape(b, &idx_shape);
            let sh = g.shape_of(dyu, None);
            let s = g.shape(dyu).to_vec();
            let idx = g.expand(idx, sh, s);
            let z = g.zeros_like(x);
            vec![Some(g.scatter_elements_add(z, idx, dyu, ax)), None]
        }
        Op::GatherElements(axis) => {
            let z = g.zeros_like(x);
            vec![Some(g.scatter_elements_add(z, b, dy, *axis)), None]
        }
        Op::ScatterElementsAdd(axis) => {
            let du = need[2].then(|| g.gather_elements(dy, b, *axis));
            vec![need[0].then_some(dy), None, du]
        }
        Op::LayerNorm { eps } => layer_norm_rule(g, node, dy, *eps, need),
        Op::Softmax(axis) => {
            let m = g.mul(dy, y);
            let s = g.reduce_sum(m, &[*axis], true);
            let d = g.sub(dy, s);
            single(g.mul(y, d))
        }
        Op::LogSoftmax(axis) => {
            let p = g.exp(y);
            let s = g.reduce_sum(dy, &[*axis], true);
            let m = g.mul(p, s);
            single(g.sub(dy, m))
        }
        Op::ReduceSum { axes, keepdims } | Op::ReduceMean { axes, keepdims } => {
            let d = if *keepdims { dy } else { g.unsqueeze(dy, axes) };
            let sh = g.shape_of(x, None);
            let sx = g.shape(x).to_vec();
            let mut d = g.expand(d, sh, sx.clone());
            if matches!(node.op, Op::ReduceMean { .. }) {
                let count: Option<i64> = axes.iter().map(|&a| sx[a as usize].fixed()).product();
                d = match count {
                    Some(c) => g.scale(d, 1.0 / c as f64),
                    None => {
                        let r = g.size_ratio(y, x);
                        g.mul(d, r)
                    }
                };
            }
            vec![Some(d), None]
        }
        Op::Where => {
            let c = node.inputs[0];
            let z = g.scalar_as(g.elem(y), 0.0);
            let da = need[1].then(|| {
                let w = g.where_(c, dy, z);
                unbroadcast(g, w, node.inputs[1])
            });
            let db = need[2].then(|| {
                let w = g.where_(c, z, dy);
                unbroadcast(g, w, node.inputs[2])
            });
            vec![None, da, db]
        }
        Op::Expand => vec![Some(unbroadcast(g, dy, x)), None],
        Op::Cast => single(g.cast(dy, g.elem(x))),
        Op::FusedBackward => panic!("second-order gradients through fused backward kernels are not supported"),
        Op::Split(_) | Op::NoGrad => unreachable!(),
    }
}

fn matmul_rule(g: &mut Graph, a: Value, b: Value, dy: Value, need: &[bool]) -> Vec<Option<Value>> {
    let (sa, sb) = (g.shape(a).to_vec(), g.shape(b).to_vec());
    let da = need[0].then(|| {
        let bt = g.transpose_last2(b);
        let m = g.matmul(dy, bt);
        unbroadcast(g, m, a)
    });
    let db = need[1].then(|| {
        let k = sa[sa.len() - 1].fixed();
        let n = sb[sb.len() - 1].fixed();
        match (sb.len(), k, n) {
            (2, Some(k), Some(n)) if sa.len() > 2 => {
                // Fold the batch axes into the rows: dB = A2^T dY2, one GEMM.
                let a2 = g.reshape(a, &[-1, k]);
                let d2 = g.reshape(dy, &[-1, n]);
                let at = g.transpose(a2, &[1, 0]);
                g.matmul(at, d2)
            }
            _ => {
                let at = g.transpose_last2(a);
                let m = g.matmul(at, dy);
                unbroadcast(g, m, b)
            }
        }
    });
    vec![da, db]
}

fn layer_norm_rule(g: &mut Graph, node: &Node, dy: Value, eps: f64, need: &[bool]) -> Vec<Option<Value>> {
    let (x, scale, bias) = (node.inputs[0], node.inputs[1], node.inputs[2]);
    // The mean and 1/sigma the forward node saved (its optional outputs, see
    // `Graph::layer_norm_stats`) instead of recomputing them (six more passes, 3% of a ViT-B/32
    // input gradient's elementwise work); f64 graphs (no ORT kernel with those outputs) recompute.
    let (mu, inv) = if let [_, mu, inv] = node.outputs[..] {
        (mu, inv)
    } else {
        let mu = g.reduce_mean(x, &[-1], true);
        let xc = g.sub(x, mu);
        let sq = g.square(xc);
        let var = g.reduce_mean(sq, &[-1], true);
        let e = g.scalar_as(g.elem(x), eps);
        let ve = g.add(var, e);
        let sd = g.sqrt(ve);
        (mu, g.reciprocal(sd))
    };
    let fused = g.fused_backward();
    // The normalised input xh = (x - mu) / sigma, made only where a rule below reads it.
    let mut xh_cell = None;
    let mut xh = |g: &mut Graph| {
        *xh_cell.get_or_insert_with(|| {
            let xc = g.sub(x, mu);
            g.mul(xc, inv)
        })
    };
    let dx = need[0].then(|| {
        if fused {
            return g.fused_node("LayerNormGrad", &[dy, x, scale, mu, inv], vec![], x);
        }
        let xh = xh(g);
        let h = g.mul(dy, scale);
        let mh = g.reduce_mean(h, &[-1], true);
        let hx = g.mul(h, xh);
        let mhx = g.reduce_mean(hx, &[-1], true);
        let t = g.mul(xh, mhx);
        let d = g.sub(h, mh);
        let d = g.sub(d, t);
        g.mul(d, inv)
    });
    let dg = need[1].then(|| {
        let xh = xh(g);
        let m = g.mul(dy, xh);
        unbroadcast(g, m, scale)
    });
    let db = need[2].then(|| unbroadcast(g, dy, bias));
    vec![dx, dg, db]
}
