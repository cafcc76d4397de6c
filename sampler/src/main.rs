//! `sampler`: optimise the initial noise of a denoising trajectory. Thin over the library.

use std::path::{Path, PathBuf};

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
    /// Output directory: absent or empty, or replaced whole with --overwrite. Without -o each
    /// run writes a new numbered directory out/sampler/run-NNN (never an earlier run's).
    #[arg(short = 'o', long = "out")]
    out: Option<PathBuf>,
    /// With -o DIR: replace DIR's contents (removed whole before the first write) instead of
    /// refusing a non-empty DIR.
    #[arg(long)]
    overwrite: bool,
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
    #[arg(long, allow_negative_numbers = true)]
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
    /// auto | cpu | cuda[:N] | metal (default cpu), for the stress test and the demo.
    #[arg(long)]
    device: Option<String>,
    /// recompute | full-graph
    #[arg(long)]
    grad_mode: Option<String>,
    #[arg(long, allow_negative_numbers = true)]
    grad_clip: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    chi_reg: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    s_churn: Option<f64>,
    /// Run the directional finite-difference check of the gradient (on by default).
    #[arg(long, overrides_with = "no_verify_grad")]
    verify_grad: bool,
    #[arg(long)]
    no_verify_grad: bool,
    /// Exported LAPO policy for the stress test: a file path or a Hugging Face Hub reference
    /// `org/name[@revision]:path/in/repo.safetensors` (from the local Hub cache; default:
    /// weights/policy.safetensors).
    #[arg(long)]
    policy: Option<String>,
    /// A directory holding world_model.json + world_model.safetensors (default: weights/), or
    /// `cosmos:REF` — a Cosmos Predict2/Predict2.5 diffusers repository (a folder or
    /// `org/name[@revision]`) as the stress test's world model (with --cosmos-prompt-embeds).
    #[arg(long)]
    world_model: Option<PathBuf>,
    /// Stress test: one scenario per environment seed, comma-separated (instead of the default
    /// held-out episodes).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["scenarios", "num_scenarios"])]
    seeds: Option<Vec<u64>>,
    /// Stress test: a scenario file (JSON Lines: `id`, `episode_seed`, optional `start_frame`,
    /// `noise_seed`, `direction`, `actions`; see sampler/README.md).
    #[arg(long, conflicts_with = "num_scenarios")]
    scenarios: Option<PathBuf>,
    /// Stress test: how many held-out episodes (seeds 9000, 9001, …) make the scenarios
    /// (default 20).
    #[arg(long)]
    num_scenarios: Option<usize>,
    /// Stress test: run shard INDEX/COUNT of the scenarios (0-based; scenario k when k mod COUNT
    /// = INDEX) into -o DIR/shard-INDEX-of-COUNT; merge with `sampler stress-report DIR`.
    #[arg(long)]
    shard: Option<String>,
    /// Stress test: continue the run in -o DIR, skipping the scenarios whose results are there.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Stress test: keep z0 within ‖z0 − z0_init‖ ≤ R·√d of its initial value (R: the RMS
    /// displacement per element; default 0.05, measured in sampler/README.md; `--trust-region
    /// none` for an unconstrained search).
    #[arg(long, allow_negative_numbers = true)]
    trust_region: Option<String>,
    /// Stress test: renormalise z0 to its initial norm after every update (DOODL): `--renorm
    /// true` (default false).
    #[arg(long)]
    renorm: Option<bool>,
    /// Stress test: scenarios in the report's gallery (default 8).
    #[arg(long)]
    top: Option<usize>,
    /// Stress test with `--world-model cosmos:REF`: safetensors with `prompt_embeds` (and
    /// `negative_prompt_embeds` for guidance > 1) for the pipeline (a path or a Hub reference).
    #[arg(long)]
    cosmos_prompt_embeds: Option<String>,
    /// Stress test with a Cosmos world: frames per clip (1 + 4k; default 5).
    #[arg(long)]
    cosmos_frames: Option<usize>,
    /// Stress test with a Cosmos world: classifier-free guidance (default the pipeline's).
    #[arg(long)]
    cosmos_guidance: Option<f64>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Sample a Cosmos pipeline from a diffusers repository (local or on the Hugging Face Hub),
    /// optionally optimising z0 through every denoising step and the VAE decode.
    Cosmos(Box<sampler::cosmos::app::CosmosArgs>),
    /// Merge a policy stress test's results — a run directory, or the -o directory of its
    /// shards — into DIR/report/: summary.md, summary.json, gallery.png, gallery.gif.
    StressReport(StressReportArgs),
}

#[derive(clap::Args, Debug)]
struct StressReportArgs {
    /// The run's -o directory (holding scenarios/ or shard-*/scenarios/).
    dir: PathBuf,
    /// Scenarios in the gallery (the worst failures first).
    #[arg(long, default_value_t = 8)]
    top: usize,
    /// Replace an existing DIR/report/.
    #[arg(long)]
    overwrite: bool,
}

/// Where `sampler` writes without `-o`: a new numbered directory under it per run.
const DEFAULT_OUT: &str = "out/sampler";

impl Cli {
    /// Command-line values as params fields; they are validated exactly like the file's. A
    /// non-finite number is refused here, naming its flag (JSON has no NaN/Inf: it would become
    /// `null` and be reported as a wrong type).
    fn overrides(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        let finite = |flag: &str, v: Option<f64>| -> anyhow::Result<Option<Value>> {
            match v {
                Some(x) if !x.is_finite() => anyhow::bail!("invalid argument: {flag} must be finite, got {x}"),
                Some(x) => Ok(Some(json!(x))),
                None => Ok(None),
            }
        };
        put("solver", self.solver.clone().map(Value::from));
        put("noise_mode", self.noise_mode.clone().map(Value::from));
        put("num_steps", self.num_steps.map(Value::from));
        put("noise_steps", self.iterations.map(Value::from));
        put("noise_lr", finite("--lr", self.lr)?);
        put("seed", self.seed.map(Value::from));
        put("direction", self.direction.clone().map(Value::from));
        put("optimizer", self.optimizer.clone().map(Value::from));
        put("objective", self.objective.clone().map(Value::from));
        put("device", self.device.clone().map(Value::from));
        put("grad_mode", self.grad_mode.clone().map(Value::from));
        put("grad_clip", finite("--grad-clip", self.grad_clip)?);
        put("chi_reg", finite("--chi-reg", self.chi_reg)?);
        put("s_churn", finite("--s-churn", self.s_churn)?);
        if self.verify_grad {
            put("verify_grad", Some(Value::Bool(true)));
        }
        if self.no_verify_grad {
            put("verify_grad", Some(Value::Bool(false)));
        }
        Ok(m)
    }
}

/// The stress test's settings: defaults, overridden by the flags that apply to it, every range
/// checked (`StressSettings::checks`, naming the flags).
fn stress_settings(cli: &Cli) -> anyhow::Result<sampler::stress::StressSettings> {
    use sampler::stress::ScenarioSource;
    let mut s = sampler::stress::StressSettings::default();
    if let Some(seeds) = &cli.seeds {
        s.scenarios = ScenarioSource::Seeds(seeds.clone());
    }
    if let Some(path) = &cli.scenarios {
        s.scenarios = ScenarioSource::File(path.clone());
    }
    if let Some(n) = cli.num_scenarios {
        anyhow::ensure!((1..=1_000_000).contains(&n), "--num-scenarios must be in 1..=1000000, got {n}");
        s.scenarios = ScenarioSource::HeldOut { count: n };
    }
    if let Some(shard) = &cli.shard {
        s.shard = Some(sampler::stress::Shard::parse(shard)?);
    }
    if let Some(r) = &cli.trust_region {
        s.constraint.trust_region = if r == "none" {
            None
        } else {
            let v: f64 =
                r.parse().map_err(|_| anyhow::anyhow!("--trust-region: a positive number or none, got {r}"))?;
            anyhow::ensure!(v.is_finite() && v > 0.0, "--trust-region must be positive and finite (or none), got {r}");
            Some(v)
        };
    }
    if let Some(on) = cli.renorm {
        s.constraint.renormalise = on;
    }
    if let Some(c) = cli.chi_reg {
        s.chi_reg = c;
    }
    if let Some(k) = cli.top {
        s.top = k;
    }
    if let Some(n) = cli.iterations {
        s.iterations = usize::try_from(n).context("--iterations")?;
    }
    if let Some(n) = cli.num_steps {
        s.num_steps = usize::try_from(n).context("--num-steps")?;
    }
    if let Some(lr) = cli.lr {
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
    s.checks().finish()?;
    Ok(s)
}

/// Flags that only the analytic setup reads; the stress test must not silently ignore them.
fn demo_only_flags(cli: &Cli) -> Vec<&'static str> {
    [
        ("--noise-mode", cli.noise_mode.is_some()),
        ("--seed", cli.seed.is_some()),
        ("--optimizer", cli.optimizer.is_some()),
        ("--objective", cli.objective.is_some()),
        ("--grad-mode", cli.grad_mode.is_some()),
        ("--grad-clip", cli.grad_clip.is_some()),
        ("--s-churn", cli.s_churn.is_some()),
        ("--verify-grad", cli.verify_grad),
        ("--no-verify-grad", cli.no_verify_grad),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect()
}

/// Flags that only the stress test reads; the analytic demo must not silently ignore them.
fn stress_only_flags(cli: &Cli) -> Vec<&'static str> {
    [
        ("--policy", cli.policy.is_some()),
        ("--world-model", cli.world_model.is_some()),
        ("--seeds", cli.seeds.is_some()),
        ("--scenarios", cli.scenarios.is_some()),
        ("--num-scenarios", cli.num_scenarios.is_some()),
        ("--shard", cli.shard.is_some()),
        ("--resume", cli.resume),
        ("--trust-region", cli.trust_region.is_some()),
        ("--renorm", cli.renorm.is_some()),
        ("--top", cli.top.is_some()),
        ("--cosmos-prompt-embeds", cli.cosmos_prompt_embeds.is_some()),
        ("--cosmos-frames", cli.cosmos_frames.is_some()),
        ("--cosmos-guidance", cli.cosmos_guidance.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect()
}

/// The stress test's inputs, or `None` (with the reason) when the defaults are absent and none
/// was given: then the analytic demo runs. A given `--policy` / `--world-model` that cannot be
/// found is an error naming the flag.
fn stress_inputs(cli: &Cli) -> anyhow::Result<Result<(PathBuf, PathBuf), String>> {
    use sampler::world_model::{CONFIG_FILE, WEIGHTS_FILE};
    let weights = match &cli.world_model {
        Some(dir) => {
            anyhow::ensure!(
                dir.is_dir(),
                "--world-model {}: {}; give the directory that holds {CONFIG_FILE} and {WEIGHTS_FILE}",
                dir.display(),
                if dir.exists() { "is not a directory" } else { "not found" }
            );
            let missing: Vec<&str> =
                [CONFIG_FILE, WEIGHTS_FILE].into_iter().filter(|f| !dir.join(f).is_file()).collect();
            anyhow::ensure!(
                missing.is_empty(),
                "--world-model {}: missing {} (the directory must hold {CONFIG_FILE} and {WEIGHTS_FILE})",
                dir.display(),
                missing.join(" and ")
            );
            dir.clone()
        }
        None => sampler::stress::weights_dir(),
    };
    let policy = match &cli.policy {
        // One resolver for every weights flag: a local path or a Hub reference.
        Some(reference) => {
            shared::weights::resolve(reference).with_context(|| format!("--policy {reference}: cannot resolve it"))?
        }
        None => weights.join("policy.safetensors"),
    };
    let missing: Vec<String> = [weights.join(WEIGHTS_FILE), weights.join(CONFIG_FILE), policy.clone()]
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        // Only the defaults can be missing here: a given --policy resolved to a file, and a given
        // --world-model was checked above.
        anyhow::ensure!(
            cli.policy.is_none(),
            "--policy: the stress test also needs the world model, but {} is missing; give --world-model DIR",
            missing.join(", ")
        );
        return Ok(Err(missing.join(", ")));
    }
    Ok(Ok((weights, policy)))
}

/// Where the stress test writes: a numbered or given directory as every command, or with
/// `--resume` / `--shard` a given one (a shard's is `DIR/shard-i-of-n`).
enum StressOut {
    Plain(shared::outputs::OutputDir),
    Dir(PathBuf, shared::outputs::Existing),
}

fn stress_out_dir(cli: &Cli, settings: &sampler::stress::StressSettings) -> anyhow::Result<StressOut> {
    use shared::outputs::{check_dir, Existing};
    let mode = Existing::from_flags(cli.overwrite, cli.resume)?;
    match (&settings.shard, &cli.out) {
        (Some(shard), Some(dir)) => {
            let dir = dir.join(shard.dir_name());
            check_dir(&dir, "-o", mode)?;
            Ok(StressOut::Dir(dir, mode))
        }
        (Some(_), None) => {
            anyhow::bail!("--shard needs -o DIR: the run directory every shard writes into (as DIR/shard-i-of-n)")
        }
        (None, Some(dir)) if cli.resume => {
            check_dir(dir, "-o", mode)?;
            Ok(StressOut::Dir(dir.clone(), mode))
        }
        (None, None) if cli.resume => anyhow::bail!("--resume needs -o DIR: the run to continue"),
        (None, _) => Ok(StressOut::Plain(shared::outputs::OutputDir::check(
            cli.out.as_deref(),
            Path::new(DEFAULT_OUT),
            cli.overwrite,
        )?)),
    }
}

/// `sampler stress-report DIR`: the merged report of a run's (or its shards') results.
fn stress_report(args: &StressReportArgs) -> anyhow::Result<()> {
    use sampler::stress::report;
    anyhow::ensure!(args.dir.is_dir(), "{}: not a directory (give a stress test's -o DIR)", args.dir.display());
    anyhow::ensure!(args.top >= 1, "--top must be at least 1");
    let results = report::collect(&args.dir)?;
    let out = args.dir.join(report::REPORT_DIR);
    let mode = shared::outputs::Existing::from_flags(args.overwrite, false)?;
    let claimed = shared::outputs::claim_dir(&out, "report", mode)?;
    let files = report::write_report(&results, claimed.path(), args.top)?;
    let plain: Vec<_> = results.into_iter().map(|(r, _)| r).collect();
    println!("{}", report::markdown(&report::summary(&plain)));
    println!("wrote {} to {}", files.join(", "), claimed.path().display());
    Ok(())
}

/// `--world-model cosmos:REF`: the repository reference.
fn cosmos_world_ref(cli: &Cli) -> Option<String> {
    cli.world_model.as_ref().and_then(|p| p.to_str()).and_then(|s| s.strip_prefix("cosmos:")).map(str::to_string)
}

/// The stress test in a Cosmos world (`--world-model cosmos:REF`).
fn stress_cosmos(cli: &Cli, reference: &str) -> anyhow::Result<()> {
    use sampler::cosmos::pipeline::{self, CosmosPipeline};
    let settings = stress_settings(cli)?;
    let embeds = cli.cosmos_prompt_embeds.as_deref().context(
        "--world-model cosmos:REF needs --cosmos-prompt-embeds FILE (scripts/cosmos_prompt_embeds.py makes one)",
    )?;
    let embeds = shared::weights::resolve(embeds).with_context(|| format!("--cosmos-prompt-embeds {embeds}"))?;
    let frames = cli.cosmos_frames.unwrap_or(sampler::stress::cosmos_world::DEFAULT_COSMOS_FRAMES);
    if let Some(g) = cli.cosmos_guidance {
        anyhow::ensure!(g.is_finite() && g >= 0.0, "--cosmos-guidance must be finite and ≥ 0, got {g}");
    }
    let policy = match &cli.policy {
        Some(r) => shared::weights::resolve(r).with_context(|| format!("--policy {r}: cannot resolve it"))?,
        None => sampler::stress::weights_dir().join("policy.safetensors"),
    };
    let out = stress_out_dir(cli, &settings)?;
    let device_spec = cli.device.as_deref().unwrap_or("cpu");
    let device = shared::device::parse_device(device_spec).with_context(|| format!("--device {device_spec}"))?;
    sampler::stress::load_policy(&policy, &device).with_context(|| format!("--policy {}", policy.display()))?;
    if let Some(s) = settings.scenarios.scenarios(settings.start_frame)?.iter().find(|s| s.actions.is_some()) {
        anyhow::bail!(
            "scenario {}: `actions` condition the embedded world model; a Cosmos world is not conditioned on actions",
            s.id
        );
    }
    let (prompt, negative) = pipeline::read_prompt_embeds(&embeds, &device)?;
    let pipe = CosmosPipeline::load(reference, candle_core::DType::F32, &device)
        .with_context(|| format!("--world-model cosmos:{reference}"))?;
    let guidance = cli.cosmos_guidance.unwrap_or(pipe.kind.default_guidance());
    let world = sampler::stress::CosmosWorld::new(&pipe, prompt, negative, guidance, frames, &device)?;
    let claimed = match &out {
        StressOut::Plain(out) => out.claim()?,
        StressOut::Dir(dir, mode) => shared::outputs::claim_dir(dir, "-o", *mode)?,
    };
    println!(
        "policy stress test in a Cosmos world ({reference}), policy {} → {}",
        policy.display(),
        claimed.path().display()
    );
    sampler::stress::run_on(&world, &policy, &settings, &device, claimed.path(), |line| println!("{line}"))?;
    Ok(())
}

/// Runs the stress test if its inputs exist; `Ok(false)` (with the reason printed) otherwise.
fn try_stress(cli: &Cli) -> anyhow::Result<bool> {
    if let Some(reference) = cosmos_world_ref(cli) {
        let ignored = demo_only_flags(cli);
        anyhow::ensure!(
            ignored.is_empty(),
            "{} apply to the analytic demo, not the policy stress test",
            ignored.join(", ")
        );
        stress_cosmos(cli, &reference)?;
        return Ok(true);
    }
    let cosmos_only: Vec<&str> = [
        ("--cosmos-prompt-embeds", cli.cosmos_prompt_embeds.is_some()),
        ("--cosmos-frames", cli.cosmos_frames.is_some()),
        ("--cosmos-guidance", cli.cosmos_guidance.is_some()),
    ]
    .into_iter()
    .filter_map(|(f, given)| given.then_some(f))
    .collect();
    anyhow::ensure!(cosmos_only.is_empty(), "{} apply to --world-model cosmos:REF", cosmos_only.join(", "));
    let (weights, policy) = match stress_inputs(cli)? {
        Ok(found) => found,
        Err(missing) => {
            println!(
                "policy stress test unavailable (missing {missing}): running the built-in analytic demo instead (see sampler/README.md)"
            );
            return Ok(false);
        }
    };
    let ignored = demo_only_flags(cli);
    anyhow::ensure!(
        ignored.is_empty(),
        "{} apply to the analytic demo, not the policy stress test (the default here); add --demo \
         (or -i params.json) to run the demo, or drop them. The stress test takes --seeds \
         --iterations --num-steps --lr --direction --solver --policy --world-model --device",
        ignored.join(", ")
    );
    // Arguments and the output directory before anything is loaded; then the inputs, each
    // checked; the directory is claimed only once they all are.
    let settings = stress_settings(cli)?;
    let out = stress_out_dir(cli, &settings)?;
    let device_spec = cli.device.as_deref().unwrap_or("cpu");
    let device = shared::device::parse_device(device_spec).with_context(|| format!("--device {device_spec}"))?;
    let model = sampler::world_model::WorldModel::load_dir(&weights, candle_core::DType::F32, &device)
        .with_context(|| format!("--world-model {}", weights.display()))?;
    settings.check(&model.cfg, &device)?;
    sampler::stress::load_policy(&policy, &device).with_context(|| format!("--policy {}", policy.display()))?;
    // The scenarios are read and checked before the directory is claimed.
    settings.scenarios.scenarios(settings.start_frame)?;
    let claimed = match &out {
        StressOut::Plain(out) => out.claim()?,
        StressOut::Dir(dir, mode) => shared::outputs::claim_dir(dir, "-o", *mode)?,
    };
    println!(
        "no -i params file: running the policy stress test (world model {}, policy {}) → {}",
        weights.display(),
        policy.display(),
        claimed.path().display()
    );
    let world = sampler::stress::EmbeddedWorld::new(&model, &device)?;
    sampler::stress::run_on(&world, &policy, &settings, &device, claimed.path(), |line| println!("{line}"))?;
    Ok(true)
}

fn main() -> anyhow::Result<()> {
    // Tensor buffers are allocated and freed per op: keep freed memory for reuse (measured in
    // shared::memory::keep_freed_memory).
    shared::memory::keep_freed_memory();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(Command::Cosmos(args)) = &cli.command {
        // Which flags the command line gave: they win over a params file's values.
        let mut args = args.as_ref().clone();
        if let Some(("cosmos", m)) = matches.subcommand() {
            sampler::cosmos::app::record_command_line(&mut args, m);
        }
        sampler::cosmos::app::run(&args, |line| println!("{line}"))?;
        return Ok(());
    }
    if let Some(Command::StressReport(args)) = &cli.command {
        return stress_report(args);
    }
    if cli.input.is_none() && !cli.demo && try_stress(&cli)? {
        return Ok(());
    }
    let ignored = stress_only_flags(&cli);
    anyhow::ensure!(
        ignored.is_empty(),
        "{} apply to the policy stress test, not the analytic demo{}; drop them",
        ignored.join(", "),
        if cli.input.is_some() || cli.demo { " (-i / --demo chose the demo)" } else { "" }
    );
    let text = match &cli.input {
        Some(path) => {
            Some(std::fs::read_to_string(path).with_context(|| format!("reading params file {}", path.display()))?)
        }
        None => None,
    };
    let name = cli.input.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let params = sampler::config::parse_params(text.as_deref().map(|t| (name.as_str(), t)), &cli.overrides()?)?;
    let out = shared::outputs::OutputDir::check(cli.out.as_deref(), Path::new(DEFAULT_OUT), cli.overwrite)?;
    let device = shared::device::parse_device(&params.device).context("opening the device")?;
    sampler::app::check_fits(&params, &device)?;
    let claimed = out.claim()?;
    if cli.input.is_none() {
        println!("no -i params file: running the built-in analytic demo (see sampler/README.md)");
    }
    println!("writing to {}", claimed.path().display());
    sampler::app::run_on(&params, &device, claimed.path(), |line| println!("{line}"))?;
    Ok(())
}
