//! Behaviour of the bimanual environment: determinism, shapes, physics invariants, expert.

use rl::env::physics::{GOAL_RADIUS, PUCK_RADIUS, TABLE_DEPTH, TABLE_HALF_WIDTH};
use rl::env::policy::{rollout, Policy, RandomPolicy, ScriptedExpert};
use rl::env::{
    normalized_score, tile_views, Env, EnvConfig, ACTION_DIM, NUM_CAMERAS, REFERENCE_EXPERT_RETURN,
    REFERENCE_RANDOM_RETURN, STATE_DIM,
};

fn run(config: EnvConfig, seed: u64, steps: usize) -> Vec<rl::env::Observation> {
    let mut env = Env::new(config).unwrap();
    let mut policy = RandomPolicy::new(seed);
    let mut observations = vec![env.reset(seed)];
    for _ in 0..steps {
        let action = policy.act(&env);
        observations.push(env.step(&action).obs);
    }
    observations
}

#[test]
fn same_seed_gives_identical_observations_and_different_seeds_differ() {
    let config = EnvConfig::default().with_image_size(32, 32);
    let a = run(config.clone(), 7, 25);
    let b = run(config.clone(), 7, 25);
    assert_eq!(a, b);
    let c = run(config, 8, 25);
    assert_ne!(a[0].environment_state, c[0].environment_state);
}

#[test]
fn observations_have_documented_shapes_at_64() {
    let mut env = Env::new(EnvConfig::default().with_image_size(64, 64)).unwrap();
    let obs = env.reset(3);
    assert_eq!(obs.images.len(), NUM_CAMERAS);
    for image in &obs.images {
        assert_eq!(image.len(), 64 * 64 * 3);
        // Every camera sees more than one colour (table, grid, gripper...).
        let first = &image[..3];
        assert!(image.chunks(3).any(|px| px != first));
    }
    assert_eq!(obs.state.len(), STATE_DIM);
    let tiled = tile_views(&obs.images, 64, 64);
    assert_eq!(tiled.len(), 64 * 64 * 3 * 3);
    // The middle tile of the first row is the global camera's first row.
    assert_eq!(&tiled[64 * 3..128 * 3], &obs.images[2][..64 * 3]);
    assert!(Env::new(EnvConfig::default().with_image_size(8, 8)).is_err());
}

#[test]
fn actions_are_clamped_and_nan_is_ignored() {
    let mut env = Env::new(EnvConfig { render: false, ..EnvConfig::default() }).unwrap();
    let start = env.reset(1).state;
    let step = env.step(&[f32::NAN; ACTION_DIM]);
    assert!(step.obs.state.iter().all(|v| v.is_finite()));
    // NaN joint commands mean "stand still".
    assert_eq!(step.obs.state[..3], start[..3]);
    let step = env.step(&[100.0; ACTION_DIM]);
    // Joint speed after clamping is the documented maximum (1.5, 1.5, 3.0 rad/s) unless a
    // joint limit stopped it.
    for (j, max) in [1.5f32, 1.5, 3.0].iter().enumerate() {
        assert!(step.obs.state[3 + j] <= max + 1e-4, "{:?}", step.obs.state);
    }
}

#[test]
fn pucks_stay_on_the_table_and_out_of_the_grippers_under_random_flailing() {
    let mut env = Env::new(EnvConfig { render: false, ..EnvConfig::default() }).unwrap();
    let mut worst_penetration = 0.0f32;
    for seed in 0..4 {
        let mut policy = RandomPolicy::new(seed);
        env.reset(seed);
        for _ in 0..200 {
            let action = policy.act(&env);
            if env.step(&action).done {
                break;
            }
            let world = env.world();
            for puck in &world.pucks {
                let p = puck.position;
                assert!(p.x.abs() <= TABLE_HALF_WIDTH - PUCK_RADIUS + 1e-4);
                assert!(p.y >= PUCK_RADIUS - 1e-4 && p.y <= TABLE_DEPTH - PUCK_RADIUS + 1e-4);
                for arm in &world.arms {
                    for capsule in arm.gripper_capsules() {
                        let closest = rl::env::physics::closest_point_on_segment(p, capsule.a, capsule.b);
                        let depth = capsule.radius + PUCK_RADIUS - (p - closest).length();
                        worst_penetration = worst_penetration.max(depth);
                    }
                }
            }
            let gap = (world.pucks[0].position - world.pucks[1].position).length();
            worst_penetration = worst_penetration.max(2.0 * PUCK_RADIUS - gap);
        }
    }
    assert!(worst_penetration < 0.01, "contacts let bodies overlap by {worst_penetration} m");
}

#[test]
fn expert_succeeds_where_random_does_not() {
    let mut env = Env::new(EnvConfig { render: false, ..EnvConfig::default() }).unwrap();
    let mut expert_successes = 0;
    let mut expert_return = 0.0;
    let mut random_return = 0.0;
    for seed in 0..6 {
        let outcome = rollout(&mut env, &mut ScriptedExpert::new(), seed);
        expert_successes += outcome.success as usize;
        expert_return += outcome.episode_return;
        if outcome.success {
            // Terminal on success: the episode stops early, the pucks sit in their goals.
            assert!(outcome.length < 200);
            for (puck, goal) in env.world().pucks.iter().zip(env.goals()) {
                assert!((puck.position - *goal).length() < GOAL_RADIUS);
            }
        }
        let random = rollout(&mut env, &mut RandomPolicy::new(seed), seed);
        random_return += random.episode_return;
    }
    assert!(expert_successes >= 5, "expert solved {expert_successes}/6");
    assert!(expert_return > 3.0 * random_return);
}

#[test]
fn normalized_score_maps_reference_returns_to_0_and_100() {
    assert!(normalized_score(REFERENCE_RANDOM_RETURN).abs() < 1e-3);
    assert!((normalized_score(REFERENCE_EXPERT_RETURN) - 100.0).abs() < 1e-3);
}

#[test]
fn task_frame_features_match_the_simulator_geometry() {
    // The state-only model's derived features must be computed from the observation alone and
    // agree with the simulator's own gripper frame (what a wrist camera sees).
    let mut env = Env::new(EnvConfig { render: false, ..EnvConfig::default() }).unwrap();
    let mut policy = RandomPolicy::new(3);
    let mut obs = env.reset(3);
    for step in 0..40 {
        let features = rl::trainer::task_frame_features(&obs.state, &obs.environment_state);
        let world = env.world();
        for arm in 0..2 {
            let cup = world.arms[arm].cup_point();
            let heading = rl::env::physics::Vec2::from_angle(world.arms[arm].heading_angle());
            let relative = world.pucks[arm].position - cup;
            let to_goal = env.goals()[arm] - world.pucks[arm].position;
            let expected = [relative.dot(heading), relative.dot(heading.perp()), to_goal.x, to_goal.y];
            for (k, e) in expected.iter().enumerate() {
                let got = features[arm * 4 + k];
                assert!((got - e).abs() < 1e-4, "step {step} arm {arm} feature {k}: {got} vs {e}");
            }
        }
        let action = policy.act(&env);
        obs = env.step(&action).obs;
    }
}
