//! The structural check of a MaxMind database's search tree: every node a
//! lookup can reach, and every record it can end on, once.
//!
//! Owns: reading the tree's nodes from the file's bytes (24, 28 or 32-bit
//! records), the data section's bounds and its separator. It must not
//! decode records (the caller does, through maxminddb, to build the table
//! of places) and it never runs on the query path.
//!
//! Why our own walk rather than `Reader::verify`: maxminddb's verify walks
//! every network (with its address arithmetic and a hash set of offsets)
//! and then checks each record again; the table of places walked every
//! network a second time. This walk reads each node once (a DAG: the IPv4
//! aliases share the IPv4 subtree, visited once), marks the record offsets
//! in a bit set, and hands each distinct record to the caller with one
//! address that reaches it, so verification and the table are one pass.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The marker that starts the metadata section.
const METADATA_MARKER: &[u8] = b"\xab\xcd\xefMaxMind.com";
/// The metadata section is at most this long (the format's own limit).
const METADATA_MAX: usize = 128 * 1024;
/// The zero bytes between the search tree and the data section.
const SEPARATOR: usize = 16;

/// A record the tree points at: its offset in the data section, one
/// address whose lookup ends on it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Leaf {
    pub offset: usize,
    pub address: IpAddr,
}

/// Walks the search tree of the database in `bytes` (`node_count` nodes of
/// `record_size` bits, `ip_version` 4 or 6). Returns every distinct record
/// offset that a lookup can end on, or why the tree is unsound: a record
/// pointing past the data section, a path longer than the address, a
/// separator that is not zero, a tree larger than the file.
pub(super) fn walk(
    bytes: &[u8],
    node_count: usize,
    record_size: u16,
    ip_version: u16,
) -> Result<Vec<Leaf>, String> {
    let node_bytes = match record_size {
        24 => 6,
        28 => 7,
        32 => 8,
        other => return Err(format!("record size {other} is not 24, 28 or 32")),
    };
    let bits: u32 = match ip_version {
        4 => 32,
        6 => 128,
        other => return Err(format!("IP version {other} is not 4 or 6")),
    };
    let tree_end = node_count
        .checked_mul(node_bytes)
        .ok_or("the search tree's size overflows")?;
    let data_start = tree_end + SEPARATOR;
    let metadata_at = metadata_marker(bytes).ok_or("no metadata marker")?;
    if data_start > metadata_at {
        return Err(format!(
            "the search tree ({node_count} nodes, {tree_end} bytes) runs past the data section"
        ));
    }
    if bytes[tree_end..data_start].iter().any(|b| *b != 0) {
        return Err("the data section separator is not zero".into());
    }
    let data_len = metadata_at - data_start;
    let tree = &bytes[..tree_end];
    let read = |node: usize, side: usize| record(tree, record_size, node, side);
    let mut visited = vec![0u64; node_count.div_ceil(64)];
    let mut seen = vec![0u64; data_len.div_ceil(64)];
    let mut leaves = Vec::new();
    // (node, depth, the address bits so far, left-aligned in `bits`)
    let mut stack: Vec<(usize, u32, u128)> = vec![(0, 0, 0)];
    visited[0] |= 1;
    while let Some((node, depth, path)) = stack.pop() {
        for side in 0..2 {
            let value = read(node, side);
            let path = path | ((side as u128) << (bits - 1 - depth));
            let depth = depth + 1;
            if value < node_count {
                if depth >= bits {
                    return Err(format!(
                        "node {node}'s path is longer than an IPv{ip_version} address"
                    ));
                }
                let (word, bit) = (value / 64, 1u64 << (value % 64));
                if visited[word] & bit == 0 {
                    visited[word] |= bit;
                    stack.push((value, depth, path));
                }
            } else if value > node_count {
                let offset = value - node_count - SEPARATOR;
                if value < node_count + SEPARATOR || offset >= data_len {
                    return Err(format!(
                        "node {node} points past the data section ({value})"
                    ));
                }
                let (word, bit) = (offset / 64, 1u64 << (offset % 64));
                if seen[word] & bit == 0 {
                    seen[word] |= bit;
                    let address = if bits == 32 {
                        IpAddr::V4(Ipv4Addr::from(path as u32))
                    } else {
                        IpAddr::V6(Ipv6Addr::from(path))
                    };
                    leaves.push(Leaf { offset, address });
                }
            }
        }
    }
    Ok(leaves)
}

/// Record `side` (0 left, 1 right) of `node` in `tree`.
fn record(tree: &[u8], record_size: u16, node: usize, side: usize) -> usize {
    match record_size {
        24 => {
            let at = node * 6 + side * 3;
            let b = &tree[at..at + 3];
            usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2])
        }
        28 => {
            let at = node * 7;
            let middle = usize::from(tree[at + 3]);
            let high = if side == 0 {
                middle >> 4
            } else {
                middle & 0x0f
            };
            // [left low 24][left high 4 | right high 4][right low 24]
            let b = &tree[at + side * 4..at + side * 4 + 3];
            high << 24 | usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2])
        }
        _ => {
            let at = node * 8 + side * 4;
            let b = &tree[at..at + 4];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        }
    }
}

/// The search tree of a checked database, kept without the data section
/// (whose records are decoded once, into the table of places): lookups
/// walk it as maxminddb's reader does and end on a data offset.
pub(super) struct Tree {
    nodes: Box<[u8]>,
    node_count: usize,
    record_size: u16,
    ip_version: u16,
    /// Where IPv4 addresses start in an IPv6 tree (96 zero bits down, or
    /// the leaf met before), and how deep that is.
    ipv4_start: usize,
    ipv4_depth: u8,
}

impl Tree {
    /// The tree of a database that [`walk`] checked.
    /// The file's bytes are cut down to the tree in place (no copy of it
    /// next to the whole file).
    pub(super) fn of(
        mut bytes: Vec<u8>,
        node_count: usize,
        record_size: u16,
        ip_version: u16,
    ) -> Tree {
        let node_bytes = usize::from(record_size) / 4;
        bytes.truncate(node_count * node_bytes);
        let mut tree = Tree {
            nodes: bytes.into_boxed_slice(),
            node_count,
            record_size,
            ip_version,
            ipv4_start: 0,
            ipv4_depth: 0,
        };
        if ip_version == 6 {
            let mut node = 0;
            let mut depth = 0;
            while depth < 96 && node < node_count {
                node = tree.read(node, 0);
                depth += 1;
            }
            (tree.ipv4_start, tree.ipv4_depth) = (node, depth);
        }
        tree
    }

    fn read(&self, node: usize, side: usize) -> usize {
        record(&self.nodes, self.record_size, node, side)
    }

    /// Bytes held.
    pub(super) fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Looks `ip` up: the data offset of its record (`None`: no record)
    /// and the prefix length of its network, as maxminddb's
    /// `Reader::lookup` and `LookupResult::network` give them (an IPv4
    /// address in an IPv6 tree counts from the IPv4 subtree). `None` for
    /// an IPv6 address in an IPv4 database.
    pub(super) fn lookup(&self, ip: IpAddr) -> Option<(Option<usize>, u8)> {
        let (start, bits, len) = match ip {
            IpAddr::V4(v4) => (self.ipv4_start, u128::from(u32::from(v4)) << 96, 32),
            IpAddr::V6(_) if self.ip_version == 4 => return None,
            IpAddr::V6(v6) => (0, u128::from(v6), 128),
        };
        let mut node = start;
        let mut depth: u8 = len;
        for i in 0..len {
            if node >= self.node_count {
                depth = i;
                break;
            }
            node = self.read(node, ((bits >> (127 - u32::from(i))) & 1) as usize);
        }
        // An IPv6 tree without an IPv4 subtree (a leaf above it): the
        // network is the IPv6 one met on the way down.
        let prefix = match ip {
            IpAddr::V4(_) if self.ip_version == 6 && self.ipv4_start >= self.node_count => {
                self.ipv4_depth + depth
            }
            _ => depth,
        };
        let offset = (node > self.node_count).then(|| node - self.node_count - SEPARATOR);
        Some((offset, prefix))
    }
}

/// Where the metadata marker starts (the last one, within the format's
/// limit from the end of the file).
fn metadata_marker(bytes: &[u8]) -> Option<usize> {
    let from = bytes
        .len()
        .saturating_sub(METADATA_MAX + METADATA_MARKER.len());
    bytes[from..]
        .windows(METADATA_MARKER.len())
        .rposition(|w| w == METADATA_MARKER)
        .map(|at| from + at)
}
