//! The decoder, gates, heads and gates training on a GPU against the same on the CPU
//! (issue #20). Built only with `--features cuda`; needs an NVIDIA GPU, and where none
//! answers each test says so and returns (CI has none). Besides the tiny fixtures of every
//! architecture, `SO8T_CUDA_MODELS` names more models (paths, `:`-separated),
//! `SO8T_CUDA_REPORT` a file each measured difference is appended to, as JSON lines, and
//! `SO8T_FIXTURES` the fixtures where the binary runs away from the tree it was built in.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor};
use so8t::artifact::convert::{convert, ConvertOptions, Init};
use so8t::device::Dtype;
use so8t::Model;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The GPU, or why there is none.
fn gpu() -> Option<Device> {
    match so8t::device::open("cuda") {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIPPED: no CUDA device here ({e})");
            None
        }
    }
}

fn fixtures() -> PathBuf {
    std::env::var_os("SO8T_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

/// `n` greedy tokens after `prompt`, straight from the decoder.
fn greedy(model: &mut Model, prompt: &[u32], n: usize) -> Vec<u32> {
    model.decoder.clear_cache();
    let mut out = Vec::new();
    let mut h = model.decoder.forward_hidden(prompt, 0).unwrap();
    for _ in 0..n {
        let last = h.get(h.dim(0).unwrap() - 1).unwrap().unsqueeze(0).unwrap();
        let logits = model.decoder.logits(&last).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        out.push(so8t::sampling::argmax(&logits));
        h = model.decoder.forward_hidden(&out[out.len() - 1..], prompt.len() + out.len() - 1).unwrap();
    }
    out
}

fn report(line: serde_json::Value) {
    eprintln!("{line}");
    if let Ok(path) = std::env::var("SO8T_CUDA_REPORT") {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

fn host(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// An SO8T directory of the tiny Qwen3 fixture with random gates, and so heads.
fn tiny_so8t(dir: &Path) -> PathBuf {
    let out = dir.join("so8t");
    let opts = ConvertOptions { init: Init::Random { seed: 3, scale: 0.1 }, ..Default::default() };
    convert(&fixtures().join("tiny-qwen3"), &out, &opts).unwrap();
    out
}

/// The models compared: a fixture of each architecture, an SO8T directory, and those named.
fn models(tmp: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3"].iter().map(|n| fixtures().join(n)).collect();
    v.push(tiny_so8t(tmp));
    if let Ok(list) = std::env::var("SO8T_CUDA_MODELS") {
        v.extend(list.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    v
}

/// `n` prompt ids: English text where the model has a tokenizer that gives that many
/// (next-token distributions are peaked there, as in use), else ids spread over the
/// vocabulary; the same for both devices.
fn prompt(model: &Model, n: usize) -> Vec<u32> {
    const TEXT: &str = "The history of the printing press begins in the fifteenth century, when \
        Johannes Gutenberg combined movable metal type, oil-based ink and a screw press. Within \
        fifty years presses were working in more than two hundred cities across Europe, and the \
        price of books fell so far that reading spread from monasteries to merchants, craftsmen \
        and their children, changing religion, science and politics for good.";
    if let Some(ids) = model.tokenizer.as_ref().and_then(|t| t.encode(TEXT, false).ok()).filter(|ids| ids.len() >= n) {
        return ids[..n].to_vec();
    }
    let vocab = model.config.vocab_size as u64;
    (0..n as u64).map(|i| ((i * 7919 + 13) % vocab.min(32000)) as u32).collect()
}

/// Heads with weights drawn from a fixed sequence (a converted model's are zero, whose
/// verdicts are 0.5 everywhere and would compare nothing), the same on both models.
fn random_heads(models: [&mut Model; 2]) {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut draw = |t: &Tensor| {
        let vals: Vec<f32> = (0..t.elem_count())
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect();
        Tensor::from_vec(vals, t.shape(), &Device::Cpu).unwrap()
    };
    let Some(first) = &models[0].so8t else { return };
    let h = &first.heads;
    let heads = [draw(&h.safety_w), draw(&h.safety_b), draw(&h.authority_w), draw(&h.authority_b)];
    for m in models {
        let h = &mut m.so8t.as_mut().unwrap().heads;
        [h.safety_w, h.safety_b, h.authority_w, h.authority_b] = heads.clone();
    }
}

/// How the model's matrices are stored, for the tolerance.
fn weights_kind(model: &Model) -> &'static str {
    let types: Vec<String> = model.weights.dtype_counts().into_iter().map(|(t, _)| t.to_uppercase()).collect();
    if types.iter().any(|t| t.starts_with('Q')) {
        "ggml blocks"
    } else if types.iter().any(|t| t == "F16" || t == "BF16") {
        "f16/bf16"
    } else {
        "f32"
    }
}

/// Logits at every position of a 64-token prompt (one forward, and again as a prompt of 40
/// then single-token steps through the KV cache), the heads' verdicts at every position,
/// and 24 greedy tokens, on the GPU against the CPU.
///
/// Tolerances: f32 weights run the same f32 arithmetic in another summation order (cuBLAS
/// against candle's gemm and our kernels), ~1e-6 relative per product, which over a few
/// dozen layers stays below 1e-4 of the logits' scale (as the CPU paths are compared in
/// so8t_model.rs); a wrong operation moves logits by their own size. f16/bf16 weights multiply f32
/// activations on the CPU but activations rounded to the weights' type on the GPU: 2⁻⁹
/// relative per rounding for bf16, 7 products a layer, adding up as a random walk over
/// 24 layers to √168·2⁻⁹ ≈ 2.5%, so 3% of the logits' scale; widened to f32 there
/// (`--dtype f32`) they are the f32 case. ggml blocks quantise
/// the activations on both (Q8_0 blocks on our kernels, Q8_1 in candle's CUDA kernels), so
/// there the agreement of each position's top token is checked and the difference reported.
#[test]
fn logits_verdicts_and_greedy_tokens_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for path in models(tmp.path()) {
        let mut cpu = Model::open(&path).unwrap();
        let mut dev = Model::open(&path).unwrap();
        dev.to_device(&gpu, Dtype::Auto).unwrap();
        random_heads([&mut cpu, &mut dev]);
        let n = 64.min(cpu.config.context());
        let ids = prompt(&cpu, n);
        let a = cpu.decoder.forward_all(&ids).unwrap();
        let b = host(&dev.decoder.forward_all(&ids).unwrap());
        let scale = max_abs(&a);
        let diff = max_abs_diff(&a, &b);
        let verdicts = |m: &Model| m.so8t.as_ref().map(|s| s.verdicts(&m.decoder, None).unwrap());
        let verdict_diff = match (verdicts(&cpu), verdicts(&dev)) {
            (Some(x), Some(y)) => x
                .iter()
                .zip(&y)
                .map(|(p, q)| (p.p_unsafe - q.p_unsafe).abs().max((p.p_escalate - q.p_escalate).abs()))
                .fold(0f32, f32::max),
            _ => 0.0,
        };
        let top = |t: &Tensor| t.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let (ta, tb) = (top(&a), top(&b));
        let top_agree = ta.iter().zip(&tb).filter(|(x, y)| x == y).count() as f32 / ta.len() as f32;

        // The same prompt through the cache: 40 at once, then one at a time.
        dev.decoder.clear_cache();
        let split = n * 5 / 8;
        let mut rows = vec![host(&dev.decoder.forward_hidden(&ids[..split], 0).unwrap())];
        for (i, &t) in ids[split..].iter().enumerate() {
            rows.push(host(&dev.decoder.forward_hidden(&[t], split + i).unwrap()));
        }
        let stepped = cpu.decoder.logits(&Tensor::cat(&rows, 0).unwrap()).unwrap();
        let step_diff = max_abs_diff(&a, &stepped);

        let steps = 24.min(cpu.config.context() - 16);
        let greedy_cpu = greedy(&mut cpu, &ids[..16], steps);
        let greedy_gpu = greedy(&mut dev, &ids[..16], steps);
        let kind = weights_kind(&cpu);
        // f16/bf16 weights widened to f32 on the GPU (`--dtype f32`): the CPU's arithmetic.
        let widened = (kind == "f16/bf16").then(|| {
            let mut wide = Model::open(&path).unwrap();
            wide.to_device(&gpu, Dtype::F32).unwrap();
            let d = max_abs_diff(&a, &host(&wide.decoder.forward_all(&ids).unwrap()));
            (d, greedy(&mut wide, &ids[..16], steps) == greedy_cpu)
        });
        report(serde_json::json!({
            "model": path.display().to_string(), "weights": kind, "positions": n,
            "logit_scale": scale, "max_abs_diff": diff, "cached_steps_max_abs_diff": step_diff,
            "verdict_max_abs_diff": verdict_diff, "top1_agreement": top_agree,
            "greedy_equal": greedy_cpu == greedy_gpu,
            "dtype_f32_max_abs_diff": widened.map(|w| w.0), "dtype_f32_greedy_equal": widened.map(|w| w.1),
        }));
        let name = path.display();
        match kind {
            "f32" => {
                let tol = 1e-4 * scale;
                assert!(diff < tol && step_diff < tol, "{name}: logits differ by {diff} (cached steps {step_diff}, scale {scale})");
                assert!(verdict_diff < 1e-4, "{name}: verdicts differ by {verdict_diff}");
                assert_eq!(greedy_cpu, greedy_gpu, "{name}: greedy tokens");
            }
            "f16/bf16" => {
                assert!(diff < 3e-2 * scale.max(1.0), "{name}: logits differ by {diff} (scale {scale})");
                let (wide_diff, wide_greedy) = widened.unwrap();
                assert!(wide_diff < 1e-4 * scale, "{name}: with --dtype f32, logits differ by {wide_diff} (scale {scale})");
                assert!(wide_greedy, "{name}: with --dtype f32, greedy tokens differ");
            }
            _ => assert!(top_agree >= 0.9, "{name}: top tokens agree at {top_agree} of positions"),
        }
    }
}

/// Sequences batched on the GPU (continuous batching in `serve`) give what each gives alone.
#[test]
fn batched_sequences_match_each_alone() {
    let Some(gpu) = gpu() else { return };
    let mut m = Model::open(&fixtures().join("tiny-qwen3")).unwrap();
    m.to_device(&gpu, Dtype::Auto).unwrap();
    let prompts: [Vec<u32>; 3] = [vec![5, 9, 200, 7], vec![11, 3], vec![40, 41, 42, 43, 44, 45]];
    let alone: Vec<Tensor> = prompts
        .iter()
        .map(|p| {
            m.decoder.clear_cache();
            host(&m.decoder.forward_hidden(p, 0).unwrap())
        })
        .collect();
    let mut caches: Vec<_> = prompts.iter().map(|_| m.decoder.new_cache()).collect();
    let mut refs: Vec<&mut so8t::model::KvCache> = caches.iter_mut().collect();
    let ids: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let together = host(&m.decoder.forward_batch(&mut refs, &ids).unwrap());
    let mut row = 0;
    for (p, a) in prompts.iter().zip(&alone) {
        let d = max_abs_diff(a, &together.narrow(0, row, p.len()).unwrap());
        assert!(d < 1e-5, "a batched sequence differs from itself alone by {d}");
        row += p.len();
    }
}

/// One gates training step's gradients (LM, both heads, PET) on the GPU against the CPU's,
/// for every trained tensor: f32 throughout, the same arithmetic in another order, so
/// within 1e-3 of each gradient's scale.
#[test]
fn gates_training_gradients_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_so8t(tmp.path());
    let grads = |device: &Device| -> Vec<Tensor> {
        let mut model = Model::open(&dir).unwrap();
        model.to_device(device, Dtype::Auto).unwrap();
        let (config, adapter) = so8t::train::so8t_parts(&model).unwrap();
        let data_path = fixtures().join("train/tiny.jsonl");
        let data = so8t::train::data::read_jsonl(&data_path, &config.labels, false).unwrap();
        let opts = so8t::train::gates::GatesOptions {
            sites: config.sites.clone(),
            factors: vec!["safe".into(), "cmd".into()],
            epochs: 1,
            lr: 0.01,
            head_lr: 0.01,
            batch: 4,
            pet_max: 1.0,
            alpha: 1.0,
            beta: 1.0,
            seed: 7,
            weight_decay: 0.01,
            clip: 1.0,
        };
        let out = tmp.path().join(format!("out-{}", so8t::device::name(device)));
        let mut t = so8t::train::gates::Trainer::new(&mut model, config, adapter, opts, data.examples, &data_path, &out)
            .unwrap();
        t.gradients(&[0, 3, 6, 7], 1.0).unwrap().iter().map(host).collect()
    };
    let (on_cpu, on_gpu) = (grads(&Device::Cpu), grads(&gpu));
    let mut worst = 0f32;
    for (a, b) in on_cpu.iter().zip(&on_gpu) {
        worst = worst.max(max_abs_diff(a, b) / max_abs(a).max(1e-6));
    }
    report(serde_json::json!({ "gates_gradients": on_cpu.len(), "max_relative_diff": worst }));
    assert!(worst < 1e-3, "gradients differ by {worst} of their scale");
}
