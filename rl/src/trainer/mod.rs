//! The training loop's parts around [`crate::lapo`], one concern per file: what the model sees
//! of the data ([`normalization`]), minibatches over a dataset ([`replay`]), evaluation in the
//! environment ([`evaluation`]) or, for imported data, on held-out episodes ([`offline`]), and
//! checkpoints with bit-exact resume and the divergence guard
//! ([`checkpoint`]). The loop itself is [`crate::train::run`]. Everything is re-exported here,
//! so `rl::trainer::X` names every item.

pub mod checkpoint;
pub mod evaluation;
pub mod normalization;
pub mod offline;
pub mod replay;

pub use checkpoint::{
    check_state, checkpoint_paths, field_differences, load_checkpoint, read_checkpoint_info, save_checkpoint,
    CheckpointInfo, DivergenceBound, DIVERGENCE_FACTOR,
};
pub use evaluation::{evaluate, evaluate_behaviour, paired_difference, Actor, Evaluation, PairedDifference};
pub use normalization::{
    model_state, privileged_targets, task_frame_features, uses_images, Normalization, TASK_FRAME_DIM,
};
pub use offline::{evaluate_offline, OfflineEvaluation};
pub use replay::{cameras_to_chw, Replay};
