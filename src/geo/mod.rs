//! GeoIP: where a client is.
//!
//! Owns: loading MaxMind-format databases (GeoIP2/GeoLite2 City or Country,
//! DB-IP lite) fully into memory, checking them before use, and looking an
//! address up. Pure lookups over an immutable reader; loading happens off
//! the query path (at start, on reload, when the file is replaced).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use serde::Deserialize;

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
/// every distinct record is decoded once, off the query path, into a
/// table keyed by its offset ([`Places`]); a lookup then decodes nothing.
/// The table depends on the database alone: it is built when a database is
/// loaded (a thread of its own; a GeoLite2-City takes about a second) and
/// never on a health change. Until it is ready, lookups decode as before:
/// startup is not held up, and both ways give the same record.
pub struct GeoDb {
    reader: Arc<maxminddb::Reader<Vec<u8>>>,
    places: Arc<OnceLock<Places>>,
    pub path: PathBuf,
    /// File modification time when loaded, to notice a replacement.
    pub modified: Option<SystemTime>,
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

impl GeoDb {
    /// Reads, parses and verifies the database at `path`.
    pub fn load(path: &Path) -> Result<GeoDb, GeoError> {
        let bytes = std::fs::read(path).map_err(|source| GeoError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Self::from_bytes(bytes, path, modified)
    }

    pub fn from_bytes(
        bytes: Vec<u8>,
        path: &Path,
        modified: Option<SystemTime>,
    ) -> Result<GeoDb, GeoError> {
        let invalid = |source| GeoError::Invalid {
            path: path.to_path_buf(),
            source,
        };
        let reader = maxminddb::Reader::from_source(bytes).map_err(invalid)?;
        // A truncated or corrupt file is refused here, not at query time.
        reader.verify().map_err(invalid)?;
        let reader = Arc::new(reader);
        let places = Arc::new(OnceLock::new());
        let (for_table, table) = (reader.clone(), places.clone());
        // If the thread cannot start, lookups keep decoding: slower, same answers.
        let _ = std::thread::Builder::new()
            .name("geoip-table".into())
            .spawn(move || {
                let _ = table.set(Places::build(&for_table));
            });
        Ok(GeoDb {
            database_type: reader.metadata().database_type.clone(),
            build_epoch: reader.metadata().build_epoch,
            reader,
            places,
            path: path.to_path_buf(),
            modified,
        })
    }

    /// Waits (up to `limit`) for the table of places; `true` once it is
    /// built. For tests and benchmarks: lookups never wait for it.
    pub fn wait_for_table(&self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while self.places.get().is_none() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    /// Looks `ip` up. `None` when the database cannot say anything (an IPv6
    /// address in an IPv4-only database, a lookup error).
    pub fn lookup(&self, ip: IpAddr) -> Option<GeoRecord> {
        let ip = ip.to_canonical();
        let result = self.reader.lookup(ip).ok()?;
        let prefix = result.network().ok()?.prefix();
        if let (Some(places), Some(offset)) = (self.places.get(), result.offset())
            && let Some(place) = places.get(offset)
        {
            return Some(GeoRecord { prefix, ..place });
        }
        Some(GeoRecord {
            prefix,
            ..decode(&result)
        })
    }

    /// Looks `ip` up by decoding its record, never from the table (tests).
    #[cfg(test)]
    fn lookup_decoding(&self, ip: IpAddr) -> Option<GeoRecord> {
        let result = self.reader.lookup(ip.to_canonical()).ok()?;
        let prefix = result.network().ok()?.prefix();
        Some(GeoRecord {
            prefix,
            ..decode(&result)
        })
    }
}

/// The place a lookup's record gives (prefix 0: the caller's to set);
/// nothing known when there is no record or it cannot be decoded.
fn decode<S: AsRef<[u8]>>(result: &maxminddb::LookupResult<'_, S>) -> GeoRecord {
    {
        let record: Option<Record<'_>> = result.decode().ok().flatten();
        let Some(record) = record else {
            return GeoRecord::default();
        };
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
    /// Walks every network of the database (the tree only) and decodes the
    /// record of each offset not seen yet.
    fn build<S: AsRef<[u8]>>(reader: &maxminddb::Reader<S>) -> Places {
        let mut seen: std::collections::HashMap<usize, u32> = std::collections::HashMap::new();
        let mut offsets = Vec::new();
        let mut places = Vec::new();
        if let Ok(networks) = reader.networks(maxminddb::WithinOptions::default()) {
            for result in networks.flatten() {
                let Some(offset) = result.offset() else {
                    continue;
                };
                seen.entry(offset).or_insert_with(|| {
                    offsets.push(offset);
                    places.push(decode(&result));
                    (places.len() - 1) as u32
                });
            }
        }
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
        table
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
        assert!(db.wait_for_table(std::time::Duration::from_secs(30)));
        let table = db.places.get().unwrap();
        assert!(!table.places.is_empty());
        let networks = db.reader.networks(Default::default()).unwrap();
        let mut checked = 0;
        for result in networks {
            let net = result.unwrap().network().unwrap();
            // The first and the last address of each network, and its aliases
            // (IPv4 through the mapped and 6to4 prefixes are the same records).
            for ip in [net.network(), net.broadcast()] {
                assert_eq!(db.lookup(ip), db.lookup_decoding(ip), "{ip} in {net}");
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
            assert_eq!(db.lookup(ip), db.lookup_decoding(ip), "{ip}");
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
