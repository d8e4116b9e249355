//! HTTPS probes against a real TLS server on loopback: SNI and the
//! certificate's name, trust through a private CA file, the API key sent as
//! a bearer token (and never shown).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, base_config, http};
use hickory_proto::rr::RecordType;
use inferdns::demo::client::answer_strings;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const NAME: &str = "vllm.internal.test";
const KEY: &str = "k3y-that-must-not-leak";

/// A private CA (PEM) and a server certificate for `NAME` it signed (DER, key DER).
fn pki() -> (String, Vec<u8>, Vec<u8>) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::CrlSign,
    ];
    ca.distinguished_name
        .push(DnType::CommonName, "inferdns test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec![NAME.to_string()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.distinguished_name.push(DnType::CommonName, NAME);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    (
        ca_cert.pem(),
        leaf_cert.der().to_vec(),
        leaf_key.serialize_der(),
    )
}

/// What the TLS server saw last: SNI and the request head.
#[derive(Default)]
struct Seen {
    sni: Option<String>,
    head: String,
}

/// A TLS server on 127.0.0.95 answering 200 to everything.
async fn tls_server(cert: Vec<u8>, key: Vec<u8>) -> (std::net::SocketAddr, Arc<Mutex<Seen>>) {
    inferdns::health::probe::install_crypto_provider();
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.95:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                *seen.lock().unwrap() = Seen {
                    sni,
                    head: String::from_utf8_lossy(&head).into_owned(),
                };
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, seen)
}

fn config(port: u16, probe: &str) -> String {
    base_config(&format!(
        r#"
[regions.tls]
endpoints = [{{ address = "127.0.0.95", port = {port} }}]
probe = {{ scheme = "https", path = "/health", interval = "100ms", timeout = "1s", {probe} }}

[services.secure]
tiers = [["tls"]]
when-all-down = "nodata"
"#
    ))
}

async fn last_error(s: &Server) -> (String, String) {
    let (_, body) = http(
        "GET",
        &format!("http://{}/v1/status", s.running.admin),
        None,
        None,
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let e = &v["endpoints"][0];
    (
        e["status"].as_str().unwrap().to_string(),
        e["last_error"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test]
async fn a_private_ca_is_trusted_with_sni_and_the_api_key() {
    let (ca, cert, key) = pki();
    let (addr, seen) = tls_server(cert, key).await;
    let probe = format!(r#"tls-server-name = "{NAME}", ca-file = "ca.pem", api-key-file = "key""#);
    let files = common::Files::new();
    files.write("ca.pem", &ca);
    files.write("key", KEY);
    // The files sit beside the config: write the config there too.
    let path = files.write("inferdns.toml", &config(addr.port(), &probe));
    files.write("zone.db", common::ZONE);
    let loaded = inferdns::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let running = inferdns::app::start(loaded, inferdns::app::StartOptions::default())
        .await
        .unwrap();
    let s = Server { running, files };
    let m = s.udp("secure.inference.example.com.", RecordType::A).await;
    assert_eq!(
        answer_strings(&m),
        ["127.0.0.95"],
        "{:?}",
        last_error(&s).await
    );
    let (sni, head) = {
        let seen = seen.lock().unwrap();
        (seen.sni.clone(), seen.head.to_ascii_lowercase())
    };
    assert_eq!(
        sni.as_deref(),
        Some(NAME),
        "SNI is the configured server name"
    );
    assert!(
        head.contains(&format!(
            "authorization: bearer {}",
            KEY.to_ascii_lowercase()
        )),
        "{head}"
    );
    // The key is in no status or metrics output.
    for path in ["/v1/status", "/metrics"] {
        let (_, body) = http(
            "GET",
            &format!("http://{}{path}", s.running.admin),
            None,
            None,
        )
        .await;
        assert!(!body.contains(KEY), "{path} shows the API key");
    }
}

#[tokio::test]
async fn an_untrusted_certificate_or_a_wrong_name_is_a_tls_failure() {
    let (_, cert, key) = pki();
    let (addr, _) = tls_server(cert, key).await;
    // Without the private CA: the system roots do not know it.
    let s = Server::start(&config(
        addr.port(),
        &format!(r#"tls-server-name = "{NAME}""#),
    ))
    .await;
    assert!(
        answer_strings(&s.udp("secure.inference.example.com.", RecordType::A).await).is_empty()
    );
    let (status, error) = last_error(&s).await;
    assert_eq!(status, "down");
    assert!(
        error.starts_with("TLS:") && error.contains("UnknownIssuer"),
        "{error}"
    );

    // Trusted CA, but the certificate is not for the name we ask for.
    let (ca, cert, key) = pki();
    let (addr, _) = tls_server(cert, key).await;
    let files = common::Files::new();
    files.write("ca.pem", &ca);
    files.write("zone.db", common::ZONE);
    let path = files.write(
        "inferdns.toml",
        &config(
            addr.port(),
            r#"tls-server-name = "other.internal.test", ca-file = "ca.pem""#,
        ),
    );
    let loaded = inferdns::config::load(&path).unwrap();
    let running = inferdns::app::start(loaded, inferdns::app::StartOptions::default())
        .await
        .unwrap();
    let s = Server { running, files };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, error) = last_error(&s).await;
    assert_eq!(status, "down");
    assert!(
        error.starts_with("TLS:") && error.contains("not valid for name"),
        "{error}"
    );
}
