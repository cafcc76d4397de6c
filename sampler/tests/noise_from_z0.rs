//! `sde-from-z0` (the source's `LEARNABLE_STEP_NOISE=1`): ξ_i = Q_i z0 with Q_i a seeded signed
//! permutation. The map is orthogonal and exactly norm-preserving, differs between steps and
//! seeds and repeats for a seed; for z0 ~ N(0, I) the ξ_i are standard normal and uncorrelated
//! with z0 and with each other; ∇z0 includes every ξ_i's path; optimising z0 moves every ξ_i.
//! (Recompute = full graph and finite differences per solver: `tests/trajectory.rs`.)

use candle_core::{DType, Device, Tensor};
use sampler::denoiser::{Conditioning, MixtureDenoiser};
use sampler::noise::{Churn, NoiseMode, NoiseState, SignedPermutation, StepNoiseFromZ0};
use sampler::objective::TargetMse;
use sampler::optimize::{optimize, Direction, OptimizeSettings};
use sampler::schedule::Schedule;
use sampler::solver::SolverKind;
use sampler::trajectory::{GradMode, Trajectory};
use shared::params::OptimizerConfig;
use shared::rng::SplitMix64;

const SHAPE: [usize; 5] = [1, 3, 2, 4, 4];

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

fn mixture() -> MixtureDenoiser {
    let patterns = sampler::demo::patterns(SHAPE[1], SHAPE[3], SHAPE[4], DType::F64, &Device::Cpu).unwrap();
    MixtureDenoiser { patterns, std: 0.4 }
}

fn target() -> TargetMse {
    let pats = sampler::demo::patterns(SHAPE[1], SHAPE[3], SHAPE[4], DType::F64, &Device::Cpu).unwrap();
    TargetMse { target: pats.get(0).unwrap().unsqueeze(0).unwrap().unsqueeze(2).unwrap(), label: "disc".into() }
}

/// Churn with η at its cap on the middle of the schedule (as in tests/trajectory.rs).
fn churn() -> Churn {
    Churn { s_churn: 100.0, s_tmin: 0.05, s_tmax: 50.0, s_noise: 1.0 }
}

/// The dense matrix of Q (column j = Q e_j), built by applying Q to the identity's rows, is a
/// signed permutation matrix — one ±1 in every row and column, zeros elsewhere — so QᵀQ = I;
/// `apply_transpose` is its transpose. On a large odd length with several samples, norms and
/// inner products are preserved to f64 rounding, and the entries are those of x, moved and
/// sign-flipped (bit for bit), in f64 and f32.
#[test]
fn signed_permutation_is_orthogonal_and_preserves_norms_exactly() {
    let dev = Device::Cpu;
    let mut rng = SplitMix64::new(31);
    for n in [1usize, 2, 7, 96] {
        let q = SignedPermutation::seeded(1000 + n as u64, n).unwrap();
        let eye = Tensor::eye(n, DType::F64, &dev).unwrap();
        // Row j of `cols` is Q e_j: the matrix M is its transpose.
        let cols: Vec<Vec<f64>> = q.apply(&eye).unwrap().to_vec2().unwrap();
        let m = |r: usize, c: usize| cols[c][r];
        for r in 0..n {
            let row: Vec<f64> = (0..n).map(|c| m(r, c)).collect();
            assert_eq!(row.iter().filter(|v| **v != 0.0).count(), 1, "n {n}: row {r} of Q is {row:?}");
            assert!(row.iter().all(|v| *v == 0.0 || v.abs() == 1.0));
        }
        for col in &cols {
            assert_eq!(col.iter().filter(|v| **v != 0.0).count(), 1, "n {n}: a column of Q is {col:?}");
        }
        for a in 0..n {
            for b in 0..n {
                let qtq: f64 = (0..n).map(|r| m(r, a) * m(r, b)).sum();
                assert_eq!(qtq, if a == b { 1.0 } else { 0.0 }, "n {n}: (QᵀQ)[{a},{b}]");
            }
        }
        // Qᵀ g against the dense transpose (sums of one ±g and zeros: exact).
        let g = rng.normal_tensor((2, n), DType::F64, &dev).unwrap();
        let got = q.apply_transpose(&g).unwrap().to_vec2::<f64>().unwrap();
        let g = g.to_vec2::<f64>().unwrap();
        for (got_row, g_row) in got.iter().zip(&g) {
            let want: Vec<f64> = (0..n).map(|c| (0..n).map(|r| m(r, c) * g_row[r]).sum()).collect();
            assert_eq!(got_row, &want, "n {n}: Qᵀg");
        }
    }

    // Large, odd (prime) length, 3 samples sharing the map.
    let n = 100_003;
    let q = SignedPermutation::seeded(7, n).unwrap();
    let x = rng.normal_tensor((3, n), DType::F64, &dev).unwrap();
    let y = rng.normal_tensor((3, n), DType::F64, &dev).unwrap();
    let (qx, qy) = (q.apply(&x).unwrap(), q.apply(&y).unwrap());
    assert_eq!(f64s(&q.apply_transpose(&qx).unwrap()), f64s(&x), "QᵀQx = x bit for bit");
    for s in 0..3 {
        let row = |t: &Tensor| f64s(&t.get(s).unwrap());
        let (xs, ys, qxs, qys) = (row(&x), row(&y), row(&qx), row(&qy));
        // The same multiset of |entries|: nothing is computed, only moved and sign-flipped.
        let sorted_abs = |v: &[f64]| {
            let mut a: Vec<f64> = v.iter().map(|x| x.abs()).collect();
            a.sort_by(f64::total_cmp);
            a
        };
        assert_eq!(sorted_abs(&qxs), sorted_abs(&xs));
        // Norms and inner products: equal up to the summation order's rounding. Bound 1e-13
        // relative (a worst case for 1e5 terms is ~1e-11; measured ≤ 1e-14).
        let dn = (norm(&qxs) / norm(&xs) - 1.0).abs();
        let dip = (dot(&qxs, &qys) - dot(&xs, &ys)).abs() / (norm(&xs) * norm(&ys));
        println!("sample {s}: |‖Qx‖/‖x‖ − 1| = {dn:.1e}, |⟨Qx,Qy⟩ − ⟨x,y⟩|/(‖x‖‖y‖) = {dip:.1e}");
        assert!(dn <= 1e-13 && dip <= 1e-13);
    }
    // f32: the same entries, exactly (no rounding in a gather and a sign flip).
    let x32 = x.to_dtype(DType::F32).unwrap();
    let q32 = q.apply(&x32).unwrap();
    assert_eq!(q32.dtype(), DType::F32);
    assert_eq!(f64s(&q32), f64s(&qx.to_dtype(DType::F32).unwrap()));
}

/// Fisher–Yates with an unbiased bounded draw makes every permutation equally likely, and the
/// signs are fair: 24 000 maps of 3 entries, each of the 6 permutations counted against
/// 4 000 ± 5 standard errors (SE = √(N·p(1−p)) = 57.7; the classic biased shuffle — j drawn
/// from all n positions — gives counts 3 556 / 4 444, 7.7 SE off), each sign against
/// N·3/2 ± 5·√(N·3/4).
#[test]
fn permutations_are_uniform_and_signs_fair() {
    let draws = 24_000usize;
    let mut counts = std::collections::HashMap::<Vec<u32>, usize>::new();
    let mut negative = 0usize;
    for seed in 0..draws as u64 {
        let q = SignedPermutation::seeded(seed, 3).unwrap();
        negative += q.signs.iter().filter(|s| **s < 0.0).count();
        *counts.entry(q.perm).or_default() += 1;
    }
    assert_eq!(counts.len(), 6);
    let p = 1.0 / 6.0;
    let se = (draws as f64 * p * (1.0 - p)).sqrt();
    for (perm, c) in &counts {
        let z = (*c as f64 - draws as f64 * p) / se;
        println!("π = {perm:?}: {c} ({z:+.2} SE)");
        assert!(z.abs() < 5.0, "π = {perm:?} drawn {c} times of {draws} ({z:+.2} SE)");
    }
    let signs = 3.0 * draws as f64;
    let z = (negative as f64 - signs / 2.0) / (signs / 4.0).sqrt();
    println!("negative signs: {negative} of {signs} ({z:+.2} SE)");
    assert!(z.abs() < 5.0);
}

/// Q_i differs between steps and between seeds, and is a pure function of (seed, i, n):
/// drawing the same seed twice gives the same ξ_i bit for bit. Between two independent
/// uniform signed permutations of n entries an entry agrees (same source, same sign) with
/// probability 1/(2n), so the agreements are ≈ Poisson(1/2); the bound 8 is ~1e-8 likely.
#[test]
fn maps_differ_between_steps_and_seeds_and_repeat_for_a_seed() {
    let plan = churn().plan(&Schedule::karras(8, 0.01, 80.0, 7.0).unwrap().sigmas, true);
    let map = StepNoiseFromZ0::new(5, &plan);
    let injecting: Vec<usize> = (0..map.num_steps()).filter(|&i| map.injects[i]).collect();
    assert!(injecting.len() >= 3, "churn window {:?}", map.injects);
    let shape = [2usize, 3, 2, 8, 8];
    let n = StepNoiseFromZ0::sample_len(&shape);
    assert_eq!(n, 384, "Q acts on one sample, the dims after the batch dim");
    let agreements = |a: &SignedPermutation, b: &SignedPermutation| {
        (0..a.len()).filter(|&k| a.perm[k] == b.perm[k] && a.signs[k] == b.signs[k]).count()
    };
    let maps: Vec<SignedPermutation> = (0..map.num_steps()).map(|i| map.map(i, &shape).unwrap()).collect();
    for i in 0..maps.len() {
        for j in i + 1..maps.len() {
            let a = agreements(&maps[i], &maps[j]);
            assert!(a <= 8, "Q_{i} and Q_{j} agree on {a} of {n} entries");
        }
        // Q_i is not the identity either (a uniform permutation's fixed points ≈ Poisson(1)).
        let fixed = (0..n).filter(|&k| maps[i].perm[k] as usize == k).count();
        assert!(fixed <= 8, "Q_{i} has {fixed} fixed points");
    }
    let other_seed = StepNoiseFromZ0::new(6, &plan);
    for (i, q) in maps.iter().enumerate() {
        let a = agreements(q, &other_seed.map(i, &shape).unwrap());
        assert!(a <= 8, "seeds 5 and 6 give Q_{i}s that agree on {a} of {n} entries");
        assert_eq!(q, &StepNoiseFromZ0::new(5, &plan).map(i, &shape).unwrap(), "Q_{i} repeats for a seed");
    }

    // The same seed gives the same ξ_i (and z0); a different seed other ones. Every sample of
    // the batch gets the same map: ξ_i of sample b is Q_i applied to z0 of sample b alone.
    let dev = Device::Cpu;
    let draw = |seed| NoiseState::draw(seed, &shape, &plan, NoiseMode::SdeFromZ0, true, DType::F64, &dev).unwrap();
    let (a, b, c) = (draw(9), draw(9), draw(10));
    let (za, xa) = a.values().unwrap();
    let (zb, xb) = b.values().unwrap();
    let (_, xc) = c.values().unwrap();
    assert_eq!(f64s(&za), f64s(&zb));
    let mut formed = 0;
    for (i, ((xa, xb), xc)) in xa.iter().zip(&xb).zip(&xc).enumerate() {
        assert_eq!(xa.is_some(), map.injects[i], "ξ_{i} is formed exactly where step {i} injects");
        if let (Some(xa), Some(xb), Some(xc)) = (xa, xb, xc) {
            formed += 1;
            assert_eq!(f64s(xa), f64s(xb), "ξ_{i} for the same seed");
            assert_ne!(f64s(xa), f64s(xc), "ξ_{i} for another seed");
            let q = StepNoiseFromZ0::new(9, &plan).map(i, &shape).unwrap();
            for s in 0..shape[0] {
                let alone = q.apply(&za.get(s).unwrap().unsqueeze(0).unwrap()).unwrap();
                assert_eq!(f64s(&xa.get(s).unwrap()), f64s(&alone), "ξ_{i} of sample {s}");
            }
        }
    }
    assert_eq!(formed, injecting.len());
    assert!(a.learnable().len() == 1 && a.learnable()[0].0 == "z0", "z0 is the only learned tensor");
}

/// For z0 ~ N(0, I) (n = 400 000 entries) and 6 steps' ξ_i: each ξ_i has mean 0 (SE 1/√n)
/// and variance 1 (SE √(2/n)); its correlation with z0 and with every other ξ_j is 0, and so
/// is the correlation of the squares ξ_i², z0² (SE 1/√n each: the terms are products of
/// distinct independent entries except at the map's ~1 fixed point) — a sign flip alone
/// (ξ = s ⊙ z0) would be uncorrelated yet give a squares correlation of 1, an identity or a
/// repeated map a correlation of 1. Every statistic must lie within 5 SE.
#[test]
fn step_noises_of_gaussian_z0_are_standard_normal_and_uncorrelated() {
    let n = 400_000usize;
    let dev = Device::Cpu;
    let map = StepNoiseFromZ0 { seed: 123, injects: vec![true; 6] };
    let z0 = SplitMix64::new(77).normal_tensor((1, n), DType::F64, &dev).unwrap();
    let z: Vec<f64> = f64s(&z0);
    let xis: Vec<Vec<f64>> = map.noises(&z0).unwrap().iter().map(|x| f64s(x.as_ref().unwrap())).collect();
    let nf = n as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / nf;
    let corr = |a: &[f64], b: &[f64]| {
        let (ma, mb) = (mean(a), mean(b));
        let cov = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum::<f64>() / nf;
        let va = a.iter().map(|x| (x - ma).powi(2)).sum::<f64>() / nf;
        let vb = b.iter().map(|y| (y - mb).powi(2)).sum::<f64>() / nf;
        cov / (va * vb).sqrt()
    };
    let sq = |v: &[f64]| v.iter().map(|x| x * x).collect::<Vec<f64>>();
    let se = 1.0 / nf.sqrt();
    let mut worst: f64 = 0.0;
    let mut check = |what: String, value: f64, expected: f64, se: f64| {
        let z = (value - expected) / se;
        worst = worst.max(z.abs());
        assert!(z.abs() < 5.0, "{what} = {value:.5} (expected {expected}, {z:+.2} SE)");
    };
    for (i, xi) in xis.iter().enumerate() {
        let m = mean(xi);
        let var = xi.iter().map(|x| (x - m).powi(2)).sum::<f64>() / nf;
        check(format!("mean ξ_{i}"), m, 0.0, se);
        check(format!("var ξ_{i}"), var, 1.0, (2.0 / nf).sqrt());
        check(format!("corr(ξ_{i}, z0)"), corr(xi, &z), 0.0, se);
        check(format!("corr(ξ_{i}², z0²)"), corr(&sq(xi), &sq(&z)), 0.0, se);
        for (j, xj) in xis.iter().enumerate().skip(i + 1) {
            check(format!("corr(ξ_{i}, ξ_{j})"), corr(xi, xj), 0.0, se);
            check(format!("corr(ξ_{i}², ξ_{j}²)"), corr(&sq(xi), &sq(xj)), 0.0, se);
        }
    }
    println!("6 step noises of N(0, I_{n}): every mean, variance and correlation within {worst:.2} SE");
}

/// ∇z0 in sde-from-z0 is the total derivative: its difference from the gradient that holds
/// every ξ_i fixed is Σ_i Q_iᵀ ∂L/∂ξ_i, a sizeable part of it (so the finite-difference checks
/// in tests/trajectory.rs, at 1e-4, would fail without those paths), and every injecting
/// step's ∂L/∂ξ_i is non-zero. Checked for every solver, both backwards.
#[test]
fn gradient_of_z0_includes_every_step_noise_path() {
    let dev = Device::Cpu;
    let (den, obj, cond) = (mixture(), target(), Conditioning::default());
    for kind in [SolverKind::Euler, SolverKind::Res, SolverKind::Unipc] {
        let solver = kind.build();
        let schedule = Schedule::karras(8, 0.01, 80.0, 7.0).unwrap();
        let plan = churn().plan(&schedule.sigmas, true);
        let noise = NoiseState::draw(3, &SHAPE, &plan, NoiseMode::SdeFromZ0, true, DType::F64, &dev).unwrap();
        let traj = Trajectory { denoiser: &den, solver: solver.as_ref(), cond: &cond, schedule, plan };
        let (z0, steps) = noise.values().unwrap();
        let map = noise.from_z0.as_ref().unwrap();
        for mode in [GradMode::Recompute, GradMode::FullGraph] {
            let total = traj.value_and_grad_from_z0(&z0, map, &obj, mode).unwrap();
            let held = traj.value_and_grad(&z0, &steps, &obj, mode).unwrap();
            assert_eq!(total.loss, held.loss, "the same trajectory");
            let via = f64s(&(&total.grad_z0 - &held.grad_z0).unwrap());
            // Σ_i Q_iᵀ ∂L/∂ξ_i from the dense rows of each Q_i (column j = Q e_j).
            let mut want = vec![0.0; via.len()];
            let mut per_step = Vec::new();
            for (i, g) in held.grad_steps.iter().enumerate() {
                let Some(g) = g else { continue };
                let g = f64s(g);
                per_step.push(norm(&g));
                let q = map.map(i, z0.dims()).unwrap();
                for (k, (&p, &s)) in q.perm.iter().zip(&q.signs).enumerate() {
                    want[p as usize] += s as f64 * g[k];
                }
            }
            let diff = via.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            let share = norm(&via) / norm(&f64s(&total.grad_z0));
            println!(
                "{:>6} {mode:?}: ‖Σ Q_iᵀ∂L/∂ξ_i‖/‖∇z0‖ = {share:.3}, max |Δ| vs dense Qᵀ {diff:.1e}, ‖∂L/∂ξ_i‖ {:?}",
                solver.name(),
                per_step.iter().map(|v| format!("{v:.2e}")).collect::<Vec<_>>()
            );
            // Summation order differs from the backward's: 1e-12 of the gradient's scale.
            assert!(diff <= 1e-12 * norm(&want), "{diff}");
            assert!(share > 0.05, "the step-noise paths carry {share:.3} of ∇z0");
            assert_eq!(per_step.len(), map.injects.iter().filter(|b| **b).count());
            assert!(per_step.iter().all(|v| *v > 0.0));
        }
    }
}

/// Optimising in sde-from-z0 learns z0 alone and moves every ξ_i with it (ξ_i stays Q_i z0,
/// bit for bit); the loss falls; the output differs from sde's (independent fixed draws).
#[test]
fn optimising_z0_moves_every_step_noise_with_it() {
    let dev = Device::Cpu;
    let (den, obj, cond) = (mixture(), target(), Conditioning::default());
    let solver = SolverKind::Res.build();
    let schedule = Schedule::karras(8, 0.01, 80.0, 7.0).unwrap();
    let plan = churn().plan(&schedule.sigmas, true);
    let traj = Trajectory { denoiser: &den, solver: solver.as_ref(), cond: &cond, schedule, plan: plan.clone() };
    let settings = OptimizeSettings {
        iterations: 4,
        optimizer: OptimizerConfig::adam(0.1),
        direction: Direction::Descent,
        grad_clip: None,
        chi_reg: 0.0,
        grad_mode: GradMode::Recompute,
        constraint: Default::default(),
    };
    let noise = NoiseState::draw(4, &SHAPE, &plan, NoiseMode::SdeFromZ0, true, DType::F64, &dev).unwrap();
    let names: Vec<String> = noise.learnable().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["z0"]);
    let before: Vec<Option<Vec<f64>>> = noise.values().unwrap().1.iter().map(|x| x.as_ref().map(f64s)).collect();
    let out = optimize(&traj, &noise, &obj, &settings, |_| {}).unwrap();
    let (z0, after) = noise.values().unwrap();
    let map = noise.from_z0.as_ref().unwrap();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let (Some(b), Some(a)) = (b, a) else {
            assert!(b.is_none() && a.is_none());
            continue;
        };
        let a = f64s(a);
        assert_eq!(a, f64s(&map.map(i, z0.dims()).unwrap().apply(&z0).unwrap()), "ξ_{i} = Q_{i} z0");
        let moved = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(moved > 1e-3, "ξ_{i} moved {moved:.1e}");
    }
    println!("sde-from-z0: loss {:.5} → {:.5}", out.initial_loss, out.final_loss);
    assert!(out.final_loss < out.initial_loss);
    // The sample from the final state is the optimiser's final output.
    let again = traj.sample_state(&noise).unwrap();
    assert_eq!(f64s(&again), f64s(&out.final_output));
    // Against sde with the same seed: same z0, other (independent) step noises.
    let sde = NoiseState::draw(4, &SHAPE, &plan, NoiseMode::Sde, false, DType::F64, &dev).unwrap();
    let from_z0 = NoiseState::draw(4, &SHAPE, &plan, NoiseMode::SdeFromZ0, false, DType::F64, &dev).unwrap();
    let d = f64s(&(traj.sample_state(&sde).unwrap() - traj.sample_state(&from_z0).unwrap()).unwrap())
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(d > 1e-3, "sde vs sde-from-z0 outputs differ by {d:.1e}");
}

/// The CLI's run with the source's flag `learnable_step_noise: true`: it runs sde-from-z0,
/// says so, learns z0 alone, and its finite-difference check and descent pass.
#[test]
fn app_run_with_the_source_flag() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"{"learnable_step_noise": true, "num_steps": 6, "noise_steps": 4, "height": 8, "width": 8, "frames": 2, "s_churn": 10}"#;
    let params = sampler::config::parse_params(Some(("params.json", text)), &Default::default()).unwrap();
    let mut lines = Vec::new();
    let summary = sampler::app::run(&params, dir.path(), |l| lines.push(l.to_string())).unwrap();
    assert!(lines.iter().any(|l| l.contains("noise_mode=SdeFromZ0")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.starts_with("step noises from z0: ξ_i = Q_i z0")));
    assert!(lines.iter().any(|l| l.contains("1 learned tensors")), "{lines:#?}");
    assert!(summary.gradcheck_rel_error.unwrap() < 1e-4, "{:?}", summary.gradcheck_rel_error);
    assert!(summary.final_loss < summary.initial_loss, "{} → {}", summary.initial_loss, summary.final_loss);
}
