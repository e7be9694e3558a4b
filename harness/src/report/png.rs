//! PNG versions of the report's SVG plots, rasterised with `resvg` (the same drawing, so the two
//! never disagree). Text uses the system's fonts (`sans-serif` resolves to the first of DejaVu
//! Sans, Liberation Sans, Arial found); without any font the plots are drawn without their text.

use std::sync::Arc;

/// Rasterises SVG text; holds the font database so it is read once per report.
pub struct Rasteriser {
    options: resvg::usvg::Options<'static>,
}

impl Default for Rasteriser {
    fn default() -> Self {
        Self::new()
    }
}

impl Rasteriser {
    /// Load the system fonts once.
    pub fn new() -> Rasteriser {
        let mut db = resvg::usvg::fontdb::Database::new();
        db.load_system_fonts();
        let families: Vec<String> = db.faces().flat_map(|f| f.families.iter().map(|(name, _)| name.clone())).collect();
        if let Some(f) = ["DejaVu Sans", "Liberation Sans", "Arial"].iter().find(|f| families.iter().any(|x| x == *f)) {
            db.set_sans_serif_family(*f);
        }
        if db.is_empty() {
            tracing::warn!("no system fonts found: the PNG plots are drawn without text");
        }
        let options = resvg::usvg::Options { fontdb: Arc::new(db), ..Default::default() };
        Rasteriser { options }
    }

    /// The PNG bytes of an SVG document, at its own size (`scale` 2 for a sharper image).
    pub fn png(&self, svg: &str, scale: f32) -> Result<Vec<u8>, String> {
        let tree = resvg::usvg::Tree::from_str(svg, &self.options).map_err(|e| format!("bad SVG: {e}"))?;
        let size = tree.size().to_int_size().scale_by(scale).ok_or("the plot has no size")?;
        let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).ok_or("the plot has no size")?;
        resvg::render(&tree, resvg::tiny_skia::Transform::from_scale(scale, scale), &mut pixmap.as_mut());
        pixmap.encode_png().map_err(|e| format!("PNG encoding failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_red_square_is_red_where_drawn_and_white_elsewhere() {
        let svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"20\" height=\"10\"><rect x=\"0\" y=\"0\" width=\"20\" height=\"10\" fill=\"white\"/><rect x=\"0\" y=\"0\" width=\"10\" height=\"10\" fill=\"#ff0000\"/></svg>";
        let bytes = Rasteriser::new().png(svg, 2.0).unwrap();
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap().to_rgba8();
        assert_eq!(img.dimensions(), (40, 20));
        assert_eq!(img.get_pixel(5, 5).0, [255, 0, 0, 255]);
        assert_eq!(img.get_pixel(35, 15).0, [255, 255, 255, 255]);
        assert!(Rasteriser::new().png("<svg", 1.0).unwrap_err().contains("bad SVG"));
    }
}
