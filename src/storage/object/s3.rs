//! `s3://BUCKET[/PREFIX]` and the `[store]` settings: building the S3 client (docs/object-store.md
//! "Configuration"). Credentials come from the files `[store] access_key_file` and `secret_key_file` name, else from
//! the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, …, as `AmazonS3Builder::from_env` reads them);
//! never from a flag, never inline in the configuration, and never in a message (errors name the file, not what it
//! holds).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use thiserror::Error;

use super::layout::{self, Layout};
use super::volume::ObjectOptions;

/// The settings of an object-store server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// The bucket.
    pub bucket: String,
    /// The prefix inside it (no leading or trailing `/`), possibly empty.
    pub prefix: String,
    /// The endpoint URL; else `AWS_ENDPOINT_URL`, else AWS itself.
    pub endpoint: Option<String>,
    /// The region; else `AWS_REGION` / `AWS_DEFAULT_REGION`.
    pub region: Option<String>,
    /// Allow `http://` endpoints; else `AWS_ALLOW_HTTP`.
    pub allow_http: Option<bool>,
    /// Virtual-hosted-style requests (`bucket.endpoint/key`); path-style (`endpoint/bucket/key`) by default.
    pub virtual_hosted: bool,
    /// Chunk PUTs in flight per transfer.
    pub parallel: usize,
    /// The shortest chunk (but the last) an offer may have.
    pub min_chunk_size: u32,
    /// The gc grace period rule R reads (a day; `ferry serve --gc-grace`, a hidden test knob, shortens it to match
    /// `ferry gc --gc-grace`).
    pub gc_grace: std::time::Duration,
    /// Rule C's wait, δ + the request timeout of gc's DELETEs (35 s; `ferry serve --gc-confirm-wait`, a hidden
    /// test knob, shortens it to match `ferry gc --gc-delta` against a local store).
    pub gc_confirm_wait: std::time::Duration,
    /// The file holding the access key id (`[store] access_key_file`); else `AWS_ACCESS_KEY_ID`.
    pub access_key_file: Option<PathBuf>,
    /// The file holding the secret access key (`[store] secret_key_file`); else `AWS_SECRET_ACCESS_KEY`.
    pub secret_key_file: Option<PathBuf>,
    /// This server runs the object-store gc every `gc_interval` (`[store] gc = true`; one server per bucket).
    pub gc: bool,
}

/// The store URL or settings cannot be used.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Not `s3://BUCKET[/PREFIX]`.
    #[error("{0:?} is not an object store URL: expected s3://BUCKET[/PREFIX]")]
    BadUrl(String),
    /// A setting is out of range.
    #[error("{0}")]
    Setting(String),
    /// The client could not be built (a missing region or credentials, a bad endpoint).
    #[error("cannot set up the object store: {0}")]
    Build(String),
    /// The bucket did not answer as it should.
    #[error(transparent)]
    Object(#[from] layout::ObjectError),
}

impl StoreSettings {
    /// Settings for `url` (`s3://BUCKET[/PREFIX]`) with the defaults: path-style, 32 PUTs in flight, chunks of at
    /// least 256 KiB.
    pub fn from_url(url: &str) -> Result<StoreSettings, StoreError> {
        let bad = || StoreError::BadUrl(url.to_string());
        let rest = url.strip_prefix("s3://").ok_or_else(bad)?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok || prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Err(bad());
        }
        Ok(StoreSettings {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: None,
            region: None,
            allow_http: None,
            virtual_hosted: false,
            parallel: ObjectOptions::default().parallel,
            min_chunk_size: ObjectOptions::default().min_chunk_size,
            gc_grace: ObjectOptions::default().grace,
            gc_confirm_wait: ObjectOptions::default().confirm_wait,
            access_key_file: None,
            secret_key_file: None,
            gc: false,
        })
    }

    /// The volume options these settings give.
    pub fn options(&self) -> Result<ObjectOptions, StoreError> {
        if self.parallel == 0 || self.parallel > 1024 {
            return Err(StoreError::Setting("store.parallel must be between 1 and 1024".into()));
        }
        if !(crate::MIN_CHUNK_SIZE..=crate::MAX_CHUNK_SIZE).contains(&self.min_chunk_size) {
            return Err(StoreError::Setting(format!(
                "store.min_chunk_size must be between {} and {} bytes",
                crate::MIN_CHUNK_SIZE,
                crate::MAX_CHUNK_SIZE
            )));
        }
        Ok(ObjectOptions {
            parallel: self.parallel,
            min_chunk_size: self.min_chunk_size,
            grace: self.gc_grace,
            confirm_wait: self.gc_confirm_wait,
        })
    }

    /// Builds the client: from the environment, then these settings; never conditional writes (Garage ignores
    /// them, so ferry relies on none), the prefix applied to every key.
    pub fn build(&self) -> Result<Arc<dyn ObjectStore>, StoreError> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&self.bucket)
            .with_virtual_hosted_style_request(self.virtual_hosted)
            .with_conditional_put(S3ConditionalPut::Disabled);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
        }
        if let Some(allow) = self.allow_http {
            builder = builder.with_allow_http(allow);
        }
        if let Some((key_id, secret)) = self.key_files()? {
            builder = builder.with_access_key_id(key_id).with_secret_access_key(secret);
        }
        let store = builder
            .build()
            .map_err(|e| StoreError::Build(layout::error_kind(&e).to_string()))?;
        Ok(if self.prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(PrefixStore::new(store, self.prefix.as_str()))
        })
    }

    /// The access key id and secret from their files, if `[store]` names them (both, or neither: a key id from
    /// a file with a secret from the environment is a mistake, not a fallback).
    fn key_files(&self) -> Result<Option<(String, String)>, StoreError> {
        match (&self.access_key_file, &self.secret_key_file) {
            (None, None) => Ok(None),
            (Some(id), Some(secret)) => {
                crate::auth::warn_if_exposed(secret, "store.secret_key_file");
                Ok(Some((
                    read_key_file(id, "access_key_file")?,
                    read_key_file(secret, "secret_key_file")?,
                )))
            }
            _ => Err(StoreError::Setting(
                "store.access_key_file and store.secret_key_file go together: give both or neither".into(),
            )),
        }
    }

    /// The layout of namespace `name` under these settings' prefix.
    pub fn layout(&self, name: &str) -> Layout {
        Layout::new(&self.prefix, name)
    }
}

/// The one line of a key file, without surrounding whitespace. The error names the setting and the file, never
/// what it holds.
fn read_key_file(path: &Path, setting: &str) -> Result<String, StoreError> {
    let failed = |why: &str| StoreError::Setting(format!("store.{setting} {}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| failed(&e.kind().to_string()))?;
    if meta.len() > MAX_KEY_FILE {
        return Err(failed("too large for a key"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| failed(&e.kind().to_string()))?;
    let key = text.trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(failed("expected one key on one line"));
    }
    Ok(key.to_string())
}

/// Largest key file read (keys are tens of bytes).
const MAX_KEY_FILE: u64 = 4096;

/// Writes the format marker at the store's root unless one is there: the first request a server makes, so
/// wrong credentials or an unreachable endpoint fail the start, not the first push.
pub async fn ensure_marker(store: &dyn ObjectStore) -> Result<(), StoreError> {
    let key = Layout::marker();
    if layout::head(store, &key).await?.is_none() {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let marker = format!("{{\"format\": 1, \"created\": {created}}}\n");
        layout::put(store, &key, marker.into()).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        let s = StoreSettings::from_url("s3://ferry").unwrap();
        assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("ferry", ""));
        let s = StoreSettings::from_url("s3://ferry/a/b/").unwrap();
        assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("ferry", "a/b"));
        for bad in [
            "ferry",
            "s3://",
            "s3://Upper",
            "s3://ab",
            "s3://ferry/../x",
            "s3://ferry/a//b",
            "http://x/y",
        ] {
            assert!(StoreSettings::from_url(bad).is_err(), "{bad}");
        }
        let mut s = StoreSettings::from_url("s3://ferry").unwrap();
        s.min_chunk_size = 1024;
        assert!(s.options().is_err());
        s.min_chunk_size = 4096;
        s.parallel = 0;
        assert!(s.options().is_err());
    }

    #[test]
    fn key_files_are_read_trimmed_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let (id, secret) = (dir.path().join("id"), dir.path().join("secret"));
        std::fs::write(&id, "GK0123\n").unwrap();
        std::fs::write(&secret, "  s3cr3t-value\n").unwrap();
        let mut s = StoreSettings::from_url("s3://ferry").unwrap();
        assert_eq!(s.key_files().unwrap(), None);
        s.access_key_file = Some(id.clone());
        let alone = s.key_files().unwrap_err().to_string();
        assert!(alone.contains("go together"), "{alone}");
        s.secret_key_file = Some(secret.clone());
        assert_eq!(
            s.key_files().unwrap(),
            Some(("GK0123".to_string(), "s3cr3t-value".to_string()))
        );
        std::fs::write(&secret, "two words\n").unwrap();
        let bad = s.key_files().unwrap_err().to_string();
        assert!(bad.contains("secret_key_file") && !bad.contains("two words"), "{bad}");
        s.secret_key_file = Some(dir.path().join("missing"));
        assert!(s.key_files().unwrap_err().to_string().contains("missing"));
    }

    #[tokio::test]
    async fn the_marker_is_written_once() {
        let store = object_store::memory::InMemory::new();
        ensure_marker(&store).await.unwrap();
        let first = layout::head(&store, &Layout::marker()).await.unwrap().unwrap();
        ensure_marker(&store).await.unwrap();
        let second = layout::head(&store, &Layout::marker()).await.unwrap().unwrap();
        assert_eq!(first.e_tag, second.e_tag);
    }
}
