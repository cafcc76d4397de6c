//! `sampler`: optimise the initial noise of a denoising trajectory. Thin over the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use serde_json::{json, Map, Value};

/// Optimise z0 (and optionally every step noise) of a differentiable denoising trajectory.
/// With no `-i`, runs the built-in analytic demo.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Params file (JSON); fields not given take the built-in defaults.
    #[arg(short = 'i', long = "input")]
    input: Option<PathBuf>,
    /// Output directory.
    #[arg(short = 'o', long = "out", default_value = "out/sampler")]
    out: PathBuf,
    /// euler | res | unipc
    #[arg(long)]
    solver: Option<String>,
    /// ode | sde | sde-learnable
    #[arg(long)]
    noise_mode: Option<String>,
    /// Denoising steps.
    #[arg(long)]
    num_steps: Option<u64>,
    /// Optimisation iterations (params field `noise_steps`).
    #[arg(long)]
    iterations: Option<u64>,
    /// Learning rate (params field `noise_lr`).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// ascent | descent
    #[arg(long)]
    direction: Option<String>,
    /// adam | sgd
    #[arg(long)]
    optimizer: Option<String>,
    #[arg(long)]
    objective: Option<String>,
    #[arg(long)]
    device: Option<String>,
    /// recompute | full-graph
    #[arg(long)]
    grad_mode: Option<String>,
    #[arg(long)]
    grad_clip: Option<f64>,
    #[arg(long)]
    chi_reg: Option<f64>,
    #[arg(long)]
    s_churn: Option<f64>,
    /// Run the directional finite-difference check of the gradient (on by default).
    #[arg(long, overrides_with = "no_verify_grad")]
    verify_grad: bool,
    #[arg(long)]
    no_verify_grad: bool,
}

impl Cli {
    /// Command-line values as params fields; they are validated exactly like the file's.
    fn overrides(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("solver", self.solver.clone().map(Value::from));
        put("noise_mode", self.noise_mode.clone().map(Value::from));
        put("num_steps", self.num_steps.map(Value::from));
        put("noise_steps", self.iterations.map(Value::from));
        put("noise_lr", self.lr.map(|v| json!(v)));
        put("seed", self.seed.map(Value::from));
        put("direction", self.direction.clone().map(Value::from));
        put("optimizer", self.optimizer.clone().map(Value::from));
        put("objective", self.objective.clone().map(Value::from));
        put("device", self.device.clone().map(Value::from));
        put("grad_mode", self.grad_mode.clone().map(Value::from));
        put("grad_clip", self.grad_clip.map(|v| json!(v)));
        put("chi_reg", self.chi_reg.map(|v| json!(v)));
        put("s_churn", self.s_churn.map(|v| json!(v)));
        if self.verify_grad {
            put("verify_grad", Some(Value::Bool(true)));
        }
        if self.no_verify_grad {
            put("verify_grad", Some(Value::Bool(false)));
        }
        m
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let text = match &cli.input {
        Some(path) => {
            Some(std::fs::read_to_string(path).with_context(|| format!("reading params file {}", path.display()))?)
        }
        None => None,
    };
    let name = cli.input.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let params = sampler::config::parse_params(text.as_deref().map(|t| (name.as_str(), t)), &cli.overrides())?;
    if cli.input.is_none() {
        println!("no -i params file: running the built-in analytic demo (see sampler/README.md)");
    }
    sampler::app::run(&params, &cli.out, |line| println!("{line}"))?;
    Ok(())
}
