//! The link's security: mutual TLS 1.3 (rustls with aws-lc-rs, whose key exchange prefers the
//! post-quantum X25519MLKEM768), or plaintext when the operator asked for it.
//!
//! The image carries the users' queued bytes and the token: on a network between two hosts it is
//! encrypted, and each side proves who it is with a certificate that chains to a CA both trust
//! (the agent demands one from the source, as CRIU's page server does with `--tls`). Only TLS 1.3
//! is offered: both ends are tcpmig, so no older peer needs 1.2. The files are read, and the key
//! checked against its certificate, when the command starts, before anything is stopped.
//!
//! A plaintext peer is told apart from a broken one by the first bytes it sends: a TLS record
//! starts with its content type (22, handshake) and version major 3; a link frame starts with a
//! 4-byte length below 4 KiB. Both sides say which it was, so that an operator who forgot
//! `--tls-*` on one host reads that, not "corrupt message".
use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

/// The three PEM files of one side.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// This side's certificate, followed by its intermediates if any.
    pub cert: PathBuf,
    /// Its private key: PKCS#8, SEC1 (EC) or PKCS#1 (RSA).
    pub key: PathBuf,
    /// The CA certificate(s) the peer's certificate must chain to.
    pub ca: PathBuf,
}

/// Why TLS could not be set up, or failed with a peer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the TLS {what} {}", .path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the TLS CA file {} holds a certificate that cannot be a trust anchor", .path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the TLS CA file {} cannot verify clients", .path.display())]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error(
        "the TLS key {} does not go with the certificate {} (or either is unusable)",
        .key.display(), .cert.display()
    )]
    KeyMismatch {
        key: PathBuf,
        cert: PathBuf,
        #[source]
        source: Box<rustls::Error>,
    },
    #[error("--tls-name {name:?} is neither a DNS name nor an IP address")]
    BadName { name: String },
    #[error("TLS handshake with {peer} failed (nothing was changed)")]
    Handshake {
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "{peer} speaks plaintext, not TLS: start it with the same --tls-cert/--tls-key/--tls-ca \
         options (or both sides with --insecure); nothing was changed"
    )]
    PlaintextPeer { peer: SocketAddr },
    #[error(
        "{peer} closed the link during the TLS handshake: it speaks plaintext (started with \
         --insecure?) or refused this side's certificate; nothing was changed"
    )]
    ClosedInHandshake { peer: SocketAddr },
    #[error(
        "{peer} speaks TLS and this side was started with --insecure: give it --tls-cert, \
         --tls-key and --tls-ca too; nothing was changed"
    )]
    TlsPeer { peer: SocketAddr },
}

/// How `tcpmig migrate` secures its link to the agent.
#[derive(Clone, Debug)]
pub enum ClientSecurity {
    /// Mutual TLS 1.3, checking that the agent's certificate names `name`.
    Tls {
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    },
    /// Plaintext, as the operator asked (`--insecure`).
    Insecure,
}

impl ClientSecurity {
    /// Reads `files` and checks the key against the certificate. `name` is what the agent's
    /// certificate must name (a DNS name or an IP address).
    pub fn tls(files: &TlsFiles, name: &str) -> Result<Self, TlsError> {
        let name = ServerName::try_from(name.to_owned()).map_err(|_| TlsError::BadName {
            name: name.to_owned(),
        })?;
        let (chain, key, roots) = read_files(files)?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|source| key_mismatch(files, source))?;
        Ok(Self::Tls {
            config: Arc::new(config),
            name,
        })
    }
}

/// How `tcpmig agent` secures the link from the source.
#[derive(Clone, Debug)]
pub enum ServerSecurity {
    /// Mutual TLS 1.3: the source must present a certificate that chains to the CA.
    Tls(Arc<ServerConfig>),
    /// Plaintext, as the operator asked (`--insecure`).
    Insecure,
}

impl ServerSecurity {
    /// Reads `files` and checks the key against the certificate.
    pub fn tls(files: &TlsFiles) -> Result<Self, TlsError> {
        let (chain, key, roots) = read_files(files)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|source| TlsError::Verifier {
                path: files.ca.clone(),
                source,
            })?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("aws-lc-rs supports TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|source| key_mismatch(files, source))?;
        Ok(Self::Tls(Arc::new(config)))
    }
}

fn key_mismatch(files: &TlsFiles, source: rustls::Error) -> TlsError {
    TlsError::KeyMismatch {
        key: files.key.clone(),
        cert: files.cert.clone(),
        source: Box::new(source),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

type Identity = (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    RootCertStore,
);

fn read_files(files: &TlsFiles) -> Result<Identity, TlsError> {
    let chain = read_certs("certificate", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Pem {
        what: "key",
        path: files.key.clone(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs("CA", &files.ca)? {
        roots.add(ca).map_err(|source| TlsError::BadCa {
            path: files.ca.clone(),
            source,
        })?;
    }
    Ok((chain, key, roots))
}

/// Every certificate in `path`, at least one.
fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |source| TlsError::Pem {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(error)?;
    if certs.is_empty() {
        return Err(error(rustls::pki_types::pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// What the first byte a peer sent says about it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum FirstBytes {
    /// A TLS record (content type handshake or alert).
    Tls,
    /// Anything else: a link frame, or garbage.
    Other,
    /// The peer closed without sending anything (a port probe).
    Nothing,
}

pub(super) fn classify(first: &[u8]) -> FirstBytes {
    match first {
        [] => FirstBytes::Nothing,
        // A frame's length prefix starts with 0 (frames are far below 16 MiB): 21 or 22 alone
        // is TLS, even when only one byte has arrived yet.
        [21 | 22, ..] => FirstBytes::Tls,
        _ => FirstBytes::Other,
    }
}

/// The rustls error inside `error`, if the link failed because of TLS (an alert from the peer,
/// a certificate this side refused).
pub(super) fn rustls_cause(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_tls_from_frames() {
        // A ClientHello record, an alert, a Hello frame's length prefix, a closed peer.
        assert_eq!(classify(&[22, 3, 1, 0, 200]), FirstBytes::Tls);
        assert_eq!(classify(&[21, 3, 3, 0, 2]), FirstBytes::Tls);
        assert_eq!(classify(&[0, 0, 0, 60, 0]), FirstBytes::Other);
        assert_eq!(classify(b"GET / HTTP/1.1"), FirstBytes::Other);
        assert_eq!(classify(&[]), FirstBytes::Nothing);
    }

    #[test]
    fn missing_files_are_named() {
        let files = TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            ca: "/nonexistent/ca.pem".into(),
        };
        let error = ServerSecurity::tls(&files).unwrap_err().to_string();
        assert!(
            error.contains("TLS certificate /nonexistent/cert.pem"),
            "{error}"
        );
    }

    #[test]
    fn names_are_dns_names_or_addresses() {
        assert!(ServerName::try_from("10.0.0.2".to_owned()).is_ok());
        assert!(ServerName::try_from("agent.example".to_owned()).is_ok());
        assert!(ServerName::try_from("not a name".to_owned()).is_err());
    }
}
