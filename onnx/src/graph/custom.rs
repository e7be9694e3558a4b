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
//! - `QuickGeluGrad(dy, z, s)` with `z = alpha x` and `s = sigmoid(z)` (the forward's values):
//!   `dx = dy * s * (1 + z (1 - s))`, the derivative of `x * sigmoid(alpha x)` in x.
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
}

impl Real for f32 {
    const ELEM: TensorElementType = TensorElementType::Float32;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
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

/// `dx = dy * s * (1 + z (1 - s))`.
pub(crate) struct QuickGeluGrad<T>(std::marker::PhantomData<T>);

impl<T> QuickGeluGrad<T> {
    fn new() -> Self {
        QuickGeluGrad(std::marker::PhantomData)
    }
}

/// The quick-GELU derivative kernel on slices (`dx`, `dy`, `z`, `s` of equal length).
pub(crate) fn quick_gelu_grad<T: Real>(dx: &mut [T], dy: &[T], z: &[T], s: &[T]) {
    let one = T::from_f64(1.0);
    for (((d, &g), &z), &s) in dx.iter_mut().zip(dy).zip(z).zip(s) {
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

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        Ok(Box::new(|ctx: &ComputeContext| {
            let op = "QuickGeluGrad";
            let input = |i| ctx.input(i)?.ok_or_else(|| err(op, "missing input"));
            let (dy_v, z_v, s_v) = (input(0)?, input(1)?, input(2)?);
            let (shape, z) = z_v.try_extract_tensor::<T>()?;
            let (_, dy) = dy_v.try_extract_tensor::<T>()?;
            let (_, s) = s_v.try_extract_tensor::<T>()?;
            if dy.len() != z.len() || s.len() != z.len() {
                return Err(err(op, "inputs differ in size"));
            }
            let shape = shape.to_vec();
            let mut out = ctx.output(0, shape)?.ok_or_else(|| err(op, "missing output"))?;
            let (_, dx) = out.try_extract_tensor_mut::<T>()?;
            let n = dx.len();
            let buf = Out(dx.as_mut_ptr(), n);
            // Chunks of 4096 elements as "rows".
            const W: usize = 4096;
            rows_parallel(ctx, n.div_ceil(W), |a, b| {
                let (a, b) = (a * W, (b * W).min(n));
                // SAFETY: row ranges of distinct chunks are disjoint.
                let d = unsafe { buf.range(a, b) };
                quick_gelu_grad(d, &dy[a..b], &z[a..b], &s[a..b]);
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
