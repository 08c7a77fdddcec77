//! Mutual TLS between nodes. Every node holds the cluster CA certificate, its own certificate
//! and its key (the `[tls]` files of its config, made by `cluster`). A connection between two
//! nodes is TLS 1.3 over TCP in which both sides present their node certificate and each
//! verifies the other's against the cluster CA only (never the system roots): the client checks
//! that the server's certificate names the node it meant to reach ([`server_name`]), the server
//! learns which node connected from the client certificate's DNS name ([`peer_node_name`]).
//! All crypto uses the ring provider, given explicitly; no process-default provider is needed.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{valid_node_name, TlsFiles};

/// Protocol versions nodes speak: only TLS 1.3 (both ends are telefork).
static VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
        .with_context(|| format!("using certificate {} with key {}", files.cert.display(), files.key.display()))?;
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
        .with_context(|| format!("using certificate {} with key {}", files.cert.display(), files.key.display()))?;
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

fn load_identity(files: &TlsFiles) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
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
