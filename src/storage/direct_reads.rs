//! [`LongReads`]: the long reads of a large local file, around the page cache (`O_DIRECT`), with the next window
//! read ahead on a thread of its own for a reader that goes through a committed file in order.
//!
//! A file the receiver wrote direct is not in the page cache. A buffered read of it fills the page cache first
//! (system time per page, for bytes read once) and comes in behind the kernel's readahead, which on the benchmark
//! machine ran at about a quarter of the disk's direct speed (docs/benchmarks.md). So a read at least
//! [`DIRECT_READ_MIN`] long, of a range the page cache does not hold whole, goes direct: through a second
//! descriptor of the same inode, into an aligned window from which the caller's bytes are copied.
//!
//! A direct read waits alone for the device. A committed file (the previous version a copy reads from, the base
//! of an in-place partial) is written only by an in-place apply, through a descriptor of its own, and a reader
//! that may overlap one checks what it read (a copy checks each chunk's hash, a digest is checked against the
//! manifest's), so its reads keep the window they read ([`Mode::Ahead`]): a reader that goes through it in order (the in-place check's read-back, the copy of an old
//! version beside the new one's writes) is served from that window, and the next window is read on a thread
//! (`ferry-readahead`) while the reader uses the last. A partial is written while it is read, so each of its reads
//! goes to the file and nothing is kept ([`Mode::Exact`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::direct::{open_direct, AlignedWindow, WindowThread};

/// A read at least this long goes around the page cache, unless the page cache holds all of it.
pub const DIRECT_READ_MIN: usize = 256 << 10;

/// The most one direct read takes, and the size of the window it reads into. A committed file read in order holds
/// two (the one being used, the next one being read): 4 MiB.
pub const READ_WINDOW: usize = 2 << 20;

/// The reads of one file: long ones through [`DirectReads`] where it could be opened, all through the page cache
/// otherwise.
#[derive(Default)]
pub struct LongReads(Option<std::sync::Mutex<DirectReads>>);

impl LongReads {
    /// Direct long reads of a partial (`file`), each to the file, where available and allowed.
    pub fn of_partial(file: &File) -> Self {
        LongReads(DirectReads::open(file, false).map(std::sync::Mutex::new))
    }

    /// Direct long reads of a committed file, read ahead for a reader in order, where available and allowed.
    pub fn of_committed(file: &File) -> Self {
        LongReads(DirectReads::open(file, true).map(std::sync::Mutex::new))
    }

    fn direct(&self) -> Option<std::sync::MutexGuard<'_, DirectReads>> {
        Some(self.0.as_ref()?.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads up to `buf.len()` bytes of `file` at `offset`; 0 at its end.
    pub fn read_at(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self.direct() {
            Some(mut direct) => direct.read(file, buf, offset),
            None => file.read_at(buf, offset),
        }
    }

    /// Fills `buf` from `file` at `offset`, failing with `UnexpectedEof` at its end.
    pub fn read_exact_at(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.direct() {
            Some(mut direct) => direct.read_exact(file, buf, offset),
            None => file.read_exact_at(buf, offset),
        }
    }
}

/// Direct reads of one file, through a second descriptor of the same inode opened `O_DIRECT`.
pub struct DirectReads {
    direct: File,
    align: usize,
    mode: Mode,
    /// Where the last read ended: a read that starts there continues a reader going in order.
    next: u64,
    /// Direct reads failed once with `EINVAL`: buffered from now.
    refused: bool,
}

/// Whether the bytes a direct read brought in may serve later reads.
enum Mode {
    /// Each read goes to the file (a partial, written while it is read); the window is allocated on the first.
    Exact(Option<AlignedWindow>),
    /// The last window is kept and the next one read ahead (a committed file).
    Ahead(ReadAhead),
}

/// Bytes `[start, start + len)` of the file, in the first `len` bytes of a window.
struct Held {
    start: u64,
    len: usize,
    window: AlignedWindow,
}

impl Held {
    fn end(&self) -> u64 {
        self.start + self.len as u64
    }

    /// Copies what it holds from `offset` on into `buf`; `None` if it does not hold the byte at `offset`.
    fn copy_to(&self, buf: &mut [u8], offset: u64) -> Option<usize> {
        if offset < self.start || offset >= self.end() {
            return None;
        }
        let skip = (offset - self.start) as usize;
        let n = (self.len - skip).min(buf.len());
        buf[..n].copy_from_slice(&self.window.bytes()[skip..skip + n]);
        Some(n)
    }
}

/// The windows of a committed file read in order: at most two, one held and one being read or spare.
#[derive(Default)]
struct ReadAhead {
    /// The last window read.
    held: Option<Held>,
    /// Where the window on the thread starts (it reads [`READ_WINDOW`] bytes from there).
    pending: Option<u64>,
    /// A window no longer needed, for the next read.
    spare: Option<AlignedWindow>,
    thread: Thread,
    /// Windows read on the thread and then used by a read (tests check that reads in order get them).
    windows_ahead: u64,
}

/// The read-ahead thread of a file, started by its first read in order that goes to the disk.
#[derive(Default)]
enum Thread {
    #[default]
    NotStarted,
    Running(WindowThread<io::Result<usize>>),
    /// It could not be started, or it stopped: reads wait for the disk.
    Unavailable,
}

impl ReadAhead {
    /// Serves a read at `offset` from the held window, or from the window read ahead once it is in (waiting for
    /// it); `None` if neither holds the byte at `offset`.
    fn serve(&mut self, buf: &mut [u8], offset: u64) -> io::Result<Option<usize>> {
        if let Some(n) = self.held.as_ref().and_then(|held| held.copy_to(buf, offset)) {
            return Ok(Some(n));
        }
        match self.pending {
            Some(start) if (start..start + READ_WINDOW as u64).contains(&offset) => {}
            _ => return Ok(None),
        }
        let Some((window, start, result)) = self.take_pending() else {
            return Ok(None);
        };
        let len = match result {
            Ok(len) => len,
            Err(e) => {
                self.spare = Some(window);
                return Err(e);
            }
        };
        self.windows_ahead += 1;
        self.hold(Held { start, len, window });
        Ok(self.held.as_ref().and_then(|held| held.copy_to(buf, offset)))
    }

    /// The window being read ahead, once the thread is done with it.
    fn take_pending(&mut self) -> Option<(AlignedWindow, u64, io::Result<usize>)> {
        self.pending.take()?;
        let Thread::Running(reader) = &self.thread else {
            return None;
        };
        let taken = reader.recv();
        if taken.is_none() {
            self.thread = Thread::Unavailable;
        }
        taken
    }

    /// Keeps `held` as the window later reads are served from; the one it replaces becomes the spare.
    fn hold(&mut self, held: Held) {
        if let Some(old) = self.held.replace(held) {
            self.spare = Some(old.window);
        }
    }

    /// A window to read into: the spare, else the held one (given up), else a new one.
    fn free_window(&mut self, align: usize) -> AlignedWindow {
        self.spare
            .take()
            .or_else(|| self.held.take().map(|held| held.window))
            .unwrap_or_else(|| AlignedWindow::new(align, READ_WINDOW))
    }

    /// Starts reading the window after the held one on the thread, if the held one is whole (not the file's end,
    /// nor the short read of a reader out of order) and `next` (where the reader is) lies in it.
    fn read_after_held(&mut self, direct: &File, align: usize, next: u64) {
        let Some(held) = &self.held else {
            return;
        };
        if held.len < READ_WINDOW || next < held.start || next > held.end() {
            return;
        }
        let want = held.end();
        match self.pending {
            Some(start) if start == want => return,
            Some(_) => {
                if let Some((window, _, _)) = self.take_pending() {
                    self.spare = Some(window);
                }
            }
            None => {}
        }
        if matches!(self.thread, Thread::NotStarted) {
            self.thread = direct
                .try_clone()
                .ok()
                .and_then(|direct| {
                    WindowThread::spawn("ferry-readahead", move |window: &mut AlignedWindow, offset| {
                        read_window(&direct, window.bytes_mut(), offset, align)
                    })
                })
                .map_or(Thread::Unavailable, Thread::Running);
        }
        let Thread::Running(reader) = &self.thread else {
            return;
        };
        let window = self
            .spare
            .take()
            .unwrap_or_else(|| AlignedWindow::new(align, READ_WINDOW));
        match reader.send(window, want) {
            Ok(()) => self.pending = Some(want),
            Err(window) => {
                self.spare = Some(window);
                self.thread = Thread::Unavailable;
            }
        }
    }
}

impl DirectReads {
    /// Direct reads of `file`, kept and read ahead if `ahead` (a committed file), or `None` where they are not
    /// available or not allowed.
    pub fn open(file: &File, ahead: bool) -> Option<Self> {
        let (direct, align) = open_direct(file, false)?;
        let mode = match ahead {
            true => Mode::Ahead(ReadAhead::default()),
            false => Mode::Exact(None),
        };
        Some(DirectReads {
            direct,
            align,
            mode,
            next: 0,
            refused: false,
        })
    }

    /// Reads up to `buf.len()` bytes at `offset` (0 at the end of the file): from a window read before or ahead,
    /// else a short request or one the page cache holds from `buffered`, else direct (at most [`READ_WINDOW`]
    /// bytes per call).
    pub fn read(&mut self, buffered: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let in_order = offset == self.next;
        let n = self.read_somewhere(buffered, buf, offset, in_order)?;
        self.next = offset + n as u64;
        if let (true, Mode::Ahead(ahead)) = (in_order && !self.refused, &mut self.mode) {
            ahead.read_after_held(&self.direct, self.align, self.next);
        }
        Ok(n)
    }

    fn read_somewhere(&mut self, buffered: &File, buf: &mut [u8], offset: u64, in_order: bool) -> io::Result<usize> {
        if let Mode::Ahead(ahead) = &mut self.mode {
            match ahead.serve(buf, offset) {
                Ok(Some(n)) => return Ok(n),
                Ok(None) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return self.refuse(buffered, buf, offset, &e),
                Err(e) => return Err(e),
            }
        }
        if self.refused || buf.len() < DIRECT_READ_MIN || all_cached(buffered, offset, buf.len()) == Some(true) {
            return buffered.read_at(buf, offset);
        }
        match self.read_direct(buf, offset, in_order) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.refuse(buffered, buf, offset, &e),
            done => done,
        }
    }

    /// Gives up on direct reads (the filesystem refused one) and reads `buf` through the page cache.
    fn refuse(&mut self, buffered: &File, buf: &mut [u8], offset: u64, error: &io::Error) -> io::Result<usize> {
        tracing::debug!(error = %error, "direct reads refused; reading through the page cache");
        self.refused = true;
        buffered.read_at(buf, offset)
    }

    /// Reads the aligned span around `[offset, offset + buf.len())` direct, a whole window for a reader in order
    /// of a committed file (kept for its next reads), and copies the caller's bytes out.
    fn read_direct(&mut self, buf: &mut [u8], offset: u64, in_order: bool) -> io::Result<usize> {
        let align = self.align as u64;
        let start = offset / align * align;
        let skip = (offset - start) as usize;
        let needed = (skip + buf.len()).next_multiple_of(self.align).min(READ_WINDOW);
        match &mut self.mode {
            Mode::Exact(window) => {
                let window = window.get_or_insert_with(|| AlignedWindow::new(self.align, READ_WINDOW));
                let got = read_window(&self.direct, &mut window.bytes_mut()[..needed], start, self.align)?;
                let n = got.saturating_sub(skip).min(buf.len());
                buf[..n].copy_from_slice(&window.bytes()[skip..skip + n]);
                Ok(n)
            }
            Mode::Ahead(ahead) => {
                let span = if in_order { READ_WINDOW } else { needed };
                let mut window = ahead.free_window(self.align);
                let len = match read_window(&self.direct, &mut window.bytes_mut()[..span], start, self.align) {
                    Ok(len) => len,
                    Err(e) => {
                        ahead.spare = Some(window);
                        return Err(e);
                    }
                };
                ahead.hold(Held { start, len, window });
                Ok(ahead
                    .held
                    .as_ref()
                    .and_then(|held| held.copy_to(buf, offset))
                    .unwrap_or(0))
            }
        }
    }

    /// Fills `buf` from `offset` with [`DirectReads::read`]s, failing with `UnexpectedEof` at the end of the file.
    pub fn read_exact(&mut self, buffered: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read(buffered, buf, offset)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Fills `window` (aligned, a whole number of blocks) from `offset` (aligned) through the direct descriptor, short
/// only at the end of the file: the byte count read.
fn read_window(direct: &File, window: &mut [u8], offset: u64, align: usize) -> io::Result<usize> {
    let mut got = 0;
    while got < window.len() {
        match direct.read_at(&mut window[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                // A read that ends off a block boundary ended at the end of the file.
                if n % align != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Whether the page cache holds every page of `[offset, offset + len)` of `file`, asked with `cachestat` (Linux
/// 6.5), which does no I/O; `None` where the kernel cannot tell (a direct read is right then too: it writes any
/// dirty cached page of its range first).
///
/// Not `preadv2(RWF_NOWAIT)`, which this used before: it returns what is cached, but it also starts readahead
/// for what is not, so a sequential read of an uncached file came out of the page cache after all, behind the
/// kernel's readahead (docs/benchmarks.md: 450 MB/s where a direct read of the same file ran at 2.1 GB/s).
fn all_cached(file: &File, offset: u64, len: usize) -> Option<bool> {
    // The syscall's number in the table every architecture shares since Linux 5.x (alpha aside).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    const CACHESTAT: Option<libc::c_long> = Some(451);
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const CACHESTAT: Option<libc::c_long> = None;
    let cachestat = CACHESTAT?;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    use std::os::fd::AsRawFd;
    // SAFETY: sysconf only reads a system parameter.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|&p| p > 0)?;
    let first = offset / page;
    let end = (offset + len as u64).div_ceil(page);
    let range = Range {
        off: first * page,
        len: (end - first) * page,
    };
    let mut stat = Stat::default();
    // SAFETY: `range` and `stat` are the kernel's `cachestat_range` and `cachestat`, alive for the call; the
    // flags must be 0.
    let done = unsafe {
        libc::syscall(
            cachestat,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0,
        )
    };
    (done == 0).then_some(stat.nr_cache >= end - first)
}

#[cfg(test)]
mod tests {
    use super::super::direct::tests::pattern;
    use super::*;

    /// A file in `dir` holding `data`, written out and dropped from the page cache, so that reads of it go to the
    /// disk.
    fn uncached_file(dir: &std::path::Path, data: &[u8]) -> File {
        let path = dir.join("f");
        std::fs::write(&path, data).unwrap();
        let file = File::open(&path).unwrap();
        drop_cache(&file);
        file
    }

    fn drop_cache(file: &File) {
        file.sync_all().unwrap();
        rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }

    /// Reads `len` bytes at `offset` with as many calls as it takes (fewer at the end of the file).
    fn read_all(reads: &mut DirectReads, file: &File, offset: usize, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match reads.read(file, &mut buf[got..], (offset + got) as u64).unwrap() {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        buf
    }

    /// Direct reads at unaligned offsets and lengths return exactly the file's bytes, short only at its end, in
    /// both modes and out of order.
    #[test]
    fn direct_reads_return_the_bytes_at_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(2 * READ_WINDOW + 300_001, 5);
        let file = uncached_file(dir.path(), &data);
        for ahead in [false, true] {
            let Some(mut reads) = DirectReads::open(&file, ahead) else {
                eprintln!("no direct I/O on this filesystem; nothing to check");
                return;
            };
            for (offset, len) in [
                (0, DIRECT_READ_MIN),
                (12_345, 1 << 20),
                (4096, 2 * READ_WINDOW),
                (2 * READ_WINDOW, 400_000),
                (700_000, DIRECT_READ_MIN),
                (data.len() - 10, DIRECT_READ_MIN),
            ] {
                let end = (offset + len).min(data.len());
                let got = read_all(&mut reads, &file, offset, len);
                assert_eq!(got, &data[offset..end], "at {offset}, {len} bytes, ahead {ahead}");
            }
            assert!(!reads.refused, "the filesystem took the direct reads");
        }
    }

    /// A committed file read in order, in pieces of odd sizes, comes out whole, and after the first window every
    /// window came from the read-ahead thread; a read elsewhere in between is answered right and does not stop it.
    #[test]
    fn a_committed_file_read_in_order_is_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(5 * READ_WINDOW + 12_345, 3);
        let file = uncached_file(dir.path(), &data);
        let Some(mut reads) = DirectReads::open(&file, true) else {
            eprintln!("no direct I/O on this filesystem; nothing to check");
            return;
        };
        let piece = 300_007;
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < data.len() {
            if offset > 3 * READ_WINDOW && offset < 3 * READ_WINDOW + piece {
                let elsewhere = read_all(&mut reads, &file, 1_000_000, DIRECT_READ_MIN);
                assert_eq!(elsewhere, &data[1_000_000..1_000_000 + DIRECT_READ_MIN]);
            }
            let got = read_all(&mut reads, &file, offset, piece);
            offset += got.len();
            out.extend_from_slice(&got);
            if got.is_empty() {
                break;
            }
        }
        assert!(out == data, "the file read in order differs from what was written");
        let Mode::Ahead(ahead) = &reads.mode else {
            unreachable!("opened with read-ahead");
        };
        assert!(
            ahead.windows_ahead >= 4,
            "only {} of 5 windows after the first came from the read-ahead thread",
            ahead.windows_ahead
        );
    }

    /// A partial's reads keep nothing: bytes written after a read are what the next read of them returns.
    #[test]
    fn a_partial_read_twice_returns_what_was_written_between() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(2 * READ_WINDOW, 1);
        let file = uncached_file(dir.path(), &data);
        let writable = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("f"))
            .unwrap();
        let Some(mut reads) = DirectReads::open(&file, false) else {
            eprintln!("no direct I/O on this filesystem; nothing to check");
            return;
        };
        assert_eq!(read_all(&mut reads, &file, 0, 1 << 20), &data[..1 << 20]);
        let patch = pattern(512 << 10, 77);
        writable.write_all_at(&patch, 512 << 10).unwrap();
        drop_cache(&writable);
        let mut expected = patch;
        expected.extend_from_slice(&data[1 << 20..(1 << 20) + (512 << 10)]);
        assert!(read_all(&mut reads, &file, 512 << 10, 1 << 20) == expected);
    }

    /// Bytes just written buffered are in the page cache; once dropped from it they are not, and asking does not
    /// bring them back (no readahead, unlike a `RWF_NOWAIT` read).
    #[test]
    fn only_a_range_the_page_cache_holds_whole_counts_as_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, pattern(1 << 20, 9)).unwrap();
        let file = File::open(&path).unwrap();
        let Some(cached) = all_cached(&file, 1000, 500_000) else {
            eprintln!("this kernel has no cachestat; nothing to check");
            return;
        };
        assert!(cached, "bytes just written are in the page cache");
        drop_cache(&file);
        assert_eq!(all_cached(&file, 1000, 500_000), Some(false));
        assert_eq!(all_cached(&file, 1000, 500_000), Some(false), "asking read nothing in");
        let mut some = vec![0u8; 4096];
        file.read_exact_at(&mut some, 0).unwrap();
        assert_eq!(all_cached(&file, 0, 4096), Some(true));
    }
}
