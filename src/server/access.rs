//! Who may connect and what each connection may touch: the configured clients (tokens, namespaces, permissions,
//! quotas), one receiver context per namespace, and the per-client connection count.
//!
//! A namespace is a directory under the root with its own records (a store scope), partials directory and
//! destination claims, so one client's paths, chunk index and progress never meet another's. Namespaces must not
//! nest: a client of `a` could otherwise write into `a/b`, another client's namespace.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::ServerError;
use crate::auth::{Grant, Permissions, Token};
use crate::path::{ensure_dir, namespace_partial_dir, RemotePath, MAX_NAMESPACE_LEN};
use crate::store::{ReceiverStore, Store};
use crate::transfer::claims::Claims;
use crate::transfer::handshake::Tokens;
use crate::transfer::receiver::ReceiverContext;
use crate::transfer::TransferError;
use crate::wire::ErrorCode;

/// One client a server accepts.
#[derive(Debug, Clone)]
pub struct ClientEntry {
    /// Its token (id and secret).
    pub token: Token,
    /// The directory under the root it is confined to (`""`: the whole root).
    pub namespace: String,
    /// What it may do there.
    pub permissions: Permissions,
    /// Bytes its namespace may hold (committed files plus open transfers); `None`: unlimited. Clients sharing a
    /// namespace must agree.
    pub quota: Option<u64>,
}

/// The access rules of a running server.
#[derive(Clone)]
pub(super) struct Gate {
    /// Tokens by client id; `None` on a server without clients (everyone is anonymous with full access).
    pub tokens: Tokens,
    grants: HashMap<String, ClientEntry>,
    namespaces: HashMap<String, ReceiverContext>,
    per_client_limit: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// A connection counted against its client's limit; uncounted on drop.
pub(super) struct Slot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl Gate {
    /// Builds the namespaces of `clients` (creating their directories, refusing symlinks on the way) from the root
    /// context `base`. Blocking.
    pub fn open(
        base: &ReceiverContext,
        store: &Store,
        clients: &[ClientEntry],
        per_client_limit: usize,
    ) -> Result<Gate, ServerError> {
        let mut quotas: HashMap<&str, Option<u64>> = HashMap::new();
        for client in clients {
            if let Some(agreed) = quotas.insert(&client.namespace, client.quota) {
                if agreed != client.quota {
                    return Err(config_error(format!(
                        "clients of namespace {:?} give different quotas",
                        client.namespace
                    )));
                }
            }
        }
        check_no_nesting(quotas.keys().copied())?;
        let mut namespaces = HashMap::new();
        if clients.is_empty() {
            namespaces.insert(String::new(), base.clone());
        }
        for (name, quota) in quotas {
            let ctx = namespace_context(base, store, name, quota)?;
            namespaces.insert(name.to_string(), ctx);
        }
        let grants: HashMap<String, ClientEntry> = clients.iter().map(|c| (c.token.id.clone(), c.clone())).collect();
        if grants.len() != clients.len() {
            return Err(config_error("two clients share an id".into()));
        }
        let tokens =
            (!clients.is_empty()).then(|| grants.iter().map(|(id, c)| (id.clone(), c.token.clone())).collect());
        Ok(Gate {
            tokens,
            grants,
            namespaces,
            per_client_limit,
            open: Arc::default(),
        })
    }

    /// What a connection proven as `client` (or anonymous) may do, and the context it works in.
    pub fn grant(&self, client: Option<String>) -> (Grant, &ReceiverContext) {
        let grant = match client.as_ref().and_then(|id| self.grants.get(id)) {
            Some(entry) => Grant {
                client,
                namespace: entry.namespace.clone(),
                permissions: entry.permissions,
            },
            None => Grant {
                client: None,
                namespace: String::new(),
                permissions: Permissions::ALL,
            },
        };
        let ctx = &self.namespaces[&grant.namespace];
        (grant, ctx)
    }

    /// Counts one more connection of `who` (a client id, or the peer address of an anonymous client); refuses it
    /// with `TooManyConnections` beyond the per-client limit.
    pub fn admit(&self, who: String) -> Result<Slot, TransferError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(who.clone()).or_default();
        if *count >= self.per_client_limit {
            return Err(TransferError::refused(
                ErrorCode::TooManyConnections,
                format!("{who} already has {} connections open", self.per_client_limit),
            ));
        }
        *count += 1;
        Ok(Slot {
            open: self.open.clone(),
            key: who,
        })
    }

    /// Every namespace's context, for the expiry sweep.
    pub fn contexts(&self) -> impl Iterator<Item = &ReceiverContext> {
        self.namespaces.values()
    }
}

/// The receiver context of namespace `name`: its directory, partials, store scope, claims and quota.
fn namespace_context(
    base: &ReceiverContext,
    store: &Store,
    name: &str,
    quota: Option<u64>,
) -> Result<ReceiverContext, ServerError> {
    let (root, partial_dir) = if name.is_empty() {
        (base.root.clone(), base.partial_dir.clone())
    } else {
        if name.len() > MAX_NAMESPACE_LEN {
            return Err(config_error(format!(
                "namespace {name:?} is longer than {MAX_NAMESPACE_LEN} bytes"
            )));
        }
        let path = RemotePath::parse(name).map_err(|e| config_error(format!("namespace {name:?}: {e}")))?;
        let root = ensure_dir(&base.root, &path).map_err(|e| config_error(format!("namespace {name:?}: {e}")))?;
        (root, namespace_partial_dir(&base.partial_dir, name))
    };
    create_dir(&partial_dir)?;
    // Its own volume, never the base's: a namespace's files live only under its own directory (or prefix).
    let volume = (base.volume.for_namespace(name))
        .unwrap_or_else(|| crate::storage::LocalVolume::shared(root.clone(), partial_dir.clone()));
    let trees = (volume.tree_volume())
        .unwrap_or_else(|| crate::storage::LocalVolume::shared_tree(root.clone(), partial_dir.clone()));
    Ok(ReceiverContext {
        volume,
        trees,
        root,
        partial_dir,
        store: ReceiverStore::open_scoped(store, name)?,
        claims: Claims::default(),
        joins: Default::default(),
        admission: Default::default(),
        quota,
        ..base.clone()
    })
}

/// Refuses namespaces of which one contains another (`""` contains every other).
fn check_no_nesting<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), ServerError> {
    // Compared without case: on a case-insensitive filesystem `Team` and `team/bob` share directories.
    let names: Vec<(String, &str)> = names.map(|n| (n.to_lowercase(), n)).collect();
    for (outer_key, outer) in &names {
        for (inner_key, inner) in &names {
            let nested = outer_key.is_empty() || inner_key.starts_with(&format!("{outer_key}/"));
            if outer != inner && (nested || outer_key == inner_key) {
                return Err(config_error(format!(
                    "namespace {inner:?} lies inside namespace {outer:?}; namespaces must not nest"
                )));
            }
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), ServerError> {
    std::fs::create_dir_all(dir).map_err(|source| ServerError::Dir {
        path: dir.display().to_string(),
        source,
    })
}

fn config_error(message: String) -> ServerError {
    ServerError::Config(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_namespaces_are_refused() {
        assert!(check_no_nesting(["a", "b", "ab", "a-b"].into_iter()).is_ok());
        assert!(check_no_nesting(["a", "a/b"].into_iter()).is_err());
        assert!(
            check_no_nesting(["a", "a-b", "a/b"].into_iter()).is_err(),
            "sorting must not hide a pair"
        );
        assert!(check_no_nesting(["", "a"].into_iter()).is_err());
        assert!(check_no_nesting(["x/y", "x/y/z", "q"].into_iter()).is_err());
        assert!(
            check_no_nesting(["Team", "team/bob"].into_iter()).is_err(),
            "case-insensitive filesystems"
        );
        assert!(check_no_nesting(["Team", "team"].into_iter()).is_err());
    }
}
