//! HuggingFace Llama import/export, `convert`, pretrained initialization and generation with a KV cache.

mod common;

use common::{corpus_dir, ov, tiny_config};
use fast_llm_rs::backend::cpu::CpuKernels;
use fast_llm_rs::backend::Kernels;
use fast_llm_rs::config::{BaseModelConfig, PretrainedConfig};
use fast_llm_rs::generate::{argmax, GenerateOptions, InferenceModel, KvCache, Sampling};
use fast_llm_rs::hf::{
    convert, export_llama, export_llama_with, import_llama, pretrained_tensors, tensors_from_flat, ConvertArgs,
    ExportOptions, HfDtype, NamedTensor, INDEX_FILE, SINGLE_FILE,
};
use fast_llm_rs::model::{init, Batch, Init, LayerKind, Llama, ModelShape, Rope};
use serde_json::{json, Value};
use std::path::Path;

/// A small architecture with grouped KV heads, distinct epsilons and a non-default theta.
fn base() -> BaseModelConfig {
    let mut b = BaseModelConfig {
        hidden_size: 16,
        ..Default::default()
    };
    b.embeddings.vocab_size = 37;
    b.decoder.num_blocks = 2;
    let blk = &mut b.decoder.block;
    blk.mixer.heads = 4;
    blk.mixer.head_groups = 2;
    blk.mixer.head_size = 6;
    blk.mixer.rotary.theta = 5000.0;
    blk.mlp.intermediate_size = 20;
    blk.normalization.epsilon = 1e-6;
    b.head.normalization.epsilon = 1e-6;
    b
}

/// Deterministic weights of `b` (norm weights perturbed around 1 so they matter).
fn weights(b: &BaseModelConfig, seed: u64) -> Vec<NamedTensor> {
    let model = Llama::new(ModelShape::from_config(b).unwrap());
    model
        .all_params()
        .into_iter()
        .enumerate()
        .map(|(p, spec)| {
            let v = (0..spec.numel())
                .map(|e| {
                    let z = init::normal(seed, p as u64, e as u64) as f32;
                    match spec.init {
                        Init::Ones => 1.0 + 0.2 * z,
                        Init::Normal(_) | Init::Zeros => 0.3 * z,
                    }
                })
                .collect();
            (spec.name, spec.shape, v)
        })
        .collect()
}

fn assert_bitwise(a: &[NamedTensor], b: &[NamedTensor]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0);
        assert_eq!(x.1, y.1, "{}", x.0);
        let xb: Vec<u32> = x.2.iter().map(|v| v.to_bits()).collect();
        let yb: Vec<u32> = y.2.iter().map(|v| v.to_bits()).collect();
        assert!(xb == yb, "tensor {} differs", x.0);
    }
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(err: &str, words: &[&str]) {
    for w in words {
        assert!(err.contains(w), "error does not mention {w:?}: {err}");
    }
}

/// Write a safetensors file by hand: `(name, dtype, shape, raw bytes)`.
fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + bytes.len()]}),
        );
        off += bytes.len();
    }
    let mut head = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    for t in tensors {
        out.extend_from_slice(&t.3);
    }
    std::fs::write(path, out).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Rewrite `dir/model.safetensors` (F32) from `tensors`.
fn rewrite_f32(dir: &Path, tensors: &[NamedTensor]) {
    let t: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.as_str(), "F32", s.clone(), f32_bytes(v)))
        .collect();
    write_safetensors(&dir.join(SINGLE_FILE), &t);
}

#[test]
fn export_then_import_is_bitwise_identical() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let (b, w) = (base(), weights(&base(), 1));
    export_llama(&out, &b, &w, HfDtype::F32).unwrap();
    assert!(out.join(SINGLE_FILE).exists() && !out.join(INDEX_FILE).exists());
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], json!(["LlamaForCausalLM"]));
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["num_key_value_heads"], 2);
    assert_eq!(cfg["head_dim"], 6);
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["torch_dtype"], "float32");
    let (b2, w2) = import_llama(&out).unwrap();
    assert_eq!(b2, b);
    assert_bitwise(&w, &w2);
    // No temporary directory is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("hf")]);
}

#[test]
fn sharded_export_round_trips_through_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let (b, w) = (base(), weights(&base(), 2));
    // 1000 bytes: most tensors get a shard of their own.
    export_llama_with(
        &out,
        &b,
        &w,
        &ExportOptions {
            max_shard_bytes: 1000,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!out.join(SINGLE_FILE).exists());
    let index: Value = serde_json::from_str(&std::fs::read_to_string(out.join(INDEX_FILE)).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), w.len());
    let files: std::collections::BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(files.len() > 3, "{files:?}");
    let n = files.len();
    for (i, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        assert!(out.join(f).exists());
    }
    let total: usize = w.iter().map(|t| t.2.len() * 4).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    let (b2, w2) = import_llama(&out).unwrap();
    assert_eq!(b2, b);
    assert_bitwise(&w, &w2);

    // Re-export unsharded over it: the stale shards and the index disappear, other files stay.
    std::fs::write(out.join("tokenizer.json"), "{}").unwrap();
    export_llama(&out, &b, &w, HfDtype::F32).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors", "tokenizer.json"]);
    assert_bitwise(&w, &import_llama(&out).unwrap().1);
}

#[test]
fn bf16_and_f16_imports_convert_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let (b, w) = (base(), weights(&base(), 3));
    export_llama(&out, &b, &w, HfDtype::F32).unwrap();
    // Hand-written BF16 file: bits of known values, plus bf16-rounded weights.
    let known: [(u16, f32); 4] = [(0x3F80, 1.0), (0xC040, -3.0), (0x3E20, 0.15625), (0x0000, 0.0)];
    let mut expected = Vec::new();
    let mut tensors = Vec::new();
    for (i, (name, shape, v)) in w.iter().enumerate() {
        let mut bits: Vec<u16> = v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        if i == 0 {
            for (j, (k, _)) in known.iter().enumerate() {
                bits[j] = *k;
            }
        }
        let vals: Vec<f32> = bits.iter().map(|&h| half::bf16::from_bits(h).to_f32()).collect();
        if i == 0 {
            for (j, (_, f)) in known.iter().enumerate() {
                assert_eq!(vals[j], *f);
            }
        }
        expected.push((name.clone(), shape.clone(), vals));
        let bytes: Vec<u8> = bits.iter().flat_map(|h| h.to_le_bytes()).collect();
        tensors.push((name.as_str(), "BF16", shape.clone(), bytes));
    }
    write_safetensors(&out.join(SINGLE_FILE), &tensors);
    let (_, got) = import_llama(&out).unwrap();
    assert_bitwise(&expected, &got);

    // Our own BF16 and F16 exports read back as the rounded values.
    for (dtype, round) in [
        (
            HfDtype::Bf16,
            (|x: f32| half::bf16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (HfDtype::F16, |x: f32| half::f16::from_f32(x).to_f32()),
    ] {
        export_llama(&out, &b, &w, dtype).unwrap();
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["torch_dtype"], dtype.torch_name());
        let rounded: Vec<NamedTensor> = w
            .iter()
            .map(|(n, s, v)| (n.clone(), s.clone(), v.iter().map(|&x| round(x)).collect()))
            .collect();
        assert_bitwise(&rounded, &import_llama(&out).unwrap().1);
    }
}

#[test]
fn missing_tensor_is_refused_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let w = weights(&base(), 4);
    export_llama(&out, &base(), &w, HfDtype::F32).unwrap();
    let without: Vec<NamedTensor> = w
        .iter()
        .filter(|t| t.0 != "model.layers.1.mlp.up_proj.weight")
        .cloned()
        .collect();
    rewrite_f32(&out, &without);
    let err = err_text(import_llama(&out));
    assert_mentions(
        &err,
        &[
            "missing tensor",
            "model.layers.1.mlp.up_proj.weight",
            "model.safetensors",
        ],
    );
}

#[test]
fn wrong_shape_is_refused_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let mut w = weights(&base(), 5);
    export_llama(&out, &base(), &w, HfDtype::F32).unwrap();
    let t = w
        .iter_mut()
        .find(|t| t.0 == "model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    t.1 = vec![t.1[1], t.1[0]];
    rewrite_f32(&out, &w);
    let err = err_text(import_llama(&out));
    assert_mentions(
        &err,
        &[
            "model.safetensors",
            "model.layers.0.self_attn.k_proj.weight",
            "[16, 12]",
            "[12, 16]",
        ],
    );
}

#[test]
fn nan_is_refused_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let mut w = weights(&base(), 6);
    export_llama(&out, &base(), &w, HfDtype::F32).unwrap();
    w.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap().2[3] = f32::NAN;
    rewrite_f32(&out, &w);
    let err = err_text(import_llama(&out));
    assert_mentions(
        &err,
        &["model.safetensors", "model.norm.weight", "non-finite", "index 3"],
    );
    w.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap().2[3] = f32::INFINITY;
    rewrite_f32(&out, &w);
    assert_mentions(&err_text(import_llama(&out)), &["model.norm.weight", "inf"]);
}

#[test]
fn truncated_file_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    export_llama_with(
        &out,
        &base(),
        &weights(&base(), 7),
        &ExportOptions {
            max_shard_bytes: 4000,
            ..Default::default()
        },
    )
    .unwrap();
    let index: Value = serde_json::from_str(&std::fs::read_to_string(out.join(INDEX_FILE)).unwrap()).unwrap();
    let mut files: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    files.sort();
    files.dedup();
    assert!(files.len() >= 3, "{files:?}");
    let name = files[1].to_string();
    let shard = out.join(&name);
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&shard).unwrap();
    f.set_len(len - 10).unwrap();
    let err = err_text(import_llama(&out));
    assert_mentions(&err, &[name.as_str(), "truncated"]);
    // A shard listed in the index but absent.
    std::fs::remove_file(&shard).unwrap();
    assert_mentions(&err_text(import_llama(&out)), &[name.as_str(), INDEX_FILE]);
}

#[test]
fn unexpected_tensors_are_refused_but_rotary_buffers_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let w = weights(&base(), 8);
    export_llama(&out, &base(), &w, HfDtype::F32).unwrap();
    let mut extra = w.clone();
    extra.push((
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        vec![3],
        vec![1.0, 0.1, 0.01],
    ));
    rewrite_f32(&out, &extra);
    assert_bitwise(&w, &import_llama(&out).unwrap().1);
    extra.push(("model.layers.2.mlp.up_proj.weight".into(), vec![2], vec![0.0, 0.0]));
    rewrite_f32(&out, &extra);
    assert_mentions(
        &err_text(import_llama(&out)),
        &["unexpected tensor", "model.layers.2.mlp.up_proj.weight"],
    );
}

#[test]
fn unsupported_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    export_llama(&out, &base(), &weights(&base(), 9), HfDtype::F32).unwrap();
    let original: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let cases: [(&str, Value, &str); 4] = [
        (
            "rope_scaling",
            json!({"rope_type": "linear", "factor": 8.0}),
            "rope_scaling.rope_type = 'linear'",
        ),
        ("attention_bias", json!(true), "attention_bias"),
        ("hidden_act", json!("gelu"), "hidden_act"),
        ("model_type", json!("gemma"), "model_type"),
    ];
    for (key, value, words) in cases {
        let mut cfg = original.clone();
        cfg[key] = value;
        std::fs::write(out.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_mentions(&err_text(import_llama(&out)), &[words, "config.json"]);
    }
    // Defaults of a minimal config: kv heads = heads, head_dim = hidden / heads.
    let mut cfg = original.clone();
    let obj = cfg.as_object_mut().unwrap();
    for k in ["num_key_value_heads", "head_dim", "rope_scaling", "tie_word_embeddings"] {
        obj.remove(k);
    }
    std::fs::write(out.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    // head_dim 16/4 = 4 and 4 kv heads: the stored shapes no longer fit, named by the shape check.
    assert_mentions(
        &err_text(import_llama(&out)),
        &["model.layers.0.self_attn.q_proj.weight", "shape"],
    );
}

#[test]
fn pretrained_architecture_mismatch_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let w = weights(&base(), 10);
    export_llama(&out, &base(), &w, HfDtype::F32).unwrap();
    let p = PretrainedConfig {
        path: out.clone(),
        format: "llama".into(),
    };
    assert_bitwise(&w, &pretrained_tensors(&p, &base()).unwrap());
    let mut other = base();
    other.decoder.block.mlp.intermediate_size = 24;
    let err = err_text(pretrained_tensors(&p, &other));
    assert_mentions(
        &err,
        &["model.base_model.decoder.block.mlp.intermediate_size", "24", "20"],
    );
    let p = PretrainedConfig {
        path: out,
        format: "distributed".into(),
    };
    assert!(pretrained_tensors(&p, &base()).is_err());
}

#[test]
fn training_starts_from_pretrained_weights_on_every_shard_layout() {
    let data = corpus_dir();
    let exp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(data.path(), exp.path(), &[]);
    let model = Llama::new(ModelShape::from_config(&cfg.model.base_model).unwrap());
    let w = weights(&cfg.model.base_model, 11);
    let hf = exp.path().join("hf");
    export_llama(&hf, &cfg.model.base_model, &w, HfDtype::F32).unwrap();
    let flat: Vec<f32> = w.iter().flat_map(|t| t.2.iter().copied()).collect();
    let quiet = fast_llm_rs::train::TrainOptions {
        quiet: true,
        ..Default::default()
    };
    let settings = |iters: u64, world: usize, zero: u8, lps: &str, df: usize, pretrained: bool| {
        let mut o = ov(&[
            ("training.train_iters", iters.to_string()),
            ("model.distributed.world_size", world.to_string()),
            ("model.multi_stage.zero_stage", zero.to_string()),
            ("model.multi_stage.layers_per_stage", lps.into()),
            ("schedule.depth_first_micro_batches", df.to_string()),
        ]);
        if pretrained {
            o.push(format!("pretrained.path={}", hf.display()));
            o.push("pretrained.format=llama".into());
        }
        tiny_config(data.path(), exp.path(), &o)
    };
    // The shards hold exactly the pretrained weights, whatever the layout (parameters straddle shards).
    for (world, zero, lps) in [(1, 1, "1"), (2, 3, "0.5"), (3, 2, "2")] {
        let s = fast_llm_rs::train::train(&settings(0, world, zero, lps, 1, true), &quiet).unwrap();
        assert!(
            s.final_weights == flat,
            "world {world}: weights differ from the pretrained ones"
        );
    }
    // The first step's loss comes from them: equal across layouts of the same global batch (64 tokens),
    // different from a run from the seed's initialization.
    let mut losses = Vec::new();
    for (world, zero, lps, df) in [(1, 1, "1", 2), (2, 3, "0.5", 1), (2, 2, "2", 1)] {
        let s = fast_llm_rs::train::train(&settings(1, world, zero, lps, df, true), &quiet).unwrap();
        losses.push(s.losses[0]);
    }
    assert!(losses.iter().all(|l| (l - losses[0]).abs() < 1e-6), "{losses:?}");
    let scratch = fast_llm_rs::train::train(&settings(1, 1, 1, "1", 2, false), &quiet).unwrap();
    assert!(
        (scratch.losses[0] - losses[0]).abs() > 1e-3,
        "{} vs {losses:?}",
        scratch.losses[0]
    );
    assert_eq!(tensors_from_flat(&model, &flat).unwrap().len(), w.len());
}

#[test]
fn convert_reshards_llama_and_explains_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let w = weights(&base(), 12);
    export_llama(&a, &base(), &w, HfDtype::F32).unwrap();
    std::fs::write(a.join("tokenizer.json"), "{\"x\": 1}").unwrap();
    let args: Vec<String> = [
        format!("input.path={}", a.display()),
        "input.format=llama".into(),
        format!("output.path={}", b.display()),
        "output.format=llama".into(),
        "output.max_shard_size=2KB".into(),
    ]
    .into();
    let report = convert(&ConvertArgs::parse(&args).unwrap()).unwrap();
    assert!(report.contains("tensors"), "{report}");
    assert!(b.join(INDEX_FILE).exists() && b.join("tokenizer.json").exists());
    assert_bitwise(&w, &import_llama(&b).unwrap().1);

    let parse = |xs: &[&str]| ConvertArgs::parse(&xs.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_mentions(
        &err_text(parse(&["input.pth=x"])),
        &["unknown convert key 'input.pth'", "input.path"],
    );
    assert_mentions(&err_text(parse(&["input.path"])), &["not key=value"]);
    assert_mentions(
        &err_text(parse(&[
            "input.path=x",
            "input.format=gguf",
            "output.path=y",
            "output.format=llama",
        ])),
        &["input.format = 'gguf'", "llama", "distributed"],
    );
    assert_mentions(&err_text(parse(&["input.path=x", "output.path=y"])), &["output.format"]);
    let to_dist = parse(&[
        &format!("input.path={}", a.display()),
        "output.path=y",
        "output.format=distributed",
    ])
    .unwrap();
    assert_eq!(to_dist.input_format, "llama");
    assert_mentions(&err_text(convert(&to_dist)), &["pretrained", "format: llama"]);
}

/// Logits of every position of `tokens` from the training forward (`forward_layer`, no cache):
/// every layer but the head, then the head's norm and projection.
fn full_forward_logits(m: &InferenceModel, tokens: &[u32]) -> Vec<f32> {
    let model = &m.model;
    let s = &model.shape;
    let k = CpuKernels::new(2);
    let b = Batch {
        batch: 1,
        seq: tokens.len(),
    };
    let rope = Rope::<f32>::new(b.seq, s.head_size, &s.rotary);
    let mut acts = model.alloc_acts::<f32>(b, 0..model.layers.len());
    let mut scratch = model.alloc_scratch::<f32>(b);
    acts.tokens.copy_from_slice(tokens);
    let head = model.layers.len() - 1;
    assert_eq!(model.layers[head], LayerKind::Head);
    for l in 0..head {
        let (w, table) = (m.layer_weights(l), m.layer_weights(0));
        model.forward_layer(&k, &rope, l, w, table, &mut acts, &mut scratch, b, None);
    }
    let (norm_w, out_w) = model.head_weights(m.layer_weights(head), m.layer_weights(0));
    let n = tokens.len();
    let (mut normed, mut rstd) = (vec![0f32; n * s.hidden], vec![0f32; n]);
    k.rms_norm_forward(
        &mut normed,
        &mut rstd,
        &acts.hidden[head],
        norm_w,
        s.hidden,
        s.head_norm_eps as f32,
    );
    let mut logits = vec![0f32; n * s.vocab];
    k.matmul(&mut logits, &normed, out_w, n, s.vocab, s.hidden, false, true, false);
    logits
}

/// Decoding `tokens` with the KV cache gives the training forward's logits `full` at every position:
/// token by token from an empty cache, and after a prefill of `prefill` tokens (all logits), then token
/// by token. Returns the second cache, full.
fn cached_decode_matches(m: &InferenceModel, tokens: &[u32], full: &[f32], prefill: usize) -> KvCache {
    let v = m.model.shape.vocab;
    let mut cache = m.new_cache(tokens.len());
    for (i, &t) in tokens.iter().enumerate() {
        let l = m.forward(&mut cache, &[t], false).unwrap();
        let d = max_diff(&l, &full[i * v..(i + 1) * v]);
        assert!(d < 1e-4, "position {i}: max |diff| {d:e}");
    }
    let mut cache = m.new_cache(tokens.len());
    let pre = m.forward(&mut cache, &tokens[..prefill], true).unwrap();
    assert!(max_diff(&pre, &full[..prefill * v]) < 1e-4);
    for (i, &t) in tokens.iter().enumerate().skip(prefill) {
        let l = m.forward(&mut cache, &[t], false).unwrap();
        assert!(max_diff(&l, &full[i * v..(i + 1) * v]) < 1e-4, "position {i}");
    }
    cache
}

/// `w` with the values of the tensors whose name satisfies `pick` replaced by `edit(index, value)`.
fn edited(w: &[NamedTensor], pick: impl Fn(&str) -> bool, edit: impl Fn(usize, f32) -> f32) -> Vec<NamedTensor> {
    w.iter()
        .map(|(n, s, v)| {
            let v = if pick(n) {
                v.iter().enumerate().map(|(i, &x)| edit(i, x)).collect()
            } else {
                v.clone()
            };
            (n.clone(), s.clone(), v)
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn test_tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| (init::mix64(1000 + i as u64) % vocab as u64) as u32)
        .collect()
}

#[test]
fn kv_cache_decode_matches_full_forward() {
    let b = base();
    let m = InferenceModel::new(&b, &weights(&b, 13), 2).unwrap();
    let v = m.model.shape.vocab;
    let tokens = test_tokens(19, v);
    let full = full_forward_logits(&m, &tokens);
    let scale = full.iter().fold(0f32, |a, x| a.max(x.abs()));
    assert!(scale > 0.5, "logits too small to be a meaningful test: {scale}");

    let mut cache = cached_decode_matches(&m, &tokens, &full, 11);
    assert_eq!(cache.len(), tokens.len());
    assert!(
        m.forward(&mut cache, &[0], false).is_err(),
        "a full cache must refuse more tokens"
    );

    // Whole-sequence prefill, last position only.
    let mut cache = m.new_cache(tokens.len());
    let last = m.forward(&mut cache, &tokens, false).unwrap();
    assert!(max_diff(&last, &full[(tokens.len() - 1) * v..]) < 1e-4);
}

#[test]
fn greedy_generation_is_deterministic_and_matches_uncached_argmax() {
    let b = base();
    let m = InferenceModel::new(&b, &weights(&b, 14), 2).unwrap();
    let prompt = test_tokens(5, m.model.shape.vocab);
    let opts = GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling::Greedy,
        stop_token: None,
    };
    let mut streamed = Vec::new();
    let a = m.generate(&prompt, &opts, |t| streamed.push(t)).unwrap();
    let again = m.generate(&prompt, &opts, |_| {}).unwrap();
    assert_eq!(a.len(), 12);
    assert_eq!(a, again);
    assert_eq!(a, streamed);
    // Each token is the argmax of a cache-free forward over the prefix.
    let mut seq = prompt.clone();
    let v = m.model.shape.vocab;
    for &t in &a {
        let full = full_forward_logits(&m, &seq);
        assert_eq!(t, argmax(&full[(seq.len() - 1) * v..]), "after {} tokens", seq.len());
        seq.push(t);
    }
    // Stop token: generation ends after it.
    let stop = GenerateOptions {
        stop_token: Some(a[3]),
        ..opts.clone()
    };
    let first = a.iter().position(|&t| t == a[3]).unwrap();
    assert_eq!(m.generate(&prompt, &stop, |_| {}).unwrap(), a[..=first].to_vec());
    // Seeded sampling is reproducible.
    let sampled = GenerateOptions {
        sampling: Sampling::TopK {
            top_p: 1.0,
            temperature: 0.8,
            top_k: 5,
            seed: 42,
        },
        ..opts
    };
    assert_eq!(
        m.generate(&prompt, &sampled, |_| {}).unwrap(),
        m.generate(&prompt, &sampled, |_| {}).unwrap()
    );
    assert!(m.generate(&[], &sampled, |_| {}).is_err());
}

#[test]
fn top_k_one_is_greedy_and_sampling_follows_the_distribution() {
    use fast_llm_rs::generate::Sampler;
    let logits = [0.0f32, 2.0, 1.0, 2.0, -1.0];
    let mut s = Sampler::new(Sampling::TopK {
        temperature: 1.0,
        top_k: 1,
        top_p: 1.0,
        seed: 3,
    });
    assert!((0..20).all(|_| s.sample(&logits) == 1));
    let mut s = Sampler::new(Sampling::Greedy);
    assert_eq!(s.sample(&logits), 1);
    // top_k 2 keeps ids 1 and 3 (equal logits): about half each, never anything else.
    let mut s = Sampler::new(Sampling::TopK {
        temperature: 1.0,
        top_k: 2,
        top_p: 1.0,
        seed: 9,
    });
    let picks: Vec<u32> = (0..2000).map(|_| s.sample(&logits)).collect();
    let ones = picks.iter().filter(|&&t| t == 1).count();
    assert!(picks.iter().all(|&t| t == 1 || t == 3));
    assert!((800..1200).contains(&ones), "{ones}");

    // Top-p: probabilities 0.5, 0.3, 0.15, 0.05 (ids 2, 0, 3, 1). 0.75 keeps the first two (0.8 >=
    // 0.75), sampled 5:3; 0.5 keeps one (0.5 >= 0.5); 0.81 keeps three.
    let probs = [0.3f64, 0.05, 0.5, 0.15];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    let kept = |top_p: f32| {
        let mut s = Sampler::new(Sampling::TopK {
            temperature: 1.0,
            top_k: 0,
            top_p,
            seed: 11,
        });
        let mut counts = [0usize; 4];
        for _ in 0..8000 {
            counts[s.sample(&logits) as usize] += 1;
        }
        counts
    };
    let c = kept(0.75);
    assert_eq!((c[1], c[3]), (0, 0), "{c:?}");
    let share = c[2] as f64 / 8000.0;
    assert!((share - 0.625).abs() < 0.03, "{c:?}: 0.5 / 0.8 of the draws expected");
    assert_eq!(kept(0.5), [0, 0, 8000, 0]);
    let c = kept(0.81);
    assert!(c[1] == 0 && c[3] > 0, "{c:?}");
}

#[test]
fn distributed_checkpoints_convert_generate_and_initialize_training() {
    let data = corpus_dir();
    let exp = tempfile::tempdir().unwrap();
    let quiet = fast_llm_rs::train::TrainOptions {
        quiet: true,
        ..Default::default()
    };
    let o = ov(&[
        ("training.train_iters", "2".into()),
        ("training.checkpoint.interval", "2".into()),
        ("model.distributed.world_size", "2".into()),
        ("model.multi_stage.zero_stage", "3".into()),
    ]);
    let cfg = tiny_config(data.path(), exp.path(), &o);
    let trained = fast_llm_rs::train::train(&cfg, &quiet).unwrap();
    let model = Llama::new(ModelShape::from_config(&cfg.model.base_model).unwrap());
    let expected = tensors_from_flat(&model, &trained.final_weights).unwrap();

    // convert: the experiment directory resolves to its newest checkpoint.
    let hf = tempfile::tempdir().unwrap();
    let out = hf.path().join("llama");
    let args: Vec<String> = vec![
        format!("input.path={}", exp.path().display()),
        format!("output.path={}", out.display()),
        "output.format=llama".into(),
    ];
    let parsed = ConvertArgs::parse(&args).unwrap();
    assert_eq!(parsed.input_format, "distributed");
    convert(&parsed).unwrap();
    let (b, w) = import_llama(&out).unwrap();
    assert_eq!(b, cfg.model.base_model);
    assert_bitwise(&expected, &w);
    let hf_cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(hf_cfg["max_position_embeddings"], 16);

    // generate reads the same weights from the checkpoint as from the export.
    let from_ckpt = fast_llm_rs::generate::load_weights(exp.path(), None).unwrap();
    assert_eq!(from_ckpt.format, "distributed");
    assert_bitwise(&expected, &from_ckpt.tensors);

    // pretrained: {format: distributed} starts a fresh run (another experiment) from them.
    let exp2 = tempfile::tempdir().unwrap();
    let o2 = ov(&[
        ("training.train_iters", "0".into()),
        ("pretrained.path", exp.path().display().to_string()),
        ("pretrained.format", "distributed".into()),
    ]);
    let cfg2 = tiny_config(data.path(), exp2.path(), &o2);
    let s = fast_llm_rs::train::train(&cfg2, &quiet).unwrap();
    assert!(s.final_weights == trained.final_weights);
}

/// `base()` with tied embeddings.
fn tied_base() -> BaseModelConfig {
    BaseModelConfig {
        tied_embedding_weight: true,
        ..base()
    }
}

/// Untied tensors equal to tied ones: `lm_head.weight` is a copy of the embedding table.
fn untie(tied: &[NamedTensor]) -> Vec<NamedTensor> {
    let mut out = tied.to_vec();
    let table = tied.iter().find(|t| t.0 == "model.embed_tokens.weight").unwrap();
    out.push(("lm_head.weight".into(), table.1.clone(), table.2.clone()));
    out
}

/// Tied embeddings through HuggingFace export/import, generation and pretrained training: the tied model
/// is held to the untied one whose `lm_head.weight` is a copy of the table.
#[test]
fn tied_embeddings_round_trip_generate_and_train_like_an_untied_copy() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let (b, w) = (tied_base(), weights(&tied_base(), 21));
    assert!(w.iter().all(|t| t.0 != "lm_head.weight"));
    export_llama(&out, &b, &w, HfDtype::F32).unwrap();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], true);
    let (b2, w2) = import_llama(&out).unwrap();
    assert_eq!(b2, b);
    assert_bitwise(&w, &w2);
    // A stored lm_head.weight (some exports keep the copy) is ignored, as transformers ignores it.
    let mut with_head = w.clone();
    let table = &w[0];
    with_head.push(("lm_head.weight".into(), table.1.clone(), vec![7.0; table.2.len()]));
    rewrite_f32(&out, &with_head);
    assert_bitwise(&w, &import_llama(&out).unwrap().1);
    // Untied, the same file's lm_head.weight is a parameter.
    let untied_w = untie(&w);
    assert_eq!(untied_w.len(), weights(&base(), 21).len());

    // Generation: the tied model's logits are the untied copy's, the cache agrees with the full forward.
    let tied = InferenceModel::new(&b, &w, 2).unwrap();
    let untied = InferenceModel::new(&base(), &untied_w, 2).unwrap();
    let tokens = test_tokens(9, b.embeddings.vocab_size as usize);
    let full = full_forward_logits(&tied, &tokens);
    assert!(max_diff(&full, &full_forward_logits(&untied, &tokens)) == 0.0);
    let mut cache = tied.new_cache(tokens.len());
    let cached = tied.forward(&mut cache, &tokens, true).unwrap();
    assert!(max_diff(&cached, &full) < 1e-4);
}

/// Training with tied embeddings from pretrained weights: the first step's loss is the untied copy's
/// (same forward), on every shard layout, and the runs then differ (the table gets both gradients).
#[test]
fn tied_training_starts_like_the_untied_copy_on_every_shard_layout() {
    let data = corpus_dir();
    let exp = tempfile::tempdir().unwrap();
    let quiet = fast_llm_rs::train::TrainOptions {
        quiet: true,
        ..Default::default()
    };
    // The same global batch (2 micro-batches) on every layout.
    let run = |tied: bool, world: usize, zero: u8, lps: &str| {
        let o = ov(&[
            ("training.train_iters", "2".into()),
            ("model.distributed.world_size", world.to_string()),
            ("model.multi_stage.zero_stage", zero.to_string()),
            ("model.multi_stage.layers_per_stage", lps.into()),
            ("schedule.depth_first_micro_batches", (2 / world).to_string()),
        ]);
        let mut cfg = tiny_config(data.path(), exp.path(), &o);
        let tied_cfg = BaseModelConfig {
            tied_embedding_weight: true,
            ..cfg.model.base_model.clone()
        };
        let w = weights(&tied_cfg, 23);
        let hf = exp.path().join(if tied { "tied" } else { "untied" });
        if tied {
            export_llama(&hf, &tied_cfg, &w, HfDtype::F32).unwrap();
            cfg.model.base_model = tied_cfg;
        } else {
            export_llama(&hf, &cfg.model.base_model, &untie(&w), HfDtype::F32).unwrap();
        }
        cfg.pretrained = Some(PretrainedConfig {
            path: hf,
            format: "llama".into(),
        });
        let table = w[0].2.len();
        (fast_llm_rs::train::train(&cfg, &quiet).unwrap(), table)
    };
    let (reference, table) = run(false, 1, 1, "1");
    for (world, zero, lps) in [(1, 1, "1"), (2, 3, "0.5"), (2, 2, "2")] {
        let (tied, _) = run(true, world, zero, lps);
        assert!(
            (tied.losses[0] - reference.losses[0]).abs() < 1e-6,
            "world {world} zero {zero}: {} vs {}",
            tied.losses[0],
            reference.losses[0]
        );
        assert!(
            (tied.losses[1] - reference.losses[1]).abs() > 1e-5,
            "second step equal: {:?}",
            tied.losses
        );
        // One parameter fewer (no lm_head) and the table updated by both uses.
        assert_eq!(tied.final_weights.len() + table, reference.final_weights.len());
    }
}

/// Sliding-window attention: exported as a HuggingFace Mistral (`sliding_window`) and imported back
/// (a missing key is transformers' default 4096, null is none, 0 is refused); the KV-cache decode
/// keeps to the window past its length, as the training forward does.
#[test]
fn sliding_window_models_round_trip_as_mistral_and_decode_within_the_window() {
    let window = 4;
    let mut b = base();
    b.decoder.block.mixer.window_size = Some(window as u64);
    let w = weights(&b, 23);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    export_llama(&out, &b, &w, HfDtype::F32).unwrap();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "mistral");
    assert_eq!(cfg["architectures"], json!(["MistralForCausalLM"]));
    assert_eq!(cfg["sliding_window"], window);
    let (b2, w2) = import_llama(&out).unwrap();
    assert_eq!(b2, b);
    assert_bitwise(&w, &w2);
    let with_window = |value: Option<Value>| {
        let mut c = cfg.clone();
        match value {
            None => {
                c.as_object_mut().unwrap().remove("sliding_window");
            }
            Some(v) => c["sliding_window"] = v,
        }
        std::fs::write(out.join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
        import_llama(&out)
    };
    let imported = |value| with_window(value).unwrap().0.decoder.block.mixer.window_size;
    assert_eq!(imported(None), Some(4096));
    assert_eq!(imported(Some(Value::Null)), None);
    assert_mentions(&err_text(with_window(Some(json!(0)))), &["sliding_window", ">= 1"]);

    // The window's model agrees with full attention while the window covers every earlier key (bit
    // for bit: the same products), and differs after.
    let m = InferenceModel::new(&b, &w, 2).unwrap();
    let v = m.model.shape.vocab;
    let tokens = test_tokens(13, v);
    let full = full_forward_logits(&m, &tokens);
    let unwindowed = full_forward_logits(&InferenceModel::new(&base(), &w, 2).unwrap(), &tokens);
    assert!(max_diff(&full[..window * v], &unwindowed[..window * v]) == 0.0);
    for i in window + 1..tokens.len() {
        let d = max_diff(&full[i * v..(i + 1) * v], &unwindowed[i * v..(i + 1) * v]);
        assert!(d > 1e-4, "position {i}: the window changed nothing ({d:e})");
    }
    // Decoding token by token, and after a prefill, gives the training forward's logits.
    cached_decode_matches(&m, &tokens, &full, 7);
}

/// llama3 and yarn rotary scaling: exported as transformers' `rope_scaling` with every parameter,
/// imported back to the same architecture, also from transformers 5's `rope_parameters` form; yarn's
/// transformers defaults are made explicit; unsupported scalings are refused; the KV-cache decode uses
/// the scaled tables like the training forward, and the scaling changes the logits.
#[test]
fn scaled_rotary_round_trips_in_both_transformers_forms_and_decodes() {
    let mut llama3 = base();
    let r = &mut llama3.decoder.block.mixer.rotary;
    r.kind = "llama3".into();
    r.scale_factor = Some(4.0);
    r.low_frequency_factor = Some(1.0);
    r.high_frequency_factor = Some(2.0);
    r.original_context_length = Some(8);
    let mut yarn = base();
    let r = &mut yarn.decoder.block.mixer.rotary;
    r.kind = "yarn".into();
    r.scale_factor = Some(4.0);
    r.original_context_length = Some(16);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let read_cfg =
        || -> Value { serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap() };
    let write_cfg = |c: &Value| std::fs::write(out.join("config.json"), serde_json::to_string(c).unwrap()).unwrap();
    let w = weights(&base(), 29);
    for (b, scaling) in [
        (
            &llama3,
            json!({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                   "original_max_position_embeddings": 8}),
        ),
        (
            &yarn,
            json!({"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.1 * 4f64.ln() + 1.0,
                   "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 16}),
        ),
    ] {
        export_llama(&out, b, &w, HfDtype::F32).unwrap();
        let cfg = read_cfg();
        assert_eq!(cfg["rope_scaling"], scaling);
        assert_eq!(cfg["rope_theta"], 5000.0);
        let (b2, w2) = import_llama(&out).unwrap();
        assert_eq!(b.architecture_differences(&b2), vec![]);
        assert_bitwise(&w, &w2);
        // transformers 5 writes one `rope_parameters` object holding the theta.
        let mut v5 = cfg.clone();
        let obj = v5.as_object_mut().unwrap();
        obj.remove("rope_theta");
        obj.remove("rope_scaling");
        let mut params = scaling.clone();
        params["rope_theta"] = json!(5000.0);
        obj.insert("rope_parameters".into(), params);
        write_cfg(&v5);
        assert_eq!(b.architecture_differences(&import_llama(&out).unwrap().0), vec![]);
    }
    // transformers 5's default rotary: the theta lives in rope_parameters (10000 would be wrong here).
    let mut v5 = read_cfg();
    v5.as_object_mut().unwrap().remove("rope_theta");
    v5["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 5000.0});
    write_cfg(&v5);
    assert_eq!(base().architecture_differences(&import_llama(&out).unwrap().0), vec![]);
    // yarn with transformers' defaults: original context = max_position_embeddings, attention factor
    // 0.1 ln(factor) + 1, beta 32 / 1.
    let mut c = read_cfg();
    c.as_object_mut().unwrap().remove("rope_parameters");
    c["rope_theta"] = json!(5000.0);
    c["max_position_embeddings"] = json!(16);
    c["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
    write_cfg(&c);
    assert_eq!(yarn.architecture_differences(&import_llama(&out).unwrap().0), vec![]);
    // mscale / mscale_all_dim (DeepSeek's form) set the attention factor as their ratio.
    c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0, "mscale": 2.0, "mscale_all_dim": 1.0});
    write_cfg(&c);
    let a = import_llama(&out)
        .unwrap()
        .0
        .decoder
        .block
        .mixer
        .rotary
        .attention_factor
        .unwrap();
    assert!(
        (a - (0.2 * 4f64.ln() + 1.0) / (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15,
        "{a}"
    );
    for (scaling, words) in [
        (
            json!({"rope_type": "dynamic", "factor": 2.0}),
            vec!["rope_type = 'dynamic'", "accepted"],
        ),
        (
            json!({"rope_type": "llama3", "factor": 8.0}),
            vec!["rope_scaling.low_freq_factor is missing"],
        ),
        (
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192}),
            vec!["high_frequency_factor", "must be > low_frequency_factor"],
        ),
        (
            json!({"rope_type": "yarn", "factor": 4.0, "truncate": false}),
            vec!["truncate = false"],
        ),
        (
            json!({"rope_type": "default", "partial_rotary_factor": 0.5}),
            vec!["partial_rotary_factor = 0.5"],
        ),
    ] {
        c["rope_scaling"] = scaling;
        write_cfg(&c);
        assert_mentions(&err_text(import_llama(&out)), &[&words[..], &["config.json"]].concat());
    }

    // Decoding with the KV cache uses the scaled tables like the training forward; the scaling is
    // seen past the first position.
    let unscaled = full_forward_logits(&InferenceModel::new(&base(), &w, 2).unwrap(), &test_tokens(12, 37));
    for b in [&llama3, &yarn] {
        let m = InferenceModel::new(b, &w, 2).unwrap();
        let tokens = test_tokens(12, m.model.shape.vocab);
        let full = full_forward_logits(&m, &tokens);
        assert!(max_diff(&full, &unscaled) > 1e-3, "{:?}", m.model.shape.rotary);
        cached_decode_matches(&m, &tokens, &full, 5);
    }
}

/// q/k/v biases export as a Qwen2 (its config keys, the bias tensors) and import back bitwise; a
/// window on every layer is Qwen2's `use_sliding_window` with `max_window_layers` 0 (and transformers
/// 5's `layer_types`); a window on some layers only is refused; the biases are in the decode.
#[test]
fn qkv_biases_round_trip_as_qwen2_and_decode() {
    let mut b = base();
    b.hidden_size = 24; // 4 heads of 6: Qwen2 has no head_dim key.
    b.decoder.block.mixer.add_linear_biases = Some(true);
    b.decoder.block.mixer.dense_layer.bias.enabled = Some(false);
    let w = weights(&b, 31);
    assert!(w
        .iter()
        .any(|t| t.0 == "model.layers.1.self_attn.v_proj.bias" && t.1 == vec![12]));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    export_llama(&out, &b, &w, HfDtype::F32).unwrap();
    let read_cfg =
        || -> Value { serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap() };
    let write_cfg = |c: &Value| std::fs::write(out.join("config.json"), serde_json::to_string(c).unwrap()).unwrap();
    let cfg = read_cfg();
    assert_eq!(cfg["architectures"], json!(["Qwen2ForCausalLM"]));
    assert_eq!(cfg["model_type"], "qwen2");
    assert_eq!(cfg["use_sliding_window"], false);
    assert_eq!(cfg["layer_types"], json!(["full_attention", "full_attention"]));
    assert!(cfg.get("head_dim").is_none() && cfg.get("attention_bias").is_none());
    let (b2, w2) = import_llama(&out).unwrap();
    assert_eq!(b.architecture_differences(&b2), vec![]);
    assert!(b2.decoder.block.mixer.qkv_bias());
    assert_bitwise(&w, &w2);

    // Windows: every layer (either form), none (max_window_layers past the last layer), some (refused).
    let window_of = |edit: &dyn Fn(&mut Value)| {
        let mut c = cfg.clone();
        edit(&mut c);
        write_cfg(&c);
        import_llama(&out).map(|(b, _)| b.decoder.block.mixer.window_size)
    };
    let v4 = |use_sw: bool, max_layers: u64| {
        move |c: &mut Value| {
            c.as_object_mut().unwrap().remove("layer_types");
            c["use_sliding_window"] = json!(use_sw);
            c["sliding_window"] = json!(5);
            c["max_window_layers"] = json!(max_layers);
        }
    };
    assert_eq!(window_of(&v4(true, 0)).unwrap(), Some(5));
    assert_eq!(window_of(&v4(true, 2)).unwrap(), None);
    assert_eq!(window_of(&v4(false, 0)).unwrap(), None);
    assert_mentions(&err_text(window_of(&v4(true, 1))), &["1 of 2 layers", "not supported"]);
    let v5 = |types: Value| {
        move |c: &mut Value| {
            c["layer_types"] = types.clone();
            c["sliding_window"] = json!(7);
        }
    };
    assert_eq!(
        window_of(&v5(json!(["sliding_attention", "sliding_attention"]))).unwrap(),
        Some(7)
    );
    assert_mentions(
        &err_text(window_of(&v5(json!(["full_attention", "sliding_attention"])))),
        &["1 of 2 layers"],
    );
    let mut bw = b.clone();
    bw.decoder.block.mixer.window_size = Some(5);
    export_llama(&out, &bw, &w, HfDtype::F32).unwrap();
    let cfg_w = read_cfg();
    assert_eq!(
        (
            &cfg_w["use_sliding_window"],
            &cfg_w["sliding_window"],
            &cfg_w["max_window_layers"]
        ),
        (&json!(true), &json!(5), &json!(0))
    );
    assert_eq!(bw.architecture_differences(&import_llama(&out).unwrap().0), vec![]);

    // Without head_dim in the config, heads x head_size must be the hidden size.
    let mut odd = b.clone();
    odd.hidden_size = 16;
    assert_mentions(
        &err_text(export_llama(
            &dir.path().join("odd"),
            &odd,
            &weights(&odd, 1),
            HfDtype::F32,
        )),
        &["Qwen2", "head_dim", "hidden_size (16)"],
    );

    // The decode adds the biases like the training forward; they change the logits.
    let m = InferenceModel::new(&b, &w, 2).unwrap();
    let tokens = test_tokens(10, m.model.shape.vocab);
    let full = full_forward_logits(&m, &tokens);
    cached_decode_matches(&m, &tokens, &full, 4);
    let zeroed = edited(&w, |n| n.ends_with("_proj.bias"), |_, _| 0.0);
    let without = full_forward_logits(&InferenceModel::new(&b, &zeroed, 2).unwrap(), &tokens);
    assert!(max_diff(&full, &without) > 1e-3);
}

/// Query/key norms export as a Qwen3 (its class, `head_dim` kept, the `q_norm`/`k_norm` tensors) and
/// import back bitwise, windows included; what a Qwen3 config cannot say is refused; the decode applies
/// the norms like the training forward, and they change the logits.
#[test]
fn qk_norms_round_trip_as_qwen3_and_decode() {
    let mut b = base();
    let eps = b.decoder.block.normalization.epsilon;
    let norm = fast_llm_rs::config::NormalizationConfig {
        epsilon: eps,
        ..Default::default()
    };
    b.decoder.block.mixer.query_norm = Some(norm.clone());
    b.decoder.block.mixer.key_norm = Some(norm);
    let hs = b.decoder.block.mixer.head_size as usize;
    // Norm weights away from their initial ones, so a swapped q/k pair would show.
    let w = edited(
        &weights(&b, 37),
        |n| n.ends_with("_norm.weight") && n.contains("self_attn"),
        |i, x| x + 0.1 * i as f32 - 0.2,
    );
    assert!(w
        .iter()
        .any(|t| t.0 == "model.layers.1.self_attn.k_norm.weight" && t.1 == vec![hs]));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    export_llama(&out, &b, &w, HfDtype::F32).unwrap();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], json!(["Qwen3ForCausalLM"]));
    assert_eq!(cfg["model_type"], "qwen3");
    assert_eq!(cfg["head_dim"], json!(hs));
    assert_eq!(cfg["attention_bias"], false);
    assert_eq!(cfg["use_sliding_window"], false);
    let (b2, w2) = import_llama(&out).unwrap();
    assert_eq!(b.architecture_differences(&b2), vec![]);
    assert_eq!(b2.decoder.block.mixer.key_norm.as_ref().map(|n| n.epsilon), Some(eps));
    assert_bitwise(&w, &w2);
    // A Llama's config does not bring the norms; comparing names the field.
    let diffs = b.architecture_differences(&base());
    assert!(
        diffs
            .iter()
            .any(|d| d.0 == "model.base_model.decoder.block.mixer.query_norm.epsilon"),
        "{diffs:?}"
    );

    let mut bw = b.clone();
    bw.decoder.block.mixer.window_size = Some(5);
    export_llama(&out, &bw, &w, HfDtype::F32).unwrap();
    let (bw2, _) = import_llama(&out).unwrap();
    assert_eq!(bw.architecture_differences(&bw2), vec![]);
    assert_eq!(bw2.decoder.block.mixer.window_size, Some(5));

    // Refused: an epsilon of their own (Qwen3 has one rms_norm_eps), q/k/v biases (Qwen3's
    // attention_bias also biases the output projection), attention_bias on import.
    let mut other_eps = b.clone();
    for n in [
        &mut other_eps.decoder.block.mixer.query_norm,
        &mut other_eps.decoder.block.mixer.key_norm,
    ] {
        n.as_mut().unwrap().epsilon = 1e-3;
    }
    let odd = dir.path().join("odd");
    assert_mentions(
        &err_text(export_llama(&odd, &other_eps, &w, HfDtype::F32)),
        &["query_norm.epsilon", "rms_norm_eps"],
    );
    let mut biased = b.clone();
    biased.decoder.block.mixer.add_linear_biases = Some(true);
    biased.decoder.block.mixer.dense_layer.bias.enabled = Some(false);
    assert_mentions(
        &err_text(export_llama(&odd, &biased, &weights(&biased, 2), HfDtype::F32)),
        &["Qwen3", "attention_bias"],
    );
    let mut c = cfg.clone();
    c["attention_bias"] = json!(true);
    std::fs::write(out.join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
    assert_mentions(&err_text(import_llama(&out)), &["attention_bias = true"]);

    // The decode normalizes q and k like the training forward; the norm weights change the logits.
    let m = InferenceModel::new(&b, &w, 2).unwrap();
    let tokens = test_tokens(10, m.model.shape.vocab);
    let full = full_forward_logits(&m, &tokens);
    cached_decode_matches(&m, &tokens, &full, 4);
    let reset = edited(&w, |n| n.ends_with("self_attn.q_norm.weight"), |_, _| 1.0);
    let plain = full_forward_logits(&InferenceModel::new(&b, &reset, 2).unwrap(), &tokens);
    assert!(max_diff(&full, &plain) > 1e-3);
}

/// `training.export` writes HuggingFace directories during training (2 ranks, ZeRO-3): at the interval's
/// steps and after the last; the last holds exactly the trained weights, an earlier one the weights of
/// that step (a shorter run's final weights, bit for bit); a model that cannot be exported is refused
/// before training.
#[test]
fn training_exports_huggingface_directories_at_its_interval() {
    let data = corpus_dir();
    let run = |iters: u64, export: bool| {
        let exp = tempfile::tempdir().unwrap();
        let mut o = ov(&[
            ("model.distributed.world_size", "2".into()),
            ("model.multi_stage.zero_stage", "3".into()),
            ("training.train_iters", iters.to_string()),
        ]);
        if export {
            o.push("training.export.interval=2".into());
        }
        let cfg = tiny_config(data.path(), exp.path(), &o);
        let s = fast_llm_rs::train::train(
            &cfg,
            &fast_llm_rs::train::TrainOptions {
                quiet: true,
                ..Default::default()
            },
        )
        .unwrap();
        (exp, cfg, s)
    };
    let (exp, cfg, full) = run(5, true);
    let root = exp.path().join("export").join("llama");
    let mut steps: Vec<u64> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    steps.sort();
    assert_eq!(steps, vec![2, 4, 5]);
    let flat = |dir: &Path| -> Vec<f32> {
        let (b, tensors) = import_llama(dir).unwrap();
        assert_eq!(b.architecture_differences(&cfg.model.base_model), vec![]);
        tensors.into_iter().flat_map(|t| t.2).collect()
    };
    assert!(
        flat(&root.join("5")) == full.final_weights,
        "the last export is the trained weights"
    );
    let (_, _, two) = run(2, false);
    assert!(
        flat(&root.join("2")) == two.final_weights,
        "step 2's export is step 2's weights"
    );
    assert!(flat(&root.join("4")) != full.final_weights);

    // Refused at load, naming the field: a model a HuggingFace config cannot express.
    let err = fast_llm_rs::config::load_config_str(
        &fast_llm_rs::config::to_yaml(&cfg),
        &[
            "training.export.interval=10".into(),
            "model.base_model.head.normalization.epsilon=1e-3".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert_mentions(&err, &["training.export.interval = 10", "rms_norm_eps"]);
}
