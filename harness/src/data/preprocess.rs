//! Image preprocessing: Pillow-exact bicubic resampling, CLIP's shorter-side resize + centre crop,
//! grey replicated to RGB, NCHW f32 in [0,1].
//!
//! The u8 resampler follows Pillow's `ImagingResample` (libImaging/Resample.c) step by step:
//! separable bicubic (a = -0.5) with the support widened by the downscale factor (antialiasing),
//! coefficients normalised, converted to 22-bit fixed point, horizontal pass first, then vertical,
//! each rounded and clipped to u8. HF `CLIPImageProcessor` resizes with Pillow, so this gives the
//! same pixels as the reference pipeline; `tests/data_preprocess.rs` checks it against values
//! produced by Pillow.

/// How images are brought to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preprocess {
    /// Keep the images as they are (all must have the same size).
    Native,
    /// Plain bicubic resize to `size x size` (for small images; aspect ratio not kept).
    Resize(usize),
    /// CLIP: resize the shorter side to `size` (bicubic), then centre crop `size x size`.
    Clip(usize),
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Resampling coefficients of one axis: for each output index, the first input index and the
/// normalised weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    k: Vec<f64>,
}

fn precompute(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0.0f64; out_size * ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let row = &mut k[xx * ksize..(xx + 1) * ksize];
        let mut ww = 0.0;
        for (x, w) in row.iter_mut().enumerate().take(n) {
            *w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *w;
        }
        if ww != 0.0 {
            for w in row.iter_mut().take(n) {
                *w /= ww;
            }
        }
        bounds.push((xmin, n));
    }
    Coeffs { bounds, ksize, k }
}

fn fixed_point(c: &Coeffs) -> Vec<i32> {
    let one = f64::from(1u32 << PRECISION_BITS);
    c.k.iter().map(|&w| if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 }).collect()
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow-exact bicubic resize of an interleaved u8 image (`h x w x c`) to `oh x ow`.
pub fn resize_u8(src: &[u8], w: usize, h: usize, c: usize, ow: usize, oh: usize) -> Vec<u8> {
    assert_eq!(src.len(), w * h * c, "image buffer size");
    let mut cur = src.to_vec();
    let (mut cw, ch) = (w, h);
    if ow != w {
        let co = precompute(w, ow);
        let kk = fixed_point(&co);
        let mut out = vec![0u8; ch * ow * c];
        for y in 0..ch {
            for xx in 0..ow {
                let (xmin, n) = co.bounds[xx];
                let k = &kk[xx * co.ksize..xx * co.ksize + n];
                for ci in 0..c {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (x, &kv) in k.iter().enumerate() {
                        ss = ss.wrapping_add(i32::from(cur[(y * cw + xmin + x) * c + ci]).wrapping_mul(kv));
                    }
                    out[(y * ow + xx) * c + ci] = clip8(ss);
                }
            }
        }
        cur = out;
        cw = ow;
    }
    if oh != ch {
        let co = precompute(ch, oh);
        let kk = fixed_point(&co);
        let mut out = vec![0u8; oh * cw * c];
        for yy in 0..oh {
            let (ymin, n) = co.bounds[yy];
            let k = &kk[yy * co.ksize..yy * co.ksize + n];
            for x in 0..cw {
                for ci in 0..c {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (y, &kv) in k.iter().enumerate() {
                        ss = ss.wrapping_add(i32::from(cur[((ymin + y) * cw + x) * c + ci]).wrapping_mul(kv));
                    }
                    out[(yy * cw + x) * c + ci] = clip8(ss);
                }
            }
        }
        cur = out;
    }
    cur
}

/// Bicubic resize of a planar f32 image (`c x h x w`) in [0,1] to `oh x ow`, same weights as
/// [`resize_u8`] but in floating point, clamped to [0,1].
pub fn resize_f32(src: &[f32], w: usize, h: usize, c: usize, ow: usize, oh: usize) -> Vec<f32> {
    assert_eq!(src.len(), w * h * c, "image buffer size");
    let mut cur = src.to_vec();
    let (mut cw, ch) = (w, h);
    if ow != w {
        let co = precompute(w, ow);
        let mut out = vec![0f32; c * ch * ow];
        for ci in 0..c {
            for y in 0..ch {
                for xx in 0..ow {
                    let (xmin, n) = co.bounds[xx];
                    let s: f64 =
                        (0..n).map(|x| co.k[xx * co.ksize + x] * f64::from(cur[(ci * ch + y) * cw + xmin + x])).sum();
                    out[(ci * ch + y) * ow + xx] = s.clamp(0.0, 1.0) as f32;
                }
            }
        }
        cur = out;
        cw = ow;
    }
    if oh != ch {
        let co = precompute(ch, oh);
        let mut out = vec![0f32; c * oh * cw];
        for ci in 0..c {
            for yy in 0..oh {
                let (ymin, n) = co.bounds[yy];
                for x in 0..cw {
                    let s: f64 =
                        (0..n).map(|y| co.k[yy * co.ksize + y] * f64::from(cur[(ci * ch + ymin + y) * cw + x])).sum();
                    out[(ci * oh + yy) * cw + x] = s.clamp(0.0, 1.0) as f32;
                }
            }
        }
        cur = out;
    }
    cur
}

/// Target geometry for an image of `w x h`: the resized size and the crop box (left, top, size).
pub fn plan(p: Preprocess, w: usize, h: usize) -> ((usize, usize), (usize, usize, usize, usize)) {
    match p {
        Preprocess::Native => ((w, h), (0, 0, w, h)),
        Preprocess::Resize(s) => ((s, s), (0, 0, s, s)),
        Preprocess::Clip(s) => {
            let (nw, nh) = if w <= h {
                (s, (s as f64 * h as f64 / w as f64) as usize)
            } else {
                ((s as f64 * w as f64 / h as f64) as usize, s)
            };
            let (nw, nh) = (nw.max(s), nh.max(s));
            ((nw, nh), ((nw - s) / 2, (nh - s) / 2, s, s))
        }
    }
}

/// Preprocess one interleaved u8 image (`h x w x c`, c = 1, 3 or 4; grey replicated, alpha
/// dropped as Pillow's `convert("RGB")` does) into planar RGB f32 `3 x S x S` written to `out`.
pub fn u8_to_chw(p: Preprocess, src: &[u8], w: usize, h: usize, c: usize, out: &mut [f32]) {
    let (rgb, c3) = match c {
        1 | 3 => (None, c),
        4 => (Some(src.chunks_exact(4).flat_map(|px| [px[0], px[1], px[2]]).collect::<Vec<u8>>()), 3),
        2 => (Some(src.chunks_exact(2).map(|px| px[0]).collect::<Vec<u8>>()), 1),
        _ => panic!("unsupported channel count {c}"),
    };
    let src = rgb.as_deref().unwrap_or(src);
    let ((nw, nh), (left, top, cw, ch)) = plan(p, w, h);
    let resized;
    let img: &[u8] = if (nw, nh) == (w, h) {
        src
    } else {
        resized = resize_u8(src, w, h, c3, nw, nh);
        &resized
    };
    assert_eq!(out.len(), 3 * cw * ch, "output buffer size");
    for y in 0..ch {
        for x in 0..cw {
            let base = ((top + y) * nw + left + x) * c3;
            for k in 0..3 {
                let v = if c3 == 1 { img[base] } else { img[base + k] };
                out[(k * ch + y) * cw + x] = f32::from(v) / 255.0;
            }
        }
    }
}

/// Preprocess one planar f32 image (`c x h x w`, c = 1 or 3) into planar RGB `3 x S x S`.
pub fn f32_to_chw(p: Preprocess, src: &[f32], w: usize, h: usize, c: usize, out: &mut [f32]) {
    let ((nw, nh), (left, top, cw, ch)) = plan(p, w, h);
    let resized;
    let img: &[f32] = if (nw, nh) == (w, h) {
        src
    } else {
        resized = resize_f32(src, w, h, c, nw, nh);
        &resized
    };
    assert_eq!(out.len(), 3 * cw * ch, "output buffer size");
    for k in 0..3 {
        let sc = if c == 1 { 0 } else { k };
        for y in 0..ch {
            for x in 0..cw {
                out[(k * ch + y) * cw + x] = img[(sc * nh + top + y) * nw + left + x];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        let src: Vec<u8> = (0..48).map(|i| (i * 5) as u8).collect();
        assert_eq!(resize_u8(&src, 4, 4, 3, 4, 4), src);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![137u8; 7 * 5];
        assert!(resize_u8(&src, 7, 5, 1, 3, 11).iter().all(|&v| v == 137));
        let srcf = vec![0.25f32; 7 * 5];
        assert!(resize_f32(&srcf, 7, 5, 1, 3, 11).iter().all(|&v| (v - 0.25).abs() < 1e-6));
    }

    #[test]
    fn weights_sum_to_one() {
        for (i, o) in [(28, 32), (8, 32), (500, 224), (3, 1)] {
            let c = precompute(i, o);
            for xx in 0..o {
                let s: f64 = c.k[xx * c.ksize..(xx + 1) * c.ksize].iter().sum();
                assert!((s - 1.0).abs() < 1e-12, "{i}->{o} at {xx}: {s}");
            }
        }
    }

    #[test]
    fn clip_plan_matches_hf() {
        // 640x480 -> shorter side 224: 298x224, crop left (298-224)/2 = 37.
        assert_eq!(plan(Preprocess::Clip(224), 640, 480), ((298, 224), (37, 0, 224, 224)));
        assert_eq!(plan(Preprocess::Clip(224), 224, 224), ((224, 224), (0, 0, 224, 224)));
    }

    #[test]
    fn grey_replicated_to_rgb() {
        let src = [0u8, 51, 102, 255];
        let mut out = vec![0f32; 12];
        u8_to_chw(Preprocess::Native, &src, 2, 2, 1, &mut out);
        for k in 0..3 {
            assert_eq!(&out[k * 4..k * 4 + 4], &[0.0, 0.2, 0.4, 1.0]);
        }
    }
}
