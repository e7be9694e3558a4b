//! The merge kernels' jobs on threads: [`Threads`] implements core's
//! [`Executor`](mergeattack_core::merge::Executor) with `std::thread::scope`, the calling thread
//! and `threads - 1` helpers taking the jobs in the order given, each the next one left.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use mergeattack_core::merge::Executor;

/// Runs a batch of jobs on up to `threads` threads (the caller's included).
#[derive(Clone, Copy, Debug)]
pub struct Threads {
    threads: usize,
}

impl Threads {
    /// `threads` workers (0 counts as 1).
    pub fn new(threads: usize) -> Self {
        Threads { threads: threads.max(1) }
    }
}

impl Executor for Threads {
    fn threads(&self) -> usize {
        self.threads
    }

    fn run(&self, jobs: &mut [&mut (dyn FnMut() + Send)]) {
        let workers = self.threads.min(jobs.len());
        if workers <= 1 {
            for job in jobs.iter_mut() {
                job();
            }
            return;
        }
        // One lock per job, taken once by the worker that drew its index: never contended.
        let slots: Vec<Mutex<&mut &mut (dyn FnMut() + Send)>> = jobs.iter_mut().map(Mutex::new).collect();
        let next = AtomicUsize::new(0);
        let work = || {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(slot) = slots.get(i) else { break };
                let mut job = slot.lock().unwrap_or_else(|e| e.into_inner());
                (**job)();
            }
        };
        std::thread::scope(|s| {
            for _ in 1..workers {
                s.spawn(work);
            }
            work();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    #[test]
    fn every_job_runs_once_on_several_threads() {
        for threads in [1, 2, 3, 8] {
            let n = 40;
            let mut done = vec![0u32; n];
            let seen = Mutex::new(HashSet::new());
            let finished = AtomicUsize::new(0);
            let mut closures: Vec<_> = done
                .iter_mut()
                .enumerate()
                .map(|(i, d)| {
                    let (seen, finished) = (&seen, &finished);
                    move || {
                        // The first job (the caller's) waits until another has finished, so a
                        // helper must have run it (up to 10 s on a loaded machine).
                        if i == 0 && threads > 1 {
                            let start = std::time::Instant::now();
                            while finished.load(Ordering::SeqCst) == 0 && start.elapsed().as_secs() < 10 {
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                        }
                        *d += 1;
                        seen.lock().unwrap().insert(std::thread::current().id());
                        finished.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .collect();
            let mut refs: Vec<&mut (dyn FnMut() + Send)> =
                closures.iter_mut().map(|c| c as &mut (dyn FnMut() + Send)).collect();
            Threads::new(threads).run(&mut refs);
            drop(refs);
            drop(closures);
            assert!(done.iter().all(|&d| d == 1), "{threads} threads: {done:?}");
            let used = seen.into_inner().unwrap().len();
            assert!(used <= threads, "{threads} threads, {used} used");
            assert_eq!(used > 1, threads > 1, "{threads} threads, {used} used");
        }
    }
}
