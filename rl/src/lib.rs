//! LAPO offline RL and the bimanual environment.

pub mod dataset;
pub mod encoders;
pub mod env;
pub mod lapo;
pub mod nets;
pub mod plot;
pub mod policy;
pub mod train;
pub mod trainer;
