//! The commit step of the receiver, on a blocking thread: verify the whole file, repair chunks damaged on disk,
//! apply metadata, sync, rename atomically into place, record.
//!
//! The order is proto-spec.md's "Crash safety": the final name only ever holds a file whose whole-file BLAKE3 was
//! verified and synced, and the store records it as committed only after the rename is durable.

use super::writer::ChunkWriter;
use super::TransferError;
use crate::manifest::{hex, Manifest};
use crate::path::RemotePath;
use crate::storage::{PartialFile, StorageError, Volume};
use crate::store::{now_secs, CommittedFile};
use crate::verify::{digest_rest, HashSources, PrefixDigest};
use crate::wire::Committed;

/// How a commit attempt ended.
pub(crate) enum CommitOutcome {
    /// The file is in place.
    Done(Committed),
    /// Chunks in the partial no longer match their hashes when read back (damaged on disk after they were
    /// written, before the digest thread hashed them, or a partial that was damaged between sessions), or, on an
    /// object store, are gone (rule C at the commit); they are marked missing again and must be re-sent.
    Damaged(Box<ChunkWriter>),
}

/// Verifies the whole file, applies mode and mtime, syncs, renames it into place, and records it.
pub(crate) fn commit(
    mut writer: ChunkWriter,
    volume: &dyn Volume,
    path: &RemotePath,
) -> Result<CommitOutcome, TransferError> {
    let manifest = writer.manifest.clone();
    // The follower hashed the file behind the writes (in-order chunks from memory as they were written, the rest
    // read back); only what it has not reached is read now.
    let (prefix, sources) = match writer.follower.take() {
        Some(follower) => follower.finish_counted().map_err(TransferError::Storage)?,
        None => (PrefixDigest::default(), HashSources::default()),
    };
    tracing::debug!(
        path = %path,
        hashed = prefix.len(),
        from_memory = sources.from_memory,
        read_back = sources.read_back,
        known = sources.known,
        "verifying the whole file"
    );
    let resumed = prefix.len();
    let mut digest = digest_rest(&*writer.file, prefix).map_err(TransferError::Storage)?;
    if digest != manifest.digest && resumed > 0 {
        // The prefix's state came from what was read back earlier (or recorded by an earlier session): before
        // blaming chunks on disk, hash the whole file as it is now.
        tracing::warn!(path = %path, "whole-file digest differs; hashing the whole partial again");
        digest = digest_rest(&*writer.file, PrefixDigest::default()).map_err(TransferError::Storage)?;
    }
    if digest != manifest.digest {
        let damaged = damaged_chunks(&*writer.file, &manifest).map_err(TransferError::Storage)?;
        if damaged.is_empty() {
            return Err(TransferError::Integrity(format!(
                "every chunk matches its hash but the file hashes to {}, not the manifest's {}",
                hex(&digest),
                hex(&manifest.digest)
            )));
        }
        tracing::warn!(path = %path, chunks = damaged.len(), "partial file damaged on disk; asking for those chunks again");
        volume.forget_chunks(&writer.key, &damaged)?;
        return ask_again(writer, &damaged);
    }
    writer
        .file
        .set_metadata(manifest.mode, manifest.mtime)
        .map_err(TransferError::Storage)?;
    writer.file.sync_all().map_err(TransferError::Storage)?;
    let verified = writer.file.identity().map_err(TransferError::Storage)?;
    // Renamed through directory descriptors on both sides: a symlink planted on the way since the Offer, even one
    // swapped in during the rename, cannot redirect it; and the file renamed is checked to be the one just hashed.
    // proto-spec.md §14 "Counts span the group": on a shared store, every server's received bytes for this
    // transfer (read before the commit ends the transfer's records).
    let received_bytes = volume
        .received_by_group(&writer.key)
        .unwrap_or(writer.progress.received_bytes);
    let parent = match volume.place(&writer.key, path, &verified) {
        Err(StorageError::ChunksGone { chunks, .. }) => {
            // Rule C found chunks gone (a gc deleted them after the session relied on them): nothing was committed;
            // the volume no longer counts them durable, and the next round asks for them.
            tracing::warn!(path = %path, chunks = chunks.len(), "chunks gone from the store at commit; asking for them again");
            return ask_again(writer, &chunks);
        }
        other => other?,
    };
    parent.sync().map_err(TransferError::Storage)?;
    writer.store.commit(
        path.as_str(),
        &CommittedFile {
            manifest_id: manifest.id(),
            size: manifest.size,
            digest,
            mtime: verified.mtime,
            inode: verified.ino,
            committed_at: now_secs(),
        },
        &manifest,
    )?;
    writer
        .stats
        .files_committed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        path = %path,
        size = manifest.size,
        digest = %hex(&digest),
        received_bytes,
        reused_bytes = writer.progress.reused_bytes,
        // Chunk payload this process took in over the wire for all transfers, duplicates and rejects included (what
        // received_bytes no longer counts): the campaign tests bound re-sends with it.
        wire_bytes_since_start = writer.stats.bytes_received.load(std::sync::atomic::Ordering::Relaxed),
        "committed"
    );
    Ok(CommitOutcome::Done(Committed {
        size: manifest.size,
        digest,
        received_bytes,
        rejected_chunks: writer.progress.rejected_chunks,
        reused_bytes: writer.progress.reused_bytes,
        already_present: false,
    }))
}

/// Marks `chunks` missing again (the volume already forgot them), records the progress, and hands the writer
/// back for another round.
fn ask_again(mut writer: ChunkWriter, chunks: &[u32]) -> Result<CommitOutcome, TransferError> {
    for &index in chunks {
        writer.received.remove(index);
    }
    let mut writer = writer.recounted();
    writer.save_progress()?;
    Ok(CommitOutcome::Damaged(Box::new(writer.following())))
}

/// Indices of chunks whose bytes in `file` no longer match the manifest.
fn damaged_chunks(file: &dyn PartialFile, manifest: &Manifest) -> std::io::Result<Vec<u32>> {
    let mut buf = Vec::new();
    let mut damaged = Vec::new();
    for (index, entry) in manifest.chunks.iter().enumerate() {
        buf.resize(entry.len as usize, 0);
        file.read_exact_at(&mut buf, entry.offset)?;
        if crate::verify::check_chunk(entry, &buf).is_err() {
            damaged.push(index as u32);
        }
    }
    Ok(damaged)
}
