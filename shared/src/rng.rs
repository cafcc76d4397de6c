//! A tiny seeded generator that makes the same numbers on every device and platform.
//!
//! Candle's CPU `randn` draws from a thread-local RNG that `set_seed` cannot seed, and CUDA's
//! differs from it; tests and reproducible runs need one stream that depends only on a seed.

use candle_core::{DType, Device, Result, Shape, Tensor};

/// SplitMix64 (Steele, Lea, Flood 2014): 64-bit state, passes BigCrush, trivially seedable.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed ^ 0x9E37_79B9_7F4A_7C15 }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by Box–Muller (one value per call; the twin is discarded for simplicity).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// A tensor of standard normals, generated in f64 on the host and then converted.
    pub fn normal_tensor<S: Into<Shape>>(&mut self, shape: S, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f64> = (0..shape.elem_count()).map(|_| self.normal()).collect();
        Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
    }

    /// A tensor of uniforms in [lo, hi).
    pub fn uniform_tensor<S: Into<Shape>>(
        &mut self,
        shape: S,
        lo: f64,
        hi: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f64> = (0..shape.elem_count()).map(|_| lo + (hi - lo) * self.uniform()).collect();
        Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
    }
}
