pub mod decoder;
pub mod rotation;

pub use decoder::{Decoder, KvCache, Site};
pub use rotation::BlockRotation;
