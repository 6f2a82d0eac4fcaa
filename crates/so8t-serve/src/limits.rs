//! Limits per client, so that one client cannot take what the others need: requests per
//! minute (per API key, or per address where the server has no keys) and open
//! connections per address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Who a request is charged to: the API key it presented (by its position in
/// `--api-key`, so the key itself is not kept twice), or, where the server has no keys,
/// the peer's address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Client {
    Key(usize),
    Addr(IpAddr),
}

/// The peer address of a connection, put into every request it carries.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub IpAddr);

/// Buckets kept at most; past this, those of clients idle long enough to be full again
/// are dropped, so requests from ever-new addresses cannot grow the table without bound.
const MAX_TRACKED: usize = 4096;

#[derive(Debug, PartialEq)]
pub enum Decision {
    Allowed { remaining: u32 },
    Refused { retry_after: Duration },
}

/// A token bucket per client: a burst of `per_minute` requests, refilled at `per_minute`
/// a minute (the shape of OpenAI's requests-per-minute limits).
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<Client, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        assert!(per_minute > 0, "a rate limit of 0 is no limit: use None");
        RateLimiter {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Takes one request from `client`'s bucket at `now`.
    pub fn check(&self, client: Client, now: Instant) -> Decision {
        let cap = self.per_minute as f64;
        let per_second = cap / 60.0;
        let level = |(tokens, at): &(f64, Instant)| {
            (tokens + per_second * now.saturating_duration_since(*at).as_secs_f64()).min(cap)
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&client) {
            buckets.retain(|_, b| level(b) < cap);
            if buckets.len() >= MAX_TRACKED {
                // Every tracked client is mid-burst: this one is let through untracked
                // rather than evicting one of them (which would reset its limit).
                return Decision::Allowed {
                    remaining: self.per_minute - 1,
                };
            }
        }
        let bucket = buckets.entry(client).or_insert((cap, now));
        let tokens = level(bucket);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            Decision::Allowed {
                remaining: (tokens - 1.0).floor() as u32,
            }
        } else {
            *bucket = (tokens, now);
            Decision::Refused {
                retry_after: Duration::from_secs_f64((1.0 - tokens) / per_second),
            }
        }
    }
}

/// Open connections per peer address, at most `max` each.
pub struct ConnectionsPerAddr {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One open connection of an address; dropping it (the connection ended) frees it.
pub struct AddrSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl ConnectionsPerAddr {
    pub fn new(max: usize) -> Self {
        ConnectionsPerAddr {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more connection from `ip`, or `None` when it has `max` open.
    pub fn try_open(&self, ip: IpAddr) -> Option<AddrSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddrSlot {
            ip,
            open: self.open.clone(),
        })
    }
}

impl Drop for AddrSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_request_per_refill_interval_per_client() {
        let limiter = RateLimiter::new(3);
        let t0 = Instant::now();
        let a = Client::Key(0);
        for left in [2, 1, 0] {
            assert_eq!(limiter.check(a, t0), Decision::Allowed { remaining: left });
        }
        // Empty: the next token comes after 60 s / 3.
        match limiter.check(a, t0) {
            Decision::Refused { retry_after } => {
                assert!(
                    (retry_after.as_secs_f64() - 20.0).abs() < 1e-6,
                    "{retry_after:?}"
                )
            }
            d => panic!("{d:?}"),
        }
        // Other clients have their own buckets.
        assert!(matches!(
            limiter.check(Client::Key(1), t0),
            Decision::Allowed { .. }
        ));
        let ip = Client::Addr("127.0.0.2".parse().unwrap());
        assert!(matches!(limiter.check(ip, t0), Decision::Allowed { .. }));
        // Refused requests do not count against the client; a refill interval later one
        // request goes through, and never more than the burst after a long pause.
        assert!(matches!(
            limiter.check(a, t0 + Duration::from_secs(19)),
            Decision::Refused { .. }
        ));
        assert!(matches!(
            limiter.check(a, t0 + Duration::from_secs(20)),
            Decision::Allowed { remaining: 0 }
        ));
        assert!(matches!(
            limiter.check(a, t0 + Duration::from_secs(3600)),
            Decision::Allowed { remaining: 2 }
        ));
    }

    #[test]
    fn the_table_stays_bounded_under_ever_new_addresses() {
        let limiter = RateLimiter::new(2);
        let t0 = Instant::now();
        let addr = |i: u32| Client::Addr(IpAddr::from(i.to_be_bytes()));
        for i in 0..MAX_TRACKED as u32 {
            limiter.check(addr(i), t0);
        }
        // All mid-burst: a new one is let through untracked.
        assert!(matches!(
            limiter.check(addr(1 << 30), t0),
            Decision::Allowed { .. }
        ));
        assert_eq!(limiter.buckets.lock().unwrap().len(), MAX_TRACKED);
        // A minute later they are full again and make room.
        limiter.check(addr(1 << 30), t0 + Duration::from_secs(60));
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
    }

    #[test]
    fn connection_slots_per_address() {
        let per = ConnectionsPerAddr::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let s1 = per.try_open(a).unwrap();
        let _s2 = per.try_open(a).unwrap();
        assert!(per.try_open(a).is_none());
        assert!(per.try_open(b).is_some());
        drop(s1);
        assert!(per.try_open(a).is_some());
        assert!(
            per.open.lock().unwrap().get(&b).is_none(),
            "freed addresses leave the table"
        );
    }
}
