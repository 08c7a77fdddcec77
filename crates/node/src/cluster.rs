//! The cluster's certificate authority and its node certificates (`telefork cluster init`,
//! `telefork cluster add-node`). One directory holds `ca.pem` + `ca.key` (the CA, ECDSA P-256,
//! path length 0) and, per node, `<node>.pem` + `<node>.key`: a P-256 certificate whose DNS SAN
//! and CN are the node's name, usable as TLS server and client certificate. Keys are written
//! 0600, certificates 0644, each complete or not at all and never through a symlink
//! (`safe_file`). The administrator then copies `ca.pem`, `<node>.pem` and `<node>.key` to each node's
//! `/etc/telefork/` (the `[tls]` section of its config, see `tls`); `ca.key` stays on the admin
//! machine. There is no revocation: dropping a node means re-initialising the cluster.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::config::valid_node_name;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const CA_NAME: &str = "telefork cluster CA";
/// How long the CA is valid.
const CA_DAYS: i64 = 20 * 365;
/// How long a node certificate is valid (never beyond the CA).
const NODE_DAYS: i64 = 10 * 365;

/// Paths of a node's certificate and key in a cluster directory.
pub fn node_files(dir: &Path, node: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{node}.pem")), dir.join(format!("{node}.key")))
}

/// Creates a new cluster CA and one certificate per node in `dir`; refuses if `dir/ca.key` exists.
pub fn init(dir: &Path, nodes: &[String]) -> Result<()> {
    init_with(dir, nodes, false)
}

/// Like [`init`]; with `overwrite`, replaces an existing CA (every old node certificate then
/// stops being accepted by nodes that get the new `ca.pem`).
pub fn init_with(dir: &Path, nodes: &[String], overwrite: bool) -> Result<()> {
    for (i, n) in nodes.iter().enumerate() {
        check_name(n)?;
        if nodes[..i].iter().any(|m| m.eq_ignore_ascii_case(n)) {
            bail!("node name {n:?} given twice (names are case-insensitive)");
        }
    }
    let ca_key_path = dir.join(CA_KEY);
    if !overwrite && fs::symlink_metadata(&ca_key_path).is_ok() {
        bail!("{} already exists: this directory already holds a cluster CA (use add-node, or overwrite explicitly)", ca_key_path.display());
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let now = OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating the CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(CA_DAYS);
    let ca_cert = params.self_signed(&ca_key).context("signing the CA certificate")?;

    // Node files first, CA last: a failure part-way leaves no ca.key, so a retry is not refused.
    for n in nodes {
        write_node(dir, n, &ca_cert, &ca_key, true)?;
    }
    write_file(&dir.join(CA_CERT), ca_cert.pem().as_bytes(), 0o644, true)?;
    write_file(&ca_key_path, ca_key.serialize_pem().as_bytes(), 0o600, true)?;
    Ok(())
}

/// Signs a certificate for one more node with the CA already in `dir`. Refuses if a node of
/// that name (case-insensitively) already has a key there.
pub fn add_node(dir: &Path, node: &str) -> Result<()> {
    check_name(node)?;
    let (ca_cert, ca_key) = load_ca(dir)?;
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".key") {
                if stem.eq_ignore_ascii_case(node) {
                    bail!(
                        "{} already exists: node {node:?} already has a certificate",
                        dir.join(&*name).display()
                    );
                }
            }
        }
    }
    write_node(dir, node, &ca_cert, &ca_key, false)
}

fn check_name(n: &str) -> Result<()> {
    if !valid_node_name(n) {
        bail!("node name {n:?} must be 1-63 letters, digits or '-'");
    }
    // A node "ca" would write ca.pem/ca.key over the CA.
    if n.eq_ignore_ascii_case("ca") {
        bail!("node name {n:?} is reserved (the CA's files are ca.pem and ca.key)");
    }
    // The name must also be usable as a TLS server name (no leading/trailing '-', not all digits...).
    if !matches!(
        rustls::pki_types::ServerName::try_from(n),
        Ok(rustls::pki_types::ServerName::DnsName(_))
    ) {
        bail!(
            "node name {n:?} is not a valid DNS name (no leading or trailing '-', not all digits)"
        );
    }
    Ok(())
}

/// Loads `dir/ca.pem` and `dir/ca.key` as an issuer usable by rcgen: the parameters are read back
/// from the certificate and re-signed in memory with the key, which reproduces the subject and
/// key identifier that signed node certificates must name as their issuer.
fn load_ca(dir: &Path) -> Result<(Certificate, KeyPair)> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let cert_pem = fs::read_to_string(&cert_path)
        .with_context(|| format!("reading CA certificate {}", cert_path.display()))?;
    let key_pem = fs::read_to_string(&key_path)
        .with_context(|| format!("reading CA key {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("no usable private key in {}", key_path.display()))?;
    let der = pem_cert_der(&cert_pem)
        .with_context(|| format!("no certificate in {}", cert_path.display()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("parsing CA certificate {}: {e}", cert_path.display()))?;
    if x509.public_key().raw != key.public_key_der().as_slice() {
        bail!(
            "CA key {} does not belong to CA certificate {}",
            key_path.display(),
            cert_path.display()
        );
    }
    let params = CertificateParams::from_ca_cert_der(&der.clone().into())
        .with_context(|| format!("parsing CA certificate {}", cert_path.display()))?;
    if !matches!(params.is_ca, IsCa::Ca(_)) {
        bail!("{} is not a CA certificate", cert_path.display());
    }
    let cert =
        params.self_signed(&key).with_context(|| format!("loading CA {}", cert_path.display()))?;
    Ok((cert, key))
}

fn pem_cert_der(pem: &str) -> Result<Vec<u8>> {
    let mut r = pem.as_bytes();
    let first = rustls_pemfile::certs(&mut r).next();
    match first {
        Some(Ok(c)) => Ok(c.to_vec()),
        Some(Err(e)) => Err(e.into()),
        None => bail!("no PEM CERTIFICATE block"),
    }
}

fn write_node(
    dir: &Path,
    node: &str,
    ca: &Certificate,
    ca_key: &KeyPair,
    overwrite: bool,
) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a node key")?;
    let mut params = CertificateParams::new(vec![node.to_string()])
        .with_context(|| format!("parameters for node {node}"))?;
    params.distinguished_name.push(DnType::CommonName, node);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - Duration::days(1);
    params.not_after = std::cmp::min(now + Duration::days(NODE_DAYS), ca.params().not_after);
    let cert = params
        .signed_by(&key, ca, ca_key)
        .with_context(|| format!("signing the certificate of node {node}"))?;
    let (cert_path, key_path) = node_files(dir, node);
    write_file(&cert_path, cert.pem().as_bytes(), 0o644, overwrite)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, overwrite)?;
    Ok(())
}

/// Writes `data` to `path` with `mode`, never half-written, with other permissions or through a
/// symlink (see `safe_file`); without `overwrite`, refuses an existing `path`.
fn write_file(path: &Path, data: &[u8], mode: u32, overwrite: bool) -> Result<()> {
    crate::safe_file::write_file(path, data, mode, overwrite)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn init_writes_files_and_refuses_overwrite() {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &names(&["node1", "node2"])).unwrap();
        for f in ["ca.pem", "ca.key", "node1.pem", "node1.key", "node2.pem", "node2.key"] {
            assert!(d.path().join(f).exists(), "{f}");
        }
        for f in ["ca.key", "node1.key", "node2.key"] {
            let m = fs::metadata(d.path().join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, 0o600, "{f}");
        }
        let e = init(d.path(), &names(&["node1"])).unwrap_err();
        assert!(format!("{e:#}").contains("ca.key already exists"), "{e:#}");
        let old = fs::read(d.path().join("ca.pem")).unwrap();
        init_with(d.path(), &names(&["node1"]), true).unwrap();
        assert_ne!(old, fs::read(d.path().join("ca.pem")).unwrap());
    }

    #[test]
    fn bad_names_rejected() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["", "ca", "CA", "a.b", "a/b", "../x", "-x", "x-", "1234", &"a".repeat(64)] {
            assert!(init(d.path(), &names(&[bad])).is_err(), "{bad:?}");
        }
        assert!(init(d.path(), &names(&["n1", "N1"])).is_err());
        assert!(!d.path().join("ca.key").exists());
        init(d.path(), &names(&["n1"])).unwrap();
        assert!(add_node(d.path(), "n1").is_err());
        assert!(add_node(d.path(), "N1").is_err());
        assert!(add_node(d.path(), "ca").is_err());
        assert!(add_node(d.path(), "x/y").is_err());
        add_node(d.path(), "n2").unwrap();
    }

    #[test]
    fn add_node_bad_ca_files() {
        let d = tempfile::tempdir().unwrap();
        let e = add_node(d.path(), "n1").unwrap_err();
        assert!(format!("{e:#}").contains("reading CA certificate"), "{e:#}");
        init(d.path(), &names(&["n1"])).unwrap();
        fs::write(d.path().join("ca.key"), "garbage").unwrap();
        let e = add_node(d.path(), "n2").unwrap_err();
        assert!(format!("{e:#}").contains("ca.key"), "{e:#}");
        // A key that is valid but not the CA's.
        fs::copy(d.path().join("n1.key"), d.path().join("ca.key")).unwrap();
        let e = add_node(d.path(), "n2").unwrap_err();
        assert!(format!("{e:#}").contains("does not belong"), "{e:#}");
        fs::write(
            d.path().join("ca.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(add_node(d.path(), "n2").is_err());
        assert!(!d.path().join("n2.key").exists());
    }
}
