//! Tests of the CPU kernels: forward against plain references, backward against central finite
//! differences (f64), f32 against f64, and bitwise determinism across thread counts.

use super::{AttnPath, CpuKernels};
use crate::backend::Kernels;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next_u64() % vocab as u64) as u32).collect()
    }
}

fn k64(threads: usize) -> CpuKernels {
    CpuKernels::new(threads)
}

fn to32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0f64, |m, v| m.max(v.abs()))
}

/// Norm-wise relative error `|a - b|_max / max(|b|_max, tiny)`.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: lengths differ");
    let diff = a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / max_abs(b).max(1e-300)
}

fn assert_close(name: &str, a: &[f64], b: &[f64], tol: f64) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{name}: relative error {e:e} > {tol:e}");
}

fn f32_vs_f64(name: &str, a32: &[f32], a64: &[f64]) {
    let a: Vec<f64> = a32.iter().map(|&v| v as f64).collect();
    assert_close(&format!("{name} (f32 vs f64)"), &a, a64, 1e-5);
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compares an analytic gradient with central finite differences of `loss` at `x0`.
/// Returns the norm-wise relative error, or an error message when it exceeds `tol`.
fn grad_check(
    name: &str,
    x0: &[f64],
    analytic: &[f64],
    mut loss: impl FnMut(&[f64]) -> f64,
    tol: f64,
) -> Result<f64, String> {
    assert_eq!(x0.len(), analytic.len(), "{name}: gradient length");
    let mut x = x0.to_vec();
    let mut numeric = vec![0.0; x0.len()];
    for i in 0..x.len() {
        let h = 1e-5 * x0[i].abs().max(1.0);
        x[i] = x0[i] + h;
        let lp = loss(&x);
        x[i] = x0[i] - h;
        let lm = loss(&x);
        x[i] = x0[i];
        numeric[i] = (lp - lm) / (2.0 * h);
    }
    let e = rel_err(analytic, &numeric);
    if e.is_finite() && e <= tol && max_abs(&numeric) > 0.0 {
        Ok(e)
    } else {
        Err(format!("{name}: gradient relative error {e:e} > {tol:e}"))
    }
}

const GRAD_TOL: f64 = 1e-6;

fn assert_grad(name: &str, x0: &[f64], analytic: &[f64], loss: impl FnMut(&[f64]) -> f64) {
    if let Err(msg) = grad_check(name, x0, analytic, loss, GRAD_TOL) {
        panic!("{msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// Plain references
// ---------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn naive_matmul(c: &mut [f64], a: &[f64], b: &[f64], m: usize, n: usize, k: usize, ta: bool, tb: bool, acc: bool) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av * bv;
            }
            c[i * n + j] = if acc { c[i * n + j] + s } else { s };
        }
    }
}

/// Attention with explicit loops: returns (out, probs).
/// `window`: query `i` scores keys `i - w < j <= i` only.
fn naive_attention(
    qkv: &[f64],
    (batch, seq, heads, kv, hs): (usize, usize, usize, usize, usize),
    window: Option<usize>,
) -> (Vec<f64>, Vec<f64>) {
    let stride = (heads + 2 * kv) * hs;
    let mut out = vec![0.0; batch * seq * heads * hs];
    let mut probs = vec![0.0; batch * heads * seq * seq];
    let scale = 1.0 / (hs as f64).sqrt();
    for b in 0..batch {
        for h in 0..heads {
            let g = h / (heads / kv);
            for i in 0..seq {
                let q = &qkv[(b * seq + i) * stride + h * hs..][..hs];
                let mut scores = vec![f64::NEG_INFINITY; seq];
                let first = window.map_or(0, |w| (i + 1).saturating_sub(w));
                for (j, sc) in scores.iter_mut().enumerate().take(i + 1).skip(first) {
                    let k = &qkv[(b * seq + j) * stride + (heads + g) * hs..][..hs];
                    *sc = dot(q, k) * scale;
                }
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
                for j in 0..seq {
                    let p = (scores[j] - mx).exp() / z;
                    probs[((b * heads + h) * seq + i) * seq + j] = p;
                    let v = &qkv[(b * seq + j) * stride + (heads + kv + g) * hs..][..hs];
                    for d in 0..hs {
                        out[(b * seq + i) * heads * hs + h * hs + d] += p * v[d];
                    }
                }
            }
        }
    }
    (out, probs)
}

// ---------------------------------------------------------------------------------------------
// The checker can fail
// ---------------------------------------------------------------------------------------------

#[test]
fn grad_check_detects_broken_backward() {
    // swiglu with a correct and a deliberately perturbed backward.
    let k = k64(1);
    let (n, inter) = (3, 4);
    let mut rng = Rng::new(1);
    let gu = rng.vec(n * 2 * inter, 1.5);
    let w = rng.vec(n * inter, 1.0);
    let loss = |gu: &[f64]| {
        let mut out = vec![0.0; n * inter];
        k.swiglu_forward(&mut out, gu, inter);
        dot(&out, &w)
    };
    let backward = |perturb: &dyn Fn(&mut [f64])| {
        let mut g = vec![0.0; n * 2 * inter];
        k.swiglu_backward(&mut g, &w, &gu, inter);
        perturb(&mut g);
        g
    };
    let good = backward(&|_| {});
    assert!(grad_check("swiglu", &gu, &good, loss, GRAD_TOL).is_ok());
    // Off by 1e-4 relative on one element.
    let bad = backward(&|g| g[5] *= 1.0 + 1e-4);
    assert!(grad_check("swiglu broken", &gu, &bad, loss, GRAD_TOL).is_err());
    // Sign flip of the up-branch gradient.
    let bad = backward(&|g| g[inter..2 * inter].iter_mut().for_each(|v| *v = -*v));
    assert!(grad_check("swiglu broken", &gu, &bad, loss, GRAD_TOL).is_err());
    // All-zero gradient.
    let bad = backward(&|g| g.fill(0.0));
    assert!(grad_check("swiglu broken", &gu, &bad, loss, GRAD_TOL).is_err());
}

// ---------------------------------------------------------------------------------------------
// Matmul
// ---------------------------------------------------------------------------------------------

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

#[test]
fn matmul_forward_matches_naive() {
    let mut rng = Rng::new(2);
    for &(m, n, k) in &[
        (5, 7, 3),
        (1, 9, 17),
        (33, 1, 65),
        (64, 48, 40),
        (70, 130, 600),
        (2, 2, 1),
    ] {
        for &(ta, tb) in &TRANSPOSES {
            for acc in [false, true] {
                let a = rng.vec(m * k, 1.0);
                let b = rng.vec(k * n, 1.0);
                let c0 = rng.vec(m * n, 1.0);
                let mut want = c0.clone();
                naive_matmul(&mut want, &a, &b, m, n, k, ta, tb, acc);
                for threads in [1, 2] {
                    let mut got = c0.clone();
                    k64(threads).matmul(&mut got, &a, &b, m, n, k, ta, tb, acc);
                    assert_close(
                        &format!("matmul {m}x{n}x{k} ta={ta} tb={tb} acc={acc}"),
                        &got,
                        &want,
                        1e-13,
                    );
                }
                // f32 path
                let mut got32 = to32(&c0);
                CpuKernels::new(1).matmul(&mut got32, &to32(&a), &to32(&b), m, n, k, ta, tb, acc);
                f32_vs_f64(&format!("matmul {m}x{n}x{k}"), &got32, &want);
            }
        }
    }
}

/// The backward products the model uses, written with the kernel itself: for `C = op(A) op(B)`,
/// `dA`, `dB` of `L = sum(C * W)` (with W = dC).
#[allow(clippy::too_many_arguments)]
fn matmul_backward(
    k: &CpuKernels,
    dc: &[f64],
    a: &[f64],
    b: &[f64],
    m: usize,
    n: usize,
    kk: usize,
    ta: bool,
    tb: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut da = vec![0.0; m * kk];
    let mut db = vec![0.0; kk * n];
    if !ta {
        // dA (m,k) = dC (m,n) op(B)^T (n,k)
        k.matmul(&mut da, dc, b, m, kk, n, false, !tb, false);
    } else {
        // dA (k,m) = op(B) (k,n) dC^T (n,m)
        k.matmul(&mut da, b, dc, kk, m, n, tb, true, false);
    }
    if !tb {
        // dB (k,n) = op(A)^T (k,m) dC (m,n)
        k.matmul(&mut db, a, dc, kk, n, m, !ta, false, false);
    } else {
        // dB (n,k) = dC^T (n,m) op(A) (m,k)
        k.matmul(&mut db, dc, a, n, kk, m, true, ta, false);
    }
    (da, db)
}

#[test]
fn matmul_gradients() {
    let k = k64(1);
    let mut rng = Rng::new(3);
    let (m, n, kk) = (4, 5, 3);
    for &(ta, tb) in &TRANSPOSES {
        let a = rng.vec(m * kk, 1.0);
        let b = rng.vec(kk * n, 1.0);
        let w = rng.vec(m * n, 1.0);
        let (da, db) = matmul_backward(&k, &w, &a, &b, m, n, kk, ta, tb);
        let fwd = |a: &[f64], b: &[f64]| {
            let mut c = vec![0.0; m * n];
            k.matmul(&mut c, a, b, m, n, kk, ta, tb, false);
            dot(&c, &w)
        };
        assert_grad(&format!("matmul dA ta={ta} tb={tb}"), &a, &da, |x| fwd(x, &b));
        assert_grad(&format!("matmul dB ta={ta} tb={tb}"), &b, &db, |x| fwd(&a, x));
    }
}

// ---------------------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------------------

#[test]
fn embedding_forward_backward() {
    let k = k64(1);
    let mut rng = Rng::new(4);
    let (vocab, hidden) = (7, 5);
    let tokens = vec![3u32, 0, 3, 6, 3, 1]; // duplicates on purpose
    let n = tokens.len();
    let table = rng.vec(vocab * hidden, 1.0);
    let mut out = vec![0.0; n * hidden];
    k.embedding_forward(&mut out, &tokens, &table, hidden);
    for (i, &t) in tokens.iter().enumerate() {
        assert_eq!(
            &out[i * hidden..(i + 1) * hidden],
            &table[t as usize * hidden..(t as usize + 1) * hidden]
        );
    }
    let w = rng.vec(n * hidden, 1.0);
    // Accumulates into an existing gradient.
    let g0 = rng.vec(vocab * hidden, 1.0);
    let mut g = g0.clone();
    k.embedding_backward(&mut g, &tokens, &w, hidden);
    let grad: Vec<f64> = g.iter().zip(&g0).map(|(a, b)| a - b).collect();
    assert_grad("embedding", &table, &grad, |t| {
        let mut out = vec![0.0; n * hidden];
        k.embedding_forward(&mut out, &tokens, t, hidden);
        dot(&out, &w)
    });
    // f32
    let mut g32 = to32(&g0);
    CpuKernels::new(1).embedding_backward(&mut g32, &tokens, &to32(&w), hidden);
    f32_vs_f64("embedding_backward", &g32, &g);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

#[test]
fn rms_norm_forward_backward() {
    let k = k64(1);
    let mut rng = Rng::new(5);
    let (n, c) = (4, 6);
    let eps = 1e-5;
    let x = rng.vec(n * c, 1.0);
    let weight: Vec<f64> = rng.vec(c, 0.5).iter().map(|v| 1.0 + v).collect();
    let mut out = vec![0.0; n * c];
    let mut rstd = vec![0.0; n];
    k.rms_norm_forward(&mut out, &mut rstd, &x, &weight, c, eps);
    // reference
    for i in 0..n {
        let row = &x[i * c..(i + 1) * c];
        let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / c as f64 + eps).sqrt();
        assert!((rstd[i] - r).abs() <= 1e-14 * r);
        let want: Vec<f64> = row.iter().zip(&weight).map(|(v, w)| v * r * w).collect();
        assert_close("rms_norm forward", &out[i * c..(i + 1) * c], &want, 1e-14);
    }
    let w = rng.vec(n * c, 1.0);
    let mut gx = vec![0.0; n * c];
    let gw0 = rng.vec(c, 1.0);
    let mut gw = gw0.clone();
    k.rms_norm_backward(&mut gx, &mut gw, &w, &x, &weight, &rstd, c, false);
    let dw: Vec<f64> = gw.iter().zip(&gw0).map(|(a, b)| a - b).collect();
    // Accumulating adds the same input gradient to what was there (and the weight gradient again).
    let gx0 = rng.vec(n * c, 1.0);
    let (mut gx_acc, mut gw_acc) = (gx0.clone(), gw.clone());
    k.rms_norm_backward(&mut gx_acc, &mut gw_acc, &w, &x, &weight, &rstd, c, true);
    let added: Vec<f64> = gx_acc.iter().zip(&gx0).map(|(a, b)| a - b).collect();
    assert_close("rms_norm dx accumulated", &added, &gx, 1e-14);
    let dw_again: Vec<f64> = gw_acc.iter().zip(&gw).map(|(a, b)| a - b).collect();
    assert_close("rms_norm dweight accumulated", &dw_again, &dw, 1e-14);
    let fwd = |x: &[f64], wt: &[f64]| {
        let mut out = vec![0.0; n * c];
        let mut rstd = vec![0.0; n];
        k.rms_norm_forward(&mut out, &mut rstd, x, wt, c, eps);
        dot(&out, &w)
    };
    assert_grad("rms_norm dx", &x, &gx, |v| fwd(v, &weight));
    assert_grad("rms_norm dweight", &weight, &dw, |v| fwd(&x, v));
    // f32
    let k32 = CpuKernels::new(1);
    let (x32, wt32) = (to32(&x), to32(&weight));
    let mut out32 = vec![0.0f32; n * c];
    let mut rstd32 = vec![0.0f32; n];
    k32.rms_norm_forward(&mut out32, &mut rstd32, &x32, &wt32, c, eps as f32);
    f32_vs_f64("rms_norm forward", &out32, &out);
    let mut gx32 = vec![0.0f32; n * c];
    let mut gw32 = to32(&gw0);
    k32.rms_norm_backward(&mut gx32, &mut gw32, &to32(&w), &x32, &wt32, &rstd32, c, false);
    f32_vs_f64("rms_norm dx", &gx32, &gx);
    f32_vs_f64("rms_norm dweight", &gw32, &gw);
    // In f32 too, accumulating is the written gradient added to the old value, bit for bit.
    let mut gx32_acc = to32(&gx0);
    k32.rms_norm_backward(&mut gx32_acc, &mut gw32, &to32(&w), &x32, &wt32, &rstd32, c, true);
    let want: Vec<f32> = to32(&gx0).iter().zip(&gx32).map(|(a, b)| a + b).collect();
    assert_eq!(
        bits(&gx32_acc),
        bits(&want),
        "rms_norm dx accumulated (f32) is old + written"
    );
}

/// The per-head norm (query/key norms) is the RMSNorm of each head with its weight row, leaves the
/// other values of a row alone, and its gradients match finite differences.
#[test]
fn head_norm_forward_backward() {
    let k = k64(1);
    let mut rng = Rng::new(21);
    // 3 rows of 2 query heads, 1 key head and 1 untouched (value) head of 4.
    let (n, heads, split, hs) = (3, 3, 2, 4);
    let stride = (heads + 1) * hs;
    let eps = 1e-6;
    let x = rng.vec(n * stride, 1.0);
    let weight: Vec<f64> = rng.vec(2 * hs, 0.5).iter().map(|v| 1.0 + v).collect();
    let fwd = |x: &[f64], w: &[f64]| {
        let (mut y, mut hat, mut rstd) = (x.to_vec(), vec![0.0; n * heads * hs], vec![0.0; n * heads]);
        k.head_norm_forward(&mut y, &mut hat, &mut rstd, w, stride, heads, split, hs, eps);
        (y, hat, rstd)
    };
    let (y, hat, rstd) = fwd(&x, &weight);
    for i in 0..n {
        for h in 0..heads + 1 {
            let at = i * stride + h * hs;
            let head = &x[at..at + hs];
            let want = if h < heads {
                let (mut out, mut r) = (vec![0.0; hs], [0.0]);
                let w = &weight[usize::from(h >= split) * hs..][..hs];
                k.rms_norm_forward(&mut out, &mut r, head, w, hs, eps);
                assert!(
                    (rstd[i * heads + h] - r[0]).abs() <= 1e-14 * r[0],
                    "rstd row {i} head {h}"
                );
                out
            } else {
                head.to_vec()
            };
            assert_close(&format!("head_norm row {i} head {h}"), &y[at..at + hs], &want, 1e-14);
        }
    }
    let g = rng.vec(n * stride, 1.0);
    let gw0 = rng.vec(2 * hs, 1.0);
    let (mut gx, mut gw) = (g.clone(), gw0.clone());
    k.head_norm_backward(&mut gx, &mut gw, &hat, &weight, &rstd, stride, heads, split, hs);
    let dw: Vec<f64> = gw.iter().zip(&gw0).map(|(a, b)| a - b).collect();
    assert_grad("head_norm dx", &x, &gx, |v| dot(&fwd(v, &weight).0, &g));
    assert_grad("head_norm dweight", &weight, &dw, |v| dot(&fwd(&x, v).0, &g));
    // f32, and the same bits for any thread count.
    let (x32, w32, g32) = (to32(&x), to32(&weight), to32(&g));
    let run32 = |kern: &CpuKernels| {
        let (mut y, mut hat, mut rstd) = (x32.clone(), vec![0.0f32; n * heads * hs], vec![0.0f32; n * heads]);
        kern.head_norm_forward(&mut y, &mut hat, &mut rstd, &w32, stride, heads, split, hs, eps as f32);
        let (mut gx, mut gw) = (g32.clone(), to32(&gw0));
        kern.head_norm_backward(&mut gx, &mut gw, &hat, &w32, &rstd, stride, heads, split, hs);
        (bits(&y), bits(&gx), bits(&gw))
    };
    let (y32, gx32, gw32) = run32(&CpuKernels::new(1));
    let from_bits = |b: &[u32]| b.iter().map(|&v| f32::from_bits(v)).collect::<Vec<f32>>();
    f32_vs_f64("head_norm forward", &from_bits(&y32), &y);
    f32_vs_f64("head_norm dx", &from_bits(&gx32), &gx);
    f32_vs_f64("head_norm dweight", &from_bits(&gw32), &gw);
    assert_deterministic("head_norm", run32);
}

// ---------------------------------------------------------------------------------------------
// Rotary
// ---------------------------------------------------------------------------------------------

fn rope_tables(seq: usize, hs: usize) -> (Vec<f64>, Vec<f64>) {
    let half = hs / 2;
    let mut cos = vec![0.0; seq * half];
    let mut sin = vec![0.0; seq * half];
    for p in 0..seq {
        for j in 0..half {
            let theta = p as f64 / 10000f64.powf(2.0 * j as f64 / hs as f64);
            cos[p * half + j] = theta.cos();
            sin[p * half + j] = theta.sin();
        }
    }
    (cos, sin)
}

#[test]
fn rotary_forward_backward() {
    let k = k64(1);
    let mut rng = Rng::new(6);
    let (seq, batch, heads, hs) = (5, 2, 3, 4);
    let stride = heads * hs + 5; // extra columns must be left alone
    let n = seq * batch;
    let (cos, sin) = rope_tables(seq, hs);
    let x = rng.vec(n * stride, 1.0);
    let mut y = x.clone();
    k.rotary(&mut y, stride, heads, hs, seq, &cos, &sin, false);
    // reference: HF rotate-half with full-width cos/sin tables
    let half = hs / 2;
    for i in 0..n {
        let p = i % seq;
        for h in 0..heads {
            for d in 0..hs {
                let j = d % half;
                let (c, s) = (cos[p * half + j], sin[p * half + j]);
                let xv = x[i * stride + h * hs + d];
                let rot = if d < half {
                    -x[i * stride + h * hs + d + half]
                } else {
                    x[i * stride + h * hs + d - half]
                };
                let want = xv * c + rot * s;
                assert!((y[i * stride + h * hs + d] - want).abs() < 1e-14);
            }
        }
        assert_eq!(
            &y[i * stride + heads * hs..(i + 1) * stride],
            &x[i * stride + heads * hs..(i + 1) * stride]
        );
    }
    // inverse undoes the forward
    let mut back = y.clone();
    k.rotary(&mut back, stride, heads, hs, seq, &cos, &sin, true);
    assert_close("rotary inverse", &back, &x, 1e-14);
    // gradient: backward = inverse rotation of the upstream gradient
    let w = rng.vec(n * stride, 1.0);
    let mut g = w.clone();
    k.rotary(&mut g, stride, heads, hs, seq, &cos, &sin, true);
    assert_grad("rotary", &x, &g, |v| {
        let mut y = v.to_vec();
        k.rotary(&mut y, stride, heads, hs, seq, &cos, &sin, false);
        dot(&y, &w)
    });
    // f32
    let mut y32 = to32(&x);
    CpuKernels::new(1).rotary(&mut y32, stride, heads, hs, seq, &to32(&cos), &to32(&sin), false);
    f32_vs_f64("rotary", &y32, &y);
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

fn attention_case(batch: usize, seq: usize, heads: usize, kv: usize, hs: usize, check_grad: bool) {
    windowed_attention_case((batch, seq, heads, kv, hs), None, check_grad);
}

/// [`attention_case`] with a sliding window: f64 against the loop reference (and finite differences),
/// f32 against f64.
fn windowed_attention_case(
    (batch, seq, heads, kv, hs): (usize, usize, usize, usize, usize),
    window: Option<usize>,
    check_grad: bool,
) {
    let k = k64(1);
    let mut rng = Rng::new(7 + seq as u64);
    let stride = (heads + 2 * kv) * hs;
    let qkv = rng.vec(batch * seq * stride, 1.5);
    let (want_out, want_probs) = naive_attention(&qkv, (batch, seq, heads, kv, hs), window);
    let mut out = vec![0.0; batch * seq * heads * hs];
    let mut probs = vec![f64::NAN; batch * heads * seq * seq]; // garbage must be overwritten
    k.attention_forward(&mut out, &mut probs, &qkv, batch, seq, heads, kv, hs, window);
    let tag = format!("attention b{batch} s{seq} h{heads} kv{kv} d{hs} window {window:?}");
    assert_close(&format!("{tag} out"), &out, &want_out, 1e-13);
    assert_close(&format!("{tag} probs"), &probs, &want_probs, 1e-13);

    let w = rng.vec(out.len(), 1.0);
    let mut grad = vec![f64::NAN; qkv.len()];
    let mut scratch = vec![f64::NAN; probs.len()];
    k.attention_backward(
        &mut grad,
        &mut scratch,
        &w,
        &[],
        &qkv,
        &probs,
        batch,
        seq,
        heads,
        kv,
        hs,
        window,
    );
    if check_grad {
        assert_grad(&format!("{tag} grad"), &qkv, &grad, |x| {
            let mut out = vec![0.0; batch * seq * heads * hs];
            let mut probs = vec![0.0; batch * heads * seq * seq];
            k.attention_forward(&mut out, &mut probs, x, batch, seq, heads, kv, hs, window);
            dot(&out, &w)
        });
    } else {
        assert!(grad.iter().all(|v| v.is_finite()));
    }

    // f32 path
    let k32 = CpuKernels::new(1);
    let qkv32 = to32(&qkv);
    let mut out32 = vec![0.0f32; out.len()];
    let mut probs32 = vec![0.0f32; probs.len()];
    k32.attention_forward(&mut out32, &mut probs32, &qkv32, batch, seq, heads, kv, hs, window);
    f32_vs_f64(&format!("{tag} out"), &out32, &out);
    f32_vs_f64(&format!("{tag} probs"), &probs32, &probs);
    let mut grad32 = vec![0.0f32; qkv.len()];
    let mut scratch32 = vec![0.0f32; probs.len()];
    k32.attention_backward(
        &mut grad32,
        &mut scratch32,
        &to32(&w),
        &[],
        &qkv32,
        &probs32,
        batch,
        seq,
        heads,
        kv,
        hs,
        window,
    );
    f32_vs_f64(&format!("{tag} grad"), &grad32, &grad);
}

#[test]
fn attention_gqa_gradients() {
    attention_case(2, 5, 4, 2, 4, true);
}

#[test]
fn attention_mha_and_mqa_gradients() {
    attention_case(1, 6, 2, 2, 4, true);
    attention_case(1, 4, 3, 1, 2, true);
}

#[test]
fn attention_multi_block_forward() {
    // seq spans several causal blocks (including a partial one).
    attention_case(2, 150, 4, 2, 8, false);
}

#[test]
fn attention_multi_block_gradient() {
    // A gradient check over several blocks, on a subset-sized problem (grad_check is O(n^2)).
    attention_case(1, 70, 2, 1, 2, true);
}

#[test]
fn attention_head_sizes_forward() {
    // The f32 SIMD path (head sizes that are multiples of 8) against f64, incl. GQA, partial tiles
    // and panels, and (seq 600) several row super-blocks.
    attention_case(1, 600, 2, 1, 8, false);
    attention_case(2, 37, 4, 2, 16, false);
    attention_case(1, 100, 2, 2, 24, false);
    attention_case(2, 77, 4, 1, 32, false);
    attention_case(1, 45, 2, 2, 40, false);
    attention_case(1, 129, 2, 1, 64, false);
    attention_case(1, 23, 1, 1, 128, false);
    attention_case(1, 9, 2, 1, 256, false);
    attention_case(1, 17, 2, 1, 264, false);
}

#[test]
fn attention_sliding_window_gradients_and_forward() {
    // Windows of one key (each token sees only itself), shorter than a block, spanning blocks, and
    // covering the whole sequence; GQA and MQA; the f32 SIMD head sizes.
    windowed_attention_case((2, 5, 4, 2, 4), Some(2), true);
    windowed_attention_case((1, 6, 2, 2, 4), Some(1), true);
    windowed_attention_case((1, 70, 2, 1, 2), Some(17), true);
    windowed_attention_case((1, 4, 3, 1, 2), Some(9), true);
    windowed_attention_case((1, 600, 2, 1, 8), Some(100), false);
    windowed_attention_case((2, 77, 4, 1, 32), Some(1), false);
    windowed_attention_case((1, 129, 2, 1, 64), Some(64), false);
}

/// A window of one key: each token's output is its own value row (softmax over one score).
#[test]
fn a_window_of_one_returns_each_tokens_value() {
    let (batch, seq, heads, kv, hs) = (2, 9, 4, 2, 8);
    let stride = (heads + 2 * kv) * hs;
    let qkv = rand32(&mut Rng::new(3), batch * seq * stride, 2.0);
    let mut out = vec![f32::NAN; batch * seq * heads * hs];
    let mut probs = vec![f32::NAN; batch * heads * seq * seq];
    CpuKernels::new(1).attention_forward(&mut out, &mut probs, &qkv, batch, seq, heads, kv, hs, Some(1));
    for t in 0..batch * seq {
        for h in 0..heads {
            let v = &qkv[t * stride + (heads + kv + h / (heads / kv)) * hs..][..hs];
            let o = &out[t * heads * hs + h * hs..][..hs];
            let err = o.iter().zip(v).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= 1e-6, "token {t} head {h}: differs from its value row by {err:e}");
        }
    }
}

/// Runs f32 attention forward and backward on buffers pre-filled with NaN, through `path`;
/// returns (out, probs, grad).
#[allow(clippy::type_complexity)]
fn attention_f32(
    path: super::AttnPath,
    qkv: &[f32],
    gout: &[f32],
    shape: (usize, usize, usize, usize, usize),
    window: Option<usize>,
    threads: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (batch, seq, heads, kv, hs) = shape;
    let k = CpuKernels::new(threads);
    super::ATTN_PATH.with(|f| f.set(path));
    let mut out = vec![f32::NAN; gout.len()];
    let mut probs = vec![f32::NAN; batch * heads * seq * seq];
    k.attention_forward(&mut out, &mut probs, qkv, batch, seq, heads, kv, hs, window);
    let mut grad = vec![f32::NAN; qkv.len()];
    let mut scratch = vec![f32::NAN; probs.len()];
    k.attention_backward(
        &mut grad,
        &mut scratch,
        gout,
        &[],
        qkv,
        &probs,
        batch,
        seq,
        heads,
        kv,
        hs,
        window,
    );
    super::ATTN_PATH.with(|f| f.set(super::AttnPath::Auto));
    (out, probs, grad)
}

#[test]
fn attention_simd_matches_generic_f32() {
    let wide = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    for (i, &shape) in [
        (2, 256, 8, 8, 32),
        (1, 600, 2, 1, 8),
        (3, 70, 4, 2, 16),
        (2, 150, 4, 4, 24),
        (1, 130, 6, 2, 64),
        (1, 65, 2, 1, 128),
        (1, 40, 2, 2, 48),
        (1, 33, 2, 1, 256),
        (2, 5, 2, 2, 8),
        (1, 1, 1, 1, 32),
    ]
    .iter()
    .enumerate()
    {
        let (batch, seq, heads, kv, hs) = shape;
        let mut rng = Rng::new(100 + i as u64);
        let qkv = rand32(&mut rng, batch * seq * (heads + 2 * kv) * hs, 2.0);
        let gout = rand32(&mut rng, batch * seq * heads * hs, 1.0);
        // Full causal, a sliding window of about a third of the sequence, and one shorter than a tile
        // of rows (so tiles start before a row's window and panels end before the block's last row).
        for window in [None, Some(seq / 3 + 1), Some(3)] {
            let slow = attention_f32(AttnPath::Generic, &qkv, &gout, shape, window, 1);
            for path in [AttnPath::Auto, AttnPath::Avx2] {
                let fast = attention_f32(path, &qkv, &gout, shape, window, 1);
                let tag = format!("attention {path:?} vs generic {shape:?} window {window:?}");
                assert_close(&format!("{tag} out"), &wide(&fast.0), &wide(&slow.0), 1e-5);
                assert_close(&format!("{tag} probs"), &wide(&fast.1), &wide(&slow.1), 1e-5);
                assert_close(&format!("{tag} grad"), &wide(&fast.2), &wide(&slow.2), 1e-5);
                // The masked part of probs is exactly zero: above the diagonal and before the window.
                for bh in 0..batch * heads {
                    for r in 0..seq {
                        let row = &fast.1[(bh * seq + r) * seq..][..seq];
                        assert!(
                            row[r + 1..].iter().all(|&x| x == 0.0),
                            "{tag}: probs above the diagonal"
                        );
                        let first = window.map_or(0, |w| (r + 1).saturating_sub(w));
                        assert!(row[..first].iter().all(|&x| x == 0.0), "{tag}: probs before the window");
                    }
                }
                // Bitwise identical across thread counts.
                for threads in [2, 4] {
                    let t = attention_f32(path, &qkv, &gout, shape, window, threads);
                    assert!(
                        bits(&t.0) == bits(&fast.0) && bits(&t.1) == bits(&fast.1) && bits(&t.2) == bits(&fast.2),
                        "{tag}: results differ between 1 and {threads} threads"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------

#[test]
fn swiglu_forward_backward() {
    let k = k64(1);
    let mut rng = Rng::new(8);
    let (n, inter) = (3, 5);
    let gu = rng.vec(n * 2 * inter, 3.0);
    let mut out = vec![0.0; n * inter];
    k.swiglu_forward(&mut out, &gu, inter);
    for i in 0..n {
        for j in 0..inter {
            let (g, u) = (gu[i * 2 * inter + j], gu[i * 2 * inter + inter + j]);
            let want = g / (1.0 + (-g).exp()) * u;
            assert!((out[i * inter + j] - want).abs() < 1e-14);
        }
    }
    let w = rng.vec(n * inter, 1.0);
    let mut g = vec![0.0; gu.len()];
    k.swiglu_backward(&mut g, &w, &gu, inter);
    assert_grad("swiglu", &gu, &g, |x| {
        let mut out = vec![0.0; n * inter];
        k.swiglu_forward(&mut out, x, inter);
        dot(&out, &w)
    });
    let k32 = CpuKernels::new(1);
    let mut out32 = vec![0.0f32; out.len()];
    k32.swiglu_forward(&mut out32, &to32(&gu), inter);
    f32_vs_f64("swiglu forward", &out32, &out);
    let mut g32 = vec![0.0f32; g.len()];
    k32.swiglu_backward(&mut g32, &to32(&w), &to32(&gu), inter);
    f32_vs_f64("swiglu backward", &g32, &g);
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

#[test]
fn cross_entropy_loss_and_gradient() {
    let k = k64(1);
    let mut rng = Rng::new(9);
    let (n, vocab) = (4, 7);
    let mut logits = rng.vec(n * vocab, 3.0);
    logits[3] = 500.0; // stability: a huge logit must not overflow
    let targets = rng.tokens(n, vocab);
    let naive = |l: &[f64]| -> f64 {
        (0..n)
            .map(|i| {
                let row = &l[i * vocab..(i + 1) * vocab];
                let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|v| (v - mx).exp()).sum();
                mx + z.ln() - row[targets[i] as usize]
            })
            .sum()
    };
    let want = naive(&logits);
    let mut scratch = logits.clone();
    let got = k.cross_entropy(&mut scratch, &targets, vocab, None);
    assert!((got - want).abs() <= 1e-13 * want.abs(), "{got} vs {want}");
    let scale = 0.37;
    let mut grad = logits.clone();
    let got = k.cross_entropy(&mut grad, &targets, vocab, Some(scale));
    assert!((got - want).abs() <= 1e-13 * want.abs());
    // L = scale * loss_sum
    assert_grad("cross_entropy", &logits, &grad, |x| {
        let mut l = x.to_vec();
        scale * k.cross_entropy(&mut l, &targets, vocab, None)
    });
    // f32
    let mut g32 = to32(&logits);
    let got32 = CpuKernels::new(1).cross_entropy(&mut g32, &targets, vocab, Some(scale as f32));
    assert!((got32 - want).abs() <= 1e-5 * want.abs());
    f32_vs_f64("cross_entropy grad", &g32, &grad);
}

// ---------------------------------------------------------------------------------------------
// AdamW, sum_squares
// ---------------------------------------------------------------------------------------------

/// PyTorch's single-tensor AdamW (torch/optim/adamw.py, `_single_tensor_adamw`), scalar by scalar,
/// with the gradient pre-multiplied by the clipping factor.
#[allow(clippy::too_many_arguments)]
fn torch_adamw(
    w: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    wd: f64,
    gs: f64,
    step: u64,
) {
    let bc1 = 1.0 - b1.powf(step as f64);
    let bc2 = 1.0 - b2.powf(step as f64);
    let step_size = lr / bc1;
    let bc2_sqrt = bc2.sqrt();
    for i in 0..w.len() {
        let grad = g[i] * gs;
        w[i] *= 1.0 - lr * wd;
        m[i] += (grad - m[i]) * (1.0 - b1); // lerp
        v[i] = v[i] * b2 + (1.0 - b2) * grad * grad;
        let denom = v[i].sqrt() / bc2_sqrt + eps;
        w[i] -= step_size * m[i] / denom;
    }
}

#[test]
fn adamw_matches_pytorch_formulas() {
    let mut rng = Rng::new(10);
    let n = 50_000; // large enough to split across threads
    let (lr, b1, b2, eps, wd, gs) = (1e-2, 0.9, 0.95, 1e-8, 0.1, 0.7);
    let w0 = rng.vec(n, 1.0);
    let (mut wr, mut mr, mut vr) = (w0.clone(), vec![0.0; n], vec![0.0; n]);
    let (mut wk, mut mk, mut vk) = (w0.clone(), vec![0.0; n], vec![0.0; n]);
    let (mut w32, mut m32, mut v32) = (to32(&w0), vec![0.0f32; n], vec![0.0f32; n]);
    let mut w_t: Vec<Vec<f64>> = Vec::new();
    for step in 1..=5u64 {
        let g = rng.vec(n, 1.0);
        torch_adamw(&mut wr, &g, &mut mr, &mut vr, lr, b1, b2, eps, wd, gs, step);
        Kernels::<f64>::adamw(
            &k64(2),
            &mut wk,
            &g,
            &mut mk,
            &mut vk,
            None,
            lr,
            b1,
            b2,
            eps,
            wd,
            gs,
            step,
        );
        // With the compute copy requested: on the CPU the compute type is the master's, a plain copy.
        let mut copy = vec![f32::NAN; n];
        Kernels::<f32>::adamw(
            &CpuKernels::new(2),
            &mut w32,
            &to32(&g),
            &mut m32,
            &mut v32,
            Some(&mut copy),
            lr as f32,
            b1 as f32,
            b2 as f32,
            eps as f32,
            wd as f32,
            gs as f32,
            step,
        );
        assert_eq!(bits(&copy), bits(&w32), "adamw copy step {step}");
        assert_close(&format!("adamw w step {step}"), &wk, &wr, 1e-12);
        assert_close(&format!("adamw m step {step}"), &mk, &mr, 1e-12);
        assert_close(&format!("adamw v step {step}"), &vk, &vr, 1e-12);
        f32_vs_f64("adamw w", &w32, &wr);
        w_t.push(wk.clone());
    }
    // The update actually moves the weights.
    assert!(rel_err(&w_t[4], &w0) > 1e-3);
}

#[test]
fn sum_squares_matches_the_sum() {
    let mut rng = Rng::new(11);
    let n = 100_003;
    let x = rng.vec(n, 1.0);
    let want: f64 = x.iter().map(|v| v * v).sum();
    let got = Kernels::<f64>::sum_squares(&k64(2), &x);
    assert!((got - want).abs() <= 1e-12 * want);
    let got32 = Kernels::<f32>::sum_squares(&CpuKernels::new(2), &to32(&x));
    assert!((got32 - want).abs() <= 1e-6 * want);
    assert_eq!(Kernels::<f64>::sum_squares(&k64(2), &[]), 0.0);
}

// ---------------------------------------------------------------------------------------------
// Determinism across thread counts (f32, the training type)
// ---------------------------------------------------------------------------------------------

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Runs `f` with 1, 2 and 4 threads and asserts the outputs are bitwise identical.
fn assert_deterministic<R: PartialEq + std::fmt::Debug>(name: &str, f: impl Fn(&CpuKernels) -> R) {
    let base = f(&CpuKernels::new(1));
    for threads in [2, 4] {
        let got = f(&CpuKernels::new(threads));
        assert!(got == base, "{name}: results differ between 1 and {threads} threads");
    }
}

fn rand32(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    to32(&rng.vec(n, scale))
}

#[test]
fn determinism_matmul() {
    let mut rng = Rng::new(12);
    let shapes = [
        (512, 768, 256),
        (2048, 256, 768),
        (256, 768, 2048),
        (127, 33, 65),
        (1, 300, 257),
        (513, 7, 1000),
        (333, 517, 129),
        (3, 1000, 700),
    ];
    for &(m, n, k) in &shapes {
        for &(ta, tb) in &TRANSPOSES {
            let a = rand32(&mut rng, m * k, 1.0);
            let b = rand32(&mut rng, k * n, 1.0);
            let c0 = rand32(&mut rng, m * n, 1.0);
            for acc in [false, true] {
                assert_deterministic(&format!("matmul {m}x{n}x{k} ta={ta} tb={tb} acc={acc}"), |kern| {
                    let mut c = c0.clone();
                    kern.matmul(&mut c, &a, &b, m, n, k, ta, tb, acc);
                    bits(&c)
                });
            }
        }
    }
}

#[test]
fn determinism_attention() {
    let mut rng = Rng::new(13);
    let (batch, seq, heads, kv, hs) = (3, 200, 8, 4, 32);
    let stride = (heads + 2 * kv) * hs;
    let qkv = rand32(&mut rng, batch * seq * stride, 2.0);
    let gout = rand32(&mut rng, batch * seq * heads * hs, 1.0);
    assert_deterministic("attention fwd/bwd", |kern| {
        let mut out = vec![0.0f32; gout.len()];
        let mut probs = vec![0.0f32; batch * heads * seq * seq];
        kern.attention_forward(&mut out, &mut probs, &qkv, batch, seq, heads, kv, hs, None);
        let mut grad = vec![0.0f32; qkv.len()];
        let mut scratch = vec![0.0f32; probs.len()];
        kern.attention_backward(
            &mut grad,
            &mut scratch,
            &gout,
            &[],
            &qkv,
            &probs,
            batch,
            seq,
            heads,
            kv,
            hs,
            None,
        );
        (bits(&out), bits(&probs), bits(&grad))
    });
}

#[test]
fn determinism_row_kernels() {
    let mut rng = Rng::new(14);
    let (n, c, vocab, inter) = (3001, 256, 256, 96);
    let x = rand32(&mut rng, n * c, 1.0);
    let go = rand32(&mut rng, n * c, 1.0);
    let weight = rand32(&mut rng, c, 1.0);
    let gw0 = rand32(&mut rng, c, 1.0);
    assert_deterministic("rms_norm fwd/bwd", |kern| {
        let mut out = vec![0.0f32; n * c];
        let mut rstd = vec![0.0f32; n];
        kern.rms_norm_forward(&mut out, &mut rstd, &x, &weight, c, 1e-5);
        let mut gx = vec![0.0f32; n * c];
        let mut gw = gw0.clone();
        kern.rms_norm_backward(&mut gx, &mut gw, &go, &x, &weight, &rstd, c, false);
        let mut gx_acc = go.clone();
        kern.rms_norm_backward(&mut gx_acc, &mut gw, &go, &x, &weight, &rstd, c, true);
        (bits(&out), bits(&rstd), bits(&gx), bits(&gw), bits(&gx_acc))
    });
    let logits = rand32(&mut rng, n * vocab, 5.0);
    let targets = rng.tokens(n, vocab);
    assert_deterministic("cross_entropy", |kern| {
        let mut l = logits.clone();
        let loss = kern.cross_entropy(&mut l, &targets, vocab, Some(1.0 / n as f32));
        let mut l2 = logits.clone();
        let loss2 = kern.cross_entropy(&mut l2, &targets, vocab, None);
        (loss.to_bits(), loss2.to_bits(), bits(&l))
    });
    let big = rand32(&mut rng, 5_000_017, 1.0);
    assert_deterministic("sum_squares", |kern| Kernels::<f32>::sum_squares(kern, &big).to_bits());
    let tokens = rng.tokens(n, 50);
    let table0 = rand32(&mut rng, 50 * c, 1.0);
    assert_deterministic("embedding bwd", |kern| {
        let mut t = table0.clone();
        kern.embedding_backward(&mut t, &tokens, &go, c);
        bits(&t)
    });
    let gu = rand32(&mut rng, n * 2 * inter, 2.0);
    let gso = rand32(&mut rng, n * inter, 1.0);
    assert_deterministic("swiglu bwd", |kern| {
        let mut g = vec![0.0f32; gu.len()];
        kern.swiglu_backward(&mut g, &gso, &gu, inter);
        bits(&g)
    });
    let g = rand32(&mut rng, 300_001, 1.0);
    assert_deterministic("adamw", |kern| {
        let (mut w, mut m, mut v) = (x[..300_001].to_vec(), vec![0.0f32; 300_001], vec![0.0f32; 300_001]);
        for step in 1..=3 {
            Kernels::<f32>::adamw(
                kern, &mut w, &g, &mut m, &mut v, None, 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.5, step,
            );
        }
        (bits(&w), bits(&m), bits(&v))
    });
}

#[test]
fn fast_exp_f32_accuracy() {
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let want = (x as f64).exp();
        let got = super::exp_f32(x) as f64;
        worst = worst.max((got - want).abs() / want);
        x += 0.000_37;
    }
    assert!(worst < 3e-7, "exp_f32 relative error {worst:e}");
    assert_eq!(super::exp_f32(0.0), 1.0);
    for x in [-1e30f32, -200.0, -88.0, f32::NEG_INFINITY] {
        let y = super::exp_f32(x);
        assert!((0.0..1e-37).contains(&y), "exp_f32({x}) = {y}");
    }
    assert!(super::exp_f32(1e30).is_finite());
}
