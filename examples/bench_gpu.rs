//! GPU benchmark: matrix-product throughput, per-kernel times and end-to-end training (tokens/s, MFU,
//! memory) of the CUDA backend. Prints figures only (no pass/fail); `scripts/gpu_check.sh` runs it.
//!
//! ```text
//! bench_gpu [SECTION...] [--tiny] [--dtype f32|bf16] [--peak FLOP/s]
//!   gemm                     cuBLASLt products at llama-1b shapes (f32 and bf16), TFLOP/s
//!   ops                      the other kernels at llama-1b shapes (f32 and bf16): ms, GB/s or TFLOP/s
//!   kernels                  gemm + ops
//!   train MODEL [STEPS]      train llama-125m (default 20 steps) or llama-1b (default 10) with use_cuda
//!   ranks [STEPS]            llama-125m on 2 ranks sharing the GPU vs 1 rank: per-step losses compared
//!   all                      kernels, train llama-125m 20, train llama-1b 10, ranks 4
//! ```
//!
//! `--dtype` is the training compute type (default bf16; when `train()` refuses bf16 on the GPU the run
//! falls back to float32 and says so). `--peak` (or `PEAK_FLOPS`) is the bf16 dense peak for MFU,
//! default 989e12 (H200 and H100 SXM). With `FAST_LLM_RS_GPU=emulator` (or `--tiny`) every section uses
//! tiny shapes, so the program can be checked on a machine without a GPU.
//!
//! MFU = tokens/s x (6 x parameters + 12 x layers x hidden x sequence) / peak. Each section is bounded
//! in time (adaptive repetitions) and prints as it goes. Training reads
//! `examples/data/tinyshakespeare.txt` (byte tokens, valid for any vocabulary of at least 256) from the
//! working directory, else from the source tree.

use fast_llm_rs::backend::cuda::ops::{AdamStep, AttentionKernels, AttnDims, CudaKernels};
use fast_llm_rs::backend::cuda::{read_f32, DType, DevBuf, Device, GpuError};
use fast_llm_rs::config::{load_config_str, ComputeDtype, TrainConfig};
use fast_llm_rs::model::{Llama, ModelShape};
use fast_llm_rs::train::{train, TrainOptions, TrainSummary};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Kernel-benchmark shapes.
#[derive(Clone, Copy)]
struct Shapes {
    tokens: usize,
    hidden: usize,
    heads: usize,
    head_size: usize,
    inter: usize,
    vocab: usize,
    seq: usize,
    adam: usize,
}

/// llama-1b: 8 sequences of 2048 tokens.
const FULL: Shapes = Shapes {
    tokens: 16384,
    hidden: 2048,
    heads: 16,
    head_size: 128,
    inter: 5632,
    vocab: 32000,
    seq: 2048,
    adam: 1 << 28,
};

const TINY: Shapes = Shapes {
    tokens: 128,
    hidden: 64,
    heads: 2,
    head_size: 32,
    inter: 96,
    vocab: 320,
    seq: 64,
    adam: 1 << 14,
};

/// A model to train.
#[derive(Clone, Copy)]
struct Preset {
    name: &'static str,
    hidden: usize,
    blocks: usize,
    heads: usize,
    head_size: usize,
    inter: usize,
    vocab: usize,
    seq: usize,
    /// Sequences per micro-batch.
    seqs: usize,
    /// PyTorch eager tokens/s on the same model (for comparison), if measured.
    torch: Option<f64>,
}

const LLAMA_125M: Preset = Preset {
    name: "llama-125m",
    hidden: 768,
    blocks: 12,
    heads: 12,
    head_size: 64,
    inter: 2048,
    vocab: 32000,
    seq: 1024,
    seqs: 16,
    torch: Some(228_500.0),
};

const LLAMA_1B: Preset = Preset {
    name: "llama-1b",
    hidden: 2048,
    blocks: 16,
    heads: 16,
    head_size: 128,
    inter: 5632,
    vocab: 32000,
    seq: 2048,
    seqs: 8,
    torch: Some(56_400.0),
};

/// What both presets become on the emulator.
fn tiny_preset(name: &'static str) -> Preset {
    Preset {
        name,
        hidden: 64,
        blocks: 2,
        heads: 2,
        head_size: 32,
        inter: 96,
        vocab: 320,
        seq: 64,
        seqs: 2,
        torch: None,
    }
}

struct Ctx {
    dev: Device,
    k: CudaKernels,
    tiny: bool,
    dtype: ComputeDtype,
    peak: f64,
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |args: &mut Vec<String>, name: &str| -> Option<String> {
        let i = args.iter().position(|a| a == name)?;
        args.remove(i);
        (i < args.len()).then(|| args.remove(i))
    };
    let dtype = match flag(&mut args, "--dtype").as_deref() {
        None | Some("bf16") | Some("bfloat16") => ComputeDtype::Bfloat16,
        Some("f32") | Some("float32") => ComputeDtype::Float32,
        Some(o) => anyhow::bail!("--dtype {o}: use f32 or bf16"),
    };
    let peak: f64 = match flag(&mut args, "--peak").or_else(|| std::env::var("PEAK_FLOPS").ok()) {
        Some(p) => p.parse().map_err(|e| anyhow::anyhow!("peak FLOP/s {p}: {e}"))?,
        None => 989e12,
    };
    let emulated = std::env::var("FAST_LLM_RS_GPU").as_deref() == Ok("emulator");
    let tiny = emulated || args.iter().any(|a| a == "--tiny");
    args.retain(|a| a != "--tiny");
    if args.is_empty() {
        args.push("all".into());
    }

    let t = Instant::now();
    let dev = Device::open(0).map_err(|e| anyhow::anyhow!("opening GPU 0: {e}"))?;
    println!(
        "device: {} (opened and kernels compiled in {:.2} s){}",
        dev.gpu.describe(),
        t.elapsed().as_secs_f64(),
        if tiny { "; tiny shapes" } else { "" }
    );
    let ctx = Ctx {
        k: CudaKernels::new(dev.gpu.clone()),
        dev,
        tiny,
        dtype,
        peak,
    };

    let mut i = 0;
    while i < args.len() {
        let num = |j: usize| args.get(j).and_then(|s| s.parse::<u64>().ok());
        match args[i].as_str() {
            "gemm" => gemm(&ctx)?,
            "ops" => ops(&ctx)?,
            "kernels" => {
                gemm(&ctx)?;
                ops(&ctx)?;
            }
            "train" => {
                let name = args.get(i + 1).map(String::as_str).unwrap_or("llama-125m");
                let preset = match name {
                    "llama-125m" => LLAMA_125M,
                    "llama-1b" => LLAMA_1B,
                    o => anyhow::bail!("train {o}: models are llama-125m and llama-1b"),
                };
                i += 1;
                let steps = num(i + 1).inspect(|_| i += 1);
                let default = if preset.name == "llama-1b" { 10 } else { 20 };
                train_section(&ctx, preset, steps.unwrap_or(default))?;
            }
            "ranks" => {
                let steps = num(i + 1).inspect(|_| i += 1);
                ranks_section(&ctx, steps.unwrap_or(4))?;
            }
            "all" => {
                gemm(&ctx)?;
                ops(&ctx)?;
                train_section(&ctx, LLAMA_125M, 20)?;
                train_section(&ctx, LLAMA_1B, 10)?;
                ranks_section(&ctx, 4)?;
            }
            o => anyhow::bail!("unknown section {o}: gemm, ops, kernels, train MODEL [STEPS], ranks [STEPS], all"),
        }
        i += 1;
    }
    Ok(())
}

fn header(s: &str) {
    println!("\n== {s}");
}

/// Seconds per call of `f`: a warm-up call (and, when that was quick, one more timed call to size the
/// run), then as many calls as fit in `budget` seconds (1..=200), timed together between device
/// synchronizations. A slow kernel costs 2 calls.
fn time_calls(ctx: &Ctx, budget: f64, mut f: impl FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
    let t = Instant::now();
    f()?;
    ctx.dev.gpu.synchronize()?;
    let mut once = t.elapsed().as_secs_f64();
    if once < budget / 4.0 {
        let t = Instant::now();
        f()?;
        ctx.dev.gpu.synchronize()?;
        once = t.elapsed().as_secs_f64();
    }
    let reps = ((budget / once.max(1e-7)) as usize).clamp(1, 200);
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    ctx.dev.gpu.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

fn budget(ctx: &Ctx) -> f64 {
    if ctx.tiny {
        0.05
    } else {
        0.25
    }
}

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn buf(ctx: &Ctx, n: usize, dtype: DType, seed: u64, scale: f32) -> Result<DevBuf, GpuError> {
    DevBuf::from_f32(&ctx.dev.gpu, &values(n, seed, scale), dtype)
}

fn dtypes() -> [DType; 2] {
    [DType::F32, DType::Bf16]
}

fn dname(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::Bf16 => "bf16",
    }
}

/// Matrix products of a linear layer `y (n, out) = x (n, in) @ w (out, in)^T`: forward, input
/// gradient `dx = dy @ w`, weight gradient `dw (+)= dy^T @ x` (fp32 accumulation into fp32).
fn gemm(ctx: &Ctx) -> anyhow::Result<()> {
    let s = if ctx.tiny { TINY } else { FULL };
    header(&format!(
        "GEMM (cuBLASLt through CudaKernels::matmul): n = {} tokens, hidden {}",
        s.tokens, s.hidden
    ));
    println!(
        "{:<6} {:<5} {:<34} {:>10} {:>17}",
        "layer", "type", "product (m x n x k)", "ms", "throughput"
    );
    let (n, h) = (s.tokens, s.hidden);
    for (layer, out) in [
        ("qkv", 3 * s.heads * s.head_size),
        ("mlp", 2 * s.inter),
        ("vocab", s.vocab),
    ] {
        for dt in dtypes() {
            let x = buf(ctx, n * h, dt, 1, 1.0)?;
            let w = buf(ctx, out * h, dt, 2, 0.02)?;
            let y = DevBuf::zeros(&ctx.dev.gpu, n * out, dt)?;
            let dx = DevBuf::zeros(&ctx.dev.gpu, n * h, dt)?;
            let dw = DevBuf::zeros(&ctx.dev.gpu, out * h, DType::F32)?;
            let flops = 2.0 * (n * out * h) as f64;
            let cases: [(&str, usize, usize, usize); 3] = [
                ("fwd  y = x @ w^T", n, out, h),
                ("bwd dx = dy @ w", n, h, out),
                ("bwd dw += dy^T @ x", out, h, n),
            ];
            for (i, (what, m, nn, k)) in cases.into_iter().enumerate() {
                let r = time_calls(ctx, budget(ctx), || match i {
                    0 => ctx
                        .k
                        .matmul(y.view(), x.view(), w.view(), n, out, h, false, true, false),
                    1 => ctx
                        .k
                        .matmul(dx.view(), y.view(), w.view(), n, h, out, false, false, false),
                    _ => ctx
                        .k
                        .matmul(dw.view(), y.view(), x.view(), out, h, n, true, false, true),
                });
                let label = format!("{what} ({m}x{nn}x{k})");
                match r {
                    Ok(t) => println!(
                        "{layer:<6} {:<5} {label:<34} {:>10.3} {:>17}",
                        dname(dt),
                        t * 1e3,
                        rate(flops / t, "FLOP")
                    ),
                    Err(e) => println!("{layer:<6} {:<5} {label:<34} error: {e}", dname(dt)),
                }
            }
        }
    }
    Ok(())
}

/// Largest `|a - b|` over the largest `|b|` (a relative difference robust to values near zero).
fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(f64::MIN_POSITIVE);
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    if a.len() != b.len() || a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    diff / scale
}

/// `v` per second with an SI prefix: "12.3 TFLOP/s", "456.7 GB/s", "8.9 MFLOP/s".
fn rate(v: f64, unit: &str) -> String {
    let (div, p) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(d, _)| v >= d)
        .unwrap_or((1.0, ""));
    format!("{:.1} {p}{unit}/s", v / div)
}

/// Bytes as GiB, or MiB below 1 GiB.
fn size(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// One row of the kernel table: time per call and the figure that matters for it.
fn row(name: &str, dt: DType, r: Result<f64, GpuError>, bytes: f64, flops: f64) {
    match r {
        Ok(t) => {
            let fig = if flops > 0.0 {
                rate(flops / t, "FLOP")
            } else {
                rate(bytes / t, "B")
            };
            println!("{name:<36} {:<5} {:>10.3} {fig:>17}", dname(dt), t * 1e3);
        }
        Err(e) => println!("{name:<36} {:<5} error: {e}", dname(dt)),
    }
}

/// The non-GEMM kernels at training shapes. GB/s counts each tensor read or written once (the least
/// traffic the operation needs); attention TFLOP/s count the causal half of `4 n s h d` (forward) and
/// 2.5 times that (backward: 5 products of which one recomputes the scores).
fn ops(ctx: &Ctx) -> anyhow::Result<()> {
    let s = if ctx.tiny { TINY } else { FULL };
    let (n, h, b) = (s.tokens, s.hidden, s.sequences());
    header(&format!(
        "kernels: {n} tokens ({b} x {}), hidden {h}, {} heads of {}, MLP {}, vocab {}",
        s.seq, s.heads, s.head_size, s.inter, s.vocab
    ));
    println!("{:<36} {:<5} {:>10} {:>17}", "kernel", "type", "ms", "throughput");
    let g = &ctx.dev.gpu;
    let bud = budget(ctx);
    for dt in dtypes() {
        let e = dt.size() as f64;
        let nh = (n * h) as f64;
        // RMSNorm.
        {
            let x = buf(ctx, n * h, dt, 3, 1.0)?;
            let w = buf(ctx, h, dt, 4, 1.0)?;
            let out = DevBuf::zeros(g, n * h, dt)?;
            let rstd = DevBuf::zeros(g, n, DType::F32)?;
            let r = time_calls(ctx, bud, || {
                ctx.k
                    .rms_norm_forward(out.view(), rstd.view(), x.view(), w.view(), h, 1e-5)
            });
            row("rms_norm fwd", dt, r, 2.0 * nh * e, 0.0);
            let gx = DevBuf::zeros(g, n * h, dt)?;
            let gw = DevBuf::zeros(g, h, DType::F32)?;
            for accumulate in [false, true] {
                let r = time_calls(ctx, bud, || {
                    let (gx, gw, out, x, w, rstd) = (gx.view(), gw.view(), out.view(), x.view(), w.view(), rstd.view());
                    ctx.k.rms_norm_backward(gx, gw, out, x, w, rstd, h, accumulate)
                });
                // Reads grad_out and x in the dx pass and again in the dw pass, writes grad_x (and reads
                // it first when accumulating: the residual's gradient).
                let (label, bytes) = if accumulate {
                    ("rms_norm bwd, += (dx + dw)", 6.0)
                } else {
                    ("rms_norm bwd (dx + dw)", 5.0)
                };
                row(label, dt, r, bytes * nh * e, 0.0);
            }
            let r = time_calls(ctx, bud, || ctx.k.add_assign(gx.view(), x.view()));
            row("add (local reduce on a GPU)", dt, r, 3.0 * nh * e, 0.0);
        }
        // Rotary on q and k of the fused qkv rows.
        {
            let width = 3 * s.heads * s.head_size;
            let qkv = buf(ctx, n * width, dt, 5, 1.0)?;
            let half = s.head_size / 2;
            let cos = buf(ctx, s.seq * half, DType::F32, 6, 1.0)?;
            let sin = buf(ctx, s.seq * half, DType::F32, 7, 1.0)?;
            let r = time_calls(ctx, bud, || {
                ctx.k.rotary(
                    qkv.view(),
                    width,
                    2 * s.heads,
                    s.head_size,
                    s.seq,
                    cos.view(),
                    sin.view(),
                    false,
                )
            });
            row(
                "rotary (q and k)",
                dt,
                r,
                2.0 * (n * 2 * s.heads * s.head_size) as f64 * e,
                0.0,
            );
        }
        // SwiGLU.
        {
            let ni = (n * s.inter) as f64;
            let gu = buf(ctx, 2 * n * s.inter, dt, 8, 2.0)?;
            let out = DevBuf::zeros(g, n * s.inter, dt)?;
            let r = time_calls(ctx, bud, || ctx.k.swiglu_forward(out.view(), gu.view(), s.inter));
            row("swiglu fwd", dt, r, 3.0 * ni * e, 0.0);
            let ggu = DevBuf::zeros(g, 2 * n * s.inter, dt)?;
            let r = time_calls(ctx, bud, || {
                ctx.k.swiglu_backward(ggu.view(), out.view(), gu.view(), s.inter)
            });
            row("swiglu bwd", dt, r, 5.0 * ni * e, 0.0);
        }
        // Embedding backward into an fp32 table, with the token counts of byte-level English text (a
        // space in about one position of six: the longest run of one token).
        {
            let tokens: Vec<u32> = (0..n)
                .map(|i| if i % 6 == 0 { 32 } else { 64 + ((i * 7919) % 64) as u32 })
                .collect();
            let tk = DevBuf::from_u32(g, &tokens)?;
            let go = buf(ctx, n * h, dt, 14, 1.0)?;
            let table = DevBuf::zeros(g, 256 * h, DType::F32)?;
            let r = time_calls(ctx, bud, || {
                ctx.k.embedding_backward(table.view(), &tokens, tk.view(), go.view(), h)
            });
            row("embedding bwd", dt, r, nh * e, 0.0);
        }
        // Cross-entropy with its gradient written over the logits (as in training).
        {
            let logits = buf(ctx, n * s.vocab, dt, 9, 4.0)?;
            let targets: Vec<u32> = (0..n).map(|i| ((i * 7919) % s.vocab) as u32).collect();
            let tg = DevBuf::from_u32(g, &targets)?;
            let rows = DevBuf::zeros(g, n, DType::F32)?;
            let scale = 1.0 / n as f32;
            let r = time_calls(ctx, bud, || {
                ctx.k
                    .cross_entropy(logits.view(), rows.view(), tg.view(), s.vocab, Some(scale))
                    .map(|_| ())
            });
            row("cross_entropy (+grad)", dt, r, 2.0 * (n * s.vocab) as f64 * e, 0.0);
        }
        // Attention (causal, fused: log-sum-exp saved) at these shapes and, in bf16 on a GPU, at
        // llama-125m's too (16 sequences of 1024, 12 heads of 64: the head size its target rests on).
        let mut attention_shapes = vec![(
            "",
            AttnDims {
                batch: b,
                seq: s.seq,
                heads: s.heads,
                kv_heads: s.heads,
                head_size: s.head_size,
                window: None,
            },
        )];
        if dt == DType::Bf16 && !ctx.tiny {
            let d = AttnDims {
                batch: 16,
                seq: 1024,
                heads: 12,
                kv_heads: 12,
                head_size: 64,
                window: None,
            };
            attention_shapes.push((" 125m", d));
        }
        for (label, d) in attention_shapes {
            let qkv = buf(ctx, d.qkv_len(), dt, 10, 1.0)?;
            let out = DevBuf::zeros(g, d.out_len(), dt)?;
            let lse = DevBuf::zeros(g, d.lse_len(), DType::F32)?;
            let fwd_flops = 2.0 * (d.batch * d.seq * d.seq * d.heads * d.head_size) as f64;
            let gout = buf(ctx, d.out_len(), dt, 11, 1.0)?;
            let gqkv = DevBuf::zeros(g, d.qkv_len(), dt)?;
            let delta = DevBuf::zeros(g, d.lse_len(), DType::F32)?;
            // bf16 runs the tensor-core kernels where they apply: every family (mma and mma64 store ds
            // for dq, their -recompute variants recompute s and dp instead; wmma) and the
            // one-thread-per-row kernels (what f32 and other shapes run) are timed side by side.
            let family = |a: AttentionKernels| CudaKernels::new(g.clone()).with_attention(a);
            let simple = family(AttentionKernels::Simple);
            let families: Vec<(&str, CudaKernels)> = AttentionKernels::VALUES
                .iter()
                .filter(|(_, a)| *a != AttentionKernels::Simple)
                .map(|&(name, a)| (name, family(a)))
                .collect();
            let variants: Vec<(String, &CudaKernels)> = if dt == DType::Bf16 {
                let mut v: Vec<(String, &CudaKernels)> = families
                    .iter()
                    .map(|(name, k)| (format!("attention{label} ({name})"), k))
                    .collect();
                v.push((format!("attention{label} (simple)"), &simple));
                v
            } else {
                vec![(format!("attention{label}"), &ctx.k)]
            };
            let fwd = |k: &CudaKernels| k.attention_forward(out.view(), lse.view(), qkv.view(), d);
            let bwd = |k: &CudaKernels| {
                k.attention_backward(
                    gqkv.view(),
                    delta.view(),
                    gout.view(),
                    out.view(),
                    qkv.view(),
                    lse.view(),
                    d,
                )
            };
            for (name, k) in variants {
                let r = time_calls(ctx, bud, || fwd(k));
                row(&format!("{name} fwd"), dt, r, 0.0, fwd_flops);
                let r = time_calls(ctx, bud, || bwd(k));
                row(&format!("{name} bwd"), dt, r, 0.0, 2.5 * fwd_flops);
            }
            if dt == DType::Bf16 {
                // The tensor-core families against the simple kernels on the same inputs: output,
                // log-sum-exp and gradient agreement.
                let agree = |fast: &CudaKernels| -> Result<[f64; 3], GpuError> {
                    let mut got = Vec::new();
                    for k in [fast, &simple] {
                        fwd(k)?;
                        bwd(k)?;
                        let gpu = &*ctx.dev.gpu;
                        got.push([
                            read_f32(gpu, out.view())?,
                            read_f32(gpu, lse.view())?,
                            read_f32(gpu, gqkv.view())?,
                        ]);
                    }
                    Ok([0, 1, 2].map(|i| max_rel_diff(&got[0][i], &got[1][i])))
                };
                for (name, fast) in &families {
                    match agree(fast) {
                        Ok([o, l, gq]) => println!(
                            "attention{label} bf16 {name} vs simple: max relative difference out {o:.2e}, \
                             lse {l:.2e}, grad_qkv {gq:.2e}"
                        ),
                        Err(e) => println!("attention{label} bf16 {name} vs simple: error: {e}"),
                    }
                }
            }
        }
    }
    // AdamW and the gradient norm (fp32 master state).
    {
        let na = s.adam;
        let w = buf(ctx, na, DType::F32, 12, 0.02)?;
        let gr = buf(ctx, na, DType::F32, 13, 0.01)?;
        let m = DevBuf::zeros(g, na, DType::F32)?;
        let v = DevBuf::zeros(g, na, DType::F32)?;
        let out = DevBuf::zeros(g, na, DType::Bf16)?;
        let adam = |step| AdamStep {
            lr: 1e-4,
            beta_1: 0.9,
            beta_2: 0.95,
            epsilon: 1e-8,
            weight_decay: 0.1,
            grad_scale: 1.0,
            step,
        };
        let mut step = 0;
        let r = time_calls(ctx, bud, || {
            step += 1;
            ctx.k.adamw(w.view(), gr.view(), m.view(), v.view(), None, adam(step))
        });
        let per_element = r.as_ref().ok().map(|t| t / na as f64);
        row(
            &format!("adamw ({}M elements)", na >> 20),
            DType::F32,
            r,
            28.0 * na as f64,
            0.0,
        );
        if let Some(t) = per_element {
            println!("  (adamw over 1B parameters: about {:.1} ms at this rate)", t * 1e12);
        }
        // With the bf16 copy for the weight buffer (one rank, a buffer per stage): 2 more bytes per
        // element in place of a separate cast's 6.
        let r = time_calls(ctx, bud, || {
            step += 1;
            let o = Some(out.view());
            ctx.k.adamw(w.view(), gr.view(), m.view(), v.view(), o, adam(step))
        });
        row(
            &format!("adamw + bf16 copy ({}M elements)", na >> 20),
            DType::F32,
            r,
            30.0 * na as f64,
            0.0,
        );
        let r = time_calls(ctx, bud, || ctx.k.sum_squares(gr.view()).map(|_| ()));
        row(
            &format!("sum_squares ({}M)", na >> 20),
            DType::F32,
            r,
            4.0 * na as f64,
            0.0,
        );
    }
    Ok(())
}

impl Shapes {
    /// Sequences in the token batch.
    fn sequences(&self) -> usize {
        (self.tokens / self.seq).max(1)
    }
}

/// The training data: the bundled text, from the working directory or the source tree.
fn data_path() -> anyhow::Result<PathBuf> {
    let rel = Path::new("examples/data/tinyshakespeare.txt");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    for p in [rel.to_path_buf(), src] {
        if p.is_file() {
            return Ok(std::fs::canonicalize(&p)?);
        }
    }
    anyhow::bail!("examples/data/tinyshakespeare.txt not found: run bench_gpu from the repository root")
}

/// How to train a preset.
#[derive(Clone, Copy)]
struct Run {
    steps: u64,
    /// Ranks (local backend, all on GPU 0).
    world: usize,
    depth_first: usize,
    /// Sequences per micro-batch.
    seqs: usize,
    zero: u8,
    dtype: ComputeDtype,
}

/// A training config for `p` on the GPU.
fn config(p: &Preset, dir: &Path, r: &Run) -> anyhow::Result<TrainConfig> {
    let Run {
        steps,
        world,
        depth_first,
        seqs,
        zero,
        dtype,
    } = *r;
    let dtype = match dtype {
        ComputeDtype::Float32 => "float32",
        ComputeDtype::Bfloat16 => "bfloat16",
    };
    let yaml = format!(
        r#"
run: {{experiment_dir: "{dir}"}}
training: {{train_iters: {steps}, logs: {{interval: 1}}}}
data:
  datasets:
    training: {{type: text, path: "{data}"}}
  micro_batch_size: {mbs}
  sequence_length: {seq}
schedule: {{depth_first_micro_batches: {depth_first}, breadth_first_micro_batches: 1}}
optimizer:
  learning_rate: {{base: 0.001, decay_style: constant, warmup_iterations: 2}}
  weight_decay: 0.1
  beta_1: 0.9
  beta_2: 0.95
  gradient_norm_clipping: 1.0
model:
  base_model:
    hidden_size: {hidden}
    tied_embedding_weight: false
    embeddings: {{vocab_size: {vocab}}}
    decoder:
      num_blocks: {blocks}
      block:
        mixer: {{heads: {heads}, head_groups: {heads}, head_size: {hs}, rotary: {{type: default, theta: 10000}}}}
        mlp: {{intermediate_size: {inter}, gated: true, activation: silu}}
        normalization: {{type: rms_norm, epsilon: 1.0e-5}}
    head: {{normalization: {{type: rms_norm, epsilon: 1.0e-5}}}}
  multi_stage: {{zero_stage: {zero}}}
  distributed: {{world_size: {world}, backend: local, seed: 1234, compute_dtype: {dtype}, use_cuda: true, timeout: 600}}
"#,
        dir = dir.display(),
        data = data_path()?.display(),
        mbs = seqs * p.seq,
        seq = p.seq,
        hidden = p.hidden,
        vocab = p.vocab,
        blocks = p.blocks,
        heads = p.heads,
        hs = p.head_size,
        inter = p.inter,
    );
    Ok(load_config_str(&yaml, &[])?)
}

/// FLOPs per token: 6 x parameters + 12 x layers x hidden x sequence.
fn flops_per_token(cfg: &TrainConfig) -> anyhow::Result<(usize, f64)> {
    let b = &cfg.model.base_model;
    let params = Llama::new(ModelShape::from_config(b)?).num_params();
    Ok((params, fast_llm_rs::train::model_flops_per_token(cfg, params)))
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Free and total bytes of the GPU (real GPUs only).
fn gpu_free(ctx: &Ctx) -> Option<(usize, usize)> {
    ctx.dev.memory_stats()?;
    // The primary context was made current on this thread when the device was opened.
    cudarc::driver::result::mem_get_info().ok()
}

/// Trains `cfg` (bf16 falling back to float32 when refused); returns the summary, the dtype used and
/// the experiment directory's memory.json.
fn run_training(
    mut cfg: TrainConfig,
    quiet: bool,
) -> anyhow::Result<(TrainSummary, ComputeDtype, serde_json::Value, f64)> {
    let t = Instant::now();
    let r = train(
        &cfg,
        &TrainOptions {
            quiet,
            ..Default::default()
        },
    );
    let r = match r {
        Err(e)
            if cfg.model.distributed.compute_dtype == ComputeDtype::Bfloat16
                && format!("{e:#}").contains("compute_dtype") =>
        {
            println!("bf16 refused by train(): {e:#}");
            println!("-> falling back to compute_dtype: float32");
            cfg.model.distributed.compute_dtype = ComputeDtype::Float32;
            train(
                &cfg,
                &TrainOptions {
                    quiet,
                    ..Default::default()
                },
            )
        }
        r => r,
    };
    let summary = r?;
    // How often the host waited for the GPU per step (the last logged interval): each wait lets it run dry.
    let last_metrics = std::fs::read_to_string(cfg.run.experiment_dir.join("metrics.jsonl"))
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        });
    if let Some(w) = last_metrics.as_ref().and_then(|m| m["device_waits_per_step"].as_f64()) {
        println!("host waits for the GPU per step: {w:.1}");
    }
    let mem_path = cfg.run.experiment_dir.join("memory.json");
    let memory = std::fs::read(&mem_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    Ok((
        summary,
        cfg.model.distributed.compute_dtype,
        memory,
        t.elapsed().as_secs_f64(),
    ))
}

fn train_section(ctx: &Ctx, preset: Preset, steps: u64) -> anyhow::Result<()> {
    let p = if ctx.tiny { tiny_preset(preset.name) } else { preset };
    let steps = if ctx.tiny { steps.min(3) } else { steps }.max(2);
    header(&format!(
        "train {}{}: hidden {}, {} blocks, {} heads of {}, MLP {}, vocab {}, {} sequences of {} per step, {steps} steps",
        p.name,
        if ctx.tiny { " (tiny)" } else { "" },
        p.hidden,
        p.blocks,
        p.heads,
        p.head_size,
        p.inter,
        p.vocab,
        p.seqs,
        p.seq
    ));
    let dir = tempfile::tempdir()?;
    let run = Run {
        steps,
        world: 1,
        depth_first: 1,
        seqs: p.seqs,
        zero: 2,
        dtype: ctx.dtype,
    };
    let cfg = config(&p, dir.path(), &run)?;
    let (params, fpt) = flops_per_token(&cfg)?;
    println!(
        "{:.2}M parameters, {:.4} GFLOP/token (6 x params + 12 x layers x hidden x seq)",
        params as f64 / 1e6,
        fpt / 1e9
    );
    // The float32 plan bounds the bf16 one (and is what runs when bf16 is refused).
    let mut f32_cfg = cfg.clone();
    f32_cfg.model.distributed.compute_dtype = ComputeDtype::Float32;
    let planned = fast_llm_rs::plan::plan(&f32_cfg, None)?.rows[0].total;
    println!(
        "plan (float32, ZeRO-{}): {} per rank (model state + activations)",
        cfg.model.multi_stage.zero_stage(),
        size(planned)
    );
    if let Some((free, total)) = gpu_free(ctx) {
        println!(
            "GPU memory: {:.2} of {:.2} GiB free",
            gib(free as u64),
            gib(total as u64)
        );
        // Managed memory beyond what the card holds can hang the GPU: never ask for it.
        if planned as f64 > 0.92 * free as f64 {
            println!(
                "skipped: the plan ({}) does not fit in the free GPU memory",
                size(planned)
            );
            return Ok(());
        }
    }
    let (s, dtype, memory, wall) = run_training(cfg, false)?;
    report_training(ctx, &p, &s, dtype, &memory, fpt, wall);
    Ok(())
}

fn report_training(
    ctx: &Ctx,
    p: &Preset,
    s: &TrainSummary,
    dtype: ComputeDtype,
    memory: &serde_json::Value,
    fpt: f64,
    wall: f64,
) {
    let dname = match dtype {
        ComputeDtype::Float32 => "float32",
        ComputeDtype::Bfloat16 => "bfloat16",
    };
    let (first, last) = (s.losses.first().copied(), s.losses.last().copied());
    println!("--- {} results (compute_dtype {dname}, {:.1} s wall)", p.name, wall);
    if let (Some(f), Some(l)) = (first, last) {
        println!(
            "loss: first {f:.4}, last {l:.4} ({})",
            if l < f { "went down" } else { "did NOT go down" }
        );
    }
    let mfu = s.tokens_per_s * fpt / ctx.peak;
    println!(
        "tokens/s: {:.1} (steps after the first) | MFU {:.2}% of {} | {} achieved",
        s.tokens_per_s,
        100.0 * mfu,
        rate(ctx.peak, "FLOP"),
        rate(s.tokens_per_s * fpt, "FLOP")
    );
    if let Some(t) = p.torch {
        println!("  vs PyTorch eager {:.0} tokens/s: {:.2}x", t, s.tokens_per_s / t);
    }
    if p.name == "llama-1b" && !ctx.tiny {
        println!("  vs target 75000 tokens/s: {:.2}x", s.tokens_per_s / 75_000.0);
    }
    for m in &s.memory {
        let total =
            m.weight_shard + m.grad_shard + m.optimizer_state + m.weight_buffers + m.grad_buffers + m.activations_peak;
        println!(
            "rank {} memory: {} (weights {}, grads {}, optimizer {}, weight buffers {}, grad buffers {}, activations {})",
            m.rank,
            size(total),
            size(m.weight_shard),
            size(m.grad_shard),
            size(m.optimizer_state),
            size(m.weight_buffers),
            size(m.grad_buffers),
            size(m.activations_peak)
        );
    }
    match memory.get("gpu") {
        Some(g) => println!(
            "peak GPU memory (memory.json): {}, in use at the end {}",
            size(g["peak_bytes"].as_u64().unwrap_or(0)),
            size(g["in_use_bytes"].as_u64().unwrap_or(0))
        ),
        None => println!("peak GPU memory: not reported (emulator)"),
    }
}

/// llama-125m with 2 ranks on the one GPU (1 micro-batch each) against 1 rank with 2 depth-first
/// micro-batches: the same samples per step, so the same losses up to summation order (float32).
fn ranks_section(ctx: &Ctx, steps: u64) -> anyhow::Result<()> {
    let p = if ctx.tiny {
        tiny_preset("llama-125m")
    } else {
        LLAMA_125M
    };
    let steps = if ctx.tiny { steps.min(3) } else { steps }.max(2);
    let seqs = if ctx.tiny { 1 } else { 4 };
    header(&format!(
        "ranks: {} float32, {steps} steps of 2 x {seqs} sequences: 2 ranks on one GPU (ZeRO-2) vs 1 rank (2 depth-first micro-batches)",
        p.name
    ));
    let mut losses = Vec::new();
    for (world, df) in [(1, 2), (2, 1)] {
        let dir = tempfile::tempdir()?;
        let run = Run {
            steps,
            world,
            depth_first: df,
            seqs,
            zero: 2,
            dtype: ComputeDtype::Float32,
        };
        let cfg = config(&p, dir.path(), &run)?;
        let (s, _, memory, wall) = run_training(cfg, true)?;
        println!(
            "{world} rank(s): losses {:?} | {:.0} tokens/s | {:.1} s | peak GPU {}",
            s.losses.iter().map(|l| (l * 1e4).round() / 1e4).collect::<Vec<_>>(),
            s.tokens_per_s,
            wall,
            memory
                .get("gpu")
                .and_then(|g| g["peak_bytes"].as_u64())
                .map_or("n/a".into(), size)
        );
        losses.push(s.losses);
    }
    let max_rel = losses[0]
        .iter()
        .zip(&losses[1])
        .map(|(a, b)| (a - b).abs() / a.abs().max(1e-12))
        .fold(0.0f64, f64::max);
    println!(
        "max relative loss difference, 2 ranks vs 1: {max_rel:.3e} over {} steps",
        losses[0].len().min(losses[1].len())
    );
    Ok(())
}
