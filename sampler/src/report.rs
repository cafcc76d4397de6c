//! Outputs: frames as PNG grids and GIFs, and `report.json`, all written atomically.

use std::io::Cursor;
use std::path::Path;

use anyhow::Context;
use candle_core::Tensor;
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, ImageEncoder, RgbImage, RgbaImage};

use crate::denoiser::to_vec_f64;

/// Pixel upscale so 16×16 frames are visible.
pub const UPSCALE: u32 = 8;

/// The frames of sample `b` of a (B, C, T, H, W) tensor as RGB images: values in [−1, 1] map to
/// [0, 255]; C = 1 is grey, C ≥ 3 uses the first three channels, C = 2 repeats channel 0 as blue.
pub fn frames_to_images(x: &Tensor, b: usize, upscale: u32) -> anyhow::Result<Vec<RgbImage>> {
    let (_, c, t, h, w) = x.dims5()?;
    let data = to_vec_f64(&x.get(b)?)?;
    let at = |ch: usize, ti: usize, y: usize, xx: usize| data[((ch * t + ti) * h + y) * w + xx];
    let to_u8 = |v: f64| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8;
    let mut out = Vec::with_capacity(t);
    for ti in 0..t {
        let img = RgbImage::from_fn(w as u32 * upscale, h as u32 * upscale, |px, py| {
            let (xx, y) = ((px / upscale) as usize, (py / upscale) as usize);
            let channel = |k: usize| {
                to_u8(at(
                    if c >= 3 {
                        k
                    } else if c == 2 && k == 1 {
                        1
                    } else {
                        0
                    },
                    ti,
                    y,
                    xx,
                ))
            };
            image::Rgb([channel(0), channel(1), channel(2)])
        });
        out.push(img);
    }
    Ok(out)
}

/// Rows of equally sized images, side by side with 4-pixel white gutters.
pub fn grid(rows: &[Vec<RgbImage>]) -> RgbImage {
    let gutter = 4;
    let (w, h) = rows.first().and_then(|r| r.first()).map(|i| i.dimensions()).unwrap_or((1, 1));
    let cols = rows.iter().map(Vec::len).max().unwrap_or(1) as u32;
    let mut out = RgbImage::from_pixel(
        cols * (w + gutter) + gutter,
        rows.len() as u32 * (h + gutter) + gutter,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            image::imageops::replace(
                &mut out,
                img,
                (gutter + c as u32 * (w + gutter)) as i64,
                (gutter + r as u32 * (h + gutter)) as i64,
            );
        }
    }
    out
}

pub fn png_bytes(img: &RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(Cursor::new(&mut buf))
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .context("encoding PNG")?;
    Ok(buf)
}

/// An endlessly looping GIF, `delay_ms` per frame.
pub fn gif_bytes(frames: &[RgbImage], delay_ms: u32) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut enc = GifEncoder::new(Cursor::new(&mut buf));
        enc.set_repeat(Repeat::Infinite).context("GIF repeat")?;
        let frames = frames.iter().map(|f| {
            let rgba: RgbaImage = image::DynamicImage::ImageRgb8(f.clone()).to_rgba8();
            Frame::from_parts(rgba, 0, 0, Delay::from_numer_denom_ms(delay_ms, 1))
        });
        enc.encode_frames(frames).context("encoding GIF")?;
    }
    Ok(buf)
}

/// Writes `<stem>.png` (all frames of every batch sample in rows) and `<stem>.gif` (sample 0).
pub fn write_frames(dir: &Path, stem: &str, x: &Tensor) -> anyhow::Result<Vec<String>> {
    let b = x.dim(0)?;
    let rows: Vec<Vec<RgbImage>> = (0..b).map(|i| frames_to_images(x, i, UPSCALE)).collect::<anyhow::Result<_>>()?;
    let png = format!("{stem}.png");
    let gif = format!("{stem}.gif");
    shared::io::write_atomic(&dir.join(&png), &png_bytes(&grid(&rows))?)?;
    shared::io::write_atomic(&dir.join(&gif), &gif_bytes(&rows[0], 300)?)?;
    Ok(vec![png, gif])
}

/// A before/after comparison: row 1 the initial sample, row 2 the optimised one (sample 0).
pub fn write_comparison(dir: &Path, before: &Tensor, after: &Tensor) -> anyhow::Result<String> {
    let rows = vec![frames_to_images(before, 0, UPSCALE)?, frames_to_images(after, 0, UPSCALE)?];
    let name = "before_after.png".to_string();
    shared::io::write_atomic(&dir.join(&name), &png_bytes(&grid(&rows))?)?;
    Ok(name)
}
