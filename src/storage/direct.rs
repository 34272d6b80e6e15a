//! [`DirectWrites`]: a partial's chunk bytes written around the page cache (`O_DIRECT`), in whole aligned blocks.
//!
//! A buffered `pwrite` copies every byte into page-cache pages the kernel must first find (and, on a guest whose
//! host reclaimed them, fault in): on the benchmark machine that copy was two thirds of the receiver's CPU during
//! a fresh push (docs/benchmarks.md). Direct I/O hands the disk the writer's own buffer instead. It wants the file
//! offset, the length and the memory aligned to the filesystem's direct-I/O alignment, while content-defined
//! chunks start anywhere, so bytes written in file order are gathered into an aligned buffer and written a full
//! buffer at a time; what cannot be written aligned (the part of a block before a run of chunks starts, a run's
//! last partial block, a chunk out of order) goes through the ordinary descriptor, buffered.
//!
//! A full window is written by a thread of its own ([`WindowThread`]) while the next is gathered: a direct write
//! returns only once the device has taken the bytes (durable only after the batch's `fdatasync`, as before), so
//! on one thread the device waited for every copy into the window and the copies for the device (a fresh 2 GiB
//! push took 0.91x the time with the thread and two 2 MiB windows, bench/ab.sh). A write that fails fails every
//! later call of the partial, whoever hears of it first.
//!
//! The bytes still gathered, or in a window not yet taken back from the thread ("carried"), are not in the file
//! yet. Whatever reads, sizes, stamps or syncs the file must write them first ([`DirectWrites::flush`],
//! [`DirectWrites::flush_if_over`], which wait for the thread): the partial calls it before each of those, so the
//! rest of the receiver sees a file as if every write had gone straight to it, and a sync covers every byte
//! written before it started (proto-spec.md §8). Bytes carried when the process dies are lost like any unsynced
//! write: nothing records them durable before a sync that follows their flush.
//!
//! Where direct I/O is not available (a filesystem without it, no `/proc` to reopen the file, an alignment the
//! kernel refuses), every write is buffered, as before.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Bytes gathered before a direct write: the most one write hands the disk. A partial holds two such windows (one
/// being written while the next is gathered): 4 MiB in all, what one window of 4 MiB took before the thread (at
/// 4 MiB each, the server's peak RSS during an 8 GiB push rose from 40.7 to 46.5–47.4 MiB, near issue 14's 48).
pub const DIRECT_BUFFER: usize = 2 << 20;

/// A partial shorter than this is written buffered: its direct writes would be few and its buffer would cost more
/// than it saves (a tree's small files never get one).
pub const DIRECT_MIN_SIZE: u64 = 16 << 20;

/// The alignment assumed when the filesystem does not report its own (`statx` before Linux 6.1).
const DEFAULT_ALIGN: usize = 4096;

/// Whether this process may use direct I/O at all (the server's `direct_io` setting); on by default.
static DIRECT_IO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Allows or forbids direct I/O for every local file this process opens from now on (`direct_io = "never"`
/// forbids it: every read and write goes through the page cache).
pub fn set_direct_io(enabled: bool) {
    DIRECT_IO.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

fn direct_io_allowed() -> bool {
    DIRECT_IO.load(std::sync::atomic::Ordering::Relaxed)
}

/// A second open file description of `file` with `O_DIRECT` (for writing if `write`, else reading) and the
/// alignment its offsets, lengths and memory need; `None` where direct I/O is not allowed or not available.
pub(super) fn open_direct(file: &File, write: bool) -> Option<(File, usize)> {
    if !direct_io_allowed() {
        return None;
    }
    let align = direct_alignment(file)?;
    let direct = reopen_direct(file, write)
        .inspect_err(|e| tracing::debug!(error = %e, write, "no direct I/O; going through the page cache"))
        .ok()?;
    Some((direct, align))
}

/// `len` bytes whose start is aligned for direct I/O (inside a vector `align` bytes longer).
pub(super) struct AlignedWindow {
    memory: Vec<u8>,
    pad: usize,
    len: usize,
}

impl AlignedWindow {
    pub(super) fn new(align: usize, len: usize) -> Self {
        let memory = vec![0u8; len + align];
        let pad = memory.as_ptr().align_offset(align);
        AlignedWindow { memory, pad, len }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.memory[self.pad..self.pad + self.len]
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.memory[self.pad..self.pad + self.len]
    }
}

/// Direct writes into one partial file, through a second descriptor of the same inode opened `O_DIRECT`.
pub struct DirectWrites {
    /// The partial reopened with `O_DIRECT` (a new open file description; the ordinary one stays buffered).
    direct: File,
    /// Offset, length and memory alignment of a direct write.
    align: usize,
    /// Where the carried run is gathered.
    window: AlignedWindow,
    /// The carried run: bytes `[start, start + len)` of the file are in the window's first `len` bytes and not
    /// yet in the file. `start` is aligned.
    start: u64,
    len: usize,
    /// Bytes written with `O_DIRECT` so far.
    written_direct: u64,
    /// Direct writes failed once with `EINVAL` (an alignment or a filesystem that refuses them): buffered from now.
    refused: bool,
    /// The thread that writes a full window while the next one is gathered; started with the first full window.
    writer: Option<WindowThread<io::Result<()>>>,
    /// Where the window on the writer thread starts: it holds the [`DIRECT_BUFFER`] bytes from there (only a full
    /// window is handed over), not in the file until it is settled.
    in_flight: Option<u64>,
    /// A written window, for the next run to be gathered in.
    spare: Option<AlignedWindow>,
    /// The first write that failed (a refusal aside). Bytes were dropped with it, and whoever called first (the
    /// writer, or a reader flushing what it wants to read) got the error: every later call fails too, so that no
    /// sync after it is taken for one that covers those bytes.
    failed: Option<Failure>,
}

/// A failed write, kept so that every later call can fail with it.
#[derive(Clone, Debug)]
struct Failure {
    kind: io::ErrorKind,
    errno: Option<i32>,
    message: String,
}

impl Failure {
    fn of(error: &io::Error) -> Self {
        Failure {
            kind: error.kind(),
            errno: error.raw_os_error(),
            message: error.to_string(),
        }
    }

    /// The error again (the same `errno`, so a full disk is still told as one).
    fn error(&self) -> io::Error {
        match self.errno {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::new(
                self.kind,
                format!("an earlier write to this partial failed: {}", self.message),
            ),
        }
    }
}

/// A thread doing the direct I/O of one window at a time (handed over with its file offset) and handing each
/// window back with its offset and result, so that the device works on one window while the caller fills or uses
/// another: the writes of a partial ([`DirectWrites`]), the read-ahead of a committed file
/// (`super::direct_reads`). Closed and joined on drop, so that no I/O of the file outlives its owner.
pub(super) struct WindowThread<R> {
    /// Windows to work on, with their offsets; closed on drop.
    jobs: Option<std::sync::mpsc::SyncSender<(AlignedWindow, u64)>>,
    /// Each window back once done, with its offset and result.
    done: std::sync::mpsc::Receiver<(AlignedWindow, u64, R)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<R: Send + 'static> WindowThread<R> {
    /// The thread `name`, running `io` on each window handed to it (through a descriptor it owns), or `None` if it
    /// could not be started.
    pub(super) fn spawn(name: &str, mut io: impl FnMut(&mut AlignedWindow, u64) -> R + Send + 'static) -> Option<Self> {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<(AlignedWindow, u64)>(1);
        let (report, done) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for (mut window, offset) in queue {
                    let result = io(&mut window, offset);
                    if report.send((window, offset, result)).is_err() {
                        return;
                    }
                }
            })
            .inspect_err(|e| tracing::debug!(error = %e, thread = name, "no I/O thread; the caller does its own I/O"))
            .ok()?;
        Some(WindowThread {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }

    /// Hands `window` over, to be worked on at `offset`; back if the thread is gone.
    pub(super) fn send(&self, window: AlignedWindow, offset: u64) -> Result<(), AlignedWindow> {
        match &self.jobs {
            Some(jobs) => jobs.send((window, offset)).map_err(|refused| refused.0 .0),
            None => Err(window),
        }
    }

    /// The window handed over first and not yet taken back, once done; `None` if the thread is gone.
    pub(super) fn recv(&self) -> Option<(AlignedWindow, u64, R)> {
        self.done.recv().ok()
    }
}

impl<R> Drop for WindowThread<R> {
    /// Waits for the window being worked on (its owner has taken every window back by then, unless an I/O failed).
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl DirectWrites {
    /// Direct writes into `file` (open for writing), or `None` where they are not available or not allowed.
    pub fn open(file: &File) -> Option<Self> {
        let (direct, align) = open_direct(file, true)?;
        Some(DirectWrites {
            direct,
            align,
            window: AlignedWindow::new(align, DIRECT_BUFFER),
            start: 0,
            len: 0,
            written_direct: 0,
            refused: false,
            writer: None,
            in_flight: None,
            spare: None,
            failed: None,
        })
    }

    /// Bytes written with `O_DIRECT` so far.
    pub fn written_direct(&self) -> u64 {
        self.written_direct
    }

    /// Writes `data` at `offset` of the file behind `buffered` (the ordinary descriptor of the same file): gathered
    /// if it continues the carried run, else after the run is flushed, as the start of a new one. Fails, from the
    /// first failed write of this partial on, with that write's error.
    pub fn write(&mut self, buffered: &File, data: &[u8], offset: u64) -> io::Result<()> {
        self.unless_failed(|this| this.write_run(buffered, data, offset))
    }

    /// Runs `step` unless a write failed before; a step that fails is remembered as the partial's failure.
    fn unless_failed(&mut self, step: impl FnOnce(&mut Self) -> io::Result<()>) -> io::Result<()> {
        if let Some(failure) = &self.failed {
            return Err(failure.error());
        }
        step(self).inspect_err(|e| self.failed = Some(Failure::of(e)))
    }

    fn write_run(&mut self, buffered: &File, data: &[u8], offset: u64) -> io::Result<()> {
        if self.refused {
            self.flush_run(buffered)?;
            return buffered.write_all_at(data, offset);
        }
        // A run goes on after a full window if the next bytes follow it, even while that window is written.
        let continues = (self.len > 0 || self.in_flight.is_some()) && offset == self.start + self.len as u64;
        let mut rest = data;
        if !continues {
            self.flush_run(buffered)?;
            // The part of a block before the run's first aligned offset cannot be written direct.
            let head = (offset.next_multiple_of(self.align as u64) - offset).min(data.len() as u64) as usize;
            buffered.write_all_at(&data[..head], offset)?;
            rest = &data[head..];
            self.start = offset + head as u64;
            if rest.is_empty() {
                return Ok(());
            }
        }
        while !rest.is_empty() {
            let take = rest.len().min(DIRECT_BUFFER - self.len);
            self.window.bytes_mut()[self.len..self.len + take].copy_from_slice(&rest[..take]);
            self.len += take;
            rest = &rest[take..];
            if self.len == DIRECT_BUFFER {
                self.hand_off(buffered)?;
            }
        }
        Ok(())
    }

    /// Whether bytes `[offset, offset + len)` overlap the carried bytes (the run gathered, the window being
    /// written): not in the file yet.
    pub fn carries(&self, offset: u64, len: u64) -> bool {
        let overlaps =
            |start: u64, run: usize| run > 0 && offset < start + run as u64 && start < offset.saturating_add(len);
        overlaps(self.start, self.len) || self.in_flight.is_some_and(|start| overlaps(start, DIRECT_BUFFER))
    }

    /// Writes the carried bytes into the file: waits for the window being written (its error is this call's),
    /// then writes the run's whole blocks direct and its last partial block buffered. Fails, from the first failed
    /// write of this partial on, with that write's error.
    pub fn flush(&mut self, buffered: &File) -> io::Result<()> {
        self.unless_failed(|this| this.flush_run(buffered))
    }

    fn flush_run(&mut self, buffered: &File) -> io::Result<()> {
        self.settle(buffered)?;
        if self.len == 0 {
            return Ok(());
        }
        let blocks = self.len / self.align * self.align;
        if blocks > 0 {
            self.write_blocks(buffered, blocks)?;
        }
        if self.len > 0 {
            let (len, start) = (std::mem::take(&mut self.len), self.start);
            buffered.write_all_at(&self.window.bytes()[..len], start)?;
            self.start += len as u64;
        }
        Ok(())
    }

    /// Flushes the run if it overlaps `[offset, offset + len)`, so that a read of those bytes finds them.
    /// After a failed write, every read fails: the bytes dropped with it are not in the file.
    pub fn flush_if_over(&mut self, buffered: &File, offset: u64, len: u64) -> io::Result<()> {
        if let Some(failure) = &self.failed {
            return Err(failure.error());
        }
        if self.carries(offset, len) {
            self.flush(buffered)?;
        }
        Ok(())
    }

    /// Hands the full window to the writer thread and gathers on in another; written here, and waited for, where
    /// there is no thread or direct writes were refused.
    fn hand_off(&mut self, buffered: &File) -> io::Result<()> {
        self.settle(buffered)?;
        if self.refused {
            return self.write_blocks(buffered, DIRECT_BUFFER);
        }
        if self.writer.is_none() {
            let align = self.align;
            self.writer = self.direct.try_clone().ok().and_then(|direct| {
                WindowThread::spawn("ferry-direct", move |window: &mut AlignedWindow, offset| {
                    write_all_direct(&direct, window.bytes(), offset, align)
                })
            });
        }
        let Some(writer) = &self.writer else {
            return self.write_blocks(buffered, DIRECT_BUFFER);
        };
        let next = self
            .spare
            .take()
            .unwrap_or_else(|| AlignedWindow::new(self.align, DIRECT_BUFFER));
        let full = std::mem::replace(&mut self.window, next);
        if let Err(full) = writer.send(full, self.start) {
            self.spare = Some(std::mem::replace(&mut self.window, full));
            self.writer = None;
            return self.write_blocks(buffered, DIRECT_BUFFER);
        }
        self.in_flight = Some(self.start);
        self.start += DIRECT_BUFFER as u64;
        self.len = 0;
        Ok(())
    }

    /// Waits for the window on the writer thread, if there is one, and takes it back. Refused (`EINVAL`), its
    /// bytes are written buffered; failed otherwise, the error is returned and the run gathered since is dropped
    /// with it (those bytes belong to the batch not yet synced, and the failure, remembered, fails its sync).
    fn settle(&mut self, buffered: &File) -> io::Result<()> {
        let Some(start) = self.in_flight.take() else {
            return Ok(());
        };
        let Some((window, _, result)) = self.writer.as_ref().and_then(WindowThread::recv) else {
            self.len = 0;
            return Err(io::Error::other("the direct writer thread stopped"));
        };
        let written = landed(
            result,
            window.bytes(),
            start,
            buffered,
            &mut self.written_direct,
            &mut self.refused,
        );
        self.spare = Some(window);
        if written.is_err() {
            self.len = 0;
        }
        written
    }

    /// Writes the run's first `n` bytes (a multiple of the alignment) direct and moves what follows them to the
    /// window's start. On an error the run is dropped: its bytes belong to the batch not yet synced, which is
    /// never recorded durable after a failed write.
    fn write_blocks(&mut self, buffered: &File, n: usize) -> io::Result<()> {
        debug_assert_eq!(n % self.align, 0);
        let window = &self.window.bytes()[..n];
        let written = if self.refused {
            buffered.write_all_at(window, self.start)
        } else {
            let result = write_all_direct(&self.direct, window, self.start, self.align);
            landed(
                result,
                window,
                self.start,
                buffered,
                &mut self.written_direct,
                &mut self.refused,
            )
        };
        if let Err(e) = written {
            self.len = 0;
            return Err(e);
        }
        self.window.bytes_mut().copy_within(n..self.len, 0);
        self.start += n as u64;
        self.len -= n;
        Ok(())
    }
}

/// What the direct write of `bytes` at `offset` came to: counted in `written_direct` if it went through; refused
/// (`EINVAL`: an alignment or a filesystem that takes none), the bytes are written through `buffered` instead and
/// `refused` is set, so that every later write is buffered; any other error is returned.
fn landed(
    result: io::Result<()>,
    bytes: &[u8],
    offset: u64,
    buffered: &File,
    written_direct: &mut u64,
    refused: &mut bool,
) -> io::Result<()> {
    match result {
        Ok(()) => {
            *written_direct += bytes.len() as u64;
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!(error = %e, "direct writes refused; the partial is written buffered");
            *refused = true;
            buffered.write_all_at(bytes, offset)
        }
        Err(e) => Err(e),
    }
}

/// Writes all of `data` (aligned) at `offset` (aligned) through the direct descriptor. A short write of a whole
/// number of blocks goes on from where it stopped; one that is not is reported as `EINVAL`, so the caller writes
/// the run buffered (rewriting the same bytes is harmless).
fn write_all_direct(direct: &File, mut data: &[u8], mut offset: u64, align: usize) -> io::Result<()> {
    while !data.is_empty() {
        let n = direct.write_at(data, offset)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n % align != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        data = &data[n..];
        offset += n as u64;
    }
    Ok(())
}

/// The alignment direct I/O on `file` wants, from `statx` where the kernel reports it (`None`: the filesystem
/// does no direct I/O), else [`DEFAULT_ALIGN`].
fn direct_alignment(file: &File) -> Option<usize> {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    let Ok(stat) = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) else {
        return Some(DEFAULT_ALIGN);
    };
    if !StatxFlags::from_bits_retain(stat.stx_mask).contains(StatxFlags::DIOALIGN) {
        return Some(DEFAULT_ALIGN);
    }
    let (offset, memory) = (stat.stx_dio_offset_align as usize, stat.stx_dio_mem_align as usize);
    if offset == 0 || memory == 0 {
        return None;
    }
    let align = offset.max(memory).max(DEFAULT_ALIGN);
    (align.is_power_of_two() && align <= 1 << 16).then_some(align)
}

/// A second open file description of the very inode `file` is (through `/proc/self/fd`, so no path lookup can be
/// redirected), for writing (`write`) or reading with `O_DIRECT`.
fn reopen_direct(file: &File, write: bool) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `len` bytes of a pattern that differs with `seed` and repeats only every 256 bytes.
    pub(in crate::storage) fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A new partial in `dir` and its direct writes; `None` (and said) where the filesystem takes none.
    fn partial_with_direct_writes(dir: &std::path::Path) -> Option<(File, DirectWrites)> {
        let file = partial(dir);
        let Some(direct) = DirectWrites::open(&file) else {
            eprintln!("no direct I/O on this filesystem; nothing to check");
            return None;
        };
        Some((file, direct))
    }

    fn partial(dir: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join("p"))
            .unwrap()
    }

    /// Chunks of odd lengths at odd offsets, in order, then out of order and rewritten: the file holds exactly
    /// what was written once flushed, and most of an in-order run went direct where the filesystem allows it.
    #[test]
    fn unaligned_chunks_land_exactly_and_mostly_direct() {
        let dir = tempfile::tempdir().unwrap();
        let Some((file, mut direct)) = partial_with_direct_writes(dir.path()) else {
            return;
        };
        let size = 3 * DIRECT_BUFFER + 12_345;
        let expected = pattern(size, 7);
        // In order from an unaligned offset, in chunks of 100,003 bytes, after a first chunk of 777.
        let mut offset = 777;
        file.write_all_at(&expected[..777], 0).unwrap();
        while offset < size {
            let end = (offset + 100_003).min(size);
            direct.write(&file, &expected[offset..end], offset as u64).unwrap();
            offset = end;
        }
        assert!(
            direct.carries(size as u64 - 1, 1),
            "the run's tail is carried until a flush"
        );
        direct.flush(&file).unwrap();
        assert!(!direct.carries(0, u64::MAX));
        assert_eq!(std::fs::read(dir.path().join("p")).unwrap(), expected);
        assert!(
            direct.written_direct() >= 3 * DIRECT_BUFFER as u64 - 2 * direct.align as u64,
            "only {} bytes went direct",
            direct.written_direct()
        );

        // Out of order and over bytes already written (a resume, a repeat): later writes win.
        let patch = pattern(50_000, 99);
        let mut expected = expected;
        for at in [2 * DIRECT_BUFFER + 5, 10, DIRECT_BUFFER - 3] {
            direct.write(&file, &patch, at as u64).unwrap();
            expected[at..at + patch.len()].copy_from_slice(&patch);
        }
        direct.flush(&file).unwrap();
        assert_eq!(std::fs::read(dir.path().join("p")).unwrap(), expected);
    }

    /// A full window goes to the writer thread while the next is gathered: until it is taken back its bytes
    /// count as carried, so a read over them waits for the write instead of finding the file without them.
    #[test]
    fn a_window_being_written_counts_as_carried_until_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let Some((file, mut direct)) = partial_with_direct_writes(dir.path()) else {
            return;
        };
        let data = pattern(DIRECT_BUFFER + 10_000, 11);
        direct.write(&file, &data, 0).unwrap();
        assert!(direct.in_flight.is_some(), "the full window went to the writer thread");
        assert!(direct.carries(0, 1), "the window being written is carried");
        direct.flush_if_over(&file, 100, 1).unwrap();
        assert!(!direct.carries(0, u64::MAX));
        let mut back = vec![0; data.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back == data, "the file holds the window and the run after it");
        assert!(direct.written_direct() >= DIRECT_BUFFER as u64);
    }

    /// A write that fails, heard of by whoever flushed first (here a reader, through a descriptor that cannot
    /// write), fails every later write, flush and read of the partial with the same errno: the writer, which did
    /// not hear of it, cannot go on to sync as if the dropped bytes were in the file.
    #[test]
    fn a_failed_write_fails_every_later_call() {
        let dir = tempfile::tempdir().unwrap();
        let Some((file, mut direct)) = partial_with_direct_writes(dir.path()) else {
            return;
        };
        let read_only = File::open(dir.path().join("p")).unwrap();
        direct.write(&file, &pattern(10_000, 1), 0).unwrap();
        let errno = direct.flush_if_over(&read_only, 0, 1).unwrap_err().raw_os_error();
        assert!(errno.is_some(), "the failed write's errno is kept");
        let later = pattern(5_000, 2);
        assert_eq!(direct.write(&file, &later, 10_000).unwrap_err().raw_os_error(), errno);
        assert_eq!(direct.flush(&file).unwrap_err().raw_os_error(), errno);
        assert_eq!(
            direct.flush_if_over(&file, 50_000, 1).unwrap_err().raw_os_error(),
            errno
        );
    }

    /// A read of carried bytes must flush them first; one elsewhere must not break the run.
    #[test]
    fn only_a_read_over_the_carried_run_flushes_it() {
        let dir = tempfile::tempdir().unwrap();
        let Some((file, mut direct)) = partial_with_direct_writes(dir.path()) else {
            return;
        };
        let data = pattern(10_000, 3);
        direct.write(&file, &data, 0).unwrap();
        direct.flush_if_over(&file, 20_000, 100).unwrap();
        assert!(direct.carries(0, 1), "a read past the run leaves it carried");
        direct.flush_if_over(&file, 9_000, 100).unwrap();
        assert!(!direct.carries(0, u64::MAX));
        let mut back = vec![0; 10_000];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
    }
}
