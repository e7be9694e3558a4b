//! Contact sheets: a grid of a few images of a batch written as a PNG, to look at a data set.

use std::path::Path;

use ndarray::Array4;

/// Grid image (RGB u8, `rows x cols` tiles with a 2-pixel grey gap) of `images` (`N x 3 x H x W`).
pub fn grid(images: &Array4<f32>, cols: usize) -> (usize, usize, Vec<u8>) {
    let (n, _, h, w) = images.dim();
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols).max(1);
    let gap = 2;
    let (gw, gh) = (cols * (w + gap) + gap, rows * (h + gap) + gap);
    let mut out = vec![128u8; gw * gh * 3];
    for i in 0..n {
        let (r, c) = (i / cols, i % cols);
        for y in 0..h {
            for x in 0..w {
                let o = ((gap + r * (h + gap) + y) * gw + gap + c * (w + gap) + x) * 3;
                for k in 0..3 {
                    out[o + k] = (images[[i, k, y, x]].clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
    }
    (gw, gh, out)
}

/// Write a contact sheet PNG atomically (temp file in the same folder, then rename).
pub fn write_png(path: &Path, images: &Array4<f32>, cols: usize) -> std::io::Result<()> {
    let (w, h, px) = grid(images, cols);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    {
        let mut bw = std::io::BufWriter::new(tmp.as_file());
        image::write_buffer_with_format(
            &mut bw,
            &px,
            w as u32,
            h as u32,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .map_err(std::io::Error::other)?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
