//! The Llama decoder as a list of layers, each with explicit forward and backward over parameter views.
//!
//! The model owns no weight or gradient memory: a layer's parameters are one contiguous range of its
//! stage's flat buffer, laid out in the order of [`Llama::layer_params`] (HuggingFace tensor names, so a
//! stage's `q_proj, k_proj, v_proj` rows are one fused `(q+2kv, hidden)` matrix and `gate_proj, up_proj`
//! one fused `(2*inter, hidden)` matrix). Activations live in a [`MicroBatchActs`] workspace allocated
//! once; nothing is allocated in the training step.
//!
//! Layer granularity: the embedding, then each block as two layers (attention half and MLP half, each
//! with its pre-normalization and residual), then the head (final norm, output projection, loss). This is
//! what lets `layers_per_stage: 0.5` put each half block in its own stage.

pub mod init;
pub mod rotary;

pub use rotary::Rotary;

use crate::backend::mem::{Buf, Memory};
use crate::backend::{Element, Kernels};
use crate::config::{BaseModelConfig, MlpRecomputeLevel};
use std::sync::Arc;

/// The shape of a Llama model, checked and in `usize`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// Residual width `c`.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Number of transformer blocks.
    pub num_blocks: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_size: usize,
    /// MLP width.
    pub inter: usize,
    /// Block normalization epsilon.
    pub norm_eps: f64,
    /// Final normalization epsilon.
    pub head_norm_eps: f64,
    /// Rotary position embedding (type and parameters).
    pub rotary: Rotary,
    /// The output projection is the embedding table (`tied_embedding_weight`, HF `tie_word_embeddings`):
    /// the head has no `lm_head.weight` and reads and accumulates into `model.embed_tokens.weight`.
    pub tied_embeddings: bool,
    /// Sliding-window attention (`window_size`): a token attends its `window` latest keys, itself
    /// included. `None`: every earlier key.
    pub window: Option<usize>,
    /// Biases on the q, k and v projections (Qwen2): `self_attn.{q,k,v}_proj.bias`, after the layer's
    /// weights, one fused `(qkv_width)` vector.
    pub qkv_bias: bool,
    /// RMSNorm of each query and key head before rotary (Qwen3's `q_norm`/`k_norm`, Fast-LLM's
    /// `query_norm`/`key_norm`), with this epsilon: `self_attn.{q,k}_norm.weight` `(head_size)` each,
    /// last in the layer's range (after the biases), one `(2, head_size)` block.
    pub qk_norm: Option<f64>,
}

impl ModelShape {
    /// From the validated config section.
    pub fn from_config(cfg: &BaseModelConfig) -> anyhow::Result<Self> {
        let mixer = &cfg.decoder.block.mixer;
        Ok(Self {
            hidden: cfg.hidden_size as usize,
            vocab: cfg.embeddings.vocab_size as usize,
            num_blocks: cfg.decoder.num_blocks as usize,
            heads: mixer.heads as usize,
            kv_heads: mixer.head_groups as usize,
            head_size: mixer.head_size as usize,
            inter: cfg.decoder.block.mlp.intermediate_size as usize,
            norm_eps: cfg.decoder.block.normalization.epsilon,
            head_norm_eps: cfg.head.normalization.epsilon,
            rotary: Rotary::from_config(&mixer.rotary),
            tied_embeddings: cfg.tied_embedding_weight,
            window: mixer.window_size.map(|w| w as usize),
            qkv_bias: mixer.qkv_bias(),
            qk_norm: mixer.query_norm.as_ref().map(|n| n.epsilon),
        })
    }

    /// A tiny shape for unit tests of the layout and the schedule (hidden 8, vocab 11, 2 heads of 4
    /// sharing one KV head, MLP 12).
    #[cfg(test)]
    pub(crate) fn tiny(num_blocks: usize) -> Self {
        Self {
            hidden: 8,
            vocab: 11,
            num_blocks,
            heads: 2,
            kv_heads: 1,
            head_size: 4,
            inter: 12,
            norm_eps: 1e-5,
            head_norm_eps: 1e-5,
            rotary: Rotary::Default { theta: 10000.0 },
            tied_embeddings: false,
            window: None,
            qkv_bias: false,
            qk_norm: None,
        }
    }

    /// Width of a fused q/k/v row: `(heads + 2*kv_heads) * head_size`.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_size
    }

    /// Width of the attention output: `heads * head_size`.
    pub fn attn_width(&self) -> usize {
        self.heads * self.head_size
    }
}

/// One layer of the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Token embedding: tokens -> hidden.
    Embedding,
    /// `x + o_proj(attention(rotary(qkv_proj(rms_norm(x)))))` of block `i`.
    Attention(usize),
    /// `x + down_proj(silu(gate_proj(n)) * up_proj(n))`, `n = rms_norm(x)`, of block `i`.
    Mlp(usize),
    /// Final norm, output projection and cross-entropy loss.
    Head,
}

impl LayerKind {
    /// How much of a "layer" this counts for `layers_per_stage` (a block = 1, its halves 0.5 each).
    pub fn layer_weight(&self) -> f64 {
        match self {
            LayerKind::Attention(_) | LayerKind::Mlp(_) => 0.5,
            LayerKind::Embedding | LayerKind::Head => 1.0,
        }
    }
}

/// How a parameter is initialized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All ones (normalization weights).
    Ones,
    /// All zeros (biases, as transformers initializes them).
    Zeros,
    /// Normal(0, std).
    Normal(f64),
}

/// A parameter of a layer: name (HuggingFace Llama naming), shape, initialization, weight decay.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// HuggingFace tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Initialization.
    pub init: Init,
    /// Whether AdamW's weight decay applies (not to normalization weights).
    pub weight_decay: bool,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The model: its shape and its layers.
#[derive(Debug, Clone)]
pub struct Llama {
    /// The shape.
    pub shape: ModelShape,
    /// Layers in execution order.
    pub layers: Vec<LayerKind>,
    /// The kernels' attention is fused (flash-style, [`Kernels::fused_attention`]): each attention
    /// layer saves one log-sum-exp per row `(batch, heads, seq)` instead of the softmax matrix, and the
    /// backward scratch holds `(batch, heads, seq)` instead of `(batch, heads, seq, seq)`.
    pub fused_attention: bool,
    /// MLP activations the backward recomputes (`mlp.recompute_level`): recomputing the activation, an
    /// MLP layer keeps no `silu(gate) * up`, recomputing layer 1 no `gate|up` either (the backward
    /// recomputes them into the scratch). The results are the same bits: the same kernels on the same
    /// inputs.
    pub mlp_recompute: MlpRecomputeLevel,
}

/// The tensors of an attention layer's parameter range ([`Llama::attention_weights`]).
pub struct AttentionWeights<'a, T> {
    /// Pre-normalization weight `(c)`.
    pub norm: &'a [T],
    /// Fused q/k/v projection `(qkv, c)`.
    pub qkv: &'a [T],
    /// Output projection `(c, attn)`.
    pub o: &'a [T],
    /// Fused q/k/v bias `(qkv)`, with `qkv_bias`.
    pub qkv_bias: Option<&'a [T]>,
    /// Query and key norm weights `(2, head_size)`, with `qk_norm`.
    pub qk_norm: Option<&'a [T]>,
}

/// Rotary tables `(seq, head_size/2)`.
#[derive(Debug, Clone)]
pub struct Rope<T: Element> {
    /// cos of the angles (master precision).
    pub cos: Buf<T::Master>,
    /// sin of the angles (master precision).
    pub sin: Buf<T::Master>,
    /// Sequence length the tables cover.
    pub seq: usize,
}

impl<T: Element> Rope<T> {
    /// The tables of `rotary` for positions `0..seq` (angles `pos * frequency`, computed in f64), on the
    /// heap.
    pub fn new(seq: usize, head_size: usize, rotary: &Rotary) -> Self {
        Self::new_in(&crate::backend::mem::host(), seq, head_size, rotary)
    }

    /// As [`Rope::new`], in `mem`.
    pub fn new_in(mem: &Arc<dyn Memory>, seq: usize, head_size: usize, rotary: &Rotary) -> Self {
        let frequencies = rotary.frequencies(head_size);
        let mut cos = Vec::with_capacity(seq * frequencies.len());
        let mut sin = Vec::with_capacity(seq * frequencies.len());
        for pos in 0..seq {
            for (c, s) in rotary.table_row(&frequencies, pos) {
                cos.push(T::Master::from_f64(c));
                sin.push(T::Master::from_f64(s));
            }
        }
        Self {
            cos: Buf::from_slice_in(mem, &cos),
            sin: Buf::from_slice_in(mem, &sin),
            seq,
        }
    }
}

/// Saved activations of one layer for one micro-batch.
#[derive(Debug, Clone, Default)]
pub struct LayerActs<T: Element> {
    /// Normalized input `(n, c)`; an attention layer with query/key norms follows it with the heads'
    /// normalized values `(n, heads + kv_heads, head_size)` ([`Llama::qk_heads_rows`]).
    pub normed: Buf<T>,
    /// 1/rms per token `(n)`; then, with query/key norms, per query and key head `(n, heads + kv_heads)`.
    pub rstd: Buf<T::Master>,
    /// Attention: q/k/v after rotary `(n, qkv)`; MLP: gate|up `(n, 2*inter)`; head: logits `(n, vocab)`.
    pub proj: Buf<T>,
    /// Attention: softmax `(batch, heads, seq, seq)`, or the log-sum-exp `(batch, heads, seq)` with
    /// fused attention.
    pub probs: Buf<T::Master>,
    /// Attention: output before o_proj `(n, heads*head_size)`; MLP: `silu(gate)*up (n, inter)`.
    pub inner: Buf<T>,
}

/// Everything one micro-batch keeps between its forward and its backward.
#[derive(Debug, Clone)]
pub struct MicroBatchActs<T: Element> {
    /// Input tokens `(n)`.
    pub tokens: Buf<u32>,
    /// Target tokens `(n)`.
    pub targets: Buf<u32>,
    /// `hidden[l]` is the input of layer `l` (`(n, c)`); `hidden[0]` is unused (the embedding reads tokens).
    pub hidden: Vec<Buf<T>>,
    /// Per layer saved activations.
    pub layers: Vec<LayerActs<T>>,
    /// Gradient of the hidden state flowing backward `(n, c)`.
    pub grad_hidden: Buf<T>,
    /// `(n)` ones with `qkv_bias` (the bias add and its gradient are products with it), else empty.
    pub ones: Buf<T>,
    /// Sum of the token losses of this micro-batch (set by the head's forward).
    pub loss_sum: f64,
}

/// Scratch shared by all micro-batches (used inside one layer's backward only).
#[derive(Debug, Clone)]
pub struct Scratch<T: Element> {
    /// `(n, c)`.
    pub d_normed: Buf<T>,
    /// `(n, max(qkv, 2*inter))`.
    pub d_proj: Buf<T>,
    /// `(n, max(attn, inter))`.
    pub d_inner: Buf<T>,
    /// `(batch, heads, seq, seq)`, or `(batch, heads, seq)` with fused attention.
    pub d_probs: Buf<T::Master>,
    /// `(n, 2*inter)`: an MLP's recomputed `gate|up` when it recomputes layer 1, else empty.
    pub recomputed: Buf<T>,
}

/// Token-batch geometry of a micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
}

impl Batch {
    /// Tokens `n = batch * seq`.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

impl Llama {
    /// The layers of a shape: embedding, (attention, mlp) per block, head.
    pub fn new(shape: ModelShape) -> Self {
        let mut layers = vec![LayerKind::Embedding];
        for i in 0..shape.num_blocks {
            layers.push(LayerKind::Attention(i));
            layers.push(LayerKind::Mlp(i));
        }
        layers.push(LayerKind::Head);
        Self {
            shape,
            layers,
            fused_attention: false,
            mlp_recompute: MlpRecomputeLevel::None,
        }
    }

    /// Parameters of a layer, in buffer order.
    pub fn layer_params(&self, layer: LayerKind) -> Vec<ParamSpec> {
        let s = &self.shape;
        let std = (s.hidden as f64).powf(-0.5);
        let out_std = std / (2.0 * s.num_blocks as f64).sqrt();
        let p = |name: String, shape: Vec<usize>, init: Init, wd: bool| ParamSpec {
            name,
            shape,
            init,
            weight_decay: wd,
        };
        match layer {
            LayerKind::Embedding => {
                vec![p(
                    "model.embed_tokens.weight".into(),
                    vec![s.vocab, s.hidden],
                    Init::Normal(std),
                    true,
                )]
            }
            LayerKind::Attention(i) => {
                let pre = format!("model.layers.{i}");
                let mut params = vec![
                    p(
                        format!("{pre}.input_layernorm.weight"),
                        vec![s.hidden],
                        Init::Ones,
                        false,
                    ),
                    p(
                        format!("{pre}.self_attn.q_proj.weight"),
                        vec![s.heads * s.head_size, s.hidden],
                        Init::Normal(std),
                        true,
                    ),
                    p(
                        format!("{pre}.self_attn.k_proj.weight"),
                        vec![s.kv_heads * s.head_size, s.hidden],
                        Init::Normal(std),
                        true,
                    ),
                    p(
                        format!("{pre}.self_attn.v_proj.weight"),
                        vec![s.kv_heads * s.head_size, s.hidden],
                        Init::Normal(std),
                        true,
                    ),
                    p(
                        format!("{pre}.self_attn.o_proj.weight"),
                        vec![s.hidden, s.heads * s.head_size],
                        Init::Normal(out_std),
                        true,
                    ),
                ];
                if s.qkv_bias {
                    for (name, rows) in [
                        ("q", s.heads * s.head_size),
                        ("k", s.kv_heads * s.head_size),
                        ("v", s.kv_heads * s.head_size),
                    ] {
                        params.push(p(
                            format!("{pre}.self_attn.{name}_proj.bias"),
                            vec![rows],
                            Init::Zeros,
                            false,
                        ));
                    }
                }
                if s.qk_norm.is_some() {
                    for name in ["q_norm", "k_norm"] {
                        params.push(p(
                            format!("{pre}.self_attn.{name}.weight"),
                            vec![s.head_size],
                            Init::Ones,
                            false,
                        ));
                    }
                }
                params
            }
            LayerKind::Mlp(i) => {
                let pre = format!("model.layers.{i}");
                vec![
                    p(
                        format!("{pre}.post_attention_layernorm.weight"),
                        vec![s.hidden],
                        Init::Ones,
                        false,
                    ),
                    p(
                        format!("{pre}.mlp.gate_proj.weight"),
                        vec![s.inter, s.hidden],
                        Init::Normal(std),
                        true,
                    ),
                    p(
                        format!("{pre}.mlp.up_proj.weight"),
                        vec![s.inter, s.hidden],
                        Init::Normal(std),
                        true,
                    ),
                    p(
                        format!("{pre}.mlp.down_proj.weight"),
                        vec![s.hidden, s.inter],
                        Init::Normal(out_std),
                        true,
                    ),
                ]
            }
            LayerKind::Head => {
                let mut params = vec![p("model.norm.weight".into(), vec![s.hidden], Init::Ones, false)];
                // Tied: the output projection is the embedding table (no parameter of its own).
                if !s.tied_embeddings {
                    params.push(p(
                        "lm_head.weight".into(),
                        vec![s.vocab, s.hidden],
                        Init::Normal(std),
                        true,
                    ));
                }
                params
            }
        }
    }

    /// Number of parameters of a layer.
    pub fn layer_numel(&self, layer: LayerKind) -> usize {
        self.layer_params(layer).iter().map(ParamSpec::numel).sum()
    }

    /// All parameters of the model, in model order.
    pub fn all_params(&self) -> Vec<ParamSpec> {
        self.layers.iter().flat_map(|&l| self.layer_params(l)).collect()
    }

    /// Total parameter count.
    pub fn num_params(&self) -> usize {
        self.layers.iter().map(|&l| self.layer_numel(l)).sum()
    }

    /// Element counts of one layer's saved activations for a micro-batch:
    /// `[normed, rstd, proj, probs, inner]` (see [`LayerActs`]).
    pub fn layer_act_sizes(&self, layer: LayerKind, b: Batch) -> [usize; 5] {
        let s = &self.shape;
        let n = b.tokens();
        match layer {
            LayerKind::Embedding => [0; 5],
            LayerKind::Attention(_) => [
                n * s.hidden + self.qk_heads_rows(b) * s.head_size,
                n + self.qk_heads_rows(b),
                n * s.qkv_width(),
                self.attention_rows(b),
                n * s.attn_width(),
            ],
            LayerKind::Mlp(_) => {
                let r = self.mlp_recompute;
                let proj = if r.recompute_layer_1() { 0 } else { n * 2 * s.inter };
                let inner = if r.recompute_activation() { 0 } else { n * s.inter };
                [n * s.hidden, n, proj, 0, inner]
            }
            LayerKind::Head => [n * s.hidden, n, n * s.vocab, 0, 0],
        }
    }

    /// Query and key heads of a micro-batch, `n * (heads + kv_heads)`, with `qk_norm` (each saves its
    /// normalized values after the layer's normalized input, and its `rstd` after the input's); else 0.
    pub fn qk_heads_rows(&self, b: Batch) -> usize {
        let s = &self.shape;
        if s.qk_norm.is_some() {
            b.tokens() * (s.heads + s.kv_heads)
        } else {
            0
        }
    }

    /// Allocate the saved-activation workspace of one micro-batch for layers `layers` (indices into
    /// `self.layers`). Layers outside the range get empty buffers.
    pub fn alloc_acts<T: Element>(&self, b: Batch, layers: std::ops::Range<usize>) -> MicroBatchActs<T> {
        self.alloc_acts_in(&crate::backend::mem::host(), b, layers)
    }

    /// As [`Llama::alloc_acts`], in `mem`.
    pub fn alloc_acts_in<T: Element>(
        &self,
        mem: &Arc<dyn Memory>,
        b: Batch,
        layers: std::ops::Range<usize>,
    ) -> MicroBatchActs<T> {
        let n = b.tokens();
        let z = |len: usize| Buf::zeros_in(mem, len);
        let mut acts = MicroBatchActs {
            tokens: Buf::zeros_in(mem, n),
            targets: Buf::zeros_in(mem, n),
            hidden: (0..self.layers.len() + 1).map(|_| Buf::default()).collect(),
            layers: vec![LayerActs::default(); self.layers.len()],
            grad_hidden: z(n * self.shape.hidden),
            ones: if self.shape.qkv_bias {
                Buf::from_slice_in(mem, &vec![T::ONE; n])
            } else {
                Buf::default()
            },
            loss_sum: 0.0,
        };
        for l in layers {
            if l > 0 {
                acts.hidden[l] = z(n * self.shape.hidden);
            }
            let [normed, rstd, proj, probs, inner] = self.layer_act_sizes(self.layers[l], b);
            acts.layers[l] = LayerActs {
                normed: z(normed),
                rstd: Buf::zeros_in(mem, rstd),
                proj: z(proj),
                probs: Buf::zeros_in(mem, probs),
                inner: z(inner),
            };
        }
        acts
    }

    /// Elements of one micro-batch's saved activations for `layers`, as [`Llama::alloc_acts`] allocates
    /// them (token ids counted as one element each, inputs and targets).
    pub fn acts_elems(&self, b: Batch, layers: std::ops::Range<usize>) -> usize {
        let n = b.tokens();
        let mut total = 2 * n + n * self.shape.hidden + if self.shape.qkv_bias { n } else { 0 };
        for l in layers {
            if l > 0 {
                total += n * self.shape.hidden;
            }
            total += self.layer_act_sizes(self.layers[l], b).iter().sum::<usize>();
        }
        total
    }

    /// Elements of the backward scratch, as [`Llama::alloc_scratch`] allocates it.
    pub fn scratch_elems(&self, b: Batch) -> usize {
        let s = &self.shape;
        let n = b.tokens();
        n * s.hidden
            + n * s.qkv_width().max(2 * s.inter)
            + n * s.attn_width().max(s.inter)
            + self.attention_rows(b)
            + self.recomputed_elems(b)
    }

    /// Elements of the scratch an MLP recomputes `gate|up` into ([`Scratch::recomputed`]).
    fn recomputed_elems(&self, b: Batch) -> usize {
        if self.mlp_recompute.recompute_layer_1() {
            b.tokens() * 2 * self.shape.inter
        } else {
            0
        }
    }

    /// Elements the attention saves per layer and micro-batch (and needs as backward scratch): the
    /// softmax `(batch, heads, seq, seq)`, or one log-sum-exp per row `(batch, heads, seq)` when fused.
    pub fn attention_rows(&self, b: Batch) -> usize {
        let rows = b.batch * self.shape.heads * b.seq;
        if self.fused_attention {
            rows
        } else {
            rows * b.seq
        }
    }

    /// Activation bytes of one rank, as [`Llama::alloc_acts_in`] and [`Llama::alloc_scratch_in`]
    /// allocate them: `breadth_first` micro-batches of saved activations plus the backward scratch, with
    /// activations at `compute_bytes` per element and the master-precision ones (RMSNorm `rstd`,
    /// softmax or log-sum-exp, their scratch) and the token ids at 4 bytes.
    pub fn activation_bytes(&self, b: Batch, breadth_first: usize, compute_bytes: usize) -> u64 {
        let n = b.tokens();
        let c = self.shape.hidden;
        let (mut compute, mut four) = (n * c, 2 * n); // grad_hidden; tokens and targets
        for (l, &layer) in self.layers.iter().enumerate() {
            if l > 0 {
                compute += n * c;
            }
            let [normed, rstd, proj, probs, inner] = self.layer_act_sizes(layer, b);
            compute += normed + proj + inner;
            four += rstd + probs;
        }
        let scratch_master = self.attention_rows(b);
        let scratch_compute = self.scratch_elems(b) - scratch_master;
        let per_mb = compute * compute_bytes + four * 4;
        (breadth_first * per_mb + scratch_compute * compute_bytes + scratch_master * 4) as u64
    }

    /// Allocate the backward scratch for a micro-batch geometry.
    pub fn alloc_scratch<T: Element>(&self, b: Batch) -> Scratch<T> {
        self.alloc_scratch_in(&crate::backend::mem::host(), b)
    }

    /// As [`Llama::alloc_scratch`], in `mem`.
    pub fn alloc_scratch_in<T: Element>(&self, mem: &Arc<dyn Memory>, b: Batch) -> Scratch<T> {
        let s = &self.shape;
        let n = b.tokens();
        Scratch {
            d_normed: Buf::zeros_in(mem, n * s.hidden),
            d_proj: Buf::zeros_in(mem, n * s.qkv_width().max(2 * s.inter)),
            d_inner: Buf::zeros_in(mem, n * s.attn_width().max(s.inter)),
            d_probs: Buf::zeros_in(mem, self.attention_rows(b)),
            recomputed: Buf::zeros_in(mem, self.recomputed_elems(b)),
        }
    }

    /// Ranges of each layer's parameters in one whole-model flat buffer (model order, no stages).
    pub fn flat_layer_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut off = 0;
        self.layers
            .iter()
            .map(|&l| {
                let r = off..off + self.layer_numel(l);
                off = r.end;
                r
            })
            .collect()
    }

    /// One micro-batch through the whole model held in one flat buffer `w` (no stages, shards or
    /// communication): forward, and backward accumulating into `grads` when given, with the loss
    /// gradient scaled by `loss_scale`. Returns the sum of the token losses. This is the reference path
    /// the gradient tests hold the engine to; it allocates and is not meant for training.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_flat<T: Element>(
        &self,
        k: &dyn Kernels<T>,
        w: &[T],
        grads: Option<&mut [T::Master]>,
        tokens: &[u32],
        targets: &[u32],
        b: Batch,
        loss_scale: T::Master,
    ) -> f64 {
        let rope = Rope::<T>::new(b.seq, self.shape.head_size, &self.shape.rotary);
        let ranges = self.flat_layer_ranges();
        let mut acts = self.alloc_acts::<T>(b, 0..self.layers.len());
        acts.tokens.copy_from_slice(tokens);
        acts.targets.copy_from_slice(targets);
        // The embedding is layer 0: its range starts the buffer, and every later layer's follows it.
        let table = &w[ranges[0].clone()];
        let mut scratch = self.alloc_scratch::<T>(b);
        for (l, r) in ranges.iter().enumerate() {
            let wl = &w[r.clone()];
            self.forward_layer(k, &rope, l, wl, table, &mut acts, &mut scratch, b, Some(loss_scale));
        }
        if let Some(g) = grads {
            let (g_table, g_rest) = g.split_at_mut(ranges[0].end);
            for (l, r) in ranges.iter().enumerate().rev() {
                let (g_layer, g_table): (&mut [T::Master], &mut [T::Master]) = if l == 0 {
                    (&mut g_table[..], &mut [])
                } else {
                    (
                        &mut g_rest[r.start - ranges[0].end..r.end - ranges[0].end],
                        &mut g_table[..],
                    )
                };
                self.backward_layer(
                    k,
                    &rope,
                    l,
                    &w[r.clone()],
                    g_layer,
                    table,
                    g_table,
                    &mut acts,
                    &mut scratch,
                    b,
                );
            }
        }
        // The gradients are read by the caller on the host.
        k.synchronize();
        acts.loss_sum
    }

    /// An attention layer's parameter range split into its tensors.
    pub fn attention_weights<'a, T>(&self, weights: &'a [T]) -> AttentionWeights<'a, T> {
        let s = &self.shape;
        let c = s.hidden;
        let (norm, rest) = weights.split_at(c);
        let (qkv, rest) = rest.split_at(s.qkv_width() * c);
        let (o, rest) = rest.split_at(s.attn_width() * c);
        let (bias, qk_norm) = rest.split_at(if s.qkv_bias { s.qkv_width() } else { 0 });
        assert_eq!(
            qk_norm.len(),
            if s.qk_norm.is_some() { 2 * s.head_size } else { 0 },
            "attention: parameter range size"
        );
        AttentionWeights {
            norm,
            qkv,
            o,
            qkv_bias: s.qkv_bias.then_some(bias),
            qk_norm: s.qk_norm.is_some().then_some(qk_norm),
        }
    }

    /// The head's final-norm weight and output projection `(vocab, hidden)`: the rest of its range, or,
    /// tied, the embedding table.
    pub fn head_weights<'a, T>(&self, weights: &'a [T], table: &'a [T]) -> (&'a [T], &'a [T]) {
        let (norm_w, rest) = weights.split_at(self.shape.hidden);
        let out_w = if self.shape.tied_embeddings { table } else { rest };
        assert_eq!(
            out_w.len(),
            self.shape.vocab * self.shape.hidden,
            "head: output projection size"
        );
        (norm_w, out_w)
    }

    /// Forward of layer `l` for one micro-batch. `weights` is the layer's parameter range; `table` the
    /// embedding table, which a tied head reads as its output projection (any slice otherwise).
    /// Reads `acts.hidden[l]` (or the tokens), writes `acts.hidden[l + 1]` (or the loss sum).
    /// `loss_scale`: for the head, `Some(s)` computes the loss gradient scaled by `s` into the saved
    /// logits (training); `None` computes the loss only (evaluation).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_layer<T: Element>(
        &self,
        k: &dyn Kernels<T>,
        rope: &Rope<T>,
        l: usize,
        weights: &[T],
        table: &[T],
        acts: &mut MicroBatchActs<T>,
        scratch: &mut Scratch<T>,
        b: Batch,
        loss_scale: Option<T::Master>,
    ) {
        let s = &self.shape;
        let c = s.hidden;
        let n = b.tokens();
        let eps = T::Master::from_f64(s.norm_eps);
        let (before, after) = acts.hidden.split_at_mut(l + 1);
        let input = &before[l];
        let la = &mut acts.layers[l];
        match self.layers[l] {
            LayerKind::Embedding => {
                k.embedding_forward(&mut after[0], &acts.tokens, weights, c);
            }
            LayerKind::Attention(_) => {
                let AttentionWeights {
                    norm: norm_w,
                    qkv: qkv_w,
                    o: o_w,
                    qkv_bias: qkv_b,
                    qk_norm: qk_w,
                } = self.attention_weights(weights);
                let (normed, qk_hat) = la.normed.split_at_mut(n * c);
                let (rstd, qk_rstd) = la.rstd.split_at_mut(n);
                k.rms_norm_forward(normed, rstd, input, norm_w, c, eps);
                k.matmul(&mut la.proj, normed, qkv_w, n, s.qkv_width(), c, false, true, false);
                if let Some(bias) = qkv_b {
                    // proj += ones (n, 1) @ bias (1, qkv): the bias on every row.
                    k.matmul(&mut la.proj, &acts.ones, bias, n, s.qkv_width(), 1, false, false, true);
                }
                if let (Some(qk_w), Some(qk_eps)) = (qk_w, s.qk_norm) {
                    k.head_norm_forward(
                        &mut la.proj,
                        qk_hat,
                        qk_rstd,
                        qk_w,
                        s.qkv_width(),
                        s.heads + s.kv_heads,
                        s.heads,
                        s.head_size,
                        T::Master::from_f64(qk_eps),
                    );
                }
                k.rotary(
                    &mut la.proj,
                    s.qkv_width(),
                    s.heads + s.kv_heads,
                    s.head_size,
                    b.seq,
                    &rope.cos,
                    &rope.sin,
                    false,
                );
                k.attention_forward(
                    &mut la.inner,
                    &mut la.probs,
                    &la.proj,
                    b.batch,
                    b.seq,
                    s.heads,
                    s.kv_heads,
                    s.head_size,
                    s.window,
                );
                k.matmul_residual(&mut after[0], input, &la.inner, o_w, n, c, s.attn_width(), false, true);
            }
            LayerKind::Mlp(_) => {
                let (norm_w, rest) = weights.split_at(c);
                let gu_w = &rest[..2 * s.inter * c];
                let down_w = &rest[2 * s.inter * c..];
                k.rms_norm_forward(&mut la.normed, &mut la.rstd, input, norm_w, c, eps);
                // With recomputation the intermediates go to the scratch (free during a forward: it is
                // used inside one layer's backward only) instead of the saved activations.
                let r = self.mlp_recompute;
                let proj = if r.recompute_layer_1() {
                    &mut scratch.d_proj[..n * 2 * s.inter]
                } else {
                    &mut la.proj[..]
                };
                let inner = if r.recompute_activation() {
                    &mut scratch.d_inner[..n * s.inter]
                } else {
                    &mut la.inner[..]
                };
                k.matmul(proj, &la.normed, gu_w, n, 2 * s.inter, c, false, true, false);
                k.swiglu_forward(inner, proj, s.inter);
                k.matmul_residual(&mut after[0], input, inner, down_w, n, c, s.inter, false, true);
            }
            LayerKind::Head => {
                let (norm_w, out_w) = self.head_weights(weights, table);
                k.rms_norm_forward(
                    &mut la.normed,
                    &mut la.rstd,
                    input,
                    norm_w,
                    c,
                    T::Master::from_f64(s.head_norm_eps),
                );
                k.matmul(&mut la.proj, &la.normed, out_w, n, s.vocab, c, false, true, false);
                acts.loss_sum = k.cross_entropy(&mut la.proj, &acts.targets, s.vocab, loss_scale);
            }
        }
    }

    /// Backward of layer `l` for one micro-batch. `grads` is the layer's range of the grad buffer
    /// (accumulated into); `table` and `table_grad` the embedding table and its gradient, which a tied
    /// head reads and accumulates into (any slices otherwise; the embedding layer itself uses `grads`).
    /// Reads and overwrites `acts.grad_hidden` in place: on entry the gradient of
    /// the layer's output (unused for the head, which starts from its saved loss gradient), on exit the
    /// gradient of its input (unused after the embedding).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_layer<T: Element>(
        &self,
        k: &dyn Kernels<T>,
        rope: &Rope<T>,
        l: usize,
        weights: &[T],
        grads: &mut [T::Master],
        table: &[T],
        table_grad: &mut [T::Master],
        acts: &mut MicroBatchActs<T>,
        scratch: &mut Scratch<T>,
        b: Batch,
    ) {
        let s = &self.shape;
        let c = s.hidden;
        let n = b.tokens();
        let input = &acts.hidden[l];
        let la = &mut acts.layers[l];
        let dh = &mut acts.grad_hidden;
        match self.layers[l] {
            LayerKind::Embedding => {
                k.embedding_backward(grads, &acts.tokens, dh, c);
            }
            LayerKind::Attention(_) => {
                let AttentionWeights {
                    norm: norm_w,
                    qkv: qkv_w,
                    o: o_w,
                    qk_norm: qk_w,
                    ..
                } = self.attention_weights(weights);
                let (g_norm, g_rest) = grads.split_at_mut(c);
                let (g_qkv, g_rest) = g_rest.split_at_mut(s.qkv_width() * c);
                let (g_o, g_rest) = g_rest.split_at_mut(s.attn_width() * c);
                let (g_bias, g_qk) = g_rest.split_at_mut(if s.qkv_bias { s.qkv_width() } else { 0 });
                let (normed, qk_hat) = la.normed.split_at(n * c);
                let (rstd, qk_rstd) = la.rstd.split_at(n);
                let d_inner = &mut scratch.d_inner[..n * s.attn_width()];
                let d_qkv = &mut scratch.d_proj[..n * s.qkv_width()];
                // out = x + inner @ o^T
                k.matmul_acc_master(g_o, dh, &la.inner, c, s.attn_width(), n, true, false);
                k.matmul(d_inner, dh, o_w, n, s.attn_width(), c, false, false, false);
                k.attention_backward(
                    d_qkv,
                    &mut scratch.d_probs,
                    d_inner,
                    &la.inner,
                    &la.proj,
                    &la.probs,
                    b.batch,
                    b.seq,
                    s.heads,
                    s.kv_heads,
                    s.head_size,
                    s.window,
                );
                k.rotary(
                    d_qkv,
                    s.qkv_width(),
                    s.heads + s.kv_heads,
                    s.head_size,
                    b.seq,
                    &rope.cos,
                    &rope.sin,
                    true,
                );
                if let Some(qk_w) = qk_w {
                    k.head_norm_backward(
                        d_qkv,
                        g_qk,
                        qk_hat,
                        qk_w,
                        qk_rstd,
                        s.qkv_width(),
                        s.heads + s.kv_heads,
                        s.heads,
                        s.head_size,
                    );
                }
                k.matmul_acc_master(g_qkv, d_qkv, normed, s.qkv_width(), c, n, true, false);
                if s.qkv_bias {
                    // bias grad += d_qkv^T (qkv, n) @ ones (n, 1): the column sums.
                    k.matmul_acc_master(g_bias, d_qkv, &acts.ones, s.qkv_width(), 1, n, true, false);
                }
                k.matmul(
                    &mut scratch.d_normed,
                    d_qkv,
                    qkv_w,
                    n,
                    c,
                    s.qkv_width(),
                    false,
                    false,
                    false,
                );
                // Pre-norm residual: dh (the output's gradient) += the norm's input gradient.
                k.rms_norm_backward(dh, g_norm, &scratch.d_normed, input, norm_w, rstd, c, true);
            }
            LayerKind::Mlp(_) => {
                let (norm_w, rest) = weights.split_at(c);
                let gu_w = &rest[..2 * s.inter * c];
                let down_w = &rest[2 * s.inter * c..];
                let (g_norm, g_rest) = grads.split_at_mut(c);
                let (g_gu, g_down) = g_rest.split_at_mut(2 * s.inter * c);
                let d_inner = &mut scratch.d_inner[..n * s.inter];
                let d_gu = &mut scratch.d_proj[..n * 2 * s.inter];
                // gate|up and silu(gate) * up: kept, or recomputed as the forward computed them (the
                // activation into d_inner, which the product below then overwrites with its gradient).
                let proj: &[T] = if self.mlp_recompute.recompute_layer_1() {
                    let r = &mut scratch.recomputed[..n * 2 * s.inter];
                    k.matmul(r, &la.normed, gu_w, n, 2 * s.inter, c, false, true, false);
                    r
                } else {
                    &la.proj
                };
                let inner: &[T] = if self.mlp_recompute.recompute_activation() {
                    k.swiglu_forward(d_inner, proj, s.inter);
                    d_inner
                } else {
                    &la.inner
                };
                k.matmul_acc_master(g_down, dh, inner, c, s.inter, n, true, false);
                k.matmul(d_inner, dh, down_w, n, s.inter, c, false, false, false);
                k.swiglu_backward(d_gu, d_inner, proj, s.inter);
                k.matmul_acc_master(g_gu, d_gu, &la.normed, 2 * s.inter, c, n, true, false);
                k.matmul(
                    &mut scratch.d_normed,
                    d_gu,
                    gu_w,
                    n,
                    c,
                    2 * s.inter,
                    false,
                    false,
                    false,
                );
                // Pre-norm residual: dh (the output's gradient) += the norm's input gradient.
                k.rms_norm_backward(dh, g_norm, &scratch.d_normed, input, norm_w, &la.rstd, c, true);
            }
            LayerKind::Head => {
                let (norm_w, out_w) = self.head_weights(weights, table);
                let (g_norm, g_out) = grads.split_at_mut(c);
                let g_out = if s.tied_embeddings { table_grad } else { g_out };
                assert_eq!(g_out.len(), s.vocab * c, "head: output projection gradient size");
                // la.proj holds the scaled loss gradient d logits (n, vocab).
                k.matmul_acc_master(g_out, &la.proj, &la.normed, s.vocab, c, n, true, false);
                k.matmul(
                    &mut scratch.d_normed,
                    &la.proj,
                    out_w,
                    n,
                    c,
                    s.vocab,
                    false,
                    false,
                    false,
                );
                k.rms_norm_backward(dh, g_norm, &scratch.d_normed, input, norm_w, &la.rstd, c, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuKernels;

    fn tiny(tied_embeddings: bool, window: Option<usize>) -> Llama {
        tiny_with(tied_embeddings, window, Rotary::Default { theta: 10000.0 })
    }

    fn tiny_with(tied_embeddings: bool, window: Option<usize>, rotary: Rotary) -> Llama {
        Llama::new(ModelShape {
            hidden: 8,
            vocab: 13,
            num_blocks: 2,
            heads: 4,
            kv_heads: 2,
            head_size: 4,
            inter: 12,
            norm_eps: 1e-5,
            head_norm_eps: 1e-5,
            rotary,
            tied_embeddings,
            window,
            qkv_bias: false,
            qk_norm: None,
        })
    }

    /// Whole-model forward (+ backward) in one flat buffer of all layers; returns the mean loss.
    fn run(m: &Llama, w: &[f64], grads: Option<&mut [f64]>, tokens: &[u32], targets: &[u32], b: Batch) -> f64 {
        let scale = 1.0 / b.tokens() as f64;
        m.forward_backward_flat(&CpuKernels::new(1), w, grads, tokens, targets, b, scale) * scale
    }

    fn setup(tied: bool, window: Option<usize>) -> (Llama, Vec<f64>, Vec<u32>, Vec<u32>, Batch) {
        setup_model(tiny(tied, window))
    }

    fn setup_model(m: Llama) -> (Llama, Vec<f64>, Vec<u32>, Vec<u32>, Batch) {
        let b = Batch { batch: 2, seq: 5 };
        let mut w = Vec::new();
        for (p, spec) in m.all_params().iter().enumerate() {
            for e in 0..spec.numel() {
                // Perturb the norm weights away from 1 so their gradients are generic.
                let v = match spec.init {
                    Init::Ones => 1.0 + 0.3 * init::normal(3, p as u64, e as u64),
                    // Biases too, so their gradients are generic.
                    Init::Normal(_) | Init::Zeros => 0.4 * init::normal(3, p as u64, e as u64),
                };
                w.push(v);
            }
        }
        let tokens: Vec<u32> = (0..b.tokens()).map(|i| (init::mix64(i as u64) % 13) as u32).collect();
        let targets: Vec<u32> = (0..b.tokens())
            .map(|i| (init::mix64(100 + i as u64) % 13) as u32)
            .collect();
        (m, w, tokens, targets, b)
    }

    /// Max relative error of the analytic gradient against central differences, over every parameter
    /// element; `corrupt` lets a test break the analytic gradient on purpose.
    fn gradient_error(tied: bool, window: Option<usize>, corrupt: impl Fn(&mut [f64])) -> f64 {
        model_gradient_error(tiny(tied, window), corrupt)
    }

    fn model_gradient_error(m: Llama, corrupt: impl Fn(&mut [f64])) -> f64 {
        let (m, mut w, tokens, targets, b) = setup_model(m);
        let mut g = vec![0.0; w.len()];
        run(&m, &w, Some(&mut g), &tokens, &targets, b);
        corrupt(&mut g);
        let h = 1e-5;
        let mut num = vec![0.0; w.len()];
        for i in 0..w.len() {
            let x = w[i];
            w[i] = x + h;
            let lp = run(&m, &w, None, &tokens, &targets, b);
            w[i] = x - h;
            let lm = run(&m, &w, None, &tokens, &targets, b);
            w[i] = x;
            num[i] = (lp - lm) / (2.0 * h);
        }
        let scale = num.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        g.iter().zip(&num).map(|(a, n)| (a - n).abs()).fold(0.0, f64::max) / scale
    }

    #[test]
    fn whole_model_gradient_matches_finite_differences() {
        // Sequences of 5: a window of 2 masks most earlier keys.
        for (tied, window) in [(false, None), (true, None), (false, Some(2)), (true, Some(1))] {
            let err = gradient_error(tied, window, |_| {});
            assert!(
                err < 1e-6,
                "tied {tied} window {window:?}: relative gradient error {err:e}"
            );
        }
    }

    /// The scaled rotary types (llama3 blending pair 0 and fully scaling pair 1 of a head of 4; yarn
    /// scaling pair 1 and multiplying cos/sin by 1.3, which the backward's transposed rotation must carry)
    /// and no rotary: the gradient still matches central differences, and each changes the loss.
    #[test]
    fn rotary_types_gradients_match_finite_differences() {
        let llama3 = Rotary::Llama3 {
            theta: 10000.0,
            scale_factor: 4.0,
            low_frequency_factor: 1.0,
            high_frequency_factor: 4.0,
            original_context_length: 8.0,
        };
        let yarn = Rotary::Yarn {
            theta: 10000.0,
            scale_factor: 4.0,
            attention_factor: 1.3,
            beta_fast: 32.0,
            beta_slow: 1.0,
            original_context_length: 16.0,
        };
        let (_, w, tokens, targets, b) = setup(false, None);
        let default = run(&tiny(false, None), &w, None, &tokens, &targets, b);
        for rotary in [llama3, yarn, Rotary::None] {
            let err = model_gradient_error(tiny_with(false, None, rotary), |_| {});
            assert!(err < 1e-6, "{rotary:?}: relative gradient error {err:e}");
            let loss = run(&tiny_with(false, None, rotary), &w, None, &tokens, &targets, b);
            assert!(
                (loss - default).abs() > 1e-6,
                "{rotary:?}: loss {loss} = default {default}"
            );
        }
        // The frequencies the tables use: llama3 blends pair 0 (wavelength 2π between 8/4 and 8/1) and
        // divides pair 1 (wavelength 200π) by 4; yarn keeps pair 0 and divides pair 1.
        let f = llama3.frequencies(4);
        let t = (8.0 / (2.0 * std::f64::consts::PI) - 1.0) / 3.0;
        assert!((f[0] - ((1.0 - t) / 4.0 + t)).abs() < 1e-15 && (f[1] - 0.01 / 4.0).abs() < 1e-15);
        assert_eq!(yarn.frequencies(4), vec![1.0, 0.01 / 4.0]);
    }

    /// q/k/v biases (Qwen2): the gradient (biases' included) matches central differences; a backward
    /// that drops the bias gradient is caught; the biases change the loss.
    #[test]
    fn qkv_bias_gradients_match_finite_differences() {
        let biased = || {
            let m = tiny(false, Some(3));
            Llama::new(ModelShape {
                qkv_bias: true,
                ..m.shape
            })
        };
        let m = biased();
        let names: Vec<String> = m
            .layer_params(LayerKind::Attention(1))
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names[names.len() - 3..],
            [
                "model.layers.1.self_attn.q_proj.bias",
                "model.layers.1.self_attn.k_proj.bias",
                "model.layers.1.self_attn.v_proj.bias"
            ]
        );
        let err = model_gradient_error(biased(), |_| {});
        assert!(err < 1e-6, "relative gradient error {err:e}");
        let mut bias_ranges = Vec::new();
        let mut off = 0;
        for spec in m.all_params() {
            if spec.name.ends_with("_proj.bias") {
                bias_ranges.push(off..off + spec.numel());
            }
            off += spec.numel();
        }
        assert_eq!(bias_ranges.len(), 6);
        let err = model_gradient_error(biased(), |g| {
            g[bias_ranges[4].clone()].iter_mut().for_each(|x| *x = 0.0);
        });
        assert!(err > 1e-3, "a missing k bias gradient is not detected: {err:e}");
        let (_, w, tokens, targets, b) = setup_model(biased());
        let with = run(&m, &w, None, &tokens, &targets, b);
        let mut w0 = w.clone();
        bias_ranges
            .iter()
            .for_each(|r| w0[r.clone()].iter_mut().for_each(|x| *x = 0.0));
        let without = run(&m, &w0, None, &tokens, &targets, b);
        assert!((with - without).abs() > 1e-4, "{with} vs {without}");
    }

    /// Query/key norms (Qwen3), with q/k/v biases before them and a window: the weights are last in
    /// the attention range, the whole-model gradient matches central differences, a dropped key-norm
    /// gradient is caught, and the norm weights change the loss.
    #[test]
    fn qk_norm_gradients_match_finite_differences() {
        let normed = || {
            let m = tiny(false, Some(3));
            Llama::new(ModelShape {
                qkv_bias: true,
                qk_norm: Some(1e-6),
                ..m.shape
            })
        };
        let m = normed();
        let names: Vec<String> = m
            .layer_params(LayerKind::Attention(0))
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names[names.len() - 3..],
            [
                "model.layers.0.self_attn.v_proj.bias",
                "model.layers.0.self_attn.q_norm.weight",
                "model.layers.0.self_attn.k_norm.weight"
            ]
        );
        let mut norm_ranges = Vec::new();
        let mut off = 0;
        for spec in m.all_params() {
            if spec.name.ends_with("_norm.weight") && spec.name.contains("self_attn") {
                assert_eq!(spec.shape, [m.shape.head_size]);
                norm_ranges.push(off..off + spec.numel());
            }
            off += spec.numel();
        }
        assert_eq!(norm_ranges.len(), 4);
        let err = model_gradient_error(normed(), |_| {});
        assert!(err < 1e-6, "relative gradient error {err:e}");
        let err = model_gradient_error(normed(), |g| {
            g[norm_ranges[3].clone()].iter_mut().for_each(|x| *x = 0.0);
        });
        assert!(err > 1e-3, "a missing k_norm gradient is not detected: {err:e}");
        let (_, w, tokens, targets, b) = setup_model(normed());
        let with = run(&m, &w, None, &tokens, &targets, b);
        let mut w2 = w.clone();
        w2[norm_ranges[1].clone()].iter_mut().for_each(|x| *x *= 1.5);
        let scaled = run(&m, &w2, None, &tokens, &targets, b);
        assert!((with - scaled).abs() > 1e-4, "{with} vs {scaled}");
    }

    /// Recomputing the MLP's activations (`recompute_level: activation`, `full`) gives the loss and every
    /// gradient bit for bit (the same kernels on the same inputs, f32 and 2 threads here), keeps
    /// `n * inter` (activation) or `3 n * inter` (full) fewer elements per MLP layer and micro-batch, and
    /// takes `2 n * inter` of scratch for `full`.
    #[test]
    fn mlp_recomputation_gives_the_same_bits_with_fewer_saved_activations() {
        let base = tiny(false, Some(3));
        let (_, w64, tokens, targets, b) = setup_model(base.clone());
        let w: Vec<f32> = w64.iter().map(|&v| v as f32).collect();
        let run32 = |m: &Llama| {
            let mut g = vec![0f32; w.len()];
            let loss = m.forward_backward_flat(&CpuKernels::new(2), &w, Some(&mut g), &tokens, &targets, b, 0.1);
            (loss.to_bits(), g.iter().map(|x| x.to_bits()).collect::<Vec<u32>>())
        };
        let reference = run32(&base);
        let (n, inter) = (b.tokens(), base.shape.inter);
        let blocks = base.shape.num_blocks;
        let all = 0..base.layers.len();
        for (level, saved_less, scratch_more) in [
            (MlpRecomputeLevel::Activation, n * inter, 0),
            (MlpRecomputeLevel::Full, 3 * n * inter, 2 * n * inter),
        ] {
            let m = Llama {
                mlp_recompute: level,
                ..base.clone()
            };
            assert!(run32(&m) == reference, "{level:?}: loss or gradients differ");
            assert_eq!(
                base.acts_elems(b, all.clone()) - m.acts_elems(b, all.clone()),
                blocks * saved_less,
                "{level:?}"
            );
            assert_eq!(m.scratch_elems(b) - base.scratch_elems(b), scratch_more, "{level:?}");
            let acts = m.alloc_acts::<f32>(b, all.clone());
            let kept: usize = acts.layers.iter().map(|l| l.proj.len() + l.inner.len()).sum();
            let base_kept: usize = base
                .alloc_acts::<f32>(b, all.clone())
                .layers
                .iter()
                .map(|l| l.proj.len() + l.inner.len())
                .sum();
            assert_eq!(base_kept - kept, blocks * saved_less, "{level:?}: allocated");
        }
    }

    /// A window covering the sequence is full causal attention, bit for bit; a shorter one changes
    /// the loss (and the finite-difference check above holds for it).
    #[test]
    fn a_window_covering_the_sequence_is_full_attention() {
        let (m, w, tokens, targets, b) = setup(false, None);
        let full = run(&m, &w, None, &tokens, &targets, b);
        for window in [b.seq, b.seq + 3] {
            let covering = run(&tiny(false, Some(window)), &w, None, &tokens, &targets, b);
            assert_eq!(covering.to_bits(), full.to_bits(), "window {window}");
        }
        let short = run(&tiny(false, Some(2)), &w, None, &tokens, &targets, b);
        assert!((short - full).abs() > 1e-6, "{short} vs {full}");
    }

    /// Tied: the table's gradient is the sum of the embedding's and the head's parts. Dropping the
    /// head's part (what a backward writing it elsewhere would leave) is caught.
    #[test]
    fn tied_gradient_check_catches_a_missing_head_contribution() {
        let (m, w, tokens, targets, b) = setup(true, None);
        assert!(m.all_params().iter().all(|p| p.name != "lm_head.weight"));
        let table = m.flat_layer_ranges()[0].clone();
        // The embedding's part alone: the same model untied, with the table copied into lm_head.
        let untied = tiny(false, None);
        let mut w2 = w.clone();
        w2.extend_from_slice(&w[table.clone()]);
        let mut g2 = vec![0.0; w2.len()];
        run(&untied, &w2, Some(&mut g2), &tokens, &targets, b);
        let embedding_only = g2[table.clone()].to_vec();
        let err = gradient_error(true, None, |g| g[table.clone()].copy_from_slice(&embedding_only));
        assert!(err > 1e-3, "missing head contribution not detected: {err:e}");
        // And the untied model with equal tables has the same loss and the tied gradient is the sum.
        let mut g = vec![0.0; w.len()];
        let tied_loss = run(&m, &w, Some(&mut g), &tokens, &targets, b);
        let untied_loss = run(&untied, &w2, None, &tokens, &targets, b);
        assert!((tied_loss - untied_loss).abs() < 1e-12);
        let head = w.len()..w2.len();
        for (i, j) in table.zip(head) {
            assert!((g[i] - (g2[i] + g2[j])).abs() < 1e-12, "element {i}");
        }
    }

    #[test]
    fn whole_model_gradient_check_catches_a_broken_backward() {
        // Scale one tensor's gradient by 0.9, as a backward with a wrong factor would.
        let (m, ..) = setup(false, None);
        let mut range = 0..0;
        let mut off = 0;
        for spec in m.all_params() {
            if spec.name.ends_with("layers.1.self_attn.o_proj.weight") {
                range = off..off + spec.numel();
            }
            off += spec.numel();
        }
        let err = gradient_error(false, None, |g| g[range.clone()].iter_mut().for_each(|x| *x *= 0.9));
        assert!(err > 1e-6, "broken gradient not detected: {err:e}");
    }
}
