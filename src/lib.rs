//! ferry: resumable, verified file transfer over TCP.
//!
//! Data flow of a push (proto-spec.md is the wire contract, ../shared/DESIGN.md the architecture):
//!
//! ```text
//! client ─► chunk (file → chunks + BLAKE3) ─► manifest ─► transfer::sender ─► wire ─► TCP
//!   ─► server ─► wire ─► transfer::receiver ─► verify ─► partial file ─► store (sled) ─► commit (rename)
//! ```
//!
//! * [`chunk`] cuts a file and hashes it off the async runtime; [`manifest`] is the explicit chunk list.
//! * [`wire`] frames messages (u32 length + bincode), checks lengths before allocating.
//! * [`transfer`] holds the two roles, [`transfer::sender`] and [`transfer::receiver`], written once for both
//!   directions; [`verify`] is the only door through which received bytes reach disk, and [`storage`] the seam
//!   through which the receiver reaches its disk (a local directory; a simulated one in the power-loss tests).
//! * [`store`] keeps progress in sled on both sides; [`server`] and [`client`] only pick a role.
//! * [`fault`] is the fault-injecting proxy behind `ferry demo` and the tests.
//! * [`throttle`] holds a run's connections to `--bwlimit`.
//! * [`config`] reads the server's and the client's TOML files; [`settings`] resolves a push's or pull's settings
//!   (flags over the client file's remote and defaults) and `NAME:PATH` locations.

pub mod auth;
pub mod chunk;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod fault;
pub mod gc;
pub mod manifest;
pub mod manifest_stream;
pub mod memory;
pub mod meter;
pub mod path;
pub mod random;
pub mod ranges;
pub mod record;
pub mod server;
pub mod settings;
#[cfg(test)]
mod soak;
pub mod source;
pub mod storage;
pub mod store;
pub mod throttle;
pub mod tls;
pub mod transfer;
pub mod tree;
pub mod units;
pub mod url;
pub mod verify;
pub mod wire;

/// The newest protocol version this build speaks (proto-spec.md, "Versioning").
pub const PROTOCOL_VERSION: u16 = 6;
/// The oldest protocol version this build speaks: versions 4, 5 and 6 only added messages (`ListPartials`/`Partials`,
/// then `PullExpecting`, then the streamed offer and `TreePrune`/`TreePruned`), so a server serves version-3 to 5
/// clients unchanged and a client can still push to and pull from version-3 to 5 servers.
pub const MIN_PROTOCOL_VERSION: u16 = 3;
/// The first protocol version with `ListPartials` and `Partials`.
pub const PARTIALS_VERSION: u16 = 4;
/// The first protocol version with `PullExpecting` (a Pull that names the kind of source it expects).
pub const PULL_KIND_VERSION: u16 = 5;
/// The first protocol version with `TreePrune`/`TreePruned` (`ferry push DIR --delete`).
pub const PRUNE_VERSION: u16 = 6;
/// The first protocol version with streamed offers (`OfferStart`, `ManifestPiece`, `ManifestEnd`).
pub const STREAMED_OFFER_VERSION: u16 = 6;
/// Most entries in one `Partials` reply.
pub const MAX_LISTED_PARTIALS: usize = 10_000;
/// Most encoded entry bytes in one `Partials` reply (below the smallest `max_frame` a server may set).
pub const MAX_PARTIALS_BYTES: usize = 4 * 1024 * 1024;
/// Default TCP port.
pub const DEFAULT_PORT: u16 = 7878;
/// Largest frame body, in bytes: a maximal manifest or a maximal chunk fits.
pub const MAX_FRAME: u32 = 24 * 1024 * 1024;
/// Largest frame body a server accepts before the handshake completed.
pub const HANDSHAKE_MAX_FRAME: u32 = 64 * 1024;
/// Largest chunk.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Smallest chunk size a sender may ask for (the last chunk of a file may be shorter).
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Default chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Most chunks in one manifest (500,000 × 44 bytes ≈ 21 MiB, under [`MAX_FRAME`]).
pub const MAX_MANIFEST_CHUNKS: usize = 500_000;
/// Most entries in one TreeOffer.
pub const MAX_TREE_ENTRIES: usize = 200_000;
/// Largest file a tree sends whole in one FileData (larger files go through their own Offer).
pub const MAX_INLINE_FILE: u64 = 1024 * 1024;
/// Default window of unacknowledged chunk bytes.
pub const DEFAULT_WINDOW: u64 = 16 * 1024 * 1024;

/// Process exit codes (README, "Exit codes"; each is checked through the binary in tests/exit_codes.rs, 130 in
/// tests/msgs.rs). Scripts and cron jobs rely on them: a code never changes meaning, new ones are appended.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Anything not covered below (a bug, an unexpected internal failure).
    pub const INTERNAL: u8 = 1;
    /// Bad command line or destination URL.
    pub const USAGE: u8 = 2;
    /// The network (or a busy server) did not let the transfer finish within the retries.
    pub const NETWORK: u8 = 3;
    /// The server refused the transfer for good (bad path, bad manifest, disk full, version).
    pub const REJECTED: u8 = 4;
    /// Bytes did not verify end to end.
    pub const INTEGRITY: u8 = 5;
    /// Local trouble: the source is unreadable or kept changing, or the state store is unusable.
    pub const LOCAL: u8 = 6;
    /// The server did not accept the client's token (none, unknown, or wrong), the TLS peer failed its check, or one
    /// side speaks TLS and the other does not.
    pub const AUTH: u8 = 7;
    /// Another run holds the client state directory (and `--wait` was not given).
    pub const ALREADY_RUNNING: u8 = 8;
    /// `--max-duration` ran out (waiting for the state lock, or transferring); the next run resumes.
    pub const TIMED_OUT: u8 = 9;
    /// A push or pull was stopped by SIGINT (Ctrl-C), 128 + 2 as a shell reports a SIGINT death; what the receiver
    /// made durable is kept and the next run resumes.
    pub const INTERRUPTED: u8 = 130;

    /// Every exit code above with its meaning, in order. The man pages' EXIT STATUS is generated from it, and tests
    /// hold it to these constants and to the README's table.
    pub const TABLE: [(u8, &str); 11] = [
        (
            OK,
            "success: the file, or every file of the tree, is committed and verified on the receiver",
        ),
        (INTERNAL, "internal error"),
        (
            USAGE,
            "usage: bad arguments, URL or remote path, an unusable client configuration or unknown remote; for \
             serve, a bad configuration or a listen address that cannot be used",
        ),
        (
            NETWORK,
            "network: gave up after --retries attempts without progress (or the server stayed busy)",
        ),
        (
            REJECTED,
            "rejected by the server: bad path, bad manifest, disk full, over quota, not permitted, version \
             mismatch, a pulled path that does not exist; for a tree, files the receiver could not place",
        ),
        (
            INTEGRITY,
            "integrity failure: the committed file does not match the source digest, or a pulled file is damaged \
             on the server",
        ),
        (
            LOCAL,
            "local: the source is unreadable or kept changing, the client state store is unusable, or (trees) \
             some files could not be read",
        ),
        (
            AUTH,
            "authentication: the token was refused, the server's TLS certificate failed its check, or one side \
             speaks TLS and the other does not",
        ),
        (
            ALREADY_RUNNING,
            "already running: another run holds the client state directory (and --wait was not given)",
        ),
        (TIMED_OUT, "timed out: --max-duration ran out; the next run resumes"),
        (
            INTERRUPTED,
            "interrupted: SIGINT stopped a push or pull; what the receiver made durable is kept and the next run \
             resumes",
        ),
    ];

    #[cfg(test)]
    mod tests {
        /// The table names every `pub const NAME: u8` of this module, each once, in the order they are defined
        /// (read from this very source file, so a new code cannot be left out of the table).
        #[test]
        fn the_table_holds_every_exit_code_constant() {
            let source = include_str!("lib.rs");
            let module = &source[source.find("pub mod exit {").unwrap()..];
            let module = &module[..module.find("pub const TABLE").unwrap()];
            let defined: Vec<u8> = module
                .lines()
                .filter_map(|line| line.trim().strip_prefix("pub const ")?.split_once(": u8 = "))
                .map(|(_, value)| value.trim_end_matches(';').parse().unwrap())
                .collect();
            let table: Vec<u8> = super::TABLE.iter().map(|(code, _)| *code).collect();
            assert_eq!(table, defined);
        }
    }
}
