//! The Cosmos-Transfer2.5 control videos that upstream computes from the input video itself when
//! no control file is given for a kind: the **edge** control (OpenCV Canny) and the **blur**
//! ("vis") control (downscale, bilateral filter, upscale, then a bicubic down-up resize).
//!
//! Upstream (nvidia-cosmos/cosmos-transfer2.5 at 2ff49d07, read for this port, not copied):
//!
//! * `cosmos_transfer2/_src/transfer2/inference/inference_pipeline.py` L431-432 and L621-627: the
//!   inference loop builds the augmentors with `get_augmentor_for_eval` and the presets
//!   `preset_edge_threshold = preset_blur_strength = "medium"` (also the defaults of `EdgeConfig` /
//!   `BlurConfig` in `cosmos_transfer2/config.py` L453, L463). The frames it hands over are the
//!   model-resolution input video, uint8, RGB.
//! * `cosmos_transfer2/_src/transfer2/datasets/augmentors/control_input.py` L645-671
//!   (`get_augmentor_for_eval`): `use_random=False`, so the presets below decide every parameter.
//! * same file L61-130 (`AddControlInputEdge`): thresholds per preset (L103-114): very_low (20, 50),
//!   low (50, 100), **medium (100, 200)**, high (200, 300), very_high (300, 400); then
//!   `cv2.Canny(frame, t_lower, t_upper)` per frame on the **3-channel RGB** frame (L122-124, no
//!   grey conversion: OpenCV's default 3×3 Sobel aperture, L1 gradient), and the single-channel map
//!   expanded to 3 channels (L126).
//! * same file L133-254 (`AddControlInputBlur`) with `blur.py` L27-49, L186-201: for the preset
//!   "medium", per frame `cv2.resize(.., (W // 2, H // 2), INTER_AREA)` (L212-217, factor from the
//!   table L165-172), `cv2.bilateralFilter(.., d=30, sigmaColor=150, sigmaSpace=100)` once (the
//!   inference `bilateral_blur_config`, `BilateralFilterConfig` defaults, CPU path since
//!   `use_cuda=False`), `cv2.resize(.., (W, H), INTER_LINEAR)` (L221-226), then
//!   `torchvision.transforms.functional.resize` to `(int(H / 10), int(W / 10))` and back to
//!   `(H, W)`, bicubic with antialias, on the uint8 tensor (L232-250; factor `(4 + 16) // 2 = 10`
//!   from the table L157-164). torchvision resizes a uint8 tensor in float32 and rounds back to
//!   uint8 after each of the two calls.
//!
//! Every operation here follows the OpenCV 4.11 / PyTorch 2.x CPU arithmetic (integer Sobel and
//! Canny, fixed-point INTER_LINEAR, float32 bilateral and area weights, float32 antialiased
//! bicubic weights with `a = -0.5`), so the controls agree with upstream's to the figures the
//! `cosmos_controls` test checks against OpenCV/torchvision outputs
//! (`tests/fixtures/make_controls_fixture.py`).
//!
//! Depth and segmentation controls come from external networks upstream (VideoDepthAnything,
//! SAM2-style segmenters); they must be given as files.

use anyhow::{bail, Context, Result};
use image::{GrayImage, Luma, Rgb, RgbImage};

/// One Cosmos-Transfer2.5 control modality.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ControlKind {
    Edge,
    /// Upstream's "vis" control: a heavily blurred copy of the input video.
    Blur,
    Depth,
    Seg,
}

impl ControlKind {
    /// All kinds, in upstream's hint-key order (`edge_vis_depth_seg`).
    pub const ALL: [ControlKind; 4] = [Self::Edge, Self::Blur, Self::Depth, Self::Seg];

    /// Parses `edge`, `blur` (or upstream's name `vis`), `depth` or `seg`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "edge" => Ok(Self::Edge),
            "blur" | "vis" => Ok(Self::Blur),
            "depth" => Ok(Self::Depth),
            "seg" => Ok(Self::Seg),
            other => bail!("unknown control kind {other:?}: expected one of edge, blur, depth, seg"),
        }
    }

    /// The name [`ControlKind::parse`] accepts (`blur` for the blur control).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Edge => "edge",
            Self::Blur => "blur",
            Self::Depth => "depth",
            Self::Seg => "seg",
        }
    }

    /// Whether [`compute_control`] can make this control from the input video.
    pub fn computable(&self) -> bool {
        matches!(self, Self::Edge | Self::Blur)
    }
}

impl std::str::FromStr for ControlKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl std::fmt::Display for ControlKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Upstream's control strength presets (`preset_edge_threshold`, `preset_blur_strength`;
/// `Threshold` in `cosmos_transfer2/config.py` L425). Inference default: [`Preset::Medium`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Preset {
    VeryLow,
    Low,
    #[default]
    Medium,
    High,
    VeryHigh,
}

impl Preset {
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "very_low" => Ok(Self::VeryLow),
            "low" => Ok(Self::Low),
            "medium" => Ok(Self::Medium),
            "high" => Ok(Self::High),
            "very_high" => Ok(Self::VeryHigh),
            other => bail!("unknown control preset {other:?}: expected one of very_low, low, medium, high, very_high"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::VeryLow => "very_low",
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::VeryHigh => "very_high",
        }
    }

    /// Canny (low, high) thresholds (control_input.py L103-114).
    pub fn edge_thresholds(&self) -> (f64, f64) {
        match self {
            Self::VeryLow => (20.0, 50.0),
            Self::Low => (50.0, 100.0),
            Self::Medium => (100.0, 200.0),
            Self::High => (200.0, 300.0),
            Self::VeryHigh => (300.0, 400.0),
        }
    }

    /// Blur parameters (control_input.py L147-172 with the defaults `min_downup_factor = 4`,
    /// `max_downup_factor = 16`; blur.py `BilateralFilterConfig`).
    pub fn blur_params(&self) -> BlurParams {
        let (downsize, downup) = match self {
            Self::VeryLow => (1, 4),
            Self::Low => (4, 4),
            Self::Medium => (2, 10),
            Self::High => (1, 16),
            Self::VeryHigh => (4, 16),
        };
        BlurParams { downsize, bilateral_d: 30, sigma_color: 150.0, sigma_space: 100.0, downup }
    }
}

/// The blur control's parameters: downscale by `downsize` (INTER_AREA), bilateral filter, upscale
/// back (INTER_LINEAR), then bicubic-antialias to `1 / downup` of the size and back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlurParams {
    pub downsize: u32,
    pub bilateral_d: i32,
    pub sigma_color: f64,
    pub sigma_space: f64,
    pub downup: u32,
}

/// Computes the `kind` control video of `frames` as upstream does at inference with the default
/// ("medium") presets. Edge: Canny (100, 200) expanded to 3 channels; blur: see [`blur`].
/// Depth and segmentation: an error (they come from external models upstream; give them as files).
pub fn compute_control(kind: ControlKind, frames: &[RgbImage]) -> Result<Vec<RgbImage>> {
    compute_control_with(kind, frames, Preset::Medium)
}

/// [`compute_control`] with an explicit preset (upstream's `preset_edge_threshold` for the edge
/// control, `preset_blur_strength` for the blur control).
pub fn compute_control_with(kind: ControlKind, frames: &[RgbImage], preset: Preset) -> Result<Vec<RgbImage>> {
    let ctx = || format!("computing the {kind} control");
    let Some(first) = frames.first() else {
        return Err(anyhow::anyhow!("no frames given")).with_context(ctx);
    };
    let (w, h) = first.dimensions();
    for (i, f) in frames.iter().enumerate() {
        if f.dimensions() != (w, h) {
            return Err(anyhow::anyhow!(
                "frame {i} is {}x{} but frame 0 is {w}x{h}: all frames must have one size",
                f.width(),
                f.height()
            ))
            .with_context(ctx);
        }
    }
    if w == 0 || h == 0 {
        return Err(anyhow::anyhow!("frames are {w}x{h}: empty")).with_context(ctx);
    }
    match kind {
        ControlKind::Edge => {
            let (lo, hi) = preset.edge_thresholds();
            Ok(par_map(frames, |f| gray_to_rgb(&canny(f, lo, hi))))
        }
        ControlKind::Blur => {
            let p = preset.blur_params();
            check_blur_size(w, h, &p).with_context(ctx)?;
            Ok(par_map(frames, |f| blur_unchecked(f, &p)))
        }
        ControlKind::Depth | ControlKind::Seg => bail!(
            "the {kind} control cannot be computed here: upstream makes it with an external \
             {} model; give it as a control video file",
            if kind == ControlKind::Depth { "depth-estimation" } else { "segmentation" }
        ),
    }
}

/// Maps `f` over the frames on scoped threads (frames are independent; the blur's bilateral
/// filter, 709 taps per half-resolution pixel, dominates the cost).
fn par_map<F>(frames: &[RgbImage], f: F) -> Vec<RgbImage>
where
    F: Fn(&RgbImage) -> RgbImage + Sync,
{
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(frames.len());
    if threads <= 1 {
        return frames.iter().map(&f).collect();
    }
    let chunk = frames.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> =
            frames.chunks(chunk).map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<_>>())).collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                Err(e) => std::panic::resume_unwind(e),
            })
            .collect()
    })
}

fn gray_to_rgb(g: &GrayImage) -> RgbImage {
    RgbImage::from_fn(g.width(), g.height(), |x, y| {
        let v = g.get_pixel(x, y)[0];
        Rgb([v, v, v])
    })
}

// ---------------------------------------------------------------------------------------------
// Canny
// ---------------------------------------------------------------------------------------------

/// OpenCV's `cv::Canny(rgb, low, high)` with its defaults (3×3 Sobel, `L2gradient = false`) on a
/// 3-channel image, as upstream calls it:
///
/// * per channel, Sobel x/y derivatives in integers with BORDER_REPLICATE;
/// * L1 magnitude `|dx| + |dy|`; per pixel the channel with the largest magnitude (the first on a
///   tie, channels in R, G, B order as upstream passes them) gives the magnitude and direction;
/// * thresholds floored to integers (swapped if `low > high`); a pixel is a candidate when its
///   magnitude is `> low` and it survives non-maximum suppression along one of four directions
///   chosen with OpenCV's fixed-point tan(22.5°) test (ties broken towards the left / upper /
///   both diagonal neighbours exactly as OpenCV does, magnitudes outside the image are 0);
/// * hysteresis: candidates `> high` are edges, and edges spread to 8-connected candidates.
///
/// Output: 255 on edges, 0 elsewhere.
pub fn canny(rgb: &RgbImage, low: f64, high: f64) -> GrayImage {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut out = GrayImage::new(w as u32, h as u32);
    if w == 0 || h == 0 {
        return out;
    }
    let (mut low, mut high) = (low, high);
    if low > high {
        std::mem::swap(&mut low, &mut high);
    }
    // cvFloor; `as` saturates out-of-range values and maps NaN to 0 instead of panicking.
    let low = low.floor() as i64;
    let high = high.floor() as i64;

    let src = rgb.as_raw();
    let px = |x: usize, y: usize, c: usize| src[(y * w + x) * 3 + c] as i32;
    // Per pixel: chosen channel's (dx, dy) and L1 magnitude. The magnitude map has a one-pixel
    // zero border so the suppression reads 0 outside the image, as OpenCV's ring buffer does.
    let (mw, mh) = (w + 2, h + 2);
    let mut mag = vec![0i32; mw * mh];
    let mut gx = vec![0i32; w * h];
    let mut gy = vec![0i32; w * h];
    for y in 0..h {
        let (ym, yp) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            let (xm, xp) = (x.saturating_sub(1), (x + 1).min(w - 1));
            let mut best = (-1i32, 0i32, 0i32);
            for c in 0..3 {
                let dx = (px(xp, ym, c) - px(xm, ym, c))
                    + 2 * (px(xp, y, c) - px(xm, y, c))
                    + (px(xp, yp, c) - px(xm, yp, c));
                let dy = (px(xm, yp, c) - px(xm, ym, c))
                    + 2 * (px(x, yp, c) - px(x, ym, c))
                    + (px(xp, yp, c) - px(xp, ym, c));
                let m = dx.abs() + dy.abs();
                if m > best.0 {
                    best = (m, dx, dy);
                }
            }
            mag[(y + 1) * mw + x + 1] = best.0;
            gx[y * w + x] = best.1;
            gy[y * w + x] = best.2;
        }
    }

    // tan(22.5°) in Q15, as OpenCV rounds it.
    const SHIFT: i64 = 15;
    const TG22: i64 = 13573; // (0.41421356... * 2^15 + 0.5) as int
    debug_assert_eq!(TG22, (0.414_213_562_373_095_05_f64 * (1 << SHIFT) as f64 + 0.5) as i64);
    // 0: candidate (weak), 1: not an edge, 2: edge. Same one-pixel border as `mag`, set to 1.
    let mut map = vec![1u8; mw * mh];
    let mut stack: Vec<usize> = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let i = (y + 1) * mw + x + 1;
            let m = mag[i] as i64;
            if m <= low {
                continue;
            }
            let xs = gx[y * w + x] as i64;
            let ys = gy[y * w + x] as i64;
            let ax = xs.abs();
            let ay = ys.abs() << SHIFT;
            let tg22x = ax * TG22;
            let keep = if ay < tg22x {
                // near-horizontal gradient: compare with left (strict) and right neighbours
                m > mag[i - 1] as i64 && m >= mag[i + 1] as i64
            } else {
                let tg67x = tg22x + (ax << (SHIFT + 1));
                if ay > tg67x {
                    // near-vertical: the row above (strict) and the row below
                    m > mag[i - mw] as i64 && m >= mag[i + mw] as i64
                } else {
                    // diagonal: which diagonal depends on whether dx and dy share a sign
                    let s: isize = if (xs ^ ys) < 0 { -1 } else { 1 };
                    let up = (i - mw).wrapping_add_signed(-s);
                    let down = (i + mw).wrapping_add_signed(s);
                    m > mag[up] as i64 && m > mag[down] as i64
                }
            };
            if keep {
                if m > high {
                    map[i] = 2;
                    stack.push(i);
                } else {
                    map[i] = 0;
                }
            }
        }
    }
    while let Some(i) = stack.pop() {
        for n in [i - 1, i + 1, i - mw - 1, i - mw, i - mw + 1, i + mw - 1, i + mw, i + mw + 1] {
            if map[n] == 0 {
                map[n] = 2;
                stack.push(n);
            }
        }
    }
    for y in 0..h {
        for x in 0..w {
            if map[(y + 1) * mw + x + 1] == 2 {
                out.put_pixel(x as u32, y as u32, Luma([255]));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Blur
// ---------------------------------------------------------------------------------------------

/// The blur ("vis") control of one frame with the inference default preset ("medium"):
/// INTER_AREA to `(W / 2, H / 2)`, bilateral filter (d 30, sigma colour 150, sigma space 100),
/// INTER_LINEAR back to `(W, H)`, then bicubic-antialias to `(H / 10, W / 10)` and back.
/// Errors when the frame is too small for upstream's resizes (under 10 pixels a side).
pub fn blur(rgb: &RgbImage) -> Result<RgbImage> {
    blur_with(rgb, &Preset::Medium.blur_params())
}

/// [`blur`] with explicit parameters.
pub fn blur_with(rgb: &RgbImage, p: &BlurParams) -> Result<RgbImage> {
    check_blur_size(rgb.width(), rgb.height(), p)?;
    Ok(blur_unchecked(rgb, p))
}

fn check_blur_size(w: u32, h: u32, p: &BlurParams) -> Result<()> {
    if p.downsize == 0 || p.downup == 0 {
        bail!("blur factors must be positive (downsize {}, downup {})", p.downsize, p.downup);
    }
    let need = p.downsize.max(p.downup);
    if w < need || h < need {
        bail!(
            "a {w}x{h} frame is too small for the blur control: upstream resizes it to 1/{} and \
             1/{} of its size, so each side needs at least {need} pixels",
            p.downsize,
            p.downup
        );
    }
    Ok(())
}

fn blur_unchecked(rgb: &RgbImage, p: &BlurParams) -> RgbImage {
    let (w, h) = rgb.dimensions();
    let small = resize_area(rgb, w / p.downsize, h / p.downsize);
    let filtered = bilateral_filter(&small, p.bilateral_d, p.sigma_color, p.sigma_space);
    let back = resize_linear(&filtered, w, h);
    // Python's int(H / factor): floor for positive sizes.
    let down = resize_bicubic_aa(&back, w / p.downup, h / p.downup);
    resize_bicubic_aa(&down, w, h)
}

/// `cvRound` / `torch.round`: round half to even.
fn round_even_u8(v: f32) -> u8 {
    v.round_ties_even().clamp(0.0, 255.0) as u8
}

/// OpenCV `cv::resize(src, (w, h), INTER_AREA)` on an 8-bit RGB image, for downscaling (both
/// target sides no larger than the source and at least 1). An enlarging size falls back to
/// [`resize_linear`], which is close to but not OpenCV's INTER_AREA upscale (never used here).
///
/// Integer factors use OpenCV's exact block mean (`(sum + 2) >> 2` for 2×2 blocks, otherwise the
/// float mean rounded half to even); other factors use its float32 pixel-area weights.
pub fn resize_area(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (sw, sh) = src.dimensions();
    if (sw, sh) == (w, h) || sw == 0 || sh == 0 || w == 0 || h == 0 {
        return if (sw, sh) == (w, h) { src.clone() } else { RgbImage::new(w, h) };
    }
    let inv_x = w as f64 / sw as f64;
    let inv_y = h as f64 / sh as f64;
    let scale_x = 1.0 / inv_x;
    let scale_y = 1.0 / inv_y;
    if scale_x < 1.0 || scale_y < 1.0 {
        return resize_linear(src, w, h);
    }
    let ix = scale_x.round();
    let iy = scale_y.round();
    let s = src.as_raw();
    let (sw, w, h) = (sw as usize, w as usize, h as usize);
    let mut out = vec![0u8; w * h * 3];
    if (scale_x - ix).abs() < f64::EPSILON && (scale_y - iy).abs() < f64::EPSILON {
        let (ix, iy) = (ix as usize, iy as usize);
        let scale = 1.0f32 / (ix * iy) as f32;
        for dy in 0..h {
            for dx in 0..w {
                for c in 0..3 {
                    let mut sum = 0u32;
                    for yy in 0..iy {
                        for xx in 0..ix {
                            sum += s[((dy * iy + yy) * sw + dx * ix + xx) * 3 + c] as u32;
                        }
                    }
                    out[(dy * w + dx) * 3 + c] =
                        if ix == 2 && iy == 2 { ((sum + 2) >> 2) as u8 } else { round_even_u8(sum as f32 * scale) };
                }
            }
        }
    } else {
        let xtab = area_tab(sw, w, scale_x);
        let ytab = area_tab(sh as usize, h, scale_y);
        let mut buf = vec![0f32; w * 3];
        let mut sum = vec![0f32; w * 3];
        for dy in 0..h {
            let mut first = true;
            for &(_, sy, beta) in ytab.iter().filter(|t| t.0 == dy) {
                buf.iter_mut().for_each(|b| *b = 0.0);
                let row = &s[sy * sw * 3..(sy + 1) * sw * 3];
                for &(dx, sx, alpha) in &xtab {
                    for c in 0..3 {
                        buf[dx * 3 + c] += row[sx * 3 + c] as f32 * alpha;
                    }
                }
                for (acc, b) in sum.iter_mut().zip(&buf) {
                    let t = beta * b;
                    *acc = if first { t } else { *acc + t };
                }
                first = false;
            }
            for (o, v) in out[dy * w * 3..(dy + 1) * w * 3].iter_mut().zip(&sum) {
                *o = round_even_u8(*v);
            }
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("buffer sized w*h*3")
}

/// OpenCV's `computeResizeAreaTab`: (destination index, source index, weight) triples.
fn area_tab(ssize: usize, dsize: usize, scale: f64) -> Vec<(usize, usize, f32)> {
    let mut tab = Vec::with_capacity(ssize * 2);
    for dx in 0..dsize {
        let fsx1 = dx as f64 * scale;
        let fsx2 = fsx1 + scale;
        let cell = scale.min(ssize as f64 - fsx1);
        let sx2 = (fsx2.floor() as i64).min(ssize as i64 - 1);
        let sx1 = (fsx1.ceil() as i64).min(sx2);
        if sx1 as f64 - fsx1 > 1e-3 {
            tab.push((dx, (sx1 - 1) as usize, ((sx1 as f64 - fsx1) / cell) as f32));
        }
        for sx in sx1..sx2 {
            tab.push((dx, sx as usize, (1.0 / cell) as f32));
        }
        if fsx2 - sx2 as f64 > 1e-3 {
            let a = (fsx2 - sx2 as f64).min(1.0).min(cell) / cell;
            tab.push((dx, sx2 as usize, a as f32));
        }
    }
    tab
}

/// OpenCV `cv::resize(src, (w, h), INTER_LINEAR)` on an 8-bit RGB image: half-pixel-centre
/// bilinear weights quantised to 11 bits, the horizontal pass in integers and OpenCV's vertical
/// pass `(((s0 >> 4) * b0 >> 16) + ((s1 >> 4) * b1 >> 16) + 2) >> 2` (its SIMD formula; the
/// scalar rounding OpenCV uses for the last few values of a row, `(s0 b0 + s1 b1 + 2^21) >> 22`,
/// can differ by one on rare values; the fixtures show no difference).
pub fn resize_linear(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (sw, sh) = src.dimensions();
    if (sw, sh) == (w, h) {
        return src.clone();
    }
    if sw == 0 || sh == 0 || w == 0 || h == 0 {
        return RgbImage::new(w, h);
    }
    const COEF_SCALE: f32 = 2048.0;
    let scale_x = 1.0 / (w as f64 / sw as f64);
    let scale_y = 1.0 / (h as f64 / sh as f64);
    let (sw, sh, w, h) = (sw as usize, sh as usize, w as usize, h as usize);
    let coef = |v: f32| v * COEF_SCALE;
    // x: clamp the source index and zero the fraction at the borders (OpenCV's xmin/xmax).
    let xs: Vec<(usize, usize, i32, i32)> = (0..w)
        .map(|dx| {
            let mut fx = ((dx as f64 + 0.5) * scale_x - 0.5) as f32;
            let mut sx = fx.floor() as i64;
            fx -= sx as f32;
            if sx < 0 {
                fx = 0.0;
                sx = 0;
            }
            if sx >= sw as i64 - 1 {
                fx = 0.0;
                sx = sw as i64 - 1;
            }
            let sx = sx as usize;
            let a0 = coef(1.0 - fx).round_ties_even() as i32;
            let a1 = coef(fx).round_ties_even() as i32;
            (sx, (sx + 1).min(sw - 1), a0, a1)
        })
        .collect();
    // y: the fraction is kept and the row indices are clipped (OpenCV does not zero it).
    let ys: Vec<(usize, usize, i32, i32)> = (0..h)
        .map(|dy| {
            let mut fy = ((dy as f64 + 0.5) * scale_y - 0.5) as f32;
            let sy = fy.floor() as i64;
            fy -= sy as f32;
            let clip = |v: i64| v.clamp(0, sh as i64 - 1) as usize;
            let b0 = coef(1.0 - fy).round_ties_even() as i32;
            let b1 = coef(fy).round_ties_even() as i32;
            (clip(sy), clip(sy + 1), b0, b1)
        })
        .collect();
    let s = src.as_raw();
    let hrow = |sy: usize| -> Vec<i32> {
        let row = &s[sy * sw * 3..(sy + 1) * sw * 3];
        let mut r = vec![0i32; w * 3];
        for (dx, &(x0, x1, a0, a1)) in xs.iter().enumerate() {
            for c in 0..3 {
                r[dx * 3 + c] = row[x0 * 3 + c] as i32 * a0 + row[x1 * 3 + c] as i32 * a1;
            }
        }
        r
    };
    let rows: Vec<Vec<i32>> = (0..sh).map(hrow).collect();
    let mut out = vec![0u8; w * h * 3];
    for (dy, &(y0, y1, b0, b1)) in ys.iter().enumerate() {
        let (r0, r1) = (&rows[y0], &rows[y1]);
        for i in 0..w * 3 {
            let v = (((r0[i] >> 4) * b0) >> 16) + (((r1[i] >> 4) * b1) >> 16);
            out[dy * w * 3 + i] = ((v + 2) >> 2).clamp(0, 255) as u8;
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("buffer sized w*h*3")
}

/// OpenCV `borderInterpolate` for BORDER_REFLECT_101 (`gfedcb|abcdefgh|gfedcba`).
fn reflect101(mut p: i64, len: i64) -> usize {
    if len == 1 {
        return 0;
    }
    while p < 0 || p >= len {
        p = if p < 0 { -p } else { 2 * (len - 1) - p };
    }
    p as usize
}

/// OpenCV `cv::bilateralFilter(src, d, sigma_color, sigma_space)` on an 8-bit RGB image with its
/// default BORDER_REFLECT_101: radius `d / 2` (at least 1), a disc of offsets with float32
/// Gaussian space weights, a float32 colour-weight table indexed by the L1 colour distance
/// `|dr| + |dg| + |db|`, float32 accumulation in OpenCV's order, rounded half to even.
pub fn bilateral_filter(src: &RgbImage, d: i32, sigma_color: f64, sigma_space: f64) -> RgbImage {
    let (w, h) = (src.width() as usize, src.height() as usize);
    if w == 0 || h == 0 || sigma_color <= 1e-6 || sigma_space <= 1e-6 {
        return src.clone();
    }
    let gauss_color = (-0.5 / (sigma_color * sigma_color)) as f32 as f64;
    let gauss_space = (-0.5 / (sigma_space * sigma_space)) as f32 as f64;
    let radius: i64 = if d <= 0 { (sigma_space * 1.5).round_ties_even() as i64 } else { (d / 2) as i64 }.max(1);
    let color_weight: Vec<f32> = (0..256 * 3).map(|i| ((i * i) as f64 * gauss_color).exp() as f32).collect();
    let mut space: Vec<(i64, i64, f32)> = Vec::new();
    for i in -radius..=radius {
        for j in -radius..=radius {
            let r = ((i * i + j * j) as f64).sqrt();
            if r > radius as f64 {
                continue;
            }
            space.push((i, j, (r * r * gauss_space).exp() as f32));
        }
    }
    // Padded copy (copyMakeBorder) so the inner loop has no border logic.
    let pw = w + 2 * radius as usize;
    let ph = h + 2 * radius as usize;
    let s = src.as_raw();
    let mut pad = vec![0u8; pw * ph * 3];
    for py in 0..ph {
        let sy = reflect101(py as i64 - radius, h as i64);
        for px in 0..pw {
            let sx = reflect101(px as i64 - radius, w as i64);
            pad[(py * pw + px) * 3..(py * pw + px) * 3 + 3]
                .copy_from_slice(&s[(sy * w + sx) * 3..(sy * w + sx) * 3 + 3]);
        }
    }
    let offs: Vec<(isize, f32)> = space.iter().map(|&(i, j, wt)| ((i * pw as i64 + j) as isize * 3, wt)).collect();
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let c0 = ((y + radius as usize) * pw + x + radius as usize) * 3;
            let (r0, g0, b0) = (pad[c0] as i32, pad[c0 + 1] as i32, pad[c0 + 2] as i32);
            let (mut wsum, mut sr, mut sg, mut sb) = (0f32, 0f32, 0f32, 0f32);
            for &(o, sw) in &offs {
                let k = (c0 as isize + o) as usize;
                let (r, g, b) = (pad[k] as i32, pad[k + 1] as i32, pad[k + 2] as i32);
                let wgt = sw * color_weight[((r - r0).abs() + (g - g0).abs() + (b - b0).abs()) as usize];
                wsum += wgt;
                sr = (r as f32).mul_add(wgt, sr);
                sg = (g as f32).mul_add(wgt, sg);
                sb = (b as f32).mul_add(wgt, sb);
            }
            let inv = 1.0 / wsum;
            let o = (y * w + x) * 3;
            out[o] = round_even_u8(sr * inv);
            out[o + 1] = round_even_u8(sg * inv);
            out[o + 2] = round_even_u8(sb * inv);
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("buffer sized w*h*3")
}

/// PyTorch's antialiased bicubic filter (Keys, a = -0.5, as PIL), in float32 with the fused
/// multiply-adds PyTorch's CPU build contracts it into: `((a+2)x - (a+3))x² + 1` for |x| < 1,
/// `((ax - 5a)x + 8a)x - 4a` for |x| < 2. With plain multiply-then-add instead, about half the
/// float32 outputs of a resize differ from PyTorch's in the last bit (measured on the fixture).
fn aa_cubic(x: f32) -> f32 {
    const A: f32 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0).mul_add(x, -(A + 3.0)) * x).mul_add(x, 1.0)
    } else if x < 2.0 {
        A.mul_add(x, -5.0 * A).mul_add(x, 8.0 * A).mul_add(x, -4.0 * A)
    } else {
        0.0
    }
}

/// PyTorch's `_compute_weights_aa` for one axis: per output index, the first input index and the
/// normalised float32 weights.
fn aa_weights(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = input as f32 / output as f32;
    let support: f32 = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale: f32 = if scale >= 1.0 { (1.0 / scale as f64) as f32 } else { 1.0 };
    let max_size = (support.ceil() as i64) * 2 + 1;
    (0..output)
        .map(|i| {
            let center = (scale as f64 * (i as f64 + 0.5)) as f32;
            let xmin = (((center - support) as f64 + 0.5) as i64).max(0);
            let xmax = (((center + support) as f64 + 0.5) as i64).min(input as i64);
            let size = (xmax - xmin).clamp(0, max_size);
            let mut ws: Vec<f32> = (0..size)
                .map(|j| {
                    let t = ((j + xmin) as f32 - center) as f64 + 0.5;
                    aa_cubic((t * invscale as f64) as f32)
                })
                .collect();
            let total: f32 = ws.iter().fold(0.0, |a, &b| a + b);
            if total != 0.0 {
                ws.iter_mut().for_each(|w| *w /= total);
            }
            (xmin as usize, ws)
        })
        .collect()
}

/// `torchvision.transforms.functional.resize(img_u8, (h, w), BICUBIC, antialias=True)` on an RGB
/// image as PyTorch computes it on the CPU: to float32, separable antialiased bicubic (width pass
/// first, then height), clamp to [0, 255], round half to even, back to uint8.
pub fn resize_bicubic_aa(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (sw, sh) = src.dimensions();
    if sw == 0 || sh == 0 || w == 0 || h == 0 {
        return RgbImage::new(w, h);
    }
    let (sw, sh, w, h) = (sw as usize, sh as usize, w as usize, h as usize);
    let s: Vec<f32> = src.as_raw().iter().map(|&v| v as f32).collect();
    // sum of value × weight from the first tap, fused multiply-adds as in PyTorch's build
    let interp = |get: &dyn Fn(usize) -> f32, start: usize, ws: &[f32]| -> f32 {
        let Some(&w0) = ws.first() else { return 0.0 };
        let mut t = get(start) * w0;
        for (j, &wj) in ws.iter().enumerate().skip(1) {
            t = get(start + j).mul_add(wj, t);
        }
        t
    };
    // width pass (skipped when the width does not change, as PyTorch does)
    let horiz: Vec<f32> = if sw == w {
        s
    } else {
        let xw = aa_weights(sw, w);
        let mut o = vec![0f32; sh * w * 3];
        for y in 0..sh {
            for (dx, (x0, ws)) in xw.iter().enumerate() {
                for c in 0..3 {
                    o[(y * w + dx) * 3 + c] = interp(&|x| s[(y * sw + x) * 3 + c], *x0, ws);
                }
            }
        }
        o
    };
    let vert: Vec<f32> = if sh == h {
        horiz
    } else {
        let yw = aa_weights(sh, h);
        let mut o = vec![0f32; h * w * 3];
        for (dy, (y0, ws)) in yw.iter().enumerate() {
            for x in 0..w {
                for c in 0..3 {
                    o[(dy * w + x) * 3 + c] = interp(&|y| horiz[(y * w + x) * 3 + c], *y0, ws);
                }
            }
        }
        o
    };
    let out: Vec<u8> = vert.iter().map(|&v| round_even_u8(v)).collect();
    RgbImage::from_raw(w as u32, h as u32, out).expect("buffer sized w*h*3")
}
