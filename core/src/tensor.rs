//! Named f32 tensors: the only thing merges see.
//!
//! A [`ParamSet`] maps tensor names (sorted, as `BTreeMap` keeps them) to f32 arrays that are
//! either borrowed (a zero-copy view of a memory-mapped F32 checkpoint) or owned (converted from
//! F16/BF16, or computed). Merges read borrowed sets and return owned ones.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use ndarray::{ArrayD, ArrayViewD, CowArray, IxDyn};

/// One tensor, borrowed or owned.
pub type Tensor<'a> = CowArray<'a, f32, IxDyn>;

/// Named tensors in sorted-name order.
#[derive(Clone, Debug, Default)]
pub struct ParamSet<'a> {
    tensors: BTreeMap<String, Tensor<'a>>,
}

/// A problem with the tensors handed to a merge or a model.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorError {
    /// `model` lacks the tensor `name` that the base model has.
    Missing { name: String, model: String },
    /// The tensor `name` has shape `got` in `model` but `expected` in the base model.
    Shape { name: String, model: String, expected: Vec<usize>, got: Vec<usize> },
    /// The tensor `name` of `model` holds a NaN or an infinity at flat index `index`.
    NotFinite { name: String, model: String, index: usize },
}

impl fmt::Display for TensorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorError::Missing { name, model } => {
                write!(f, "tensor `{name}` is missing in {model} (the base model has it)")
            }
            TensorError::Shape { name, model, expected, got } => {
                write!(f, "tensor `{name}` has shape {got:?} in {model} but {expected:?} in the base model")
            }
            TensorError::NotFinite { name, model, index } => {
                write!(f, "tensor `{name}` in {model} holds a NaN or infinite value at flat index {index}")
            }
        }
    }
}

impl<'a> ParamSet<'a> {
    pub fn new() -> Self {
        ParamSet { tensors: BTreeMap::new() }
    }

    /// Insert a tensor, replacing any tensor of the same name.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor<'a>) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Insert an owned array.
    pub fn insert_owned(&mut self, name: impl Into<String>, array: ArrayD<f32>) {
        self.tensors.insert(name.into(), CowArray::from(array));
    }

    /// Insert a borrowed view.
    pub fn insert_view(&mut self, name: impl Into<String>, view: ArrayViewD<'a, f32>) {
        self.tensors.insert(name.into(), CowArray::from(view));
    }

    pub fn get(&self, name: &str) -> Option<&Tensor<'a>> {
        self.tensors.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor<'a>> {
        self.tensors.get_mut(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor<'a>> {
        self.tensors.remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// (name, tensor) pairs in sorted-name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor<'a>)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of f32 entries.
    pub fn numel(&self) -> usize {
        self.tensors.values().map(|t| t.len()).sum()
    }

    /// A copy whose tensors are all owned, detached from any borrowed storage.
    pub fn into_owned(self) -> ParamSet<'static> {
        ParamSet { tensors: self.tensors.into_iter().map(|(k, v)| (k, CowArray::from(v.into_owned()))).collect() }
    }

    /// Check that every tensor is finite; `model` names this set in the error.
    pub fn check_finite(&self, model: &str) -> Result<(), TensorError> {
        for (name, t) in self.iter() {
            if let Some(index) = t.iter().position(|v| !v.is_finite()) {
                return Err(TensorError::NotFinite { name: name.into(), model: model.into(), index });
            }
        }
        Ok(())
    }

    /// Check that `other` holds every tensor of `self` named in `names` with the same shape.
    pub fn check_compatible<'n>(
        &self,
        other: &ParamSet<'_>,
        other_model: &str,
        names: impl IntoIterator<Item = &'n str>,
    ) -> Result<(), TensorError> {
        for name in names {
            let Some(expected) = self.get(name) else { continue };
            let Some(got) = other.get(name) else {
                return Err(TensorError::Missing { name: name.into(), model: other_model.into() });
            };
            if expected.shape() != got.shape() {
                return Err(TensorError::Shape {
                    name: name.into(),
                    model: other_model.into(),
                    expected: expected.shape().to_vec(),
                    got: got.shape().to_vec(),
                });
            }
        }
        Ok(())
    }
}

impl<'a> FromIterator<(String, Tensor<'a>)> for ParamSet<'a> {
    fn from_iter<I: IntoIterator<Item = (String, Tensor<'a>)>>(iter: I) -> Self {
        ParamSet { tensors: iter.into_iter().collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ArrayD;

    #[test]
    fn compatibility_errors_name_the_tensor() {
        let mut a = ParamSet::new();
        a.insert_owned("w", ArrayD::zeros(IxDyn(&[2, 3])));
        let mut b = ParamSet::new();
        b.insert_owned("w", ArrayD::zeros(IxDyn(&[3, 2])));
        let e = a.check_compatible(&b, "ft1.safetensors", ["w"]).unwrap_err();
        assert_eq!(
            alloc::format!("{e}"),
            "tensor `w` has shape [3, 2] in ft1.safetensors but [2, 3] in the base model"
        );
        let c = ParamSet::new();
        assert!(matches!(a.check_compatible(&c, "x", ["w"]), Err(TensorError::Missing { .. })));
    }

    #[test]
    fn finite_check_finds_nan() {
        let mut a = ParamSet::new();
        let mut t = ArrayD::zeros(IxDyn(&[4]));
        t[[2]] = f32::NAN;
        a.insert_owned("b", t);
        assert_eq!(
            a.check_finite("m").unwrap_err(),
            TensorError::NotFinite { name: "b".into(), model: "m".into(), index: 2 }
        );
    }
}
