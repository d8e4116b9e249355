//! GeoIP: where a client is.
//!
//! Owns: loading MaxMind-format databases (GeoIP2/GeoLite2 City or Country,
//! DB-IP lite) fully into memory, checking them before use, and looking an
//! address up. Pure lookups over an immutable reader; loading happens off
//! the query path (at start, on reload, when the file is replaced).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod file;
mod tree;

pub use file::FileKey;

/// A two-letter code (ISO 3166 country or continent), uppercase ASCII.
pub type Code = [u8; 2];

/// Parses a two-letter code, uppercasing it.
pub fn code(s: &str) -> Option<Code> {
    let b = s.as_bytes();
    (b.len() == 2 && b.iter().all(u8::is_ascii_alphabetic))
        .then(|| [b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()])
}

pub fn code_str(c: &Code) -> &str {
    std::str::from_utf8(c).unwrap_or("??")
}

/// What a database says about one address.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GeoRecord {
    /// `country`, else `registered_country`; `None` is an unknown location.
    pub country: Option<Code>,
    pub continent: Option<Code>,
    /// (latitude, longitude) in degrees.
    pub coords: Option<(f64, f64)>,
    /// Prefix length of the database network that holds the address.
    pub prefix: u8,
    /// The database flags the place `is_in_european_union` (on the same
    /// record `country` comes from: `country`, else `registered_country`).
    pub eu: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot read GeoIP database {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("GeoIP database {path} is not a valid MaxMind database: {source}")]
    Invalid {
        path: PathBuf,
        source: maxminddb::MaxMindDbError,
    },
}

/// A database loaded into memory (never memory-mapped: a file replaced or
/// truncated under us cannot hurt a running server).
///
/// Lookups walk the database's own search tree (a longest-prefix match,
/// which gives the network and its prefix) and then read the place of the
/// record the network points at. Decoding that record (a map of names in
/// eight languages for a City database) was most of a lookup's cost, so
/// every distinct record is decoded once, when the database is loaded,
/// into a table keyed by its offset ([`Places`]); a lookup decodes nothing.
///
/// Loading is one pass ([`tree::walk`]): every node of the search tree is
/// read once, every pointer checked against the data section, and every
/// record a lookup can end on decoded for the table, strictly (a record
/// that does not decode refuses the database). That is the check
/// maxminddb's `verify` makes, on what lookups can reach, and the table
/// with it, in about a third of the time the two took apart. A database is
/// never used before it is checked; a lookup that ends on a record the
/// walk did not see (impossible for a checked tree) is an unknown location.
pub struct GeoDb {
    /// The search tree alone: the data section is decoded into `places`
    /// at load and not kept (a GeoLite2-City's is most of its 60-odd MB).
    tree: tree::Tree,
    /// The file's length and a digest of its bytes, to tell a file with
    /// the same bytes from a changed one without keeping them.
    digest: (usize, u64),
    places: Places,
    pub path: PathBuf,
    /// The file it was read from (device, inode, size, times), to tell a
    /// replaced file from the same one.
    pub file: Option<FileKey>,
    pub database_type: String,
    pub build_epoch: u64,
}

impl std::fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDb")
            .field("path", &self.path)
            .field("database_type", &self.database_type)
            .field("build_epoch", &self.build_epoch)
            .finish()
    }
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
    /// MaxMind and DB-IP set it on EU members and on EU territories that
    /// have codes of their own (AX, GF, MQ, ...); not on the EEA.
    is_in_european_union: Option<bool>,
}

#[derive(Deserialize)]
struct ContinentCode<'a> {
    #[serde(borrow)]
    code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Location {
    latitude: Option<f64>,
    longitude: Option<f64>,
}

/// The fields of the City/Country layout we read; everything else is skipped.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow)]
    registered_country: Option<IsoCode<'a>>,
    #[serde(borrow)]
    continent: Option<ContinentCode<'a>>,
    location: Option<Location>,
}

/// What [`GeoDb::reload`] found at the path.
#[derive(Debug)]
pub enum Reloaded {
    /// A new database, checked.
    New(Box<GeoDb>),
    /// The file is another one (its key changed) with the same bytes as the
    /// database in use (a `touch`, a copy, an identical download): nothing
    /// to check again.
    Same(FileKey),
}

impl GeoDb {
    /// Reads, parses and checks the database at `path`.
    pub fn load(path: &Path) -> Result<GeoDb, GeoError> {
        let (bytes, file) = read(path)?;
        Self::from_bytes(bytes, path, file)
    }

    /// Reads the database at `path` again for a reload or a replaced file:
    /// when its bytes are those of `current`, says so and checks nothing
    /// (comparing 66 MB in memory takes milliseconds; checking, a second).
    pub fn reload(path: &Path, current: Option<&GeoDb>) -> Result<Reloaded, GeoError> {
        let (bytes, file) = read(path)?;
        if let (Some(current), Some(file)) = (current, file)
            && current.path == path
            && current.digest == digest(&bytes)
        {
            return Ok(Reloaded::Same(file));
        }
        Self::from_bytes(bytes, path, file).map(|db| Reloaded::New(Box::new(db)))
    }

    pub fn from_bytes(
        bytes: Vec<u8>,
        path: &Path,
        file: Option<FileKey>,
    ) -> Result<GeoDb, GeoError> {
        let invalid = |source| GeoError::Invalid {
            path: path.to_path_buf(),
            source,
        };
        let refuse = |why: String| invalid(maxminddb::MaxMindDbError::invalid_database(why));
        let reader = maxminddb::Reader::from_source(bytes.as_slice()).map_err(invalid)?;
        let metadata = reader.metadata();
        if metadata.database_type.is_empty() || metadata.description.is_empty() {
            return Err(refuse(
                "the metadata has no database type or description".into(),
            ));
        }
        // A truncated or corrupt file is refused here, not at query time.
        let leaves = tree::walk(
            bytes.as_ref(),
            metadata.node_count as usize,
            metadata.record_size,
            metadata.ip_version,
        )
        .map_err(refuse)?;
        let places = Places::decode(&reader, &leaves).map_err(invalid)?;
        let (database_type, build_epoch) = (metadata.database_type.clone(), metadata.build_epoch);
        let (nodes, record_size, ip_version) = (
            metadata.node_count as usize,
            metadata.record_size,
            metadata.ip_version,
        );
        drop(reader);
        let digest = digest(&bytes);
        Ok(GeoDb {
            database_type,
            build_epoch,
            tree: tree::Tree::of(bytes, nodes, record_size, ip_version),
            digest,
            places,
            path: path.to_path_buf(),
            file,
        })
    }

    /// Distinct records in the table of places (tests, benchmarks).
    pub fn places(&self) -> usize {
        self.places.places.len()
    }

    /// Looks `ip` up. `None` when the database cannot say anything (an IPv6
    /// address in an IPv4-only database, a lookup error).
    pub fn lookup(&self, ip: IpAddr) -> Option<GeoRecord> {
        let (offset, prefix) = self.tree.lookup(ip.to_canonical())?;
        let place = match offset {
            None => GeoRecord::default(),
            // Every record a lookup can end on is in the table (checked at
            // load); one that is not is an unknown location, never a guess.
            Some(offset) => self.places.get(offset)?,
        };
        Some(GeoRecord { prefix, ..place })
    }

    /// Bytes the database holds in memory: its tree and table of places.
    pub fn memory(&self) -> usize {
        self.tree.size() + self.places.memory()
    }
}

/// Looks `ip` up in `reader` by decoding its record (what the table and
/// the tree must agree with; tests).
#[cfg(test)]
fn lookup_decoding<S: AsRef<[u8]>>(reader: &maxminddb::Reader<S>, ip: IpAddr) -> Option<GeoRecord> {
    let result = reader.lookup(ip.to_canonical()).ok()?;
    let prefix = result.network().ok()?.prefix();
    Some(GeoRecord {
        prefix,
        ..decode(&result)
    })
}

/// The length and a 64-bit digest of `bytes`: a reload's "same file"
/// check (a word at a time, some 60 MB in a few milliseconds). Not
/// cryptographic: whoever can write the database file decides locations
/// anyway.
fn digest(bytes: &[u8]) -> (usize, u64) {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(29);
    }
    for b in words.remainder() {
        h = (h ^ u64::from(*b)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    }
    (bytes.len(), crate::fleet::mix(h, bytes.len() as u64))
}

/// The place a lookup's record gives (prefix 0: the caller's to set);
/// nothing known when there is no record or it cannot be decoded.
#[cfg(test)]
fn decode<S: AsRef<[u8]>>(result: &maxminddb::LookupResult<'_, S>) -> GeoRecord {
    match result.decode::<Record<'_>>() {
        Ok(Some(record)) => place(record),
        _ => GeoRecord::default(),
    }
}

/// The place a record gives (prefix 0: the caller's to set).
fn place(record: Record<'_>) -> GeoRecord {
    // The country code and its EU flag come from the same record.
    let place = match record.country {
        Some(c) if c.iso_code.is_some() => Some(c),
        country => record.registered_country.or(country),
    };
    let country = place.as_ref().and_then(|c| c.iso_code).and_then(code);
    GeoRecord {
        country,
        continent: record.continent.and_then(|c| c.code).and_then(code),
        coords: record.location.and_then(|l| l.latitude.zip(l.longitude)),
        prefix: 0,
        eu: place.and_then(|c| c.is_in_european_union) == Some(true),
    }
}

/// Reads the file at `path` and the key of what was read (the open file's,
/// so a rename between the two cannot mix them up).
fn read(path: &Path) -> Result<(Vec<u8>, Option<FileKey>), GeoError> {
    let failed = |source| GeoError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(failed)?;
    let file = f.metadata().ok().map(|m| FileKey::of(&m));
    let mut bytes = Vec::with_capacity(file.map_or(0, |k| k.size as usize));
    std::io::Read::read_to_end(&mut f, &mut bytes).map_err(failed)?;
    Ok((bytes, file))
}

/// Every distinct record of a database, decoded once, by its offset in
/// the data section: an open-addressing table (at most half full) of
/// indexes into `places`. Its size is the database's (a GeoLite2-City has
/// some 100,000 distinct records over millions of networks).
struct Places {
    slots: Vec<u32>,
    offsets: Vec<usize>,
    places: Vec<GeoRecord>,
    shift: u32,
}

impl Places {
    /// Decodes the record of every leaf of the tree, strictly: a record
    /// that does not decode as a City/Country place refuses the database.
    /// Two threads share the work when there is a lot of it.
    fn decode<S: AsRef<[u8]> + Sync>(
        reader: &maxminddb::Reader<S>,
        leaves: &[tree::Leaf],
    ) -> Result<Places, maxminddb::MaxMindDbError> {
        let one = |leaves: &[tree::Leaf]| -> Result<Vec<GeoRecord>, maxminddb::MaxMindDbError> {
            leaves
                .iter()
                .map(|leaf| {
                    let result = reader.lookup(leaf.address)?;
                    if result.offset() != Some(leaf.offset) {
                        return Err(maxminddb::MaxMindDbError::invalid_database(format!(
                            "the lookup of {} does not end where the tree walk did",
                            leaf.address
                        )));
                    }
                    let record: Record<'_> = result.decode()?.ok_or_else(|| {
                        maxminddb::MaxMindDbError::invalid_database("a leaf without a record")
                    })?;
                    Ok(place(record))
                })
                .collect()
        };
        let places = if leaves.len() < 20_000 {
            one(leaves)?
        } else {
            let (a, b) = leaves.split_at(leaves.len() / 2);
            let (a, b) = std::thread::scope(|s| {
                let second = s.spawn(|| one(b));
                let first = one(a);
                // A panic in a decoder thread is a bug: let it abort as anywhere.
                (first, second.join().expect("GeoIP decoder thread"))
            });
            let mut a = a?;
            a.extend(b?);
            a
        };
        let offsets: Vec<usize> = leaves.iter().map(|l| l.offset).collect();
        let bits = (offsets.len() * 2)
            .next_power_of_two()
            .max(8)
            .trailing_zeros();
        let mut table = Places {
            slots: vec![0; 1 << bits],
            offsets,
            places,
            shift: 64 - bits,
        };
        for i in 0..table.offsets.len() {
            let mut at = table.slot(table.offsets[i]);
            while table.slots[at] != 0 {
                at = (at + 1) & (table.slots.len() - 1);
            }
            table.slots[at] = i as u32 + 1;
        }
        Ok(table)
    }

    fn memory(&self) -> usize {
        self.slots.len() * 4
            + self.offsets.len() * std::mem::size_of::<usize>()
            + self.places.len() * std::mem::size_of::<GeoRecord>()
    }

    fn slot(&self, offset: usize) -> usize {
        ((offset as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    fn get(&self, offset: usize) -> Option<GeoRecord> {
        let mut at = self.slot(offset);
        loop {
            let i = self.slots[at] as usize;
            if i == 0 {
                return None;
            }
            if self.offsets[i - 1] == offset {
                return Some(self.places[i - 1]);
            }
            at = (at + 1) & (self.slots.len() - 1);
        }
    }
}

const EARTH_RADIUS_KM: f64 = 6371.0;

/// A place on the globe as a unit vector (x, y, z on a sphere of radius 1).
/// The trigonometry is done once, where the place is known (a region's
/// location when the snapshot is built, a client's when it is located), so
/// that the distance between two points costs one square root and one
/// arcsine on the query path, where the haversine formula took four sines
/// and cosines more for every candidate region.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Point([f64; 3]);

impl Point {
    /// The point at latitude and longitude in degrees.
    pub fn new((lat, lon): (f64, f64)) -> Point {
        let (lat, lon) = (lat.to_radians(), lon.to_radians());
        Point([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()])
    }

    /// Great-circle distance in kilometres: from the chord (the straight
    /// line between the two points, accurate for near and far points
    /// alike, never negative), the angle it subtends.
    pub fn km_to(&self, other: &Point) -> f64 {
        let [a, b, c] = self.0;
        let [x, y, z] = other.0;
        let chord = ((a - x) * (a - x) + (b - y) * (b - y) + (c - z) * (c - z)).sqrt();
        2.0 * EARTH_RADIUS_KM * (chord / 2.0).min(1.0).asin()
    }
}

/// Great-circle distance in kilometres between two (latitude, longitude)
/// pairs in degrees.
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    Point::new(a).km_to(&Point::new(b))
}

/// Round-trip time a client at that distance can expect: light in fibre
/// covers about 200 km per ms, and real paths are about 1.5x the great
/// circle, so ~1 ms of RTT per 67 km.
pub fn rtt_ms_for_km(km: f64) -> f64 {
    km * 2.0 * 1.5 / 200.0
}

/// The built-in client group `eu`: every ISO 3166-1 code under which a
/// database may place a client on EU or EEA territory. A client is in the
/// group when its code is on this list or when the database flags it
/// `is_in_european_union` (see [`GeoRecord::eu`]); network overrides carry
/// no flag, so for them the list alone decides.
///
/// Deliberately not on the list: the overseas countries and territories
/// associated with the EU but outside it (GL, FO, NC, PF, WF, PM, BL, TF,
/// AW, CW, SX, BQ), Svalbard and Jan Mayen and Bouvet Island (SJ, BV: Norway,
/// outside the EEA agreement), GB and GI (left in 2020), the Crown
/// dependencies (IM, JE, GG), CH, and the microstates AD, MC, SM, VA.
pub const EU_EEA: &[&str] = &[
    // The 27 member states of the European Union.
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE",
    // Parts of the EU with ISO codes of their own, which GeoIP databases use:
    // Åland (Finland); the French outermost regions French Guiana,
    // Guadeloupe, Martinique, Réunion, Mayotte and Saint-Martin. (The
    // Azores, Madeira, the Canaries, Ceuta and Melilla have no ordinary
    // ISO 3166-1 code; databases place them in PT and ES.)
    "AX", "GF", "GP", "MQ", "RE", "YT", "MF",
    // Exceptionally reserved ISO codes that some sources use for EU
    // territory: the Canary Islands and Ceuta and Melilla (Spain), and EU
    // for the Union itself (registries use it for networks registered
    // EU-wide). A database that says only "EU" cannot rule out an EU client,
    // so residency keeps it in.
    "IC", "EA", "EU", // The EEA members outside the EU (databases do not flag them).
    "IS", "LI", "NO",
];

/// The code is on the [`EU_EEA`] list.
pub fn in_eu_eea(c: Code) -> bool {
    EU_EEA.iter().any(|m| m.as_bytes() == c)
}

/// Continent codes used by MaxMind and DB-IP.
pub const CONTINENTS: [&str; 7] = ["AF", "AN", "AS", "EU", "NA", "OC", "SA"];

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> GeoDb {
        GeoDb::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("geoip/test-city.mmdb")).unwrap()
    }

    #[test]
    fn looks_up_v4_and_v6_with_their_networks() {
        let db = db();
        let fr = db.lookup("10.1.70.1".parse().unwrap()).unwrap();
        assert_eq!(fr.country, code("FR"));
        assert_eq!(fr.continent, code("EU"));
        assert_eq!(fr.prefix, 16);
        assert_eq!(fr.coords, Some((48.86, 2.35)));
        let de = db.lookup("192.0.2.200".parse().unwrap()).unwrap();
        assert_eq!((de.country, de.prefix), (code("DE"), 24));
        let jp = db.lookup("2001:db8:3::42".parse().unwrap()).unwrap();
        assert_eq!((jp.country, jp.prefix), (code("JP"), 48));
        // IPv4-mapped IPv6 is looked up as IPv4.
        let mapped = db.lookup("::ffff:10.5.0.9".parse().unwrap()).unwrap();
        assert_eq!((mapped.country, mapped.prefix), (code("CA"), 16));
    }

    #[test]
    fn the_table_of_places_gives_what_decoding_gives_for_every_network() {
        let db = db();
        assert!(db.places() > 5);
        let bytes =
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("geoip/test-city.mmdb"))
                .unwrap();
        let reader = maxminddb::Reader::from_source(bytes.as_slice()).unwrap();
        let networks = reader.networks(Default::default()).unwrap();
        let mut checked = 0;
        for result in networks {
            let net = result.unwrap().network().unwrap();
            // The first and the last address of each network, and its aliases
            // (IPv4 through the mapped and 6to4 prefixes are the same records).
            for ip in [net.network(), net.broadcast()] {
                assert_eq!(db.lookup(ip), lookup_decoding(&reader, ip), "{ip} in {net}");
                checked += 1;
            }
        }
        for ip in [
            "::ffff:10.1.70.1",
            "2002:a01:4601::1",
            "127.0.0.1",
            "::1",
            "2001:db8:ff::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(db.lookup(ip), lookup_decoding(&reader, ip), "{ip}");
        }
        assert!(checked > 20, "{checked}");
    }

    #[test]
    fn registered_country_fills_in_and_gaps_are_unknown() {
        let db = db();
        let gb = db.lookup("10.9.1.1".parse().unwrap()).unwrap();
        assert_eq!(
            gb.country,
            code("GB"),
            "registered_country when country is missing"
        );
        let only_continent = db.lookup("192.168.1.1".parse().unwrap()).unwrap();
        assert_eq!(
            (only_continent.country, only_continent.continent),
            (None, code("EU"))
        );
        // Loopback and 172.16/12 are not in the database: unknown, with the
        // network that holds them as the prefix.
        for ip in ["127.0.0.1", "172.16.5.5", "2001:db8:ff::1"] {
            let r = db.lookup(ip.parse().unwrap()).unwrap();
            assert_eq!(
                (r.country, r.continent, r.coords),
                (None, None, None),
                "{ip}"
            );
            assert!(r.prefix > 0, "{ip}: a network prefix, got {}", r.prefix);
        }
    }

    #[test]
    fn the_eu_flag_comes_from_the_record_the_country_comes_from() {
        let db = db();
        let at = |ip: &str| {
            let r = db.lookup(ip.parse().unwrap()).unwrap();
            (r.country.map(|c| code_str(&c).to_string()), r.eu)
        };
        let some = |c: &str, eu| (Some(c.to_string()), eu);
        assert_eq!(
            at("10.10.0.1"),
            some("AX", true),
            "Åland: own code, flagged"
        );
        assert_eq!(at("10.11.0.1"), some("MQ", true));
        assert_eq!(at("2001:db8:5::1"), some("MF", true));
        assert_eq!(
            at("10.12.0.1"),
            some("RE", true),
            "the flag of registered_country when it gives the code"
        );
        assert_eq!(
            at("10.15.0.1"),
            some("CH", false),
            "registered_country's flag does not count when country gives the code"
        );
        assert_eq!(at("10.13.0.1"), some("GL", false), "flag false");
        assert_eq!(at("10.3.0.1"), some("NO", false), "EEA: no flag");
        assert_eq!(at("10.9.0.1"), some("GB", false), "no flag");
        assert_eq!(at("192.0.2.1"), some("DE", true));
    }

    #[test]
    fn the_eu_list_holds_the_eu_its_territories_and_the_eea_and_nothing_else() {
        let mut sorted: Vec<&str> = EU_EEA.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), EU_EEA.len(), "no duplicates");
        assert_eq!(EU_EEA.len(), 27 + 7 + 3 + 3);
        assert!(
            EU_EEA
                .iter()
                .all(|c| code(c).is_some_and(|k| k == c.as_bytes()))
        );
        for member in [
            "DE", "FR", "ES", "AX", "GF", "GP", "MQ", "RE", "YT", "MF", "IC", "EA",
        ] {
            assert!(in_eu_eea(code(member).unwrap()), "{member}");
        }
        for eea in ["IS", "LI", "NO"] {
            assert!(in_eu_eea(code(eea).unwrap()), "{eea}");
        }
        // Associated overseas countries and territories, Norway's territories
        // outside the EEA, former members, neighbours.
        for outside in [
            "GL", "FO", "NC", "PF", "WF", "PM", "BL", "TF", "AW", "CW", "SX", "BQ", "SJ", "BV",
            "GB", "GI", "IM", "JE", "GG", "CH", "AD", "MC", "SM", "VA", "TR", "US",
        ] {
            assert!(!in_eu_eea(code(outside).unwrap()), "{outside}");
        }
    }

    #[test]
    fn corrupt_or_truncated_files_are_refused() {
        let good =
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("geoip/test-city.mmdb"))
                .unwrap();
        let truncated = good[..good.len() / 2].to_vec();
        assert!(matches!(
            GeoDb::from_bytes(truncated, Path::new("t.mmdb"), None),
            Err(GeoError::Invalid { .. })
        ));
        let mut corrupt = good.clone();
        for b in corrupt.iter_mut().take(400) {
            *b = b.wrapping_add(77);
        }
        assert!(GeoDb::from_bytes(corrupt, Path::new("c.mmdb"), None).is_err());
        assert!(matches!(
            GeoDb::load(Path::new("/nonexistent.mmdb")),
            Err(GeoError::Read { .. })
        ));
    }

    /// A small database: DE on 192.0.2.0/24 (and 2001:db8:1::/48 in IPv6
    /// trees), the record `odd` on 198.51.100.0/24.
    fn written(
        size: mmdb_writer::RecordSize,
        version: mmdb_writer::IpVersion,
        odd: serde_json::Value,
    ) -> Vec<u8> {
        let mut w = mmdb_writer::Writer::builder("GeoIP2-City")
            .description(&[("en", "inferdns unit test")])
            .record_size(size)
            .ip_version(version)
            .build();
        let de = serde_json::json!({
            "country": { "iso_code": "DE", "is_in_european_union": true },
            "continent": { "code": "EU" },
            "location": { "latitude": 50.11, "longitude": 8.68 },
        });
        w.insert("192.0.2.0/24".parse::<ipnet::IpNet>().unwrap(), &de)
            .unwrap();
        w.insert("198.51.100.0/24".parse::<ipnet::IpNet>().unwrap(), &odd)
            .unwrap();
        if version == mmdb_writer::IpVersion::V6 {
            w.insert("2001:db8:1::/48".parse::<ipnet::IpNet>().unwrap(), &de)
                .unwrap();
        }
        w.to_bytes().unwrap()
    }

    fn fr() -> serde_json::Value {
        serde_json::json!({ "country": { "iso_code": "FR" }, "continent": { "code": "EU" } })
    }

    #[test]
    fn every_record_size_and_ip_version_loads_and_looks_up() {
        use mmdb_writer::{IpVersion, RecordSize};
        for size in [RecordSize::Bits24, RecordSize::Bits28, RecordSize::Bits32] {
            for version in [IpVersion::V4, IpVersion::V6] {
                let what = format!("{size:?} {version:?}");
                let bytes = written(size, version, fr());
                let db = GeoDb::from_bytes(bytes.clone(), Path::new("t.mmdb"), None)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                // The tree alone finds what the reader over the whole file finds.
                let reader = maxminddb::Reader::from_source(bytes.as_slice()).unwrap();
                for ip in [
                    "192.0.2.9",
                    "198.51.100.1",
                    "203.0.113.1",
                    "0.0.0.0",
                    "255.255.255.255",
                    "2001:db8:1::5",
                    "2001:db8:2::5",
                    "::ffff:192.0.2.9",
                    "::",
                ] {
                    let ip: IpAddr = ip.parse().unwrap();
                    assert_eq!(db.lookup(ip), lookup_decoding(&reader, ip), "{what} {ip}");
                }
                assert_eq!(db.places(), 2, "{what}");
                let de = db.lookup("192.0.2.9".parse().unwrap()).unwrap();
                assert_eq!(
                    (de.country, de.continent, de.eu, de.prefix),
                    (code("DE"), code("EU"), true, 24),
                    "{what}"
                );
                assert_eq!(de.coords, Some((50.11, 8.68)), "{what}");
                let fr = db.lookup("198.51.100.1".parse().unwrap()).unwrap();
                assert_eq!((fr.country, fr.eu), (code("FR"), false), "{what}");
                let nowhere = db.lookup("203.0.113.1".parse().unwrap()).unwrap();
                assert_eq!(nowhere.country, None, "{what}");
                if version == IpVersion::V6 {
                    let v6 = db.lookup("2001:db8:1::5".parse().unwrap()).unwrap();
                    assert_eq!((v6.country, v6.prefix), (code("DE"), 48), "{what}");
                    let mapped = db.lookup("::ffff:192.0.2.9".parse().unwrap()).unwrap();
                    assert_eq!(mapped.country, code("DE"), "{what}");
                } else {
                    assert_eq!(db.lookup("2001:db8:1::5".parse().unwrap()), None, "{what}");
                }
            }
        }
    }

    #[test]
    fn a_tree_pointing_outside_its_data_or_a_record_that_is_no_place_is_refused() {
        use mmdb_writer::{IpVersion, RecordSize};
        let good = written(RecordSize::Bits32, IpVersion::V4, fr());
        let load = |bytes: Vec<u8>| GeoDb::from_bytes(bytes, Path::new("t.mmdb"), None);
        assert!(load(good.clone()).is_ok());
        let reader = maxminddb::Reader::from_source(good.clone()).unwrap();
        let nodes = reader.metadata().node_count as usize;
        // Every record of every node, in turn, made to point past the data
        // section: each one is refused, whichever node it is in (all are
        // reachable in a tree this small).
        let mut refused = 0;
        for at in 0..nodes * 2 {
            let mut bad = good.clone();
            bad[at * 4..at * 4 + 4].copy_from_slice(&u32::MAX.to_be_bytes());
            match load(bad) {
                Err(GeoError::Invalid { .. }) => refused += 1,
                Err(e) => panic!("record {at}: {e}"),
                Ok(_) => panic!("record {at}: a pointer past the data section was accepted"),
            }
        }
        assert_eq!(refused, nodes * 2);
        // The separator between the tree and the data section.
        let mut bad = good.clone();
        bad[nodes * 8 + 3] = 1;
        assert!(load(bad).is_err(), "separator");
        // A reachable record whose country is not a map: not a City or
        // Country record. (maxminddb's verify accepted it, and the lookups
        // that reached it knew nowhere.)
        let odd = serde_json::json!({ "country": "DE" });
        assert!(matches!(
            load(written(RecordSize::Bits28, IpVersion::V6, odd)),
            Err(GeoError::Invalid { .. })
        ));
    }

    #[test]
    fn a_reload_of_the_same_bytes_is_not_checked_again_and_a_changed_file_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("city.mmdb");
        let good =
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("geoip/test-city.mmdb"))
                .unwrap();
        std::fs::write(&path, &good).unwrap();
        let db = GeoDb::load(&path).unwrap();
        assert_eq!(db.file, FileKey::at(&path));
        // The same bytes renamed into place: another file, the same database.
        let next = dir.path().join("next.mmdb");
        std::fs::write(&next, &good).unwrap();
        std::fs::rename(&next, &path).unwrap();
        let key = FileKey::at(&path).unwrap();
        assert_ne!(Some(key), db.file, "a new inode is another key");
        match GeoDb::reload(&path, Some(&db)).unwrap() {
            Reloaded::Same(file) => assert_eq!(file, key),
            Reloaded::New(_) => panic!("the same bytes were checked again"),
        }
        // Different bytes are a new database, checked; broken ones refused.
        let other = written(
            mmdb_writer::RecordSize::Bits28,
            mmdb_writer::IpVersion::V6,
            fr(),
        );
        std::fs::write(&path, &other).unwrap();
        match GeoDb::reload(&path, Some(&db)).unwrap() {
            Reloaded::New(new) => {
                assert_eq!(new.places(), 2);
                assert_eq!(new.file, FileKey::at(&path));
            }
            Reloaded::Same(_) => panic!("different bytes taken for the same"),
        }
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(GeoDb::reload(&path, Some(&db)).is_err());
    }

    #[test]
    fn distances_and_rtt_estimates() {
        let frankfurt = (50.11, 8.68);
        let paris = (48.86, 2.35);
        let tokyo = (35.69, 139.69);
        let d = distance_km(frankfurt, paris);
        assert!((470.0..490.0).contains(&d), "{d}");
        let d = distance_km(frankfurt, tokyo);
        assert!((9300.0..9400.0).contains(&d), "{d}");
        assert_eq!(distance_km(tokyo, tokyo), 0.0);
        assert!((rtt_ms_for_km(1000.0) - 15.0).abs() < 1e-9);
        // Antipodes and near neighbours: the chord form stays exact at
        // both ends, where the dot product of the vectors would not.
        let d = distance_km((0.0, 0.0), (0.0, 180.0));
        assert!(
            (d - std::f64::consts::PI * EARTH_RADIUS_KM).abs() < 1e-6,
            "{d}"
        );
        let d = distance_km((50.0, 8.0), (50.0, 8.0001));
        assert!((d - 0.007_147).abs() < 1e-5, "{d}");
        // The same as the haversine formula it replaced, to a metre.
        let haversine = |a: (f64, f64), b: (f64, f64)| {
            let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
            let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
            let h = ((lat2 - lat1) / 2.0).sin().powi(2)
                + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
            2.0 * EARTH_RADIUS_KM * h.sqrt().asin()
        };
        for a in [
            frankfurt,
            paris,
            tokyo,
            (-33.9, 18.4),
            (64.1, -21.9),
            (-41.3, 174.8),
        ] {
            for b in [
                frankfurt,
                paris,
                tokyo,
                (-33.9, 18.4),
                (64.1, -21.9),
                (-41.3, 174.8),
            ] {
                assert!(
                    (distance_km(a, b) - haversine(a, b)).abs() < 1e-3,
                    "{a:?} {b:?}"
                );
            }
        }
    }
}
