//! Fused backward kernels for gradient graphs, as ONNX Runtime custom operators of the
//! [`DOMAIN`] domain (f32 and f64). Each replaces a chain of elementwise ONNX nodes, every one of
//! which reads and writes a whole activation tensor, by one pass (issue 3: on ViT-B/32 the
//! elementwise passes of the MLP activation and LayerNorm backwards were a large share of a
//! forward + input gradient).
//!
//! Only gradient graphs use them ([`Graph::vjp`](super::Graph::vjp)); forward graphs and exported
//! models stay standard ONNX. Sessions running such graphs register the domain with
//! [`register`]. Each output element depends only on its own row, and rows are split over ORT's
//! intra-op threads in a fixed number of chunks, so results do not depend on the thread count.
//!
//! - `QuickGeluWithSigmoid(x)`, attribute `alpha` (a string: the f64 value): `y = x * s` and `s = sigmoid(alpha x)` in one
//!   pass (the forward of CLIP's activation in gradient graphs, which keep `s` for the backward;
//!   replaces a scaling, a Sigmoid and a Mul node, and the scaled copy they kept alive). The f32
//!   exponential is a Cephes-style polynomial (`exp_f32`, within 2 ulp of `exp`).
//! - `QuickGeluGrad(dy, x, s)`, attribute `alpha` (the same), with `s = sigmoid(alpha x)` (the forward's):
//!   `dx = dy * s * (1 + z (1 - s))`, `z = alpha x`, the derivative of `x * sigmoid(alpha x)`.
//! - `LayerNormGrad(dy, x, gamma, mean, inv_std)` over the last axis (`mean` and `inv_std` of
//!   shape `[.., 1]`, the forward's statistics): with `h = dy * gamma` and `xh = (x - mean) *
//!   inv_std`, `dx = (h - mean(h) - xh * mean(h * xh)) * inv_std`; row means accumulated in f64.

use ort::operator::{
    BoxedKernel, ComputeContext, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
    ShapeInferenceContext,
};
use ort::value::{PrimitiveTensorElementType, TensorElementType};

/// The custom operator domain of the fused backward kernels.
pub const DOMAIN: &str = "ai.mergeattack";
/// Its version.
pub const DOMAIN_VERSION: i64 = 1;

/// Rows are processed in at most this many chunks (a fixed split: deterministic).
const CHUNKS: usize = 64;

/// Register the fused backward kernels on a session builder.
pub fn register(b: ort::session::builder::SessionBuilder) -> ort::Result<ort::session::builder::SessionBuilder> {
    let d = OperatorDomain::new(DOMAIN)?
        .add(QuickGeluWithSigmoid::<f32>::new())?
        .add(QuickGeluWithSigmoid::<f64>::new())?
        .add(QuickGeluGrad::<f32>::new())?
        .add(QuickGeluGrad::<f64>::new())?
        .add(LayerNormGrad::<f32>::new())?
        .add(LayerNormGrad::<f64>::new())?;
    b.with_operators(d).map_err(Into::into)
}

/// Create a session from a builder on which [`register`] was called. Session creation is
/// serialised process-wide: ONNX Runtime adds a registered domain to ONNX's process-wide schema
/// registry while it creates the session, and two sessions created at the same moment with the
/// same domain race there (one fails with "the domain is already exist").
pub fn commit(b: &mut ort::session::builder::SessionBuilder, model: &[u8]) -> ort::Result<ort::session::Session> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    b.commit_from_memory(model)
}

/// The float types the kernels run in.
pub(crate) trait Real:
    PrimitiveTensorElementType
    + Copy
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
    const ELEM: TensorElementType;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    /// `1 / (1 + exp(-z))`.
    fn sigmoid(self) -> Self;
}

impl Real for f32 {
    const ELEM: TensorElementType = TensorElementType::Float32;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn sigmoid(self) -> Self {
        1.0 / (1.0 + exp_f32(-self))
    }
}

impl Real for f64 {
    const ELEM: TensorElementType = TensorElementType::Float64;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn sigmoid(self) -> Self {
        1.0 / (1.0 + (-self).exp())
    }
}

/// `exp(x)` in f32 without branches or calls, so that loops over it vectorise: `x = n ln 2 + r`
/// with `|r| <= ln 2 / 2` (`ln 2` in two parts), Cephes' degree-6 polynomial for `exp(r)`, and
/// `2^n` built from its exponent bits. The argument is clamped to [-87.3, 88.3] (results from
/// 1.2e-38 to 2.0e38; sigmoids are then 0 or 1 to f32 precision).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// An output buffer shared by the chunks of a parallel loop (each writes a disjoint range).
struct Out<T>(*mut T, usize);
// SAFETY: chunks write disjoint ranges of the buffer, which outlives the parallel loop.
unsafe impl<T: Send> Sync for Out<T> {}
unsafe impl<T: Send> Send for Out<T> {}

impl<T> Out<T> {
    /// The sub-slice `start..end`.
    ///
    /// # Safety
    /// No two live slices may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, start: usize, end: usize) -> &mut [T] {
        assert!(start <= end && end <= self.1, "chunk out of range");
        // SAFETY: in bounds (checked); disjointness is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), end - start) }
    }
}

fn err(op: &str, what: &str) -> ort::Error {
    ort::Error::new(format!("{DOMAIN}:{op}: {what}"))
}

/// Run `f(row_start, row_end)` over `rows` rows in a fixed split of at most [`CHUNKS`] chunks.
fn rows_parallel(ctx: &ComputeContext, rows: usize, f: impl Fn(usize, usize) + Sync + Send) -> ort::Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let chunks = rows.min(CHUNKS);
    let per = rows.div_ceil(chunks);
    let chunks = rows.div_ceil(per);
    ctx.par_for(chunks, 0, |c| f(c * per, ((c + 1) * per).min(rows)))
}

/// Output 0 has input `i`'s type and shape.
fn same_as_input(ctx: &mut ShapeInferenceContext, i: usize) -> ort::Result<()> {
    let inputs = ctx.inputs();
    match inputs.get(i) {
        Some(t) => ctx.set_output(0, t),
        None => Ok(()),
    }
}

/// `y = x sigmoid(alpha x)` and the sigmoid.
pub(crate) struct QuickGeluWithSigmoid<T>(std::marker::PhantomData<T>);

impl<T> QuickGeluWithSigmoid<T> {
    fn new() -> Self {
        QuickGeluWithSigmoid(std::marker::PhantomData)
    }
}

/// The quick-GELU forward on slices (`y`, `s`, `x` of equal length); `z = alpha x` rounds as the
/// standard graph's scaling node does.
pub(crate) fn quick_gelu_with_sigmoid<T: Real>(y: &mut [T], s: &mut [T], x: &[T], alpha: T) {
    for ((y, s), &x) in y.iter_mut().zip(s.iter_mut()).zip(x) {
        let sg = (x * alpha).sigmoid();
        *s = sg;
        *y = x * sg;
    }
}

/// The `alpha` attribute of a kernel, as `T`: a string holding the f64 value (ONNX float
/// attributes are f32), rounded as the standard graph rounds its f64 constants.
fn alpha_of<T: Real>(info: &KernelContext<'_>, op: &str) -> ort::Result<T> {
    let a = info.get::<String>("alpha").ok_or_else(|| err(op, "missing attribute alpha"))?;
    a.parse::<f64>().map(T::from_f64).map_err(|_| err(op, "attribute alpha is not a number"))
}

/// Elementwise kernels run in chunks of this many elements.
const ELEMS: usize = 4096;

impl<T: Real> Operator for QuickGeluWithSigmoid<T> {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        "QuickGeluWithSigmoid"
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(T::ELEM)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(T::ELEM), OperatorOutput::required(T::ELEM)]
    }

    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        let inputs = ctx.inputs();
        match inputs.first() {
            Some(t) => {
                ctx.set_output(0, t)?;
                ctx.set_output(1, t)
            }
            None => Ok(()),
        }
    }

    fn create_kernel<'attr>(&self, info: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let op = "QuickGeluWithSigmoid";
        let alpha: T = alpha_of(info, op)?;
        Ok(Box::new(move |ctx: &ComputeContext| {
            let x_v = ctx.input(0)?.ok_or_else(|| err(op, "missing input"))?;
            let (shape, x) = x_v.try_extract_tensor::<T>()?;
            let shape = shape.to_vec();
            let mut y_out = ctx.output(0, shape.clone())?.ok_or_else(|| err(op, "missing output y"))?;
            let mut s_out = ctx.output(1, shape)?.ok_or_else(|| err(op, "missing output s"))?;
            let (_, y) = y_out.try_extract_tensor_mut::<T>()?;
            let (_, s) = s_out.try_extract_tensor_mut::<T>()?;
            let n = x.len();
            if y.len() != n || s.len() != n {
                return Err(err(op, "outputs differ in size from the input"));
            }
            let (yb, sb) = (Out(y.as_mut_ptr(), n), Out(s.as_mut_ptr(), n));
            rows_parallel(ctx, n.div_ceil(ELEMS), |a, b| {
                let (a, b) = (a * ELEMS, (b * ELEMS).min(n));
                // SAFETY: element ranges of distinct chunks are disjoint.
                let (y, s) = unsafe { (yb.range(a, b), sb.range(a, b)) };
                quick_gelu_with_sigmoid(y, s, &x[a..b], alpha);
            })
        }))
    }
}

/// `dx = dy * s * (1 + z (1 - s))`, `z = alpha x`.
pub(crate) struct QuickGeluGrad<T>(std::marker::PhantomData<T>);

impl<T> QuickGeluGrad<T> {
    fn new() -> Self {
        QuickGeluGrad(std::marker::PhantomData)
    }
}

/// The quick-GELU derivative kernel on slices (`dx`, `dy`, `x`, `s` of equal length).
pub(crate) fn quick_gelu_grad<T: Real>(dx: &mut [T], dy: &[T], x: &[T], s: &[T], alpha: T) {
    let one = T::from_f64(1.0);
    for (((d, &g), &x), &s) in dx.iter_mut().zip(dy).zip(x).zip(s) {
        let z = x * alpha;
        *d = g * s * (one + z * (one - s));
    }
}

impl<T: Real> Operator for QuickGeluGrad<T> {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        "QuickGeluGrad"
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(T::ELEM), OperatorInput::required(T::ELEM), OperatorInput::required(T::ELEM)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(T::ELEM)]
    }

    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        same_as_input(ctx, 1)
    }

    fn create_kernel<'attr>(&self, info: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let alpha: T = alpha_of(info, "QuickGeluGrad")?;
        Ok(Box::new(move |ctx: &ComputeContext| {
            let op = "QuickGeluGrad";
            let input = |i| ctx.input(i)?.ok_or_else(|| err(op, "missing input"));
            let (dy_v, x_v, s_v) = (input(0)?, input(1)?, input(2)?);
            let (shape, x) = x_v.try_extract_tensor::<T>()?;
            let (_, dy) = dy_v.try_extract_tensor::<T>()?;
            let (_, s) = s_v.try_extract_tensor::<T>()?;
            if dy.len() != x.len() || s.len() != x.len() {
                return Err(err(op, "inputs differ in size"));
            }
            let shape = shape.to_vec();
            let mut out = ctx.output(0, shape)?.ok_or_else(|| err(op, "missing output"))?;
            let (_, dx) = out.try_extract_tensor_mut::<T>()?;
            let n = dx.len();
            let buf = Out(dx.as_mut_ptr(), n);
            rows_parallel(ctx, n.div_ceil(ELEMS), |a, b| {
                let (a, b) = (a * ELEMS, (b * ELEMS).min(n));
                // SAFETY: element ranges of distinct chunks are disjoint.
                let d = unsafe { buf.range(a, b) };
                quick_gelu_grad(d, &dy[a..b], &x[a..b], &s[a..b], alpha);
            })
        }))
    }
}

/// LayerNorm's input gradient from the forward's statistics.
pub(crate) struct LayerNormGrad<T>(std::marker::PhantomData<T>);

impl<T> LayerNormGrad<T> {
    fn new() -> Self {
        LayerNormGrad(std::marker::PhantomData)
    }
}

/// One row of the LayerNorm input gradient.
pub(crate) fn layer_norm_grad_row<T: Real>(dx: &mut [T], dy: &[T], x: &[T], gamma: &[T], mean: T, inv: T) {
    let w = x.len();
    let (mut sh, mut shx) = (0.0f64, 0.0f64);
    for i in 0..w {
        let h = (dy[i] * gamma[i]).to_f64();
        let xh = ((x[i] - mean) * inv).to_f64();
        sh += h;
        shx += h * xh;
    }
    let mh = T::from_f64(sh / w as f64);
    let mhx = T::from_f64(shx / w as f64);
    for i in 0..w {
        let h = dy[i] * gamma[i];
        let xh = (x[i] - mean) * inv;
        dx[i] = (h - mh - xh * mhx) * inv;
    }
}

impl<T: Real> Operator for LayerNormGrad<T> {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        "LayerNormGrad"
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [T::ELEM; 5].map(OperatorInput::required)
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(T::ELEM)]
    }

    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        same_as_input(ctx, 1)
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        Ok(Box::new(|ctx: &ComputeContext| {
            let op = "LayerNormGrad";
            let input = |i| ctx.input(i)?.ok_or_else(|| err(op, "missing input"));
            let (dy_v, x_v, g_v, m_v, i_v) = (input(0)?, input(1)?, input(2)?, input(3)?, input(4)?);
            let (shape, x) = x_v.try_extract_tensor::<T>()?;
            let (_, dy) = dy_v.try_extract_tensor::<T>()?;
            let (_, gamma) = g_v.try_extract_tensor::<T>()?;
            let (_, mean) = m_v.try_extract_tensor::<T>()?;
            let (_, inv) = i_v.try_extract_tensor::<T>()?;
            let w = gamma.len();
            if w == 0 || x.len() % w != 0 || dy.len() != x.len() || mean.len() * w != x.len() || inv.len() != mean.len()
            {
                return Err(err(op, "input sizes do not match"));
            }
            let shape = shape.to_vec();
            let mut out = ctx.output(0, shape)?.ok_or_else(|| err(op, "missing output"))?;
            let (_, dx) = out.try_extract_tensor_mut::<T>()?;
            let buf = Out(dx.as_mut_ptr(), dx.len());
            rows_parallel(ctx, mean.len(), |a, b| {
                // SAFETY: row ranges of distinct chunks are disjoint.
                let d = unsafe { buf.range(a * w, b * w) };
                for (r, dr) in (a..b).zip(d.chunks_exact_mut(w)) {
                    let span = r * w..(r + 1) * w;
                    layer_norm_grad_row(dr, &dy[span.clone()], &x[span], gamma, mean[r], inv[r]);
                }
            })
        }))
    }
}
