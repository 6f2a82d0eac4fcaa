//! SO8T models (spec §4–§5, §7): a zero-init conversion computes exactly what its base
//! computes, random gates change it (and their order matters), and the gates and heads
//! agree with an independent PyTorch implementation on top of transformers.

mod common;
use candle_core::{Device, Tensor};
use common::*;
use so8t::model::{Decoder, Site};
use so8t::artifact::adapter::{Adapter, So8tConfig, ADAPTER_FILE, CONFIG_FILE};
use so8t::artifact::convert::{convert, ConvertOptions, Init};
use so8t::artifact::validate::validate;
use so8t::Model;
use std::path::{Path, PathBuf};

/// `tiny-{arch}` fixtures; the phi3 pair covers fused projections, both LongRoPE sets and
/// partial rotary.
const ARCHS: [&str; 5] = ["llama", "qwen2", "qwen3", "phi3", "phi3-partial"];

fn converted(arch: &str, tmp: &tempfile::TempDir, opts: &ConvertOptions) -> PathBuf {
    let out = tmp.path().join(format!("{arch}-so8t"));
    convert(&fixtures().join(format!("tiny-{arch}")), &out, opts).unwrap();
    out
}

fn random(seed: u64) -> ConvertOptions {
    ConvertOptions {
        init: Init::Random { seed, scale: 0.3 },
        ..Default::default()
    }
}

fn logits(path: &Path, ids: &[u32]) -> Tensor {
    Model::open(path).unwrap().decoder.forward_all(ids).unwrap()
}

#[test]
fn zero_init_is_bit_identical_to_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let dir = converted(arch, &tmp, &ConvertOptions::default());
        let m = Model::open(&dir).unwrap();
        assert!(
            m.so8t.is_some() && m.decoder.gates[0].q.is_some(),
            "{arch}: gates installed"
        );
        for ids in expected(&format!("tiny-{arch}")).inputs {
            let a = logits(&dir, &ids)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = logits(&fixtures().join(format!("tiny-{arch}")), &ids)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{arch}: zero-init logits differ from the base"
            );
        }
    }
}

#[test]
fn random_gates_change_the_output_and_their_order_matters() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let ids = &expected(&format!("tiny-{arch}")).inputs[1];
        let base = logits(&fixtures().join(format!("tiny-{arch}")), ids);
        let dir = converted(arch, &tmp, &random(7));
        let gated = logits(&dir, ids);
        assert!(
            max_abs_diff(&base, &gated) > 1e-2,
            "{arch}: random gates must change the logits"
        );

        // Same generators, factors applied in the other order: R = R_safe · R_cmd.
        let mut cfg = So8tConfig::read(&dir).unwrap();
        cfg.factors.reverse();
        std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(&cfg).unwrap()).unwrap();
        let swapped = logits(&dir, ids);
        assert!(
            max_abs_diff(&gated, &swapped) > 1e-3,
            "{arch}: SO(8) is not commutative; swapping factors must change the output"
        );
    }
}

fn install_reference(arch: &str, tmp: &tempfile::TempDir) -> PathBuf {
    let base = fixtures().join(format!("tiny-{arch}"));
    let dir = tmp.path().join(format!("{arch}-ref"));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&base).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && !p.to_string_lossy().ends_with(".gguf") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    for f in [ADAPTER_FILE, CONFIG_FILE] {
        std::fs::copy(base.join("so8t-random").join(f), dir.join(f)).unwrap();
    }
    dir
}

/// Reference: scripts/reference/make_fixtures.py, `make_so8t_reference` (σ± by numpy
/// least squares, exp by torch.linalg.matrix_exp, gates as forward hooks). Both sides are
/// f32 models with f32-rounded rotations; 1e-4 on logits as for the plain decoder, and
/// 1e-5 on probabilities in [0, 1].
#[test]
fn gates_and_heads_match_the_pytorch_reference() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHS {
        let dir = install_reference(arch, &tmp);
        let refdir = fixtures().join(format!("tiny-{arch}/so8t-random"));
        let exp = candle_core::safetensors::load(refdir.join("expected.safetensors"), &Device::Cpu)
            .unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(refdir.join("expected.json")).unwrap())
                .unwrap();
        let inputs: Vec<Vec<u32>> = serde_json::from_value(meta["inputs"].clone()).unwrap();
        let mut m = Model::open(&dir).unwrap();
        let heads = m.so8t.as_ref().unwrap().heads.clone();
        for (i, ids) in inputs.iter().enumerate() {
            m.decoder.clear_cache();
            let hidden = m.decoder.forward_hidden(ids, 0).unwrap();
            let d = max_abs_diff(
                &m.decoder.logits(&hidden).unwrap(),
                &exp[&format!("logits.{i}")],
            );
            assert!(d <= 1e-4, "{arch} input {i}: max |Δlogit| = {d}");
            let v = heads.verdicts(&hidden).unwrap();
            let pu = exp[&format!("p_unsafe.{i}")].to_vec1::<f32>().unwrap();
            let pe = exp[&format!("p_escalate.{i}")].to_vec1::<f32>().unwrap();
            for (k, vk) in v.iter().enumerate() {
                assert!(
                    (vk.p_unsafe - pu[k]).abs() <= 1e-5 && (vk.p_escalate - pe[k]).abs() <= 1e-5,
                    "{arch} input {i} pos {k}: verdicts"
                );
            }
        }
        let bad: Vec<_> = validate(&dir).into_iter().filter(|c| !c.ok).collect();
        assert!(
            bad.is_empty(),
            "{arch}: the reference adapter validates: {bad:?}"
        );
    }
}

fn failed_checks(dir: &Path) -> Vec<&'static str> {
    validate(dir)
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| c.name)
        .collect()
}

fn edit_adapter(dir: &Path, f: impl FnOnce(&mut Adapter)) {
    let mut a = Adapter::read(dir).unwrap();
    f(&mut a);
    a.write(&dir.join(ADAPTER_FILE)).unwrap();
}

#[test]
fn validate_passes_a_fresh_conversion_and_catches_each_defect() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = converted("qwen2", &tmp, &random(3));
    assert!(failed_checks(&dir).is_empty(), "{:?}", validate(&dir));
    let name = "layers.1.k.cmd.generators";

    // The adapter stores generators, so a "rotation" that is not one can only arise
    // numerically, from a generator so large that the f32 exponential breaks down (1e12).
    // At the largest entry an adapter may hold (GENERATOR_LIMIT) the rotations are still
    // orthogonal to validate's tolerance; beyond it the adapter is refused as damaged.
    let set = |v: f32| {
        edit_adapter(&dir, |a| {
            let g = a.generators[name].clone();
            a.generators
                .insert(name.into(), ((g * 0.0).unwrap() + v as f64).unwrap());
        })
    };
    set(so8t::artifact::adapter::GENERATOR_LIMIT);
    assert!(failed_checks(&dir).is_empty(), "{:?}", validate(&dir));
    set(1.0e12);
    assert_eq!(failed_checks(&dir), vec!["adapter_shapes"]);

    edit_adapter(&dir, |a| {
        a.generators.insert(
            name.into(),
            Tensor::zeros((3, 28), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert_eq!(failed_checks(&dir), vec!["adapter_shapes"]);

    edit_adapter(&dir, |a| {
        let mut v = vec![0f32; 2 * 28];
        v[5] = f32::NAN;
        a.generators.insert(
            name.into(),
            Tensor::from_vec(v, (2, 28), &Device::Cpu).unwrap(),
        );
    });
    assert_eq!(failed_checks(&dir), vec!["adapter_shapes"]);

    let dir = converted("qwen3", &tmp, &random(4));
    let mut text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    text.push('\n');
    std::fs::write(dir.join("config.json"), text).unwrap();
    assert_eq!(failed_checks(&dir), vec!["base_checksum"]);
}

#[test]
fn convert_options_are_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ConvertOptions {
        sites: vec![Site::Q, Site::Mlp],
        granularity: so8t::so8::gates::Granularity::PerHead,
        factors: vec!["a".into(), "b".into(), "c".into()],
        init: Init::Random {
            seed: 1,
            scale: 0.1,
        },
        force: false,
    };
    let dir = converted("qwen3", &tmp, &opts);
    let a = Adapter::read(&dir).unwrap();
    // qwen3 tiny: 4 query heads of head_dim 32 → 4 blocks each; hidden 64 → 8 mlp blocks
    assert_eq!(a.generators["layers.0.q.b.generators"].dims(), &[16, 28]);
    assert_eq!(a.generators["layers.1.mlp.c.generators"].dims(), &[8, 28]);
    assert_eq!(a.generators.len(), 2 * 2 * 3);
    let m = Model::open(&dir).unwrap();
    assert!(m.decoder.gates[0].q.is_some() && m.decoder.gates[0].k.is_none());
    assert!(failed_checks(&dir).is_empty());
    // an existing target is refused without --force, and nothing is written beside it
    let err = convert(&fixtures().join("tiny-qwen3"), &dir, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// The inference path (plain buffers, KV cache appended in place) and the path a GPU runs
/// (candle's fused ops; here on the CPU) compute what the differentiable candle ops
/// compute, for every architecture with random gates at every site, over a prompt and
/// then token by token. Both are f32 with the same operations;
/// the sums run in a different order (attention dot products, norms), so we allow
/// 1e-4 relative to the largest hidden value: far below any effect of a wrong operation,
/// which moves values by their own size.
#[test]
fn inference_path_matches_the_differentiable_path() {
    let tmp = tempfile::tempdir().unwrap();
    // A prompt long enough (≥ 16 positions) that norms and RoPE are shared out by rows,
    // and a sequence that passes phi3's original context of 32 (both paths then run it
    // again with LongRoPE's long factors).
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 7 + 1) % 13 + 1).collect();
    for arch in ARCHS {
        let dir = converted(arch, &tmp, &random(7));
        let mut m = Model::open(&dir).unwrap();
        let mut run = |differentiable: bool, tensor_backend: bool| -> Vec<f32> {
            let forward = if differentiable { Decoder::forward_hidden_autograd } else { Decoder::forward_hidden };
            m.decoder.use_tensor_backend(tensor_backend);
            m.decoder.clear_cache();
            let mut h = forward(&mut m.decoder, &ids[..20], 0).unwrap();
            for (p, &t) in ids.iter().enumerate().skip(20) {
                let step = forward(&mut m.decoder, &[t], p).unwrap();
                h = Tensor::cat(&[&h, &step], 0).unwrap();
            }
            h.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let reference = run(true, false);
        let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(scale > 0.0);
        for (path, got) in [("the kernels", run(false, false)), ("candle's fused ops", run(false, true))] {
            let worst = got.iter().zip(&reference).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(worst <= 1e-4 * scale, "{arch}: inference on {path} differs by {worst} (scale {scale})");
        }
    }
}

/// The states the heads read from a middle layer (spec §5): the same on both decoder paths,
/// RMS-normed with unit weight (mean square 1 up to eps), and layer L is the final normed
/// state the LM head reads.
#[test]
fn tapped_layers_agree_between_paths_and_are_unit_normed() {
    let tmp = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..20u32).map(|i| (i * 5 + 3) % 13 + 1).collect();
    for arch in ARCHS {
        let dir = converted(arch, &tmp, &random(3));
        let mut m = Model::open(&dir).unwrap();
        let n = m.config.num_layers;
        let layers = [1, n.div_ceil(2), n];
        m.decoder.set_taps(&layers).unwrap();
        let mut run = |differentiable: bool| -> (Vec<Vec<f32>>, Vec<f32>) {
            let forward = if differentiable { Decoder::forward_hidden_autograd } else { Decoder::forward_hidden };
            m.decoder.clear_cache();
            let h = forward(&mut m.decoder, &ids, 0).unwrap();
            let taps = m
                .decoder
                .tapped()
                .iter()
                .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect();
            (taps, h.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        };
        let ((fast, fast_final), (reference, _)) = (run(false), run(true));
        let hidden = m.config.hidden_size;
        for (k, (a, b)) in fast.iter().zip(&reference).enumerate() {
            let worst = a.iter().zip(b).fold(0f32, |w, (x, y)| w.max((x - y).abs()));
            assert!(worst <= 1e-4, "{arch}: layer {} differs by {worst}", layers[k]);
            if layers[k] < n {
                for row in a.chunks(hidden) {
                    let ms = row.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
                    // ms/(ms + eps) exactly: below 1 by eps/(ms + eps), up to ~1% for the
                    // tiny random models' small residuals.
                    assert!((ms - 1.0).abs() < 2e-2, "{arch}: layer {} row mean square {ms}", layers[k]);
                }
            }
        }
        assert_eq!(fast[2], fast_final, "{arch}: layer L is the final normed state");
        assert!(m.decoder.set_taps(&[n + 1]).is_err() && m.decoder.set_taps(&[0]).is_err());
    }
}

/// Greedy generation of `max_tokens` from `prompt_ids`, with every token's verdict.
fn greedy_with_verdicts(prompt_ids: Vec<u32>, max_tokens: usize) -> so8t::generate::GenerateRequest {
    so8t::generate::GenerateRequest {
        prompt_ids,
        max_tokens,
        sampling: Default::default(),
        stop: vec![],
        top_logprobs: 0,
        verdict_every_token: true,
        verdict_position: None,
        media: None,
    }
}

/// A prompt that shares a prefix with a finished sequence starts from that sequence's KV
/// cache (the server's prefix reuse) and gets the answer, the prompt's verdict and every
/// token's verdict that a fresh run gets; also on phi3, where the reused cache holds the
/// long LongRoPE set and the new prompt needs the short one. Both runs are the same f32
/// operations on the same rows, in other chunks: 1e-5 on probabilities.
#[test]
fn a_reused_prefix_gives_what_a_fresh_run_gives() {
    use so8t::generate::Sequence;
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["qwen2", "phi3"] {
        let dir = converted(arch, &tmp, &random(11));
        let mut m = Model::open(&dir).unwrap();
        let shared: Vec<u32> = (0..24u32).map(|i| (i * 7 + 3) % 50 + 10).collect();
        let ask = |tail: &[u32], n: usize| greedy_with_verdicts(shared.iter().chain(tail).copied().collect(), n);
        let run = |m: &mut Model, seq: &mut Sequence| {
            while !seq.prefill(m, 7).unwrap() {}
            let mut out = Vec::new();
            while let Some(s) = seq.step(m).unwrap() {
                out.push((s.id, s.verdict.unwrap()));
            }
            (seq.prompt_verdict().unwrap(), out)
        };
        // The first request runs past phi3's original context of 32 (long set).
        let mut first = Sequence::new(&m, ask(&[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 4)).unwrap();
        run(&mut m, &mut first);
        let second = ask(&[40, 41, 42], 5);
        let mut fresh = Sequence::new(&m, second.clone()).unwrap();
        let a = run(&mut m, &mut fresh);
        let mut reused = Sequence::new(&m, second).unwrap();
        assert_eq!(reused.reuse_cache(first.into_cache()), 24, "{arch}");
        let b = run(&mut m, &mut reused);
        let close = |x: &so8t::so8::verdict::Verdict, y: &so8t::so8::verdict::Verdict| {
            (x.p_unsafe - y.p_unsafe).abs() <= 1e-5 && (x.p_escalate - y.p_escalate).abs() <= 1e-5
        };
        assert!(close(&a.0, &b.0), "{arch}: prompt verdict {:?} vs {:?}", a.0, b.0);
        assert_eq!(a.1.len(), b.1.len());
        for ((ta, va), (tb, vb)) in a.1.iter().zip(&b.1) {
            assert_eq!(ta, tb, "{arch}");
            assert!(close(va, vb), "{arch}: {va:?} vs {vb:?}");
        }
    }
}

/// Sequences run together (`turn_batch`: one decoder pass for all their rows, prompt chunks
/// beside decode steps, each over its own KV cache, joining at different turns) generate
/// what each generates alone, with the same prompt verdict and per-token verdicts; also on
/// phi3, where one sequence crosses the original context (32) while generating and its
/// cache is re-run with the long LongRoPE set in the middle of a batch while the others
/// keep the short set. The batch is the same f32 operations on the same rows, grouped
/// otherwise in the matrix products: 1e-5 on probabilities. On the kernels, and on the
/// candle ops a GPU runs (attention split by sequence there).
#[test]
fn sequences_batched_generate_what_each_generates_alone() {
    use so8t::generate::{turn_batch, Sequence, Turn};
    use so8t::so8::verdict::Verdict;
    let tmp = tempfile::tempdir().unwrap();
    for (arch, tensor_backend) in [("qwen2", false), ("phi3", false), ("qwen2", true), ("phi3", true)] {
        let dir = tmp.path().join(format!("{arch}-{tensor_backend}-so8t"));
        convert(&fixtures().join(format!("tiny-{arch}")), &dir, &random(12)).unwrap();
        let mut m = Model::open(&dir).unwrap();
        m.decoder.use_tensor_backend(tensor_backend);
        let arch = if tensor_backend { format!("{arch} (candle ops)") } else { arch.to_string() };
        let ask = |len: u32, n: usize| greedy_with_verdicts((0..len).map(|i| (i * 11 + len) % 60 + 10).collect(), n);
        // (prompt length, tokens, the turn it joins at): the second one starts at 27
        // tokens and passes 32 while generating; the third is over 32 from the start.
        let reqs = [(5, 6, 0), (27, 9, 0), (40, 3, 2), (12, 5, 4)];
        type Run = (Option<Verdict>, Vec<(u32, Verdict)>);
        let alone: Vec<Run> = reqs
            .iter()
            .map(|&(len, n, _)| {
                let mut seq = Sequence::new(&m, ask(len, n)).unwrap();
                let mut out = Vec::new();
                while let Some(s) = seq.step(&mut m).unwrap() {
                    out.push((s.id, s.verdict.unwrap()));
                }
                (seq.prompt_verdict(), out)
            })
            .collect();
        let mut seqs: Vec<Option<Sequence>> = reqs.iter().map(|_| None).collect();
        let mut together: Vec<Run> = reqs.iter().map(|_| (None, Vec::new())).collect();
        let mut ended = vec![false; reqs.len()];
        let mut most = 0;
        for turn in 0.. {
            for (i, &(len, n, at)) in reqs.iter().enumerate() {
                if at == turn {
                    seqs[i] = Some(Sequence::new(&m, ask(len, n)).unwrap());
                }
            }
            let live: Vec<usize> = (0..reqs.len()).filter(|&i| seqs[i].is_some() && !ended[i]).collect();
            if live.is_empty() && turn > 4 {
                break;
            }
            most = most.max(live.len());
            let mut batch: Vec<&mut Sequence> = seqs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| live.contains(i))
                .map(|(_, s)| s.as_mut().unwrap())
                .collect();
            for (i, r) in live.iter().zip(turn_batch(&mut m, &mut batch, 7)) {
                match r.unwrap() {
                    Turn::Prompt(true) => together[*i].0 = seqs[*i].as_ref().unwrap().prompt_verdict(),
                    Turn::Prompt(false) => {}
                    Turn::Token(s) => together[*i].1.push((s.id, s.verdict.unwrap())),
                    Turn::Ended => ended[*i] = true,
                }
            }
        }
        assert_eq!(most, 4, "{arch}: all four ran in one batch at some turn");
        let close = |x: &Verdict, y: &Verdict| {
            (x.p_unsafe - y.p_unsafe).abs() <= 1e-5 && (x.p_escalate - y.p_escalate).abs() <= 1e-5
        };
        for (k, (a, b)) in alone.iter().zip(&together).enumerate() {
            let (pa, pb) = (a.0.unwrap(), b.0.unwrap());
            assert!(close(&pa, &pb), "{arch} #{k}: prompt verdict {pa:?} vs {pb:?}");
            assert_eq!(a.1.len(), reqs[k].1, "{arch} #{k}: runs to max_tokens");
            assert_eq!(a.1.len(), b.1.len(), "{arch} #{k}");
            for ((ta, va), (tb, vb)) in a.1.iter().zip(&b.1) {
                assert_eq!(ta, tb, "{arch} #{k}");
                assert!(close(va, vb), "{arch} #{k}: {va:?} vs {vb:?}");
            }
        }
    }
}
