//! The decoder against transformers (logits, greedy tokens) and against llama.cpp's own
//! GGUF conversion of the same tiny models. Fixtures: scripts/reference/make_fixtures.py.

mod common;
use common::*;
use so8t::Model;

/// Both sides compute in f32; what differs is summation order inside matmuls and
/// softmax, and f32 RoPE tables computed by different `cos`/`sin`. With logits of order
/// 1–10 over ≤ 2 layers that is a few 1e-6; 1e-4 (the bound) leaves headroom yet
/// catches any real mistake (a missed norm weight or bias moves logits by ≥ 1e-2).
const LOGIT_TOL: f32 = 1e-4;

fn check_against_transformers(name: &str) {
    let exp = expected(name);
    let mut model = Model::open(&fixtures().join(name)).unwrap();
    for (i, ids) in exp.inputs.iter().enumerate() {
        let logits = model.decoder.forward_all(ids).unwrap();
        let d = max_abs_diff(&logits, &exp.logits[&format!("logits.{i}")]);
        assert!(d <= LOGIT_TOL, "{name} input {i}: max |Δlogit| = {d}");
        assert_eq!(
            greedy(&mut model, ids, exp.greedy[i].len()),
            exp.greedy[i],
            "{name} input {i}: greedy tokens"
        );
    }
}

#[test]
fn llama_matches_transformers() {
    check_against_transformers("tiny-llama");
}

#[test]
fn qwen2_matches_transformers() {
    check_against_transformers("tiny-qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    check_against_transformers("tiny-qwen3");
}

#[test]
fn qwen3_fp8_block_weights_match_transformers() {
    check_against_transformers("tiny-qwen3-fp8");
}

/// The three tiny Phi-3 models (scripts/reference/phi3_fixtures.py): the released config
/// layout with full rotary, transformers 5's `rope_parameters` layout with half the head
/// rotated, and plain RoPE over 3/4 of the head with an attention window. Their inputs
/// are 7 and 20 tokens (LongRoPE's short factors), 41 (past the original context of 32:
/// long factors) and a text.
const PHI3: [&str; 3] = ["tiny-phi3", "tiny-phi3-partial", "tiny-phi3-short"];

#[test]
fn phi3_matches_transformers_on_both_factor_sets() {
    for name in PHI3 {
        check_against_transformers(name);
    }
}

/// transformers' generate() from a 28-token prompt for 12 tokens: its cache holds short-
/// factor keys until the sequence passes 32, where Phi-3 drops it and runs the whole
/// sequence again with the long factors. The decoder does the same on its own (the
/// greedy helper feeds one token at a time into the KV cache).
#[test]
fn phi3_generation_across_the_original_context_equals_transformers_generate() {
    for name in PHI3 {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(name).join("expected.json")).unwrap(),
        )
        .unwrap();
        let prompt: Vec<u32> = serde_json::from_value(meta["crossing"]["prompt"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(meta["crossing"]["generate"].clone()).unwrap();
        let original = meta["crossing"]["original"].as_u64().unwrap() as usize;
        assert!(prompt.len() < original && prompt.len() + want.len() > original + 1);
        let mut model = Model::open(&fixtures().join(name)).unwrap();
        let (got, rows) = greedy_with_logits(&mut model, &prompt, want.len());
        assert_eq!(got, want, "{name}");
        // Top-1 alone barely notices keys of the wrong set in the cache; the logits do.
        let rows: Vec<f32> = rows.concat();
        let got = candle_core::Tensor::from_vec(rows, (want.len(), 448), &candle_core::Device::Cpu).unwrap();
        let exp = expected(name);
        let d = max_abs_diff(&got, &exp.logits["crossing.logits"]);
        assert!(d <= LOGIT_TOL, "{name}: max |Δlogit| over the generated steps = {d}");
    }
}

/// Chunked prefill that crosses the original context part-way: the cache must end up as
/// one long-factor run of the whole sequence, whatever the chunks.
#[test]
fn phi3_chunked_prefill_never_mixes_factor_sets() {
    let exp = expected("tiny-phi3");
    let ids = &exp.inputs[2];
    assert!(ids.len() > 32);
    let mut model = Model::open(&fixtures().join("tiny-phi3")).unwrap();
    let whole = model.decoder.forward_all(ids).unwrap();
    model.decoder.clear_cache();
    let mut rows = Vec::new();
    for (pos, chunk) in [(0, &ids[..20]), (20, &ids[20..30]), (30, &ids[30..])] {
        let h = model.decoder.forward_hidden(chunk, pos).unwrap();
        assert_eq!(h.dim(0).unwrap(), chunk.len());
        rows.push(model.decoder.logits(&h).unwrap());
    }
    let chunked = candle_core::Tensor::cat(&rows, 0).unwrap();
    // The chunks before the switch were computed with the short factors, as
    // transformers computes a prefix of that length; only the last chunk must equal the
    // whole-sequence run, and the next token after it must too.
    let last = chunked.narrow(0, 30, ids.len() - 30).unwrap();
    let want = whole.narrow(0, 30, ids.len() - 30).unwrap();
    assert!(max_abs_diff(&last, &want) <= LOGIT_TOL);
    let d = max_abs_diff(&whole, &exp.logits["logits.2"]);
    assert!(d <= LOGIT_TOL, "{d}");
}

fn gguf_path(arch: &str, ty: &str) -> std::path::PathBuf {
    fixtures().join(format!("tiny-{arch}/model-{ty}.gguf"))
}

#[test]
fn gguf_f32_and_f16_give_the_same_greedy_tokens() {
    for arch in ["llama", "qwen2", "qwen3", "phi3", "phi3-partial", "phi3-short"] {
        let exp = expected(&format!("tiny-{arch}"));
        for ty in ["f32", "f16"] {
            let mut m = Model::open(&gguf_path(arch, ty)).unwrap();
            for (i, ids) in exp.inputs.iter().enumerate() {
                assert_eq!(
                    greedy(&mut m, ids, exp.greedy[i].len()),
                    exp.greedy[i],
                    "{arch} {ty} input {i}"
                );
            }
        }
    }
}

#[test]
fn gguf_f32_logits_match_transformers() {
    // llama.cpp's converter permutes llama q/k rows and renames everything; F32 keeps the
    // values, so the same tolerance as the safetensors path applies.
    for arch in ["llama", "qwen2", "qwen3", "phi3", "phi3-partial", "phi3-short"] {
        let exp = expected(&format!("tiny-{arch}"));
        let mut m = Model::open(&gguf_path(arch, "f32")).unwrap();
        for (i, ids) in exp.inputs.iter().enumerate() {
            let d = max_abs_diff(
                &m.decoder.forward_all(ids).unwrap(),
                &exp.logits[&format!("logits.{i}")],
            );
            assert!(
                d <= LOGIT_TOL,
                "{arch} f32 gguf input {i}: max |Δlogit| = {d}"
            );
        }
    }
}

#[test]
fn gguf_q8_0_agrees_on_top1_for_95_percent_of_steps() {
    for arch in ["llama", "qwen2", "qwen3", "phi3", "phi3-partial", "phi3-short"] {
        let exp = expected(&format!("tiny-{arch}"));
        let mut q8 = Model::open(&gguf_path(arch, "q8_0")).unwrap();
        let mut f32m = Model::open(&fixtures().join(format!("tiny-{arch}"))).unwrap();
        let (mut same, mut total) = (0, 0);
        for (i, ids) in exp.inputs.iter().enumerate() {
            // Teacher-forced over prompt + reference continuation: every step counts.
            let seq: Vec<u32> = ids.iter().chain(&exp.greedy[i]).copied().collect();
            let a = argmax_rows(&mut q8, &seq);
            let b = argmax_rows(&mut f32m, &seq);
            same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
            total += a.len();
        }
        let share = same as f64 / total as f64;
        assert!(
            share >= 0.95,
            "{arch} q8_0: top-1 agreement {same}/{total} = {share:.3}"
        );
    }
}

#[test]
fn tokenizers_from_json_and_from_gguf_metadata_agree_with_transformers() {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer/expected.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<String> = serde_json::from_value(meta["texts"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(meta["ids"].clone()).unwrap();
    let hf = Model::open(&fixtures().join("tiny-qwen2")).unwrap();
    let gg = Model::open(&gguf_path("qwen2", "f16")).unwrap();
    for (t, want) in texts.iter().zip(&ids) {
        assert_eq!(
            &hf.tokenizer().unwrap().encode(t, true).unwrap(),
            want,
            "tokenizer.json: {t:?}"
        );
        assert_eq!(
            &gg.tokenizer().unwrap().encode(t, true).unwrap(),
            want,
            "GGUF tokenizer: {t:?}"
        );
        assert_eq!(&gg.tokenizer().unwrap().decode(want).unwrap(), t);
    }
    // Special tokens in text are matched whole, as llama.cpp does with special parsing on.
    let chat = gg
        .tokenizer()
        .unwrap()
        .encode("<|im_start|>user\nhi<|im_end|>", true)
        .unwrap();
    assert_eq!(
        chat[0],
        gg.tokenizer()
            .unwrap()
            .inner
            .token_to_id("<|im_start|>")
            .unwrap()
    );
    assert_eq!(
        *chat.last().unwrap(),
        gg.tokenizer()
            .unwrap()
            .inner
            .token_to_id("<|im_end|>")
            .unwrap()
    );
}

/// Phi-3 ends a turn with <|end|> and a text with <|endoftext|>: generation stops on both,
/// from the HF directory (generation_config.json) and from llama.cpp's GGUF (its EOG
/// texts), and the chat template renders Phi-3's turns.
#[test]
fn phi3_stops_on_end_and_endoftext_and_renders_its_chat_template() {
    for path in [fixtures().join("tiny-phi3"), fixtures().join("tiny-phi3/model-f16.gguf")] {
        let m = Model::open(&path).unwrap();
        let tok = m.tokenizer().unwrap();
        let eog = m.eog_ids();
        for t in ["<|end|>", "<|endoftext|>"] {
            let id = tok.encode(t, false).unwrap();
            assert_eq!(id.len(), 1, "{t}");
            assert!(eog.contains(&id[0]), "{}: {t} ends generation ({eog:?})", path.display());
        }
        let t = so8t::chat::ChatTemplate::new(tok.chat_template.as_ref().unwrap(), &tok.bos_text, &tok.eos_text).unwrap();
        let msgs = [so8t::chat::Message::new("system", "Be brief."), so8t::chat::Message::new("user", "Hi")];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
            "{}",
            path.display()
        );
    }
}

/// Phi-3.5's kind of vocabulary: SentencePiece BPE with byte fallback
/// (scripts/reference/phi3_fixtures.py, `make_spm_case`). The HF directory tokenises as
/// transformers does from its tokenizer.json; llama.cpp's conversion (`tokenizer.ggml.model
/// = llama`) as llama.cpp does, which is not the same (a space after every special token,
/// runs of spaces merged as sentencepiece merges them) and is what its users get.
#[test]
fn phi3_sentencepiece_vocabularies_tokenise_as_transformers_and_as_llama_cpp() {
    check_against_transformers("tiny-phi3-spm");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-phi3-spm/expected.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<String> = serde_json::from_value(meta["texts"].clone()).unwrap();
    let hf_ids: Vec<Vec<u32>> = serde_json::from_value(meta["transformers_ids"].clone()).unwrap();
    let ll_ids: Vec<Vec<u32>> = serde_json::from_value(meta["llama_cpp_ids"].clone()).unwrap();
    let hf = Model::open(&fixtures().join("tiny-phi3-spm")).unwrap();
    let gg = Model::open(&fixtures().join("tiny-phi3-spm/model-f16.gguf")).unwrap();
    for ((t, want_hf), want_ll) in texts.iter().zip(&hf_ids).zip(&ll_ids) {
        assert_eq!(&hf.tokenizer().unwrap().encode(t, false).unwrap(), want_hf, "tokenizer.json: {t:?}");
        let ids = gg.tokenizer().unwrap().encode(t, true).unwrap();
        assert_eq!(&ids, want_ll, "GGUF SentencePiece: {t:?}");
        // Text with special tokens in it does not round-trip: each is followed by the
        // space llama.cpp inserts after special tokens.
        if !t.contains('<') {
            assert_eq!(&gg.tokenizer().unwrap().decode(&ids[1..]).unwrap(), t, "decode of {t:?}");
        }
    }
    let exp = expected("tiny-phi3-spm");
    let mut gg = gg;
    for (i, ids) in exp.inputs.iter().enumerate() {
        assert_eq!(greedy(&mut gg, ids, exp.greedy[i].len()), exp.greedy[i], "f16 GGUF input {i}");
    }
}

/// The streaming detokeniser (one window per token) gives, after every token, the text
/// that decoding the whole answer gives, on byte-level BPE and on SentencePiece (HF and
/// GGUF), with characters split over several tokens (CJK, emoji by byte fallback).
#[test]
fn streaming_detokenisation_equals_decoding_everything() {
    let text = "Hello, world! ünïcödé 日本語のテキスト 🙂🙂 and\n\tspaces   here. The quick brown fox.";
    for path in [
        fixtures().join("tiny-qwen2"),
        fixtures().join("tiny-phi3-spm"),
        fixtures().join("tiny-phi3-spm/model-f16.gguf"),
    ] {
        let m = Model::open(&path).unwrap();
        let tok = m.tokenizer().unwrap();
        let ids = tok.encode(text, false).unwrap();
        let (mut stream, mut streamed) = (so8t::tokenizer::DecodeStream::default(), String::new());
        let mut checked = 0;
        for n in 1..=ids.len() {
            stream.step(tok, &ids[..n], &mut streamed).unwrap();
            let full = tok.decode(&ids[..n]).unwrap();
            if !full.ends_with('\u{FFFD}') {
                assert_eq!(streamed, full, "{} after {n} tokens", path.display());
                checked += 1;
            }
        }
        assert!(checked > ids.len() / 2, "{}", path.display());
        assert_eq!(streamed, tok.decode(&ids).unwrap());
    }
}

/// Qwen2-VL (scripts/reference/qwen2vl_fixtures.py): a tiny random model with transformers'
/// Qwen2-VL layout, real PNG images of four sizes, and transformers' outputs for them.
mod qwen2vl {
    use super::*;
    use so8t::vision::preprocess::PixelRows;

    fn fixture() -> (serde_json::Value, std::collections::HashMap<String, candle_core::Tensor>) {
        let dir = fixtures().join("tiny-qwen2vl");
        let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let tensors = candle_core::safetensors::load(dir.join("expected.safetensors"), &candle_core::Device::Cpu).unwrap();
        (meta, tensors)
    }

    fn pixels(model: &so8t::Model, name: &str) -> PixelRows {
        let path = fixtures().join("qwen2vl-images").join(format!("{name}.png"));
        let vision = model.vision.as_ref().expect("a Qwen2-VL model has a vision side");
        vision.processor.preprocess(&std::fs::read(&path).unwrap(), &path).unwrap()
    }

    /// Pillow's bicubic is reproduced in its own fixed-point arithmetic, so the resized
    /// bytes are Pillow's and the rows differ only by the f32 division transformers does
    /// the same way: the bound is 1e-5 (the issue's), and in practice they are equal.
    #[test]
    fn pixel_rows_equal_the_pil_image_processor() {
        let (meta, want) = fixture();
        let model = Model::open(&fixtures().join("tiny-qwen2vl")).unwrap();
        for name in ["a", "b", "c", "d", "e"] {
            let got = pixels(&model, name);
            let grid: Vec<usize> = serde_json::from_value(meta["images"][name]["grid_thw"].clone()).unwrap();
            assert_eq!(got.grid.to_vec(), grid, "image {name}: grid");
            let w = &want[&format!("pixels.{name}")];
            let got = candle_core::Tensor::from_vec(got.rows, w.dims(), &candle_core::Device::Cpu).unwrap();
            let d = max_abs_diff(&got, w);
            assert!(d <= 1e-5, "image {name}: max |Δpixel| = {d}");
        }
    }

    /// The tower is two blocks of f32 attention and MLPs on normalised pixels; what
    /// differs from torch is summation order (~1e-6 here), under the 1e-4.
    #[test]
    fn vision_features_match_transformers() {
        let (_, want) = fixture();
        let model = Model::open(&fixtures().join("tiny-qwen2vl")).unwrap();
        let vision = model.vision.as_ref().unwrap();
        for name in ["a", "b", "c", "d", "e"] {
            let got = vision.tower.forward(&pixels(&model, name)).unwrap();
            let d = max_abs_diff(&got, &want[&format!("vision.{name}")]);
            assert!(d <= LOGIT_TOL, "image {name}: max |Δfeature| = {d}");
        }
    }

    /// Logits at every position of a text-only prompt, one with an image and one with two
    /// (non-square grids, one downscaled), and transformers' generate() after each: the
    /// generated tokens take their positions from the images' M-RoPE delta. On the kernels
    /// and on candle's ops (a GPU's path), from the checkpoint as released
    /// (`model.*`, `visual.*`) and as newer transformers name it
    /// (`model.language_model.*`, `model.visual.*`).
    #[test]
    fn logits_and_generation_match_transformers_with_zero_one_and_two_images() {
        let dir = fixtures().join("tiny-qwen2vl");
        let renamed = tempfile::tempdir().unwrap();
        for f in ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(dir.join(f), renamed.path().join(f)).unwrap();
        }
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
        let tensors: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .into_iter()
            .map(|(k, v)| {
                let k = match k.strip_prefix("visual.") {
                    Some(rest) => format!("model.visual.{rest}"),
                    None => k.replacen("model.", "model.language_model.", 1),
                };
                (k, v)
            })
            .collect();
        candle_core::safetensors::save(&tensors, renamed.path().join("model.safetensors")).unwrap();
        for (path, tensor_backend) in [(dir.as_path(), false), (dir.as_path(), true), (renamed.path(), false)] {
            check_prompts(path, tensor_backend);
        }
    }

    fn check_prompts(path: &std::path::Path, tensor_backend: bool) {
        let (meta, want) = fixture();
        let mut model = Model::open(path).unwrap();
        model.decoder.use_tensor_backend(tensor_backend);
        for (i, p) in meta["prompts"].as_array().unwrap().iter().enumerate() {
            let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
            let names: Vec<String> = serde_json::from_value(p["images"].clone()).unwrap();
            let images: Vec<PixelRows> = names.iter().map(|n| pixels(&model, n)).collect();
            let label = format!("{} ({}, tensor backend {tensor_backend})", p["label"].as_str().unwrap(), path.display());
            model.decoder.clear_cache();
            let media = model.vision.as_ref().unwrap().media(&ids, &images).unwrap();
            let mut h = model.decoder.forward_hidden_media(&ids, 0, &media).unwrap();
            let logits = model.decoder.logits(&h).unwrap();
            let d = max_abs_diff(&logits, &want[&format!("logits.{i}")]);
            assert!(d <= LOGIT_TOL, "{label}: max |Δlogit| = {d}");
            let greedy: Vec<u32> = serde_json::from_value(p["greedy"].clone()).unwrap();
            let mut got = Vec::new();
            for _ in 0..greedy.len() {
                let last = h.get(h.dim(0).unwrap() - 1).unwrap().unsqueeze(0).unwrap();
                let row = model.decoder.logits(&last).unwrap().squeeze(0).unwrap();
                let t = row.argmax(0).unwrap().to_scalar::<u32>().unwrap();
                got.push(t);
                let pos = model.decoder.cached_len();
                h = model.decoder.forward_hidden(&[t], pos).unwrap();
            }
            assert_eq!(got, greedy, "{label}: greedy tokens");
        }
    }

    /// SO8T on the text decoder of the Qwen2-VL fixture: random gates at all five sites and
    /// random heads, against so8t_torch's forward hooks on transformers' model
    /// (`make_so8t_reference` in scripts/reference/make_fixtures.py, called by
    /// qwen2vl_fixtures.py) on the prompts with zero, one and two images; then `bake`,
    /// whose directory transformers loaded with its vision tower as it was
    /// (`check_baked_with_transformers`): our logits on it equal transformers'. Tolerances
    /// as for the text models: 1e-4 on logits, 1e-5 on probabilities.
    #[test]
    fn gates_and_heads_on_images_match_so8t_torch_and_the_bake_matches_transformers() {
        use so8t::artifact::bake::{bake, BakeOptions};
        let (meta, _) = fixture();
        let base = fixtures().join("tiny-qwen2vl");
        let reference = base.join("so8t-random");
        let exp = candle_core::safetensors::load(reference.join("expected.safetensors"), &candle_core::Device::Cpu).unwrap();
        let baked_exp =
            candle_core::safetensors::load(reference.join("transformers-baked.safetensors"), &candle_core::Device::Cpu).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("so8t");
        std::fs::create_dir(&dir).unwrap();
        for e in std::fs::read_dir(&base).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_file() && !name.starts_with("expected") {
                std::fs::copy(&p, dir.join(&name)).unwrap();
            }
        }
        for f in ["so8t_adapter.safetensors", "so8t_config.json"] {
            std::fs::copy(reference.join(f), dir.join(f)).unwrap();
        }
        let baked = tmp.path().join("baked");
        bake(&dir, &baked, &BakeOptions::default()).unwrap();
        for (path, want, verdicts) in [(&dir, &exp, true), (&baked, &baked_exp, false)] {
            let mut model = Model::open(path).unwrap();
            for (i, p) in meta["prompts"].as_array().unwrap().iter().enumerate() {
                let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
                let names: Vec<String> = serde_json::from_value(p["images"].clone()).unwrap();
                let images: Vec<PixelRows> = names.iter().map(|n| pixels(&model, n)).collect();
                let media = model.prompt_media(&ids, &images).unwrap();
                model.decoder.clear_cache();
                let h = model.decoder.forward_hidden_media(&ids, 0, &media).unwrap();
                let d = max_abs_diff(&model.decoder.logits(&h).unwrap(), &want[&format!("logits.{i}")]);
                assert!(d <= LOGIT_TOL, "{} prompt {i}: max |Δlogit| = {d}", path.display());
                if verdicts {
                    let v = model.so8t.as_ref().unwrap().verdicts(&model.decoder, None).unwrap();
                    let pu = exp[&format!("p_unsafe.{i}")].to_vec1::<f32>().unwrap();
                    let pe = exp[&format!("p_escalate.{i}")].to_vec1::<f32>().unwrap();
                    for (k, vk) in v.iter().enumerate() {
                        assert!(
                            (vk.p_unsafe - pu[k]).abs() <= 1e-5 && (vk.p_escalate - pe[k]).abs() <= 1e-5,
                            "prompt {i} position {k}: verdicts"
                        );
                    }
                }
            }
        }
    }
}
