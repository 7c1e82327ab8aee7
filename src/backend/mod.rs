//! Compute backends: the kernels the model calls, behind one narrow trait.
//!
//! Every kernel works on flat row-major `f32` slices: parameters are views into a stage's flat weight
//! buffer, gradients views into its grad buffer, activations views into a per-stage workspace. Kernels
//! never allocate in the training step (callers pass any scratch they need) and never keep state.
//!
//! Shapes are written in each method's doc comment as `(rows, cols)`; `n` is the number of tokens in a
//! micro-batch (`batch * seq`), `c` the hidden size.
//!
//! Determinism: for fixed inputs every kernel returns bitwise identical results whatever the thread
//! count, so that the engine's parity guarantees (DESIGN.md) hold across layouts.

pub mod cpu;

/// The kernels of a Llama decoder, forward and backward, on `f32`.
pub trait Kernels: Send + Sync {
    /// Short name for logs ("cpu").
    fn name(&self) -> &'static str;

    /// `c (m,n) = op(a) @ op(b)`, or `c += op(a) @ op(b)` when `accumulate`.
    /// `a` is stored `(m,k)` row-major, or `(k,m)` when `trans_a`; `b` is `(k,n)`, or `(n,k)` when `trans_b`.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        c: &mut [f32],
        a: &[f32],
        b: &[f32],
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    );

    /// `out (n,c) = table[tokens]`, with `table (vocab,c)`.
    fn embedding_forward(&self, out: &mut [f32], tokens: &[u32], table: &[f32], hidden: usize);

    /// `grad_table[tokens[i]] += grad_out[i]` (accumulates), `grad_out (n,c)`.
    fn embedding_backward(&self, grad_table: &mut [f32], tokens: &[u32], grad_out: &[f32], hidden: usize);

    /// RMSNorm: `out (n,c) = x / rms(x) * weight`, `rstd (n) = 1/sqrt(mean(x^2) + eps)` (saved for backward).
    fn rms_norm_forward(
        &self,
        out: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        weight: &[f32],
        hidden: usize,
        eps: f32,
    );

    /// RMSNorm backward: writes `grad_x (n,c)`, accumulates `grad_weight (c) +=`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward(
        &self,
        grad_x: &mut [f32],
        grad_weight: &mut [f32],
        grad_out: &[f32],
        x: &[f32],
        weight: &[f32],
        rstd: &[f32],
        hidden: usize,
    );

    /// Rotary embedding in place, HuggingFace Llama convention (rotate-half: element `i` pairs with
    /// `i + head_size/2`). `x` holds `n` rows of `row_stride` floats; the first `num_heads * head_size`
    /// of each row are rotated, head by head. Row `i` is at position `i % seq`. `cos`, `sin` are
    /// `(seq, head_size/2)`. With `inverse` the rotation is by `-angle` (the backward of the forward).
    #[allow(clippy::too_many_arguments)]
    fn rotary(
        &self,
        x: &mut [f32],
        row_stride: usize,
        num_heads: usize,
        head_size: usize,
        seq: usize,
        cos: &[f32],
        sin: &[f32],
        inverse: bool,
    );

    /// Causal self-attention with grouped KV heads.
    /// `qkv (batch*seq, (heads + 2*kv_heads) * head_size)`: each row is `[q heads | k heads | v heads]`;
    /// query head `h` uses kv head `h / (heads / kv_heads)`. Scale `1/sqrt(head_size)`.
    /// Writes `out (batch*seq, heads*head_size)` and saves the softmax `probs (batch, heads, seq, seq)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut [f32],
        probs: &mut [f32],
        qkv: &[f32],
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_size: usize,
    );

    /// Backward of [`Kernels::attention_forward`]: writes (overwrites) `grad_qkv` (same shape as `qkv`).
    /// `scratch` holds at least `batch * heads * seq * seq` floats.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        grad_qkv: &mut [f32],
        scratch: &mut [f32],
        grad_out: &[f32],
        qkv: &[f32],
        probs: &[f32],
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_size: usize,
    );

    /// SwiGLU: `gate_up (n, 2*inter)` rows are `[gate | up]`; `out (n, inter) = silu(gate) * up`.
    fn swiglu_forward(&self, out: &mut [f32], gate_up: &[f32], inter: usize);

    /// SwiGLU backward: writes `grad_gate_up (n, 2*inter)`.
    fn swiglu_backward(&self, grad_gate_up: &mut [f32], grad_out: &[f32], gate_up: &[f32], inter: usize);

    /// Softmax cross-entropy over `logits (n, vocab)` against `targets (n)`.
    /// Returns the *sum* of the per-token losses (natural log), accumulated in f64 in row order.
    /// When `grad_scale` is `Some(s)`, overwrites `logits` with `s * (softmax - onehot)`;
    /// when `None`, `logits` may be left modified (scratch) and no gradient is produced.
    fn cross_entropy(&self, logits: &mut [f32], targets: &[u32], vocab: usize, grad_scale: Option<f32>) -> f64;

    /// AdamW (decoupled weight decay, PyTorch semantics) on one contiguous range:
    /// `w -= lr*wd*w; m = b1*m + (1-b1)*g*gs; v = b2*v + (1-b2)*(g*gs)^2;`
    /// `w -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)` where `gs` = `grad_scale` (clipping factor)
    /// and `t` = `step` (1-based).
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        w: &mut [f32],
        grad: &[f32],
        exp_avg: &mut [f32],
        exp_avg_sq: &mut [f32],
        lr: f32,
        beta_1: f32,
        beta_2: f32,
        epsilon: f32,
        weight_decay: f32,
        grad_scale: f32,
        step: u64,
    );

    /// `out += x` elementwise (residual connections).
    fn add_assign(&self, out: &mut [f32], x: &[f32]);

    /// Sum of squares, accumulated in f64 in a fixed order (gradient norm).
    fn sum_squares(&self, x: &[f32]) -> f64;
}
