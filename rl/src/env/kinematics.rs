//! Closed-form inverse kinematics for the three-joint planar arms.
//!
//! The gripper pose (cup point and heading) fixes the wrist position, which leaves a two-link
//! problem with a closed-form solution; the wrist joint then takes up the remaining heading.
//! Used by the scripted expert for Cartesian control and by the task sampler to reject goals
//! the arm could not push toward.

use super::physics::{wrap_angle, Vec2, CUP_OFFSET, JOINT_LIMITS, LINK_LENGTHS, WRIST_TO_PALM};

/// Result of [`solve`]: joint angles and whether the pose was reachable without clamping.
#[derive(Clone, Copy, Debug)]
pub struct IkSolution {
    pub q: [f32; 3],
    pub reachable: bool,
}

/// Joint angles placing the cup point at `cup` with gripper heading `heading` (rad).
/// `elbow_sign` picks the elbow branch (-1: elbow bends clockwise, used by the left arm so its
/// elbow points outward). The wrist turns through more than a full circle, so of the wrist
/// angles giving `heading` the one nearest `wrist_reference` (usually the current wrist angle)
/// is chosen. Out-of-reach targets are clamped to the workspace boundary.
pub fn solve(base: Vec2, elbow_sign: f32, cup: Vec2, heading: f32, wrist_reference: f32) -> IkSolution {
    let h = Vec2::from_angle(heading);
    let wrist = cup - h * (CUP_OFFSET + WRIST_TO_PALM);
    let [l1, l2] = LINK_LENGTHS;
    let mut d = wrist - base;
    let mut distance = d.length();
    let min_reach = (l1 - l2).abs() + 0.05;
    let max_reach = l1 + l2 - 1e-3;
    let mut reachable = true;
    if distance > max_reach || distance < min_reach {
        reachable = false;
        let clamped = distance.clamp(min_reach, max_reach);
        d = d.normalized_or(Vec2::new(0.0, 1.0)) * clamped;
        distance = clamped;
    }
    let cos_q2 = ((distance * distance - l1 * l1 - l2 * l2) / (2.0 * l1 * l2)).clamp(-1.0, 1.0);
    let q2 = elbow_sign * cos_q2.acos();
    let q1 = d.angle() - (l2 * q2.sin()).atan2(l1 + l2 * q2.cos());
    // Shoulder range is [-π/2, 3π/2): shift by a full turn into it.
    let (lo, _) = JOINT_LIMITS[0];
    let q1 = lo + (q1 - lo).rem_euclid(std::f32::consts::TAU);
    let (lo3, hi3) = JOINT_LIMITS[2];
    let q3 = wrist_reference + wrap_angle(heading - q1 - q2 - wrist_reference);
    let tau = std::f32::consts::TAU;
    let q3 = if q3 > hi3 {
        q3 - tau
    } else if q3 < lo3 {
        q3 + tau
    } else {
        q3
    };
    let q = [q1, q2, q3];
    for (j, &angle) in q.iter().enumerate() {
        let (lo, hi) = JOINT_LIMITS[j];
        if angle < lo || angle > hi {
            reachable = false;
        }
    }
    IkSolution { q, reachable }
}

/// Whether the pose is reachable with the elbow `margin` radians away from its limit and from
/// the stretched-out singularity.
pub fn comfortably_reachable(base: Vec2, elbow_sign: f32, cup: Vec2, heading: f32, margin: f32) -> bool {
    let solution = solve(base, elbow_sign, cup, heading, 0.0);
    let q2 = solution.q[1];
    solution.reachable && q2.abs() < JOINT_LIMITS[1].1 - margin && q2.abs() > margin
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::physics::{Arm, ARM_BASES, GRIP_OPEN};

    #[test]
    fn forward_kinematics_inverts_inverse_kinematics() {
        for (arm_index, elbow_sign) in [(0usize, -1.0f32), (1, 1.0)] {
            let base = ARM_BASES[arm_index];
            for (cup, heading) in [
                (Vec2::new(base.x * 0.5, 0.35), 1.2f32),
                (Vec2::new(base.x, 0.25), -0.4),
                (Vec2::new(base.x * 1.2, 0.45), 2.5),
            ] {
                let solution = solve(base, elbow_sign, cup, heading, 0.0);
                assert!(solution.reachable, "{cup:?} {heading}");
                let arm = Arm::new(base, solution.q, GRIP_OPEN, elbow_sign);
                let reached = arm.cup_point();
                assert!((reached - cup).length() < 1e-4, "{reached:?} vs {cup:?}");
                assert!(wrap_angle(arm.heading_angle() - heading).abs() < 1e-4);
            }
        }
    }
}
