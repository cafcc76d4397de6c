//! `sampler`: optimise the initial noise of a denoising trajectory. Thin over the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use serde_json::{json, Map, Value};

/// Optimise z0 (and optionally every step noise) of a differentiable denoising trajectory.
/// With no `-i`, runs the policy stress test on the embedded world model when it and an
/// exported image policy are present (`weights/world_model.*`, `weights/policy.safetensors` or
/// `--policy`), and the built-in analytic demo otherwise (or with `--demo`).
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Params file (JSON) for the analytic setup; fields not given take the built-in defaults.
    #[arg(short = 'i', long = "input")]
    input: Option<PathBuf>,
    /// Run the built-in analytic demo even where the stress test's weights are present.
    #[arg(long)]
    demo: bool,
    /// Output directory.
    #[arg(short = 'o', long = "out", default_value = "out/sampler")]
    out: PathBuf,
    /// euler | res | unipc
    #[arg(long)]
    solver: Option<String>,
    /// ode | sde | sde-learnable | sde-from-z0
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
    /// Exported LAPO policy for the stress test (default: weights/policy.safetensors).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Directory holding world_model.json + world_model.safetensors (default: weights/).
    #[arg(long)]
    world_model: Option<PathBuf>,
    /// Stress-test seeds, comma-separated (default 0,1,2).
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Sample a Cosmos pipeline from a diffusers repository (local or on the Hugging Face Hub),
    /// optionally optimising z0 through every denoising step and the VAE decode.
    Cosmos(sampler::cosmos::app::CosmosArgs),
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

/// The stress test's settings: defaults, overridden by the flags that apply to it.
fn stress_settings(cli: &Cli) -> anyhow::Result<sampler::stress::StressSettings> {
    let mut s = sampler::stress::StressSettings::default();
    if let Some(seeds) = &cli.seeds {
        anyhow::ensure!(!seeds.is_empty(), "--seeds: give at least one seed");
        s.seeds = seeds.clone();
    }
    if let Some(n) = cli.iterations {
        s.iterations = usize::try_from(n).context("--iterations")?;
    }
    if let Some(n) = cli.num_steps {
        anyhow::ensure!(n > 0, "--num-steps must be at least 1");
        s.num_steps = usize::try_from(n).context("--num-steps")?;
    }
    if let Some(lr) = cli.lr {
        anyhow::ensure!(lr > 0.0 && lr.is_finite(), "--lr must be positive, got {lr}");
        s.lr = lr;
    }
    if let Some(d) = &cli.direction {
        s.direction = serde_json::from_value(Value::from(d.as_str()))
            .map_err(|_| anyhow::anyhow!("--direction: unknown value '{d}'; allowed: ascent, descent"))?;
    }
    if let Some(v) = &cli.solver {
        s.solver = serde_json::from_value(Value::from(v.as_str()))
            .map_err(|_| anyhow::anyhow!("--solver: unknown value '{v}'; allowed: euler, res, unipc"))?;
    }
    Ok(s)
}

/// Flags that only the analytic setup reads; the stress test must not silently ignore them.
fn demo_only_flags(cli: &Cli) -> Vec<&'static str> {
    [
        ("--noise-mode", cli.noise_mode.is_some()),
        ("--seed", cli.seed.is_some()),
        ("--optimizer", cli.optimizer.is_some()),
        ("--objective", cli.objective.is_some()),
        ("--device", cli.device.is_some()),
        ("--grad-mode", cli.grad_mode.is_some()),
        ("--grad-clip", cli.grad_clip.is_some()),
        ("--chi-reg", cli.chi_reg.is_some()),
        ("--s-churn", cli.s_churn.is_some()),
        ("--verify-grad", cli.verify_grad),
        ("--no-verify-grad", cli.no_verify_grad),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect()
}

/// Runs the stress test if its inputs exist; `Ok(false)` (with the reason printed) otherwise.
fn try_stress(cli: &Cli) -> anyhow::Result<bool> {
    let weights = cli.world_model.clone().unwrap_or_else(sampler::stress::weights_dir);
    let policy = cli.policy.clone().unwrap_or_else(|| weights.join("policy.safetensors"));
    let explicit = cli.policy.is_some() || cli.world_model.is_some();
    let missing: Vec<String> =
        [weights.join("world_model.safetensors"), weights.join("world_model.json"), policy.clone()]
            .iter()
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect();
    if !missing.is_empty() {
        anyhow::ensure!(!explicit, "stress test inputs missing: {}", missing.join(", "));
        println!(
            "policy stress test unavailable (missing {}): running the built-in analytic demo instead (see sampler/README.md)",
            missing.join(", ")
        );
        return Ok(false);
    }
    let ignored = demo_only_flags(cli);
    anyhow::ensure!(
        ignored.is_empty(),
        "{} apply to the analytic demo, not the policy stress test (the default here); add --demo \
         (or -i params.json) to run the demo, or drop them. The stress test takes --seeds \
         --iterations --num-steps --lr --direction --solver --policy --world-model",
        ignored.join(", ")
    );
    let settings = stress_settings(cli)?;
    println!(
        "no -i params file: running the policy stress test (world model {}, policy {})",
        weights.display(),
        policy.display()
    );
    let model =
        sampler::world_model::WorldModel::load_dir(&weights, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    sampler::stress::run(&model, &policy, &settings, &cli.out, |line| println!("{line}"))?;
    Ok(true)
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(Command::Cosmos(args)) = &cli.command {
        // Which flags the command line gave: they win over a params file's values.
        let mut args = args.clone();
        if let Some(("cosmos", m)) = matches.subcommand() {
            sampler::cosmos::app::record_command_line(&mut args, m);
        }
        sampler::cosmos::app::run(&args, |line| println!("{line}"))?;
        return Ok(());
    }
    if cli.input.is_none() && !cli.demo && try_stress(&cli)? {
        return Ok(());
    }
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
