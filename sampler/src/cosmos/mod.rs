//! NVIDIA Cosmos world models, one model per file as diffusers lays them out, each with a serde
//! `Config` read from the upstream `config.json` and upstream parameter names so real weights
//! load as they are.
//!
//! * [`transformer`]: `CosmosTransformer3DModel`, the Cosmos DiT (Predict2 / Predict2.5 /
//!   Transfer2.5).
//! * [`controlnet`]: `CosmosControlNetModel`, the Cosmos-Transfer2.5 ControlNet.
//! * [`controls`]: the edge (Canny) and blur control videos Transfer2.5 computes from the input.
//! * [`vae`]: `AutoencoderKLWan`, the Wan2.1 video VAE every Cosmos model since Predict2 works in.
//! * [`text_encoder`]: the T5 prompt encoder of Cosmos-Predict2 (`T5EncoderModel` + tokenizer).
//! * [`memory_plan`]: the memory one z0 optimisation iteration needs, predicted before loading.
//! * [`pipeline`]: diffusers pipeline repositories (local or from the Hub) and their denoising loops.
//! * [`transfer`]: Cosmos-Transfer2.5's chunked, ControlNet-steered loop.
//! * [`inputs`], [`h264`], [`params_file`], [`policy`]: the `sampler cosmos` command line's
//!   input files, MP4 video, Cosmos-Predict2.5 inference JSON and policy objective.

pub mod app;
pub mod controlnet;
pub mod controls;
pub mod h264;
pub mod inputs;
pub mod memory_plan;
pub mod params_file;
pub mod pipeline;
pub mod policy;
pub mod text_encoder;
pub mod transfer;
pub mod transfer_cli;
pub mod transformer;
pub mod vae;
