//! Live progress of one transfer run, shared between the engine that moves bytes and whoever shows them.
//!
//! The sender and the receiver update a [`Meter`] with relaxed atomic adds at the points that matter (a chunk on
//! the wire, a batch made durable, what the other side already held); a display polls [`Meter::snapshot`] on its own
//! clock. Nothing here blocks the data path, and a meter nobody reads costs a few atomic adds per chunk.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Counters of one run (all attempts).
#[derive(Debug, Default)]
pub struct Meter {
    total: AtomicU64,
    done: AtomicU64,
    held: AtomicU64,
    moved: AtomicU64,
    resent: AtomicU64,
    attempts: AtomicU64,
    /// Set when an attempt starts: the next report of what the receiver holds replaces `done` instead of adding.
    stale: AtomicBool,
    /// A tree is moving (the display shows a total beside the file bars).
    tree: AtomicBool,
    /// The file moving through its own Offer now, and how much of it the receiver holds.
    file: Mutex<FileMeter>,
    file_done: AtomicU64,
    /// What the receiver held of the file before the current one when that one started (its final count).
    previous_done: AtomicU64,
}

/// The file of the moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileMeter {
    /// Its path.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Counts files started, so a display can tell a new file (or a new attempt at one) from the last.
    pub seq: u64,
}

/// A consistent-enough reading of a [`Meter`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Bytes of the source (a file's size, or a tree's file bytes); 0 until known.
    pub total: u64,
    /// Bytes the receiver holds durably: what it already had plus what was acknowledged since.
    pub done: u64,
    /// Of `done`, what the receiver held before this attempt (resumed, unchanged or reused): never sent.
    pub held: u64,
    /// Payload bytes that crossed the wire, resends included.
    pub moved: u64,
    /// Chunks the receiver rejected (damaged in transit, or changed at the source) and had sent again.
    pub resent: u64,
    /// Connection attempts so far (1 for a run without a reconnect).
    pub attempts: u64,
    /// The file moving now, if any.
    pub file: FileMeter,
    /// Bytes of that file the receiver holds durably.
    pub file_done: u64,
    /// The same for the file before it, when it ended.
    pub previous_done: u64,
    /// A tree is moving.
    pub tree: bool,
}

impl Meter {
    /// The run's total becomes at least `bytes` (a tree's total is set before its large files are offered).
    pub fn expect(&self, bytes: u64) {
        self.total.fetch_max(bytes, Ordering::Relaxed);
    }

    /// A new connection attempt starts; what the receiver holds is reported afresh by it.
    pub fn attempt(&self) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        self.stale.store(true, Ordering::Relaxed);
    }

    /// The receiver already holds `bytes` (present before this attempt sent anything).
    pub fn present(&self, bytes: u64) {
        if self.stale.swap(false, Ordering::Relaxed) {
            self.done.store(0, Ordering::Relaxed);
            self.held.store(0, Ordering::Relaxed);
        }
        self.done.fetch_add(bytes, Ordering::Relaxed);
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `bytes` more were made durable on the receiver.
    pub fn durable(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `bytes` of payload crossed the wire.
    pub fn moved(&self, bytes: u64) {
        self.moved.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A chunk was rejected and goes again.
    pub fn resent(&self) {
        self.resent.fetch_add(1, Ordering::Relaxed);
    }

    /// A tree's transfer starts: `total` bytes in its files, `present` of them already on the receiver.
    pub fn tree(&self, total: u64, present: u64) {
        self.tree.store(true, Ordering::Relaxed);
        self.expect(total);
        self.present(present);
    }

    /// A file of `size` bytes starts moving through its own Offer; the receiver holds `present` of them already.
    pub fn file(&self, name: &str, size: u64, present: u64) {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.name.clear();
        file.name.push_str(name);
        file.size = size;
        file.seq += 1;
        let previous = self.file_done.swap(present, Ordering::Relaxed);
        self.previous_done.store(previous, Ordering::Relaxed);
        drop(file);
        if !self.tree.load(Ordering::Relaxed) {
            self.expect(size);
        }
        self.present(present);
    }

    /// `bytes` more of the current file were made durable on the receiver.
    pub fn file_durable(&self, bytes: u64) {
        self.file_done.fetch_add(bytes, Ordering::Relaxed);
        self.durable(bytes);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        let total = self.total.load(Ordering::Relaxed);
        Snapshot {
            total,
            done: self.done.load(Ordering::Relaxed),
            held: self.held.load(Ordering::Relaxed),
            moved: self.moved.load(Ordering::Relaxed),
            resent: self.resent.load(Ordering::Relaxed),
            attempts: self.attempts.load(Ordering::Relaxed),
            file: self.file.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            file_done: self.file_done.load(Ordering::Relaxed),
            previous_done: self.previous_done.load(Ordering::Relaxed),
            tree: self.tree.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_attempt_replaces_what_the_receiver_holds_instead_of_counting_it_twice() {
        let meter = Meter::default();
        meter.expect(100);
        meter.attempt();
        meter.present(40);
        meter.durable(20);
        assert_eq!(meter.snapshot().done, 60);
        meter.attempt();
        assert_eq!(
            meter.snapshot().done,
            60,
            "the display keeps the last reading until the receiver answers"
        );
        meter.present(60);
        meter.durable(40);
        let snap = meter.snapshot();
        assert_eq!((snap.total, snap.done, snap.held, snap.attempts), (100, 100, 60, 2));
    }

    #[test]
    fn files_of_a_tree_count_towards_the_total_and_each_starts_its_own_count() {
        let meter = Meter::default();
        meter.attempt();
        meter.tree(100, 30);
        meter.durable(10); // small files
        meter.file("big.iso", 50, 20);
        meter.file_durable(30);
        let snap = meter.snapshot();
        assert!(snap.tree);
        assert_eq!((snap.total, snap.done, snap.held), (100, 90, 50));
        assert_eq!(
            (snap.file.name.as_str(), snap.file.size, snap.file_done, snap.file.seq),
            ("big.iso", 50, 50, 1)
        );
        meter.file("next.iso", 10, 0);
        let snap = meter.snapshot();
        assert_eq!((snap.file_done, snap.file.seq, snap.previous_done), (0, 2, 50));
    }
}
