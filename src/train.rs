//! The training loop: setup (model, layout, data, ranks), then per step one batch through the
//! schedule, the optimizer on the shards, logging, evaluation and checkpoints.

use crate::backend::cpu::CpuKernels;
use crate::backend::cuda::ops::AttentionKernels;
use crate::backend::cuda::Device;
use crate::backend::{bf16, Element, Kernels};
use crate::config::{validate::global_batch_tokens, CommBackend, ComputeDtype, Shuffle, TrainConfig};
use crate::data::Source;
use crate::engine::checkpoint;
use crate::engine::distributed::local::run_ranks;
use crate::engine::distributed::nccl::{self, NcclLibrary};
use crate::engine::distributed::{launch, nccl_lib, Communicator};
use crate::engine::multi_stage::MultiStageLayout;
use crate::engine::optimizer::learning_rate;
use crate::engine::schedule::runner::{AdamStep, MemoryReport, RankEngine};
use crate::model::{Batch, Llama, ModelShape};
use anyhow::{anyhow, bail, Context};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One logged record (a line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metric {
    /// `training` or `validation`.
    pub phase: String,
    /// Optimizer step (1-based: the number of completed steps).
    pub step: u64,
    /// Mean loss (nats/token).
    pub loss: f64,
    /// Extra fields (lr, grad_norm, tokens_per_s, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// What a finished run returns (rank 0's view).
#[derive(Debug, Clone, Default)]
pub struct TrainSummary {
    /// Every training-step loss this run computed, in order (all steps, not only logged ones). A run
    /// resumed from a checkpoint of step `k` holds the losses of steps `k + 1..=train_iters` only.
    pub losses: Vec<f64>,
    /// Completed steps of the checkpoint this run resumed from (0 for a fresh run).
    pub resumed_from: u64,
    /// Validation losses `(step, loss)`.
    pub validation: Vec<(u64, f64)>,
    /// Final full weights in model order (gathered).
    pub final_weights: Vec<f32>,
    /// Per-rank memory.
    pub memory: Vec<MemoryReport>,
    /// Collective statistics of rank 0 over the whole run.
    pub comm_stats: Option<crate::engine::distributed::local::CommStats>,
    /// Mean tokens/s over the run (excluding the first step).
    pub tokens_per_s: f64,
    /// Mean fraction of step time spent waiting on communication.
    pub comm_wait_fraction: f64,
    /// Completed steps when a stop request ended the run early (its checkpoint holds them); `None`
    /// when the run trained to `train_iters`.
    pub stopped_at: Option<u64>,
}

/// Options that are not part of the config (tests, benchmarks).
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Do not print to the console.
    pub quiet: bool,
    /// Kernel threads per rank (default: available cores / ranks, at least 1).
    pub threads_per_rank: Option<usize>,
    /// Fault injection for tests: `(rank, step)` makes that rank panic while loading its first
    /// micro-batch of that (0-based) step, i.e. in the middle of the step.
    pub fail_rank_at_step: Option<(usize, u64)>,
    /// Tests: make checkpoint saves crash (see [`checkpoint::save`]): with `Some(n)`, ranks `>= n` fail
    /// before writing their file (or, when `n >= world size`, rank 0 fails before the marker).
    pub fail_checkpoint_after_files: Option<usize>,
    /// A stop request (the CLI sets it on SIGINT / SIGTERM): training ends after the step in progress,
    /// every rank at the same step (the request rides on the step's loss all-reduce), with a checkpoint
    /// of that step, and [`TrainSummary::stopped_at`] says where.
    pub stop: Option<Arc<AtomicBool>>,
    /// Tests: `(rank, step)` makes that rank alone request a stop during that (0-based) step.
    pub stop_rank_at_step: Option<(usize, u64)>,
}

struct Data {
    training: Option<Source>,
    eval: Vec<(String, u64, u64, Source)>,
}

fn open_data(cfg: &TrainConfig) -> anyhow::Result<Data> {
    let vocab = cfg.model.base_model.embeddings.vocab_size;
    let (seed, seq) = (cfg.model.distributed.seed, cfg.data.sequence_length);
    let shuffle = cfg.data.sampling.shuffle;
    let open = |name: &str, ds| Source::open(ds, &format!("data.datasets.{name}"), name, vocab, seed, seq, shuffle);
    let training = if cfg.training.train_iters > 0 {
        let ds = cfg.data.datasets.get("training").with_context(|| {
            "data.datasets.training is missing: training needs a dataset, e.g. \
             `data: {datasets: {training: {type: text, path: examples/data/tinyshakespeare.txt}}}`"
        })?;
        Some(open("training", ds)?)
    } else {
        None
    };
    let mut eval = Vec::new();
    for (name, ev) in &cfg.training.evaluators {
        let ds_name = ev.dataset_name.clone().unwrap_or_else(|| {
            if cfg.data.datasets.contains_key(name) {
                name.clone()
            } else {
                "validation".into()
            }
        });
        let ds = cfg.data.datasets.get(&ds_name).with_context(|| {
            format!(
                "training.evaluators.{name} reads dataset '{ds_name}', but data.datasets.{ds_name} is not set; \
                 add it or set training.evaluators.{name}.dataset_name"
            )
        })?;
        eval.push((name.clone(), ev.interval, ev.iterations, open(&ds_name, ds)?));
    }
    Ok(Data { training, eval })
}

fn human(n: f64) -> String {
    if n >= 1e12 {
        format!("{:.2}T", n / 1e12)
    } else if n >= 1e9 {
        format!("{:.2}G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// Append-only `metrics.jsonl` writer (rank 0).
struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { file })
    }

    fn write(&mut self, m: &Metric) -> anyhow::Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(m)?)?;
        self.file.flush()?;
        Ok(())
    }
}

/// Train a model as configured. Writes `config.yaml`, `metrics.jsonl` and `memory.json` into
/// `run.experiment_dir`.
///
/// `model.distributed.backend: local` runs `world_size` ranks as threads of this process;
/// `nccl` makes this process one rank of a group started by a launcher (see [`train_nccl`]).
pub fn train(cfg: &TrainConfig, opts: &TrainOptions) -> anyhow::Result<TrainSummary> {
    match cfg.model.distributed.backend {
        CommBackend::Local => train_local(cfg, opts),
        CommBackend::Nccl => train_nccl(cfg, opts),
    }
}

/// What every rank shares: the model, its layout, the batch geometry and the data.
struct Setup {
    model: Arc<Llama>,
    layout: Arc<MultiStageLayout>,
    batch: Batch,
    depth_first: usize,
    breadth_first: usize,
    global_tokens: u64,
    dir: PathBuf,
    data: Data,
    /// The GPU and the memory the engine allocates from (`use_cuda: true`); `None` on the CPU.
    device: Option<Device>,
}

/// What the step figures are measured against: model FLOPs per token and, on a GPU whose peak is
/// known, the peak of the devices the run uses.
#[derive(Debug, Clone, Copy)]
struct Throughput {
    /// [`model_flops_per_token`].
    flops_per_token: f64,
    /// Dense bf16 peak FLOP/s of all the run's GPUs (one for the local backend, whose ranks share GPU 0;
    /// one per rank with NCCL); `None` on the CPU, in fp32, or on an unknown GPU.
    peak_flops: Option<f64>,
}

impl Throughput {
    /// "12.3 TFLOP/s (MFU 4.5%)" at `tokens_per_s` (the MFU where the peak is known).
    fn describe(&self, tokens_per_s: f64) -> String {
        let flops = tokens_per_s * self.flops_per_token;
        let mfu = self
            .peak_flops
            .map(|p| format!(" (MFU {:.1}%)", 100.0 * flops / p))
            .unwrap_or_default();
        format!("{} model FLOP/s{mfu}", human(flops))
    }

    fn new(cfg: &TrainConfig, num_params: usize, gpu: Option<&str>) -> Self {
        let bf16 = cfg.model.distributed.compute_dtype == ComputeDtype::Bfloat16;
        let gpus = match cfg.model.distributed.backend {
            CommBackend::Local => 1.0,
            CommBackend::Nccl => cfg.model.distributed.world_size.max(1) as f64,
        };
        Throughput {
            flops_per_token: model_flops_per_token(cfg, num_params),
            peak_flops: gpu.filter(|_| bf16).and_then(gpu_peak_bf16).map(|p| p * gpus),
        }
    }
}

/// Model FLOPs per trained token: `6 x parameters + 12 x blocks x hidden x sequence` (the matrix
/// products forward and backward, plus attention's scores and weighted sums without the causal half;
/// the GPU issue's formula, which `bench_gpu` and the training log use). `num_params` counts every
/// parameter, embeddings and head included.
pub fn model_flops_per_token(cfg: &TrainConfig, num_params: usize) -> f64 {
    let b = &cfg.model.base_model;
    let attention = 12.0 * b.decoder.num_blocks as f64 * b.hidden_size as f64 * cfg.data.sequence_length as f64;
    6.0 * num_params as f64 + attention
}

/// Dense bf16 tensor-core peak FLOP/s of a GPU, from its name (NVIDIA's data sheets; SXM parts, the
/// PCIe H100 apart), for MFU; `None` for a GPU not listed.
pub fn gpu_peak_bf16(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    let tflops = if n.contains("H100") && n.contains("PCIE") {
        756.0
    } else if n.contains("H100") || n.contains("H200") || n.contains("H800") {
        989.4
    } else if n.contains("B200") {
        2250.0
    } else if n.contains("A100") || n.contains("A800") {
        312.0
    } else {
        return None;
    };
    Some(tflops * 1e12)
}

/// Which attention kernels a GPU run uses (the family `kind` where it applies), and what would select
/// the tensor-core ones when it does not.
fn attention_line(cfg: &TrainConfig, shape: &ModelShape, kind: AttentionKernels) -> String {
    use crate::backend::cuda::ops::tensor_core_attention_applies;
    use crate::backend::cuda::DType;
    let bf16 = cfg.model.distributed.compute_dtype == ComputeDtype::Bfloat16;
    let dtype = DType::from(cfg.model.distributed.compute_dtype);
    let seq = cfg.data.sequence_length as usize;
    let d = crate::plan::attention_dims(cfg, shape);
    if kind == AttentionKernels::Simple {
        "Attention: one-thread-per-row kernels (FAST_LLM_RS_ATTENTION=simple or FAST_LLM_RS_SIMPLE_ATTENTION is set)"
            .to_string()
    } else if d.windowed() {
        format!(
            "Attention: one-thread-per-row kernels, much slower: the tensor-core ones have no sliding window \
             (model.base_model.decoder.block.mixer.window_size = {} < data.sequence_length = {seq}; null or \
             >= the sequence selects them)",
            d.window.unwrap_or(0)
        )
    } else if tensor_core_attention_applies(dtype, &d) {
        format!(
            "Attention: tensor-core kernels ({}; bf16, head size {}, sequence {seq}){}",
            kind.name(),
            shape.head_size,
            stored_ds_note(cfg, shape, kind)
        )
    } else {
        format!(
            "Attention: one-thread-per-row kernels, much slower: the tensor-core ones need \
             model.distributed.compute_dtype = bfloat16 (is {}), a head size of 32, 64 or 128 (is {}) and \
             data.sequence_length a multiple of 64 (is {seq})",
            if bf16 { "bfloat16" } else { "float32" },
            shape.head_size
        )
    }
}

/// What the tensor-core family `kind`'s backward does for dq at this shape: reads the stored ds (with
/// its scratch), or recomputes it.
fn stored_ds_note(cfg: &TrainConfig, shape: &ModelShape, kind: AttentionKernels) -> String {
    use crate::backend::cuda::ops::{ds_elems_per_sequence, ds_sequences_per_launch, DS_SCRATCH_BYTES};
    if !kind.stores_ds() {
        return "; dq recomputed".to_string();
    }
    let d = crate::plan::attention_dims(cfg, shape);
    let mib = |bytes: usize| bytes as f64 / (1u64 << 20) as f64;
    let per = ds_elems_per_sequence(&d) * 2;
    match ds_sequences_per_launch(&d, DS_SCRATCH_BYTES) {
        Some(n) => format!(
            "; dq from the stored ds: {n} of {} sequences per launch, {:.1} MiB of GPU scratch",
            d.batch,
            mib(n * per)
        ),
        None => format!(
            "; dq recomputed: one sequence's ds ({:.0} MiB) is over the {:.0} MiB scratch limit",
            mib(per),
            mib(DS_SCRATCH_BYTES)
        ),
    }
}

/// Builds the [`Setup`] for `world` ranks; only the `leader` (rank 0) writes `config.yaml` and
/// prints the setup.
fn setup(cfg: &TrainConfig, opts: &TrainOptions, world: usize, leader: bool, gpu: usize) -> anyhow::Result<Setup> {
    let shape = ModelShape::from_config(&cfg.model.base_model)?;
    let device = if cfg.model.distributed.use_cuda {
        let attention = AttentionKernels::from_env().map_err(|e| anyhow!("{e}"))?;
        let d = Device::open(gpu)
            .map_err(|e| anyhow!("model.distributed.use_cuda = true: {e}"))?
            .with_attention(attention);
        if leader && !opts.quiet {
            println!("GPU {gpu}: {}", d.gpu.describe());
            println!("{}", attention_line(cfg, &shape, attention));
        }
        Some(d)
    } else {
        None
    };
    let mut model = Llama::new(shape);
    // The CUDA kernels' attention is fused: the model saves log-sum-exps, not softmax matrices.
    model.fused_attention = device.is_some();
    model.mlp_recompute = cfg.model.base_model.decoder.block.mlp.recompute_level;
    let model = Arc::new(model);
    // Weight buffers hold the compute type (bf16 only on a GPU: validation refuses it on the CPU).
    let compute_bytes = match cfg.model.distributed.compute_dtype {
        ComputeDtype::Bfloat16 => 2,
        _ => 4,
    };
    let layout = Arc::new(MultiStageLayout::new(
        &model,
        &cfg.model.multi_stage,
        world,
        compute_bytes,
    ));
    let seq = cfg.data.sequence_length as usize;
    let batch = Batch {
        batch: (cfg.data.micro_batch_size / cfg.data.sequence_length) as usize,
        seq,
    };
    let df = cfg.schedule.depth_first_micro_batches as usize;
    let bf = cfg.schedule.breadth_first_micro_batches as usize;
    let global_tokens = global_batch_tokens(cfg);
    let dir = cfg.run.experiment_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create run.experiment_dir {}", dir.display()))?;
    if leader {
        std::fs::write(dir.join("config.yaml"), crate::config::to_yaml(cfg))
            .with_context(|| format!("cannot write {}", dir.join("config.yaml").display()))?;
    }
    let data = open_data(cfg)?;
    let say = |s: String| {
        if leader && !opts.quiet {
            println!("{s}");
        }
    };
    say(format!(
        "Model: {} parameters ({} blocks, hidden {}, {} heads / {} kv heads of {}, MLP {}, vocab {})",
        model.num_params(),
        model.shape.num_blocks,
        model.shape.hidden,
        model.shape.heads,
        model.shape.kv_heads,
        model.shape.head_size,
        model.shape.inter,
        model.shape.vocab
    ));
    let backend = match cfg.model.distributed.backend {
        CommBackend::Local => "local",
        CommBackend::Nccl => "nccl",
    };
    say(format!(
        "Distributed: {world} data-parallel rank(s), backend {backend}, ZeRO stage {}, {} stages",
        layout.zero_stage,
        layout.num_stages()
    ));
    for line in layout.describe() {
        say(line);
    }
    say(format!(
        "Global batch: {global_tokens} tokens = micro_batch_size {} x depth_first {df} x breadth_first {bf} x data_parallel {world} ({} sequences of {seq})",
        cfg.data.micro_batch_size,
        global_tokens / seq as u64
    ));
    if let Some(source) = &data.training {
        let samples_per_step = global_tokens / seq as u64;
        let windows = source.windows();
        let order = match cfg.data.sampling.shuffle {
            Shuffle::RandomWindows => "windows drawn at random offsets (data.sampling.shuffle: random_windows)".into(),
            s => format!(
                "an epoch is {windows} windows of {seq} = {:.1} steps (data.sampling.shuffle: {})",
                windows as f64 / samples_per_step as f64,
                serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ),
        };
        say(format!("Training data: {} tokens; {order}", source.tokens()));
    }
    Ok(Setup {
        model,
        layout,
        batch,
        depth_first: df,
        breadth_first: bf,
        global_tokens,
        dir,
        data,
        device,
    })
}

/// With a GPU, adds its peak memory to `memory.json` (`"gpu"`: device, bytes held at the end and at
/// most) and prints it.
fn report_gpu_memory(setup: &Setup, quiet: bool) -> anyhow::Result<()> {
    let Some((in_use, peak)) = setup.device.as_ref().and_then(|d| d.memory_stats()) else {
        return Ok(());
    };
    let path = setup.dir.join("memory.json");
    let mut report: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    report["gpu"] = json!({
        "device": setup.device.as_ref().map(|d| d.gpu.describe()),
        "peak_bytes": peak,
        "in_use_bytes": in_use,
    });
    write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    if !quiet {
        println!(
            "Peak GPU memory: {:.2} GiB (all ranks of this process)",
            peak as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}

/// With `FAST_LLM_RS_PROFILE=1` on a GPU: prints where the device time went (see
/// [`crate::backend::profile`]) and writes it to `profile.json` in the experiment directory.
fn report_profile(setup: &Setup, quiet: bool) -> anyhow::Result<()> {
    use crate::backend::profile;
    if setup.device.is_none() || !profile::enabled() {
        return Ok(());
    }
    let rows = profile::take();
    let total: f64 = rows.iter().map(|r| r.seconds).sum();
    let report = json!({
        "note": "device time per operation, all ranks of this process, each call timed between two waits for the device (FAST_LLM_RS_PROFILE=1 serializes host and device: use it to rank operations, not to time the run)",
        "total_seconds": total,
        "ops": rows,
    });
    write_atomic(
        &setup.dir.join("profile.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    if !quiet {
        println!(
            "Device time by operation ({:.2} s in all; profile.json has every row):\n{}",
            total,
            profile::format(&rows, 20)
        );
    }
    Ok(())
}

/// The checkpoint to resume from, if any (removes incomplete checkpoints: on the NCCL backend only
/// rank 0 may be the first to call this).
fn find_resume(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    setup: &Setup,
    leader: bool,
) -> anyhow::Result<Option<Arc<checkpoint::Checkpoint>>> {
    let samples_per_step = setup.global_tokens / setup.batch.seq as u64;
    let resume = checkpoint::prepare_resume(cfg, samples_per_step, &|s| {
        if leader && !opts.quiet {
            eprintln!("{s}");
        }
    })?;
    if let (Some(c), true, false) = (&resume, leader, opts.quiet) {
        println!(
            "Resuming from checkpoint {} ({} of {} steps done)",
            c.dir.display(),
            c.completed_steps(),
            cfg.training.train_iters
        );
    }
    Ok(resume)
}

/// `pretrained:` weights for a fresh run (a resumed run continues from its checkpoint).
fn load_pretrained(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    resume: &Option<Arc<checkpoint::Checkpoint>>,
    leader: bool,
) -> anyhow::Result<Option<Vec<crate::hf::NamedTensor>>> {
    match (&cfg.pretrained, resume) {
        (Some(p), None) => {
            let tensors = crate::hf::pretrained_tensors(p, &cfg.model.base_model)?;
            if leader && !opts.quiet {
                println!("Initial weights: {} ({})", p.path.display(), p.format);
            }
            Ok(Some(tensors))
        }
        _ => Ok(None),
    }
}

/// Where the ranks' memory reports meet for `memory.json`.
enum MemorySink<'a> {
    /// Ranks are threads of this process and write their slot (local backend).
    Shared(&'a Mutex<Vec<MemoryReport>>),
    /// This process is one rank: its slot is set and the others come by an all-reduce (NCCL).
    Gathered(&'a Mutex<Vec<MemoryReport>>),
}

/// One rank, whatever the backend: the engine over `comm`, the checkpoint or pretrained weights,
/// then the training loop.
#[allow(clippy::too_many_arguments)]
fn run_rank(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    setup: &Setup,
    comm: Arc<dyn Communicator>,
    threads: usize,
    resume: &Option<Arc<checkpoint::Checkpoint>>,
    pretrained: &Option<Vec<crate::hf::NamedTensor>>,
    memory: MemorySink<'_>,
    comm_stats: &dyn Fn() -> crate::engine::distributed::local::CommStats,
) -> anyhow::Result<TrainSummary> {
    let bf16_compute = cfg.model.distributed.compute_dtype == ComputeDtype::Bfloat16;
    if let (Some(d), true) = (&setup.device, bf16_compute) {
        let kernels: Box<dyn Kernels<bf16>> = Box::new(d.kernels());
        return run_engine(cfg, opts, setup, comm, kernels, resume, pretrained, memory, comm_stats);
    }
    let kernels: Box<dyn Kernels<f32>> = match &setup.device {
        Some(d) => Box::new(d.kernels()),
        None => Box::new(CpuKernels::new(threads)),
    };
    run_engine(cfg, opts, setup, comm, kernels, resume, pretrained, memory, comm_stats)
}

/// [`run_rank`] with the compute type chosen.
#[allow(clippy::too_many_arguments)]
fn run_engine<T: Element<Master = f32>>(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    setup: &Setup,
    comm: Arc<dyn Communicator>,
    kernels: Box<dyn Kernels<T>>,
    resume: &Option<Arc<checkpoint::Checkpoint>>,
    pretrained: &Option<Vec<crate::hf::NamedTensor>>,
    memory: MemorySink<'_>,
    comm_stats: &dyn Fn() -> crate::engine::distributed::local::CommStats,
) -> anyhow::Result<TrainSummary> {
    let mut engine = RankEngine::new(
        comm,
        setup.model.clone(),
        setup.layout.clone(),
        kernels,
        setup.batch,
        setup.depth_first,
        setup.breadth_first,
        cfg.model.distributed.seed,
    );
    let start = match resume {
        Some(c) => {
            let t = Instant::now();
            checkpoint::load_into(&mut engine, c, checkpoint::LoadParts::All)?;
            if engine.rank() == 0 && !opts.quiet {
                println!(
                    "Loaded checkpoint {} ({:.2} s)",
                    c.completed_steps(),
                    t.elapsed().as_secs_f64()
                );
            }
            c.completed_steps()
        }
        None => {
            if let Some(t) = pretrained {
                engine.load_full_weights(t)?;
            }
            0
        }
    };
    let gpu = setup.device.as_ref().map(|d| d.gpu.describe());
    let throughput = Throughput::new(cfg, setup.model.num_params(), gpu.as_deref());
    rank_main(
        cfg,
        opts,
        engine,
        &setup.data,
        &setup.dir,
        setup.global_tokens,
        memory,
        comm_stats,
        (start, throughput, setup.device.as_ref().map(|d| d.gpu.clone())),
    )
}

/// The local backend: `world_size` rank threads over a [`crate::engine::distributed::local::LocalGroup`].
fn train_local(cfg: &TrainConfig, opts: &TrainOptions) -> anyhow::Result<TrainSummary> {
    let world = cfg.model.distributed.world_size as usize;
    // All local ranks share GPU 0.
    let setup = setup(cfg, opts, world, true, 0)?;
    let threads = opts
        .threads_per_rank
        .unwrap_or_else(|| (std::thread::available_parallelism().map_or(1, |n| n.get()) / world).max(1));
    let resume = find_resume(cfg, opts, &setup, true)?;
    let pretrained = load_pretrained(cfg, opts, &resume, true)?;
    let memory = Mutex::new(vec![MemoryReport::default(); world]);
    let timeout = Duration::from_secs_f64(cfg.model.distributed.timeout);
    let results = run_ranks(world, timeout, |comm| {
        // On a GPU the collectives move data with device copies and kernels (buffers are managed memory).
        let comm = match setup.device.as_ref().and_then(|d| d.mover()) {
            Some(m) => comm.with_mover(m),
            None => comm,
        };
        let local = Arc::new(comm);
        let comm: Arc<dyn Communicator> = local.clone();
        run_rank(
            cfg,
            opts,
            &setup,
            comm,
            threads,
            &resume,
            &pretrained,
            MemorySink::Shared(&memory),
            &|| local.stats(),
        )
    })?;
    let mut summary = results.into_iter().next().expect("rank 0");
    summary.memory = memory.lock().unwrap().clone();
    report_gpu_memory(&setup, opts.quiet)?;
    report_profile(&setup, opts.quiet)?;
    Ok(summary)
}

/// Processes of this job on this node, as the launcher says (`LOCAL_WORLD_SIZE`,
/// `OMPI_COMM_WORLD_LOCAL_SIZE`, `SLURM_NTASKS_PER_NODE`), else 1: the CPU threads are shared by them.
fn local_processes() -> usize {
    [
        "LOCAL_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .filter_map(|v| std::env::var(v).ok())
    .find_map(|v| {
        // Slurm may write `4(x2)` (4 tasks on each of 2 nodes).
        let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse::<usize>().ok().filter(|&n| n > 0)
    })
    .unwrap_or(1)
}

/// The NCCL backend: this process is one rank of a group started by torchrun, Slurm or OpenMPI
/// (rank, world size and local rank from their environment; the GPU is the local rank).
///
/// Order, each step failing with one line before any training: launcher environment, world size
/// (`model.distributed.world_size` left at 1 takes the launcher's; another value must equal it),
/// NCCL library (found by [`nccl_lib::find_nccl`], version printed), GPU, NCCL id through the TCP
/// rendezvous, communicator. Compute stays on the CPU (`use_cuda` is separate): the collectives
/// stage the host buffers through the GPU. Only rank 0 prints and writes `metrics.jsonl`,
/// `memory.json` and checkpoint metadata; every rank writes its own checkpoint shards.
fn train_nccl(cfg: &TrainConfig, opts: &TrainOptions) -> anyhow::Result<TrainSummary> {
    let env = launch::detect_process_env()?.ok_or_else(|| {
        anyhow!(
            "model.distributed.backend = nccl runs one process per GPU started by a launcher, but none of \
             RANK/WORLD_SIZE (torchrun), SLURM_PROCID (srun) or OMPI_COMM_WORLD_RANK (mpirun) is set: run \
             `torchrun --nproc-per-node N --no-python fast-llm-rs train --config ...` or `srun fast-llm-rs \
             train ...`, or use model.distributed.backend: local"
        )
    })?;
    launch::check_world_size(&env, cfg.model.distributed.world_size)?;
    // From here on the config says the launcher's world size (in config.yaml and checkpoints too).
    let mut resolved = cfg.clone();
    resolved.model.distributed.world_size = env.world_size as u64;
    let cfg = &resolved;
    let leader = env.rank == 0;
    let say = |s: String| {
        if leader && !opts.quiet {
            println!("{s}");
        }
    };
    let path = nccl_lib::find_nccl().map_err(anyhow::Error::msg)?;
    let lib = NcclLibrary::open(&path).map_err(anyhow::Error::msg)?;
    say(format!("NCCL {} ({})", lib.version_string(), path.display()));
    let timeout = Duration::from_secs_f64(cfg.model.distributed.timeout);
    let nccl = Arc::new(nccl::connect(&env, lib, timeout).map_err(anyhow::Error::msg)?);
    if cfg.model.distributed.use_cuda {
        // The CUDA engine's buffers are managed memory: NCCL reads and writes them in place.
        nccl.use_device_buffers();
    }
    say(format!(
        "Rank 0 of {} ({} launch): GPU {} ({}), master {}:{}",
        env.world_size,
        env.source,
        nccl.device().ordinal(),
        nccl.device().name(),
        env.master_addr,
        env.master_port
    ));
    let run = || -> anyhow::Result<TrainSummary> {
        let world = env.world_size;
        let setup = setup(cfg, opts, world, leader, env.local_rank)?;
        let threads = opts.threads_per_rank.unwrap_or_else(|| {
            (std::thread::available_parallelism().map_or(1, |n| n.get()) / local_processes()).max(1)
        });
        // Rank 0 removes incomplete checkpoints before the others look for the newest complete one.
        let resume = if leader {
            let r = find_resume(cfg, opts, &setup, leader)?;
            nccl.barrier()?;
            r
        } else {
            nccl.barrier()?;
            find_resume(cfg, opts, &setup, leader)?
        };
        let pretrained = load_pretrained(cfg, opts, &resume, leader)?;
        let memory = Mutex::new(vec![MemoryReport::default(); world]);
        let comm: Arc<dyn Communicator> = nccl.clone();
        let mut summary = run_rank(
            cfg,
            opts,
            &setup,
            comm,
            threads,
            &resume,
            &pretrained,
            MemorySink::Gathered(&memory),
            &|| nccl.stats(),
        )?;
        summary.memory = memory.into_inner().unwrap_or_else(|e| e.into_inner());
        if leader {
            report_gpu_memory(&setup, opts.quiet)?;
            report_profile(&setup, opts.quiet)?;
        }
        Ok(summary)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(summary)) => Ok(summary),
        Ok(Err(e)) => {
            // Tell the group (NCCL tears down the connections, so peers fail fast rather than at the
            // timeout), then report.
            nccl.abort(&format!("{e:#}"));
            Err(e.context(format!("rank {} failed", env.rank)))
        }
        Err(panic) => {
            nccl.abort("panicked");
            std::panic::resume_unwind(panic)
        }
    }
}

/// Fills every rank's slot of `memory` from this rank's: a sum over ranks in f64 of vectors that are
/// zero except in the caller's slot (exact: byte counts are far below 2^53). Also a barrier.
fn gather_memory(comm: &dyn Communicator, memory: &Mutex<Vec<MemoryReport>>) -> anyhow::Result<()> {
    const FIELDS: usize = 6;
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut values = vec![0f64; FIELDS * world];
    {
        let m = memory.lock().unwrap()[rank];
        let mine = [
            m.weight_shard,
            m.grad_shard,
            m.optimizer_state,
            m.weight_buffers,
            m.grad_buffers,
            m.activations_peak,
        ];
        for (slot, v) in values[FIELDS * rank..FIELDS * (rank + 1)].iter_mut().zip(mine) {
            *slot = v as f64;
        }
    }
    comm.all_reduce_sum_f64(&mut values)?;
    let mut reports = memory.lock().unwrap();
    for (r, report) in reports.iter_mut().enumerate() {
        let v = &values[FIELDS * r..FIELDS * (r + 1)];
        *report = MemoryReport {
            rank: r,
            weight_shard: v[0] as u64,
            grad_shard: v[1] as u64,
            optimizer_state: v[2] as u64,
            weight_buffers: v[3] as u64,
            grad_buffers: v[4] as u64,
            activations_peak: v[5] as u64,
        };
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn rank_main<T: Element<Master = f32>>(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    mut engine: RankEngine<T>,
    data: &Data,
    dir: &Path,
    global_tokens: u64,
    memory: MemorySink<'_>,
    comm_stats: &dyn Fn() -> crate::engine::distributed::local::CommStats,
    (start_step, throughput, gpu): (u64, Throughput, Option<Arc<dyn crate::backend::cuda::Gpu>>),
) -> anyhow::Result<TrainSummary> {
    let rank = engine.rank();
    let world = engine.comm().world_size();
    let leader = rank == 0;
    let quiet = opts.quiet || !leader;
    let memory = match memory {
        MemorySink::Shared(m) => {
            m.lock().unwrap()[rank] = engine.memory();
            engine.comm().barrier()?;
            m
        }
        MemorySink::Gathered(m) => {
            m.lock().unwrap()[rank] = engine.memory();
            gather_memory(engine.comm().as_ref(), m)?;
            m
        }
    };
    if leader {
        let reports = memory.lock().unwrap().clone();
        write_atomic(
            &dir.join("memory.json"),
            serde_json::to_string_pretty(&json!({ "ranks": reports }))?.as_bytes(),
        )?;
        if !quiet {
            let m = reports[0];
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            println!(
                "Memory per rank: weight shard {:.2} MiB, grad shard {:.2} MiB, optimizer state {:.2} MiB, weight buffers {:.2} MiB, grad buffers {:.2} MiB, activations {:.2} MiB (total {:.2} MiB)",
                mib(m.weight_shard),
                mib(m.grad_shard),
                mib(m.optimizer_state),
                mib(m.weight_buffers),
                mib(m.grad_buffers),
                mib(m.activations_peak),
                mib(m.weight_shard + m.grad_shard + m.optimizer_state + m.weight_buffers + m.grad_buffers + m.activations_peak)
            );
        }
    }
    let samples_per_mb = engine.batch.batch;
    let local_mbs = engine.micro_batches();
    let samples_per_batch = (samples_per_mb * local_mbs * world) as u64;
    let geometry = Geometry::of(&engine, samples_per_batch);
    let train_iters = cfg.training.train_iters;
    let mut metrics = if leader { Some(MetricsLog::open(dir)?) } else { None };
    let mut summary = TrainSummary {
        resumed_from: start_step,
        ..Default::default()
    };
    let progress = (!quiet && train_iters > 0).then(|| crate::progress::bar(train_iters));
    let (mut interval_loss, mut interval_steps, mut interval_time, mut interval_wait) = (0.0, 0u64, 0.0, 0.0);
    let mut interval_comm = comm_stats();
    let host_waits = || gpu.as_ref().map_or(0, |g| g.host_waits());
    let mut interval_waits = host_waits();
    let (mut total_time, mut total_wait, mut timed_steps) = (0.0, 0.0, 0u64);
    let mem_mib = {
        let m = engine.memory();
        (m.weight_shard + m.grad_shard + m.optimizer_state + m.weight_buffers + m.grad_buffers + m.activations_peak)
            as f64
            / (1 << 20) as f64
    };
    if let Some(p) = &progress {
        p.set_position(start_step.min(train_iters));
    }
    for step in start_step..train_iters {
        let source = data.training.as_ref().expect("training dataset");
        let step_start = Instant::now();
        let mut fill = |mb: usize, tokens: &mut [u32], targets: &mut [u32]| {
            if opts.fail_rank_at_step == Some((rank, step)) {
                panic!("injected failure of rank {rank} at step {step}");
            }
            geometry.fill(step, mb, tokens, targets, |i, t, y| source.fill(i, t, y));
        };
        let stats = engine.run_batch(true, 1.0 / global_tokens as f32, &mut fill)?;
        // The loss sum, and whether any rank was asked to stop (each rank reads the request when it
        // gets here; the sum makes the decision the same on every rank).
        let stop_here = opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
            || opts.stop_rank_at_step == Some((rank, step));
        let mut reduced = [stats.loss_sum, if stop_here { 1.0 } else { 0.0 }];
        engine.comm().all_reduce_sum_f64(&mut reduced)?;
        let stopping = reduced[1] > 0.0;
        let loss = reduced[0] / global_tokens as f64;
        let lr = learning_rate(&cfg.optimizer, step, train_iters);
        let o = &cfg.optimizer;
        let grad_norm = engine.optimizer_step(AdamStep {
            lr,
            beta_1: o.beta_1,
            beta_2: o.beta_2,
            epsilon: o.epsilon,
            weight_decay: o.weight_decay,
            max_norm: o.gradient_norm_clipping,
            step: step + 1,
        })?;
        if !loss.is_finite() {
            bail!(
                "step {}: the loss is {loss}; training diverged (lower optimizer.learning_rate.base or raise warm-up)",
                step + 1
            );
        }
        let step_time = step_start.elapsed().as_secs_f64();
        summary.losses.push(loss);
        interval_loss += loss;
        interval_steps += 1;
        interval_time += step_time;
        interval_wait += stats.comm_wait_s;
        if step > start_step || train_iters == start_step + 1 {
            total_time += step_time;
            total_wait += stats.comm_wait_s;
            timed_steps += 1;
        }
        if let Some(p) = &progress {
            p.set_position(step + 1);
            p.set_message(format!("loss {loss:.4}"));
        }
        let done = step + 1;
        if done % cfg.training.logs.interval == 0 || done == train_iters {
            let tps = interval_steps as f64 * global_tokens as f64 / interval_time;
            let mean_loss = interval_loss / interval_steps as f64;
            if let Some(m) = metrics.as_mut() {
                let mut extra = serde_json::Map::new();
                extra.insert("lr".into(), json!(lr));
                if cfg.data.sampling.shuffle != Shuffle::RandomWindows {
                    // Epochs of the training data consumed (samples over non-overlapping windows).
                    let windows = source.windows().max(1);
                    extra.insert(
                        "epoch".into(),
                        json!((done * samples_per_batch) as f64 / windows as f64),
                    );
                }
                extra.insert("grad_norm".into(), json!(grad_norm));
                extra.insert("step_time_s".into(), json!(interval_time / interval_steps as f64));
                extra.insert("tokens_per_s".into(), json!(tps));
                extra.insert("model_tflops".into(), json!(tps * throughput.flops_per_token / 1e12));
                if let Some(peak) = throughput.peak_flops {
                    extra.insert("mfu".into(), json!(tps * throughput.flops_per_token / peak));
                }
                extra.insert("comm_wait_s".into(), json!(interval_wait / interval_steps as f64));
                extra.insert("memory_mib_per_rank".into(), json!(mem_mib));
                // Bytes moved per step on this rank's collectives (fp32 elements of the full buffers),
                // including evaluation batches that ran in the interval.
                let now = comm_stats();
                let per_step = |a: u64, b: u64| json!(4 * (a - b) / interval_steps);
                extra.insert(
                    "all_gather_bytes_per_step".into(),
                    per_step(now.all_gather_elements, interval_comm.all_gather_elements),
                );
                extra.insert(
                    "reduce_scatter_bytes_per_step".into(),
                    per_step(now.reduce_scatter_elements, interval_comm.reduce_scatter_elements),
                );
                extra.insert(
                    "all_reduce_elements_per_step".into(),
                    json!((now.all_reduce_elements - interval_comm.all_reduce_elements) / interval_steps),
                );
                interval_comm = now;
                if gpu.is_some() {
                    // Times the host waited for the GPU (all ranks of the process; each lets it run dry).
                    let now = host_waits();
                    extra.insert(
                        "device_waits_per_step".into(),
                        json!((now - interval_waits) as f64 / interval_steps as f64),
                    );
                    interval_waits = now;
                }
                m.write(&Metric {
                    phase: "training".into(),
                    step: done,
                    loss: mean_loss,
                    extra,
                })?;
            }
            if !quiet {
                let line = format!(
                    "step {done}/{train_iters} | loss {mean_loss:.4} | lr {lr:.3e} | grad norm {grad_norm:.3} | step {:.3} s | {} tokens/s | {} | comm wait {:.1}% | memory {mem_mib:.1} MiB/rank",
                    interval_time / interval_steps as f64,
                    human(tps),
                    throughput.describe(tps),
                    100.0 * interval_wait / interval_time,
                );
                emit(&progress, line);
            }
            (interval_loss, interval_steps, interval_time, interval_wait) = (0.0, 0, 0.0, 0.0);
        }
        for (name, interval, iterations, source) in &data.eval {
            if done % interval == 0 || done == train_iters {
                let vloss = evaluate(&mut engine, source, *iterations, global_tokens, samples_per_batch)?;
                summary.validation.push((done, vloss));
                if let Some(m) = metrics.as_mut() {
                    let mut extra = serde_json::Map::new();
                    extra.insert("evaluator".into(), json!(name));
                    m.write(&Metric {
                        phase: "validation".into(),
                        step: done,
                        loss: vloss,
                        extra,
                    })?;
                }
                if !quiet {
                    let line = format!("step {done}/{train_iters} | validation ({name}) loss {vloss:.4}");
                    emit(&progress, line);
                }
            }
        }
        let scheduled = cfg
            .training
            .checkpoint
            .interval
            .is_some_and(|i| done % i == 0 || done == train_iters);
        // A stop saves this step's checkpoint whether or not one was due (unless it is the last step's,
        // which the schedule saves anyway, or no step remains).
        if scheduled || (stopping && done < train_iters) {
            let saved = checkpoint::save(&engine, cfg, done, samples_per_batch, opts.fail_checkpoint_after_files)?;
            if let (Some(r), false) = (saved, quiet) {
                let mib = r.bytes as f64 / (1 << 20) as f64;
                emit(
                    &progress,
                    format!("Saved checkpoint {} ({mib:.2} MiB, {:.2} s)", r.step, r.seconds),
                );
            }
        }
        if cfg.training.export.due(done, train_iters) {
            export_weights(&engine, cfg, done, leader && !quiet, leader, &progress)?;
        }
        if stopping && done < train_iters {
            summary.stopped_at = Some(done);
            if !quiet {
                emit(
                    &progress,
                    format!(
                        "Stopped on request after step {done}/{train_iters}: checkpoint {done} saved in {}; run the \
                         same command to resume",
                        checkpoint::checkpoints_root(&cfg.run.experiment_dir).display()
                    ),
                );
            }
            break;
        }
    }
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    if timed_steps > 0 {
        summary.tokens_per_s = timed_steps as f64 * global_tokens as f64 / total_time;
        summary.comm_wait_fraction = total_wait / total_time;
        if !quiet {
            println!(
                "Done: {} steps, {} tokens/s ({}), communication wait {:.1}% of step time",
                summary.stopped_at.unwrap_or(train_iters),
                human(summary.tokens_per_s),
                throughput.describe(summary.tokens_per_s),
                100.0 * summary.comm_wait_fraction
            );
        }
    }
    summary.comm_stats = Some(comm_stats());
    summary.final_weights = engine.gather_weights()?;
    Ok(summary)
}

/// `training.export`: the gathered weights (every rank takes part) as a HuggingFace directory in
/// `run.experiment_dir/export/llama/<step>`, written by rank 0 in the compute dtype (bf16 when training
/// in bf16, else f32), with the tokenizer files of a HuggingFace `pretrained:` model.
fn export_weights<T: Element<Master = f32>>(
    engine: &RankEngine<T>,
    cfg: &TrainConfig,
    done: u64,
    report: bool,
    leader: bool,
    progress: &Option<indicatif::ProgressBar>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let flat = engine.gather_weights()?;
    if !leader {
        return Ok(());
    }
    let dir = export_dir(&cfg.run.experiment_dir, done);
    let tensors = crate::hf::tensors_from_flat(&engine.model, &flat)?;
    let dtype = match cfg.model.distributed.compute_dtype {
        ComputeDtype::Bfloat16 => crate::hf::HfDtype::Bf16,
        _ => crate::hf::HfDtype::F32,
    };
    let extra_files = match &cfg.pretrained {
        Some(p) if p.format == "llama" => crate::hf::side_files(&p.path),
        _ => Vec::new(),
    };
    let opts = crate::hf::ExportOptions {
        dtype,
        max_position_embeddings: cfg.data.sequence_length,
        extra_files,
        ..Default::default()
    };
    crate::hf::export_llama_with(&dir, &cfg.model.base_model, &tensors, &opts)
        .with_context(|| format!("training.export: cannot write {}", dir.display()))?;
    if report {
        emit(
            progress,
            format!(
                "Exported step {done} to {} ({:.2} s)",
                dir.display(),
                start.elapsed().as_secs_f64()
            ),
        );
    }
    Ok(())
}

/// Where `training.export` writes step `step`: `<experiment_dir>/export/llama/<step>`.
pub fn export_dir(experiment_dir: &Path, step: u64) -> PathBuf {
    experiment_dir.join("export").join("llama").join(step.to_string())
}

/// Print a log line above the progress bar (or plainly when there is no visible bar).
fn emit(progress: &Option<indicatif::ProgressBar>, line: String) {
    match progress {
        Some(p) if !p.is_hidden() => p.println(line),
        _ => println!("{line}"),
    }
}

/// Where a rank's micro-batches sit in the global batch. Local micro-batch `mb` of `rank` is global
/// micro-batch `rank * local_mbs + mb`, so data-parallel `k` and depth-first `k` on one rank see the
/// same samples; sample `j` of global micro-batch `g` of batch `b` has global index
/// `b * samples_per_batch + g * samples_per_mb + j`.
struct Geometry {
    rank: usize,
    local_mbs: usize,
    samples_per_mb: usize,
    seq: usize,
    samples_per_batch: u64,
}

impl Geometry {
    fn of<T: Element<Master = f32>>(engine: &RankEngine<T>, samples_per_batch: u64) -> Self {
        Self {
            rank: engine.rank(),
            local_mbs: engine.micro_batches(),
            samples_per_mb: engine.batch.batch,
            seq: engine.batch.seq,
            samples_per_batch,
        }
    }

    /// Fill local micro-batch `mb` of batch `batch` with `sample(global index, tokens, targets)`.
    fn fill(
        &self,
        batch: u64,
        mb: usize,
        tokens: &mut [u32],
        targets: &mut [u32],
        sample: impl Fn(u64, &mut [u32], &mut [u32]),
    ) {
        let global_mb = (self.rank * self.local_mbs + mb) as u64;
        for j in 0..self.samples_per_mb {
            let index = batch * self.samples_per_batch + global_mb * self.samples_per_mb as u64 + j as u64;
            let r = j * self.seq..(j + 1) * self.seq;
            sample(index, &mut tokens[r.clone()], &mut targets[r]);
        }
    }
}

/// Mean validation loss over `iterations` global batches of consecutive windows.
fn evaluate<T: Element<Master = f32>>(
    engine: &mut RankEngine<T>,
    source: &Source,
    iterations: u64,
    global_tokens: u64,
    samples_per_batch: u64,
) -> anyhow::Result<f64> {
    let geometry = Geometry::of(engine, samples_per_batch);
    let mut total = 0.0;
    for it in 0..iterations {
        let mut fill = |mb: usize, tokens: &mut [u32], targets: &mut [u32]| {
            geometry.fill(it, mb, tokens, targets, |i, t, y| source.fill_sequential(i, t, y));
        };
        let stats = engine.run_batch(false, 0.0, &mut fill)?;
        let mut loss = [stats.loss_sum];
        engine.comm().all_reduce_sum_f64(&mut loss)?;
        total += loss[0] / global_tokens as f64;
    }
    Ok(total / iterations as f64)
}

/// Write a file atomically: temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp: PathBuf = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_config_str;

    /// MFU's peak comes from the GPU's name (the device line), only for bf16, and counts one GPU for
    /// the local backend's ranks and one per rank with NCCL.
    #[test]
    fn the_peak_follows_the_gpu_name_dtype_and_backend() {
        assert_eq!(gpu_peak_bf16("NVIDIA H200, sm_90, 139.8 GiB"), Some(989.4e12));
        assert_eq!(gpu_peak_bf16("NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB"), Some(989.4e12));
        assert_eq!(gpu_peak_bf16("NVIDIA H100 PCIe, sm_90, 79.1 GiB"), Some(756e12));
        assert_eq!(gpu_peak_bf16("NVIDIA A100-SXM4-80GB, sm_80, 79.2 GiB"), Some(312e12));
        assert_eq!(
            gpu_peak_bf16("emulator (kernels.cu on CPU threads, 128 threads per block)"),
            None
        );
        let cfg = |extra: &[&str]| {
            let mut o: Vec<String> = vec![
                "model.distributed.world_size=4".into(),
                "model.distributed.use_cuda=true".into(),
            ];
            o.extend(extra.iter().map(|s| s.to_string()));
            load_config_str("{}", &o).unwrap()
        };
        let h200 = Some("NVIDIA H200, sm_90, 139.8 GiB");
        let peak = |c: &TrainConfig, gpu| Throughput::new(c, 1000, gpu).peak_flops;
        assert_eq!(
            peak(&cfg(&["model.distributed.compute_dtype=bfloat16"]), h200),
            Some(989.4e12)
        );
        let nccl = cfg(&[
            "model.distributed.compute_dtype=bfloat16",
            "model.distributed.backend=nccl",
        ]);
        assert_eq!(peak(&nccl, h200), Some(4.0 * 989.4e12));
        assert_eq!(peak(&cfg(&[]), h200), None, "fp32 has no tensor-core peak here");
        assert_eq!(peak(&cfg(&["model.distributed.compute_dtype=bfloat16"]), None), None);
    }

    /// The attention line names the kernels a GPU run uses, and each setting that keeps it off the
    /// tensor-core ones with its value.
    #[test]
    fn attention_line_names_the_kernels_and_what_selects_them() {
        let cfg = |dtype: &str, head: &str, seq: &str| {
            let yaml = "model: {base_model: {decoder: {block: {mixer: {heads: 4, head_groups: 4}}}}}";
            load_config_str(
                yaml,
                &[
                    "model.distributed.use_cuda=true".to_string(),
                    format!("model.distributed.compute_dtype={dtype}"),
                    format!("model.base_model.decoder.block.mixer.head_size={head}"),
                    format!("data.sequence_length={seq}"),
                    format!("data.micro_batch_size={seq}"),
                ],
            )
            .unwrap()
        };
        let shape = |c: &TrainConfig| ModelShape::from_config(&c.model.base_model).unwrap();
        let line = |c: &TrainConfig| attention_line(c, &shape(c), AttentionKernels::Mma);
        // 4 heads of 128 at 2048: 32 row blocks, 528 tiles of 64 x 64 bf16 per head, 16.5 MiB per
        // sequence; one sequence per micro-batch.
        assert_eq!(
            line(&cfg("bfloat16", "128", "2048")),
            "Attention: tensor-core kernels (mma; bf16, head size 128, sequence 2048); dq from the stored ds: \
             1 of 1 sequences per launch, 16.5 MiB of GPU scratch"
        );
        let recompute = attention_line(
            &cfg("bfloat16", "128", "2048"),
            &shape(&cfg("bfloat16", "128", "2048")),
            AttentionKernels::MmaRecompute,
        );
        assert!(
            recompute.ends_with("(mma-recompute; bf16, head size 128, sequence 2048); dq recomputed"),
            "{recompute}"
        );
        // 4 heads at 65536: 1024 row blocks, 524,800 tiles per head, 16,400 MiB per sequence.
        let long = line(&cfg("bfloat16", "128", "65536"));
        assert!(
            long.ends_with("; dq recomputed: one sequence's ds (16400 MiB) is over the 1024 MiB scratch limit"),
            "{long}"
        );
        let c = cfg("bfloat16", "64", "1024");
        assert!(attention_line(&c, &shape(&c), AttentionKernels::Wmma).contains("(wmma; bf16, head size 64"));
        assert!(attention_line(&c, &shape(&c), AttentionKernels::Simple).contains("FAST_LLM_RS_ATTENTION=simple"));
        let slow = line(&cfg("float32", "96", "100"));
        assert!(
            slow.contains("much slower")
                && slow.contains("(is float32)")
                && slow.contains("(is 96)")
                && slow.contains("(is 100)"),
            "{slow}"
        );
        assert!(line(&cfg("bfloat16", "64", "100")).contains("much slower"));
    }
}
