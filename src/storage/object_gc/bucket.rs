//! [`Bucket`]: the few object-store calls gc and its rules make, so that a test can put a pausing, clock-stamping
//! wrapper between them and the store. Implemented for every `object_store::ObjectStore`.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};

/// The calls gc makes on a bucket. Every key is absolute within the store (prefix included).
pub trait Bucket: Send + Sync {
    /// Every object under `prefix` (recursive), in no particular order.
    fn list(&self, prefix: &Path) -> impl Future<Output = object_store::Result<Vec<ObjectMeta>>> + Send;
    /// The object's metadata, or `NotFound`.
    fn head(&self, key: &Path) -> impl Future<Output = object_store::Result<ObjectMeta>> + Send;
    /// The object's bytes, or `NotFound`.
    fn get(&self, key: &Path) -> impl Future<Output = object_store::Result<Bytes>> + Send;
    /// Writes the object whole (an overwrite: no conditional writes, docs/object-store.md point 5).
    fn put(&self, key: &Path, bytes: Bytes) -> impl Future<Output = object_store::Result<()>> + Send;
    /// Deletes the object (deleting a missing object succeeds).
    fn delete(&self, key: &Path) -> impl Future<Output = object_store::Result<()>> + Send;
}

impl Bucket for Arc<dyn ObjectStore> {
    async fn list(&self, prefix: &Path) -> object_store::Result<Vec<ObjectMeta>> {
        self.as_ref().list(Some(prefix)).try_collect().await
    }

    async fn head(&self, key: &Path) -> object_store::Result<ObjectMeta> {
        ObjectStoreExt::head(self.as_ref(), key).await
    }

    async fn get(&self, key: &Path) -> object_store::Result<Bytes> {
        ObjectStoreExt::get(self.as_ref(), key).await?.bytes().await
    }

    async fn put(&self, key: &Path, bytes: Bytes) -> object_store::Result<()> {
        ObjectStoreExt::put(self.as_ref(), key, PutPayload::from(bytes))
            .await
            .map(|_| ())
    }

    async fn delete(&self, key: &Path) -> object_store::Result<()> {
        match ObjectStoreExt::delete(self.as_ref(), key).await {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }
}
