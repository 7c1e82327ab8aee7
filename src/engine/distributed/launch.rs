//! Where this process sits in a multi-process run: rank, world size, local rank and the rendezvous
//! address, read from the environment that the launcher (torchrun, Slurm's `srun`, OpenMPI's `mpirun`)
//! gives each process.
//!
//! [`detect`] takes an environment-lookup closure so that tests inject environments instead of
//! mutating the process's; [`detect_process_env`] reads the real one.
//!
//! Precedence: torchrun (`RANK`/`WORLD_SIZE`) > Slurm (`SLURM_PROCID`) > OpenMPI
//! (`OMPI_COMM_WORLD_RANK`). torchrun wins over Slurm because `srun torchrun ...` runs torchrun
//! inside a Slurm step: the Slurm variables then describe torchrun's agent, not the worker.

use std::fmt;

use thiserror::Error;

/// The port of the rendezvous when the launcher does not give `MASTER_PORT` (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which launcher started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchSource {
    /// `torchrun` (or `python -m torch.distributed.run`), or anything that sets its variables.
    Torchrun,
    /// Slurm's `srun`, one task per GPU.
    Slurm,
    /// OpenMPI's `mpirun`/`mpiexec`.
    OpenMpi,
}

impl LaunchSource {
    /// The variable that holds the global rank.
    pub fn rank_var(self) -> &'static str {
        match self {
            Self::Torchrun => "RANK",
            Self::Slurm => "SLURM_PROCID",
            Self::OpenMpi => "OMPI_COMM_WORLD_RANK",
        }
    }

    /// The variable that holds the world size.
    pub fn world_size_var(self) -> &'static str {
        match self {
            Self::Torchrun => "WORLD_SIZE",
            Self::Slurm => "SLURM_NTASKS",
            Self::OpenMpi => "OMPI_COMM_WORLD_SIZE",
        }
    }

    /// The variable that holds the rank within the node.
    pub fn local_rank_var(self) -> &'static str {
        match self {
            Self::Torchrun => "LOCAL_RANK",
            Self::Slurm => "SLURM_LOCALID",
            Self::OpenMpi => "OMPI_COMM_WORLD_LOCAL_RANK",
        }
    }
}

impl fmt::Display for LaunchSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Torchrun => "torchrun",
            Self::Slurm => "Slurm",
            Self::OpenMpi => "OpenMPI",
        })
    }
}

/// This process's place in the run, as the launcher describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Global rank, in `0..world_size`.
    pub rank: usize,
    /// Number of processes (one per GPU), >= 1.
    pub world_size: usize,
    /// Rank within this node: the GPU index to use.
    pub local_rank: usize,
    /// Host of rank 0, where the rendezvous listens.
    pub master_addr: String,
    /// Port of the rendezvous on `master_addr`.
    pub master_port: u16,
    /// The launcher the values come from (names the variables in errors).
    pub source: LaunchSource,
}

/// A launcher environment that cannot be used. Every message is one line and names the variable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LaunchError {
    /// The launcher was recognised from one variable but another one it always sets is absent.
    #[error("{launcher} launch detected ({detected_by} is set) but {var} is not set")]
    Missing {
        launcher: LaunchSource,
        detected_by: &'static str,
        var: &'static str,
    },
    /// A value that does not parse.
    #[error("environment variable {var}='{value}' is not {expected}")]
    Invalid {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    /// World size 0.
    #[error("{var}=0: the world size must be at least 1")]
    ZeroWorldSize { var: &'static str },
    /// A rank (global or local) that does not fit the world size.
    #[error("{rank_var}={rank} is out of range for {size_var}={size} (ranks are 0..={max})", max = .size - 1)]
    RankOutOfRange {
        rank_var: &'static str,
        rank: usize,
        size_var: &'static str,
        size: usize,
    },
    /// A Slurm node list that cannot be read.
    #[error("{var}='{value}' is not a valid Slurm node list: {reason}")]
    Nodelist {
        var: &'static str,
        value: String,
        reason: String,
    },
    /// Nothing tells where rank 0 is.
    #[error("{launcher} launch: MASTER_ADDR is not set and {hint}; set MASTER_ADDR to the host of rank 0")]
    NoMasterAddr { launcher: LaunchSource, hint: &'static str },
    /// `model.distributed.world_size` in the config disagrees with the launcher.
    #[error(
        "model.distributed.world_size={configured} disagrees with the launcher's {var}={launched} ({launcher}); \
         remove it from the config (the launcher's value is used) or make them equal"
    )]
    WorldSizeMismatch {
        configured: u64,
        launched: usize,
        var: &'static str,
        launcher: LaunchSource,
    },
}

/// The launcher environment of this process (reads the real process environment); `Ok(None)` when
/// no launcher variables are set (a plain single-process run).
pub fn detect_process_env() -> Result<Option<LaunchEnv>, LaunchError> {
    detect(&|name| std::env::var(name).ok())
}

/// The launcher environment described by `env` (a lookup: variable name → value), or `Ok(None)`
/// when no launcher is recognised. Precedence torchrun > Slurm > OpenMPI (see the module docs).
pub fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>, LaunchError> {
    let launch = if env("RANK").is_some() || env("WORLD_SIZE").is_some() {
        detect_torchrun(env)?
    } else if env("SLURM_PROCID").is_some() {
        detect_slurm(env)?
    } else if env("OMPI_COMM_WORLD_RANK").is_some() {
        detect_openmpi(env)?
    } else {
        return Ok(None);
    };
    validate(&launch)?;
    Ok(Some(launch))
}

/// Checks the config's `model.distributed.world_size` against the launcher's: the config value 1
/// (the default) means "take the launcher's"; any other value must equal it.
pub fn check_world_size(env: &LaunchEnv, configured: u64) -> Result<(), LaunchError> {
    if configured == 1 || configured == env.world_size as u64 {
        return Ok(());
    }
    Err(LaunchError::WorldSizeMismatch {
        configured,
        launched: env.world_size,
        var: env.source.world_size_var(),
        launcher: env.source,
    })
}

fn detect_torchrun(env: &dyn Fn(&str) -> Option<String>) -> Result<LaunchEnv, LaunchError> {
    let source = LaunchSource::Torchrun;
    let detected_by = if env("RANK").is_some() { "RANK" } else { "WORLD_SIZE" };
    let require = |var: &'static str| {
        env(var).ok_or(LaunchError::Missing {
            launcher: source,
            detected_by,
            var,
        })
    };
    Ok(LaunchEnv {
        rank: parse_usize("RANK", &require("RANK")?)?,
        world_size: parse_usize("WORLD_SIZE", &require("WORLD_SIZE")?)?,
        local_rank: parse_usize("LOCAL_RANK", &require("LOCAL_RANK")?)?,
        master_addr: parse_addr("MASTER_ADDR", &require("MASTER_ADDR")?)?,
        master_port: parse_port("MASTER_PORT", &require("MASTER_PORT")?)?,
        source,
    })
}

fn detect_slurm(env: &dyn Fn(&str) -> Option<String>) -> Result<LaunchEnv, LaunchError> {
    let source = LaunchSource::Slurm;
    let require = |var: &'static str| {
        env(var).ok_or(LaunchError::Missing {
            launcher: source,
            detected_by: "SLURM_PROCID",
            var,
        })
    };
    let master_addr = match env("MASTER_ADDR") {
        Some(addr) => parse_addr("MASTER_ADDR", &addr)?,
        None => {
            // The step's node list first: rank 0 runs on the first node of its step, which can be a
            // subset of the job's allocation.
            let (var, list) = ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"]
                .into_iter()
                .find_map(|var| env(var).map(|list| (var, list)))
                .ok_or(LaunchError::NoMasterAddr {
                    launcher: source,
                    hint: "neither SLURM_STEP_NODELIST, SLURM_JOB_NODELIST nor SLURM_NODELIST is set",
                })?;
            first_host(&list).map_err(|reason| LaunchError::Nodelist {
                var,
                value: list.clone(),
                reason,
            })?
        }
    };
    Ok(LaunchEnv {
        rank: parse_usize("SLURM_PROCID", &require("SLURM_PROCID")?)?,
        world_size: parse_usize("SLURM_NTASKS", &require("SLURM_NTASKS")?)?,
        local_rank: parse_usize("SLURM_LOCALID", &require("SLURM_LOCALID")?)?,
        master_addr,
        master_port: optional_port(env)?,
        source,
    })
}

fn detect_openmpi(env: &dyn Fn(&str) -> Option<String>) -> Result<LaunchEnv, LaunchError> {
    let source = LaunchSource::OpenMpi;
    let require = |var: &'static str| {
        env(var).ok_or(LaunchError::Missing {
            launcher: source,
            detected_by: "OMPI_COMM_WORLD_RANK",
            var,
        })
    };
    let world_size = parse_usize("OMPI_COMM_WORLD_SIZE", &require("OMPI_COMM_WORLD_SIZE")?)?;
    let master_addr = match env("MASTER_ADDR") {
        Some(addr) => parse_addr("MASTER_ADDR", &addr)?,
        None => {
            // All ranks on this node: rank 0 is local.
            let local_size = env("OMPI_COMM_WORLD_LOCAL_SIZE")
                .map(|v| parse_usize("OMPI_COMM_WORLD_LOCAL_SIZE", &v))
                .transpose()?;
            if local_size == Some(world_size) {
                "127.0.0.1".to_string()
            } else {
                return Err(LaunchError::NoMasterAddr {
                    launcher: source,
                    hint: "the ranks span several nodes (OMPI_COMM_WORLD_LOCAL_SIZE != OMPI_COMM_WORLD_SIZE)",
                });
            }
        }
    };
    Ok(LaunchEnv {
        rank: parse_usize("OMPI_COMM_WORLD_RANK", &require("OMPI_COMM_WORLD_RANK")?)?,
        world_size,
        local_rank: parse_usize("OMPI_COMM_WORLD_LOCAL_RANK", &require("OMPI_COMM_WORLD_LOCAL_RANK")?)?,
        master_addr,
        master_port: optional_port(env)?,
        source,
    })
}

fn validate(launch: &LaunchEnv) -> Result<(), LaunchError> {
    let size_var = launch.source.world_size_var();
    if launch.world_size == 0 {
        return Err(LaunchError::ZeroWorldSize { var: size_var });
    }
    for (rank_var, rank) in [
        (launch.source.rank_var(), launch.rank),
        (launch.source.local_rank_var(), launch.local_rank),
    ] {
        if rank >= launch.world_size {
            return Err(LaunchError::RankOutOfRange {
                rank_var,
                rank,
                size_var,
                size: launch.world_size,
            });
        }
    }
    Ok(())
}

fn optional_port(env: &dyn Fn(&str) -> Option<String>) -> Result<u16, LaunchError> {
    env("MASTER_PORT").map_or(Ok(DEFAULT_MASTER_PORT), |v| parse_port("MASTER_PORT", &v))
}

fn parse_usize(var: &'static str, value: &str) -> Result<usize, LaunchError> {
    value.trim().parse().map_err(|_| LaunchError::Invalid {
        var,
        value: value.to_string(),
        expected: "a non-negative integer",
    })
}

fn parse_port(var: &'static str, value: &str) -> Result<u16, LaunchError> {
    match value.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(LaunchError::Invalid {
            var,
            value: value.to_string(),
            expected: "a TCP port in 1..=65535",
        }),
    }
}

fn parse_addr(var: &'static str, value: &str) -> Result<String, LaunchError> {
    let addr = value.trim();
    if addr.is_empty() || addr.contains(char::is_whitespace) {
        return Err(LaunchError::Invalid {
            var,
            value: value.to_string(),
            expected: "a host name or IP address",
        });
    }
    Ok(addr.to_string())
}

/// The first host of a Slurm node list, e.g. `node[01-04,07],gpu5` → `node01`, without expanding
/// the rest. Errors describe the syntax problem.
pub fn first_host(nodelist: &str) -> Result<String, String> {
    let items = parse_nodelist(nodelist)?;
    let first = &items[0];
    Ok(first
        .iter()
        .map(|part| match part {
            Part::Literal(s) => s.clone(),
            Part::Set(ranges) => ranges[0].format(ranges[0].lo),
        })
        .collect())
}

/// Every host of a Slurm node list, in Slurm's order: `node[01-02],gpu5` → `node01, node02, gpu5`;
/// several bracket groups in one name form their product (`r[1-2]n[1-2]` → `r1n1, r1n2, r2n1, r2n2`).
/// Fails beyond `max_hosts` hosts.
pub fn expand_nodelist(nodelist: &str, max_hosts: usize) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for item in parse_nodelist(nodelist)? {
        let mut names = vec![String::new()];
        for part in &item {
            names = match part {
                Part::Literal(s) => names.into_iter().map(|n| n + s).collect(),
                Part::Set(ranges) => {
                    let mut next = Vec::new();
                    for name in &names {
                        for range in ranges {
                            for value in range.lo..=range.hi {
                                if hosts.len() + next.len() >= max_hosts {
                                    return Err(format!("more than {max_hosts} hosts"));
                                }
                                next.push(format!("{name}{}", range.format(value)));
                            }
                        }
                    }
                    next
                }
            };
        }
        hosts.extend(names);
        if hosts.len() > max_hosts {
            return Err(format!("more than {max_hosts} hosts"));
        }
    }
    Ok(hosts)
}

/// One piece of a host-name pattern.
enum Part {
    Literal(String),
    /// `[01-04,07]`: ranges in order.
    Set(Vec<NumRange>),
}

/// `lo-hi` (or a single number), zero-padded to `width` digits.
struct NumRange {
    lo: u64,
    hi: u64,
    width: usize,
}

impl NumRange {
    fn format(&self, value: u64) -> String {
        format!("{value:0width$}", width = self.width)
    }
}

/// Splits on top-level commas and parses each name pattern; at least one, none empty.
fn parse_nodelist(nodelist: &str) -> Result<Vec<Vec<Part>>, String> {
    let text = nodelist.trim();
    if text.is_empty() {
        return Err("it is empty".into());
    }
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '[' if depth > 0 => return Err(format!("nested '[' at offset {i}")),
            '[' => depth = 1,
            ']' if depth == 0 => return Err(format!("unmatched ']' at offset {i}")),
            ']' => depth = 0,
            ',' if depth == 0 => {
                items.push(parse_pattern(&text[start..i])?);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err("unclosed '['".into());
    }
    items.push(parse_pattern(&text[start..])?);
    Ok(items)
}

fn parse_pattern(pattern: &str) -> Result<Vec<Part>, String> {
    if pattern.is_empty() {
        return Err("empty host name between commas".into());
    }
    let mut parts = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('[') {
        if open > 0 {
            parts.push(Part::Literal(rest[..open].to_string()));
        }
        let close = open + rest[open..].find(']').ok_or("unclosed '['")?;
        parts.push(Part::Set(parse_set(&rest[open + 1..close])?));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_string()));
    }
    Ok(parts)
}

fn parse_set(set: &str) -> Result<Vec<NumRange>, String> {
    if set.is_empty() {
        return Err("empty '[]'".into());
    }
    set.split(',')
        .map(|range| {
            let (lo_s, hi_s) = range.split_once('-').unwrap_or((range, range));
            let number = |s: &str| {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("'{range}' in '[{set}]' is not a number or a range a-b"));
                }
                s.parse::<u64>().map_err(|_| format!("'{s}' in '[{set}]' is too large"))
            };
            let (lo, hi) = (number(lo_s)?, number(hi_s)?);
            if lo > hi {
                return Err(format!("range '{range}' in '[{set}]' is decreasing"));
            }
            Ok(NumRange {
                lo,
                hi,
                width: lo_s.len(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    fn detect_vars(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>, LaunchError> {
        detect(&env_of(vars))
    }

    const TORCHRUN: &[(&str, &str)] = &[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "3"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29400"),
    ];

    const SLURM: &[(&str, &str)] = &[
        ("SLURM_PROCID", "9"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_JOB_NODELIST", "gpu[07-08,11],login1"),
    ];

    const OMPI: &[(&str, &str)] = &[
        ("OMPI_COMM_WORLD_RANK", "2"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
    ];

    fn with(
        base: &[(&'static str, &'static str)],
        extra: &[(&'static str, &'static str)],
    ) -> Vec<(&'static str, &'static str)> {
        let mut vars: Vec<_> = base
            .iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .copied()
            .collect();
        vars.extend(extra.iter().filter(|(_, v)| !v.is_empty()).copied());
        vars
    }

    fn without(base: &[(&'static str, &'static str)], var: &str) -> Vec<(&'static str, &'static str)> {
        base.iter().filter(|(k, _)| *k != var).copied().collect()
    }

    fn err(vars: &[(&str, &str)]) -> String {
        detect_vars(vars).unwrap_err().to_string()
    }

    #[test]
    fn no_launcher_is_none() {
        assert_eq!(detect_vars(&[("HOME", "/root"), ("LOCAL_RANK", "0")]).unwrap(), None);
    }

    #[test]
    fn torchrun_env() {
        let launch = detect_vars(TORCHRUN).unwrap().unwrap();
        assert_eq!(
            launch,
            LaunchEnv {
                rank: 3,
                world_size: 8,
                local_rank: 3,
                master_addr: "10.0.0.1".into(),
                master_port: 29400,
                source: LaunchSource::Torchrun,
            }
        );
    }

    #[test]
    fn torchrun_errors_name_the_variable() {
        let e = err(&without(TORCHRUN, "MASTER_PORT"));
        assert_eq!(e, "torchrun launch detected (RANK is set) but MASTER_PORT is not set");
        let e = err(&without(TORCHRUN, "RANK"));
        assert_eq!(e, "torchrun launch detected (WORLD_SIZE is set) but RANK is not set");
        let e = err(&with(TORCHRUN, &[("RANK", "three")]));
        assert_eq!(e, "environment variable RANK='three' is not a non-negative integer");
        let e = err(&with(TORCHRUN, &[("RANK", "-1")]));
        assert!(e.contains("RANK='-1'"), "{e}");
        let e = err(&with(TORCHRUN, &[("MASTER_PORT", "70000")]));
        assert_eq!(
            e,
            "environment variable MASTER_PORT='70000' is not a TCP port in 1..=65535"
        );
        let e = err(&with(TORCHRUN, &[("MASTER_PORT", "0")]));
        assert!(e.contains("MASTER_PORT='0'"), "{e}");
        let e = err(&with(TORCHRUN, &[("MASTER_ADDR", " ")]));
        assert!(e.contains("MASTER_ADDR=' ' is not a host name"), "{e}");
        let e = err(&with(TORCHRUN, &[("RANK", "8")]));
        assert_eq!(e, "RANK=8 is out of range for WORLD_SIZE=8 (ranks are 0..=7)");
        let e = err(&with(TORCHRUN, &[("LOCAL_RANK", "9")]));
        assert_eq!(e, "LOCAL_RANK=9 is out of range for WORLD_SIZE=8 (ranks are 0..=7)");
        let e = err(&with(
            TORCHRUN,
            &[("WORLD_SIZE", "0"), ("RANK", "0"), ("LOCAL_RANK", "0")],
        ));
        assert_eq!(e, "WORLD_SIZE=0: the world size must be at least 1");
        // Surrounding whitespace is tolerated.
        let launch = detect_vars(&with(TORCHRUN, &[("RANK", " 5\n")])).unwrap().unwrap();
        assert_eq!(launch.rank, 5);
    }

    #[test]
    fn slurm_env() {
        let launch = detect_vars(SLURM).unwrap().unwrap();
        assert_eq!(
            launch,
            LaunchEnv {
                rank: 9,
                world_size: 16,
                local_rank: 1,
                master_addr: "gpu07".into(),
                master_port: DEFAULT_MASTER_PORT,
                source: LaunchSource::Slurm,
            }
        );
        // MASTER_ADDR / MASTER_PORT win; the step's node list wins over the job's.
        let launch = detect_vars(&with(SLURM, &[("MASTER_ADDR", "head"), ("MASTER_PORT", "12345")]))
            .unwrap()
            .unwrap();
        assert_eq!((launch.master_addr.as_str(), launch.master_port), ("head", 12345));
        let launch = detect_vars(&with(SLURM, &[("SLURM_STEP_NODELIST", "gpu[08,11]")]))
            .unwrap()
            .unwrap();
        assert_eq!(launch.master_addr, "gpu08");
        let launch = detect_vars(&with(
            &without(SLURM, "SLURM_JOB_NODELIST"),
            &[("SLURM_NODELIST", "n5")],
        ))
        .unwrap()
        .unwrap();
        assert_eq!(launch.master_addr, "n5");
    }

    #[test]
    fn slurm_errors_name_the_variable() {
        let e = err(&without(SLURM, "SLURM_NTASKS"));
        assert_eq!(
            e,
            "Slurm launch detected (SLURM_PROCID is set) but SLURM_NTASKS is not set"
        );
        let e = err(&with(SLURM, &[("SLURM_LOCALID", "x")]));
        assert!(e.starts_with("environment variable SLURM_LOCALID='x'"), "{e}");
        let e = err(&with(SLURM, &[("SLURM_PROCID", "16")]));
        assert_eq!(
            e,
            "SLURM_PROCID=16 is out of range for SLURM_NTASKS=16 (ranks are 0..=15)"
        );
        let e = err(&with(SLURM, &[("SLURM_JOB_NODELIST", "gpu[07-")]));
        assert_eq!(
            e,
            "SLURM_JOB_NODELIST='gpu[07-' is not a valid Slurm node list: unclosed '['"
        );
        let e = err(&without(SLURM, "SLURM_JOB_NODELIST"));
        assert!(
            e.starts_with("Slurm launch: MASTER_ADDR is not set and neither SLURM_STEP_NODELIST"),
            "{e}"
        );
        let e = err(&with(SLURM, &[("MASTER_PORT", "http")]));
        assert!(e.contains("MASTER_PORT='http'"), "{e}");
    }

    #[test]
    fn openmpi_env() {
        let launch = detect_vars(OMPI).unwrap().unwrap();
        assert_eq!(
            launch,
            LaunchEnv {
                rank: 2,
                world_size: 4,
                local_rank: 2,
                master_addr: "127.0.0.1".into(),
                master_port: DEFAULT_MASTER_PORT,
                source: LaunchSource::OpenMpi,
            }
        );
        let launch = detect_vars(&with(OMPI, &[("MASTER_ADDR", "n0"), ("MASTER_PORT", "2000")]))
            .unwrap()
            .unwrap();
        assert_eq!((launch.master_addr.as_str(), launch.master_port), ("n0", 2000));
        let e = err(&with(OMPI, &[("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]));
        assert!(
            e.starts_with("OpenMPI launch: MASTER_ADDR is not set and the ranks span several nodes"),
            "{e}"
        );
        let e = err(&without(OMPI, "OMPI_COMM_WORLD_LOCAL_RANK"));
        assert_eq!(
            e,
            "OpenMPI launch detected (OMPI_COMM_WORLD_RANK is set) but OMPI_COMM_WORLD_LOCAL_RANK is not set"
        );
        let e = err(&with(
            OMPI,
            &[("OMPI_COMM_WORLD_SIZE", "0"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "0")],
        ));
        assert_eq!(e, "OMPI_COMM_WORLD_SIZE=0: the world size must be at least 1");
    }

    #[test]
    fn precedence_torchrun_slurm_openmpi() {
        let all: Vec<_> = TORCHRUN.iter().chain(SLURM).chain(OMPI).copied().collect();
        assert_eq!(detect_vars(&all).unwrap().unwrap().source, LaunchSource::Torchrun);
        let slurm_ompi: Vec<_> = SLURM.iter().chain(OMPI).copied().collect();
        assert_eq!(detect_vars(&slurm_ompi).unwrap().unwrap().source, LaunchSource::Slurm);
        // A broken torchrun environment is an error, not a fall-through to Slurm.
        let broken: Vec<_> = without(TORCHRUN, "LOCAL_RANK")
            .into_iter()
            .chain(SLURM.iter().copied())
            .collect();
        assert!(detect_vars(&broken).is_err());
    }

    #[test]
    fn world_size_check() {
        let launch = detect_vars(TORCHRUN).unwrap().unwrap();
        assert!(check_world_size(&launch, 1).is_ok());
        assert!(check_world_size(&launch, 8).is_ok());
        let e = check_world_size(&launch, 4).unwrap_err().to_string();
        assert_eq!(
            e,
            "model.distributed.world_size=4 disagrees with the launcher's WORLD_SIZE=8 (torchrun); remove it \
             from the config (the launcher's value is used) or make them equal"
        );
        let slurm = detect_vars(SLURM).unwrap().unwrap();
        assert!(check_world_size(&slurm, 2)
            .unwrap_err()
            .to_string()
            .contains("SLURM_NTASKS=16 (Slurm)"));
    }

    #[test]
    fn nodelist_first_host() {
        assert_eq!(first_host("node[01-04,07],gpu5").unwrap(), "node01");
        assert_eq!(first_host("gpu5,node[01-04]").unwrap(), "gpu5");
        assert_eq!(first_host("n7").unwrap(), "n7");
        assert_eq!(first_host("rack[3-4]-n[009-010]-ib").unwrap(), "rack3-n009-ib");
        assert_eq!(first_host("a[7,2-3]").unwrap(), "a7");
        assert_eq!(first_host("[5-6]x").unwrap(), "5x");
    }

    #[test]
    fn nodelist_expansion() {
        assert_eq!(
            expand_nodelist("node[01-04,07],gpu5", 100).unwrap(),
            ["node01", "node02", "node03", "node04", "node07", "gpu5"]
        );
        assert_eq!(
            expand_nodelist("r[1-2]n[8-9]", 100).unwrap(),
            ["r1n8", "r1n9", "r2n8", "r2n9"]
        );
        assert_eq!(
            expand_nodelist("n[098-101]", 100).unwrap(),
            ["n098", "n099", "n100", "n101"]
        );
        assert_eq!(expand_nodelist("a,b", 100).unwrap(), ["a", "b"]);
        assert_eq!(
            expand_nodelist("n[1-1000000000]", 1000).unwrap_err(),
            "more than 1000 hosts"
        );
    }

    #[test]
    fn nodelist_errors() {
        for (list, msg) in [
            ("", "it is empty"),
            ("a,,b", "empty host name between commas"),
            ("a,", "empty host name between commas"),
            ("n[1-2", "unclosed '['"),
            ("n1-2]", "unmatched ']' at offset 4"),
            ("n[1[2]]", "nested '[' at offset 3"),
            ("n[]", "empty '[]'"),
            ("n[a-b]", "'a-b' in '[a-b]' is not a number or a range a-b"),
            ("n[1-]", "'1-' in '[1-]' is not a number or a range a-b"),
            ("n[5-2]", "range '5-2' in '[5-2]' is decreasing"),
            ("n[1,,2]", "'' in '[1,,2]' is not a number or a range a-b"),
        ] {
            assert_eq!(first_host(list).unwrap_err(), msg, "{list}");
        }
    }
}
