//! Checks of the location settings: GeoIP and ECS, client groups, network
//! overrides, region locations, service strategies and residency rules
//! (contradictions are refused).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::check::{Checker, Ctx, valid_id};
use super::file::{
    Allow, LocationSection, MainFile, OverrideSection, ResidencySection, ServiceSection,
};
use super::{
    Allowed, GeoConfig, Override, Place, Region, Residency, ResidencyRule, Source, Strategy,
};
use crate::geo::{CONTINENTS, Code, EU_EEA, code, code_str};

/// Default time between checks for a replaced GeoIP database file.
const DEFAULT_GEOIP_CHECK: Duration = Duration::from_secs(60);
/// Default proximity band.
const DEFAULT_TOLERANCE: Duration = Duration::from_millis(10);

/// What a residency rule's `clients` entry names.
enum Selector {
    Country(Code),
    Continent(Code),
}

impl Checker {
    pub(super) fn geo_config(&mut self, src: &Source<'_>, file: &MainFile) -> Option<GeoConfig> {
        let database = file
            .geoip
            .database
            .as_ref()
            .map(|d| self.base.join(d.get_ref()));
        if let (Some(path), Some(d), true) = (&database, &file.geoip.database, self.open_geoip) {
            // The real loader: a database that does not load is a config error.
            if let Err(e) = crate::geo::GeoDb::load(path) {
                self.err(src, d.span(), e.to_string());
            }
        }
        let check_interval = match &file.geoip.check_interval {
            Some(i) => self.duration(
                src,
                i,
                "geoip.check-interval",
                Duration::from_secs(1),
                Duration::from_secs(86_400),
            )?,
            None => DEFAULT_GEOIP_CHECK,
        };
        let mut prefix = |v: &Option<Spanned<u8>>, max: u8, default: u8, what: &str| match v {
            Some(p) if *p.get_ref() == 0 || *p.get_ref() > max => {
                self.err(
                    src,
                    p.span(),
                    format!("ecs.{what} {} is out of range (1..={max})", p.get_ref()),
                );
                default
            }
            Some(p) => *p.get_ref(),
            None => default,
        };
        let max_prefix_v4 = prefix(&file.ecs.max_prefix_v4, 32, 24, "max-prefix-v4");
        let max_prefix_v6 = prefix(&file.ecs.max_prefix_v6, 128, 56, "max-prefix-v6");
        Some(GeoConfig {
            database,
            check_interval,
            ecs: file.ecs.enabled.unwrap_or(true),
            max_prefix_v4,
            max_prefix_v6,
        })
    }

    /// The client groups: the built-in `eu` (EU and EEA) and the config's.
    pub(super) fn groups(
        &mut self,
        src: &Source<'_>,
        groups: &BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    ) -> HashMap<String, Vec<Code>> {
        let mut out = HashMap::new();
        // The one list of codes (crate::geo::EU_EEA); a rule naming `eu` also
        // holds clients the database flags (ResidencyRule::eu).
        out.insert(
            "eu".to_string(),
            EU_EEA.iter().filter_map(|c| code(c)).collect(),
        );
        for (name, members) in groups {
            if name == "eu" || !valid_id(name) {
                self.err(
                    src,
                    members.span(),
                    format!("group {name:?}: names are lowercase ids, and `eu` is built in (the EU and EEA)"),
                );
                continue;
            }
            let mut countries = Vec::new();
            for m in members.get_ref() {
                match country(m.get_ref()) {
                    Some(c) => countries.push(c),
                    None => self.err(
                        src,
                        m.span(),
                        format!("{:?} is not a two-letter country code like DE", m.get_ref()),
                    ),
                }
            }
            out.insert(name.clone(), countries);
        }
        out
    }

    pub(super) fn location(&mut self, src: &Source<'_>, l: &LocationSection) -> Option<Place> {
        let mut ok = true;
        if !(-90.0..=90.0).contains(l.lat.get_ref()) {
            self.err(
                src,
                l.lat.span(),
                format!("latitude {} is out of range (-90..=90)", l.lat.get_ref()),
            );
            ok = false;
        }
        if !(-180.0..=180.0).contains(l.lon.get_ref()) {
            self.err(
                src,
                l.lon.span(),
                format!("longitude {} is out of range (-180..=180)", l.lon.get_ref()),
            );
            ok = false;
        }
        let country = self.country_field(src, l.country.as_ref(), &mut ok);
        let continent = self.continent_field(src, l.continent.as_ref(), &mut ok);
        ok.then_some(Place {
            country,
            continent,
            coords: Some((*l.lat.get_ref(), *l.lon.get_ref())),
        })
    }

    fn country_field(
        &mut self,
        src: &Source<'_>,
        v: Option<&Spanned<String>>,
        ok: &mut bool,
    ) -> Option<Code> {
        self.code_field(
            src,
            v,
            ok,
            country,
            "a two-letter country code like DE".into(),
        )
    }

    fn continent_field(
        &mut self,
        src: &Source<'_>,
        v: Option<&Spanned<String>>,
        ok: &mut bool,
    ) -> Option<Code> {
        let what = format!("a continent code ({})", CONTINENTS.join(", "));
        self.code_field(src, v, ok, continent, what)
    }

    /// An optional code parsed by `parse`; a bad one is an error naming `what`.
    fn code_field(
        &mut self,
        src: &Source<'_>,
        v: Option<&Spanned<String>>,
        ok: &mut bool,
        parse: fn(&str) -> Option<Code>,
        what: String,
    ) -> Option<Code> {
        let v = v?;
        let code = parse(v.get_ref());
        if code.is_none() {
            self.err(src, v.span(), format!("{:?} is not {what}", v.get_ref()));
            *ok = false;
        }
        code
    }

    pub(super) fn overrides(
        &mut self,
        src: &Source<'_>,
        overrides: &[Spanned<OverrideSection>],
        regions: &[Region],
    ) -> Vec<Override> {
        let mut out = Vec::new();
        for o in overrides {
            let span = o.span();
            let o = o.get_ref();
            let mut ok = true;
            let place = match &o.region {
                Some(r) => {
                    if o.country.is_some()
                        || o.continent.is_some()
                        || o.lat.is_some()
                        || o.lon.is_some()
                    {
                        self.err(
                            src,
                            r.span(),
                            "an override pins to a region or to a location, not both",
                        );
                        ok = false;
                    }
                    match regions.iter().find(|x| x.id == *r.get_ref()) {
                        Some(Region {
                            location: Some(place),
                            ..
                        }) => *place,
                        Some(_) => {
                            self.err(
                                src,
                                r.span(),
                                format!("region {} has no location to pin clients to", r.get_ref()),
                            );
                            continue;
                        }
                        None if self.broken.region(r.get_ref()) => continue,
                        None => {
                            let hint = super::suggest::hint(
                                r.get_ref(),
                                regions.iter().map(|x| x.id.as_str()),
                            );
                            self.err(
                                src,
                                r.span(),
                                format!(
                                    "override refers to unknown region {:?}{hint}",
                                    r.get_ref()
                                ),
                            );
                            continue;
                        }
                    }
                }
                None => {
                    let country = self.country_field(src, o.country.as_ref(), &mut ok);
                    let continent = self.continent_field(src, o.continent.as_ref(), &mut ok);
                    let coords = match (o.lat, o.lon) {
                        (Some(lat), Some(lon))
                            if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) =>
                        {
                            Some((lat, lon))
                        }
                        (None, None) => None,
                        _ => {
                            self.err(
                                src,
                                span.clone(),
                                "an override needs both lat and lon, in range, or neither",
                            );
                            ok = false;
                            None
                        }
                    };
                    if country.is_none() && continent.is_none() && coords.is_none() && ok {
                        self.err(
                            src,
                            span.clone(),
                            "an override needs region, or country / continent / lat+lon",
                        );
                        ok = false;
                    }
                    Place {
                        country,
                        continent,
                        coords,
                    }
                }
            };
            if o.networks.is_empty() {
                self.err(src, span.clone(), "an override needs at least one network");
            }
            for n in &o.networks {
                match n.get_ref().parse::<ipnet::IpNet>() {
                    Ok(net) if ok => out.push(Override {
                        network: net.trunc(),
                        place,
                        region: o.region.as_ref().map(|r| r.get_ref().clone()),
                    }),
                    Ok(_) => {}
                    Err(_) => self.err(
                        src,
                        n.span(),
                        format!("{:?} is not a network like 10.1.0.0/16", n.get_ref()),
                    ),
                }
            }
        }
        for (i, a) in out.iter().enumerate() {
            if out[..i].iter().any(|b| b.network == a.network) {
                self.err(
                    src,
                    0..0,
                    format!("network {} is overridden twice", a.network),
                );
            }
        }
        // Longest prefix first: the most specific override wins.
        out.sort_by_key(|o| std::cmp::Reverse(o.network.prefix_len()));
        out
    }

    pub(super) fn strategy(
        &mut self,
        src: &Source<'_>,
        s: &ServiceSection,
        tiers: &[Vec<usize>],
        ctx: &Ctx<'_>,
    ) -> Strategy {
        let tolerance = match &s.proximity_tolerance {
            Some(t) => self
                .duration(
                    src,
                    t,
                    "proximity-tolerance",
                    Duration::ZERO,
                    Duration::from_secs(10),
                )
                .unwrap_or(DEFAULT_TOLERANCE),
            None => DEFAULT_TOLERANCE,
        };
        match s
            .strategy
            .as_ref()
            .map(|x| (x.get_ref().as_str(), x.span()))
        {
            None | Some(("failover", _)) => Strategy::Failover,
            Some(("proximity", span)) => {
                if !ctx.has_geoip {
                    self.err(
                        src,
                        span.clone(),
                        "strategy proximity needs [geoip] database to locate clients",
                    );
                }
                for &r in tiers.iter().flatten() {
                    if ctx.regions[r].location.and_then(|l| l.coords).is_none() {
                        self.err(
                            src,
                            span.clone(),
                            format!(
                                "strategy proximity needs a location for region {}",
                                ctx.regions[r].id
                            ),
                        );
                    }
                }
                Strategy::Proximity { tolerance }
            }
            Some(("capacity", _)) => Strategy::Capacity,
            Some(("cost", span)) => {
                let min_headroom = match &s.min_headroom {
                    Some(h) if !(0.0..1.0).contains(h.get_ref()) => {
                        self.err(
                            src,
                            h.span(),
                            format!("min-headroom {} must be in 0..1", h.get_ref()),
                        );
                        super::capacity::DEFAULT_MIN_HEADROOM
                    }
                    Some(h) => *h.get_ref(),
                    None => super::capacity::DEFAULT_MIN_HEADROOM,
                };
                for &r in tiers.iter().flatten() {
                    if ctx.regions[r].capacity.cost.is_none() {
                        self.err(
                            src,
                            span.clone(),
                            format!(
                                "strategy cost needs capacity.cost for region {}",
                                ctx.regions[r].id
                            ),
                        );
                    }
                }
                Strategy::Cost { min_headroom }
            }
            Some((other, span)) => {
                let hint =
                    super::suggest::hint(other, ["failover", "proximity", "capacity", "cost"]);
                self.err(
                    src,
                    span,
                    format!(
                        "strategy {other:?} is not failover, proximity, capacity or cost{hint}"
                    ),
                );
                Strategy::Failover
            }
        }
    }

    pub(super) fn residency(
        &mut self,
        src: &Source<'_>,
        r: &ResidencySection,
        tiers: &[Vec<usize>],
        ctx: &Ctx<'_>,
        span: Range<usize>,
    ) -> Option<Residency> {
        if !ctx.has_geoip {
            self.err(
                src,
                span.clone(),
                "residency rules need [geoip] database to locate clients",
            );
        }
        // Jurisdictions the service's regions carry.
        let carried: Vec<&str> = tiers
            .iter()
            .flatten()
            .flat_map(|&i| ctx.regions[i].jurisdictions.iter().map(String::as_str))
            .collect();
        let mut rules = Vec::new();
        // Which rule (and how) named each country / continent, for contradictions.
        let mut by_country: HashMap<Code, (usize, String)> = HashMap::new();
        let mut by_continent: HashMap<Code, (usize, String)> = HashMap::new();
        for (i, rule) in r.rules.iter().enumerate() {
            let rule_span = rule.span();
            let rule = rule.get_ref();
            if rule.clients.is_empty() || rule.allow.is_empty() {
                self.err(
                    src,
                    rule_span.clone(),
                    "a residency rule needs clients and allow",
                );
            }
            let allow_list: Vec<Spanned<String>> = rule.allow.clone();
            let allow = self.allowed_list(src, &allow_list, &carried);
            let mut countries = Vec::new();
            let mut continents = Vec::new();
            let mut eu = false;
            for client in &rule.clients {
                let named = client.get_ref();
                eu |= named == "eu";
                let selectors: Vec<Selector> = if let Some(c) = named.strip_prefix("continent:") {
                    match continent(c) {
                        Some(c) => vec![Selector::Continent(c)],
                        None => {
                            self.err(
                                src,
                                client.span(),
                                format!(
                                    "{c:?} is not a continent code ({})",
                                    CONTINENTS.join(", ")
                                ),
                            );
                            continue;
                        }
                    }
                } else if let Some(c) = country(named) {
                    vec![Selector::Country(c)]
                } else if let Some(members) = ctx.groups.get(named.as_str()) {
                    members.iter().map(|c| Selector::Country(*c)).collect()
                } else {
                    self.err(
                        src,
                        client.span(),
                        format!("{named:?} is not a country (DE), a continent (continent:EU) or a group (eu, or one in [groups])"),
                    );
                    continue;
                };
                for sel in selectors {
                    let (map, key, list, what) = match sel {
                        Selector::Country(c) => (&mut by_country, c, &mut countries, "country"),
                        Selector::Continent(c) => {
                            (&mut by_continent, c, &mut continents, "continent")
                        }
                    };
                    if let Some((other, via)) = map.get(&key) {
                        if *other != i
                            && rules
                                .get(*other)
                                .is_some_and(|o: &ResidencyRule| o.allow != allow)
                        {
                            let message = format!(
                                "residency rules contradict: {what} {} is in rule {} (as {via}) and in rule {} (as {named}) with different allow lists",
                                code_str(&key),
                                other + 1,
                                i + 1
                            );
                            self.err(src, client.span(), message);
                        }
                        continue;
                    }
                    map.insert(key, (i, named.clone()));
                    list.push(key);
                }
            }
            let label: Vec<&str> = rule.clients.iter().map(|c| c.get_ref().as_str()).collect();
            rules.push(ResidencyRule {
                countries,
                continents,
                eu,
                allow,
                label: label.join(","),
            });
        }
        let otherwise = self.allowed(src, r.otherwise.as_ref(), Allowed::Any, &carried);
        let unknown = self.allowed(src, r.unknown_location.as_ref(), Allowed::Deny, &carried);
        let without_ecs_unknown = match r
            .without_ecs
            .as_ref()
            .map(|w| (w.get_ref().as_str(), w.span()))
        {
            None | Some(("resolver", _)) => false,
            Some(("unknown", _)) => true,
            Some((other, span)) => {
                self.err(
                    src,
                    span,
                    format!("without-ecs {other:?} is not resolver or unknown"),
                );
                false
            }
        };
        Some(Residency {
            rules,
            otherwise,
            unknown,
            without_ecs_unknown,
        })
    }

    fn allowed(
        &mut self,
        src: &Source<'_>,
        v: Option<&Spanned<Allow>>,
        default: Allowed,
        carried: &[&str],
    ) -> Allowed {
        let Some(v) = v else { return default };
        match v.get_ref() {
            Allow::Word(w) if w == "any" => Allowed::Any,
            Allow::Word(w) if w == "deny" => Allowed::Deny,
            Allow::Word(w) => {
                self.err(
                    src,
                    v.span(),
                    format!("{w:?} is not \"any\", \"deny\" or a list of jurisdictions"),
                );
                default
            }
            Allow::List(list) => {
                let spanned: Vec<Spanned<String>> = list
                    .iter()
                    .map(|t| Spanned::new(v.span(), t.clone()))
                    .collect();
                self.allowed_list(src, &spanned, carried)
            }
        }
    }

    fn allowed_list(
        &mut self,
        src: &Source<'_>,
        list: &[Spanned<String>],
        carried: &[&str],
    ) -> Allowed {
        let mut tags = Vec::new();
        for tag in list {
            if !carried.contains(&tag.get_ref().as_str()) {
                self.err(
                    src,
                    tag.span(),
                    format!(
                        "no region of this service carries jurisdiction {:?}",
                        tag.get_ref()
                    ),
                );
            }
            tags.push(tag.get_ref().clone());
        }
        tags.sort();
        tags.dedup();
        if tags.is_empty() {
            Allowed::Deny
        } else {
            Allowed::Only(tags)
        }
    }
}

/// Two uppercase letters: a country code as written in configs.
fn country(s: &str) -> Option<Code> {
    (s.len() == 2 && s.bytes().all(|b| b.is_ascii_uppercase()))
        .then(|| code(s))
        .flatten()
}

fn continent(s: &str) -> Option<Code> {
    CONTINENTS.contains(&s).then(|| code(s)).flatten()
}
