//! `sampler cosmos -i params.json`: Cosmos-Predict2.5's inference JSON (the `InferenceArguments`
//! of its `examples/inference.py`: one sample per file), plus the source system's noise fields,
//! read into the same [`CosmosArgs`] as the flags — one set of defaults. A value given on the
//! command line wins over the file's.
//!
//! Cosmos-Predict2.5 fields and what they set:
//! * `prompt` | `prompt_path` (a text file, read and trimmed) → `--prompt`; `negative_prompt` →
//!   `--negative-prompt` (both unused when `--prompt-embeds` is given: the embeddings stand for
//!   them);
//! * `inference_type` (`text2world` | `image2world` | `video2world`) with `input_path` (relative
//!   to the JSON file's folder): `image2world` conditions on one frame — an image as `--image`,
//!   the last frame of a video as `--video` with `--video-frames 1`; `video2world` on the last
//!   4·(2 − 1) + 1 = 5 frames of a video (its 2 latent conditioning frames: `--video-frames 5`),
//!   or on an image; `text2world` takes no input (upstream ignores `input_path` there);
//! * `num_output_frames` → `--num-frames`; `num_steps` → `--steps`; `guidance` (0–7, as
//!   upstream) → `--guidance`; `seed` → `--seed`; `resolution` `"H,W"` → `--height`/`--width`
//!   (`"none"`: the defaults);
//! * `name` is recorded in the report; `enable_autoregressive` must be false (not supported),
//!   and `chunk_size` / `chunk_overlap` only matter with it (recorded as ignored).
//!
//! The source system's fields: `learn_noise` (false → `--iterations 0`), `noise_steps` →
//! `--iterations` (`learn_noise: true` without it: the source's default, 30), `noise_lr` →
//! `--lr`, `learnable_step_noise: true` → `--noise-mode sde-from-z0`.
//!
//! Unknown fields give one error naming all of them; a wrong type names the field.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use super::app::CosmosArgs;

/// Every field this reads, Cosmos-Predict2.5's first.
pub const FIELDS: &[&str] = &[
    "name",
    "inference_type",
    "prompt",
    "prompt_path",
    "negative_prompt",
    "input_path",
    "seed",
    "guidance",
    "resolution",
    "num_output_frames",
    "num_steps",
    "enable_autoregressive",
    "chunk_size",
    "chunk_overlap",
    "learn_noise",
    "noise_steps",
    "noise_lr",
    "learnable_step_noise",
    // Cosmos-Transfer2.5's (cosmos_transfer2/config.py, InferenceArguments).
    "video_path",
    "max_frames",
    "num_video_frames_per_chunk",
    "num_conditional_frames",
    "edge",
    "vis",
    "depth",
    "seg",
    "context_frame_index",
    "image_context_path",
    "sigma_max",
    "show_control_condition",
    "show_input",
    "keep_input_resolution",
];

/// One control of a Cosmos-Transfer2.5 params file (`edge`, `vis`, `depth`, `seg`: its
/// `ControlConfig` and subclasses).
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlParams {
    /// A precomputed control video (None: computed from `video_path`, edge and vis only here).
    pub control_path: Option<PathBuf>,
    /// 0..=1, default 1.
    pub control_weight: Option<f64>,
    /// edge only: very_low | low | medium | high | very_high.
    pub preset_edge_threshold: Option<String>,
    /// vis only: the same levels.
    pub preset_blur_strength: Option<String>,
    /// Not ported (spatiotemporal masks; SAM2 segmentation on the fly).
    pub mask_path: Option<PathBuf>,
    pub mask_prompt: Option<String>,
    pub control_prompt: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InferenceType {
    Text2world,
    Image2world,
    Video2world,
}

/// Pixel frames of Predict2.5's video2world conditioning: 2 latent frames, 1 + 4·(2 − 1).
pub const VIDEO2WORLD_FRAMES: usize = 5;

/// The file's fields, all optional here (a missing one keeps the command line's value or
/// default). Paths are resolved against the file's folder by [`read`].
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceParams {
    pub name: Option<String>,
    pub inference_type: Option<InferenceType>,
    pub prompt: Option<String>,
    pub prompt_path: Option<PathBuf>,
    pub negative_prompt: Option<String>,
    pub input_path: Option<PathBuf>,
    pub seed: Option<u64>,
    pub guidance: Option<f64>,
    pub resolution: Option<String>,
    pub num_output_frames: Option<u64>,
    pub num_steps: Option<u64>,
    pub enable_autoregressive: Option<bool>,
    pub chunk_size: Option<u64>,
    pub chunk_overlap: Option<u64>,
    pub learn_noise: Option<bool>,
    pub noise_steps: Option<u64>,
    pub noise_lr: Option<f64>,
    pub learnable_step_noise: Option<bool>,
    pub video_path: Option<PathBuf>,
    pub max_frames: Option<u64>,
    pub num_video_frames_per_chunk: Option<u64>,
    pub num_conditional_frames: Option<u64>,
    pub edge: Option<ControlParams>,
    pub vis: Option<ControlParams>,
    pub depth: Option<ControlParams>,
    pub seg: Option<ControlParams>,
    pub context_frame_index: Option<u64>,
    pub image_context_path: Option<PathBuf>,
    pub sigma_max: Option<serde_json::Value>,
    pub show_control_condition: Option<bool>,
    pub show_input: Option<bool>,
    pub keep_input_resolution: Option<bool>,
}

impl InferenceParams {
    /// The Transfer2.5 controls the file gives, in upstream's order (edge, vis, depth, seg).
    pub fn controls(&self) -> Vec<(&'static str, &ControlParams)> {
        [("edge", &self.edge), ("vis", &self.vis), ("depth", &self.depth), ("seg", &self.seg)]
            .into_iter()
            .filter_map(|(k, c)| c.as_ref().map(|c| (k, c)))
            .collect()
    }
}

/// `"H,W"` (spaces allowed) → (H, W); `"none"` → None.
fn parse_resolution(s: &str) -> anyhow::Result<Option<(usize, usize)>> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let parsed: Option<Vec<usize>> = parts.iter().map(|p| p.parse::<usize>().ok()).collect();
    match parsed.as_deref() {
        Some(&[h, w]) if h > 0 && w > 0 => Ok(Some((h, w))),
        _ => anyhow::bail!("expected \"HEIGHT,WIDTH\" in pixels (e.g. \"704,1280\") or \"none\", got \"{s}\""),
    }
}

/// Reads and checks a params file: JSON syntax, unknown fields (all named at once), types (the
/// field named), values; relative paths resolved against the file's folder and the prompt file
/// read.
pub fn read(path: &Path) -> anyhow::Result<InferenceParams> {
    let name = format!("-i {}", path.display());
    let text = std::fs::read_to_string(path).with_context(|| format!("{name}: cannot read the file"))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{name}: not valid JSON: {e}"))?;
    let serde_json::Value::Object(map) = &value else {
        anyhow::bail!("{name}: expected a JSON object of fields, e.g. {{\"num_steps\": 35}}");
    };
    let mut unknown: Vec<&str> = map.keys().map(String::as_str).filter(|k| !FIELDS.contains(k)).collect();
    unknown.sort_unstable();
    anyhow::ensure!(
        unknown.is_empty(),
        "{name}: unknown field{} {}; allowed fields: {}",
        if unknown.len() > 1 { "s" } else { "" },
        unknown.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
        FIELDS.join(", ")
    );
    let mut p: InferenceParams = serde_path_to_error::deserialize(value).map_err(|e| {
        let msg = e.inner().to_string();
        let msg = msg.find(" at line ").map_or(msg.as_str(), |i| &msg[..i]).to_string();
        anyhow::anyhow!("{name}: field `{}`: {msg}", e.path())
    })?;
    let field = |f: &str, msg: String| anyhow::anyhow!("{name}: field `{f}`: {msg}");

    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    if let Some(input) = &p.input_path {
        let resolved = resolve(input);
        if !resolved.exists() {
            return Err(field("input_path", format!("{}: no such file or folder", resolved.display())));
        }
        p.input_path = Some(resolved);
    }
    if let Some(prompt_path) = &p.prompt_path {
        if p.prompt.is_some() {
            return Err(field("prompt_path", "give `prompt` or `prompt_path`, not both".into()));
        }
        let resolved = resolve(prompt_path);
        let text = std::fs::read_to_string(&resolved)
            .map_err(|e| field("prompt_path", format!("{}: {e}", resolved.display())))?;
        p.prompt = Some(text.trim().to_string());
        p.prompt_path = Some(resolved);
    }
    if let Some(video) = &p.video_path {
        let resolved = resolve(video);
        if !resolved.exists() {
            return Err(field("video_path", format!("{}: no such file or folder", resolved.display())));
        }
        p.video_path = Some(resolved);
    }
    for (kind, slot) in [("edge", &mut p.edge), ("vis", &mut p.vis), ("depth", &mut p.depth), ("seg", &mut p.seg)] {
        let Some(c) = slot.as_mut() else { continue };
        if let Some(path) = &c.control_path {
            let resolved = resolve(path);
            if !resolved.exists() {
                return Err(field(
                    &format!("{kind}.control_path"),
                    format!("{}: no such file or folder", resolved.display()),
                ));
            }
            c.control_path = Some(resolved);
        }
        if let Some(w) = c.control_weight {
            if !(w.is_finite() && (0.0..=1.0).contains(&w)) {
                return Err(field(
                    &format!("{kind}.control_weight"),
                    format!("must be in 0..=1 (as upstream), got {w}"),
                ));
            }
        }
        let presets = [
            ("preset_edge_threshold", &c.preset_edge_threshold, "edge"),
            ("preset_blur_strength", &c.preset_blur_strength, "vis"),
        ];
        for (name, value, owner) in presets {
            if let Some(v) = value {
                if kind != owner {
                    return Err(field(&format!("{kind}.{name}"), format!("only `{owner}` has it")));
                }
                super::controls::Preset::parse(v).map_err(|e| field(&format!("{kind}.{name}"), e.to_string()))?;
            }
        }
        if c.mask_path.is_some() || c.mask_prompt.is_some() || c.control_prompt.is_some() {
            return Err(field(
                kind,
                "mask_path / mask_prompt / control_prompt are not supported: spatiotemporal masks and on-the-fly \
                 segmentation (GroundingDINO + SAM2) are not ported; give a precomputed control_path"
                    .into(),
            ));
        }
        if c.control_path.is_none() && (kind == "depth" || kind == "seg") {
            return Err(field(
                &format!("{kind}.control_path"),
                format!("required: upstream computes {kind} with an external model, which is not ported"),
            ));
        }
    }
    if p.context_frame_index.is_some() || p.image_context_path.is_some() {
        return Err(field(
            if p.context_frame_index.is_some() { "context_frame_index" } else { "image_context_path" },
            "the image context (a style reference encoded by an image encoder) is not ported; diffusers' pipeline \
             passes zeros, as this one does"
                .into(),
        ));
    }
    if p.sigma_max.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(field("sigma_max", "partial noising of the input video is not supported (omit it or null)".into()));
    }
    if let Some(n) = p.num_conditional_frames {
        if n > 2 {
            return Err(field("num_conditional_frames", format!("must be 0, 1 or 2 (as upstream), got {n}")));
        }
    }
    for (f, v) in [("max_frames", p.max_frames), ("num_video_frames_per_chunk", p.num_video_frames_per_chunk)] {
        if v == Some(0) {
            return Err(field(f, "must be a positive integer, got 0".into()));
        }
    }
    if p.input_path.is_some() && p.inference_type.is_none() {
        return Err(field(
            "input_path",
            "needs `inference_type` (image2world or video2world) to say how it conditions".into(),
        ));
    }
    if let Some(r) = &p.resolution {
        parse_resolution(r).map_err(|e| field("resolution", e.to_string()))?;
    }
    for (f, v) in [("num_output_frames", p.num_output_frames), ("num_steps", p.num_steps)] {
        if v == Some(0) {
            return Err(field(f, "must be a positive integer, got 0".into()));
        }
    }
    if let Some(g) = p.guidance {
        if !(g.is_finite() && (0.0..=7.0).contains(&g)) {
            return Err(field("guidance", format!("must be in 0..=7 (as Cosmos-Predict2.5), got {g}")));
        }
    }
    if let Some(lr) = p.noise_lr {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(field("noise_lr", format!("must be a positive number, got {lr}")));
        }
    }
    if p.enable_autoregressive == Some(true) {
        return Err(field(
            "enable_autoregressive",
            "true is not supported: the sliding-window generation of long videos is not implemented; \
             set it to false and lower num_output_frames"
                .into(),
        ));
    }
    if p.learn_noise == Some(true) && p.noise_steps == Some(0) {
        return Err(field("noise_steps", "must be at least 1 when learn_noise is true".into()));
    }
    Ok(p)
}

/// Whether an input path is a video (a folder of frames, a GIF or an MP4) rather than an image.
fn is_video(path: &Path) -> bool {
    path.is_dir()
        || path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "gif" | "mp4" | "m4v" | "mov"))
}

/// What a params file did to the arguments, for the log and `report.json`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Applied {
    pub path: PathBuf,
    pub name: Option<String>,
    pub inference_type: Option<InferenceType>,
    /// Fields that set an argument (`field → --flag`).
    pub set: Vec<String>,
    /// Fields whose argument the command line gave (the command line wins).
    pub command_line_wins: Vec<String>,
    /// Fields that had no effect, and why.
    pub ignored: Vec<String>,
}

/// Applies a params file to `args`; `given(id)` says whether the command line gave the argument
/// `id` (the field name of [`CosmosArgs`]), in which case the file's value is not used.
pub fn apply(path: &Path, p: &InferenceParams, args: &mut CosmosArgs, given: &dyn Fn(&str) -> bool) -> Applied {
    let mut out = Applied {
        path: path.to_path_buf(),
        name: p.name.clone(),
        inference_type: p.inference_type,
        ..Applied::default()
    };
    // One rule for every field: the command line's value wins, else the file's is set.
    let mut put = |field: &str, flag: &str, cli: bool, set: &mut dyn FnMut()| {
        if cli {
            out.command_line_wins.push(format!("{field} (command line {flag})"));
        } else {
            set();
            out.set.push(format!("{field} → {flag}"));
        }
    };
    let embeds = args.prompt_embeds.is_some();
    if let Some(prompt) = &p.prompt {
        let field = if p.prompt_path.is_some() { "prompt_path" } else { "prompt" };
        put(field, "--prompt", given("prompt") || embeds, &mut || args.prompt = Some(prompt.clone()));
    }
    if let Some(negative) = &p.negative_prompt {
        put("negative_prompt", "--negative-prompt", given("negative_prompt") || embeds, &mut || {
            args.negative_prompt = Some(negative.clone())
        });
    }
    if let (Some(input), Some(kind)) = (&p.input_path, p.inference_type) {
        let cli = args.image.is_some() || args.video.is_some();
        match kind {
            InferenceType::Text2world => {
                out.ignored.push("input_path (text2world takes no input, as upstream)".into());
            }
            _ if !is_video(input) => {
                put("input_path", "--image", cli, &mut || args.image = Some(input.clone()));
            }
            _ => {
                let frames = if kind == InferenceType::Image2world { 1 } else { VIDEO2WORLD_FRAMES };
                let video_frames_given = given("video_frames");
                put("input_path", "--video", cli, &mut || {
                    args.video = Some(input.clone());
                    if !video_frames_given {
                        args.video_frames = Some(frames);
                    }
                });
            }
        }
    }
    if let Some(v) = p.seed {
        put("seed", "--seed", given("seed"), &mut || args.seed = v);
    }
    if let Some(v) = p.guidance {
        put("guidance", "--guidance", given("guidance"), &mut || args.guidance = Some(v));
    }
    if let Some(Ok(Some((h, w)))) = p.resolution.as_deref().map(parse_resolution) {
        put("resolution (height)", "--height", given("height"), &mut || args.height = h);
        put("resolution (width)", "--width", given("width"), &mut || args.width = w);
    }
    if let Some(v) = p.num_output_frames {
        put("num_output_frames", "--num-frames", given("num_frames"), &mut || args.num_frames = Some(v as usize));
    }
    if let Some(v) = p.num_steps {
        put("num_steps", "--steps", given("steps"), &mut || args.steps = Some(v as usize));
    }
    let iterations = match (p.learn_noise, p.noise_steps) {
        (Some(false), steps) => {
            if steps.is_some() {
                out.ignored.push("noise_steps (learn_noise is false: sampled once)".into());
            }
            Some(("learn_noise", 0))
        }
        (Some(true), None) => Some(("learn_noise", crate::config::Params::default().noise_steps)),
        (_, Some(n)) => Some(("noise_steps", n as usize)),
        (None, None) => None,
    };
    if let Some((field, n)) = iterations {
        put(field, "--iterations", given("iterations"), &mut || args.iterations = n);
    }
    if let Some(v) = p.noise_lr {
        put("noise_lr", "--lr", given("lr"), &mut || args.lr = v);
    }
    if p.learnable_step_noise == Some(true) {
        put("learnable_step_noise", "--noise-mode sde-from-z0", given("noise_mode"), &mut || {
            args.noise_mode = "sde-from-z0".into()
        });
    }
    for (f, v) in [("chunk_size", p.chunk_size), ("chunk_overlap", p.chunk_overlap)] {
        if v.is_some() {
            out.ignored.push(format!("{f} (only used by enable_autoregressive)"));
        }
    }
    // Cosmos-Transfer2.5.
    if let Some(video) = &p.video_path {
        put("video_path", "--video", given("video") || args.image.is_some(), &mut || args.video = Some(video.clone()));
    }
    if let Some(v) = p.max_frames {
        put("max_frames", "--num-frames", given("num_frames"), &mut || args.num_frames = Some(v as usize));
    }
    if let Some(v) = p.num_video_frames_per_chunk {
        put("num_video_frames_per_chunk", "--chunk-frames", given("chunk_frames"), &mut || {
            args.chunk_frames = v as usize
        });
    }
    if let Some(v) = p.num_conditional_frames {
        put("num_conditional_frames", "--conditional-frames", given("conditional_frames"), &mut || {
            args.conditional_frames = v as usize
        });
    }
    let controls = p.controls();
    if !controls.is_empty() {
        let specs: Vec<String> = controls
            .iter()
            .map(|(kind, c)| {
                let kind = if *kind == "vis" { "blur" } else { kind };
                let path = c.control_path.as_ref().map(|p| format!("={}", p.display())).unwrap_or_default();
                format!("{kind}{path}:{}", c.control_weight.unwrap_or(1.0))
            })
            .collect();
        let names: Vec<&str> = controls.iter().map(|(k, _)| *k).collect();
        put(&names.join(", "), "--control", given("controls"), &mut || args.controls = specs.clone());
    }
    if let Some(v) = p.edge.as_ref().and_then(|c| c.preset_edge_threshold.clone()) {
        put("edge.preset_edge_threshold", "--edge-threshold", given("edge_threshold"), &mut || {
            args.edge_threshold = v.clone()
        });
    }
    if let Some(v) = p.vis.as_ref().and_then(|c| c.preset_blur_strength.clone()) {
        put("vis.preset_blur_strength", "--blur-strength", given("blur_strength"), &mut || {
            args.blur_strength = v.clone()
        });
    }
    for (f, v) in [
        ("show_control_condition", p.show_control_condition),
        ("show_input", p.show_input),
        ("keep_input_resolution", p.keep_input_resolution),
    ] {
        if v.is_some() {
            out.ignored
                .push(format!("{f} (the control videos are written separately; the output is --height × --width)"));
        }
    }
    out
}
