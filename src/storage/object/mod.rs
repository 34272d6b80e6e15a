//! The object-store backend (`ferry serve --store s3://BUCKET[/PREFIX]`, docs/object-store.md).
//!
//! Owns what the receiver keeps in an S3 bucket: [`layout`] is the bucket layout (keys, the objects' codecs and
//! small typed request helpers), pure code over `object_store` with no knowledge of the engine; [`volume`] is the
//! storage seam over it ([`ObjectVolume`]).

#[cfg(test)]
pub(crate) mod gated;
pub mod layout;
pub mod s3;
pub mod volume;

pub use s3::StoreSettings;
pub use volume::{ObjectOptions, ObjectVolume};
