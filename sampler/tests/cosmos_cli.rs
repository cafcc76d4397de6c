//! The `sampler cosmos` command line beyond the diffusers parity (`cosmos_pipeline_parity.rs`):
//! conditioning videos (frame folders, animated GIFs, H.264 MP4), the `video.mp4` output, the
//! Cosmos-Predict2.5 params JSON, the noise modes and `--verify-grad`, the policy objective, and
//! bad input for each — all on the tiny random pipeline of the fake HF cache, offline.
//!
//! References from outside the code under test: ffmpeg's decode of an ffmpeg-made MP4
//! (`fixtures/make_video_fixtures.sh`), diffusers' final latents for the params-file run (the
//! parity fixture), images written by the `image` crate, and central finite differences.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use sampler::cosmos::{h264, inputs, params_file};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// Largest per-channel difference of two RGB images, in uint8 steps.
fn max_step(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let mse: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

/// Decoded frames against their sources: (worst PSNR of a frame to its own source, smallest
/// margin by which that beats the PSNR to any other source frame) — a frame lost, repeated or
/// out of order makes the margin ≤ 0.
fn frame_match(sources: &[RgbImage], decoded: &[RgbImage]) -> (f64, f64) {
    let mut worst = f64::INFINITY;
    let mut margin = f64::INFINITY;
    for (t, d) in decoded.iter().enumerate() {
        let own = psnr(&sources[t], d);
        let other = sources.iter().enumerate().filter(|(u, _)| *u != t).map(|(_, s)| psnr(s, d)).fold(0.0, f64::max);
        worst = worst.min(own);
        margin = margin.min(own - other);
    }
    (worst, margin)
}

/// A frame of one flat colour.
fn flat(w: u32, h: u32, rgb: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, image::Rgb(rgb))
}

/// A frame with a gradient and a moving square: content an encoder must actually code.
fn pattern(w: u32, h: u32, t: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let inside = (x + 48 - 4 * t) % 48 < 12 && y > 8 && y < 24;
        if inside {
            image::Rgb([240, 40, 40])
        } else {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128])
        }
    })
}

fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    img.save(path).with_context(|| path.display().to_string())
}

/// (1, 3, F, H, W) in [−1, 1] → frame `t` as RGB (rounded).
fn frame_of(video: &Tensor, t: usize) -> Result<RgbImage> {
    let (_, _, _, h, w) = video.dims5()?;
    let f = video.get(0)?.narrow(1, t, 1)?.squeeze(1)?.permute((1, 2, 0))?.contiguous()?;
    let v: Vec<f32> = f.flatten_all()?.to_vec1()?;
    let bytes = v.iter().map(|x| ((x + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes).context("frame")
}

// ---------------------------------------------------------------------------------------------
// Video inputs

#[test]
fn frame_folder_png_and_jpeg_in_name_order_and_last_frames() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let colours = [[250, 10, 10], [10, 250, 10], [10, 10, 250]];
    save_png(&flat(48, 32, colours[0]), &dir.path().join("f000.png"))?;
    // JPEG is lossy: a flat colour survives within a few steps.
    flat(48, 32, colours[1]).save(dir.path().join("f001.jpg"))?;
    save_png(&flat(48, 32, colours[2]), &dir.path().join("f002.png"))?;
    std::fs::write(dir.path().join("notes.txt"), "not a frame")?;
    let video = inputs::load_video(dir.path(), None, 32, 48, &Device::Cpu)?;
    assert_eq!(video.dims(), &[1, 3, 3, 32, 48]);
    for (t, c) in colours.iter().enumerate() {
        let got = frame_of(&video, t)?;
        let step = max_step(&got, &flat(48, 32, *c));
        println!("frame {t}: max |Δ| {step} steps");
        assert!(step <= if t == 1 { 3 } else { 0 }, "frame {t} off by {step}");
    }
    let last = inputs::load_video(dir.path(), Some(2), 32, 48, &Device::Cpu)?;
    assert_eq!(last.dims(), &[1, 3, 2, 32, 48]);
    assert_eq!(max_step(&frame_of(&last, 1)?, &flat(48, 32, colours[2])), 0);
    Ok(())
}

#[test]
fn frame_folder_with_two_sizes_is_refused_naming_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    save_png(&flat(48, 32, [1, 2, 3]), &dir.path().join("a.png"))?;
    save_png(&flat(40, 32, [1, 2, 3]), &dir.path().join("b.png"))?;
    let err = format!("{:#}", inputs::load_video(dir.path(), None, 32, 48, &Device::Cpu).unwrap_err());
    assert!(err.contains("b.png") && err.contains("40×32") && err.contains("48×32"), "{err}");
    let empty = tempfile::tempdir()?;
    let err = format!("{:#}", inputs::load_video(empty.path(), None, 32, 48, &Device::Cpu).unwrap_err());
    assert!(err.contains("has no frames"), "{err}");
    Ok(())
}

#[test]
fn animated_gif_gives_every_frame_and_an_empty_gif_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let colours = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]];
    let frames: Vec<RgbImage> = colours.iter().map(|c| flat(48, 32, *c)).collect();
    let gif = dir.path().join("clip.gif");
    std::fs::write(&gif, sampler::report::gif_bytes(&frames, 100)?)?;
    let video = inputs::load_video(&gif, None, 32, 48, &Device::Cpu)?;
    assert_eq!(video.dims(), &[1, 3, 4, 32, 48]);
    for (t, c) in colours.iter().enumerate() {
        assert_eq!(max_step(&frame_of(&video, t)?, &flat(48, 32, *c)), 0, "frame {t}");
    }
    // --image takes a GIF's first frame only.
    let image = inputs::load_image(&gif, 32, 48, &Device::Cpu)?;
    assert_eq!(image.dims(), &[1, 3, 1, 32, 48]);
    assert_eq!(max_step(&frame_of(&image, 0)?, &frames[0]), 0);

    // A valid GIF with no image: header, 48×32 screen without palette, trailer.
    let empty = dir.path().join("empty.gif");
    std::fs::write(&empty, [b"GIF89a".as_slice(), &[48, 0, 32, 0, 0, 0, 0], &[0x3B]].concat())?;
    let err = format!("{:#}", inputs::load_video(&empty, None, 32, 48, &Device::Cpu).unwrap_err());
    assert!(err.contains("empty.gif") && err.contains("no frames"), "{err}");
    Ok(())
}

/// OpenH264's decode of an ffmpeg-made High-profile clip with B-frames against ffmpeg's own
/// decode: the same pictures in the same (display) order; the YUV → RGB conversions differ
/// (OpenH264's BT.601 table vs swscale), so a few steps apart.
#[test]
fn mp4_decodes_like_ffmpeg() -> Result<()> {
    let dir = fixtures().join("video");
    let frames = h264::decode_mp4(&dir.join("testsrc_h264.mp4"), None)?;
    assert_eq!(frames.len(), 7);
    let mut worst = (0u8, f64::INFINITY);
    for (t, got) in frames.iter().enumerate() {
        let reference = image::open(dir.join(format!("testsrc_ffmpeg_{:02}.png", t + 1)))?.to_rgb8();
        let (step, p) = (max_step(got, &reference), psnr(got, &reference));
        println!("frame {t}: max |Δ| {step} steps, PSNR {p:.1} dB against ffmpeg");
        worst = (worst.0.max(step), worst.1.min(p));
    }
    // A frame out of order or a wrong picture is tens of steps off at a PSNR near 10–20 dB.
    assert!(worst.1 > 35.0 && worst.0 <= 16, "worst frame: {} steps, {:.1} dB", worst.0, worst.1);
    let last = h264::decode_mp4(&dir.join("testsrc_h264.mp4"), Some(2))?;
    assert_eq!(last.len(), 2);
    assert_eq!(last[1], frames[6]);
    Ok(())
}

#[test]
fn mp4_of_another_codec_or_not_an_mp4_is_refused_with_the_ffmpeg_hint() -> Result<()> {
    let err = format!("{:#}", h264::decode_mp4(&fixtures().join("video/testsrc_mpeg4.mp4"), None).unwrap_err());
    assert!(err.contains("no H.264") && err.contains("ffmpeg -i"), "{err}");
    let dir = tempfile::tempdir()?;
    let junk = dir.path().join("junk.mp4");
    std::fs::write(&junk, "this is not a video")?;
    let err = format!("{:#}", inputs::load_video(&junk, None, 32, 48, &Device::Cpu).unwrap_err());
    assert!(err.contains("junk.mp4") && err.contains("not a readable MP4"), "{err}");
    let err =
        format!("{:#}", inputs::load_video(&dir.path().join("missing.mp4"), None, 32, 48, &Device::Cpu).unwrap_err());
    assert!(err.contains("no such file"), "{err}");
    Ok(())
}

/// `video.mp4`'s writer read back by the reader. (Checked by hand with ffmpeg 5.1 on a `sampler
/// cosmos` output: ffprobe reads H.264 Constrained Baseline, 48×32, 16/1 fps, all 9 frames, and
/// ffmpeg decodes it without an error.)
#[test]
fn mp4_round_trip() -> Result<()> {
    let frames: Vec<RgbImage> = (0..7).map(|t| pattern(48, 32, t)).collect();
    let bytes = h264::encode_mp4(&frames, 16.0)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("video.mp4");
    std::fs::write(&path, &bytes)?;
    let back = h264::decode_mp4(&path, None)?;
    assert_eq!(back.len(), frames.len());
    let (worst, margin) = frame_match(&frames, &back);
    println!(
        "{} bytes for 7 frames of 48×32; worst PSNR after the round trip {worst:.1} dB, {margin:.1} dB above the next-best frame",
        bytes.len()
    );
    // 4:2:0 chroma at 48×32 costs most of the loss on the pattern's red square.
    assert!(worst > 27.0 && margin > 3.0, "{worst:.1} dB, margin {margin:.1} dB");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The params file

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p)
}

fn params_error(text: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let p = write(dir.path(), "params.json", text)?;
    Ok(format!("{:#}", params_file::read(&p).unwrap_err()))
}

#[test]
fn params_file_errors_name_the_field() -> Result<()> {
    let e = params_error("{\"num_steps\": 4,")?;
    assert!(e.contains("not valid JSON"), "{e}");
    let e = params_error("[1, 2]")?;
    assert!(e.contains("expected a JSON object"), "{e}");
    let e = params_error(r#"{"num_steps": 4, "steps": 4, "prompt_text": "x"}"#)?;
    assert!(e.contains("unknown fields `prompt_text`, `steps`") && e.contains("allowed fields"), "{e}");
    let e = params_error(r#"{"num_steps": "four"}"#)?;
    assert!(e.contains("field `num_steps`") && e.contains("invalid type"), "{e}");
    let e = params_error(r#"{"seed": -1}"#)?;
    assert!(e.contains("field `seed`"), "{e}");
    let e = params_error(r#"{"num_output_frames": 0}"#)?;
    assert!(e.contains("field `num_output_frames`") && e.contains("positive"), "{e}");
    let e = params_error(r#"{"guidance": 9}"#)?;
    assert!(e.contains("field `guidance`") && e.contains("0..=7"), "{e}");
    let e = params_error(r#"{"noise_lr": -0.1}"#)?;
    assert!(e.contains("field `noise_lr`"), "{e}");
    let e = params_error(r#"{"resolution": "704x1280"}"#)?;
    assert!(e.contains("field `resolution`") && e.contains("HEIGHT,WIDTH"), "{e}");
    let e = params_error(r#"{"enable_autoregressive": true}"#)?;
    assert!(e.contains("field `enable_autoregressive`") && e.contains("not supported"), "{e}");
    let e = params_error(r#"{"inference_type": "video2world", "input_path": "nowhere.mp4"}"#)?;
    assert!(e.contains("field `input_path`") && e.contains("nowhere.mp4"), "{e}");
    let e = params_error(r#"{"inference_type": "world2video"}"#)?;
    assert!(e.contains("field `inference_type`") && e.contains("image2world"), "{e}");
    let e = params_error(r#"{"learn_noise": true, "noise_steps": 0}"#)?;
    assert!(e.contains("field `noise_steps`"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The command line

fn run_cli(args: &[String]) -> Result<Output> {
    Ok(std::process::Command::new(env!("CARGO_BIN_EXE_sampler"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", fixtures().join("hf_cache"))
        .env_remove("HF_HOME")
        .env("RUST_BACKTRACE", "0")
        .output()?)
}

fn f(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

/// The tiny pipeline at the parity fixture's settings, without the conditioning input.
fn base_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> =
        ["cosmos", "--model", "worldgrad-test/tiny-cosmos-predict2", "-o", &out.display().to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let prompt = f("cosmos_prompt_embeds_predict2.safetensors");
    let defaults = [
        ("--prompt-embeds", prompt.as_str()),
        ("--height", "32"),
        ("--width", "48"),
        ("--num-frames", "9"),
        ("--steps", "4"),
        ("--guidance", "3"),
    ];
    // A flag in `extra` replaces the default (clap refuses a flag given twice).
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            a.extend([flag.to_string(), value.to_string()]);
        }
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn report(dir: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(dir.join("report.json"))?)?)
}

fn read_tensor(path: &Path, key: &str) -> Result<Tensor> {
    shared::weights::read_safetensors(path, &Device::Cpu)?.remove(key).context(key.to_string())
}

/// The params file reaches diffusers' result: resolution, frames, guidance and the input image
/// come from the JSON (paths relative to it), the latents and embeddings from the command line,
/// and `--steps 4` on the command line wins over the file's `num_steps: 2` — the final latents
/// match diffusers' 4-step reference only if all of that happened.
#[test]
fn params_file_run_matches_diffusers_and_the_command_line_wins() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(fixtures().join("cosmos_condition.png"), dir.path().join("condition.png"))?;
    write(dir.path(), "prompt.txt", "  a robot arm pours water  \n")?;
    let params = write(
        dir.path(),
        "params.json",
        r#"{
  "inference_type": "image2world",
  "name": "tiny_case",
  "prompt_path": "prompt.txt",
  "input_path": "condition.png",
  "num_output_frames": 9,
  "num_steps": 2,
  "guidance": 3,
  "seed": 0,
  "resolution": "32, 48",
  "chunk_size": 77
}"#,
    )?;
    let out = dir.path().join("run");
    let args: Vec<String> = [
        "cosmos",
        "--model",
        "worldgrad-test/tiny-cosmos-predict2",
        "-i",
        &params.display().to_string(),
        "--prompt-embeds",
        &f("cosmos_prompt_embeds_predict2.safetensors"),
        "--latents",
        &f("cosmos_latents_predict2.safetensors"),
        "--steps",
        "4",
        "-o",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = run_cli(&args)?;
    assert!(o.status.success(), "{}", stderr(&o));
    let all = shared::weights::read_safetensors(&fixtures().join("cosmos_pipeline_cases.safetensors"), &Device::Cpu)?;
    let expected = all.get("predict2_nofps.final_latents").context("reference")?;
    let latents = read_tensor(&out.join("latents.safetensors"), "latents")?;
    let rel = max_abs(&(&latents - expected)?)? / max_abs(expected)?;
    println!("params-file run vs diffusers: final latents rel error {rel:.2e}");
    assert!(rel < 1e-4, "{rel:.3e}");
    let r = report(&out)?;
    let applied = &r["params_file"];
    assert_eq!(applied["name"], "tiny_case");
    let wins = applied["command_line_wins"].to_string();
    assert!(wins.contains("num_steps") && wins.contains("prompt_path"), "{wins}");
    assert!(applied["set"].to_string().contains("input_path → --image"), "{applied}");
    assert!(applied["ignored"].to_string().contains("chunk_size"), "{applied}");
    assert_eq!(r["steps"], 4);
    Ok(())
}

/// `--video` from an MP4, GIF and folder through the whole command; `video.mp4` holds the
/// frames of `video.safetensors` (read back with the reader, within H.264's loss).
#[test]
fn video_inputs_and_the_mp4_output() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (name, input) in [
        ("mp4", fixtures().join("video/testsrc_h264.mp4")),
        ("folder", {
            let d = dir.path().join("frames");
            std::fs::create_dir(&d)?;
            for t in 0..3 {
                save_png(&pattern(48, 32, t), &d.join(format!("{t:03}.png")))?;
            }
            d
        }),
        ("gif", {
            let g = dir.path().join("clip.gif");
            let frames: Vec<RgbImage> = (0..3).map(|t| pattern(48, 32, t)).collect();
            std::fs::write(&g, sampler::report::gif_bytes(&frames, 100)?)?;
            g
        }),
    ] {
        let out = dir.path().join(name);
        let o = run_cli(&base_args(&out, &["--video", &input.display().to_string(), "--video-frames", "5"]))?;
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let video = read_tensor(&out.join("video.safetensors"), "video")?;
        assert_eq!(video.dims(), &[1, 3, 9, 32, 48]);
        let back = h264::decode_mp4(&out.join("video.mp4"), None)?;
        assert_eq!(back.len(), 9, "{name}");
        let signed = video.affine(2.0, -1.0)?;
        let source = (0..9).map(|t| frame_of(&signed, t)).collect::<Result<Vec<_>>>()?;
        let (worst, margin) = frame_match(&source, &back);
        println!("--video {name}: video.mp4 vs video.safetensors: worst PSNR {worst:.1} dB, {margin:.1} dB above the next-best frame");
        // The tiny random model's frames are close to noise, H.264's worst case.
        assert!(worst > 20.0 && margin > 1.0, "{name}: {worst:.1} dB, margin {margin:.1} dB");
        assert_eq!(report(&out)?["video_mp4"]["fps"], 16.0);
    }
    Ok(())
}

/// The sde modes change the sample (churn on every step) and are reproducible from the seed;
/// `sde-from-z0` optimises z0 through the churned trajectory; `--verify-grad` in f64 checks the
/// first gradient (step noises ξ_i = Q_i z0 included) against central differences.
#[test]
fn noise_modes_and_verify_grad() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = f("cosmos_condition.png");
    let latents_of = |name: &str, extra: &[&str]| -> Result<Tensor> {
        let out = dir.path().join(name);
        let mut a = vec!["--image", image.as_str(), "--num-frames", "5", "--steps", "3"];
        a.extend_from_slice(extra);
        let o = run_cli(&base_args(&out, &a))?;
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        read_tensor(&out.join("latents.safetensors"), "latents")
    };
    let ode = latents_of("ode", &[])?;
    let sde = latents_of("sde", &["--noise-mode", "sde"])?;
    let sde_again = latents_of("sde2", &["--noise-mode", "sde"])?;
    let weak = latents_of("weak", &["--noise-mode", "sde", "--s-churn", "0.01"])?;
    let d = |a: &Tensor, b: &Tensor| -> Result<f64> { max_abs(&(a - b)?) };
    println!("sde vs ode {:.3e}; S_churn 0.01 vs ode {:.3e}", d(&sde, &ode)?, d(&weak, &ode)?);
    assert!(d(&sde, &ode)? > 1e-3);
    assert_eq!(d(&sde, &sde_again)?, 0.0);
    assert!(d(&weak, &ode)? < d(&sde, &ode)?);

    // A target video for the objective.
    let target = dir.path().join("target.safetensors");
    let t = shared::rng::SplitMix64::new(7).uniform_tensor((1, 3, 5, 32, 48), 0.0, 1.0, DType::F32, &Device::Cpu)?;
    shared::weights::save_tensors_atomic(&std::collections::HashMap::from([("video".to_string(), t)]), &target)?;
    let out = dir.path().join("grad");
    let target_s = target.display().to_string();
    let a = [
        "--image",
        image.as_str(),
        "--num-frames",
        "5",
        "--steps",
        "3",
        "--dtype",
        "f64",
        "--noise-mode",
        "sde-from-z0",
        "--iterations",
        "1",
        "--target-video",
        target_s.as_str(),
        "--verify-grad",
    ];
    let o = run_cli(&base_args(&out, &a))?;
    assert!(o.status.success(), "{}", stderr(&o));
    let r = report(&out)?;
    let check = &r["gradient_check"];
    let worst = check["per_var"][0]["checks"]
        .as_array()
        .context("checks")?
        .iter()
        .chain(check["joint"].as_array().context("joint")?)
        .map(|c| c["rel_error"].as_f64().unwrap_or(f64::INFINITY))
        .fold(0.0, f64::max);
    let grad = check["per_var"][0]["checks"][0]["grad_norm"].as_f64().unwrap_or(0.0);
    println!("verify-grad (f64, sde-from-z0): worst relative error {worst:.2e}, |∇z0| {grad:.3e}");
    assert!(grad > 1e-8, "degenerate gradient");
    assert!(worst < 1e-5, "{worst:.3e}");
    assert_eq!(r["noise_mode"], "sde-from-z0");
    assert!(r["churn_plan"]["noise_scales"].as_array().context("plan")?.iter().all(|s| s.as_f64() > Some(0.0)));
    Ok(())
}

/// The policy objective through the command line with the embedded image policy: frames
/// 32×96 (three 32×32 views), a reference of random states and actions; one ascent iteration
/// moves the action error up from its measured start.
#[test]
fn policy_objective_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let policy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../weights/policy.safetensors");
    let reference = dir.path().join("reference.safetensors");
    let mut rng = shared::rng::SplitMix64::new(11);
    let states = rng.normal_tensor((1, 5, 24), DType::F32, &Device::Cpu)?;
    let actions = rng.normal_tensor((1, 5, 8), DType::F32, &Device::Cpu)?;
    shared::weights::save_tensors_atomic(
        &std::collections::HashMap::from([("states".to_string(), states), ("actions".to_string(), actions)]),
        &reference,
    )?;
    let out = dir.path().join("run");
    let (p, r) = (policy.display().to_string(), reference.display().to_string());
    let a = [
        "--image",
        &f("cosmos_condition.png"),
        "--width",
        "96",
        "--num-frames",
        "5",
        "--steps",
        "3",
        "--iterations",
        "2",
        "--lr",
        "0.05",
        "--direction",
        "ascent",
        "--policy",
        &p,
        "--policy-reference",
        &r,
    ]
    .map(String::from);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = run_cli(&base_args(&out, &a))?;
    assert!(o.status.success(), "{}", stderr(&o));
    let rep = report(&out)?;
    let (first, last) = (rep["summary"]["initial_loss"].as_f64(), rep["summary"]["final_loss"].as_f64());
    println!("policy action MSE: {first:?} → {last:?}; {}", rep["objective"]);
    let (first, last) = (first.context("initial")?, last.context("final")?);
    assert!(first.is_finite() && first > 0.0);
    assert!(last > first, "ascent did not increase the action error: {first} → {last}");
    Ok(())
}

/// Every bad input stops the run with one clear error before anything is loaded or written.
#[test]
fn bad_inputs_are_refused_before_any_work() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("never");
    let image = f("cosmos_condition.png");
    let mismatch = dir.path().join("mismatch");
    std::fs::create_dir(&mismatch)?;
    save_png(&flat(48, 32, [0, 0, 0]), &mismatch.join("0.png"))?;
    save_png(&flat(32, 32, [0, 0, 0]), &mismatch.join("1.png"))?;
    let empty_gif = dir.path().join("empty.gif");
    std::fs::write(&empty_gif, [b"GIF89a".as_slice(), &[48, 0, 32, 0, 0, 0, 0], &[0x3B]].concat())?;
    let bad_json = write(dir.path(), "bad.json", "{\"num_steps\": 4")?;
    let unknown = write(dir.path(), "unknown.json", r#"{"num_steps": 4, "sampler": "dpm", "cfg": 2}"#)?;
    let wrong_type = write(dir.path(), "type.json", r#"{"guidance": "high"}"#)?;
    let reference = dir.path().join("reference.safetensors");
    let zeros = Tensor::zeros((1, 9, 3), DType::F32, &Device::Cpu)?;
    shared::weights::save_tensors_atomic(
        &std::collections::HashMap::from([("states".to_string(), zeros.clone()), ("actions".to_string(), zeros)]),
        &reference,
    )?;
    let policy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../weights/policy.safetensors");
    let s = |p: &Path| p.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--video".into(), s(&dir.path().join("missing"))], "no such file"),
        (vec!["--video".into(), s(&empty_gif)], "no frames"),
        (vec!["--video".into(), s(&mismatch)], "must all have one size"),
        (vec!["--video".into(), image.clone()], "for a single image use --image"),
        (vec!["--image".into(), s(&mismatch)], "is a folder"),
        (
            vec!["--image".into(), image.clone(), "--video-frames".into(), "2".into()],
            "--video-frames applies to --video",
        ),
        (
            vec!["--video".into(), s(&mismatch), "--video-frames".into(), "0".into()],
            "--video-frames must be at least 1",
        ),
        (vec!["--image".into(), image.clone(), "-i".into(), s(&bad_json)], "not valid JSON"),
        (vec!["--image".into(), image.clone(), "-i".into(), s(&unknown)], "unknown fields `cfg`, `sampler`"),
        (vec!["--image".into(), image.clone(), "-i".into(), s(&wrong_type)], "field `guidance`"),
        (vec!["--image".into(), image.clone(), "-i".into(), s(&dir.path().join("none.json"))], "cannot read"),
        (vec!["--image".into(), image.clone(), "--noise-mode".into(), "langevin".into()], "allowed: ode, sde"),
        (vec!["--image".into(), image.clone(), "--s-churn".into(), "1".into()], "--noise-mode ode injects no noise"),
        (
            vec!["--image".into(), image.clone(), "--noise-mode".into(), "sde".into(), "--s-churn".into(), "0".into()],
            "would inject nothing",
        ),
        (
            vec!["--image".into(), image.clone(), "--noise-mode".into(), "sde".into(), "--s-churn=-1".into()],
            "--s-churn must be finite and ≥ 0",
        ),
        (vec!["--image".into(), image.clone(), "--noise-mode".into(), "sde-learnable".into()], "optimises nothing"),
        (vec!["--image".into(), image.clone(), "--verify-grad".into()], "needs --iterations > 0"),
        (vec!["--image".into(), image.clone(), "--iterations".into(), "1".into()], "needs an objective"),
        (vec!["--image".into(), image.clone(), "--policy".into(), s(&policy)], "needs --policy-reference"),
        (vec!["--image".into(), image.clone(), "--policy-reference".into(), s(&reference)], "give --policy FILE too"),
        (
            vec![
                "--image".into(),
                image.clone(),
                "--policy".into(),
                s(&policy),
                "--policy-reference".into(),
                s(&reference),
            ],
            "3× as wide as high",
        ),
        (
            vec![
                "--image".into(),
                image.clone(),
                "--width".into(),
                "96".into(),
                "--policy".into(),
                s(&policy),
                "--policy-reference".into(),
                s(&reference),
            ],
            "'states' is [1, 9, 3], expected (1, 9, 24)",
        ),
        (
            vec![
                "--image".into(),
                image.clone(),
                "--width".into(),
                "96".into(),
                "--policy".into(),
                s(&reference),
                "--policy-reference".into(),
                s(&reference),
            ],
            "not an exported LAPO policy",
        ),
        (
            vec![
                "--image".into(),
                image.clone(),
                "--iterations".into(),
                "1".into(),
                "--target-video".into(),
                s(&reference),
                "--verify-grad".into(),
                "--dtype".into(),
                "bf16".into(),
            ],
            "use --dtype f32 or f64",
        ),
    ];
    for (extra, expected) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let o = run_cli(&base_args(&out, &extra))?;
        let err = stderr(&o);
        println!("{extra:?} → {}", err.lines().next().unwrap_or(""));
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(expected), "{extra:?}: expected '{expected}' in: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "{extra:?}: the refused run created the output directory");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The policy objective's gradient through the pipeline, in f64

/// An untrained LAPO of the embedded image policy's kind (conv encoder, privileged head,
/// `fused-state` features) in f64, with a non-trivial normalisation.
fn f64_policy(image_hw: (usize, usize), seed: u64) -> Result<(rl::lapo::Lapo, rl::trainer::Normalization)> {
    use rl::env::{ACTION_DIM, STATE_DIM};
    let config = rl::lapo::LapoConfig {
        encoder: rl::encoders::EncoderKind::Conv,
        aux_state_weight: 1000.0,
        aux_state_input: true,
        feature_layout: rl::encoders::FeatureLayout::FusedState,
        seed,
        // The embedded policy's recipe: `train`'s defaults with 2 hidden layers.
        hidden_layers: 2,
        ..rl::lapo::LapoConfig::default()
    };
    let dims = rl::lapo::Dims {
        state_dim: STATE_DIM,
        action_dim: ACTION_DIM,
        image_hw,
        privileged_dim: 16,
        supersample: 1,
        ..Default::default()
    };
    let bounds = rl::lapo::ValueBounds { min_v: 0.0, max_v: 100.0 };
    let lapo = rl::lapo::Lapo::new(config, dims, bounds, DType::F64, &Device::Cpu)?;
    let mut rng = shared::rng::SplitMix64::new(seed ^ 0x77);
    let mut v = |n: usize, lo: f64, hi: f64| (0..n).map(|_| (lo + (hi - lo) * rng.uniform()) as f32).collect();
    let norm = rl::trainer::Normalization {
        state_mean: v(STATE_DIM, -0.5, 0.5),
        state_std: v(STATE_DIM, 0.5, 1.5),
        action_mean: v(ACTION_DIM, -0.3, 0.3),
        action_std: v(ACTION_DIM, 0.5, 1.5),
        reward_scale: 1.0,
        privileged_mean: Vec::new(),
        privileged_std: Vec::new(),
    };
    Ok((lapo, norm))
}

/// ∇z0 of the policy objective (`PolicyOnVideo`: [0, 1] → [−1, 1], camera split, bilinear
/// resize, LAPO, action MSE) through every step of the tiny Predict2 pipeline (CFG on) and the
/// VAE decode, in f64, against central differences.
#[test]
fn policy_objective_gradient_through_the_pipeline_f64() -> Result<()> {
    use sampler::cosmos::pipeline::{CosmosPipeline, GenerateRequest, Repository};
    use sampler::objective::PolicyObjective;
    let dev = Device::Cpu;
    let hub = shared::weights::HubOptions { cache_dir: fixtures().join("hf_cache"), offline: true };
    let repo = Repository::Hub { repo: "worldgrad-test/tiny-cosmos-predict2".into(), revision: "main".into(), hub };
    let pipe = CosmosPipeline::load_from(repo, DType::F64, &dev)?;
    let (h, w, frames) = (16, 48, 5);
    let video = inputs::load_image(&fixtures().join("cosmos_condition.png"), h, w, &dev)?;
    let (prompt, negative) =
        inputs::read_prompt_embeds(&fixtures().join("cosmos_prompt_embeds_predict2.safetensors"), &dev)?;
    let shape = pipe.latent_shape(1, frames, h, w);
    let mut rng = shared::rng::SplitMix64::new(5);
    let latents = rng.normal_tensor(&shape[..], DType::F64, &dev)?;
    let req = GenerateRequest {
        video,
        prompt_embeds: prompt,
        negative_prompt_embeds: negative,
        num_frames: frames,
        steps: 3,
        guidance: 3.0,
        fps: None,
        latents: latents.clone(),
        condition_latent_frames: None,
    };
    let prepared = pipe.prepare(&req)?;
    let traj = prepared.trajectory();
    // 16 px views resized to the policy's 12 px: the resize is not the identity.
    let (lapo, norm) = f64_policy((12, 12), 3)?;
    let states = rng.normal_tensor((1, frames, rl::env::STATE_DIM), DType::F64, &dev)?;
    let actions = rng.normal_tensor((1, frames, rl::env::ACTION_DIM), DType::F64, &dev)?;
    let policy = sampler::stress::LapoFramePolicy::from_actor((&lapo, &norm), (12, 12), "f64 lapo".into(), &states, h)?;
    let inner = sampler::cosmos::policy::PolicyOnVideo {
        inner: PolicyObjective { policy, reference_actions: actions.narrow(1, 1, frames - 1)?.contiguous()? },
    };
    let objective = sampler::cosmos::vae::DecodedObjective { vae: &pipe.vae, inner };
    let noise = sampler::noise::NoiseState {
        z0: sampler::noise::NoiseTensor::Learnable(candle_core::Var::from_tensor(&latents)?),
        steps: vec![None; traj.num_steps()],
        from_z0: None,
    };
    let opts = shared::gradcheck::GradCheckOptions { eps: 1e-5, directions: 3, seed: 9, floor: 1e-14 };
    let report =
        sampler::optimize::verify_gradient(&traj, &noise, &objective, sampler::trajectory::GradMode::Recompute, &opts)?;
    println!("{}", report.table());
    report.assert_nondegenerate(1e-10, "policy objective through the pipeline")?;
    report.assert_close(POLICY_PIPELINE_TOL, "∇z0 of the policy objective through the pipeline and the decode")?;
    Ok(())
}

/// 6× the worst measured relative error (3.1e-7 at ε = 1e-5: 3 directions of z0 and 3 joint);
/// a dropped factor on the path ([0, 1] → [−1, 1], the resize, the de-normalisation) is off by
/// ≥ 1e-2.
const POLICY_PIPELINE_TOL: f64 = 2e-6;

/// `--prompt-embeds` as a Hub reference resolves from the cache (the one resolver every weights
/// flag uses), and without `-o` each run writes a new `out/cosmos/run-NNN`, never an earlier one.
#[test]
fn hub_reference_inputs_and_numbered_default_outputs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A cache holding the fixture's pipeline (linked) and an embeddings repository.
    let cache = dir.path().join("hf_cache");
    std::fs::create_dir(&cache)?;
    for entry in std::fs::read_dir(fixtures().join("hf_cache"))? {
        let entry = entry?;
        std::os::unix::fs::symlink(entry.path(), cache.join(entry.file_name()))?;
    }
    let hash = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = cache.join("models--worldgrad-test--embeds");
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), hash)?;
    let snapshot = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snapshot)?;
    std::fs::copy(fixtures().join("cosmos_prompt_embeds_predict2.safetensors"), snapshot.join("prompt.safetensors"))?;
    let image = dir.path().join("first.png");
    save_png(&pattern(48, 32, 0), &image)?;

    let mut args = base_args(
        Path::new("unused"),
        &["--prompt-embeds", "worldgrad-test/embeds:prompt.safetensors", "--image", &image.display().to_string()],
    );
    // Drop `-o unused`: the default output directory is what is tested.
    let o_at = args.iter().position(|a| a == "-o").context("base args hold -o")?;
    args.drain(o_at..o_at + 2);
    let run = || -> Result<Output> {
        Ok(std::process::Command::new(env!("CARGO_BIN_EXE_sampler"))
            .args(&args)
            .current_dir(dir.path())
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_HOME")
            .output()?)
    };
    for n in 1..=2 {
        let o = run()?;
        assert!(o.status.success(), "run {n}: {}", stderr(&o));
        let out = dir.path().join(format!("out/cosmos/run-{n:03}"));
        let r = report(&out)?;
        let used = r["prompt_embeds"].as_str().context("report names the embeddings")?;
        assert!(used.ends_with(&format!("snapshots/{hash}/prompt.safetensors")), "{used}");
    }
    // The first run's outputs are still there beside the second's.
    assert!(dir.path().join("out/cosmos/run-001/video.safetensors").is_file());
    // A reference the cache does not hold is refused naming the flag, before any work.
    let mut missing = args.clone();
    let at = missing.iter().position(|a| a == "worldgrad-test/embeds:prompt.safetensors").context("ref")?;
    missing[at] = "worldgrad-test/embeds:absent.safetensors".into();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sampler"))
        .args(&missing)
        .current_dir(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", &cache)
        .env_remove("HF_HOME")
        .output()?;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--prompt-embeds"), "{}", stderr(&o));
    assert!(!dir.path().join("out/cosmos/run-003").exists());
    Ok(())
}
