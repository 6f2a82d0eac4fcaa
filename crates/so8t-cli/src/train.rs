use anyhow::{bail, Context, Result};
use so8t::model::Site;
use so8t::train::data::{read_jsonl, Dataset};
use so8t::train::gates::{GatesOptions, RunControl, Trainer};
use so8t::train::feature_cache::FeatureCache;
use so8t::train::heads::{head_short_of_families, FAMILY_FOLDS};
use so8t::train::{
    choose_thresholds, fit_heads, held_out_answers_by_family, held_out_thresholds, HeldOutScores, HEAD_NAMES, so8t_parts, AnswerWeight, Features, FitOptions, TrainOut,
    TRAIN_DIR,
};
use so8t::so8::verdict::{Thresholds, VerdictPosition};
use so8t::Model;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Mode {
    /// Fit both heads on hidden states cached in one pass (logistic regression).
    Heads,
    /// Train the gates' generators and the heads by backpropagation (SO8T_SPEC.md §6).
    Gates,
    /// Keep the heads; choose the thresholds again on --val (e.g. after changing
    /// --target-fpr or --consecutive).
    Thresholds,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    device: crate::DeviceArg,
    /// SO8T directory (from `so8t convert`).
    #[arg(short, long)]
    model: PathBuf,
    /// Labelled JSONL (README, "Training data"). Repeat it to fit heads on several files as
    /// on their concatenation (each file keeps its own --features-cache entry); gates read one.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Validation JSONL: picks the heads' weight decay and the decision thresholds.
    #[arg(long)]
    val: Option<PathBuf>,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Gates: sites to train (default: all the model has).
    #[arg(long, value_delimiter = ',')]
    sites: Option<Vec<String>>,
    /// Gates: factors to train (default: all the model has).
    #[arg(long, value_delimiter = ',')]
    factors: Option<Vec<String>>,
    /// Gates: factors to keep frozen.
    #[arg(long, value_delimiter = ',')]
    freeze: Vec<String>,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Gates: learning rate of the heads (Adam moves each of hidden_size weights by about this).
    #[arg(long, default_value_t = 1e-4)]
    head_lr: f64,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// λ_max of the PET schedule.
    #[arg(long, default_value_t = 0.1)]
    pet_max: f64,
    /// Weight of the safety cross-entropy.
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// Weight of the authority cross-entropy.
    #[arg(long, default_value_t = 1.0)]
    beta: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Heads: L2 weight decay (default: chosen on --val, else 1e-2). Gates: AdamW decay (default 0.01).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Gates: global gradient-norm cap.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Heads: the layer the heads read (1..=L), or `auto`: the one of L/3, L/2, 2L/3, 5L/6
    /// and L with the lowest validation loss, per head (needs --val).
    #[arg(long, default_value = "auto")]
    layer: String,
    /// Heads: where a prompt's verdict is read (default: the model's setting, after the
    /// assistant header for a new one).
    #[arg(long, value_enum)]
    position: Option<Position>,
    /// Streaming rule: consecutive generated tokens at or over the threshold that flag an
    /// answer (default: the model's setting, 2 for a new one).
    #[arg(long)]
    consecutive: Option<usize>,
    /// Heads: response tokens fitted on per training row (the first half in a row, the
    /// rest spread over the answer); validation, and held-out thresholds, read all.
    #[arg(long, default_value_t = 16)]
    response_tokens: usize,
    /// Heads: read the hidden states with the f32 weights quantised to this type (ggml's
    /// quantiser, as `export --quant` writes them): the heads then fit what that export
    /// computes, and the pass runs on the quantised kernels (several times faster).
    #[arg(long, value_parser = ["q8_0"])]
    features_quant: Option<String>,
    /// Heads: what the read tokens of one answer weigh together in the fit, against one
    /// prompt: `tokens` (each token as much as a prompt), a number, or `auto` (chosen with
    /// the weight decay by the loss on whole training families held out in turn).
    #[arg(long, default_value = "tokens")]
    answer_weight: String,
    /// Heads and thresholds: keep the hidden states of the data here and reuse them when
    /// the model, its gates, the weight quantisation, the data and the layers read are
    /// the same (a refit then takes seconds instead of the pass); one entry per --data file.
    #[arg(long)]
    features_cache: Option<PathBuf>,
    /// False positive rate the thresholds aim at, on the scores --thresholds-from names.
    #[arg(long, default_value_t = 0.05)]
    target_fpr: f64,
    /// Heads: choose the thresholds on `val` (--val), or on `families`: each training
    /// family scored by a fit that never saw it, the scores a new source of traffic gets.
    #[arg(long, default_value = "val", value_parser = ["val", "families"])]
    thresholds_from: String,
    /// Write the trained SO8T directory here (default: update --model in place).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace --out if it exists (as convert, bake and export do).
    #[arg(long)]
    force: bool,
    /// Gates: continue from the checkpoint in OUT/so8t_train.
    #[arg(long)]
    resume: bool,
    /// Gates: stop after this step, checkpointed, to continue later with --resume.
    #[arg(long)]
    stop_after: Option<usize>,
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Leave out unreadable rows (reported) instead of stopping.
    #[arg(long)]
    skip_bad: bool,
}

/// Streaming-rule lengths the summary compares on held-out training families.
const RULE_LENGTHS: [usize; 4] = [1, 2, 4, 8];

/// Per head with held-out scores, its training families' answers under the streaming rule
/// of `t` ([`held_out_answers_by_family`]).
fn answers_by_family(f: &Features, scores: &[&HeldOutScores], t: &Thresholds) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for s in scores {
        let v = held_out_answers_by_family(f, s, t.consecutive, t.response()[s.head]);
        out.insert(HEAD_NAMES[s.head].to_string(), serde_json::to_value(v)?);
    }
    Ok(out.into())
}

pub(crate) fn bar(len: usize, what: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what} {{elapsed}}<{{eta}} {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

/// Reads labelled JSONL, saying how many rows `--skip-bad` left out and why the first was.
pub(crate) fn read(
    path: &Path,
    labels: &so8t::artifact::adapter::Labels,
    skip_bad: bool,
) -> Result<Dataset> {
    let d = read_jsonl(path, labels, skip_bad)?;
    if !d.skipped.is_empty() {
        eprintln!(
            "{}: skipped {} bad rows (first: line {}: {})",
            path.display(),
            d.skipped.len(),
            d.skipped[0].0,
            d.skipped[0].1
        );
    }
    Ok(d)
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Position {
    /// After the chat template's assistant header (the prompt's last token).
    AssistantHeader,
    /// The last token of the user's message.
    UserEnd,
}

fn features(
    model: &mut Model,
    parts: &[Dataset],
    layers: &[usize],
    cap: Option<usize>,
    cache: Option<&FeatureCache>,
    what: &str,
) -> Result<Features> {
    let rows: usize = parts.iter().map(|d| d.examples.len()).sum();
    let b = bar(rows, what);
    let t0 = Instant::now();
    let f = Features::compute(model, parts, layers, cap, cache, |i| {
        b.set_position(i as u64);
        if b.is_hidden() && i % 1000 == 0 {
            eprintln!("{what}: {i}/{rows} after {:.0} s", t0.elapsed().as_secs_f64());
        }
    })?;
    b.finish_and_clear();
    Ok(f)
}

/// The layers `--layer` names for a model of `n` layers.
fn layers_of(arg: &str, n: usize) -> Result<Vec<usize>> {
    if arg == "auto" {
        let mut v: Vec<usize> = [n / 3, n / 2, 2 * n / 3, 5 * n / 6, n]
            .into_iter()
            .filter(|&l| l >= 1)
            .collect();
        v.dedup();
        return Ok(v);
    }
    match arg.parse::<usize>() {
        Ok(l) if (1..=n).contains(&l) => Ok(vec![l]),
        _ => bail!("--layer {arg}: expected `auto` or a layer in 1..={n}"),
    }
}

pub fn main(a: Args) -> Result<()> {
    if !(a.target_fpr >= 0.0 && a.target_fpr < 1.0) {
        bail!("--target-fpr must be in [0, 1)");
    }
    if a.consecutive == Some(0) {
        bail!("--consecutive must be at least 1");
    }
    if a.mode == Mode::Gates && a.data.len() > 1 {
        // Its error messages name one file by line.
        bail!("--mode gates reads one --data file (join them into one to train gates on several)");
    }
    if a.mode == Mode::Heads && (a.resume || a.stop_after.is_some()) {
        bail!("--resume and --stop-after are for --mode gates (a heads fit takes one pass)");
    }
    let t0 = Instant::now();
    let mut model = a.device.open_model(&a.model)?;
    let (mut config, mut adapter) = so8t_parts(&model)?;
    let parts = a
        .data
        .iter()
        .map(|p| read(p, &config.labels, a.skip_bad))
        .collect::<Result<Vec<_>>>()?;
    let data_name = a.data.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" + ");
    let train_examples: Vec<_> = parts.iter().flat_map(|d| d.examples.iter().cloned()).collect();
    let val = a
        .val
        .as_deref()
        .map(|p| read(p, &config.labels, a.skip_bad))
        .transpose()?;
    let from_families = a.thresholds_from == "families";
    if from_families && a.mode != Mode::Heads {
        bail!("--thresholds-from families is for --mode heads (its held-out fits read the training rows' states)");
    }
    if let Some(name) = from_families.then(|| head_short_of_families(&train_examples)).flatten() {
        bail!(
            "{}: --thresholds-from families needs the {name} head's rows in at least {FAMILY_FOLDS} families (`family`, else `source`), to hold out in turn",
            data_name
        );
    }
    let answer_weight = match a.answer_weight.as_str() {
        "auto" => AnswerWeight::ByFamilies,
        "tokens" => AnswerWeight::Tokens,
        w => match w.parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => AnswerWeight::Fixed(v),
            _ => bail!("--answer-weight {w}: expected `tokens`, `auto` or a number > 0"),
        },
    };
    let dest = TrainOut::prepare(&a.model, a.out.as_deref(), a.resume, a.force)?;
    let out = dest.work.clone();
    if let Some(k) = a.consecutive {
        config.thresholds.consecutive = k;
    }
    let n_layers = model.config.num_layers;
    if a.features_quant.is_some() {
        if a.mode == Mode::Gates {
            bail!("--features-quant is for --mode heads and thresholds (gates train on the weights as they are)");
        }
        let n = model.decoder.quantize_dense(so8t::kernels::QType::Q8_0)?;
        eprintln!("hidden states from Q8_0 weights ({n} matrices quantised)");
    }
    if a.mode == Mode::Thresholds && (val.is_none() || !config.heads_trained) {
        bail!("--mode thresholds needs trained heads and --val");
    }
    let cache = match &a.features_cache {
        Some(dir) if a.mode != Mode::Gates => Some(FeatureCache::new(
            dir,
            &a.model,
            &config,
            &adapter,
            a.features_quant.as_deref(),
        )?),
        Some(_) => bail!("--features-cache is for --mode heads and thresholds (gates change the states)"),
        None => None,
    };
    let mode = match a.mode {
        Mode::Heads => "heads",
        Mode::Gates => "gates",
        Mode::Thresholds => "thresholds",
    };
    let mut summary = serde_json::json!({ "mode": mode, "train_rows": train_examples.len() });
    let mut val_features = None;
    match a.mode {
        Mode::Heads => {
            let mut layers = layers_of(&a.layer, n_layers)?;
            if layers.len() > 1 && val.is_none() {
                eprintln!("no --val to choose a layer on: the heads read the final layer");
                layers = vec![n_layers];
            }
            if let Some(p) = a.position {
                config.verdict_position = match p {
                    Position::AssistantHeader => VerdictPosition::AssistantHeader,
                    Position::UserEnd => VerdictPosition::UserEnd,
                };
            }
            let t = Instant::now();
            // Held-out thresholds run the streaming rule over whole answers, so that pass
            // reads every token; the fit still takes --response-tokens of each.
            let read_tokens = (!from_families).then_some(a.response_tokens);
            let tf = features(&mut model, &parts, &layers, read_tokens, cache.as_ref(), "train rows")?;
            let vf = val
                .as_ref()
                .map(|v| features(&mut model, std::slice::from_ref(v), &layers, None, cache.as_ref(), "val rows"))
                .transpose()?;
            let feature_seconds = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let opts = FitOptions {
                weight_decay: a.weight_decay,
                answer_weight,
                position: config.verdict_position,
                response_tokens: Some(a.response_tokens),
                held_out_scores: from_families,
            };
            let (heads, setting, reports) =
                fit_heads(&tf, vf.as_ref(), &opts, (&adapter.heads, &config.heads))?;
            if reports.is_empty() {
                bail!("{}: no head has labels of both classes", data_name);
            }
            adapter.heads = heads;
            config.heads = setting;
            summary["heads"] = serde_json::to_value(&reports)?;
            if from_families {
                let scores: Vec<_> = reports.iter().filter_map(|r| r.held_out.as_ref()).collect();
                let (t, chosen) = held_out_thresholds(
                    &tf,
                    &scores,
                    config.verdict_position,
                    a.target_fpr,
                    &config.thresholds,
                );
                if chosen.len() < reports.len() {
                    bail!("{}: --thresholds-from families: a trained head's held-out families give no prompts of both classes to set its threshold on", data_name);
                }
                config.thresholds = t;
                summary["thresholds"] = serde_json::to_value(&chosen)?;
                summary["held_out_answers"] = answers_by_family(&tf, &scores, &config.thresholds)?;
                // The same measure for other lengths of the streaming rule, each at its own
                // threshold for the same target: what a different `--consecutive` would give
                // on families the heads never saw, without a test file.
                let mut by_rule = Vec::new();
                for k in RULE_LENGTHS {
                    let current = Thresholds { consecutive: k, ..config.thresholds.clone() };
                    let (t, chosen) =
                        held_out_thresholds(&tf, &scores, config.verdict_position, a.target_fpr, &current);
                    by_rule.push(serde_json::json!({
                        "consecutive": k,
                        "thresholds": chosen,
                        "families": answers_by_family(&tf, &scores, &t)?,
                    }));
                }
                summary["held_out_answers_by_consecutive"] = by_rule.into();
            }
            summary["feature_seconds"] = feature_seconds.into();
            summary["fit_seconds"] = t.elapsed().as_secs_f64().into();
            val_features = vf;
        }
        Mode::Thresholds => {}
        Mode::Gates => {
            let pick = |given: &Option<Vec<String>>, all: Vec<String>| given.clone().unwrap_or(all);
            let mut sites = Vec::new();
            for s in pick(
                &a.sites,
                config.sites.iter().map(|s| s.name().to_string()).collect(),
            ) {
                sites.push(
                    Site::parse(&s).with_context(|| {
                        format!("unknown site `{s}` (expected q, k, v, o or mlp)")
                    })?,
                );
            }
            let factors: Vec<String> = pick(&a.factors, config.factors.clone())
                .into_iter()
                .filter(|f| !a.freeze.contains(f))
                .collect();
            for f in &a.freeze {
                if !config.factors.contains(f) {
                    bail!(
                        "--freeze {f}: not one of the model's factors {:?}",
                        config.factors
                    );
                }
            }
            if factors.is_empty() {
                bail!("every factor is frozen: nothing to train");
            }
            let opts = GatesOptions {
                sites,
                factors,
                epochs: a.epochs,
                lr: a.lr,
                head_lr: a.head_lr,
                batch: a.batch,
                pet_max: a.pet_max,
                alpha: a.alpha,
                beta: a.beta,
                seed: a.seed,
                weight_decay: a.weight_decay.unwrap_or(0.01),
                clip: a.clip,
            };
            let control = RunControl {
                stop_after: a.stop_after,
                checkpoint_every: a.checkpoint_every,
                resume: a.resume,
            };
            let mut trainer = Trainer::new(
                &mut model,
                config.clone(),
                adapter,
                opts.clone(),
                train_examples,
                &parts[0].path,
                &out,
            )?;
            let b = bar(trainer.total_steps(), "steps");
            let finished = trainer.run(&control, |s| {
                b.set_position(s.step as u64);
                b.set_message(format!(
                    "loss {:.4} lm {:.4} safety {:.4} authority {:.4} pet {:.5} λ {:.3}",
                    s.loss, s.lm, s.safety, s.authority, s.pet, s.lambda
                ));
            })?;
            b.finish();
            let (step, total) = (trainer.step(), trainer.total_steps());
            if !finished {
                eprintln!(
                    "stopped at step {step} of {total}; checkpoint in {}; continue with --resume",
                    out.join(TRAIN_DIR).display()
                );
                return Ok(());
            }
            let (trained, trained_config) = trainer.result()?;
            drop(trainer);
            adapter = trained;
            config = trained_config;
            adapter.install(&mut model.decoder, &config)?;
            summary["gates"] = serde_json::to_value(&opts)?;
            summary["steps"] = step.into();
        }
    }
    config.heads_trained = true;
    // --thresholds-from families chose them with the heads.
    if let (Some(v), false) = (&val, from_families) {
        let vf = match val_features {
            Some(f) => f,
            None => {
                let [s, h] = config.heads.layers(n_layers);
                let mut layers = vec![s, h, n_layers];
                layers.sort_unstable();
                layers.dedup();
                features(&mut model, std::slice::from_ref(v), &layers, None, cache.as_ref(), "val rows")?
            }
        };
        let (t, reports) = choose_thresholds(
            &adapter.heads,
            &config.heads,
            config.verdict_position,
            &vf,
            n_layers,
            a.target_fpr,
            &config.thresholds,
        )?;
        config.thresholds = t;
        summary["thresholds"] = serde_json::to_value(&reports)?;
    } else if !from_families {
        eprintln!("no --val: thresholds stay at {:?}", config.thresholds);
    }
    summary["seconds"] = t0.elapsed().as_secs_f64().into();
    let dir = out.join(TRAIN_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    so8t::staging::write_bytes(
        &dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    // What every reader will check, checked before the result replaces anything (a
    // diverged run must not swap a good directory for one nobody can open).
    adapter.check_shapes(
        &model.config,
        &config,
        &dest.target.join(so8t::artifact::adapter::ADAPTER_FILE),
    )?;
    dest.finish(&adapter, &config)?;
    let out = &dest.target;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!(
        "wrote {} (heads trained at layers {:?}; thresholds on prompts {:?}, on answers {:?} over {} consecutive tokens)",
        out.display(),
        config.heads.layers(n_layers),
        config.thresholds.prompt(),
        config.thresholds.response(),
        config.thresholds.consecutive
    );
    Ok(())
}
