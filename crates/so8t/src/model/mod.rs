mod buffers;
pub mod decoder;
mod layer;
mod ops;
pub mod rotation;
mod tensors;

pub use decoder::{Decoder, Media, Site};
pub use layer::KvCache;
pub use rotation::BlockRotation;
