//! The SO8T additions to a decoder (spec §2–§5): the so(8) algebra, octonion triality,
//! rotation gates at the five sites, and what the triality heads say and decide.

pub mod algebra;
pub mod gates;
pub mod triality;
pub mod verdict;
