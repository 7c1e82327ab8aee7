//! Training throughput of the example model: tokens/s, step time and exposed communication (time the
//! compute thread waited on restores/reduces) for ZeRO 1/2/3 on 1 and 2 ranks (local backend).
//!
//! `cargo run --release --example bench_train [steps] [world sizes, e.g. 1,2] [zero stages, e.g. 1,2,3]`
//! (`THREADS_PER_RANK=n` overrides the kernel threads per rank: cores / ranks by default)
//!
//! The model costs about 24.4 MFLOP per token (6 x 3.54M parameters + attention); the fraction of the
//! machine's f32 matrix-product peak is printed against `PEAK_GFLOPS` (default 220, this 2-core machine).

use fast_llm_rs::config::load_config;
use fast_llm_rs::train::{train, TrainOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: u64 = args.get(1).map_or(Ok(12), |s| s.parse())?;
    let worlds: Vec<usize> = args
        .get(2)
        .map_or("1,2".into(), |s| s.clone())
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let zeros: Vec<u8> = args
        .get(3)
        .map_or("1,2,3".into(), |s| s.clone())
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let peak: f64 = std::env::var("PEAK_GFLOPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(220.0);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/shakespeare.yaml");
    let flops_per_token = {
        let cfg = load_config(std::path::Path::new(example), &[])?;
        let b = &cfg.model.base_model;
        let params =
            fast_llm_rs::model::Llama::new(fast_llm_rs::model::ModelShape::from_config(b)?).num_params() as f64;
        // 6 x parameters + attention: 12 x layers x hidden x sequence (x 1/2 for causal masking is not
        // applied: the usual convention).
        6.0 * params + 12.0 * b.decoder.num_blocks as f64 * b.hidden_size as f64 * cfg.data.sequence_length as f64
    };
    println!(
        "example model: {:.1} MFLOP/token; {steps} steps per setting (first step excluded)",
        flops_per_token / 1e6
    );
    println!(
        "{:<7} {:<6} {:>12} {:>11} {:>14} {:>13}",
        "ranks", "zero", "tokens/s", "step (s)", "comm wait %", "% of peak"
    );
    for &world in &worlds {
        for &zero in &zeros {
            let dir = tempfile::tempdir()?;
            let cfg = load_config(
                std::path::Path::new(example),
                &[
                    format!("training.train_iters={steps}"),
                    "training.evaluators={}".into(),
                    format!("model.distributed.world_size={world}"),
                    format!("model.multi_stage.zero_stage={zero}"),
                    format!("run.experiment_dir={}", dir.path().display()),
                ],
            )?;
            let threads = std::env::var("THREADS_PER_RANK").ok().and_then(|t| t.parse().ok());
            let s = train(
                &cfg,
                &TrainOptions {
                    quiet: true,
                    threads_per_rank: threads,
                    ..Default::default()
                },
            )?;
            let global = cfg.data.micro_batch_size * world as u64;
            println!(
                "{:<7} {:<6} {:>12.0} {:>11.3} {:>14.1} {:>13.1}",
                world,
                zero,
                s.tokens_per_s,
                global as f64 / s.tokens_per_s,
                100.0 * s.comm_wait_fraction,
                100.0 * s.tokens_per_s * flops_per_token / (peak * 1e9)
            );
        }
    }
    Ok(())
}
