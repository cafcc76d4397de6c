//! Export of a trained policy as one safetensors file: observation encoder + latent actor + the
//! VAE *target* decoder (what the reference evaluates with) + normalisation, with a JSON header
//! (`__metadata__["worldgrad.policy"]`) describing the shapes. Loadable without the trainer.
//!
//! Keys: `encoder.*` (online encoder, absent for state-only), `actor.*`, `decoder.*`,
//! `normalization.{state_mean,state_std,action_mean,action_std}` (f32).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::encoders::{EncoderKind, FeatureLayout, ObsEncoder};
use crate::lapo::Lapo;
use crate::nets::{Actor, Mlp};
use crate::trainer::Normalization;

pub const METADATA_KEY: &str = "worldgrad.policy";

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PolicyHeader {
    pub format: String,
    pub encoder: EncoderKind,
    pub state_dim: usize,
    pub action_dim: usize,
    pub latent_dim: usize,
    pub max_latent_action: f64,
    pub image_hw: (usize, usize),
    /// The state the policy sees: `state` (joints) or, state-only,
    /// `state+environment_state+task_frame` (see [`crate::trainer::model_state`]).
    pub state_layout: String,
    pub iteration: u64,
    /// Width of the encoder's privileged-state head (0: none; files from before it existed).
    #[serde(default)]
    pub privileged_dim: usize,
    /// Anti-aliasing of the training images (`EnvConfig::supersample`): evaluate with the same.
    #[serde(default = "crate::lapo::one")]
    pub supersample: usize,
    /// What the encoder's feature holds (`fused` for files from before it was recorded).
    #[serde(default)]
    pub feature_layout: FeatureLayout,
}

/// Writes the policy file atomically.
pub fn export(lapo: &Lapo, norm: &Normalization, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, var) in lapo.varmap.data().lock().expect("VarMap lock poisoned").iter() {
        let renamed = if let Some(rest) = name.strip_prefix("encoder.") {
            Some(format!("encoder.{rest}"))
        } else if let Some(rest) = name.strip_prefix("actor.") {
            Some(format!("actor.{rest}"))
        } else {
            name.strip_prefix("target.actor_vae.decoder.").map(|rest| format!("decoder.{rest}"))
        };
        if let Some(n) = renamed {
            tensors.push((n, var.as_tensor().to_dtype(DType::F32)?));
        }
    }
    let dev = Device::Cpu;
    for (key, v) in [
        ("state_mean", &norm.state_mean),
        ("state_std", &norm.state_std),
        ("action_mean", &norm.action_mean),
        ("action_std", &norm.action_std),
    ] {
        tensors.push((format!("normalization.{key}"), Tensor::new(v.as_slice(), &dev)?));
    }
    let header = PolicyHeader {
        format: "worldgrad-lapo-policy/v1".into(),
        encoder: lapo.config.encoder,
        state_dim: lapo.dims.state_dim,
        action_dim: lapo.dims.action_dim,
        latent_dim: lapo.actor_vae.latent_dim(),
        max_latent_action: lapo.config.max_latent_action,
        image_hw: lapo.dims.image_hw,
        state_layout: if lapo.config.encoder.uses_images() { "state" } else { "state+environment_state+task_frame" }
            .into(),
        iteration: lapo.iteration,
        privileged_dim: lapo.encoder.privileged_dim(),
        supersample: lapo.dims.supersample,
        feature_layout: lapo.encoder.layout(),
    };
    let metadata: HashMap<String, String> =
        HashMap::from([(METADATA_KEY.to_string(), serde_json::to_string(&header)?)]);
    let views: Vec<(String, Tensor)> =
        tensors.into_iter().map(|(n, t)| Ok((n, t.to_device(&dev)?))).collect::<Result<_>>()?;
    shared::io::write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(views.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata), tmp)?;
        Ok(())
    })
}

/// A policy loaded from an exported file.
pub struct ExportedPolicy {
    pub header: PolicyHeader,
    pub norm: Normalization,
    encoder: ObsEncoder,
    actor: Actor,
    decoder: Mlp,
    device: Device,
}

impl ExportedPolicy {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{}: not safetensors", path.display()))?;
        let header: PolicyHeader = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .with_context(|| format!("{}: no '{METADATA_KEY}' metadata: not an exported policy", path.display()))
            .and_then(|s| serde_json::from_str(s).context("parsing the policy header"))?;
        let tensors = shared::weights::read_safetensors(path, device)?;
        let vec = |k: &str| -> Result<Vec<f32>> {
            Ok(tensors
                .get(&format!("normalization.{k}"))
                .with_context(|| format!("{}: missing normalization.{k}", path.display()))?
                .to_vec1()?)
        };
        let norm = Normalization {
            state_mean: vec("state_mean")?,
            state_std: vec("state_std")?,
            action_mean: vec("action_mean")?,
            action_std: vec("action_std")?,
            reward_scale: 1.0,
            privileged_mean: Vec::new(),
            privileged_std: Vec::new(),
        };
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let encoder = ObsEncoder::with_privileged_head(
            header.encoder,
            header.state_dim,
            header.image_hw,
            header.privileged_dim,
            header.feature_layout,
            vb.pp("encoder"),
        )
        .with_context(|| format!("{}: encoder weights", path.display()))?;
        let s_dim = encoder.out_dim();
        let actor = Actor::new(s_dim, header.latent_dim, header.max_latent_action, vb.pp("actor"))?;
        let decoder = Mlp::standard(s_dim + header.latent_dim, header.action_dim, vb.pp("decoder"))?;
        Ok(Self { header, norm, encoder, actor, decoder, device: device.clone() })
    }
}

impl crate::trainer::Actor for ExportedPolicy {
    fn encoder(&self) -> EncoderKind {
        self.header.encoder
    }
    fn normalization(&self) -> &Normalization {
        &self.norm
    }
    fn act_batch(&self, images: Option<&Tensor>, state: &Tensor) -> candle_core::Result<Tensor> {
        let s = self.encoder.forward_t(images, state, false)?;
        let z = self.actor.forward(&s)?;
        self.decoder.forward(&Tensor::cat(&[&s, &z], D::Minus1)?)
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
}
