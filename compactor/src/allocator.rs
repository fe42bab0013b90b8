//! The allocator's settings for a compaction process.
//!
//! A table-hour's large buffers (a batch's text, its chunks, a row group's columns) are
//! allocated and freed on several threads. With glibc's defaults each thread that meets
//! contention gets an arena of its own (up to eight per core), and after a large block is freed
//! the threshold above which blocks are mapped on their own rises to 32 MiB, so later large
//! blocks come from the heaps, which fragment and are not given back. Measured on the 5,000,000
//! row hour (`scripts/bench-compactor.sh --rows 5000000`), the peak RSS then grew with the
//! hour: 313-321 MB against 206 MB with two arenas and a fixed 4 MiB threshold, for the same
//! CPU time within the run-to-run noise (docs/COMPACTOR.md, "Memory and speed").

/// Arenas glibc may create.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENAS: i32 = 2;
/// Blocks of this size and above are mapped on their own and given back when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 4 << 20;

/// Applies the settings above; false when the allocator refused one. Call it first thing in
/// `main`, before any thread starts. Nothing to do (true) where the C library is not glibc.
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters; it is called before other
    // threads allocate, and both values are within the ranges glibc documents.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS) == 1
            && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_settings() {
        assert!(super::tune());
    }
}
