//! A process-shared, robust pthread mutex that lives in shared memory.
//!
//! The flow table's stripes are guarded by these. "Robust" is what makes a
//! lock survive its holder: when a process dies holding one, the kernel walks
//! the dead thread's robust list, marks the lock word `FUTEX_OWNER_DIED` and
//! wakes one waiter; that waiter's `pthread_mutex_lock` returns `EOWNERDEAD`
//! with the lock held. The data it guards may be half-changed, so the new
//! holder repairs it and only then calls `pthread_mutex_consistent`. If it
//! unlocked without doing so, glibc would mark the mutex `ENOTRECOVERABLE`
//! forever; this wrapper makes that impossible to forget by taking the repair
//! as a closure that runs inside [`RobustMutex::lock`].
//!
//! pthread rwlocks have no robust variant, which is why the table uses
//! striped mutexes and lock-free (seqlock) readers instead of an rwlock.

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// How long a locker may wait for a stripe held by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Block until the lock is free (or its holder dies).
    Forever,
    /// Give up after this long (the holder may be stopped, not dead).
    Bounded(Duration),
}

/// Why a robust mutex could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// The wait bound passed while another process held the lock.
    #[error("lock still held by another process after the wait bound")]
    TimedOut,
    /// A previous holder died and its successor unlocked without repairing:
    /// the mutex can never be taken again.
    #[error("lock not recoverable (a repair was abandoned)")]
    NotRecoverable,
    /// pthread returned another error (the lock word is corrupt or the
    /// mutex was never initialised).
    #[error("pthread mutex error {0}")]
    Os(i32),
}

/// A `pthread_mutex_t` set up process-shared and robust, padded to a cache
/// line. It is only ever reached through a reference into the shared
/// mapping, never moved.
#[repr(C, align(64))]
pub struct RobustMutex {
    raw: UnsafeCell<libc::pthread_mutex_t>,
}

const _: () = assert!(std::mem::size_of::<libc::pthread_mutex_t>() <= 64);
const _: () = assert!(std::mem::size_of::<RobustMutex>() == 64);

// SAFETY: a pthread mutex is made to be used from many threads (and, set up
// PTHREAD_PROCESS_SHARED, many processes) at once through a shared pointer;
// every access goes through the pthread functions.
unsafe impl Sync for RobustMutex {}

/// Proof that the lock is held; unlocks on drop. Not `Send`: a pthread mutex
/// must be unlocked by the thread that locked it.
pub struct RobustGuard<'a> {
    mutex: &'a RobustMutex,
    repaired: bool,
    _not_send: PhantomData<*const ()>,
}

impl RobustGuard<'_> {
    /// True when this acquisition found the previous holder dead and ran the
    /// repair closure.
    pub fn repaired(&self) -> bool {
        self.repaired
    }
}

impl Drop for RobustGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: the guard exists only while this thread holds the lock,
        // and the mutex lives in a mapping that outlives the guard.
        unsafe { libc::pthread_mutex_unlock(self.mutex.raw.get()) };
    }
}

impl RobustMutex {
    /// Initialise the mutex in place: process-shared and robust.
    ///
    /// # Safety
    /// No thread of any process may be using the mutex (it must be freshly
    /// mapped memory that nobody else can reach yet), and the memory must be
    /// in a `MAP_SHARED` mapping that every user maps.
    pub unsafe fn init(&self) -> Result<(), LockError> {
        let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        let check = |rc: i32| {
            if rc == 0 {
                Ok(())
            } else {
                Err(LockError::Os(rc))
            }
        };
        // SAFETY: attr is initialised by pthread_mutexattr_init before any
        // other use and destroyed at the end; the mutex pointer is valid and,
        // per this function's contract, not in use by anyone.
        unsafe {
            check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let a = attr.as_mut_ptr();
            let result = check(libc::pthread_mutexattr_setpshared(
                a,
                libc::PTHREAD_PROCESS_SHARED,
            ))
            .and_then(|()| {
                check(libc::pthread_mutexattr_setrobust(
                    a,
                    libc::PTHREAD_MUTEX_ROBUST,
                ))
            })
            .and_then(|()| check(libc::pthread_mutex_init(self.raw.get(), a)));
            libc::pthread_mutexattr_destroy(a);
            result
        }
    }

    /// Take the lock, waiting as `wait` allows. If the previous holder died
    /// holding it, `repair` runs (with the lock held) before the mutex is
    /// marked consistent and the guard is returned.
    pub fn lock(
        &self,
        wait: LockWait,
        repair: impl FnOnce(),
    ) -> Result<RobustGuard<'_>, LockError> {
        let rc = match wait {
            LockWait::Forever => self.lock_blocking(),
            LockWait::Bounded(limit) => self.lock_bounded(limit),
        };
        match rc {
            0 => Ok(self.guard(false)),
            libc::EOWNERDEAD => {
                // The guard is built first so that, should `repair` unwind,
                // the lock is still released (without consistency: the next
                // locker then sees ENOTRECOVERABLE rather than a deadlock).
                let mut guard = self.guard(false);
                repair();
                // SAFETY: this thread holds the mutex (EOWNERDEAD acquires
                // it) and the protected state has just been repaired.
                let rc = unsafe { libc::pthread_mutex_consistent(self.raw.get()) };
                if rc != 0 {
                    return Err(LockError::Os(rc));
                }
                guard.repaired = true;
                Ok(guard)
            }
            libc::ETIMEDOUT | libc::EBUSY => Err(LockError::TimedOut),
            libc::ENOTRECOVERABLE => Err(LockError::NotRecoverable),
            other => Err(LockError::Os(other)),
        }
    }

    fn guard(&self, repaired: bool) -> RobustGuard<'_> {
        RobustGuard {
            mutex: self,
            repaired,
            _not_send: PhantomData,
        }
    }

    fn lock_blocking(&self) -> i32 {
        // SAFETY: the mutex was initialised by `init` before the region was
        // published, and lives in a mapping that outlives `self`.
        unsafe { libc::pthread_mutex_lock(self.raw.get()) }
    }

    fn lock_bounded(&self, limit: Duration) -> i32 {
        // SAFETY: as in lock_blocking.
        let rc = unsafe { libc::pthread_mutex_trylock(self.raw.get()) };
        if rc != libc::EBUSY {
            return rc;
        }
        let deadline = realtime_after(limit);
        // SAFETY: as in lock_blocking; `deadline` is a valid timespec.
        unsafe { libc::pthread_mutex_timedlock(self.raw.get(), &deadline) }
    }
}

/// CLOCK_REALTIME now + `d` (pthread_mutex_timedlock measures against the
/// realtime clock).
fn realtime_after(d: Duration) -> libc::timespec {
    // CLOCK_REALTIME always exists; were it unreadable, the deadline would
    // lie in the past and the wait end at once (a timeout, never a hang).
    let now = clock_gettime(ClockId::CLOCK_REALTIME)
        .map(|t| *t.as_ref())
        .unwrap_or(libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        });
    let nanos = now.tv_nsec as u64 + u64::from(d.subsec_nanos());
    libc::timespec {
        tv_sec: now
            .tv_sec
            .saturating_add(d.as_secs() as libc::time_t)
            .saturating_add((nanos / 1_000_000_000) as libc::time_t),
        tv_nsec: (nanos % 1_000_000_000) as _,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// A mutex in private memory is fine for single-process tests.
    fn boxed_mutex() -> Box<RobustMutex> {
        let m = Box::new(RobustMutex {
            raw: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
        });
        // SAFETY: freshly allocated, nobody else can reach it; the threads
        // of one process share it without a MAP_SHARED mapping.
        unsafe { m.init() }.unwrap();
        m
    }

    #[test]
    fn lock_unlock_and_bounded_wait() {
        let m = Arc::new(boxed_mutex());
        let g = m.lock(LockWait::Forever, || panic!("no repair")).unwrap();
        assert!(!g.repaired());
        let m2 = Arc::clone(&m);
        let r = std::thread::spawn(move || {
            m2.lock(LockWait::Bounded(Duration::from_millis(20)), || ())
                .map(|_| ())
        })
        .join()
        .unwrap();
        assert_eq!(r, Err(LockError::TimedOut));
        drop(g);
        assert!(m.lock(LockWait::Bounded(Duration::ZERO), || ()).is_ok());
    }

    #[test]
    fn holder_thread_exit_gives_owner_dead_and_repair_runs() {
        // A thread that exits holding a robust mutex is treated like a dead
        // process: the next locker gets EOWNERDEAD.
        let m = Arc::new(boxed_mutex());
        let m2 = Arc::clone(&m);
        std::thread::spawn(move || {
            std::mem::forget(m2.lock(LockWait::Forever, || ()).unwrap());
        })
        .join()
        .unwrap();
        let repairs = AtomicU32::new(0);
        let g = m
            .lock(LockWait::Forever, || {
                repairs.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
        assert!(g.repaired());
        drop(g);
        let g = m
            .lock(LockWait::Forever, || panic!("repaired once"))
            .unwrap();
        assert!(!g.repaired());
        assert_eq!(repairs.load(Ordering::Relaxed), 1);
    }
}
