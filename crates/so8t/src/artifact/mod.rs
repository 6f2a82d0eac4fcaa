//! SO8T checkpoints (spec §7): the files of an SO8T directory (`adapter`: its config,
//! generators and heads), and the tools that make, check and ship them: `convert` (a base
//! model into an SO8T directory), `validate`, `bake` (gates into the weights), `export`
//! (GGUF, with `export_tokenizer`, and a vision model's projector, `mmproj`) and
//! `modelfile` (Ollama).

pub mod adapter;
pub mod bake;
pub mod convert;
pub mod export;
pub mod export_tokenizer;
pub mod mmproj;
pub mod modelfile;
pub mod peft;
pub mod validate;
pub mod vllm;
