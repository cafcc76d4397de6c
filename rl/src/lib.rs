//! LAPO offline RL and the bimanual environment.

pub mod dataset;
pub mod env;
