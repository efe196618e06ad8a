//! cairnd's memory allocator: mimalloc, set up per role.
//!
//! A pool allocates and frees many small objects per request (the store, the WASI
//! context, hyper's request and response, wasmtime's instance bookkeeping), on whichever worker
//! thread runs the request. With glibc's malloc that was ~8% of a pool's CPU time; with mimalloc
//! a pool serves a few percent more requests per second (+3% over 12 alternating rounds,
//! BENCHMARKS.md, session 10).
//!
//! Left at its defaults, mimalloc would cost memory: it asks for transparent huge pages for its
//! arenas, and keeps freed pages for a while before returning them. The supervisor's RSS with
//! 1,000 idle apps went from 51 to 108 MiB. So it is built without that advice (`no_thp`),
//! this process never gets huge pages at all (see [`refuse_huge_pages`]), and the supervisor, which
//! mostly idles between bursts of work, returns freed pages at once (46 MiB with 1,000 apps).
//! Pools keep mimalloc's delay (a second): returning pages between requests would cost a system
//! call and a TLB flush on every core per request.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its place in `mi_option_e` (mimalloc.h) of the mimalloc
/// that libmimalloc-sys builds (3.x), which does not name it. Checked by a test.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// For every cairnd process, first thing in `main`: no transparent huge pages. Where the kernel
/// gives them to every large mapping (`always`), a 2 MiB page would back memory a process
/// touched a few bytes of (mimalloc's arenas, and in pools the instances' memories), which makes
/// memory use, and so cgroup limits, unpredictable. Inherited by the pool processes this one
/// starts. Best effort: a kernel without the setting gives no huge pages unasked anyway.
pub fn refuse_huge_pages() {
    let _ = nix::sys::prctl::set_thp_disable(true);
}

/// For the supervisor: freed memory goes back to the kernel at once instead of after mimalloc's
/// delay, so a burst of work (compiling a component, a sync) leaves no high-water mark behind.
pub fn return_freed_memory_at_once() {
    // SAFETY: sets a plain option value; mimalloc reads it when it next decides to purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_where_we_set_it() {
        // The purge delay is 1000 ms in mimalloc 3 unless MIMALLOC_PURGE_DELAY says otherwise;
        // another option in this place (a renumbered enum after an upgrade) would not read that.
        let expected = std::env::var("MIMALLOC_PURGE_DELAY")
            .ok()
            .and_then(|set| set.parse().ok())
            .unwrap_or(1000);
        // SAFETY: reads an option value.
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            delay, expected,
            "option {MI_OPTION_PURGE_DELAY} is not mimalloc's purge delay"
        );
    }
}
