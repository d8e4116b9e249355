//! Answers already in wire format, for the query path to copy.
//!
//! Owns: the pre-encoded parts of replies: for each name of the zone (the
//! lowercase wire name is the key), the records section of every static
//! answer, and per service and client class the answer records with their
//! owner compressed to the question (`0xc00c`). Built with the snapshot
//! (`dns::wire` writes them with the query path's own writer, so a copy is
//! the same bytes the writer would give); never changed after.
//!
//! A reply built from these is: header, the question as received, one
//! blob (or a few records picked per client), the OPT record. Anything not
//! here (wildcards, CNAME chains, weighted shares, explanations, names
//! outside the zone) goes through the general path.

use std::sync::Arc;

/// The records of one reply after its question, with owner names compressed
/// against the question of the name they were built for: valid after any
/// question that spells the same name (ASCII case may differ).
#[derive(Debug, Clone, Default)]
pub struct Blob {
    pub bytes: Box<[u8]>,
    /// Records in the answer, authority and additional sections (the OPT
    /// record is added by the reply).
    pub counts: [u16; 3],
    /// The reply's RCODE (4 bits: nothing here needs extended ones).
    pub rcode: u8,
}

/// The pre-encoded answers of one static name, by query type.
#[derive(Debug, Clone, Default)]
pub struct StaticAnswers {
    /// (qtype, answer), sorted by qtype.
    pub by_type: Vec<(u16, Blob)>,
    /// Every other type (NODATA).
    pub other: Blob,
}

impl StaticAnswers {
    pub fn get(&self, qtype: u16) -> &Blob {
        match self.by_type.binary_search_by_key(&qtype, |(t, _)| *t) {
            Ok(i) => &self.by_type[i].1,
            Err(_) => &self.other,
        }
    }
}

/// What a name of the index is.
#[derive(Debug, Clone)]
pub enum NameEntry {
    Static(StaticAnswers),
    /// Service `index`; `nodata` is its NODATA reply (the negative SOA).
    Service {
        index: usize,
        nodata: Blob,
    },
}

/// The zone's names by their lowercase wire form, in an open-addressing
/// table with a fixed hash: built once per config, read without locks.
/// Its size is the config's, never the senders'.
#[derive(Debug, Default)]
pub struct Names {
    /// Slot -> entry index + 1 (0: empty); a power of two, at most half full.
    slots: Vec<u32>,
    entries: Vec<(Box<[u8]>, NameEntry)>,
}

/// FNV-1a over the (lowercase) wire name: the keys are the zone's own, so
/// a sender cannot make them collide; it can only miss.
fn hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Names {
    pub fn new(entries: Vec<(Box<[u8]>, NameEntry)>) -> Self {
        let size = (entries.len() * 2).next_power_of_two().max(8);
        let mut slots = vec![0u32; size];
        for (i, (name, _)) in entries.iter().enumerate() {
            let mut at = hash(name) as usize & (size - 1);
            while slots[at] != 0 {
                at = (at + 1) & (size - 1);
            }
            slots[at] = i as u32 + 1;
        }
        Names { slots, entries }
    }

    /// The entry of a lowercase wire name.
    pub fn get(&self, name: &[u8]) -> Option<&NameEntry> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut at = hash(name) as usize & mask;
        loop {
            let slot = self.slots[at] as usize;
            if slot == 0 {
                return None;
            }
            let (key, entry) = &self.entries[slot - 1];
            if **key == *name {
                return Some(entry);
            }
            at = (at + 1) & mask;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Records of one family, each encoded alone (owner `0xc00c`).
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// The records one after the other.
    pub bytes: Vec<u8>,
    pub count: u16,
}

/// A proximity candidate's records.
#[derive(Debug, Clone, Default)]
pub struct CandidateWire {
    pub a: Records,
    pub aaaa: Records,
}

/// One client class of a service, ready to copy; `None` fields and
/// `copyable == false` send the query down the general path.
#[derive(Debug, Clone, Default)]
pub struct ClassWire {
    /// Every answer of this class is one of the forms below (no shares to
    /// draw by weight, no spill to the next tier, no CNAME, no residency
    /// refusal): the query path may copy.
    pub copyable: bool,
    /// SERVFAIL (all down and so configured, or not probed yet).
    pub servfail: bool,
    /// Failover (and every other strategy's fixed answer): the records.
    pub a: Records,
    pub aaaa: Records,
    /// Proximity: per candidate, in the class's candidate order.
    pub candidates: Vec<CandidateWire>,
    /// Capacity: each drawable entry's record, by family, in entry order.
    pub drawn_a: Vec<[u8; 16]>,
    pub drawn_aaaa: Vec<[u8; 28]>,
}

/// A service's classes, in `ServiceAnswer::classes` order.
#[derive(Debug, Clone, Default)]
pub struct ServiceWire {
    pub classes: Vec<ClassWire>,
}

/// Everything pre-encoded in a snapshot.
#[derive(Debug, Clone, Default)]
pub struct Wire {
    /// Per config: the zone's names.
    pub names: Arc<Names>,
    /// Per snapshot: one per service (empty: nothing copyable).
    /// Shared between snapshots like the service answers they encode: an
    /// incremental build encodes only the services it recompiled.
    pub services: Vec<Arc<ServiceWire>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(rcode: u8) -> Blob {
        Blob {
            rcode,
            ..Blob::default()
        }
    }

    #[test]
    fn names_are_found_by_their_exact_lowercase_wire_form() {
        let names: Vec<(Box<[u8]>, NameEntry)> = (0..100u8)
            .map(|i| {
                let key: Box<[u8]> = vec![1, b'a' + (i % 26), 1, b'0' + i / 26, 0].into();
                let entry = NameEntry::Static(StaticAnswers {
                    by_type: vec![(1, blob(i))],
                    other: blob(0),
                });
                (key, entry)
            })
            .collect();
        let index = Names::new(names);
        assert_eq!(index.len(), 100);
        for i in 0..100u8 {
            let key = [1, b'a' + (i % 26), 1, b'0' + i / 26, 0];
            match index.get(&key) {
                Some(NameEntry::Static(s)) => {
                    assert_eq!(s.get(1).rcode, i);
                    assert_eq!(s.get(28).rcode, 0, "other types: the NODATA blob");
                }
                other => panic!("{i}: {other:?}"),
            }
        }
        assert!(
            index.get(&[1, b'A', 1, b'0', 0]).is_none(),
            "keys are lowercase"
        );
        assert!(index.get(&[1, b'z', 1, b'9', 0]).is_none());
        assert!(Names::default().get(&[0]).is_none());
    }
}
