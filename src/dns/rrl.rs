//! Response rate limiting (RRL) of UDP answers, as NSD, Knot and BIND do
//! it: a token bucket per client prefix (/24, /56 by default) and response
//! class (the name answered, the name's NODATA, the zone's NXDOMAIN, or
//! errors), refilled at `rate` per second up to `rate x window`. A limited
//! response is dropped, except every `slip`-th, which goes out truncated
//! (TC=1, no records) so that a real client behind a spoofed flood retries
//! over TCP, where nothing can be spoofed.
//!
//! The buckets live in one fixed table of atomics indexed by a keyed hash:
//! no lock, and no memory that grows with the number of senders (a flood
//! from many prefixes only shares buckets, as Knot's table does).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::RateLimit;

/// Buckets in the table.
const SLOTS: usize = 1 << 16;

/// What to do with a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Limited: send it truncated (TC=1, no records).
    Slip,
    /// Limited: send nothing.
    Drop,
}

/// The class of a response: what a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Records for the name asked.
    Answer,
    /// NOERROR without records for the name asked.
    NoData,
    /// NXDOMAIN: one class for the whole zone, so a flood of random names
    /// shares one bucket.
    NxDomain,
    /// REFUSED, FORMERR, SERVFAIL, NOTIMP: one class per prefix.
    Error,
}

/// The table of buckets.
pub struct Rrl {
    /// Per bucket: the time of its last update in ms since `start` (high
    /// 32 bits) and its tokens as an `f32` (low 32 bits); 0 is "never used".
    slots: Box<[AtomicU64]>,
    /// Keys the hash, so that senders cannot aim at one bucket.
    seed: u64,
    /// Limited responses so far, for the slip count.
    limited: AtomicU64,
}

impl Default for Rrl {
    fn default() -> Self {
        Self::new()
    }
}

impl Rrl {
    pub fn new() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            seed: rand::random(),
            limited: AtomicU64::new(0),
        }
    }

    /// Takes a token for a response of `class` about `name` (the question's
    /// name on the wire, any case) to `src` at `now_ms` (read only for a
    /// client that is not exempt).
    pub fn check(
        &self,
        limit: &RateLimit,
        src: IpAddr,
        class: Class,
        name: &[u8],
        now_ms: impl FnOnce() -> u32,
    ) -> Verdict {
        let src = src.to_canonical();
        if limit.exempt.iter().any(|n| n.contains(&src)) {
            return Verdict::Send;
        }
        let now_ms = now_ms();
        let slot = &self.slots[self.index(limit, src, class, name)];
        let mut current = slot.load(Ordering::Relaxed);
        let pass = loop {
            let (tokens, pass) = take(limit, current, now_ms);
            // Time 0 and no tokens would read as "never used": keep it apart.
            let next = (u64::from(now_ms.max(1)) << 32) | u64::from(tokens.to_bits());
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break pass,
                Err(actual) => current = actual,
            }
        };
        if pass {
            return Verdict::Send;
        }
        let n = self.limited.fetch_add(1, Ordering::Relaxed) + 1;
        if limit.slip > 0 && n.is_multiple_of(u64::from(limit.slip)) {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }

    fn index(&self, limit: &RateLimit, src: IpAddr, class: Class, name: &[u8]) -> usize {
        let prefix = match src {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(limit.ipv4_prefix))
                    .unwrap_or(0);
                u64::from(bits & mask)
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(limit.ipv6_prefix))
                    .unwrap_or(0);
                let masked = bits & mask;
                (masked as u64) ^ ((masked >> 64) as u64).rotate_left(17) ^ (1 << 63)
            }
        };
        let mut h = mix(self.seed ^ prefix);
        h = mix(h ^ class as u64);
        // The name counts for answers and NODATA; NXDOMAIN and errors
        // share one class whatever the name.
        if matches!(class, Class::Answer | Class::NoData) {
            for chunk in name.chunks(8) {
                let mut word = [0u8; 8];
                for (w, b) in word.iter_mut().zip(chunk) {
                    *w = b.to_ascii_lowercase();
                }
                h = mix(h ^ u64::from_le_bytes(word));
            }
        }
        (h as usize) & (SLOTS - 1)
    }
}

/// The bucket in `current` refilled until `now_ms`, less one token if it
/// has one: (tokens left, whether the response may go).
fn take(limit: &RateLimit, current: u64, now_ms: u32) -> (f32, bool) {
    let tokens = if current == 0 {
        limit.burst
    } else {
        let last = (current >> 32) as u32;
        let tokens = f64::from(f32::from_bits(current as u32));
        let elapsed = f64::from(now_ms.wrapping_sub(last)) / 1000.0;
        (tokens + elapsed * limit.rate).min(limit.burst)
    };
    if tokens >= 1.0 {
        ((tokens - 1.0) as f32, true)
    } else {
        (tokens as f32, false)
    }
}

/// splitmix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: f64, burst: f64, slip: u32) -> RateLimit {
        RateLimit {
            rate,
            burst,
            slip,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            exempt: vec!["127.0.0.0/8".parse().unwrap()],
        }
    }

    const NAME: &[u8] = b"\x04chat\x09inference\x07example\x03com\x00";

    #[test]
    fn a_bucket_passes_its_burst_then_its_rate_and_slips_every_nth() {
        let rrl = Rrl::new();
        let l = limit(10.0, 10.0, 2);
        let src: IpAddr = "198.51.100.7".parse().unwrap();
        let verdicts: Vec<Verdict> = (0..30)
            .map(|_| rrl.check(&l, src, Class::Answer, NAME, || 1000))
            .collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Send));
        let slipped = verdicts[10..]
            .iter()
            .filter(|v| **v == Verdict::Slip)
            .count();
        let dropped = verdicts[10..]
            .iter()
            .filter(|v| **v == Verdict::Drop)
            .count();
        assert_eq!((slipped, dropped), (10, 10), "every 2nd limited one slips");
        // Half a second later: five more tokens.
        let later: Vec<Verdict> = (0..8)
            .map(|_| rrl.check(&l, src, Class::Answer, NAME, || 1500))
            .collect();
        assert_eq!(later.iter().filter(|v| **v == Verdict::Send).count(), 5);
    }

    #[test]
    fn prefixes_classes_and_exempt_sources_have_their_own_buckets() {
        let rrl = Rrl::new();
        let l = limit(1.0, 1.0, 0);
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let same_24: IpAddr = "198.51.100.200".parse().unwrap();
        let other: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(rrl.check(&l, a, Class::Answer, NAME, || 5), Verdict::Send);
        assert_eq!(
            rrl.check(&l, same_24, Class::Answer, NAME, || 5),
            Verdict::Drop,
            "one /24"
        );
        assert_eq!(
            rrl.check(&l, other, Class::Answer, NAME, || 5),
            Verdict::Send
        );
        assert_eq!(rrl.check(&l, a, Class::NxDomain, NAME, || 5), Verdict::Send);
        // Case does not make a new bucket; NXDOMAIN ignores the name.
        let upper = b"\x04CHAT\x09inference\x07example\x03com\x00";
        assert_eq!(rrl.check(&l, a, Class::Answer, upper, || 5), Verdict::Drop);
        assert_eq!(
            rrl.check(&l, a, Class::NxDomain, b"\x01x\x00", || 5),
            Verdict::Drop
        );
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(
                rrl.check(&l, local, Class::Answer, NAME, || unreachable!(
                    "an exempt client reads no clock"
                )),
                Verdict::Send
            );
        }
    }

    #[test]
    fn state_stays_bounded_under_a_flood_from_many_prefixes() {
        let rrl = Rrl::new();
        let l = limit(5.0, 5.0, 2);
        let size = std::mem::size_of_val(&*rrl.slots);
        for i in 0..100_000u32 {
            let src = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 | (i << 8)));
            rrl.check(&l, src, Class::Answer, NAME, || i / 100);
        }
        for i in 0..100_000u128 {
            let src = IpAddr::V6(std::net::Ipv6Addr::from(
                (0x2001_0db8u128 << 96) | (i << 72),
            ));
            rrl.check(&l, src, Class::Answer, NAME, || 1000);
        }
        assert_eq!(std::mem::size_of_val(&*rrl.slots), size);
        assert_eq!(size, SLOTS * 8, "512 KiB, whatever the senders");
        // A second after the flood every bucket has refilled: other
        // prefixes are answered (a shared bucket costs nothing once refilled).
        for i in 0..1000u32 {
            let src = IpAddr::V4(std::net::Ipv4Addr::from(0xc000_0000 | (i << 8)));
            assert_eq!(
                rrl.check(&l, src, Class::Answer, NAME, || 2000),
                Verdict::Send
            );
        }
    }
}
