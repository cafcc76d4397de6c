//! Solver orders against the closed-form Gaussian ODE, recomputation = full graph, finite
//! differences of ∇z0 and ∇ξ for every solver, noise modes, parameterisations, conditioning.

use candle_core::{DType, Device, Tensor, Var};
use sampler::denoiser::{
    uniform_sigma, ClassifierFreeGuidance, Conditioning, Denoiser, ExactNetwork, FrameReplace, GaussianDenoiser,
    MixtureDenoiser, Preconditioned,
};
use sampler::noise::{Churn, NoiseMode, NoiseState};
use sampler::objective::{LinearPolicy, Objective, PolicyObjective, TargetMse};
use sampler::optimize::{optimize, verify_gradient, Direction, OptimizeSettings};
use sampler::param::Parameterization;
use sampler::schedule::Schedule;
use sampler::solver::SolverKind;
use sampler::trajectory::{GradMode, Trajectory};
use shared::gradcheck::{check_gradients, GradCheckOptions};
use shared::params::OptimizerConfig;
use shared::rng::SplitMix64;

const SOLVERS: [SolverKind; 3] = [SolverKind::Euler, SolverKind::Res, SolverKind::Unipc];
const SHAPE: [usize; 5] = [1, 3, 2, 4, 4];

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

fn max_abs(a: &Tensor) -> f64 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

fn mixture() -> MixtureDenoiser {
    let patterns = sampler::demo::patterns(SHAPE[1], SHAPE[3], SHAPE[4], DType::F64, &Device::Cpu).unwrap();
    MixtureDenoiser { patterns, std: 0.4 }
}

fn target() -> TargetMse {
    let pats = sampler::demo::patterns(SHAPE[1], SHAPE[3], SHAPE[4], DType::F64, &Device::Cpu).unwrap();
    TargetMse { target: pats.get(0).unwrap().unsqueeze(0).unwrap().unsqueeze(2).unwrap(), label: "disc".into() }
}

/// Each solver's error at σ_N against the exact probability-flow ODE solution for Gaussian data,
/// as the number of steps doubles; the observed order is log2(e_N / e_2N).
#[test]
fn solvers_converge_at_expected_order() {
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(7);
    let den = GaussianDenoiser { mean: rng.normal_tensor(&SHAPE[..], DType::F64, &dev).unwrap(), std: 0.7 };
    let z0 = rng.normal_tensor(&SHAPE[..], DType::F64, &dev).unwrap();
    let cond = Conditioning::default();
    // Karras (ends at σ_min > 0): Euler 1, RES 2, UniPC 3 (UniP order 2 raised by one by the
    // UniC corrector). The flow schedule ends with a step to σ = 0, which every solver takes
    // as x ← D (first order locally, O(σ_{N−1}²) = O(N⁻²) globally), and its tail keeps a
    // constant ratio σ_{k}/σ_{k+1}, so it reaches its asymptotic order 2 only at large N.
    type Make = Box<dyn Fn(usize) -> Schedule>;
    let cases: [(&str, Make, Vec<usize>, [f64; 3]); 2] = [
        (
            "karras(σ 80 → 0.02, ρ 7)",
            Box::new(|n| Schedule::karras(n, 0.02, 80.0, 7.0).unwrap()),
            vec![10, 20, 40, 80, 160],
            [1.0, 2.0, 3.0],
        ),
        (
            "flow-shift(5) → 0",
            Box::new(|n| Schedule::flow_shift(n, 5.0).unwrap()),
            vec![160, 320, 640],
            [1.0, 1.8, 1.8],
        ),
    ];
    for (label, make, steps, expected_orders) in cases {
        for (kind, expected) in SOLVERS.into_iter().zip(expected_orders) {
            let solver = kind.build();
            let mut errors = Vec::new();
            for &n in &steps {
                let schedule = make(n);
                let plan = Churn::default().plan(&schedule.sigmas, false);
                let traj = Trajectory { denoiser: &den, solver: solver.as_ref(), cond: &cond, schedule, plan };
                let mut ck = sampler::trajectory::Checkpoints { xs: vec![], states: vec![] };
                traj.run(&z0, &vec![None; n], Some(&mut ck)).unwrap();
                let x_last = ck.xs.last().unwrap();
                let exact = den
                    .exact_ode(&traj.start(&z0).unwrap(), traj.schedule.sigma_start(), traj.schedule.sigma_end())
                    .unwrap();
                errors.push(max_abs_diff(x_last, &exact));
            }
            let orders: Vec<f64> = errors.windows(2).map(|e| (e[0] / e[1]).log2()).collect();
            println!(
                "{label:>26} {:>6} N {steps:?}: errors {:?}  observed orders {:?} (expected {expected})",
                solver.name(),
                errors.iter().map(|e| format!("{e:.2e}")).collect::<Vec<_>>(),
                orders.iter().map(|o| format!("{o:.2}")).collect::<Vec<_>>()
            );
            let last = *orders.last().unwrap();
            assert!(
                last > expected - 0.2,
                "{} on {label}: observed order {last:.2} < expected {expected}",
                solver.name()
            );
            assert!(errors.windows(2).all(|e| e[1] < e[0]), "{}: errors must fall as steps double", solver.name());
        }
    }
}

struct Case {
    mode: NoiseMode,
    kind: SolverKind,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for kind in SOLVERS {
        for mode in [NoiseMode::Ode, NoiseMode::SdeLearnable, NoiseMode::SdeFromZ0] {
            out.push(Case { mode, kind });
        }
    }
    out
}

/// Churn with η at its cap on the middle of the schedule, so some steps inject and some do not.
fn churn() -> Churn {
    Churn { s_churn: 100.0, s_tmin: 0.05, s_tmax: 50.0, s_noise: 1.0 }
}

#[test]
fn recompute_gradient_equals_full_graph() {
    let dev = Device::Cpu;
    let den = mixture();
    let obj = target();
    let cond = Conditioning::default();
    for case in cases() {
        let solver = case.kind.build();
        let schedule = Schedule::karras(8, 0.01, 80.0, 7.0).unwrap();
        let plan = churn().plan(&schedule.sigmas, case.mode.injects());
        let noise = NoiseState::draw(3, &SHAPE, &plan, case.mode, true, DType::F64, &dev).unwrap();
        let traj = Trajectory { denoiser: &den, solver: solver.as_ref(), cond: &cond, schedule, plan };
        // In sde-from-z0 both backwards take the total derivative through ξ_i = Q_i z0: the
        // recomputation adds Q_iᵀ ∂L/∂ξ_i step by step, the full graph differentiates the gather.
        let a = traj.value_and_grad_state(&noise, &obj, GradMode::Recompute).unwrap();
        let b = traj.value_and_grad_state(&noise, &obj, GradMode::FullGraph).unwrap();
        let scale = max_abs(&b.grad_z0);
        let dz = max_abs_diff(&a.grad_z0, &b.grad_z0) / scale;
        let mut dxi: f64 = 0.0;
        let mut injected = 0;
        for (ga, gb) in a.grad_steps.iter().zip(&b.grad_steps) {
            match (ga, gb) {
                (Some(ga), Some(gb)) => {
                    injected += 1;
                    dxi = dxi.max(max_abs_diff(ga, gb) / max_abs(gb).max(1e-300));
                }
                (None, None) => {}
                _ => panic!("one backward has a step-noise gradient the other lacks"),
            }
        }
        println!(
            "{:>6} {:?}: loss {:.6} vs {:.6}; max |Δ∇z0|/max|∇z0| {dz:.2e}; step noises {injected}, max rel Δ {dxi:.2e}",
            solver.name(),
            case.mode,
            a.loss,
            b.loss
        );
        assert!(scale > 0.0 && (a.loss - b.loss).abs() < 1e-12 && dz < 1e-10 && dxi < 1e-10);
        if case.mode.injects() {
            assert!(injected > 0 && injected < 8, "churn window should cover some but not all steps: {injected}");
        }
    }
}

/// Finite differences of the recomputation gradient (z0 and, in sde-learnable, every step
/// noise; in sde-from-z0 z0 alone, which moves every ξ_i = Q_i z0 with it) and of the
/// full-graph gradient, for every solver.
#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let den = mixture();
    let obj = target();
    let cond = Conditioning::default();
    let opts = GradCheckOptions { eps: 1e-6, directions: 2, seed: 11, floor: 1e-12 };
    for case in cases() {
        let solver = case.kind.build();
        let schedule = Schedule::karras(6, 0.01, 80.0, 7.0).unwrap();
        let plan = churn().plan(&schedule.sigmas, case.mode.injects());
        let noise = NoiseState::draw(5, &SHAPE, &plan, case.mode, true, DType::F64, &dev).unwrap();
        let traj = Trajectory { denoiser: &den, solver: solver.as_ref(), cond: &cond, schedule, plan };
        let report = verify_gradient(&traj, &noise, &obj, GradMode::Recompute, &opts).unwrap();
        assert!(report.vars_without_grad().is_empty());
        // The full graph, checked directly.
        let vars = noise.learnable();
        let full = check_gradients(
            &vars,
            || {
                let (z0, steps) = noise.tensors();
                obj.loss(&traj.run(&z0, &steps, None)?)
            },
            &opts,
        )
        .unwrap();
        println!(
            "{:>6} {:?} ({} learned tensors): recompute rel err {:.2e}, full graph rel err {:.2e}",
            solver.name(),
            case.mode,
            vars.len(),
            report.max_rel_error(),
            full.max_rel_error()
        );
        report.assert_close(1e-4, "recomputation gradient").unwrap();
        full.assert_close(1e-4, "full-graph gradient").unwrap();
        match case.mode {
            NoiseMode::SdeLearnable => assert!(vars.len() > 1),
            // z0 is the only learned tensor; the full-graph closure above runs on
            // `noise.tensors()`, whose ξ_i are formed from z0's Var, so it differentiates
            // through them.
            NoiseMode::SdeFromZ0 => assert_eq!(vars.len(), 1),
            _ => {}
        }
    }
}

/// The whole wrapper stack a world model will use: a raw network in EDM and rectified-flow
/// parameterisations, CFG and frame replacement.
#[test]
fn wrapped_denoisers_round_trip_and_differentiate() {
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(9);
    let x = (rng.normal_tensor(&SHAPE[..], DType::F64, &dev).unwrap() * 3.0).unwrap();
    for param in [
        Parameterization::Edm { sigma_data: 0.5 },
        Parameterization::RectifiedFlow,
        Parameterization::Epsilon,
        Parameterization::X0,
    ] {
        let wrapped = Preconditioned { net: ExactNetwork { denoiser: mixture(), param }, param };
        for sigma in [0.01, 0.7, 20.0] {
            let s = uniform_sigma(&x, sigma).unwrap();
            let a = wrapped.denoise(&x, &s, &Conditioning::default()).unwrap();
            let b = mixture().denoise(&x, &s, &Conditioning::default()).unwrap();
            assert!(max_abs_diff(&a, &b) < 1e-9, "{param:?} at σ {sigma}: {}", max_abs_diff(&a, &b));
        }
    }
    // Frame replacement + CFG over a rectified-flow network, UniPC on the flow schedule.
    let param = Parameterization::RectifiedFlow;
    let pats = sampler::demo::patterns(SHAPE[1], SHAPE[3], SHAPE[4], DType::F64, &dev).unwrap();
    let den = FrameReplace {
        inner: ClassifierFreeGuidance {
            inner: Preconditioned { net: ExactNetwork { denoiser: mixture(), param }, param },
            scale: 1.5,
            uncond_context: None,
        },
        condition_sigma: Some(0.001),
    };
    let clean = pats
        .get(1)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .unsqueeze(2)
        .unwrap()
        .broadcast_as(&SHAPE[..])
        .unwrap()
        .contiguous()
        .unwrap();
    let mut cond = Conditioning::frame_replace(&clean, 1).unwrap();
    cond.context = Some(Tensor::new(&[0.0f64, -3.0, -3.0, -3.0], &dev).unwrap());
    let obj = target();
    let solver = SolverKind::Unipc.build();
    let schedule = Schedule::flow_shift(6, 5.0).unwrap();
    let plan = churn().plan(&schedule.sigmas, true);
    let noise = NoiseState::draw(1, &SHAPE, &plan, NoiseMode::SdeLearnable, true, DType::F64, &dev).unwrap();
    let traj = Trajectory { denoiser: &den, solver: solver.as_ref(), cond: &cond, schedule, plan };
    let (z0, steps) = noise.tensors();
    let out = traj.sample(&z0, &steps).unwrap();
    let first = out.narrow(2, 0, 1).unwrap();
    assert!(
        max_abs_diff(&first, &clean.narrow(2, 0, 1).unwrap()) < 1e-12,
        "condition frame must be the clean condition"
    );
    let opts = GradCheckOptions { eps: 1e-6, directions: 2, seed: 2, floor: 1e-12 };
    let report = verify_gradient(&traj, &noise, &obj, GradMode::Recompute, &opts).unwrap();
    println!("frame-replace + CFG + rectified flow + UniPC: rel err {:.2e}", report.max_rel_error());
    report.assert_close(1e-4, "wrapped stack").unwrap();
}

fn run_mode(mode: NoiseMode, iterations: usize) -> (Tensor, Tensor, Vec<Option<Tensor>>, Vec<Option<Tensor>>) {
    let dev = Device::Cpu;
    let den = mixture();
    let obj = target();
    let cond = Conditioning::default();
    let solver = SolverKind::Res.build();
    let schedule = Schedule::karras(8, 0.01, 80.0, 7.0).unwrap();
    let plan = churn().plan(&schedule.sigmas, mode.injects());
    let noise = NoiseState::draw(4, &SHAPE, &plan, mode, true, DType::F64, &dev).unwrap();
    let before_noise = noise.tensors().1.iter().map(|t| t.as_ref().map(|t| t.copy().unwrap())).collect();
    let traj = Trajectory { denoiser: &den, solver: solver.as_ref(), cond: &cond, schedule, plan };
    let settings = OptimizeSettings {
        iterations,
        optimizer: OptimizerConfig::adam(0.1),
        direction: Direction::Descent,
        grad_clip: None,
        chi_reg: 0.0,
        grad_mode: GradMode::Recompute,
        constraint: Default::default(),
    };
    let out = optimize(&traj, &noise, &obj, &settings, |_| {}).unwrap();
    (out.initial_output, out.final_output, before_noise, noise.tensors().1)
}

/// With injection on, ode / sde / sde-learnable give different outputs: sde differs from ode
/// from the start; sde-learnable starts equal to sde (same seeded noises) and parts from it
/// once its step noises are optimised, while sde's noises stay fixed.
#[test]
fn noise_modes_differ() {
    let (ode0, ode1, _, _) = run_mode(NoiseMode::Ode, 3);
    let (sde0, sde1, sde_xi0, sde_xi1) = run_mode(NoiseMode::Sde, 3);
    let (lrn0, lrn1, lrn_xi0, lrn_xi1) = run_mode(NoiseMode::SdeLearnable, 3);
    let d_ode_sde = max_abs_diff(&ode0, &sde0);
    let d_sde_lrn_start = max_abs_diff(&sde0, &lrn0);
    let d_sde_lrn_end = max_abs_diff(&sde1, &lrn1);
    let d_ode_lrn_end = max_abs_diff(&ode1, &lrn1);
    let xi_moved = |a: &[Option<Tensor>], b: &[Option<Tensor>]| {
        a.iter().zip(b).filter_map(|(a, b)| Some(max_abs_diff(a.as_ref()?, b.as_ref()?))).fold(0.0, f64::max)
    };
    println!(
        "max |Δ| ode vs sde (start) {d_ode_sde:.3e}; sde vs learnable start {d_sde_lrn_start:.1e}, after 3 its {d_sde_lrn_end:.3e}; ode vs learnable {d_ode_lrn_end:.3e}; ξ moved: sde {:.1e}, learnable {:.3e}",
        xi_moved(&sde_xi0, &sde_xi1),
        xi_moved(&lrn_xi0, &lrn_xi1)
    );
    assert!(d_ode_sde > 1e-3 && d_sde_lrn_end > 1e-3 && d_ode_lrn_end > 1e-3);
    assert!(d_sde_lrn_start < 1e-12);
    assert_eq!(xi_moved(&sde_xi0, &sde_xi1), 0.0);
    assert!(xi_moved(&lrn_xi0, &lrn_xi1) > 1e-3);
}

/// The policy-objective hook: a frozen linear policy reading the generated frames.
#[test]
fn policy_objective_gradient() {
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(21);
    let dim: usize = SHAPE.iter().skip(1).product();
    let policy = LinearPolicy { weight: (rng.normal_tensor((2, dim), DType::F64, &dev).unwrap() * 0.1).unwrap() };
    let obj = PolicyObjective { policy, reference_actions: Tensor::new(&[[0.5f64, -0.5]], &dev).unwrap() };
    let den = mixture();
    let cond = Conditioning::default();
    let solver = SolverKind::Res.build();
    let schedule = Schedule::karras(5, 0.01, 80.0, 7.0).unwrap();
    let plan = churn().plan(&schedule.sigmas, false);
    let noise = NoiseState::draw(8, &SHAPE, &plan, NoiseMode::Ode, true, DType::F64, &dev).unwrap();
    let traj = Trajectory { denoiser: &den, solver: solver.as_ref(), cond: &cond, schedule, plan };
    let opts = GradCheckOptions { eps: 1e-6, directions: 2, seed: 3, floor: 1e-12 };
    let report = verify_gradient(&traj, &noise, &obj, GradMode::Recompute, &opts).unwrap();
    println!("policy objective: rel err {:.2e} ({})", report.max_rel_error(), obj.describe());
    report.assert_close(1e-4, "policy objective").unwrap();
}

#[test]
fn optimisation_moves_the_loss_in_the_asked_direction_and_chi_reg_is_exact() {
    for (direction, chi) in [(Direction::Descent, 0.0), (Direction::Ascent, 0.01)] {
        let dev = Device::Cpu;
        let den = mixture();
        let obj = target();
        let cond = Conditioning::default();
        let solver = SolverKind::Euler.build();
        let schedule = Schedule::karras(6, 0.01, 80.0, 7.0).unwrap();
        let plan = churn().plan(&schedule.sigmas, false);
        let noise = NoiseState::draw(2, &SHAPE, &plan, NoiseMode::Ode, true, DType::F64, &dev).unwrap();
        let traj = Trajectory { denoiser: &den, solver: solver.as_ref(), cond: &cond, schedule, plan };
        let settings = OptimizeSettings {
            iterations: 8,
            optimizer: OptimizerConfig::adam(0.05),
            direction,
            grad_clip: Some(1.0),
            chi_reg: chi,
            grad_mode: GradMode::Recompute,
            constraint: Default::default(),
        };
        let out = optimize(&traj, &noise, &obj, &settings, |_| {}).unwrap();
        println!("{direction:?}: loss {:.4} → {:.4}", out.initial_loss, out.final_loss);
        match direction {
            Direction::Descent => assert!(out.final_loss < out.initial_loss),
            Direction::Ascent => assert!(out.final_loss > out.initial_loss),
        }
        assert!(out.records.iter().all(|r| r.grad_z0.reached()));
    }
    // The χ regulariser's closed-form gradient against finite differences.
    let z = Var::from_tensor(&SplitMix64::new(1).normal_tensor(50, DType::F64, &Device::Cpu).unwrap()).unwrap();
    let report = check_gradients(
        &[("z", z.clone())],
        || {
            let (v, g) = sampler::optimize::chi_regulariser(z.as_tensor())?;
            let t = z.as_tensor();
            Tensor::new(v, &Device::Cpu)? + ((t - t.detach())? * g)?.sum_all()?
        },
        &GradCheckOptions::default(),
    )
    .unwrap();
    report.assert_close(1e-6, "χ regulariser").unwrap();
}

/// The CLI's run end to end on a small setup: the files exist, the loss fell, the check passed.
#[test]
fn app_run_writes_report_frames_and_measured_figures() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"{"num_steps": 6, "noise_steps": 4, "height": 8, "width": 8, "frames": 2, "noise_mode": "sde-learnable", "s_churn": 10, "condition_frames": 1, "chi_reg": 0.001, "grad_clip": 10}"#;
    let params = sampler::config::parse_params(Some(("params.json", text)), &Default::default()).unwrap();
    let mut lines = Vec::new();
    let summary = sampler::app::run(&params, dir.path(), |l| lines.push(l.to_string())).unwrap();
    for f in ["before.png", "before.gif", "after.png", "after.gif", "before_after.png", "report.json", "metrics.jsonl"]
    {
        assert!(dir.path().join(f).metadata().unwrap().len() > 0, "{f} missing");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["iterations"].as_array().unwrap().len(), 4);
    assert!(summary.final_loss < summary.initial_loss, "{} → {}", summary.initial_loss, summary.final_loss);
    assert!(summary.gradcheck_rel_error.unwrap() < 1e-4);
    assert!(
        lines.iter().any(|l| l.starts_with("gradient reached z0"))
            && lines.iter().any(|l| l.starts_with("step 4/4 done"))
    );
}
