//! Checks of the model-aware probe settings: the alive probe kind, the
//! model list, the synthetic completion, TLS trust, API keys, cool-down,
//! slow start and the fall count of refused connections.

use std::time::Duration;

use super::check::Checker;
use super::file::ProbeSection;
use super::{CompletionSpec, ModelsSpec, ProbeKind, Secret, Source};

/// Default interval of the model-list probe.
const DEFAULT_MODELS_INTERVAL: Duration = Duration::from_secs(2);
/// The completion probe costs GPU time: every 30 s by default.
const DEFAULT_COMPLETION_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_COMPLETION_TIMEOUT: Duration = Duration::from_secs(5);
/// Cool-down after a 429 that gives no Retry-After.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(10);
/// A refused (or reset) connection is unambiguous: nothing listens. One is
/// enough to take an endpoint down; timeouts and 5xx still need `fall`.
pub const DEFAULT_FALL_REFUSED: u32 = 1;

/// The model-aware part of a region's probe settings.
pub(super) struct Layers {
    pub kind: ProbeKind,
    pub models: Option<ModelsSpec>,
    pub completion: Option<CompletionSpec>,
    pub ca_pem: Option<Vec<u8>>,
    pub api_key: Option<Secret>,
    pub cooldown: Duration,
    pub slow_start: Duration,
    pub fall_refused: u32,
}

impl Checker {
    pub(super) fn layers(&mut self, src: &Source<'_>, p: &ProbeSection) -> Option<Layers> {
        let kind = match p.kind.as_ref().map(|k| (k.get_ref().as_str(), k.span())) {
            None | Some(("http", _)) => ProbeKind::Http,
            Some(("tcp", _)) => ProbeKind::Tcp,
            Some((other, span)) => {
                self.err(
                    src,
                    span,
                    format!("probe kind {other:?} is not http or tcp"),
                );
                ProbeKind::Http
            }
        };
        let models = match &p.models_path {
            Some(path) => {
                self.path(src, path);
                let interval = match &p.models_interval {
                    Some(i) => self.duration(
                        src,
                        i,
                        "models-interval",
                        Duration::from_millis(100),
                        Duration::from_secs(3600),
                    )?,
                    None => DEFAULT_MODELS_INTERVAL,
                };
                Some(ModelsSpec {
                    path: path.get_ref().clone(),
                    interval,
                    version_field: p.models_version_field.as_ref().map(|f| f.get_ref().clone()),
                })
            }
            None => {
                if let Some(i) = &p.models_interval {
                    self.err(src, i.span(), "models-interval needs models-path");
                }
                if let Some(f) = &p.models_version_field {
                    self.err(src, f.span(), "models-version-field needs models-path");
                }
                None
            }
        };
        let completion = match &p.completion {
            Some(c) => {
                let path = c
                    .path
                    .as_ref()
                    .map_or("/v1/chat/completions".to_string(), |p| {
                        self.path(src, p);
                        p.get_ref().clone()
                    });
                let interval = match &c.interval {
                    Some(i) => self.duration(
                        src,
                        i,
                        "completion interval",
                        Duration::from_secs(1),
                        Duration::from_secs(86_400),
                    )?,
                    None => DEFAULT_COMPLETION_INTERVAL,
                };
                let timeout = match &c.timeout {
                    Some(t) => self.duration(
                        src,
                        t,
                        "completion timeout",
                        Duration::from_millis(100),
                        Duration::from_secs(120),
                    )?,
                    None => DEFAULT_COMPLETION_TIMEOUT,
                };
                if c.model.get_ref().is_empty() {
                    self.err(src, c.model.span(), "completion needs a model id");
                }
                Some(CompletionSpec {
                    path,
                    model: c.model.get_ref().clone(),
                    interval,
                    timeout,
                })
            }
            None => None,
        };
        if kind == ProbeKind::Tcp && (models.is_some() || completion.is_some()) {
            let span = p.kind.as_ref().map_or(0..0, |k| k.span());
            self.err(
                src,
                span,
                "a tcp probe cannot read models or completions; use kind = \"http\"",
            );
        }
        let ca_pem = p.ca_file.as_ref().and_then(|file| self.ca_file(src, file));
        let api_key = match (&p.api_key_file, &p.api_key_env) {
            (Some(_), Some(env)) => {
                self.err(src, env.span(), "api-key-file and api-key-env: choose one");
                None
            }
            (Some(file), None) => self.secret_file(src, file, "API key"),
            (None, Some(env)) => match std::env::var(env.get_ref()) {
                Ok(key) if !key.trim().is_empty() => Some(Secret(key.trim().to_string())),
                _ => {
                    self.err(
                        src,
                        env.span(),
                        format!("environment variable {} is not set", env.get_ref()),
                    );
                    None
                }
            },
            (None, None) => None,
        };
        let cooldown = match &p.cooldown {
            Some(c) => self.duration(
                src,
                c,
                "cooldown",
                Duration::from_millis(100),
                Duration::from_secs(3600),
            )?,
            None => DEFAULT_COOLDOWN,
        };
        let slow_start = match &p.slow_start {
            Some(s) => self.duration(
                src,
                s,
                "slow-start",
                Duration::ZERO,
                Duration::from_secs(3600),
            )?,
            None => Duration::ZERO,
        };
        let fall_refused = match &p.fall_refused {
            Some(v) if (1..=100).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                self.err(
                    src,
                    v.span(),
                    format!("fall-refused {} is not in 1..=100", v.get_ref()),
                );
                DEFAULT_FALL_REFUSED
            }
            None => DEFAULT_FALL_REFUSED,
        };
        Some(Layers {
            fall_refused,
            kind,
            models,
            completion,
            ca_pem,
            api_key,
            cooldown,
            slow_start,
        })
    }

    fn path(&mut self, src: &Source<'_>, path: &toml::Spanned<String>) {
        let p = path.get_ref();
        if !p.starts_with('/') || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.err(
                src,
                path.span(),
                format!("path {p:?} must start with '/' and have no spaces"),
            );
        }
    }
}

impl Checker {
    /// The PEM certificate in `file` (relative to the main file), or an
    /// error at its position.
    pub(super) fn ca_file(
        &mut self,
        src: &Source<'_>,
        file: &toml::Spanned<String>,
    ) -> Option<Vec<u8>> {
        let path = self.base.join(file.get_ref());
        match std::fs::read(&path) {
            Ok(pem) if reqwest::Certificate::from_pem(&pem).is_ok() => Some(pem),
            Ok(_) => {
                self.err(
                    src,
                    file.span(),
                    format!("{} is not a PEM certificate", path.display()),
                );
                None
            }
            Err(e) => {
                self.err(
                    src,
                    file.span(),
                    format!("cannot read CA file {}: {e}", path.display()),
                );
                None
            }
        }
    }
}
