//! HTTPS on the API listener (`api.tls`): the certificate chain and key are read from PEM
//! files when Sluice starts, and connections are accepted with rustls.
//!
//! The crypto provider is aws-lc-rs, the one the AWS SDK's HTTPS client already brings, so
//! serving TLS adds no second TLS or crypto library to the build. It is named explicitly
//! rather than taken as the process default: the tree also holds ring (through reqwest), and
//! with two providers compiled in, rustls has no default to pick.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read the certificate chain {path} (api.tls.cert): {source}")]
    Cert {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the certificate file {0} (api.tls.cert) holds no PEM certificate")]
    NoCert(PathBuf),
    #[error("cannot read the private key {path} (api.tls.key): {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error(
        "the certificate {cert} and key {key} (api.tls) do not make a TLS configuration: {source}"
    )]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The acceptor for `api.tls`, or an error naming the file that is wrong.
pub fn acceptor(config: &sluice_config::TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates(&config.cert)?;
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|source| TlsError::Key {
        path: config.key.clone(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|source| TlsError::Config {
            cert: config.cert.clone(),
            key: config.key.clone(),
            source,
        })?;
    let mut server = server;
    // The API speaks HTTP/1.1 only.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert {
            path: path.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert(path.to_path_buf()));
    }
    Ok(chain)
}
