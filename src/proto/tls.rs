//! Optional TLS (rustls) around the protocol.
//!
//! Receiver: `--tls-cert` and `--tls-key` turn TLS on; with `--tls-ca` as
//! well, shippers must present a certificate signed by that CA.
//! Shipper: `--tls-ca` turns TLS on and verifies the receiver's certificate
//! against it (the name checked is the host of `--receiver`); `--tls-cert`
//! and `--tls-key` present a client certificate. The shared-secret
//! authentication runs inside TLS as well.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

fn certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let v: Result<Vec<_>, _> = CertificateDer::pem_file_iter(p)
        .map_err(|e| format!("cannot read certificates from {}: {e}", p.display()))?
        .collect();
    let v = v.map_err(|e| format!("bad certificate in {}: {e}", p.display()))?;
    if v.is_empty() {
        return Err(format!("no certificate in {}", p.display()));
    }
    Ok(v)
}

fn key(p: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(p)
        .map_err(|e| format!("cannot read private key from {}: {e}", p.display()))
}

fn roots(p: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut r = RootCertStore::empty();
    for c in certs(p)? {
        r.add(c)
            .map_err(|e| format!("bad CA certificate in {}: {e}", p.display()))?;
    }
    Ok(Arc::new(r))
}

fn provider() -> Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

impl TlsOptions {
    /// The receiver's acceptor, if TLS is configured.
    pub fn acceptor(&self) -> Result<Option<TlsAcceptor>, String> {
        let (Some(cert), Some(key_path)) = (&self.cert, &self.key) else {
            if self.cert.is_some() || self.key.is_some() || self.ca.is_some() {
                return Err("TLS on the receiver needs both --tls-cert and --tls-key".into());
            }
            return Ok(None);
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.ca {
            Some(ca) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                    .build()
                    .map_err(|e| e.to_string())?,
            ),
            None => builder.with_no_client_auth(),
        };
        let cfg = builder
            .with_single_cert(certs(cert)?, key(key_path)?)
            .map_err(|e| format!("TLS certificate and key do not fit: {e}"))?;
        Ok(Some(TlsAcceptor::from(Arc::new(cfg))))
    }

    /// The shipper's connector and the server name to check, if TLS is configured.
    pub fn connector(
        &self,
        host: &str,
    ) -> Result<Option<(TlsConnector, ServerName<'static>)>, String> {
        let Some(ca) = &self.ca else {
            if self.cert.is_some() || self.key.is_some() {
                return Err("TLS on the shipper needs --tls-ca to verify the receiver".into());
            }
            return Ok(None);
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots(ca)?);
        let cfg = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(certs(c)?, key(k)?)
                .map_err(|e| format!("TLS client certificate and key do not fit: {e}"))?,
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("a TLS client certificate needs both --tls-cert and --tls-key".into()),
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?;
        Ok(Some((TlsConnector::from(Arc::new(cfg)), name)))
    }
}
