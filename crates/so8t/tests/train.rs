//! Gates training on the tiny Qwen3 fixture: gradients against finite differences,
//! bit-reproducible runs, exact resume, and rotations that still validate.

mod common;

use candle_core::{DType, Tensor};
use so8t::artifact::adapter::Adapter;
use so8t::artifact::convert::{convert, ConvertOptions, Init};
use so8t::train::data::read_jsonl;
use so8t::train::gates::{GatesOptions, RunControl, Trainer};
use so8t::train::{so8t_parts, write_result};
use so8t::Model;
use std::path::{Path, PathBuf};

fn tiny_so8t(dir: &Path) -> PathBuf {
    let out = dir.join("so8t");
    let opts = ConvertOptions {
        init: Init::Random {
            seed: 3,
            scale: 0.1,
        },
        ..Default::default()
    };
    convert(&common::fixtures().join("tiny-qwen3"), &out, &opts).unwrap();
    out
}

fn options(model: &Model) -> GatesOptions {
    let (config, _) = so8t_parts(model).unwrap();
    GatesOptions {
        sites: config.sites.clone(),
        factors: vec!["safe".into(), "cmd".into()],
        epochs: 3,
        lr: 0.01,
        head_lr: 0.01,
        batch: 4,
        pet_max: 1.0,
        alpha: 1.0,
        beta: 1.0,
        seed: 7,
        weight_decay: 0.01,
        clip: 1.0,
    }
}

fn data_path() -> PathBuf {
    common::fixtures().join("train/tiny.jsonl")
}

fn trainer<'a>(model: &'a mut Model, out: &Path) -> Trainer<'a> {
    let (config, adapter) = so8t_parts(model).unwrap();
    let data = read_jsonl(&data_path(), &config.labels, false).unwrap();
    let opts = options(model);
    Trainer::new(
        model,
        config,
        adapter,
        opts,
        data.examples,
        &data_path(),
        out,
    )
    .unwrap()
}

/// Directional derivatives of the full loss (LM + both heads + PET at λ = 1) along random
/// directions, for generator tensors of an output site, an input site and the MLP site
/// and for a head weight, against central differences. The model is f32: with a step of
/// 1e-2 the difference quotient's rounding noise is ~1e-7·|L|/1e-2 ≈ 3e-4 and its
/// truncation error O(h²) is smaller still, so a 2% relative tolerance (with a small
/// absolute floor) separates a correct gradient from a wrong one (a missing chain-rule
/// factor is off by far more).
#[test]
fn gate_gradients_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_so8t(tmp.path());
    let mut model = Model::open(&dir).unwrap();
    let mut t = trainer(&mut model, tmp.path());
    let batch = [0usize, 3, 6, 7];
    let grads = t.gradients(&batch, 1.0).unwrap();
    let names: Vec<String> = t.param_names().to_vec();
    let pick = [
        "layers.0.q.safe.generators",
        "layers.1.o.cmd.generators",
        "layers.0.mlp.safe.generators",
        "heads.safety.weight",
    ];
    let mut rng = 11u64;
    for name in pick {
        let i = names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        let base = t.param(i).as_tensor().copy().unwrap();
        let n = base.elem_count();
        let dir_vals: Vec<f32> = (0..n)
            .map(|_| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((rng >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        let d = Tensor::from_vec(dir_vals, base.shape(), base.device()).unwrap();
        let analytic = (&grads[i] * &d)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let h = 1e-2;
        t.param(i)
            .set(&(&base + (&d * h).unwrap()).unwrap())
            .unwrap();
        let up = t.loss_at(&batch, 1.0).unwrap();
        t.param(i)
            .set(&(&base - (&d * h).unwrap()).unwrap())
            .unwrap();
        let down = t.loss_at(&batch, 1.0).unwrap();
        t.param(i).set(&base).unwrap();
        let numeric = (up - down) / (2.0 * h);
        let err = (analytic - numeric).abs();
        assert!(
            err <= 0.02 * analytic.abs().max(numeric.abs()) + 1e-3,
            "{name}: analytic {analytic}, numeric {numeric}"
        );
        assert!(
            analytic.abs() > 1e-4,
            "{name}: gradient is zero ({analytic}): the graph does not reach it"
        );
    }
}

fn run(dir: &Path, out: &Path, control: RunControl) -> (Adapter, bool) {
    let mut model = Model::open(dir).unwrap();
    let mut t = trainer(&mut model, out);
    let finished = t.run(&control, |_| {}).unwrap();
    let (adapter, _) = t.result().unwrap();
    (adapter, finished)
}

fn same(a: &Adapter, b: &Adapter) -> bool {
    let bits = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    a.generators.len() == b.generators.len()
        && a.generators
            .iter()
            .all(|(k, v)| bits(v) == bits(&b.generators[k]))
        && a.heads
            .tensors()
            .iter()
            .zip(b.heads.tensors())
            .all(|((_, x), (_, y))| bits(x) == bits(y))
}

#[test]
fn fixed_seed_runs_are_bit_identical_and_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_so8t(tmp.path());
    let full = |out: &str| {
        run(
            &dir,
            &tmp.path().join(out),
            RunControl {
                stop_after: None,
                checkpoint_every: 2,
                resume: false,
            },
        )
    };
    let (a, done_a) = full("a");
    let (b, _) = full("b");
    assert!(done_a);
    assert!(same(&a, &b), "two runs with one seed differ");
    let start = Adapter::read(&dir).unwrap();
    assert!(!same(&a, &start), "training changed nothing");

    // Stop after step 4 of 9 (checkpointed), then resume in a fresh model and trainer.
    let out = tmp.path().join("c");
    let (_, done) = run(
        &dir,
        &out,
        RunControl {
            stop_after: Some(4),
            checkpoint_every: 100,
            resume: false,
        },
    );
    assert!(!done);
    let (c, done_c) = run(
        &dir,
        &out,
        RunControl {
            stop_after: None,
            checkpoint_every: 100,
            resume: true,
        },
    );
    assert!(done_c);
    assert!(
        same(&a, &c),
        "resumed run ends elsewhere than the uninterrupted one"
    );
    let log = std::fs::read_to_string(out.join("so8t_train/log.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        (1..=9).collect::<Vec<_>>(),
        "the log holds each step once"
    );
}

#[test]
fn trained_gates_still_validate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_so8t(tmp.path());
    let mut model = Model::open(&dir).unwrap();
    let (config, _) = so8t_parts(&model).unwrap();
    let mut t = trainer(&mut model, &dir);
    t.run(
        &RunControl {
            stop_after: None,
            checkpoint_every: 0,
            resume: false,
        },
        |_| {},
    )
    .unwrap();
    let (adapter, mut trained) = t.result().unwrap();
    trained.thresholds = config.thresholds.clone();
    write_result(&dir, &adapter, &trained).unwrap();
    let checks = so8t::artifact::validate::validate(&dir);
    for c in &checks {
        assert!(c.ok, "{}: {}", c.name, c.detail);
    }
    assert!(checks.iter().any(|c| c.name == "orthogonality"));
    // The trained directory runs: its gates and heads load and give verdicts.
    let mut m = Model::open(&dir).unwrap();
    let ids = m
        .prompt_ids(&[so8t::chat::Message::new("user", "hello")])
        .unwrap();
    let h = m.decoder.forward_hidden(&ids, 0).unwrap();
    let v = m.so8t.as_ref().unwrap().heads.verdicts(&h).unwrap();
    assert!(v
        .iter()
        .all(|v| v.p_unsafe.is_finite() && v.p_unsafe != 0.5));
}
