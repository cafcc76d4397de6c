//! Environment throughput on one core: physics steps/s without rendering, and frames/s
//! rendering all three cameras at 84×84. Run with `cargo bench -p rl --bench env`.
//! Targets: ≥ 20,000 steps/s and ≥ 2,000 frames/s.

use rl::env::policy::{Policy, RandomPolicy, ScriptedExpert};
use rl::env::{Env, EnvConfig};
use std::time::{Duration, Instant};

/// Steps `env` under `policy` for at least `budget`, resetting on episode end; returns steps/s.
fn measure(env: &mut Env, policy: &mut dyn Policy, budget: Duration) -> f64 {
    let mut seed = 0;
    env.reset(seed);
    policy.reset(seed);
    let started = Instant::now();
    let mut steps = 0u64;
    while started.elapsed() < budget {
        for _ in 0..100 {
            let action = policy.act(env);
            let step = env.step(&action);
            steps += 1;
            if step.done {
                seed += 1;
                env.reset(seed);
                policy.reset(seed);
            }
        }
    }
    steps as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let budget = Duration::from_secs(2);
    let physics = EnvConfig { render: false, ..EnvConfig::default() };
    let rendered = EnvConfig::default();
    println!("bimanual-pucks environment, single thread");
    for (name, policy) in [
        ("random", &mut RandomPolicy::new(0) as &mut dyn Policy),
        ("expert", &mut ScriptedExpert::new() as &mut dyn Policy),
    ] {
        let mut env = Env::new(physics.clone()).expect("valid config");
        let rate = measure(&mut env, policy, budget);
        println!("physics only, {name} policy:        {rate:>10.0} steps/s (target >= 20000)");
    }
    let mut env = Env::new(rendered.clone()).expect("valid config");
    let rate = measure(&mut env, &mut ScriptedExpert::new(), budget);
    println!(
        "physics + 3 cameras at {}x{}, expert: {rate:>10.0} frames/s (target >= 2000)",
        rendered.image_height, rendered.image_width
    );
    let mut env = Env::new(rendered.clone().with_image_size(64, 64)).expect("valid config");
    let rate = measure(&mut env, &mut ScriptedExpert::new(), budget);
    println!("physics + 3 cameras at 64x64, expert: {rate:>10.0} frames/s");
}
