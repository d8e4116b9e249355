//! GeoIP: where a client is.
//!
//! Owns: loading MaxMind-format databases (GeoIP2/GeoLite2 City or Country,
//! DB-IP lite) fully into memory, checking them before use, and looking an
//! address up. Pure lookups over an immutable reader; loading happens off
//! the query path (at start, on reload, when the file is replaced).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
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
pub struct GeoDb {
    reader: maxminddb::Reader<Vec<u8>>,
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
        Ok(GeoDb {
            database_type: reader.metadata().database_type.clone(),
            build_epoch: reader.metadata().build_epoch,
            reader,
            path: path.to_path_buf(),
            modified,
        })
    }

    /// Looks `ip` up. `None` when the database cannot say anything (an IPv6
    /// address in an IPv4-only database, a lookup error).
    pub fn lookup(&self, ip: IpAddr) -> Option<GeoRecord> {
        let ip = ip.to_canonical();
        let result = self.reader.lookup(ip).ok()?;
        let prefix = result.network().ok()?.prefix();
        let record: Option<Record<'_>> = result.decode().ok().flatten();
        let Some(record) = record else {
            return Some(GeoRecord {
                prefix,
                ..GeoRecord::default()
            });
        };
        let country = record
            .country
            .and_then(|c| c.iso_code)
            .or_else(|| record.registered_country.and_then(|c| c.iso_code))
            .and_then(code);
        Some(GeoRecord {
            country,
            continent: record.continent.and_then(|c| c.code).and_then(code),
            coords: record.location.and_then(|l| l.latitude.zip(l.longitude)),
            prefix,
        })
    }
}

/// Great-circle distance in kilometres (haversine).
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6371.0;
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().asin()
}

/// Round-trip time a client at that distance can expect: light in fibre
/// covers about 200 km per ms, and real paths are about 1.5x the great
/// circle, so ~1 ms of RTT per 67 km.
pub fn rtt_ms_for_km(km: f64) -> f64 {
    km * 2.0 * 1.5 / 200.0
}

/// The EU and EEA member states: the built-in client group `eu`.
pub const EU_EEA: [&str; 30] = [
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", // EU-27
    "IS", "LI", "NO", // EEA
];

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
    }
}
