//! The training loop around [`crate::lapo`]: data (an adapter over [`crate::dataset::Dataset`]),
//! normalisation, evaluation in the environment, checkpoints with bit-exact resume, metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use shared::rng::SplitMix64;

use crate::dataset::{Dataset, Tier};
use crate::encoders::EncoderKind;
use crate::env::policy::rollout;
use crate::env::{normalized_score, Env, EnvConfig, NUM_CAMERAS};
use crate::lapo::{Batch, Dims, Lapo, Losses, ValueBounds};

/// z-score statistics and reward scale, computed once from the dataset and saved with every
/// checkpoint and exported policy.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    pub state_mean: Vec<f32>,
    pub state_std: Vec<f32>,
    pub action_mean: Vec<f32>,
    pub action_std: Vec<f32>,
    /// Per-step rewards are divided by this (the dataset's max non-terminal reward; success
    /// transitions get the absorbing value 1/(1 − γ) instead, see [`Replay::terminal_reward`]).
    pub reward_scale: f32,
    /// z-score statistics of the privileged targets of the auxiliary state head (environment
    /// state ++ task-frame features); empty for state-only training.
    #[serde(default)]
    pub privileged_mean: Vec<f32>,
    #[serde(default)]
    pub privileged_std: Vec<f32>,
}

impl Normalization {
    /// No z-scoring (mean 0, std 1), no reward scaling, no privileged head: states and actions
    /// are seen as they are.
    pub fn identity(state_dim: usize, action_dim: usize) -> Self {
        Self {
            state_mean: vec![0.0; state_dim],
            state_std: vec![1.0; state_dim],
            action_mean: vec![0.0; action_dim],
            action_std: vec![1.0; action_dim],
            reward_scale: 1.0,
            privileged_mean: Vec::new(),
            privileged_std: Vec::new(),
        }
    }

    pub fn state(&self, raw: &[f32]) -> Vec<f32> {
        raw.iter().zip(&self.state_mean).zip(&self.state_std).map(|((x, m), s)| (x - m) / s).collect()
    }

    pub fn privileged(&self, raw: &[f32]) -> Vec<f32> {
        raw.iter().zip(&self.privileged_mean).zip(&self.privileged_std).map(|((x, m), s)| (x - m) / s).collect()
    }

    pub fn unnormalize_action(&self, z: &[f32]) -> Vec<f32> {
        z.iter().zip(&self.action_mean).zip(&self.action_std).map(|((x, m), s)| x * s + m).collect()
    }
}

/// Whether the model sees images or the privileged environment state.
pub fn uses_images(encoder: EncoderKind) -> bool {
    encoder.uses_images()
}

/// The state vector the model sees: joint state alone with images; for state-only training the
/// joint state, the privileged puck/goal positions (the task is not observable from the joints
/// alone) and [`task_frame_features`] of them.
pub fn model_state(encoder: EncoderKind, state: &[f32], environment_state: &[f32]) -> Vec<f32> {
    if uses_images(encoder) {
        state.to_vec()
    } else {
        let mut out: Vec<f32> = state.iter().chain(environment_state).copied().collect();
        out.extend(task_frame_features(state, environment_state));
        out
    }
}

/// Per arm: its puck relative to the gripper cup in the gripper's frame (along, lateral) and
/// the puck's offset to its goal (x, y). A wrist camera sees the first directly; from raw
/// table coordinates an MLP must learn the rotation, which costs data and precision (behaviour
/// cloning on 300 expert episodes, 8k iterations: 26.8 without, 43.2 with these features).
pub fn task_frame_features(state: &[f32], environment_state: &[f32]) -> [f32; TASK_FRAME_DIM] {
    let mut out = [0f32; TASK_FRAME_DIM];
    for arm in 0..2 {
        let p = &state[arm * 12..(arm + 1) * 12];
        let (cup_x, cup_y, cos, sin) = (p[8], p[9], p[10], p[11]);
        let (puck_x, puck_y) = (environment_state[arm * 2], environment_state[arm * 2 + 1]);
        let (goal_x, goal_y) = (environment_state[4 + arm * 2], environment_state[4 + arm * 2 + 1]);
        let (dx, dy) = (puck_x - cup_x, puck_y - cup_y);
        out[arm * 4] = dx * cos + dy * sin;
        out[arm * 4 + 1] = -dx * sin + dy * cos;
        out[arm * 4 + 2] = goal_x - puck_x;
        out[arm * 4 + 3] = goal_y - puck_y;
    }
    out
}

pub const TASK_FRAME_DIM: usize = 8;

/// What the auxiliary state head of an image encoder regresses: the puck and goal positions and
/// their task-frame features — the quantities the state-only model is given and an image model
/// must find in the pixels. Recorded in every dataset; never an input to the model.
pub fn privileged_targets(state: &[f32], environment_state: &[f32]) -> Vec<f32> {
    let mut out = environment_state.to_vec();
    out.extend(task_frame_features(state, environment_state));
    out
}

/// Random-access transitions over an opened dataset (the memory maps stay where they are; a
/// batch gathers from them).
pub struct Replay {
    pub dataset: Dataset,
    index: Vec<(usize, usize)>,
    pub norm: Normalization,
    pub bounds: ValueBounds,
    pub encoder: EncoderKind,
    pub dims: Dims,
    /// Learning reward of a success (terminal) transition, in scaled units: the value of an
    /// absorbing state paying the maximal per-step reward forever, 1/(1 − γ) = max_v.
    pub terminal_reward: f32,
}

impl Replay {
    pub fn open(dir: &Path, encoder: EncoderKind, gamma: f64) -> Result<Self> {
        let dataset = Dataset::open(dir).with_context(|| format!("opening dataset {}", dir.display()))?;
        let mut index = Vec::new();
        for e in dataset.episodes() {
            for t in 0..e.len() {
                index.push((e.meta().index, t));
            }
        }
        anyhow::ensure!(!index.is_empty(), "dataset {} has no transitions", dir.display());
        let meta = dataset.meta();
        let state_dim = if uses_images(encoder) {
            meta.state_dim
        } else {
            meta.state_dim + meta.environment_state_dim + TASK_FRAME_DIM
        };
        let action_dim = meta.action_dim;
        // Means and stds in f64 over every transition; +1e-6 as the reference.
        let (mut s_sum, mut s_sq) = (vec![0f64; state_dim], vec![0f64; state_dim]);
        let (mut a_sum, mut a_sq) = (vec![0f64; action_dim], vec![0f64; action_dim]);
        let (mut r_min, mut r_max) = (f64::INFINITY, f64::NEG_INFINITY);
        let privileged_dim = if uses_images(encoder) { meta.environment_state_dim + TASK_FRAME_DIM } else { 0 };
        let (mut p_sum, mut p_sq) = (vec![0f64; privileged_dim], vec![0f64; privileged_dim]);
        for tr in dataset.transitions() {
            if privileged_dim > 0 {
                for (i, x) in privileged_targets(tr.state, tr.environment_state).iter().enumerate() {
                    p_sum[i] += *x as f64;
                    p_sq[i] += (*x as f64).powi(2);
                }
            }
            for (i, x) in model_state(encoder, tr.state, tr.environment_state).iter().enumerate() {
                s_sum[i] += *x as f64;
                s_sq[i] += (*x as f64).powi(2);
            }
            for (i, x) in tr.action.iter().enumerate() {
                a_sum[i] += *x as f64;
                a_sq[i] += (*x as f64).powi(2);
            }
            // The success bonus (1.0 per remaining step, up to ~190) is not a per-step reward:
            // scaling by a max r that includes it shrinks every shaped reward ~150×. Scale by
            // the per-step rewards only; success becomes an absorbing value below.
            if !tr.terminal {
                r_min = r_min.min(tr.reward as f64);
                r_max = r_max.max(tr.reward as f64);
            }
        }
        let n = index.len() as f64;
        let stats = |sum: &[f64], sq: &[f64]| -> (Vec<f32>, Vec<f32>) {
            let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
            let std = sq.iter().zip(&mean).map(|(q, m)| ((q / n - m * m).max(0.0).sqrt() + 1e-6) as f32).collect();
            (mean.into_iter().map(|m| m as f32).collect(), std)
        };
        let (state_mean, state_std) = stats(&s_sum, &s_sq);
        let (action_mean, action_std) = stats(&a_sum, &a_sq);
        let (privileged_mean, privileged_std) = stats(&p_sum, &p_sq);
        anyhow::ensure!(
            r_max > 0.0,
            "dataset per-step rewards are never positive (max {r_max}): cannot scale by max r"
        );
        let reward_scale = r_max as f32;
        let bounds = ValueBounds { min_v: r_min / r_max / (1.0 - gamma), max_v: 1.0 / (1.0 - gamma) };
        let terminal_reward = (1.0 / (1.0 - gamma)) as f32;
        let dims = Dims {
            state_dim,
            action_dim,
            image_hw: (meta.image_height, meta.image_width),
            privileged_dim,
            supersample: meta.env.supersample,
        };
        let norm = Normalization {
            state_mean,
            state_std,
            action_mean,
            action_std,
            reward_scale,
            privileged_mean,
            privileged_std,
        };
        Ok(Self { dataset, index, norm, bounds, encoder, dims, terminal_reward })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// A uniformly sampled, normalised minibatch; `rng` decides which transitions.
    pub fn sample(&self, batch_size: usize, rng: &mut SplitMix64, dtype: DType, device: &Device) -> Result<Batch> {
        let picks: Vec<(usize, usize)> =
            (0..batch_size).map(|_| self.index[(rng.next_u64() % self.index.len() as u64) as usize]).collect();
        self.batch(&picks, dtype, device)
    }

    /// Every (episode, step) pair, in dataset order.
    pub fn index(&self) -> &[(usize, usize)] {
        &self.index
    }

    /// The normalised minibatch of the given (episode, step) transitions.
    pub fn batch(&self, picks: &[(usize, usize)], dtype: DType, device: &Device) -> Result<Batch> {
        let batch_size = picks.len();
        let (h, w) = self.dims.image_hw;
        let images = uses_images(self.encoder);
        let (sd, ad) = (self.dims.state_dim, self.dims.action_dim);
        let mut state = Vec::with_capacity(batch_size * sd);
        let mut next_state = Vec::with_capacity(batch_size * sd);
        let mut action = Vec::with_capacity(batch_size * ad);
        let mut reward = Vec::with_capacity(batch_size);
        let mut done = Vec::with_capacity(batch_size);
        let pd = self.dims.privileged_dim;
        let mut privileged = Vec::with_capacity(batch_size * pd);
        let frame = 3 * NUM_CAMERAS * h * w;
        let mut img = if images { vec![0f32; batch_size * frame] } else { Vec::new() };
        let mut next_img = if images { vec![0f32; batch_size * frame] } else { Vec::new() };
        for (b, &(e, t)) in picks.iter().enumerate() {
            let tr = self.dataset.episode(e).expect("indexed episode exists").transition(t);
            state.extend(self.norm.state(&model_state(self.encoder, tr.state, tr.environment_state)));
            next_state.extend(self.norm.state(&model_state(self.encoder, tr.next_state, tr.next_environment_state)));
            action.extend(
                tr.action.iter().zip(&self.norm.action_mean).zip(&self.norm.action_std).map(|((x, m), s)| (x - m) / s),
            );
            // Success: the absorbing value replaces the env's undiscounted remaining-steps bonus.
            reward.push(if tr.terminal { self.terminal_reward } else { tr.reward / self.norm.reward_scale });
            // Bootstrap through time limits; only success is terminal.
            done.push(if tr.terminal { 1f32 } else { 0f32 });
            if pd > 0 {
                privileged.extend(self.norm.privileged(&privileged_targets(tr.state, tr.environment_state)));
            }
            if images {
                cameras_to_chw(&tr.images, h, w, &mut img[b * frame..(b + 1) * frame]);
                cameras_to_chw(&tr.next_images, h, w, &mut next_img[b * frame..(b + 1) * frame]);
            }
        }
        let t2 = |v: Vec<f32>, d: usize| Tensor::from_vec(v, (batch_size, d), device).and_then(|t| t.to_dtype(dtype));
        let t4 = |v: Vec<f32>| {
            Tensor::from_vec(v, (batch_size, 3 * NUM_CAMERAS, h, w), device).and_then(|t| t.to_dtype(dtype))
        };
        Ok(Batch {
            images: if images { Some(t4(img)?) } else { None },
            next_images: if images { Some(t4(next_img)?) } else { None },
            state: t2(state, sd)?,
            next_state: t2(next_state, sd)?,
            action: t2(action, ad)?,
            reward: t2(reward, 1)?,
            done: t2(done, 1)?,
            privileged: if pd > 0 { Some(t2(privileged, pd)?) } else { None },
        })
    }
}

/// Three HWC u8 images → 9×H×W floats in [0, 1] (camera-major, then RGB).
pub fn cameras_to_chw(images: &[&[u8]; NUM_CAMERAS], h: usize, w: usize, out: &mut [f32]) {
    for (c, img) in images.iter().enumerate() {
        for y in 0..h {
            for x in 0..w {
                let p = (y * w + x) * 3;
                for k in 0..3 {
                    out[((c * 3 + k) * h + y) * w + x] = img[p + k] as f32 / 255.0;
                }
            }
        }
    }
}

/// Result of evaluating a policy in the environment.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    pub episodes: usize,
    pub mean_return: f64,
    pub normalized_score: f64,
    pub normalized_score_std: f64,
    pub success_rate: f64,
    /// Per-episode normalised scores, in seed order (for paired comparisons; not serialised).
    #[serde(skip)]
    pub episode_scores: Vec<f64>,
}

impl Evaluation {
    fn from_episodes(returns: &[f64], success: &[bool]) -> Self {
        let episodes = returns.len();
        let scores: Vec<f64> = returns.iter().map(|r| normalized_score(*r as f32) as f64).collect();
        let mean = scores.iter().sum::<f64>() / episodes as f64;
        let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / episodes as f64).sqrt();
        Evaluation {
            episodes,
            mean_return: returns.iter().sum::<f64>() / episodes as f64,
            normalized_score: mean,
            normalized_score_std: std,
            success_rate: success.iter().filter(|s| **s).count() as f64 / episodes as f64,
            episode_scores: scores,
        }
    }
}

/// Mean and standard error of the per-episode score difference `a − b` of two evaluations on the
/// same seeds. Pairing removes the spread between layouts (some are harder for every policy),
/// which dominates an unpaired comparison.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PairedDifference {
    pub mean: f64,
    pub standard_error: f64,
    pub episodes: usize,
}

pub fn paired_difference(a: &Evaluation, b: &Evaluation) -> Result<PairedDifference> {
    let n = a.episode_scores.len();
    anyhow::ensure!(
        n >= 2 && n == b.episode_scores.len(),
        "a paired comparison needs the same seeds (at least two) on both sides: {} vs {} episodes",
        n,
        b.episode_scores.len()
    );
    let diffs: Vec<f64> = a.episode_scores.iter().zip(&b.episode_scores).map(|(x, y)| x - y).collect();
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let variance = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Ok(PairedDifference { mean, standard_error: (variance / n as f64).sqrt(), episodes: n })
}

/// Scores the scripted policy that generates a dataset `tier` on env seeds `seed..seed+episodes`
/// (episode i acts as the tier's i-th dataset episode would): the behaviour policy on exactly the
/// layouts a policy evaluation used. The scripted policies read the simulator, so nothing is rendered.
pub fn evaluate_behaviour(tier: Tier, env_config: &EnvConfig, episodes: usize, seed: u64) -> Result<Evaluation> {
    anyhow::ensure!(episodes > 0, "evaluating the behaviour policy needs at least one episode");
    let mut env = Env::new(EnvConfig { render: false, ..env_config.clone() })?;
    let (mut returns, mut success) = (Vec::with_capacity(episodes), Vec::with_capacity(episodes));
    for i in 0..episodes {
        let env_seed = seed + i as u64;
        let mut policy = tier.policy_for_episode(i).build(env_seed);
        let outcome = rollout(&mut env, policy.as_mut(), env_seed);
        returns.push(outcome.episode_return as f64);
        success.push(outcome.success);
    }
    Ok(Evaluation::from_episodes(&returns, &success))
}

/// Acting interface shared by the trainer's model and an exported policy.
pub trait Actor {
    fn encoder(&self) -> EncoderKind;
    fn normalization(&self) -> &Normalization;
    /// z-scored states (B, D) and images (B, 9, H, W) → z-scored actions (B, A).
    fn act_batch(&self, images: Option<&Tensor>, state: &Tensor) -> candle_core::Result<Tensor>;
    fn device(&self) -> &Device;
    fn dtype(&self) -> DType;
}

impl Actor for (&Lapo, &Normalization) {
    fn encoder(&self) -> EncoderKind {
        self.0.config.encoder
    }
    fn normalization(&self) -> &Normalization {
        self.1
    }
    fn act_batch(&self, images: Option<&Tensor>, state: &Tensor) -> candle_core::Result<Tensor> {
        self.0.act(images, state)
    }
    fn device(&self) -> &Device {
        self.0.device()
    }
    fn dtype(&self) -> DType {
        self.0.dtype()
    }
}

/// Runs `episodes` episodes (env seeds `seed..seed+episodes`) in lockstep, one batched forward
/// per control step. `on_frame(episode, images)` sees every observation of episode 0 (GIFs).
pub fn evaluate(
    policy: &dyn Actor,
    env_config: &EnvConfig,
    episodes: usize,
    seed: u64,
    mut on_frame: impl FnMut(&crate::env::Observation),
) -> Result<Evaluation> {
    let images = uses_images(policy.encoder());
    let mut config = env_config.clone();
    config.render = images || env_config.render;
    let mut envs: Vec<Env> = (0..episodes).map(|_| Env::new(config.clone())).collect::<Result<_, _>>()?;
    let mut obs: Vec<_> = envs.iter_mut().enumerate().map(|(i, e)| e.reset(seed + i as u64)).collect();
    let mut returns = vec![0f64; episodes];
    let mut success = vec![false; episodes];
    let mut active = vec![true; episodes];
    let (h, w) = (config.image_height, config.image_width);
    let norm = policy.normalization();
    on_frame(&obs[0]);
    while active.iter().any(|a| *a) {
        let live: Vec<usize> = (0..episodes).filter(|i| active[*i]).collect();
        let mut states = Vec::new();
        let mut imgs = vec![0f32; if images { live.len() * 9 * h * w } else { 0 }];
        for (k, &i) in live.iter().enumerate() {
            states.extend(norm.state(&model_state(policy.encoder(), &obs[i].state, &obs[i].environment_state)));
            if images {
                let views = [&obs[i].images[0][..], &obs[i].images[1][..], &obs[i].images[2][..]];
                cameras_to_chw(&views, h, w, &mut imgs[k * 9 * h * w..(k + 1) * 9 * h * w]);
            }
        }
        let sd = states.len() / live.len();
        let state = Tensor::from_vec(states, (live.len(), sd), policy.device())?.to_dtype(policy.dtype())?;
        let img = if images {
            Some(Tensor::from_vec(imgs, (live.len(), 9, h, w), policy.device())?.to_dtype(policy.dtype())?)
        } else {
            None
        };
        let actions: Vec<Vec<f32>> = policy.act_batch(img.as_ref(), &state)?.to_dtype(DType::F32)?.to_vec2()?;
        for (k, &i) in live.iter().enumerate() {
            let a: Vec<f32> = norm.unnormalize_action(&actions[k]).into_iter().map(|x| x.clamp(-1.0, 1.0)).collect();
            let step = envs[i].step(&a);
            returns[i] += step.reward as f64;
            success[i] |= step.success;
            if step.done {
                active[i] = false;
            }
            obs[i] = step.obs;
            if i == 0 && active[0] {
                on_frame(&obs[0]);
            }
        }
    }
    Ok(Evaluation::from_episodes(&returns, &success))
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

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
/// far below what a divergence reaches within a few iterations (the issue's Q ≈ 1e23).
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
        dims: lapo.dims,
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
