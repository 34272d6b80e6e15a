//! [`Syncer`]: one file's syncs on a thread of their own, so that the writer goes on writing the next batch while
//! the disk makes the last one durable ([`super::PartialFile::start_sync`] on the local volume).
//!
//! The thread runs one sync at a time. A sync answers every request made before it started (their writes came
//! before the request, so before the sync); a request made while a sync runs waits for the next one, which then
//! answers every request that queued meanwhile: one `fdatasync` for all of them (a group commit). Answers come in
//! the order the requests were made.

use std::io;
use std::sync::{mpsc, OnceLock};

use tokio::sync::oneshot;

use super::PendingSync;

/// A request for a sync: where to send its result.
type Request = oneshot::Sender<io::Result<()>>;

/// The sync thread of one file; it ends when this is dropped.
pub(crate) struct Syncer {
    requests: mpsc::Sender<Request>,
}

impl Syncer {
    /// Starts the thread; `sync` makes every write made before it was called durable.
    pub(crate) fn spawn(sync: impl Fn() -> io::Result<()> + Send + 'static) -> io::Result<Syncer> {
        let (requests, incoming) = mpsc::channel();
        std::thread::Builder::new()
            .name("ferry-sync".into())
            .spawn(move || serve(&incoming, &sync))?;
        Ok(Syncer { requests })
    }

    /// Asks for a sync covering every write made before this call; `None` if the thread is gone (the caller then
    /// syncs itself).
    pub(crate) fn start(&self) -> Option<PendingSync> {
        let (answer, pending) = oneshot::channel();
        self.requests.send(answer).ok()?;
        Some(PendingSync::running(pending))
    }
}

/// A file's sync thread, started by the first sync that asks for it; where it cannot be started, syncs run on the
/// caller's thread.
#[derive(Default)]
pub(crate) struct LazySyncer(OnceLock<Option<Syncer>>);

impl LazySyncer {
    /// A sync covering every write made before this call: on the thread, which `spawn` starts on first use (`None`:
    /// it could not be), or else `here`, now.
    pub(crate) fn start(
        &self,
        spawn: impl FnOnce() -> Option<Syncer>,
        here: impl FnOnce() -> io::Result<()>,
    ) -> PendingSync {
        match self.0.get_or_init(spawn).as_ref().and_then(Syncer::start) {
            Some(pending) => pending,
            None => PendingSync::finished(here()),
        }
    }
}

/// Answers requests until every sender is gone: each sync answers the requests that were made before it started.
fn serve(incoming: &mpsc::Receiver<Request>, sync: &dyn Fn() -> io::Result<()>) {
    while let Ok(first) = incoming.recv() {
        let mut waiting = vec![first];
        waiting.extend(incoming.try_iter());
        let result = sync();
        for answer in waiting {
            let _ = answer.send(copy_of(&result));
        }
    }
}

/// The same result again, for another waiter (`io::Error` is not `Clone`).
fn copy_of(result: &io::Result<()>) -> io::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(e) => Err(match e.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(e.kind(), e.to_string()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A slow disk: a sync makes durable what was written when it started, and takes `delay`.
    fn slow_disk(delay: Duration) -> (Arc<AtomicU64>, Arc<AtomicU64>, Syncer) {
        let (written, durable) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (w, d) = (written.clone(), durable.clone());
        let syncer = Syncer::spawn(move || {
            let seen = w.load(Ordering::SeqCst);
            std::thread::sleep(delay);
            d.fetch_max(seen, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        (written, durable, syncer)
    }

    /// A sync requested while another runs is not answered by the running one (which may have started before the
    /// request's writes), but by a later one: when it answers, the writes before it are durable.
    #[test]
    fn a_sync_requested_during_another_covers_the_writes_before_it() {
        let (written, durable, syncer) = slow_disk(Duration::from_millis(60));
        written.store(1, Ordering::SeqCst);
        let first = syncer.start().unwrap();
        std::thread::sleep(Duration::from_millis(20)); // the first sync runs
        written.store(2, Ordering::SeqCst);
        let second = syncer.start().unwrap();
        second.wait().unwrap();
        assert_eq!(
            durable.load(Ordering::SeqCst),
            2,
            "answered before its writes were durable"
        );
        first.wait().unwrap();
    }

    /// Requests queued while a sync runs share the next sync, and every one is answered. The first sync is held
    /// until all five were asked (a gate, not a sleep), so the count does not depend on the machine's load.
    #[test]
    fn requests_queued_during_a_sync_share_the_next() {
        let syncs = Arc::new(AtomicU64::new(0));
        let counted = syncs.clone();
        let (open, gate) = mpsc::channel::<()>();
        let syncer = Syncer::spawn(move || {
            // The first sync waits for the gate; once it is dropped, later ones pass at once.
            let _ = gate.recv_timeout(Duration::from_secs(10));
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        let pending: Vec<PendingSync> = (0..5).map(|_| syncer.start().unwrap()).collect();
        open.send(()).unwrap();
        drop(open);
        for sync in pending {
            sync.wait().unwrap();
        }
        assert!(
            syncs.load(Ordering::SeqCst) <= 2,
            "{} syncs for 5 requests",
            syncs.load(Ordering::SeqCst)
        );
    }

    /// A failed sync fails every request it answers.
    #[test]
    fn a_failed_sync_fails_every_request_it_answers() {
        let syncer = Syncer::spawn(|| Err(io::Error::from_raw_os_error(libc::EIO))).unwrap();
        let (a, b) = (syncer.start().unwrap(), syncer.start().unwrap());
        assert_eq!(a.wait().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(b.wait().unwrap_err().raw_os_error(), Some(libc::EIO));
    }
}
