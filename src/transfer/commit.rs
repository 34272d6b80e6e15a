//! The commit step of the receiver, on a blocking thread: verify the whole file, repair chunks damaged on disk,
//! apply metadata, sync, rename atomically into place, record.
//!
//! The order is proto-spec.md's "Crash safety": the final name only ever holds a file whose whole-file BLAKE3 was
//! verified and synced, and the store records it as committed only after the rename is durable.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use super::writer::ChunkWriter;
use super::TransferError;
use crate::chunk::mtime_of;
use crate::manifest::{hex, FileTime, Manifest};
use crate::path::{rename_into_from, PathError, RemotePath, Replace};
use crate::store::{now_secs, CommittedFile};
use crate::verify::{digest_rest, PrefixDigest};
use crate::wire::{Committed, ErrorCode};

/// How a commit attempt ended.
pub(crate) enum CommitOutcome {
    /// The file is in place.
    Done(Committed),
    /// Chunks in the partial no longer match their hashes when read back (damaged on disk after they were
    /// written, before the digest thread read them, or a partial that was damaged between sessions); they are
    /// marked missing again and must be re-sent.
    Damaged(Box<ChunkWriter>),
}

/// Verifies the whole file, applies mode and mtime, syncs, renames it into place, and records it.
pub(crate) fn commit(
    mut writer: ChunkWriter,
    root: &Path,
    partial: &Path,
    target: &Path,
    path: &RemotePath,
) -> Result<CommitOutcome, TransferError> {
    let manifest = writer.manifest.clone();
    // The follower hashed the file behind the writes (reading back what was written); only the rest is read now.
    let prefix = match writer.follower.take() {
        Some(follower) => follower.finish().map_err(TransferError::Storage)?,
        None => PrefixDigest::default(),
    };
    tracing::debug!(path = %path, hashed = prefix.len(), "verifying the whole file");
    let resumed = prefix.len();
    let mut digest = digest_rest(&writer.file, prefix).map_err(TransferError::Storage)?;
    if digest != manifest.digest && resumed > 0 {
        // The prefix's state came from what was read back earlier (or recorded by an earlier session): before
        // blaming chunks on disk, hash the whole file as it is now.
        tracing::warn!(path = %path, "whole-file digest differs; hashing the whole partial again");
        digest = digest_rest(&writer.file, PrefixDigest::default()).map_err(TransferError::Storage)?;
    }
    if digest != manifest.digest {
        let damaged = damaged_chunks(&writer.file, &manifest).map_err(TransferError::Storage)?;
        if damaged.is_empty() {
            return Err(TransferError::Integrity(format!(
                "every chunk matches its hash but the file hashes to {}, not the manifest's {}",
                hex(&digest),
                hex(&manifest.digest)
            )));
        }
        tracing::warn!(path = %path, chunks = damaged.len(), "partial file damaged on disk; asking for those chunks again");
        for index in damaged {
            writer.received.remove(index);
        }
        let mut writer = writer.recounted();
        writer.save_progress()?;
        return Ok(CommitOutcome::Damaged(Box::new(writer.following())));
    }
    apply_metadata(&writer.file, &manifest).map_err(TransferError::Storage)?;
    writer.file.sync_all().map_err(TransferError::Storage)?;
    let meta = writer.file.metadata().map_err(TransferError::Storage)?;
    // Renamed through directory descriptors on both sides: a symlink planted on the way since the Offer, even one
    // swapped in during the rename, cannot redirect it; and the file renamed is checked to be the one just hashed.
    let (checked, parent) = rename_verified(root, path, partial, &meta)?;
    debug_assert_eq!(checked, target);
    parent.sync_all().map_err(TransferError::Storage)?;
    use std::os::unix::fs::MetadataExt;
    writer.store.commit(
        path.as_str(),
        &CommittedFile {
            manifest_id: manifest.id(),
            size: manifest.size,
            digest,
            mtime: mtime_of(&meta),
            inode: meta.ino(),
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
        received_bytes = writer.progress.received_bytes,
        reused_bytes = writer.progress.reused_bytes,
        // Chunk payload this process took in over the wire for all transfers, duplicates and rejects included (what
        // received_bytes no longer counts): the campaign tests bound re-sends with it.
        wire_bytes_since_start = writer.stats.bytes_received.load(std::sync::atomic::Ordering::Relaxed),
        "committed"
    );
    Ok(CommitOutcome::Done(Committed {
        size: manifest.size,
        digest,
        received_bytes: writer.progress.received_bytes,
        rejected_chunks: writer.progress.rejected_chunks,
        reused_bytes: writer.progress.reused_bytes,
        already_present: false,
    }))
}

/// Renames the partial (by name, relative to its directory's descriptor) to `path` under `root`, checking before
/// and after that the name holds the very inode whose digest was verified (`verified`): a partial swapped by
/// someone else who can write in the partial directory is refused, and never left under the final name.
pub(crate) fn rename_verified(
    root: &Path,
    path: &RemotePath,
    partial: &Path,
    verified: &std::fs::Metadata,
) -> Result<(std::path::PathBuf, File), TransferError> {
    use std::os::unix::fs::MetadataExt;
    let (Some(dir), Some(name)) = (partial.parent(), partial.file_name().and_then(|n| n.to_str())) else {
        return Err(TransferError::Storage(std::io::Error::other(
            "partial file has no name",
        )));
    };
    let swapped = || TransferError::Integrity(format!("the partial file of {path} was replaced after it was verified"));
    let same = |entry: std::io::Result<Option<(u64, u64)>>| {
        entry.is_ok_and(|found| found == Some((verified.dev(), verified.ino())))
    };
    let partial_dir = File::open(dir).map_err(TransferError::Storage)?;
    if !same(inode_at(&partial_dir, name)) {
        return Err(swapped());
    }
    let (checked, parent) = rename_into_from(root, path, &partial_dir, name, Replace::File).map_err(|e| match e {
        PathError::Io { source, .. } => super::unwritable(path.as_str(), source),
        refused => TransferError::refused(ErrorCode::BadPath, refused),
    })?;
    let final_name = path.components().last().expect("a RemotePath has a component");
    if !same(inode_at(&parent, final_name)) {
        // Swapped in the instant between the check and the rename: take the stranger's file away again.
        if let Ok(c_name) = std::ffi::CString::new(final_name) {
            use std::os::fd::AsRawFd;
            // SAFETY: the name is NUL-terminated and the descriptor is open.
            unsafe { libc::unlinkat(parent.as_raw_fd(), c_name.as_ptr(), 0) };
        }
        return Err(swapped());
    }
    Ok((checked, parent))
}

/// The (device, inode) of the entry `name` in `dir`, not following a symlink; `None` if absent.
pub(crate) fn inode_at(dir: &File, name: &str) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let name = std::ffi::CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `stat` is a valid out-pointer.
    if unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut stat, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        let error = std::io::Error::last_os_error();
        return if error.kind() == std::io::ErrorKind::NotFound {
            Ok(None)
        } else {
            Err(error)
        };
    }
    Ok(Some((stat.st_dev, stat.st_ino)))
}

/// Indices of chunks whose bytes in `file` no longer match the manifest.
fn damaged_chunks(file: &File, manifest: &Manifest) -> std::io::Result<Vec<u32>> {
    use std::os::unix::fs::FileExt;
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

/// Applies the manifest's permission bits (`& 0o777`) and mtime to the partial.
fn apply_metadata(file: &File, manifest: &Manifest) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(manifest.mode & 0o777))?;
    file.set_modified(system_time(manifest.mtime))
}

pub(crate) fn system_time(t: FileTime) -> std::time::SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nanos.min(999_999_999)));
    if t.secs >= 0 {
        std::time::UNIX_EPOCH + Duration::from_secs(t.secs as u64) + nanos
    } else {
        std::time::UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12 item 9: the partial whose digest was verified is swapped for another file before the rename; the
    /// rename is refused and nothing lands under the final name.
    #[test]
    fn a_partial_swapped_after_it_was_verified_is_not_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let (root, partials) = (dir.path().join("root"), dir.path().join("root/.ferry/partial"));
        std::fs::create_dir_all(&partials).unwrap();
        let partial = partials.join(".ferry-0123.part");
        std::fs::write(&partial, b"verified bytes").unwrap();
        let hashed = File::open(&partial).unwrap(); // the receiver's descriptor: its inode stays allocated
        let verified = hashed.metadata().unwrap();
        // Someone else's file takes the partial's name.
        std::fs::remove_file(&partial).unwrap();
        std::fs::write(&partial, b"attacker bytes").unwrap();
        let path = RemotePath::parse("dest.bin").unwrap();
        assert!(matches!(
            rename_verified(&root, &path, &partial, &verified),
            Err(TransferError::Integrity(_))
        ));
        assert!(!root.join("dest.bin").exists(), "nothing under the final name");
        // The genuine file renames.
        let genuine = File::open(&partial).unwrap().metadata().unwrap();
        let (target, _) = rename_verified(&root, &path, &partial, &genuine).unwrap();
        assert_eq!(std::fs::read(target).unwrap(), b"attacker bytes");
    }
}
