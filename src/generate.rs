//! Text generation: one sequence, f32, with a key/value cache.
//!
//! The prompt runs through the model once (prefill), filling the cache; then each new token is one
//! position through every layer, attending over the cached keys and values. Matmuls, RMSNorm,
//! rotary (with position-offset tables) and SwiGLU are the backend kernels the training forward uses;
//! attention over the cache is a small dedicated loop (the training kernel computes full causal
//! blocks).

use crate::backend::cpu::CpuKernels;
use crate::backend::Kernels;
use crate::config::BaseModelConfig;
use crate::data::Tokenizer;
use crate::hf::{self, NamedTensor};
use crate::model::{LayerKind, Llama, ModelShape, Rope};
use anyhow::{bail, Context};
use rayon::prelude::*;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A model ready for inference: its layers and one flat copy of its weights in model order.
pub struct InferenceModel {
    /// The model.
    pub model: Llama,
    weights: Vec<f32>,
    ranges: Vec<Range<usize>>,
    kernels: CpuKernels,
}

/// Keys and values of the positions seen so far, per block: `(capacity, kv_heads * head_size)`.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    rope: Rope<f32>,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Largest number of positions the cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forget every position (keeps the memory).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl InferenceModel {
    /// Build from an architecture and its tensors in model order (checked). `threads`: kernel threads.
    pub fn new(base_model: &BaseModelConfig, tensors: &[NamedTensor], threads: usize) -> anyhow::Result<Self> {
        let model = Llama::new(ModelShape::from_config(base_model)?);
        let weights = hf::flat_from_tensors(&model, tensors)?;
        Ok(Self::from_flat(model, weights, threads))
    }

    /// Build from a model and its flat model-order weights (length checked by the caller).
    pub fn from_flat(model: Llama, weights: Vec<f32>, threads: usize) -> Self {
        assert_eq!(weights.len(), model.num_params(), "flat weights length");
        let mut ranges = Vec::with_capacity(model.layers.len());
        let mut off = 0;
        for &l in &model.layers {
            let n = model.layer_numel(l);
            ranges.push(off..off + n);
            off += n;
        }
        Self {
            model,
            weights,
            ranges,
            kernels: CpuKernels::new(threads.max(1)),
        }
    }

    /// The weights of layer `l` (index into `model.layers`).
    pub fn layer_weights(&self, l: usize) -> &[f32] {
        &self.weights[self.ranges[l].clone()]
    }

    /// The flat model-order weights.
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// The kernels.
    pub fn kernels(&self) -> &CpuKernels {
        &self.kernels
    }

    /// An empty cache for up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let s = &self.model.shape;
        let kvw = s.kv_heads * s.head_size;
        KvCache {
            k: (0..s.num_blocks).map(|_| vec![0.0; capacity * kvw]).collect(),
            v: (0..s.num_blocks).map(|_| vec![0.0; capacity * kvw]).collect(),
            len: 0,
            capacity,
            rope: Rope::new(capacity.max(1), s.head_size, &s.rotary),
        }
    }

    /// Run `tokens` at positions `cache.len()..` through the model, appending their keys and values
    /// to the cache. Returns the logits of every new position `(n, vocab)` when `all_logits`, else
    /// those of the last one `(vocab)`.
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32], all_logits: bool) -> anyhow::Result<Vec<f32>> {
        let s = &self.model.shape;
        let k: &dyn Kernels<f32> = &self.kernels;
        let (c, n, start) = (s.hidden, tokens.len(), cache.len);
        if n == 0 {
            bail!("no tokens to run");
        }
        if start + n > cache.capacity {
            bail!(
                "the KV cache holds {} positions; {} more do not fit after {start}",
                cache.capacity,
                n
            );
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= s.vocab) {
            bail!("token id {t} is outside the model's vocabulary ({})", s.vocab);
        }
        let (qw, aw, kvw) = (s.qkv_width(), s.attn_width(), s.kv_heads * s.head_size);
        let half = s.head_size / 2;
        let mut x = vec![0f32; n * c];
        let mut normed = vec![0f32; n * c];
        let mut rstd = vec![0f32; n];
        let mut proj = vec![0f32; n * qw.max(2 * s.inter)];
        let mut inner = vec![0f32; n * aw.max(s.inter)];
        // Query/key norms' saved values (the forward writes them; decoding has no backward to read them).
        let qk_heads = if s.qk_norm.is_some() {
            n * (s.heads + s.kv_heads)
        } else {
            0
        };
        let (mut qk_hat, mut qk_rstd) = (vec![0f32; qk_heads * s.head_size], vec![0f32; qk_heads]);
        let mut logits = Vec::new();
        for (l, &layer) in self.model.layers.iter().enumerate() {
            let w = self.layer_weights(l);
            match layer {
                LayerKind::Embedding => k.embedding_forward(&mut x, tokens, w, c),
                LayerKind::Attention(b) => {
                    let crate::model::AttentionWeights {
                        norm: norm_w,
                        qkv: qkv_w,
                        o: o_w,
                        qkv_bias: qkv_b,
                        qk_norm: qk_w,
                    } = self.model.attention_weights(w);
                    k.rms_norm_forward(&mut normed, &mut rstd, &x, norm_w, c, s.norm_eps as f32);
                    let qkv = &mut proj[..n * qw];
                    k.matmul(qkv, &normed, qkv_w, n, qw, c, false, true, false);
                    if let Some(bias) = qkv_b {
                        for row in qkv.chunks_exact_mut(qw) {
                            row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                        }
                    }
                    if let (Some(qk_w), Some(eps)) = (qk_w, s.qk_norm) {
                        let heads = s.heads + s.kv_heads;
                        let (hat, r) = (&mut qk_hat[..], &mut qk_rstd[..]);
                        k.head_norm_forward(qkv, hat, r, qk_w, qw, heads, s.heads, s.head_size, eps as f32);
                    }
                    // Row i is at position start + i: offset the tables, one "sequence" of n rows.
                    let tab = start * half..(start + n) * half;
                    k.rotary(
                        qkv,
                        qw,
                        s.heads + s.kv_heads,
                        s.head_size,
                        n,
                        &cache.rope.cos[tab.clone()],
                        &cache.rope.sin[tab],
                        false,
                    );
                    let (kc, vc) = (&mut cache.k[b], &mut cache.v[b]);
                    for (i, row) in qkv.chunks_exact(qw).enumerate() {
                        let p = start + i;
                        let q_end = s.heads * s.head_size;
                        kc[p * kvw..(p + 1) * kvw].copy_from_slice(&row[q_end..q_end + kvw]);
                        vc[p * kvw..(p + 1) * kvw].copy_from_slice(&row[q_end + kvw..q_end + 2 * kvw]);
                    }
                    let out = &mut inner[..n * aw];
                    cached_attention(out, qkv, kc, vc, start, s);
                    k.matmul(&mut x, out, o_w, n, c, aw, false, true, true);
                }
                LayerKind::Mlp(_) => {
                    let (norm_w, rest) = w.split_at(c);
                    let (gu_w, down_w) = rest.split_at(2 * s.inter * c);
                    k.rms_norm_forward(&mut normed, &mut rstd, &x, norm_w, c, s.norm_eps as f32);
                    let gu = &mut proj[..n * 2 * s.inter];
                    k.matmul(gu, &normed, gu_w, n, 2 * s.inter, c, false, true, false);
                    let act = &mut inner[..n * s.inter];
                    k.swiglu_forward(act, gu, s.inter);
                    k.matmul(&mut x, act, down_w, n, c, s.inter, false, true, true);
                }
                LayerKind::Head => {
                    // Tied: the output projection is the embedding table (layer 0's range).
                    let (norm_w, out_w) = self.model.head_weights(w, &self.weights[self.ranges[0].clone()]);
                    let rows = if all_logits { 0..n } else { n - 1..n };
                    let m = rows.len();
                    let xin = &x[rows.start * c..rows.end * c];
                    k.rms_norm_forward(
                        &mut normed[..m * c],
                        &mut rstd[..m],
                        xin,
                        norm_w,
                        c,
                        s.head_norm_eps as f32,
                    );
                    logits = vec![0f32; m * s.vocab];
                    k.matmul(&mut logits, &normed[..m * c], out_w, m, s.vocab, c, false, true, false);
                }
            }
        }
        cache.len += n;
        Ok(logits)
    }

    /// Generate up to `opts.max_new_tokens` tokens after `prompt`. `on_token` is called with each new
    /// token as soon as it is chosen (streaming). Stops early at `opts.stop_token`, which is included.
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32),
    ) -> anyhow::Result<Vec<u32>> {
        if prompt.is_empty() {
            bail!("the prompt is empty: generation needs at least one token");
        }
        let mut cache = self.new_cache(prompt.len() + opts.max_new_tokens);
        let mut sampler = Sampler::new(opts.sampling);
        let mut out = Vec::with_capacity(opts.max_new_tokens);
        if opts.max_new_tokens == 0 {
            return Ok(out);
        }
        let mut logits = self.forward(&mut cache, prompt, false)?;
        loop {
            let t = sampler.sample(&logits);
            out.push(t);
            on_token(t);
            if out.len() == opts.max_new_tokens || Some(t) == opts.stop_token {
                break;
            }
            logits = self.forward(&mut cache, &[t], false)?;
        }
        Ok(out)
    }
}

/// Causal attention of the new rows (`qkv (n, qkv_width)`, positions `start..start+n`) over the
/// cached keys/values `(start+n, kv_heads*head_size)`, within the sliding window if the model has one
/// (position `p` attends `p - w < j <= p`). Writes `out (n, heads*head_size)`.
fn cached_attention(out: &mut [f32], qkv: &[f32], kc: &[f32], vc: &[f32], start: usize, s: &ModelShape) {
    let (hs, qw, kvw) = (s.head_size, s.qkv_width(), s.kv_heads * s.head_size);
    let group = s.heads / s.kv_heads;
    let scale = (1.0 / (hs as f64).sqrt()) as f32;
    let row = |(i, o): (usize, &mut [f32])| {
        let p = start + i;
        let first = crate::backend::first_attended_key(p, s.window);
        let mut scores = vec![0f32; p + 1 - first];
        for h in 0..s.heads {
            let g = h / group;
            let q = &qkv[i * qw + h * hs..i * qw + (h + 1) * hs];
            let mut mx = f32::NEG_INFINITY;
            for (j, sc) in (first..).zip(scores.iter_mut()) {
                let kj = &kc[j * kvw + g * hs..j * kvw + (g + 1) * hs];
                *sc = q.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                mx = mx.max(*sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - mx).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            let oh = &mut o[h * hs..(h + 1) * hs];
            oh.fill(0.0);
            for (j, &pj) in (first..).zip(&scores) {
                let vj = &vc[j * kvw + g * hs..j * kvw + (g + 1) * hs];
                let pj = pj * inv;
                for (a, &b) in oh.iter_mut().zip(vj) {
                    *a += pj * b;
                }
            }
        }
    };
    let aw = s.attn_width();
    if out.len() / aw > 1 {
        out.par_chunks_exact_mut(aw).enumerate().for_each(row);
    } else {
        out.chunks_exact_mut(aw).enumerate().for_each(row);
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id among ties).
    Greedy,
    /// Sample from `softmax(logits / temperature)` restricted to the `top_k` most likely tokens
    /// (`0` = all), then to the fewest of those whose probabilities (renormalized over them) sum to at
    /// least `top_p` (nucleus sampling; HuggingFace's order: temperature, top-k, top-p), with a seeded
    /// generator.
    TopK {
        /// > 0.
        temperature: f32,
        /// Candidates kept; 0 keeps the whole vocabulary.
        top_k: usize,
        /// Probability mass kept, in (0, 1]; 1 keeps every candidate.
        top_p: f32,
        /// PRNG seed.
        seed: u64,
    },
}

/// Options of [`InferenceModel::generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens generated.
    pub max_new_tokens: usize,
    /// Greedy or sampled.
    pub sampling: Sampling,
    /// Stop after this token (e.g. the tokenizer's end of sequence).
    pub stop_token: Option<u32>,
}

/// Chooses tokens from logits; deterministic for a given seed.
pub struct Sampler {
    sampling: Sampling,
    state: u64,
}

impl Sampler {
    /// A sampler (seeded from `sampling`).
    pub fn new(sampling: Sampling) -> Self {
        let state = match sampling {
            Sampling::TopK { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Self { sampling, state }
    }

    /// splitmix64: the next 64 random bits.
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        crate::model::init::mix64(self.state)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token for `logits (vocab)`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::TopK {
                temperature,
                top_k,
                top_p,
                ..
            } => {
                let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
                // Descending by logit, ties by id: a total order, so the result is deterministic.
                idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
                if top_k > 0 && top_k < idx.len() {
                    idx.truncate(top_k);
                }
                let mx = logits[idx[0] as usize] as f64;
                let t = temperature as f64;
                let mut weights: Vec<f64> = idx
                    .iter()
                    .map(|&i| ((logits[i as usize] as f64 - mx) / t).exp())
                    .collect();
                let mut total: f64 = weights.iter().sum();
                if top_p < 1.0 {
                    // The shortest prefix (most likely first) holding top_p of the mass; at least one.
                    let (mut kept, mut mass) = (0, 0.0);
                    while kept < weights.len() && (kept == 0 || mass < top_p as f64 * total) {
                        mass += weights[kept];
                        kept += 1;
                    }
                    weights.truncate(kept);
                    idx.truncate(kept);
                    total = mass;
                }
                let mut u = self.next_f64() * total;
                for (&i, &w) in idx.iter().zip(&weights) {
                    if u < w {
                        return i;
                    }
                    u -= w;
                }
                *idx.last().expect("non-empty vocabulary")
            }
        }
    }
}

/// Index of the largest logit (first among ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Weights and what came with them, from a HuggingFace directory or one of our checkpoints.
pub struct LoadedWeights {
    /// Architecture.
    pub base_model: BaseModelConfig,
    /// Every parameter in model order.
    pub tensors: Vec<NamedTensor>,
    /// A `tokenizer.json` found beside the weights (HuggingFace directories).
    pub tokenizer: Option<PathBuf>,
    /// `llama` or `distributed`: what was read.
    pub format: String,
}

/// Load weights for inference. `format`: `llama` (HuggingFace directory), `distributed` (a checkpoint
/// of ours, or an experiment directory: its newest checkpoint), or `None` to detect (a directory with
/// a `config.json` is HuggingFace).
pub fn load_weights(dir: &Path, format: Option<&str>) -> anyhow::Result<LoadedWeights> {
    if !dir.is_dir() {
        bail!("checkpoint directory {} does not exist", dir.display());
    }
    let format = match format {
        Some(f) => f.to_string(),
        None if dir.join("config.json").exists() => "llama".into(),
        None => "distributed".into(),
    };
    match format.as_str() {
        "llama" => {
            let (base_model, tensors) = hf::import_llama(dir)?;
            let tok = dir.join("tokenizer.json");
            Ok(LoadedWeights {
                base_model,
                tensors,
                tokenizer: tok.exists().then_some(tok),
                format,
            })
        }
        "distributed" => {
            let (cfg, tensors) = hf::load_distributed(dir)?;
            Ok(LoadedWeights {
                base_model: cfg.model.base_model,
                tensors,
                tokenizer: None,
                format,
            })
        }
        other => bail!("unknown checkpoint format '{other}': accepted llama (HuggingFace), distributed (fast-llm-rs)"),
    }
}

/// Options of the `generate` command.
#[derive(Debug, Clone)]
pub struct GenerateCommand {
    /// Checkpoint or HuggingFace directory.
    pub checkpoint: PathBuf,
    /// `llama`, `distributed` or detect.
    pub format: Option<String>,
    /// Prompt text.
    pub prompt: String,
    /// Tokens to generate.
    pub max_new_tokens: usize,
    /// Sampling.
    pub sampling: Sampling,
    /// `tokenizer.json` (default: the checkpoint's, else byte-level).
    pub tokenizer: Option<PathBuf>,
    /// Write the prefill logits `(prompt_len, vocab)` as raw little-endian f32 here (debugging and the
    /// transformers comparison); `FILE.json` gets the shape and token ids.
    pub dump_logits: Option<PathBuf>,
    /// Print the generated token ids (one line, after the text) for comparisons.
    pub print_ids: bool,
}

/// The `generate` command: load, prefill, decode, stream the continuation to stdout.
pub fn run_generate(cmd: &GenerateCommand) -> anyhow::Result<Vec<u32>> {
    use std::io::Write;
    let w = load_weights(&cmd.checkpoint, cmd.format.as_deref())?;
    let tok_path = cmd.tokenizer.clone().or(w.tokenizer.clone());
    let tokenizer = match &tok_path {
        Some(p) => Tokenizer::from_file(p)?,
        None => Tokenizer::byte_level(),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = InferenceModel::new(&w.base_model, &w.tensors, threads)
        .with_context(|| format!("cannot build the model from {}", cmd.checkpoint.display()))?;
    drop(w);
    if tokenizer.vocab_size() > model.model.shape.vocab as u64 {
        eprintln!(
            "warning: the tokenizer has {} ids but the model's vocabulary is {}",
            tokenizer.vocab_size(),
            model.model.shape.vocab
        );
    }
    let prompt = tokenizer.try_encode(&cmd.prompt)?;
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens: give a non-empty --prompt");
    }
    if let Some(path) = &cmd.dump_logits {
        let mut cache = model.new_cache(prompt.len());
        let logits = model.forward(&mut cache, &prompt, true)?;
        let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        let meta = serde_json::json!({
            "shape": [prompt.len(), model.model.shape.vocab],
            "dtype": "float32-le",
            "tokens": prompt,
        });
        let meta_path = PathBuf::from(format!("{}.json", path.display()));
        std::fs::write(&meta_path, serde_json::to_string(&meta)?)
            .with_context(|| format!("cannot write {}", meta_path.display()))?;
    }
    let opts = GenerateOptions {
        max_new_tokens: cmd.max_new_tokens,
        sampling: cmd.sampling,
        stop_token: tokenizer.eos().map(|(_, id)| id),
    };
    let stdout = std::io::stdout();
    let mut printed = String::new();
    let mut ids = Vec::new();
    print!("{}", cmd.prompt);
    stdout.lock().flush()?;
    let out = model.generate(&prompt, &opts, |t| {
        ids.push(t);
        // Print the newly completed text; hold back an incomplete UTF-8 / multi-token character.
        let text = tokenizer.decode(&ids);
        if !text.ends_with(char::REPLACEMENT_CHARACTER) && text.starts_with(printed.as_str()) {
            let mut lock = stdout.lock();
            let _ = write!(lock, "{}", &text[printed.len()..]);
            let _ = lock.flush();
            printed = text;
        }
    })?;
    let text = tokenizer.decode(&out);
    if text.starts_with(printed.as_str()) {
        print!("{}", &text[printed.len()..]);
    }
    println!();
    if cmd.print_ids {
        println!("ids: {}", out.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
    }
    Ok(out)
}
