//! Expiry of abandoned work on a receiver: open transfers that made no progress for a while (their partial files
//! and records), and files left in the private partial directory by a crash (temporaries of small files and
//! links, partials no record points to).
//!
//! A server sweeps periodically and never expires a transfer a session holds (it takes the destination's claim
//! without disturbing anyone, or skips it); `ferry gc` runs the same sweep while the server is stopped (the state
//! store's lock guarantees that). Blocking.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::path::{namespace_of_partial_dir, namespace_partial_dir};
use crate::storage::local::{is_sealed_journal, journal_beside};
use crate::store::{now_secs, ReceiverStore, StoreError};
use crate::transfer::claims::{Claim, Claims};

/// What a sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Open transfers expired (records and partial file).
    pub transfers_expired: u64,
    /// Leftover files removed from the partial directory.
    pub leftovers_removed: u64,
    /// Bytes those files held.
    pub bytes_freed: u64,
}

/// How old things must be to go.
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    /// Open transfers without progress for this long are expired.
    pub transfers: Duration,
    /// Files in the partial directory that no transfer owns, untouched for this long, are removed. A running
    /// server keeps this well above the time a batch of small files takes to write.
    pub leftovers: Duration,
}

/// Expires what `expiry` allows. `claims` is the running server's (None when it is stopped): a held destination
/// is skipped, and one being expired is claimed meanwhile, so no session starts on it half-way.
pub fn sweep(
    store: &ReceiverStore,
    partial_dir: &Path,
    expiry: Expiry,
    claims: Option<&Claims>,
) -> Result<GcReport, StoreError> {
    let now = now_secs();
    let mut report = GcReport::default();
    let mut owned = HashSet::new();
    for transfer in store.open_transfers()? {
        let idle = now.saturating_sub(transfer.last_activity);
        if idle < expiry.transfers.as_secs() {
            owned.insert(journal_beside(Path::new(&transfer.partial)).display().to_string());
            owned.insert(transfer.partial);
            continue;
        }
        // Held by a session right now: not abandoned after all.
        let _claim: Option<Claim> = match claims.map(|c| c.try_claim(&transfer.path)) {
            Some(None) => {
                tracing::info!(
                    path = transfer.path,
                    idle_secs = idle,
                    "kept an idle transfer a session holds"
                );
                owned.insert(journal_beside(Path::new(&transfer.partial)).display().to_string());
                owned.insert(transfer.partial);
                continue;
            }
            Some(claim) => claim,
            None => None,
        };
        report.bytes_freed += remove_file(Path::new(&transfer.partial));
        // An in-place journal goes with its partial, unless it is sealed: its file may be half-way through the
        // apply, which only the journal can finish (at the next offer of the path).
        let journal = journal_beside(Path::new(&transfer.partial));
        if is_sealed_journal(&journal) {
            owned.insert(journal.display().to_string());
        } else {
            report.bytes_freed += remove_file(&journal);
        }
        store.forget_transfer(&transfer.path)?;
        report.transfers_expired += 1;
        tracing::info!(path = transfer.path, idle_secs = idle, "expired an abandoned transfer");
    }
    let Ok(listing) = std::fs::read_dir(partial_dir) else {
        return Ok(report);
    };
    for item in listing.flatten() {
        let path = item.path();
        let ours = item.file_name().to_string_lossy().starts_with(".ferry-");
        if !ours || owned.contains(&path.display().to_string()) || is_sealed_journal(&path) {
            continue;
        }
        let age = std::fs::symlink_metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if age >= expiry.leftovers {
            report.bytes_freed += remove_file(&path);
            report.leftovers_removed += 1;
        }
    }
    Ok(report)
}

/// `ferry gc`: the same sweep over a stopped server's root and every namespace in it (found from the store's
/// records and the namespaces' partials directories), with one age for everything.
pub fn collect_offline(root: &Path, state: Option<&Path>, older_than: Duration) -> Result<GcReport, StoreError> {
    let private = root.join(crate::path::RESERVED_DIR);
    let state = state.map_or_else(|| private.join("state"), Path::to_path_buf);
    let store = crate::store::Store::open(&state)?;
    let partial_dir = private.join("partial");
    let mut namespaces: BTreeSet<String> = ReceiverStore::scopes_with_transfers(&store)?.into_iter().collect();
    namespaces.insert(String::new());
    if let Ok(listing) = std::fs::read_dir(&partial_dir) {
        let names = listing.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir()));
        namespaces.extend(names.filter_map(|e| namespace_of_partial_dir(&e.file_name().to_string_lossy())));
    }
    let expiry = Expiry {
        transfers: older_than,
        leftovers: older_than,
    };
    let mut report = GcReport::default();
    for namespace in namespaces {
        let receiver = ReceiverStore::open_scoped(&store, &namespace)?;
        let swept = sweep(
            &receiver,
            &namespace_partial_dir(&partial_dir, &namespace),
            expiry,
            None,
        )?;
        report.transfers_expired += swept.transfers_expired;
        report.leftovers_removed += swept.leftovers_removed;
        report.bytes_freed += swept.bytes_freed;
    }
    store.flush()?;
    Ok(report)
}

/// Removes a file (never following a symlink); returns the bytes it held.
fn remove_file(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() || std::fs::remove_file(path).is_err() {
        return 0;
    }
    if meta.is_file() {
        meta.len()
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::manifest_of;
    use crate::store::{Progress, Store, TransferRecord};

    /// A stopped server's gc finds namespaces by their records and their partials directories.
    #[test]
    fn offline_gc_covers_every_namespace() {
        let root = tempfile::tempdir().unwrap();
        let partials = root.path().join(".ferry/partial");
        let store = Store::open(&root.path().join(".ferry/state")).unwrap();
        // An abandoned transfer in namespace "alice".
        let alice_dir = namespace_partial_dir(&partials, "alice");
        std::fs::create_dir_all(&alice_dir).unwrap();
        let partial = alice_dir.join(".ferry-abandoned.part");
        std::fs::write(&partial, vec![0u8; 1000]).unwrap();
        let record = TransferRecord {
            manifest: manifest_of(&[4096]),
            partial: partial.display().to_string(),
            created: 0,
        };
        let alice = ReceiverStore::open_scoped(&store, "alice").unwrap();
        alice.begin("big.iso", &record, &Progress::default()).unwrap();
        // A leftover temporary in namespace "bob", which has no records at all.
        let bob_dir = namespace_partial_dir(&partials, "team/bob");
        std::fs::create_dir_all(&bob_dir).unwrap();
        std::fs::write(bob_dir.join(".ferry-0123.small"), b"left over").unwrap();
        store.flush().unwrap();
        drop((alice, store));

        let report = collect_offline(root.path(), None, Duration::ZERO).unwrap();
        assert_eq!(report.transfers_expired, 1);
        assert_eq!(report.leftovers_removed, 1);
        assert_eq!(report.bytes_freed, 1000 + 9);
        assert!(!partial.exists());
        assert_eq!(std::fs::read_dir(&bob_dir).unwrap().count(), 0);
        assert_eq!(
            namespace_of_partial_dir(&bob_dir.file_name().unwrap().to_string_lossy()).as_deref(),
            Some("team/bob")
        );
    }

    /// A sealed in-place journal is never expired (its file may be half-way through the apply); an unsealed one
    /// goes with its expired transfer.
    #[test]
    fn a_sealed_journal_outlives_its_expired_transfer() {
        use crate::storage::journal::{seal, Journaled};
        use crate::storage::{PartialFile, ReadAt};
        let root = tempfile::tempdir().unwrap();
        let partials = root.path().join(".ferry/partial");
        std::fs::create_dir_all(&partials).unwrap();
        let store = Store::open(&root.path().join(".ferry/state")).unwrap();
        let receiver = ReceiverStore::open(&store).unwrap();
        let base_path = root.path().join("base");
        std::fs::write(&base_path, vec![7u8; 4096]).unwrap();
        let mut journals = Vec::new();
        for (name, sealed) in [("sealed", true), ("open", false)] {
            let partial = partials.join(format!(".ferry-{name}.part"));
            let journal_path = journal_beside(&partial);
            let journal = std::sync::Arc::new(std::fs::File::create_new(&journal_path).unwrap());
            let base = std::fs::File::open(&base_path).unwrap();
            let id = PartialFile::identity(&base).unwrap();
            let view = Journaled::create(journal.clone(), Box::new(base), id, 4096).unwrap();
            view.write_at(&[1; 10], 0).unwrap();
            if sealed {
                seal(&*journal, view.size().unwrap()).unwrap();
            }
            let record = TransferRecord {
                manifest: manifest_of(&[4096]),
                partial: partial.display().to_string(),
                created: 0,
            };
            receiver.begin(name, &record, &Progress::default()).unwrap();
            journals.push(journal_path);
        }
        let expiry = Expiry {
            transfers: Duration::ZERO,
            leftovers: Duration::ZERO,
        };
        let report = sweep(&receiver, &partials, expiry, None).unwrap();
        assert_eq!(report.transfers_expired, 2);
        assert!(journals[0].exists(), "the sealed journal is kept");
        assert!(!journals[1].exists(), "the open journal went with its transfer");
    }
}
