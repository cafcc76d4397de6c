//! The table-top world: two kinematic arms with cage grippers and two dynamic pucks.
//!
//! # Why a small hand-written solver and not rapier2d
//! The scene is tiny and fixed: two discs, six gripper capsules, four walls. A general engine
//! would spend most of its time on broad phase, islands and bookkeeping we do not need, would
//! add a large dependency tree to a workspace that compiles on two cores, and would make
//! byte-identical determinism depend on its internals. Here every contact is enumerated in a
//! fixed order and solved with a few sequential-impulse iterations, which gives real rigid-body
//! behaviour (non-penetration, Coulomb friction at contacts, planar Coulomb friction against the
//! table, spin) at well over 20,000 control steps per second on one core.
//!
//! # Model
//! * The view is top-down. Arm links ride above the table and never touch the pucks; only the
//!   gripper (a palm and two fingers, each a capsule) reaches table height. This is how real
//!   table-top arms behave and keeps the arms from sweeping pucks with their forearms.
//! * Arms are kinematic and velocity controlled: the action sets joint velocities directly
//!   (clamped at joint limits), so arms have effectively infinite mass against the pucks.
//!   Arms do not collide with each other (each works on its own half of the table).
//! * Pucks are discs with mass, inertia, linear and angular velocity. The table applies planar
//!   Coulomb friction (a deceleration of `mu * g` opposing motion, clamped so it never reverses
//!   velocity) and torsional friction. Walls at the table edge keep pucks on the table.
//! * Contacts use speculative margins (no tunnelling at the gripper speeds allowed), Baumgarte
//!   position correction, accumulated normal impulses clamped at zero, and friction impulses
//!   clamped to the Coulomb cone `|λt| ≤ μ λn`.

use std::ops::{Add, Mul, Neg, Sub};

/// A 2-D vector in table coordinates (metres). `x` to the right, `y` away from the robot base.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Vec2 {
    pub x: f32,
    pub y: f32,
}

impl Vec2 {
    pub const ZERO: Vec2 = Vec2 { x: 0.0, y: 0.0 };
    pub const fn new(x: f32, y: f32) -> Self {
        Self { x, y }
    }
    pub fn from_angle(angle: f32) -> Self {
        let (s, c) = angle.sin_cos();
        Self { x: c, y: s }
    }
    pub fn dot(self, o: Vec2) -> f32 {
        self.x * o.x + self.y * o.y
    }
    /// z-component of the 3-D cross product.
    pub fn cross(self, o: Vec2) -> f32 {
        self.x * o.y - self.y * o.x
    }
    /// Rotated by +90° (counter-clockwise).
    pub fn perp(self) -> Vec2 {
        Vec2::new(-self.y, self.x)
    }
    pub fn length_squared(self) -> f32 {
        self.dot(self)
    }
    pub fn length(self) -> f32 {
        self.length_squared().sqrt()
    }
    pub fn angle(self) -> f32 {
        self.y.atan2(self.x)
    }
    pub fn normalized_or(self, fallback: Vec2) -> Vec2 {
        let len = self.length();
        if len > 1e-9 {
            self * (1.0 / len)
        } else {
            fallback
        }
    }
}

impl Add for Vec2 {
    type Output = Vec2;
    fn add(self, o: Vec2) -> Vec2 {
        Vec2::new(self.x + o.x, self.y + o.y)
    }
}
impl Sub for Vec2 {
    type Output = Vec2;
    fn sub(self, o: Vec2) -> Vec2 {
        Vec2::new(self.x - o.x, self.y - o.y)
    }
}
impl Mul<f32> for Vec2 {
    type Output = Vec2;
    fn mul(self, s: f32) -> Vec2 {
        Vec2::new(self.x * s, self.y * s)
    }
}
impl Neg for Vec2 {
    type Output = Vec2;
    fn neg(self) -> Vec2 {
        Vec2::new(-self.x, -self.y)
    }
}

/// Wraps an angle into (-π, π].
pub fn wrap_angle(angle: f32) -> f32 {
    let two_pi = std::f32::consts::TAU;
    let mut a = (angle + std::f32::consts::PI).rem_euclid(two_pi) - std::f32::consts::PI;
    if a <= -std::f32::consts::PI {
        a += two_pi;
    }
    a
}

/// Closest point to `p` on segment `a`–`b`.
pub fn closest_point_on_segment(p: Vec2, a: Vec2, b: Vec2) -> Vec2 {
    let ab = b - a;
    let len2 = ab.length_squared();
    if len2 < 1e-12 {
        return a;
    }
    let t = ((p - a).dot(ab) / len2).clamp(0.0, 1.0);
    a + ab * t
}

// ----- Geometry and physical constants (SI units) -----

/// Table extent: x in [-TABLE_HALF_WIDTH, TABLE_HALF_WIDTH], y in [0, TABLE_DEPTH].
pub const TABLE_HALF_WIDTH: f32 = 0.55;
pub const TABLE_DEPTH: f32 = 0.75;
/// Arm bases sit just in front of the table edge, like a dual-arm robot facing a table.
pub const ARM_BASES: [Vec2; 2] = [Vec2::new(-0.30, -0.08), Vec2::new(0.30, -0.08)];
/// Upper arm and forearm lengths.
pub const LINK_LENGTHS: [f32; 2] = [0.40, 0.36];
/// Wrist joint to palm centre.
pub const WRIST_TO_PALM: f32 = 0.06;
pub const PALM_RADIUS: f32 = 0.012;
pub const FINGER_RADIUS: f32 = 0.010;
pub const FINGER_LENGTH: f32 = 0.07;
/// Lateral offset of each finger's axis from the gripper axis, closed and fully open.
/// Closed leaves exactly one puck diameter between the fingers: a closed gripper cages a puck.
pub const GRIP_CLOSED: f32 = PUCK_RADIUS + FINGER_RADIUS;
pub const GRIP_OPEN: f32 = 0.085;
pub const PUCK_RADIUS: f32 = 0.035;
pub const PUCK_MASS: f32 = 0.1;
pub const GOAL_RADIUS: f32 = 0.05;
/// Where a caged puck's centre sits: just in front of the palm.
pub const CUP_OFFSET: f32 = PALM_RADIUS + PUCK_RADIUS;

/// Joint velocity at action ±1 (rad/s) for shoulder, elbow, wrist.
pub const MAX_JOINT_SPEED: [f32; 3] = [1.5, 1.5, 3.0];
/// Gripper finger speed (m/s of lateral offset).
pub const MAX_GRIP_SPEED: f32 = 0.3;
/// Joint limits (rad): shoulder, elbow, wrist. The wrist turns through ±258°, so any gripper
/// heading is reachable from any arm configuration.
pub const JOINT_LIMITS: [(f32, f32); 3] =
    [(-std::f32::consts::FRAC_PI_2, 3.0 * std::f32::consts::FRAC_PI_2), (-3.0, 3.0), (-4.5, 4.5)];

const GRAVITY: f32 = 9.81;
const TABLE_FRICTION: f32 = 0.25;
const GRIPPER_FRICTION: f32 = 0.4;
const PUCK_PUCK_FRICTION: f32 = 0.3;
const WALL_FRICTION: f32 = 0.2;
const SOLVER_ITERATIONS: usize = 6;
const BAUMGARTE: f32 = 0.2;
const PENETRATION_SLOP: f32 = 0.0005;
const SPECULATIVE_MARGIN: f32 = 0.02;

/// A capsule: segment `a`–`b` swept by `radius`.
#[derive(Clone, Copy, Debug)]
pub struct Capsule {
    pub a: Vec2,
    pub b: Vec2,
    pub radius: f32,
}

/// One planar arm: shoulder, elbow and wrist revolute joints, and a cage gripper.
#[derive(Clone, Debug)]
pub struct Arm {
    pub base: Vec2,
    /// Joint angles; the gripper heading is their sum.
    pub q: [f32; 3],
    pub qd: [f32; 3],
    /// Lateral finger offset in [GRIP_CLOSED, GRIP_OPEN].
    pub grip: f32,
    pub grip_velocity: f32,
    /// -1 for the left arm (elbow bends outward to the left), +1 for the right arm.
    pub elbow_sign: f32,
    /// Finger offset the gripper is moving toward (set by the last action).
    pub grip_target: f32,
}

/// Positions of shoulder, elbow, wrist and palm centre.
#[derive(Clone, Copy, Debug)]
pub struct ArmPoints {
    pub shoulder: Vec2,
    pub elbow: Vec2,
    pub wrist: Vec2,
    pub palm: Vec2,
    /// Unit vector along the gripper, pointing out of the palm between the fingers.
    pub heading: Vec2,
}

impl Arm {
    pub fn heading_angle(&self) -> f32 {
        self.q[0] + self.q[1] + self.q[2]
    }

    pub fn points(&self) -> ArmPoints {
        let a1 = self.q[0];
        let a2 = a1 + self.q[1];
        let a3 = a2 + self.q[2];
        let elbow = self.base + Vec2::from_angle(a1) * LINK_LENGTHS[0];
        let wrist = elbow + Vec2::from_angle(a2) * LINK_LENGTHS[1];
        let heading = Vec2::from_angle(a3);
        let palm = wrist + heading * WRIST_TO_PALM;
        ArmPoints { shoulder: self.base, elbow, wrist, palm, heading }
    }

    /// Where a caged puck's centre sits.
    pub fn cup_point(&self) -> Vec2 {
        let p = self.points();
        p.palm + p.heading * CUP_OFFSET
    }

    /// Palm, left finger, right finger (left/right as seen looking along the heading).
    pub fn gripper_capsules(&self) -> [Capsule; 3] {
        let p = self.points();
        let side = p.heading.perp();
        let left_root = p.palm + side * self.grip;
        let right_root = p.palm - side * self.grip;
        let reach = p.heading * FINGER_LENGTH;
        [
            Capsule { a: left_root, b: right_root, radius: PALM_RADIUS },
            Capsule { a: left_root, b: left_root + reach, radius: FINGER_RADIUS },
            Capsule { a: right_root, b: right_root + reach, radius: FINGER_RADIUS },
        ]
    }

    /// Velocity of a point rigidly attached to the gripper, plus `lateral` times the finger
    /// opening velocity along the gripper's side axis (+1 left finger, -1 right finger, 0 palm).
    fn gripper_point_velocity(&self, points: &ArmPoints, point: Vec2, lateral: f32) -> Vec2 {
        let joints = [points.shoulder, points.elbow, points.wrist];
        let mut v = Vec2::ZERO;
        for (joint, &rate) in joints.iter().zip(&self.qd) {
            v = v + (point - *joint).perp() * rate;
        }
        v + points.heading.perp() * (lateral * self.grip_velocity)
    }

    /// Sets commanded joint and gripper velocities from a 4-d action slice in [-1, 1].
    fn command(&mut self, action: &[f32]) {
        for j in 0..3 {
            self.qd[j] = sanitize(action[j]) * MAX_JOINT_SPEED[j];
        }
        let target = GRIP_CLOSED + 0.5 * (sanitize(action[3]) + 1.0) * (GRIP_OPEN - GRIP_CLOSED);
        self.grip_target = target;
    }

    fn integrate(&mut self, h: f32) {
        for (j, &(lo, hi)) in JOINT_LIMITS.iter().enumerate() {
            let next = self.q[j] + self.qd[j] * h;
            if next < lo || next > hi {
                let clamped = next.clamp(lo, hi);
                self.qd[j] = (clamped - self.q[j]) / h;
                self.q[j] = clamped;
            } else {
                self.q[j] = next;
            }
        }
        let delta = (self.grip_target - self.grip).clamp(-MAX_GRIP_SPEED * h, MAX_GRIP_SPEED * h);
        self.grip_velocity = delta / h;
        self.grip += delta;
    }
}

/// Maps NaN to 0 and clamps to [-1, 1]: a broken policy must not break the simulator.
fn sanitize(a: f32) -> f32 {
    if a.is_nan() {
        0.0
    } else {
        a.clamp(-1.0, 1.0)
    }
}

/// A dynamic disc sliding on the table.
#[derive(Clone, Debug)]
pub struct Puck {
    pub position: Vec2,
    pub velocity: Vec2,
    pub angle: f32,
    pub angular_velocity: f32,
}

const PUCK_INERTIA: f32 = 0.5 * PUCK_MASS * PUCK_RADIUS * PUCK_RADIUS;

#[derive(Clone, Copy, Debug)]
enum Partner {
    /// Kinematic body moving with the given velocity at the contact point.
    Kinematic(Vec2),
    /// Another puck, by index.
    Puck(usize),
}

#[derive(Clone, Copy, Debug)]
struct Contact {
    puck: usize,
    partner: Partner,
    /// Unit normal pointing from the partner into the puck.
    normal: Vec2,
    /// Penetration depth (negative: a speculative gap).
    penetration: f32,
    friction: f32,
    normal_impulse: f32,
    tangent_impulse: f32,
}

/// The whole simulated scene.
#[derive(Clone, Debug)]
pub struct World {
    pub arms: [Arm; 2],
    pub pucks: [Puck; 2],
    contacts: Vec<Contact>,
}

impl Arm {
    pub fn new(base: Vec2, q: [f32; 3], grip: f32, elbow_sign: f32) -> Self {
        Self { base, q, qd: [0.0; 3], grip, grip_velocity: 0.0, elbow_sign, grip_target: grip }
    }
}

impl World {
    pub fn new(arms: [Arm; 2], pucks: [Puck; 2]) -> Self {
        Self { arms, pucks, contacts: Vec::with_capacity(32) }
    }

    /// Advances by `dt` seconds in `substeps` equal substeps under an 8-d action
    /// (left arm joints 0..3, left gripper 3, right arm 4..7, right gripper 7).
    pub fn step(&mut self, action: &[f32; 8], dt: f32, substeps: usize) {
        self.arms[0].command(&action[0..4]);
        self.arms[1].command(&action[4..8]);
        let h = dt / substeps as f32;
        for _ in 0..substeps {
            self.substep(h);
        }
    }

    fn substep(&mut self, h: f32) {
        // Gripper velocity for this substep follows the gripper target.
        for arm in &mut self.arms {
            let delta = (arm.grip_target - arm.grip).clamp(-MAX_GRIP_SPEED * h, MAX_GRIP_SPEED * h);
            arm.grip_velocity = delta / h;
        }
        self.apply_table_friction(h);
        self.collect_contacts();
        self.solve_contacts(h);
        for puck in &mut self.pucks {
            puck.position = puck.position + puck.velocity * h;
            puck.angle = wrap_angle(puck.angle + puck.angular_velocity * h);
            // Safety net for pucks squeezed against a wall by a kinematic gripper.
            let lim_x = TABLE_HALF_WIDTH - PUCK_RADIUS;
            puck.position.x = puck.position.x.clamp(-lim_x, lim_x);
            puck.position.y = puck.position.y.clamp(PUCK_RADIUS, TABLE_DEPTH - PUCK_RADIUS);
        }
        for arm in &mut self.arms {
            arm.integrate(h);
        }
    }

    fn apply_table_friction(&mut self, h: f32) {
        let linear_drop = TABLE_FRICTION * GRAVITY * h;
        // Uniform pressure under a disc: torque (2/3) μ m g r over inertia ½ m r².
        let angular_drop = (4.0 / 3.0) * TABLE_FRICTION * GRAVITY / PUCK_RADIUS * h;
        for puck in &mut self.pucks {
            let speed = puck.velocity.length();
            puck.velocity =
                if speed <= linear_drop { Vec2::ZERO } else { puck.velocity * ((speed - linear_drop) / speed) };
            let w = puck.angular_velocity;
            puck.angular_velocity = if w.abs() <= angular_drop { 0.0 } else { w - angular_drop * w.signum() };
        }
    }

    fn collect_contacts(&mut self) {
        self.contacts.clear();
        let reach = PUCK_RADIUS + SPECULATIVE_MARGIN;
        for (puck_index, puck) in self.pucks.iter().enumerate() {
            let c = puck.position;
            // Table walls.
            let walls = [
                (Vec2::new(1.0, 0.0), c.x + TABLE_HALF_WIDTH),
                (Vec2::new(-1.0, 0.0), TABLE_HALF_WIDTH - c.x),
                (Vec2::new(0.0, 1.0), c.y),
                (Vec2::new(0.0, -1.0), TABLE_DEPTH - c.y),
            ];
            for (normal, distance) in walls {
                if distance < reach {
                    self.contacts.push(Contact {
                        puck: puck_index,
                        partner: Partner::Kinematic(Vec2::ZERO),
                        normal,
                        penetration: PUCK_RADIUS - distance,
                        friction: WALL_FRICTION,
                        normal_impulse: 0.0,
                        tangent_impulse: 0.0,
                    });
                }
            }
            // Grippers.
            for arm in &self.arms {
                let points = arm.points();
                for (part, capsule) in arm.gripper_capsules().iter().enumerate() {
                    let closest = closest_point_on_segment(c, capsule.a, capsule.b);
                    let offset = c - closest;
                    let distance = offset.length();
                    if distance - capsule.radius >= reach {
                        continue;
                    }
                    let normal = offset.normalized_or(points.heading);
                    let contact_point = c - normal * PUCK_RADIUS;
                    let lateral = match part {
                        1 => 1.0,
                        2 => -1.0,
                        _ => 0.0,
                    };
                    let velocity = arm.gripper_point_velocity(&points, contact_point, lateral);
                    self.contacts.push(Contact {
                        puck: puck_index,
                        partner: Partner::Kinematic(velocity),
                        normal,
                        penetration: PUCK_RADIUS + capsule.radius - distance,
                        friction: GRIPPER_FRICTION,
                        normal_impulse: 0.0,
                        tangent_impulse: 0.0,
                    });
                }
            }
        }
        // Puck against puck.
        let offset = self.pucks[0].position - self.pucks[1].position;
        let distance = offset.length();
        if distance < 2.0 * PUCK_RADIUS + SPECULATIVE_MARGIN {
            self.contacts.push(Contact {
                puck: 0,
                partner: Partner::Puck(1),
                normal: offset.normalized_or(Vec2::new(1.0, 0.0)),
                penetration: 2.0 * PUCK_RADIUS - distance,
                friction: PUCK_PUCK_FRICTION,
                normal_impulse: 0.0,
                tangent_impulse: 0.0,
            });
        }
    }

    fn solve_contacts(&mut self, h: f32) {
        let inv_mass = 1.0 / PUCK_MASS;
        let inv_inertia = 1.0 / PUCK_INERTIA;
        for _ in 0..SOLVER_ITERATIONS {
            for k in 0..self.contacts.len() {
                let contact = self.contacts[k];
                let n = contact.normal;
                let t = n.perp();
                let r_a = -n * PUCK_RADIUS;
                let a = &self.pucks[contact.puck];
                let mut v_rel = a.velocity + r_a.perp() * a.angular_velocity;
                let mut k_normal = inv_mass;
                let mut k_tangent = inv_mass + r_a.cross(t).powi(2) * inv_inertia;
                let r_b = n * PUCK_RADIUS;
                match contact.partner {
                    Partner::Kinematic(v) => v_rel = v_rel - v,
                    Partner::Puck(j) => {
                        let b = &self.pucks[j];
                        v_rel = v_rel - (b.velocity + r_b.perp() * b.angular_velocity);
                        k_normal += inv_mass;
                        k_tangent += inv_mass + r_b.cross(t).powi(2) * inv_inertia;
                    }
                }
                // Normal: keep approach speed within the speculative gap, push out penetration.
                let target_normal_speed = if contact.penetration < 0.0 {
                    contact.penetration / h
                } else {
                    BAUMGARTE * (contact.penetration - PENETRATION_SLOP).max(0.0) / h
                };
                let v_n = v_rel.dot(n);
                let old_n = contact.normal_impulse;
                let new_n = (old_n + (target_normal_speed - v_n) / k_normal).max(0.0);
                let d_n = new_n - old_n;
                // Friction within the Coulomb cone of the accumulated normal impulse.
                let v_t = (v_rel + n * (d_n * k_normal)).dot(t);
                let old_t = contact.tangent_impulse;
                let limit = contact.friction * new_n;
                let new_t = (old_t - v_t / k_tangent).clamp(-limit, limit);
                let d_t = new_t - old_t;
                self.contacts[k].normal_impulse = new_n;
                self.contacts[k].tangent_impulse = new_t;
                let impulse = n * d_n + t * d_t;
                let a = &mut self.pucks[contact.puck];
                a.velocity = a.velocity + impulse * inv_mass;
                a.angular_velocity += r_a.cross(impulse) * inv_inertia;
                if let Partner::Puck(j) = contact.partner {
                    let b = &mut self.pucks[j];
                    b.velocity = b.velocity - impulse * inv_mass;
                    b.angular_velocity -= r_b.cross(impulse) * inv_inertia;
                }
            }
        }
    }
}
