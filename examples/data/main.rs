//! Data-pipeline figures: prepare (byte-level, and with a HuggingFace tokenizer when one is given),
//! open + verify, and sampling throughput.
//!
//! ```text
//! cargo run --release --example data -- [TEXT_FILE] [TOKENIZER_JSON]
//! ```
//!
//! `TEXT_FILE` defaults to `examples/data/tinyshakespeare.txt`.

use fast_llm_rs::data::{prepare, PrepareOptions, SequenceSampler, TokenDataset};
use std::path::PathBuf;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let input = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "examples/data/tinyshakespeare.txt".into()),
    );
    let tokenizer = args.next().map(PathBuf::from);
    let work = tempfile::tempdir()?;
    let input_bytes = std::fs::metadata(&input)?.len();
    println!(
        "input {} ({input_bytes} bytes), {} rayon threads",
        input.display(),
        rayon::current_num_threads()
    );

    let mut tokenizers = vec![None];
    if tokenizer.is_some() {
        tokenizers.push(tokenizer);
    }
    for tok in tokenizers {
        let label = if tok.is_some() { "huggingface" } else { "byte-level" };
        let out = work.path().join(label);
        let mut opts = PrepareOptions::new(vec![input.clone()], &out);
        opts.tokenizer = tok;
        let report = prepare(&opts)?;
        println!("{label}: {report}");

        let vocab = report.metadata.vocab_size;
        let t = Instant::now();
        let train = TokenDataset::open(&out, "training", vocab)?;
        let open_s = t.elapsed().as_secs_f64();
        let bytes = train.len() * train.dtype().size() as u64;
        println!(
            "{label}: open+verify training ({bytes} bytes): {:.2} ms ({:.2} GB/s)",
            open_s * 1e3,
            bytes as f64 / open_s / 1e9
        );
        let t = Instant::now();
        TokenDataset::open(&out, "validation", vocab)?;
        println!(
            "{label}: open+verify validation: {:.2} ms",
            t.elapsed().as_secs_f64() * 1e3
        );

        let seq = 2048u64.min(train.len() - 1);
        let sampler = SequenceSampler::for_dataset(1234, &train, seq)?;
        let (mut x, mut y) = (vec![0u32; seq as usize], vec![0u32; seq as usize]);
        let n = 20_000u64;
        let t = Instant::now();
        let mut sum = 0u64;
        for i in 0..n {
            sampler.fill(&train, i, &mut x, &mut y);
            std::hint::black_box((&mut x, &mut y));
            sum += u64::from(x[i as usize % x.len()]) + u64::from(y[0]);
        }
        let dt = t.elapsed().as_secs_f64();
        println!(
            "{label}: sampling {n} x {seq} tokens: {:.1} M tokens/s, {:.2} us/sample (checksum {sum})",
            (n * seq) as f64 / dt / 1e6,
            dt / n as f64 * 1e6
        );
    }
    Ok(())
}
