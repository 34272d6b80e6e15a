//! [`GatedStore`] (tests only): an in-memory store that counts the chunk PUTs in flight and holds each one until
//! enough run at once, so a test can tell whether a writer keeps PUTs in flight across its syncs, without timing
//! anything. It also records, for every journal entry PUT, whether each chunk object it names already existed, and
//! can hold the DELETEs of journal objects (to see what a commit waits for) and the PUTs of journal entries (to
//! see which batches one entry gathers).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{BoxStream, StreamExt};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use tokio::sync::watch;

use super::layout::{JournalEntry, Layout};
use crate::manifest::Manifest;

/// An [`InMemory`] store whose chunk PUTs wait until `hold_until` of them run at once (then every PUT passes), or
/// until `patience` passed (so a writer that never gets there fails its test instead of hanging it).
#[derive(Debug)]
pub(crate) struct GatedStore {
    inner: InMemory,
    layout: Layout,
    manifest: Arc<Manifest>,
    hold_until: usize,
    patience: Duration,
    running: AtomicUsize,
    most: AtomicUsize,
    open: watch::Sender<bool>,
    /// Per journal entry PUT (not retractions): whether every chunk it names had been stored before it.
    journaled: Mutex<Vec<bool>>,
    /// Whether DELETEs of journal objects pass (else each waits until they do, or `patience` passed).
    deletes: watch::Sender<bool>,
    /// Whether journal entry PUTs pass (else each waits until they do, or `patience` passed).
    journals: watch::Sender<bool>,
    /// Journal entry PUTs waiting at that gate now.
    journals_held: AtomicUsize,
}

impl std::fmt::Display for GatedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GatedStore({})", self.inner)
    }
}

impl GatedStore {
    /// A store for the namespace `layout`, whose journal entries name chunks of `manifest`.
    pub(crate) fn new(layout: Layout, manifest: Arc<Manifest>, hold_until: usize, patience: Duration) -> Self {
        GatedStore {
            inner: InMemory::new(),
            layout,
            manifest,
            hold_until,
            patience,
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            open: watch::Sender::new(false),
            journaled: Mutex::new(Vec::new()),
            deletes: watch::Sender::new(true),
            journals: watch::Sender::new(true),
            journals_held: AtomicUsize::new(0),
        }
    }

    /// Holds every DELETE of a journal object from now until [`GatedStore::release_deletes`].
    pub(crate) fn hold_deletes(&self) {
        self.deletes.send_replace(false);
    }

    /// Lets the held DELETEs of journal objects, and every later one, pass.
    pub(crate) fn release_deletes(&self) {
        self.deletes.send_replace(true);
    }

    /// Holds every journal entry PUT from now until [`GatedStore::release_journals`].
    pub(crate) fn hold_journals(&self) {
        self.journals.send_replace(false);
    }

    /// Lets the held journal entry PUTs, and every later one, pass.
    pub(crate) fn release_journals(&self) {
        self.journals.send_replace(true);
    }

    /// Journal entry PUTs held now.
    pub(crate) fn journals_held(&self) -> usize {
        self.journals_held.load(Ordering::SeqCst)
    }

    /// The most chunk PUTs seen in flight at once.
    pub(crate) fn most_in_flight(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }

    /// Per journal entry, in the order they were PUT: whether its chunks were all stored before it.
    pub(crate) fn journaled(&self) -> Vec<bool> {
        self.journaled.lock().unwrap().clone()
    }

    async fn put_chunk(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        if now >= self.hold_until {
            self.open.send_replace(true);
        }
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(self.patience, open.wait_for(|open| *open)).await;
        let result = self.inner.put_opts(location, payload, opts).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn check_journal(&self, payload: &PutPayload) {
        let bytes: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
        let Ok(entry) = JournalEntry::decode(&bytes) else {
            return;
        };
        if entry.retract {
            return;
        }
        let mut stored = true;
        for index in entry.ranges.iter().flat_map(|r| r.indices()) {
            let Some(chunk) = self.manifest.chunk(index) else {
                stored = false;
                continue;
            };
            stored &= self.inner.head(&self.layout.chunk(&chunk.hash)).await.is_ok();
        }
        self.journaled.lock().unwrap().push(stored);
    }
}

#[async_trait]
impl ObjectStore for GatedStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        if self.layout.parse_chunk(location).is_some() {
            return self.put_chunk(location, payload, opts).await;
        }
        if location.as_ref().contains("/journal/") {
            self.journals_held.fetch_add(1, Ordering::SeqCst);
            let mut gate = self.journals.subscribe();
            let _ = tokio::time::timeout(self.patience, gate.wait_for(|open| *open)).await;
            self.journals_held.fetch_sub(1, Ordering::SeqCst);
            self.check_journal(&payload).await;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        let (gate, patience) = (self.deletes.subscribe(), self.patience);
        let held = locations.then(move |location| {
            let mut gate = gate.clone();
            async move {
                if matches!(&location, Ok(key) if key.as_ref().contains("/journal/")) {
                    let _ = tokio::time::timeout(patience, gate.wait_for(|open| *open)).await;
                }
                location
            }
        });
        self.inner.delete_stream(held.boxed())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
