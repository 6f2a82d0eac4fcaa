pub mod decoder;
pub mod rotation;

pub use decoder::{Decoder, Site};
pub use rotation::BlockRotation;
