//! SO8T: a runtime for Llama-family language models with SO(8) rotation gates and
//! triality heads. The modules follow the data: `formats` (files) → `model` (decoder)
//! → `generate` (tokens out). The contract for the model math is `SO8T_SPEC.md`, kept
//! beside the repository at `../shared/SO8T_SPEC.md` from its root; "spec §N" in the
//! doc comments is its section N: §1 Base decoder, §2 so(8) and SO(8), §3 Triality,
//! §4 Gates, §5 Triality heads, §6 Training, §7 Files.

pub mod artifact;
pub mod chat;
pub mod config;
pub mod device;
pub mod error;
pub mod eval;
pub mod files;
pub mod formats;
pub mod fuzz;
pub mod generate;
pub mod load;
pub mod model;
pub mod sampling;
pub mod so8;
pub mod staging;
pub mod tokenizer;
pub mod train;
pub mod vision;

pub use error::{Error, Result};
pub use load::Model;
pub use so8t_kernels as kernels;
