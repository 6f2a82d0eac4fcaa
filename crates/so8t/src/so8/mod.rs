//! The SO8T additions to a decoder (spec §2–§5): the so(8) algebra, octonion triality,
//! rotation gates at the five sites, and the triality heads.

pub mod adapter;
pub mod algebra;
pub mod bake;
pub mod convert;
pub mod export;
pub mod export_tokenizer;
pub mod gates;
pub mod modelfile;
pub mod triality;
pub mod validate;
