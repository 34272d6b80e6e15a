//! `[store] gc = true`: this server runs the object store's mark-and-sweep gc (docs/object-store.md "gc", the
//! same run as `ferry gc --store`) at start and then every `gc_interval`, over every namespace of the bucket
//! prefix, until shutdown. Abandoned transfers expire after `partial_ttl`, unreferenced chunks after the grace
//! period the server's rule R assumes (`ObjectOptions::grace`). One server per bucket should run it; the gc lease
//! makes a second one refuse to start a run while another holds it, so two are safe, only wasteful.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use tokio_util::sync::CancellationToken;

use crate::storage::object_gc::{collect_all, GcSettings, ObjectGcError, SystemClock};

/// What the server's gc runs over, and how often.
pub(super) struct StoreGc {
    /// The bucket, the prefix already applied.
    pub store: Arc<dyn ObjectStore>,
    /// The bucket prefix (for the key limit).
    pub prefix: String,
    /// Grace period, transfer TTL, δ.
    pub settings: GcSettings,
    /// Time between the end of one run and the start of the next.
    pub interval: Duration,
}

/// Runs the gc at once and then every `interval` until `shutdown`; a run cut by the shutdown leaves its lease to
/// expire (no DELETE is issued after its deadline). A failed run is logged and the next one tried. The runs go on
/// a thread of their own with its own runtime (the gc's futures are not `Send`); this returns when it ended.
pub(super) async fn run_periodically(gc: StoreGc, shutdown: CancellationToken) {
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new().name("store-gc".into()).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(runs(&gc, &shutdown)),
            Err(e) => tracing::warn!(error = %e, "the object-store gc cannot start"),
        }
        let _ = done.send(());
    });
    match spawned {
        Ok(_) => {
            let _ = ended.await;
        }
        Err(e) => tracing::warn!(error = %e, "the object-store gc cannot start"),
    }
}

async fn runs(gc: &StoreGc, shutdown: &CancellationToken) {
    loop {
        let run = collect_all(&gc.store, &gc.prefix, &gc.settings, &SystemClock);
        let ran = tokio::select! {
            _ = shutdown.cancelled() => return,
            ran = run => ran,
        };
        match ran {
            Ok(report) => tracing::info!(?report, "object-store gc ran"),
            Err(ObjectGcError::LeaseHeld { id }) => {
                tracing::info!(other = %id, "object-store gc skipped: another gc holds the lease")
            }
            Err(e) => tracing::warn!(error = %e, "object-store gc failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(gc.interval) => {}
        }
    }
}
