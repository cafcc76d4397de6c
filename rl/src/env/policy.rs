//! Data-collection policies: uniform random, the scripted expert, and a degraded ("medium")
//! expert.
//!
//! The expert is a per-arm phase rule over privileged state (puck and goal positions) with
//! Cartesian feedback control through closed-form inverse kinematics:
//!
//! 1. **Approach**: open the gripper, turn its heading toward the push direction (puck → goal)
//!    and move the cup to a point 11 cm behind the puck; if the gripper is not yet behind the
//!    puck, detour around it sideways so the fingers do not bump it.
//! 2. **Capture**: move forward slowly so the puck slides between the open fingers up to the
//!    palm.
//! 3. **Push**: carry the puck to the goal in the open gripper's U: the palm pushes, the
//!    fingers stop sideways drift, and the cup is steered so that the *puck* lands on the goal.
//! 4. **Hold**: stop once the puck is on the goal centre.
//!
//! The gripper is never closed. An earlier expert closed it to cage the puck; the push phase
//! then depended on the gripper's own opening, and behaviour clones that closed it at the
//! wrong moment did not reopen it: in the clones' own rollouts, in states where the expert
//! commands "open" (+1), they commanded −0.1 on average.
//!
//! The phase is recomputed every step from the current state alone (no memory), so the expert
//! is a function of what a policy can observe and can be imitated; losing the puck sends the
//! arm back to Approach, so the loop recovers from bumps.

use super::kinematics;
use super::physics::{wrap_angle, Arm, Vec2, MAX_JOINT_SPEED};
use super::{Env, ACTION_DIM, CONTROL_DT};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Anything that can drive the environment for data collection.
pub trait Policy {
    /// Called at the start of every episode.
    fn reset(&mut self, seed: u64);
    /// The next action, each entry in [-1, 1].
    fn act(&mut self, env: &Env) -> [f32; ACTION_DIM];
}

/// Uniform random actions in [-1, 1]^8 from a seeded ChaCha8 stream.
pub struct RandomPolicy {
    rng: ChaCha8Rng,
}

impl RandomPolicy {
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }
}

impl Policy for RandomPolicy {
    fn reset(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed ^ 0x00AA_D0E5_0000_0000);
    }
    fn act(&mut self, _env: &Env) -> [f32; ACTION_DIM] {
        std::array::from_fn(|_| self.rng.random_range(-1.0f32..=1.0))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Approach,
    Capture,
    Push,
    Hold,
}

/// The scripted expert (see module docs).
#[derive(Clone, Debug)]
pub struct ScriptedExpert {
    phases: [Phase; 2],
    /// Cartesian speed limits (m/s) for approaching and pushing.
    approach_speed: f32,
    push_speed: f32,
}

impl Default for ScriptedExpert {
    fn default() -> Self {
        Self::new()
    }
}

const BEHIND_DISTANCE: f32 = 0.11;
const DETOUR_SIDEWAYS: f32 = 0.16;
const POSITION_GAIN: f32 = 5.0;
const HEADING_GAIN: f32 = 5.0;
const MAX_HEADING_RATE: f32 = 2.5;

impl ScriptedExpert {
    pub fn new() -> Self {
        Self { phases: [Phase::Approach; 2], approach_speed: 0.35, push_speed: 0.22 }
    }

    /// Current phase of each arm's state machine, for debugging and visualisation.
    pub fn phase_names(&self) -> [&'static str; 2] {
        self.phases.map(|p| match p {
            Phase::Approach => "approach",
            Phase::Capture => "capture",
            Phase::Push => "push",
            Phase::Hold => "hold",
        })
    }

    fn arm_action(&mut self, k: usize, env: &Env) -> [f32; 4] {
        let world = env.world();
        let arm = &world.arms[k];
        let puck = world.pucks[k].position;
        let goal = env.goals()[k];
        let cup = arm.cup_point();
        let heading_angle = arm.heading_angle();
        let heading = Vec2::from_angle(heading_angle);
        let to_goal = goal - puck;
        let goal_distance = to_goal.length();
        let push_direction = to_goal.normalized_or(heading);
        let relative = puck - cup;
        let along = relative.dot(heading);
        let lateral = relative.dot(heading.perp());
        let aligned = heading.dot(push_direction) > 0.96;
        let behind_point = puck - push_direction * BEHIND_DISTANCE;

        // The phase is a function of what the agent can observe (arm pose, puck and goal
        // positions), never of the history: a policy learned from these demonstrations sees
        // everything the expert decided on. "In the cup" means between the open fingers,
        // against or near the palm.
        let in_cup = lateral.abs() < 0.045 && (-0.02..0.03).contains(&along);
        let phase = if goal_distance < 0.02 {
            Phase::Hold
        } else if in_cup && heading.dot(push_direction) > 0.8 {
            Phase::Push
        } else if aligned && lateral.abs() < 0.03 && (-0.02..BEHIND_DISTANCE + 0.015).contains(&along) {
            Phase::Capture
        } else {
            Phase::Approach
        };
        self.phases[k] = phase;
        let phase = &self.phases[k];

        let (target, target_heading, speed, gripper) = match *phase {
            Phase::Approach => {
                let offset = cup - puck;
                let target = if offset.dot(push_direction) < -0.06 {
                    behind_point
                } else {
                    let normal = push_direction.perp();
                    let side = if offset.dot(normal) >= 0.0 { 1.0 } else { -1.0 };
                    puck - push_direction * BEHIND_DISTANCE + normal * (side * DETOUR_SIDEWAYS)
                };
                (target, push_direction.angle(), self.approach_speed, 1.0)
            }
            Phase::Capture => (puck, push_direction.angle(), 0.12, 1.0),
            Phase::Push => {
                // Move the cup so that the puck, not the cup, lands on the goal.
                let target = cup + to_goal;
                (target, push_direction.angle(), self.push_speed, 1.0)
            }
            Phase::Hold => return [0.0, 0.0, 0.0, 1.0],
        };
        let joints = cartesian_servo(arm, cup, target, target_heading, speed);
        [joints[0], joints[1], joints[2], gripper]
    }
}

/// Joint-velocity action moving the cup toward `target` along a straight line at up to
/// `speed` and turning the heading toward `target_heading`, through inverse kinematics of the
/// pose one control step ahead.
fn cartesian_servo(arm: &Arm, cup: Vec2, target: Vec2, target_heading: f32, speed: f32) -> [f32; 3] {
    let error = target - cup;
    let desired_speed = (error.length() * POSITION_GAIN).min(speed);
    let velocity = error.normalized_or(Vec2::ZERO) * desired_speed;
    let heading_error = wrap_angle(target_heading - arm.heading_angle());
    let heading_rate = (heading_error * HEADING_GAIN).clamp(-MAX_HEADING_RATE, MAX_HEADING_RATE);
    let next_cup = cup + velocity * CONTROL_DT;
    let next_heading = arm.heading_angle() + heading_rate * CONTROL_DT;
    let solution = kinematics::solve(arm.base, arm.elbow_sign, next_cup, next_heading, arm.q[2]);
    let mut action = [0.0f32; 3];
    for j in 0..3 {
        action[j] = (solution.q[j] - arm.q[j]) / CONTROL_DT / MAX_JOINT_SPEED[j];
    }
    // Scale all joints together so the motion keeps its direction when a joint saturates.
    let peak = action.iter().fold(1.0f32, |m, a| m.max(a.abs()));
    action.map(|a| a / peak)
}

impl Policy for ScriptedExpert {
    fn reset(&mut self, _seed: u64) {
        self.phases = [Phase::Approach; 2];
    }
    fn act(&mut self, env: &Env) -> [f32; ACTION_DIM] {
        let left = self.arm_action(0, env);
        let right = self.arm_action(1, env);
        let mut action = [0.0; ACTION_DIM];
        action[..4].copy_from_slice(&left);
        action[4..].copy_from_slice(&right);
        action
    }
}

/// The expert with Gaussian action noise and occasional bursts of random actions: competent
/// but sloppy, like D4RL's "medium" policies. Its return is tuned to roughly half the expert's
/// normalised score.
pub struct NoisyExpert {
    expert: ScriptedExpert,
    rng: ChaCha8Rng,
    pub noise_std: f32,
    /// Per-step probability of starting a burst of random actions.
    pub burst_probability: f32,
    pub burst_length: usize,
    burst_left: usize,
}

impl NoisyExpert {
    /// The noise level used for the `medium` dataset tier.
    pub fn medium(seed: u64) -> Self {
        Self {
            expert: ScriptedExpert::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            noise_std: 0.3,
            burst_probability: 0.02,
            burst_length: 8,
            burst_left: 0,
        }
    }

    fn gaussian(&mut self) -> f32 {
        // Box–Muller on the seeded stream.
        let u1: f32 = self.rng.random_range(f32::EPSILON..1.0);
        let u2: f32 = self.rng.random_range(0.0..1.0);
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

impl Policy for NoisyExpert {
    fn reset(&mut self, seed: u64) {
        self.expert.reset(seed);
        self.rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0000_0E01_5E00_0000);
        self.burst_left = 0;
    }
    fn act(&mut self, env: &Env) -> [f32; ACTION_DIM] {
        let mut action = self.expert.act(env);
        if self.burst_left == 0 && self.rng.random_range(0.0f32..1.0) < self.burst_probability {
            self.burst_left = self.burst_length;
        }
        if self.burst_left > 0 {
            self.burst_left -= 1;
            return std::array::from_fn(|_| self.rng.random_range(-1.0f32..=1.0));
        }
        for a in &mut action {
            *a = (*a + self.noise_std * self.gaussian()).clamp(-1.0, 1.0);
        }
        action
    }
}

/// Which policy produced an episode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    Random,
    Medium,
    Expert,
}

impl PolicyKind {
    pub fn build(self, seed: u64) -> Box<dyn Policy + Send> {
        let mut policy: Box<dyn Policy + Send> = match self {
            PolicyKind::Random => Box::new(RandomPolicy::new(seed)),
            PolicyKind::Medium => Box::new(NoisyExpert::medium(seed)),
            PolicyKind::Expert => Box::new(ScriptedExpert::new()),
        };
        policy.reset(seed);
        policy
    }

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Random => "random",
            PolicyKind::Medium => "medium",
            PolicyKind::Expert => "expert",
        }
    }
}

/// Outcome of one rolled-out episode.
#[derive(Clone, Copy, Debug)]
pub struct EpisodeOutcome {
    pub episode_return: f32,
    pub success: bool,
    pub length: usize,
}

/// Runs one episode of `policy` from `seed` (rendering as configured in `env`).
pub fn rollout(env: &mut Env, policy: &mut dyn Policy, seed: u64) -> EpisodeOutcome {
    env.reset(seed);
    policy.reset(seed);
    let mut episode_return = 0.0;
    loop {
        let action = policy.act(env);
        let step = env.step(&action);
        episode_return += step.reward;
        if step.done {
            return EpisodeOutcome { episode_return, success: step.success, length: env.elapsed_steps() };
        }
    }
}
