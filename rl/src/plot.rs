//! Minimal line charts as PNG (learning curves): axes, a grid, min/max tick labels in a 3×5
//! pixel font, one polyline per series. Enough to read a trend without pulling in a plotting
//! stack.

use std::path::Path;

use anyhow::Result;
use image::{Rgb, RgbImage};

pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: [u8; 3],
}

/// Distinct colours for up to eight series.
pub const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

const W: u32 = 720;
const H: u32 = 420;
const LEFT: u32 = 60;
const RIGHT: u32 = 20;
const TOP: u32 = 20;
const BOTTOM: u32 = 40;

/// One panel per entry of `panels` (side by side), written atomically as a PNG.
pub fn line_charts(panels: &[Vec<Series>], path: &Path) -> Result<()> {
    let mut img = RgbImage::from_pixel(W * panels.len().max(1) as u32, H, Rgb([255, 255, 255]));
    for (p, series) in panels.iter().enumerate() {
        draw_panel(&mut img, p as u32 * W, series);
    }
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    shared::io::write_atomic(path, &bytes)
}

fn draw_panel(img: &mut RgbImage, x0: u32, series: &[Series]) {
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    if !xmin.is_finite() {
        return;
    }
    if xmax - xmin < 1e-12 {
        xmax = xmin + 1.0;
    }
    if ymax - ymin < 1e-12 {
        ymax = ymin + 1.0;
    }
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let to_px = |x: f64, y: f64| -> (i64, i64) {
        (
            (x0 + LEFT) as i64 + ((x - xmin) / (xmax - xmin) * pw) as i64,
            (TOP as f64 + (1.0 - (y - ymin) / (ymax - ymin)) * ph) as i64,
        )
    };
    let grey = Rgb([225, 225, 225]);
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let (gx, _) = to_px(xmin + f * (xmax - xmin), ymin);
        let (_, gy) = to_px(xmin, ymin + f * (ymax - ymin));
        line(img, (gx, TOP as i64), (gx, (H - BOTTOM) as i64), grey);
        line(img, ((x0 + LEFT) as i64, gy), ((x0 + W - RIGHT) as i64, gy), grey);
    }
    let black = Rgb([0, 0, 0]);
    line(img, ((x0 + LEFT) as i64, (H - BOTTOM) as i64), ((x0 + W - RIGHT) as i64, (H - BOTTOM) as i64), black);
    line(img, ((x0 + LEFT) as i64, TOP as i64), ((x0 + LEFT) as i64, (H - BOTTOM) as i64), black);
    text(img, (x0 + 2) as i64, TOP as i64, &fmt_num(ymax), black);
    text(img, (x0 + 2) as i64, (H - BOTTOM - 10) as i64, &fmt_num(ymin), black);
    text(img, (x0 + LEFT) as i64, (H - BOTTOM + 6) as i64, &fmt_num(xmin), black);
    let xl = fmt_num(xmax);
    text(img, (x0 + W - RIGHT) as i64 - 8 * xl.len() as i64, (H - BOTTOM + 6) as i64, &xl, black);
    for (i, s) in series.iter().enumerate() {
        let c = Rgb(s.color);
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in s.points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()) {
            let p = to_px(x, y);
            if let Some(q) = prev {
                line(img, q, p, c);
                line(img, (q.0, q.1 + 1), (p.0, p.1 + 1), c);
            }
            prev = Some(p);
        }
        // Legend swatch (labels go in the table beside the PNG).
        let ly = (TOP + 4 + 10 * i as u32) as i64;
        line(img, ((x0 + W - RIGHT - 40) as i64, ly), ((x0 + W - RIGHT - 10) as i64, ly), c);
        line(img, ((x0 + W - RIGHT - 40) as i64, ly + 1), ((x0 + W - RIGHT - 10) as i64, ly + 1), c);
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1e4 || (v != 0.0 && v.abs() < 1e-2) {
        format!("{v:.1e}")
    } else {
        format!("{v:.2}")
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x0, y0, c);
        if x0 == x1 && y0 == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x0 += sx;
        }
        if e2 <= dx {
            err += dx;
            y0 += sy;
        }
    }
}

/// 3×5 glyphs, rows top to bottom, 3 bits each (MSB left), scaled ×2.
fn glyph(ch: char) -> [u8; 5] {
    match ch {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        _ => [0; 5],
    }
}

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let g = glyph(ch);
        for (r, bits) in g.iter().enumerate() {
            for b in 0..3 {
                if bits & (4 >> b) != 0 {
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        put(img, x + 8 * i as i64 + 2 * b + dx, y + 2 * r as i64 + dy, c);
                    }
                }
            }
        }
    }
}
