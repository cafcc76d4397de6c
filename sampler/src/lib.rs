//! Differentiable denoising trajectories with a learnable initial noise z0.
//!
//! * [`denoiser`]: the `Denoiser` trait (x0 prediction for (B, C, T, H, W) latents at per-frame
//!   σ), raw `Network`s + [`param`]eterisations, frame replacement, CFG, analytic denoisers.
//! * [`schedule`]: Karras and rectified-flow shift schedules.
//! * [`solver`]: Euler, RES (Cosmos `res_sampler`), UniPC bh2 — one `Solver` trait.
//! * [`noise`]: `ode` / `sde` / `sde-learnable` (DNO: every step noise learned) / `sde-from-z0` (step
//!   noises ξ_i = Q_i z0, the source's learnable step noise) modes and churn.
//! * [`trajectory`]: forward, per-step recomputation backward, full-graph backward.
//! * [`objective`], [`optimize`]: what is optimised and the loop that does it.
//! * [`config`], [`report`], [`demo`]: the params file, outputs, and the built-in demo setup.
//! * [`cosmos`]: the Cosmos models (DiT, Wan VAE) with upstream names and configs.
//! * [`world_model`]: the embedded pixel-space Cosmos-DiT world model of the environment
//!   (data, EDM training, evaluation); [`stress`]: the LAPO policy objective and the default
//!   policy stress test.

pub mod app;
pub mod config;
pub mod cosmos;
pub mod demo;
pub mod denoiser;
pub mod noise;
pub mod objective;
pub mod optimize;
pub mod param;
pub mod report;
pub mod schedule;
pub mod solver;
pub mod stress;
pub mod trajectory;
pub mod world_model;
