//! LAPO's networks over a feature vector `s`: [`Actor`], [`ActorVae`], [`Critic`], and the
//! [`Mlp`] they are built from. In the multimodal setting `s` is the observation encoder's
//! output; in the state-only setting it is the z-scored state itself.
//!
//! Every MLP has `hidden_layers` hidden layers of 256 units with ReLU between them (linear
//! layers `l0..l{hidden_layers}`). The LAPO reference (`algos/algos_vae.py` of
//! pcchenxi/LAPO-offlienRL, what its `main_d4rl.py` trains) uses three hidden layers (four linear
//! layers) everywhere; `LapoConfig::hidden_layers` chooses, its default from a measurement on our
//! data (see there). The reference's VAE encoder has separate mean and log-variance heads; here
//! one last layer emits both (rows `0..latent` the mean head, `latent..2·latent` the log-variance
//! head), which is the same function. Initialisation is deterministic: Candle's
//! `VarBuilder` draws from a thread-local RNG that cannot be seeded, so [`init_deterministic`]
//! overwrites every var from [`SplitMix64`] after construction.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder, VarMap};
use shared::rng::SplitMix64;

/// Hidden width of every MLP (reference default).
pub const HIDDEN: usize = 256;
/// Hidden layers per MLP in files written before the depth was recorded (exported policies,
/// checkpoints): what every network had then.
pub const LEGACY_HIDDEN_LAYERS: usize = 2;

/// For serde defaults of recorded depths.
pub fn legacy_hidden_layers() -> usize {
    LEGACY_HIDDEN_LAYERS
}

/// Linear layers `l0..l{n-1}` with ReLU between them and none after the last.
#[derive(Clone, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(input: usize, hidden: usize, layers: usize, output: usize, vb: VarBuilder) -> Result<Self> {
        assert!(layers >= 1, "an MLP needs at least one layer");
        let mut out = Vec::with_capacity(layers);
        for i in 0..layers {
            let fan_in = if i == 0 { input } else { hidden };
            let fan_out = if i + 1 == layers { output } else { hidden };
            out.push(candle_nn::linear(fan_in, fan_out, vb.pp(format!("l{i}")))?);
        }
        Ok(Self { layers: out })
    }

    /// `hidden_layers` hidden layers of [`HIDDEN`] units.
    pub fn standard(input: usize, output: usize, hidden_layers: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(input, HIDDEN, hidden_layers + 1, output, vb)
    }

    pub fn out_dim(&self) -> usize {
        self.layers.last().map_or(0, |l| l.weight().dim(0).unwrap_or(0))
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// The latent policy: `max_latent_action · tanh(MLP(s))`. It acts in the VAE's latent space,
/// so the decoder keeps it within the support of the data.
#[derive(Clone, Debug)]
pub struct Actor {
    net: Mlp,
    max_latent_action: f64,
}

impl Actor {
    pub fn new(
        feature_dim: usize,
        latent_dim: usize,
        max_latent_action: f64,
        hidden_layers: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self { net: Mlp::standard(feature_dim, latent_dim, hidden_layers, vb)?, max_latent_action })
    }

    pub fn forward(&self, s: &Tensor) -> Result<Tensor> {
        self.net.forward(s)?.tanh()? * self.max_latent_action
    }
}

/// Conditional VAE over (z-scored) actions: encoder cat(s, a) → (μ, log σ²), decoder
/// cat(s, z) → â with no output squashing (actions are z-scored, not bounded).
#[derive(Clone, Debug)]
pub struct ActorVae {
    encoder: Mlp,
    decoder: Mlp,
    latent_dim: usize,
    max_latent_action: f64,
}

/// What one VAE pass returns.
pub struct VaeOutput {
    pub reconstruction: Tensor,
    pub mean: Tensor,
    pub log_var: Tensor,
}

impl ActorVae {
    pub fn new(
        feature_dim: usize,
        action_dim: usize,
        latent_dim: usize,
        max_latent_action: f64,
        hidden_layers: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            encoder: Mlp::standard(feature_dim + action_dim, 2 * latent_dim, hidden_layers, vb.pp("encoder"))?,
            decoder: Mlp::standard(feature_dim + latent_dim, action_dim, hidden_layers, vb.pp("decoder"))?,
            latent_dim,
            max_latent_action,
        })
    }

    pub fn latent_dim(&self) -> usize {
        self.latent_dim
    }

    /// Encode, reparameterise with the given standard normals `eps` (B, latent), decode.
    pub fn forward(&self, s: &Tensor, a: &Tensor, eps: &Tensor) -> Result<VaeOutput> {
        let stats = self.encoder.forward(&Tensor::cat(&[s, a], D::Minus1)?)?;
        let mean = stats.narrow(D::Minus1, 0, self.latent_dim)?;
        let log_var = stats.narrow(D::Minus1, self.latent_dim, self.latent_dim)?;
        let z = (&mean + ((&log_var * 0.5)?.exp()? * eps)?)?;
        let reconstruction = self.decode(s, &z)?;
        Ok(VaeOutput { reconstruction, mean, log_var })
    }

    pub fn decode(&self, s: &Tensor, z: &Tensor) -> Result<Tensor> {
        self.decoder.forward(&Tensor::cat(&[s, z], D::Minus1)?)
    }

    /// Decoding without a latent: z ~ N(0, 1) clipped to ±max_latent_action (the prior sample).
    pub fn decode_prior(&self, s: &Tensor, rng: &mut SplitMix64) -> Result<Tensor> {
        let z = rng.normal_tensor((s.dim(0)?, self.latent_dim), s.dtype(), s.device())?;
        let z = z.clamp(-self.max_latent_action, self.max_latent_action)?;
        self.decode(s, &z)
    }
}

/// Q1 and Q2 on cat(s, a), V on s: one module, one optimiser.
#[derive(Clone, Debug)]
pub struct Critic {
    q1: Mlp,
    q2: Mlp,
    v: Mlp,
}

impl Critic {
    pub fn new(feature_dim: usize, action_dim: usize, hidden_layers: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q1: Mlp::standard(feature_dim + action_dim, 1, hidden_layers, vb.pp("q1"))?,
            q2: Mlp::standard(feature_dim + action_dim, 1, hidden_layers, vb.pp("q2"))?,
            v: Mlp::standard(feature_dim, 1, hidden_layers, vb.pp("v"))?,
        })
    }

    /// (Q1, Q2), each (B, 1).
    pub fn q(&self, s: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        let sa = Tensor::cat(&[s, a], D::Minus1)?;
        Ok((self.q1.forward(&sa)?, self.q2.forward(&sa)?))
    }

    pub fn q1(&self, s: &Tensor, a: &Tensor) -> Result<Tensor> {
        self.q1.forward(&Tensor::cat(&[s, a], D::Minus1)?)
    }

    pub fn v(&self, s: &Tensor) -> Result<Tensor> {
        self.v.forward(s)
    }

    /// Qmix = m·min(Q1, Q2) + (1 − m)·max(Q1, Q2), m = `doubleq_min`.
    pub fn q_mix(&self, s: &Tensor, a: &Tensor, doubleq_min: f64) -> Result<Tensor> {
        let (q1, q2) = self.q(s, a)?;
        (q1.minimum(&q2)? * doubleq_min)? + (q1.maximum(&q2)? * (1.0 - doubleq_min))?
    }
}

/// Overwrites every var of `varmap` deterministically from `seed`, visiting names in sorted order:
/// * batch-norm statistics: mean 0, variance 1; batch-norm affine (a 1-d `weight`/`bias` with a
///   `running_mean` sibling): 1 and 0;
/// * linear weights and biases: U(±1/√fan_in), PyTorch's `nn.Linear` default;
/// * conv weights: Kaiming normal, std √(2/fan_in) (ReLU nets); conv biases U(±1/√fan_in).
pub fn init_deterministic(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = SplitMix64::new(seed);
    for name in names {
        let var = &data[name];
        let (dtype, device) = (var.dtype(), var.device().clone());
        let parent = name.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
        let is_bn = data.contains_key(&format!("{parent}.running_mean"));
        let value = if name.ends_with("running_mean") || (is_bn && name.ends_with(".bias")) {
            var.zeros_like()?
        } else if name.ends_with("running_var") || (is_bn && name.ends_with(".weight")) {
            var.ones_like()?
        } else {
            // A bias takes its fan-in from the weight beside it.
            let weight =
                data.get(&format!("{parent}.weight")).map(|w| w.dims().to_vec()).unwrap_or_else(|| var.dims().to_vec());
            let fan_in: usize = weight.iter().skip(1).product::<usize>().max(1);
            if name.ends_with(".weight") && weight.len() == 4 {
                (rng.normal_tensor(var.shape(), DType::F64, &device)? * (2.0 / fan_in as f64).sqrt())?
                    .to_dtype(dtype)?
            } else {
                let bound = 1.0 / (fan_in as f64).sqrt();
                rng.uniform_tensor(var.shape(), -bound, bound, dtype, &device)?
            }
        };
        var.set(&value)?;
    }
    Ok(())
}
