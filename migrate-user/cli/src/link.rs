//! How `tcpmig migrate` and `tcpmig agent` secure their link: the same options on both sides.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::bail;
use clap::Args;
use tcpmig::migrate::{ClientSecurity, ServerSecurity, TlsFiles, Token};

#[derive(Args)]
pub struct LinkArgs {
    /// This side's certificate (PEM, followed by its intermediates): mutual TLS 1.3 with the
    /// other side. Needs --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// This side's private key (PEM: PKCS#8 or SEC1/PKCS#1).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA certificate(s) the other side's certificate must chain to (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Speak plaintext: the image (the connections' queued bytes) and the token cross the
    /// network in clear, and anyone who can reach the agent with the token can move
    /// connections. Needs --token-file.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"], requires = "token_file")]
    insecure: bool,
    /// File holding a shared token (yours, mode 0600), checked in addition to TLS, or instead
    /// of it with --insecure; both sides give the same.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl LinkArgs {
    /// The files, or None with --insecure; neither is an error that says what to give.
    fn files(&self) -> anyhow::Result<Option<TlsFiles>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })),
            _ if self.insecure => Ok(None),
            _ => bail!(
                "give --tls-cert, --tls-key and --tls-ca (mutual TLS between migrate and agent), \
                 or --insecure with --token-file to speak plaintext (docs/security.md)"
            ),
        }
    }

    pub fn token(&self) -> anyhow::Result<Option<Token>> {
        Ok(match &self.token_file {
            Some(path) => Some(Token::from_file(path)?),
            None => None,
        })
    }

    /// The agent's side.
    pub fn server(&self) -> anyhow::Result<ServerSecurity> {
        Ok(match self.files()? {
            Some(files) => ServerSecurity::tls(&files)?,
            None => ServerSecurity::Insecure,
        })
    }

    /// The source's side: the agent's certificate must name `name`, or the address of `to`.
    pub fn client(&self, to: SocketAddr, name: Option<&str>) -> anyhow::Result<ClientSecurity> {
        Ok(match self.files()? {
            Some(files) => {
                let name = name.map_or_else(|| to.ip().to_string(), str::to_owned);
                ClientSecurity::tls(&files, &name)?
            }
            None => ClientSecurity::Insecure,
        })
    }
}
