//! The weights a clean checkout ships with: each file's sha256 matches its manifest, the
//! embedded image policy loads and is an image policy, and the default job — the policy stress
//! test on the embedded world model and policy — runs and raises the policy's error (one seed,
//! fewer iterations than the default, so it takes seconds).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use sampler::stress::{run, ScenarioSource, StressSettings};
use sampler::world_model::WorldModel;
use sha2::Digest;

fn weights() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../weights")
}

fn manifest_sha(manifest: &str) -> Result<String> {
    let path = weights().join(manifest);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    Ok(json["sha256"].as_str().with_context(|| format!("{}: no sha256", path.display()))?.to_string())
}

fn file_sha(file: &str) -> Result<String> {
    Ok(format!("{:x}", sha2::Sha256::digest(std::fs::read(weights().join(file))?)))
}

#[test]
fn embedded_weights_match_their_manifests() -> Result<()> {
    assert_eq!(file_sha("world_model.safetensors")?, manifest_sha("world_model_manifest.json")?);
    assert_eq!(file_sha("policy.safetensors")?, manifest_sha("policy_manifest.json")?);
    Ok(())
}

#[test]
fn default_stress_test_runs_on_the_embedded_weights() -> Result<()> {
    let policy_path = weights().join("policy.safetensors");
    let policy = rl::policy::ExportedPolicy::load(&policy_path, &Device::Cpu)?;
    assert!(policy.header.encoder.uses_images(), "the embedded policy must see images");

    let model = WorldModel::load_dir(&weights(), DType::F32, &Device::Cpu)?;
    let out = tempfile::tempdir()?;
    let settings =
        StressSettings { scenarios: ScenarioSource::Seeds(vec![0]), iterations: 4, ..StressSettings::default() };
    let summary = run(&model, &policy_path, &settings, out.path(), |_| {})?;
    let r = &summary.results[0];
    assert!(r.error_on_real_frames.is_finite() && r.error_before.is_finite());
    assert!(r.grad_z0_norm_initial > 0.0, "no gradient reached z0");
    assert!(r.error_after > r.error_before, "ascent did not raise the error: {} → {}", r.error_before, r.error_after);
    Ok(())
}
