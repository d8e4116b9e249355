//! Writes `geoip/test-city.mmdb` from its readable source
//! `geoip/test-city.json`, byte for byte the same every time (the build
//! time comes from the source). Run: `cargo run --example make-test-geoip`.
//! `tests/geo.rs` checks that the committed database matches its source.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Source {
    database_type: String,
    description: String,
    build_epoch: u64,
    networks: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    network: ipnet::IpNet,
    country: Option<String>,
    /// `is_in_european_union` of the `country` record.
    country_in_eu: Option<bool>,
    registered_country: Option<String>,
    /// `is_in_european_union` of the `registered_country` record.
    registered_country_in_eu: Option<bool>,
    continent: Option<String>,
    lat: Option<f64>,
    lon: Option<f64>,
}

#[derive(Serialize)]
struct Country<'a> {
    iso_code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_in_european_union: Option<bool>,
}

#[derive(Serialize)]
struct ContinentCode<'a> {
    code: &'a str,
}

#[derive(Serialize)]
struct Location {
    latitude: f64,
    longitude: f64,
    accuracy_radius: u16,
}

/// The GeoIP2-City layout, only the fields inferdns reads.
#[derive(Serialize)]
struct CityRecord<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    country: Option<Country<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    registered_country: Option<Country<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    continent: Option<ContinentCode<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<Location>,
}

/// Builds the database bytes from the JSON source.
fn build(json: &str) -> Vec<u8> {
    let source: Source = serde_json::from_str(json).expect("geoip/test-city.json parses");
    let mut writer = mmdb_writer::Writer::builder(source.database_type.as_str())
        .description(&[("en", source.description.as_str())])
        .build_epoch(std::time::UNIX_EPOCH + std::time::Duration::from_secs(source.build_epoch))
        .build();
    for e in &source.networks {
        let record = CityRecord {
            country: e.country.as_deref().map(|c| Country {
                iso_code: c,
                is_in_european_union: e.country_in_eu,
            }),
            registered_country: e.registered_country.as_deref().map(|c| Country {
                iso_code: c,
                is_in_european_union: e.registered_country_in_eu,
            }),
            continent: e.continent.as_deref().map(|c| ContinentCode { code: c }),
            location: e.lat.zip(e.lon).map(|(latitude, longitude)| Location {
                latitude,
                longitude,
                accuracy_radius: 50,
            }),
        };
        writer.insert(e.network, &record).expect("network inserts");
    }
    writer.to_bytes().expect("database serialises")
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let json = std::fs::read_to_string(root.join("geoip/test-city.json")).expect("read the source");
    let bytes = build(&json);
    // `INFERDNS_GEOIP_OUT` writes elsewhere (the test that checks the committed file).
    let out = std::env::var_os("INFERDNS_GEOIP_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("geoip/test-city.mmdb"));
    std::fs::write(&out, &bytes).expect("write the database");
    println!("wrote {} ({} bytes)", out.display(), bytes.len());
}
