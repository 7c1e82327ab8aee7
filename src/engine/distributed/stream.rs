//! A communication stream: one thread per rank that runs collectives in issue order, so that restores
//! and reduces overlap the compute thread's work (the CPU analogue of a CUDA communication stream).
//!
//! Every rank issues the same collectives in the same order (the schedule is deterministic), so the
//! FIFO order of each rank's stream matches across ranks.

use super::CommError;
use crate::backend::mem::{Buf, Memory, Pod};
use std::cell::UnsafeCell;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() -> Result<(), CommError> + Send>;

#[derive(Default)]
struct Completion {
    state: Mutex<Option<Result<(), CommError>>>,
    cv: Condvar,
}

/// Completion handle of a submitted job.
#[derive(Clone)]
pub struct CommHandle(Arc<Completion>);

impl CommHandle {
    /// A handle that is already complete.
    pub fn ready() -> Self {
        let c = Completion::default();
        *c.state.lock().unwrap() = Some(Ok(()));
        Self(Arc::new(c))
    }

    /// Block until the job finished; returns its result and the time spent waiting.
    pub fn wait(&self) -> (Result<(), CommError>, Duration) {
        let start = Instant::now();
        let mut state = self.0.state.lock().unwrap();
        while state.is_none() {
            state = self.0.cv.wait(state).unwrap();
        }
        (state.clone().unwrap(), start.elapsed())
    }
}

/// A FIFO of communication jobs run by a dedicated thread.
pub struct CommStream {
    tx: Option<mpsc::Sender<(Job, Arc<Completion>)>>,
    thread: Option<JoinHandle<()>>,
}

impl CommStream {
    /// Start the stream thread (named `name`).
    pub fn new(name: String) -> Self {
        let (tx, rx) = mpsc::channel::<(Job, Arc<Completion>)>();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                for (job, done) in rx {
                    let result = job();
                    *done.state.lock().unwrap() = Some(result);
                    done.cv.notify_all();
                }
            })
            .expect("spawn communication thread");
        Self {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queue a job; it runs after every job submitted before it.
    pub fn submit(&self, job: impl FnOnce() -> Result<(), CommError> + Send + 'static) -> CommHandle {
        let done = Arc::new(Completion::default());
        self.tx
            .as_ref()
            .expect("stream open")
            .send((Box::new(job), done.clone()))
            .expect("stream thread alive");
        CommHandle(done)
    }
}

impl Drop for CommStream {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A fixed-size `f32` buffer shared between a rank's compute thread and its communication stream.
///
/// Access is coordinated by the schedule, not by the type: a job that writes the buffer is the only
/// accessor until its [`CommHandle`] has been waited on, and the compute thread never touches a buffer
/// with a pending job (see `schedule::plan`). The accessors are `unsafe` to mark that contract.
pub struct SyncBuf<T: Pod = f32> {
    data: UnsafeCell<Buf<T>>,
}

// SAFETY: concurrent access is excluded by the schedule's handle discipline described above.
unsafe impl<T: Pod> Sync for SyncBuf<T> {}
// SAFETY: the buffer owns plain `f32` data.
unsafe impl<T: Pod> Send for SyncBuf<T> {}

impl<T: Pod> SyncBuf<T> {
    /// A zeroed buffer of `len` elements.
    pub fn zeros(len: usize) -> Arc<Self> {
        Self::zeros_in(&crate::backend::mem::host(), len)
    }

    /// A zeroed buffer of `len` elements in `mem`.
    pub fn zeros_in(mem: &Arc<dyn Memory>, len: usize) -> Arc<Self> {
        Arc::new(Self {
            data: UnsafeCell::new(Buf::zeros_in(mem, len)),
        })
    }

    /// Elements.
    pub fn len(&self) -> usize {
        // SAFETY: reading the length does not race with element writes.
        unsafe { (&*self.data.get()).len() }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shared view.
    ///
    /// # Safety
    /// No job that writes this buffer may be pending, and no `&mut` view may be alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get(&self) -> &[T] {
        &*self.data.get()
    }

    /// Exclusive view.
    ///
    /// # Safety
    /// No other view of this buffer may be alive and no job touching it may be pending.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_mut(&self) -> &mut [T] {
        &mut *self.data.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_order_and_handles_report_results() {
        let stream = CommStream::new("test-comm".into());
        let log = Arc::new(Mutex::new(Vec::new()));
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let log = log.clone();
                stream.submit(move || {
                    log.lock().unwrap().push(i);
                    if i == 7 {
                        Err(CommError::Invalid {
                            op: "x".into(),
                            msg: "seven".into(),
                        })
                    } else {
                        Ok(())
                    }
                })
            })
            .collect();
        for (i, h) in handles.iter().enumerate() {
            assert_eq!(h.wait().0.is_err(), i == 7);
        }
        assert_eq!(*log.lock().unwrap(), (0..10).collect::<Vec<_>>());
    }
}
