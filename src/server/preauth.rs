//! Connections that have not finished the handshake yet (proto-spec.md §3, §10 "pre-auth connections").
//!
//! They live in a pool of their own, apart from the authenticated connection slots, so that anonymous peers who
//! open connections and say nothing can never keep a token holder out: at most `max_per_address` of them per source
//! (an IPv4 address, or an IPv6 /64; more are closed at once, without a task), at most `max_total` in all (a
//! newcomer evicts the oldest connection of the source that has the most), and each gets one deadline for the TLS
//! handshake and the ferry handshake together. Only a connection that completed the handshake takes one of the
//! server's `max_connections` slots.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// The pool of connections still in their handshake.
#[derive(Debug)]
pub(super) struct PreAuthPool {
    max_total: usize,
    max_per_address: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// By id, which grows with time: the first entry is the oldest.
    open: BTreeMap<u64, (IpAddr, CancellationToken)>,
    per_address: HashMap<IpAddr, usize>,
}

impl State {
    /// The connection a newcomer evicts: the oldest of the address with the most connections in their handshake,
    /// so a client with one connection is not pushed out by a source that holds many.
    fn victim(&self) -> Option<u64> {
        let most = self.per_address.values().copied().max()?;
        self.open
            .iter()
            .find(|(_, (addr, _))| self.per_address.get(addr) == Some(&most))
            .map(|(&id, _)| id)
    }

    fn forget(&mut self, id: u64) {
        let Some((addr, _)) = self.open.remove(&id) else {
            return;
        };
        if let Some(count) = self.per_address.get_mut(&addr) {
            *count -= 1;
            if *count == 0 {
                self.per_address.remove(&addr);
            }
        }
    }
}

/// One connection's place in the pool; freed on drop.
#[derive(Debug)]
pub(super) struct PreAuthTicket {
    pool: Arc<PreAuthPool>,
    id: u64,
    evicted: CancellationToken,
}

impl PreAuthTicket {
    /// Fires when a newer connection took this one's place.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }
}

impl Drop for PreAuthTicket {
    fn drop(&mut self) {
        self.pool.lock().forget(self.id);
    }
}

impl PreAuthPool {
    /// A pool of `max_total` connections, `max_per_address` of them per source address (both at least 1).
    pub fn new(max_total: usize, max_per_address: usize) -> Arc<PreAuthPool> {
        Arc::new(PreAuthPool {
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection from `addr`, evicting the oldest connection of the busiest address when the
    /// pool is full; `None` when
    /// `addr` already has its share of connections in their handshake.
    pub fn admit(self: &Arc<Self>, addr: IpAddr) -> Option<PreAuthTicket> {
        let addr = source(addr);
        let mut state = self.lock();
        if state.per_address.get(&addr).copied().unwrap_or(0) >= self.max_per_address {
            return None;
        }
        while state.open.len() >= self.max_total {
            let Some(victim) = state.victim() else {
                break;
            };
            if let Some((_, token)) = state.open.get(&victim) {
                token.cancel();
            }
            state.forget(victim);
        }
        let id = state.next_id;
        state.next_id += 1;
        let evicted = CancellationToken::new();
        state.open.insert(id, (addr, evicted.clone()));
        *state.per_address.entry(addr).or_default() += 1;
        Some(PreAuthTicket {
            pool: self.clone(),
            id,
            evicted,
        })
    }

    /// Connections in their handshake now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().open.len()
    }
}

/// The source a connection is counted under: its IPv4 address, or the /64 network of an IPv6 address (one host
/// commonly holds a whole /64).
fn source(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_share_and_a_full_pool_evicts_from_the_busiest_address() {
        let pool = PreAuthPool::new(4, 3);
        let (a, b, c) = (
            IpAddr::from([127, 0, 0, 2]),
            IpAddr::from([127, 0, 0, 3]),
            IpAddr::from([127, 0, 0, 1]),
        );
        let c1 = pool.admit(c).unwrap();
        let a1 = pool.admit(a).unwrap();
        let a2 = pool.admit(a).unwrap();
        let a3 = pool.admit(a).unwrap();
        assert!(pool.admit(a).is_none(), "a fourth from one address is refused");
        assert_eq!(pool.len(), 4);
        // The pool is full: a newcomer evicts the oldest of the busiest address (a), not the older c1.
        let b1 = pool.admit(b).unwrap();
        assert!(a1.evicted().is_cancelled());
        assert!(!c1.evicted().is_cancelled() && !a2.evicted().is_cancelled());
        let b2 = pool.admit(b).unwrap();
        assert!(a2.evicted().is_cancelled(), "a still has the most");
        // Now a, b and c hold 1, 2 and 1: b is the busiest.
        let b3 = pool.admit(c).unwrap();
        assert!(b1.evicted().is_cancelled() && !c1.evicted().is_cancelled() && !a3.evicted().is_cancelled());
        assert_eq!(pool.len(), 4);
        // Evicted places are free at once; dropping an evicted ticket later changes nothing.
        drop((a1, a2, b1));
        assert_eq!(pool.len(), 4);
        drop((a3, b2, b3, c1));
        assert_eq!(pool.len(), 0);
        assert!(pool.lock().per_address.is_empty());
    }

    #[test]
    fn an_ipv6_network_counts_as_one_source() {
        let pool = PreAuthPool::new(10, 2);
        let host = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
        let held = (pool.admit(host(1)).unwrap(), pool.admit(host(2)).unwrap());
        assert!(pool.admit(host(3)).is_none(), "the same /64");
        assert!(pool.admit(IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1])).is_some());
        let mapped = IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0x7f00, 2]);
        let v4 = (
            pool.admit(IpAddr::from([127, 0, 0, 2])).unwrap(),
            pool.admit(mapped).unwrap(),
        );
        assert!(
            pool.admit(IpAddr::from([127, 0, 0, 2])).is_none(),
            "v4-mapped is the v4 address"
        );
        drop((held, v4));
    }
}
