//! Every message of the protocol (proto-spec.md, "Messages").
//!
//! bincode writes an enum's variant index, so [`Message`] variants are append-only: never reorder, remove or
//! reuse one. [`ErrorCode`] travels as a bare `u16` so that a code added by a newer peer still decodes.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkSpec;
use crate::manifest::{ChunkEntry, Chunking, FileTime, Hash, Manifest};
use crate::ranges::IndexRange;

/// The first eight bytes of every Hello: `FERRY`, NUL, CR, LF (catches text protocols and line-ending mangling).
pub const MAGIC: [u8; 8] = *b"FERRY\0\r\n";

/// One protocol message. The numeric tag (variant index) is part of the wire format.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// 0: client → server, first frame of every connection.
    Hello(Hello),
    /// 1: server → client, accepts the Hello.
    Welcome(Welcome),
    /// 2: sender → receiver, "I have this file for this path".
    Offer(Offer),
    /// 3: receiver → sender, "send me these chunks".
    Need(Need),
    /// 4: sender → receiver, one chunk's bytes.
    Chunk(Chunk),
    /// 5: receiver → sender, "these chunks are durable".
    Ack(Ack),
    /// 6: sender → receiver, "that was everything; verify and commit".
    Commit,
    /// 7: receiver → sender, the file is in place under its final name.
    Committed(Committed),
    /// 8: either direction, the end of this connection's conversation.
    Error(ErrorFrame),
    /// 9: keep-alive probe carrying an opaque nonce.
    Ping(u64),
    /// 10: answer to a Ping, echoing its nonce.
    Pong(u64),
    /// 11: client → server, "send me this file or tree": the server becomes the sender.
    Pull(Pull),
    /// 12: sender → receiver, "I have this tree for this directory".
    TreeOffer(TreeOffer),
    /// 13: receiver → sender, the tree entries (files) it wants.
    TreeNeed(TreeNeed),
    /// 14: sender → receiver, the whole content of one small file of the tree.
    FileData(FileData),
    /// 15: receiver → sender, "these small files are committed".
    TreeAck(TreeAck),
    /// 16: sender → receiver, "that was every file I could send; finish the tree".
    TreeCommit(TreeCommit),
    /// 17: receiver → sender, the tree is finished.
    TreeCommitted(TreeCommitted),
    /// 18: inside a tree, sender → receiver "I give up on the current file" (with the reason); the receiver keeps
    /// what is durable and echoes Abandon once it has stopped taking that file's chunks.
    Abandon(String),
    /// 19: server → client after a Hello naming a client: prove you hold its token.
    Challenge(Challenge),
    /// 20: client → server, the answer to the Challenge.
    Auth(Auth),
    /// 21: client → server, "this connection carries chunks of the transfer in progress at `path`" (an extra
    /// stream of a push with `--streams N`); answered with an empty Need.
    Join(Join),
    /// 22: client → server (protocol version 4), "list my open transfers"; answered with Partials.
    ListPartials,
    /// 23: server → client, the open (uncommitted) transfers of the caller's namespace.
    Partials(Partials),
    /// 24: client → server (protocol version 5), a Pull that says whether the client expects a file, a tree or
    /// either; the server refuses the other kind with `WrongKind` instead of sending it.
    PullExpecting(PullExpecting),
    /// 25: sender → receiver (protocol version 6), the start of a streamed offer: the file's path, size and
    /// metadata; its chunks follow in ManifestPieces while the sender is still hashing (proto-spec.md §4,
    /// "Streamed offer").
    OfferStart(OfferStart),
    /// 26: sender → receiver (protocol version 6), the next chunks of a streamed offer's manifest.
    ManifestPiece(ManifestPiece),
    /// 27: sender → receiver (protocol version 6), the end of a streamed manifest with the whole-file digest;
    /// echoed back by the receiver once it has answered every piece.
    ManifestEnd(ManifestEnd),
    /// 28: client → server (protocol version 6), right after the TreeCommitted of a tree push: "remove under the
    /// tree's directory everything the tree does not hold" (`--delete`); answered with TreePruned.
    TreePrune(TreePrune),
    /// 29: server → client, what TreePrune removed.
    TreePruned(TreePruned),
}

impl Message {
    /// Short name for logs and protocol errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Offer(_) => "Offer",
            Message::Need(_) => "Need",
            Message::Chunk(_) => "Chunk",
            Message::Ack(_) => "Ack",
            Message::Commit => "Commit",
            Message::Committed(_) => "Committed",
            Message::Error(_) => "Error",
            Message::Ping(_) => "Ping",
            Message::Pong(_) => "Pong",
            Message::Pull(_) => "Pull",
            Message::TreeOffer(_) => "TreeOffer",
            Message::TreeNeed(_) => "TreeNeed",
            Message::FileData(_) => "FileData",
            Message::TreeAck(_) => "TreeAck",
            Message::TreeCommit(_) => "TreeCommit",
            Message::TreeCommitted(_) => "TreeCommitted",
            Message::Abandon(_) => "Abandon",
            Message::Challenge(_) => "Challenge",
            Message::Auth(_) => "Auth",
            Message::Join(_) => "Join",
            Message::ListPartials => "ListPartials",
            Message::Partials(_) => "Partials",
            Message::PullExpecting(_) => "PullExpecting",
            Message::OfferStart(_) => "OfferStart",
            Message::ManifestPiece(_) => "ManifestPiece",
            Message::ManifestEnd(_) => "ManifestEnd",
            Message::TreePrune(_) => "TreePrune",
            Message::TreePruned(_) => "TreePruned",
        }
    }
}

/// Opens a connection: magic, the protocol versions the client speaks, and a free-form agent string.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Must equal [`MAGIC`].
    pub magic: [u8; 8],
    /// Lowest protocol version the client speaks.
    pub min_version: u16,
    /// Highest protocol version the client speaks.
    pub max_version: u16,
    /// e.g. `ferry/0.1.0`; informational, at most 256 bytes.
    pub agent: String,
    /// The client id of the token the client holds, or empty for none (proto-spec.md, "Authentication").
    pub client: String,
}

/// A fresh random nonce the client must answer with its token.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// 32 random bytes, never reused.
    pub nonce: [u8; 32],
}

/// An extra stream joining the transfer another connection offered.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Join {
    /// The destination the offer named.
    pub path: String,
    /// `Manifest::id` of the offered manifest: a stream joins only the transfer of the same content.
    pub manifest_id: [u8; 32],
}

/// The open transfers of a namespace, at most `MAX_LISTED_PARTIALS` of them (proto-spec.md §13).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Partials {
    /// Open transfers, ordered by path (byte order).
    pub entries: Vec<PartialEntry>,
    /// Open transfers in the namespace, listed or not.
    pub total: u64,
    /// True if `entries` stops short of `total` (the entry or byte cap was reached).
    pub truncated: bool,
}

/// One open transfer: a partial file waiting for the rest of its chunks.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PartialEntry {
    /// Destination path, relative to the namespace, `/`-separated.
    pub path: String,
    /// Size of the file being received.
    pub size: u64,
    /// Bytes of the chunks durably in the partial (received or reused).
    pub received: u64,
    /// When the transfer was first offered (Unix seconds).
    pub created: u64,
    /// When it last made progress (Unix seconds; at least `created`).
    pub updated: u64,
}

/// The client's answer: keyed BLAKE3 of the nonce, the channel binding and its id under its token's key.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// `keyed_hash(derive_key(context, secret), "ferry-auth-v1\0" ‖ nonce ‖ binding ‖ id)` (proto-spec.md §3a).
    pub answer: [u8; 32],
}

/// The server's answer to an acceptable Hello.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version both sides now speak.
    pub version: u16,
    /// e.g. `ferry/0.1.0`.
    pub agent: String,
    /// Largest frame body the server accepts, in bytes.
    pub max_frame: u32,
}

/// A file offered for transfer to `path`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Destination, relative to the receiver's root, `/`-separated.
    pub path: String,
    /// The file's chunks and digest.
    pub manifest: Manifest,
}

/// The start of a streamed offer (proto-spec.md §4, "Streamed offer"): everything of a [`Manifest`] but its
/// chunks and digest, which follow in [`ManifestPiece`]s and the [`ManifestEnd`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct OfferStart {
    /// Destination, relative to the receiver's root, `/`-separated.
    pub path: String,
    /// File size in bytes: the pieces must tile exactly this much.
    pub size: u64,
    /// How the sender cuts the file (the receiver uses it only to cut an older copy, §5).
    pub chunking: Chunking,
    /// Applied to the committed file.
    pub mtime: FileTime,
    /// `st_mode & 0o7777`; the receiver applies `mode & 0o777` (and its own mask).
    pub mode: u32,
}

/// The next chunks of a streamed manifest: `chunks[k]` is chunk `first_index + k`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ManifestPiece {
    /// Index of the piece's first chunk: the number of chunks announced before it.
    pub first_index: u32,
    /// At least one and at most `MAX_PIECE_CHUNKS` chunks, continuing the tiling where the previous piece ended.
    pub chunks: Vec<ChunkEntry>,
}

/// The end of a streamed manifest.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ManifestEnd {
    /// BLAKE3 of the whole file.
    pub digest: Hash,
}

/// A directory tree offered for transfer to `path`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TreeOffer {
    /// Destination directory, relative to the receiver's root, `/`-separated.
    pub path: String,
    /// Every entry, sorted by path (byte order, strictly ascending), at most `MAX_TREE_ENTRIES`.
    pub entries: Vec<TreeEntry>,
}

/// One entry of a tree.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// Path relative to the tree's directory, `/`-separated.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
}

/// The kind of a tree entry and what the receiver needs to know about it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File {
        /// Size in bytes.
        size: u64,
        /// Whole-file BLAKE3.
        digest: Hash,
        /// Modification time.
        mtime: FileTime,
        /// Permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
    /// A directory (possibly empty).
    Dir {
        /// Permission bits.
        mode: u32,
        /// Modification time, applied once the tree is complete.
        mtime: FileTime,
    },
    /// A symbolic link, recorded as its target text (relative, never leaving the tree).
    Symlink {
        /// The link's target.
        target: String,
    },
}

/// Tree entries the receiver wants, as runs of entry indices (ascending); files only.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TreeNeed {
    /// Ascending, non-overlapping runs of indices into the TreeOffer's entries.
    pub entries: Vec<IndexRange>,
}

/// The whole content of a small needed file (at most `MAX_INLINE_FILE` bytes).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct FileData {
    /// Index into the TreeOffer's entries.
    pub entry: u32,
    /// Exactly the file's bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for FileData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileData")
            .field("entry", &self.entry)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Small files that are now committed (verified, synced, renamed, recorded), and ones the receiver could not
/// place (something in the way); the sender stops waiting for both.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TreeAck {
    /// Runs of entry indices now committed.
    pub entries: Vec<IndexRange>,
    /// Runs of entry indices refused for good.
    pub refused: Vec<IndexRange>,
}

/// The end of a tree's files, with the ones the sender could not send.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct TreeCommit {
    /// Needed files the sender could not send, and why.
    pub failed: Vec<TreeFailure>,
}

/// A file of a tree the sender could not send.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TreeFailure {
    /// Index into the TreeOffer's entries.
    pub entry: u32,
    /// True if the file no longer matches the digest it was committed with (damaged at rest), not merely
    /// unreadable or changing.
    pub damaged: bool,
    /// Human-readable reason, at most 1 KiB.
    pub reason: String,
}

/// `--delete` for the tree just committed on this connection.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TreePrune {
    /// The tree's directory: the `path` of the TreeOffer just committed.
    pub path: String,
}

/// What a TreePrune removed under the tree's directory.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct TreePruned {
    /// Removed entries, relative to the tree's directory (a directory after its content); at most 1 MiB of names.
    pub removed: Vec<String>,
    /// How many entries were removed in all (more than `removed` lists when the names did not fit).
    pub total: u64,
    /// Entries that could not be removed, with the reason (at most 1,000).
    pub failed: Vec<PruneFailure>,
}

/// An entry a TreePrune could not remove.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PruneFailure {
    /// The entry, relative to the tree's directory.
    pub path: String,
    /// Why (at most 1 KiB).
    pub reason: String,
}

/// The receiver's summary of a finished tree.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct TreeCommitted {
    /// Files committed in this session.
    pub files_committed: u64,
    /// Files that were already present and unchanged.
    pub files_unchanged: u64,
    /// Needed files that never arrived (the sender could not read them), as runs of entry indices.
    pub missing: Vec<IndexRange>,
    /// File and chunk payload bytes received in this session.
    pub received_bytes: u64,
    /// Bytes copied from files the receiver already held.
    pub reused_bytes: u64,
}

/// What to do with symlinks found in a tree (`--links`, and a Pull's field: proto-spec.md §11).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LinkPolicy {
    /// Leave symlinks out (listed as skipped).
    #[default]
    Skip,
    /// Recreate symlinks whose relative target stays inside the tree; others are skipped.
    Record,
}

/// A request for the file or tree at `path`; the server answers with an Offer (or a TreeOffer) and sends.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Pull {
    /// Source, relative to the server's root, `/`-separated.
    pub path: String,
    /// How the client wants files cut (the server may answer with a manifest it already holds instead).
    pub chunking: ChunkSpec,
    /// Most unacknowledged chunk bytes the client wants in flight; the server clamps it to its own bounds.
    pub window: u64,
    /// For a tree: whether symlinks are recreated or left out.
    pub links: LinkPolicy,
}

/// A version-5 Pull: the fields of [`Pull`], then the kind of source the client expects (proto-spec.md §11).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PullExpecting {
    /// The request, encoded exactly as a [`Pull`]'s fields.
    pub pull: Pull,
    /// What the client is prepared to receive.
    pub expect: PullKind,
}

/// What a pulling client is prepared to receive (encoded as a `u32` variant index).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullKind {
    /// 0: a file or a tree.
    #[default]
    Any,
    /// 1: a regular file only: a directory is refused with `WrongKind`.
    File,
    /// 2: a directory tree only: a file is refused with `WrongKind`.
    Tree,
}

impl PullKind {
    /// Whether a source that is a tree (`true`) or a file (`false`) is what the client expects.
    pub fn accepts(self, tree: bool) -> bool {
        match self {
            PullKind::Any => true,
            PullKind::File => !tree,
            PullKind::Tree => tree,
        }
    }
}

/// Chunks the receiver still needs, run-length encoded.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// Ascending, non-overlapping runs of chunk indices; empty means "nothing, commit now".
    pub ranges: Vec<IndexRange>,
}

/// One chunk's bytes.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Index into the offered manifest.
    pub index: u32,
    /// Exactly the chunk's bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("index", &self.index)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Chunks that are now durable on the receiver.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Runs of chunk indices that were verified, written, synced and recorded.
    pub ranges: Vec<IndexRange>,
}

/// The file is committed under its final name.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Final file size.
    pub size: u64,
    /// Whole-file BLAKE3 as verified by the receiver.
    pub digest: Hash,
    /// Chunk payload bytes that came over the wire for this transfer, counted once each when made durable, over
    /// all connections (duplicates, rejected chunks and repeats filled locally are not counted; proto-spec.md §4).
    pub received_bytes: u64,
    /// Chunks that failed verification and were asked for again, over all connections.
    pub rejected_chunks: u32,
    /// Chunk bytes the receiver copied from files it already held (verified like received ones) instead of
    /// asking for them.
    pub reused_bytes: u64,
    /// True if the receiver already held exactly this file and nothing was transferred.
    pub already_present: bool,
}

/// A protocol-level failure. After sending one, the sender of the Error closes the connection.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// What went wrong, as a code the peer can act on.
    pub code: ErrorCode,
    /// Whether the same request may succeed if retried later.
    pub retryable: bool,
    /// Human-readable detail, at most 1 KiB.
    pub message: String,
}

/// Error codes (proto-spec.md, "Error codes"). Encoded as a `u16`; unknown values decode as [`ErrorCode::Unknown`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(from = "u16", into = "u16")]
pub enum ErrorCode {
    /// 1: a frame could not be decoded.
    Malformed,
    /// 2: a frame length above the limit.
    FrameTooLarge,
    /// 3: the Hello did not start with [`MAGIC`].
    BadMagic,
    /// 4: no protocol version in common.
    VersionMismatch,
    /// 5: a message that is not allowed in the current state.
    UnexpectedMessage,
    /// 6: destination path refused (absolute, `..`, reserved, symlink, not a directory...).
    BadPath,
    /// 7: manifest refused (chunks do not tile the file, limits exceeded).
    BadManifest,
    /// 8: another connection holds this destination and could not be taken over in time.
    Busy,
    /// 9: the receiver's disk is full.
    NoSpace,
    /// 10: the receiver hit an I/O error that may pass.
    StorageIo,
    /// 11: the assembled file does not match the manifest digest.
    IntegrityFailed,
    /// 12: the server is shutting down.
    ShuttingDown,
    /// 13: the peer was silent for too long.
    Timeout,
    /// 14: the server is at its connection limit.
    TooManyConnections,
    /// 15: a newer connection took over this transfer.
    Superseded,
    /// 16: an internal error on the peer.
    Internal,
    /// 17: the requested source does not exist (or is not a regular file or directory).
    NotFound,
    /// 18: the source changed while it was being sent; a retry re-reads it.
    SourceChanged,
    /// 19: no token, an unknown client or a wrong answer (the server does not say which).
    AuthFailed,
    /// 20: the client's grant does not allow this (push or pull).
    Forbidden,
    /// 21: the file would take the client's namespace over its quota.
    QuotaExceeded,
    /// 22: a `Join` names a manifest id that no transfer open at its path has (proto-spec.md §4, "Streams").
    UnknownTransfer,
    /// 23: the namespace already has as many open transfers, or as many stored manifest bytes, as the server
    /// allows; finishing or expiring some makes room.
    TooManyTransfers,
    /// 25: this server speaks only TLS; the client connected without it.
    TlsRequired,
    /// 26: the server's memory budget for frames stayed spent; retry later.
    Overloaded,
    /// 28: the pulled path is a directory and the client expects a file, or the reverse (proto-spec.md §11).
    WrongKind,
    /// Any other value, from a newer peer.
    Unknown(u16),
}

impl ErrorCode {
    /// Whether retrying the same request later can succeed; the default for [`ErrorFrame::retryable`].
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Busy
                | ErrorCode::StorageIo
                | ErrorCode::ShuttingDown
                | ErrorCode::Timeout
                | ErrorCode::TooManyConnections
                | ErrorCode::Superseded
                | ErrorCode::Internal
                | ErrorCode::Malformed
                | ErrorCode::SourceChanged
                | ErrorCode::Overloaded
        )
    }
}

const CODES: [(u16, ErrorCode); 26] = [
    (1, ErrorCode::Malformed),
    (2, ErrorCode::FrameTooLarge),
    (3, ErrorCode::BadMagic),
    (4, ErrorCode::VersionMismatch),
    (5, ErrorCode::UnexpectedMessage),
    (6, ErrorCode::BadPath),
    (7, ErrorCode::BadManifest),
    (8, ErrorCode::Busy),
    (9, ErrorCode::NoSpace),
    (10, ErrorCode::StorageIo),
    (11, ErrorCode::IntegrityFailed),
    (12, ErrorCode::ShuttingDown),
    (13, ErrorCode::Timeout),
    (14, ErrorCode::TooManyConnections),
    (15, ErrorCode::Superseded),
    (16, ErrorCode::Internal),
    (17, ErrorCode::NotFound),
    (18, ErrorCode::SourceChanged),
    (19, ErrorCode::AuthFailed),
    (20, ErrorCode::Forbidden),
    (21, ErrorCode::QuotaExceeded),
    (22, ErrorCode::UnknownTransfer),
    (23, ErrorCode::TooManyTransfers),
    (25, ErrorCode::TlsRequired),
    (26, ErrorCode::Overloaded),
    (28, ErrorCode::WrongKind),
];

impl From<u16> for ErrorCode {
    fn from(value: u16) -> Self {
        CODES
            .iter()
            .find(|(n, _)| *n == value)
            .map_or(ErrorCode::Unknown(value), |(_, code)| *code)
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        match code {
            ErrorCode::Unknown(n) => n,
            known => CODES.iter().find(|(_, c)| *c == known).map_or(0, |(n, _)| *n),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Unknown(n) => write!(f, "unknown error code {n}"),
            known => write!(f, "{known:?}"),
        }
    }
}

/// Longest human-readable text a message carries (Error, Abandon, TreeFailure), in bytes.
pub const MAX_MESSAGE_TEXT: usize = 1024;

/// `message` cut to [`MAX_MESSAGE_TEXT`] bytes at a character boundary.
pub fn truncate_message(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_TEXT {
        let mut cut = MAX_MESSAGE_TEXT;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    message
}

impl ErrorFrame {
    /// An error frame with the code's default retryability.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorFrame {
            code,
            retryable: code.retryable(),
            message: truncate_message(message.into()),
        }
    }
}
