//! Software rendering of the three cameras.
//!
//! All cameras are orthographic and look straight down, which matches the planar physics and
//! keeps rendering to a handful of per-pixel tests (no GPU, no windowing, bit-exact across
//! runs). Each camera is an affine map from pixel centres to table coordinates; shapes are
//! filled by scanning their pixel bounding boxes. The global camera's static layer (floor,
//! table, goals) is cached per episode, so a frame costs one copy plus the moving parts; wrist
//! cameras move with their gripper and redraw everything.
//!
//! Wrist cameras: centred 6 cm ahead of the gripper cup and rotated so that the gripper
//! heading points up in the image; they span 30 cm across, so a caged puck fills a good part of
//! the view. The global camera spans 1.2 m across, centred on the table.

use super::physics::{Arm, Vec2, World, GOAL_RADIUS, PUCK_RADIUS, TABLE_DEPTH, TABLE_HALF_WIDTH};
use super::NUM_CAMERAS;

type Rgb = [u8; 3];

const FLOOR: Rgb = [58, 60, 68];
const TABLE: Rgb = [206, 186, 146];
const TABLE_GRID: Rgb = [184, 164, 126];
const TABLE_EDGE: Rgb = [120, 88, 58];
const GOAL_RING: [Rgb; 2] = [[200, 70, 70], [70, 90, 200]];
const GOAL_FILL: [Rgb; 2] = [[240, 170, 165], [170, 185, 240]];
const PUCK: [Rgb; 2] = [[205, 28, 28], [28, 58, 205]];
const PUCK_MARK: Rgb = [250, 250, 250];
const UPPER_ARM: [Rgb; 2] = [[232, 150, 40], [40, 180, 170]];
const FOREARM: [Rgb; 2] = [[200, 120, 30], [30, 150, 140]];
const JOINT: Rgb = [40, 40, 44];
const GRIPPER: Rgb = [70, 70, 76];

const GLOBAL_SPAN: f32 = 1.2;
const GLOBAL_CENTER: Vec2 = Vec2::new(0.0, 0.33);
const WRIST_SPAN: f32 = 0.30;
const WRIST_LOOK_AHEAD: f32 = 0.06;

/// Pixel centre (px, py) maps to `origin + px * ex + py * ey` (ex ⟂ ey, |ex| = |ey| = scale).
#[derive(Clone, Copy, Debug)]
struct Camera {
    origin: Vec2,
    ex: Vec2,
    ey: Vec2,
    scale: f32,
}

impl Camera {
    /// `right` and `down` are unit vectors: the world directions of image +x and +y.
    fn new(center: Vec2, right: Vec2, down: Vec2, span: f32, height: usize, width: usize) -> Self {
        let scale = span / width as f32;
        let ex = right * scale;
        let ey = down * scale;
        let origin = center - ex * (width as f32 * 0.5 - 0.5) - ey * (height as f32 * 0.5 - 0.5);
        Self { origin, ex, ey, scale }
    }

    fn pixel_of(&self, p: Vec2) -> (f32, f32) {
        let d = p - self.origin;
        let inv = 1.0 / (self.scale * self.scale);
        (d.dot(self.ex) * inv, d.dot(self.ey) * inv)
    }
}

/// An image being drawn through one camera.
struct Canvas<'a> {
    pixels: &'a mut [u8],
    height: usize,
    width: usize,
    camera: Camera,
}

impl Canvas<'_> {
    /// Calls `shade(world_point)` for every pixel in the box around `points` grown by `radius`
    /// world units, writing the colour it returns (if any).
    fn fill(&mut self, points: &[Vec2], radius: f32, mut shade: impl FnMut(Vec2) -> Option<Rgb>) {
        let grow = radius / self.camera.scale + 1.0;
        let (mut x0, mut y0, mut x1, mut y1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
        for &p in points {
            let (px, py) = self.camera.pixel_of(p);
            x0 = x0.min(px - grow);
            y0 = y0.min(py - grow);
            x1 = x1.max(px + grow);
            y1 = y1.max(py + grow);
        }
        if x1 < 0.0 || y1 < 0.0 || x0 >= self.width as f32 || y0 >= self.height as f32 {
            return;
        }
        let x0 = x0.max(0.0) as usize;
        let y0 = y0.max(0.0) as usize;
        let x1 = (x1 as usize).min(self.width - 1);
        let y1 = (y1 as usize).min(self.height - 1);
        let cam = self.camera;
        for py in y0..=y1 {
            let mut world = cam.origin + cam.ex * x0 as f32 + cam.ey * py as f32;
            let row = py * self.width;
            for px in x0..=x1 {
                if let Some(rgb) = shade(world) {
                    let i = (row + px) * 3;
                    self.pixels[i..i + 3].copy_from_slice(&rgb);
                }
                world = world + cam.ex;
            }
        }
    }

    fn disc(&mut self, center: Vec2, radius: f32, rgb: Rgb) {
        let r2 = radius * radius;
        self.fill(&[center], radius, |p| ((p - center).length_squared() <= r2).then_some(rgb));
    }

    fn capsule(&mut self, a: Vec2, b: Vec2, radius: f32, rgb: Rgb) {
        let r2 = radius * radius;
        let ab = b - a;
        let inv_len2 = 1.0 / ab.length_squared().max(1e-12);
        self.fill(&[a, b], radius, |p| {
            let t = ((p - a).dot(ab) * inv_len2).clamp(0.0, 1.0);
            ((p - (a + ab * t)).length_squared() <= r2).then_some(rgb)
        });
    }

    fn background(&mut self) {
        let cam = self.camera;
        for py in 0..self.height {
            let mut world = cam.origin + cam.ey * py as f32;
            let row = py * self.width;
            for px in 0..self.width {
                let rgb = table_color(world);
                let i = (row + px) * 3;
                self.pixels[i..i + 3].copy_from_slice(&rgb);
                world = world + cam.ex;
            }
        }
    }

    fn goals(&mut self, goals: &[Vec2; 2]) {
        for (k, &goal) in goals.iter().enumerate() {
            self.disc(goal, GOAL_RADIUS, GOAL_RING[k]);
            self.disc(goal, GOAL_RADIUS - 0.01, GOAL_FILL[k]);
        }
    }

    fn moving_parts(&mut self, world: &World) {
        for (k, puck) in world.pucks.iter().enumerate() {
            self.disc(puck.position, PUCK_RADIUS, PUCK[k]);
            let mark = puck.position + Vec2::from_angle(puck.angle) * (0.55 * PUCK_RADIUS);
            self.disc(mark, 0.28 * PUCK_RADIUS, PUCK_MARK);
        }
        for (k, arm) in world.arms.iter().enumerate() {
            self.arm(k, arm);
        }
    }

    fn arm(&mut self, k: usize, arm: &Arm) {
        let p = arm.points();
        self.capsule(p.shoulder, p.elbow, 0.024, UPPER_ARM[k]);
        self.capsule(p.elbow, p.wrist, 0.019, FOREARM[k]);
        self.capsule(p.wrist, p.palm, 0.012, GRIPPER);
        self.disc(p.shoulder, 0.032, JOINT);
        self.disc(p.elbow, 0.02, JOINT);
        for capsule in arm.gripper_capsules() {
            self.capsule(capsule.a, capsule.b, capsule.radius, GRIPPER);
        }
        self.disc(p.wrist, 0.016, JOINT);
    }
}

/// Floor, table top with a 10 cm grid (gives the wrist cameras a sense of motion), table edge.
fn table_color(p: Vec2) -> Rgb {
    let edge = 0.012;
    if p.x.abs() > TABLE_HALF_WIDTH || p.y < 0.0 || p.y > TABLE_DEPTH {
        return FLOOR;
    }
    if p.x.abs() > TABLE_HALF_WIDTH - edge || p.y < edge || p.y > TABLE_DEPTH - edge {
        return TABLE_EDGE;
    }
    let gx = (p.x * 10.0 + 100.0).fract();
    let gy = (p.y * 10.0).fract();
    if !(0.04..=0.96).contains(&gx) || !(0.04..=0.96).contains(&gy) {
        TABLE_GRID
    } else {
        TABLE
    }
}

/// Renders the three cameras. Holds cached layers and is reused across episodes.
#[derive(Clone, Debug)]
pub struct Renderer {
    height: usize,
    width: usize,
    global_camera: Camera,
    /// Floor and table through the global camera (constant).
    global_background: Vec<u8>,
    /// Background plus this episode's goals.
    global_static: Vec<u8>,
    goals: [Vec2; 2],
}

impl Renderer {
    pub fn new(height: usize, width: usize) -> Self {
        let global_camera =
            Camera::new(GLOBAL_CENTER, Vec2::new(1.0, 0.0), Vec2::new(0.0, -1.0), GLOBAL_SPAN, height, width);
        let mut global_background = vec![0u8; height * width * 3];
        Canvas { pixels: &mut global_background, height, width, camera: global_camera }.background();
        Self {
            height,
            width,
            global_camera,
            global_static: global_background.clone(),
            global_background,
            goals: [Vec2::ZERO; 2],
        }
    }

    /// Caches the static layer for an episode's goals.
    pub fn set_goals(&mut self, goals: &[Vec2; 2]) {
        self.goals = *goals;
        self.global_static.copy_from_slice(&self.global_background);
        Canvas { pixels: &mut self.global_static, height: self.height, width: self.width, camera: self.global_camera }
            .goals(goals);
    }

    /// Renders [left wrist, right wrist, global] as u8 H×W×3 images.
    pub fn render(&mut self, world: &World, goals: &[Vec2; 2]) -> [Vec<u8>; NUM_CAMERAS] {
        if *goals != self.goals {
            self.set_goals(goals);
        }
        let (height, width) = (self.height, self.width);
        let mut images: [Vec<u8>; NUM_CAMERAS] = Default::default();
        for (k, image) in images.iter_mut().take(2).enumerate() {
            let arm = &world.arms[k];
            let heading = arm.points().heading;
            let center = arm.cup_point() + heading * WRIST_LOOK_AHEAD;
            let right = Vec2::new(heading.y, -heading.x);
            let camera = Camera::new(center, right, -heading, WRIST_SPAN, height, width);
            *image = vec![0u8; height * width * 3];
            let mut canvas = Canvas { pixels: image, height, width, camera };
            canvas.background();
            canvas.goals(goals);
            canvas.moving_parts(world);
        }
        let mut global = self.global_static.clone();
        Canvas { pixels: &mut global, height, width, camera: self.global_camera }.moving_parts(world);
        images[2] = global;
        images
    }
}

/// Tiles the three views side by side into one H×3W×3 image, ordered as a person would see
/// them: left wrist | global | right wrist. Meant for world-model training on multi-view
/// frames and for previews.
pub fn tile_views(images: &[Vec<u8>; NUM_CAMERAS], height: usize, width: usize) -> Vec<u8> {
    let order = [0usize, 2, 1];
    let mut tiled = vec![0u8; height * width * 3 * NUM_CAMERAS];
    let row_bytes = width * 3;
    for y in 0..height {
        for (slot, &camera) in order.iter().enumerate() {
            let src = &images[camera][y * row_bytes..(y + 1) * row_bytes];
            let dst_start = (y * NUM_CAMERAS + slot) * row_bytes;
            tiled[dst_start..dst_start + row_bytes].copy_from_slice(src);
        }
    }
    tiled
}

/// A contact sheet: one row per camera (left wrist, global, right wrist), one column per frame,
/// each image magnified by `scale` (nearest neighbour) with a `gap`-pixel dark border.
/// Returns (width, height, RGB bytes).
pub fn contact_sheet(
    frames: &[[Vec<u8>; NUM_CAMERAS]],
    height: usize,
    width: usize,
    scale: usize,
) -> (usize, usize, Vec<u8>) {
    let gap = 2;
    let cell_w = width * scale;
    let cell_h = height * scale;
    let sheet_w = frames.len() * (cell_w + gap) + gap;
    let sheet_h = NUM_CAMERAS * (cell_h + gap) + gap;
    let mut sheet = vec![24u8; sheet_w * sheet_h * 3];
    for (column, frame) in frames.iter().enumerate() {
        for (row, &camera) in [0usize, 2, 1].iter().enumerate() {
            let image = &frame[camera];
            let x0 = gap + column * (cell_w + gap);
            let y0 = gap + row * (cell_h + gap);
            for y in 0..cell_h {
                for x in 0..cell_w {
                    let src = ((y / scale) * width + x / scale) * 3;
                    let dst = ((y0 + y) * sheet_w + x0 + x) * 3;
                    sheet[dst..dst + 3].copy_from_slice(&image[src..src + 3]);
                }
            }
        }
    }
    (sheet_w, sheet_h, sheet)
}
