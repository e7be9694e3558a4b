//! Metrics of the study (METHODS.md "Metrics"), from per-image predictions, input gradients and
//! features. Every ratio whose denominator is zero is *not available*: `None`, shown as "n/a" by
//! [`Na`], never a number.
//!
//! Predictions come as [`Outcomes`]: for one model on one task's N test images, the labels, the
//! model's clean top-1 predictions and its top-1 predictions on a set of adversarial images X (the
//! same N images, perturbed). Names follow METHODS.md:
//! - `acc(M)` = #{clean correct} / N; `asr_all(M, X)` = #{adv wrong} / N;
//!   `asr_cc(M, X)` = #{clean correct and adv wrong} / #{clean correct}.
//! - White-box: the surrogate's own outcomes on its X_S; transfer: `tasr_*(S->T) = asr_*(T, X_S)`.
//! - `rtasr_wb_all = tasr_all(S->T) / asr_all(S, X_S)`; `rtasr_wb_cc = tasr_cc(S->T) / asr_cc(S, X_S)`
//!   (numerator over T-correct images, denominator over S-correct images);
//!   `rtasr_ref_* = tasr_*(S->T_merged) / tasr_*(S->T_ref)`;
//!   `transfer_rate` = #{both clean correct, S fooled, T fooled} / #{both clean correct, S fooled}.
//!
//! Bootstrap: [`Outcomes::select`] views the same outcomes through a list of image indices (with
//! repetitions), so `|idx| rtasr_wb_cc(&s.select(idx).ok()?, &t.select(idx).ok()?).ok()?` is the
//! jointly resampled statistic for [`crate::stats::bootstrap_ci`]; [`mean_at`] and [`mean_defined_at`]
//! do the same for the per-image values of the gradient alignment and the representation bias.

use alloc::vec::Vec;
use core::fmt;

use ndarray::{ArrayView2, ArrayViewD};

/// Why a metric cannot be computed from its inputs.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricError {
    /// Two per-image inputs that must describe the same images have different lengths.
    LengthMismatch { what: &'static str, expected: usize, got: usize },
    /// Two models' outcomes disagree on the label of an image: they are not the same images.
    LabelsDiffer { image: usize, first: usize, second: usize },
    /// An image index outside 0..len.
    IndexOutOfRange { index: usize, len: usize },
    /// Two arrays that must have the same shape do not.
    ShapeMismatch { what: &'static str, first: Vec<usize>, second: Vec<usize> },
    /// A NaN or infinite value in a gradient or feature.
    NonFinite { what: &'static str, image: usize },
}

impl fmt::Display for MetricError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricError::LengthMismatch { what, expected, got } => {
                write!(f, "{what} has {got} images where {expected} were expected")
            }
            MetricError::LabelsDiffer { image, first, second } => {
                write!(f, "the two models' outcomes disagree on the label of image {image} ({first} vs {second})")
            }
            MetricError::IndexOutOfRange { index, len } => {
                write!(f, "image index {index} is out of range for {len} images")
            }
            MetricError::ShapeMismatch { what, first, second } => {
                write!(f, "{what} have different shapes, {first:?} and {second:?}")
            }
            MetricError::NonFinite { what, image } => write!(f, "{what} of image {image} is not finite"),
        }
    }
}

/// Shows a metric value, or "n/a" when it is not available. Width and precision apply to both.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Na(pub Option<f64>);

impl fmt::Display for Na {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => fmt::Display::fmt(&v, f),
            None => f.pad("n/a"),
        }
    }
}

/// `num / den`, or `None` when `den` is zero.
fn ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// `a / b` of two available values with b != 0, else `None`.
fn ratio_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// One model's top-1 predictions on one task's images, clean and adversarial, optionally viewed
/// through a list of image indices.
#[derive(Clone, Copy, Debug)]
pub struct Outcomes<'a> {
    labels: &'a [usize],
    clean: &'a [usize],
    adv: &'a [usize],
    selection: Option<&'a [usize]>,
}

/// Raw counts behind the single-model metrics (over the selection, with repetitions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counts {
    /// Images (N).
    pub images: usize,
    /// Images classified correctly when clean.
    pub clean_correct: usize,
    /// Images whose adversarial version is misclassified.
    pub fooled: usize,
    /// Images correct when clean and misclassified when adversarial.
    pub fooled_clean_correct: usize,
}

impl<'a> Outcomes<'a> {
    /// Labels, clean predictions and adversarial predictions of the same images, in the same order.
    pub fn new(labels: &'a [usize], clean: &'a [usize], adv: &'a [usize]) -> Result<Self, MetricError> {
        let n = labels.len();
        if clean.len() != n {
            return Err(MetricError::LengthMismatch { what: "the clean predictions", expected: n, got: clean.len() });
        }
        if adv.len() != n {
            return Err(MetricError::LengthMismatch {
                what: "the adversarial predictions",
                expected: n,
                got: adv.len(),
            });
        }
        Ok(Outcomes { labels, clean, adv, selection: None })
    }

    /// Number of images underlying these outcomes (before any selection).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The same outcomes seen through `indices` (each a position in 0..len, repetitions allowed):
    /// a bootstrap resample. Selecting again replaces the selection.
    pub fn select(&self, indices: &'a [usize]) -> Result<Self, MetricError> {
        if let Some(&index) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(MetricError::IndexOutOfRange { index, len: self.len() });
        }
        Ok(Outcomes { selection: Some(indices), ..*self })
    }

    fn for_each(&self, mut f: impl FnMut(usize)) {
        match self.selection {
            Some(sel) => sel.iter().for_each(|&i| f(i)),
            None => (0..self.len()).for_each(f),
        }
    }

    /// Counts over the images (or the selection).
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        self.for_each(|i| {
            let correct = self.clean[i] == self.labels[i];
            let fooled = self.adv[i] != self.labels[i];
            c.images += 1;
            c.clean_correct += usize::from(correct);
            c.fooled += usize::from(fooled);
            c.fooled_clean_correct += usize::from(correct && fooled);
        });
        c
    }

    /// Check that `other` describes the same images (same count, same labels over the selection).
    fn check_same_images(&self, other: &Outcomes<'_>) -> Result<(), MetricError> {
        if other.len() != self.len() {
            return Err(MetricError::LengthMismatch {
                what: "the second model's outcomes",
                expected: self.len(),
                got: other.len(),
            });
        }
        let (a, b) = (self.indices_len(), other.indices_len());
        if a != b {
            return Err(MetricError::LengthMismatch { what: "the second model's selection", expected: a, got: b });
        }
        let mut first_diff = None;
        let mut k = 0;
        let other_sel = other.selection;
        self.for_each(|i| {
            let j = other_sel.map_or(k, |s| s[k]);
            if first_diff.is_none() && self.labels[i] != other.labels[j] {
                first_diff = Some((i, self.labels[i], other.labels[j]));
            }
            k += 1;
        });
        match first_diff {
            Some((image, first, second)) => Err(MetricError::LabelsDiffer { image, first, second }),
            None => Ok(()),
        }
    }

    fn indices_len(&self) -> usize {
        self.selection.map_or(self.len(), <[usize]>::len)
    }
}

/// `acc(M)`: clean top-1 accuracy; `None` for no images.
pub fn acc(m: &Outcomes<'_>) -> Option<f64> {
    let c = m.counts();
    ratio(c.clean_correct, c.images)
}

/// `asr_all(M, X)`: fraction of all images whose adversarial version M misclassifies.
pub fn asr_all(m: &Outcomes<'_>) -> Option<f64> {
    let c = m.counts();
    ratio(c.fooled, c.images)
}

/// `asr_cc(M, X)`: the same over the images M classifies correctly when clean.
pub fn asr_cc(m: &Outcomes<'_>) -> Option<f64> {
    let c = m.counts();
    ratio(c.fooled_clean_correct, c.clean_correct)
}

/// `tasr_all(S->T) = asr_all(T, X_S)`: `target` holds T's predictions on X_S.
pub fn tasr_all(target: &Outcomes<'_>) -> Option<f64> {
    asr_all(target)
}

/// `tasr_cc(S->T) = asr_cc(T, X_S)`: `target` holds T's predictions on X_S.
pub fn tasr_cc(target: &Outcomes<'_>) -> Option<f64> {
    asr_cc(target)
}

/// `rtasr_wb_all = tasr_all(S->T) / asr_all(S, X_S)`: `surrogate` and `target` on the same X_S.
pub fn rtasr_wb_all(surrogate: &Outcomes<'_>, target: &Outcomes<'_>) -> Result<Option<f64>, MetricError> {
    surrogate.check_same_images(target)?;
    Ok(ratio_of(tasr_all(target), asr_all(surrogate)))
}

/// `rtasr_wb_cc = tasr_cc(S->T) / asr_cc(S, X_S)`: the numerator is over T-correct images, the
/// denominator over S-correct images.
pub fn rtasr_wb_cc(surrogate: &Outcomes<'_>, target: &Outcomes<'_>) -> Result<Option<f64>, MetricError> {
    surrogate.check_same_images(target)?;
    Ok(ratio_of(tasr_cc(target), asr_cc(surrogate)))
}

/// `rtasr_ref_all = tasr_all(S->T_merged) / tasr_all(S->T_ref)`: both on the same X_S.
pub fn rtasr_ref_all(merged: &Outcomes<'_>, reference: &Outcomes<'_>) -> Result<Option<f64>, MetricError> {
    merged.check_same_images(reference)?;
    Ok(ratio_of(tasr_all(merged), tasr_all(reference)))
}

/// `rtasr_ref_cc = tasr_cc(S->T_merged) / tasr_cc(S->T_ref)`: both on the same X_S.
pub fn rtasr_ref_cc(merged: &Outcomes<'_>, reference: &Outcomes<'_>) -> Result<Option<f64>, MetricError> {
    merged.check_same_images(reference)?;
    Ok(ratio_of(tasr_cc(merged), tasr_cc(reference)))
}

/// `transfer_rate` = P(T fooled | S fooled, both clean-correct), over the images both classify
/// correctly when clean and whose X_S version fools S.
pub fn transfer_rate(surrogate: &Outcomes<'_>, target: &Outcomes<'_>) -> Result<Option<f64>, MetricError> {
    surrogate.check_same_images(target)?;
    let (mut num, mut den) = (0, 0);
    let mut k = 0;
    let t_sel = target.selection;
    surrogate.for_each(|i| {
        let j = t_sel.map_or(k, |s| s[k]);
        k += 1;
        let s_correct = surrogate.clean[i] == surrogate.labels[i];
        let t_correct = target.clean[j] == target.labels[j];
        let s_fooled = surrogate.adv[i] != surrogate.labels[i];
        if s_correct && t_correct && s_fooled {
            den += 1;
            num += usize::from(target.adv[j] != target.labels[j]);
        }
    });
    Ok(ratio(num, den))
}

/// Mean of `values` over `indices` (repetitions count); `None` for no indices.
pub fn mean_at(values: &[f64], indices: &[usize]) -> Option<f64> {
    let mut sum = 0.0;
    for &i in indices {
        sum += *values.get(i)?;
    }
    ratio_of(Some(sum), Some(indices.len() as f64))
}

/// Mean of the available `values` over `indices`; `None` if none is available (or an index is out
/// of range).
pub fn mean_defined_at(values: &[Option<f64>], indices: &[usize]) -> Option<f64> {
    let (mut sum, mut count) = (0.0, 0usize);
    for &i in indices {
        if let Some(v) = *values.get(i)? {
            sum += v;
            count += 1;
        }
    }
    ratio_of(Some(sum), Some(count as f64))
}

/// Gradient alignment of a surrogate and a target on the same clean images.
#[derive(Clone, Debug, PartialEq)]
pub struct GradientAlignment {
    /// Mean cosine over the images where both gradients are nonzero; `None` if there is none.
    pub mean: Option<f64>,
    /// Images averaged.
    pub used: usize,
    /// Images skipped because a gradient has norm 0.
    pub skipped: usize,
    /// Per-image cosine, `None` where skipped.
    pub per_image: Vec<Option<f64>>,
}

/// Per image (axis 0), cos(vec grad_x L_S, vec grad_x L_T) = <a, b> / sqrt(|a|^2 |b|^2) in f64, averaged over images
/// where both norms are > 0. `surrogate` and `target` hold the input gradients with the same shape
/// [N, ...] (e.g. NCHW).
pub fn gradient_alignment(
    surrogate: ArrayViewD<'_, f32>,
    target: ArrayViewD<'_, f32>,
) -> Result<GradientAlignment, MetricError> {
    if surrogate.shape() != target.shape() || surrogate.ndim() == 0 {
        return Err(MetricError::ShapeMismatch {
            what: "the surrogate and target input gradients",
            first: surrogate.shape().to_vec(),
            second: target.shape().to_vec(),
        });
    }
    let mut per_image = Vec::with_capacity(surrogate.len_of(ndarray::Axis(0)));
    for (image, (a, b)) in surrogate.outer_iter().zip(target.outer_iter()).enumerate() {
        let (mut aa, mut bb, mut ab) = (0.0f64, 0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(b.iter()) {
            let (x, y) = (f64::from(x), f64::from(y));
            aa += x * x;
            bb += y * y;
            ab += x * y;
        }
        if !(aa.is_finite() && bb.is_finite() && ab.is_finite()) {
            return Err(MetricError::NonFinite { what: "an input gradient", image });
        }
        per_image.push((aa > 0.0 && bb > 0.0).then(|| (ab / libm::sqrt(aa * bb)).clamp(-1.0, 1.0)));
    }
    let used = per_image.iter().filter(|c| c.is_some()).count();
    let all: Vec<usize> = (0..per_image.len()).collect();
    Ok(GradientAlignment { mean: mean_defined_at(&per_image, &all), used, skipped: per_image.len() - used, per_image })
}

/// Representation bias of a merged model on one task (Representation Surgery's Dis).
#[derive(Clone, Debug, PartialEq)]
pub struct RepresentationBias {
    /// Mean over images of (1/d) ‖f_merged - f_t‖1; `None` for no images.
    pub mean: Option<f64>,
    /// Per-image (1/d) ‖f_merged - f_t‖1.
    pub per_image: Vec<f64>,
}

/// Mean over images of (1/d) ‖f_merged(x) - f_t(x)‖1 of the projected, unnormalised image features,
/// `merged` and `task` both [N, d] (d > 0), computed in f64.
pub fn representation_bias(
    merged: ArrayView2<'_, f32>,
    task: ArrayView2<'_, f32>,
) -> Result<RepresentationBias, MetricError> {
    if merged.shape() != task.shape() || merged.ncols() == 0 {
        return Err(MetricError::ShapeMismatch {
            what: "the merged and task model features",
            first: merged.shape().to_vec(),
            second: task.shape().to_vec(),
        });
    }
    let d = merged.ncols() as f64;
    let mut per_image = Vec::with_capacity(merged.nrows());
    for (image, (a, b)) in merged.outer_iter().zip(task.outer_iter()).enumerate() {
        let l1: f64 = a.iter().zip(b.iter()).map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs()).sum();
        if !l1.is_finite() {
            return Err(MetricError::NonFinite { what: "a feature vector", image });
        }
        per_image.push(l1 / d);
    }
    let all: Vec<usize> = (0..per_image.len()).collect();
    Ok(RepresentationBias { mean: mean_at(&per_image, &all), per_image })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;
    use ndarray::{Array2, array};

    // Eight images. Surrogate S: clean correct on 0..6, fooled (adv != y) on 0,1,2,3,6.
    // Target T: clean correct on 0,1,2,4,6,7, fooled on 0,2,5,7.
    const Y: [usize; 8] = [0, 1, 2, 3, 0, 1, 2, 3];
    const S_CLEAN: [usize; 8] = [0, 1, 2, 3, 0, 1, 0, 0];
    const S_ADV: [usize; 8] = [1, 2, 3, 0, 0, 1, 0, 3];
    const T_CLEAN: [usize; 8] = [0, 1, 2, 0, 0, 0, 2, 3];
    const T_ADV: [usize; 8] = [3, 1, 0, 3, 0, 0, 2, 0];

    fn s() -> Outcomes<'static> {
        Outcomes::new(&Y, &S_CLEAN, &S_ADV).unwrap()
    }
    fn t() -> Outcomes<'static> {
        Outcomes::new(&Y, &T_CLEAN, &T_ADV).unwrap()
    }

    #[test]
    fn single_model_metrics_by_hand() {
        // S: correct {0,1,2,3,4,5} = 6/8; fooled {0,1,2,3,6} = 5/8; fooled & correct {0,1,2,3} = 4/6.
        assert_eq!(s().counts(), Counts { images: 8, clean_correct: 6, fooled: 5, fooled_clean_correct: 4 });
        assert_eq!(acc(&s()), Some(0.75));
        assert_eq!(asr_all(&s()), Some(0.625));
        assert_eq!(asr_cc(&s()), Some(4.0 / 6.0));
        // T: correct {0,1,2,4,6,7} = 6/8; fooled {0,2,5,7} = 4/8; fooled & correct {0,2,7} = 3/6.
        assert_eq!(tasr_all(&t()), Some(0.5));
        assert_eq!(tasr_cc(&t()), Some(0.5));
    }

    #[test]
    fn relative_metrics_by_hand() {
        assert_eq!(rtasr_wb_all(&s(), &t()).unwrap(), Some(0.5 / 0.625));
        assert_eq!(rtasr_wb_cc(&s(), &t()).unwrap(), Some(0.5 / (4.0 / 6.0)));
        assert_eq!(rtasr_ref_all(&t(), &s()).unwrap(), Some(0.5 / 0.625));
        assert_eq!(rtasr_ref_cc(&t(), &s()).unwrap(), Some(0.5 / (4.0 / 6.0)));
        // Both correct: {0,1,2,4}; of those S fooled: {0,1,2}; T fooled among them: {0,2} -> 2/3.
        assert_eq!(transfer_rate(&s(), &t()).unwrap(), Some(2.0 / 3.0));
    }

    #[test]
    fn zero_denominators_are_not_available() {
        let empty = Outcomes::new(&[], &[], &[]).unwrap();
        assert_eq!((acc(&empty), asr_all(&empty), asr_cc(&empty)), (None, None, None));
        // Never correct when clean: asr_cc has no denominator.
        let wrong = Outcomes::new(&[0, 1], &[1, 0], &[1, 0]).unwrap();
        assert_eq!((acc(&wrong), asr_cc(&wrong)), (Some(0.0), None));
        // Surrogate never fooled: relative metrics and transfer rate have no denominator.
        let robust = Outcomes::new(&[0, 1], &[0, 1], &[0, 1]).unwrap();
        let fooled = Outcomes::new(&[0, 1], &[0, 1], &[1, 0]).unwrap();
        assert_eq!(rtasr_wb_all(&robust, &fooled).unwrap(), None);
        assert_eq!(rtasr_wb_cc(&robust, &fooled).unwrap(), None);
        assert_eq!(rtasr_ref_all(&fooled, &robust).unwrap(), None);
        assert_eq!(rtasr_ref_cc(&fooled, &robust).unwrap(), None);
        assert_eq!(transfer_rate(&robust, &fooled).unwrap(), None);
        // The other way round every one of them is a number.
        assert_eq!(rtasr_wb_all(&fooled, &robust).unwrap(), Some(0.0));
        assert_eq!(transfer_rate(&fooled, &fooled).unwrap(), Some(1.0));
        assert_eq!(format!("{}", Na(None)), "n/a");
        assert_eq!(format!("{:>5}|{:.2}", Na(None), Na(Some(0.125))), "  n/a|0.12");
    }

    #[test]
    fn selection_recomputes_jointly() {
        // Images 0, 0, 3, 6: S correct {0,0,3}, fooled {0,0,3,6}; T correct {0,0,6}, fooled {0,0}.
        let idx = [0, 0, 3, 6];
        let (ss, ts) = (s().select(&idx).unwrap(), t().select(&idx).unwrap());
        assert_eq!(ss.counts(), Counts { images: 4, clean_correct: 3, fooled: 4, fooled_clean_correct: 3 });
        assert_eq!(acc(&ts), Some(0.75));
        assert_eq!(rtasr_wb_cc(&ss, &ts).unwrap(), Some((2.0 / 3.0) / 1.0));
        // Both correct: {0, 0}; S fooled on both; T fooled on both.
        assert_eq!(transfer_rate(&ss, &ts).unwrap(), Some(1.0));
        assert!(matches!(s().select(&[8]), Err(MetricError::IndexOutOfRange { index: 8, len: 8 })));
    }

    #[test]
    fn bootstrap_of_a_ratio_of_ratios_resamples_both_models_jointly() {
        // 200 images: S correct on all but every 10th and fooled on 3 of 4; T fooled on every other.
        let y: Vec<usize> = (0..200).map(|i| i % 5).collect();
        let s_clean: Vec<usize> = (0..200).map(|i| if i % 10 == 0 { 9 } else { i % 5 }).collect();
        let s_adv: Vec<usize> = (0..200).map(|i| if i % 4 == 0 { i % 5 } else { 9 }).collect();
        let t_adv: Vec<usize> = (0..200).map(|i| if i % 2 == 0 { 9 } else { i % 5 }).collect();
        let s = Outcomes::new(&y, &s_clean, &s_adv).unwrap();
        let t = Outcomes::new(&y, &y, &t_adv).unwrap();
        let stat = |idx: &[usize]| rtasr_wb_cc(&s.select(idx).ok()?, &t.select(idx).ok()?).ok()?;
        let a = crate::stats::bootstrap_ci_seeded(200, 3, &[b"bootstrap", b"rtasr_wb_cc"], stat).unwrap();
        let b = crate::stats::bootstrap_ci_seeded(200, 3, &[b"bootstrap", b"rtasr_wb_cc"], stat).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.estimate, rtasr_wb_cc(&s, &t).unwrap());
        let (lo, est, hi) = (a.lo.unwrap(), a.estimate.unwrap(), a.hi.unwrap());
        assert!(lo < est && est < hi, "{lo} {est} {hi}");
        assert_eq!(a.dropped, 0);
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        assert!(matches!(Outcomes::new(&Y, &S_CLEAN[..7], &S_ADV), Err(MetricError::LengthMismatch { .. })));
        let other_labels = [0, 1, 2, 3, 0, 1, 2, 2];
        let o = Outcomes::new(&other_labels, &T_CLEAN, &T_ADV).unwrap();
        let err = rtasr_wb_all(&s(), &o).unwrap_err();
        assert_eq!(err, MetricError::LabelsDiffer { image: 7, first: 3, second: 2 });
        assert!(format!("{err}").contains("image 7"));
        let short = Outcomes::new(&Y[..4], &T_CLEAN[..4], &T_ADV[..4]).unwrap();
        assert!(transfer_rate(&s(), &short).is_err());
    }

    #[test]
    fn gradient_alignment_by_hand() {
        // Image 0: (1,0,0,0) vs (1,1,0,0): cos = 1/sqrt 2. Image 1: opposite: -1. Image 2: zero
        // target gradient: skipped. Image 3: (3,4,0,0) vs (4,3,0,0): 24/25.
        let a = array![[1.0f32, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 4.0, 0.0, 0.0]];
        let b = array![[1.0f32, 1.0, 0.0, 0.0], [0.0, -4.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0], [4.0, 3.0, 0.0, 0.0]];
        let a4 = a.clone().into_shape_with_order((4, 1, 2, 2)).unwrap();
        let b4 = b.clone().into_shape_with_order((4, 1, 2, 2)).unwrap();
        let g = gradient_alignment(a4.view().into_dyn(), b4.view().into_dyn()).unwrap();
        assert_eq!((g.used, g.skipped), (3, 1));
        assert_eq!(g.per_image[2], None);
        assert!((g.per_image[0].unwrap() - core::f64::consts::FRAC_1_SQRT_2).abs() < 1e-15);
        assert_eq!(g.per_image[1], Some(-1.0));
        let want = (core::f64::consts::FRAC_1_SQRT_2 - 1.0 + 0.96) / 3.0;
        assert!((g.mean.unwrap() - want).abs() < 1e-15);
        // A transposed (non-standard layout) view gives the same per-image values.
        let at = a.t().to_owned();
        let bt = b.t().to_owned();
        let g2 = gradient_alignment(at.t().into_dyn(), bt.t().into_dyn()).unwrap();
        assert_eq!(g2.per_image, g.per_image);
        let zero = Array2::<f32>::zeros((2, 3));
        let none = gradient_alignment(zero.view().into_dyn(), zero.view().into_dyn()).unwrap();
        assert_eq!((none.mean, none.used, none.skipped), (None, 0, 2));
        assert!(gradient_alignment(a.view().into_dyn(), zero.view().into_dyn()).is_err());
        let nan = array![[f32::NAN, 1.0]];
        assert!(matches!(
            gradient_alignment(nan.view().into_dyn(), nan.view().into_dyn()),
            Err(MetricError::NonFinite { image: 0, .. })
        ));
    }

    #[test]
    fn representation_bias_by_hand() {
        let merged = array![[1.0f32, -2.0, 0.5], [0.0, 0.0, 0.0]];
        let task = array![[0.0f32, -2.0, 2.0], [3.0, -3.0, 0.0]];
        // Image 0: (1 + 0 + 1.5)/3; image 1: 6/3 = 2.
        let r = representation_bias(merged.view(), task.view()).unwrap();
        assert_eq!(r.per_image, vec![2.5 / 3.0, 2.0]);
        assert_eq!(r.mean, Some((2.5 / 3.0 + 2.0) / 2.0));
        assert_eq!(mean_at(&r.per_image, &[1, 1, 0]), Some((2.0 + 2.0 + 2.5 / 3.0) / 3.0));
        assert_eq!(mean_at(&r.per_image, &[5]), None);
        let none = Array2::<f32>::zeros((0, 3));
        assert_eq!(representation_bias(none.view(), none.view()).unwrap().mean, None);
        assert!(representation_bias(merged.view(), none.view()).is_err());
    }
}
