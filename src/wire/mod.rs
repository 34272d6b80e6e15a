//! The wire: messages, their byte encoding, and a connection that reads and writes whole frames.
//!
//! Three layers (proto-spec.md, "Framing"): [`message`] says what can be said, [`codec`] is the only code that turns
//! messages into bytes and back (and the only bincode user), and [`conn`] owns a socket and its read buffer.
//! Sessions above this module see messages only.

pub mod budget;
pub mod codec;
pub mod conn;
#[cfg(test)]
mod frame_fuzz;
pub mod message;

pub use budget::FrameBudget;
pub use codec::CodecError;
pub use conn::{Connection, ReadLimits, WireError};
pub use message::{
    Ack, Auth, Challenge, Chunk, Committed, EntryKind, ErrorCode, ErrorFrame, FileData, Hello, Join, LinkPolicy,
    ManifestEnd, ManifestPiece, Message, Need, Offer, OfferStart, PartialEntry, Partials, PruneFailure, Pull,
    PullExpecting, PullKind, TreeAck, TreeCommit, TreeCommitted, TreeEntry, TreeFailure, TreeNeed, TreeOffer,
    TreePrune, TreePruned, Welcome, MAGIC,
};
