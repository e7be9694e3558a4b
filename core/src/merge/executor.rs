//! Who runs a merge's independent jobs: the merge kernels split their work into jobs (one per
//! tensor, say), each writing its result into a slot it alone owns, and hand them to an
//! [`Executor`]. [`Sequential`] runs them one after another on the caller's thread; the harness
//! supplies one that runs them on several threads. A merge's result never depends on the executor:
//! the kernels combine the jobs' results in a fixed order (tested bitwise for any thread count and
//! job order).

use alloc::vec::Vec;

/// Runs a batch of independent jobs, each exactly once, and returns when all are done.
pub trait Executor: Sync {
    /// How many jobs may run at once (1 for [`Sequential`]); a hint for how finely to split work.
    fn threads(&self) -> usize;
    /// Run every job once, in any order and on any threads (the jobs share nothing mutable), and
    /// return when all have finished. A job that panics makes `run` panic.
    fn run(&self, jobs: &mut [&mut (dyn FnMut() + Send)]);
}

/// Runs the jobs in order on the calling thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sequential;

impl Executor for Sequential {
    fn threads(&self) -> usize {
        1
    }
    fn run(&self, jobs: &mut [&mut (dyn FnMut() + Send)]) {
        for job in jobs.iter_mut() {
            job();
        }
    }
}

/// Run `job(i, items[i])` as one job per item on `exec`, handing the jobs over in `order` (a
/// permutation of the item indices: largest first, say); the results come back indexed like
/// `items`, whatever order the executor ran them in.
pub(crate) fn map_jobs<T: Send, R: Send>(
    exec: &dyn Executor,
    items: Vec<T>,
    order: &[usize],
    job: impl Fn(usize, T) -> R + Sync,
) -> Vec<R> {
    assert_eq!(order.len(), items.len(), "one job per item");
    let mut slots: Vec<Option<R>> = items.iter().map(|_| None).collect();
    let mut by_item: Vec<Option<(T, &mut Option<R>)>> = items.into_iter().zip(slots.iter_mut()).map(Some).collect();
    let job = &job;
    let mut closures: Vec<_> = order
        .iter()
        .map(|&i| {
            let mut todo = Some(by_item[i].take().expect("order is a permutation"));
            move || {
                if let Some((item, slot)) = todo.take() {
                    *slot = Some(job(i, item));
                }
            }
        })
        .collect();
    let mut refs: Vec<&mut (dyn FnMut() + Send)> =
        closures.iter_mut().map(|c| c as &mut (dyn FnMut() + Send)).collect();
    exec.run(&mut refs);
    drop(refs);
    drop(closures);
    slots.into_iter().map(|s| s.expect("the executor ran every job")).collect()
}

#[cfg(test)]
pub(crate) mod testexec {
    //! Executors for tests: the jobs in reverse order, or interleaved on an odd pattern.
    use super::Executor;

    /// Runs the jobs last to first (a different order than [`super::Sequential`]).
    pub struct Reverse;

    impl Executor for Reverse {
        fn threads(&self) -> usize {
            3
        }
        fn run(&self, jobs: &mut [&mut (dyn FnMut() + Send)]) {
            for job in jobs.iter_mut().rev() {
                job();
            }
        }
    }

    /// Runs the odd-indexed jobs first, then the even ones backwards.
    pub struct Shuffled;

    impl Executor for Shuffled {
        fn threads(&self) -> usize {
            2
        }
        fn run(&self, jobs: &mut [&mut (dyn FnMut() + Send)]) {
            for job in jobs.iter_mut().skip(1).step_by(2) {
                job();
            }
            for job in jobs.iter_mut().step_by(2).rev() {
                job();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testexec::{Reverse, Shuffled};
    use super::*;

    #[test]
    fn map_jobs_returns_results_by_index_whatever_the_order() {
        let order = [3usize, 0, 4, 1, 2];
        for exec in [&Sequential as &dyn Executor, &Reverse, &Shuffled] {
            let got = map_jobs(exec, alloc::vec![1, 2, 3, 4, 5], &order, |i, x| i * 10 + x);
            assert_eq!(got, [1, 12, 23, 34, 45]);
        }
        // Each job runs exactly once.
        let calls = core::sync::atomic::AtomicUsize::new(0);
        let got: Vec<usize> = map_jobs(&Shuffled, alloc::vec![(); 3], &[1, 0, 2], |i, ()| {
            calls.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            i
        });
        assert_eq!((got, calls.into_inner()), (alloc::vec![0, 1, 2], 3));
        assert!(map_jobs(&Reverse, Vec::<u8>::new(), &[], |i, _| i).is_empty());
    }
}
