//! Scheduling class of the daemon's threads (Linux), for a server started
//! under a real-time policy (`chrt -f`, or `CPUSchedulingPolicy=fifo` in a
//! unit; the benchmarks do it to every server they compare).
//!
//! Threads inherit their creator's policy, so without this every runtime
//! worker (probes, the publisher's snapshot builds, the admin API) would
//! run SCHED_FIFO too, at the priority of the UDP query threads: a query
//! arriving while a probe or a build runs on the same CPU waits until it
//! blocks, as equal FIFO priorities never preempt each other. That showed
//! as a p99 of 300-777 µs at 5,000 q/s in some benchmark repetitions where
//! Knot's static zone (no background work) stayed under 101 µs.
//!
//! So: [`remember`] notes the process's policy at start, before any thread
//! exists; [`background`] (every runtime thread, at its start) drops a
//! real-time policy to SCHED_OTHER; [`queries`] (every UDP query thread)
//! takes back the policy noted at start. Under the usual SCHED_OTHER
//! nothing changes at all: no thread is re-niced, so a query flood cannot
//! starve the probes any more than before.
//!
//! The `unsafe` here is three FFI calls on the calling thread with a
//! parameter struct owned by the caller.

use std::sync::OnceLock;

/// The policy and priority the process started with.
static STARTED: OnceLock<(libc::c_int, libc::c_int)> = OnceLock::new();

fn current() -> Option<(libc::c_int, libc::c_int)> {
    // SAFETY: pid 0 is the calling thread; `param` is a valid, owned
    // sched_param the call writes into.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 || unsafe { libc::sched_getparam(0, &mut param) } != 0 {
        return None;
    }
    Some((policy, param.sched_priority))
}

fn set(policy: libc::c_int, priority: libc::c_int) -> bool {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread (Linux sets the policy per
    // thread); `param` lives across the call.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

fn real_time(policy: libc::c_int) -> bool {
    policy == libc::SCHED_FIFO || policy == libc::SCHED_RR
}

/// Notes the policy the process started with; call once, first thing.
pub fn remember() {
    if let Some(started) = current() {
        let _ = STARTED.set(started);
    }
}

/// A background thread (tokio's workers and blocking pool): off any
/// real-time policy, so it never holds a query thread back.
pub fn background() {
    if let Some((policy, _)) = current()
        && real_time(policy)
    {
        // Lowering one's own policy needs no privilege.
        set(libc::SCHED_OTHER, 0);
    }
}

/// A query thread: the policy the process started with. Only ever raises
/// back what [`background`] lowered; failure (no privilege) leaves the
/// thread as it is.
pub fn queries() {
    if let Some(&started) = STARTED.get() {
        restore(started);
    }
}

fn restore((policy, priority): (libc::c_int, libc::c_int)) {
    if real_time(policy) && current().is_some_and(|now| now != (policy, priority)) {
        set(policy, priority);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under SCHED_OTHER (tests do not run real-time) neither call changes
    /// the thread's policy or priority.
    #[test]
    fn an_ordinary_thread_is_left_as_it_is() {
        std::thread::spawn(|| {
            let before = current().expect("sched_getscheduler works");
            assert!(!real_time(before.0), "tests run under SCHED_OTHER");
            remember();
            background();
            assert_eq!(current(), Some(before));
            queries();
            assert_eq!(current(), Some(before));
        })
        .join()
        .unwrap();
    }

    /// A thread started real-time (when this process may do that: root or
    /// RLIMIT_RTPRIO) is dropped to SCHED_OTHER as a background thread and
    /// gets its policy back as a query thread.
    #[test]
    fn a_real_time_start_is_dropped_for_background_work_and_kept_for_queries() {
        std::thread::spawn(|| {
            if !set(libc::SCHED_FIFO, 1) {
                eprintln!("skipped: this process may not use SCHED_FIFO");
                return;
            }
            let started = current().expect("sched_getscheduler works");
            assert_eq!(started, (libc::SCHED_FIFO, 1));
            background();
            assert_eq!(current(), Some((libc::SCHED_OTHER, 0)));
            restore(started);
            assert_eq!(current(), Some(started));
            set(libc::SCHED_OTHER, 0);
        })
        .join()
        .unwrap();
    }
}
