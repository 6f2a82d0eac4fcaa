use anyhow::Result;
use so8t::artifact::bake::{bake, BakeOptions, OutDType};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// An SO8T directory (from `so8t convert`).
    so8t_dir: PathBuf,
    /// The plain HF directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype of the output (default: the base's; bf16 for an FP8 base).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

pub fn main(a: Args) -> Result<()> {
    let dtype = a.dtype.map(|d| match d {
        DTypeArg::F32 => OutDType::F32,
        DTypeArg::F16 => OutDType::F16,
        DTypeArg::Bf16 => OutDType::BF16,
    });
    bake(
        &a.so8t_dir,
        &a.out,
        &BakeOptions {
            dtype,
            force: a.force,
            sites: None,
        },
    )?;
    eprintln!(
        "wrote {} (gates folded into the weights; heads in so8t_heads.safetensors)",
        a.out.display()
    );
    Ok(())
}
