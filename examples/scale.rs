//! Scale bench helper (`benches/scale.sh`): writes large configs, measures
//! the publisher in-process, serves many simulated regions on loopback and
//! writes a GeoLite2-City-sized GeoIP database. Loopback only; every
//! command ends by itself.
//!
//!   scale gen --regions 1000 --services 10000 --dir DIR [--port 9] [--geoip FILE] [--interval 1s]
//!   scale build --config DIR/inferdns.toml [--changes 50]
//!   scale serve --regions 1000 --port 18600 --seconds 120 [--down-after 30 --down 100]
//!   scale geoip --out FILE [--networks 3000000]
//!   scale first-answer --dns 127.0.0.1:5353 --name NAME --seconds 30
//!   scale probe-cost --regions 100 --port 18600 --n 20000 [--layer alive|models]
//!
//! Every region has one endpoint, `127.1.x.y` (region `i`: x = i / 250,
//! y = i % 250 + 1), probed on `--port` (9: refused). Services: 80 %
//! failover over two tiers of one region each, 8 % capacity and 6 % cost
//! over three regions, 6 % proximity over three regions; one in ten of the
//! failover services has a residency rule.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferdns::health::{Layer, Payload, ProbeError, ProbeOutcome, ProbeReport};
use inferdns::metrics::Metrics;
use inferdns::publish::{Msg, Publisher};

const MODEL: &str = "llama-3.1-8b-instruct";

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str, default: usize) -> usize {
    arg(args, name).map_or(default, |v| v.parse().expect("a number"))
}

/// The loopback address of region `i`'s endpoint.
fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        1 + (i / 62_500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250 + 1) as u8,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("gen") => gen_config(&args),
        Some("build") => build(&args),
        Some("serve") => serve(&args),
        Some("geoip") => geoip(&args),
        Some("first-answer") => first_answer(&args),
        Some("probe-cost") => probe_cost(&args),
        _ => {
            eprintln!("usage: scale gen|build|serve|geoip|first-answer ... (see the source)");
            std::process::exit(2);
        }
    }
}

fn gen_config(args: &[String]) {
    let regions = num(args, "--regions", 1000);
    let services = num(args, "--services", 10_000);
    let dir = PathBuf::from(arg(args, "--dir").expect("--dir"));
    let port = num(args, "--port", 9);
    let interval = arg(args, "--interval").unwrap_or_else(|| "1s".into());
    let geoip = arg(args, "--geoip").unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/test-city.mmdb").to_string()
    });
    std::fs::create_dir_all(dir.join("policies")).expect("create the config directory");
    let mut main = String::new();
    main.push_str(
        r#"policy-dir = "policies"

[server]
dns-listen = ["127.0.0.1:0"]
admin-listen = "127.0.0.1:0"
startup-grace = "5s"

[zone]
apex = "inference.example.com"
soa = { primary = "ns1.inference.example.com", contact = "hostmaster.inference.example.com" }
ns = [{ name = "ns1.inference.example.com", addresses = ["127.0.0.1"] }]

"#,
    );
    main.push_str(&format!("[geoip]\ndatabase = \"{geoip}\"\n\n"));
    for i in 0..regions {
        // Spread over the globe; even regions are in the EU jurisdiction.
        let lat = -60.0 + (i * 37 % 120) as f64;
        let lon = -180.0 + (i * 53 % 360) as f64;
        let tag = if i % 2 == 0 { "eu" } else { "us" };
        main.push_str(&format!(
            "[regions.r{i}]\nlocation = {{ lat = {lat:.1}, lon = {lon:.1} }}\njurisdictions = [\"{tag}\"]\ncapacity = {{ gpus = {}, cost = {}.0 }}\nendpoints = [{{ address = \"{}\", port = {port} }}]\nprobe = {{ interval = \"{interval}\", timeout = \"800ms\", models-path = \"/v1/models\", models-interval = \"{interval}\" }}\n\n",
            1 + i % 8,
            1 + i % 5,
            address(i),
        ));
    }
    std::fs::write(dir.join("inferdns.toml"), main).expect("write inferdns.toml");
    for j in 0..services {
        let a = j % regions;
        let b = (a + 1 + j / regions) % regions;
        let c = (a + 2 + 3 * (j / regions)) % regions;
        let (b, c) = (
            if b == a { (a + 1) % regions } else { b },
            if c == a || c == b {
                (a + regions / 2 + 1) % regions
            } else {
                c
            },
        );
        let body = match j % 50 {
            0..=3 => format!(
                "tiers = [[\"r{a}\", \"r{b}\", \"r{c}\"]]\nstrategy = \"capacity\"\nmodel = \"{MODEL}\"\n"
            ),
            4..=6 => format!(
                "tiers = [[\"r{a}\", \"r{b}\", \"r{c}\"]]\nstrategy = \"cost\"\nmodel = \"{MODEL}\"\n"
            ),
            7..=9 => format!(
                "tiers = [[\"r{a}\", \"r{b}\", \"r{c}\"]]\nstrategy = \"proximity\"\nmodel = \"{MODEL}\"\n"
            ),
            10..=14 => format!(
                "tiers = [[\"r{}\"], [\"r{}\"]]\nmodel = \"{MODEL}\"\nresidency = {{ rules = [{{ clients = [\"eu\"], allow = [\"eu\"] }}], unknown-location = \"deny\" }}\n",
                a - a % 2,
                (a - a % 2 + 2) % regions
            ),
            _ => format!("tiers = [[\"r{a}\"], [\"r{b}\"]]\nmodel = \"{MODEL}\"\n"),
        };
        std::fs::write(dir.join(format!("policies/s{j}.toml")), body).expect("write a policy");
    }
    println!(
        "wrote {} ({regions} regions, {services} services)",
        dir.display()
    );
}

/// Resident set size of this process now and at its peak, in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn report(endpoint: u64, layer: Layer, result: Result<Payload, ProbeError>) -> Msg {
    Msg::Probe(ProbeReport {
        endpoint,
        layer,
        outcome: ProbeOutcome {
            result,
            elapsed: Duration::from_millis(1),
        },
    })
}

fn up(endpoint: u64) -> [Msg; 2] {
    [
        report(endpoint, Layer::Alive, Ok(Payload::Alive)),
        report(
            endpoint,
            Layer::Models,
            Ok(Payload::Models(vec![MODEL.to_string()])),
        ),
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// In-process: the loader, the first snapshot, a full rebuild, rebuilds
/// after one endpoint changes, and one rebuild after a tenth of the
/// endpoints changed together. Prints one JSON line.
fn build(args: &[String]) {
    let path = PathBuf::from(arg(args, "--config").expect("--config"));
    let changes = num(args, "--changes", 50);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let _guard = rt.enter();
    let t = Instant::now();
    let config = inferdns::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let load_ms = ms(t.elapsed());
    let rss_config = rss_mib().0;
    let geo = config
        .geo
        .database
        .as_ref()
        .map(|p| Arc::new(inferdns::geo::GeoDb::load(p).unwrap_or_else(|e| panic!("{e}"))));
    let endpoints: usize = config.regions.iter().map(|r| r.endpoints.len()).sum();
    let services = config.services.len();
    let ids: Vec<u64> = (1..=endpoints as u64).collect();
    let t = Instant::now();
    let (mut publisher, snapshot, _first) =
        Publisher::new(Arc::new(config), ids.clone(), geo, Metrics::new());
    let first_ms = ms(t.elapsed());
    let rss_first = rss_mib().0;
    // Every endpoint refuses (the issue's case), then is up.
    for id in &ids {
        publisher.apply(report(*id, Layer::Alive, Err(ProbeError::Refused)));
    }
    let t = Instant::now();
    publisher.publish();
    let refused_ms = ms(t.elapsed());
    for _ in 0..2 {
        for id in &ids {
            for msg in up(*id) {
                publisher.apply(msg);
            }
        }
    }
    let t = Instant::now();
    publisher.publish();
    let all_up_ms = ms(t.elapsed());
    // One endpoint at a time goes down (one refusal), then comes back.
    let mut one = Vec::new();
    for k in 0..changes {
        let id = ids[(k * 7919) % ids.len()];
        publisher.apply(report(id, Layer::Alive, Err(ProbeError::Refused)));
        let t = Instant::now();
        publisher.publish();
        one.push(ms(t.elapsed()));
        for _ in 0..2 {
            publisher.apply(report(id, Layer::Alive, Ok(Payload::Alive)));
        }
        let t = Instant::now();
        publisher.publish();
        one.push(ms(t.elapsed()));
    }
    // A tenth of the endpoints die together, applied as one batch.
    for id in ids.iter().step_by(10) {
        publisher.apply(report(*id, Layer::Alive, Err(ProbeError::Refused)));
    }
    let t = Instant::now();
    publisher.publish();
    let tenth_ms = ms(t.elapsed());
    // A reload of the same files, GeoIP unchanged: read and checked (as
    // the reloader does, off the publisher), then applied and published.
    let mut reload_load = Vec::new();
    let mut reload_apply = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let config = inferdns::config::load_for_reload(&path).unwrap_or_else(|e| panic!("{e}"));
        reload_load.push(ms(t.elapsed()));
        let geo = snapshot.load().geo.db.clone();
        let (done, _generation) = tokio::sync::oneshot::channel();
        let t = Instant::now();
        publisher.apply(Msg::Reload {
            config: Arc::new(config),
            ids: ids.clone(),
            geo,
            done,
        });
        publisher.publish();
        reload_apply.push(ms(t.elapsed()));
    }
    let generation = snapshot.load().generation;
    let (rss, peak) = rss_mib();
    let max_one = one.iter().copied().fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({
            "endpoints": endpoints,
            "services": services,
            "load_ms": load_ms,
            "first_snapshot_ms": first_ms,
            "build_all_refused_ms": refused_ms,
            "build_all_up_ms": all_up_ms,
            "rebuild_one_change_median_ms": median(one.clone()),
            "rebuild_one_change_max_ms": max_one,
            "rebuild_tenth_down_ms": tenth_ms,
            "reload_check_ms": median(reload_load),
            "reload_apply_ms": median(reload_apply),
            "generation": generation,
            "rss_after_config_mib": rss_config,
            "rss_after_first_snapshot_mib": rss_first,
            "rss_mib": rss,
            "peak_rss_mib": peak,
        })
    );
}

/// Simulated regions on `127.1.x.y:port`, one per region, for `--seconds`.
/// With `--down-after S --down N`, the first N go down (connection
/// refused) together S seconds in: a whole group of regions dies at once.
fn serve(args: &[String]) {
    let regions = num(args, "--regions", 1000);
    let port = num(args, "--port", 18600) as u16;
    let seconds = num(args, "--seconds", 120) as u64;
    let down_after = arg(args, "--down-after").map(|v| v.parse::<u64>().expect("seconds"));
    let down = num(args, "--down", 0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let mut sims = Vec::with_capacity(regions);
        for i in 0..regions {
            let addr = SocketAddr::new(IpAddr::V4(address(i)), port);
            let sim = inferdns::demo::SimRegion::start(addr, MODEL)
                .await
                .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            sims.push(sim);
        }
        println!("serving {regions} regions on port {port}");
        std::io::stdout().flush().ok();
        let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
        if let Some(after) = down_after {
            tokio::time::sleep(Duration::from_secs(after)).await;
            for sim in sims.iter().take(down) {
                sim.set_fault(inferdns::demo::Fault::Down);
            }
            println!("{down} regions down");
            std::io::stdout().flush().ok();
        }
        tokio::time::sleep_until(end).await;
    });
}

/// A GeoIP2-City shaped database about the size of GeoLite2-City: many
/// IPv4 and IPv6 networks over many city records with names in several
/// languages.
fn geoip(args: &[String]) {
    #[derive(serde::Serialize)]
    struct Names<'a> {
        en: &'a str,
        de: &'a str,
        fr: &'a str,
        es: &'a str,
        ja: &'a str,
        #[serde(rename = "pt-BR")]
        pt: &'a str,
        ru: &'a str,
        #[serde(rename = "zh-CN")]
        zh: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Country<'a> {
        geoname_id: u32,
        iso_code: &'a str,
        is_in_european_union: bool,
        names: Names<'a>,
    }
    #[derive(serde::Serialize)]
    struct Continent<'a> {
        code: &'a str,
        geoname_id: u32,
        names: Names<'a>,
    }
    #[derive(serde::Serialize)]
    struct City<'a> {
        geoname_id: u32,
        names: Names<'a>,
    }
    #[derive(serde::Serialize)]
    struct Location<'a> {
        accuracy_radius: u16,
        latitude: f64,
        longitude: f64,
        time_zone: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Postal<'a> {
        code: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Record<'a> {
        city: City<'a>,
        continent: Continent<'a>,
        country: Country<'a>,
        registered_country: Country<'a>,
        location: Location<'a>,
        postal: Postal<'a>,
    }
    let out = PathBuf::from(arg(args, "--out").expect("--out"));
    let networks = num(args, "--networks", 3_000_000);
    let cities = num(args, "--cities", 120_000);
    let countries = [
        ("DE", "EU", true, 51.0, 9.0),
        ("FR", "EU", true, 46.0, 2.0),
        ("US", "NA", false, 38.0, -97.0),
        ("JP", "AS", false, 36.0, 138.0),
        ("BR", "SA", false, -10.0, -55.0),
        ("GB", "EU", false, 54.0, -2.0),
        ("IN", "AS", false, 21.0, 78.0),
        ("AU", "OC", false, -25.0, 134.0),
        ("ZA", "AF", false, -29.0, 24.0),
        ("CA", "NA", false, 60.0, -95.0),
    ];
    let t = Instant::now();
    let mut writer = mmdb_writer::Writer::builder("GeoIP2-City")
        .description(&[("en", "inferdns scale bench: synthetic, GeoLite2-City sized")])
        .build();
    let city_names: Vec<String> = (0..cities).map(|c| format!("City number {c}")).collect();
    let postal: Vec<String> = (0..cities).map(|c| format!("{:05}", c % 100_000)).collect();
    let record = |n: usize| {
        let c = n % cities;
        let (iso, continent, eu, lat, lon) = countries[c % countries.len()];
        let name = city_names[c].as_str();
        let names = || Names {
            en: name,
            de: name,
            fr: name,
            es: name,
            ja: name,
            pt: name,
            ru: name,
            zh: name,
        };
        let country = || Country {
            geoname_id: 1000 + (c % countries.len()) as u32,
            iso_code: iso,
            is_in_european_union: eu,
            names: Names {
                en: iso,
                de: iso,
                fr: iso,
                es: iso,
                ja: iso,
                pt: iso,
                ru: iso,
                zh: iso,
            },
        };
        Record {
            city: City {
                geoname_id: 100_000 + c as u32,
                names: names(),
            },
            continent: Continent {
                code: continent,
                geoname_id: 6_255_000 + (c % 7) as u32,
                names: Names {
                    en: continent,
                    de: continent,
                    fr: continent,
                    es: continent,
                    ja: continent,
                    pt: continent,
                    ru: continent,
                    zh: continent,
                },
            },
            country: country(),
            registered_country: country(),
            location: Location {
                accuracy_radius: 20 + (c % 500) as u16,
                latitude: lat + (c % 100) as f64 / 20.0,
                longitude: lon + (c % 97) as f64 / 20.0,
                time_zone: "Europe/Berlin",
            },
            postal: Postal {
                code: postal[c].as_str(),
            },
        }
    };
    // IPv4: /24 networks (and every fourth a /26) spread over 1.0.0.0 to
    // 223.255.255.255, skipping 127/8 and the test networks; IPv6: /48s.
    let v4 = networks * 4 / 5;
    let mut inserted = 0usize;
    let mut n = 0u32;
    while inserted < v4 {
        // A pseudo-random walk over the /24s (a bijection of the counter).
        let slot = n.wrapping_mul(2_654_435_761) % (222 << 16);
        n += 1;
        let base = (1u32 << 24) + (slot << 8);
        let first = (base >> 24) as u8;
        if first == 127 || first == 10 || (first == 198 && (base >> 16) & 0xff == 51) {
            continue;
        }
        let prefix = if inserted.is_multiple_of(4) { 26 } else { 24 };
        let net = ipnet::Ipv4Net::new(Ipv4Addr::from(base), prefix).expect("a prefix");
        writer
            .insert(ipnet::IpNet::V4(net), &record(inserted))
            .expect("insert");
        inserted += 1;
    }
    for k in 0..(networks - v4) {
        let hi = 0x2a00_0000_0000_0000u64 + ((k as u64).wrapping_mul(2_654_435_761) << 16);
        let addr = std::net::Ipv6Addr::from((u128::from(hi)) << 64);
        let net = ipnet::Ipv6Net::new(addr, 48).expect("a prefix");
        writer
            .insert(ipnet::IpNet::V6(net), &record(inserted + k))
            .expect("insert");
    }
    let bytes = writer.to_bytes().expect("serialise");
    std::fs::write(&out, &bytes).expect("write the database");
    println!(
        "wrote {} ({:.1} MB, {networks} networks, {cities} cities) in {:.1} s",
        out.display(),
        bytes.len() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
}

/// Asks for `--name` A until an answer arrives; prints the seconds waited.
fn first_answer(args: &[String]) {
    let dns: SocketAddr = arg(args, "--dns")
        .expect("--dns")
        .parse()
        .expect("an address");
    let name = arg(args, "--name").expect("--name");
    let seconds = num(args, "--seconds", 30) as u64;
    let t = Instant::now();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    let query = inferdns::demo::client::Ask::new(&name, hickory_proto::rr::RecordType::A)
        .message()
        .to_vec()
        .expect("a query encodes");
    let mut buf = [0u8; 1500];
    while t.elapsed() < Duration::from_secs(seconds) {
        let _ = socket.send_to(&query, dns);
        if let Ok((n, _)) = socket.recv_from(&mut buf)
            && n > 12
        {
            println!("{:.3}", t.elapsed().as_secs_f64());
            return;
        }
    }
    eprintln!("no answer within {seconds} s");
    std::process::exit(1);
}

/// CPU time this process has used, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

/// The CPU one probe costs this process: `--n` probes of one layer (the
/// daemon's own probe code), over `--regions` simulated regions served by
/// another process (`scale serve`), 64 in flight.
fn probe_cost(args: &[String]) {
    use inferdns::health::Probe;
    let regions = num(args, "--regions", 100);
    let port = num(args, "--port", 18600);
    let n = num(args, "--n", 20_000);
    let layer = arg(args, "--layer").unwrap_or_else(|| "alive".into());
    let mut text = String::from(
        "[server]\ndns-listen = [\"127.0.0.1:0\"]\n[zone]\napex = \"inference.example.com\"\nsoa = { primary = \"ns1.example.net\", contact = \"h.example.net\" }\nns = [{ name = \"ns1.example.net\" }]\n",
    );
    for i in 0..regions {
        text.push_str(&format!(
            "[regions.r{i}]\nendpoints = [{{ address = \"{}\", port = {port} }}]\nprobe = {{ models-path = \"/v1/models\" }}\n",
            address(i)
        ));
    }
    text.push_str("[services.s]\ntiers = [[\"r0\"]]\n");
    let config = inferdns::config::load_str(std::path::Path::new("probe-cost.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let raw = args.iter().any(|a| a == "--raw");
    rt.block_on(async move {
        if raw {
            // The floor: a fresh connection, a fixed request, read to the end.
            let addrs: Vec<SocketAddr> = (0..regions)
                .map(|i| SocketAddr::new(IpAddr::V4(address(i)), port as u16))
                .collect();
            let cpu0 = cpu_seconds();
            let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for w in 0..64 {
                let addrs = addrs.clone();
                let done = done.clone();
                tasks.push(tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut k = w;
                    let mut buf = vec![0u8; 4096];
                    while done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                        let addr = addrs[k % addrs.len()];
                        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
                        stream
                            .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nuser-agent: inferdns\r\nconnection: close\r\n\r\n")
                            .await
                            .expect("write");
                        while stream.read(&mut buf).await.expect("read") > 0 {}
                        k += 64;
                    }
                }));
            }
            for task in tasks {
                task.await.expect("a task");
            }
            let cpu = cpu_seconds() - cpu0;
            println!("raw: {:.1} us per probe", cpu * 1e6 / n as f64);
            return;
        }
        let mut probes = Vec::new();
        for region in &config.regions {
            let spec = &region.endpoints[0].probe;
            let all = inferdns::health::probe::probes_for(spec).expect("probes");
            let wanted = if layer == "models" { Layer::Models } else { Layer::Alive };
            let probe = all
                .into_iter()
                .map(|(p, _, _)| p)
                .find(|p| p.layer() == wanted)
                .expect("the layer");
            probes.push(Arc::new(probe));
        }
        let cpu0 = cpu_seconds();
        let t = Instant::now();
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for w in 0..64 {
            let probes = probes.clone();
            let (done, failed) = (done.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let mut k = w;
                while done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let probe = &probes[k % probes.len()];
                    if tokio::time::timeout(Duration::from_secs(2), probe.check())
                        .await
                        .map_or(true, |r| r.is_err())
                    {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    k += 64;
                }
            }));
        }
        for task in tasks {
            task.await.expect("a probe task");
        }
        let cpu = cpu_seconds() - cpu0;
        println!(
            "{}",
            serde_json::json!({
                "probes": n,
                "failed": failed.load(std::sync::atomic::Ordering::Relaxed),
                "wall_s": t.elapsed().as_secs_f64(),
                "cpu_s": cpu,
                "cpu_us_per_probe": cpu * 1e6 / n as f64,
            })
        );
    });
}
