//! A small ONNX graph builder with reverse-mode differentiation.
//!
//! Build a [`Graph`] op by op (each method appends one ONNX node, or a few, and returns the
//! [`Value`] it produced), mark graph outputs, then [`Graph::to_bytes`] serialises an opset-21 /
//! IR-10 `ModelProto` that ONNX Runtime loads with `Session::builder()?.commit_from_memory(..)`.
//! [`Graph::grad`] / [`Graph::vjp`] append the backward nodes (vector-Jacobian products, see
//! ENGINE.md) and return the gradient values, which are ordinary values you can mark as outputs.
//!
//! Conventions:
//! - The graph has one floating type ([`Graph::float`]: `F32` or `F64`); every float constant the
//!   builder makes ([`Graph::scalar`], zeros in gradients) uses it, so a test can run a graph in
//!   f64 and the tool in f32 from the same building code. Indices and shapes are `I64`.
//! - Shapes are tracked statically: a [`Dim`] is a fixed size, a named symbolic size (`"N"` for the
//!   batch) or unknown. Ops that need static sizes (Slice, Split, Concat backward) say so.
//! - Misuse of the builder (rank or type mismatch, an unknown name) is a programming error and
//!   panics with a message naming the op; user data never reaches these checks.
//! - Weights are initializers. [`Graph::weight`] declares one whose data is external (supplied at
//!   session creation with ort's `SessionBuilder::with_external_initializer(name, tensor)`), so the
//!   graph bytes stay small and identical for every weight set of an architecture;
//!   [`Graph::initializer`] embeds data, and [`Graph::set_initializer_data`] embeds data into a
//!   declared weight (tests, export).
//! - Deterministic: node and value names depend only on the order of builder calls.

mod autodiff;
pub mod custom;
#[cfg(test)]
mod tests;
/// Test helpers shared with the CLIP graph tests (f64 feeds, sessions, deterministic data).
#[cfg(test)]
pub(crate) mod test_util {
    pub(crate) use super::tests::{Feed, TestRng, env, run, session};
}

use std::collections::HashMap;

use crate::proto::{self, AttributeProto, NodeProto, TensorProto, ValueInfoProto, attribute_type, data_type};

/// ONNX opset (ai.onnx) the graphs target.
pub const OPSET: i64 = 21;
/// ONNX IR version the graphs declare.
pub const IR_VERSION: i64 = 10;

/// Element type of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    F64,
    I64,
    Bool,
}

impl ElemType {
    /// The `TensorProto.DataType` code.
    pub fn onnx(self) -> i32 {
        match self {
            ElemType::F32 => data_type::FLOAT,
            ElemType::F64 => data_type::DOUBLE,
            ElemType::I64 => data_type::INT64,
            ElemType::Bool => data_type::BOOL,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, ElemType::F32 | ElemType::F64)
    }
}

/// One dimension of a static shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A known size.
    Fixed(i64),
    /// A size fixed at run time and named (`dim_param`), e.g. the batch `N`. Two equal names are
    /// the same size.
    Sym(String),
    /// Not known while building.
    Unknown,
}

impl Dim {
    /// The symbolic batch dimension `N`.
    pub fn n() -> Dim {
        Dim::Sym("N".into())
    }
    pub fn fixed(&self) -> Option<i64> {
        match self {
            Dim::Fixed(v) => Some(*v),
            _ => None,
        }
    }
}

impl From<i64> for Dim {
    fn from(v: i64) -> Dim {
        Dim::Fixed(v)
    }
}
impl From<usize> for Dim {
    fn from(v: usize) -> Dim {
        Dim::Fixed(v as i64)
    }
}
impl From<&str> for Dim {
    fn from(v: &str) -> Dim {
        Dim::Sym(v.into())
    }
}

/// Build a `Vec<Dim>` from fixed sizes.
pub fn dims(sizes: &[usize]) -> Vec<Dim> {
    sizes.iter().map(|&s| Dim::Fixed(s as i64)).collect()
}

/// A handle to a value (tensor) of one [`Graph`]. Cheap to copy; meaningless in another graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value(pub(crate) usize);

/// Tensor data for initializers and constants.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn elem(&self) -> ElemType {
        match self {
            TensorData::F32(_) => ElemType::F32,
            TensorData::F64(_) => ElemType::F64,
            TensorData::I64(_) => ElemType::I64,
            TensorData::Bool(_) => ElemType::Bool,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Float data of type `elem` (F32 or F64) from f64 values.
    pub fn float(elem: ElemType, values: &[f64]) -> TensorData {
        match elem {
            ElemType::F32 => TensorData::F32(values.iter().map(|&v| v as f32).collect()),
            ElemType::F64 => TensorData::F64(values.to_vec()),
            e => panic!("TensorData::float: {e:?} is not a float type"),
        }
    }
    fn raw_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::Bool(v) => v.iter().map(|&b| b as u8).collect(),
        }
    }
}

/// What a node computes, with what its backward rule needs to know.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Neg,
    Exp,
    Log,
    Sqrt,
    Reciprocal,
    Sigmoid,
    Tanh,
    Erf,
    Gelu,
    /// `Pow(x, p)` with a constant exponent.
    Pow(f64),
    MatMul,
    Reshape,
    Transpose(Vec<i64>),
    Concat(i64),
    Slice {
        axes: Vec<i64>,
        starts: Vec<i64>,
        ends: Vec<i64>,
    },
    Gather(i64),
    GatherElements(i64),
    Split(i64),
    LayerNorm {
        eps: f64,
    },
    Softmax(i64),
    LogSoftmax(i64),
    ReduceSum {
        axes: Vec<i64>,
        keepdims: bool,
    },
    ReduceMean {
        axes: Vec<i64>,
        keepdims: bool,
    },
    Where,
    Expand,
    Identity,
    Unsqueeze,
    Squeeze,
    Cast,
    Pad,
    ScatterElementsAdd(i64),
    /// CLIP's quick_gelu's final `Mul(x, s)` with `s = sigmoid(alpha x)` (inputs `[x, s]`): with
    /// fused backward kernels its rule gives the whole derivative in x in one node.
    QuickGelu(f64),
    /// A fused backward kernel ([`custom`]); its own gradient is not defined.
    FusedBackward,
    /// No gradient flows through (Shape, Size, ConstantOfShape, comparisons, OneHot, ...).
    NoGrad,
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub(crate) op: Op,
    pub(crate) op_type: &'static str,
    pub(crate) inputs: Vec<Value>,
    pub(crate) outputs: Vec<Value>,
    pub(crate) attrs: Vec<AttributeProto>,
    /// Operator domain: "" (ai.onnx) or [`custom::DOMAIN`].
    pub(crate) domain: &'static str,
}

#[derive(Clone, Debug)]
pub(crate) struct ValueData {
    pub(crate) name: Option<String>,
    pub(crate) elem: ElemType,
    pub(crate) shape: Vec<Dim>,
    /// Index of the producing node, `None` for inputs and initializers.
    pub(crate) producer: Option<usize>,
    /// Constant known to the builder (small i64 / float constants), used to fold shapes.
    pub(crate) constant: Option<TensorData>,
}

#[derive(Clone, Debug)]
struct Init {
    value: Value,
    data: Option<TensorData>,
}

/// Suffix of the graph inputs through which backward nodes read the weights in
/// [`Graph::to_model_backward_weights_as_inputs`].
pub const BACKWARD_ALIAS: &str = ".bwd";

/// An ONNX graph under construction. See the module documentation.
#[derive(Clone, Debug)]
pub struct Graph {
    name: String,
    float: ElemType,
    pub(crate) values: Vec<ValueData>,
    pub(crate) nodes: Vec<Node>,
    inputs: Vec<Value>,
    outputs: Vec<(String, Value)>,
    inits: Vec<Init>,
    names: HashMap<String, Value>,
    const_count: usize,
    /// Equal constants are shared (shape, type, bytes).
    const_cache: HashMap<(Vec<usize>, ElemType, Vec<u8>), Value>,
    /// Backward passes use the fused kernels of [`custom`] (default on).
    fused_backward: bool,
    /// Index of the first node a backward pass ([`Graph::vjp`]) appended, if any.
    backward_from: Option<usize>,
}

fn attr_i(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), i, r#type: attribute_type::INT, ..Default::default() }
}
pub(crate) fn attr_f(name: &str, f: f32) -> AttributeProto {
    AttributeProto { name: name.into(), f, r#type: attribute_type::FLOAT, ..Default::default() }
}
fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), ints: ints.to_vec(), r#type: attribute_type::INTS, ..Default::default() }
}
pub(crate) fn attr_s(name: &str, s: &str) -> AttributeProto {
    AttributeProto { name: name.into(), s: s.as_bytes().to_vec(), r#type: attribute_type::STRING, ..Default::default() }
}
fn attr_t(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto { name: name.into(), t: Some(t), r#type: attribute_type::TENSOR, ..Default::default() }
}

/// Normalise a possibly negative axis for rank `r`.
pub(crate) fn norm_axis(axis: i64, r: usize) -> usize {
    let a = if axis < 0 { axis + r as i64 } else { axis };
    assert!(a >= 0 && (a as usize) < r, "axis {axis} out of range for rank {r}");
    a as usize
}

/// Numpy-style broadcast of two static shapes.
pub(crate) fn broadcast(a: &[Dim], b: &[Dim], op: &str) -> Vec<Dim> {
    let r = a.len().max(b.len());
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let da = if i + a.len() >= r { &a[i + a.len() - r] } else { &Dim::Fixed(1) };
        let db = if i + b.len() >= r { &b[i + b.len() - r] } else { &Dim::Fixed(1) };
        let d = match (da, db) {
            (x, y) if x == y => x.clone(),
            (Dim::Fixed(1), y) => y.clone(),
            (x, Dim::Fixed(1)) => x.clone(),
            (Dim::Fixed(x), Dim::Fixed(y)) => panic!("{op}: shapes {a:?} and {b:?} do not broadcast ({x} vs {y})"),
            (Dim::Fixed(x), _) | (_, Dim::Fixed(x)) => Dim::Fixed(*x),
            (Dim::Sym(s), _) | (_, Dim::Sym(s)) => Dim::Sym(s.clone()),
            _ => Dim::Unknown,
        };
        out.push(d);
    }
    out
}

impl Graph {
    /// An empty graph whose float values are of type `float` (`F32` or `F64`).
    pub fn new(name: &str, float: ElemType) -> Graph {
        assert!(float.is_float(), "Graph::new: the float type must be F32 or F64");
        Graph {
            name: name.into(),
            float,
            values: Vec::new(),
            nodes: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            inits: Vec::new(),
            names: HashMap::new(),
            const_count: 0,
            const_cache: HashMap::new(),
            fused_backward: true,
            backward_from: None,
        }
    }

    /// The graph's float type.
    pub fn float(&self) -> ElemType {
        self.float
    }

    /// Whether backward passes use the fused kernels of [`custom`] (domain [`custom::DOMAIN`],
    /// registered with [`custom::register`]) instead of chains of standard ONNX nodes. On by
    /// default; forward-only graphs never contain them.
    pub fn set_fused_backward(&mut self, on: bool) {
        self.fused_backward = on;
    }

    /// See [`Graph::set_fused_backward`].
    pub fn fused_backward(&self) -> bool {
        self.fused_backward
    }

    /// Static shape of a value.
    pub fn shape(&self, v: Value) -> &[Dim] {
        &self.values[v.0].shape
    }

    /// Rank of a value.
    pub fn rank(&self, v: Value) -> usize {
        self.values[v.0].shape.len()
    }

    /// Element type of a value.
    pub fn elem(&self, v: Value) -> ElemType {
        self.values[v.0].elem
    }

    /// The name the value has in the serialised graph.
    pub fn name(&self, v: Value) -> String {
        match &self.values[v.0].name {
            Some(n) => n.clone(),
            None => format!("_v{}", v.0),
        }
    }

    /// A named value (input, initializer or output) by its name.
    pub fn by_name(&self, name: &str) -> Option<Value> {
        self.names.get(name).copied()
    }

    /// Names of the graph inputs, in order.
    pub fn input_names(&self) -> Vec<String> {
        self.inputs.iter().map(|&v| self.name(v)).collect()
    }

    /// Names of the graph outputs, in order.
    pub fn output_names(&self) -> Vec<String> {
        self.outputs.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Names of the initializers whose data is external (to supply at session creation), in order.
    pub fn external_initializers(&self) -> Vec<String> {
        self.inits.iter().filter(|i| i.data.is_none()).map(|i| self.name(i.value)).collect()
    }

    /// Names and static shapes of all initializers, in declaration order.
    pub fn initializers(&self) -> Vec<(String, Vec<Dim>)> {
        self.inits.iter().map(|i| (self.name(i.value), self.shape(i.value).to_vec())).collect()
    }

    /// Number of nodes so far.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn new_value(&mut self, elem: ElemType, shape: Vec<Dim>, producer: Option<usize>) -> Value {
        self.values.push(ValueData { name: None, elem, shape, producer, constant: None });
        Value(self.values.len() - 1)
    }

    fn claim_name(&mut self, name: &str, v: Value) {
        assert!(!name.is_empty(), "empty value name");
        assert!(!name.starts_with("_v"), "value names starting with `_v` are reserved: {name}");
        assert!(!self.names.contains_key(name), "the name `{name}` is already used in graph `{}`", self.name);
        self.names.insert(name.into(), v);
        self.values[v.0].name = Some(name.into());
    }

    /// Append a node producing one output of the given type and shape.
    pub(crate) fn node(
        &mut self,
        op: Op,
        op_type: &'static str,
        inputs: &[Value],
        attrs: Vec<AttributeProto>,
        elem: ElemType,
        shape: Vec<Dim>,
    ) -> Value {
        self.node_multi(op, op_type, inputs, attrs, vec![(elem, shape)])[0]
    }

    pub(crate) fn node_multi(
        &mut self,
        op: Op,
        op_type: &'static str,
        inputs: &[Value],
        attrs: Vec<AttributeProto>,
        outs: Vec<(ElemType, Vec<Dim>)>,
    ) -> Vec<Value> {
        let idx = self.nodes.len();
        let outputs: Vec<Value> = outs.into_iter().map(|(e, s)| self.new_value(e, s, Some(idx))).collect();
        self.nodes.push(Node { op, op_type, inputs: inputs.to_vec(), outputs: outputs.clone(), attrs, domain: "" });
        outputs
    }

    /// A node of the fused-kernel domain ([`custom`]) with one output of `like`'s type and shape.
    pub(crate) fn fused_node(
        &mut self,
        op_type: &'static str,
        inputs: &[Value],
        attrs: Vec<AttributeProto>,
        like: Value,
    ) -> Value {
        let (e, s) = (self.elem(like), self.shape(like).to_vec());
        let v = self.node(Op::FusedBackward, op_type, inputs, attrs, e, s);
        self.nodes.last_mut().expect("just added").domain = custom::DOMAIN;
        v
    }

    fn check_float(&self, v: Value, op: &str) {
        assert!(self.elem(v) == self.float, "{op}: expected a {:?} value, got {:?}", self.float, self.elem(v));
    }

    // ----- inputs, outputs, initializers, constants -----

    /// Declare a graph input.
    pub fn input(&mut self, name: &str, elem: ElemType, shape: &[Dim]) -> Value {
        let v = self.new_value(elem, shape.to_vec(), None);
        self.claim_name(name, v);
        self.inputs.push(v);
        v
    }

    /// Mark `v` as a graph output called `name`. An Identity node is added when `v` already has
    /// another name (an input, an initializer, another output).
    pub fn output(&mut self, v: Value, name: &str) {
        let v = if self.values[v.0].name.is_some() || self.values[v.0].producer.is_none() {
            let (e, s) = (self.elem(v), self.shape(v).to_vec());
            self.node(Op::Identity, "Identity", &[v], vec![], e, s)
        } else {
            v
        };
        self.claim_name(name, v);
        self.outputs.push((name.into(), v));
    }

    /// Declare a float weight of the graph's float type whose data is supplied at session
    /// creation (`with_external_initializer(name, ..)`), or embedded later with
    /// [`Graph::set_initializer_data`].
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Value {
        let v = self.new_value(self.float, dims(shape), None);
        self.claim_name(name, v);
        self.inits.push(Init { value: v, data: None });
        v
    }

    /// An initializer with embedded data.
    pub fn initializer(&mut self, name: &str, shape: &[usize], data: TensorData) -> Value {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "initializer `{name}`: data length vs shape {shape:?}");
        let v = self.new_value(data.elem(), dims(shape), None);
        self.claim_name(name, v);
        self.inits.push(Init { value: v, data: Some(data) });
        v
    }

    /// Embed data into a declared initializer (e.g. a [`Graph::weight`]).
    pub fn set_initializer_data(&mut self, name: &str, data: TensorData) {
        let v = self.by_name(name).unwrap_or_else(|| panic!("set_initializer_data: no value `{name}`"));
        let n: i64 = self.shape(v).iter().map(|d| d.fixed().expect("initializer shapes are fixed")).product();
        assert_eq!(n as usize, data.len(), "set_initializer_data `{name}`: data length vs shape");
        assert_eq!(data.elem(), self.elem(v), "set_initializer_data `{name}`: element type");
        let init =
            self.inits.iter_mut().find(|i| i.value == v).unwrap_or_else(|| panic!("`{name}` is not an initializer"));
        init.data = Some(data);
    }

    /// A constant (an embedded, unnamed initializer).
    pub fn constant(&mut self, shape: &[usize], data: TensorData) -> Value {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "constant: data length vs shape {shape:?}");
        let key = (shape.to_vec(), data.elem(), data.raw_bytes());
        if let Some(&v) = self.const_cache.get(&key) {
            return v;
        }
        let v = self.new_value(data.elem(), dims(shape), None);
        self.const_count += 1;
        let name = format!("const.{}", self.const_count);
        self.claim_name(&name, v);
        self.values[v.0].constant = Some(data.clone());
        self.inits.push(Init { value: v, data: Some(data) });
        self.const_cache.insert(key, v);
        v
    }

    /// A float scalar (shape `[]`) of the graph's float type.
    pub fn scalar(&mut self, x: f64) -> Value {
        self.constant(&[], TensorData::float(self.float, &[x]))
    }

    /// A float scalar of a given float type (for values of another type than the graph's).
    pub fn scalar_as(&mut self, elem: ElemType, x: f64) -> Value {
        self.constant(&[], TensorData::float(elem, &[x]))
    }

    /// A float constant of the graph's float type.
    pub fn const_float(&mut self, shape: &[usize], values: &[f64]) -> Value {
        self.constant(shape, TensorData::float(self.float, values))
    }

    /// A 1-D int64 constant.
    pub fn const_i64(&mut self, values: &[i64]) -> Value {
        self.constant(&[values.len()], TensorData::I64(values.to_vec()))
    }

    /// An int64 scalar constant.
    pub fn scalar_i64(&mut self, x: i64) -> Value {
        self.constant(&[], TensorData::I64(vec![x]))
    }

    // ----- elementwise -----

    fn binary(&mut self, op: Op, op_type: &'static str, a: Value, b: Value) -> Value {
        assert_eq!(self.elem(a), self.elem(b), "{op_type}: element types differ");
        let s = broadcast(self.shape(a), self.shape(b), op_type);
        let e = self.elem(a);
        self.node(op, op_type, &[a, b], vec![], e, s)
    }

    fn unary(&mut self, op: Op, op_type: &'static str, x: Value, attrs: Vec<AttributeProto>) -> Value {
        let (e, s) = (self.elem(x), self.shape(x).to_vec());
        self.node(op, op_type, &[x], attrs, e, s)
    }

    /// `a + b` (broadcasting).
    pub fn add(&mut self, a: Value, b: Value) -> Value {
        self.binary(Op::Add, "Add", a, b)
    }
    /// `a - b` (broadcasting).
    pub fn sub(&mut self, a: Value, b: Value) -> Value {
        self.binary(Op::Sub, "Sub", a, b)
    }
    /// `a * b` (broadcasting).
    pub fn mul(&mut self, a: Value, b: Value) -> Value {
        self.binary(Op::Mul, "Mul", a, b)
    }
    /// `a / b` (broadcasting).
    pub fn div(&mut self, a: Value, b: Value) -> Value {
        self.binary(Op::Div, "Div", a, b)
    }
    /// `a * c` for a float constant `c`.
    pub fn scale(&mut self, a: Value, c: f64) -> Value {
        let s = self.scalar_as(self.elem(a), c);
        self.mul(a, s)
    }
    pub fn neg(&mut self, x: Value) -> Value {
        self.unary(Op::Neg, "Neg", x, vec![])
    }
    pub fn exp(&mut self, x: Value) -> Value {
        self.unary(Op::Exp, "Exp", x, vec![])
    }
    pub fn log(&mut self, x: Value) -> Value {
        self.unary(Op::Log, "Log", x, vec![])
    }
    pub fn sqrt(&mut self, x: Value) -> Value {
        self.unary(Op::Sqrt, "Sqrt", x, vec![])
    }
    pub fn reciprocal(&mut self, x: Value) -> Value {
        self.unary(Op::Reciprocal, "Reciprocal", x, vec![])
    }
    pub fn sigmoid(&mut self, x: Value) -> Value {
        self.unary(Op::Sigmoid, "Sigmoid", x, vec![])
    }
    pub fn tanh(&mut self, x: Value) -> Value {
        self.unary(Op::Tanh, "Tanh", x, vec![])
    }
    /// `Erf`. ONNX Runtime's CPU provider has no f64 kernel: on an f64 value it is computed in
    /// f32 between two Casts (so f64 graphs using it are only f32-accurate there).
    pub fn erf(&mut self, x: Value) -> Value {
        self.via_f32(x, |g, x| g.unary(Op::Erf, "Erf", x, vec![]))
    }
    /// The erf GELU (ONNX `Gelu`, opset 20), `x * Phi(x)`; f32 inside for f64 values, like [`Graph::erf`].
    pub fn gelu(&mut self, x: Value) -> Value {
        self.via_f32(x, |g, x| g.unary(Op::Gelu, "Gelu", x, vec![attr_s("approximate", "none")]))
    }
    fn via_f32(&mut self, x: Value, f: impl FnOnce(&mut Graph, Value) -> Value) -> Value {
        if self.elem(x) == ElemType::F64 {
            let c = self.cast(x, ElemType::F32);
            let y = f(self, c);
            self.cast(y, ElemType::F64)
        } else {
            f(self, x)
        }
    }
    /// CLIP's quick_gelu, `x * sigmoid(1.702 x)`.
    pub fn quick_gelu(&mut self, x: Value) -> Value {
        const ALPHA: f64 = 1.702;
        let z = self.scale(x, ALPHA);
        let s = self.sigmoid(z);
        let (e, sh) = (self.elem(x), self.shape(x).to_vec());
        self.node(Op::QuickGelu(ALPHA), "Mul", &[x, s], vec![], e, sh)
    }
    /// `x ^ p` for a constant exponent.
    pub fn pow(&mut self, x: Value, p: f64) -> Value {
        self.check_float(x, "Pow");
        let e = self.scalar(p);
        let (el, s) = (self.elem(x), self.shape(x).to_vec());
        self.node(Op::Pow(p), "Pow", &[x, e], vec![], el, s)
    }
    /// `x * x`.
    pub fn square(&mut self, x: Value) -> Value {
        self.mul(x, x)
    }
    pub fn identity(&mut self, x: Value) -> Value {
        self.unary(Op::Identity, "Identity", x, vec![])
    }
    /// Cast to another element type (gradient flows between float types only).
    pub fn cast(&mut self, x: Value, to: ElemType) -> Value {
        let s = self.shape(x).to_vec();
        let op = if self.elem(x).is_float() && to.is_float() { Op::Cast } else { Op::NoGrad };
        self.node(op, "Cast", &[x], vec![attr_i("to", to.onnx() as i64)], to, s)
    }
    /// `Where(cond, a, b)` (broadcasting).
    pub fn where_(&mut self, cond: Value, a: Value, b: Value) -> Value {
        assert_eq!(self.elem(cond), ElemType::Bool, "Where: condition must be bool");
        assert_eq!(self.elem(a), self.elem(b), "Where: element types differ");
        let s = broadcast(&broadcast(self.shape(cond), self.shape(a), "Where"), self.shape(b), "Where");
        let e = self.elem(a);
        self.node(Op::Where, "Where", &[cond, a, b], vec![], e, s)
    }
    fn compare(&mut self, op_type: &'static str, a: Value, b: Value) -> Value {
        let s = broadcast(self.shape(a), self.shape(b), op_type);
        self.node(Op::NoGrad, op_type, &[a, b], vec![], ElemType::Bool, s)
    }
    pub fn equal(&mut self, a: Value, b: Value) -> Value {
        self.compare("Equal", a, b)
    }
    pub fn greater(&mut self, a: Value, b: Value) -> Value {
        self.compare("Greater", a, b)
    }
    pub fn less(&mut self, a: Value, b: Value) -> Value {
        self.compare("Less", a, b)
    }

    // ----- linear algebra -----

    /// `MatMul` (numpy semantics; both operands of rank >= 2).
    pub fn matmul(&mut self, a: Value, b: Value) -> Value {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        assert!(sa.len() >= 2 && sb.len() >= 2, "MatMul: operands must have rank >= 2 (got {sa:?} and {sb:?})");
        assert_eq!(self.elem(a), self.elem(b), "MatMul: element types differ");
        let (ka, kb) = (&sa[sa.len() - 1], &sb[sb.len() - 2]);
        if let (Dim::Fixed(x), Dim::Fixed(y)) = (ka, kb) {
            assert_eq!(x, y, "MatMul: inner sizes differ ({sa:?} x {sb:?})");
        }
        let mut s = broadcast(&sa[..sa.len() - 2], &sb[..sb.len() - 2], "MatMul");
        s.push(sa[sa.len() - 2].clone());
        s.push(sb[sb.len() - 1].clone());
        let e = self.elem(a);
        self.node(Op::MatMul, "MatMul", &[a, b], vec![], e, s)
    }

    /// A PyTorch `Linear`: `x W^T + b` with `w` of shape `[out, in]` (the HF layout), `b` `[out]`.
    /// (One `Gemm` with the bias fused on rows folded to 2-D was measured slower on ViT-B/32's
    /// forward + input gradient, 10.4-11.4 vs 9.9-10.3 CPU s, and peaked 1.8 vs 1.37 GB.)
    pub fn linear(&mut self, x: Value, w: Value, b: Option<Value>) -> Value {
        assert_eq!(self.rank(w), 2, "linear: weight must be 2-D [out, in]");
        let wt = self.transpose(w, &[1, 0]);
        let y = self.matmul(x, wt);
        match b {
            Some(b) => self.add(y, b),
            None => y,
        }
    }

    /// Swap the last two axes.
    pub fn transpose_last2(&mut self, x: Value) -> Value {
        let r = self.rank(x) as i64;
        let mut perm: Vec<i64> = (0..r).collect();
        perm.swap(r as usize - 1, r as usize - 2);
        self.transpose(x, &perm)
    }

    // ----- shape ops -----

    /// Reshape to a static target: `0` copies the input's dimension, `-1` is inferred.
    pub fn reshape(&mut self, x: Value, target: &[i64]) -> Value {
        let sx = self.shape(x).to_vec();
        let mut out: Vec<Dim> = target
            .iter()
            .enumerate()
            .map(|(i, &t)| match t {
                0 => sx.get(i).cloned().unwrap_or_else(|| panic!("Reshape: 0 at axis {i} beyond input rank")),
                -1 => Dim::Unknown,
                t => Dim::Fixed(t),
            })
            .collect();
        if let Some(pos) = target.iter().position(|&t| t == -1) {
            let total: Option<i64> = sx.iter().map(Dim::fixed).product();
            let others: Option<i64> =
                out.iter().enumerate().filter(|(i, _)| *i != pos).map(|(_, d)| d.fixed()).product();
            if let (Some(t), Some(o)) = (total, others) {
                out[pos] = Dim::Fixed(t / o);
            } else {
                // Cancel equal symbolic factors: [N, a, b] -> [N, -1] gives [N, a*b].
                let mut xs = sx.clone();
                let mut rest = 1i64;
                let mut ok = true;
                for (i, d) in out.iter().enumerate() {
                    if i == pos {
                        continue;
                    }
                    match d {
                        Dim::Fixed(v) => rest *= v,
                        d => match xs.iter().position(|e| e == d) {
                            Some(j) => {
                                xs.remove(j);
                            }
                            None => ok = false,
                        },
                    }
                }
                if ok {
                    let fixed: Option<i64> = xs.iter().map(Dim::fixed).product();
                    if let Some(f) = fixed.filter(|f| rest > 0 && f % rest == 0) {
                        out[pos] = Dim::Fixed(f / rest);
                    } else if xs.len() == 1 && rest == 1 {
                        out[pos] = xs[0].clone();
                    }
                }
            }
        }
        let t = self.const_i64(target);
        let e = self.elem(x);
        self.node(Op::Reshape, "Reshape", &[x, t], vec![], e, out)
    }

    /// Reshape to a shape given as a runtime int64 tensor; `out` is the declared static shape.
    pub fn reshape_dyn(&mut self, x: Value, shape: Value, out: Vec<Dim>) -> Value {
        let e = self.elem(x);
        self.node(Op::Reshape, "Reshape", &[x, shape], vec![], e, out)
    }

    /// Transpose with a permutation.
    /// A transpose of a transpose that composes to the identity returns the original value.
    pub fn transpose(&mut self, x: Value, perm: &[i64]) -> Value {
        let sx = self.shape(x).to_vec();
        assert_eq!(perm.len(), sx.len(), "Transpose: permutation length vs rank");
        if let Some(k) = self.values[x.0].producer
            && let Op::Transpose(inner) = &self.nodes[k].op
            && perm.iter().enumerate().all(|(i, &p)| inner[p as usize] == i as i64)
        {
            return self.nodes[k].inputs[0];
        }
        let s = perm.iter().map(|&p| sx[p as usize].clone()).collect();
        let e = self.elem(x);
        self.node(Op::Transpose(perm.to_vec()), "Transpose", &[x], vec![attr_ints("perm", perm)], e, s)
    }

    /// Concatenate along `axis`.
    pub fn concat(&mut self, xs: &[Value], axis: i64) -> Value {
        assert!(!xs.is_empty(), "Concat: no inputs");
        let r = self.rank(xs[0]);
        let a = norm_axis(axis, r);
        let mut s = self.shape(xs[0]).to_vec();
        let mut total = Some(0i64);
        for &x in xs {
            assert_eq!(self.rank(x), r, "Concat: ranks differ");
            total = total.and_then(|t| self.shape(x)[a].fixed().map(|v| t + v));
        }
        s[a] = total.map(Dim::Fixed).unwrap_or(Dim::Unknown);
        let e = self.elem(xs[0]);
        self.node(Op::Concat(a as i64), "Concat", xs, vec![attr_i("axis", a as i64)], e, s)
    }

    /// `Slice` with static `starts`/`ends` (step 1) on `axes`; negative values count from the end.
    pub fn slice(&mut self, x: Value, axes: &[i64], starts: &[i64], ends: &[i64]) -> Value {
        let r = self.rank(x);
        let mut s = self.shape(x).to_vec();
        let mut nstarts = Vec::new();
        let mut nends = Vec::new();
        let axes_n: Vec<i64> = axes.iter().map(|&a| norm_axis(a, r) as i64).collect();
        for ((&a, &st), &en) in axes_n.iter().zip(starts).zip(ends) {
            let d = s[a as usize].fixed().unwrap_or_else(|| panic!("Slice: axis {a} needs a fixed size"));
            let clamp = |v: i64| if v < 0 { (v + d).max(0) } else { v.min(d) };
            let (st, en) = (clamp(st), clamp(en).max(clamp(st)));
            s[a as usize] = Dim::Fixed(en - st);
            nstarts.push(st);
            nends.push(en);
        }
        let (st, en, ax) = (self.const_i64(&nstarts), self.const_i64(&nends), self.const_i64(&axes_n));
        let e = self.elem(x);
        self.node(Op::Slice { axes: axes_n, starts: nstarts, ends: nends }, "Slice", &[x, st, en, ax], vec![], e, s)
    }

    /// `Gather` along `axis` with int64 indices (output rank = rank(x) - 1 + rank(indices)).
    pub fn gather(&mut self, x: Value, indices: Value, axis: i64) -> Value {
        assert_eq!(self.elem(indices), ElemType::I64, "Gather: indices must be int64");
        let r = self.rank(x);
        let a = norm_axis(axis, r);
        let sx = self.shape(x);
        let mut s: Vec<Dim> = sx[..a].to_vec();
        s.extend(self.shape(indices).iter().cloned());
        s.extend(sx[a + 1..].iter().cloned());
        let e = self.elem(x);
        self.node(Op::Gather(a as i64), "Gather", &[x, indices], vec![attr_i("axis", a as i64)], e, s)
    }

    /// Select index `i` along `axis` (a Gather with a scalar index; the axis disappears).
    pub fn select(&mut self, x: Value, axis: i64, i: i64) -> Value {
        let idx = self.scalar_i64(i);
        self.gather(x, idx, axis)
    }

    /// `GatherElements` along `axis` (output has the indices' shape).
    pub fn gather_elements(&mut self, x: Value, indices: Value, axis: i64) -> Value {
        assert_eq!(self.elem(indices), ElemType::I64, "GatherElements: indices must be int64");
        let a = norm_axis(axis, self.rank(x));
        let s = self.shape(indices).to_vec();
        let e = self.elem(x);
        self.node(Op::GatherElements(a as i64), "GatherElements", &[x, indices], vec![attr_i("axis", a as i64)], e, s)
    }

    /// `ScatterElements(data, indices, updates, reduction=add)` along `axis`.
    pub fn scatter_elements_add(&mut self, data: Value, indices: Value, updates: Value, axis: i64) -> Value {
        let a = norm_axis(axis, self.rank(data));
        let (e, s) = (self.elem(data), self.shape(data).to_vec());
        self.node(
            Op::ScatterElementsAdd(a as i64),
            "ScatterElements",
            &[data, indices, updates],
            vec![attr_i("axis", a as i64), attr_s("reduction", "add")],
            e,
            s,
        )
    }

    /// `Split` along `axis` into parts of the given sizes.
    pub fn split(&mut self, x: Value, axis: i64, sizes: &[i64]) -> Vec<Value> {
        let a = norm_axis(axis, self.rank(x));
        if let Some(d) = self.shape(x)[a].fixed() {
            assert_eq!(sizes.iter().sum::<i64>(), d, "Split: sizes do not add up to the axis size");
        }
        let sp = self.const_i64(sizes);
        let e = self.elem(x);
        let outs = sizes
            .iter()
            .map(|&k| {
                let mut s = self.shape(x).to_vec();
                s[a] = Dim::Fixed(k);
                (e, s)
            })
            .collect();
        self.node_multi(Op::Split(a as i64), "Split", &[x, sp], vec![attr_i("axis", a as i64)], outs)
    }

    /// `Unsqueeze` at `axes` (of the output).
    pub fn unsqueeze(&mut self, x: Value, axes: &[i64]) -> Value {
        let r = self.rank(x) + axes.len();
        let mut ax: Vec<usize> = axes.iter().map(|&a| norm_axis(a, r)).collect();
        ax.sort_unstable();
        let mut s = self.shape(x).to_vec();
        for &a in &ax {
            s.insert(a, Dim::Fixed(1));
        }
        let c = self.const_i64(&ax.iter().map(|&a| a as i64).collect::<Vec<_>>());
        let e = self.elem(x);
        self.node(Op::Unsqueeze, "Unsqueeze", &[x, c], vec![], e, s)
    }

    /// `Squeeze` at `axes` (each of size 1).
    pub fn squeeze(&mut self, x: Value, axes: &[i64]) -> Value {
        let r = self.rank(x);
        let ax: Vec<usize> = axes.iter().map(|&a| norm_axis(a, r)).collect();
        let s = self.shape(x).iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, d)| d.clone()).collect();
        let c = self.const_i64(&ax.iter().map(|&a| a as i64).collect::<Vec<_>>());
        let e = self.elem(x);
        self.node(Op::Squeeze, "Squeeze", &[x, c], vec![], e, s)
    }

    /// `Expand(x, shape)` where `shape` is a runtime int64 tensor and `out` the declared result.
    pub fn expand(&mut self, x: Value, shape: Value, out: Vec<Dim>) -> Value {
        let e = self.elem(x);
        self.node(Op::Expand, "Expand", &[x, shape], vec![], e, out)
    }

    /// `Shape(x)` (int64, 1-D), optionally of `start..end` only.
    pub fn shape_of(&mut self, x: Value, range: Option<(i64, i64)>) -> Value {
        let r = self.rank(x) as i64;
        let (attrs, len) = match range {
            Some((s, e)) => {
                let n = |v: i64| if v < 0 { v + r } else { v.min(r) };
                (vec![attr_i("start", s), attr_i("end", e)], (n(e) - n(s)).max(0))
            }
            None => (vec![], r),
        };
        self.node(Op::NoGrad, "Shape", &[x], attrs, ElemType::I64, vec![Dim::Fixed(len)])
    }

    /// `Size(x)` as an int64 scalar.
    pub fn size_of(&mut self, x: Value) -> Value {
        self.node(Op::NoGrad, "Size", &[x], vec![], ElemType::I64, vec![])
    }

    /// A tensor of the given runtime shape filled with `value` (of type `elem`).
    pub fn constant_of_shape(&mut self, shape: Value, value: f64, elem: ElemType, out: Vec<Dim>) -> Value {
        let t = match elem {
            ElemType::I64 => TensorData::I64(vec![value as i64]),
            ElemType::Bool => TensorData::Bool(vec![value != 0.0]),
            e => TensorData::float(e, &[value]),
        };
        let tp = TensorProto { dims: vec![1], data_type: elem.onnx(), raw_data: t.raw_bytes(), ..Default::default() };
        self.node(Op::NoGrad, "ConstantOfShape", &[shape], vec![attr_t("value", tp)], elem, out)
    }

    /// Zeros of `x`'s shape and type.
    pub fn zeros_like(&mut self, x: Value) -> Value {
        let sh = self.shape_of(x, None);
        let (e, s) = (self.elem(x), self.shape(x).to_vec());
        self.constant_of_shape(sh, 0.0, e, s)
    }

    /// `Pad` with zeros; `pads` = [begin per axis..., end per axis...].
    pub fn pad(&mut self, x: Value, pads: &[i64]) -> Value {
        let r = self.rank(x);
        assert_eq!(pads.len(), 2 * r, "Pad: pads length");
        let s = self
            .shape(x)
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Fixed(v) => Dim::Fixed(v + pads[i] + pads[i + r]),
                d if pads[i] == 0 && pads[i + r] == 0 => d.clone(),
                _ => Dim::Unknown,
            })
            .collect();
        let p = self.const_i64(pads);
        let e = self.elem(x);
        self.node(Op::Pad, "Pad", &[x, p], vec![], e, s)
    }

    /// One-hot encoding of int64 `indices` with `depth` classes, in the graph float type (last axis).
    pub fn one_hot(&mut self, indices: Value, depth: usize) -> Value {
        let d = self.const_i64(&[depth as i64]);
        let vals = self.const_float(&[2], &[0.0, 1.0]);
        let mut s = self.shape(indices).to_vec();
        s.push(Dim::Fixed(depth as i64));
        let e = self.float;
        self.node(Op::NoGrad, "OneHot", &[indices, d, vals], vec![attr_i("axis", -1)], e, s)
    }

    // ----- normalisation, reductions -----

    /// `LayerNormalization` over the last axis with scale `g` and bias `b` (biased variance).
    pub fn layer_norm(&mut self, x: Value, g: Value, b: Value, eps: f64) -> Value {
        self.check_float(x, "LayerNormalization");
        let (e, s) = (self.elem(x), self.shape(x).to_vec());
        let stash = if e == ElemType::F64 { data_type::DOUBLE } else { data_type::FLOAT };
        self.node(
            Op::LayerNorm { eps },
            "LayerNormalization",
            &[x, g, b],
            vec![attr_i("axis", -1), attr_f("epsilon", eps as f32), attr_i("stash_type", stash as i64)],
            e,
            s,
        )
    }

    /// The mean and inverse standard deviation a `LayerNormalization` node `k` computes, as its
    /// optional second and third outputs (shape of the input with the normalised axis 1, stash
    /// type = the input's type); added on first request so forward-only graphs keep one output.
    pub(crate) fn layer_norm_stats(&mut self, k: usize) -> (Value, Value) {
        assert!(matches!(self.nodes[k].op, Op::LayerNorm { .. }), "layer_norm_stats: node {k} is not a LayerNorm");
        if self.nodes[k].outputs.len() == 1 {
            let x = self.nodes[k].inputs[0];
            let (e, mut s) = (self.elem(x), self.shape(x).to_vec());
            *s.last_mut().expect("LayerNormalization input has rank >= 1") = Dim::Fixed(1);
            let mean = self.new_value(e, s.clone(), Some(k));
            let inv = self.new_value(e, s, Some(k));
            self.nodes[k].outputs.extend([mean, inv]);
        }
        (self.nodes[k].outputs[1], self.nodes[k].outputs[2])
    }

    /// Turn quick_gelu node `k` (`Mul(x, s)`, `s = Sigmoid(Mul(x, alpha))`) into one
    /// `QuickGeluWithSigmoid(x) -> [y, s]` node of [`custom::DOMAIN`] (gradient graphs with fused
    /// kernels: the backward reads x and s). The Sigmoid and scaling nodes are left without
    /// consumers and are not serialised. Does nothing to a node already fused.
    pub(crate) fn fuse_quick_gelu(&mut self, k: usize) {
        let Op::QuickGelu(alpha) = self.nodes[k].op else { panic!("fuse_quick_gelu: node {k} is not a quick_gelu") };
        if self.nodes[k].inputs.len() == 1 {
            return;
        }
        let (x, s) = (self.nodes[k].inputs[0], self.nodes[k].inputs[1]);
        let sig = self.values[s.0].producer.expect("quick_gelu's s comes from a Sigmoid node");
        assert_eq!(self.nodes[sig].op, Op::Sigmoid, "quick_gelu's s comes from a Sigmoid node");
        let used_elsewhere = self.nodes.iter().enumerate().any(|(j, n)| j != k && n.inputs.contains(&s))
            || self.outputs.iter().any(|o| o.1 == s);
        if used_elsewhere {
            return;
        }
        // The Sigmoid node now writes a value nobody reads.
        let (e, sh) = (self.elem(s), self.shape(s).to_vec());
        let dead = self.new_value(e, sh, Some(sig));
        self.nodes[sig].outputs = vec![dead];
        self.values[s.0].producer = Some(k);
        let n = &mut self.nodes[k];
        n.inputs = vec![x];
        n.outputs.push(s);
        n.op_type = "QuickGeluWithSigmoid";
        n.attrs = vec![attr_s("alpha", &alpha.to_string())];
        n.domain = custom::DOMAIN;
    }

    /// Softmax along `axis` (use the last axis: ORT's fast path).
    pub fn softmax(&mut self, x: Value, axis: i64) -> Value {
        let a = norm_axis(axis, self.rank(x)) as i64;
        self.unary(Op::Softmax(a), "Softmax", x, vec![attr_i("axis", a)])
    }

    /// LogSoftmax along `axis`.
    pub fn log_softmax(&mut self, x: Value, axis: i64) -> Value {
        let a = norm_axis(axis, self.rank(x)) as i64;
        self.unary(Op::LogSoftmax(a), "LogSoftmax", x, vec![attr_i("axis", a)])
    }

    fn reduce(&mut self, mean: bool, x: Value, axes: &[i64], keepdims: bool) -> Value {
        let r = self.rank(x);
        let mut ax: Vec<i64> = axes.iter().map(|&a| norm_axis(a, r) as i64).collect();
        ax.sort_unstable();
        ax.dedup();
        let s = self
            .shape(x)
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match (ax.contains(&(i as i64)), keepdims) {
                (false, _) => Some(d.clone()),
                (true, true) => Some(Dim::Fixed(1)),
                (true, false) => None,
            })
            .collect();
        let c = self.const_i64(&ax);
        let e = self.elem(x);
        let (op, name) = if mean {
            (Op::ReduceMean { axes: ax, keepdims }, "ReduceMean")
        } else {
            (Op::ReduceSum { axes: ax, keepdims }, "ReduceSum")
        };
        self.node(op, name, &[x, c], vec![attr_i("keepdims", keepdims as i64)], e, s)
    }

    /// Sum over `axes` (must be non-empty).
    pub fn reduce_sum(&mut self, x: Value, axes: &[i64], keepdims: bool) -> Value {
        assert!(!axes.is_empty(), "ReduceSum: give the axes explicitly");
        self.reduce(false, x, axes, keepdims)
    }

    /// Mean over `axes` (must be non-empty).
    pub fn reduce_mean(&mut self, x: Value, axes: &[i64], keepdims: bool) -> Value {
        assert!(!axes.is_empty(), "ReduceMean: give the axes explicitly");
        self.reduce(true, x, axes, keepdims)
    }

    /// Sum of all elements, a scalar.
    pub fn sum_all(&mut self, x: Value) -> Value {
        let r = self.rank(x) as i64;
        if r == 0 {
            return x;
        }
        let axes: Vec<i64> = (0..r).collect();
        self.reduce_sum(x, &axes, false)
    }

    /// `x / ||x||` along the last axis (L2, no epsilon, like CLIP).
    pub fn l2_normalize(&mut self, x: Value) -> Value {
        let sq = self.square(x);
        let ss = self.reduce_sum(sq, &[-1], true);
        let n = self.sqrt(ss);
        self.div(x, n)
    }

    /// Number of elements of `x` divided by that of `y`, as a float scalar (e.g. a mean's count).
    pub fn size_ratio(&mut self, x: Value, y: Value) -> Value {
        let sx = self.size_of(x);
        let sy = self.size_of(y);
        let fx = self.cast(sx, self.float);
        let fy = self.cast(sy, self.float);
        self.div(fx, fy)
    }

    // ----- differentiation -----

    /// Gradient of the scalar `y` with respect to each of `wrt` (same shapes). Values that `y` does
    /// not depend on get zeros.
    pub fn grad(&mut self, y: Value, wrt: &[Value]) -> Vec<Value> {
        assert_eq!(self.rank(y), 0, "grad: the output must be a scalar (use vjp for a tensor)");
        let one = self.scalar(1.0);
        self.vjp(&[(y, one)], wrt)
    }

    /// Vector-Jacobian product: the gradient of `sum_i sum(seed_i * y_i)` with respect to each of
    /// `wrt`, for pairs `(y_i, seed_i)` of equal shapes.
    pub fn vjp(&mut self, seeds: &[(Value, Value)], wrt: &[Value]) -> Vec<Value> {
        let start = self.nodes.len();
        self.backward_from = Some(self.backward_from.map_or(start, |b| b.min(start)));
        autodiff::vjp(self, seeds, wrt)
    }

    // ----- serialisation -----

    fn value_info(&self, v: Value, name: &str, with_shape: bool) -> ValueInfoProto {
        use proto::tensor_shape_proto::{Dimension, dimension};
        let vd = &self.values[v.0];
        let shape = if with_shape {
            Some(proto::TensorShapeProto {
                dim: vd
                    .shape
                    .iter()
                    .map(|d| Dimension {
                        value: match d {
                            Dim::Fixed(x) => Some(dimension::Value::DimValue(*x)),
                            Dim::Sym(s) => Some(dimension::Value::DimParam(s.clone())),
                            Dim::Unknown => None,
                        },
                        denotation: String::new(),
                    })
                    .collect(),
            })
        } else {
            None
        };
        ValueInfoProto {
            name: name.into(),
            r#type: Some(proto::TypeProto {
                value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                    elem_type: vd.elem.onnx(),
                    shape,
                })),
                denotation: String::new(),
            }),
            doc_string: String::new(),
        }
    }

    /// The graph as an ONNX model (opset 21, IR 10).
    pub fn to_model(&self) -> proto::ModelProto {
        self.to_model_with(false)
    }

    /// The graph as an ONNX model whose external initializers (the weights) are graph inputs
    /// instead, declared after the other inputs in initializer order: the weights are then fed with
    /// every run, so one session serves any number of weight sets (see
    /// `runtime::Model::update_weights`).
    pub fn to_model_weights_as_inputs(&self) -> proto::ModelProto {
        self.to_model_with(true)
    }

    /// Serialised [`Graph::to_model_weights_as_inputs`].
    pub fn to_bytes_weights_as_inputs(&self) -> Vec<u8> {
        use prost::Message;
        self.to_model_weights_as_inputs().encode_to_vec()
    }

    /// The graph as an ONNX model whose external initializers (the weights) stay external
    /// initializers for the forward nodes, while the backward nodes ([`Graph::vjp`]) read them
    /// from graph inputs named `<weight>` + [`BACKWARD_ALIAS`] (listed by
    /// [`Graph::backward_weight_aliases`]), fed with every run from the same buffers. ONNX Runtime
    /// pre-packs the weights of MatMul-like nodes that read constant initializers (one packed copy
    /// per orientation): the forward's packed `W^T` is then the only copy it makes, and sessions
    /// given one pre-packed weights container share it. Equals [`Graph::to_model`] without a
    /// backward pass.
    pub fn to_model_backward_weights_as_inputs(&self) -> proto::ModelProto {
        self.to_model_impl(false, true)
    }

    /// Serialised [`Graph::to_model_backward_weights_as_inputs`].
    pub fn to_bytes_backward_weights_as_inputs(&self) -> Vec<u8> {
        use prost::Message;
        self.to_model_backward_weights_as_inputs().encode_to_vec()
    }

    /// `(graph input, weight)` pairs of [`Graph::to_model_backward_weights_as_inputs`]: the
    /// external initializers backward nodes read, in initializer order.
    pub fn backward_weight_aliases(&self) -> Vec<(String, String)> {
        let read = self.backward_reads();
        self.inits
            .iter()
            .filter(|i| i.data.is_none() && read[i.value.0])
            .map(|i| (format!("{}{BACKWARD_ALIAS}", self.name(i.value)), self.name(i.value)))
            .collect()
    }

    /// Values some backward node reads.
    fn backward_reads(&self) -> Vec<bool> {
        let mut read = vec![false; self.values.len()];
        for n in self.nodes.iter().skip(self.backward_from.unwrap_or(self.nodes.len())) {
            for i in &n.inputs {
                read[i.0] = true;
            }
        }
        read
    }

    fn to_model_with(&self, weights_as_inputs: bool) -> proto::ModelProto {
        self.to_model_impl(weights_as_inputs, false)
    }

    fn to_model_impl(&self, weights_as_inputs: bool, backward_alias: bool) -> proto::ModelProto {
        // Nodes whose outputs nobody reads (left by [`Graph::fuse_quick_gelu`]) are not written.
        let mut read = vec![false; self.values.len()];
        for (_, v) in &self.outputs {
            read[v.0] = true;
        }
        let mut live = vec![false; self.nodes.len()];
        for (k, n) in self.nodes.iter().enumerate().rev() {
            if n.outputs.iter().any(|o| read[o.0]) {
                live[k] = true;
                n.inputs.iter().for_each(|i| read[i.0] = true);
            }
        }
        let external = |v: Value| {
            self.values[v.0].producer.is_none() && self.inits.iter().any(|i| i.value == v && i.data.is_none())
        };
        let aliased: Vec<bool> = if backward_alias {
            let read = self.backward_reads();
            (0..self.values.len()).map(|k| read[k] && external(Value(k))).collect()
        } else {
            vec![false; self.values.len()]
        };
        let from = self.backward_from.unwrap_or(self.nodes.len());
        let input_name = |k: usize, v: Value| {
            if k >= from && aliased[v.0] { format!("{}{BACKWARD_ALIAS}", self.name(v)) } else { self.name(v) }
        };
        let used = read;
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(k, _)| live[*k])
            .map(|(k, n)| NodeProto {
                input: n.inputs.iter().map(|&v| input_name(k, v)).collect(),
                output: n.outputs.iter().map(|&v| self.name(v)).collect(),
                name: format!("n{k}_{}", n.op_type),
                op_type: n.op_type.into(),
                attribute: n.attrs.clone(),
                doc_string: String::new(),
                domain: n.domain.into(),
            })
            .collect();
        let initializer = self
            .inits
            .iter()
            .filter(|i| (used[i.value.0] || i.data.is_none()) && !(weights_as_inputs && i.data.is_none()))
            .map(|i| {
                let vd = &self.values[i.value.0];
                let dims: Vec<i64> =
                    vd.shape.iter().map(|d| d.fixed().expect("initializer shapes are fixed")).collect();
                let mut t =
                    TensorProto { dims, data_type: vd.elem.onnx(), name: self.name(i.value), ..Default::default() };
                match &i.data {
                    Some(d) => t.raw_data = d.raw_bytes(),
                    None => {
                        let n: i64 = t.dims.iter().product();
                        let bytes = n * if vd.elem == ElemType::F64 { 8 } else { 4 };
                        t.data_location = proto::data_location::EXTERNAL;
                        t.external_data = vec![
                            proto::StringStringEntryProto {
                                key: "location".into(),
                                value: "external-weights.bin".into(),
                            },
                            proto::StringStringEntryProto { key: "offset".into(), value: "0".into() },
                            proto::StringStringEntryProto { key: "length".into(), value: bytes.to_string() },
                        ];
                    }
                }
                t
            })
            .collect();
        let graph = proto::GraphProto {
            node: nodes,
            name: self.name.clone(),
            initializer,
            doc_string: String::new(),
            input: self
                .inputs
                .iter()
                .copied()
                .chain(self.inits.iter().filter(|i| weights_as_inputs && i.data.is_none()).map(|i| i.value))
                .map(|v| self.value_info(v, &self.name(v), true))
                .chain(
                    self.inits
                        .iter()
                        .filter(|i| aliased[i.value.0])
                        .map(|i| self.value_info(i.value, &format!("{}{BACKWARD_ALIAS}", self.name(i.value)), true)),
                )
                .collect(),
            output: self
                .outputs
                .iter()
                .map(|(n, v)| {
                    let known = !self.values[v.0].shape.contains(&Dim::Unknown);
                    self.value_info(*v, n, known)
                })
                .collect(),
            value_info: Vec::new(),
        };
        proto::ModelProto {
            ir_version: IR_VERSION,
            producer_name: "mergeattack".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            domain: String::new(),
            model_version: 1,
            doc_string: String::new(),
            graph: Some(graph),
            opset_import: std::iter::once(proto::OperatorSetIdProto { domain: String::new(), version: OPSET })
                .chain(self.nodes.iter().any(|n| n.domain == custom::DOMAIN).then(|| proto::OperatorSetIdProto {
                    domain: custom::DOMAIN.into(),
                    version: custom::DOMAIN_VERSION,
                }))
                .collect(),
            metadata_props: Vec::new(),
        }
    }

    /// Serialised `ModelProto` bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        use prost::Message;
        self.to_model().encode_to_vec()
    }
}
