//! The bucket layout of docs/object-store.md ("Bucket layout"): which key holds what, and the codecs of the objects
//! ferry writes there.
//!
//! Owns the key construction (`ns/<root|hex>/chunks/<hh>/<hash>`, `files/<path>`, `versions/…`, `open/<pid>/<tid>`,
//! `journal/<tid>/<t>-<srv>-<seq>`) and S3's 1,024-byte key limit; the three object codecs ([`EntryObject`], the
//! committed entry and the commit itself; [`OpenRecord`], one open transfer; [`JournalEntry`], one acknowledged
//! batch), each a magic line and a bincode record decoded with the wire's limits; the union of a transfer's journal
//! ([`journal_union`]); and small async helpers over [`ObjectStore`] with typed errors ([`ObjectError`]) that name
//! the operation, the key and the kind of failure, never the store's credentials.
//!
//! Keys are relative to the server's root (`s3://BUCKET/PREFIX`, an `object_store` store wrapped in a
//! `PrefixStore`); [`Layout`] knows the prefix's length only to enforce the key limit.

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::{Path, PathPart};
use object_store::{ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload, PutResult};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::manifest::{FileTime, Hash, Manifest};
use crate::path::RemotePath;
use crate::ranges::{ranges_within, ChunkSet, IndexRange};
use crate::record::{decode_record, encode_record};

/// S3's limit on a key, in bytes, the bucket prefix included.
pub const MAX_KEY_LEN: usize = 1024;
/// The largest file stored inline in its manifest object.
pub const MAX_INLINE_BYTES: u64 = 64 * 1024;
/// The largest manifest object or open-transfer record read back (a maximal manifest encodes to ~22 MB).
pub const MAX_MANIFEST_OBJECT: u64 = 32 * 1024 * 1024;
/// The largest journal entry read back (a batch's ranges; a reuse batch of alternating chunks is the worst case).
pub const MAX_JOURNAL_OBJECT: u64 = 4 * 1024 * 1024;
/// The longest symlink target a `Symlink` entry may carry (Linux's `PATH_MAX`).
pub const MAX_LINK_TARGET: usize = 4096;
/// Most keys one [`list`] call returns before it refuses (a namespace's `open/` or one transfer's journal).
pub const MAX_LISTED: usize = 1_000_000;

/// Magic line of a manifest object (`files/<path>`).
pub const ENTRY_MAGIC: &[u8; 15] = b"ferry-entry v1\n";
/// Magic line of an open-transfer record (`open/<pid>/<tid>`).
pub const RECORD_MAGIC: &[u8; 14] = b"ferry-open v1\n";
/// Magic line of a journal entry (`journal/<tid>/…`).
pub const JOURNAL_MAGIC: &[u8; 17] = b"ferry-journal v1\n";
/// Magic line of a journal retraction (`journal/<tid>/…`): its ranges are no longer durable (a chunk object found
/// gone at the commit, rule C or the digest's GET).
pub const RETRACT_MAGIC: &[u8; 17] = b"ferry-retract v1\n";

/// The key of the format marker at the server's root.
pub const MARKER_KEY: &str = "ferry-store";

/// A key cannot be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The key (bucket prefix included) is longer than S3 allows.
    #[error("the path is too long for the object store: its key would have {len} bytes, the limit is {max}")]
    KeyTooLong {
        /// The key's length in bytes.
        len: usize,
        /// [`MAX_KEY_LEN`].
        max: usize,
    },
}

/// Why an object read back from the bucket was refused (and is then treated as absent).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Larger than any object of its kind ferry writes.
    #[error("the object has {len} bytes, at most {max} are accepted")]
    TooLarge {
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// It does not start with the magic line of its kind.
    #[error("the object does not start with {0:?}")]
    BadMagic(&'static str),
    /// The record does not decode.
    #[error("the object does not decode: {0}")]
    Malformed(String),
    /// It decodes but breaks a rule of its kind (a manifest that does not tile, a wrong id, bad inline bytes).
    #[error("the object is inconsistent: {0}")]
    Invalid(String),
}

/// A request to the object store failed. The message names the operation, the key and the kind of failure; the
/// store's own message (which may name the endpoint) is only logged at debug level, credentials never.
#[derive(Debug, Error)]
pub enum ObjectError {
    /// The store refused or did not answer.
    #[error("the object store failed to {op} {key}: {kind}")]
    Store {
        /// What was attempted: `put`, `get`, `head`, `list`, `delete`.
        op: &'static str,
        /// The key (relative to the server's root).
        key: String,
        /// The kind of failure (`object_store::Error`'s variant).
        kind: &'static str,
    },
    /// An object is larger than any object of its kind, or a listing longer than [`MAX_LISTED`].
    #[error("{key} is too large: {len} (at most {max})")]
    TooLarge {
        /// The key or prefix.
        key: String,
        /// Bytes of the object, or keys of the listing.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A key could not be built.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

impl ObjectError {
    fn store(op: &'static str, key: &Path, error: &object_store::Error) -> ObjectError {
        let kind = error_kind(error);
        tracing::debug!(op, key = %key, kind, "object store error: {error}");
        ObjectError::Store {
            op,
            key: key.to_string(),
            kind,
        }
    }
}

/// The variant of an `object_store` error, as a word for logs and messages.
pub fn error_kind(error: &object_store::Error) -> &'static str {
    use object_store::Error as E;
    match error {
        E::NotFound { .. } => "not found",
        E::AlreadyExists { .. } => "already exists",
        E::Precondition { .. } => "precondition failed",
        E::NotModified { .. } => "not modified",
        E::NotImplemented { .. } => "not implemented by this store",
        E::PermissionDenied { .. } => "permission denied",
        E::Unauthenticated { .. } => "not authenticated",
        E::InvalidPath { .. } => "invalid key",
        E::UnknownConfigurationKey { .. } => "unknown configuration key",
        E::JoinError { .. } => "task failed",
        _ => "request failed",
    }
}

/// Random or derived identifiers, shown and keyed as lowercase hex.
macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// A fresh random id from the operating system's generator.
            pub fn random() -> $name {
                let mut bytes = [0u8; $len];
                crate::random::fill(&mut bytes);
                $name(bytes)
            }

            /// Lowercase hex, as in keys.
            pub fn hex(&self) -> String {
                hex_lower(&self.0)
            }

            /// Parses exactly the hex [`Self::hex`] writes.
            pub fn parse_hex(text: &str) -> Option<$name> {
                let mut bytes = [0u8; $len];
                parse_hex_into(text, &mut bytes)?;
                Some($name(bytes))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.hex())
            }
        }
    };
}

hex_id!(
    /// The id of a destination path: the first 16 bytes of BLAKE3 over the path (what names partials, §8).
    PathId,
    16
);
hex_id!(
    /// One open transfer: made by the server that first takes an offer, adopted by every later one.
    TransferId,
    16
);
hex_id!(
    /// One server process, made at start: two servers' journal keys never collide.
    ServerId,
    8
);

impl PathId {
    /// The id of `path`.
    pub fn of(path: &RemotePath) -> PathId {
        let hash = blake3::hash(path.as_str().as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash.as_bytes()[..16]);
        PathId(id)
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn parse_hex_into(text: &str, out: &mut [u8]) -> Option<()> {
    let digits = text.as_bytes();
    if digits.len() != out.len() * 2 || !digits.iter().all(|d| matches!(d, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(())
}

/// The keys of one namespace under a server's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Bytes the bucket prefix adds in front of every key (`PREFIX/`), for the key limit.
    base_len: usize,
    /// `ns/<root|hex>`.
    namespace: Path,
}

impl Layout {
    /// The layout of namespace `namespace` (`""` for the unnamed one) under the bucket prefix `store_prefix` (the
    /// `PREFIX` of `s3://BUCKET/PREFIX`, possibly empty).
    pub fn new(store_prefix: &str, namespace: &str) -> Layout {
        let trimmed = store_prefix.trim_matches('/');
        let segment = if namespace.is_empty() {
            "root".to_string()
        } else {
            hex_lower(namespace.as_bytes())
        };
        Layout {
            base_len: if trimmed.is_empty() { 0 } else { trimmed.len() + 1 },
            namespace: Path::from_iter(["ns", segment.as_str()]),
        }
    }

    /// The format marker's key.
    pub fn marker() -> Path {
        Path::from(MARKER_KEY)
    }

    /// The namespace's own prefix (`ns/<ns>`).
    pub fn namespace(&self) -> &Path {
        &self.namespace
    }

    /// The length of `key` in the bucket, prefix included.
    pub fn key_len(&self, key: &Path) -> usize {
        self.base_len + key.as_ref().len()
    }

    /// Refuses a key longer than [`MAX_KEY_LEN`].
    pub fn check_len(&self, key: &Path) -> Result<(), LayoutError> {
        let len = self.key_len(key);
        if len > MAX_KEY_LEN {
            return Err(LayoutError::KeyTooLong { len, max: MAX_KEY_LEN });
        }
        Ok(())
    }

    fn under(&self, parts: &[&str]) -> Path {
        parts.iter().fold(self.namespace.clone(), |key, part| key.join(*part))
    }

    /// All chunk objects (`chunks`).
    pub fn chunks(&self) -> Path {
        self.under(&["chunks"])
    }

    /// One LIST shard of chunk objects (`chunks/<hh>`): the chunks whose hash starts with byte `first`.
    pub fn chunk_shard(&self, first: u8) -> Path {
        self.under(&["chunks", &hex_lower(&[first])])
    }

    /// The object of the chunk with this hash (`chunks/<hh>/<hash>`).
    pub fn chunk(&self, hash: &Hash) -> Path {
        self.chunk_shard(hash[0]).join(hex_lower(hash).as_str())
    }

    /// The hash a chunk key names, if `key` is one of this namespace's chunk keys.
    pub fn parse_chunk(&self, key: &Path) -> Option<Hash> {
        let rest: Vec<_> = key.prefix_match(&self.chunks())?.collect();
        let [shard, name] = rest.as_slice() else {
            return None;
        };
        let mut hash = [0u8; 32];
        parse_hex_into(name.as_ref(), &mut hash)?;
        (shard.as_ref() == hex_lower(&hash[..1])).then_some(hash)
    }

    /// All committed entries (`files`).
    pub fn files(&self) -> Path {
        self.under(&["files"])
    }

    /// The manifest object of `path` (`files/<path>`, each component encoded by `PathPart`), refused when too long.
    pub fn file(&self, path: &RemotePath) -> Result<Path, LayoutError> {
        let key = encode_under(self.files(), path);
        self.check_len(&key)?;
        Ok(key)
    }

    /// The remote path a `files/` key names, if `key` is one of this namespace's (the inverse of [`Self::file`]).
    pub fn parse_file(&self, key: &Path) -> Option<RemotePath> {
        decode_below(key, &self.files())
    }

    /// All kept versions of `path` (`versions/<path>`).
    pub fn versions_of(&self, path: &RemotePath) -> Result<Path, LayoutError> {
        let key = encode_under(self.under(&["versions"]), path);
        self.check_len(&key)?;
        Ok(key)
    }

    /// One kept version (`versions/<path>/<t>-<id8>`): `committed_ns` the commit time in nanoseconds, `id` the
    /// manifest id of that version.
    pub fn version(&self, path: &RemotePath, committed_ns: u64, id: &Hash) -> Result<Path, LayoutError> {
        let name = format!("{committed_ns:020}-{}", hex_lower(&id[..8]));
        let key = encode_under(self.under(&["versions"]), path).join(name.as_str());
        self.check_len(&key)?;
        Ok(key)
    }

    /// All open-transfer records (`open`).
    pub fn open(&self) -> Path {
        self.under(&["open"])
    }

    /// The open-transfer records of one path (`open/<pid>`).
    pub fn open_of(&self, path: PathId) -> Path {
        self.under(&["open", &path.hex()])
    }

    /// One open-transfer record (`open/<pid>/<tid>`).
    pub fn open_record(&self, path: PathId, transfer: TransferId) -> Path {
        self.open_of(path).join(transfer.hex().as_str())
    }

    /// The path id and transfer id a record key names, if `key` is one of this namespace's.
    pub fn parse_open_record(&self, key: &Path) -> Option<(PathId, TransferId)> {
        let rest: Vec<_> = key.prefix_match(&self.open())?.collect();
        let [pid, tid] = rest.as_slice() else {
            return None;
        };
        Some((PathId::parse_hex(pid.as_ref())?, TransferId::parse_hex(tid.as_ref())?))
    }

    /// The journal of one transfer (`journal/<tid>`).
    pub fn journal(&self, transfer: TransferId) -> Path {
        self.under(&["journal", &transfer.hex()])
    }

    /// One journal entry (`journal/<tid>/<t>-<srv>-<seq>`): `t` the server's clock in nanoseconds, zero-padded so
    /// keys sort by time; `seq` a counter of server `server`.
    pub fn journal_entry(&self, transfer: TransferId, t_ns: u64, server: ServerId, seq: u64) -> Path {
        let name = format!("{t_ns:020}-{}-{seq:020}", server.hex());
        self.journal(transfer).join(name.as_str())
    }
}

fn encode_under(base: Path, path: &RemotePath) -> Path {
    path.components()
        .fold(base, |key, component| key.join(PathPart::from(component)))
}

fn decode_below(key: &Path, base: &Path) -> Option<RemotePath> {
    let parts: Vec<String> = key
        .prefix_match(base)?
        .map(|part| {
            let decoded = percent_decode(part.as_ref())?;
            // Canonical only: the one encoding `file` produces, so two keys never name one path.
            (PathPart::from(decoded.as_str()).as_ref() == part.as_ref()).then_some(decoded)
        })
        .collect::<Option<_>>()?;
    if parts.is_empty() {
        return None;
    }
    RemotePath::parse(&parts.join("/")).ok()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let pair = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(pair, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// How the client that opened a transfer may have chunks reused (proto-spec.md §4 "Reuse"), as recorded.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReuseRule {
    /// Any chunk of the namespace.
    Full,
    /// Only chunks at the same position in the file at the same path.
    InPlace,
}

/// What a committed entry is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file: its manifest, and its bytes when it is small enough to be stored inline.
    File {
        /// The chunk list, size, digest, chunking, mtime and mode.
        manifest: Manifest,
        /// The whole file, when at most [`MAX_INLINE_BYTES`] (then not in `chunks/`).
        inline: Option<serde_bytes::ByteBuf>,
    },
    /// A directory placed by a tree.
    Dir {
        /// Permission bits.
        mode: u32,
        /// Modification time.
        mtime: FileTime,
    },
    /// A symlink placed by a tree (`links = Record`).
    Symlink {
        /// Its target, as validated on the way in.
        target: String,
    },
}

/// The manifest object at `files/<path>`: the committed state of one entry, written by the commit's single PUT.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EntryObject {
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// `Manifest::id` of a file (checked on decode); zero for the other kinds.
    pub manifest_id: Hash,
    /// Unix nanoseconds, from the committing server's clock.
    pub committed_at: u64,
    /// Bytes received for the transfer that committed it, by every server that served it.
    pub received_bytes: u64,
    /// Bytes reused instead of received.
    pub reused_bytes: u64,
    /// Chunks refused for a wrong hash during the transfer.
    pub rejected_chunks: u64,
    /// The transfer that committed it.
    pub transfer: TransferId,
    /// The server that committed it.
    pub server: ServerId,
}

impl EntryObject {
    /// The manifest of a file entry.
    pub fn manifest(&self) -> Option<&Manifest> {
        match &self.kind {
            EntryKind::File { manifest, .. } => Some(manifest),
            _ => None,
        }
    }

    /// The object's bytes: magic, then the record.
    pub fn encode(&self) -> Vec<u8> {
        with_magic(ENTRY_MAGIC, encode_record(self))
    }

    /// Decodes and checks a manifest object: its size, magic and record, the manifest as a wire manifest (tiling,
    /// chunk and count limits), its id, and inline bytes against the manifest. Never panics; allocates at most
    /// about the input's length.
    pub fn decode(bytes: &[u8]) -> Result<EntryObject, DecodeError> {
        let entry: EntryObject = decode_magic(bytes, ENTRY_MAGIC, MAX_MANIFEST_OBJECT)?;
        match &entry.kind {
            EntryKind::File { manifest, inline } => {
                check_manifest(manifest)?;
                if manifest.id() != entry.manifest_id {
                    return Err(DecodeError::Invalid(
                        "the manifest id does not match the manifest".into(),
                    ));
                }
                if let Some(bytes) = inline {
                    check_inline(manifest, bytes)?;
                }
            }
            EntryKind::Dir { .. } => {}
            EntryKind::Symlink { target } => {
                if target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains('\0') {
                    return Err(DecodeError::Invalid(
                        "a symlink target must be 1..=4096 bytes without NUL".into(),
                    ));
                }
            }
        }
        Ok(entry)
    }
}

fn check_manifest(manifest: &Manifest) -> Result<(), DecodeError> {
    manifest.validate().map_err(|e| DecodeError::Invalid(e.to_string()))
}

fn check_inline(manifest: &Manifest, bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.len() as u64 > MAX_INLINE_BYTES || bytes.len() as u64 != manifest.size {
        return Err(DecodeError::Invalid(format!(
            "{} inline bytes for a file of {} (at most {MAX_INLINE_BYTES})",
            bytes.len(),
            manifest.size
        )));
    }
    if *blake3::hash(bytes).as_bytes() != manifest.digest {
        return Err(DecodeError::Invalid("the inline bytes do not match the digest".into()));
    }
    Ok(())
}

/// The record of one open transfer at `open/<pid>/<tid>`, written once by the server that first takes the offer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OpenRecord {
    /// The destination path.
    pub path: String,
    /// The offered manifest.
    pub manifest: Manifest,
    /// The client's reuse rule.
    pub reuse: ReuseRule,
    /// Unix seconds when the record was written.
    pub created: u64,
    /// The server that wrote it.
    pub server: ServerId,
    /// The transfer it opens (also in its key).
    pub transfer: TransferId,
}

impl OpenRecord {
    /// The object's bytes: magic, then the record.
    pub fn encode(&self) -> Vec<u8> {
        with_magic(RECORD_MAGIC, encode_record(self))
    }

    /// Decodes and checks a record: size, magic, a valid remote path and a valid manifest.
    pub fn decode(bytes: &[u8]) -> Result<OpenRecord, DecodeError> {
        let record: OpenRecord = decode_magic(bytes, RECORD_MAGIC, MAX_MANIFEST_OBJECT)?;
        RemotePath::parse(&record.path).map_err(|e| DecodeError::Invalid(e.to_string()))?;
        check_manifest(&record.manifest)?;
        Ok(record)
    }
}

/// One batch made durable for a transfer, at `journal/<tid>/<t>-<srv>-<seq>`: written after the batch's chunk
/// objects, before its `Ack`. Or, with `retract`, a retraction: chunks whose objects were found gone, no longer
/// durable from this entry on (entries apply in key order).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    /// The manifest the ranges index (an entry for another manifest is ignored).
    pub manifest_id: Hash,
    /// Chunks made durable by this batch, received or reused.
    pub ranges: Vec<IndexRange>,
    /// Bytes received in this batch.
    pub received_bytes: u64,
    /// Bytes reused in this batch.
    pub reused_bytes: u64,
    /// Chunks refused for a wrong hash since the previous entry.
    pub rejected_chunks: u64,
    /// Unix seconds when written.
    pub updated: u64,
    /// The server that wrote it.
    pub server: ServerId,
    /// A retraction: the ranges are removed from the durable set, not added (told by the magic line, not encoded
    /// in the record).
    #[serde(skip)]
    pub retract: bool,
}

impl JournalEntry {
    /// The object's bytes: magic (an entry's or a retraction's), then the record.
    pub fn encode(&self) -> Vec<u8> {
        let magic = if self.retract { RETRACT_MAGIC } else { JOURNAL_MAGIC };
        with_magic(magic, encode_record(self))
    }

    /// Decodes an entry or a retraction (its ranges are checked against the manifest by [`journal_union`]).
    pub fn decode(bytes: &[u8]) -> Result<JournalEntry, DecodeError> {
        if bytes.starts_with(RETRACT_MAGIC) {
            let entry: JournalEntry = decode_magic(bytes, RETRACT_MAGIC, MAX_JOURNAL_OBJECT)?;
            return Ok(JournalEntry { retract: true, ..entry });
        }
        decode_magic(bytes, JOURNAL_MAGIC, MAX_JOURNAL_OBJECT)
    }
}

fn with_magic(magic: &[u8], record: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(magic.len() + record.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&record);
    out
}

fn decode_magic<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    magic: &'static [u8],
    max: u64,
) -> Result<T, DecodeError> {
    if bytes.len() as u64 > max {
        return Err(DecodeError::TooLarge {
            len: bytes.len() as u64,
            max,
        });
    }
    let Some(record) = bytes.strip_prefix(magic) else {
        return Err(DecodeError::BadMagic(
            std::str::from_utf8(magic).unwrap_or("?").trim_end(),
        ));
    };
    decode_record(record).map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// What a transfer's journal says is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable {
    /// Chunks durable for the transfer (received or reused by any server).
    pub chunks: ChunkSet,
    /// Sum of the entries' received bytes.
    pub received_bytes: u64,
    /// Sum of the entries' reused bytes.
    pub reused_bytes: u64,
    /// Sum of the entries' rejected chunks.
    pub rejected_chunks: u64,
    /// Entries ignored: for another manifest, or with ranges outside it.
    pub ignored: usize,
}

/// The union of a transfer's journal entries for `manifest`, in the order given (key order): what every server
/// that served the transfer made durable, less what a later retraction withdrew. Entries for another manifest or
/// with ranges that do not fit it are ignored (and counted).
pub fn journal_union(manifest: &Manifest, entries: &[JournalEntry]) -> Durable {
    let id = manifest.id();
    let count = manifest.chunk_count();
    let mut durable = Durable {
        chunks: ChunkSet::new(count),
        received_bytes: 0,
        reused_bytes: 0,
        rejected_chunks: 0,
        ignored: 0,
    };
    for entry in entries {
        if entry.manifest_id != id || !ranges_within(&entry.ranges, count) {
            durable.ignored += 1;
            continue;
        }
        for range in &entry.ranges {
            for index in range.indices() {
                if entry.retract {
                    durable.chunks.remove(index);
                } else {
                    durable.chunks.insert(index);
                }
            }
        }
        durable.received_bytes = durable.received_bytes.saturating_add(entry.received_bytes);
        durable.reused_bytes = durable.reused_bytes.saturating_add(entry.reused_bytes);
        durable.rejected_chunks = durable.rejected_chunks.saturating_add(entry.rejected_chunks);
    }
    durable
}

/// An object read back, with what the store says of it.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Its bytes.
    pub bytes: Bytes,
    /// Its key, size, last modification and ETag.
    pub meta: ObjectMeta,
}

/// PUTs `bytes` at `key`, overwriting (the only mode ferry uses: docs/object-store.md "No conditional writes").
pub async fn put(store: &dyn ObjectStore, key: &Path, bytes: Bytes) -> Result<PutResult, ObjectError> {
    let options = PutOptions {
        mode: PutMode::Overwrite,
        ..PutOptions::default()
    };
    store
        .put_opts(key, PutPayload::from_bytes(bytes), options)
        .await
        .map_err(|e| ObjectError::store("put", key, &e))
}

/// GETs the object at `key`, `None` if there is none; refuses one larger than `max` before reading its body.
pub async fn get(store: &dyn ObjectStore, key: &Path, max: u64) -> Result<Option<Fetched>, ObjectError> {
    let result = match store.get_opts(key, object_store::GetOptions::default()).await {
        Ok(result) => result,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(ObjectError::store("get", key, &e)),
    };
    let too_large = |len| ObjectError::TooLarge {
        key: key.to_string(),
        len,
        max,
    };
    if result.meta.size > max {
        return Err(too_large(result.meta.size));
    }
    let meta = result.meta.clone();
    let bytes = result.bytes().await.map_err(|e| ObjectError::store("get", key, &e))?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(Some(Fetched { bytes, meta }))
}

/// HEADs `key`: its metadata, `None` if there is no object.
pub async fn head(store: &dyn ObjectStore, key: &Path) -> Result<Option<ObjectMeta>, ObjectError> {
    match store
        .get_opts(key, object_store::GetOptions::new().with_head(true))
        .await
    {
        Ok(result) => Ok(Some(result.meta)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(ObjectError::store("head", key, &e)),
    }
}

/// Whether any object lies below `key` (`key/...`): a directory made only by the entries under it, which has no
/// `Dir` object of its own. One LIST request; only its first result is looked at.
pub async fn any_below(store: &dyn ObjectStore, key: &Path) -> Result<bool, ObjectError> {
    let mut stream = store.list(Some(key));
    while let Some(meta) = stream.next().await {
        let meta = meta.map_err(|e| ObjectError::store("list", key, &e))?;
        if meta.location != *key {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Every object under `prefix` (recursive), at most [`MAX_LISTED`].
pub async fn list(store: &dyn ObjectStore, prefix: &Path) -> Result<Vec<ObjectMeta>, ObjectError> {
    let mut stream = store.list(Some(prefix));
    let mut found = Vec::new();
    while let Some(meta) = stream.next().await {
        let meta = meta.map_err(|e| ObjectError::store("list", prefix, &e))?;
        if found.len() == MAX_LISTED {
            return Err(ObjectError::TooLarge {
                key: prefix.to_string(),
                len: found.len() as u64 + 1,
                max: MAX_LISTED as u64,
            });
        }
        found.push(meta);
    }
    Ok(found)
}

/// DELETEs every key (one bulk request per page where the store has it); a key already gone is not an error.
pub async fn delete_all(store: &dyn ObjectStore, keys: Vec<Path>) -> Result<(), ObjectError> {
    let first = keys.first().cloned().unwrap_or_default();
    let stream = futures_util::stream::iter(keys.into_iter().map(Ok)).boxed();
    store
        .delete_stream(stream)
        .try_for_each(|_| async { Ok(()) })
        .await
        .or_else(|e| match e {
            object_store::Error::NotFound { .. } => Ok(()),
            e => Err(ObjectError::store("delete", &first, &e)),
        })
}

/// A manifest object read back: the entry, and the object's ETag (the committed file's identity).
#[derive(Debug, Clone)]
pub struct StoredEntry {
    /// The decoded entry.
    pub entry: EntryObject,
    /// Its ETag, if the store gave one.
    pub e_tag: Option<String>,
    /// Its size in bytes.
    pub size: u64,
}

/// Reads the manifest object at `key`. A damaged one is logged and treated as absent.
pub async fn get_entry(store: &dyn ObjectStore, key: &Path) -> Result<Option<StoredEntry>, ObjectError> {
    let Some(fetched) = get(store, key, MAX_MANIFEST_OBJECT).await? else {
        return Ok(None);
    };
    match EntryObject::decode(&fetched.bytes) {
        Ok(entry) => Ok(Some(StoredEntry {
            entry,
            e_tag: fetched.meta.e_tag,
            size: fetched.meta.size,
        })),
        Err(e) => {
            tracing::warn!(key = %key, "ignoring a damaged manifest object: {e}");
            Ok(None)
        }
    }
}

/// Reads the open-transfer record at `key`. A damaged one is logged and treated as absent.
pub async fn get_record(store: &dyn ObjectStore, key: &Path) -> Result<Option<OpenRecord>, ObjectError> {
    let Some(fetched) = get(store, key, MAX_MANIFEST_OBJECT).await? else {
        return Ok(None);
    };
    match OpenRecord::decode(&fetched.bytes) {
        Ok(record) => Ok(Some(record)),
        Err(e) => {
            tracing::warn!(key = %key, "ignoring a damaged open-transfer record: {e}");
            Ok(None)
        }
    }
}

/// The records of open transfers to one path: (transfer, metadata), in key order.
pub async fn list_records(
    store: &dyn ObjectStore,
    layout: &Layout,
    path: PathId,
) -> Result<Vec<(TransferId, ObjectMeta)>, ObjectError> {
    let mut records: Vec<_> = list(store, &layout.open_of(path))
        .await?
        .into_iter()
        .filter_map(|meta| {
            let (pid, tid) = layout.parse_open_record(&meta.location)?;
            (pid == path).then_some((tid, meta))
        })
        .collect();
    records.sort_by(|a, b| a.1.location.cmp(&b.1.location));
    Ok(records)
}

/// Reads a transfer's journal, in key order. Damaged entries are logged and skipped.
pub async fn read_journal(
    store: &dyn ObjectStore,
    layout: &Layout,
    transfer: TransferId,
) -> Result<Vec<JournalEntry>, ObjectError> {
    let mut keys = list(store, &layout.journal(transfer)).await?;
    keys.sort_by(|a, b| a.location.cmp(&b.location));
    let mut entries = Vec::with_capacity(keys.len());
    for meta in keys {
        let Some(fetched) = get(store, &meta.location, MAX_JOURNAL_OBJECT).await? else {
            continue;
        };
        match JournalEntry::decode(&fetched.bytes) {
            Ok(entry) => entries.push(entry),
            Err(e) => tracing::warn!(key = %meta.location, "ignoring a damaged journal entry: {e}"),
        }
    }
    Ok(entries)
}

/// Deletes one transfer: its journal first, then its record (a crash between leaves a record with no journal, a
/// transfer that starts over, never a journal without the record that protects its chunks from gc).
pub async fn delete_transfer(
    store: &dyn ObjectStore,
    layout: &Layout,
    path: PathId,
    transfer: TransferId,
) -> Result<(), ObjectError> {
    delete_journal(store, layout, transfer).await?;
    delete_all(store, vec![layout.open_record(path, transfer)]).await
}

/// Deletes one transfer's journal (a LIST, then one bulk DELETE), leaving its record alone.
pub async fn delete_journal(store: &dyn ObjectStore, layout: &Layout, transfer: TransferId) -> Result<(), ObjectError> {
    let journal: Vec<Path> = list(store, &layout.journal(transfer))
        .await?
        .into_iter()
        .map(|meta| meta.location)
        .collect();
    if journal.is_empty() {
        return Ok(());
    }
    delete_all(store, journal).await
}

#[cfg(test)]
mod tests;
