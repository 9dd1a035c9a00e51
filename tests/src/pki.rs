//! Certificates for the migration link's mutual TLS, made fresh for each bed: a CA, the agent's
//! (its IP address as subject alternative name, as `tcpmig migrate` checks by default) and the
//! source's, and the bad ones a test needs (from a CA nobody trusts, expired). Keys are ECDSA
//! P-256 in PKCS#8 PEM; everything sits in one directory, mode 0700, removed on drop.
use std::{
    fs,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::TestBed;

/// One side's files: what `--tls-cert`, `--tls-key` and `--tls-ca` take.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Identity {
    /// `--tls-cert CERT --tls-key KEY --tls-ca CA`.
    pub fn args(&self) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        vec![
            "--tls-cert".into(),
            path(&self.cert),
            "--tls-key".into(),
            path(&self.key),
            "--tls-ca".into(),
            path(&self.ca),
        ]
    }
}

/// A CA that signs certificates.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert: PathBuf,
}

/// A bed's certificates; see the module documentation.
pub struct Pki {
    dir: PathBuf,
    ca: Authority,
    agent: Identity,
    source: Identity,
}

/// What a certificate from [`Pki::issue`] is like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Signed by the bed's CA, valid now.
    Good,
    /// Signed by another CA, which neither side trusts.
    UnknownCa,
    /// Signed by the bed's CA, expired since 2020.
    Expired,
}

impl Pki {
    /// The CA, the agent's certificate (for `agent_ip`) and the source's, in a directory named
    /// after `bed`.
    pub fn new(bed: &TestBed, agent_ip: IpAddr) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-pki", bed.prefix()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let ca = authority(&dir, "ca", "tcpmig test CA")?;
        Ok(Self {
            agent: issue(&dir, &ca, "agent", &agent_ip.to_string(), Kind::Good)?,
            source: issue(&dir, &ca, "source", "tcpmig-source", Kind::Good)?,
            dir,
            ca,
        })
    }

    pub fn agent(&self) -> &Identity {
        &self.agent
    }

    pub fn source(&self) -> &Identity {
        &self.source
    }

    /// A certificate for `name` (an IP address or a DNS name) of `kind`, with its key, and the
    /// bed's CA as what it trusts; files `<file>.pem` and `<file>.key`.
    pub fn issue(&self, file: &str, name: &str, kind: Kind) -> anyhow::Result<Identity> {
        issue(&self.dir, &self.ca, file, name, kind)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn authority(dir: &Path, file: &str, name: &str) -> anyhow::Result<Authority> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let path = dir.join(format!("{file}.pem"));
    fs::write(&path, cert.pem())?;
    Ok(Authority {
        issuer: Issuer::new(params, key),
        cert: path,
    })
}

fn issue(
    dir: &Path,
    ca: &Authority,
    file: &str,
    name: &str,
    kind: Kind,
) -> anyhow::Result<Identity> {
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    if kind == Kind::Expired {
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    }
    let key = KeyPair::generate()?;
    let cert = match kind {
        Kind::UnknownCa => {
            let other = authority(dir, &format!("{file}-other-ca"), "unknown CA")?;
            params.signed_by(&key, &other.issuer)?
        }
        Kind::Good | Kind::Expired => params.signed_by(&key, &ca.issuer)?,
    };
    let identity = Identity {
        cert: dir.join(format!("{file}.pem")),
        key: dir.join(format!("{file}.key")),
        ca: ca.cert.clone(),
    };
    fs::write(&identity.cert, cert.pem())?;
    write_key(&identity.key, &key)?;
    Ok(identity)
}

fn write_key(path: &Path, key: &KeyPair) -> anyhow::Result<()> {
    fs::write(path, key.serialize_pem())?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}
