//! Parse → check → compile: from the file structs to [`Config`], collecting
//! every problem with its file:line:col.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{LowerName, Name, RData, Record};
use toml::Spanned;

use crate::geo::FileKey;

use super::file::{EndpointSection, MainFile, ProbeSection, RegionSection, ServiceSection};
use super::known::{Clean, Learned, PolicyFiles, Reuse};
use super::parse::{self, Broken};
use super::suggest;
use super::{
    AllDown, Config, ConfigError, ConfigErrors, Endpoint, ProbeSpec, Region, Scheme, ServerConfig,
    Service, Soa, Source, Target, ZoneConfig, zonefile,
};

/// Default probe timing: detects a killed endpoint in about 1 s and a hung
/// one in about 2 s (interval × fall, plus the timeout for a hang).
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(800);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 2;
/// Default TTL of service answers.
pub const DEFAULT_SERVICE_TTL: u32 = 30;
/// Default hold of last-known-good answers: one default TTL. Resolvers keep
/// any answer that long anyway, so holding a wrong guess for one TTL at most
/// doubles how long it lasts; it rides out the stalls of a loaded edge
/// (seconds to tens of seconds), and real answers return as soon as probes
/// succeed again (rise x interval, about 1 s), whatever is left of the hold.
pub const DEFAULT_LAST_KNOWN_GOOD: Duration = Duration::from_secs(30);
/// The longest last-known-good hold: past this, a total outage must get the
/// configured `when-all-down` answer.
pub const MAX_LAST_KNOWN_GOOD: Duration = Duration::from_secs(300);

/// Loads and checks the configuration at `path` with everything it refers to.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = read(path, None)?;
    load_text(path, &text, true, None).map(|(config, _)| config)
}

/// As [`load`], without opening the GeoIP database: a reload opens it
/// itself, keeping the database in use when the file on disk is broken
/// (as the file watcher does) instead of refusing the whole reload.
pub fn load_for_reload(path: &Path) -> Result<Config, ConfigErrors> {
    let text = read(path, None)?;
    load_text(path, &text, false, None).map(|(config, _)| config)
}

/// As [`load_for_reload`], taking the policy files that did not change
/// from `known`'s config instead of reading them (see [`PolicyFiles`]);
/// also returns what this load learned, for the next one.
pub fn load_known(path: &Path, known: &PolicyFiles) -> Result<(Config, Learned), ConfigErrors> {
    let text = read(path, None)?;
    // A file changed within the last two seconds is read again next time
    // whatever its key: file times move in clock ticks (4 ms), so a second
    // same-sized write within the tick of the first leaves the key as it was.
    let settled = std::time::SystemTime::now() - Duration::from_secs(2);
    load_text(path, &text, false, Some((known, settled)))
}

/// Checks `text` as if it were the main configuration file at `path`: errors
/// name `path`, and the files it refers to (zone file, policy directory,
/// token and key files) are read relative to its directory. What [`load`]
/// does once the file is read; the config fuzz target feeds it arbitrary
/// text (it must never panic).
pub fn load_str(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    load_text(path, text, true, None).map(|(config, _)| config)
}

/// Loads the main file `text`; with `known`, takes what it may from it,
/// and remembers the policy files that checked cleanly and changed last
/// before `settled`.
pub(super) fn load_text(
    path: &Path,
    text: &str,
    open_geoip: bool,
    known: Option<(&PolicyFiles, std::time::SystemTime)>,
) -> Result<(Config, Learned), ConfigErrors> {
    let source = Source { path, text };
    let parsed = parse::parse::<MainFile>(&source);
    let mut checker = Checker {
        errors: parsed.errors,
        base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        cname_targets: Vec::new(),
        fallbacks: Vec::new(),
        open_geoip,
        broken: Broken::from_paths(&parsed.tainted),
        learned: Learned {
            main: known.is_some().then(|| text.to_string()),
            ..Learned::default()
        },
        settled: known.map(|(_, settled)| settled),
    };
    let reuse = known.and_then(|(k, _)| k.reuse(text));
    let config = match &parsed.value {
        Some(file) => checker.main(&source, file, reuse.as_ref()),
        None => {
            // The main file is unusable, but its policy files can still
            // report their own parse errors.
            if let Some(dir) = parse::top_string(text, "policy-dir") {
                checker.policy_dir(&source, &dir, None, &mut Vec::new(), None);
            }
            None
        }
    };
    match config {
        Some(config) if checker.errors.is_empty() => Ok((config, checker.learned)),
        _ => Err(ConfigErrors(in_file_order(checker.errors))),
    }
}

/// Files in the order they were first reported, each from top to bottom.
fn in_file_order(mut errors: Vec<ConfigError>) -> Vec<ConfigError> {
    let mut files: Vec<PathBuf> = Vec::new();
    for e in &errors {
        if !files.contains(&e.file) {
            files.push(e.file.clone());
        }
    }
    errors.sort_by_key(|e| (files.iter().position(|f| *f == e.file), e.line, e.col));
    errors
}

/// One policy file read and parsed (not yet checked).
type ReadPolicy = Result<(String, parse::Parsed<ServiceSection>), ConfigErrors>;

/// A policy file as [`read_policies`] found it: its key, taken before it
/// was read (a change after that shows at the next reload), and either
/// what was read or, for a file the config in force may give, nothing.
enum Policy {
    Read(Option<FileKey>, Box<ReadPolicy>),
    Known(Option<FileKey>),
}

fn read_policy(file: &Path) -> ReadPolicy {
    let text = read(file, None)?;
    let parsed = parse::parse::<ServiceSection>(&Source {
        path: file,
        text: &text,
    });
    Ok((text, parsed))
}

/// Reads and parses policy files, in order, but those `reuse` may give.
/// Each file is independent of the others, so large directories are
/// shared out over the CPUs: 10,000 files (0.75 MB of TOML) took about
/// 0.2 s on one thread, most of a reload at that size. The checks that
/// follow stay on the caller's thread.
fn read_policies(files: &[PathBuf], reuse: Option<&Reuse<'_>>) -> Vec<Policy> {
    let one = |file: &PathBuf| {
        let key = FileKey::at(file);
        if reuse.is_some_and(|r| r.fresh(file, key)) {
            Policy::Known(key)
        } else {
            Policy::Read(key, Box::new(read_policy(file)))
        }
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Below a few hundred files a thread costs more than it saves.
    let threads = cpus.min(files.len() / 256).max(1);
    if threads == 1 {
        return files.iter().map(one).collect();
    }
    let chunk = files.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = files
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(one).collect::<Vec<_>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|part| part.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// The place of a policy file's service: its first line.
fn file_start(file: &Path) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: 1,
        col: 1,
        message: String::new(),
    }
}

fn read(path: &Path, at: Option<ConfigError>) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        let mut error = at.unwrap_or(ConfigError {
            file: path.to_path_buf(),
            line: 1,
            col: 1,
            message: String::new(),
        });
        error.message = format!("cannot read {}: {e}", path.display());
        ConfigErrors(vec![error])
    })
}

pub(super) struct Checker {
    pub(super) errors: Vec<ConfigError>,
    /// Directory of the main file; relative paths start here.
    pub(super) base: PathBuf,
    /// CNAME endpoint targets with their places, checked against the zone.
    cname_targets: Vec<(Name, ConfigError)>,
    /// (service id, fallback service id, place), resolved once all services are known.
    fallbacks: Vec<(String, String, ConfigError)>,
    /// Open the GeoIP database to check it (not on reload: the server does).
    pub(super) open_geoip: bool,
    /// Items whose values did not parse: skipped, and never reported as
    /// unknown when something refers to them.
    pub(super) broken: Broken,
    /// The policy files that checked cleanly, for the next reload.
    pub(super) learned: Learned,
    /// Policy files that changed last before this are remembered in
    /// `learned`; `None`: none is.
    pub(super) settled: Option<std::time::SystemTime>,
}

/// What service checks need to know about the rest of the config.
pub(super) struct Ctx<'a> {
    pub apex: &'a Name,
    pub region_ids: &'a HashMap<&'a str, usize>,
    pub regions: &'a [Region],
    pub groups: &'a HashMap<String, Vec<crate::geo::Code>>,
    pub has_geoip: bool,
    /// A section services depend on (geoip, groups) did not parse: checks
    /// that need it are skipped.
    pub partial: bool,
}

/// A probe port of 0, in the words of the parse errors for 70000.
const PORT_ZERO: &str = "port: expected a port number 1-65535, found 0";

/// Longest `[server] nsid`, in bytes.
const MAX_NSID: usize = 128;

impl Checker {
    /// A checker for a main file in `base` (tests of single checks).
    #[cfg(test)]
    pub(super) fn new(base: PathBuf) -> Self {
        Self {
            errors: Vec::new(),
            base,
            cname_targets: Vec::new(),
            fallbacks: Vec::new(),
            open_geoip: true,
            broken: Broken::default(),
            learned: Learned::default(),
            settled: None,
        }
    }

    pub(super) fn err(
        &mut self,
        source: &Source<'_>,
        span: Range<usize>,
        message: impl Into<String>,
    ) {
        self.errors.push(source.error(span, message));
    }

    fn main(
        &mut self,
        src: &Source<'_>,
        file: &MainFile,
        reuse: Option<&Reuse<'_>>,
    ) -> Option<Config> {
        let server = match self.broken.section("server") {
            true => None,
            false => self.server(src, &file.server),
        };
        let zone_broken = self.broken.section("zone");
        let zone = match zone_broken {
            true => None,
            false => self.zone(src, &file.zone),
        };
        let regions = self.regions(src, &file.regions);
        let region_ids: HashMap<&str, usize> = regions
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id.as_str(), i))
            .collect();
        let apex = match &zone {
            Some(z) => Some(z.apex.clone()),
            // Services can still be checked below an apex that reads well.
            None if zone_broken => Name::from_ascii(file.zone.apex.get_ref())
                .ok()
                .filter(|n| n.num_labels() > 0)
                .map(|mut n| {
                    n.set_fqdn(true);
                    n
                }),
            None => None,
        };
        if let Some(z) = &zone {
            let apex = LowerName::new(&z.apex);
            let owners: HashSet<LowerName> =
                z.records.iter().map(|r| LowerName::new(&r.name)).collect();
            for (target, place) in std::mem::take(&mut self.cname_targets) {
                let lower = LowerName::new(&target);
                if apex.zone_of(&lower) && !owners.contains(&lower) {
                    self.errors.push(ConfigError {
                        message: format!(
                            "cname target {target} is inside the zone but no record in the zone file has that name"
                        ),
                        ..place
                    });
                }
            }
        }

        let geo_broken = self.broken.section("geoip") || self.broken.section("ecs");
        let geo = match geo_broken {
            true => None,
            false => self.geo_config(src, file),
        };
        let groups_broken = self.broken.section("groups");
        let groups = match groups_broken {
            true => HashMap::new(),
            false => self.groups(src, &file.groups),
        };
        let overrides = match self.broken.section("overrides") {
            true => Vec::new(),
            false => self.overrides(src, &file.overrides, &regions),
        };
        let rrl = match self.broken.section("rrl") {
            true => None,
            false => self.rrl(src, &file.rrl),
        };
        let fleet = match self.broken.section("fleet") {
            true => None,
            false => self.fleet(src, &file.fleet, server.as_ref(), apex.as_ref()),
        };
        let mut services = Vec::new();
        if let Some(apex) = &apex {
            let ctx = Ctx {
                apex,
                region_ids: &region_ids,
                regions: &regions,
                groups: &groups,
                has_geoip: geo.as_ref().is_some_and(|g| g.database.is_some()),
                partial: geo_broken || groups_broken,
            };
            for (id, section) in &file.services {
                if self.broken.service(id) {
                    continue;
                }
                if let Some(s) = self.service(src, id, section.get_ref(), section.span(), &ctx) {
                    services.push((s, src.error(section.span(), "")));
                }
            }
            if let Some(dir) = &file.policy_dir {
                self.policy_dir(src, dir, Some(&ctx), &mut services, reuse);
            }
        } else if let Some(dir) = &file.policy_dir {
            self.policy_dir(src, dir, None, &mut services, None);
        }
        let mut services = self.cross_check_services(services, zone.as_ref());
        self.resolve_fallbacks(&mut services);
        Some(Config {
            server: server?,
            zone: zone?,
            regions,
            services,
            geo: geo?,
            overrides,
            rrl,
            fleet: fleet?,
        })
    }

    fn server(&mut self, src: &Source<'_>, s: &super::file::ServerSection) -> Option<ServerConfig> {
        let mut dns_listen = Vec::new();
        for addr in &s.dns_listen {
            if let Some(a) = self.socket_addr(src, addr) {
                dns_listen.push(a);
            }
        }
        if s.dns_listen.is_empty() {
            self.err(
                src,
                0..0,
                "server.dns-listen must name at least one address",
            );
        }
        let admin_listen = self.socket_addr(src, &s.admin_listen);
        let grace = self.duration(
            src,
            &s.startup_grace,
            "startup-grace",
            Duration::ZERO,
            Duration::from_secs(60),
        );
        let idle = self.duration(
            src,
            &s.tcp_idle_timeout,
            "tcp-idle-timeout",
            Duration::from_secs(1),
            Duration::from_secs(3600),
        );
        let payload = *s.max_udp_payload.get_ref();
        if !(512..=4096).contains(&payload) {
            self.err(
                src,
                s.max_udp_payload.span(),
                format!("max-udp-payload {payload} is out of range (512..=4096)"),
            );
        }
        let nsid = match &s.nsid {
            Some(n) => {
                // With the longest question and an IPv6 ECS echo, an error
                // reply still fits 512 bytes.
                if n.get_ref().len() > MAX_NSID {
                    self.err(
                        src,
                        n.span(),
                        format!("nsid is longer than {MAX_NSID} bytes"),
                    );
                }
                n.get_ref().clone()
            }
            None => host_name(),
        };
        let explain_acl = self.networks(src, &s.explain_acl);
        let (tcp_max_connections, tcp_max_per_address) = self.tcp_caps(src, s);
        let admin_token = s
            .admin_token_file
            .as_ref()
            .and_then(|file| self.secret_file(src, file, "admin token"));
        let (admin_token_for_reads, admin_limits) = self.admin(src, s, admin_listen);
        Some(ServerConfig {
            dns_listen,
            admin_listen: admin_listen?,
            startup_grace: grace?,
            tcp_idle_timeout: idle?,
            tcp_max_connections,
            tcp_max_per_address,
            max_udp_payload: payload,
            nsid,
            explain_acl,
            admin_token,
            admin_token_for_reads,
            admin_limits,
        })
    }

    fn zone(&mut self, src: &Source<'_>, z: &super::file::ZoneSection) -> Option<ZoneConfig> {
        let apex = self.absolute_name(src, &z.apex)?;
        if apex.is_root() {
            self.err(src, z.apex.span(), "zone.apex cannot be the root");
            return None;
        }
        let apex_lower = LowerName::new(&apex);
        let soa_s = &z.soa;
        let primary = self.full_name(src, &soa_s.primary);
        let contact = self.full_name(src, &soa_s.contact);
        let ttl_checks = [
            (&soa_s.refresh, "refresh", 1, 2_419_200),
            (&soa_s.retry, "retry", 1, 2_419_200),
            (&soa_s.expire, "expire", 1, 31_536_000),
            (&soa_s.minimum, "minimum", 0, 86_400),
            (&soa_s.ttl, "ttl", 1, 604_800),
        ];
        for (value, what, min, max) in ttl_checks {
            self.ttl_in_range(src, value, &format!("zone.soa.{what}"), min, max);
        }

        let mut records = Vec::new();
        let mut ns = Vec::new();
        let mut glue_names = HashSet::new();
        if z.ns.is_empty() {
            self.err(
                src,
                z.apex.span(),
                "the zone needs at least one [[zone.ns]]",
            );
        }
        let mut ns_seen = HashSet::new();
        for entry in &z.ns {
            let Some(name) = self.full_name(src, &entry.name) else {
                continue;
            };
            if !ns_seen.insert(LowerName::new(&name)) {
                self.err(
                    src,
                    entry.name.span(),
                    format!("name server {name} is listed twice"),
                );
                continue;
            }
            let inside = apex_lower.zone_of(&LowerName::new(&name));
            if inside && entry.addresses.is_empty() {
                self.err(
                    src,
                    entry.name.span(),
                    format!("name server {name} is inside the zone and needs glue: set addresses"),
                );
            }
            if !inside && !entry.addresses.is_empty() {
                self.err(
                    src,
                    entry.addresses[0].span(),
                    format!("name server {name} is outside the zone; glue addresses are only for names inside it"),
                );
            }
            for address in &entry.addresses {
                let Some(ip) = self.ip(src, address) else {
                    continue;
                };
                let rdata = match ip {
                    IpAddr::V4(v4) => RData::A(A(v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                };
                records.push(Record::from_rdata(
                    name.clone(),
                    *soa_s.ttl.get_ref(),
                    rdata,
                ));
            }
            if inside {
                glue_names.insert(LowerName::new(&name));
            }
            ns.push(name);
        }

        if let Some(file) = &z.file {
            let path = self.base.join(file.get_ref());
            match read(&path, Some(src.error(file.span(), ""))) {
                Ok(text) => match zonefile::parse(&path, &text, &apex) {
                    Ok(zone_records) => {
                        let zsrc = Source {
                            path: &path,
                            text: &text,
                        };
                        for r in &zone_records {
                            let owner = LowerName::new(&r.name);
                            let is_addr =
                                matches!(r.data, RData::A(_) | RData::AAAA(_) | RData::CNAME(_));
                            if is_addr && glue_names.contains(&owner) {
                                let (line, col) = zonefile::owner_position(
                                    &zsrc,
                                    &r.name,
                                    &apex,
                                    Some(r.record_type()),
                                );
                                self.errors.push(ConfigError {
                                    file: path.clone(),
                                    line,
                                    col,
                                    message: format!(
                                        "{} has addresses in [[zone.ns]] already; remove its {} here",
                                        r.name,
                                        r.record_type()
                                    ),
                                });
                            }
                        }
                        records.extend(zone_records);
                    }
                    Err(errors) => self.errors.extend(errors),
                },
                Err(e) => self.errors.extend(e.0),
            }
        }

        Some(ZoneConfig {
            apex,
            soa: Soa {
                primary: primary?,
                contact: contact?,
                serial: soa_s.serial,
                refresh: *soa_s.refresh.get_ref(),
                retry: *soa_s.retry.get_ref(),
                expire: *soa_s.expire.get_ref(),
                minimum: *soa_s.minimum.get_ref(),
                ttl: *soa_s.ttl.get_ref(),
            },
            ns,
            records,
        })
    }

    fn regions(
        &mut self,
        src: &Source<'_>,
        regions: &BTreeMap<String, Spanned<RegionSection>>,
    ) -> Vec<Region> {
        let mut out = Vec::new();
        for (id, region) in regions {
            if self.broken.region(id) {
                continue;
            }
            if !valid_id(id) {
                self.err(
                    src,
                    region.span(),
                    format!("region id {id:?} must be lowercase letters, digits and '-'"),
                );
            }
            let section = region.get_ref();
            if section.endpoints.is_empty() {
                self.err(src, region.span(), format!("region {id} has no endpoints"));
            }
            let (capacity, metrics) = self.capacity(src, section.capacity.as_ref());
            let template = self.probe(src, &section.probe).map(|mut t| {
                t.metrics = metrics;
                t
            });
            let mut seen = HashSet::new();
            let mut endpoints = Vec::new();
            for ep in &section.endpoints {
                if let Some(endpoint) =
                    self.endpoint(src, id, ep.get_ref(), ep.span(), template.as_ref())
                {
                    if !seen.insert(endpoint.target.clone()) {
                        self.err(
                            src,
                            ep.span(),
                            format!("region {id} lists endpoint {} twice", endpoint.target),
                        );
                        continue;
                    }
                    endpoints.push(endpoint);
                }
            }
            let location = section
                .location
                .as_ref()
                .and_then(|l| self.location(src, l));
            let mut jurisdictions = Vec::new();
            for tag in &section.jurisdictions {
                if valid_id(tag.get_ref()) {
                    jurisdictions.push(tag.get_ref().clone());
                } else {
                    self.err(
                        src,
                        tag.span(),
                        format!(
                            "jurisdiction {:?} must be lowercase letters, digits and '-'",
                            tag.get_ref()
                        ),
                    );
                }
            }
            out.push(Region {
                id: id.clone(),
                endpoints,
                location,
                jurisdictions,
                capacity,
            });
        }
        out
    }

    fn endpoint(
        &mut self,
        src: &Source<'_>,
        region: &str,
        ep: &EndpointSection,
        span: Range<usize>,
        template: Option<&ProbeSpec>,
    ) -> Option<Endpoint> {
        let (target, probe_ip) = match (&ep.address, &ep.cname) {
            (Some(address), None) => {
                if let Some(pa) = &ep.probe_address {
                    self.err(
                        src,
                        pa.span(),
                        "probe-address is only for cname endpoints; an address endpoint is probed on its own address",
                    );
                }
                let ip = self.ip(src, address)?;
                (Target::Address(ip), ip)
            }
            (None, Some(cname)) => {
                let name = self.full_name(src, cname)?;
                self.cname_targets
                    .push((name.clone(), src.error(cname.span(), "")));
                let Some(pa) = &ep.probe_address else {
                    self.err(
                        src,
                        span,
                        format!("cname endpoint {name} in region {region} needs probe-address (names are never resolved for probes)"),
                    );
                    return None;
                };
                let ip = self.ip(src, pa)?;
                (Target::Cname(name), ip)
            }
            (Some(_), Some(c)) => {
                self.err(
                    src,
                    c.span(),
                    "an endpoint has either address or cname, not both",
                );
                return None;
            }
            (None, None) => {
                self.err(src, span, "an endpoint needs address or cname");
                return None;
            }
        };
        let mut probe = template?.clone();
        if probe.scheme == Scheme::Https
            && matches!(target, Target::Address(_))
            && probe.tls_server_name.is_none()
            && probe.host.is_none()
        {
            self.err(
                src,
                span,
                format!(
                    "https probes of address endpoints need tls-server-name (the name on the certificate) in region {region}"
                ),
            );
            return None;
        }
        let port = ep.port.as_ref().map_or(probe.addr.port(), |p| *p.get_ref());
        if port == 0
            && let Some(p) = &ep.port
        {
            self.err(src, p.span(), PORT_ZERO);
        }
        probe.addr = SocketAddr::new(probe_ip, port);
        if probe.host.is_none()
            && let Target::Cname(name) = &target
        {
            probe.host = Some(name.to_ascii().trim_end_matches('.').to_string());
        }
        Some(Endpoint { target, probe })
    }

    /// The region's probe settings; each endpoint fills in its own address
    /// (and port, if it overrides the region's).
    fn probe(&mut self, src: &Source<'_>, p: &ProbeSection) -> Option<ProbeSpec> {
        let scheme = match p.scheme.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("http", _)) => Scheme::Http,
            Some(("https", _)) => Scheme::Https,
            Some((other, span)) => {
                self.err(
                    src,
                    span,
                    format!("probe scheme {other:?} is not http or https"),
                );
                return None;
            }
        };
        let default_port = match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        };
        let port = p.port.as_ref().map_or(default_port, |p| *p.get_ref());
        if port == 0
            && let Some(p) = &p.port
        {
            self.err(src, p.span(), PORT_ZERO);
        }
        let path = p
            .path
            .as_ref()
            .map_or("/health".to_string(), |p| p.get_ref().clone());
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            let span = p.path.as_ref().map_or(0..0, |p| p.span());
            self.err(
                src,
                span,
                format!("probe path {path:?} must start with '/' and have no spaces"),
            );
        }
        if let Some(status) = &p.expect_status
            && !(100..=599).contains(status.get_ref())
        {
            self.err(
                src,
                status.span(),
                format!("expect-status {} is not an HTTP status", status.get_ref()),
            );
        }
        let interval = match &p.interval {
            Some(i) => self.duration(
                src,
                i,
                "probe interval",
                Duration::from_millis(100),
                Duration::from_secs(3600),
            ),
            None => Some(DEFAULT_INTERVAL),
        };
        let timeout = match &p.timeout {
            Some(t) => self.duration(
                src,
                t,
                "probe timeout",
                Duration::from_millis(50),
                Duration::from_secs(60),
            ),
            None => Some(DEFAULT_TIMEOUT),
        };
        let rise = self.count(src, p.rise.as_ref(), "rise", DEFAULT_RISE);
        let fall = self.count(src, p.fall.as_ref(), "fall", DEFAULT_FALL);
        for value in [&p.host, &p.tls_server_name].into_iter().flatten() {
            if value.get_ref().is_empty()
                || value
                    .get_ref()
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '/')
            {
                self.err(
                    src,
                    value.span(),
                    format!("{:?} is not a host name", value.get_ref()),
                );
            }
        }
        if let Some(sni) = &p.tls_server_name
            && scheme != Scheme::Https
        {
            self.err(src, sni.span(), "tls-server-name needs scheme = \"https\"");
        }
        let layers = self.layers(src, p)?;
        Some(ProbeSpec {
            addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port),
            scheme,
            path,
            expect_status: p.expect_status.as_ref().map(|s| *s.get_ref()),
            interval: interval?,
            timeout: timeout?,
            rise: rise?,
            fall: fall?,
            fall_refused: layers.fall_refused,
            host: p.host.as_ref().map(|h| h.get_ref().clone()),
            tls_server_name: p.tls_server_name.as_ref().map(|s| s.get_ref().clone()),
            kind: layers.kind,
            models: layers.models,
            completion: layers.completion,
            ca_pem: layers.ca_pem,
            api_key: layers.api_key,
            cooldown: layers.cooldown,
            slow_start: layers.slow_start,
            metrics: None,
        })
    }

    fn policy_dir(
        &mut self,
        src: &Source<'_>,
        dir: &Spanned<String>,
        ctx: Option<&Ctx<'_>>,
        services: &mut Vec<(Service, ConfigError)>,
        reuse: Option<&Reuse<'_>>,
    ) {
        let path = self.base.join(dir.get_ref());
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) => {
                self.err(
                    src,
                    dir.span(),
                    format!("cannot read policy directory {}: {e}", path.display()),
                );
                return;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        // One directory: the order of the names (bytes), without comparing
        // path components (a fifth of a 10,000-file reload's listing).
        files.sort_unstable_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
        let reuse = reuse.filter(|_| ctx.is_some());
        for (file, policy) in files.iter().zip(read_policies(&files, reuse)) {
            let id = file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let (key, read) = match policy {
                Policy::Read(key, read) => (key, *read),
                Policy::Known(key) => {
                    if let Some((service, fallback)) = reuse.and_then(|r| r.take(file, &id, key)) {
                        if let Some((target, place)) = &fallback {
                            self.fallbacks
                                .push((id.clone(), target.clone(), place.clone()));
                        }
                        services.push((service, file_start(file)));
                        self.learned.kept += 1;
                        self.remember(file, key, fallback);
                        continue;
                    }
                    // Not in the config in force after all: read it.
                    (key, read_policy(file))
                }
            };
            self.learned.read += 1;
            let (text, parsed) = match read {
                Ok(read) => read,
                Err(e) => {
                    self.errors.extend(e.0);
                    continue;
                }
            };
            let psrc = Source {
                path: file,
                text: &text,
            };
            let fallbacks = self.fallbacks.len();
            self.errors.extend(parsed.errors);
            match (&parsed.value, ctx) {
                (Some(section), Some(ctx)) if parsed.tainted.is_empty() => {
                    if let Some(s) = self.service(&psrc, &id, section, 0..0, ctx) {
                        services.push((s, file_start(file)));
                        // Remembered whether or not it had a problem: a
                        // load with any problem is refused whole, and
                        // what it learned with it.
                        let fallback = self
                            .fallbacks
                            .get(fallbacks)
                            .map(|(_, target, place)| (target.clone(), place.clone()));
                        self.remember(file, key, fallback);
                    }
                }
                _ => {
                    self.broken.services.insert(id);
                }
            }
        }
    }

    /// Remembers policy file `file` (key `key`, taken before it was read)
    /// as checked cleanly, unless it changed too recently to trust its key.
    fn remember(
        &mut self,
        file: &Path,
        key: Option<FileKey>,
        fallback: Option<(String, ConfigError)>,
    ) {
        let (Some(key), Some(settled)) = (key, self.settled) else {
            return;
        };
        let settled = settled
            .duration_since(std::time::UNIX_EPOCH)
            .map_or((0, 0), |d| {
                (d.as_secs() as i64, i64::from(d.subsec_nanos()))
            });
        // The change time moves with every change (the modification time
        // too, and it can be set to anything, even the future).
        if key.ctime < settled {
            self.learned
                .files
                .insert(file.to_path_buf(), Clean { key, fallback });
        }
    }

    fn service(
        &mut self,
        src: &Source<'_>,
        id: &str,
        s: &ServiceSection,
        span: Range<usize>,
        ctx: &Ctx<'_>,
    ) -> Option<Service> {
        let (apex, region_ids) = (ctx.apex, ctx.region_ids);
        if !valid_id(id) {
            self.err(
                src,
                span.clone(),
                format!("service id {id:?} must be lowercase letters, digits and '-'"),
            );
        }
        let name = match &s.name {
            Some(n) => self.service_name(src, n, apex)?,
            None => Name::from_ascii(id)
                .and_then(|n| n.append_domain(apex))
                .map_err(|e| {
                    self.err(
                        src,
                        span.clone(),
                        format!("service id {id:?} is not a DNS label: {e}"),
                    )
                })
                .ok()?,
        };
        let apex_lower = LowerName::new(apex);
        let lower = LowerName::new(&name);
        let at = s.name.as_ref().map_or(span.clone(), |n| n.span());
        if name
            .iter()
            .any(|label| label == b"*" || label.eq_ignore_ascii_case(b"_explain"))
        {
            self.err(
                src,
                at.clone(),
                format!("service name {name} cannot have a '*' or '_explain' label"),
            );
        }
        if lower == apex_lower || !apex_lower.zone_of(&lower) {
            let at = s.name.as_ref().map_or(span.clone(), |n| n.span());
            self.err(
                src,
                at,
                format!("service name {name} must be below the apex {apex}"),
            );
        }
        if s.tiers.get_ref().is_empty() {
            self.err(src, s.tiers.span(), format!("service {id} has no tiers"));
        }
        let mut tiers = Vec::new();
        let mut seen = HashSet::new();
        let mut incomplete = false;
        for tier in s.tiers.get_ref() {
            if tier.is_empty() {
                self.err(
                    src,
                    s.tiers.span(),
                    format!("service {id} has an empty tier"),
                );
            }
            let mut regions = Vec::new();
            for region in tier {
                if self.broken.region(region.get_ref()) {
                    // Defined, but it did not parse: nothing to check against.
                    incomplete = true;
                    continue;
                }
                match region_ids.get(region.get_ref().as_str()) {
                    Some(&i) => {
                        if !seen.insert(i) {
                            self.err(
                                src,
                                region.span(),
                                format!(
                                    "region {} appears twice in the tiers of service {id}",
                                    region.get_ref()
                                ),
                            );
                        }
                        regions.push(i);
                    }
                    None => self.err(
                        src,
                        region.span(),
                        format!(
                            "service {id} refers to unknown region {:?}{}",
                            region.get_ref(),
                            suggest::hint(
                                region.get_ref(),
                                region_ids
                                    .keys()
                                    .copied()
                                    .chain(self.broken.regions.iter().map(String::as_str))
                            )
                        ),
                    ),
                }
            }
            tiers.push(regions);
        }
        // Errors below still yield a service, so that the collision checks run too.
        let ttl = match &s.ttl {
            Some(ttl) => self
                .ttl_in_range(src, ttl, "ttl", 1, 86_400)
                .unwrap_or(DEFAULT_SERVICE_TTL),
            None => DEFAULT_SERVICE_TTL,
        };
        let when_all_down = match s
            .when_all_down
            .as_ref()
            .map(|w| (w.get_ref().as_str(), w.span()))
        {
            None | Some(("fail-open", _)) => AllDown::FailOpen,
            Some(("nodata", _)) => AllDown::NoData,
            Some(("servfail", _)) => AllDown::ServFail,
            Some((other, span)) => {
                let hint = suggest::hint(other, ["fail-open", "nodata", "servfail"]);
                self.err(
                    src,
                    span,
                    format!(
                        "when-all-down {other:?} is not one of fail-open, nodata, servfail{hint}"
                    ),
                );
                AllDown::FailOpen
            }
        };
        let last_known_good = match &s.last_known_good {
            Some(hold) => self
                .duration(
                    src,
                    hold,
                    "last-known-good",
                    Duration::ZERO,
                    MAX_LAST_KNOWN_GOOD,
                )
                .unwrap_or(DEFAULT_LAST_KNOWN_GOOD),
            None => DEFAULT_LAST_KNOWN_GOOD,
        };
        let max_latency = match &s.max_latency {
            Some(l) => self.duration(
                src,
                l,
                "max-latency",
                Duration::from_millis(1),
                Duration::from_secs(600),
            ),
            None => None,
        };
        if let Some(f) = &s.fallback {
            self.fallbacks
                .push((id.to_string(), f.get_ref().clone(), src.error(f.span(), "")));
        }
        let (records, sticky, watermarks, ttl_min) = self.service_capacity(src, s, ttl);
        if incomplete || ctx.partial {
            // Strategy and residency checks need every region (and the
            // geoip and groups sections): skip them rather than guess.
            self.broken.services.insert(id.to_string());
            return None;
        }
        let strategy = self.strategy(src, s, &tiers, ctx);
        let residency = match &s.residency {
            Some(r) => self.residency(src, r, &tiers, ctx, span.clone()),
            None => None,
        };
        let (shed, shed_set) = self.shed(src, s, strategy);
        let (criticality, watermarks, shed) = self.criticality(src, s, watermarks, shed, shed_set);
        let rollout = s.rollout.as_ref().and_then(|r| self.rollout(src, s, r));
        Some(Service {
            id: id.to_string(),
            name,
            tiers,
            ttl,
            when_all_down,
            last_known_good,
            strategy,
            residency,
            model: s.model.as_ref().map(|m| m.get_ref().clone()),
            fallback: None,
            max_latency,
            records,
            sticky,
            watermarks,
            shed,
            shed_set,
            criticality,
            rollout,
            ttl_min,
        })
    }

    /// Turns fallback ids into indexes; refuses unknown ids and loops.
    fn resolve_fallbacks(&mut self, services: &mut [Service]) {
        // Indexes by id (unique by now): 10,000 services each falling back
        // to one default were 10,000 scans of the list.
        let index: HashMap<String, usize> = services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let mut places: HashMap<String, ConfigError> = HashMap::new();
        for (id, target, place) in std::mem::take(&mut self.fallbacks) {
            places.insert(id.clone(), place.clone());
            let Some(&from) = index.get(&id) else {
                continue;
            };
            match index.get(&target).copied() {
                Some(to) if to == from => self.errors.push(ConfigError {
                    message: format!("service {id} cannot fall back to itself"),
                    ..place
                }),
                Some(to) => services[from].fallback = Some(to),
                None if self.broken.service(&target) => {}
                None => {
                    let hint = suggest::hint(&target, services.iter().map(|s| s.id.as_str()));
                    self.errors.push(ConfigError {
                        message: format!(
                            "service {id} falls back to unknown service {target:?}{hint}"
                        ),
                        ..place
                    })
                }
            }
        }
        // A chain that comes back to where it started would CNAME forever.
        // Each service is walked once: a walk stops at a service seen
        // before, and a loop is the part of this walk from that service on.
        const NEW: u8 = 0;
        const WALKING: u8 = 1;
        const DONE: u8 = 2;
        let mut state = vec![NEW; services.len()];
        for start in 0..services.len() {
            let mut walk = Vec::new();
            let mut at = Some(start);
            while let Some(i) = at.filter(|&i| state[i] == NEW) {
                state[i] = WALKING;
                walk.push(i);
                at = services[i].fallback;
            }
            if let Some(again) = at.filter(|&i| state[i] == WALKING) {
                let from = walk.iter().position(|&i| i == again).unwrap_or(0);
                let mut cycle = walk[from..].to_vec();
                // Reported once, from the loop's first service in config order.
                let first = (0..cycle.len()).min_by_key(|&k| cycle[k]).unwrap_or(0);
                cycle.rotate_left(first);
                let chain: Vec<&str> = cycle.iter().map(|&i| services[i].id.as_str()).collect();
                let message = format!("fallback loop: {} -> {}", chain.join(" -> "), chain[0]);
                let place = places
                    .get(&services[cycle[0]].id)
                    .cloned()
                    .unwrap_or(ConfigError {
                        file: self.base.clone(),
                        line: 1,
                        col: 1,
                        message: String::new(),
                    });
                self.errors.push(ConfigError { message, ..place });
            }
            for i in walk {
                state[i] = DONE;
            }
        }
    }

    /// Rejects duplicate service names and names that the zone already uses.
    fn cross_check_services(
        &mut self,
        services: Vec<(Service, ConfigError)>,
        zone: Option<&ZoneConfig>,
    ) -> Vec<Service> {
        let zone_names: HashSet<LowerName> = zone
            .map(|z| z.records.iter().map(|r| LowerName::new(&r.name)).collect())
            .unwrap_or_default();
        // Indexes into `services`, not copies (10,000 services at a reload).
        let mut ids: HashMap<&str, usize> = HashMap::with_capacity(services.len());
        let mut by_name: HashMap<LowerName, usize> = HashMap::with_capacity(services.len());
        let mut keep = vec![false; services.len()];
        let mut errors = Vec::new();
        for (i, (service, place)) in services.iter().enumerate() {
            let at = |message: String| ConfigError {
                message,
                ..place.clone()
            };
            if let Some(&first) = ids.get(service.id.as_str()) {
                let first = &services[first].1;
                errors.push(at(format!(
                    "service {} is defined twice, already defined at {}:{}:{}",
                    service.id,
                    first.file.display(),
                    first.line,
                    first.col
                )));
                continue;
            }
            ids.insert(&service.id, i);
            let lower = LowerName::new(&service.name);
            if let Some(&other) = by_name.get(&lower) {
                errors.push(at(format!(
                    "service {} has the same name {} as service {}",
                    service.id, service.name, services[other].0.id
                )));
                continue;
            }
            if zone_names.contains(&lower) {
                errors.push(at(format!(
                    "service {} name {} collides with a record in the zone file or NS glue",
                    service.id, service.name
                )));
                continue;
            }
            by_name.insert(lower, i);
            keep[i] = true;
        }
        drop((ids, by_name));
        self.errors.extend(errors);
        services
            .into_iter()
            .zip(keep)
            .filter_map(|((service, _), keep)| keep.then_some(service))
            .collect()
    }

    fn service_name(&mut self, src: &Source<'_>, n: &Spanned<String>, apex: &Name) -> Option<Name> {
        let text = n.get_ref().as_str();
        let apex_text = apex.to_ascii().to_ascii_lowercase();
        let lower = text.to_ascii_lowercase();
        let absolute = lower.ends_with('.')
            || lower == apex_text.trim_end_matches('.')
            || lower.ends_with(&format!(".{}", apex_text.trim_end_matches('.')));
        let parsed = if absolute {
            Name::from_ascii(text).map(|mut n| {
                n.set_fqdn(true);
                n
            })
        } else {
            Name::from_ascii(text).and_then(|n| n.append_domain(apex))
        };
        parsed
            .map_err(|e| self.err(src, n.span(), format!("{text:?} is not a DNS name: {e}")))
            .ok()
    }

    /// An absolute name of at least two labels: `ns2` alone is a mistake
    /// (it would mean the top-level domain `ns2.`).
    fn full_name(&mut self, src: &Source<'_>, n: &Spanned<String>) -> Option<Name> {
        let name = self.absolute_name(src, n)?;
        if name.num_labels() < 2 {
            self.err(
                src,
                n.span(),
                format!(
                    "{:?} is a single label; write the full name, like ns1.example.com",
                    n.get_ref()
                ),
            );
            return None;
        }
        Some(name)
    }

    fn absolute_name(&mut self, src: &Source<'_>, n: &Spanned<String>) -> Option<Name> {
        match Name::from_ascii(n.get_ref()) {
            Ok(mut name) if !n.get_ref().is_empty() => {
                name.set_fqdn(true);
                Some(name)
            }
            Ok(_) => {
                self.err(src, n.span(), "a name cannot be empty");
                None
            }
            Err(e) => {
                self.err(
                    src,
                    n.span(),
                    format!("{:?} is not a DNS name: {e}", n.get_ref()),
                );
                None
            }
        }
    }

    fn ip(&mut self, src: &Source<'_>, s: &Spanned<String>) -> Option<IpAddr> {
        IpAddr::from_str(s.get_ref())
            .map_err(|_| {
                self.err(
                    src,
                    s.span(),
                    format!("{:?} is not an IPv4 or IPv6 address", s.get_ref()),
                )
            })
            .ok()
    }

    fn socket_addr(&mut self, src: &Source<'_>, s: &Spanned<String>) -> Option<SocketAddr> {
        SocketAddr::from_str(s.get_ref())
            .map_err(|_| {
                self.err(
                    src,
                    s.span(),
                    format!(
                        "{:?} is not an address with a port (like 127.0.0.1:53 or [::1]:53)",
                        s.get_ref()
                    ),
                )
            })
            .ok()
    }

    pub(super) fn duration(
        &mut self,
        src: &Source<'_>,
        s: &Spanned<String>,
        what: &str,
        min: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let d = match humantime::parse_duration(s.get_ref()) {
            Ok(d) => d,
            Err(_) => {
                self.err(
                    src,
                    s.span(),
                    format!(
                        "{what}: expected a duration such as \"500ms\" or \"2s\", found {:?}",
                        s.get_ref()
                    ),
                );
                return None;
            }
        };
        if d < min || d > max {
            self.err(
                src,
                s.span(),
                format!(
                    "{what} {} is out of range ({}..={})",
                    s.get_ref(),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
            return None;
        }
        Some(d)
    }

    fn ttl_in_range(
        &mut self,
        src: &Source<'_>,
        v: &Spanned<u32>,
        what: &str,
        min: u32,
        max: u32,
    ) -> Option<u32> {
        let value = *v.get_ref();
        if value < min || value > max {
            self.err(
                src,
                v.span(),
                format!("{what} {value} is out of range ({min}..={max})"),
            );
            return None;
        }
        Some(value)
    }

    fn count(
        &mut self,
        src: &Source<'_>,
        v: Option<&Spanned<u32>>,
        what: &str,
        default: u32,
    ) -> Option<u32> {
        match v {
            Some(v) => self.ttl_in_range(src, v, what, 1, 100),
            None => Some(default),
        }
    }
}

/// This machine's host name, the default NSID; empty if unknown.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Ids become metric labels and file names: keep them plain.
pub(super) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !id.starts_with('-')
}
