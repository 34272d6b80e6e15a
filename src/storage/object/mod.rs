//! The object-store backend (`ferry serve --store s3://BUCKET[/PREFIX]`, docs/object-store.md).
//!
//! Owns what the receiver keeps in an S3 bucket: [`layout`] is the bucket layout (keys, the objects' codecs and
//! small typed request helpers), pure code over `object_store` with no knowledge of the engine; [`volume`] is the
//! storage seam over it ([`ObjectVolume`]); [`tree`] is the tree receiver's seam over it ([`ObjectTrees`]: small
//! files inline or as chunk + manifest objects, `Dir` and `Symlink` objects), the tree pull's copy and `--delete`;
//! [`usage`] counts a namespace's files and open transfers from the bucket for quotas and limits.

#[cfg(test)]
pub(crate) mod gated;
pub mod layout;
pub mod s3;
pub mod tree;
pub mod usage;
pub mod volume;

pub use s3::StoreSettings;
pub use tree::ObjectTrees;
pub use volume::{ObjectOptions, ObjectVolume};
