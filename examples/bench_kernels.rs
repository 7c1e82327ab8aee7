//! Kernel benchmark for the example model (f32): hidden 256, 8 heads of 32 (8 kv heads), MLP 768,
//! vocab 256, sequences of 256, micro-batches of 2048 tokens (8 sequences), 4 blocks.
//!
//! `cargo run --release --example bench_kernels [-- THREADS...]` (default: 1 2).
//! Profiling aids: `BENCH_ONLY_MATMUL=THREADS` (200 gate_up products), `BENCH_ONLY_ATTN=1` (200
//! attention forward+backward, 1 thread), `BENCH_ATTN=batch,seq,heads,kv_heads,head_size[,reps[,window]]` (attention
//! alone on 1 thread: minimum and median thread CPU time over `reps` calls, default 50 — the minimum
//! is the figure to compare on a shared machine).

use fast_llm_rs::backend::cpu::CpuKernels;
use fast_llm_rs::backend::Kernels;
use std::time::Instant;

const TOKENS: usize = 2048;
const HIDDEN: usize = 256;
const HEADS: usize = 8;
const KV_HEADS: usize = 8;
const HEAD_SIZE: usize = 32;
const INTER: usize = 768;
const VOCAB: usize = 256;
const SEQ: usize = 256;
const BATCH: usize = TOKENS / SEQ;
const BLOCKS: usize = 4;

/// Median seconds per call of `f` (after warm-up), over enough calls to take ~0.3 s.
fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let reps = ((0.3 / once) as usize).clamp(5, 2000);
    let mut samples: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[reps / 2]
}

fn fill(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Linear {
    name: &'static str,
    out: usize,
    inp: usize,
    per_step: usize,
}

fn bench(threads: usize) -> f64 {
    let k = CpuKernels::new(threads);
    println!("== threads = {threads} ==");
    let linears = [
        Linear {
            name: "qkv",
            out: (HEADS + 2 * KV_HEADS) * HEAD_SIZE,
            inp: HIDDEN,
            per_step: BLOCKS,
        },
        Linear {
            name: "attn out",
            out: HIDDEN,
            inp: HEADS * HEAD_SIZE,
            per_step: BLOCKS,
        },
        Linear {
            name: "gate_up",
            out: 2 * INTER,
            inp: HIDDEN,
            per_step: BLOCKS,
        },
        Linear {
            name: "down",
            out: HIDDEN,
            inp: INTER,
            per_step: BLOCKS,
        },
        Linear {
            name: "lm head",
            out: VOCAB,
            inp: HIDDEN,
            per_step: 1,
        },
    ];
    let mut total = 0.0;
    let mut flops_total = 0.0;
    println!(
        "{:<10} {:>16} {:>10} {:>10} {:>10}   {:>9} {:>9} {:>9}",
        "linear", "shape (m,n,k)", "fwd GF/s", "dX GF/s", "dW GF/s", "fwd ms", "dX ms", "dW ms"
    );
    for l in &linears {
        let x = fill(TOKENS * l.inp, 1);
        let w = fill(l.out * l.inp, 2);
        let dy = fill(TOKENS * l.out, 3);
        let mut y = vec![0.0f32; TOKENS * l.out];
        let mut dx = vec![0.0f32; TOKENS * l.inp];
        let mut dw = vec![0.0f32; l.out * l.inp];
        let flops = 2.0 * (TOKENS * l.out * l.inp) as f64;
        // y (n,out) = x (n,in) @ W^T
        let tf = time(|| k.matmul(&mut y, &x, &w, TOKENS, l.out, l.inp, false, true, false));
        // dX (n,in) = dY (n,out) @ W (out,in)
        let tx = time(|| k.matmul(&mut dx, &dy, &w, TOKENS, l.inp, l.out, false, false, false));
        // dW (out,in) += dY^T @ X
        let tw = time(|| k.matmul(&mut dw, &dy, &x, l.out, l.inp, TOKENS, true, false, true));
        println!(
            "{:<10} {:>16} {:>10.1} {:>10.1} {:>10.1}   {:>9.3} {:>9.3} {:>9.3}",
            l.name,
            format!("{}x{}x{}", TOKENS, l.out, l.inp),
            flops / tf * 1e-9,
            flops / tx * 1e-9,
            flops / tw * 1e-9,
            tf * 1e3,
            tx * 1e3,
            tw * 1e3
        );
        total += (tf + tx + tw) * l.per_step as f64;
        flops_total += 3.0 * flops * l.per_step as f64;
    }
    let matmul_time = total;

    // Attention.
    let qkv_w = (HEADS + 2 * KV_HEADS) * HEAD_SIZE;
    let qkv = fill(TOKENS * qkv_w, 4);
    let gout = fill(TOKENS * HEADS * HEAD_SIZE, 5);
    let mut out = vec![0.0f32; TOKENS * HEADS * HEAD_SIZE];
    let mut probs = vec![0.0f32; BATCH * HEADS * SEQ * SEQ];
    let mut scratch = vec![0.0f32; BATCH * HEADS * SEQ * SEQ];
    let mut gqkv = vec![0.0f32; TOKENS * qkv_w];
    let taf = time(|| k.attention_forward(&mut out, &mut probs, &qkv, BATCH, SEQ, HEADS, KV_HEADS, HEAD_SIZE, None));
    let tab = time(|| {
        k.attention_backward(
            &mut gqkv,
            &mut scratch,
            &gout,
            &out,
            &qkv,
            &probs,
            BATCH,
            SEQ,
            HEADS,
            KV_HEADS,
            HEAD_SIZE,
            None,
        )
    });
    // Useful (causal) flops: QK^T and PV forward, 4 products backward, on the lower triangle.
    let causal = (BATCH * HEADS) as f64 * (SEQ * (SEQ + 1) / 2) as f64 * HEAD_SIZE as f64 * 2.0;
    println!(
        "attention  fwd {:.3} ms ({:.1} GF/s causal)   bwd {:.3} ms ({:.1} GF/s causal)",
        taf * 1e3,
        2.0 * causal / taf * 1e-9,
        tab * 1e3,
        4.0 * causal / tab * 1e-9
    );
    total += (taf + tab) * BLOCKS as f64;

    // The other kernels, per step.
    let xs = fill(TOKENS * HIDDEN, 6);
    let wn = fill(HIDDEN, 7);
    let mut o = vec![0.0f32; TOKENS * HIDDEN];
    let mut rstd = vec![0.0f32; TOKENS];
    let mut gx = vec![0.0f32; TOKENS * HIDDEN];
    let mut gwn = vec![0.0f32; HIDDEN];
    let trf = time(|| k.rms_norm_forward(&mut o, &mut rstd, &xs, &wn, HIDDEN, 1e-5));
    let trb = time(|| k.rms_norm_backward(&mut gx, &mut gwn, &xs, &xs, &wn, &rstd, HIDDEN, true));
    let gu = fill(TOKENS * 2 * INTER, 8);
    let mut so = vec![0.0f32; TOKENS * INTER];
    let mut ggu = vec![0.0f32; TOKENS * 2 * INTER];
    let tsf = time(|| k.swiglu_forward(&mut so, &gu, INTER));
    let tsb = time(|| k.swiglu_backward(&mut ggu, &so, &gu, INTER));
    let half = HEAD_SIZE / 2;
    let angle = |i: usize| (i / half) as f32 / 10000f32.powf((2 * (i % half)) as f32 / HEAD_SIZE as f32);
    let cos: Vec<f32> = (0..SEQ * half).map(|i| angle(i).cos()).collect();
    let sin: Vec<f32> = (0..SEQ * half).map(|i| angle(i).sin()).collect();
    let mut q = qkv.clone();
    let tro = time(|| k.rotary(&mut q, qkv_w, HEADS + KV_HEADS, HEAD_SIZE, SEQ, &cos, &sin, false));
    let logits = fill(TOKENS * VOCAB, 11);
    let targets: Vec<u32> = (0..TOKENS as u32).map(|i| (i * 7919) % VOCAB as u32).collect();
    let mut lg = logits.clone();
    let tce = time(|| {
        lg.copy_from_slice(&logits);
        k.cross_entropy(&mut lg, &targets, VOCAB, Some(1.0 / TOKENS as f32));
    });
    let mut res = fill(TOKENS * HIDDEN, 12);
    // The residual copy of each half-block (the CPU's matmul_residual copies, then accumulates).
    let tcopy = time(|| Kernels::<f32>::copy(&k, &mut res, &xs));
    let params = BLOCKS * (HIDDEN * (qkv_w + HEADS * HEAD_SIZE + 3 * INTER) + 2 * HIDDEN) + 2 * VOCAB * HIDDEN;
    let mut pw = fill(params, 13);
    let pg = fill(params, 14);
    let mut pm = vec![0.0f32; params];
    let mut pv = vec![0.0f32; params];
    let mut step = 0;
    let tadam = time(|| {
        step += 1;
        Kernels::<f32>::adamw(
            &k, &mut pw, &pg, &mut pm, &mut pv, None, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1.0, step,
        )
    });
    let tsq = time(|| {
        std::hint::black_box(Kernels::<f32>::sum_squares(&k, &pg));
    });
    println!(
        "rms_norm fwd {:.3} bwd {:.3} | swiglu fwd {:.3} bwd {:.3} | rotary {:.3} | cross_entropy {:.3} | copy {:.3} ms",
        trf * 1e3,
        trb * 1e3,
        tsf * 1e3,
        tsb * 1e3,
        tro * 1e3,
        tce * 1e3,
        tcopy * 1e3
    );
    println!(
        "adamw {:.3} ms, sum_squares {:.3} ms ({} params)",
        tadam * 1e3,
        tsq * 1e3,
        params
    );
    let other =
        BLOCKS as f64 * (2.0 * (trf + trb) + tsf + tsb + 2.0 * tro + 2.0 * tcopy) + (trf + trb) + tce + tadam + tsq;
    total += other;
    println!(
        "per step of {TOKENS} tokens: matmul {:.1} ms ({:.1} GF/s avg), attention {:.1} ms, other {:.1} ms, total {:.1} ms => {:.0} tokens/s",
        matmul_time * 1e3,
        flops_total / matmul_time * 1e-9,
        (taf + tab) * BLOCKS as f64 * 1e3,
        other * 1e3,
        total * 1e3,
        TOKENS as f64 / total
    );
    total
}

/// CPU time of the calling thread in seconds (Linux; wall time elsewhere), so that time spent
/// descheduled on a shared machine does not count.
fn thread_cpu_time() -> f64 {
    #[cfg(target_os = "linux")]
    {
        #[repr(C)]
        struct Timespec {
            tv_sec: i64,
            tv_nsec: i64,
        }
        extern "C" {
            fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
        }
        const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
        let mut t = Timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `t` is a valid timespec for the call to fill.
        if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0 {
            return t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9;
        }
    }
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// `BENCH_ATTN`: min / median ms of attention forward and backward for one shape, 1 thread.
fn bench_attention_shape(spec: &str) {
    let v: Vec<usize> = spec
        .split(',')
        .map(|x| x.trim().parse().expect("BENCH_ATTN: integers"))
        .collect();
    assert!(
        v.len() >= 5,
        "BENCH_ATTN=batch,seq,heads,kv_heads,head_size[,reps[,window]]"
    );
    let (batch, seq, heads, kv, hs) = (v[0], v[1], v[2], v[3], v[4]);
    let reps = v.get(5).copied().unwrap_or(50).max(1);
    // A sliding window (GF/s below still count the full causal work).
    let window = v.get(6).copied();
    let k = CpuKernels::new(1);
    let tokens = batch * seq;
    let qkv = fill(tokens * (heads + 2 * kv) * hs, 4);
    let gout = fill(tokens * heads * hs, 5);
    let mut out = vec![0.0f32; tokens * heads * hs];
    let mut probs = vec![0.0f32; batch * heads * seq * seq];
    let mut scratch = vec![0.0f32; batch * heads * seq * seq];
    let mut gqkv = vec![0.0f32; qkv.len()];
    let stats = |mut f: Box<dyn FnMut() + '_>| {
        f();
        let mut t: Vec<f64> = (0..reps)
            .map(|_| {
                let s = thread_cpu_time();
                f();
                thread_cpu_time() - s
            })
            .collect();
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (t[0], t[reps / 2])
    };
    let (fmin, fmed) = stats(Box::new(|| {
        k.attention_forward(&mut out, &mut probs, &qkv, batch, seq, heads, kv, hs, window)
    }));
    let (bmin, bmed) = stats(Box::new(|| {
        k.attention_backward(
            &mut gqkv,
            &mut scratch,
            &gout,
            &out,
            &qkv,
            &probs,
            batch,
            seq,
            heads,
            kv,
            hs,
            window,
        )
    }));
    let causal = (batch * heads) as f64 * (seq * (seq + 1) / 2) as f64 * hs as f64 * 2.0;
    println!(
        "attention b{batch} s{seq} h{heads} kv{kv} d{hs} window {window:?}: fwd min {:.3} ms ({:.1} GF/s) median {:.3} ms | \
         bwd min {:.3} ms ({:.1} GF/s) median {:.3} ms | fwd+bwd min {:.3} ms",
        fmin * 1e3,
        2.0 * causal / fmin * 1e-9,
        fmed * 1e3,
        bmin * 1e3,
        4.0 * causal / bmin * 1e-9,
        bmed * 1e3,
        (fmin + bmin) * 1e3
    );
}

fn main() {
    if let Ok(spec) = std::env::var("BENCH_ATTN") {
        bench_attention_shape(&spec);
        return;
    }
    if let Ok(t) = std::env::var("BENCH_ONLY_MATMUL") {
        // Profiling aid: 200 forward gate_up products with the given thread count.
        let k = CpuKernels::new(t.parse().unwrap_or(1));
        let x = fill(TOKENS * HIDDEN, 1);
        let w = fill(2 * INTER * HIDDEN, 2);
        let mut y = vec![0.0f32; TOKENS * 2 * INTER];
        for _ in 0..200 {
            k.matmul(&mut y, &x, &w, TOKENS, 2 * INTER, HIDDEN, false, true, false);
        }
        return;
    }
    if std::env::var("BENCH_ONLY_ATTN").is_ok() {
        let k = CpuKernels::new(1);
        let qkv_w = (HEADS + 2 * KV_HEADS) * HEAD_SIZE;
        let qkv = fill(TOKENS * qkv_w, 4);
        let gout = fill(TOKENS * HEADS * HEAD_SIZE, 5);
        let mut out = vec![0.0f32; TOKENS * HEADS * HEAD_SIZE];
        let mut probs = vec![0.0f32; BATCH * HEADS * SEQ * SEQ];
        let mut scratch = vec![0.0f32; BATCH * HEADS * SEQ * SEQ];
        let mut gqkv = vec![0.0f32; TOKENS * qkv_w];
        for _ in 0..200 {
            k.attention_forward(&mut out, &mut probs, &qkv, BATCH, SEQ, HEADS, KV_HEADS, HEAD_SIZE, None);
            k.attention_backward(
                &mut gqkv,
                &mut scratch,
                &gout,
                &out,
                &qkv,
                &probs,
                BATCH,
                SEQ,
                HEADS,
                KV_HEADS,
                HEAD_SIZE,
                None,
            );
        }
        return;
    }
    let threads: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let threads = if threads.is_empty() { vec![1, 2] } else { threads };
    for t in threads {
        bench(t);
        println!();
    }
}
