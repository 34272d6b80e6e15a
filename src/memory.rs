//! Process-wide memory settings, applied by the binary before any thread starts.
//!
//! Chunks are buffers of up to a few MiB, allocated on one thread and freed on another. glibc's malloc gives each
//! thread that allocates its own arena (up to 8 per core), and each arena keeps what was freed in it: as the
//! blocking pool's threads came and went over a long transfer, a server's RSS grew with the file size (54 MiB
//! after 1 GiB, 83 MiB after 8 GiB). One arena lets a freed chunk buffer serve the next chunk, whichever thread
//! asks. Chunk-sized allocations are rare (one per chunk), so the shared lock costs nothing measurable.

/// Fixes glibc's arena count to one (no effect with other C libraries). Call before spawning threads.
pub fn bound_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
