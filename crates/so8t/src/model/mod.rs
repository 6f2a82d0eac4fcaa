mod autograd;
mod buffers;
pub mod decoder;
mod layer;
mod ops;
pub mod rotation;

pub use decoder::{Decoder, Site};
pub use layer::KvCache;
pub use rotation::BlockRotation;
