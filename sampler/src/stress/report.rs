//! Per-scenario result files and the report merged from them (`sampler stress-report`): a
//! summary table (Markdown and JSON) and a ranked gallery (PNG and GIF) of the worst failures.
//!
//! A run directory holds `scenarios/<id>.json` (the measured figures) and
//! `scenarios/<id>.safetensors` (the real, before and after clips); a sharded run holds them
//! under `shard-i-of-n/` instead. Each file is written atomically when its scenario finishes,
//! so an interrupted run leaves only whole results, and `--resume` skips them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};

use super::scenario::Scenario;
use crate::optimize::IterationRecord;

/// The directory of result files inside a run (or shard) directory.
pub const SCENARIO_DIR: &str = "scenarios";
/// Where a report is written inside the run directory.
pub const REPORT_DIR: &str = "report";

/// One scenario's measured result.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    /// The settings that shape the result (a resumed or merged run must share them).
    pub settings: serde_json::Value,
    /// Policy action MSE to the expert on the real frames (reference point).
    pub error_on_real_frames: f64,
    pub error_before: f64,
    pub error_after: f64,
    /// The world model's own denoising PSNR (dB) on frames 1.. — how plausible the frames are
    /// to the model (higher: more like its training data); on the real frames, the samples
    /// before and after the search.
    pub realism_real: Option<f64>,
    pub realism_before: Option<f64>,
    pub realism_after: Option<f64>,
    /// PSNR (dB) of frames 1.. to their nearest real frames of the model's training data (a
    /// measure of how far the frames are from anything real; `None`: the world has no bank).
    pub nearest_real_real: Option<f64>,
    pub nearest_real_before: Option<f64>,
    pub nearest_real_after: Option<f64>,
    /// ‖z0‖/√d at the start and the end (≈ 1 in the Gaussian typical set).
    pub z0_rms_before: f64,
    pub z0_rms_after: f64,
    /// ‖z0 − z0_init‖/√d: how far the search moved.
    pub z0_moved: f64,
    pub grad_z0_norm_initial: f64,
    pub seconds: f64,
    pub iterations: Vec<IterationRecord>,
}

impl ScenarioResult {
    /// The summary row (no timings or per-iteration records: equal across machines' runs).
    pub fn row(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.scenario.id,
            "episode_seed": self.scenario.episode_seed,
            "start_frame": self.scenario.start_frame,
            "error_real": self.error_on_real_frames,
            "error_before": self.error_before,
            "error_after": self.error_after,
            "realism_real": self.realism_real,
            "realism_before": self.realism_before,
            "realism_after": self.realism_after,
            "nearest_real_real": self.nearest_real_real,
            "nearest_real_before": self.nearest_real_before,
            "nearest_real_after": self.nearest_real_after,
            "z0_rms_before": self.z0_rms_before,
            "z0_rms_after": self.z0_rms_after,
            "z0_moved": self.z0_moved,
        })
    }
}

/// The result file of scenario `id` under a run or shard directory.
pub fn result_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(SCENARIO_DIR).join(format!("{id}.json"))
}

/// Writes a scenario's result and clips (atomically, the JSON last: a result file present means
/// its clips are too).
pub fn write_result(
    dir: &Path,
    result: &ScenarioResult,
    real: &Tensor,
    before: &Tensor,
    after: &Tensor,
) -> anyhow::Result<()> {
    let sub = dir.join(SCENARIO_DIR);
    std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
    let cpu = |t: &Tensor| t.to_dtype(candle_core::DType::F32)?.to_device(&Device::Cpu);
    let clips = std::collections::HashMap::from([
        ("real".to_string(), cpu(real)?),
        ("before".to_string(), cpu(before)?),
        ("after".to_string(), cpu(after)?),
    ]);
    shared::weights::save_tensors_atomic(&clips, &sub.join(format!("{}.safetensors", result.scenario.id)))?;
    shared::io::write_json_atomic(&result_path(dir, &result.scenario.id), result)
}

/// Reads a result file, if there is one.
pub fn read_result(path: &Path) -> anyhow::Result<ScenarioResult> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a stress-test result file", path.display()))
}

/// The directories holding results in a run directory: its own and its shards'.
fn result_dirs(run: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    if run.join(SCENARIO_DIR).is_dir() {
        dirs.push(run.to_path_buf());
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(run)
        .with_context(|| format!("reading {}", run.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("shard-")))
        .collect();
    shards.sort();
    dirs.extend(shards.into_iter().filter(|d| d.join(SCENARIO_DIR).is_dir()));
    Ok(dirs)
}

/// Every result under a run directory (its own and its shards'), sorted by scenario id; one
/// id twice, or results made with different settings, is an error naming them.
pub fn collect(run: &Path) -> anyhow::Result<Vec<(ScenarioResult, PathBuf)>> {
    let mut out: Vec<(ScenarioResult, PathBuf)> = Vec::new();
    for dir in result_dirs(run)? {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(SCENARIO_DIR))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for f in files {
            let r = read_result(&f)?;
            if let Some((_, other)) = out.iter().find(|(o, _)| o.scenario.id == r.scenario.id) {
                anyhow::bail!("scenario {} has two results: {} and {}", r.scenario.id, other.display(), f.display());
            }
            if let Some((first, path)) = out.first() {
                anyhow::ensure!(
                    first.settings == r.settings,
                    "{} and {} were made with different settings; report runs of one configuration",
                    path.display(),
                    f.display()
                );
            }
            let clips = f.with_extension("safetensors");
            out.push((r, clips));
        }
    }
    anyhow::ensure!(
        !out.is_empty(),
        "{}: no scenario results (scenarios/*.json) in it or its shard-*/ folders",
        run.display()
    );
    out.sort_by(|a, b| a.0.scenario.id.cmp(&b.0.scenario.id));
    Ok(out)
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The summary of results: rows sorted by id, aggregates, and the ranking by error after the
/// search (worst failure first).
pub fn summary(results: &[ScenarioResult]) -> serde_json::Value {
    let mut ranked: Vec<&ScenarioResult> = results.iter().collect();
    ranked.sort_by(|a, b| b.error_after.total_cmp(&a.error_after).then(a.scenario.id.cmp(&b.scenario.id)));
    let m = |f: fn(&ScenarioResult) -> f64| mean(results.iter().map(f));
    let mo = |f: fn(&ScenarioResult) -> Option<f64>| -> Option<f64> {
        let v: Option<Vec<f64>> = results.iter().map(f).collect();
        v.map(|v| mean(v.into_iter()))
    };
    serde_json::json!({
        "scenarios": results.len(),
        "settings": results.first().map(|r| r.settings.clone()),
        "mean": {
            "error_real": m(|r| r.error_on_real_frames),
            "error_before": m(|r| r.error_before),
            "error_after": m(|r| r.error_after),
            "realism_real": mo(|r| r.realism_real),
            "realism_before": mo(|r| r.realism_before),
            "realism_after": mo(|r| r.realism_after),
            "nearest_real_real": mo(|r| r.nearest_real_real),
            "nearest_real_before": mo(|r| r.nearest_real_before),
            "nearest_real_after": mo(|r| r.nearest_real_after),
            "z0_rms_after": m(|r| r.z0_rms_after),
            "z0_moved": m(|r| r.z0_moved),
        },
        "error_increased": results.iter().filter(|r| r.error_after > r.error_before).count(),
        "ranked": ranked.iter().map(|r| r.scenario.id.clone()).collect::<Vec<_>>(),
        "rows": results.iter().map(ScenarioResult::row).collect::<Vec<_>>(),
    })
}

/// The summary as a Markdown table, worst failure first.
pub fn markdown(summary: &serde_json::Value) -> String {
    let f = |v: &serde_json::Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.4}"));
    let d = |v: &serde_json::Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.2}"));
    let rows = summary["rows"].as_array().cloned().unwrap_or_default();
    let ranked: Vec<String> =
        summary["ranked"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect();
    let mut s = String::new();
    s.push_str(&format!(
        "# Policy stress test: {} scenarios, error raised on {}\n\n",
        summary["scenarios"], summary["error_increased"]
    ));
    s.push_str("Policy error: action MSE to the expert. Denoising: the world model's one-shot denoising PSNR (dB) on the frames. Nearest real: PSNR (dB) of the frames to their nearest frames of real training episodes (higher: closer to something real). z0: ‖z0‖/√d after the search and ‖z0 − z0_init‖/√d moved.\n\n");
    s.push_str("| rank | scenario | error real | before | after | denoising real | before | after | nearest real: real | before | after | ‖z0‖/√d | moved |\n");
    s.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (rank, id) in ranked.iter().enumerate() {
        let Some(r) = rows.iter().find(|r| r["id"] == *id.as_str()) else { continue };
        s.push_str(&format!(
            "| {} | {id} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            rank + 1,
            f(&r["error_real"]),
            f(&r["error_before"]),
            f(&r["error_after"]),
            d(&r["realism_real"]),
            d(&r["realism_before"]),
            d(&r["realism_after"]),
            d(&r["nearest_real_real"]),
            d(&r["nearest_real_before"]),
            d(&r["nearest_real_after"]),
            f(&r["z0_rms_after"]),
            f(&r["z0_moved"]),
        ));
    }
    let m = &summary["mean"];
    s.push_str(&format!(
        "| | **mean** | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        f(&m["error_real"]),
        f(&m["error_before"]),
        f(&m["error_after"]),
        d(&m["realism_real"]),
        d(&m["realism_before"]),
        d(&m["realism_after"]),
        d(&m["nearest_real_real"]),
        d(&m["nearest_real_before"]),
        d(&m["nearest_real_after"]),
        f(&m["z0_rms_after"]),
        f(&m["z0_moved"]),
    ));
    s
}

/// Writes `summary.json`, `summary.md`, `gallery.png` (the `top` worst failures, one row each:
/// real | before | after frames) and `gallery.gif` (the same rows, frame by frame) into `out`.
pub fn write_report(results: &[(ScenarioResult, PathBuf)], out: &Path, top: usize) -> anyhow::Result<Vec<String>> {
    use crate::report::{frames_to_images, gif_bytes, grid, png_bytes};
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let plain: Vec<ScenarioResult> = results.iter().map(|(r, _)| r.clone()).collect();
    let summary = summary(&plain);
    shared::io::write_json_atomic(&out.join("summary.json"), &summary)?;
    shared::io::write_atomic(&out.join("summary.md"), markdown(&summary).as_bytes())?;
    let mut files = vec!["summary.json".to_string(), "summary.md".to_string()];
    let ranked: Vec<&str> = summary["ranked"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
    let mut rows = Vec::new();
    let mut gif_rows: Vec<Vec<image::RgbImage>> = Vec::new();
    for id in ranked.iter().take(top.max(1)) {
        let Some((_, clips)) = results.iter().find(|(r, _)| r.scenario.id == *id) else { continue };
        let t = shared::weights::read_safetensors(clips, &Device::Cpu).with_context(|| format!("the clips of {id}"))?;
        let get = |k: &str| t.get(k).with_context(|| format!("{}: no '{k}'", clips.display()));
        let (real, before, after) = (get("real")?, get("before")?, get("after")?);
        let scale = 4;
        let mut row = frames_to_images(real, 0, scale)?;
        row.extend(frames_to_images(before, 0, scale)?);
        row.extend(frames_to_images(after, 0, scale)?);
        rows.push(row);
        let (r, b, a) = (
            frames_to_images(real, 0, scale)?,
            frames_to_images(before, 0, scale)?,
            frames_to_images(after, 0, scale)?,
        );
        gif_rows.push(r.into_iter().zip(b).zip(a).flat_map(|((r, b), a)| [r, b, a]).collect());
    }
    if !rows.is_empty() {
        shared::io::write_atomic(&out.join("gallery.png"), &png_bytes(&grid(&rows))?)?;
        files.push("gallery.png".into());
        // One GIF frame per clip frame: each scenario's real | before | after at that time.
        let frames = gif_rows[0].len() / 3;
        let gif_frames: Vec<image::RgbImage> = (0..frames)
            .map(|k| grid(&gif_rows.iter().map(|row| row[3 * k..3 * k + 3].to_vec()).collect::<Vec<_>>()))
            .collect();
        shared::io::write_atomic(&out.join("gallery.gif"), &gif_bytes(&gif_frames, 500)?)?;
        files.push("gallery.gif".into());
    }
    Ok(files)
}
