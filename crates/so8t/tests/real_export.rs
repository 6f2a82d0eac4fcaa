//! llama.cpp loads what `export` writes from an SO8T model with random gates (baked on the
//! fly), and its greedy tokens on the file are so8t's. The fixture records the sha256 of
//! the file llama.cpp read; the test re-exports and checks that it made the same file.
//! Fixtures: scripts/reference/llama_cpp_export_fixtures.py.

mod common;
use common::{check_against_llama_cpp, fixtures, real_model};
use sha2::{Digest, Sha256};
use so8t::artifact::convert::{convert, ConvertOptions, Init};
use so8t::artifact::export::{export, parse_quant};
use so8t::Model;

fn check(which: &str) {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("llama-cpp/export-{which}.json")))
            .unwrap(),
    )
    .unwrap();
    let Some(base) = real_model(which, fixture["model"].as_str().unwrap()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("so8t");
    let init = Init::Random {
        seed: fixture["seed"].as_u64().unwrap(),
        scale: fixture["scale"].as_f64().unwrap(),
    };
    convert(
        &base,
        &dir,
        &ConvertOptions {
            init,
            ..Default::default()
        },
    )
    .unwrap();
    let n = fixture["n_tokens"].as_u64().unwrap() as usize;
    for (quant, rec) in fixture["exports"].as_object().unwrap() {
        let out = tmp.path().join(format!("{quant}.gguf"));
        export(&dir, &out, parse_quant(quant).unwrap(), |_, _, _| {}).unwrap();
        let sha = format!("{:x}", Sha256::digest(std::fs::read(&out).unwrap()));
        assert_eq!(
            sha,
            rec["sha256"].as_str().unwrap(),
            "{which} {quant}: the export is the file llama.cpp was run on"
        );
        let mut m = Model::open(&out).unwrap();
        let s = m
            .so8t
            .as_ref()
            .expect("heads read back from so8t.* metadata");
        assert!(s.baked && m.decoder.gates.iter().all(|g| g.q.is_none()));
        let cases = rec["cases"].as_array().unwrap();
        check_against_llama_cpp(&format!("{which} {quant}"), &mut m, cases, n);
        if quant == "q4_k_m" {
            // the bar for the 4-bit mix: the same top-1 on at least 90% of steps
            let (same, total) = common::teacher_forced_agreement(&mut m, cases);
            assert!(
                same * 10 >= total * 9,
                "{which} q4_k_m: top-1 agreement with llama.cpp {same}/{total} < 90%"
            );
        }
    }
}

#[test]
fn smollm2_so8t_export_runs_in_llama_cpp() {
    check("smollm2");
}

#[test]
fn qwen25_so8t_export_runs_in_llama_cpp() {
    check("qwen25coder");
}
