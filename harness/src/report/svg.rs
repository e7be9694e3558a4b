//! Plots as hand-written SVG (no plotting crate): a heat map, scatter plots and bars.
//! Coordinates are printed with two decimals, so identical inputs give identical files.

/// Escape text for XML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A categorical palette (Okabe-Ito, then greys).
const PALETTE: &[&str] =
    &["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000", "#999999", "#666666"];

fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

fn open(w: f64, h: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {w:.0} {h:.0}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect x=\"0\" y=\"0\" width=\"{w:.0}\" height=\"{h:.0}\" fill=\"white\"/>\n<text x=\"{:.2}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2.0,
        esc(title)
    )
}

/// Sequential colour for a value in [0, 1] (white to dark red).
fn heat(t: f64) -> String {
    let t = t.clamp(0.0, 1.0);
    let r = 255.0 - 75.0 * t;
    let g = 255.0 - 235.0 * t;
    let b = 255.0 - 225.0 * t;
    format!("#{:02x}{:02x}{:02x}", r.round() as u8, g.round() as u8, b.round() as u8)
}

/// Heat map: `values[row][col]` (None = n/a), coloured on [0, vmax].
pub fn heatmap(title: &str, rows: &[String], cols: &[String], values: &[Vec<Option<f64>>], vmax: f64) -> String {
    let (cw, ch, left, top) = (84.0, 26.0, 190.0, 90.0);
    let w = left + cw * cols.len() as f64 + 20.0;
    let h = top + ch * rows.len() as f64 + 20.0;
    let mut s = open(w, h, title);
    for (j, c) in cols.iter().enumerate() {
        let x = left + cw * (j as f64 + 0.5);
        s.push_str(&format!(
            "<text x=\"{x:.2}\" y=\"{:.2}\" text-anchor=\"start\" transform=\"rotate(-35 {x:.2} {:.2})\">{}</text>\n",
            top - 6.0,
            top - 6.0,
            esc(c)
        ));
    }
    for (i, r) in rows.iter().enumerate() {
        let y = top + ch * i as f64;
        s.push_str(&format!(
            "<text x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"end\">{}</text>\n",
            left - 6.0,
            y + ch * 0.65,
            esc(r)
        ));
        for j in 0..cols.len() {
            let x = left + cw * j as f64;
            let v = values.get(i).and_then(|r| r.get(j)).copied().flatten();
            let (fill, label) = match v {
                Some(v) => (heat(if vmax > 0.0 { v / vmax } else { 0.0 }), format!("{v:.3}")),
                None => ("#eeeeee".to_string(), "n/a".to_string()),
            };
            s.push_str(&format!(
                "<rect x=\"{x:.2}\" y=\"{y:.2}\" width=\"{cw:.2}\" height=\"{ch:.2}\" fill=\"{fill}\" stroke=\"white\"/>\n<text x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"middle\">{label}</text>\n",
                x + cw / 2.0,
                y + ch * 0.65
            ));
        }
    }
    s.push_str("</svg>\n");
    s
}

fn axis_range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// Draw a frame `(x0, y0, width, height)` with ticks for the ranges `xr`, `yr` and axis labels.
fn axes(s: &mut String, frame: (f64, f64, f64, f64), xr: (f64, f64), yr: (f64, f64), xlabel: &str, ylabel: &str) {
    let (x0, y0, pw, ph) = frame;
    s.push_str(&format!(
        "<rect x=\"{x0:.2}\" y=\"{y0:.2}\" width=\"{pw:.2}\" height=\"{ph:.2}\" fill=\"none\" stroke=\"#333333\"/>\n"
    ));
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let xv = xr.0 + (xr.1 - xr.0) * f;
        let yv = yr.0 + (yr.1 - yr.0) * f;
        let x = x0 + pw * f;
        let y = y0 + ph * (1.0 - f);
        s.push_str(&format!(
            "<line x1=\"{x:.2}\" y1=\"{:.2}\" x2=\"{x:.2}\" y2=\"{:.2}\" stroke=\"#333333\"/>\n<text x=\"{x:.2}\" y=\"{:.2}\" text-anchor=\"middle\">{xv:.3}</text>\n",
            y0 + ph,
            y0 + ph + 4.0,
            y0 + ph + 16.0
        ));
        s.push_str(&format!(
            "<line x1=\"{:.2}\" y1=\"{y:.2}\" x2=\"{x0:.2}\" y2=\"{y:.2}\" stroke=\"#333333\"/>\n<text x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"end\">{yv:.3}</text>\n",
            x0 - 4.0,
            x0 - 6.0,
            y + 4.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"middle\">{}</text>\n",
        x0 + pw / 2.0,
        y0 + ph + 34.0,
        esc(xlabel)
    ));
    let (lx, ly) = (x0 - 50.0, y0 + ph / 2.0);
    s.push_str(&format!(
        "<text x=\"{lx:.2}\" y=\"{ly:.2}\" text-anchor=\"middle\" transform=\"rotate(-90 {lx:.2} {ly:.2})\">{}</text>\n",
        esc(ylabel)
    ));
}

/// Scatter plot of (x, y, group index) points with a legend of `groups`.
pub fn scatter(title: &str, xlabel: &str, ylabel: &str, points: &[(f64, f64, usize)], groups: &[String]) -> String {
    let (x0, y0, pw, ph): (f64, f64, f64, f64) = (70.0, 35.0, 420.0, 300.0);
    let w = x0 + pw + 200.0;
    let h = (y0 + ph + 50.0).max(y0 + 16.0 * groups.len() as f64 + 20.0);
    let mut s = open(w, h, title);
    let xr = axis_range(points.iter().map(|p| p.0));
    let yr = axis_range(points.iter().map(|p| p.1));
    axes(&mut s, (x0, y0, pw, ph), xr, yr, xlabel, ylabel);
    for &(x, y, g) in points {
        let px = x0 + pw * (x - xr.0) / (xr.1 - xr.0);
        let py = y0 + ph * (1.0 - (y - yr.0) / (yr.1 - yr.0));
        s.push_str(&format!(
            "<circle cx=\"{px:.2}\" cy=\"{py:.2}\" r=\"3.5\" fill=\"{}\" fill-opacity=\"0.8\"/>\n",
            colour(g)
        ));
    }
    for (i, g) in groups.iter().enumerate() {
        let y = y0 + 16.0 * i as f64 + 8.0;
        s.push_str(&format!(
            "<circle cx=\"{:.2}\" cy=\"{y:.2}\" r=\"4\" fill=\"{}\"/>\n<text x=\"{:.2}\" y=\"{:.2}\">{}</text>\n",
            x0 + pw + 20.0,
            colour(i),
            x0 + pw + 30.0,
            y + 4.0,
            esc(g)
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// Vertical bars with labels; None bars are marked n/a.
pub fn bars(title: &str, ylabel: &str, labels: &[String], values: &[Option<f64>]) -> String {
    let (x0, y0, ph) = (70.0, 35.0, 300.0);
    let bw = 56.0;
    let pw = bw * labels.len().max(1) as f64;
    let w = (x0 + pw + 30.0).max(20.0 + 8.0 * title.len() as f64);
    let h = y0 + ph + 80.0;
    let mut s = open(w, h, title);
    let vmax = values.iter().flatten().fold(0.0f64, |a, &b| a.max(b)).max(1.0);
    let yr = (0.0, vmax * 1.05);
    s.push_str(&format!(
        "<rect x=\"{x0:.2}\" y=\"{y0:.2}\" width=\"{pw:.2}\" height=\"{ph:.2}\" fill=\"none\" stroke=\"#333333\"/>\n"
    ));
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let y = y0 + ph * (1.0 - f);
        s.push_str(&format!(
            "<line x1=\"{:.2}\" y1=\"{y:.2}\" x2=\"{x0:.2}\" y2=\"{y:.2}\" stroke=\"#333333\"/>\n<text x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"end\">{:.3}</text>\n",
            x0 - 4.0,
            x0 - 6.0,
            y + 4.0,
            yr.1 * f
        ));
    }
    let (lx, ly) = (x0 - 50.0, y0 + ph / 2.0);
    s.push_str(&format!(
        "<text x=\"{lx:.2}\" y=\"{ly:.2}\" text-anchor=\"middle\" transform=\"rotate(-90 {lx:.2} {ly:.2})\">{}</text>\n",
        esc(ylabel)
    ));
    for (i, (l, v)) in labels.iter().zip(values).enumerate() {
        let x = x0 + bw * i as f64;
        let cx = x + bw / 2.0;
        match v {
            Some(v) => {
                let bh = ph * v / yr.1;
                s.push_str(&format!(
                    "<rect x=\"{:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{bh:.2}\" fill=\"{}\"/>\n<text x=\"{cx:.2}\" y=\"{:.2}\" text-anchor=\"middle\">{v:.3}</text>\n",
                    x + 8.0,
                    y0 + ph - bh,
                    bw - 16.0,
                    colour(i),
                    y0 + ph - bh - 4.0
                ));
            }
            None => s.push_str(&format!(
                "<text x=\"{cx:.2}\" y=\"{:.2}\" text-anchor=\"middle\">n/a</text>\n",
                y0 + ph - 4.0
            )),
        }
        let ty = y0 + ph + 14.0;
        s.push_str(&format!(
            "<text x=\"{cx:.2}\" y=\"{ty:.2}\" text-anchor=\"end\" transform=\"rotate(-35 {cx:.2} {ty:.2})\">{}</text>\n",
            esc(l)
        ));
    }
    s.push_str("</svg>\n");
    s
}
