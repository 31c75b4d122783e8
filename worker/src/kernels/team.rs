//! The compute team: a fixed set of threads that spin between the parallel sections of a step.
//!
//! One decode step of a small model opens a few hundred parallel sections (every matrix of
//! every layer, attention, the LM head), each only a few microseconds of work. A fork-join pool
//! like rayon pays for each of them with a job injection, a wake-up of sleeping workers through
//! the kernel and a latch wait (on a 2-core machine, a decode step of the default model took
//! 12.1 ms through rayon's global pool and 7.6 ms on this team: `model_step` bench). llama.cpp's
//! `ggml_threadpool` avoids that, and so does this team:
//!
//! - the worker threads are started once ([`Team::new`]) and, between sections, spin on an
//!   epoch counter, so publishing a section costs a cache-line transfer, not a system call;
//! - [`Team::run`] publishes `tasks` indices and a closure, then the calling thread takes part:
//!   every thread claims indices from one shared atomic counter until none are left, so a
//!   descheduled worker (a noisy neighbour) delays only the tasks it has claimed;
//! - after [`SPIN_WINDOW`] without work the workers park, so an idle engine does not burn its
//!   cores.
//!
//! Results never depend on which thread ran which task (every task writes its own outputs with
//! a fixed operation order), so a step gives the same bits on any number of threads.
//!
//! Kernels reach the team through the free functions ([`for_each`], [`for_each_mut`],
//! [`for_each_chunk_mut`]): the team [`Team::install`]ed on the calling thread, else a
//! process-wide default team with one thread per core. A section opened from inside another
//! section, or while the team is busy with another caller's section, runs serially on the
//! calling thread.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next section before it parks. Long enough to cover
/// the engine's own work between two steps (sampling, streaming), short enough that an idle
/// worker gives its core back quickly.
pub const SPIN_WINDOW: Duration = Duration::from_millis(2);

/// One parallel section, on the stack of the thread running [`Team::run`].
struct Section<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    /// Next unclaimed task index.
    next: AtomicUsize,
    /// Tasks finished (or panicked).
    done: AtomicUsize,
    /// The first panic of a task, re-raised on the calling thread.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Section<'_> {
    /// Claims and runs tasks until none are left.
    fn drain(&self) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.tasks {
                return;
            }
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| (self.f)(i))) {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
            self.done.fetch_add(1, SeqCst);
        }
    }
}

/// State shared by the calling thread and the workers.
#[derive(Default)]
struct Shared {
    /// Bumped once per published section.
    epoch: AtomicU64,
    /// The live section, null between sections. Its real lifetime is the `run` call that
    /// published it; `entered` keeps `run` from returning while a worker may still use it.
    section: AtomicPtr<Section<'static>>,
    /// Workers between "about to read `section`" and "done with it".
    entered: AtomicUsize,
    /// Workers parked (or about to park) waiting for the next epoch.
    parked: AtomicUsize,
    exit: AtomicBool,
    /// Held by the thread whose section is live; another caller runs its section itself.
    busy: Mutex<()>,
}

struct Inner {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.exit.store(true, SeqCst);
        self.shared.epoch.fetch_add(1, SeqCst);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            // A worker only ends by seeing `exit`; tasks' panics are caught inside `drain`.
            let _ = w.join();
        }
    }
}

/// A team of compute threads: the calling thread plus `threads - 1` workers. Cloning shares
/// the same threads; they stop when the last clone is dropped.
#[derive(Clone)]
pub struct Team {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team")
            .field("threads", &self.threads())
            .finish()
    }
}

thread_local! {
    /// The team [`Team::install`]ed on this thread.
    static CURRENT: RefCell<Option<Team>> = const { RefCell::new(None) };
    /// Whether this thread is running a task of a section (nested sections run serially).
    static IN_SECTION: Cell<bool> = const { Cell::new(false) };
}

impl Team {
    /// Starts a team of `threads` threads in all (the caller of [`Team::run`] is one of them),
    /// named `{name}-{i}`. `threads` of 0 means one per core.
    pub fn new(threads: usize, name: &str) -> std::io::Result<Self> {
        let threads = match threads {
            0 => thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let shared = Arc::new(Shared::default());
        let mut inner = Inner {
            shared: shared.clone(),
            workers: Vec::with_capacity(threads - 1),
        };
        for i in 1..threads {
            let shared = shared.clone();
            let handle = thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&shared))?;
            // On an error here, dropping `inner` stops the workers already started.
            inner.workers.push(handle);
        }
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The calling thread alone (needs no thread to be started).
    fn solo() -> Self {
        Self {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared::default()),
                workers: Vec::new(),
            }),
        }
    }

    /// Threads in the team, the calling thread included.
    pub fn threads(&self) -> usize {
        self.inner.workers.len() + 1
    }

    /// Runs `f` with this team as the one the free functions of this module use on this
    /// thread (the previous one is restored afterwards).
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Team>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let previous = self.0.take();
                CURRENT.with(|c| *c.borrow_mut() = previous);
            }
        }
        let previous = CURRENT.with(|c| c.borrow_mut().replace(self.clone()));
        let _restore = Restore(previous);
        f()
    }

    /// Calls `f(i)` once for every `i` in `0..tasks`, spread over the team, and returns when
    /// all calls have returned. A panic in `f` is re-raised here after the others finish.
    pub fn run<F: Fn(usize) + Sync>(&self, tasks: usize, f: F) {
        let serial = tasks <= 1 || self.inner.workers.is_empty() || IN_SECTION.with(Cell::get);
        let guard = match serial {
            true => None,
            false => self.inner.shared.busy.try_lock().ok(),
        };
        let Some(_guard) = guard else {
            (0..tasks).for_each(f);
            return;
        };
        let shared = &*self.inner.shared;
        let section = Section {
            f: &f,
            tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
        };
        // SAFETY (lifetime erasure): the pointer is withdrawn below, and `run` does not return
        // until no worker is inside the section (`entered == 0` after the withdrawal), so no
        // worker uses it after `section` and `f` are gone.
        let erased = &section as *const Section<'_> as *mut Section<'static>;
        shared.section.store(erased, SeqCst);
        shared.epoch.fetch_add(1, SeqCst);
        if shared.parked.load(SeqCst) > 0 {
            for w in &self.inner.workers {
                w.thread().unpark();
            }
        }
        IN_SECTION.with(|s| s.set(true));
        section.drain();
        IN_SECTION.with(|s| s.set(false));
        while section.done.load(SeqCst) < tasks {
            std::hint::spin_loop();
        }
        shared.section.store(ptr::null_mut(), SeqCst);
        while shared.entered.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
        let panic = section
            .panic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }
}

/// A worker: wait for a new epoch (spinning, then parked), run what is left of its section.
fn worker(shared: &Shared) {
    IN_SECTION.with(|s| s.set(true));
    // The epoch the team was created with, not a fresh read: a section published (or the
    // team dropped) before this thread got to run must still count as new.
    let mut seen = 0;
    loop {
        let mut idle_since: Option<Instant> = None;
        let mut spins = 0u32;
        loop {
            let epoch = shared.epoch.load(SeqCst);
            if epoch != seen {
                seen = epoch;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) {
                std::hint::spin_loop();
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < SPIN_WINDOW {
                continue;
            }
            // Park. `run` bumps the epoch before reading `parked`, and this thread counts
            // itself parked before re-reading the epoch, so one of the two sees the other.
            shared.parked.fetch_add(1, SeqCst);
            if shared.epoch.load(SeqCst) == seen {
                thread::park();
            }
            shared.parked.fetch_sub(1, SeqCst);
            idle_since = None;
        }
        if shared.exit.load(SeqCst) {
            return;
        }
        shared.entered.fetch_add(1, SeqCst);
        let section = shared.section.load(SeqCst);
        // SAFETY: a non-null pointer read after incrementing `entered` is a section whose
        // `run` has not withdrawn it yet, and that `run` waits for `entered` to drop to zero
        // before its stack frame ends.
        if let Some(section) = unsafe { section.as_ref() } {
            section.drain();
        }
        shared.entered.fetch_sub(1, SeqCst);
    }
}

/// The team the free functions use on this thread: the installed one, else the default.
fn current() -> Team {
    if let Some(team) = CURRENT.with(|c| c.borrow().clone()) {
        return team;
    }
    static DEFAULT: OnceLock<Option<Team>> = OnceLock::new();
    let default = DEFAULT.get_or_init(|| Team::new(0, "orchard-compute").ok());
    match default {
        Some(team) => team.clone(),
        // No thread could be started: a team of one (the caller) still computes correctly.
        None => Team::solo(),
    }
}

/// Threads of the team kernels on this thread use (sizes their task splits).
pub fn current_threads() -> usize {
    current().threads()
}

/// `f(i)` for every `i` in `0..tasks` on the current team.
pub fn for_each<F: Fn(usize) + Sync>(tasks: usize, f: F) {
    current().run(tasks, f)
}

/// A pointer to the items of a slice that tasks share; each task touches only its own item.
struct Items<T>(*mut T);

// SAFETY: only used by `for_each_mut`, where each index is handed to exactly one task, so the
// `&mut T` the tasks create never alias; `T: Send` lets each item move to another thread.
unsafe impl<T: Send> Sync for Items<T> {}

/// `f(i, &mut items[i])` for every item, on the current team.
pub fn for_each_mut<T: Send, F: Fn(usize, &mut T) + Sync>(items: &mut [T], f: F) {
    let n = items.len();
    let base = Items(items.as_mut_ptr());
    let base = &base;
    for_each(n, move |i| {
        // SAFETY: `i < n` and `for_each` calls every index exactly once, so each item is
        // borrowed mutably by one task only, while `items` is borrowed by this function.
        let item = unsafe { &mut *base.0.add(i) };
        f(i, item)
    });
}

/// `f(i, chunk)` for the `chunk`-long pieces of `data` (the last may be shorter), on the
/// current team.
pub fn for_each_chunk_mut<T: Send, F: Fn(usize, &mut [T]) + Sync>(
    data: &mut [T],
    chunk: usize,
    f: F,
) {
    let mut chunks: Vec<&mut [T]> = data.chunks_mut(chunk.max(1)).collect();
    for_each_mut(&mut chunks, |i, c| f(i, c));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once() {
        let team = Team::new(3, "test-team").expect("team");
        for tasks in [0, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            team.run(tasks, |i| {
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "tasks = {tasks}");
        }
    }

    #[test]
    fn chunks_are_disjoint_and_complete() {
        let team = Team::new(2, "test-team").expect("team");
        let mut data = vec![0usize; 1001];
        team.install(|| {
            for_each_chunk_mut(&mut data, 10, |i, c| {
                for (j, v) in c.iter_mut().enumerate() {
                    *v += i * 10 + j;
                }
            })
        });
        assert!(data.iter().enumerate().all(|(i, &v)| v == i));
    }

    #[test]
    fn workers_park_and_wake() {
        let team = Team::new(2, "test-team").expect("team");
        thread::sleep(SPIN_WINDOW * 3);
        let sum = AtomicUsize::new(0);
        team.run(64, |i| {
            sum.fetch_add(i, SeqCst);
        });
        assert_eq!(sum.load(SeqCst), 64 * 63 / 2);
    }

    #[test]
    fn nested_and_concurrent_sections_complete() {
        let team = Team::new(2, "test-team").expect("team");
        let total = AtomicUsize::new(0);
        thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    team.install(|| {
                        for_each(8, |_| for_each(4, |_| _ = total.fetch_add(1, SeqCst)))
                    })
                });
            }
        });
        assert_eq!(total.load(SeqCst), 3 * 8 * 4);
    }

    #[test]
    fn a_task_panic_reaches_the_caller_and_the_team_still_works() {
        let team = Team::new(2, "test-team").expect("team");
        let caught = catch_unwind(AssertUnwindSafe(|| {
            team.run(16, |i| assert!(i != 11, "task 11 fails"));
        }));
        assert!(caught.is_err());
        let sum = AtomicUsize::new(0);
        team.run(16, |i| {
            sum.fetch_add(i, SeqCst);
        });
        assert_eq!(sum.load(SeqCst), 120);
    }
}
