//! `ListPartials` (proto-spec.md §13): the open transfers of the caller's own namespace, which only a client with
//! the `push` permission may list. The reply is capped at [`MAX_LISTED_PARTIALS`] entries and
//! [`MAX_PARTIALS_BYTES`] of entry bytes, so it fits every frame limit a server may set (at least 5 MiB); a cut list
//! says so with `truncated` and the full count in `total`.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::storage::OpenTransfer;
use crate::store::{ReceiverStore, StoreError};
use crate::transfer::receiver::ReceiverContext;
use crate::transfer::{send_within, TransferError};
use crate::wire::{Connection, Message, PartialEntry, Partials};
use crate::{MAX_LISTED_PARTIALS, MAX_PARTIALS_BYTES};

/// Encoded bytes of a [`PartialEntry`] besides its path's bytes: the path's length and four `u64`s.
const ENTRY_FIXED_BYTES: usize = 8 + 4 * 8;

/// Answers a `ListPartials` with the namespace's open transfers.
pub(super) async fn list_partials<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    ctx: &ReceiverContext,
) -> Result<(), TransferError> {
    let (store, volume) = (ctx.store.clone(), ctx.volume.clone());
    let listed = tokio::task::spawn_blocking(move || -> Result<Partials, TransferError> {
        // A shared store lists the transfers of every server of the group; else this server's records.
        if let Some((open, total)) = volume.open_transfers(MAX_LISTED_PARTIALS)? {
            return Ok(capped(open, total, MAX_PARTIALS_BYTES));
        }
        Ok(collect(&store, MAX_LISTED_PARTIALS, MAX_PARTIALS_BYTES)?)
    })
    .await
    .map_err(|e| TransferError::Storage(std::io::Error::other(e)))??;
    send_within(conn, &Message::Partials(listed), ctx.idle_timeout, "sending Partials").await
}

/// At most `max_entries` open transfers of `store`'s scope whose entries take at most `max_bytes` encoded.
fn collect(store: &ReceiverStore, max_entries: usize, max_bytes: usize) -> Result<Partials, StoreError> {
    let (listed, total) = store.partials(max_entries)?;
    let open = listed.into_iter().map(|partial| OpenTransfer {
        path: partial.path,
        size: partial.size,
        durable_bytes: partial.durable_bytes,
        created: partial.created,
        updated: partial.updated,
    });
    Ok(capped(open, total, max_bytes))
}

/// The entries of `open` (of `total`) whose encoding fits `max_bytes`.
fn capped(open: impl IntoIterator<Item = OpenTransfer>, total: u64, max_bytes: usize) -> Partials {
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    for partial in open {
        bytes = bytes.saturating_add(ENTRY_FIXED_BYTES + partial.path.len());
        if bytes > max_bytes {
            break;
        }
        entries.push(PartialEntry {
            path: partial.path,
            size: partial.size,
            received: partial.durable_bytes,
            created: partial.created,
            updated: partial.updated,
        });
    }
    let truncated = (entries.len() as u64) < total;
    Partials {
        entries,
        total,
        truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::manifest_of;
    use crate::store::{Progress, Store, TransferRecord};

    fn store_with(paths: &[&str]) -> (tempfile::TempDir, ReceiverStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ReceiverStore::open_scoped(&Store::open(dir.path()).unwrap(), "ns").unwrap();
        for path in paths {
            let record = TransferRecord {
                manifest: manifest_of(&[4096]),
                partial: "p".into(),
                created: 7,
            };
            store.begin(path, &record, &Progress::default()).unwrap();
        }
        (dir, store)
    }

    #[test]
    fn the_list_is_capped_by_entries_and_by_bytes_and_says_so() {
        let (_dir, store) = store_with(&["a", "bb", "ccc"]);
        let all = collect(&store, 10, 1 << 20).unwrap();
        assert_eq!((all.entries.len(), all.total, all.truncated), (3, 3, false));
        assert_eq!(all.entries[0].size, 4096);
        assert_eq!(all.entries[0].received, 0);
        let by_count = collect(&store, 2, 1 << 20).unwrap();
        assert_eq!(
            (by_count.entries.len(), by_count.total, by_count.truncated),
            (2, 3, true)
        );
        let by_bytes = collect(&store, 10, 2 * ENTRY_FIXED_BYTES + 3).unwrap();
        assert_eq!(by_bytes.entries.len(), 2, "a + bb fit, ccc does not");
        assert!(by_bytes.truncated);
    }

    #[test]
    fn the_entry_size_matches_the_encoding() {
        let entry = PartialEntry {
            path: "abc".into(),
            size: 1,
            received: 2,
            created: 3,
            updated: 4,
        };
        assert_eq!(crate::record::encode_record(&entry).len(), ENTRY_FIXED_BYTES + 3);
    }
}
