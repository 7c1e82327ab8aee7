//! Compute backends: the kernels the model calls, behind one narrow trait.
//!
//! Every kernel works on flat row-major slices of an [`Element`] type: parameters are views into a stage's flat weight
//! buffer, gradients views into its grad buffer, activations views into a per-stage workspace. Kernels
//! never allocate in the training step (callers pass any scratch they need) and never keep state.
//!
//! Shapes are written in each method's doc comment as `(rows, cols)`; `n` is the number of tokens in a
//! micro-batch (`batch * seq`), `c` the hidden size.
//!
//! Determinism: for fixed inputs every kernel returns bitwise identical results whatever the thread
//! count, so that the engine's parity guarantees (DESIGN.md) hold across layouts.

pub mod cpu;
pub mod cuda;
pub mod mem;
pub mod profile;

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// Keys a query attends under the sliding window `window` ([`Kernels::attention_forward`]) in sequences
/// of `seq`, itself included: the window, or the whole sequence without one (or with a longer one).
pub fn attended_keys(window: Option<usize>, seq: usize) -> usize {
    window.map_or(seq, |w| w.min(seq))
}

/// First key query `i` attends under the sliding window `window` (0 without one).
pub fn first_attended_key(i: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (i + 1).saturating_sub(w))
}

/// A floating-point element type the kernels run on: `f32` for training, `f64` for gradient checks,
/// `bf16` for mixed-precision training on a GPU (weights and activations in bf16, everything else in
/// its [`Element::Master`] type, f32).
pub trait Element:
    mem::Pod
    + Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// The full-precision type paired with this compute type: master weights, gradients, optimizer
    /// state and the statistics kernels save for the backward (RMSNorm `rstd`, attention log-sum-exp,
    /// rotary tables). `f32` and `f64` are their own master type; `bf16`'s is `f32`.
    type Master: Element<Master = Self::Master>;
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Conversion from f64 (rounding).
    fn from_f64(x: f64) -> Self;
    /// Conversion to f64 (exact).
    fn to_f64(self) -> f64;
    /// e^x.
    fn exp(self) -> Self;
    /// Natural log.
    fn ln(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Larger of two.
    fn max(self, other: Self) -> Self;
}

macro_rules! impl_element {
    ($t:ty) => {
        impl Element for $t {
            type Master = $t;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
impl_element!(f32);
impl_element!(f64);

/// bf16 for device buffers. Host arithmetic on it (rarely needed) goes through f32.
pub use half::bf16;

impl Element for bf16 {
    type Master = f32;
    const ZERO: Self = bf16::ZERO;
    const ONE: Self = bf16::ONE;
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    fn exp(self) -> Self {
        bf16::from_f32(self.to_f32().exp())
    }
    fn ln(self) -> Self {
        bf16::from_f32(self.to_f32().ln())
    }
    fn sqrt(self) -> Self {
        bf16::from_f32(self.to_f32().sqrt())
    }
    fn max(self, other: Self) -> Self {
        bf16::max(self, other)
    }
}

/// The kernels of a Llama decoder, forward and backward, on element type `T` (`f32` in training,
/// `f64` in gradient checks).
pub trait Kernels<T: Element>: Send + Sync {
    /// Short name for logs ("cpu").
    fn name(&self) -> &'static str;

    /// Where buffers these kernels touch must be allocated (the heap for the CPU; CUDA managed
    /// memory for a GPU, so host and device share the addresses).
    fn memory(&self) -> std::sync::Arc<dyn mem::Memory> {
        mem::host()
    }

    /// True when [`Kernels::attention_forward`] is fused (flash-style): it saves one log-sum-exp per
    /// row `(batch, heads, seq)` in `probs` instead of the softmax matrix, and
    /// [`Kernels::attention_backward`] reads them from there and needs only `batch * heads * seq`
    /// scratch elements. [`crate::model::Llama::fused_attention`] must agree.
    fn fused_attention(&self) -> bool {
        false
    }

    /// Wait until every kernel submitted so far has finished, so the host may read or write the
    /// memory they touch. Kernels that return a value (loss, sum of squares) synchronize themselves.
    /// A no-op for synchronous backends.
    fn synchronize(&self) {}

    /// `c (m,n) = op(a) @ op(b)`, or `c += op(a) @ op(b)` when `accumulate`.
    /// `a` is stored `(m,k)` row-major, or `(k,m)` when `trans_a`; `b` is `(k,n)`, or `(n,k)` when `trans_b`.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        c: &mut [T],
        a: &[T],
        b: &[T],
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    );

    /// `out (m,n) = residual + op(a) @ op(b)`: a residual block's output, its input plus its output
    /// product (operands as in [`Kernels::matmul`]; `out` and `residual` do not overlap). The same
    /// values as copying the residual into `out` and accumulating the product into it, which is what
    /// this default does; a device does it in one product that reads the residual where it is.
    #[allow(clippy::too_many_arguments)]
    fn matmul_residual(
        &self,
        out: &mut [T],
        residual: &[T],
        a: &[T],
        b: &[T],
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
    ) {
        self.copy(out, residual);
        self.matmul(out, a, b, m, n, k, trans_a, trans_b, true);
    }
    /// `out (n,c) = table[tokens]`, with `table (vocab,c)`.
    fn embedding_forward(&self, out: &mut [T], tokens: &[u32], table: &[T], hidden: usize);

    /// `c (m,n) += op(a) @ op(b)` into a master-precision `c` (weight gradients: fp32 grad buffers
    /// accumulate bf16 products). Operands as in [`Kernels::matmul`].
    #[allow(clippy::too_many_arguments)]
    fn matmul_acc_master(
        &self,
        c: &mut [T::Master],
        a: &[T],
        b: &[T],
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
    );

    /// `out = x` rounded to the compute type (the compute copy of master weights).
    fn cast_from_master(&self, out: &mut [T], x: &[T::Master]);

    /// `grad_table[tokens[i]] += grad_out[i]` (accumulates), `grad_out (n,c)`.
    fn embedding_backward(&self, grad_table: &mut [T::Master], tokens: &[u32], grad_out: &[T], hidden: usize);

    /// RMSNorm: `out (n,c) = x / rms(x) * weight`, `rstd (n) = 1/sqrt(mean(x^2) + eps)` (saved for backward).
    fn rms_norm_forward(
        &self,
        out: &mut [T],
        rstd: &mut [T::Master],
        x: &[T],
        weight: &[T],
        hidden: usize,
        eps: T::Master,
    );

    /// RMSNorm backward: writes `grad_x (n,c)`, or adds to it when `accumulate` (a pre-norm block's
    /// input gradient: the residual stream's gradient plus the norm's, in one pass; each element is
    /// the input gradient computed as when writing, then added); accumulates `grad_weight (c) +=`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward(
        &self,
        grad_x: &mut [T],
        grad_weight: &mut [T::Master],
        grad_out: &[T],
        x: &[T],
        weight: &[T],
        rstd: &[T::Master],
        hidden: usize,
        accumulate: bool,
    );

    /// Per-head RMSNorm in place (query/key norms, Qwen3): `x` holds `n` rows of `row_stride` values;
    /// head `h < num_heads` of each row (values `h*head_size ..`) becomes `hat * w` where
    /// `hat = head / rms(head)` and `w` is row 0 of `weight (2, head_size)` for `h < split` (queries),
    /// row 1 otherwise (keys). Saves `hat (n, num_heads, head_size)` and
    /// `rstd (n, num_heads) = 1/sqrt(mean(head^2) + eps)` for the backward.
    #[allow(clippy::too_many_arguments)]
    fn head_norm_forward(
        &self,
        x: &mut [T],
        hat: &mut [T],
        rstd: &mut [T::Master],
        weight: &[T],
        row_stride: usize,
        num_heads: usize,
        split: usize,
        head_size: usize,
        eps: T::Master,
    );

    /// Backward of [`Kernels::head_norm_forward`] in place: `grad` (same layout as its `x`) holds the
    /// output's gradient on entry and the input's on exit (`r * (w*g - hat * mean(w*g*hat))`, other
    /// values untouched); accumulates `grad_weight (2, head_size) += sum of g * hat` over the rows and
    /// the heads of each weight row.
    #[allow(clippy::too_many_arguments)]
    fn head_norm_backward(
        &self,
        grad: &mut [T],
        grad_weight: &mut [T::Master],
        hat: &[T],
        weight: &[T],
        rstd: &[T::Master],
        row_stride: usize,
        num_heads: usize,
        split: usize,
        head_size: usize,
    );

    /// Rotary embedding in place, HuggingFace Llama convention (rotate-half: element `i` pairs with
    /// `i + head_size/2`). `x` holds `n` rows of `row_stride` floats; the first `num_heads * head_size`
    /// of each row are rotated, head by head. Row `i` is at position `i % seq`. `cos`, `sin` are
    /// `(seq, head_size/2)`. With `inverse` the rotation is by `-angle` (the backward of the forward).
    #[allow(clippy::too_many_arguments)]
    fn rotary(
        &self,
        x: &mut [T],
        row_stride: usize,
        num_heads: usize,
        head_size: usize,
        seq: usize,
        cos: &[T::Master],
        sin: &[T::Master],
        inverse: bool,
    );

    /// Causal self-attention with grouped KV heads.
    /// `qkv (batch*seq, (heads + 2*kv_heads) * head_size)`: each row is `[q heads | k heads | v heads]`;
    /// query head `h` uses kv head `h / (heads / kv_heads)`. Scale `1/sqrt(head_size)`.
    /// `window: Some(w)` (sliding window, Fast-LLM's `window_size`): query `i` attends keys
    /// `i - w < j <= i` (flash-attn's window `(w - 1, 0)`); `None`: every key `j <= i`.
    /// Writes `out (batch*seq, heads*head_size)` and saves the softmax `probs (batch, heads, seq, seq)`
    /// (the log-sum-exp `(batch, heads, seq)` when [`Kernels::fused_attention`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut [T],
        probs: &mut [T::Master],
        qkv: &[T],
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_size: usize,
        window: Option<usize>,
    );

    /// Backward of [`Kernels::attention_forward`]: writes (overwrites) `grad_qkv` (same shape as `qkv`).
    /// `out` is the forward's output; `scratch` holds at least `batch * heads * seq * seq` elements
    /// (`batch * heads * seq` when fused).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        grad_qkv: &mut [T],
        scratch: &mut [T::Master],
        grad_out: &[T],
        out: &[T],
        qkv: &[T],
        probs: &[T::Master],
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_size: usize,
        window: Option<usize>,
    );

    /// SwiGLU: `gate_up (n, 2*inter)` rows are `[gate | up]`; `out (n, inter) = silu(gate) * up`.
    fn swiglu_forward(&self, out: &mut [T], gate_up: &[T], inter: usize);

    /// SwiGLU backward: writes `grad_gate_up (n, 2*inter)`.
    fn swiglu_backward(&self, grad_gate_up: &mut [T], grad_out: &[T], gate_up: &[T], inter: usize);

    /// Softmax cross-entropy over `logits (n, vocab)` against `targets (n)`.
    /// Returns the *sum* of the per-token losses (natural log), accumulated in f64 in row order.
    /// When `grad_scale` is `Some(s)`, overwrites `logits` with `s * (softmax - onehot)`;
    /// when `None`, `logits` may be left modified (scratch) and no gradient is produced.
    fn cross_entropy(&self, logits: &mut [T], targets: &[u32], vocab: usize, grad_scale: Option<T::Master>) -> f64;

    /// AdamW (decoupled weight decay, PyTorch semantics) on one contiguous range of master weights:
    /// `w -= lr*wd*w; m = b1*m + (1-b1)*g*gs; v = b2*v + (1-b2)*(g*gs)^2;`
    /// `w -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)` where `gs` = `grad_scale` (clipping factor)
    /// and `t` = `step` (1-based). With `out` (`w`'s length), then `out = w` rounded to the compute
    /// type: the copy a restore would cast into the weight buffer, made while `w` is at hand (a device
    /// does both in one pass).
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        w: &mut [T::Master],
        grad: &[T::Master],
        exp_avg: &mut [T::Master],
        exp_avg_sq: &mut [T::Master],
        out: Option<&mut [T]>,
        lr: T::Master,
        beta_1: T::Master,
        beta_2: T::Master,
        epsilon: T::Master,
        weight_decay: T::Master,
        grad_scale: T::Master,
        step: u64,
    );

    /// `x = 0` on master-precision data (a grad buffer after its reduce).
    fn zero_master(&self, x: &mut [T::Master]) {
        x.fill(T::Master::ZERO);
    }

    /// `out = x`, in stream order on a device: a host copy there would race with the kernels still
    /// writing `x` (the default [`Kernels::matmul_residual`] copies its residual with it).
    fn copy(&self, out: &mut [T], x: &[T]) {
        out.copy_from_slice(x);
    }

    /// Sum of squares, accumulated in f64 in a fixed order (gradient norm).
    fn sum_squares(&self, x: &[T::Master]) -> f64;

    /// [`Kernels::sum_squares`] of each slice (a device waits once for all of them).
    fn sum_squares_many(&self, xs: &[&[T::Master]]) -> Vec<f64> {
        xs.iter().map(|x| self.sum_squares(x)).collect()
    }
}
