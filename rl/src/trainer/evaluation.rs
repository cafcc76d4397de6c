//! Evaluating a policy in the environment (episodes in lockstep, one batched forward per
//! control step), the scripted behaviour policy on the same layouts, and paired comparisons.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::normalization::{model_state, uses_images, Normalization};
use super::replay::cameras_to_chw;
use crate::dataset::Tier;
use crate::encoders::EncoderKind;
use crate::env::policy::rollout;
use crate::env::{normalized_score, Env, EnvConfig};
use crate::lapo::Lapo;

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
