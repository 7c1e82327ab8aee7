//! The `fast-llm-rs` command line: `train`, `prepare`, `plan`, `convert`, `generate`.

use clap::{Parser, Subcommand};
use fast_llm_rs::config::load_config;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Convert checkpoints: `convert input.path=DIR input.format=distributed output.path=DIR output.format=llama`.
    Convert {
        /// `input.path=..`, `input.format=..`, `output.path=..`, `output.format=..`.
        args: Vec<String>,
    },
    /// Generate text from a checkpoint.
    Generate {
        /// Checkpoint directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Prompt.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 100)]
        max_new_tokens: usize,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train { config, overrides } => {
            let cfg = load_config(&config, &overrides)?;
            fast_llm_rs::train::train(&cfg, &Default::default())?;
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
        Command::Convert { .. } => {
            anyhow::bail!("convert is not implemented yet in this build (checkpoint conversion is tracked in the checkpoints issue)")
        }
        Command::Generate { .. } => {
            anyhow::bail!("generate is not implemented yet in this build (it needs checkpoints, tracked in the checkpoints issue)")
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
