//! Where a GPU step's time goes: with `FAST_LLM_RS_PROFILE=1`, every kernel call of
//! [`crate::backend::cuda::direct::DirectKernels`] waits for the device before and after itself and
//! adds its wall time to a process-wide table (all ranks of the process together), by operation and,
//! for matrix products, shape. The waits serialize the host and the device, so a profiled run is
//! slower than a plain one: the table says which operations dominate, the plain run says how fast.
//! Ranks sharing one GPU (the local backend) queue work on the same stream, so each call's time then
//! includes the others' work in between: profile with one rank per process.
//! `train` prints the table at the end and writes it to `profile.json` in the experiment directory.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Calls and seconds per operation.
static TABLE: Mutex<Option<HashMap<String, (u64, f64)>>> = Mutex::new(None);

/// Whether `FAST_LLM_RS_PROFILE` is set (to anything but `0`); read once.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FAST_LLM_RS_PROFILE").is_ok_and(|v| v != "0"))
}

/// Adds one call of `op` that took `seconds`.
pub fn record(op: &str, seconds: f64) {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let e = t
        .get_or_insert_with(HashMap::new)
        .entry(op.to_string())
        .or_insert((0, 0.0));
    e.0 += 1;
    e.1 += seconds;
}

/// One operation's total.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpTime {
    /// Operation (kernel method; products with their `m x n x k` and types).
    pub op: String,
    /// Calls.
    pub calls: u64,
    /// Seconds, all calls together.
    pub seconds: f64,
}

/// The table so far, slowest first (and empties it).
pub fn take() -> Vec<OpTime> {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let mut rows: Vec<OpTime> = t
        .take()
        .unwrap_or_default()
        .into_iter()
        .map(|(op, (calls, seconds))| OpTime { op, calls, seconds })
        .collect();
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then_with(|| a.op.cmp(&b.op)));
    rows
}

/// The `top` slowest rows as a text table with each one's share of the total.
pub fn format(rows: &[OpTime], top: usize) -> String {
    let total: f64 = rows.iter().map(|r| r.seconds).sum();
    let mut s = format!("{:<58} {:>8} {:>11} {:>7}\n", "operation", "calls", "ms", "share");
    for r in rows.iter().take(top) {
        s += &format!(
            "{:<58} {:>8} {:>11.2} {:>6.1}%\n",
            r.op,
            r.calls,
            r.seconds * 1e3,
            100.0 * r.seconds / total.max(f64::MIN_POSITIVE)
        );
    }
    if rows.len() > top {
        let rest: f64 = rows[top..].iter().map(|r| r.seconds).sum();
        s += &format!(
            "{:<58} {:>8} {:>11.2} {:>6.1}%\n",
            format!("({} more)", rows.len() - top),
            "",
            rest * 1e3,
            100.0 * rest / total.max(f64::MIN_POSITIVE)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_add_up_and_sort_slowest_first() {
        // The table is process-wide: this is its only test.
        take();
        record("a", 0.5);
        record("b", 2.0);
        record("a", 1.0);
        let rows = take();
        assert_eq!(
            rows,
            vec![
                OpTime {
                    op: "b".into(),
                    calls: 1,
                    seconds: 2.0
                },
                OpTime {
                    op: "a".into(),
                    calls: 2,
                    seconds: 1.5
                },
            ]
        );
        assert!(take().is_empty());
        let text = format(&rows, 1);
        assert!(
            text.contains("57.1%") && text.contains("(1 more)") && text.contains("42.9%"),
            "{text}"
        );
    }
}
