//! How long a GeoIP database takes to load, and to compile into the table
//! of places that query-time lookups read (`geo::GeoDb`), and what a lookup
//! costs before and after. Speed is measured here, never asserted in tests.
//!
//!   cargo run --release --example geoip-table -- [FILE]
//!
//! FILE: a GeoIP2/GeoLite2 City or Country database. Without one, a
//! GeoLite2-City shaped one is written to `$TMPDIR/inferdns-large-city.mmdb`
//! first (`NETWORKS`, default 3,000,000 networks over `CITIES`, default
//! 120,000 city records with names in eight languages, like GeoLite2-City's
//! 3.4 million networks and ~130,000 distinct records).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use inferdns::geo::GeoDb;
use serde::Serialize;

#[derive(Serialize)]
struct Names<'a>(BTreeMap<&'a str, String>);

#[derive(Serialize)]
struct Country<'a> {
    geoname_id: u32,
    iso_code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_in_european_union: Option<bool>,
    names: Names<'a>,
}

#[derive(Serialize)]
struct Continent<'a> {
    code: &'a str,
    geoname_id: u32,
    names: Names<'a>,
}

#[derive(Serialize)]
struct Location {
    accuracy_radius: u16,
    latitude: f64,
    longitude: f64,
    time_zone: &'static str,
}

#[derive(Serialize)]
struct City<'a> {
    geoname_id: u32,
    names: Names<'a>,
}

#[derive(Serialize)]
struct Record<'a> {
    city: City<'a>,
    continent: Continent<'a>,
    country: Country<'a>,
    registered_country: Country<'a>,
    location: Location,
}

const LANGUAGES: [&str; 8] = ["de", "en", "es", "fr", "ja", "pt-BR", "ru", "zh-CN"];
const COUNTRIES: [(&str, &str, bool); 8] = [
    ("DE", "EU", true),
    ("FR", "EU", true),
    ("US", "NA", false),
    ("CA", "NA", false),
    ("JP", "AS", false),
    ("BR", "SA", false),
    ("GB", "EU", false),
    ("AU", "OC", false),
];

fn names(base: &str) -> Names<'static> {
    Names(
        LANGUAGES
            .iter()
            .map(|l| (*l, format!("{base} ({l})")))
            .collect(),
    )
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn write_large(path: &Path) {
    let networks = env("NETWORKS", 3_000_000);
    let cities = env("CITIES", 120_000).max(1);
    let started = Instant::now();
    let mut writer = mmdb_writer::Writer::builder("GeoIP2-City")
        .description(&[("en", "inferdns: synthetic, GeoLite2-City sized")])
        .build();
    let records: Vec<Record<'static>> = (0..cities)
        .map(|c| {
            let (iso, continent, eu) = COUNTRIES[(c % COUNTRIES.len() as u64) as usize];
            Record {
                city: City {
                    geoname_id: c as u32,
                    names: names(&format!("City {c}")),
                },
                continent: Continent {
                    code: continent,
                    geoname_id: 6_255_148,
                    names: names(continent),
                },
                country: Country {
                    geoname_id: 2_921_044,
                    iso_code: iso,
                    is_in_european_union: eu.then_some(true),
                    names: names(iso),
                },
                registered_country: Country {
                    geoname_id: 2_921_044,
                    iso_code: iso,
                    is_in_european_union: eu.then_some(true),
                    names: names(iso),
                },
                location: Location {
                    accuracy_radius: 20,
                    latitude: -60.0 + (c % 1200) as f64 / 10.0,
                    longitude: -180.0 + (c % 3600) as f64 / 10.0,
                    time_zone: "Europe/Berlin",
                },
            }
        })
        .collect();
    let v4 = networks * 4 / 5;
    for k in 0..v4 {
        // /24s from 1.0.0.0 upwards, skipping 127/8.
        let mut n = 0x0100_0000u32 + (k as u32) * 256;
        if n >> 24 >= 127 {
            n += 0x0100_0000;
        }
        let net = ipnet::IpNet::new(IpAddr::V4(Ipv4Addr::from(n)), 24).unwrap();
        writer
            .insert(net, &records[(k % cities) as usize])
            .expect("insert");
    }
    for k in 0..networks - v4 {
        let n = (0x2a00u128 << 112) | ((k as u128) << 80);
        let net = ipnet::IpNet::new(IpAddr::V6(Ipv6Addr::from(n)), 48).unwrap();
        writer
            .insert(net, &records[(k % cities) as usize])
            .expect("insert");
    }
    let bytes = writer.to_bytes().expect("serialise");
    std::fs::write(path, &bytes).expect("write");
    println!(
        "wrote {} ({:.1} MB, {networks} networks, {cities} city records) in {:.1} s",
        path.display(),
        bytes.len() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let path = std::env::temp_dir().join("inferdns-large-city.mmdb");
            if !path.exists() {
                write_large(&path);
            }
            path
        });
    let started = Instant::now();
    let db = GeoDb::load(&path).expect("load");
    let loaded = started.elapsed();
    println!("loaded and verified in {:.3} s", loaded.as_secs_f64());
    let probes: Vec<IpAddr> = (0..100_000u32)
        .map(|i| {
            IpAddr::V4(Ipv4Addr::from(
                0x0100_0000 + i.wrapping_mul(2_654_435_761) % 0x7e00_0000,
            ))
        })
        .collect();
    let time = |db: &GeoDb| {
        let t = Instant::now();
        let mut found = 0;
        for ip in &probes {
            found += usize::from(db.lookup(*ip).is_some_and(|r| r.country.is_some()));
        }
        (t.elapsed().as_nanos() as f64 / probes.len() as f64, found)
    };
    // Before the table is ready (it may already be, for a small database).
    let (before, _) = time(&db);
    let ready = db.wait_for_table(Duration::from_secs(120));
    let table_at = started.elapsed();
    let (after, found) = time(&db);
    println!(
        "table of places ready {:.3} s after the start of the load ({:.3} s after the load){}",
        table_at.as_secs_f64(),
        (table_at - loaded).as_secs_f64(),
        if ready {
            ""
        } else {
            " -- NOT READY after 120 s"
        }
    );
    println!(
        "lookup: {before:.0} ns decoding (first {} lookups, while the table was being built), {after:.0} ns from the table ({found} of {} placed)",
        probes.len(),
        probes.len()
    );
}
