//! One process-wide pool of worker threads that split a job's tasks with the calling
//! thread. Decoding a token of a small model is a few hundred jobs of a few microseconds
//! each, so hand-off cost decides the speed: idle workers spin for a short while before
//! they sleep (waking a sleeping thread costs a futex call, tens of microseconds), and a
//! job is published by bumping one counter.
//!
//! A worker takes part in a job only if it *joins* it before the caller has finished the
//! tasks and closed it, and the caller waits only for the workers that joined. On a busy
//! machine (another process on the cores, or several servers) a worker is often not
//! running when a job is published; waiting for every worker to acknowledge every job then
//! costs a scheduler time slice per job, hundreds per token (decoding ran at a quarter of
//! its speed beside one busy process). Now the caller does the work itself instead.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker polls for the next job before it sleeps. Between the matrix
/// products of one token the caller does microseconds of serial work; between tokens
/// (sampling, detokenising, a server's bookkeeping) rather more.
const SPIN: Duration = Duration::from_millis(2);

type Task<'a> = dyn Fn(usize) + Sync + 'a;

/// `Shared::state`: the job's generation in the high 32 bits (bumped once per job;
/// workers wait for it to change), the workers that joined it below, and `CLOSED`.
const CLOSED: u64 = 1 << 31;
const JOINED: u64 = CLOSED - 1;
const GENERATION: u32 = 32;

fn generation(state: u64) -> u64 {
    state >> GENERATION
}

struct Shared {
    state: AtomicU64,
    /// The current job: a `*const &Task` valid until every worker that joined it is done.
    job: AtomicPtr<()>,
    tasks: AtomicUsize,
    next: AtomicUsize,
    done: AtomicUsize,
    sleepers: AtomicUsize,
    /// A task panicked on a worker during the current job (read by the caller after it).
    panicked: AtomicBool,
    sleep: Mutex<()>,
    wake: Condvar,
}

pub struct Pool {
    shared: &'static Shared,
    workers: usize,
    /// One job at a time; a caller that finds the pool busy runs its job alone.
    submit: Mutex<()>,
}

/// Threads the pool uses, the caller included: `RAYON_NUM_THREADS` when set (the CLI's
/// `--threads` sets it, and candle's own ops read it too), else every core.
pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

pub fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(threads()))
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let workers = threads.saturating_sub(1);
        for i in 0..workers {
            std::thread::Builder::new()
                .name(format!("so8t-worker-{i}"))
                .spawn(move || worker(shared))
                .expect("spawning a worker thread");
        }
        Pool {
            shared,
            workers,
            submit: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(0..tasks)` across the pool and the calling thread; returns when all are done.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks <= 1 || self.workers == 0 {
            (0..tasks).for_each(f);
            return;
        }
        // Poisoned only by a task's panic, which `Finish` has already cleaned up after.
        let _guard = match self.submit.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                (0..tasks).for_each(f);
                return;
            }
        };
        let s = self.shared;
        let job: *const &Task = &f;
        s.job.store(job as *mut (), Relaxed);
        s.tasks.store(tasks, Relaxed);
        s.next.store(0, Relaxed);
        s.done.store(0, Relaxed);
        s.panicked.store(false, Relaxed);
        // New generation, nobody joined, open: publishes the fields above to joiners.
        let next = (generation(s.state.load(Relaxed)) + 1) << GENERATION;
        s.state.store(next, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _l = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // Closes the job and waits for the workers that joined it, also when a task
        // panics on this thread: they read `f`, which must outlive them.
        let finish = Finish(s);
        drain(s, f);
        drop(finish);
        if s.panicked.swap(false, Relaxed) {
            panic!("a task of the thread pool panicked on a worker thread");
        }
    }
}

struct Finish(&'static Shared);

impl Drop for Finish {
    fn drop(&mut self) {
        let s = self.0;
        let joined = (s.state.fetch_or(CLOSED, AcqRel) & JOINED) as usize;
        let mut polls = 0u32;
        while s.done.load(Acquire) < joined {
            // A joined worker that lost its core mid-task needs the core back to finish.
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

impl Pool {
    /// `f(first, chunk)` over `data` cut into chunks of `chunk` items (the last shorter),
    /// each chunk a task: the way to share out work that writes disjoint parts of a slice.
    pub fn chunks<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let (len, chunk) = (data.len(), chunk.max(1));
        let ptr = crate::SendPtr(data.as_mut_ptr());
        self.run(len.div_ceil(chunk), &|t| {
            let p = &ptr;
            let (a, b) = (t * chunk, ((t + 1) * chunk).min(len));
            // SAFETY: tasks take disjoint ranges of `data`, which outlives `run`.
            f(a, unsafe {
                std::slice::from_raw_parts_mut(p.0.add(a), b - a)
            })
        });
    }
}

fn drain(s: &Shared, f: &Task) {
    let n = s.tasks.load(Relaxed);
    loop {
        let t = s.next.fetch_add(1, Relaxed);
        if t >= n {
            break;
        }
        f(t);
    }
}

fn worker(s: &'static Shared) {
    // Not the current value: a job published before this thread first ran is still new.
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut polls = 0u32;
        let mut state = s.state.load(Acquire);
        while generation(state) == seen {
            polls = polls.wrapping_add(1);
            if !polls.is_multiple_of(256) || start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                let mut l = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, SeqCst);
                while generation(s.state.load(SeqCst)) == seen {
                    l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, SeqCst);
            }
            state = s.state.load(Acquire);
        }
        seen = generation(state);
        // Join unless the caller has closed the job (or moved on to a newer one, which the
        // next turn of the loop sees); the count and the generation change together, so
        // a join can never land on a job other than the one this worker saw.
        let joined = s
            .state
            .fetch_update(Acquire, Acquire, |now| {
                (generation(now) == seen && now & CLOSED == 0).then_some(now + 1)
            })
            .is_ok();
        if !joined {
            continue;
        }
        // SAFETY: the job was open when this worker joined it, so the caller waits for
        // this worker's `done` before it returns and the closure is dropped.
        let f: &Task = unsafe { *(s.job.load(Relaxed) as *const &Task) };
        // A panicking task must still count as done (or the caller waits forever) and
        // must not kill the worker; the caller re-raises it.
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drain(s, f))).is_ok();
        if !ok {
            s.panicked.store(true, Relaxed);
        }
        s.done.fetch_add(1, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More workers than cores, so workers are often descheduled while jobs come and go:
    /// every task of every job still runs exactly once, and each job's results are all
    /// there when `run` returns (a job's tasks write into that job's own buffer).
    #[test]
    fn every_task_runs_once_when_workers_outnumber_the_cores() {
        let pool = Pool::new(2 * std::thread::available_parallelism().map_or(2, |n| n.get()) + 1);
        for job in 0..20_000usize {
            let tasks = 1 + job % 13;
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            pool.run(tasks, &|t| {
                hits[t].fetch_add(job + 1, Relaxed);
            });
            for (t, h) in hits.iter().enumerate() {
                assert_eq!(h.load(Relaxed), job + 1, "job {job}, task {t}");
            }
        }
        let mut data = vec![0u32; 1000];
        pool.chunks(&mut data, 7, &|first, part| {
            for (i, x) in part.iter_mut().enumerate() {
                *x += (first + i) as u32;
            }
        });
        assert!(data.iter().enumerate().all(|(i, &x)| x == i as u32));
    }

    /// A panicking task, on whichever thread it runs, reaches the caller as a panic once
    /// every joined worker is done; the pool keeps working afterwards.
    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_survives() {
        let pool = Pool::new(3);
        for _ in 0..50 {
            let r = std::panic::catch_unwind(|| {
                pool.run(64, &|t| {
                    if t % 7 == 3 {
                        panic!("task {t}");
                    }
                    std::hint::black_box(t);
                })
            });
            assert!(r.is_err());
        }
        let sum = AtomicUsize::new(0);
        pool.run(100, &|t| {
            sum.fetch_add(t, Relaxed);
        });
        assert_eq!(sum.load(Relaxed), 4950);
    }
}
