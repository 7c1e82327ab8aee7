//! [`DirectKernels`]: the [`Kernels`] trait (f32, or bf16 compute with f32 master) run on a GPU in place, over buffers the device can
//! address at their host addresses (CUDA managed memory on a real GPU, the heap on the emulator).
//!
//! This is how the multi-stage engine trains on a GPU: its shards, weight and grad buffers,
//! activations and rotary tables come from [`Kernels::memory`], so every slice the model passes is a
//! device pointer as is. Kernels are queued on the device's stream and return at once; the engine calls
//! [`Kernels::synchronize`] before the host touches buffers (communication, data loading, the
//! optimizer's end), and the kernels that return a value (loss, sum of squares) wait for it.
//! Attention is fused ([`Kernels::fused_attention`]): the forward saves one log-sum-exp per row.

use super::ops::{AdamStep, AttentionKernels, AttnDims, CudaKernels};
use super::{DType, DevView, Gpu, GpuError};
use crate::backend::mem::Memory;
use crate::backend::{bf16, Element, Kernels};
use std::sync::Arc;

/// A compute type the device kernels take (its master type is f32).
pub trait DevElement: Element<Master = f32> {
    /// The device element type.
    const DTYPE: DType;
}
impl DevElement for f32 {
    const DTYPE: DType = DType::F32;
}
impl DevElement for bf16 {
    const DTYPE: DType = DType::Bf16;
}

/// Kernels on a GPU over device-addressable host slices.
pub struct DirectKernels {
    kernels: CudaKernels,
    memory: Arc<dyn Memory>,
}

fn view<T: DevElement>(s: &[T]) -> DevView {
    DevView {
        ptr: s.as_ptr() as u64,
        len: s.len(),
        dtype: T::DTYPE,
    }
}

fn master(s: &[f32]) -> DevView {
    view(s)
}

fn view_u32(s: &[u32]) -> DevView {
    DevView {
        ptr: s.as_ptr() as u64,
        len: s.len(),
        dtype: DType::F32,
    }
}

fn ok<T>(r: Result<T, GpuError>, what: &str) -> T {
    // A failed launch leaves the step undefined: stop this rank with the device's message (the engine
    // turns a rank's panic into an error naming it).
    r.unwrap_or_else(|e| panic!("cuda {what}: {e}"))
}

impl DirectKernels {
    /// Kernels on `gpu`, whose buffers come from `memory` (which must be addressable by `gpu`), with
    /// attention kernel family `attention`.
    pub fn new(gpu: Arc<dyn Gpu>, memory: Arc<dyn Memory>, attention: AttentionKernels) -> Self {
        Self {
            kernels: CudaKernels::new(gpu).with_attention(attention),
            memory,
        }
    }

    /// The launchers.
    pub fn kernels(&self) -> &CudaKernels {
        &self.kernels
    }

    /// `c (m,n) (+)= op(a) @ op(b)`, `c` of any element type (activations or master gradients).
    #[allow(clippy::too_many_arguments)]
    fn gemm<T: DevElement>(
        &self,
        c: DevView,
        a: &[T],
        b: &[T],
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) {
        let r = self.kernels.matmul(
            c.slice(0..m * n),
            view(&a[..m * k]),
            view(&b[..k * n]),
            m,
            n,
            k,
            trans_a,
            trans_b,
            accumulate,
        );
        ok(r, "matmul");
    }
}

impl<T: DevElement> Kernels<T> for DirectKernels {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn memory(&self) -> Arc<dyn Memory> {
        self.memory.clone()
    }

    fn fused_attention(&self) -> bool {
        true
    }

    fn synchronize(&self) {
        ok(self.kernels.gpu().synchronize(), "synchronize");
    }

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
    ) {
        self.gemm(view(c), a, b, m, n, k, trans_a, trans_b, accumulate);
    }

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
        let r = self.kernels.matmul_residual(
            view(&out[..m * n]),
            view(&residual[..m * n]),
            view(&a[..m * k]),
            view(&b[..k * n]),
            m,
            n,
            k,
            trans_a,
            trans_b,
        );
        ok(r, "matmul_residual");
    }

    fn matmul_acc_master(
        &self,
        c: &mut [f32],
        a: &[T],
        b: &[T],
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
    ) {
        self.gemm(master(c), a, b, m, n, k, trans_a, trans_b, true);
    }

    fn cast_from_master(&self, out: &mut [T], x: &[f32]) {
        ok(self.kernels.cast(view(out), master(x)), "cast_from_master");
    }

    fn zero_master(&self, x: &mut [f32]) {
        // SAFETY: `x` is device-addressable memory of `len` f32 (the engine allocates it from
        // `Kernels::memory`).
        ok(
            unsafe { self.kernels.gpu().memset_zero(x.as_ptr() as u64, x.len() * 4) },
            "zero",
        );
    }

    fn embedding_forward(&self, out: &mut [T], tokens: &[u32], table: &[T], hidden: usize) {
        let vocab = table.len() / hidden.max(1);
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            panic!("embedding: token {t} out of range (vocab {vocab})");
        }
        ok(
            self.kernels
                .embedding_forward(view(out), view_u32(tokens), view(table), hidden),
            "embedding_forward",
        );
    }

    fn embedding_backward(&self, grad_table: &mut [f32], tokens: &[u32], grad_out: &[T], hidden: usize) {
        ok(
            self.kernels
                .embedding_backward(master(grad_table), tokens, view_u32(tokens), view(grad_out), hidden),
            "embedding_backward",
        );
    }

    fn rms_norm_forward(&self, out: &mut [T], rstd: &mut [f32], x: &[T], weight: &[T], hidden: usize, eps: f32) {
        ok(
            self.kernels
                .rms_norm_forward(view(out), master(rstd), view(x), view(weight), hidden, eps),
            "rms_norm_forward",
        );
    }

    fn rms_norm_backward(
        &self,
        grad_x: &mut [T],
        grad_weight: &mut [f32],
        grad_out: &[T],
        x: &[T],
        weight: &[T],
        rstd: &[f32],
        hidden: usize,
        accumulate: bool,
    ) {
        ok(
            self.kernels.rms_norm_backward(
                view(grad_x),
                master(grad_weight),
                view(grad_out),
                view(x),
                view(weight),
                master(rstd),
                hidden,
                accumulate,
            ),
            "rms_norm_backward",
        );
    }

    fn head_norm_forward(
        &self,
        x: &mut [T],
        hat: &mut [T],
        rstd: &mut [f32],
        weight: &[T],
        row_stride: usize,
        num_heads: usize,
        split: usize,
        head_size: usize,
        eps: f32,
    ) {
        ok(
            self.kernels.head_norm_forward(
                view(x),
                view(hat),
                master(rstd),
                view(weight),
                row_stride,
                num_heads,
                split,
                head_size,
                eps,
            ),
            "head_norm_forward",
        );
    }

    fn head_norm_backward(
        &self,
        grad: &mut [T],
        grad_weight: &mut [f32],
        hat: &[T],
        weight: &[T],
        rstd: &[f32],
        row_stride: usize,
        num_heads: usize,
        split: usize,
        head_size: usize,
    ) {
        ok(
            self.kernels.head_norm_backward(
                view(grad),
                master(grad_weight),
                view(hat),
                view(weight),
                master(rstd),
                row_stride,
                num_heads,
                split,
                head_size,
            ),
            "head_norm_backward",
        );
    }

    fn rotary(
        &self,
        x: &mut [T],
        row_stride: usize,
        num_heads: usize,
        head_size: usize,
        seq: usize,
        cos: &[f32],
        sin: &[f32],
        inverse: bool,
    ) {
        ok(
            self.kernels.rotary(
                view(x),
                row_stride,
                num_heads,
                head_size,
                seq,
                master(cos),
                master(sin),
                inverse,
            ),
            "rotary",
        );
    }

    fn attention_forward(
        &self,
        out: &mut [T],
        probs: &mut [f32],
        qkv: &[T],
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_size: usize,
        window: Option<usize>,
    ) {
        let d = AttnDims {
            batch,
            seq,
            heads,
            kv_heads,
            head_size,
            window,
        };
        ok(
            self.kernels
                .attention_forward(view(out), master(&probs[..d.lse_len()]), view(qkv), d),
            "attention_forward",
        );
    }

    fn attention_backward(
        &self,
        grad_qkv: &mut [T],
        scratch: &mut [f32],
        grad_out: &[T],
        out: &[T],
        qkv: &[T],
        probs: &[f32],
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_size: usize,
        window: Option<usize>,
    ) {
        let d = AttnDims {
            batch,
            seq,
            heads,
            kv_heads,
            head_size,
            window,
        };
        ok(
            self.kernels.attention_backward(
                view(grad_qkv),
                master(&scratch[..d.lse_len()]),
                view(grad_out),
                view(out),
                view(qkv),
                master(&probs[..d.lse_len()]),
                d,
            ),
            "attention_backward",
        );
    }

    fn swiglu_forward(&self, out: &mut [T], gate_up: &[T], inter: usize) {
        ok(
            self.kernels.swiglu_forward(view(out), view(gate_up), inter),
            "swiglu_forward",
        );
    }

    fn swiglu_backward(&self, grad_gate_up: &mut [T], grad_out: &[T], gate_up: &[T], inter: usize) {
        ok(
            self.kernels
                .swiglu_backward(view(grad_gate_up), view(grad_out), view(gate_up), inter),
            "swiglu_backward",
        );
    }

    fn cross_entropy(&self, logits: &mut [T], targets: &[u32], vocab: usize, grad_scale: Option<f32>) -> f64 {
        let n = targets.len();
        // The per-row losses go to the launchers' scratch.
        let r = self.kernels.with_scratch(n, |rows| {
            self.kernels
                .cross_entropy(view(&logits[..n * vocab]), rows, view_u32(targets), vocab, grad_scale)
        });
        ok(r, "cross_entropy")
    }

    fn adamw(
        &self,
        w: &mut [f32],
        grad: &[f32],
        exp_avg: &mut [f32],
        exp_avg_sq: &mut [f32],
        out: Option<&mut [T]>,
        lr: f32,
        beta_1: f32,
        beta_2: f32,
        epsilon: f32,
        weight_decay: f32,
        grad_scale: f32,
        step: u64,
    ) {
        let p = AdamStep {
            lr,
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            grad_scale,
            step,
        };
        // A bf16 copy comes from the same kernel; an f32 one is a plain copy of the master after it.
        let (fused, copy) = match out {
            Some(o) if T::DTYPE == DType::Bf16 => (Some(view(o)), None),
            o => (None, o),
        };
        ok(
            self.kernels
                .adamw(master(w), master(grad), master(exp_avg), master(exp_avg_sq), fused, p),
            "adamw",
        );
        if let Some(out) = copy {
            self.cast_from_master(out, w);
        }
    }

    fn copy(&self, out: &mut [T], x: &[T]) {
        assert_eq!(out.len(), x.len(), "copy: shapes");
        ok(self.kernels.cast(view(out), view(x)), "copy");
    }

    fn sum_squares(&self, x: &[f32]) -> f64 {
        ok(self.kernels.sum_squares(master(x)), "sum_squares")
    }

    fn sum_squares_many(&self, xs: &[&[f32]]) -> Vec<f64> {
        let views: Vec<DevView> = xs.iter().map(|x| master(x)).collect();
        ok(self.kernels.sum_squares_many(&views), "sum_squares")
    }
}
