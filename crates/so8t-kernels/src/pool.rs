//! One process-wide pool of worker threads that split a job's tasks with the calling
//! thread. Decoding a token of a small model is a few hundred jobs of a few microseconds
//! each, so hand-off cost decides the speed: idle workers spin for a short while before
//! they sleep (waking a sleeping thread costs a futex call, tens of microseconds), and a
//! job is published by bumping one counter.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker polls for the next job before it sleeps. Between the matrix
/// products of one token the caller does microseconds of serial work; between tokens
/// (sampling, detokenising, a server's bookkeeping) rather more.
const SPIN: Duration = Duration::from_millis(2);

type Task<'a> = dyn Fn(usize) + Sync + 'a;

struct Shared {
    /// Bumped once per job; workers wait for it to change.
    generation: AtomicUsize,
    /// The current job: a `*const &Task` valid until every worker has reported done.
    job: AtomicPtr<()>,
    tasks: AtomicUsize,
    next: AtomicUsize,
    done: AtomicUsize,
    sleepers: AtomicUsize,
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
            generation: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
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
        let Ok(_guard) = self.submit.try_lock() else {
            (0..tasks).for_each(f);
            return;
        };
        let s = self.shared;
        let job: *const &Task = &f;
        s.job.store(job as *mut (), Relaxed);
        s.tasks.store(tasks, Relaxed);
        s.next.store(0, Relaxed);
        s.done.store(0, Relaxed);
        s.generation.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _l = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        drain(s, f);
        while s.done.load(Acquire) < self.workers {
            std::hint::spin_loop();
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
        loop {
            let g = s.generation.load(Acquire);
            if g != seen {
                seen = g;
                break;
            }
            polls = polls.wrapping_add(1);
            if !polls.is_multiple_of(256) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut l = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            while s.generation.load(SeqCst) == seen {
                l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, SeqCst);
        }
        // SAFETY: `run` published this pointer before bumping the generation and keeps
        // the closure alive until this worker has added itself to `done`.
        let f: &Task = unsafe { *(s.job.load(Relaxed) as *const &Task) };
        drain(s, f);
        s.done.fetch_add(1, Release);
    }
}
