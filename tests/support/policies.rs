//! Untrained exported LAPO policies for tests that need a policy file but not a good policy
//! (training one takes minutes), shared by the crates' tests (included with
//! `#[path = "../../tests/support/policies.rs"] mod policies;`).

#![allow(dead_code)]

use std::path::Path;

use candle_core::{DType, Device};
use rl::encoders::EncoderKind;
use rl::lapo::{Dims, Lapo, LapoConfig, ValueBounds};
use rl::trainer::{Normalization, TASK_FRAME_DIM};

/// Exports an untrained policy as `train` would (seed 3, identity normalisation): state-only
/// (`EncoderKind::None`, seeing joints + environment state + task frame) or an image encoder on
/// `image_hw` views. Creates the parent directory.
pub fn export_untrained(path: &Path, encoder: EncoderKind, image_hw: (usize, usize)) -> anyhow::Result<()> {
    let state_dim = if encoder.uses_images() {
        rl::env::STATE_DIM
    } else {
        rl::env::STATE_DIM + rl::env::ENVIRONMENT_STATE_DIM + TASK_FRAME_DIM
    };
    let config = LapoConfig { encoder, seed: 3, ..LapoConfig::reference() };
    let dims = Dims {
        state_dim,
        action_dim: rl::env::ACTION_DIM,
        image_hw,
        privileged_dim: 0,
        supersample: 1,
        ..Default::default()
    };
    let lapo = Lapo::new(config, dims, ValueBounds { min_v: 0.0, max_v: 100.0 }, DType::F32, &Device::Cpu)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    rl::policy::export(&lapo, &Normalization::identity(state_dim, rl::env::ACTION_DIM), path)
}
