//! `so8t`: convert, train, bake, export, run and serve SO8T models.

mod audit;
mod bake;
mod bench;
mod convert;
mod eval;
mod export;
mod inspect;
mod modelfile;
mod run;
mod serve;
mod train;
mod validate;

use clap::{Parser, Subcommand};
use std::path::Path;
use std::process::ExitCode;

/// `--device`, for the commands that run the decoder.
#[derive(clap::Args)]
struct DeviceArg {
    /// Where the decoder runs: cpu, cuda (GPU 0) or cuda:N (a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// What a GPU multiplies f16/bf16 weights in: auto (their own type: half the memory,
    /// logits within about 1% of the CPU's) or f32 (widened there: the CPU's numbers).
    #[arg(long, default_value = "auto")]
    dtype: String,
}

impl DeviceArg {
    /// The device and the dtype, resolved before any model is read (a missing GPU is
    /// said at once).
    fn open(&self) -> anyhow::Result<(candle_core::Device, so8t::device::Dtype)> {
        let dtype = so8t::device::Dtype::parse(&self.dtype)?;
        Ok((so8t::device::open(&self.device)?, dtype))
    }

    /// The model at `path`, on the device.
    fn open_model(&self, path: &Path) -> anyhow::Result<so8t::Model> {
        let (device, dtype) = self.open()?;
        let mut model = so8t::Model::open(path)?;
        model.to_device(&device, dtype)?;
        Ok(model)
    }
}

#[derive(Parser)]
#[command(
    name = "so8t",
    version,
    about = "SO8T: Llama-family models with SO(8) rotation gates and triality heads"
)]
struct Cli {
    /// Worker threads for tensor ops (default: all cores).
    #[arg(short = 't', long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (HF directory or .gguf file).
    Run(run::Args),
    /// Describe a model: architecture, sizes, tensor types, tokenizer.
    Inspect(inspect::Args),
    /// Measure prompt processing and generation speed, like llama-bench.
    Bench(bench::Args),
    /// Turn a base model into an SO8T model: rotation gates and triality heads.
    Convert(convert::Args),
    /// Fold the gates into the weights: a plain HF directory plus so8t_heads.safetensors.
    Bake(bake::Args),
    /// Write a GGUF v3 file that llama.cpp loads (an SO8T directory is baked on the fly).
    Export(export::Args),
    /// Write an Ollama Modelfile for a GGUF.
    Modelfile(modelfile::Args),
    /// Train the heads (and the gates) of an SO8T directory on labelled JSONL.
    Train(train::Args),
    /// Measure the heads on labelled JSONL: accuracy, precision, recall, F1, AUROC, FPR.
    Eval(eval::Args),
    /// Serve the model over an OpenAI-compatible HTTP API, with a chat page at /.
    Serve(serve::Args),
    /// Query the audit log that `serve --audit` writes.
    Audit(audit::Args),
    /// Check an SO8T directory: rotations, triality, shapes, NaN/Inf, base checksum.
    Validate(validate::Args),
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == so8t::chat::sandbox::CHILD_ARG) {
        return so8t::chat::sandbox::child_main();
    }
    let cli = Cli::parse();
    // Chat templates come with the checkpoint: they render in a child process with a
    // memory budget (so8t::chat::sandbox), which needs this binary's path.
    match std::env::current_exe() {
        Ok(exe) => so8t::chat::sandbox::enable(exe),
        Err(e) => eprintln!("so8t: cannot find this program's path ({e}): chat templates render without a memory budget"),
    }
    if let Some(t) = cli.threads {
        // The kernels' workers spin while they wait: threads beyond the cores take turns
        // on them and each token then costs scheduler slices (200 threads on 2 cores:
        // minutes per token). Capped, and said so.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let t = t.clamp(1, cores);
        if cli.threads != Some(t) {
            eprintln!("so8t: --threads {} is outside 1..={cores} (the cores here); using {t}", cli.threads.unwrap_or(0));
        }
        // Read by rayon and candle when their thread pools start, which is after this.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("SO8T_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(a) => run::main(a),
        Command::Inspect(a) => inspect::main(a),
        Command::Bench(a) => bench::main(a),
        Command::Convert(a) => convert::main(a),
        Command::Validate(a) => validate::main(a),
        Command::Bake(a) => bake::main(a),
        Command::Export(a) => export::main(a),
        Command::Modelfile(a) => modelfile::main(a),
        Command::Train(a) => train::main(a),
        Command::Eval(a) => eval::main(a),
        Command::Serve(a) => serve::main(a),
        Command::Audit(a) => audit::main(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
