//! Export of a trained policy as one safetensors file: observation encoder + latent actor + the
//! VAE *target* decoder (what the reference evaluates with) + normalisation, with a JSON header
//! (`__metadata__["worldgrad.policy"]`) describing the shapes. Loadable without the trainer.
//!
//! Keys: `encoder.*` (online encoder, absent for state-only), `actor.*`, `decoder.*`,
//! `normalization.{state_mean,state_std,action_mean,action_std}` (f32).
//!
//! [`ExportedPolicy::load`] trusts nothing in the file: the header must be of the known format
//! version with sane fields; the modules it describes are built on a
//! [`shared::weights::ShapeRecorder`] to learn every weight name and shape they ask for, and the
//! file must hold exactly those tensors, in f32, finite ([`shared::weights::varbuilder_for_model_exact`]);
//! the normalisation standard deviations must be positive. Every problem is listed at once,
//! naming the file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::encoders::{EncoderKind, FeatureLayout, ObsEncoder};
use crate::lapo::Lapo;
use crate::nets::{Actor, Mlp};
use crate::trainer::Normalization;

pub const METADATA_KEY: &str = "worldgrad.policy";
/// The header's `format`: the one version this build writes and reads.
pub const FORMAT: &str = "worldgrad-lapo-policy/v1";
/// Largest dimension a header may give (a policy MLP's input or output; far above any real one,
/// low enough that no shape product overflows).
const MAX_DIM: usize = 1 << 20;
/// Most cameras a header may list.
const MAX_CAMERAS: usize = 64;
/// Largest image side a header may give.
const MAX_IMAGE_SIDE: usize = 16_384;
/// The state layouts [`export`] writes, by encoder.
const IMAGE_STATE_LAYOUT: &str = "state";
const STATE_ONLY_LAYOUT: &str = "state+environment_state+task_frame";
/// A state-only policy trained on an imported dataset sees the dataset's state alone.
const IMPORTED_STATE_LAYOUT: &str = "state";

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
    /// Hidden layers of the actor and decoder MLPs (2 for files from before it was recorded).
    #[serde(default = "crate::nets::legacy_hidden_layers")]
    pub hidden_layers: usize,
    /// The cameras the images stack, in order (the environment's for files from before it was
    /// recorded).
    #[serde(default = "crate::env::camera_names")]
    pub cameras: Vec<String>,
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
        format: FORMAT.into(),
        encoder: lapo.config.encoder,
        state_dim: lapo.dims.state_dim,
        action_dim: lapo.dims.action_dim,
        latent_dim: lapo.actor_vae.latent_dim(),
        max_latent_action: lapo.config.max_latent_action,
        image_hw: lapo.dims.image_hw,
        state_layout: if lapo.config.encoder.uses_images() {
            IMAGE_STATE_LAYOUT
        } else if lapo.dims.from_environment {
            STATE_ONLY_LAYOUT
        } else {
            IMPORTED_STATE_LAYOUT
        }
        .into(),
        iteration: lapo.iteration,
        privileged_dim: lapo.encoder.privileged_dim(),
        supersample: lapo.dims.supersample,
        feature_layout: lapo.encoder.layout(),
        hidden_layers: lapo.config.hidden_layers,
        cameras: lapo.dims.cameras.clone(),
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

/// A policy loaded from an exported file (cloning shares the weights' storage).
#[derive(Clone)]
pub struct ExportedPolicy {
    pub header: PolicyHeader,
    pub norm: Normalization,
    encoder: ObsEncoder,
    actor: Actor,
    decoder: Mlp,
    device: Device,
}

impl PolicyHeader {
    /// Every problem of the header's fields (the format version is checked before this).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (field, value) in
            [("state_dim", self.state_dim), ("action_dim", self.action_dim), ("latent_dim", self.latent_dim)]
        {
            if !(1..=MAX_DIM).contains(&value) {
                p.push(format!("{field} is {value}, expected 1..={MAX_DIM}"));
            }
        }
        if !(1..=16).contains(&self.hidden_layers) {
            p.push(format!("hidden_layers is {}, expected 1..=16", self.hidden_layers));
        }
        if !(self.max_latent_action.is_finite() && self.max_latent_action > 0.0) {
            p.push(format!("max_latent_action is {}, expected a finite value > 0", self.max_latent_action));
        }
        if !(1..=8).contains(&self.supersample) {
            p.push(format!("supersample is {}, expected 1..=8 (what the environment renders)", self.supersample));
        }
        if self.encoder.uses_images() {
            let (h, w) = self.image_hw;
            if !(1..=MAX_IMAGE_SIDE).contains(&h) || !(1..=MAX_IMAGE_SIDE).contains(&w) {
                p.push(format!("image_hw is {h}×{w}, expected sides in 1..={MAX_IMAGE_SIDE}"));
            }
            if self.cameras.is_empty() || self.cameras.len() > MAX_CAMERAS {
                p.push(format!("cameras lists {}, expected 1..={MAX_CAMERAS}", self.cameras.len()));
            }
            if self.privileged_dim > MAX_DIM {
                p.push(format!("privileged_dim is {}, expected 0..={MAX_DIM}", self.privileged_dim));
            }
            if self.state_layout != IMAGE_STATE_LAYOUT {
                p.push(format!(
                    "state_layout is {:?}, but an image policy sees {IMAGE_STATE_LAYOUT:?}",
                    self.state_layout
                ));
            }
        } else {
            if self.privileged_dim != 0 {
                p.push(format!("privileged_dim is {}, but a state-only policy has no such head", self.privileged_dim));
            }
            if self.state_layout != STATE_ONLY_LAYOUT && self.state_layout != IMPORTED_STATE_LAYOUT {
                p.push(format!(
                    "state_layout is {:?}, but a state-only policy sees {STATE_ONLY_LAYOUT:?} (the environment's) \
                     or {IMPORTED_STATE_LAYOUT:?} (an imported dataset's)",
                    self.state_layout
                ));
            }
        }
        p
    }
}

/// The modules of a policy file.
struct Modules {
    encoder: ObsEncoder,
    actor: Actor,
    decoder: Mlp,
}

fn build_modules(header: &PolicyHeader, vb: &VarBuilder) -> candle_core::Result<Modules> {
    let encoder = ObsEncoder::with_privileged_head(
        header.encoder,
        header.state_dim,
        header.cameras.len(),
        header.image_hw,
        header.privileged_dim,
        header.feature_layout,
        vb.pp("encoder"),
    )?;
    let s_dim = encoder.out_dim();
    let actor = Actor::new(s_dim, header.latent_dim, header.max_latent_action, header.hidden_layers, vb.pp("actor"))?;
    let decoder = Mlp::standard(s_dim + header.latent_dim, header.action_dim, header.hidden_layers, vb.pp("decoder"))?;
    Ok(Modules { encoder, actor, decoder })
}

/// Every tensor name and shape a file with this header must hold.
fn expected_tensors(header: &PolicyHeader) -> candle_core::Result<BTreeMap<String, Vec<usize>>> {
    let recorder = shared::weights::ShapeRecorder::new();
    build_modules(header, &recorder.var_builder(DType::F32, &Device::Cpu))?;
    let mut expected = recorder.shapes();
    for (key, dim) in [
        ("state_mean", header.state_dim),
        ("state_std", header.state_dim),
        ("action_mean", header.action_dim),
        ("action_std", header.action_dim),
    ] {
        expected.insert(format!("normalization.{key}"), vec![dim]);
    }
    Ok(expected)
}

/// Reads and checks the header of a policy file (not its tensors).
pub fn read_header(path: &Path) -> Result<PolicyHeader> {
    let file = std::fs::File::open(path).with_context(|| format!("policy file {}: cannot open it", path.display()))?;
    // SAFETY: read-only map, dropped before this function returns; only the header is parsed.
    let bytes = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("policy file {}: cannot read it", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes[..]).map_err(|e| {
        anyhow::anyhow!("policy file {}: not a safetensors file (truncated or corrupt?): {e}", path.display())
    })?;
    let text = meta.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)).with_context(|| {
        format!("policy file {}: no '{METADATA_KEY}' metadata: not an exported policy", path.display())
    })?;
    let value: serde_json::Value = serde_json::from_str(text)
        .with_context(|| format!("policy file {}: the '{METADATA_KEY}' header is not JSON", path.display()))?;
    match value.get("format").and_then(|f| f.as_str()) {
        Some(FORMAT) => {}
        Some(other) => bail!(
            "policy file {}: format {other:?} is not one this build reads (it reads {FORMAT:?}); export the policy \
             again with this version",
            path.display()
        ),
        None => bail!("policy file {}: the header has no 'format' string", path.display()),
    }
    let header: PolicyHeader = serde_json::from_value(value)
        .with_context(|| format!("policy file {}: invalid '{METADATA_KEY}' header", path.display()))?;
    let problems = header.problems();
    if !problems.is_empty() {
        bail!("policy file {}: invalid header:\n  - {}", path.display(), problems.join("\n  - "));
    }
    Ok(header)
}

/// The policy file a reference names: a run directory's `policy.safetensors`, a local file, or a
/// Hub reference `org/name[@revision]:path/in/repo` (resolved by [`shared::weights::resolve`]).
pub fn resolve_policy(reference: &str) -> Result<PathBuf> {
    let local = Path::new(reference);
    if local.is_dir() {
        let path = local.join("policy.safetensors");
        anyhow::ensure!(path.is_file(), "{}: a directory without policy.safetensors", local.display());
        return Ok(path);
    }
    Ok(shared::weights::resolve(reference)?)
}

impl PolicyHeader {
    /// Whether the policy acts in our environment: it sees the environment's cameras (image
    /// policies) or its state layout (state-only). A policy trained on an imported dataset does
    /// not, and is refused by everything that runs it in the environment or the world model.
    pub fn check_environment(&self) -> Result<()> {
        let env_cameras = crate::env::camera_names();
        let fits = if self.encoder.uses_images() {
            self.cameras == env_cameras
        } else {
            self.state_layout == STATE_ONLY_LAYOUT
        };
        anyhow::ensure!(
            fits,
            "the policy was trained on an imported dataset (cameras {:?}, state {:?}); it cannot act in the \
             bimanual environment, whose cameras are {env_cameras:?}",
            self.cameras,
            self.state_layout
        );
        Ok(())
    }
}

impl ExportedPolicy {
    /// Loads and validates an exported policy file (see the module docs).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let header = read_header(path)?;
        let expected = expected_tensors(&header).map_err(|e| {
            anyhow::anyhow!("policy file {}: the header describes no model that can be built: {e}", path.display())
        })?;
        let vb = shared::weights::varbuilder_for_model_exact(path, &expected, DType::F32, device)?;
        let vec = |k: &str| -> Result<Vec<f32>> {
            Ok(vb.get(expected[&format!("normalization.{k}")].as_slice(), &format!("normalization.{k}"))?.to_vec1()?)
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
        let mut problems = Vec::new();
        for (key, std) in [("state_std", &norm.state_std), ("action_std", &norm.action_std)] {
            if let Some(i) = std.iter().position(|s| *s <= 0.0) {
                problems.push(format!("'normalization.{key}'[{i}] is {}, a standard deviation must be > 0", std[i]));
            }
        }
        if !problems.is_empty() {
            bail!("policy file {}:\n  - {}", path.display(), problems.join("\n  - "));
        }
        let Modules { encoder, actor, decoder } = build_modules(&header, &vb)
            .with_context(|| format!("policy file {}: building the model", path.display()))?;
        Ok(Self { header, norm, encoder, actor, decoder, device: device.clone() })
    }

    /// Loads the policy a reference names ([`resolve_policy`]: a run directory, a local file or a
    /// Hub reference `org/name[@revision]:file`).
    pub fn load_reference(reference: &str, device: &Device) -> Result<Self> {
        let path = resolve_policy(reference)?;
        Self::load(&path, device)
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
