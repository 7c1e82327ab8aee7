//! The `fast-llm-rs` command line: `train`, `prepare`, `plan`, `convert`, `generate`.

use clap::{Parser, Subcommand};
use fast_llm_rs::config::load_config;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "fast-llm-rs",
    version,
    about = "Train Llama-style models with multi-stage ZeRO sharding"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model: `fast-llm-rs train --config cfg.yaml training.train_iters=100`.
    Train {
        /// YAML config (Fast-LLM field names).
        #[arg(long, short)]
        config: PathBuf,
        /// Dotted overrides `section.field=value`, applied after the file.
        overrides: Vec<String>,
    },
    /// Tokenize text or JSONL files into a memory-mapped dataset with a train/validation split.
    Prepare {
        /// Output directory.
        #[arg(long, short)]
        output: PathBuf,
        /// HuggingFace `tokenizer.json` (default: byte-level, vocabulary 256).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Field holding the text in JSONL inputs.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// Fraction of the tokens (the end of the stream) kept for validation.
        #[arg(long, default_value_t = 0.1)]
        validation_fraction: f64,
        /// Input files (`.txt` or `.jsonl`).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Per-rank memory and communication of a config, for ZeRO stages 1, 2 and 3, without allocating.
    Plan {
        /// YAML config.
        #[arg(long, short)]
        config: PathBuf,
        /// Device memory to check against, e.g. `80GiB`.
        #[arg(long)]
        device_memory: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Dotted overrides.
        overrides: Vec<String>,
    },
    /// Convert checkpoints (Fast-LLM form):
    /// `convert input.path=DIR input.format=distributed output.path=DIR output.format=llama`.
    /// Also `llama` -> `llama` (re-save: `output.dtype=bfloat16`, `output.max_shard_size=2GB`).
    Convert {
        /// `input.path=..`, `input.format=llama|distributed`, `output.path=..`, `output.format=llama`,
        /// `output.dtype=float32|bfloat16|float16`, `output.max_shard_size=5GB`.
        args: Vec<String>,
    },
    /// Generate text from a checkpoint (HuggingFace Llama directory, or ours) with a KV cache.
    Generate {
        /// Checkpoint directory: a HuggingFace Llama directory, a distributed checkpoint, or an
        /// experiment directory (its newest checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// `llama` or `distributed` (default: `llama` if the directory has a config.json).
        #[arg(long, value_parser = ["llama", "distributed"])]
        format: Option<String>,
        /// Prompt.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 100)]
        max_new_tokens: usize,
        /// Greedy decoding (the default unless --temperature or --top-k is given).
        #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
        greedy: bool,
        /// Sampling temperature (> 0).
        #[arg(long)]
        temperature: Option<f32>,
        /// Sample among the K most likely tokens (0 = all).
        #[arg(long)]
        top_k: Option<usize>,
        /// Nucleus sampling: among the fewest most likely tokens holding this probability mass, in (0, 1].
        #[arg(long)]
        top_p: Option<f32>,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// HuggingFace tokenizer.json (default: the checkpoint's tokenizer.json, else byte-level).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Debug: write the prompt's logits (prompt_len x vocab, raw little-endian f32) to FILE and
        /// their shape and token ids to FILE.json.
        #[arg(long, hide = true)]
        dump_logits: Option<PathBuf>,
        /// Debug: print the generated token ids after the text.
        #[arg(long, hide = true)]
        print_ids: bool,
    },
}

/// SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) ask training to stop after the step in
/// progress, with a checkpoint; a second one ends the process at once. Returns the request flag and
/// the number of the signal that raised it.
fn stop_on_signals() -> anyhow::Result<(Arc<AtomicBool>, Arc<AtomicUsize>)> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let (flag, which) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    for sig in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag as the previous signal left it: set means a second one.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, flag.clone())?;
        signal_hook::flag::register_usize(sig, which.clone(), sig as usize)?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok((flag, which))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Train { config, overrides } => {
            let cfg = load_config(&config, &overrides)?;
            let (stop, which) = stop_on_signals()?;
            let opts = fast_llm_rs::train::TrainOptions {
                stop: Some(stop),
                ..Default::default()
            };
            let summary = fast_llm_rs::train::train(&cfg, &opts)?;
            if summary.stopped_at.is_some() {
                // The shell's convention for a process ended by signal N.
                return Ok(ExitCode::from((128 + which.load(Ordering::SeqCst)) as u8));
            }
        }
        Command::Prepare {
            output,
            tokenizer,
            text_field,
            validation_fraction,
            inputs,
        } => {
            let report = fast_llm_rs::data::prepare(&fast_llm_rs::data::PrepareOptions {
                inputs,
                output,
                tokenizer,
                text_field,
                validation_fraction,
            })?;
            println!("{report}");
        }
        Command::Plan {
            config,
            device_memory,
            json,
            overrides,
        } => {
            let cfg = load_config(&config, &overrides)?;
            let mem = device_memory
                .as_deref()
                .map(fast_llm_rs::plan::parse_bytes)
                .transpose()?;
            let p = fast_llm_rs::plan::plan(&cfg, mem)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&fast_llm_rs::plan::to_json(&p))?);
            } else {
                print!("{}", fast_llm_rs::plan::render(&p));
            }
        }
        Command::Convert { args } => {
            let args = fast_llm_rs::hf::ConvertArgs::parse(&args)?;
            println!("{}", fast_llm_rs::hf::convert(&args)?);
        }
        Command::Generate {
            checkpoint,
            format,
            prompt,
            max_new_tokens,
            greedy: _,
            temperature,
            top_k,
            top_p,
            seed,
            tokenizer,
            dump_logits,
            print_ids,
        } => {
            use fast_llm_rs::generate::{run_generate, GenerateCommand, Sampling};
            let sampling = if temperature.is_some() || top_k.is_some() || top_p.is_some() {
                let temperature = temperature.unwrap_or(1.0);
                if !(temperature > 0.0 && temperature.is_finite()) {
                    anyhow::bail!("--temperature {temperature}: must be > 0 (use --greedy for argmax decoding)");
                }
                let top_p = top_p.unwrap_or(1.0);
                if !(top_p > 0.0 && top_p <= 1.0) {
                    anyhow::bail!("--top-p {top_p}: must be in (0, 1] (1 keeps every token)");
                }
                Sampling::TopK {
                    temperature,
                    top_k: top_k.unwrap_or(0),
                    top_p,
                    seed,
                }
            } else {
                Sampling::Greedy
            };
            run_generate(&GenerateCommand {
                checkpoint,
                format,
                prompt,
                max_new_tokens,
                sampling,
                tokenizer,
                dump_logits,
                print_ids,
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
