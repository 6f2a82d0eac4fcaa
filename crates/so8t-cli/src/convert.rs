use anyhow::{bail, Result};
use so8t::model::Site;
use so8t::artifact::convert::{convert, ConvertOptions, Init};
use so8t::so8::gates::Granularity;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Base model: HF directory or .gguf file (a GGUF is dequantised to f32 safetensors).
    base: PathBuf,
    /// The SO8T directory to write.
    #[arg(long)]
    out: PathBuf,
    /// Gate sites, comma-separated, from q,k,v,o,mlp.
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,mlp")]
    sites: Vec<String>,
    #[arg(long, value_enum, default_value = "shared")]
    granularity: GranularityArg,
    /// Factors in application order: R = R_last · … · R_first.
    #[arg(long, value_delimiter = ',', default_value = "safe,cmd")]
    factors: Vec<String>,
    #[arg(long, value_enum, default_value = "zero")]
    init: InitArg,
    /// Seed for --init random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generator entries are drawn uniformly from [−scale, scale] with --init random.
    #[arg(long, default_value_t = 0.05)]
    scale: f64,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// A PEFT OFT adapter directory (block size 8, use_cayley_neumann false) trained on
    /// BASE: its rotations become the o and mlp gates (per-head generators).
    #[arg(long, conflicts_with_all = ["sites", "granularity", "factors", "init", "seed", "scale"])]
    from_peft: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GranularityArg {
    Shared,
    PerHead,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum InitArg {
    Zero,
    Random,
}

pub fn main(a: Args) -> Result<()> {
    if let Some(peft) = &a.from_peft {
        let cfg = so8t::artifact::peft::import_peft_oft(peft, &a.base, &a.out, a.force)?;
        eprintln!(
            "wrote {} ({} base, the OFT rotations of {} as sites {:?}, per-head generators, heads untrained)",
            a.out.display(),
            cfg.base.architecture,
            peft.display(),
            cfg.sites.iter().map(|s| s.name()).collect::<Vec<_>>()
        );
        return Ok(());
    }
    let mut sites = Vec::new();
    for s in &a.sites {
        match Site::parse(s) {
            Some(site) if !sites.contains(&site) => sites.push(site),
            Some(_) => bail!("site `{s}` given twice"),
            None => bail!("unknown site `{s}` (expected q, k, v, o or mlp)"),
        }
    }
    if !(a.scale.is_finite() && a.scale > 0.0) {
        bail!("--scale must be a positive number");
    }
    let opts = ConvertOptions {
        sites,
        granularity: match a.granularity {
            GranularityArg::Shared => Granularity::Shared,
            GranularityArg::PerHead => Granularity::PerHead,
        },
        factors: a.factors.clone(),
        init: match a.init {
            InitArg::Zero => Init::Zero,
            InitArg::Random => Init::Random {
                seed: a.seed,
                scale: a.scale,
            },
        },
        force: a.force,
    };
    let cfg = convert(&a.base, &a.out, &opts)?;
    eprintln!(
        "wrote {} ({} base, sites {:?}, factors {:?}, init {}, base sha256 {})",
        a.out.display(),
        cfg.base.architecture,
        cfg.sites.iter().map(|s| s.name()).collect::<Vec<_>>(),
        cfg.factors,
        cfg.init.kind,
        &cfg.base.sha256[..16]
    );
    Ok(())
}
