//! Mutual TLS between nodes. Every node holds the cluster CA certificate, its own certificate
//! and its key (the `[tls]` files of its config, made by `cluster`). A connection between two
//! nodes is TLS 1.3 over TCP in which both sides present their node certificate and each
//! verifies the other's against the cluster CA only (never the system roots): the client checks
//! that the server's certificate names the node it meant to reach ([`server_name`]), the server
//! learns which node connected from the client certificate's DNS name ([`peer_node_name`]).
//! All crypto uses the aws-lc-rs provider, given explicitly; no process-default provider is needed.
//! (aws-lc rather than ring: its AES-GCM uses VAES, in its AVX-512 forms where the CPU has
//! them, and seals 16 KiB records about twice as fast as ring's on such a CPU.)

use std::fs;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{valid_node_name, TlsFiles};

/// Protocol versions nodes speak: only TLS 1.3 (both ends are telefork).
static VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// aws-lc-rs, TLS 1.3 suites only, AES-128-GCM first: 128-bit security as TLS's defaults, with
/// 10 AES rounds instead of AES-256's 14 — a process image is gigabytes of it.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites =
        vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(p)
}

/// Server side of a node connection: presents this node's certificate and requires a client
/// certificate signed by the cluster CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>> {
    let roots = load_roots(&files.ca)?;
    let (certs, key) = load_identity(files)?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .with_context(|| format!("client verifier for CA {}", files.ca.display()))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .context("TLS server protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .with_context(|| {
            format!("using certificate {} with key {}", files.cert.display(), files.key.display())
        })?;
    let mut config = config;
    // channel.rs seals and opens records itself with the traffic keys rustls hands over;
    // sessions are never resumed, so no tickets.
    config.enable_secret_extraction = true;
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of a node connection: trusts only the cluster CA and presents this node's
/// certificate. Connect with [`server_name`] of the node meant.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>> {
    let roots = load_roots(&files.ca)?;
    let (certs, key) = load_identity(files)?;
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .with_context(|| format!("server verifier for CA {}", files.ca.display()))?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .context("TLS client protocol versions")?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(certs, key)
        .with_context(|| {
            format!("using certificate {} with key {}", files.cert.display(), files.key.display())
        })?;
    let mut config = config;
    config.enable_secret_extraction = true; // (see server_config)
    Ok(Arc::new(config))
}

/// The node name of a peer: the first DNS name of its end-entity certificate (the first of
/// `certs`, as rustls hands out verified peer chains). `None` if there is none, it does not
/// parse, or it is not a valid node name. Only meaningful on a chain the handshake verified.
pub fn peer_node_name(certs: &[CertificateDer]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let name = san.value.general_names.iter().find_map(|g| match g {
        x509_parser::extensions::GeneralName::DNSName(n) => Some(*n),
        _ => None,
    })?;
    valid_node_name(name).then(|| name.to_string())
}

/// The TLS server name to expect when connecting to `node`.
pub fn server_name(node: &str) -> Result<ServerName<'static>> {
    if !valid_node_name(node) {
        bail!("{node:?} is not a node name (1-63 letters, digits or '-'); node certificates carry only node names");
    }
    match ServerName::try_from(node.to_string()) {
        Ok(n @ ServerName::DnsName(_)) => Ok(n),
        _ => bail!("node name {node:?} is not a valid DNS name"),
    }
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>> {
    let certs = load_certs(path, "CA certificate")?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| anyhow!("CA certificate {}: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

fn load_identity(
    files: &TlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs = load_certs(&files.cert, "node certificate")?;
    let key = load_key(&files.key)?;
    Ok((certs, key))
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {what} {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {} (expected a PEM CERTIFICATE block)", path.display());
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = fs::read(path).with_context(|| format!("reading private key {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("reading private key {}", path.display()))?
        .ok_or_else(|| anyhow!("no private key in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::cluster;

    fn files(dir: &Path, node: &str) -> TlsFiles {
        let (cert, key) = cluster::node_files(dir, node);
        TlsFiles { ca: dir.join(cluster::CA_CERT), cert, key }
    }

    fn cluster_dir(nodes: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        cluster::init(d.path(), &nodes.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        d
    }

    /// What the server side saw: the peer's node name and the bytes it read.
    type ServerSaw = io::Result<(Option<String>, Vec<u8>)>;

    /// One connection over loopback: the server accepts, reads 5 bytes and echoes them; the
    /// client connects expecting `name`, sends "hello" and reads the echo. Returns the server's
    /// outcome and the client's (the server's node name as the client saw it).
    async fn exchange(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> (ServerSaw, io::Result<Option<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_side = async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
            let peer = peer_node_name(tls.get_ref().1.peer_certificates().unwrap_or(&[]));
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.flush().await?;
            tls.shutdown().await?;
            Ok((peer, buf.to_vec()))
        };
        let sni = server_name(name).unwrap();
        let client_side = async move {
            let tcp = TcpStream::connect(addr).await?;
            let mut tls = TlsConnector::from(client).connect(sni, tcp).await?;
            let peer = peer_node_name(tls.get_ref().1.peer_certificates().unwrap_or(&[]));
            tls.write_all(b"hello").await?;
            tls.flush().await?;
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"hello");
            Ok(peer)
        };
        let t = Duration::from_secs(20);
        let (s, c) = tokio::join!(
            tokio::time::timeout(t, server_side),
            tokio::time::timeout(t, client_side)
        );
        (s.expect("server side timed out"), c.expect("client side timed out"))
    }

    /// A client that trusts the cluster CA of `ca` but presents no certificate.
    fn anonymous_client(ca: &Path) -> Arc<ClientConfig> {
        let c = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .unwrap()
            .with_root_certificates(load_roots(ca).unwrap())
            .with_no_client_auth();
        Arc::new(c)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn mutual_tls_between_nodes() {
        let d = cluster_dir(&["node1", "node2"]);
        let server = server_config(&files(d.path(), "node1")).unwrap();
        let client = client_config(&files(d.path(), "node2")).unwrap();
        let (s, c) = exchange(server, client, "node1").await;
        let (peer, data) = s.expect("server handshake");
        assert_eq!(peer.as_deref(), Some("node2"));
        assert_eq!(data, b"hello");
        assert_eq!(c.expect("client").as_deref(), Some("node1"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn client_without_certificate_rejected() {
        let d = cluster_dir(&["node1"]);
        let server = server_config(&files(d.path(), "node1")).unwrap();
        let client = anonymous_client(&d.path().join(cluster::CA_CERT));
        let (s, c) = exchange(server, client, "node1").await;
        // The server's accept fails: it never gets to read an application byte.
        let e = s.expect_err("server accepted a client without certificate");
        assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
        // In TLS 1.3 the client learns of it only when it reads.
        c.expect_err("client without certificate got an answer");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn other_cluster_rejected_both_ways() {
        let a = cluster_dir(&["node1", "node2"]);
        let b = cluster_dir(&["node1", "node2"]);
        // A node2 of cluster b dialling node1 of cluster a: b's client does not trust a's server.
        let server = server_config(&files(a.path(), "node1")).unwrap();
        let client = client_config(&files(b.path(), "node2")).unwrap();
        let (s, c) = exchange(server, client, "node1").await;
        s.expect_err("server accepted a foreign client");
        c.expect_err("client trusted a foreign server");

        // A client trusting cluster a's CA but holding cluster b's certificate: the server
        // (cluster a) must reject the certificate itself.
        let mixed = TlsFiles { ca: a.path().join(cluster::CA_CERT), ..files(b.path(), "node2") };
        let server = server_config(&files(a.path(), "node1")).unwrap();
        let client = client_config(&mixed).unwrap();
        let (s, c) = exchange(server, client, "node1").await;
        // Both CAs are named "telefork cluster CA", so webpki finds the issuer by name and it is
        // the signature check that fails (BadSignature rather than UnknownIssuer).
        let e = s.expect_err("server accepted a client certificate of another CA");
        assert!(e.to_string().contains("invalid peer certificate"), "{e}");
        c.expect_err("client with foreign certificate got an answer");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn wrong_server_name_rejected() {
        let d = cluster_dir(&["node1", "node2", "node3"]);
        let server = server_config(&files(d.path(), "node1")).unwrap();
        let client = client_config(&files(d.path(), "node2")).unwrap();
        let (s, c) = exchange(server, client, "node3").await;
        let e = c.expect_err("client accepted node1 as node3");
        assert!(
            e.to_string().to_lowercase().contains("not valid for name")
                || e.to_string().contains("NotValidForName"),
            "{e}"
        );
        s.expect_err("server handshake should fail on the client's alert");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn node_added_later_is_accepted() {
        let d = cluster_dir(&["node1", "node2"]);
        cluster::add_node(d.path(), "node3").unwrap();
        // node3 as client of node1.
        let server = server_config(&files(d.path(), "node1")).unwrap();
        let client = client_config(&files(d.path(), "node3")).unwrap();
        let (s, c) = exchange(server, client, "node1").await;
        assert_eq!(s.expect("server handshake").0.as_deref(), Some("node3"));
        assert_eq!(c.expect("client").as_deref(), Some("node1"));
        // node3 as server of node2.
        let server = server_config(&files(d.path(), "node3")).unwrap();
        let client = client_config(&files(d.path(), "node2")).unwrap();
        let (s, c) = exchange(server, client, "node3").await;
        assert_eq!(s.expect("server handshake").0.as_deref(), Some("node2"));
        assert_eq!(c.expect("client").as_deref(), Some("node3"));
    }

    #[test]
    fn errors_name_the_file() {
        let d = cluster_dir(&["node1", "node2"]);
        let good = files(d.path(), "node1");
        let err = |f: &TlsFiles| {
            let s = format!("{:#}", server_config(f).unwrap_err());
            let c = format!("{:#}", client_config(f).unwrap_err());
            assert_eq!(s.split(':').next(), c.split(':').next());
            s
        };

        let missing = TlsFiles { ca: d.path().join("nope.pem"), ..good.clone() };
        let e = err(&missing);
        assert!(
            e.starts_with(&format!("reading CA certificate {}: ", missing.ca.display())),
            "{e}"
        );

        let empty = d.path().join("empty");
        fs::write(&empty, "").unwrap();
        let e = err(&TlsFiles { key: empty.clone(), ..good.clone() });
        assert_eq!(e, format!("no private key in {}", empty.display()));
        let e = err(&TlsFiles { cert: empty.clone(), ..good.clone() });
        assert!(e.starts_with(&format!("no certificate in {}", empty.display())), "{e}");
        let e = err(&TlsFiles { ca: empty.clone(), ..good.clone() });
        assert!(e.starts_with(&format!("no certificate in {}", empty.display())), "{e}");

        let bad = d.path().join("bad.pem");
        fs::write(&bad, "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").unwrap();
        let e = err(&TlsFiles { cert: bad.clone(), ..good.clone() });
        assert!(e.contains(&bad.display().to_string()), "{e}");
        // Well-formed PEM whose content is not a certificate.
        fs::write(&bad, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let e = err(&TlsFiles { ca: bad.clone(), ..good.clone() });
        assert!(e.contains(&bad.display().to_string()), "{e}");
        let e = err(&TlsFiles { key: bad.clone(), ..good.clone() });
        assert!(e.contains(&bad.display().to_string()), "{e}");

        // node1's certificate with node2's key.
        let e = err(&TlsFiles { key: files(d.path(), "node2").key, ..good.clone() });
        assert!(e.contains("node1.pem") && e.contains("node2.key"), "{e}");
    }

    #[test]
    fn names() {
        assert!(server_name("node3").is_ok());
        for bad in ["", "10.0.0.2", "::1", "a.b", "-x", "1234", "node1:7077"] {
            assert!(server_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(peer_node_name(&[]), None);
        assert_eq!(peer_node_name(&[CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])]), None);
        let d = cluster_dir(&["node7"]);
        let certs = load_certs(&d.path().join("node7.pem"), "x").unwrap();
        assert_eq!(peer_node_name(&certs).as_deref(), Some("node7"));
        // The CA certificate has no DNS name.
        let ca = load_certs(&d.path().join(cluster::CA_CERT), "x").unwrap();
        assert_eq!(peer_node_name(&ca), None);
    }
}
