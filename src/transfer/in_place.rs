//! The in-place delta (issue 14 item 2, docs/storage.md "The in-place journal"): when a re-push shares most of its
//! chunks, at the same offsets, with the file committed at its path, the receiver writes only what changed, into a
//! redo journal the volume applies to the committed file after the whole new file was verified. This module holds
//! the engine's two decisions: whether an offer goes in place, and what a journal replayed after a crash means for
//! the store.
//!
//! Guarantee (proto-spec.md §8): after any crash the destination holds the old or the new verified file once the
//! journal is replayed, which [`recover`] does before anything else touches the path; readers during an apply (and
//! after a crash in one, until the replay) may see a mix.

use super::receiver::ReceiverContext;
use super::TransferError;
use crate::manifest::{index_of_same, Manifest};
use crate::path::RemotePath;
use crate::storage::{Identity, Partial};
use crate::store::{now_secs, CommittedFile};
use crate::verify::{digest_rest, PrefixDigest};

/// Applies a journal sealed before a crash to the committed file at `path` and, if the file is then the one the
/// open transfer describes (its whole-file digest read back), records it committed. Blocking.
pub(super) fn recover(ctx: &ReceiverContext, path: &RemotePath) -> Result<(), TransferError> {
    let key = path.as_str();
    let Some(applied) = ctx.volume.recover(key, path)? else {
        return Ok(());
    };
    tracing::warn!(path = key, "replayed an in-place journal interrupted by a crash");
    let Some(record) = ctx.store.transfer(key)? else {
        return Ok(());
    };
    let manifest = &record.manifest;
    if manifest.size != applied.len || manifest.mtime != applied.mtime {
        return Ok(());
    }
    let Some(file) = ctx.volume.open_final(path) else {
        return Ok(());
    };
    let digest = digest_rest(&*file, PrefixDigest::default()).map_err(TransferError::Storage)?;
    if digest != manifest.digest {
        return Ok(());
    }
    let committed = CommittedFile {
        manifest_id: manifest.id(),
        size: manifest.size,
        digest,
        mtime: applied.mtime,
        inode: applied.ino,
        committed_at: now_secs(),
    };
    ctx.store.commit(key, &committed, manifest)?;
    Ok(())
}

/// Opens an in-place partial for `manifest` at `path` if the receiver may write in place and it pays: the file at
/// `path` is still the one committed there, and at least half of the new file's bytes are chunks it already holds
/// at the same offsets (else the journal and its apply would write more than a new partial). `None`: use an
/// ordinary partial. Blocking.
pub(super) fn open_in_place(
    ctx: &ReceiverContext,
    path: &RemotePath,
    manifest: &Manifest,
) -> Result<Option<Partial>, TransferError> {
    let key = path.as_str();
    if !ctx.policy.in_place {
        return Ok(None);
    }
    let (Some(done), Some(now)) = (ctx.store.committed(key)?, ctx.volume.stat_final(path)) else {
        return Ok(None);
    };
    if !unchanged_since_commit(&now, &done) {
        return Ok(None);
    }
    let Some(old) = ctx.store.committed_manifest(key)? else {
        return Ok(None);
    };
    let shared = shared_bytes(&old, manifest);
    if shared.saturating_mul(2) < manifest.size {
        tracing::debug!(path = key, shared, "too little in place to write in place");
        return Ok(None);
    }
    let opened = ctx.volume.open_in_place(key, path, manifest.size)?;
    if opened.is_some() {
        tracing::info!(path = key, shared, "writing in place");
    }
    Ok(opened)
}

/// Whether the file at a path (`now`) is still the one recorded committed there (`done`): a regular file with its
/// inode, length and mtime, so that its committed manifest describes it.
pub(super) fn unchanged_since_commit(now: &Identity, done: &CommittedFile) -> bool {
    now.is_file && now.len == done.size && now.ino == done.inode && now.mtime == done.mtime
}

/// Bytes of `new` in chunks that `old` holds at the same offset with the same length and hash.
fn shared_bytes(old: &Manifest, new: &Manifest) -> u64 {
    new.chunks
        .iter()
        .filter(|chunk| index_of_same(&old.chunks, chunk).is_some())
        .map(|chunk| u64::from(chunk.len))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::manifest_of;

    #[test]
    fn only_chunks_in_the_same_place_are_shared() {
        let old = manifest_of(&[10, 10, 10, 10]);
        let mut new = old.clone();
        new.chunks[1].hash[0] ^= 1;
        assert_eq!(shared_bytes(&old, &new), 30);
        let shifted = manifest_of(&[5, 10, 10, 10, 5]);
        assert_eq!(shared_bytes(&old, &shifted), 0);
    }
}
