//! Benchmarks the local (threads + shared memory) communicator on 2 ranks:
//! all-gather and reduce-scatter bandwidth for 1M..16M floats, all-reduce, and barrier latency.
//!
//! `cargo run --release --example bench_comm`
//!
//! Bandwidth is the size of the full (unsharded) buffer in bytes divided by the time per call; the
//! single-threaded `memcpy` of the same buffer is printed for reference.

use std::time::{Duration, Instant};

use fast_llm_rs::engine::distributed::local::run_ranks;
use fast_llm_rs::engine::distributed::Communicator;

const D: usize = 2;

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Seconds per call of `f`, measured by rank 0 between barriers (median of 5 rounds).
fn time_calls(c: &dyn Communicator, iters: usize, mut f: impl FnMut()) -> f64 {
    let mut rounds = Vec::new();
    for _ in 0..5 {
        c.barrier().unwrap();
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        c.barrier().unwrap();
        rounds.push(t.elapsed().as_secs_f64() / iters as f64);
    }
    rounds.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rounds[2]
}

fn main() -> anyhow::Result<()> {
    println!("local communicator, {D} ranks (bandwidth = full buffer bytes / time per call)");
    println!(
        "{:>10} {:>12} {:>16} {:>14} {:>12}",
        "floats", "memcpy GB/s", "all_gather GB/s", "red_scat GB/s", "all_red GB/s"
    );
    for &n in &[1usize << 20, 1 << 21, 1 << 22, 1 << 23, 1 << 24] {
        let bytes = n * 4;
        let iters = ((1usize << 26) / n).max(2);
        let src = vec![1f32; n];
        let mut dst = vec![0f32; n];
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(&mut dst).copy_from_slice(std::hint::black_box(&src));
        }
        let memcpy = t.elapsed().as_secs_f64() / iters as f64;
        let times = run_ranks(D, Duration::from_secs(60), |c| {
            let shard = vec![c.rank() as f32; n / D];
            let mut full = vec![0f32; n];
            let ag = time_calls(&c, iters, || c.all_gather(&shard, &mut full).unwrap());
            let mut out = vec![0f32; n / D];
            let rs = time_calls(&c, iters, || c.reduce_scatter(&full, &mut out, false).unwrap());
            let ar = time_calls(&c, iters, || c.all_reduce_sum(&mut full).unwrap());
            Ok((ag, rs, ar))
        })?;
        let (ag, rs, ar) = times[0];
        println!(
            "{:>10} {:>12.2} {:>16.2} {:>14.2} {:>12.2}",
            n,
            gbps(bytes, memcpy),
            gbps(bytes, ag),
            gbps(bytes, rs),
            gbps(bytes, ar)
        );
    }
    let iters = 100_000;
    let lat = run_ranks(D, Duration::from_secs(60), |c| {
        Ok(time_calls(&c, iters, || c.barrier().unwrap()))
    })?;
    println!("barrier round-trip: {:.2} us", lat[0] * 1e6);
    Ok(())
}
