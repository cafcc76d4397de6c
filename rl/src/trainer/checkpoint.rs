//! Checkpoints with bit-exact resume, and the divergence guard that decides whether a state may
//! be saved at all.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use super::normalization::Normalization;
use crate::lapo::{Batch, Dims, Lapo, Losses, ValueBounds};

/// What a checkpoint's JSON side-car holds.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CheckpointInfo {
    pub iteration: u64,
    pub optimizer_steps: HashMap<String, u64>,
    pub normalization: Normalization,
    pub bounds: ValueBounds,
    pub config: crate::lapo::LapoConfig,
    pub dims: Dims,
}

pub fn checkpoint_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("checkpoint.safetensors"), dir.join("checkpoint.json"))
}

/// How far outside the range of possible returns a critic value may stray before the run
/// counts as diverged, in multiples of the largest |return|.
///
/// Why a multiple of the value range: the critic regresses onto targets inside
/// [`ValueBounds`] (V's target is clamped to [min_v, max_v]; Q's target r + γ·V(s') stays there
/// while V does), so a healthy critic's values stay within max(|min_v|, |max_v|) up to its
/// fitting error, and each of its mean squared errors within about (max_v − min_v)². Ten times
/// the largest |return| (1000 in scaled units with γ = 0.99) is far beyond any fitting error, and
/// far below what a divergence reaches within a few iterations (the Q ≈ 1e23).
pub const DIVERGENCE_FACTOR: f64 = 10.0;

/// The bounds a healthy run stays within (see [`DIVERGENCE_FACTOR`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DivergenceBound {
    /// Largest |Q|, |V| (and |actor loss| = |mean Q|) accepted: factor × max(|min_v|, |max_v|).
    pub max_abs_value: f64,
    /// Largest mean squared TD error of Q1, Q2 and V accepted: (factor × max |return|)², i.e.
    /// predictions off by `factor` times the largest return on average.
    pub max_td_loss: f64,
}

impl DivergenceBound {
    pub fn new(bounds: &ValueBounds) -> Self {
        let scale = bounds.min_v.abs().max(bounds.max_v.abs());
        let max_abs_value = DIVERGENCE_FACTOR * scale;
        Self { max_abs_value, max_td_loss: max_abs_value * max_abs_value }
    }

    /// `Err(what)` naming the first diverged quantity of one iteration's losses: any NaN/Inf
    /// term, a TD loss or a mean value beyond the bound.
    pub fn check_losses(&self, losses: &Losses) -> Result<(), String> {
        let terms = [
            ("critic loss", losses.critic),
            ("Q1 loss", losses.q1),
            ("Q2 loss", losses.q2),
            ("V loss", losses.value),
            ("auxiliary state loss", losses.aux_state),
            ("actor-VAE loss", losses.actor_vae),
            ("VAE reconstruction", losses.reconstruction),
            ("VAE KL", losses.kl),
            ("actor loss", losses.actor),
            ("mean Q", losses.mean_q),
            ("mean V", losses.mean_v),
        ];
        if let Some((name, value)) = terms.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("{name} is {value}"));
        }
        for (name, value) in [("Q1 loss", losses.q1), ("Q2 loss", losses.q2), ("V loss", losses.value)] {
            if value > self.max_td_loss {
                return Err(format!("{name} {value:.3e} is beyond the divergence bound {:.3e}", self.max_td_loss));
            }
        }
        // The actor loss is −mean Q1(s, π(s)): a value too.
        for (name, value) in [("mean Q", losses.mean_q), ("mean V", losses.mean_v), ("actor loss", losses.actor)] {
            if value.abs() > self.max_abs_value {
                return Err(format!("{name} {value:.3e} is beyond the divergence bound ±{:.3e}", self.max_abs_value));
            }
        }
        Ok(())
    }
}

/// Names of the tensors among `tensors` holding NaN/Inf values (with their counts).
fn non_finite_tensors<'a>(tensors: impl Iterator<Item = (String, &'a Tensor)>) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    for (name, t) in tensors {
        let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let count = values.iter().filter(|v| !v.is_finite()).count();
        if count > 0 {
            bad.push(format!("'{name}' ({count} NaN/Inf)"));
        }
    }
    bad.sort();
    Ok(bad)
}

/// Whether the model state is fit to be saved: every var and optimiser moment finite, and the
/// critic's Q1, Q2 and V on `probe` (the last training batch) within the divergence bound. The
/// state after the last step is what a checkpoint holds, and the losses of that step were
/// computed before it, so the values are checked here on the state itself (a forward in eval
/// mode: batch-norm running statistics are not touched, so resuming stays bit-exact).
pub fn check_state(lapo: &Lapo, probe: &Batch) -> Result<()> {
    let vars = shared::weights::varmap_tensors(&lapo.varmap);
    let mut problems = non_finite_tensors(vars.iter().map(|(k, t)| (k.clone(), t)))?;
    for opt in [&lapo.critic_opt, &lapo.actor_vae_opt, &lapo.actor_opt] {
        let (state, _) = opt.state_tensors();
        problems.extend(non_finite_tensors(state.iter().map(|(k, t)| (format!("optimiser {k}"), t)))?);
    }
    if problems.is_empty() {
        let bound = DivergenceBound::new(&lapo.bounds);
        let s = lapo.encoder.forward_t(probe.images.as_ref(), &probe.state, false)?;
        let (q1, q2) = lapo.critic.q(&s, &probe.action)?;
        let v = lapo.critic.v(&s)?;
        for (name, t) in [("Q1", q1), ("Q2", q2), ("V", v)] {
            let values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let worst =
                values.iter().fold(0f64, |m, x| if x.is_finite() { m.max(x.abs() as f64) } else { f64::INFINITY });
            if worst > bound.max_abs_value {
                problems.push(format!(
                    "{name} reaches {worst:.3e} on the last batch, beyond the divergence bound ±{:.3e}",
                    bound.max_abs_value
                ));
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = problems.iter().take(8).map(String::as_str).collect();
    let more = problems.len().saturating_sub(shown.len());
    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
    anyhow::bail!("the model at iteration {} has diverged: {}{more}", lapo.iteration, shown.join("; "))
}

/// Saves every var and the optimisers' moments (tensors), and the counters (JSON) — only after
/// [`check_state`] passes, so a checkpoint is always one to resume from. Both writes are atomic;
/// the JSON is written last, so it only ever names a complete tensor file.
pub fn save_checkpoint(lapo: &Lapo, norm: &Normalization, dir: &Path, probe: &Batch) -> Result<PathBuf> {
    check_state(lapo, probe).context("not writing a checkpoint")?;
    let (tensors_path, info_path) = checkpoint_paths(dir);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in lapo.varmap.data().lock().expect("VarMap lock poisoned").iter() {
        tensors.insert(format!("model/{name}"), var.as_tensor().clone());
    }
    let mut steps = HashMap::new();
    for opt in [&lapo.critic_opt, &lapo.actor_vae_opt, &lapo.actor_opt] {
        let (state, step) = opt.state_tensors();
        for (k, v) in state {
            tensors.insert(format!("optim/{k}"), v);
        }
        steps.insert(opt.name().to_string(), step);
    }
    shared::weights::save_tensors_atomic(&tensors, &tensors_path)?;
    let info = CheckpointInfo {
        iteration: lapo.iteration,
        optimizer_steps: steps,
        normalization: norm.clone(),
        bounds: lapo.bounds,
        config: lapo.config.clone(),
        dims: lapo.dims.clone(),
    };
    shared::io::write_json_atomic(&info_path, &info)?;
    Ok(tensors_path)
}

pub fn read_checkpoint_info(dir: &Path) -> Result<CheckpointInfo> {
    let (_, info_path) = checkpoint_paths(dir);
    anyhow::ensure!(
        info_path.is_file(),
        "{}: no checkpoint there (a run writes its first one after --checkpoint-every iterations)",
        info_path.display()
    );
    let text = std::fs::read_to_string(&info_path).with_context(|| format!("reading {}", info_path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", info_path.display()))
}

/// The top-level fields in which two JSON objects differ, as `(field, a, b)`; a field absent
/// from one side shows as `null` there.
pub fn field_differences(a: &serde_json::Value, b: &serde_json::Value) -> Vec<(String, String, String)> {
    let empty = serde_json::Map::new();
    let (a, b) = (a.as_object().unwrap_or(&empty), b.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let null = serde_json::Value::Null;
    keys.into_iter()
        .filter(|k| a.get(*k).unwrap_or(&null) != b.get(*k).unwrap_or(&null))
        .map(|k| (k.clone(), a.get(k).unwrap_or(&null).to_string(), b.get(k).unwrap_or(&null).to_string()))
        .collect()
}

/// Every tensor name (with its shape) a checkpoint of `lapo` may hold: `model/<var>` for each
/// var (all required), and `optim/<optimiser>/<var>/{m,v}` for each optimised var (present once
/// the var has had a gradient, so optional, but always as a pair).
fn checkpoint_schema(lapo: &Lapo) -> (BTreeMap<String, Vec<usize>>, BTreeMap<String, Vec<usize>>) {
    let model = lapo
        .varmap
        .data()
        .lock()
        .expect("VarMap lock poisoned")
        .iter()
        .map(|(name, var)| (format!("model/{name}"), var.dims().to_vec()))
        .collect();
    let mut optim = BTreeMap::new();
    for opt in [&lapo.critic_opt, &lapo.actor_vae_opt, &lapo.actor_opt] {
        for (name, var) in opt.vars() {
            for moment in ["m", "v"] {
                optim.insert(format!("optim/{}/{name}/{moment}", opt.name()), var.dims().to_vec());
            }
        }
    }
    (model, optim)
}

/// The tensor names in a safetensors file's header (the file is memory-mapped, not read).
fn tensor_names(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: read-only map, only the header is parsed here; the checked loader reads the data.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow::anyhow!("{}: not a valid safetensors file (truncated or corrupt?): {e}", path.display())
    })?;
    Ok(st.names().into_iter().map(String::from).collect())
}

/// Restores vars, optimiser moments and the iteration counter into a freshly built model, after
/// checking everything at once: the side-car's configuration and dims against the model's, and
/// the tensors through `shared::weights`' exact loader (every var present with its shape, the
/// optimiser moments in pairs of known names, nothing unexpected, the model's dtype, no NaN/Inf).
/// Nothing is changed unless every check passes; every problem names the file.
pub fn load_checkpoint(lapo: &mut Lapo, dir: &Path) -> Result<CheckpointInfo> {
    let info = read_checkpoint_info(dir)?;
    let (tensors_path, info_path) = checkpoint_paths(dir);
    let mut problems = Vec::new();
    let stored = serde_json::to_value(&info.config)?;
    let model = serde_json::to_value(&lapo.config)?;
    for (field, a, b) in field_differences(&stored, &model) {
        problems.push(format!("config.{field}: {a} in the checkpoint, {b} in the model"));
    }
    if info.dims != lapo.dims {
        problems.push(format!("dims: {:?} in the checkpoint, {:?} in the model", info.dims, lapo.dims));
    }
    if info.bounds.min_v != lapo.bounds.min_v || info.bounds.max_v != lapo.bounds.max_v {
        problems.push(format!(
            "value bounds: {:?} in the checkpoint, {:?} from the dataset and --gamma",
            info.bounds, lapo.bounds
        ));
    }
    let opt_names: Vec<String> =
        [&lapo.critic_opt, &lapo.actor_vae_opt, &lapo.actor_opt].iter().map(|o| o.name().to_string()).collect();
    let mut stored_opts: Vec<&String> = info.optimizer_steps.keys().collect();
    stored_opts.sort();
    if stored_opts.iter().map(|s| s.as_str()).collect::<BTreeSet<_>>() != opt_names.iter().map(String::as_str).collect()
    {
        problems.push(format!("optimisers: {stored_opts:?} in the checkpoint, {opt_names:?} in the model"));
    }
    if !problems.is_empty() {
        anyhow::bail!("{} does not fit the model:\n  - {}", info_path.display(), problems.join("\n  - "));
    }

    let (mut expected, optim_schema) = checkpoint_schema(lapo);
    // Moments present in the file join the expected set with their var's shape, and so does
    // their partner (an `m` without its `v` is then reported missing); names the model has no
    // optimiser var for stay out and are reported as unexpected.
    for name in tensor_names(&tensors_path)? {
        if let Some(shape) = optim_schema.get(&name) {
            let stem = name.strip_suffix("/m").or_else(|| name.strip_suffix("/v")).unwrap_or(&name);
            for moment in ["m", "v"] {
                expected.insert(format!("{stem}/{moment}"), shape.clone());
            }
        }
    }
    let vb = shared::weights::varbuilder_for_model_exact(&tensors_path, &expected, lapo.dtype(), lapo.device())?;
    let mut model_values = Vec::new();
    let mut optim: HashMap<String, Tensor> = HashMap::new();
    for (name, shape) in &expected {
        let t = vb.get(shape.as_slice(), name)?;
        match name.strip_prefix("optim/") {
            Some(key) => {
                optim.insert(key.to_string(), t);
            }
            None => model_values.push((name["model/".len()..].to_string(), t)),
        }
    }
    {
        let data = lapo.varmap.data().lock().expect("VarMap lock poisoned");
        for (name, t) in model_values {
            data[&name].set(&t)?;
        }
    }
    for opt in [&mut lapo.critic_opt, &mut lapo.actor_vae_opt, &mut lapo.actor_opt] {
        let step = info.optimizer_steps[opt.name()];
        opt.load_state(&optim, step)?;
    }
    lapo.iteration = info.iteration;
    Ok(info)
}
