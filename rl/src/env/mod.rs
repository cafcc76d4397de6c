//! `BimanualPucks`: a planar, table-top, two-arm manipulation task with three cameras.
//!
//! The source system learned on a dual-arm robot with a left-wrist, a right-wrist and a global
//! camera and a 16-d joint vector. This environment reproduces that *shape* of problem in a
//! simulator cheap enough to generate offline datasets on a laptop:
//!
//! * **Scene** (top-down, metres): a 1.10 × 0.75 table; two three-joint arms (shoulder, elbow,
//!   wrist) based just in front of it, each ending in a cage gripper (palm + two fingers); a red
//!   and a blue puck; a red and a blue goal region. The left arm must bring the red puck into
//!   the red goal and the right arm the blue puck into the blue goal. Physics: see
//!   [`physics`] (own sequential-impulse solver; why not rapier2d is explained there).
//! * **Action** (`[f32; 8]`, each in [-1, 1], clamped; NaN is read as 0):
//!   `[l_shoulder, l_elbow, l_wrist, l_gripper, r_shoulder, r_elbow, r_wrist, r_gripper]`.
//!   Joint entries are joint *velocities* as a fraction of [`physics::MAX_JOINT_SPEED`]
//!   (1.5, 1.5, 3.0 rad/s). Gripper entries are finger-opening *targets*: -1 closed (cages a
//!   puck), +1 fully open; fingers move toward the target at 0.3 m/s.
//! * **Observation**: three RGB images (u8, H×W×3, row-major, default 84×84; see
//!   [`CAMERA_NAMES`]) plus a 24-d proprioceptive state, per arm:
//!   `[q_shoulder, q_elbow, q_wrist (rad), qd_shoulder, qd_elbow, qd_wrist (rad/s),
//!   gripper opening (0 closed .. 1 open), gripper opening velocity (-1 .. 1),
//!   cup x, cup y (m, table frame), cos heading, sin heading]`. The end-effector pose is
//!   forward kinematics of the joints, reported as real arms do, so policies need not learn it.
//!   An 8-d privileged `environment_state` (puck and goal positions, LeRobot's
//!   `observation.environment_state`) is provided for state-only baselines.
//! * **Timing**: 20 control steps per second ([`CONTROL_DT`]), 4 physics substeps each,
//!   episodes of [`EnvConfig::max_steps`] = 200 steps (10 s). Terminal on success.
//! * **Reward** (dense, per step, in [0, 1]): for each puck `0.35·(1 − tanh(d_goal/0.15)) +
//!   0.15·(1 − tanh(d_reach/0.10))`, where `d_reach` is the distance from the puck to its arm's
//!   gripper cup. On success the episode ends and the final step additionally earns
//!   `1.0 ×` the number of steps left: the success state is treated as absorbing with maximal
//!   reward, so finishing sooner never scores less. Returns therefore lie in [0, max_steps].
//! * **Success**: both pucks' centres within [`physics::GOAL_RADIUS`] (5 cm) of their goals.
//! * **Score**: [`normalized_score`] = 100·(R − R_random)/(R_expert − R_random) with the
//!   reference returns [`REFERENCE_RANDOM_RETURN`] and [`REFERENCE_EXPERT_RETURN`] measured by
//!   [`REFERENCE_COMMAND`].
//!
//! Determinism: a seed fully determines the task (puck, goal and arm start poses, drawn with
//! ChaCha8), and the simulator uses only sequential f32 arithmetic, so the same seed and the
//! same actions give bit-identical observations on a given platform.

pub mod kinematics;
pub mod physics;
pub mod policy;
pub mod render;

use physics::{Arm, Puck, Vec2, World, ARM_BASES, GOAL_RADIUS, GRIP_CLOSED, GRIP_OPEN, MAX_GRIP_SPEED, PUCK_RADIUS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
pub use render::{contact_sheet, tile_views, Renderer};

/// Camera names in the order of [`Observation::images`]; they form the LeRobot keys
/// `observation.images.<name>`.
pub const CAMERA_NAMES: [&str; 3] = ["left_wrist", "right_wrist", "global"];
pub const NUM_CAMERAS: usize = 3;

/// [`CAMERA_NAMES`] as owned strings (serde defaults of files from before cameras were recorded).
pub fn camera_names() -> Vec<String> {
    CAMERA_NAMES.iter().map(|c| c.to_string()).collect()
}
pub const STATE_DIM: usize = 24;
pub const ENVIRONMENT_STATE_DIM: usize = 8;
pub const ACTION_DIM: usize = 8;
/// Seconds per control step.
pub const CONTROL_DT: f32 = 0.05;
pub const FPS: usize = 20;
pub const PHYSICS_SUBSTEPS: usize = 4;
/// Maximum per-step reward; the success bonus pays this for each step left.
pub const MAX_STEP_REWARD: f32 = 1.0;

/// Mean return of the uniform random policy over seeds 0..100 (default config).
pub const REFERENCE_RANDOM_RETURN: f32 = 16.975;
/// Mean return of the scripted expert over seeds 0..100 (default config).
pub const REFERENCE_EXPERT_RETURN: f32 = 157.577;
/// The command that measured the reference returns.
pub const REFERENCE_COMMAND: &str = "cargo run -p rl --release --bin collect -- --evaluate-references --seeds 100";

pub const STATE_NAMES: [&str; STATE_DIM] = [
    "left.q_shoulder",
    "left.q_elbow",
    "left.q_wrist",
    "left.qd_shoulder",
    "left.qd_elbow",
    "left.qd_wrist",
    "left.gripper_opening",
    "left.gripper_velocity",
    "left.cup_x",
    "left.cup_y",
    "left.heading_cos",
    "left.heading_sin",
    "right.q_shoulder",
    "right.q_elbow",
    "right.q_wrist",
    "right.qd_shoulder",
    "right.qd_elbow",
    "right.qd_wrist",
    "right.gripper_opening",
    "right.gripper_velocity",
    "right.cup_x",
    "right.cup_y",
    "right.heading_cos",
    "right.heading_sin",
];
pub const ENVIRONMENT_STATE_NAMES: [&str; ENVIRONMENT_STATE_DIM] = [
    "red_puck.x",
    "red_puck.y",
    "blue_puck.x",
    "blue_puck.y",
    "red_goal.x",
    "red_goal.y",
    "blue_goal.x",
    "blue_goal.y",
];
pub const ACTION_NAMES: [&str; ACTION_DIM] = [
    "left.shoulder_velocity",
    "left.elbow_velocity",
    "left.wrist_velocity",
    "left.gripper_target",
    "right.shoulder_velocity",
    "right.elbow_velocity",
    "right.wrist_velocity",
    "right.gripper_target",
];

/// 100·(R − R_random)/(R_expert − R_random) with the stored reference returns.
pub fn normalized_score(episode_return: f32) -> f32 {
    100.0 * (episode_return - REFERENCE_RANDOM_RETURN) / (REFERENCE_EXPERT_RETURN - REFERENCE_RANDOM_RETURN)
}

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("image size {height}x{width} is not supported: both sides must be in 16..=1024")]
    ImageSize { height: usize, width: usize },
    #[error("max_steps must be at least 1")]
    MaxSteps,
    #[error("supersample {0} is not supported: it must be in 1..=8")]
    Supersample(usize),
}

/// Environment parameters. Serialised into a dataset's meta.json.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EnvConfig {
    pub image_height: usize,
    pub image_width: usize,
    /// Episode length in control steps (truncation).
    pub max_steps: usize,
    /// Render camera images. Off for state-only use and for physics benchmarks; observations
    /// then carry empty image vectors.
    pub render: bool,
    /// Anti-aliasing: render at `supersample`× each side and box-average down to the image
    /// size (1 = one sample per pixel). The world model's frames are made the same way
    /// (32 px rendered → 16 px views), so a policy trained on 16 px, `supersample = 2` images
    /// sees what the world model generates.
    #[serde(default = "one")]
    pub supersample: usize,
}

fn one() -> usize {
    1
}

impl Default for EnvConfig {
    fn default() -> Self {
        Self { image_height: 84, image_width: 84, max_steps: 200, render: true, supersample: 1 }
    }
}

impl EnvConfig {
    pub fn with_image_size(mut self, height: usize, width: usize) -> Self {
        self.image_height = height;
        self.image_width = width;
        self
    }
}

/// What the agent sees.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// One u8 H×W×3 image per camera, in [`CAMERA_NAMES`] order (empty when not rendering).
    pub images: [Vec<u8>; NUM_CAMERAS],
    /// Proprioception, [`STATE_DIM`] values, see [`STATE_NAMES`].
    pub state: Vec<f32>,
    /// Privileged object state, see [`ENVIRONMENT_STATE_NAMES`].
    pub environment_state: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

/// Result of [`Env::step`].
#[derive(Clone, Debug)]
pub struct Step {
    pub obs: Observation,
    pub reward: f32,
    /// The episode is over: success (terminal) or time limit (truncated).
    pub done: bool,
    /// Both pucks are in their goals; this is the MDP's terminal condition.
    pub success: bool,
    /// Ended by the time limit without success (bootstrap through it).
    pub truncated: bool,
}

/// The environment. `reset` before the first `step`.
pub struct Env {
    config: EnvConfig,
    world: World,
    goals: [Vec2; 2],
    steps: usize,
    success: bool,
    renderer: Option<Renderer>,
}

impl Env {
    pub fn new(config: EnvConfig) -> Result<Self, EnvError> {
        let sides_ok = |s: usize| (16..=1024).contains(&s);
        if !sides_ok(config.image_height) || !sides_ok(config.image_width) {
            return Err(EnvError::ImageSize { height: config.image_height, width: config.image_width });
        }
        if config.max_steps == 0 {
            return Err(EnvError::MaxSteps);
        }
        if !(1..=8).contains(&config.supersample) {
            return Err(EnvError::Supersample(config.supersample));
        }
        let ss = config.supersample;
        let renderer = config.render.then(|| Renderer::new(config.image_height * ss, config.image_width * ss));
        let (world, goals) = sample_task(0);
        let mut env = Self { config, world, goals, steps: 0, success: false, renderer };
        env.reset(0);
        Ok(env)
    }

    pub fn config(&self) -> &EnvConfig {
        &self.config
    }

    /// Starts a new episode whose layout is fully determined by `seed`.
    pub fn reset(&mut self, seed: u64) -> Observation {
        let (world, goals) = sample_task(seed);
        self.world = world;
        self.goals = goals;
        self.steps = 0;
        self.success = false;
        if let Some(renderer) = &mut self.renderer {
            renderer.set_goals(&self.goals);
        }
        self.observe()
    }

    /// Applies `action` for one control step ([`CONTROL_DT`] seconds).
    ///
    /// # Panics
    /// If `action.len() != ACTION_DIM` (a programming error, not a data error).
    pub fn step(&mut self, action: &[f32]) -> Step {
        let action: &[f32; ACTION_DIM] = action
            .try_into()
            .unwrap_or_else(|_| panic!("Env::step expects {ACTION_DIM} action values, got {}", action.len()));
        self.world.step(action, CONTROL_DT, PHYSICS_SUBSTEPS);
        self.steps += 1;
        self.success = self.pucks_in_goals();
        let mut reward = self.shaped_reward();
        if self.success {
            reward += MAX_STEP_REWARD * self.config.max_steps.saturating_sub(self.steps) as f32;
        }
        let truncated = !self.success && self.steps >= self.config.max_steps;
        Step { obs: self.observe(), reward, done: self.success || truncated, success: self.success, truncated }
    }

    /// Current observation (renders the cameras when rendering is on).
    pub fn observe(&mut self) -> Observation {
        let (height, width) = (self.config.image_height, self.config.image_width);
        let images = match &mut self.renderer {
            Some(renderer) => {
                let images = renderer.render(&self.world, &self.goals);
                match self.config.supersample {
                    1 => images,
                    f => images.map(|image| box_downsample(&image, height, width, f)),
                }
            }
            None => Default::default(),
        };
        Observation { images, state: self.proprioception(), environment_state: self.environment_state(), height, width }
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    /// Goal centres for the red (left arm) and blue (right arm) pucks.
    pub fn goals(&self) -> &[Vec2; 2] {
        &self.goals
    }

    /// Control steps taken in this episode.
    pub fn elapsed_steps(&self) -> usize {
        self.steps
    }

    pub fn is_success(&self) -> bool {
        self.success
    }

    fn pucks_in_goals(&self) -> bool {
        self.world.pucks.iter().zip(&self.goals).all(|(puck, goal)| (puck.position - *goal).length() < GOAL_RADIUS)
    }

    fn shaped_reward(&self) -> f32 {
        let mut reward = 0.0;
        for k in 0..2 {
            let puck = self.world.pucks[k].position;
            let goal_distance = (puck - self.goals[k]).length();
            let reach_distance = (puck - self.world.arms[k].cup_point()).length();
            reward += 0.35 * (1.0 - (goal_distance / 0.15).tanh()) + 0.15 * (1.0 - (reach_distance / 0.10).tanh());
        }
        reward
    }

    fn proprioception(&self) -> Vec<f32> {
        let mut state = Vec::with_capacity(STATE_DIM);
        for arm in &self.world.arms {
            state.extend_from_slice(&arm.q);
            state.extend_from_slice(&arm.qd);
            state.push((arm.grip - GRIP_CLOSED) / (GRIP_OPEN - GRIP_CLOSED));
            state.push(arm.grip_velocity / MAX_GRIP_SPEED);
            let cup = arm.cup_point();
            let heading = arm.heading_angle();
            state.extend_from_slice(&[cup.x, cup.y, heading.cos(), heading.sin()]);
        }
        state
    }

    fn environment_state(&self) -> Vec<f32> {
        let p = &self.world.pucks;
        let g = &self.goals;
        vec![p[0].position.x, p[0].position.y, p[1].position.x, p[1].position.y, g[0].x, g[0].y, g[1].x, g[1].y]
    }
}

/// Averages `factor`×`factor` blocks of an (H·factor)×(W·factor)×3 image into H×W×3 (rounded).
fn box_downsample(image: &[u8], height: usize, width: usize, factor: usize) -> Vec<u8> {
    let source_width = width * factor;
    let count = (factor * factor) as u32;
    let mut out = vec![0u8; height * width * 3];
    for y in 0..height {
        for x in 0..width {
            for ch in 0..3 {
                let mut sum = 0u32;
                for dy in 0..factor {
                    let row = (y * factor + dy) * source_width;
                    for dx in 0..factor {
                        sum += image[(row + x * factor + dx) * 3 + ch] as u32;
                    }
                }
                out[(y * width + x) * 3 + ch] = ((sum + count / 2) / count) as u8;
            }
        }
    }
    out
}

/// Draws a feasible task: for each arm a puck and a goal on its half of the table, such that
/// the arm can push the puck along the straight line to the goal without hitting joint limits,
/// and a start pose with the gripper near the table's front edge.
fn sample_task(seed: u64) -> (World, [Vec2; 2]) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_B1A7_0000_0001);
    let mut pucks = Vec::with_capacity(2);
    let mut goals = [Vec2::ZERO; 2];
    let mut arms = Vec::with_capacity(2);
    for k in 0..2 {
        let side = if k == 0 { -1.0f32 } else { 1.0 };
        let elbow_sign = side;
        let base = ARM_BASES[k];
        let (puck, goal) = loop {
            let puck = Vec2::new(side * rng.random_range(0.08..0.42), rng.random_range(0.26..0.50));
            let goal = Vec2::new(side * rng.random_range(0.07..0.45), rng.random_range(0.20..0.58));
            let distance = (goal - puck).length();
            if !(0.15..=0.32).contains(&distance) {
                continue;
            }
            let heading = (goal - puck).angle();
            // The push path and the pre-push point behind the puck must be reachable.
            let behind = puck - (goal - puck) * (0.11 / distance);
            let feasible = (0..=4)
                .map(|i| puck + (goal - puck) * (i as f32 / 4.0))
                .chain([behind])
                .all(|cup| kinematics::comfortably_reachable(base, elbow_sign, cup, heading, 0.3));
            if feasible {
                break (puck, goal);
            }
        };
        let home = Vec2::new(side * 0.20 + rng.random_range(-0.03..0.03), 0.14 + rng.random_range(-0.02..0.02));
        let heading = std::f32::consts::FRAC_PI_2 + rng.random_range(-0.25..0.25);
        let q = kinematics::solve(base, elbow_sign, home, heading, 0.0).q;
        let grip = rng.random_range(GRIP_CLOSED..GRIP_OPEN);
        arms.push(Arm::new(base, q, grip, elbow_sign));
        pucks.push(Puck {
            position: puck,
            velocity: Vec2::ZERO,
            angle: rng.random_range(-std::f32::consts::PI..std::f32::consts::PI),
            angular_velocity: 0.0,
        });
        goals[k] = goal;
    }
    debug_assert!(pucks.iter().all(|p| p.position.y > PUCK_RADIUS));
    let arms: [Arm; 2] = [arms[0].clone(), arms[1].clone()];
    let pucks: [Puck; 2] = [pucks[0].clone(), pucks[1].clone()];
    (World::new(arms, pucks), goals)
}
