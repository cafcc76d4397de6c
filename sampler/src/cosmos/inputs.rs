//! What `sampler cosmos` reads from files: prompt embeddings, initial latents, the conditioning
//! image or video (a folder of frames, an animated GIF or an H.264 MP4), and the reference of
//! the policy objective. Every reader names the file in its errors and checks what it returns
//! (shapes, finite values, frame sizes) so that bad input stops the run before any work.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// Reads `prompt_embeds` (B, L, D) and the optional `negative_prompt_embeds` from a safetensors
/// file (what `--prompt-embeds` takes), checked: rank 3, finite, equal shapes.
pub fn read_prompt_embeds(path: &Path, device: &Device) -> anyhow::Result<(Tensor, Option<Tensor>)> {
    let tensors = shared::weights::read_safetensors(path, device)?;
    let get = |k: &str| -> anyhow::Result<Option<Tensor>> {
        let Some(t) = tensors.get(k) else { return Ok(None) };
        anyhow::ensure!(t.rank() == 3, "{}: '{k}' is {:?}, expected (batch, tokens, width)", path.display(), t.dims());
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        anyhow::ensure!(values.iter().all(|v| v.is_finite()), "{}: '{k}' holds NaN/Inf values", path.display());
        Ok(Some(t.clone()))
    };
    let prompt = get("prompt_embeds")?.with_context(|| format!("{} has no tensor 'prompt_embeds'", path.display()))?;
    let negative = get("negative_prompt_embeds")?;
    if let Some(n) = &negative {
        anyhow::ensure!(
            n.dims() == prompt.dims(),
            "{}: negative_prompt_embeds {:?} and prompt_embeds {:?} differ",
            path.display(),
            n.dims(),
            prompt.dims()
        );
    }
    let unexpected: Vec<&String> =
        tensors.keys().filter(|k| *k != "prompt_embeds" && *k != "negative_prompt_embeds").collect();
    anyhow::ensure!(unexpected.is_empty(), "{}: unexpected tensors {unexpected:?}", path.display());
    Ok((prompt, negative))
}

/// Reads the unit-variance initial noise (`latents`, what `--latents` takes) and checks its
/// shape against the request's.
pub fn read_latents(path: &Path, expected: &[usize], device: &Device) -> anyhow::Result<Tensor> {
    let tensors = shared::weights::read_safetensors(path, device)?;
    let t = tensors.get("latents").with_context(|| format!("{} has no tensor 'latents'", path.display()))?;
    anyhow::ensure!(
        t.dims() == expected,
        "{}: 'latents' is {:?}, the requested size needs {:?}",
        path.display(),
        t.dims(),
        expected
    );
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    anyhow::ensure!(values.iter().all(|v| v.is_finite()), "{}: 'latents' holds NaN/Inf values", path.display());
    Ok(t.clone())
}

/// An image file (PNG, JPEG, or a GIF's first frame) or a folder of frames (taken in name
/// order) as a video (1, 3, F, height, width) in [−1, 1]; frames of another size are resized
/// (Lanczos3: diffusers resizes with PIL's Lanczos, so resized inputs match it only
/// approximately). `--image` and `--video` use [`load_image`] and [`load_video`].
pub fn load_conditioning(path: &Path, height: usize, width: usize, device: &Device) -> anyhow::Result<Tensor> {
    let frames = if path.is_dir() { read_frame_folder(path, None)? } else { vec![read_image(path)?] };
    frames_to_video(frames, height, width, device)
}

/// Image files a frame folder may hold (by extension, any case).
pub const FRAME_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "gif"];

fn extension(path: &Path) -> Option<String> {
    path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase)
}

/// One image file as RGB (a GIF's first frame), its format taken from its content.
fn read_image(path: &Path) -> anyhow::Result<RgbImage> {
    anyhow::ensure!(path.is_file(), "{}: no such file", path.display());
    let reader = image::ImageReader::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(reader.decode().with_context(|| format!("{}: not a readable PNG, JPEG or GIF image", path.display()))?.to_rgb8())
}

/// The frames of a folder in name order, all of one size (else an error naming the first file
/// that differs); only the last `keep_last` are decoded when given.
fn read_frame_folder(dir: &Path, keep_last: Option<usize>) -> anyhow::Result<Vec<RgbImage>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && extension(p).is_some_and(|e| FRAME_EXTENSIONS.contains(&e.as_str())))
        .collect();
    files.sort();
    anyhow::ensure!(
        !files.is_empty(),
        "{} has no frames (files ending in {})",
        dir.display(),
        FRAME_EXTENSIONS.iter().map(|e| format!(".{e}")).collect::<Vec<_>>().join(", ")
    );
    if let Some(k) = keep_last {
        files.drain(..files.len().saturating_sub(k));
    }
    let mut frames = Vec::with_capacity(files.len());
    for file in &files {
        let img = read_image(file)?;
        if let Some(first) = frames.first() {
            let first: &RgbImage = first;
            anyhow::ensure!(
                img.dimensions() == first.dimensions(),
                "{}: frame is {}×{} but {} is {}×{}; the frames of a video must all have one size",
                file.display(),
                img.width(),
                img.height(),
                files[0].display(),
                first.width(),
                first.height()
            );
        }
        frames.push(img);
    }
    Ok(frames)
}

/// Every frame of an animated GIF (composited on the full canvas, alpha dropped), keeping only
/// the last `keep_last` when given.
fn read_gif(path: &Path, keep_last: Option<usize>) -> anyhow::Result<Vec<RgbImage>> {
    use image::AnimationDecoder;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let decoder = match image::codecs::gif::GifDecoder::new(std::io::BufReader::new(file)) {
        Ok(d) => d,
        // The decoder reads up to the first image at once: a GIF without one ends there.
        Err(e) if e.to_string().contains("image data") || e.to_string().contains("End of File") => {
            anyhow::bail!("{}: the GIF has no frames (or is cut short before its first): {e}", path.display())
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("{}: not a readable GIF", path.display()))),
    };
    let keep = keep_last.unwrap_or(usize::MAX).max(1);
    let mut frames = VecDeque::new();
    for (i, frame) in decoder.into_frames().enumerate() {
        let frame = frame.with_context(|| format!("{}: decoding frame {i}", path.display()))?;
        if frames.len() == keep {
            frames.pop_front();
        }
        frames.push_back(image::DynamicImage::ImageRgba8(frame.into_buffer()).to_rgb8());
    }
    anyhow::ensure!(!frames.is_empty(), "{}: the GIF has no frames", path.display());
    Ok(frames.into())
}

/// RGB frames → (1, 3, F, height, width) in [−1, 1], each resized (Lanczos3) when its size
/// differs.
pub fn frames_to_video(frames: Vec<RgbImage>, height: usize, width: usize, device: &Device) -> anyhow::Result<Tensor> {
    anyhow::ensure!(!frames.is_empty(), "no frames");
    let mut out = Vec::with_capacity(frames.len());
    for img in frames {
        let img = if img.dimensions() != (width as u32, height as u32) {
            image::imageops::resize(&img, width as u32, height as u32, image::imageops::FilterType::Lanczos3)
        } else {
            img
        };
        // (H, W, 3) u8 → (3, H, W) in [−1, 1], as diffusers' VideoProcessor (x/255·2 − 1).
        let data: Vec<f32> = img.into_raw().into_iter().map(|v| v as f32 / 255.0 * 2.0 - 1.0).collect();
        out.push(Tensor::from_vec(data, (height, width, 3), device)?.permute((2, 0, 1))?);
    }
    Ok(Tensor::stack(&out, 1)?.unsqueeze(0)?.contiguous()?)
}

/// `--image`: one image file (PNG, JPEG, or a GIF's first frame) as (1, 3, 1, height, width) in
/// [−1, 1]. A folder is refused (that is `--video`).
pub fn load_image(path: &Path, height: usize, width: usize, device: &Device) -> anyhow::Result<Tensor> {
    anyhow::ensure!(!path.is_dir(), "--image {}: is a folder; pass a folder of frames with --video", path.display());
    frames_to_video(vec![read_image(path).context("--image")?], height, width, device)
}

/// The frames of a `--video` input: a folder of frames (PNG/JPEG/GIF, name order, one size), an
/// animated GIF (every frame) or an H.264 MP4; the last `keep_last` frames when given.
pub fn read_video_frames(path: &Path, keep_last: Option<usize>) -> anyhow::Result<Vec<RgbImage>> {
    anyhow::ensure!(path.exists(), "--video {}: no such file or folder", path.display());
    if path.is_dir() {
        return read_frame_folder(path, keep_last);
    }
    match extension(path).as_deref() {
        Some("gif") => read_gif(path, keep_last),
        Some("mp4" | "m4v" | "mov") => super::h264::decode_mp4(path, keep_last),
        other => anyhow::bail!(
            "--video {}: {} is not a video this reads (a folder of frames, .gif or .mp4); for a single image use --image",
            path.display(),
            other.map(|e| format!("'.{e}'")).unwrap_or_else(|| "a file without extension".into())
        ),
    }
}

/// `--video`: [`read_video_frames`] as (1, 3, F, height, width) in [−1, 1], frames resized as
/// [`load_conditioning`] resizes them.
pub fn load_video(
    path: &Path,
    keep_last: Option<usize>,
    height: usize,
    width: usize,
    device: &Device,
) -> anyhow::Result<Tensor> {
    frames_to_video(read_video_frames(path, keep_last)?, height, width, device)
}

/// The policy objective's reference (what the stress test takes from the scripted expert's
/// clip): `states` (1, F, S) — the joint states the policy reads beside each generated frame —
/// and `actions` (1, F, A) — the actions its outputs are compared with; frame 0 (the
/// conditioning frame) of both is unused. Checked against the run's frame count and the policy's
/// state/action sizes, finite.
pub fn read_policy_reference(
    path: &Path,
    num_frames: usize,
    state_dim: usize,
    action_dim: usize,
    device: &Device,
) -> anyhow::Result<(Tensor, Tensor)> {
    let tensors = shared::weights::read_safetensors(path, device).context("--policy-reference")?;
    let get = |k: &str, width: usize, what: &str| -> anyhow::Result<Tensor> {
        let t = tensors.get(k).with_context(|| {
            format!("--policy-reference {}: no tensor '{k}' ({what}, shape (1, {num_frames}, {width}))", path.display())
        })?;
        anyhow::ensure!(
            t.dims() == [1, num_frames, width],
            "--policy-reference {}: '{k}' is {:?}, expected (1, {num_frames}, {width}): one row per generated frame ({what})",
            path.display(),
            t.dims()
        );
        let t = t.to_dtype(DType::F32)?;
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        anyhow::ensure!(
            values.iter().all(|v| v.is_finite()),
            "--policy-reference {}: '{k}' holds NaN/Inf values",
            path.display()
        );
        Ok(t)
    };
    let states = get("states", state_dim, "the joint states")?;
    let actions = get("actions", action_dim, "the reference actions")?;
    let unexpected: Vec<&String> = tensors.keys().filter(|k| *k != "states" && *k != "actions").collect();
    anyhow::ensure!(
        unexpected.is_empty(),
        "--policy-reference {}: unexpected tensors {unexpected:?} (expected 'states' and 'actions')",
        path.display()
    );
    Ok((states, actions))
}
