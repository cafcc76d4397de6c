//! NVIDIA Cosmos world models, one model per file as diffusers lays them out, each with a serde
//! `Config` read from the upstream `config.json` and upstream parameter names so real weights
//! load as they are.
//!
//! * [`transformer`]: `CosmosTransformer3DModel`, the Cosmos DiT (Predict2 / Predict2.5).
//! * [`vae`]: `AutoencoderKLWan`, the Wan2.1 video VAE every Cosmos model since Predict2 works in.
//! * [`memory_plan`]: the memory one z0 optimisation iteration needs, predicted before loading.
//! * [`pipeline`]: diffusers pipeline repositories (local or from the Hub) and their denoising loops.

pub mod app;
pub mod memory_plan;
pub mod pipeline;
pub mod transformer;
pub mod vae;
